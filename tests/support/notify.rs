//! A client's side of the FHIR API's change notifications: a rest-hook endpoint (a real
//! HTTP listener) and the Subscription resources the tests post.

use super::{HttpResponse, http_request_raw, run, stderr};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

pub const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition";
pub const TOPIC: &str = "urn:caremesh:subscription-topic:patient-record";

/// A notification as the endpoint received it.
pub struct Received {
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub bundle: Value,
}

/// A client's rest-hook endpoint: takes each POST, answers 503 to the next `refuse` of them
/// and 200 to the rest, and hands every one received (refused or not) to the test.
pub struct Endpoint {
    pub url: String,
    pub refuse: Arc<AtomicUsize>,
    received: mpsc::Receiver<Received>,
}

impl Endpoint {
    pub fn start() -> Endpoint {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let refuse = Arc::new(AtomicUsize::new(0));
        let (sender, received) = mpsc::channel();
        let refusing = refuse.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut headers = Vec::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':') {
                        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
                    }
                }
                let header = |name: &str| {
                    headers
                        .iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, v)| v.clone())
                };
                let length: usize = header("content-length")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                let refused = refusing
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                let status = if refused {
                    "503 Service Unavailable"
                } else {
                    "200 OK"
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = sender.send(Received {
                    authorization: header("authorization"),
                    content_type: header("content-type"),
                    bundle: serde_json::from_slice(&body).unwrap_or(Value::Null),
                });
            }
        });
        Endpoint {
            url,
            refuse,
            received,
        }
    }

    /// The endpoint's origin, as an operator allows it.
    pub fn origin(&self) -> &str {
        self.url.trim_end_matches("/hook")
    }

    pub fn next(&self, within: Duration) -> Option<Received> {
        self.received.recv_timeout(within).ok()
    }
}

/// Allows `client` of the node in `dir` to be notified at `endpoints` and nowhere else, as
/// its operator would (`caremesh api-client notify-to`): without it, the client may not
/// subscribe. Prints what the command said.
pub fn allow(dir: &Path, client: &str, endpoints: &[&Endpoint]) -> String {
    let dir = dir.to_str().unwrap();
    let mut args = vec!["api-client", "notify-to", "--dir", dir, "--id", client];
    args.extend(endpoints.iter().map(|e| e.origin()));
    let output = run(&args);
    assert!(
        output.status.success(),
        "api-client notify-to failed: {}",
        stderr(&output)
    );
    super::stdout(&output)
}

pub fn post_json(address: &str, path: &str, token: &str, body: &Value) -> HttpResponse {
    let body = body.to_string();
    let authorization = format!("Bearer {token}");
    http_request_raw(
        address,
        "POST",
        path,
        &[
            ("Authorization", authorization.as_str()),
            ("Content-Type", "application/fhir+json"),
        ],
        &body,
    )
}

/// A Subscription to `endpoint` for the patient `filter` names (every patient when `None`).
pub fn subscription_to(endpoint: &Endpoint, filter: Option<&str>, payload: &str) -> Value {
    let mut subscription = json!({
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "Tell the ward system when the patient's shared record changes",
        "criteria": TOPIC,
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint.url,
            "payload": "application/fhir+json",
            "_payload": {"extension": [{"url": format!("{BACKPORT}/backport-payload-content"), "valueCode": payload}]},
            "header": ["Authorization: Bearer hook-secret"],
            "extension": [{"url": format!("{BACKPORT}/backport-heartbeat-period"), "valueUnsignedInt": 10}],
        },
    });
    if let Some(filter) = filter {
        subscription["_criteria"] = json!({"extension": [{
            "url": format!("{BACKPORT}/backport-filter-criteria"),
            "valueString": filter,
        }]});
    }
    subscription
}
