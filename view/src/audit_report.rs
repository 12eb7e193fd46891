//! Audit reports: who accessed a patient's record, or what a user accessed, from this node's
//! own trail and the access records other organisations sent about views of data from here;
//! as a table, CSV, JSON or FHIR AuditEvents, for the CLI and for auditors over HTTP.

use caremesh_fhir::clock;
use caremesh_storage::audit::AuditEvent;
use caremesh_storage::{StorageError, Store};
use caremesh_sync::{NhsNumber, OdsCode};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReportFormat {
    Table,
    Csv,
    Json,
    /// A FHIR R4 Bundle of AuditEvent resources.
    Fhir,
}

impl ReportFormat {
    /// Every format, by the name a user gives it.
    pub const ALL: [(&'static str, ReportFormat); 4] = [
        ("table", ReportFormat::Table),
        ("csv", ReportFormat::Csv),
        ("json", ReportFormat::Json),
        ("fhir", ReportFormat::Fhir),
    ];

    /// The format named `text` (any case).
    pub fn parse(text: &str) -> Option<ReportFormat> {
        Self::ALL
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(text.trim()))
            .map(|(_, format)| *format)
    }

    pub fn content_type(self) -> &'static str {
        match self {
            ReportFormat::Table => "text/plain; charset=utf-8",
            ReportFormat::Csv => "text/csv; charset=utf-8",
            ReportFormat::Json => "application/json",
            ReportFormat::Fhir => "application/fhir+json",
        }
    }
}

/// What a report asks for. Exactly one of `patient` and `user`.
#[derive(Debug, Clone)]
pub struct ReportQuery {
    pub patient: Option<NhsNumber>,
    pub user: Option<String>,
    /// Unix seconds, inclusive.
    pub from: Option<i64>,
    /// Unix seconds, exclusive.
    pub to: Option<i64>,
    /// Only entries of this action (view, break-glass…).
    pub action: Option<String>,
}

impl ReportQuery {
    /// From the words a user typed: an NHS number or a user id, and optional days.
    pub fn parse(
        patient: Option<&str>,
        user: Option<&str>,
        from: Option<&str>,
        to: Option<&str>,
    ) -> std::result::Result<ReportQuery, String> {
        let day = |name: &str, text: Option<&str>| -> std::result::Result<Option<i64>, String> {
            text.filter(|t| !t.trim().is_empty())
                .map(|t| {
                    clock::unix_from_date(t)
                        .ok_or_else(|| format!("--{name} `{t}` is not a date: use YYYY-MM-DD"))
                })
                .transpose()
        };
        let patient = patient.filter(|p| !p.trim().is_empty());
        let user = user.map(str::trim).filter(|u| !u.is_empty());
        let query = ReportQuery {
            patient: patient
                .map(|p| NhsNumber::parse(p).map_err(|e| e.to_string()))
                .transpose()?,
            user: user.map(str::to_string),
            from: day("from", from)?,
            to: day("to", to)?.map(|start| start + 86_400),
            action: None,
        };
        match (&query.patient, &query.user, query.from, query.to) {
            (Some(_), Some(_), _, _) => Err("give a patient or a user, not both".into()),
            (None, None, Some(_), Some(_)) => Ok(query),
            (None, None, _, _) => Err(
                "give a patient (NHS number), a user id, or both --from and --to for everything in those days"
                    .into(),
            ),
            _ => Ok(query),
        }
    }

    /// Keeps only entries of `action`, when given.
    pub fn with_action(mut self, action: Option<&str>) -> ReportQuery {
        self.action = action
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_string);
        self
    }

    fn admits(&self, event: &AuditEvent) -> bool {
        let patient = self
            .patient
            .as_ref()
            .is_none_or(|p| event.nhs.as_deref() == Some(p.as_str()));
        let user = self.user.as_ref().is_none_or(|u| event.user_id == *u);
        let from = self.from.is_none_or(|from| event.at >= from);
        let to = self.to.is_none_or(|to| event.at < to);
        let action = self.action.as_ref().is_none_or(|a| event.action == *a);
        patient && user && from && to && action
    }
}

/// One line of a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReportRow {
    /// The organisation whose trail holds the access, and its position there.
    pub recorded_by: String,
    pub entry: i64,
    /// The accessing organisation's name, where this node knows it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub organisation_name: Option<String>,
    #[serde(flatten)]
    pub event: AuditEvent,
}

/// This node's own events and those other organisations sent, that `query` admits, oldest
/// first.
pub fn report(
    store: &Store,
    own: &OdsCode,
    query: &ReportQuery,
) -> Result<Vec<ReportRow>, StorageError> {
    let mut rows: Vec<ReportRow> = store
        .audit_events()?
        .into_iter()
        .filter(|chained| query.admits(&chained.event))
        .map(|chained| ReportRow {
            recorded_by: own.to_string(),
            entry: chained.seq,
            organisation_name: None,
            event: chained.event,
        })
        .collect();
    rows.extend(
        store
            .received_access_records(own, query.patient.as_ref())?
            .into_iter()
            .filter(|(_, _, event)| query.admits(event))
            .map(|(publisher, seq, event)| ReportRow {
                recorded_by: publisher.to_string(),
                entry: seq,
                organisation_name: None,
                event,
            }),
    );
    // "Where" reads as a name, not only a code.
    let names: std::collections::HashMap<String, String> = store
        .sources()?
        .into_iter()
        .map(|source| (source.publisher, source.name))
        .collect();
    for row in &mut rows {
        row.organisation_name = names.get(&row.event.organisation).cloned();
    }
    rows.sort_by(|a, b| {
        (a.event.at, &a.recorded_by, a.entry).cmp(&(b.event.at, &b.recorded_by, b.entry))
    });
    Ok(rows)
}

pub fn render(rows: &[ReportRow], format: ReportFormat) -> String {
    match format {
        ReportFormat::Table => render_table(rows),
        ReportFormat::Csv => render_csv(rows),
        ReportFormat::Json => serde_json::to_string_pretty(rows).expect("rows serialise") + "\n",
        ReportFormat::Fhir => {
            serde_json::to_string_pretty(&fhir_bundle(rows)).expect("bundle serialises") + "\n"
        }
    }
}

fn shown(event: &AuditEvent) -> String {
    if event.sources.is_empty() {
        "-".into()
    } else {
        format!("{} [{}]", event.sources.join(" "), event.sections.join(" "))
    }
}

/// The columns of a report as people read it (table and HTML).
pub const REPORT_COLUMNS: [&str; 9] = [
    "Time (UTC)",
    "Where",
    "User",
    "Role",
    "Action",
    "Patient",
    "Purpose",
    "Outcome",
    "Shown",
];

/// One row's cells under [`REPORT_COLUMNS`], as plain text.
pub fn report_cells(row: &ReportRow) -> [String; 9] {
    let e = &row.event;
    let outcome = if e.detail.is_empty() {
        e.outcome.clone()
    } else {
        format!("{}: {}", e.outcome, e.detail)
    };
    [
        clock::uk_date_time(e.at),
        match &row.organisation_name {
            Some(name) => format!("{name} ({}) #{}", e.organisation, row.entry),
            None => format!("{} #{}", e.organisation, row.entry),
        },
        format!("{} ({})", e.user_name, e.user_id),
        e.role.clone(),
        e.action.clone(),
        e.nhs
            .as_deref()
            .and_then(|n| NhsNumber::parse(n).ok())
            .map_or_else(|| "-".into(), |n| n.formatted()),
        e.purpose.clone(),
        outcome,
        shown(e),
    ]
}

fn render_table(rows: &[ReportRow]) -> String {
    let header = REPORT_COLUMNS;
    // Reasons and names come from users and tokens: shown, never obeyed by the terminal.
    let lines: Vec<[String; 9]> = rows
        .iter()
        .map(|row| report_cells(row).map(|cell| caremesh_fhir::clock::printable(&cell)))
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for line in &lines {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let format_line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        padded.join("  ").trim_end().to_string() + "\n"
    };
    let mut out = format_line(&header.map(String::from));
    for line in &lines {
        out.push_str(&format_line(line));
    }
    out.push_str(&format!("{} access(es)\n", rows.len()));
    out
}

/// RFC 4180 quoting, and a leading apostrophe on cells a spreadsheet would run as a formula.
fn csv_cell(text: &str) -> String {
    let text = caremesh_fhir::clock::printable(text);
    let safe = if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{text}")
    } else {
        text.to_string()
    };
    format!("\"{}\"", safe.replace('"', "\"\""))
}

fn render_csv(rows: &[ReportRow]) -> String {
    let mut out = String::from(
        "time,recorded_by,entry,organisation,user_id,user_name,role,action,nhs_number,sources,sections,purpose,outcome,detail\n",
    );
    for row in rows {
        let e = &row.event;
        let cells = [
            clock::rfc3339(e.at),
            row.recorded_by.clone(),
            row.entry.to_string(),
            e.organisation.clone(),
            e.user_id.clone(),
            e.user_name.clone(),
            e.role.clone(),
            e.action.clone(),
            e.nhs.clone().unwrap_or_default(),
            e.sources.join(" "),
            e.sections.join(" "),
            e.purpose.clone(),
            e.outcome.clone(),
            e.detail.clone(),
        ];
        let line: Vec<String> = cells.iter().map(|c| csv_cell(c)).collect();
        out.push_str(&line.join(","));
        out.push('\n');
    }
    out
}

const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";

/// FHIR R4 AuditEvent for one row: DICOM "Patient Record" events, the user as the
/// requesting agent, the organisation where it happened as the source, and the patient and
/// each organisation whose data was shown as entities.
fn fhir_audit_event(row: &ReportRow) -> serde_json::Value {
    let e = &row.event;
    let (subtype, action) = match e.action.as_str() {
        "search" => ("search-type", "E"),
        "break-glass" => ("create", "E"),
        "audit-report" => ("search-system", "E"),
        _ => ("read", "R"),
    };
    let allowed = e.outcome == "allowed";
    let emergency = e.action == "break-glass" || e.purpose.contains("emergency");
    let mut entities = Vec::new();
    if let Some(nhs) = &e.nhs {
        entities.push(serde_json::json!({
            "what": { "identifier": { "system": NHS_NUMBER_SYSTEM, "value": nhs } },
            "type": { "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1", "display": "Person" },
            "role": { "system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient" }
        }));
    }
    for source in &e.sources {
        entities.push(serde_json::json!({
            "what": { "identifier": { "system": ODS_SYSTEM, "value": source } },
            "type": { "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object" },
            "role": { "system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "4", "display": "Domain Resource" },
            "description": format!("data published by {source}"),
            "detail": [{ "type": "sections", "valueString": e.sections.join(" ") }]
        }));
    }
    let mut event = serde_json::json!({
        "resourceType": "AuditEvent",
        "id": format!("{}-{}", row.recorded_by, row.entry),
        "type": { "system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110110", "display": "Patient Record" },
        "subtype": [{ "system": "http://hl7.org/fhir/restful-interaction", "code": subtype }],
        "action": action,
        "recorded": clock::rfc3339(e.at),
        "outcome": if allowed { "0" } else { "4" },
        "purposeOfEvent": [{
            "coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                "code": if emergency { "ETREAT" } else { "TREAT" }
            }],
            "text": e.purpose
        }],
        "agent": [{
            "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type", "code": "humanuser", "display": "human user" }] },
            "role": [{ "text": e.role }],
            "who": { "identifier": { "value": e.user_id }, "display": e.user_name },
            "requestor": true
        }],
        "source": {
            "site": e.organisation,
            "observer": { "identifier": { "system": ODS_SYSTEM, "value": e.organisation } }
        },
        "entity": entities
    });
    if !e.detail.is_empty() {
        event["outcomeDesc"] = serde_json::Value::String(e.detail.clone());
    }
    event
}

pub fn fhir_bundle(rows: &[ReportRow]) -> serde_json::Value {
    serde_json::json!({
        "resourceType": "Bundle",
        "type": "collection",
        "total": rows.len(),
        "entry": rows
            .iter()
            .map(|row| serde_json::json!({ "resource": fhir_audit_event(row) }))
            .collect::<Vec<_>>()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(at: i64, user: &str, nhs: &str) -> AuditEvent {
        AuditEvent {
            at,
            user_id: user.into(),
            user_name: "Dr A, \"Ward\" 7".into(),
            role: "clinician".into(),
            organisation: "RTH".into(),
            action: "view".into(),
            nhs: Some(nhs.into()),
            sources: vec!["A81001".into(), "RTH".into()],
            sections: vec!["medications".into()],
            purpose: "direct care".into(),
            outcome: "allowed".into(),
            detail: "=HYPERLINK(\"x\")".into(),
        }
    }

    #[test]
    fn queries_filter_by_patient_user_and_days() {
        let query = ReportQuery::parse(
            Some("9912003888"),
            None,
            Some("2026-11-22"),
            Some("2026-11-22"),
        )
        .unwrap();
        let day = clock::unix_from_date("2026-11-22").unwrap();
        assert!(query.admits(&event(day, "u1", "9912003888")));
        assert!(query.admits(&event(day + 86_399, "u1", "9912003888")));
        assert!(!query.admits(&event(day + 86_400, "u1", "9912003888")));
        assert!(!query.admits(&event(day - 1, "u1", "9912003888")));
        assert!(!query.admits(&event(day, "u1", "9434765919")));
        let by_user = ReportQuery::parse(None, Some("u2"), None, None).unwrap();
        assert!(by_user.admits(&event(day, "u2", "9434765919")));
        assert!(!by_user.admits(&event(day, "u1", "9434765919")));
        assert!(ReportQuery::parse(None, None, None, None).is_err());
        // Everything in a range of days, of one action: all break-glass this month.
        let month = ReportQuery::parse(None, None, Some("2026-11-01"), Some("2026-11-30"))
            .unwrap()
            .with_action(Some("break-glass"));
        let mut glass = event(day, "u1", "9912003888");
        glass.action = "break-glass".into();
        assert!(month.admits(&glass));
        assert!(!month.admits(&event(day, "u1", "9912003888")));
        assert!(ReportQuery::parse(None, None, Some("2026-11-01"), None).is_err());
        assert!(ReportQuery::parse(Some("9912003888"), Some("u1"), None, None).is_err());
        assert!(
            ReportQuery::parse(Some("9912003888"), None, Some("22/11/2026"), None)
                .unwrap_err()
                .contains("YYYY-MM-DD")
        );
    }

    #[test]
    fn csv_quotes_every_cell_and_defuses_formulas() {
        let rows = [ReportRow {
            recorded_by: "RTH".into(),
            entry: 4,
            organisation_name: None,
            event: event(1_795_305_600, "u1", "9912003888"),
        }];
        let csv = render(&rows, ReportFormat::Csv);
        let line = csv.lines().nth(1).unwrap();
        assert!(line.starts_with("\"2026-11-22T00:00:00Z\",\"RTH\",\"4\",\"RTH\",\"u1\""));
        assert!(line.contains("\"Dr A, \"\"Ward\"\" 7\""), "{line}");
        assert!(line.ends_with("\"'=HYPERLINK(\"\"x\"\")\""), "{line}");
    }

    #[test]
    fn fhir_reports_are_audit_events_naming_user_patient_and_sources() {
        let rows = [ReportRow {
            recorded_by: "RTH".into(),
            entry: 4,
            organisation_name: None,
            event: event(1_795_305_600, "u1", "9912003888"),
        }];
        let bundle = fhir_bundle(&rows);
        assert_eq!(bundle["resourceType"], "Bundle");
        assert_eq!(bundle["total"], 1);
        let audit = &bundle["entry"][0]["resource"];
        assert_eq!(audit["resourceType"], "AuditEvent");
        assert_eq!(audit["id"], "RTH-4");
        assert_eq!(audit["type"]["code"], "110110");
        assert_eq!(audit["action"], "R");
        assert_eq!(audit["recorded"], "2026-11-22T00:00:00Z");
        assert_eq!(audit["outcome"], "0");
        assert_eq!(audit["agent"][0]["who"]["identifier"]["value"], "u1");
        assert_eq!(audit["agent"][0]["requestor"], true);
        assert_eq!(audit["source"]["observer"]["identifier"]["value"], "RTH");
        assert_eq!(
            audit["entity"][0]["what"]["identifier"]["value"],
            "9912003888"
        );
        assert_eq!(audit["entity"][1]["what"]["identifier"]["value"], "A81001");
        assert_eq!(audit["entity"][2]["what"]["identifier"]["value"], "RTH");
    }
}
