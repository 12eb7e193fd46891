//! Encryption at rest: a node's database, its write-ahead log and SQLite's temporary files
//! encrypted with SQLCipher (AES-256 in CBC mode per page, each page authenticated with
//! HMAC-SHA512 under a key derived from the data key and the file's random salt).
//!
//! The data key is 256 random bits given to SQLCipher raw (`x'…'`), so opening a connection
//! costs no passphrase derivation: the view opens one per request. Where the key comes from
//! (a file outside the home, systemd credentials, a passphrase) is the node's concern.
//!
//! An encrypted database is opened through SQLite's own VFS, not through
//! [`crate::page_checksums`]: SQLCipher already checks every page it reads against its
//! HMAC, which a flipped bit fails as surely as a checksum (the read fails as corrupt, and
//! is recorded as damage as any other), and the page header byte the checksum VFS reads to
//! know whether a file carries checksums is ciphertext in an encrypted file.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The first 16 bytes of every plaintext SQLite database file. An encrypted one starts with
/// its random salt instead.
const PLAINTEXT_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// A 256-bit data key. Never printed; zeroed when dropped.
pub struct DataKey([u8; 32]);

#[derive(Debug, thiserror::Error)]
pub enum DataKeyError {
    #[error("a data key is 64 hexadecimal digits (256 bits); this one is not")]
    Format,
    #[error("the system's random source failed ({0}); check /dev/urandom and getrandom(2)")]
    Randomness(String),
}

impl DataKey {
    /// A new random key.
    pub fn generate() -> Result<DataKey, DataKeyError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|error| DataKeyError::Randomness(error.to_string()))?;
        Ok(DataKey(bytes))
    }

    /// Reads a key from its hexadecimal text (surrounding white space ignored).
    pub fn from_hex(text: &str) -> Result<DataKey, DataKeyError> {
        let text = text.trim();
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).map_err(|_| DataKeyError::Format)?;
        Ok(DataKey(bytes))
    }

    /// Another copy of the key (each copy is zeroed when dropped).
    pub fn copy(&self) -> DataKey {
        DataKey(self.0)
    }

    /// The key as hexadecimal text, for writing to its file.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// A key of these bytes (derived from a passphrase by the node).
    pub fn from_bytes(bytes: [u8; 32]) -> DataKey {
        DataKey(bytes)
    }

    /// The key's bytes, for deriving other keys from it (sealed files' keys, a check).
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The value of `PRAGMA key`: the raw key, so SQLCipher derives no key from a passphrase.
    pub(crate) fn pragma_value(&self) -> String {
        format!("x'{}'", hex::encode_upper(self.0))
    }
}

impl DataKey {
    /// Whether `other` is the same key, compared in constant time.
    pub fn same_as(&self, other: &DataKey) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |differs, (a, b)| differs | (a ^ b))
            == 0
    }
}

/// The data key and, while a change of key (`caremesh rekey`) is unfinished, the key it
/// replaces: what a database or a sealed file may be encrypted with. Reading tries the
/// current key first; writing uses only the current key.
#[derive(Clone)]
pub struct DataKeys {
    current: Arc<DataKey>,
    previous: Option<Arc<DataKey>>,
}

impl DataKeys {
    /// One key, no change of key under way.
    pub fn new(current: Arc<DataKey>) -> DataKeys {
        DataKeys {
            current,
            previous: None,
        }
    }

    /// A change of key under way from `previous` to `current`.
    pub fn changing(current: Arc<DataKey>, previous: Arc<DataKey>) -> DataKeys {
        DataKeys {
            current,
            previous: Some(previous),
        }
    }

    /// The key everything is written with.
    pub fn current(&self) -> &Arc<DataKey> {
        &self.current
    }

    /// The key being replaced, while a change of key is under way.
    pub fn previous(&self) -> Option<&Arc<DataKey>> {
        self.previous.as_ref()
    }

    /// Whether both hold the same keys.
    pub fn same_as(&self, other: &DataKeys) -> bool {
        let previous_same = match (&self.previous, &other.previous) {
            (Some(mine), Some(theirs)) => mine.same_as(theirs),
            (None, None) => true,
            _ => false,
        };
        self.current.same_as(&other.current) && previous_same
    }

    /// The keys to try, in order: the current one, then the previous one.
    pub fn in_order(&self) -> impl Iterator<Item = &Arc<DataKey>> {
        std::iter::once(&self.current).chain(self.previous.iter())
    }
}

impl std::fmt::Debug for DataKeys {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("DataKeys")
            .field("changing", &self.previous.is_some())
            .finish()
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("DataKey(…)")
    }
}

impl Drop for DataKey {
    fn drop(&mut self) {
        for byte in &mut self.0 {
            // SAFETY: a valid, aligned, exclusive reference to a byte of this key; volatile so
            // that the zeroing of memory about to be freed is not optimised away.
            unsafe { std::ptr::write_volatile(byte, 0) };
        }
    }
}

/// A node's database: where it is and, when it is encrypted, its keys. Every connection to
/// it is opened through this, so none is opened without the key. Clones share their keys:
/// a change of key ([`Database::set_keys`]) reaches every connection opened after it,
/// whichever clone opens it (the view's per-request readers among them).
#[derive(Debug, Clone)]
pub struct Database {
    path: PathBuf,
    keys: Option<Arc<RwLock<DataKeys>>>,
}

impl Database {
    /// A database in plain text (tests, benchmarks and the simulator, and homes made
    /// without a data key).
    pub fn plain(path: impl Into<PathBuf>) -> Database {
        Database {
            path: path.into(),
            keys: None,
        }
    }

    /// A database encrypted with `key` (made encrypted if it does not exist yet).
    pub fn encrypted(path: impl Into<PathBuf>, key: Arc<DataKey>) -> Database {
        Database::with_keys(path, DataKeys::new(key))
    }

    /// A database encrypted with the current key of `keys`, or while a change of key is
    /// unfinished with the previous one.
    pub fn with_keys(path: impl Into<PathBuf>, keys: DataKeys) -> Database {
        Database {
            path: path.into(),
            keys: Some(Arc::new(RwLock::new(keys))),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current key, when the database is encrypted.
    pub fn key(&self) -> Option<Arc<DataKey>> {
        self.keys().map(|keys| keys.current().clone())
    }

    /// The keys in force now, when the database is encrypted.
    pub fn keys(&self) -> Option<DataKeys> {
        self.keys.as_ref().map(|keys| {
            keys.read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        })
    }

    /// Puts `keys` in force for every clone of this database: connections opened from now
    /// on try them. Panics on a plaintext database, which has no keys to change.
    pub fn set_keys(&self, keys: DataKeys) {
        let cell = self
            .keys
            .as_ref()
            .expect("only an encrypted database changes its keys");
        *cell
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = keys;
    }

    pub fn is_encrypted(&self) -> bool {
        self.keys.is_some()
    }

    /// Opens (creating if needed) for writing; see [`crate::Store::open`].
    pub fn open(&self) -> crate::Result<crate::Store> {
        crate::Store::open_database(self)
    }

    /// Opens an existing database for reading only; see [`crate::Store::open_read_only`].
    pub fn open_read_only(&self) -> crate::Result<crate::Store> {
        crate::Store::open_database_read_only(self)
    }
}

/// Opens with each key in force for `database` in turn until one is right: a database
/// part-way through a change of key is still under the previous one. Every other error is
/// returned at once. Where every key was wrong while a change of key was under way, or the
/// keys changed meanwhile, it tries again with the keys in force then: the change may have
/// committed between reading the keys and reading the first page (a reader that took the old
/// key alone just before the change began would otherwise fail, as would one that tried the
/// new key just before the commit and the old one just after).
pub(crate) fn open_with_any<T>(
    database: &Database,
    mut open: impl FnMut(&Arc<DataKey>) -> crate::Result<T>,
) -> crate::Result<T> {
    const ROUNDS: usize = 4;
    let mut keys = database.keys().expect("an encrypted database has keys");
    for round in 1..=ROUNDS {
        let mut wrong = None;
        for key in keys.in_order() {
            match open(key) {
                Err(error @ crate::StorageError::WrongKey { .. }) => wrong = Some(error),
                other => return other,
            }
        }
        let wrong = wrong.expect("there is always a current key");
        let now = database.keys().expect("an encrypted database has keys");
        if round == ROUNDS || (now.same_as(&keys) && now.previous().is_none()) {
            return Err(wrong);
        }
        keys = now;
    }
    unreachable!("the last round returns")
}

impl crate::Store {
    /// Re-encrypts the whole database under `new`: SQLCipher's `PRAGMA rekey` rewrites
    /// every page in one write transaction, so a crash leaves the database wholly under one
    /// key or the other. A reader already in a read transaction goes on reading its snapshot
    /// under the old key; a connection opened after the commit needs the new one, so put
    /// both in force ([`Database::set_keys`]) before calling this. Every page is then in the
    /// WAL until a checkpoint copies it back, which this asks for at once (a reader still on
    /// an old snapshot can hold part of it back until the next). Returns `false` when the
    /// database is already under `new`.
    pub fn rekey(&mut self, new: &Arc<DataKey>) -> crate::Result<bool> {
        assert!(
            !self.in_group(),
            "a change of key commits a transaction of its own"
        );
        let failed = |source| crate::StorageError::database(self.path.clone(), "rekey", source);
        let Some(current) = &self.key else {
            return Err(crate::StorageError::NotEncrypted {
                path: self.path.clone(),
            });
        };
        if current.same_as(new) {
            return Ok(false);
        }
        self.conn
            .pragma_update(None, "rekey", new.pragma_value())
            .map_err(failed)?;
        self.key = Some(new.clone());
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(failed)?;
        Ok(true)
    }
}

/// Encrypts the plaintext database at `path` with `key`, in place: exported into a new
/// encrypted file beside it, which is then renamed over it (see
/// `page_checksums::replace_database`). Nothing else may have the database open. A
/// database already encrypted with `key` (a run a crash cut short after the rename) is left
/// as it is. Returns whether it was encrypted now.
pub fn encrypt_in_place(path: &Path, key: &DataKey) -> crate::Result<bool> {
    let failed = |source| crate::StorageError::database(path.to_path_buf(), "encrypt", source);
    match file_kind(path).map_err(|source| crate::StorageError::Read {
        path: path.to_path_buf(),
        source,
    })? {
        FileKind::Encrypted => {
            // Opens only with this key: a wrong one is refused by name.
            drop(Database::encrypted(path, Arc::new(key.copy())).open_read_only()?);
            return Ok(false);
        }
        FileKind::New => {
            return Err(crate::StorageError::Read {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "there is no database to encrypt",
                ),
            });
        }
        FileKind::Plaintext => {}
    }
    crate::page_checksums::register();
    let vfs = crate::page_checksums::VFS_NAME;
    let fresh_path =
        crate::page_checksums::fresh_file_beside(path, ".encrypting").map_err(failed)?;
    let version = crate::page_checksums::checkpoint_for_export(path, vfs).map_err(failed)?;
    {
        let fresh = rusqlite::Connection::open(&fresh_path).map_err(failed)?;
        unlock(&fresh, key).map_err(failed)?;
        fresh
            .execute_batch("PRAGMA synchronous = FULL;")
            .map_err(failed)?;
        crate::page_checksums::export_from_plaintext(&fresh, path, version).map_err(failed)?;
    }
    crate::page_checksums::replace_database(path, &fresh_path).map_err(failed)?;
    Ok(true)
}

/// Copies the database `source` reads into a new file at `target`, encrypted with `key`:
/// SQLite's online backup in one step, so the copy is the database as one read transaction
/// saw it (a running node's writers go on meanwhile: in WAL mode a reader blocks no
/// writer), then checked with `PRAGMA quick_check` and synced. `target` must not exist.
pub fn back_up(source: &crate::Store, target: &Path, key: &DataKey) -> crate::Result<()> {
    let failed = |source| crate::StorageError::database(target.to_path_buf(), "back up", source);
    if target.exists() {
        return Err(crate::StorageError::Read {
            path: target.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a backup is never written over an existing file",
            ),
        });
    }
    {
        let mut copy = rusqlite::Connection::open(target).map_err(failed)?;
        unlock(&copy, key).map_err(failed)?;
        {
            let backup = rusqlite::backup::Backup::new(&source.conn, &mut copy).map_err(failed)?;
            // -1: every page in one step, one read transaction: never restarted by a write.
            // Busy only while another connection holds a lock a reader must wait for.
            let mut tries = 0;
            loop {
                match backup.step(-1).map_err(failed)? {
                    rusqlite::backup::StepResult::Done => break,
                    _ if tries < 200 => {
                        tries += 1;
                        std::thread::sleep(std::time::Duration::from_millis(50));
                    }
                    _ => {
                        return Err(crate::StorageError::Read {
                            path: target.to_path_buf(),
                            source: std::io::Error::new(
                                std::io::ErrorKind::WouldBlock,
                                "the database stayed locked for 10 s; try the backup again",
                            ),
                        });
                    }
                }
            }
        }
        let check: String = copy
            .query_row("PRAGMA quick_check", [], |row| row.get(0))
            .map_err(failed)?;
        if check != "ok" {
            return Err(crate::StorageError::Read {
                path: target.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("the copy fails its check ({check}); the backup was not made"),
                ),
            });
        }
        // The copy's journal is deleted as its last transaction ends: one file.
        copy.execute_batch("PRAGMA journal_mode = DELETE;")
            .map_err(failed)?;
    }
    std::fs::File::open(target)
        .and_then(|file| file.sync_all())
        .map_err(|source| crate::StorageError::Read {
            path: target.to_path_buf(),
            source,
        })?;
    Ok(())
}

/// What the first bytes of an existing database file say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileKind {
    /// Absent or empty: made as asked.
    New,
    Plaintext,
    /// Not plaintext SQLite: encrypted (or not a database at all).
    Encrypted,
}

pub(crate) fn file_kind(path: &Path) -> std::io::Result<FileKind> {
    use std::io::Read;
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(FileKind::New),
        Err(error) => return Err(error),
    };
    let mut head = [0u8; 16];
    let mut read = 0;
    while read < head.len() {
        match file.read(&mut head[read..])? {
            0 => break,
            n => read += n,
        }
    }
    Ok(match read {
        0 => FileKind::New,
        16 if &head == PLAINTEXT_MAGIC => FileKind::Plaintext,
        _ => FileKind::Encrypted,
    })
}

/// Gives `conn` its key and checks that it opens the file: the first statement on a
/// connection whose key is wrong fails with "file is not a database".
pub(crate) fn unlock(conn: &rusqlite::Connection, key: &DataKey) -> Result<(), rusqlite::Error> {
    give_key(conn, key)?;
    check_key(conn)
}

/// Gives `conn` its key, reading nothing yet.
pub(crate) fn give_key(conn: &rusqlite::Connection, key: &DataKey) -> Result<(), rusqlite::Error> {
    // SQLCipher would print each failed page check to standard error; the failure reaches
    // the caller as an error, which says what to do.
    conn.execute_batch("PRAGMA cipher_log_level = NONE;")?;
    // SQLCipher 4's default settings otherwise (page size, HMAC-SHA512, key derivation), so
    // that the `sqlcipher` shell opens the file with the key alone.
    conn.pragma_update(None, "key", key.pragma_value())
}

/// The first read on a keyed connection: "file is not a database" when its key is wrong.
pub(crate) fn check_key(conn: &rusqlite::Connection) -> Result<(), rusqlite::Error> {
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StorageError;

    /// An ingest-log row naming `file`: a row whose text the tests look for on disk.
    fn log_a_file_named(store: &crate::Store, file: &str) {
        store
            .conn
            .execute(
                "INSERT INTO ingests (at, file, outcome, summary) VALUES (1, ?1, 'accepted', '{}')",
                [file],
            )
            .unwrap();
    }

    fn files_hold(dir: &Path, marker: &[u8]) -> Vec<String> {
        let mut holding = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            if bytes.windows(marker.len()).any(|window| window == marker) {
                holding.push(path.display().to_string());
            }
        }
        holding
    }

    #[test]
    fn an_encrypted_database_and_its_wal_hold_no_plaintext_and_open_only_with_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let key = Arc::new(DataKey::generate().unwrap());
        let database = Database::encrypted(&path, key.clone());
        let marker = "MARKER-AT-REST-7c1e";
        {
            let store = database.open().unwrap();
            // Held open: the WAL is not checkpointed away before the files are searched.
            log_a_file_named(&store, marker);
            assert!(
                dir.path().join("node.db-wal").exists(),
                "the test would not see the WAL"
            );
            assert_eq!(
                files_hold(dir.path(), marker.as_bytes()),
                Vec::<String>::new()
            );
            let reader = database.open_read_only().unwrap();
            assert_eq!(reader.ingested_files().unwrap()[0].0, marker);
        }
        assert_eq!(file_kind(&path).unwrap(), FileKind::Encrypted);
        assert_eq!(
            files_hold(dir.path(), marker.as_bytes()),
            Vec::<String>::new()
        );

        // The same bytes under a plain name say what they are, and a wrong key changes
        // nothing.
        let before = std::fs::read(&path).unwrap();
        let error = Database::plain(&path).open().err().unwrap();
        assert!(matches!(error, StorageError::Encrypted { .. }), "{error}");
        let wrong = Database::encrypted(&path, Arc::new(DataKey::generate().unwrap()));
        let error = wrong.open().err().unwrap();
        assert!(matches!(error, StorageError::WrongKey { .. }), "{error}");
        let error = wrong.open_read_only().err().unwrap();
        assert!(matches!(error, StorageError::WrongKey { .. }), "{error}");
        assert_eq!(std::fs::read(&path).unwrap(), before, "nothing was written");
        let reopened = database.open().unwrap();
        assert_eq!(reopened.ingested_files().unwrap()[0].0, marker);
        assert!(reopened.stats().unwrap().database_bytes > 0);
        assert_eq!(reopened.integrity_problems().unwrap(), Vec::<String>::new());
    }

    #[test]
    fn a_plaintext_database_given_a_key_is_refused_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        drop(Database::plain(&path).open().unwrap());
        let before = std::fs::read(&path).unwrap();
        let key = Arc::new(DataKey::generate().unwrap());
        let error = Database::encrypted(&path, key).open().err().unwrap();
        assert!(
            matches!(error, StorageError::NotEncrypted { .. }),
            "{error}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn a_page_changed_on_disk_is_refused_as_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let key = Arc::new(DataKey::generate().unwrap());
        let database = Database::encrypted(&path, key);
        {
            let store = database.open().unwrap();
            for n in 0..2_000 {
                store
                    .conn
                    .execute(
                        "INSERT INTO ingests (at, file, outcome, summary) VALUES (?1, 'f', 'accepted', '{}')",
                        [n],
                    )
                    .unwrap();
            }
        }
        let mut bytes = std::fs::read(&path).unwrap();
        let page = 4096;
        let pages = bytes.len() / page;
        assert!(pages > 4);
        // A byte inside the last page, where the ingest log's newest rows are.
        bytes[(pages - 1) * page + 200] ^= 0x01;
        std::fs::write(&path, bytes).unwrap();
        let error = database
            .open_read_only()
            .and_then(|store| store.ingested_files().map(|_| ()))
            .expect_err("a changed page is not read as data");
        assert!(error.is_damage(), "{error}");
    }

    #[test]
    fn a_plaintext_database_is_encrypted_in_place_keeping_its_rows_and_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let marker = "MARKER-ENCRYPT-IN-PLACE-91d2";
        let version = {
            let store = Database::plain(&path).open().unwrap();
            log_a_file_named(&store, marker);
            store.schema_version().unwrap()
        };
        assert_eq!(files_hold(dir.path(), marker.as_bytes()).len(), 1);
        let key = Arc::new(DataKey::generate().unwrap());
        assert!(encrypt_in_place(&path, &key).unwrap(), "encrypted now");
        assert_eq!(file_kind(&path).unwrap(), FileKind::Encrypted);
        assert_eq!(
            files_hold(dir.path(), marker.as_bytes()),
            Vec::<String>::new(),
            "no plaintext copy is left in the folder"
        );
        let store = Database::encrypted(&path, key.clone()).open().unwrap();
        assert_eq!(store.ingested_files().unwrap()[0].0, marker);
        assert_eq!(store.schema_version().unwrap(), version);
        drop(store);
        assert!(!encrypt_in_place(&path, &key).unwrap(), "once");
        let other = DataKey::generate().unwrap();
        let error = encrypt_in_place(&path, &other).unwrap_err();
        assert!(matches!(error, StorageError::WrongKey { .. }), "{error}");
    }

    #[test]
    fn a_key_is_64_hex_digits_and_never_printed() {
        let key = DataKey::generate().unwrap();
        let text = key.to_hex();
        assert_eq!(text.len(), 64);
        assert_eq!(DataKey::from_hex(&format!("{text}\n")).unwrap().0, key.0);
        assert!(DataKey::from_hex("abc").is_err());
        assert!(!format!("{key:?}").contains(&text[..8]));
    }

    /// A change of key on the writer while readers read: a reader in a read transaction
    /// from before keeps its snapshot under the old key; a connection opened with both keys
    /// in force reads under whichever the database is under; afterwards the new key alone
    /// opens it, the old one is refused, and nothing written before or after is lost.
    #[test]
    fn rekey_moves_the_database_to_the_new_key_while_readers_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let old = Arc::new(DataKey::generate().unwrap());
        let new = Arc::new(DataKey::generate().unwrap());
        let database = Database::encrypted(&path, old.clone());
        let mut writer = database.open().unwrap();
        for n in 0..500 {
            log_a_file_named(&writer, &format!("before-{n}"));
        }
        let during = database.clone();
        during.set_keys(DataKeys::changing(new.clone(), old.clone()));
        // A reader reads one snapshot for its life (see `Store::open_read_only`).
        let reader = during.open_read_only().unwrap();
        assert_eq!(reader.ingested_files().unwrap().len(), 500);

        assert!(writer.rekey(&new).unwrap(), "rewritten");
        assert!(!writer.rekey(&new).unwrap(), "already under the new key");
        log_a_file_named(&writer, "after");
        // The snapshot from before the change, under the old key, reads on.
        assert_eq!(reader.ingested_files().unwrap().len(), 500);
        drop(reader);
        // Every clone sees the keys put in force: this one opens under the new key now.
        assert_eq!(
            database
                .open_read_only()
                .unwrap()
                .ingested_files()
                .unwrap()
                .len(),
            501
        );
        drop(writer);

        let only_new = Database::encrypted(&path, new.clone());
        let reopened = only_new.open().unwrap();
        assert_eq!(reopened.ingested_files().unwrap().len(), 501);
        assert_eq!(reopened.integrity_problems().unwrap(), Vec::<String>::new());
        drop(reopened);
        let only_old = Database::encrypted(&path, old);
        let error = only_old.open_read_only().err().unwrap();
        assert!(matches!(error, StorageError::WrongKey { .. }), "{error}");
    }

    /// The race a node's test caught under load: a reader took the keys in force (the old
    /// one alone) just before a change of key began, and read the first page just after it
    /// committed. It tries again with the keys in force then, and opens.
    #[test]
    fn a_reader_that_took_the_keys_before_a_change_committed_opens_with_the_keys_after() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let old = Arc::new(DataKey::generate().unwrap());
        let new = Arc::new(DataKey::generate().unwrap());
        let database = Database::encrypted(&path, old.clone());
        let mut writer = database.open().unwrap();
        log_a_file_named(&writer, "before");
        let mut tried = Vec::new();
        let reader = open_with_any(&database, |key| {
            if tried.is_empty() {
                // Between reading the keys and reading the first page, the change runs.
                database.set_keys(DataKeys::changing(new.clone(), old.clone()));
                assert!(writer.rekey(&new).unwrap());
                database.set_keys(DataKeys::new(new.clone()));
            }
            tried.push(key.same_as(&new));
            crate::Store::open_read_only_with(&path, Some(key))
        })
        .unwrap();
        assert_eq!(reader.ingested_files().unwrap().len(), 1);
        assert_eq!(tried, vec![false, true], "the old key, then the new one");

        // A key that is simply wrong is refused after one round.
        let wrong = Database::encrypted(&path, Arc::new(DataKey::generate().unwrap()));
        let mut attempts = 0;
        let error = open_with_any(&wrong, |key| {
            attempts += 1;
            crate::Store::open_read_only_with(&path, Some(key))
        })
        .err()
        .unwrap();
        assert!(matches!(error, StorageError::WrongKey { .. }), "{error}");
        assert_eq!(attempts, 1);
    }
}
