//! `caremesh quarantine list|show|release`: the operator reads what ingest rejected and why,
//! and ingests a quarantined file again once its cause is fixed (the patient it names now
//! ingested, the patient index completed). Quarantined files hold patient data: reading one
//! and releasing one are recorded in the audit trail as the operator's.

use crate::audit;
use crate::home::Home;
use anyhow::{Context, Result, bail};
use caremesh_storage::Store;
use caremesh_storage::at_rest::DataKeys;
use caremesh_storage::audit::AuditEvent;
use caremesh_storage::sealed;
use clap::Subcommand;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// What ingest writes beside each quarantined file.
const REASON_SUFFIX: &str = ".reason.txt";
/// The most of a quarantined file `show` prints: the limit ingest puts on one JSON
/// document. (An NDJSON file over it is for `release`, not for reading on a terminal.)
const MAX_SHOWN_BYTES: u64 = caremesh_ingest::MAX_JSON_FILE_BYTES;

#[derive(Subcommand)]
pub enum QuarantineCommand {
    /// List the quarantined files: name, size, when, and the first problem found.
    List {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Print why a file was quarantined, then the file (audited as the operator's reading).
    Show {
        #[arg(long)]
        dir: PathBuf,
        /// The file's name in quarantine/, as `list` prints it.
        name: String,
    },
    /// Ingest a quarantined file again: into the record (and processed/) if it now goes in
    /// whole, else back to quarantine/ with the new reasons.
    Release {
        #[arg(long)]
        dir: PathBuf,
        /// The file's name in quarantine/, as `list` prints it.
        name: String,
        /// CSV identifier_system,identifier_value,nhs_number for patients without NHS numbers.
        #[arg(long)]
        patient_index: Option<PathBuf>,
    },
}

/// One quarantined file as `list` shows it.
#[derive(Debug, Serialize)]
pub struct Quarantined {
    pub name: String,
    pub bytes: u64,
    /// When it was quarantined (the file's modification time), RFC 3339 UTC.
    pub quarantined_at: Option<String>,
    /// The problems its reason lists.
    pub problems: usize,
    pub first_problem: Option<String>,
}

/// The quarantined files, oldest first.
pub fn list(home: &Home) -> Result<Vec<Quarantined>> {
    let folder = home.quarantine_dir();
    let data_keys = home.data_keys()?;
    let mut found = Vec::new();
    let entries =
        std::fs::read_dir(&folder).with_context(|| format!("reading {}", folder.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", folder.display()))?;
        let name = entry.file_name().to_string_lossy().to_string();
        let metadata = entry.metadata()?;
        // Only regular files (a link is never followed) that are not reasons, nor hidden (a
        // file being written).
        if name.ends_with(REASON_SUFFIX) || name.starts_with('.') || !entry.file_type()?.is_file() {
            continue;
        }
        let problems = problems(data_keys.as_ref(), &reason_path(&entry.path()));
        found.push((
            metadata.modified().ok(),
            Quarantined {
                bytes: metadata.len(),
                quarantined_at: metadata.modified().ok().map(rfc3339),
                problems: problems.len(),
                first_problem: problems.into_iter().next(),
                name,
            },
        ));
    }
    found.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name.cmp(&b.1.name)));
    Ok(found.into_iter().map(|(_, file)| file).collect())
}

pub fn print_list(files: &[Quarantined], json: bool, out: &mut String) -> Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(files)?)?;
        return Ok(());
    }
    if files.is_empty() {
        writeln!(out, "quarantine/ is empty")?;
        return Ok(());
    }
    for file in files {
        writeln!(
            out,
            "{}\t{} bytes\t{}\t{} problem(s): {}",
            file.name,
            file.bytes,
            file.quarantined_at.as_deref().unwrap_or("-"),
            file.problems,
            file.first_problem
                .as_deref()
                .unwrap_or("(no reason recorded)")
        )?;
    }
    Ok(())
}

/// The quarantined file called `name`: a plain name of a regular file in quarantine/, never
/// a path out of it, a link, or a reason.
pub fn quarantined_file(home: &Home, name: &str) -> Result<PathBuf> {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
        && !name.starts_with('.')
        && !name.ends_with(REASON_SUFFIX);
    if !plain {
        bail!(
            "{name:?} is not the name of a quarantined file: give a name as `caremesh quarantine list` prints it"
        );
    }
    let path = home.quarantine_dir().join(name);
    let metadata = std::fs::symlink_metadata(&path).map_err(|_| {
        anyhow::anyhow!(
            "quarantine/ holds no file called {name:?}: `caremesh quarantine list` names those it holds"
        )
    })?;
    if !metadata.is_file() {
        bail!(
            "quarantine/{name} is not a regular file; caremesh only reads the files it put there"
        );
    }
    Ok(path)
}

/// Prints the reason and then the file, recorded as `operator`'s reading of it.
pub fn show(
    home: &Home,
    store: &mut Store,
    operator: &str,
    name: &str,
    out: &mut String,
) -> Result<u8> {
    let path = quarantined_file(home, name)?;
    let data_keys = home.data_keys()?;
    let content = sealed::read_kept(data_keys.as_ref(), &path, MAX_SHOWN_BYTES)?;
    record(home, store, operator, "quarantine-read", name)?;
    match reason_text(data_keys.as_ref(), &reason_path(&path)) {
        Some(reason) => out.push_str(&reason),
        None => writeln!(out, "(no reason was recorded beside this file)")?,
    }
    writeln!(out, "\n--- quarantine/{name} ({} bytes) ---", content.len())?;
    out.push_str(&String::from_utf8_lossy(&content));
    if !content.ends_with(b"\n") {
        out.push('\n');
    }
    Ok(0)
}

/// After `caremesh quarantine release` ingested the file: its old reason goes with it, as the
/// ingest moved the file (to processed/, or back to quarantine/ under a new name with new
/// reasons). Returns what to tell the operator.
pub fn after_release(path: &Path) -> Result<Option<String>> {
    if path.exists() {
        // Not moved: the ingest stopped before it was read (a full disk, say); it stays.
        return Ok(Some(
            "the file was not ingested and stays in quarantine/ with its reason".into(),
        ));
    }
    let reason = reason_path(path);
    match std::fs::remove_file(&reason) {
        Ok(()) => Ok(None),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error).with_context(|| format!("removing {}", reason.display())),
    }
}

pub fn record(
    home: &Home,
    store: &mut Store,
    operator: &str,
    action: &str,
    name: &str,
) -> Result<()> {
    store.append_audit(&AuditEvent {
        detail: format!("quarantine/{name}"),
        ..audit::operator_event(home, operator, action, "ingest")
    })?;
    Ok(())
}

fn reason_path(path: &Path) -> PathBuf {
    let mut reason = path.as_os_str().to_owned();
    reason.push(REASON_SUFFIX);
    PathBuf::from(reason)
}

/// The text of a reason file, sealed or plain; none if it is missing or unreadable.
fn reason_text(data_keys: Option<&DataKeys>, reason: &Path) -> Option<String> {
    let bytes = sealed::read_kept(data_keys, reason, MAX_SHOWN_BYTES).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// The problems a reason file lists (its `- ` lines).
fn problems(data_keys: Option<&DataKeys>, reason: &Path) -> Vec<String> {
    reason_text(data_keys, reason)
        .map(|text| {
            text.lines()
                .filter_map(|line| line.strip_prefix("- "))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn rfc3339(time: std::time::SystemTime) -> String {
    let unix = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
        });
    caremesh_fhir::clock::rfc3339(unix)
}
