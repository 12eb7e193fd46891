//! A deterministic simulator for a caremesh region.
//!
//! Many nodes and hubs run in one process with the real sync engine (`caremesh_sync::Session`)
//! and real storage (`caremesh_storage::sync_host::StoreHost` over SQLite files), connected by
//! a simulated network ([`network`]) in virtual time. A seeded generator ([`seeded`]) makes every
//! choice: no wall clock and no OS randomness reach a run, so the same scenario and seed give
//! the same trace hash, byte for byte.
//!
//! * [`scenario`]: the TOML format (topology, workload, faults, invariants).
//! * [`world`]: the event loop.
//! * [`check`]: the invariants.
//! * [`swarm`]: fault parameters randomised per seed.

mod check;
pub mod network;
pub mod scenario;
pub mod swarm;
mod world;

use caremesh_sync::rng::Rng;
pub use scenario::{Scenario, ScenarioError};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The simulator's generator for `seed` (`caremesh_sync::rng`, mixed apart from the seeds
/// `caremesh generate` uses).
pub fn seeded(seed: u64) -> Rng {
    Rng::from_state(seed ^ 0x6a09_e667_f3bc_c908)
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    #[error("simulation set-up failed: {0}")]
    Setup(String),
}

/// An invariant broken: where, which document, when (simulated seconds), and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Violation {
    pub at_s: f64,
    pub node: String,
    pub doc: String,
    pub rule: String,
    pub detail: String,
}

/// A heal (a partition or link fault ending, a node restarting) and how long the region then
/// took to converge, to the resolution of the scenario's check interval.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Heal {
    pub at_s: f64,
    pub converged_after_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub simulated_s: f64,
    pub heals: Vec<Heal>,
    pub connections: u64,
    pub idle_closes: u64,
    /// Connections closed because the peer's Hello did not arrive in time (a lossy link).
    pub hello_timeouts: u64,
    pub crashes: u64,
    pub frames: u64,
    pub bytes: u64,
    pub changes: u64,
    /// Record views audited (each sent to the data owners when it showed their data).
    #[serde(default)]
    pub views: u64,
    pub consent_changes: u64,
    /// Received documents a node refused (late copies after a withdrawal, stale facts).
    pub refused: u64,
    /// Sessions closed because a group commit failed (a disk fault).
    pub storage_failures: u64,
    /// Local writes (publications, audited views) a failing disk refused.
    pub failed_writes: u64,
    /// Power cuts that struck in the middle of a node's writes.
    pub mid_write_power_cuts: u64,
    /// Writes not yet synced that power cuts took back.
    pub unsynced_writes_lost: u64,
    /// Bits flipped at rest in a crashed node's database (crash faults with `corrupt`).
    #[serde(default)]
    pub pages_corrupted: u64,
    /// Nodes that found their database damaged and stopped, saying why.
    #[serde(default)]
    pub damage_stops: Vec<DamageStop>,
    pub documents_held: u64,
    pub converged: bool,
    pub violations: Vec<Violation>,
    pub trace_hash: String,
}

/// A node that found its database damaged and stopped: it serves and sends nothing more,
/// and stays down for its operator (restore or rebuild from peers).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DamageStop {
    pub at_s: f64,
    pub node: String,
    pub reason: String,
}

impl Report {
    fn new(scenario: &str, seed: u64) -> Report {
        Report {
            scenario: scenario.to_string(),
            seed,
            simulated_s: 0.0,
            heals: Vec::new(),
            connections: 0,
            idle_closes: 0,
            hello_timeouts: 0,
            storage_failures: 0,
            failed_writes: 0,
            mid_write_power_cuts: 0,
            unsynced_writes_lost: 0,
            pages_corrupted: 0,
            damage_stops: Vec::new(),
            crashes: 0,
            frames: 0,
            bytes: 0,
            changes: 0,
            views: 0,
            consent_changes: 0,
            refused: 0,
            documents_held: 0,
            converged: false,
            violations: Vec::new(),
            trace_hash: String::new(),
        }
    }

    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// The report as text for a terminal.
    pub fn render(&self) -> String {
        let mut out = format!(
            "scenario {} seed {}: {}\n",
            self.scenario,
            self.seed,
            if self.passed() { "passed" } else { "FAILED" }
        );
        out.push_str(&format!(
            "  simulated {:.0} s; {} connections ({} closed idle, {} without a timely Hello), {} crashes\n",
            self.simulated_s, self.connections, self.idle_closes, self.hello_timeouts, self.crashes
        ));
        out.push_str(&format!(
            "  {} frames, {} bytes; {} changes, {} views, {} consent changes; {} refused on receipt\n",
            self.frames,
            self.bytes,
            self.changes,
            self.views,
            self.consent_changes,
            self.refused
        ));
        if self.crashes > 0 {
            out.push_str(&format!(
                "  power cuts: {} crashes, {} of them mid-write; {} unsynced writes taken back\n",
                self.crashes, self.mid_write_power_cuts, self.unsynced_writes_lost
            ));
        }
        if self.pages_corrupted > 0 {
            out.push_str(&format!(
                "  damage at rest: {} bits flipped in crashed nodes' databases; {} nodes stopped on finding it\n",
                self.pages_corrupted,
                self.damage_stops.len()
            ));
        }
        for stop in &self.damage_stops {
            out.push_str(&format!(
                "  stopped at {:.0} s: {}: {}\n",
                stop.at_s, stop.node, stop.reason
            ));
        }
        if self.storage_failures + self.failed_writes > 0 {
            out.push_str(&format!(
                "  disk faults: {} sessions closed by a failed commit, {} local writes refused\n",
                self.storage_failures, self.failed_writes
            ));
        }
        out.push_str(&format!(
            "  {} documents held at the end; converged: {}\n",
            self.documents_held,
            if self.converged { "yes" } else { "no" }
        ));
        for heal in &self.heals {
            match heal.converged_after_s {
                Some(after) => out.push_str(&format!(
                    "  heal at {:.0} s: converged {:.0} s later\n",
                    heal.at_s, after
                )),
                None => out.push_str(&format!(
                    "  heal at {:.0} s: did not converge before the next fault or the end\n",
                    heal.at_s
                )),
            }
        }
        for violation in &self.violations {
            out.push_str(&format!(
                "  VIOLATION {} at {:.1} s on {} (document {}): {}\n",
                violation.rule, violation.at_s, violation.node, violation.doc, violation.detail
            ));
        }
        out.push_str(&format!("  trace hash {}\n", self.trace_hash));
        out
    }
}

/// Runs `scenario` with `seed`, keeping the nodes' databases under `work`.
pub fn run(scenario: &Scenario, seed: u64, work: &Path) -> Result<Report, SimError> {
    std::fs::create_dir_all(work)
        .map_err(|e| SimError::Setup(format!("{}: {e}", work.display())))?;
    let world = world::World::new(scenario.clone(), seed, work)?;
    world.run()
}

#[cfg(test)]
mod tests;
