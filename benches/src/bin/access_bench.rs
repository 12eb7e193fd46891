//! What recording one view costs as a patient's access record grows (issue 20): every view of
//! other organisations' data is appended to the audit chain and added to this node's signed
//! access record for the patient, which sync takes to the data's owners. The record gains an
//! item per view, so a much-viewed patient's record is large, and the cost of a view must not
//! grow with it.
//!
//! ```sh
//! cargo build --release -p caremesh-bench
//! ./target/release/access-bench --views 2000
//! ```
//!
//! Each view is `record_access` on a real store file (WAL, a durable commit per view), as the
//! view's write does. Baseline in the same run: the same views of the practice's own data
//! only, which append to the chain and write no access record.

use anyhow::{Context, Result};
use caremesh_storage::Store;
use caremesh_storage::audit::AuditEvent;
use caremesh_sync::{NhsNumber, OdsCode, PublisherKey};
use clap::Parser;
use std::time::Instant;

#[derive(Parser)]
#[command(about = "CPU and time per recorded view as a patient's access record grows")]
struct Args {
    /// Views of the one patient, recorded one after another.
    #[arg(long, default_value_t = 2000)]
    views: usize,
}

const VIEWER: &str = "A81001";

fn main() -> Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.views >= 200, "--views must be at least 200");
    let key = PublisherKey::from_secret([7; 32]);
    let own = OdsCode::parse(VIEWER).expect("an ODS code");
    let patient = caremesh_fhir::synthetic::test_nhs_number(1, 1);
    println!(
        "{} views of one patient, each recorded and committed durably",
        args.views
    );
    println!(
        "{:<44} {:>16} {:>22}",
        "views", "CPU us/view", "wall p50/p99/max ms"
    );
    let baseline = record_views(&key, &own, &patient, args.views, &[VIEWER])?;
    print_buckets("practice's own data only (baseline)", &baseline);
    let shown = record_views(&key, &own, &patient, args.views, &[VIEWER, "RXX01"])?;
    print_buckets("another organisation's data shown", &shown);
    Ok(())
}

/// CPU seconds and wall microseconds of each view, in order, and this process's resident
/// memory growth over the views, store still open (what the node keeps loaded).
struct Costs {
    cpu: Vec<f64>,
    wall_us: Vec<u32>,
    resident_growth_kib: i64,
}

fn record_views(
    key: &PublisherKey,
    own: &OdsCode,
    patient: &NhsNumber,
    views: usize,
    sources: &[&str],
) -> Result<Costs> {
    let dir = tempfile::tempdir().context("a temporary folder")?;
    let mut store = Store::open(&dir.path().join("node.db"))?;
    let mut costs = Costs {
        cpu: Vec::with_capacity(views),
        wall_us: Vec::with_capacity(views),
        resident_growth_kib: 0,
    };
    let resident_before = caremesh_bench::rss_kib(std::process::id()) as i64;
    for view in 0..views {
        let event = AuditEvent {
            at: 1_790_000_000 + view as i64,
            user_id: "clinician-1".into(),
            user_name: "Dr Bench".into(),
            role: "clinician".into(),
            organisation: own.to_string(),
            action: "view".into(),
            nhs: Some(patient.to_string()),
            sources: sources.iter().map(|s| s.to_string()).collect(),
            sections: vec!["allergies".into(), "medications".into(), "problems".into()],
            purpose: "direct care".into(),
            outcome: "allowed".into(),
            detail: String::new(),
        };
        let (cpu, wall) = (caremesh_bench::own_cpu_seconds(), Instant::now());
        caremesh_storage::publish::record_access(&mut store, key, own, &event)?;
        costs.cpu.push(caremesh_bench::own_cpu_seconds() - cpu);
        costs.wall_us.push(wall.elapsed().as_micros() as u32);
    }
    costs.resident_growth_kib =
        caremesh_bench::rss_kib(std::process::id()) as i64 - resident_before;
    Ok(costs)
}

/// The first hundred views, the hundred in the middle and the last hundred.
fn print_buckets(what: &str, costs: &Costs) {
    println!("{what}");
    let views = costs.cpu.len();
    for start in [0, views / 2 - 50, views - 100] {
        let range = start..start + 100;
        let cpu: f64 = costs.cpu[range.clone()].iter().sum::<f64>() / 100.0;
        let (p50, p99, max) = caremesh_bench::percentiles(costs.wall_us[range].to_vec());
        println!(
            "  {:<42} {:>16.0} {:>22}",
            format!("views {}-{}", start + 1, start + 100),
            cpu * 1e6,
            format!("{p50:.2} / {p99:.2} / {max:.2}")
        );
    }
    println!(
        "  resident memory grew by {:.1} MB over the views (the store still open)",
        costs.resident_growth_kib as f64 / 1024.0
    );
}
