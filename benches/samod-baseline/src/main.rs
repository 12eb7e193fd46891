//! samod baseline for the caremesh sync benchmark.
//!
//! `samod-baseline --db NODE_DB [--work DIR] [--limit-seconds N]`
//!
//! Takes the documents a hub may hold from a caremesh node database (the same Automerge documents the
//! caremesh benchmark moves) and syncs them between two samod repos (automerge-repo in Rust)
//! over TCP on 127.0.0.1, both with samod's filesystem storage:
//!
//! 1. cold: the receiver, connected and empty, finds every document (given up, and reported as
//!    incomplete with the count found, after `--limit-seconds`, 900 by default);
//! 2. live: with the connection up, one document changes at the source;
//! 3. reconnect: the receiver disconnects, one document changes, the receiver reconnects and
//!    holds the change (what a site whose link dropped pays when it comes back); given up, and
//!    reported as incomplete, after `--limit-seconds`.
//!
//! Bytes and messages are counted at the receiver's side of the socket, framing included.
//! Results are printed as `result KIND key=value ...` lines, which `sync-bench` reads.

use anyhow::{Context, Result, bail, ensure};
use automerge::transaction::Transactable;
use automerge::{Automerge, ROOT, ReadDoc};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, SinkExt, StreamExt, stream};
use samod::storage::TokioFilesystemStorage;
use samod::{BackoffConfig, DialError, Dialer, DocHandle, DocumentId, Repo, Transport, Url};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// How many finds or creates are in flight at once.
const CONCURRENCY: usize = 256;
/// Traffic has settled when the counters stay still this long.
const QUIET: Duration = Duration::from_millis(1000);
/// Length prefix added to every message by samod's TCP framing.
const FRAME_HEADER: u64 = 4;
/// About the size of one caremesh item (a JSON object) added in the caremesh benchmark.
const CHANGE_TEXT: &str = "Changed for the benchmark: {\"id\":\"bench-change\",\"title\":\"Changed for the benchmark\",\"code\":{\"system\":\"http://snomed.info/sct\",\"code\":\"38341003\"},\"status\":\"active\",\"recorded\":\"2026-11-22T10:00:00Z\",\"source\":\"A81001\",\"section\":\"problems\",\"detail\":\"padding to the size of a real item ..........\"}";

#[derive(Default)]
struct Wire {
    sent_bytes: AtomicU64,
    sent_messages: AtomicU64,
    received_bytes: AtomicU64,
    received_messages: AtomicU64,
}

impl Wire {
    fn snapshot(&self) -> [u64; 4] {
        [
            self.sent_bytes.load(Ordering::Relaxed),
            self.received_bytes.load(Ordering::Relaxed),
            self.sent_messages.load(Ordering::Relaxed),
            self.received_messages.load(Ordering::Relaxed),
        ]
    }

    fn reset(&self) {
        for counter in [
            &self.sent_bytes,
            &self.sent_messages,
            &self.received_bytes,
            &self.received_messages,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
    }

    /// Waits until nothing has crossed the socket for [`QUIET`].
    async fn settled(&self) {
        let mut last = self.snapshot();
        let mut still_since = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = self.snapshot();
            if now != last {
                last = now;
                still_since = Instant::now();
            } else if still_since.elapsed() >= QUIET {
                return;
            }
        }
    }

    fn report(&self, kind: &str, extra: &str) {
        let [sent, received, sent_messages, received_messages] = self.snapshot();
        println!(
            "result {kind} bytes_to_source={sent} bytes_from_source={received} messages={} {extra}",
            sent_messages + received_messages
        );
    }
}

/// samod's own TCP framing (length-delimited), with every message counted.
fn counted_transport(io: TcpStream, wire: Arc<Wire>) -> Transport {
    io.set_nodelay(true).ok();
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(8 * 1024 * 1024 * 1024)
        .new_codec();
    let (sink, incoming) = Framed::new(io, codec).split();
    let received = wire.clone();
    let incoming = incoming.map(move |frame| {
        frame.map(|bytes| {
            received
                .received_bytes
                .fetch_add(bytes.len() as u64 + FRAME_HEADER, Ordering::Relaxed);
            received.received_messages.fetch_add(1, Ordering::Relaxed);
            bytes.to_vec()
        })
    });
    let sink = sink.with(move |message: Vec<u8>| {
        wire.sent_bytes
            .fetch_add(message.len() as u64 + FRAME_HEADER, Ordering::Relaxed);
        wire.sent_messages.fetch_add(1, Ordering::Relaxed);
        futures::future::ready(Ok::<_, std::io::Error>(Bytes::from(message)))
    });
    Transport::new(incoming, sink)
}

struct CountingDialer {
    source: SocketAddr,
    wire: Arc<Wire>,
}

impl Dialer for CountingDialer {
    type Error = Infallible;

    fn url(&self) -> Url {
        Url::parse(&format!("tcp://{}", self.source)).expect("a socket address is a valid URL")
    }

    fn connect(&self) -> BoxFuture<'static, Result<Transport, DialError<Infallible>>> {
        let (source, wire) = (self.source, self.wire.clone());
        async move {
            let io = TcpStream::connect(source)
                .await
                .map_err(DialError::transient)?;
            Ok(counted_transport(io, wire))
        }
        .boxed()
    }
}

fn shareable_snapshots(db: &Path) -> Result<Vec<Vec<u8>>> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("opening {}", db.display()))?;
    let mut statement =
        conn.prepare("SELECT s.snapshot FROM documents d JOIN document_snapshots s ON s.doc_id = d.doc_id WHERE d.class IN ('coded', 'free-text', 'document') ORDER BY d.seq")?;
    let rows = statement.query_map([], |row| row.get::<_, Vec<u8>>(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

async fn change(handle: &DocHandle) -> Result<()> {
    handle
        .with_document_async(|doc| {
            let mut tx = doc.transaction();
            tx.put(ROOT, "bench-change", CHANGE_TEXT)
                .expect("putting a string at the root");
            tx.commit();
        })
        .await?;
    Ok(())
}

async fn has_change(handle: &DocHandle) {
    loop {
        let seen = handle
            .with_document_async(|doc| matches!(doc.get(ROOT, "bench-change"), Ok(Some(_))))
            .await
            .unwrap_or(false);
        if seen {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn run(db: &Path, work: &Path, limit: Duration) -> Result<()> {
    let snapshots = shareable_snapshots(db)?;
    let saved: usize = snapshots.iter().map(Vec::len).sum();
    let documents = snapshots.len();
    eprintln!("samod baseline: {documents} documents, {saved} bytes saved");

    let source = Repo::build_tokio()
        .with_storage(TokioFilesystemStorage::new(work.join("source")))
        .load()
        .await;
    let prepared = Instant::now();
    let source_handles: Vec<DocHandle> = stream::iter(snapshots)
        .map(|bytes| {
            let source = source.clone();
            async move {
                let doc = Automerge::load(&bytes).context("loading a caremesh snapshot")?;
                Ok::<_, anyhow::Error>(source.create(doc).await?)
            }
        })
        .buffered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    eprintln!(
        "samod baseline: source repo filled in {:.1}s",
        prepared.elapsed().as_secs_f64()
    );
    let ids: Vec<DocumentId> = source_handles
        .iter()
        .map(|h| h.document_id().clone())
        .collect();

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let source_address = listener.local_addr()?;
    let acceptor = source.make_acceptor(Url::parse("tcp://source")?)?;
    tokio::spawn(async move {
        while let Ok((io, _)) = listener.accept().await {
            let _ = acceptor.accept(counted_transport(io, Arc::new(Wire::default())));
        }
    });

    let receiver = Repo::build_tokio()
        .with_storage(TokioFilesystemStorage::new(work.join("receiver")))
        .load()
        .await;
    let wire = Arc::new(Wire::default());
    let dial = |wire: Arc<Wire>| {
        receiver.dial(
            BackoffConfig::default(),
            Arc::new(CountingDialer {
                source: source_address,
                wire,
            }),
        )
    };

    // 1. Cold.
    let started = Instant::now();
    let dialer = dial(wire.clone())?;
    dialer
        .established()
        .await
        .context("connecting to the source repo")?;
    let mut finds = stream::iter(ids.clone())
        .map(|id| receiver.find(id))
        .buffer_unordered(CONCURRENCY);
    let mut found: Vec<DocHandle> = Vec::with_capacity(documents);
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, finds.next()).await {
            Ok(Some(handle)) => found.push(handle?.context("the source did not have a document")?),
            Ok(None) => break,
            Err(_) => {
                wire.report(
                    "cold-incomplete",
                    &format!(
                        "documents={documents} found={} seconds={:.3}",
                        found.len(),
                        limit.as_secs_f64()
                    ),
                );
                return Ok(());
            }
        }
    }
    drop(finds);
    let seconds = started.elapsed().as_secs_f64();
    ensure!(found.len() == documents);
    wire.report(
        "cold",
        &format!("documents={documents} seconds={seconds:.3} saved_bytes={saved}"),
    );
    wire.settled().await;
    let receiver_handles: HashMap<DocumentId, DocHandle> = found
        .into_iter()
        .map(|h| (h.document_id().clone(), h))
        .collect();

    // 2. Live: one change while connected.
    wire.reset();
    change(&source_handles[0]).await?;
    has_change(&receiver_handles[&ids[0]]).await;
    wire.settled().await;
    wire.report("live", &format!("documents={documents}"));

    // 3. Reconnect: one change while the receiver is away.
    // The handle keeps its peer info after close, so give the teardown a moment instead.
    dialer.close();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let changed = &source_handles[source_handles.len() / 2];
    change(changed).await?;
    wire.reset();
    let started = Instant::now();
    let dialer = dial(wire.clone())?;
    dialer.established().await.context("reconnecting")?;
    let arrived =
        tokio::time::timeout(limit, has_change(&receiver_handles[changed.document_id()])).await;
    if arrived.is_err() {
        wire.report(
            "reconnect-incomplete",
            &format!("documents={documents} seconds={:.3}", limit.as_secs_f64()),
        );
        return Ok(());
    }
    let seconds = started.elapsed().as_secs_f64();
    wire.settled().await;
    wire.report(
        "reconnect",
        &format!("documents={documents} seconds_to_change={seconds:.3}"),
    );
    dialer.close();
    receiver.stop().await;
    source.stop().await;
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).map(PathBuf::from))
    };
    let Some(db) = flag("--db") else {
        bail!("usage: samod-baseline --db NODE_DB [--work DIR] [--limit-seconds N]");
    };
    let work = flag("--work").unwrap_or_else(|| {
        std::env::temp_dir().join(format!("samod-baseline-{}", std::process::id()))
    });
    std::fs::create_dir_all(&work)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let limit = match flag("--limit-seconds") {
        Some(seconds) => Duration::from_secs(
            seconds
                .to_str()
                .and_then(|s| s.parse().ok())
                .context("--limit-seconds takes a whole number of seconds")?,
        ),
        None => Duration::from_secs(900),
    };
    let outcome = runtime.block_on(run(&db, &work, limit));
    std::fs::remove_dir_all(&work).ok();
    outcome
}
