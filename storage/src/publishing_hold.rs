//! A hold on publishing, for a node restored from a backup or rebuilt from its peers.
//!
//! A publisher writes its documents as one Automerge actor, derived from its key
//! (`publish::actor_for`), so its changes form one numbered sequence. A node restored from a
//! backup holds that sequence only up to the backup; its peers hold the changes it made
//! after. A version it wrote now would number its change as one they already hold with
//! other content, and the two copies would never merge. So until it has taken back from
//! every peer it syncs with what they hold of its own, it publishes nothing new:
//!
//! - what would write a new version of its clinical or sharing documents (ingest, a consent
//!   change) is refused with [`crate::publish::PublishError::Held`], nothing written (files
//!   in the drop folder wait);
//! - reading the record goes on: an access to others' data is recorded in the audit chain at
//!   once, and its access record (a document the data's publisher receives) is published
//!   when the hold ends;
//! - the sync engine ends the hold once it has caught up with each peer in `sync_peers`
//!   ([`WriteBatch::release_publishing`]); an operator can end it when a peer is gone for
//!   good.

use crate::{Result, StorageError, Store, WriteBatch};
use rusqlite::OptionalExtension;

/// The hold as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishingHold {
    /// Unix seconds.
    pub since: i64,
    /// Why: a restore from a backup (and when it was made), or a rebuild.
    pub reason: String,
    /// False once released, while the access records it deferred wait to be published.
    pub held: bool,
    /// Audit entries after this position were recorded during the hold.
    pub audit_after: i64,
}

fn read(conn: &rusqlite::Connection) -> rusqlite::Result<Option<PublishingHold>> {
    conn.query_row(
        "SELECT since, reason, held, audit_after FROM publishing_hold WHERE id = 1",
        [],
        |row| {
            Ok(PublishingHold {
                since: row.get(0)?,
                reason: row.get(1)?,
                held: row.get::<_, i64>(2)? != 0,
                audit_after: row.get(3)?,
            })
        },
    )
    .optional()
}

impl Store {
    /// The hold on publishing, if there is one (held, or released with access records
    /// still to publish).
    pub fn publishing_hold(&self) -> Result<Option<PublishingHold>> {
        read(&self.conn).map_err(|source| {
            StorageError::database(self.path.clone(), "read the publishing hold", source)
        })
    }
}

impl WriteBatch<'_> {
    pub fn publishing_hold(&self) -> Result<Option<PublishingHold>> {
        read(&self.tx).map_err(|source| {
            StorageError::database(self.path.clone(), "read the publishing hold", source)
        })
    }

    /// Holds publishing from `since` (unix seconds) for `reason`.
    pub fn hold_publishing(&self, since: i64, reason: &str) -> Result<()> {
        self.tx
            .execute(
                "INSERT OR REPLACE INTO publishing_hold (id, since, reason, held, audit_after) \
                 VALUES (1, ?1, ?2, 1, (SELECT COALESCE(MAX(seq), 0) FROM audit_events))",
                rusqlite::params![since, reason],
            )
            .map_err(|source| {
                StorageError::database(self.path.clone(), "hold publishing", source)
            })?;
        Ok(())
    }

    /// Ends the hold; the access records it deferred are published with the next version
    /// this node writes (`publish::publish_deferred_access_records`). Returns whether it
    /// was held.
    pub fn release_publishing(&self) -> Result<bool> {
        let changed = self
            .tx
            .execute(
                "UPDATE publishing_hold SET held = 0 WHERE id = 1 AND held = 1",
                [],
            )
            .map_err(|source| {
                StorageError::database(self.path.clone(), "release publishing", source)
            })?;
        Ok(changed > 0)
    }

    /// Removes a released hold once its deferred access records are published.
    pub(crate) fn forget_publishing_hold(&self) -> Result<()> {
        self.tx
            .execute("DELETE FROM publishing_hold WHERE id = 1 AND held = 0", [])
            .map_err(|source| {
                StorageError::database(self.path.clone(), "end the publishing hold", source)
            })?;
        Ok(())
    }

    /// The audit entries after `after`, in chain order, seeing this batch's own writes.
    pub(crate) fn audit_events_after(&self, after: i64) -> Result<Vec<crate::audit::ChainedEvent>> {
        crate::audit::events_after(&self.tx, &self.path, after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditEvent;
    use crate::publish::{self, Publication, PublishError};
    use caremesh_sync::policy::Consent;
    use caremesh_sync::{DataClass, DocMeta, NhsNumber, OdsCode, PublisherKey, Section};

    fn view_of_others_data(at: i64) -> AuditEvent {
        crate::audit::sample_view(at, "u1")
    }

    /// While held, a new version of a clinical or sharing document is refused with nothing
    /// written, and a view of others' data is recorded in the chain with its access record
    /// waiting; once released, the access record is published and the hold forgotten.
    #[test]
    fn a_held_node_writes_no_version_and_publishes_deferred_access_records_once_released() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("node.db")).unwrap();
        let key = PublisherKey::from_secret([5; 32]);
        let publisher = OdsCode::parse("A81001").unwrap();
        let patient = NhsNumber::parse("9912003888").unwrap();
        let access_record = DocMeta {
            publisher: publisher.clone(),
            patient: patient.clone(),
            section: Section::Audit,
            class: DataClass::Coded,
        }
        .id();
        let batch = store.write().unwrap();
        batch
            .hold_publishing(100, "restored from a backup")
            .unwrap();
        batch.commit().unwrap();
        assert!(store.publishing_hold().unwrap().unwrap().held);

        publish::record_access(&mut store, &key, &publisher, &view_of_others_data(200)).unwrap();
        assert_eq!(
            store.audit_events().unwrap().len(),
            1,
            "the chain has the view"
        );
        assert!(store.document(access_record).unwrap().is_none(), "it waits");

        let mut consent_change = Publication::new(publisher.clone(), Consent::SENT_BY_PUBLISHER);
        consent_change.set_consent(&patient, Consent::SENT_BY_PUBLISHER);
        let batch = store.write().unwrap();
        let refused = consent_change.apply(&batch, &key, 300);
        assert!(
            matches!(&refused, Err(PublishError::Held { reason }) if reason == "restored from a backup"),
            "{refused:?}"
        );
        drop(batch);
        assert_eq!(store.stats().unwrap().documents, 0, "nothing was written");
        assert_eq!(
            publish::publish_after_hold(&mut store, &key).unwrap(),
            0,
            "still held"
        );

        let batch = store.write().unwrap();
        assert!(batch.release_publishing().unwrap());
        batch.commit().unwrap();
        assert_eq!(publish::publish_after_hold(&mut store, &key).unwrap(), 1);
        assert!(store.document(access_record).unwrap().is_some());
        assert_eq!(store.publishing_hold().unwrap(), None);
        // Publishing is as before: the next view's access record goes at once.
        publish::record_access(&mut store, &key, &publisher, &view_of_others_data(400)).unwrap();
        assert_eq!(store.audit_events().unwrap().len(), 2);
    }
}
