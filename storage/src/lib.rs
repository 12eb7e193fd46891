//! SQLite storage for one caremesh node.
//!
//! Invariants:
//! * Only documents whose signed heads verified are written here (the caller verifies; this
//!   crate stores the signed statement beside the snapshot so every load can verify again).
//! * A document and its read-model rows change in the same transaction, so the view never
//!   shows items that are not backed by a stored, signed document.
//! * Every document write takes a fresh `seq`, a node-local, strictly increasing position:
//!   the changes feed that sync reads from.
//! * A peer's checkpoint is written in the same transaction as the documents it covers, so a
//!   crash can never leave a checkpoint ahead of what is stored.
//! * The database runs in WAL mode with `synchronous=FULL`: a committed write survives a
//!   kill -9 or a power cut. The one exception is a group commit on a store whose groups
//!   defer their sync ([`Store::defer_group_syncs`], the sync engine's): it survives a kill -9
//!   at once, and a power cut once a [`WalSyncer`] has synced the WAL after it.

pub mod access;
pub mod api_access;
pub mod at_rest;
pub mod audit;
pub mod disk_space;
mod feed_tail;
mod held_rows;
mod migrations;
mod own_versions;
pub mod page_checksums;
mod peers;
pub mod placements;
pub mod power_loss;
pub mod publish;
pub mod publishing_hold;
pub mod sealed;
pub mod simulated_disk;
pub mod subscriptions;
pub mod sync_host;
mod vfs_shim;

pub use access::BreakGlass;
pub use peers::{
    FeedRow, KEPT_FEED_EPOCHS, PeerCheckpoint, PeerStatus, RejectedChange, UnsendableDocument,
};
pub use placements::{OnSeveralPatients, Placement};

use caremesh_sync::policy::{Consent, SourceStatement};
use caremesh_sync::register::ItemRegister;
use caremesh_sync::relay::{self, AppendedChange, AppendedChanges, Extension, HeldIndex};
use caremesh_sync::{
    ChangesToSend, DataClass, DocId, DocMeta, HeldChanges, Item, NhsNumber, OdsCode,
    PublishedDocument, Section, SignedHeads,
};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use simulated_disk::SimulatedDisk;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("database {path}: {action} failed: {source}")]
    Database {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: DatabaseError,
    },
    #[error("database {path}: cannot create it: {source}; check the folder exists and is writable")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "database {path} has schema version {found}, newer than this caremesh understands ({known}); upgrade caremesh"
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error(
        "database {path}: row for document {doc} is damaged ({what}); run `caremesh verify` for a full report"
    )]
    DamagedRow {
        path: PathBuf,
        doc: String,
        what: String,
    },
    #[error(
        "database {path}: the system's random source failed ({source}); a feed epoch needs it, so check /dev/urandom and getrandom(2) are available"
    )]
    Randomness {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "database {path} is encrypted, and no data key was given: give the node its key (`[storage] data_key_file` in caremesh.toml); nothing was changed"
    )]
    Encrypted { path: PathBuf },
    #[error(
        "database {path} does not open with the data key given: it was encrypted with another key (or its first page is damaged); give the key it was made with, or if it is that key restore the database from a backup; nothing was changed"
    )]
    WrongKey { path: PathBuf },
    #[error(
        "database {path} is not encrypted, and a data key was given: it was made without one; nothing was changed"
    )]
    NotEncrypted { path: PathBuf },
    #[error("database {path}: cannot read it: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl StorageError {
    /// The database file is damaged (SQLite found it malformed, or a page failed its
    /// checksum): nothing read from it can be trusted until it is restored or rebuilt.
    pub fn is_damage(&self) -> bool {
        matches!(self, StorageError::Database { source, .. } if source.failure == DatabaseFailure::Corrupt)
    }

    fn database(path: impl Into<PathBuf>, action: &'static str, source: rusqlite::Error) -> Self {
        let path = path.into();
        let source = DatabaseError::from_sqlite(source);
        if source.failure == DatabaseFailure::Corrupt {
            // Kept where the sync engine looks after each turn: an error that reaches it only
            // as a message (through a session) still stops the node.
            page_checksums::record_damage(&path, format!("{action} failed: {source}"));
        }
        StorageError::Database {
            path,
            action,
            source,
        }
    }
}

/// What the database engine reported, in this crate's terms: callers match on
/// [`DatabaseFailure`], never on the engine's own types, so another storage backend would
/// report the same.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct DatabaseError {
    pub failure: DatabaseFailure,
    message: String,
}

/// The kinds of database failure a caller acts on differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseFailure {
    /// No space left for the write: free space, then retry.
    DiskFull,
    /// Another process holds the database locked past the busy timeout.
    Busy,
    /// The file is damaged: restore from a backup or rebuild from the publishers.
    Corrupt,
    /// The operating system failed a read, write or fsync.
    Io,
    /// Anything else (a constraint, a misuse, a bad query).
    Other,
}

impl DatabaseError {
    /// A failure as a caller (or a test) names it.
    pub fn new(failure: DatabaseFailure, message: impl Into<String>) -> DatabaseError {
        DatabaseError {
            failure,
            message: message.into(),
        }
    }

    fn from_sqlite(error: rusqlite::Error) -> DatabaseError {
        use rusqlite::ErrorCode;
        let extended = match &error {
            rusqlite::Error::SqliteFailure(failure, _) => failure.extended_code,
            _ => 0,
        };
        if extended == rusqlite::ffi::SQLITE_IOERR_DATA {
            return DatabaseError {
                failure: DatabaseFailure::Corrupt,
                message: "a page failed its checksum: the disk changed it after it was written; \
                    stop the node, keep the file for inspection, and restore the database from a \
                    backup or rebuild the node from its peers"
                    .into(),
            };
        }
        let failure = match error.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => DatabaseFailure::DiskFull,
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => DatabaseFailure::Busy,
            Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => DatabaseFailure::Corrupt,
            Some(ErrorCode::SystemIoFailure) => DatabaseFailure::Io,
            _ => DatabaseFailure::Other,
        };
        DatabaseError {
            failure,
            message: error.to_string(),
        }
    }
}

type Result<T> = std::result::Result<T, StorageError>;

/// A document as stored: partition, Automerge snapshot, the publisher's signed heads.
#[derive(Debug, Clone)]
pub struct StoredDocument {
    pub id: DocId,
    pub meta: DocMeta,
    /// The document's bytes: a saved document, followed by the change chunks a relay
    /// appended since (`appended`). Either way they load as the whole document.
    pub snapshot: Vec<u8>,
    /// The index of the appended changes, which are stored as rows of their own after the
    /// saved document; `None` where the document was saved whole, or where a stored hash is
    /// damaged (the bytes are then served as if saved whole, which they load as).
    pub appended: Option<AppendedChanges>,
    pub signed: Vec<u8>,
    pub seq: i64,
    pub updated_at: i64,
}

impl StoredDocument {
    pub fn signed_heads(&self) -> Option<SignedHeads> {
        SignedHeads::decode(&self.signed)
    }

    /// What a relay knows of it without its bytes, if its signed heads decode.
    pub fn index(&self) -> Option<HeldIndex> {
        HeldIndex::of(&self.signed, &self.snapshot, self.appended.clone())
    }
}

/// One item of the read model with the document it came from.
#[derive(Debug, Clone)]
pub struct StoredItem {
    pub doc_id: DocId,
    pub publisher: OdsCode,
    pub item: Item,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SourceRow {
    pub publisher: String,
    pub name: String,
    pub kind: String,
    pub source_system: String,
    /// live, batch, or "synced" until the publisher's sharing record states which.
    pub feed: String,
    pub data_as_of: i64,
    /// For a batch feed: how often it is expected to refresh.
    pub expected_refresh_hours: Option<u32>,
}

fn row_to_source(row: &rusqlite::Row<'_>) -> rusqlite::Result<SourceRow> {
    Ok(SourceRow {
        publisher: row.get(0)?,
        name: row.get(1)?,
        kind: row.get(2)?,
        source_system: row.get(3)?,
        feed: row.get(4)?,
        data_as_of: row.get(5)?,
        expected_refresh_hours: row.get(6)?,
    })
}

impl SourceRow {
    /// A batch source whose newest data is older than its expected refresh.
    pub fn is_stale(&self, now: i64) -> bool {
        self.feed == "batch"
            && self
                .expected_refresh_hours
                .is_some_and(|hours| now - self.data_as_of > i64::from(hours) * 3600)
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct IngestRow {
    pub at: i64,
    pub file: String,
    pub outcome: String,
    pub summary: serde_json::Value,
    /// Where the file was kept, relative to the node home (`processed/NAME`,
    /// `quarantine/NAME`); `None` when it was left where it was.
    pub kept_as: Option<String>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StoreStats {
    pub patients: i64,
    pub documents: i64,
    pub items: i64,
    /// (publisher, section, count)
    pub items_by_source_and_section: Vec<(String, String, i64)>,
    /// (publisher, count) of items of the first format, summaries without their source
    /// resource: shown marked "summary only" until their publisher re-publishes.
    pub summary_only_by_source: Vec<(String, i64)>,
    pub database_bytes: u64,
    pub last_ingest: Option<IngestRow>,
}

/// The lookups policy decisions make: what a publisher recorded about a patient's consent,
/// and who has a care relationship with them. From the store, or inside a write batch.
pub struct CareLookup<'a> {
    conn: &'a Connection,
    path: &'a Path,
}

impl CareLookup<'_> {
    fn err(&self, action: &'static str) -> impl FnOnce(rusqlite::Error) -> StorageError + '_ {
        move |source| StorageError::database(self.path.to_path_buf(), action, source)
    }

    /// The patient's consent as `publisher` recorded it in its sharing record. `None` when
    /// this node holds no sharing record from it, or one whose fields do not read as consent.
    pub fn recorded_consent(
        &self,
        publisher: &OdsCode,
        nhs: &NhsNumber,
    ) -> Result<Option<Consent>> {
        let body: Option<String> = self
            .conn
            .prepare_cached(SHARING_RECORD_OF_PATIENT)
            .and_then(|mut statement| {
                statement
                    .query_row([publisher.as_str(), nhs.as_str()], |row| row.get(0))
                    .optional()
            })
            .map_err(self.err("read a sharing record"))?;
        let Some(body) = body else {
            return Ok(None);
        };
        let item: Item = serde_json::from_str(&body).map_err(|e| StorageError::DamagedRow {
            path: self.path.to_path_buf(),
            doc: format!("sharing record of {publisher}"),
            what: e.to_string(),
        })?;
        Ok(Consent::from_fields(&item.fields))
    }

    /// The organisations that have published about the patient (access records aside): the
    /// patient's caseload as this node knows it.
    pub fn caseload(&self, nhs: &NhsNumber) -> Result<Vec<OdsCode>> {
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT DISTINCT publisher FROM documents WHERE nhs = ?1 AND section != 'audit'",
            )
            .map_err(self.err("look up a caseload"))?;
        let publishers: Vec<String> = statement
            .query_map([nhs.as_str()], |row| row.get(0))
            .and_then(|rows| rows.collect())
            .map_err(self.err("look up a caseload"))?;
        publishers
            .into_iter()
            .map(|code| {
                OdsCode::parse(&code).map_err(|e| StorageError::DamagedRow {
                    path: self.path.to_path_buf(),
                    doc: format!("a document of patient {nhs}"),
                    what: e.to_string(),
                })
            })
            .collect()
    }

    /// Whether `organisation` has published anything about the patient: the evidence of a
    /// care relationship that puts the patient on its caseload.
    pub fn has_published_about(&self, organisation: &OdsCode, nhs: &NhsNumber) -> Result<bool> {
        self.conn
            .prepare_cached(
                // An access record is not care: viewing (or trying to) must not put a patient
                // on anyone's caseload.
                "SELECT EXISTS(SELECT 1 FROM documents WHERE publisher = ?1 AND nhs = ?2 \
                 AND section != 'audit')",
            )
            .and_then(|mut statement| {
                statement.query_row([organisation.as_str(), nhs.as_str()], |row| row.get(0))
            })
            .map_err(self.err("look up a care relationship"))
    }
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// The full path, as SQLite and [`page_checksums`] name the file.
    full_path: String,
    /// Where a group commit stands (see [`Store::begin_group`]).
    group: std::cell::Cell<Group>,
    /// How commits reach the disk.
    syncing: std::cell::Cell<Syncing>,
    /// Opened through the power-loss VFS: its syncs are the simulator's model of the disk.
    simulated: bool,
    /// This node's own documents kept loaded between versions (see [`own_versions`]).
    loaded: std::cell::RefCell<own_versions::LoadedOwnDocuments>,
    /// What a relay reads of held documents, kept (see [`held_rows`]).
    held_rows: std::cell::RefCell<held_rows::HeldRows>,
    /// The key this connection was unlocked with, when the database is encrypted.
    key: Option<Arc<at_rest::DataKey>>,
}

/// How this connection's commits reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Syncing {
    /// Every commit waits for the disk (`synchronous = FULL`).
    Full,
    /// Group commits return once the WAL is written (`synchronous = NORMAL`) and are made
    /// durable by a [`WalSyncer`]; other commits wait for the disk.
    GroupsDeferred,
    /// Nothing waits for the disk (`synchronous = OFF`; see [`Store::without_fsync`]).
    Off,
}

/// A group commit: none, asked for but nothing written yet (no transaction, no lock), or
/// open (a transaction holding the write lock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    None,
    Pending,
    Open,
}

/// Makes a store's committed WAL frames durable (see [`Store::defer_group_syncs`]): every
/// commit that returned before [`WalSyncer::sync`] was called is durable once it returns.
/// Opens the WAL by its name, so any thread may hold one.
#[derive(Debug, Clone)]
pub struct WalSyncer {
    wal: PathBuf,
    disk: WalDisk,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WalDisk {
    /// `fdatasync` of the WAL file.
    Real,
    /// The power-loss VFS's model of the disk (the simulator).
    Simulated,
    /// The store's syncs are off ([`Store::without_fsync`]): nothing is synced.
    NeverSynced,
}

impl WalSyncer {
    /// Syncs the WAL. A WAL that is not there holds nothing unsynced: SQLite removes it only
    /// after checkpointing it into the database, which it syncs.
    pub fn sync(&self) -> std::io::Result<()> {
        match self.disk {
            WalDisk::Real => match std::fs::File::open(&self.wal) {
                Ok(file) => file.sync_data(),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(error) => Err(error),
            },
            WalDisk::Simulated => {
                power_loss::sync_wal(&self.wal);
                Ok(())
            }
            WalDisk::NeverSynced => Ok(()),
        }
    }
}

/// Refuses, before SQLite touches the file, to open an encrypted database without its key or
/// to give a key to one in plain text (SQLCipher would take the plaintext file as encrypted
/// under the wrong key).
fn check_file_kind(path: &Path, key: Option<&at_rest::DataKey>) -> Result<()> {
    let kind = at_rest::file_kind(path).map_err(|source| StorageError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    match (kind, key) {
        (at_rest::FileKind::Encrypted, None) => Err(StorageError::Encrypted {
            path: path.to_path_buf(),
        }),
        (at_rest::FileKind::Plaintext, Some(_)) => Err(StorageError::NotEncrypted {
            path: path.to_path_buf(),
        }),
        _ => Ok(()),
    }
}

fn lacks_checksums(path: &Path) -> Result<bool> {
    page_checksums::lacks_checksums(path).map_err(|source| StorageError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Gives an encrypted database's connection its key; a wrong key is told apart from damage.
fn unlock(conn: &Connection, path: &Path, key: &at_rest::DataKey) -> Result<()> {
    at_rest::unlock(conn, key).map_err(unlock_error(path))
}

/// An error of a keyed connection's first read: a wrong key named as such.
fn unlock_error(path: &Path) -> impl FnOnce(rusqlite::Error) -> StorageError + '_ {
    move |source| {
        if source.sqlite_error_code() == Some(rusqlite::ErrorCode::NotADatabase) {
            StorageError::WrongKey {
                path: path.to_path_buf(),
            }
        } else {
            StorageError::database(path.to_path_buf(), "unlock", source)
        }
    }
}

/// `path` made absolute, with links resolved: the name SQLite gives the file.
fn full_path(path: &Path) -> String {
    std::fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .to_string_lossy()
        .into_owned()
}

/// Prepared statements a connection keeps: more than the store has (about 70 call sites
/// prepare one), each a few KB.
const STATEMENT_CACHE_CAPACITY: usize = 128;

impl Store {
    /// Opens (creating if needed) the node database and brings its schema up to date.
    /// Each opening begins a feed epoch (see [`Store::begin_feed_epoch`]) with a random id.
    pub fn open(path: &Path) -> Result<Store> {
        Store::open_database(&at_rest::Database::plain(path))
    }

    /// [`Store::open`] of `database`, with its key when it is encrypted.
    pub(crate) fn open_database(database: &at_rest::Database) -> Result<Store> {
        let path = database.path();
        let epoch = getrandom::u64().map_err(|source| StorageError::Randomness {
            path: path.to_path_buf(),
            source: std::io::Error::other(source.to_string()),
        })?;
        page_checksums::register();
        match database.keys() {
            None => Store::open_through(path, page_checksums::VFS_NAME, None, epoch),
            Some(_) => at_rest::open_with_any(database, |key| {
                Store::open_through(path, page_checksums::VFS_NAME, Some(key), epoch)
            }),
        }
    }

    /// [`Store::open`] for a simulated node: through the power-loss VFS
    /// ([`power_loss`]), whose syncs cost nothing, so the store runs `synchronous = FULL` as
    /// production does and a simulated crash can take back what was not synced. The caller
    /// names the feed epoch, so that a seed replays exactly.
    pub fn open_simulated(path: &Path, epoch: u64) -> Result<Store> {
        page_checksums::register_simulated();
        Store::open_through(path, page_checksums::SIMULATED_VFS_NAME, None, epoch)
    }

    /// Opens through `vfs`, a [`page_checksums`] VFS: every page is checked when read. With
    /// a key, through SQLite's own VFS, SQLCipher checking every page (see [`at_rest`]).
    fn open_through(
        path: &Path,
        vfs: &str,
        key: Option<&Arc<at_rest::DataKey>>,
        epoch: u64,
    ) -> Result<Store> {
        check_file_kind(path, key.map(|key| &**key))?;
        if key.is_none() && lacks_checksums(path)? {
            page_checksums::rewrite_with_checksums(path, vfs).map_err(|source| {
                StorageError::database(path.to_path_buf(), "rewrite with page checksums", source)
            })?;
            tracing::info!(path = %path.display(), "rewrote the database once to give every page a checksum");
        }
        // Created readable by its owner only; SQLite gives its WAL and shared-memory files the
        // database file's permissions.
        if !path.exists() {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|source| StorageError::Create {
                    path: path.to_path_buf(),
                    source,
                })?;
        }
        let conn = match key {
            None => Connection::open_with_flags_and_vfs(path, OpenFlags::default(), vfs),
            Some(_) => Connection::open_with_flags(path, OpenFlags::default()),
        }
        .map_err(|source| StorageError::database(path.to_path_buf(), "open", source))?;
        match key {
            Some(key) => unlock(&conn, path, key)?,
            None => {
                // Before anything is written: a new database is created with room for
                // checksums (one from before them was rewritten above).
                page_checksums::reserve_checksum_bytes(&conn).map_err(|source| {
                    StorageError::database(path.to_path_buf(), "reserve page checksums", source)
                })?;
            }
        }
        let mut store = Store {
            conn,
            path: path.to_path_buf(),
            full_path: full_path(path),
            group: std::cell::Cell::new(Group::None),
            syncing: std::cell::Cell::new(Syncing::Full),
            simulated: vfs == page_checksums::SIMULATED_VFS_NAME,
            loaded: Default::default(),
            held_rows: std::cell::RefCell::new(held_rows::HeldRows::new(held_rows::KEPT_ROWS)),
            key: key.cloned(),
        };
        store.configure(false)?;
        store.migrate()?;
        store.begin_feed_epoch(epoch)?;
        Ok(store)
    }

    /// Opens an existing database for reading only (the view's connections). A plaintext
    /// database's reader sees each commit as it lands; an encrypted one's reads one snapshot
    /// for its life, so that a change of key cannot pass under it: open one per request.
    pub fn open_read_only(path: &Path) -> Result<Store> {
        Store::open_database_read_only(&at_rest::Database::plain(path))
    }

    /// [`Store::open_read_only`] of `database`, with its key when it is encrypted.
    pub(crate) fn open_database_read_only(database: &at_rest::Database) -> Result<Store> {
        match database.keys() {
            None => Store::open_read_only_with(database.path(), None),
            Some(_) => at_rest::open_with_any(database, |key| {
                Store::open_read_only_with(database.path(), Some(key))
            }),
        }
    }

    fn open_read_only_with(path: &Path, key: Option<&Arc<at_rest::DataKey>>) -> Result<Store> {
        check_file_kind(path, key.map(|key| &**key))?;
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = match key {
            None => {
                page_checksums::register();
                Connection::open_with_flags_and_vfs(path, flags, page_checksums::VFS_NAME)
            }
            Some(_) => Connection::open_with_flags(path, flags),
        }
        .map_err(|source| StorageError::database(path.to_path_buf(), "open read-only", source))?;
        if let Some(key) = key {
            // An encrypted database is read as one snapshot for the connection's life, begun
            // before its first read: a change of key ([`Store::rekey`]) that commits while
            // it reads leaves its pages under the key it opened with. (Between two reads
            // outside a transaction the pages could change key under it.) Connections are
            // opened per request, so the snapshot holds the WAL back no longer than one.
            let keyed = at_rest::give_key(&conn, key)
                .and_then(|()| conn.execute_batch("BEGIN"))
                .and_then(|()| at_rest::check_key(&conn));
            keyed.map_err(unlock_error(path))?;
        }
        let store = Store {
            conn,
            path: path.to_path_buf(),
            full_path: full_path(path),
            group: std::cell::Cell::new(Group::None),
            syncing: std::cell::Cell::new(Syncing::Full),
            simulated: false,
            loaded: Default::default(),
            held_rows: std::cell::RefCell::new(held_rows::HeldRows::new(0)),
            key: key.cloned(),
        };
        store.configure(true)?;
        let version = store.schema_version()?;
        let known = migrations::MIGRATIONS.len() as i64;
        if version > known {
            return Err(StorageError::NewerSchema {
                path: path.to_path_buf(),
                found: version,
                known,
            });
        }
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What this process found damaged in this database (a page that failed its checksum,
    /// a file SQLite found malformed), for an operator; `None` while nothing was.
    pub fn damage(&self) -> Option<String> {
        page_checksums::damage_found_at(&self.full_path)
    }

    fn err(&self, action: &'static str) -> impl FnOnce(rusqlite::Error) -> StorageError + '_ {
        move |source| StorageError::database(self.path.clone(), action, source)
    }

    fn configure(&self, read_only: bool) -> Result<()> {
        let pragmas = if read_only {
            "PRAGMA busy_timeout = 5000; PRAGMA query_only = ON;"
        } else {
            // secure_delete: a purged or superseded document's bytes are overwritten, not left
            // in free pages where a copied database file would still give them up.
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
             PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000; PRAGMA secure_delete = ON;"
        };
        self.conn
            .execute_batch(pragmas)
            .map_err(self.err("configure"))?;
        // Query plans that do not depend on bound values: without this, SQLite re-prepared a
        // cached statement whenever a bound value might change its plan (bundled SQLite has
        // STAT4), which cost the sync engine a tenth of its time in the parser.
        self.conn
            .set_db_config(
                rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
                true,
            )
            .map_err(self.err("configure"))?;
        // Room for every statement the store prepares: with rusqlite's default of 16 a sync
        // engine's turn cycled through more than that, so each was evicted before its next
        // use and parsed again, 7% of a hub's CPU under load (BENCHMARKS.md).
        self.conn
            .set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
        Ok(())
    }

    fn schema_version(&self) -> Result<i64> {
        self.conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(self.err("read schema version"))
    }

    fn migrate(&mut self) -> Result<()> {
        let known = migrations::MIGRATIONS.len() as i64;
        let current = self.schema_version()?;
        if current > known {
            return Err(StorageError::NewerSchema {
                path: self.path.clone(),
                found: current,
                known,
            });
        }
        for (index, sql) in migrations::MIGRATIONS
            .iter()
            .enumerate()
            .skip(current as usize)
        {
            let version = index as i64 + 1;
            let path = self.path.clone();
            let fail = |source| StorageError::database(path.clone(), "migrate schema", source);
            let tx = self.conn.transaction().map_err(fail)?;
            tx.execute_batch(sql).map_err(fail)?;
            tx.pragma_update(None, "user_version", version)
                .map_err(fail)?;
            tx.commit().map_err(fail)?;
        }
        Ok(())
    }

    /// Starts a write transaction. Everything written through it lands together or not at all.
    pub fn write(&mut self) -> Result<WriteBatch<'_>> {
        let path = self.path.clone();
        let fail = |source| StorageError::database(path.clone(), "begin write", source);
        self.open_pending_group()?;
        let tx = if self.group.get() == Group::Open {
            BatchTransaction::InGroup(self.conn.savepoint().map_err(fail)?)
        } else {
            BatchTransaction::Own(
                self.conn
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .map_err(fail)?,
            )
        };
        // The write lock is held from here: nothing else commits until the batch ends.
        self.held_rows
            .borrow_mut()
            .forget_if_written_elsewhere(&tx, &self.path)?;
        Ok(WriteBatch {
            tx,
            path,
            loaded: &self.loaded,
            held_rows: &self.held_rows,
            written: std::cell::RefCell::new(Vec::new()),
            feed_tip: std::cell::Cell::new(None),
        })
    }

    /// Starts a group commit: writes until [`Store::end_group`] (write batches as savepoints,
    /// and the status and backfill rows the sync engine writes) become one transaction, made
    /// durable together by one fsync. The sync engine groups what it stores from all its
    /// peers in one turn this way, and sends no acknowledgement until the group has
    /// committed. The transaction (and the write lock) begins at the group's first write, so
    /// a turn that writes nothing costs nothing; from then on it holds the write lock until
    /// the group ends: keep groups short.
    pub fn begin_group(&mut self) {
        assert_eq!(self.group.get(), Group::None, "groups do not nest");
        self.group.set(Group::Pending);
    }

    /// Begins the transaction of a group commit asked for and not yet written to. Every
    /// write goes through here first, so that none lands outside the group.
    pub(crate) fn open_pending_group(&self) -> Result<()> {
        if self.group.get() == Group::Pending {
            // SQLite takes the safety level only outside a transaction: set before, and set
            // back once the group ends, or now if it could not begin.
            let deferred = self.syncing.get() == Syncing::GroupsDeferred;
            if deferred {
                self.conn
                    .execute_batch("PRAGMA synchronous = NORMAL")
                    .map_err(self.err("begin a group commit"))?;
            }
            if let Err(source) = self.conn.execute_batch("BEGIN IMMEDIATE") {
                if deferred {
                    let _ = self.conn.execute_batch("PRAGMA synchronous = FULL");
                }
                return Err(StorageError::database(
                    self.path.clone(),
                    "begin a group commit",
                    source,
                ));
            }
            self.group.set(Group::Open);
        }
        Ok(())
    }

    /// Puts this connection on a simulated disk whose faults make commits fail (the
    /// simulator's disk faults; see [`simulated_disk`]).
    pub fn on_simulated_disk(&mut self, disk: std::sync::Arc<SimulatedDisk>) -> Result<()> {
        self.conn
            .commit_hook(Some(move || disk.commit_fails()))
            .map_err(self.err("attach a simulated disk"))
    }

    /// Whether a group commit is open.
    pub fn in_group(&self) -> bool {
        self.group.get() != Group::None
    }

    /// Commits the open group (see [`Store::begin_group`]); on failure rolls it back, and
    /// nothing written since it began is kept. Says whether anything was committed: with
    /// [`Store::defer_group_syncs`], that commit is durable only once the WAL is synced.
    pub fn end_group(&mut self) -> Result<bool> {
        let group = self.group.replace(Group::None);
        assert_ne!(group, Group::None, "no group to end");
        if group == Group::Pending {
            // Nothing was written.
            return Ok(false);
        }
        let committed = self.conn.execute_batch("COMMIT");
        if committed.is_err() {
            let _ = self.conn.execute_batch("ROLLBACK");
            // Rows kept between the group's batches saw its writes.
            self.held_rows.borrow_mut().forget_all();
        }
        if self.syncing.get() == Syncing::GroupsDeferred {
            // Every other commit waits for the disk, as before the group.
            self.conn
                .execute_batch("PRAGMA synchronous = FULL")
                .map_err(self.err("end a group commit"))?;
        }
        committed.map_err(|source| {
            StorageError::database(self.path.clone(), "commit a group", source)
        })?;
        Ok(true)
    }

    /// From now on a group commit ([`Store::end_group`]) returns once its WAL frames are
    /// written, without waiting for the disk; the caller makes it durable with
    /// [`Store::wal_syncer`] (from another thread if it likes) before it acts on it as
    /// durable. SQLite keeps the database consistent after a power cut in this mode
    /// (`synchronous = NORMAL` in WAL mode), losing only commits not yet synced; a kill -9
    /// loses nothing, since the operating system holds the writes. Commits outside groups
    /// still wait for the disk. A store whose syncs are off ([`Store::without_fsync`])
    /// stays so.
    pub fn defer_group_syncs(&self) {
        if self.syncing.get() == Syncing::Full {
            self.syncing.set(Syncing::GroupsDeferred);
        }
    }

    /// What makes this store's commits durable from any thread (see
    /// [`Store::defer_group_syncs`]).
    pub fn wal_syncer(&self) -> WalSyncer {
        let wal = PathBuf::from(format!("{}-wal", self.full_path));
        let disk = match (self.syncing.get(), self.simulated) {
            (Syncing::Off, _) => WalDisk::NeverSynced,
            (_, true) => WalDisk::Simulated,
            (_, false) => WalDisk::Real,
        };
        WalSyncer { wal, disk }
    }

    pub fn document(&self, id: DocId) -> Result<Option<StoredDocument>> {
        document_by_id(&self.conn, &self.path, id)
    }

    /// What a relay needs of a held document to extend it by its hash chain, and its
    /// partition, without reading its bytes (see [`caremesh_sync::SyncHost::held_index`]).
    pub fn held_index(&self, id: DocId) -> Result<Option<(DocMeta, HeldIndex)>> {
        Ok(self.held_row(id)?.and_then(|row| held_index_of(&row)))
    }

    /// The heads of the copy of `id` held: `None` where nothing is, or its signed heads do
    /// not decode.
    pub fn held_heads(&self, id: DocId) -> Result<Option<Vec<[u8; 32]>>> {
        Ok(self.held_row(id)?.and_then(|row| row.heads.clone()))
    }

    /// What a holder of `have` lacks of the held copy of `id`, told from the changes appended
    /// to it alone (each its own row), without reading the bytes saved whole: what a hub
    /// sends a peer for each new version of a document it relays.
    pub fn changes_after(&self, id: DocId, have: &[[u8; 32]]) -> Result<HeldChanges> {
        let Some(row) = self.held_row(id)? else {
            return Ok(HeldChanges::NotHeld);
        };
        changes_after(&self.conn, &self.path, &row, have)
    }

    /// The row of `id` a relay reads ([`held_rows`]): kept, or read and kept.
    fn held_row(&self, id: DocId) -> Result<Option<std::sync::Arc<held_rows::HeldRow>>> {
        let mut kept = self.held_rows.borrow_mut();
        kept.forget_if_written_elsewhere(&self.conn, &self.path)?;
        if let Some(row) = kept.get(id) {
            return Ok(Some(row));
        }
        drop(kept);
        let Some(row) = held_rows::read(&self.conn, &self.path, id)? else {
            return Ok(None);
        };
        let row = std::sync::Arc::new(row);
        self.held_rows.borrow_mut().keep(id, row.clone());
        Ok(Some(row))
    }

    /// Documents in `seq` order after `after_seq`, at most `limit`: a page of the changes feed.
    pub fn documents_after(&self, after_seq: i64, limit: usize) -> Result<Vec<StoredDocument>> {
        let mut statement = self
            .conn
            .prepare_cached(&format!(
                "SELECT {DOCUMENT_COLUMNS} FROM {DOCUMENTS_WITH_SNAPSHOTS} WHERE d.seq > ?1 \
                 ORDER BY d.seq LIMIT ?2"
            ))
            .map_err(self.err("read documents"))?;
        let rows = statement
            .query_map(params![after_seq, limit as i64], raw_document)
            .map_err(self.err("read documents"))?;
        let mut documents = Vec::new();
        for row in rows {
            let raw = row.map_err(self.err("read documents"))?;
            documents.push(raw.into_document(&self.conn, &self.path)?);
        }
        Ok(documents)
    }

    /// The patient whose record holds `publisher`'s resource `reference` (`Type/id`), if
    /// this node holds it (migration 21's index).
    pub fn patient_of_resource(&self, publisher: &str, reference: &str) -> Result<Option<String>> {
        self.conn
            .prepare_cached("SELECT nhs FROM items WHERE publisher = ?1 AND item_id = ?2 LIMIT 1")
            .and_then(|mut statement| {
                statement
                    .query_row(params![publisher, reference], |row| row.get(0))
                    .optional()
            })
            .map_err(self.err("find a resource's patient"))
    }

    /// When this node stored the version of each of the patient's items it holds (its
    /// document's `updated_at`), by publisher and item id (`Type/id`): the newest per item.
    /// Access records aside, as in [`Store::patient_items`].
    pub fn items_stored_at(&self, nhs: &NhsNumber) -> Result<Vec<(String, String, i64)>> {
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT i.publisher, i.item_id, MAX(d.updated_at) FROM items i \
                 JOIN documents d ON d.doc_id = i.doc_id WHERE i.nhs = ?1 \
                 AND i.section != 'audit' GROUP BY i.publisher, i.item_id",
            )
            .map_err(self.err("read when items were stored"))?;
        let rows = statement
            .query_map([nhs.as_str()], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })
            .map_err(self.err("read when items were stored"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err("read when items were stored"))
    }

    /// Every read-model item about one patient, newest first within each section: the
    /// record and the publishers' sharing records, not access records. Those gain an item at
    /// every view of the patient, so reading them here made each view of a much-viewed
    /// patient slower than the last; they are read by [`Store::received_access_records`].
    pub fn patient_items(&self, nhs: &NhsNumber) -> Result<Vec<StoredItem>> {
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT doc_id, publisher, body FROM items WHERE nhs = ?1 AND section != 'audit' \
                 ORDER BY section, effective DESC, item_id",
            )
            .map_err(self.err("read items"))?;
        let rows = statement
            .query_map([nhs.as_str()], |row| {
                Ok((
                    row.get::<_, Vec<u8>>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                ))
            })
            .map_err(self.err("read items"))?;
        let mut items = Vec::new();
        for row in rows {
            let (doc_id, publisher, body) = row.map_err(self.err("read items"))?;
            let doc_id = doc_id_from(&doc_id, &self.path)?;
            let damaged = |what: String| StorageError::DamagedRow {
                path: self.path.clone(),
                doc: doc_id.to_string(),
                what,
            };
            let publisher = OdsCode::parse(&publisher).map_err(|e| damaged(e.to_string()))?;
            let item: Item = serde_json::from_str(&body).map_err(|e| damaged(e.to_string()))?;
            items.push(StoredItem {
                doc_id,
                publisher,
                item,
            });
        }
        Ok(items)
    }

    /// The key whose signature document `id` carries; `None` when the document is not held
    /// or its signed heads do not read (`caremesh verify` names such a document). It reads
    /// past the document's snapshot: call it for the few documents that need it.
    pub fn document_signer(&self, id: DocId) -> Result<Option<[u8; 32]>> {
        let signed: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT signed FROM documents WHERE doc_id = ?1")
            .and_then(|mut statement| {
                statement
                    .query_row([&id.0[..]], |row| row.get(0))
                    .optional()
            })
            .map_err(self.err("read a document's signature"))?;
        Ok(signed
            .and_then(|bytes| SignedHeads::decode(&bytes))
            .map(|signed| signed.key))
    }

    /// Read-model item ids of one document, for checking the read model against documents.
    pub fn item_bodies(&self, id: DocId) -> Result<Vec<(String, String)>> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT item_id, body FROM items WHERE doc_id = ?1 ORDER BY item_id")
            .map_err(self.err("read items"))?;
        let rows = statement
            .query_map([&id.0[..]], |row| Ok((row.get(0)?, row.get(1)?)))
            .map_err(self.err("read items"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err("read items"))
    }

    /// Consent and care-relationship lookups, for policy decisions.
    pub fn care(&self) -> CareLookup<'_> {
        CareLookup {
            conn: &self.conn,
            path: &self.path,
        }
    }

    pub fn patient_known(&self, nhs: &NhsNumber) -> Result<bool> {
        self.conn
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM documents WHERE nhs = ?1)",
                [nhs.as_str()],
                |row| row.get(0),
            )
            .map_err(self.err("look up patient"))
    }

    pub fn sources(&self) -> Result<Vec<SourceRow>> {
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT publisher, name, kind, source_system, feed, data_as_of, \
                 expected_refresh_hours FROM sources ORDER BY publisher",
            )
            .map_err(self.err("read sources"))?;
        let rows = statement
            .query_map([], row_to_source)
            .map_err(self.err("read sources"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err("read sources"))
    }

    pub fn patient_link(&self, source_key: &str) -> Result<Option<NhsNumber>> {
        patient_link(&self.conn, &self.path, source_key)
    }

    pub fn stats(&self) -> Result<StoreStats> {
        // Every count here reads an index, never the documents' or items' bodies: at a
        // million documents `caremesh status` must still answer in a second.
        let count = |sql: &str| -> Result<i64> {
            self.conn
                .query_row(sql, [], |row| row.get(0))
                .map_err(self.err("count"))
        };
        let mut by_source = self
            .conn
            .prepare(ITEMS_BY_SOURCE_AND_SECTION)
            .map_err(self.err("count items"))?;
        let items_by_source_and_section = by_source
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .map_err(self.err("count items"))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err("count items"))?;
        let summary_only_by_source = self
            .conn
            .prepare(
                "SELECT publisher, count(*) FROM items WHERE summary_only = 1 \
                 GROUP BY publisher ORDER BY publisher",
            )
            .and_then(|mut statement| {
                statement
                    .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(self.err("count summary-only items"))?;
        // SQLCipher answers `page_size` on an encrypted database as text (its
        // `cipher_page_size`); SQLite as an integer.
        let page_size: i64 = self
            .conn
            .query_row("PRAGMA page_size", [], |row| {
                Ok(match row.get::<_, rusqlite::types::Value>(0)? {
                    rusqlite::types::Value::Integer(size) => size,
                    rusqlite::types::Value::Text(size) => size.parse().unwrap_or(0),
                    _ => 0,
                })
            })
            .map_err(self.err("read the page size"))?;
        let page_bytes = count("PRAGMA page_count")? * page_size;
        let wal_bytes = std::fs::metadata(wal_path(&self.path))
            .map(|m| m.len())
            .unwrap_or(0);
        Ok(StoreStats {
            patients: count("SELECT COUNT(DISTINCT nhs) FROM documents")?,
            documents: count("SELECT COUNT(*) FROM documents")?,
            items: count("SELECT COUNT(*) FROM items")?,
            items_by_source_and_section,
            summary_only_by_source,
            database_bytes: page_bytes as u64 + wal_bytes,
            last_ingest: self.last_ingest()?,
        })
    }

    pub fn last_ingest(&self) -> Result<Option<IngestRow>> {
        self.conn
            .query_row(
                "SELECT at, file, outcome, summary, kept_as FROM ingests ORDER BY id DESC LIMIT 1",
                [],
                |row| {
                    let summary: String = row.get(3)?;
                    Ok(IngestRow {
                        at: row.get(0)?,
                        file: row.get(1)?,
                        outcome: row.get(2)?,
                        summary: serde_json::from_str(&summary)
                            .unwrap_or(serde_json::Value::String(summary)),
                        kept_as: row.get(4)?,
                    })
                },
            )
            .optional()
            .map_err(self.err("read last ingest"))
    }

    /// Files ingested so far, by outcome (accepted, partly rejected, rejected).
    pub fn ingest_counts(&self) -> Result<Vec<(String, i64)>> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT outcome, count(*) FROM ingests GROUP BY outcome")
            .map_err(self.err("count ingests"))?;
        statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .and_then(|rows| rows.collect())
            .map_err(self.err("count ingests"))
    }

    /// Every file the ingest log names: the path it was read from, and where it was kept.
    /// Where the ingest log kept files under processed/ by ingests at or before `at_or_before` (unix
    /// seconds), as it names them (`processed/NAME`).
    pub fn kept_in_processed_at_or_before(&self, at_or_before: i64) -> Result<Vec<String>> {
        let mut statement = self
            .conn
            .prepare("SELECT kept_as FROM ingests WHERE kept_as LIKE 'processed/%' AND at <= ?1")
            .map_err(self.err("read the ingest log"))?;
        statement
            .query_map([at_or_before], |row| row.get(0))
            .and_then(|rows| rows.collect())
            .map_err(self.err("read the ingest log"))
    }

    pub fn ingested_files(&self) -> Result<Vec<(String, Option<String>)>> {
        let mut statement = self
            .conn
            .prepare("SELECT file, kept_as FROM ingests")
            .map_err(self.err("read the ingest log"))?;
        statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .and_then(|rows| rows.collect())
            .map_err(self.err("read the ingest log"))
    }

    /// Stops waiting for the disk on commit (`synchronous = OFF`). For simulations only: a
    /// killed process still loses nothing committed (the operating system holds the writes),
    /// but a power cut could. The simulator crashes processes, not machines, and would
    /// otherwise spend its time in fsync.
    pub fn without_fsync(&self) -> Result<()> {
        self.conn
            .execute_batch("PRAGMA synchronous = OFF;")
            .map_err(self.err("configure"))?;
        self.syncing.set(Syncing::Off);
        Ok(())
    }

    /// Lets this connection cache up to `mib` MiB of database pages (SQLite's default is
    /// 2 MiB). The sync engine's connection answers every policy look-up of a hub's peers;
    /// with the default, most of those went to the file.
    pub fn set_cache_mib(&self, mib: u32) -> Result<()> {
        self.conn
            .execute_batch(&format!("PRAGMA cache_size = -{};", u64::from(mib) * 1024))
            .map_err(self.err("configure"))
    }

    /// What SQLite's integrity check finds wrong (up to 100 lines), and pages that failed
    /// their checksum on the way (the check reads every page): empty when the file is sound.
    pub fn integrity_problems(&self) -> Result<Vec<String>> {
        let checked = self
            .conn
            .prepare("PRAGMA integrity_check(100)")
            .and_then(|mut statement| {
                statement
                    .query_map([], |row| row.get::<_, String>(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(self.err("check integrity"));
        match checked {
            Ok(lines) => {
                let mut problems: Vec<String> =
                    lines.into_iter().filter(|line| line != "ok").collect();
                // SQLite reports a page it could not read only by its error code: what the
                // page checksums found says what that means first.
                if let Some(damage) = self.damage().filter(|_| !problems.is_empty()) {
                    problems.insert(0, damage);
                }
                Ok(problems)
            }
            Err(error) if error.is_damage() => {
                Ok(vec![self.damage().unwrap_or_else(|| error.to_string())])
            }
            Err(error) => Err(error),
        }
    }

    /// Writes the WAL back into the main file and empties it; used before measuring or
    /// copying the file, and after a purge so that no purged page survives in the WAL.
    /// Returns `false` when a reader held an older snapshot and the WAL could not be emptied
    /// yet (try again later).
    pub fn checkpoint(&self) -> Result<bool> {
        let busy: i64 = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| row.get(0))
            .map_err(self.err("checkpoint"))?;
        Ok(busy == 0)
    }
}

fn wal_path(path: &Path) -> PathBuf {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    PathBuf::from(wal)
}

/// A document's row joined to its saved bytes, as `d` and `s`, for [`DOCUMENT_COLUMNS`].
/// A row whose saved bytes are missing (damage) is read with none, so that it loads as
/// damaged (`caremesh verify` names it) rather than vanishing from every read.
const DOCUMENTS_WITH_SNAPSHOTS: &str =
    "documents d LEFT JOIN document_snapshots s ON s.doc_id = d.doc_id";
/// The columns [`raw_document`] reads, from [`DOCUMENTS_WITH_SNAPSHOTS`].
const DOCUMENT_COLUMNS: &str = "d.doc_id, d.publisher, d.nhs, d.section, d.class, \
     COALESCE(s.snapshot, x''), d.signed, d.seq, d.updated_at, d.appended_base";

/// Whether a node of `kind` keeps the items of `section` in its read model. A hub serves no
/// clinician a record: it keeps only what its own work reads (sharing records for its
/// sharing decisions, access records for audit reports) and holds the rest as the signed
/// documents it relays, which recipients read items from. Items cost a hub a JSON body and
/// an indexed row for every item of every version it relays.
pub fn read_model_keeps(kind: caremesh_sync::OrgKind, section: Section) -> bool {
    kind != caremesh_sync::OrgKind::Hub || matches!(section, Section::Sharing | Section::Audit)
}

/// Items held per source and section, for `caremesh status` and /status.
const ITEMS_BY_SOURCE_AND_SECTION: &str = "SELECT publisher, section, COUNT(*) FROM items \
     GROUP BY publisher, section ORDER BY publisher, section";
/// A publisher's sharing record item about a patient: read for every policy decision.
const SHARING_RECORD_OF_PATIENT: &str = "SELECT body FROM items WHERE publisher = ?1 \
     AND nhs = ?2 AND section = 'sharing' ORDER BY item_id LIMIT 1";
/// A publisher's clinical items about a patient counted per section, for its sharing record.
const ITEM_COUNTS_OF_PATIENT: &str = "SELECT section, count(*) FROM items WHERE publisher = ?1 \
     AND nhs = ?2 AND section NOT IN ('sharing', 'audit', 'demographics') GROUP BY section";

struct RawDocument {
    doc_id: Vec<u8>,
    publisher: String,
    nhs: String,
    section: String,
    class: String,
    snapshot: Vec<u8>,
    signed: Vec<u8>,
    seq: i64,
    updated_at: i64,
    appended_base: Option<Vec<u8>>,
}

fn raw_document(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawDocument> {
    Ok(RawDocument {
        doc_id: row.get(0)?,
        publisher: row.get(1)?,
        nhs: row.get(2)?,
        section: row.get(3)?,
        class: row.get(4)?,
        snapshot: row.get(5)?,
        signed: row.get(6)?,
        seq: row.get(7)?,
        updated_at: row.get(8)?,
        appended_base: row.get(9)?,
    })
}

impl RawDocument {
    /// The document, with the changes a relay appended to it read from their rows.
    fn into_document(self, conn: &Connection, path: &Path) -> Result<StoredDocument> {
        let id = doc_id_from(&self.doc_id, path)?;
        let meta = meta_from(
            [&self.publisher, &self.nhs, &self.section, &self.class],
            id,
            path,
        )?;
        let mut snapshot = self.snapshot;
        let appended = match self.appended_base {
            Some(base_heads) => {
                let base_len = snapshot.len() as u64;
                appended_changes(conn, path, id, &base_heads, base_len, Some(&mut snapshot))?.0
            }
            None => None,
        };
        Ok(StoredDocument {
            id,
            meta,
            snapshot,
            appended,
            signed: self.signed,
            seq: self.seq,
            updated_at: self.updated_at,
        })
    }
}

/// A document's partition from its columns: publisher, NHS number, section and class.
fn meta_from(columns: [&str; 4], id: DocId, path: &Path) -> Result<DocMeta> {
    let damaged = |what: String| StorageError::DamagedRow {
        path: path.to_path_buf(),
        doc: id.to_string(),
        what,
    };
    let [publisher, nhs, section, class] = columns;
    Ok(DocMeta {
        publisher: publisher.parse().map_err(|e| damaged(format!("{e}")))?,
        patient: nhs.parse().map_err(|e| damaged(format!("{e}")))?,
        section: section
            .parse::<Section>()
            .map_err(|e| damaged(format!("{e}")))?,
        class: class
            .parse::<DataClass>()
            .map_err(|e| damaged(format!("{e}")))?,
    })
}

/// What a relay needs of a held document without its bytes ([`HeldIndex`]), with its
/// partition, from its row: `None` when its signed heads do not decode.
fn held_index_of(row: &held_rows::HeldRow) -> Option<(DocMeta, HeldIndex)> {
    let index = HeldIndex {
        heads: row.heads.clone()?,
        stored_len: row.base_len + row.appended_len,
        appended: row.appended.clone(),
        register: None,
    }
    .with_register(row.register.as_deref().and_then(ItemRegister::decode));
    Some((row.meta.clone(), index))
}

fn doc_id_from(bytes: &[u8], path: &Path) -> Result<DocId> {
    let id: [u8; 16] = bytes.try_into().map_err(|_| StorageError::DamagedRow {
        path: path.to_path_buf(),
        doc: format!("{bytes:02x?}"),
        what: "document id is not 16 bytes".into(),
    })?;
    Ok(DocId(id))
}

fn document_by_id(conn: &Connection, path: &Path, id: DocId) -> Result<Option<StoredDocument>> {
    let raw = conn
        .prepare_cached(&format!(
            "SELECT {DOCUMENT_COLUMNS} FROM {DOCUMENTS_WITH_SNAPSHOTS} WHERE d.doc_id = ?1"
        ))
        .and_then(|mut statement| statement.query_row([&id.0[..]], raw_document).optional())
        .map_err(|source| StorageError::database(path.to_path_buf(), "read document", source))?;
    raw.map(|raw| raw.into_document(conn, path)).transpose()
}

/// A document row's partition (publisher, nhs, section, class), its first four columns.
fn partition_columns(row: &rusqlite::Row) -> rusqlite::Result<[String; 4]> {
    Ok([row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?])
}

/// [`Store::changes_after`], for the held copy whose row is `row`: only the changes the
/// holder lacks are read.
fn changes_after(
    conn: &Connection,
    path: &Path,
    row: &held_rows::HeldRow,
    have: &[[u8; 32]],
) -> Result<HeldChanges> {
    let Some(heads) = row.heads.clone().map(sorted) else {
        return Ok(HeldChanges::Unknown);
    };
    let lacking = |changes| {
        HeldChanges::Lacking(ChangesToSend {
            meta: row.meta.clone(),
            signed: row.signed.clone(),
            changes,
        })
    };
    let mut have_sorted = have.to_vec();
    have_sorted.sort_unstable();
    have_sorted.dedup();
    if have_sorted == heads {
        return Ok(lacking(Vec::new()));
    }
    // Saved whole, or a damaged index: only the document can tell.
    let Some(index) = row.appended_base.as_ref().and(row.appended.as_ref()) else {
        return Ok(HeldChanges::Unknown);
    };
    let Some(positions) = relay::lacking_positions(index, have) else {
        return Ok(HeldChanges::Unknown);
    };
    let mut statement = conn
        .prepare_cached("SELECT bytes FROM appended_changes WHERE doc_id = ?1 AND position = ?2")
        .map_err(|source| {
            StorageError::database(path.to_path_buf(), "read appended changes", source)
        })?;
    let id = row.meta.id();
    let mut changes = Vec::with_capacity(positions.len());
    for position in positions {
        let bytes: Option<Vec<u8>> = statement
            .query_row(params![&id.0[..], position as i64], |row| row.get(0))
            .optional()
            .map_err(|source| {
                StorageError::database(path.to_path_buf(), "read appended changes", source)
            })?;
        match bytes {
            Some(bytes) if bytes.len() as u64 == index.changes[position].len => changes.push(bytes),
            // Not what the index says: the whole document decides.
            _ => return Ok(HeldChanges::Unknown),
        }
    }
    Ok(lacking(changes))
}

/// The index of the changes a relay appended to a document since its base (`base_len`
/// bytes, at `base_heads`) was saved, and how many bytes they are; with `snapshot` (the
/// base's bytes), the changes are appended to it in order. The index is `None` where a
/// stored hash is not 32 bytes: a damaged index is never trusted
/// ([`caremesh_sync::relay::known`] would believe it), and the bytes still load as the
/// whole document.
fn appended_changes(
    conn: &Connection,
    path: &Path,
    id: DocId,
    base_heads: &[u8],
    base_len: u64,
    mut snapshot: Option<&mut Vec<u8>>,
) -> Result<(Option<AppendedChanges>, u64)> {
    let err = |source| StorageError::database(path.to_path_buf(), "read appended changes", source);
    let base_heads = hashes(base_heads);
    let mut intact = base_heads.is_some();
    let mut index = AppendedChanges {
        base_heads: base_heads.unwrap_or_default(),
        base_len,
        changes: Vec::new(),
    };
    let mut appended_len = 0;
    let mut statement = conn
        .prepare_cached(if snapshot.is_some() {
            "SELECT hash, deps, bytes FROM appended_changes WHERE doc_id = ?1 ORDER BY position"
        } else {
            "SELECT hash, deps, length(bytes) FROM appended_changes WHERE doc_id = ?1 \
             ORDER BY position"
        })
        .map_err(err)?;
    let mut rows = statement.query([&id.0[..]]).map_err(err)?;
    while let Some(row) = rows.next().map_err(err)? {
        let hash: Vec<u8> = row.get(0).map_err(err)?;
        let deps: Vec<u8> = row.get(1).map_err(err)?;
        let len = match snapshot.as_deref_mut() {
            Some(snapshot) => {
                let bytes = row.get_ref(2).and_then(|v| Ok(v.as_blob()?)).map_err(err)?;
                snapshot.extend_from_slice(bytes);
                bytes.len() as u64
            }
            None => row.get::<_, i64>(2).map_err(err)? as u64,
        };
        appended_len += len;
        match (<[u8; 32]>::try_from(&hash[..]), hashes(&deps)) {
            (Ok(hash), Some(deps)) => index.changes.push(AppendedChange { hash, deps, len }),
            _ => intact = false,
        }
    }
    Ok((intact.then_some(index), appended_len))
}

fn sorted(mut heads: Vec<[u8; 32]>) -> Vec<[u8; 32]> {
    heads.sort_unstable();
    heads
}

/// `bytes` as 32-byte hashes, if that is what they are.
fn hashes(bytes: &[u8]) -> Option<Vec<[u8; 32]>> {
    bytes.len().is_multiple_of(32).then(|| {
        bytes
            .chunks_exact(32)
            .map(|hash| hash.try_into().expect("chunks of 32"))
            .collect()
    })
}

fn patient_link(conn: &Connection, path: &Path, source_key: &str) -> Result<Option<NhsNumber>> {
    let nhs: Option<String> = conn
        .prepare_cached("SELECT nhs FROM patient_links WHERE source_key = ?1")
        .and_then(|mut statement| {
            statement
                .query_row([source_key], |row| row.get(0))
                .optional()
        })
        .map_err(|source| {
            StorageError::database(path.to_path_buf(), "read patient link", source)
        })?;
    nhs.map(|nhs| {
        nhs.parse().map_err(|e| StorageError::DamagedRow {
            path: path.to_path_buf(),
            doc: format!("patient link {source_key}"),
            what: format!("{e}"),
        })
    })
    .transpose()
}

/// One write transaction. Dropping it without [`WriteBatch::commit`] rolls everything back.
pub struct WriteBatch<'a> {
    tx: BatchTransaction<'a>,
    path: PathBuf,
    /// The store's own documents kept loaded, which this batch's writes use and refresh.
    loaded: &'a std::cell::RefCell<own_versions::LoadedOwnDocuments>,
    /// The store's kept rows of held documents, which this batch's writes forget.
    held_rows: &'a std::cell::RefCell<held_rows::HeldRows>,
    /// The rows this batch wrote, as it wrote them, oldest first: read first by the batch
    /// itself, and kept once it commits ([`held_rows`]).
    written: std::cell::RefCell<Vec<(DocId, std::sync::Arc<held_rows::HeldRow>)>>,
    /// The last feed position this batch handed out, once it has handed one out: the next is
    /// counted from it and written with a plain UPDATE. Nothing else in a batch moves the
    /// tip, and a batch that rolls back takes its tip with it.
    feed_tip: std::cell::Cell<Option<i64>>,
}

/// What storing a document version does to its read-model rows.
#[derive(Clone, Copy)]
enum Rows<'a> {
    /// Replaced by these items' rows (none where the node keeps no read model of them).
    Replaced(&'a [Item]),
    /// Left as they are: the caller amends them by what the version changed.
    Kept,
}

/// A write batch is a transaction of its own, or a savepoint inside the store's open group
/// (see [`Store::begin_group`]): it commits or rolls back alone either way, but only the
/// group's commit makes it durable.
enum BatchTransaction<'a> {
    Own(rusqlite::Transaction<'a>),
    InGroup(rusqlite::Savepoint<'a>),
}

impl std::ops::Deref for BatchTransaction<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        match self {
            BatchTransaction::Own(tx) => tx,
            BatchTransaction::InGroup(savepoint) => savepoint,
        }
    }
}

impl WriteBatch<'_> {
    fn err(&self, action: &'static str) -> impl FnOnce(rusqlite::Error) -> StorageError + '_ {
        move |source| StorageError::database(self.path.clone(), action, source)
    }

    pub fn document(&self, id: DocId) -> Result<Option<StoredDocument>> {
        document_by_id(&self.tx, &self.path, id)
    }

    /// As [`Store::held_index`], seeing this batch's own writes.
    pub fn held_index(&self, id: DocId) -> Result<Option<(DocMeta, HeldIndex)>> {
        Ok(self.held_row(id)?.and_then(|row| held_index_of(&row)))
    }

    /// The row of `id` a relay reads ([`held_rows`]): as this batch wrote it, kept, or read
    /// from this batch's transaction and not kept, since the batch may yet roll back what it
    /// read.
    fn held_row(&self, id: DocId) -> Result<Option<std::sync::Arc<held_rows::HeldRow>>> {
        if let Some((_, row)) = self
            .written
            .borrow()
            .iter()
            .find(|(written, _)| *written == id)
        {
            return Ok(Some(row.clone()));
        }
        if let Some(row) = self.held_rows.borrow_mut().get(id) {
            return Ok(Some(row));
        }
        Ok(held_rows::read(&self.tx, &self.path, id)?.map(std::sync::Arc::new))
    }

    /// Stores a document version saved whole and replaces its read-model rows with `items`
    /// (none where the node keeps no read model of its section: [`read_model_keeps`]),
    /// taking the next feed position. The caller has verified `signed` against the trust
    /// registry and checked that `snapshot` has exactly the signed heads. `built_on` names
    /// the heads of the copy the version was made from (`None` where none was held).
    ///
    /// A session checks a version when it arrives and stores it when its batch completes;
    /// another session (the publisher directly, a second hub) may store a version of the same
    /// document in between. Where the held copy is no longer the one the version was made
    /// from, the version is stored only if it has every change of what is held now; a held
    /// copy that has the version already (or went another way) is kept, so an older version,
    /// and an older sharing record's consent with it, never replaces a newer one.
    ///
    /// Returns the version's feed position, or `None` where the held copy was kept.
    pub fn put_document(
        &self,
        signed: &SignedHeads,
        snapshot: &[u8],
        built_on: Option<&[[u8; 32]]>,
        items: &[Item],
        register: Option<&ItemRegister>,
        updated_at: i64,
    ) -> Result<Option<i64>> {
        self.put_document_with(
            signed,
            snapshot,
            built_on,
            Rows::Replaced(items),
            register,
            updated_at,
        )
    }

    /// [`WriteBatch::put_document`], with what becomes of the document's read-model rows.
    fn put_document_with(
        &self,
        signed: &SignedHeads,
        snapshot: &[u8],
        built_on: Option<&[[u8; 32]]>,
        rows: Rows<'_>,
        register: Option<&ItemRegister>,
        updated_at: i64,
    ) -> Result<Option<i64>> {
        let id = signed.meta.id();
        let held = self
            .held_signed_heads(id)?
            .map(|signed| signed.map(|signed| signed.heads));
        let built_on_what_is_held = match (&held, built_on) {
            (None, None) => true,
            (Some(Some(held)), Some(built_on)) => sorted(held.clone()) == sorted(built_on.to_vec()),
            _ => false,
        };
        if !built_on_what_is_held
            && !Self::has_every_change_of(signed, snapshot, held.flatten().as_deref())
        {
            tracing::debug!(doc = %id, "kept a held copy that moved past a verified version");
            return Ok(None);
        }
        self.put_version(signed, snapshot, None, rows, register, updated_at)
            .map(Some)
    }

    /// The signed heads of the copy of `id` held: `None` where nothing is, `Some(None)` where
    /// the stored signed heads do not decode.
    pub fn held_signed_heads(&self, id: DocId) -> Result<Option<Option<SignedHeads>>> {
        Ok(self
            .held_row(id)?
            .map(|row| SignedHeads::decode(&row.signed)))
    }

    /// Whether the version `snapshot` (at `signed`'s heads) has every change of the held
    /// copy's `held` heads and is not that copy: then it is newer. A held copy whose signed
    /// heads do not decode is replaced.
    fn has_every_change_of(
        signed: &SignedHeads,
        snapshot: &[u8],
        held: Option<&[[u8; 32]]>,
    ) -> bool {
        let Some(held) = held else {
            return true;
        };
        if sorted(held.to_vec()) == sorted(signed.heads.clone()) {
            return false;
        }
        PublishedDocument::load(&signed.meta, snapshot)
            .is_ok_and(|version| version.contains_all(held))
    }

    /// Stores a version a relay authenticated by its hash chain
    /// ([`caremesh_sync::relay::extend`]): the received changes appended to the held copy.
    /// The caller has verified `signed` and checked that the extension gives exactly the
    /// signed heads. A relay keeps no items of such a document (`items` is `None`: its
    /// read-model rows are left as they are); a node that reads them read them from the
    /// changes and the held copy's register ([`caremesh_sync::register`]), and `items` are
    /// then the version's read-model rows and `register` its new register.
    ///
    /// Where the held copy is still the one the extension was made from, only the new
    /// changes are written, each a row of its own, and the document's row is updated in
    /// place (the same size after the first append, so SQLite rewrites only the pages that
    /// changed): a version costs its changes, not the document. Where it moved on since
    /// (another session stored a version), the changes are appended to what is held if they
    /// extend it to the signed heads, or loaded with it and saved whole if only that can
    /// tell; a held copy that has the version already is kept as it is.
    ///
    /// Returns the version's feed position, or `None` where the held copy was kept.
    pub fn put_appended(
        &self,
        signed: &SignedHeads,
        extension: &Extension,
        items: Option<&[Item]>,
        register: Option<&ItemRegister>,
        updated_at: i64,
    ) -> Result<Option<i64>> {
        let rows = items.map_or(Rows::Kept, Rows::Replaced);
        let index = &extension.appended;
        assert!(
            extension.already_held <= index.changes.len(),
            "an extension holds at most its index's changes"
        );
        let new_len: u64 = index.changes[extension.already_held..]
            .iter()
            .map(|change| change.len)
            .sum();
        assert_eq!(
            new_len,
            extension.new_bytes.len() as u64,
            "the index's new changes must describe the bytes appended"
        );
        let id = signed.meta.id();
        if let Some(held) = self.held_as_extended(id, extension)? {
            return self
                .append_changes(&held, signed, extension, rows, register, updated_at)
                .map(Some);
        }
        self.append_to_what_is_held(signed, extension, rows, register, updated_at)
    }

    /// The stored document's row where it is exactly the copy `extension` extended: its
    /// saved base (the same length and base heads, or the signed heads where it was saved
    /// whole) followed by exactly the changes the extension counts as held.
    fn held_as_extended(
        &self,
        id: DocId,
        extension: &Extension,
    ) -> Result<Option<std::sync::Arc<held_rows::HeldRow>>> {
        let index = &extension.appended;
        let Some(held) = self.held_row(id)? else {
            return Ok(None);
        };
        if held.base_len != index.base_len {
            return Ok(None);
        }
        let held_changes = match &held.appended_base {
            Some(held_base) if *held_base == index.base_heads.concat() => match &held.appended {
                Some(appended) => &appended.changes[..],
                // A damaged index is never trusted.
                None => return Ok(None),
            },
            Some(_) => return Ok(None),
            // Saved whole: the extension's base is the whole copy, at its signed heads.
            None if held
                .heads
                .clone()
                .is_some_and(|heads| sorted(heads) == sorted(index.base_heads.clone())) =>
            {
                &[]
            }
            None => return Ok(None),
        };
        let extended = held_changes.len() == extension.already_held
            && held_changes
                .iter()
                .zip(&index.changes)
                .all(|(held, change)| held.hash == change.hash);
        Ok(extended.then_some(held))
    }

    /// Forgets what is kept, and what this batch noted, of `id`'s row: it is being written.
    fn forget_row(&self, id: DocId) {
        self.held_rows.borrow_mut().forget(id);
        self.written
            .borrow_mut()
            .retain(|(written, _)| *written != id);
    }

    /// Notes `row` as what this batch wrote of `id`: read by the batch from now on, and kept
    /// once the batch commits.
    fn note_written(&self, id: DocId, row: held_rows::HeldRow) {
        debug_assert_eq!(row.meta.id(), id, "a row is noted under its own document");
        let mut written = self.written.borrow_mut();
        written.retain(|(written, _)| *written != id);
        written.push((id, std::sync::Arc::new(row)));
    }

    /// Writes the extension's new changes after the held ones and moves the document's row to
    /// the new version, its read-model rows as `rows` says and its register to `register`.
    /// The caller checked that `held`, the held copy's row, is the one extended.
    fn append_changes(
        &self,
        held: &held_rows::HeldRow,
        signed: &SignedHeads,
        extension: &Extension,
        rows: Rows<'_>,
        register: Option<&ItemRegister>,
        updated_at: i64,
    ) -> Result<i64> {
        let id = signed.meta.id();
        self.forget_row(id);
        let signed_encoded = signed.encode();
        let register_encoded = register.map(ItemRegister::encode);
        let appended_base = extension.appended.base_heads.concat();
        let seq = self.next_feed_position()?;
        self.tx
            .prepare_cached(
                "UPDATE documents SET signed = ?2, seq = ?3, updated_at = ?4, \
                 appended_base = ?5, item_register = ?6 WHERE doc_id = ?1",
            )
            .and_then(|mut statement| {
                statement.execute(params![
                    &id.0[..],
                    &signed_encoded,
                    seq,
                    updated_at,
                    &appended_base,
                    &register_encoded
                ])
            })
            .map_err(self.err("store document"))?;
        let mut insert = self
            .tx
            .prepare_cached(
                "INSERT INTO appended_changes (doc_id, position, hash, deps, bytes) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .map_err(self.err("store appended change"))?;
        let mut start = 0;
        let changes = extension.appended.changes.iter().enumerate();
        for (position, change) in changes.skip(extension.already_held) {
            let end = start + usize::try_from(change.len).expect("fits the new bytes");
            insert
                .execute(params![
                    &id.0[..],
                    position as i64,
                    &change.hash[..],
                    change.deps.concat(),
                    &extension.new_bytes[start..end]
                ])
                .map_err(self.err("store appended change"))?;
            start = end;
        }
        drop(insert);
        if let Rows::Replaced(items) = rows {
            self.replace_item_rows(&signed.meta, items, seq)?;
        }
        // The changes held were checked to be the extension's first; the rest were written.
        let held_changes = held.appended.as_ref().map_or(&[][..], |a| &a.changes[..]);
        debug_assert_eq!(held_changes.len(), extension.already_held);
        let changes = held_changes
            .iter()
            .chain(&extension.appended.changes[extension.already_held..])
            .cloned()
            .collect();
        self.note_written(
            id,
            held_rows::HeldRow::as_written(
                held.meta.clone(),
                signed_encoded,
                held.base_len,
                Some(appended_base),
                changes,
                register_encoded,
            ),
        );
        Ok(seq)
    }

    /// [`WriteBatch::put_appended`] where the held copy moved on since it was extended.
    fn append_to_what_is_held(
        &self,
        signed: &SignedHeads,
        extension: &Extension,
        rows: Rows<'_>,
        register: Option<&ItemRegister>,
        updated_at: i64,
    ) -> Result<Option<i64>> {
        let id = signed.meta.id();
        let Some(held) = self.document(id)? else {
            // Purged since (a withdrawal): there is nothing to append to.
            return Ok(None);
        };
        let changes = extension.new_changes();
        if let Some(index) = held.index() {
            if relay::known(index.appended.as_ref(), &index.heads, &signed.heads) {
                return Ok(None);
            }
            if let Ok(again) = relay::extend(&index, &changes)
                && again.heads == sorted(signed.heads.clone())
                && let Some(held) = self.held_as_extended(id, &again)?
            {
                return self
                    .append_changes(&held, signed, &again, rows, register, updated_at)
                    .map(Some);
            }
        }
        // Only the history can tell: what is held and the changes, loaded together.
        let mut bytes = held.snapshot;
        bytes.extend_from_slice(&extension.new_bytes);
        let Ok(document) = PublishedDocument::load(&signed.meta, &bytes) else {
            return Ok(None);
        };
        if sorted(document.heads()) != sorted(signed.heads.clone()) {
            // The held copy has the version and more (or is not the signed history): kept.
            tracing::debug!(doc = %id, "kept a held copy that moved past a relayed version");
            return Ok(None);
        }
        // The same signed heads are the same history: the items and register read from the
        // changes are this version's.
        let rows = match rows {
            Rows::Kept => Rows::Replaced(&[]),
            replaced => replaced,
        };
        self.put_version(signed, &document.save(), None, rows, register, updated_at)
            .map(Some)
    }

    /// The next position in this node's feed. From the counter, never MAX(seq) + 1: a purge of
    /// the newest documents must not hand their positions out again, or a peer past them would
    /// never be offered what took them.
    ///
    /// Not `UPDATE … RETURNING`: SQLite runs that into a temporary table it allocates and
    /// frees on every call (a share of the allocator's 5% of a hub's CPU under load).
    fn next_feed_position(&self) -> Result<i64> {
        let tip = match self.feed_tip.get() {
            Some(tip) => tip,
            None => self
                .tx
                .prepare_cached("SELECT tip FROM feed_tip")
                .and_then(|mut statement| statement.query_row([], |row| row.get(0)))
                .map_err(self.err("allocate feed position"))?,
        };
        let next = tip + 1;
        self.tx
            .prepare_cached("UPDATE feed_tip SET tip = ?1")
            .and_then(|mut statement| statement.execute([next]))
            .map_err(self.err("allocate feed position"))?;
        self.feed_tip.set(Some(next));
        Ok(next)
    }

    /// Stores a document's row whole: `snapshot` as saved, and `appended_base` the heads of
    /// the saved document that appended changes will follow (`None` when saved whole). Its
    /// appended changes are replaced by none, and its read-model rows as `rows` says.
    fn put_version(
        &self,
        signed: &SignedHeads,
        snapshot: &[u8],
        appended_base: Option<&[u8]>,
        rows: Rows<'_>,
        register: Option<&ItemRegister>,
        updated_at: i64,
    ) -> Result<i64> {
        let meta = &signed.meta;
        let id = meta.id();
        self.forget_row(id);
        let signed_encoded = signed.encode();
        let register_encoded = register.map(ItemRegister::encode);
        let seq = self.next_feed_position()?;
        self.tx
            .prepare_cached(
                "INSERT INTO documents (doc_id, publisher, nhs, section, class, signed, seq, updated_at, appended_base, item_register) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
                 ON CONFLICT(doc_id) DO UPDATE SET \
                 signed = excluded.signed, seq = excluded.seq, updated_at = excluded.updated_at, \
                 appended_base = excluded.appended_base, item_register = excluded.item_register",
            )
            .and_then(|mut statement| {
                statement.execute(params![
                    &id.0[..],
                    meta.publisher.as_str(),
                    meta.patient.as_str(),
                    meta.section.as_str(),
                    meta.class.as_str(),
                    &signed_encoded,
                    seq,
                    updated_at,
                    appended_base,
                    &register_encoded
                ])
            })
            .map_err(self.err("store document"))?;
        self.tx
            .prepare_cached(
                "INSERT INTO document_snapshots (doc_id, snapshot) VALUES (?1, ?2) \
                 ON CONFLICT(doc_id) DO UPDATE SET snapshot = excluded.snapshot",
            )
            .and_then(|mut statement| statement.execute(params![&id.0[..], snapshot]))
            .map_err(self.err("store document"))?;
        self.tx
            .prepare_cached("DELETE FROM appended_changes WHERE doc_id = ?1")
            .and_then(|mut statement| statement.execute([&id.0[..]]))
            .map_err(self.err("replace appended changes"))?;
        if let Rows::Replaced(items) = rows {
            self.replace_item_rows(meta, items, seq)?;
        }
        self.note_written(
            id,
            held_rows::HeldRow::as_written(
                meta.clone(),
                signed_encoded,
                snapshot.len() as u64,
                appended_base.map(<[u8]>::to_vec),
                Vec::new(),
                register_encoded,
            ),
        );
        Ok(seq)
    }

    /// Makes the read-model rows of the document `meta` exactly `items`, as of its version at
    /// feed position `seq`: rows of items no longer held are deleted, the rest written.
    fn replace_item_rows(&self, meta: &DocMeta, items: &[Item], seq: i64) -> Result<()> {
        let id = meta.id();
        let held: Vec<String> = self
            .tx
            .prepare_cached("SELECT item_id FROM items WHERE doc_id = ?1")
            .and_then(|mut statement| {
                statement
                    .query_map([&id.0[..]], |row| row.get(0))?
                    .collect::<rusqlite::Result<Vec<String>>>()
            })
            .map_err(self.err("replace read model"))?;
        let kept: std::collections::HashSet<&str> = items.iter().map(|i| i.id.as_str()).collect();
        let gone: Vec<String> = held
            .into_iter()
            .filter(|item_id| !kept.contains(item_id.as_str()))
            .collect();
        self.delete_item_rows(meta, &gone)?;
        self.write_item_rows(meta, items, seq)
    }

    /// Deletes the read-model rows of the items `item_ids` of the document `meta`.
    fn delete_item_rows(&self, meta: &DocMeta, item_ids: &[String]) -> Result<()> {
        let id = meta.id();
        let mut delete = self
            .tx
            .prepare_cached("DELETE FROM items WHERE doc_id = ?1 AND item_id = ?2")
            .map_err(self.err("update read model"))?;
        for item_id in item_ids {
            delete
                .execute(params![&id.0[..], item_id])
                .map_err(self.err("update read model"))?;
        }
        Ok(())
    }

    /// Writes the read-model rows of `items` of the document `meta`, replacing rows of the
    /// same items, as of its version at feed position `seq`: a row whose body differs from
    /// the one held (or that is new) records `seq` as the version that changed it.
    fn write_item_rows(&self, meta: &DocMeta, items: &[Item], seq: i64) -> Result<()> {
        let id = meta.id();
        let mut insert = self
            .tx
            .prepare_cached(
                "INSERT INTO items (doc_id, item_id, nhs, publisher, section, class, effective, \
                 body, summary_only, changed_seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
                 ON CONFLICT(doc_id, item_id) DO UPDATE SET \
                 changed_seq = CASE WHEN items.body = excluded.body THEN items.changed_seq \
                 ELSE excluded.changed_seq END, \
                 effective = excluded.effective, body = excluded.body, \
                 summary_only = excluded.summary_only",
            )
            .map_err(self.err("update read model"))?;
        for item in items {
            debug_assert_eq!(item.section, meta.section);
            debug_assert_eq!(item.class, meta.class);
            let body = serde_json::to_string(item).expect("items always serialise");
            insert
                .execute(params![
                    &id.0[..],
                    item.id,
                    meta.patient.as_str(),
                    meta.publisher.as_str(),
                    meta.section.as_str(),
                    meta.class.as_str(),
                    item.effective.as_deref().or(item.recorded.as_deref()),
                    body,
                    item.is_summary_only(),
                    seq
                ])
                .map_err(self.err("update read model"))?;
        }
        Ok(())
    }

    /// As [`Store::care`], seeing this batch's own writes.
    pub fn care(&self) -> CareLookup<'_> {
        CareLookup {
            conn: &self.tx,
            path: &self.path,
        }
    }

    /// How many items `publisher` holds about `nhs` per section, its sharing record and
    /// demographics aside: what its sharing record states so recipients can tell what they
    /// were not given.
    pub fn item_counts(
        &self,
        publisher: &OdsCode,
        nhs: &NhsNumber,
    ) -> Result<BTreeMap<Section, u64>> {
        let mut statement = self
            .tx
            .prepare_cached(ITEM_COUNTS_OF_PATIENT)
            .map_err(self.err("count items"))?;
        let rows = statement
            .query_map([publisher.as_str(), nhs.as_str()], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
            })
            .map_err(self.err("count items"))?;
        let mut counts = BTreeMap::new();
        for row in rows {
            let (section, count) = row.map_err(self.err("count items"))?;
            let section = section.parse().map_err(|e| StorageError::DamagedRow {
                path: self.path.clone(),
                doc: format!("items of {publisher}"),
                what: format!("{e}"),
            })?;
            counts.insert(section, count as u64);
        }
        Ok(counts)
    }

    /// Drops every document `publisher` published about `nhs` except its sharing record (the
    /// signed notice that explains the absence) and its access record (who saw what must
    /// outlive a withdrawal), with their read model and backfill rows.
    /// The documents' whole Automerge history goes with them: it lives only in their rows.
    /// Returns how many documents were dropped.
    pub fn purge(&self, publisher: &OdsCode, nhs: &NhsNumber) -> Result<usize> {
        self.held_rows.borrow_mut().forget_all();
        self.written.borrow_mut().clear();
        self.tx
            .prepare_cached(
                "DELETE FROM documents WHERE publisher = ?1 AND nhs = ?2 \
                 AND section NOT IN ('sharing', 'audit')",
            )
            .and_then(|mut statement| statement.execute([publisher.as_str(), nhs.as_str()]))
            .map_err(self.err("purge withdrawn documents"))
    }

    /// The partitions of `publisher`'s documents about `nhs` that hold item `item_id`.
    pub fn item_partitions(
        &self,
        publisher: &OdsCode,
        nhs: &NhsNumber,
        item_id: &str,
    ) -> Result<Vec<DocMeta>> {
        let mut statement = self
            .tx
            .prepare_cached(
                "SELECT section, class FROM items WHERE publisher = ?1 AND nhs = ?2 AND item_id = ?3",
            )
            .map_err(self.err("locate item"))?;
        let rows = statement
            .query_map(params![publisher.as_str(), nhs.as_str(), item_id], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
            })
            .map_err(self.err("locate item"))?;
        let mut partitions = Vec::new();
        for row in rows {
            let (section, class) = row.map_err(self.err("locate item"))?;
            let damaged = |what: String| StorageError::DamagedRow {
                path: self.path.clone(),
                doc: format!("item {item_id}"),
                what,
            };
            partitions.push(DocMeta {
                publisher: publisher.clone(),
                patient: nhs.clone(),
                section: section.parse().map_err(|e| damaged(format!("{e}")))?,
                class: class.parse().map_err(|e| damaged(format!("{e}")))?,
            });
        }
        Ok(partitions)
    }

    pub fn link_patient(&self, source_key: &str, nhs: &NhsNumber) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO patient_links (source_key, nhs) VALUES (?1, ?2) \
                 ON CONFLICT(source_key) DO UPDATE SET nhs = excluded.nhs",
            )
            .and_then(|mut statement| statement.execute(params![source_key, nhs.as_str()]))
            .map_err(self.err("store patient link"))?;
        Ok(())
    }

    pub fn patient_link(&self, source_key: &str) -> Result<Option<NhsNumber>> {
        patient_link(&self.tx, &self.path, source_key)
    }

    pub fn put_referenced(&self, source_key: &str, body: &str) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO referenced_resources (source_key, body) VALUES (?1, ?2) \
                 ON CONFLICT(source_key) DO UPDATE SET body = excluded.body",
            )
            .and_then(|mut statement| statement.execute(params![source_key, body]))
            .map_err(self.err("store referenced resource"))?;
        Ok(())
    }

    pub fn referenced(&self, source_key: &str) -> Result<Option<String>> {
        self.tx
            .prepare_cached("SELECT body FROM referenced_resources WHERE source_key = ?1")
            .and_then(|mut statement| {
                statement
                    .query_row([source_key], |row| row.get(0))
                    .optional()
            })
            .map_err(self.err("read referenced resource"))
    }

    /// The newest `meta.lastUpdated` seen for a resource, if any.
    pub fn resource_version(&self, source_key: &str) -> Result<Option<String>> {
        self.tx
            .prepare_cached("SELECT last_updated FROM resource_versions WHERE source_key = ?1")
            .and_then(|mut statement| {
                statement
                    .query_row([source_key], |row| row.get(0))
                    .optional()
            })
            .map_err(self.err("read resource version"))
    }

    pub fn set_resource_version(&self, source_key: &str, last_updated: &str) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO resource_versions (source_key, last_updated) VALUES (?1, ?2) \
                 ON CONFLICT(source_key) DO UPDATE SET last_updated = excluded.last_updated",
            )
            .and_then(|mut statement| statement.execute(params![source_key, last_updated]))
            .map_err(self.err("store resource version"))?;
        Ok(())
    }

    /// This node's own source, as its ingest configuration describes it.
    pub fn touch_source(&self, source: &SourceRow) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO sources (publisher, name, kind, source_system, feed, data_as_of, \
                 expected_refresh_hours) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                 ON CONFLICT(publisher) DO UPDATE SET name = excluded.name, kind = excluded.kind, \
                 source_system = excluded.source_system, feed = excluded.feed, \
                 data_as_of = MAX(data_as_of, excluded.data_as_of), \
                 expected_refresh_hours = excluded.expected_refresh_hours",
            )
            .and_then(|mut statement| {
                statement.execute(params![
                    source.publisher,
                    source.name,
                    source.kind,
                    source.source_system,
                    source.feed,
                    source.data_as_of,
                    source.expected_refresh_hours
                ])
            })
            .map_err(self.err("store source"))?;
        Ok(())
    }

    /// Another organisation's source, on receiving its data: names from the registry and
    /// the newest publication time; its feed stays as its sharing record last stated.
    pub fn touch_received_source(&self, source: &SourceRow) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO sources (publisher, name, kind, source_system, feed, data_as_of) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT(publisher) DO UPDATE SET \
                 name = excluded.name, kind = excluded.kind, \
                 data_as_of = MAX(data_as_of, excluded.data_as_of)",
            )
            .and_then(|mut statement| {
                statement.execute(params![
                    source.publisher,
                    source.name,
                    source.kind,
                    source.source_system,
                    source.feed,
                    source.data_as_of
                ])
            })
            .map_err(self.err("store source"))?;
        Ok(())
    }

    /// What a publisher's sharing record states about its feed.
    pub fn state_source(&self, publisher: &OdsCode, statement: &SourceStatement) -> Result<()> {
        self.tx
            .prepare_cached(
                "UPDATE sources SET feed = ?2, source_system = ?3, expected_refresh_hours = ?4 \
                 WHERE publisher = ?1",
            )
            .and_then(|mut update| {
                update.execute(params![
                    publisher.as_str(),
                    statement.feed,
                    statement.system,
                    statement.refresh_hours
                ])
            })
            .map_err(self.err("store a source's feed"))?;
        Ok(())
    }

    /// The row for `publisher`, if this node has one.
    pub fn source(&self, publisher: &OdsCode) -> Result<Option<SourceRow>> {
        self.tx
            .prepare_cached(
                "SELECT publisher, name, kind, source_system, feed, data_as_of, \
                 expected_refresh_hours FROM sources WHERE publisher = ?1",
            )
            .and_then(|mut statement| {
                statement
                    .query_row([publisher.as_str()], row_to_source)
                    .optional()
            })
            .map_err(self.err("read a source"))
    }

    pub fn record_ingest(&self, row: &IngestRow) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO ingests (at, file, outcome, summary, kept_as) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut statement| {
                statement.execute(params![
                    row.at,
                    row.file,
                    row.outcome,
                    row.summary.to_string(),
                    row.kept_as
                ])
            })
            .map_err(self.err("record ingest"))?;
        Ok(())
    }

    pub fn commit(self) -> Result<()> {
        let path = self.path;
        match self.tx {
            BatchTransaction::Own(tx) => tx.commit(),
            BatchTransaction::InGroup(savepoint) => savepoint.commit(),
        }
        .map_err(|source| StorageError::database(path, "commit", source))?;
        // Within a group these are kept before the group commits: one that fails forgets
        // every kept row.
        let mut kept = self.held_rows.borrow_mut();
        for (id, row) in self.written.into_inner() {
            kept.keep(id, row);
        }
        Ok(())
    }
}

/// Whether `error`, or anything that caused it, is the disk being full (SQLite's
/// SQLITE_FULL, or ENOSPC from the operating system).
pub fn is_disk_full(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        // Every storage error's chain ends in the database's own error, also behind a
        // transparent wrapper (which hands on the StorageError's source, not the error).
        if error
            .downcast_ref::<DatabaseError>()
            .is_some_and(|e| e.failure == DatabaseFailure::DiskFull)
        {
            return true;
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::StorageFull
        {
            return true;
        }
        cause = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_source_is_stale_only_past_its_expected_refresh() {
        let source = SourceRow {
            publisher: "A81001".into(),
            name: "GP".into(),
            kind: "gp".into(),
            source_system: "EMIS Web".into(),
            feed: "batch".into(),
            data_as_of: 1_000_000,
            expected_refresh_hours: Some(12),
        };
        assert!(!source.is_stale(1_000_000 + 12 * 3600));
        assert!(source.is_stale(1_000_000 + 12 * 3600 + 1));
        let live = SourceRow {
            feed: "live".into(),
            ..source.clone()
        };
        assert!(
            !live.is_stale(2_000_000),
            "a live feed has no expected refresh"
        );
        let unstated = SourceRow {
            expected_refresh_hours: None,
            ..source
        };
        assert!(!unstated.is_stale(2_000_000));
    }
    use caremesh_sync::{PublishedDocument, PublisherKey};

    /// SQLite's plan for `sql`, its steps joined; parameters are bound to a publisher and a
    /// patient, as many as the query has.
    fn query_plan(store: &Store, sql: &str) -> String {
        let mut statement = store
            .conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap();
        let values = ["A81001", "9912003888"];
        let bound = &values[..statement.parameter_count()];
        let steps: Vec<String> = statement
            .query_map(rusqlite::params_from_iter(bound), |row| {
                row.get::<_, String>(3)
            })
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        steps.join("; ")
    }

    /// Items of the first format (no source resource) are counted per publisher, from a
    /// partial index, so `status` can say who must re-publish; re-published, they go.
    #[test]
    fn summary_only_items_are_counted_until_their_publisher_re_publishes() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("node.db")).unwrap();
        let old = item("AllergyIntolerance/1");
        assert!(old.is_summary_only());
        stored(&mut store, std::slice::from_ref(&old), 1_000);
        assert_eq!(
            store.stats().unwrap().summary_only_by_source,
            [("A81001".to_string(), 1)]
        );
        let plan = query_plan(
            &store,
            "SELECT publisher, count(*) FROM items WHERE summary_only = 1 GROUP BY publisher",
        );
        assert!(plan.contains("items_summary_only"), "{plan}");
        let current = Item {
            format: caremesh_sync::ITEM_FORMAT,
            resource: Some(serde_json::json!({ "resourceType": "AllergyIntolerance" })),
            ..old
        };
        stored(&mut store, &[current], 2_000);
        assert!(store.stats().unwrap().summary_only_by_source.is_empty());
    }

    #[test]
    fn items_are_counted_by_source_and_section_from_an_index_not_their_bodies() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("node.db")).unwrap();
        let plan = query_plan(&store, ITEMS_BY_SOURCE_AND_SECTION);
        assert!(
            plan.contains("COVERING INDEX items_by_section_source"),
            "{plan}"
        );
    }

    #[test]
    fn look_ups_about_one_patient_seek_by_the_patient_whatever_indexes_exist() {
        // An index led by publisher once made these scan all of a publisher's items: at a
        // million documents every policy decision read a hundred thousand rows.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("node.db")).unwrap();
        for sql in [SHARING_RECORD_OF_PATIENT, ITEM_COUNTS_OF_PATIENT] {
            let plan = query_plan(&store, sql);
            assert!(plan.contains("nhs=?"), "{sql}: {plan}");
        }
    }

    fn meta() -> DocMeta {
        DocMeta {
            publisher: OdsCode::parse("A81001").unwrap(),
            patient: NhsNumber::parse("9912003888").unwrap(),
            section: Section::Allergies,
            class: DataClass::Coded,
        }
    }

    pub(crate) fn item(id: &str) -> Item {
        serde_json::from_value(serde_json::json!({
            "id": id, "section": "allergies", "class": "coded",
            "resource_type": "AllergyIntolerance", "title": "Amoxicillin",
            "source_system": "test", "source_id": id, "effective": "2020-01-01"
        }))
        .unwrap()
    }

    pub(crate) fn stored(store: &mut Store, items: &[Item], time: i64) -> i64 {
        stored_as(store, &meta(), items, time)
    }

    /// Stores `items` as the publisher's new version of `meta`'s document, made afresh where
    /// the tests need no history: as a publisher does, it replaces the copy held.
    fn stored_as(store: &mut Store, meta: &DocMeta, items: &[Item], time: i64) -> i64 {
        let key = PublisherKey::from_secret([9; 32]);
        let mut doc = PublishedDocument::create(meta.clone(), b"actor");
        doc.update(items, &[], time);
        let signed = key.sign_heads(meta, &doc.heads());
        let batch = store.write().unwrap();
        let held = batch.document(meta.id()).unwrap();
        let built_on = held.and_then(|held| held.signed_heads()).map(|s| s.heads);
        let seq = batch
            .put_document(&signed, &doc.save(), built_on.as_deref(), items, None, time)
            .unwrap()
            .expect("made from the copy held");
        batch.commit().unwrap();
        seq
    }

    /// A relay's view of the document held: stored as a relay stores it, read as a relay
    /// reads it (no bytes), with what `store.document` reads beside it.
    fn relay_copy(store: &Store) -> (HeldIndex, StoredDocument) {
        let (read_meta, index) = store.held_index(meta().id()).unwrap().unwrap();
        assert_eq!(read_meta, meta());
        let whole = store.document(meta().id()).unwrap().unwrap();
        assert_eq!(index.stored_len, whole.snapshot.len() as u64);
        assert_eq!(index.appended, whole.appended);
        assert_eq!(
            index.heads,
            SignedHeads::decode(&whole.signed).unwrap().heads
        );
        (index, whole)
    }

    /// Extends the relay's copy by the publisher's changes since `before`, as a session
    /// does, checking that they give the publisher's heads.
    fn extended(store: &Store, doc: &PublishedDocument, before: &[[u8; 32]]) -> Extension {
        let (index, _) = relay_copy(store);
        let extension = relay::extend(&index, &doc.changes_since(before)).unwrap();
        assert_eq!(extension.heads, sorted(doc.heads()));
        extension
    }

    /// Damages the stored rows with `sql`, as a store opened afterwards reads them: the rows
    /// this one kept in memory ([`held_rows`]) were read before the damage.
    fn damage(store: &Store, sql: &str) {
        store.conn.execute(sql, []).unwrap();
        store.held_rows.borrow_mut().forget_all();
    }

    fn appended_rows(store: &Store) -> i64 {
        store
            .conn
            .query_row("SELECT count(*) FROM appended_changes", [], |row| {
                row.get(0)
            })
            .unwrap()
    }

    fn put_appended(
        store: &mut Store,
        key: &PublisherKey,
        heads: &[[u8; 32]],
        extension: &Extension,
        time: i64,
    ) -> Option<i64> {
        let batch = store.write().unwrap();
        let seq = batch
            .put_appended(&key.sign_heads(&meta(), heads), extension, None, None, time)
            .unwrap();
        batch.commit().unwrap();
        seq
    }

    fn put_whole(store: &mut Store, key: &PublisherKey, doc: &PublishedDocument, time: i64) {
        put_saved(store, key, &doc.heads(), &doc.save(), time);
    }

    fn put_saved(
        store: &mut Store,
        key: &PublisherKey,
        heads: &[[u8; 32]],
        saved: &[u8],
        time: i64,
    ) {
        let batch = store.write().unwrap();
        batch
            .put_document(
                &key.sign_heads(&meta(), heads),
                saved,
                None,
                &[],
                None,
                time,
            )
            .unwrap();
        batch.commit().unwrap();
    }

    /// The heads the stored bytes load to, and the heads stored as signed.
    fn loaded_and_signed(store: &Store) -> (Vec<[u8; 32]>, Vec<[u8; 32]>) {
        let (index, whole) = relay_copy(store);
        let loaded = PublishedDocument::load(&meta(), &whole.snapshot).unwrap();
        (sorted(loaded.heads()), sorted(index.heads))
    }

    /// The rows a relay reads are kept between versions ([`held_rows`]), and a committed
    /// write keeps the row as it wrote it, so that the push after it reads no row back.
    /// Whatever happens to the documents (relayed versions stored, versions saved whole,
    /// purges, batches that roll back, group commits that fail), what is read through the
    /// kept rows is what the database says, and what a holder is sent is what the whole
    /// document gives.
    #[test]
    fn kept_rows_read_as_the_database_says_through_writes_purges_and_rollbacks() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("node.db")).unwrap();
        let disk = Arc::new(crate::simulated_disk::SimulatedDisk::new(7));
        store.on_simulated_disk(disk.clone()).unwrap();
        let key = PublisherKey::from_secret([9; 32]);
        let patients = ["9912003888", "9990000018", "9990000026"];
        let metas: Vec<DocMeta> = patients
            .iter()
            .map(|nhs| DocMeta {
                patient: NhsNumber::parse(nhs).unwrap(),
                ..meta()
            })
            .collect();
        // The publisher's documents, and every version's heads each has published.
        let mut docs: Vec<PublishedDocument> = metas
            .iter()
            .map(|meta| PublishedDocument::create(meta.clone(), b"actor"))
            .collect();
        // Every version each has published, saved.
        let mut published: Vec<Vec<Vec<u8>>> = vec![Vec::new(); docs.len()];
        let mut rng = caremesh_sync::rng::Rng::new(11);
        let (mut appended_and_kept, mut saved_and_kept) = (0, 0);
        for step in 0..240u64 {
            let at = rng.below(docs.len() as u64) as usize;
            let meta = &metas[at];
            let id = meta.id();
            let before = docs[at].heads();
            docs[at].update(&[item(&format!("a/{step}"))], &[], step as i64);
            published[at].push(docs[at].save());
            let signed = key.sign_heads(meta, &docs[at].heads());
            let choice = rng.below(10);
            let in_group = choice >= 7;
            if in_group {
                store.begin_group();
                // Rows read between a group's batches see its writes.
                store.held_index(id).unwrap();
            }
            let held = store.held_index(id).unwrap();
            let batch = store.write().unwrap();
            // Whether a version was written, and whether as changes appended.
            let (written, appended) = match held {
                Some((_, index)) if !choice.is_multiple_of(3) => {
                    let extension = relay::extend(&index, &docs[at].changes_since(&before));
                    let written = extension.is_ok_and(|extension| {
                        batch
                            .put_appended(&signed, &extension, None, None, 1)
                            .unwrap()
                            .is_some()
                    });
                    (written, written)
                }
                _ => {
                    let written = batch
                        .put_document(&signed, &docs[at].save(), None, &[], None, 1)
                        .unwrap()
                        .is_some();
                    (written, false)
                }
            };
            // As a second version of the document in the same batch would: read what the
            // batch wrote, which may yet roll back.
            batch.held_index(id).unwrap();
            if choice == 1 {
                batch.purge(&meta.publisher, &meta.patient).unwrap();
            }
            if choice == 2 {
                drop(batch); // rolled back
            } else {
                batch.commit().unwrap();
            }
            let mut committed = written && choice != 1 && choice != 2;
            if in_group {
                store.held_index(id).unwrap();
                disk.set_full(choice == 9);
                committed &= store.end_group().is_ok();
                disk.set_full(false);
            }
            // What was written and committed is kept as written, before anything reads it.
            if committed {
                let kept = store.held_rows.borrow_mut().get(id);
                let kept = kept.expect("a committed write keeps its row");
                assert_eq!(kept.appended.is_some(), appended, "step {step}");
                if appended {
                    appended_and_kept += 1;
                } else {
                    saved_and_kept += 1;
                }
            }
            for (meta, doc_versions) in metas.iter().zip(&published) {
                let id = meta.id();
                let fresh = held_rows::read(&store.conn, &store.path, id).unwrap();
                let kept = store.held_row(id).unwrap();
                assert_eq!(kept.as_deref(), fresh.as_ref(), "step {step}: {id}");
                let kept_again = store.held_row(id).unwrap();
                assert_eq!(kept_again.as_deref(), fresh.as_ref(), "step {step}: {id}");
                let Some(whole) = store.document(id).unwrap() else {
                    continue;
                };
                // What a holder of one of the last versions published is sent brings it to
                // the held heads, and is what the whole document says it lacks.
                let signed_heads = sorted(SignedHeads::decode(&whole.signed).unwrap().heads);
                for saved in doc_versions.iter().rev().take(3) {
                    let mut holder = PublishedDocument::load(meta, saved).unwrap();
                    let have = holder.heads();
                    match store.changes_after(id, &have).unwrap() {
                        HeldChanges::Lacking(sent) => {
                            assert_eq!(sent.signed, whole.signed, "step {step}");
                            if let Some(appended) = &whole.appended
                                && sorted(have.clone()) != signed_heads
                            {
                                assert_eq!(
                                    Some(&sent.changes),
                                    relay::changes_after(&whole.snapshot, appended, &have).as_ref(),
                                    "step {step}"
                                );
                            }
                            holder.apply_chunks(&sent.changes).unwrap();
                            assert_eq!(sorted(holder.heads()), signed_heads, "step {step}");
                        }
                        HeldChanges::Unknown => {}
                        HeldChanges::NotHeld => panic!("step {step}: {id} is held"),
                    }
                }
            }
        }
        assert!(disk.failed_commits() > 0, "some group commits failed");
        assert!(store.held_rows.borrow().len() > 0, "rows were kept");
        assert!(
            appended_and_kept > 20,
            "{appended_and_kept} appended rows kept"
        );
        assert!(saved_and_kept > 20, "{saved_and_kept} saved rows kept");
    }

    /// Finding (CI, once a committed write kept its row): a node's own documents may be
    /// published by another process beside it, and a row this store kept named the version
    /// before, so the node never offered the new one. What another connection commits is
    /// read, by reads outside a write and by a write batch alike.
    #[test]
    fn kept_rows_give_way_to_what_another_connection_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let mut store = Store::open(&path).unwrap();
        let mut beside = Store::open(&path).unwrap();
        let key = PublisherKey::from_secret([9; 32]);
        let id = meta().id();
        let mut doc = PublishedDocument::create(meta(), b"actor");
        doc.update(&[item("a/0")], &[], 1);
        put_whole(&mut store, &key, &doc, 1);
        assert_eq!(store.held_heads(id).unwrap(), Some(doc.heads()));
        doc.update(&[item("a/1")], &[], 2);
        put_whole(&mut beside, &key, &doc, 2);
        assert_eq!(
            store.held_heads(id).unwrap(),
            Some(doc.heads()),
            "read outside a write"
        );
        doc.update(&[item("a/2")], &[], 3);
        put_whole(&mut beside, &key, &doc, 3);
        let batch = store.write().unwrap();
        let (_, index) = batch.held_index(id).unwrap().unwrap();
        assert_eq!(index.heads, doc.heads(), "read by a write batch");
    }

    /// Finding (issue 19's 10-minute run): a relayed version rewrote the whole stored row, so
    /// a growing document cost more to store with every version and a busy hub fell behind.
    /// Appended changes are rows of their own: a version adds only its changes, the saved
    /// base is never rewritten, and what is read back loads as the publisher's document.
    #[test]
    fn appended_versions_write_only_their_changes_and_read_back_as_the_whole_document() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("node.db")).unwrap();
        let key = PublisherKey::from_secret([9; 32]);
        let mut doc = PublishedDocument::create(meta(), b"actor");
        doc.update(&[item("a/0")], &[], 1);
        let base = doc.save();
        put_whole(&mut store, &key, &doc, 1);
        let base_kept = |store: &Store| -> i64 {
            store
                .conn
                .query_row(
                    "SELECT count(*) FROM document_snapshots WHERE snapshot = ?1",
                    [&base],
                    |row| row.get(0),
                )
                .unwrap()
        };
        for version in 1..=4 {
            let (_, held) = relay_copy(&store);
            let before = doc.heads();
            doc.update(&[item(&format!("a/{version}"))], &[], 1 + version);
            let extension = extended(&store, &doc, &before);
            let changed_before = store.conn.total_changes();
            assert!(
                put_appended(&mut store, &key, &doc.heads(), &extension, 1 + version).is_some()
            );
            assert_eq!(
                store.conn.total_changes() - changed_before,
                3,
                "version {version}: the feed tip, the document's row and one change row"
            );
            assert_eq!(
                appended_rows(&store),
                version,
                "one row per appended change, none rewritten"
            );
            assert_eq!(base_kept(&store), 1, "the saved base is kept as it was");
            let (index, read) = relay_copy(&store);
            let mut expected = held.snapshot.clone();
            expected.extend_from_slice(&extension.new_bytes);
            assert_eq!(
                read.snapshot, expected,
                "the held bytes, then the new change"
            );
            assert_eq!(index.appended.as_ref(), Some(&extension.appended));
            let (loaded, signed) = loaded_and_signed(&store);
            assert_eq!(loaded, sorted(doc.heads()), "the stored bytes load whole");
            assert_eq!(signed, loaded);
            assert_eq!(
                store.documents_after(0, 10).unwrap()[0].snapshot,
                read.snapshot
            );
        }
        // A version saved whole replaces the rows; a purge takes them with the document.
        doc.update(&[item("a/7")], &[], 7);
        put_whole(&mut store, &key, &doc, 7);
        assert_eq!(appended_rows(&store), 0);
        assert!(relay_copy(&store).0.appended.is_none());
        let before = doc.heads();
        doc.update(&[item("a/8")], &[], 8);
        let extension = extended(&store, &doc, &before);
        put_appended(&mut store, &key, &doc.heads(), &extension, 8);
        assert_eq!(appended_rows(&store), 1);
        let batch = store.write().unwrap();
        assert_eq!(batch.purge(&meta().publisher, &meta().patient).unwrap(), 1);
        batch.commit().unwrap();
        assert_eq!(
            appended_rows(&store),
            0,
            "a withdrawal leaves no appended change behind"
        );
        // Nothing held any more: nothing to append to, and nothing stored.
        assert_eq!(
            put_appended(&mut store, &key, &doc.heads(), &extension, 9),
            None
        );
        assert!(store.document(meta().id()).unwrap().is_none());
    }

    /// A hub sends each new version of a relayed document from the changes it appended, not
    /// from the document read whole (issue 19: reading the saved bytes for every push was a
    /// tenth of a saturated hub's engine thread). What it sends a holder of each earlier
    /// version is exactly what the whole document says that holder lacks, and brings the
    /// holder to the publisher's heads; where only the whole document can tell (a head from
    /// before the base, a copy saved whole, a damaged index) it says so.
    #[test]
    fn changes_after_sends_each_holder_what_the_whole_document_says_it_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("node.db")).unwrap();
        let key = PublisherKey::from_secret([9; 32]);
        let mut doc = PublishedDocument::create(meta(), b"actor");
        doc.update(&[item("a/0")], &[], 1);
        let before_base = doc.heads();
        doc.update(&[item("a/1")], &[], 2);
        put_whole(&mut store, &key, &doc, 2);
        // Each version as a holder of it would have it.
        let mut versions = vec![doc.save()];
        for version in 2..=6 {
            let before = doc.heads();
            doc.update(
                &[item(&format!("a/{version}"))],
                &[format!("a/{}", version - 1)],
                1 + version,
            );
            let extension = extended(&store, &doc, &before);
            put_appended(&mut store, &key, &doc.heads(), &extension, 1 + version).unwrap();
            versions.push(doc.save());
        }
        let id = meta().id();
        let whole = store.document(id).unwrap().unwrap();
        let appended = whole.appended.clone().expect("appended, not saved whole");
        let holder = |at: usize| PublishedDocument::load(&meta(), &versions[at]).unwrap();
        for at in 0..versions.len() {
            let mut theirs = holder(at);
            let have = theirs.heads();
            let HeldChanges::Lacking(ChangesToSend {
                meta: read_meta,
                signed,
                changes,
            }) = store.changes_after(id, &have).unwrap()
            else {
                panic!("version {at}: the appended changes can tell");
            };
            assert_eq!(read_meta, meta());
            assert_eq!(signed, whole.signed);
            assert_eq!(
                Some(&changes),
                relay::changes_after(&whole.snapshot, &appended, &have).as_ref(),
                "version {at}: what the whole document says is lacking"
            );
            assert_eq!(changes.len(), versions.len() - 1 - at);
            theirs.apply_chunks(&changes).unwrap();
            assert_eq!(sorted(theirs.heads()), sorted(doc.heads()), "version {at}");
        }
        assert_eq!(
            store.changes_after(id, &before_base).unwrap(),
            HeldChanges::Unknown,
            "a head from before the saved base"
        );
        assert_eq!(
            store.changes_after(id, &[[7; 32]]).unwrap(),
            HeldChanges::Unknown,
            "a head never held"
        );
        let other = DocMeta {
            section: Section::Medications,
            ..meta()
        };
        assert_eq!(
            store.changes_after(other.id(), &doc.heads()).unwrap(),
            HeldChanges::NotHeld
        );

        damage(
            &store,
            "UPDATE appended_changes SET deps = x'00' WHERE position = 1",
        );
        assert_eq!(
            store.changes_after(id, &holder(0).heads()).unwrap(),
            HeldChanges::Unknown,
            "a damaged index is never trusted"
        );

        // Saved whole: a holder of the signed heads lacks nothing; any other needs the
        // document.
        put_whole(&mut store, &key, &doc, 9);
        assert!(matches!(
            store.changes_after(id, &doc.heads()).unwrap(),
            HeldChanges::Lacking(ChangesToSend { changes, .. }) if changes.is_empty()
        ));
        assert_eq!(
            store.changes_after(id, &holder(0).heads()).unwrap(),
            HeldChanges::Unknown
        );
    }

    /// A relayed version is stored after its session's batch completes, and another session
    /// (the publisher directly, a second hub) may have stored a version of the document in
    /// between. Whatever that was, the version stored is never older than either, and the
    /// stored bytes always load to the stored signed heads.
    #[test]
    fn a_relayed_version_stored_after_the_held_copy_moved_on_is_never_stored_over_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("node.db")).unwrap();
        let key = PublisherKey::from_secret([9; 32]);
        let mut doc = PublishedDocument::create(meta(), b"actor");
        doc.update(&[item("a/0")], &[], 1);
        put_whole(&mut store, &key, &doc, 1);
        // Each version's heads and saved bytes; one change a version.
        let mut versions = vec![(doc.heads(), doc.save())];
        for version in 1..=4 {
            doc.update(&[item(&format!("a/{version}"))], &[], 1 + version);
            versions.push((doc.heads(), doc.save()));
        }
        let all_changes = doc.changes_since(&versions[0].0);
        assert_eq!(all_changes.len(), 4);
        let heads = |version: usize| sorted(versions[version].0.clone());
        let changes_to = |version: usize| all_changes[..version].to_vec();
        let whole = |store: &mut Store, version: usize, time: i64| {
            put_saved(
                store,
                &key,
                &versions[version].0,
                &versions[version].1,
                time,
            )
        };
        let index_at_v0 = relay_copy(&store).0;

        // 1. Another session appended a newer version (3) first: version 2 is kept out.
        let late_v2 = relay::extend(&index_at_v0, &changes_to(2)).unwrap();
        let v3 = relay::extend(&index_at_v0, &changes_to(3)).unwrap();
        put_appended(&mut store, &key, &versions[3].0, &v3, 3).unwrap();
        let seq = store.feed_tip().unwrap();
        assert_eq!(
            put_appended(&mut store, &key, &versions[2].0, &late_v2, 4),
            None
        );
        assert_eq!(loaded_and_signed(&store), (heads(3), heads(3)));
        assert_eq!(store.feed_tip().unwrap(), seq, "no feed position taken");
        assert_eq!(appended_rows(&store), 3);

        // 2. Another session saved an older version (1) whole: the changes extend it.
        let mut store_b = Store::open(&dir.path().join("b.db")).unwrap();
        whole(&mut store_b, 0, 1);
        let late_v3 = relay::extend(&relay_copy(&store_b).0, &changes_to(3)).unwrap();
        whole(&mut store_b, 1, 2);
        assert!(put_appended(&mut store_b, &key, &versions[3].0, &late_v3, 3).is_some());
        assert_eq!(loaded_and_signed(&store_b), (heads(3), heads(3)));
        assert_eq!(appended_rows(&store_b), 2, "appended after the whole save");

        // 3. Another session saved a newer version (4) whole: version 3 is kept out.
        let mut store_d = Store::open(&dir.path().join("d.db")).unwrap();
        whole(&mut store_d, 0, 1);
        let late_v3 = relay::extend(&relay_copy(&store_d).0, &changes_to(3)).unwrap();
        whole(&mut store_d, 4, 5);
        assert_eq!(
            put_appended(&mut store_d, &key, &versions[3].0, &late_v3, 6),
            None
        );
        assert_eq!(loaded_and_signed(&store_d), (heads(4), heads(4)));

        // 4. The held index is damaged (a stored hash not 32 bytes), so only the history can
        //    tell: held bytes and changes are loaded together and saved whole.
        let mut store_c = Store::open(&dir.path().join("c.db")).unwrap();
        whole(&mut store_c, 0, 1);
        let v1 = relay::extend(&relay_copy(&store_c).0, &changes_to(1)).unwrap();
        put_appended(&mut store_c, &key, &versions[1].0, &v1, 2).unwrap();
        let v2 = relay::extend(&relay_copy(&store_c).0, &changes_to(2)).unwrap();
        damage(&store_c, "UPDATE appended_changes SET hash = x'00'");
        assert!(put_appended(&mut store_c, &key, &versions[2].0, &v2, 3).is_some());
        assert_eq!(loaded_and_signed(&store_c), (heads(2), heads(2)));
        assert_eq!(appended_rows(&store_c), 0, "saved whole");
    }

    /// The same race on the full path (sharing records, first copies, every version at a
    /// reading node): a version checked against one copy is stored after another session
    /// stored a version of the document. The stored version is never older than either,
    /// the stored bytes always load to the stored signed heads, and a version kept out
    /// takes no feed position.
    #[test]
    fn a_whole_version_stored_after_the_held_copy_moved_on_is_never_stored_over_it() {
        let dir = tempfile::tempdir().unwrap();
        let key = PublisherKey::from_secret([9; 32]);
        let mut doc = PublishedDocument::create(meta(), b"actor");
        let mut versions = Vec::new();
        for version in 0..=3 {
            doc.update(&[item(&format!("a/{version}"))], &[], 1 + version);
            versions.push((doc.heads(), doc.save()));
        }
        let heads = |version: usize| sorted(versions[version].0.clone());
        // Stores `version`, made from the copy at `built_on`; its feed position, if stored.
        let put = |store: &mut Store, version: usize, built_on: Option<usize>| {
            let batch = store.write().unwrap();
            let signed = key.sign_heads(&meta(), &versions[version].0);
            let built_on = built_on.map(|base| versions[base].0.clone());
            let position = batch
                .put_document(
                    &signed,
                    &versions[version].1,
                    built_on.as_deref(),
                    &[],
                    None,
                    version as i64,
                )
                .unwrap();
            batch.commit().unwrap();
            position
        };
        let open = |name: &str| Store::open(&dir.path().join(name)).unwrap();
        struct Case {
            held_before: Option<usize>,
            /// What another session stored after the version was checked.
            stored_between: usize,
            version: usize,
            built_on: Option<usize>,
            stored: bool,
            held_after: usize,
        }
        let case = |held_before, stored_between, version, built_on, stored, held_after| Case {
            held_before,
            stored_between,
            version,
            built_on,
            stored,
            held_after,
        };
        let cases = [
            // The held copy is still the one the version was made from: stored.
            case(Some(0), 0, 2, Some(0), true, 2),
            // A newer version came in between: kept.
            case(Some(0), 3, 2, Some(0), false, 3),
            // An older version came in between: the version has all of it, stored.
            case(Some(0), 1, 3, Some(0), true, 3),
            // The same version came in between: kept, no second feed position.
            case(Some(0), 2, 2, Some(0), false, 2),
            // A first copy, and another session stored a newer one first: kept.
            case(None, 3, 1, None, false, 3),
            // A first copy, and another session stored an older one first: stored.
            case(None, 0, 1, None, true, 1),
        ];
        for (number, case) in cases.into_iter().enumerate() {
            let mut store = open(&format!("{number}.db"));
            if let Some(before) = case.held_before {
                put(&mut store, before, None).unwrap();
            }
            if case.held_before != Some(case.stored_between) {
                put(&mut store, case.stored_between, case.held_before).unwrap();
            }
            let tip = store.feed_tip().unwrap();
            let position = put(&mut store, case.version, case.built_on);
            assert_eq!(position.is_some(), case.stored, "case {number}");
            let expected_tip = if case.stored { tip + 1 } else { tip };
            assert_eq!(store.feed_tip().unwrap(), expected_tip, "case {number}");
            let after = heads(case.held_after);
            assert_eq!(
                loaded_and_signed(&store),
                (after.clone(), after),
                "case {number}"
            );
        }
    }

    /// Finding (issue 19's profile): rusqlite keeps 16 prepared statements by default, and a
    /// hub's turn used more, so each was parsed again on every use. The cache must hold every
    /// statement the store prepares.
    #[test]
    fn the_statement_cache_holds_every_statement_the_store_prepares() {
        let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut prepared = 0;
        for entry in std::fs::read_dir(&source).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                prepared += text.matches(".prepare_cached(").count();
            }
        }
        assert!(prepared > 16, "the default would do: {prepared}");
        assert!(
            prepared <= STATEMENT_CACHE_CAPACITY,
            "{prepared} statements prepared, room for {STATEMENT_CACHE_CAPACITY}"
        );
        // rusqlite does not say its capacity: count the statements the connection keeps
        // prepared after more than the default were used and dropped.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("node.db")).unwrap();
        let live = |store: &Store| {
            let mut count = 0;
            // SAFETY: the handle is the store's open connection, used on this thread only,
            // and sqlite3_next_stmt only walks its list of prepared statements.
            unsafe {
                let db = store.conn.handle();
                let mut statement = rusqlite::ffi::sqlite3_next_stmt(db, std::ptr::null_mut());
                while !statement.is_null() {
                    count += 1;
                    statement = rusqlite::ffi::sqlite3_next_stmt(db, statement);
                }
            }
            count
        };
        let before = live(&store);
        for n in 0..prepared {
            let mut statement = store.conn.prepare_cached(&format!("SELECT {n}")).unwrap();
            let value: usize = statement.query_row([], |row| row.get(0)).unwrap();
            assert_eq!(value, n);
        }
        assert_eq!(live(&store) - before, prepared, "every one kept prepared");
    }

    /// Finding: positions came from MAX(seq) + 1, so purging the newest documents (a
    /// withdrawal) handed their positions out again, and a peer already past them was never
    /// offered the documents that took them.
    #[test]
    fn a_purge_of_the_newest_documents_never_hands_their_positions_out_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("node.db")).unwrap();
        let other = DocMeta {
            patient: NhsNumber::parse("9434765919").unwrap(),
            ..meta()
        };
        assert_eq!(stored_as(&mut store, &meta(), &[item("a/1")], 1), 1);
        assert_eq!(stored_as(&mut store, &other, &[item("b/1")], 2), 2);
        let batch = store.write().unwrap();
        assert_eq!(batch.purge(&other.publisher, &other.patient).unwrap(), 1);
        batch.commit().unwrap();
        assert_eq!(store.feed_tip().unwrap(), 2, "the tip stays where it was");
        let third = DocMeta {
            patient: NhsNumber::parse("6700028191").unwrap(),
            ..meta()
        };
        assert_eq!(stored_as(&mut store, &third, &[item("c/1")], 3), 3);
    }

    /// Each opening for writing begins a feed epoch at the tip; the epochs before it end
    /// where the next began, and only the newest are remembered.
    #[test]
    fn each_opening_begins_a_feed_epoch_and_old_epochs_are_forgotten() {
        use caremesh_sync::session::EpochEnd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let mut store = Store::open(&path).unwrap();
        let first = store.feed_epoch().unwrap();
        assert_eq!(store.feed_epoch_end(first).unwrap(), EpochEnd::Current);
        assert_eq!(store.feed_epoch_end(0).unwrap(), EpochEnd::EndedAt(0));
        stored(&mut store, &[item("a/1")], 1);
        drop(store);
        let store = Store::open(&path).unwrap();
        let second = store.feed_epoch().unwrap();
        assert_ne!(first, second);
        assert_eq!(store.feed_epoch_end(first).unwrap(), EpochEnd::EndedAt(1));
        assert_eq!(store.feed_epoch_end(second).unwrap(), EpochEnd::Current);
        drop(store);
        for _ in 0..KEPT_FEED_EPOCHS {
            drop(Store::open(&path).unwrap());
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.feed_epoch_end(second).unwrap(), EpochEnd::Unknown);
        let epochs: i64 = store
            .conn
            .query_row("SELECT COUNT(*) FROM feed_epochs", [], |row| row.get(0))
            .unwrap();
        assert_eq!(epochs, KEPT_FEED_EPOCHS);
    }

    #[test]
    fn migrations_run_once_and_reopen_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        drop(Store::open(&path).unwrap());
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.schema_version().unwrap(),
            migrations::MIGRATIONS.len() as i64
        );
    }

    #[test]
    fn a_newer_schema_is_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        drop(Store::open(&path).unwrap());
        page_checksums::open_directly(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let error = Store::open(&path).err().unwrap();
        assert!(error.to_string().contains("upgrade caremesh"), "{error}");
    }

    #[test]
    fn documents_and_read_model_change_together_and_take_new_feed_positions() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("node.db")).unwrap();
        let first = stored(&mut store, &[item("a/1")], 1);
        let second = stored(&mut store, &[item("a/1"), item("a/2")], 2);
        assert!(second > first);
        let nhs = meta().patient;
        assert_eq!(store.patient_items(&nhs).unwrap().len(), 2);
        let feed = store.documents_after(0, 10).unwrap();
        assert_eq!(feed.len(), 1, "one document, at its newest position");
        assert_eq!(feed[0].seq, second);
        assert!(store.documents_after(second, 10).unwrap().is_empty());
        assert!(feed[0].signed_heads().is_some());
    }

    #[test]
    fn an_uncommitted_batch_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("node.db")).unwrap();
        {
            let batch = store.write().unwrap();
            batch.link_patient("Patient/x", &meta().patient).unwrap();
        }
        assert_eq!(store.patient_link("Patient/x").unwrap(), None);
    }

    #[test]
    fn a_group_takes_the_write_lock_at_its_first_write_and_commits_it_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let mut store = Store::open(&path).unwrap();
        let other = Store::open(&path).unwrap();
        let peer = OdsCode::parse("A81001").unwrap();
        let status = |bytes_sent| PeerStatus {
            peer: peer.to_string(),
            bytes_sent,
            ..Default::default()
        };
        store.begin_group();
        // Nothing written yet: the group holds no lock, so another writer goes ahead.
        other.save_peer_status(&status(1)).unwrap();
        store.save_peer_status(&status(2)).unwrap();
        let batch = store.write().unwrap();
        batch
            .record_unsendable(0, &peer, DocId([7; 16]), 1)
            .unwrap();
        batch.commit().unwrap();
        // Inside the group: not visible to another connection until it ends.
        assert_eq!(other.peer_status(&peer).unwrap().unwrap().bytes_sent, 1);
        store.end_group().unwrap();
        assert_eq!(other.peer_status(&peer).unwrap().unwrap().bytes_sent, 2);
        // A group that writes nothing commits nothing and costs no transaction.
        store.begin_group();
        store.end_group().unwrap();
    }
}
