//! Load generator: many nodes against one hub over real QUIC, at a steady change rate.
//!
//! ```sh
//! cargo build --release -p caremesh --bins
//! ./target/release/load-bench --nodes 500 --rate 3200 --seconds 600
//! ```
//!
//! The hub is a real `caremesh run` process. The nodes run in this process, each as `caremesh
//! run` has it: its own key and certificate (listed in the signed trust registry), SQLite file,
//! sync engine and QUIC endpoint. Node i shares `--patients` patients with node i+1 (a ring),
//! so each patient is on two caseloads and every change has exactly one other node entitled to
//! it, reached only through the hub.
//!
//! The load: `--rate` changes a second, at nodes drawn with a seeded generator. A change is one
//! new item for one patient, published as ingest publishes it (a new signed version of the
//! patient's document and of their sharing record, one transaction) from a connection of its
//! own, as `caremesh ingest` writes beside a running node. Latency runs from that commit to
//! the commit at the other node (the engine's stored observer), which is when the item is in
//! the recipient's read model and shows in its record view.
//!
//! Every 10 s and at the end it prints changes made, delivered, latency percentiles, and the
//! hub's CPU and resident memory. After the load it waits for every change to arrive, then
//! checks every node and the hub hold exactly the versions each publisher holds: nothing lost.

use anyhow::{Context, Result, ensure};
use caremesh::home::Home;
use caremesh::network::{StoredObserver, SyncService, SyncSettings};
use caremesh_bench::{
    HubCpu, InFlight, LoadShape, LoadSummary, Tracker, count, cpu_seconds, free_hub_address,
    peak_rss_kib, publish_problem, region, ring_node_home, ring_patients, run_load, run_node,
};
use caremesh_storage::Store;
use caremesh_sync::rng::Rng;
use caremesh_sync::{DataClass, DocId, DocMeta, NhsNumber, OdsCode, Section};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Load benchmark (see the header of this file).
#[derive(clap::Parser)]
struct Args {
    #[command(flatten)]
    shape: LoadShape,
    /// Let the simulated nodes fsync (the hub always does, as configured for production).
    #[arg(long)]
    durable_nodes: bool,
    /// Keep the work folder (node homes, databases) afterwards.
    #[arg(long)]
    keep: bool,
}

/// A simulated node: its home, the patients it shares with each neighbour, and the driver's
/// own connection to its database.
struct Node {
    home: Home,
    ods: OdsCode,
    /// Shared with the previous node, then with the next.
    patients: [Vec<NhsNumber>; 2],
}

fn main() -> Result<()> {
    let args: Args = clap::Parser::parse();
    run_load("load-bench", &args.shape, args.keep, |work| {
        run(&args, work)
    })
}

fn run(args: &Args, work: &Path) -> Result<()> {
    let started = Instant::now();
    let nodes = prepare_nodes(work, args.shape.nodes, args.shape.patients)?;
    let dirs: Vec<PathBuf> = nodes.iter().map(|n| n.home.dir.clone()).collect();
    let hub_dir = region(work, &dirs, "hub", Some(free_hub_address()?.to_string()))?;
    let per_node = count(&dirs[0].join("node.db"), "SELECT count(*) FROM documents")?;
    println!(
        "{} nodes, {} patients each ({} shared with each neighbour), {} documents each; prepared in {:.1}s",
        args.shape.nodes,
        2 * args.shape.patients,
        args.shape.patients,
        per_node,
        started.elapsed().as_secs_f64()
    );

    let mut hub = run_node(&hub_dir)?;
    let hub_pid = hub.id();
    let tracker = Arc::new(Tracker::default());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let services = start_nodes(&runtime, &nodes, &tracker, args.durable_nodes, shutdown_rx)?;
    let hub_db = hub_dir.join("node.db");
    wait_converged(&hub_db, &dirs, per_node, started)?;
    println!(
        "connected and converged after {:.1}s (hub holds {} documents)",
        started.elapsed().as_secs_f64(),
        count(&hub_db, "SELECT count(*) FROM documents")?
    );

    let stop = Arc::new(AtomicBool::new(false));
    let driver = {
        let (stop, tracker) = (stop.clone(), tracker.clone());
        let (rate, seed, patients) = (args.shape.rate, args.shape.seed, args.shape.patients);
        let nodes_dirs = dirs.clone();
        std::thread::Builder::new()
            .name("load-driver".into())
            .spawn(move || drive(&nodes_dirs, patients, rate, seed, &tracker, &stop))?
    };
    let load_started = Instant::now();
    let mut cpu = HubCpu::new(hub_pid);
    let own_cpu_before = cpu_seconds(std::process::id());
    println!("{}", Tracker::PROGRESS_HEADER);
    let mut last_made = 0;
    while load_started.elapsed() < Duration::from_secs(args.shape.seconds) {
        std::thread::sleep(
            Duration::from_secs(10).min(
                Duration::from_secs(args.shape.seconds).saturating_sub(load_started.elapsed()),
            ),
        );
        let made = tracker.made.load(Ordering::Relaxed);
        println!(
            "{}",
            tracker.progress(
                load_started.elapsed().as_secs_f64(),
                made,
                last_made,
                &mut cpu
            )
        );
        last_made = made;
        if driver.is_finished() {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let driven = driver.join().expect("driver does not panic")?;
    let load_seconds = load_started.elapsed().as_secs_f64();
    let hub_cpu = cpu.total_seconds();
    let own_cpu = cpu_seconds(std::process::id()) - own_cpu_before;
    let drain_started = Instant::now();
    while tracker.pending() > 0 && drain_started.elapsed() < Duration::from_secs(args.shape.drain) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let drained_after = drain_started.elapsed().as_secs_f64();
    let pending = tracker.pending();
    let hub_peak = peak_rss_kib(hub_pid);

    let _ = shutdown_tx.send(true);
    for service in services {
        service.join();
    }
    let _ = hub.kill();
    let _ = hub.wait();

    LoadSummary {
        made: tracker.made.load(Ordering::Relaxed),
        load_seconds,
        rate: args.shape.rate,
        late: driven.late,
        latencies: std::mem::take(&mut tracker.latencies.lock().expect("not poisoned").0),
        drained_after,
        pending,
        hub_cpu,
        hub_peak_kib: hub_peak,
        own_cpu,
    }
    .print();
    let check = check_nothing_lost(&dirs, &hub_db)?;
    println!(
        "nothing lost: every node and the hub hold exactly what each publisher holds ({} copies checked)",
        check
    );
    ensure!(pending == 0, "{pending} changes never arrived");
    Ok(())
}

/// Node homes in a ring: node i shares `patients` patients with node i+1, and publishes one
/// item for each of its patients so that both are on the patient's caseload.
fn prepare_nodes(work: &Path, count: usize, patients: u64) -> Result<Vec<Node>> {
    let mut nodes = Vec::with_capacity(count);
    for index in 0..count {
        let home = ring_node_home(work, index)?;
        let ods = home.config.organisation.ods.clone();
        let node = Node {
            home,
            ods,
            patients: ring_patients(index, count, patients),
        };
        let mut store = node.home.open_store()?;
        store.without_fsync()?;
        for patient in node.patients.iter().flatten() {
            publish_item(&node, &mut store, patient, 0)?;
        }
        nodes.push(node);
    }
    Ok(nodes)
}

/// One new item about `patient` at `node`, published as ingest does. Returns the item
/// document's id and its new heads, read inside the transaction.
fn publish_item(
    node: &Node,
    store: &mut Store,
    patient: &NhsNumber,
    serial: u64,
) -> Result<(DocId, Vec<[u8; 32]>)> {
    let id = format!("Condition/load-{serial}");
    let meta = DocMeta {
        publisher: node.ods.clone(),
        patient: patient.clone(),
        section: Section::Problems,
        class: DataClass::Coded,
    };
    let key = node.home.signing_key()?;
    let batch = store.write()?;
    let title = format!("Load-test problem {serial}");
    publish_problem(&batch, &node.home, &key, patient, &id, &title)?;
    let heads = batch
        .document(meta.id())?
        .and_then(|stored| stored.signed_heads())
        .context("the published document is held")?
        .heads;
    batch.commit()?;
    Ok((meta.id(), heads))
}

fn start_nodes(
    runtime: &tokio::runtime::Runtime,
    nodes: &[Node],
    tracker: &Arc<Tracker>,
    durable: bool,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<SyncService>> {
    runtime.block_on(async {
        let mut services = Vec::with_capacity(nodes.len());
        for (index, node) in nodes.iter().enumerate() {
            let home = Home::open(&node.home.dir)?;
            let trust = home.trust()?.context("load node has a registry")?;
            let observer: StoredObserver = {
                let tracker = tracker.clone();
                Arc::new(move |documents| tracker.stored(index, documents))
            };
            services.push(
                caremesh::network::start(
                    SyncSettings {
                        stored_observer: Some(observer),
                        durable,
                        ..SyncSettings::for_home(&home, Some(trust))?
                    },
                    shutdown.clone(),
                )
                .await?,
            );
        }
        anyhow::Ok(services)
    })
}

/// Waits until the hub holds every node's documents and every node its neighbours'.
fn wait_converged(hub_db: &Path, dirs: &[PathBuf], per_node: i64, started: Instant) -> Result<()> {
    let total = per_node * dirs.len() as i64;
    let everywhere = "SELECT count(*) FROM documents";
    loop {
        ensure!(
            started.elapsed() < Duration::from_secs(1800),
            "not converged in 30 minutes (hub holds {} of {total})",
            count(hub_db, everywhere).unwrap_or(0)
        );
        std::thread::sleep(Duration::from_millis(500));
        if count(hub_db, everywhere).unwrap_or(0) < total {
            continue;
        }
        let mut all = true;
        for dir in dirs {
            // Its own documents, and the half of each neighbour's that are about the
            // patients they share.
            if count(&dir.join("node.db"), everywhere)? < 2 * per_node {
                all = false;
                break;
            }
        }
        if all {
            return Ok(());
        }
    }
}

struct Driven {
    /// Publications that went out over a second behind their schedule: the driver could not
    /// keep the rate.
    late: u64,
}

/// Publishes changes at `rate` a second until `stop`, at nodes drawn from `seed`.
fn drive(
    dirs: &[PathBuf],
    patients: u64,
    rate: f64,
    seed: u64,
    tracker: &Tracker,
    stop: &AtomicBool,
) -> Result<Driven> {
    let count = dirs.len();
    let mut nodes = Vec::with_capacity(count);
    for (index, dir) in dirs.iter().enumerate() {
        let home = Home::open(dir)?;
        let previous = (index + count - 1) % count;
        let patients = ring_patients(index, count, patients);
        let store = home.open_store()?;
        store.without_fsync()?;
        let ods = home.config.organisation.ods.clone();
        nodes.push((
            Node {
                home,
                ods,
                patients,
            },
            store,
            [previous, (index + 1) % count],
        ));
    }
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let (mut made, mut late) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        if made >= due {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        let behind = (due - made) as f64 / rate;
        if behind > 1.0 {
            late += 1;
        }
        let (node, store, neighbours) = &mut nodes[rng.below(count as u64) as usize];
        let side = rng.below(2) as usize;
        let patients = &node.patients[side];
        let patient = patients[rng.below(patients.len() as u64) as usize].clone();
        let (doc, heads) = publish_item(node, store, &patient, made + 1)?;
        tracker.published(
            doc,
            InFlight {
                heads,
                published: Instant::now(),
                recipient: neighbours[side],
            },
        );
        made += 1;
    }
    Ok(Driven { late })
}

/// Signed heads of each document held, by publisher and document id.
type HeldVersions = HashMap<(String, Vec<u8>), Vec<u8>>;

/// Counts every copy of every document at every node and at the hub against its publisher's
/// own version. Returns the number of copies compared.
fn check_nothing_lost(dirs: &[PathBuf], hub_db: &Path) -> Result<usize> {
    let read = |db: &Path| -> Result<HeldVersions> {
        let conn = rusqlite::Connection::open(db)?;
        let mut statement = conn.prepare("SELECT publisher, doc_id, signed FROM documents")?;
        let rows = statement
            .query_map([], |row| Ok(((row.get(0)?, row.get(1)?), row.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    };
    let held: Vec<HeldVersions> = dirs
        .iter()
        .map(|d| read(&d.join("node.db")))
        .collect::<Result<_>>()?;
    let hub = read(hub_db)?;
    let mut compared = 0;
    for (index, dir) in dirs.iter().enumerate() {
        let ods = Home::open(dir)?.config.organisation.ods.to_string();
        let own: Vec<_> = held[index]
            .iter()
            .filter(|((publisher, _), _)| *publisher == ods)
            .collect();
        let neighbours = [
            (index + dirs.len() - 1) % dirs.len(),
            (index + 1) % dirs.len(),
        ];
        for (key, signed) in own {
            ensure!(
                hub.get(key) == Some(signed),
                "the hub does not hold {ods}'s latest version of a document"
            );
            let copies = neighbours
                .iter()
                .filter(|&&n| held[n].get(key) == Some(signed))
                .count();
            ensure!(
                copies == 1,
                "{copies} neighbours of {ods} hold its latest version of a document (expected 1)"
            );
            compared += 2;
        }
    }
    Ok(compared)
}
