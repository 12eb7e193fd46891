//! The view and the FHIR API over HTTPS, as a real node process serves them to a TLS client
//! that trusts only the organisation's certificate authority: the session cookie is
//! `Secure`, plain HTTP gets no page, a renewed certificate is served without a restart, and
//! plain HTTP where other machines can reach it is refused unless the operator asked for it.

mod support;

use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use support::*;

const PATIENT: &str = "9912003888";

/// The organisation's certificate authority, as its IT department would run one.
struct Authority {
    certificate: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Authority {
    fn new() -> Authority {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Test Trust Issuing CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let certificate = params.self_signed(&key).unwrap();
        Authority {
            certificate,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A server certificate for localhost and 127.0.0.1, written as the operator would keep
    /// it: the certificate followed by the issuer's, and the key readable by its owner only.
    fn issue(&self, certificate: &Path, key: &Path) -> CertificateDer<'static> {
        let params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        let server_key = rcgen::KeyPair::generate().unwrap();
        let issued = params.signed_by(&server_key, &self.issuer).unwrap();
        std::fs::write(
            certificate,
            format!("{}{}", issued.pem(), self.certificate.pem()),
        )
        .unwrap();
        std::fs::write(key, server_key.serialize_pem()).unwrap();
        std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600)).unwrap();
        issued.der().clone()
    }

    /// A TLS client that trusts this authority and nothing else. It resumes no session, so
    /// that every connection sees the certificate the server presents now.
    fn client(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.certificate.der().clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.resumption = rustls::client::Resumption::disabled();
        Arc::new(config)
    }
}

/// One HTTPS request to `address` as `localhost`: the response and the certificate the
/// server presented.
fn https_request(
    client: &Arc<rustls::ClientConfig>,
    address: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (HttpResponse, CertificateDer<'static>) {
    let port = address.rsplit(':').next().unwrap();
    let mut connection =
        rustls::ClientConnection::new(client.clone(), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let mut socket = TcpStream::connect(address).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut tls = rustls::Stream::new(&mut connection, &mut socket);
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\nContent-Length: 0\r\n"
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    tls.write_all(head.as_bytes())
        .expect("the TLS handshake and request");
    let mut response = Vec::new();
    // The server closes after answering (Connection: close); a close without close_notify
    // after the whole answer is not this test's concern.
    if let Err(error) = tls.read_to_end(&mut response) {
        assert_eq!(
            error.kind(),
            std::io::ErrorKind::UnexpectedEof,
            "reading the answer: {error}"
        );
    }
    let presented = connection.peer_certificates().unwrap()[0].clone();
    (parse_http_response(&response), presented.into_owned())
}

/// `caremesh init` of a practice whose view listens on `listen`, with `extra` flags.
fn init_listening(home: &Path, listen: &str, extra: &[&str]) -> std::process::Output {
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
        listen,
        "--unencrypted",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

/// `caremesh init` serving HTTPS on loopback with `pki`'s view.crt and view.key.
fn init_https(home: &Path, pki: &Path) -> std::process::Output {
    let certificate = pki.join("view.crt");
    let key = pki.join("view.key");
    init_listening(
        home,
        "127.0.0.1:0",
        &[
            "--tls-certificate",
            certificate.to_str().unwrap(),
            "--tls-private-key",
            key.to_str().unwrap(),
        ],
    )
}

fn one_patient(dir: &Path, home: &Path) {
    let extract = dir.join("extract.json");
    write_json(
        &extract,
        &json!({"resourceType": "Bundle", "type": "collection", "entry": [
            {"resource": {"resourceType": "Patient", "id": "p1",
                "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": PATIENT}],
                "name": [{"family": "SMITH", "given": ["Test"]}], "birthDate": "1970-09-11"}},
            {"resource": {"resourceType": "AllergyIntolerance", "id": "a1",
                "patient": {"reference": "Patient/p1"},
                "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}]},
                "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "code": "confirmed"}]},
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "764146007", "display": "Penicillin"}]},
                "recordedDate": "2020-05-01"}}
        ]}),
    );
    let output = ingest(home, &[extract.to_str().unwrap()]);
    assert!(output.status.success(), "ingest: {}", stderr(&output));
}

fn pki(dir: &Path) -> PathBuf {
    let pki = dir.join("pki");
    std::fs::create_dir(&pki).unwrap();
    pki
}

#[test]
fn the_view_and_the_fhir_api_are_served_over_https_only_with_a_secure_session() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let authority = Authority::new();
    let served_certificate = authority.issue(&pki.join("view.crt"), &pki.join("view.key"));
    let home = dir.path().join("node");
    let made = init_https(&home, &pki);
    assert!(made.status.success(), "init: {}", stderr(&made));
    assert!(
        stdout(&made).contains("view: https://127.0.0.1:0/ with the certificate in"),
        "init says how the view is served: {}",
        stdout(&made)
    );
    one_patient(dir.path(), &home);
    let node = RunningNode::start(&home);
    assert!(node.https, "the node serves HTTPS");
    let client = authority.client();

    // The FHIR API: its URLs are https, and browsers are told to stay on HTTPS.
    let (metadata, presented) = https_request(&client, &node.address, "GET", "/fhir/metadata", &[]);
    assert_eq!(metadata.status, 200, "{}", metadata.body);
    assert_eq!(presented, served_certificate);
    assert_eq!(
        metadata.header("strict-transport-security"),
        Some("max-age=31536000")
    );
    let token = api_token(&home, &["--client", "ward-app"]);
    let authorization = format!("Bearer {token}");
    let (everything, _) = https_request(
        &client,
        &node.address,
        "GET",
        &format!("/fhir/Patient/{PATIENT}/$everything"),
        &[("Authorization", &authorization)],
    );
    assert_eq!(everything.status, 200, "{}", everything.body);
    let bundle: serde_json::Value = serde_json::from_str(&everything.body).unwrap();
    let port = node.address.rsplit(':').next().unwrap();
    for entry in bundle["entry"].as_array().unwrap() {
        let full_url = entry["fullUrl"].as_str().unwrap();
        assert!(
            full_url.starts_with(&format!("https://localhost:{port}/fhir/")),
            "{full_url}"
        );
    }
    assert!(everything.body.contains("Penicillin"));

    // The page: `caremesh launch` makes an https link, and the session cookie is Secure.
    let launched = run(&[
        "launch",
        "--dir",
        home.to_str().unwrap(),
        "--user",
        "C0001",
        "--name",
        "Dr Test Clinician",
        "--nhs",
        PATIENT,
    ]);
    assert!(launched.status.success(), "{}", stderr(&launched));
    let url = stdout(&launched).trim().to_string();
    assert!(
        url.starts_with("https://127.0.0.1:0/launch?token="),
        "{url}"
    );
    let path = &url[url.find("/launch").unwrap()..];
    let (landing, _) = https_request(&client, &node.address, "GET", path, &[]);
    assert_eq!(landing.status, 303, "{}", landing.body);
    let cookie_header = landing.header("set-cookie").unwrap().to_string();
    let attributes: Vec<&str> = cookie_header.split("; ").collect();
    assert!(attributes.contains(&"Secure"), "{cookie_header}");
    assert!(attributes.contains(&"HttpOnly"), "{cookie_header}");
    let cookie = attributes[0];
    let (page, _) = https_request(
        &client,
        &node.address,
        "GET",
        &format!("/patients/{PATIENT}"),
        &[("Cookie", cookie)],
    );
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("Penicillin"), "the record over HTTPS");

    // Plain HTTP to the HTTPS port gets no page (nor a redirect that would carry the path).
    let mut plain = TcpStream::connect(&node.address).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // The server may close the connection before the request is all written: the write then
    // fails with a reset, which is the refusal this checks for.
    let _ = write!(
        plain,
        "GET /patients/{PATIENT} HTTP/1.1\r\nHost: localhost\r\nCookie: {cookie}\r\n\r\n"
    );
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !String::from_utf8_lossy(&answer).contains("HTTP/1."),
        "plain HTTP was answered: {:?}",
        String::from_utf8_lossy(&answer)
    );
    // And the view still serves HTTPS after it.
    let (health, _) = https_request(&client, &node.address, "GET", "/health", &[]);
    assert_eq!(health.status, 200);

    // curl, as the README's examples use it with the organisation's CA, and its cookie jar
    // (whose fourth field is TRUE for a cookie sent only over HTTPS).
    let authority_file = pki.join("authority.pem");
    std::fs::write(&authority_file, authority.certificate.pem()).unwrap();
    let jar = dir.path().join("cookies.txt");
    let relaunched = run(&[
        "launch",
        "--dir",
        home.to_str().unwrap(),
        "--user",
        "C0002",
        "--name",
        "Dr Curl",
        "--nhs",
        PATIENT,
        "--base",
        &format!("https://localhost:{port}"),
    ]);
    assert!(relaunched.status.success(), "{}", stderr(&relaunched));
    let curl = |args: &[&str]| {
        let output = std::process::Command::new("curl")
            .args([
                "-sS",
                "--fail",
                "--cacert",
                authority_file.to_str().unwrap(),
            ])
            .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
            .args(args)
            .output()
            .expect("curl runs (install curl)");
        assert!(
            output.status.success(),
            "curl {args:?}: {}",
            stderr(&output)
        );
        stdout(&output)
    };
    let page = curl(&[
        "-L",
        "-c",
        jar.to_str().unwrap(),
        stdout(&relaunched).trim(),
    ]);
    assert!(
        page.contains("Penicillin"),
        "curl followed the launch to the record"
    );
    let jar_text = std::fs::read_to_string(&jar).unwrap();
    let session = jar_text
        .lines()
        .find(|line| line.contains("caremesh_session"))
        .unwrap_or_else(|| panic!("no session cookie in curl's jar: {jar_text}"));
    assert_eq!(
        session.split('\t').nth(3),
        Some("TRUE"),
        "curl keeps the session for HTTPS only: {session}"
    );
    let metadata = curl(&[&format!("https://localhost:{port}/fhir/metadata")]);
    assert!(metadata.contains("CapabilityStatement"));
}

#[test]
fn a_renewed_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let authority = Authority::new();
    let certificate = pki.join("view.crt");
    let key = pki.join("view.key");
    let first = authority.issue(&certificate, &key);
    let home = dir.path().join("node");
    let made = init_https(&home, &pki);
    assert!(made.status.success(), "init: {}", stderr(&made));
    let node = RunningNode::start(&home);
    let client = authority.client();
    let (_, presented) = https_request(&client, &node.address, "GET", "/health", &[]);
    assert_eq!(presented, first);

    // Renewed in place, as certbot or the IT department's tooling would.
    let renewed = authority.issue(&certificate, &key);
    assert_ne!(renewed, first);
    let served_renewed = wait_for(Duration::from_secs(60), || {
        https_request(&client, &node.address, "GET", "/health", &[]).1 == renewed
    });
    assert!(served_renewed, "the renewed certificate is served");
}

#[test]
fn plain_http_beyond_loopback_and_bad_certificates_are_refused_before_anything_is_made() {
    let dir = tempfile::tempdir().unwrap();

    // Every interface without TLS: refused, saying how to do it, and nothing made.
    let home = dir.path().join("everywhere");
    let refused = init_listening(&home, "0.0.0.0:7800", &[]);
    assert!(!refused.status.success());
    let message = stderr(&refused);
    assert!(
        message.contains("plain HTTP on 0.0.0.0:7800") && message.contains("--tls-certificate"),
        "{message}"
    );
    assert!(!home.exists(), "a refused init makes no home");

    // Asked for in as many words: made, and init says what it means.
    let made = init_listening(&home, "0.0.0.0:7800", &["--plain-http-beyond-loopback"]);
    assert!(made.status.success(), "{}", stderr(&made));
    assert!(stdout(&made).contains("plain HTTP beyond loopback, as asked"));

    // A loopback home run on another address: refused at start, before listening.
    let loopback = dir.path().join("loopback");
    let made = init_listening(&loopback, "127.0.0.1:0", &[]);
    assert!(made.status.success(), "{}", stderr(&made));
    assert!(stdout(&made).contains("on loopback only"));
    let started = run(&[
        "run",
        "--dir",
        loopback.to_str().unwrap(),
        "--listen",
        "0.0.0.0:0",
    ]);
    assert!(!started.status.success());
    assert!(
        stderr(&started).contains("plain HTTP on 0.0.0.0:0"),
        "{}",
        stderr(&started)
    );

    // A key that is not the certificate's, and a key every account may read: refused by
    // name, and nothing made.
    let pki = pki(dir.path());
    let authority = Authority::new();
    authority.issue(&pki.join("view.crt"), &pki.join("view.key"));
    authority.issue(&pki.join("other.crt"), &pki.join("other.key"));
    std::fs::rename(pki.join("other.key"), pki.join("view.key")).unwrap();
    let mismatched = dir.path().join("mismatched");
    let refused = init_https(&mismatched, &pki);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("is not the key of the certificate"),
        "{}",
        stderr(&refused)
    );
    assert!(!mismatched.exists());
    authority.issue(&pki.join("view.crt"), &pki.join("view.key"));
    std::fs::set_permissions(pki.join("view.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = init_https(&mismatched, &pki);
    assert!(
        stderr(&refused).contains("may be read by every account"),
        "{}",
        stderr(&refused)
    );
    assert!(!mismatched.exists());
}
