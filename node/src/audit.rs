//! The audit trail as people use it: recording each access (and sending it to the data
//! owners), checking the hash chain, and reports per patient or per user, for the CLI and
//! for auditors over HTTP.

use crate::home::Home;
use anyhow::{Context, Result, bail};
use caremesh_fhir::clock;
use caremesh_storage::Store;
use caremesh_storage::audit::{AuditEvent, ChainedEvent, verify_chain, verify_chain_after};
use caremesh_sync::{AuditCheckpoint, NhsNumber, OdsCode, PublisherKey, SignedCheckpoint};
use clap::{Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check that no entry of the audit trail was edited, removed, inserted or reordered, and
    /// that it still holds what every signed checkpoint known (this node's own, and the
    /// receipts of peers that witness them) says it held. Exits 1 and names what is wrong.
    Verify {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Sign a checkpoint of the audit trail now (a running node signs one every few minutes
    /// and on shutdown, and hands it to its peers to witness).
    Checkpoint {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Who accessed a patient's record, or what a user accessed: this node's own trail and
    /// the access records other organisations sent about views of data from here.
    Report {
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        query: ReportArgs,
    },
}

/// What `caremesh audit report` asks for.
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
pub struct ReportArgs {
    /// The patient's NHS number. Without a patient or a user, --from and --to give a
    /// report of everything in those days.
    #[arg(long, conflicts_with = "user", required_unless_present_any = ["user", "from"])]
    pub patient: Option<String>,
    /// The user id (as the launch token gave it).
    #[arg(long)]
    pub user: Option<String>,
    /// First day included, YYYY-MM-DD (UTC).
    #[arg(long)]
    pub from: Option<String>,
    /// Last day included, YYYY-MM-DD (UTC).
    #[arg(long)]
    pub to: Option<String>,
    /// Only entries of this action: view, break-glass, consent-set, refused-anonymous…
    #[arg(long)]
    pub action: Option<String>,
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    pub format: ReportFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum ReportFormat {
    Table,
    Csv,
    Json,
    /// A FHIR R4 Bundle of AuditEvent resources.
    Fhir,
}

impl ReportFormat {
    pub fn parse(text: &str) -> Option<ReportFormat> {
        ReportFormat::from_str(text, true).ok()
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
pub fn report(store: &Store, own: &OdsCode, query: &ReportQuery) -> Result<Vec<ReportRow>> {
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

/// `caremesh audit verify`, which only reads.
pub fn verify(dir: &std::path::Path) -> Result<ExitCode> {
    let home = Home::open(dir)?;
    let store = home.open_store()?;
    let events = store.audit_events()?;
    let own = home.config.organisation.ods.clone();
    let own_key = home.public_key()?;
    let known = store.own_checkpoints_known()?;
    let checked = check_against_checkpoints(&events, &known, &own, &own_key);
    let mut broken = checked.problems;
    if let Err(chain) = verify_chain(&events) {
        broken.insert(0, chain.to_string());
    }
    if !broken.is_empty() {
        for problem in &broken {
            println!("audit trail BROKEN: {problem}");
        }
        return Ok(ExitCode::from(1));
    }
    println!("audit trail intact: {} entries", events.len());
    match checked.newest {
        Some(newest) => println!("matches {newest}"),
        None => println!(
            "no signed checkpoint yet: entries cut from the end could not be told (run `caremesh audit checkpoint`)"
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// The report `query` asks for, recorded in the trail as `operator`'s access: reading the
/// trail is itself an access to patient data.
pub fn report_as(
    home: &Home,
    store: &mut Store,
    operator: &str,
    query: &ReportQuery,
) -> Result<Vec<ReportRow>> {
    let own = home.config.organisation.ods.clone();
    let rows = report(store, &own, query).context("reading the audit trail")?;
    let event = AuditEvent {
        at: clock::now_unix(),
        user_id: operator.to_string(),
        user_name: operator.to_string(),
        role: "operator".into(),
        organisation: own.to_string(),
        action: "audit-report".into(),
        nhs: query.patient.as_ref().map(|n| n.to_string()),
        sources: Vec::new(),
        sections: Vec::new(),
        purpose: "audit".into(),
        outcome: "allowed".into(),
        detail: query
            .user
            .as_ref()
            .map(|u| format!("report on user {u}"))
            .unwrap_or_default(),
    };
    // Written even on a full disk (from the reserve): the report is what a data protection
    // officer needs most when something has gone wrong.
    crate::disk::write_even_when_full(&home.dir, || Ok(store.append_audit(&event)?))?;
    Ok(rows)
}

/// How often a running node signs a checkpoint of its audit trail (when it grew).
pub const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(5 * 60);

/// Signs a checkpoint for the node in `home` through its store writer, logging instead of
/// failing: a running node's periodic and shutdown checkpoints.
pub async fn checkpoint_now(home: &Home, writer: &crate::network::StoreWriter) {
    let own = home.config.organisation.ods.clone();
    let signed = match home.signing_key() {
        Ok(key) => {
            writer
                .write(move |store| sign_checkpoint(store, &key, &own, clock::now_unix()))
                .await
        }
        Err(error) => Err(error.into()),
    };
    match signed {
        Ok(Some(signed)) => tracing::info!(
            entries = signed.checkpoint.count,
            "signed an audit checkpoint"
        ),
        Ok(None) => {}
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "could not sign an audit checkpoint")
        }
    }
}

/// Signs a checkpoint of the trail as it stands, if it grew since the last one. The entries
/// since the last checkpoint are checked first: a checkpoint never vouches for a broken chain.
pub fn sign_checkpoint(
    store: &mut Store,
    key: &PublisherKey,
    own: &OdsCode,
    now: i64,
) -> Result<Option<SignedCheckpoint>> {
    let (after, hash) = match store.newest_own_checkpoint()? {
        Some(bytes) => {
            let last = SignedCheckpoint::decode(&bytes)
                .context("the newest audit checkpoint held here does not decode")?;
            (last.checkpoint.count as i64, last.checkpoint.head)
        }
        None => (0, [0u8; 32]),
    };
    let events = store.audit_events_after(after)?;
    let Some(last) = events.last() else {
        return Ok(None);
    };
    if let Err(broken) = verify_chain_after(after, &hash, &events) {
        bail!(
            "the audit trail is broken since the last checkpoint ({broken}); no checkpoint was signed: run `caremesh audit verify`"
        );
    }
    let signed = key.sign_checkpoint(AuditCheckpoint {
        organisation: own.clone(),
        count: last.seq as u64,
        head: last.hash,
        at: now,
    });
    let batch = store.write()?;
    batch.save_own_checkpoint(&signed)?;
    batch.commit()?;
    Ok(Some(signed))
}

/// The trail checked against every checkpoint of it known here.
pub struct CheckpointCheck {
    /// What is wrong, each naming the gap and where the checkpoint showing it is held.
    pub problems: Vec<String>,
    /// The newest checkpoint the trail matches, described, if any.
    pub newest: Option<String>,
}

/// Checks `events` (the whole trail, in order) against `known` checkpoints (who holds each:
/// `None` for this node, else the witness; encoded). A checkpoint of `count` entries must find
/// the trail at least that long, with entry `count` hashing to its head.
pub fn check_against_checkpoints(
    events: &[ChainedEvent],
    known: &[(Option<String>, Vec<u8>)],
    own: &OdsCode,
    own_key: &[u8; 32],
) -> CheckpointCheck {
    let mut problems = Vec::new();
    let mut valid: Vec<(SignedCheckpoint, String)> = Vec::new();
    for (holder, bytes) in known {
        let held = match holder {
            None => "here".to_string(),
            Some(witness) => format!("by witness {witness}"),
        };
        match SignedCheckpoint::decode(bytes) {
            Ok(signed) => match signed.verify(|ods, key| ods == own && key == own_key) {
                Ok(()) => valid.push((signed, held)),
                Err(error) => problems.push(format!("a checkpoint held {held}: {error}")),
            },
            Err(error) => problems.push(format!("a checkpoint held {held}: {error}")),
        }
    }
    valid.sort_by_key(|(signed, _)| std::cmp::Reverse(signed.checkpoint.count));
    let held_by = |count: u64| -> String {
        let holders: Vec<&str> = valid
            .iter()
            .filter(|(s, _)| s.checkpoint.count == count)
            .map(|(_, held)| held.as_str())
            .collect();
        holders.join(" and ")
    };
    let mut newest = None;
    let mut reported = std::collections::BTreeSet::new();
    for (signed, _) in &valid {
        let checkpoint = &signed.checkpoint;
        if !reported.insert(checkpoint.count) {
            continue; // one line per checkpoint, naming everyone who holds it
        }
        let when = clock::uk_date_time(checkpoint.at);
        let held = held_by(checkpoint.count);
        let length = events.len() as u64;
        if checkpoint.count == 0 {
            continue; // nothing to hold the trail to
        }
        if checkpoint.count > length {
            problems.push(format!(
                "entries {} to {} are missing: the trail holds {length}, but this node signed a checkpoint of {} entries on {when} (held {held})",
                length + 1,
                checkpoint.count,
                checkpoint.count
            ));
        } else if events[checkpoint.count as usize - 1].hash != checkpoint.head {
            problems.push(format!(
                "entries up to {} were rewritten: entry {} no longer hashes to the head this node signed on {when} (held {held})",
                checkpoint.count, checkpoint.count
            ));
        } else if newest.is_none() {
            newest = Some(format!(
                "the newest checkpoint: {} entries, signed on {when}, held {held}",
                checkpoint.count
            ));
        }
    }
    CheckpointCheck { problems, newest }
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
