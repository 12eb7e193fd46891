//! The simulated network: which node pairs can exchange packets at a given moment
//! (partitions, links down), what a link is like (latency, bandwidth, loss), and when a frame
//! sent on a connection arrives.
//!
//! Sync runs over one QUIC stream per connection, which delivers bytes in order, once. So the
//! packet-level faults a scenario asks for reach the sync engine the way QUIC passes them
//! on: a lost packet is a retransmission delay (with exponential backoff), a reordered one
//! holds up the frames behind it, a duplicated one costs bandwidth. A link that passes no
//! packets for the idle timeout closes the connection, and the dialler tries again later.

use crate::scenario::LinkSpec;
use caremesh_sync::rng::Rng;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    No,
    /// Packets do not get through in at least one direction.
    Yes,
}

struct Partition {
    sides: Vec<BTreeSet<usize>>,
    one_way: bool,
}

struct Degradation {
    members: BTreeSet<usize>,
    loss: Option<f64>,
    latency_ms: Option<u64>,
    bandwidth_kbps: Option<u64>,
    down: bool,
}

/// The faults in force, by the index of the scenario fault that made them.
#[derive(Default)]
pub struct LinkState {
    partitions: BTreeMap<usize, Partition>,
    degradations: BTreeMap<usize, Degradation>,
}

impl LinkState {
    pub fn add_partition(&mut self, index: usize, sides: Vec<BTreeSet<usize>>, one_way: bool) {
        self.partitions.insert(index, Partition { sides, one_way });
    }

    pub fn add_degradation(
        &mut self,
        index: usize,
        members: Vec<usize>,
        loss: Option<f64>,
        latency_ms: Option<u64>,
        bandwidth_kbps: Option<u64>,
    ) {
        self.degradations.insert(
            index,
            Degradation {
                members: members.into_iter().collect(),
                loss,
                latency_ms,
                bandwidth_kbps,
                down: false,
            },
        );
    }

    pub fn set_down(&mut self, index: usize, down: bool) {
        if let Some(degradation) = self.degradations.get_mut(&index) {
            degradation.down = down;
        }
    }

    pub fn remove(&mut self, index: usize) {
        self.partitions.remove(&index);
        self.degradations.remove(&index);
    }

    /// Whether packets from `from` reach `to` now.
    pub fn blocked_direction(&self, from: usize, to: usize) -> bool {
        let cut = self.partitions.values().any(|p| {
            let side_of = |n: usize| p.sides.iter().position(|s| s.contains(&n));
            match (side_of(from), side_of(to)) {
                (Some(a), Some(b)) if a != b => !p.one_way || a == 0,
                _ => false,
            }
        });
        cut || self
            .degradations
            .values()
            .any(|d| d.down && (d.members.contains(&from) || d.members.contains(&to)))
    }

    /// Whether a connection between `a` and `b` can work now: packets must pass both ways.
    pub fn blocked(&self, a: usize, b: usize) -> Blocked {
        if self.blocked_direction(a, b) || self.blocked_direction(b, a) {
            Blocked::Yes
        } else {
            Blocked::No
        }
    }

    /// `spec` with the degradations in force on `a`'s or `b`'s access link applied.
    pub fn effective(&self, spec: LinkSpec, a: usize, b: usize) -> LinkSpec {
        let mut spec = spec;
        for d in self.degradations.values() {
            if !(d.members.contains(&a) || d.members.contains(&b)) {
                continue;
            }
            if let Some(loss) = d.loss {
                spec.loss = spec.loss.max(loss);
            }
            if let Some(latency) = d.latency_ms {
                spec.latency_ms = spec.latency_ms.max(latency);
            }
            if let Some(bandwidth) = d.bandwidth_kbps {
                spec.bandwidth_kbps = spec.bandwidth_kbps.min(bandwidth);
            }
        }
        spec
    }
}

/// Most retransmissions a frame waits for before the model stops drawing (the connection
/// would have been closed as idle long before in any scenario with that much loss).
const MAX_RETRANSMISSIONS: u32 = 12;

/// When a frame of `size` bytes sent at `now` arrives, given the direction's serialisation
/// queue (`next_free_ms`) and the previous frame's arrival (a stream delivers in order).
pub fn transmit(
    spec: &LinkSpec,
    size: usize,
    now: u64,
    next_free_ms: &mut u64,
    last_arrival_ms: &mut u64,
    rng: &mut Rng,
) -> u64 {
    let bandwidth = spec.bandwidth_kbps.max(1);
    let on_wire_ms = (size as u64 * 8).div_ceil(bandwidth);
    let mut depart = (*next_free_ms).max(now) + on_wire_ms;
    if rng.chance(spec.duplicate) {
        depart += on_wire_ms;
    }
    *next_free_ms = depart;
    let mut delay = spec.latency_ms + rng.below(spec.jitter_ms + 1);
    let mut timeout = (3 * spec.latency_ms).max(200);
    let mut tries = 0;
    while tries < MAX_RETRANSMISSIONS && rng.chance(spec.loss) {
        delay += timeout;
        timeout *= 2;
        tries += 1;
    }
    if rng.chance(spec.reorder) {
        delay += spec.latency_ms;
    }
    let arrival = (depart + delay).max(*last_arrival_ms);
    *last_arrival_ms = arrival;
    arrival
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_delivers_in_order_and_loss_only_delays() {
        let spec = LinkSpec {
            loss: 0.3,
            reorder: 0.2,
            ..LinkSpec::default()
        };
        let mut rng = crate::seeded(3);
        let (mut free, mut last) = (0, 0);
        let arrivals: Vec<u64> = (0..200)
            .map(|i| transmit(&spec, 1200, i * 10, &mut free, &mut last, &mut rng))
            .collect();
        assert!(arrivals.windows(2).all(|w| w[0] <= w[1]));
        assert!(arrivals.iter().all(|&a| a >= 20));
    }

    #[test]
    fn a_partition_cuts_between_sides_and_one_way_cuts_one_direction() {
        let mut links = LinkState::default();
        let sides = vec![BTreeSet::from([0]), BTreeSet::from([1])];
        links.add_partition(0, sides.clone(), true);
        assert!(links.blocked_direction(0, 1));
        assert!(!links.blocked_direction(1, 0));
        assert_eq!(links.blocked(1, 0), Blocked::Yes);
        assert_eq!(links.blocked(0, 2), Blocked::No, "node 2 is on no side");
        links.remove(0);
        assert_eq!(links.blocked(0, 1), Blocked::No);
    }
}
