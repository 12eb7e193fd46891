//! The disk the node home is on: how much is free, and a reserve that keeps a full disk from
//! stopping the node recording who viewed what.
//!
//! A full disk must not take the record away from clinicians: reads need no space, but every
//! view writes an access record (the audit trail), and a launch writes its session. So the node
//! keeps a reserve file of [`RESERVE_BYTES`] in its home. When a write fails because the disk is
//! full, the reserve is given up and the write tried again: the node keeps serving, and
//! auditing, for thousands of views while the operator frees space. Ingest pauses below
//! [`LOW_SPACE_BYTES`], so that the reserve and the audit are not eaten by a large extract.

use std::io::Write;
use std::path::{Path, PathBuf};

pub const RESERVE_FILE: &str = "reserve.space";
/// Room for about ten thousand access records.
pub const RESERVE_BYTES: u64 = 8 * 1024 * 1024;
/// Below this much free space the drop folder pauses.
pub const LOW_SPACE_BYTES: u64 = 16 * 1024 * 1024;

/// Bytes free to the node's account on the file system holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("a path with a NUL byte"))?;
    // SAFETY: `c_path` is a valid NUL-terminated string and `stats` a zeroed struct that
    // statvfs fills; it is read only when the call reports success.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    let status = unsafe { libc::statvfs(c_path.as_ptr(), &mut stats) };
    if status != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stats.f_bavail as u64 * stats.f_frsize as u64)
}

fn reserve_path(home_dir: &Path) -> PathBuf {
    home_dir.join(RESERVE_FILE)
}

/// Whether the reserve is in place.
pub fn reserve_held(home_dir: &Path) -> bool {
    std::fs::metadata(reserve_path(home_dir)).is_ok_and(|m| m.len() >= RESERVE_BYTES)
}

/// Makes the reserve if it is missing and the disk has room for it and for ingest beside it.
/// Returns whether it is in place.
pub fn ensure_reserve(home_dir: &Path) -> std::io::Result<bool> {
    if reserve_held(home_dir) {
        return Ok(true);
    }
    if free_bytes(home_dir)? < RESERVE_BYTES + LOW_SPACE_BYTES {
        return Ok(false);
    }
    let path = reserve_path(home_dir);
    let partial = home_dir.join(format!("{RESERVE_FILE}.partial"));
    let made = (|| {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)?;
        // Written, not sparse: the blocks must really be taken from the disk.
        let chunk = vec![0u8; 1024 * 1024];
        for _ in 0..RESERVE_BYTES / chunk.len() as u64 {
            file.write_all(&chunk)?;
        }
        file.sync_all()?;
        std::fs::rename(&partial, &path)
    })();
    if let Err(error) = made {
        let _ = std::fs::remove_file(&partial);
        return Err(error);
    }
    tracing::info!(bytes = RESERVE_BYTES, "disk reserve in place");
    Ok(true)
}

/// Gives the reserve up so that a write can use its space. Returns whether there was one.
pub fn release_reserve(home_dir: &Path) -> bool {
    let released = std::fs::remove_file(reserve_path(home_dir)).is_ok();
    if released {
        tracing::error!(
            bytes = RESERVE_BYTES,
            "the disk is full: gave up the disk reserve so that views and their audit continue; free space on the disk (ingest waits meanwhile)"
        );
    }
    released
}

/// Runs `write`; if it fails because the disk is full (as `is_full` reads its error: see
/// [`crate::is_disk_full`]), gives up the reserve and runs it once more. For the writes a
/// view cannot do without: its audit record and its session.
pub fn write_even_when_full<T, E>(
    home_dir: &Path,
    is_full: impl Fn(&E) -> bool,
    mut write: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    match write() {
        Err(error) if is_full(&error) && release_reserve(home_dir) => write(),
        outcome => outcome,
    }
}

/// Why the disk cannot take ingest now, if it cannot.
pub fn ingest_blocked(home_dir: &Path) -> Option<String> {
    let free = free_bytes(home_dir).ok()?;
    (free < LOW_SPACE_BYTES).then(|| {
        format!(
            "the disk holding the node home has {} free, under the {} ingest needs",
            human(free),
            human(LOW_SPACE_BYTES)
        )
    })
}

/// What `/health`, `caremesh status` and /metrics say of the disk.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DiskStatus {
    pub free_bytes: u64,
    /// Whether the reserve that keeps views and their audit going on a full disk is in place.
    pub reserve_held: bool,
    /// What is wrong, if anything: low or full.
    pub problem: Option<String>,
}

pub fn status(home_dir: &Path) -> DiskStatus {
    let free = free_bytes(home_dir).unwrap_or(0);
    let reserve_held = reserve_held(home_dir);
    let problem = if !reserve_held && free < RESERVE_BYTES + LOW_SPACE_BYTES {
        Some(format!(
            "disk full: {} free and the disk reserve is given up; views and their audit continue for now, ingest waits; free space on the disk",
            human(free)
        ))
    } else {
        ingest_blocked(home_dir)
    };
    DiskStatus {
        free_bytes: free,
        reserve_held,
        problem,
    }
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_recognised_through_the_layers_that_carry_it() {
        use crate::{DatabaseError, DatabaseFailure, StorageError, is_disk_full};
        let full = StorageError::Database {
            path: "node.db".into(),
            action: "commit",
            source: DatabaseError::new(DatabaseFailure::DiskFull, "database or disk is full"),
        };
        assert!(is_disk_full(&full));
        // As a transparent error wrapper hands it on: the database error alone.
        let alone = DatabaseError::new(DatabaseFailure::DiskFull, "database or disk is full");
        assert!(is_disk_full(&alone));
        let enospc = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert!(is_disk_full(&enospc));
        let other = std::io::Error::from_raw_os_error(libc::EACCES);
        assert!(!is_disk_full(&other));
    }

    #[test]
    fn the_reserve_is_made_written_private_and_given_up() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        assert!(ensure_reserve(dir.path()).unwrap());
        let metadata = std::fs::metadata(dir.path().join(RESERVE_FILE)).unwrap();
        assert_eq!(metadata.len(), RESERVE_BYTES);
        assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
        assert!(release_reserve(dir.path()));
        assert!(!reserve_held(dir.path()));
        assert!(!release_reserve(dir.path()), "nothing left to give up");
    }
}
