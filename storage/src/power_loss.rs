//! Power loss, for the simulator: a SQLite VFS that records what each write to a database
//! or its WAL overwrote until the file is next synced, so that a simulated machine crash
//! can take back every write the disk had not made durable, or keep a random part of them
//! (a torn write), as TigerBeetle's VOPR and redb's crash tests do. Production never opens a
//! store through it.
//!
//! The VFS forwards everything to SQLite's default VFS. A sync is made durable in the model
//! only (the simulator needs no real fsync), so simulated stores sync as production's do
//! (`synchronous = FULL`, and the engine's deferred group syncs through [`sync_wal`]) at no
//! cost. Used as: [`crate::Store::open_simulated`], then at a crash
//! [`cut_power`] before the connection is dropped (nothing after the cut reaches the files,
//! not even SQLite's checkpoint on close), then [`restore_after_power_loss`].

use crate::vfs_shim::vfs_below as real_vfs;
use caremesh_sync::rng::Rng;
use rusqlite::ffi;
use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

/// The VFS's name, for `Connection::open_with_flags_and_vfs`.
pub const VFS_NAME: &str = "caremesh-power-loss";

/// What a database file or WAL holds that its disk has not made durable.
#[derive(Default)]
struct Unsynced {
    /// Each write since the last sync, with the bytes it overwrote (zeros past the end).
    writes: Vec<(i64, Vec<u8>, usize)>,
    /// The file's length when it was last synced.
    synced_len: i64,
    /// The power is off: writes, syncs and deletes no longer reach the disk.
    off: bool,
    /// The power goes off at this many more writes, truncations or syncs of the database or
    /// its WAL (shared by both; kept on the database's entry).
    cut_after: Option<u64>,
    /// The power goes off at the next [`sync_wal`] (kept on the database's entry).
    cut_at_wal_sync: bool,
}

/// Files whose power is off now: while none is, [`power_is_off`] answers without looking a
/// path up (the simulator asks after every step of every node).
static FILES_OFF: AtomicUsize = AtomicUsize::new(0);

fn files() -> MutexGuard<'static, HashMap<String, Unsynced>> {
    static FILES: OnceLock<Mutex<HashMap<String, Unsynced>>> = OnceLock::new();
    FILES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a power cut took back.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PowerLoss {
    /// Writes not yet synced, lost.
    pub lost_writes: u64,
    /// Writes not yet synced that reached the disk all the same (with tearing only).
    pub kept_writes: u64,
}

/// Cuts the power to the database at `db`: from now on nothing written to it or its WAL
/// reaches the disk. Call before dropping its connections.
pub fn cut_power(db: &Path) {
    let mut files = files();
    for key in keys(db) {
        if let Some(file) = files.get_mut(&key) {
            turn_off(file);
        }
    }
}

/// Cuts the power to the database at `db` in the middle of what it does next: at its
/// `operations`-th next write, truncation or sync (of the database or its WAL), which does
/// not reach the disk, nor anything after it. The simulator sees [`power_is_off`] and stops
/// the node there, before anything it did since leaves it.
pub fn cut_power_after(db: &Path, operations: u64) {
    assert!(operations > 0, "a cut comes at an operation still to come");
    let [database, _] = keys(db);
    if let Some(file) = files().get_mut(&database) {
        file.cut_after = Some(operations);
    }
}

/// Whether the power to the database at `db` is off.
pub fn power_is_off(db: &Path) -> bool {
    if FILES_OFF.load(Ordering::Relaxed) == 0 {
        return false;
    }
    let [database, _] = keys(db);
    files().get(&database).is_some_and(|file| file.off)
}

/// Cuts the power to the database at `db` in the next [`sync_wal`] of its WAL, which does
/// not reach the disk: the commits it was to make durable are lost.
pub fn cut_power_at_next_wal_sync(db: &Path) {
    let [database, _] = keys(db);
    if let Some(file) = files().get_mut(&database) {
        file.cut_at_wal_sync = true;
    }
}

/// Syncs the WAL named `wal` (its full path), as a thread other than SQLite's may
/// (`fdatasync` on a descriptor of its own): every write made to it so far becomes durable in
/// the model. Nothing while the power is off; it counts towards an armed cut
/// ([`cut_power_after`]), which may strike in it, so that it does not reach the disk.
pub fn sync_wal(wal: &Path) {
    let key = wal.to_string_lossy();
    let mut files = files();
    let database = key.strip_suffix("-wal").unwrap_or(&key);
    if let Some(entry) = files.get_mut(database)
        && std::mem::take(&mut entry.cut_at_wal_sync)
    {
        turn_off_database(&mut files, database);
        return;
    }
    if powered_off_by(&mut files, &key) {
        return;
    }
    let Some(file) = files.get_mut(key.as_ref()) else {
        return;
    };
    file.writes.clear();
    file.synced_len = std::fs::metadata(wal).map_or(0, |meta| meta.len() as i64);
}

/// Counts one operation on the file `key` towards an armed cut; true once the power is off
/// (this operation does not reach the disk).
fn powered_off_by(files: &mut HashMap<String, Unsynced>, key: &str) -> bool {
    let database = key.strip_suffix("-wal").unwrap_or(key);
    let Some(entry) = files.get_mut(database) else {
        return false;
    };
    if entry.off {
        return true;
    }
    let Some(left) = entry.cut_after.as_mut() else {
        return false;
    };
    *left -= 1;
    if *left > 0 {
        return false;
    }
    entry.cut_after = None;
    turn_off_database(files, database);
    true
}

/// Turns the power off for the database keyed `database` and its WAL.
fn turn_off_database(files: &mut HashMap<String, Unsynced>, database: &str) {
    for key in [database.to_string(), format!("{database}-wal")] {
        if let Some(file) = files.get_mut(&key) {
            turn_off(file);
        }
    }
}

fn turn_off(file: &mut Unsynced) {
    if !file.off {
        file.off = true;
        FILES_OFF.fetch_add(1, Ordering::Relaxed);
    }
}

/// Puts the database at `db` and its WAL back as the disk held them when the power was cut:
/// every write not synced is lost, or with `tear`, each is kept or lost by chance; the
/// shared-memory index (never durable) is removed. Call once every connection is dropped.
pub fn restore_after_power_loss(
    db: &Path,
    mut tear: Option<&mut Rng>,
) -> std::io::Result<PowerLoss> {
    use std::os::unix::fs::FileExt;
    let mut loss = PowerLoss::default();
    let taken: Vec<(String, Unsynced)> = {
        let mut files = files();
        let taken: Vec<(String, Unsynced)> = keys(db)
            .into_iter()
            .filter_map(|key| files.remove(&key).map(|file| (key, file)))
            .collect();
        let off = taken.iter().filter(|(_, file)| file.off).count();
        FILES_OFF.fetch_sub(off, Ordering::Relaxed);
        taken
    };
    for (path, file) in taken {
        assert!(
            file.off,
            "the power to {path} was cut before it is restored"
        );
        let handle = std::fs::OpenOptions::new().write(true).open(&path)?;
        let mut len = file.synced_len;
        // Newest first, so that where writes overlap the oldest bytes are what remain.
        for (offset, old, new_len) in file.writes.iter().rev() {
            let kept = tear.as_deref_mut().is_some_and(|rng| rng.chance(0.5));
            if kept {
                loss.kept_writes += 1;
                len = len.max(offset + *new_len as i64);
            } else {
                loss.lost_writes += 1;
                handle.write_all_at(old, *offset as u64)?;
            }
        }
        handle.set_len(len as u64)?;
    }
    let shm = sibling(db, "-shm");
    if shm.exists() {
        std::fs::remove_file(shm)?;
    }
    Ok(loss)
}

/// Flips one bit of a random page of the database file at `db` (no connection may have it
/// open): damage at rest, as a failing disk or a bad copy does. Returns the byte offset
/// changed, or `None` for an empty file.
pub fn flip_a_bit_at_rest(db: &Path, rng: &mut Rng) -> std::io::Result<Option<u64>> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(db)?;
    let mut header = [0u8; 18];
    if file.read_exact_at(&mut header, 0).is_err() {
        return Ok(None);
    }
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65536,
        size => u64::from(size),
    };
    let pages = file.metadata()?.len() / page_size.max(1);
    if pages == 0 {
        return Ok(None);
    }
    let at = rng.below(pages) * page_size + rng.below(page_size);
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, at)?;
    byte[0] ^= 1 << rng.below(8);
    file.write_all_at(&byte, at)?;
    Ok(Some(at))
}

/// The keys SQLite names the database and its WAL by: full paths.
fn keys(db: &Path) -> [String; 2] {
    let full = std::fs::canonicalize(db).unwrap_or_else(|_| db.to_path_buf());
    [
        full.to_string_lossy().into_owned(),
        sibling(&full, "-wal").to_string_lossy().into_owned(),
    ]
}

fn sibling(db: &Path, suffix: &str) -> PathBuf {
    let mut name = db.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// Registers the VFS (once per process).
pub fn register() {
    static REGISTERED: OnceLock<()> = OnceLock::new();
    REGISTERED.get_or_init(|| {
        // SAFETY: sqlite3_vfs_find(NULL) returns the default VFS, which lives as long as the
        // process. The VFS made from it is leaked, as SQLite requires a registered VFS to
        // outlive every connection; it is registered once.
        unsafe {
            crate::vfs_shim::register::<ShimFile>(
                ffi::sqlite3_vfs_find(std::ptr::null()),
                c"caremesh-power-loss",
                shim_open,
                shim_delete,
            );
        }
    });
}

/// SQLite's file handle for this VFS: the real VFS's handle follows it in the same block.
#[repr(C)]
struct ShimFile {
    base: ffi::sqlite3_file,
    real: *mut ffi::sqlite3_file,
    /// The tracked file's key (a database or a WAL), or null.
    key: *mut String,
}

unsafe fn shim(file: *mut ffi::sqlite3_file) -> &'static mut ShimFile {
    // SAFETY: every file this VFS opens is a ShimFile (xOpen wrote it).
    unsafe { crate::vfs_shim::handle(file) }
}

unsafe fn real_methods(file: &ShimFile) -> &'static ffi::sqlite3_io_methods {
    // SAFETY: the real file was opened successfully (else no method is called).
    unsafe { crate::vfs_shim::methods_of(file.real) }
}

unsafe extern "C" fn shim_open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    // SAFETY: SQLite hands a block of szOsFile bytes; the real handle follows the ShimFile.
    unsafe {
        let real_vfs = real_vfs(vfs);
        let real = crate::vfs_shim::file_below::<ShimFile>(file);
        std::ptr::write(
            file.cast::<ShimFile>(),
            ShimFile {
                base: ffi::sqlite3_file {
                    pMethods: std::ptr::null(),
                },
                real,
                key: std::ptr::null_mut(),
            },
        );
        let rc = ((*real_vfs).xOpen.expect("the default VFS opens files"))(
            real_vfs, name, real, flags, out_flags,
        );
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        let tracked = flags & (ffi::SQLITE_OPEN_MAIN_DB | ffi::SQLITE_OPEN_WAL) != 0;
        if tracked && !name.is_null() {
            let key = CStr::from_ptr(name).to_string_lossy().into_owned();
            let mut size: i64 = 0;
            ((*(*real).pMethods).xFileSize.expect("files have a size"))(real, &mut size);
            files().entry(key.clone()).or_insert_with(|| Unsynced {
                synced_len: size,
                ..Default::default()
            });
            (*file.cast::<ShimFile>()).key = Box::into_raw(Box::new(key));
        }
        (*file).pMethods = &SHIM_METHODS;
        rc
    }
}

unsafe extern "C" fn shim_delete(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    sync_dir: c_int,
) -> c_int {
    // SAFETY: name is a NUL-terminated path from SQLite.
    unsafe {
        let key = CStr::from_ptr(name).to_string_lossy().into_owned();
        {
            let mut files = files();
            if files.get(&key).is_some_and(|f| f.off) {
                // The power is off: the file stays as the cut left it.
                return ffi::SQLITE_OK;
            }
            files.remove(&key);
        }
        let real_vfs = real_vfs(vfs);
        ((*real_vfs).xDelete.expect("the default VFS deletes"))(real_vfs, name, sync_dir)
    }
}

// Methods that only forward to the real file: the shared-memory index is not durable and
// not modelled, and reads, sizes and locks change nothing on the disk.
crate::vfs_shim::forward_to_below! {
    shim, real_methods, real;
    shim_read => xRead(buffer: *mut c_void, amount: c_int, offset: i64) -> c_int;
    shim_file_size => xFileSize(size: *mut i64) -> c_int;
    shim_lock => xLock(level: c_int) -> c_int;
    shim_unlock => xUnlock(level: c_int) -> c_int;
    shim_check_reserved_lock => xCheckReservedLock(out: *mut c_int) -> c_int;
    shim_file_control => xFileControl(op: c_int, argument: *mut c_void) -> c_int;
    shim_sector_size => xSectorSize() -> c_int;
    shim_device_characteristics => xDeviceCharacteristics() -> c_int;
    shim_shm_map => xShmMap(region: c_int, size: c_int, extend: c_int, out: *mut *mut c_void) -> c_int;
    shim_shm_lock => xShmLock(offset: c_int, count: c_int, flags: c_int) -> c_int;
    shim_shm_barrier => xShmBarrier() -> ();
    shim_shm_unmap => xShmUnmap(delete: c_int) -> c_int;
}

static SHIM_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(shim_close),
    xRead: Some(shim_read),
    xWrite: Some(shim_write),
    xTruncate: Some(shim_truncate),
    xSync: Some(shim_sync),
    xFileSize: Some(shim_file_size),
    xLock: Some(shim_lock),
    xUnlock: Some(shim_unlock),
    xCheckReservedLock: Some(shim_check_reserved_lock),
    xFileControl: Some(shim_file_control),
    xSectorSize: Some(shim_sector_size),
    xDeviceCharacteristics: Some(shim_device_characteristics),
    xShmMap: Some(shim_shm_map),
    xShmLock: Some(shim_shm_lock),
    xShmBarrier: Some(shim_shm_barrier),
    xShmUnmap: Some(shim_shm_unmap),
    // Memory-mapped reads would bypass this shim: refused, so SQLite reads instead.
    xFetch: Some(crate::vfs_shim::refuse_fetch),
    xUnfetch: Some(crate::vfs_shim::nothing_to_unfetch),
};

/// Runs `with` on the tracked file's state, if the file is tracked, after counting the
/// operation towards an armed power cut (which may turn the power off).
fn tracked<T>(file: &ShimFile, with: impl FnOnce(&mut Unsynced) -> T) -> Option<T> {
    if file.key.is_null() {
        return None;
    }
    // SAFETY: a non-null key was made by Box::into_raw in xOpen and lives until xClose.
    let key = unsafe { &*file.key };
    let mut files = files();
    powered_off_by(&mut files, key);
    files.get_mut(key).map(with)
}

unsafe extern "C" fn shim_close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: closes the real file once; the key box is dropped once.
    unsafe {
        let shim = shim(file);
        let rc = (real_methods(shim).xClose.expect("files close"))(shim.real);
        if !shim.key.is_null() {
            drop(Box::from_raw(shim.key));
            shim.key = std::ptr::null_mut();
        }
        rc
    }
}

/// Runs `remember` on a tracked file before a change reaches it. `Some(code)` when the change
/// must not reach the disk: the power is off (`SQLITE_OK`: the write vanishes, as it would)
/// or remembering failed.
fn before_change(
    file: &ShimFile,
    remember: impl FnOnce(&mut Unsynced) -> Result<(), c_int>,
) -> Option<c_int> {
    let outcome = tracked(file, |state| {
        if state.off {
            Err(ffi::SQLITE_OK)
        } else {
            remember(state)
        }
    });
    match outcome {
        Some(Err(rc)) => Some(rc),
        _ => None,
    }
}

/// Keeps the `amount` bytes at `offset` that a write (of `written` bytes there) or a
/// truncation (`written` 0) is about to change, so that a power cut can put them back. Bytes
/// past the end read as zeros.
///
/// # Safety
/// `real` is the open real file whose methods `methods` are.
unsafe fn remember_before(
    methods: &ffi::sqlite3_io_methods,
    real: *mut ffi::sqlite3_file,
    state: &mut Unsynced,
    offset: i64,
    amount: usize,
    written: usize,
) -> Result<(), c_int> {
    let mut old = vec![0u8; amount];
    let read = methods.xRead.expect("files read");
    // SAFETY: `old` holds `amount` bytes; `real` is open (the caller's promise).
    let rc = unsafe { read(real, old.as_mut_ptr().cast(), amount as c_int, offset) };
    if rc != ffi::SQLITE_OK && rc != ffi::SQLITE_IOERR_SHORT_READ {
        return Err(rc);
    }
    state.writes.push((offset, old, written));
    Ok(())
}

unsafe extern "C" fn shim_write(
    file: *mut ffi::sqlite3_file,
    buffer: *const c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: remembers what the write overwrites, then forwards it to the open real file.
    unsafe {
        let shim = shim(file);
        let (methods, real) = (real_methods(shim), shim.real);
        let stopped = before_change(shim, |state| {
            let amount = amount as usize;
            remember_before(methods, real, state, offset, amount, amount)
        });
        if let Some(rc) = stopped {
            return rc;
        }
        (methods.xWrite.expect("files write"))(real, buffer, amount, offset)
    }
}

unsafe extern "C" fn shim_truncate(file: *mut ffi::sqlite3_file, size: i64) -> c_int {
    // SAFETY: remembers the bytes a truncation cuts off, then forwards it.
    unsafe {
        let shim = shim(file);
        let (methods, real) = (real_methods(shim), shim.real);
        let stopped = before_change(shim, |state| {
            let mut current: i64 = 0;
            (methods.xFileSize.expect("files have a size"))(real, &mut current);
            if size >= current {
                return Ok(());
            }
            remember_before(methods, real, state, size, (current - size) as usize, 0)
        });
        if let Some(rc) = stopped {
            return rc;
        }
        (methods.xTruncate.expect("files truncate"))(real, size)
    }
}

unsafe extern "C" fn shim_sync(file: *mut ffi::sqlite3_file, _flags: c_int) -> c_int {
    // SAFETY: reads the real file's size; makes no real fsync (the model is the disk).
    unsafe {
        let shim = shim(file);
        let methods = real_methods(shim);
        let real = shim.real;
        tracked(shim, |state| {
            if state.off {
                return;
            }
            let mut size: i64 = 0;
            (methods.xFileSize.expect("files have a size"))(real, &mut size);
            state.writes.clear();
            state.synced_len = size;
        });
        ffi::SQLITE_OK
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;

    fn count(store: &Store) -> i64 {
        store.feed_tip().unwrap() as i64
    }

    /// A simulated store in `dir` with one document committed: its path, the store and the
    /// feed tip that commit left.
    fn one_commit(dir: &Path) -> (PathBuf, Store, i64) {
        let db = dir.join("node.db");
        let mut store = Store::open_simulated(&db, 1).unwrap();
        crate::tests::stored(&mut store, &[crate::tests::item("a/1")], 1);
        let committed = count(&store);
        assert!(committed > 0);
        (db, store, committed)
    }

    /// Drops `store` after the power went, restores its files and opens them again.
    fn reopen_after_cut(db: &Path, store: Store, tear: Option<&mut Rng>) -> Store {
        drop(store);
        restore_after_power_loss(db, tear).unwrap();
        Store::open_simulated(db, 2).unwrap()
    }

    /// What was committed (synced) survives a power cut; what a transaction wrote without
    /// committing is gone, also with the WAL torn at random, and SQLite opens the database.
    #[test]
    fn a_power_cut_keeps_what_was_synced_and_nothing_else() {
        for seed in 0..8u64 {
            let dir = tempfile::tempdir().unwrap();
            let (db, mut store, committed) = one_commit(dir.path());
            // A transaction under way at the cut: written to the WAL, never committed.
            store.begin_group();
            crate::tests::stored(&mut store, &[crate::tests::item("a/2")], 2);
            cut_power(&db);
            let mut rng = Rng::new(seed);
            let tear = (seed % 2 == 1).then_some(&mut rng);
            let store = reopen_after_cut(&db, store, tear);
            assert_eq!(count(&store), committed, "seed {seed}");
        }
    }

    /// A cut in the middle of a commit (at its first, second, … write or sync): SQLite
    /// believes the commit made, but the disk has only what was synced before it, torn or
    /// not, and the database opens at the last whole commit.
    #[test]
    fn a_power_cut_in_the_middle_of_a_commit_leaves_the_last_whole_commit() {
        for operations in 1..6u64 {
            let dir = tempfile::tempdir().unwrap();
            let (db, mut store, committed) = one_commit(dir.path());
            cut_power_after(&db, operations);
            crate::tests::stored(&mut store, &[crate::tests::item("a/2")], 2);
            assert!(power_is_off(&db), "the cut came within the commit");
            let store = reopen_after_cut(&db, store, Some(&mut Rng::new(operations)));
            assert_eq!(count(&store), committed, "cut at operation {operations}");
            assert!(!power_is_off(&db), "the power is back");
        }
    }

    /// Without syncs (synchronous = OFF) a power cut loses what was committed: the model is
    /// strict enough to catch a store that acknowledges before its disk has the write.
    #[test]
    fn without_syncs_a_power_cut_loses_committed_writes() {
        let dir = tempfile::tempdir().unwrap();
        let (db, mut store, before) = one_commit(dir.path());
        store.without_fsync().unwrap();
        crate::tests::stored(&mut store, &[crate::tests::item("a/2")], 2);
        assert!(count(&store) > before);
        cut_power(&db);
        drop(store);
        let loss = restore_after_power_loss(&db, None).unwrap();
        assert!(loss.lost_writes > 0);
        let store = Store::open_simulated(&db, 2).unwrap();
        assert_eq!(count(&store), before);
        // The positions after `before` will be handed out again: the epoch they were taken
        // in ended at `before`, so a peer that took them is served again from there.
        use caremesh_sync::session::EpochEnd;
        assert_eq!(store.feed_epoch().unwrap(), 2);
        assert_eq!(
            store.feed_epoch_end(1).unwrap(),
            EpochEnd::EndedAt(before as u64)
        );
        assert_eq!(store.feed_epoch_end(2).unwrap(), EpochEnd::Current);
        assert_eq!(store.feed_epoch_end(77).unwrap(), EpochEnd::Unknown);
    }

    /// A group commit that defers its sync is lost to a power cut until the WAL is synced by
    /// a [`crate::WalSyncer`], and kept once it is; commits outside groups still wait for the
    /// disk.
    #[test]
    fn a_deferred_group_commit_is_durable_once_its_wal_is_synced() {
        for sync_before_the_cut in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (db, mut store, before) = one_commit(dir.path());
            store.defer_group_syncs();
            store.begin_group();
            crate::tests::stored(&mut store, &[crate::tests::item("a/2")], 2);
            assert!(store.end_group().unwrap(), "the group wrote");
            let committed = count(&store);
            assert!(committed > before);
            if sync_before_the_cut {
                store.wal_syncer().sync().unwrap();
            }
            cut_power(&db);
            let store = reopen_after_cut(&db, store, None);
            let expected = if sync_before_the_cut {
                committed
            } else {
                before
            };
            assert_eq!(count(&store), expected, "synced: {sync_before_the_cut}");
        }
        // Outside a group, a commit waits for the disk as before.
        let dir = tempfile::tempdir().unwrap();
        let (db, mut store, before) = one_commit(dir.path());
        store.defer_group_syncs();
        store.begin_group();
        crate::tests::stored(&mut store, &[crate::tests::item("a/2")], 2);
        store.end_group().unwrap();
        crate::tests::stored(&mut store, &[crate::tests::item("a/3")], 3);
        let committed = count(&store);
        assert!(committed > before);
        cut_power(&db);
        let store = reopen_after_cut(&db, store, None);
        assert_eq!(
            count(&store),
            committed,
            "the full commit synced the group's too"
        );
    }
}
