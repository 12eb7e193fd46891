//! TLS for sync: certificates bound to the organisation's key, and verifiers that trust
//! exactly the keys the trust registry lists.
//!
//! Each node presents a self-signed Ed25519 certificate made (with rcgen) from its
//! organisation's signing key, so the TLS identity and the document-signing identity are one
//! key. Both sides verify the other's handshake signature with the key in the certificate and
//! accept the peer only if the registry lists that key, unrevoked. Certificate names, dates
//! and issuers play no part: trust rests on pinned keys, and rustls' wall-clock date checks
//! never run. Only TLS 1.3 (QUIC's) on the ring provider.

use crate::trust::TrustState;
use caremesh_sync::{KeyRefusal, OdsCode, PublisherKey};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::sync::Arc;

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE { AlgorithmIdentifier
/// { id-Ed25519 }, BIT STRING }. The 32 key bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("could not make the node's TLS certificate from its signing key: {0}")]
    Certificate(String),
    #[error("TLS configuration failed: {0}")]
    Config(String),
}

/// The node's certificate chain and private key, both derived from its signing key.
pub struct NodeIdentity {
    pub certificate: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl NodeIdentity {
    pub fn from_key(key: &PublisherKey, ods: &OdsCode) -> Result<NodeIdentity, TlsError> {
        let pkcs8 = ed25519_pkcs8_v2(&key.secret(), &key.public());
        let key_pair = rcgen::KeyPair::try_from(pkcs8.as_slice())
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(vec![format!(
            "{}.caremesh.invalid",
            ods.as_str().to_ascii_lowercase()
        )])
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, ods.as_str());
        let certificate = params
            .self_signed(&key_pair)
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        Ok(NodeIdentity {
            certificate: certificate.der().clone(),
            key: PrivatePkcs8KeyDer::from(pkcs8),
        })
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

/// PKCS#8 v2 (RFC 5958 / 8410) for an Ed25519 key: the form ring reads.
fn ed25519_pkcs8_v2(secret: &[u8; 32], public: &[u8; 32]) -> Vec<u8> {
    let mut der = vec![
        0x30, 0x53, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(secret);
    der.extend_from_slice(&[0xa1, 0x23, 0x03, 0x21, 0x00]);
    der.extend_from_slice(public);
    debug_assert_eq!(der.len(), 0x55);
    der
}

/// The Ed25519 key a certificate carries, if it carries one.
pub fn certificate_key(certificate: &CertificateDer<'_>) -> Option<[u8; 32]> {
    let parsed = webpki::EndEntityCert::try_from(certificate).ok()?;
    let spki = parsed.subject_public_key_info();
    let bytes: &[u8] = spki.as_ref();
    let key = bytes.strip_prefix(&ED25519_SPKI_PREFIX[..])?;
    key.try_into().ok()
}

pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts a peer certificate only if its key is listed, unrevoked, in the registry (and,
/// when dialling, belongs to the organisation we meant to reach).
#[derive(Debug)]
struct PinnedKeys {
    trust: TrustState,
    algorithms: WebPkiSupportedAlgorithms,
    /// When dialling: the organisation the peer must be.
    expected: Option<OdsCode>,
}

impl PinnedKeys {
    fn check(&self, certificate: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let Some(key) = certificate_key(certificate) else {
            return Err(refuse("certificate does not carry an Ed25519 key"));
        };
        let registry = self.trust.current();
        match registry.standing(&key).holder(self.expected.as_ref()) {
            Ok(_) => Ok(()),
            Err(KeyRefusal::OtherOrganisation(org)) => Err(refuse(&format!(
                "peer key belongs to {}, not {}",
                org.ods,
                self.expected.as_ref().map(OdsCode::as_str).unwrap_or("-")
            ))),
            Err(KeyRefusal::Revoked(org)) => Err(refuse(&format!(
                "peer key {} of {} is revoked in the trust registry",
                hex::encode(key),
                org.ods
            ))),
            Err(KeyRefusal::Retired(org)) => Err(refuse(&format!(
                "peer key {} of {} is retired in the trust registry; the node must use its current key",
                hex::encode(key),
                org.ods
            ))),
            Err(KeyRefusal::Unknown) => Err(refuse(&format!(
                "peer key {} is not in the trust registry",
                hex::encode(key)
            ))),
        }
    }

    fn verify_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, certificate, signature, &self.algorithms)
    }
}

fn refuse(reason: &str) -> rustls::Error {
    rustls::Error::General(format!("caremesh refused peer: {reason}"))
}

impl ServerCertVerifier for PinnedKeys {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(refuse("TLS 1.2 is not used by caremesh"))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for PinnedKeys {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(refuse("TLS 1.2 is not used by caremesh"))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

fn pinned(trust: &TrustState, expected: Option<OdsCode>) -> Arc<PinnedKeys> {
    Arc::new(PinnedKeys {
        trust: trust.clone(),
        algorithms: crypto_provider().signature_verification_algorithms,
        expected,
    })
}

/// rustls server config for accepting peers: client certificates are mandatory.
pub fn server_config(
    identity: &NodeIdentity,
    trust: &TrustState,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(pinned(trust, None))
        .with_single_cert(vec![identity.certificate.clone()], identity.private_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![caremesh_sync::wire::ALPN.to_vec()];
    Ok(config)
}

/// rustls client config for dialling `expected`.
pub fn client_config(
    identity: &NodeIdentity,
    trust: &TrustState,
    expected: Option<OdsCode>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(pinned(trust, expected))
        .with_client_auth_cert(vec![identity.certificate.clone()], identity.private_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![caremesh_sync::wire::ALPN.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_certificate_carries_the_organisation_signing_key() {
        let key = PublisherKey::from_secret([9; 32]);
        let identity = NodeIdentity::from_key(&key, &OdsCode::parse("A81001").unwrap()).unwrap();
        assert_eq!(certificate_key(&identity.certificate), Some(key.public()));
    }
}
