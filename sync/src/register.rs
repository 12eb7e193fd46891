//! Reading a new version of a document from its changes alone.
//!
//! A node that reads a document's items (a hub its sharing records, a practice everything it
//! receives) otherwise loads the held copy, applies the received changes, reads every item
//! and saves the document whole for each new version: a hub's largest cost per sharing
//! record. Yet a publisher's document has one writer and a linear history, and each version
//! of it is a few puts of item strings into one map (`document::PublishedDocument::update`).
//! So, knowing which operation wrote each item's current value, a node can tell what a new
//! change makes of the items map without Automerge's operation set.
//!
//! An [`ItemRegister`] is that knowledge for one version: the items map's object, and for
//! each item its current value and the operation that wrote it. It is taken from a loaded
//! document ([`ItemRegister::of`]) and stored beside it. [`ItemRegister::extend`] then reads
//! a new version from its changes, which must already be authenticated by their hash chain
//! ([`crate::relay::extend`]). It takes only what an honest publisher's
//! `PublishedDocument::update` makes, where Automerge's result is beyond doubt:
//!
//! - each change depends on exactly the version before it, is the same writer's next
//!   change (its sequence number one more), and numbers its operations straight after the
//!   writer's last, so every new operation is newer than every operation the writer made;
//! - every operation puts a string into the items map, or deletes from it, naming as its
//!   predecessor exactly the operation that wrote the item's current value (none for a new
//!   item): the new value then replaces the only visible one, and no conflict arises.
//!
//! Anything else (a second head, another writer, an operation on any other object, a value
//! that is not a string, a predecessor list that is not exactly the current value) is
//! declined, and the caller takes the full path, which decides exactly. The differential
//! tests below hold the two paths to the same items on generated honest and hostile
//! histories.

use crate::document::{DocumentError, parse_item, refusing_panics};
use crate::model::{DocMeta, Item};
use automerge::legacy::{Key, ObjectId, OpId, OpType};
use automerge::{ActorId, Change, ScalarValue};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Items whose values add up to more than this are not registered: the register is stored
/// beside the document with every version, and only small documents (sharing records,
/// short lists) gain from it.
pub const MAX_REGISTER_BYTES: usize = 32 * 1024;

/// An operation's identity: its counter and the actor that made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpRef {
    pub counter: u64,
    pub actor: Vec<u8>,
}

impl OpRef {
    fn is(&self, op: &OpId) -> bool {
        self.counter == op.0 && self.actor == op.1.to_bytes()
    }
}

/// One item's current value and the operation that wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    pub written_by: OpRef,
    pub json: String,
}

/// What a document's items map is at one version (one head), as far as a new version read
/// from its changes alone needs to know it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemRegister {
    /// The version described: the document's only head.
    pub head: [u8; 32],
    /// The actor that made the head change, its sequence number and its last operation's
    /// counter.
    pub writer: Vec<u8>,
    pub seq: u64,
    pub max_op: u64,
    /// The operation that made the items map.
    pub items_map: OpRef,
    /// Every item, by key, in Automerge's key order (the order `items()` reads them in).
    pub items: BTreeMap<String, Register>,
}

impl ItemRegister {
    /// The register of `document` (loaded, and checked against its signed heads), where its
    /// history has one head, its items map and every item hold exactly one value each, every
    /// value is a string, and they fit [`MAX_REGISTER_BYTES`]. `None` otherwise.
    pub(crate) fn of(document: &automerge::Automerge) -> Option<ItemRegister> {
        use automerge::{ObjType, ROOT, ReadDoc, Value};
        let [head] = document.get_heads()[..] else {
            return None;
        };
        let head_change = document.get_change_by_hash(&head)?;
        let [(Value::Object(ObjType::Map), items_map)] = &document.get_all(ROOT, "items").ok()?[..]
        else {
            return None;
        };
        let items_map_ref = exid_ref(items_map)?;
        let mut items = BTreeMap::new();
        let mut size = 0;
        for key in document.keys(items_map) {
            let [(Value::Scalar(value), written_by)] =
                &document.get_all(items_map, key.as_str()).ok()?[..]
            else {
                return None;
            };
            let ScalarValue::Str(json) = value.as_ref() else {
                return None;
            };
            size += key.len() + json.len();
            if size > MAX_REGISTER_BYTES {
                return None;
            }
            let register = Register {
                written_by: exid_ref(written_by)?,
                json: json.to_string(),
            };
            items.insert(key, register);
        }
        Some(ItemRegister {
            head: head.0,
            writer: head_change.actor_id().to_bytes().to_vec(),
            seq: head_change.seq(),
            max_op: head_change.max_op(),
            items_map: items_map_ref,
            items,
        })
    }

    /// The register after `changes` (raw change chunks, in the order they apply; already
    /// authenticated by their hash chain), or `None` where they are not plainly the writer's
    /// next puts and deletes on the items map (see the module's description).
    pub fn extend(&self, changes: &[Vec<u8>]) -> Option<ItemRegister> {
        let mut next = self.clone();
        for chunk in changes {
            next.apply(&crate::relay::change_chunk(chunk)?)?;
        }
        Some(next)
    }

    fn apply(&mut self, change: &Change) -> Option<()> {
        let writer = ActorId::from(&self.writer[..]);
        let follows_the_head = matches!(change.deps(), [dep] if dep.0 == self.head);
        if !follows_the_head
            || *change.actor_id() != writer
            || change.seq() != self.seq.checked_add(1)?
            || change.start_op().get() != self.max_op.checked_add(1)?
        {
            return None;
        }
        // Decoding bytes from outside: see `refusing_panics`.
        let expanded = refusing_panics(|| Ok(change.decode())).ok()?;
        for (at, op) in expanded.operations.iter().enumerate() {
            let counter = change.start_op().get().checked_add(at as u64)?;
            let on_items_map = matches!(&op.obj, ObjectId::Id(map) if self.items_map.is(map));
            let Key::Map(key) = &op.key else {
                return None;
            };
            if !on_items_map || op.insert {
                return None;
            }
            let current = self.items.get(key.as_str());
            let replaces_exactly_the_current_value = match current {
                Some(register) => {
                    op.pred.len() == 1 && op.pred.iter().all(|p| register.written_by.is(p))
                }
                None => op.pred.is_empty(),
            };
            if !replaces_exactly_the_current_value {
                return None;
            }
            match &op.action {
                OpType::Put(ScalarValue::Str(json)) => {
                    let register = Register {
                        written_by: OpRef {
                            counter,
                            actor: self.writer.clone(),
                        },
                        json: json.to_string(),
                    };
                    self.items.insert(key.to_string(), register);
                }
                OpType::Delete if current.is_some() => {
                    self.items.remove(key.as_str());
                }
                _ => return None,
            }
        }
        let size: usize = self.items.iter().map(|(k, r)| k.len() + r.json.len()).sum();
        if size > MAX_REGISTER_BYTES {
            return None;
        }
        self.head = change.hash().0;
        self.seq = change.seq();
        self.max_op = change.max_op();
        Some(())
    }

    /// The items, parsed and checked as [`crate::PublishedDocument::items`] does.
    pub fn items(&self, meta: &DocMeta) -> Result<Vec<Item>, DocumentError> {
        self.items
            .iter()
            .map(|(key, register)| parse_item(meta, key, &register.json))
            .collect()
    }

    /// The register as stored beside its document.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("a register always encodes")
    }

    /// A stored register, or `None` where its bytes do not decode (it is then not used).
    pub fn decode(bytes: &[u8]) -> Option<ItemRegister> {
        postcard::from_bytes(bytes).ok()
    }
}

/// An object or value's operation, as the loaded document names it.
fn exid_ref(id: &automerge::ObjId) -> Option<OpRef> {
    match id {
        automerge::ObjId::Id(counter, actor, _) => Some(OpRef {
            counter: *counter,
            actor: actor.to_bytes().to_vec(),
        }),
        automerge::ObjId::Root => None,
    }
}

#[cfg(test)]
mod tests;
