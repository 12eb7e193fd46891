//! HTTPS for the view and the FHIR API: the organisation's certificate and key, read from
//! PEM files, served with rustls on ring (as sync's QUIC is), and read again when the files
//! change, so that a renewed certificate is served without a restart.
//!
//! The handshake runs on the connection's own task (see `listener::ViewStream`), never in
//! the accept loop: a client that stalls its handshake holds only its own connection, within
//! the listener's idle and request time limits.

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

/// A certificate chain or key file larger than this is not one: refused before it is read.
const MAX_PEM_FILE: u64 = 1024 * 1024;

/// How often, at most, the files are looked at again for a renewed certificate. The look
/// is two `stat` calls, made by a handshake, so a node nobody connects to looks at nothing.
pub const RECHECK_EVERY: Duration = Duration::from_secs(5);

/// Where the view's certificate and key are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM: the view's certificate, then the intermediates that lead to a root the
    /// clients trust.
    pub certificate: PathBuf,
    /// PEM: the certificate's private key (PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub private_key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read {path}: {source}; check the path and that the node's account may read it")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is {size} bytes, larger than any certificate chain or key ({MAX_PEM_FILE} at most): is it the right file?"
    )]
    TooLarge { path: PathBuf, size: u64 },
    #[error(
        "{path} holds no PEM certificate (a block beginning -----BEGIN CERTIFICATE-----): give the view's certificate, followed by its intermediates"
    )]
    NoCertificate { path: PathBuf },
    #[error(
        "{path} does not read as PEM ({detail}); convert it with openssl, for example `openssl x509 -in FILE.der -inform der -out FILE.pem`"
    )]
    NotPem { path: PathBuf, detail: String },
    #[error(
        "{path} holds no private key (PEM PKCS#8 `BEGIN PRIVATE KEY`, `BEGIN RSA PRIVATE KEY` or `BEGIN EC PRIVATE KEY`); an encrypted key must be decrypted to a file only the node's account may read"
    )]
    NoPrivateKey { path: PathBuf },
    #[error("{path} may be read by every account on this machine (mode {mode:o}): `chmod o-rwx {path}` so that only its owner (and its group, such as ssl-cert) may read it", path = path.display())]
    KeyReadableByOthers { path: PathBuf, mode: u32 },
    #[error(
        "the private key in {key} cannot be used: {detail}; RSA (2048 bits or more), ECDSA P-256/P-384 and Ed25519 keys are supported"
    )]
    UnusableKey { key: PathBuf, detail: String },
    #[error(
        "the private key in {key} is not the key of the certificate in {certificate}: give the key the certificate was issued for"
    )]
    KeyMismatch { certificate: PathBuf, key: PathBuf },
    #[error("the certificate in {certificate} does not read: {detail}")]
    BadCertificate {
        certificate: PathBuf,
        detail: String,
    },
}

impl TlsSetupError {
    fn read(path: &Path) -> impl FnOnce(std::io::Error) -> TlsSetupError + '_ {
        move |source| TlsSetupError::Read {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The certificate the view serves, with what it was loaded from, and re-read when the
/// files change. A renewal that does not load (the certificate written before its key, say)
/// leaves the last good pair in service, and is tried again when the files change again.
pub struct ServedCertificate {
    files: TlsFiles,
    state: Mutex<Served>,
}

struct Served {
    pair: Arc<CertifiedKey>,
    /// The files' modification times when last loaded, or last tried.
    stamp: FileStamp,
    looked_at: Instant,
}

type FileStamp = (Option<SystemTime>, Option<SystemTime>);

impl std::fmt::Debug for ServedCertificate {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ServedCertificate")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ServedCertificate {
    /// Loads the pair, or says what is wrong with it.
    pub fn load(files: TlsFiles) -> Result<Arc<ServedCertificate>, TlsSetupError> {
        let stamp = stamp_of(&files);
        let pair = Arc::new(load_pair(&files)?);
        Ok(Arc::new(ServedCertificate {
            files,
            state: Mutex::new(Served {
                pair,
                stamp,
                looked_at: Instant::now(),
            }),
        }))
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The pair to serve now, after loading a renewed one if the files changed since they
    /// were last looked at (at most every [`RECHECK_EVERY`]).
    pub fn current(&self) -> Arc<CertifiedKey> {
        let mut served = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if served.looked_at.elapsed() >= RECHECK_EVERY {
            served.looked_at = Instant::now();
            let stamp = stamp_of(&self.files);
            if stamp != served.stamp {
                served.stamp = stamp;
                match load_pair(&self.files) {
                    Ok(pair) => {
                        tracing::info!(
                            certificate = %self.files.certificate.display(),
                            "the view's certificate changed on disk; serving the new one"
                        );
                        served.pair = Arc::new(pair);
                    }
                    Err(error) => tracing::warn!(
                        %error,
                        "the view's certificate files changed but do not load; still serving the previous certificate"
                    ),
                }
            }
        }
        served.pair.clone()
    }
}

impl ResolvesServerCert for ServedCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The rustls configuration of the view's HTTPS: TLS 1.2 and 1.3 with rustls' safe defaults
/// on ring, no client certificates (clinicians and API clients authenticate with launch and
/// access tokens), HTTP/1.1 (what the view's server speaks).
pub fn server_config(certificate: Arc<ServedCertificate>) -> Arc<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports rustls' default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(certificate);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn stamp_of(files: &TlsFiles) -> FileStamp {
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    (modified(&files.certificate), modified(&files.private_key))
}

/// Reads and checks the certificate chain and its key: PEM, the key private to the node's
/// account (and group), and the key the certificate's.
pub fn load_pair(files: &TlsFiles) -> Result<CertifiedKey, TlsSetupError> {
    let certificate_pem = read_bounded(&files.certificate)?;
    let chain = CertificateDer::pem_slice_iter(&certificate_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsSetupError::NotPem {
            path: files.certificate.clone(),
            detail: error.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsSetupError::NoCertificate {
            path: files.certificate.clone(),
        });
    }
    check_key_is_private(&files.private_key)?;
    let key_pem = read_bounded(&files.private_key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|error| match error {
        rustls::pki_types::pem::Error::NoItemsFound => TlsSetupError::NoPrivateKey {
            path: files.private_key.clone(),
        },
        other => TlsSetupError::NotPem {
            path: files.private_key.clone(),
            detail: other.to_string(),
        },
    })?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|error| match error {
        rustls::Error::InconsistentKeys(_) => TlsSetupError::KeyMismatch {
            certificate: files.certificate.clone(),
            key: files.private_key.clone(),
        },
        rustls::Error::InvalidCertificate(detail) => TlsSetupError::BadCertificate {
            certificate: files.certificate.clone(),
            detail: format!("{detail:?}"),
        },
        other => TlsSetupError::UnusableKey {
            key: files.private_key.clone(),
            detail: other.to_string(),
        },
    })
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    let size = std::fs::metadata(path)
        .map_err(TlsSetupError::read(path))?
        .len();
    if size > MAX_PEM_FILE {
        return Err(TlsSetupError::TooLarge {
            path: path.to_path_buf(),
            size,
        });
    }
    std::fs::read(path).map_err(TlsSetupError::read(path))
}

/// A private key any account may read is not private. Group read is allowed: Debian keeps
/// the organisation's keys in /etc/ssl/private, mode 0640, group ssl-cert.
fn check_key_is_private(path: &Path) -> Result<(), TlsSetupError> {
    let mode = std::fs::metadata(path)
        .map_err(TlsSetupError::read(path))?
        .mode()
        & 0o7777;
    if mode & 0o007 != 0 {
        return Err(TlsSetupError::KeyReadableByOthers {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A self-signed certificate for `name`, written with its key (mode 0600) to `dir`.
    fn write_pair(dir: &Path, name: &str) -> TlsFiles {
        let made = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        let files = TlsFiles {
            certificate: dir.join(format!("{name}.crt")),
            private_key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.certificate, made.cert.pem()).unwrap();
        std::fs::write(&files.private_key, made.signing_key.serialize_pem()).unwrap();
        std::fs::set_permissions(&files.private_key, std::fs::Permissions::from_mode(0o600))
            .unwrap();
        files
    }

    #[test]
    fn a_pair_loads_and_a_mismatched_or_public_key_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let good = write_pair(dir.path(), "view.example.nhs.uk");
        assert!(load_pair(&good).is_ok());

        let other = write_pair(dir.path(), "other.example.nhs.uk");
        let mismatched = TlsFiles {
            certificate: good.certificate.clone(),
            private_key: other.private_key.clone(),
        };
        let error = load_pair(&mismatched).unwrap_err();
        assert!(
            matches!(error, TlsSetupError::KeyMismatch { .. }),
            "{error}"
        );

        std::fs::set_permissions(&good.private_key, std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let error = load_pair(&good).unwrap_err();
        assert!(
            matches!(
                error,
                TlsSetupError::KeyReadableByOthers { mode: 0o644, .. }
            ),
            "{error}"
        );
        std::fs::set_permissions(&good.private_key, std::fs::Permissions::from_mode(0o640))
            .unwrap();
        assert!(load_pair(&good).is_ok(), "group read is allowed");
    }

    #[test]
    fn files_that_are_not_a_certificate_and_key_say_what_they_lack() {
        let dir = tempfile::tempdir().unwrap();
        let good = write_pair(dir.path(), "view.example.nhs.uk");
        let swapped = TlsFiles {
            certificate: good.private_key.clone(),
            private_key: good.certificate.clone(),
        };
        std::fs::set_permissions(&good.certificate, std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let error = load_pair(&swapped).unwrap_err();
        assert!(
            matches!(error, TlsSetupError::NoCertificate { .. }),
            "{error}"
        );
        let certificate_twice = TlsFiles {
            certificate: good.certificate.clone(),
            private_key: good.certificate.clone(),
        };
        let error = load_pair(&certificate_twice).unwrap_err();
        assert!(
            matches!(error, TlsSetupError::NoPrivateKey { .. }),
            "{error}"
        );
        let missing = TlsFiles {
            certificate: dir.path().join("absent.crt"),
            private_key: good.private_key.clone(),
        };
        let error = load_pair(&missing).unwrap_err();
        assert!(error.to_string().contains("absent.crt"), "{error}");
    }

    #[test]
    fn a_renewed_certificate_is_served_once_the_files_change_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_pair(dir.path(), "view.example.nhs.uk");
        let served = ServedCertificate::load(files.clone()).unwrap();
        let first = served.current().cert[0].clone();

        // Renewed: a new pair written over the old files.
        let renewed = write_pair(dir.path(), "renewed.example.nhs.uk");
        std::fs::copy(&renewed.certificate, &files.certificate).unwrap();
        std::fs::copy(&renewed.private_key, &files.private_key).unwrap();
        bump_modified(&files, 1);
        served.state.lock().unwrap().looked_at = Instant::now() - RECHECK_EVERY;
        let second = served.current().cert[0].clone();
        assert_ne!(first, second, "the renewed certificate is served");

        // Half-written: a certificate without its key is not served.
        let third = write_pair(dir.path(), "third.example.nhs.uk");
        std::fs::copy(&third.certificate, &files.certificate).unwrap();
        bump_modified(&files, 2);
        served.state.lock().unwrap().looked_at = Instant::now() - RECHECK_EVERY;
        assert_eq!(served.current().cert[0], second, "the last good pair stays");
    }

    /// Modification times can be equal within a filesystem's resolution: set them apart.
    fn bump_modified(files: &TlsFiles, step: u64) {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + step);
        for path in [&files.certificate, &files.private_key] {
            let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            file.set_modified(at).unwrap();
        }
    }
}
