//! The audit trail: every access appends an event, and each event carries the hash of the
//! one before it, so that an edited, removed, inserted or reordered entry breaks the chain
//! where it happened.
//!
//! The chain proves the log's integrity to whoever holds a later hash (a data owner that
//! received events by sync, a report printed last month); on its own it cannot show that the
//! newest entries were cut off, which is why events also travel to the data owners.

use crate::{Result, Store, WriteBatch};
use caremesh_sync::{DataClass, Item, NhsNumber, OdsCode, Section, SignedCheckpoint};
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One access to the record, as the audit trail keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Unix seconds.
    pub at: i64,
    pub user_id: String,
    pub user_name: String,
    pub role: String,
    pub organisation: String,
    /// view, search, break-glass, refused, cli-record.
    pub action: String,
    /// The patient's NHS number, where the access concerned one.
    pub nhs: Option<String>,
    /// Organisations whose data was shown.
    pub sources: Vec<String>,
    /// Sections shown.
    pub sections: Vec<String>,
    pub purpose: String,
    /// allowed, refused (with why in `detail`).
    pub outcome: String,
    /// A break-glass reason, or why access was refused.
    pub detail: String,
}

/// An event as stored: its place in the chain and its hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainedEvent {
    pub seq: i64,
    pub event: AuditEvent,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

/// Where and how the chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainBreak {
    #[error("entry {seq} was edited: its content no longer gives its hash")]
    Edited { seq: i64 },
    #[error("entry {expected} is missing (the next entry present is {found})")]
    Missing { expected: i64, found: i64 },
    #[error(
        "entry {seq} does not follow the entry before it: an entry was inserted, removed and re-numbered, or the entries were reordered"
    )]
    Unlinked { seq: i64 },
}

const GENESIS: [u8; 32] = [0; 32];

/// Checkpoints a witness keeps of one organisation (and a node of one witness's receipts):
/// the newest this many, and the first of each day before them.
pub const CHECKPOINTS_KEPT: i64 = 200;

impl AuditEvent {
    /// Whether the event showed data of organisations other than the viewer's own: those
    /// organisations are sent it, so that each can tell who saw its data.
    pub fn showed_others_data(&self) -> bool {
        self.nhs.is_some() && self.sources.iter().any(|s| *s != self.organisation)
    }

    /// The event as an item of the viewer's access record for the patient
    /// ([`Section::Audit`]), signed and sent like any document. `seq` and `hash` place it in
    /// the viewer's chain, so a data owner can later ask for the entries around it.
    pub fn to_access_item(&self, seq: i64, hash: &[u8; 32]) -> Item {
        assert!(seq > 0, "chain positions start at 1");
        let mut fields = std::collections::BTreeMap::new();
        fields.insert(
            "event".to_string(),
            serde_json::to_string(self).expect("audit events always serialise"),
        );
        fields.insert("chain.seq".to_string(), seq.to_string());
        fields.insert("chain.hash".to_string(), hex::encode(hash));
        Item {
            fields,
            ..Item::titled(
                &format!("access/{seq}"),
                Section::Audit,
                DataClass::Coded,
                "AuditEvent",
                "Record access",
                "caremesh",
                &format!("AuditEvent/{}-{seq}", self.organisation),
            )
        }
    }

    pub fn from_access_item(item: &Item) -> Option<AuditEvent> {
        if item.section != Section::Audit {
            return None;
        }
        serde_json::from_str(item.fields.get("event")?).ok()
    }
}

impl WriteBatch<'_> {
    /// Keeps a checkpoint this node signed of its own chain.
    pub fn save_own_checkpoint(&self, signed: &SignedCheckpoint) -> Result<()> {
        let checkpoint = &signed.checkpoint;
        self.tx
            .execute(
                "INSERT OR IGNORE INTO audit_checkpoints (count, head, at, signed) \
                 VALUES (?1, ?2, ?3, ?4)",
                params![
                    checkpoint.count as i64,
                    &checkpoint.head[..],
                    checkpoint.at,
                    signed.encode()
                ],
            )
            .map_err(self.err("keep an audit checkpoint"))?;
        Ok(())
    }

    /// Keeps another organisation's checkpoint as its witness. Returns the head of a
    /// different checkpoint of the same count held already: the organisation's trail was
    /// rewritten (the first one is kept).
    pub fn witness_checkpoint(&self, signed: &SignedCheckpoint) -> Result<Option<[u8; 32]>> {
        let organisation = &signed.checkpoint.organisation;
        let held = self.keep_checkpoint(
            "witnessed_checkpoints",
            "organisation",
            organisation,
            signed,
        )?;
        Ok(held.filter(|head| *head != signed.checkpoint.head))
    }

    /// Keeps `witness`'s receipt for one of this node's checkpoints.
    pub fn save_witness_receipt(&self, witness: &OdsCode, signed: &SignedCheckpoint) -> Result<()> {
        self.keep_checkpoint("witness_receipts", "witness", witness, signed)?;
        Ok(())
    }

    /// Inserts `signed` under `key` unless one of its count is held (whose head is returned),
    /// then thins the history: the newest [`CHECKPOINTS_KEPT`], and the first of each day.
    fn keep_checkpoint(
        &self,
        table: &str,
        key_column: &str,
        key: &OdsCode,
        signed: &SignedCheckpoint,
    ) -> Result<Option<[u8; 32]>> {
        let count = signed.checkpoint.count as i64;
        let held: Option<Vec<u8>> = self
            .tx
            .query_row(
                &format!("SELECT signed FROM {table} WHERE {key_column} = ?1 AND count = ?2"),
                params![key.as_str(), count],
                |row| row.get(0),
            )
            .optional()
            .map_err(self.err("read audit checkpoints"))?;
        if let Some(held) = held {
            return Ok(SignedCheckpoint::decode(&held)
                .ok()
                .map(|s| s.checkpoint.head));
        }
        self.tx
            .execute(
                &format!(
                    "INSERT INTO {table} ({key_column}, count, at, signed) VALUES (?1, ?2, ?3, ?4)"
                ),
                params![key.as_str(), count, signed.checkpoint.at, signed.encode()],
            )
            .map_err(self.err("keep an audit checkpoint"))?;
        self.tx
            .execute(
                &format!(
                    "DELETE FROM {table} WHERE {key_column} = ?1 \
                     AND count NOT IN (SELECT count FROM {table} WHERE {key_column} = ?1 \
                                       ORDER BY count DESC LIMIT ?2) \
                     AND count NOT IN (SELECT min(count) FROM {table} WHERE {key_column} = ?1 \
                                       GROUP BY at / 86400)"
                ),
                params![key.as_str(), CHECKPOINTS_KEPT],
            )
            .map_err(self.err("thin audit checkpoints"))?;
        Ok(None)
    }

    /// Appends `event` to the chain inside this batch and returns it as stored.
    pub fn append_audit(&self, event: &AuditEvent) -> Result<ChainedEvent> {
        let (seq, prev_hash) = self
            .tx
            .query_row(
                "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1",
                [],
                |row| Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?)),
            )
            .map(|(seq, hash)| (seq + 1, hash_from(hash)))
            .or_else(|error| match error {
                rusqlite::Error::QueryReturnedNoRows => Ok((1, GENESIS)),
                other => Err(other),
            })
            .map_err(self.err("read the audit chain's head"))?;
        let hash = event_hash(&prev_hash, seq, event);
        let body = serde_json::to_string(event).expect("audit events always serialise");
        self.tx
            .execute(
                "INSERT INTO audit_events (seq, at, nhs, body, prev_hash, hash) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![seq, event.at, event.nhs, body, &prev_hash[..], &hash[..]],
            )
            .map_err(self.err("append an audit event"))?;
        Ok(ChainedEvent {
            seq,
            event: event.clone(),
            prev_hash,
            hash,
        })
    }
}

/// The hash of an event at `seq` after `prev_hash`: SHA-256 over the previous hash, the
/// position and a canonical JSON encoding of the event (fields in declaration order).
pub fn event_hash(prev_hash: &[u8; 32], seq: i64, event: &AuditEvent) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"caremesh audit v1");
    hasher.update(prev_hash);
    hasher.update(seq.to_be_bytes());
    hasher.update(serde_json::to_vec(event).expect("audit events always serialise"));
    hasher.finalize().into()
}

fn hash_from(bytes: Vec<u8>) -> [u8; 32] {
    let mut hash = [0u8; 32];
    if bytes.len() == 32 {
        hash.copy_from_slice(&bytes);
    }
    hash
}

impl Store {
    /// Appends `event` to the chain in one transaction and returns it as stored.
    pub fn append_audit(&mut self, event: &AuditEvent) -> Result<ChainedEvent> {
        let batch = self.write()?;
        let chained = batch.append_audit(event)?;
        batch.commit()?;
        Ok(chained)
    }

    /// Access records other organisations sent about views of the patient's record (every
    /// patient when `nhs` is `None`), as `(publisher, its chain position, event)`, oldest
    /// first. This node's own
    /// events are in its chain ([`Store::audit_events`]), not here.
    pub fn received_access_records(
        &self,
        own: &OdsCode,
        nhs: Option<&NhsNumber>,
    ) -> Result<Vec<(OdsCode, i64, AuditEvent)>> {
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT publisher, body FROM items WHERE section = 'audit' AND publisher != ?1 \
                 AND (?2 IS NULL OR nhs = ?2)",
            )
            .map_err(self.err("read received access records"))?;
        let rows = statement
            .query_map(params![own.as_str(), nhs.map(|n| n.as_str())], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
            })
            .map_err(self.err("read received access records"))?;
        let mut records = Vec::new();
        for row in rows {
            let (publisher, body) = row.map_err(self.err("read received access records"))?;
            let damaged = |what: String| crate::StorageError::DamagedRow {
                path: self.path.clone(),
                doc: format!("access record from {publisher}"),
                what,
            };
            let publisher = OdsCode::parse(&publisher).map_err(|e| damaged(e.to_string()))?;
            let item: Item = serde_json::from_str(&body).map_err(|e| damaged(e.to_string()))?;
            let event = AuditEvent::from_access_item(&item)
                .ok_or_else(|| damaged("not an access record".into()))?;
            let seq = item
                .fields
                .get("chain.seq")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            records.push((publisher, seq, event));
        }
        records.sort_by(|a, b| (a.2.at, &a.0, a.1).cmp(&(b.2.at, &b.0, b.1)));
        Ok(records)
    }

    /// This node's newest signed checkpoint of its own chain, encoded.
    pub fn newest_own_checkpoint(&self) -> Result<Option<Vec<u8>>> {
        self.conn
            .query_row(
                "SELECT signed FROM audit_checkpoints ORDER BY count DESC LIMIT 1",
                [],
                |row| row.get(0),
            )
            .optional()
            .map_err(self.err("read the audit checkpoints"))
    }

    /// For each organisation whose checkpoints this node witnesses: the newest count and when
    /// it was signed.
    pub fn witnessing(&self) -> Result<Vec<(String, i64, i64)>> {
        let mut statement = self
            .conn
            .prepare(
                "SELECT organisation, max(count), max(at) FROM witnessed_checkpoints \
                 GROUP BY organisation ORDER BY organisation",
            )
            .map_err(self.err("read witnessed audit checkpoints"))?;
        statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .and_then(|rows| rows.collect())
            .map_err(self.err("read witnessed audit checkpoints"))
    }

    /// The checkpoints `organisation` handed this node to witness, newest first, encoded.
    pub fn witnessed_checkpoints_of(&self, organisation: &OdsCode) -> Result<Vec<Vec<u8>>> {
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT signed FROM witnessed_checkpoints WHERE organisation = ?1 \
                 ORDER BY count DESC",
            )
            .map_err(self.err("read witnessed audit checkpoints"))?;
        statement
            .query_map([organisation.as_str()], |row| row.get(0))
            .and_then(|rows| rows.collect())
            .map_err(self.err("read witnessed audit checkpoints"))
    }

    /// Every checkpoint this node knows of its own chain, with who holds it: `None` for this
    /// node's own record of it, else the witness that sent a receipt. Encoded, unverified.
    pub fn own_checkpoints_known(&self) -> Result<Vec<(Option<String>, Vec<u8>)>> {
        let mut statement = self
            .conn
            .prepare(
                "SELECT NULL, signed FROM audit_checkpoints \
                 UNION ALL SELECT witness, signed FROM witness_receipts",
            )
            .map_err(self.err("read the audit checkpoints"))?;
        statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .and_then(|rows| rows.collect())
            .map_err(self.err("read the audit checkpoints"))
    }

    /// Every event in chain order.
    pub fn audit_events(&self) -> Result<Vec<ChainedEvent>> {
        self.audit_events_after(0)
    }

    /// The events after position `after`, in chain order.
    pub fn audit_events_after(&self, after: i64) -> Result<Vec<ChainedEvent>> {
        events_after(&self.conn, &self.path, after)
    }
}

/// The events after position `after`, in chain order.
pub(crate) fn events_after(
    conn: &rusqlite::Connection,
    path: &std::path::Path,
    after: i64,
) -> Result<Vec<ChainedEvent>> {
    let failed =
        |source| crate::StorageError::database(path.to_path_buf(), "read the audit trail", source);
    let mut statement = conn
        .prepare("SELECT seq, body, prev_hash, hash FROM audit_events WHERE seq > ?1 ORDER BY seq")
        .map_err(failed)?;
    let rows = statement
        .query_map([after], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, Vec<u8>>(2)?,
                row.get::<_, Vec<u8>>(3)?,
            ))
        })
        .map_err(failed)?;
    let mut events = Vec::new();
    for row in rows {
        let (seq, body, prev_hash, hash) = row.map_err(failed)?;
        let event: AuditEvent =
            serde_json::from_str(&body).map_err(|e| crate::StorageError::DamagedRow {
                path: path.to_path_buf(),
                doc: format!("audit entry {seq}"),
                what: e.to_string(),
            })?;
        events.push(ChainedEvent {
            seq,
            event,
            prev_hash: hash_from(prev_hash),
            hash: hash_from(hash),
        });
    }
    Ok(events)
}

/// Checks the chain in the order stored: numbering without gaps from 1, each entry linked to
/// the one before, each hash matching its content. Returns the first break.
pub fn verify_chain(events: &[ChainedEvent]) -> std::result::Result<(), ChainBreak> {
    verify_chain_after(0, &GENESIS, events)
}

/// As [`verify_chain`], for the events after position `after`, whose hash was `hash`.
pub fn verify_chain_after(
    after: i64,
    hash: &[u8; 32],
    events: &[ChainedEvent],
) -> std::result::Result<(), ChainBreak> {
    let mut previous = *hash;
    for (index, entry) in events.iter().enumerate() {
        let expected = after + index as i64 + 1;
        if entry.seq > expected {
            return Err(ChainBreak::Missing {
                expected,
                found: entry.seq,
            });
        }
        if entry.seq != expected || entry.prev_hash != previous {
            return Err(ChainBreak::Unlinked { seq: entry.seq });
        }
        if event_hash(&entry.prev_hash, entry.seq, &entry.event) != entry.hash {
            return Err(ChainBreak::Edited { seq: entry.seq });
        }
        previous = entry.hash;
    }
    Ok(())
}

/// A clinician at A81001 viewing a patient's medications from two sources, for tests.
#[cfg(test)]
pub(crate) fn sample_view(at: i64, user_id: &str) -> AuditEvent {
    AuditEvent {
        at,
        user_id: user_id.into(),
        user_name: "Dr Test".into(),
        role: "clinician".into(),
        organisation: "A81001".into(),
        action: "view".into(),
        nhs: Some("9912003888".into()),
        sources: vec!["A81001".into(), "RTH".into()],
        sections: vec!["medications".into()],
        purpose: "direct care".into(),
        outcome: "allowed".into(),
        detail: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: i64) -> AuditEvent {
        sample_view(1_795_305_600 + n, &format!("u{n}"))
    }

    /// A store with five chained events, and its database path for tampering with SQL.
    fn chained() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("node.db")).unwrap();
        for n in 1..=5 {
            store.append_audit(&event(n)).unwrap();
        }
        (dir, store)
    }

    fn tamper(store: &Store, sql: &str) -> std::result::Result<(), ChainBreak> {
        store.conn.execute_batch(sql).unwrap();
        verify_chain(&store.audit_events().unwrap())
    }

    #[test]
    fn an_untouched_chain_verifies_and_survives_reopening() {
        let (dir, store) = chained();
        assert_eq!(verify_chain(&store.audit_events().unwrap()), Ok(()));
        drop(store);
        let store = Store::open(&dir.path().join("node.db")).unwrap();
        let events = store.audit_events().unwrap();
        assert_eq!(events.len(), 5);
        assert_eq!(events[2].event, event(3));
        assert_eq!(verify_chain(&events), Ok(()));
    }

    #[test]
    fn every_kind_of_tampering_is_found_where_it_happened() {
        let (_dir, store) = chained();
        let edited = tamper(
            &store,
            "UPDATE audit_events SET body = replace(body, 'u3', 'someone-else') WHERE seq = 3",
        );
        assert_eq!(edited, Err(ChainBreak::Edited { seq: 3 }));

        let (_dir, store) = chained();
        let removed = tamper(&store, "DELETE FROM audit_events WHERE seq = 2");
        assert_eq!(
            removed,
            Err(ChainBreak::Missing {
                expected: 2,
                found: 3
            })
        );

        let (_dir, store) = chained();
        // An entry inserted between 2 and 3, with the later ones renumbered to hide the gap.
        let inserted = tamper(
            &store,
            "UPDATE audit_events SET seq = seq + 100 WHERE seq >= 3; \
             UPDATE audit_events SET seq = seq - 99 WHERE seq >= 103; \
             INSERT INTO audit_events (seq, at, nhs, body, prev_hash, hash) \
             SELECT 3, at, nhs, body, prev_hash, hash FROM audit_events WHERE seq = 1;",
        );
        assert_eq!(inserted, Err(ChainBreak::Unlinked { seq: 3 }));

        let (_dir, store) = chained();
        // Entries 2 and 3 swap places.
        let reordered = tamper(
            &store,
            "UPDATE audit_events SET seq = -2 WHERE seq = 2; \
             UPDATE audit_events SET seq = 2 WHERE seq = 3; \
             UPDATE audit_events SET seq = 3 WHERE seq = -2;",
        );
        assert_eq!(reordered, Err(ChainBreak::Unlinked { seq: 2 }));
    }

    /// A witness keeps a history, thinned: the newest checkpoints and the first of each day.
    /// A second, different checkpoint of the same length is reported, the first kept.
    #[test]
    fn a_witness_keeps_a_thinned_history_and_reports_a_contradiction() {
        let (_dir, mut store) = chained();
        let key = caremesh_sync::PublisherKey::from_secret([5; 32]);
        let organisation = OdsCode::parse("A81001").unwrap();
        let checkpoint = |count: u64, head: u8, at: i64| {
            key.sign_checkpoint(caremesh_sync::AuditCheckpoint {
                organisation: organisation.clone(),
                count,
                head: [head; 32],
                at,
            })
        };
        let day = 86_400;
        let batch = store.write().unwrap();
        // Ten days of checkpoints, forty a day.
        for n in 0..400u64 {
            let contradicted = batch
                .witness_checkpoint(&checkpoint(n + 1, 1, (n / 40) as i64 * day + n as i64))
                .unwrap();
            assert_eq!(contradicted, None);
        }
        assert_eq!(
            batch
                .witness_checkpoint(&checkpoint(41, 2, 50 * day))
                .unwrap(),
            Some([1; 32]),
            "a different account of the first 41 entries (a day's first, kept)"
        );
        batch.commit().unwrap();
        let held: Vec<u64> = store
            .witnessed_checkpoints_of(&organisation)
            .unwrap()
            .iter()
            .map(|bytes| SignedCheckpoint::decode(bytes).unwrap().checkpoint.count)
            .collect();
        assert_eq!(held.len(), CHECKPOINTS_KEPT as usize + 5, "{held:?}");
        assert_eq!(held[0], 400, "newest first");
        for first_of_day in [1, 41, 81, 121, 161] {
            assert!(held.contains(&first_of_day), "{first_of_day} in {held:?}");
        }
        let kept_41 = store
            .witnessed_checkpoints_of(&organisation)
            .unwrap()
            .into_iter()
            .map(|bytes| SignedCheckpoint::decode(&bytes).unwrap())
            .find(|signed| signed.checkpoint.count == 41)
            .unwrap();
        assert_eq!(
            kept_41.checkpoint.head, [1; 32],
            "the first account is kept"
        );
    }
}
