//! Sealed files: the raw extracts a node keeps in processed/ and quarantine/, and the reasons
//! beside quarantined ones, encrypted with the node's data key when its home has one. They
//! hold patient data as the database does, so they are kept no less safely.
//!
//! The format is the STREAM construction (Hoang, Reyhanitabar, Rogaway and Vizár, "Online
//! Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance", 2015) over AES-256-GCM:
//!
//! ```text
//! magic (16 bytes: "caremesh-sealed1")
//! salt (32 random bytes)
//! key check (16 bytes: HKDF-SHA256(data key, salt, "caremesh sealed file key check"))
//! chunks: each up to 64 KiB of plaintext sealed with its 16-byte tag
//! ```
//!
//! Each file has its own key, HKDF-SHA256(data key, salt, "caremesh sealed file v1"), so the
//! nonces can count from zero without ever repeating under one key. A chunk's nonce is its
//! 64-bit index and a flag for the last chunk, so a file cut short, chunks reordered, or
//! chunks moved from another file all fail authentication. The key check tells "sealed with
//! another data key" apart from "damaged", for an error the operator can act on.
//!
//! Files are read and written a chunk at a time: an extract of any size is sealed in bounded
//! memory, and read back as a stream by ingest (a quarantined file released).

use crate::at_rest::{DataKey, DataKeys};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

/// The first bytes of every sealed file.
pub const MAGIC: &[u8; 16] = b"caremesh-sealed1";
const SALT_BYTES: usize = 32;
const CHECK_BYTES: usize = 16;
const HEADER_BYTES: usize = MAGIC.len() + SALT_BYTES + CHECK_BYTES;
/// Plaintext bytes per chunk: big enough that the tags cost nothing (0.02%), small enough to
/// hold in memory.
const CHUNK_BYTES: usize = 64 * 1024;
const TAG_BYTES: usize = 16;
const FILE_KEY_INFO: &[u8] = b"caremesh sealed file v1";
const KEY_CHECK_INFO: &[u8] = b"caremesh sealed file key check";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{path} is encrypted with a data key, and none was given: give the node's data key ([storage] data_key_file or data_key_credential)"
    )]
    NoKey { path: PathBuf },
    #[error(
        "{path} was encrypted with a different data key than the one given: use the key this home had when the file was kept"
    )]
    WrongKey { path: PathBuf },
    #[error(
        "{path} fails its authentication: it was altered or cut short after it was written (restore it from a backup, or drop the original extract again)"
    )]
    Damaged { path: PathBuf },
}

impl SealError {
    fn io(path: &Path) -> impl FnOnce(io::Error) -> SealError + '_ {
        move |source| SealError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

struct HkdfLen(usize);

impl hkdf::KeyType for HkdfLen {
    fn len(&self) -> usize {
        self.0
    }
}

fn expand(data_key: &DataKey, salt: &[u8], info: &[u8], out: &mut [u8]) {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(data_key.bytes());
    prk.expand(&[info], HkdfLen(out.len()))
        .and_then(|okm| okm.fill(out))
        .expect("HKDF-SHA256 yields up to 8,160 bytes; these are 16 and 32");
}

fn file_key(data_key: &DataKey, salt: &[u8]) -> LessSafeKey {
    let mut bytes = [0u8; 32];
    expand(data_key, salt, FILE_KEY_INFO, &mut bytes);
    let key = UnboundKey::new(&AES_256_GCM, &bytes).expect("AES-256 takes a 32-byte key");
    bytes.fill(0);
    LessSafeKey::new(key)
}

fn key_check(data_key: &DataKey, salt: &[u8]) -> [u8; CHECK_BYTES] {
    let mut check = [0u8; CHECK_BYTES];
    expand(data_key, salt, KEY_CHECK_INFO, &mut check);
    check
}

/// Chunk `index`'s nonce: unique within the file, and saying whether it is the last chunk.
fn nonce(index: u64, last: bool) -> Nonce {
    let mut bytes = [0u8; 12];
    bytes[3..11].copy_from_slice(&index.to_be_bytes());
    bytes[11] = u8::from(last);
    Nonce::assume_unique_for_key(bytes)
}

/// Whether the file at `path` is sealed (starts with [`MAGIC`]).
pub fn is_sealed(path: &Path) -> Result<bool, SealError> {
    let mut start = [0u8; MAGIC.len()];
    let mut file = File::open(path).map_err(SealError::io(path))?;
    let mut read = 0;
    while read < start.len() {
        match file.read(&mut start[read..]) {
            Ok(0) => return Ok(false),
            Ok(n) => read += n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(SealError::io(path)(error)),
        }
    }
    Ok(&start == MAGIC)
}

/// Writes a sealed file a chunk at a time; [`SealedWriter::finish`] seals the last one.
/// Dropped unfinished, it leaves a file that fails authentication, never one that reads as
/// complete.
pub struct SealedWriter<W: Write> {
    out: W,
    key: LessSafeKey,
    buffer: Vec<u8>,
    index: u64,
}

impl<W: Write> SealedWriter<W> {
    /// Writes the header to `out`, with a fresh random salt.
    pub fn new(data_key: &DataKey, mut out: W) -> io::Result<SealedWriter<W>> {
        let mut salt = [0u8; SALT_BYTES];
        getrandom::fill(&mut salt).map_err(|error| io::Error::other(error.to_string()))?;
        out.write_all(MAGIC)?;
        out.write_all(&salt)?;
        out.write_all(&key_check(data_key, &salt))?;
        Ok(SealedWriter {
            out,
            key: file_key(data_key, &salt),
            buffer: Vec::with_capacity(CHUNK_BYTES + TAG_BYTES),
            index: 0,
        })
    }

    fn seal_chunk(&mut self, last: bool) -> io::Result<()> {
        debug_assert!(self.buffer.len() <= CHUNK_BYTES);
        self.key
            .seal_in_place_append_tag(nonce(self.index, last), Aad::from(MAGIC), &mut self.buffer)
            .map_err(|_| io::Error::other("AES-256-GCM refused to seal a chunk"))?;
        self.out.write_all(&self.buffer)?;
        self.buffer.clear();
        self.index = self
            .index
            .checked_add(1)
            .ok_or_else(|| io::Error::other("a sealed file has at most 2^64 chunks"))?;
        Ok(())
    }

    /// Seals what is left as the last chunk and returns the writer it wrote to.
    pub fn finish(mut self) -> io::Result<W> {
        self.seal_chunk(true)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

impl<W: Write> Write for SealedWriter<W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if bytes.is_empty() {
            return Ok(0);
        }
        // A full chunk is sealed only once more follows it: the last chunk may be full.
        if self.buffer.len() == CHUNK_BYTES {
            self.seal_chunk(false)?;
        }
        let take = bytes.len().min(CHUNK_BYTES - self.buffer.len());
        self.buffer.extend_from_slice(&bytes[..take]);
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Reads a sealed file's plaintext, authenticating each chunk before giving any of it.
pub struct SealedReader<R: BufRead> {
    input: R,
    key: LessSafeKey,
    chunk: Vec<u8>,
    /// How much of `chunk` (the plaintext of the chunk last opened) has been given.
    given: usize,
    index: u64,
    finished: bool,
    path: PathBuf,
}

impl<R: BufRead> SealedReader<R> {
    /// Reads and checks the header of the sealed file `path` from `input`, and opens it with
    /// whichever of `keys` it was sealed with.
    fn new(keys: &DataKeys, mut input: R, path: &Path) -> Result<SealedReader<R>, SealError> {
        let mut header = [0u8; HEADER_BYTES];
        input.read_exact(&mut header).map_err(|error| {
            if error.kind() == io::ErrorKind::UnexpectedEof {
                SealError::Damaged {
                    path: path.to_path_buf(),
                }
            } else {
                SealError::io(path)(error)
            }
        })?;
        let salt = &header[MAGIC.len()..MAGIC.len() + SALT_BYTES];
        let check = &header[MAGIC.len() + SALT_BYTES..];
        if header[..MAGIC.len()] != MAGIC[..] {
            return Err(SealError::Damaged {
                path: path.to_path_buf(),
            });
        }
        let Some(data_key) = keys.in_order().find(|key| sealed_with(key, salt, check)) else {
            return Err(SealError::WrongKey {
                path: path.to_path_buf(),
            });
        };
        Ok(SealedReader {
            input,
            key: file_key(data_key, salt),
            chunk: Vec::with_capacity(CHUNK_BYTES + TAG_BYTES),
            given: 0,
            index: 0,
            finished: false,
            path: path.to_path_buf(),
        })
    }

    fn damaged(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            SealError::Damaged {
                path: self.path.clone(),
            },
        )
    }

    /// Reads and opens the next chunk into `self.chunk`.
    fn next_chunk(&mut self) -> io::Result<()> {
        self.chunk.clear();
        self.given = 0;
        let want = (CHUNK_BYTES + TAG_BYTES) as u64;
        (&mut self.input).take(want).read_to_end(&mut self.chunk)?;
        // The last chunk is the one nothing follows.
        let last = self.input.fill_buf()?.is_empty();
        if self.chunk.len() < TAG_BYTES || (!last && self.chunk.len() as u64 != want) {
            return Err(self.damaged());
        }
        let opened =
            match self
                .key
                .open_in_place(nonce(self.index, last), Aad::from(MAGIC), &mut self.chunk)
            {
                Ok(plain) => plain.len(),
                Err(_) => return Err(self.damaged()),
            };
        self.chunk.truncate(opened);
        self.index += 1;
        self.finished = last;
        Ok(())
    }
}

impl<R: BufRead> Read for SealedReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.given == self.chunk.len() {
            if self.finished {
                return Ok(0);
            }
            self.next_chunk()?;
        }
        let n = out.len().min(self.chunk.len() - self.given);
        out[..n].copy_from_slice(&self.chunk[self.given..self.given + n]);
        self.given += n;
        Ok(n)
    }
}

/// Whether a file whose header holds `salt` and `check` was sealed with `data_key`.
fn sealed_with(data_key: &DataKey, salt: &[u8], check: &[u8]) -> bool {
    // Compared without an early exit: the time taken says nothing of where they differ.
    check
        .iter()
        .zip(key_check(data_key, salt))
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// Seals the kept file `path` again with the current key of `keys` unless it is sealed with
/// it already (after a change of key, or for a file kept before the home was encrypted).
/// Returns whether it was rewritten; like [`keep`], `path` is only ever whole.
pub fn reseal(keys: &DataKeys, path: &Path) -> Result<bool, SealError> {
    if is_sealed(path)? {
        let mut header = [0u8; HEADER_BYTES];
        File::open(path)
            .and_then(|mut file| file.read_exact(&mut header))
            .map_err(SealError::io(path))?;
        let salt = &header[MAGIC.len()..MAGIC.len() + SALT_BYTES];
        let check = &header[MAGIC.len() + SALT_BYTES..];
        if sealed_with(keys.current(), salt, check) {
            return Ok(false);
        }
    }
    let mut input = open_kept(Some(keys), path)?;
    keep(Some(keys.current()), path, |out| {
        io::copy(&mut input, out).map(drop)
    })?;
    Ok(true)
}

/// Opens a file the node kept for reading its plaintext: a sealed one through `data_key`, a
/// plain one (kept before the home was encrypted, or in a home without a key) as it is.
pub fn open_kept(data_key: Option<&DataKeys>, path: &Path) -> Result<Box<dyn Read>, SealError> {
    let sealed = is_sealed(path)?;
    let file = File::open(path).map_err(SealError::io(path))?;
    let input = BufReader::with_capacity(CHUNK_BYTES + TAG_BYTES, file);
    if !sealed {
        return Ok(Box::new(input));
    }
    let Some(data_key) = data_key else {
        return Err(SealError::NoKey {
            path: path.to_path_buf(),
        });
    };
    Ok(Box::new(SealedReader::new(data_key, input, path)?))
}

/// The plaintext of a file the node kept, whole, up to `limit` bytes (more is an error).
pub fn read_kept(
    data_key: Option<&DataKeys>,
    path: &Path,
    limit: u64,
) -> Result<Vec<u8>, SealError> {
    let mut bytes = Vec::new();
    open_kept(data_key, path)?
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|error| unwrap_seal_error(path, error))?;
    if bytes.len() as u64 > limit {
        return Err(SealError::Io {
            path: path.to_path_buf(),
            source: io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!("over the {limit}-byte limit for reading it whole"),
            ),
        });
    }
    Ok(bytes)
}

/// The [`SealError`] a [`SealedReader`] carried through an `io::Error`, or the error itself.
pub fn unwrap_seal_error(path: &Path, error: io::Error) -> SealError {
    if error
        .get_ref()
        .is_some_and(|inner| inner.downcast_ref::<SealError>().is_some())
    {
        let inner = error.into_inner().expect("checked above");
        return *inner.downcast::<SealError>().expect("checked above");
    }
    SealError::io(path)(error)
}

/// Writes a file to keep at `target`, sealed with `data_key` when given and as it is
/// otherwise: through a hidden file beside it, synced, then renamed, so `target` is only ever
/// complete. Only its owner can read it. `write` gives the plaintext.
pub fn keep(
    data_key: Option<&DataKey>,
    target: &Path,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<(), SealError> {
    let partial = partial_path(target);
    let result = (|| {
        let file = create_private(&partial)?;
        let mut out = io::BufWriter::with_capacity(CHUNK_BYTES + TAG_BYTES, file);
        match data_key {
            Some(data_key) => {
                let mut sealed = SealedWriter::new(data_key, &mut out)?;
                write(&mut sealed)?;
                sealed.finish()?;
            }
            None => write(&mut out)?,
        }
        let file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        std::fs::rename(&partial, target)?;
        if let Some(folder) = target.parent() {
            File::open(folder)?.sync_all()?;
        }
        Ok(())
    })();
    result.map_err(|error| {
        let _ = std::fs::remove_file(&partial);
        unwrap_seal_error(target, error)
    })
}

/// Keeps a copy of `source` at `target` (see [`keep`]): a sealed source is copied as it is,
/// since it is already sealed.
pub fn keep_copy(
    data_key: Option<&DataKey>,
    source: &Path,
    target: &Path,
) -> Result<(), SealError> {
    let already_sealed = is_sealed(source)?;
    let mut input = File::open(source).map_err(SealError::io(source))?;
    let key = if already_sealed { None } else { data_key };
    keep(key, target, |out| io::copy(&mut input, out).map(drop))
}

/// The hidden file a kept file is written to before it is renamed into place. Its name
/// starts with a dot: `verify` and `caremesh quarantine list` pass over such names.
pub fn partial_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|name| name.to_string_lossy().to_string())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}.partial"))
}

fn create_private(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(key: &DataKey, plain: &[u8]) -> Vec<u8> {
        let mut writer = SealedWriter::new(key, Vec::new()).unwrap();
        writer.write_all(plain).unwrap();
        writer.finish().unwrap()
    }

    fn opened(key: &DataKey, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let path = Path::new("test");
        let keys = DataKeys::new(std::sync::Arc::new(key.copy()));
        let mut reader = SealedReader::new(&keys, sealed, path)?;
        let mut plain = Vec::new();
        reader
            .read_to_end(&mut plain)
            .map_err(|error| unwrap_seal_error(path, error))?;
        Ok(plain)
    }

    fn plaintext(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn sizes_round_trip_across_chunk_boundaries() {
        let key = DataKey::generate().unwrap();
        for len in [
            0,
            1,
            CHUNK_BYTES - 1,
            CHUNK_BYTES,
            CHUNK_BYTES + 1,
            3 * CHUNK_BYTES,
            3 * CHUNK_BYTES + 17,
        ] {
            let plain = plaintext(len);
            let sealed = sealed(&key, &plain);
            let chunks = len.div_ceil(CHUNK_BYTES).max(1);
            assert_eq!(
                sealed.len(),
                HEADER_BYTES + len + chunks * TAG_BYTES,
                "{len}"
            );
            assert_eq!(opened(&key, &sealed).unwrap(), plain, "{len}");
        }
    }

    #[test]
    fn the_plaintext_is_not_in_the_sealed_bytes() {
        let key = DataKey::generate().unwrap();
        let marker = b"9912003888 ZYGMUNTOWICZ";
        let sealed = sealed(&key, marker);
        assert!(!sealed.windows(marker.len()).any(|w| w == marker));
        // Two seals of the same plaintext differ: each file has its own salt and key.
        assert_ne!(sealed, self::sealed(&key, marker));
    }

    #[test]
    fn a_flipped_bit_anywhere_fails_authentication() {
        let key = DataKey::generate().unwrap();
        let good = sealed(&key, &plaintext(CHUNK_BYTES + 100));
        for at in [HEADER_BYTES, HEADER_BYTES + CHUNK_BYTES + 3, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 1;
            assert!(
                matches!(opened(&key, &bad), Err(SealError::Damaged { .. })),
                "{at}"
            );
        }
    }

    #[test]
    fn a_file_cut_short_fails_even_at_a_chunk_boundary() {
        let key = DataKey::generate().unwrap();
        let good = sealed(&key, &plaintext(2 * CHUNK_BYTES + 5));
        let first_chunk_end = HEADER_BYTES + CHUNK_BYTES + TAG_BYTES;
        for cut in [first_chunk_end, first_chunk_end + 10, HEADER_BYTES, 20] {
            assert!(
                matches!(opened(&key, &good[..cut]), Err(SealError::Damaged { .. })),
                "{cut}"
            );
        }
    }

    #[test]
    fn swapped_chunks_fail_authentication() {
        let key = DataKey::generate().unwrap();
        let good = sealed(&key, &plaintext(3 * CHUNK_BYTES));
        let size = CHUNK_BYTES + TAG_BYTES;
        let mut bad = good.clone();
        let (first, second) = (HEADER_BYTES, HEADER_BYTES + size);
        bad[first..first + size].copy_from_slice(&good[second..second + size]);
        bad[second..second + size].copy_from_slice(&good[first..first + size]);
        assert!(matches!(opened(&key, &bad), Err(SealError::Damaged { .. })));
    }

    #[test]
    fn another_key_is_named_as_such() {
        let key = DataKey::generate().unwrap();
        let other = DataKey::generate().unwrap();
        let sealed = sealed(&key, b"note");
        assert!(matches!(
            opened(&other, &sealed),
            Err(SealError::WrongKey { .. })
        ));
    }

    #[test]
    fn kept_files_are_sealed_private_and_read_back_plain_or_sealed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = DataKey::generate().unwrap();
        let keys = DataKeys::new(std::sync::Arc::new(key.copy()));
        let source = dir.path().join("extract.json");
        std::fs::write(&source, b"{\"family\": \"ZYGMUNTOWICZ\"}").unwrap();
        let target = dir.path().join("kept.json");
        keep_copy(Some(&key), &source, &target).unwrap();
        assert!(is_sealed(&target).unwrap());
        assert!(!partial_path(&target).exists());
        let mode = std::fs::metadata(&target).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            read_kept(Some(&keys), &target, 1 << 20).unwrap(),
            std::fs::read(&source).unwrap()
        );
        assert!(matches!(
            read_kept(None, &target, 1 << 20),
            Err(SealError::NoKey { .. })
        ));
        assert!(
            read_kept(Some(&keys), &target, 5).is_err(),
            "over the limit"
        );
        // A sealed file copied is not sealed twice; a plain one reads as it is.
        let again = dir.path().join("again.json");
        keep_copy(Some(&key), &target, &again).unwrap();
        assert_eq!(
            read_kept(Some(&keys), &again, 1 << 20).unwrap(),
            std::fs::read(&source).unwrap()
        );
        assert_eq!(
            read_kept(Some(&keys), &source, 1 << 20).unwrap(),
            std::fs::read(&source).unwrap()
        );
    }

    /// After a change of key every kept file is sealed again with the new key, read through
    /// either key meanwhile, and left alone once it is; the old key alone then opens none.
    #[test]
    fn reseal_moves_a_kept_file_to_the_new_key_once() {
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let old = Arc::new(DataKey::generate().unwrap());
        let new = Arc::new(DataKey::generate().unwrap());
        let kept = dir.path().join("kept.json");
        let plain = dir.path().join("plain.json");
        let text = b"{\"family\": \"ZYGMUNTOWICZ\"}";
        keep(Some(&old), &kept, |out| out.write_all(text)).unwrap();
        std::fs::write(&plain, text).unwrap();
        let changing = DataKeys::changing(new.clone(), old.clone());
        assert_eq!(read_kept(Some(&changing), &kept, 1024).unwrap(), text);
        assert!(reseal(&changing, &kept).unwrap());
        assert!(
            reseal(&changing, &plain).unwrap(),
            "a plain file is sealed too"
        );
        assert!(
            !reseal(&changing, &kept).unwrap(),
            "already under the new key"
        );
        let only_new = DataKeys::new(new);
        let only_old = DataKeys::new(old);
        for path in [&kept, &plain] {
            assert!(is_sealed(path).unwrap());
            assert_eq!(read_kept(Some(&only_new), path, 1024).unwrap(), text);
            assert!(matches!(
                read_kept(Some(&only_old), path, 1024),
                Err(SealError::WrongKey { .. })
            ));
        }
    }
}
