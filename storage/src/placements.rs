//! Where each resource this node ingested was placed: on which patient, and through which
//! Patient resource of the extract. Ingest reads it to move a resource re-sent under another
//! patient, and to take a Patient's resources with it when its NHS number changes, so that
//! no resource of this publisher is ever held on two patients.

use crate::publish::Publication;
use crate::{Result, StorageError, Store, WriteBatch};
use caremesh_sync::{Item, NhsNumber, OdsCode, moved};
use rusqlite::{OptionalExtension, params};

impl Publication {
    /// Places the current items of resource `key` on the patient `placement` names, and
    /// records where it now is. A resource last placed on another patient moves: its copy
    /// there is retracted in this same publication, a notice that it moved is left in its
    /// place, and the items placed here say they moved (at `at`, RFC 3339, on this and
    /// every later version). Returns the
    /// patient it moved from, if it moved. Items empty (entered in error): retracted from
    /// wherever it was, with no notice. So nothing of one publisher's is on two patients.
    pub fn place_resource(
        &mut self,
        batch: &WriteBatch<'_>,
        key: &str,
        mut placement: Placement,
        family: &[String],
        mut items: Vec<Item>,
        at: &str,
    ) -> Result<Option<NhsNumber>> {
        let publisher = self.publisher().clone();
        let mut family = family.to_vec();
        family.push(moved::notice_id(key));
        let mut moved_from = None;
        match batch.placement(&publisher, key)? {
            Some(previous) if previous.nhs != placement.nhs => {
                let held = batch
                    .held_items(&publisher, &previous.nhs, key)?
                    .into_iter()
                    .find(|item| !item.is_moved_away_notice());
                let notice = held
                    .filter(|_| !items.is_empty())
                    .map(|item| moved_away_notice(item, at));
                if notice.is_some() {
                    placement.moved_at = Some(at.to_string());
                    moved_from = Some(previous.nhs.clone());
                }
                self.place(batch, &previous.nhs, &family, notice.into_iter().collect())?;
            }
            Some(previous) => placement.moved_at = previous.moved_at,
            None => {}
        }
        if let Some(since) = &placement.moved_at {
            for item in &mut items {
                item.fields.insert(moved::HERE.into(), since.clone());
            }
        }
        self.place(batch, &placement.nhs, &family, items)?;
        batch.set_placement(&publisher, key, &placement)?;
        Ok(moved_from)
    }
}

/// One publisher's resource held on more than one patient: a broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnSeveralPatients {
    pub publisher: String,
    pub item_id: String,
    pub patients: Vec<String>,
}

impl Store {
    /// Every item (a publisher's resource; notes and moved notices aside) this store holds on
    /// more than one patient, of `publisher` only when given. Empty when all is well.
    pub fn resources_on_several_patients(
        &self,
        publisher: Option<&OdsCode>,
    ) -> Result<Vec<OnSeveralPatients>> {
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT publisher, item_id, group_concat(DISTINCT nhs) FROM items \
                 WHERE (?1 IS NULL OR publisher = ?1) \
                   AND section NOT IN ('sharing', 'audit') AND instr(item_id, '#') = 0 \
                 GROUP BY publisher, item_id HAVING count(DISTINCT nhs) > 1 \
                 ORDER BY publisher, item_id",
            )
            .map_err(self.err("find resources on several patients"))?;
        let rows = statement
            .query_map([publisher.map(OdsCode::as_str)], |row| {
                Ok(OnSeveralPatients {
                    publisher: row.get(0)?,
                    item_id: row.get(1)?,
                    patients: row
                        .get::<_, String>(2)?
                        .split(',')
                        .map(str::to_string)
                        .collect(),
                })
            })
            .map_err(self.err("find resources on several patients"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err("find resources on several patients"))
    }
}

/// What a patient's record keeps where an entry was that its publisher moved to another
/// patient: the entry's title, section and data class (so exactly its former audience sees
/// the notice), and when; no clinical detail and nothing of the other patient.
fn moved_away_notice(moved: Item, at: &str) -> Item {
    let mut notice = Item::titled(
        &moved::notice_id(&moved.id),
        moved.section,
        moved.class,
        &moved.resource_type,
        &moved.title,
        &moved.source_system,
        &moved.source_id,
    );
    notice.effective = moved.effective;
    notice.recorded = moved.recorded;
    notice.fields.insert(moved::AWAY.into(), at.to_string());
    notice
}

/// Where a resource sits now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub nhs: NhsNumber,
    /// The extract's Patient resource the resource named its subject through
    /// (`Patient/<id>`), when it named one; `None` when it named the NHS number itself.
    pub patient_key: Option<String>,
    /// When the publisher moved it here from another patient (RFC 3339), if it did.
    pub moved_at: Option<String>,
}

impl WriteBatch<'_> {
    /// The patient `publisher`'s resource `source_key` was last placed on.
    pub fn placement(&self, publisher: &OdsCode, source_key: &str) -> Result<Option<Placement>> {
        let row: Option<(String, Option<String>, Option<String>)> = self
            .tx
            .prepare_cached(
                "SELECT nhs, patient_key, moved_at FROM resource_placements \
                 WHERE publisher = ?1 AND source_key = ?2",
            )
            .and_then(|mut statement| {
                statement
                    .query_row(params![publisher.as_str(), source_key], |row| {
                        Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                    })
                    .optional()
            })
            .map_err(self.err("read resource placement"))?;
        row.map(|(nhs, patient_key, moved_at)| {
            Ok(Placement {
                nhs: self.parse_nhs(&nhs, source_key)?,
                patient_key,
                moved_at,
            })
        })
        .transpose()
    }

    pub fn set_placement(
        &self,
        publisher: &OdsCode,
        source_key: &str,
        placement: &Placement,
    ) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO resource_placements \
                 (publisher, source_key, nhs, patient_key, moved_at) VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT(publisher, source_key) DO UPDATE SET nhs = excluded.nhs, \
                 patient_key = excluded.patient_key, moved_at = excluded.moved_at",
            )
            .and_then(|mut statement| {
                statement.execute(params![
                    publisher.as_str(),
                    source_key,
                    placement.nhs.as_str(),
                    placement.patient_key,
                    placement.moved_at
                ])
            })
            .map_err(self.err("store resource placement"))?;
        Ok(())
    }

    /// The resources of `publisher` placed on `nhs` through the extract's Patient
    /// `patient_key`: those that follow it when its NHS number changes.
    pub fn placed_through(
        &self,
        publisher: &OdsCode,
        nhs: &NhsNumber,
        patient_key: &str,
    ) -> Result<Vec<String>> {
        self.texts(
            "SELECT source_key FROM resource_placements \
             WHERE publisher = ?1 AND nhs = ?2 AND patient_key = ?3 ORDER BY source_key",
            [publisher.as_str(), nhs.as_str(), patient_key],
            "read resource placements",
        )
    }

    /// The items `publisher` holds about `nhs` with id `item_id`, as its documents hold them
    /// (one, or none; two only while a partition move is pending in this batch).
    pub fn held_items(
        &self,
        publisher: &OdsCode,
        nhs: &NhsNumber,
        item_id: &str,
    ) -> Result<Vec<Item>> {
        let bodies = self.texts(
            "SELECT body FROM items WHERE publisher = ?1 AND nhs = ?2 AND item_id = ?3",
            [publisher.as_str(), nhs.as_str(), item_id],
            "read held item",
        )?;
        bodies
            .iter()
            .map(|body| {
                serde_json::from_str(body).map_err(|e| StorageError::DamagedRow {
                    path: self.path.clone(),
                    doc: format!("item {item_id} of {publisher}"),
                    what: e.to_string(),
                })
            })
            .collect()
    }

    /// The one text column `sql` selects, over every row.
    fn texts(&self, sql: &str, bound: [&str; 3], action: &'static str) -> Result<Vec<String>> {
        let mut statement = self.tx.prepare_cached(sql).map_err(self.err(action))?;
        let rows = statement
            .query_map(bound, |row| row.get(0))
            .map_err(self.err(action))?;
        rows.collect::<rusqlite::Result<Vec<String>>>()
            .map_err(self.err(action))
    }

    fn parse_nhs(&self, nhs: &str, source_key: &str) -> Result<NhsNumber> {
        NhsNumber::parse(nhs).map_err(|e| StorageError::DamagedRow {
            path: self.path.clone(),
            doc: format!("placement of {source_key}"),
            what: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;
    use caremesh_sync::policy::Consent;
    use caremesh_sync::{DataClass, PublisherKey, Section};

    fn condition(id: &str) -> Item {
        Item::titled(
            id,
            Section::Problems,
            DataClass::Sensitive,
            "Condition",
            "Asthma",
            "test",
            id,
        )
    }

    fn problems(store: &Store, nhs: &NhsNumber) -> Vec<Item> {
        let items = store.patient_items(nhs).unwrap().into_iter();
        items
            .map(|s| s.item)
            .filter(|i| i.section == Section::Problems)
            .collect()
    }

    /// Moved, the resource leaves one patient for another in one publication: the first
    /// keeps a notice in the entry's own data class, the second's item says it moved, and a
    /// later version keeps saying so. No item is ever on two patients.
    #[test]
    fn a_resource_placed_on_another_patient_moves_and_leaves_a_notice() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("node.db")).unwrap();
        let publisher = OdsCode::parse("A81001").unwrap();
        let key = PublisherKey::from_secret([7; 32]);
        let first = NhsNumber::parse("9990000018").unwrap();
        let second = NhsNumber::parse("9990000026").unwrap();
        let family = ["Condition/1".to_string()];
        let publish = |store: &mut Store, nhs: &NhsNumber, at: &str| {
            let batch = store.write().unwrap();
            let mut publication = Publication::new(publisher.clone(), Consent::SENT_BY_PUBLISHER);
            let placement = Placement {
                nhs: nhs.clone(),
                patient_key: None,
                moved_at: None,
            };
            let moved = publication
                .place_resource(
                    &batch,
                    "Condition/1",
                    placement,
                    &family,
                    vec![condition("Condition/1")],
                    at,
                )
                .unwrap();
            publication.apply(&batch, &key, 1_000).unwrap();
            batch.commit().unwrap();
            moved
        };
        assert_eq!(publish(&mut store, &first, "2026-01-01T00:00:00Z"), None);
        assert_eq!(
            publish(&mut store, &second, "2026-02-01T00:00:00Z"),
            Some(first.clone())
        );
        assert_eq!(publish(&mut store, &second, "2026-03-01T00:00:00Z"), None);
        assert!(
            store
                .resources_on_several_patients(None)
                .unwrap()
                .is_empty()
        );

        let left = problems(&store, &first);
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(left[0].is_moved_away_notice());
        assert_eq!(left[0].class, DataClass::Sensitive);
        assert_eq!(left[0].fields[moved::AWAY], "2026-02-01T00:00:00Z");
        let here = problems(&store, &second);
        assert_eq!(here.len(), 1);
        assert_eq!(here[0].fields[moved::HERE], "2026-02-01T00:00:00Z");

        // Moving back takes the notice away from where the entry now is.
        assert_eq!(
            publish(&mut store, &first, "2026-04-01T00:00:00Z"),
            Some(second.clone())
        );
        let back = problems(&store, &first);
        assert_eq!(back.len(), 1, "{back:?}");
        assert!(!back[0].is_moved_away_notice());
    }

    #[test]
    fn placements_record_the_latest_patient_and_find_a_patients_resources() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("node.db")).unwrap();
        let publisher = OdsCode::parse("A81001").unwrap();
        let first = NhsNumber::parse("9990000018").unwrap();
        let second = NhsNumber::parse("9990000026").unwrap();
        let batch = store.write().unwrap();
        assert_eq!(batch.placement(&publisher, "Condition/1").unwrap(), None);
        let through = |nhs: &NhsNumber| Placement {
            nhs: nhs.clone(),
            patient_key: Some("Patient/p".into()),
            moved_at: None,
        };
        batch
            .set_placement(&publisher, "Condition/1", &through(&first))
            .unwrap();
        batch
            .set_placement(&publisher, "Condition/2", &through(&first))
            .unwrap();
        batch
            .set_placement(&publisher, "Condition/2", &through(&second))
            .unwrap();
        assert_eq!(
            batch.placement(&publisher, "Condition/2").unwrap(),
            Some(through(&second))
        );
        assert_eq!(
            batch
                .placed_through(&publisher, &first, "Patient/p")
                .unwrap(),
            vec!["Condition/1".to_string()]
        );
        let other = OdsCode::parse("RTH").unwrap();
        assert_eq!(batch.placement(&other, "Condition/1").unwrap(), None);
    }
}
