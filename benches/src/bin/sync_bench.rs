//! Sync benchmark.
//!
//! `cargo run --release -p caremesh --bin sync-bench [-- --patients N]`
//!
//! 1. Cold sync: a generated practice of N patients (default 10,000) is pulled by a hub, both
//!    real `caremesh run` processes talking QUIC with mutual TLS on 127.0.0.1. Reported:
//!    document versions per second, wire MB/s (both directions, from the peers' status rows),
//!    and wire bytes against the saved size of the documents moved.
//! 2. Incremental sync: practices holding about 1,000, 10,000 and 100,000 documents are first
//!    synced to a hub; then one item changes in one document and one sync round runs. The
//!    sessions run in-process over the same real SQLite storage (no QUIC), so every frame is
//!    counted exactly: bytes each way, frames, and round trips (flights from the GP).
//! 3. Fan-in (`--fan-in N [--patients P]`, instead of 1 and 2): N GP nodes, each publishing
//!    P generated patients, all dial one hub process over QUIC. The nodes run in this process
//!    (each with its own key, certificate, SQLite file and sync engine, as `caremesh run` has
//!    them); the hub is a real `caremesh run`. Reported: time until every node is connected,
//!    until the hub holds every document, and until every node holds every other node's
//!    documents through the hub (all nodes care for the same patients, and the shipped
//!    agreements let GPs hold each other's coded, free-text and document items); hub peak RSS.
//! 4. Baseline, same run: samod 0.16 (automerge-repo in Rust) syncing the same documents of
//!    each practice between two repos over TCP on 127.0.0.1 (`benches/samod-baseline`; build
//!    it first with `cargo build --release --manifest-path benches/samod-baseline/Cargo.toml`,
//!    or point `--samod PATH` at the binary; `--samod-limit SECONDS` caps its cold sync).

use anyhow::{Context, Result};
use caremesh::home::Home;
use caremesh_bench::{count, incremental, peak_rss_kib, practice_of, region, run_node};
use caremesh_sync::OdsCode;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Sync benchmark (see the header of this file).
#[derive(clap::Parser)]
struct Args {
    /// Patients in the practice (cold and largest incremental run); patients per node with
    /// --fan-in. Defaults: 10,000, or 1 with --fan-in.
    #[arg(long)]
    patients: Option<u64>,
    /// Run only the fan-in: this many nodes against one hub.
    #[arg(long)]
    fan_in: Option<usize>,
    /// The samod baseline binary.
    #[arg(
        long,
        default_value = "benches/samod-baseline/target/release/samod-baseline"
    )]
    samod: PathBuf,
    /// Seconds the samod baseline may spend on each cold sync and reconnect.
    #[arg(long, default_value_t = 600)]
    samod_limit: u64,
}

fn main() -> Result<()> {
    let Args {
        patients,
        fan_in: fan_in_nodes,
        samod,
        samod_limit,
    } = clap::Parser::parse();
    let work = std::env::temp_dir().join(format!("caremesh-sync-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    println!("work folder: {}", work.display());
    if let Some(nodes) = fan_in_nodes {
        fan_in(&work, nodes, patients.unwrap_or(1))?;
        std::fs::remove_dir_all(&work).ok();
        return Ok(());
    }
    let patients = patients.unwrap_or(10_000);

    let samod = samod.exists().then_some(samod);
    if samod.is_none() {
        println!("samod baseline not built: no side-by-side figures (see the header of this file)");
    }

    let gp = practice(&work.join("gp-cold"), patients)?;
    cold_sync(&work, &gp)?;

    println!();
    println!("incremental sync after one changed item (in-process sessions, real SQLite)");
    println!(
        "{:>10} {:>10} {:>12} {:>12} {:>8} {:>12}",
        "documents", "patients", "bytes GP→hub", "bytes hub→GP", "frames", "round trips"
    );
    let mut practices = Vec::new();
    for smaller in [patients / 100, patients / 10] {
        let dir = practice(&work.join(format!("gp-{smaller}")), smaller)?;
        incremental(&work, &dir, smaller)?;
        practices.push(dir);
    }
    incremental(&work, &gp, patients)?;
    practices.push(gp);

    if let Some(samod) = samod {
        println!();
        println!(
            "baseline: samod 0.16 over TCP, same documents (bytes counted at the receiver's socket)"
        );
        for dir in &practices {
            samod_baseline(&samod, &dir.join("node.db"), samod_limit)?;
        }
    }
    std::fs::remove_dir_all(&work).ok();
    Ok(())
}

/// Runs the samod baseline over one practice's database and prints its results.
fn samod_baseline(binary: &Path, db: &Path, limit_seconds: u64) -> Result<()> {
    let output = Command::new(binary)
        .arg("--db")
        .arg(db)
        .arg("--limit-seconds")
        .arg(limit_seconds.to_string())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", binary.display()))?;
    if !output.status.success() {
        println!("  samod baseline failed on {} (see stderr)", db.display());
    }
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some(result) = line.strip_prefix("result ") else {
            continue;
        };
        let mut fields = result.split_whitespace();
        let kind = fields.next().unwrap_or_default();
        let value = |key: &str| -> f64 {
            result
                .split_whitespace()
                .find_map(|f| f.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
                .unwrap_or(0.0)
        };
        let (documents, wire) = (
            value("documents"),
            value("bytes_to_source") + value("bytes_from_source"),
        );
        match kind {
            "cold" => println!(
                "  {documents:>7} documents, cold: {:.1}s, {:.0} documents/s, wire {:.1} MB for {:.1} MB saved (ratio {:.2}), {} messages",
                value("seconds"),
                documents / value("seconds"),
                wire / 1e6,
                value("saved_bytes") / 1e6,
                wire / value("saved_bytes"),
                value("messages")
            ),
            "cold-incomplete" => println!(
                "  {documents:>7} documents, cold: gave up after {:.0}s with {} found ({:.0} documents/s), wire {:.1} MB so far",
                value("seconds"),
                value("found"),
                value("found") / value("seconds"),
                wire / 1e6
            ),
            "live" => println!(
                "  {documents:>7} documents, one change while connected: {} bytes to source, {} bytes from source, {} messages",
                value("bytes_to_source"),
                value("bytes_from_source"),
                value("messages")
            ),
            "reconnect-incomplete" => println!(
                "  {documents:>7} documents, one change then reconnect: change not held after {:.0}s; {} bytes to source, {} bytes from source, {} messages by then",
                value("seconds"),
                value("bytes_to_source"),
                value("bytes_from_source"),
                value("messages")
            ),
            "reconnect" => println!(
                "  {documents:>7} documents, one change then reconnect: {} bytes to source, {} bytes from source, {} messages, change held after {:.2}s",
                value("bytes_to_source"),
                value("bytes_from_source"),
                value("messages"),
                value("seconds_to_change")
            ),
            _ => println!("  {line}"),
        }
    }
    Ok(())
}

fn gp_patients(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("patients.count"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

/// A GP node home holding `patients` generated patients.
fn practice(dir: &Path, patients: u64) -> Result<PathBuf> {
    practice_of(dir, OdsCode::parse("A81001")?, patients, 1)
}

fn fan_in(work: &Path, nodes: usize, per_node: u64) -> Result<()> {
    anyhow::ensure!(nodes > 0, "--fan-in needs at least one node");
    let started = Instant::now();
    let mut members = Vec::with_capacity(nodes);
    for index in 0..nodes {
        let ods = OdsCode::parse(&format!("G{:05}", index + 1))?;
        let dir = work.join(ods.as_str().to_ascii_lowercase());
        // The same seed everywhere: every node cares for the same patients, so the hub
        // relays each node's documents to all the others (nodes hold their caseload only).
        members.push(practice_of(&dir, ods, per_node, 1_000)?);
    }
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let hub = region(
        work,
        &members,
        "hub-fan-in",
        Some(format!("127.0.0.1:{port}")),
    )?;
    // What the shipped agreements let one GP hold from another.
    let shareable =
        "SELECT count(*) FROM documents WHERE class IN ('coded', 'free-text', 'document')";
    let mut total = 0;
    for member in &members {
        total += count(&member.join("node.db"), shareable)?;
    }
    println!(
        "fan-in: {nodes} nodes × {per_node} patients, {total} shareable documents, prepared in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let mut hub_process = run_node(&hub)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let services = runtime.block_on(async {
        let mut services = Vec::with_capacity(nodes);
        for member in &members {
            let home = Home::open(member)?;
            let trust = home.trust()?.context("bench node has a registry")?;
            services.push(
                caremesh::network::start(
                    caremesh::network::SyncSettings::for_home(&home, Some(trust))?,
                    shutdown_rx.clone(),
                )
                .await?,
            );
        }
        anyhow::Ok(services)
    })?;
    let hub_db = hub.join("node.db");
    let connected_sql = "SELECT count(*) FROM sync_peers WHERE connected = 1";
    let (mut all_connected, mut hub_holds_all, mut everyone_holds_all) = (None, None, None);
    while everyone_holds_all.is_none() {
        std::thread::sleep(Duration::from_millis(250));
        let elapsed = started.elapsed().as_secs_f64();
        if all_connected.is_none() && count(&hub_db, connected_sql).unwrap_or(0) >= nodes as i64 {
            all_connected = Some(elapsed);
        }
        if hub_holds_all.is_none()
            && count(&hub_db, "SELECT count(*) FROM documents").unwrap_or(0) >= total
        {
            hub_holds_all = Some(elapsed);
        }
        if hub_holds_all.is_some() {
            let mut everyone = true;
            for member in &members {
                if count(&member.join("node.db"), "SELECT count(*) FROM documents")? < total {
                    everyone = false;
                    break;
                }
            }
            if everyone {
                everyone_holds_all = Some(elapsed);
            }
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(1800),
            "fan-in did not converge in 30 minutes (hub holds {} of {total})",
            count(&hub_db, "SELECT count(*) FROM documents").unwrap_or(0)
        );
    }
    let hub_peak_rss = peak_rss_kib(hub_process.id());
    let rejected = count(&hub_db, "SELECT coalesce(sum(rejected), 0) FROM sync_peers")?;
    let _ = shutdown_tx.send(true);
    for service in services {
        service.join();
    }
    let _ = hub_process.kill();
    let _ = hub_process.wait();
    let seconds = |at: Option<f64>| at.map_or("never".to_string(), |s| format!("{s:.1}s"));
    println!(
        "  every node connected to the hub after {}",
        seconds(all_connected)
    );
    println!(
        "  hub holds all {total} documents after {}",
        seconds(hub_holds_all)
    );
    println!(
        "  every node holds all {total} documents after {} ({} document copies relayed)",
        seconds(everyone_holds_all),
        total * (nodes as i64 - 1)
    );
    println!(
        "  hub peak resident memory {:.0} MB, rejected changes {rejected}",
        hub_peak_rss as f64 / 1024.0
    );
    Ok(())
}

fn cold_sync(work: &Path, gp: &Path) -> Result<()> {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let hub = region(
        work,
        &[gp.to_path_buf()],
        "hub-cold",
        Some(format!("127.0.0.1:{port}")),
    )?;
    let gp_db = gp.join("node.db");
    let shareable = count(
        &gp_db,
        "SELECT count(*) FROM documents WHERE class IN ('coded', 'free-text', 'document')",
    )?;
    let saved_bytes = count(
        &gp_db,
        "SELECT sum(length(s.snapshot) + length(d.signed)) FROM documents d \
         JOIN document_snapshots s ON s.doc_id = d.doc_id \
         WHERE d.class IN ('coded', 'free-text', 'document')",
    )?;
    let mut hub_process = run_node(&hub)?;
    let started = Instant::now();
    let mut gp_process = run_node(gp)?;
    let hub_db = hub.join("node.db");
    loop {
        std::thread::sleep(Duration::from_millis(50));
        if hub_db.exists()
            && count(&hub_db, "SELECT count(*) FROM documents").unwrap_or(0) >= shareable
        {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(1800),
            "cold sync did not finish in 30 minutes"
        );
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Let the status rows catch up (written every second), then read the wire totals.
    std::thread::sleep(Duration::from_millis(2500));
    let wire = count(
        &gp_db,
        "SELECT bytes_sent + bytes_received FROM sync_peers WHERE peer = 'HUB01'",
    )?;
    let _ = gp_process.kill();
    let _ = hub_process.kill();
    let _ = gp_process.wait();
    let _ = hub_process.wait();
    println!(
        "cold sync of {} patients: {shareable} documents in {elapsed:.1}s over QUIC",
        gp_patients(gp)
    );
    println!(
        "  {:.0} document versions/s, {:.2} MB/s on the wire",
        shareable as f64 / elapsed,
        wire as f64 / 1e6 / elapsed
    );
    println!(
        "  wire {:.1} MB for documents whose saved size is {:.1} MB (ratio {:.2})",
        wire as f64 / 1e6,
        saved_bytes as f64 / 1e6,
        wire as f64 / saved_bytes as f64
    );
    Ok(())
}
