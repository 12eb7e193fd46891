//! A data key derived from a passphrase, for a node run by hand (a laptop taken on home
//! visits), where no key file is kept apart and no TPM holds a credential: nothing on the
//! disk gives the key, and the passphrase is asked for whenever a process opens the data.
//!
//! PBKDF2-HMAC-SHA256 (ring) with [`ITERATIONS`] rounds, OWASP's figure for it, over a
//! random salt kept in the home with a check value (an HMAC under the derived key), so a
//! wrong passphrase is told as such before the database is tried. The key is derived once
//! per process and kept in memory for the process's other opens; the database itself is
//! given the derived key raw, so connections cost no derivation. The salt file is no
//! secret, but like the database it lets a passphrase be tried offline: the length asked
//! for ([`MIN_CHARS`]) is what stands against that.

use crate::home::HomeError;
use caremesh_storage::at_rest::DataKey;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, IsTerminal, Read, Write};
use std::num::NonZeroU32;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Where `caremesh init --data-key-passphrase` keeps the salt, relative to the home.
pub const SALT_FILE: &str = "keys/data-key.salt";
/// PBKDF2-HMAC-SHA256 rounds (OWASP Password Storage Cheat Sheet, 2023).
pub const ITERATIONS: u32 = 600_000;
/// The shortest passphrase taken.
pub const MIN_CHARS: usize = 12;
/// The longest read: a line beyond this is not a passphrase.
const MAX_BYTES: u64 = 1024;
const KDF: &str = "pbkdf2-hmac-sha256";
const CHECK_LABEL: &[u8] = b"caremesh data key check 1";

/// What a salt file holds (JSON).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SaltFile {
    kdf: String,
    iterations: u32,
    /// 16 random bytes, hexadecimal.
    salt: String,
    /// HMAC-SHA256 of [`CHECK_LABEL`] under the derived key, hexadecimal.
    check: String,
}

/// Keys derived in this process, by salt file: asked for once.
static DERIVED: Mutex<Vec<(PathBuf, Arc<DataKey>)>> = Mutex::new(Vec::new());

/// The data key whose salt and check are in `salt_file`: asked for at the terminal (or read
/// from standard input when that is not one), unless this process derived it already.
pub fn data_key(salt_file: &Path) -> Result<DataKey, HomeError> {
    if let Some(key) = derived(salt_file) {
        return Ok(key);
    }
    let stored = read_salt_file(salt_file)?;
    let passphrase = ask(&format!(
        "passphrase for the data key ({}): ",
        salt_file.display()
    ))
    .map_err(|reason| HomeError::Passphrase {
        salt: salt_file.to_path_buf(),
        reason,
    })?;
    let key = derive(&passphrase, &stored)?;
    if !checks(&key, &stored.check) {
        return Err(HomeError::WrongPassphrase {
            salt: salt_file.to_path_buf(),
        });
    }
    remember(salt_file, &key);
    Ok(key)
}

/// The data key `hex` (derived by the CLI that asked for the passphrase, sent to the running
/// node), if it is the one `salt_file` checks.
pub fn given_key(salt_file: &Path, hex: &str) -> Result<DataKey, HomeError> {
    let stored = read_salt_file(salt_file)?;
    let key = DataKey::from_hex(hex).map_err(|_| HomeError::WrongPassphrase {
        salt: salt_file.to_path_buf(),
    })?;
    if !checks(&key, &stored.check) {
        return Err(HomeError::WrongPassphrase {
            salt: salt_file.to_path_buf(),
        });
    }
    Ok(key)
}

/// A new key from a new passphrase: asked for twice at a terminal (once from standard
/// input), at least [`MIN_CHARS`] characters, its salt and check written to `salt_file`
/// (mode 0600, never over a file).
pub fn make(salt_file: &Path) -> Result<DataKey, HomeError> {
    let failed = |reason: String| HomeError::Passphrase {
        salt: salt_file.to_path_buf(),
        reason,
    };
    if salt_file.exists() {
        return Err(failed(
            "a salt file is there already; nothing was changed".into(),
        ));
    }
    let passphrase = ask("new passphrase for the data key: ").map_err(failed)?;
    if passphrase.chars().count() < MIN_CHARS {
        return Err(failed(format!(
            "a passphrase of at least {MIN_CHARS} characters is needed: it is all that stands between a lost disk and every record on it"
        )));
    }
    if std::io::stdin().is_terminal() {
        let again = ask("the same passphrase again: ").map_err(failed)?;
        if again != passphrase {
            return Err(failed(
                "the two passphrases differ; nothing was changed".into(),
            ));
        }
    }
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|error| failed(format!("no randomness: {error}")))?;
    let mut stored = SaltFile {
        kdf: KDF.into(),
        iterations: ITERATIONS,
        salt: hex::encode(salt),
        check: String::new(),
    };
    let key = derive(&passphrase, &stored)?;
    stored.check = hex::encode(check_of(&key));
    if let Some(folder) = salt_file.parent() {
        crate::home::private_folder(folder)?;
    }
    let io = |source| HomeError::Io {
        path: salt_file.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(salt_file)
        .map_err(io)?;
    let text = serde_json::to_string_pretty(&stored).expect("a salt file serialises");
    writeln!(file, "{text}").map_err(io)?;
    file.sync_all().map_err(io)?;
    remember(salt_file, &key);
    Ok(key)
}

/// A new salt file's name for a change of key to a new passphrase, relative to the home:
/// the one in use stays until the change is done.
pub fn new_salt_file_name() -> PathBuf {
    let mut tag = [0u8; 4];
    // A clash is refused by `make` (never written over), so a weak tag costs a retry only.
    let _ = getrandom::fill(&mut tag);
    PathBuf::from(format!("keys/data-key-{}.salt", hex::encode(tag)))
}

fn derived(salt_file: &Path) -> Option<DataKey> {
    let name = std::path::absolute(salt_file).ok()?;
    DERIVED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .find(|(path, _)| *path == name)
        .map(|(_, key)| key.copy())
}

/// Keeps `key` as the one `salt_file` gives, for this process's other opens.
pub fn remember(salt_file: &Path, key: &DataKey) {
    if let Ok(name) = std::path::absolute(salt_file) {
        DERIVED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((name, Arc::new(key.copy())));
    }
}

fn read_salt_file(path: &Path) -> Result<SaltFile, HomeError> {
    let unreadable = |reason: String| HomeError::Passphrase {
        salt: path.to_path_buf(),
        reason,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(4096).read_to_string(&mut text))
        .map_err(|error| {
            unreadable(format!(
                "the salt file cannot be read ({error}); restore it from the home's backup"
            ))
        })?;
    let stored: SaltFile = serde_json::from_str(&text)
        .map_err(|error| unreadable(format!("not a caremesh salt file: {error}")))?;
    if stored.kdf != KDF || stored.iterations == 0 || stored.iterations > 100_000_000 {
        return Err(unreadable(format!(
            "derivation {} with {} rounds is not one caremesh uses",
            stored.kdf, stored.iterations
        )));
    }
    Ok(stored)
}

fn derive(passphrase: &str, stored: &SaltFile) -> Result<DataKey, HomeError> {
    let salt = hex::decode(&stored.salt).map_err(|_| HomeError::Passphrase {
        salt: PathBuf::new(),
        reason: "the salt is not hexadecimal".into(),
    })?;
    let mut key = [0u8; 32];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        NonZeroU32::new(stored.iterations).expect("checked non-zero"),
        &salt,
        passphrase.as_bytes(),
        &mut key,
    );
    let data_key = DataKey::from_bytes(key);
    key.fill(0);
    Ok(data_key)
}

fn check_of(key: &DataKey) -> Vec<u8> {
    let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.bytes());
    ring::hmac::sign(&hmac, CHECK_LABEL).as_ref().to_vec()
}

fn checks(key: &DataKey, stored_check: &str) -> bool {
    let Ok(expected) = hex::decode(stored_check) else {
        return false;
    };
    let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.bytes());
    ring::hmac::verify(&hmac, CHECK_LABEL, &expected).is_ok()
}

/// A passphrase: at a terminal without echo, else one line of standard input.
fn ask(prompt: &str) -> Result<String, String> {
    if std::io::stdin().is_terminal() {
        return rpassword::prompt_password(prompt)
            .map_err(|error| format!("could not read it from the terminal: {error}"));
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .take(MAX_BYTES)
        .read_line(&mut line)
        .map_err(|error| format!("could not read it from standard input: {error}"))?;
    let passphrase = line.trim_end_matches(['\n', '\r']).to_string();
    if passphrase.is_empty() {
        return Err(
            "there is no terminal to ask for it on and standard input gave none: run the command at a terminal, or give the passphrase as the first line of standard input"
                .into(),
        );
    }
    Ok(passphrase)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(iterations: u32) -> SaltFile {
        SaltFile {
            kdf: KDF.into(),
            iterations,
            salt: "00112233445566778899aabbccddeeff".into(),
            check: String::new(),
        }
    }

    /// The same passphrase and salt give the same key; another passphrase or salt another;
    /// the check tells them apart.
    #[test]
    fn a_passphrase_and_salt_give_one_key_and_its_check_refuses_others() {
        let stored_one = stored(1_000);
        let key = derive("correct horse battery staple", &stored_one).unwrap();
        let again = derive("correct horse battery staple", &stored_one).unwrap();
        assert!(key.same_as(&again));
        let check = hex::encode(check_of(&key));
        assert!(checks(&again, &check));
        let other = derive("correct horse battery stapler", &stored_one).unwrap();
        assert!(!other.same_as(&key));
        assert!(!checks(&other, &check));
        let mut salted = stored(1_000);
        salted.salt = "ffeeddccbbaa99887766554433221100".into();
        assert!(
            !derive("correct horse battery staple", &salted)
                .unwrap()
                .same_as(&key)
        );
        assert!(!checks(&key, "not hex"));
    }

    /// RFC 7914's PBKDF2-HMAC-SHA256 test vector (section 11, P = "passwd", S = "salt",
    /// c = 1): the derivation is the standard one, so any implementation derives the key.
    #[test]
    fn the_derivation_is_standard_pbkdf2_hmac_sha256() {
        let mut vector = stored(1);
        vector.salt = hex::encode(b"salt");
        assert_eq!(
            derive("passwd", &vector).unwrap().to_hex(),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        );
    }
}
