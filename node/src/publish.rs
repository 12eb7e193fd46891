//! Turning a batch of items into new, signed versions of the publisher's documents.
//!
//! A resource's items may move between documents when it changes (a condition later coded
//! as sensitive moves from the coded to the sensitive document); [`Publication`] removes an
//! item from wherever it was before placing it anew, so one fact is never held twice.

use caremesh_storage::{StorageError, WriteBatch};
use caremesh_sync::{
    DocMeta, DocumentError, Item, NhsNumber, OdsCode, PublishedDocument, PublisherKey,
    SignatureError,
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
}

#[derive(Default)]
struct DocChanges {
    upserts: BTreeMap<String, Item>,
    removes: BTreeSet<String>,
}

/// Pending changes to one publisher's documents, applied in one storage transaction.
pub struct Publication {
    publisher: OdsCode,
    changes: BTreeMap<DocMeta, DocChanges>,
    /// Where an item id was placed earlier in this publication, per patient.
    placed: HashMap<(NhsNumber, String), DocMeta>,
}

impl Publication {
    pub fn new(publisher: OdsCode) -> Self {
        Publication {
            publisher,
            changes: BTreeMap::new(),
            placed: HashMap::new(),
        }
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

    /// Writes a new signed version of every document whose content changed. Returns the
    /// number of documents written; documents whose content is unchanged are left alone.
    pub fn apply(
        self,
        batch: &WriteBatch<'_>,
        key: &PublisherKey,
        now: i64,
    ) -> Result<usize, PublishError> {
        let actor = actor_for(key);
        let mut written = 0;
        for (meta, changes) in self.changes {
            let mut document = match batch.document(meta.id())? {
                Some(stored) => {
                    let signed =
                        stored
                            .signed_heads()
                            .ok_or_else(|| PublishError::MissingSignature {
                                doc: meta.id().to_string(),
                            })?;
                    signed.verify(|_, k| *k == key.public()).map_err(|source| {
                        PublishError::StoredSignature {
                            doc: meta.id().to_string(),
                            source,
                        }
                    })?;
                    let document =
                        PublishedDocument::load_for_writing(&meta, &stored.snapshot, &actor)?;
                    document.matches(&signed)?;
                    document
                }
                None if changes.upserts.is_empty() => continue,
                None => PublishedDocument::create(meta.clone(), &actor),
            };
            let upserts: Vec<Item> = changes.upserts.into_values().collect();
            let removes: Vec<String> = changes.removes.into_iter().collect();
            if !document.update(&upserts, &removes, now) {
                continue;
            }
            let signed = key.sign_heads(&meta, &document.heads());
            batch.put_document(&signed, &document.save(), &document.items()?, now)?;
            written += 1;
        }
        Ok(written)
    }
}

/// The Automerge actor a publisher writes as: fixed per key, so its changes form one
/// sequence no matter how often the node restarts.
pub fn actor_for(key: &PublisherKey) -> Vec<u8> {
    key.public()[..16].to_vec()
}
