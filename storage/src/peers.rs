//! Sync state: the changes feed as peers read it, per-peer checkpoints and status, and the
//! log of rejected changes.

use crate::{Result, StorageError, Store, WriteBatch, doc_id_from};
use caremesh_sync::session::EpochEnd;
use caremesh_sync::{DocId, DocMeta, NhsNumber, OdsCode};
use rusqlite::{OptionalExtension, params};

/// A feed row without the snapshot: what an offer needs.
#[derive(Debug, Clone)]
pub struct FeedRow {
    pub seq: u64,
    pub meta: DocMeta,
    pub signed: Vec<u8>,
}

/// What `caremesh status` and /metrics show for one peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PeerStatus {
    pub peer: String,
    pub connected: bool,
    pub connected_since: Option<i64>,
    pub last_sync_at: Option<i64>,
    pub last_error: Option<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub documents_sent: u64,
    pub documents_received: u64,
    pub rejected: u64,
    /// Our checkpoint in the peer's feed.
    pub pulled_up_to: u64,
    pub peer_tip: u64,
    /// The peer's acknowledged position in our feed.
    pub peer_acked: u64,
    pub local_tip: u64,
    /// When a running node last wrote this row (Unix seconds).
    pub updated_at: i64,
}

/// A running node rewrites its peer rows every second; a row older than this was left by a
/// node that is no longer running, whatever its `connected` column says.
pub const STATUS_STALE_AFTER_SECONDS: i64 = 10;

/// Feed epochs remembered (one begins at each opening for writing): a peer whose checkpoint
/// names an older one is served from the feed's start.
pub const KEPT_FEED_EPOCHS: i64 = 256;

/// Our position in a peer's feed: the feed, the feed epoch it was taken in, the position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCheckpoint {
    pub feed: [u8; 16],
    pub epoch: u64,
    pub up_to: u64,
}

impl PeerStatus {
    /// Connected now: the row says so and a running node wrote it recently.
    pub fn is_connected(&self, now: i64) -> bool {
        self.connected && now - self.updated_at <= STATUS_STALE_AFTER_SECONDS
    }

    /// Document versions the peer's feed holds that we have not pulled.
    pub fn pending_in(&self) -> u64 {
        self.peer_tip.saturating_sub(self.pulled_up_to)
    }

    /// Positions of our feed the peer has not acknowledged.
    pub fn pending_out(&self) -> u64 {
        self.local_tip.saturating_sub(self.peer_acked)
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RejectedChange {
    pub at: i64,
    pub peer: String,
    pub doc: String,
    pub publisher: String,
    pub reason: String,
}

/// A document a peer wanted that is too large for one sync frame.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UnsendableDocument {
    pub doc: String,
    pub peer: String,
    /// Its size as last tried.
    pub bytes: i64,
    pub first_at: i64,
    pub last_at: i64,
}

const PEER_COLUMNS: &str = "peer, connected, connected_since, last_sync_at, last_error, \
     bytes_sent, bytes_received, documents_sent, documents_received, rejected, pulled_up_to, \
     peer_tip, peer_acked, local_tip, updated_at";

fn peer_status(row: &rusqlite::Row<'_>) -> rusqlite::Result<PeerStatus> {
    Ok(PeerStatus {
        peer: row.get(0)?,
        connected: row.get(1)?,
        connected_since: row.get(2)?,
        last_sync_at: row.get(3)?,
        last_error: row.get(4)?,
        bytes_sent: row.get(5)?,
        bytes_received: row.get(6)?,
        documents_sent: row.get(7)?,
        documents_received: row.get(8)?,
        rejected: row.get(9)?,
        pulled_up_to: row.get(10)?,
        peer_tip: row.get(11)?,
        peer_acked: row.get(12)?,
        local_tip: row.get(13)?,
        updated_at: row.get(14)?,
    })
}

impl Store {
    /// This database's feed identity.
    pub fn feed_id(&self) -> Result<[u8; 16]> {
        let bytes: Vec<u8> = self
            .conn
            .query_row(
                "SELECT value FROM node_meta WHERE key = 'feed_id'",
                [],
                |row| row.get(0),
            )
            .map_err(self.err("read feed id"))?;
        bytes.try_into().map_err(|_| StorageError::DamagedRow {
            path: self.path.clone(),
            doc: "node_meta feed_id".into(),
            what: "feed id is not 16 bytes".into(),
        })
    }

    /// Sets the feed identity (simulations make it deterministic).
    pub fn set_feed_id(&self, feed: [u8; 16]) -> Result<()> {
        self.open_pending_group()?;
        self.conn
            .execute(
                "UPDATE node_meta SET value = ?1 WHERE key = 'feed_id'",
                [&feed[..]],
            )
            .map_err(self.err("set feed id"))?;
        Ok(())
    }

    /// The last position this node's feed has handed out, 0 when none. It never goes back,
    /// even when the documents that took the newest positions are purged.
    pub fn feed_tip(&self) -> Result<u64> {
        self.conn
            .prepare_cached("SELECT tip FROM feed_tip")
            .and_then(|mut statement| statement.query_row([], |row| row.get(0)))
            .map_err(self.err("read feed tip"))
    }

    /// Begins a feed epoch `epoch` at the feed's tip: positions after it belong to the new
    /// epoch. Done at each opening for writing, because what the last run wrote after its
    /// final durable write may be gone (a disk that lied about a sync, a restore from a
    /// backup), and its positions may then be handed out again: a peer's checkpoint names
    /// the epoch it was taken in, and [`Store::feed_epoch_end`] says how far that epoch's
    /// positions still hold. The newest [`KEPT_FEED_EPOCHS`] are kept; a peer whose epoch is
    /// older is served from the start (the heads check keeps that cheap).
    pub(crate) fn begin_feed_epoch(&mut self, epoch: u64) -> Result<()> {
        let path = self.path.clone();
        let fail = |source| StorageError::database(path.clone(), "begin a feed epoch", source);
        let tx = self.conn.transaction().map_err(fail)?;
        tx.execute(
            "INSERT INTO feed_epochs (epoch, starts_after) SELECT ?1, tip FROM feed_tip",
            [epoch as i64],
        )
        .map_err(fail)?;
        tx.execute(
            "DELETE FROM feed_epochs WHERE ordinal <= (SELECT MAX(ordinal) FROM feed_epochs) - ?1",
            [KEPT_FEED_EPOCHS],
        )
        .map_err(fail)?;
        tx.commit().map_err(fail)
    }

    /// The feed epoch positions are handed out in now.
    pub fn feed_epoch(&self) -> Result<u64> {
        self.conn
            .prepare_cached("SELECT epoch FROM feed_epochs ORDER BY ordinal DESC LIMIT 1")
            .and_then(|mut statement| statement.query_row([], |row| row.get::<_, i64>(0)))
            .map(|epoch| epoch as u64)
            .map_err(self.err("read feed epoch"))
    }

    /// How far positions taken in `epoch` still hold: up to where the next epoch began, or
    /// all of them for the current epoch. `Unknown` for an epoch this database never had or
    /// no longer remembers.
    pub fn feed_epoch_end(&self, epoch: u64) -> Result<EpochEnd> {
        let row: Option<(i64, Option<i64>)> = self
            .conn
            .prepare_cached(
                "SELECT e.ordinal, (SELECT n.starts_after FROM feed_epochs n \
                 WHERE n.ordinal > e.ordinal ORDER BY n.ordinal LIMIT 1) \
                 FROM feed_epochs e WHERE e.epoch = ?1",
            )
            .and_then(|mut statement| {
                statement
                    .query_row([epoch as i64], |row| Ok((row.get(0)?, row.get(1)?)))
                    .optional()
            })
            .map_err(self.err("read feed epochs"))?;
        Ok(match row {
            None => EpochEnd::Unknown,
            Some((_, None)) => EpochEnd::Current,
            Some((_, Some(next_starts_after))) => EpochEnd::EndedAt(next_starts_after as u64),
        })
    }

    /// A page of the feed after `after`, without snapshots.
    pub fn feed_after(&self, after: u64, limit: usize) -> Result<Vec<FeedRow>> {
        self.feed_rows(
            "SELECT doc_id, publisher, nhs, section, class, signed, seq FROM documents \
             WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            params![after, limit as i64],
        )
    }

    /// At most `limit` documents queued for `peer` outside the feed order, as feed rows (with
    /// their current positions): what a new care relationship made sendable to it after its
    /// checkpoint had passed them.
    pub fn backfill_for(&self, peer: &OdsCode, limit: usize) -> Result<Vec<FeedRow>> {
        self.feed_rows(
            "SELECT d.doc_id, d.publisher, d.nhs, d.section, d.class, d.signed, d.seq \
             FROM backfill b JOIN documents d ON d.doc_id = b.doc_id \
             WHERE b.peer = ?1 ORDER BY d.seq LIMIT ?2",
            params![peer.as_str(), limit as i64],
        )
    }

    /// Removes documents from `peer`'s backfill queue once it has taken or declined them.
    pub fn backfill_done(&self, peer: &OdsCode, docs: &[DocId]) -> Result<()> {
        self.open_pending_group()?;
        let mut statement = self
            .conn
            .prepare_cached("DELETE FROM backfill WHERE peer = ?1 AND doc_id = ?2")
            .map_err(self.err("clear backfill"))?;
        for doc in docs {
            statement
                .execute(params![peer.as_str(), &doc.0[..]])
                .map_err(self.err("clear backfill"))?;
        }
        Ok(())
    }

    fn feed_rows(&self, sql: &str, parameters: impl rusqlite::Params) -> Result<Vec<FeedRow>> {
        let mut statement = self
            .conn
            .prepare_cached(sql)
            .map_err(self.err("read feed"))?;
        let rows = statement
            .query_map(parameters, |row| {
                Ok((
                    row.get::<_, Vec<u8>>(0)?,
                    [
                        row.get::<_, String>(1)?,
                        row.get::<_, String>(2)?,
                        row.get::<_, String>(3)?,
                        row.get::<_, String>(4)?,
                    ],
                    row.get::<_, Vec<u8>>(5)?,
                    row.get::<_, u64>(6)?,
                ))
            })
            .map_err(self.err("read feed"))?;
        let mut feed = Vec::new();
        for row in rows {
            let (id, [publisher, nhs, section, class], signed, seq) =
                row.map_err(self.err("read feed"))?;
            let id = doc_id_from(&id, &self.path)?;
            let damaged = |what: String| StorageError::DamagedRow {
                path: self.path.clone(),
                doc: id.to_string(),
                what,
            };
            let meta = DocMeta {
                publisher: publisher.parse().map_err(|e| damaged(format!("{e}")))?,
                patient: nhs.parse().map_err(|e| damaged(format!("{e}")))?,
                section: section.parse().map_err(|e| damaged(format!("{e}")))?,
                class: class.parse().map_err(|e| damaged(format!("{e}")))?,
            };
            feed.push(FeedRow { seq, meta, signed });
        }
        Ok(feed)
    }

    /// Our checkpoint in `peer`'s feed.
    pub fn peer_checkpoint(&self, peer: &OdsCode) -> Result<Option<PeerCheckpoint>> {
        let row: Option<(Option<Vec<u8>>, i64, u64)> = self
            .conn
            .prepare_cached(
                "SELECT peer_feed, peer_epoch, pulled_up_to FROM sync_peers WHERE peer = ?1",
            )
            .and_then(|mut statement| {
                statement
                    .query_row([peer.as_str()], |row| {
                        Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                    })
                    .optional()
            })
            .map_err(self.err("read checkpoint"))?;
        Ok(row.and_then(|(feed, epoch, up_to)| {
            Some(PeerCheckpoint {
                feed: feed?.try_into().ok()?,
                epoch: epoch as u64,
                up_to,
            })
        }))
    }

    /// Whether this node is to take `peer`'s feed again from the start once it has caught
    /// up ([`WriteBatch::pull_again_from_every_peer`]).
    pub fn pulls_again(&self, peer: &OdsCode) -> Result<bool> {
        self.conn
            .prepare_cached("SELECT pull_again FROM sync_peers WHERE peer = ?1")
            .and_then(|mut statement| {
                statement
                    .query_row([peer.as_str()], |row| row.get::<_, i64>(0))
                    .optional()
            })
            .map(|flag| flag == Some(1))
            .map_err(self.err("read whether to pull again"))
    }

    pub fn peer_statuses(&self) -> Result<Vec<PeerStatus>> {
        let mut statement = self
            .conn
            .prepare_cached(&format!(
                "SELECT {PEER_COLUMNS} FROM sync_peers ORDER BY peer"
            ))
            .map_err(self.err("read peers"))?;
        let rows = statement
            .query_map([], peer_status)
            .map_err(self.err("read peers"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err("read peers"))
    }

    /// Peer rows with our feed's tip as it is now, so pending-out counts what was ingested
    /// while a peer was away.
    pub fn current_peer_statuses(&self) -> Result<Vec<PeerStatus>> {
        let tip = self.feed_tip()?;
        let mut peers = self.peer_statuses()?;
        for peer in &mut peers {
            peer.local_tip = peer.local_tip.max(tip);
        }
        Ok(peers)
    }

    pub fn peer_status(&self, peer: &OdsCode) -> Result<Option<PeerStatus>> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {PEER_COLUMNS} FROM sync_peers WHERE peer = ?1"
            ))
            .and_then(|mut statement| statement.query_row([peer.as_str()], peer_status).optional())
            .map_err(self.err("read peer"))
    }

    /// Writes a peer's status; the checkpoint columns are left to [`WriteBatch::save_checkpoint`].
    pub fn save_peer_status(&self, status: &PeerStatus) -> Result<()> {
        self.open_pending_group()?;
        self.conn
            .prepare_cached(
                "INSERT INTO sync_peers (peer, connected, connected_since, last_sync_at, last_error, \
                 bytes_sent, bytes_received, documents_sent, documents_received, rejected, \
                 peer_tip, peer_acked, local_tip, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14) \
                 ON CONFLICT(peer) DO UPDATE SET connected = excluded.connected, \
                 connected_since = excluded.connected_since, last_sync_at = excluded.last_sync_at, \
                 last_error = excluded.last_error, bytes_sent = excluded.bytes_sent, \
                 bytes_received = excluded.bytes_received, documents_sent = excluded.documents_sent, \
                 documents_received = excluded.documents_received, rejected = excluded.rejected, \
                 peer_tip = excluded.peer_tip, peer_acked = excluded.peer_acked, \
                 local_tip = excluded.local_tip, updated_at = excluded.updated_at",
            )
            .and_then(|mut statement| {
                statement.execute(params![
                    status.peer,
                    status.connected,
                    status.connected_since,
                    status.last_sync_at,
                    status.last_error,
                    status.bytes_sent,
                    status.bytes_received,
                    status.documents_sent,
                    status.documents_received,
                    status.rejected,
                    status.peer_tip,
                    status.peer_acked,
                    status.local_tip,
                    status.updated_at
                ])
            })
            .map_err(self.err("save peer status"))?;
        Ok(())
    }

    /// Marks every peer disconnected: a node starting up has no connections yet.
    pub fn reset_connections(&self) -> Result<()> {
        self.open_pending_group()?;
        self.conn
            .execute("UPDATE sync_peers SET connected = 0", [])
            .map_err(self.err("reset peer connections"))?;
        Ok(())
    }

    pub fn rejected_changes(&self, limit: usize) -> Result<Vec<RejectedChange>> {
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT at, peer, doc_id, publisher, reason FROM rejected_changes \
                 ORDER BY id DESC LIMIT ?1",
            )
            .map_err(self.err("read rejected changes"))?;
        let rows = statement
            .query_map([limit as i64], |row| {
                Ok(RejectedChange {
                    at: row.get(0)?,
                    peer: row.get(1)?,
                    doc: hex_of(&row.get::<_, Vec<u8>>(2)?),
                    publisher: row.get(3)?,
                    reason: row.get(4)?,
                })
            })
            .map_err(self.err("read rejected changes"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err("read rejected changes"))
    }
}

impl Store {
    /// Documents peers wanted that could not be sent, while the version held is still too
    /// large to send whole: once a version fits (or the document is gone) it drops off.
    pub fn unsendable_documents(&self) -> Result<Vec<UnsendableDocument>> {
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT u.doc_id, u.peer, u.bytes, u.first_at, u.last_at \
                 FROM unsendable_documents u JOIN documents d ON d.doc_id = u.doc_id \
                 JOIN document_snapshots s ON s.doc_id = u.doc_id \
                 WHERE length(s.snapshot) + length(d.signed) + 1024 > ?1 \
                 ORDER BY u.last_at DESC",
            )
            .map_err(self.err("read unsendable documents"))?;
        let rows = statement
            .query_map([caremesh_sync::wire::MAX_FRAME_BYTES as i64], |row| {
                Ok(UnsendableDocument {
                    doc: hex_of(&row.get::<_, Vec<u8>>(0)?),
                    peer: row.get(1)?,
                    bytes: row.get(2)?,
                    first_at: row.get(3)?,
                    last_at: row.get(4)?,
                })
            })
            .map_err(self.err("read unsendable documents"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err("read unsendable documents"))
    }
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl WriteBatch<'_> {
    /// Queues for `peer` every document about `nhs` it did not publish, if `peer` is one this
    /// node syncs with directly; its session offers them outside the feed order, and policy
    /// decides on each as always. Returns how many were queued.
    pub fn queue_backfill(&self, peer: &OdsCode, nhs: &NhsNumber) -> Result<usize> {
        self.tx
            .prepare_cached(
                "INSERT OR IGNORE INTO backfill (peer, doc_id) \
                 SELECT ?1, doc_id FROM documents \
                 WHERE nhs = ?2 AND publisher != ?1 \
                 AND EXISTS (SELECT 1 FROM sync_peers WHERE peer = ?1)",
            )
            .and_then(|mut statement| statement.execute([peer.as_str(), nhs.as_str()]))
            .map_err(self.err("queue backfill"))
    }

    /// Queues `publisher`'s own documents about `nhs` for every peer this node syncs with
    /// directly: the patient's consent allows sharing again, and what the peers' checkpoints
    /// passed while it did not must reach them. Returns how many rows were queued.
    pub fn queue_backfill_to_all_peers(
        &self,
        publisher: &OdsCode,
        nhs: &NhsNumber,
    ) -> Result<usize> {
        self.tx
            .prepare_cached(
                "INSERT OR IGNORE INTO backfill (peer, doc_id) \
                 SELECT p.peer, d.doc_id FROM documents d, sync_peers p \
                 WHERE d.nhs = ?2 AND d.publisher = ?1 AND p.peer != ?1",
            )
            .and_then(|mut statement| statement.execute([publisher.as_str(), nhs.as_str()]))
            .map_err(self.err("queue backfill"))
    }

    /// Records `peer` as one this node syncs with directly (a no-op when it already is), so
    /// backfill can be queued for it from the first batch it sends.
    pub fn register_peer(&self, peer: &OdsCode) -> Result<()> {
        self.tx
            .prepare_cached("INSERT OR IGNORE INTO sync_peers (peer) VALUES (?1)")
            .and_then(|mut statement| statement.execute([peer.as_str()]))
            .map_err(self.err("register peer"))?;
        Ok(())
    }

    /// This node's own documents about a patient came back from a peer: it lost them, and
    /// while it did not know it cared for the patient it may have refused other
    /// organisations' documents about them that its checkpoints have passed. Every peer's
    /// feed is taken again from the start once caught up ([`WriteBatch::restart_pull`]).
    pub fn pull_again_from_every_peer(&self) -> Result<()> {
        self.tx
            .prepare_cached("UPDATE sync_peers SET pull_again = 1")
            .and_then(|mut statement| statement.execute([]))
            .map_err(self.err("mark peers to pull again"))?;
        Ok(())
    }

    /// Takes `peer`'s feed again from its start (in the epoch last pulled in, where every
    /// position holds), and clears the mark that asked for it.
    pub fn restart_pull(&self, peer: &OdsCode) -> Result<()> {
        self.tx
            .prepare_cached(
                "UPDATE sync_peers SET pulled_up_to = 0, pull_again = 0 WHERE peer = ?1",
            )
            .and_then(|mut statement| statement.execute([peer.as_str()]))
            .map_err(self.err("restart a pull"))?;
        Ok(())
    }

    /// Saves our checkpoint in `peer`'s feed, in the transaction that stored what it covers.
    pub fn save_checkpoint(&self, peer: &OdsCode, checkpoint: PeerCheckpoint) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO sync_peers (peer, peer_feed, peer_epoch, pulled_up_to) \
                 VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT(peer) DO UPDATE SET peer_feed = excluded.peer_feed, \
                 peer_epoch = excluded.peer_epoch, pulled_up_to = excluded.pulled_up_to",
            )
            .and_then(|mut statement| {
                statement.execute(params![
                    peer.as_str(),
                    &checkpoint.feed[..],
                    checkpoint.epoch as i64,
                    checkpoint.up_to
                ])
            })
            .map_err(self.err("save checkpoint"))?;
        Ok(())
    }

    /// Records that `peer` wanted `doc` and it was too large to send.
    pub fn record_unsendable(
        &self,
        at: i64,
        peer: &OdsCode,
        doc: DocId,
        bytes: usize,
    ) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO unsendable_documents (doc_id, peer, bytes, first_at, last_at) \
                 VALUES (?1, ?2, ?3, ?4, ?4) ON CONFLICT (doc_id, peer) \
                 DO UPDATE SET bytes = excluded.bytes, last_at = excluded.last_at",
            )
            .and_then(|mut statement| {
                statement.execute(params![&doc.0[..], peer.as_str(), bytes as i64, at])
            })
            .map_err(self.err("record an unsendable document"))?;
        Ok(())
    }

    pub fn record_rejection(
        &self,
        at: i64,
        peer: &OdsCode,
        doc: DocId,
        publisher: &OdsCode,
        reason: &str,
    ) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO rejected_changes (at, peer, doc_id, publisher, reason) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut statement| {
                statement.execute(params![
                    at,
                    peer.as_str(),
                    &doc.0[..],
                    publisher.as_str(),
                    reason
                ])
            })
            .map_err(self.err("record rejected change"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_and_status_are_kept_apart_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let peer = OdsCode::parse("HUB01").unwrap();
        {
            let mut store = Store::open(&path).unwrap();
            assert_eq!(store.feed_tip().unwrap(), 0);
            assert!(store.peer_checkpoint(&peer).unwrap().is_none());
            store
                .save_peer_status(&PeerStatus {
                    peer: "HUB01".into(),
                    connected: true,
                    bytes_sent: 10,
                    ..Default::default()
                })
                .unwrap();
            let batch = store.write().unwrap();
            let checkpoint = PeerCheckpoint {
                feed: [4; 16],
                epoch: 7,
                up_to: 42,
            };
            batch.save_checkpoint(&peer, checkpoint).unwrap();
            batch.commit().unwrap();
            store
                .save_peer_status(&PeerStatus {
                    peer: "HUB01".into(),
                    bytes_sent: 20,
                    ..Default::default()
                })
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let checkpoint = store.peer_checkpoint(&peer).unwrap().unwrap();
        assert_eq!(
            (checkpoint.feed, checkpoint.epoch, checkpoint.up_to),
            ([4; 16], 7, 42)
        );
        let status = store.peer_status(&peer).unwrap().unwrap();
        assert_eq!(status.bytes_sent, 20);
        assert_eq!(
            status.pulled_up_to, 42,
            "status writes leave the checkpoint alone"
        );
    }

    #[test]
    fn each_database_gets_its_own_feed_id() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(&dir.path().join("a.db")).unwrap();
        let b = Store::open(&dir.path().join("b.db")).unwrap();
        assert_ne!(a.feed_id().unwrap(), b.feed_id().unwrap());
        assert_eq!(a.feed_id().unwrap(), a.feed_id().unwrap());
    }
}
