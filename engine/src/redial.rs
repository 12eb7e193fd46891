//! When to dial a peer again: one policy for the node and the simulator.

/// The first pause after a failed or short connection.
pub const FIRST_MS: u64 = 250;
/// The longest pause: a node cut off reconnects within this (plus jitter) of the link's return.
pub const LAST_MS: u64 = 10_000;
/// A connection that lasted this long resets the backoff.
pub const STABLE_MS: u64 = 30_000;

/// Reconnect backoff for one peer: doubles from [`FIRST_MS`] to [`LAST_MS`] while connections
/// fail or end quickly, with up to 50% jitter so that nodes cut off together do not
/// reconnect in step; back to the first after a connection that lasted [`STABLE_MS`].
#[derive(Debug, Clone)]
pub struct Redial {
    backoff_ms: u64,
}

impl Default for Redial {
    fn default() -> Self {
        Redial {
            backoff_ms: FIRST_MS,
        }
    }
}

impl Redial {
    /// The pause before the next attempt, after an attempt whose connection lasted
    /// `lasted_ms` (0 when it failed). `jitter` is a uniform draw from [0, 1): the node's
    /// comes from the OS, the simulator's from its seeded generator.
    pub fn pause_after(&mut self, lasted_ms: u64, jitter: f64) -> u64 {
        debug_assert!((0.0..=1.0).contains(&jitter), "jitter is a fraction");
        if lasted_ms >= STABLE_MS {
            self.backoff_ms = FIRST_MS;
        } else {
            self.backoff_ms = (self.backoff_ms * 2).min(LAST_MS);
        }
        self.backoff_ms + (self.backoff_ms as f64 * jitter * 0.5) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_limit_and_a_stable_connection_resets_it() {
        let mut redial = Redial::default();
        let pauses: Vec<u64> = (0..8).map(|_| redial.pause_after(0, 0.0)).collect();
        assert_eq!(
            pauses,
            [500, 1_000, 2_000, 4_000, 8_000, 10_000, 10_000, 10_000]
        );
        assert_eq!(redial.pause_after(STABLE_MS, 0.0), FIRST_MS);
        assert_eq!(redial.pause_after(0, 1.0), 750, "jitter adds up to half");
    }
}
