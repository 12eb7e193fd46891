//! The FHIR API over a real node process and real sockets: tokens, reads, searches,
//! `$everything`, refusals and their audit.

mod support;

use serde_json::{Value, json};
use std::path::Path;
use support::*;

const PATIENT: &str = "9912003888";
const OTHER_PATIENT: &str = "9912003896";

/// Two patients of a practice: one with an asthma diagnosis (with a note), a penicillin
/// allergy and a salbutamol statement; the other with a diagnosis of their own.
fn practice(dir: &Path) -> std::path::PathBuf {
    let home = dir.join("node");
    init_node(&home, "A81001", "Banbury Road Surgery", "gp");
    let extract = dir.join("extract.json");
    let patient = |id: &str, nhs: &str, family: &str| {
        json!({"resource": {"resourceType": "Patient", "id": id,
            "meta": {"lastUpdated": "2026-01-01T09:00:00Z"},
            "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs}],
            "name": [{"family": family, "given": ["Test"]}], "birthDate": "1970-09-11"}})
    };
    // Systolic blood pressure, monthly: enough to page through.
    let observation = |id: &str, at: &str, mmhg: u32| {
        json!({"resource": {"resourceType": "Observation", "id": id, "status": "final",
            "subject": {"reference": "Patient/p1"},
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "72313002", "display": "Systolic arterial pressure"}]},
            "effectiveDateTime": at,
            "valueQuantity": {"value": mmhg, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}})
    };
    write_json(
        &extract,
        &json!({"resourceType": "Bundle", "type": "collection", "entry": [
            patient("p1", PATIENT, "SMITH"),
            patient("p2", OTHER_PATIENT, "JONES"),
            {"resource": {"resourceType": "Condition", "id": "asthma-1", "subject": {"reference": "Patient/p1"},
                "meta": {"lastUpdated": "2026-03-01T09:00:00Z"},
                "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
                "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]},
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "195967001", "display": "Asthma"}]},
                "onsetDateTime": "2001-04-02", "note": [{"text": "Uses salbutamol before exercise."}]}},
            {"resource": {"resourceType": "AllergyIntolerance", "id": "pen-1", "patient": {"reference": "Patient/p1"},
                "meta": {"lastUpdated": "2025-06-01T09:00:00Z"},
                "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}]},
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "91936005", "display": "Allergy to penicillin"}]},
                "reaction": [{"manifestation": [{"coding": [{"system": "http://snomed.info/sct", "code": "271807003", "display": "Rash"}]}], "severity": "moderate"}]}},
            {"resource": {"resourceType": "MedicationStatement", "id": "salb-1", "subject": {"reference": "Patient/p1"},
                "status": "active",
                "medicationCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "320176004", "display": "Salbutamol 100micrograms/dose inhaler"}]},
                "dosage": [{"text": "Two puffs when required, up to four times a day"}]}},
            observation("bp-1", "2026-01-05T09:00:00Z", 150),
            observation("bp-2", "2026-02-05T09:00:00Z", 146),
            observation("bp-3", "2026-03-05T09:00:00Z", 141),
            observation("bp-4", "2026-04-05T09:00:00Z", 138),
            observation("bp-5", "2026-05-05T09:00:00Z", 132),
            {"resource": {"resourceType": "Condition", "id": "htn-2", "subject": {"reference": "Patient/p2"},
                "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003", "display": "Hypertension"}]}}}
        ]}),
    );
    let ingested = ingest(&home, &[extract.to_str().unwrap()]);
    assert!(ingested.status.success(), "{}", stderr(&ingested));
    home
}

fn json_body(response: &HttpResponse) -> Value {
    serde_json::from_str(&response.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", response.body))
}

/// An OperationOutcome's first issue code, checking it is one.
fn issue_code(response: &HttpResponse) -> String {
    let body = json_body(response);
    assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
    body["issue"][0]["code"].as_str().unwrap().to_string()
}

/// `caremesh audit report` with `filter`, as JSON rows.
fn audit_rows(home: &Path, filter: &[&str]) -> Value {
    let mut args = vec![
        "audit",
        "report",
        "--dir",
        home.to_str().unwrap(),
        "--format",
        "json",
    ];
    args.extend_from_slice(filter);
    let report = run(&args);
    assert!(report.status.success(), "{}", stderr(&report));
    serde_json::from_slice(&report.stdout).unwrap()
}

fn resource_types(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["resourceType"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_token_reads_a_patient_searches_by_nhs_number_and_gets_everything_as_the_cli_renders_it() {
    let dir = tempfile::tempdir().unwrap();
    let home = practice(dir.path());
    let node = RunningNode::start(&home);
    let address = node.address.as_str();

    // The CapabilityStatement answers without a token, as FHIR JSON.
    let metadata = fhir_get(address, "/fhir/metadata", None);
    assert_eq!(metadata.status, 200);
    assert!(
        metadata
            .header("content-type")
            .unwrap()
            .starts_with("application/fhir+json")
    );
    let capability = json_body(&metadata);
    assert_eq!(capability["resourceType"], "CapabilityStatement");
    assert_eq!(capability["fhirVersion"], "4.0.1");

    // Nothing else does.
    let anonymous = fhir_get(address, &format!("/fhir/Patient/{PATIENT}"), None);
    assert_eq!(anonymous.status, 401);
    assert_eq!(issue_code(&anonymous), "login");
    assert!(
        anonymous
            .header("www-authenticate")
            .unwrap()
            .starts_with("Bearer")
    );
    let made_up = fhir_get(
        address,
        &format!("/fhir/Patient/{PATIENT}"),
        Some(&"a".repeat(64)),
    );
    assert_eq!(made_up.status, 401);

    let token = api_token(&home, &["--client", "integration-engine"]);
    let read = fhir_get(address, &format!("/fhir/Patient/{PATIENT}"), Some(&token));
    assert_eq!(read.status, 200, "{}", read.body);
    let patient = json_body(&read);
    assert_eq!(patient["resourceType"], "Patient");
    assert_eq!(patient["id"], PATIENT);
    assert_eq!(patient["name"][0]["family"], "SMITH");
    assert_eq!(
        patient["meta"]["source"],
        "https://fhir.nhs.uk/Id/ods-organization-code/A81001#TestSystem"
    );

    let search = fhir_get(
        address,
        &format!("/fhir/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|{PATIENT}"),
        Some(&token),
    );
    assert_eq!(search.status, 200, "{}", search.body);
    let bundle = json_body(&search);
    assert_eq!(bundle["type"], "searchset");
    assert_eq!(bundle["total"], 1);
    assert_eq!(bundle["entry"][0]["resource"]["id"], PATIENT);
    assert_eq!(
        bundle["entry"][0]["fullUrl"],
        format!("http://{address}/fhir/Patient/{PATIENT}")
    );
    // A patient not held is an empty searchset, and "not found" to a read.
    let none = json_body(&fhir_get(
        address,
        "/fhir/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|9912003918",
        Some(&token),
    ));
    assert_eq!(none["total"], 0);
    let unheld = fhir_get(address, "/fhir/Patient/9912003918", Some(&token));
    assert_eq!(unheld.status, 404);
    assert_eq!(issue_code(&unheld), "not-found");

    // $everything is the record as the CLI renders it, with each entry's fullUrl.
    let everything = fhir_get(
        address,
        &format!("/fhir/Patient/{PATIENT}/$everything"),
        Some(&token),
    );
    assert_eq!(everything.status, 200, "{}", everything.body);
    let mut served = json_body(&everything);
    for entry in served["entry"].as_array_mut().unwrap() {
        let full_url = entry.as_object_mut().unwrap().remove("fullUrl").unwrap();
        let resource = &entry["resource"];
        assert_eq!(
            full_url,
            format!(
                "http://{address}/fhir/{}/{}",
                resource["resourceType"].as_str().unwrap(),
                resource["id"].as_str().unwrap()
            )
        );
    }
    let cli = record_as_tests(&home, PATIENT, &["--fhir"]);
    assert!(cli.status.success(), "{}", stderr(&cli));
    let rendered: Value = serde_json::from_slice(&cli.stdout).unwrap();
    assert_eq!(served, rendered);
    let types: std::collections::BTreeSet<String> = resource_types(&served).into_iter().collect();
    for expected in [
        "Patient",
        "AllergyIntolerance",
        "MedicationStatement",
        "Condition",
        "Provenance",
    ] {
        assert!(types.contains(expected), "{expected} in {types:?}");
    }
    let condition = served["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .find(|r| r["resourceType"] == "Condition")
        .unwrap();
    assert_eq!(condition["id"], "A81001-asthma-1");
    assert_eq!(
        condition["subject"]["reference"],
        format!("Patient/{PATIENT}")
    );
    assert_eq!(
        condition["note"][0]["text"],
        "Uses salbutamol before exercise."
    );
    assert!(
        !everything.body.contains("Hypertension"),
        "another patient's data is never in the record"
    );

    // $summary: an International Patient Summary document with the three required
    // sections, each listing the patient's own entries.
    let summary = fhir_get(
        address,
        &format!("/fhir/Patient/{PATIENT}/$summary"),
        Some(&token),
    );
    assert_eq!(summary.status, 200, "{}", summary.body);
    let document = json_body(&summary);
    assert_eq!(document["type"], "document");
    let composition = &document["entry"][0]["resource"];
    assert_eq!(composition["resourceType"], "Composition");
    assert_eq!(
        composition["subject"]["reference"],
        format!("Patient/{PATIENT}")
    );
    let listed = |loinc: &str| -> Vec<String> {
        composition["section"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["code"]["coding"][0]["code"] == loinc)
            .unwrap_or_else(|| panic!("section {loinc} in {composition}"))["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["reference"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(listed("48765-2"), ["AllergyIntolerance/A81001-pen-1"]);
    assert_eq!(listed("10160-0"), ["MedicationStatement/A81001-salb-1"]);
    assert_eq!(listed("11450-4"), ["Condition/A81001-asthma-1"]);
    assert_eq!(listed("30954-2").len(), 5, "the blood pressures");

    // _since keeps what arrived at this node at or after it, what its publisher changed at
    // or after it, and what does not say when.
    let everything_since = |since: i64| {
        let at = caremesh_fhir::clock::rfc3339(since);
        resource_types(&json_body(&fhir_get(
            address,
            &format!("/fhir/Patient/{PATIENT}/$everything?_since={at}"),
            Some(&token),
        )))
    };
    let now = caremesh_fhir::clock::now_unix();
    let kept = everything_since(now - 3_600);
    assert!(
        kept.contains(&"AllergyIntolerance".to_string()),
        "updated by its publisher in 2025, but new here within the hour: {kept:?}"
    );
    let kept = everything_since(now + 3_600);
    assert!(
        !kept.contains(&"AllergyIntolerance".to_string()),
        "neither new here nor updated since: {kept:?}"
    );
    assert!(!kept.contains(&"Condition".to_string()), "{kept:?}");
    assert!(
        kept.contains(&"MedicationStatement".to_string()),
        "no lastUpdated, so kept: {kept:?}"
    );

    // Parameters the API does not support are errors, never ignored.
    for (path, code) in [
        (
            format!("/fhir/Patient/{PATIENT}/$everything?_since=yesterday"),
            "value",
        ),
        (
            format!("/fhir/Patient/{PATIENT}/$everything?_type=Condition"),
            "not-supported",
        ),
        ("/fhir/Patient?name=SMITH".to_string(), "not-supported"),
        ("/fhir/Patient".to_string(), "required"),
        (
            format!("/fhir/Patient?identifier=http://example.org|{PATIENT}"),
            "value",
        ),
        (
            format!("/fhir/Patient/{PATIENT}?_format=xml"),
            "not-supported",
        ),
    ] {
        let refused = fhir_get(address, &path, Some(&token));
        assert_eq!(refused.status, 400, "{path}: {}", refused.body);
        assert_eq!(issue_code(&refused), code, "{path}");
    }

    // Every read is in the audit trail, naming the client.
    let rows = audit_rows(&home, &["--patient", PATIENT]);
    let fhir_rows: Vec<&Value> = rows
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"].as_str().unwrap_or("").starts_with("fhir-"))
        .collect();
    assert!(
        fhir_rows.len() >= 4,
        "read, search and two $everything: {rows:#}"
    );
    for row in fhir_rows {
        assert_eq!(row["user_id"], "client:integration-engine", "{row}");
        assert!(
            row["detail"]
                .as_str()
                .unwrap()
                .contains("client integration-engine"),
            "{row}"
        );
    }
}

#[test]
fn a_types_search_filters_sorts_and_pages_within_the_patients_record() {
    let dir = tempfile::tempdir().unwrap();
    let home = practice(dir.path());
    let node = RunningNode::start(&home);
    let address = node.address.as_str();
    let token = api_token(&home, &["--client", "integration-engine"]);
    let search = |path: &str| {
        let response = fhir_get(address, path, Some(&token));
        assert_eq!(response.status, 200, "{path}: {}", response.body);
        json_body(&response)
    };
    let ids = |bundle: &Value| -> Vec<String> {
        bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["search"]["mode"] == "match")
            .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
            .collect()
    };

    // One type, one patient: never another type or another patient's.
    let conditions = search(&format!("/fhir/Condition?patient={PATIENT}"));
    assert_eq!(ids(&conditions), ["A81001-asthma-1"]);
    assert_eq!(
        ids(&search(&format!(
            "/fhir/Condition?patient=Patient/{OTHER_PATIENT}"
        ))),
        ["A81001-htn-2"]
    );
    let allergies = search(&format!(
        "/fhir/AllergyIntolerance?patient.identifier=https://fhir.nhs.uk/Id/nhs-number%7C{PATIENT}&clinical-status=active"
    ));
    assert_eq!(ids(&allergies), ["A81001-pen-1"]);
    assert_eq!(
        ids(&search(&format!(
            "/fhir/Condition?patient={PATIENT}&code=http://snomed.info/sct%7C38341003"
        ))),
        Vec::<String>::new(),
        "hypertension is the other patient's"
    );
    assert_eq!(
        ids(&search(&format!(
            "/fhir/Observation?patient={PATIENT}&date=ge2026-03-01&date=lt2026-05-01&category=vital-signs&_sort=date"
        ))),
        ["A81001-bp-3", "A81001-bp-4"]
    );

    // Pages, newest first, followed by their next links to the end.
    let mut path = format!("/fhir/Observation?patient={PATIENT}&_count=2&_sort=-date");
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page = search(&path);
        assert_eq!(page["total"], 5);
        pages += 1;
        seen.extend(ids(&page));
        let next = page["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
            .map(|l| l["url"].as_str().unwrap().to_string());
        match next {
            Some(url) => {
                path = url
                    .strip_prefix(&format!("http://{address}"))
                    .expect("next links are this server's")
                    .to_string()
            }
            None => break,
        }
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(pages, 3);
    assert_eq!(
        seen,
        ["bp-5", "bp-4", "bp-3", "bp-2", "bp-1"].map(|id| format!("A81001-{id}"))
    );

    // What a type does not have, or a search without a patient, is an error, not ignored.
    for (path, status, code) in [
        (
            format!("/fhir/Observation?patient={PATIENT}&clinical-status=active"),
            400,
            "not-supported",
        ),
        (
            format!("/fhir/Immunization?patient={PATIENT}&category=x"),
            400,
            "not-supported",
        ),
        (
            "/fhir/Condition?code=195967001".to_string(),
            400,
            "required",
        ),
        (
            format!("/fhir/Condition?patient={PATIENT}&date=last-week"),
            400,
            "value",
        ),
        (
            format!("/fhir/Condition?patient={PATIENT}&_count=5000"),
            400,
            "value",
        ),
        ("/fhir/Condition?patient=12345".to_string(), 400, "value"),
        (
            format!("/fhir/Basic?patient={PATIENT}"),
            404,
            "not-supported",
        ),
    ] {
        let refused = fhir_get(address, &path, Some(&token));
        assert_eq!(refused.status, status, "{path}: {}", refused.body);
        assert_eq!(issue_code(&refused), code, "{path}");
    }

    // A token for another patient finds nothing, as for a patient not held.
    let other_only = api_token(
        &home,
        &["--client", "integration-engine", "--nhs", OTHER_PATIENT],
    );
    let none = fhir_get(
        address,
        &format!("/fhir/Condition?patient={PATIENT}"),
        Some(&other_only),
    );
    assert_eq!(none.status, 200);
    assert_eq!(json_body(&none)["total"], 0);

    // Each search is an audit entry saying what it served.
    let rows = audit_rows(&home, &["--patient", PATIENT]);
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .any(|r| r["action"] == "fhir-search"
                && r["detail"]
                    .as_str()
                    .unwrap()
                    .contains("search Observation: 2 of 5 matches served")),
        "{rows:#}"
    );
}

/// fhir-kit-client (npm), a FHIR client nobody here wrote, reads the API: the
/// CapabilityStatement, a patient search, a read, a type's search paged by following
/// `next` links, `$everything`, and a refusal without a token.
#[test]
fn fhir_kit_client_searches_pages_and_reads_everything() {
    let tests = repo_root().join("browser-tests");
    if let Err(missing) = ensure_npm_packages(&tests, &["fhir-kit-client"]) {
        panic!("fhir-kit-client could not be installed: {missing}");
    }
    let dir = tempfile::tempdir().unwrap();
    let home = practice(dir.path());
    let node = RunningNode::start(&home);
    let token = api_token(&home, &["--client", "fhir-kit-client"]);
    let output = std::process::Command::new("node")
        .arg(tests.join("fhir-kit-client.test.mjs"))
        .args([&format!("http://{}/fhir", node.address), &token, PATIENT])
        .output()
        .expect("node runs");
    assert!(
        output.status.success(),
        "fhir-kit-client: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["observations"], 5);
    assert_eq!(summary["pages"], 3, "two a page, followed by the client");
}

#[test]
fn tokens_are_limited_by_scope_patient_role_and_client_and_refusals_look_like_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let home = practice(dir.path());
    let node = RunningNode::start(&home);
    let address = node.address.as_str();
    let read = |path: &str, token: &str| fhir_get(address, path, Some(token));

    // A token for one patient: any other is "not found", as if not held.
    let one_patient = api_token(
        &home,
        &[
            "--client",
            "gp-app",
            "--user",
            "C0042",
            "--name",
            "Dr Ruth Ellis",
            "--nhs",
            PATIENT,
        ],
    );
    assert_eq!(
        read(&format!("/fhir/Patient/{PATIENT}"), &one_patient).status,
        200
    );
    let other = read(&format!("/fhir/Patient/{OTHER_PATIENT}"), &one_patient);
    assert_eq!(other.status, 404);
    assert_eq!(
        other.body,
        read("/fhir/Patient/9912003918", &one_patient).body,
        "a patient the token may not see reads as one not held"
    );

    // One resource by the id the API gave it, as a client follows a fullUrl (or an id-only
    // notification): served to a token that may see its patient, "not found" as if not
    // held to one that may not.
    let condition = read(
        &format!("/fhir/Condition?patient={PATIENT}&code=195967001"),
        &one_patient,
    );
    let condition = json_body(&condition)["entry"][0].clone();
    let path = condition["fullUrl"]
        .as_str()
        .unwrap()
        .split_once("/fhir/")
        .map(|(_, path)| format!("/fhir/{path}"))
        .unwrap();
    assert_eq!(path, "/fhir/Condition/A81001-asthma-1");
    let by_id = read(&path, &one_patient);
    assert_eq!(by_id.status, 200, "{}", by_id.body);
    assert_eq!(json_body(&by_id), condition["resource"]);
    let other_token = api_token(&home, &["--client", "gp-app", "--nhs", OTHER_PATIENT]);
    let hidden = read(&path, &other_token);
    assert_eq!(hidden.status, 404, "{}", hidden.body);
    assert_eq!(
        hidden.body,
        read("/fhir/Condition/A81001-no-such-condition", &other_token).body,
        "a resource the token may not see reads as one not held"
    );
    assert_eq!(
        read("/fhir/Condition/A81001-asthma-1", &one_patient).status,
        200
    );
    assert_eq!(
        read("/fhir/Observation/A81001-asthma-1", &one_patient).status,
        404,
        "the type is part of the id"
    );

    // A user whose role does not read records.
    let auditor = api_token(
        &home,
        &[
            "--client",
            "gp-app",
            "--user",
            "A0001",
            "--name",
            "Audit Officer",
            "--role",
            "auditor",
        ],
    );
    let refused = read(&format!("/fhir/Patient/{PATIENT}"), &auditor);
    assert_eq!(refused.status, 403);
    assert_eq!(issue_code(&refused), "forbidden");

    // A client registered for conditions only: no Patient reads; $everything drops what
    // its scopes do not cover.
    add_client(
        &home,
        "conditions-only",
        None,
        "system/Condition.rs system/Patient.rs",
    );
    let narrow = api_token(&home, &["--client", "conditions-only"]);
    let everything = json_body(&read(
        &format!("/fhir/Patient/{PATIENT}/$everything"),
        &narrow,
    ));
    let types = resource_types(&everything);
    assert!(types.contains(&"Condition".to_string()), "{types:?}");
    assert!(
        !types.contains(&"AllergyIntolerance".to_string()),
        "{types:?}"
    );
    let condition_scope = api_token(
        &home,
        &[
            "--client",
            "conditions-only",
            "--scope",
            "system/Condition.rs",
        ],
    );
    assert_eq!(
        read(&format!("/fhir/Patient/{PATIENT}"), &condition_scope).status,
        403
    );
    // Asking for more than the client holds grants nothing.
    let wider = run(&[
        "api-token",
        "--dir",
        home.to_str().unwrap(),
        "--client",
        "conditions-only",
        "--scope",
        "system/AllergyIntolerance.rs",
    ]);
    assert!(!wider.status.success());
    assert!(
        stderr(&wider).contains("grants none of"),
        "{}",
        stderr(&wider)
    );

    // Removing a client ends its tokens at once.
    let removed = run(&[
        "api-client",
        "remove",
        "--dir",
        home.to_str().unwrap(),
        "--id",
        "conditions-only",
    ]);
    assert!(removed.status.success(), "{}", stderr(&removed));
    assert_eq!(
        read(&format!("/fhir/Patient/{PATIENT}"), &narrow).status,
        401
    );

    let listed = run(&["api-client", "list", "--dir", home.to_str().unwrap()]);
    let listed = stdout(&listed);
    assert!(listed.contains("gp-app"), "{listed}");
    assert!(!listed.contains("conditions-only"), "{listed}");

    // The refusals and the user's reads are in the audit trail under the user's name.
    let rows = audit_rows(&home, &["--user", "C0042"]);
    let rows = rows.as_array().unwrap();
    assert!(
        rows.iter().any(|r| r["action"] == "fhir-read"
            && r["outcome"] == "refused"
            && r["user_name"] == "Dr Ruth Ellis"),
        "{rows:#?}"
    );
}

/// Registers client `id` with `scopes` and, when given, the public key in the file `jwk`.
fn add_client(home: &Path, id: &str, jwk: Option<&Path>, scopes: &str) {
    let mut args = vec![
        "api-client",
        "add",
        "--dir",
        home.to_str().unwrap(),
        "--id",
        id,
    ];
    if let Some(jwk) = jwk {
        args.extend(["--public-key", jwk.to_str().unwrap()]);
    }
    args.extend(["--scope", scopes]);
    let added = run(&args);
    assert!(added.status.success(), "{}", stderr(&added));
}

/// SMART Backend Services: a client signs an assertion with its key and trades it for a
/// token at `POST /oauth/token`; a replayed, forged or misdirected assertion is refused. A
/// clinical system acting for a user presents the user's launch token as well, and gets a
/// token for that user and patient; a replayed or forged launch token is refused.
#[test]
fn a_backend_service_gets_a_token_with_a_signed_client_assertion() {
    use caremesh_view::api_access::{AssertionClaims, ClientKey, sign_assertion};
    let dir = tempfile::tempdir().unwrap();
    let home = practice(dir.path());
    let signing = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    let jwk_file = dir.path().join("client.jwk");
    std::fs::write(
        &jwk_file,
        ClientKey::ed25519_jwk(&signing.verifying_key().to_bytes()),
    )
    .unwrap();
    add_client(&home, "backend", Some(&jwk_file), "system/*.rs user/*.rs");
    let node = RunningNode::start(&home);
    let address = node.address.as_str();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let assertion = |key: &ed25519_dalek::SigningKey, aud: &str, jti: &str| {
        sign_assertion(
            key,
            AssertionClaims {
                iss: "backend".into(),
                sub: "backend".into(),
                aud: aud.into(),
                jti: jti.into(),
            },
            now,
            240,
        )
    };
    let token_url = format!("http://{address}/oauth/token");
    let post = |assertion: &str, scope: &str| {
        let form = format!(
            "grant_type=client_credentials&scope={}&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion={assertion}",
            scope
                .replace(' ', "+")
                .replace('/', "%2F")
                .replace('*', "%2A")
        );
        http_request(address, "POST", "/oauth/token", None, Some(&form))
    };

    let good = assertion(&signing, &token_url, "first");
    let answer = post(&good, "system/*.rs openid");
    assert_eq!(answer.status, 200, "{}", answer.body);
    let granted = json_body(&answer);
    assert_eq!(granted["token_type"], "bearer");
    assert_eq!(granted["scope"], "system/*.rs", "openid is not granted");
    assert!(granted["expires_in"].as_i64().unwrap() > 0);
    let token = granted["access_token"].as_str().unwrap();
    let read = fhir_get(address, &format!("/fhir/Patient/{PATIENT}"), Some(token));
    assert_eq!(read.status, 200, "{}", read.body);

    // An ES384 client (P-384), as SMART Backend Services asks servers to accept.
    {
        use caremesh_view::api_access::{Es384, sign_assertion_with};
        use ring::signature::{ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
        let random = ring::rand::SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &random).unwrap();
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, pkcs8.as_ref(), &random)
                .unwrap();
        let point = key.public_key().as_ref();
        let b64 = |bytes: &[u8]| {
            use base64ct::{Base64UrlUnpadded, Encoding};
            Base64UrlUnpadded::encode_string(bytes)
        };
        let es_jwk = dir.path().join("es384.jwk");
        std::fs::write(
            &es_jwk,
            json!({"kty": "EC", "crv": "P-384", "x": b64(&point[1..49]), "y": b64(&point[49..])})
                .to_string(),
        )
        .unwrap();
        add_client(
            &home,
            "backend-es384",
            Some(&es_jwk),
            "system/*.rs user/*.rs",
        );
        let es_assertion = sign_assertion_with(
            Es384,
            &key,
            AssertionClaims {
                iss: "backend-es384".into(),
                sub: "backend-es384".into(),
                aud: token_url.clone(),
                jti: "es384-first".into(),
            },
            now,
            240,
        );
        let answer = post(&es_assertion, "system/*.rs");
        assert_eq!(answer.status, 200, "{}", answer.body);
    }

    let refused = |response: HttpResponse, expect: &str| {
        assert_eq!(response.status, 401, "{}", response.body);
        let body = json_body(&response);
        assert_eq!(body["error"], "invalid_client");
        assert!(
            body["error_description"].as_str().unwrap().contains(expect),
            "{body}"
        );
    };
    refused(post(&good, "system/*.rs"), "used before");
    let stranger = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    refused(
        post(&assertion(&stranger, &token_url, "forged"), "system/*.rs"),
        "does not verify",
    );
    refused(
        post(
            &assertion(&signing, "https://other.example/oauth/token", "elsewhere"),
            "system/*.rs",
        ),
        "not this token endpoint",
    );
    let user_scope = post(&assertion(&signing, &token_url, "user"), "user/*.rs");
    assert_eq!(user_scope.status, 400);
    assert_eq!(json_body(&user_scope)["error"], "invalid_scope");

    // A clinical system acting for a signed-in user presents the user's launch token, as
    // it would launch the page: a token for that user and the patient the launch names.
    let launch_token = |nhs: &str| {
        let url = launch_url(
            &home,
            address,
            &["--user", "C0042", "--name", "Dr Ruth Ellis", "--nhs", nhs],
        );
        url.split_once("token=").unwrap().1.to_string()
    };
    let for_user = |client_assertion: &str, launch: &str| {
        let form = format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={launch}&scope=user%2F%2A.rs&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion={client_assertion}"
        );
        http_request(address, "POST", "/oauth/token", None, Some(&form))
    };
    let launch = launch_token(PATIENT);
    let answer = for_user(&assertion(&signing, &token_url, "as-user"), &launch);
    assert_eq!(answer.status, 200, "{}", answer.body);
    let user_token = json_body(&answer)["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(json_body(&answer)["scope"], "user/*.rs");
    let own = fhir_get(
        address,
        &format!("/fhir/Patient/{PATIENT}"),
        Some(&user_token),
    );
    assert_eq!(own.status, 200, "{}", own.body);
    let other = fhir_get(
        address,
        &format!("/fhir/Patient/{OTHER_PATIENT}"),
        Some(&user_token),
    );
    assert_eq!(other.status, 404, "the launch named one patient");
    // A launch token opens once, here as on the page.
    let replayed = for_user(&assertion(&signing, &token_url, "as-user-again"), &launch);
    assert_eq!(replayed.status, 400, "{}", replayed.body);
    assert_eq!(json_body(&replayed)["error"], "invalid_grant");
    let mut forged = launch_token(PATIENT);
    forged.replace_range(forged.len() - 4.., "AAAA");
    let refused = for_user(&assertion(&signing, &token_url, "forged-launch"), &forged);
    assert_eq!(refused.status, 400, "{}", refused.body);
    let user_rows = audit_rows(&home, &["--user", "C0042"]);
    assert!(
        user_rows
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["action"] == "fhir-read" && r["user_name"] == "Dr Ruth Ellis"),
        "{user_rows:#}"
    );

    // The token's issue is in the audit trail.
    let rows = audit_rows(&home, &["--user", "client:backend"]);
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .any(|r| r["action"] == "api-token"),
        "{rows:#}"
    );
}
