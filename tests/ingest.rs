//! Ingest, end to end through the real binary: real FHIR data, bad input, versions,
//! bounded memory, durability under kill -9, and tamper detection.

mod support;

use serde_json::json;
use std::io::Write;
use std::path::Path;
use std::time::Duration;
use support::*;

fn node(ods: &str, kind: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    init_node(&dir.path().join("node"), ods, "Test Organisation", kind);
    dir
}

fn home(dir: &tempfile::TempDir) -> std::path::PathBuf {
    dir.path().join("node")
}

/// Ingests files that must all be accepted.
fn ingest_ok(dir: &Path, files: &[&Path]) {
    let paths: Vec<&str> = files.iter().map(|f| f.to_str().unwrap()).collect();
    let output = ingest(dir, &paths);
    assert!(
        output.status.success(),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
}

fn report_json(output: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("ingest JSON: {e}\n{}", stdout(output)))
}

/// Resources an ingest report says it read, over every resource type.
fn resources_read(report: &serde_json::Value) -> u64 {
    report["resources"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum()
}

#[test]
fn uk_core_and_nrl_examples_ingest_with_concrete_results() {
    let dir = node("A81001", "gp");
    let output = ingest(
        &home(&dir),
        &[
            "--json",
            real_data("uk-core").to_str().unwrap(),
            real_data("nrl").to_str().unwrap(),
        ],
    );
    // Some UK Core examples are invalid as extracts (an NHS number failing Modulus 11), so
    // the ingest reports rejections and exits non-zero, having ingested the rest.
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let report = report_json(&output);
    let read = resources_read(&report);
    assert!(read > 0);
    let rejected = report["rejected"].as_array().unwrap();
    let baby = rejected
        .iter()
        .find(|r| r["reason"].as_str().unwrap().contains("9912003890"))
        .expect("the invalid NHS number is reported");
    assert!(
        baby["file"]
            .as_str()
            .unwrap()
            .ends_with("UKCore-Patient-BabyPatient-Example.json")
    );
    assert!(baby["reason"].as_str().unwrap().contains("Modulus 11"));

    // What is not shown is exactly what the coverage page lists, each with its reason.
    let coverage =
        std::fs::read_to_string(repo_root().join("docs/clinical-safety/uk-core-coverage.md"))
            .unwrap();
    let not_shown = coverage
        .split("## Not shown, and why")
        .nth(1)
        .expect("the coverage page lists what is not shown");
    let listed: std::collections::BTreeSet<&str> = not_shown
        .lines()
        .filter_map(|line| line.strip_prefix("| "))
        .filter_map(|line| line.split(" | ").next())
        .filter(|name| *name != "Resource type" && !name.starts_with("---"))
        .collect();
    let unsupported: std::collections::BTreeSet<&str> = report["unsupported"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        unsupported, listed,
        "docs/clinical-safety/uk-core-coverage.md is out of date"
    );

    let record = record_json(&home(&dir), "9912003888").expect("Richard Smith's record is held");
    // Hospice and ward medicines: what was given and what was dispensed.
    let medications = section(&record, "medications");
    for kind in ["MedicationAdministration/", "MedicationDispense/"] {
        assert!(
            medications
                .iter()
                .any(|i| i["source"]["resource"].as_str().unwrap().starts_with(kind)),
            "{kind} not shown: {medications:?}"
        );
    }
    let family = section(&record, "family-history");
    assert_eq!(family[0]["title"], "Father: Diabetes Mellitues Type 1");
    let contacts = section(&record, "contacts");
    assert_eq!(contacts[0]["title"], "Joy SMITH (wife)");
    assert_eq!(record["demographics"]["name"], "Richard SMITH");
    let allergies = section(&record, "allergies");
    let amoxicillin = allergies
        .iter()
        .find(|i| {
            i["source"]["resource"]
                == "AllergyIntolerance/UKCore-AllergyIntolerance-Amoxicillin-Example"
        })
        .expect("the amoxicillin allergy is under allergies");
    assert_eq!(amoxicillin["title"], "Amoxicillin");
    assert_eq!(amoxicillin["source"]["organisation"], "A81001");
    assert_eq!(amoxicillin["source"]["system"], "TestSystem");
    assert_eq!(amoxicillin["recorded"], "2019-12-10T13:00:00+00:00");
    assert!(
        !allergies.iter().any(|i| i["source"]["resource"]
            == "AllergyIntolerance/UKCore-AllergyIntolerance-EnteredInError-Example"),
        "an entered-in-error allergy is never shown as a fact"
    );
    // A MedicationRequest whose medicationReference names a Medication from another file.
    let medications = section(&record, "medications");
    assert!(
        medications
            .iter()
            .any(|i| i["title"].as_str().unwrap().contains("Timoptol")),
        "medication references resolve: {medications:?}"
    );
    assert_eq!(record["sources"][0]["ods"], "A81001");

    // The NRL pointer names its patient by NHS number and is labelled very restricted.
    let crisis = record_json(&home(&dir), "6700028191").expect("NRL patient held");
    let documents = section(&crisis, "documents");
    assert!(!documents.is_empty());
    assert!(documents.iter().all(|d| d["data_class"] == "sensitive"));
    // Each pointer keeps the custodian it names (the organisation holding the document),
    // never the organisation that ingested it.
    for document in &documents {
        let custodian = document["reading"]["details"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["label"] == "Custodian")
            .unwrap_or_else(|| panic!("no custodian: {document}"));
        let expected = document["source"]["resource"]
            .as_str()
            .unwrap()
            .trim_start_matches("DocumentReference/")
            .split('-')
            .next()
            .unwrap()
            .to_string();
        // These pointers' ids begin with their custodian's ODS code.
        assert_eq!(custodian["value"], expected.as_str(), "{document}");
    }

    // The rejected file is in quarantine with its reason; the original stays in place.
    let quarantined = home(&dir).join("quarantine/UKCore-Patient-BabyPatient-Example.json");
    assert!(quarantined.exists());
    let reason = std::fs::read_to_string(
        home(&dir).join("quarantine/UKCore-Patient-BabyPatient-Example.json.reason.txt"),
    )
    .unwrap();
    assert!(reason.contains("9912003890"), "{reason}");
}

#[test]
fn synthea_bundles_ingest_through_the_patient_index() {
    let dir = node("RTH", "acute");
    let data = real_data("synthea-r4");
    let index = data.join("nhs-numbers.csv");
    let output = ingest(
        &home(&dir),
        &[
            "--json",
            "--patient-index",
            index.to_str().unwrap(),
            data.to_str().unwrap(),
        ],
    );
    assert!(
        output.status.success(),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    let report = report_json(&output);
    assert!(report["rejected"].as_array().unwrap().is_empty());
    assert!(
        report["unsupported"]["Claim"].as_u64().unwrap() > 0,
        "billing is unsupported, not fatal"
    );
    // Antonio Castellanos is in both the full set and the fixture copy.
    let record = record_json(&home(&dir), "9990166137").expect("record held");
    assert!(
        record["demographics"]["name"]
            .as_str()
            .unwrap()
            .contains("Castellanos")
    );
    for name in ["results", "encounters", "immunisations"] {
        assert!(!section(&record, name).is_empty(), "{name} is empty");
    }
}

#[test]
fn a_patient_missing_from_the_index_is_rejected_with_the_reason() {
    let dir = node("RTH", "acute");
    let output = ingest(&home(&dir), &[real_data("synthea-r4").to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    let text = stdout(&output);
    assert!(text.contains("patient index"), "{text}");
    assert!(record_json(&home(&dir), "9990166137").is_none());
}

fn condition(version_time: &str, text: &str, status: Option<&str>) -> serde_json::Value {
    let mut condition = json!({
        "resourceType": "Condition", "id": "c1",
        "meta": { "lastUpdated": version_time },
        "subject": { "reference": "Patient/p1" },
        "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "195967001", "display": text }] },
        "onsetDateTime": "2020-01-01"
    });
    if let Some(status) = status {
        condition["verificationStatus"] = json!({ "coding": [{ "code": status }] });
    }
    condition
}

fn patient_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("patient.json");
    write_json(
        &path,
        &json!({
            "resourceType": "Patient", "id": "p1",
            "identifier": [{ "system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9912003888" }],
            "name": [{ "family": "Smith", "given": ["Richard"] }]
        }),
    );
    path
}

fn problems(dir: &Path) -> Vec<String> {
    record_json(dir, "9912003888")
        .map(|r| {
            section(&r, "problems")
                .iter()
                .map(|i| i["title"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// A node holding one patient (9912003888) with one asthma condition; also returns the folder
/// holding the files it was ingested from.
fn node_with_asthma() -> (tempfile::TempDir, tempfile::TempDir) {
    let dir = node("A81001", "gp");
    let files = tempfile::tempdir().unwrap();
    let patient = patient_file(files.path());
    let c = files.path().join("c.json");
    write_json(&c, &condition("2024-01-01T00:00:00Z", "Asthma", None));
    ingest_ok(&home(&dir), &[&patient, &c]);
    (dir, files)
}

#[test]
fn re_ingest_changes_nothing_newer_versions_replace_and_entered_in_error_disappears() {
    let dir = node("A81001", "gp");
    let files = tempfile::tempdir().unwrap();
    let patient = patient_file(files.path());
    let v1 = files.path().join("v1.json");
    write_json(&v1, &condition("2024-01-01T00:00:00Z", "Asthma", None));
    let first = ingest(
        &home(&dir),
        &["--json", patient.to_str().unwrap(), v1.to_str().unwrap()],
    );
    assert!(first.status.success(), "{}", stdout(&first));
    assert_eq!(problems(&home(&dir)), ["Asthma"]);
    let documents = status_json(&home(&dir))["stats"]["documents"].clone();

    let again = ingest(
        &home(&dir),
        &["--json", patient.to_str().unwrap(), v1.to_str().unwrap()],
    );
    assert_eq!(
        report_json(&again)["documents_written"],
        0,
        "re-ingest wrote documents"
    );
    assert_eq!(status_json(&home(&dir))["stats"]["documents"], documents);

    let v2 = files.path().join("v2.json");
    write_json(
        &v2,
        &condition("2024-02-01T00:00:00Z", "Asthma, well controlled", None),
    );
    assert!(
        ingest(&home(&dir), &[v2.to_str().unwrap()])
            .status
            .success()
    );
    assert_eq!(problems(&home(&dir)), ["Asthma, well controlled"]);

    // An older version arriving late is ignored, and counted as such.
    let late = ingest(&home(&dir), &["--json", v1.to_str().unwrap()]);
    assert_eq!(report_json(&late)["stale"], 1);
    assert_eq!(problems(&home(&dir)), ["Asthma, well controlled"]);

    let retracted = files.path().join("v3.json");
    write_json(
        &retracted,
        &condition("2024-03-01T00:00:00Z", "Asthma", Some("entered-in-error")),
    );
    let output = ingest(&home(&dir), &["--json", retracted.to_str().unwrap()]);
    assert_eq!(report_json(&output)["retracted"], 1);
    assert!(
        problems(&home(&dir)).is_empty(),
        "entered-in-error resource still shown"
    );
}

#[test]
fn a_resource_that_becomes_sensitive_moves_and_is_never_held_twice() {
    let (dir, files) = node_with_asthma();
    let mut restricted = condition("2024-02-01T00:00:00Z", "Asthma", None);
    restricted["meta"]["security"] = json!([{ "system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R" }]);
    let path = files.path().join("restricted.json");
    write_json(&path, &restricted);
    assert!(
        ingest(&home(&dir), &[path.to_str().unwrap()])
            .status
            .success()
    );
    let record = record_json(&home(&dir), "9912003888").unwrap();
    let items = section(&record, "problems");
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0]["data_class"], "sensitive");
}

/// Input that could be read two ways is refused with the reason, never resolved silently:
/// a key twice in one object, a resource naming its patient in both `subject` and
/// `patient`, one resource (or one fullUrl) twice in a Bundle with different content and no
/// version to tell them apart. Versions of a resource in one Bundle are not ambiguous.
#[test]
fn ambiguous_input_is_refused_with_the_reason() {
    let dir = node("A81001", "gp");
    let files = tempfile::tempdir().unwrap();
    let patient = patient_file(files.path());
    let other = files.path().join("other.json");
    write_json(
        &other,
        &patient_resource("p2", "9990000026", "Jones", "2024-01-01T00:00:00Z"),
    );
    ingest_ok(&home(&dir), &[&patient, &other]);
    let rejected = |name: &str, text: &str| -> Vec<String> {
        let path = files.path().join(name);
        std::fs::write(&path, text).unwrap();
        let output = ingest(&home(&dir), &["--json", path.to_str().unwrap()]);
        assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
        let report = report_json(&output);
        assert!(
            report["quarantined"].as_array().unwrap().len() == 1,
            "the file is quarantined with its reason: {report}"
        );
        report["rejected"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                format!(
                    "{}: {}",
                    r["location"].as_str().unwrap(),
                    r["reason"].as_str().unwrap()
                )
            })
            .collect()
    };
    let twice = rejected(
        "duplicate-key.json",
        r#"{"resourceType": "Condition", "id": "c9",
            "subject": {"reference": "Patient/p1"},
            "code": {"text": "Asthma"},
            "subject": {"reference": "Patient/p2"}}"#,
    );
    assert!(
        twice[0].contains("\"subject\" appears twice") && twice[0].contains("line 4"),
        "{twice:?}"
    );

    let both = rejected(
        "both.json",
        r#"{"resourceType": "AllergyIntolerance", "id": "a9",
            "patient": {"reference": "Patient/p1"}, "subject": {"reference": "Patient/p2"},
            "code": {"text": "Penicillin"}}"#,
    );
    assert!(both[0].contains("both `subject` and `patient`"), "{both:?}");

    let condition_for = |subject: &str| {
        json!({ "fullUrl": "urn:uuid:c8", "resource": {
            "resourceType": "Condition", "id": "c8",
            "meta": { "lastUpdated": "2024-01-01T00:00:00Z" },
            "subject": { "reference": subject }, "code": { "text": "Asthma" } } })
    };
    let bundle = json!({ "resourceType": "Bundle", "type": "collection",
        "entry": [condition_for("Patient/p1"), condition_for("Patient/p2")] });
    let clash = rejected("clash.json", &bundle.to_string());
    assert_eq!(clash.len(), 2, "{clash:?}");
    assert!(
        clash
            .iter()
            .all(|r| r.contains("given 2 times with different content")),
        "{clash:?}"
    );
    assert!(problems(&home(&dir)).is_empty());
    let second = record_json(&home(&dir), "9990000026");
    assert!(second.is_none_or(|r| section(&r, "problems").is_empty()));

    // Two versions of one condition in a history Bundle: the newer is the record.
    let mut newer = condition_for("Patient/p1");
    newer["resource"]["meta"]["lastUpdated"] = json!("2024-02-01T00:00:00Z");
    newer["resource"]["code"]["text"] = json!("Asthma, well controlled");
    let history = json!({ "resourceType": "Bundle", "type": "history",
        "entry": [newer, condition_for("Patient/p1")] });
    let path = files.path().join("history.json");
    write_json(&path, &history);
    ingest_ok(&home(&dir), &[&path]);
    assert_eq!(problems(&home(&dir)), ["Asthma, well controlled"]);
}

/// A resource too large ever to be shared (here a 3 MB note) is refused at ingest with the
/// reason, instead of being stored where it would never sync; the rest of the file goes in.
#[test]
fn a_resource_too_large_to_share_is_refused_with_the_reason() {
    let (dir, files) = node_with_asthma();
    let mut huge = condition("2024-02-01T00:00:00Z", "Asthma", None);
    huge["id"] = json!("c-huge");
    huge["note"] = json!([{ "text": "x".repeat(3 * 1024 * 1024) }]);
    let mut small = condition("2024-02-01T00:00:00Z", "Eczema", None);
    small["id"] = json!("c-small");
    let bundle = json!({ "resourceType": "Bundle", "type": "collection",
        "entry": [{ "resource": huge }, { "resource": small }] });
    let path = files.path().join("huge.json");
    write_json(&path, &bundle);
    let output = ingest(&home(&dir), &["--json", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    let report = report_json(&output);
    let reason = report["rejected"][0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("over the 1048576-byte limit for one resource"),
        "{reason}"
    );
    assert_eq!(report["accepted"], 1);
    let mut titles = problems(&home(&dir));
    titles.sort();
    assert_eq!(titles, ["Asthma", "Eczema"]);
}

/// A Patient resource of the extract, with its NHS number.
fn patient_resource(id: &str, nhs: &str, family: &str, version_time: &str) -> serde_json::Value {
    json!({
        "resourceType": "Patient", "id": id,
        "meta": { "lastUpdated": version_time },
        "identifier": [{ "system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs }],
        "name": [{ "family": family, "given": ["Test"] }]
    })
}

fn audit_actions(dir: &Path, nhs: &str) -> Vec<String> {
    let output = run(&[
        "audit",
        "report",
        "--dir",
        dir.to_str().unwrap(),
        "--patient",
        nhs,
        "--format",
        "json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let entries = report
        .as_array()
        .or_else(|| report["events"].as_array())
        .unwrap_or_else(|| panic!("audit report: {report}"));
    entries
        .iter()
        .map(|e| {
            let e = e.get("event").unwrap_or(e);
            format!(
                "{}: {}",
                e["action"].as_str().unwrap(),
                e["detail"].as_str().unwrap()
            )
        })
        .collect()
}

/// H-14. A condition filed against the wrong patient is re-sent under the right one (same
/// id, newer version, new subject): it moves. The wrong patient keeps only a notice that it
/// moved, the right one says where it came from, the report counts the move and both
/// patients' audit trails record it. Entered in error under the new patient, it leaves
/// neither record.
#[test]
fn a_resource_re_sent_under_another_patient_moves_and_is_never_on_two() {
    let (dir, files) = node_with_asthma();
    let other = files.path().join("other.json");
    write_json(
        &other,
        &patient_resource("p2", "9990000026", "Jones", "2024-01-01T00:00:00Z"),
    );
    ingest_ok(&home(&dir), &[&other]);
    let mut moved = condition("2024-02-01T00:00:00Z", "Asthma", None);
    moved["subject"] = json!({ "reference": "Patient/p2" });
    let path = files.path().join("moved.json");
    write_json(&path, &moved);
    let output = ingest(&home(&dir), &["--json", path.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(report_json(&output)["moved"], 1, "{}", stdout(&output));

    assert!(
        problems(&home(&dir)).is_empty(),
        "the moved condition stayed on the first patient"
    );
    let first = record_text(&home(&dir), "9912003888");
    assert!(
        first.contains("CORRECTION: Test Organisation moved \u{201c}Asthma\u{201d} (Problems) from this record to another patient's record on"),
        "{first}"
    );
    assert!(
        !first.contains("9990000026") && !first.contains("Jones"),
        "{first}"
    );
    let second = record_text(&home(&dir), "9990000026");
    assert!(second.contains("Asthma"), "{second}");
    assert!(
        second.contains("(Problems) to this record from another patient's record on"),
        "{second}"
    );
    assert!(
        !second.contains("9912003888") && !second.contains("Smith"),
        "{second}"
    );
    for nhs in ["9912003888", "9990000026"] {
        let actions = audit_actions(&home(&dir), nhs);
        assert!(
            actions.contains(
                &"moved: Condition/c1 moved from NHS number 9912003888 to 9990000026".to_string()
            ),
            "{nhs}: {actions:?}"
        );
    }

    // A later version on the right patient still says it was moved there.
    let mut update = moved.clone();
    update["meta"]["lastUpdated"] = json!("2024-03-01T00:00:00Z");
    update["code"]["coding"][0]["display"] = json!("Asthma, well controlled");
    write_json(&path, &update);
    ingest_ok(&home(&dir), &[&path]);
    let second = record_text(&home(&dir), "9990000026");
    assert!(
        second.contains("CORRECTION:") && second.contains("Asthma, well controlled"),
        "{second}"
    );

    // Entered in error under the right patient: gone from both; the notice stays.
    let mut retracted = update.clone();
    retracted["meta"]["lastUpdated"] = json!("2024-04-01T00:00:00Z");
    retracted["verificationStatus"] = json!({ "coding": [{ "code": "entered-in-error" }] });
    write_json(&path, &retracted);
    ingest_ok(&home(&dir), &[&path]);
    assert!(problems(&home(&dir)).is_empty());
    let second = record_json(&home(&dir), "9990000026").unwrap();
    assert!(section(&second, "problems").is_empty(), "{second}");
}

/// H-14. A Patient re-sent with another NHS number (the extract corrected a mis-linked
/// record) takes the resources that name it along: nothing stays on the old number but the
/// notice of what moved, and the relink is in both numbers' audit trails.
#[test]
fn a_patient_re_sent_with_another_nhs_number_takes_its_resources_along() {
    let (dir, files) = node_with_asthma();
    let relinked = files.path().join("relinked.json");
    write_json(
        &relinked,
        &patient_resource("p1", "9990000026", "Smith", "2024-05-01T00:00:00Z"),
    );
    let output = ingest(&home(&dir), &["--json", relinked.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report = report_json(&output);
    assert_eq!(report["relinked"], 1, "{report}");

    let old = record_json(&home(&dir), "9912003888").unwrap();
    assert!(section(&old, "problems").is_empty(), "{old}");
    assert!(old["demographics"].is_null(), "{old}");
    let old_text = record_text(&home(&dir), "9912003888");
    assert!(
        old_text.contains("moved \u{201c}Asthma\u{201d} (Problems) from this record"),
        "{old_text}"
    );
    let new = record_text(&home(&dir), "9990000026");
    assert!(new.contains("Asthma") && new.contains("Smith"), "{new}");
    let new_json = record_json(&home(&dir), "9990000026").unwrap();
    let resource = &section(&new_json, "problems")[0];
    assert_eq!(resource["reading"]["title"], "Asthma", "{resource}");
    for nhs in ["9912003888", "9990000026"] {
        let actions = audit_actions(&home(&dir), nhs);
        assert!(
            actions.iter().any(|a| a.starts_with("relinked: Patient/p1 relinked from NHS number 9912003888 to 9990000026; 1 resource(s)")),
            "{nhs}: {actions:?}"
        );
    }
    // A condition sent later through the same Patient goes to the new number.
    let mut later = condition("2024-06-01T00:00:00Z", "Eczema", None);
    later["id"] = json!("c2");
    let path = files.path().join("later.json");
    write_json(&path, &later);
    ingest_ok(&home(&dir), &[&path]);
    assert!(record_text(&home(&dir), "9990000026").contains("Eczema"));
    assert!(!record_text(&home(&dir), "9912003888").contains("Eczema"));
}

#[test]
fn bad_input_gives_clear_errors_and_loses_nothing() {
    let dir = node("A81001", "gp");
    let files = tempfile::tempdir().unwrap();
    let f = files.path();
    patient_file(f);
    write_json(
        &f.join("invalid-nhs.json"),
        &json!({ "resourceType": "Patient", "id": "p2",
                 "identifier": [{ "system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9434765910" }] }),
    );
    std::fs::write(
        f.join("malformed.json"),
        b"{ \"resourceType\": \"Condition\", oops }",
    )
    .unwrap();
    let full = serde_json::to_vec(&condition("2024-01-01T00:00:00Z", "Asthma", None)).unwrap();
    std::fs::write(f.join("truncated.json"), &full[..full.len() / 2]).unwrap();
    write_json(
        &f.join("unknown-type.json"),
        &json!({ "resourceType": "SpaceshipLaunch", "id": "x" }),
    );
    let mut wrong = condition("2024-01-01T00:00:00Z", "Asthma", None);
    wrong["id"] = json!("c-wrong");
    wrong["code"] = json!(42);
    write_json(&f.join("wrong-types.json"), &wrong);
    let mut good = condition("2024-01-01T00:00:00Z", "Hay fever", None);
    good["id"] = json!("c-good");
    write_json(&f.join("good.json"), &good);

    let output = ingest(&home(&dir), &["--json", f.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    let report = report_json(&output);
    let reasons: Vec<(String, String)> = report["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["file"].as_str().unwrap().to_string(),
                r["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let reason_for = |file: &str| {
        reasons
            .iter()
            .find(|(f, _)| f.ends_with(file))
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| panic!("no rejection for {file}: {reasons:?}"))
    };
    assert!(reason_for("invalid-nhs.json").contains("9434765910"));
    assert!(reason_for("malformed.json").contains("not valid JSON"));
    assert!(reason_for("truncated.json").contains("ends early"));
    let wrong_types = reason_for("wrong-types.json");
    assert!(
        wrong_types.contains("Condition/c-wrong") && wrong_types.contains("`code`"),
        "{wrong_types}"
    );
    assert_eq!(
        report["unsupported"]["SpaceshipLaunch"], 1,
        "unknown types are counted, not fatal"
    );
    assert_eq!(report["files_rejected"], 4);

    // Every rejected file has a copy and a reason in quarantine; the good data is in.
    for name in [
        "invalid-nhs.json",
        "malformed.json",
        "truncated.json",
        "wrong-types.json",
    ] {
        assert!(
            home(&dir).join("quarantine").join(name).exists(),
            "{name} not quarantined"
        );
        assert!(
            home(&dir)
                .join("quarantine")
                .join(format!("{name}.reason.txt"))
                .exists()
        );
    }
    assert_eq!(problems(&home(&dir)), ["Hay fever"]);
    assert!(stdout(&ingest(&home(&dir), &[f.to_str().unwrap()])).contains("reconciled"));
}

#[test]
fn a_200_megabyte_ndjson_file_ingests_with_bounded_memory() {
    let dir = node("A81001", "gp");
    let files = tempfile::tempdir().unwrap();
    let patients = 2_000u64;
    let mut numbers = Vec::new();
    {
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(files.path().join("Patient.ndjson")).unwrap(),
        );
        for index in 0..patients {
            let nhs = test_nhs_number(index);
            numbers.push(nhs.clone());
            let line = json!({ "resourceType": "Patient", "id": format!("p{index}"),
                "identifier": [{ "system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs }] });
            writeln!(out, "{line}").unwrap();
        }
    }
    let path = files.path().join("Observation.ndjson");
    let mut written = 0u64;
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        let padding = "x".repeat(800);
        let mut n = 0u64;
        'outer: for index in 0..patients {
            for k in 0..200 {
                let line = json!({ "resourceType": "Observation", "id": format!("o{index}-{k}"),
                    "status": "final", "subject": { "reference": format!("Patient/p{index}") },
                    "code": { "text": "Heart rate" }, "valueQuantity": { "value": 60 + k % 40, "unit": "bpm" },
                    "effectiveDateTime": "2024-01-01", "note": [{ "text": padding }] })
                .to_string();
                written += line.len() as u64 + 1;
                writeln!(out, "{line}").unwrap();
                n += 1;
                if written >= 200 * 1024 * 1024 {
                    break 'outer;
                }
            }
        }
        assert!(n > 100_000);
    }
    assert!(std::fs::metadata(&path).unwrap().len() >= 200 * 1024 * 1024);
    let output = ingest(&home(&dir), &["--json", files.path().to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report = report_json(&output);
    let read = resources_read(&report);
    assert!(read > 100_000, "read {read}");
    // Memory must not grow with the file: well under the file's own size.
    let peak_kb = report["peak_memory_kb"].as_u64().unwrap();
    assert!(
        peak_kb < 150 * 1024,
        "peak memory {peak_kb} kB for a 200 MB file"
    );
    eprintln!("200 MB NDJSON: {read} resources, peak memory {peak_kb} kB");
    let record = record_json(&home(&dir), &numbers[0]).unwrap();
    let results = section(&record, "results");
    // Each observation is a coded result plus its note as a separate free-text item.
    let coded = results
        .iter()
        .filter(|i| i["data_class"] == "coded")
        .count();
    let notes = results
        .iter()
        .filter(|i| i["data_class"] == "free-text")
        .count();
    assert_eq!((coded, notes), (200, 200));
}

fn test_nhs_number(index: u64) -> String {
    let mut body = 100_000 + index * 2;
    loop {
        let digits = format!("999{:06}", body);
        let sum: u32 = digits
            .bytes()
            .zip((2..=10u32).rev())
            .map(|(d, w)| u32::from(d - b'0') * w)
            .sum();
        match 11 - sum % 11 {
            10 => body += 1,
            11 => return format!("{digits}0"),
            check => return format!("{digits}{check}"),
        }
    }
}

/// The drop folder takes regular files only: a symbolic link is never followed (here, one
/// to a folder of extracts outside the node, and one to the node's own trust folder), a
/// directory never entered, a pipe never opened; each is left in place and listed by
/// `caremesh status`. A name in capitals (`UPPER.JSON`) is an extract like any other.
#[test]
fn the_drop_folder_takes_regular_files_only_and_lists_what_it_left() {
    use std::os::unix::ffi::OsStrExt;
    let dir = node("A81001", "gp");
    let drop_dir = home(&dir).join("drop");
    let outside = tempfile::tempdir().unwrap();
    let outside_extract = patient_file(outside.path());
    std::fs::create_dir_all(home(&dir).join("trust")).unwrap();
    let running = RunningNode::start(&home(&dir));
    // Each arrives as writers deliver: made beside the folder, then renamed in.
    let staging = dir.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    let arrive = |name: &std::ffi::OsStr, make: &dyn Fn(&Path)| {
        let staged = staging.join(name);
        make(&staged);
        std::fs::rename(&staged, drop_dir.join(name)).unwrap();
    };
    let link_to = |target: std::path::PathBuf| {
        move |at: &Path| std::os::unix::fs::symlink(&target, at).unwrap()
    };
    arrive(
        "elsewhere.json".as_ref(),
        &link_to(outside.path().to_path_buf()),
    );
    arrive("linked.json".as_ref(), &link_to(outside_extract.clone()));
    arrive("trust.json".as_ref(), &link_to(home(&dir).join("trust")));
    arrive("folder.json".as_ref(), &|at: &Path| {
        std::fs::create_dir(at).unwrap();
        std::fs::copy(&outside_extract, at.join("inner.json")).unwrap();
    });
    arrive("pipe.json".as_ref(), &|at: &Path| {
        assert!(
            std::process::Command::new("mkfifo")
                .arg(at)
                .status()
                .unwrap()
                .success()
        );
    });
    arrive(
        std::ffi::OsStr::from_bytes(b"caf\xe9.json"),
        &|at: &Path| {
            std::fs::copy(&outside_extract, at).unwrap();
        },
    );
    arrive("UPPER.JSON".as_ref(), &|at: &Path| {
        std::fs::copy(&outside_extract, at).unwrap();
    });
    assert!(
        wait_for(Duration::from_secs(60), || home(&dir)
            .join("processed/UPPER.JSON")
            .exists()),
        "UPPER.JSON was not taken"
    );
    // A few scans later, nothing else has moved.
    std::thread::sleep(Duration::from_secs(5));
    drop(running);
    assert!(
        outside_extract.exists(),
        "a file outside the node was moved"
    );
    assert!(
        drop_dir.join("folder.json/inner.json").exists(),
        "a directory was entered"
    );
    assert!(home(&dir).join("trust").exists());
    for name in [
        "elsewhere.json",
        "linked.json",
        "trust.json",
        "folder.json",
        "pipe.json",
    ] {
        assert!(
            std::fs::symlink_metadata(drop_dir.join(name)).is_ok(),
            "{name} was moved"
        );
    }
    let status = run(&["status", "--dir", home(&dir).to_str().unwrap(), "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let left: Vec<String> = status["drop_folder"]["left_in_place"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}: {}",
                e["name"].as_str().unwrap(),
                e["reason"].as_str().unwrap()
            )
        })
        .collect();
    for (name, why) in [
        ("elsewhere.json", "symbolic link"),
        ("linked.json", "symbolic link"),
        ("trust.json", "symbolic link"),
        ("folder.json", "directory"),
        ("pipe.json", "not a regular file"),
        ("caf\u{fffd}.json", "not UTF-8"),
    ] {
        assert!(
            left.iter().any(|l| l.starts_with(name) && l.contains(why)),
            "{name} ({why}) not listed: {left:?}"
        );
    }
}

/// A node that cannot put a file away after ingesting it (processed/ is not a directory
/// it can write to) does not take it: the file waits in drop/, nothing is ingested again
/// and again, and the log says which folder to fix, once. Fixed, the file goes in.
#[test]
fn a_drop_folder_that_cannot_put_files_away_pauses_and_says_why() {
    let dir = node("A81001", "gp");
    let processed = home(&dir).join("processed");
    std::fs::remove_dir(&processed).unwrap();
    std::fs::write(&processed, b"not a folder").unwrap();
    std::fs::set_permissions(
        &processed,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let log_path = dir.path().join("node.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let running = RunningNode::start_logging(&home(&dir), "error", log.into());
    let files = tempfile::tempdir().unwrap();
    drop_by_rename(&home(&dir), &patient_file(files.path()));
    assert!(
        wait_for(Duration::from_secs(60), || std::fs::read_to_string(
            &log_path
        )
        .is_ok_and(|log| log.contains("drop folder paused"))),
        "never paused"
    );
    std::thread::sleep(Duration::from_secs(4));
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(log.matches("drop folder paused").count(), 1, "{log}");
    assert!(log.contains(&processed.display().to_string()), "{log}");
    assert!(home(&dir).join("drop/patient.json").exists());
    let last_ingest = caremesh_storage::Store::open_read_only(&home(&dir).join("node.db"))
        .unwrap()
        .last_ingest()
        .unwrap();
    assert!(
        last_ingest.is_none(),
        "a file that could not be put away was ingested: {last_ingest:?}"
    );
    // The pause is visible where operators look: /health and `caremesh status`.
    let health = http_get(&running.address, "/health").1;
    assert!(
        health.contains("\"degraded\"") && health.contains("paused"),
        "{health}"
    );
    let status = run(&["status", "--dir", home(&dir).to_str().unwrap()]);
    assert!(stdout(&status).contains("PAUSED:"), "{}", stdout(&status));

    std::fs::remove_file(&processed).unwrap();
    std::fs::create_dir(&processed).unwrap();
    assert!(
        wait_for(Duration::from_secs(60), || processed
            .join("patient.json")
            .exists()),
        "the file never went in once processed/ was fixed"
    );
    assert!(http_get(&running.address, "/health").1.contains("\"ok\""));
    drop(running);
}

/// A writer that writes straight into drop/ and pauses longer than the settle time is
/// still writing: the file is not taken while it is open for writing, so nothing it writes
/// after the pause is lost (taken early, the rest would have gone into the file moved to
/// processed/, never read).
#[test]
fn a_file_still_open_for_writing_is_not_taken_however_long_the_writer_pauses() {
    use std::io::Write as _;
    let dir = node("A81001", "gp");
    let running = RunningNode::start(&home(&dir));
    let patient = json!({
        "resourceType": "Patient", "id": "p1",
        "identifier": [{ "system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9912003888" }],
        "name": [{ "family": "Smith", "given": ["Richard"] }]
    });
    let path = home(&dir).join("drop/slow.ndjson");
    let mut writer = std::fs::File::create(&path).unwrap();
    writeln!(writer, "{patient}").unwrap();
    writer.flush().unwrap();
    // Longer than the settle time and a few scans.
    std::thread::sleep(Duration::from_secs(6));
    assert!(path.exists(), "taken while its writer still had it open");
    writeln!(
        writer,
        "{}",
        condition("2024-01-01T00:00:00Z", "Asthma", None)
    )
    .unwrap();
    drop(writer);
    assert!(
        wait_for(Duration::from_secs(60), || home(&dir)
            .join("processed/slow.ndjson")
            .exists()),
        "never taken once closed"
    );
    drop(running);
    assert_eq!(problems(&home(&dir)), ["Asthma"]);
}

/// Puts `source` in the node's drop folder as writers should: complete, by rename.
fn drop_by_rename(node_home: &Path, source: &Path) {
    let name = source.file_name().unwrap();
    let staged = node_home
        .join("drop")
        .join(format!(".{}", name.to_string_lossy()));
    std::fs::copy(source, &staged).unwrap();
    std::fs::rename(&staged, node_home.join("drop").join(name)).unwrap();
}

#[test]
fn an_ingest_reported_done_survives_kill_9_straight_after() {
    let dir = node("A81001", "gp");
    let mut running = RunningNode::start(&home(&dir));
    let files = tempfile::tempdir().unwrap();
    let patient = patient_file(files.path());
    let condition_path = files.path().join("condition.json");
    write_json(
        &condition_path,
        &condition("2024-01-01T00:00:00Z", "Asthma", None),
    );
    // Writers drop complete files by rename, as the drop folder expects. The patient goes
    // first and is in before the condition naming it arrives: this test is about what a
    // reported ingest survives, not about the order files land in.
    for source in [&patient, &condition_path] {
        let name = source.file_name().unwrap();
        drop_by_rename(&home(&dir), source);
        let processed = home(&dir).join("processed").join(name);
        let quarantined = home(&dir).join("quarantine").join(name);
        assert!(
            wait_for(Duration::from_secs(60), || processed.exists()
                || quarantined.exists()),
            "{} never processed",
            name.to_string_lossy()
        );
        assert!(
            processed.exists(),
            "{} quarantined: {}",
            name.to_string_lossy(),
            std::fs::read_to_string(quarantined.with_extension("json.reason.txt"))
                .unwrap_or_default()
        );
    }
    running.kill_hard();
    assert_eq!(problems(&home(&dir)), ["Asthma"]);
    let verify = run_verify(&dir);
    assert!(verify.status.success(), "{}", stdout(&verify));
}

/// A drop-folder ingest that fails (here: the database held by another writer for longer
/// than the node waits) keeps its file and retries it; the condition dropped after it is not
/// quarantined for naming a patient whose file had not gone in yet. Once the database is
/// free, both go in.
#[test]
fn a_busy_database_delays_the_drop_folder_and_loses_nothing() {
    let dir = node("A81001", "gp");
    let log_path = dir.path().join("node.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let running = RunningNode::start_logging(&home(&dir), "error", log.into());
    let files = tempfile::tempdir().unwrap();
    let patient = patient_file(files.path());
    let condition_path = files.path().join("condition.json");
    write_json(
        &condition_path,
        &condition("2024-01-01T00:00:00Z", "Asthma", None),
    );
    // Another writer holds the database until the patient's ingest has failed (the node
    // waits five seconds for it); the condition arrives just after it is free again.
    let blocker =
        caremesh_storage::page_checksums::open_directly(&home(&dir).join("node.db")).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    drop_by_rename(&home(&dir), &patient);
    assert!(
        wait_for(Duration::from_secs(60), || std::fs::read_to_string(
            &log_path
        )
        .is_ok_and(|log| log.contains("drop folder ingest failed"))),
        "the busy database never failed an ingest"
    );
    blocker.execute_batch("COMMIT").unwrap();
    drop_by_rename(&home(&dir), &condition_path);
    let processed = |name: &str| home(&dir).join("processed").join(name).exists();
    assert!(
        wait_for(Duration::from_secs(60), || processed("patient.json")
            && processed("condition.json")),
        "quarantined: {:?}",
        std::fs::read_dir(home(&dir).join("quarantine"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
            .unwrap_or_default()
    );
    drop(running);
    assert_eq!(problems(&home(&dir)), ["Asthma"]);
}

#[test]
fn kill_9_during_a_large_ingest_leaves_a_consistent_database() {
    let dir = node("A81001", "gp");
    let extract = tempfile::tempdir().unwrap();
    let generated = run(&[
        "generate",
        "--org",
        "A81001",
        "--patients",
        "400",
        "--seed",
        "5",
        "--out",
        extract.path().to_str().unwrap(),
    ]);
    assert!(generated.status.success());
    let mut child = caremesh()
        .args([
            "ingest",
            "--dir",
            home(&dir).to_str().unwrap(),
            extract.path().to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill once some documents are committed, mid-way through the batch.
    let db = home(&dir).join("node.db");
    wait_for(Duration::from_secs(60), || {
        std::fs::metadata(home(&dir).join("node.db-wal"))
            .map(|m| m.len() > 1_000_000)
            .unwrap_or(false)
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(db.exists());
    let verify = run_verify(&dir);
    assert!(
        verify.status.success(),
        "after kill -9: {}",
        stdout(&verify)
    );
    // Ingesting again completes the batch, and writes nothing twice.
    let again = ingest(&home(&dir), &["--json", extract.path().to_str().unwrap()]);
    assert!(again.status.success());
    let third = ingest(&home(&dir), &["--json", extract.path().to_str().unwrap()]);
    assert_eq!(report_json(&third)["documents_written"], 0);
}

/// Flips a bit in the middle of `column` of the first document's row of `table`.
fn flip_byte(db: &Path, table: &str, column: &str) {
    let conn = caremesh_storage::page_checksums::open_directly(db).unwrap();
    let (rowid, mut bytes): (i64, Vec<u8>) = conn
        .query_row(
            &format!(
                "SELECT rowid, {column} FROM {table} \
                 WHERE doc_id = (SELECT doc_id FROM documents ORDER BY seq LIMIT 1)"
            ),
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x04;
    conn.execute(
        &format!("UPDATE {table} SET {column} = ?1 WHERE rowid = ?2"),
        rusqlite::params![bytes, rowid],
    )
    .unwrap();
}

/// A damaged index page hides rows from queries without touching any document: `verify`
/// reads every page (SQLite's integrity check), and the page's checksum names the damage.
#[test]
fn verify_reports_a_damaged_index_page() {
    let (dir, _files) = node_with_asthma();
    let db = home(&dir).join("node.db");
    let conn = caremesh_storage::page_checksums::open_directly(&db).unwrap();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    let (page, size): (i64, i64) = conn
        .query_row(
            "SELECT pageno, (SELECT page_size FROM pragma_page_size()) FROM dbstat \
             WHERE name = 'items_by_patient' LIMIT 1",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .unwrap();
    drop(conn);
    let mut bytes = std::fs::read(&db).unwrap();
    // Cells sit at the end of a page: flip a byte of the last index entry's key.
    let at = (page * size - 12) as usize;
    bytes[at] ^= 0x20;
    std::fs::write(&db, bytes).unwrap();
    let verify = run_verify(&dir);
    assert!(!verify.status.success(), "{}", stdout(&verify));
    assert!(
        stdout(&verify).contains("SQLite integrity check")
            && stdout(&verify).contains("failed its checksum"),
        "{}{}",
        stdout(&verify),
        stderr(&verify)
    );
}

/// `caremesh verify` on the node in `dir`.
fn run_verify(dir: &tempfile::TempDir) -> std::process::Output {
    run(&["verify", "--dir", home(dir).to_str().unwrap()])
}

/// Checking the store needs only the public key: a verifier's copy of the home need not
/// hold anything that could sign.
#[test]
fn verify_needs_only_the_public_key() {
    let (dir, _files) = node_with_asthma();
    std::fs::remove_file(home(&dir).join("keys/signing.key")).unwrap();
    let verify = run_verify(&dir);
    assert!(
        verify.status.success(),
        "{}{}",
        stdout(&verify),
        stderr(&verify)
    );
    // And it still catches a document that is not this organisation's.
    std::fs::write(home(&dir).join("keys/signing.pub"), "00".repeat(32)).unwrap();
    let verify = run_verify(&dir);
    assert!(!verify.status.success(), "{}", stdout(&verify));
}

#[test]
fn verify_reports_one_flipped_byte_in_stored_data() {
    for (table, column) in [("document_snapshots", "snapshot"), ("documents", "signed")] {
        let (dir, _files) = node_with_asthma();
        let clean = run_verify(&dir);
        assert!(clean.status.success(), "{}", stdout(&clean));
        flip_byte(&home(&dir).join("node.db"), table, column);
        let output = run_verify(&dir);
        assert_eq!(
            output.status.code(),
            Some(4),
            "flip in {column} not detected: {}",
            stdout(&output)
        );
        assert!(stdout(&output).contains("TAMPERED"), "{}", stdout(&output));
    }
}

/// A document's saved bytes live in a table of their own: a row that lost them (damage, a
/// hand edit) is reported with its document, never passed over as if it were not held.
#[test]
fn verify_reports_a_document_whose_saved_bytes_are_missing() {
    let (dir, _files) = node_with_asthma();
    let conn =
        caremesh_storage::page_checksums::open_directly(&home(&dir).join("node.db")).unwrap();
    let (doc_id, section): (Vec<u8>, String) = conn
        .query_row(
            "SELECT doc_id, section FROM documents WHERE section = 'problems'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    conn.execute(
        "DELETE FROM document_snapshots WHERE doc_id = ?1",
        [&doc_id],
    )
    .unwrap();
    drop(conn);
    let output = run_verify(&dir);
    assert_eq!(output.status.code(), Some(4), "{}", stdout(&output));
    let text = stdout(&output);
    assert!(text.contains("TAMPERED"), "{text}");
    assert!(text.contains(&section), "{text}");
}

#[test]
fn verify_reports_a_read_model_that_differs_from_the_signed_documents() {
    let (dir, _files) = node_with_asthma();
    let conn =
        caremesh_storage::page_checksums::open_directly(&home(&dir).join("node.db")).unwrap();
    conn.execute(
        "UPDATE items SET body = replace(body, 'Asthma', 'Nothing') WHERE section = 'problems'",
        [],
    )
    .unwrap();
    let output = run_verify(&dir);
    assert_eq!(output.status.code(), Some(4));
    assert!(
        stdout(&output).contains("read model"),
        "{}",
        stdout(&output)
    );
}

#[test]
fn bad_ndjson_lines_are_rejected_by_line_and_the_rest_ingested() {
    let dir = node("A81001", "gp");
    let files = tempfile::tempdir().unwrap();
    let patient = json!({ "resourceType": "Patient", "id": "p1",
        "identifier": [{ "system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9912003888" }] });
    let good = condition("2024-01-01T00:00:00Z", "Asthma", None);
    let truncated = good.to_string();
    let lines = [
        patient.to_string(),
        "{ not json".to_string(),
        good.to_string(),
        truncated[..truncated.len() / 2].to_string(),
    ];
    let path = files.path().join("extract.ndjson");
    std::fs::write(&path, lines.join("\n")).unwrap();
    let output = ingest(&home(&dir), &["--json", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    let report = report_json(&output);
    let locations: Vec<&str> = report["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["location"].as_str().unwrap())
        .collect();
    assert_eq!(locations, ["line 2", "line 4"]);
    assert_eq!(report["accepted"], 2);
    assert!(
        stdout(&ingest(&home(&dir), &[path.to_str().unwrap()]))
            .contains("reconciled: 4 resources read, 4 accounted for")
    );
    assert_eq!(problems(&home(&dir)), ["Asthma"]);
}

/// `caremesh consent show` for 9912003888 at this node's own organisation.
fn own_consent(dir: &Path) -> String {
    let output = run(&[
        "consent",
        "show",
        "--dir",
        dir.to_str().unwrap(),
        "--nhs",
        "9912003888",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    stdout(&output).lines().next().unwrap().to_string()
}

#[test]
fn fhir_consents_in_the_extract_record_share_in_share_out_and_objections() {
    let dir = node("A81001", "gp");
    let config = home(&dir).join("caremesh.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("share_in = true", "share_in = false")).unwrap();
    let files = tempfile::tempdir().unwrap();
    let uk_core = real_data("uk-core");
    // NHS England's example: information access (INFA) for Richard Smith, so Share In.
    ingest_ok(
        &home(&dir),
        &[
            &uk_core.join("UKCore-Patient-RichardSmith-Example.json"),
            &uk_core.join("UKCore-Consent-ForInformationAccess-Example.json"),
        ],
    );
    assert_eq!(
        own_consent(&home(&dir)),
        "A81001 (this organisation): Share Out on, Share In on, objection none"
    );
    // An objection to sharing for direct care (deny, purpose TREAT), later entered in error.
    let objection = |status: &str, updated: &str| {
        json!({
            "resourceType": "Consent", "id": "objection", "status": status,
            "meta": {"lastUpdated": updated},
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
            "patient": {"reference": "Patient/UKCore-Patient-RichardSmith-Example"},
            "provision": {"type": "deny", "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}]}
        })
    };
    let recorded = files.path().join("objection.json");
    write_json(&recorded, &objection("active", "2026-01-01T00:00:00Z"));
    ingest_ok(&home(&dir), &[&recorded]);
    assert!(
        own_consent(&home(&dir)).ends_with("objection recorded"),
        "{}",
        own_consent(&home(&dir))
    );
    let in_error = files.path().join("objection-in-error.json");
    write_json(
        &in_error,
        &objection("entered-in-error", "2026-01-02T00:00:00Z"),
    );
    ingest_ok(&home(&dir), &[&in_error]);
    assert!(own_consent(&home(&dir)).ends_with("objection none"));
    // The older version arriving late changes nothing.
    let output = ingest(&home(&dir), &["--json", recorded.to_str().unwrap()]);
    assert_eq!(report_json(&output)["stale"], 1);
    assert!(own_consent(&home(&dir)).ends_with("objection none"));
}

/// `caremesh record` for `nhs` with the one line that depends on when the test ran (the
/// source's "data as of") made stable.
fn record_text(dir: &Path, nhs: &str) -> String {
    let output = record_as_tests(dir, nhs, &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    stdout(&output)
        .lines()
        .map(|line| match line.find("data as of ") {
            // Age depends on today's date.
            None if line.starts_with("Born ") => match (line.find(" ("), line.find(')')) {
                (Some(open), Some(close)) => {
                    format!("{} (age){}", &line[..open], &line[close + 1..])
                }
                _ => line.to_string(),
            },
            Some(at) => match line[at..].find(" - ") {
                Some(end) => format!(
                    "{}data as of (time of ingest){}",
                    &line[..at],
                    &line[at + end..]
                ),
                None => line.to_string(),
            },
            None => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// Compares what a clinician reads with the expectation beside the fixture; with
/// CAREMESH_BLESS=1 writes the expectation instead (then read the diff before committing).
fn expect_reading(expected_file: &Path, actual: &str) {
    if std::env::var_os("CAREMESH_BLESS").is_some() {
        std::fs::write(expected_file, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(expected_file).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run with CAREMESH_BLESS=1 to write it",
            expected_file.display()
        )
    });
    if expected != actual {
        let first = expected
            .lines()
            .zip(actual.lines())
            .position(|(e, a)| e != a)
            .unwrap_or(expected.lines().count().min(actual.lines().count()));
        panic!(
            "what a clinician reads changed from {} at line {}:\n  expected: {:?}\n  actual:   {:?}\n\nwhole output:\n{actual}",
            expected_file.display(),
            first + 1,
            expected.lines().nth(first),
            actual.lines().nth(first)
        );
    }
}

/// The edge-case corpus (tests/fixtures/clinical/README.md says what each case is for):
/// degraded codes, no known allergies beside allergies, refuted and entered-in-error
/// entries, resolved problems with abatement, structured dosages without text, repeat
/// issues, a stopped course with its end, float artefacts, UCUM units, ranges,
/// interpretations, an absent value and an instant that falls on another day in the UK.
/// What a clinician reads of public example records, held to an expectation as the edge
/// cases are: every UK Core example about Richard Smith (each resource type the view shows),
/// and a Synthea patient. `CAREMESH_BLESS=1` rewrites them; read the diff, it is clinical.
#[test]
fn public_example_records_read_as_expected() {
    let cases: [(&str, &[&str], &str, &str); 2] = [
        (
            "uk-core",
            &[],
            "9912003888",
            "uk-core-richard-smith.expected.txt",
        ),
        (
            "synthea-r4",
            &["--patient-index"],
            "9990166137",
            "synthea-antonio-castellanos.expected.txt",
        ),
    ];
    for (corpus, options, nhs, expected) in cases {
        let dir = node("A81001", "gp");
        let data = fixtures().join(corpus);
        let mut args: Vec<String> = options.iter().map(|o| o.to_string()).collect();
        if !options.is_empty() {
            args.push(data.join("nhs-numbers.csv").to_string_lossy().into());
        }
        args.push(data.to_string_lossy().into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = ingest(&home(&dir), &args);
        assert!(
            output.status.code().is_some_and(|c| c == 0 || c == 2),
            "{}",
            stderr(&output)
        );
        let actual = record_text(&home(&dir), nhs);
        expect_reading(&fixtures().join("clinical").join(expected), &actual);
    }
}

#[test]
fn edge_cases_read_as_their_sources_say() {
    let dir = node("A81001", "gp");
    let corpus = fixtures().join("clinical");
    ingest_ok(&home(&dir), &[&corpus.join("edge-cases.json")]);
    let text = record_text(&home(&dir), "9990000018");
    assert!(
        !text.contains("ENTERED-IN-ERROR-MARKER"),
        "entered in error is never shown"
    );
    expect_reading(&corpus.join("edge-cases.expected.txt"), &text);
}

/// Drops `name` from the UK Core fixtures into the running node's drop folder (written aside,
/// renamed in) and waits until it is in processed/.
fn drop_and_wait(home: &Path, name: &str) {
    let temporary = home.join("drop").join(format!(".{name}.part"));
    std::fs::copy(fixtures().join("uk-core").join(name), &temporary).unwrap();
    std::fs::rename(&temporary, home.join("drop").join(name)).unwrap();
    let processed = home.join("processed").join(name);
    assert!(
        wait_for(Duration::from_secs(60), || processed.exists()),
        "{name} never reached processed/"
    );
}

/// Finding: after a crash cut the WAL, the ingest log lost rows while processed/ still held
/// the files, and `verify` said OK. Here the database goes back to an earlier state (as a cut
/// WAL or a restore from backup leaves it); `verify` names the file whose ingest was lost and
/// the command that puts it back, and after that command the record and `verify` agree.
#[test]
fn verify_names_files_in_processed_whose_ingest_the_database_lost() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("node");
    init_node(&home, "A81001", "Banbury Road Surgery", "gp");
    let saved = dir.path().join("saved");
    std::fs::create_dir(&saved).unwrap();
    {
        let _node = RunningNode::start(&home);
        drop_and_wait(&home, "UKCore-Patient-RichardSmith-Example.json");
        drop_and_wait(&home, "UKCore-AllergyIntolerance-Amoxicillin-Example.json");
    }
    for file in ["node.db", "node.db-wal"] {
        if home.join(file).exists() {
            std::fs::copy(home.join(file), saved.join(file)).unwrap();
        }
    }
    {
        let _node = RunningNode::start(&home);
        drop_and_wait(&home, "UKCore-Condition-BleedingFromEar-Example.json");
    }
    let has_condition =
        || stdout(&record_as_tests(&home, "9912003888", &[])).contains("Bleeding from ear");
    assert!(has_condition());
    let _ = std::fs::remove_file(home.join("node.db-shm"));
    let _ = std::fs::remove_file(home.join("node.db-wal"));
    for file in ["node.db", "node.db-wal"] {
        if saved.join(file).exists() {
            std::fs::copy(saved.join(file), home.join(file)).unwrap();
        }
    }
    assert!(!has_condition(), "the database lost the condition");

    let output = run(&["verify", "--dir", home.to_str().unwrap()]);
    let report = stdout(&output);
    assert_eq!(output.status.code(), Some(4), "{report}");
    let lost = "processed/UKCore-Condition-BleedingFromEar-Example.json";
    assert!(
        report.contains(&format!("NOT IN THE INGEST LOG {lost}")),
        "{report}"
    );
    assert_eq!(
        report.matches("NOT IN THE INGEST LOG").count(),
        1,
        "only the lost file: {report}"
    );
    // The command verify prints, run as printed.
    let command = report
        .lines()
        .find_map(|line| {
            line.split("ingest it again (what is already held is unchanged): ")
                .nth(1)
        })
        .expect("the command to run");
    let arguments: Vec<&str> = command.split_whitespace().skip(1).collect();
    assert_eq!(arguments[0], "ingest", "{command}");
    let again = run(&arguments);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(has_condition());
    let output = run(&["verify", "--dir", home.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stdout(&output));
}

/// A small file system (tmpfs) mounted for one test, unmounted after. Mounting needs root, as
/// CI runs; elsewhere the test says it was skipped.
struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(path: &Path, megabytes: u32) -> Option<SmallDisk> {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting a small disk needs root (CI runs as root)");
            return None;
        }
        std::fs::create_dir_all(path).unwrap();
        let mounted = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={megabytes}m,mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .status()
            .unwrap();
        assert!(mounted.success(), "mount a {megabytes} MB tmpfs");
        Some(SmallDisk {
            path: path.to_path_buf(),
        })
    }

    /// Writes a filler file until the disk refuses more.
    fn fill(&self) -> std::path::PathBuf {
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0x5a; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        let _ = file.sync_all();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// Finding: on a full disk ingest failed three times with no list of what got in, views
/// answered 500, `/health` said ok and the audit report failed. Now: ingest pauses and says
/// why, the CLI says what went in and what did not, views and their audit go on from the disk
/// reserve, `/health`, status and metrics say the disk is full, and freeing space resumes all.
#[test]
fn a_full_disk_pauses_ingest_says_so_and_keeps_views_and_their_audit_going() {
    let outside = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(&outside.path().join("disk"), 48) else {
        return;
    };
    let home = disk.path.join("node");
    init_node(&home, "A81001", "Banbury Road Surgery", "gp");
    let fixture = |name: &str| fixtures().join("uk-core").join(name);
    let output = ingest(
        &home,
        &[fixture("UKCore-Patient-RichardSmith-Example.json")
            .to_str()
            .unwrap()],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let log = outside.path().join("node.log");
    let node =
        RunningNode::start_logging(&home, "warn", std::fs::File::create(&log).unwrap().into());
    assert!(
        home.join("reserve.space").exists(),
        "the node keeps a disk reserve"
    );
    let nhs = "9912003888";
    let view = |session: &str| http_get_as(&node.address, &format!("/api/patients/{nhs}"), session);
    assert_eq!(view(&clinician_session(&home, &node.address, nhs)).0, 200);
    let health = || -> serde_json::Value {
        serde_json::from_str(&http_get(&node.address, "/health").1).unwrap()
    };
    assert_eq!(health()["status"], "ok");

    // An allergy waits beside the drop folder (a hidden name is never taken); the disk fills.
    let waiting = home.join("drop/.allergy.json");
    std::fs::copy(
        fixture("UKCore-AllergyIntolerance-Amoxicillin-Example.json"),
        &waiting,
    )
    .unwrap();
    let filler = disk.fill();
    std::fs::rename(&waiting, home.join("drop/allergy.json")).unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || {
            let health = health();
            health["status"] == "degraded"
                && health["drop_folder"]
                    .as_str()
                    .is_some_and(|d| d.contains("disk"))
        }),
        "{}",
        health()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        home.join("drop/allergy.json").exists(),
        "the file waits in drop/"
    );

    // Views, with their launch and audit, go on: the reserve makes room for them.
    let session = clinician_session(&home, &node.address, nhs);
    let (status, body) = view(&session);
    assert_eq!(status, 200, "{body}");
    assert!(
        !home.join("reserve.space").exists(),
        "the reserve was given up"
    );
    assert!(
        health()["disk"]["problem"]
            .as_str()
            .unwrap()
            .contains("disk full")
    );
    // The audit report reads, and holds both views (the second written from the reserve).
    let views = audit_actions(&home, nhs)
        .into_iter()
        .filter(|action| action.starts_with("view:"))
        .count();
    assert!(views >= 2, "{:?}", audit_actions(&home, nhs));
    let status_text = stdout(&run(&["status", "--dir", home.to_str().unwrap()]));
    assert!(status_text.contains("DISK: disk full"), "{status_text}");
    let admin = role_session(&home, &node.address, "admin");
    let metrics = http_get_as(&node.address, "/metrics", &admin).1;
    let free: f64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("caremesh_disk_free_bytes "))
        .expect("the free-space metric")
        .parse()
        .unwrap();
    assert!(free < 16.0 * 1024.0 * 1024.0, "{free}");
    // The command line refuses to eat into what is left.
    let condition = fixture("UKCore-Condition-BleedingFromEar-Example.json");
    let cli = ingest(&home, &[condition.to_str().unwrap()]);
    assert!(!cli.status.success());
    assert!(
        stderr(&cli).contains("nothing was ingested"),
        "{}",
        stderr(&cli)
    );

    // Space is freed: the waiting file goes in, the reserve comes back, health is ok.
    std::fs::remove_file(filler).unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || home
            .join("processed/allergy.json")
            .exists()),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        wait_for(Duration::from_secs(30), || health()["status"] == "ok"),
        "{}",
        health()
    );
    assert!(home.join("reserve.space").exists());
    assert!(stdout(&record_as_tests(&home, nhs, &[])).contains("Amoxicillin"));

    // A large ingest (about 25 MB in the database) that runs the disk out part way says
    // exactly what went in.
    let extract = outside.path().join("extract");
    let generated = run(&[
        "generate",
        "--org",
        "A81001",
        "--patients",
        "800",
        "--seed",
        "3",
        "--out",
        extract.to_str().unwrap(),
    ]);
    assert!(generated.status.success(), "{}", stderr(&generated));
    let free = node_free_bytes(&home);
    let leave = 16 * 1024 * 1024 + 512 * 1024;
    std::fs::write(
        disk.path.join("filler"),
        vec![0x5a; (free - leave) as usize],
    )
    .unwrap();
    let cli = ingest(&home, &[extract.to_str().unwrap()]);
    assert!(!cli.status.success(), "{}", stdout(&cli));
    let (said, listed) = (stderr(&cli), stdout(&cli));
    assert!(
        said.contains("ingest stopped at")
            && said.contains("Nothing of that file went in")
            && said.contains("the disk is full"),
        "{said}"
    );
    assert!(
        listed.contains("went in whole before the stop:"),
        "{listed}"
    );
}

/// Free bytes on the disk holding `path`.
fn node_free_bytes(path: &Path) -> u64 {
    let output = std::process::Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// The operator reads what ingest rejected and why, and releases it once its cause is fixed:
/// a condition that came before its patient goes in once the patient is ingested, and its
/// reason goes with it. A file still wrong goes back with its new reasons. Reading and
/// releasing are audited; names that are not quarantined files are refused.
#[test]
fn a_quarantined_file_is_read_and_released_once_its_cause_is_fixed() {
    let dir = node("A81001", "gp");
    let files = tempfile::tempdir().unwrap();
    let early = files.path().join("condition-before-patient.json");
    write_json(&early, &condition("2024-01-01T00:00:00Z", "Asthma", None));
    let output = ingest(&home(&dir), &[early.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
    let node_home = home(&dir);
    let quarantine = |args: &[&str]| {
        let mut all = vec!["quarantine", args[0], "--dir", node_home.to_str().unwrap()];
        all.extend_from_slice(&args[1..]);
        run(&all)
    };

    let listed = quarantine(&["list", "--json"]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["name"], "condition-before-patient.json");
    assert_eq!(listed[0]["problems"], 1);
    assert!(
        listed[0]["first_problem"]
            .as_str()
            .unwrap()
            .contains("ingest the Patient first"),
        "{listed}"
    );

    let shown = quarantine(&["show", "condition-before-patient.json"]);
    assert!(shown.status.success(), "{}", stderr(&shown));
    let text = stdout(&shown);
    assert!(
        text.contains("ingest the Patient first"),
        "the reason: {text}"
    );
    assert!(text.contains("\"Asthma\""), "then the file: {text}");
    for outside in [
        "../caremesh.toml",
        "..",
        "condition-before-patient.json.reason.txt",
        "absent.json",
    ] {
        let refused = quarantine(&["show", outside]);
        assert!(!refused.status.success(), "{outside} was shown");
        assert!(
            stderr(&refused).contains("caremesh quarantine list"),
            "{}",
            stderr(&refused)
        );
    }

    // Released before its cause is fixed: back with its reasons, under a new name.
    let again = quarantine(&["release", "condition-before-patient.json"]);
    assert_eq!(again.status.code(), Some(2), "{}", stdout(&again));
    let listed = quarantine(&["list", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 1, "{listed}");
    assert!(
        names[0].ends_with("-condition-before-patient.json"),
        "{names:?}"
    );
    assert_eq!(listed[0]["problems"], 1, "its new reason is beside it");
    let renamed = names[0].to_string();

    // The patient arrives; the condition is released into the record.
    ingest_ok(&home(&dir), &[&patient_file(files.path())]);
    let released = quarantine(&["release", &renamed]);
    assert!(
        released.status.success(),
        "{}\n{}",
        stdout(&released),
        stderr(&released)
    );
    assert_eq!(problems(&home(&dir)), vec!["Asthma".to_string()]);
    let left: Vec<_> = std::fs::read_dir(home(&dir).join("quarantine"))
        .unwrap()
        .collect();
    assert!(
        left.is_empty(),
        "the file and its reason left quarantine: {left:?}"
    );
    assert!(home(&dir).join("processed").join(&renamed).exists());
    assert!(stdout(&quarantine(&["list"])).contains("quarantine/ is empty"));

    let trail = audit_trail_csv(&home(&dir));
    assert!(trail.contains("quarantine-read"), "{trail}");
    assert_eq!(trail.matches("quarantine-release").count(), 2, "{trail}");
}

/// `[ingest] keep_processed_days` in `home`'s configuration.
fn keep_processed_days(home: &Path, days: u32) {
    let config = home.join("caremesh.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        text.contains("keep_processed_days = 7\n"),
        "init writes the default: {text}"
    );
    let text = text.replacen(
        "keep_processed_days = 7\n",
        &format!("keep_processed_days = {days}\n"),
        1,
    );
    std::fs::write(&config, text).unwrap();
}

fn processed_names(home: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(home.join("processed"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    names
}

/// Raw extracts are patient data in plain text: a file that went in whole leaves processed/
/// once its ingest is older than `keep_processed_days` (a week by default, 0 straight
/// away), from the command line and from the drop folder. A file the ingest log does not
/// name is never removed (it is how `caremesh verify` finds an ingest the database lost),
/// and quarantined files stay for the operator.
#[test]
fn processed_extracts_are_kept_only_as_long_as_the_setting_says() {
    let dir = node("A81001", "gp");
    let home = home(&dir);
    let files = tempfile::tempdir().unwrap();
    let patient = patient_file(files.path());
    let asthma = files.path().join("asthma.json");
    write_json(&asthma, &condition("2024-01-01T00:00:00Z", "Asthma", None));
    let ingest_moving = |path: &Path| {
        let output = ingest(&home, &["--move", path.to_str().unwrap()]);
        assert!(output.status.success(), "{}", stderr(&output));
    };

    // A week by default: kept.
    ingest_moving(&patient);
    assert_eq!(processed_names(&home), vec!["patient.json"]);
    // Planted: a file the log does not name.
    std::fs::write(home.join("processed/unlogged.json"), "{}").unwrap();

    // Eight days later (the log's time moved back), the next ingest's sweep removes it.
    caremesh_storage::page_checksums::open_directly(&home.join("node.db"))
        .unwrap()
        .execute("UPDATE ingests SET at = at - 8 * 24 * 3600", [])
        .unwrap();
    ingest_moving(&asthma);
    assert_eq!(
        processed_names(&home),
        vec!["asthma.json", "unlogged.json"],
        "the week-old extract went; the new one and the unlogged one stay"
    );
    assert_eq!(
        problems(&home),
        vec!["Asthma".to_string()],
        "the record keeps what it gave"
    );

    // 0: gone straight after its ingest, from the drop folder too; a rejected file stays in
    // quarantine.
    keep_processed_days(&home, 0);
    let node = RunningNode::start(&home);
    let hypertension = files.path().join("hypertension.json");
    let mut condition = condition("2024-02-01T00:00:00Z", "Hypertension", None);
    condition["id"] = json!("c2");
    write_json(&hypertension, &condition);
    let orphan = files.path().join("orphan.json");
    let mut orphaned = condition.clone();
    orphaned["id"] = json!("c3");
    orphaned["subject"] = json!({"reference": "Patient/unknown"});
    write_json(&orphan, &orphaned);
    drop_by_rename(&home, &hypertension);
    drop_by_rename(&home, &orphan);
    assert!(
        wait_for(Duration::from_secs(60), || {
            problems(&home).contains(&"Hypertension".to_string())
                && home.join("quarantine/orphan.json").exists()
                && processed_names(&home) == vec!["unlogged.json"]
        }),
        "processed/ holds {:?}",
        processed_names(&home)
    );
    drop(node);
}
