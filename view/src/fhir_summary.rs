//! `Patient/$summary`: the record as an International Patient Summary document, a Bundle
//! of type `document` whose Composition lists the patient's allergies, medicines and
//! problems (IPS's required sections), and the rest as held: past illnesses, immunisations,
//! results, procedures, plans of care and alerts.
//!
//! A summary is read quickly, so it is built to be read safely:
//!
//! * what a section leaves out is said in its narrative: refuted and entered-in-error
//!   entries (never listed as facts; `$everything` holds them with their status), and past
//!   or stopped medicines;
//! * a required section with nothing in it says that nothing is held here, never that the
//!   patient has none (`emptyReason` "unavailable": a record that holds no allergy is not a
//!   record of no allergies);
//! * the page's notices (what sharing rules withheld, what Share In hides, break-glass,
//!   out-of-date sources) open the document, in a section of their own.
//!
//! Nothing here decides who sees what: it arranges what [`crate::fhir_api::render`] made
//! for the caller, each resource still its publisher's.

use crate::fhir_api::{FhirRecord, ODS_SYSTEM, Severity};
use serde_json::{Value, json};

const LOINC: &str = "http://loinc.org";
const IPS_PROFILE: &str = "http://hl7.org/fhir/uv/ips/StructureDefinition/Composition-uv-ips";

/// A section of the summary: which resources it lists.
struct SectionSpec {
    title: &'static str,
    loinc: &'static str,
    required: bool,
    takes: fn(&Value) -> Placement,
}

/// Where a resource goes within a section's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// Listed in this section.
    Listed,
    /// Of this section's kind but left out, and counted in its narrative.
    LeftOut,
    /// Not this section's.
    Elsewhere,
}

const SECTIONS: &[SectionSpec] = &[
    SectionSpec {
        title: "Allergies and intolerances",
        loinc: "48765-2",
        required: true,
        takes: allergies,
    },
    SectionSpec {
        title: "Medication summary",
        loinc: "10160-0",
        required: true,
        takes: medicines,
    },
    SectionSpec {
        title: "Problem list",
        loinc: "11450-4",
        required: true,
        takes: current_problems,
    },
    SectionSpec {
        title: "History of past illness",
        loinc: "11348-0",
        required: false,
        takes: past_problems,
    },
    SectionSpec {
        title: "Immunizations",
        loinc: "11369-6",
        required: false,
        takes: immunisations,
    },
    SectionSpec {
        title: "Results",
        loinc: "30954-2",
        required: false,
        takes: results,
    },
    SectionSpec {
        title: "History of procedures",
        loinc: "47519-4",
        required: false,
        takes: procedures,
    },
    SectionSpec {
        title: "Plan of care",
        loinc: "18776-5",
        required: false,
        takes: plans,
    },
    SectionSpec {
        title: "Alerts",
        loinc: "104605-1",
        required: false,
        takes: alerts,
    },
];

fn of_type(resource: &Value, types: &[&str]) -> bool {
    resource["resourceType"]
        .as_str()
        .is_some_and(|t| types.contains(&t))
}

fn code_of(concept: &Value) -> Option<&str> {
    concept["coding"]
        .as_array()?
        .iter()
        .find_map(|coding| coding["code"].as_str())
}

/// Refuted or entered in error: never listed as a fact.
fn not_a_fact(resource: &Value) -> bool {
    matches!(
        code_of(&resource["verificationStatus"]),
        Some("refuted" | "entered-in-error")
    ) || resource["status"].as_str() == Some("entered-in-error")
}

fn allergies(resource: &Value) -> Placement {
    match (
        of_type(resource, &["AllergyIntolerance"]),
        not_a_fact(resource),
    ) {
        (false, _) => Placement::Elsewhere,
        (true, true) => Placement::LeftOut,
        (true, false) => Placement::Listed,
    }
}

fn medicines(resource: &Value) -> Placement {
    if !of_type(resource, &["MedicationStatement", "MedicationRequest"]) {
        return Placement::Elsewhere;
    }
    // Current medicines: what is taken or to be taken. Past, stopped and cancelled ones
    // are counted, not listed.
    match resource["status"].as_str() {
        Some("active" | "intended" | "on-hold" | "unknown" | "draft") | None => Placement::Listed,
        _ => Placement::LeftOut,
    }
}

fn resolved(resource: &Value) -> bool {
    matches!(
        code_of(&resource["clinicalStatus"]),
        Some("resolved" | "inactive" | "remission")
    )
}

fn current_problems(resource: &Value) -> Placement {
    match (
        of_type(resource, &["Condition"]),
        not_a_fact(resource),
        resolved(resource),
    ) {
        (false, _, _) => Placement::Elsewhere,
        (true, true, _) => Placement::LeftOut,
        (true, false, true) => Placement::Elsewhere,
        (true, false, false) => Placement::Listed,
    }
}

fn past_problems(resource: &Value) -> Placement {
    if of_type(resource, &["Condition"]) && !not_a_fact(resource) && resolved(resource) {
        Placement::Listed
    } else {
        Placement::Elsewhere
    }
}

fn listed_unless_in_error(resource: &Value, types: &[&str]) -> Placement {
    match (of_type(resource, types), not_a_fact(resource)) {
        (false, _) => Placement::Elsewhere,
        (true, true) => Placement::LeftOut,
        (true, false) => Placement::Listed,
    }
}

fn immunisations(resource: &Value) -> Placement {
    listed_unless_in_error(resource, &["Immunization"])
}

fn results(resource: &Value) -> Placement {
    listed_unless_in_error(resource, &["Observation", "DiagnosticReport"])
}

fn procedures(resource: &Value) -> Placement {
    listed_unless_in_error(resource, &["Procedure"])
}

fn plans(resource: &Value) -> Placement {
    listed_unless_in_error(resource, &["CarePlan"])
}

fn alerts(resource: &Value) -> Placement {
    listed_unless_in_error(resource, &["Flag"])
}

/// What a resource says it is, for a section's narrative.
fn label(resource: &Value) -> String {
    let concept = ["code", "medicationCodeableConcept", "vaccineCode", "type"]
        .iter()
        .map(|element| &resource[*element])
        .find(|c| c.is_object())
        .unwrap_or(&Value::Null);
    concept["text"]
        .as_str()
        .or_else(|| {
            concept["coding"]
                .as_array()?
                .iter()
                .find_map(|c| c["display"].as_str())
        })
        .unwrap_or("(not named)")
        .to_string()
}

fn escape_xhtml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An XHTML narrative of paragraphs and a list.
fn narrative(paragraphs: &[String], items: &[String]) -> Value {
    let mut div = String::from("<div xmlns=\"http://www.w3.org/1999/xhtml\">");
    for paragraph in paragraphs {
        div.push_str(&format!("<p>{}</p>", escape_xhtml(paragraph)));
    }
    if !items.is_empty() {
        div.push_str("<ul>");
        for item in items {
            div.push_str(&format!("<li>{}</li>", escape_xhtml(item)));
        }
        div.push_str("</ul>");
    }
    div.push_str("</div>");
    json!({ "status": "generated", "div": div })
}

fn reference(resource: &Value) -> String {
    format!(
        "{}/{}",
        resource["resourceType"].as_str().unwrap_or_default(),
        resource["id"].as_str().unwrap_or_default()
    )
}

/// The organisation this summary is made at: its author and custodian.
pub struct MadeAt<'a> {
    pub ods: &'a str,
    pub name: &'a str,
    /// When, as an instant.
    pub at: &'a str,
}

/// The summary document for what `fhir` holds. `base` is the server's FHIR base URL, for
/// every entry's `fullUrl` (a document's references resolve within it).
pub fn summary_bundle(fhir: &FhirRecord, made_at: &MadeAt<'_>, base: &str) -> Value {
    let nhs = fhir.patient["id"].as_str().unwrap_or_default();
    let author = json!({
        "resourceType": "Organization",
        "id": made_at.ods,
        "identifier": [{ "system": ODS_SYSTEM, "value": made_at.ods }],
        "name": made_at.name,
    });
    let mut sections = Vec::new();
    let notices: Vec<String> = fhir
        .notices
        .iter()
        .map(|n| match n.severity {
            Severity::Warning => format!("Warning: {}", n.text),
            Severity::Information => n.text.clone(),
        })
        .collect();
    if !notices.is_empty() {
        sections.push(json!({
            "title": "Notices from the shared care record",
            "text": narrative(&["Read these before relying on this summary.".into()], &notices),
        }));
    }
    for spec in SECTIONS {
        let listed: Vec<&Value> = fhir
            .resources
            .iter()
            .filter(|r| (spec.takes)(r) == Placement::Listed)
            .collect();
        let left_out = fhir
            .resources
            .iter()
            .filter(|r| (spec.takes)(r) == Placement::LeftOut)
            .count();
        if listed.is_empty() && left_out == 0 && !spec.required {
            continue;
        }
        let mut paragraphs = Vec::new();
        if left_out > 0 {
            paragraphs.push(format!(
                "{left_out} entr{} not listed here (refuted, entered in error, or for medicines past or stopped); the full record ($everything) holds them with their status.",
                if left_out == 1 { "y is" } else { "ies are" }
            ));
        }
        let items: Vec<String> = listed.iter().map(|r| label(r)).collect();
        let mut section = json!({
            "title": spec.title,
            "code": { "coding": [{ "system": LOINC, "code": spec.loinc }] },
        });
        if listed.is_empty() {
            paragraphs.insert(
                0,
                "Nothing of this kind is held in the shared care record here. This is not a record that the patient has none."
                    .into(),
            );
            section["emptyReason"] = json!({ "coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/list-empty-reason",
                "code": "unavailable",
                "display": "Unavailable",
            }]});
        } else {
            section["entry"] = Value::Array(
                listed
                    .iter()
                    .map(|r| json!({ "reference": reference(r) }))
                    .collect(),
            );
        }
        section["text"] = narrative(&paragraphs, &items);
        sections.push(section);
    }
    let composition = json!({
        "resourceType": "Composition",
        "id": format!("summary-{nhs}"),
        "meta": { "profile": [IPS_PROFILE] },
        "status": "final",
        "type": { "coding": [{ "system": LOINC, "code": "60591-5", "display": "Patient summary Document" }] },
        "subject": { "reference": format!("Patient/{nhs}") },
        "date": made_at.at,
        "author": [{ "reference": format!("Organization/{}", made_at.ods) }],
        "custodian": { "reference": format!("Organization/{}", made_at.ods) },
        "title": format!("Patient summary from the shared care record at {}", made_at.name),
        "confidentiality": "N",
        "section": sections,
    });
    let entry = |resource: &Value| {
        json!({
            "fullUrl": format!("{base}/{}", reference(resource)),
            "resource": resource,
        })
    };
    let mut entries = vec![entry(&composition), entry(&fhir.patient), entry(&author)];
    entries.extend(fhir.resources.iter().map(entry));
    entries.extend(fhir.provenance.iter().map(entry));
    json!({
        "resourceType": "Bundle",
        "identifier": { "system": "urn:ietf:rfc:3986", "value": format!("urn:uuid:{}", summary_id(nhs, made_at.at)) },
        "type": "document",
        "timestamp": made_at.at,
        "entry": entries,
    })
}

/// A UUID for the document, from the patient and the time: the same summary asked twice in
/// one second is the same document.
fn summary_id(nhs: &str, at: &str) -> String {
    crate::fhir_api::name_based_uuid(&format!("caremesh summary\0{nhs}\0{at}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir_api::Notice;

    fn record(resources: Vec<Value>) -> FhirRecord {
        FhirRecord {
            patient: json!({"resourceType": "Patient", "id": "9912003888"}),
            resources,
            provenance: Vec::new(),
            notices: vec![Notice {
                severity: Severity::Warning,
                text: "2 items from other organisations not shown".into(),
            }],
        }
    }

    fn condition(id: &str, clinical: &str, verification: &str, name: &str) -> Value {
        json!({"resourceType": "Condition", "id": id,
            "clinicalStatus": {"coding": [{"code": clinical}]},
            "verificationStatus": {"coding": [{"code": verification}]},
            "code": {"text": name}})
    }

    fn section<'a>(bundle: &'a Value, loinc: &str) -> Option<&'a Value> {
        bundle["entry"][0]["resource"]["section"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["code"]["coding"][0]["code"] == loinc)
    }

    #[test]
    fn a_summary_lists_facts_says_what_it_left_out_and_never_reads_absence_as_none() {
        let fhir = record(vec![
            condition("c1", "active", "confirmed", "Asthma"),
            condition("c2", "active", "refuted", "Angina"),
            condition("c3", "resolved", "confirmed", "Fractured wrist"),
            json!({"resourceType": "MedicationStatement", "id": "m1", "status": "active",
                "medicationCodeableConcept": {"text": "Salbutamol"}}),
            json!({"resourceType": "MedicationStatement", "id": "m2", "status": "stopped",
                "medicationCodeableConcept": {"text": "Amoxicillin"}}),
        ]);
        let made_at = MadeAt {
            ods: "RTH",
            name: "Oxford University Hospitals",
            at: "2026-12-02T10:00:00Z",
        };
        let bundle = summary_bundle(&fhir, &made_at, "http://node/fhir");
        assert_eq!(bundle["type"], "document");
        assert_eq!(
            bundle["entry"][0]["resource"]["resourceType"],
            "Composition"
        );

        let problems = section(&bundle, "11450-4").unwrap();
        assert_eq!(problems["entry"], json!([{ "reference": "Condition/c1" }]));
        let text = problems["text"]["div"].as_str().unwrap();
        assert!(
            text.contains("Asthma") && !text.contains("Angina"),
            "{text}"
        );
        assert!(text.contains("1 entry is not listed"), "{text}");
        let past = section(&bundle, "11348-0").unwrap();
        assert_eq!(past["entry"], json!([{ "reference": "Condition/c3" }]));
        let medicines = section(&bundle, "10160-0").unwrap();
        assert_eq!(
            medicines["entry"],
            json!([{ "reference": "MedicationStatement/m1" }])
        );

        // No allergy held: said as unavailable, never as "no known allergies".
        let allergies = section(&bundle, "48765-2").unwrap();
        assert_eq!(allergies["emptyReason"]["coding"][0]["code"], "unavailable");
        assert!(allergies.get("entry").is_none());
        assert!(
            allergies["text"]["div"]
                .as_str()
                .unwrap()
                .contains("not a record that the patient has none")
        );
        // Sections with nothing in them and not required are left out.
        assert!(section(&bundle, "11369-6").is_none());

        // The notices open the document.
        let first = &bundle["entry"][0]["resource"]["section"][0];
        assert_eq!(first["title"], "Notices from the shared care record");
        assert!(
            first["text"]["div"]
                .as_str()
                .unwrap()
                .contains("Warning: 2 items from other organisations not shown")
        );

        // Every reference in the Composition resolves to an entry of the document.
        let urls: Vec<&str> = bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["fullUrl"].as_str().unwrap())
            .collect();
        let composition = &bundle["entry"][0]["resource"];
        let mut references = vec![
            composition["subject"]["reference"].as_str().unwrap(),
            composition["author"][0]["reference"].as_str().unwrap(),
        ];
        for section in composition["section"].as_array().unwrap() {
            for entry in section["entry"].as_array().into_iter().flatten() {
                references.push(entry["reference"].as_str().unwrap());
            }
        }
        for reference in references {
            assert!(
                urls.contains(&format!("http://node/fhir/{reference}").as_str()),
                "{reference} does not resolve in {urls:?}"
            );
        }
    }
}
