//! The trust registry as a node holds it: loaded from the file its config names, verified
//! against the pinned authority key, replaced when a peer offers a newer signed edition.

use caremesh_sync::trust::{MAX_REGISTRY_BYTES, parse_key};
use caremesh_sync::{TrustError, VerifiedRegistry};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

#[derive(Debug, thiserror::Error)]
pub enum RegistryLoadError {
    // The cause is part of the message (not a `#[source]`) so that logs, which print only the
    // message, still say what went wrong.
    #[error("trust registry {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("trust registry {path}: {cause}")]
    Invalid { path: PathBuf, cause: TrustError },
}

/// The registry in force, shared by the TLS verifiers and every sync session.
#[derive(Clone)]
pub struct TrustState {
    inner: Arc<Inner>,
}

struct Inner {
    authority: [u8; 32],
    path: PathBuf,
    current: RwLock<Arc<VerifiedRegistry>>,
}

impl std::fmt::Debug for TrustState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TrustState(authority {}, version {})",
            hex::encode(self.inner.authority),
            self.current().version()
        )
    }
}

impl TrustState {
    /// Loads and verifies the registry at `path` against the pinned `authority` key (hex).
    pub fn load(path: &Path, authority: &str) -> Result<TrustState, RegistryLoadError> {
        let invalid = |cause| RegistryLoadError::Invalid {
            path: path.to_path_buf(),
            cause,
        };
        let authority = parse_key("authority key", authority).map_err(invalid)?;
        let bytes = read_limited(path)?;
        let verified = VerifiedRegistry::from_bytes(bytes, &authority).map_err(invalid)?;
        Ok(TrustState {
            inner: Arc::new(Inner {
                authority,
                path: path.to_path_buf(),
                current: RwLock::new(Arc::new(verified)),
            }),
        })
    }

    pub fn current(&self) -> Arc<VerifiedRegistry> {
        self.inner
            .current
            .read()
            .expect("registry lock is never poisoned")
            .clone()
    }

    /// Adopts registry bytes offered by a peer if they verify against the pinned authority
    /// and are a newer edition; the file is replaced atomically so a crash leaves one whole
    /// edition. Returns whether it was adopted.
    pub fn adopt(&self, bytes: Vec<u8>) -> Result<bool, RegistryLoadError> {
        let verified =
            VerifiedRegistry::from_bytes(bytes, &self.inner.authority).map_err(|cause| {
                RegistryLoadError::Invalid {
                    path: PathBuf::from("(registry offered by a peer)"),
                    cause,
                }
            })?;
        self.adopt_verified(verified, true)
    }

    /// Adopts the edition in the registry file if it verifies and is newer than the one in
    /// force: an operator ran `caremesh trust install` while the node runs.
    pub fn reload_file(&self) -> Result<bool, RegistryLoadError> {
        let path = &self.inner.path;
        let bytes = read_limited(path)?;
        let verified =
            VerifiedRegistry::from_bytes(bytes, &self.inner.authority).map_err(|cause| {
                RegistryLoadError::Invalid {
                    path: path.clone(),
                    cause,
                }
            })?;
        self.adopt_verified(verified, false)
    }

    /// The registry file's size and modification time, to notice an edition installed in it.
    pub fn file_signature(&self) -> Option<(u64, std::time::SystemTime)> {
        let metadata = fs::metadata(&self.inner.path).ok()?;
        Some((metadata.len(), metadata.modified().ok()?))
    }

    fn adopt_verified(
        &self,
        verified: VerifiedRegistry,
        save: bool,
    ) -> Result<bool, RegistryLoadError> {
        let mut current = self
            .inner
            .current
            .write()
            .expect("registry lock is never poisoned");
        if verified.version() <= current.version() {
            return Ok(false);
        }
        if save {
            write_atomically(&self.inner.path, verified.bytes())?;
        }
        *current = Arc::new(verified);
        Ok(true)
    }
}

impl caremesh_storage::sync_host::RegistrySource for TrustState {
    fn current(&self) -> Arc<VerifiedRegistry> {
        TrustState::current(self)
    }

    fn adopt(&self, bytes: Vec<u8>) -> Result<bool, String> {
        TrustState::adopt(self, bytes).map_err(|error| error.to_string())
    }
}

fn read_limited(path: &Path) -> Result<Vec<u8>, RegistryLoadError> {
    let io = |cause| RegistryLoadError::Io {
        path: path.to_path_buf(),
        cause,
    };
    let length = fs::metadata(path).map_err(io)?.len() as usize;
    if length > MAX_REGISTRY_BYTES {
        return Err(RegistryLoadError::Invalid {
            path: path.to_path_buf(),
            cause: TrustError::TooLarge(length),
        });
    }
    fs::read(path).map_err(io)
}

/// Writes `bytes` to `path` through a temporary file and a rename, with fsyncs, so readers
/// and crashes see either the old file or the new one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), RegistryLoadError> {
    let io = |cause| RegistryLoadError::Io {
        path: path.to_path_buf(),
        cause,
    };
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    fs::create_dir_all(parent).map_err(io)?;
    let temporary = path.with_extension("json.partial");
    let mut file = fs::File::create(&temporary).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    fs::rename(&temporary, path).map_err(io)?;
    fs::File::open(parent)
        .and_then(|dir| dir.sync_all())
        .map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use caremesh_sync::trust::public_key_of;
    use caremesh_sync::{Registry, RegistryFile};

    #[test]
    fn only_a_newer_edition_signed_by_the_pinned_authority_is_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.json");
        let authority = [3u8; 32];
        let mut file = RegistryFile::unsigned(Registry::new("region"));
        file.sign(&authority, 1).unwrap();
        fs::write(&path, file.to_json()).unwrap();
        let state = TrustState::load(&path, &hex::encode(public_key_of(&authority))).unwrap();
        assert_eq!(state.current().version(), 1);

        assert!(!state.adopt(file.to_json()).unwrap(), "same edition");
        let mut rogue = file.clone();
        rogue.sign(&[4u8; 32], 2).unwrap();
        assert!(state.adopt(rogue.to_json()).is_err(), "other authority");
        file.sign(&authority, 2).unwrap();
        assert!(state.adopt(file.to_json()).unwrap());
        assert_eq!(state.current().version(), 2);
        let reloaded = TrustState::load(&path, &hex::encode(public_key_of(&authority))).unwrap();
        assert_eq!(
            reloaded.current().version(),
            2,
            "the newer edition was saved"
        );

        // An edition installed in the file while the node runs is adopted from it; an older
        // or forged one is not.
        file.sign(&authority, 3).unwrap();
        write_atomically(&path, &file.to_json()).unwrap();
        assert!(state.reload_file().unwrap());
        assert_eq!(state.current().version(), 3);
        assert!(!state.reload_file().unwrap(), "same edition");
        let mut forged = file.clone();
        forged.sign(&[4u8; 32], 9).unwrap();
        write_atomically(&path, &forged.to_json()).unwrap();
        assert!(state.reload_file().is_err());
        assert_eq!(state.current().version(), 3);
    }
}
