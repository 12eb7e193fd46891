//! The disk reserve and free space (`caremesh_storage::disk_space`) for the node's own
//! commands, whose errors are carried by `anyhow`.

use caremesh_storage::disk_space;
pub use caremesh_storage::disk_space::{ensure_reserve, ingest_blocked, status};
use std::path::Path;

/// As [`caremesh_storage::is_disk_full`], for an error carried by `anyhow`.
pub fn is_disk_full_anyhow(error: &anyhow::Error) -> bool {
    error.chain().any(caremesh_storage::is_disk_full)
}

/// [`disk_space::write_even_when_full`] for a write whose error is carried by `anyhow`.
pub fn write_even_when_full<T>(
    home_dir: &Path,
    write: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    disk_space::write_even_when_full(home_dir, is_disk_full_anyhow, write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use caremesh_storage::{DatabaseError, DatabaseFailure, StorageError};

    #[test]
    fn a_full_disk_is_recognised_behind_the_context_anyhow_adds() {
        let full = StorageError::Database {
            path: "node.db".into(),
            action: "commit",
            source: DatabaseError::new(DatabaseFailure::DiskFull, "database or disk is full"),
        };
        let wrapped = anyhow::Error::new(full).context("recording the access");
        assert!(is_disk_full_anyhow(&wrapped));
        let other = anyhow::Error::new(std::io::Error::from_raw_os_error(libc::EACCES));
        assert!(!is_disk_full_anyhow(&other.context("reading")));
    }
}
