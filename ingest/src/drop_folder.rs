//! What the drop folder holds, as `caremesh status` and /metrics report it: files waiting
//! to be taken, and entries that are never taken, each with its reason.

use crate::is_extract_file;
use std::path::Path;

/// An entry of the drop folder that is never taken, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LeftInPlace {
    pub name: String,
    pub reason: &'static str,
}

/// What the drop folder holds: files waiting to be taken, and what is left in place.
#[derive(Debug, Default, serde::Serialize)]
pub struct Survey {
    pub waiting: usize,
    pub left_in_place: Vec<LeftInPlace>,
}

/// Reads the drop folder without following links or entering directories.
pub fn survey(drop_dir: &Path) -> Survey {
    let mut survey = Survey::default();
    let Ok(entries) = std::fs::read_dir(drop_dir) else {
        return survey;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let shown = name.to_string_lossy().to_string();
        if shown.starts_with('.') {
            continue; // a writer's temporary file, by convention
        }
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let reason = if name.to_str().is_none() {
            Some("name is not UTF-8: rename it")
        } else if kind.is_symlink() {
            Some("symbolic link: never followed; copy the file in instead")
        } else if kind.is_dir() {
            Some("directory: never entered; move its files in one by one")
        } else if !kind.is_file() {
            Some("not a regular file (a pipe, socket or device)")
        } else if !is_extract_file(&path) {
            Some("not named .json, .ndjson or .jsonl")
        } else {
            None
        };
        match reason {
            Some(reason) => survey.left_in_place.push(LeftInPlace {
                name: shown,
                reason,
            }),
            None => survey.waiting += 1,
        }
    }
    survey.left_in_place.sort_by(|a, b| a.name.cmp(&b.name));
    survey
}
