//! Change notification latency: from a change committed at a node to its notification
//! arriving at a client's rest-hook endpoint, with 1 and with 500 subscriptions.
//!
//! ```sh
//! cargo build --release -p caremesh -p caremesh-bench --bins
//! ./target/release/notify-bench --patients 500 --subscriptions 500 --changes 100
//! ```
//!
//! A GP node of `--patients` generated patients runs as a real `caremesh run` process; the
//! benchmark is its API client (`caremesh api-token`) and the endpoint (an HTTP listener in
//! this process). Each change is one new Observation for one patient, ingested with
//! `caremesh ingest` into the running node, one at a time: the latency is from `caremesh
//! ingest` returning (the node has committed the change and said so) to the endpoint
//! receiving the notification naming the new Observation. Phases, in one run:
//!
//! 0. no subscription (the baseline: what a change costs the node without notifications);
//! 1. one subscription, following the changed patient;
//! 2. `--subscriptions` subscriptions, each following another patient, changes spread over
//!    them (each change is one notification, every pass reads every subscription);
//! 3. the same number all following one patient (each change is that many notifications).
//!
//! Half the subscriptions ask for full resources, half for ids. Reported per phase: p50,
//! p99 and max latency (in phase 3, to each notification, and to the last of each change),
//! and the node's CPU seconds per change (user + system, from /proc).

use anyhow::{Context, Result, bail, ensure};
use caremesh_bench::{caremesh_binary, cpu_seconds, percentiles, practice_of};
use caremesh_sync::OdsCode;
use clap::Parser;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 500)]
    patients: u64,
    #[arg(long, default_value_t = 500)]
    subscriptions: usize,
    /// Changes measured in each phase.
    #[arg(long, default_value_t = 100)]
    changes: usize,
    /// Where the node's home is made (a temporary folder when not given).
    #[arg(long)]
    work: Option<PathBuf>,
}

const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition";
const TOPIC: &str = "urn:caremesh:subscription-topic:patient-record";
const WAIT: Duration = Duration::from_secs(30);

/// What the endpoint received: when, and the bench Observations it named.
struct Delivery {
    at: Instant,
    kind: String,
    changes: Vec<usize>,
}

/// The endpoint: one thread per connection, each notification handed over with its time.
fn endpoint() -> Result<(String, mpsc::Receiver<Delivery>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let (sender, received) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let sender = sender.clone();
            std::thread::spawn(move || serve(stream, &sender));
        }
    });
    Ok((url, received))
}

/// Serves one connection's requests (the node's client keeps connections alive).
fn serve(stream: TcpStream, sender: &mpsc::Sender<Delivery>) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut length = None;
        let mut first = true;
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line == "\r\n" && !first => break,
                Ok(_) => {}
            }
            first = false;
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse::<usize>().ok();
            }
        }
        let mut body = vec![0; length.unwrap_or(0)];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let at = Instant::now();
        if writer
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .is_err()
        {
            return;
        }
        let text = String::from_utf8_lossy(&body);
        let bundle: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let kind = bundle["entry"][0]["resource"]["parameter"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["name"] == "type"))
            .and_then(|p| p["valueCode"].as_str())
            .unwrap_or("")
            .to_string();
        let changes = text
            .match_indices("bench-change-")
            .filter_map(|(at, marker)| {
                text[at + marker.len()..]
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            })
            .collect::<std::collections::BTreeSet<usize>>()
            .into_iter()
            .collect();
        let _ = sender.send(Delivery { at, kind, changes });
    }
}

fn http(address: &str, method: &str, path: &str, token: &str, body: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(address)?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Type: application/fhir+json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, body.to_string()))
}

fn subscribe(
    address: &str,
    token: &str,
    endpoint: &str,
    nhs: &str,
    payload: &str,
) -> Result<String> {
    let subscription = json!({
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "notify-bench",
        "criteria": TOPIC,
        "_criteria": {"extension": [{"url": format!("{BACKPORT}/backport-filter-criteria"), "valueString": format!("Patient?_id={nhs}")}]},
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "_payload": {"extension": [{"url": format!("{BACKPORT}/backport-payload-content"), "valueCode": payload}]},
        },
    });
    let (status, body) = http(
        address,
        "POST",
        "/fhir/Subscription",
        token,
        &subscription.to_string(),
    )?;
    ensure!(status == 201, "subscribing: {status} {body}");
    let made: Value = serde_json::from_str(&body)?;
    Ok(made["id"]
        .as_str()
        .context("a subscription id")?
        .to_string())
}

struct Node {
    child: Child,
    address: String,
    home: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_node(home: &Path) -> Result<Node> {
    let mut child = Command::new(caremesh_binary()?)
        .args(["run", "--listen", "127.0.0.1:0", "--dir"])
        .arg(home)
        .env("CAREMESH_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .context("starting caremesh run (build the caremesh binary first)")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let address = line
        .trim()
        .strip_prefix("listening on http://")
        .context("the node says where it listens")?
        .trim_end_matches('/')
        .to_string();
    Ok(Node {
        child,
        address,
        home: home.to_path_buf(),
    })
}

fn caremesh(args: &[&str]) -> Result<String> {
    let output = Command::new(caremesh_binary()?).args(args).output()?;
    if !output.status.success() {
        bail!(
            "caremesh {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).to_string())
}

/// The generated extract's Patient resource of each patient, by NHS number.
fn patients(home: &Path, count: u64) -> Result<Vec<(String, Value)>> {
    let extract = home.join("bench-extract");
    caremesh(&[
        "generate",
        "--org",
        "A81001",
        "--patients",
        &count.to_string(),
        "--seed",
        "1",
        "--out",
        extract.to_str().context("path")?,
    ])?;
    let mut patients = Vec::new();
    for file in std::fs::read_dir(&extract)? {
        let bundle: Value = serde_json::from_slice(&std::fs::read(file?.path())?)?;
        for entry in bundle["entry"].as_array().into_iter().flatten() {
            let resource = &entry["resource"];
            if resource["resourceType"] == "Patient" {
                let nhs = resource["identifier"][0]["value"]
                    .as_str()
                    .context("an NHS number")?
                    .to_string();
                patients.push((nhs, resource.clone()));
            }
        }
    }
    std::fs::remove_dir_all(&extract)?;
    patients.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(patients)
}

/// Ingests change `number` (a new Observation) for `patient` into the running node, and says
/// when the node had committed it.
fn change(node: &Node, number: usize, patient: &Value) -> Result<Instant> {
    let file = node.home.join(format!("bench-change-{number}.json"));
    let id = patient["id"].as_str().context("a Patient id")?;
    std::fs::write(
        &file,
        json!({"resourceType": "Bundle", "type": "collection", "entry": [
            {"resource": patient},
            {"resource": {"resourceType": "Observation", "id": format!("bench-change-{number}"),
                "status": "final", "subject": {"reference": format!("Patient/{id}")},
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "27113001", "display": "Body weight"}]},
                "effectiveDateTime": "2026-12-01T09:00:00Z",
                "valueQuantity": {"value": 70 + number % 20, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"}}},
        ]})
        .to_string(),
    )?;
    caremesh(&[
        "ingest",
        "--dir",
        node.home.to_str().context("path")?,
        file.to_str().context("path")?,
    ])?;
    Ok(Instant::now())
}

/// Waits for `expected` notifications naming change `number`; their latencies from
/// `committed`, in microseconds.
fn latencies(
    received: &mpsc::Receiver<Delivery>,
    number: usize,
    expected: usize,
    committed: Instant,
    early: &mut HashMap<usize, Vec<Instant>>,
) -> Result<Vec<u32>> {
    let mut arrivals = early.remove(&number).unwrap_or_default();
    let deadline = Instant::now() + WAIT;
    while arrivals.len() < expected {
        let left = deadline.saturating_duration_since(Instant::now());
        let delivery = received.recv_timeout(left).with_context(|| {
            format!(
                "change {number}: {} of {expected} notifications within {WAIT:?}",
                arrivals.len()
            )
        })?;
        for change in delivery.changes {
            if change == number {
                arrivals.push(delivery.at);
            } else {
                early.entry(change).or_default().push(delivery.at);
            }
        }
    }
    Ok(arrivals
        .iter()
        .map(|at| at.saturating_duration_since(committed).as_micros() as u32)
        .collect())
}

struct Phase {
    name: String,
    each: Vec<u32>,
    last: Vec<u32>,
    cpu_per_change: f64,
}

fn report(phase: &Phase) {
    let (p50, p99, max) = percentiles(phase.each.clone());
    println!(
        "{:<44} {:>6} notifications: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms; node CPU {:.1} ms per change",
        phase.name,
        phase.each.len(),
        phase.cpu_per_change * 1000.0
    );
    if phase.last.len() != phase.each.len() {
        let (p50, p99, max) = percentiles(phase.last.clone());
        println!(
            "{:<44} {:>6} changes, to the last notification: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms",
            "",
            phase.last.len()
        );
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.subscriptions >= 1 && args.patients as usize >= args.subscriptions);
    let temp = tempfile::tempdir()?;
    let work = args
        .work
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    let home = practice_of(
        &work.join("gp"),
        OdsCode::parse("A81001")?,
        args.patients,
        1,
    )?;
    let patients = patients(&home, args.patients)?;
    let node = start_node(&home)?;
    let pid = node.child.id();
    let token = caremesh(&[
        "api-token",
        "--dir",
        home.to_str().context("path")?,
        "--client",
        "notify-bench",
    ])?
    .lines()
    .last()
    .context("a token")?
    .trim()
    .to_string();
    let (url, received) = endpoint()?;
    // The operator allows the client its endpoint's origin, as an integrator's would.
    caremesh(&[
        "api-client",
        "notify-to",
        "--dir",
        home.to_str().context("path")?,
        "--id",
        "notify-bench",
        url.trim_end_matches("/hook"),
    ])?;
    let mut early = HashMap::new();
    let mut number = 0;
    let mut phases = Vec::new();

    let mut run_phase = |name: String,
                         targets: &[usize],
                         fan_out: usize,
                         early: &mut HashMap<usize, Vec<Instant>>|
     -> Result<Phase> {
        let cpu = cpu_seconds(pid);
        let (mut each, mut last) = (Vec::new(), Vec::new());
        for i in 0..args.changes {
            number += 1;
            let patient = &patients[targets[i % targets.len()]].1;
            let committed = change(&node, number, patient)?;
            if fan_out == 0 {
                continue;
            }
            let mut got = latencies(&received, number, fan_out, committed, early)?;
            got.sort_unstable();
            last.push(*got.last().expect("at least one"));
            each.extend(got);
        }
        Ok(Phase {
            name,
            each,
            last,
            cpu_per_change: (cpu_seconds(pid) - cpu) / args.changes as f64,
        })
    };

    phases.push(run_phase(
        "0. no subscription (baseline)".into(),
        &[0],
        0,
        &mut early,
    )?);
    let first = subscribe(&node.address, &token, &url, &patients[0].0, "full-resource")?;
    await_handshakes(&received, 1)?;
    phases.push(run_phase(
        "1. one subscription".into(),
        &[0],
        1,
        &mut early,
    )?);
    let mut made = vec![first];
    for (k, (nhs, _)) in patients.iter().enumerate().take(args.subscriptions).skip(1) {
        let payload = if k % 2 == 0 {
            "full-resource"
        } else {
            "id-only"
        };
        made.push(subscribe(&node.address, &token, &url, nhs, payload)?);
    }
    await_handshakes(&received, args.subscriptions - 1)?;
    let spread: Vec<usize> = (0..args.subscriptions).collect();
    phases.push(run_phase(
        format!("2. {} subscriptions, one patient each", args.subscriptions),
        &spread,
        1,
        &mut early,
    )?);
    for id in &made {
        let (status, body) = http(
            &node.address,
            "DELETE",
            &format!("/fhir/Subscription/{id}"),
            &token,
            "",
        )?;
        ensure!(status == 200, "ending a subscription: {status} {body}");
    }
    for k in 0..args.subscriptions {
        let payload = if k % 2 == 0 {
            "full-resource"
        } else {
            "id-only"
        };
        subscribe(&node.address, &token, &url, &patients[0].0, payload)?;
    }
    await_handshakes(&received, args.subscriptions)?;
    phases.push(run_phase(
        format!("3. {} subscriptions to one patient", args.subscriptions),
        &[0],
        args.subscriptions,
        &mut early,
    )?);
    println!(
        "notify-bench: {} patients, {} changes per phase, node {}",
        args.patients, args.changes, node.address
    );
    for phase in &phases {
        report(phase);
    }
    Ok(())
}

fn await_handshakes(received: &mpsc::Receiver<Delivery>, count: usize) -> Result<()> {
    let mut seen = 0;
    while seen < count {
        let delivery = received
            .recv_timeout(WAIT)
            .with_context(|| format!("{seen} of {count} handshakes"))?;
        if delivery.kind == "handshake" {
            seen += 1;
        }
    }
    Ok(())
}
