//! Swarm testing: the same scenario with its fault parameters drawn from the seed, so many
//! seeds explore many fault shapes, and one seed reproduces one exactly.

use crate::scenario::{Fault, FaultKind, Scenario};

/// `scenario` with randomised faults: the network's loss, latency, jitter and bandwidth;
/// clock skew for some node groups; each fault's start and length (kept inside the run);
/// link faults' loss, latency and flapping; crashes at rest or mid-write; disk faults' rate
/// and length, and for half the seeds a disk fault added on a random node (commits failing,
/// or a full disk).
pub fn randomise(scenario: &Scenario, seed: u64) -> Scenario {
    let mut rng = crate::seeded(seed ^ 0x5741_524d);
    let mut out = scenario.clone();
    out.network.loss = rng.unit() * 0.05;
    out.network.duplicate = rng.unit() * 0.02;
    out.network.reorder = rng.unit() * 0.05;
    out.network.latency_ms = 5 + rng.below(150);
    out.network.jitter_ms = rng.below(out.network.latency_ms / 2 + 1);
    out.network.bandwidth_kbps = 500 + rng.below(20_000);
    for group in &mut out.nodes {
        // Clocks up to ten minutes out either way, for half the groups.
        if rng.chance(0.5) {
            group.clock_skew_s = rng.below(1201) as i64 - 600;
        }
    }
    let duration = out.duration_s;
    for fault in &mut out.faults {
        // Start within a tenth of the run of where the scenario put it.
        let spread = duration / 10 + 1;
        fault.at_s = (fault.at_s + rng.below(spread))
            .saturating_sub(spread / 2)
            .min(duration.saturating_sub(1));
        match &mut fault.kind {
            FaultKind::Partition { until_s, .. } => {
                let length = 1 + rng.below(duration / 3 + 1);
                *until_s = (fault.at_s + length).min(duration);
                if *until_s <= fault.at_s {
                    *until_s = fault.at_s + 1;
                }
            }
            FaultKind::Link {
                until_s,
                loss,
                latency_ms,
                flap_every_s,
                flap_down_s,
                ..
            } => {
                let length = 1 + rng.below(duration / 2 + 1);
                *until_s = (fault.at_s + length).min(duration).max(fault.at_s + 1);
                *loss = Some(rng.unit() * 0.4);
                *latency_ms = Some(20 + rng.below(500));
                if flap_every_s.is_some() {
                    *flap_every_s = Some(30 + rng.below(600));
                    *flap_down_s = 5 + rng.below(60);
                }
            }
            FaultKind::Crash {
                restart_after_s,
                mid_write,
                mid_sync,
                corrupt,
                ..
            } => {
                if restart_after_s.is_some() {
                    *restart_after_s = Some(1 + rng.below(duration / 4 + 1));
                }
                *mid_write = rng.chance(0.5);
                // Of the other half, half lose power in a sync of their WAL.
                *mid_sync = !*mid_write && rng.chance(0.5);
                *corrupt = restart_after_s.is_some() && rng.chance(0.25);
            }
            FaultKind::Disk {
                until_s,
                commit_failure,
                ..
            } => {
                let length = 1 + rng.below(duration / 3 + 1);
                *until_s = (fault.at_s + length).min(duration).max(fault.at_s + 1);
                *commit_failure = rng.unit() * 0.5;
            }
        }
    }
    if rng.chance(0.5) {
        out.faults.push(random_disk_fault(&out, &mut rng));
    }
    out
}

/// A disk fault on one node drawn at random: a quarter of the time a full disk, otherwise
/// commits failing at up to half the time, for up to a third of the run.
fn random_disk_fault(scenario: &Scenario, rng: &mut caremesh_sync::rng::Rng) -> Fault {
    let codes = scenario.codes();
    let node = codes[rng.below(codes.len() as u64) as usize].0.clone();
    let duration = scenario.duration_s.max(2);
    let at_s = rng.below(duration - 1);
    let until_s = (at_s + 1 + rng.below(duration / 3 + 1)).min(duration);
    let full = rng.chance(0.25);
    Fault {
        at_s,
        kind: FaultKind::Disk {
            nodes: vec![node],
            until_s,
            commit_failure: if full { 0.0 } else { rng.unit() * 0.5 },
            full,
        },
    }
}
