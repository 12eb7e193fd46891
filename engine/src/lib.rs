//! The sync engine: one sans-IO [`Driver`] per node that owns the node's store, runs a
//! [`Session`] per connected peer against it, and commits what the sessions receive before
//! anything is acknowledged.
//!
//! ```text
//!   connect / receive / disconnected ──▶ ┌──────────────── Driver ────────────────┐
//!   (inside begin_turn … end_turn)       │ StoreHost (the store's one writer)      │
//!   write_local (between turns) ───────▶ │                                          │
//!   handle_timeout(now) ───────────────▶ │ Session per peer                        │
//!                                        │ group commit per turn, then frames      │
//!   poll_transmit(now, room) ◀────────── │                                          │
//!   poll_event() ◀────────────────────── │ Close, Stored (durable), Rejected, …    │
//!   poll_timeout() ◀──────────────────── └──────────────────────────────────────────┘
//! ```
//!
//! Like quinn-proto's `Connection`, the driver does no IO and reads no clock: time comes in
//! as milliseconds from the caller's epoch, bytes come in and frames go out, and the caller
//! arms one timer. `node::network` runs it over QUIC on a thread of its own; the simulator
//! runs the same driver over simulated links in virtual time, so what the simulator checks
//! is the code that ships.
//!
//! Invariants:
//! - **Nothing is acknowledged before it is durable.** Received documents are written inside
//!   the turn's group commit; frames (acknowledgements among them) are produced only between
//!   turns ([`Driver::poll_transmit`] asserts it), so after the group committed. With
//!   [`Driver::defer_syncs`] a commit does not wait for the disk: a frame produced after it
//!   is held in the driver until the caller reports that commit durable
//!   ([`Driver::poll_sync`], [`Driver::durable`]), and the engine goes on with the next turn
//!   meanwhile. A group that fails to commit closes every session, whose unsent
//!   acknowledgements go with them.
//! - [`DriverEvent::Stored`] is reported only once the turn that stored it is durable.
//! - At most one session per peer organisation: of two connections, the one dialled by the
//!   lower ODS code survives; of two from the same dialler, the newer.
//! - The driver is the store's only writer: the node's own writes come in through
//!   [`Driver::write_local`], which tells the sessions when the feed grew. Nothing polls the
//!   database for writes made elsewhere.
//! - A session lasts only while the registry in force trusts the key its peer authenticated
//!   with; checked before any frame is produced.

use caremesh_storage::sync_host::StoreHost;
use caremesh_storage::{PeerStatus, StorageError};
use caremesh_sync::planted::PlantedBug;
use caremesh_sync::policy::Recipient;
use caremesh_sync::{
    DocId, Event, KeyRefusal, OdsCode, ReadInput, Refusal, Session, SessionError, SessionStats,
    SignedCheckpoint, SyncHost, VerifiedRegistry,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

mod redial;

pub use redial::Redial;

/// A document and the heads now held of it.
pub type HeldVersion = (DocId, Vec<[u8; 32]>);

/// A connection, as the caller numbers them: unique among the driver's live connections.
pub type ConnId = u64;

/// How soon after storing documents from one peer the driver offers them to the others. Not
/// at once: a hub storing changes from many peers tells its sessions once per this interval,
/// not once per change.
pub const FEED_PROMPT_MS: u64 = 20;
/// How often peer status is written for `caremesh status` and /metrics, when it changed.
pub const STATUS_FLUSH_MS: u64 = 1_000;
/// Bytes of frames a connection may have held back waiting for a commit to be durable
/// ([`Driver::defer_syncs`]) before its session produces no more: one sync's worth of a
/// busy peer's acknowledgements and offers, bounded.
pub const HELD_BYTES_PER_CONNECTION: usize = 256 * 1024;
/// How often an unchanged status row is written all the same: it is the session's heartbeat,
/// read as stale after `caremesh_storage::STATUS_STALE_AFTER_SECONDS` (10 s).
pub const STATUS_HEARTBEAT_MS: u64 = 3_000;

/// What the caller chooses about a driver.
#[derive(Debug, Clone, Default)]
pub struct DriverOptions {
    /// Report every received frame ([`DriverEvent::Received`]) for a wire log.
    pub log_received_frames: bool,
}

/// Why the driver closed a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCause {
    /// The peer broke the protocol or sent what could not be handled.
    Protocol,
    /// The peer said no Hello in time (a slow or lossy link, or not a caremesh peer).
    HelloTimeout,
    /// The registry in force no longer trusts the peer's key.
    Untrusted,
    /// A newer connection to the same peer won the tie-break.
    Replaced,
    /// A group commit failed: what the session believed stored was rolled back.
    StorageFailed,
    /// The database is damaged: the node stops ([`DriverEvent::Stopped`]).
    StorageDamaged,
    /// The caller reported the connection gone, or the node is shutting down.
    Ended,
    /// This node takes the peer's feed again from the start (its own documents came back
    /// from a peer: it lost them, and may have refused others' documents meanwhile). The
    /// connection is made again and pulls from the start.
    PullAgain,
}

impl CloseCause {
    /// Whether the close counts as a failure of the peer or of storage (for metrics).
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            CloseCause::Protocol
                | CloseCause::HelloTimeout
                | CloseCause::StorageFailed
                | CloseCause::StorageDamaged
        )
    }
}

/// Something the caller must act on or may report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverEvent {
    /// The database is damaged (`reason` says how it was found): every session was closed
    /// and none is accepted. The node must stop, saying why, rather than serve or spread
    /// what it can no longer trust.
    Stopped { reason: String },
    /// A session began with `peer` over `conn`.
    PeerUp { conn: ConnId, peer: OdsCode },
    /// The session over `conn` ended: close the connection with `reason`.
    Close {
        conn: ConnId,
        peer: OdsCode,
        reason: String,
        cause: CloseCause,
    },
    /// Documents from `peer` are durably stored (each with the heads now held).
    Stored {
        peer: OdsCode,
        documents: Vec<HeldVersion>,
    },
    /// A received document failed verification; nothing of it was stored (and the driver
    /// recorded the rejection in the store).
    Rejected {
        peer: OdsCode,
        doc: DocId,
        publisher: OdsCode,
        reason: String,
    },
    /// A received document verified but policy does not let this node hold it.
    Refused { peer: OdsCode, refusal: Refusal },
    /// A document `peer` wants is too large to send (recorded in the store, logged).
    Unsendable {
        peer: OdsCode,
        doc: DocId,
        bytes: usize,
    },
    /// A frame arrived (only with [`DriverOptions::log_received_frames`]).
    Received {
        peer: OdsCode,
        kind: &'static str,
        docs: Vec<DocId>,
    },
}

/// A frame for the connection `conn`.
#[derive(Debug)]
pub struct Transmit {
    pub conn: ConnId,
    pub frame: Vec<u8>,
}

impl Transmit {
    /// What the other end's reader makes of this frame. A transmit is whole frames, so a
    /// caller that delivers transmits whole, in process, needs no reader of its own.
    pub fn read(&self) -> ReadInput {
        caremesh_sync::FrameReader::default().read(&self.frame)
    }
}

/// A connection's frames waiting for their commits to be durable.
#[derive(Default)]
struct HeldFrames {
    frames: VecDeque<(u64, Vec<u8>)>,
    bytes: usize,
}

/// A connection's authenticated peer, as [`Driver::connect`] is given it.
struct Peer {
    recipient: Recipient,
    key: [u8; 32],
    dialled_by_us: bool,
}

struct Live {
    conn: ConnId,
    session: Session,
    /// The key the peer authenticated with: the session lasts only while the registry in
    /// force trusts it for the peer's organisation.
    key: [u8; 32],
    /// Who dialled: decides which of two simultaneous connections survives.
    dialler: OdsCode,
    /// The status row as it stood when the session began; session counters add to it.
    base: PeerStatus,
    connected_since: i64,
    last_sync_at: Option<i64>,
    /// What the status row last written said, and when (ms): unchanged rows are rewritten
    /// only as a heartbeat.
    saved: Option<(SessionStats, Option<i64>)>,
    saved_at: u64,
}

/// One node's sync engine (see the crate documentation).
pub struct Driver {
    ods: OdsCode,
    host: StoreHost,
    options: DriverOptions,
    sessions: BTreeMap<OdsCode, Live>,
    peers_by_conn: HashMap<ConnId, OdsCode>,
    /// Sessions that may have something to send: they received input, their timer fired,
    /// the feed grew. Only these are polled, so a hub with hundreds of quiet peers does not
    /// visit them all for every frame it receives.
    ready: BTreeSet<OdsCode>,
    /// Ready sessions whose connection had no room when last asked.
    blocked: BTreeSet<OdsCode>,
    /// The registry edition the sessions were last checked against.
    registry_version: u64,
    /// The count of the newest own audit checkpoint handed to the sessions.
    audit_checkpoint_seen: u64,
    /// Sessions that caught up with their peer this turn, or every session once this node's
    /// own documents came back: each restarts its pull if its peer is marked for it.
    pull_again_candidates: BTreeSet<OdsCode>,
    /// Whether the warning that this node lost documents of its own was given.
    told_own_documents_returned: bool,
    /// Peers this process has caught up with: a hold on publishing (a restored node's) ends
    /// once every peer this node syncs with is among them.
    caught_up_with: BTreeSet<OdsCode>,
    /// Whether this process found no hold on publishing left to end.
    no_publishing_hold: bool,
    /// The local feed tip last told to the sessions.
    last_tip: u64,
    /// When to tell the sessions of documents stored from peers (see [`FEED_PROMPT_MS`]).
    next_feed_look: Option<u64>,
    next_flush: u64,
    /// A turn is open: writes go into one group commit and no frame is produced.
    in_turn: bool,
    /// Documents stored in the open turn, reported once it is durable.
    stored_in_turn: Vec<(OdsCode, Vec<HeldVersion>)>,
    /// Group commits made, counting from 1; the highest of them known durable; the highest
    /// handed to the caller to sync ([`Driver::poll_sync`]). Without [`Driver::defer_syncs`]
    /// every commit is durable when it returns.
    committed: u64,
    durable: u64,
    sync_asked: u64,
    defer_syncs: bool,
    /// Frames produced while a commit before them was not yet durable, in order per
    /// connection, each with the commit it waits for. Never an empty queue.
    held: BTreeMap<ConnId, HeldFrames>,
    /// Connections whose first held frame may leave; and those of them that had no room
    /// when last asked (asked again on [`Driver::retry_blocked`]).
    releasable: BTreeSet<ConnId>,
    release_blocked: BTreeSet<ConnId>,
    /// Stored documents whose commit is not yet durable, with that commit.
    stored_waiting: VecDeque<(u64, OdsCode, Vec<HeldVersion>)>,
    events: VecDeque<DriverEvent>,
    /// The caller's time at its last call, for timers set while handling it.
    now: u64,
    planted: Option<PlantedBug>,
    /// The database was found damaged: why (see [`DriverEvent::Stopped`]).
    damaged: Option<String>,
}

impl Driver {
    /// A driver for the node `ods` over `host`, at `now` (ms on the caller's clock).
    pub fn new(ods: OdsCode, host: StoreHost, options: DriverOptions, now: u64) -> Driver {
        let last_tip = host.store.feed_tip().unwrap_or(0);
        Driver {
            ods,
            host,
            next_feed_look: None,
            options,
            sessions: BTreeMap::new(),
            peers_by_conn: HashMap::new(),
            ready: BTreeSet::new(),
            blocked: BTreeSet::new(),
            registry_version: 0,
            audit_checkpoint_seen: 0,
            pull_again_candidates: BTreeSet::new(),
            told_own_documents_returned: false,
            caught_up_with: BTreeSet::new(),
            no_publishing_hold: false,
            last_tip,
            next_flush: now + STATUS_FLUSH_MS,
            in_turn: false,
            stored_in_turn: Vec::new(),
            committed: 0,
            durable: 0,
            sync_asked: 0,
            defer_syncs: false,
            held: BTreeMap::new(),
            releasable: BTreeSet::new(),
            release_blocked: BTreeSet::new(),
            stored_waiting: VecDeque::new(),
            events: VecDeque::new(),
            now,
            planted: None,
            damaged: None,
        }
    }

    /// After each turn: if anything this turn read or wrote found the database damaged,
    /// every session closes, no other opens, and the caller is told to stop the node.
    fn stop_if_damaged(&mut self) {
        if self.damaged.is_some() {
            return;
        }
        let Some(reason) = self.host.store.damage() else {
            return;
        };
        tracing::error!(%reason, "the database is damaged: closing every sync session and stopping, so that nothing read from it is served or sent; keep the file for inspection, then restore it from a backup or rebuild the node from its peers");
        self.stop(
            reason,
            "this node's database is damaged",
            CloseCause::StorageDamaged,
        );
    }

    /// Stops the node for `reason`: every session closes (`closing` says why to the peer),
    /// none opens again, and the caller is told ([`DriverEvent::Stopped`]).
    fn stop(&mut self, reason: String, closing: &str, cause: CloseCause) {
        self.damaged = Some(reason.clone());
        self.close_every_session(closing, cause);
        self.events.push_back(DriverEvent::Stopped { reason });
    }

    fn close_every_session(&mut self, reason: &str, cause: CloseCause) {
        let peers: Vec<OdsCode> = self.sessions.keys().cloned().collect();
        for peer in peers {
            self.close(&peer, reason, cause);
        }
    }

    /// Plants a bug (the simulator's self-tests only; see [`PlantedBug`]).
    #[doc(hidden)]
    pub fn plant(&mut self, bug: PlantedBug) {
        self.planted = Some(bug);
        self.host.plant(bug);
    }

    /// The host, for reads.
    pub fn host(&self) -> &StoreHost {
        &self.host
    }

    /// The organisations with a live session.
    pub fn connected_peers(&self) -> impl Iterator<Item = &OdsCode> {
        self.sessions.keys()
    }

    /// Opens a turn: what the inputs until [`Driver::end_turn`] store commits together, with
    /// one fsync, before any frame is produced.
    pub fn begin_turn(&mut self) {
        assert!(!self.in_turn, "turns do not nest");
        self.in_turn = true;
        // Another connection (a benchmark's publisher) may have written since the last turn:
        // the sessions this turn wakes read the feed's tip afresh, once for all of them.
        self.host.feed_may_have_grown();
        self.host.store.begin_group();
    }

    /// Commits the turn. If the commit fails, what the sessions believe stored was rolled
    /// back: every session is closed before it can acknowledge it.
    pub fn end_turn(&mut self) {
        assert!(self.in_turn, "no turn to end");
        self.in_turn = false;
        let committed = match self.host.store.end_group() {
            Ok(committed) => committed,
            Err(error) => {
                self.commit_failed(&error);
                return;
            }
        };
        if committed {
            self.committed += 1;
            if !self.defer_syncs {
                // Nothing is ever held without deferred syncs.
                self.durable = self.committed;
            }
        }
        for (peer, documents) in std::mem::take(&mut self.stored_in_turn) {
            self.stored_waiting
                .push_back((self.committed, peer, documents));
        }
        self.report_durable();
        self.stop_if_damaged();
        self.pull_again_where_marked();
        self.release_publishing_when_caught_up();
    }

    /// Ends a hold on publishing (`caremesh_storage::publishing_hold`) once this node has
    /// caught up with every peer it syncs with: by then each has given back what it held of
    /// this node's own documents.
    fn release_publishing_when_caught_up(&mut self) {
        if self.no_publishing_hold || self.caught_up_with.is_empty() {
            return;
        }
        let released = (|| -> Result<Option<Vec<String>>, StorageError> {
            let Some(hold) = self.host.store.publishing_hold()? else {
                return Ok(None);
            };
            if !hold.held {
                return Ok(None);
            }
            let peers: Vec<String> = self
                .host
                .store
                .peer_statuses()?
                .into_iter()
                .map(|status| status.peer)
                .collect();
            let waiting = peers
                .iter()
                .any(|peer| !self.caught_up_with.iter().any(|done| done.as_str() == peer));
            if waiting {
                return Ok(Some(Vec::new()));
            }
            let batch = self.host.store.write()?;
            batch.release_publishing()?;
            batch.commit()?;
            Ok(Some(peers))
        })();
        match released {
            Ok(None) => self.no_publishing_hold = true,
            Ok(Some(peers)) if peers.is_empty() => {}
            Ok(Some(peers)) => {
                self.no_publishing_hold = true;
                tracing::info!(peers = %peers.join(","), "caught up with every peer after a restore or rebuild: publishing resumes");
            }
            Err(error) => {
                tracing::error!(%error, "could not read or end the hold on publishing; tried again when a peer next catches up")
            }
        }
    }

    /// A group commit failed: what the sessions believe stored was rolled back, so every
    /// session is closed before it can acknowledge it.
    fn commit_failed(&mut self, error: &StorageError) {
        self.stored_in_turn.clear();
        self.host.forget_cached();
        if self.planted == Some(PlantedBug::AckAfterFailedCommit) {
            return;
        }
        tracing::error!(%error, "a group commit failed; closing every sync session");
        self.close_every_session("storage failed to commit", CloseCause::StorageFailed);
        self.stop_if_damaged();
    }

    /// From now on a turn's commit does not wait for the disk ([`Store::defer_group_syncs`]):
    /// the caller takes each commit to sync from [`Driver::poll_sync`], syncs it with the
    /// store's [`caremesh_storage::WalSyncer`] (on another thread, while the driver goes on
    /// with the next turn) and reports it with [`Driver::durable`]. Until then the frames
    /// produced after it wait in the driver.
    ///
    /// [`Store::defer_group_syncs`]: caremesh_storage::Store::defer_group_syncs
    pub fn defer_syncs(&mut self) {
        self.host.store.defer_group_syncs();
        self.defer_syncs = true;
    }

    /// A commit the caller should sync and then report with [`Driver::durable`], if one was
    /// made since the last asked for. Syncing it makes every commit before it durable too.
    pub fn poll_sync(&mut self) -> Option<u64> {
        if self.committed > self.sync_asked {
            self.sync_asked = self.committed;
            return Some(self.committed);
        }
        None
    }

    /// Commit `commit` (from [`Driver::poll_sync`]) and every one before it are durable: the
    /// frames produced after them may leave, and what they stored is reported.
    pub fn durable(&mut self, commit: u64) {
        assert!(
            commit <= self.committed,
            "only a commit made can be durable"
        );
        self.durable = self.durable.max(commit);
        self.mark_releasable();
        self.report_durable();
        // Sessions held back for frames waiting on this commit may produce again.
        self.retry_blocked();
    }

    /// The sync of a commit failed: the disk may not hold what the sessions believe stored.
    /// Like damage, this stops the node: every session closes (its held frames with it).
    pub fn sync_failed(&mut self, reason: &str) {
        if self.damaged.is_some() {
            return;
        }
        tracing::error!(%reason, "could not make a commit durable: closing every sync session and stopping, so that nothing is acknowledged that the disk may not hold");
        self.stop(
            format!("the disk did not sync a commit: {reason}"),
            "this node's disk failed",
            CloseCause::StorageFailed,
        );
    }

    /// Reports what durable commits stored.
    fn report_durable(&mut self) {
        while let Some((commit, _, _)) = self.stored_waiting.front() {
            if *commit > self.durable {
                break;
            }
            let (_, peer, documents) = self.stored_waiting.pop_front().expect("front exists");
            self.events
                .push_back(DriverEvent::Stored { peer, documents });
        }
    }

    /// Restarts the pull of every caught-up session whose peer is marked to be pulled again
    /// (`WriteBatch::pull_again_from_every_peer`): its checkpoint goes back to the start and
    /// the session closes, to be connected again. A node whose own documents came back from
    /// a peer lost them, and refused other organisations' documents about those patients
    /// while it did not know it cared for them; its checkpoints passed them, and only a
    /// second pass, made once its own documents are back, brings them.
    fn pull_again_where_marked(&mut self) {
        if self.host.take_own_documents_returned() {
            if !self.told_own_documents_returned {
                self.told_own_documents_returned = true;
                tracing::warn!(
                    "this node's own documents came back from a peer: it lost them (a rebuild from its peers, a restore from a backup, or a disk that lost writes); each peer's feed is taken again from the start once caught up, for what was refused meanwhile"
                );
            }
            self.pull_again_candidates
                .extend(self.sessions.keys().cloned());
        }
        for ods in std::mem::take(&mut self.pull_again_candidates) {
            let caught_up = self
                .sessions
                .get(&ods)
                .is_some_and(|live| live.session.is_caught_up());
            if !caught_up {
                continue; // checked again when it catches up
            }
            let restarted = self.host.store.pulls_again(&ods).and_then(|marked| {
                if !marked {
                    return Ok(false);
                }
                let batch = self.host.store.write()?;
                batch.restart_pull(&ods)?;
                batch.commit()?;
                Ok(true)
            });
            match restarted {
                Ok(true) => {
                    tracing::info!(peer = %ods, "taking the peer's changes feed again from the start");
                    self.close(
                        &ods,
                        "taking the peer's changes feed again from the start: this node's own documents came back from a peer",
                        CloseCause::PullAgain,
                    );
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::error!(peer = %ods, %error, "could not restart the pull of a peer's feed; tried again when it next catches up")
                }
            }
        }
    }

    /// Runs one input as a turn of its own.
    fn in_own_turn<T>(&mut self, input: impl FnOnce(&mut Driver) -> T) -> T {
        let own = !self.in_turn;
        if own {
            self.begin_turn();
        }
        let result = input(self);
        if own {
            self.end_turn();
        }
        result
    }

    /// A connection to `peer` authenticated with `key`: starts its session unless another
    /// connection to the same peer wins the tie-break. Returns whether it was accepted; a
    /// refused connection should be closed by the caller.
    pub fn connect(
        &mut self,
        now: u64,
        conn: ConnId,
        (peer, key): (Recipient, [u8; 32]),
        dialled_by_us: bool,
    ) -> bool {
        self.now = now;
        let peer = Peer {
            recipient: peer,
            key,
            dialled_by_us,
        };
        self.in_own_turn(|driver| driver.open(conn, peer))
    }

    /// Starts the session for `peer` at the time of the last call.
    fn open(&mut self, conn: ConnId, peer: Peer) -> bool {
        let Peer {
            recipient: peer,
            key,
            dialled_by_us,
        } = peer;
        let now = self.now;
        let dialler = if dialled_by_us {
            self.ods.clone()
        } else {
            peer.ods.clone()
        };
        if self.damaged.is_some() {
            return false;
        }
        // The registry may have changed since the handshake checked the key.
        if let Some(reason) = untrusted(&self.host.registry(), &peer.ods, &key) {
            tracing::warn!(peer = %peer.ods, reason, "refused a sync session");
            return false;
        }
        if let Some(existing) = self.sessions.get(&peer.ods)
            && existing.dialler < dialler
        {
            return false;
        }
        if self.sessions.contains_key(&peer.ods) {
            self.close(
                &peer.ods,
                "replaced by a newer connection",
                CloseCause::Replaced,
            );
        }
        let mut session = match Session::new(self.ods.clone(), peer.clone(), now, &mut self.host) {
            Ok(session) => session,
            Err(error) => {
                tracing::error!(peer = %peer.ods, %error, "could not start a sync session");
                return false;
            }
        };
        if self.options.log_received_frames {
            session.log_received_frames();
        }
        let base = self
            .host
            .store
            .peer_status(&peer.ods)
            .ok()
            .flatten()
            .unwrap_or_default();
        let live = Live {
            conn,
            session,
            key,
            dialler,
            last_sync_at: base.last_sync_at,
            base,
            connected_since: self.host.now_unix(),
            saved: None,
            saved_at: now,
        };
        self.peers_by_conn.insert(conn, peer.ods.clone());
        self.sessions.insert(peer.ods.clone(), live);
        self.ready.insert(peer.ods.clone());
        self.events.push_back(DriverEvent::PeerUp {
            conn,
            peer: peer.ods.clone(),
        });
        self.save_status(&peer.ods, None);
        true
    }

    /// What the reader of the connection `conn` made of the peer's bytes: the caller keeps a
    /// [`caremesh_sync::FrameReader`] per connection and reads on whichever thread the bytes
    /// arrive, so that decoding and signature arithmetic stay off the thread that runs this.
    pub fn receive(&mut self, now: u64, conn: ConnId, input: ReadInput) {
        self.now = now;
        let Some(ods) = self.peers_by_conn.get(&conn).cloned() else {
            return;
        };
        self.in_own_turn(|driver| {
            let live = driver
                .sessions
                .get_mut(&ods)
                .expect("peers_by_conn names it");
            let result = live.session.handle_read(input, now, &mut driver.host);
            driver.ready.insert(ods.clone());
            driver.drain_session_events(&ods);
            if let Err(error) = result {
                driver.fail(&ods, &error);
            }
        });
    }

    /// The caller's connection `conn` ended (the peer closed it, the link failed).
    pub fn disconnected(&mut self, conn: ConnId, reason: &str) {
        if let Some(ods) = self.peers_by_conn.get(&conn).cloned() {
            tracing::info!(peer = %ods, %reason, "sync connection ended");
            self.in_own_turn(|driver| driver.close(&ods, reason, CloseCause::Ended));
        }
    }

    /// Closes every session (the node is shutting down) and writes their final status.
    pub fn shut_down(&mut self) {
        let peers: Vec<OdsCode> = self.sessions.keys().cloned().collect();
        self.in_own_turn(|driver| {
            for peer in peers {
                driver.close(&peer, "node shutting down", CloseCause::Ended);
            }
        });
    }

    /// Makes a local write (ingest, a consent change, an access record) through the store's
    /// one writer, then lets every session offer what it added to the feed. The feed is looked
    /// at whatever the write returned: a write that failed part way may have committed a part.
    pub fn write_local<T, E>(
        &mut self,
        write: impl FnOnce(&mut StoreHost) -> Result<T, E>,
    ) -> Result<T, E> {
        assert!(!self.in_turn, "a local write is a transaction of its own");
        let result = write(&mut self.host);
        self.look_at_feed();
        self.stop_if_damaged();
        result
    }

    /// The caller's clock reached `now`: fires session timers, looks at the feed, writes peer
    /// status. Its writes are a turn of their own.
    pub fn handle_timeout(&mut self, now: u64) {
        self.now = now;
        self.in_own_turn(|driver| {
            let mut failed = Vec::new();
            for (ods, live) in &mut driver.sessions {
                if live.session.poll_timeout().is_some_and(|at| at <= now) {
                    if let Err(error) = live.session.handle_timeout(now) {
                        failed.push((ods.clone(), error));
                    }
                    driver.ready.insert(ods.clone());
                }
            }
            for (ods, error) in failed {
                driver.fail(&ods, &error);
            }
            if driver.next_feed_look.is_some_and(|at| at <= now) {
                driver.next_feed_look = None;
                driver.look_at_feed();
            }
            if driver.next_flush <= now {
                driver.next_flush = now + STATUS_FLUSH_MS;
                driver.flush_status();
                driver.hand_on_audit_checkpoint();
            }
        });
        // Outside the turn: the WAL cannot be emptied while a transaction is open.
        self.host.compact_if_due();
    }

    /// When the driver next needs [`Driver::handle_timeout`], in the caller's ms.
    pub fn poll_timeout(&self) -> Option<u64> {
        let sessions = self
            .sessions
            .values()
            .filter_map(|live| live.session.poll_timeout());
        sessions
            .chain(self.next_feed_look)
            .chain(Some(self.next_flush))
            .min()
    }

    /// The next frame for a connection with room (`has_room`), or `None` when no session has
    /// anything to send where there is room. Only between turns: a frame produced inside a
    /// turn could acknowledge what is not yet durable; and a frame produced while the last
    /// commit is not yet durable waits in the driver until it is (see [`Driver::durable`]).
    pub fn poll_transmit(
        &mut self,
        now: u64,
        mut has_room: impl FnMut(ConnId) -> bool,
    ) -> Option<Transmit> {
        assert!(
            !self.in_turn,
            "frames leave only after the turn has committed"
        );
        self.now = now;
        // Before anything is sent: a peer whose key the registry no longer trusts gets
        // nothing more, and what it sends is no longer read.
        self.enforce_registry();
        if let Some(transmit) = self.release_held(&mut has_room) {
            return Some(transmit);
        }
        while let Some(ods) = self.ready.first().cloned() {
            let Some(live) = self.sessions.get_mut(&ods) else {
                self.ready.remove(&ods);
                continue;
            };
            let conn = live.conn;
            let held_full = self
                .held
                .get(&conn)
                .is_some_and(|held| held.bytes >= HELD_BYTES_PER_CONNECTION);
            if held_full || !has_room(conn) {
                self.ready.remove(&ods);
                self.blocked.insert(ods);
                continue;
            }
            let polled = live.session.poll_transmit(now, &mut self.host);
            match polled {
                Ok(Some(frame)) => {
                    self.drain_session_events(&ods);
                    // Behind a commit not yet durable, or behind frames that wait for one
                    // (a connection's frames leave in the order they were produced).
                    let must_wait = self.durable < self.committed || self.held.contains_key(&conn);
                    if must_wait && self.planted != Some(PlantedBug::FramesBeforeDurable) {
                        let held = self.held.entry(conn).or_default();
                        held.bytes += frame.len();
                        held.frames.push_back((self.committed, frame));
                        continue;
                    }
                    return Some(Transmit { conn, frame });
                }
                Ok(None) => {
                    self.ready.remove(&ods);
                    self.drain_session_events(&ods);
                }
                Err(error) => {
                    self.ready.remove(&ods);
                    self.drain_session_events(&ods);
                    // A storage error while producing a frame: a write of its own.
                    self.in_own_turn(|driver| driver.fail(&ods, &error));
                }
            }
        }
        None
    }

    /// The first held frame whose commit is durable, of a connection with room.
    fn release_held(&mut self, has_room: &mut impl FnMut(ConnId) -> bool) -> Option<Transmit> {
        while let Some(conn) = self.releasable.pop_first() {
            let Some(held) = self.held.get_mut(&conn) else {
                continue;
            };
            if !has_room(conn) {
                self.release_blocked.insert(conn);
                continue;
            }
            let (commit, frame) = held.frames.pop_front().expect("held queues are not empty");
            assert!(
                commit <= self.durable,
                "a frame leaves only after its commit is durable"
            );
            held.bytes -= frame.len();
            match held.frames.front() {
                None => {
                    self.held.remove(&conn);
                }
                Some((next, _)) if *next <= self.durable => {
                    self.releasable.insert(conn);
                }
                Some(_) => {}
            }
            return Some(Transmit { conn, frame });
        }
        None
    }

    /// Connections whose first held frame's commit is now durable may send it.
    fn mark_releasable(&mut self) {
        let durable = self.durable;
        for (conn, held) in &self.held {
            if held
                .frames
                .front()
                .is_some_and(|(commit, _)| *commit <= durable)
            {
                self.releasable.insert(*conn);
            }
        }
    }

    /// Whether a session, or a frame that may leave, is held back by a connection without
    /// room.
    pub fn is_blocked(&self) -> bool {
        !self.blocked.is_empty() || !self.release_blocked.is_empty()
    }

    /// Connections may have room again: held-back sessions and frames are asked again.
    pub fn retry_blocked(&mut self) {
        self.ready.append(&mut self.blocked);
        self.releasable.append(&mut self.release_blocked);
    }

    /// Something for the caller.
    pub fn poll_event(&mut self) -> Option<DriverEvent> {
        self.events.pop_front()
    }

    /// The feed grew: the sessions of peers that could be sent something new look at once
    /// ([`StoreHost::peers_to_wake`]); the others at their next feed check.
    fn feed_grew(&mut self) {
        let wake = self.host.peers_to_wake(self.last_tip);
        if let Ok(tip) = self.host.feed_tip() {
            self.last_tip = tip;
        }
        for (ods, live) in &mut self.sessions {
            if wake.includes(live.session.peer()) {
                live.session.feed_changed();
                self.ready.insert(ods.clone());
            }
        }
    }

    fn look_at_feed(&mut self) {
        // A local write (or another process) may have published around the host.
        self.host.feed_may_have_grown();
        match self.host.feed_tip() {
            Ok(tip) if tip != self.last_tip => self.feed_grew(),
            Ok(_) => {}
            Err(error) => tracing::error!(%error, "could not read the local feed"),
        }
    }

    /// Closes a session the peer broke (bad frames, protocol violations, impersonation).
    fn fail(&mut self, ods: &OdsCode, error: &SessionError) {
        let cause = match error {
            SessionError::HelloTimeout => CloseCause::HelloTimeout,
            // Not the peer's doing: this node's database is damaged, and the node stops
            // after this turn (`stop_if_damaged`).
            SessionError::Host(_) if self.host.store.damage().is_some() => {
                CloseCause::StorageDamaged
            }
            _ => CloseCause::Protocol,
        };
        tracing::warn!(peer = %ods, reason = %error, "closing sync connection");
        self.close(ods, &error.to_string(), cause);
    }

    fn close(&mut self, ods: &OdsCode, reason: &str, cause: CloseCause) {
        self.save_status(ods, Some(reason));
        if let Some(live) = self.sessions.remove(ods) {
            self.peers_by_conn.remove(&live.conn);
            // Held frames wait for a commit that this session no longer needs durable.
            self.held.remove(&live.conn);
            self.releasable.remove(&live.conn);
            self.release_blocked.remove(&live.conn);
            self.ready.remove(ods);
            self.blocked.remove(ods);
            self.events.push_back(DriverEvent::Close {
                conn: live.conn,
                peer: ods.clone(),
                reason: reason.to_string(),
                cause,
            });
        }
    }

    fn drain_session_events(&mut self, ods: &OdsCode) {
        let Some(live) = self.sessions.get_mut(ods) else {
            return;
        };
        let mut rejections = Vec::new();
        let mut unsendable = Vec::new();
        while let Some(event) = live.session.poll_event() {
            match event {
                Event::Rejected {
                    doc,
                    publisher,
                    reason,
                } => {
                    tracing::warn!(peer = %ods, %doc, %publisher, %reason, "rejected a received change; nothing of it was stored");
                    rejections.push((doc, publisher, reason));
                }
                Event::Refused(refusal) => {
                    // Normal after a withdrawal (a late copy) or when a peer decided on older
                    // facts; the document id and reason carry no patient data.
                    tracing::debug!(peer = %ods, doc = %refusal.doc, publisher = %refusal.publisher, reason = %refusal.reason, "refused a received document policy does not let this node hold");
                    self.events.push_back(DriverEvent::Refused {
                        peer: ods.clone(),
                        refusal,
                    });
                }
                Event::Stored {
                    documents,
                    checkpoint,
                } => {
                    tracing::debug!(peer = %ods, documents = documents.len(), ?checkpoint, "stored documents from peer");
                    if !documents.is_empty() {
                        // What this node stored may be for its other peers: offer it soon,
                        // not at once, so a hub tells its sessions once per interval.
                        let prompt = self.now.saturating_add(FEED_PROMPT_MS);
                        self.next_feed_look =
                            Some(self.next_feed_look.map_or(prompt, |at| at.min(prompt)));
                        if self.in_turn {
                            self.stored_in_turn.push((ods.clone(), documents));
                        } else {
                            self.events.push_back(DriverEvent::Stored {
                                peer: ods.clone(),
                                documents,
                            });
                        }
                    }
                }
                Event::CaughtUp => {
                    live.last_sync_at = Some(self.host.now_unix());
                    self.pull_again_candidates.insert(ods.clone());
                    self.caught_up_with.insert(ods.clone());
                }
                Event::PeerAcked { .. } => {}
                Event::PeerWasAhead { had, resumed_after } => {
                    tracing::warn!(peer = %ods, had, resumed_after, "the peer had taken this node's changes feed further than this database now reaches: it lost writes it had reported durable (a disk or virtual machine that does not honour fsync) or was restored from a backup; the peer is served again from where the two feeds agree");
                }
                Event::FeedWentBack { had, resumed_after } => {
                    tracing::warn!(peer = %ods, had, resumed_after, "the peer's changes feed went back (it lost writes or was restored from a backup): taking it again from where the two agree");
                }
                Event::RegistryAdopted => {
                    tracing::info!(peer = %ods, version = self.host.registry().version(), "adopted a newer trust registry from a peer");
                }
                Event::RegistryIgnored => {}
                Event::Unsendable { doc, bytes } => {
                    // An error, not a warning: this document does not reach the peer.
                    tracing::error!(peer = %ods, %doc, bytes, limit = caremesh_sync::wire::MAX_FRAME_BYTES, "a document the peer wants is too large to send in one frame; it reaches the peer only once a version of it fits (see `caremesh status`)");
                    unsendable.push((doc, bytes));
                }
                Event::Received { kind, docs } => self.events.push_back(DriverEvent::Received {
                    peer: ods.clone(),
                    kind,
                    docs,
                }),
            }
        }
        let now = self.host.now_unix();
        for (doc, publisher, reason) in rejections {
            self.record("a rejected change", |batch| {
                batch.record_rejection(now, ods, doc, &publisher, &reason)
            });
            self.events.push_back(DriverEvent::Rejected {
                peer: ods.clone(),
                doc,
                publisher,
                reason,
            });
        }
        for (doc, bytes) in unsendable {
            self.record("an unsendable document", |batch| {
                batch.record_unsendable(now, ods, doc, bytes)
            });
            self.events.push_back(DriverEvent::Unsendable {
                peer: ods.clone(),
                doc,
                bytes,
            });
        }
    }

    /// Writes a record for the operator (`caremesh status`); a failure is logged, as the
    /// event it records is logged too.
    fn record(
        &mut self,
        what: &str,
        write: impl FnOnce(&caremesh_storage::WriteBatch<'_>) -> Result<(), StorageError>,
    ) {
        let recorded = self.host.store.write().and_then(|batch| {
            write(&batch)?;
            batch.commit()
        });
        if let Err(error) = recorded {
            tracing::error!(%error, what, "could not record it");
        }
    }

    /// Hands a newly signed audit checkpoint to every connected peer to witness.
    fn hand_on_audit_checkpoint(&mut self) {
        let count = match self.host.store.newest_own_checkpoint() {
            Ok(Some(bytes)) => SignedCheckpoint::decode(&bytes)
                .map(|signed| signed.checkpoint.count)
                .unwrap_or(0),
            Ok(None) => 0,
            Err(error) => {
                tracing::error!(%error, "could not read the newest audit checkpoint");
                return;
            }
        };
        if count <= self.audit_checkpoint_seen {
            return;
        }
        self.audit_checkpoint_seen = count;
        let mut failed = Vec::new();
        for (ods, live) in &mut self.sessions {
            if let Err(error) = live.session.audit_checkpointed(&mut self.host) {
                failed.push((ods.clone(), error));
            }
            self.ready.insert(ods.clone());
        }
        for (ods, error) in failed {
            self.fail(&ods, &error);
        }
    }

    /// Closes the sessions of peers whose keys the registry in force no longer trusts, once
    /// per new edition (installed in the file, or adopted from a peer).
    fn enforce_registry(&mut self) {
        let registry = self.host.registry();
        if registry.version() == self.registry_version {
            return;
        }
        self.registry_version = registry.version();
        let withdrawn: Vec<(OdsCode, &'static str)> = self
            .sessions
            .iter()
            .filter_map(|(ods, live)| {
                untrusted(&registry, ods, &live.key).map(|reason| (ods.clone(), reason))
            })
            .collect();
        if !withdrawn.is_empty() {
            self.in_own_turn(|driver| {
                for (ods, reason) in withdrawn {
                    tracing::warn!(
                        peer = %ods,
                        registry_version = registry.version(),
                        reason,
                        "closing sync session: the trust registry no longer trusts this peer"
                    );
                    driver.close(&ods, reason, CloseCause::Untrusted);
                }
            });
        }
        for (ods, live) in &mut self.sessions {
            live.session.registry_changed(&self.host);
            self.ready.insert(ods.clone());
        }
    }

    /// Rewrites the status rows of live peers whose figures changed, and of the others as a
    /// heartbeat, in the turn's transaction: as separate commits a hub with 500 peers made
    /// 500 fsyncs a second for monitoring rows alone, and idle peers' rows need no rewrite
    /// every second.
    fn flush_status(&mut self) {
        let now = self.now;
        let due: Vec<OdsCode> = self
            .sessions
            .iter()
            .filter(|(_, live)| {
                let current = (live.session.stats(), live.last_sync_at);
                let changed = live
                    .saved
                    .as_ref()
                    .is_none_or(|(stats, last_sync_at)| (stats, *last_sync_at) != current);
                changed || now.saturating_sub(live.saved_at) >= STATUS_HEARTBEAT_MS
            })
            .map(|(ods, _)| ods.clone())
            .collect();
        for ods in due {
            self.save_status(&ods, None);
        }
    }

    /// Writes a peer's status row; `closing` marks it disconnected with the reason.
    fn save_status(&mut self, ods: &OdsCode, closing: Option<&str>) {
        let Some(live) = self.sessions.get(ods) else {
            return;
        };
        let stats = live.session.stats();
        let base = &live.base;
        let status = PeerStatus {
            peer: ods.to_string(),
            connected: closing.is_none(),
            connected_since: Some(live.connected_since),
            last_sync_at: live.last_sync_at,
            last_error: closing.map(str::to_string).or(base.last_error.clone()),
            bytes_sent: base.bytes_sent + stats.bytes_sent,
            bytes_received: base.bytes_received + stats.bytes_received,
            documents_sent: base.documents_sent + stats.documents_sent,
            documents_received: base.documents_received + stats.documents_received,
            rejected: base.rejected + stats.rejected,
            pulled_up_to: stats.pulled_up_to,
            peer_tip: stats.peer_tip.max(stats.pulled_up_to),
            peer_acked: stats.peer_acked,
            local_tip: stats.local_tip,
            updated_at: self.host.now_unix(),
        };
        if let Err(error) = self.host.store.save_peer_status(&status) {
            tracing::error!(%error, "could not save peer status");
            return;
        }
        let now = self.now;
        if let Some(live) = self.sessions.get_mut(ods) {
            live.saved = Some((live.session.stats().clone(), live.last_sync_at));
            live.saved_at = now;
        }
    }
}

/// Why `key` no longer stands for `ods` in `registry`, if it does not.
pub fn untrusted(
    registry: &VerifiedRegistry,
    ods: &OdsCode,
    key: &[u8; 32],
) -> Option<&'static str> {
    let refusal = registry.standing(key).holder(Some(ods)).err()?;
    Some(match refusal {
        KeyRefusal::OtherOrganisation(_) => {
            "the trust registry now lists this key for another organisation"
        }
        KeyRefusal::Revoked(_) => "the trust registry revoked this peer's key",
        KeyRefusal::Retired(_) => "the trust registry retired this peer's key",
        KeyRefusal::Unknown => "this peer's key is no longer in the trust registry",
    })
}

#[cfg(test)]
mod tests;
