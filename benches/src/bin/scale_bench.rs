//! Scale benchmark: a node and a hub holding a million documents.
//!
//! ```sh
//! cargo build --release -p caremesh --bins
//! caremesh init --dir /path/gp --org A81001 --name "Scale Practice" --kind gp --unencrypted
//! caremesh generate --org A81001 --patients 100000 --out /path/extract
//! caremesh ingest --dir /path/gp /path/extract          # about 1,000,000 documents
//! ./target/release/scale-bench --practice /path/gp
//! ```
//!
//! Beside that practice, the same measurements run on a baseline practice of `--baseline`
//! patients (default 100, about 1,000 documents) made in this run:
//!
//! 1. Opening a record with ten sources: nine other organisations' signed documents about
//!    the practice's first patient are added to its store, then the record is assembled as
//!    the view assembles it (read-only connection, read model, sharing decisions), first on
//!    a quiet store, then while another connection commits a change every 5 ms with
//!    `synchronous=FULL`, as sync does. p50, p99 and max over `--opens` opens. The same
//!    for the FHIR API's `$everything` and `$summary` of that record: assembled, rendered as
//!    FHIR, made a Bundle and serialised as the bytes sent.
//! 2. Incremental sync after one change: bytes, frames and round trips (as `sync-bench`).
//! 3. A hub holding the practice's documents: the database is copied into a hub home and a
//!    real `caremesh run` started on it. Reported: time from spawning the process to its
//!    first `/health` answer, resident memory then and after 10 s, and peak.

use anyhow::{Context, Result, ensure};
use caremesh::home::Home;
use caremesh_bench::{
    incremental, peak_rss_kib, practice_of, publish_problem, region, rss_kib, run_node,
};
use caremesh_fhir::clock;
use caremesh_fhir::synthetic::test_nhs_number;
use caremesh_storage::publish::Publication;
use caremesh_storage::{SourceRow, Store};
use caremesh_sync::policy::Consent;
use caremesh_sync::{DataClass, Item, NhsNumber, OdsCode, PublisherKey, Section};
use caremesh_view::record::{Viewer, assemble};
use caremesh_view::{fhir_api, fhir_summary};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(clap::Parser)]
struct Args {
    /// A prepared practice home (see the header of this file).
    #[arg(long)]
    practice: PathBuf,
    /// Patients of the baseline practice made in this run.
    #[arg(long, default_value_t = 100)]
    baseline: u64,
    /// Measure only the hub's start and memory (skips the record opens and the incremental
    /// round, whose set-up syncs every document to a new hub first).
    #[arg(long)]
    hub_only: bool,
    /// Measure only the record opens (and the FHIR API's answers), skipping the incremental
    /// round and the hub.
    #[arg(long)]
    opens_only: bool,
    /// Record opens per measurement.
    #[arg(long, default_value_t = 2000)]
    opens: usize,
}

/// The FHIR base URL the API's answers name.
const BASE: &str = "http://127.0.0.1:7802/fhir";

fn main() -> Result<()> {
    let args: Args = clap::Parser::parse();
    let work = std::env::temp_dir().join(format!("caremesh-scale-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    println!("work folder: {}", work.display());
    let result = run(&args, &work);
    std::fs::remove_dir_all(&work).ok();
    result
}

fn run(args: &Args, work: &Path) -> Result<()> {
    let baseline = practice_of(
        &work.join("baseline"),
        OdsCode::parse("A81001")?,
        args.baseline,
        1,
    )?;
    for (name, dir, patients) in [
        ("baseline", baseline, args.baseline),
        ("practice", args.practice.clone(), 100_000),
    ] {
        let store = Home::open(&dir)?.open_store()?;
        let documents = store.stats()?.documents;
        drop(store);
        println!();
        println!(
            "== {name}: {documents} documents ({}), database {}",
            dir.display(),
            if Home::open(&dir)?.database()?.is_encrypted() {
                "encrypted"
            } else {
                "plain"
            }
        );
        if !args.hub_only {
            let patient = ten_sources(&dir)?;
            record_opens(&dir, &patient, args.opens)?;
            if args.opens_only {
                continue;
            }
            println!("incremental sync after one changed item:");
            println!(
                "{:>10} {:>10} {:>12} {:>12} {:>8} {:>12}",
                "documents", "patients", "bytes GP→hub", "bytes hub→GP", "frames", "round trips"
            );
            incremental(work, &dir, patients)?;
        }
        hub_start(work, &dir, name)?;
    }
    Ok(())
}

/// Nine other organisations publish four items each about the practice's first patient, as
/// their documents arrive by sync: signed by their own keys, with their sources rows.
fn ten_sources(dir: &Path) -> Result<NhsNumber> {
    let patient = test_nhs_number(1, 0);
    let mut store = Home::open(dir)?.open_store()?;
    let sections = [
        Section::Problems,
        Section::Medications,
        Section::Allergies,
        Section::Results,
    ];
    for org in 1..=9u8 {
        let ods = OdsCode::parse(&format!("R{org:02}X"))?;
        let key = PublisherKey::from_secret([org; 32]);
        let batch = store.write()?;
        let mut publication = Publication::new(ods.clone(), Consent::SENT_BY_PUBLISHER);
        for (index, section) in sections.iter().enumerate() {
            let id = format!("Observation/scale-{org}-{index}");
            let mut item = Item::titled(
                &id,
                *section,
                DataClass::Coded,
                "Observation",
                &format!("Entry {index} from organisation {org}"),
                "scale-bench",
                &id,
            );
            // The resource a publisher sends, so that the FHIR API serves it.
            item.resource = Some(serde_json::json!({
                "resourceType": "Observation",
                "id": format!("scale-{org}-{index}"),
                "status": "final",
                "subject": { "reference": format!("Patient/{}", patient.as_str()) },
                "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "1000731000000107",
                    "display": format!("Entry {index} from organisation {org}") }] },
                "effectiveDateTime": "2026-03-01T09:00:00Z",
                "valueQuantity": { "value": 4.1, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L" },
            }));
            publication.place(&batch, &patient, std::slice::from_ref(&id), vec![item])?;
        }
        publication.apply(&batch, &key, clock::now_unix())?;
        batch.touch_received_source(&SourceRow {
            publisher: ods.to_string(),
            name: format!("Organisation {org}"),
            kind: "acute".into(),
            source_system: "scale-bench".into(),
            feed: "live".into(),
            data_as_of: clock::now_unix(),
            expected_refresh_hours: None,
        })?;
        batch.commit()?;
    }
    Ok(patient)
}

/// Record opens on a quiet store, then while another connection commits a change every 5 ms.
fn record_opens(dir: &Path, patient: &NhsNumber, opens: usize) -> Result<()> {
    let home = Home::open(dir)?;
    let registry = home.trust()?.map(|t| t.current());
    let viewer = home.viewer("scale-bench", registry.as_deref());
    let database = home.database()?;
    let reader = database.open_read_only()?;
    let record = assemble(&reader, patient, &viewer, clock::now_unix())?
        .context("the ten-source patient has a record")?;
    let sources = record.sources.len();
    ensure!(sources >= 10, "the record has {sources} sources, not 10");
    let fhir_resources = fhir_api::render(&record).resources.len();
    let quiet = time_opens(&reader, patient, &viewer, opens, Serve::Page)?;
    let connection_each = time_opens_connecting(&database, patient, &viewer, opens)?;
    let everything = time_opens(&reader, patient, &viewer, opens, Serve::Everything)?;
    let summary = time_opens(&reader, patient, &viewer, opens, Serve::Summary)?;
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, writes, dir) = (stop.clone(), writes.clone(), dir.to_path_buf());
        std::thread::spawn(move || keep_writing(&dir, &stop, &writes))
    };
    std::thread::sleep(Duration::from_millis(200));
    let busy = time_opens(&reader, patient, &viewer, opens, Serve::Page)?;
    let connection_each_busy = time_opens_connecting(&database, patient, &viewer, opens)?;
    let everything_busy = time_opens(&reader, patient, &viewer, opens, Serve::Everything)?;
    let summary_busy = time_opens(&reader, patient, &viewer, opens, Serve::Summary)?;
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer does not panic")?;
    println!(
        "record open, {sources} sources, {fhir_resources} FHIR resources ({opens} opens each):"
    );
    for (label, (p50, p99, max)) in [
        ("page, quiet", quiet),
        ("page, while writing", busy),
        ("page, connection each, quiet", connection_each),
        ("page, connection each, writing", connection_each_busy),
        ("$everything, quiet", everything),
        ("$everything, writing", everything_busy),
        ("$summary, quiet", summary),
        ("$summary, writing", summary_busy),
    ] {
        println!("  {label:>30}: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms");
    }
    println!(
        "  the writer committed {} changes meanwhile",
        writes.load(Ordering::Relaxed)
    );
    Ok(())
}

/// What an open serves: the record the page renders, or the FHIR API's answer as the
/// bytes it sends (rendered resources, the Bundle, its JSON).
#[derive(Clone, Copy)]
enum Serve {
    Page,
    Everything,
    Summary,
}

fn time_opens(
    reader: &Store,
    patient: &NhsNumber,
    viewer: &Viewer,
    opens: usize,
    serve: Serve,
) -> Result<(f64, f64, f64)> {
    let mut micros = Vec::with_capacity(opens);
    let made_at = fhir_summary::MadeAt {
        ods: "A81001",
        name: "Scale Practice",
        at: "2026-12-02T10:00:00Z",
    };
    for _ in 0..opens {
        let started = Instant::now();
        let record = assemble(reader, patient, viewer, clock::now_unix())?
            .context("the ten-source patient has a record")?;
        let bytes = match serve {
            Serve::Page => 0,
            Serve::Everything => {
                let bundle = fhir_api::everything_bundle(&fhir_api::render(&record), Some(BASE));
                serde_json::to_vec(&bundle)?.len()
            }
            Serve::Summary => {
                let bundle =
                    fhir_summary::summary_bundle(&fhir_api::render(&record), &made_at, BASE);
                serde_json::to_vec(&bundle)?.len()
            }
        };
        micros.push(started.elapsed().as_micros() as u64);
        std::hint::black_box(bytes);
    }
    Ok(p50_p99_max(micros))
}

/// Record opens as the view makes them: a new read-only connection for each (its page
/// cache empty, so every page it reads is read, and decrypted, afresh), then the record.
fn time_opens_connecting(
    database: &caremesh_storage::at_rest::Database,
    patient: &NhsNumber,
    viewer: &Viewer,
    opens: usize,
) -> Result<(f64, f64, f64)> {
    let mut micros = Vec::with_capacity(opens);
    for _ in 0..opens {
        let started = Instant::now();
        let reader = database.open_read_only()?;
        let record = assemble(&reader, patient, viewer, clock::now_unix())?
            .context("the ten-source patient has a record")?;
        drop(reader);
        micros.push(started.elapsed().as_micros() as u64);
        std::hint::black_box(record);
    }
    Ok(p50_p99_max(micros))
}

/// The median, 99th percentile and maximum of `micros`, in milliseconds.
fn p50_p99_max(mut micros: Vec<u64>) -> (f64, f64, f64) {
    micros.sort_unstable();
    let at = |q: f64| micros[((micros.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
    (at(0.5), at(0.99), at(1.0))
}

/// Commits a new version of some patient's document every 5 ms until told to stop.
fn keep_writing(dir: &Path, stop: &AtomicBool, writes: &AtomicU64) -> Result<()> {
    let home = Home::open(dir)?;
    let key = home.signing_key()?;
    let mut store = home.open_store()?;
    let mut serial = 0u64;
    while !stop.load(Ordering::Relaxed) {
        serial += 1;
        let patient = test_nhs_number(1, serial % 50 + 1);
        let id = format!("Condition/scale-write-{serial}");
        let batch = store.write()?;
        publish_problem(
            &batch,
            &home,
            &key,
            &patient,
            &id,
            "Written during the benchmark",
        )?;
        batch.commit()?;
        writes.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// A hub home holding a copy of the practice's database: time to serve, and memory.
fn hub_start(work: &Path, practice: &Path, name: &str) -> Result<()> {
    let store = Store::open(&practice.join("node.db"))?;
    store.checkpoint()?;
    drop(store);
    let hub = region(
        work,
        &[practice.to_path_buf()],
        &format!("hub-{name}"),
        None,
    )?;
    std::fs::copy(practice.join("node.db"), hub.join("node.db"))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut home = Home::open(&hub)?;
    home.config.view.listen = format!("127.0.0.1:{port}");
    home.config.sync.listen = Some("127.0.0.1:0".into());
    home.save_config()?;
    // The file is read from disk, as after a restart with a cold cache as far as this
    // process goes (the page cache of the machine may hold it).
    let started = Instant::now();
    let mut process = run_node(&hub)?;
    let mut serving = None;
    while started.elapsed() < Duration::from_secs(60) {
        if health(port) {
            serving = Some(started.elapsed().as_secs_f64());
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let rss_at_start = rss_kib(process.id());
    std::thread::sleep(Duration::from_secs(10));
    let rss_later = rss_kib(process.id());
    let peak = peak_rss_kib(process.id());
    let _ = process.kill();
    let _ = process.wait();
    let bytes = std::fs::metadata(hub.join("node.db"))?.len();
    println!(
        "hub on this database ({:.0} MB file): serving after {}, resident {:.0} MB then, {:.0} MB 10 s later, peak {:.0} MB",
        bytes as f64 / 1e6,
        serving.map_or("never (60 s)".into(), |s| format!("{s:.2} s")),
        rss_at_start as f64 / 1024.0,
        rss_later as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    std::fs::remove_file(hub.join("node.db")).ok();
    Ok(())
}

fn health(port: u16) -> bool {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = "GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200")
}
