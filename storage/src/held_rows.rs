//! What a relay reads of a held document for every version it handles, kept for the
//! documents used most recently: the document's row without its saved bytes, and the index
//! of the changes appended to it since.
//!
//! A hub reads those rows four times a version: when the version is offered (is it news?),
//! when it arrives (what does it extend?), when it is stored (is the held copy still the one
//! extended?) and when it is pushed to a recipient (what does the holder lack?). At
//! saturation that was a fifth of the engine thread (BENCHMARKS.md, seventeenth sitting).
//!
//! An entry is exactly what the store's own connection would read, because SQLite lets one
//! connection write at a time, and:
//! - every write of a document's row or appended changes forgets its entry (`put_version`,
//!   `append_changes`), and a purge forgets all;
//! - a write batch notes the row as it wrote it ([`HeldRow::as_written`]), reads its own
//!   notes first, and keeps them only once it commits: a batch dropped, or whose commit
//!   fails, keeps nothing of what it wrote. A relay pushes each version right after storing
//!   it, and so reads the row it just wrote without going to the database;
//! - only reads outside a write batch keep what they read; a batch uses what is kept and
//!   otherwise reads its own transaction without keeping it, since its writes may yet roll
//!   back;
//! - a group commit that fails forgets all, since reads between its batches, and the rows
//!   its batches kept as they committed, saw its writes.
//!
//! Another connection may still write beside the node (a node's own documents, published by
//! a process beside it: `load-bench`'s publishers). SQLite's `data_version` moves whenever
//! another connection commits, so every read outside a write and every write batch first
//! checks it and forgets all if it moved ([`HeldRows::forget_if_written_elsewhere`]); while
//! a write transaction holds the lock, no other connection commits.
//!
//! A store opened read-only keeps nothing: another connection writes what it reads.

use crate::{Result, StorageError, appended_changes, hashes, meta_from, partition_columns};
use caremesh_sync::relay::{AppendedChange, AppendedChanges};
use caremesh_sync::{DocId, DocMeta, SignedHeads};
use rusqlite::{Connection, OptionalExtension};
use std::path::Path;
use std::sync::Arc;

/// Documents whose rows are kept. An entry is its row (about 400 bytes) and an index of at
/// most a compaction's worth of appended changes (about 100 bytes each): 1–4 KB, so a full
/// cache is 8–32 MB.
pub(crate) const KEPT_ROWS: usize = 8_192;

/// A held document's row without its saved bytes, and its appended changes' index.
#[derive(Debug, PartialEq)]
pub(crate) struct HeldRow {
    pub meta: DocMeta,
    /// The signed heads as stored.
    pub signed: Vec<u8>,
    /// Their heads, `None` where they do not decode.
    pub heads: Option<Vec<[u8; 32]>>,
    /// How many bytes were saved whole.
    pub base_len: u64,
    /// The heads of the saved base that appended changes follow; `None` when saved whole.
    pub appended_base: Option<Vec<u8>>,
    /// The index of the appended changes: `None` where nothing is appended, or where a stored
    /// hash is damaged (then it is never used).
    pub appended: Option<AppendedChanges>,
    /// How many bytes the appended changes are.
    pub appended_len: u64,
    /// The item register as stored.
    pub register: Option<Vec<u8>>,
}

impl HeldRow {
    /// The row as a write leaves it, which is what reading it back gives: `signed` and
    /// `register` as encoded into their columns, a base of `base_len` bytes saved whole, and
    /// after it, where `appended_base` names the base's heads, the index of every appended
    /// change in position order (`changes`: none where the version was saved whole).
    pub fn as_written(
        meta: DocMeta,
        signed: Vec<u8>,
        base_len: u64,
        appended_base: Option<Vec<u8>>,
        changes: Vec<AppendedChange>,
        register: Option<Vec<u8>>,
    ) -> HeldRow {
        assert!(
            appended_base.is_some() || changes.is_empty(),
            "changes are appended only after a base named by its heads"
        );
        let appended_len = changes.iter().map(|change| change.len).sum();
        let appended =
            appended_base
                .as_deref()
                .and_then(hashes)
                .map(|base_heads| AppendedChanges {
                    base_heads,
                    base_len,
                    changes,
                });
        HeldRow::with_heads_of(
            meta,
            signed,
            base_len,
            appended_base,
            (appended, appended_len),
            register,
        )
    }

    /// A row whose heads are those `signed` (as stored) names.
    fn with_heads_of(
        meta: DocMeta,
        signed: Vec<u8>,
        base_len: u64,
        appended_base: Option<Vec<u8>>,
        (appended, appended_len): (Option<AppendedChanges>, u64),
        register: Option<Vec<u8>>,
    ) -> HeldRow {
        HeldRow {
            meta,
            heads: SignedHeads::decode(&signed).map(|signed| signed.heads),
            signed,
            base_len,
            appended_base,
            appended,
            appended_len,
            register,
        }
    }
}

/// Reads the row of `id` from `conn` (the store's connection, or a batch's transaction).
pub(crate) fn read(conn: &Connection, path: &Path, id: DocId) -> Result<Option<HeldRow>> {
    let row = conn
        .prepare_cached(
            "SELECT d.publisher, d.nhs, d.section, d.class, COALESCE(length(s.snapshot), 0), \
             d.signed, d.appended_base, d.item_register \
             FROM documents d LEFT JOIN document_snapshots s ON s.doc_id = d.doc_id \
             WHERE d.doc_id = ?1",
        )
        .and_then(|mut statement| {
            statement
                .query_row([&id.0[..]], |row| {
                    Ok((
                        partition_columns(row)?,
                        row.get::<_, i64>(4)?,
                        row.get::<_, Vec<u8>>(5)?,
                        row.get::<_, Option<Vec<u8>>>(6)?,
                        row.get::<_, Option<Vec<u8>>>(7)?,
                    ))
                })
                .optional()
        })
        .map_err(|source| StorageError::database(path.to_path_buf(), "read document", source))?;
    let Some((columns, base_len, signed, appended_base, register)) = row else {
        return Ok(None);
    };
    let meta = meta_from(columns.each_ref().map(String::as_str), id, path)?;
    let base_len = base_len as u64;
    let appended = match &appended_base {
        Some(base_heads) => appended_changes(conn, path, id, base_heads, base_len, None)?,
        None => (None, 0),
    };
    Ok(Some(HeldRow::with_heads_of(
        meta,
        signed,
        base_len,
        appended_base,
        appended,
        register,
    )))
}

/// The rows kept, least recently used first out.
pub(crate) struct HeldRows {
    kept: Option<hashlink::LruCache<DocId, Arc<HeldRow>>>,
    /// The database's `data_version` when the rows kept were last known to be current.
    data_version: Option<i64>,
}

impl HeldRows {
    /// Keeps up to `capacity` rows; none for a store that another connection writes.
    pub fn new(capacity: usize) -> HeldRows {
        HeldRows {
            kept: (capacity > 0).then(|| hashlink::LruCache::new(capacity)),
            data_version: None,
        }
    }

    /// Forgets every row if another connection committed to the database since the last
    /// look (`conn` is this store's connection, or its open transaction).
    pub fn forget_if_written_elsewhere(&mut self, conn: &Connection, path: &Path) -> Result<()> {
        if self.kept.is_none() {
            return Ok(());
        }
        let now: i64 = conn
            .prepare_cached("PRAGMA data_version")
            .and_then(|mut statement| statement.query_row([], |row| row.get(0)))
            .map_err(|source| {
                StorageError::database(path.to_path_buf(), "read the data version", source)
            })?;
        if self.data_version.replace(now) != Some(now) {
            self.forget_all();
        }
        Ok(())
    }

    pub fn get(&mut self, id: DocId) -> Option<Arc<HeldRow>> {
        self.kept.as_mut()?.get(&id).cloned()
    }

    pub fn keep(&mut self, id: DocId, row: Arc<HeldRow>) {
        if let Some(kept) = self.kept.as_mut() {
            kept.insert(id, row);
        }
    }

    /// Forgets `id`'s row: it is being written.
    pub fn forget(&mut self, id: DocId) {
        if let Some(kept) = self.kept.as_mut() {
            kept.remove(&id);
        }
    }

    /// Forgets every row: many were written, or writes were rolled back.
    pub fn forget_all(&mut self) {
        if let Some(kept) = self.kept.as_mut() {
            kept.clear();
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.kept.as_ref().map_or(0, hashlink::LruCache::len)
    }
}
