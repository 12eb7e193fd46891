//! Helpers shared by the integration tests: they run the real `caremesh` binary.
#![allow(dead_code)]

pub mod notify;
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
        // Plain text so that tests can read the database directly; tests/at_rest.rs keys it.
        "--unencrypted",
    ]);
    assert!(output.status.success(), "init failed: {}", stderr(&output));
}

pub fn ingest(dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["ingest", "--dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    run(&args)
}

/// `caremesh record` for `nhs` at `dir`, read by the integration tests, with `extra` flags.
pub fn record_as_tests(dir: &Path, nhs: &str, extra: &[&str]) -> Output {
    let dir = dir.to_str().unwrap();
    let mut args = vec![
        "record",
        "--dir",
        dir,
        "--nhs",
        nhs,
        "--user",
        "Integration test",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

pub fn record_json(dir: &Path, nhs: &str) -> Option<serde_json::Value> {
    let output = record_as_tests(dir, nhs, &["--json"]);
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

/// The whole audit trail of the node in `dir`, as `caremesh audit report` writes it in CSV.
pub fn audit_trail_csv(dir: &Path) -> String {
    let output = run(&[
        "audit",
        "report",
        "--dir",
        dir.to_str().unwrap(),
        "--from",
        "2000-01-01",
        "--to",
        "2100-01-01",
        "--format",
        "csv",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    stdout(&output)
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

/// A minimal HTTP/1.1 GET over a real socket, with no session: (status, body).
pub fn http_get(address: &str, path: &str) -> (u16, String) {
    let response = http_request(address, "GET", path, None, None);
    (response.status, response.body)
}

/// A GET carrying the session cookie a launch gave: (status, body).
pub fn http_get_as(address: &str, path: &str, cookie: &str) -> (u16, String) {
    let response = http_request(address, "GET", path, Some(cookie), None);
    (response.status, response.body)
}

/// A form POST (`application/x-www-form-urlencoded`, `form` already encoded) with the
/// session cookie: (status, body).
/// A form posted from the node's own page, as a browser does: it carries the session's form
/// token (the page puts it in every form).
pub fn http_post_form_as(address: &str, path: &str, form: &str, cookie: &str) -> (u16, String) {
    let secret = cookie.split_once('=').map_or("", |(_, secret)| secret);
    let form = format!(
        "{form}&form_token={}",
        caremesh_view::web::form_token(secret)
    );
    let response = http_request(address, "POST", path, Some(cookie), Some(&form));
    (response.status, response.body)
}

/// A form posted without the page's token, as another site's page would.
pub fn http_post_form_without_token(
    address: &str,
    path: &str,
    form: &str,
    cookie: &str,
) -> (u16, String) {
    let response = http_request(address, "POST", path, Some(cookie), Some(form));
    (response.status, response.body)
}

pub struct HttpResponse {
    pub status: u16,
    /// Header lines as sent, lower-cased names.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

pub fn http_request(
    address: &str,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    form: Option<&str>,
) -> HttpResponse {
    http_request_with(address, method, path, cookie, form, &[])
}

/// As [`http_request`], with extra header lines (`Origin`, say).
pub fn http_request_with(
    address: &str,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    form: Option<&str>,
    extra: &[(&str, &str)],
) -> HttpResponse {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n");
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(cookie) = cookie {
        head.push_str(&format!("Cookie: {cookie}\r\n"));
    }
    if let Some(form) = form {
        head.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            form.len()
        ));
    }
    exchange(address, &head, form.unwrap_or(""))
}

/// Sends `head` (the request line and headers) and `body`, and reads the whole answer.
fn exchange(address: &str, head: &str, body: &str) -> HttpResponse {
    let mut stream = TcpStream::connect(address).expect("connect to view");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(stream, "{head}\r\n{body}").unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    parse_http_response(&response)
}

/// An HTTP/1.1 response as read off the wire (the connection closed after it).
pub fn parse_http_response(response: &[u8]) -> HttpResponse {
    let text = String::from_utf8_lossy(response).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    HttpResponse {
        status,
        headers,
        body,
    }
}

/// A request with `headers` and `body` as given (a JSON POST, a DELETE).
pub fn http_request_raw(
    address: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpResponse {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    exchange(address, &head, body)
}

/// A GET of the FHIR API presenting `token` as a Bearer token (none: no Authorization).
pub fn fhir_get(address: &str, path: &str, token: Option<&str>) -> HttpResponse {
    let authorization = token.map(|t| format!("Bearer {t}"));
    let extra: Vec<(&str, &str)> = authorization
        .iter()
        .map(|a| ("Authorization", a.as_str()))
        .collect();
    http_request_with(address, "GET", path, None, None, &extra)
}

/// `caremesh api-token` for the node in `dir` with `extra` flags: the token (last line).
pub fn api_token(dir: &Path, extra: &[&str]) -> String {
    let mut args = vec!["api-token", "--dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let output = run(&args);
    assert!(
        output.status.success(),
        "api-token failed: {}",
        stderr(&output)
    );
    stdout(&output)
        .lines()
        .last()
        .expect("api-token prints the token on its last line")
        .trim()
        .to_string()
}

/// `caremesh launch` for the node in `dir`, as the clinical system would: the launch URL.
pub fn launch_url(dir: &Path, address: &str, extra: &[&str]) -> String {
    let base = format!("http://{address}");
    let mut args = vec!["launch", "--dir", dir.to_str().unwrap(), "--base", &base];
    args.extend_from_slice(extra);
    let output = run(&args);
    assert!(
        output.status.success(),
        "launch failed: {}",
        stderr(&output)
    );
    stdout(&output).trim().to_string()
}

/// Follows a launch URL: the response (a redirect with a session cookie when accepted).
pub fn follow_launch(url: &str) -> HttpResponse {
    let rest = url.trim_start_matches("http://");
    let (address, path) = rest.split_once('/').expect("a launch URL has a path");
    http_request(address, "GET", &format!("/{path}"), None, None)
}

/// The `name=value` session cookie from a launch response.
pub fn session_cookie(response: &HttpResponse) -> String {
    assert_eq!(response.status, 303, "launch refused: {}", response.body);
    response
        .header("set-cookie")
        .expect("a launch sets the session cookie")
        .split(';')
        .next()
        .unwrap()
        .to_string()
}

/// A clinician's session for one patient at the running node: the cookie.
pub fn clinician_session(dir: &Path, address: &str, nhs: &str) -> String {
    let url = launch_url(
        dir,
        address,
        &[
            "--user",
            "C0001",
            "--name",
            "Dr Test Clinician",
            "--nhs",
            nhs,
        ],
    );
    session_cookie(&follow_launch(&url))
}

/// A session with `role` (auditor or admin) at the running node: the cookie.
pub fn role_session(dir: &Path, address: &str, role: &str) -> String {
    let url = launch_url(
        dir,
        address,
        &["--user", "R0001", "--name", "Test Role", "--role", role],
    );
    session_cookie(&follow_launch(&url))
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
    /// Serving HTTPS (the node said `listening on https://`).
    pub https: bool,
}

impl RunningNode {
    pub fn start(dir: &Path) -> RunningNode {
        Self::start_logging(dir, "warn", std::process::Stdio::inherit())
    }

    /// Starts the node with `CAREMESH_LOG=level`, its log (stderr) going to `log`.
    pub fn start_logging(dir: &Path, level: &str, log: std::process::Stdio) -> RunningNode {
        let mut child = caremesh()
            .env("CAREMESH_LOG", level)
            .args([
                "run",
                "--dir",
                dir.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("caremesh run starts");
        let stdout = child.stdout.take().unwrap();
        let mut reader = std::io::BufReader::new(stdout);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        let served = line.trim().strip_prefix("listening on ");
        let https = served.is_some_and(|s| s.starts_with("https://"));
        let address = served
            .and_then(|s| {
                s.strip_prefix("https://")
                    .or_else(|| s.strip_prefix("http://"))
            })
            .and_then(|a| a.strip_suffix('/'))
            .unwrap_or_else(|| panic!("unexpected first line from run: {line:?}"))
            .to_string();
        // Keep draining stdout so the node never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        RunningNode {
            child,
            address,
            https,
        }
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

/// Runs `program args` for set-up, and says what happened when it failed.
pub fn set_up(what: &str, program: &str, args: &[&str], dir: &Path) -> Result<(), String> {
    eprintln!("test set-up: {what}: {program} {}", args.join(" "));
    let output = Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .map_err(|error| format!("{what}: could not run {program}: {error}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{what}: `{program} {}` failed ({}):\n{}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}

/// Whether `program` is on the PATH.
pub fn found(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|out| out.status.success())
}

/// Installs the pinned npm packages of `browser-tests/` (`npm ci`, from its
/// `package-lock.json`) unless every one of `packages` is there; the error says what to
/// install by hand.
pub fn ensure_npm_packages(tests: &Path, packages: &[&str]) -> Result<(), String> {
    if !found("node") || !found("npm") {
        return Err("Node.js 20 or newer with npm (`apt-get install -y nodejs npm`)".into());
    }
    if packages
        .iter()
        .all(|package| tests.join("node_modules").join(package).exists())
    {
        return Ok(());
    }
    let args = ["ci", "--no-audit", "--no-fund"];
    set_up("installing the pinned npm packages", "npm", &args, tests).map_err(|error| {
        format!("browser-tests/node_modules (run `npm ci --prefix browser-tests`): {error}")
    })
}
