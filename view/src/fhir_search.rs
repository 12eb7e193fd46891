//! Search within one patient's record as FHIR resources: the parameters the `/fhir/{type}`
//! routes take, parsed and applied to what [`crate::fhir_api::render`] made for the caller.
//!
//! Searching never widens what a caller sees: it only filters the resources already
//! rendered for them. Each parameter means what FHIR R4 says it means for the type; where a
//! type has no such element the parameter is refused for it rather than matched against
//! nothing (a client filtering on `clinical-status` of Observations would otherwise be told
//! there are none).

use serde_json::Value;

/// The types the API searches, in the order the CapabilityStatement lists them.
pub const SEARCHABLE_TYPES: &[&str] = &[
    "AllergyIntolerance",
    "Condition",
    "MedicationStatement",
    "MedicationRequest",
    "MedicationAdministration",
    "MedicationDispense",
    "Observation",
    "DiagnosticReport",
    "Immunization",
    "Procedure",
    "Encounter",
    "DocumentReference",
    "Composition",
    "Flag",
    "CarePlan",
    "ServiceRequest",
];

/// Parameters every type takes.
pub const COMMON_PARAMETERS: &[&str] = &[
    "patient",
    "patient.identifier",
    "code",
    "date",
    "_lastUpdated",
    "_count",
    "_sort",
    "_offset",
];

/// A page holds this many unless `_count` asks for fewer (or up to [`MAX_COUNT`]).
pub const DEFAULT_COUNT: usize = 50;
pub const MAX_COUNT: usize = 200;

/// The elements of a type that `code` matches.
fn code_elements(resource_type: &str) -> &'static [&'static str] {
    match resource_type {
        "MedicationStatement"
        | "MedicationRequest"
        | "MedicationAdministration"
        | "MedicationDispense" => &["medicationCodeableConcept"],
        "Immunization" => &["vaccineCode"],
        "DocumentReference" | "Composition" | "Encounter" => &["type"],
        _ => &["code"],
    }
}

/// The elements of a type that `date` compares, first present wins: the clinical date.
fn date_elements(resource_type: &str) -> &'static [&'static str] {
    match resource_type {
        "AllergyIntolerance" => &["recordedDate", "onsetDateTime"],
        "Condition" => &["onsetDateTime", "onsetPeriod", "recordedDate"],
        "MedicationStatement" | "MedicationAdministration" => {
            &["effectiveDateTime", "effectivePeriod", "dateAsserted"]
        }
        "MedicationRequest" | "ServiceRequest" => &["authoredOn"],
        "MedicationDispense" => &["whenHandedOver", "whenPrepared"],
        "Observation" | "DiagnosticReport" => &[
            "effectiveDateTime",
            "effectivePeriod",
            "effectiveInstant",
            "issued",
        ],
        "Immunization" => &["occurrenceDateTime"],
        "Procedure" => &["performedDateTime", "performedPeriod"],
        "Encounter" | "Flag" | "CarePlan" => &["period"],
        "DocumentReference" | "Composition" => &["date"],
        _ => &[],
    }
}

/// Whether a type has a category element, and what it is called.
fn category_element(resource_type: &str) -> Option<&'static str> {
    match resource_type {
        // R4 gives these two none (an Encounter has a class and types).
        "Encounter" | "Immunization" => None,
        _ => Some("category"),
    }
}

fn has_clinical_status(resource_type: &str) -> bool {
    matches!(resource_type, "AllergyIntolerance" | "Condition")
}

/// What a parameter given to a type's search is wrong with: said in the OperationOutcome.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SearchError {
    #[error(
        "`{parameter}` is not a search parameter of {resource_type} here (supported: {supported}); see /fhir/metadata"
    )]
    Unsupported {
        parameter: String,
        resource_type: String,
        supported: String,
    },
    #[error("`{0}` is given more than once")]
    Repeated(String),
    #[error(
        "give the patient: patient={{NHS number}} or patient.identifier=https://fhir.nhs.uk/Id/nhs-number|{{NHS number}} (searching across patients is not supported)"
    )]
    NoPatient,
    #[error("`{parameter}` is not valid: {why}")]
    Invalid { parameter: String, why: String },
}

/// A comparison a date parameter makes (FHIR R4 search prefixes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
}

/// A date or time as the range it stands for, in Unix seconds, end exclusive: `2026` is the
/// whole year, `2026-03-01` the day, an instant one second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: i64,
    end: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct DateTest {
    prefix: Prefix,
    span: Span,
}

impl DateTest {
    fn parse(parameter: &str, text: &str) -> Result<DateTest, SearchError> {
        let (prefix, rest) = match text.get(..2) {
            Some("eq") => (Prefix::Eq, &text[2..]),
            Some("ne") => (Prefix::Ne, &text[2..]),
            Some("gt") => (Prefix::Gt, &text[2..]),
            Some("lt") => (Prefix::Lt, &text[2..]),
            Some("ge") => (Prefix::Ge, &text[2..]),
            Some("le") => (Prefix::Le, &text[2..]),
            _ => (Prefix::Eq, text),
        };
        let span = span_of(rest).ok_or_else(|| SearchError::Invalid {
            parameter: parameter.to_string(),
            why: format!(
                "`{}` is not a FHIR date or dateTime with an optional prefix (eq, ne, gt, lt, ge, le), as ge2026-01-01",
                clip(text, 64)
            ),
        })?;
        Ok(DateTest { prefix, span })
    }

    /// FHIR R4's rules: `eq` the target's range lies within the parameter's; `gt` some of
    /// it lies after; `ge` either; and so on.
    fn matches(&self, target: Span) -> bool {
        let within = self.span.start <= target.start && target.end <= self.span.end;
        let after = target.end > self.span.end;
        let before = target.start < self.span.start;
        match self.prefix {
            Prefix::Eq => within,
            Prefix::Ne => !within,
            Prefix::Gt => after,
            Prefix::Lt => before,
            Prefix::Ge => after || within,
            Prefix::Le => before || within,
        }
    }
}

/// The span a FHIR date, dateTime or instant stands for. A time without a zone is read as
/// UTC (FHIR requires a zone on a time).
fn span_of(text: &str) -> Option<Span> {
    use chrono::NaiveDate;
    let day_start = |date: NaiveDate| date.and_hms_opt(0, 0, 0).map(|t| t.and_utc().timestamp());
    match text.len() {
        4 => {
            let year: i32 = text.parse().ok()?;
            let start = day_start(NaiveDate::from_ymd_opt(year, 1, 1)?)?;
            let end = day_start(NaiveDate::from_ymd_opt(year + 1, 1, 1)?)?;
            Some(Span { start, end })
        }
        7 => {
            let (year, month) = text.split_once('-')?;
            let (year, month): (i32, u32) = (year.parse().ok()?, month.parse().ok()?);
            let first = NaiveDate::from_ymd_opt(year, month, 1)?;
            let next = if month == 12 {
                NaiveDate::from_ymd_opt(year + 1, 1, 1)?
            } else {
                NaiveDate::from_ymd_opt(year, month + 1, 1)?
            };
            Some(Span {
                start: day_start(first)?,
                end: day_start(next)?,
            })
        }
        10 => {
            let date = NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?;
            let start = day_start(date)?;
            Some(Span {
                start,
                end: start + 86_400,
            })
        }
        _ => {
            let instant = chrono::DateTime::parse_from_rfc3339(text)
                .map(|t| t.timestamp())
                .or_else(|_| {
                    chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S")
                        .map(|t| t.and_utc().timestamp())
                })
                .ok()?;
            Some(Span {
                start: instant,
                end: instant + 1,
            })
        }
    }
}

/// The span of an element: a date, dateTime or instant, or a Period (an open end runs on).
fn element_span(value: &Value) -> Option<Span> {
    match value {
        Value::String(text) => span_of(text),
        Value::Object(period) => {
            let start = period
                .get("start")
                .and_then(Value::as_str)
                .and_then(span_of);
            let end = period.get("end").and_then(Value::as_str).and_then(span_of);
            match (start, end) {
                (Some(start), Some(end)) => Some(Span {
                    start: start.start,
                    end: end.end.max(start.end),
                }),
                (Some(start), None) => Some(Span {
                    start: start.start,
                    end: i64::MAX,
                }),
                (None, Some(end)) => Some(Span {
                    start: i64::MIN,
                    end: end.end,
                }),
                (None, None) => None,
            }
        }
        _ => None,
    }
}

/// A token parameter's value: `code`, `system|code`, or `system|` (any code in the system).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Token {
    system: Option<String>,
    code: Option<String>,
}

impl Token {
    fn parse(text: &str) -> Token {
        match text.split_once('|') {
            Some((system, code)) => Token {
                system: Some(system.to_string()),
                code: (!code.is_empty()).then(|| code.to_string()),
            },
            None => Token {
                system: None,
                code: Some(text.to_string()),
            },
        }
    }

    /// Whether a Coding (or a bare code) matches.
    fn matches_coding(&self, coding: &Value) -> bool {
        let (system, code) = match coding {
            Value::String(code) => (None, Some(code.as_str())),
            Value::Object(_) => (coding["system"].as_str(), coding["code"].as_str()),
            _ => return false,
        };
        let system_ok = match self.system.as_deref() {
            None => true,
            // `|code`: a coding with no system.
            Some("") => system.is_none(),
            Some(wanted) => system == Some(wanted),
        };
        system_ok
            && self
                .code
                .as_deref()
                .is_none_or(|wanted| code == Some(wanted))
    }

    /// Whether an element (a CodeableConcept, a list of them, a code, or a list of codes)
    /// holds a matching coding.
    fn matches_element(&self, element: &Value) -> bool {
        match element {
            Value::Array(values) => values.iter().any(|v| self.matches_element(v)),
            Value::Object(concept) if concept.contains_key("coding") => concept["coding"]
                .as_array()
                .is_some_and(|codings| codings.iter().any(|c| self.matches_coding(c))),
            other => self.matches_coding(other),
        }
    }
}

/// One type's search, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Search {
    pub resource_type: String,
    /// The patient's NHS number, as given.
    pub patient: String,
    /// Every token list must match (AND); within one, any value (OR, comma-separated).
    tokens: Vec<(&'static str, Vec<Token>)>,
    dates: Vec<DateTest>,
    last_updated: Vec<DateTest>,
    pub count: usize,
    pub offset: usize,
    /// `_sort=-date` (newest first) or `_sort=date`; otherwise the record's order.
    sort: Option<bool>,
}

impl Search {
    /// Parses the parameters of a search of `resource_type` (one of [`SEARCHABLE_TYPES`]).
    pub fn parse(resource_type: &str, pairs: &[(String, String)]) -> Result<Search, SearchError> {
        let mut search = Search {
            resource_type: resource_type.to_string(),
            patient: String::new(),
            tokens: Vec::new(),
            dates: Vec::new(),
            last_updated: Vec::new(),
            count: DEFAULT_COUNT,
            offset: 0,
            sort: None,
        };
        let supported = supported_parameters(resource_type);
        for (name, value) in pairs {
            if !supported.contains(&name.as_str()) {
                return Err(SearchError::Unsupported {
                    parameter: clip(name, 64),
                    resource_type: resource_type.to_string(),
                    supported: supported.join(", "),
                });
            }
            // Dates may be given twice, for a range (date=ge…&date=lt…); nothing else may.
            let repeatable = matches!(name.as_str(), "date" | "_lastUpdated");
            if !repeatable && pairs.iter().filter(|(other, _)| other == name).count() > 1 {
                return Err(SearchError::Repeated(clip(name, 64)));
            }
            let invalid = |why: String| SearchError::Invalid {
                parameter: name.clone(),
                why,
            };
            match name.as_str() {
                "patient" => {
                    search.patient = value.strip_prefix("Patient/").unwrap_or(value).to_string()
                }
                "patient.identifier" => match value.split_once('|') {
                    Some((crate::fhir_api::NHS_NUMBER_SYSTEM, nhs)) => {
                        search.patient = nhs.to_string()
                    }
                    _ => {
                        return Err(invalid(format!(
                            "give an NHS number: {}|{{NHS number}}",
                            crate::fhir_api::NHS_NUMBER_SYSTEM
                        )));
                    }
                },
                "code" | "category" | "clinical-status" => {
                    let key = match name.as_str() {
                        "code" => "code",
                        "category" => "category",
                        _ => "clinical-status",
                    };
                    let values: Vec<Token> = value.split(',').map(Token::parse).collect();
                    if values
                        .iter()
                        .any(|t| t.system.is_none() && t.code.is_none())
                    {
                        return Err(invalid("an empty value".into()));
                    }
                    search.tokens.push((key, values));
                }
                "date" => search.dates.push(DateTest::parse(name, value)?),
                "_lastUpdated" => search.last_updated.push(DateTest::parse(name, value)?),
                "_count" => {
                    search.count = value
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_COUNT).contains(n))
                        .ok_or_else(|| invalid(format!("a number from 1 to {MAX_COUNT}")))?
                }
                "_offset" => {
                    search.offset = value
                        .parse()
                        .map_err(|_| invalid("a whole number (from a next link)".into()))?
                }
                "_sort" => {
                    search.sort = Some(match value.as_str() {
                        "-date" => true,
                        "date" => false,
                        _ => return Err(invalid("sort by date or -date".into())),
                    })
                }
                _ => unreachable!("every supported parameter is handled"),
            }
        }
        if search.patient.is_empty() {
            return Err(SearchError::NoPatient);
        }
        Ok(search)
    }

    /// Whether `resource` (of this search's type) matches every parameter.
    pub fn matches(&self, resource: &Value) -> bool {
        if resource["resourceType"].as_str() != Some(&self.resource_type) {
            return false;
        }
        let tokens_match = self.tokens.iter().all(|(key, values)| {
            let elements: Vec<&Value> = match *key {
                "code" => code_elements(&self.resource_type)
                    .iter()
                    .map(|e| &resource[*e])
                    .collect(),
                "category" => category_element(&self.resource_type)
                    .map(|e| vec![&resource[e]])
                    .unwrap_or_default(),
                _ => vec![&resource["clinicalStatus"]],
            };
            values
                .iter()
                .any(|token| elements.iter().any(|e| token.matches_element(e)))
        });
        let date = self.clinical_date(resource);
        let dates_match = self
            .dates
            .iter()
            .all(|test| date.is_some_and(|span| test.matches(span)));
        let updated = resource["meta"]["lastUpdated"].as_str().and_then(span_of);
        let updated_match = self
            .last_updated
            .iter()
            .all(|test| updated.is_some_and(|span| test.matches(span)));
        tokens_match && dates_match && updated_match
    }

    fn clinical_date(&self, resource: &Value) -> Option<Span> {
        date_elements(&self.resource_type)
            .iter()
            .find_map(|element| resource.get(*element).and_then(element_span))
    }

    /// The matches of `resources`, sorted as asked (undated last either way, the record's
    /// order kept among equals).
    pub fn apply<'a>(&self, resources: &'a [Value]) -> Vec<&'a Value> {
        let mut found: Vec<&Value> = resources.iter().filter(|r| self.matches(r)).collect();
        if let Some(newest_first) = self.sort {
            found.sort_by_key(|resource| {
                let start = self.clinical_date(resource).map(|s| s.start);
                match (start, newest_first) {
                    (Some(start), true) => (false, -(i128::from(start))),
                    (Some(start), false) => (false, i128::from(start)),
                    (None, _) => (true, 0),
                }
            });
        }
        found
    }
}

/// The parameters a type's search takes.
pub fn supported_parameters(resource_type: &str) -> Vec<&'static str> {
    let mut supported = COMMON_PARAMETERS.to_vec();
    if category_element(resource_type).is_some() {
        supported.push("category");
    }
    if has_clinical_status(resource_type) {
        supported.push("clinical-status");
    }
    supported
}

/// What `date` compares for a type, for the CapabilityStatement.
pub fn date_documentation(resource_type: &str) -> String {
    date_elements(resource_type).join(", else ")
}

/// What `code` matches for a type, for the CapabilityStatement.
pub fn code_documentation(resource_type: &str) -> String {
    code_elements(resource_type).join(", ")
}

fn clip(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pairs(query: &[(&str, &str)]) -> Vec<(String, String)> {
        query
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn condition(id: &str, status: &str, code: &str, onset: &str) -> Value {
        json!({
            "resourceType": "Condition", "id": id,
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": status}]},
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": "problem-list-item"}]}],
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": code}]},
            "onsetDateTime": onset,
            "meta": {"lastUpdated": "2026-03-01T09:00:00Z"},
        })
    }

    fn ids(found: &[&Value]) -> Vec<String> {
        found
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn tokens_dates_and_sorting_mean_what_fhir_says() {
        let resources = vec![
            condition("asthma", "active", "195967001", "2001-04-02"),
            condition("fracture", "resolved", "263204007", "2019-07"),
            condition("htn", "active", "38341003", "2024-11-20T10:30:00Z"),
        ];
        let search = |query: &[(&str, &str)]| {
            let search = Search::parse("Condition", &pairs(query)).unwrap();
            ids(&search.apply(&resources))
        };
        assert_eq!(
            search(&[("patient", "9912003888")]),
            ["asthma", "fracture", "htn"]
        );
        assert_eq!(
            search(&[("patient", "9912003888"), ("clinical-status", "active")]),
            ["asthma", "htn"]
        );
        assert_eq!(
            search(&[
                ("patient", "9912003888"),
                ("code", "http://snomed.info/sct|263204007,38341003")
            ]),
            ["fracture", "htn"]
        );
        assert!(
            search(&[
                ("patient", "9912003888"),
                ("code", "http://loinc.org|38341003")
            ])
            .is_empty()
        );
        assert_eq!(
            search(&[("patient", "9912003888"), ("category", "problem-list-item")]).len(),
            3
        );
        // A month is a range: in 2019, on or after 2019-07-15 (part of July is), not before
        // 2019-07-01.
        assert_eq!(search(&[("patient", "p"), ("date", "2019")]), ["fracture"]);
        assert_eq!(
            search(&[("patient", "p"), ("date", "ge2019-07-15")]),
            ["fracture", "htn"]
        );
        assert_eq!(
            search(&[("patient", "p"), ("date", "lt2019-07-01")]),
            ["asthma"]
        );
        assert_eq!(
            search(&[
                ("patient", "p"),
                ("date", "ge2002-01-01"),
                ("date", "lt2024-01-01")
            ]),
            ["fracture"]
        );
        assert_eq!(search(&[("patient", "p"), ("date", "2024-11-20")]), ["htn"]);
        assert_eq!(
            search(&[("patient", "p"), ("_sort", "-date")]),
            ["htn", "fracture", "asthma"]
        );
        assert_eq!(
            search(&[("patient", "p"), ("_lastUpdated", "gt2026-03-02")]).len(),
            0
        );
    }

    #[test]
    fn parameters_a_type_does_not_have_are_refused_not_ignored() {
        let refused = |resource_type: &str, query: &[(&str, &str)]| {
            Search::parse(resource_type, &pairs(query)).unwrap_err()
        };
        assert!(matches!(
            refused(
                "Observation",
                &[("patient", "p"), ("clinical-status", "active")]
            ),
            SearchError::Unsupported { .. }
        ));
        assert!(matches!(
            refused("Immunization", &[("patient", "p"), ("category", "x")]),
            SearchError::Unsupported { .. }
        ));
        assert_eq!(
            refused("Condition", &[("code", "x")]),
            SearchError::NoPatient
        );
        assert_eq!(
            refused(
                "Condition",
                &[("patient", "p"), ("code", "x"), ("code", "y")]
            ),
            SearchError::Repeated("code".into())
        );
        for (name, value) in [
            ("date", "yesterday"),
            ("_count", "0"),
            ("_count", "1000"),
            ("_sort", "name"),
        ] {
            assert!(
                matches!(
                    refused("Condition", &[("patient", "p"), (name, value)]),
                    SearchError::Invalid { .. }
                ),
                "{name}={value}"
            );
        }
        let by_identifier = Search::parse(
            "Observation",
            &pairs(&[(
                "patient.identifier",
                "https://fhir.nhs.uk/Id/nhs-number|9912003888",
            )]),
        )
        .unwrap();
        assert_eq!(by_identifier.patient, "9912003888");
    }

    #[test]
    fn a_period_is_a_range_and_an_open_one_runs_on() {
        let encounter = |period: Value| json!({"resourceType": "Encounter", "period": period});
        let search = |date: &str| {
            Search::parse("Encounter", &pairs(&[("patient", "p"), ("date", date)])).unwrap()
        };
        let open = encounter(json!({"start": "2026-01-10"}));
        assert!(search("ge2026-06-01").matches(&open), "still open in June");
        assert!(!search("lt2026-01-01").matches(&open));
        let closed = encounter(json!({"start": "2026-01-10", "end": "2026-01-12"}));
        assert!(search("2026-01").matches(&closed));
        assert!(!search("gt2026-01-12").matches(&closed));
        assert!(
            !search("ge2026-01-01").matches(&encounter(json!({}))),
            "no date: no match"
        );
    }
}
