//! `caremesh demo`: a small region on 127.0.0.1 — a hub, a GP practice, an acute trust and a
//! hospice — each a separate `caremesh run` process with its own folder and ports, under a
//! trust registry made and signed for them. The three care organisations hold overlapping
//! synthetic patients, so one patient's record joins data from several of them.

use crate::home::{Home, OrganisationConfig};
use anyhow::{Context, Result};
use caremesh_fhir::clock;
use caremesh_fhir::synthetic::{self, GenerateOptions};
use caremesh_ingest::{FileDisposition, Ingestor};
use caremesh_sync::policy::Consent;
use caremesh_sync::trust::public_key_of;
use caremesh_sync::{OdsCode, OrgKind, Organisation, RegistryFile};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};

struct DemoNode {
    folder: &'static str,
    ods: &'static str,
    name: &'static str,
    kind: OrgKind,
    /// Offset from the base port: the view listens on base + offset, sync on base + 100 + offset.
    port_offset: u16,
    accepts_peers: bool,
    peers: &'static [&'static str],
    source_system: &'static str,
}

/// The walkthrough's result, ingested at the practice while the hub is down.
const OFFLINE_RESULT: &str = "offline-result.json";

/// The practice every demo patient is registered with.
const REGISTERED_GP: &str = "A81001";

const REGION: &[DemoNode] = &[
    DemoNode {
        folder: "hub",
        ods: "HUB01",
        name: "Thames Valley Hub",
        kind: OrgKind::Hub,
        port_offset: 0,
        accepts_peers: true,
        peers: &[],
        source_system: "none",
    },
    DemoNode {
        folder: "gp",
        ods: "A81001",
        name: "Banbury Road Surgery",
        kind: OrgKind::Gp,
        port_offset: 1,
        accepts_peers: true,
        peers: &["HUB01"],
        source_system: "GP system (generated)",
    },
    DemoNode {
        folder: "acute",
        ods: "RTH",
        name: "Oxford University Hospitals",
        kind: OrgKind::Acute,
        port_offset: 2,
        accepts_peers: false,
        peers: &["HUB01"],
        source_system: "EPR (generated)",
    },
    DemoNode {
        folder: "hospice",
        ods: "8HA15",
        name: "Sobell House Hospice",
        kind: OrgKind::Hospice,
        port_offset: 3,
        accepts_peers: false,
        // The hospice also talks to the GP directly: its link to the hub is the poor one.
        peers: &["HUB01", "A81001"],
        source_system: "Hospice system (generated)",
    },
];

/// A launch URL for the demo's clinician (or auditor) at the node in `home`.
fn demo_launch(home: &Path, address: &str, role: &str, nhs: Option<&str>) -> Result<String> {
    let home = Home::open(home)?;
    let name = format!("Demo {role} at {}", home.config.organisation.name);
    crate::launch::launch_url(
        &home,
        &format!("http://{address}"),
        &crate::launch::LaunchRequest {
            user: &format!("demo-{role}"),
            name: &name,
            role,
            nhs,
            purpose: if role == "auditor" {
                "audit"
            } else {
                "direct care"
            },
            issued_at: clock::now_unix(),
            valid_seconds: i64::from(home.config.launch.max_token_minutes) * 60,
        },
    )
}

pub fn run(dir: Option<PathBuf>, patients: u64, port: u16) -> Result<ExitCode> {
    // A region in a temporary folder (no --dir) is removed when the demo stops: it holds
    // the region's authority key.
    let temporary = dir.is_none();
    let dir = match dir {
        Some(dir) => dir,
        None => std::env::temp_dir().join(format!("caremesh-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let done = dir.join("region.done");
    let (first_patient, no_share_in) = if done.exists() {
        let text = std::fs::read_to_string(&done)?;
        let mut lines = text.lines().map(str::to_string);
        let first = lines
            .next()
            .context("region.done is empty; remove it to set up again")?;
        (first, lines.next())
    } else {
        let (first, no_share_in) = set_up(&dir, patients, port)?;
        let text = format!("{first}\n{}\n", no_share_in.as_deref().unwrap_or(""));
        std::fs::write(&done, text)?;
        (first, no_share_in)
    };
    let no_share_in = no_share_in.filter(|n| !n.is_empty());
    let mut hospice_address = None;
    let mut gp_address = None;
    let mut acute_address = None;
    let mut children = Vec::new();
    println!("demo region in {}", dir.display());
    println!(
        "  each node's database is encrypted; the demo keeps the data keys in {} (a real node keeps its key apart from its disk)",
        dir.join(DEMO_DATA_KEYS).display()
    );
    for node in REGION {
        let (child, address) = start(&dir.join(node.folder))?;
        if node.kind == OrgKind::Hospice {
            hospice_address = Some(address.clone());
        }
        if node.kind == OrgKind::Gp {
            gp_address = Some(address.clone());
        }
        if node.kind == OrgKind::Acute {
            acute_address = Some(address.clone());
        }
        let home = dir.join(node.folder);
        let page = if node.kind == OrgKind::Hub {
            format!("http://{address}/health")
        } else {
            demo_launch(&home, &address, "clinician", Some(&first_patient))?
        };
        println!(
            "  {:<28} {:<7} pid {:<7} {page}",
            node.name,
            node.kind.as_str(),
            child.id()
        );
        children.push(child);
    }
    let hub = &children[0];
    println!();
    println!("Open any of the patient pages: the record joins GP, hospital and hospice data.");
    println!(
        "The hospital's page says how many GP items the sharing rules withheld (free text and documents)."
    );
    if let (Some(nhs), Some(address)) = (&no_share_in, &hospice_address) {
        println!(
            "Break-glass: this patient has not agreed to Share In at the hospice, so it shows only its own data: {}",
            demo_launch(&dir.join("hospice"), address, "clinician", Some(nhs))?
        );
        println!(
            "  Give a reason to open the rest for an hour; the access is recorded and the GP is told."
        );
    }
    if let Some(gp_address) = &gp_address {
        println!(
            "Audit at the GP (who saw its data, here and at the hospital and hospice): {}",
            demo_launch(&dir.join("gp"), gp_address, "auditor", None)?
        );
    }
    if let Some(acute_address) = &acute_address {
        println!(
            "FHIR API at the hospital: TOKEN=$(caremesh api-token --dir {} --client demo-app | tail -n 1), then curl -H \"Authorization: Bearer $TOKEN\" 'http://{acute_address}/fhir/Patient/{first_patient}/$everything'",
            dir.join("acute").display()
        );
    }
    println!(
        "Each link is a single-use launch token, valid for 10 minutes, as a clinical system would make: \
         `caremesh launch --dir {}/gp --user ID --name NAME --nhs NUMBER` makes more.",
        dir.display()
    );
    println!(
        "Try working offline: stop the hub with `kill {}`; every view keeps serving.",
        hub.id()
    );
    println!(
        "Ingest at the practice while it is down: `caremesh ingest --dir {} {}` (a new, raised potassium result for this patient); the practice's page shows it at once, the hospital's does not yet.",
        dir.join("gp").display(),
        dir.join(OFFLINE_RESULT).display()
    );
    println!(
        "Bring the hub back with `caremesh run --dir {}`: the result reaches the hospital's page within seconds. `caremesh status --dir {}` shows each peer.",
        dir.join("hub").display(),
        dir.join("acute").display()
    );
    println!("Ctrl-C stops the region.");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let stop = crate::process::shutdown_signal();
        tokio::pin!(stop);
        let mut every_second = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                () = &mut stop => break,
                _ = every_second.tick() => {
                    // A node stopped by hand (the offline walkthrough) is reaped, not
                    // left a zombie.
                    for child in &mut children {
                        let _ = child.try_wait();
                    }
                }
            }
        }
    });
    for mut child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
    if temporary {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("removing the demo region in {}", dir.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Makes the node homes, the authority and registry, and ingests each organisation's
/// extract. Returns the NHS number of a patient known to every care organisation, and of a
/// hospice patient whose Share In is off there (the break-glass example), if it has two.
/// Where the demo keeps its nodes' data keys, in its own folder.
const DEMO_DATA_KEYS: &str = "data-keys";

fn set_up(dir: &Path, patients: u64, port: u16) -> Result<(String, Option<String>)> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("random source: {e}"))?;
    let authority = public_key_of(&secret);
    let mut registry = crate::trust_admin::new_registry("Thames Valley (demo)");
    let mut homes = Vec::new();
    for node in REGION {
        let home_dir = dir.join(node.folder);
        // Encrypted at rest, as a node on a laptop should be. The demo keeps the keys in its
        // own folder, beside (not inside) each home; a real node keeps its key apart from
        // the machine's disk (README, "Encryption at rest").
        let keys = dir.join(DEMO_DATA_KEYS);
        crate::home::private_folder(&keys)?;
        let key = keys.join(format!("{}.key", node.folder));
        crate::home::data_key_for_init(&key, &home_dir)?;
        let mut home = Home::init_with(
            &home_dir,
            OrganisationConfig {
                ods: OdsCode::parse(node.ods)?,
                name: node.name.into(),
                kind: node.kind,
            },
            crate::home::StorageConfig {
                data_key_file: Some(std::path::absolute(&key)?),
                ..Default::default()
            },
        )?;
        let sync_address = format!("127.0.0.1:{}", port + 100 + node.port_offset);
        home.config.view.listen = format!("127.0.0.1:{}", port + node.port_offset);
        home.config.ingest.source_system = node.source_system.into();
        home.config.sync.listen = node.accepts_peers.then(|| sync_address.clone());
        home.config.sync.peers = node
            .peers
            .iter()
            .map(|p| OdsCode::parse(p))
            .collect::<Result<_, _>>()?;
        home.config.sync.authority = Some(hex::encode(authority));
        home.save_config()?;
        registry.organisations.push(Organisation {
            ods: home.config.organisation.ods.clone(),
            name: node.name.into(),
            kind: node.kind,
            keys: vec![hex::encode(home.signing_key()?.public())],
            revoked_keys: Vec::new(),
            retired_keys: Vec::new(),
            addresses: home.config.sync.listen.iter().cloned().collect(),
        });
        homes.push(home);
    }
    let mut file = RegistryFile::unsigned(registry);
    file.sign(&secret, clock::now_unix())?;
    crate::home::write_secret(&dir.join("authority.key"), &hex::encode(secret))?;
    for (node, home) in REGION.iter().zip(&homes) {
        crate::trust::write_atomically(&home.registry_path(), &file.to_json())?;
        if node.kind == OrgKind::Hub {
            continue;
        }
        let extract = dir.join(format!("{}-extract", node.folder));
        let generated = synthetic::generate(&GenerateOptions {
            org: home.config.organisation.ods.clone(),
            org_name: node.name.into(),
            kind: node.kind,
            registered_gp: OdsCode::parse(REGISTERED_GP)?,
            patients,
            seed: 1,
            out: extract.clone(),
        })?;
        let mut store = home.open_store()?;
        let settings = home.ingest_settings()?;
        let report = Ingestor::new(
            &settings,
            &mut store,
            None,
            FileDisposition::LeaveInPlace,
            clock::now_unix(),
        )?
        .ingest_paths(&[extract])?;
        println!(
            "{}: {} patients, {} documents",
            node.name, generated.files, report.documents_written
        );
    }
    // The patients the links open: living, and known to the practice, the hospital and the
    // hospice; the second of them has Share In off at the hospice (the break-glass example).
    let mut shared = (0..patients)
        .map(|index| synthetic::person(1, index))
        .filter(|p| p.deceased_day.is_none() && p.in_caseload_of(OrgKind::Hospice));
    let first = shared.next().with_context(|| {
        format!("no living hospice patient among {patients}; use --patients 40 or more")
    })?;
    let no_share_in = shared.next().map(|p| p.nhs);
    if let Some(nhs) = &no_share_in {
        let (node, home) = REGION
            .iter()
            .zip(&homes)
            .find(|(node, _)| node.kind == OrgKind::Hospice)
            .expect("the demo region has a hospice");
        let consent = Consent {
            share_in: false,
            ..home.config.sharing.defaults()
        };
        let mut store = home.open_store()?;
        crate::consent::record(home, &mut store, nhs, consent)
            .with_context(|| format!("recording the example consent at {}", node.name))?;
    }
    write_offline_result(dir, &first.nhs)?;
    Ok((first.nhs.to_string(), no_share_in.map(|n| n.to_string())))
}

/// The file the walkthrough ingests at the practice while the hub is down: a new, raised
/// potassium result for the first patient, with its own resource id, which the hospital's
/// page shows once the hub is back.
fn write_offline_result(dir: &Path, nhs: &caremesh_sync::NhsNumber) -> Result<()> {
    let now = clock::rfc3339(clock::now_unix());
    let unit = |value: f64| serde_json::json!({ "value": value, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L" });
    let result = serde_json::json!({
        "resourceType": "Observation",
        "id": "A81001-offline-walkthrough-potassium",
        "meta": { "lastUpdated": now },
        "status": "final",
        "category": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory" }] }],
        "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "1000651000000109", "display": "Serum potassium level" }] },
        "subject": { "identifier": { "system": caremesh_fhir::NHS_NUMBER_SYSTEM, "value": nhs.as_str() } },
        "effectiveDateTime": now,
        "valueQuantity": unit(5.9),
        "referenceRange": [{ "low": unit(3.5), "high": unit(5.3) }],
        "interpretation": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": "H", "display": "High" }] }]
    });
    let path = dir.join(OFFLINE_RESULT);
    std::fs::write(&path, serde_json::to_vec_pretty(&result)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Starts `caremesh run` for a node and reads the view address it prints.
fn start(dir: &Path) -> Result<(Child, String)> {
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["run", "--dir"])
        .arg(dir)
        .env(
            "CAREMESH_LOG",
            std::env::var("CAREMESH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting the node in {}", dir.display()))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut reader = std::io::BufReader::new(stdout);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let Some(address) = line
        .trim()
        .strip_prefix("listening on http://")
        .and_then(|a| a.strip_suffix('/'))
    else {
        let _ = child.kill();
        anyhow::bail!(
            "the node in {} did not start (is its port taken? try `caremesh demo --port 8800`)",
            dir.display()
        );
    };
    let address = address.to_string();
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    Ok((child, address))
}
