//! A region of real nodes for sync tests: an authority, a signed registry, node homes with
//! their own ports, all on 127.0.0.1.

use super::{ingest, run, status_json, stderr, stdout, wait_for};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct Region {
    pub root: PathBuf,
    pub authority_key: PathBuf,
    pub authority: String,
    pub registry: PathBuf,
}

/// A UDP port free at the moment of asking (the node binds it moments later).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn ok(output: std::process::Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout(&output)
}

impl Region {
    pub fn new(root: &Path) -> Region {
        let authority_key = root.join("authority/authority.key");
        let out = ok(run(&[
            "trust",
            "authority",
            "--out",
            authority_key.to_str().unwrap(),
        ]));
        let authority = out
            .lines()
            .find_map(|l| l.strip_prefix("authority public key: "))
            .expect("public key printed")
            .to_string();
        let registry = root.join("authority/registry.json");
        ok(run(&[
            "trust",
            "new",
            "--registry",
            registry.to_str().unwrap(),
            "--region",
            "Test Region",
        ]));
        Region {
            root: root.to_path_buf(),
            authority_key,
            authority,
            registry,
        }
    }

    /// Makes a node home; `listen` gives it a sync port; `peers` are the ODS codes it dials.
    pub fn node(&self, ods: &str, kind: &str, listen: bool, peers: &[&str]) -> PathBuf {
        let dir = self.root.join(ods.to_ascii_lowercase());
        let mut args = vec![
            "init".to_string(),
            "--dir".into(),
            dir.to_str().unwrap().into(),
            "--org".into(),
            ods.into(),
            "--name".into(),
            format!("Organisation {ods}"),
            "--kind".into(),
            kind.into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            // Plain text so that tests can read the database directly; tests/at_rest.rs
            // runs a region encrypted.
            "--unencrypted".into(),
        ];
        if listen {
            args.push("--sync-listen".into());
            args.push(format!("127.0.0.1:{}", free_udp_port()));
        }
        for peer in peers {
            args.push("--peer".into());
            args.push(peer.to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(run(&args));
        dir
    }

    /// A node home already listed in the registry (unsigned until [`Region::publish`]).
    pub fn registered(&self, ods: &str, kind: &str, listen: bool, peers: &[&str]) -> PathBuf {
        let dir = self.node(ods, kind, listen, peers);
        self.register(&dir);
        dir
    }

    /// Lists a node in the registry (unsigned until [`Region::publish`]).
    pub fn register(&self, dir: &Path) {
        ok(run(&[
            "trust",
            "add",
            "--registry",
            self.registry.to_str().unwrap(),
            "--node",
            dir.to_str().unwrap(),
        ]));
    }

    /// Withdraws `key` of `ods` (every current key when `None`) for `reason` (`compromised`
    /// or `retired`), unsigned until [`Region::publish`].
    pub fn withdraw(&self, ods: &str, key: Option<&str>, reason: &str) {
        let mut args = vec![
            "trust",
            "revoke",
            "--registry",
            self.registry.to_str().unwrap(),
            "--ods",
            ods,
            "--reason",
            reason,
        ];
        if let Some(key) = key {
            args.extend(["--key", key]);
        }
        ok(run(&args));
    }

    /// Replaces the registry's sharing agreements (unsigned until [`Region::publish`]).
    pub fn set_agreements(&self, file: &Path) {
        ok(run(&[
            "trust",
            "agreements",
            "--registry",
            self.registry.to_str().unwrap(),
            "--file",
            file.to_str().unwrap(),
        ]));
    }

    /// Signs a new edition and installs it in `nodes`.
    pub fn publish(&self, nodes: &[&Path]) {
        ok(run(&[
            "trust",
            "sign",
            "--registry",
            self.registry.to_str().unwrap(),
            "--authority-key",
            self.authority_key.to_str().unwrap(),
        ]));
        for dir in nodes {
            self.install(dir);
        }
    }

    pub fn install(&self, dir: &Path) {
        ok(run(&[
            "trust",
            "install",
            "--dir",
            dir.to_str().unwrap(),
            "--registry",
            self.registry.to_str().unwrap(),
            "--authority",
            &self.authority,
        ]));
    }
}

pub fn documents(dir: &Path) -> i64 {
    status_json(dir)["stats"]["documents"].as_i64().unwrap()
}

/// The status row `dir` keeps for `peer`.
pub fn peer(dir: &Path, peer: &str) -> Option<serde_json::Value> {
    status_json(dir)["sync"]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer"] == peer)
        .cloned()
}

/// Waits until `dir` holds `count` documents; panics with what it holds if it never does.
pub fn wait_for_documents(dir: &Path, count: i64, limit: Duration) {
    let reached = wait_for(limit, || documents(dir) >= count);
    assert!(
        reached,
        "{} holds {} documents, expected {count}; status: {}",
        dir.display(),
        documents(dir),
        status_json(dir)
    );
}

/// `caremesh generate`: `patients` patients of `org` (seed `seed`) into `out`.
pub fn generate(out: &Path, org: &str, patients: u64, seed: u64) {
    let output = run(&[
        "generate",
        "--org",
        org,
        "--patients",
        &patients.to_string(),
        "--seed",
        &seed.to_string(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
}

/// Generates and ingests `patients` patients at `dir` (as its own organisation).
pub fn ingest_generated(dir: &Path, org: &str, patients: u64, seed: u64) {
    let extract = dir.with_extension(format!("extract-{seed}"));
    generate(&extract, org, patients, seed);
    let output = ingest(dir, &[extract.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
}
