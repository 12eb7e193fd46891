//! Sync between separate `caremesh run` processes over real QUIC on 127.0.0.1. Every test
//! checks what ends up stored (documents, signatures, status rows), not only exit codes.

mod support;

use std::path::Path;
use std::time::Duration;
use support::region::{Region, documents, ingest_generated, peer, wait_for_documents};
use support::*;

const SYNC_WAIT: Duration = Duration::from_secs(60);

/// `dir`'s database opened for writing, as an attacker or a failing disk would: only the
/// tamper and fault tests use it; the others read through the store.
fn database(dir: &Path) -> rusqlite::Connection {
    caremesh_storage::page_checksums::open_directly(&dir.join("node.db")).unwrap()
}

/// `dir`'s store on a read-only connection, through its data key when its home has one.
fn read_only_store(dir: &Path) -> caremesh_storage::Store {
    caremesh::home::Home::open(dir)
        .unwrap()
        .database()
        .unwrap()
        .open_read_only()
        .unwrap()
}

/// Classes the shipped agreements share between direct-care organisations; acute trusts
/// receive only coded GP data (the Oxfordshire rule). Sensitive and private items stay.
const DIRECT_CARE: &[&str] = &["coded", "free-text", "document"];
const CODED: &[&str] = &["coded"];

/// The documents `dir` holds (publisher, patient, section, class), read as sync reads them:
/// through the store's own feed, on a read-only connection beside the running node.
fn held_documents(dir: &Path) -> Vec<caremesh_sync::DocMeta> {
    let store = read_only_store(dir);
    store
        .feed_after(0, usize::MAX >> 1)
        .unwrap()
        .into_iter()
        .map(|row| row.meta)
        .collect()
}

/// Patients `org` has published about at `dir`: its caseload, which is all it receives.
fn caseload(dir: &Path, org: &str) -> Vec<String> {
    let mut patients: Vec<String> = held_documents(dir)
        .into_iter()
        .filter(|meta| meta.publisher.as_str() == org)
        .map(|meta| meta.patient.to_string())
        .collect();
    patients.sort();
    patients.dedup();
    patients
}

/// Documents of `publisher` held at `dir` in `classes`, about `patients` (all when `None`).
fn documents_of(dir: &Path, publisher: &str, classes: &[&str], patients: Option<&[String]>) -> i64 {
    held_documents(dir)
        .iter()
        .filter(|meta| {
            meta.publisher.as_str() == publisher
                && classes.contains(&meta.class.to_string().as_str())
                && patients.is_none_or(|p| p.contains(&meta.patient.to_string()))
        })
        .count() as i64
}

/// The items of `publisher` that `dir` holds about `patient` (about every patient it holds
/// documents of `publisher` about, when `None`), through the store's reads for the record.
fn items_of(dir: &Path, publisher: &str, patient: Option<&str>) -> Vec<caremesh_sync::Item> {
    let patients = match patient {
        Some(nhs) => vec![nhs.to_string()],
        None => caseload(dir, publisher),
    };
    let store = read_only_store(dir);
    patients
        .iter()
        .flat_map(|nhs| {
            let nhs = caremesh_sync::NhsNumber::parse(nhs).unwrap();
            store.patient_items(&nhs).unwrap()
        })
        .filter(|stored| stored.publisher.as_str() == publisher)
        .map(|stored| stored.item)
        .collect()
}

/// The items of every document of `publisher` that `dir` holds, read from the signed
/// documents themselves: what a hub, which keeps no read model of clinical items, relays.
fn items_in_documents(dir: &Path, publisher: &str) -> Vec<caremesh_sync::Item> {
    let store = read_only_store(dir);
    store
        .feed_after(0, usize::MAX >> 1)
        .unwrap()
        .into_iter()
        .filter(|row| row.meta.publisher.as_str() == publisher)
        .flat_map(|row| {
            let stored = store.document(row.meta.id()).unwrap().unwrap();
            caremesh_sync::PublishedDocument::load(&row.meta, &stored.snapshot)
                .and_then(|document| document.items())
                .unwrap()
        })
        .collect()
}

/// How many of `items` are in `section` (`Section`'s name as stored) and one of `classes`.
fn in_section(items: &[caremesh_sync::Item], section: &str, classes: &[&str]) -> i64 {
    items
        .iter()
        .filter(|item| {
            item.section.to_string() == section
                && classes.contains(&item.class.to_string().as_str())
        })
        .count() as i64
}

/// What a hub may hold from `publisher`: everything some agreement shares.
fn shareable(dir: &Path, publisher: &str) -> i64 {
    documents_of(dir, publisher, DIRECT_CARE, None)
}

fn held_from(dir: &Path, publisher: &str) -> i64 {
    held_documents(dir)
        .iter()
        .filter(|meta| meta.publisher.as_str() == publisher)
        .count() as i64
}

/// A hub and a GP dialling it, registered and signed, the GP holding `patients` generated
/// patients. Returns (hub home, GP home).
fn hub_and_gp(root: &Path, patients: u64, seed: u64) -> (std::path::PathBuf, std::path::PathBuf) {
    let region = Region::new(root);
    let hub = region.registered("HUB01", "hub", true, &[]);
    let gp = region.registered("A81001", "gp", false, &["HUB01"]);
    region.publish(&[&hub, &gp]);
    ingest_generated(&gp, "A81001", patients, seed);
    (hub, gp)
}

fn verify_ok(dir: &Path) {
    let output = run(&["verify", "--dir", dir.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "verify failed at {}: {}",
        dir.display(),
        stdout(&output)
    );
}

fn metric(node: &RunningNode, dir: &Path, name: &str) -> f64 {
    let admin = role_session(dir, &node.address, "admin");
    let (status, body) = http_get_as(&node.address, "/metrics", &admin);
    assert_eq!(status, 200);
    body.lines()
        .find(|line| line.starts_with(name))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn changes_flow_from_a_gp_through_the_hub_to_an_acute_trust_and_arrive_verified() {
    let temp = tempfile::tempdir().unwrap();
    let region = Region::new(temp.path());
    let hub = region.registered("HUB01", "hub", true, &[]);
    let gp = region.registered("A81001", "gp", false, &["HUB01"]);
    let acute = region.registered("RTH01", "acute", false, &["HUB01"]);
    region.publish(&[&hub, &gp, &acute]);
    ingest_generated(&gp, "A81001", 8, 1);
    ingest_generated(&acute, "RTH01", 3, 1);

    let _hub_process = RunningNode::start(&hub);
    let _gp_process = RunningNode::start(&gp);
    let acute_process = RunningNode::start(&acute);

    // The acute trust receives coded GP data about its own caseload only.
    let acute_caseload = caseload(&acute, "RTH01");
    assert_eq!(acute_caseload.len(), 3);
    let from_gp = documents_of(&gp, "A81001", CODED, Some(&acute_caseload));
    assert!(from_gp > 0);
    let reached = wait_for(SYNC_WAIT, || held_from(&acute, "A81001") == from_gp);
    assert!(
        reached,
        "acute holds {} of {from_gp} GP documents",
        held_from(&acute, "A81001")
    );
    let to_gp = documents_of(&acute, "RTH01", DIRECT_CARE, Some(&caseload(&gp, "A81001")));
    assert!(wait_for(SYNC_WAIT, || held_from(&gp, "RTH01") == to_gp));
    assert!(
        wait_for(SYNC_WAIT, || held_from(&hub, "A81001")
            == shareable(&gp, "A81001")),
        "the hub stores what it relays"
    );
    // Private documents never left the GP, nor free text, documents or sensitive items
    // (the Oxfordshire rule), nor anything about patients the acute trust does not treat.
    assert_eq!(documents_of(&acute, "A81001", CODED, None), from_gp);

    // The acute trust's view of a shared patient joins both organisations' data.
    let nhs = acute_caseload.iter().min().unwrap();
    let session = clinician_session(&acute, &acute_process.address, nhs);
    let (status, body) = http_get_as(
        &acute_process.address,
        &format!("/api/patients/{nhs}"),
        &session,
    );
    assert_eq!(status, 200, "{body}");
    let record: serde_json::Value = serde_json::from_str(&body).unwrap();
    let sources: Vec<&str> = record["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["ods"].as_str().unwrap())
        .collect();
    assert!(sources.contains(&"A81001"), "sources: {sources:?}");
    assert!(sources.contains(&"RTH01"), "sources: {sources:?}");
    // The GP's sharing records state its feed, so the hospital can judge its freshness.
    let gp_source = record["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["ods"] == "A81001")
        .unwrap();
    assert_eq!(gp_source["feed"], "batch", "{gp_source}");
    assert_eq!(gp_source["expected_refresh_hours"], 12);
    assert_ne!(
        gp_source["source_system"], "caremesh sync",
        "the GP's own clinical system is named, not the transport"
    );
    assert_eq!(gp_source["stale"], false);
    verify_ok(&acute);
    verify_ok(&hub);

    // Data ingested while everything runs flows on its own, to the hub; patients the acute
    // trust does not treat stay off its disk.
    ingest_generated(&gp, "A81001", 2, 77);
    let from_gp_now = shareable(&gp, "A81001");
    assert!(wait_for(SYNC_WAIT, || held_from(&hub, "A81001") == from_gp_now));
    assert_eq!(held_from(&acute, "A81001"), from_gp);

    assert!(wait_for(SYNC_WAIT, || peer(&acute, "HUB01")
        .is_some_and(|p| p["bytes_received"].as_u64().unwrap_or(0) > 0)));
    let status = peer(&acute, "HUB01").expect("acute keeps a status row for the hub");
    assert_eq!(status["connected"], true);
    assert!(status["last_sync_at"].as_i64().is_some());
    assert_eq!(status["rejected"], 0);
    assert!(
        metric(
            &acute_process,
            &acute,
            "caremesh_peer_connected{peer=\"HUB01\"}"
        ) == 1.0
    );
}

#[test]
fn direct_peers_exchange_both_ways_without_a_hub() {
    let temp = tempfile::tempdir().unwrap();
    let region = Region::new(temp.path());
    let gp = region.registered("A81001", "gp", true, &[]);
    let community = region.registered("RYX01", "community", false, &["A81001"]);
    region.publish(&[&gp, &community]);
    ingest_generated(&gp, "A81001", 4, 1);
    ingest_generated(&community, "RYX01", 4, 1);
    let _gp = RunningNode::start(&gp);
    let _community = RunningNode::start(&community);
    let gp_shares = documents_of(
        &gp,
        "A81001",
        DIRECT_CARE,
        Some(&caseload(&community, "RYX01")),
    );
    let community_shares = documents_of(
        &community,
        "RYX01",
        DIRECT_CARE,
        Some(&caseload(&gp, "A81001")),
    );
    assert!(wait_for(SYNC_WAIT, || held_from(&community, "A81001") == gp_shares));
    assert!(wait_for(SYNC_WAIT, || held_from(&gp, "RYX01") == community_shares));
    verify_ok(&gp);
    verify_ok(&community);
}

#[test]
fn with_two_hubs_active_active_losing_one_loses_nothing_and_changes_fail_over_to_the_other() {
    let temp = tempfile::tempdir().unwrap();
    let region = Region::new(temp.path());
    let hub1 = region.registered("HUB01", "hub", true, &[]);
    let hub2 = region.registered("HUB02", "hub", true, &["HUB01"]);
    let gp = region.registered("A81001", "gp", false, &["HUB01", "HUB02"]);
    let acute = region.registered("RTH01", "acute", false, &["HUB01", "HUB02"]);
    region.publish(&[&hub1, &hub2, &gp, &acute]);
    ingest_generated(&gp, "A81001", 8, 1);
    ingest_generated(&acute, "RTH01", 3, 1);

    let mut hub1_process = RunningNode::start(&hub1);
    let _hub2_process = RunningNode::start(&hub2);
    let _gp_process = RunningNode::start(&gp);
    let _acute_process = RunningNode::start(&acute);

    // Both hubs hold the region: the GP gives its documents to each, and the hubs to each
    // other; the acute trust gets its caseload's coded GP data by either path.
    let shareable_now = shareable(&gp, "A81001");
    for hub in [&hub1, &hub2] {
        assert!(
            wait_for(SYNC_WAIT, || held_from(hub, "A81001") == shareable_now),
            "a hub holds {} of {shareable_now}",
            held_from(hub, "A81001")
        );
    }
    let acute_caseload = caseload(&acute, "RTH01");
    let from_gp = documents_of(&gp, "A81001", CODED, Some(&acute_caseload));
    assert!(wait_for(SYNC_WAIT, || held_from(&acute, "A81001") == from_gp));

    // HUB01 is lost. New GP data, some about the acute trust's patients, reaches the acute
    // trust through HUB02 alone.
    hub1_process.kill_hard();
    let change = temp.path().join("new-condition.json");
    write_json(
        &change,
        &serde_json::json!({
            "resourceType": "Condition",
            "id": "after-failover",
            "meta": {"lastUpdated": "2026-01-06T09:00:00Z"},
            "clinicalStatus": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                "code": "active"
            }]},
            "code": {"coding": [{
                "system": "http://snomed.info/sct", "code": "38341003", "display": "Hypertension"
            }]},
            "subject": {"reference": "Patient/A81001-S1-P0"},
            "recordedDate": "2026-01-06"
        }),
    );
    let output = ingest(&gp, &[change.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    ingest_generated(&gp, "A81001", 2, 78);
    let new_item = |dir: &Path| {
        items_of(dir, "A81001", None)
            .iter()
            .filter(|item| item.id == "Condition/after-failover")
            .count()
    };
    assert_eq!(new_item(&gp), 1);
    assert!(
        wait_for(SYNC_WAIT, || new_item(&acute) == 1),
        "the change reached the acute trust through the hub left"
    );
    // Everything the acute trust may hold of the GP's, the new condition's document
    // included (a patient with no problems before gets a new one).
    let from_gp_after = documents_of(&gp, "A81001", CODED, Some(&acute_caseload));
    assert!(from_gp_after >= from_gp);
    assert!(wait_for(SYNC_WAIT, || held_from(&acute, "A81001") == from_gp_after));
    let shareable_after = shareable(&gp, "A81001");
    assert!(wait_for(SYNC_WAIT, || held_from(&hub2, "A81001") == shareable_after));
    assert_eq!(
        held_from(&hub1, "A81001"),
        shareable_now,
        "the lost hub kept what it had (its file is intact) and got nothing since"
    );
    verify_ok(&acute);
    verify_ok(&hub2);
}

#[test]
fn a_hub_killed_mid_transfer_resumes_without_resending_what_was_acknowledged() {
    let temp = tempfile::tempdir().unwrap();
    let (hub, gp) = hub_and_gp(temp.path(), 300, 3);
    let total = shareable(&gp, "A81001");

    let mut hub_process = RunningNode::start(&hub);
    let _gp_process = RunningNode::start(&gp);
    let started = wait_for(SYNC_WAIT, || documents(&hub) > 0);
    hub_process.kill_hard();
    let held_at_kill = documents(&hub);
    assert!(started && held_at_kill > 0);
    eprintln!("hub killed holding {held_at_kill} of {total} documents");

    let _hub_process = RunningNode::start(&hub);
    wait_for_documents(&hub, total, SYNC_WAIT);
    assert_eq!(held_from(&hub, "A81001"), total);
    verify_ok(&hub);
    // What the hub had stored (and so acknowledged or held) is not sent again: the GP sends
    // at most the documents plus those in flight when the hub died (bounded by the offer
    // window of 4 × 256).
    let status_settled = wait_for(Duration::from_secs(10), || {
        peer(&gp, "HUB01").is_some_and(|p| p["pending_out"] == 0)
    });
    assert!(status_settled);
    let sent = peer(&gp, "HUB01").unwrap()["documents_sent"]
        .as_i64()
        .unwrap();
    assert!(
        sent <= total + 1024 && sent < 2 * total,
        "GP sent {sent} document versions for {total} documents"
    );
}

#[test]
fn a_document_with_a_forged_signature_is_rejected_counted_and_not_stored() {
    let temp = tempfile::tempdir().unwrap();
    let (hub, gp) = hub_and_gp(temp.path(), 3, 1);
    // Forge: flip one byte of one document's signature in the GP's database.
    let (doc_id, mut signed): (Vec<u8>, Vec<u8>) = database(&gp)
        .query_row(
            "SELECT doc_id, signed FROM documents WHERE class = 'coded' ORDER BY seq LIMIT 1",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .unwrap();
    let last = signed.len() - 1;
    signed[last] ^= 0x40;
    database(&gp)
        .execute(
            "UPDATE documents SET signed = ?1 WHERE doc_id = ?2",
            rusqlite::params![signed, doc_id],
        )
        .unwrap();
    let total = shareable(&gp, "A81001");

    let _hub = RunningNode::start(&hub);
    let _gp = RunningNode::start(&gp);
    assert!(wait_for(SYNC_WAIT, || {
        peer(&hub, "A81001").is_some_and(|p| p["rejected"] == 1 && p["pending_in"] == 0)
    }));
    assert!(wait_for(SYNC_WAIT, || held_from(&hub, "A81001") == total - 1));
    let forged = caremesh_sync::DocId(doc_id.try_into().unwrap());
    let store = caremesh_storage::Store::open_read_only(&hub.join("node.db")).unwrap();
    assert!(
        store.document(forged).unwrap().is_none(),
        "nothing of the forged document is stored"
    );
    drop(store);
    let rejected = status_json(&hub)["sync"]["rejected_changes"].clone();
    assert_eq!(rejected[0]["peer"], "A81001");
    assert!(
        rejected[0]["reason"]
            .as_str()
            .unwrap()
            .contains("does not verify"),
        "{rejected}"
    );
    verify_ok(&hub);
}

#[test]
fn unknown_and_revoked_peers_are_refused_and_a_newer_registry_spreads() {
    let temp = tempfile::tempdir().unwrap();
    let region = Region::new(temp.path());
    let hub = region.registered("HUB01", "hub", true, &[]);
    let gp = region.registered("A81001", "gp", false, &["HUB01"]);
    let revoked = region.registered("B82005", "gp", false, &["HUB01"]);
    // Never listed: its key is unknown to everyone.
    let stranger = region.node("C83010", "gp", false, &["HUB01"]);
    region.publish(&[&hub, &gp, &revoked, &stranger]);
    // Edition 2 revokes B82005's key; only the hub gets it directly.
    region.withdraw("B82005", None, "compromised");
    region.publish(&[&hub]);
    for (dir, org) in [(&gp, "A81001"), (&revoked, "B82005"), (&stranger, "C83010")] {
        ingest_generated(dir, org, 2, 1);
    }

    let hub_process = RunningNode::start(&hub);
    let _gp = RunningNode::start(&gp);
    let _revoked = RunningNode::start(&revoked);
    let _stranger = RunningNode::start(&stranger);
    let gp_shares = shareable(&gp, "A81001");
    assert!(wait_for(SYNC_WAIT, || held_from(&hub, "A81001") == gp_shares));
    // The GP picks up edition 2 from the hub.
    let adopted = wait_for(SYNC_WAIT, || {
        let text = std::fs::read_to_string(gp.join("trust/registry.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["registry"]["version"] == 2
    });
    assert!(adopted, "the GP did not adopt the newer registry");
    assert!(wait_for(SYNC_WAIT, || {
        metric(&hub_process, &hub, "caremesh_handshakes_refused_total") >= 2.0
    }));
    assert_eq!(held_from(&hub, "B82005"), 0, "nothing from the revoked key");
    assert_eq!(held_from(&hub, "C83010"), 0, "nothing from the unknown key");
    assert!(peer(&hub, "B82005").is_none() && peer(&hub, "C83010").is_none());
    for dir in [&revoked, &stranger] {
        assert!(peer(dir, "HUB01").is_none_or(|p| p["connected"] == false));
        assert_eq!(held_from(dir, "A81001"), 0);
    }
}

/// Finding: a document over the 16 MiB frame limit never synced, `pending out` said 0 and
/// nothing was logged. Ingest now refuses resources that could make one; a document that is
/// too large all the same is an error in the log, `caremesh status` and /metrics, and the rest
/// of the feed still flows.
#[test]
fn a_document_too_large_to_send_is_an_error_in_status_metrics_and_the_log() {
    let temp = tempfile::tempdir().unwrap();
    let (hub, gp) = hub_and_gp(temp.path(), 2, 1);
    let shares = shareable(&gp, "A81001");
    // A document grown past the frame limit (its snapshot padded, as no ingest would make it).
    let conn = database(&gp);
    conn.execute(
        "UPDATE document_snapshots SET snapshot = CAST(snapshot || zeroblob(17000000) AS BLOB) \
         WHERE doc_id = (SELECT doc_id FROM documents WHERE section = 'problems' LIMIT 1)",
        [],
    )
    .unwrap();
    drop(conn);
    let log = temp.path().join("gp.log");
    let _hub = RunningNode::start(&hub);
    let gp_process =
        RunningNode::start_logging(&gp, "error", std::fs::File::create(&log).unwrap().into());
    assert!(
        wait_for(SYNC_WAIT, || held_from(&hub, "A81001") == shares - 1),
        "the rest of the feed flows: the hub holds {} of {}",
        held_from(&hub, "A81001"),
        shares - 1
    );
    let unsendable = |dir: &Path| status_json(dir)["sync"]["unsendable_documents"].clone();
    assert!(wait_for(SYNC_WAIT, || unsendable(&gp)[0]["peer"] == "HUB01"));
    let text = stdout(&run(&["status", "--dir", gp.to_str().unwrap()]));
    assert!(text.contains("UNSENDABLE document"), "{text}");
    assert_eq!(
        metric(&gp_process, &gp, "caremesh_documents_unsendable"),
        1.0
    );
    assert!(metric(&gp_process, &gp, "caremesh_unsendable_wants_total") >= 1.0);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("too large to send"), "{logged}");
}

/// Finding: a node whose trail was cut could not tell. Its signed audit checkpoints go to
/// the hub, which holds them as a witness outside the node and hands back what it holds at
/// every connection: someone who deletes the trail and every local trace of the checkpoints
/// (receipts included) is found out once the node next reaches the hub.
#[test]
fn the_hub_witnesses_audit_checkpoints_and_a_cut_trail_is_found_from_its_copy() {
    /// The newest of `dir`'s audit checkpoints that `witness` holds (its entry count), as
    /// `caremesh status` reports it.
    fn newest_receipt(dir: &Path, witness: &str) -> Option<i64> {
        status_json(dir)["audit"]["witnesses"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["witness"] == witness)
            .and_then(|w| w["entries"].as_i64())
    }
    let temp = tempfile::tempdir().unwrap();
    let (hub, gp) = hub_and_gp(temp.path(), 1, 1);
    let _hub = RunningNode::start(&hub);
    let nhs = caseload(&gp, "A81001").remove(0);
    {
        let _gp = RunningNode::start(&gp);
        for _ in 0..3 {
            record_as_tests(&gp, &nhs, &[]);
        }
        let signed = run(&["audit", "checkpoint", "--dir", gp.to_str().unwrap()]);
        assert!(signed.status.success(), "{}", stderr(&signed));
        let witnessed = || {
            status_json(&hub)["audit"]["witnessing"]
                .as_array()
                .unwrap()
                .iter()
                .any(|w| w["organisation"] == "A81001" && w["entries"] == 3)
        };
        assert!(
            wait_for(SYNC_WAIT, witnessed),
            "the hub holds the checkpoint"
        );
        assert!(wait_for(SYNC_WAIT, || newest_receipt(&gp, "HUB01") == Some(3)));
        // Both operators can see it: the node's witnesses, and whose checkpoints a hub holds.
        let gp_audit = status_json(&gp)["audit"].clone();
        assert_eq!(gp_audit["witnesses"][0]["witness"], "HUB01", "{gp_audit}");
        assert_eq!(gp_audit["checkpoint"]["entries"], 3, "{gp_audit}");
        let hub_audit = status_json(&hub)["audit"].clone();
        assert_eq!(
            hub_audit["witnessing"][0]["organisation"], "A81001",
            "{hub_audit}"
        );
    }
    // Every trace at the node goes: the trail, its checkpoints, the hub's receipts; and a new
    // trail is written and signed in its place, longer than the one the hub saw.
    let db = database(&gp);
    for table in ["audit_events", "audit_checkpoints", "witness_receipts"] {
        db.execute(&format!("DELETE FROM {table}"), []).unwrap();
    }
    drop(db);
    for _ in 0..5 {
        record_as_tests(&gp, &nhs, &[]);
    }
    let resigned = run(&["audit", "checkpoint", "--dir", gp.to_str().unwrap()]);
    assert!(
        stdout(&resigned).contains("5 entries"),
        "{}",
        stdout(&resigned)
    );
    let fooled = run(&["audit", "verify", "--dir", gp.to_str().unwrap()]);
    assert!(
        fooled.status.success(),
        "nothing local is left to tell: {}",
        stdout(&fooled)
    );

    // The node reconnects; the hub hands back what it witnessed.
    {
        let _gp = RunningNode::start(&gp);
        // Its receipt for the new checkpoint (5): the hub holds both.
        assert!(wait_for(SYNC_WAIT, || newest_receipt(&gp, "HUB01") == Some(5)));
    }
    let found = run(&["audit", "verify", "--dir", gp.to_str().unwrap()]);
    assert_eq!(found.status.code(), Some(1), "{}", stdout(&found));
    assert!(
        stdout(&found).contains("entries up to 3 were rewritten")
            && stdout(&found).contains("held by witness HUB01"),
        "{}",
        stdout(&found)
    );
}

/// Finding: a running hub ignored a registry installed with `trust install`; the revoked
/// organisation stayed connected and new documents were relayed until the hub restarted.
#[test]
fn a_registry_installed_in_a_running_hub_closes_the_revoked_peer_and_refuses_its_documents() {
    let temp = tempfile::tempdir().unwrap();
    let region = Region::new(temp.path());
    let hub = region.registered("HUB01", "hub", true, &[]);
    let gp = region.registered("A81001", "gp", false, &["HUB01"]);
    let revoked = region.registered("B82005", "gp", false, &["HUB01"]);
    region.publish(&[&hub, &gp, &revoked]);
    ingest_generated(&gp, "A81001", 2, 1);
    ingest_generated(&revoked, "B82005", 2, 2);
    let hub_process = RunningNode::start(&hub);
    let _gp = RunningNode::start(&gp);
    let _revoked = RunningNode::start(&revoked);
    let before = shareable(&revoked, "B82005");
    assert!(wait_for(SYNC_WAIT, || held_from(&hub, "B82005") == before));
    assert!(wait_for(SYNC_WAIT, || {
        peer(&hub, "B82005").is_some_and(|p| p["connected"] == true)
    }));

    // The authority revokes B82005; the operator installs the edition in the running hub.
    region.withdraw("B82005", None, "compromised");
    region.publish(&[&hub]);
    let closed = wait_for(Duration::from_secs(20), || {
        peer(&hub, "B82005").is_some_and(|p| {
            p["connected"] == false
                && p["last_error"]
                    .as_str()
                    .is_some_and(|error| error.contains("revoked"))
        })
    });
    assert!(
        closed,
        "the hub kept the revoked peer: {}",
        status_json(&hub)
    );

    // What the revoked organisation publishes from now on reaches no one through the hub.
    ingest_generated(&revoked, "B82005", 3, 3);
    assert!(shareable(&revoked, "B82005") > before);
    assert!(wait_for(SYNC_WAIT, || {
        metric(&hub_process, &hub, "caremesh_handshakes_refused_total") >= 1.0
    }));
    // Whatever the revoked node tries while the hub keeps refusing it.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        held_from(&hub, "B82005"),
        before,
        "no new document from the revoked key"
    );
    // The rest of the region carries on: the GP's new data still reaches the hub.
    ingest_generated(&gp, "A81001", 3, 4);
    let gp_shares = shareable(&gp, "A81001");
    assert!(wait_for(SYNC_WAIT, || held_from(&hub, "A81001") == gp_shares));
    // And the hub passed the new edition on.
    assert!(wait_for(SYNC_WAIT, || {
        let text = std::fs::read_to_string(gp.join("trust/registry.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["registry"]["version"] == 2
    }));
}

#[test]
fn garbage_and_oversized_frames_close_the_connection_and_leave_the_hub_serving() {
    let temp = tempfile::tempdir().unwrap();
    let region = Region::new(temp.path());
    let hub = region.registered("HUB01", "hub", true, &[]);
    let rogue = region.registered("D84000", "gp", false, &[]);
    region.publish(&[&hub, &rogue]);
    let hub_process = RunningNode::start(&hub);
    let hub_address: std::net::SocketAddr = {
        let config = std::fs::read_to_string(hub.join("caremesh.toml")).unwrap();
        let value: toml::Value = toml::from_str(&config).unwrap();
        value["sync"]["listen"].as_str().unwrap().parse().unwrap()
    };
    let home = caremesh::home::Home::open(&rogue).unwrap();
    let trust = home.trust().unwrap().unwrap();
    let identity = caremesh::tls::NodeIdentity::from_key(
        &home.signing_key().unwrap(),
        &home.config.organisation.ods,
    )
    .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let payloads: [&[u8]; 3] = [
        // A frame whose body is not a caremesh message.
        &[0, 0, 0, 6, 1, 0xfe, 0xfe, 0xfe, 0xfe, 0xfe],
        // A frame announcing 4 GiB.
        &[0xff, 0xff, 0xff, 0xff, 0, 0, 0],
        // A frame from another protocol version.
        &[0, 0, 0, 2, 9, 0],
    ];
    for payload in payloads {
        let reason = runtime.block_on(async {
            let client =
                caremesh::tls::client_config(&identity, &trust, Some("HUB01".parse().unwrap()))
                    .unwrap();
            let client = quinn::crypto::rustls::QuicClientConfig::try_from(client).unwrap();
            let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            endpoint
                .set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(client)));
            let connection = endpoint
                .connect(hub_address, "caremesh.invalid")
                .unwrap()
                .await
                .unwrap();
            let (mut send, _recv) = connection.open_bi().await.unwrap();
            send.write_all(payload).await.unwrap();
            let closed = tokio::time::timeout(Duration::from_secs(20), connection.closed()).await;
            closed.expect("the hub closes a connection that sends garbage")
        });
        eprintln!("hub closed the connection: {reason}");
    }
    let (status, _) = http_get(&hub_process.address, "/health");
    assert_eq!(status, 200, "the hub still serves");
    assert!(metric(&hub_process, &hub, "caremesh_protocol_errors_total") >= 3.0);
    assert_eq!(documents(&hub), 0);
    let row = peer(&hub, "D84000").expect("the hub keeps a status row for the peer");
    assert_eq!(row["connected"], false);
    assert!(
        row["last_error"].as_str().unwrap().contains("version"),
        "{row}"
    );
}

/// A base port whose view ports (base..base+3) and sync ports (base+100..base+103) are free
/// at the moment of asking.
fn free_demo_port() -> u16 {
    (20_000..40_000)
        .step_by(211)
        .find(|base| {
            (0..4).all(|offset| {
                std::net::TcpListener::bind(("127.0.0.1", base + offset)).is_ok()
                    && std::net::UdpSocket::bind(("127.0.0.1", base + 100 + offset)).is_ok()
            })
        })
        .expect("a free port range")
}

/// The demo without --dir keeps its region (authority key included) in a temporary folder
/// and removes it when stopped; a node stopped by hand meanwhile is reaped, not a zombie.
#[test]
fn the_demo_cleans_up_its_temporary_region_and_reaps_a_stopped_node() {
    let port = free_demo_port();
    let mut demo = caremesh()
        .args(["demo", "--patients", "40", "--port", &port.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let mut reader = std::io::BufReader::new(demo.stdout.take().unwrap());
    let (mut region, mut hub_pid) = (None, None);
    let mut line = String::new();
    while std::io::BufRead::read_line(&mut reader, &mut line).unwrap() > 0 {
        if let Some(path) = line.trim().strip_prefix("demo region in ") {
            region = Some(std::path::PathBuf::from(path));
        }
        if line.contains("Thames Valley Hub") {
            hub_pid = line
                .split("pid ")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_string);
        }
        if line.starts_with("Ctrl-C stops the region") {
            break;
        }
        line.clear();
    }
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    let region = region.expect("the demo names its folder");
    let hub_pid = hub_pid.expect("the demo names the hub's process");
    assert!(region.join("authority.key").exists());
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &hub_pid])
            .status()
            .unwrap()
            .success()
    );
    // Gone from the process table: exited and reaped (a zombie keeps its entry).
    let reaped = wait_for(Duration::from_secs(20), || {
        !std::path::Path::new(&format!("/proc/{hub_pid}")).exists()
    });
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &demo.id().to_string()])
        .status();
    let _ = demo.wait();
    assert!(reaped, "the stopped hub was left a zombie");
    assert!(
        !region.exists(),
        "the temporary region (with its authority key) was left behind"
    );
}

#[test]
fn the_demo_region_joins_one_patient_from_three_organisations_within_the_sharing_rules() {
    let temp = tempfile::tempdir().unwrap();
    let port = free_demo_port();
    let mut demo = caremesh()
        .args([
            "demo",
            "--patients",
            "40",
            "--port",
            &port.to_string(),
            "--dir",
        ])
        .arg(temp.path().join("region"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let mut reader = std::io::BufReader::new(demo.stdout.take().unwrap());
    let mut pages = Vec::new();
    let mut line = String::new();
    while pages.len() < 5 && std::io::BufRead::read_line(&mut reader, &mut line).unwrap() > 0 {
        if let Some(url) = line
            .split_whitespace()
            .find(|w| w.contains("/launch?token="))
        {
            pages.push(url.to_string());
        }
        line.clear();
    }
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    // Each printed link is a launch: follow it once, as the browser would, for a session.
    let sessions: Vec<(String, String, String)> = pages
        .iter()
        .map(|url| {
            let launched = follow_launch(url);
            let cookie = session_cookie(&launched);
            let address = url
                .trim_start_matches("http://")
                .split_once('/')
                .unwrap()
                .0
                .to_string();
            let path = launched.header("location").unwrap().to_string();
            (address, path, cookie)
        })
        .collect();
    let [
        gp_page,
        acute_page,
        hospice_page,
        break_glass_page,
        gp_audit,
    ] = sessions
        .try_into()
        .expect("three patient pages, the break-glass example and the GP's audit");
    let record = |(address, path, cookie): &(String, String, String)| -> serde_json::Value {
        let (status, body) = http_get_as(address, &format!("/api{path}"), cookie);
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    let items_from = |record: &serde_json::Value, ods: &str| -> Vec<String> {
        record["sections"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["items"].as_array().unwrap())
            .filter(|item| item["source"]["organisation"] == ods)
            .map(|item| item["data_class"].as_str().unwrap().to_string())
            .collect()
    };
    let joined = |page: &(String, String, String)| {
        let record = record(page);
        ["A81001", "RTH", "8HA15"]
            .iter()
            .all(|ods| !items_from(&record, ods).is_empty())
    };
    let all_joined = wait_for(SYNC_WAIT, || {
        joined(&gp_page) && joined(&acute_page) && joined(&hospice_page)
    });
    let acute = record(&acute_page);
    let hospice = record(&hospice_page);
    // The break-glass example: the GP's data is held at the hospice but not shown, until a
    // clinician gives a reason.
    let hidden = wait_for(SYNC_WAIT, || {
        record(&break_glass_page)["hidden_without_share_in"]
            .as_u64()
            .unwrap_or(0)
            > 0
    });
    // Through the FHIR API, the same rules: system access at the hospice is this
    // organisation's, without the patient's Share In; a user's token sees that user's
    // break-glass once they have given a reason, and system access still does not.
    let hospice_home = temp.path().join("region/hospice");
    let glass_patient = break_glass_page
        .1
        .trim_start_matches("/patients/")
        .to_string();
    let everything_path = format!("/fhir/Patient/{glass_patient}/$everything");
    // (GP resources served, whether the Bundle says Share In hides some.)
    let gp_resources_over_api = |token: &str| -> (usize, bool) {
        let response = fhir_get(&break_glass_page.0, &everything_path, Some(token));
        assert_eq!(response.status, 200, "{}", response.body);
        (
            response
                .body
                .matches("ods-organization-code/A81001#")
                .count(),
            response
                .body
                .contains("Share In is not recorded at this organisation"),
        )
    };
    let system_token = api_token(&hospice_home, &["--client", "hospice-engine"]);
    let user_token = api_token(
        &hospice_home,
        &[
            "--client",
            "hospice-engine",
            "--user",
            "demo-clinician",
            "--name",
            "Demo clinician at Sobell House Hospice",
        ],
    );
    let gp_over_api_before = gp_resources_over_api(&system_token);
    let (address, path, cookie) = &break_glass_page;
    let (glass_status, _) = http_post_form_as(
        address,
        &format!("{path}/break-glass"),
        "reason=Deteriorating%2C+needs+GP+medication+history",
        cookie,
    );
    let opened = record(&break_glass_page);
    let gp_over_api_for_user = gp_resources_over_api(&user_token);
    let gp_over_api_for_system = gp_resources_over_api(&system_token);
    // The GP's auditor sees the hospital's view of GP data, which came through the hub.
    let (gp_address, _, auditor) = &gp_audit;
    let first_patient = gp_page.1.trim_start_matches("/patients/").to_string();
    let hospital_view_reported = wait_for(SYNC_WAIT, || {
        let (status, body) = http_get_as(
            gp_address,
            &format!("/api/audit?patient={first_patient}"),
            auditor,
        );
        status == 200
            && serde_json::from_str::<Vec<serde_json::Value>>(&body)
                .unwrap()
                .iter()
                .any(|row| row["recorded_by"] == "RTH" && row["action"] == "view")
    });
    // The hospital's record of the patient through its FHIR API.
    let acute_patient = acute_page.1.trim_start_matches("/patients/").to_string();
    let acute_token = api_token(
        &temp.path().join("region/acute"),
        &["--client", "acute-engine"],
    );
    let as_fhir = fhir_get(
        &acute_page.0,
        &format!("/fhir/Patient/{acute_patient}/$everything"),
        Some(&acute_token),
    );
    // Stop the region (SIGTERM lets the demo stop its nodes) before asserting.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &demo.id().to_string()])
        .status();
    let _ = demo.wait();
    assert!(all_joined, "every page joins GP, hospital and hospice data");
    assert_eq!(as_fhir.status, 200, "{}", as_fhir.body);
    let bundle: serde_json::Value = serde_json::from_str(&as_fhir.body).unwrap();
    let resources: Vec<&serde_json::Value> = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .collect();
    let published_by = |ods: &str| -> Vec<&serde_json::Value> {
        let source = format!("https://fhir.nhs.uk/Id/ods-organization-code/{ods}#");
        resources
            .iter()
            .copied()
            .filter(|r| {
                r["meta"]["source"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with(&source)
            })
            .collect()
    };
    let from_gp = published_by("A81001");
    assert!(
        !from_gp.is_empty() && !published_by("RTH").is_empty(),
        "the hospital's FHIR record holds the GP's resources beside its own, each named"
    );
    // The Oxfordshire rule reaches the FHIR output too: no GP narrative, no GP documents.
    assert!(
        from_gp
            .iter()
            .all(|r| r.get("note").is_none() && r["resourceType"] != "DocumentReference"),
        "GP free text or documents in the hospital's FHIR record"
    );
    // What the Oxfordshire rule withheld is said, as the page says it.
    let outcome = resources
        .iter()
        .find(|r| r["resourceType"] == "OperationOutcome")
        .expect("the hospital's Bundle carries the page's notices");
    assert!(
        outcome["issue"]
            .as_array()
            .unwrap()
            .iter()
            .any(|issue| issue["diagnostics"]
                .as_str()
                .unwrap()
                .contains("withheld by sharing rules")),
        "{outcome}"
    );
    let provenance: Vec<&str> = resources
        .iter()
        .filter(|r| r["resourceType"] == "Provenance")
        .map(|r| {
            r["agent"][0]["who"]["identifier"]["value"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert!(
        provenance.contains(&"A81001") && provenance.contains(&"RTH"),
        "a Provenance per publisher: {provenance:?}"
    );
    assert!(hidden, "the break-glass example hides the GP's data");
    assert_eq!(glass_status, 303);
    assert_eq!(
        gp_over_api_before,
        (0, true),
        "no Share In at the hospice: the GP's resources are not served, and the Bundle says so"
    );
    assert!(
        gp_over_api_for_user.0 > 0 && !gp_over_api_for_user.1,
        "the clinician's break-glass opens the GP's resources to their token"
    );
    assert_eq!(
        gp_over_api_for_system,
        (0, true),
        "a break-glass is the clinician's alone, not the organisation's"
    );
    assert_eq!(
        opened["break_glass"]["clinician"],
        "Demo clinician at Sobell House Hospice"
    );
    assert!(
        hospital_view_reported,
        "the GP's audit report lists the hospital's view"
    );
    assert!(!items_from(&opened, "A81001").is_empty());
    // The hospital's page says what the Oxfordshire rule withheld.
    let withheld: u64 = acute["sections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["withheld_by_sharing_rules"].as_u64().unwrap())
        .sum();
    assert!(withheld > 0, "the hospital page counts withheld GP items");
    // The Oxfordshire rule: the hospital sees coded GP data only; the hospice sees more.
    assert!(items_from(&acute, "A81001").iter().all(|c| c == "coded"));
    assert!(
        items_from(&hospice, "A81001")
            .iter()
            .any(|c| c == "free-text" || c == "document")
    );
}

#[test]
fn share_out_off_and_an_objection_keep_a_patients_data_at_the_publisher_but_send_the_sharing_record()
 {
    let temp = tempfile::tempdir().unwrap();
    let (hub, gp) = hub_and_gp(temp.path(), 3, 1);
    let patients = caseload(&gp, "A81001");
    let (withdrawn, objecting) = (&patients[0], &patients[1]);
    set_consent(&gp, withdrawn, "--share-out", "off");
    set_consent(&gp, objecting, "--objection", "on");
    let _hub = RunningNode::start(&hub);
    let _gp = RunningNode::start(&gp);
    let others = std::slice::from_ref(&patients[2]);
    let expected = documents_of(&gp, "A81001", DIRECT_CARE, Some(others)) + 2;
    assert!(wait_for(SYNC_WAIT, || held_from(&hub, "A81001") == expected));
    // Let the GP finish offering (a leak would show as more documents once it has).
    assert!(wait_for(SYNC_WAIT, || peer(&gp, "HUB01").is_some_and(
        |p| p["pending_out"] == 0 && p["last_sync_at"].is_i64()
    )));
    assert_eq!(held_from(&hub, "A81001"), expected);
    for nhs in [withdrawn, objecting] {
        let held = gp_sections(&hub, nhs);
        assert_eq!(held, vec!["sharing".to_string()], "only the sharing record");
    }
}

/// A hub keeps no read model of clinical items, so a record opened there would show none of
/// what it relays (and notices of items "withheld" that it only never indexed). It opens no
/// patient's record, in the view or on the command line, and says where to look instead; its
/// auditors still see the audit pages.
#[test]
fn a_hub_opens_no_patient_record_and_says_where_to_open_it() {
    let temp = tempfile::tempdir().unwrap();
    let (hub, gp) = hub_and_gp(temp.path(), 2, 7);
    let nhs = caseload(&gp, "A81001").remove(0);
    let running_hub = RunningNode::start(&hub);
    let _gp = RunningNode::start(&gp);
    assert!(wait_for(SYNC_WAIT, || held_from(&hub, "A81001")
        == shareable(&gp, "A81001")));

    let url = launch_url(
        &hub,
        &running_hub.address,
        &["--user", "C0001", "--name", "Dr Test", "--nhs", &nhs],
    );
    let refused = follow_launch(&url);
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(
        refused.body.contains("HUB01 is a hub") && refused.body.contains("care organisation"),
        "{}",
        refused.body
    );
    assert!(refused.header("set-cookie").is_none(), "no session opened");

    let hub_dir = hub.to_str().unwrap();
    let output = run(&[
        "record", "--dir", hub_dir, "--nhs", &nhs, "--user", "Operator",
    ]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("HUB01 is a hub"),
        "{}",
        stderr(&output)
    );

    // Its auditor still opens its audit pages.
    let auditor = role_session(&hub, &running_hub.address, "auditor");
    let (status, _) = http_get_as(&running_hub.address, "/audit", &auditor);
    assert_eq!(status, 200);
}

/// A new version of a clinical document reaches the hub as the GP's change, which the hub
/// checks by its hash chain against the GP's signed heads and appends to what it holds,
/// without rebuilding the document; the hospice, one version behind, gets exactly that
/// change from it, and every copy still verifies (`caremesh verify` loads the hub's appended
/// bytes as one document and compares them with the signed heads).
#[test]
fn new_versions_are_relayed_by_the_hub_as_appended_changes_and_every_copy_verifies() {
    let temp = tempfile::tempdir().unwrap();
    let (hub, gp, hospice, nhs) = gp_and_hospice(temp.path(), "Asthma", false);
    let _hub = RunningNode::start(&hub);
    let _gp = RunningNode::start(&gp);
    let _hospice = RunningNode::start(&hospice);
    let titles = |dir: &Path| -> Vec<String> {
        items_of(dir, "A81001", Some(&nhs))
            .into_iter()
            .map(|item| item.title)
            .collect()
    };
    assert!(wait_for(SYNC_WAIT, || titles(&hospice)
        .contains(&"Asthma".to_string())));

    for (id, problem) in [("problem-2", "Heart failure"), ("problem-3", "COPD")] {
        let path = temp.path().join(format!("{id}.json"));
        write_gp_condition(&path, id, problem, false);
        let output = ingest(&gp, &[path.to_str().unwrap()]);
        assert!(output.status.success(), "{}", stderr(&output));
        assert!(
            wait_for(SYNC_WAIT, || titles(&hospice)
                .contains(&problem.to_string())),
            "{problem} reached the hospice: {:?}",
            titles(&hospice)
        );
    }
    // The hub holds the problems document as its first copy with the GP's two changes
    // appended, under the GP's signed heads; the GP stored them appended as well.
    let signed_and_appended = |dir: &Path| -> Vec<(Vec<u8>, bool)> {
        database(dir)
            .prepare(
                "SELECT signed, appended_base IS NOT NULL FROM documents \
                 WHERE publisher = 'A81001' AND nhs = ?1 AND section = 'problems' \
                 AND class = 'coded'",
            )
            .unwrap()
            .query_map([&nhs], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let at_hub = signed_and_appended(&hub);
    let at_gp = signed_and_appended(&gp);
    assert_eq!(at_hub.len(), 1);
    assert!(at_hub[0].1, "appended at the hub, not saved whole");
    assert!(
        at_gp[0].1,
        "the publisher stores its own new versions appended too"
    );
    assert_eq!(
        at_hub[0].0, at_gp[0].0,
        "the GP's signed heads, relayed unchanged"
    );
    let appended = |dir: &Path| -> i64 {
        database(dir)
            .query_row(
                "SELECT count(*) FROM appended_changes WHERE doc_id = (SELECT doc_id \
                 FROM documents WHERE publisher = 'A81001' AND nhs = ?1 \
                 AND section = 'problems' AND class = 'coded')",
                [&nhs],
                |row| row.get(0),
            )
            .unwrap()
    };
    assert_eq!(appended(&hub), 2, "the GP's two changes, a row each");
    assert_eq!(appended(&gp), 2, "as the GP stored them");
    for home in [&hub, &gp, &hospice] {
        verify_ok(home);
    }
}

#[test]
fn items_dated_before_the_share_from_date_stay_at_the_publisher() {
    let temp = tempfile::tempdir().unwrap();
    let region = Region::new(temp.path());
    let hub = region.registered("HUB01", "hub", true, &[]);
    let gp = region.registered("A81001", "gp", false, &["HUB01"]);
    let agreements = temp.path().join("agreements.toml");
    let shipped = include_str!("../configs/agreements.toml");
    std::fs::write(
        &agreements,
        shipped.replace("# A81001 = \"2015-01-01\"", "A81001 = \"2015-01-01\""),
    )
    .unwrap();
    region.set_agreements(&agreements);
    region.publish(&[&hub, &gp]);
    ingest_generated(&gp, "A81001", 6, 1);
    let older = |items: &[caremesh_sync::Item], classes: &[&str]| {
        items
            .iter()
            .filter(|item| {
                !matches!(
                    item.section.to_string().as_str(),
                    "demographics" | "sharing"
                ) && item.effective.as_deref().unwrap_or("") < "2015-01-01"
                    && classes.contains(&item.class.to_string().as_str())
            })
            .count()
    };
    let at_gp = items_of(&gp, "A81001", None);
    let held_back = older(&at_gp, &["private"]);
    assert!(held_back > 0, "the generated history reaches before 2015");
    assert_eq!(
        older(&at_gp, &["coded", "free-text", "document", "sensitive"]),
        0
    );

    let _hub = RunningNode::start(&hub);
    let _gp = RunningNode::start(&gp);
    assert!(wait_for(SYNC_WAIT, || held_from(&hub, "A81001")
        == shareable(&gp, "A81001")));
    let at_hub = items_in_documents(&hub, "A81001");
    assert_eq!(
        older(
            &at_hub,
            &["coded", "free-text", "document", "sensitive", "private"]
        ),
        0
    );
    assert!(
        at_hub.iter().any(|item| item.section.is_clinical()),
        "the hub relays the practice's newer items"
    );
}

/// Whether `marker` appears anywhere in `dir`'s database files (main file and WAL), as
/// someone copying them off a lost laptop would search.
fn on_disk(dir: &Path, marker: &str) -> bool {
    ["node.db", "node.db-wal"].iter().any(|name| {
        std::fs::read(dir.join(name)).is_ok_and(|bytes| {
            bytes
                .windows(marker.len())
                .any(|window| window == marker.as_bytes())
        })
    })
}

/// A GP condition about the generated patient `A81001-S1-P0` titled `text`; `private` tags it
/// private to the GP, as a clinical system exports its private flag.
fn write_gp_condition(path: &Path, id: &str, text: &str, private: bool) {
    let mut meta = serde_json::json!({"lastUpdated": "2026-01-05T09:00:00Z"});
    if private {
        meta["tag"] = serde_json::json!([{"system": "urn:caremesh:sharing", "code": "private"}]);
    }
    write_json(
        path,
        &serde_json::json!({
            "resourceType": "Condition",
            "id": id,
            "meta": meta,
            "clinicalStatus": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                "code": "active"
            }]},
            "code": {"text": text},
            "subject": {"reference": "Patient/A81001-S1-P0"},
            "recordedDate": "2026-01-05"
        }),
    );
}

fn set_consent(dir: &Path, nhs: &str, switch: &str, value: &str) {
    let output = run(&[
        "consent",
        "set",
        "--dir",
        dir.to_str().unwrap(),
        "--nhs",
        nhs,
        switch,
        value,
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
}

/// Sections of the GP's documents about `nhs` held at `dir`.
fn gp_sections(dir: &Path, nhs: &str) -> Vec<String> {
    let mut sections: Vec<String> = held_documents(dir)
        .iter()
        .filter(|meta| meta.publisher.as_str() == "A81001" && meta.patient.as_str() == nhs)
        .map(|meta| meta.section.to_string())
        .collect();
    sections.sort();
    sections
}

/// Homes of a hub, a GP and a hospice, and the NHS number of the patient both care for.
type GpAndHospice = (
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
    String,
);

/// A hub, a GP with three generated patients and a hospice caring for the first (P0), all
/// dialling the hub; the GP also holds a problem about P0 titled `problem`. Returns the
/// homes (hub, GP, hospice) and P0's NHS number.
fn gp_and_hospice(root: &Path, problem: &str, private: bool) -> GpAndHospice {
    gp_and_hospice_in(&Region::new(root), problem, private)
}

/// As [`gp_and_hospice`], in a region the caller keeps (to sign new registry editions).
fn gp_and_hospice_in(region: &Region, problem: &str, private: bool) -> GpAndHospice {
    let root = &region.root;
    let hub = region.registered("HUB01", "hub", true, &[]);
    let gp = region.registered("A81001", "gp", false, &["HUB01"]);
    let hospice = region.registered("HSP01", "hospice", false, &["HUB01"]);
    region.publish(&[&hub, &gp, &hospice]);
    ingest_generated(&gp, "A81001", 3, 1);
    ingest_generated(&hospice, "HSP01", 1, 1);
    let nhs = caseload(&hospice, "HSP01").remove(0);
    let condition = root.join("gp-problem.json");
    write_gp_condition(&condition, "added-problem", problem, private);
    let output = ingest(&gp, &[condition.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    (hub, gp, hospice, nhs)
}

#[test]
fn an_objection_purges_held_copies_from_disk_also_at_a_recipient_offline_then_and_consent_again_backfills()
 {
    objection_purges_and_consent_backfills(Homes::Plain);
}

/// As above with every home encrypted at rest: the marker is never in plain text in any file
/// of any home, and after the purge it is gone from what the hospice's key decrypts too
/// (every row of its database, every file it keeps), while it was there before.
#[test]
fn an_objection_purges_held_copies_from_encrypted_homes_too() {
    objection_purges_and_consent_backfills(Homes::Encrypted);
}

#[derive(Clone, Copy, PartialEq)]
enum Homes {
    Plain,
    Encrypted,
}

/// Whether `marker` is in `dir`'s data: in plain text in its database files for a plain
/// home; for an encrypted one, in what its data key decrypts (every value of every row of
/// its database, every file kept in processed/ and quarantine/), after checking that no file
/// anywhere in the home holds it in plain text.
fn holds(dir: &Path, marker: &str, homes: Homes) -> bool {
    match homes {
        Homes::Plain => on_disk(dir, marker),
        Homes::Encrypted => {
            assert_eq!(
                files_in_plain_text_holding(dir, marker),
                Vec::<String>::new(),
                "plain text in an encrypted home"
            );
            decrypted_holds(dir, marker)
        }
    }
}

/// Every file under `dir` whose bytes hold `marker`.
fn files_in_plain_text_holding(dir: &Path, marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap().flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                folders.push(entry.path());
            } else if kind.is_file()
                && std::fs::read(entry.path()).is_ok_and(|bytes| contains(&bytes, marker))
            {
                found.push(entry.path().display().to_string());
            }
        }
    }
    found
}

fn contains(bytes: &[u8], marker: &str) -> bool {
    bytes
        .windows(marker.len())
        .any(|window| window == marker.as_bytes())
}

/// Whether `marker` is in anything `dir`'s data key decrypts: a value of any row of any
/// table of its database (read on a read-only connection beside the running node), or a
/// file it keeps.
fn decrypted_holds(dir: &Path, marker: &str) -> bool {
    let home = caremesh::home::Home::open(dir).unwrap();
    let keys = home.data_keys().unwrap().expect("an encrypted home");
    let key = keys.current().clone();
    let connection = rusqlite::Connection::open_with_flags(
        home.database_path(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    connection
        .execute_batch(&format!("PRAGMA key = \"x'{}'\";", key.to_hex()))
        .unwrap();
    let tables: Vec<String> = connection
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table'")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(tables.len() > 5, "the key opened the database: {tables:?}");
    let in_rows = tables.iter().any(|table| {
        let mut statement = connection
            .prepare(&format!("SELECT * FROM \"{table}\""))
            .unwrap();
        let columns = statement.column_count();
        let mut rows = statement.query([]).unwrap();
        while let Some(row) = rows.next().unwrap() {
            for column in 0..columns {
                let held = match row.get_ref(column).unwrap() {
                    rusqlite::types::ValueRef::Text(bytes)
                    | rusqlite::types::ValueRef::Blob(bytes) => contains(bytes, marker),
                    _ => false,
                };
                if held {
                    return true;
                }
            }
        }
        false
    });
    let in_kept_files = [home.processed_dir(), home.quarantine_dir()]
        .iter()
        .flat_map(|folder| std::fs::read_dir(folder).unwrap().flatten())
        .any(|entry| {
            let bytes =
                caremesh_storage::sealed::read_kept(Some(&keys), &entry.path(), 1 << 30).unwrap();
            contains(&bytes, marker)
        });
    in_rows || in_kept_files
}

fn objection_purges_and_consent_backfills(homes: Homes) {
    let temp = tempfile::tempdir().unwrap();
    let marker = "PURGE-MARKER-5f1c9a0e";
    let (hub, gp, hospice, nhs) = gp_and_hospice(temp.path(), marker, false);
    if homes == Homes::Encrypted {
        let keys = temp.path().join("data-keys");
        std::fs::create_dir(&keys).unwrap();
        for home in [&hub, &gp, &hospice] {
            let key = keys.join(home.file_name().unwrap());
            let encrypted = run(&[
                "encrypt",
                "--dir",
                home.to_str().unwrap(),
                "--data-key-file",
                key.to_str().unwrap(),
            ]);
            assert!(encrypted.status.success(), "{}", stderr(&encrypted));
        }
    }
    let holds = |dir: &Path| holds(dir, marker, homes);
    let about_p0 = documents_of(&gp, "A81001", DIRECT_CARE, Some(std::slice::from_ref(&nhs)));

    let _hub_process = RunningNode::start(&hub);
    let _gp_process = RunningNode::start(&gp);
    let mut hospice_process = RunningNode::start(&hospice);
    let hospice_has = |n: i64| documents_of(&hospice, "A81001", DIRECT_CARE, None) == n;
    assert!(wait_for(SYNC_WAIT, || hospice_has(about_p0)));
    // The hub keeps no read model of clinical items, and Automerge compresses a snapshot's
    // columns, so the marker is not plain text in its files: what it relays is read from
    // its documents. The hospice's read model holds it as plain text.
    let relayed = |dir: &Path| {
        items_in_documents(dir, "A81001")
            .iter()
            .any(|item| item.title.contains(marker))
    };
    assert!(relayed(&hub), "the test would not see a leak");
    assert!(holds(&hospice), "the test would not see a leak");

    // The hospice goes offline; the patient objects at the GP meanwhile.
    hospice_process.kill_hard();
    set_consent(&gp, &nhs, "--objection", "on");
    let only_sharing = vec!["sharing".to_string()];
    assert!(
        wait_for(SYNC_WAIT, || gp_sections(&hub, &nhs) == only_sharing
            && !relayed(&hub)
            && !holds(&hub)),
        "the hub still holds {:?} (marker in its documents: {}, on disk: {})",
        gp_sections(&hub, &nhs),
        relayed(&hub),
        holds(&hub)
    );
    assert!(holds(&gp), "the GP keeps its own record");

    // Back online, the hospice gets the notice and purges; its late copies are refused.
    let _hospice_process = RunningNode::start(&hospice);
    assert!(
        wait_for(SYNC_WAIT, || gp_sections(&hospice, &nhs) == only_sharing
            && !holds(&hospice)),
        "the hospice still holds {:?} (marker on disk: {})",
        gp_sections(&hospice, &nhs),
        holds(&hospice)
    );
    assert_eq!(gp_sections(&hub, &nhs), only_sharing, "nothing came back");
    verify_ok(&hospice);

    // The objection is lifted: what was withheld is back-filled to both.
    set_consent(&gp, &nhs, "--objection", "off");
    assert!(
        wait_for(SYNC_WAIT, || hospice_has(about_p0)),
        "the hospice holds {} of {about_p0} GP documents",
        documents_of(&hospice, "A81001", DIRECT_CARE, None)
    );
    assert!(holds(&hospice));
    verify_ok(&hub);
}

/// A node rebuilt from its peers (its disk lost: a new database, with its key, configuration
/// and registry kept) gets back what its peers hold for it. The hub's feed has the GP's
/// documents about the hospice's patient more than an offer's worth of entries before the
/// hospice's own, so on its first pass the rebuilt hospice refuses the GP's (it does not yet
/// know it cares for the patient) and stores its own later; its own coming back from a peer
/// tells it that it lost them, and once caught up it takes the hub's feed again from the
/// start, which brings the GP's.
#[test]
fn a_node_rebuilt_from_its_peers_gets_back_what_it_refused_before_its_own_documents_returned() {
    let temp = tempfile::tempdir().unwrap();
    let region = Region::new(temp.path());
    let hub = region.registered("HUB01", "hub", true, &[]);
    let gp = region.registered("A81001", "gp", false, &["HUB01"]);
    let hospice = region.registered("HSP01", "hospice", false, &["HUB01"]);
    region.publish(&[&hub, &gp, &hospice]);
    // The GP's documents fill more than one offer (256 feed entries).
    ingest_generated(&gp, "A81001", 60, 1);
    ingest_generated(&hospice, "HSP01", 1, 1);
    let nhs = caseload(&hospice, "HSP01").remove(0);
    let gp_documents = shareable(&gp, "A81001");
    assert!(
        gp_documents > caremesh_sync::session::OFFER_BATCH as i64,
        "{gp_documents} GP documents"
    );
    let gp_about_p0 = documents_of(&gp, "A81001", DIRECT_CARE, Some(std::slice::from_ref(&nhs)));
    let hospice_own = documents_of(&hospice, "HSP01", DIRECT_CARE, None);
    assert!(gp_about_p0 > 0 && hospice_own > 0);

    // The GP's documents reach the hub before the hospice's.
    let _hub_process = RunningNode::start(&hub);
    let _gp_process = RunningNode::start(&gp);
    assert!(wait_for(SYNC_WAIT, || documents_of(
        &hub,
        "A81001",
        DIRECT_CARE,
        None
    ) == shareable(&gp, "A81001")));
    let mut hospice_process = RunningNode::start(&hospice);
    let hospice_has_all = || {
        documents_of(&hospice, "A81001", DIRECT_CARE, None) == gp_about_p0
            && documents_of(&hub, "HSP01", DIRECT_CARE, None) == hospice_own
    };
    assert!(wait_for(SYNC_WAIT, hospice_has_all));

    // The hospice's disk is lost; it is rebuilt from its home's key, configuration and
    // registry on a new disk.
    hospice_process.kill_hard();
    for name in ["node.db", "node.db-wal", "node.db-shm"] {
        let _ = std::fs::remove_file(hospice.join(name));
    }
    std::fs::remove_dir_all(hospice.join("processed")).unwrap();
    assert!(!hospice.join("node.db").exists());

    let _hospice_process = RunningNode::start(&hospice);
    assert!(
        wait_for(SYNC_WAIT, || documents_of(
            &hospice,
            "HSP01",
            DIRECT_CARE,
            None
        ) == hospice_own
            && documents_of(&hospice, "A81001", DIRECT_CARE, None)
                == gp_about_p0),
        "the rebuilt hospice holds {} of its own {hospice_own} documents and {} of the GP's {gp_about_p0} about its patient",
        documents_of(&hospice, "HSP01", DIRECT_CARE, None),
        documents_of(&hospice, "A81001", DIRECT_CARE, None)
    );
    let record = record_json(&hospice, &nhs).expect("the rebuilt hospice shows its patient");
    assert!(
        record["sources"].to_string().contains("A81001"),
        "the GP is a source of the rebuilt hospice's record: {}",
        record["sources"]
    );
    verify_ok(&hospice);
}

/// The record the view at `node` serves for `nhs` in a launched session, as JSON.
fn api_record(node: &RunningNode, session: &str, nhs: &str) -> serde_json::Value {
    let (status, body) = http_get_as(&node.address, &format!("/api/patients/{nhs}"), session);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Items in the served record published by `ods`.
fn shown_from(record: &serde_json::Value, ods: &str) -> Vec<serde_json::Value> {
    record["sections"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["items"].as_array().unwrap())
        .filter(|i| i["source"]["organisation"] == ods)
        .cloned()
        .collect()
}

/// Finding: after two organisations' keys were revoked, the GP still showed their items with
/// no marker. A retired key (a rollover) keeps what it signed while current; a compromised
/// one hides everything it signed from the view, with a warning naming the organisation.
#[test]
fn what_a_compromised_key_signed_is_hidden_with_a_warning_and_what_a_retired_key_signed_stays() {
    let temp = tempfile::tempdir().unwrap();
    let region = Region::new(temp.path());
    let (hub, gp, hospice, nhs) = gp_and_hospice_in(&region, "Asthma", false);
    {
        let _hub = RunningNode::start(&hub);
        let _gp = RunningNode::start(&gp);
        let _hospice = RunningNode::start(&hospice);
        let hospice_shares = documents_of(&hospice, "HSP01", DIRECT_CARE, None);
        assert!(wait_for(SYNC_WAIT, || held_from(&gp, "HSP01") == hospice_shares));
    }
    let before = record_json(&gp, &nhs).unwrap();
    let from_hospice = shown_from(&before, "HSP01").len();
    assert!(from_hospice > 0, "the GP shows the hospice's entries");
    assert_eq!(before["unverified_sources"], serde_json::json!([]));
    let hospice_key = std::fs::read_to_string(hospice.join("keys/signing.pub")).unwrap();
    let withdraw = |reason: &str| {
        region.withdraw("HSP01", Some(hospice_key.trim()), reason);
        region.publish(&[&gp]);
    };

    // A rollover: what the old key signed while current is still the hospice's record.
    withdraw("retired");
    let retired = record_json(&gp, &nhs).unwrap();
    assert_eq!(shown_from(&retired, "HSP01").len(), from_hospice);
    assert_eq!(retired["unverified_sources"], serde_json::json!([]));
    verify_ok(&gp);

    // Then the old key turns out to have been stolen: nothing it signed can be relied on.
    withdraw("compromised");
    let compromised = record_json(&gp, &nhs).unwrap();
    assert!(shown_from(&compromised, "HSP01").is_empty());
    let unverified = compromised["unverified_sources"].as_array().unwrap();
    assert_eq!(unverified.len(), 1, "{unverified:?}");
    assert_eq!(unverified[0]["ods"], "HSP01");
    // Its entries and its version of the patient's demographics.
    let hidden = from_hospice + 1;
    assert_eq!(unverified[0]["items"], hidden);
    // The GP's own entries are untouched.
    assert_eq!(
        shown_from(&compromised, "A81001").len(),
        shown_from(&before, "A81001").len()
    );
    let text = stdout(&record_as_tests(&gp, &nhs, &[]));
    assert!(
        text.contains(&format!(
            "WARNING: {hidden} items from Organisation HSP01 (HSP01) are not shown: the regional authority revoked the key that signed them"
        )),
        "{text}"
    );
    // `verify` names the documents the revoked key signed, as such (not as tampered).
    let output = run(&["verify", "--dir", gp.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(4), "{}", stdout(&output));
    assert!(
        stdout(&output).contains("REVOKED KEY on document"),
        "{}",
        stdout(&output)
    );
    assert!(!stdout(&output).contains("TAMPERED"), "{}", stdout(&output));
}

#[test]
fn without_share_in_the_view_hides_others_data_until_an_audited_break_glass_and_counts_what_rules_withheld()
 {
    let temp = tempfile::tempdir().unwrap();
    // A GP problem private to the practice, which the hospice may never hold.
    let (hub, gp, hospice, nhs) = gp_and_hospice(temp.path(), "Private to the practice", true);
    set_consent(&hospice, &nhs, "--share-in", "off");
    let withheld_problems = in_section(
        &items_of(&gp, "A81001", Some(&nhs)),
        "problems",
        &["private", "sensitive"],
    );
    assert!(withheld_problems >= 1);

    let _hub = RunningNode::start(&hub);
    let _gp = RunningNode::start(&gp);
    let hospice_process = RunningNode::start(&hospice);
    let about_p0 = documents_of(&gp, "A81001", DIRECT_CARE, Some(std::slice::from_ref(&nhs)));
    assert!(wait_for(SYNC_WAIT, || documents_of(
        &hospice,
        "A81001",
        DIRECT_CARE,
        None
    ) == about_p0));
    let held = items_of(&hospice, "A81001", Some(&nhs))
        .iter()
        .filter(|item| item.section.to_string() != "sharing")
        .count() as i64;
    assert!(held > 0);

    // Share In is off at the hospice: the GP's data is held but not shown, and counted.
    let session = clinician_session(&hospice, &hospice_process.address, &nhs);
    let record = api_record(&hospice_process, &session, &nhs);
    assert_eq!(record["share_in"], false);
    assert!(shown_from(&record, "A81001").is_empty());
    assert!(
        !shown_from(&record, "HSP01").is_empty(),
        "own data is always shown"
    );
    assert_eq!(record["hidden_without_share_in"], held);
    let problems = record["sections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["section"] == "problems")
        .unwrap();
    assert_eq!(problems["withheld_by_sharing_rules"], withheld_problems);
    let (_, page) = http_get_as(
        &hospice_process.address,
        &format!("/patients/{nhs}"),
        &session,
    );
    assert!(page.contains("withheld by sharing rules"));
    assert!(page.contains("Use emergency access"));
    assert!(!page.contains("Private to the practice"));
    let text = stdout(&run(&[
        "record",
        "--dir",
        hospice.to_str().unwrap(),
        "--nhs",
        &nhs,
        "--user",
        "Integration test",
    ]));
    assert!(text.contains("withheld by sharing rules"), "{text}");
    assert!(
        text.contains("not shown: Share In is not recorded here"),
        "{text}"
    );

    // Break-glass needs a reason; with one, it is recorded and shows the GP's data, flagged.
    let path = format!("/patients/{nhs}/break-glass");
    let (status, body) = http_post_form_as(&hospice_process.address, &path, "reason=", &session);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("reason"));
    let (status, _) = http_post_form_as(
        &hospice_process.address,
        &path,
        "reason=Unresponsive+on+arrival%2C+medication+history+needed",
        &session,
    );
    assert_eq!(status, 303);
    let record = api_record(&hospice_process, &session, &nhs);
    assert_eq!(record["break_glass"]["clinician"], "Dr Test Clinician");
    let shown = shown_from(&record, "A81001");
    let demographics = in_section(
        &items_of(&hospice, "A81001", Some(&nhs)),
        "demographics",
        &["coded", "free-text", "document", "sensitive", "private"],
    );
    assert_eq!(
        shown.len() as i64,
        held - demographics,
        "everything held (demographics go to the header), nothing more"
    );
    assert!(shown.iter().all(|i| i["shown_by"] == "break-glass"));
    assert_eq!(record["hidden_without_share_in"], 0);
    let other_clinician = session_cookie(&follow_launch(&launch_url(
        &hospice,
        &hospice_process.address,
        &["--user", "C0002", "--name", "Nurse Other", "--nhs", &nhs],
    )));
    assert!(
        shown_from(
            &api_record(&hospice_process, &other_clinician, &nhs),
            "A81001"
        )
        .is_empty(),
        "break-glass is the clinician's own, not the whole hospice's"
    );
    let (_, page) = http_get_as(
        &hospice_process.address,
        &format!("/patients/{nhs}"),
        &session,
    );
    assert!(page.contains("Emergency access (break-glass)</strong> by Dr Test Clinician"));
    assert!(
        !page.contains("Private to the practice"),
        "break-glass never shows private items"
    );
    let history = caremesh_storage::Store::open_read_only(&hospice.join("node.db"))
        .unwrap()
        .break_glass_history(&caremesh_sync::NhsNumber::parse(&nhs).unwrap())
        .unwrap();
    assert_eq!(history.len(), 1);
    let granted = &history[0];
    assert_eq!(
        (
            granted.clinician.clone(),
            granted.reason.clone(),
            granted.expires_at - granted.started_at
        ),
        (
            "Dr Test Clinician".to_string(),
            "Unresponsive on arrival, medication history needed".to_string(),
            3600
        )
    );
    // The DPO's report of the patient's break-glass entries.
    let report = run(&[
        "audit",
        "report",
        "--dir",
        hospice.to_str().unwrap(),
        "--patient",
        &nhs,
        "--action",
        "break-glass",
        "--format",
        "json",
    ]);
    assert!(report.status.success(), "{}", stderr(&report));
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout(&report)).unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let event = &rows[0];
    assert_eq!(event["user_name"], "Dr Test Clinician");
    assert_eq!(
        event["detail"],
        "Unresponsive on arrival, medication history needed"
    );

    // The GP learns, through the hub, that the hospice's clinician saw its data and why.
    let report = || -> Vec<serde_json::Value> {
        let output = run(&[
            "audit",
            "report",
            "--dir",
            gp.to_str().unwrap(),
            "--patient",
            &nhs,
            "--format",
            "json",
        ]);
        assert!(output.status.success(), "{}", stderr(&output));
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let from_hospice = |rows: &[serde_json::Value]| -> Option<serde_json::Value> {
        rows.iter()
            .find(|r| r["recorded_by"] == "HSP01" && r["action"] == "view")
            .cloned()
    };
    assert!(
        wait_for(SYNC_WAIT, || from_hospice(&report()).is_some()),
        "the hospice's access record never reached the GP"
    );
    let view = from_hospice(&report()).unwrap();
    assert_eq!(view["organisation"], "HSP01");
    assert_eq!(view["user_id"], "C0001");
    assert_eq!(view["user_name"], "Dr Test Clinician");
    assert_eq!(view["role"], "clinician");
    assert_eq!(view["nhs"], nhs.as_str());
    assert_eq!(view["purpose"], "direct care (emergency access)");
    assert!(
        view["detail"]
            .as_str()
            .unwrap()
            .starts_with("break-glass: Unresponsive on arrival, medication history needed"),
        "{view}"
    );
    assert!(
        view["sources"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("A81001"))
    );
    assert!(view["entry"].as_i64().unwrap() > 0);
    // Views that showed only the hospice's own data stay at the hospice.
    assert!(
        report()
            .iter()
            .filter(|r| r["recorded_by"] == "HSP01")
            .all(|r| r["sources"]
                .as_array()
                .unwrap()
                .contains(&serde_json::json!("A81001"))),
        "only views of the GP's data are sent to the GP"
    );
    // The access record is not care: the hub holds it, and it does not count as the
    // hospice's data in the GP's view of its own patient.
    assert_eq!(
        held_documents(&hub)
            .iter()
            .filter(|meta| meta.publisher.as_str() == "HSP01"
                && meta.patient.as_str() == nhs
                && meta.section.to_string() == "audit")
            .count(),
        1
    );

    // A batch source older than its stated refresh (12 hours here) is flagged. Time is moved
    // by ageing the hospice's record of the GP's newest data, as thirteen hours would.
    let (_, page) = http_get_as(
        &hospice_process.address,
        &format!("/patients/{nhs}"),
        &session,
    );
    assert!(
        !page.contains("may be out of date"),
        "fresh data is not flagged"
    );
    database(&hospice)
        .execute(
            "UPDATE sources SET data_as_of = data_as_of - 13 * 3600 WHERE publisher = 'A81001'",
            [],
        )
        .unwrap();
    let (_, page) = http_get_as(
        &hospice_process.address,
        &format!("/patients/{nhs}"),
        &session,
    );
    assert!(page.contains("may be out of date"), "{page}");
    assert!(page.contains("it is expected every 12 hours"), "{page}");
    assert!(
        page.contains(">out of date</strong>"),
        "the sources panel marks it too"
    );
}

/// Turns on the wire log (`[sync] wire_log`) in a node home's config.
fn log_wire(dir: &Path) {
    let config = dir.join("caremesh.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replacen("[sync]\n", "[sync]\nwire_log = \"wire.log\"\n", 1);
    std::fs::write(&config, text).unwrap();
}

/// Document ids (hex) named by any frame `dir` received, as its wire log recorded them.
fn received_ids(dir: &Path) -> std::collections::BTreeSet<String> {
    let log = std::fs::read_to_string(dir.join("wire.log")).unwrap_or_default();
    log.lines()
        .filter_map(|line| line.split(' ').nth(3))
        .flat_map(|ids| ids.split(','))
        .filter(|id| !id.is_empty())
        .map(str::to_string)
        .collect()
}

/// Ids (hex) of the GP's documents at `gp`, sharing records aside, about `patient` (any
/// when `None`) in one of `classes`.
fn gp_doc_ids(gp: &Path, patient: Option<&str>, classes: &[&str]) -> Vec<String> {
    held_documents(gp)
        .iter()
        .filter(|meta| {
            meta.publisher.as_str() == "A81001"
                && meta.section.to_string() != "sharing"
                && patient.is_none_or(|nhs| meta.patient.as_str() == nhs)
                && classes.contains(&meta.class.to_string().as_str())
        })
        .map(|meta| meta.id().to_string())
        .collect()
}

/// Every class a document can be in.
const ALL_CLASSES: &[&str] = &["coded", "free-text", "document", "sensitive", "private"];

/// One rule of the leak matrix: documents that must never reach `recipients`.
struct Forbidden<'a> {
    rule: &'a str,
    docs: Vec<String>,
    recipients: Vec<(&'a str, &'a Path)>,
}

#[test]
fn leak_matrix_every_sharing_rule_keeps_its_items_off_the_recipients_wire_and_disk() {
    let temp = tempfile::tempdir().unwrap();
    let region = Region::new(temp.path());
    let hub = region.registered("HUB01", "hub", true, &[]);
    let gp = region.registered("A81001", "gp", false, &["HUB01"]);
    let acute = region.registered("RTH01", "acute", false, &["HUB01"]);
    let hospice = region.registered("HSP01", "hospice", false, &["HUB01"]);
    region.publish(&[&hub, &gp, &acute, &hospice]);
    for dir in [&hub, &acute, &hospice] {
        log_wire(dir);
    }
    // GP: P0..P3. Acute trust: P0, P1. Hospice: P0.
    ingest_generated(&gp, "A81001", 4, 1);
    ingest_generated(&acute, "RTH01", 2, 1);
    ingest_generated(&hospice, "HSP01", 1, 1);
    let patients = caseload(&gp, "A81001");
    let nhs_of = |key: &str| {
        caremesh_storage::Store::open_read_only(&gp.join("node.db"))
            .unwrap()
            .patient_link(key)
            .unwrap()
            .expect("the patient is linked")
            .to_string()
    };
    let (p0, p1, p2, p3) = (
        nhs_of("Patient/A81001-S1-P0"),
        nhs_of("Patient/A81001-S1-P1"),
        nhs_of("Patient/A81001-S1-P2"),
        nhs_of("Patient/A81001-S1-P3"),
    );
    assert_eq!(patients.len(), 4);
    let private_problem = temp.path().join("private.json");
    write_gp_condition(
        &private_problem,
        "private-problem",
        "LEAK-PRIVATE-4c1d",
        true,
    );
    let sensitive_problem = temp.path().join("sensitive.json");
    write_json(
        &sensitive_problem,
        &serde_json::json!({
            "resourceType": "Condition", "id": "sensitive-problem",
            "meta": {"lastUpdated": "2026-01-05T09:00:00Z"},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "86406008",
                                 "display": "LEAK-SENSITIVE-9e2a"}]},
            "subject": {"reference": "Patient/A81001-S1-P0"}, "recordedDate": "2026-01-05"
        }),
    );
    // A coded problem with a clinician's note: the acute trust gets the coded resource (an
    // agreement keeps GP free text from it) and must get none of the note with it.
    let noted_problem = temp.path().join("noted.json");
    write_json(
        &noted_problem,
        &serde_json::json!({
            "resourceType": "Condition", "id": "noted-problem",
            "meta": {"lastUpdated": "2026-01-05T09:00:00Z"},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "195967001",
                                 "display": "CODED-ASTHMA-2d8f"}]},
            "note": [{"text": "LEAK-NOTE-7b3e: lives with her daughter since the divorce"}],
            "subject": {"reference": "Patient/A81001-S1-P0"}, "recordedDate": "2026-01-05"
        }),
    );
    let output = ingest(
        &gp,
        &[
            private_problem.to_str().unwrap(),
            sensitive_problem.to_str().unwrap(),
            noted_problem.to_str().unwrap(),
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    set_consent(&gp, &p1, "--share-out", "off");
    set_consent(&gp, &p2, "--objection", "on");

    let recipients_all = || {
        vec![
            ("hub", hub.as_path()),
            ("acute", acute.as_path()),
            ("hospice", hospice.as_path()),
        ]
    };
    let matrix = [
        Forbidden {
            rule: "private items stay at the recording organisation",
            docs: gp_doc_ids(&gp, None, &["private"]),
            recipients: recipients_all(),
        },
        Forbidden {
            rule: "sensitive items are withheld by default",
            docs: gp_doc_ids(&gp, None, &["sensitive"]),
            recipients: recipients_all(),
        },
        Forbidden {
            rule: "the Oxfordshire agreement: acute trusts get no GP free text or documents (and the hub does not forward them)",
            docs: gp_doc_ids(&gp, None, &["free-text", "document"]),
            recipients: vec![("acute", acute.as_path())],
        },
        Forbidden {
            rule: "Share Out off",
            docs: gp_doc_ids(&gp, Some(&p1), ALL_CLASSES),
            recipients: recipients_all(),
        },
        Forbidden {
            rule: "an objection",
            docs: gp_doc_ids(&gp, Some(&p2), ALL_CLASSES),
            recipients: recipients_all(),
        },
        Forbidden {
            rule: "caseload: a patient the recipient does not care for",
            docs: gp_doc_ids(&gp, Some(&p3), ALL_CLASSES),
            recipients: vec![("acute", acute.as_path()), ("hospice", hospice.as_path())],
        },
        Forbidden {
            rule: "caseload: the hospice does not care for P1",
            docs: gp_doc_ids(&gp, Some(&p1), ALL_CLASSES),
            recipients: vec![("hospice", hospice.as_path())],
        },
    ];
    for case in &matrix {
        assert!(
            !case.docs.is_empty(),
            "no documents to test for: {}",
            case.rule
        );
    }

    let _hub_process = RunningNode::start(&hub);
    let _gp_process = RunningNode::start(&gp);
    let _acute_process = RunningNode::start(&acute);
    let _hospice_process = RunningNode::start(&hospice);
    let coded_p0 = documents_of(&gp, "A81001", CODED, Some(std::slice::from_ref(&p0)));
    let direct_p0 = documents_of(&gp, "A81001", DIRECT_CARE, Some(std::slice::from_ref(&p0)));
    assert!(wait_for(SYNC_WAIT, || {
        documents_of(&acute, "A81001", CODED, Some(std::slice::from_ref(&p0))) == coded_p0
            && documents_of(&hospice, "A81001", DIRECT_CARE, None) == direct_p0
            && held_from(&hub, "A81001") > 0
    }));
    // Everyone has finished offering and pulling: a leak would have happened by now.
    let settled = |dir: &Path, peer_ods: &str| {
        peer(dir, peer_ods).is_some_and(|p| {
            p["pending_out"] == 0 && p["pending_in"] == 0 && p["last_sync_at"].is_i64()
        })
    };
    assert!(wait_for(SYNC_WAIT, || settled(&gp, "HUB01")
        && settled(&acute, "HUB01")
        && settled(&hospice, "HUB01")));

    // Positive controls: the wire logs see what is allowed, so their silence means something.
    let allowed = [
        (
            "hospice",
            &hospice,
            gp_doc_ids(&gp, Some(&p0), &["free-text", "document"]),
        ),
        ("acute", &acute, gp_doc_ids(&gp, Some(&p0), &["coded"])),
        ("hub", &hub, gp_doc_ids(&gp, Some(&p3), &["coded"])),
    ];
    for (name, dir, docs) in &allowed {
        assert!(!docs.is_empty());
        let received = received_ids(dir);
        assert!(
            docs.iter().all(|d| received.contains(d)),
            "{name}'s wire log misses allowed documents"
        );
    }
    for case in &matrix {
        for (name, dir) in &case.recipients {
            let received = received_ids(dir);
            let held: std::collections::BTreeSet<String> = held_documents(dir)
                .iter()
                .filter(|meta| meta.publisher.as_str() == "A81001")
                .map(|meta| meta.id().to_string())
                .collect();
            for doc in &case.docs {
                assert!(
                    !received.contains(doc),
                    "{}: document {doc} crossed the wire to the {name}",
                    case.rule
                );
                assert!(
                    !held.contains(doc),
                    "{}: document {doc} is stored at the {name}",
                    case.rule
                );
            }
        }
    }
    for dir in [&hub, &acute, &hospice] {
        assert!(!on_disk(dir, "LEAK-PRIVATE-4c1d"));
        assert!(!on_disk(dir, "LEAK-SENSITIVE-9e2a"));
    }
    // The note travels only in the free-text item: the coded resource the acute trust holds
    // carries none of it, and the hospice (which may see free text) holds both.
    assert!(
        on_disk(&acute, "CODED-ASTHMA-2d8f"),
        "the coded problem reached the acute trust"
    );
    assert!(
        !on_disk(&acute, "LEAK-NOTE-7b3e"),
        "the note reached the acute trust"
    );
    let acute_wire = std::fs::read_to_string(acute.join("wire.log")).unwrap_or_default();
    assert!(!acute_wire.contains("LEAK-NOTE-7b3e"));
    assert!(on_disk(&hospice, "CODED-ASTHMA-2d8f") && on_disk(&hospice, "LEAK-NOTE-7b3e"));
    assert!(
        on_disk(&gp, "LEAK-PRIVATE-4c1d"),
        "the markers are searchable where they are held"
    );
}

/// A GP laptop is backed up while its node runs and syncs, changes after the backup reach
/// the hub, and the laptop is lost. The backup, restored on a new machine (another folder)
/// with the data key kept apart, is the same node: it resumes sync with the hub, gets back
/// from it what changed after the backup, and sends the hub none of what it holds. The
/// backup holds nothing in plain text, and making it is audited.
#[test]
fn a_backup_made_while_the_node_runs_restores_elsewhere_and_resumes_sync() {
    let temp = tempfile::tempdir().unwrap();
    let region = Region::new(temp.path());
    let hub = region.registered("HUB01", "hub", true, &[]);
    let gp = region.registered("A81001", "gp", false, &["HUB01"]);
    region.publish(&[&hub, &gp]);
    ingest_generated(&gp, "A81001", 20, 1);
    let key = temp.path().join("kept-apart/gp-data.key");
    std::fs::create_dir(key.parent().unwrap()).unwrap();
    let encrypted = run(&[
        "encrypt",
        "--dir",
        gp.to_str().unwrap(),
        "--data-key-file",
        key.to_str().unwrap(),
    ]);
    assert!(encrypted.status.success(), "{}", stderr(&encrypted));
    let nhs = caseload(&gp, "A81001").remove(0);

    let _hub_process = RunningNode::start(&hub);
    let mut gp_process = RunningNode::start(&gp);
    let hub_holds_all = |expected: i64| {
        wait_for(SYNC_WAIT, || {
            documents_of(&hub, "A81001", DIRECT_CARE, None) == expected
        })
    };
    assert!(hub_holds_all(shareable(&gp, "A81001")));

    let backup = temp.path().join("offsite/gp.backup");
    std::fs::create_dir(backup.parent().unwrap()).unwrap();
    let made = run(&[
        "backup",
        "--dir",
        gp.to_str().unwrap(),
        "--out",
        backup.to_str().unwrap(),
    ]);
    assert!(made.status.success(), "{}", stderr(&made));
    let bytes = std::fs::read(&backup).unwrap();
    for marker in [nhs.as_str(), "A81001-S1-P0", "-----BEGIN"] {
        assert!(
            !contains(&bytes, marker),
            "{marker} in plain text in the backup"
        );
    }
    assert!(
        audit_trail_csv(&gp).contains("\"operator\",\"backup\""),
        "the backup is audited"
    );

    // After the backup: a new problem at the GP reaches the hub. Then the laptop is lost.
    let marker = "AFTER-BACKUP-MARKER-8e21";
    let condition = temp.path().join("after-backup.json");
    write_gp_condition(&condition, "after-backup", marker, false);
    let output = ingest(&gp, &[condition.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let shareable_now = shareable(&gp, "A81001");
    assert!(hub_holds_all(shareable_now));
    gp_process.kill_hard();

    // Restored on a new machine, with the key kept apart.
    let restored = temp.path().join("new-machine/gp");
    let output = run(&[
        "restore",
        "--from",
        backup.to_str().unwrap(),
        "--dir",
        restored.to_str().unwrap(),
        "--data-key-file",
        key.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("restored"), "{}", stdout(&output));
    assert!(
        !record_json(&restored, &nhs)
            .unwrap()
            .to_string()
            .contains(marker),
        "the backup was made before the problem"
    );
    // Until it has taken back what it published after the backup, it publishes nothing new:
    // a version written now would number its change as one the hub holds with other content.
    let later = temp.path().join("after-restore.json");
    write_gp_condition(&later, "after-restore", "AFTER-RESTORE-MARKER-51c0", false);
    let refused = ingest(&restored, &[later.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("publishes nothing new (restored from a backup made at"),
        "{}",
        stderr(&refused)
    );
    let hold = |dir: &Path| status_json(dir)["publishing_hold"].clone();
    assert_eq!(hold(&restored)["held"], true, "{}", hold(&restored));
    let sent_at_restore = peer(&restored, "HUB01").unwrap()["documents_sent"]
        .as_i64()
        .unwrap();
    let _restored_process = RunningNode::start(&restored);
    assert!(
        wait_for(SYNC_WAIT, || record_json(&restored, &nhs)
            .is_some_and(|record| record.to_string().contains(marker))),
        "what changed after the backup comes back from the hub"
    );
    assert!(wait_for(SYNC_WAIT, || documents_of(
        &restored,
        "A81001",
        DIRECT_CARE,
        None
    ) == shareable_now));
    // Caught up, its status saved: what it sent the hub in its sessions since the restore.
    let caught_up = || {
        peer(&restored, "HUB01").is_some_and(|status| {
            !status["last_sync_at"].is_null() && status["peer_acked"] == status["local_tip"]
        })
    };
    assert!(
        wait_for(SYNC_WAIT, caught_up),
        "{:?}",
        peer(&restored, "HUB01")
    );
    let sent = peer(&restored, "HUB01").unwrap()["documents_sent"]
        .as_i64()
        .unwrap();
    assert!(
        sent - sent_at_restore <= 2,
        "the restored node sent {} documents the hub held ({shareable_now} shareable)",
        sent - sent_at_restore
    );
    assert_eq!(
        documents_of(&hub, "A81001", DIRECT_CARE, None),
        shareable_now
    );
    verify_ok(&restored);

    // Caught up with its one peer, it publishes again: the refused problem goes in and on.
    assert!(
        wait_for(SYNC_WAIT, || hold(&restored).is_null()),
        "{}",
        hold(&restored)
    );
    let output = ingest(&restored, &[later.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        wait_for(SYNC_WAIT, || items_in_documents(&hub, "A81001")
            .iter()
            .any(|item| item.title.contains("AFTER-RESTORE-MARKER-51c0"))),
        "the problem ingested after the hold reaches the hub"
    );

    // Nothing is restored over a node, nor with another key.
    let again = run(&[
        "restore",
        "--from",
        backup.to_str().unwrap(),
        "--dir",
        restored.to_str().unwrap(),
        "--data-key-file",
        key.to_str().unwrap(),
    ]);
    assert!(
        stderr(&again).contains("is not empty"),
        "{}",
        stderr(&again)
    );
    let other_key = temp.path().join("kept-apart/other.key");
    std::fs::write(&other_key, format!("{}\n", "cd".repeat(32))).unwrap();
    std::fs::set_permissions(
        &other_key,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let wrong = run(&[
        "restore",
        "--from",
        backup.to_str().unwrap(),
        "--dir",
        temp.path().join("elsewhere").to_str().unwrap(),
        "--data-key-file",
        other_key.to_str().unwrap(),
    ]);
    assert!(
        stderr(&wrong).contains("different data key"),
        "{}",
        stderr(&wrong)
    );
}
