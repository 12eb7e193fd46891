//! The record as FHIR R4 resources: what the `/fhir` API serves.
//!
//! Nothing here decides what a viewer may see. [`crate::record::assemble`] decides that
//! once, for the page, the JSON API and this module alike: a resource is rendered here only
//! if the page would show its item. What this module adds is what an integrator's FHIR
//! client needs to read the publishers' resources side by side:
//!
//! * a logical id unique on this node for each resource ([`logical_id`]), since two
//!   organisations' `Condition/1` are different facts;
//! * `meta.source` naming the publishing organisation and its clinical system, and the
//!   publisher's confidentiality label in `meta.security`;
//! * the narrative put back as a `note`, only where the viewer is shown it (an agreement may
//!   withhold free text and not the coded fact, so narrative travels as an item of its own);
//! * references resolved to what this node serves: the patient to `Patient/{NHS number}`,
//!   another shown resource of the same publisher to its logical id. Any other reference
//!   to who or where keeps its display and type and loses its target, which this node does
//!   not serve; any other is left saying only that it was, since its target may be
//!   withheld (naming or describing it would say that it exists and what it is);
//! * a Provenance resource per publisher, naming the organisation and listing its resources.
//!
//! The same fact from several organisations stays several resources: nothing is merged.

use crate::record::{ItemView, Record, SourcedPatient};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};

pub const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";
pub const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
const CONFIDENTIALITY_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality";
/// Who and where a fact was recorded: references to these keep their type when their target
/// is not served.
const PARTICIPANT_TYPES: &[&str] = &[
    "Practitioner",
    "PractitionerRole",
    "Organization",
    "Location",
    "RelatedPerson",
    "Device",
];
/// FHIR R4's limit on a logical id's length (`[A-Za-z0-9\-\.]{1,64}`).
const MAX_ID_CHARS: usize = 64;

/// A patient's record as FHIR resources, for one viewer.
#[derive(Debug)]
pub struct FhirRecord {
    /// `Patient/{NHS number}`: the banner's source's Patient resource, linked to the other
    /// sources' own.
    pub patient: Value,
    /// Every shown resource, each source's own Patient resource among them (the banner's
    /// source's is [`FhirRecord::patient`] instead), in the page's order.
    pub resources: Vec<Value>,
    /// One Provenance per publisher whose resources are shown.
    pub provenance: Vec<Value>,
    /// What the page says beside the record: what sharing rules withheld, what Share In
    /// hides, break-glass, out-of-date and unverified sources, disagreements on who the
    /// patient is, corrections, section warnings. A client that is not told would read
    /// an absence as a fact.
    pub notices: Vec<Notice>,
}

/// A notice the page shows beside the record, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub severity: Severity,
    pub text: String,
}

/// An OperationOutcome issue's severity: a warning must be read before the record is
/// relied on; information says what the record does not hold and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Warning,
    Information,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Information => "information",
        }
    }
}

/// The page's notices for `record`, in the page's order.
pub fn notices(record: &Record) -> Vec<Notice> {
    let warning = |text: String| Notice {
        severity: Severity::Warning,
        text,
    };
    let information = |text: String| Notice {
        severity: Severity::Information,
        text,
    };
    let mut notices = Vec::new();
    for conflict in &record.demographic_conflicts {
        let versions: Vec<String> = conflict
            .versions
            .iter()
            .map(|(source, value)| format!("{source} says {value}"))
            .collect();
        notices.push(warning(format!(
            "Sources disagree on the patient's {}: {}.",
            conflict.field.to_lowercase(),
            versions.join("; ")
        )));
    }
    for correction in &record.corrections {
        notices.push(information(correction.text.clone()));
    }
    if let Some(granted) = &record.break_glass {
        notices.push(warning(format!(
            "Emergency access (break-glass) by {} until {}: {}. What is shown only because of it is recorded and its organisations are told.",
            granted.clinician,
            caremesh_fhir::clock::rfc3339(granted.expires_at),
            granted.reason
        )));
    } else if record.hidden_without_share_in > 0 {
        notices.push(warning(format!(
            "{} from other organisations not shown: the patient's Share In is not recorded at this organisation.",
            crate::record::items_phrase(record.hidden_without_share_in)
        )));
    }
    for source in record.sources.iter().filter(|s| s.stale) {
        notices.push(warning(format!(
            "Data from {} ({}) may be out of date: the newest is from {}; it is expected every {} hours.",
            source.name,
            source.ods,
            source.data_as_of,
            source.expected_refresh_hours.unwrap_or_default()
        )));
    }
    for source in &record.unverified_sources {
        notices.push(warning(source.notice()));
    }
    for source in &record.withheld_sources {
        notices.push(information(format!(
            "No data from {} ({}) is shown: {}.",
            source.name, source.ods, source.reason
        )));
    }
    for section in &record.sections {
        for text in &section.warnings {
            notices.push(warning(format!("{}: {text}", section.title)));
        }
        if section.withheld_by_sharing_rules > 0 {
            notices.push(information(format!(
                "{}: {} withheld by sharing rules.",
                section.title,
                crate::record::items_phrase(section.withheld_by_sharing_rules as usize)
            )));
        }
    }
    notices
}

/// Renders the viewer's record as FHIR resources. `record` holds only what the viewer may
/// see; so does what this returns.
pub fn render(record: &Record) -> FhirRecord {
    let nhs = record.nhs_number.as_str();
    let targets = Targets::of(record);
    let notes = notes_by_fact(record);
    let mut published = Published::default();
    let mut patients = record.patients.iter();
    let mut patient = match patients.next() {
        Some(first) => published.add(&targets, first.into(), nhs.to_string()),
        None => bare_patient(nhs),
    };
    link_other_sources(&mut patient, &record.patients);
    let mut resources: Vec<Value> = patients
        .map(|other| {
            let id = logical_id(&other.ods, &other.source_id);
            published.add(&targets, other.into(), id)
        })
        .collect();
    for item in record.sections.iter().flat_map(|s| &s.items) {
        let Some(shown) = Shown::of_item(item) else {
            continue;
        };
        let id = logical_id(shown.ods, shown.source_id);
        let mut resource = published.add(&targets, shown, id);
        if let Some(note) = notes.get(&(shown.ods, shown.source_id)) {
            add_note(&mut resource, note);
        }
        resources.push(resource);
    }
    let provenance = published
        .0
        .into_iter()
        .map(|(ods, targets)| provenance_of(ods, record, targets))
        .collect();
    FhirRecord {
        patient,
        resources,
        provenance,
        notices: notices(record),
    }
}

/// A shown resource with what the renderer needs to know of its source.
#[derive(Clone, Copy)]
struct Shown<'a> {
    resource: &'a Value,
    ods: &'a str,
    system: &'a str,
    /// `Type/id` at the publisher.
    source_id: &'a str,
    confidentiality: Option<&'a str>,
}

impl<'a> Shown<'a> {
    fn of_item(item: &'a ItemView) -> Option<Shown<'a>> {
        Some(Shown {
            resource: item.resource.as_ref()?,
            ods: &item.source.organisation,
            system: &item.source.system,
            source_id: &item.source.resource,
            confidentiality: item.confidentiality.as_deref(),
        })
    }
}

impl<'a> From<&'a SourcedPatient> for Shown<'a> {
    fn from(patient: &'a SourcedPatient) -> Shown<'a> {
        Shown {
            resource: &patient.resource,
            ods: &patient.ods,
            system: &patient.system,
            source_id: &patient.source_id,
            confidentiality: patient.confidentiality.as_deref(),
        }
    }
}

/// The resources rendered so far, as `Type/id` by publisher (for the Provenance).
#[derive(Default)]
struct Published<'a>(BTreeMap<&'a str, Vec<String>>);

impl<'a> Published<'a> {
    /// The resource as served under `id`: stamped with its source, its references resolved.
    fn add(&mut self, targets: &Targets, shown: Shown<'a>, id: String) -> Value {
        let mut resource = shown.resource.clone();
        stamp(
            &mut resource,
            &id,
            shown.ods,
            shown.system,
            shown.confidentiality,
        );
        targets.resolve(&mut resource, shown.ods);
        let resource_type = resource["resourceType"].as_str().unwrap_or("Resource");
        self.0
            .entry(shown.ods)
            .or_default()
            .push(format!("{resource_type}/{id}"));
        resource
    }
}

/// A resource's logical id on this node: `{ODS}-{publisher's id}` where that is a valid id,
/// else the SHA-256 of the publisher and its `Type/id` in hex (64 characters), so that ids
/// from different publishers never collide and a publisher's id is never cut short.
/// A UUID (version 4 in form) derived from `name`: the same name always gives the same one,
/// so that a resource made twice from the same facts has the same identity.
pub fn name_based_uuid(name: &str) -> String {
    let hex = hex::encode(&Sha256::digest(name.as_bytes())[..16]);
    format!(
        "{}-{}-4{}-8{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

pub fn logical_id(ods: &str, source_id: &str) -> String {
    let own = source_id.split_once('/').map_or(source_id, |(_, id)| id);
    let candidate = format!("{ods}-{own}");
    let valid = candidate.len() <= MAX_ID_CHARS
        && candidate
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if valid {
        return candidate;
    }
    hex::encode(Sha256::digest(format!("{ods}\0{source_id}").as_bytes()))
}

/// `meta.source` for a publisher's resource: its ODS code, and its clinical system as the
/// fragment.
pub fn meta_source(ods: &str, system: &str) -> String {
    let system: String = system
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect();
    format!("{ODS_SYSTEM}/{ods}#{system}")
}

/// Sets the logical id, `meta.source` and the confidentiality label, and drops the
/// `fhir_comments` some extracts carry (DSTU2's JSON comments, which R4 does not define and
/// strict clients refuse; they are never clinical content).
fn stamp(resource: &mut Value, id: &str, ods: &str, system: &str, confidentiality: Option<&str>) {
    drop_comments(resource);
    let Some(object) = resource.as_object_mut() else {
        return;
    };
    object.insert("id".into(), Value::String(id.to_string()));
    let meta = object
        .entry("meta")
        .or_insert_with(|| Value::Object(Map::new()));
    let Some(meta) = meta.as_object_mut() else {
        return;
    };
    meta.insert("source".into(), Value::String(meta_source(ods, system)));
    let Some(code) = confidentiality else {
        return;
    };
    let security = meta
        .entry("security")
        .or_insert_with(|| Value::Array(Vec::new()));
    if let Some(labels) = security.as_array_mut() {
        let labelled = labels.iter().any(|label| {
            label["system"].as_str() == Some(CONFIDENTIALITY_SYSTEM)
                && label["code"].as_str() == Some(code)
        });
        if !labelled {
            labels.push(json!({ "system": CONFIDENTIALITY_SYSTEM, "code": code }));
        }
    }
}

fn drop_comments(value: &mut Value) {
    match value {
        Value::Object(object) => {
            object.remove("fhir_comments");
            object.values_mut().for_each(drop_comments);
        }
        Value::Array(values) => values.iter_mut().for_each(drop_comments),
        _ => {}
    }
}

/// The narrative shown with each fact, by (publisher, source resource).
fn notes_by_fact(record: &Record) -> BTreeMap<(&str, &str), &str> {
    record
        .sections
        .iter()
        .flat_map(|s| &s.items)
        .filter(|item| item.note_of.is_some())
        .filter_map(|item: &ItemView| {
            Some((
                (
                    item.source.organisation.as_str(),
                    item.source.resource.as_str(),
                ),
                item.detail.as_deref()?,
            ))
        })
        .collect()
}

fn add_note(resource: &mut Value, note: &str) {
    if let Some(object) = resource.as_object_mut() {
        object.insert("note".into(), json!([{ "text": note }]));
    }
}

/// What references may point at: the patient, and each publisher's shown resources.
struct Targets<'a> {
    nhs: &'a str,
    /// (publisher, `Type/id` at the publisher) to `Type/logical id`.
    shown: BTreeMap<(&'a str, &'a str), String>,
    /// (publisher, `Patient/id` at the publisher): all mean this patient.
    patients: BTreeSet<(&'a str, &'a str)>,
}

impl<'a> Targets<'a> {
    fn of(record: &'a Record) -> Targets<'a> {
        let shown = record
            .sections
            .iter()
            .flat_map(|s| &s.items)
            .filter(|item| item.resource.is_some())
            .map(|item| {
                let (ods, source_id) = (
                    item.source.organisation.as_str(),
                    item.source.resource.as_str(),
                );
                let resource_type = source_id.split_once('/').map_or("", |(t, _)| t);
                (
                    (ods, source_id),
                    format!("{resource_type}/{}", logical_id(ods, source_id)),
                )
            })
            .collect();
        let patients = record
            .patients
            .iter()
            .map(|p| (p.ods.as_str(), p.source_id.as_str()))
            .collect();
        Targets {
            nhs: &record.nhs_number,
            shown,
            patients,
        }
    }

    /// Points every reference in `resource` (published by `ods`) at what this node serves,
    /// or takes its target away; a reference that names the patient by NHS number only is
    /// given its target here, `Patient/{NHS number}`.
    fn resolve(&self, resource: &mut Value, ods: &str) {
        match resource {
            Value::Object(object) => {
                if let Some(Value::String(target)) = object.get("reference").cloned() {
                    if let Some(replacement) = self.target(ods, &target) {
                        object.insert("reference".into(), Value::String(replacement));
                    } else if !target.starts_with('#') {
                        let kind = target.split('/').rev().nth(1).unwrap_or_default();
                        object.remove("reference");
                        if PARTICIPANT_TYPES.contains(&kind) {
                            // Who and where stay readable: the name and the type.
                            if !object.contains_key("type") {
                                object.insert("type".into(), Value::String(kind.to_string()));
                            }
                        } else {
                            // A clinical resource not shown here may be withheld: what the
                            // publisher wrote of it (its display, its identifier) goes with
                            // its target, so that nothing of it is read through this one.
                            object.remove("display");
                            object.remove("identifier");
                            object.remove("type");
                        }
                        if object.is_empty() {
                            // A reference must say something: that it was, not where.
                            object.insert(
                                "display".into(),
                                Value::String("not held on this node".into()),
                            );
                        }
                    }
                } else if self.names_the_patient(object) {
                    object.insert(
                        "reference".into(),
                        Value::String(format!("Patient/{}", self.nhs)),
                    );
                }
                for value in object.values_mut() {
                    self.resolve(value, ods);
                }
            }
            Value::Array(values) => {
                for value in values {
                    self.resolve(value, ods);
                }
            }
            _ => {}
        }
    }

    /// A reference by identifier alone to this patient's NHS number (how ingest names the
    /// subject).
    fn names_the_patient(&self, object: &Map<String, Value>) -> bool {
        let identifier = &object.get("identifier");
        identifier.is_some_and(|i| {
            i["system"].as_str() == Some(NHS_NUMBER_SYSTEM) && i["value"].as_str() == Some(self.nhs)
        })
    }

    fn target(&self, ods: &str, reference: &str) -> Option<String> {
        if self.patients.contains(&(ods, reference)) {
            return Some(format!("Patient/{}", self.nhs));
        }
        self.shown.get(&(ods, reference)).cloned()
    }
}

/// A Patient resource when no source's demographics are shown: the NHS number only.
fn bare_patient(nhs: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "id": nhs,
        "identifier": [{ "system": NHS_NUMBER_SYSTEM, "value": nhs }],
    })
}

/// The other sources' Patient resources, as `link`s of type `seealso`.
fn link_other_sources(patient: &mut Value, sources: &[SourcedPatient]) {
    let links: Vec<Value> = sources
        .iter()
        .skip(1)
        .map(|p| {
            json!({
                "other": { "reference": format!("Patient/{}", logical_id(&p.ods, &p.source_id)) },
                "type": "seealso",
            })
        })
        .collect();
    if let (false, Some(object)) = (links.is_empty(), patient.as_object_mut()) {
        object.insert("link".into(), Value::Array(links));
    }
}

fn provenance_of(ods: &str, record: &Record, targets: Vec<String>) -> Value {
    let source = record.sources.iter().find(|s| s.ods == ods);
    let name = source.map_or(ods, |s| s.name.as_str());
    // When the publisher's extract was taken, else when this view was assembled.
    let recorded = source
        .map(|s| s.data_as_of.as_str())
        .filter(|at| !at.is_empty())
        .unwrap_or(record.assembled_at.as_str());
    json!({
        "resourceType": "Provenance",
        "id": format!("{ods}-provenance"),
        "target": targets.iter().map(|t| json!({ "reference": t })).collect::<Vec<_>>(),
        "recorded": recorded,
        "agent": [{
            "type": { "coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                "code": "author",
            }]},
            "who": {
                "identifier": { "system": ODS_SYSTEM, "value": ods },
                "display": name,
            },
        }],
    })
}

/// The record's notices as an OperationOutcome, if it has any.
pub fn notices_outcome(fhir: &FhirRecord) -> Option<Value> {
    if fhir.notices.is_empty() {
        return None;
    }
    let issues: Vec<Value> = fhir
        .notices
        .iter()
        .map(|notice| {
            json!({
                "severity": notice.severity.as_str(),
                "code": "informational",
                "diagnostics": notice.text,
            })
        })
        .collect();
    Some(json!({ "resourceType": "OperationOutcome", "issue": issues }))
}

/// `Patient/$everything` as a searchset Bundle: the patient and every shown resource as
/// matches, the Provenance resources as includes, and the page's notices as an
/// OperationOutcome (search mode `outcome`). `base` is the server's FHIR base URL, for
/// each entry's `fullUrl`; without one (the CLI) entries carry none.
pub fn everything_bundle(fhir: &FhirRecord, base: Option<&str>) -> Value {
    let entry = |resource: &Value, mode: &str| {
        let mut entry = json!({ "resource": resource, "search": { "mode": mode } });
        if let Some(base) = base {
            let (kind, id) = (
                resource["resourceType"].as_str().unwrap_or_default(),
                resource["id"].as_str().unwrap_or_default(),
            );
            entry["fullUrl"] = Value::String(format!("{base}/{kind}/{id}"));
        }
        entry
    };
    let matches = std::iter::once(&fhir.patient).chain(&fhir.resources);
    let mut entries: Vec<Value> = matches.map(|r| entry(r, "match")).collect();
    let total = entries.len();
    entries.extend(fhir.provenance.iter().map(|r| entry(r, "include")));
    if let Some(outcome) = notices_outcome(fhir) {
        entries.push(json!({ "resource": outcome, "search": { "mode": "outcome" } }));
    }
    json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "entry": entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logical_ids_are_unique_per_publisher_and_always_valid() {
        assert_eq!(logical_id("A81001", "Condition/c1"), "A81001-c1");
        assert_ne!(
            logical_id("A81001", "Condition/c1"),
            logical_id("RTH", "Condition/c1"),
            "the same publisher id at two organisations is two resources"
        );
        // Not a valid FHIR id, or too long with the prefix: hashed, never cut short.
        for source_id in ["Condition/a_b", &format!("Condition/{}", "x".repeat(60))] {
            let id = logical_id("A81001", source_id);
            assert_eq!(id.len(), 64);
            assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
        }
        assert_ne!(
            logical_id("A81001", "Condition/a_b"),
            logical_id("A81001", "Condition/a b")
        );
    }

    #[test]
    fn meta_source_names_the_organisation_and_its_system_as_a_uri() {
        assert_eq!(
            meta_source("A81001", "EMIS Web/1.0"),
            "https://fhir.nhs.uk/Id/ods-organization-code/A81001#EMIS%20Web%2F1.0"
        );
    }

    fn targets() -> Targets<'static> {
        Targets {
            nhs: "9912003888",
            shown: BTreeMap::from([(
                ("A81001", "Encounter/e1"),
                "Encounter/A81001-e1".to_string(),
            )]),
            patients: BTreeSet::from([("A81001", "Patient/p1")]),
        }
    }

    #[test]
    fn references_point_at_what_this_node_serves_and_nothing_else() {
        let mut resource = json!({
            "resourceType": "Condition",
            "subject": { "identifier": { "system": NHS_NUMBER_SYSTEM, "value": "9912003888" } },
            "encounter": { "reference": "Encounter/e1" },
            "asserter": { "reference": "Patient/p1" },
            "recorder": { "reference": "Practitioner/dr1", "display": "Dr A Smith" },
            "evidence": [{ "detail": [{ "reference": "Observation/withheld", "display": "HIV viral load" }] }],
            "contained": [],
            "stage": [{ "assessment": [{ "reference": "#local" }] }],
        });
        targets().resolve(&mut resource, "A81001");
        assert_eq!(resource["subject"]["reference"], "Patient/9912003888");
        assert_eq!(resource["encounter"]["reference"], "Encounter/A81001-e1");
        assert_eq!(resource["asserter"]["reference"], "Patient/9912003888");
        assert_eq!(
            resource["recorder"],
            json!({ "type": "Practitioner", "display": "Dr A Smith" }),
            "who recorded it stays readable"
        );
        assert_eq!(
            resource["evidence"][0]["detail"][0],
            json!({ "display": "not held on this node" }),
            "a resource not shown here is neither named, typed nor described"
        );
        assert_eq!(resource["stage"][0]["assessment"][0]["reference"], "#local");
        // Another publisher's identical ids are not this publisher's resources.
        let mut other = json!({ "encounter": { "reference": "Encounter/e1" } });
        targets().resolve(&mut other, "RTH");
        assert_eq!(
            other["encounter"],
            json!({ "display": "not held on this node" })
        );
    }

    #[test]
    fn the_confidentiality_label_is_added_once_beside_the_publishers_own_and_comments_go() {
        let mut resource = json!({
            "resourceType": "Condition",
            "id": "c1",
            "meta": { "security": [{ "system": "urn:other", "code": "X" }] },
        });
        resource["code"] = json!({ "fhir_comments": ["from DSTU2"], "text": "Asthma" });
        stamp(&mut resource, "A81001-c1", "A81001", "EMIS", Some("R"));
        stamp(&mut resource, "A81001-c1", "A81001", "EMIS", Some("R"));
        assert_eq!(resource["code"], json!({ "text": "Asthma" }));
        assert_eq!(resource["id"], "A81001-c1");
        assert_eq!(
            resource["meta"]["source"],
            "https://fhir.nhs.uk/Id/ods-organization-code/A81001#EMIS"
        );
        assert_eq!(
            resource["meta"]["security"],
            json!([
                { "system": "urn:other", "code": "X" },
                { "system": CONFIDENTIALITY_SYSTEM, "code": "R" },
            ])
        );
    }
}
