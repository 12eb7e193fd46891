//! Helpers shared by the integration tests: they run the real `caremesh` binary.
#![allow(dead_code)]

pub mod region;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub fn caremesh() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_caremesh"));
    command.env("CAREMESH_LOG", "warn");
    command
}

pub fn run(args: &[&str]) -> Output {
    caremesh().args(args).output().expect("caremesh runs")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).to_string()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).to_string()
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures")
}

/// The shared real-data folder, or the small copies in tests/fixtures when it is absent.
pub fn real_data(name: &str) -> PathBuf {
    let shared = repo_root().join("../shared/data").join(name);
    if shared.exists() {
        shared
    } else {
        eprintln!(
            "note: ../shared/data/{name} is absent; using the small copy in tests/fixtures/{name}"
        );
        fixtures().join(name)
    }
}

pub fn init_node(dir: &Path, ods: &str, name: &str, kind: &str) {
    let output = run(&[
        "init",
        "--dir",
        dir.to_str().unwrap(),
        "--org",
        ods,
        "--name",
        name,
        "--kind",
        kind,
        "--source-system",
        "TestSystem",
    ]);
    assert!(output.status.success(), "init failed: {}", stderr(&output));
}

pub fn ingest(dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["ingest", "--dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    run(&args)
}

pub fn record_json(dir: &Path, nhs: &str) -> Option<serde_json::Value> {
    let output = run(&[
        "record",
        "--dir",
        dir.to_str().unwrap(),
        "--nhs",
        nhs,
        "--json",
    ]);
    if output.status.code() == Some(3) {
        return None;
    }
    assert!(
        output.status.success(),
        "record failed: {}",
        stderr(&output)
    );
    Some(serde_json::from_slice(&output.stdout).expect("record JSON parses"))
}

/// All items of one section of a record JSON.
pub fn section<'a>(record: &'a serde_json::Value, name: &str) -> Vec<&'a serde_json::Value> {
    record["sections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["section"] == name)
        .map(|s| s["items"].as_array().unwrap().iter().collect())
        .unwrap_or_default()
}

pub fn status_json(dir: &Path) -> serde_json::Value {
    let output = run(&["status", "--dir", dir.to_str().unwrap(), "--json"]);
    assert!(
        output.status.success(),
        "status failed: {}",
        stderr(&output)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

pub fn write_json(path: &Path, value: &serde_json::Value) {
    std::fs::write(path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
}

/// Polls `condition` every 100 ms until it holds or `limit` passes. Timing is never asserted:
/// the limit only stops a broken test from hanging.
pub fn wait_for(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    condition()
}

/// A minimal HTTP/1.1 GET over a real socket: (status, body).
pub fn http_get(address: &str, path: &str) -> (u16, String) {
    http_request(
        address,
        &format!("GET {path} HTTP/1.1\r\nHost: {address}\r\n"),
        "",
    )
}

/// A form POST (`application/x-www-form-urlencoded`, `form` already encoded): (status, body).
pub fn http_post_form(address: &str, path: &str, form: &str) -> (u16, String) {
    http_request(
        address,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: {address}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            form.len()
        ),
        form,
    )
}

fn http_request(address: &str, head: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address).expect("connect to view");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(stream, "{head}Connection: close\r\n\r\n{body}").unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    let body = if text
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(&body)
    } else {
        body
    };
    (status, body)
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    out
}

/// A running `caremesh run` process, killed when dropped.
pub struct RunningNode {
    pub child: std::process::Child,
    pub address: String,
}

impl RunningNode {
    pub fn start(dir: &Path) -> RunningNode {
        let mut child = caremesh()
            .args([
                "run",
                "--dir",
                dir.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("caremesh run starts");
        let stdout = child.stdout.take().unwrap();
        let mut reader = std::io::BufReader::new(stdout);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        let address = line
            .trim()
            .strip_prefix("listening on http://")
            .and_then(|a| a.strip_suffix('/'))
            .unwrap_or_else(|| panic!("unexpected first line from run: {line:?}"))
            .to_string();
        // Keep draining stdout so the node never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        RunningNode { child, address }
    }

    pub fn kill_hard(&mut self) {
        // SIGKILL: no shutdown handler runs.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        self.kill_hard();
    }
}
