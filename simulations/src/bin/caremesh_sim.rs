//! `caremesh-sim` (also run as `caremesh sim`): runs a simulation scenario, one seed or a
//! swarm of seeds in parallel processes. A binary of its own, so that the product binary
//! does not carry the simulator.

use anyhow::{Context, Result};
use caremesh_sim::{Report, Scenario};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

/// Run a simulation scenario in virtual time: many nodes, the real sync engine and storage,
/// a simulated network and disks with faults; reports convergence, violations and a trace hash.
#[derive(clap::Parser)]
#[command(name = "caremesh-sim", version)]
pub struct SimArgs {
    /// The scenario file (TOML), such as simulations/scenarios/hub-outage.toml.
    scenario: PathBuf,
    /// The seed: the same scenario and seed give the same run and the same trace hash.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Draw the fault parameters from the seed as well (what a swarm run does per seed).
    #[arg(long)]
    randomise: bool,
    /// Run this many seeds (1..=N), each with randomised fault parameters.
    #[arg(long, conflicts_with = "seed")]
    swarm: Option<u64>,
    /// Seeds run at once in a swarm (default: the machine's cores). Each run is still a
    /// function of its seed alone.
    #[arg(long)]
    jobs: Option<usize>,
    /// Where the simulated nodes' databases go (a temporary folder when not given).
    #[arg(long)]
    work: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<ExitCode> {
    let args = <SimArgs as clap::Parser>::parse();
    let scenario = Scenario::load(&args.scenario)?;
    let temporary;
    let work = match &args.work {
        Some(work) => work.clone(),
        None => {
            temporary = tempfile::tempdir().context("making a work folder")?;
            temporary.path().to_path_buf()
        }
    };
    match args.swarm {
        None => {
            let scenario = if args.randomise {
                caremesh_sim::swarm::randomise(&scenario, args.seed)
            } else {
                scenario
            };
            let started = Instant::now();
            let report =
                caremesh_sim::run(&scenario, args.seed, &work.join(args.seed.to_string()))?;
            print_report(&report, &args, started.elapsed().as_secs_f64())?;
            if !report.passed() {
                eprintln!(
                    "replay: {}",
                    replay_command(&args.scenario, args.seed, args.randomise)
                );
                return Ok(ExitCode::from(1));
            }
        }
        Some(seeds) => {
            let started = Instant::now();
            let jobs = args
                .jobs
                .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
                .unwrap_or(1)
                .max(1);
            let reports = run_swarm(&args.scenario, seeds, jobs, &work)?;
            let failed: Vec<&Report> = reports.iter().filter(|r| !r.passed()).collect();
            for report in &failed {
                print!("{}", report.render());
                println!(
                    "  replay: {}",
                    replay_command(&args.scenario, report.seed, true)
                );
            }
            let slowest = reports
                .iter()
                .filter_map(|r| {
                    r.heals
                        .iter()
                        .filter_map(|h| h.converged_after_s)
                        .reduce(f64::max)
                })
                .reduce(f64::max);
            println!(
                "swarm {}: {} seeds, {} failed, slowest convergence after a heal {}, {:.1} s",
                scenario.name,
                seeds,
                failed.len(),
                slowest.map_or("-".to_string(), |s| format!("{s:.0} s")),
                started.elapsed().as_secs_f64()
            );
            if !failed.is_empty() {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs seeds 1..=`seeds`, `jobs` at a time, each in its own `caremesh-sim` process (in one
/// process SQLite's and the allocator's locks made two runs no faster than one); reports
/// come back in seed order.
fn run_swarm(scenario_path: &Path, seeds: u64, jobs: usize, work: &Path) -> Result<Vec<Report>> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};
    let exe = std::env::current_exe().context("finding the caremesh-sim binary")?;
    let next = AtomicU64::new(1);
    let results: Mutex<Vec<Result<Report>>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(seeds as usize) {
            scope.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed > seeds {
                        break;
                    }
                    let report = run_child(&exe, scenario_path, seed, &work.join(seed.to_string()));
                    results
                        .lock()
                        .expect("no worker panics holding it")
                        .push(report);
                }
            });
        }
    });
    let mut reports = results
        .into_inner()
        .expect("no worker panicked holding it")
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    reports.sort_by_key(|r| r.seed);
    Ok(reports)
}

fn run_child(exe: &Path, scenario: &Path, seed: u64, work: &Path) -> Result<Report> {
    let output = std::process::Command::new(exe)
        .arg(scenario)
        .args([
            "--seed",
            &seed.to_string(),
            "--randomise",
            "--json",
            "--work",
        ])
        .arg(work)
        .env("CAREMESH_LOG", "error")
        .output()
        .context("running a swarm seed")?;
    let _ = std::fs::remove_dir_all(work);
    serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "seed {seed} produced no report: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn print_report(report: &Report, args: &SimArgs, wall_s: f64) -> Result<()> {
    if args.json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{}", report.render());
        println!(
            "  {:.1} s of wall time, {:.0} simulated seconds per second",
            wall_s,
            report.simulated_s / wall_s.max(1e-9)
        );
    }
    Ok(())
}

/// The one command that reproduces a run.
fn replay_command(scenario: &Path, seed: u64, randomise: bool) -> String {
    format!(
        "caremesh sim {} --seed {seed}{}",
        scenario.display(),
        if randomise { " --randomise" } else { "" }
    )
}
