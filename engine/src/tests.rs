//! Two drivers over real SQLite stores, joined by an in-memory link: what one publishes the
//! other holds, acknowledged only once durable, and the tie-break between two connections.

use super::*;
use caremesh_storage::Store;
use caremesh_storage::publish::Publication;
use caremesh_storage::sync_host::FixedRegistry;
use caremesh_sync::policy::Consent;
use caremesh_sync::{
    DataClass, Item, NhsNumber, OrgKind, Organisation, PublisherKey, Registry, RegistryFile,
    Section,
};
use std::sync::Arc;

const EPOCH_S: i64 = 1_795_305_600;

struct Node {
    ods: OdsCode,
    kind: OrgKind,
    key: PublisherKey,
    driver: Driver,
}

/// Unix seconds on the tests' clock, which they move on.
static CLOCK: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(EPOCH_S);

fn region(dir: &std::path::Path) -> (Node, Node) {
    let orgs = [("A81001", OrgKind::Gp, 1u8), ("Y00HUB", OrgKind::Hub, 2u8)];
    let keys: Vec<PublisherKey> = orgs
        .iter()
        .map(|(_, _, n)| PublisherKey::from_secret([*n; 32]))
        .collect();
    let mut registry = Registry::new("engine tests");
    for ((code, kind, _), key) in orgs.iter().zip(&keys) {
        registry.organisations.push(Organisation {
            ods: OdsCode::parse(code).unwrap(),
            name: code.to_string(),
            kind: *kind,
            keys: vec![hex_key(key)],
            revoked_keys: Vec::new(),
            retired_keys: Vec::new(),
            addresses: Vec::new(),
        });
    }
    let authority = [9u8; 32];
    let mut file = RegistryFile::unsigned(registry);
    file.sign(&authority, EPOCH_S).unwrap();
    let registry = Arc::new(
        VerifiedRegistry::from_bytes(
            file.to_json(),
            &caremesh_sync::trust::public_key_of(&authority),
        )
        .unwrap(),
    );
    let mut nodes = orgs
        .iter()
        .zip(keys)
        .map(|((code, kind, _), key)| {
            let ods = OdsCode::parse(code).unwrap();
            let store = Store::open(&dir.join(format!("{code}.db"))).unwrap();
            let host = StoreHost::new(
                store,
                Box::new(FixedRegistry(registry.clone())),
                ods.clone(),
                Consent::SENT_BY_PUBLISHER,
                Box::new(|| CLOCK.load(std::sync::atomic::Ordering::Relaxed)),
            )
            .unwrap();
            Node {
                driver: Driver::new(ods.clone(), host, DriverOptions::default(), 0),
                ods,
                kind: *kind,
                key,
            }
        })
        .collect::<Vec<_>>();
    let hub = nodes.pop().unwrap();
    let gp = nodes.pop().unwrap();
    (gp, hub)
}

fn hex_key(key: &PublisherKey) -> String {
    key.public().iter().map(|b| format!("{b:02x}")).collect()
}

fn publish(node: &mut Node, title: &str) {
    let Node {
        ods, key, driver, ..
    } = node;
    driver
        .write_local(|host| publish_into(&mut host.store, ods, key, title))
        .unwrap();
}

/// Publishes one item into `store` as `ods`, as ingest does.
fn publish_into(
    store: &mut Store,
    ods: &OdsCode,
    key: &PublisherKey,
    title: &str,
) -> Result<(), String> {
    let patient = NhsNumber::parse("9990000018").unwrap();
    let item = Item::titled(
        "Observation/1",
        Section::Problems,
        DataClass::Coded,
        "Observation",
        title,
        "test",
        "Observation/1",
    );
    let mut publication = Publication::new(ods.clone(), Consent::SENT_BY_PUBLISHER);
    let batch = store.write().map_err(|e| e.to_string())?;
    let family = ["Observation/1".to_string()];
    publication
        .place(&batch, &patient, &family, vec![item])
        .map_err(|e| e.to_string())?;
    publication
        .apply(&batch, key, EPOCH_S)
        .map_err(|e| e.to_string())?;
    batch.commit().map_err(|e| e.to_string())
}

fn recipient(node: &Node) -> (Recipient, [u8; 32]) {
    (
        Recipient {
            ods: node.ods.clone(),
            kind: node.kind,
        },
        node.key.public(),
    )
}

/// Moves frames both ways (each delivery a turn of its own) until neither side has any.
fn exchange(a: &mut Node, b: &mut Node, now: u64) -> usize {
    let mut moved = 0;
    loop {
        let before = moved;
        while let Some(out) = a.driver.poll_transmit(now, |_| true) {
            b.driver.receive(now, out.conn, out.read());
            moved += 1;
        }
        while let Some(out) = b.driver.poll_transmit(now, |_| true) {
            a.driver.receive(now, out.conn, out.read());
            moved += 1;
        }
        if moved == before {
            return moved;
        }
    }
}

fn held_heads(node: &Node) -> Vec<(DocId, Vec<[u8; 32]>)> {
    node.driver
        .host()
        .store
        .feed_after(0, 1_000)
        .unwrap()
        .into_iter()
        .map(|row| {
            let signed = caremesh_sync::SignedHeads::decode(&row.signed).unwrap();
            (row.meta.id(), signed.heads)
        })
        .collect()
}

#[test]
fn what_one_driver_publishes_the_other_holds_and_reports_stored_after_its_turn() {
    let dir = tempfile::tempdir().unwrap();
    let (mut gp, mut hub) = region(dir.path());
    publish(&mut gp, "asthma");
    assert!(gp.driver.connect(0, 1, recipient(&hub), true));
    assert!(hub.driver.connect(0, 1, recipient(&gp), false));
    assert!(exchange(&mut gp, &mut hub, 10) > 0);
    let mut expected = held_heads(&gp);
    let mut held = held_heads(&hub);
    expected.sort();
    held.sort();
    assert_eq!(
        held, expected,
        "the hub holds the GP's documents at its heads"
    );
    let mut stored = Vec::new();
    while let Some(event) = hub.driver.poll_event() {
        if let DriverEvent::Stored { documents, .. } = event {
            stored.extend(documents);
        }
    }
    stored.sort();
    assert_eq!(
        stored, expected,
        "each stored version reported once, after commit"
    );

    // A later change flows without waiting for a timer: the local write prompts sessions.
    publish(&mut gp, "asthma, resolved");
    exchange(&mut gp, &mut hub, 20);
    let mut held = held_heads(&hub);
    let mut expected = held_heads(&gp);
    held.sort();
    expected.sort();
    assert_eq!(held, expected);
}

/// [`region`] with a document published at the GP, both sides connected and one exchange
/// made.
fn connected_region(dir: &std::path::Path) -> (Node, Node) {
    let (mut gp, mut hub) = region(dir);
    publish(&mut gp, "asthma");
    gp.driver.connect(0, 1, recipient(&hub), true);
    hub.driver.connect(0, 1, recipient(&gp), false);
    exchange(&mut gp, &mut hub, 10);
    (gp, hub)
}

/// A write to the database through a connection other than the node's (`load-bench`'s
/// publishers write so; `caremesh ingest` hands its writes to a running node instead) is
/// offered at the node's next turn, whatever the host remembers of the feed. (`load-bench`
/// found a feed tip kept in memory until the node's next commit through its host: nodes
/// that only published that way offered late, or not at all. Here the GP also stores
/// checkpoints from the hub, which hid that; the contract is what is checked.)
#[test]
fn what_another_process_publishes_beside_a_running_node_is_offered_at_its_next_turn() {
    let dir = tempfile::tempdir().unwrap();
    let (mut gp, mut hub) = connected_region(dir.path());
    let mut beside = Store::open(&dir.path().join("A81001.db")).unwrap();
    publish_into(&mut beside, &gp.ods, &gp.key, "asthma, resolved").unwrap();
    let expected = held_heads(&gp);
    for ms in (100..=10_000).step_by(100) {
        gp.driver.handle_timeout(ms);
        hub.driver.handle_timeout(ms);
        exchange(&mut gp, &mut hub, ms);
        if held_heads(&hub) == expected {
            return;
        }
    }
    panic!("the hub never got the version published beside the GP's node");
}

#[test]
#[should_panic(expected = "frames leave only after the turn has committed")]
fn no_frame_is_produced_inside_a_turn() {
    let dir = tempfile::tempdir().unwrap();
    let (mut gp, hub) = region(dir.path());
    gp.driver.connect(0, 1, recipient(&hub), true);
    gp.driver.begin_turn();
    gp.driver.poll_transmit(0, |_| true);
}

#[test]
fn of_two_connections_to_one_peer_the_lower_codes_dial_survives() {
    let dir = tempfile::tempdir().unwrap();
    let (mut gp, hub) = region(dir.path());
    // A81001 < Y00HUB: the GP's own dial wins over the hub's, whichever came first.
    assert!(gp.driver.connect(0, 1, recipient(&hub), false));
    assert!(gp.driver.connect(0, 2, recipient(&hub), true));
    assert!(!gp.driver.connect(0, 3, recipient(&hub), false));
    let closes: Vec<(ConnId, CloseCause)> = std::iter::from_fn(|| gp.driver.poll_event())
        .filter_map(|event| match event {
            DriverEvent::Close { conn, cause, .. } => Some((conn, cause)),
            _ => None,
        })
        .collect();
    assert_eq!(closes, [(1, CloseCause::Replaced)]);
    assert_eq!(gp.driver.connected_peers().count(), 1);
}

#[test]
fn a_connection_without_room_is_held_back_until_retried() {
    let dir = tempfile::tempdir().unwrap();
    let (mut gp, hub) = region(dir.path());
    gp.driver.connect(0, 1, recipient(&hub), true);
    assert!(gp.driver.poll_transmit(0, |_| false).is_none());
    assert!(gp.driver.is_blocked());
    gp.driver.retry_blocked();
    assert!(gp.driver.poll_transmit(0, |_| true).is_some(), "the Hello");
    assert!(!gp.driver.is_blocked());
}

#[test]
fn an_idle_peers_status_row_is_rewritten_only_as_a_heartbeat() {
    let dir = tempfile::tempdir().unwrap();
    let (mut gp, hub) = connected_region(dir.path());
    let updated_at = |node: &Node, peer: &Node| {
        node.driver
            .host()
            .store
            .peer_status(&peer.ods)
            .unwrap()
            .unwrap()
            .updated_at
    };
    // The first flush writes the figures the exchange changed.
    let at = |ms: u64| EPOCH_S + (ms / 1000) as i64;
    let mut rows = Vec::new();
    for ms in [1_000, 2_000, 3_000, 4_000, 5_000] {
        CLOCK.store(at(ms), std::sync::atomic::Ordering::Relaxed);
        gp.driver.handle_timeout(ms);
        rows.push(updated_at(&gp, &hub));
    }
    CLOCK.store(EPOCH_S, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        rows,
        [at(1_000), at(1_000), at(1_000), at(4_000), at(4_000)],
        "written when it changed, then only every {STATUS_HEARTBEAT_MS} ms"
    );
}

/// Syncs `node`'s WAL and reports its latest commit durable, as the node's sync thread does.
fn sync(node: &mut Node) {
    if let Some(commit) = node.driver.poll_sync() {
        node.driver.host().store.wal_syncer().sync().unwrap();
        node.driver.durable(commit);
    }
}

fn stored_events(node: &mut Node) -> Vec<HeldVersion> {
    std::iter::from_fn(|| node.driver.poll_event())
        .filter_map(|event| match event {
            DriverEvent::Stored { documents, .. } => Some(documents),
            _ => None,
        })
        .flatten()
        .collect()
}

/// With deferred syncs a hub commits what it received without waiting for the disk, and
/// neither acknowledges it nor reports it stored until the commit is synced; then both
/// follow at once.
#[test]
fn with_deferred_syncs_nothing_is_acknowledged_or_reported_stored_before_the_sync() {
    let dir = tempfile::tempdir().unwrap();
    let (mut gp, mut hub) = region(dir.path());
    hub.driver.defer_syncs();
    publish(&mut gp, "asthma");
    gp.driver.connect(0, 1, recipient(&hub), true);
    hub.driver.connect(0, 1, recipient(&gp), false);
    let mut expected = held_heads(&gp);
    expected.sort();
    let mut reported = Vec::new();
    for round in 0.. {
        assert!(round < 20, "the hub never stored the GP's documents");
        exchange(&mut gp, &mut hub, 10);
        let mut held = held_heads(&hub);
        held.sort();
        if held == expected {
            break;
        }
        reported.extend(stored_events(&mut hub));
        sync(&mut hub);
    }
    // Committed, not yet synced: nothing leaves and nothing is reported.
    assert!(
        hub.driver.poll_transmit(10, |_| true).is_none(),
        "a frame left before its commit was durable"
    );
    let before_sync = stored_events(&mut hub);
    assert!(
        before_sync.is_empty(),
        "reported stored before durable: {before_sync:?}"
    );
    sync(&mut hub);
    let after_sync = stored_events(&mut hub);
    assert!(!after_sync.is_empty(), "the last turn's documents reported");
    reported.extend(after_sync);
    reported.sort();
    assert_eq!(
        reported, expected,
        "each version reported once, once durable"
    );
    let frame = hub
        .driver
        .poll_transmit(10, |_| true)
        .expect("the held acknowledgement leaves once durable");
    let mut decoder = caremesh_sync::wire::FrameDecoder::default();
    decoder.push(&frame.frame);
    assert!(
        matches!(
            decoder.next_message(),
            Ok(Some(caremesh_sync::wire::Message::Ack { .. }))
        ),
        "the first frame to leave is the acknowledgement"
    );
}

/// Publishes `count` problems for the tests' patient as `node`, with `consent` recorded for
/// them: the sharing record's counts (and consent) change with each new count.
fn publish_problems(node: &mut Node, count: usize, consent: Consent) {
    let Node {
        ods, key, driver, ..
    } = node;
    driver
        .write_local(|host| -> Result<(), String> {
            let patient = NhsNumber::parse("9990000018").unwrap();
            let mut publication = Publication::new(ods.clone(), Consent::SENT_BY_PUBLISHER);
            publication.set_consent(&patient, consent);
            let batch = host.store.write().map_err(|e| e.to_string())?;
            for n in 1..=count {
                let id = format!("Observation/{n}");
                let item = Item::titled(
                    &id,
                    Section::Problems,
                    DataClass::Coded,
                    "Observation",
                    "asthma",
                    "test",
                    &id,
                );
                publication
                    .place(&batch, &patient, std::slice::from_ref(&id), vec![item])
                    .map_err(|e| e.to_string())?;
            }
            publication
                .apply(&batch, key, EPOCH_S)
                .map_err(|e| e.to_string())?;
            batch.commit().map_err(|e| e.to_string())
        })
        .unwrap();
}

/// `node`'s read-model items about the tests' patient published by `publisher`, in one
/// section.
fn items_held(node: &Node, publisher: &OdsCode, section: Section) -> Vec<Item> {
    let patient = NhsNumber::parse("9990000018").unwrap();
    let mut items: Vec<Item> = (node.driver.host().store.patient_items(&patient).unwrap())
        .into_iter()
        .filter(|stored| stored.publisher == *publisher && stored.item.section == section)
        .map(|stored| stored.item)
        .collect();
    items.sort_by(|a, b| a.id.cmp(&b.id));
    items
}

/// That `hub` stored its newest version of the sharing record `sharing` from `gp` appended
/// (as only a version read from its changes alone is, of a document it reads), with a
/// register at that version, and reads it as `gp` wrote it.
fn assert_read_from_changes(hub: &Node, gp: &Node, sharing: DocId, version: &str) {
    let (_, index) = hub
        .driver
        .host()
        .store
        .held_index(sharing)
        .unwrap()
        .unwrap();
    assert!(
        index.appended.is_some(),
        "{version}: the hub stored the new version's changes appended"
    );
    let register = index.register.expect("a register at the stored version");
    assert_eq!(vec![register.head], index.heads);
    assert_eq!(
        items_held(hub, &gp.ods, Section::Sharing),
        items_held(gp, &gp.ods, Section::Sharing),
        "{version}: the hub reads the GP's sharing record as the GP wrote it"
    );
}

/// A hub reads each new version of a GP's sharing record from its changes alone
/// (`caremesh_sync::register`): it stores the changes appended, with a register at the new
/// version. What it reads must be what the GP wrote, so its read model's sharing item is the
/// GP's own at every version, and a withdrawal read that way still purges.
#[test]
fn a_hub_reads_new_versions_of_a_sharing_record_from_their_changes_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (mut gp, mut hub) = connected_region(dir.path());
    let patient = NhsNumber::parse("9990000018").unwrap();
    let sharing = caremesh_storage::publish::sharing_meta(&gp.ods, &patient).id();
    for (count, at) in [(2, 20), (3, 30), (4, 40)] {
        publish_problems(&mut gp, count, Consent::SENT_BY_PUBLISHER);
        exchange(&mut gp, &mut hub, at);
        assert_read_from_changes(&hub, &gp, sharing, &format!("version {count}"));
    }
    let problems = |node: &Node| items_held(node, &gp.ods, Section::Problems).len();
    assert!(problems(&hub) == 0, "a hub keeps no read model of problems");
    let held_problems = |hub: &Node| {
        hub.driver
            .host()
            .store
            .feed_after(0, 1_000)
            .unwrap()
            .into_iter()
            .filter(|row| row.meta.section == Section::Problems)
            .count()
    };
    assert_eq!(held_problems(&hub), 1, "the hub holds the GP's problems");

    // The patient objects: the sharing record's next version, read from its changes, is the
    // purge notice.
    let objecting = Consent {
        objection: true,
        ..Consent::SENT_BY_PUBLISHER
    };
    publish_problems(&mut gp, 4, objecting);
    exchange(&mut gp, &mut hub, 50);
    assert_read_from_changes(&hub, &gp, sharing, "the objection");
    assert_eq!(
        held_problems(&hub),
        0,
        "the objection purged the GP's problems"
    );
}
