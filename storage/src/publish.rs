//! Turning a batch of items into new, signed versions of the publisher's documents.
//!
//! A resource's items may move between documents when it changes (a condition later coded
//! as sensitive moves from the coded to the sensitive document); [`Publication`] removes an
//! item from wherever it was before placing it anew, so one fact is never held twice.

use crate::audit::{AuditEvent, ChainedEvent};
use crate::{StorageError, Store, WriteBatch};
use caremesh_sync::policy::{Consent, SharingRecord, SourceStatement};
use caremesh_sync::relay::{self, Declined, HeldIndex};
use caremesh_sync::{
    DataClass, DocMeta, DocumentError, Item, NhsNumber, OdsCode, PublishedDocument, PublisherKey,
    Section, SignatureError, SignedHeads,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Document(#[from] DocumentError),
    #[error(
        "stored document {doc} fails its signature check: {source}; run `caremesh verify` and restore the document before ingesting more"
    )]
    StoredSignature {
        doc: String,
        #[source]
        source: SignatureError,
    },
    #[error("stored document {doc} has no readable signed heads; run `caremesh verify`")]
    MissingSignature { doc: String },
    #[error(
        "this node publishes nothing new ({reason}) until it has taken back from each of its peers what it published before: nothing was written. It resumes by itself once caught up with every peer (`caremesh status` shows the hold); files in the drop folder wait, and what was refused can be given again then"
    )]
    Held { reason: String },
}

#[derive(Default)]
struct DocChanges {
    upserts: BTreeMap<String, Item>,
    removes: BTreeSet<String>,
}

/// Pending changes to one publisher's documents, applied in one storage transaction.
///
/// Every patient the publication touches gets a sharing record (the publisher's consent
/// state for them, [`Section::Sharing`]): it is what tells peers and hubs that the publisher
/// cares for the patient, and what carries a withdrawal to everyone holding copies.
pub struct Publication {
    publisher: OdsCode,
    changes: BTreeMap<DocMeta, DocChanges>,
    /// Where an item id was placed earlier in this publication, per patient.
    placed: HashMap<(NhsNumber, String), DocMeta>,
    /// Patients touched, each of whom must end up with a sharing record.
    touched: BTreeSet<NhsNumber>,
    /// Sharing choices recorded in this publication (from Consent resources or the CLI).
    consents: BTreeMap<NhsNumber, Consent>,
    /// The organisation's defaults, for a patient's first sharing record.
    defaults: Consent,
    /// Patients whose new choice shares again what their previous one withheld.
    reopened: Vec<NhsNumber>,
}

impl Publication {
    pub fn new(publisher: OdsCode, defaults: Consent) -> Self {
        Publication {
            publisher,
            changes: BTreeMap::new(),
            placed: HashMap::new(),
            touched: BTreeSet::new(),
            consents: BTreeMap::new(),
            defaults,
            reopened: Vec::new(),
        }
    }

    pub fn publisher(&self) -> &OdsCode {
        &self.publisher
    }

    /// Records the patient's sharing choices at this organisation.
    pub fn set_consent(&mut self, patient: &NhsNumber, consent: Consent) {
        self.touched.insert(patient.clone());
        self.consents.insert(patient.clone(), consent);
    }

    /// The patient's choices as this publication leaves them so far: set here, else
    /// recorded, else the organisation's defaults.
    pub fn consent_for(
        &self,
        batch: &WriteBatch<'_>,
        patient: &NhsNumber,
    ) -> Result<Consent, StorageError> {
        if let Some(consent) = self.consents.get(patient) {
            return Ok(*consent);
        }
        Ok(batch
            .care()
            .recorded_consent(&self.publisher, patient)?
            .unwrap_or(self.defaults))
    }

    /// The sharing record of every touched patient: a new choice, or the defaults for a
    /// first record, and the publisher's item counts per section as `batch` now holds them
    /// (so it runs after the publication's documents are written).
    fn sharing_changes(
        &mut self,
        batch: &WriteBatch<'_>,
    ) -> Result<BTreeMap<DocMeta, DocChanges>, StorageError> {
        let mut changes = BTreeMap::new();
        // How this organisation's data arrives, for viewers to judge its freshness.
        let source = batch.source(&self.publisher)?.map(|row| SourceStatement {
            feed: row.feed,
            system: row.source_system,
            refresh_hours: row.expected_refresh_hours,
        });
        for patient in std::mem::take(&mut self.touched) {
            let meta = sharing_meta(&self.publisher, &patient);
            let previous = batch.care().recorded_consent(&self.publisher, &patient)?;
            let was = previous.unwrap_or(self.defaults);
            let consent = self.consents.get(&patient).copied().unwrap_or(was);
            if was.withholds_everything().is_some() && consent.withholds_everything().is_none() {
                self.reopened.push(patient.clone());
            }
            let counts = batch.item_counts(&self.publisher, &patient)?;
            let record = SharingRecord::new(consent, counts).with_source(source.clone());
            let item = sharing_item(&self.publisher, &record);
            let entry: &mut DocChanges = changes.entry(meta).or_default();
            entry.upserts.insert(item.id.clone(), item);
        }
        Ok(changes)
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Places the current `items` of one source resource, whose possible item ids are
    /// `family`: items are written to their partitions, every other member of the family is
    /// removed from wherever it is held.
    pub fn place(
        &mut self,
        batch: &WriteBatch<'_>,
        patient: &NhsNumber,
        family: &[String],
        items: Vec<Item>,
    ) -> Result<(), StorageError> {
        self.touched.insert(patient.clone());
        let mut targets: HashMap<String, (DocMeta, Item)> = HashMap::new();
        for item in items {
            assert!(
                family.contains(&item.id),
                "item {} outside its family",
                item.id
            );
            let meta = DocMeta {
                publisher: self.publisher.clone(),
                patient: patient.clone(),
                section: item.section,
                class: item.class,
            };
            targets.insert(item.id.clone(), (meta, item));
        }
        for id in family {
            let mut held: BTreeSet<DocMeta> = batch
                .item_partitions(&self.publisher, patient, id)?
                .into_iter()
                .collect();
            if let Some(meta) = self.placed.get(&(patient.clone(), id.clone())) {
                held.insert(meta.clone());
            }
            let target = targets.remove(id);
            for meta in held {
                if target.as_ref().is_some_and(|(t, _)| *t == meta) {
                    continue;
                }
                let changes = self.changes.entry(meta).or_default();
                changes.upserts.remove(id);
                changes.removes.insert(id.clone());
            }
            if let Some((meta, item)) = target {
                self.placed
                    .insert((patient.clone(), id.clone()), meta.clone());
                let changes = self.changes.entry(meta).or_default();
                changes.removes.remove(id);
                changes.upserts.insert(id.clone(), item);
            }
        }
        Ok(())
    }

    /// Writes a new signed version of every document whose content changed, then the
    /// touched patients' sharing records. Returns the number of documents written; documents
    /// whose content is unchanged are left alone.
    pub fn apply(
        mut self,
        batch: &WriteBatch<'_>,
        key: &PublisherKey,
        now: i64,
    ) -> Result<usize, PublishError> {
        let documents = std::mem::take(&mut self.changes);
        let mut written = write_documents(documents, batch, key, now)?;
        let sharing = self.sharing_changes(batch)?;
        written += write_documents(sharing, batch, key, now)?;
        for patient in &self.reopened {
            // Peers' checkpoints passed these documents while they were withheld.
            batch.queue_backfill_to_all_peers(&self.publisher, patient)?;
        }
        Ok(written)
    }
}

/// Writes a new signed version of each document `changes` touches whose content changes.
/// A version is stored as its one change appended to the held copy, with the read model
/// amended by the items written and removed (see `own_versions`); the document is saved
/// whole when it is new or its appended changes reach their limit.
fn write_documents(
    changes: BTreeMap<DocMeta, DocChanges>,
    batch: &WriteBatch<'_>,
    key: &PublisherKey,
    now: i64,
) -> Result<usize, PublishError> {
    match batch.publishing_hold()? {
        Some(hold) if hold.held => {
            if changes.keys().any(|meta| meta.section != Section::Audit) {
                return Err(PublishError::Held {
                    reason: hold.reason,
                });
            }
            // An access record waits: the audit chain holds the access already.
            return Ok(0);
        }
        Some(hold) => {
            publish_deferred_access_records(batch, key, hold.audit_after)?;
        }
        None => {}
    }
    let actor = actor_for(key);
    let mut written = 0;
    for (meta, changes) in changes {
        let held = held_version(batch, &meta, key)?;
        let mut document = match &held {
            Some((signed, _)) => match batch.take_loaded(meta.id(), &signed.heads) {
                Some(loaded) => loaded,
                None => load_held(batch, &meta, signed, &actor)?,
            },
            None if changes.upserts.is_empty() => continue,
            None => PublishedDocument::create(meta.clone(), &actor),
        };
        let upserts: Vec<Item> = changes.upserts.into_values().collect();
        let removes: Vec<String> = changes.removes.into_iter().collect();
        let changed = document.update(&upserts, &removes, now);
        if changed {
            let signed = key.sign_heads(&meta, &document.heads());
            store_version(batch, &document, &signed, held, &upserts, &removes, now)?;
            written += 1;
        }
        if meta.section == Section::Audit {
            // Written at every view of the patient: kept loaded for the next one.
            batch.keep_loaded(document);
        }
    }
    Ok(written)
}

/// The signed heads and index of the publisher's held copy of `meta`, its signature checked
/// against the publisher's own key; `None` where none is held.
fn held_version(
    batch: &WriteBatch<'_>,
    meta: &DocMeta,
    key: &PublisherKey,
) -> Result<Option<(SignedHeads, HeldIndex)>, PublishError> {
    let Some(signed) = batch.held_signed_heads(meta.id())? else {
        return Ok(None);
    };
    let signed = signed.ok_or_else(|| PublishError::MissingSignature {
        doc: meta.id().to_string(),
    })?;
    signed
        .verify(|_, k| *k == key.public())
        .map_err(|source| PublishError::StoredSignature {
            doc: meta.id().to_string(),
            source,
        })?;
    let (_, index) = batch
        .held_index(meta.id())?
        .expect("a held copy whose signed heads decode has an index");
    Ok(Some((signed, index)))
}

/// Loads the held copy of `meta` to write on, checking it is the version its publisher
/// signed.
fn load_held(
    batch: &WriteBatch<'_>,
    meta: &DocMeta,
    signed: &SignedHeads,
    actor: &[u8],
) -> Result<PublishedDocument, PublishError> {
    let stored = batch
        .document(meta.id())?
        .expect("the held copy was read in this batch");
    let document = PublishedDocument::load_for_writing(meta, &stored.snapshot, actor)?;
    document.matches(signed)?;
    Ok(document)
}

/// Stores `document`'s new version `signed`, made from `held` (if any) by writing `upserts`
/// and removing `removes`: appended to the held copy, or saved whole where it is new or the
/// held copy has as many appended changes as it may.
fn store_version(
    batch: &WriteBatch<'_>,
    document: &PublishedDocument,
    signed: &SignedHeads,
    held: Option<(SignedHeads, HeldIndex)>,
    upserts: &[Item],
    removes: &[String],
    now: i64,
) -> Result<(), PublishError> {
    if let Some((_, index)) = &held {
        let change = document
            .last_local_change()
            .expect("an updated document has the change it made");
        match relay::extend(index, &[change]) {
            Ok(extension) => {
                assert_eq!(
                    extension.heads,
                    crate::sorted(signed.heads.clone()),
                    "one change on the held heads gives the new heads"
                );
                if batch
                    .append_own_version(signed, &extension, upserts, removes, now)?
                    .is_some()
                {
                    return Ok(());
                }
                // The stored rows are not what the index described: saved whole below,
                // which replaces them.
                tracing::warn!(doc = %signed.meta.id(), "a document's stored changes are not those its index read; saving it whole");
            }
            Err(Declined::Compact) => {}
            Err(declined) => {
                // Not expected for the publisher's own change on its held heads; saving the
                // version whole is always correct.
                tracing::warn!(doc = %signed.meta.id(), ?declined, "an own version could not be appended; saving it whole");
            }
        }
    }
    let built_on = held.map(|(signed, _)| signed.heads);
    let position = batch.put_own_version(
        signed,
        &document.save(),
        built_on.as_deref(),
        upserts,
        removes,
        now,
    )?;
    assert!(
        position.is_some(),
        "a publisher's version is made from the copy its own batch read"
    );
    Ok(())
}

/// Appends `event` to the audit chain and, when it showed other organisations' data, adds it
/// to the publisher's signed access record for the patient ([`Section::Audit`]) so sync
/// takes it to them. One transaction: an access is never recorded here and lost for the
/// owners, or the reverse. The access record is not counted in the sharing record and does
/// not make the patient the publisher's.
pub fn record_access(
    store: &mut Store,
    key: &PublisherKey,
    publisher: &OdsCode,
    event: &AuditEvent,
) -> Result<ChainedEvent, PublishError> {
    let batch = store.write()?;
    let chained = record_access_in(&batch, key, publisher, event)?;
    batch.commit()?;
    Ok(chained)
}

/// [`record_access`] inside a batch the caller commits, beside the write the access goes
/// with (a break-glass and its record are one transaction).
pub fn record_access_in(
    batch: &WriteBatch<'_>,
    key: &PublisherKey,
    publisher: &OdsCode,
    event: &AuditEvent,
) -> Result<ChainedEvent, PublishError> {
    assert_eq!(
        event.organisation,
        publisher.as_str(),
        "events record this node's accesses"
    );
    let chained = batch.append_audit(event)?;
    if event.showed_others_data() {
        let patient = event
            .nhs
            .as_deref()
            .and_then(|n| NhsNumber::parse(n).ok())
            .expect("an event that showed data names a valid patient");
        publish_access_record(batch, key, publisher.clone(), patient, &chained)?;
    }
    Ok(chained)
}

/// Writes the access record of one chained audit entry into the patient's audit document
/// of `publisher`, so the patient's own GP learns who saw the record. Returns the versions
/// written (none while publishing is held: the record waits for the release).
fn publish_access_record(
    batch: &WriteBatch<'_>,
    key: &PublisherKey,
    publisher: OdsCode,
    patient: NhsNumber,
    chained: &ChainedEvent,
) -> Result<usize, PublishError> {
    let meta = DocMeta {
        publisher,
        patient,
        section: Section::Audit,
        class: DataClass::Coded,
    };
    let item = chained.event.to_access_item(chained.seq, &chained.hash);
    let mut changes = DocChanges::default();
    changes.upserts.insert(item.id.clone(), item);
    write_documents(
        BTreeMap::from([(meta, changes)]),
        batch,
        key,
        chained.event.at,
    )
}

/// Once a hold on publishing is released: publishes the access records recorded while it
/// held, in one transaction. Returns how many document versions it wrote (none while held,
/// or with no hold).
pub fn publish_after_hold(store: &mut Store, key: &PublisherKey) -> Result<usize, PublishError> {
    let batch = store.write()?;
    let written = match batch.publishing_hold()? {
        Some(hold) if !hold.held => publish_deferred_access_records(&batch, key, hold.audit_after)?,
        _ => 0,
    };
    batch.commit()?;
    Ok(written)
}

/// Publishes the access records of audit entries after `audit_after` (those recorded while
/// publishing was held) and forgets the released hold.
fn publish_deferred_access_records(
    batch: &WriteBatch<'_>,
    key: &PublisherKey,
    audit_after: i64,
) -> Result<usize, PublishError> {
    batch.forget_publishing_hold()?;
    let mut written = 0;
    for chained in batch.audit_events_after(audit_after)? {
        let event = &chained.event;
        let Ok(publisher) = OdsCode::parse(&event.organisation) else {
            continue;
        };
        if !event.showed_others_data() {
            continue;
        }
        let Some(patient) = event.nhs.as_deref().and_then(|n| NhsNumber::parse(n).ok()) else {
            continue;
        };
        written += publish_access_record(batch, key, publisher, patient, &chained)?;
    }
    Ok(written)
}

/// Where a publisher's sharing record for a patient lives.
pub fn sharing_meta(publisher: &OdsCode, patient: &NhsNumber) -> DocMeta {
    DocMeta {
        publisher: publisher.clone(),
        patient: patient.clone(),
        section: Section::Sharing,
        class: DataClass::Coded,
    }
}

/// The one item of a sharing record. Nothing in it changes unless the choice or the counts
/// do, so re-ingesting writes nothing.
pub fn sharing_item(publisher: &OdsCode, record: &SharingRecord) -> Item {
    Item {
        fields: record.to_fields(),
        ..Item::titled(
            "sharing",
            Section::Sharing,
            DataClass::Coded,
            "Consent",
            "Sharing choices",
            "caremesh",
            &format!("Consent/sharing-{publisher}"),
        )
    }
}

/// The Automerge actor a publisher writes as: fixed per key, so its changes form one
/// sequence no matter how often the node restarts.
pub fn actor_for(key: &PublisherKey) -> Vec<u8> {
    key.public()[..16].to_vec()
}
