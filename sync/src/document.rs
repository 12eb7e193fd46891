//! A publisher's document: the items of one partition as an Automerge map.
//!
//! Layout of the Automerge root:
//!
//! ```text
//! { "meta":  { "publisher": "A81001", "patient": "999…", "section": "allergies", "class": "coded" },
//!   "items": { "<item id>": "<item as JSON>", … } }
//! ```
//!
//! Each item is one scalar: a document has a single writer (its publisher), so finer-grained
//! CRDT merging inside an item buys nothing, and one op per item keeps changes small.

use crate::model::{DocMeta, Item};
use crate::register::ItemRegister;
use crate::signing::SignedHeads;
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, Automerge, ChangeHash, ObjType, ROOT, ReadDoc};

#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error(
        "document {doc} does not decode as Automerge ({reason}); its stored bytes are damaged: restore it from a peer or re-ingest the source"
    )]
    Corrupt { doc: String, reason: String },
    #[error(
        "document {doc} declares partition {found} but was stored as {expected}; it was altered or misfiled"
    )]
    WrongPartition {
        doc: String,
        expected: String,
        found: String,
    },
    #[error(
        "document {doc} has heads that differ from its signed heads; a change was added, removed or altered after signing"
    )]
    HeadsMismatch { doc: String },
    #[error("item {item} in document {doc} is not valid item JSON: {reason}")]
    BadItem {
        doc: String,
        item: String,
        reason: String,
    },
    #[error("a change for document {doc} does not decode: {reason}")]
    BadChange { doc: String, reason: String },
}

/// Runs `decode` over Automerge on bytes from outside, a panic counting as a refusal.
/// Automerge 0.12 asserts its own invariants on some inputs it should refuse with an error (a
/// change from an actor whose sequence does not follow, a list insertion into a map, an
/// operation on an object that does not exist: found by [`crate::register`]'s differential
/// tests). Any peer can send such a change beside a publisher's genuine signed heads, and a
/// node must not stop for it. The Automerge state `decode` worked on is dropped with the
/// error by every caller, so what a panic left half-done is never used.
pub(crate) fn refusing_panics<T>(decode: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        Err(format!("Automerge could not apply it ({what})"))
    })
}

/// Item `key` of a document of partition `meta`, from its JSON: it must parse, and be filed in
/// the partition it is in.
pub(crate) fn parse_item(meta: &DocMeta, key: &str, json: &str) -> Result<Item, DocumentError> {
    let bad_item = |reason: String| DocumentError::BadItem {
        doc: meta.id().to_string(),
        item: key.to_string(),
        reason,
    };
    let item: Item = serde_json::from_str(json).map_err(|e| bad_item(e.to_string()))?;
    if item.section != meta.section || item.class != meta.class {
        return Err(bad_item(
            "filed in a partition it does not belong to".into(),
        ));
    }
    Ok(item)
}

pub struct PublishedDocument {
    meta: DocMeta,
    doc: Automerge,
}

impl PublishedDocument {
    /// A new, empty document for `meta`, written by `actor` (derived from the publisher's key so
    /// the same organisation always writes as the same Automerge actor).
    pub fn create(meta: DocMeta, actor: &[u8]) -> Self {
        let doc = Automerge::new().with_actor(ActorId::from(actor));
        PublishedDocument { meta, doc }
    }

    /// Loads stored bytes, checking that they decode and declare the partition expected.
    pub fn load(meta: &DocMeta, bytes: &[u8]) -> Result<Self, DocumentError> {
        let doc = refusing_panics(|| Automerge::load(bytes).map_err(|error| error.to_string()))
            .map_err(|reason| DocumentError::Corrupt {
                doc: meta.id().to_string(),
                reason,
            })?;
        let loaded = PublishedDocument {
            meta: meta.clone(),
            doc,
        };
        loaded.check_declared_partition()?;
        Ok(loaded)
    }

    /// Loads for writing: the writer continues as the publisher's actor.
    pub fn load_for_writing(
        meta: &DocMeta,
        bytes: &[u8],
        actor: &[u8],
    ) -> Result<Self, DocumentError> {
        let mut loaded = Self::load(meta, bytes)?;
        loaded.doc.set_actor(ActorId::from(actor));
        Ok(loaded)
    }

    pub fn meta(&self) -> &DocMeta {
        &self.meta
    }

    fn check_declared_partition(&self) -> Result<(), DocumentError> {
        let Some(declared) = self.declared_partition() else {
            // A document with no changes yet declares nothing; that is only valid when empty.
            if self.doc.get_heads().is_empty() {
                return Ok(());
            }
            return Err(self.wrong_partition("nothing".into()));
        };
        if declared == self.meta {
            Ok(())
        } else {
            Err(self.wrong_partition(format!("{declared:?}")))
        }
    }

    fn wrong_partition(&self, found: String) -> DocumentError {
        DocumentError::WrongPartition {
            doc: self.meta.id().to_string(),
            expected: format!("{:?}", self.meta),
            found,
        }
    }

    fn declared_partition(&self) -> Option<DocMeta> {
        let (_, meta_obj) = self.doc.get(ROOT, "meta").ok()??;
        let field = |name: &str| -> Option<String> {
            let (value, _) = self.doc.get(&meta_obj, name).ok()??;
            value.as_str().map(str::to_string)
        };
        Some(DocMeta {
            publisher: field("publisher")?.parse().ok()?,
            patient: field("patient")?.parse().ok()?,
            section: field("section")?.parse().ok()?,
            class: field("class")?.parse().ok()?,
        })
    }

    /// Writes `items` (replacing any with the same id) and removes `remove`, as one change
    /// stamped with `time`. Returns false, and makes no change, when nothing differs: so
    /// re-ingesting the same extract leaves the document, its heads and its signature alone.
    pub fn update(&mut self, items: &[Item], remove: &[String], time: i64) -> bool {
        for item in items {
            assert_eq!(
                item.section, self.meta.section,
                "item filed in wrong section"
            );
            assert_eq!(item.class, self.meta.class, "item filed in wrong class");
        }
        let needs_meta = self.declared_partition().is_none();
        let mut tx = self.doc.transaction();
        let items_obj = match tx.get(ROOT, "items").expect("root is readable") {
            Some((_, obj)) => obj,
            None => tx
                .put_object(ROOT, "items", ObjType::Map)
                .expect("root accepts a map"),
        };
        if needs_meta {
            let meta_obj = tx
                .put_object(ROOT, "meta", ObjType::Map)
                .expect("root accepts a map");
            for (name, value) in [
                ("publisher", self.meta.publisher.as_str()),
                ("patient", self.meta.patient.as_str()),
                ("section", self.meta.section.as_str()),
                ("class", self.meta.class.as_str()),
            ] {
                tx.put(&meta_obj, name, value)
                    .expect("meta map accepts put");
            }
        }
        for item in items {
            let json = serde_json::to_string(item).expect("items always serialise");
            let existing = tx
                .get(&items_obj, item.id.as_str())
                .expect("items map is readable")
                .and_then(|(value, _)| value.as_str().map(str::to_string));
            if existing.as_deref() != Some(json.as_str()) {
                tx.put(&items_obj, item.id.as_str(), json)
                    .expect("items map accepts put");
            }
        }
        for id in remove {
            if tx
                .get(&items_obj, id.as_str())
                .expect("items map is readable")
                .is_some()
            {
                tx.delete(&items_obj, id.as_str())
                    .expect("items map accepts delete");
            }
        }
        if tx.pending_ops() == 0 {
            tx.rollback();
            return false;
        }
        tx.commit_with(CommitOptions::default().with_time(time));
        true
    }

    /// Writes `json` as item `key` unchecked, as a faulty or hostile publisher could.
    #[cfg(test)]
    pub(crate) fn put_raw_item(&mut self, key: &str, json: &str) {
        let mut tx = self.doc.transaction();
        let (_, items_obj) = tx
            .get(ROOT, "items")
            .expect("root is readable")
            .expect("the document holds items");
        tx.put(&items_obj, key, json).expect("items accept a put");
        tx.commit();
    }

    pub fn items(&self) -> Result<Vec<Item>, DocumentError> {
        let Some((_, items_obj)) = self.doc.get(ROOT, "items").ok().flatten() else {
            return Ok(Vec::new());
        };
        let mut items = Vec::new();
        for key in self.doc.keys(&items_obj) {
            let bad_item = |reason: String| DocumentError::BadItem {
                doc: self.meta.id().to_string(),
                item: key.clone(),
                reason,
            };
            let (value, _) = self
                .doc
                .get(&items_obj, key.as_str())
                .map_err(|e| bad_item(e.to_string()))?
                .ok_or_else(|| bad_item("vanished while reading".into()))?;
            let json = value
                .as_str()
                .ok_or_else(|| bad_item("not a string".into()))?;
            items.push(parse_item(&self.meta, &key, json)?);
        }
        Ok(items)
    }

    /// What a new version read from its changes alone needs of this one
    /// ([`ItemRegister`]), where its history allows that.
    pub fn item_register(&self) -> Option<ItemRegister> {
        ItemRegister::of(&self.doc)
    }

    pub fn heads(&self) -> Vec<[u8; 32]> {
        self.doc.get_heads().into_iter().map(|h| h.0).collect()
    }

    /// Whether every one of `heads` is a change this document holds: then a peer offering
    /// those heads has nothing this document lacks.
    pub fn contains_all(&self, heads: &[[u8; 32]]) -> bool {
        heads
            .iter()
            .all(|head| self.doc.get_change_by_hash(&ChangeHash(*head)).is_some())
    }

    /// When the publisher made the latest change behind the current heads (Unix seconds), as
    /// it stamped it: how fresh a received copy's data is.
    pub fn last_change_time(&self) -> Option<i64> {
        self.doc
            .get_heads()
            .iter()
            .filter_map(|head| self.doc.get_change_by_hash(head))
            .map(|change| change.timestamp())
            .max()
    }

    pub fn save(&self) -> Vec<u8> {
        self.doc.save()
    }

    /// The bytes of the change this writer made last ([`PublishedDocument::update`]): what a
    /// new version adds to the copy it was made from, so it can be stored appended instead
    /// of saving the whole document again.
    pub fn last_local_change(&self) -> Option<Vec<u8>> {
        self.doc
            .get_last_local_change()
            .map(|change| change.raw_bytes().to_vec())
    }

    /// The changes a holder of `have` lacks, as raw change bytes.
    /// Heads this document does not know are ignored: they say nothing about what the
    /// holder lacks from this document.
    pub fn changes_since(&self, have: &[[u8; 32]]) -> Vec<Vec<u8>> {
        // Automerge's own walk ignores hashes it does not know (a test below holds it to
        // that). Filtering them first with `get_change_by_hash` rebuilt each change from the
        // op set only to see whether it existed: 3% of a hub's CPU under load.
        let have: Vec<ChangeHash> = have.iter().map(|h| ChangeHash(*h)).collect();
        self.doc
            .get_changes(&have)
            .into_iter()
            .map(|change| change.raw_bytes().to_vec())
            .collect()
    }

    /// Applies chunks received from elsewhere: raw changes or a whole saved document (the
    /// compressed form a first copy travels in). What results must still match the
    /// publisher's signed heads before anything is stored; that check is the caller's.
    /// After an error the document is in no known state: the caller drops it.
    pub fn apply_chunks(&mut self, chunks: &[Vec<u8>]) -> Result<(), DocumentError> {
        let doc = &mut self.doc;
        refusing_panics(|| {
            chunks.iter().try_for_each(|chunk| {
                doc.load_incremental(chunk)
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
        })
        .map_err(|reason| DocumentError::BadChange {
            doc: self.meta.id().to_string(),
            reason,
        })?;
        self.check_declared_partition()
    }

    /// Checks that this document is exactly what `signed` vouches for. The signature itself is
    /// checked by [`SignedHeads::verify`] against the trust registry.
    pub fn matches(&self, signed: &SignedHeads) -> Result<(), DocumentError> {
        if signed.meta != self.meta {
            return Err(self.wrong_partition(format!("{:?}", signed.meta)));
        }
        if signed.heads != self.heads() {
            return Err(DocumentError::HeadsMismatch {
                doc: self.meta.id().to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DataClass, NhsNumber, OdsCode, Section};
    use crate::signing::PublisherKey;

    fn meta() -> DocMeta {
        DocMeta {
            publisher: OdsCode::parse("A81001").unwrap(),
            patient: NhsNumber::parse("9912003888").unwrap(),
            section: Section::Allergies,
            class: DataClass::Coded,
        }
    }

    fn item(id: &str, title: &str) -> Item {
        crate::testing::allergy(id, title)
    }

    #[test]
    fn unchanged_items_make_no_change() {
        let mut doc = PublishedDocument::create(meta(), b"actor-a81001");
        assert!(doc.update(&[item("a/1", "Amoxicillin")], &[], 10));
        let heads = doc.heads();
        assert!(!doc.update(&[item("a/1", "Amoxicillin")], &[], 20));
        assert_eq!(doc.heads(), heads);
        assert!(doc.update(&[item("a/1", "Penicillin")], &[], 30));
        assert_ne!(doc.heads(), heads);
        assert_eq!(doc.items().unwrap()[0].title, "Penicillin");
    }

    #[test]
    fn removal_deletes_the_item() {
        let mut doc = PublishedDocument::create(meta(), b"actor");
        doc.update(&[item("a/1", "x"), item("a/2", "y")], &[], 1);
        assert!(doc.update(&[], &["a/1".into()], 2));
        let ids: Vec<_> = doc.items().unwrap().into_iter().map(|i| i.id).collect();
        assert_eq!(ids, vec!["a/2".to_string()]);
        assert!(!doc.update(&[], &["a/1".into()], 3), "already gone");
    }

    #[test]
    fn save_load_and_incremental_changes_reproduce_the_same_heads() {
        let key = PublisherKey::from_secret([3; 32]);
        let mut doc = PublishedDocument::create(meta(), b"actor");
        doc.update(&[item("a/1", "x")], &[], 1);
        let first_heads = doc.heads();
        doc.update(&[item("a/2", "y")], &[], 2);
        let signed = key.sign_heads(&meta(), &doc.heads());

        let loaded = PublishedDocument::load(&meta(), &doc.save()).unwrap();
        loaded.matches(&signed).unwrap();

        // A peer that held the first version receives only the second change.
        let mut peer = PublishedDocument::create(meta(), b"peer");
        peer.apply_chunks(&doc.changes_since(&[])[..1]).unwrap();
        assert_eq!(peer.heads(), first_heads);
        let delta = doc.changes_since(&first_heads);
        assert_eq!(delta.len(), 1);
        peer.apply_chunks(&delta).unwrap();
        peer.apply_chunks(&delta).unwrap(); // twice is harmless
        peer.matches(&signed).unwrap();
        assert_eq!(peer.items().unwrap().len(), 2);
    }

    /// A holder may name heads this copy does not know (a newer version from elsewhere):
    /// they say nothing about what it lacks from this copy, and are ignored, on a copy just
    /// loaded (as a hub serves) as on the publisher's.
    #[test]
    fn heads_the_document_does_not_know_are_ignored_when_computing_what_a_holder_lacks() {
        let mut doc = PublishedDocument::create(meta(), b"actor");
        doc.update(&[item("a/1", "x")], &[], 1);
        let first_heads = doc.heads();
        doc.update(&[item("a/2", "y")], &[], 2);
        let loaded = PublishedDocument::load(&meta(), &doc.save()).unwrap();
        let unknown = [0xab; 32];
        for copy in [&doc, &loaded] {
            assert_eq!(copy.changes_since(&[unknown]), copy.changes_since(&[]));
            assert_eq!(copy.changes_since(&[]).len(), 2);
            let with_unknown = copy.changes_since(&[first_heads[0], unknown]);
            assert_eq!(with_unknown, copy.changes_since(&first_heads));
            assert_eq!(with_unknown.len(), 1);
            assert!(copy.changes_since(&copy.heads()).is_empty());
        }
    }

    #[test]
    fn a_document_declaring_another_partition_is_refused() {
        let mut doc = PublishedDocument::create(meta(), b"actor");
        doc.update(&[item("a/1", "x")], &[], 1);
        let mut other = meta();
        other.class = DataClass::Sensitive;
        assert!(matches!(
            PublishedDocument::load(&other, &doc.save()),
            Err(DocumentError::WrongPartition { .. })
        ));
    }

    #[test]
    fn flipped_bytes_never_load_silently_as_the_signed_document() {
        let key = PublisherKey::from_secret([3; 32]);
        let mut doc = PublishedDocument::create(meta(), b"actor");
        doc.update(&[item("a/1", "Amoxicillin"), item("a/2", "Latex")], &[], 1);
        let signed = key.sign_heads(&meta(), &doc.heads());
        let saved = doc.save();
        for position in 0..saved.len() {
            let mut damaged = saved.clone();
            damaged[position] ^= 0x01;
            let outcome = PublishedDocument::load(&meta(), &damaged)
                .and_then(|d| d.matches(&signed).map(|_| d.items()));
            if let Ok(Ok(items)) = outcome {
                // Automerge may tolerate a flip in a byte that carries no meaning; then the
                // content must be exactly the signed content.
                assert_eq!(
                    items,
                    doc.items().unwrap(),
                    "flip at {position} changed content"
                );
            }
        }
    }
}
