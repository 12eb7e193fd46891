//! Page checksums: a SQLite VFS shim that keeps an 8-byte checksum in the reserved bytes at
//! the end of every page of the database file, written with the page and verified whenever
//! the page is read from the file. A page the disk changed behind SQLite's back
//! (bit rot, a misdirected write, a copy gone wrong) then fails its read with
//! `SQLITE_IOERR_DATA` instead of being served: SQLite itself notices only damage to the
//! b-tree's structure, and a flipped byte inside a row would otherwise reach a clinician's
//! screen as data. The checksum is SQLite's own `cksumvfs` extension's (the same layout, so
//! its `verify_checksum()` reads these files), written here in Rust over the default VFS,
//! or over the simulator's power-loss VFS.
//!
//! Only the database file carries them. SQLite checksums each WAL frame itself, over the page
//! as it was before the VFS sees it: a page checksum written into a WAL frame would break the
//! frame's own checksum, and SQLite would drop the frame (and every later one) when it
//! recovers the WAL after a crash. Pages in the WAL are covered by SQLite's frame checksums
//! when the WAL is recovered; a checkpoint copies them into the database file, and the
//! checksum is written then. The WAL is short-lived (checkpointed and truncated), the
//! database file is where a page rests for years.
//!
//! Checksums are on for a database whose header reserves 8 bytes per page (byte 20);
//! [`crate::Store::open`] reserves them for a new database and rewrites an older one once
//! (VACUUM). The flag is read from page 1 whenever it passes (from the database file or the
//! WAL), so a database without the reserved bytes is read and written as before.
//!
//! Each damaged read is recorded against the database's path, as is every error in which
//! SQLite found the file malformed ([`record_damage`]): [`damage_found`] lets the sync engine
//! stop the node with the reason even where the error reached it as a message only.

use rusqlite::ffi;
use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

/// The VFS over SQLite's default VFS (production stores).
pub const VFS_NAME: &str = "caremesh-checksums";
/// The VFS over the simulator's power-loss VFS ([`crate::power_loss`]).
pub const SIMULATED_VFS_NAME: &str = "caremesh-checksums-power-loss";
/// Bytes reserved at the end of each page for its checksum.
pub const RESERVED_BYTES: c_int = 8;

/// Damaged databases: full path → what was found (the first few findings).
fn damaged() -> MutexGuard<'static, HashMap<String, Vec<String>>> {
    static DAMAGED: OnceLock<Mutex<HashMap<String, Vec<String>>>> = OnceLock::new();
    DAMAGED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Findings so far in this process: while none, [`damage_found`] looks nothing up.
static FINDINGS: AtomicUsize = AtomicUsize::new(0);

/// Findings kept per database: the first tell the operator where to look.
const FINDINGS_KEPT: usize = 8;

/// Records that the database at `db` is damaged: `what` says how it was found.
pub fn record_damage(db: &Path, what: String) {
    let full = std::fs::canonicalize(db).unwrap_or_else(|_| db.to_path_buf());
    record_damage_of(full.to_string_lossy().into_owned(), what);
}

fn record_damage_of(full_path: String, what: String) {
    let mut damaged = damaged();
    let findings = damaged.entry(full_path).or_default();
    if findings.len() < FINDINGS_KEPT && !findings.contains(&what) {
        findings.push(what);
    }
    FINDINGS.fetch_add(1, Ordering::Relaxed);
}

/// What this process found damaged in the database at `db`, as a sentence for an operator;
/// `None` when nothing was.
pub fn damage_found(db: &Path) -> Option<String> {
    if FINDINGS.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let full = std::fs::canonicalize(db).unwrap_or_else(|_| db.to_path_buf());
    damage_found_at(&full.to_string_lossy())
}

/// [`damage_found`] for a database's full path (as SQLite names it): asked after every turn
/// of the sync engine, so it looks nothing up on the file system.
pub fn damage_found_at(full_path: &str) -> Option<String> {
    if FINDINGS.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let damaged = damaged();
    let findings = damaged.get(full_path).filter(|f| !f.is_empty())?;
    Some(format!("{full_path} is damaged: {}", findings.join("; ")))
}

/// SQLite's `cksumvfs` checksum of `content` (a multiple of 8 bytes): two running sums over
/// little-endian 32-bit words.
fn checksum(content: &[u8]) -> [u8; 8] {
    debug_assert!(content.len() >= 8 && content.len().is_multiple_of(8));
    let (mut s1, mut s2) = (0u32, 0u32);
    for pair in content.chunks_exact(8) {
        let a = u32::from_le_bytes(pair[..4].try_into().expect("4 bytes"));
        let b = u32::from_le_bytes(pair[4..].try_into().expect("4 bytes"));
        s1 = s1.wrapping_add(a).wrapping_add(s2);
        s2 = s2.wrapping_add(b).wrapping_add(s1);
    }
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&s1.to_le_bytes());
    out[4..].copy_from_slice(&s2.to_le_bytes());
    out
}

/// Whether `page` (a whole page) carries the right checksum in its last 8 bytes.
pub fn page_is_intact(page: &[u8]) -> bool {
    let (content, stored) = page.split_at(page.len() - 8);
    checksum(content) == stored
}

/// A read or write of `amount` bytes is a whole page: a power of two from 512 to 65536.
fn is_whole_page(amount: c_int) -> bool {
    (512..=65536).contains(&amount) && (amount & (amount - 1)) == 0
}

/// Whether `bytes` begin page 1 of a database: its header, whose byte 20 is the number of
/// bytes reserved per page. No other page can begin so (a b-tree page begins with its type,
/// an overflow or freelist page with a page number far beyond any file).
fn reserve_in_header(bytes: &[u8]) -> Option<u8> {
    (bytes.len() >= 100 && bytes.starts_with(b"SQLite format 3\0")).then(|| bytes[20])
}

/// Registers both VFSs (once per process); the simulator's only once the power-loss VFS is.
pub fn register() {
    static DEFAULT: OnceLock<()> = OnceLock::new();
    DEFAULT.get_or_init(|| {
        // SAFETY: sqlite3_vfs_find(NULL) returns the default VFS, which lives as long as the
        // process.
        unsafe {
            register_over(
                ffi::sqlite3_vfs_find(std::ptr::null()),
                c"caremesh-checksums",
            )
        }
    });
}

/// Registers [`SIMULATED_VFS_NAME`] over the power-loss VFS (once per process).
pub fn register_simulated() {
    crate::power_loss::register();
    static SIMULATED: OnceLock<()> = OnceLock::new();
    SIMULATED.get_or_init(|| {
        // SAFETY: the power-loss VFS is registered (above) and never unregistered.
        unsafe {
            register_over(
                ffi::sqlite3_vfs_find(c"caremesh-power-loss".as_ptr()),
                c"caremesh-checksums-power-loss",
            )
        }
    });
}

/// # Safety
/// `below` is a registered VFS that outlives the process; called once per name.
unsafe fn register_over(below: *mut ffi::sqlite3_vfs, name: &'static CStr) {
    // SAFETY: the caller's promise.
    unsafe { crate::vfs_shim::register::<ChecksumFile>(below, name, checked_open, checked_delete) }
}

/// What a file is to this VFS.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Database,
    Wal,
    /// Journals and temporary files: passed through.
    Other,
}

/// SQLite's file handle for this VFS: the handle of the VFS below follows it in one block.
#[repr(C)]
struct ChecksumFile {
    base: ffi::sqlite3_file,
    below: *mut ffi::sqlite3_file,
    role: Role,
    /// For a WAL, its database's handle, whose flags it uses.
    database: *mut ChecksumFile,
    /// The database reserves 8 bytes per page: checksums are written and verified.
    checksums: bool,
    /// The file's full path (for reports), or null.
    name: *mut String,
}

impl ChecksumFile {
    /// Page 1 passing through (`bytes` at `offset` of a file in `role`) says whether the
    /// database reserves the checksum's bytes: checksums are on exactly when it does.
    fn note_header(&mut self, role: Role, bytes: &[u8], offset: i64) {
        if let Some(reserve) = reserve_in_header(bytes).filter(|_| offset == 0 || role == Role::Wal)
        {
            self.checksums = i32::from(reserve) == RESERVED_BYTES;
        }
    }

    /// The handle whose flags apply: a WAL's database, or the file itself.
    fn flags(&mut self) -> &mut ChecksumFile {
        if self.database.is_null() {
            self
        } else {
            // SAFETY: a WAL is closed before its database (SQLite's order), so the pointer
            // set at open is live while the WAL is.
            unsafe { &mut *self.database }
        }
    }
}

unsafe fn file_of(file: *mut ffi::sqlite3_file) -> &'static mut ChecksumFile {
    // SAFETY: every file this VFS gives methods to is a ChecksumFile (xOpen wrote it).
    unsafe { crate::vfs_shim::handle(file) }
}

unsafe fn below_methods(file: &ChecksumFile) -> &'static ffi::sqlite3_io_methods {
    // SAFETY: the file below was opened successfully (else no method is called).
    unsafe { crate::vfs_shim::methods_of(file.below) }
}

unsafe extern "C" fn checked_open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    // SAFETY: SQLite hands a block of szOsFile bytes; the handle below follows ours.
    unsafe {
        let below_vfs = crate::vfs_shim::vfs_below(vfs);
        let below = crate::vfs_shim::file_below::<ChecksumFile>(file);
        let role = if flags & ffi::SQLITE_OPEN_MAIN_DB != 0 {
            Role::Database
        } else if flags & ffi::SQLITE_OPEN_WAL != 0 {
            Role::Wal
        } else {
            Role::Other
        };
        std::ptr::write(
            file.cast::<ChecksumFile>(),
            ChecksumFile {
                base: ffi::sqlite3_file {
                    pMethods: std::ptr::null(),
                },
                below,
                role,
                database: std::ptr::null_mut(),
                checksums: false,
                name: std::ptr::null_mut(),
            },
        );
        let rc = ((*below_vfs).xOpen.expect("the VFS below opens files"))(
            below_vfs, name, below, flags, out_flags,
        );
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        let this = file_of(file);
        if role != Role::Other && !name.is_null() {
            this.name = Box::into_raw(Box::new(
                CStr::from_ptr(name).to_string_lossy().into_owned(),
            ));
        }
        if role == Role::Wal && !name.is_null() {
            this.database = ffi::sqlite3_database_file_object(name).cast();
        }
        (*file).pMethods = &CHECKED_METHODS;
        rc
    }
}

unsafe extern "C" fn checked_delete(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    sync_dir: c_int,
) -> c_int {
    // SAFETY: forwards SQLite's arguments to the VFS below.
    unsafe {
        let below = crate::vfs_shim::vfs_below(vfs);
        ((*below).xDelete.expect("the VFS below deletes"))(below, name, sync_dir)
    }
}

crate::vfs_shim::forward_to_below! {
    file_of, below_methods, below;
    checked_truncate => xTruncate(size: i64) -> c_int;
    checked_sync => xSync(flags: c_int) -> c_int;
    checked_file_size => xFileSize(size: *mut i64) -> c_int;
    checked_lock => xLock(level: c_int) -> c_int;
    checked_unlock => xUnlock(level: c_int) -> c_int;
    checked_check_reserved_lock => xCheckReservedLock(out: *mut c_int) -> c_int;
    checked_file_control => xFileControl(op: c_int, argument: *mut c_void) -> c_int;
    checked_sector_size => xSectorSize() -> c_int;
    checked_device_characteristics => xDeviceCharacteristics() -> c_int;
    checked_shm_map => xShmMap(region: c_int, size: c_int, extend: c_int, out: *mut *mut c_void) -> c_int;
    checked_shm_lock => xShmLock(offset: c_int, count: c_int, flags: c_int) -> c_int;
    checked_shm_barrier => xShmBarrier() -> ();
    checked_shm_unmap => xShmUnmap(delete: c_int) -> c_int;
}

static CHECKED_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(checked_close),
    xRead: Some(checked_read),
    xWrite: Some(checked_write),
    xTruncate: Some(checked_truncate),
    xSync: Some(checked_sync),
    xFileSize: Some(checked_file_size),
    xLock: Some(checked_lock),
    xUnlock: Some(checked_unlock),
    xCheckReservedLock: Some(checked_check_reserved_lock),
    xFileControl: Some(checked_file_control),
    xSectorSize: Some(checked_sector_size),
    xDeviceCharacteristics: Some(checked_device_characteristics),
    xShmMap: Some(checked_shm_map),
    xShmLock: Some(checked_shm_lock),
    xShmBarrier: Some(checked_shm_barrier),
    xShmUnmap: Some(checked_shm_unmap),
    // Memory-mapped reads would bypass this shim: refused, so SQLite reads instead.
    xFetch: Some(crate::vfs_shim::refuse_fetch),
    xUnfetch: Some(crate::vfs_shim::nothing_to_unfetch),
};

unsafe extern "C" fn checked_close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: closes the file below once; the name box is dropped once.
    unsafe {
        let this = file_of(file);
        let rc = (below_methods(this).xClose.expect("files close"))(this.below);
        if !this.name.is_null() {
            drop(Box::from_raw(this.name));
            this.name = std::ptr::null_mut();
        }
        rc
    }
}

unsafe extern "C" fn checked_read(
    file: *mut ffi::sqlite3_file,
    buffer: *mut c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: SQLite's buffer holds `amount` bytes, filled by the file below on success.
    unsafe {
        let this = file_of(file);
        let rc =
            (below_methods(this).xRead.expect("files read"))(this.below, buffer, amount, offset);
        if rc != ffi::SQLITE_OK || this.role == Role::Other {
            return rc;
        }
        let bytes = std::slice::from_raw_parts(buffer.cast::<u8>(), amount as usize);
        let role = this.role;
        let name = this.name;
        let flags = this.flags();
        flags.note_header(role, bytes, offset);
        let verified = role == Role::Database && is_whole_page(amount) && flags.checksums;
        if verified && !page_is_intact(bytes) {
            let path = if name.is_null() {
                String::new()
            } else {
                (*name).clone()
            };
            tracing::error!(file = %path, offset, "a database page failed its checksum: the disk changed it after it was written");
            record_damage_of(
                path,
                format!(
                    "the page at offset {offset} failed its checksum (the disk changed it after it was written)"
                ),
            );
            return ffi::SQLITE_IOERR_DATA;
        }
        rc
    }
}

unsafe extern "C" fn checked_write(
    file: *mut ffi::sqlite3_file,
    buffer: *const c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: SQLite's buffer holds `amount` bytes. The last 8 bytes of a whole page are the
    // bytes the database reserves for this VFS (SQLite never uses them), so the checksum is
    // written into SQLite's page in place, as SQLite's own cksumvfs does.
    unsafe {
        let this = file_of(file);
        if this.role != Role::Other {
            let role = this.role;
            let bytes =
                std::slice::from_raw_parts_mut(buffer.cast::<u8>().cast_mut(), amount as usize);
            let flags = this.flags();
            flags.note_header(role, bytes, offset);
            if role == Role::Database && is_whole_page(amount) && flags.checksums {
                let (content, tail) = bytes.split_at_mut(amount as usize - 8);
                tail.copy_from_slice(&checksum(content));
            }
        }
        (below_methods(this).xWrite.expect("files write"))(this.below, buffer, amount, offset)
    }
}

/// A plain connection to the database at `path`, through this VFS so that what it writes
/// keeps every page's checksum: for tools and tests that edit a node's database directly.
/// (A connection through SQLite's default VFS would write pages without their checksums,
/// and the node would then refuse them as damaged.)
pub fn open_directly(path: &Path) -> rusqlite::Result<rusqlite::Connection> {
    register();
    rusqlite::Connection::open_with_flags_and_vfs(path, rusqlite::OpenFlags::default(), VFS_NAME)
}

/// Reserves [`RESERVED_BYTES`] per page on `conn`'s main database, so that this VFS writes
/// and verifies checksums. Only a database without pages can be given them this way: one
/// with pages made before checksums is rewritten by [`rewrite_with_checksums`] before it is
/// opened. Returns whether the bytes were reserved now.
pub(crate) fn reserve_checksum_bytes(conn: &rusqlite::Connection) -> rusqlite::Result<bool> {
    let control = |value: c_int| -> rusqlite::Result<c_int> {
        let mut value = value;
        // SAFETY: the handle is the live connection's; the argument is the int the control
        // reads (a negative value asks for the current reserve, written back).
        let rc = unsafe {
            ffi::sqlite3_file_control(
                conn.handle(),
                c"main".as_ptr(),
                ffi::SQLITE_FCNTL_RESERVE_BYTES,
                (&raw mut value).cast(),
            )
        };
        if rc == ffi::SQLITE_OK {
            Ok(value)
        } else {
            Err(rusqlite::Error::SqliteFailure(ffi::Error::new(rc), None))
        }
    };
    if control(-1)? == RESERVED_BYTES {
        return Ok(false);
    }
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |row| row.get(0))?;
    if pages > 0 {
        return Err(rusqlite::Error::SqliteFailure(
            ffi::Error::new(ffi::SQLITE_MISUSE),
            Some(
                "a database with pages gets its checksums by a rewrite, before it is opened".into(),
            ),
        ));
    }
    control(RESERVED_BYTES)?;
    Ok(true)
}

/// Whether the plaintext database at `path` has pages but no room for checksums: made
/// before them.
pub(crate) fn lacks_checksums(path: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut header = [0u8; 100];
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(error) => return Err(error),
    };
    let mut read = 0;
    while read < header.len() {
        match file.read(&mut header[read..])? {
            0 => return Ok(false),
            n => read += n,
        }
    }
    Ok(header.starts_with(b"SQLite format 3\0") && c_int::from(header[20]) != RESERVED_BYTES)
}

/// Rewrites the database at `path` (made before checksums) with room for them, through `vfs`,
/// keeping its data and schema version. SQLCipher, which builds this SQLite, will not VACUUM
/// a plaintext database into one with reserved bytes (it takes reserved bytes for an
/// encrypted database's and asks for a key), so the rewrite is an export: a new file with
/// the bytes reserved, the old one attached as plaintext (`KEY ''`), `sqlcipher_export`
/// copying schema and rows, then the new file renamed over the old. A crash before the
/// rename leaves the old database as it was (and the half-made file is made again); after
/// it, the new one.
pub(crate) fn rewrite_with_checksums(path: &Path, vfs: &str) -> rusqlite::Result<()> {
    let fresh_path = fresh_file_beside(path, ".with-checksums")?;
    let version = checkpoint_for_export(path, vfs)?;
    {
        let fresh = rusqlite::Connection::open_with_flags_and_vfs(
            &fresh_path,
            rusqlite::OpenFlags::default(),
            vfs,
        )?;
        fresh.execute_batch("PRAGMA synchronous = FULL;")?;
        reserve_checksum_bytes(&fresh)?;
        export_from_plaintext(&fresh, path, version)?;
    }
    replace_database(path, &fresh_path)
}

fn rewrite_failed(error: std::io::Error) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        ffi::Error::new(ffi::SQLITE_IOERR),
        Some(format!("rewriting the database: {error}")),
    )
}

/// A new, empty file (mode 0600) beside the database at `path`, named with `suffix`, for a
/// rewrite to export into; one left by a rewrite a crash cut short is replaced.
pub(crate) fn fresh_file_beside(path: &Path, suffix: &str) -> rusqlite::Result<std::path::PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let fresh_path = with_suffix(path, suffix);
    for stale in [&fresh_path, &journal_of(&fresh_path)] {
        match std::fs::remove_file(stale) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(rewrite_failed(error)),
        }
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&fresh_path)
        .map_err(rewrite_failed)?;
    Ok(fresh_path)
}

/// Moves everything in the plaintext database's WAL into its file (so that the WAL left
/// behind holds nothing) and returns its schema version.
pub(crate) fn checkpoint_for_export(path: &Path, vfs: &str) -> rusqlite::Result<i64> {
    let old =
        rusqlite::Connection::open_with_flags_and_vfs(path, rusqlite::OpenFlags::default(), vfs)?;
    old.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    old.query_row("PRAGMA user_version", [], |row| row.get(0))
}

/// Copies the plaintext database at `old` (attached with `KEY ''`: no codec) into `fresh`'s
/// main database, schema and rows, and gives it schema `version`.
pub(crate) fn export_from_plaintext(
    fresh: &rusqlite::Connection,
    old: &Path,
    version: i64,
) -> rusqlite::Result<()> {
    let old_path = old
        .to_str()
        .ok_or_else(|| rusqlite::Error::InvalidPath(old.to_path_buf()))?;
    fresh.execute("ATTACH DATABASE ?1 AS old KEY ''", [old_path])?;
    fresh.query_row("SELECT sqlcipher_export('main', 'old')", [], |_| Ok(()))?;
    fresh.execute_batch("DETACH DATABASE old;")?;
    fresh.pragma_update(None, "user_version", version)
}

/// Puts the synced `fresh` file in place of the database at `path`: renamed over it, the
/// old database's emptied WAL and its index removed, the folder synced. A crash before the
/// rename leaves the old database; after it, the new one.
pub(crate) fn replace_database(path: &Path, fresh: &Path) -> rusqlite::Result<()> {
    std::fs::File::open(fresh)
        .and_then(|file| file.sync_all())
        .map_err(rewrite_failed)?;
    std::fs::rename(fresh, path).map_err(rewrite_failed)?;
    for stale in [wal_of(path), shm_of(path)] {
        match std::fs::remove_file(&stale) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(rewrite_failed(error)),
        }
    }
    if let Some(folder) = path.parent() {
        let folder = if folder.as_os_str().is_empty() {
            Path::new(".")
        } else {
            folder
        };
        std::fs::File::open(folder)
            .and_then(|dir| dir.sync_all())
            .map_err(rewrite_failed)?;
    }
    Ok(())
}

fn with_suffix(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    std::path::PathBuf::from(name)
}

fn journal_of(path: &Path) -> std::path::PathBuf {
    with_suffix(path, "-journal")
}

fn wal_of(path: &Path) -> std::path::PathBuf {
    with_suffix(path, "-wal")
}

fn shm_of(path: &Path) -> std::path::PathBuf {
    with_suffix(path, "-shm")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;

    /// The checksum is cksumvfs's: a page from its test suite's layout checks out, and any
    /// flipped bit in it is found.
    #[test]
    fn a_flipped_bit_anywhere_in_a_page_fails_its_checksum() {
        let mut page = vec![0u8; 4096];
        for (i, byte) in page.iter_mut().enumerate().take(4088) {
            *byte = (i * 7 % 251) as u8;
        }
        let sum = checksum(&page[..4088]);
        page[4088..].copy_from_slice(&sum);
        assert!(page_is_intact(&page));
        for bit in [0, 9, 800 * 8 + 3, 4087 * 8 + 7, 4090 * 8] {
            let mut flipped = page.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(!page_is_intact(&flipped), "bit {bit}");
        }
    }

    /// Every page of a store's database carries its checksum, and a page changed on disk
    /// is refused when read, with the damage reported for the operator.
    #[test]
    fn a_page_changed_on_disk_is_refused_when_read_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("node.db");
        let mut store = Store::open(&db).unwrap();
        for n in 0..200 {
            crate::tests::stored(&mut store, &[crate::tests::item(&format!("a/{n}"))], n);
        }
        store.checkpoint().unwrap();
        drop(store);
        let bytes = std::fs::read(&db).unwrap();
        let page_size = u16::from_be_bytes([bytes[16], bytes[17]]) as usize;
        assert_eq!(bytes[20], 8, "8 bytes reserved per page");
        for page in bytes.chunks(page_size) {
            assert!(page_is_intact(page), "every page carries its checksum");
        }
        assert_eq!(damage_found(&db), None);

        // One bit of the last page (a document's) flips at rest.
        let mut damaged_bytes = bytes.clone();
        let at = bytes.len() - page_size + 100;
        damaged_bytes[at] ^= 0x10;
        std::fs::write(&db, &damaged_bytes).unwrap();
        let store = Store::open_read_only(&db).unwrap();
        let read = store.integrity_problems();
        let problems = format!("{read:?}");
        assert!(
            read.is_err() || !read.unwrap().is_empty(),
            "the damage is found: {problems}"
        );
        let report = damage_found(&db).expect("the damage is reported");
        assert!(report.contains("failed its checksum"), "{report}");
    }

    /// A database made before checksums is rewritten once with them, keeping its data.
    #[test]
    fn an_older_database_gets_checksums_in_one_rewrite_and_keeps_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("node.db");
        {
            let conn = rusqlite::Connection::open(&db).unwrap();
            conn.execute_batch(
                "PRAGMA journal_mode = WAL; CREATE TABLE t (x TEXT); \
                 INSERT INTO t VALUES ('kept');",
            )
            .unwrap();
        }
        rusqlite::Connection::open(&db)
            .unwrap()
            .execute_batch("PRAGMA user_version = 7;")
            .unwrap();
        let version_before = 7;
        register();
        assert!(lacks_checksums(&db).unwrap());
        rewrite_with_checksums(&db, VFS_NAME).unwrap();
        assert!(!lacks_checksums(&db).unwrap(), "once");
        let conn = rusqlite::Connection::open_with_flags_and_vfs(
            &db,
            rusqlite::OpenFlags::default(),
            VFS_NAME,
        )
        .unwrap();
        assert!(!reserve_checksum_bytes(&conn).unwrap(), "already reserved");
        let kept: String = conn.query_row("SELECT x FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(kept, "kept");
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, version_before, "the schema version is kept");
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .unwrap();
        drop(conn);
        let bytes = std::fs::read(&db).unwrap();
        let page_size = u16::from_be_bytes([bytes[16], bytes[17]]) as usize;
        assert_eq!(bytes[20], 8);
        assert!(bytes.chunks(page_size).all(page_is_intact));
    }
}
