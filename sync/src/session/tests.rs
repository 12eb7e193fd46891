//! Session tests over an in-memory host. The node's SQLite host and real QUIC are covered by
//! the integration tests; here the protocol's own promises are checked exactly: what crosses
//! the wire, what is stored, what is refused.

use super::*;
use crate::model::{DataClass, OrgKind, Section};
use crate::planted::PlantedBug;
use crate::policy;
use crate::signing::PublisherKey;
use crate::testing::{allergy, meta_for};
use std::collections::HashMap;

const PATIENTS: [&str; 3] = ["9912003888", "9434765919", "6700028191"];

/// A node's storage and trust, in memory.
struct MemoryHost {
    feed: FeedId,
    /// The feed's epochs, oldest first: (epoch, the position it began after).
    epochs: Vec<(u64, u64)>,
    next_seq: u64,
    docs: BTreeMap<DocId, (u64, HeldDocument)>,
    checkpoints: HashMap<OdsCode, Checkpoint>,
    trusted: Vec<(OdsCode, [u8; 32])>,
    commits: usize,
    backfill: BTreeMap<OdsCode, Vec<DocId>>,
    /// The sharing rules cannot be checked for this patient's documents (a storage fault).
    policy_unreadable: Option<crate::model::NhsNumber>,
    /// Documents kept loaded, as a hub keeps them (none unless a test asks).
    loaded: Option<crate::loaded::LoadedDocuments>,
    /// Whether received documents' items are read ([`SyncHost::reads_items`]).
    reads_items: bool,
    planted: Option<PlantedBug>,
}

impl MemoryHost {
    fn new(feed: u8, trusted: &[(&str, &PublisherKey)]) -> MemoryHost {
        MemoryHost {
            feed: FeedId([feed; 16]),
            epochs: vec![(1, 0)],
            next_seq: 1,
            docs: BTreeMap::new(),
            checkpoints: HashMap::new(),
            trusted: trusted
                .iter()
                .map(|(ods, key)| (OdsCode::parse(ods).unwrap(), key.public()))
                .collect(),
            commits: 0,
            backfill: BTreeMap::new(),
            policy_unreadable: None,
            loaded: None,
            reads_items: true,
            planted: None,
        }
    }

    /// A restart after a disk that lost every write after feed position `kept` (it had
    /// reported them durable): the documents that took later positions are gone, and so are
    /// the checkpoints saved with them (this host does not date its checkpoints: all of
    /// them); the positions are handed out again, and a new epoch begins.
    fn restart_losing_writes_after(&mut self, kept: u64) {
        self.docs.retain(|_, (seq, _)| *seq <= kept);
        self.checkpoints.clear();
        self.next_seq = kept + 1;
        self.restart();
    }

    /// A restart: a new feed epoch begins at the tip.
    fn restart(&mut self) {
        let epoch = self.epochs.last().unwrap().0 + 1;
        self.epochs.push((epoch, self.next_seq - 1));
    }

    fn put(&mut self, meta: DocMeta, snapshot: Vec<u8>, signed: &SignedHeads) {
        self.put_appended(meta, snapshot, None, signed);
    }

    fn put_appended(
        &mut self,
        meta: DocMeta,
        snapshot: Vec<u8>,
        appended: Option<AppendedChanges>,
        signed: &SignedHeads,
    ) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let held = HeldDocument {
            meta: meta.clone(),
            snapshot,
            appended,
            signed: signed.encode(),
        };
        self.docs.insert(meta.id(), (seq, held));
    }

    /// Publishes (or extends) a document with `items` as `key`'s organisation.
    fn publish(&mut self, key: &PublisherKey, meta: &DocMeta, items: &[Item], time: i64) {
        let mut document = match self.docs.get(&meta.id()) {
            Some((_, held)) => {
                PublishedDocument::load_for_writing(meta, &held.snapshot, b"publisher").unwrap()
            }
            None => PublishedDocument::create(meta.clone(), b"publisher"),
        };
        document.update(items, &[], time);
        let signed = key.sign_heads(meta, &document.heads());
        self.put(meta.clone(), document.save(), &signed);
    }

    fn heads(&self, doc: DocId) -> Option<Vec<[u8; 32]>> {
        self.docs
            .get(&doc)
            .map(|(_, held)| SignedHeads::decode(&held.signed).unwrap().heads)
    }
}

impl SyncHost for MemoryHost {
    fn feed_id(&self) -> FeedId {
        self.feed
    }
    fn feed_epoch(&self) -> u64 {
        self.epochs.last().unwrap().0
    }
    fn feed_epoch_end(&mut self, epoch: u64) -> Result<EpochEnd, HostError> {
        let Some(at) = self.epochs.iter().position(|(e, _)| *e == epoch) else {
            return Ok(EpochEnd::Unknown);
        };
        Ok(match self.epochs.get(at + 1) {
            Some((_, next_starts_after)) => EpochEnd::EndedAt(*next_starts_after),
            None => EpochEnd::Current,
        })
    }
    fn feed_tip(&mut self) -> Result<u64, HostError> {
        Ok(self.next_seq - 1)
    }
    fn feed_after(&mut self, after: u64, limit: usize) -> Result<Vec<FeedEntry>, HostError> {
        let mut rows: Vec<FeedEntry> = self
            .docs
            .values()
            .filter(|(seq, _)| *seq > after)
            .map(|(seq, held)| FeedEntry {
                seq: *seq,
                meta: held.meta.clone(),
                heads: SignedHeads::decode(&held.signed).unwrap().heads,
            })
            .collect();
        rows.sort_by_key(|row| row.seq);
        rows.truncate(limit);
        Ok(rows)
    }
    fn backfill(&mut self, peer: &OdsCode, limit: usize) -> Result<Vec<FeedEntry>, HostError> {
        let queued = self.backfill.get(peer).cloned().unwrap_or_default();
        Ok(queued
            .iter()
            .take(limit)
            .filter_map(|doc| self.docs.get(doc))
            .map(|(seq, held)| FeedEntry {
                seq: *seq,
                meta: held.meta.clone(),
                heads: SignedHeads::decode(&held.signed).unwrap().heads,
            })
            .collect())
    }
    fn backfill_done(&mut self, peer: &OdsCode, docs: &[DocId]) -> Result<(), HostError> {
        if let Some(queued) = self.backfill.get_mut(peer) {
            queued.retain(|doc| !docs.contains(doc));
        }
        Ok(())
    }
    fn held_heads(&mut self, doc: DocId) -> Result<Option<Vec<[u8; 32]>>, HostError> {
        Ok(self.heads(doc))
    }
    fn document(&mut self, doc: DocId) -> Result<Option<HeldDocument>, HostError> {
        Ok(self.docs.get(&doc).map(|(_, held)| held.clone()))
    }
    fn commit(
        &mut self,
        peer: &OdsCode,
        documents: Vec<VerifiedDocument>,
        checkpoint: Option<Checkpoint>,
    ) -> Result<Vec<Refusal>, HostError> {
        self.commits += 1;
        for document in documents {
            let meta = document.signed.meta.clone();
            match document.bytes {
                VerifiedBytes::Whole { snapshot, .. } => self.put(meta, snapshot, &document.signed),
                VerifiedBytes::Appended(extension) => {
                    // As storage does: the held bytes, then the new changes.
                    let held = &self.docs[&meta.id()].1;
                    assert_eq!(
                        held.index().unwrap().stored_len,
                        extension.appended.base_len
                            + extension.appended.changes[..extension.already_held]
                                .iter()
                                .map(|c| c.len)
                                .sum::<u64>(),
                        "appended to the copy it extended"
                    );
                    let mut stored = held.snapshot.clone();
                    stored.extend_from_slice(&extension.new_bytes);
                    self.put_appended(meta, stored, Some(extension.appended), &document.signed);
                }
            }
        }
        if let Some(checkpoint) = checkpoint {
            self.checkpoints.insert(peer.clone(), checkpoint);
        }
        Ok(Vec::new())
    }
    fn checkpoint(&mut self, peer: &OdsCode) -> Result<Option<Checkpoint>, HostError> {
        Ok(self.checkpoints.get(peer).copied())
    }
    fn is_publisher_key(&self, publisher: &OdsCode, key: &[u8; 32]) -> bool {
        self.trusted.iter().any(|(o, k)| o == publisher && k == key)
    }
    fn decide(&self, meta: &DocMeta, recipient: &Recipient) -> Result<Decision, HostError> {
        if self.policy_unreadable.as_ref() == Some(&meta.patient) {
            return Err(HostError("the consent table could not be read".into()));
        }
        // Every node here publishes as a GP that shares with GPs and cares for every patient,
        // so the sharing rules that remain are the ones these tests are about (private items).
        let agreements = policy::Agreements {
            agreements: vec![policy::Agreement {
                publisher: OrgKind::Gp,
                recipients: vec![OrgKind::Gp],
                classes: vec![DataClass::Coded, DataClass::FreeText, DataClass::Document],
                except_sections: vec![],
            }],
            ..Default::default()
        };
        let facts = policy::Facts {
            publisher_kind: Some(OrgKind::Gp),
            consent: policy::Consent::SENT_BY_PUBLISHER,
            recipient_cares_for_patient: true,
            direct_from_publisher: false,
        };
        Ok(policy::decide(meta, recipient, &agreements, &facts))
    }
    fn registry_version(&self) -> u64 {
        1
    }
    fn registry_bytes(&self) -> Option<Vec<u8>> {
        None
    }
    fn loaded_documents(&mut self) -> Option<&mut crate::loaded::LoadedDocuments> {
        self.loaded.as_mut()
    }
    fn reads_items(&self, _meta: &DocMeta) -> bool {
        self.reads_items
    }

    fn planted_bug(&self) -> Option<PlantedBug> {
        self.planted
    }

    fn offer_registry(&mut self, _bytes: Vec<u8>) -> Result<bool, HostError> {
        Ok(false)
    }
}

fn recipient(ods: &str, kind: OrgKind) -> Recipient {
    Recipient {
        ods: OdsCode::parse(ods).unwrap(),
        kind,
    }
}

/// Two connected sessions and what crossed between them.
struct Link {
    a: Session,
    b: Session,
    frames_a_to_b: Vec<Message>,
    frames_b_to_a: Vec<Message>,
    now: u64,
}

impl Link {
    fn open(a: (&str, &mut MemoryHost), b: (&str, &mut MemoryHost)) -> Link {
        let a_session = Session::new(
            OdsCode::parse(a.0).unwrap(),
            recipient(b.0, OrgKind::Hub),
            0,
            a.1,
        )
        .unwrap();
        let b_session = Session::new(
            OdsCode::parse(b.0).unwrap(),
            recipient(a.0, OrgKind::Gp),
            0,
            b.1,
        )
        .unwrap();
        Link {
            a: a_session,
            b: b_session,
            frames_a_to_b: Vec::new(),
            frames_b_to_a: Vec::new(),
            now: 0,
        }
    }

    /// Moves frames both ways until neither side has anything to say.
    fn run(&mut self, a: &mut MemoryHost, b: &mut MemoryHost) {
        self.run_limited(a, b, usize::MAX);
    }

    /// As [`Link::run`], but stops after `limit` frames have been delivered.
    fn run_limited(&mut self, a: &mut MemoryHost, b: &mut MemoryHost, limit: usize) -> usize {
        let mut delivered = 0;
        loop {
            let mut moved = false;
            while delivered < limit
                && let Some(frame) = self.a.poll_transmit(self.now, a).unwrap()
            {
                self.frames_a_to_b.push(decode(&frame));
                self.b.handle_input(&frame, self.now, b).unwrap();
                delivered += 1;
                moved = true;
            }
            while delivered < limit
                && let Some(frame) = self.b.poll_transmit(self.now, b).unwrap()
            {
                self.frames_b_to_a.push(decode(&frame));
                self.a.handle_input(&frame, self.now, a).unwrap();
                delivered += 1;
                moved = true;
            }
            if !moved || delivered >= limit {
                return delivered;
            }
        }
    }

    /// Lets time pass so caught-up providers look at their feeds again.
    fn tick(&mut self, a: &mut MemoryHost, b: &mut MemoryHost) {
        self.now += FEED_CHECK_INTERVAL_MS;
        self.a.handle_timeout(self.now).unwrap();
        self.b.handle_timeout(self.now).unwrap();
        self.run(a, b);
    }
}

fn decode(frame: &[u8]) -> Message {
    let mut decoder = wire::FrameDecoder::default();
    decoder.push(frame);
    decoder.next_message().unwrap().unwrap()
}

/// Documents sent: wanted, or pushed ahead of their offer.
fn changes_sent(frames: &[Message]) -> usize {
    frames
        .iter()
        .filter(|m| matches!(m, Message::Changes { .. } | Message::Pushed { .. }))
        .count()
}

fn count_of(frames: &[Message], kind: &str) -> usize {
    frames.iter().filter(|m| m.kind() == kind).count()
}

fn wire_bytes(frames: &[Message]) -> usize {
    frames
        .iter()
        .map(|m| wire::encode_frame(m).unwrap().len())
        .sum()
}

fn gp_key() -> PublisherKey {
    PublisherKey::from_secret([1; 32])
}

/// The `index`th valid test NHS number (999 range, Modulus 11 check digit).
fn nhs_number(index: usize) -> crate::model::NhsNumber {
    (0..)
        .filter_map(|n| {
            let stem = format!("{:09}", 999_000_000 + index * 11 + n);
            let check = crate::model::NhsNumber::check_digit(stem.as_bytes())?;
            crate::model::NhsNumber::parse(&format!("{stem}{check}")).ok()
        })
        .next()
        .unwrap()
}

/// An item that belongs in `meta`'s document.
fn item_for(meta: &DocMeta, id: &str, title: &str) -> Item {
    let mut item = allergy(id, title);
    item.section = meta.section;
    item.class = meta.class;
    item
}

/// A GP host holding `documents` documents, one per patient.
fn gp_with(documents: usize) -> MemoryHost {
    let key = gp_key();
    let mut gp = MemoryHost::new(1, &[("A81001", &key)]);
    for index in 0..documents {
        let mut meta = meta_for("A81001", PATIENTS[0], Section::Allergies, DataClass::Coded);
        meta.patient = nhs_number(index);
        let item = item_for(&meta, &format!("i{index}"), "Penicillin allergy");
        gp.publish(&key, &meta, &[item], index as i64);
    }
    gp
}

fn hub() -> MemoryHost {
    MemoryHost::new(2, &[("A81001", &gp_key())])
}

#[test]
fn a_first_sync_copies_every_document_and_persists_the_checkpoint() {
    let mut gp = gp_with(20);
    let mut hub = hub();
    let mut link = Link::open(("A81001", &mut gp), ("HUB01", &mut hub));
    link.run(&mut gp, &mut hub);
    assert_eq!(hub.docs.len(), 20);
    for doc in gp.docs.keys() {
        assert_eq!(hub.heads(*doc), gp.heads(*doc));
    }
    let checkpoint = hub.checkpoints[&OdsCode::parse("A81001").unwrap()];
    assert_eq!(checkpoint.feed, gp.feed);
    assert_eq!(checkpoint.up_to, 20);
    assert_eq!(link.b.stats().pending_in(), 0);
    assert_eq!(link.a.stats().pending_out(), 0);
    // The GP pulled the hub's feed too; it holds all of it already, so nothing was sent back.
    assert_eq!(changes_sent(&link.frames_b_to_a), 0);
}

/// Finding: a document whose sharing rules could not be checked was left out of the offer,
/// and the offer's position moved the peer's checkpoint past it for good. Now the session
/// fails (and the connection closes), and after the fault the document still arrives.
#[test]
fn a_document_whose_rules_cannot_be_checked_stops_the_session_instead_of_being_skipped() {
    let mut gp = gp_with(20);
    let mut hub = hub();
    gp.policy_unreadable = Some(nhs_number(5));
    let mut link = Link::open(("A81001", &mut gp), ("HUB01", &mut hub));
    let error = loop {
        let mut moved = false;
        match link.a.poll_transmit(0, &mut gp) {
            Err(error) => break error,
            Ok(Some(frame)) => {
                link.b.handle_input(&frame, 0, &mut hub).unwrap();
                moved = true;
            }
            Ok(None) => {}
        }
        while let Some(frame) = link.b.poll_transmit(0, &mut hub).unwrap() {
            link.a.handle_input(&frame, 0, &mut gp).unwrap();
            moved = true;
        }
        assert!(
            moved,
            "the session went quiet without offering past the fault"
        );
    };
    assert!(error.to_string().contains("consent table"), "{error}");
    let doc_5 = gp
        .docs
        .iter()
        .find(|(_, (_, held))| held.meta.patient == nhs_number(5))
        .map(|(doc, (seq, _))| (*doc, *seq))
        .unwrap();
    let up_to = hub
        .checkpoints
        .get(&OdsCode::parse("A81001").unwrap())
        .map_or(0, |c| c.up_to);
    assert!(
        up_to < doc_5.1,
        "the checkpoint ({up_to}) passed the document"
    );

    // The fault clears; the node reconnects.
    gp.policy_unreadable = None;
    let mut link = Link::open(("A81001", &mut gp), ("HUB01", &mut hub));
    link.run(&mut gp, &mut hub);
    assert_eq!(hub.docs.len(), 20);
    assert_eq!(hub.heads(doc_5.0), gp.heads(doc_5.0));
}

/// Finding: a document over the frame limit never synced and nothing said so. The provider
/// answers it as missing (the rest of the feed flows) and reports it, for the node to make an
/// error the operator sees.
#[test]
fn a_document_too_large_for_a_frame_is_reported_not_dropped_quietly() {
    let mut gp = gp_with(3);
    let mut hub = hub();
    let (&big, _) = gp.docs.iter().next().unwrap();
    gp.docs.get_mut(&big).unwrap().1.snapshot = vec![0; crate::wire::MAX_FRAME_BYTES];
    let mut link = Link::open(("A81001", &mut gp), ("HUB01", &mut hub));
    link.run(&mut gp, &mut hub);
    assert_eq!(hub.docs.len(), 2, "the rest of the feed flows");
    assert!(hub.heads(big).is_none());
    let events: Vec<Event> = std::iter::from_fn(|| link.a.poll_event()).collect();
    assert!(
        events.iter().any(|event| matches!(
            event,
            Event::Unsendable { doc, bytes } if *doc == big && *bytes > crate::wire::MAX_FRAME_BYTES - 1024
        )),
        "{events:?}"
    );
}

#[test]
fn an_incremental_round_costs_the_change_not_the_documents_held() {
    let mut costs = Vec::new();
    for held in [10, 300] {
        let key = gp_key();
        let mut gp = gp_with(held);
        let mut hub = hub();
        let mut link = Link::open(("A81001", &mut gp), ("HUB01", &mut hub));
        link.run(&mut gp, &mut hub);
        let (before_ab, before_ba) = (link.frames_a_to_b.len(), link.frames_b_to_a.len());

        let meta = gp.docs.values().next().unwrap().1.meta.clone();
        let item = item_for(&meta, "new", "Latex allergy");
        gp.publish(&key, &meta, &[item], 1_000);
        link.a.feed_changed();
        link.run(&mut gp, &mut hub);

        let round_ab = &link.frames_a_to_b[before_ab..];
        let round_ba = &link.frames_b_to_a[before_ba..];
        assert_eq!(
            changes_sent(round_ab),
            1,
            "only the changed document travels"
        );
        assert_eq!(hub.heads(meta.id()), gp.heads(meta.id()));
        costs.push((
            wire_bytes(round_ab) + wire_bytes(round_ba),
            round_ab.len() + round_ba.len(),
        ));
    }
    // Feed positions are varints, so a bigger feed may cost a byte or two more per message.
    assert_eq!(costs[0].1, costs[1].1, "messages in an incremental round");
    assert!(
        costs[1].0.abs_diff(costs[0].0) <= 8,
        "bytes of an incremental round at 10 and 300 documents held: {costs:?}"
    );
}

/// Finding (the hub's profile): a new version of a held document was loaded twice, once to
/// see whether the offer was news (the loaded copy was taken out of the cache and dropped)
/// and again to apply the changes the Want brought. A hub keeping the document loaded now
/// loads it for neither.
#[test]
fn a_new_version_of_a_document_kept_loaded_is_not_loaded_again() {
    let key = gp_key();
    let mut gp = gp_with(5);
    let mut hub = hub();
    hub.loaded = Some(crate::loaded::LoadedDocuments::new(16));
    let mut link = Link::open(("A81001", &mut gp), ("HUB01", &mut hub));
    link.run(&mut gp, &mut hub);
    let loaded = |hub: &MemoryHost| hub.loaded.as_ref().unwrap().hits_and_misses();
    let (_, misses_before) = loaded(&hub);

    let meta = gp.docs.values().next().unwrap().1.meta.clone();
    gp.publish(
        &key,
        &meta,
        &[item_for(&meta, "new", "Latex allergy")],
        1_000,
    );
    link.a.feed_changed();
    link.run(&mut gp, &mut hub);

    assert_eq!(hub.heads(meta.id()), gp.heads(meta.id()));
    let (hits, misses) = loaded(&hub);
    assert_eq!(
        misses, misses_before,
        "the hub loaded the document again ({hits} hits)"
    );
}

/// Items are checked where they are read. A relay that reads none of a partition's (a hub's
/// clinical partitions: `SyncHost::reads_items`) stores and passes on a correctly signed
/// document whose item is malformed; a node that reads them refuses it on receipt, as a
/// relay that reads them does. The signature and heads are checked at every hop.
#[test]
fn a_malformed_item_is_refused_where_items_are_read_and_passed_on_by_a_relay_that_reads_none() {
    let key = gp_key();
    let mut gp = MemoryHost::new(1, &[("A81001", &key)]);
    let meta = meta_for("A81001", PATIENTS[0], Section::Allergies, DataClass::Coded);
    let mut document = PublishedDocument::create(meta.clone(), b"publisher");
    document.update(&[item_for(&meta, "good", "Penicillin allergy")], &[], 1);
    document.put_raw_item("bad", "{not an item");
    gp.put(
        meta.clone(),
        document.save(),
        &key.sign_heads(&meta, &document.heads()),
    );

    let mut reading = hub();
    let mut link = Link::open(("A81001", &mut gp), ("HUB01", &mut reading));
    link.run(&mut gp, &mut reading);
    assert!(reading.docs.is_empty(), "a hub reading items refuses it");
    assert_eq!(link.b.stats().rejected, 1);

    let mut relay = hub();
    relay.reads_items = false;
    let mut link = Link::open(("A81001", &mut gp), ("HUB01", &mut relay));
    link.run(&mut gp, &mut relay);
    assert_eq!(
        relay.heads(meta.id()),
        gp.heads(meta.id()),
        "relayed as signed"
    );
    assert_eq!(link.b.stats().rejected, 0);

    let mut downstream = MemoryHost::new(3, &[("A81001", &key)]);
    let mut link = Link::open(("HUB01", &mut relay), ("B82002", &mut downstream));
    link.run(&mut relay, &mut downstream);
    assert!(downstream.docs.is_empty(), "the node reading it refuses it");
    assert_eq!(link.b.stats().rejected, 1);
}

/// Syncs `a` into `b` over a fresh link; returns the link for what crossed it.
fn sync_once(a: (&str, &mut MemoryHost), b: (&str, &mut MemoryHost)) -> Link {
    let mut link = Link::open((a.0, &mut *a.1), (b.0, &mut *b.1));
    link.run(a.1, b.1);
    link
}

/// A GP that published one version of `meta`'s document, and a hub that reads no items.
fn a_gp_and_a_relay(meta: &DocMeta) -> (MemoryHost, MemoryHost) {
    let key = gp_key();
    let mut gp = MemoryHost::new(1, &[("A81001", &key)]);
    gp.publish(&key, meta, &[item_for(meta, "a", "Penicillin allergy")], 1);
    let mut relay = hub();
    relay.reads_items = false;
    (gp, relay)
}

/// The heads the stored bytes of `doc` at `host` load to, beside the heads it says it holds.
fn loaded_and_signed_heads(host: &MemoryHost, doc: DocId) -> (Vec<[u8; 32]>, Vec<[u8; 32]>) {
    let held = &host.docs[&doc].1;
    let loaded = PublishedDocument::load(&held.meta, &held.snapshot).unwrap();
    (loaded.heads(), host.heads(doc).unwrap())
}

/// A relay (a node that reads no items of the partition: a hub) stores a new version as
/// the publisher's change bytes appended to what it holds, checked by their hash chain
/// against the signed heads, and serves a holder of an older version those bytes without
/// loading the document; a first copy from it loads whole at a reading node.
#[test]
fn a_relay_appends_new_versions_it_checked_by_hash_chain_and_serves_them_as_appended() {
    let key = gp_key();
    let meta = meta_for("A81001", PATIENTS[0], Section::Allergies, DataClass::Coded);
    let doc = meta.id();
    let (mut gp, mut relay) = a_gp_and_a_relay(&meta);
    let mut reader = MemoryHost::new(3, &[("A81001", &key)]);
    sync_once(("A81001", &mut gp), ("HUB01", &mut relay));
    sync_once(("HUB01", &mut relay), ("B82002", &mut reader));
    let first = relay.docs[&doc].1.clone();
    assert!(
        first.appended.is_none(),
        "a first copy is checked and saved whole"
    );

    for version in 2..=3 {
        let title = format!("Penicillin allergy, reaction {version}");
        let before = gp.heads(doc).unwrap();
        gp.publish(&key, &meta, &[item_for(&meta, "a", &title)], version);
        let gp_doc = PublishedDocument::load(&meta, &gp.docs[&doc].1.snapshot).unwrap();
        let change = gp_doc.changes_since(&before);

        let link = sync_once(("A81001", &mut gp), ("HUB01", &mut relay));
        assert_eq!(link.b.stats().rejected, 0);
        let held = relay.docs[&doc].1.clone();
        let appended = held.appended.clone().expect("appended, not saved whole");
        assert_eq!(appended.changes.len(), version as usize - 1);
        assert!(
            held.snapshot.starts_with(&first.snapshot),
            "the held bytes are kept"
        );
        assert!(
            held.snapshot.ends_with(&change[0]),
            "the publisher's change bytes"
        );
        let (loaded, signed) = loaded_and_signed_heads(&relay, doc);
        assert_eq!(loaded, signed);
        assert_eq!(signed, gp.heads(doc).unwrap());

        // The reader, one version behind, gets exactly the publisher's change.
        let link = sync_once(("HUB01", &mut relay), ("B82002", &mut reader));
        let sent: Vec<&Vec<Vec<u8>>> = link
            .frames_a_to_b
            .iter()
            .filter_map(|m| match m {
                Message::Changes { changes, .. } => Some(changes),
                _ => None,
            })
            .collect();
        assert_eq!(sent, vec![&change]);
        assert_eq!(reader.heads(doc), gp.heads(doc));
    }
    // A new reader's first copy is the saved document and both appended changes, in one.
    let mut late = MemoryHost::new(4, &[("A81001", &key)]);
    sync_once(("HUB01", &mut relay), ("B82003", &mut late));
    let (loaded, signed) = loaded_and_signed_heads(&late, doc);
    assert_eq!((loaded, signed.clone()), (gp.heads(doc).unwrap(), signed));
    let items = PublishedDocument::load(&meta, &late.docs[&doc].1.snapshot)
        .unwrap()
        .items()
        .unwrap();
    assert_eq!(items[0].title, "Penicillin allergy, reaction 3");
}

/// A peer that sends well-formed changes other than the publisher's (here each stamped a
/// second later, so their hashes differ) is caught by the relay's heads check and nothing
/// of it is stored; with that check skipped (a planted bug) the relay would store bytes that
/// do not load to the signed heads, which is what the check is for.
#[test]
fn a_relay_refuses_changes_whose_hash_chain_does_not_end_at_the_signed_heads() {
    let key = gp_key();
    let meta = meta_for("A81001", PATIENTS[0], Section::Allergies, DataClass::Coded);
    let doc = meta.id();
    for skip_heads_check in [false, true] {
        let (mut gp, mut relay) = a_gp_and_a_relay(&meta);
        sync_once(("A81001", &mut gp), ("HUB01", &mut relay));
        let held = relay.docs[&doc].1.snapshot.clone();

        gp.publish(
            &key,
            &meta,
            &[item_for(&meta, "a", "Amoxicillin allergy")],
            2,
        );
        gp.planted = Some(PlantedBug::ForgeChanges);
        if skip_heads_check {
            relay.planted = Some(PlantedBug::RelayWithoutHeadsCheck);
        }
        let link = sync_once(("A81001", &mut gp), ("HUB01", &mut relay));
        let (loaded, signed) = loaded_and_signed_heads(&relay, doc);
        if skip_heads_check {
            assert_eq!(
                signed,
                gp.heads(doc).unwrap(),
                "stored under the signed heads"
            );
            assert_ne!(loaded, signed, "bytes that are not the publisher's");
        } else {
            assert_eq!(link.b.stats().rejected, 1);
            assert_eq!(loaded, signed);
            assert_eq!(relay.docs[&doc].1.snapshot, held, "nothing of it stored");
            assert_ne!(signed, gp.heads(doc).unwrap());
        }
    }
}

#[test]
fn an_interrupted_transfer_resumes_without_resending_what_was_stored() {
    let mut gp = gp_with(300);
    let mut hub = hub();
    let mut link = Link::open(("A81001", &mut gp), ("HUB01", &mut hub));
    link.run_limited(&mut gp, &mut hub, 200);
    let sent_before = changes_sent(&link.frames_a_to_b);
    let held_before = hub.docs.len();
    assert!(held_before > 0 && held_before < 300, "cut mid-transfer");
    // The connection drops: whatever the hub had not committed is gone with its session.
    drop(link);

    let mut link = Link::open(("A81001", &mut gp), ("HUB01", &mut hub));
    link.run(&mut gp, &mut hub);
    assert_eq!(hub.docs.len(), 300);
    let resent = changes_sent(&link.frames_a_to_b);
    assert!(
        resent <= 300 - held_before,
        "{resent} documents sent after resuming with {held_before} of 300 stored ({sent_before} sent before)"
    );
}

/// A disk that reported syncs it never made: the GP lost the documents at positions 16 to 20
/// after the hub had taken them, and three new documents took positions 16 to 18 again.
/// Without epochs the hub, resuming after 20, would never be offered them (and before this a
/// feed found behind a checkpoint stopped the session as a protocol error, on every
/// reconnect). Now the GP resumes the hub from 15, where the hub's epoch ended, and says so;
/// the lost documents come back to the GP from the hub.
#[test]
fn a_feed_that_lost_positions_a_peer_had_taken_is_served_again_from_where_they_agree() {
    let key = gp_key();
    let mut gp = gp_with(20);
    let mut hub = hub();
    let mut link = Link::open(("A81001", &mut gp), ("HUB01", &mut hub));
    link.run(&mut gp, &mut hub);
    let gp_ods = OdsCode::parse("A81001").unwrap();
    assert_eq!(hub.checkpoints[&gp_ods].up_to, 20);
    drop(link);

    gp.restart_losing_writes_after(15);
    let mut fresh = Vec::new();
    for index in 100..103 {
        let mut meta = meta_for("A81001", PATIENTS[0], Section::Problems, DataClass::Coded);
        meta.patient = nhs_number(index);
        gp.publish(&key, &meta, &[item_for(&meta, "p", "Asthma")], 1_000);
        fresh.push(meta.id());
    }
    assert_eq!(
        gp.feed_tip().unwrap(),
        18,
        "positions 16 to 18 handed out again"
    );

    let mut link = Link::open(("A81001", &mut gp), ("HUB01", &mut hub));
    link.run(&mut gp, &mut hub);
    assert!(link.frames_a_to_b.contains(&Message::Resume { after: 15 }));
    let gp_events: Vec<Event> = std::iter::from_fn(|| link.a.poll_event()).collect();
    assert!(gp_events.contains(&Event::PeerWasAhead {
        had: 20,
        resumed_after: 15
    }));
    let hub_events: Vec<Event> = std::iter::from_fn(|| link.b.poll_event()).collect();
    assert!(hub_events.contains(&Event::FeedWentBack {
        had: 20,
        resumed_after: 15
    }));
    for doc in &fresh {
        assert!(
            hub.heads(*doc).is_some(),
            "a document at a reused position reached the hub"
        );
    }
    assert_eq!(hub.docs.len(), 23);
    assert_eq!(gp.docs.len(), 23, "what the GP lost came back from the hub");
    let checkpoint = hub.checkpoints[&gp_ods];
    assert_eq!(
        (checkpoint.epoch, checkpoint.up_to),
        (2, gp.feed_tip().unwrap())
    );

    // A restart that lost nothing changes nothing: the hub resumes where it was.
    gp.restart();
    let mut link = Link::open(("A81001", &mut gp), ("HUB01", &mut hub));
    link.run(&mut gp, &mut hub);
    let at = hub.checkpoints[&gp_ods].up_to;
    assert!(link.frames_a_to_b.contains(&Message::Resume { after: at }));
    assert_eq!(changes_sent(&link.frames_a_to_b), 0);
}

#[test]
fn a_resume_past_the_pulled_position_or_an_offer_before_resume_is_a_protocol_error() {
    let mut hub = hub();
    let hello = |session: &mut Session, hub: &mut MemoryHost| {
        let frame = wire::encode_frame(&Message::Hello {
            node: OdsCode::parse("A81001").unwrap(),
            feed: FeedId([1; 16]),
            epoch: 1,
            registry_version: 0,
        })
        .unwrap();
        session.handle_input(&frame, 0, hub).unwrap();
    };
    let mut session = hub_session_with_gp(&mut hub);
    hello(&mut session, &mut hub);
    let resume = wire::encode_frame(&Message::Resume { after: 5 }).unwrap();
    assert!(matches!(
        session.handle_input(&resume, 0, &mut hub),
        Err(SessionError::Protocol(reason)) if reason.contains("past the position 0")
    ));
    let mut session = hub_session_with_gp(&mut hub);
    hello(&mut session, &mut hub);
    let offer = wire::encode_frame(&Message::Offer {
        entries: Vec::new(),
        up_to: 3,
        tip: 3,
    })
    .unwrap();
    assert!(matches!(
        session.handle_input(&offer, 0, &mut hub),
        Err(SessionError::Protocol(reason)) if reason.contains("before Resume")
    ));
}

#[test]
fn a_document_with_a_forged_signature_is_rejected_and_nothing_of_it_is_stored() {
    let key = gp_key();
    let forger = PublisherKey::from_secret([66; 32]);
    let mut gp = gp_with(2);
    let meta = meta_for("A81001", "9434765919", Section::Alerts, DataClass::Coded);
    // Signed with a key the registry does not list for A81001.
    let mut forged = PublishedDocument::create(meta.clone(), b"forger");
    forged.update(&[item_for(&meta, "x", "forged")], &[], 5);
    gp.put(
        meta.clone(),
        forged.save(),
        &forger.sign_heads(&meta, &forged.heads()),
    );
    // And one whose signature bytes were altered.
    let tampered_meta = meta_for("A81001", "9434765919", Section::Problems, DataClass::Coded);
    let mut tampered = PublishedDocument::create(tampered_meta.clone(), b"publisher");
    tampered.update(&[item_for(&tampered_meta, "y", "tampered")], &[], 5);
    let mut signed = key.sign_heads(&tampered_meta, &tampered.heads());
    signed.signature[3] ^= 1;
    gp.put(tampered_meta.clone(), tampered.save(), &signed);

    let mut hub = hub();
    let mut link = Link::open(("A81001", &mut gp), ("HUB01", &mut hub));
    link.run(&mut gp, &mut hub);
    assert_eq!(
        hub.docs.len(),
        2,
        "only the two genuine documents are stored"
    );
    assert!(!hub.docs.contains_key(&meta.id()));
    assert!(!hub.docs.contains_key(&tampered_meta.id()));
    assert_eq!(link.b.stats().rejected, 2);
    let mut rejected = Vec::new();
    while let Some(event) = link.b.poll_event() {
        if let Event::Rejected { doc, reason, .. } = event {
            rejected.push((doc, reason));
        }
    }
    assert_eq!(rejected.len(), 2);
    assert!(
        rejected
            .iter()
            .any(|(doc, reason)| *doc == meta.id() && reason.contains("not a trusted key"))
    );
    assert!(
        rejected
            .iter()
            .any(|(doc, reason)| *doc == tampered_meta.id() && reason.contains("does not verify"))
    );
}

#[test]
fn a_version_arriving_by_two_paths_is_stored_once_and_order_does_not_matter() {
    let key = gp_key();
    let mut gp = gp_with(5);
    let mut hub = hub();
    let mut link = Link::open(("A81001", &mut gp), ("HUB01", &mut hub));
    link.run(&mut gp, &mut hub);
    // A newer version reaches the acute trust straight from the GP first...
    let meta = gp.docs.values().next().unwrap().1.meta.clone();
    let item = item_for(&meta, "later", "Latex allergy");
    gp.publish(&key, &meta, &[item], 99);
    let mut acute = MemoryHost::new(3, &[("A81001", &key)]);
    let mut direct = Link::open(("A81001", &mut gp), ("RTH01", &mut acute));
    direct.run(&mut gp, &mut acute);
    assert_eq!(acute.docs.len(), 5);
    // ...then the hub, still holding the older version, offers everything it has.
    let mut via_hub = Link::open(("HUB01", &mut hub), ("RTH01", &mut acute));
    via_hub.run(&mut hub, &mut acute);
    assert_eq!(
        changes_sent(&via_hub.frames_a_to_b),
        0,
        "the acute trust wants nothing older than it holds"
    );
    assert_eq!(acute.heads(meta.id()), gp.heads(meta.id()));
}

#[test]
fn private_documents_are_never_offered_and_never_sent_even_when_asked_for() {
    let key = gp_key();
    let mut gp = gp_with(1);
    let private = meta_for(
        "A81001",
        "9912003888",
        Section::Problems,
        DataClass::Private,
    );
    let item = item_for(&private, "p", "private note");
    gp.publish(&key, &private, &[item], 1);
    let mut hub = hub();
    let mut link = Link::open(("A81001", &mut gp), ("HUB01", &mut hub));
    link.run(&mut gp, &mut hub);
    assert_eq!(hub.docs.len(), 1);
    assert!(!hub.docs.contains_key(&private.id()));
    for frame in &link.frames_a_to_b {
        if let Message::Offer { entries, .. } = frame {
            assert!(entries.iter().all(|e| e.doc != private.id()));
        }
    }
    // A peer that asks for the private document by id gets told it is missing.
    link.b.control.push_back(Message::Want {
        docs: vec![WantEntry {
            doc: private.id(),
            have: vec![],
        }],
    });
    link.b.batches.push_back(Batch {
        up_to: link.b.checkpoint.up_to,
        pending: [private.id()].into(),
    });
    link.run(&mut gp, &mut hub);
    assert!(!hub.docs.contains_key(&private.id()));
    assert!(
        link.frames_a_to_b
            .iter()
            .any(|m| *m == Message::Missing { doc: private.id() })
    );
}

#[test]
fn changes_kept_from_a_peer_cost_it_no_frame_per_change_only_a_periodic_announcement() {
    let key = gp_key();
    let mut gp = gp_with(1);
    let mut hub = hub();
    let mut link = Link::open(("A81001", &mut gp), ("HUB01", &mut hub));
    link.run(&mut gp, &mut hub);
    let frames_before = link.frames_a_to_b.len();
    // Ten changes the hub may not hold (private), each noticed by the provider at once.
    for index in 0..10 {
        let private = meta_for("A81001", PATIENTS[1], Section::Problems, DataClass::Private);
        let item = item_for(&private, &format!("p{index}"), "private note");
        gp.publish(&key, &private, &[item], 10 + index);
        link.a.feed_changed();
        link.run(&mut gp, &mut hub);
    }
    // Ten changes (each its own wake-up) cost at most one position-only offer: the first
    // announcement of the interval.
    let offers = |frames: &[Message], with_entries: bool| {
        frames
            .iter()
            .filter(|m| matches!(m, Message::Offer { entries, .. } if entries.is_empty() != with_entries))
            .count()
    };
    let during = &link.frames_a_to_b[frames_before..];
    assert_eq!(offers(during, true), 0, "no offer of changes kept back");
    assert!(
        offers(during, false) <= 1,
        "{} announcements",
        offers(during, false)
    );
    let position = gp.next_seq - 1;
    // Over the next interval the position reaches the peer, once.
    for _ in 0..(ANNOUNCE_INTERVAL_MS / FEED_CHECK_INTERVAL_MS) {
        link.tick(&mut gp, &mut hub);
    }
    let all = &link.frames_a_to_b[frames_before..];
    assert_eq!(offers(all, true), 0, "no offer of changes kept back");
    assert!(
        offers(all, false) <= 2,
        "{} announcements",
        offers(all, false)
    );
    assert_eq!(link.b.checkpoint.up_to, position);
    assert!(hub.docs.len() == 1, "the private documents never left");
}

#[test]
fn new_documents_flow_to_a_caught_up_peer_after_the_feed_check_interval() {
    let key = gp_key();
    let mut gp = gp_with(3);
    let mut hub = hub();
    let mut link = Link::open(("A81001", &mut gp), ("HUB01", &mut hub));
    link.run(&mut gp, &mut hub);
    let meta = meta_for("A81001", "6700028191", Section::Alerts, DataClass::Coded);
    let item = item_for(&meta, "late", "late alert");
    gp.publish(&key, &meta, &[item], 7);
    link.run(&mut gp, &mut hub);
    assert!(!hub.docs.contains_key(&meta.id()), "not yet looked");
    assert!(link.a.poll_timeout().is_some());
    link.tick(&mut gp, &mut hub);
    assert!(hub.docs.contains_key(&meta.id()));
}

#[test]
fn backfilled_documents_reach_a_peer_whose_checkpoint_passed_them_and_leave_the_queue_on_ack() {
    let mut gp = gp_with(6);
    let mut hub = hub();
    let mut link = Link::open(("A81001", &mut gp), ("HUB01", &mut hub));
    link.run(&mut gp, &mut hub);
    assert_eq!(hub.docs.len(), 6);
    // Two documents the hub's checkpoint has passed go missing there (as if withheld when
    // offered); the GP queues them, and one the hub still holds, for the hub.
    let gp_docs: Vec<DocId> = gp.docs.keys().copied().collect();
    hub.docs.remove(&gp_docs[0]);
    hub.docs.remove(&gp_docs[1]);
    gp.backfill.insert(
        OdsCode::parse("HUB01").unwrap(),
        vec![gp_docs[0], gp_docs[1], gp_docs[2]],
    );
    let sent_before = changes_sent(&link.frames_a_to_b);
    link.tick(&mut gp, &mut hub);
    assert_eq!(hub.docs.len(), 6, "both missing documents came back");
    assert_eq!(
        changes_sent(&link.frames_a_to_b) - sent_before,
        2,
        "the one the hub held was skipped by its heads"
    );
    assert!(gp.backfill[&OdsCode::parse("HUB01").unwrap()].is_empty());
    // The feed position did not move: the checkpoint is where it was.
    let checkpoint = hub.checkpoints[&OdsCode::parse("A81001").unwrap()];
    assert_eq!(checkpoint.up_to, 6);
}

/// A hub's session with the GP, fresh (no Hello received yet).
fn hub_session_with_gp(host: &mut MemoryHost) -> Session {
    Session::new(
        OdsCode::parse("HUB01").unwrap(),
        recipient("A81001", OrgKind::Gp),
        0,
        host,
    )
    .unwrap()
}

#[test]
fn a_peer_claiming_another_identity_or_sending_garbage_is_an_error_not_a_panic() {
    let mut gp = gp_with(1);
    let mut hub = hub();
    let mut session = hub_session_with_gp(&mut hub);
    let impostor = wire::encode_frame(&Message::Hello {
        node: OdsCode::parse("B81002").unwrap(),
        feed: gp.feed,
        epoch: 1,
        registry_version: 1,
    })
    .unwrap();
    assert!(matches!(
        session.handle_input(&impostor, 0, &mut hub),
        Err(SessionError::Impersonation { .. })
    ));

    let mut session = hub_session_with_gp(&mut hub);
    assert!(matches!(
        session.handle_input(&[0, 0, 0, 2, 1, 200], 0, &mut hub),
        Err(SessionError::Wire(_))
    ));
    let mut session = hub_session_with_gp(&mut hub);
    assert!(matches!(
        session.handle_input(&[0xff, 0xff, 0xff, 0xff], 0, &mut hub),
        Err(SessionError::Wire(WireError::FrameTooLarge(_)))
    ));
    // Silence is an error once the Hello deadline passes.
    let mut quiet = hub_session_with_gp(&mut gp);
    assert_eq!(quiet.poll_timeout(), Some(HELLO_TIMEOUT_MS));
    assert_eq!(
        quiet.handle_timeout(HELLO_TIMEOUT_MS),
        Err(SessionError::HelloTimeout)
    );
}

#[test]
fn a_slow_peer_bounds_what_the_provider_has_in_flight() {
    let mut gp = gp_with(3000);
    let mut hub = hub();
    let mut link = Link::open(("A81001", &mut gp), ("HUB01", &mut hub));
    // The hub never answers: the GP stops after its Hello, Pull and the offers allowed.
    let mut frames = 0;
    link.b.handle_input(&[], 0, &mut hub).unwrap();
    let hub_hello = link.b.poll_transmit(0, &mut hub).unwrap().unwrap();
    let hub_pull = link.b.poll_transmit(0, &mut hub).unwrap().unwrap();
    link.a.handle_input(&hub_hello, 0, &mut gp).unwrap();
    link.a.handle_input(&hub_pull, 0, &mut gp).unwrap();
    while link.a.poll_transmit(0, &mut gp).unwrap().is_some() {
        frames += 1;
        assert!(frames < 100, "provider kept producing for a silent peer");
    }
    // Hello, Pull, Resume, then at most the offers the window allows.
    assert!(frames <= 3 + MAX_OUTSTANDING_OFFERS);
}

#[test]
fn a_version_stored_through_another_session_while_wanted_is_kept_not_rejected() {
    let key = gp_key();
    let mut gp = gp_with(1);
    let mut hub = hub();
    let mut link = Link::open(("A81001", &mut gp), ("HUB01", &mut hub));
    link.run(&mut gp, &mut hub);
    let meta = gp.docs.values().next().unwrap().1.meta.clone();
    gp.publish(
        &key,
        &meta,
        &[item_for(&meta, "later", "Latex allergy")],
        99,
    );
    let mut acute = MemoryHost::new(3, &[("A81001", &key)]);

    // The acute trust asks the hub for its (older) version...
    let mut via_hub = Link::open(("HUB01", &mut hub), ("RTH01", &mut acute));
    while !via_hub
        .frames_b_to_a
        .iter()
        .any(|m| matches!(m, Message::Want { .. }))
    {
        assert_eq!(
            via_hub.run_limited(&mut hub, &mut acute, 1),
            1,
            "a Want is sent"
        );
    }
    // ...the newer version arrives straight from the GP before the hub answers...
    let mut direct = Link::open(("A81001", &mut gp), ("RTH01", &mut acute));
    direct.run(&mut gp, &mut acute);
    assert_eq!(acute.heads(meta.id()), gp.heads(meta.id()));
    // ...and the hub's answer, computed for a copy the trust no longer holds, is no forgery.
    via_hub.run(&mut hub, &mut acute);
    assert!(
        changes_sent(&via_hub.frames_a_to_b) >= 1,
        "the hub answered the Want"
    );
    assert_eq!(via_hub.b.stats().rejected, 0);
    assert_eq!(via_hub.b.stats().already_held, 1);
    assert_eq!(
        acute.heads(meta.id()),
        gp.heads(meta.id()),
        "newer copy kept"
    );
    assert_eq!(via_hub.b.stats().pending_in(), 0, "the Want was resolved");
}

/// Within a session, the provider knows what the peer holds of the documents it offered:
/// the next version goes with its offer, and the Want's round trip is gone. What crosses
/// is what a Want would have brought.
#[test]
fn a_new_version_of_a_document_the_peer_holds_travels_ahead_of_its_offer() {
    let key = gp_key();
    for relays in [true, false] {
        let meta = meta_for("A81001", PATIENTS[0], Section::Allergies, DataClass::Coded);
        let doc = meta.id();
        let (mut gp, mut hub) = a_gp_and_a_relay(&meta);
        hub.reads_items = !relays;
        let mut link = Link::open(("A81001", &mut gp), ("HUB01", &mut hub));
        link.run(&mut gp, &mut hub);
        for version in 2..=4 {
            let (before_ab, before_ba) = (link.frames_a_to_b.len(), link.frames_b_to_a.len());
            let item = item_for(
                &meta,
                "a",
                &format!("Penicillin allergy, reaction {version}"),
            );
            gp.publish(&key, &meta, &[item], version);
            link.a.feed_changed();
            link.run(&mut gp, &mut hub);
            let (round_ab, round_ba) = (
                &link.frames_a_to_b[before_ab..],
                &link.frames_b_to_a[before_ba..],
            );
            assert_eq!(count_of(round_ab, "pushed"), 1, "version {version}");
            assert_eq!(count_of(round_ab, "changes"), 0, "version {version}");
            assert_eq!(count_of(round_ba, "want"), 0, "no Want: {round_ba:?}");
            assert_eq!(hub.heads(doc), gp.heads(doc), "version {version}");
            let (loaded, signed) = loaded_and_signed_heads(&hub, doc);
            assert_eq!(loaded, signed, "the bytes held load to the signed heads");
        }
        assert_eq!(link.a.stats().documents_pushed, 3);
        assert_eq!(link.b.stats().documents_received, 4);
        assert_eq!(link.b.stats().pushes_not_taken, 0);
    }
}

/// A push made for a copy the peer no longer holds (here it lost the document) is left: the
/// offer that follows wants it, and the whole document comes as it would have.
#[test]
fn a_version_pushed_onto_a_copy_the_peer_does_not_hold_is_left_and_wanted() {
    let key = gp_key();
    let meta = meta_for("A81001", PATIENTS[0], Section::Allergies, DataClass::Coded);
    let doc = meta.id();
    let (mut gp, mut hub) = a_gp_and_a_relay(&meta);
    let mut link = Link::open(("A81001", &mut gp), ("HUB01", &mut hub));
    link.run(&mut gp, &mut hub);
    hub.docs.remove(&doc);
    let before_ba = link.frames_b_to_a.len();
    gp.publish(
        &key,
        &meta,
        &[item_for(&meta, "a", "Amoxicillin allergy")],
        2,
    );
    link.a.feed_changed();
    link.run(&mut gp, &mut hub);
    assert_eq!(link.b.stats().pushes_not_taken, 1);
    assert_eq!(link.b.stats().rejected, 0, "not a rejection");
    let wants: Vec<&Message> = link.frames_b_to_a[before_ba..]
        .iter()
        .filter(|m| m.kind() == "want")
        .collect();
    assert!(
        matches!(wants.as_slice(), [Message::Want { docs }] if docs[0].have.is_empty()),
        "{wants:?}"
    );
    assert_eq!(hub.heads(doc), gp.heads(doc));
}

/// A pushed version is checked as wanted changes are: changes that do not hash to the
/// signed heads are rejected at a relay and nothing of them is stored; with the relay's heads
/// check skipped (a planted bug) they would be stored, which is what the check is for.
#[test]
fn a_pushed_version_whose_changes_do_not_give_the_signed_heads_is_rejected() {
    let key = gp_key();
    let meta = meta_for("A81001", PATIENTS[0], Section::Allergies, DataClass::Coded);
    let doc = meta.id();
    for skip_heads_check in [false, true] {
        let (mut gp, mut relay) = a_gp_and_a_relay(&meta);
        let mut link = Link::open(("A81001", &mut gp), ("HUB01", &mut relay));
        link.run(&mut gp, &mut relay);
        let held = relay.docs[&doc].1.snapshot.clone();
        gp.publish(
            &key,
            &meta,
            &[item_for(&meta, "a", "Amoxicillin allergy")],
            2,
        );
        gp.planted = Some(PlantedBug::ForgeChanges);
        if skip_heads_check {
            relay.planted = Some(PlantedBug::RelayWithoutHeadsCheck);
        }
        link.a.feed_changed();
        link.run(&mut gp, &mut relay);
        assert_eq!(link.a.stats().documents_pushed, 1);
        let (loaded, signed) = loaded_and_signed_heads(&relay, doc);
        if skip_heads_check {
            assert_eq!(signed, gp.heads(doc).unwrap());
            assert_ne!(loaded, signed, "bytes that are not the publisher's");
        } else {
            // The push, then the changes the offer that followed it wanted.
            assert_eq!(link.b.stats().rejected, 2);
            assert_eq!(relay.docs[&doc].1.snapshot, held, "nothing of it stored");
            assert_eq!(loaded, signed);
        }
    }
}
