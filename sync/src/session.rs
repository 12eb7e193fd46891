//! The sync session: one per connected peer, sans-IO.
//!
//! A session speaks both roles at once over one ordered byte stream:
//!
//! * **puller**: it subscribes to the peer's changes feed after its checkpoint, compares each
//!   offered document version with what it holds, asks only for what it lacks, verifies every
//!   document against the publisher's key in the trust registry, stores it, and only then
//!   advances (and persists, in the same transaction) its checkpoint and acknowledges;
//! * **provider**: it walks its own feed from the peer's position, passes every document
//!   through the policy decision for this peer, offers what may be sent, and answers wants
//!   with only the changes the peer lacks.
//!
//! ```text
//!  puller                      provider
//!    Hello, Pull{feed, epoch, since} ──▶
//!                           ◀── Resume{after}                  (since, or earlier: see below)
//!                           ◀── Offer{entries, up_to, tip}     (≤ MAX_OUTSTANDING_OFFERS ahead)
//!    Want{doc, have heads}   ──▶
//!                           ◀── Changes{meta, changes, signed} (one per wanted document)
//!    Ack{up_to}              ──▶                               (after the batch is durable)
//! ```
//!
//! Cost: a round after a small change touches only the feed entries after the checkpoint and
//! the changes the puller lacks; nothing is proportional to the number of documents held.
//! Arrival order does not matter and a version arriving twice is skipped by the heads check.
//!
//! A feed never hands a position out twice while its database keeps what it wrote. When it
//! did not (a disk that reported a sync it never made, a restore from a backup), positions a
//! puller had taken were handed out again to other documents. Each opening of a database for
//! writing begins a feed epoch, and a checkpoint names the epoch it was taken in: a provider
//! whose feed ended that epoch before the puller's position resumes from where the epoch
//! ended ([`Event::PeerWasAhead`], [`Event::FeedWentBack`]), so nothing is skipped.
//!
//! The session owns no IO: bytes go in through [`Session::handle_input`], frames come out of
//! [`Session::poll_transmit`] (which produces data only as fast as the caller drains it: the
//! backpressure), time goes in through [`Session::handle_timeout`] and storage is reached
//! through [`SyncHost`].

use crate::document::PublishedDocument;
use crate::loaded::LoadedDocuments;
use crate::model::{DocId, DocMeta, Item, OdsCode};
use crate::planted::PlantedBug;
use crate::policy::{Decision, Recipient, WithholdReason};
use crate::reader::{CheckedHeads, FrameReader, ReadInput, ReadMessage};
use crate::register::ItemRegister;
use crate::relay::{self, AppendedChanges, Extension, HeldIndex};
use crate::signing::SignedHeads;
use crate::wire::{
    self, FeedId, MAX_FRAME_BYTES, MAX_OFFER_ENTRIES, Message, OfferEntry, WantEntry, WireError,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Offers a provider sends before the puller acknowledges: bounds both sides' memory.
pub const MAX_OUTSTANDING_OFFERS: usize = 4;
/// Entries per offer the provider sends.
pub const OFFER_BATCH: usize = 256;
/// Wanted documents a provider queues; a peer asking for more is misbehaving.
pub const MAX_QUEUED_WANTS: usize = MAX_OFFER_ENTRIES * MAX_OUTSTANDING_OFFERS;
/// Received documents held before they are written in one transaction.
pub const WRITE_BATCH: usize = 128;
/// A provider remembers, per peer, the heads it believes that peer holds of at most this many
/// documents (those whose changes it sent last), to push their next versions; beyond it, a
/// document's next version is offered and wanted as before. 500 peers of a hub: about 25 MB.
pub const PUSH_KNOWN_DOCUMENTS: usize = 512;
/// Changes of at most this many bytes are pushed ahead of their offer; more wait for a Want,
/// so that a peer that holds them already (through another hub) is not sent them twice.
pub const PUSH_MAX_BYTES: usize = 64 * 1024;
/// A peer must say Hello within this many milliseconds of the connection opening.
pub const HELLO_TIMEOUT_MS: u64 = 10_000;
/// How often a caught-up provider looks for new entries in its feed if not told sooner.
pub const FEED_CHECK_INTERVAL_MS: u64 = 1_000;
/// How often a provider at most tells a caught-up peer that its position moved over entries
/// policy kept from it. A hub's feed moves with every change at any of its hundreds of peers,
/// and almost none of those changes are for a given peer: announcing each would cost every
/// peer a frame and an acknowledged write per change anywhere in the region.
pub const ANNOUNCE_INTERVAL_MS: u64 = 5_000;
/// Feed batches a provider reads past without an entry for the peer before it yields to
/// its caller's other sessions (it resumes at once).
const SILENT_BATCHES_PER_POLL: usize = 16;

/// A host failure (storage, usually): the session cannot go on, the connection is closed and
/// retried later. Nothing acknowledged is lost because acks follow durable writes.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("{0}")]
pub struct HostError(pub String);

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SessionError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("peer broke the protocol: {0}")]
    Protocol(String),
    #[error(
        "peer introduced itself as {claimed} but its TLS key belongs to {authenticated}; connection refused"
    )]
    Impersonation {
        claimed: String,
        authenticated: String,
    },
    #[error("peer sent no Hello within {HELLO_TIMEOUT_MS} ms")]
    HelloTimeout,
    #[error("local storage failed during sync: {0}")]
    Host(#[from] HostError),
}

/// One entry of a node's changes feed: a document version at a feed position.
#[derive(Debug, Clone)]
pub struct FeedEntry {
    pub seq: u64,
    pub meta: DocMeta,
    pub heads: Vec<[u8; 32]>,
}

/// A document as held: partition, Automerge snapshot and the publisher's signed heads.
#[derive(Debug, Clone)]
pub struct HeldDocument {
    pub meta: DocMeta,
    /// A saved document, followed by the changes a relay appended since (see
    /// [`crate::relay`]); they load as the whole document either way.
    pub snapshot: Vec<u8>,
    /// The index of the appended changes; `None` where the document was saved whole.
    pub appended: Option<AppendedChanges>,
    pub signed: Vec<u8>,
}

impl HeldDocument {
    /// The heads its publisher signed, if the stored signed heads decode.
    pub fn signed_heads(&self) -> Option<Vec<[u8; 32]>> {
        SignedHeads::decode(&self.signed).map(|signed| signed.heads)
    }

    /// What a relay knows of it without its bytes, if its signed heads decode.
    pub fn index(&self) -> Option<HeldIndex> {
        HeldIndex::of(&self.signed, &self.snapshot, self.appended.clone())
    }
}

/// What a holder of some heads lacks of a held document, as a host tells it from the changes
/// it appended to the document, without the bytes saved whole ([`SyncHost::changes_after`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeldChanges {
    /// Nothing is held.
    NotHeld,
    /// What the holder lacks (no changes where it holds exactly the signed heads).
    Lacking(ChangesToSend),
    /// Only the whole document can tell: a head older than what was appended, a document
    /// saved whole, or a damaged index.
    Unknown,
}

/// What goes to a peer of a held document: its partition, signed heads and the changes it
/// lacks in the order they were stored (or, for a first copy, the stored bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangesToSend {
    pub meta: DocMeta,
    pub signed: Vec<u8>,
    pub changes: Vec<Vec<u8>>,
}

impl ChangesToSend {
    fn signed_heads(&self) -> Option<Vec<[u8; 32]>> {
        SignedHeads::decode(&self.signed).map(|signed| signed.heads)
    }
}

/// Keeps `document` loaded at its current heads, if the host keeps documents loaded.
fn keep_loaded(host: &mut impl SyncHost, document: PublishedDocument) {
    if let Some(loaded) = host.loaded_documents() {
        loaded.keep(document);
    }
}

/// A received document that verified, ready to be stored.
#[derive(Debug, Clone)]
pub struct VerifiedDocument {
    pub signed: SignedHeads,
    pub bytes: VerifiedBytes,
    /// Empty where the host does not read them ([`SyncHost::reads_items`]).
    pub items: Vec<Item>,
    /// When the publisher made its latest change (Unix seconds, as the publisher stamped it).
    pub published_at: Option<i64>,
    /// What its items map is at this version, for the next version to be read from its
    /// changes alone ([`crate::register`]); `None` where the host does not read its items or
    /// the version does not register.
    pub register: Option<ItemRegister>,
}

/// What of a verified version is stored.
#[derive(Debug, Clone)]
pub enum VerifiedBytes {
    /// The document saved whole, with the heads of the copy it was made from (`None` where
    /// none was held). The held copy may have moved on by the time it is stored: the host then
    /// stores it only if it has every change of what is held.
    Whole {
        snapshot: Vec<u8>,
        built_on: Option<Vec<[u8; 32]>>,
    },
    /// The changes a relay authenticated by their hash chain ([`crate::relay`]), to append to
    /// the held copy it extended. The held copy may have moved on by the time they are
    /// stored (another session stored a version): the host then appends them to what it
    /// holds if they extend it to the signed heads, and keeps what it holds if that has
    /// them already.
    Appended(Extension),
}

/// What a received version is to the receiver, once its signature verified.
enum Received {
    /// Newer than the copy held (or the first copy): to be stored.
    Newer(Box<VerifiedDocument>),
    /// Every signed head is already in the copy held: nothing to store.
    AlreadyHeld,
}

/// A verified document the receiving node would not store: policy does not let it hold it
/// (a late copy after a withdrawal, a patient not on its caseload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub doc: DocId,
    pub publisher: OdsCode,
    pub reason: WithholdReason,
}

/// One page of the feed as offered to one peer: see [`SyncHost::offerable_after`].
#[derive(Debug, Default)]
pub struct OfferPage {
    pub entries: Vec<OfferEntry>,
    /// The position of the last feed entry read; `None` when the feed had nothing more.
    pub read_up_to: Option<u64>,
}

/// Where a puller stands in a peer's feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Checkpoint {
    pub feed: FeedId,
    /// The feed epoch the position was taken in.
    pub epoch: u64,
    pub up_to: u64,
}

/// How far positions taken in one epoch of this node's feed still hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochEnd {
    /// The epoch positions are handed out in now: all of them hold.
    Current,
    /// A later epoch began after this position: positions past it were handed out again.
    EndedAt(u64),
    /// Not an epoch of this feed, or one too old to be remembered.
    Unknown,
}

/// What a session needs from the node around it: storage, trust and policy.
pub trait SyncHost {
    /// This node's feed identity.
    fn feed_id(&self) -> FeedId;
    /// The feed epoch positions are handed out in now.
    fn feed_epoch(&self) -> u64;
    /// How far positions taken in `epoch` of this node's feed still hold.
    fn feed_epoch_end(&mut self, epoch: u64) -> Result<EpochEnd, HostError>;
    /// The last position of this node's feed (0 when empty).
    fn feed_tip(&mut self) -> Result<u64, HostError>;
    /// At most `limit` feed entries after position `after`, in feed order.
    fn feed_after(&mut self, after: u64, limit: usize) -> Result<Vec<FeedEntry>, HostError>;
    /// What of the next (at most `limit`) feed entries after `after` policy lets `peer` hold,
    /// and the position of the last entry read. A host may answer from memory without
    /// building the entries it withholds; it must decide exactly as [`SyncHost::decide`].
    fn offerable_after(
        &mut self,
        peer: &Recipient,
        after: u64,
        limit: usize,
    ) -> Result<OfferPage, HostError> {
        offerable_from_feed(self, peer, after, limit)
    }
    /// At most `limit` documents queued for `peer` outside the feed order (a new care
    /// relationship made them sendable after its checkpoint passed them).
    fn backfill(&mut self, peer: &OdsCode, limit: usize) -> Result<Vec<FeedEntry>, HostError>;
    /// The peer acknowledged an offer of these backfilled documents: dequeue them.
    fn backfill_done(&mut self, peer: &OdsCode, docs: &[DocId]) -> Result<(), HostError>;
    /// The heads this node holds for `doc`, from its stored signed heads.
    fn held_heads(&mut self, doc: DocId) -> Result<Option<Vec<[u8; 32]>>, HostError>;
    fn document(&mut self, doc: DocId) -> Result<Option<HeldDocument>, HostError>;
    /// The partition of the held copy of `doc` and what a relay needs of it to extend it by
    /// its hash chain ([`HeldIndex`]), without reading its bytes; `None` when nothing is held
    /// or its signed heads do not decode. A relay asks this for every version offered and
    /// received, so a host should answer it without assembling the document.
    fn held_index(&mut self, doc: DocId) -> Result<Option<(DocMeta, HeldIndex)>, HostError> {
        Ok(self
            .document(doc)?
            .and_then(|held| Some((held.meta.clone(), held.index()?))))
    }
    /// What a holder of `have` (not empty) lacks of the held copy of `doc`, where the host can
    /// tell it from the changes appended since the document was saved whole
    /// ([`relay::changes_after`]) without reading the document; [`HeldChanges::Unknown`] sends the
    /// session to [`SyncHost::document`]. A hub answers this for every version it pushes or
    /// is asked for.
    fn changes_after(&mut self, _doc: DocId, _have: &[[u8; 32]]) -> Result<HeldChanges, HostError> {
        Ok(HeldChanges::Unknown)
    }
    /// Stores verified documents received from `peer` and, when given, the puller's new
    /// checkpoint in its feed, in one transaction. The host decides again, as the recipient,
    /// on every document it did not publish and stores only what policy lets it hold: it
    /// applies the batch's sharing records first, so a withdrawal arriving with a late copy
    /// refuses the copy, and a withdrawal purges what the withdrawing publisher sent before.
    /// Returns the documents refused.
    fn commit(
        &mut self,
        peer: &OdsCode,
        documents: Vec<VerifiedDocument>,
        checkpoint: Option<Checkpoint>,
    ) -> Result<Vec<Refusal>, HostError>;
    fn checkpoint(&mut self, peer: &OdsCode) -> Result<Option<Checkpoint>, HostError>;
    /// Whether the trust registry lists `key` for `publisher` and has not revoked it.
    fn is_publisher_key(&self, publisher: &OdsCode, key: &[u8; 32]) -> bool;
    /// The policy decision for sending a document to `recipient`. An error (the facts could
    /// not be read) is no decision: the caller must not withhold, and must not move past the
    /// document as if it had been decided.
    fn decide(&self, meta: &DocMeta, recipient: &Recipient) -> Result<Decision, HostError>;
    fn registry_version(&self) -> u64;
    /// The signed registry to pass on to a peer that lacks this edition.
    fn registry_bytes(&self) -> Option<Vec<u8>>;
    /// A peer sent its registry; the host verifies it against the pinned authority and
    /// adopts it if newer. Returns whether it was adopted.
    fn offer_registry(&mut self, bytes: Vec<u8>) -> Result<bool, HostError>;
    /// Whether this node reads the items of received documents of `meta`'s partition. A relay
    /// that keeps none of them (a hub's clinical partitions) answers `false`: their items are
    /// then neither parsed nor checked on receipt (every node that reads them checks them
    /// when it receives them), and [`VerifiedDocument::items`] is empty. A new version of
    /// such a document is authenticated by its hash chain and appended, without loading
    /// the document ([`crate::relay`]). The signature and the heads are checked all the
    /// same.
    fn reads_items(&self, _meta: &DocMeta) -> bool {
        true
    }
    /// A bug planted in this host (the simulator's self-tests only; see [`PlantedBug`]).
    fn planted_bug(&self) -> Option<PlantedBug> {
        None
    }
    /// Recently used documents the host keeps loaded, if it keeps any (see [`crate::loaded`]).
    fn loaded_documents(&mut self) -> Option<&mut LoadedDocuments> {
        None
    }
    /// This node's newest signed audit checkpoint ([`crate::SignedCheckpoint`], encoded), to
    /// hand to peers as witnesses.
    fn own_audit_checkpoint(&mut self) -> Result<Option<Vec<u8>>, HostError> {
        Ok(None)
    }
    /// Keeps `peer`'s signed audit checkpoint (already verified) as its witness.
    fn witness_audit_checkpoint(
        &mut self,
        _peer: &OdsCode,
        _checkpoint: &crate::SignedCheckpoint,
    ) -> Result<(), HostError> {
        Ok(())
    }
    /// `peer`'s audit checkpoints this node holds as witness, newest first, encoded.
    fn witnessed_audit_checkpoints(&mut self, _peer: &OdsCode) -> Result<Vec<Vec<u8>>, HostError> {
        Ok(Vec::new())
    }
    /// `witness` holds this node's audit checkpoint (already verified): keep the receipt.
    fn audit_checkpoint_witnessed(
        &mut self,
        _witness: &OdsCode,
        _checkpoint: &crate::SignedCheckpoint,
    ) -> Result<(), HostError> {
        Ok(())
    }
}

/// Something the driver should know about (log, count, persist).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Received documents were stored (each with the heads now held); `checkpoint` is the
    /// new position when it moved.
    Stored {
        documents: Vec<(DocId, Vec<[u8; 32]>)>,
        checkpoint: Option<u64>,
    },
    /// A received document failed verification; nothing of it was stored.
    Rejected {
        doc: DocId,
        publisher: OdsCode,
        reason: String,
    },
    /// A received document verified but policy does not let this node hold it; not stored.
    Refused(Refusal),
    /// The peer acknowledged our feed up to this position.
    PeerAcked { up_to: u64 },
    /// The peer had taken our feed up to `had`, past where the epoch it was taken in ended
    /// (`resumed_after`): this node lost writes it had reported durable, or was restored from
    /// a backup. It is served again from there.
    PeerWasAhead { had: u64, resumed_after: u64 },
    /// The peer's feed went back from `had` to `resumed_after` (it lost writes or was
    /// restored from a backup): we take it again from there.
    FeedWentBack { had: u64, resumed_after: u64 },
    /// We hold everything the peer's feed had when it last told us its tip.
    CaughtUp,
    /// A newer trust registry from the peer was verified and adopted.
    RegistryAdopted,
    /// The peer sent a registry that was refused or not newer.
    RegistryIgnored,
    /// A document the peer wants is too large for one frame: it was answered as missing, and
    /// it reaches this peer only once a version of it fits. The driver must make this an
    /// error an operator sees (log, status, metrics), never drop it quietly.
    Unsendable { doc: DocId, bytes: usize },
    /// A frame arrived (only when [`Session::log_received_frames`] is on): its kind and the
    /// documents it named, for a wire log that shows what reached this node.
    Received {
        kind: &'static str,
        docs: Vec<DocId>,
    },
}

/// Counters for status and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionStats {
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub documents_received: u64,
    pub documents_sent: u64,
    pub rejected: u64,
    /// Received versions this node already held by the time they arrived (stored meanwhile
    /// through another session): dropped, not stored again.
    pub already_held: u64,
    /// Received documents that verified but that policy does not let this node hold.
    pub refused: u64,
    /// Versions sent ahead of their offer ([`Message::Pushed`]).
    pub documents_pushed: u64,
    /// Pushed versions received onto another copy than the one they were made from, and left
    /// for the offer that follows to ask for.
    pub pushes_not_taken: u64,
    /// Our checkpoint in the peer's feed.
    pub pulled_up_to: u64,
    /// The peer's feed tip as last reported.
    pub peer_tip: u64,
    /// The peer's acknowledged position in our feed.
    pub peer_acked: u64,
    /// Our feed tip as last read.
    pub local_tip: u64,
}

impl SessionStats {
    /// Document versions in the peer's feed we have not yet pulled.
    pub fn pending_in(&self) -> u64 {
        self.peer_tip.saturating_sub(self.pulled_up_to)
    }

    /// Document versions in our feed the peer has not yet acknowledged (including ones
    /// policy will withhold from it: positions, not documents).
    pub fn pending_out(&self) -> u64 {
        self.local_tip.saturating_sub(self.peer_acked)
    }
}

struct Batch {
    up_to: u64,
    pending: BTreeSet<DocId>,
}

struct Serving {
    /// Position in our feed offered so far.
    offered_up_to: u64,
    /// up_to of each offer not yet acknowledged.
    outstanding: VecDeque<u64>,
    /// No entries after `offered_up_to` when last checked.
    caught_up: bool,
    /// Last up_to told to the peer, so a caught-up notice is sent once.
    announced: Option<u64>,
    /// A position-only offer goes no sooner than this (see [`ANNOUNCE_INTERVAL_MS`]).
    next_announce_at: u64,
    next_check_at: u64,
    /// Documents of the one backfill offer awaiting its ack. A backfill offer does not move
    /// the feed position, so it goes alone (nothing else outstanding): its ack is then
    /// unambiguous, and only an acked backfill leaves the queue.
    backfill_in_flight: Option<Vec<DocId>>,
    /// The heads the peer holds, or will once what is in flight is taken, of documents whose
    /// changes were sent or pushed to it in this session: the base its next version is
    /// pushed onto ([`Message::Pushed`]). An offer the peer did not want says only that it
    /// holds at least the heads offered, so it is not remembered. A belief, not a fact: a
    /// peer that holds something else (a newer version from another path) leaves the push and
    /// the offer that follows decides as before.
    peer_holds: std::collections::HashMap<DocId, Vec<[u8; 32]>>,
}

pub struct Session {
    local: OdsCode,
    peer: Recipient,
    /// For a caller that hands the session bytes ([`Session::handle_input`]) rather than
    /// what its own reader made of them ([`Session::handle_read`]).
    reader: FrameReader,
    control: VecDeque<Message>,
    hello_received: bool,
    /// The newest registry edition the peer is known to hold (from its Hello, or sent).
    peer_registry_version: u64,
    /// The count of the newest own audit checkpoint sent to the peer.
    audit_checkpoint_sent: u64,
    hello_deadline: u64,
    /// Puller side.
    checkpoint: Checkpoint,
    /// The epoch of the peer's feed, from its Hello: the positions it offers are taken in it.
    peer_epoch: u64,
    /// The peer answered our Pull: its offers follow.
    resumed: bool,
    /// Every batch taken and the peer's tip reached, since the last offer arrived.
    at_peer_tip: bool,
    batches: VecDeque<Batch>,
    writes: BTreeMap<DocId, VerifiedDocument>,
    /// Pushed versions received since the last offer: no more than an offer may name.
    pushed_since_offer: usize,
    /// Provider side.
    serving: Option<Serving>,
    wanted: VecDeque<WantEntry>,
    stats: SessionStats,
    events: VecDeque<Event>,
    log_frames: bool,
}

impl Session {
    /// Opens a session with `peer`, whose identity the transport has authenticated. Queues our
    /// Hello and our Pull from the stored checkpoint.
    pub fn new(
        local: OdsCode,
        peer: Recipient,
        now: u64,
        host: &mut impl SyncHost,
    ) -> Result<Session, SessionError> {
        let checkpoint = host.checkpoint(&peer.ods)?.unwrap_or_default();
        let mut session = Session {
            local: local.clone(),
            peer,
            reader: FrameReader::default(),
            control: VecDeque::new(),
            hello_received: false,
            peer_registry_version: 0,
            audit_checkpoint_sent: 0,
            hello_deadline: now + HELLO_TIMEOUT_MS,
            checkpoint,
            peer_epoch: 0,
            resumed: false,
            at_peer_tip: false,
            batches: VecDeque::new(),
            writes: BTreeMap::new(),
            pushed_since_offer: 0,
            serving: None,
            wanted: VecDeque::new(),
            stats: SessionStats {
                pulled_up_to: checkpoint.up_to,
                local_tip: host.feed_tip()?,
                ..Default::default()
            },
            events: VecDeque::new(),
            log_frames: false,
        };
        session.control.push_back(Message::Hello {
            node: local,
            feed: host.feed_id(),
            epoch: host.feed_epoch(),
            registry_version: host.registry_version(),
        });
        session.control.push_back(Message::Pull {
            feed: checkpoint.feed,
            epoch: checkpoint.epoch,
            since: checkpoint.up_to,
        });
        Ok(session)
    }

    pub fn peer(&self) -> &Recipient {
        &self.peer
    }

    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    /// Whether this node holds everything the peer's feed had when it last told its tip,
    /// with nothing of the peer's outstanding ([`Event::CaughtUp`] was the last word).
    pub fn is_caught_up(&self) -> bool {
        self.at_peer_tip
    }

    /// Reports every received frame as [`Event::Received`] from now on.
    pub fn log_received_frames(&mut self) {
        self.log_frames = true;
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Bytes from the peer, read on the caller's thread. An error means the connection must
    /// be closed with its reason. A session is fed either this way or by
    /// [`Session::handle_read`], never both: each way keeps its own partial frame.
    pub fn handle_input(
        &mut self,
        bytes: &[u8],
        now: u64,
        host: &mut impl SyncHost,
    ) -> Result<(), SessionError> {
        let input = self.reader.read(bytes);
        self.handle_read(input, now, host)
    }

    /// What a [`FrameReader`] made of the peer's bytes, on whatever thread it ran. An error
    /// means the connection must be closed with its reason; the messages before a frame that
    /// did not decode are handled first, as they would have been had it never arrived.
    pub fn handle_read(
        &mut self,
        input: ReadInput,
        now: u64,
        host: &mut impl SyncHost,
    ) -> Result<(), SessionError> {
        self.stats.bytes_received += input.bytes as u64;
        for read in input.messages {
            self.handle_message(read, now, host)?;
        }
        match input.error {
            Some(error) => Err(error.into()),
            None => Ok(()),
        }
    }

    /// The host's registry changed (installed by its operator, or adopted from another peer):
    /// a peer holding an older edition gets the new one now, not at its next connection, so
    /// a revocation spreads through connected nodes at once.
    pub fn registry_changed(&mut self, host: &impl SyncHost) {
        let version = host.registry_version();
        if !self.hello_received || version <= self.peer_registry_version {
            return;
        }
        if let Some(bytes) = host.registry_bytes() {
            self.peer_registry_version = version;
            self.control.push_back(Message::Registry { bytes });
        }
    }

    /// This node signed a new audit checkpoint: the peer gets it to hold as a witness.
    pub fn audit_checkpointed(&mut self, host: &mut impl SyncHost) -> Result<(), SessionError> {
        if !self.hello_received {
            return Ok(()); // sent once the Hello arrives
        }
        let Some(bytes) = host.own_audit_checkpoint()? else {
            return Ok(());
        };
        let count = crate::SignedCheckpoint::decode(&bytes)
            .map(|signed| signed.checkpoint.count)
            .unwrap_or(0);
        if count > self.audit_checkpoint_sent {
            self.audit_checkpoint_sent = count;
            self.control
                .push_back(Message::AuditCheckpoint { signed: bytes });
        }
        Ok(())
    }

    /// A peer's audit checkpoint: held as its witness if it is the peer's own and verifies,
    /// and the newest held answered back, so the peer knows what a witness holds.
    fn on_audit_checkpoint(
        &mut self,
        bytes: Vec<u8>,
        host: &mut impl SyncHost,
    ) -> Result<(), SessionError> {
        let signed = self.checked_checkpoint(&bytes, &self.peer.ods.clone(), host)?;
        host.witness_audit_checkpoint(&self.peer.ods, &signed)?;
        self.control.push_back(Message::AuditWitness {
            signed: vec![bytes],
        });
        Ok(())
    }

    /// A peer holds these of our audit checkpoints: keep the receipts.
    fn on_audit_witness(
        &mut self,
        checkpoints: Vec<Vec<u8>>,
        host: &mut impl SyncHost,
    ) -> Result<(), SessionError> {
        for bytes in checkpoints {
            let signed = self.checked_checkpoint(&bytes, &self.local.clone(), host)?;
            host.audit_checkpoint_witnessed(&self.peer.ods, &signed)?;
        }
        Ok(())
    }

    /// `bytes` as a checkpoint of `organisation`, signed with a key the registry trusts for it.
    fn checked_checkpoint(
        &self,
        bytes: &[u8],
        organisation: &OdsCode,
        host: &impl SyncHost,
    ) -> Result<crate::SignedCheckpoint, SessionError> {
        let signed = crate::SignedCheckpoint::decode(bytes)
            .map_err(|error| SessionError::Protocol(error.to_string()))?;
        if signed.checkpoint.organisation != *organisation {
            return Err(SessionError::Protocol(format!(
                "an audit checkpoint of {} sent as {organisation}'s",
                signed.checkpoint.organisation
            )));
        }
        signed
            .verify(|ods, key| host.is_publisher_key(ods, key))
            .map_err(|error| SessionError::Protocol(error.to_string()))?;
        Ok(signed)
    }

    /// Our local feed grew: a caught-up provider looks again at once.
    pub fn feed_changed(&mut self) {
        if let Some(serving) = &mut self.serving {
            serving.caught_up = false;
        }
    }

    /// When the session next needs [`Session::handle_timeout`], in the caller's milliseconds.
    pub fn poll_timeout(&self) -> Option<u64> {
        if !self.hello_received {
            return Some(self.hello_deadline);
        }
        match &self.serving {
            Some(serving) if serving.caught_up => Some(serving.next_check_at),
            _ => None,
        }
    }

    pub fn handle_timeout(&mut self, now: u64) -> Result<(), SessionError> {
        if !self.hello_received && now >= self.hello_deadline {
            return Err(SessionError::HelloTimeout);
        }
        if let Some(serving) = &mut self.serving
            && serving.caught_up
            && now >= serving.next_check_at
        {
            serving.caught_up = false;
        }
        Ok(())
    }

    /// The next frame to send, produced only when asked: a caller that stops draining (because
    /// the peer is slow) stops the session producing. Control messages go first so the
    /// pipeline keeps moving, then wanted changes, then new offers.
    pub fn poll_transmit(
        &mut self,
        now: u64,
        host: &mut impl SyncHost,
    ) -> Result<Option<Vec<u8>>, SessionError> {
        let message = match self.control.pop_front() {
            Some(message) => Some(message),
            None => match self.next_changes(host)? {
                Some(message) => Some(message),
                None => self.next_offer(now, host)?,
            },
        };
        let Some(message) = message else {
            return Ok(None);
        };
        let frame = wire::encode_frame(&message)?;
        self.stats.bytes_sent += frame.len() as u64;
        Ok(Some(frame))
    }

    fn handle_message(
        &mut self,
        read: ReadMessage,
        now: u64,
        host: &mut impl SyncHost,
    ) -> Result<(), SessionError> {
        let ReadMessage { message, heads } = read;
        if !self.hello_received && !matches!(message, Message::Hello { .. }) {
            return Err(SessionError::Protocol("first message was not Hello".into()));
        }
        if self.log_frames {
            self.events.push_back(Event::Received {
                kind: message.kind(),
                docs: message.doc_ids(),
            });
        }
        match message {
            Message::Hello {
                node,
                feed,
                epoch,
                registry_version,
            } => self.on_hello(node, feed, epoch, registry_version, host),
            Message::Pull { feed, epoch, since } => self.on_pull(feed, epoch, since, now, host),
            Message::Resume { after } => self.on_resume(after),
            Message::Offer {
                entries,
                up_to,
                tip,
            } => self.on_offer(entries, up_to, tip, host),
            Message::Want { docs } => self.on_want(docs),
            Message::Changes { meta, changes, .. } => self.on_changes(meta, changes, heads, host),
            Message::Missing { doc } => {
                self.resolve(doc)?;
                self.advance(host)
            }
            Message::Ack { up_to } => self.on_ack(up_to, host),
            Message::RegistryWanted => {
                if let Some(bytes) = host.registry_bytes() {
                    self.control.push_back(Message::Registry { bytes });
                }
                Ok(())
            }
            Message::Registry { bytes } => {
                let event = if host.offer_registry(bytes)? {
                    // The peer holds the edition it sent: no need to send it back.
                    self.peer_registry_version = host.registry_version();
                    Event::RegistryAdopted
                } else {
                    Event::RegistryIgnored
                };
                self.events.push_back(event);
                Ok(())
            }
            Message::AuditCheckpoint { signed } => self.on_audit_checkpoint(signed, host),
            Message::AuditWitness { signed } => self.on_audit_witness(signed, host),
            Message::Pushed {
                base,
                meta,
                changes,
                ..
            } => self.on_pushed(base, meta, changes, heads, host),
        }
    }

    fn on_hello(
        &mut self,
        node: OdsCode,
        feed: FeedId,
        epoch: u64,
        registry_version: u64,
        host: &mut impl SyncHost,
    ) -> Result<(), SessionError> {
        if self.hello_received {
            return Err(SessionError::Protocol("second Hello".into()));
        }
        if node != self.peer.ods {
            return Err(SessionError::Impersonation {
                claimed: node.to_string(),
                authenticated: self.peer.ods.to_string(),
            });
        }
        self.hello_received = true;
        self.peer_registry_version = registry_version;
        self.peer_epoch = epoch;
        if feed != self.checkpoint.feed {
            // The peer's database is new to us (or was rebuilt): our Pull named another feed,
            // so the peer serves from its start, and our checkpoint restarts with it.
            self.checkpoint = Checkpoint {
                feed,
                epoch,
                up_to: 0,
            };
            self.stats.pulled_up_to = 0;
        }
        if registry_version > host.registry_version() {
            self.control.push_back(Message::RegistryWanted);
        }
        // The witnessing both ways: ours to the peer, and what we hold of the peer's back to
        // it, so that a node whose own records were cut learns from its peers what it signed.
        let held = host.witnessed_audit_checkpoints(&self.peer.ods)?;
        if !held.is_empty() {
            self.control
                .push_back(Message::AuditWitness { signed: held });
        }
        self.audit_checkpointed(host)
    }

    fn on_pull(
        &mut self,
        feed: FeedId,
        epoch: u64,
        since: u64,
        now: u64,
        host: &mut impl SyncHost,
    ) -> Result<(), SessionError> {
        if self.serving.is_some() {
            return Err(SessionError::Protocol("second Pull".into()));
        }
        let tip = host.feed_tip()?;
        let same_feed = feed == host.feed_id();
        let start = resume_position(same_feed, since, tip, || host.feed_epoch_end(epoch))?;
        if same_feed && start < since {
            self.events.push_back(Event::PeerWasAhead {
                had: since,
                resumed_after: start,
            });
        }
        self.control.push_back(Message::Resume { after: start });
        self.stats.local_tip = tip;
        self.stats.peer_acked = start;
        self.serving = Some(Serving {
            offered_up_to: start,
            outstanding: VecDeque::new(),
            caught_up: false,
            announced: None,
            next_announce_at: now,
            next_check_at: now,
            backfill_in_flight: None,
            peer_holds: Default::default(),
        });
        Ok(())
    }

    /// The peer answered our Pull: it serves from `after`, which is our position or, if its
    /// feed went back, an earlier one.
    fn on_resume(&mut self, after: u64) -> Result<(), SessionError> {
        if self.resumed {
            return Err(SessionError::Protocol("second Resume".into()));
        }
        if after > self.checkpoint.up_to {
            return Err(SessionError::Protocol(format!(
                "resumed after {after}, past the position {} we pulled from",
                self.checkpoint.up_to
            )));
        }
        self.resumed = true;
        if after < self.checkpoint.up_to {
            self.events.push_back(Event::FeedWentBack {
                had: self.checkpoint.up_to,
                resumed_after: after,
            });
            self.checkpoint.up_to = after;
            self.stats.pulled_up_to = after;
        }
        // From here on positions are the peer's current epoch's, and the checkpoint says so.
        self.checkpoint.epoch = self.peer_epoch;
        Ok(())
    }

    fn on_offer(
        &mut self,
        entries: Vec<OfferEntry>,
        up_to: u64,
        tip: u64,
        host: &mut impl SyncHost,
    ) -> Result<(), SessionError> {
        if !self.resumed {
            return Err(SessionError::Protocol("Offer before Resume".into()));
        }
        if entries.len() > MAX_OFFER_ENTRIES {
            return Err(SessionError::Protocol(format!(
                "offer of {} entries, over the limit of {MAX_OFFER_ENTRIES}",
                entries.len()
            )));
        }
        if self.batches.len() > MAX_OUTSTANDING_OFFERS {
            return Err(SessionError::Protocol(
                "more offers outstanding than the protocol allows".into(),
            ));
        }
        let last = self
            .batches
            .back()
            .map_or(self.checkpoint.up_to, |b| b.up_to);
        if up_to < last || tip < up_to {
            return Err(SessionError::Protocol(format!(
                "offer positions out of order (up to {up_to}, tip {tip}, after {last})"
            )));
        }
        self.stats.peer_tip = tip;
        self.at_peer_tip = false;
        self.pushed_since_offer = 0;
        let mut wants = Vec::new();
        let mut pending = BTreeSet::new();
        for entry in entries {
            if pending.contains(&entry.doc) {
                return Err(SessionError::Protocol(format!(
                    "document {} offered twice in one offer",
                    entry.doc
                )));
            }
            if let Some(have) = self.lacks(&entry, host)? {
                pending.insert(entry.doc);
                wants.push(WantEntry {
                    doc: entry.doc,
                    have,
                });
            }
        }
        if !wants.is_empty() {
            self.control.push_back(Message::Want { docs: wants });
        }
        self.batches.push_back(Batch { up_to, pending });
        self.advance(host)
    }

    /// `Some(heads held)` if we lack part of what `entry` offers, `None` if we hold it all.
    fn lacks(
        &mut self,
        entry: &OfferEntry,
        host: &mut impl SyncHost,
    ) -> Result<Option<Vec<[u8; 32]>>, SessionError> {
        let held = match self.writes.get(&entry.doc) {
            Some(written) => Some(written.signed.heads.clone()),
            None => host.held_heads(entry.doc)?,
        };
        let Some(held) = held else {
            return Ok(Some(Vec::new()));
        };
        if held == entry.heads {
            return Ok(None);
        }
        // Different heads: we may be ahead (the offer is an older version that reached the
        // peer by a slower path) or behind. Only the document's history can tell.
        if self.held_contains_all(entry.doc, &entry.heads, host)? {
            return Ok(None);
        }
        Ok(Some(held))
    }

    /// Whether the copy of `doc` held (or about to be written) has every change of `heads`.
    /// The copy stays loaded: when it lacks some, the changes the Want brings are applied to
    /// it ([`Session::verify_received`]); loading it a second time for that cost a hub 6% of
    /// its CPU per change (BENCHMARKS.md).
    fn held_contains_all(
        &mut self,
        doc: DocId,
        heads: &[[u8; 32]],
        host: &mut impl SyncHost,
    ) -> Result<bool, SessionError> {
        if let Some(written) = self.writes.get(&doc) {
            let appended = match &written.bytes {
                VerifiedBytes::Appended(extension) => Some(&extension.appended),
                VerifiedBytes::Whole { .. } => None,
            };
            if appended.is_some() || !host.reads_items(&written.signed.meta) {
                return Ok(relay::known(appended, &written.signed.heads, heads));
            }
            return Ok(self
                .base_document(doc, host)?
                .is_some_and(|document| document.contains_all(heads)));
        }
        let Some((meta, index)) = host.held_index(doc)? else {
            // Nothing held, or signed heads that do not decode: the full copy replaces it.
            return Ok(false);
        };
        if !host.reads_items(&meta) || index.register.is_some() {
            // A relay does not load the document to place an offer: heads its index does not
            // know are wanted, and the changes that answer settle it (a version it already
            // holds is found on the full path, `verify_received`). Offers of older versions
            // reach a hub only from a second hub. Nor does a node that reads the document's
            // items, where it can read the next version from its changes alone.
            return Ok(relay::known(index.appended.as_ref(), &index.heads, heads));
        }
        if let Some(loaded) = host
            .loaded_documents()
            .and_then(|l| l.get(doc, &index.heads))
        {
            return Ok(loaded.contains_all(heads));
        }
        let Some(held) = host.document(doc)? else {
            return Ok(false);
        };
        // A stored document that no longer loads is treated as absent, as in
        // `base_document`.
        let Ok(document) = PublishedDocument::load(&held.meta, &held.snapshot) else {
            return Ok(false);
        };
        let contains = document.contains_all(heads);
        if index.heads == document.heads() {
            keep_loaded(host, document);
        }
        Ok(contains)
    }

    fn base_document(
        &mut self,
        doc: DocId,
        host: &mut impl SyncHost,
    ) -> Result<Option<PublishedDocument>, SessionError> {
        if let Some(written) = self.writes.get(&doc) {
            return Ok(match &written.bytes {
                VerifiedBytes::Whole { snapshot, .. } => {
                    PublishedDocument::load(&written.signed.meta, snapshot).ok()
                }
                // Only the changes are at hand: `verify_received` stores them before it
                // needs the whole document, and a copy short of them only wants more.
                VerifiedBytes::Appended(_) => None,
            });
        }
        let Some(held) = host.document(doc)? else {
            return Ok(None);
        };
        if let Some(heads) = held.signed_heads()
            && let Some(loaded) = host.loaded_documents().and_then(|l| l.take(doc, &heads))
        {
            return Ok(Some(loaded));
        }
        // A stored document that no longer loads is treated as absent: the peer's full copy
        // replaces it once that verifies.
        Ok(PublishedDocument::load(&held.meta, &held.snapshot).ok())
    }

    /// The changes a holder of `have` lacks from the held document, from its loaded copy if
    /// the host keeps one at the held version; None when the stored copy does not load.
    fn changes_for(
        held: &HeldDocument,
        have: &[[u8; 32]],
        host: &mut impl SyncHost,
    ) -> Option<Vec<Vec<u8>>> {
        let doc = held.meta.id();
        let heads = held.signed_heads();
        if let Some(heads) = &heads
            && let Some(loaded) = host.loaded_documents().and_then(|l| l.get(doc, heads))
        {
            return Some(loaded.changes_since(have));
        }
        let document = PublishedDocument::load(&held.meta, &held.snapshot).ok()?;
        let changes = document.changes_since(have);
        if heads.is_some_and(|heads| heads == document.heads()) && host.reads_items(&held.meta) {
            keep_loaded(host, document);
        }
        Some(changes)
    }

    fn on_want(&mut self, docs: Vec<WantEntry>) -> Result<(), SessionError> {
        if self.serving.is_none() {
            return Err(SessionError::Protocol("Want before Pull".into()));
        }
        if self.wanted.len() + docs.len() > MAX_QUEUED_WANTS {
            return Err(SessionError::Protocol(format!(
                "more than {MAX_QUEUED_WANTS} documents wanted at once"
            )));
        }
        self.wanted.extend(docs);
        Ok(())
    }

    fn on_changes(
        &mut self,
        meta: DocMeta,
        changes: Vec<Vec<u8>>,
        heads: Option<CheckedHeads>,
        host: &mut impl SyncHost,
    ) -> Result<(), SessionError> {
        let doc = meta.id();
        self.resolve(doc)?;
        self.take_received(&meta, &changes, heads, host)?;
        self.advance(host)
    }

    /// Verifies a received version and keeps it for the batch's write, or counts and reports
    /// why not; writes the batch when it is full.
    fn take_received(
        &mut self,
        meta: &DocMeta,
        changes: &[Vec<u8>],
        heads: Option<CheckedHeads>,
        host: &mut impl SyncHost,
    ) -> Result<(), SessionError> {
        let doc = meta.id();
        match self.verify_received(meta, changes, heads, host)? {
            Ok(Received::Newer(verified)) => {
                self.writes.insert(doc, *verified);
                self.stats.documents_received += 1;
            }
            Ok(Received::AlreadyHeld) => self.stats.already_held += 1,
            Err(reason) => {
                self.stats.rejected += 1;
                self.events.push_back(Event::Rejected {
                    doc,
                    publisher: meta.publisher.clone(),
                    reason,
                });
            }
        }
        if self.writes.len() >= WRITE_BATCH {
            self.flush(None, host)?;
        }
        Ok(())
    }

    /// A version pushed ahead of its offer. Taken, checked exactly as wanted changes are, only
    /// onto a copy held at exactly `base` and not already changed in this batch; otherwise
    /// left, and the offer that follows wants it as it would have without the push.
    fn on_pushed(
        &mut self,
        base: Vec<[u8; 32]>,
        meta: DocMeta,
        changes: Vec<Vec<u8>>,
        heads: Option<CheckedHeads>,
        host: &mut impl SyncHost,
    ) -> Result<(), SessionError> {
        if !self.resumed {
            return Err(SessionError::Protocol("Pushed before Resume".into()));
        }
        self.pushed_since_offer += 1;
        if self.pushed_since_offer > MAX_OFFER_ENTRIES {
            return Err(SessionError::Protocol(format!(
                "more than {MAX_OFFER_ENTRIES} versions pushed before an offer"
            )));
        }
        let doc = meta.id();
        // A copy written in this batch is a version the pusher did not build on (it pushes
        // a document's versions one offer at a time, each onto the last it sent).
        let onto_held = !base.is_empty()
            && !self.writes.contains_key(&doc)
            && host.held_heads(doc)?.is_some_and(|held| held == base);
        if !onto_held {
            self.stats.pushes_not_taken += 1;
            return Ok(());
        }
        self.take_received(&meta, &changes, heads, host)?;
        Ok(())
    }

    /// Verifies a received document before anything of it is stored: the publisher's key is
    /// in the registry, the signature holds (checked by the connection's reader, on the very
    /// heads given here), and the changes give exactly the signed heads.
    /// The outer error is a local failure; the inner one is the rejection reason.
    ///
    /// A version this node already holds is not a rejection: another session (a second hub,
    /// the publisher directly) may have stored the same or a newer version between this
    /// session's Want and the peer's answer. The changes were computed against the heads the
    /// Want named, so applying them to the newer copy would give heads the signature does not
    /// vouch for; the copy held is kept as it is.
    fn verify_received(
        &mut self,
        meta: &DocMeta,
        changes: &[Vec<u8>],
        heads: Option<CheckedHeads>,
        host: &mut impl SyncHost,
    ) -> Result<Result<Received, String>, SessionError> {
        let Some(CheckedHeads {
            heads: signed,
            signature,
        }) = heads
        else {
            return Ok(Err("signed heads do not decode".into()));
        };
        if signed.meta != *meta {
            return Ok(Err("signed heads are for another document".into()));
        }
        let trusted = signed.check_trusted(|publisher, key| host.is_publisher_key(publisher, key));
        if let Err(error) = trusted.and(signature) {
            return Ok(Err(error.to_string()));
        }
        if self
            .writes
            .get(&meta.id())
            .is_some_and(|written| matches!(written.bytes, VerifiedBytes::Appended(_)))
        {
            // A second version of a document relayed earlier in this batch: the first is
            // stored now, so that both paths below start from the held copy.
            self.flush(None, host)?;
        }
        if let Some(received) = self.relay_received(&signed, changes, host)? {
            return Ok(Ok(received));
        }
        let base = self.base_document(meta.id(), host)?;
        // What the version is made from, for the host to tell at commit whether another
        // session stored a version in between (`VerifiedBytes::Whole`).
        let built_on = match (self.writes.get(&meta.id()), &base) {
            // From a version this batch has not stored yet, which this one replaces in the
            // batch: the copy held is the one that version was made from.
            (
                Some(VerifiedDocument {
                    bytes: VerifiedBytes::Whole { built_on, .. },
                    ..
                }),
                _,
            ) => built_on.clone(),
            (_, Some(held)) => Some(held.heads()),
            // Nothing held, or a held copy that does not load.
            (_, None) => host.held_heads(meta.id())?,
        };
        let mut document = base.unwrap_or_else(|| PublishedDocument::create(meta.clone(), &[0]));
        // A relay keeps loaded only what it reads: the rest it serves from appended bytes.
        let keeps_loaded = host.reads_items(meta);
        if document.contains_all(&signed.heads) {
            if keeps_loaded {
                keep_loaded(host, document);
            }
            return Ok(Ok(Received::AlreadyHeld));
        }
        if let Err(error) = document.apply_chunks(changes) {
            return Ok(Err(error.to_string()));
        }
        if let Err(error) = document.matches(&signed) {
            return Ok(Err(error.to_string()));
        }
        let (items, register) = if host.reads_items(meta) {
            match document.items() {
                Ok(items) => (items, document.item_register()),
                Err(error) => return Ok(Err(error.to_string())),
            }
        } else {
            (Vec::new(), None)
        };
        let verified = VerifiedDocument {
            signed,
            bytes: VerifiedBytes::Whole {
                snapshot: document.save(),
                built_on,
            },
            items,
            published_at: document.last_change_time(),
            register,
        };
        // Kept at the received version: if the commit refuses it or rolls back, the stored
        // heads differ and the entry is never used.
        if keeps_loaded {
            keep_loaded(host, document);
        }
        Ok(Ok(Received::Newer(Box::new(verified))))
    }

    /// A check of a new version by its hash chain against the signed heads (already
    /// verified), without loading the document or reading its bytes: `None` when it cannot
    /// decide that way (a first copy, a copy saved whole earlier in this batch, changes it
    /// declines, heads other than the signed heads), and the full path decides, with the
    /// reason a full check gives for a rejection. A node that reads the document's items
    /// reads them from the changes and the held copy's register ([`crate::register`]), and
    /// takes the full path where it has no register or the changes are not plainly the
    /// publisher's next puts and deletes.
    fn relay_received(
        &mut self,
        signed: &SignedHeads,
        changes: &[Vec<u8>],
        host: &mut impl SyncHost,
    ) -> Result<Option<Received>, SessionError> {
        let doc = signed.meta.id();
        if self.writes.contains_key(&doc) {
            return Ok(None);
        }
        // A first copy is loaded and checked whole.
        let Some((_, held)) = host.held_index(doc)? else {
            return Ok(None);
        };
        let reads_items = host.reads_items(&signed.meta);
        if reads_items && held.register.is_none() {
            return Ok(None);
        }
        if relay::known(held.appended.as_ref(), &held.heads, &signed.heads) {
            return Ok(Some(Received::AlreadyHeld));
        }
        let Ok(extension) = relay::extend(&held, changes) else {
            return Ok(None);
        };
        let mut signed_heads = signed.heads.clone();
        signed_heads.sort_unstable();
        if extension.heads != signed_heads
            && host.planted_bug() != Some(PlantedBug::RelayWithoutHeadsCheck)
        {
            return Ok(None);
        }
        let (items, register) = if reads_items {
            let Some(register) = held
                .register
                .as_ref()
                .and_then(|register| register.extend(&extension.new_changes()))
            else {
                return Ok(None);
            };
            // Items that do not read are rejected by the full path, with its reason.
            let Ok(items) = register.items(&signed.meta) else {
                return Ok(None);
            };
            (items, Some(register))
        } else {
            (Vec::new(), None)
        };
        let published_at = extension.published_at;
        Ok(Some(Received::Newer(Box::new(VerifiedDocument {
            signed: signed.clone(),
            bytes: VerifiedBytes::Appended(extension),
            items,
            published_at,
            register,
        }))))
    }

    /// Marks a wanted document as answered in the earliest batch waiting for it.
    fn resolve(&mut self, doc: DocId) -> Result<(), SessionError> {
        for batch in &mut self.batches {
            if batch.pending.remove(&doc) {
                return Ok(());
            }
        }
        Err(SessionError::Protocol(format!(
            "document {doc} sent but not wanted"
        )))
    }

    /// Completes finished batches in order: writes what they brought together with the new
    /// checkpoint, then acknowledges.
    fn advance(&mut self, host: &mut impl SyncHost) -> Result<(), SessionError> {
        let mut completed = None;
        while self.batches.front().is_some_and(|b| b.pending.is_empty()) {
            completed = self.batches.pop_front().map(|b| b.up_to);
        }
        let Some(up_to) = completed else {
            return Ok(());
        };
        debug_assert!(up_to >= self.checkpoint.up_to);
        self.checkpoint.up_to = up_to;
        self.flush(Some(self.checkpoint), host)?;
        self.stats.pulled_up_to = up_to;
        self.control.push_back(Message::Ack { up_to });
        if up_to >= self.stats.peer_tip && self.batches.is_empty() {
            self.at_peer_tip = true;
            self.events.push_back(Event::CaughtUp);
        }
        Ok(())
    }

    fn flush(
        &mut self,
        checkpoint: Option<Checkpoint>,
        host: &mut impl SyncHost,
    ) -> Result<(), SessionError> {
        let documents: Vec<VerifiedDocument> =
            std::mem::take(&mut self.writes).into_values().collect();
        let mut stored: Vec<(DocId, Vec<[u8; 32]>)> = documents
            .iter()
            .map(|d| (d.signed.meta.id(), d.signed.heads.clone()))
            .collect();
        let count = stored.len();
        let refusals = host.commit(&self.peer.ods, documents, checkpoint)?;
        debug_assert!(refusals.len() <= count);
        if !refusals.is_empty() {
            let refused: BTreeSet<DocId> = refusals.iter().map(|r| r.doc).collect();
            stored.retain(|(doc, _)| !refused.contains(doc));
        }
        self.stats.refused += refusals.len() as u64;
        self.events.extend(refusals.into_iter().map(Event::Refused));
        if checkpoint.is_some() || !stored.is_empty() {
            self.events.push_back(Event::Stored {
                documents: stored,
                checkpoint: checkpoint.map(|c| c.up_to),
            });
        }
        Ok(())
    }

    fn on_ack(&mut self, up_to: u64, host: &mut impl SyncHost) -> Result<(), SessionError> {
        let Some(serving) = &mut self.serving else {
            return Err(SessionError::Protocol("Ack before Pull".into()));
        };
        if up_to > serving.offered_up_to || up_to < self.stats.peer_acked {
            return Err(SessionError::Protocol(format!(
                "ack of position {up_to}, outside what was offered"
            )));
        }
        while serving.outstanding.front().is_some_and(|&o| o <= up_to) {
            serving.outstanding.pop_front();
        }
        if serving.outstanding.is_empty() {
            if let Some(docs) = serving.backfill_in_flight.take() {
                host.backfill_done(&self.peer.ods, &docs)?;
            }
            // Nothing in flight: the backfill queue may be served now (see `next_offer`).
            serving.caught_up = false;
        }
        self.stats.peer_acked = up_to;
        self.events.push_back(Event::PeerAcked { up_to });
        Ok(())
    }

    /// The changes for the next wanted document, re-checking policy: a peer may only ever get
    /// what the decision function allows, whatever it asks for.
    fn next_changes(&mut self, host: &mut impl SyncHost) -> Result<Option<Message>, SessionError> {
        let Some(want) = self.wanted.pop_front() else {
            return Ok(None);
        };
        let Some(held) = Self::held_to_send(want.doc, &want.have, host)? else {
            return Ok(Some(Message::Missing { doc: want.doc }));
        };
        if host.decide(&held.meta, &self.peer)? != Decision::Send {
            return Ok(Some(Message::Missing { doc: want.doc }));
        }
        let size: usize = held.changes.iter().map(Vec::len).sum::<usize>() + held.signed.len();
        if size + 1024 > MAX_FRAME_BYTES {
            self.events.push_back(Event::Unsendable {
                doc: want.doc,
                bytes: size,
            });
            return Ok(Some(Message::Missing { doc: want.doc }));
        }
        self.stats.documents_sent += 1;
        if let (Some(serving), Some(heads)) = (&mut self.serving, held.signed_heads()) {
            remember_peer_holds(&mut serving.peer_holds, want.doc, heads);
        }
        Ok(Some(Message::Changes {
            meta: held.meta,
            changes: held.changes,
            signed: held.signed,
        }))
    }

    /// What a holder of `have` lacks of the held copy of `doc`; for a first copy (`have`
    /// empty) the stored bytes (Automerge's compressed form, already saved, and any changes
    /// a relay appended). Asks the host to tell it from the appended changes first, and reads
    /// the whole document only where that cannot. `None` where nothing is held or the stored
    /// copy does not load.
    fn held_to_send(
        doc: DocId,
        have: &[[u8; 32]],
        host: &mut impl SyncHost,
    ) -> Result<Option<ChangesToSend>, SessionError> {
        if have.is_empty() {
            return Ok(host.document(doc)?.map(|held| ChangesToSend {
                meta: held.meta,
                signed: held.signed,
                changes: vec![held.snapshot],
            }));
        }
        let mut to_send = match host.changes_after(doc, have)? {
            HeldChanges::NotHeld => return Ok(None),
            HeldChanges::Lacking(to_send) => to_send,
            HeldChanges::Unknown => {
                let Some(held) = host.document(doc)? else {
                    return Ok(None);
                };
                let Some(changes) = Self::changes_from_document(&held, have, host) else {
                    return Ok(None);
                };
                ChangesToSend {
                    meta: held.meta,
                    signed: held.signed,
                    changes,
                }
            }
        };
        if host.planted_bug() == Some(PlantedBug::ForgeChanges) {
            to_send.changes = to_send
                .changes
                .iter()
                .map(|c| crate::planted::forged(c))
                .collect();
        }
        Ok(Some(to_send))
    }

    /// The changes a holder of `have` (not empty) lacks of `held`, from the appended
    /// changes' index where that can tell. None when the stored copy does not load.
    fn changes_from_document(
        held: &HeldDocument,
        have: &[[u8; 32]],
        host: &mut impl SyncHost,
    ) -> Option<Vec<Vec<u8>>> {
        debug_assert!(!have.is_empty(), "a first copy is the stored bytes");
        if let Some(changes) = held
            .appended
            .as_ref()
            .and_then(|appended| relay::changes_after(&held.snapshot, appended, have))
        {
            return Some(changes);
        }
        Self::changes_for(held, have, host)
    }

    /// Versions of `entries` to push ahead of their offer: those of documents whose heads
    /// the peer is believed to hold, whose changes since are small. Each entry is one the
    /// decision function let this peer be offered.
    fn pushes_for(
        peer_holds: &std::collections::HashMap<DocId, Vec<[u8; 32]>>,
        entries: &[OfferEntry],
        host: &mut impl SyncHost,
    ) -> Result<Vec<Message>, SessionError> {
        let mut pushes = Vec::new();
        for entry in entries {
            let Some(base) = peer_holds.get(&entry.doc) else {
                continue;
            };
            if *base == entry.heads {
                continue;
            }
            let Some(held) = Self::held_to_send(entry.doc, base, host)? else {
                continue;
            };
            // The version offered, not a newer one stored since: the offer names these heads.
            if held.signed_heads().as_deref() != Some(entry.heads.as_slice()) {
                continue;
            }
            let size: usize = held.changes.iter().map(Vec::len).sum();
            if held.changes.is_empty() || size > PUSH_MAX_BYTES {
                continue;
            }
            pushes.push(Message::Pushed {
                base: base.clone(),
                meta: held.meta,
                changes: held.changes,
                signed: held.signed,
            });
        }
        Ok(pushes)
    }

    /// The next offer from our feed, if the peer has room for one and the feed has more.
    fn next_offer(
        &mut self,
        now: u64,
        host: &mut impl SyncHost,
    ) -> Result<Option<Message>, SessionError> {
        let Some(serving) = &mut self.serving else {
            return Ok(None);
        };
        if serving.caught_up
            || serving.backfill_in_flight.is_some()
            || serving.outstanding.len() >= MAX_OUTSTANDING_OFFERS
        {
            return Ok(None);
        }
        let tip = host.feed_tip()?;
        self.stats.local_tip = tip;
        for _ in 0..SILENT_BATCHES_PER_POLL {
            let page = host.offerable_after(&self.peer, serving.offered_up_to, OFFER_BATCH)?;
            let Some(up_to) = page.read_up_to else {
                return Self::drained(serving, &self.peer, now, tip, host);
            };
            assert!(up_to > serving.offered_up_to, "feed went backwards");
            let entries = page.entries;
            serving.offered_up_to = up_to;
            if entries.is_empty() {
                // Nothing here for this peer: move past it without a frame. The position
                // reaches the peer with its next offer, or in an announcement.
                continue;
            }
            serving.announced = Some(up_to);
            serving.outstanding.push_back(up_to);
            let pushes = Self::pushes_for(&serving.peer_holds, &entries, host)?;
            for push in &pushes {
                if let Message::Pushed { meta, .. } = push {
                    let entry = entries.iter().find(|e| e.doc == meta.id());
                    let heads = entry.expect("pushed from an entry").heads.clone();
                    remember_peer_holds(&mut serving.peer_holds, meta.id(), heads);
                }
            }
            self.stats.documents_pushed += pushes.len() as u64;
            let offer = Message::Offer {
                entries,
                up_to,
                tip: tip.max(up_to),
            };
            if pushes.is_empty() {
                return Ok(Some(offer));
            }
            // The pushes go first, then the offer that names them, before anything queued
            // after this call.
            let mut ahead = VecDeque::from(pushes);
            ahead.push_back(offer);
            ahead.append(&mut self.control);
            self.control = ahead;
            return Ok(self.control.pop_front());
        }
        // Many entries, none for this peer: let the caller serve other sessions, and come
        // back at once.
        serving.caught_up = true;
        serving.next_check_at = now;
        Ok(None)
    }

    /// The feed has nothing after what was offered: serve the backfill queue if nothing is in
    /// flight, or tell the peer where it stands (at most once per [`ANNOUNCE_INTERVAL_MS`]),
    /// then wait for the feed to grow.
    fn drained(
        serving: &mut Serving,
        peer: &Recipient,
        now: u64,
        tip: u64,
        host: &mut impl SyncHost,
    ) -> Result<Option<Message>, SessionError> {
        if serving.outstanding.is_empty() {
            // Backfill only once the feed is drained and acknowledged: a publisher's new
            // sharing record (consent given again) is then held by the peer before the
            // documents it makes sendable arrive, so the peer's own decision lets them in.
            let rows = host.backfill(&peer.ods, OFFER_BATCH)?;
            if !rows.is_empty() {
                let docs: Vec<DocId> = rows.iter().map(|row| row.meta.id()).collect();
                let entries = sendable(rows, peer, host)?;
                let up_to = serving.offered_up_to;
                serving.outstanding.push_back(up_to);
                serving.backfill_in_flight = Some(docs);
                serving.announced = Some(up_to);
                return Ok(Some(Message::Offer {
                    entries,
                    up_to,
                    tip: tip.max(up_to),
                }));
            }
        }
        serving.caught_up = true;
        serving.next_check_at = now + FEED_CHECK_INTERVAL_MS;
        if serving.announced == Some(serving.offered_up_to) {
            return Ok(None);
        }
        if now < serving.next_announce_at {
            serving.next_check_at = serving.next_check_at.min(serving.next_announce_at);
            return Ok(None);
        }
        // Tell the peer it has everything up to here, so it can say when it last synced and
        // resume from here after a reconnect.
        serving.announced = Some(serving.offered_up_to);
        serving.next_announce_at = now + ANNOUNCE_INTERVAL_MS;
        serving.outstanding.push_back(serving.offered_up_to);
        Ok(Some(Message::Offer {
            entries: Vec::new(),
            up_to: serving.offered_up_to,
            tip: tip.max(serving.offered_up_to),
        }))
    }

    pub fn local(&self) -> &OdsCode {
        &self.local
    }
}

/// Records that the peer holds (or will, once what is in flight is taken) `heads` of `doc`.
fn remember_peer_holds(
    peer_holds: &mut std::collections::HashMap<DocId, Vec<[u8; 32]>>,
    doc: DocId,
    heads: Vec<[u8; 32]>,
) {
    if peer_holds.len() >= PUSH_KNOWN_DOCUMENTS
        && !peer_holds.contains_key(&doc)
        && let Some(&forgotten) = peer_holds.keys().next()
    {
        peer_holds.remove(&forgotten);
    }
    peer_holds.insert(doc, heads);
}

/// Where to serve a puller from: its position `since` while our feed still holds it; where
/// the epoch it was taken in ended, if our feed lost positions after that (they were handed
/// out again); the start for another feed, an epoch we do not know, or a position past our
/// tip (nothing else can explain one: serving from the start costs only the heads check).
fn resume_position(
    same_feed: bool,
    since: u64,
    tip: u64,
    epoch_end: impl FnOnce() -> Result<EpochEnd, HostError>,
) -> Result<u64, HostError> {
    if !same_feed {
        return Ok(0);
    }
    Ok(match epoch_end()? {
        EpochEnd::Current if since <= tip => since,
        EpochEnd::Current | EpochEnd::Unknown => 0,
        EpochEnd::EndedAt(end) => since.min(end),
    })
}

/// [`SyncHost::offerable_after`] by reading the feed and deciding each entry.
pub fn offerable_from_feed<H: SyncHost + ?Sized>(
    host: &mut H,
    peer: &Recipient,
    after: u64,
    limit: usize,
) -> Result<OfferPage, HostError> {
    let rows = host.feed_after(after, limit)?;
    let read_up_to = rows.last().map(|row| row.seq);
    Ok(OfferPage {
        entries: sendable(rows, peer, host)?,
        read_up_to,
    })
}

/// The offer entries among `rows` that policy lets `peer` hold.
fn sendable<H: SyncHost + ?Sized>(
    rows: Vec<FeedEntry>,
    peer: &Recipient,
    host: &H,
) -> Result<Vec<OfferEntry>, HostError> {
    let mut entries = Vec::with_capacity(rows.len());
    for row in rows {
        if host.decide(&row.meta, peer)? == Decision::Send {
            entries.push(OfferEntry {
                doc: row.meta.id(),
                heads: row.heads,
            });
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests;
