//! Differential tests: a version read from its changes alone ([`ItemRegister::extend`]) must
//! be exactly what Automerge makes of the same changes (load, apply, read the items), or be
//! declined. Honest histories are generated as a publisher makes them; hostile ones alter an
//! honest change in every field the register path reads, and re-encode it (so its hash, and
//! the heads a publisher would sign, are those of the altered change).

use super::*;
use crate::PublishedDocument;
use crate::model::{DataClass, Section};
use crate::rng::Rng;
use crate::testing::{allergy, meta_for};
use automerge::legacy::{ElementId, SortedVec};
use automerge::{Automerge, ChangeHash, ExpandedChange};
use std::num::NonZeroU64;

fn meta() -> DocMeta {
    meta_for("A81001", "9912003888", Section::Allergies, DataClass::Coded)
}

const WRITER: &[u8] = b"publisher-actor";

/// One honest version: puts of items from a small pool (new or changed titles) and deletes.
fn honest_version(document: &mut PublishedDocument, rng: &mut Rng, time: i64) -> bool {
    let held: Vec<String> = document
        .items()
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    let puts: Vec<Item> = (0..rng.range(0, 3))
        .map(|_| {
            let id = format!("a{}", rng.below(6));
            allergy(&id, &format!("Penicillin {}", rng.below(4)))
        })
        .collect();
    let removes: Vec<String> = held
        .iter()
        .filter(|id| !puts.iter().any(|p| &p.id == *id) && rng.percent(20))
        .cloned()
        .collect();
    document.update(&puts, &removes, time)
}

/// What the full path makes of `chunks` applied to the version saved as `saved`: the heads and
/// the items (or why they do not read), or `None` where Automerge refuses the changes.
type Read = (Vec<[u8; 32]>, Result<Vec<Item>, String>);

fn full_path(saved: &[u8], chunks: &[Vec<u8>]) -> Option<Read> {
    let mut document = PublishedDocument::load(&meta(), saved).ok()?;
    document.apply_chunks(chunks).ok()?;
    let items = document.items().map_err(|e| e.to_string());
    Some((document.heads(), items))
}

/// Holds the register path to the full path on `chunks` after the version saved as `saved`:
/// where it reads them, the full path gives the same single head and the same items, and the
/// register is the one taken from the resulting document. Returns whether it read them.
fn agrees(saved: &[u8], register: &ItemRegister, chunks: &[Vec<u8>]) -> bool {
    let Some(extended) = register.extend(chunks) else {
        return false;
    };
    let (heads, items) =
        full_path(saved, chunks).expect("the register path read a version the full path refuses");
    assert_eq!(
        heads,
        vec![extended.head],
        "the register path's head is not Automerge's"
    );
    assert_eq!(
        extended.items(&meta()).map_err(|e| e.to_string()),
        items,
        "the register path's items are not Automerge's"
    );
    let mut bytes = saved.to_vec();
    for chunk in chunks {
        bytes.extend_from_slice(chunk);
    }
    let loaded = PublishedDocument::load(&meta(), &bytes).unwrap();
    assert_eq!(
        loaded.item_register().as_ref(),
        Some(&extended),
        "the register after the changes is not the one taken from the document"
    );
    true
}

#[test]
fn honest_histories_are_read_from_their_changes_exactly_as_automerge_reads_them() {
    for seed in 0..40 {
        let mut rng = Rng::new(seed);
        let mut document = PublishedDocument::create(meta(), WRITER);
        document.update(&[allergy("a0", "Penicillin")], &[], 1_700_000_000);
        for version in 1..30 {
            let saved = document.save();
            let register = document
                .item_register()
                .expect("an honest document registers");
            let before = document.heads();
            // One version, or a few at once (a peer that was away).
            let mut changed = false;
            for _ in 0..rng.range(1, 3) {
                changed |= honest_version(&mut document, &mut rng, 1_700_000_000 + version);
            }
            if !changed {
                continue;
            }
            let chunks = document.changes_since(&before);
            assert!(
                agrees(&saved, &register, &chunks),
                "seed {seed} version {version}: an honest version was declined"
            );
        }
    }
}

#[test]
fn a_document_with_two_heads_or_a_conflicting_item_has_no_register() {
    let mut document = PublishedDocument::create(meta(), WRITER);
    document.update(&[allergy("a0", "Penicillin")], &[], 1_700_000_000);
    let saved = document.save();
    // Two actors write the same item concurrently: two heads, and a conflict on "a0".
    let mut first = Automerge::load(&saved)
        .unwrap()
        .with_actor(ActorId::from(&b"one"[..]));
    let mut second = Automerge::load(&saved)
        .unwrap()
        .with_actor(ActorId::from(&b"two"[..]));
    for (doc, title) in [(&mut first, "Latex"), (&mut second, "Aspirin")] {
        let mut writer = PublishedDocument::load(&meta(), &doc.save()).unwrap();
        writer.update(&[allergy("a0", title)], &[], 1_700_000_001);
        *doc = Automerge::load(&writer.save()).unwrap();
    }
    first.merge(&mut second).unwrap();
    assert_eq!(first.get_heads().len(), 2);
    assert_eq!(ItemRegister::of(&first), None);
}

#[test]
fn a_register_survives_its_stored_form_and_damaged_bytes_are_not_used() {
    let mut document = PublishedDocument::create(meta(), WRITER);
    document.update(&[allergy("a0", "Penicillin")], &[], 1_700_000_000);
    let register = document.item_register().unwrap();
    assert_eq!(
        ItemRegister::decode(&register.encode()),
        Some(register.clone())
    );
    let encoded = register.encode();
    assert_eq!(ItemRegister::decode(&encoded[..encoded.len() / 2]), None);
}

#[test]
fn items_beyond_the_size_limit_are_not_registered() {
    let mut document = PublishedDocument::create(meta(), WRITER);
    let long = "x".repeat(MAX_REGISTER_BYTES);
    document.update(&[allergy("a0", &long)], &[], 1_700_000_000);
    assert_eq!(document.item_register(), None);
}

/// Ways to alter an honest change. Each names what it breaks of the register path's rules.
const ALTERATIONS: usize = 16;

fn alter(change: &mut ExpandedChange, register: &ItemRegister, rng: &mut Rng, alteration: usize) {
    let other = ActorId::from(&b"another-actor"[..]);
    let writer = ActorId::from(&register.writer[..]);
    let items_map = OpId(register.items_map.counter, writer.clone());
    let op_at = |change: &ExpandedChange, rng: &mut Rng| -> Option<usize> {
        (!change.operations.is_empty()).then(|| rng.below(change.operations.len() as u64) as usize)
    };
    match alteration {
        // Another writer.
        0 => change.actor_id = other,
        // Not the writer's next change, or operations not numbered after its last.
        1 => change.seq += 1,
        2 => change.start_op = NonZeroU64::new(change.start_op.get() + 1).unwrap(),
        3 => {
            change.start_op =
                NonZeroU64::new(change.start_op.get().saturating_sub(1).max(1)).unwrap()
        }
        // Not on the version before it.
        4 => change.deps.clear(),
        5 => change.deps.push(ChangeHash([7; 32])),
        // An operation that keeps the current value (no predecessor): a conflict.
        6 => {
            if let Some(at) = op_at(change, rng) {
                change.operations[at].pred = SortedVec::new();
            }
        }
        // A predecessor that is not the current value.
        7 => {
            if let Some(at) = op_at(change, rng) {
                change.operations[at].pred = vec![OpId(rng.range(1, 40), writer.clone())].into();
            }
        }
        // On another object: the root, the meta map, or one that does not exist.
        8 => {
            if let Some(at) = op_at(change, rng) {
                change.operations[at].obj = ObjectId::Root;
            }
        }
        9 => {
            if let Some(at) = op_at(change, rng) {
                change.operations[at].obj = ObjectId::Id(OpId(rng.range(1, 12), writer.clone()));
            }
        }
        // Not a string.
        10 => {
            if let Some(at) = op_at(change, rng) {
                change.operations[at].action = OpType::Put(ScalarValue::Int(7));
            }
        }
        // A new object inside the items map.
        11 => {
            if let Some(at) = op_at(change, rng) {
                change.operations[at].action = OpType::Make(automerge::ObjType::Map);
            }
        }
        // A delete, of the current value or of nothing.
        12 => {
            if let Some(at) = op_at(change, rng) {
                change.operations[at].action = OpType::Delete;
            }
        }
        // A list insertion.
        13 => {
            if let Some(at) = op_at(change, rng) {
                change.operations[at].insert = true;
                change.operations[at].key = Key::Seq(ElementId::Head);
            }
        }
        // A second put of the same item in the same change, naming the first, or not.
        14 => {
            if let Some(at) = op_at(change, rng) {
                let mut again = change.operations[at].clone();
                let first = OpId(change.start_op.get() + at as u64, writer.clone());
                again.pred = if rng.percent(50) {
                    vec![first].into()
                } else {
                    SortedVec::new()
                };
                again.action = OpType::Put(ScalarValue::Str("{}".into()));
                change.operations.push(again);
            }
        }
        // A put into the items map itself, from the root: replacing the whole map.
        _ => change.operations.push(automerge::legacy::Op {
            action: OpType::Put(ScalarValue::Str("{}".into())),
            obj: ObjectId::Root,
            key: Key::Map("items".into()),
            pred: vec![items_map].into(),
            insert: false,
        }),
    }
}

/// `honest` altered as `alteration` says, and encoded again (with the hash of what it is now).
fn altered(honest: &[u8], register: &ItemRegister, rng: &mut Rng, alteration: usize) -> Vec<u8> {
    let mut expanded = Change::try_from(honest).unwrap().decode();
    expanded.hash = None;
    alter(&mut expanded, register, rng, alteration);
    Change::from(expanded).raw_bytes().to_vec()
}

#[test]
fn altered_changes_are_declined_or_read_exactly_as_automerge_reads_them() {
    let mut read = 0;
    let mut declined = 0;
    for seed in 0..60 {
        let mut rng = Rng::new(1_000 + seed);
        let mut document = PublishedDocument::create(meta(), WRITER);
        document.update(
            &[allergy("a0", "Penicillin"), allergy("a1", "Latex")],
            &[],
            1_700_000_000,
        );
        for version in 1..12 {
            let saved = document.save();
            let register = document.item_register().unwrap();
            let before = document.heads();
            if !honest_version(&mut document, &mut rng, 1_700_000_000 + version) {
                continue;
            }
            let [honest] = &document.changes_since(&before)[..] else {
                panic!("one version is one change");
            };
            for alteration in 0..ALTERATIONS {
                let altered = altered(honest, &register, &mut rng, alteration);
                let agreed = std::panic::catch_unwind(|| agrees(&saved, &register, &[altered]))
                    .unwrap_or_else(|_| {
                        panic!("seed {seed} version {version} alteration {alteration}")
                    });
                if agreed {
                    read += 1;
                } else {
                    declined += 1;
                }
            }
        }
    }
    // Some alterations leave a change the register path may read (a delete that names the
    // current value is an honest delete); most it must decline.
    assert!(declined > read * 3, "declined {declined}, read {read}");
}

/// Automerge 0.12 panics on some of these altered changes (another actor whose sequence does
/// not follow, a list insertion into a map, an operation on an object that does not exist).
/// Any peer can send one beside a publisher's genuine signed heads: the full path must refuse
/// it, not stop the node.
#[test]
fn changes_automerge_asserts_on_are_refused_not_a_panic() {
    let mut refused = std::collections::BTreeSet::new();
    let mut rng = Rng::new(7);
    let mut document = PublishedDocument::create(meta(), WRITER);
    document.update(
        &[allergy("a0", "Penicillin"), allergy("a1", "Latex")],
        &[],
        1_700_000_000,
    );
    let saved = document.save();
    let register = document.item_register().unwrap();
    let before = document.heads();
    document.update(&[allergy("a0", "Aspirin")], &[], 1_700_000_001);
    let [honest] = &document.changes_since(&before)[..] else {
        panic!("one version is one change");
    };
    for alteration in 0..ALTERATIONS {
        let altered = altered(honest, &register, &mut rng, alteration);
        let mut copy = PublishedDocument::load(&meta(), &saved).unwrap();
        if let Err(error) = copy.apply_chunks(&[altered])
            && error.to_string().contains("Automerge could not apply it")
        {
            refused.insert(alteration);
        }
    }
    // Another writer out of sequence, and a list insertion into the map, among others.
    assert!(
        refused.contains(&0) && refused.contains(&13),
        "refused {refused:?}"
    );
}
