//! `caremesh sim`: runs a simulation scenario (see `simulations/`), one seed or a swarm.

use anyhow::{Context, Result};
use caremesh_sim::{Report, Scenario};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(clap::Args)]
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
    /// Where the simulated nodes' databases go (a temporary folder when not given).
    #[arg(long)]
    work: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: SimArgs) -> Result<ExitCode> {
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
            let mut failed = Vec::new();
            let started = Instant::now();
            for seed in 1..=seeds {
                let randomised = caremesh_sim::swarm::randomise(&scenario, seed);
                let folder = work.join(seed.to_string());
                let report = caremesh_sim::run(&randomised, seed, &folder)?;
                let _ = std::fs::remove_dir_all(&folder);
                if !report.passed() {
                    print!("{}", report.render());
                    println!("  replay: {}", replay_command(&args.scenario, seed, true));
                    failed.push(seed);
                }
            }
            println!(
                "swarm {}: {} seeds, {} failed, {:.1} s",
                scenario.name,
                seeds,
                failed.len(),
                started.elapsed().as_secs_f64()
            );
            if !failed.is_empty() {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
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
