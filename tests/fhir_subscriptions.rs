//! The FHIR API's change notifications over real processes: a GP ingests a change, the hub
//! relays it over QUIC, and the hospital's node posts a Subscriptions Backport notification
//! to a client's endpoint (a real HTTP listener here), retrying what the endpoint refused.

mod support;

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::notify::{Endpoint, TOPIC, allow, post_json, subscription_to};
use support::region::{Region, ingest_generated};
use support::*;

const SYNC_WAIT: Duration = Duration::from_secs(60);

/// The notification's status parameters (`Parameters`, entry 0) by name.
fn status(bundle: &Value) -> Vec<(String, Value)> {
    bundle["entry"][0]["resource"]["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_string(), p.clone()))
        .collect()
}

fn status_value(bundle: &Value, name: &str, field: &str) -> Value {
    status(bundle)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, p)| p[field].clone())
        .unwrap_or(Value::Null)
}

fn event_numbers(bundle: &Value) -> Vec<String> {
    status(bundle)
        .into_iter()
        .filter(|(n, _)| n == "notification-event")
        .map(|(_, p)| {
            p["part"]
                .as_array()
                .unwrap()
                .iter()
                .find(|part| part["name"] == "event-number")
                .unwrap()["valueString"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// A new allergy for the GP's patient `nhs`, as the GP's next extract would carry it.
fn gp_allergy_extract(gp: &Path, nhs: &str, out: &Path) {
    let extract = gp.with_extension("extract-1");
    let patient = std::fs::read_dir(&extract)
        .unwrap()
        .map(|file| {
            serde_json::from_slice::<Value>(&std::fs::read(file.unwrap().path()).unwrap()).unwrap()
        })
        .flat_map(|bundle| bundle["entry"].as_array().unwrap().clone())
        .map(|entry| entry["resource"].clone())
        .find(|resource| {
            resource["resourceType"] == "Patient" && resource.to_string().contains(nhs)
        })
        .expect("the GP's extract holds the patient");
    let id = patient["id"].as_str().unwrap().to_string();
    write_json(
        out,
        &json!({"resourceType": "Bundle", "type": "collection", "entry": [
            {"resource": patient},
            {"resource": {"resourceType": "AllergyIntolerance", "id": "notified-allergy-1",
                "patient": {"reference": format!("Patient/{id}")},
                "meta": {"lastUpdated": "2026-11-30T09:00:00Z"},
                "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}]},
                "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "code": "confirmed"}]},
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "294505008", "display": "Allergy to amoxicillin"}]},
                "recordedDate": "2026-11-30"}},
        ]}),
    );
}

#[test]
fn a_change_ingested_at_the_gp_is_notified_by_the_hospital_node_and_retried_until_taken() {
    let temp = tempfile::tempdir().unwrap();
    let region = Region::new(temp.path());
    let hub = region.registered("HUB01", "hub", true, &[]);
    let gp = region.registered("A81001", "gp", false, &["HUB01"]);
    let acute = region.registered("RTH01", "acute", false, &["HUB01"]);
    region.publish(&[&hub, &gp, &acute]);
    ingest_generated(&gp, "A81001", 6, 1);
    ingest_generated(&acute, "RTH01", 2, 1);
    let _hub_process = RunningNode::start(&hub);
    let _gp_process = RunningNode::start(&gp);
    let acute_process = RunningNode::start(&acute);
    let address = acute_process.address.clone();

    // The hospital's patient, whose GP data it receives.
    let patients = caseload(&acute, "RTH01");
    let (nhs, no_share_in) = (patients[0].clone(), patients[1].clone());
    let token = api_token(&acute, &["--client", "ward-system"]);
    let gp_data_arrived = wait_for(SYNC_WAIT, || {
        fhir_get(
            &address,
            &format!("/fhir/AllergyIntolerance?patient={nhs}"),
            Some(&token),
        )
        .body
        .contains("A81001")
            || fhir_get(
                &address,
                &format!("/fhir/Patient/{nhs}/$everything"),
                Some(&token),
            )
            .body
            .contains("ods-organization-code/A81001")
    });
    assert!(gp_data_arrived, "the GP's data reaches the hospital first");

    let endpoint = Endpoint::start();
    let everyone = Endpoint::start();
    allow(&acute, "ward-system", &[&endpoint, &everyone]);
    let subscription = subscription_to(
        &endpoint,
        Some(&format!("Patient?_id={nhs}")),
        "full-resource",
    );
    let made = post_json(&address, "/fhir/Subscription", &token, &subscription);
    assert_eq!(made.status, 201, "{}", made.body);
    let made: Value = serde_json::from_str(&made.body).unwrap();
    let id = made["id"].as_str().unwrap().to_string();
    assert_eq!(made["status"], "requested");
    assert_eq!(
        made["channel"]["header"][0], "Authorization: (not shown)",
        "the client's credential is not shown again"
    );

    // The handshake, with the client's own header.
    let handshake = endpoint.next(SYNC_WAIT).expect("a handshake");
    assert_eq!(
        status_value(&handshake.bundle, "type", "valueCode"),
        "handshake"
    );
    assert_eq!(
        handshake.authorization.as_deref(),
        Some("Bearer hook-secret")
    );
    assert!(
        handshake
            .content_type
            .as_deref()
            .is_some_and(|t| t.starts_with("application/fhir+json")),
        "{:?}",
        handshake.content_type
    );
    assert_eq!(handshake.bundle["type"], "history");

    // A second client follows every patient the hospital may see. The hospital's second
    // patient has no Share In recorded there: the GP's data about them is held but not
    // shown, so a change to it is no event for anyone here.
    let made_for_everyone = post_json(
        &address,
        "/fhir/Subscription",
        &token,
        &subscription_to(&everyone, None, "id-only"),
    );
    assert_eq!(made_for_everyone.status, 201, "{}", made_for_everyone.body);
    assert!(everyone.next(SYNC_WAIT).is_some(), "a handshake");
    let output = run(&[
        "consent",
        "set",
        "--dir",
        acute.to_str().unwrap(),
        "--nhs",
        &no_share_in,
        "--share-in",
        "off",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));

    // The GP records a new allergy for each; the hub relays them; the hospital's node tells
    // the clients. The endpoint refuses the first notification: it comes again, nothing lost.
    endpoint.refuse.store(1, Ordering::SeqCst);
    let before = newest_from(&acute, "A81001", &no_share_in);
    let change = temp.path().join("gp-change.json");
    gp_allergy_extract(&gp, &nhs, &change);
    let hidden_change = temp.path().join("gp-change-hidden.json");
    gp_allergy_extract(&gp, &no_share_in, &hidden_change);
    let output = ingest(
        &gp,
        &[change.to_str().unwrap(), hidden_change.to_str().unwrap()],
    );
    assert!(output.status.success(), "{}", stderr(&output));

    let mut notifications = Vec::new();
    let took = wait_for(SYNC_WAIT, || {
        while let Some(received) = endpoint.next(Duration::from_millis(200)) {
            notifications.push(received.bundle);
        }
        notifications
            .iter()
            .filter(|b| b.to_string().contains("294505008"))
            .count()
            >= 2
    });
    assert!(
        took,
        "the allergy was notified, refused and notified again: {notifications:#?}"
    );
    let allergy_notifications: Vec<&Value> = notifications
        .iter()
        .filter(|b| b.to_string().contains("294505008"))
        .collect();
    let (refused, taken) = (allergy_notifications[0], allergy_notifications[1]);
    assert_eq!(
        event_numbers(refused),
        event_numbers(taken),
        "the retry carries the same events"
    );
    assert_eq!(
        status_value(taken, "type", "valueCode"),
        "event-notification"
    );
    assert_eq!(status_value(taken, "topic", "valueCanonical"), TOPIC);
    let entries = taken["entry"].as_array().unwrap();
    let allergy = entries
        .iter()
        .map(|e| &e["resource"])
        .find(|r| r["resourceType"] == "AllergyIntolerance" && r.to_string().contains("294505008"))
        .expect("the allergy itself, in a full-resource notification");
    assert!(
        allergy["meta"]["source"]
            .as_str()
            .unwrap_or("")
            .contains("A81001"),
        "its publisher is named: {allergy}"
    );
    assert!(
        entries
            .iter()
            .any(|e| e["resource"]["resourceType"] == "Patient"),
        "the focus patient is in the bundle"
    );
    let focus = status(taken)
        .into_iter()
        .find(|(n, _)| n == "notification-event")
        .unwrap()
        .1["part"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "focus")
        .unwrap()["valueReference"]["reference"]
        .clone();
    assert!(
        focus
            .as_str()
            .unwrap()
            .ends_with(&format!("/Patient/{nhs}")),
        "{focus}"
    );

    // The hidden patient's change reached the hospital, and was told to nobody.
    assert!(
        wait_for(SYNC_WAIT, || newest_from(&acute, "A81001", &no_share_in)
            > before),
        "the change about the patient without Share In reached the hospital"
    );
    let mut told_everyone = Vec::new();
    let told_first = wait_for(SYNC_WAIT, || {
        while let Some(received) = everyone.next(Duration::from_millis(200)) {
            told_everyone.push(received.bundle.to_string());
        }
        told_everyone
            .iter()
            .any(|b| b.contains(&format!("/Patient/{nhs}")))
    });
    assert!(told_first, "{told_everyone:#?}");
    std::thread::sleep(Duration::from_secs(3));
    while let Some(received) = everyone.next(Duration::from_millis(200)) {
        told_everyone.push(received.bundle.to_string());
    }
    assert!(
        told_everyone.iter().all(|b| !b.contains(&no_share_in)),
        "a change to data the client may not see is never told: {told_everyone:#?}"
    );
    // Nor is it an event without a patient: no sign of what was withheld.
    for bundle in &told_everyone {
        let bundle: Value = serde_json::from_str(bundle).unwrap();
        for (name, event) in status(&bundle) {
            if name == "notification-event" {
                assert!(
                    event["part"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|p| p["name"] == "focus"),
                    "{bundle:#}"
                );
            }
        }
    }
    assert!(
        told_everyone.iter().all(|b| !b.contains("294505008")),
        "an id-only notification carries no clinical content"
    );
    // What an id-only notification names, the client reads.
    let named = told_everyone
        .iter()
        .find_map(|b| {
            let at = b.find("/fhir/AllergyIntolerance/A81001-notified-allergy-1")?;
            Some(b[at..].split('"').next()?.to_string())
        })
        .expect("the new allergy is named");
    let read = fhir_get(&address, &named, Some(&token));
    assert_eq!(read.status, 200, "{}", read.body);
    assert!(read.body.contains("294505008"), "{}", read.body);

    // $status says how many events there have been.
    let answered = fhir_get(
        &address,
        &format!("/fhir/Subscription/{id}/$status"),
        Some(&token),
    );
    assert_eq!(answered.status, 200, "{}", answered.body);
    let answered: Value = serde_json::from_str(&answered.body).unwrap();
    let since_start: u64 = answered["entry"][0]["resource"]["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "events-since-subscription-start")
        .unwrap()["valueString"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(since_start >= 1, "{answered}");
    // Another client does not see it.
    let other = api_token(&acute, &["--client", "other-system"]);
    assert_eq!(
        fhir_get(&address, &format!("/fhir/Subscription/{id}"), Some(&other)).status,
        404
    );

    // With nothing to tell, a heartbeat within its period.
    let heartbeat = wait_for(Duration::from_secs(30), || {
        endpoint
            .next(Duration::from_millis(500))
            .is_some_and(|r| status_value(&r.bundle, "type", "valueCode") == "heartbeat")
    });
    assert!(heartbeat, "a heartbeat");

    // Every notification naming the patient is in the audit trail, as a read is.
    let audit = run(&[
        "audit",
        "report",
        "--dir",
        acute.to_str().unwrap(),
        "--patient",
        &nhs,
        "--format",
        "json",
    ]);
    assert!(audit.status.success(), "{}", stderr(&audit));
    assert!(stdout(&audit).contains("fhir-notify"), "{}", stdout(&audit));

    // Ended: nothing more is sent.
    let ended = http_request_raw(
        &address,
        "DELETE",
        &format!("/fhir/Subscription/{id}"),
        &[("Authorization", &format!("Bearer {token}"))],
        "",
    );
    assert_eq!(ended.status, 200, "{}", ended.body);
    while endpoint.next(Duration::from_millis(100)).is_some() {}
    let again = temp.path().join("gp-change-2.json");
    gp_allergy_extract(&gp, &nhs, &again);
    let text = std::fs::read_to_string(&again)
        .unwrap()
        .replace("2026-11-30", "2026-12-01")
        .replace("notified-allergy-1", "notified-allergy-2");
    std::fs::write(&again, text).unwrap();
    let output = ingest(&gp, &[again.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        endpoint.next(Duration::from_secs(8)).is_none(),
        "an ended subscription is told nothing"
    );
}

/// Every notification the endpoint received until one carries `code` and was taken (the
/// endpoint refuses while `refuse` is above zero), in order; `None` when none came in time.
fn until_taken_with(endpoint: &Endpoint, code: &str) -> Option<Vec<Value>> {
    let mut received = Vec::new();
    let came = wait_for(SYNC_WAIT, || {
        while let Some(notification) = endpoint.next(Duration::from_millis(200)) {
            let taken = endpoint.refuse.load(Ordering::SeqCst) == 0
                && notification.bundle.to_string().contains(code);
            received.push(notification.bundle);
            if taken {
                return true;
            }
        }
        false
    });
    came.then_some(received)
}

/// The durable delivery queue across crashes: a notification waiting for an endpoint that
/// refuses it survives the node being killed (SIGKILL, no shutdown) and is delivered after
/// the restart with the same event numbers; and a change committed while the node was down
/// (ingested from the command line with no node running) is notified once it is back.
#[test]
fn notifications_waiting_or_not_yet_filed_survive_the_node_being_killed() {
    let temp = tempfile::tempdir().unwrap();
    let (gp, nhs) = one_gp(temp.path());
    let mut node = RunningNode::start(&gp);
    let token = api_token(&gp, &["--client", "ward-system"]);
    let endpoint = Endpoint::start();
    allow(&gp, "ward-system", &[&endpoint]);
    let made = post_json(
        &node.address,
        "/fhir/Subscription",
        &token,
        &subscription_to(
            &endpoint,
            Some(&format!("Patient?_id={nhs}")),
            "full-resource",
        ),
    );
    assert_eq!(made.status, 201, "{}", made.body);
    let handshake = endpoint.next(SYNC_WAIT).expect("a handshake");
    assert_eq!(
        status_value(&handshake.bundle, "type", "valueCode"),
        "handshake"
    );

    // The endpoint is down; a change is filed and waits; the node is killed.
    endpoint.refuse.store(usize::MAX, Ordering::SeqCst);
    let change = temp.path().join("gp-change.json");
    gp_allergy_extract(&gp, &nhs, &change);
    let output = ingest(&gp, &[change.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let refused = wait_for(SYNC_WAIT, || {
        endpoint
            .next(Duration::from_millis(200))
            .is_some_and(|n| n.bundle.to_string().contains("294505008"))
    });
    assert!(
        refused,
        "the change was posted (and refused) before the kill"
    );
    node.kill_hard();
    let waiting = || {
        let store = caremesh_storage::Store::open_read_only(&gp.join("node.db")).unwrap();
        let id = store.live_subscriptions().unwrap()[0].id.clone();
        store.waiting_events(&id, 50).unwrap()
    };
    let waiting_numbers = {
        let waiting = waiting();
        assert_eq!(waiting.len(), 1, "the refused event waits in the database");
        waiting[0].event_number.to_string()
    };

    // Back up, and the endpoint with it: the waiting event is delivered as it was numbered.
    endpoint.refuse.store(0, Ordering::SeqCst);
    let node = RunningNode::start(&gp);
    let received = until_taken_with(&endpoint, "294505008")
        .expect("the waiting notification is delivered after the restart");
    let taken = received.last().unwrap();
    assert_eq!(event_numbers(taken), vec![waiting_numbers.clone()]);
    // Delivery is at least once: wait for the node to record it before stopping it again.
    assert!(wait_for(SYNC_WAIT, || waiting().is_empty()));
    drop(node);

    // A change committed while no node runs: filed and notified once the node is back.
    let second = temp.path().join("gp-change-2.json");
    gp_allergy_extract(&gp, &nhs, &second);
    let text = std::fs::read_to_string(&second)
        .unwrap()
        .replace("notified-allergy-1", "notified-allergy-2")
        .replace("294505008", "91936005")
        .replace("Allergy to amoxicillin", "Allergy to penicillin");
    std::fs::write(&second, text).unwrap();
    let output = ingest(&gp, &[second.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let node = RunningNode::start(&gp);
    let received = until_taken_with(&endpoint, "91936005")
        .expect("the change made while the node was down is notified after it starts");
    let taken = received.last().unwrap();
    let next: u64 = waiting_numbers.parse::<u64>().unwrap() + 1;
    assert_eq!(
        event_numbers(taken),
        vec![next.to_string()],
        "numbered after the last event, none lost or told twice"
    );
    // The notification carries what changed: the new allergy, not the GP's earlier one
    // in the same section (which the record still holds).
    let allergies: Vec<String> = taken["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .filter(|r| r["resourceType"] == "AllergyIntolerance")
        .map(|r| {
            r["code"]["coding"][0]["code"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(allergies, ["91936005"], "{taken:#}");
    let everything = fhir_get(
        &node.address,
        &format!("/fhir/Patient/{nhs}/$everything"),
        Some(&token),
    );
    assert!(
        everything.body.contains("294505008") && everything.body.contains("91936005"),
        "both allergies are in the record"
    );
}

/// Notifications carry patient data to whatever URL a subscription names, so a client is
/// notified only at the origins its operator allowed: one allowed none may not subscribe,
/// and is told how its operator allows one; once allowed, it may; and when its operator
/// takes an origin back, the subscription there ends and is told nothing more, while the
/// one at the origin still allowed goes on.
#[test]
fn a_client_is_notified_only_at_origins_its_operator_allowed() {
    let temp = tempfile::tempdir().unwrap();
    let (gp, nhs) = one_gp(temp.path());
    let node = RunningNode::start(&gp);
    let token = api_token(&gp, &["--client", "ward-system"]);
    let (kept, taken_back) = (Endpoint::start(), Endpoint::start());
    let subscribe = |endpoint: &Endpoint| {
        post_json(
            &node.address,
            "/fhir/Subscription",
            &token,
            &subscription_to(endpoint, Some(&format!("Patient?_id={nhs}")), "id-only"),
        )
    };

    let refused = subscribe(&kept);
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert!(
        refused.body.contains("OperationOutcome")
            && refused.body.contains(kept.origin())
            && refused.body.contains("--notify-to"),
        "the refusal names the origin and how it is allowed: {}",
        refused.body
    );
    assert!(
        kept.next(Duration::from_secs(2)).is_none(),
        "nothing was posted"
    );

    let said = allow(&gp, "ward-system", &[&kept, &taken_back]);
    assert!(said.contains(kept.origin()), "{said}");
    let mut ids = Vec::new();
    for endpoint in [&kept, &taken_back] {
        let made = subscribe(endpoint);
        assert_eq!(made.status, 201, "{}", made.body);
        let made: Value = serde_json::from_str(&made.body).unwrap();
        ids.push(made["id"].as_str().unwrap().to_string());
        assert!(endpoint.next(SYNC_WAIT).is_some(), "a handshake");
    }
    let listed = run(&["api-client", "list", "--dir", gp.to_str().unwrap()]);
    assert!(
        stdout(&listed).contains(taken_back.origin()),
        "{}",
        stdout(&listed)
    );

    let said = allow(&gp, "ward-system", &[&kept]);
    assert!(
        said.contains("1 subscription to another origin ended"),
        "{said}"
    );
    let status_of = |id: &str| -> Value {
        let read = fhir_get(
            &node.address,
            &format!("/fhir/Subscription/{id}"),
            Some(&token),
        );
        assert_eq!(read.status, 200, "{}", read.body);
        serde_json::from_str::<Value>(&read.body).unwrap()["status"].clone()
    };
    assert_eq!(status_of(&ids[1]), "off");
    assert_ne!(status_of(&ids[0]), "off");

    let change = temp.path().join("gp-change.json");
    gp_allergy_extract(&gp, &nhs, &change);
    let output = ingest(&gp, &[change.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        until_taken_with(&kept, "notified-allergy-1").is_some(),
        "the origin still allowed is told of the change"
    );
    assert!(
        taken_back.next(Duration::from_secs(5)).is_none(),
        "the origin taken back is told nothing more"
    );

    // What an operator allows is checked and kept in one form.
    let dir = gp.to_str().unwrap();
    let plain = run(&[
        "api-client",
        "notify-to",
        "--dir",
        dir,
        "--id",
        "ward-system",
        "http://ward.example.nhs.uk",
    ]);
    assert!(!plain.status.success());
    assert!(
        stderr(&plain).contains("plain http is only for this machine"),
        "{}",
        stderr(&plain)
    );
    let added = run(&[
        "api-client",
        "add",
        "--dir",
        dir,
        "--id",
        "standby-system",
        "--notify-to",
        "https://ward.example.nhs.uk:443/",
        "--notify-to",
        "HTTPS://Ward.Example.nhs.uk",
    ]);
    assert!(added.status.success(), "{}", stderr(&added));
    let listed = run(&["api-client", "list", "--dir", dir, "--json"]);
    let listed: Value = serde_json::from_str(&stdout(&listed)).unwrap();
    let standby = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["client_id"] == "standby-system")
        .unwrap();
    assert_eq!(
        standby["notify_origins"],
        json!(["https://ward.example.nhs.uk"])
    );
    let path = run(&[
        "api-client",
        "notify-to",
        "--dir",
        dir,
        "--id",
        "standby-system",
        "https://ward.example.nhs.uk/notify",
    ]);
    assert!(
        stderr(&path).contains("give the origin only"),
        "{}",
        stderr(&path)
    );
}

/// A GP's node in a region of its own, with three patients: its home and the first patient.
fn one_gp(temp: &Path) -> (PathBuf, String) {
    let region = Region::new(temp);
    let gp = region.registered("A81001", "gp", false, &[]);
    region.publish(&[&gp]);
    ingest_generated(&gp, "A81001", 3, 1);
    let nhs = caseload(&gp, "A81001")[0].clone();
    (gp, nhs)
}

/// The patients `publisher` has published about, as `dir` holds them.
fn caseload(dir: &Path, publisher: &str) -> Vec<String> {
    let database = caremesh_storage::page_checksums::open_directly(&dir.join("node.db")).unwrap();
    let mut statement = database
        .prepare("SELECT DISTINCT nhs FROM documents WHERE publisher = ?1 ORDER BY nhs")
        .unwrap();
    statement
        .query_map([publisher], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The newest feed position at `dir` of a document `publisher` published about `nhs`.
fn newest_from(dir: &Path, publisher: &str, nhs: &str) -> i64 {
    let database = caremesh_storage::page_checksums::open_directly(&dir.join("node.db")).unwrap();
    database
        .query_row(
            "SELECT COALESCE(MAX(seq), 0) FROM documents WHERE publisher = ?1 AND nhs = ?2 \
             AND section != 'sharing'",
            [publisher, nhs],
            |row| row.get(0),
        )
        .unwrap()
}
