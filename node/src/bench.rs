//! What the benchmark binaries (`sync-bench`, `load-bench`) share: a region of node homes
//! around a hub with a signed trust registry, running a node as a child process, and reading
//! figures off a process or a database. Not used by the node itself.

use crate::clock;
use crate::home::{Home, OrganisationConfig};
use anyhow::{Context, Result};
use caremesh_sync::trust::public_key_of;
use caremesh_sync::{OdsCode, OrgKind, Organisation, RegistryFile};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

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
    let mut registry = crate::trust_admin::new_registry("bench");
    for home in &homes {
        registry.organisations.push(Organisation {
            ods: home.config.organisation.ods.clone(),
            name: home.config.organisation.name.clone(),
            kind: home.config.organisation.kind,
            keys: vec![hex::encode(home.signing_key()?.public())],
            revoked_keys: vec![],
            addresses: vec![],
        });
    }
    if let Some(listen) = &hub_listen {
        registry.organisations[0].addresses = vec![listen.clone()];
    }
    let mut file = RegistryFile::unsigned(registry);
    file.sign(&AUTHORITY, clock::now_unix())?;
    for (index, home) in homes.iter_mut().enumerate() {
        crate::trust::write_atomically(&home.registry_path(), &file.to_json())?;
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
