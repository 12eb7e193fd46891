//! How long raw extracts stay in processed/: `[ingest] keep_processed_days`. A file that went
//! in whole holds nothing the record does not (the record holds what it gave, signed), but it
//! holds it in plain text for anyone who has the disk, so it is kept only as long as it is
//! useful: to ingest again after a crash that cut the database's write-ahead log, which
//! `caremesh verify` finds at the next start.
//!
//! Only files the ingest log says it kept, under processed/, older than the setting are
//! removed. A file the log does not name is never removed: it is the evidence that the
//! database lost an ingest (`verify::unrecorded_files`). Quarantined files stay until the
//! operator releases them (`caremesh quarantine`).

use crate::home::Home;
use caremesh_storage::{StorageError, Store};
use std::path::PathBuf;
use std::time::Duration;

/// How often a running node looks for files past their time, besides after each ingest.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60 * 60);

/// Removes the files in processed/ whose ingest is older than the home's
/// `keep_processed_days` at `now` (unix seconds; with 0 days, every ingest up to now).
/// Returns how many it removed.
pub fn sweep_processed(home: &Home, store: &Store, now: i64) -> Result<usize, StorageError> {
    let keep = i64::from(home.config.ingest.keep_processed_days) * 24 * 60 * 60;
    let mut removed = 0;
    for kept_as in store.kept_in_processed_at_or_before(now - keep)? {
        let Some(path) = processed_file(home, &kept_as) else {
            continue;
        };
        match std::fs::symlink_metadata(&path) {
            Ok(metadata) if metadata.is_file() => {}
            _ => continue,
        }
        match std::fs::remove_file(&path) {
            Ok(()) => removed += 1,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            // The next sweep tries again; the file is still the operator's to see.
            Err(error) => tracing::warn!(%error, "could not remove a processed file past its time"),
        }
    }
    if removed > 0 {
        tracing::info!(
            removed,
            days = home.config.ingest.keep_processed_days,
            "removed processed files past their time"
        );
    }
    Ok(removed)
}

/// `processed/NAME` as the ingest log keeps it, in this home: a plain name, never a path
/// out of the folder.
fn processed_file(home: &Home, kept_as: &str) -> Option<PathBuf> {
    let name = kept_as.strip_prefix("processed/")?;
    let plain = !name.is_empty() && name != "." && name != ".." && !name.contains('/');
    plain.then(|| home.processed_dir().join(name))
}
