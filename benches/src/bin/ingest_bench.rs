//! Ingest benchmark: caremesh against a plain Automerge + SQLite baseline, same input, same run.
//!
//! `cargo run --release -p caremesh --bin ingest-bench [-- --patients N --synthea DIR]`
//!
//! Each measurement runs in a child process of its own, so that peak resident memory (VmHWM)
//! belongs to that workload alone. The baseline does what any store of this data must do and
//! nothing more: read and parse the JSON, put each resource into an Automerge map (one
//! document per patient and resource type), save it, and insert it into SQLite in WAL mode
//! with synchronous=FULL, one transaction per file. caremesh adds validation, patient
//! resolution, mapping to items, versions, signatures, the read model and the ingest log.

use anyhow::{Context, Result, bail};
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{Automerge, ObjType, ROOT};
use caremesh::home::{Home, OrganisationConfig};
use caremesh_fhir::synthetic::{GenerateOptions, generate};
use caremesh_ingest::{FileDisposition, Ingestor};
use caremesh_sync::{OdsCode, OrgKind};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Ingest benchmark (see the header of this file).
#[derive(clap::Parser)]
struct Args {
    /// Generated patients to ingest.
    #[arg(long, default_value_t = 10_000)]
    patients: u64,
    /// The Synthea corpus to ingest as well.
    #[arg(long, default_value = "../shared/data/synthea-r4")]
    synthea: PathBuf,
    /// Internal: measure one workload (`caremesh` or `baseline`) in this process.
    #[arg(long, requires_all = ["input", "work"])]
    measure: Option<String>,
    #[arg(long)]
    input: Option<PathBuf>,
    #[arg(long)]
    work: Option<PathBuf>,
    #[arg(long)]
    index: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args: Args = clap::Parser::parse();
    if let Some(mode) = &args.measure {
        let input = args.input.as_deref().context("--input")?;
        let work = args.work.as_deref().context("--work")?;
        let result = match mode.as_str() {
            "caremesh" => measure_caremesh(input, args.index.as_deref(), work, false)?,
            "caremesh-encrypted" => measure_caremesh(input, args.index.as_deref(), work, true)?,
            "baseline" => measure_baseline(input, work)?,
            other => bail!("unknown mode {other}"),
        };
        println!("{}", serde_json::to_string(&result)?);
        return Ok(());
    }
    let patients = args.patients;
    let synthea = args.synthea;
    let work = std::env::temp_dir().join(format!("caremesh-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;

    let generated = work.join("generated");
    let started = Instant::now();
    let output = generate(&GenerateOptions::practice(
        OdsCode::parse("A81001")?,
        patients,
        1,
        generated.clone(),
    ))?;
    let generate_seconds = started.elapsed().as_secs_f64();
    println!(
        "generated {} patients ({} resources) in {:.1} s ({:.0} resources/s)",
        patients,
        output.resources,
        generate_seconds,
        output.resources as f64 / generate_seconds
    );

    let mut workloads = vec![(format!("generated, {patients} patients"), generated, None)];
    if synthea.exists() {
        workloads.insert(
            0,
            (
                "Synthea corpus (48 patients)".to_string(),
                synthea.clone(),
                Some(synthea.join("nhs-numbers.csv")),
            ),
        );
    } else {
        println!(
            "note: {} is absent; skipping the Synthea workload",
            synthea.display()
        );
    }

    println!();
    println!(
        "| workload | store | resources | seconds | CPU seconds | resources/s | peak RSS MB | documents | database MB |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for (name, input, index) in &workloads {
        for mode in ["baseline", "caremesh", "caremesh-encrypted"] {
            let run_dir = work.join(format!("{mode}-{}", name.len()));
            let _ = std::fs::remove_dir_all(&run_dir);
            let mut command = Command::new(std::env::current_exe()?);
            command
                .arg("--measure")
                .arg(mode)
                .arg("--input")
                .arg(input)
                .arg("--work")
                .arg(&run_dir);
            if let Some(index) = index {
                command.arg("--index").arg(index);
            }
            let output = command.output()?;
            if !output.status.success() {
                bail!(
                    "{mode} on {name} failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            let result: Value = serde_json::from_slice(&output.stdout)?;
            let resources = result["resources"].as_f64().unwrap_or(0.0);
            let seconds = result["seconds"].as_f64().unwrap_or(0.0);
            println!(
                "| {name} | {mode} | {resources:.0} | {seconds:.2} | {:.2} | {:.0} | {:.1} | {} | {:.1} |",
                result["cpu_seconds"].as_f64().unwrap_or(0.0),
                resources / seconds,
                result["peak_kb"].as_f64().unwrap_or(0.0) / 1024.0,
                result["documents"],
                result["database_bytes"].as_f64().unwrap_or(0.0) / 1e6
            );
        }
    }
    std::fs::remove_dir_all(&work).ok();
    Ok(())
}

fn peak_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn database_bytes(path: &Path) -> u64 {
    ["", "-wal"]
        .iter()
        .map(|suffix| {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            std::fs::metadata(PathBuf::from(p))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .sum()
}

/// caremesh's ingest into a new home; `encrypted`: its database encrypted with a data key
/// (SQLCipher), the key file beside the home as `caremesh init --data-key-file` keeps it.
fn measure_caremesh(
    input: &Path,
    index: Option<&Path>,
    work: &Path,
    encrypted: bool,
) -> Result<Value> {
    let mut storage = caremesh::home::StorageConfig::default();
    if encrypted {
        let key = work.with_extension("data-key");
        caremesh::home::data_key_for_init(&key, work)?;
        storage.data_key_file = Some(key);
    }
    let home = Home::init_with(
        work,
        OrganisationConfig {
            ods: OdsCode::parse("A81001")?,
            name: "Benchmark Practice".into(),
            kind: OrgKind::Gp,
        },
        storage,
    )?;
    let mut store = home.open_store()?;
    let started = Instant::now();
    let cpu_started = caremesh_bench::cpu_seconds(std::process::id());
    let settings = home.ingest_settings()?;
    let report = Ingestor::new(
        &settings,
        &mut store,
        index,
        FileDisposition::LeaveInPlace,
        0,
    )?
    .ingest_paths(&[input.to_path_buf()])?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = caremesh_bench::cpu_seconds(std::process::id()) - cpu_started;
    if !report.rejected.is_empty() {
        bail!(
            "benchmark input had rejections: {:?}",
            &report.rejected[..1]
        );
    }
    let stats = store.stats()?;
    Ok(serde_json::json!({
        "resources": report.resources_read(),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_kb": peak_kb(),
        "documents": stats.documents,
        "database_bytes": database_bytes(&home.database_path()),
    }))
}

fn measure_baseline(input: &Path, work: &Path) -> Result<Value> {
    std::fs::create_dir_all(work)?;
    let db = work.join("baseline.db");
    let mut conn = rusqlite::Connection::open(&db)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE documents (key TEXT PRIMARY KEY, snapshot BLOB NOT NULL) STRICT;",
    )?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(input)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|f| f.extension().is_some_and(|e| e == "json"));
    files.sort();
    let started = Instant::now();
    let cpu_started = caremesh_bench::cpu_seconds(std::process::id());
    let mut resources = 0usize;
    let mut documents = 0usize;
    for file in files {
        let value: Value = serde_json::from_slice(&std::fs::read(&file)?)?;
        let entries: Vec<Value> = match value.get("entry") {
            Some(Value::Array(entries)) => entries
                .iter()
                .filter_map(|e| e.get("resource").cloned())
                .collect(),
            _ => vec![value],
        };
        let mut groups: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for resource in entries {
            resources += 1;
            let kind = resource["resourceType"].as_str().unwrap_or("?").to_string();
            let patient = resource
                .get("subject")
                .or_else(|| resource.get("patient"))
                .and_then(|r| r.get("reference"))
                .and_then(Value::as_str)
                .unwrap_or("none")
                .to_string();
            groups
                .entry(format!("{patient}|{kind}"))
                .or_default()
                .push(resource);
        }
        let tx = conn.transaction()?;
        for (key, group) in groups {
            let mut doc = Automerge::new();
            let mut t = doc.transaction();
            let items = t.put_object(ROOT, "items", ObjType::Map)?;
            for resource in &group {
                let id = resource["id"].as_str().unwrap_or("?").to_string();
                t.put(&items, id, resource.to_string())?;
            }
            t.commit_with(CommitOptions::default().with_time(0));
            tx.execute(
                "INSERT OR REPLACE INTO documents (key, snapshot) VALUES (?1, ?2)",
                rusqlite::params![key, doc.save()],
            )?;
            documents += 1;
        }
        tx.commit()?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = caremesh_bench::cpu_seconds(std::process::id()) - cpu_started;
    Ok(serde_json::json!({
        "resources": resources,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_kb": peak_kb(),
        "documents": documents,
        "database_bytes": database_bytes(&db),
    }))
}
