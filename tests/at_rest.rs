//! Encryption at rest, end to end through the real binary: a home made with a data key holds
//! no patient's name, NHS number or clinical note in any file, while the node runs and
//! after; a wrong or missing key is refused by name and nothing is overwritten.

mod support;

use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::*;

const NHS: &str = "9912003888";
const FAMILY: &str = "ZYGMUNTOWICZ";
const NOTE: &str = "MARKER-NOTE-cellulitis-left-shin-4c1d";
const CELLULITIS: (&str, &str, &str) = ("c1", "128045006", "Cellulitis");

/// The arguments of `caremesh init` of the practice at `home`, keyed as `key_args` say.
fn practice_init_args<'a>(home: &'a Path, key_args: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "init",
        "--dir",
        home.to_str().unwrap(),
        "--org",
        "A81001",
        "--name",
        "Banbury Road Surgery",
        "--kind",
        "gp",
        "--listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(key_args);
    args
}

/// `caremesh init` of the practice at `home` with `key_args` (how its data is keyed), given
/// `input` on standard input.
fn init_practice(home: &Path, key_args: &[&str], input: &str) -> std::process::Output {
    run_with_input(&practice_init_args(home, key_args), input)
}

fn init_encrypted(home: &Path, key: &Path) -> std::process::Output {
    init_practice(home, &["--data-key-file", key.to_str().unwrap()], "")
}

/// The patient and one condition, `(id, SNOMED CT code, display)`, with the note.
fn extract(path: &Path, (condition_id, code, display): (&str, &str, &str)) {
    write_json(
        path,
        &json!({"resourceType": "Bundle", "type": "collection", "entry": [
            {"resource": {"resourceType": "Patient", "id": "p1",
                "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": NHS}],
                "name": [{"family": FAMILY, "given": ["Test"]}], "birthDate": "1950-02-03"}},
            {"resource": {"resourceType": "Condition", "id": condition_id,
                "subject": {"reference": "Patient/p1"},
                "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": code, "display": display}]},
                "note": [{"text": NOTE}],
                "onsetDateTime": "2026-11-01"}}
        ]}),
    );
}

/// A trust's local number for the patient (the NHS number inside it, so that a reason naming
/// it holds a marker), and the patient index that maps it.
const MRN_SYSTEM: &str = "https://trust.example.nhs.uk/Id/mrn";
const MRN: &str = "MRN-9912003888";

/// A condition, with the note, for the patient known only by the trust's number: quarantined
/// until the patient index maps it.
fn mrn_condition(path: &Path) {
    write_json(
        path,
        &json!({"resourceType": "Bundle", "type": "collection", "entry": [
            {"resource": {"resourceType": "Condition", "id": "c3",
                "subject": {"identifier": {"system": MRN_SYSTEM, "value": MRN}},
                "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "195967001", "display": "Asthma"}]},
                "note": [{"text": NOTE}],
                "onsetDateTime": "2026-11-02"}}
        ]}),
    );
}

/// Whether the file at `path` starts as a sealed file does.
fn is_sealed(path: &Path) -> bool {
    bytes_of(path).starts_with(b"caremesh-sealed1")
}

/// The regular files in `folder`, by name.
fn names_in(folder: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(folder)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    names
}

/// Every file under `dir` whose name or content holds one of the markers.
fn files_holding(dir: &Path, markers: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                folders.push(path);
                continue;
            }
            if !kind.is_file() {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap_or_default();
            for marker in markers {
                let named = path.to_string_lossy().contains(marker);
                let held = bytes
                    .windows(marker.len())
                    .any(|window| window == marker.as_bytes());
                if named || held {
                    found.push(format!("{} ({marker})", path.display()));
                }
            }
        }
    }
    found
}

fn bytes_of(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn an_encrypted_home_holds_no_patient_data_in_plain_text_and_needs_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys-kept-apart");
    std::fs::create_dir(&keys).unwrap();
    let key = keys.join("data.key");
    let home = dir.path().join("node");
    let made = init_encrypted(&home, &key);
    assert!(made.status.success(), "{}", stderr(&made));
    assert!(
        stdout(&made).contains("database: encrypted with a new data key written to"),
        "init says how the database is kept: {}",
        stdout(&made)
    );
    let key_file = std::fs::metadata(&key).unwrap();
    assert_eq!(key_file.permissions().mode() & 0o777, 0o600);
    assert_eq!(key_file.len(), 65, "64 hexadecimal digits and a newline");

    // Ingested from the command line and, with the node running, from the drop folder.
    let first = dir.path().join("first.json");
    extract(&first, CELLULITIS);
    let output = ingest(&home, &["--move", first.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let node = RunningNode::start(&home);
    let second = dir.path().join("second.json");
    extract(&second, ("c2", "38341003", "Hypertension"));
    std::fs::rename(&second, home.join("drop/second.json")).unwrap();
    let both_in = || {
        record_json(&home, NHS).is_some_and(|record| record.to_string().contains("Hypertension"))
            && std::fs::read_dir(home.join("drop"))
                .unwrap()
                .next()
                .is_none()
    };
    assert!(wait_for(Duration::from_secs(60), both_in));

    // A condition for a patient known only by the trust's number: quarantined, its reason
    // naming that number; read and released through the key once the index maps it.
    let by_mrn = dir.path().join("by-mrn.json");
    mrn_condition(&by_mrn);
    std::fs::rename(&by_mrn, home.join("drop/by-mrn.json")).unwrap();
    let quarantined = home.join("quarantine/by-mrn.json");
    assert!(wait_for(Duration::from_secs(60), || quarantined.exists()));
    let quarantine = |args: &[&str]| {
        let mut all = vec!["quarantine", args[0], "--dir", home.to_str().unwrap()];
        all.extend_from_slice(&args[1..]);
        run(&all)
    };
    let listed = quarantine(&["list"]);
    assert!(
        stdout(&listed).contains(&format!("{MRN} is not in the patient index")),
        "{}{}",
        stdout(&listed),
        stderr(&listed)
    );
    let shown = quarantine(&["show", "by-mrn.json"]);
    assert!(shown.status.success(), "{}", stderr(&shown));
    assert!(stdout(&shown).contains(NOTE), "{}", stdout(&shown));
    assert!(is_sealed(&quarantined));
    assert!(is_sealed(&home.join("quarantine/by-mrn.json.reason.txt")));
    let index = dir.path().join("patient-index.csv");
    std::fs::write(&index, format!("{MRN_SYSTEM},{MRN},{NHS}\n")).unwrap();
    let released = quarantine(&[
        "release",
        "by-mrn.json",
        "--patient-index",
        index.to_str().unwrap(),
    ]);
    assert!(
        released.status.success(),
        "{}{}",
        stdout(&released),
        stderr(&released)
    );
    assert_eq!(names_in(&home.join("quarantine")), Vec::<String>::new());
    std::fs::remove_file(&index).unwrap();

    // Every extract is kept, sealed, for its days in processed/.
    let processed = home.join("processed");
    assert_eq!(
        names_in(&processed),
        ["by-mrn.json", "first.json", "second.json"]
    );
    for name in names_in(&processed) {
        assert!(is_sealed(&processed.join(&name)), "{name}");
    }
    let record = record_json(&home, NHS).unwrap();
    assert!(record.to_string().contains("Asthma"), "{record}");
    assert!(
        record.to_string().contains(NOTE),
        "the record reads its note back through the key"
    );
    let status = run(&["status", "--dir", home.to_str().unwrap()]);
    assert!(
        stdout(&status).contains(&format!("encrypted (data key: {})", key.display())),
        "{}{}",
        stdout(&status),
        stderr(&status)
    );
    let markers = [NHS, FAMILY, NOTE];
    assert!(
        home.join("node.db-wal").exists(),
        "the test would not search a WAL"
    );
    assert_eq!(
        files_holding(&home, &markers),
        Vec::<String>::new(),
        "while the node runs"
    );
    drop(node);
    assert_eq!(
        files_holding(&home, &markers),
        Vec::<String>::new(),
        "after"
    );
    // The test would see plain text: the extracts it wrote hold every marker.
    extract(&first, CELLULITIS);
    assert_eq!(files_holding(dir.path(), &markers).len(), 3);
    std::fs::remove_file(&first).unwrap();

    // Every signature and page checks out through the key.
    let verified = run(&["verify", "--dir", home.to_str().unwrap()]);
    assert!(
        verified.status.success(),
        "{}{}",
        stdout(&verified),
        stderr(&verified)
    );

    // A wrong key: refused by name, nothing written. (First the killed node's WAL is
    // checkpointed by a clean open and close with the right key: the last connection to
    // close checkpoints it, whatever its key, since the frames are copied as they are.)
    assert!(record_json(&home, NHS).is_some());
    assert!(!home.join("node.db-wal").exists());
    let database = home.join("node.db");
    let before = bytes_of(&database);
    let right = std::fs::read_to_string(&key).unwrap();
    std::fs::write(&key, format!("{}\n", "ab".repeat(32))).unwrap();
    let refused = record_as_tests(&home, NHS, &[]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("does not open with the data key given"),
        "{}",
        stderr(&refused)
    );
    assert!(bytes_of(&database) == before, "node.db changed");

    // No key: the node does not start, and makes no new database over the encrypted one.
    std::fs::remove_file(&key).unwrap();
    let refused = run(&[
        "run",
        "--dir",
        home.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("which is not there"),
        "{}",
        stderr(&refused)
    );
    assert!(bytes_of(&database) == before, "node.db changed");

    // A configuration that names no key: the database says it is encrypted.
    let config = home.join("caremesh.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let without: String = text
        .lines()
        .filter(|line| !line.starts_with("data_key_file"))
        .map(|line| format!("{line}\n"))
        .collect();
    std::fs::write(&config, without).unwrap();
    let refused = record_as_tests(&home, NHS, &[]);
    assert!(
        stderr(&refused).contains("is encrypted, and no data key was given"),
        "{}",
        stderr(&refused)
    );
    assert!(bytes_of(&database) == before, "node.db changed");

    // The right key back: the record opens.
    std::fs::write(&config, &text).unwrap();
    std::fs::write(&key, &right).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(record_json(&home, NHS).is_some());

    // The key as a systemd credential: read from $CREDENTIALS_DIRECTORY, and asked for by
    // name when the node was not started with it.
    let credentials = dir.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    std::fs::rename(&key, credentials.join("caremesh-data-key")).unwrap();
    let with_credential: String = text
        .lines()
        .map(|line| {
            if line.starts_with("data_key_file") {
                "data_key_credential = \"caremesh-data-key\"\n".to_string()
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    std::fs::write(&config, with_credential).unwrap();
    let record = |credentials: Option<&Path>| {
        let mut command = caremesh();
        match credentials {
            Some(folder) => command.env("CREDENTIALS_DIRECTORY", folder),
            None => command.env_remove("CREDENTIALS_DIRECTORY"),
        };
        command
            .args(["record", "--dir", home.to_str().unwrap(), "--nhs", NHS])
            .args(["--user", "Integration test", "--json"])
            .output()
            .unwrap()
    };
    let read = record(Some(&credentials));
    assert!(read.status.success(), "{}", stderr(&read));
    assert!(stdout(&read).contains(NOTE));
    let refused = record(None);
    assert!(
        stderr(&refused).contains("LoadCredentialEncrypted=caremesh-data-key"),
        "{}",
        stderr(&refused)
    );
}

/// Whether `file` is a plaintext SQLite database (its header is readable).
fn plaintext_sqlite(file: &Path) -> bool {
    bytes_of(file).starts_with(b"SQLite format 3\0")
}

#[test]
fn a_home_is_encrypted_unless_the_operator_says_by_name_that_it_need_not_be() {
    let dir = tempfile::tempdir().unwrap();

    // No choice made: refused, naming every choice, and nothing made.
    let home = dir.path().join("node");
    let refused = init_practice(&home, &[], "");
    assert!(!refused.status.success());
    for choice in [
        "--data-key-file",
        "--data-key-credential",
        "--data-key-passphrase",
        "--unencrypted",
    ] {
        assert!(
            stderr(&refused).contains(choice),
            "names {choice}: {}",
            stderr(&refused)
        );
    }
    assert!(!home.exists(), "nothing was made");

    // A systemd credential: missing, refused by name with nothing made; given, the database
    // is encrypted with it and a command without it is told how to supply it.
    let credentials = dir.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    let credential = credentials.join("caremesh-data-key");
    std::fs::write(&credential, format!("{}\n", "5e".repeat(32))).unwrap();
    std::fs::set_permissions(&credential, std::fs::Permissions::from_mode(0o600)).unwrap();
    let with_credentials = |args: &[&str], folder: Option<&Path>| {
        let mut command = caremesh();
        match folder {
            Some(folder) => command.env("CREDENTIALS_DIRECTORY", folder),
            None => command.env_remove("CREDENTIALS_DIRECTORY"),
        };
        command.args(args).output().unwrap()
    };
    let home_arg = home.to_str().unwrap();
    let init = practice_init_args(&home, &["--data-key-credential", "caremesh-data-key"]);
    let refused = with_credentials(&init, None);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("LoadCredentialEncrypted=caremesh-data-key"),
        "{}",
        stderr(&refused)
    );
    assert!(!home.exists(), "nothing was made");
    let made = with_credentials(&init, Some(&credentials));
    assert!(made.status.success(), "{}", stderr(&made));
    assert!(
        stdout(&made)
            .contains("encrypted with the data key in the systemd credential caremesh-data-key"),
        "{}",
        stdout(&made)
    );
    let database = home.join("node.db");
    assert!(database.exists() && !plaintext_sqlite(&database));
    let extract_file = dir.path().join("extract.json");
    extract(&extract_file, CELLULITIS);
    let ingested = with_credentials(
        &["ingest", "--dir", home_arg, extract_file.to_str().unwrap()],
        Some(&credentials),
    );
    assert!(ingested.status.success(), "{}", stderr(&ingested));
    let status = with_credentials(&["status", "--dir", home_arg], Some(&credentials));
    assert!(status.status.success(), "{}", stderr(&status));
    let without = with_credentials(&["status", "--dir", home_arg], None);
    assert!(!without.status.success());
    assert!(
        stderr(&without).contains("LoadCredentialEncrypted=caremesh-data-key"),
        "{}",
        stderr(&without)
    );
    assert_eq!(
        files_holding(&home, &[NHS, FAMILY, NOTE]),
        Vec::<String>::new()
    );

    // Plain text only when asked for by name, and init says so.
    let plain = dir.path().join("plain");
    let made = init_practice(&plain, &["--unencrypted"], "");
    assert!(made.status.success(), "{}", stderr(&made));
    assert!(
        stdout(&made).contains("not encrypted, as asked (--unencrypted)"),
        "{}",
        stdout(&made)
    );
    assert!(plaintext_sqlite(&plain.join("node.db")));
}

#[test]
fn the_data_key_is_kept_outside_the_home_and_private() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("node");
    let inside: PathBuf = home.join("data.key");
    let refused = init_encrypted(&home, &inside);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("must be outside the node home"),
        "{}",
        stderr(&refused)
    );
    assert!(!home.exists(), "nothing was made");
    let nowhere = dir.path().join("no-such-folder").join("data.key");
    let refused = init_encrypted(&home, &nowhere);
    assert!(
        stderr(&refused).contains("does not exist: make it, for this account only"),
        "{}",
        stderr(&refused)
    );
    assert!(!home.exists(), "nothing was made");

    let shared = dir.path().join("shared.key");
    std::fs::write(&shared, format!("{}\n", "cd".repeat(32))).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = init_encrypted(&home, &shared);
    assert!(
        stderr(&refused).contains("chmod 600"),
        "{}",
        stderr(&refused)
    );
    assert!(!home.exists(), "nothing was made");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o600)).unwrap();
    let made = init_encrypted(&home, &shared);
    assert!(made.status.success(), "{}", stderr(&made));
    assert!(
        stdout(&made).contains("database: encrypted with the data key in"),
        "an existing key is used, not replaced: {}",
        stdout(&made)
    );
    assert_eq!(
        std::fs::read_to_string(&shared).unwrap(),
        format!("{}\n", "cd".repeat(32))
    );
}

/// A home made without a data key is encrypted in place, with the node stopped: the record
/// is kept, the plaintext leaves the home, the key is recorded, and it is done once.
#[test]
fn a_plaintext_home_is_encrypted_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("node");
    init_node(&home, "A81001", "Banbury Road Surgery", "gp");
    let first = dir.path().join("first.json");
    extract(&first, CELLULITIS);
    let output = ingest(&home, &["--move", first.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let by_mrn = dir.path().join("by-mrn.json");
    mrn_condition(&by_mrn);
    let output = ingest(&home, &["--move", by_mrn.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let markers = [NHS, FAMILY, NOTE];
    let plain = files_holding(&home, &markers).join("\n");
    for kept in [
        "node.db",
        "processed/first.json",
        "quarantine/by-mrn.json",
        "quarantine/by-mrn.json.reason.txt",
    ] {
        assert!(plain.contains(kept), "the test would see {kept}: {plain}");
    }
    let key = dir.path().join("data.key");
    let encrypt = || {
        run(&[
            "encrypt",
            "--dir",
            home.to_str().unwrap(),
            "--data-key-file",
            key.to_str().unwrap(),
        ])
    };

    // Not while the node runs.
    let node = RunningNode::start(&home);
    let refused = encrypt();
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("another caremesh node"),
        "{}",
        stderr(&refused)
    );
    drop(node);

    let done = encrypt();
    assert!(done.status.success(), "{}", stderr(&done));
    assert!(stdout(&done).contains("database encrypted with a new data key in"));
    assert!(
        stdout(&done).contains("3 file(s) kept in processed/ and quarantine/ encrypted"),
        "{}",
        stdout(&done)
    );
    assert_eq!(files_holding(&home, &markers), Vec::<String>::new());
    let shown = assert_quarantined_note_shows(&home);
    assert!(
        stdout(&shown).contains(MRN),
        "the reason: {}",
        stdout(&shown)
    );
    let record = record_json(&home, NHS).expect("the record is kept");
    assert!(record.to_string().contains(NOTE));
    let status = run(&["status", "--dir", home.to_str().unwrap()]);
    assert!(stdout(&status).contains("encrypted (data key: "));
    let again = encrypt();
    assert!(
        stderr(&again).contains("is already encrypted"),
        "{}",
        stderr(&again)
    );
    let trail = audit_trail_csv(&home);
    assert!(trail.contains("encrypt-database"), "{trail}");
}

/// Whether the key in `key_file` opens the database of `home` (SQLCipher itself, not caremesh).
fn key_opens(home: &Path, key_file: &Path) -> bool {
    let key = std::fs::read_to_string(key_file).unwrap();
    let connection = rusqlite::Connection::open_with_flags(
        home.join("node.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    connection
        .execute_batch(&format!(
            "PRAGMA cipher_log_level = NONE; PRAGMA key = \"x'{}'\";",
            key.trim()
        ))
        .unwrap();
    connection
        .query_row("SELECT count(*) FROM documents", [], |row| {
            row.get::<_, i64>(0)
        })
        .is_ok_and(|documents| documents > 0)
}

/// Whether every kept file in processed/ and quarantine/ reads through the key in
/// `key_file` alone.
fn kept_files_open_with(home: &Path, key_file: &Path) -> bool {
    use caremesh_storage::at_rest::{DataKey, DataKeys};
    let key = DataKey::from_hex(&std::fs::read_to_string(key_file).unwrap()).unwrap();
    let keys = DataKeys::new(std::sync::Arc::new(key));
    ["processed", "quarantine"].iter().all(|folder| {
        names_in(&home.join(folder)).iter().all(|name| {
            caremesh_storage::sealed::read_kept(Some(&keys), &home.join(folder).join(name), 1 << 30)
                .is_ok()
        })
    })
}

/// `caremesh quarantine show` of the file quarantined for want of the patient index: read,
/// note and all, through the key. Returns the output.
fn assert_quarantined_note_shows(home: &Path) -> std::process::Output {
    let shown = run(&[
        "quarantine",
        "show",
        "--dir",
        home.to_str().unwrap(),
        "by-mrn.json",
    ]);
    assert!(stdout(&shown).contains(NOTE), "{}", stderr(&shown));
    shown
}

fn rekey_to(home: &Path, new_key_file: &Path) -> std::process::Output {
    run(&[
        "rekey",
        "--dir",
        home.to_str().unwrap(),
        "--new-data-key-file",
        new_key_file.to_str().unwrap(),
    ])
}

/// A home with key `old`: 200 generated patients and the marker patient ingested, and one
/// file quarantined (its reason sealed beside it).
fn encrypted_home_with_kept_files(dir: &Path, home: &Path, old: &Path) {
    let output = init_encrypted(home, old);
    assert!(output.status.success(), "{}", stderr(&output));
    let generated = dir.join("generated");
    let output = run(&[
        "generate",
        "--org",
        "A81001",
        "--patients",
        "200",
        "--seed",
        "3",
        "--out",
        generated.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let first = dir.join("first.json");
    extract(&first, CELLULITIS);
    let by_mrn = dir.join("by-mrn.json");
    mrn_condition(&by_mrn);
    for path in [&generated, &first, &by_mrn] {
        let output = ingest(home, &["--move", path.to_str().unwrap()]);
        assert!(output.status.code().is_some(), "{}", stderr(&output));
    }
    assert!(home.join("quarantine/by-mrn.json").exists());
    assert!(names_in(&home.join("processed")).len() > 1);
}

/// `caremesh rekey` on a running node: the view answers every read throughout, the running
/// node goes on ingesting after it, and afterwards the database and every kept file open
/// with the new key alone, not the old one, with no patient data in plain text anywhere.
#[test]
fn the_data_key_changes_while_the_node_serves_reads() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let (old, new) = (dir.path().join("old.key"), dir.path().join("new.key"));
    encrypted_home_with_kept_files(dir.path(), &home, &old);
    let node = RunningNode::start(&home);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (stop, address) = (stop.clone(), node.address.clone());
        std::thread::spawn(move || {
            let mut answers = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                answers.push(http_get(&address, "/health"));
            }
            answers
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let rekeyed = rekey_to(&home, &new);
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answers = reader.join().unwrap();
    assert!(
        rekeyed.status.success(),
        "{}{}",
        stdout(&rekeyed),
        stderr(&rekeyed)
    );
    assert!(
        stdout(&rekeyed).contains(&format!(
            "data key changed to the key file {}",
            new.display()
        )),
        "{}",
        stdout(&rekeyed)
    );
    assert!(
        stdout(&rekeyed).contains("re-encrypted"),
        "{}",
        stdout(&rekeyed)
    );
    assert!(
        answers.len() > 2,
        "the reader read throughout: {}",
        answers.len()
    );
    for (status, body) in &answers {
        assert_eq!(
            *status, 200,
            "a read failed during the change of key: {body}"
        );
    }
    assert_eq!(
        std::fs::metadata(&new).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // The running node writes on under the new key.
    let later = dir.path().join("later.json");
    extract(&later, ("c2", "38341003", "Hypertension"));
    let output = ingest(&home, &[later.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let config = std::fs::read_to_string(home.join("caremesh.toml")).unwrap();
    assert!(config.contains(new.to_str().unwrap()), "{config}");
    assert!(!config.contains("previous_data_key"), "{config}");
    let trail = audit_trail_csv(&home);
    assert!(trail.contains(",\"rekey\","), "{trail}");
    drop(node);

    assert!(key_opens(&home, &new));
    assert!(!key_opens(&home, &old), "the old key opens nothing");
    assert!(kept_files_open_with(&home, &new));
    for folder in ["processed", "quarantine"] {
        for name in names_in(&home.join(folder)) {
            assert!(
                !kept_files_open_with(&home, &old),
                "{folder}/{name} still opens with the old key"
            );
        }
    }
    assert_eq!(
        files_holding(&home, &[NHS, FAMILY, NOTE]),
        Vec::<String>::new()
    );
    let record = record_json(&home, NHS).unwrap().to_string();
    assert!(
        record.contains("Hypertension") && record.contains(NOTE),
        "{record}"
    );
    assert_quarantined_note_shows(&home);

    // The same key again changes nothing; nor does a change to a key file inside the home.
    let again = rekey_to(&home, &new);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("is the data key already"),
        "{}",
        stderr(&again)
    );
    let inside = run(&[
        "rekey",
        "--dir",
        home.to_str().unwrap(),
        "--new-data-key-file",
        home.join("data.key").to_str().unwrap(),
    ]);
    assert!(
        stderr(&inside).contains("must be outside the node home"),
        "{}",
        stderr(&inside)
    );
    assert!(key_opens(&home, &new));
}

/// A change of key cut short after the configuration named the new key and before the
/// database was rewritten (the state a crash there leaves): every command still reads
/// through the previous key, and the node finishes the change when it starts.
#[test]
fn a_change_of_key_cut_short_is_finished_when_the_node_starts() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let (old, new) = (dir.path().join("old.key"), dir.path().join("new.key"));
    encrypted_home_with_kept_files(dir.path(), &home, &old);
    std::fs::write(
        &new,
        format!(
            "{}\n",
            caremesh_storage::at_rest::DataKey::generate()
                .unwrap()
                .to_hex()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config_path = home.join("caremesh.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    let old_line = format!("data_key_file = \"{}\"", old.display());
    assert!(config.contains(&old_line), "{config}");
    std::fs::write(
        &config_path,
        config.replace(
            &old_line,
            &format!(
                "data_key_file = \"{}\"\nprevious_data_key_file = \"{}\"",
                new.display(),
                old.display()
            ),
        ),
    )
    .unwrap();

    assert!(
        record_json(&home, NHS).is_some(),
        "read through the previous key"
    );
    assert_quarantined_note_shows(&home);
    assert!(key_opens(&home, &old) && !key_opens(&home, &new));
    let status = run(&["status", "--dir", home.to_str().unwrap()]);
    assert!(
        stdout(&status).contains("a change of key from the key file"),
        "{}{}",
        stdout(&status),
        stderr(&status)
    );

    let node = RunningNode::start(&home);
    let (status, body) = http_get(&node.address, "/health");
    assert_eq!(status, 200, "{body}");
    drop(node);
    assert!(key_opens(&home, &new) && !key_opens(&home, &old));
    assert!(kept_files_open_with(&home, &new));
    assert!(!kept_files_open_with(&home, &old));
    let config = std::fs::read_to_string(&config_path).unwrap();
    assert!(!config.contains("previous_data_key"), "{config}");
    assert!(record_json(&home, NHS).is_some());
}

/// `caremesh ARGS` given `input` on standard input (where a passphrase is read from when
/// there is no terminal).
fn run_with_input(args: &[&str], input: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = caremesh()
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// `caremesh COMMAND --dir HOME REST…`, given `input` on standard input.
fn run_on(home: &Path, command: &str, rest: &[&str], input: &str) -> std::process::Output {
    let mut args = vec![command, "--dir", home.to_str().unwrap()];
    args.extend_from_slice(rest);
    run_with_input(&args, input)
}

/// A home whose data key comes from a passphrase: no key on the disk, the passphrase asked
/// for by each command that opens the data (here on standard input), a wrong or missing one
/// refused by name, a short one refused at `init` with nothing left behind; the key changed
/// to a key file and back to a new passphrase with `rekey`.
#[test]
fn a_home_keyed_by_a_passphrase_asks_for_it_and_refuses_a_wrong_one() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let home_arg = home.to_str().unwrap();
    const PASSPHRASE: &str = "a lantern by the canal at dusk\n";
    let init = |dir: &Path, input: &str| init_practice(dir, &["--data-key-passphrase"], input);
    let short = dir.path().join("short");
    let refused = init(&short, "too short\n");
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("at least 12 characters"),
        "{}",
        stderr(&refused)
    );
    assert!(!short.join("caremesh.toml").exists(), "nothing left behind");

    let made = init(&home, PASSPHRASE);
    assert!(made.status.success(), "{}", stderr(&made));
    assert!(
        stdout(&made).contains("derived from your passphrase"),
        "{}",
        stdout(&made)
    );
    let salt = home.join("keys/data-key.salt");
    assert_eq!(
        std::fs::metadata(&salt).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let first = dir.path().join("first.json");
    extract(&first, CELLULITIS);
    let ingested = run_with_input(
        &["ingest", "--dir", home_arg, first.to_str().unwrap()],
        PASSPHRASE,
    );
    assert!(ingested.status.success(), "{}", stderr(&ingested));
    let record = |input: &str| {
        run_with_input(
            &[
                "record", "--dir", home_arg, "--nhs", NHS, "--user", "Test", "--json",
            ],
            input,
        )
    };
    let read = record(PASSPHRASE);
    assert!(stdout(&read).contains(NOTE), "{}", stderr(&read));
    let wrong = record("a lantern by the canal at dawn\n");
    assert!(!wrong.status.success());
    assert!(
        stderr(&wrong).contains("that passphrase does not give this home's data key"),
        "{}",
        stderr(&wrong)
    );
    let none = run(&["record", "--dir", home_arg, "--nhs", NHS, "--user", "Test"]);
    assert!(!none.status.success());
    assert!(stderr(&none).contains("no terminal"), "{}", stderr(&none));
    let status = run_with_input(&["status", "--dir", home_arg], PASSPHRASE);
    assert!(
        stdout(&status).contains("from a passphrase, its salt in keys/data-key.salt"),
        "{}{}",
        stdout(&status),
        stderr(&status)
    );
    assert_eq!(
        files_holding(&home, &[NHS, FAMILY, NOTE]),
        Vec::<String>::new()
    );
    // The node asks at its start too, and serves.
    let mut node = caremesh()
        .args(["run", "--dir", home_arg, "--listen", "127.0.0.1:0"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = node.stdin.take().unwrap();
        stdin.write_all(PASSPHRASE.as_bytes()).unwrap();
    }
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(node.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let address = line
        .trim()
        .strip_prefix("listening on http://")
        .and_then(|rest| rest.strip_suffix('/'))
        .unwrap_or_else(|| panic!("{line}"))
        .to_string();
    assert_eq!(http_get(&address, "/health").0, 200);
    let _ = node.kill();
    let _ = node.wait();

    // Backed up with the salt beside the backup, and restored elsewhere with the passphrase.
    let backup = dir.path().join("practice.backup");
    let backed_up = run_on(
        &home,
        "backup",
        &["--out", backup.to_str().unwrap()],
        PASSPHRASE,
    );
    assert!(backed_up.status.success(), "{}", stderr(&backed_up));
    assert!(dir.path().join("practice.backup.salt").exists());
    let elsewhere = dir.path().join("elsewhere");
    let restore = |input: &str| {
        run_with_input(
            &[
                "restore",
                "--from",
                backup.to_str().unwrap(),
                "--dir",
                elsewhere.to_str().unwrap(),
                "--data-key-passphrase",
            ],
            input,
        )
    };
    let refused = restore("a lantern by the canal at dawn\n");
    assert!(
        stderr(&refused).contains("does not give this home's data key"),
        "{}",
        stderr(&refused)
    );
    assert!(
        !elsewhere.exists(),
        "nothing restored with a wrong passphrase"
    );
    let restored = restore(PASSPHRASE);
    assert!(restored.status.success(), "{}", stderr(&restored));
    let read_elsewhere = run_with_input(
        &[
            "record",
            "--dir",
            elsewhere.to_str().unwrap(),
            "--nhs",
            NHS,
            "--user",
            "Test",
            "--json",
        ],
        PASSPHRASE,
    );
    assert!(
        stdout(&read_elsewhere).contains(NOTE),
        "{}",
        stderr(&read_elsewhere)
    );

    // A node that syncs with nobody holds nothing back after a restore: no peer holds what
    // it published after the backup.
    let restored_status = run_on(&elsewhere, "status", &[], PASSPHRASE);
    assert!(
        !stdout(&restored_status).contains("PUBLISHING HELD"),
        "{}",
        stdout(&restored_status)
    );

    // To a key file: then no passphrase is asked for.
    let file_key = dir.path().join("file.key");
    let to_file = run_on(
        &home,
        "rekey",
        &["--new-data-key-file", file_key.to_str().unwrap()],
        PASSPHRASE,
    );
    assert!(to_file.status.success(), "{}", stderr(&to_file));
    assert!(stdout(&record("")).contains(NOTE));
    assert!(!salt.exists(), "the old passphrase's salt is gone");
    // And to a new passphrase: the old one opens nothing.
    const NEW_PASSPHRASE: &str = "seven herons over the water meadow\n";
    let to_passphrase = run_with_input(
        &["rekey", "--dir", home_arg, "--new-data-key-passphrase"],
        NEW_PASSPHRASE,
    );
    assert!(to_passphrase.status.success(), "{}", stderr(&to_passphrase));
    assert!(stdout(&record(NEW_PASSPHRASE)).contains(NOTE));
    assert!(!record(PASSPHRASE).status.success());
    assert!(!key_opens(&home, &file_key));
}
