//! The sync engine's view of a node: SQLite storage, the trust registry and policy.
//!
//! The registry and the clock come in from outside ([`RegistrySource`], [`Clock`]): the node
//! passes its registry file and the wall clock, a simulation its own registry and virtual
//! time, so the same host runs in both.

use crate::{CareLookup, FeedRow, SourceRow, StorageError, Store};
use caremesh_sync::VerifiedRegistry;
use caremesh_sync::policy::{self, Consent, Decision, Facts, Recipient};
use caremesh_sync::{
    Checkpoint, DocId, DocMeta, FeedEntry, FeedId, HeldDocument, HostError, Item, OdsCode, Refusal,
    Section, SignedHeads, SyncHost, VerifiedDocument,
};
use std::sync::Arc;

/// Where the host reads the registry in force and hands a newer edition a peer offered.
pub trait RegistrySource: Send {
    fn current(&self) -> Arc<VerifiedRegistry>;
    /// Adopts the offered edition if it verifies against the pinned authority and is newer.
    /// `Err` carries why it was refused, for the log.
    fn adopt(&self, bytes: Vec<u8>) -> Result<bool, String>;
}

/// Unix seconds, as the host's caller keeps time.
pub type Clock = Box<dyn Fn() -> i64 + Send>;

pub struct StoreHost {
    pub store: Store,
    policy: PolicyContext,
    feed: FeedId,
    clock: Clock,
    /// A purge left pages of withdrawn documents in the WAL that a reader kept from being
    /// truncated: compact again after the next commit.
    compaction_due: bool,
}

/// What policy decisions need besides storage: the registry and who this node is.
struct PolicyContext {
    trust: Box<dyn RegistrySource>,
    /// This node's organisation and its consent defaults, for its own patients without a
    /// recorded sharing choice.
    own: OdsCode,
    own_defaults: Consent,
}

type StorageResult<T> = Result<T, StorageError>;

fn host_error(error: StorageError) -> HostError {
    HostError(error.to_string())
}

impl PolicyContext {
    /// Decides whether `recipient` may hold the document, with facts from `lookup`.
    /// `direct_from_publisher`: the document travels (or travelled) on a link from its
    /// publisher. A storage error withholds (deny unless allowed), and is logged.
    fn decide(
        &self,
        lookup: &CareLookup<'_>,
        meta: &DocMeta,
        recipient: &Recipient,
        direct_from_publisher: bool,
    ) -> Decision {
        let registry = self.trust.current();
        let facts = self
            .facts(lookup, meta, recipient, direct_from_publisher)
            .unwrap_or_else(|error| {
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
            });
        policy::decide(meta, recipient, &registry.registry().sharing, &facts)
    }

    fn facts(
        &self,
        lookup: &CareLookup<'_>,
        meta: &DocMeta,
        recipient: &Recipient,
        direct_from_publisher: bool,
    ) -> StorageResult<Facts> {
        let publisher_kind = self
            .trust
            .current()
            .registry()
            .organisation(&meta.publisher)
            .map(|o| o.kind);
        let consent = match lookup.recorded_consent(&meta.publisher, &meta.patient)? {
            Some(consent) => consent,
            None if meta.publisher == self.own => self.own_defaults,
            None => Consent::SENT_BY_PUBLISHER,
        };
        Ok(Facts {
            publisher_kind,
            consent,
            recipient_cares_for_patient: lookup
                .has_published_about(&recipient.ods, &meta.patient)?,
            direct_from_publisher,
        })
    }

    /// This node as the recipient of what it receives.
    fn this_node(&self) -> Result<Recipient, HostError> {
        let registry = self.trust.current();
        let organisation = registry.registry().organisation(&self.own).ok_or_else(|| {
            HostError(format!(
                "this node's organisation {} is not in the trust registry; add it with `caremesh trust add`",
                self.own
            ))
        })?;
        Ok(Recipient {
            ods: self.own.clone(),
            kind: organisation.kind,
        })
    }
}

/// What a sharing record states (consent, counts, feed), if `items` are one.
fn stated_sharing(meta: &DocMeta, items: &[Item]) -> Option<policy::SharingRecord> {
    if meta.section != Section::Sharing {
        return None;
    }
    items
        .first()
        .and_then(|item| policy::SharingRecord::from_fields(&item.fields))
}

impl StoreHost {
    pub fn new(
        store: Store,
        trust: Box<dyn RegistrySource>,
        own: OdsCode,
        own_defaults: Consent,
        clock: Clock,
    ) -> Result<StoreHost, StorageError> {
        let feed = FeedId(store.feed_id()?);
        Ok(StoreHost {
            store,
            policy: PolicyContext {
                trust,
                own,
                own_defaults,
            },
            feed,
            clock,
            compaction_due: false,
        })
    }

    /// The registry in force.
    pub fn registry(&self) -> Arc<VerifiedRegistry> {
        self.policy.trust.current()
    }

    /// Retries an emptying of the WAL that a reader held up after a purge.
    pub fn compact_if_due(&mut self) {
        if self.compaction_due {
            self.compact_after_purge();
        }
    }

    /// Empties the WAL after a purge so no page of a withdrawn document survives in it;
    /// retried (by [`StoreHost::compact_if_due`]) while a reader holds an old snapshot.
    fn compact_after_purge(&mut self) {
        match self.store.checkpoint() {
            Ok(done) => self.compaction_due = !done,
            Err(error) => tracing::error!(%error, "could not compact storage after a purge"),
        }
    }

    /// The sources panel row for a publisher whose documents arrived by sync.
    fn source_row(&self, publisher: &OdsCode, published_at: i64) -> SourceRow {
        let registry = self.policy.trust.current();
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
            expected_refresh_hours: None,
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
        peer: &OdsCode,
        mut documents: Vec<VerifiedDocument>,
        checkpoint: Option<Checkpoint>,
    ) -> Result<Vec<Refusal>, HostError> {
        let now = (self.clock)();
        let this_node = self.policy.this_node()?;
        // Sharing records first: a withdrawal in this batch refuses the late copies with it,
        // and consent given again admits the documents that follow it.
        documents.sort_by_key(|d| d.signed.meta.section != Section::Sharing);
        let sources: Vec<SourceRow> = documents
            .iter()
            .map(|d| self.source_row(&d.signed.meta.publisher, d.published_at.unwrap_or(now)))
            .collect();
        let batch = self.store.write().map_err(host_error)?;
        // Before any document: a relationship the first batch reveals must be able to queue
        // backfill for the peer that sent it (found by the simulator: the peer's row was only
        // made with its first checkpoint, after the documents, so that backfill was lost).
        batch.register_peer(peer).map_err(host_error)?;
        let mut refusals = Vec::new();
        let mut purged = 0;
        for (document, source) in documents.iter().zip(&sources) {
            let meta = &document.signed.meta;
            let direct = meta.publisher == *peer;
            if let Decision::Withhold(reason) =
                self.policy.decide(&batch.care(), meta, &this_node, direct)
            {
                refusals.push(Refusal {
                    doc: meta.id(),
                    publisher: meta.publisher.clone(),
                    reason,
                });
                continue;
            }
            // An access record is no evidence of care, and no news of the publisher's data.
            let is_care = meta.section != Section::Audit;
            let new_relationship = is_care
                && !batch
                    .care()
                    .has_published_about(&meta.publisher, &meta.patient)
                    .map_err(host_error)?;
            batch
                .put_document(&document.signed, &document.snapshot, &document.items, now)
                .map_err(host_error)?;
            if is_care {
                batch.touch_received_source(source).map_err(host_error)?;
            }
            let stated = stated_sharing(meta, &document.items);
            if let Some(statement) = stated.as_ref().and_then(|s| s.source.as_ref()) {
                batch
                    .state_source(&meta.publisher, statement)
                    .map_err(host_error)?;
            }
            if new_relationship {
                // The publisher now cares for the patient as far as this node knows: what
                // its checkpoint passed while it did not may go to it now.
                batch
                    .queue_backfill(&meta.publisher, &meta.patient)
                    .map_err(host_error)?;
            }
            let withdrawn = stated.is_some_and(|s| s.consent.withholds_everything().is_some());
            if withdrawn && meta.publisher != self.policy.own {
                // The signed sharing record is the purge notice: what its publisher sent
                // about the patient goes, history and all. Ours stays: it is our record.
                purged += batch
                    .purge(&meta.publisher, &meta.patient)
                    .map_err(host_error)?;
            }
        }
        if let Some(checkpoint) = checkpoint {
            batch
                .save_checkpoint(peer, checkpoint.feed.0, checkpoint.up_to)
                .map_err(host_error)?;
        }
        batch.commit().map_err(host_error)?;
        if purged > 0 {
            tracing::info!(%peer, documents = purged, "purged documents after a withdrawal of consent");
            self.compaction_due = true;
        }
        if self.compaction_due {
            self.compact_after_purge();
        }
        Ok(refusals)
    }

    fn checkpoint(&mut self, peer: &OdsCode) -> Result<Option<Checkpoint>, HostError> {
        let stored = self.store.peer_checkpoint(peer).map_err(host_error)?;
        Ok(stored.map(|(feed, up_to)| Checkpoint {
            feed: FeedId(feed),
            up_to,
        }))
    }

    fn is_publisher_key(&self, publisher: &OdsCode, key: &[u8; 32]) -> bool {
        self.policy
            .trust
            .current()
            .registry()
            .is_publisher_key(publisher, key)
    }

    fn decide(&self, meta: &DocMeta, recipient: &Recipient) -> Decision {
        let direct = meta.publisher == self.policy.own;
        self.policy
            .decide(&self.store.care(), meta, recipient, direct)
    }

    fn registry_version(&self) -> u64 {
        self.policy.trust.current().version()
    }

    fn registry_bytes(&self) -> Option<Vec<u8>> {
        Some(self.policy.trust.current().bytes().to_vec())
    }

    fn offer_registry(&mut self, bytes: Vec<u8>) -> Result<bool, HostError> {
        match self.policy.trust.adopt(bytes) {
            Ok(adopted) => Ok(adopted),
            Err(error) => {
                tracing::warn!(%error, "a peer offered a trust registry that was refused");
                Ok(false)
            }
        }
    }
}
