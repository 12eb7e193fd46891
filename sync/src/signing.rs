//! Signed heads: a publisher's statement "this is my document at these heads".
//!
//! Automerge does not sign changes. Each change's hash covers its dependencies, so the heads
//! of a document commit to its whole history: one signature over (partition, heads) with the
//! publisher's ed25519 key authenticates every change behind those heads. Relays such as hubs
//! forward the publisher's statement unchanged, so authenticity holds end to end.

use crate::model::{DocId, DocMeta};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Domain separation: a signature made for one purpose never verifies for another.
const HEADS_CONTEXT: &[u8] = b"caremesh/signed-heads/v1\0";
const CHECKPOINT_CONTEXT: &[u8] = b"caremesh/audit-checkpoint/v1\0";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error(
        "signature on document {doc} does not verify with key {key}: the document or its signature was altered"
    )]
    BadSignature { doc: DocId, key: String },
    #[error(
        "document {doc} was signed with key {key}, which is not a trusted key of publisher {publisher}"
    )]
    UntrustedKey {
        doc: DocId,
        key: String,
        publisher: String,
    },
    #[error("public key bytes are not a valid ed25519 key")]
    MalformedKey,
}

/// An organisation's signing key. The secret never leaves this type except to be written to
/// the key file by the node.
pub struct PublisherKey {
    signing: SigningKey,
}

impl PublisherKey {
    pub fn from_secret(secret: [u8; 32]) -> Self {
        PublisherKey {
            signing: SigningKey::from_bytes(&secret),
        }
    }

    pub fn secret(&self) -> [u8; 32] {
        self.signing.to_bytes()
    }

    pub fn public(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    pub fn sign_heads(&self, meta: &DocMeta, heads: &[[u8; 32]]) -> SignedHeads {
        let payload = heads_payload(meta, heads);
        let signature = self.signing.sign(&payload);
        SignedHeads {
            meta: meta.clone(),
            heads: heads.to_vec(),
            key: self.public(),
            signature: signature.to_bytes(),
        }
    }
}

impl PublisherKey {
    /// Signs where this organisation's audit trail stands.
    pub fn sign_checkpoint(&self, checkpoint: AuditCheckpoint) -> SignedCheckpoint {
        let signature = self.signing.sign(&checkpoint_payload(&checkpoint));
        SignedCheckpoint {
            checkpoint,
            key: self.public(),
            signature: signature.to_bytes(),
        }
    }
}

/// Where an organisation's audit trail stood: how many entries, and the hash of the last
/// (which, chained, commits to every entry before it). Signed and handed to peers, it lets
/// anyone holding it show that entries were later removed or rewritten.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditCheckpoint {
    pub organisation: crate::OdsCode,
    pub count: u64,
    pub head: [u8; 32],
    /// Unix seconds when it was signed.
    pub at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCheckpoint {
    pub checkpoint: AuditCheckpoint,
    pub key: [u8; 32],
    #[serde(with = "signature_bytes")]
    pub signature: [u8; 64],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckpointError {
    #[error("an audit checkpoint does not decode")]
    Undecodable,
    #[error(
        "the audit checkpoint of {organisation} was signed with key {key}, which is not its trusted key"
    )]
    UntrustedKey { organisation: String, key: String },
    #[error(
        "the signature on the audit checkpoint of {organisation} does not verify: it was altered"
    )]
    BadSignature { organisation: String },
}

impl SignedCheckpoint {
    /// Checks the signature and that `is_trusted` accepts the key for the organisation.
    pub fn verify(
        &self,
        is_trusted: impl FnOnce(&crate::OdsCode, &[u8; 32]) -> bool,
    ) -> Result<(), CheckpointError> {
        let organisation = self.checkpoint.organisation.to_string();
        if !is_trusted(&self.checkpoint.organisation, &self.key) {
            return Err(CheckpointError::UntrustedKey {
                organisation,
                key: hex::encode(self.key),
            });
        }
        let key =
            VerifyingKey::from_bytes(&self.key).map_err(|_| CheckpointError::BadSignature {
                organisation: organisation.clone(),
            })?;
        key.verify_strict(
            &checkpoint_payload(&self.checkpoint),
            &Signature::from_bytes(&self.signature),
        )
        .map_err(|_| CheckpointError::BadSignature { organisation })
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(&(SIGNED_CHECKPOINT_VERSION, self))
            .expect("SignedCheckpoint always encodes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, CheckpointError> {
        match postcard::from_bytes::<(u8, SignedCheckpoint)>(bytes) {
            Ok((SIGNED_CHECKPOINT_VERSION, signed)) => Ok(signed),
            _ => Err(CheckpointError::Undecodable),
        }
    }
}

const SIGNED_CHECKPOINT_VERSION: u8 = 1;

fn checkpoint_payload(checkpoint: &AuditCheckpoint) -> Vec<u8> {
    let mut payload = CHECKPOINT_CONTEXT.to_vec();
    payload.extend(postcard::to_stdvec(checkpoint).expect("checkpoints always encode"));
    payload
}

impl std::fmt::Debug for PublisherKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublisherKey(public {})", hex::encode(self.public()))
    }
}

/// What a publisher signs: the partition and the sorted heads of its document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedHeads {
    pub meta: DocMeta,
    pub heads: Vec<[u8; 32]>,
    pub key: [u8; 32],
    #[serde(with = "signature_bytes")]
    pub signature: [u8; 64],
}

impl SignedHeads {
    /// Checks the signature and that the signing key is one `is_trusted` accepts for the
    /// document's publisher (the trust registry decides; revoked keys are not trusted).
    pub fn verify(
        &self,
        is_trusted: impl FnOnce(&crate::OdsCode, &[u8; 32]) -> bool,
    ) -> Result<(), SignatureError> {
        self.check_trusted(is_trusted)?;
        self.check_signature()
    }

    /// That the signing key is one `is_trusted` accepts for the document's publisher. Only
    /// with [`SignedHeads::check_signature`] does this authenticate anything.
    pub fn check_trusted(
        &self,
        is_trusted: impl FnOnce(&crate::OdsCode, &[u8; 32]) -> bool,
    ) -> Result<(), SignatureError> {
        if is_trusted(&self.meta.publisher, &self.key) {
            return Ok(());
        }
        Err(SignatureError::UntrustedKey {
            doc: self.meta.id(),
            key: hex::encode(self.key),
            publisher: self.meta.publisher.to_string(),
        })
    }

    /// That the signature verifies with the key it names, whoever that key belongs to: pure
    /// arithmetic, so it can run on any thread (a connection's reader does it before the
    /// engine sees the frame, see [`crate::reader`]).
    pub fn check_signature(&self) -> Result<(), SignatureError> {
        self.check_signature_with(&mut VerifyingKeys::default())
    }

    /// [`SignedHeads::check_signature`], with the key taken from `keys` where it was
    /// decompressed before.
    pub fn check_signature_with(&self, keys: &mut VerifyingKeys) -> Result<(), SignatureError> {
        let key = keys.get(&self.key).ok_or(SignatureError::MalformedKey)?;
        let signature = Signature::from_bytes(&self.signature);
        key.verify_strict(&heads_payload(&self.meta, &self.heads), &signature)
            .map_err(|_| SignatureError::BadSignature {
                doc: self.meta.id(),
                key: hex::encode(self.key),
            })
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(&(SIGNED_HEADS_VERSION, self)).expect("SignedHeads always encodes")
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        match postcard::from_bytes::<(u8, SignedHeads)>(bytes) {
            Ok((SIGNED_HEADS_VERSION, heads)) => Some(heads),
            _ => None,
        }
    }
}

const SIGNED_HEADS_VERSION: u8 = 1;

/// Publisher keys decompressed once for many signatures. Decompressing a key (a square root
/// in the field) is about a tenth of an Ed25519 verification, and a connection's reader sees
/// the same few keys again and again: a node's documents are all signed with its key.
#[derive(Debug, Default)]
pub struct VerifyingKeys {
    keys: std::collections::HashMap<[u8; 32], VerifyingKey>,
}

impl VerifyingKeys {
    /// Keys kept at most; past this the set starts again (the keys a hub's connection to a
    /// node sees are the region's publishers, hundreds).
    const MAX_KEYS: usize = 1024;

    /// `key` decompressed, `None` where it is not a point on the curve.
    pub fn get(&mut self, key: &[u8; 32]) -> Option<VerifyingKey> {
        if let Some(decompressed) = self.keys.get(key) {
            return Some(*decompressed);
        }
        let decompressed = VerifyingKey::from_bytes(key).ok()?;
        if self.keys.len() >= Self::MAX_KEYS {
            self.keys.clear();
        }
        self.keys.insert(*key, decompressed);
        Some(decompressed)
    }
}

fn heads_payload(meta: &DocMeta, heads: &[[u8; 32]]) -> Vec<u8> {
    debug_assert!(heads.is_sorted(), "heads are signed in sorted order");
    let mut payload = HEADS_CONTEXT.to_vec();
    payload.extend(postcard::to_stdvec(&(meta, heads)).expect("meta and heads always encode"));
    payload
}

mod signature_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let bytes: Vec<u8> = Deserialize::deserialize(d)?;
        bytes
            .try_into()
            .map_err(|_| serde::de::Error::custom("signature must be 64 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DataClass, NhsNumber, OdsCode, Section};

    fn meta() -> DocMeta {
        DocMeta {
            publisher: OdsCode::parse("A81001").unwrap(),
            patient: NhsNumber::parse("9912003888").unwrap(),
            section: Section::Problems,
            class: DataClass::Coded,
        }
    }

    #[test]
    fn signed_heads_verify_and_round_trip() {
        let key = PublisherKey::from_secret([7; 32]);
        let signed = key.sign_heads(&meta(), &[[1; 32]]);
        let decoded = SignedHeads::decode(&signed.encode()).unwrap();
        assert_eq!(decoded, signed);
        decoded.verify(|_, k| *k == key.public()).unwrap();
    }

    /// A reader checks signatures with keys it decompressed before: the answers are the
    /// ones each check gives alone, for signatures by several keys in turn, forged ones, one
    /// naming another publisher's key and one naming a key that is not a point; and the set
    /// stays bounded.
    #[test]
    fn signatures_checked_with_keys_kept_decompressed_give_the_same_answers() {
        let alice = PublisherKey::from_secret([7; 32]);
        let bob = PublisherKey::from_secret([8; 32]);
        let mut forged = alice.sign_heads(&meta(), &[[1; 32]]);
        forged.heads = vec![[2; 32]];
        let mut other_key = alice.sign_heads(&meta(), &[[1; 32]]);
        other_key.key = bob.public();
        let mut not_a_point = alice.sign_heads(&meta(), &[[1; 32]]);
        // About half of all y coordinates have no point on the curve.
        not_a_point.key = (2u8..)
            .map(|y| {
                let mut key = [0; 32];
                key[0] = y;
                key
            })
            .find(|key| VerifyingKey::from_bytes(key).is_err())
            .unwrap();
        let cases = [
            alice.sign_heads(&meta(), &[[1; 32]]),
            bob.sign_heads(&meta(), &[[3; 32]]),
            forged,
            other_key,
            not_a_point,
            alice.sign_heads(&meta(), &[[4; 32]]),
        ];
        let mut keys = VerifyingKeys::default();
        for round in 0..3 {
            for (at, signed) in cases.iter().enumerate() {
                assert_eq!(
                    signed.check_signature_with(&mut keys),
                    signed.check_signature(),
                    "round {round}, case {at}"
                );
            }
        }
        assert!(cases[0].check_signature_with(&mut keys).is_ok());
        assert!(cases[2].check_signature_with(&mut keys).is_err());
        assert_eq!(keys.keys.len(), 2, "the two keys that are points");
        for secret in 0..VerifyingKeys::MAX_KEYS + 5 {
            let mut seed = [0; 32];
            seed[..8].copy_from_slice(&(secret as u64).to_le_bytes());
            keys.get(&PublisherKey::from_secret(seed).public()).unwrap();
        }
        assert!(keys.keys.len() <= VerifyingKeys::MAX_KEYS);
    }

    #[test]
    fn any_altered_field_fails_verification() {
        let key = PublisherKey::from_secret([7; 32]);
        let signed = key.sign_heads(&meta(), &[[1; 32]]);
        let trusted = |_: &OdsCode, k: &[u8; 32]| *k == key.public();

        let mut heads = signed.clone();
        heads.heads[0][5] ^= 1;
        assert!(matches!(
            heads.verify(trusted),
            Err(SignatureError::BadSignature { .. })
        ));

        let mut moved = signed.clone();
        moved.meta.class = DataClass::FreeText;
        assert!(moved.verify(trusted).is_err());

        let mut sig = signed.clone();
        sig.signature[0] ^= 1;
        assert!(sig.verify(trusted).is_err());
    }

    #[test]
    fn untrusted_key_is_refused_before_checking_the_signature() {
        let key = PublisherKey::from_secret([7; 32]);
        let signed = key.sign_heads(&meta(), &[]);
        assert!(matches!(
            signed.verify(|_, _| false),
            Err(SignatureError::UntrustedKey { .. })
        ));
    }

    #[test]
    fn garbage_does_not_decode() {
        assert!(SignedHeads::decode(&[0xff; 10]).is_none());
        assert!(SignedHeads::decode(&[]).is_none());
    }
}
