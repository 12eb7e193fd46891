//! The sync engine's view of a node: SQLite storage, the trust registry and policy.
//!
//! The registry and the clock come in from outside ([`RegistrySource`], [`Clock`]): the node
//! passes its registry file and the wall clock, a simulation its own registry and virtual
//! time, so the same host runs in both.

use crate::feed_tail::{FeedTail, Reach};
use crate::{CareLookup, FeedRow, PeerCheckpoint, SourceRow, StorageError, Store};
use caremesh_sync::VerifiedRegistry;
use caremesh_sync::planted::PlantedBug;
use caremesh_sync::policy::{self, Consent, Decision, Facts, Recipient};
use caremesh_sync::relay::HeldIndex;
use caremesh_sync::session::EpochEnd;
use caremesh_sync::wire::OfferEntry;
use caremesh_sync::{
    Checkpoint, DocId, DocMeta, FeedEntry, FeedId, HeldChanges, HeldDocument, HostError, Item,
    LoadedDocuments, NhsNumber, OdsCode, OfferPage, Refusal, Section, SignedCheckpoint,
    SignedHeads, SyncHost, VerifiedBytes, VerifiedDocument,
};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Where the host reads the registry in force and hands a newer edition a peer offered.
pub trait RegistrySource: Send {
    fn current(&self) -> Arc<VerifiedRegistry>;
    /// Adopts the offered edition if it verifies against the pinned authority and is newer.
    /// `Err` carries why it was refused, for the log.
    fn adopt(&self, bytes: Vec<u8>) -> Result<bool, String>;
}

/// A registry that never changes and adopts nothing: the simulator's and tests'.
pub struct FixedRegistry(pub Arc<VerifiedRegistry>);

impl RegistrySource for FixedRegistry {
    fn current(&self) -> Arc<VerifiedRegistry> {
        self.0.clone()
    }
    fn adopt(&self, _bytes: Vec<u8>) -> Result<bool, String> {
        Ok(false)
    }
}

/// Unix seconds, as the host's caller keeps time.
pub type Clock = Box<dyn Fn() -> i64 + Send>;

pub struct StoreHost {
    pub store: Store,
    policy: PolicyContext,
    feed: FeedId,
    /// The feed epoch this store's opening began ([`Store::feed_epoch`]).
    epoch: u64,
    clock: Clock,
    /// A purge left pages of withdrawn documents in the WAL that a reader kept from being
    /// truncated: compact again after the next commit.
    compaction_due: bool,
    tail: FeedTail,
    /// The feed's tip as last read, while nothing this host knows of can have moved it: every
    /// session asks for it on every turn, and a hub has hundreds. Forgotten by each commit
    /// through this host, by [`StoreHost::forget_cached`], and by
    /// [`StoreHost::feed_may_have_grown`] (a write around the host: a local publish).
    known_tip: Option<u64>,
    loaded: Option<LoadedDocuments>,
    planted: Option<PlantedBug>,
    /// A commit stored this node's own documents about a patient it held none of, from a
    /// peer: it lost them, and every peer is marked to be pulled again. The driver takes it
    /// ([`StoreHost::take_own_documents_returned`]) to ask its caught-up sessions to do so.
    own_documents_returned: bool,
}

/// What policy needs to know of recently decided patients: who cares for each (see
/// [`CareLookup::caseload`]) and the consent other publishers recorded, so that a hub
/// deciding one change for each of its hundreds of peers looks the patient up once. Other
/// organisations' documents (sharing records included) reach this database only through
/// [`StoreHost::commit`], which forgets a patient when what these facts are read from
/// changed: a publisher's first document about them (the caseload) or a sharing record
/// (consent; a purge follows only from one, and keeps the sharing record, so the caseload
/// stays). Another version of a clinical document changes neither, so a hub relaying a
/// stream of changes about a patient keeps what it knows. This node's own documents are
/// written by ingest on other connections, so neither its consent records nor its own care
/// are ever answered from here.
#[derive(Default)]
struct PatientFacts {
    by_patient: RefCell<HashMap<NhsNumber, KnownPatient>>,
    /// Patients read from storage, for tests that the cache is kept.
    #[cfg(test)]
    reads: std::cell::Cell<u64>,
}

#[derive(Default)]
struct KnownPatient {
    caseload: Vec<OdsCode>,
    consent: Vec<(OdsCode, Option<Consent>)>,
}

/// Patients the cache holds before it starts again: a few MB at most.
const PATIENT_CACHE: usize = 65_536;

impl PatientFacts {
    fn with<T>(
        &self,
        lookup: &CareLookup<'_>,
        patient: &NhsNumber,
        answer: impl FnOnce(&mut KnownPatient, &CareLookup<'_>) -> StorageResult<T>,
    ) -> StorageResult<T> {
        let mut cache = self.by_patient.borrow_mut();
        // One lookup where the patient is known: a hub asks this for every new version and
        // every peer, and hashing the key twice was 3.4% of its CPU (BENCHMARKS.md).
        if let Some(known) = cache.get_mut(patient) {
            return answer(known, lookup);
        }
        if cache.len() >= PATIENT_CACHE {
            cache.clear();
        }
        let caseload = lookup.caseload(patient)?;
        #[cfg(test)]
        self.reads.set(self.reads.get() + 1);
        let known = cache.entry(patient.clone()).or_insert(KnownPatient {
            caseload,
            consent: Vec::new(),
        });
        answer(known, lookup)
    }

    fn cares(
        &self,
        lookup: &CareLookup<'_>,
        who: &OdsCode,
        patient: &NhsNumber,
    ) -> StorageResult<bool> {
        self.with(lookup, patient, |known, _| Ok(known.caseload.contains(who)))
    }

    fn consent(
        &self,
        lookup: &CareLookup<'_>,
        publisher: &OdsCode,
        patient: &NhsNumber,
    ) -> StorageResult<Option<Consent>> {
        self.with(lookup, patient, |known, lookup| {
            if let Some((_, consent)) = known.consent.iter().find(|(p, _)| p == publisher) {
                return Ok(*consent);
            }
            let consent = lookup.recorded_consent(publisher, patient)?;
            known.consent.push((publisher.clone(), consent));
            Ok(consent)
        })
    }

    fn caseload(
        &self,
        lookup: &CareLookup<'_>,
        patient: &NhsNumber,
    ) -> StorageResult<Vec<OdsCode>> {
        self.with(lookup, patient, |known, _| Ok(known.caseload.clone()))
    }

    fn forget<'a>(&self, patients: impl IntoIterator<Item = &'a NhsNumber>) {
        let mut cache = self.by_patient.borrow_mut();
        for patient in patients {
            cache.remove(patient);
        }
    }
}

/// What policy decisions need besides storage: the registry, who this node is, and what is
/// known of recently decided patients.
struct PolicyContext {
    trust: Box<dyn RegistrySource>,
    /// This node's organisation and its consent defaults, for its own patients without a
    /// recorded sharing choice.
    own: OdsCode,
    own_defaults: Consent,
    known: PatientFacts,
}

type StorageResult<T> = Result<T, StorageError>;
pub(crate) type HostResult<T> = Result<T, HostError>;

pub(crate) fn host_error(error: StorageError) -> HostError {
    HostError(error.to_string())
}

impl PolicyContext {
    /// Decides whether `recipient` may hold the document, with facts from `lookup`.
    /// `direct_from_publisher`: the document travels (or travelled) on a link from its
    /// publisher. `cached`: facts may come from the patient cache (decisions for peers, on
    /// the store's own connection; not inside a write batch). A storage error withholds
    /// (deny unless allowed), and is logged.
    fn decide(
        &self,
        registry: &VerifiedRegistry,
        lookup: &CareLookup<'_>,
        meta: &DocMeta,
        recipient: &Recipient,
        direct_from_publisher: bool,
        cached: bool,
    ) -> Result<Decision, HostError> {
        let agreements = &registry.registry().sharing;
        let decision = (|| {
            let cares = if cached {
                self.known.cares(lookup, &recipient.ods, &meta.patient)?
            } else {
                lookup.has_published_about(&recipient.ods, &meta.patient)?
            };
            if let Some(decision) = policy::decided_without_facts(
                meta,
                recipient,
                agreements,
                cares,
                direct_from_publisher,
            ) {
                return Ok(decision);
            }
            let recorded = if cached && meta.publisher != self.own {
                self.known.consent(lookup, &meta.publisher, &meta.patient)?
            } else {
                lookup.recorded_consent(&meta.publisher, &meta.patient)?
            };
            let consent = match recorded {
                Some(consent) => consent,
                None if meta.publisher == self.own => self.own_defaults,
                None => Consent::SENT_BY_PUBLISHER,
            };
            let facts = Facts {
                publisher_kind: registry.organisation(&meta.publisher).map(|o| o.kind),
                consent,
                recipient_cares_for_patient: cares,
                direct_from_publisher,
            };
            Ok(policy::decide(meta, recipient, agreements, &facts))
        })();
        // Without its facts there is no decision: withholding would move a checkpoint past the
        // document for good. The batch fails instead, and the session retries it.
        decision.map_err(|error: StorageError| {
            HostError(format!(
                "the sharing rules for document {} could not be checked: {error}; nothing of this batch was stored, and it is retried when the session reconnects",
                meta.id()
            ))
        })
    }

    /// Who could be sent a document of this node's feed, before any fact but care is read
    /// ([`policy::decided_without_facts`]): its publisher and those caring for its patient,
    /// besides region-wide holders; everyone for this node's own sharing record (it goes to
    /// every direct peer, so that each side learns the other's caseload) and where care
    /// cannot be read.
    fn reach(&self, lookup: &CareLookup<'_>, meta: &DocMeta) -> Reach {
        if meta.publisher == self.own && meta.section == Section::Sharing {
            return Reach::Everyone;
        }
        match self.known.caseload(lookup, &meta.patient) {
            Ok(mut named) => {
                if !named.contains(&meta.publisher) {
                    named.push(meta.publisher.clone());
                }
                Reach::Named(named)
            }
            Err(error) => {
                tracing::warn!(%error, "could not read a patient's care: every peer reads the entry");
                Reach::Everyone
            }
        }
    }

    /// This node as the recipient of what it receives.
    fn this_node(&self) -> Result<Recipient, HostError> {
        let registry = self.trust.current();
        let organisation = registry.organisation(&self.own).ok_or_else(|| {
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
        let epoch = store.feed_epoch()?;
        // The tail starts at the tip: sessions behind it read from SQLite, as before.
        let tip = store.feed_tip()?;
        Ok(StoreHost {
            store,
            policy: PolicyContext {
                trust,
                own,
                own_defaults,
                known: PatientFacts::default(),
            },
            feed,
            epoch,
            clock,
            compaction_due: false,
            tail: FeedTail::starting_at(tip),
            known_tip: None,
            loaded: None,
            planted: None,
            own_documents_returned: false,
        })
    }

    /// Keeps up to `capacity` recently used documents loaded for the sessions (see
    /// [`LoadedDocuments`]); without this call none are kept.
    pub fn keep_documents_loaded(&mut self, capacity: usize) {
        self.loaded = Some(LoadedDocuments::new(capacity));
    }

    /// Plants a bug (the simulator's self-tests only; see [`PlantedBug`]).
    #[doc(hidden)]
    pub fn plant(&mut self, bug: PlantedBug) {
        self.planted = Some(bug);
    }

    /// Whether a commit since the last call stored this node's own documents about a
    /// patient it held none of ours about, from a peer (every peer is then marked to be
    /// pulled again: [`crate::WriteBatch::pull_again_from_every_peer`]).
    pub fn take_own_documents_returned(&mut self) -> bool {
        std::mem::take(&mut self.own_documents_returned)
    }

    /// Unix seconds on the caller's clock (the wall clock, or the simulator's).
    pub fn now_unix(&self) -> i64 {
        (self.clock)()
    }

    /// The registry in force.
    pub fn registry(&self) -> Arc<VerifiedRegistry> {
        self.policy.trust.current()
    }

    /// Which sessions to wake for what the feed gained after `after`: the peers the new
    /// entries name in the feed tail (their publishers and those caring for their patients)
    /// and region-wide holders. A hub has hundreds of peers, and waking each for every new
    /// version cost a poll of each. A peer not woken loses nothing: none of the new entries
    /// names it, so there is nothing for it to read, and its session moves past them at its
    /// next feed check ([`caremesh_sync::session::FEED_CHECK_INTERVAL_MS`]). Where the tail
    /// cannot tell (it does not reach back, or an entry names everyone), every session wakes.
    pub fn peers_to_wake(&mut self, after: u64) -> PeersToWake {
        let everyone = PeersToWake {
            everyone: true,
            ..PeersToWake::default()
        };
        let Ok(tip) = self.feed_tip() else {
            return everyone;
        };
        let Some(named) = self.tail.reached_after(after, WAKE_SCAN_LIMIT) else {
            return everyone;
        };
        if after >= tip {
            // Nothing new: nobody to wake.
            return PeersToWake::default();
        }
        PeersToWake {
            everyone: false,
            named,
            registry: Some(self.policy.trust.current()),
        }
    }

    /// [`SyncHost::decide`] under `registry`, the edition in force taken by the caller.
    fn decide_under(
        &self,
        registry: &VerifiedRegistry,
        meta: &DocMeta,
        recipient: &Recipient,
    ) -> Result<Decision, HostError> {
        if self.planted == Some(PlantedBug::ForwardWithheld) {
            return Ok(Decision::Send);
        }
        let direct = meta.publisher == self.policy.own;
        self.policy
            .decide(registry, &self.store.care(), meta, recipient, direct, true)
    }

    /// Drops what is held in memory about storage (the feed tail, patients' caseloads and
    /// consent), after a group commit failed and what the memory described was rolled back.
    pub fn forget_cached(&mut self) {
        self.policy.known = PatientFacts::default();
        self.known_tip = None;
        // An unreadable tip leaves the tail to be read again from the start: nothing skipped.
        self.restart_tail().ok();
    }

    /// Drops what the feed tail holds and starts it again at the feed's tip; sessions behind
    /// that read from SQLite. If the tip cannot be read, the tail starts at the beginning of
    /// the feed (and is read again as it is used) and the error is returned.
    fn restart_tail(&mut self) -> Result<(), HostError> {
        let tip = self.store.feed_tip().map_err(host_error);
        self.tail = FeedTail::starting_at(*tip.as_ref().unwrap_or(&0));
        tip.map(drop)
    }

    /// Something may have written to the feed without going through this host (a local
    /// publish through [`StoreHost::store`]): the next [`SyncHost::feed_tip`] reads it again.
    pub fn feed_may_have_grown(&mut self) {
        self.known_tip = None;
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
        let organisation = registry.organisation(publisher);
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

/// New feed entries [`StoreHost::peers_to_wake`] reads before it wakes everyone instead.
const WAKE_SCAN_LIMIT: usize = 4_096;

/// The sessions to wake for new feed entries ([`StoreHost::peers_to_wake`]).
#[derive(Default)]
pub struct PeersToWake {
    everyone: bool,
    /// The entries' publishers and the organisations caring for their patients.
    named: HashSet<OdsCode>,
    /// The registry in force: a recipient its agreements let hold region-wide (a hub among
    /// them) may hold any entry, whoever cares for the patient.
    registry: Option<Arc<VerifiedRegistry>>,
}

impl PeersToWake {
    /// Whether `peer` could be sent one of the new entries, so its session should look now.
    pub fn includes(&self, peer: &Recipient) -> bool {
        self.everyone
            || self.named.contains(&peer.ods)
            || self
                .registry
                .as_ref()
                .is_some_and(|r| r.registry().sharing.holds_region_wide(peer.kind))
    }
}

pub(crate) fn feed_entry(row: FeedRow) -> Result<FeedEntry, HostError> {
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

    fn feed_epoch(&self) -> u64 {
        self.epoch
    }

    fn feed_epoch_end(&mut self, epoch: u64) -> Result<EpochEnd, HostError> {
        self.store.feed_epoch_end(epoch).map_err(host_error)
    }

    fn feed_tip(&mut self) -> Result<u64, HostError> {
        if let Some(tip) = self.known_tip {
            return Ok(tip);
        }
        let tip = self.store.feed_tip().map_err(host_error)?;
        let lookup = self.store.care();
        let policy = &self.policy;
        self.tail
            .extend(&self.store, tip, |meta| policy.reach(&lookup, meta))?;
        self.known_tip = Some(tip);
        Ok(tip)
    }

    fn feed_after(&mut self, after: u64, limit: usize) -> Result<Vec<FeedEntry>, HostError> {
        let rows = self.store.feed_after(after, limit).map_err(host_error)?;
        rows.into_iter().map(feed_entry).collect()
    }

    fn offerable_after(
        &mut self,
        peer: &Recipient,
        after: u64,
        limit: usize,
    ) -> Result<OfferPage, HostError> {
        // The registry is taken once for the page: behind a lock, and a hub decides each new
        // version for each of its peers.
        let registry = self.policy.trust.current();
        // A peer that does not hold region-wide reads only the entries that name it (see
        // `feed_tail`), and decides those in full. A planted forwarder reads all, so that the
        // simulator still sees it send what it should not.
        let reads_everything = registry.registry().sharing.holds_region_wide(peer.kind)
            || self.planted == Some(PlantedBug::ForwardWithheld);
        if !reads_everything && let Some(named) = self.tail.named_after(&peer.ods, after, limit) {
            let mut page = OfferPage {
                read_up_to: named.read_up_to,
                ..OfferPage::default()
            };
            for entry in named.entries {
                if self.decide_under(&registry, &entry.meta, peer)? == Decision::Send {
                    page.entries.push(OfferEntry {
                        doc: entry.meta.id(),
                        heads: entry.heads.clone(),
                    });
                }
            }
            return Ok(page);
        }
        let Some(entries) = self.tail.after(after, limit) else {
            return caremesh_sync::session::offerable_from_feed(self, peer, after, limit);
        };
        // From memory, building offer entries only for what this peer may hold.
        let mut page = OfferPage::default();
        for (seq, entry) in entries {
            page.read_up_to = Some(seq);
            let Some(entry) = entry else {
                continue;
            };
            if self.decide_under(&registry, &entry.meta, peer)? == Decision::Send {
                page.entries.push(OfferEntry {
                    doc: entry.meta.id(),
                    heads: entry.heads.clone(),
                });
            }
        }
        Ok(page)
    }

    fn backfill(&mut self, peer: &OdsCode, limit: usize) -> Result<Vec<FeedEntry>, HostError> {
        let rows = self.store.backfill_for(peer, limit).map_err(host_error)?;
        rows.into_iter().map(feed_entry).collect()
    }

    fn backfill_done(&mut self, peer: &OdsCode, docs: &[DocId]) -> Result<(), HostError> {
        self.store.backfill_done(peer, docs).map_err(host_error)
    }

    fn held_heads(&mut self, doc: DocId) -> Result<Option<Vec<[u8; 32]>>, HostError> {
        // Unreadable signed heads count as not held: a verified copy from the peer replaces it.
        self.store.held_heads(doc).map_err(host_error)
    }

    fn document(&mut self, doc: DocId) -> Result<Option<HeldDocument>, HostError> {
        let stored = self.store.document(doc).map_err(host_error)?;
        Ok(stored.map(|stored| HeldDocument {
            meta: stored.meta,
            snapshot: stored.snapshot,
            appended: stored.appended,
            signed: stored.signed,
        }))
    }

    fn held_index(&mut self, doc: DocId) -> Result<Option<(DocMeta, HeldIndex)>, HostError> {
        self.store.held_index(doc).map_err(host_error)
    }

    fn changes_after(&mut self, doc: DocId, have: &[[u8; 32]]) -> Result<HeldChanges, HostError> {
        self.store.changes_after(doc, have).map_err(host_error)
    }

    fn commit(
        &mut self,
        peer: &OdsCode,
        mut documents: Vec<VerifiedDocument>,
        checkpoint: Option<Checkpoint>,
    ) -> Result<Vec<Refusal>, HostError> {
        if self.planted == Some(PlantedBug::AckWithoutStoring) {
            documents.clear();
        }
        let now = (self.clock)();
        let this_node = self.policy.this_node()?;
        // What this commit stores takes feed positions.
        self.known_tip = None;
        // Sharing records first: a withdrawal in this batch refuses the late copies with it,
        // and consent given again admits the documents that follow it.
        documents.sort_by_key(|d| d.signed.meta.section != Section::Sharing);
        let sources: Vec<SourceRow> = documents
            .iter()
            .map(|d| self.source_row(&d.signed.meta.publisher, d.published_at.unwrap_or(now)))
            .collect();
        let registry = self.policy.trust.current();
        let batch = self.store.write().map_err(host_error)?;
        // Before any document: a relationship the first batch reveals must be able to queue
        // backfill for the peer that sent it (found by the simulator: the peer's row was only
        // made with its first checkpoint, after the documents, so that backfill was lost).
        batch.register_peer(peer).map_err(host_error)?;
        let mut refusals = Vec::new();
        let mut purged = 0;
        let mut own_returned = false;
        // Patients whose caseload or recorded consent this batch changes (see PatientFacts).
        let mut facts_changed: Vec<&NhsNumber> = Vec::new();
        for (document, source) in documents.iter().zip(&sources) {
            let meta = &document.signed.meta;
            let direct = meta.publisher == *peer;
            if let Decision::Withhold(reason) =
                self.policy
                    .decide(&registry, &batch.care(), meta, &this_node, direct, false)?
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
            let items = if crate::read_model_keeps(this_node.kind, meta.section) {
                &document.items[..]
            } else {
                &[]
            };
            let position = match &document.bytes {
                VerifiedBytes::Appended(extension) => batch.put_appended(
                    &document.signed,
                    extension,
                    // Read from its changes where this node reads the items.
                    document.register.is_some().then_some(items),
                    document.register.as_ref(),
                    now,
                ),
                VerifiedBytes::Whole { snapshot, built_on } => batch.put_document(
                    &document.signed,
                    snapshot,
                    built_on.as_deref(),
                    items,
                    document.register.as_ref(),
                    now,
                ),
            }
            .map_err(host_error)?;
            if position.is_none() {
                // Another session stored this version or a newer one since it was checked:
                // that commit did what the version brings (a newer sharing record's consent
                // stands, not this one's).
                continue;
            }
            if is_care {
                batch.touch_received_source(source).map_err(host_error)?;
            }
            if new_relationship || meta.section == Section::Sharing {
                facts_changed.push(&meta.patient);
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
                // Our own, from a peer, about a patient we held nothing of ours about: we
                // lost them, and may have refused others' documents about the patient.
                own_returned |= meta.publisher == self.policy.own;
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
        if own_returned {
            batch.pull_again_from_every_peer().map_err(host_error)?;
        }
        if let Some(checkpoint) = checkpoint {
            let checkpoint = PeerCheckpoint {
                feed: checkpoint.feed.0,
                epoch: checkpoint.epoch,
                up_to: checkpoint.up_to,
            };
            batch
                .save_checkpoint(peer, checkpoint)
                .map_err(host_error)?;
        }
        let committed = batch.commit().map_err(host_error);
        if committed.is_ok() {
            self.policy.known.forget(facts_changed.iter().copied());
            // Whoever now cares for these patients is named for what the tail holds about
            // them (the feed tail's invariant).
            let lookup = self.store.care();
            for patient in facts_changed {
                match self.policy.known.caseload(&lookup, patient) {
                    Ok(carers) => self.tail.reach_grew(patient, &carers),
                    Err(error) => {
                        tracing::warn!(%error, "could not read a patient's care: the feed tail is read again");
                        self.restart_tail().ok();
                        break;
                    }
                }
            }
        } else {
            // Nothing of the batch stands: forget all it touched, to be safe.
            self.policy
                .known
                .forget(documents.iter().map(|d| &d.signed.meta.patient));
        }
        committed?;
        self.own_documents_returned |= own_returned;
        if purged > 0 {
            // The purged documents' feed entries went with them: the tail must not offer them
            // (found by the test that named reads offer what reading SQLite offers).
            self.restart_tail()?;
            tracing::info!(%peer, documents = purged, "purged documents after a withdrawal of consent");
            self.compaction_due = true;
        }
        // Inside a group commit the WAL cannot be emptied yet: the engine's next status flush
        // does it (`compact_if_due`).
        if self.compaction_due && !self.store.in_group() {
            self.compact_after_purge();
        }
        Ok(refusals)
    }

    fn checkpoint(&mut self, peer: &OdsCode) -> Result<Option<Checkpoint>, HostError> {
        let stored = self.store.peer_checkpoint(peer).map_err(host_error)?;
        Ok(stored.map(|stored| Checkpoint {
            feed: FeedId(stored.feed),
            epoch: stored.epoch,
            up_to: stored.up_to,
        }))
    }

    fn is_publisher_key(&self, publisher: &OdsCode, key: &[u8; 32]) -> bool {
        self.policy
            .trust
            .current()
            .standing(key)
            .holder(Some(publisher))
            .is_ok()
    }

    fn decide(&self, meta: &DocMeta, recipient: &Recipient) -> Result<Decision, HostError> {
        self.decide_under(&self.policy.trust.current(), meta, recipient)
    }

    fn registry_version(&self) -> u64 {
        self.policy.trust.current().version()
    }

    fn registry_bytes(&self) -> Option<Vec<u8>> {
        Some(self.policy.trust.current().bytes().to_vec())
    }

    fn reads_items(&self, meta: &DocMeta) -> bool {
        // Not in the registry, this node stores nothing it receives anyway: read them.
        self.policy.this_node().map_or(true, |this_node| {
            crate::read_model_keeps(this_node.kind, meta.section)
        })
    }

    fn loaded_documents(&mut self) -> Option<&mut LoadedDocuments> {
        self.loaded.as_mut()
    }

    fn planted_bug(&self) -> Option<PlantedBug> {
        self.planted
    }

    fn own_audit_checkpoint(&mut self) -> Result<Option<Vec<u8>>, HostError> {
        self.store.newest_own_checkpoint().map_err(host_error)
    }

    fn witness_audit_checkpoint(
        &mut self,
        peer: &OdsCode,
        checkpoint: &SignedCheckpoint,
    ) -> Result<(), HostError> {
        let batch = self.store.write().map_err(host_error)?;
        let contradicted = batch.witness_checkpoint(checkpoint).map_err(host_error)?;
        batch.commit().map_err(host_error)?;
        if contradicted.is_some() {
            // Two signed accounts of the same trail: one of them was rewritten. Codes and
            // counts only.
            tracing::error!(
                %peer,
                entries = checkpoint.checkpoint.count,
                "a peer signed two different audit checkpoints of the same length: its audit trail was rewritten; the first is kept"
            );
        }
        Ok(())
    }

    fn witnessed_audit_checkpoints(&mut self, peer: &OdsCode) -> Result<Vec<Vec<u8>>, HostError> {
        self.store
            .witnessed_checkpoints_of(peer)
            .map_err(host_error)
    }

    fn audit_checkpoint_witnessed(
        &mut self,
        witness: &OdsCode,
        checkpoint: &SignedCheckpoint,
    ) -> Result<(), HostError> {
        let batch = self.store.write().map_err(host_error)?;
        batch
            .save_witness_receipt(witness, checkpoint)
            .map_err(host_error)?;
        batch.commit().map_err(host_error)
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

#[cfg(test)]
mod tests {
    use super::*;
    use caremesh_sync::{DataClass, PublishedDocument};

    const PRACTICE_SECRET: [u8; 32] = [7; 32];
    const OTHER_PRACTICE_SECRET: [u8; 32] = [6; 32];

    fn registry() -> Arc<VerifiedRegistry> {
        let organisation = |ods: &str, kind, secret: &[u8; 32]| caremesh_sync::Organisation {
            ods: OdsCode::parse(ods).unwrap(),
            name: ods.into(),
            kind,
            keys: vec![hex::encode(caremesh_sync::trust::public_key_of(secret))],
            revoked_keys: Vec::new(),
            retired_keys: Vec::new(),
            addresses: Vec::new(),
        };
        let mut registry = caremesh_sync::Registry::new("test");
        registry.sharing.agreements = vec![policy::Agreement {
            publisher: caremesh_sync::OrgKind::Gp,
            recipients: vec![caremesh_sync::OrgKind::Gp],
            classes: vec![caremesh_sync::DataClass::Coded],
            except_sections: Vec::new(),
        }];
        registry.organisations = vec![
            organisation("A81001", caremesh_sync::OrgKind::Gp, &PRACTICE_SECRET),
            organisation("Y00001", caremesh_sync::OrgKind::Hub, &[8; 32]),
            organisation("B82002", caremesh_sync::OrgKind::Gp, &OTHER_PRACTICE_SECRET),
        ];
        let mut file = caremesh_sync::RegistryFile::unsigned(registry);
        file.sign(&[9; 32], 0).unwrap();
        let authority = caremesh_sync::trust::public_key_of(&[9; 32]);
        Arc::new(VerifiedRegistry::from_bytes(file.to_json(), &authority).unwrap())
    }

    /// `own`'s sync host over a store at `path`, trusting [`registry`], its clock stopped.
    fn host_at(path: &std::path::Path, own: &str) -> StoreHost {
        StoreHost::new(
            Store::open(path).unwrap(),
            Box::new(FixedRegistry(registry())),
            OdsCode::parse(own).unwrap(),
            Consent::SENT_BY_PUBLISHER,
            Box::new(|| 1_700_000_100),
        )
        .unwrap()
    }

    /// A document the practice signed about one patient, as a session hands it over.
    fn received(section: Section, item_id: &str) -> VerifiedDocument {
        received_from("A81001", PRACTICE_SECRET, section, item_id, None)
    }

    /// A document `publisher` signed about one patient; a sharing record states `consent`.
    fn received_from(
        publisher: &str,
        secret: [u8; 32],
        section: Section,
        item_id: &str,
        consent: Option<Consent>,
    ) -> VerifiedDocument {
        let meta = DocMeta {
            publisher: OdsCode::parse(publisher).unwrap(),
            patient: NhsNumber::parse("9912003888").unwrap(),
            section,
            class: DataClass::Coded,
        };
        let item = Item::titled(
            item_id,
            section,
            DataClass::Coded,
            "Condition",
            "Asthma",
            "test",
            item_id,
        );
        let item = Item {
            fields: consent.map(Consent::to_fields).unwrap_or_default(),
            ..item
        };
        let mut document = PublishedDocument::create(meta.clone(), &[1]);
        document.update(std::slice::from_ref(&item), &[], 1_700_000_000);
        let key = caremesh_sync::PublisherKey::from_secret(secret);
        VerifiedDocument {
            signed: key.sign_heads(&meta, &document.heads()),
            bytes: VerifiedBytes::Whole {
                snapshot: document.save(),
                built_on: None,
            },
            items: vec![item],
            published_at: Some(1_700_000_000),
            register: document.item_register(),
        }
    }

    /// A node's own documents about a patient it holds nothing of its own about can only come
    /// back from a peer after it lost them; others' documents about the patient it refused
    /// meanwhile lie behind its checkpoints, so every peer is marked to be pulled again.
    #[test]
    fn own_documents_coming_back_from_a_peer_mark_every_peer_to_be_pulled_again() {
        let dir = tempfile::tempdir().unwrap();
        let open = |own: &str, name: &str| {
            StoreHost::new(
                Store::open(&dir.path().join(name)).unwrap(),
                Box::new(FixedRegistry(registry())),
                OdsCode::parse(own).unwrap(),
                Consent {
                    share_out: true,
                    share_in: true,
                    objection: false,
                },
                Box::new(|| 1_700_000_100),
            )
            .unwrap()
        };
        let hub = OdsCode::parse("Y00001").unwrap();
        let practice = OdsCode::parse("A81001").unwrap();
        let at = |up_to| {
            Some(Checkpoint {
                feed: FeedId([3; 16]),
                epoch: 0,
                up_to,
            })
        };

        // A hub receiving the practice's documents: ordinary traffic, nothing marked.
        let mut at_hub = open("Y00001", "hub.db");
        at_hub
            .commit(&practice, vec![received(Section::Problems, "p1")], at(1))
            .unwrap();
        assert!(!at_hub.take_own_documents_returned());
        assert!(!at_hub.store.pulls_again(&practice).unwrap());

        // The practice, its database lost, receiving its own from the hub.
        let mut rebuilt = open("A81001", "practice.db");
        let refused = rebuilt
            .commit(&hub, vec![received(Section::Problems, "p1")], at(7))
            .unwrap();
        assert!(refused.is_empty(), "{refused:?}");
        assert!(rebuilt.take_own_documents_returned());
        assert!(!rebuilt.take_own_documents_returned(), "taken once");
        assert!(rebuilt.store.pulls_again(&hub).unwrap());

        // Its pull of the hub's feed restarts from the start, and the mark is cleared.
        let batch = rebuilt.store.write().unwrap();
        batch.restart_pull(&hub).unwrap();
        batch.commit().unwrap();
        assert!(!rebuilt.store.pulls_again(&hub).unwrap());
        assert_eq!(
            rebuilt.store.peer_checkpoint(&hub).unwrap().unwrap().up_to,
            0
        );

        // More of its own about the same patient: it knew it cared, nothing is marked.
        rebuilt
            .commit(&hub, vec![received(Section::Medications, "m1")], at(9))
            .unwrap();
        assert!(!rebuilt.take_own_documents_returned());
        assert!(!rebuilt.store.pulls_again(&hub).unwrap());
    }

    /// Finding: a storage error while the sharing rules were checked read as "withhold: not in
    /// caseload", and the checkpoint moved past the document for good. Now the batch fails
    /// whole, the checkpoint stays, and the same batch stores once the fault is gone.
    #[test]
    fn a_policy_lookup_that_fails_aborts_the_batch_and_the_retry_stores_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let mut host = StoreHost::new(
            Store::open(&path).unwrap(),
            Box::new(FixedRegistry(registry())),
            OdsCode::parse("Y00001").unwrap(),
            Consent {
                share_out: true,
                share_in: true,
                objection: false,
            },
            Box::new(|| 1_700_000_100),
        )
        .unwrap();
        let practice = OdsCode::parse("A81001").unwrap();
        let feed = FeedId([3; 16]);
        let at = |up_to| {
            Some(Checkpoint {
                feed,
                epoch: 0,
                up_to,
            })
        };
        let refused = host
            .commit(
                &practice,
                vec![received(Section::Sharing, "consent")],
                at(1),
            )
            .unwrap();
        assert!(refused.is_empty(), "{refused:?}");

        // The fault: the sharing record the rules read no longer reads.
        let side = crate::page_checksums::open_directly(&path).unwrap();
        let damage = |body: &str| {
            side.execute(
                "UPDATE items SET body = ?1 WHERE section = 'sharing'",
                [body],
            )
            .unwrap()
        };
        let original: String = side
            .query_row(
                "SELECT body FROM items WHERE section = 'sharing'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(damage("{not an item"), 1);

        let problem = || vec![received(Section::Problems, "asthma")];
        let error = host
            .commit(&practice, problem(), at(2))
            .expect_err("a batch whose rules could not be checked is not stored");
        assert!(
            error.0.contains("could not be checked") && error.0.contains("retried"),
            "{error}"
        );
        host.forget_cached();
        assert_eq!(
            host.checkpoint(&practice).unwrap().map(|c| c.up_to),
            Some(1),
            "the checkpoint stays before the document"
        );
        let problem_doc = problem()[0].signed.meta.id();
        assert!(host.held_heads(problem_doc).unwrap().is_none());

        damage(&original);
        let refused = host.commit(&practice, problem(), at(2)).unwrap();
        assert!(refused.is_empty(), "{refused:?}");
        assert!(host.held_heads(problem_doc).unwrap().is_some());
        assert_eq!(
            host.checkpoint(&practice).unwrap().map(|c| c.up_to),
            Some(2)
        );
    }

    /// A hub decides each change for each of its peers from facts it keeps per patient. A
    /// further version of a clinical document changes none of them and must not send the hub
    /// back to storage; a publisher's first document about a patient (a new caseload) and a
    /// sharing record (consent) must, or the hub would decide from what is no longer true.
    #[test]
    fn the_patient_cache_forgets_a_patient_only_when_caseload_or_consent_changed() {
        let dir = tempfile::tempdir().unwrap();
        let mut hub = host_at(&dir.path().join("hub.db"), "Y00001");
        let practice = OdsCode::parse("A81001").unwrap();
        let other = OdsCode::parse("B82002").unwrap();
        let mut commit = committer();
        let consenting = Consent::SENT_BY_PUBLISHER;
        let objecting = Consent {
            objection: true,
            ..consenting
        };
        let mut sharing = sharing_versions(&[consenting, objecting]).into_iter();
        let problem = received(Section::Problems, "p1");
        let problem_meta = problem.signed.meta.clone();
        commit(&mut hub, &practice, sharing.next().unwrap());
        commit(&mut hub, &practice, problem);
        let to_other = Recipient {
            ods: other.clone(),
            kind: caremesh_sync::OrgKind::Gp,
        };
        let reads = |hub: &StoreHost| hub.policy.known.reads.get();

        // The other practice does not care for the patient yet.
        assert!(matches!(
            hub.decide(&problem_meta, &to_other).unwrap(),
            Decision::Withhold(policy::WithholdReason::NotInCaseload)
        ));
        assert_eq!(reads(&hub), 1);

        // Its first document about the patient puts the patient on its caseload.
        commit(&mut hub, &other, from_other("q1"));
        let decided = hub.decide(&problem_meta, &to_other).unwrap();
        assert_eq!(decided, Decision::Send);
        assert_eq!(reads(&hub), 2, "a new relationship is read again");

        // More clinical versions from either: the cache is kept.
        commit(&mut hub, &practice, received(Section::Medications, "m1"));
        commit(&mut hub, &other, from_other("q2"));
        let decided = hub.decide(&problem_meta, &to_other).unwrap();
        assert_eq!(decided, Decision::Send);
        assert_eq!(reads(&hub), 2, "nothing policy reads changed");

        // An objection in the practice's sharing record: read again, and withheld.
        commit(&mut hub, &practice, sharing.next().unwrap());
        assert!(matches!(
            hub.decide(&problem_meta, &to_other).unwrap(),
            Decision::Withhold(policy::WithholdReason::Objection)
        ));
        assert_eq!(reads(&hub), 3);
    }

    /// A hub wakes, for new feed entries, the sessions of their publishers, of those caring
    /// for their patients and of region-wide holders (hubs); everyone where it cannot tell.
    #[test]
    fn new_entries_wake_only_peers_that_could_be_sent_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut hub = host_at(&dir.path().join("hub.db"), "Y00001");
        let practice = recipient("A81001", caremesh_sync::OrgKind::Gp);
        let other = recipient("B82002", caremesh_sync::OrgKind::Gp);
        let stranger = recipient("C83003", caremesh_sync::OrgKind::Acute);
        let other_hub = recipient("Y00002", caremesh_sync::OrgKind::Hub);
        let mut commit_from = committer();
        let mut commit = |hub: &mut StoreHost, from: &OdsCode, document: VerifiedDocument| {
            let before = hub.feed_tip().unwrap();
            commit_from(hub, from, document);
            hub.peers_to_wake(before)
        };
        let woken = |wake: &PeersToWake| {
            [&practice, &other, &stranger, &other_hub]
                .into_iter()
                .filter(|peer| wake.includes(peer))
                .map(|peer| peer.ods.as_str().to_string())
                .collect::<Vec<_>>()
        };

        // The practice's first documents: itself (its own, restorable) and hubs.
        commit(
            &mut hub,
            &practice.ods,
            sharing_versions(&[Consent::SENT_BY_PUBLISHER]).remove(0),
        );
        let wake = commit(&mut hub, &practice.ods, received(Section::Problems, "p1"));
        assert_eq!(woken(&wake), ["A81001", "Y00002"]);

        // The other practice's document about the same patient: it, and the practice that
        // cares for the patient.
        let from_other = from_other("q1");
        let wake = commit(&mut hub, &other.ods, from_other);
        assert_eq!(woken(&wake), ["A81001", "B82002", "Y00002"]);
        // And the practice's next version now wakes the other practice too.
        let wake = commit(
            &mut hub,
            &practice.ods,
            received(Section::Medications, "m1"),
        );
        assert_eq!(woken(&wake), ["A81001", "B82002", "Y00002"]);

        // Positions the tail no longer covers (a host opened since): everyone.
        let tip = hub.feed_tip().unwrap();
        drop(hub);
        let mut reopened = host_at(&dir.path().join("hub.db"), "Y00001");
        assert_eq!(woken(&reopened.peers_to_wake(tip)).len(), 0, "nothing new");
        assert_eq!(woken(&reopened.peers_to_wake(0)).len(), 4);

        // A node's own sharing record goes to every direct peer.
        let mut practice_host = host_at(&dir.path().join("practice.db"), "A81001");
        let hub_ods = OdsCode::parse("Y00001").unwrap();
        let own_sharing = sharing_versions(&[Consent::SENT_BY_PUBLISHER]).remove(0);
        practice_host
            .commit(&hub_ods, vec![own_sharing], None)
            .unwrap();
        assert_eq!(woken(&practice_host.peers_to_wake(0)).len(), 4);
    }

    /// What a session reading `peer`'s offers from position `after` to the end is offered,
    /// page by page: through `offerable_after` (`reference`: every entry read from SQLite
    /// and decided, as before the feed tail named its peers).
    fn offered_from(
        host: &mut StoreHost,
        peer: &Recipient,
        mut after: u64,
        reference: bool,
    ) -> Vec<OfferEntry> {
        let mut offered = Vec::new();
        loop {
            let page = if reference {
                caremesh_sync::session::offerable_from_feed(host, peer, after, 2)
            } else {
                host.offerable_after(peer, after, 2)
            }
            .unwrap();
            offered.extend(page.entries);
            match page.read_up_to {
                Some(up_to) => {
                    assert!(up_to > after);
                    after = up_to;
                }
                None => return offered,
            }
        }
    }

    /// A peer reading only the feed entries that name it is offered exactly what deciding
    /// every entry offers it, from every position, as care and consent change: above all an
    /// organisation that comes to care for a patient after the entries about them were read
    /// into the tail (mutation-checked: without `reach_grew` the second practice misses
    /// them).
    #[test]
    fn reading_only_named_entries_offers_what_deciding_every_entry_offers() {
        let dir = tempfile::tempdir().unwrap();
        let mut hub = host_at(&dir.path().join("hub.db"), "Y00001");
        let peers = [
            recipient("A81001", caremesh_sync::OrgKind::Gp),
            recipient("B82002", caremesh_sync::OrgKind::Gp),
            recipient("C83003", caremesh_sync::OrgKind::Gp),
            recipient("Y00002", caremesh_sync::OrgKind::Hub),
        ];
        let (practice, other) = (peers[0].ods.clone(), peers[1].ods.clone());
        let objecting = Consent {
            objection: true,
            ..Consent::SENT_BY_PUBLISHER
        };
        let mut sharing = sharing_versions(&[Consent::SENT_BY_PUBLISHER, objecting]).into_iter();
        let steps = [
            (practice.clone(), sharing.next().unwrap()),
            (practice.clone(), received(Section::Problems, "p1")),
            (other.clone(), from_other("q1")),
            (practice.clone(), received(Section::Medications, "m1")),
            (other.clone(), from_other("q2")),
            (practice.clone(), sharing.next().unwrap()),
        ];
        let mut commit = committer();
        let mut offered_to_other = 0;
        for (step, (from, document)) in steps.into_iter().enumerate() {
            commit(&mut hub, &from, document);
            let tip = hub.feed_tip().unwrap();
            for peer in &peers {
                for after in 0..=tip {
                    let named = offered_from(&mut hub, peer, after, false);
                    let every = offered_from(&mut hub, peer, after, true);
                    assert_eq!(named, every, "step {step}, {} from {after}", peer.ods);
                    if peer.ods == other && after == 0 {
                        offered_to_other = named.len();
                    }
                }
            }
            if step == 2 {
                assert_eq!(
                    offered_to_other, 3,
                    "the practice's sharing record and problem, read before, and its own"
                );
            }
        }
    }

    fn recipient(ods: &str, kind: caremesh_sync::OrgKind) -> Recipient {
        Recipient {
            ods: OdsCode::parse(ods).unwrap(),
            kind,
        }
    }

    /// A problem the other practice signed about the patient.
    fn from_other(item_id: &str) -> VerifiedDocument {
        received_from(
            "B82002",
            OTHER_PRACTICE_SECRET,
            Section::Problems,
            item_id,
            None,
        )
    }

    /// Commits one document at a time from a peer, each with the peer's next checkpoint, and
    /// asserts that nothing was refused.
    fn committer() -> impl FnMut(&mut StoreHost, &OdsCode, VerifiedDocument) {
        let mut up_to = 0;
        move |host, from, document| {
            up_to += 1;
            let checkpoint = Checkpoint {
                feed: FeedId([3; 16]),
                epoch: 0,
                up_to,
            };
            let refused = host.commit(from, vec![document], Some(checkpoint)).unwrap();
            assert!(refused.is_empty(), "{refused:?}");
        }
    }

    /// Versions of the practice's sharing record about one patient, each made from the one
    /// before, stating `consents` in turn.
    fn sharing_versions(consents: &[Consent]) -> Vec<VerifiedDocument> {
        let first = received_from(
            "A81001",
            PRACTICE_SECRET,
            Section::Sharing,
            "s",
            Some(consents[0]),
        );
        let meta = first.signed.meta.clone();
        let key = caremesh_sync::PublisherKey::from_secret(PRACTICE_SECRET);
        let mut document = PublishedDocument::create(meta.clone(), &[1]);
        let mut built_on = None;
        let mut versions = Vec::new();
        for (version, consent) in consents.iter().enumerate() {
            let item = Item {
                fields: consent.to_fields(),
                ..first.items[0].clone()
            };
            let at = 1_700_000_000 + version as i64;
            assert!(document.update(std::slice::from_ref(&item), &[], at));
            versions.push(VerifiedDocument {
                signed: key.sign_heads(&meta, &document.heads()),
                bytes: VerifiedBytes::Whole {
                    snapshot: document.save(),
                    built_on: built_on.replace(document.heads()),
                },
                items: vec![item],
                published_at: Some(at),
                register: document.item_register(),
            });
        }
        versions
    }

    /// Finding (review of issue 19's relay path): a version is checked when it arrives and
    /// stored when its session's batch completes. An objection checked by one session and
    /// stored after another session stored the record that lifts it replaced the newer record
    /// and purged what the patient shares. Now the newer record stands, with what it allows.
    #[test]
    fn an_older_sharing_record_stored_after_a_newer_one_neither_replaces_it_nor_purges() {
        let dir = tempfile::tempdir().unwrap();
        let mut hub = host_at(&dir.path().join("hub.db"), "Y00001");
        let practice = OdsCode::parse("A81001").unwrap();
        let consenting = Consent::SENT_BY_PUBLISHER;
        let objecting = Consent {
            objection: true,
            ..consenting
        };
        let mut versions = sharing_versions(&[consenting, objecting, consenting]).into_iter();
        let (given, objection, lifted) = (
            versions.next().unwrap(),
            versions.next().unwrap(),
            versions.next().unwrap(),
        );
        let problem = received(Section::Problems, "p1");
        let problem_doc = problem.signed.meta.id();
        let refused = hub.commit(&practice, vec![given, problem], None).unwrap();
        assert!(refused.is_empty(), "{refused:?}");
        // One session checked the objection against the first record; another stored the
        // record lifting it (made from the objection) before that session's batch completed.
        let lifted_heads = crate::sorted(lifted.signed.heads.clone());
        let lifted = VerifiedDocument {
            bytes: match lifted.bytes {
                VerifiedBytes::Whole { snapshot, .. } => VerifiedBytes::Whole {
                    snapshot,
                    built_on: hub.held_heads(lifted.signed.meta.id()).unwrap(),
                },
                appended => appended,
            },
            ..lifted
        };
        let sharing_doc = lifted.signed.meta.id();
        assert!(
            hub.commit(&practice, vec![lifted], None)
                .unwrap()
                .is_empty()
        );
        assert!(
            hub.commit(&practice, vec![objection], None)
                .unwrap()
                .is_empty()
        );

        assert_eq!(
            hub.held_heads(sharing_doc).unwrap().map(crate::sorted),
            Some(lifted_heads),
            "the newer record stands"
        );
        assert!(
            hub.held_heads(problem_doc).unwrap().is_some(),
            "what the patient shares was not purged"
        );
    }

    /// A hub serves no record: of what it relays it keeps items only where its own work reads
    /// them (sharing records for consent); any other node keeps every item for its view.
    #[test]
    fn a_hub_keeps_items_only_of_sharing_records_and_a_practice_keeps_all() {
        let dir = tempfile::tempdir().unwrap();
        for (own, keeps_clinical) in [("Y00001", false), ("B82002", true)] {
            let mut host = host_at(&dir.path().join(format!("{own}.db")), own);
            let sharing = received_from(
                "A81001",
                PRACTICE_SECRET,
                Section::Sharing,
                "s",
                Some(Consent::SENT_BY_PUBLISHER),
            );
            let problem = received(Section::Problems, "p1");
            let ids = [sharing.signed.meta.id(), problem.signed.meta.id()];
            let practice = OdsCode::parse("A81001").unwrap();
            // The other practice cares for the patient: its own problem list about them.
            let its_own = received_from(
                "B82002",
                OTHER_PRACTICE_SECRET,
                Section::Problems,
                "q1",
                None,
            );
            let refused = host.commit(&practice, vec![its_own], None).unwrap();
            assert!(refused.is_empty(), "{refused:?}");
            let refused = host
                .commit(&practice, vec![sharing, problem], None)
                .unwrap();
            assert!(refused.is_empty(), "{refused:?}");
            assert!(host.held_heads(ids[1]).unwrap().is_some(), "{own} holds it");
            let held = |doc| host.store.item_bodies(doc).unwrap().len();
            assert_eq!(held(ids[0]), 1, "{own} keeps the sharing record's item");
            assert_eq!(held(ids[1]), usize::from(keeps_clinical), "at {own}");
        }
    }
}
