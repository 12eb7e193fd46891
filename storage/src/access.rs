//! Emergency access (break-glass): a clinician opens a record without Share In at this
//! organisation, giving a reason, for a limited time. Each use is a row kept for audit.

use crate::{Result, Store};
use caremesh_sync::NhsNumber;
use rusqlite::{OptionalExtension, params};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BreakGlass {
    pub id: i64,
    pub nhs: String,
    pub clinician: String,
    pub reason: String,
    pub started_at: i64,
    pub expires_at: i64,
}

const COLUMNS: &str = "id, nhs, clinician, reason, started_at, expires_at";

fn row_to_break_glass(row: &rusqlite::Row<'_>) -> rusqlite::Result<BreakGlass> {
    Ok(BreakGlass {
        id: row.get(0)?,
        nhs: row.get(1)?,
        clinician: row.get(2)?,
        reason: row.get(3)?,
        started_at: row.get(4)?,
        expires_at: row.get(5)?,
    })
}

impl Store {
    /// Records a break-glass and returns it. The caller has checked the clinician and reason.
    pub fn record_break_glass(
        &self,
        nhs: &NhsNumber,
        clinician: &str,
        reason: &str,
        started_at: i64,
        expires_at: i64,
    ) -> Result<BreakGlass> {
        assert!(
            expires_at > started_at,
            "break-glass must end after it starts"
        );
        let id = self
            .conn
            .prepare_cached(
                "INSERT INTO break_glass (nhs, clinician, reason, started_at, expires_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5) RETURNING id",
            )
            .and_then(|mut statement| {
                statement.query_row(
                    params![nhs.as_str(), clinician, reason, started_at, expires_at],
                    |row| row.get(0),
                )
            })
            .map_err(self.err("record break-glass"))?;
        Ok(BreakGlass {
            id,
            nhs: nhs.to_string(),
            clinician: clinician.to_string(),
            reason: reason.to_string(),
            started_at,
            expires_at,
        })
    }

    /// The break-glass in force for the patient at `now`, the latest if several are.
    pub fn active_break_glass(&self, nhs: &NhsNumber, now: i64) -> Result<Option<BreakGlass>> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM break_glass WHERE nhs = ?1 AND started_at <= ?2 \
                 AND expires_at > ?2 ORDER BY expires_at DESC LIMIT 1"
            ))
            .and_then(|mut statement| {
                statement
                    .query_row(params![nhs.as_str(), now], row_to_break_glass)
                    .optional()
            })
            .map_err(self.err("read break-glass"))
    }

    /// Every break-glass on the patient's record, newest first.
    pub fn break_glass_history(&self, nhs: &NhsNumber) -> Result<Vec<BreakGlass>> {
        let mut statement = self
            .conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM break_glass WHERE nhs = ?1 ORDER BY started_at DESC, id DESC"
            ))
            .map_err(self.err("read break-glass"))?;
        let rows = statement
            .query_map([nhs.as_str()], row_to_break_glass)
            .map_err(self.err("read break-glass"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err("read break-glass"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn break_glass_is_in_force_only_within_its_time_and_is_kept_after() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("node.db")).unwrap();
        let nhs = NhsNumber::parse("9912003888").unwrap();
        assert_eq!(store.active_break_glass(&nhs, 1_000).unwrap(), None);
        let granted = store
            .record_break_glass(&nhs, "Dr A", "unconscious, history needed", 1_000, 4_600)
            .unwrap();
        assert_eq!(
            store.active_break_glass(&nhs, 1_000).unwrap(),
            Some(granted.clone())
        );
        assert_eq!(
            store.active_break_glass(&nhs, 4_599).unwrap(),
            Some(granted.clone())
        );
        assert_eq!(store.active_break_glass(&nhs, 4_600).unwrap(), None);
        let other = NhsNumber::parse("9434765919").unwrap();
        assert_eq!(store.active_break_glass(&other, 2_000).unwrap(), None);
        assert_eq!(store.break_glass_history(&nhs).unwrap(), vec![granted]);
    }
}
