//! The organisation's patient index: local identifiers to NHS numbers, for extracts whose
//! Patient resources carry no NHS number (as many systems' exports do not).

use caremesh_sync::NhsNumber;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PatientIndexError {
    #[error("patient index {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "patient index {path} line {line}: {problem}; expected `identifier_system,identifier_value,nhs_number`"
    )]
    Row {
        path: PathBuf,
        line: usize,
        problem: String,
    },
}

#[derive(Debug, Default, Clone)]
pub struct PatientIndex {
    entries: HashMap<(String, String), NhsNumber>,
}

impl PatientIndex {
    pub fn load(path: &Path) -> Result<Self, PatientIndexError> {
        let text = std::fs::read_to_string(path).map_err(|source| PatientIndexError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, PatientIndexError> {
        let mut entries = HashMap::new();
        for (number, line) in text.lines().enumerate() {
            let line_number = number + 1;
            let line = line.trim();
            if line.is_empty() || (number == 0 && line.starts_with("identifier_system")) {
                continue;
            }
            let row_error = |problem: String| PatientIndexError::Row {
                path: path.to_path_buf(),
                line: line_number,
                problem,
            };
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let [system, value, nhs] = fields[..] else {
                return Err(row_error(format!("{} fields", fields.len())));
            };
            let nhs = NhsNumber::parse(nhs).map_err(|e| row_error(e.to_string()))?;
            entries.insert((system.to_string(), value.to_string()), nhs);
        }
        Ok(PatientIndex { entries })
    }

    pub fn lookup(&self, system: &str, value: &str) -> Option<&NhsNumber> {
        self.entries.get(&(system.to_string(), value.to_string()))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_index_and_rejects_invalid_numbers_by_line() {
        let path = Path::new("index.csv");
        let index = PatientIndex::parse(
            "identifier_system,identifier_value,nhs_number\nsys,abc,9912003888\n",
            path,
        )
        .unwrap();
        assert_eq!(index.lookup("sys", "abc").unwrap().as_str(), "9912003888");
        let error = PatientIndex::parse("sys,abc,9912003880\n", path).unwrap_err();
        assert!(error.to_string().contains("line 1"), "{error}");
        assert!(error.to_string().contains("9912003880"), "{error}");
    }
}
