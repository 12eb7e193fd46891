//! Who may see what, and for how long: launch sessions and emergency access.
//!
//! A launch token from the clinical system is used once (its `jti` is kept until it expires,
//! so a replay is refused) and opens a session for one user, role and patient. The browser
//! holds the session secret; the node keeps only its SHA-256.
//!
//! Emergency access (break-glass): a clinician opens a record without Share In at this
//! organisation, giving a reason, for a limited time. It is theirs alone, and each use is a
//! row kept for audit.

use crate::{Result, Store, WriteBatch};
use caremesh_sync::NhsNumber;
use rusqlite::{OptionalExtension, params};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BreakGlass {
    pub id: i64,
    pub nhs: String,
    /// The user id from the launch that invoked it.
    pub user_id: String,
    /// The user's name, as the launch gave it.
    pub clinician: String,
    pub reason: String,
    pub started_at: i64,
    pub expires_at: i64,
}

const COLUMNS: &str = "id, nhs, user_id, clinician, reason, started_at, expires_at";

fn row_to_break_glass(row: &rusqlite::Row<'_>) -> rusqlite::Result<BreakGlass> {
    Ok(BreakGlass {
        id: row.get(0)?,
        nhs: row.get(1)?,
        user_id: row.get(2)?,
        clinician: row.get(3)?,
        reason: row.get(4)?,
        started_at: row.get(5)?,
        expires_at: row.get(6)?,
    })
}

impl Store {
    /// The user's break-glass in force for the patient at `now`, the latest if several are.
    pub fn active_break_glass(
        &self,
        nhs: &NhsNumber,
        user_id: &str,
        now: i64,
    ) -> Result<Option<BreakGlass>> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM break_glass WHERE nhs = ?1 AND user_id = ?2 \
                 AND started_at <= ?3 AND expires_at > ?3 ORDER BY expires_at DESC LIMIT 1"
            ))
            .and_then(|mut statement| {
                statement
                    .query_row(params![nhs.as_str(), user_id, now], row_to_break_glass)
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

/// A session opened by a launch: one user, one role, at most one patient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSession {
    pub user_id: String,
    pub user_name: String,
    pub role: String,
    pub organisation: String,
    /// The patient the launch was for; `None` for roles that do not open records.
    pub nhs: Option<String>,
    pub purpose: String,
    pub started_at: i64,
    pub expires_at: i64,
}

/// What became of a launch token presented once more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenUse {
    First,
    Replayed,
}

impl Store {
    /// Marks a launch token used. `Replayed` if it was used before. Tokens long expired are
    /// forgotten here: their expiry alone refuses them.
    pub fn use_launch_token(&self, jti: &str, expires_at: i64, now: i64) -> Result<TokenUse> {
        self.open_pending_group()?;
        assert!(
            !jti.is_empty(),
            "a launch token needs its id to be used once"
        );
        self.conn
            .prepare_cached("DELETE FROM launch_tokens_used WHERE expires_at < ?1")
            .and_then(|mut statement| statement.execute([now - FORGET_USED_TOKENS_AFTER]))
            .map_err(self.err("forget expired launch tokens"))?;
        let inserted = self
            .conn
            .prepare_cached(
                "INSERT INTO launch_tokens_used (jti, expires_at, used_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(jti) DO NOTHING",
            )
            .and_then(|mut statement| statement.execute(params![jti, expires_at, now]))
            .map_err(self.err("record a launch token's use"))?;
        Ok(if inserted == 1 {
            TokenUse::First
        } else {
            TokenUse::Replayed
        })
    }

    /// Keeps a session under the hash of its secret.
    pub fn open_session(&self, secret_hash: &[u8; 32], session: &LaunchSession) -> Result<()> {
        self.open_pending_group()?;
        assert!(session.expires_at > session.started_at);
        self.conn
            .prepare_cached(
                "INSERT INTO sessions (secret_hash, user_id, user_name, role, organisation, nhs, \
                 purpose, started_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )
            .and_then(|mut statement| {
                statement.execute(params![
                    &secret_hash[..],
                    session.user_id,
                    session.user_name,
                    session.role,
                    session.organisation,
                    session.nhs,
                    session.purpose,
                    session.started_at,
                    session.expires_at
                ])
            })
            .map_err(self.err("open a session"))?;
        self.conn
            .prepare_cached("DELETE FROM sessions WHERE expires_at < ?1")
            .and_then(|mut statement| statement.execute([session.started_at]))
            .map_err(self.err("forget expired sessions"))?;
        Ok(())
    }

    /// The session whose secret hashes to `secret_hash`, if it is in force at `now`.
    pub fn session(&self, secret_hash: &[u8; 32], now: i64) -> Result<Option<LaunchSession>> {
        self.conn
            .prepare_cached(
                "SELECT user_id, user_name, role, organisation, nhs, purpose, started_at, \
                 expires_at FROM sessions WHERE secret_hash = ?1 AND expires_at > ?2",
            )
            .and_then(|mut statement| {
                statement
                    .query_row(params![&secret_hash[..], now], |row| {
                        Ok(LaunchSession {
                            user_id: row.get(0)?,
                            user_name: row.get(1)?,
                            role: row.get(2)?,
                            organisation: row.get(3)?,
                            nhs: row.get(4)?,
                            purpose: row.get(5)?,
                            started_at: row.get(6)?,
                            expires_at: row.get(7)?,
                        })
                    })
                    .optional()
            })
            .map_err(self.err("read a session"))
    }
}

impl WriteBatch<'_> {
    /// Records a break-glass and returns it. The caller has checked the clinician and reason,
    /// and records the access in the same batch: a break-glass is never granted unaudited.
    pub fn record_break_glass(
        &self,
        nhs: &NhsNumber,
        user_id: &str,
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
            .tx
            .prepare_cached(
                "INSERT INTO break_glass (nhs, user_id, clinician, reason, started_at, expires_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
            )
            .and_then(|mut statement| {
                statement.query_row(
                    params![
                        nhs.as_str(),
                        user_id,
                        clinician,
                        reason,
                        started_at,
                        expires_at
                    ],
                    |row| row.get(0),
                )
            })
            .map_err(self.err("record break-glass"))?;
        Ok(BreakGlass {
            id,
            nhs: nhs.to_string(),
            user_id: user_id.to_string(),
            clinician: clinician.to_string(),
            reason: reason.to_string(),
            started_at,
            expires_at,
        })
    }
}

/// How long a used token's id is kept after it expired (clock skew between the clinical
/// system and this node is smaller).
const FORGET_USED_TOKENS_AFTER: i64 = 3600;

#[cfg(test)]
mod tests {
    use super::*;

    /// The view grants a break-glass and records it in the audit trail in one batch: a
    /// failure between the two (here, a batch dropped before its commit) leaves neither.
    #[test]
    fn a_break_glass_and_its_audit_entry_are_stored_together_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("node.db")).unwrap();
        let nhs = NhsNumber::parse("9912003888").unwrap();
        let key = caremesh_sync::PublisherKey::from_secret([7; 32]);
        let own = caremesh_sync::OdsCode::parse("A81001").unwrap();
        let event = crate::audit::AuditEvent {
            at: 1_000,
            user_id: "u1".into(),
            user_name: "Dr A".into(),
            role: "clinician".into(),
            organisation: own.to_string(),
            action: "break-glass".into(),
            nhs: Some(nhs.to_string()),
            sources: Vec::new(),
            sections: Vec::new(),
            purpose: "direct care (emergency access)".into(),
            outcome: "allowed".into(),
            detail: "unconscious".into(),
        };
        let grant_and_audit = |store: &mut Store, commit: bool| {
            let batch = store.write().unwrap();
            batch
                .record_break_glass(&nhs, "u1", "Dr A", "unconscious", 1_000, 4_600)
                .unwrap();
            crate::publish::record_access_in(&batch, &key, &own, &event).unwrap();
            if commit {
                batch.commit().unwrap();
            }
        };
        grant_and_audit(&mut store, false);
        assert_eq!(store.break_glass_history(&nhs).unwrap(), vec![]);
        assert!(store.audit_events().unwrap().is_empty());
        grant_and_audit(&mut store, true);
        assert_eq!(store.break_glass_history(&nhs).unwrap().len(), 1);
        let audited = store.audit_events().unwrap();
        assert_eq!(audited.len(), 1);
        assert_eq!(audited[0].event.action, "break-glass");
    }

    #[test]
    fn break_glass_is_in_force_only_within_its_time_and_is_kept_after() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("node.db")).unwrap();
        let nhs = NhsNumber::parse("9912003888").unwrap();
        assert_eq!(store.active_break_glass(&nhs, "u1", 1_000).unwrap(), None);
        let batch = store.write().unwrap();
        let granted = batch
            .record_break_glass(
                &nhs,
                "u1",
                "Dr A",
                "unconscious, history needed",
                1_000,
                4_600,
            )
            .unwrap();
        batch.commit().unwrap();
        assert_eq!(
            store.active_break_glass(&nhs, "u1", 1_000).unwrap(),
            Some(granted.clone())
        );
        assert_eq!(
            store.active_break_glass(&nhs, "u1", 4_599).unwrap(),
            Some(granted.clone())
        );
        assert_eq!(store.active_break_glass(&nhs, "u1", 4_600).unwrap(), None);
        assert_eq!(
            store.active_break_glass(&nhs, "u2", 2_000).unwrap(),
            None,
            "break-glass is the invoking clinician's alone"
        );
        let other = NhsNumber::parse("9434765919").unwrap();
        assert_eq!(store.active_break_glass(&other, "u1", 2_000).unwrap(), None);
        assert_eq!(store.break_glass_history(&nhs).unwrap(), vec![granted]);
    }

    #[test]
    fn a_launch_token_is_used_once_and_sessions_end_when_they_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("node.db")).unwrap();
        assert_eq!(
            store.use_launch_token("t1", 1_300, 1_000).unwrap(),
            TokenUse::First
        );
        assert_eq!(
            store.use_launch_token("t1", 1_300, 1_010).unwrap(),
            TokenUse::Replayed
        );
        assert_eq!(
            store.use_launch_token("t2", 1_300, 1_010).unwrap(),
            TokenUse::First
        );
        let session = LaunchSession {
            user_id: "u1".into(),
            user_name: "Dr A".into(),
            role: "clinician".into(),
            organisation: "A81001".into(),
            nhs: Some("9912003888".into()),
            purpose: "direct care".into(),
            started_at: 1_000,
            expires_at: 2_800,
        };
        store.open_session(&[7; 32], &session).unwrap();
        assert_eq!(store.session(&[7; 32], 2_799).unwrap(), Some(session));
        assert_eq!(store.session(&[7; 32], 2_800).unwrap(), None);
        assert_eq!(store.session(&[8; 32], 1_500).unwrap(), None);
    }
}
