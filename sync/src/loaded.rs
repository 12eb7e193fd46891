//! Recently used documents kept loaded, so a hub does not rebuild a document from its whole
//! saved history each time it extends or serves it.
//!
//! A hub stores a change and then serves it to each peer entitled to it: without this, each
//! of those steps loads the document from its snapshot (Automerge decompresses and replays
//! every operation), the largest single cost per change in the hub's profile.
//!
//! An entry is only ever used for the exact version it was loaded as: every lookup names the
//! heads the caller holds in storage, and an entry with other heads is a miss. So an entry
//! can never be stale in a way that matters: a version that was never committed (a refused or
//! rolled-back write), or one superseded by another process's write, is simply not found.

use crate::document::PublishedDocument;
use crate::model::DocId;
use std::collections::{BTreeMap, HashMap};

// Each loaded document is its Automerge operation set in memory, many times its saved size:
// 75–95 KB each, measured on a hub. Callers choose the capacity with that in mind.

struct Entry {
    used: u64,
    document: PublishedDocument,
}

/// A least-recently-used set of loaded documents, each valid for one version (its heads).
pub struct LoadedDocuments {
    capacity: usize,
    clock: u64,
    entries: HashMap<DocId, Entry>,
    /// `used` → document: the eviction order.
    by_use: BTreeMap<u64, DocId>,
    hits: u64,
    misses: u64,
}

impl LoadedDocuments {
    pub fn new(capacity: usize) -> LoadedDocuments {
        assert!(capacity > 0, "a cache that holds nothing is no cache");
        LoadedDocuments {
            capacity,
            clock: 0,
            entries: HashMap::new(),
            by_use: BTreeMap::new(),
            hits: 0,
            misses: 0,
        }
    }

    /// The loaded document `doc` at exactly `heads`, if kept.
    pub fn get(&mut self, doc: DocId, heads: &[[u8; 32]]) -> Option<&PublishedDocument> {
        if !self.holds(doc, heads) {
            return None;
        }
        self.touch(doc);
        self.entries.get(&doc).map(|entry| &entry.document)
    }

    /// Takes the loaded document `doc` at exactly `heads` out, to be extended; give the
    /// result back with [`LoadedDocuments::keep`].
    pub fn take(&mut self, doc: DocId, heads: &[[u8; 32]]) -> Option<PublishedDocument> {
        if !self.holds(doc, heads) {
            return None;
        }
        let entry = self.entries.remove(&doc).expect("held");
        self.by_use.remove(&entry.used);
        Some(entry.document)
    }

    /// Keeps `document` loaded at its current heads, evicting the least recently used
    /// document if full.
    pub fn keep(&mut self, document: PublishedDocument) {
        let doc = document.meta().id();
        if let Some(old) = self.entries.remove(&doc) {
            self.by_use.remove(&old.used);
        }
        while self.entries.len() >= self.capacity {
            let (_, oldest) = self.by_use.pop_first().expect("entries and order agree");
            self.entries.remove(&oldest);
        }
        self.clock += 1;
        self.by_use.insert(self.clock, doc);
        self.entries.insert(
            doc,
            Entry {
                used: self.clock,
                document,
            },
        );
        debug_assert_eq!(self.entries.len(), self.by_use.len());
    }

    /// Lookups that found the version asked for, and those that did not.
    pub fn hits_and_misses(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn holds(&mut self, doc: DocId, heads: &[[u8; 32]]) -> bool {
        let held = self
            .entries
            .get(&doc)
            .is_some_and(|entry| entry.document.heads() == heads);
        if held {
            self.hits += 1;
        } else {
            self.misses += 1;
        }
        held
    }

    fn touch(&mut self, doc: DocId) {
        let entry = self.entries.get_mut(&doc).expect("held");
        self.by_use.remove(&entry.used);
        self.clock += 1;
        entry.used = self.clock;
        self.by_use.insert(self.clock, doc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DataClass, Section};
    use crate::testing::{allergy, meta_for};

    fn document(patient: &str, title: &str) -> PublishedDocument {
        let meta = meta_for("A81001", patient, Section::Allergies, DataClass::Coded);
        let mut document = PublishedDocument::create(meta, b"publisher");
        document.update(&[allergy("a", title)], &[], 1);
        document
    }

    #[test]
    fn a_document_is_found_only_at_the_version_it_was_kept_as() {
        let mut loaded = LoadedDocuments::new(4);
        let kept = document("9912003888", "Penicillin allergy");
        let (doc, heads) = (kept.meta().id(), kept.heads());
        loaded.keep(kept);
        assert!(loaded.get(doc, &heads).is_some());
        assert!(loaded.get(doc, &[[7; 32]]).is_none(), "other heads miss");
        let mut extended = loaded.take(doc, &heads).expect("held");
        assert!(loaded.is_empty(), "taken out while being extended");
        extended.update(&[allergy("b", "Latex allergy")], &[], 2);
        let newer = extended.heads();
        loaded.keep(extended);
        assert!(
            loaded.get(doc, &heads).is_none(),
            "the older version is gone"
        );
        assert!(loaded.get(doc, &newer).is_some());
        assert_eq!(loaded.hits_and_misses(), (3, 2));
    }

    #[test]
    fn the_least_recently_used_document_goes_first() {
        let mut loaded = LoadedDocuments::new(2);
        let documents: Vec<PublishedDocument> = ["9912003888", "9434765919", "6700028191"]
            .iter()
            .map(|patient| document(patient, "Penicillin allergy"))
            .collect();
        let keys: Vec<(DocId, Vec<[u8; 32]>)> = documents
            .iter()
            .map(|d| (d.meta().id(), d.heads()))
            .collect();
        let mut documents = documents.into_iter();
        loaded.keep(documents.next().unwrap());
        loaded.keep(documents.next().unwrap());
        // The first is used again, so the second is now the least recently used.
        assert!(loaded.get(keys[0].0, &keys[0].1).is_some());
        loaded.keep(documents.next().unwrap());
        assert_eq!(loaded.len(), 2);
        assert!(loaded.get(keys[0].0, &keys[0].1).is_some());
        assert!(loaded.get(keys[1].0, &keys[1].1).is_none(), "evicted");
        assert!(loaded.get(keys[2].0, &keys[2].1).is_some());
    }
}
