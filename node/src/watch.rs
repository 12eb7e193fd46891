//! The drop folder: extracts are ingested as they arrive, never while still being written.
//!
//! A file is taken when the kernel says its writer closed it (inotify close-after-write) or
//! when it is renamed into the folder, the two ways a complete file appears. Files already
//! there at start, or whose events were missed, are taken by a periodic scan once their size
//! and modification time have been unchanged for [`SETTLE`]. Hidden files (`.name`) and
//! names not ending .json/.ndjson/.jsonl are left alone, so writers may write `.x.tmp` and
//! rename. Only regular files directly in the folder are taken: a symbolic link is never
//! followed (it could lead anywhere, the node's own keys included) and a directory is never
//! entered. What is left in place for those reasons is logged by count and listed by
//! `caremesh status` (`caremesh_ingest::drop_folder::survey`).

use crate::home::Home;
use crate::network::StoreWriter;
use caremesh_fhir::clock;
use caremesh_ingest::drop_folder::{LeftInPlace, survey};
use caremesh_ingest::{FileDisposition, Ingestor, is_extract_file};
use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

pub const SETTLE: Duration = Duration::from_secs(3);
const SCAN_EVERY: Duration = Duration::from_secs(1);

/// Watches the drop folder until `stop` is set, ingesting each complete file.
/// Why the drop folder is paused, if it is: shared with the view's `/health`.
pub type Paused = std::sync::Arc<std::sync::Mutex<Option<String>>>;

pub fn watch_drop_folder(
    dir: &Path,
    writer: &StoreWriter,
    stop: &AtomicBool,
    paused: &Paused,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let home = Home::open(dir)?;
    // A writer opening a file during the instant a read lease is held sends the holder
    // SIGIO, whose default is to end the process ([`is_open_for_writing`]).
    // SAFETY: sets the disposition of one signal the node does not otherwise use.
    unsafe {
        libc::signal(libc::SIGIO, libc::SIG_IGN);
    }
    let drop_dir = home.drop_dir();
    std::fs::create_dir_all(&drop_dir)
        .with_context(|| format!("making the drop folder {}", drop_dir.display()))?;
    let (events_tx, events) = mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |event| {
        let _ = events_tx.send(event);
    })
    .context("starting to watch for files")?;
    watcher
        .watch(&drop_dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching the drop folder {}", drop_dir.display()))?;
    tracing::info!(folder = %drop_dir.display(), "watching drop folder");
    let mut settling: HashMap<PathBuf, (u64, SystemTime, Instant)> = HashMap::new();
    // Files whose ingest failed (a busy database, a full disk). Files arriving after them
    // wait with them, so that a file is never ingested ahead of one dropped before it (a
    // condition ahead of the Patient it names would be quarantined for naming no patient).
    let mut held_back: Vec<PathBuf> = Vec::new();
    // Complete files waiting for an older one a scan found still settling (see
    // `waits_for_an_older_file`).
    let mut waiting: Vec<PathBuf> = Vec::new();
    let mut retry_at = Instant::now();
    let mut left_in_place: Vec<LeftInPlace> = Vec::new();
    let mut blocked: Option<String> = None;
    let mut next_scan = Instant::now();
    let mut next_sweep = Instant::now();
    // A hold on publishing (a restored node's) to watch until it is released.
    let mut hold_to_watch = true;
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() >= next_sweep {
            next_sweep = Instant::now() + crate::retention::SWEEP_EVERY;
            let swept = home.clone();
            if let Err(error) = writer.write_blocking(move |store| {
                Ok(crate::retention::sweep_processed(
                    &swept,
                    store,
                    clock::now_unix(),
                )?)
            }) {
                tracing::warn!(error = %format!("{error:#}"), "could not look for processed files past their time");
            }
        }
        let mut ready = Vec::new();
        match events.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(event)) => {
                if is_complete_signal(&event.kind) {
                    ready.extend(event.paths.into_iter().filter(|p| is_takeable(p)));
                }
            }
            Ok(Err(error)) => tracing::warn!(%error, "drop folder watch error; relying on scans"),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if Instant::now() >= next_scan {
            next_scan = Instant::now() + SCAN_EVERY;
            if hold_to_watch {
                hold_to_watch = publish_after_hold(&home, writer);
            }
            put_back_reserve(&home);
            ready.extend(settled_files(&drop_dir, &mut settling));
            let left = survey(&drop_dir).left_in_place;
            if left != left_in_place {
                if !left.is_empty() {
                    // Counts only: names may carry identifiers; `caremesh status` lists them.
                    tracing::warn!(
                        entries = left.len(),
                        reasons = %reason_counts(&left),
                        "drop folder holds entries that are not taken; `caremesh status` lists them"
                    );
                }
                left_in_place = left;
            }
        }
        ready.append(&mut waiting);
        for path in &ready {
            settling.remove(path);
        }
        (waiting, ready) = ready
            .into_iter()
            .partition(|path| waits_for_an_older_file(path, &settling));
        if !held_back.is_empty() {
            held_back.append(&mut ready);
            if Instant::now() < retry_at {
                continue;
            }
            ready = std::mem::take(&mut held_back);
        }
        ready.sort();
        ready.dedup();
        ready.retain(|p| is_takeable(p));
        if ready.is_empty() {
            continue;
        }
        // A file is taken only if it can be put away after: ingesting one that cannot be
        // moved would ingest it again on every scan.
        let usable = outlets_usable(&home)
            .and_then(|()| publishing_not_held(writer))
            .and_then(|()| match crate::disk::ingest_blocked(&home.dir) {
                Some(reason) => Err(format!(
                    "{reason}; files wait in drop/ until space is freed"
                )),
                None => {
                    // Space is back (or never went): the reserve is put back before ingest uses it.
                    put_back_reserve(&home);
                    Ok(())
                }
            });
        *paused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = usable.clone().err();
        match usable {
            Ok(()) => blocked = None,
            Err(reason) => {
                if blocked.as_ref() != Some(&reason) {
                    tracing::error!(%reason, "drop folder paused: files wait in drop/ until this is fixed");
                    blocked = Some(reason);
                }
                held_back.append(&mut ready);
                retry_at = Instant::now() + SCAN_EVERY;
                continue;
            }
        }
        if let Err(error) = ingest_ready(&home, writer, &ready) {
            // The files stay in the folder (nothing was moved or half-written: each file is
            // one transaction) and are retried together, with whatever arrives meanwhile. A
            // busy or briefly unavailable database must not stop the drop folder for good.
            tracing::error!(error = %format!("{error:#}"), "drop folder ingest failed; retrying in a moment");
            if crate::disk::is_disk_full_anyhow(&error) {
                *paused
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(
                    "the disk holding the node home is full; files wait in drop/ until space is freed"
                        .into(),
                );
            }
            held_back = ready;
            retry_at = Instant::now() + SCAN_EVERY;
        }
    }
    Ok(())
}

/// Makes the disk reserve again once there is room for it (see `disk.rs`).
fn put_back_reserve(home: &Home) {
    if let Err(error) = crate::disk::ensure_reserve(&home.dir) {
        tracing::warn!(%error, "could not make the disk reserve");
    }
}

fn is_complete_signal(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(RenameMode::To))
            | EventKind::Modify(ModifyKind::Name(RenameMode::Both))
    )
}

/// Whether processed/ and quarantine/ can take files: each a directory the node can write
/// to (made if missing), shown by writing and removing a probe file.
pub fn outlets_usable(home: &Home) -> Result<(), String> {
    for folder in [home.processed_dir(), home.quarantine_dir()] {
        if !folder.exists() {
            std::fs::create_dir_all(&folder)
                .map_err(|e| format!("{} is missing and cannot be made: {e}", folder.display()))?;
        }
        let probe = folder.join(".caremesh-probe");
        std::fs::write(&probe, b"")
            .and_then(|()| std::fs::remove_file(&probe))
            .map_err(|e| {
                format!(
                    "{} cannot take files ({e}); make it a directory the node's account can write to",
                    folder.display()
                )
            })?;
    }
    Ok(())
}

/// A regular file (not a link to one) with an extract's name, that nobody has open for
/// writing: the only thing taken.
fn is_takeable(path: &Path) -> bool {
    is_extract_file(path)
        && std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file())
        && !is_open_for_writing(path)
}

/// Whether some process has `path` open for writing: a writer that paused past the settle
/// time is still writing, and a file taken then would lose what it writes next (into the
/// file moved to processed/). Linux grants a read lease only on a file no one has open for
/// writing; where a lease cannot be asked for (another user's file, without CAP_LEASE),
/// the settle time is all there is to go on.
fn is_open_for_writing(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor this function owns; the lease is released before the
    // file is closed.
    unsafe {
        if libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) == 0 {
            libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK);
            false
        } else {
            std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN)
        }
    }
}

fn reason_counts(left: &[LeftInPlace]) -> String {
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for entry in left {
        *counts
            .entry(entry.reason.split(':').next().unwrap_or(""))
            .or_default() += 1;
    }
    counts
        .iter()
        .map(|(reason, count)| format!("{count} {reason}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether `path` (complete) must wait for a file dropped before it that is still settling: one
/// renamed in before the watch began, or whose event was missed, is found only by a scan and
/// taken a few seconds later, and a file taken ahead of it alone could name a patient it
/// holds (and be quarantined for naming none). Taken together, their order does not matter.
fn waits_for_an_older_file(
    path: &Path,
    settling: &HashMap<PathBuf, (u64, SystemTime, Instant)>,
) -> bool {
    let Ok(modified) = std::fs::symlink_metadata(path).and_then(|m| m.modified()) else {
        return false;
    };
    settling
        .iter()
        .any(|(other, (_, other_modified, _))| other != path && *other_modified <= modified)
}

fn settled_files(
    drop_dir: &Path,
    settling: &mut HashMap<PathBuf, (u64, SystemTime, Instant)>,
) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(drop_dir) else {
        return Vec::new();
    };
    let mut ready = Vec::new();
    let mut present = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if !is_extract_file(&path) {
            continue;
        }
        // Not followed: a link's own metadata, and only regular files are taken.
        let Ok(metadata) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !metadata.file_type().is_file() || is_open_for_writing(&path) {
            continue;
        }
        present.push(path.clone());
        let signature = (
            metadata.len(),
            metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        );
        match settling.get(&path) {
            Some((len, modified, since))
                if (*len, *modified) == signature && since.elapsed() >= SETTLE =>
            {
                ready.push(path);
            }
            Some((len, modified, _)) if (*len, *modified) == signature => {}
            _ => {
                settling.insert(path, (signature.0, signature.1, Instant::now()));
            }
        }
    }
    settling.retain(|path, _| present.contains(path));
    ready
}

/// Whether ingest may publish: not while a restored node has not yet taken back its own
/// documents from its peers (`caremesh_storage::publishing_hold`).
fn publishing_not_held(writer: &StoreWriter) -> Result<(), String> {
    let hold = writer
        .write_blocking(|store| Ok(store.publishing_hold()?))
        .map_err(|error| format!("could not read the hold on publishing: {error:#}"))?;
    match hold {
        Some(hold) if hold.held => Err(format!(
            "publishing is held ({}) until this node has caught up with each of its peers; files wait in drop/",
            hold.reason
        )),
        _ => Ok(()),
    }
}

/// Publishes what a released hold on publishing deferred. Returns whether there is still a
/// hold to watch.
fn publish_after_hold(home: &Home, writer: &StoreWriter) -> bool {
    let key = match home.signing_key() {
        Ok(key) => key,
        Err(error) => {
            tracing::error!(%error, "could not read the signing key to publish after a hold");
            return true;
        }
    };
    let outcome = writer.write_blocking(move |store| {
        let held = store.publishing_hold()?;
        let written = caremesh_storage::publish::publish_after_hold(store, &key)?;
        Ok((held, written))
    });
    match outcome {
        Ok((None, _)) => false,
        Ok((Some(hold), _)) if hold.held => true,
        Ok((Some(_), written)) => {
            tracing::info!(
                documents_written = written,
                "published the access records recorded while publishing was held"
            );
            false
        }
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "could not publish the access records recorded while publishing was held; tried again shortly");
            true
        }
    }
}

/// Ingests `files` on the engine thread, the store's one writer.
fn ingest_ready(home: &Home, writer: &StoreWriter, files: &[PathBuf]) -> anyhow::Result<()> {
    // Read here (the key, the registry, the sensitive codes), not on the engine thread.
    let (settings, files) = (home.ingest_settings()?, files.to_vec());
    let home_for_sweep = home.clone();
    let between_commits = writer.between_commits();
    let report = writer.write_blocking(move |store| {
        let mut ingestor = Ingestor::new(
            &settings,
            store,
            None,
            FileDisposition::Move,
            clock::now_unix(),
        )?
        .pausing_between_commits(between_commits);
        let report = ingestor.ingest_paths(&files).map_err(|stopped| {
            // Counts only, as below: what went in before the stop stays in (and was moved
            // away).
            tracing::warn!(
                files_in = stopped.done.len(),
                "drop folder ingest stopped part way; the files before the stop went in"
            );
            anyhow::Error::from(stopped.error)
        })?;
        drop(ingestor);
        crate::retention::sweep_processed(&home_for_sweep, store, clock::now_unix())?;
        Ok(report)
    })?;
    // Counts only: file names and reasons may carry identifiers, and go to quarantine instead.
    tracing::info!(
        files = report.files,
        accepted = report.files_accepted,
        rejected = report.files_rejected,
        resources = report.resources_read(),
        documents_written = report.documents_written,
        "ingested from drop folder"
    );
    if report.files_rejected > 0 {
        tracing::warn!(
            rejected = report.files_rejected,
            "files quarantined; `caremesh quarantine list` says why"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found in CI: a Patient renamed into the folder just before the watch began was left to
    /// a scan, and the allergy renamed in just after it was taken at once, alone, and
    /// quarantined for naming a patient not yet known.
    #[test]
    fn a_complete_file_waits_for_an_older_one_still_settling_and_never_for_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let older = dir.path().join("Patient.json");
        let newer = dir.path().join("AllergyIntolerance.json");
        std::fs::write(&older, "{}").unwrap();
        std::fs::write(&newer, "{}").unwrap();
        let at = |seconds| SystemTime::UNIX_EPOCH + Duration::from_secs(seconds);
        let set_modified = |path: &Path, time| {
            std::fs::File::options()
                .write(true)
                .open(path)
                .unwrap()
                .set_modified(time)
                .unwrap();
        };
        set_modified(&older, at(1_000));
        set_modified(&newer, at(1_001));
        let settling_with = |path: &Path, seconds| {
            HashMap::from([(path.to_path_buf(), (2, at(seconds), Instant::now()))])
        };
        assert!(waits_for_an_older_file(
            &newer,
            &settling_with(&older, 1_000)
        ));
        assert!(!waits_for_an_older_file(
            &older,
            &settling_with(&newer, 1_001)
        ));
        assert!(
            !waits_for_an_older_file(&newer, &settling_with(&newer, 1_001)),
            "never for itself"
        );
        assert!(!waits_for_an_older_file(&newer, &HashMap::new()));
    }
}
