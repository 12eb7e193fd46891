//! A disk that fails, for the simulator: commits fail as they do when an fsync fails or the
//! disk is full, and SQLite rolls the transaction back. Attached with
//! [`crate::Store::on_simulated_disk`]; production never attaches one.
//!
//! What it models: a failed commit (SQLite returns an error from COMMIT and the transaction's
//! writes are gone, as with `SQLITE_IOERR_FSYNC` or `SQLITE_FULL` in WAL mode), at a seeded
//! rate or on every commit while the disk is full. Power cuts that tear unsynced writes are
//! [`crate::power_loss`]'s; pages corrupted at rest are not modelled yet.

use caremesh_sync::rng::Rng;
use std::sync::Mutex;

/// The fault state of one simulated node's disk.
pub struct SimulatedDisk {
    state: Mutex<DiskState>,
}

struct DiskState {
    full: bool,
    /// Chance that a commit fails as a failed fsync would.
    commit_failure: f64,
    rng: Rng,
    failed_commits: u64,
}

impl SimulatedDisk {
    /// A healthy disk whose failures, once set, are drawn from `seed`.
    pub fn new(seed: u64) -> SimulatedDisk {
        SimulatedDisk {
            state: Mutex::new(DiskState {
                full: false,
                commit_failure: 0.0,
                rng: Rng::new(seed),
                failed_commits: 0,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, DiskState> {
        // A panic while holding it leaves plain numbers, still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fills the disk (every commit fails) or frees it.
    pub fn set_full(&self, full: bool) {
        self.state().full = full;
    }

    /// Makes each commit fail with chance `chance` (0 heals the disk).
    pub fn set_commit_failure(&self, chance: f64) {
        assert!((0.0..=1.0).contains(&chance), "a chance is within 0 and 1");
        self.state().commit_failure = chance;
    }

    /// Whether the disk is failing now (full, or commits failing).
    pub fn is_failing(&self) -> bool {
        let state = self.state();
        state.full || state.commit_failure > 0.0
    }

    /// Commits failed so far.
    pub fn failed_commits(&self) -> u64 {
        self.state().failed_commits
    }

    /// Whether the commit now being made fails (it is then rolled back).
    pub(crate) fn commit_fails(&self) -> bool {
        let mut state = self.state();
        let fails = state.full
            || (state.commit_failure > 0.0 && {
                let chance = state.commit_failure;
                state.rng.chance(chance)
            });
        if fails {
            state.failed_commits += 1;
        }
        fails
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;
    use std::sync::Arc;

    #[test]
    fn a_full_disk_fails_commits_and_rolls_them_back_and_a_freed_one_commits() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("node.db")).unwrap();
        let disk = Arc::new(SimulatedDisk::new(1));
        store.on_simulated_disk(disk.clone()).unwrap();
        let status = |n: u64| crate::PeerStatus {
            peer: "A81001".into(),
            bytes_sent: n,
            ..Default::default()
        };
        store.save_peer_status(&status(1)).unwrap();
        disk.set_full(true);
        assert!(store.save_peer_status(&status(2)).is_err());
        store.begin_group();
        store.save_peer_status(&status(3)).unwrap();
        assert!(store.end_group().is_err(), "a group's commit fails too");
        let sent = |store: &Store| {
            let peer = caremesh_sync::OdsCode::parse("A81001").unwrap();
            store.peer_status(&peer).unwrap().unwrap().bytes_sent
        };
        assert_eq!(sent(&store), 1, "the failed commits left nothing");
        disk.set_full(false);
        store.save_peer_status(&status(4)).unwrap();
        assert_eq!(sent(&store), 4);
        assert_eq!(disk.failed_commits(), 2);
    }

    #[test]
    fn failing_commits_follow_the_seed() {
        let failures = |seed| {
            let disk = SimulatedDisk::new(seed);
            disk.set_commit_failure(0.3);
            (0..100).map(|_| disk.commit_fails()).collect::<Vec<_>>()
        };
        assert_eq!(failures(7), failures(7));
        let failed = failures(7).iter().filter(|f| **f).count();
        assert!((15..=45).contains(&failed), "about 30 in 100, got {failed}");
    }
}
