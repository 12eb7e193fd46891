//! How the view (and the FHIR API on it) is served: plain HTTP on loopback, for a view opened
//! by a clinical system on the same machine, or HTTPS with the organisation's certificate for
//! anything else. Plain HTTP where other machines can reach it is refused unless the
//! operator said so in as many words: the view carries patient data and session cookies.

use crate::home::ViewConfig;
use caremesh_view::web::tls::{ServedCertificate, TlsFiles, TlsSetupError};
use std::net::ToSocketAddrs;
use std::path::Path;
use std::sync::Arc;

pub enum ViewTransport {
    /// Plain HTTP: on loopback, or beyond it because the operator said so.
    Http,
    Https(Arc<ServedCertificate>),
}

impl ViewTransport {
    pub fn scheme(&self) -> &'static str {
        match self {
            ViewTransport::Http => "http",
            ViewTransport::Https(_) => "https",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ViewTransportError {
    #[error(
        "the view's listen address {listen} does not resolve to an address: {reason}; give HOST:PORT, such as 127.0.0.1:7800"
    )]
    Unresolved { listen: String, reason: String },
    #[error(
        "the view would serve patient data over plain HTTP on {listen}, where other machines can reach it. \
         Give it the organisation's certificate (`caremesh init --tls-certificate FILE --tls-private-key FILE`, \
         or `tls_certificate` and `tls_private_key` under [view] in caremesh.toml), or listen on loopback \
         (127.0.0.1:PORT) for a clinical system on this machine. Only where something else encrypts the link \
         (a TLS proxy on a private network), say so with `plain_http_beyond_loopback = true` under [view] \
         (`caremesh init --plain-http-beyond-loopback`)"
    )]
    PlainHttpBeyondLoopback { listen: String },
    #[error(
        "HTTPS needs both the certificate and its private key: [view] sets {given} but not {missing}"
    )]
    HalfConfigured {
        given: &'static str,
        missing: &'static str,
    },
    #[error("the view's HTTPS certificate: {0}")]
    Certificate(#[from] TlsSetupError),
}

/// Decides how the view at `listen` is served under `config` (relative paths in it are
/// resolved against `home_dir`), loading and checking the certificate when there is one.
pub fn view_transport(
    config: &ViewConfig,
    home_dir: &Path,
    listen: &str,
) -> Result<ViewTransport, ViewTransportError> {
    match (&config.tls_certificate, &config.tls_private_key) {
        (Some(certificate), Some(private_key)) => {
            let files = TlsFiles {
                certificate: home_dir.join(certificate),
                private_key: home_dir.join(private_key),
            };
            Ok(ViewTransport::Https(ServedCertificate::load(files)?))
        }
        (Some(_), None) => Err(ViewTransportError::HalfConfigured {
            given: "tls_certificate",
            missing: "tls_private_key",
        }),
        (None, Some(_)) => Err(ViewTransportError::HalfConfigured {
            given: "tls_private_key",
            missing: "tls_certificate",
        }),
        (None, None) => {
            if !config.plain_http_beyond_loopback && !is_loopback(listen)? {
                return Err(ViewTransportError::PlainHttpBeyondLoopback {
                    listen: listen.to_string(),
                });
            }
            Ok(ViewTransport::Http)
        }
    }
}

/// Whether every address `listen` names is a loopback one (`localhost` may be both
/// 127.0.0.1 and ::1; 0.0.0.0 is every interface, so not loopback).
fn is_loopback(listen: &str) -> Result<bool, ViewTransportError> {
    let unresolved = |reason: String| ViewTransportError::Unresolved {
        listen: listen.to_string(),
        reason,
    };
    let addresses: Vec<_> = listen
        .to_socket_addrs()
        .map_err(|error| unresolved(error.to_string()))?
        .collect();
    if addresses.is_empty() {
        return Err(unresolved("no address".into()));
    }
    Ok(addresses.iter().all(|address| address.ip().is_loopback()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_is_for_loopback_unless_the_operator_says_otherwise() {
        let home = Path::new("/nonexistent");
        let plain = ViewConfig::default();
        for listen in [
            "127.0.0.1:7800",
            "[::1]:7800",
            "localhost:7800",
            "127.0.0.1:0",
        ] {
            assert!(
                matches!(
                    view_transport(&plain, home, listen),
                    Ok(ViewTransport::Http)
                ),
                "{listen}"
            );
        }
        for listen in ["0.0.0.0:7800", "[::]:7800", "10.1.2.3:7800"] {
            let refused = view_transport(&plain, home, listen).err().unwrap();
            assert!(
                matches!(refused, ViewTransportError::PlainHttpBeyondLoopback { .. }),
                "{listen}: {refused}"
            );
            assert!(refused.to_string().contains("--tls-certificate"));
        }
        let told = ViewConfig {
            plain_http_beyond_loopback: true,
            ..ViewConfig::default()
        };
        assert!(matches!(
            view_transport(&told, home, "0.0.0.0:7800"),
            Ok(ViewTransport::Http)
        ));
        assert!(matches!(
            view_transport(&plain, home, "no port here"),
            Err(ViewTransportError::Unresolved { .. })
        ));
    }

    #[test]
    fn a_certificate_without_its_key_is_refused_before_anything_listens() {
        let half = ViewConfig {
            tls_certificate: Some("view.crt".into()),
            ..ViewConfig::default()
        };
        let refused = view_transport(&half, Path::new("/x"), "0.0.0.0:443")
            .err()
            .unwrap();
        assert!(refused.to_string().contains("tls_private_key"), "{refused}");
        let absent = ViewConfig {
            tls_certificate: Some("view.crt".into()),
            tls_private_key: Some("view.key".into()),
            ..ViewConfig::default()
        };
        let refused = view_transport(&absent, Path::new("/nonexistent-home"), "0.0.0.0:443")
            .err()
            .unwrap();
        assert!(
            refused.to_string().contains("/nonexistent-home/view.crt"),
            "{refused}"
        );
    }
}
