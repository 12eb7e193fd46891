//! Ingest: FHIR R4 JSON files (single resources, Bundles, NDJSON) into signed documents.
//!
//! Guarantees:
//! * Each JSON file is one storage transaction; an NDJSON file is committed in chunks of
//!   [`NDJSON_CHUNK_LINES`] lines, so memory stays bounded whatever the file size.
//! * When `ingest` reports a file done, its transaction has committed (WAL, synchronous=FULL).
//! * Nothing is dropped silently: every resource read ends in exactly one outcome, and the
//!   report reconciles resources in with outcomes out. Rejected files go to quarantine with
//!   a `.reason.txt` naming each problem and where it is.

pub mod drop_folder;
pub mod patient_index;

use crate::patient_index::PatientIndex;
use caremesh_fhir as fhir;
use caremesh_fhir::clock;
use caremesh_fhir::{
    CodeableConcept, MappingContext, NHS_NUMBER_SYSTEM, PatientRef, ReferenceLookup, Resource,
    SensitiveCodes,
};
use caremesh_storage::at_rest::{DataKey, DataKeys};
use caremesh_storage::audit::AuditEvent;
use caremesh_storage::publish::{Publication, PublishError};
use caremesh_storage::sealed::{self, SealError};
use caremesh_storage::{IngestRow, Placement, SourceRow, StorageError, Store, WriteBatch};
use caremesh_sync::policy::{Agreements, Consent};
use caremesh_sync::{DataClass, Item, NhsNumber, OdsCode, OrgKind, PublisherKey, Section, moved};
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

/// A single JSON document larger than this is refused: send it as NDJSON instead.
pub const MAX_JSON_FILE_BYTES: u64 = 128 * 1024 * 1024;
/// One NDJSON line (one resource) larger than this is refused.
pub const MAX_NDJSON_LINE_BYTES: usize = 16 * 1024 * 1024;
/// One resource larger than this (as JSON) is refused. A patient's documents sync as
/// frames of at most 16 MiB; a resource near that size would be stored here and never reach
/// anyone. Clinical resources are kilobytes; a document's content belongs in its own
/// system, named by a DocumentReference, not inlined.
pub const MAX_RESOURCE_BYTES: usize = 1024 * 1024;
/// NDJSON lines committed per transaction.
pub const NDJSON_CHUNK_LINES: usize = 2_000;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(transparent)]
    PatientIndex(#[from] patient_index::PatientIndexError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file the node kept sealed, released from quarantine/, that does not open.
    #[error(transparent)]
    Sealed(#[from] SealError),
}

/// An ingest that stopped part way: what went in before `file` (each file is one
/// transaction, so each listed file went in whole) and why `file` did not.
#[derive(Debug)]
pub struct Stopped {
    pub committed: Box<IngestReport>,
    /// Files that went in before the stop, in order.
    pub done: Vec<PathBuf>,
    pub file: PathBuf,
    pub error: IngestError,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ingest stopped at {}: {}. Nothing of that file went in",
            self.file.display(),
            self.error
        )?;
        if caremesh_storage::is_disk_full(&self.error) {
            write!(
                f,
                "; the disk is full: free space, then ingest it and the files after it again"
            )?;
        }
        match self.done.len() {
            0 => write!(f, "; no file before it went in"),
            n => write!(
                f,
                "; the {n} file(s) before it went in whole (listed above)"
            ),
        }
    }
}

impl std::error::Error for Stopped {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IngestError + '_ {
    move |source| IngestError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Rejection {
    pub file: String,
    /// Where in the file: `entry 3`, `line 17`, or empty for the whole file.
    pub location: String,
    pub reason: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.location.is_empty() {
            write!(f, "{}: {}", self.file, self.reason)
        } else {
            write!(f, "{} ({}): {}", self.file, self.location, self.reason)
        }
    }
}

/// What one ingest did. Every resource read is counted once in `resources` and once in
/// exactly one outcome: accepted, retracted, stale, unsupported or rejected.
#[derive(Debug, Default, Clone, Serialize)]
pub struct IngestReport {
    pub files: usize,
    pub files_accepted: usize,
    pub files_rejected: usize,
    pub resources: BTreeMap<String, usize>,
    /// Bundles by type: containers whose entries are counted as resources of their own.
    pub containers: BTreeMap<String, usize>,
    pub accepted: usize,
    pub retracted: usize,
    /// Resources re-sent under another patient: moved, and their old copies retracted.
    pub moved: usize,
    /// Patients re-sent with another NHS number, whose resources moved with them.
    pub relinked: usize,
    pub stale: usize,
    pub unsupported: BTreeMap<String, usize>,
    pub rejected: Vec<Rejection>,
    pub items_by_section: BTreeMap<String, usize>,
    pub patients: usize,
    pub documents_written: usize,
    pub quarantined: Vec<PathBuf>,
}

impl IngestReport {
    pub fn resources_read(&self) -> usize {
        self.resources.values().sum()
    }

    pub fn resources_accounted(&self) -> usize {
        self.containers.values().sum::<usize>()
            + self.accepted
            + self.retracted
            + self.stale
            + self.unsupported.values().sum::<usize>()
            + self
                .rejected
                .iter()
                .filter(|r| r.location != "file")
                .count()
    }

    /// Counts one resource (or would-be resource) read. Every call must be matched by one
    /// outcome, which is what makes the report reconcile.
    fn count_read(&mut self, kind: &str) {
        *self.resources.entry(kind.to_string()).or_default() += 1;
    }

    /// Something read that caremesh does not take, counted as read and as unsupported.
    fn count_unsupported(&mut self, read_as: &str, unsupported_as: &str) {
        self.count_read(read_as);
        *self
            .unsupported
            .entry(unsupported_as.to_string())
            .or_default() += 1;
    }

    /// A line that could not be read as a resource: counted as read, and rejected, so that
    /// the counts still reconcile.
    fn reject_unreadable(&mut self, file: &str, location: String, reason: String) {
        self.count_read("(unreadable line)");
        self.rejected.push(Rejection {
            file: file.to_string(),
            location,
            reason,
        });
    }

    fn merge(&mut self, other: IngestReport) {
        self.files += other.files;
        self.files_accepted += other.files_accepted;
        self.files_rejected += other.files_rejected;
        for (k, v) in other.resources {
            *self.resources.entry(k).or_default() += v;
        }
        for (k, v) in other.containers {
            *self.containers.entry(k).or_default() += v;
        }
        self.accepted += other.accepted;
        self.retracted += other.retracted;
        self.moved += other.moved;
        self.relinked += other.relinked;
        self.stale += other.stale;
        for (k, v) in other.unsupported {
            *self.unsupported.entry(k).or_default() += v;
        }
        self.rejected.extend(other.rejected);
        for (k, v) in other.items_by_section {
            *self.items_by_section.entry(k).or_default() += v;
        }
        self.patients += other.patients;
        self.documents_written += other.documents_written;
        self.quarantined.extend(other.quarantined);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let line = |out: &mut String, text: String| {
            out.push_str(&text);
            out.push('\n');
        };
        line(
            &mut out,
            format!(
                "files: {} ({} accepted, {} rejected)",
                self.files, self.files_accepted, self.files_rejected
            ),
        );
        line(
            &mut out,
            format!("resources read: {}", self.resources_read()),
        );
        for (kind, count) in &self.resources {
            line(&mut out, format!("  {kind:<24} {count}"));
        }
        line(&mut out, format!("patients: {}", self.patients));
        line(&mut out, "items by section:".into());
        for (section, count) in &self.items_by_section {
            line(&mut out, format!("  {section:<24} {count}"));
        }
        line(
            &mut out,
            format!(
                "accepted: {}  retracted (entered in error): {}  older versions ignored: {}",
                self.accepted, self.retracted, self.stale
            ),
        );
        if self.moved + self.relinked > 0 {
            line(
                &mut out,
                format!(
                    "moved to another patient: {}  patients relinked to another NHS number: {}  (each recorded in the audit trail of both patients)",
                    self.moved, self.relinked
                ),
            );
        }
        let unsupported: usize = self.unsupported.values().sum();
        line(&mut out, format!("unsupported: {unsupported}"));
        for (kind, count) in &self.unsupported {
            line(&mut out, format!("  {kind:<24} {count}"));
        }
        line(&mut out, format!("rejected: {}", self.rejected.len()));
        for rejection in &self.rejected {
            line(&mut out, format!("  {rejection}"));
        }
        line(
            &mut out,
            format!("documents written: {}", self.documents_written),
        );
        for path in &self.quarantined {
            line(&mut out, format!("quarantined: {}", path.display()));
        }
        let reconciled = self.resources_read() == self.resources_accounted();
        line(
            &mut out,
            format!(
                "reconciled: {} resources read, {} accounted for{}",
                self.resources_read(),
                self.resources_accounted(),
                if reconciled { "" } else { "  ** MISMATCH **" }
            ),
        );
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileDisposition {
    /// Files given on the command line stay where they are; a copy of a rejected file goes
    /// to quarantine.
    LeaveInPlace,
    /// Files from the drop folder move to processed/ or quarantine/.
    Move,
}

pub struct Ingestor<'a> {
    store: &'a mut Store,
    rules: IngestRules<'a>,
    /// Run between commits (see [`Ingestor::pausing_between_commits`]).
    pause: Option<Pause<'a>>,
}

/// What an ingest runs between its commits.
type Pause<'a> = Box<dyn FnMut(&mut Store) + 'a>;

/// What ingest needs to know of the node it ingests for: its organisation and feed, its key,
/// its sharing rules and where files go. The node makes these from its home.
pub struct IngestSettings {
    pub ods: OdsCode,
    /// The organisation's name as clinicians know it.
    pub name: String,
    pub kind: OrgKind,
    /// The clinical system the extracts come from, recorded as each item's source system.
    pub source_system: String,
    /// "live" or "batch"; a batch feed states how often it is expected to refresh.
    pub feed: String,
    pub expected_refresh_hours: u32,
    /// This organisation's choices for patients without a recorded one.
    pub consent_defaults: Consent,
    /// The region's agreements, for this publisher's share-from date (none without a
    /// registry: nothing is shared then).
    pub agreements: Agreements,
    pub key: PublisherKey,
    pub sensitive: SensitiveCodes,
    /// The configured patient index, if any (an absolute path).
    pub patient_index: Option<PathBuf>,
    /// The node home: the ingest log names moved files relative to it.
    pub home_dir: PathBuf,
    pub processed_dir: PathBuf,
    pub quarantine_dir: PathBuf,
    /// The node's data keys, when its home is encrypted: the files kept in processed/ and
    /// quarantine/ are sealed with the current one (`caremesh_storage::sealed`), and sealed
    /// files (a quarantined one released) are read through either, during a change of key.
    pub data_key: Option<DataKeys>,
}

/// Everything ingest decides with, apart from the store it writes to.
struct IngestRules<'a> {
    settings: &'a IngestSettings,
    index: PatientIndex,
    disposition: FileDisposition,
    now: i64,
}

/// A resource as read from a file, with where it was and the Bundle fullUrl naming it.
struct Located {
    location: String,
    full_url: Option<String>,
    value: Value,
}

/// Outcome of reading and placing one file (or one NDJSON chunk).
enum Attempt {
    Done(Box<IngestReport>),
    /// Some resources name patients not yet known; retry once the rest of the batch is in.
    Deferred,
}

impl<'a> Ingestor<'a> {
    /// An ingest for the node `settings` describe into `store`; `extra_index` is a patient
    /// index given for this ingest, used instead of the configured one.
    pub fn new(
        settings: &'a IngestSettings,
        store: &'a mut Store,
        extra_index: Option<&Path>,
        disposition: FileDisposition,
        now: i64,
    ) -> Result<Self, IngestError> {
        let index = match extra_index.or(settings.patient_index.as_deref()) {
            Some(path) => PatientIndex::load(path)?,
            None => PatientIndex::default(),
        };
        Ok(Ingestor {
            store,
            rules: IngestRules {
                settings,
                index,
                disposition,
                now,
            },
            pause: None,
        })
    }

    /// Runs `pause` with the store after each commit (each file, each NDJSON chunk), when no
    /// transaction is open: a running node makes the writes a clinician waits for there
    /// (access records, sessions), so that a long ingest does not hold them up.
    pub fn pausing_between_commits(mut self, pause: impl FnMut(&mut Store) + 'a) -> Self {
        self.pause = Some(Box::new(pause));
        self
    }

    fn between_commits(&mut self) {
        if let Some(pause) = self.pause.as_mut() {
            pause(self.store);
        }
    }

    /// Ingests files and folders. Folders are walked recursively in name order; files whose
    /// names say they hold Patients go first, and files naming patients not yet known are
    /// retried after the rest, so a folder ingests whatever order its files are in.
    pub fn ingest_paths(&mut self, paths: &[PathBuf]) -> Result<IngestReport, Box<Stopped>> {
        let mut files = Vec::new();
        for path in paths {
            collect_files(path, &mut files).map_err(|error| {
                Box::new(Stopped {
                    committed: Box::default(),
                    done: Vec::new(),
                    file: path.clone(),
                    error,
                })
            })?;
        }
        files.sort_by_key(|f| {
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            (
                !name.starts_with("Patient") && !name.contains("-Patient-"),
                f.clone(),
            )
        });
        let mut report = IngestReport::default();
        let mut done = Vec::new();
        let mut deferred = Vec::new();
        let passes = [(files, false), (Vec::new(), true)];
        for (index, (mut batch, final_attempt)) in passes.into_iter().enumerate() {
            if index == 1 {
                batch = std::mem::take(&mut deferred);
            }
            for file in batch {
                let attempt = self.ingest_file(&file, final_attempt);
                self.between_commits();
                match attempt {
                    Ok(Attempt::Done(file_report)) => {
                        report.merge(*file_report);
                        done.push(file);
                    }
                    Ok(Attempt::Deferred) => {
                        assert!(!final_attempt, "final attempts never defer");
                        deferred.push(file);
                    }
                    Err(error) => {
                        return Err(Box::new(Stopped {
                            committed: Box::new(report),
                            done,
                            file,
                            error,
                        }));
                    }
                }
            }
        }
        Ok(report)
    }

    /// Ingests one file; with `final_attempt` false, a JSON file naming unknown patients is
    /// rolled back and deferred instead of rejected.
    fn ingest_file(&mut self, path: &Path, final_attempt: bool) -> Result<Attempt, IngestError> {
        // What the file was when reading began: a file that changes while it is read was
        // still being written, and is not put away as if all of it went in.
        let before = file_signature(path)?;
        let is_ndjson = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("ndjson") || e.eq_ignore_ascii_case("jsonl"));
        let attempt = if is_ndjson {
            Attempt::Done(Box::new(self.ingest_ndjson(path)?))
        } else {
            self.ingest_json(path, final_attempt)?
        };
        let Attempt::Done(report) = attempt else {
            return Ok(Attempt::Deferred);
        };
        let mut report = *report;
        report.files = 1;
        if file_signature(path)? != before {
            report.rejected.push(Rejection {
                file: path.display().to_string(),
                location: "file".into(),
                reason: "the file changed while it was being read: it was still being written. What was read went in; drop the complete file again (writers should write elsewhere and rename it in) and the rest will follow".into(),
            });
        }
        let rejected = !report.rejected.is_empty();
        if rejected {
            report.files_rejected = 1;
        } else {
            report.files_accepted = 1;
        }
        // Where the file goes is in the ingest log before it moves: `verify` reconciles the
        // two, and a file in processed/ the log does not name is an ingestion the database lost.
        let target = self.rules.disposal(path, &report);
        let kept_as = target.as_ref().map(|target| self.rules.relative(target));
        self.record(path, &report, kept_as)?;
        if let Some(target) = target {
            self.rules.dispose(path, &target, &mut report)?;
        }
        Ok(Attempt::Done(Box::new(report)))
    }

    fn record(
        &mut self,
        path: &Path,
        report: &IngestReport,
        kept_as: Option<String>,
    ) -> Result<(), IngestError> {
        let outcome = match (
            report.rejected.is_empty(),
            report.accepted + report.retracted,
        ) {
            (true, _) => "accepted",
            (false, 0) => "rejected",
            (false, _) => "partly rejected",
        };
        let batch = self.store.write()?;
        batch.record_ingest(&IngestRow {
            at: self.rules.now,
            file: path.display().to_string(),
            outcome: outcome.into(),
            summary: serde_json::json!({
                "resources": report.resources_read(),
                "accepted": report.accepted,
                "retracted": report.retracted,
                "moved": report.moved,
                "relinked": report.relinked,
                "stale": report.stale,
                "unsupported": report.unsupported.values().sum::<usize>(),
                "rejected": report.rejected.len(),
                "documents_written": report.documents_written,
            }),
            kept_as,
        })?;
        batch.commit()?;
        Ok(())
    }

    fn ingest_json(&mut self, path: &Path, final_attempt: bool) -> Result<Attempt, IngestError> {
        let file_name = path.display().to_string();
        let whole_file = |reason: String| {
            let mut report = IngestReport::default();
            report.rejected.push(Rejection {
                file: file_name.clone(),
                location: "file".into(),
                reason,
            });
            Attempt::Done(Box::new(report))
        };
        let size = fs::metadata(path).map_err(io(path))?.len();
        if size > MAX_JSON_FILE_BYTES {
            return Ok(whole_file(format!(
                "file is {size} bytes, over the {MAX_JSON_FILE_BYTES}-byte limit for one JSON document; export it as NDJSON instead"
            )));
        }
        let bytes = sealed::read_kept(self.rules.data_keys(), path, MAX_JSON_FILE_BYTES)?;
        let value: Value = match fhir::strict_json::from_slice(&bytes) {
            Ok(value) => value,
            Err(error) => {
                let hint = if error.is_eof() {
                    " (the file ends early: truncated or still being written)"
                } else {
                    ""
                };
                let what = if error.is_data() {
                    "JSON that can be read two ways"
                } else {
                    "not valid JSON"
                };
                return Ok(whole_file(format!("{what}: {error}{hint}")));
            }
        };
        drop(bytes);
        let mut located = Vec::new();
        let mut report = IngestReport::default();
        if let Err(reason) = flatten(value, String::new(), None, &mut located, &mut report) {
            return Ok(whole_file(reason));
        }
        self.place_resources(&file_name, located, report, final_attempt)
    }

    fn ingest_ndjson(&mut self, path: &Path) -> Result<IngestReport, IngestError> {
        let file_name = path.display().to_string();
        let file = sealed::open_kept(self.rules.data_keys(), path)?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut report = IngestReport::default();
        let mut chunk = Vec::new();
        let mut chunk_report = IngestReport::default();
        let mut line_number = 0usize;
        let mut line = Vec::new();
        loop {
            line.clear();
            let outcome = read_line_limited(&mut reader, &mut line, MAX_NDJSON_LINE_BYTES)
                .map_err(|error| sealed::unwrap_seal_error(path, error))?;
            if outcome == LineRead::End {
                break;
            }
            line_number += 1;
            let location = format!("line {line_number}");
            if outcome == LineRead::TooLong {
                chunk_report.reject_unreadable(
                    &file_name,
                    location,
                    format!("line longer than {MAX_NDJSON_LINE_BYTES} bytes; skipped"),
                );
                continue;
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let read = fhir::strict_json::from_slice(&line)
                .map_err(|error| match error.is_data() {
                    true => format!("JSON that can be read two ways: {error}"),
                    false => format!("not valid JSON: {error}"),
                })
                .and_then(|value| {
                    flatten(value, location.clone(), None, &mut chunk, &mut chunk_report)
                });
            if let Err(reason) = read {
                chunk_report.reject_unreadable(&file_name, location, reason);
            }
            if chunk.len() >= NDJSON_CHUNK_LINES {
                let resources = std::mem::take(&mut chunk);
                let Attempt::Done(done) = self.place_resources(
                    &file_name,
                    resources,
                    std::mem::take(&mut chunk_report),
                    true,
                )?
                else {
                    unreachable!("final attempts never defer")
                };
                report.merge(*done);
                self.between_commits();
            }
        }
        let Attempt::Done(done) = self.place_resources(&file_name, chunk, chunk_report, true)?
        else {
            unreachable!("final attempts never defer")
        };
        report.merge(*done);
        Ok(report)
    }

    /// Maps and places resources in one transaction. `report` already counts what was read
    /// but could not become a resource.
    fn place_resources(
        &mut self,
        file_name: &str,
        located: Vec<Located>,
        report: IngestReport,
        final_attempt: bool,
    ) -> Result<Attempt, IngestError> {
        let mut placing = Placing::new(&self.rules, self.store.write()?, file_name, report);
        // Entries that could be read two ways are refused, each with the reason.
        let ambiguous = ambiguous_entries(&located);
        // Pass 1: what other resources refer to (Patients, Medications, Organizations).
        let mut clinical = Vec::new();
        for (index, entry) in located.into_iter().enumerate() {
            let Some(resource) = placing.screen(&entry, ambiguous.get(&index)) else {
                continue;
            };
            match resource.resource_type {
                "Patient" => placing.place_patient(&resource, &entry)?,
                kind if fhir::REFERENCED_TYPES.contains(&kind) => {
                    placing.keep_referenced(&resource, &entry)?
                }
                _ => clinical.push(entry),
            }
        }
        // Pass 2: clinical resources, placed in their patients' documents.
        for entry in clinical {
            if placing.place_clinical(&entry, final_attempt)? == Step::Defer {
                // Roll back (drop the batch) and retry after the rest of the batch.
                return Ok(Attempt::Deferred);
            }
        }
        Ok(Attempt::Done(Box::new(placing.finish()?)))
    }
}

/// Whether to go on with the file or retry it after the rest of the batch.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Next,
    Defer,
}

/// One transaction of placing a file's resources: the batch, what the file names locally,
/// the publication being built and the report.
struct Placing<'r, 's> {
    rules: &'r IngestRules<'r>,
    batch: WriteBatch<'s>,
    file_name: &'r str,
    source_system: String,
    local: LocalReferences,
    publication: Publication,
    report: IngestReport,
}

impl<'r, 's> Placing<'r, 's> {
    fn new(
        rules: &'r IngestRules<'r>,
        batch: WriteBatch<'s>,
        file_name: &'r str,
        report: IngestReport,
    ) -> Self {
        let settings = rules.settings;
        Placing {
            rules,
            batch,
            file_name,
            source_system: settings.source_system.clone(),
            local: LocalReferences::default(),
            publication: Publication::new(settings.ods.clone(), settings.consent_defaults),
            report,
        }
    }

    fn reject(&mut self, location: &str, reason: String) {
        self.report.rejected.push(Rejection {
            file: self.file_name.to_string(),
            location: location.to_string(),
            reason,
        });
    }

    /// Counts the entry as read and gives it as a resource, unless it is refused before it
    /// is read as one: too large ever to share, ambiguous, or not a resource at all.
    fn screen<'e>(
        &mut self,
        entry: &'e Located,
        ambiguous: Option<&String>,
    ) -> Option<Resource<'e>> {
        let size = json_size(&entry.value);
        let refusal = if size > MAX_RESOURCE_BYTES {
            Some(format!(
                "the resource is about {size} bytes, over the {MAX_RESOURCE_BYTES}-byte limit for one resource: it could never be shared (sync frames are at most 16 MiB); keep large content in its own system and send a DocumentReference to it"
            ))
        } else {
            ambiguous.cloned()
        };
        if let Some(reason) = refusal {
            let kind = entry.value.get("resourceType").and_then(Value::as_str);
            self.report.count_read(kind.unwrap_or("(not a resource)"));
            self.reject(&entry.location, reason);
            return None;
        }
        match Resource::new(&entry.value) {
            Ok(resource) => {
                self.report.count_read(resource.resource_type);
                Some(resource)
            }
            Err(error) => {
                self.report.count_read("(not a resource)");
                self.reject(&entry.location, error.to_string());
                None
            }
        }
    }

    /// A Patient: linked to its NHS number (relinking what it named before), and its
    /// demographics placed, unless an newer version is already held.
    fn place_patient(
        &mut self,
        resource: &Resource<'_>,
        entry: &Located,
    ) -> Result<(), IngestError> {
        let rules = self.rules;
        let context = rules.context(&self.source_system, &self.local);
        let facts = match fhir::map_resource(resource, &context) {
            Ok(fhir::Mapped::Patient(facts)) => facts,
            Ok(_) => unreachable!("a Patient maps to patient facts"),
            Err(error) => {
                self.reject(&entry.location, error.to_string());
                return Ok(());
            }
        };
        let nhs = match rules.resolve_patient_identity(&facts.identifiers) {
            Ok(nhs) => nhs,
            Err(reason) => {
                self.reject(&entry.location, format!("{}: {reason}", facts.key));
                return Ok(());
            }
        };
        let batch = &self.batch;
        if rules.is_stale(batch, &facts.key, facts.item.last_updated.as_deref())? {
            // An older version: references to it in this file mean the patient its newest
            // version names.
            let current = batch.patient_link(&facts.key)?.unwrap_or(nhs);
            self.local
                .name_patient(&facts.key, entry.full_url.as_deref(), current);
            self.report.stale += 1;
            return Ok(());
        }
        let relinked_from = batch.patient_link(&facts.key)?.filter(|old| *old != nhs);
        batch.link_patient(&facts.key, &nhs)?;
        self.local
            .name_patient(&facts.key, entry.full_url.as_deref(), nhs.clone());
        if let Some(old) = relinked_from {
            rules.relink(
                batch,
                &mut self.publication,
                &mut self.report,
                &facts.key,
                &old,
                &nhs,
            )?;
        }
        let family = [facts.item.id.clone()];
        let placement = Placement {
            nhs,
            patient_key: Some(facts.key.clone()),
            moved_at: None,
        };
        rules.place_moving(
            batch,
            &mut self.publication,
            &mut self.report,
            &facts.key,
            placement,
            &family,
            vec![facts.item],
        )?;
        *self
            .report
            .items_by_section
            .entry("demographics".into())
            .or_default() += 1;
        self.report.accepted += 1;
        self.report.patients += 1;
        Ok(())
    }

    /// A resource others refer to (a Medication, an Organization): kept for them.
    fn keep_referenced(
        &mut self,
        resource: &Resource<'_>,
        entry: &Located,
    ) -> Result<(), IngestError> {
        let context = self.rules.context(&self.source_system, &self.local);
        match fhir::map_resource(resource, &context) {
            Ok(fhir::Mapped::Referenced { key, summary }) => {
                let body = summary.to_string();
                self.batch.put_referenced(&key, &body)?;
                if let Some(url) = &entry.full_url {
                    self.batch.put_referenced(url, &body)?;
                }
                self.local.referenced.insert(key, summary.clone());
                if let Some(url) = entry.full_url.clone() {
                    self.local.referenced.insert(url, summary);
                }
                self.report.accepted += 1;
            }
            Ok(_) => unreachable!("referenced types map to Referenced"),
            Err(error) => self.reject(&entry.location, error.to_string()),
        }
        Ok(())
    }

    /// A clinical resource (or a Consent): mapped and placed in its patient's documents.
    /// `Step::Defer` when it names what this batch has not seen yet and this is not the
    /// final attempt.
    fn place_clinical(
        &mut self,
        entry: &Located,
        final_attempt: bool,
    ) -> Result<Step, IngestError> {
        let rules = self.rules;
        let resource = Resource::new(&entry.value).expect("screened in pass 1");
        load_earlier_references(&self.batch, &mut self.local, &entry.value)?;
        let context = rules.context(&self.source_system, &self.local);
        let placed = match fhir::map_resource(&resource, &context) {
            Ok(fhir::Mapped::Clinical(facts)) => Placed::Clinical(facts),
            Ok(fhir::Mapped::Consent(facts)) => Placed::Consent(facts),
            Ok(fhir::Mapped::Unsupported) => {
                *self
                    .report
                    .unsupported
                    .entry(resource.resource_type.to_string())
                    .or_default() += 1;
                return Ok(Step::Next);
            }
            Ok(other) => unreachable!("clinical pass got {other:?}"),
            Err(error) if error.retry_later && !final_attempt => return Ok(Step::Defer),
            Err(error) => {
                self.reject(&entry.location, error.to_string());
                return Ok(Step::Next);
            }
        };
        let (patient, last_updated) = placed.patient_and_version();
        let nhs = match rules.resolve_patient_ref(&self.batch, &self.local, patient)? {
            Ok(nhs) => nhs,
            Err(_) if !final_attempt && matches!(patient, PatientRef::Reference(_)) => {
                return Ok(Step::Defer);
            }
            Err(reason) => {
                self.reject(&entry.location, format!("{}: {reason}", resource.key()));
                return Ok(Step::Next);
            }
        };
        if rules.is_stale(&self.batch, &resource.key(), last_updated)? {
            self.report.stale += 1;
            return Ok(Step::Next);
        }
        let mut facts = match placed {
            Placed::Clinical(facts) => facts,
            Placed::Consent(consent) => {
                let defaults = rules.settings.consent_defaults;
                let current = self.publication.consent_for(&self.batch, &nhs)?;
                self.publication
                    .set_consent(&nhs, consent.apply(current, defaults));
                self.report.accepted += 1;
                *self
                    .report
                    .items_by_section
                    .entry("sharing".into())
                    .or_default() += 1;
                return Ok(Step::Next);
            }
        };
        if facts.entered_in_error {
            self.report.retracted += 1;
        } else {
            self.report.accepted += 1;
            for item in &facts.items {
                *self
                    .report
                    .items_by_section
                    .entry(item.section.to_string())
                    .or_default() += 1;
            }
        }
        facts.bind_patient(&nhs);
        let placement = Placement {
            nhs,
            patient_key: self.local.patient_key(&facts.patient),
            moved_at: None,
        };
        let items = rules.hold_back_before_share_from(facts.items);
        rules.place_moving(
            &self.batch,
            &mut self.publication,
            &mut self.report,
            &resource.key(),
            placement,
            &facts.family,
            items,
        )?;
        Ok(Step::Next)
    }

    /// Records this source's feed, writes the publication and commits: the file's report.
    fn finish(mut self) -> Result<IngestReport, IngestError> {
        let rules = self.rules;
        let settings = rules.settings;
        // Before the publication: its sharing records state this source's feed.
        self.batch.touch_source(&SourceRow {
            publisher: settings.ods.to_string(),
            name: settings.name.clone(),
            kind: settings.kind.to_string(),
            source_system: self.source_system,
            feed: settings.feed.clone(),
            data_as_of: rules.now,
            expected_refresh_hours: (settings.feed == "batch")
                .then_some(settings.expected_refresh_hours),
        })?;
        self.report.documents_written =
            self.publication
                .apply(&self.batch, &rules.settings.key, rules.now)?;
        self.batch.commit()?;
        Ok(self.report)
    }
}

/// A resource of the clinical pass, mapped: it names its patient either way.
enum Placed {
    Clinical(fhir::ClinicalFacts),
    Consent(fhir::ConsentFacts),
}

impl Placed {
    fn patient_and_version(&self) -> (&PatientRef, Option<&str>) {
        match self {
            Placed::Clinical(facts) => (&facts.patient, facts.last_updated.as_deref()),
            Placed::Consent(facts) => (&facts.patient, facts.last_updated.as_deref()),
        }
    }
}

impl IngestRules<'_> {
    fn context<'c>(
        &'c self,
        source_system: &'c str,
        local: &'c LocalReferences,
    ) -> MappingContext<'c> {
        MappingContext {
            source_system,
            sensitive: &self.settings.sensitive,
            references: local,
        }
    }

    /// Places a resource's items through [`Publication::place_resource`], which moves it
    /// off any other patient it was on; a move is counted and recorded in both patients'
    /// audit trails.
    #[allow(clippy::too_many_arguments)]
    fn place_moving(
        &self,
        batch: &WriteBatch<'_>,
        publication: &mut Publication,
        report: &mut IngestReport,
        key: &str,
        placement: Placement,
        family: &[String],
        items: Vec<Item>,
    ) -> Result<(), IngestError> {
        let to = placement.nhs.clone();
        let at = clock::rfc3339(self.now);
        if let Some(from) = publication.place_resource(batch, key, placement, family, items, &at)? {
            report.moved += 1;
            self.audit_move(batch, key, &from, &to)?;
        }
        Ok(())
    }

    /// A Patient of the extract now names another NHS number: every resource placed through
    /// it moves to the new number, none stays on the old one.
    fn relink(
        &self,
        batch: &WriteBatch<'_>,
        publication: &mut Publication,
        report: &mut IngestReport,
        patient_key: &str,
        from: &NhsNumber,
        to: &NhsNumber,
    ) -> Result<(), IngestError> {
        let publisher = &self.settings.ods;
        let mut moved = 0;
        for key in batch.placed_through(publisher, from, patient_key)? {
            if key == patient_key {
                continue; // the Patient itself is placed by its caller
            }
            let family = fhir::item_family(&key);
            let mut items = Vec::new();
            for id in &family {
                items.extend(
                    batch
                        .held_items(publisher, from, id)?
                        .into_iter()
                        .filter(|item| !item.is_moved_away_notice()),
                );
            }
            for item in &mut items {
                fhir::rebind_item(item, from, to);
                item.fields.remove(moved::HERE);
            }
            let placement = Placement {
                nhs: to.clone(),
                patient_key: Some(patient_key.to_string()),
                moved_at: None,
            };
            self.place_moving(batch, publication, report, &key, placement, &family, items)?;
            moved += 1;
        }
        report.relinked += 1;
        let detail = format!(
            "{patient_key} relinked from NHS number {from} to {to}; {moved} resource(s) moved with it"
        );
        for nhs in [from, to] {
            batch.append_audit(&self.ingest_event(nhs, "relinked", detail.clone()))?;
        }
        Ok(())
    }

    fn audit_move(
        &self,
        batch: &WriteBatch<'_>,
        key: &str,
        from: &NhsNumber,
        to: &NhsNumber,
    ) -> Result<(), IngestError> {
        let detail = format!("{key} moved from NHS number {from} to {to}");
        for nhs in [from, to] {
            batch.append_audit(&self.ingest_event(nhs, "moved", detail.clone()))?;
        }
        Ok(())
    }

    /// An audit entry for a change ingest made to which patient holds what.
    fn ingest_event(&self, nhs: &NhsNumber, action: &str, detail: String) -> AuditEvent {
        let own = self.settings.ods.to_string();
        AuditEvent {
            at: self.now,
            user_id: "ingest".into(),
            user_name: "caremesh ingest".into(),
            role: "system".into(),
            organisation: own.clone(),
            action: action.into(),
            nhs: Some(nhs.to_string()),
            sources: vec![own],
            sections: Vec::new(),
            purpose: "record correction".into(),
            outcome: "allowed".into(),
            detail,
        }
    }

    /// True if a newer version of the resource was ingested before; otherwise records this
    /// version as the newest.
    /// Items dated before this publisher's share-from date stay here: they are filed as
    /// private, which no rule can share, and say why. Demographics are not dated entries and
    /// always follow the sharing rules.
    fn hold_back_before_share_from(&self, items: Vec<Item>) -> Vec<Item> {
        let publisher = &self.settings.ods;
        items
            .into_iter()
            .map(|mut item| {
                let day = item
                    .effective
                    .as_deref()
                    .or(item.recorded.as_deref())
                    .or(item.last_updated.as_deref());
                if item.class != DataClass::Private
                    && item.section != Section::Demographics
                    && !self.settings.agreements.shareable_date(publisher, day)
                {
                    item.class = DataClass::Private;
                    item.fields.insert(
                        "held_back".into(),
                        "dated before the share-from date".into(),
                    );
                }
                item
            })
            .collect()
    }

    fn is_stale(
        &self,
        batch: &WriteBatch<'_>,
        key: &str,
        last_updated: Option<&str>,
    ) -> Result<bool, IngestError> {
        let Some(incoming) = last_updated else {
            return Ok(false);
        };
        if let Some(known) = batch.resource_version(key)?
            && compare_instants(incoming, &known) == std::cmp::Ordering::Less
        {
            return Ok(true);
        }
        batch.set_resource_version(key, incoming)?;
        Ok(false)
    }

    fn resolve_patient_identity(
        &self,
        identifiers: &[fhir::Identifier],
    ) -> Result<NhsNumber, String> {
        if let Some(nhs) = identifiers
            .iter()
            .find(|i| i.system.as_deref() == Some(NHS_NUMBER_SYSTEM))
        {
            let value = nhs.value.as_deref().unwrap_or("");
            return NhsNumber::parse(value).map_err(|e| format!("invalid NHS number: {e}"));
        }
        for identifier in identifiers {
            if let (Some(system), Some(value)) = (&identifier.system, &identifier.value)
                && let Some(nhs) = self.index.lookup(system, value)
            {
                return Ok(nhs.clone());
            }
        }
        Err(format!(
            "has no NHS number and none of its {} identifier(s) is in the patient index ({} entries); add it to the index given with --patient-index or ingest.patient_index",
            identifiers.len(),
            self.index.len()
        ))
    }

    fn resolve_patient_ref(
        &self,
        batch: &WriteBatch<'_>,
        local: &LocalReferences,
        patient: &PatientRef,
    ) -> Result<Result<NhsNumber, String>, IngestError> {
        match patient {
            PatientRef::Identifier { system, value } if system == NHS_NUMBER_SYSTEM => {
                Ok(NhsNumber::parse(value).map_err(|e| format!("invalid NHS number: {e}")))
            }
            PatientRef::Identifier { system, value } => {
                Ok(self.index.lookup(system, value).cloned().ok_or_else(|| {
                    format!("patient identifier {system}|{value} is not in the patient index")
                }))
            }
            PatientRef::Reference(reference) => {
                let key = normalise_reference(reference);
                if let Some(nhs) = local
                    .patients
                    .get(reference)
                    .or_else(|| local.patients.get(&key))
                {
                    return Ok(Ok(nhs.clone()));
                }
                if let Some(nhs) = batch.patient_link(&key)? {
                    return Ok(Ok(nhs));
                }
                Ok(Err(format!(
                    "refers to patient {reference}, which is neither in this file nor ingested earlier; ingest the Patient first"
                )))
            }
        }
    }

    /// Where a file read goes once its ingest is recorded: processed/ or quarantine/ (a copy,
    /// for a file given on the command line), or nowhere (a command-line file that went in).
    fn disposal(&self, path: &Path, report: &IngestReport) -> Option<PathBuf> {
        let rejected = !report.rejected.is_empty();
        if self.disposition == FileDisposition::LeaveInPlace && !rejected {
            return None;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "extract".into());
        let target_dir = if rejected {
            &self.settings.quarantine_dir
        } else {
            &self.settings.processed_dir
        };
        Some(unique_target(target_dir, &name, self.now))
    }

    /// `target` as the ingest log keeps it: relative to the node home.
    fn relative(&self, target: &Path) -> String {
        target
            .strip_prefix(&self.settings.home_dir)
            .unwrap_or(target)
            .display()
            .to_string()
    }

    fn dispose(
        &self,
        path: &Path,
        target: &Path,
        report: &mut IngestReport,
    ) -> Result<(), IngestError> {
        let rejected = !report.rejected.is_empty();
        let sealing = self.data_key().is_some() && !sealed::is_sealed(path)?;
        match self.disposition {
            FileDisposition::LeaveInPlace => {
                sealed::keep_copy(self.data_key(), path, target)?;
            }
            FileDisposition::Move if sealing => {
                // Sealed and synced beside the target first: a crash before the original
                // is removed leaves it to be ingested again, which changes nothing.
                sealed::keep_copy(self.data_key(), path, target)?;
                fs::remove_file(path).map_err(io(path))?;
            }
            FileDisposition::Move => {
                // The error names where the file was going: that is what needs fixing.
                fs::rename(path, target).map_err(io(target))?;
                // The writer's permissions travel with a rename: it holds patient data.
                private(target)?;
            }
        }
        if rejected {
            self.write_reason(target, report)?;
            report.quarantined.push(target.to_path_buf());
        }
        Ok(())
    }

    fn write_reason(&self, target: &Path, report: &IngestReport) -> Result<(), IngestError> {
        let mut text = String::from("caremesh rejected this file.\n\n");
        let placed = report.accepted + report.retracted;
        if placed > 0 {
            text.push_str(&format!(
                "{placed} resource(s) from it were ingested; only the problems below were not. \
                 Fix them and drop the whole file again: re-ingesting what was already taken \
                 changes nothing.\n\n"
            ));
        }
        for rejection in &report.rejected {
            if rejection.location.is_empty() || rejection.location == "file" {
                text.push_str(&format!("- {}\n", rejection.reason));
            } else {
                text.push_str(&format!("- {}: {}\n", rejection.location, rejection.reason));
            }
        }
        let mut reason_path = target.as_os_str().to_owned();
        reason_path.push(".reason.txt");
        let reason_path = PathBuf::from(reason_path);
        // Reasons name identifiers and values from the file: kept as the file is.
        sealed::keep(self.data_key(), &reason_path, |out| {
            out.write_all(text.as_bytes())
        })?;
        Ok(())
    }

    /// The key files are sealed with.
    fn data_key(&self) -> Option<&DataKey> {
        self.settings
            .data_key
            .as_ref()
            .map(|keys| &**keys.current())
    }

    /// The keys sealed files are read through.
    fn data_keys(&self) -> Option<&DataKeys> {
        self.settings.data_key.as_ref()
    }
}

/// A file's length and modification time: enough to tell that a writer added to it.
fn file_signature(path: &Path) -> Result<(u64, Option<std::time::SystemTime>), IngestError> {
    let metadata = fs::metadata(path).map_err(io(path))?;
    Ok((metadata.len(), metadata.modified().ok()))
}

fn private(path: &Path) -> Result<(), IngestError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io(path))
}

fn unique_target(dir: &Path, name: &str, now: i64) -> PathBuf {
    let plain = dir.join(name);
    if !plain.exists() {
        return plain;
    }
    (1..)
        .map(|n| dir.join(format!("{now}-{n}-{name}")))
        .find(|p| !p.exists())
        .expect("an unused name exists")
}

/// `http://host/fhir/Patient/123/_history/2` and `Patient/123` both name `Patient/123`.
fn normalise_reference(reference: &str) -> String {
    if reference.starts_with("urn:") {
        return reference.to_string();
    }
    let without_history = reference.split("/_history/").next().unwrap_or(reference);
    let parts: Vec<&str> = without_history.rsplitn(3, '/').collect();
    match parts.as_slice() {
        [id, kind, ..] => format!("{kind}/{id}"),
        _ => reference.to_string(),
    }
}

/// Orders two FHIR instants; falls back to text order where one does not parse (same-format
/// timestamps from one system order correctly as text).
fn compare_instants(a: &str, b: &str) -> std::cmp::Ordering {
    a.cmp(b)
}

#[derive(Default)]
struct LocalReferences {
    patients: HashMap<String, NhsNumber>,
    /// The Patient resource key (`Patient/<id>`) a Bundle fullUrl names.
    patient_keys: HashMap<String, String>,
    referenced: HashMap<String, Value>,
}

impl LocalReferences {
    /// `key` (and the Bundle fullUrl naming it) mean the patient `nhs` in this file.
    fn name_patient(&mut self, key: &str, full_url: Option<&str>, nhs: NhsNumber) {
        if let Some(url) = full_url {
            self.patients.insert(url.to_string(), nhs.clone());
            self.patient_keys.insert(url.to_string(), key.to_string());
        }
        self.patients.insert(key.to_string(), nhs);
    }

    /// The extract's Patient resource a resource names as its subject, if it names one.
    fn patient_key(&self, patient: &PatientRef) -> Option<String> {
        match patient {
            PatientRef::Reference(reference) => Some(
                self.patient_keys
                    .get(reference)
                    .cloned()
                    .unwrap_or_else(|| normalise_reference(reference)),
            ),
            PatientRef::Identifier { .. } => None,
        }
    }

    fn summary(&self, reference: &str) -> Option<&Value> {
        self.referenced
            .get(reference)
            .or_else(|| self.referenced.get(&normalise_reference(reference)))
    }
}

impl ReferenceLookup for LocalReferences {
    fn medication(&self, reference: &str) -> Option<CodeableConcept> {
        serde_json::from_value(self.summary(reference)?.get("code")?.clone()).ok()
    }

    fn display(&self, reference: &str) -> Option<String> {
        let summary = self.summary(reference)?;
        let name = summary.get("name")?.as_str()?;
        Some(match summary.get("ods").and_then(Value::as_str) {
            Some(ods) => format!("{name} ({ods})"),
            None => name.to_string(),
        })
    }
}

/// Loads what earlier extracts said about the resources this one refers to (Medications,
/// Organizations, Practitioners, Locations) into the local map before mapping.
fn load_earlier_references(
    batch: &WriteBatch<'_>,
    local: &mut LocalReferences,
    value: &Value,
) -> Result<(), IngestError> {
    let mut references = Vec::new();
    fhir::references_in(value, &mut references);
    for target in references {
        if local.referenced.contains_key(&target) || local.patients.contains_key(&target) {
            continue;
        }
        let key = normalise_reference(&target);
        let kind = key.split('/').next().unwrap_or_default();
        if !target.starts_with("urn:") && !fhir::REFERENCED_TYPES.contains(&kind) {
            continue;
        }
        if let Some(body) = batch.referenced(&target)?.or(batch.referenced(&key)?)
            && let Ok(summary) = serde_json::from_str(&body)
        {
            local.referenced.insert(target, summary);
        }
    }
    Ok(())
}

/// Unpacks Bundles (of any type, nested) into their resources.
fn flatten(
    value: Value,
    location: String,
    full_url: Option<String>,
    out: &mut Vec<Located>,
    report: &mut IngestReport,
) -> Result<(), String> {
    let is_bundle = value.get("resourceType").and_then(Value::as_str) == Some("Bundle");
    if !is_bundle {
        out.push(Located {
            location,
            full_url,
            value,
        });
        return Ok(());
    }
    let Value::Object(mut bundle) = value else {
        unreachable!("a value with resourceType is an object")
    };
    report.count_read("Bundle");
    let bundle_type = bundle
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_string();
    // The Bundle itself is a container: its entries are counted one by one below.
    *report
        .containers
        .entry(format!("Bundle ({bundle_type})"))
        .or_default() += 1;
    let entries = match bundle.remove("entry") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(entries)) => entries,
        Some(other) => {
            return Err(format!(
                "Bundle `entry` should be an array, found {}",
                fhir::json_kind(&other)
            ));
        }
    };
    let prefix = if location.is_empty() {
        String::new()
    } else {
        format!("{location}, ")
    };
    for (index, entry) in entries.into_iter().enumerate() {
        let entry_location = format!("{prefix}entry {index}");
        let Value::Object(mut entry) = entry else {
            report.count_unsupported("(bad Bundle entry)", "Bundle entry that is not an object");
            continue;
        };
        let full_url = entry
            .get("fullUrl")
            .and_then(Value::as_str)
            .map(str::to_string);
        match entry.remove("resource") {
            Some(Value::Object(mut resource)) => {
                // A resource POSTed in a batch has no id yet; its fullUrl is its identity.
                if !resource.contains_key("id")
                    && let Some(uuid) = full_url
                        .as_deref()
                        .and_then(|u| u.strip_prefix("urn:uuid:"))
                {
                    resource.insert("id".into(), Value::String(uuid.to_string()));
                }
                flatten(
                    Value::Object(resource),
                    entry_location,
                    full_url,
                    out,
                    report,
                )?
            }
            _ => {
                report.count_unsupported(
                    "(Bundle entry without resource)",
                    "Bundle entry without resource",
                );
            }
        }
    }
    Ok(())
}

/// About how many bytes `value` takes as JSON, without writing it out.
fn json_size(value: &Value) -> usize {
    match value {
        Value::Null | Value::Bool(_) => 5,
        Value::Number(_) => 24,
        Value::String(text) => text.len() + 2,
        Value::Array(values) => 2 + values.iter().map(|v| json_size(v) + 1).sum::<usize>(),
        Value::Object(object) => {
            2 + object
                .iter()
                .map(|(key, v)| key.len() + 4 + json_size(v))
                .sum::<usize>()
        }
    }
}

/// Entries (by index) that name the same resource, or the same Bundle fullUrl, as another
/// entry of the same batch with a different content and no newer version to tell them
/// apart: which one the source meant cannot be known, so each is refused. Versions of one
/// resource (a history Bundle: each its own `meta.versionId` or `meta.lastUpdated`) and
/// exact repeats are not ambiguous.
fn ambiguous_entries(located: &[Located]) -> HashMap<usize, String> {
    let version = |value: &Value| {
        let meta = value.get("meta");
        (
            meta.and_then(|m| m.get("versionId")).cloned(),
            meta.and_then(|m| m.get("lastUpdated")).cloned(),
        )
    };
    let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
    for (index, entry) in located.iter().enumerate() {
        let kind = entry.value.get("resourceType").and_then(Value::as_str);
        let id = entry.value.get("id").and_then(Value::as_str);
        if let (Some(kind), Some(id)) = (kind, id) {
            by_name
                .entry(format!("{kind}/{id}"))
                .or_default()
                .push(index);
        }
        if let Some(url) = &entry.full_url {
            by_name
                .entry(format!("fullUrl {url}"))
                .or_default()
                .push(index);
        }
    }
    let mut ambiguous = HashMap::new();
    for (name, indexes) in by_name.into_iter().filter(|(_, i)| i.len() > 1) {
        for &index in &indexes {
            let clashes = indexes.iter().any(|&other| {
                other != index
                    && version(&located[other].value) == version(&located[index].value)
                    && located[other].value != located[index].value
            });
            if clashes {
                let places: Vec<&str> = indexes
                    .iter()
                    .map(|&i| located[i].location.as_str())
                    .collect();
                ambiguous.insert(
                    index,
                    format!(
                        "{name} is given {} times with different content and the same version ({}); refused as ambiguous: send one version, or give each its own meta.versionId",
                        indexes.len(),
                        places.join(", ")
                    ),
                );
            }
        }
    }
    ambiguous
}

#[derive(Debug, PartialEq, Eq)]
enum LineRead {
    Line,
    TooLong,
    End,
}

/// Reads one line into `line` without ever buffering more than `limit` bytes of it.
fn read_line_limited(
    reader: &mut impl BufRead,
    line: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<LineRead> {
    let mut too_long = false;
    let mut read_any = false;
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Ok(match (read_any, too_long) {
                (false, _) => LineRead::End,
                (true, true) => LineRead::TooLong,
                (true, false) => LineRead::Line,
            });
        }
        read_any = true;
        let (chunk, found_newline) = match available.iter().position(|b| *b == b'\n') {
            Some(end) => (&available[..end], true),
            None => (available, false),
        };
        if !too_long {
            if line.len() + chunk.len() > limit {
                too_long = true;
                line.clear();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        let consumed = chunk.len() + usize::from(found_newline);
        reader.consume(consumed);
        if found_newline {
            return Ok(if too_long {
                LineRead::TooLong
            } else {
                LineRead::Line
            });
        }
    }
}

fn collect_files(path: &Path, files: &mut Vec<PathBuf>) -> Result<(), IngestError> {
    let metadata = fs::metadata(path).map_err(io(path))?;
    if metadata.is_file() {
        files.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = fs::read_dir(path)
        .map_err(io(path))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io(path))?;
    entries.sort();
    for entry in entries {
        if entry.is_dir() {
            collect_files(&entry, files)?;
        } else if is_extract_file(&entry) {
            files.push(entry);
        }
    }
    Ok(())
}

/// Files a folder ingest takes: FHIR JSON and NDJSON, not hidden or partial files.
pub fn is_extract_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    !name.starts_with('.')
        && path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
            ["json", "ndjson", "jsonl"]
                .iter()
                .any(|known| e.eq_ignore_ascii_case(known))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_normalise_to_type_and_id() {
        assert_eq!(normalise_reference("Patient/123"), "Patient/123");
        assert_eq!(
            normalise_reference("https://x.nhs.uk/fhir/Patient/123/_history/2"),
            "Patient/123"
        );
        assert_eq!(normalise_reference("urn:uuid:abc"), "urn:uuid:abc");
    }

    #[test]
    fn long_lines_are_skipped_without_buffering_them() {
        let data = format!("short\n{}\nafter\nlast", "x".repeat(100));
        let mut reader = BufReader::with_capacity(8, data.as_bytes());
        let mut line = Vec::new();
        let mut seen = Vec::new();
        loop {
            line.clear();
            let outcome = read_line_limited(&mut reader, &mut line, 20).unwrap();
            if outcome == LineRead::End {
                break;
            }
            assert!(line.len() <= 20);
            seen.push((outcome, String::from_utf8(line.clone()).unwrap()));
        }
        assert_eq!(
            seen,
            vec![
                (LineRead::Line, "short".into()),
                (LineRead::TooLong, String::new()),
                (LineRead::Line, "after".into()),
                (LineRead::Line, "last".into()),
            ]
        );
    }
}
