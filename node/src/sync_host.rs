//! The sync engine's view of this node: SQLite storage, the trust registry and policy.

use crate::clock;
use crate::trust::TrustState;
use caremesh_storage::{FeedRow, SourceRow, StorageError, Store};
use caremesh_sync::policy::{self, Consent, Decision, Facts, Recipient};
use caremesh_sync::{
    Checkpoint, DocId, DocMeta, FeedEntry, FeedId, HeldDocument, HostError, OdsCode, SignedHeads,
    SyncHost, VerifiedDocument,
};

pub struct StoreHost {
    pub store: Store,
    trust: TrustState,
    feed: FeedId,
    /// This node's organisation and its consent defaults, for its own patients without a
    /// recorded sharing choice.
    own: OdsCode,
    own_defaults: Consent,
}

fn host_error(error: StorageError) -> HostError {
    HostError(error.to_string())
}

impl StoreHost {
    pub fn new(
        store: Store,
        trust: TrustState,
        own: OdsCode,
        own_defaults: Consent,
    ) -> Result<StoreHost, StorageError> {
        let feed = FeedId(store.feed_id()?);
        Ok(StoreHost {
            store,
            trust,
            feed,
            own,
            own_defaults,
        })
    }

    /// What policy needs to know about one document and one recipient. A storage error is
    /// answered with facts that withhold (deny unless allowed), and logged.
    fn facts(&self, meta: &DocMeta, recipient: &Recipient) -> Facts {
        let publisher_kind = self
            .trust
            .current()
            .registry()
            .organisation(&meta.publisher)
            .map(|o| o.kind);
        let looked_up = (|| -> Result<Facts, StorageError> {
            let recorded = self
                .store
                .recorded_consent(&meta.publisher, &meta.patient)?;
            let consent = match recorded {
                Some(consent) => consent,
                None if meta.publisher == self.own => self.own_defaults,
                None => Consent::SENT_BY_PUBLISHER,
            };
            Ok(Facts {
                publisher_kind,
                consent,
                recipient_cares_for_patient: self
                    .store
                    .has_published_about(&recipient.ods, &meta.patient)?,
                direct_from_publisher: meta.publisher == self.own,
            })
        })();
        looked_up.unwrap_or_else(|error| {
            tracing::error!(%error, doc = %meta.id(), "policy facts unavailable; withholding");
            Facts {
                publisher_kind: None,
                consent: Consent {
                    share_out: false,
                    share_in: false,
                    objection: true,
                },
                recipient_cares_for_patient: false,
                direct_from_publisher: false,
            }
        })
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

fn feed_entry(row: FeedRow) -> Result<FeedEntry, HostError> {
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
        rows.into_iter().map(feed_entry).collect()
    }

    fn backfill(&mut self, peer: &OdsCode, limit: usize) -> Result<Vec<FeedEntry>, HostError> {
        let rows = self.store.backfill_for(peer, limit).map_err(host_error)?;
        rows.into_iter().map(feed_entry).collect()
    }

    fn backfill_done(&mut self, peer: &OdsCode, docs: &[DocId]) -> Result<(), HostError> {
        self.store.backfill_done(peer, docs).map_err(host_error)
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
            let meta = &document.signed.meta;
            let new_relationship = !batch
                .has_published_about(&meta.publisher, &meta.patient)
                .map_err(host_error)?;
            batch
                .put_document(&document.signed, &document.snapshot, &document.items, now)
                .map_err(host_error)?;
            batch.touch_source(source).map_err(host_error)?;
            if new_relationship {
                // The publisher now cares for the patient as far as this node knows: what
                // its checkpoint passed while it did not may go to it now.
                batch
                    .queue_backfill(&meta.publisher, &meta.patient)
                    .map_err(host_error)?;
            }
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
        let facts = self.facts(meta, recipient);
        policy::decide(
            meta,
            recipient,
            &self.trust.current().registry().sharing,
            &facts,
        )
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
