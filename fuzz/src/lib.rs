//! What each fuzz target does with its bytes, so that `cargo fuzz` (nightly, instrumented) and
//! the corpus replay test (stable, in CI) run the same code.
//!
//! Each target drives the node's real code over real files and a real SQLite store, as the node
//! would with bytes from outside: a drop-folder extract, a launch token from a browser, frames
//! from a sync peer, a trust registry, a scenario file, a config file. Besides "never panics",
//! each checks what must hold of the outcome (an ingest report reconciles; what a clinician
//! reads carries no terminal control characters; a refused token says why), so a wrong answer
//! is a finding too, not only a crash.
//!
//! Keys and the clock are fixed, so a crash found in one run replays exactly in another.

use caremesh::home::{self, Home, OrganisationConfig};
use caremesh_ingest::{FileDisposition, Ingestor};
use caremesh_storage::Store;
use caremesh_storage::sync_host::{RegistrySource, StoreHost};
use caremesh_sync::policy::{Consent, Recipient};
use caremesh_sync::{
    Event, NhsNumber, OdsCode, OrgKind, Organisation, Registry, RegistryFile, Session,
    VerifiedRegistry,
};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// The fixed clock, Unix seconds (2027-01-15).
pub const NOW: i64 = 1_800_000_000;
/// The publisher whose documents the sync target receives: a GP practice.
pub const PUBLISHER_ODS: &str = "A81001";
pub const PUBLISHER_SECRET: [u8; 32] = [0x11; 32];
/// The node receiving them: a hub, which holds what every organisation publishes.
pub const RECEIVER_ODS: &str = "Y00001";
pub const RECEIVER_SECRET: [u8; 32] = [0x12; 32];
pub const AUTHORITY_SECRET: [u8; 32] = [0x22; 32];
pub const LAUNCH_SECRET: [u8; 32] = [0x33; 32];
/// At most this many frames are drawn from a session after one input: enough for every reply
/// one input can cause, and a bound so that a loop in the session is a finding, not a hang.
const MAX_REPLIES: usize = 10_000;

/// A node home in a temporary folder, and its freshly made database to start each input from.
struct Workbench {
    _dir: tempfile::TempDir,
    home: Home,
    incoming: PathBuf,
    empty_database: Vec<u8>,
}

impl Workbench {
    fn new(ods: &str, kind: OrgKind) -> Workbench {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let home = Home::init(
            &dir.path().join("home"),
            OrganisationConfig {
                ods: OdsCode::parse(ods).expect("a valid ODS code"),
                name: "Fuzz Practice".into(),
                kind,
            },
        )
        .expect("a node home");
        write_fixed_keys(&home);
        let incoming = dir.path().join("incoming");
        fs::create_dir(&incoming).expect("the incoming folder");
        let empty_database = fs::read(home.database_path()).expect("the new database");
        Workbench {
            _dir: dir,
            home,
            incoming,
            empty_database,
        }
    }

    /// Puts back the database as `caremesh init` left it, so each input starts alike.
    fn reset(&self) {
        restore_database(&self.home.database_path(), &self.empty_database);
        let quarantine = self.home.quarantine_dir();
        let _ = fs::remove_dir_all(&quarantine);
        fs::create_dir(&quarantine).expect("the quarantine folder");
    }
}

/// Puts `bytes` (a database as first made) back at `database`, its WAL and shared memory gone.
fn restore_database(database: &Path, bytes: &[u8]) {
    for suffix in ["-wal", "-shm"] {
        let mut side = database.as_os_str().to_owned();
        side.push(suffix);
        let _ = fs::remove_file(PathBuf::from(side));
    }
    fs::write(database, bytes).expect("the database reset");
}

/// The keys `caremesh init` made at random, replaced by fixed ones.
fn write_fixed_keys(home: &Home) {
    let public = caremesh_sync::trust::public_key_of;
    for (file, key) in [
        (home::KEY_FILE, hex::encode(PUBLISHER_SECRET)),
        (
            home::PUBLIC_KEY_FILE,
            hex::encode(public(&PUBLISHER_SECRET)),
        ),
        (home::LAUNCH_SIGNING_FILE, hex::encode(LAUNCH_SECRET)),
        (
            home::LAUNCH_PUBLIC_FILE,
            hex::encode(public(&LAUNCH_SECRET)),
        ),
    ] {
        let path = home.dir.join(file);
        fs::remove_file(&path).expect("the key made at random");
        home::write_secret(&path, &key).expect("the fixed key");
    }
}

fn practice() -> MutexGuard<'static, Workbench> {
    static PRACTICE: OnceLock<Mutex<Workbench>> = OnceLock::new();
    PRACTICE
        .get_or_init(|| Mutex::new(Workbench::new(PUBLISHER_ODS, OrgKind::Gp)))
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A FHIR JSON extract (a resource or a Bundle) dropped in by the clinical system.
pub fn ingest_json(data: &[u8]) {
    ingest(data, "extract.json");
}

/// A FHIR NDJSON bulk export dropped in by the clinical system.
pub fn ingest_ndjson(data: &[u8]) {
    ingest(data, "extract.ndjson");
}

fn ingest(data: &[u8], file_name: &str) {
    let bench = practice();
    bench.reset();
    let path = bench.incoming.join(file_name);
    fs::write(&path, data).expect("the extract written");
    let mut store = bench.home.open_store().expect("the store opens");
    let report = ingest_file(&bench.home, &mut store, &path)
        .unwrap_or_else(|error| panic!("bytes in a file must end in a report, not {error}"));
    // Nothing silently ignored: every resource read has an outcome.
    assert_eq!(
        report.resources_read(),
        report.resources_accounted(),
        "the ingest report does not reconcile:\n{}",
        report.render()
    );
    read_every_record(&bench.home, &store);
}

/// Ingests `path` into `store` as `caremesh ingest` does (the file left where it is).
fn ingest_file(
    home: &Home,
    store: &mut Store,
    path: &Path,
) -> Result<caremesh_ingest::IngestReport, Box<caremesh_ingest::Stopped>> {
    let settings = home.ingest_settings().expect("the ingest settings");
    Ingestor::new(&settings, store, None, FileDisposition::LeaveInPlace, NOW)
        .expect("the ingestor")
        .ingest_paths(&[path.to_path_buf()])
}

/// What a clinician reads of every patient the store now holds, as text and as JSON.
fn read_every_record(home: &Home, store: &Store) {
    let patients: std::collections::BTreeSet<NhsNumber> = store
        .documents_after(0, 10_000)
        .expect("the documents")
        .into_iter()
        .map(|document| document.meta.patient)
        .collect();
    for nhs in patients {
        let record = caremesh_view::record::assemble(store, &nhs, &home.viewer("fuzz", None), NOW)
            .unwrap_or_else(|error| panic!("the record of a stored patient must read: {error}"));
        let Some(record) = record else { continue };
        let text = caremesh_view::record::render_text(&record);
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "the record as text carries a control character: {text:?}"
        );
        serde_json::to_string(&record).expect("the record as JSON");
    }
}

/// A launch token, as a browser brings it from the clinical system.
pub fn launch_token(data: &[u8]) {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let bench = practice();
    let verifier = caremesh::launch::verifier(&bench.home).expect("the launch key");
    let own = bench.home.config.organisation.ods.clone();
    match verifier.verify(token, &bench.home.config.launch, &own, NOW) {
        Ok(launch) => {
            // Only a token signed with the launch key gets here: it must be for this node.
            assert_eq!(launch.organisation, own);
            assert!(launch.expires_at > NOW);
        }
        Err(refusal) => assert!(!refusal.to_string().is_empty()),
    }
}

/// A FHIR API request as a client sends it: the first line a type's search
/// (`Observation?patient=…&date=…`), the rest what a token request carries (scopes, a client
/// assertion). Searches run over a fixed record; a client assertion is checked against a
/// fixed client key.
pub fn fhir_api_request(data: &[u8]) {
    use caremesh_view::api_access;
    use caremesh_view::fhir_search::{SEARCHABLE_TYPES, Search};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (target, rest) = text.split_once('\n').unwrap_or((text, ""));
    let (resource_type, query) = target.split_once('?').unwrap_or((target, ""));
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .take(64)
        .map(|(name, value)| (name.into_owned(), value.into_owned()))
        .collect();
    if SEARCHABLE_TYPES.contains(&resource_type)
        && let Ok(search) = Search::parse(resource_type, &pairs)
    {
        let record = fhir_record();
        let found = search.apply(&record);
        assert!(found.len() <= record.len());
        assert!(found.iter().all(|r| r["resourceType"] == resource_type));
    }
    if let Ok(scopes) = api_access::parse_scopes(rest) {
        let granted = api_access::grant(&scopes, rest);
        assert!(granted.iter().all(|g| scopes.iter().any(|s| s.covers(g))));
    }
    if let Ok(client) = api_access::claimed_client(rest.trim()) {
        let verified = api_access::verify_assertion(
            rest.trim(),
            &client,
            &fuzz_client_key(),
            &[FUZZ_TOKEN_URL.to_string()],
            NOW,
        );
        if let Ok(assertion) = verified {
            // Only an assertion signed with the client's key gets here.
            assert_eq!(assertion.client_id, "fuzz-client");
        }
    }
}

/// Where the fuzz targets' token endpoint is, as a client assertion's `aud` names it.
pub const FUZZ_TOKEN_URL: &str = "http://127.0.0.1:7802/oauth/token";

/// The fixed key of the fuzz targets' API client.
pub fn fuzz_client_signing_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[0x5a; 32])
}

fn fuzz_client_key() -> caremesh_view::api_access::ClientKey {
    caremesh_view::api_access::ClientKey::EdDsa(fuzz_client_signing_key().verifying_key())
}

/// A client assertion the fuzz client signs: the seed of the token requests.
pub fn signed_client_assertion() -> String {
    caremesh_view::api_access::sign_assertion(
        &fuzz_client_signing_key(),
        caremesh_view::api_access::AssertionClaims {
            iss: "fuzz-client".into(),
            sub: "fuzz-client".into(),
            aud: FUZZ_TOKEN_URL.into(),
            jti: "0123456789abcdef".into(),
        },
        NOW - 10,
        240,
    )
}

/// A record of several types, dates as dates, times and periods, for searches to run over.
fn fhir_record() -> Vec<serde_json::Value> {
    serde_json::from_str(include_str!("fhir_record.json")).expect("the fuzz record")
}

/// A launch token as the clinical system would sign it: the seed of the launch corpus.
pub fn signed_launch_token(nhs: Option<&str>) -> String {
    let bench = practice();
    let signer = caremesh::launch::signer(&bench.home).expect("the signing key");
    signer.sign(
        caremesh_view::launch::LaunchClaims {
            sub: "u123".into(),
            name: "Dr Ada Example".into(),
            role: "clinician".into(),
            org: PUBLISHER_ODS.into(),
            nhs: nhs.map(str::to_string),
            pou: "direct care".into(),
            jti: "0123456789abcdef".into(),
        },
        NOW - 10,
        300,
    )
}

/// The registry both sides of the sync target trust, signed by the fixed authority.
pub fn signed_registry() -> RegistryFile {
    let key = |secret: &[u8; 32]| hex::encode(caremesh_sync::trust::public_key_of(secret));
    let mut registry = Registry::new("fuzz region");
    registry.organisations = vec![
        Organisation {
            ods: OdsCode::parse(PUBLISHER_ODS).expect("ODS"),
            name: "Fuzz Practice".into(),
            kind: OrgKind::Gp,
            keys: vec![key(&PUBLISHER_SECRET)],
            revoked_keys: vec![key(&[0x44; 32])],
            retired_keys: Vec::new(),
            addresses: vec!["127.0.0.1:7000".into()],
        },
        Organisation {
            ods: OdsCode::parse(RECEIVER_ODS).expect("ODS"),
            name: "Fuzz Hub".into(),
            kind: OrgKind::Hub,
            keys: vec![key(&RECEIVER_SECRET)],
            revoked_keys: Vec::new(),
            retired_keys: Vec::new(),
            addresses: Vec::new(),
        },
    ];
    let mut file = RegistryFile::unsigned(registry);
    file.sign(&AUTHORITY_SECRET, NOW - 3600)
        .expect("the registry signs");
    file
}

fn authority() -> [u8; 32] {
    caremesh_sync::trust::public_key_of(&AUTHORITY_SECRET)
}

/// The registry in force never changes; an edition a peer offers is checked, then dropped.
struct PinnedRegistry(Arc<VerifiedRegistry>);

impl RegistrySource for PinnedRegistry {
    fn current(&self) -> Arc<VerifiedRegistry> {
        self.0.clone()
    }
    fn adopt(&self, bytes: Vec<u8>) -> Result<bool, String> {
        VerifiedRegistry::from_bytes(bytes, &authority())
            .map(|_| false)
            .map_err(|error| error.to_string())
    }
}

/// The hub's database as first opened, and the registry: made once per process.
struct SyncBench {
    _dir: tempfile::TempDir,
    database: PathBuf,
    empty_database: Vec<u8>,
    registry: Arc<VerifiedRegistry>,
}

fn sync_bench() -> MutexGuard<'static, SyncBench> {
    static BENCH: OnceLock<Mutex<SyncBench>> = OnceLock::new();
    BENCH
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("a temporary folder");
            let database = dir.path().join("hub.db");
            drop(Store::open(&database).expect("the hub's store"));
            let empty_database = fs::read(&database).expect("the new database");
            let registry = VerifiedRegistry::from_bytes(signed_registry().to_json(), &authority())
                .expect("the registry verifies");
            Mutex::new(SyncBench {
                _dir: dir,
                database,
                empty_database,
                registry: Arc::new(registry),
            })
        })
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A host over `database`, trusting `registry`, for the organisation `own`.
pub fn open_host(database: &Path, registry: Arc<VerifiedRegistry>, own: &str) -> StoreHost {
    let store = Store::open(database).expect("the store opens");
    store.without_fsync().expect("fsync off");
    StoreHost::new(
        store,
        Box::new(PinnedRegistry(registry)),
        OdsCode::parse(own).expect("ODS"),
        Consent {
            share_out: true,
            share_in: true,
            objection: false,
        },
        Box::new(|| NOW),
    )
    .expect("the host")
}

/// What a hub's sync session does with bytes from a connected GP practice, whose identity TLS
/// has established: every frame decoded, every document verified before it is stored.
/// Returns the session's events, for the corpus test to check a seed does what it should.
pub fn sync_frames(data: &[u8]) -> Vec<Event> {
    let bench = sync_bench();
    restore_database(&bench.database, &bench.empty_database);
    let mut host = open_host(&bench.database, bench.registry.clone(), RECEIVER_ODS);
    let now_ms = NOW as u64 * 1000;
    let peer = Recipient {
        ods: OdsCode::parse(PUBLISHER_ODS).expect("ODS"),
        kind: OrgKind::Gp,
    };
    let own = OdsCode::parse(RECEIVER_ODS).expect("ODS");
    let mut session = Session::new(own, peer, now_ms, &mut host).expect("the session opens");
    let mut events = Vec::new();
    // Frames in any cut: the first byte says where the input is split in two deliveries.
    let (first, second) = match data.split_first() {
        Some((&cut, rest)) => rest.split_at((cut as usize).min(rest.len())),
        None => (data, &[][..]),
    };
    for delivery in [first, second] {
        let outcome = session.handle_input(delivery, now_ms, &mut host);
        events.extend(std::iter::from_fn(|| session.poll_event()));
        if outcome.is_err() {
            return events;
        }
    }
    for _ in 0..MAX_REPLIES {
        match session.poll_transmit(now_ms, &mut host) {
            Ok(Some(frame)) => assert!(!frame.is_empty()),
            Ok(None) | Err(_) => return events,
        }
    }
    panic!("one input made the session send more than {MAX_REPLIES} frames");
}

/// A trust registry, from a file or offered by a peer.
pub fn trust_registry(data: &[u8]) {
    let Ok(verified) = VerifiedRegistry::from_bytes(data.to_vec(), &authority()) else {
        return;
    };
    // Verified: every key listed reads one way, trusted or revoked, for its organisation.
    let registry = verified.registry();
    for organisation in &registry.organisations {
        for key in &organisation.keys {
            let key = caremesh_sync::trust::parse_key("key", key).expect("verified keys parse");
            assert!(registry.is_publisher_key(&organisation.ods, &key));
        }
    }
}

/// A simulation scenario file, from a resilience tester.
pub fn scenario(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(scenario) = caremesh_sim::scenario::Scenario::parse(text, "fuzz.toml") {
        // Valid: every group's nodes have codes, and every code resolves back to its node.
        for (code, _) in scenario.codes() {
            assert_eq!(scenario.resolve(&code), vec![code.clone()]);
        }
    }
}

/// A node's config file, as an operator writes it.
pub fn node_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(message) = home::parse_config(text) {
        assert!(!message.is_empty());
    }
}

#[cfg(test)]
mod tests;
