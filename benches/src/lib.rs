//! What the benchmark binaries (`sync-bench`, `load-bench`, `hub-load`) share: a region of node homes
//! around a hub with a signed trust registry, running a node as a child process, and reading
//! figures off a process or a database. Not used by the node itself.

use anyhow::{Context, Result};
use caremesh::home::{Home, OrganisationConfig};
use caremesh::trust::TrustState;
use caremesh_engine::{Driver, DriverEvent, DriverOptions, Transmit};
use caremesh_fhir::clock;
use caremesh_fhir::synthetic::{GenerateOptions, generate, test_nhs_number};
use caremesh_ingest::{FileDisposition, Ingestor};
use caremesh_storage::Store;
use caremesh_storage::sync_host::StoreHost;
use caremesh_sync::policy::Recipient;
use caremesh_sync::trust::public_key_of;
use caremesh_sync::{DocId, NhsNumber};
use caremesh_sync::{
    Item, OdsCode, OrgKind, Organisation, PublishedDocument, RegistryFile, SignedHeads,
};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The benchmarks' trust authority key: a fixed test key, never used outside benchmarks.
pub const AUTHORITY: [u8; 32] = [42; 32];

/// A hub home in `work/name`, and a signed registry listing it and every member, installed in
/// each; the members dial the hub.
pub fn region(
    work: &Path,
    members: &[PathBuf],
    name: &str,
    hub_listen: Option<String>,
) -> Result<PathBuf> {
    let hub_dir = work.join(name);
    let hub = Home::init(
        &hub_dir,
        OrganisationConfig {
            ods: OdsCode::parse("HUB01")?,
            name: "Bench Hub".into(),
            kind: OrgKind::Hub,
        },
    )?;
    let mut homes = vec![hub];
    for member in members {
        homes.push(Home::open(member)?);
    }
    let mut registry = caremesh::trust_admin::new_registry("bench");
    for home in &homes {
        registry.organisations.push(Organisation {
            ods: home.config.organisation.ods.clone(),
            name: home.config.organisation.name.clone(),
            kind: home.config.organisation.kind,
            keys: vec![hex::encode(home.signing_key()?.public())],
            revoked_keys: vec![],
            retired_keys: Vec::new(),
            addresses: vec![],
        });
    }
    if let Some(listen) = &hub_listen {
        registry.organisations[0].addresses = vec![listen.clone()];
    }
    let mut file = RegistryFile::unsigned(registry);
    file.sign(&AUTHORITY, clock::now_unix())?;
    for (index, home) in homes.iter_mut().enumerate() {
        caremesh::trust::write_atomically(&home.registry_path(), &file.to_json())?;
        home.config.sync.authority = Some(hex::encode(public_key_of(&AUTHORITY)));
        home.config.view.listen = "127.0.0.1:0".into();
        if index == 0 {
            home.config.sync.listen = hub_listen.clone();
        } else {
            home.config.sync.peers = vec![OdsCode::parse("HUB01")?];
        }
        home.save_config()?;
    }
    Ok(hub_dir)
}

/// Peak resident set (VmHWM) of a live process, in KiB; 0 when unreadable.
pub fn peak_rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM:")
}

/// Resident set now (VmRSS) of a live process, in KiB; 0 when unreadable.
pub fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:")
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix(field)?
                    .trim()
                    .trim_end_matches(" kB")
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

pub fn caremesh_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe.with_file_name("caremesh"))
}

pub fn run_node(dir: &Path) -> Result<Child> {
    Command::new(caremesh_binary()?)
        .args(["run", "--dir"])
        .arg(dir)
        .env("CAREMESH_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting caremesh run (build the caremesh binary first)")
}

pub fn count(db: &Path, sql: &str) -> Result<i64> {
    let conn = rusqlite::Connection::open(db)?;
    Ok(conn.query_row(sql, [], |row| row.get(0))?)
}

/// Runs the `gp` ⇄ `hub` drivers in-process (connection 1 on both) until neither has
/// anything to send, each frame received as a turn of its own; returns (bytes gp→hub, bytes
/// hub→gp, frames, flights from the gp that carried something).
pub fn exchange(gp: &mut Driver, hub: &mut Driver, now: u64) -> (u64, u64, u64, u64) {
    let (mut up, mut down, mut frames, mut flights) = (0, 0, 0, 0);
    loop {
        let outgoing: Vec<Transmit> =
            std::iter::from_fn(|| gp.poll_transmit(now, |_| true)).collect();
        if !outgoing.is_empty() {
            flights += 1;
        }
        for transmit in &outgoing {
            up += transmit.frame.len() as u64;
            frames += 1;
            hub.receive(now, transmit.conn, transmit.read());
        }
        let back: Vec<Transmit> = std::iter::from_fn(|| hub.poll_transmit(now, |_| true)).collect();
        for transmit in &back {
            down += transmit.frame.len() as u64;
            frames += 1;
            gp.receive(now, transmit.conn, transmit.read());
        }
        if outgoing.is_empty() && back.is_empty() {
            return (up, down, frames, flights);
        }
    }
}

/// Fails on a session the driver closed (a protocol error or a storage failure), which
/// would otherwise read as a round that had nothing to send.
fn closed_in(driver: &mut Driver) -> Result<()> {
    while let Some(event) = driver.poll_event() {
        if let DriverEvent::Close { reason, cause, .. } = event
            && cause.is_failure()
        {
            anyhow::bail!("the session closed: {reason}");
        }
    }
    Ok(())
}

/// The incremental round a change costs: the practice in `gp_dir` and a new hub are first
/// fully synced (in-process drivers over their real SQLite stores, as `caremesh run` runs
/// them), then one item changes and one round runs from the saved checkpoints. Prints
/// documents held, bytes each way, frames and round trips.
pub fn incremental(work: &Path, gp_dir: &Path, patients: u64) -> Result<()> {
    let hub_dir = region(
        work,
        &[gp_dir.to_path_buf()],
        &format!("hub-incremental-{patients}"),
        None,
    )?;
    let gp_home = Home::open(gp_dir)?;
    let hub_home = Home::open(&hub_dir)?;
    let driver = |home: &Home| -> Result<(Driver, Recipient, [u8; 32])> {
        let trust = TrustState::load(
            &home.registry_path(),
            &hex::encode(public_key_of(&AUTHORITY)),
        )?;
        let ods = home.config.organisation.ods.clone();
        let host = StoreHost::new(
            home.open_store()?,
            Box::new(trust),
            ods.clone(),
            home.config.sharing.defaults(),
            Box::new(clock::now_unix),
        )?;
        let recipient = Recipient {
            ods: ods.clone(),
            kind: home.config.organisation.kind,
        };
        let key = home.signing_key()?.public();
        Ok((
            Driver::new(ods, host, DriverOptions::default(), 0),
            recipient,
            key,
        ))
    };
    let (mut gp, gp_peer, gp_key) = driver(&gp_home)?;
    let (mut hub, hub_peer, hub_key) = driver(&hub_home)?;
    anyhow::ensure!(
        gp.connect(0, 1, (hub_peer, hub_key), true),
        "the GP refused the hub"
    );
    anyhow::ensure!(
        hub.connect(0, 1, (gp_peer, gp_key), false),
        "the hub refused the GP"
    );
    exchange(&mut gp, &mut hub, 0);
    closed_in(&mut gp)?;
    closed_in(&mut hub)?;
    let documents = gp.host().store.stats()?.documents;

    gp.write_local(|host| change_one_item(&gp_home, &mut host.store))?;
    let (up, down, frames, flights) = exchange(&mut gp, &mut hub, 1);
    closed_in(&mut gp)?;
    closed_in(&mut hub)?;
    println!("{documents:>10} {patients:>10} {up:>12} {down:>12} {frames:>8} {flights:>12}");
    Ok(())
}

/// Adds one item to the GP's first document and signs the new version, as an ingest would.
pub fn change_one_item(home: &Home, store: &mut Store) -> Result<()> {
    let stored = store
        .documents_after(0, 1)?
        .pop()
        .context("practice holds no documents")?;
    let key = home.signing_key()?;
    let actor = caremesh_storage::publish::actor_for(&key);
    let mut document = PublishedDocument::load_for_writing(&stored.meta, &stored.snapshot, &actor)?;
    let mut item: Item = document
        .items()?
        .into_iter()
        .next()
        .context("document holds no items")?;
    item.id = format!("{}-bench-change", item.id);
    item.title = "Changed for the benchmark".into();
    assert!(document.update(&[item], &[], clock::now_unix()));
    let signed: SignedHeads = key.sign_heads(&stored.meta, &document.heads());
    let built_on = stored.signed_heads().map(|held| held.heads);
    let batch = store.write()?;
    batch.put_document(
        &signed,
        &document.save(),
        built_on.as_deref(),
        &document.items()?,
        None,
        clock::now_unix(),
    )?;
    batch.commit()?;
    Ok(())
}

/// A GP node home at `dir` holding `patients` generated patients (seed `seed`), ingested as
/// `caremesh ingest` would.
pub fn practice_of(dir: &Path, ods: OdsCode, patients: u64, seed: u64) -> Result<PathBuf> {
    let home = Home::init(
        dir,
        OrganisationConfig {
            ods: ods.clone(),
            name: format!("Bench Practice {ods}"),
            kind: OrgKind::Gp,
        },
    )?;
    let extract = dir.join("extract");
    generate(&GenerateOptions::practice(
        ods,
        patients,
        seed,
        extract.clone(),
    ))?;
    let mut store = home.open_store()?;
    let started = Instant::now();
    let settings = home.ingest_settings()?;
    let report = Ingestor::new(
        &settings,
        &mut store,
        None,
        FileDisposition::LeaveInPlace,
        clock::now_unix(),
    )?
    .ingest_paths(std::slice::from_ref(&extract))?;
    std::fs::remove_dir_all(&extract).ok();
    std::fs::write(dir.join("patients.count"), patients.to_string())?;
    if patients < 10 {
        return Ok(dir.to_path_buf());
    }
    eprintln!(
        "prepared {patients} patients, {} documents in {:.1}s",
        report.documents_written,
        started.elapsed().as_secs_f64()
    );
    Ok(dir.to_path_buf())
}

/// Places one new coded problem about `patient` in `batch`, published as ingest publishes it:
/// a new signed version of the patient's problems document and of their sharing record.
/// What the benchmarks change while they measure.
pub fn publish_problem(
    batch: &caremesh_storage::WriteBatch<'_>,
    home: &Home,
    key: &caremesh_sync::PublisherKey,
    patient: &caremesh_sync::NhsNumber,
    id: &str,
    title: &str,
) -> Result<()> {
    let item = Item::titled(
        id,
        caremesh_sync::Section::Problems,
        caremesh_sync::DataClass::Coded,
        "Condition",
        title,
        "benchmark",
        id,
    );
    let ods = home.config.organisation.ods.clone();
    let mut publication =
        caremesh_storage::publish::Publication::new(ods, home.config.sharing.defaults());
    publication.place(batch, patient, &[id.to_string()], vec![item])?;
    publication.apply(batch, key, clock::now_unix())?;
    Ok(())
}

/// One published version not yet seen at its recipient.
pub struct InFlight {
    pub heads: Vec<[u8; 32]>,
    pub published: Instant,
    pub recipient: usize,
}

/// What the driver and the nodes' observers share.
#[derive(Default)]
pub struct Tracker {
    pub in_flight: Mutex<HashMap<DocId, VecDeque<InFlight>>>,
    /// Latencies in microseconds: since the start of the load, and since the last report.
    pub latencies: Mutex<(Vec<u32>, Vec<u32>)>,
    pub made: AtomicU64,
    pub delivered: AtomicU64,
}

impl Tracker {
    pub fn published(&self, doc: DocId, version: InFlight) {
        self.made.fetch_add(1, Ordering::Relaxed);
        let mut in_flight = self.in_flight.lock().expect("not poisoned");
        in_flight.entry(doc).or_default().push_back(version);
    }

    /// `node` stored these versions: a version in flight to it arrived, and with it every
    /// earlier version of the same document (a publisher's versions extend one another).
    pub fn stored(&self, node: usize, documents: &[(DocId, Vec<[u8; 32]>)]) {
        let now = Instant::now();
        let mut arrived = Vec::new();
        {
            let mut in_flight = self.in_flight.lock().expect("not poisoned");
            for (doc, heads) in documents {
                let Some(versions) = in_flight.get_mut(doc) else {
                    continue;
                };
                let Some(at) = versions
                    .iter()
                    .position(|v| v.recipient == node && v.heads == *heads)
                else {
                    continue;
                };
                for version in versions.drain(..=at) {
                    arrived.push(now.duration_since(version.published).as_micros() as u32);
                }
                if versions.is_empty() {
                    in_flight.remove(doc);
                }
            }
        }
        if arrived.is_empty() {
            return;
        }
        self.delivered
            .fetch_add(arrived.len() as u64, Ordering::Relaxed);
        let mut latencies = self.latencies.lock().expect("not poisoned");
        latencies.0.extend_from_slice(&arrived);
        latencies.1.extend_from_slice(&arrived);
    }

    /// The columns of a progress report every 10 s (see [`Tracker::progress`]).
    pub const PROGRESS_HEADER: &'static str =
        "   t s      made    made/s   arrived   p50 ms   p99 ms   max ms hub cpu   hub MB";

    /// One progress report: changes made (and their rate since `last_made`), arrived, the
    /// latencies since the last report, the hub's CPU since the last report and its memory.
    pub fn progress(&self, elapsed_s: f64, made: u64, last_made: u64, hub: &mut HubCpu) -> String {
        let window = std::mem::take(&mut self.latencies.lock().expect("not poisoned").1);
        let (p50, p99, max) = percentiles(window);
        format!(
            "{:>6.0} {:>9} {:>9.0} {:>9} {:>8.1} {:>8.1} {:>8.1} {:>6.0}% {:>8.0}",
            elapsed_s,
            made,
            (made - last_made) as f64 / 10.0,
            self.delivered.load(Ordering::Relaxed),
            p50,
            p99,
            max,
            hub.percent_since_last(),
            rss_kib(hub.pid) as f64 / 1024.0,
        )
    }

    pub fn pending(&self) -> usize {
        let in_flight = self.in_flight.lock().expect("not poisoned");
        in_flight.values().map(VecDeque::len).sum()
    }
}

/// The patients node `index` of a ring of `count` shares with its previous and its next
/// neighbour, `patients` with each.
pub fn ring_patients(index: usize, count: usize, patients: u64) -> [Vec<NhsNumber>; 2] {
    let shared = |pair: usize| -> Vec<NhsNumber> {
        (0..patients)
            .map(|k| test_nhs_number(7, pair as u64 * patients + k))
            .collect()
    };
    [shared((index + count - 1) % count), shared(index)]
}

/// Latency percentiles in milliseconds: p50, p99, max.
pub fn percentiles(mut micros: Vec<u32>) -> (f64, f64, f64) {
    if micros.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    micros.sort_unstable();
    let at = |q: f64| micros[((micros.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
    (at(0.50), at(0.99), at(1.0))
}

/// CPU time of the hub process, from /proc (user + system).
pub struct HubCpu {
    pid: u32,
    first: f64,
    last: (f64, Instant),
}

impl HubCpu {
    pub fn new(pid: u32) -> HubCpu {
        let now = cpu_seconds(pid);
        HubCpu {
            pid,
            first: now,
            last: (now, Instant::now()),
        }
    }

    pub fn percent_since_last(&mut self) -> f64 {
        let now = (cpu_seconds(self.pid), Instant::now());
        let wall = now.1.duration_since(self.last.1).as_secs_f64().max(1e-3);
        let percent = 100.0 * (now.0 - self.last.0) / wall;
        self.last = now;
        percent
    }

    pub fn total_seconds(&self) -> f64 {
        cpu_seconds(self.pid) - self.first
    }
}

pub fn cpu_seconds(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| parse_stat(&stat))
        .map_or(0.0, |(_, seconds)| seconds)
}

/// CPU seconds each of a process's threads used so far, summed by thread name (the tokio
/// runtime's workers share one name), with how many threads bear it.
pub fn cpu_seconds_by_thread(pid: u32) -> BTreeMap<String, (f64, usize)> {
    let mut by_name: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for task in tasks.flatten() {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        if let Some((name, seconds)) = parse_stat(&stat) {
            let entry = by_name.entry(name).or_default();
            entry.0 += seconds;
            entry.1 += 1;
        }
    }
    by_name
}

/// The command (or thread) name and utime + stime in seconds from a `/proc/…/stat` line.
fn parse_stat(stat: &str) -> Option<(String, f64)> {
    // The name sits in parentheses and may hold spaces; utime and stime are fields 14 and 15
    // of the whole line, 12 and 13 after the name.
    let (head, after) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_string();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11..13)?
        .iter()
        .filter_map(|v| v.parse::<f64>().ok())
        .sum();
    Some((name, ticks / 100.0))
}

/// What each thread name used between two [`cpu_seconds_by_thread`] readings, as one line:
/// `sync-engine 41.2 s, tokio-runtime-w 12.0 s (2 threads), …`, busiest first.
pub fn thread_cpu_line(
    before: &BTreeMap<String, (f64, usize)>,
    after: &BTreeMap<String, (f64, usize)>,
) -> String {
    let mut used: Vec<(&String, f64, usize)> = after
        .iter()
        .map(|(name, (seconds, threads))| {
            let earlier = before.get(name).map_or(0.0, |(s, _)| *s);
            (name, seconds - earlier, *threads)
        })
        .filter(|(_, seconds, _)| *seconds > 0.0)
        .collect();
    used.sort_by(|a, b| b.1.total_cmp(&a.1));
    let parts: Vec<String> = used
        .iter()
        .map(|(name, seconds, threads)| match threads {
            1 => format!("{name} {seconds:.1} s"),
            n => format!("{name} {seconds:.1} s ({n} threads)"),
        })
        .collect();
    parts.join(", ")
}

/// The shape of a load against a hub, shared by `load-bench` and `hub-load` so that their
/// figures compare: a ring of nodes, each sharing patients with both neighbours.
#[derive(clap::Args)]
pub struct LoadShape {
    /// Nodes dialling the hub (at least 3: each shares patients with both ring neighbours).
    #[arg(long, default_value_t = 500)]
    pub nodes: usize,
    /// Changes a second, across all nodes.
    #[arg(long, default_value_t = 3200.0)]
    pub rate: f64,
    /// How long the load runs, in seconds.
    #[arg(long, default_value_t = 600)]
    pub seconds: u64,
    /// Patients each node shares with its next neighbour.
    #[arg(long, default_value_t = 4)]
    pub patients: u64,
    /// Seed of the generator that picks where each change happens.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Seconds to wait after the load for the last changes to arrive.
    #[arg(long, default_value_t = 120)]
    pub drain: u64,
}

impl LoadShape {
    pub fn check(&self) -> Result<()> {
        anyhow::ensure!(
            self.nodes >= 3,
            "--nodes must be at least 3 (a ring of neighbours)"
        );
        anyhow::ensure!(self.rate > 0.0, "--rate must be positive");
        Ok(())
    }
}

/// Checks `shape`, then runs `run` in a fresh work folder named after `name` and this
/// process, removed afterwards unless `keep`.
pub fn run_load(
    name: &str,
    shape: &LoadShape,
    keep: bool,
    run: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    shape.check()?;
    let work = std::env::temp_dir().join(format!("caremesh-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    println!("work folder: {}", work.display());
    let result = run(&work);
    if !keep {
        std::fs::remove_dir_all(&work).ok();
    }
    result
}

/// What a load run prints at its end, in the lines BENCHMARKS.md quotes.
pub struct LoadSummary {
    pub made: u64,
    pub load_seconds: f64,
    pub rate: f64,
    pub late: u64,
    pub latencies: Vec<u32>,
    pub drained_after: f64,
    pub pending: usize,
    pub hub_cpu: f64,
    pub hub_peak_kib: u64,
    pub own_cpu: f64,
}

impl LoadSummary {
    pub fn print(self) {
        let made = self.made;
        let delivered = self.latencies.len();
        let (p50, p99, max) = percentiles(self.latencies);
        println!();
        println!(
            "load: {made} changes in {:.1}s ({:.0}/s; {:.0}/s asked), {} publications late by over 1 s",
            self.load_seconds,
            made as f64 / self.load_seconds,
            self.rate,
            self.late
        );
        println!(
            "arrived at the other node: {delivered} (p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms); still in flight after {:.1}s: {}",
            self.drained_after, self.pending
        );
        println!(
            "hub: {:.1} CPU seconds ({:.0}% of one core over the load), peak resident {:.0} MB; \
             this process (nodes and driver): {:.1} CPU seconds ({:.0}%)",
            self.hub_cpu,
            100.0 * self.hub_cpu / self.load_seconds,
            self.hub_peak_kib as f64 / 1024.0,
            self.own_cpu,
            100.0 * self.own_cpu / self.load_seconds,
        );
    }
}

/// The home of node `index` of a load's ring: a GP practice `G00001`, `G00002`, … in `work`.
pub fn ring_node_home(work: &Path, index: usize) -> Result<Home> {
    let ods = OdsCode::parse(&format!("G{:05}", index + 1))?;
    let dir = work.join(ods.as_str().to_ascii_lowercase());
    Ok(Home::init(
        &dir,
        OrganisationConfig {
            ods: ods.clone(),
            name: format!("Load Practice {ods}"),
            kind: OrgKind::Gp,
        },
    )?)
}

/// A loopback address with a free UDP port, for a hub to listen on.
pub fn free_hub_address() -> Result<std::net::SocketAddr> {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
}

/// This process's CPU time, user and system.
pub fn own_cpu_seconds() -> f64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut now) };
    assert_eq!(status, 0, "the process CPU clock is readable");
    now.tv_sec as f64 + now.tv_nsec as f64 / 1e9
}

/// Earlier problems of about `bytes` of text in all, each a title and a few hundred bytes of
/// detail: words drawn from a clinical vocabulary, so that they compress about as a record's
/// text does, not as repeated bytes would.
pub fn earlier_problems(words: &mut caremesh_sync::rng::Rng, bytes: u64) -> Vec<Item> {
    const VOCABULARY: [&str; 48] = [
        "patient",
        "reports",
        "intermittent",
        "chest",
        "pain",
        "on",
        "exertion",
        "no",
        "history",
        "of",
        "diabetes",
        "hypertension",
        "reviewed",
        "in",
        "clinic",
        "blood",
        "pressure",
        "stable",
        "plan",
        "continue",
        "current",
        "medication",
        "follow",
        "up",
        "weeks",
        "referred",
        "to",
        "cardiology",
        "asthma",
        "well",
        "controlled",
        "inhaler",
        "technique",
        "checked",
        "advised",
        "smoking",
        "cessation",
        "renal",
        "function",
        "normal",
        "left",
        "knee",
        "osteoarthritis",
        "physiotherapy",
        "and",
        "the",
        "with",
        "mg",
    ];
    const DETAIL_BYTES: usize = 480;
    let mut items = Vec::new();
    let mut written = 0;
    while written < bytes {
        let mut detail = String::with_capacity(DETAIL_BYTES + 16);
        while detail.len() < DETAIL_BYTES {
            detail.push_str(VOCABULARY[words.below(VOCABULARY.len() as u64) as usize]);
            detail.push(' ');
        }
        let id = format!("Condition/history-{}", items.len());
        let mut item = Item::titled(
            &id,
            caremesh_sync::Section::Problems,
            caremesh_sync::DataClass::Coded,
            "Condition",
            &format!("Earlier problem {}", items.len()),
            "benchmark",
            &id,
        );
        written += (detail.len() + id.len() * 2 + 24) as u64;
        item.detail = Some(detail);
        items.push(item);
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_gives_its_thread_name_and_cpu_even_with_spaces_and_parentheses() {
        // utime 250 and stime 50 ticks: 3 s.
        let line =
            "4242 (tokio (runtime) w) S 1 4242 4242 0 -1 4194368 100 0 0 0 250 50 0 0 20 0 1 0";
        assert_eq!(
            parse_stat(line),
            Some(("tokio (runtime) w".to_string(), 3.0))
        );
        assert_eq!(parse_stat("garbage"), None);
        let before = BTreeMap::from([("sync-engine".to_string(), (1.0, 1))]);
        let after = BTreeMap::from([
            ("sync-engine".to_string(), (4.5, 1)),
            ("tokio-runtime-w".to_string(), (1.25, 2)),
            ("idle".to_string(), (0.0, 1)),
        ]);
        assert_eq!(
            thread_cpu_line(&before, &after),
            "sync-engine 3.5 s, tokio-runtime-w 1.2 s (2 threads)"
        );
    }

    #[test]
    fn this_process_threads_are_read_from_proc() {
        let threads = cpu_seconds_by_thread(std::process::id());
        assert!(threads.values().map(|(_, n)| n).sum::<usize>() >= 1);
    }
}
