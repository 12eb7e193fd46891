//! The command line and the HTTP view, through the real binary and real sockets.

mod support;

use std::time::Duration;
use support::*;

#[test]
fn every_command_has_help() {
    for command in [
        "init",
        "ingest",
        "run",
        "record",
        "status",
        "verify",
        "generate",
        "demo",
        "consent",
        "trust",
        "sim",
        "audit",
        "launch",
        "api-client",
        "api-token",
    ] {
        let output = run(&[command, "--help"]);
        assert!(output.status.success(), "{command} --help failed");
        assert!(stdout(&output).contains("Usage: caremesh"), "{command}");
    }
}

#[test]
fn init_refuses_to_overwrite_and_rejects_unknown_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("node");
    init_node(&home, "A81001", "Test Practice", "gp");
    let config_before = std::fs::read_to_string(home.join("caremesh.toml")).unwrap();
    let again = run(&[
        "init",
        "--dir",
        home.to_str().unwrap(),
        "--org",
        "RTH",
        "--name",
        "Other",
        "--kind",
        "acute",
        "--unencrypted",
    ]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already holds a caremesh node"),
        "{}",
        stderr(&again)
    );
    assert_eq!(
        std::fs::read_to_string(home.join("caremesh.toml")).unwrap(),
        config_before
    );

    let bad_kind = run(&[
        "init",
        "--dir",
        dir.path().join("x").to_str().unwrap(),
        "--org",
        "RTH",
        "--name",
        "X",
        "--kind",
        "surgery",
    ]);
    assert!(!bad_kind.status.success());
    assert!(
        stderr(&bad_kind).contains("mental-health"),
        "lists the valid kinds"
    );
    let bad_ods = run(&[
        "init",
        "--dir",
        dir.path().join("y").to_str().unwrap(),
        "--org",
        "rth!",
        "--name",
        "X",
        "--kind",
        "acute",
    ]);
    assert!(!bad_ods.status.success());
    assert!(stderr(&bad_ods).contains("ODS code"));
}

#[test]
fn record_explains_invalid_and_unknown_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("node");
    init_node(&home, "A81001", "Test Practice", "gp");
    let invalid = run(&[
        "record",
        "--dir",
        home.to_str().unwrap(),
        "--nhs",
        "9434765910",
        "--user",
        "Integration test",
    ]);
    assert!(!invalid.status.success());
    assert!(
        stderr(&invalid).contains("Modulus 11"),
        "{}",
        stderr(&invalid)
    );
    let unknown = run(&[
        "record",
        "--dir",
        home.to_str().unwrap(),
        "--nhs",
        "9434765919",
        "--user",
        "Integration test",
    ]);
    assert_eq!(unknown.status.code(), Some(3));
    assert!(stderr(&unknown).contains("holds no record"));
}

#[test]
fn generate_is_deterministic_per_seed_and_ingests_cleanly() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let c = tempfile::tempdir().unwrap();
    for (dir, seed) in [(&a, "7"), (&b, "7"), (&c, "8")] {
        let output = run(&[
            "generate",
            "--org",
            "A81001",
            "--patients",
            "25",
            "--seed",
            seed,
            "--out",
            dir.path().to_str().unwrap(),
        ]);
        assert!(output.status.success());
    }
    let read = |dir: &tempfile::TempDir| {
        let mut files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
            .iter()
            .map(|f| std::fs::read(f).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(read(&a), read(&b));
    assert_ne!(read(&a), read(&c));

    let node = tempfile::tempdir().unwrap();
    let home = node.path().join("node");
    init_node(&home, "A81001", "Test Practice", "gp");
    let output = ingest(&home, &["--json", a.path().to_str().unwrap()]);
    assert!(output.status.success(), "{}", stdout(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    // Every section the generator promises is present across 25 patients.
    for section in [
        "demographics",
        "allergies",
        "medications",
        "problems",
        "results",
        "encounters",
        "immunisations",
    ] {
        assert!(
            report["items_by_section"][section].as_u64().unwrap_or(0) > 0,
            "{section} missing"
        );
    }
    let status = status_json(&home);
    assert_eq!(status["stats"]["patients"], 25);
    let verify = run(&["verify", "--dir", home.to_str().unwrap()]);
    assert!(verify.status.success(), "{}", stdout(&verify));
}

#[test]
fn run_serves_the_record_and_ingests_dropped_files() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("node");
    init_node(&home, "A81001", "Banbury Road Surgery", "gp");
    let node = RunningNode::start(&home);

    let (status, body) = http_get(&node.address, "/health");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"status\":\"ok\""));
    let session = clinician_session(&home, &node.address, "9912003888");
    let (status, _) = http_get_as(&node.address, "/api/patients/9912003888", &session);
    assert_eq!(status, 404, "nothing held yet");
    let (status, body) = http_get_as(&node.address, "/api/patients/12345", &session);
    assert_eq!(status, 400);
    assert!(body.contains("not 10 digits"), "{body}");

    // Drop a file the way extract writers should: write a hidden temporary, then rename.
    let fixture = fixtures().join("uk-core");
    for name in [
        "UKCore-Patient-RichardSmith-Example.json",
        "UKCore-AllergyIntolerance-Amoxicillin-Example.json",
    ] {
        let temporary = home.join("drop").join(format!(".{name}.part"));
        std::fs::copy(fixture.join(name), &temporary).unwrap();
        std::fs::rename(&temporary, home.join("drop").join(name)).unwrap();
    }
    let served = wait_for(Duration::from_secs(60), || {
        http_get_as(&node.address, "/api/patients/9912003888", &session)
            .1
            .contains("Amoxicillin")
    });
    assert!(served, "dropped files never reached the view");
    let (status, json) = http_get_as(&node.address, "/api/patients/9912003888", &session);
    assert_eq!(status, 200);
    let record: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(record["sources"][0]["name"], "Banbury Road Surgery");
    let (status, page) = http_get_as(&node.address, "/patients/9912003888", &session);
    assert_eq!(status, 200);
    assert!(
        page.contains("Richard SMITH") && page.contains("991 200 3888"),
        "{page}"
    );
    assert!(page.contains("Banbury Road Surgery"));
    assert!(
        home.join("processed/UKCore-Patient-RichardSmith-Example.json")
            .exists()
    );
    assert!(
        !home
            .join("drop/UKCore-Patient-RichardSmith-Example.json")
            .exists()
    );

    // A broken file dropped in goes to quarantine with a reason, and the node keeps serving.
    std::fs::write(home.join("drop/broken.json"), b"{\"resourceType\": ").unwrap();
    let reason = home.join("quarantine/broken.json.reason.txt");
    assert!(
        wait_for(Duration::from_secs(60), || reason.exists()),
        "broken file not quarantined"
    );
    assert!(
        std::fs::read_to_string(reason)
            .unwrap()
            .contains("not valid JSON")
    );
    assert_eq!(http_get(&node.address, "/health").0, 200);
}

#[test]
fn consent_set_records_choices_and_show_reports_them() {
    let temp = tempfile::tempdir().unwrap();
    let node = temp.path().join("gp");
    init_node(&node, "A81001", "Test Surgery", "gp");
    let nhs = "9990000018";
    let dir = node.to_str().unwrap();
    let show = || stdout(&run(&["consent", "show", "--dir", dir, "--nhs", nhs]));
    assert!(
        show().contains("Share Out on, Share In on, objection none (defaults"),
        "{}",
        show()
    );
    let set = |switches: &[&str]| {
        let mut args = vec!["consent", "set", "--dir", dir, "--nhs", nhs];
        args.extend_from_slice(switches);
        run(&args)
    };
    let recorded = set(&["--share-out", "off", "--objection", "on"]);
    assert!(recorded.status.success(), "{}", stderr(&recorded));
    assert!(
        stdout(&recorded).starts_with("recorded: Share Out off, Share In on, objection recorded")
    );
    assert_eq!(
        show().trim(),
        "A81001 (this organisation): Share Out off, Share In on, objection recorded"
    );
    // The same choice again writes nothing; a bad switch or number is refused with its name.
    assert!(stdout(&set(&["--share-out", "off"])).starts_with("unchanged"));
    let bad = set(&["--share-in", "maybe"]);
    assert!(!bad.status.success() && stderr(&bad).contains("--share-in"));
    let invalid = run(&["consent", "show", "--dir", dir, "--nhs", "9990000019"]);
    assert!(!invalid.status.success() && stderr(&invalid).contains("--nhs"));
}

/// Finding: the chain was unkeyed: deleting every entry, the newest ones, or rewriting
/// entries and recomputing the hashes all verified. A checkpoint the organisation signed (of
/// the count and the head) and kept apart from the entries shows each, naming the gap.
#[test]
fn signed_checkpoints_show_a_trail_cut_short_or_rewritten_with_its_hashes_recomputed() {
    let temp = tempfile::tempdir().unwrap();
    let original = temp.path().join("gp");
    init_node(&original, "A81001", "Test Surgery", "gp");
    for _ in 0..4 {
        record_as_tests(&original, "9912003888", &[]);
    }
    let signed = run(&["audit", "checkpoint", "--dir", original.to_str().unwrap()]);
    assert!(
        stdout(&signed).contains("signed an audit checkpoint: 4 entries"),
        "{}",
        stdout(&signed)
    );
    let verify =
        |home: &std::path::Path| run(&["audit", "verify", "--dir", home.to_str().unwrap()]);
    let intact = verify(&original);
    assert!(intact.status.success(), "{}", stdout(&intact));
    assert!(
        stdout(&intact).contains("matches the newest checkpoint: 4 entries"),
        "{}",
        stdout(&intact)
    );
    let tampered = |name: &str, tamper: &dyn Fn(&rusqlite::Connection)| -> String {
        let copy = temp.path().join(name);
        let status = std::process::Command::new("cp")
            .args(["-a"])
            .arg(&original)
            .arg(&copy)
            .status()
            .unwrap();
        assert!(status.success());
        tamper(&caremesh_storage::page_checksums::open_directly(&copy.join("node.db")).unwrap());
        let output = verify(&copy);
        assert_eq!(output.status.code(), Some(1), "{name}: {}", stdout(&output));
        stdout(&output)
    };
    let emptied = tampered("emptied", &|db| {
        db.execute("DELETE FROM audit_events", []).unwrap();
    });
    assert!(emptied.contains("entries 1 to 4 are missing"), "{emptied}");
    assert!(emptied.contains("held here"), "{emptied}");
    let cut = tampered("cut", &|db| {
        db.execute("DELETE FROM audit_events WHERE seq > 2", [])
            .unwrap();
    });
    assert!(cut.contains("entries 3 to 4 are missing"), "{cut}");
    // Every user renamed and every hash recomputed, as someone covering tracks would.
    let rewritten = tampered("rewritten", &|db| {
        use caremesh_storage::audit::{AuditEvent, event_hash};
        let rows: Vec<(i64, String)> = db
            .prepare("SELECT seq, body FROM audit_events ORDER BY seq")
            .unwrap()
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let mut previous = [0u8; 32];
        for (seq, body) in rows {
            let mut event: AuditEvent = serde_json::from_str(&body).unwrap();
            event.user_name = "Someone Else".into();
            let hash = event_hash(&previous, seq, &event);
            db.execute(
                "UPDATE audit_events SET body = ?1, prev_hash = ?2, hash = ?3 WHERE seq = ?4",
                rusqlite::params![
                    serde_json::to_string(&event).unwrap(),
                    &previous[..],
                    &hash[..],
                    seq
                ],
            )
            .unwrap();
            previous = hash;
        }
    });
    assert!(
        rewritten.contains("entries up to 4 were rewritten"),
        "{rewritten}"
    );
}

#[test]
fn audit_verify_finds_an_edited_entry_in_the_chain() {
    let temp = tempfile::tempdir().unwrap();
    let node = temp.path().join("gp");
    init_node(&node, "A81001", "Test Surgery", "gp");
    {
        let running = RunningNode::start(&node);
        let session = clinician_session(&node, &running.address, "9912003888");
        for reason in [
            "Collapsed in clinic, history needed",
            "Unresponsive, allergies needed",
        ] {
            let form = format!("reason={}", reason.replace(' ', "+"));
            let (status, _) = http_post_form_as(
                &running.address,
                "/patients/9912003888/break-glass",
                &form,
                &session,
            );
            assert_eq!(status, 303);
        }
    }
    let dir = node.to_str().unwrap();
    let intact = run(&["audit", "verify", "--dir", dir]);
    assert!(intact.status.success(), "{}", stdout(&intact));
    assert!(stdout(&intact).contains("intact: 2 entries"));
    caremesh_storage::page_checksums::open_directly(&node.join("node.db"))
        .unwrap()
        .execute(
            "UPDATE audit_events SET body = replace(body, 'Dr Test', 'Dr Other') WHERE seq = 1",
            [],
        )
        .unwrap();
    let broken = run(&["audit", "verify", "--dir", dir]);
    assert_eq!(broken.status.code(), Some(1));
    assert!(
        stdout(&broken).contains("entry 1 was edited"),
        "{}",
        stdout(&broken)
    );
    caremesh_storage::page_checksums::open_directly(&node.join("node.db"))
        .unwrap()
        .execute("DELETE FROM audit_events WHERE seq = 1", [])
        .unwrap();
    let removed = run(&["audit", "verify", "--dir", dir]);
    assert_eq!(removed.status.code(), Some(1));
    assert!(
        stdout(&removed).contains("entry 1 is missing"),
        "{}",
        stdout(&removed)
    );
}

/// Replaces the payload of a signed token with another token's, keeping the signature.
fn with_payload_of(token_url: &str, other_url: &str) -> String {
    let payload = |url: &str| {
        let (_, token) = url.split_once("token=").unwrap();
        token.split('.').nth(1).unwrap().to_string()
    };
    token_url.replace(&payload(token_url), &payload(other_url))
}

#[test]
fn the_view_opens_only_through_a_valid_launch_for_its_patient_and_role() {
    let (temp, home) = banbury_road_surgery();
    let fixture = fixtures().join("uk-core");
    let ingest = run(&[
        "ingest",
        "--dir",
        home.to_str().unwrap(),
        fixture
            .join("UKCore-Patient-RichardSmith-Example.json")
            .to_str()
            .unwrap(),
    ]);
    assert!(ingest.status.success(), "{}", stdout(&ingest));
    let node = RunningNode::start(&home);
    let address = node.address.clone();
    let patient = "9912003888";
    let other_patient = "9434765919";

    // No session: 401, and nothing of the record.
    for path in [
        format!("/patients/{patient}"),
        format!("/api/patients/{patient}"),
        "/".into(),
        "/audit".into(),
        "/metrics".into(),
    ] {
        let (status, body) = http_get(&address, &path);
        assert_eq!(status, 401, "{path}");
        assert!(!body.contains("SMITH"), "{path} leaked the record");
    }

    let clinician = |nhs: &str, extra: &[&str]| {
        let mut args = vec!["--user", "G1234", "--name", "Dr Ada Lovelace", "--nhs", nhs];
        args.extend_from_slice(extra);
        launch_url(&home, &address, &args)
    };
    let url = clinician(patient, &[]);
    let launched = follow_launch(&url);
    assert_eq!(launched.header("location"), Some("/patients/9912003888"));
    let cookie = session_cookie(&launched);
    assert!(
        launched.header("set-cookie").unwrap().contains("HttpOnly"),
        "the session cookie is out of scripts' reach"
    );
    let (status, page) = http_get_as(&address, &format!("/patients/{patient}"), &cookie);
    assert_eq!(status, 200);
    assert!(page.contains("Richard SMITH") && page.contains("Dr Ada Lovelace"));

    // Replayed, forged, expired, for another organisation: 401 with the reason.
    let replayed = follow_launch(&url);
    assert_eq!(replayed.status, 401);
    assert!(replayed.body.contains("used before"), "{}", replayed.body);
    let forged = follow_launch(&with_payload_of(
        &clinician(patient, &[]),
        &clinician(other_patient, &[]),
    ));
    assert_eq!(forged.status, 401);
    assert!(forged.body.contains("does not verify"), "{}", forged.body);
    let issued = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 3_600)
        .to_string();
    let expired = follow_launch(&clinician(patient, &["--issued-at", &issued]));
    assert_eq!(expired.status, 401);
    assert!(expired.body.contains("expired"), "{}", expired.body);
    let elsewhere = temp.path().join("acute");
    init_node(&elsewhere, "RTH", "Oxford University Hospitals", "acute");
    let foreign = follow_launch(&launch_url(
        &elsewhere,
        &address,
        &["--user", "X1", "--name", "Dr Elsewhere", "--nhs", patient],
    ));
    assert_eq!(
        foreign.status, 401,
        "another organisation's key opens nothing"
    );

    // A token opens only its own patient, and each role only its routes.
    let (status, body) = http_get_as(&address, &format!("/patients/{other_patient}"), &cookie);
    assert_eq!(status, 403);
    assert!(body.contains("different patient"), "{body}");
    let (status, _) = http_get_as(&address, &format!("/patients?nhs={other_patient}"), &cookie);
    assert_eq!(status, 403);
    assert_eq!(http_get_as(&address, "/audit", &cookie).0, 403);
    assert_eq!(http_get_as(&address, "/metrics", &cookie).0, 403);
    let auditor = role_session(&home, &address, "auditor");
    assert_eq!(
        http_get_as(&address, &format!("/patients/{patient}"), &auditor).0,
        403
    );
    let admin = role_session(&home, &address, "admin");
    assert_eq!(http_get_as(&address, "/metrics", &admin).0, 200);
    assert_eq!(http_get_as(&address, "/status", &admin).0, 200);
    assert_eq!(http_get_as(&address, "/audit", &admin).0, 403);

    // The auditor's report over HTTP lists the view and the refusals about the patient.
    let (status, json) = http_get_as(
        &address,
        &format!("/api/audit?patient={patient}&format=json"),
        &auditor,
    );
    assert_eq!(status, 200, "{json}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let view = rows
        .iter()
        .find(|r| r["action"] == "view" && r["outcome"] == "allowed")
        .expect("the view is recorded");
    assert_eq!(view["user_id"], "G1234");
    assert_eq!(view["user_name"], "Dr Ada Lovelace");
    assert_eq!(view["role"], "clinician");
    assert_eq!(view["organisation"], "A81001");
    assert_eq!(view["recorded_by"], "A81001");
    assert_eq!(view["nhs"], patient);
    assert_eq!(view["purpose"], "direct care");
    assert_eq!(view["sources"], serde_json::json!(["A81001"]));
    assert_eq!(view["sections"], serde_json::json!(["demographics"]));
    let refusals: Vec<&str> = rows
        .iter()
        .filter(|r| r["outcome"] == "refused")
        .map(|r| r["detail"].as_str().unwrap())
        .collect();
    assert!(
        refusals.iter().any(|d| d.contains("used before")),
        "{refusals:?}"
    );
    // Requests without a session are counted into a summary, never listed in a patient's
    // report: nobody signed in made them.
    assert!(
        !refusals
            .iter()
            .any(|d| d.contains("Open the shared care record")),
        "the requests without a session: {refusals:?}"
    );
    drop(node);

    // The same over the CLI, per user, and as FHIR.
    let dir = home.to_str().unwrap();
    let by_user = run(&[
        "audit", "report", "--dir", dir, "--user", "G1234", "--format", "csv",
    ]);
    assert!(by_user.status.success(), "{}", stderr(&by_user));
    let csv = stdout(&by_user);
    assert!(csv.starts_with("time,recorded_by,entry,organisation,user_id"));
    assert!(
        csv.lines()
            .any(|l| l.contains("\"view\"") && l.contains("\"9912003888\"")),
        "{csv}"
    );
    assert!(
        csv.lines()
            .any(|l| l.contains("\"refused\"") && l.contains("different patient")),
        "{csv}"
    );
    let fhir = run(&[
        "audit",
        "report",
        "--dir",
        dir,
        "--patient",
        patient,
        "--format",
        "fhir",
    ]);
    let bundle: serde_json::Value = serde_json::from_slice(&fhir.stdout).unwrap();
    assert_eq!(bundle["resourceType"], "Bundle");
    let events = bundle["entry"].as_array().unwrap();
    assert!(!events.is_empty());
    assert!(
        events
            .iter()
            .all(|e| e["resource"]["resourceType"] == "AuditEvent")
    );
    let future = run(&[
        "audit",
        "report",
        "--dir",
        dir,
        "--patient",
        patient,
        "--from",
        "2999-01-01",
    ]);
    assert!(
        stdout(&future).contains("0 access(es)"),
        "{}",
        stdout(&future)
    );
    let bad_date = run(&[
        "audit",
        "report",
        "--dir",
        dir,
        "--patient",
        patient,
        "--from",
        "yesterday",
    ]);
    assert!(!bad_date.status.success());
    assert!(
        stderr(&bad_date).contains("YYYY-MM-DD"),
        "{}",
        stderr(&bad_date)
    );
    let verify = run(&["audit", "verify", "--dir", dir]);
    assert!(verify.status.success(), "{}", stdout(&verify));
}

#[test]
fn logs_at_info_carry_no_nhs_numbers_names_or_clinical_content() {
    let (temp, home) = banbury_road_surgery();
    let log_path = temp.path().join("node.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let node = RunningNode::start_logging(&home, "info", log.into());
    let address = node.address.clone();
    // Ingest through the drop folder, including a file that names an unknown patient.
    let fixture = fixtures().join("uk-core");
    for name in [
        "UKCore-Patient-RichardSmith-Example.json",
        "UKCore-AllergyIntolerance-Amoxicillin-Example.json",
    ] {
        let temporary = home.join("drop").join(format!(".{name}.part"));
        std::fs::copy(fixture.join(name), &temporary).unwrap();
        std::fs::rename(&temporary, home.join("drop").join(name)).unwrap();
    }
    let session = clinician_session(&home, &address, "9912003888");
    let shown = wait_for(Duration::from_secs(60), || {
        http_get_as(&address, "/api/patients/9912003888", &session)
            .1
            .contains("Amoxicillin")
    });
    assert!(
        shown,
        "the allergy never showed; quarantine: {:?}; drop: {:?}; log:\n{}",
        std::fs::read_dir(home.join("quarantine"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
            .unwrap_or_default(),
        std::fs::read_dir(home.join("drop"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
            .unwrap_or_default(),
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    // Views, a refusal, a break-glass, a forged token naming an invalid number.
    http_get_as(&address, "/patients/9912003888", &session);
    http_get_as(&address, "/patients/9434765919", &session);
    http_post_form_as(
        &address,
        "/patients/9912003888/break-glass",
        "reason=Collapsed+in+clinic%2C+history+needed",
        &session,
    );
    let refused = follow_launch(&launch_url(
        &home,
        &address,
        &[
            "--user",
            "G9",
            "--name",
            "Dr Ada Lovelace",
            "--nhs",
            "9912003880",
        ],
    ));
    assert_eq!(refused.status, 401);
    drop(node);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("INFO"), "the test must see info lines: {log}");
    for secret in [
        "9912003888",
        "991 200 3888",
        "9434765919",
        "9912003880",
        "Richard",
        "SMITH",
        "Amoxicillin",
        "Ada Lovelace",
        "Dr Test Clinician",
        "Collapsed",
    ] {
        assert!(!log.contains(secret), "the log carries {secret:?}:\n{log}");
    }
}

/// The hazard log's controls are tests: every hazard names at least one, and each named
/// test exists (a Rust `fn`, or a browser test's title), so that a control cannot be
/// claimed for a test that was renamed or removed.
#[test]
fn every_hazard_in_the_log_names_tests_that_exist() {
    let log = std::fs::read_to_string(repo_root().join("docs/clinical-safety/hazard-log.md"))
        .expect("docs/clinical-safety/hazard-log.md");
    let hazards: Vec<&str> = log.split("\n## ").skip(1).collect();
    assert!(
        hazards.len() >= 14,
        "the log lists {} hazards",
        hazards.len()
    );
    for hazard in hazards {
        let title = hazard.lines().next().unwrap();
        let tests_row = hazard
            .lines()
            .find(|l| l.starts_with("| Tests |"))
            .unwrap_or_else(|| panic!("hazard {title:?} has no Tests row"));
        let named: Vec<&str> = tests_row.split('`').skip(1).step_by(2).collect();
        assert!(!named.is_empty(), "hazard {title:?} names no test");
        for test in named {
            let (file, name) = test
                .split_once("::")
                .unwrap_or_else(|| panic!("{test:?} in {title:?} is not file::test"));
            let source = std::fs::read_to_string(repo_root().join(file))
                .unwrap_or_else(|e| panic!("{file} named by {title:?}: {e}"));
            let found = if file.ends_with(".mjs") {
                source.contains(&format!("test(\"{name}\""))
            } else {
                source.contains(&format!("fn {name}("))
            };
            assert!(found, "hazard {title:?} names {test}, which does not exist");
        }
    }
}

/// A misspelt setting is refused before the node does anything, naming the key, its line
/// and the key meant; a value out of range says what is accepted.
#[test]
fn a_node_with_a_misspelt_or_out_of_range_setting_refuses_to_start() {
    let (_temp, home) = banbury_road_surgery();
    let config = home.join("caremesh.toml");
    let original = std::fs::read_to_string(&config).unwrap();
    let refused = |text: String| {
        std::fs::write(&config, text).unwrap();
        let output = run(&["status", "--dir", home.to_str().unwrap()]);
        assert!(!output.status.success());
        stderr(&output)
    };
    let error = refused(original.replace("share_out = true", "shareout = false"));
    assert!(
        error.contains("unknown field `shareout`") && error.contains("did you mean `share_out`?"),
        "{error}"
    );
    let error = refused(original.replace("feed = \"batch\"", "feed = \"streaming\""));
    assert!(error.contains("give \"live\" or \"batch\""), "{error}");
    std::fs::write(&config, original).unwrap();
    assert!(
        run(&["status", "--dir", home.to_str().unwrap()])
            .status
            .success()
    );
}

/// Patient data is readable by the node's own account only: the home and its folders 0700,
/// the database, its WAL and every file ingest keeps 0600; a node whose home others can
/// read refuses to start, saying the chmod to run.
#[test]
fn patient_data_is_private_to_the_node_and_a_node_open_to_others_refuses_to_start() {
    use std::os::unix::fs::PermissionsExt;
    let (temp, home) = banbury_road_surgery();
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    // A rejected file from a writer that left it readable by all.
    let bad = temp.path().join("bad.json");
    std::fs::write(&bad, "{ not json").unwrap();
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o644)).unwrap();
    let output = run(&[
        "ingest",
        "--dir",
        home.to_str().unwrap(),
        bad.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    for dir in ["", "keys", "drop", "processed", "quarantine"] {
        assert_eq!(mode(&home.join(dir)), 0o700, "{dir}/");
    }
    for file in [
        "node.db",
        "caremesh.toml",
        "quarantine/bad.json",
        "quarantine/bad.json.reason.txt",
    ] {
        assert_eq!(mode(&home.join(file)), 0o600, "{file}");
    }
    if home.join("node.db-wal").exists() {
        assert_eq!(mode(&home.join("node.db-wal")), 0o600);
    }
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
    let output = run_node_once(&home);
    assert!(!output.status.success());
    let error = stderr(&output);
    assert!(
        error.contains(&format!("chmod 700 {}", home.display())),
        "{error}"
    );
}

/// Operating details an operator meets: a printing command whose reader closes the pipe
/// ends quietly; a missing signing key says what it is and what to do, once; `launch`
/// makes tokens valid for the node's own limit (10 minutes), as the README says.
#[test]
fn printing_into_a_closed_pipe_a_missing_key_and_the_launch_default_behave() {
    use base64ct::{Base64UrlUnpadded, Encoding};
    let (_temp, home) = banbury_road_surgery();
    let binary = env!("CARGO_BIN_EXE_caremesh");
    let piped = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{binary}' status --dir '{}' | head -1",
            home.display()
        ))
        .output()
        .unwrap();
    let error = String::from_utf8_lossy(&piped.stderr);
    assert!(
        !error.contains("panicked") && !error.contains("Broken pipe"),
        "{error}"
    );
    assert_eq!(String::from_utf8_lossy(&piped.stdout).lines().count(), 1);

    let url = launch_url(
        &home,
        "127.0.0.1:7800",
        &["--user", "G1", "--name", "Dr A", "--nhs", "9912003888"],
    );
    let token = url.split("token=").nth(1).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &Base64UrlUnpadded::decode_vec(token.split('.').nth(1).unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        600
    );

    std::fs::remove_file(home.join("keys/signing.key")).unwrap();
    let output = run(&[
        "consent",
        "set",
        "--dir",
        home.to_str().unwrap(),
        "--nhs",
        "9912003888",
        "--share-out",
        "off",
    ]);
    assert!(!output.status.success());
    let error = stderr(&output);
    assert!(
        error.contains("is missing: this node has no signing key"),
        "{error}"
    );
    assert!(error.matches("No such file").count() <= 1, "{error}");
}

/// One home is one node: a second `caremesh run` on a home already running is refused
/// before it watches the drop folder or listens, naming the process that holds it.
#[test]
fn a_second_node_on_the_same_home_is_refused_naming_the_first() {
    let (_temp, home) = banbury_road_surgery();
    let first = RunningNode::start(&home);
    let second = run_node_once(&home);
    assert!(!second.status.success());
    let error = stderr(&second);
    assert!(
        error.contains(&format!("process {}", first.child.id())),
        "{error}"
    );
    drop(first);
    // Once the first has stopped, the home is free again.
    let again = RunningNode::start(&home);
    drop(again);
}

/// Requests from outside without a session are refused without a row each: at most one
/// summary a minute, and none in the named patient's access report.
#[test]
fn anonymous_refusals_are_counted_into_a_summary_not_a_row_each() {
    let (_temp, home) = banbury_road_surgery();
    let node = RunningNode::start(&home);
    for _ in 0..40 {
        assert_eq!(http_get(&node.address, "/patients/9912003888").0, 401);
        assert_eq!(http_get(&node.address, "/api/patients/9912003888").0, 401);
    }
    assert_eq!(http_get(&node.address, "/launch?token=not.a.token").0, 401);
    // A graceful stop writes what was counted.
    let pid = node.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut node = node;
    let _ = node.child.wait();
    let trail = caremesh_storage::Store::open_read_only(&home.join("node.db"))
        .unwrap()
        .audit_events()
        .unwrap();
    assert_eq!(trail.len(), 1, "one summary, not a row each: {trail:?}");
    let summary = &trail[0].event;
    assert_eq!(summary.nhs, None);
    assert!(
        summary
            .detail
            .contains("81 request(s) without a valid session refused"),
        "{summary:?}"
    );
    let report = run(&[
        "audit",
        "report",
        "--dir",
        home.to_str().unwrap(),
        "--patient",
        "9912003888",
        "--format",
        "csv",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&report.stdout).lines().count(),
        1,
        "header only"
    );
    assert!(
        run(&["audit", "verify", "--dir", home.to_str().unwrap()])
            .status
            .success()
    );
}

/// Text from other systems and users (a patient's name, a break-glass reason) reaches a
/// terminal shown, never obeyed: escape sequences and newlines print as `\u{1b}`, `\u{a}`.
#[test]
fn control_characters_from_outside_are_shown_not_obeyed_in_text_output() {
    let (temp, home) = banbury_road_surgery();
    let patient = temp.path().join("patient.json");
    write_json(
        &patient,
        &serde_json::json!({
            "resourceType": "Patient", "id": "p1",
            "identifier": [{ "system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9912003888" }],
            "name": [{ "family": "SMITH\u{1b}[2J\u{1b}[31m", "given": ["Richard"] }]
        }),
    );
    assert!(ingest(&home, &[patient.to_str().unwrap()]).status.success());
    // What a terminal shows of a command's output: no escape byte, the escape written out.
    let shown = |args: &[&str], expected: &str| {
        let output = run(args);
        assert!(output.status.success(), "{}", stderr(&output));
        assert!(
            !output.stdout.contains(&0x1b),
            "an escape reached the terminal"
        );
        assert!(stdout(&output).contains(expected), "{}", stdout(&output));
    };
    let dir = home.to_str().unwrap();
    shown(
        &[
            "record",
            "--dir",
            dir,
            "--nhs",
            "9912003888",
            "--user",
            "Integration test",
        ],
        "SMITH\\u{1b}[2J",
    );

    let node = RunningNode::start(&home);
    let session = clinician_session(&home, &node.address, "9434765919");
    http_post_form_as(
        &node.address,
        "/patients/9434765919/break-glass",
        "reason=Collapsed%1B%5B2J%0Aforged+line",
        &session,
    );
    drop(node);
    shown(
        &["audit", "report", "--dir", dir, "--patient", "9434765919"],
        "Collapsed\\u{1b}[2J\\u{a}forged line",
    );
    // "Where" names the organisation, not only its code.
    shown(
        &["audit", "report", "--dir", dir, "--patient", "9434765919"],
        "Banbury Road Surgery (A81001) #",
    );
}

/// Setting and reading a patient's sharing choices at the command line are audited, and
/// the operator is the account the process runs as, whatever `$USER` says.
#[test]
fn consent_at_the_command_line_is_audited_under_the_real_account() {
    let (_temp, home) = banbury_road_surgery();
    let dir = home.to_str().unwrap();
    let spoofed = |args: &[&str]| {
        let output = caremesh()
            .env("USER", "dr.innocent")
            .env("LOGNAME", "dr.innocent")
            .args(args)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", stderr(&output));
    };
    spoofed(&[
        "consent",
        "set",
        "--dir",
        dir,
        "--nhs",
        "9912003888",
        "--share-out",
        "off",
    ]);
    spoofed(&["consent", "show", "--dir", dir, "--nhs", "9912003888"]);
    // Reading a record at the command line names the reader, beside the account.
    assert!(
        !run(&["record", "--dir", dir, "--nhs", "9912003888"])
            .status
            .success()
    );
    let read = caremesh()
        .env("USER", "dr.innocent")
        .args([
            "record",
            "--dir",
            dir,
            "--nhs",
            "9912003888",
            "--user",
            "Dr Reader",
        ])
        .output()
        .unwrap();
    assert_eq!(read.status.code(), Some(3), "{}", stderr(&read));
    let account = String::from_utf8(
        std::process::Command::new("id")
            .arg("-un")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let report = run(&[
        "audit",
        "report",
        "--dir",
        dir,
        "--patient",
        "9912003888",
        "--format",
        "json",
    ]);
    let rows: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    let reader = rows.iter().find(|r| r["action"] == "cli-record").unwrap();
    assert_eq!(reader["user_name"], "Dr Reader");
    for action in ["consent-set", "consent-show", "cli-record"] {
        let row = rows
            .iter()
            .find(|r| r["action"] == action)
            .unwrap_or_else(|| panic!("no {action} entry: {rows:?}"));
        assert!(
            row["user_id"]
                .as_str()
                .unwrap()
                .starts_with(&format!("os:{} (uid ", account.trim())),
            "{row}"
        );
    }
    assert!(!report.stdout.windows(11).any(|w| w == b"dr.innocent"));
}

/// Break-glass is started only from the node's own page: a form from another site (an
/// `Origin` naming it), or one without the session's form token, is refused and grants
/// nothing, though the browser sent the session cookie.
#[test]
fn break_glass_from_another_site_or_without_the_form_token_is_refused() {
    let (_temp, home) = banbury_road_surgery();
    let node = RunningNode::start(&home);
    let session = clinician_session(&home, &node.address, "9434765919");
    let path = "/patients/9434765919/break-glass";
    let reason = "reason=Collapsed+in+clinic%2C+history+needed";
    let secret = session.split_once('=').unwrap().1;
    let with_token = format!(
        "{reason}&form_token={}",
        caremesh_view::web::form_token(secret)
    );
    let forged = http_request_with(
        &node.address,
        "POST",
        path,
        Some(&session),
        Some(&with_token),
        &[("Origin", "http://evil.example")],
    );
    assert_eq!(forged.status, 403, "{}", forged.body);
    let cross_site = http_request_with(
        &node.address,
        "POST",
        path,
        Some(&session),
        Some(&with_token),
        &[("Sec-Fetch-Site", "cross-site"), ("Origin", "null")],
    );
    assert_eq!(cross_site.status, 403, "{}", cross_site.body);
    let (status, body) = http_post_form_without_token(&node.address, path, reason, &session);
    assert_eq!(status, 403, "{body}");
    let granted = |home: &std::path::Path| {
        let store = caremesh_storage::Store::open_read_only(&home.join("node.db")).unwrap();
        store
            .break_glass_history(&caremesh_sync::NhsNumber::parse("9434765919").unwrap())
            .unwrap()
            .len()
    };
    assert_eq!(
        granted(&home),
        0,
        "a forged request granted emergency access"
    );
    let own_page = http_request_with(
        &node.address,
        "POST",
        path,
        Some(&session),
        Some(&with_token),
        // What a browser sends from our page, which sends no referrer.
        &[("Sec-Fetch-Site", "same-origin"), ("Origin", "null")],
    );
    assert_eq!(own_page.status, 303, "{}", own_page.body);
    assert_eq!(granted(&home), 1);
    drop(node);
    // All break-glass in a range of days, with no patient or user named (yesterday too, in
    // case the day turned over since).
    let day = |when: &str| {
        let out = std::process::Command::new("date")
            .args(["-u", "-d", when, "+%Y-%m-%d"])
            .output()
            .unwrap()
            .stdout;
        String::from_utf8(out).unwrap().trim().to_string()
    };
    let (from, to) = (day("yesterday"), day("now"));
    let report = run(&[
        "audit",
        "report",
        "--dir",
        home.to_str().unwrap(),
        "--from",
        &from,
        "--to",
        &to,
        "--action",
        "break-glass",
        "--format",
        "json",
    ]);
    assert!(report.status.success(), "{}", stderr(&report));
    let rows: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert!(
        !rows.is_empty() && rows.iter().all(|r| r["action"] == "break-glass"),
        "{rows:?}"
    );
    assert!(rows.iter().any(|r| r["outcome"] == "allowed"), "{rows:?}");
}

/// Prometheus scrapes `/metrics` with the bearer token `init` wrote (mode 0600); a wrong or
/// missing token is refused like any request without a session.
#[test]
fn metrics_are_scraped_with_the_bearer_token_from_the_home() {
    use std::os::unix::fs::PermissionsExt;
    let (_temp, home) = banbury_road_surgery();
    let token_file = home.join("keys/metrics.token");
    assert_eq!(
        std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let token = std::fs::read_to_string(&token_file).unwrap();
    let node = RunningNode::start(&home);
    let scrape = |authorization: Option<String>| {
        let headers: Vec<(&str, &str)> = authorization
            .as_deref()
            .map(|value| vec![("Authorization", value)])
            .unwrap_or_default();
        http_request_with(&node.address, "GET", "/metrics", None, None, &headers)
    };
    let scraped = scrape(Some(format!("Bearer {}", token.trim())));
    assert_eq!(scraped.status, 200, "{}", scraped.body);
    assert!(scraped.body.contains("# EOF"), "{}", scraped.body);
    assert_eq!(
        scrape(Some(format!("Bearer {}", "0".repeat(64)))).status,
        401
    );
    assert_eq!(scrape(None).status, 401);
}

/// Finding: /metrics had no figures for ingest, quarantine, stale sources, disk space or the
/// version. Each is read here from a node that ingested, quarantined and was left a file.
#[test]
fn metrics_cover_ingest_quarantine_the_drop_folder_sources_disk_and_version() {
    let (_temp, home) = banbury_road_surgery();
    let fixture = fixtures().join("uk-core/UKCore-Patient-RichardSmith-Example.json");
    let output = ingest(&home, &[fixture.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let node = RunningNode::start(&home);
    std::fs::write(home.join("drop/broken.json"), b"{\"resourceType\": ").unwrap();
    // Never taken: a directory is not an extract, whatever its name.
    std::fs::create_dir(home.join("drop/folder.json")).unwrap();
    let reason = home.join("quarantine/broken.json.reason.txt");
    assert!(wait_for(Duration::from_secs(60), || reason.exists()));
    let admin = role_session(&home, &node.address, "admin");
    let value = |name: &str| -> f64 {
        let (status, body) = http_get_as(&node.address, "/metrics", &admin);
        assert_eq!(status, 200);
        body.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name} in:\n{body}"))
            .parse()
            .unwrap()
    };
    let version = format!(
        "caremesh_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(value(&version), 1.0);
    assert_eq!(
        value("caremesh_ingested_files_total{outcome=\"accepted\"}"),
        1.0
    );
    assert_eq!(
        value("caremesh_ingested_files_total{outcome=\"rejected\"}"),
        1.0
    );
    assert_eq!(value("caremesh_quarantined_files"), 1.0);
    assert_eq!(value("caremesh_drop_folder_left_in_place"), 1.0);
    assert_eq!(value("caremesh_drop_folder_paused"), 0.0);
    assert_eq!(value("caremesh_source_stale{source=\"A81001\"}"), 0.0);
    assert!(value("caremesh_last_ingest_timestamp_seconds") > 1.7e9);
    assert!(value("caremesh_disk_free_bytes") > 16.0 * 1024.0 * 1024.0);
    assert_eq!(value("caremesh_disk_reserve_held"), 1.0);
    assert_eq!(value("caremesh_documents_unsendable"), 0.0);
}

/// Idle connections cannot exhaust the node: one address holds at most 64 at once (more
/// are closed at once), a connection that sends nothing for 30 seconds is closed, and so is
/// one that takes over 20 seconds to send one request; after that `/health` answers again.
#[test]
fn idle_connections_are_bounded_per_address_and_closed_after_a_silence() {
    use std::io::Read as _;
    let (_temp, home) = banbury_road_surgery();
    let node = RunningNode::start(&home);
    // Closed by the node: a read ends (0 bytes, or reset) instead of waiting.
    let closed = |stream: &std::net::TcpStream, wait: Duration| {
        stream.set_read_timeout(Some(wait)).unwrap();
        let mut reader = stream;
        let mut byte = [0u8; 1];
        match reader.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(error) => !matches!(
                error.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    };
    // A client trickling its request a byte every two seconds is never silent, but it is
    // closed once it has taken 20 seconds over one request.
    let trickling = std::net::TcpStream::connect(&node.address).unwrap();
    let trickler = {
        let mut stream = trickling.try_clone().unwrap();
        std::thread::spawn(move || {
            use std::io::Write as _;
            let started = std::time::Instant::now();
            stream
                .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            while started.elapsed() < Duration::from_secs(60) {
                std::thread::sleep(Duration::from_secs(2));
                if stream.write_all(b"X").is_err() {
                    break;
                }
            }
        })
    };
    let idle: Vec<std::net::TcpStream> = (0..100)
        .map(|_| std::net::TcpStream::connect(&node.address).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let refused = idle
        .iter()
        .filter(|stream| closed(stream, Duration::from_millis(200)))
        .count();
    assert!(
        refused >= 36,
        "only {refused} of 100 idle connections from one address were closed"
    );
    // After the silence limit every idle connection is gone, and the node answers.
    std::thread::sleep(Duration::from_secs(32));
    let still_open = idle
        .iter()
        .filter(|stream| !closed(stream, Duration::from_millis(200)))
        .count();
    assert_eq!(still_open, 0, "idle connections outlived the silence limit");
    assert!(
        closed(&trickling, Duration::from_millis(200)),
        "a request trickled in for 32 seconds and was still being read"
    );
    trickler.join().unwrap();
    assert_eq!(http_get(&node.address, "/health").0, 200);
}

/// A fresh node home for the Banbury Road Surgery (A81001), in a folder of its own.
fn banbury_road_surgery() -> (tempfile::TempDir, std::path::PathBuf) {
    let temp = tempfile::tempdir().unwrap();
    let home = temp.path().join("gp");
    init_node(&home, "A81001", "Banbury Road Surgery", "gp");
    (temp, home)
}

/// `caremesh run` on `home`, for a start that must be refused: its output once it ends.
fn run_node_once(home: &std::path::Path) -> std::process::Output {
    run(&[
        "run",
        "--dir",
        home.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ])
}

/// While `caremesh run` runs it alone writes its store: the CLI's ingest, record and consent
/// commands are handed to it over its control socket, relative paths resolved by the CLI,
/// with the output and exit codes the CLI gives when it runs them itself. A node killed
/// outright leaves its socket behind; the CLI then writes for itself again.
#[test]
fn while_the_node_runs_cli_writes_are_made_by_the_node_and_after_it_is_killed_by_the_cli() {
    let (temp, home) = banbury_road_surgery();
    let log_path = temp.path().join("node.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut node = RunningNode::start_logging(&home, "info", log.into());
    let holder = std::fs::read_to_string(home.join("write.lock")).unwrap();
    assert_eq!(holder.trim(), format!("{} node", node.child.id()));

    let ingested = caremesh()
        .current_dir(fixtures().join("uk-core"))
        .args([
            "ingest",
            "--dir",
            home.to_str().unwrap(),
            "--json",
            "UKCore-Patient-RichardSmith-Example.json",
            "UKCore-AllergyIntolerance-Amoxicillin-Example.json",
        ])
        .output()
        .unwrap();
    assert!(ingested.status.success(), "{}", stderr(&ingested));
    let report: serde_json::Value = serde_json::from_slice(&ingested.stdout).unwrap();
    assert_eq!(report["files_accepted"], 2, "{report}");

    let record = record_json(&home, "9912003888").expect("the node holds the record");
    assert!(record.to_string().contains("Amoxicillin"));
    let unknown = record_as_tests(&home, "9434765919", &[]);
    assert_eq!(unknown.status.code(), Some(3), "{}", stderr(&unknown));
    assert!(
        stderr(&unknown).contains("holds no record"),
        "{}",
        stderr(&unknown)
    );
    let consent = set_share_in(&home, "9912003888", "off");
    assert!(consent.status.success(), "{}", stderr(&consent));
    assert!(stdout(&consent).contains("recorded: Share Out on, Share In off"));
    let missing = ingest(&home, &["/no/such/extract.json"]);
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("/no/such/extract.json"),
        "the node's error comes back as the CLI's: {}",
        stderr(&missing)
    );
    let log = std::fs::read_to_string(&log_path).unwrap();
    let handed = log
        .matches("running a command the CLI handed to this node")
        .count();
    assert_eq!(handed, 5, "five commands went to the node:\n{log}");

    node.kill_hard();
    assert!(
        home.join("node.sock").exists(),
        "a killed node leaves its socket"
    );
    let consent = set_share_in(&home, "9912003888", "on");
    assert!(consent.status.success(), "{}", stderr(&consent));
    assert!(stdout(&consent).contains("recorded: Share Out on, Share In on"));
    let shown = run(&[
        "consent",
        "show",
        "--dir",
        home.to_str().unwrap(),
        "--nhs",
        "9912003888",
    ]);
    assert!(stdout(&shown).contains("Share In on"), "{}", stdout(&shown));
}

fn set_share_in(home: &std::path::Path, nhs: &str, value: &str) -> std::process::Output {
    let home = home.to_str().unwrap();
    run(&[
        "consent",
        "set",
        "--dir",
        home,
        "--nhs",
        nhs,
        "--share-in",
        value,
    ])
}

/// A clinician's view is not held up by a long ingest: the node makes the view's access
/// record between the ingest's commits. A 40,000-line extract goes in as twenty commits;
/// the record opens (and its view is audited) while the file is still being ingested, so
/// still in the drop folder.
#[test]
fn a_view_during_a_long_ingest_is_answered_between_its_commits() {
    use std::io::Write;
    let (temp, home) = banbury_road_surgery();
    let node = RunningNode::start(&home);
    let nhs = "9912003888";
    let session = clinician_session(&home, &node.address, nhs);
    let extract = temp.path().join("Observations.ndjson");
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&extract).unwrap());
        let patient = serde_json::json!({ "resourceType": "Patient", "id": "p1",
            "identifier": [{ "system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs }] });
        writeln!(out, "{patient}").unwrap();
        for k in 0..40_000 {
            let observation = serde_json::json!({ "resourceType": "Observation",
                "id": format!("o{k}"), "status": "final",
                "subject": { "reference": "Patient/p1" }, "code": { "text": "Heart rate" },
                "valueQuantity": { "value": 60 + k % 40, "unit": "bpm" },
                "effectiveDateTime": "2024-01-01" });
            writeln!(out, "{observation}").unwrap();
        }
    }
    let dropped = home.join("drop").join("Observations.ndjson");
    std::fs::rename(&extract, &dropped).unwrap();
    let shown = wait_for(Duration::from_secs(120), || {
        let (status, body) = http_get_as(&node.address, &format!("/api/patients/{nhs}"), &session);
        status == 200 && body.contains("Heart rate")
    });
    assert!(shown, "the record never showed the first commits");
    assert!(
        dropped.exists(),
        "the view was answered only after the whole ingest: it should come between commits"
    );
    // The ingest then finishes, whole.
    assert!(wait_for(Duration::from_secs(300), || !dropped.exists()));
    let processed: Vec<_> = std::fs::read_dir(home.join("processed"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(processed.len(), 1);
}

/// Damage at rest: a bit flips in each page holding the record's items while the node is
/// down. Every page carries a checksum, so the node does not show the damaged record as if
/// it were sound: the read is refused, the node stops on its own within seconds (nothing
/// more is served or sent from the database), and it says why and what to do.
#[test]
fn a_page_damaged_at_rest_stops_the_node_with_the_reason_instead_of_being_shown() {
    let (temp, home) = banbury_road_surgery();
    let fixture = fixtures().join("uk-core");
    let files: Vec<String> = [
        "UKCore-Patient-RichardSmith-Example.json",
        "UKCore-AllergyIntolerance-Amoxicillin-Example.json",
    ]
    .iter()
    .map(|name| fixture.join(name).to_str().unwrap().to_string())
    .collect();
    let files: Vec<&str> = files.iter().map(String::as_str).collect();
    let output = ingest(&home, &files);
    assert!(output.status.success(), "{}", stderr(&output));
    let db = home.join("node.db");
    let pages: Vec<(i64, i64)> = {
        let conn = caremesh_storage::page_checksums::open_directly(&db).unwrap();
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        let mut statement = conn
            .prepare(
                "SELECT pageno, (SELECT page_size FROM pragma_page_size()) FROM dbstat \
                 WHERE name = 'items' AND pagetype = 'leaf'",
            )
            .unwrap();
        statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    assert!(!pages.is_empty());
    let mut bytes = std::fs::read(&db).unwrap();
    for (page, size) in &pages {
        // Inside the cell content at the page's end, before the checksum.
        let at = (page * size - 200) as usize;
        bytes[at] ^= 0x01;
    }
    std::fs::write(&db, bytes).unwrap();

    let log = temp.path().join("node.log");
    let mut node =
        RunningNode::start_logging(&home, "warn", std::fs::File::create(&log).unwrap().into());
    let session = clinician_session(&home, &node.address, "9912003888");
    let (status, page) = http_get_as(&node.address, "/patients/9912003888", &session);
    assert_ne!(
        status, 200,
        "a damaged record is not shown as sound: {page}"
    );
    let stopped = wait_for(Duration::from_secs(30), || {
        node.child.try_wait().unwrap().is_some()
    });
    assert!(stopped, "the node stops on its own");
    let status = node.child.wait().unwrap();
    assert!(!status.success());
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("stopped:") && log.contains("failed its checksum"),
        "{log}"
    );
    assert!(log.contains("rebuild the node from its peers"), "{log}");
    // `caremesh verify` names it too.
    let verify = run(&["verify", "--dir", home.to_str().unwrap()]);
    let said = format!("{}{}", stdout(&verify), stderr(&verify));
    assert!(!verify.status.success(), "{said}");
    assert!(said.contains("failed its checksum"), "{said}");
}

/// `caremesh record --fhir` over the UK Core examples: what goes in at ingest comes out as
/// FHIR with the same clinical content, each resource with its publisher, every reference
/// resolving inside the Bundle, and a Provenance naming the organisation.
#[test]
fn record_as_fhir_serves_the_publishers_resources_with_provenance_and_resolving_references() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("node");
    init_node(&home, "A81001", "Banbury Road Surgery", "gp");
    let uk_core = real_data("uk-core");
    let ingested = ingest(&home, &[uk_core.to_str().unwrap()]);
    assert!(ingested.status.code().is_some(), "{}", stderr(&ingested));
    // A fact with a note: the note travels as a free-text item of its own, and comes back
    // on the resource for a viewer who is shown it.
    let with_note = dir.path().join("asthma.json");
    write_json(
        &with_note,
        &serde_json::json!({"resourceType": "Bundle", "type": "collection", "entry": [
            {"resource": {"resourceType": "Patient", "id": "p9",
                "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9912003888"}],
                "name": [{"family": "SMITH", "given": ["Richard"]}], "birthDate": "1970-09-11"}},
            {"resource": {"resourceType": "Condition", "id": "asthma-1", "subject": {"reference": "Patient/p9"},
                "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "195967001", "display": "Asthma"}]},
                "onsetDateTime": "2001-04-02", "note": [{"text": "Uses salbutamol before exercise."}]}}
        ]}),
    );
    assert!(
        ingest(&home, &[with_note.to_str().unwrap()])
            .status
            .success()
    );
    let output = record_as_tests(&home, "9912003888", &["--fhir"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let bundle: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(bundle["resourceType"], "Bundle");
    assert_eq!(bundle["type"], "searchset");
    let entries = bundle["entry"].as_array().unwrap();
    // The page's notices come last, as an OperationOutcome; the rest are the record.
    let (outcomes, entries): (Vec<&serde_json::Value>, Vec<&serde_json::Value>) = entries
        .iter()
        .partition(|e| e["search"]["mode"] == "outcome");
    for outcome in &outcomes {
        assert_eq!(outcome["resource"]["resourceType"], "OperationOutcome");
    }
    let resources: Vec<&serde_json::Value> = entries.iter().map(|e| &e["resource"]).collect();
    let matches = entries
        .iter()
        .filter(|e| e["search"]["mode"] == "match")
        .count();
    assert_eq!(bundle["total"], matches);

    // The patient first, under the NHS number.
    assert_eq!(resources[0]["resourceType"], "Patient");
    assert_eq!(resources[0]["id"], "9912003888");
    assert_eq!(resources[0]["birthDate"], "1970-09-11");

    // Every resource: a unique id, and its publisher and system in meta.source.
    let ids: std::collections::BTreeSet<String> = resources
        .iter()
        .map(|r| {
            format!(
                "{}/{}",
                r["resourceType"].as_str().unwrap(),
                r["id"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(ids.len(), resources.len(), "ids are unique");
    for resource in resources
        .iter()
        .filter(|r| r["resourceType"] != "Provenance")
    {
        assert_eq!(
            resource["meta"]["source"],
            "https://fhir.nhs.uk/Id/ods-organization-code/A81001#TestSystem",
            "{resource}"
        );
    }
    // Every reference resolves to a resource in the Bundle (or a contained one).
    fn references<'a>(value: &'a serde_json::Value, found: &mut Vec<&'a str>) {
        match value {
            serde_json::Value::Object(object) => {
                if let Some(serde_json::Value::String(target)) = object.get("reference") {
                    found.push(target);
                }
                object.values().for_each(|v| references(v, found));
            }
            serde_json::Value::Array(values) => values.iter().for_each(|v| references(v, found)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    resources.iter().for_each(|r| references(r, &mut found));
    assert!(found.len() > 50, "the examples reference each other");
    for target in found.iter().filter(|t| !t.starts_with('#')) {
        assert!(ids.contains(*target), "{target} does not resolve");
    }

    // The allergy's clinical content is the publisher's, field for field.
    let source: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            uk_core.join("UKCore-AllergyIntolerance-Amoxicillin-Example.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let allergy = resources
        .iter()
        .find(|r| r["resourceType"] == "AllergyIntolerance" && r["code"] == source["code"])
        .expect("the amoxicillin allergy is served");
    for field in [
        "clinicalStatus",
        "verificationStatus",
        "code",
        "recordedDate",
        "reaction",
    ] {
        assert_eq!(allergy[field], source[field], "{field}");
    }
    assert_eq!(allergy["patient"]["reference"], "Patient/9912003888");
    assert_eq!(
        allergy["recorder"],
        serde_json::json!({ "type": "Practitioner" })
    );

    let asthma = resources
        .iter()
        .find(|r| r["id"] == "A81001-asthma-1")
        .expect("the asthma is served");
    assert_eq!(
        asthma["note"],
        serde_json::json!([{ "text": "Uses salbutamol before exercise." }])
    );
    assert_eq!(asthma["onsetDateTime"], "2001-04-02");

    // One Provenance, naming the organisation and every resource it published.
    let provenance: Vec<_> = entries
        .iter()
        .filter(|e| e["search"]["mode"] == "include")
        .map(|e| &e["resource"])
        .collect();
    assert_eq!(provenance.len(), 1);
    assert_eq!(provenance[0]["resourceType"], "Provenance");
    assert_eq!(
        provenance[0]["agent"][0]["who"]["identifier"]["value"],
        "A81001"
    );
    assert_eq!(
        provenance[0]["agent"][0]["who"]["display"],
        "Banbury Road Surgery"
    );
    assert_eq!(provenance[0]["target"].as_array().unwrap().len(), matches);
}
