//! GET /metrics: the node's sync and storage figures in Prometheus text format.
//!
//! Per-peer figures come from the status rows the sync engine writes every second (the same
//! rows `caremesh status` prints), so the two never disagree; process-wide counters come from
//! the running engine.

use caremesh_fhir::clock;
use caremesh_storage::{StorageError, Store};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};

type Labels = Vec<(String, String)>;

/// Counters the node keeps in memory for /metrics, beside the per-peer rows in the database:
/// the node's sync service counts them.
#[derive(Debug, Default)]
pub struct SyncCounters {
    pub handshakes_refused: AtomicU64,
    pub protocol_errors: AtomicU64,
    /// Times a peer wanted a document too large to send.
    pub unsendable: AtomicU64,
}

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

/// What the node knows outside its database, for the figures about files and the disk.
pub struct Local<'a> {
    pub home_dir: &'a std::path::Path,
    pub drop_folder_paused: bool,
}

pub fn render(
    store: &Store,
    counters: Option<&SyncCounters>,
    local: &Local<'_>,
) -> Result<String, StorageError> {
    let home_dir = local.home_dir;
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
    let build = gauge_family(
        &mut registry,
        "caremesh_build_info",
        "The caremesh version running (always 1)",
    );
    build
        .get_or_create(&vec![(
            "version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        )])
        .set(1);
    let ingested = counter_family(
        &mut registry,
        "caremesh_ingested_files",
        "Extract files ingested, by outcome (accepted, partly rejected, rejected)",
    );
    for (outcome, count) in store.ingest_counts()? {
        ingested
            .get_or_create(&vec![("outcome".to_string(), outcome)])
            .inc_by(count.max(0) as u64);
    }
    let stale = gauge_family(
        &mut registry,
        "caremesh_source_stale",
        "1 if a batch source's newest data is older than its expected refresh",
    );
    let data_age = gauge_family(
        &mut registry,
        "caremesh_source_data_age_seconds",
        "How old each source's newest data is",
    );
    for source in store.sources()? {
        let labels = vec![("source".to_string(), source.publisher.clone())];
        stale
            .get_or_create(&labels)
            .set(i64::from(source.is_stale(now)));
        data_age
            .get_or_create(&labels)
            .set((now - source.data_as_of).max(0));
    }
    let stats = store.stats()?;
    let survey = caremesh_ingest::drop_folder::survey(&home_dir.join("drop"));
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
            "caremesh_last_ingest_timestamp_seconds",
            "When the last file was ingested (Unix time; 0 if none yet)",
            stats.last_ingest.as_ref().map_or(0, |last| last.at),
        ),
        (
            "caremesh_quarantined_files",
            "Files in quarantine/ (each with a .reason.txt beside it)",
            quarantined_files(&home_dir.join("quarantine")) as i64,
        ),
        (
            "caremesh_drop_folder_waiting_files",
            "Extract files in drop/ not yet ingested",
            survey.waiting as i64,
        ),
        (
            "caremesh_drop_folder_left_in_place",
            "Entries in drop/ that are never taken (see caremesh status)",
            survey.left_in_place.len() as i64,
        ),
        (
            "caremesh_drop_folder_paused",
            "1 while the drop folder is paused (see /health)",
            i64::from(local.drop_folder_paused),
        ),
        (
            "caremesh_disk_free_bytes",
            "Free space on the disk holding the node home",
            caremesh_storage::disk_space::free_bytes(home_dir).unwrap_or(0) as i64,
        ),
        (
            "caremesh_disk_reserve_held",
            "1 while the disk reserve that keeps views audited on a full disk is in place",
            i64::from(caremesh_storage::disk_space::reserve_held(home_dir)),
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
            (
                "caremesh_unsendable_wants",
                "Times a peer wanted a document too large to send (see caremesh_documents_unsendable)",
                counters.unsendable.load(Ordering::Relaxed),
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

fn quarantined_files(folder: &std::path::Path) -> usize {
    std::fs::read_dir(folder)
        .map(|entries| {
            entries
                .flatten()
                .filter(|entry| {
                    // Neither reasons nor hidden files (one being written, a probe).
                    let name = entry.file_name().to_string_lossy().to_string();
                    !name.ends_with(".reason.txt") && !name.starts_with('.')
                })
                .count()
        })
        .unwrap_or(0)
}
