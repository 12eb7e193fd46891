//! The floors of a hub's work per change (issue 19): what relaying one document version costs
//! at the least (the signature, the hash chain, a durable append), and the Automerge work a
//! hub pays on top where it rebuilds the document (sharing records, first copies). Each is
//! CPU time per operation on this process's clock, over many repetitions, beside the others
//! measured in the same run.
//!
//! ```sh
//! cargo build --release -p caremesh-bench
//! ./target/release/floors-bench
//! ```
//!
//! The document is one a hub relays every day: a GP's problems for one patient, 12 items,
//! published in 6 versions, changed by one item.

use anyhow::{Context, Result};
use caremesh_storage::Store;
use caremesh_sync::{DataClass, DocMeta, Item, OdsCode, PublishedDocument, PublisherKey, Section};
use std::hint::black_box;

const ITEMS: usize = 12;
const VERSIONS: usize = 6;
/// Rows in one group commit: a busy hub's turn.
const GROUP: usize = 256;
/// Changes appended to a relayed document: its size after about four minutes of
/// `hub-load`'s 500-node load.
const RELAYED: usize = 24;

fn main() -> Result<()> {
    let key = PublisherKey::from_secret([7; 32]);
    let meta = meta_for(0);
    let (before, after) = document_and_its_next_version(&meta);
    let snapshot = before.save();
    let changes = after.changes_since(&before.heads());
    let signed = key.sign_heads(&meta, &after.heads());
    let public = key.public();
    println!(
        "document: {ITEMS} items in {VERSIONS} versions, {} bytes saved; the change: {} chunk(s), {} bytes",
        snapshot.len(),
        changes.len(),
        changes.iter().map(Vec::len).sum::<usize>()
    );
    println!("{:<52} {:>12}", "operation", "CPU us/op");

    report("signed heads verified (ed25519)", 2_000, || {
        signed
            .verify(|_, key| *key == public)
            .expect("the signature verifies");
    });
    report(
        "changes hashed (Change::from_bytes, SHA-256)",
        20_000,
        || {
            for chunk in &changes {
                let change = automerge::Change::from_bytes(chunk.clone()).expect("a change");
                black_box(change.hash());
            }
        },
    );
    let held_heads = before.heads();
    let held = caremesh_sync::relay::HeldIndex {
        heads: held_heads.clone(),
        stored_len: snapshot.len() as u64,
        appended: None,
        register: None,
    };
    let extension =
        caremesh_sync::relay::extend(&held, &changes).expect("the change extends the held heads");
    let mut stored = snapshot.clone();
    stored.extend_from_slice(&extension.new_bytes);
    assert_eq!(
        extension.heads,
        after.heads(),
        "the chain ends at the new heads"
    );
    report(
        "hash chain checked and appended (a hub's relay path)",
        20_000,
        || {
            black_box(caremesh_sync::relay::extend(&held, &changes).expect("extends"));
        },
    );
    report(
        "changes a holder lacks, from the appended index",
        20_000,
        || {
            black_box(
                caremesh_sync::relay::changes_after(&stored, &extension.appended, &held_heads)
                    .expect("answered from the index"),
            );
        },
    );
    let load = report("document loaded from its snapshot", 500, || {
        black_box(PublishedDocument::load(&meta, &snapshot).expect("loads"));
    });
    let load_and_apply = report("document loaded and the change applied", 500, || {
        let mut copy = PublishedDocument::load(&meta, &snapshot).expect("loads");
        copy.apply_chunks(&changes).expect("applies");
        black_box(copy);
    });
    println!(
        "{:<52} {:>12.1}",
        "  so the change applied (the difference)",
        (load_and_apply - load) * 1e6
    );
    report(
        "items read (parsed and checked; a hub skips it)",
        500,
        || {
            black_box(after.items().expect("items read"));
        },
    );
    report("document saved whole", 500, || {
        black_box(after.save());
    });
    report(
        "changes a holder lacks, from the loaded document",
        2_000,
        || {
            black_box(after.changes_since(&held_heads));
        },
    );
    relay_index(&meta);
    durable_append(&key, true)?;
    durable_append(&key, false)?;
    relay_reads(&key, &meta)?;
    for history_kib in [0, 16, 64, 256] {
        relayed_versions_stored(&key, history_kib)?;
    }
    Ok(())
}

/// A relayed version stored as a hub stores it: the held copy's index read, the received
/// change checked by its hash chain and appended in a group commit of [`GROUP`] with fsync,
/// for documents that start with `history_kib` KiB of earlier problems' text
/// ([`caremesh_bench::earlier_problems`]). What a version costs should not grow with what
/// its document saved whole.
fn relayed_versions_stored(key: &PublisherKey, history_kib: u64) -> Result<()> {
    const ROUNDS: usize = 8;
    let dir = tempfile::tempdir().context("a temporary folder")?;
    let mut store = Store::open(&dir.path().join("relayed.db"))?;
    let mut words = caremesh_sync::rng::Rng::new(history_kib + 1);
    let mut documents = Vec::with_capacity(GROUP);
    let mut saved = Vec::with_capacity(GROUP);
    store.begin_group();
    for index in 0..GROUP {
        let meta = meta_for(index as u64 + 1);
        let mut document = PublishedDocument::create(meta.clone(), &[1]);
        let mut items = caremesh_bench::earlier_problems(&mut words, history_kib * 1024);
        items.extend(items_for(&meta, 1, 0));
        document.update(&items, &[], 1_700_000_000);
        let bytes = document.save();
        let batch = store.write()?;
        batch.put_document(
            &key.sign_heads(&meta, &document.heads()),
            &bytes,
            None,
            &[],
            None,
            1,
        )?;
        batch.commit()?;
        saved.push(bytes.len());
        documents.push((meta, document));
    }
    store.end_group()?;
    saved.sort_unstable();
    // Each version one new problem, made and signed before the clock starts.
    let mut versions = Vec::with_capacity(GROUP * ROUNDS);
    for round in 1..=ROUNDS {
        for (meta, document) in &mut documents {
            let before = document.heads();
            let item = items_for(meta, 1, round).remove(0);
            let mut item = item.clone();
            item.id = format!("problem-new-{round}");
            document.update(&[item], &[], 1_700_000_000 + round as i64);
            versions.push((
                key.sign_heads(meta, &document.heads()),
                document.changes_since(&before),
            ));
        }
    }
    let start = caremesh_bench::own_cpu_seconds();
    for group in versions.chunks(GROUP) {
        store.begin_group();
        for (signed, changes) in group {
            let (_, held) = store.held_index(signed.meta.id())?.context("held")?;
            let extension = caremesh_sync::relay::extend(&held, changes)
                .map_err(|declined| anyhow::anyhow!("declined: {declined:?}"))?;
            let batch = store.write()?;
            batch
                .put_appended(signed, &extension, None, None, 1)?
                .context("appended")?;
            batch.commit()?;
        }
        store.end_group()?;
    }
    let per_version = (caremesh_bench::own_cpu_seconds() - start) / versions.len() as f64;
    println!(
        "{:<52} {:>12.1}",
        format!(
            "relayed version stored, {} B saved (median)",
            saved[saved.len() / 2]
        ),
        per_version * 1e6
    );
    Ok(())
}

/// What a relay does with the index of a document with [`RELAYED`] changes appended since it
/// was saved whole: extend it by the next change, and tell holders what they lack (one
/// version behind, the common case; and at the saved base).
fn relay_index(meta: &DocMeta) {
    use caremesh_sync::relay::{HeldIndex, changes_after, extend};
    let mut document = PublishedDocument::create(meta.clone(), &[1]);
    document.update(&items_for(meta, ITEMS, 0), &[], 1_700_000_000);
    let base_heads = document.heads();
    let mut stored = document.save();
    let mut held = HeldIndex {
        heads: base_heads.clone(),
        stored_len: stored.len() as u64,
        appended: None,
        register: None,
    };
    // Each version changes one item; the changes of version `version`.
    let mut next_version = |version: usize| {
        let before = document.heads();
        let mut items = items_for(meta, ITEMS, 0);
        items[version % ITEMS] = items_for(meta, ITEMS, version)[version % ITEMS].clone();
        document.update(&items, &[], 1_700_000_000 + version as i64);
        (document.changes_since(&before), before)
    };
    let mut heads_before = Vec::new();
    for version in 1..=RELAYED {
        let (changes, before) = next_version(version);
        let extension = extend(&held, &changes).expect("the change extends the held heads");
        stored.extend_from_slice(&extension.new_bytes);
        heads_before.push(before);
        held = HeldIndex {
            heads: extension.heads,
            stored_len: stored.len() as u64,
            appended: Some(extension.appended),
            register: None,
        };
    }
    let (next, _) = next_version(RELAYED + 1);
    let appended = held.appended.clone().expect("changes appended");
    report(
        &format!("hash chain checked, {RELAYED} changes appended before"),
        20_000,
        || {
            black_box(extend(&held, &next).expect("extends"));
        },
    );
    let one_behind = heads_before.last().expect("versions made");
    report(
        &format!("what a holder one version behind lacks, of {RELAYED}"),
        20_000,
        || {
            black_box(changes_after(&stored, &appended, one_behind).expect("from the index"));
        },
    );
    report(
        &format!("what a holder of the saved base lacks, of {RELAYED}"),
        20_000,
        || {
            black_box(changes_after(&stored, &appended, &base_heads).expect("from the index"));
        },
    );
}

/// What a relay reads of the held copy per version it is offered and per version it
/// receives, for a document with [`RELAYED`] changes appended since it was saved whole: the
/// whole copy (base and every appended change's bytes, as it read before) or only its index.
fn relay_reads(key: &PublisherKey, meta: &DocMeta) -> Result<()> {
    let dir = tempfile::tempdir().context("a temporary folder")?;
    let mut store = Store::open(&dir.path().join("relay.db"))?;
    let mut document = PublishedDocument::create(meta.clone(), &[1]);
    document.update(&items_for(meta, ITEMS, 0), &[], 1_700_000_000);
    let batch = store.write()?;
    batch.put_document(
        &key.sign_heads(meta, &document.heads()),
        &document.save(),
        None,
        &[],
        None,
        1,
    )?;
    batch.commit()?;
    for version in 1..=RELAYED {
        let before = document.heads();
        let mut items = items_for(meta, ITEMS, 0);
        items[version % ITEMS] = items_for(meta, ITEMS, version)[version % ITEMS].clone();
        document.update(&items, &[], 1_700_000_000 + version as i64);
        let (_, held) = store.held_index(meta.id())?.context("held")?;
        let extension = caremesh_sync::relay::extend(&held, &document.changes_since(&before))
            .map_err(|declined| anyhow::anyhow!("declined: {declined:?}"))?;
        let batch = store.write()?;
        batch.put_appended(
            &key.sign_heads(meta, &document.heads()),
            &extension,
            None,
            None,
            1,
        )?;
        batch.commit()?;
    }
    let whole = report(
        &format!("held copy read whole ({RELAYED} appended changes)"),
        5_000,
        || {
            black_box(store.document(meta.id()).expect("reads"));
        },
    );
    let index = report("  its index read instead (a relay's read)", 5_000, || {
        black_box(store.held_index(meta.id()).expect("reads"));
    });
    println!(
        "{:<52} {:>12.1}",
        "  so a relay saves per version (two reads)",
        (whole - index) * 2.0 * 1e6
    );
    Ok(())
}

/// A durable append: a verified version stored in a group commit of [`GROUP`] with fsync,
/// as the hub's engine stores a turn; with its read-model row, or without, as a hub stores a
/// clinical version.
fn durable_append(key: &PublisherKey, read_model: bool) -> Result<()> {
    let dir = tempfile::tempdir().context("a temporary folder")?;
    let mut store = Store::open(&dir.path().join("floors.db"))?;
    let rounds = 8;
    let versions: Vec<_> = (0..GROUP * rounds)
        .map(|index| {
            let meta = meta_for(index as u64 + 1);
            let mut document = PublishedDocument::create(meta.clone(), &[1]);
            let items = items_for(&meta, 1, 0);
            document.update(&items, &[], 1_700_000_000);
            (
                key.sign_heads(&meta, &document.heads()),
                document.save(),
                items,
            )
        })
        .collect();
    let start = caremesh_bench::own_cpu_seconds();
    for group in versions.chunks(GROUP) {
        store.begin_group();
        for (signed, snapshot, items) in group {
            let batch = store.write()?;
            let items = if read_model { &items[..] } else { &[] };
            batch.put_document(signed, snapshot, None, items, None, 1_700_000_000)?;
            batch.commit()?;
        }
        store.end_group()?;
    }
    let per_row = (caremesh_bench::own_cpu_seconds() - start) / (GROUP * rounds) as f64;
    println!(
        "{:<52} {:>12.1}",
        if read_model {
            format!("durable append (group of {GROUP}, fsync, read model)")
        } else {
            "  the same without the read model (a hub's)".to_string()
        },
        per_row * 1e6
    );
    Ok(())
}

/// Runs `operation` `repetitions` times and prints (and returns) its CPU seconds per run.
fn report(what: &str, repetitions: usize, mut operation: impl FnMut()) -> f64 {
    operation(); // warm
    let start = caremesh_bench::own_cpu_seconds();
    for _ in 0..repetitions {
        operation();
    }
    let per_op = (caremesh_bench::own_cpu_seconds() - start) / repetitions as f64;
    println!("{what:<52} {:>12.1}", per_op * 1e6);
    per_op
}

fn meta_for(index: u64) -> DocMeta {
    DocMeta {
        publisher: OdsCode::parse("A81001").expect("an ODS code"),
        patient: caremesh_fhir::synthetic::test_nhs_number(1, index),
        section: Section::Problems,
        class: DataClass::Coded,
    }
}

fn items_for(meta: &DocMeta, count: usize, version: usize) -> Vec<Item> {
    (0..count)
        .map(|index| {
            Item::titled(
                &format!("problem-{index}"),
                meta.section,
                meta.class,
                "Condition",
                &format!("Problem {index}, version {version}"),
                "bench",
                &format!("Condition/{index}"),
            )
        })
        .collect()
}

/// The document at its sixth version and at the seventh, which changes one item.
fn document_and_its_next_version(meta: &DocMeta) -> (PublishedDocument, PublishedDocument) {
    let mut document = PublishedDocument::create(meta.clone(), &[1]);
    for version in 0..VERSIONS {
        let mut items = items_for(meta, ITEMS, 0);
        items[version % ITEMS] = items_for(meta, ITEMS, version)[version % ITEMS].clone();
        document.update(&items, &[], 1_700_000_000 + version as i64);
    }
    let before = PublishedDocument::load(meta, &document.save()).expect("loads");
    let mut items = items_for(meta, ITEMS, 0);
    items[0] = items_for(meta, ITEMS, VERSIONS)[0].clone();
    document.update(&items, &[], 1_700_000_100);
    (before, document)
}
