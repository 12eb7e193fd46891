//! The seeds and corpora replayed on stable (what CI runs), checks that the seeds reach deep
//! into the code they are there to exercise, and the writer that made the seeds.
//!
//! `seeds/<target>/` holds named inputs made from the project's fixtures and a real sync
//! exchange; `corpus/<target>/` what the fuzzer kept (minimised, each input at most 2 KiB).

use super::*;

/// What a target does with one input.
type Target = fn(&[u8]);

/// The targets, by the name of their corpus folder.
const TARGETS: &[(&str, Target)] = &[
    ("ingest_json", ingest_json),
    ("ingest_ndjson", ingest_ndjson),
    ("launch_token", launch_token),
    ("sync_frames", |data| drop(sync_frames(data))),
    ("trust_registry", trust_registry),
    ("scenario", scenario),
    ("node_config", node_config),
    ("fhir_api_request", fhir_api_request),
];

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn repository() -> PathBuf {
    fuzz_dir().parent().expect("the repository").to_path_buf()
}

/// The inputs of `target` kept in `folder` (`seeds` or `corpus`).
fn inputs(folder: &str, target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join(folder).join(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .map(|entries| {
            entries
                .map(|entry| entry.expect("a corpus entry").path())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn seed(target: &str, name: &str) -> Vec<u8> {
    let path = fuzz_dir().join("seeds").join(target).join(name);
    fs::read(&path).unwrap_or_else(|error| panic!("seed {}: {error}", path.display()))
}

/// Every seed and every input the fuzzer kept (or crashed on, once fixed) still runs clean.
#[test]
fn every_corpus_input_runs_clean() {
    for (target, run) in TARGETS {
        assert!(!inputs("seeds", target).is_empty(), "{target} has no seeds");
        let inputs = [inputs("seeds", target), inputs("corpus", target)].concat();
        for input in inputs {
            let data = fs::read(&input).expect("a corpus input");
            println!("{target}: {}", input.display());
            run(&data);
        }
    }
}

/// The sync seed is a real exchange: replayed, the hub stores the practice's documents.
/// Without that, mutations would rarely get past the frame decoder to the document checks.
#[test]
fn the_sync_seed_stores_documents() {
    let stored: usize = sync_frames(&seed("sync_frames", "gp-to-hub-exchange"))
        .iter()
        .map(|event| match event {
            Event::Stored { documents, .. } => documents.len(),
            _ => 0,
        })
        .sum();
    assert!(stored > 5, "the seed stored only {stored} documents");
}

/// The launch seed is a token the node accepts, so mutations start from a valid one.
#[test]
fn the_launch_seed_is_accepted() {
    let token = String::from_utf8(seed("launch_token", "clinician-with-patient"))
        .expect("the launch seed is text");
    let bench = practice();
    let verifier = caremesh::launch::verifier(&bench.home).expect("the launch key");
    let own = bench.home.config.organisation.ods.clone();
    verifier
        .verify(&token, &bench.home.config.launch, &own, NOW)
        .expect("the seed token is accepted");
}

/// The registry seed verifies against the fixed authority.
#[test]
fn the_registry_seed_verifies() {
    let bytes = seed("trust_registry", "two-organisations");
    VerifiedRegistry::from_bytes(bytes, &authority()).expect("the seed verifies");
}

/// The edge-case extract (every kind of resource the view reads, with its awkward cases)
/// passes the ingest target's checks: the report reconciles, and its records read as text
/// without control characters.
#[test]
fn the_edge_case_extract_ingests_and_reconciles() {
    let extract = fs::read(repository().join("tests/fixtures/clinical/edge-cases.json"))
        .expect("the edge-case extract");
    ingest_json(&extract);
}

/// Writes the seeds from the project's fixtures and a real sync exchange. Run by hand after
/// changing the wire format, the fixtures or the fixed keys:
/// `cargo test --manifest-path fuzz/Cargo.toml --lib -- --ignored write_seed_corpora`
#[test]
#[ignore]
fn write_seed_corpora() {
    let write = |target: &str, name: &str, data: &[u8]| {
        let dir = fuzz_dir().join("seeds").join(target);
        fs::create_dir_all(&dir).expect("the corpus folder");
        fs::write(dir.join(name), data).expect("the seed");
    };
    let fixtures = repository().join("tests/fixtures");
    let edge_cases = fs::read(fixtures.join("clinical/edge-cases.json")).expect("edge cases");
    write("ingest_json", "edge-cases-bundle", &edge_cases);
    for example in [
        "UKCore-AllergyIntolerance-Sn-TransferDegradedDrugAllergy-Example.json",
        "UKCore-MedicationRequest-Amoxicillin-Example.json",
        "UKCore-Observation-Group-FullBloodCount-Example.json",
        "UKCore-Patient-RichardSmith-Example.json",
        "UKCore-Condition-BleedingFromEar-Example.json",
    ] {
        if let Ok(bytes) = fs::read(fixtures.join("uk-core").join(example)) {
            write("ingest_json", example, &bytes);
        }
    }
    // The same resources, one per line, as a bulk export sends them.
    let bundle: serde_json::Value = serde_json::from_slice(&edge_cases).expect("JSON");
    let mut ndjson = String::new();
    for entry in bundle["entry"].as_array().expect("entries") {
        ndjson.push_str(&entry["resource"].to_string());
        ndjson.push('\n');
    }
    write("ingest_ndjson", "edge-cases-lines", ndjson.as_bytes());

    write(
        "launch_token",
        "clinician-with-patient",
        signed_launch_token(Some("9000000009")).as_bytes(),
    );
    write(
        "launch_token",
        "clinician-without-patient",
        signed_launch_token(None).as_bytes(),
    );
    for (name, request) in [
        (
            "observations-in-a-date-range",
            "Observation?patient=9912003888&date=ge2026-01-01&date=lt2026-05-01&category=vital-signs&_sort=-date&_count=2&_offset=1\nsystem/*.rs user/Condition.read patient/Observation.rs openid".to_string(),
        ),
        (
            "active-conditions-by-code",
            "Condition?patient.identifier=https://fhir.nhs.uk/Id/nhs-number%7C9912003888&clinical-status=active&code=http://snomed.info/sct%7C195967001,38341003&_lastUpdated=gt2026-02\nsystem/Condition.rs".to_string(),
        ),
        (
            "encounters-with-a-client-assertion",
            format!("Encounter?patient=Patient/9912003888&date=2026-01\n{}", signed_client_assertion()),
        ),
    ] {
        write("fhir_api_request", name, request.as_bytes());
    }
    write(
        "trust_registry",
        "two-organisations",
        &signed_registry().to_json(),
    );
    for entry in fs::read_dir(repository().join("simulations/scenarios")).expect("scenarios") {
        let path = entry.expect("a scenario").path();
        let name = path
            .file_name()
            .expect("a name")
            .to_string_lossy()
            .to_string();
        write(
            "scenario",
            &name,
            &fs::read(&path).expect("a scenario file"),
        );
    }
    write(
        "node_config",
        "example-gp.toml",
        &fs::read(repository().join("configs/example-gp.toml")).expect("a config"),
    );
    write(
        "node_config",
        "as-init-writes-it.toml",
        &fs::read(practice().home.dir.join(home::CONFIG_FILE)).expect("the config"),
    );
    write(
        "sync_frames",
        "gp-to-hub-exchange",
        &practice_to_hub_exchange(),
    );
}

/// The bytes a hub receives from a GP practice holding the edge-case extract, in a real
/// session between the two: the practice's Hello, its offers and its documents.
fn practice_to_hub_exchange() -> Vec<u8> {
    let practice = Workbench::new(PUBLISHER_ODS, OrgKind::Gp);
    let extract = repository().join("tests/fixtures/clinical/edge-cases.json");
    {
        let mut store = practice.home.open_store().expect("the store");
        let report =
            ingest_file(&practice.home, &mut store, &extract).expect("the extract ingests");
        assert!(report.documents_written > 5);
    }
    let registry = Arc::new(
        VerifiedRegistry::from_bytes(signed_registry().to_json(), &authority())
            .expect("the registry"),
    );
    let hub_dir = tempfile::tempdir().expect("a folder");
    let mut gp = open_host(
        &practice.home.database_path(),
        registry.clone(),
        PUBLISHER_ODS,
    );
    let mut hub = open_host(&hub_dir.path().join("hub.db"), registry, RECEIVER_ODS);
    let gp_ods = OdsCode::parse(PUBLISHER_ODS).expect("ODS");
    let hub_ods = OdsCode::parse(RECEIVER_ODS).expect("ODS");
    let now_ms = NOW as u64 * 1000;
    let mut gp_session = Session::new(
        gp_ods.clone(),
        Recipient {
            ods: hub_ods.clone(),
            kind: OrgKind::Hub,
        },
        now_ms,
        &mut gp,
    )
    .expect("the practice's session");
    let mut hub_session = Session::new(
        hub_ods,
        Recipient {
            ods: gp_ods,
            kind: OrgKind::Gp,
        },
        now_ms,
        &mut hub,
    )
    .expect("the hub's session");
    // The first byte is where the fuzz target cuts the input in two deliveries.
    let mut to_hub = vec![7u8];
    for _ in 0..1_000 {
        let mut moved = false;
        while let Some(frame) = gp_session.poll_transmit(now_ms, &mut gp).expect("gp") {
            hub_session
                .handle_input(&frame, now_ms, &mut hub)
                .expect("the hub takes the frame");
            to_hub.extend_from_slice(&frame);
            moved = true;
        }
        while let Some(frame) = hub_session.poll_transmit(now_ms, &mut hub).expect("hub") {
            gp_session
                .handle_input(&frame, now_ms, &mut gp)
                .expect("the practice takes the frame");
            moved = true;
        }
        if !moved {
            break;
        }
    }
    to_hub
}
