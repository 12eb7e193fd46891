//! The sync engine's view of this node: SQLite storage, the trust registry and policy.

use crate::clock;
use crate::trust::TrustState;
use caremesh_storage::{SourceRow, StorageError, Store};
use caremesh_sync::policy::{self, Decision, Recipient};
use caremesh_sync::{
    Checkpoint, DocId, DocMeta, FeedEntry, FeedId, HeldDocument, HostError, OdsCode, SignedHeads,
    SyncHost, VerifiedDocument,
};

pub struct StoreHost {
    pub store: Store,
    trust: TrustState,
    feed: FeedId,
}

fn host_error(error: StorageError) -> HostError {
    HostError(error.to_string())
}

impl StoreHost {
    pub fn new(store: Store, trust: TrustState) -> Result<StoreHost, StorageError> {
        let feed = FeedId(store.feed_id()?);
        Ok(StoreHost { store, trust, feed })
    }

    pub fn trust(&self) -> &TrustState {
        &self.trust
    }

    /// The sources panel row for a publisher whose documents arrived by sync.
    fn source_row(&self, publisher: &OdsCode, published_at: i64) -> SourceRow {
        let registry = self.trust.current();
        let organisation = registry.registry().organisation(publisher);
        SourceRow {
            publisher: publisher.to_string(),
            name: organisation
                .map(|o| o.name.clone())
                .unwrap_or_else(|| publisher.to_string()),
            kind: organisation
                .map(|o| o.kind.to_string())
                .unwrap_or_else(|| "unknown".into()),
            source_system: "caremesh sync".into(),
            feed: "synced".into(),
            data_as_of: published_at,
        }
    }
}

impl SyncHost for StoreHost {
    fn feed_id(&self) -> FeedId {
        self.feed
    }

    fn feed_tip(&mut self) -> Result<u64, HostError> {
        self.store.feed_tip().map_err(host_error)
    }

    fn feed_after(&mut self, after: u64, limit: usize) -> Result<Vec<FeedEntry>, HostError> {
        let rows = self.store.feed_after(after, limit).map_err(host_error)?;
        rows.into_iter()
            .map(|row| {
                let heads = SignedHeads::decode(&row.signed)
                    .ok_or_else(|| {
                        HostError(format!(
                            "stored document {} has unreadable signed heads; run `caremesh verify`",
                            row.meta.id()
                        ))
                    })?
                    .heads;
                Ok(FeedEntry {
                    seq: row.seq,
                    meta: row.meta,
                    heads,
                })
            })
            .collect()
    }

    fn held_heads(&mut self, doc: DocId) -> Result<Option<Vec<[u8; 32]>>, HostError> {
        let signed = self.store.held_signed(doc).map_err(host_error)?;
        // Unreadable signed heads count as not held: a verified copy from the peer replaces it.
        Ok(signed
            .and_then(|bytes| SignedHeads::decode(&bytes))
            .map(|s| s.heads))
    }

    fn document(&mut self, doc: DocId) -> Result<Option<HeldDocument>, HostError> {
        let stored = self.store.document(doc).map_err(host_error)?;
        Ok(stored.map(|stored| HeldDocument {
            meta: stored.meta,
            snapshot: stored.snapshot,
            signed: stored.signed,
        }))
    }

    fn commit(
        &mut self,
        documents: Vec<VerifiedDocument>,
        checkpoint: Option<(&OdsCode, Checkpoint)>,
    ) -> Result<(), HostError> {
        let now = clock::now_unix();
        let sources: Vec<SourceRow> = documents
            .iter()
            .map(|d| self.source_row(&d.signed.meta.publisher, d.published_at.unwrap_or(now)))
            .collect();
        let batch = self.store.write().map_err(host_error)?;
        for (document, source) in documents.iter().zip(&sources) {
            batch
                .put_document(&document.signed, &document.snapshot, &document.items, now)
                .map_err(host_error)?;
            batch.touch_source(source).map_err(host_error)?;
        }
        if let Some((peer, checkpoint)) = checkpoint {
            batch
                .save_checkpoint(peer, checkpoint.feed.0, checkpoint.up_to)
                .map_err(host_error)?;
        }
        batch.commit().map_err(host_error)
    }

    fn checkpoint(&mut self, peer: &OdsCode) -> Result<Option<Checkpoint>, HostError> {
        let stored = self.store.peer_checkpoint(peer).map_err(host_error)?;
        Ok(stored.map(|(feed, up_to)| Checkpoint {
            feed: FeedId(feed),
            up_to,
        }))
    }

    fn is_publisher_key(&self, publisher: &OdsCode, key: &[u8; 32]) -> bool {
        self.trust
            .current()
            .registry()
            .is_publisher_key(publisher, key)
    }

    fn decide(&self, meta: &DocMeta, recipient: &Recipient) -> Decision {
        policy::decide(meta, recipient)
    }

    fn registry_version(&self) -> u64 {
        self.trust.current().version()
    }

    fn registry_bytes(&self) -> Option<Vec<u8>> {
        Some(self.trust.current().bytes().to_vec())
    }

    fn offer_registry(&mut self, bytes: Vec<u8>) -> Result<bool, HostError> {
        match self.trust.adopt(bytes) {
            Ok(adopted) => Ok(adopted),
            Err(error) => {
                tracing::warn!(%error, "a peer offered a trust registry that was refused");
                Ok(false)
            }
        }
    }
}
