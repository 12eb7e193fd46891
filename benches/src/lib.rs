//! What the benchmark binaries (`sync-bench`, `load-bench`) share: a region of node homes
//! around a hub with a signed trust registry, running a node as a child process, and reading
//! figures off a process or a database. Not used by the node itself.

use anyhow::{Context, Result};
use caremesh::home::{Home, OrganisationConfig};
use caremesh::trust::TrustState;
use caremesh_engine::{Driver, DriverEvent, DriverOptions, Transmit};
use caremesh_fhir::clock;
use caremesh_fhir::synthetic::{GenerateOptions, generate};
use caremesh_ingest::{FileDisposition, Ingestor};
use caremesh_storage::Store;
use caremesh_storage::sync_host::StoreHost;
use caremesh_sync::policy::Recipient;
use caremesh_sync::trust::public_key_of;
use caremesh_sync::{
    Item, OdsCode, OrgKind, Organisation, PublishedDocument, RegistryFile, SignedHeads,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

/// The benchmarks' trust authority key: a fixed test key, never used outside benchmarks.
pub const AUTHORITY: [u8; 32] = [42; 32];

/// A hub home in `work/name`, and a signed registry listing it and every member, installed in
/// each; the members dial the hub.
pub fn region(
    work: &Path,
    members: &[PathBuf],
    name: &str,
    hub_listen: Option<String>,
) -> Result<PathBuf> {
    let hub_dir = work.join(name);
    let hub = Home::init(
        &hub_dir,
        OrganisationConfig {
            ods: OdsCode::parse("HUB01")?,
            name: "Bench Hub".into(),
            kind: OrgKind::Hub,
        },
    )?;
    let mut homes = vec![hub];
    for member in members {
        homes.push(Home::open(member)?);
    }
    let mut registry = caremesh::trust_admin::new_registry("bench");
    for home in &homes {
        registry.organisations.push(Organisation {
            ods: home.config.organisation.ods.clone(),
            name: home.config.organisation.name.clone(),
            kind: home.config.organisation.kind,
            keys: vec![hex::encode(home.signing_key()?.public())],
            revoked_keys: vec![],
            retired_keys: Vec::new(),
            addresses: vec![],
        });
    }
    if let Some(listen) = &hub_listen {
        registry.organisations[0].addresses = vec![listen.clone()];
    }
    let mut file = RegistryFile::unsigned(registry);
    file.sign(&AUTHORITY, clock::now_unix())?;
    for (index, home) in homes.iter_mut().enumerate() {
        caremesh::trust::write_atomically(&home.registry_path(), &file.to_json())?;
        home.config.sync.authority = Some(hex::encode(public_key_of(&AUTHORITY)));
        home.config.view.listen = "127.0.0.1:0".into();
        if index == 0 {
            home.config.sync.listen = hub_listen.clone();
        } else {
            home.config.sync.peers = vec![OdsCode::parse("HUB01")?];
        }
        home.save_config()?;
    }
    Ok(hub_dir)
}

/// Peak resident set (VmHWM) of a live process, in KiB; 0 when unreadable.
pub fn peak_rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM:")
}

/// Resident set now (VmRSS) of a live process, in KiB; 0 when unreadable.
pub fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:")
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix(field)?
                    .trim()
                    .trim_end_matches(" kB")
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

pub fn caremesh_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe.with_file_name("caremesh"))
}

pub fn run_node(dir: &Path) -> Result<Child> {
    Command::new(caremesh_binary()?)
        .args(["run", "--dir"])
        .arg(dir)
        .env("CAREMESH_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting caremesh run (build the caremesh binary first)")
}

pub fn count(db: &Path, sql: &str) -> Result<i64> {
    let conn = rusqlite::Connection::open(db)?;
    Ok(conn.query_row(sql, [], |row| row.get(0))?)
}

/// Runs the `gp` ⇄ `hub` drivers in-process (connection 1 on both) until neither has
/// anything to send, each frame received as a turn of its own; returns (bytes gp→hub, bytes
/// hub→gp, frames, flights from the gp that carried something).
pub fn exchange(gp: &mut Driver, hub: &mut Driver, now: u64) -> (u64, u64, u64, u64) {
    let (mut up, mut down, mut frames, mut flights) = (0, 0, 0, 0);
    loop {
        let outgoing: Vec<Transmit> =
            std::iter::from_fn(|| gp.poll_transmit(now, |_| true)).collect();
        if !outgoing.is_empty() {
            flights += 1;
        }
        for transmit in &outgoing {
            up += transmit.frame.len() as u64;
            frames += 1;
            hub.receive(now, transmit.conn, &transmit.frame);
        }
        let back: Vec<Transmit> = std::iter::from_fn(|| hub.poll_transmit(now, |_| true)).collect();
        for transmit in &back {
            down += transmit.frame.len() as u64;
            frames += 1;
            gp.receive(now, transmit.conn, &transmit.frame);
        }
        if outgoing.is_empty() && back.is_empty() {
            return (up, down, frames, flights);
        }
    }
}

/// Fails on a session the driver closed (a protocol error or a storage failure), which
/// would otherwise read as a round that had nothing to send.
fn closed_in(driver: &mut Driver) -> Result<()> {
    while let Some(event) = driver.poll_event() {
        if let DriverEvent::Close { reason, cause, .. } = event
            && cause.is_failure()
        {
            anyhow::bail!("the session closed: {reason}");
        }
    }
    Ok(())
}

/// The incremental round a change costs: the practice in `gp_dir` and a new hub are first
/// fully synced (in-process drivers over their real SQLite stores, as `caremesh run` runs
/// them), then one item changes and one round runs from the saved checkpoints. Prints
/// documents held, bytes each way, frames and round trips.
pub fn incremental(work: &Path, gp_dir: &Path, patients: u64) -> Result<()> {
    let hub_dir = region(
        work,
        &[gp_dir.to_path_buf()],
        &format!("hub-incremental-{patients}"),
        None,
    )?;
    let gp_home = Home::open(gp_dir)?;
    let hub_home = Home::open(&hub_dir)?;
    let driver = |home: &Home| -> Result<(Driver, Recipient, [u8; 32])> {
        let trust = TrustState::load(
            &home.registry_path(),
            &hex::encode(public_key_of(&AUTHORITY)),
        )?;
        let ods = home.config.organisation.ods.clone();
        let host = StoreHost::new(
            home.open_store()?,
            Box::new(trust),
            ods.clone(),
            home.config.sharing.defaults(),
            Box::new(clock::now_unix),
        )?;
        let recipient = Recipient {
            ods: ods.clone(),
            kind: home.config.organisation.kind,
        };
        let key = home.signing_key()?.public();
        Ok((
            Driver::new(ods, host, DriverOptions::default(), 0),
            recipient,
            key,
        ))
    };
    let (mut gp, gp_peer, gp_key) = driver(&gp_home)?;
    let (mut hub, hub_peer, hub_key) = driver(&hub_home)?;
    anyhow::ensure!(
        gp.connect(0, 1, (hub_peer, hub_key), true),
        "the GP refused the hub"
    );
    anyhow::ensure!(
        hub.connect(0, 1, (gp_peer, gp_key), false),
        "the hub refused the GP"
    );
    exchange(&mut gp, &mut hub, 0);
    closed_in(&mut gp)?;
    closed_in(&mut hub)?;
    let documents = gp.host().store.stats()?.documents;

    gp.write_local(|host| change_one_item(&gp_home, &mut host.store))?;
    let (up, down, frames, flights) = exchange(&mut gp, &mut hub, 1);
    closed_in(&mut gp)?;
    closed_in(&mut hub)?;
    println!("{documents:>10} {patients:>10} {up:>12} {down:>12} {frames:>8} {flights:>12}");
    Ok(())
}

/// Adds one item to the GP's first document and signs the new version, as an ingest would.
pub fn change_one_item(home: &Home, store: &mut Store) -> Result<()> {
    let stored = store
        .documents_after(0, 1)?
        .pop()
        .context("practice holds no documents")?;
    let key = home.signing_key()?;
    let actor = caremesh_storage::publish::actor_for(&key);
    let mut document = PublishedDocument::load_for_writing(&stored.meta, &stored.snapshot, &actor)?;
    let mut item: Item = document
        .items()?
        .into_iter()
        .next()
        .context("document holds no items")?;
    item.id = format!("{}-bench-change", item.id);
    item.title = "Changed for the benchmark".into();
    assert!(document.update(&[item], &[], clock::now_unix()));
    let signed: SignedHeads = key.sign_heads(&stored.meta, &document.heads());
    let batch = store.write()?;
    batch.put_document(
        &signed,
        &document.save(),
        &document.items()?,
        clock::now_unix(),
    )?;
    batch.commit()?;
    Ok(())
}

/// A GP node home at `dir` holding `patients` generated patients (seed `seed`), ingested as
/// `caremesh ingest` would.
pub fn practice_of(dir: &Path, ods: OdsCode, patients: u64, seed: u64) -> Result<PathBuf> {
    let home = Home::init(
        dir,
        OrganisationConfig {
            ods: ods.clone(),
            name: format!("Bench Practice {ods}"),
            kind: OrgKind::Gp,
        },
    )?;
    let extract = dir.join("extract");
    generate(&GenerateOptions::practice(
        ods,
        patients,
        seed,
        extract.clone(),
    ))?;
    let mut store = home.open_store()?;
    let started = Instant::now();
    let settings = home.ingest_settings()?;
    let report = Ingestor::new(
        &settings,
        &mut store,
        None,
        FileDisposition::LeaveInPlace,
        clock::now_unix(),
    )?
    .ingest_paths(std::slice::from_ref(&extract))?;
    std::fs::remove_dir_all(&extract).ok();
    std::fs::write(dir.join("patients.count"), patients.to_string())?;
    if patients < 10 {
        return Ok(dir.to_path_buf());
    }
    eprintln!(
        "prepared {patients} patients, {} documents in {:.1}s",
        report.documents_written,
        started.elapsed().as_secs_f64()
    );
    Ok(dir.to_path_buf())
}

/// Places one new coded problem about `patient` in `batch`, published as ingest publishes it:
/// a new signed version of the patient's problems document and of their sharing record.
/// What the benchmarks change while they measure.
pub fn publish_problem(
    batch: &caremesh_storage::WriteBatch<'_>,
    home: &Home,
    key: &caremesh_sync::PublisherKey,
    patient: &caremesh_sync::NhsNumber,
    id: &str,
    title: &str,
) -> Result<()> {
    let item = Item::titled(
        id,
        caremesh_sync::Section::Problems,
        caremesh_sync::DataClass::Coded,
        "Condition",
        title,
        "benchmark",
        id,
    );
    let ods = home.config.organisation.ods.clone();
    let mut publication =
        caremesh_storage::publish::Publication::new(ods, home.config.sharing.defaults());
    publication.place(batch, patient, &[id.to_string()], vec![item])?;
    publication.apply(batch, key, clock::now_unix())?;
    Ok(())
}
