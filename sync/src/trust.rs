//! The trust registry: which organisations exist in a region, with which keys.
//!
//! A regional authority signs the registry with its ed25519 key; every node pins the
//! authority's public key in its config. Everything else rests on the registry: a TLS peer is
//! accepted only if its certificate's key is listed and not revoked, and a document is stored
//! only if its signed heads verify with a listed, unrevoked key of its publisher. Certificate
//! dates and web PKI play no part.
//!
//! The registry is JSON on disk so operators can read it; the signature covers a canonical
//! postcard encoding of the parsed registry (organisations sorted by ODS code, keys sorted),
//! so re-formatting the JSON never breaks it and re-ordering entries cannot change its meaning.

use crate::model::{OdsCode, OrgKind};
use crate::policy::{AgreementError, Agreements};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

const REGISTRY_CONTEXT: &[u8] = b"caremesh/trust-registry/v1\0";

/// Upper bound on a registry file: a region of thousands of organisations fits easily.
pub const MAX_REGISTRY_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TrustError {
    #[error("the trust registry is not signed; sign it with `caremesh trust sign`")]
    Unsigned,
    #[error(
        "the trust registry is signed by authority key {found}, but this node pins {pinned}; get the registry from your regional authority or fix [sync] authority in the config"
    )]
    WrongAuthority { found: String, pinned: String },
    #[error(
        "the trust registry's signature does not verify: the file was altered after signing; fetch a fresh copy from the authority"
    )]
    BadSignature,
    #[error("the trust registry is not valid JSON: {0}")]
    Malformed(String),
    #[error("the trust registry is {0} bytes, over the {MAX_REGISTRY_BYTES} byte limit")]
    TooLarge(usize),
    #[error("{what} `{value}` in the trust registry is not a 32-byte hex ed25519 public key")]
    BadKey { what: &'static str, value: String },
    #[error("organisation {0} is listed twice in the trust registry")]
    DuplicateOrganisation(String),
    #[error("key {key} is listed for both {first} and {second}; a key identifies one organisation")]
    SharedKey {
        key: String,
        first: String,
        second: String,
    },
    #[error(
        "key {key} is listed twice for {ods} (among current, revoked and retired keys); a key has one standing"
    )]
    KeyListedTwice { key: String, ods: String },
    #[error("organisation {0} is not in the trust registry")]
    UnknownOrganisation(String),
    #[error("the trust registry's sharing agreements are invalid: {0}")]
    Agreements(#[from] AgreementError),
}

/// One organisation in the region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Organisation {
    pub ods: OdsCode,
    pub name: String,
    pub kind: OrgKind,
    /// Current ed25519 public keys, hex. More than one during a key rollover.
    pub keys: Vec<String>,
    /// Keys that must no longer be trusted, hex: compromised, or withdrawn for cause. What
    /// they signed is refused, and what a node already holds from them is hidden from every
    /// view (with a notice naming the organisation) until it is published again with a
    /// trusted key. Kept so the refusal can say why.
    #[serde(default)]
    pub revoked_keys: Vec<String>,
    /// Keys the organisation no longer signs with (a routine rollover), hex. New signatures
    /// by them are refused; what they signed while current stays trusted.
    #[serde(default)]
    pub retired_keys: Vec<String>,
    /// Where the organisation's node accepts sync connections (host:port), if it does.
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// The registry's content: what the authority signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    pub region: String,
    /// Increases with every signed edition; nodes take a newer edition from any peer.
    pub version: u64,
    /// Unix seconds when this edition was signed.
    pub issued_at: i64,
    pub organisations: Vec<Organisation>,
    /// The region's sharing agreements: every node enforces the same ones because the
    /// authority signs them with the organisations.
    #[serde(default)]
    pub sharing: Agreements,
}

/// The registry file: content plus the authority's signature, if signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryFile {
    pub registry: Registry,
    pub signature: Option<AuthoritySignature>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthoritySignature {
    /// The authority's public key, hex.
    pub authority: String,
    /// ed25519 signature, hex.
    pub signature: String,
}

/// How a key stands in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyStanding<'a> {
    Trusted(&'a Organisation),
    /// Compromised or withdrawn for cause: nothing it signed is trusted.
    Revoked(&'a Organisation),
    /// Rolled over: what it signed while current is trusted, nothing new.
    Retired(&'a Organisation),
    Unknown,
}

impl<'a> KeyStanding<'a> {
    /// The organisation a key so standing stands for now (of `expected`, when given): see
    /// [`Registry::current_holder`].
    pub fn holder(self, expected: Option<&OdsCode>) -> Result<&'a Organisation, KeyRefusal<'a>> {
        match self {
            KeyStanding::Trusted(org) if expected.is_none_or(|ods| *ods == org.ods) => Ok(org),
            KeyStanding::Trusted(org) => Err(KeyRefusal::OtherOrganisation(org)),
            KeyStanding::Revoked(org) => Err(KeyRefusal::Revoked(org)),
            KeyStanding::Retired(org) => Err(KeyRefusal::Retired(org)),
            KeyStanding::Unknown => Err(KeyRefusal::Unknown),
        }
    }

    /// Whether what a key so standing signed for `publisher` while it held the key is still
    /// trusted: a current or retired key of the publisher's, not a revoked one.
    pub fn signed_for(self, publisher: &OdsCode) -> bool {
        match self {
            KeyStanding::Trusted(org) | KeyStanding::Retired(org) => org.ods == *publisher,
            KeyStanding::Revoked(_) | KeyStanding::Unknown => false,
        }
    }
}

/// Why a key does not stand for the organisation it was expected to ([`Registry::current_holder`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRefusal<'a> {
    /// A current key, of another organisation.
    OtherOrganisation(&'a Organisation),
    Revoked(&'a Organisation),
    Retired(&'a Organisation),
    Unknown,
}

/// A registry whose signature has been checked against the pinned authority.
#[derive(Debug, Clone)]
pub struct VerifiedRegistry {
    file: RegistryFile,
    /// The exact bytes verified, so they can be passed on to peers unchanged.
    bytes: Vec<u8>,
    index: RegistryIndex,
}

/// Where a verified registry lists each organisation and key, so that the checks every
/// received document and every decision make (a key's standing, an organisation's kind) are
/// lookups, not scans of every organisation's key lists: at 500 organisations those scans
/// were 2.4% of a hub's CPU under load. A verified registry is canonical (each key listed
/// once, `Registry::normalise`) and never changes, so the index is built once.
#[derive(Debug, Clone, Default)]
struct RegistryIndex {
    by_ods: std::collections::HashMap<OdsCode, usize>,
    by_key: std::collections::HashMap<[u8; 32], (usize, Listing)>,
}

#[derive(Debug, Clone, Copy)]
enum Listing {
    Current,
    Revoked,
    Retired,
}

impl RegistryIndex {
    fn of(registry: &Registry) -> RegistryIndex {
        let mut index = RegistryIndex::default();
        for (at, org) in registry.organisations.iter().enumerate() {
            index.by_ods.entry(org.ods.clone()).or_insert(at);
            for (keys, listing) in [
                (&org.revoked_keys, Listing::Revoked),
                (&org.keys, Listing::Current),
                (&org.retired_keys, Listing::Retired),
            ] {
                for key in keys {
                    // A key that does not parse can match no key presented.
                    if let Ok(bytes) = parse_key("key", key) {
                        index.by_key.entry(bytes).or_insert((at, listing));
                    }
                }
            }
        }
        index
    }
}

impl Registry {
    pub fn new(region: &str) -> Registry {
        Registry {
            region: region.to_string(),
            version: 0,
            issued_at: 0,
            organisations: Vec::new(),
            sharing: Agreements::default(),
        }
    }

    /// Sorts into canonical order and checks keys and uniqueness.
    pub fn normalise(&mut self) -> Result<(), TrustError> {
        self.sharing.validate()?;
        self.organisations.sort_by(|a, b| a.ods.cmp(&b.ods));
        let mut owners: std::collections::HashMap<[u8; 32], &OdsCode> = Default::default();
        for pair in self.organisations.windows(2) {
            if pair[0].ods == pair[1].ods {
                return Err(TrustError::DuplicateOrganisation(pair[0].ods.to_string()));
            }
        }
        for org in &mut self.organisations {
            for keys in [&mut org.keys, &mut org.revoked_keys, &mut org.retired_keys] {
                for key in keys.iter_mut() {
                    *key = key.trim().to_ascii_lowercase();
                }
                keys.sort();
                keys.dedup();
            }
        }
        for org in &self.organisations {
            let mut listed = std::collections::HashSet::new();
            for key in org
                .keys
                .iter()
                .chain(&org.revoked_keys)
                .chain(&org.retired_keys)
            {
                let bytes = parse_key("key", key)?;
                if !listed.insert(bytes) {
                    return Err(TrustError::KeyListedTwice {
                        key: key.clone(),
                        ods: org.ods.to_string(),
                    });
                }
                if let Some(first) = owners.insert(bytes, &org.ods)
                    && *first != org.ods
                {
                    return Err(TrustError::SharedKey {
                        key: key.clone(),
                        first: first.to_string(),
                        second: org.ods.to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    fn signing_payload(&self) -> Vec<u8> {
        let mut payload = REGISTRY_CONTEXT.to_vec();
        payload.extend(postcard::to_stdvec(self).expect("registry always encodes"));
        payload
    }

    pub fn organisation(&self, ods: &OdsCode) -> Option<&Organisation> {
        self.organisations.iter().find(|org| org.ods == *ods)
    }

    pub fn organisation_mut(&mut self, ods: &OdsCode) -> Option<&mut Organisation> {
        self.organisations.iter_mut().find(|org| org.ods == *ods)
    }

    /// How `key` stands: trusted for one organisation, revoked, or not listed.
    pub fn standing(&self, key: &[u8; 32]) -> KeyStanding<'_> {
        let key = hex::encode(key);
        for org in &self.organisations {
            if org.revoked_keys.contains(&key) {
                return KeyStanding::Revoked(org);
            }
            if org.keys.contains(&key) {
                return KeyStanding::Trusted(org);
            }
            if org.retired_keys.contains(&key) {
                return KeyStanding::Retired(org);
            }
        }
        KeyStanding::Unknown
    }

    /// Whether what `key` signed for `publisher` while it held the key is still trusted: a
    /// current or retired key of the publisher's, not a revoked one.
    pub fn signed_for(&self, publisher: &OdsCode, key: &[u8; 32]) -> bool {
        self.standing(key).signed_for(publisher)
    }

    /// Every revoked key, with the organisation it was revoked for.
    pub fn revoked_keys(&self) -> std::collections::BTreeMap<[u8; 32], OdsCode> {
        self.organisations
            .iter()
            .flat_map(|org| {
                org.revoked_keys
                    .iter()
                    .filter_map(|key| parse_key("revoked key", key).ok())
                    .map(|key| (key, org.ods.clone()))
            })
            .collect()
    }

    /// The organisation `key` stands for now (of `expected`, when given): the one every
    /// check of a live key asks, from a TLS handshake to an open session to a signature.
    pub fn current_holder(
        &self,
        key: &[u8; 32],
        expected: Option<&OdsCode>,
    ) -> Result<&Organisation, KeyRefusal<'_>> {
        self.standing(key).holder(expected)
    }

    /// Whether `key` may sign for `publisher`: listed for it and not revoked.
    pub fn is_publisher_key(&self, publisher: &OdsCode, key: &[u8; 32]) -> bool {
        self.current_holder(key, Some(publisher)).is_ok()
    }
}

impl RegistryFile {
    pub fn unsigned(registry: Registry) -> RegistryFile {
        RegistryFile {
            registry,
            signature: None,
        }
    }

    pub fn parse(bytes: &[u8]) -> Result<RegistryFile, TrustError> {
        if bytes.len() > MAX_REGISTRY_BYTES {
            return Err(TrustError::TooLarge(bytes.len()));
        }
        serde_json::from_slice(bytes).map_err(|e| TrustError::Malformed(e.to_string()))
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut text = serde_json::to_vec_pretty(self).expect("registry always serialises");
        text.push(b'\n');
        text
    }

    /// Signs a new edition: bumps the version, stamps `issued_at`, normalises, signs.
    pub fn sign(&mut self, authority_secret: &[u8; 32], issued_at: i64) -> Result<(), TrustError> {
        self.registry.normalise()?;
        self.registry.version += 1;
        self.registry.issued_at = issued_at;
        let signing = SigningKey::from_bytes(authority_secret);
        let signature = signing.sign(&self.registry.signing_payload());
        self.signature = Some(AuthoritySignature {
            authority: hex::encode(signing.verifying_key().to_bytes()),
            signature: hex::encode(signature.to_bytes()),
        });
        Ok(())
    }

    /// Checks the signature against the pinned authority key.
    pub fn verify(&self, pinned_authority: &[u8; 32]) -> Result<(), TrustError> {
        let Some(signed) = &self.signature else {
            return Err(TrustError::Unsigned);
        };
        let found = parse_key("authority key", &signed.authority)?;
        if found != *pinned_authority {
            return Err(TrustError::WrongAuthority {
                found: signed.authority.clone(),
                pinned: hex::encode(pinned_authority),
            });
        }
        let signature: [u8; 64] = hex::decode(&signed.signature)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or(TrustError::BadSignature)?;
        let key = VerifyingKey::from_bytes(&found).map_err(|_| TrustError::BadKey {
            what: "authority key",
            value: signed.authority.clone(),
        })?;
        // The canonical form is what was signed; a registry edited out of canonical order
        // (or with a duplicate slipped in) fails here rather than being silently re-sorted.
        let mut canonical = self.registry.clone();
        canonical.normalise()?;
        if canonical != self.registry {
            return Err(TrustError::BadSignature);
        }
        key.verify_strict(
            &self.registry.signing_payload(),
            &Signature::from_bytes(&signature),
        )
        .map_err(|_| TrustError::BadSignature)
    }
}

impl VerifiedRegistry {
    /// No registry: a node before `caremesh trust install`. It names no organisation, so
    /// every peer is refused and nothing received could be trusted (deny unless allowed);
    /// its version 0 is older than any signed edition.
    pub fn none() -> VerifiedRegistry {
        VerifiedRegistry {
            file: RegistryFile {
                registry: Registry {
                    region: String::new(),
                    version: 0,
                    issued_at: 0,
                    organisations: Vec::new(),
                    sharing: Default::default(),
                },
                signature: None,
            },
            bytes: Vec::new(),
            index: RegistryIndex::default(),
        }
    }

    /// Parses and verifies registry bytes against the pinned authority key.
    pub fn from_bytes(
        bytes: Vec<u8>,
        pinned_authority: &[u8; 32],
    ) -> Result<VerifiedRegistry, TrustError> {
        let file = RegistryFile::parse(&bytes)?;
        file.verify(pinned_authority)?;
        let index = RegistryIndex::of(&file.registry);
        Ok(VerifiedRegistry { file, bytes, index })
    }

    pub fn registry(&self) -> &Registry {
        &self.file.registry
    }

    /// [`Registry::organisation`], looked up.
    pub fn organisation(&self, ods: &OdsCode) -> Option<&Organisation> {
        let at = *self.index.by_ods.get(ods)?;
        Some(&self.file.registry.organisations[at])
    }

    /// [`Registry::standing`], looked up.
    pub fn standing(&self, key: &[u8; 32]) -> KeyStanding<'_> {
        let Some(&(at, listing)) = self.index.by_key.get(key) else {
            return KeyStanding::Unknown;
        };
        let org = &self.file.registry.organisations[at];
        match listing {
            Listing::Current => KeyStanding::Trusted(org),
            Listing::Revoked => KeyStanding::Revoked(org),
            Listing::Retired => KeyStanding::Retired(org),
        }
    }

    pub fn version(&self) -> u64 {
        self.file.registry.version
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Parses a hex ed25519 public key.
pub fn parse_key(what: &'static str, value: &str) -> Result<[u8; 32], TrustError> {
    let bytes = hex::decode(value.trim()).map_err(|_| TrustError::BadKey {
        what,
        value: value.to_string(),
    })?;
    let key: [u8; 32] = bytes.try_into().map_err(|_| TrustError::BadKey {
        what,
        value: value.to_string(),
    })?;
    VerifyingKey::from_bytes(&key).map_err(|_| TrustError::BadKey {
        what,
        value: value.to_string(),
    })?;
    Ok(key)
}

/// The public key of an ed25519 secret.
pub fn public_key_of(secret: &[u8; 32]) -> [u8; 32] {
    SigningKey::from_bytes(secret).verifying_key().to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const AUTHORITY: [u8; 32] = [7; 32];

    fn org(ods: &str, key: [u8; 32]) -> Organisation {
        Organisation {
            ods: OdsCode::parse(ods).unwrap(),
            name: format!("Organisation {ods}"),
            kind: OrgKind::Gp,
            keys: vec![hex::encode(public_key_of(&key))],
            revoked_keys: vec![],
            retired_keys: Vec::new(),
            addresses: vec!["127.0.0.1:7900".into()],
        }
    }

    fn signed() -> RegistryFile {
        let mut registry = Registry::new("Thames Valley");
        registry.organisations.push(org("B81002", [2; 32]));
        registry.organisations.push(org("A81001", [1; 32]));
        let mut file = RegistryFile::unsigned(registry);
        file.sign(&AUTHORITY, 1_700_000_000).unwrap();
        file
    }

    /// The verified registry's index answers every lookup exactly as a scan of the registry
    /// does: for each organisation, and for every key current, revoked, retired or unknown.
    #[test]
    fn a_verified_registrys_lookups_answer_as_its_scans_do() {
        let mut registry = Registry::new("Thames Valley");
        let mut presented = vec![public_key_of(&[200; 32])];
        for n in 0..40u8 {
            let mut organisation = org(&format!("A{:05}", 81_000 + n as u32), [n + 1; 32]);
            let revoked = public_key_of(&[n + 100; 32]);
            let retired = public_key_of(&[n + 150; 32]);
            if n % 3 == 0 {
                organisation.revoked_keys.push(hex::encode(revoked));
            }
            if n % 4 == 0 {
                organisation.retired_keys.push(hex::encode(retired));
            }
            presented.extend([public_key_of(&[n + 1; 32]), revoked, retired]);
            registry.organisations.push(organisation);
        }
        let mut file = RegistryFile::unsigned(registry);
        file.sign(&AUTHORITY, 1_700_000_000).unwrap();
        let verified =
            VerifiedRegistry::from_bytes(file.to_json(), &public_key_of(&AUTHORITY)).unwrap();
        let scanned = verified.registry();
        let mut known = 0;
        for key in &presented {
            assert_eq!(verified.standing(key), scanned.standing(key));
            known += usize::from(verified.standing(key) != KeyStanding::Unknown);
            for org in &scanned.organisations {
                assert_eq!(
                    verified.standing(key).holder(Some(&org.ods)).is_ok(),
                    scanned.is_publisher_key(&org.ods, key)
                );
                assert_eq!(
                    verified.standing(key).signed_for(&org.ods),
                    scanned.signed_for(&org.ods, key)
                );
            }
        }
        assert_eq!(known, 40 + 14 + 10, "every listed key is found");
        for org in &scanned.organisations {
            assert_eq!(verified.organisation(&org.ods), Some(org));
        }
        assert_eq!(
            verified.organisation(&OdsCode::parse("Z99999").unwrap()),
            None
        );
    }

    #[test]
    fn a_signed_registry_verifies_after_a_json_round_trip() {
        let file = signed();
        assert_eq!(file.registry.version, 1);
        assert_eq!(file.registry.organisations[0].ods.as_str(), "A81001");
        let verified =
            VerifiedRegistry::from_bytes(file.to_json(), &public_key_of(&AUTHORITY)).unwrap();
        let a81001 = OdsCode::parse("A81001").unwrap();
        assert!(
            verified
                .registry()
                .is_publisher_key(&a81001, &public_key_of(&[1; 32]))
        );
        assert!(
            !verified
                .registry()
                .is_publisher_key(&a81001, &public_key_of(&[2; 32]))
        );
    }

    #[test]
    fn any_edit_after_signing_breaks_the_signature() {
        let pinned = public_key_of(&AUTHORITY);
        let mut renamed = signed();
        renamed.registry.organisations[0].name.push('!');
        assert_eq!(renamed.verify(&pinned), Err(TrustError::BadSignature));

        let mut added_key = signed();
        added_key.registry.organisations[1]
            .keys
            .push(hex::encode(public_key_of(&[9; 32])));
        assert_eq!(added_key.verify(&pinned), Err(TrustError::BadSignature));

        let mut reordered = signed();
        reordered.registry.organisations.reverse();
        assert_eq!(reordered.verify(&pinned), Err(TrustError::BadSignature));
    }

    #[test]
    fn a_registry_signed_by_another_authority_or_unsigned_is_refused() {
        let file = signed();
        assert!(matches!(
            file.verify(&public_key_of(&[8; 32])),
            Err(TrustError::WrongAuthority { .. })
        ));
        let unsigned = RegistryFile::unsigned(file.registry.clone());
        assert_eq!(
            unsigned.verify(&public_key_of(&AUTHORITY)),
            Err(TrustError::Unsigned)
        );
    }

    #[test]
    fn a_revoked_key_is_neither_trusted_nor_unknown() {
        let mut file = signed();
        let key = public_key_of(&[1; 32]);
        let org = &mut file.registry.organisations[0];
        org.revoked_keys = std::mem::take(&mut org.keys);
        file.sign(&AUTHORITY, 1_700_000_100).unwrap();
        assert_eq!(file.registry.version, 2);
        assert!(matches!(
            file.registry.standing(&key),
            KeyStanding::Revoked(org) if org.ods.as_str() == "A81001"
        ));
        assert!(
            !file
                .registry
                .is_publisher_key(&OdsCode::parse("A81001").unwrap(), &key)
        );
        assert_eq!(
            file.registry.standing(&public_key_of(&[5; 32])),
            KeyStanding::Unknown
        );
    }

    #[test]
    fn one_key_for_two_organisations_is_refused() {
        let mut registry = Registry::new("r");
        registry.organisations.push(org("A81001", [1; 32]));
        registry.organisations.push(org("B81002", [1; 32]));
        assert!(matches!(
            registry.normalise(),
            Err(TrustError::SharedKey { .. })
        ));
    }

    #[test]
    fn garbage_and_oversized_registries_are_refused_with_a_reason() {
        assert!(matches!(
            RegistryFile::parse(b"{not json"),
            Err(TrustError::Malformed(_))
        ));
        assert!(matches!(
            RegistryFile::parse(&vec![b' '; MAX_REGISTRY_BYTES + 1]),
            Err(TrustError::TooLarge(_))
        ));
    }
}
