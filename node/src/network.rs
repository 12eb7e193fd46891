//! Sync over QUIC: the endpoint, dialling with backoff, and the engine thread that drives
//! every peer's [`Session`] against the node's database.
//!
//! ```text
//!  quinn connection ──reader task──▶ Command::Input ──▶ ┌──────────── engine thread ───────────┐
//!                                                       │ one Store (the sync writer)          │
//!  quinn connection ◀──writer task── Outgoing (≤ 8) ◀── │ Session per peer, pumped while its   │
//!                                                       │ outgoing queue has room              │
//!                                                       └──────────────────────────────────────┘
//! ```
//!
//! Backpressure: each connection's outgoing queue holds at most [`OUTGOING_FRAMES`] frames and
//! the engine asks a session for a frame only when there is room, so a slow peer stalls only
//! its own session. Incoming bytes pass through a bounded channel; when the engine falls
//! behind, readers stop reading and QUIC flow control slows the sender.

use crate::clock;
use crate::tls::{self, NodeIdentity};
use crate::trust::TrustState;
use anyhow::{Context, Result};
use caremesh_storage::sync_host::StoreHost;
use caremesh_storage::{PeerStatus, Store};
use caremesh_sync::model::OrgKind;
use caremesh_sync::policy::{Consent, Recipient};
use caremesh_sync::{Event, KeyRefusal, OdsCode, PublisherKey, Session, VerifiedRegistry};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// Frames queued towards one peer before its session stops producing.
pub const OUTGOING_FRAMES: usize = 8;
/// Largest chunk read from a stream at once.
const READ_CHUNK: usize = 64 * 1024;
/// Commands queued towards the engine before readers wait.
const ENGINE_QUEUE: usize = 256;
/// QUIC keep-alive: well under the 30 s many NATs forget a UDP flow after.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
const IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// Reconnect backoff: doubles from the first to the last, with up to 50% jitter.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_LAST: Duration = Duration::from_secs(10);
/// A connection that lasted this long resets the backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(30);
/// A turn's group commit takes the commands already queued, up to this many, for up to
/// this long (see `Engine::handle_turn`).
const GROUP_COMMANDS: usize = 256;
const GROUP_WINDOW: Duration = Duration::from_millis(20);
/// SQLite page cache of the engine's connection.
const ENGINE_CACHE_MIB: u32 = 64;
/// How often the engine looks for local feed growth (ingests by other threads/processes).
const FEED_POLL: Duration = Duration::from_millis(100);
/// How soon after storing documents from one peer the engine offers them to the others. Not
/// at once: a hub storing changes from many peers tells its sessions once per this interval,
/// not once per change.
const FEED_PROMPT: Duration = Duration::from_millis(20);
/// Documents kept loaded by a hub's engine and by any other node's: a hub stores a change
/// and serves it to each entitled peer straight after, so a few hundred catch most serves.
/// Each loaded document costs 75–95 KB of memory (measured on a hub: 4,096 added 300 MB,
/// 512 added 49 MB).
const HUB_LOADED_DOCUMENTS: usize = 512;
const NODE_LOADED_DOCUMENTS: usize = 64;
/// How often the registry file is looked at for an edition installed while the node runs.
const REGISTRY_FILE_CHECK: Duration = Duration::from_secs(1);
/// How often peer status is written for `caremesh status` and /metrics.
const STATUS_FLUSH: Duration = Duration::from_secs(1);

/// Counters the node keeps in memory for /metrics, beside the per-peer rows in the database.
#[derive(Debug, Default)]
pub struct SyncCounters {
    pub handshakes_refused: AtomicU64,
    pub protocol_errors: AtomicU64,
    /// Times a peer wanted a document too large to send.
    pub unsendable: AtomicU64,
}

pub struct SyncSettings {
    pub ods: OdsCode,
    pub key: PublisherKey,
    pub trust: TrustState,
    pub listen: Option<String>,
    pub peers: Vec<OdsCode>,
    pub database: PathBuf,
    /// This organisation's consent defaults, for its patients without a recorded choice.
    pub consent_defaults: Consent,
    /// Append a line per received frame here (diagnostics and leak tests; no patient data).
    pub wire_log: Option<PathBuf>,
    /// Told of every document version stored from a peer (see [`StoredObserver`]).
    pub stored_observer: Option<StoredObserver>,
    /// `false` only for simulated nodes in benchmarks: their store skips fsync, as the
    /// simulator's do, so that hundreds of them fit on one machine beside the hub measured.
    pub durable: bool,
    /// Documents the engine keeps loaded for its sessions (see `caremesh_sync::loaded`).
    pub loaded_documents: usize,
}

impl SyncSettings {
    /// The settings `caremesh run` uses for a node home: its organisation, signing key,
    /// listen address, peers, database and consent defaults from `caremesh.toml`.
    pub fn for_home(home: &crate::home::Home, trust: TrustState) -> Result<SyncSettings> {
        Ok(SyncSettings {
            ods: home.config.organisation.ods.clone(),
            key: home.signing_key()?,
            trust,
            listen: home.config.sync.listen.clone(),
            peers: home.config.sync.peers.clone(),
            database: home.database_path(),
            consent_defaults: home.config.sharing.defaults(),
            wire_log: home.config.sync.wire_log.as_ref().map(|p| home.dir.join(p)),
            stored_observer: None,
            durable: true,
            loaded_documents: match home.config.organisation.kind {
                // A hub serves each change it stores to other peers at once.
                OrgKind::Hub => HUB_LOADED_DOCUMENTS,
                _ => NODE_LOADED_DOCUMENTS,
            },
        })
    }
}

/// Called on the engine thread with each batch of documents stored from a peer (id and the
/// heads now held), right after the transaction committed: the load benchmark times a
/// change's arrival with it. It must return quickly; it holds up the engine.
pub type StoredObserver = Arc<dyn Fn(&[(caremesh_sync::DocId, Vec<[u8; 32]>)]) + Send + Sync>;

enum Command {
    Open {
        conn: u64,
        peer: Recipient,
        /// The key the peer's certificate carries, trusted when the connection was made.
        key: [u8; 32],
        dialled_by_us: bool,
        outgoing: mpsc::Sender<Outgoing>,
        accepted: oneshot::Sender<bool>,
    },
    Input {
        conn: u64,
        bytes: Vec<u8>,
    },
    Closed {
        conn: u64,
        reason: String,
    },
}

enum Outgoing {
    Frame(Vec<u8>),
    Close(String),
}

/// The running sync service; dropping the shutdown sender stops it.
pub struct SyncService {
    pub local_addr: Option<SocketAddr>,
    pub counters: Arc<SyncCounters>,
    engine: std::thread::JoinHandle<()>,
}

impl SyncService {
    /// Waits for the engine to write its final peer status after shutdown was signalled.
    pub fn join(self) {
        let _ = self.engine.join();
    }
}

/// Starts the endpoint, the dialers and the engine thread on the current tokio runtime.
pub async fn start(settings: SyncSettings, shutdown: watch::Receiver<bool>) -> Result<SyncService> {
    let identity = NodeIdentity::from_key(&settings.key, &settings.ods)?;
    let counters = Arc::new(SyncCounters::default());
    let store = Store::open(&settings.database)?;
    if !settings.durable {
        store.without_fsync()?;
    }
    store.set_cache_mib(ENGINE_CACHE_MIB)?;
    store.reset_connections()?;
    let mut host = StoreHost::new(
        store,
        Box::new(settings.trust.clone()),
        settings.ods.clone(),
        settings.consent_defaults,
        Box::new(clock::now_unix),
    )?;
    if settings.loaded_documents > 0 {
        host.keep_documents_loaded(settings.loaded_documents);
    }
    let wire_log = match &settings.wire_log {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening the wire log {}", path.display()))?,
        ),
        None => None,
    };
    let (engine_tx, engine_rx) = mpsc::channel(ENGINE_QUEUE);
    let connected: Arc<Mutex<HashSet<OdsCode>>> = Default::default();
    let engine = {
        let ods = settings.ods.clone();
        let connected = connected.clone();
        let shutdown = shutdown.clone();
        let counters = counters.clone();
        let stored_observer = settings.stored_observer.clone();
        std::thread::Builder::new()
            .name("sync-engine".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .expect("engine runtime builds");
                let mut engine = Engine::new(ods, host, connected, counters, wire_log);
                engine.stored_observer = stored_observer;
                runtime.block_on(engine.run(engine_rx, shutdown));
            })?
    };

    let server = tls::server_config(&identity, &settings.trust)?;
    let server = QuicServerConfig::try_from(server).context("QUIC server TLS configuration")?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server));
    server.transport_config(transport_config());
    let bind: SocketAddr = match &settings.listen {
        Some(listen) => listen
            .parse()
            .with_context(|| format!("[sync] listen `{listen}` is not an IP:port address"))?,
        None => "0.0.0.0:0".parse().expect("valid address"),
    };
    let endpoint = quinn::Endpoint::server(server, bind)
        .with_context(|| format!("binding the sync endpoint on UDP {bind}"))?;
    let local_addr = settings.listen.as_ref().and(endpoint.local_addr().ok());

    let context = Arc::new(Shared {
        identity,
        trust: settings.trust.clone(),
        engine: engine_tx,
        counters: counters.clone(),
        next_conn: AtomicU64::new(1),
        connected,
    });
    if settings.listen.is_some() {
        tokio::spawn(accept_loop(endpoint.clone(), context.clone()));
    }
    for peer in settings.peers {
        tokio::spawn(dial_loop(
            endpoint.clone(),
            context.clone(),
            peer,
            shutdown.clone(),
        ));
    }
    tokio::spawn(watch_registry_file(
        settings.trust.clone(),
        shutdown.clone(),
    ));
    {
        let endpoint = endpoint.clone();
        let mut shutdown = shutdown;
        tokio::spawn(async move {
            let _ = shutdown.changed().await;
            endpoint.close(0u32.into(), b"node shutting down");
        });
    }
    Ok(SyncService {
        local_addr,
        counters,
        engine,
    })
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    transport.max_idle_timeout(Some(
        IDLE_TIMEOUT.try_into().expect("idle timeout fits QUIC"),
    ));
    // One sync stream per connection; bounded windows bound what a peer can make us buffer.
    transport.max_concurrent_bidi_streams(1u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    transport.stream_receive_window((4u32 * 1024 * 1024).into());
    transport.receive_window((8u32 * 1024 * 1024).into());
    transport.send_window(8 * 1024 * 1024);
    Arc::new(transport)
}

/// What the network tasks share.
struct Shared {
    identity: NodeIdentity,
    trust: TrustState,
    engine: mpsc::Sender<Command>,
    counters: Arc<SyncCounters>,
    next_conn: AtomicU64,
    connected: Arc<Mutex<HashSet<OdsCode>>>,
}

async fn accept_loop(endpoint: quinn::Endpoint, context: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        let context = context.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let connection = match incoming.await {
                Ok(connection) => connection,
                Err(error) => {
                    context
                        .counters
                        .handshakes_refused
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%remote, %error, "refused an incoming sync connection");
                    return;
                }
            };
            let Some((peer, key)) = authenticated_peer(&connection, &context.trust) else {
                connection.close(2u32.into(), b"unknown peer");
                return;
            };
            let streams = tokio::time::timeout(IDLE_TIMEOUT, connection.accept_bi()).await;
            match streams {
                Ok(Ok((send, recv))) => {
                    run_connection(&context, connection, send, recv, (peer, key), false).await;
                }
                _ => tracing::info!(peer = %peer.ods, "peer opened no sync stream"),
            }
        });
    }
}

/// The organisation behind a connection's verified certificate, and the key it presented.
fn authenticated_peer(
    connection: &quinn::Connection,
    trust: &TrustState,
) -> Option<(Recipient, [u8; 32])> {
    let identity = connection.peer_identity()?;
    let certificates = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    let key = tls::certificate_key(certificates.first()?)?;
    let registry = trust.current();
    let org = registry.registry().current_holder(&key, None).ok()?;
    Some((
        Recipient {
            ods: org.ods.clone(),
            kind: org.kind,
        },
        key,
    ))
}

async fn dial_loop(
    endpoint: quinn::Endpoint,
    context: Arc<Shared>,
    peer: OdsCode,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_FIRST;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let already = context
            .connected
            .lock()
            .expect("lock never poisoned")
            .contains(&peer);
        let started = Instant::now();
        if !already {
            match dial(&endpoint, &context, &peer).await {
                Ok(()) => {}
                Err(error) => {
                    tracing::info!(%peer, error = %format!("{error:#}"), "sync peer unreachable")
                }
            }
        }
        if started.elapsed() >= STABLE_CONNECTION || already {
            backoff = BACKOFF_FIRST;
        } else {
            backoff = (backoff * 2).min(BACKOFF_LAST);
        }
        let pause = if already {
            Duration::from_secs(1)
        } else {
            with_jitter(backoff)
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Adopts an edition installed in the registry file while the node runs (`caremesh trust
/// install`): the engine then closes the sessions of peers it no longer trusts, and every
/// document received after is checked against it.
async fn watch_registry_file(trust: TrustState, mut shutdown: watch::Receiver<bool>) {
    let mut seen = trust.file_signature();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(REGISTRY_FILE_CHECK) => {}
            _ = shutdown.changed() => return,
        }
        let now = trust.file_signature();
        if now == seen {
            continue;
        }
        seen = now;
        match trust.reload_file() {
            Ok(true) => tracing::info!(
                version = trust.current().version(),
                "adopted the trust registry installed in the registry file"
            ),
            Ok(false) => {}
            Err(error) => tracing::warn!(
                %error,
                version_in_force = trust.current().version(),
                "the trust registry file changed but was not adopted; the edition in force stays"
            ),
        }
    }
}

/// Why `key` no longer stands for `ods` in `registry`, if it does not.
fn untrusted(registry: &VerifiedRegistry, ods: &OdsCode, key: &[u8; 32]) -> Option<&'static str> {
    let refusal = registry.registry().current_holder(key, Some(ods)).err()?;
    Some(match refusal {
        KeyRefusal::OtherOrganisation(_) => {
            "the trust registry now lists this key for another organisation"
        }
        KeyRefusal::Revoked(_) => "the trust registry revoked this peer's key",
        KeyRefusal::Retired(_) => "the trust registry retired this peer's key",
        KeyRefusal::Unknown => "this peer's key is no longer in the trust registry",
    })
}

/// `base` plus up to half again, so that nodes cut off together do not reconnect in step.
fn with_jitter(base: Duration) -> Duration {
    let mut bytes = [0u8; 4];
    let fraction = match getrandom::fill(&mut bytes) {
        Ok(()) => u32::from_le_bytes(bytes) as f64 / u32::MAX as f64,
        Err(_) => 0.5,
    };
    base + base.mul_f64(fraction * 0.5)
}

async fn dial(endpoint: &quinn::Endpoint, context: &Arc<Shared>, peer: &OdsCode) -> Result<()> {
    let registry = context.trust.current();
    let organisation = registry
        .registry()
        .organisation(peer)
        .with_context(|| format!("{peer} is not in the trust registry"))?;
    let address = organisation
        .addresses
        .first()
        .with_context(|| format!("the trust registry lists no address for {peer}"))?;
    let address: SocketAddr = tokio::net::lookup_host(address)
        .await
        .with_context(|| format!("resolving {address}"))?
        .next()
        .with_context(|| format!("{address} resolves to nothing"))?;
    let client = tls::client_config(&context.identity, &context.trust, Some(peer.clone()))?;
    let client = QuicClientConfig::try_from(client).context("QUIC client TLS configuration")?;
    let mut client = quinn::ClientConfig::new(Arc::new(client));
    client.transport_config(transport_config());
    let connection = endpoint
        .connect_with(client, address, "caremesh.invalid")?
        .await
        .with_context(|| format!("connecting to {peer} at {address}"))?;
    let Some(authenticated) = authenticated_peer(&connection, &context.trust) else {
        connection.close(2u32.into(), b"unknown peer");
        anyhow::bail!("{peer} presented a key the registry does not trust");
    };
    let (send, recv) = connection.open_bi().await?;
    tracing::info!(%peer, %address, "connected to sync peer");
    run_connection(context, connection, send, recv, authenticated, true).await;
    Ok(())
}

/// Shovels bytes between one QUIC stream and the engine until either side ends.
async fn run_connection(
    context: &Arc<Shared>,
    connection: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    (peer, key): (Recipient, [u8; 32]),
    dialled_by_us: bool,
) {
    let conn = context.next_conn.fetch_add(1, Ordering::Relaxed);
    let (outgoing_tx, mut outgoing_rx) = mpsc::channel(OUTGOING_FRAMES);
    let (accepted_tx, accepted_rx) = oneshot::channel();
    let opened = Command::Open {
        conn,
        peer: peer.clone(),
        key,
        dialled_by_us,
        outgoing: outgoing_tx,
        accepted: accepted_tx,
    };
    if context.engine.send(opened).await.is_err() || !accepted_rx.await.unwrap_or(false) {
        connection.close(3u32.into(), b"duplicate connection");
        return;
    }
    let writer = {
        let connection = connection.clone();
        async move {
            while let Some(outgoing) = outgoing_rx.recv().await {
                match outgoing {
                    Outgoing::Frame(frame) => {
                        if let Err(error) = send.write_all(&frame).await {
                            return format!("write failed: {error}");
                        }
                    }
                    Outgoing::Close(reason) => {
                        let _ = send.finish();
                        connection.close(1u32.into(), reason.as_bytes());
                        return reason;
                    }
                }
            }
            "engine closed the session".to_string()
        }
    };
    let reader = async {
        loop {
            match recv.read_chunk(READ_CHUNK, true).await {
                Ok(Some(chunk)) => {
                    let input = Command::Input {
                        conn,
                        bytes: chunk.bytes.to_vec(),
                    };
                    if context.engine.send(input).await.is_err() {
                        return "engine stopped".to_string();
                    }
                }
                Ok(None) => return "peer finished the stream".to_string(),
                Err(error) => return format!("read failed: {error}"),
            }
        }
    };
    let reason = tokio::select! {
        reason = writer => reason,
        reason = reader => reason,
        error = connection.closed() => format!("connection closed: {error}"),
    };
    let _ = context.engine.send(Command::Closed { conn, reason }).await;
}

struct Live {
    conn: u64,
    session: Session,
    /// The key the peer authenticated with: the session lasts only while the registry in
    /// force trusts it for the peer's organisation.
    key: [u8; 32],
    outgoing: mpsc::Sender<Outgoing>,
    /// Who dialled: decides which of two simultaneous connections survives.
    dialler: OdsCode,
    /// The status row as it stood when the session began; session counters add to it.
    base: PeerStatus,
    connected_since: i64,
    last_sync_at: Option<i64>,
}

struct Engine {
    ods: OdsCode,
    host: StoreHost,
    started: Instant,
    sessions: BTreeMap<OdsCode, Live>,
    peers_by_conn: HashMap<u64, OdsCode>,
    connected: Arc<Mutex<HashSet<OdsCode>>>,
    counters: Arc<SyncCounters>,
    last_tip: u64,
    wire_log: Option<std::fs::File>,
    stored_observer: Option<StoredObserver>,
    /// Sessions that may have something to send: they received input, their timer fired,
    /// the feed grew, or their connection was full. Only these are polled, so a hub with
    /// hundreds of quiet peers does not visit them all for every frame it receives.
    ready: BTreeSet<OdsCode>,
    /// The registry edition the sessions were last checked against.
    registry_version: u64,
    /// The count of the newest own audit checkpoint handed to the sessions.
    audit_checkpoint_seen: u64,
    next_feed_poll: Instant,
    /// Documents stored in the current group commit, for the observer once it is durable.
    stored_in_group: Vec<Vec<(caremesh_sync::DocId, Vec<[u8; 32]>)>>,
}

impl Engine {
    fn new(
        ods: OdsCode,
        host: StoreHost,
        connected: Arc<Mutex<HashSet<OdsCode>>>,
        counters: Arc<SyncCounters>,
        wire_log: Option<std::fs::File>,
    ) -> Engine {
        Engine {
            ods,
            host,
            started: Instant::now(),
            sessions: BTreeMap::new(),
            peers_by_conn: HashMap::new(),
            connected,
            counters,
            last_tip: 0,
            wire_log,
            stored_observer: None,
            ready: BTreeSet::new(),
            registry_version: 0,
            audit_checkpoint_seen: 0,
            next_feed_poll: Instant::now(),
            stored_in_group: Vec::new(),
        }
    }

    /// One line per received frame: time, peer, kind, the document ids it named. Document
    /// ids are hashes; no NHS number or content is written.
    fn log_frame(&mut self, peer: &OdsCode, kind: &str, docs: &[caremesh_sync::DocId]) {
        let Some(file) = &mut self.wire_log else {
            return;
        };
        let ids: Vec<String> = docs.iter().map(ToString::to_string).collect();
        let line = format!("{} {peer} {kind} {}\n", clock::now_unix(), ids.join(","));
        if let Err(error) = std::io::Write::write_all(file, line.as_bytes()) {
            tracing::error!(%error, "could not write the wire log; it stops here");
            self.wire_log = None;
        }
    }

    /// Closes a session the peer broke (bad frames, protocol violations, impersonation).
    fn fail(&mut self, ods: &OdsCode, reason: &str) {
        self.counters
            .protocol_errors
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(peer = %ods, %reason, "closing sync connection");
        self.close(ods, reason);
    }

    /// Hands a newly signed audit checkpoint to every connected peer to witness.
    fn hand_on_audit_checkpoint(&mut self) {
        let count = match self.host.store.newest_own_checkpoint() {
            Ok(Some(bytes)) => caremesh_sync::SignedCheckpoint::decode(&bytes)
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
                failed.push((ods.clone(), error.to_string()));
            }
            self.ready.insert(ods.clone());
        }
        for (ods, reason) in failed {
            self.fail(&ods, &reason);
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
        for (ods, reason) in withdrawn {
            tracing::warn!(
                peer = %ods,
                registry_version = registry.version(),
                reason,
                "closing sync session: the trust registry no longer trusts this peer"
            );
            self.close(&ods, reason);
        }
        for (ods, live) in &mut self.sessions {
            live.session.registry_changed(&self.host);
            self.ready.insert(ods.clone());
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut next_flush = Instant::now() + STATUS_FLUSH;
        loop {
            // Before anything is sent: a peer whose key the registry no longer trusts gets
            // nothing more, and what it sends is no longer read.
            self.enforce_registry();
            let blocked = self.pump();
            let mut wake = self.next_feed_poll.min(next_flush);
            for live in self.sessions.values() {
                if let Some(at) = live.session.poll_timeout() {
                    wake = wake.min(self.started + Duration::from_millis(at));
                }
            }
            if blocked {
                wake = wake.min(Instant::now() + Duration::from_millis(5));
            }
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.handle_turn(command, &mut commands),
                    None => break,
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
                _ = shutdown.changed() => break,
            }
            let now = self.now_ms();
            let mut failed = Vec::new();
            for (ods, live) in &mut self.sessions {
                if live.session.poll_timeout().is_some_and(|at| at <= now) {
                    if let Err(error) = live.session.handle_timeout(now) {
                        failed.push((ods.clone(), error.to_string()));
                    }
                    self.ready.insert(ods.clone());
                }
            }
            for (ods, reason) in failed {
                self.fail(&ods, &reason);
            }
            if Instant::now() >= self.next_feed_poll {
                self.next_feed_poll = Instant::now() + FEED_POLL;
                self.poll_feed();
            }
            if Instant::now() >= next_flush {
                next_flush = Instant::now() + STATUS_FLUSH;
                self.flush_status();
                self.host.compact_if_due();
                self.hand_on_audit_checkpoint();
            }
        }
        let peers: Vec<OdsCode> = self.sessions.keys().cloned().collect();
        for peer in peers {
            self.close(&peer, "node shutting down");
        }
    }

    /// Handles `first` and whatever else is already queued (within bounds) as one turn whose
    /// writes commit together: one fsync for what every peer sent in the turn, instead of one
    /// each. Frames (acknowledgements among them) go out only after, from `pump`.
    fn handle_turn(&mut self, first: Command, commands: &mut mpsc::Receiver<Command>) {
        let grouped = self.open_group("the writes of an engine turn");
        let deadline = Instant::now() + GROUP_WINDOW;
        self.handle(first);
        let mut handled = 1;
        while handled < GROUP_COMMANDS && Instant::now() < deadline {
            match commands.try_recv() {
                Ok(command) => self.handle(command),
                Err(_) => break,
            }
            handled += 1;
        }
        if grouped && let Err(error) = self.host.store.end_group() {
            // What the sessions believe stored was rolled back: they must not acknowledge it.
            tracing::error!(%error, "a group commit failed; closing every sync session");
            self.stored_in_group.clear();
            self.host.forget_cached();
            let peers: Vec<OdsCode> = self.sessions.keys().cloned().collect();
            for peer in peers {
                self.fail(&peer, "storage failed to commit");
            }
            return;
        }
        if let Some(observer) = &self.stored_observer {
            for documents in self.stored_in_group.drain(..) {
                observer(&documents);
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Open {
                conn,
                peer,
                key,
                dialled_by_us,
                outgoing,
                accepted,
            } => {
                let dialler = if dialled_by_us {
                    self.ods.clone()
                } else {
                    peer.ods.clone()
                };
                let _ = accepted.send(self.open(conn, (peer, key), dialler, outgoing));
            }
            Command::Input { conn, bytes } => {
                let Some(ods) = self.peer_of(conn) else {
                    return;
                };
                let now = self.now_ms();
                let live = self.sessions.get_mut(&ods).expect("peer_of found it");
                let result = live.session.handle_input(&bytes, now, &mut self.host);
                self.ready.insert(ods.clone());
                self.drain_events(&ods);
                if let Err(error) = result {
                    self.fail(&ods, &error.to_string());
                }
            }
            Command::Closed { conn, reason } => {
                if let Some(ods) = self.peer_of(conn) {
                    tracing::info!(peer = %ods, %reason, "sync connection ended");
                    self.close(&ods, &reason);
                }
            }
        }
    }

    /// The peer a connection carries: a map lookup, as it runs for every chunk received.
    fn peer_of(&self, conn: u64) -> Option<OdsCode> {
        self.peers_by_conn.get(&conn).cloned()
    }

    /// Starts a session, unless a connection to the same peer exists that wins the tie-break
    /// (the one dialled by the lower ODS code; between two from the same dialler, the newer).
    fn open(
        &mut self,
        conn: u64,
        (peer, key): (Recipient, [u8; 32]),
        dialler: OdsCode,
        outgoing: mpsc::Sender<Outgoing>,
    ) -> bool {
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
            self.close(&peer.ods, "replaced by a newer connection");
        }
        let now = self.now_ms();
        let session = match Session::new(self.ods.clone(), peer.clone(), now, &mut self.host) {
            Ok(mut session) => {
                if self.wire_log.is_some() {
                    session.log_received_frames();
                }
                session
            }
            Err(error) => {
                tracing::error!(peer = %peer.ods, %error, "could not start a sync session");
                return false;
            }
        };
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
            outgoing,
            dialler,
            last_sync_at: base.last_sync_at,
            base,
            connected_since: clock::now_unix(),
        };
        self.connected
            .lock()
            .expect("lock never poisoned")
            .insert(peer.ods.clone());
        self.peers_by_conn.insert(conn, peer.ods.clone());
        self.sessions.insert(peer.ods.clone(), live);
        self.ready.insert(peer.ods.clone());
        self.save_status(&peer.ods, None);
        true
    }

    fn close(&mut self, ods: &OdsCode, reason: &str) {
        self.save_status(ods, Some(reason));
        if let Some(live) = self.sessions.remove(ods) {
            self.peers_by_conn.remove(&live.conn);
            let _ = live.outgoing.try_send(Outgoing::Close(reason.to_string()));
        }
        self.connected
            .lock()
            .expect("lock never poisoned")
            .remove(ods);
    }

    /// Lets every ready session send while its connection has room. Returns whether any
    /// session is held back by a full queue (it stays ready).
    fn pump(&mut self) -> bool {
        let now = self.now_ms();
        let mut blocked = false;
        let mut failed = Vec::new();
        for ods in std::mem::take(&mut self.ready) {
            let Some(live) = self.sessions.get_mut(&ods) else {
                continue;
            };
            loop {
                let permit = match live.outgoing.try_reserve() {
                    Ok(permit) => permit,
                    Err(mpsc::error::TrySendError::Full(())) => {
                        blocked = true;
                        self.ready.insert(ods.clone());
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(())) => break,
                };
                match live.session.poll_transmit(now, &mut self.host) {
                    Ok(Some(frame)) => permit.send(Outgoing::Frame(frame)),
                    Ok(None) => break,
                    Err(error) => {
                        failed.push((ods.clone(), error.to_string()));
                        break;
                    }
                }
            }
            self.drain_events(&ods);
        }
        for (ods, reason) in failed {
            self.fail(&ods, &reason);
        }
        blocked
    }

    fn poll_feed(&mut self) {
        match self.host.store.feed_tip() {
            Ok(tip) if tip != self.last_tip => {
                self.last_tip = tip;
                for (ods, live) in &mut self.sessions {
                    live.session.feed_changed();
                    self.ready.insert(ods.clone());
                }
            }
            Ok(_) => {}
            Err(error) => tracing::error!(%error, "could not read the local feed"),
        }
    }

    fn drain_events(&mut self, ods: &OdsCode) {
        let Some(live) = self.sessions.get_mut(ods) else {
            return;
        };
        let mut received = Vec::new();
        while let Some(event) = live.session.poll_event() {
            match event {
                Event::Rejected {
                    doc,
                    publisher,
                    reason,
                } => {
                    tracing::warn!(peer = %ods, %doc, %publisher, %reason, "rejected a received change; nothing of it was stored");
                    let recorded = self.host.store.write().and_then(|batch| {
                        batch.record_rejection(clock::now_unix(), ods, doc, &publisher, &reason)?;
                        batch.commit()
                    });
                    if let Err(error) = recorded {
                        tracing::error!(%error, "could not record a rejected change");
                    }
                }
                Event::Refused(refusal) => {
                    // Normal after a withdrawal (a late copy) or when a peer decided on older
                    // facts; the document id and reason carry no patient data.
                    tracing::debug!(peer = %ods, doc = %refusal.doc, publisher = %refusal.publisher, reason = %refusal.reason, "refused a received document policy does not let this node hold");
                }
                Event::Stored {
                    documents,
                    checkpoint,
                } => {
                    tracing::debug!(peer = %ods, documents = documents.len(), ?checkpoint, "stored documents from peer");
                    if !documents.is_empty() {
                        // What this node stored may be for its other peers: offer it soon,
                        // not at the next regular look at the feed.
                        self.next_feed_poll = self.next_feed_poll.min(Instant::now() + FEED_PROMPT);
                        if let Some(observer) = &self.stored_observer {
                            observer(&documents);
                        }
                    }
                }
                Event::CaughtUp => live.last_sync_at = Some(clock::now_unix()),
                Event::PeerAcked { .. } => {}
                Event::RegistryAdopted => {
                    tracing::info!(peer = %ods, version = self.host.registry().version(), "adopted a newer trust registry from a peer");
                }
                Event::RegistryIgnored => {}
                Event::Unsendable { doc, bytes } => {
                    // An error, not a warning: this document does not reach the peer.
                    tracing::error!(peer = %ods, %doc, bytes, limit = caremesh_sync::wire::MAX_FRAME_BYTES, "a document the peer wants is too large to send in one frame; it reaches the peer only once a version of it fits (see `caremesh status`)");
                    self.counters.unsendable.fetch_add(1, Ordering::Relaxed);
                    let recorded = self.host.store.write().and_then(|batch| {
                        batch.record_unsendable(clock::now_unix(), ods, doc, bytes)?;
                        batch.commit()
                    });
                    if let Err(error) = recorded {
                        tracing::error!(%error, "could not record an unsendable document");
                    }
                }
                Event::Received { kind, docs } => received.push((kind, docs)),
            }
        }
        for (kind, docs) in received {
            self.log_frame(ods, kind, &docs);
        }
    }

    /// Opens a group commit for `what`; if it cannot be opened, the writes commit one by one.
    fn open_group(&mut self, what: &str) -> bool {
        match self.host.store.begin_group() {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(%error, what, "could not open a group commit; committing one by one");
                false
            }
        }
    }

    /// Rewrites every live peer's status row, in one transaction: as separate commits a hub
    /// with 500 peers made 500 fsyncs a second for monitoring rows alone.
    fn flush_status(&mut self) {
        let grouped = self.open_group("peer status");
        let peers: Vec<OdsCode> = self.sessions.keys().cloned().collect();
        for ods in peers {
            self.save_status(&ods, None);
        }
        if grouped && let Err(error) = self.host.store.end_group() {
            tracing::error!(%error, "could not save peer status");
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
            updated_at: clock::now_unix(),
        };
        if let Err(error) = self.host.store.save_peer_status(&status) {
            tracing::error!(%error, "could not save peer status");
        }
    }
}
