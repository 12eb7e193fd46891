//! What the two VFS shims (`power_loss`, `page_checksums`) share: methods that only pass a
//! call on to the file of the VFS below.

/// Defines `unsafe extern "C"` file methods that forward SQLite's arguments to the file
/// below: `$file(file)` gives the shim's handle, `$methods(handle)` the methods of the file
/// below, and `handle.$below` that file.
macro_rules! forward_to_below {
    ($file:ident, $methods:ident, $below:ident;
     $($name:ident => $method:ident($($arg:ident: $type:ty),*) -> $out:ty;)*) => {$(
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file, $($arg: $type),*) -> $out {
            // SAFETY: forwards SQLite's own arguments to the file below, which was opened
            // (SQLite calls no method of a file whose open failed).
            unsafe {
                let handle = $file(file);
                let method = $methods(handle).$method.expect(concat!(
                    "the files below have ",
                    stringify!($method)
                ));
                method(handle.$below, $($arg),*)
            }
        }
    )*};
}

pub(crate) use forward_to_below;

use rusqlite::ffi;
use std::ffi::{CStr, c_char, c_int, c_void};

/// The open function of a shim VFS.
pub(crate) type OpenFn = unsafe extern "C" fn(
    *mut ffi::sqlite3_vfs,
    ffi::sqlite3_filename,
    *mut ffi::sqlite3_file,
    c_int,
    *mut c_int,
) -> c_int;

/// The delete function of a shim VFS.
pub(crate) type DeleteFn =
    unsafe extern "C" fn(*mut ffi::sqlite3_vfs, *const c_char, c_int) -> c_int;

/// Registers `name`, a VFS over `below` whose file handles are a `Handle` followed by the
/// handle of `below`, with its own `open` and `delete`; everything else is `below`'s.
///
/// # Safety
/// `below` is a registered VFS that outlives the process; call once per name.
pub(crate) unsafe fn register<Handle>(
    below: *mut ffi::sqlite3_vfs,
    name: &'static CStr,
    open: OpenFn,
    delete: DeleteFn,
) {
    assert!(!below.is_null(), "the VFS below is registered");
    // SAFETY: the VFS made from `below` is leaked, as SQLite requires a registered VFS to
    // outlive every connection.
    unsafe {
        let mut vfs: ffi::sqlite3_vfs = *below;
        vfs.szOsFile = (std::mem::size_of::<Handle>() as c_int) + (*below).szOsFile;
        vfs.zName = name.as_ptr();
        vfs.pAppData = below.cast();
        vfs.pNext = std::ptr::null_mut();
        vfs.xOpen = Some(open);
        vfs.xDelete = Some(delete);
        let vfs = Box::leak(Box::new(vfs));
        let rc = ffi::sqlite3_vfs_register(vfs, 0);
        assert_eq!(rc, ffi::SQLITE_OK, "registering the VFS {name:?}");
    }
}

/// The VFS a shim registered by [`register`] wraps.
///
/// # Safety
/// `vfs` was registered by [`register`].
pub(crate) unsafe fn vfs_below(vfs: *mut ffi::sqlite3_vfs) -> *mut ffi::sqlite3_vfs {
    // SAFETY: pAppData was set to the VFS below at registration.
    unsafe { (*vfs).pAppData.cast() }
}

/// The handle of the file below, in the block SQLite gave a shim's `Handle`.
///
/// # Safety
/// `file` is a block of the shim's `szOsFile` bytes.
pub(crate) unsafe fn file_below<Handle>(file: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    // SAFETY: the block holds a Handle, then the handle below.
    unsafe {
        file.cast::<u8>()
            .add(std::mem::size_of::<Handle>())
            .cast::<ffi::sqlite3_file>()
    }
}

/// The shim's handle SQLite passes to a method.
///
/// # Safety
/// `file` was opened by the shim whose handle is a `Handle` (its xOpen wrote one).
pub(crate) unsafe fn handle<Handle>(file: *mut ffi::sqlite3_file) -> &'static mut Handle {
    // SAFETY: the caller's promise.
    unsafe { &mut *file.cast::<Handle>() }
}

/// The methods of `below`, an open file.
///
/// # Safety
/// `below` was opened successfully (SQLite calls no method of a file whose open failed).
pub(crate) unsafe fn methods_of(below: *mut ffi::sqlite3_file) -> &'static ffi::sqlite3_io_methods {
    // SAFETY: the caller's promise.
    unsafe { &*(*below).pMethods }
}

/// `xFetch` that refuses every memory-mapped read, so SQLite reads through `xRead`: a shim
/// that checks or records what passes would otherwise be bypassed.
pub(crate) unsafe extern "C" fn refuse_fetch(
    file: *mut ffi::sqlite3_file,
    offset: i64,
    amount: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: `out` is SQLite's pointer to fill; null means "read it instead".
    unsafe {
        let _ = (file, offset, amount);
        *out = std::ptr::null_mut();
        ffi::SQLITE_OK
    }
}

/// `xUnfetch` for [`refuse_fetch`]: nothing was mapped.
pub(crate) unsafe extern "C" fn nothing_to_unfetch(
    file: *mut ffi::sqlite3_file,
    offset: i64,
    page: *mut c_void,
) -> c_int {
    let _ = (file, offset, page);
    ffi::SQLITE_OK
}
