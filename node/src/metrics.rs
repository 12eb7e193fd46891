//! GET /metrics: the node's sync and storage figures in Prometheus text format.
//!
//! Per-peer figures come from the status rows the sync engine writes every second (the same
//! rows `caremesh status` prints), so the two never disagree; process-wide counters come from
//! the running engine.

use crate::clock;
use crate::network::SyncCounters;
use caremesh_storage::{StorageError, Store};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::Ordering;

type Labels = Vec<(String, String)>;

fn gauge_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let family = Family::<Labels, Gauge>::default();
    registry.register(name, help, family.clone());
    family
}

fn counter_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    registry.register(name, help, family.clone());
    family
}

pub fn render(
    store: &Store,
    counters: Option<&SyncCounters>,
    home_dir: &std::path::Path,
) -> Result<String, StorageError> {
    let now = clock::now_unix();
    let mut registry = Registry::default();
    let connected = gauge_family(
        &mut registry,
        "caremesh_peer_connected",
        "1 if a sync connection to the peer is up",
    );
    let last_sync = gauge_family(
        &mut registry,
        "caremesh_peer_last_sync_timestamp_seconds",
        "When this node last held everything in the peer's feed (Unix time)",
    );
    let pending_in = gauge_family(
        &mut registry,
        "caremesh_peer_pending_in",
        "Document versions in the peer's feed not yet pulled",
    );
    let pending_out = gauge_family(
        &mut registry,
        "caremesh_peer_pending_out",
        "Positions of this node's feed the peer has not acknowledged",
    );
    let bytes_sent = counter_family(&mut registry, "caremesh_peer_sent_bytes", "Bytes sent");
    let bytes_received = counter_family(
        &mut registry,
        "caremesh_peer_received_bytes",
        "Bytes received",
    );
    let documents_sent = counter_family(
        &mut registry,
        "caremesh_peer_sent_documents",
        "Document versions sent",
    );
    let documents_received = counter_family(
        &mut registry,
        "caremesh_peer_received_documents",
        "Document versions received, verified and stored",
    );
    let rejected = counter_family(
        &mut registry,
        "caremesh_peer_rejected_changes",
        "Received documents that failed verification and were not stored",
    );
    for peer in store.current_peer_statuses()? {
        let labels = vec![("peer".to_string(), peer.peer.clone())];
        connected
            .get_or_create(&labels)
            .set(i64::from(peer.is_connected(now)));
        last_sync
            .get_or_create(&labels)
            .set(peer.last_sync_at.unwrap_or(0));
        pending_in
            .get_or_create(&labels)
            .set(peer.pending_in() as i64);
        pending_out
            .get_or_create(&labels)
            .set(peer.pending_out() as i64);
        bytes_sent.get_or_create(&labels).inc_by(peer.bytes_sent);
        bytes_received
            .get_or_create(&labels)
            .inc_by(peer.bytes_received);
        documents_sent
            .get_or_create(&labels)
            .inc_by(peer.documents_sent);
        documents_received
            .get_or_create(&labels)
            .inc_by(peer.documents_received);
        rejected.get_or_create(&labels).inc_by(peer.rejected);
    }
    let stats = store.stats()?;
    for (name, help, value) in [
        (
            "caremesh_patients",
            "Patients with data held",
            stats.patients,
        ),
        ("caremesh_documents", "Documents held", stats.documents),
        ("caremesh_items", "Items held", stats.items),
        (
            "caremesh_documents_unsendable",
            "Documents a peer wants that are too large to send in one frame (see caremesh status)",
            store.unsendable_documents()?.len() as i64,
        ),
        (
            "caremesh_disk_free_bytes",
            "Free space on the disk holding the node home",
            crate::disk::free_bytes(home_dir).unwrap_or(0) as i64,
        ),
        (
            "caremesh_disk_reserve_held",
            "1 while the disk reserve that keeps views audited on a full disk is in place",
            i64::from(crate::disk::reserve_held(home_dir)),
        ),
        (
            "caremesh_database_bytes",
            "Size of the database files",
            stats.database_bytes as i64,
        ),
    ] {
        let gauge = Gauge::<i64>::default();
        gauge.set(value);
        registry.register(name, help, gauge);
    }
    if let Some(counters) = counters {
        for (name, help, value) in [
            (
                "caremesh_handshakes_refused",
                "Incoming connections refused during the TLS handshake (unknown or revoked key)",
                counters.handshakes_refused.load(Ordering::Relaxed),
            ),
            (
                "caremesh_protocol_errors",
                "Sync connections closed because the peer broke the protocol",
                counters.protocol_errors.load(Ordering::Relaxed),
            ),
        ] {
            let counter = Counter::<u64>::default();
            counter.inc_by(value);
            registry.register(name, help, counter);
        }
    }
    let mut text = String::new();
    encode(&mut text, &registry).expect("writing to a String cannot fail");
    Ok(text)
}
