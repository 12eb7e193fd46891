//! `caremesh verify`: every stored document re-checked from its bytes.
//!
//! For each document: the signed heads decode and verify against the publisher's trusted key,
//! the snapshot loads as Automerge with exactly those heads and declares its partition, its
//! items parse, and the read model the view uses holds exactly those items (or, on a hub,
//! which keeps none of a clinical section's, none or what it held before it stopped keeping
//! them: [`caremesh_storage::read_model_keeps`]).

use caremesh_storage::{StorageError, Store, read_model_keeps};
use caremesh_sync::{OdsCode, OrgKind, PublishedDocument};
use serde::Serialize;
use std::collections::HashSet;
use std::path::Path;

#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub documents: usize,
    pub items: usize,
    pub problems: Vec<Problem>,
    /// Files kept in processed/ or quarantine/ that the ingest log does not name, relative
    /// to the node home: what they held may be missing from the database.
    pub unrecorded_files: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Problem {
    /// `tampered` (the bytes do not hold together), `untrusted-key` (the key that signed
    /// them is not, or no longer, trusted for the publisher) or `database`.
    pub kind: &'static str,
    /// For `untrusted-key`: the key, hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub document: String,
    pub publisher: String,
    pub section: String,
    pub class: String,
    pub problem: String,
}

/// Checks every document held by a node of `kind`; `is_trusted` says whether a key may sign
/// for a publisher.
pub fn verify_store(
    store: &Store,
    kind: OrgKind,
    is_trusted: &dyn Fn(&OdsCode, &[u8; 32]) -> bool,
) -> Result<VerifyReport, StorageError> {
    const PAGE: usize = 500;
    let mut report = VerifyReport::default();
    // The file itself first: a damaged index page can hide rows from every query below.
    for line in store.integrity_problems()? {
        report.problems.push(Problem {
            kind: "database",
            key: None,
            document: String::new(),
            publisher: String::new(),
            section: String::new(),
            class: String::new(),
            problem: format!("SQLite integrity check: {line}; restore the database from a backup, or rebuild it by re-ingesting"),
        });
    }
    let mut after = 0;
    loop {
        let page = store.documents_after(after, PAGE)?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for stored in page {
            report.documents += 1;
            let problem = |text: String| Problem {
                kind: "tampered",
                key: None,
                document: stored.id.to_string(),
                publisher: stored.meta.publisher.to_string(),
                section: stored.meta.section.to_string(),
                class: stored.meta.class.to_string(),
                problem: text,
            };
            let Some(signed) = stored.signed_heads() else {
                report
                    .problems
                    .push(problem("signed heads do not decode".into()));
                continue;
            };
            if signed.meta != stored.meta {
                report.problems.push(problem(
                    "signed partition differs from the partition it is stored under".into(),
                ));
                continue;
            }
            if let Err(error) = signed.verify(|publisher, key| is_trusted(publisher, key)) {
                let (kind, key) = match &error {
                    caremesh_sync::SignatureError::UntrustedKey { key, .. } => {
                        ("untrusted-key", Some(key.clone()))
                    }
                    _ => ("tampered", None),
                };
                report.problems.push(Problem {
                    kind,
                    key,
                    ..problem(error.to_string())
                });
                continue;
            }
            let document = match PublishedDocument::load(&stored.meta, &stored.snapshot) {
                Ok(document) => document,
                Err(error) => {
                    report.problems.push(problem(error.to_string()));
                    continue;
                }
            };
            if let Err(error) = document.matches(&signed) {
                report.problems.push(problem(error.to_string()));
                continue;
            }
            let items = match document.items() {
                Ok(items) => items,
                Err(error) => {
                    report.problems.push(problem(error.to_string()));
                    continue;
                }
            };
            report.items += items.len();
            let mut expected: Vec<(String, String)> = items
                .iter()
                .map(|i| {
                    (
                        i.id.clone(),
                        serde_json::to_string(i).expect("items serialise"),
                    )
                })
                .collect();
            expected.sort();
            let held = store.item_bodies(stored.id)?;
            let none_kept = held.is_empty() && !read_model_keeps(kind, stored.meta.section);
            if held != expected && !none_kept {
                report.problems.push(problem(
                    "the read model the view shows differs from the signed document; rebuild it from the documents".into(),
                ));
            }
        }
    }
    Ok(report)
}

/// Files in the node's processed/ and quarantine/ folders that no ingest in the log names. The
/// ingest of a file is committed before the file moves, so such a file means the database lost
/// the ingest after it was committed (a crash that cut the write-ahead log, a restore from an
/// older backup), and what the file held may be missing. Reasons written beside quarantined
/// files are not extracts.
pub fn unrecorded_files(home_dir: &Path, store: &Store) -> Result<Vec<String>, StorageError> {
    let mut kept = HashSet::new();
    let mut read_from = HashSet::new();
    let mut legacy_names = HashSet::new();
    for (file, kept_as) in store.ingested_files()? {
        match kept_as {
            Some(kept_as) => {
                kept.insert(kept_as);
            }
            // Logged before the log said where files went (schema version 12): known by name.
            None => {
                if let Some(name) = Path::new(&file).file_name() {
                    legacy_names.insert(name.to_string_lossy().to_string());
                }
            }
        }
        // A file ingested again from where it was kept is accounted for by that ingest.
        if let Ok(path) = std::fs::canonicalize(&file) {
            read_from.insert(path);
        }
    }
    let is_legacy = |name: &str| {
        legacy_names.contains(name)
            || legacy_names.iter().any(|logged| {
                // Kept under `{time}-{n}-{name}` when the plain name was taken.
                name.strip_suffix(logged.as_str())
                    .and_then(|prefix| prefix.strip_suffix('-'))
                    .is_some_and(|prefix| {
                        prefix.split('-').count() == 2
                            && prefix
                                .split('-')
                                .all(|p| p.bytes().all(|b| b.is_ascii_digit()))
                    })
            })
    };
    let mut missing = Vec::new();
    for folder in ["processed", "quarantine"] {
        let Ok(entries) = std::fs::read_dir(home_dir.join(folder)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            // A hidden name is a file being written (`sealed::partial_path`) or a probe.
            if name.ends_with(".reason.txt")
                || name.starts_with('.')
                || !entry.file_type().is_ok_and(|t| t.is_file())
            {
                continue;
            }
            let relative = format!("{folder}/{name}");
            let accounted = kept.contains(&relative)
                || std::fs::canonicalize(entry.path()).is_ok_and(|p| read_from.contains(&p))
                || is_legacy(&name);
            if !accounted {
                missing.push(relative);
            }
        }
    }
    missing.sort();
    Ok(missing)
}
