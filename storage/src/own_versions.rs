//! Storing new versions of this node's own documents at the cost of what changed.
//!
//! A publisher's new version differs from the copy it was made from by one change, and its
//! items by the ones written and removed. Saving the whole document and replacing all of its
//! read-model rows made each version cost the document: an access record gains an item per
//! view of the patient, so a much-viewed patient's record cost tens of milliseconds per view
//! (BENCHMARKS.md, "Record views at the cost of the view"). Here a version is its change
//! appended to the stored bytes (as a relay appends, [`WriteBatch::put_appended`]) and its
//! read-model rows amended; the document is saved whole only when the appended changes
//! reach their limit, which compacts them.
//!
//! Access records are also kept loaded between versions ([`LoadedOwnDocuments`]): every view
//! writes one, and loading it costs what it holds.

use crate::{Result, Rows, WriteBatch};
use caremesh_sync::relay::Extension;
use caremesh_sync::{DocId, DocMeta, Item, PublishedDocument, SignedHeads};
use std::collections::VecDeque;

/// Own documents loaded lately, each at the heads it was stored with. One is used again only
/// if the store still holds exactly those heads: a version rolled back, or replaced by a
/// copy that came back from a peer, makes the entry stale, and it is loaded afresh.
#[derive(Default)]
pub(crate) struct LoadedOwnDocuments {
    /// Least recently used first; at most [`LOADED_CAPACITY`].
    entries: VecDeque<(DocId, PublishedDocument)>,
}

/// Access records of this many patients stay loaded: the patients being viewed now.
const LOADED_CAPACITY: usize = 32;

impl LoadedOwnDocuments {
    /// Takes the loaded document `id` out if it is at `heads` (the store's signed heads);
    /// a loaded copy at other heads is dropped.
    pub fn take(&mut self, id: DocId, heads: &[[u8; 32]]) -> Option<PublishedDocument> {
        let at = self.entries.iter().position(|(held, _)| *held == id)?;
        let (_, document) = self.entries.remove(at).expect("the position was found");
        (crate::sorted(document.heads()) == crate::sorted(heads.to_vec())).then_some(document)
    }

    /// Keeps `document` loaded, as the most recently used.
    pub fn keep(&mut self, document: PublishedDocument) {
        let id = document.meta().id();
        self.entries.retain(|(held, _)| *held != id);
        if self.entries.len() == LOADED_CAPACITY {
            self.entries.pop_front();
        }
        self.entries.push_back((id, document));
    }
}

impl WriteBatch<'_> {
    /// Stores a publisher's own new version saved whole, amending the read model by the
    /// items it wrote and removed instead of rebuilding it: the rows held are the items of
    /// the version it was made from. As [`WriteBatch::put_document`] otherwise.
    pub fn put_own_version(
        &self,
        signed: &SignedHeads,
        snapshot: &[u8],
        built_on: Option<&[[u8; 32]]>,
        written: &[Item],
        removed: &[String],
        updated_at: i64,
    ) -> Result<Option<i64>> {
        let position =
            self.put_document_with(signed, snapshot, built_on, Rows::Kept, None, updated_at)?;
        if let Some(position) = position {
            self.amend_read_model(&signed.meta, written, removed, position)?;
        }
        Ok(position)
    }

    /// Stores a publisher's own new version as its change appended to the copy held, which
    /// the caller read in this batch, and amends the read model by the items it wrote and
    /// removed. `None`, having written nothing, where the stored rows are not exactly what
    /// `extension` extended (not expected, as the caller read them in this batch; a damaged
    /// database could): the caller saves the version whole.
    pub fn append_own_version(
        &self,
        signed: &SignedHeads,
        extension: &Extension,
        written: &[Item],
        removed: &[String],
        updated_at: i64,
    ) -> Result<Option<i64>> {
        let Some(held) = self.held_as_extended(signed.meta.id(), extension)? else {
            return Ok(None);
        };
        let position =
            self.append_changes(&held, signed, extension, Rows::Kept, None, updated_at)?;
        self.amend_read_model(&signed.meta, written, removed, position)?;
        Ok(Some(position))
    }

    /// A loaded copy of the own document `id` at `heads`, if one is kept.
    pub fn take_loaded(&self, id: DocId, heads: &[[u8; 32]]) -> Option<PublishedDocument> {
        self.loaded.borrow_mut().take(id, heads)
    }

    /// Keeps `document`, just stored, loaded for its next version.
    pub fn keep_loaded(&self, document: PublishedDocument) {
        self.loaded.borrow_mut().keep(document);
    }

    /// Deletes the rows of `removed` items and writes the rows of `written` ones, as of the
    /// version at feed position `seq`.
    fn amend_read_model(
        &self,
        meta: &DocMeta,
        written: &[Item],
        removed: &[String],
        seq: i64,
    ) -> Result<()> {
        self.delete_item_rows(meta, removed)?;
        self.write_item_rows(meta, written, seq)
    }
}

#[cfg(test)]
mod tests {
    use crate::Store;
    use crate::audit::AuditEvent;
    use crate::publish::{Publication, record_access, record_access_in};
    use caremesh_sync::policy::Consent;
    use caremesh_sync::relay::MAX_APPENDED_CHANGES;
    use caremesh_sync::{
        DataClass, DocMeta, Item, NhsNumber, OdsCode, PublishedDocument, PublisherKey, Section,
    };

    fn own() -> OdsCode {
        OdsCode::parse("A81001").unwrap()
    }

    fn patient() -> NhsNumber {
        NhsNumber::parse("9912003888").unwrap()
    }

    fn access_record() -> DocMeta {
        DocMeta {
            publisher: own(),
            patient: patient(),
            section: Section::Audit,
            class: DataClass::Coded,
        }
    }

    fn view(at: i64) -> AuditEvent {
        AuditEvent {
            at,
            user_id: "u1".into(),
            user_name: "Dr A".into(),
            role: "clinician".into(),
            organisation: own().to_string(),
            action: "view".into(),
            nhs: Some(patient().to_string()),
            sources: vec![own().to_string(), "RXX01".into()],
            sections: vec!["allergies".into()],
            purpose: "direct care".into(),
            outcome: "allowed".into(),
            detail: String::new(),
        }
    }

    /// Items as (id, body), sorted by id.
    type Bodies = Vec<(String, String)>;

    /// The stored document's items, loaded from its bytes and checked against its signature
    /// and the publisher's key; and its items as the read model holds them.
    fn stored_and_read_model(
        store: &Store,
        key: &PublisherKey,
        meta: &DocMeta,
    ) -> (Bodies, Bodies) {
        let stored = store.document(meta.id()).unwrap().expect("held");
        let signed = stored.signed_heads().expect("signed heads decode");
        signed.verify(|_, k| *k == key.public()).unwrap();
        let document = PublishedDocument::load(meta, &stored.snapshot).unwrap();
        document.matches(&signed).unwrap();
        let mut items: Bodies = document
            .items()
            .unwrap()
            .into_iter()
            .map(|item| (item.id.clone(), serde_json::to_string(&item).unwrap()))
            .collect();
        items.sort();
        (items, store.item_bodies(meta.id()).unwrap())
    }

    fn appended_changes(store: &Store, meta: &DocMeta) -> usize {
        let (_, index) = store.held_index(meta.id()).unwrap().expect("held");
        index.appended.map_or(0, |appended| appended.changes.len())
    }

    #[test]
    fn access_record_versions_are_appended_compacted_and_the_read_model_kept_true() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("node.db")).unwrap();
        let key = PublisherKey::from_secret([3; 32]);
        let meta = access_record();
        let views = 2 * MAX_APPENDED_CHANGES + 5;
        let mut appended_seen = Vec::new();
        for at in 0..views {
            record_access(&mut store, &key, &own(), &view(1_000 + at as i64)).unwrap();
            let (items, rows) = stored_and_read_model(&store, &key, &meta);
            assert_eq!(items.len(), at + 1, "one item per view");
            assert_eq!(rows, items, "the read model is the signed document");
            appended_seen.push(appended_changes(&store, &meta));
        }
        // The first version is saved whole; each later one is its change appended, until
        // the limit compacts them into a document saved whole again.
        assert_eq!(&appended_seen[..4], &[0, 1, 2, 3]);
        assert!(appended_seen.iter().all(|n| *n <= MAX_APPENDED_CHANGES));
        assert!(
            appended_seen.windows(2).any(|w| w[1] < w[0]),
            "the appended changes were compacted: {appended_seen:?}"
        );
        // The access record is audit, not the patient's record: reading the record for a
        // view does not read (and slow down with) every earlier view.
        assert!(store.patient_items(&patient()).unwrap().is_empty());
        assert!(store.items_stored_at(&patient()).unwrap().is_empty());
    }

    #[test]
    fn a_version_rolled_back_is_not_written_on_from_memory() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("node.db")).unwrap();
        let key = PublisherKey::from_secret([3; 32]);
        let meta = access_record();
        record_access(&mut store, &key, &own(), &view(1_000)).unwrap();
        record_access(&mut store, &key, &own(), &view(1_001)).unwrap();
        {
            let batch = store.write().unwrap();
            record_access_in(&batch, &key, &own(), &view(1_002)).unwrap();
            // Dropped: rolled back, though the loaded copy took the change.
        }
        record_access(&mut store, &key, &own(), &view(1_003)).unwrap();
        let (items, rows) = stored_and_read_model(&store, &key, &meta);
        assert_eq!(rows, items);
        assert_eq!(
            items.len(),
            3,
            "the rolled-back view is not in the record: {items:?}"
        );
    }

    fn problem(id: &str, title: &str) -> Item {
        Item::titled(
            id,
            Section::Problems,
            DataClass::Coded,
            "Condition",
            title,
            "test",
            &format!("Condition/{id}"),
        )
    }

    #[test]
    fn an_ingested_change_amends_the_read_model_by_what_it_wrote_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("node.db")).unwrap();
        let key = PublisherKey::from_secret([3; 32]);
        let meta = DocMeta {
            section: Section::Problems,
            ..access_record()
        };
        let publish = |store: &mut Store, family: &[&str], items: Vec<Item>, at: i64| {
            let batch = store.write().unwrap();
            let mut publication = Publication::new(own(), Consent::SENT_BY_PUBLISHER);
            let family: Vec<String> = family.iter().map(|id| id.to_string()).collect();
            publication
                .place(&batch, &patient(), &family, items)
                .unwrap();
            publication.apply(&batch, &key, at).unwrap();
            batch.commit().unwrap();
        };
        publish(&mut store, &["p1"], vec![problem("p1", "Asthma")], 1);
        publish(&mut store, &["p2"], vec![problem("p2", "Gout")], 2);
        publish(&mut store, &["p3"], vec![problem("p3", "Eczema")], 3);
        let before_changes = store.feed_tip().unwrap();
        // p1 is retitled, p2 no longer held, p3 placed again unchanged.
        publish(
            &mut store,
            &["p1"],
            vec![problem("p1", "Asthma, resolved")],
            4,
        );
        publish(&mut store, &["p2"], vec![], 5);
        publish(&mut store, &["p3"], vec![problem("p3", "Eczema")], 6);
        let changed = |after: u64| {
            store
                .changed_sources(patient().as_str(), "A81001", "problems", after)
                .unwrap()
                .into_iter()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            changed(before_changes),
            ["Condition/p1"],
            "what changed since: not the item placed again as it was"
        );
        assert_eq!(changed(0), ["Condition/p1", "Condition/p3"]);
        let (items, rows) = stored_and_read_model(&store, &key, &meta);
        assert_eq!(rows, items);
        let ids: Vec<&str> = items.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["p1", "p3"]);
        assert!(items[0].1.contains("Asthma, resolved"));
        assert!(
            appended_changes(&store, &meta) > 0,
            "versions after the first are appended"
        );
    }
}
