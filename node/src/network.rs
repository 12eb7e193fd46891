//! Sync over QUIC: the endpoint, dialling with backoff, and the engine thread that runs the
//! node's sans-IO [`Driver`] (`caremesh-engine`) against the node's database.
//!
//! ```text
//!  quinn connection ──reader task──▶ Command::Input ──▶ ┌──────────── engine thread ───────────┐
//!                                                       │ Driver: the store's one writer,      │
//!  quinn connection ◀──writer task── Outgoing (≤ 8) ◀── │ a Session per peer; frames produced  │
//!                                                       │ while the outgoing queue has room    │
//!  ingest, view, CLI ──StoreWriter── Command::Local ──▶ │ local writes between turns           │
//!                                                       └──────────────────────────────────────┘
//! ```
//!
//! The engine thread runs in every running node, also one without a trust registry (which
//! syncs with nobody): it is where everything the node writes is written. Reads stay
//! concurrent, on read-only connections of their own.
//!
//! This module is only IO: what to store, when to acknowledge, which of two connections
//! survives and when to close are the driver's, which the simulator runs the same way.
//! Backpressure: each connection's outgoing queue holds at most [`OUTGOING_FRAMES`] frames and
//! the driver produces a frame only for a connection with room, so a slow peer stalls only
//! its own session. Incoming bytes pass through a bounded channel; when the engine falls
//! behind, readers stop reading and QUIC flow control slows the sender.

use crate::tls::{self, NodeIdentity};
use crate::trust::TrustState;
use anyhow::{Context, Result};
use caremesh_engine::{ConnId, Driver, DriverEvent, DriverOptions, Redial};
use caremesh_fhir::clock;
use caremesh_storage::Store;
use caremesh_storage::sync_host::{FixedRegistry, RegistrySource, StoreHost};
use caremesh_sync::model::OrgKind;
use caremesh_sync::policy::{Consent, Recipient};
use caremesh_sync::{OdsCode, PublisherKey};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use std::collections::{HashMap, HashSet, VecDeque};
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
/// A turn's group commit takes the commands already queued, up to this many, for up to
/// this long (see `Engine::handle_turn`).
const GROUP_COMMANDS: usize = 256;
const GROUP_WINDOW: Duration = Duration::from_millis(20);
/// The engine begins a turn at most this long after the last one ended. A turn costs the
/// same whatever it carries (a transaction, a commit and its WAL pages, the feed tip read
/// again, a sync), and a busy hub receives a frame every few hundred microseconds: waiting
/// for the commands of a few milliseconds to arrive makes one turn of many. A quiet node
/// is not delayed: a command that comes later than this after the last turn begins one at
/// once. Frames waiting on a commit's durability are released meanwhile.
const TURN_PACE: Duration = Duration::from_millis(5);
/// SQLite page cache of the engine's connection.
const ENGINE_CACHE_MIB: u32 = 64;
/// Documents kept loaded by a hub's engine and by any other node's: a hub stores a change
/// and serves it to each entitled peer straight after, so a few hundred catch most serves.
/// Each loaded document costs 75–95 KB of memory (measured on a hub: 4,096 added 300 MB,
/// 512 added 49 MB).
const HUB_LOADED_DOCUMENTS: usize = 512;
const NODE_LOADED_DOCUMENTS: usize = 64;
/// How often the registry file is looked at for an edition installed while the node runs.
const REGISTRY_FILE_CHECK: Duration = Duration::from_secs(1);

pub use caremesh_view::metrics::SyncCounters;

pub struct SyncSettings {
    pub ods: OdsCode,
    pub key: PublisherKey,
    /// The registry in force; without one the engine runs as the store's writer and syncs
    /// with nobody.
    pub trust: Option<TrustState>,
    pub listen: Option<String>,
    pub peers: Vec<OdsCode>,
    /// The node's database, with its data key when it is encrypted.
    pub database: caremesh_storage::at_rest::Database,
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
    pub fn for_home(home: &crate::home::Home, trust: Option<TrustState>) -> Result<SyncSettings> {
        Ok(SyncSettings {
            ods: home.config.organisation.ods.clone(),
            key: home.signing_key()?,
            trust,
            listen: home.config.sync.listen.clone(),
            peers: home.config.sync.peers.clone(),
            database: home.database()?,
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
    /// What the connection's reader made of bytes from the peer: frames decoded, documents'
    /// signatures checked, on the runtime's threads rather than the engine's.
    Input {
        conn: u64,
        input: caremesh_sync::ReadInput,
    },
    Closed {
        conn: u64,
        reason: String,
    },
    /// A write of the node's own (see [`StoreWriter`]), made between turns.
    Local(LocalWrite),
    /// Writes wait in the urgent lane ([`StoreWriter::write_now`]).
    Urgent,
}

/// A local write as the engine thread runs it: it sends its own result back.
type LocalWrite = Box<dyn FnOnce(&mut Store) + Send>;

/// Why a local write was not made.
#[derive(Debug, thiserror::Error)]
#[error(
    "the node is shutting down and did not make this write; nothing of it was stored: run the command again once the node is up"
)]
pub struct EngineStopped;

/// A handle on the running node's one store writer, the engine thread. Everything the node
/// writes outside sync goes through it: drop-folder ingest, the view's sessions, launch
/// tokens, break-glass and access records, audit checkpoints, and the CLI's writes while the
/// node runs. So the engine learns of each change as it is made (no polling for other
/// writers), and no two connections ever contend for the write lock.
#[derive(Clone)]
pub struct StoreWriter {
    engine: mpsc::Sender<Command>,
    urgent: Arc<UrgentLane>,
    /// The feed position up to which everything is durable: what may be told to others
    /// (the FHIR API's change notifications) without telling of a change a power cut could
    /// take back.
    durable_feed: watch::Receiver<u64>,
}

/// Writes someone is waiting for (a clinician's access record, a session): made before any
/// other local write, and between the commits of one under way (a long ingest).
#[derive(Default)]
struct UrgentLane {
    queue: Mutex<std::collections::VecDeque<LocalWrite>>,
}

impl UrgentLane {
    fn is_empty(&self) -> bool {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_empty()
    }

    /// Makes every urgent write waiting, in order, on `store`.
    fn run_waiting(&self, store: &mut Store) {
        loop {
            let next = self
                .queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .pop_front();
            match next {
                Some(write) => write(store),
                None => return,
            }
        }
    }
}

impl StoreWriter {
    /// Runs `write` on the engine thread, outside any turn, and returns what it returned. The
    /// sessions then offer what it added to the feed.
    pub async fn write<T, F>(&self, write: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        self.engine
            .send(Command::Local(Self::boxed(write, reply)))
            .await
            .map_err(|_| EngineStopped)?;
        answer.await.map_err(|_| EngineStopped)?
    }

    /// [`StoreWriter::write`] from a thread outside the runtime (the drop-folder watcher).
    pub fn write_blocking<T, F>(&self, write: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        self.engine
            .blocking_send(Command::Local(Self::boxed(write, reply)))
            .map_err(|_| EngineStopped)?;
        answer.blocking_recv().map_err(|_| EngineStopped)?
    }

    /// [`StoreWriter::write`] for a write someone is waiting for: made before other local
    /// writes, and between the commits of a long one under way (see
    /// [`StoreWriter::between_commits`]), so that a view is not held up by an ingest.
    pub async fn write_now<T, F>(&self, write: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        self.urgent
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push_back(Self::boxed(write, reply));
        // Wakes an idle engine; one already busy finds the write at its next pause.
        self.engine
            .send(Command::Urgent)
            .await
            .map_err(|_| EngineStopped)?;
        answer.await.map_err(|_| EngineStopped)?
    }

    /// For a long write (an ingest) to run between its commits: it makes the urgent writes
    /// waiting then.
    pub fn between_commits(&self) -> impl FnMut(&mut Store) + Send + 'static {
        let urgent = self.urgent.clone();
        move |store| urgent.run_waiting(store)
    }

    fn boxed<T, F>(write: F, reply: oneshot::Sender<Result<T>>) -> LocalWrite
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> Result<T> + Send + 'static,
    {
        Box::new(move |store| {
            // The caller may have gone (a closed HTTP request): the write stands regardless.
            let _ = reply.send(write(store));
        })
    }
}

/// The running node as the view sees it ([`caremesh_view::web::RunningNode`]): its one store
/// writer and the trust registry in force.
pub struct NodeForView {
    pub writer: StoreWriter,
    /// `None` while sync is off: no registry, so no keys are revoked.
    pub trust: Option<TrustState>,
}

impl caremesh_view::web::RunningNode for NodeForView {
    fn write_now(
        &self,
        write: caremesh_view::web::LocalWrite,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<(), caremesh_view::web::WriterStopped>>
                + Send
                + '_,
        >,
    > {
        Box::pin(async move {
            self.writer
                .write_now(move |store| {
                    write(store);
                    Ok(())
                })
                .await
                .map_err(|_| caremesh_view::web::WriterStopped)
        })
    }

    fn durable_feed(&self) -> watch::Receiver<u64> {
        self.writer.durable_feed.clone()
    }

    fn revoked_keys(&self) -> std::collections::BTreeMap<[u8; 32], OdsCode> {
        self.trust
            .as_ref()
            .map(|trust| trust.current().registry().revoked_keys())
            .unwrap_or_default()
    }
}

enum Outgoing {
    Frame(Vec<u8>),
    Close(String),
}

/// The running sync service; dropping the shutdown sender stops it.
pub struct SyncService {
    pub local_addr: Option<SocketAddr>,
    pub counters: Arc<SyncCounters>,
    /// Where the node's own writes go.
    pub writer: StoreWriter,
    /// Why the engine stopped the node, once it has: its database was found damaged.
    pub stopped: watch::Receiver<Option<String>>,
    engine: std::thread::JoinHandle<()>,
}

impl SyncService {
    /// Waits for the engine to write its final peer status after shutdown was signalled.
    pub fn join(self) {
        let _ = self.engine.join();
    }
}

/// Starts the engine thread and, with a trust registry, the endpoint and the dialers, on the
/// current tokio runtime.
pub async fn start(settings: SyncSettings, shutdown: watch::Receiver<bool>) -> Result<SyncService> {
    let counters = Arc::new(SyncCounters::default());
    let store = settings.database.open()?;
    if !settings.durable {
        store.without_fsync()?;
    }
    store.set_cache_mib(ENGINE_CACHE_MIB)?;
    store.reset_connections()?;
    let registry: Box<dyn RegistrySource> = match &settings.trust {
        Some(trust) => Box::new(trust.clone()),
        None => Box::new(FixedRegistry(Arc::new(
            caremesh_sync::trust::VerifiedRegistry::none(),
        ))),
    };
    let mut host = StoreHost::new(
        store,
        registry,
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
    let urgent = Arc::new(UrgentLane::default());
    let connected: Arc<Mutex<HashSet<OdsCode>>> = Default::default();
    let (stopped_tx, stopped) = watch::channel(None);
    let (durable_feed_tx, durable_feed) = watch::channel(0);
    let engine = {
        let ods = settings.ods.clone();
        let connected = connected.clone();
        let shutdown = shutdown.clone();
        let counters = counters.clone();
        let stored_observer = settings.stored_observer.clone();
        let urgent = urgent.clone();
        std::thread::Builder::new()
            .name("sync-engine".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .expect("engine runtime builds");
                let options = DriverOptions {
                    log_received_frames: wire_log.is_some(),
                };
                let mut driver = Driver::new(ods, host, options, 0);
                driver.defer_syncs();
                let (sync_requests, synced) =
                    match spawn_wal_sync(driver.host().store.wal_syncer()) {
                        Ok(channels) => channels,
                        Err(error) => {
                            tracing::error!(%error, "could not start the thread that syncs the database; the node stops");
                            let _ = stopped_tx.send(Some(format!(
                                "could not start the thread that syncs the database: {error}"
                            )));
                            return;
                        }
                    };
                let engine = Engine {
                    driver,
                    sync_requests,
                    synced,
                    syncing: true,
                    urgent,
                    started: Instant::now(),
                    outgoing: HashMap::new(),
                    connected,
                    counters,
                    wire_log,
                    stored_observer,
                    stopped: stopped_tx,
                    durable_feed: durable_feed_tx,
                    commit_tips: VecDeque::new(),
                    next_turn_at: Instant::now(),
                };
                // What the database held at opening is durable.
                engine.feed_durable_to(engine.feed_tip());
                runtime.block_on(engine.run(engine_rx, shutdown));
            })?
    };

    let writer = StoreWriter {
        engine: engine_tx.clone(),
        urgent: urgent.clone(),
        durable_feed,
    };
    let Some(trust) = settings.trust else {
        return Ok(SyncService {
            local_addr: None,
            counters,
            writer,
            stopped,
            engine,
        });
    };
    let identity = NodeIdentity::from_key(&settings.key, &settings.ods)?;
    let server = tls::server_config(&identity, &trust)?;
    let server = QuicServerConfig::try_from(server).context("QUIC server TLS configuration")?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server));
    server.transport_config(transport_config());
    let bind: SocketAddr = match &settings.listen {
        Some(listen) => listen
            .parse()
            .with_context(|| format!("[sync] listen `{listen}` is not an IP:port address"))?,
        None => "0.0.0.0:0".parse().expect("valid address"),
    };
    let endpoint = sync_endpoint(Some(server), bind)
        .with_context(|| format!("binding the sync endpoint on UDP {bind}"))?;
    let local_addr = settings.listen.as_ref().and(endpoint.local_addr().ok());

    let context = Arc::new(Shared {
        identity,
        trust: trust.clone(),
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
    tokio::spawn(watch_registry_file(trust, shutdown.clone()));
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
        writer,
        stopped,
        engine,
    })
}

/// The kernel buffers asked for on the sync socket, each way. All of a node's peers share its
/// one UDP socket, and Linux's default receive buffer (about 208 KiB) is a few hundred
/// datagrams: a socket whose runtime is busy for a few milliseconds while hundreds of peers
/// send drops the rest. QUIC sends them again, but each loss shrinks the sender's window and
/// backs its timers off. With 500 peers, the hub's socket dropped about 2,000 datagrams while
/// they connected and the load generator's tens of thousands a minute under load, and
/// connections took two to four times as long to be made (BENCHMARKS.md, eighteenth sitting).
pub const SYNC_SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// A QUIC endpoint on [`sync_socket`]`(bind)`. `server` is `None` for an endpoint that only
/// dials (the load generator's).
pub fn sync_endpoint(
    server: Option<quinn::ServerConfig>,
    bind: SocketAddr,
) -> std::io::Result<quinn::Endpoint> {
    let (socket, _) = sync_socket(bind)?;
    let runtime = Arc::new(quinn::TokioRuntime);
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime)
}

/// What the kernel granted a socket, in bytes each way.
#[derive(Debug, Clone, Copy)]
pub struct SocketBuffers {
    pub receive: usize,
    pub send: usize,
}

/// A UDP socket bound to `bind`, with [`SYNC_SOCKET_BUFFER`] asked for each way. The kernel
/// grants at most `net.core.rmem_max` and `net.core.wmem_max`; less than asked is logged, as
/// the node works and only drops sooner under load.
pub fn sync_socket(bind: SocketAddr) -> std::io::Result<(std::net::UdpSocket, SocketBuffers)> {
    let socket = std::net::UdpSocket::bind(bind)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    // Failing to grow a buffer leaves the default, which is what the node ran with before.
    let _ = state.set_recv_buffer_size((&socket).into(), SYNC_SOCKET_BUFFER);
    let _ = state.set_send_buffer_size((&socket).into(), SYNC_SOCKET_BUFFER);
    let granted = SocketBuffers {
        receive: state.recv_buffer_size((&socket).into())?,
        send: state.send_buffer_size((&socket).into())?,
    };
    // Linux reports twice what was set (the rest is its bookkeeping): what it set is what is
    // compared with the ask, and logged.
    let reported_per_set = if cfg!(target_os = "linux") { 2 } else { 1 };
    let (receive, send) = (
        granted.receive / reported_per_set,
        granted.send / reported_per_set,
    );
    if receive < SYNC_SOCKET_BUFFER || send < SYNC_SOCKET_BUFFER {
        tracing::info!(
            receive_kib = receive / 1024,
            send_kib = send / 1024,
            asked_kib = SYNC_SOCKET_BUFFER / 1024,
            "the sync socket's kernel buffers are smaller than asked for, so a busy hub drops datagrams sooner; raise net.core.rmem_max and net.core.wmem_max to grant them"
        );
    }
    Ok((socket, granted))
}

/// The QUIC transport every sync connection uses (the load generator dials with it too).
pub fn transport_config() -> Arc<quinn::TransportConfig> {
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
    let org = registry.standing(&key).holder(None).ok()?;
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
    let mut redial = Redial::default();
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
        let pause = if already {
            // The peer dialled us: look again in a second, and start afresh if it drops.
            redial = Redial::default();
            Duration::from_secs(1)
        } else {
            let lasted = started.elapsed().as_millis() as u64;
            Duration::from_millis(redial.pause_after(lasted, jitter()))
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

/// A uniform draw from [0, 1) for the redial jitter, from the OS.
fn jitter() -> f64 {
    let mut bytes = [0u8; 4];
    match getrandom::fill(&mut bytes) {
        Ok(()) => u32::from_le_bytes(bytes) as f64 / (u32::MAX as f64 + 1.0),
        Err(_) => 0.5,
    }
}

async fn dial(endpoint: &quinn::Endpoint, context: &Arc<Shared>, peer: &OdsCode) -> Result<()> {
    let registry = context.trust.current();
    let organisation = registry
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
        let mut frames = caremesh_sync::FrameReader::default();
        loop {
            match recv.read_chunk(READ_CHUNK, true).await {
                Ok(Some(chunk)) => {
                    let input = Command::Input {
                        conn,
                        input: frames.read(&chunk.bytes),
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

const SYNC_THREAD_STOPPED: &str = "the thread that syncs the database stopped";

/// What the WAL sync thread last did: synced every commit up to this one, or failed.
#[derive(Debug, Clone)]
enum SyncOutcome {
    Durable(u64),
    Failed(String),
}

/// Starts the thread that makes the engine's group commits durable ([`Driver::defer_syncs`]):
/// it takes commits to sync, syncs the WAL once for all those asked for meanwhile (each was
/// asked for after it committed, so the sync covers it), and says which are durable. The
/// engine thread goes on with its next turn while the disk works. A failed sync is the
/// thread's last: what the disk holds is then unknown, and the node stops.
fn spawn_wal_sync(
    syncer: caremesh_storage::WalSyncer,
) -> std::io::Result<(std::sync::mpsc::Sender<u64>, watch::Receiver<SyncOutcome>)> {
    let (requests, asked) = std::sync::mpsc::channel::<u64>();
    let (done, synced) = watch::channel(SyncOutcome::Durable(0));
    std::thread::Builder::new()
        .name("sync-wal".into())
        .spawn(move || {
            while let Ok(mut commit) = asked.recv() {
                while let Ok(later) = asked.try_recv() {
                    commit = commit.max(later);
                }
                let outcome = match syncer.sync() {
                    Ok(()) => SyncOutcome::Durable(commit),
                    Err(error) => SyncOutcome::Failed(error.to_string()),
                };
                let failed = matches!(outcome, SyncOutcome::Failed(_));
                if done.send(outcome).is_err() || failed {
                    return;
                }
            }
        })?;
    Ok((requests, synced))
}

/// The engine thread: the IO around the [`Driver`], which decides everything.
struct Engine {
    driver: Driver,
    /// Commits for the WAL sync thread to make durable, and what it made durable; `syncing`
    /// while that thread runs.
    sync_requests: std::sync::mpsc::Sender<u64>,
    synced: watch::Receiver<SyncOutcome>,
    syncing: bool,
    urgent: Arc<UrgentLane>,
    started: Instant,
    /// Each live connection's queue towards its writer task.
    outgoing: HashMap<ConnId, mpsc::Sender<Outgoing>>,
    connected: Arc<Mutex<HashSet<OdsCode>>>,
    counters: Arc<SyncCounters>,
    wire_log: Option<std::fs::File>,
    stored_observer: Option<StoredObserver>,
    /// Told why the node must stop ([`DriverEvent::Stopped`]).
    stopped: watch::Sender<Option<String>>,
    /// Told the feed position up to which everything is durable.
    durable_feed: watch::Sender<u64>,
    /// Each deferred commit not yet durable, with the feed's tip when it was made.
    commit_tips: VecDeque<(u64, u64)>,
    /// When the next turn may begin: `TURN_PACE` after the last one ended.
    next_turn_at: Instant,
}

impl Engine {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            self.pump();
            self.ask_sync();
            let mut wake = self
                .driver
                .poll_timeout()
                .map(|at| self.started + Duration::from_millis(at))
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            if self.driver.is_blocked() {
                // A writer task frees room without telling the engine: look again soon.
                wake = wake.min(Instant::now() + Duration::from_millis(5));
            }
            // Within the pace the commands wait for the next turn (see `TURN_PACE`).
            let paced = Instant::now() < self.next_turn_at;
            if paced {
                wake = wake.min(self.next_turn_at);
            }
            tokio::select! {
                command = commands.recv(), if !paced => match command {
                    Some(command) => self.handle_turn(command, &mut commands),
                    None => break,
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
                changed = self.synced.changed(), if self.syncing => match changed {
                    Ok(()) => {
                        let outcome = self.synced.borrow_and_update().clone();
                        match outcome {
                            SyncOutcome::Durable(commit) => {
                                self.driver.durable(commit);
                                self.feed_durable_through(commit);
                            }
                            SyncOutcome::Failed(reason) => self.sync_lost(&reason),
                        }
                    }
                    Err(_) => self.sync_lost(SYNC_THREAD_STOPPED),
                },
                _ = shutdown.changed() => break,
            }
            let now = self.now_ms();
            // Only when a timer is due, as the simulator calls it: each call is a turn of
            // its own (a transaction, every session's timer looked at), and this loop wakes
            // for every turn, sync and frame released.
            if self.driver.poll_timeout().is_some_and(|at| at <= now) {
                self.driver.handle_timeout(now);
            }
            self.driver.retry_blocked();
            self.handle_events();
        }
        self.driver.shut_down();
        // The final status rows, and anything committed and not yet synced, reach the disk
        // before the engine ends.
        if let Err(error) = self.driver.host().store.wal_syncer().sync() {
            tracing::error!(%error, "could not sync the database at shutdown; the last peer status written may be lost to a power cut");
        }
        self.handle_events();
    }

    /// Hands the WAL sync thread the latest commit, if one was made since it was last asked.
    fn ask_sync(&mut self) {
        let Some(commit) = self.driver.poll_sync() else {
            return;
        };
        self.commit_tips.push_back((commit, self.feed_tip()));
        if self.syncing && self.sync_requests.send(commit).is_err() {
            self.sync_lost(SYNC_THREAD_STOPPED);
            self.handle_events();
        }
    }

    fn feed_tip(&self) -> u64 {
        self.driver.host().store.feed_tip().unwrap_or_else(|error| {
            tracing::error!(%error, "could not read the feed tip");
            0
        })
    }

    /// Commit `commit` and those before it are durable: so is the feed up to its tip.
    fn feed_durable_through(&mut self, commit: u64) {
        let mut tip = None;
        while let Some(&(made, made_tip)) = self.commit_tips.front() {
            if made > commit {
                break;
            }
            tip = Some(made_tip);
            self.commit_tips.pop_front();
        }
        if let Some(tip) = tip {
            self.feed_durable_to(tip);
        }
    }

    fn feed_durable_to(&self, tip: u64) {
        self.durable_feed.send_if_modified(|held| {
            let moved = tip > *held;
            *held = (*held).max(tip);
            moved
        });
    }

    /// The WAL sync thread failed or ended: nothing more can be made durable, so the driver
    /// stops the node.
    fn sync_lost(&mut self, reason: &str) {
        self.syncing = false;
        self.driver.sync_failed(reason);
    }

    /// Handles `first` and whatever else is already queued (within bounds) as one turn whose
    /// writes commit together: one fsync for what every peer sent in the turn, instead of one
    /// each. Frames (acknowledgements among them) go out only after, from `pump`.
    /// A local write met on the way ends the turn and is made after it: it is a transaction
    /// of its own.
    fn handle_turn(&mut self, first: Command, commands: &mut mpsc::Receiver<Command>) {
        self.write_urgent();
        match first {
            Command::Local(write) => return self.write_local(write),
            Command::Urgent => return,
            _ => {}
        }
        self.driver.begin_turn();
        let deadline = Instant::now() + GROUP_WINDOW;
        self.handle(first);
        let mut handled = 1;
        let mut local = None;
        while handled < GROUP_COMMANDS && Instant::now() < deadline {
            match commands.try_recv() {
                Ok(Command::Local(write)) => {
                    local = Some(write);
                    break;
                }
                // Made after the turn, below.
                Ok(Command::Urgent) => {}
                Ok(command) => self.handle(command),
                Err(_) => break,
            }
            handled += 1;
        }
        self.driver.end_turn();
        self.next_turn_at = Instant::now() + TURN_PACE;
        // The disk syncs this turn's commit while the engine goes on.
        self.ask_sync();
        self.handle_events();
        self.write_urgent();
        if let Some(write) = local {
            // The turn's acknowledgements leave before a long write begins.
            self.pump();
            self.write_local(write);
        }
    }

    /// Makes the urgent writes waiting, each as a local write.
    fn write_urgent(&mut self) {
        if self.urgent.is_empty() {
            return;
        }
        let urgent = self.urgent.clone();
        self.write_local(Box::new(move |store| urgent.run_waiting(store)));
    }

    fn write_local(&mut self, write: LocalWrite) {
        let Ok(()) = self
            .driver
            .write_local(|host| -> Result<(), std::convert::Infallible> {
                write(&mut host.store);
                Ok(())
            });
        // A local write commits at `synchronous = FULL`: its WAL sync also covered every
        // deferred commit before it. With none waiting, the feed is durable to its tip.
        if self.commit_tips.is_empty() {
            self.feed_durable_to(self.feed_tip());
        }
        self.handle_events();
    }

    fn handle(&mut self, command: Command) {
        let now = self.now_ms();
        match command {
            Command::Open {
                conn,
                peer,
                key,
                dialled_by_us,
                outgoing,
                accepted,
            } => {
                let opened = self.driver.connect(now, conn, (peer, key), dialled_by_us);
                if opened {
                    self.outgoing.insert(conn, outgoing);
                }
                let _ = accepted.send(opened);
            }
            Command::Input { conn, input } => self.driver.receive(now, conn, input),
            Command::Closed { conn, reason } => {
                self.outgoing.remove(&conn);
                self.driver.disconnected(conn, &reason);
            }
            Command::Local(_) | Command::Urgent => {
                unreachable!("local writes are made between turns")
            }
        }
    }

    /// Hands every frame the driver has for a connection with room to its writer task.
    fn pump(&mut self) {
        let now = self.now_ms();
        let outgoing = &self.outgoing;
        // A connection whose writer has gone has room: its frames are dropped with it.
        let has_room = |conn: ConnId| outgoing.get(&conn).is_none_or(|tx| tx.capacity() > 0);
        while let Some(transmit) = self.driver.poll_transmit(now, has_room) {
            if let Some(tx) = self.outgoing.get(&transmit.conn) {
                // Room was checked just now, and the engine is the queue's only sender.
                let _ = tx.try_send(Outgoing::Frame(transmit.frame));
            }
        }
        self.handle_events();
    }

    fn handle_events(&mut self) {
        while let Some(event) = self.driver.poll_event() {
            match event {
                DriverEvent::PeerUp { peer, .. } => {
                    self.connected
                        .lock()
                        .expect("lock never poisoned")
                        .insert(peer);
                }
                DriverEvent::Close {
                    conn,
                    peer,
                    reason,
                    cause,
                } => {
                    if cause.is_failure() {
                        self.counters
                            .protocol_errors
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(tx) = self.outgoing.remove(&conn) {
                        let _ = tx.try_send(Outgoing::Close(reason));
                    }
                    self.connected
                        .lock()
                        .expect("lock never poisoned")
                        .remove(&peer);
                }
                DriverEvent::Stored { documents, .. } => {
                    if let Some(observer) = &self.stored_observer {
                        observer(&documents);
                    }
                }
                DriverEvent::Unsendable { .. } => {
                    self.counters.unsendable.fetch_add(1, Ordering::Relaxed);
                }
                DriverEvent::Received { peer, kind, docs } => self.log_frame(&peer, kind, &docs),
                DriverEvent::Stopped { reason } => {
                    let _ = self.stopped.send(Some(reason));
                }
                DriverEvent::Rejected { .. } | DriverEvent::Refused { .. } => {}
            }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_limit(name: &str) -> Option<usize> {
        std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The sync socket gets the larger buffers wherever the kernel allows them. Where its
    /// limits are the defaults (as on a stock Linux), a socket left alone and one asked for
    /// more look alike, and the test shows only that asking is not an error.
    #[test]
    fn the_sync_socket_asks_the_kernel_for_large_buffers() {
        let (socket, granted) = sync_socket("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(socket.local_addr().unwrap().port() > 0);
        let (Some(rmem_max), Some(wmem_max)) = (kernel_limit("rmem_max"), kernel_limit("wmem_max"))
        else {
            return;
        };
        // Linux grants up to its limit and reports twice what it granted (the doubling
        // covers its bookkeeping), so at least the smaller of the two is held.
        assert!(
            granted.receive >= SYNC_SOCKET_BUFFER.min(rmem_max),
            "receive buffer {} with net.core.rmem_max {rmem_max}",
            granted.receive
        );
        assert!(
            granted.send >= SYNC_SOCKET_BUFFER.min(wmem_max),
            "send buffer {} with net.core.wmem_max {wmem_max}",
            granted.send
        );
    }
}
