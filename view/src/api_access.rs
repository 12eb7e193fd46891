//! Access to the FHIR API: SMART v2 scopes, and the signed client assertions of SMART
//! Backend Services (client credentials, RFC 7523) that a registered client trades for an
//! access token at `POST /oauth/token`.
//!
//! The API only reads, so a scope grants something only if it allows reading (`r`, `s`, or
//! SMART v1's `read` and `*`); write scopes are never granted. A token's scopes decide which
//! resource types it reads; which patients and which items it sees is decided as for the
//! page (`record::assemble`), for the user it acts for or, for system access, for this
//! organisation.

use crate::launch::EdDsa;
use jwt_compact::{Algorithm, AlgorithmExt, AlgorithmSignature, UntrustedToken};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::fmt;
use std::num::NonZeroUsize;

/// Longest client assertion accepted, before any parsing.
pub const ASSERTION_MAX_BYTES: usize = 8 * 1024;
/// SMART Backend Services: an assertion's `exp` is at most five minutes ahead.
pub const ASSERTION_MAX_SECONDS: i64 = 300;
/// Clock difference tolerated between a client and this node.
const LEEWAY_SECONDS: i64 = crate::launch::LEEWAY_SECONDS;
/// What `caremesh api-token` registers a client with when it is not registered yet.
pub const DEFAULT_SCOPES: &str = "system/*.rs user/*.rs";
/// How long an access token lasts unless asked otherwise, and at most.
pub const TOKEN_SECONDS: i64 = 15 * 60;
pub const TOKEN_MAX_SECONDS: i64 = 60 * 60;
const ID_MAX_CHARS: usize = 128;
const SCOPES_MAX: usize = 64;

/// Whose access a scope is: a patient's own app, a user's, or a system's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeContext {
    Patient,
    User,
    System,
}

/// A SMART clinical scope that allows reading: `{context}/{type}.{permissions}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub context: ScopeContext,
    /// A resource type, or `*` for all.
    pub resource: String,
    /// Reading one resource by id (`r`) and searching (`s`).
    pub read: bool,
    pub search: bool,
}

/// Why a scope is not one this API grants.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error(
        "`{0}` is not a SMART clinical scope: write it as system/Type.rs, user/*.rs or patient/Type.rs"
    )]
    NotClinical(String),
    #[error("`{0}` allows no reading (the FHIR API only reads): use .rs or .read")]
    NoRead(String),
    #[error("`{0}` names no FHIR resource type")]
    NotAType(String),
}

impl Scope {
    pub fn parse(text: &str) -> Result<Scope, ScopeError> {
        let not_clinical = || ScopeError::NotClinical(clip(text, 80));
        let (context, rest) = text.split_once('/').ok_or_else(not_clinical)?;
        let context = match context {
            "patient" => ScopeContext::Patient,
            "user" => ScopeContext::User,
            "system" => ScopeContext::System,
            _ => return Err(not_clinical()),
        };
        let (resource, permissions) = rest.split_once('.').ok_or_else(not_clinical)?;
        // SMART v2 permissions may carry a query (`?category=...`): not supported, so refused
        // rather than granted wider than asked.
        let (read, search) = match permissions {
            "read" | "*" => (true, true),
            v2 if is_v2_permissions(v2) => (v2.contains('r'), v2.contains('s')),
            _ => return Err(not_clinical()),
        };
        if !(read || search) {
            return Err(ScopeError::NoRead(clip(text, 80)));
        }
        let is_type = resource == "*"
            || (resource.len() <= 64
                && resource.starts_with(|c: char| c.is_ascii_uppercase())
                && resource.chars().all(|c| c.is_ascii_alphanumeric()));
        if !is_type {
            return Err(ScopeError::NotAType(clip(text, 80)));
        }
        Ok(Scope {
            context,
            resource: resource.to_string(),
            read,
            search,
        })
    }

    /// Whether this scope, held, allows what `asked` asks: the same context, a resource
    /// type it covers, and no permission it lacks.
    pub fn covers(&self, asked: &Scope) -> bool {
        self.context == asked.context
            && (self.resource == "*" || self.resource == asked.resource)
            && (self.read || !asked.read)
            && (self.search || !asked.search)
    }
}

/// SMART v2 permissions: a non-empty, ordered subset of `cruds`.
fn is_v2_permissions(text: &str) -> bool {
    let mut order = "cruds".chars();
    !text.is_empty() && text.chars().all(|c| order.any(|o| o == c))
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let context = match self.context {
            ScopeContext::Patient => "patient",
            ScopeContext::User => "user",
            ScopeContext::System => "system",
        };
        let permissions = match (self.read, self.search) {
            (true, true) => "rs",
            (true, false) => "r",
            _ => "s",
        };
        write!(f, "{context}/{}.{permissions}", self.resource)
    }
}

/// Parses space-separated scopes; every one must be one this API grants.
pub fn parse_scopes(text: &str) -> Result<Vec<Scope>, ScopeError> {
    text.split_whitespace()
        .take(SCOPES_MAX)
        .map(Scope::parse)
        .collect()
}

/// The scopes of `asked` that `held` covers, as granted; scopes that are not clinical
/// (`openid`, `launch`, ...) are not granted, and not an error (OAuth lets a server grant
/// less than was asked, and say so in the token's `scope`).
pub fn grant(held: &[Scope], asked: &str) -> Vec<Scope> {
    asked
        .split_whitespace()
        .take(SCOPES_MAX)
        .filter_map(|text| Scope::parse(text).ok())
        .filter(|scope| held.iter().any(|h| h.covers(scope)))
        .collect()
}

/// Whether `granted` lets a token of `context` read (`search` false) or search resources of
/// `resource_type`.
pub fn allows(granted: &[Scope], context: ScopeContext, resource_type: &str, search: bool) -> bool {
    granted.iter().any(|scope| {
        scope.context == context
            && (scope.resource == "*" || scope.resource == resource_type)
            && if search { scope.search } else { scope.read }
    })
}

pub fn scopes_text(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(Scope::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A client's public key, as registered: a JWK (or a JWK Set holding one key). SMART Backend
/// Services asks a server to accept RS384 and ES384; EdDSA is accepted too.
#[derive(Debug, Clone)]
pub enum ClientKey {
    EdDsa(ed25519_dalek::VerifyingKey),
    /// RS384: RSASSA-PKCS1-v1_5 with SHA-384, a modulus of 2048 to 8192 bits.
    Rs384(ring::rsa::PublicKeyComponents<Vec<u8>>),
    /// ES384: ECDSA on P-384 with SHA-384; the uncompressed point (0x04, x, y).
    Es384(EcPoint),
}

/// An uncompressed P-384 point, as a JWK's `x` and `y` give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcPoint(pub Vec<u8>);

/// Why a client's public key cannot be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientKeyError {
    #[error("the public key is not a JSON Web Key (or a JWK Set with one key): {0}")]
    NotAJwk(String),
    #[error(
        "the key is a {0} key; this node checks RS384 (kty RSA), ES384 (kty EC, crv P-384) and EdDSA (kty OKP, crv Ed25519) client assertions"
    )]
    Unsupported(String),
    #[error("the key's `x` is not a base64url Ed25519 public key")]
    BadEd25519,
    #[error("the key's `n` and `e` are not a base64url RSA public key of 2048 to 8192 bits")]
    BadRsa,
    #[error("the key's `x` and `y` are not base64url P-384 coordinates (48 bytes each)")]
    BadP384,
}

#[derive(Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
}

#[derive(Deserialize)]
struct JwkSet {
    keys: Vec<serde_json::Value>,
}

fn base64url(text: Option<&String>) -> Option<Vec<u8>> {
    use base64ct::{Base64UrlUnpadded, Encoding};
    Base64UrlUnpadded::decode_vec(text?.trim_end_matches('=')).ok()
}

/// A JWS signature as its bytes (RS384's length is its key's; ES384's is 96).
#[derive(Debug, Clone)]
pub struct RawSignature(Vec<u8>);

impl AlgorithmSignature for RawSignature {
    const LENGTH: Option<NonZeroUsize> = None;

    fn try_from_slice(slice: &[u8]) -> anyhow::Result<Self> {
        Ok(RawSignature(slice.to_vec()))
    }

    fn as_bytes(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.0)
    }
}

/// RS384 on ring (the node's one cryptography library beside ed25519-dalek).
#[derive(Debug, Clone, Copy)]
pub struct Rs384;

impl Algorithm for Rs384 {
    type SigningKey = ring::rsa::KeyPair;
    type VerifyingKey = ring::rsa::PublicKeyComponents<Vec<u8>>;
    type Signature = RawSignature;

    fn name(&self) -> Cow<'static, str> {
        Cow::Borrowed("RS384")
    }

    fn sign(&self, signing_key: &Self::SigningKey, message: &[u8]) -> Self::Signature {
        let mut signature = vec![0; signing_key.public().modulus_len()];
        signing_key
            .sign(
                &ring::signature::RSA_PKCS1_SHA384,
                &ring::rand::SystemRandom::new(),
                message,
                &mut signature,
            )
            .expect("RSA signing fails only when the system has no randomness");
        RawSignature(signature)
    }

    fn verify_signature(
        &self,
        signature: &Self::Signature,
        verifying_key: &Self::VerifyingKey,
        message: &[u8],
    ) -> bool {
        verifying_key
            .verify(
                &ring::signature::RSA_PKCS1_2048_8192_SHA384,
                message,
                &signature.0,
            )
            .is_ok()
    }
}

/// ES384 on ring: the JWS form of the signature (r and s, 48 bytes each).
#[derive(Debug, Clone, Copy)]
pub struct Es384;

impl Algorithm for Es384 {
    type SigningKey = ring::signature::EcdsaKeyPair;
    type VerifyingKey = EcPoint;
    type Signature = RawSignature;

    fn name(&self) -> Cow<'static, str> {
        Cow::Borrowed("ES384")
    }

    fn sign(&self, signing_key: &Self::SigningKey, message: &[u8]) -> Self::Signature {
        let signature = signing_key
            .sign(&ring::rand::SystemRandom::new(), message)
            .expect("ECDSA signing fails only when the system has no randomness");
        RawSignature(signature.as_ref().to_vec())
    }

    fn verify_signature(
        &self,
        signature: &Self::Signature,
        verifying_key: &Self::VerifyingKey,
        message: &[u8],
    ) -> bool {
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P384_SHA384_FIXED,
            &verifying_key.0,
        )
        .verify(message, &signature.0)
        .is_ok()
    }
}

impl ClientKey {
    /// The key in `text`: a JWK, or a JWK Set of exactly one key.
    pub fn from_jwk(text: &str) -> Result<ClientKey, ClientKeyError> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ClientKeyError::NotAJwk(e.to_string()))?;
        let value = if value.get("keys").is_some() {
            let set: JwkSet = serde_json::from_value(value)
                .map_err(|e| ClientKeyError::NotAJwk(e.to_string()))?;
            match <[serde_json::Value; 1]>::try_from(set.keys) {
                Ok([only]) => only,
                Err(keys) => {
                    return Err(ClientKeyError::NotAJwk(format!(
                        "the set holds {} keys; register one",
                        keys.len()
                    )));
                }
            }
        } else {
            value
        };
        let jwk: Jwk =
            serde_json::from_value(value).map_err(|e| ClientKeyError::NotAJwk(e.to_string()))?;
        match (jwk.kty.as_str(), jwk.crv.as_deref()) {
            ("OKP", Some("Ed25519")) => {
                use base64ct::{Base64UrlUnpadded, Encoding};
                let x = jwk.x.ok_or(ClientKeyError::BadEd25519)?;
                let bytes: [u8; 32] = Base64UrlUnpadded::decode_vec(&x)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or(ClientKeyError::BadEd25519)?;
                ed25519_dalek::VerifyingKey::from_bytes(&bytes)
                    .map(ClientKey::EdDsa)
                    .map_err(|_| ClientKeyError::BadEd25519)
            }
            ("RSA", _) => {
                let (n, e) = (base64url(jwk.n.as_ref()), base64url(jwk.e.as_ref()));
                match (n, e) {
                    // 2048 to 8192 bits (a leading zero byte allowed), a short exponent.
                    (Some(n), Some(e))
                        if (256..=1025).contains(&n.len()) && (1..=8).contains(&e.len()) =>
                    {
                        Ok(ClientKey::Rs384(ring::rsa::PublicKeyComponents { n, e }))
                    }
                    _ => Err(ClientKeyError::BadRsa),
                }
            }
            ("EC", Some("P-384")) => {
                let (x, y) = (base64url(jwk.x.as_ref()), base64url(jwk.y.as_ref()));
                match (x, y) {
                    (Some(x), Some(y)) if x.len() == 48 && y.len() == 48 => {
                        let mut point = vec![0x04];
                        point.extend(x);
                        point.extend(y);
                        Ok(ClientKey::Es384(EcPoint(point)))
                    }
                    _ => Err(ClientKeyError::BadP384),
                }
            }
            (kty, crv) => Err(ClientKeyError::Unsupported(crv.map_or_else(
                || clip(kty, 16),
                |crv| format!("{} {}", clip(kty, 16), clip(crv, 16)),
            ))),
        }
    }

    /// The JWK of an Ed25519 public key, as `api-client add` is given it.
    pub fn ed25519_jwk(public: &[u8; 32]) -> String {
        use base64ct::{Base64UrlUnpadded, Encoding};
        serde_json::json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "x": Base64UrlUnpadded::encode_string(public),
        })
        .to_string()
    }

    fn algorithm(&self) -> &'static str {
        match self {
            ClientKey::EdDsa(_) => "EdDSA",
            ClientKey::Rs384(_) => "RS384",
            ClientKey::Es384(_) => "ES384",
        }
    }
}

/// The claims of a SMART Backend Services client assertion besides the times.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AssertionClaims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub jti: String,
}

/// An assertion that passed every check but single use, which needs the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assertion {
    pub client_id: String,
    pub jti: String,
    pub expires_at: i64,
}

/// Why a client assertion was refused: the `error_description` of an `invalid_client`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssertionRefused {
    #[error("the client assertion is longer than {ASSERTION_MAX_BYTES} bytes")]
    TooLong,
    #[error("the client assertion is not a JWT: {0}")]
    Malformed(String),
    #[error(
        "the client assertion names no registered client (`iss` and `sub` must both be its id)"
    )]
    UnknownClient,
    #[error(
        "the client `{0}` has no public key registered: it gets tokens from the node's operator only"
    )]
    NoKey(String),
    #[error("the client assertion is signed with {found}; this client's key is {expected}")]
    WrongAlgorithm { expected: String, found: String },
    #[error("the client assertion's signature does not verify with the client's registered key")]
    Forged,
    #[error("the client assertion has no `{0}` claim")]
    MissingClaim(&'static str),
    #[error("the client assertion is for `{found}`, not this token endpoint ({expected})")]
    WrongAudience { expected: String, found: String },
    #[error("the client assertion expired")]
    Expired,
    #[error("the client assertion expires more than five minutes after it was made")]
    LivesTooLong,
    #[error("the client assertion was used before; make a new one (a new `jti`) for each request")]
    Replayed,
}

/// The `iss` of an assertion, unchecked: which client's key to check it with.
pub fn claimed_client(assertion: &str) -> Result<String, AssertionRefused> {
    if assertion.len() > ASSERTION_MAX_BYTES {
        return Err(AssertionRefused::TooLong);
    }
    let untrusted =
        UntrustedToken::new(assertion).map_err(|e| AssertionRefused::Malformed(e.to_string()))?;
    let claims = untrusted
        .deserialize_claims_unchecked::<AssertionClaims>()
        .map_err(|e| AssertionRefused::Malformed(format!("its claims do not read: {e}")))?;
    let iss = claims.custom.iss;
    if iss.is_empty() || iss.len() > ID_MAX_CHARS || iss != claims.custom.sub {
        return Err(AssertionRefused::UnknownClient);
    }
    Ok(iss)
}

/// Checks a client assertion against the client's registered key: signature, algorithm,
/// `iss` = `sub` = the client, `aud` one of `audiences` (this token endpoint's URLs), `exp`
/// in force and at most five minutes ahead, and a `jti`.
pub fn verify_assertion(
    assertion: &str,
    client_id: &str,
    key: &ClientKey,
    audiences: &[String],
    now: i64,
) -> Result<Assertion, AssertionRefused> {
    if assertion.len() > ASSERTION_MAX_BYTES {
        return Err(AssertionRefused::TooLong);
    }
    let untrusted =
        UntrustedToken::new(assertion).map_err(|e| AssertionRefused::Malformed(e.to_string()))?;
    if untrusted.algorithm() != key.algorithm() {
        return Err(AssertionRefused::WrongAlgorithm {
            expected: key.algorithm().into(),
            found: clip(untrusted.algorithm(), 32),
        });
    }
    let validated = match key {
        ClientKey::EdDsa(key) => EdDsa.validator::<AssertionClaims>(key).validate(&untrusted),
        ClientKey::Rs384(key) => Rs384.validator::<AssertionClaims>(key).validate(&untrusted),
        ClientKey::Es384(key) => Es384.validator::<AssertionClaims>(key).validate(&untrusted),
    };
    let claims = validated
        .map_err(|error| match error {
            jwt_compact::ValidationError::MalformedClaims(e) => {
                AssertionRefused::Malformed(format!("its claims do not read: {e}"))
            }
            _ => AssertionRefused::Forged,
        })?
        .claims()
        .clone();
    if claims.custom.iss != client_id || claims.custom.sub != client_id {
        return Err(AssertionRefused::UnknownClient);
    }
    if !audiences.contains(&claims.custom.aud) {
        return Err(AssertionRefused::WrongAudience {
            expected: audiences.first().cloned().unwrap_or_default(),
            found: clip(&claims.custom.aud, 200),
        });
    }
    let expires_at = claims
        .expiration
        .ok_or(AssertionRefused::MissingClaim("exp"))?
        .timestamp();
    if expires_at + LEEWAY_SECONDS <= now {
        return Err(AssertionRefused::Expired);
    }
    if expires_at > now + ASSERTION_MAX_SECONDS + LEEWAY_SECONDS {
        return Err(AssertionRefused::LivesTooLong);
    }
    let jti = claims.custom.jti.trim().to_string();
    if jti.is_empty() || jti.len() > ID_MAX_CHARS {
        return Err(AssertionRefused::MissingClaim("jti"));
    }
    Ok(Assertion {
        client_id: client_id.to_string(),
        jti,
        expires_at,
    })
}

/// Signs an EdDSA client assertion as a client would (tests, demos).
pub fn sign_assertion(
    signing_key: &ed25519_dalek::SigningKey,
    claims: AssertionClaims,
    issued_at: i64,
    valid_seconds: i64,
) -> String {
    sign_assertion_with(EdDsa, signing_key, claims, issued_at, valid_seconds)
}

/// Signs a client assertion with `algorithm` (EdDsa, Rs384, Es384) as a client would.
pub fn sign_assertion_with<A: Algorithm>(
    algorithm: A,
    signing_key: &A::SigningKey,
    claims: AssertionClaims,
    issued_at: i64,
    valid_seconds: i64,
) -> String {
    use chrono::{DateTime, Utc};
    let mut claims = jwt_compact::Claims::new(claims);
    claims.issued_at = DateTime::<Utc>::from_timestamp(issued_at, 0);
    claims.expiration = DateTime::<Utc>::from_timestamp(issued_at + valid_seconds, 0);
    algorithm
        .token(
            &jwt_compact::Header::empty().with_token_type("JWT"),
            &claims,
            signing_key,
        )
        .expect("assertion claims always serialise")
}

fn clip(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_read_as_smart_writes_them_and_write_scopes_are_not_granted() {
        let scope = Scope::parse("system/AllergyIntolerance.rs").unwrap();
        assert_eq!(scope.context, ScopeContext::System);
        assert_eq!(scope.resource, "AllergyIntolerance");
        assert!(scope.read && scope.search);
        assert_eq!(scope.to_string(), "system/AllergyIntolerance.rs");
        assert_eq!(
            Scope::parse("user/*.read").unwrap().to_string(),
            "user/*.rs"
        );
        assert!(Scope::parse("patient/Observation.r").unwrap().read);
        assert!(!Scope::parse("patient/Observation.r").unwrap().search);
        assert_eq!(
            Scope::parse("system/*.cud"),
            Err(ScopeError::NoRead("system/*.cud".into()))
        );
        for bad in [
            "openid",
            "system/*.sr",
            "system/*.rs?category=x",
            "admin/*.rs",
            "user/condition.rs",
        ] {
            assert!(Scope::parse(bad).is_err(), "{bad}");
        }
        let held = parse_scopes("system/Condition.rs system/AllergyIntolerance.r").unwrap();
        let granted = grant(
            &held,
            "system/Condition.rs system/AllergyIntolerance.rs openid system/*.rs",
        );
        assert_eq!(scopes_text(&granted), "system/Condition.rs");
        assert!(allows(&granted, ScopeContext::System, "Condition", true));
        assert!(!allows(&granted, ScopeContext::User, "Condition", true));
        assert!(!allows(
            &granted,
            ScopeContext::System,
            "Observation",
            false
        ));
    }

    fn key_pair() -> (ed25519_dalek::SigningKey, ClientKey) {
        let signing = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let jwk = ClientKey::ed25519_jwk(&signing.verifying_key().to_bytes());
        (signing, ClientKey::from_jwk(&jwk).unwrap())
    }

    fn claims(aud: &str) -> AssertionClaims {
        AssertionClaims {
            iss: "app".into(),
            sub: "app".into(),
            aud: aud.into(),
            jti: "j1".into(),
        }
    }

    #[test]
    fn a_client_assertion_is_checked_for_signature_client_audience_and_time() {
        let (signing, key) = key_pair();
        let audiences = vec!["http://node.example/oauth/token".to_string()];
        let good = sign_assertion(&signing, claims(&audiences[0]), 1_000, 120);
        assert_eq!(claimed_client(&good).unwrap(), "app");
        assert_eq!(
            verify_assertion(&good, "app", &key, &audiences, 1_010).unwrap(),
            Assertion {
                client_id: "app".into(),
                jti: "j1".into(),
                expires_at: 1_120
            }
        );
        assert_eq!(
            verify_assertion(&good, "app", &key, &audiences, 1_200),
            Err(AssertionRefused::Expired)
        );
        let other = sign_assertion(&signing, claims("http://elsewhere/oauth/token"), 1_000, 120);
        assert!(matches!(
            verify_assertion(&other, "app", &key, &audiences, 1_010),
            Err(AssertionRefused::WrongAudience { .. })
        ));
        let long = sign_assertion(&signing, claims(&audiences[0]), 1_000, 3_600);
        assert_eq!(
            verify_assertion(&long, "app", &key, &audiences, 1_010),
            Err(AssertionRefused::LivesTooLong)
        );
        let stranger = ed25519_dalek::SigningKey::from_bytes(&[8; 32]);
        let forged = sign_assertion(&stranger, claims(&audiences[0]), 1_000, 120);
        assert_eq!(
            verify_assertion(&forged, "app", &key, &audiences, 1_010),
            Err(AssertionRefused::Forged)
        );
        assert_eq!(
            verify_assertion(&good, "other", &key, &audiences, 1_010),
            Err(AssertionRefused::UnknownClient)
        );
    }

    #[test]
    fn keys_are_read_from_a_jwk_or_a_set_of_one() {
        let signing = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let jwk = ClientKey::ed25519_jwk(&signing.verifying_key().to_bytes());
        let set = format!("{{\"keys\":[{jwk}]}}");
        assert!(ClientKey::from_jwk(&set).is_ok());
        assert!(matches!(
            ClientKey::from_jwk(r#"{"kty":"EC","crv":"P-256","x":"a","y":"b"}"#),
            Err(ClientKeyError::Unsupported(kind)) if kind == "EC P-256"
        ));
        assert_eq!(
            ClientKey::from_jwk(r#"{"kty":"EC","crv":"P-384","x":"a","y":"b"}"#).unwrap_err(),
            ClientKeyError::BadP384
        );
        assert_eq!(
            ClientKey::from_jwk(r#"{"kty":"RSA","n":"AQAB","e":"AQAB"}"#).unwrap_err(),
            ClientKeyError::BadRsa,
            "a 24-bit modulus"
        );
        assert!(matches!(
            ClientKey::from_jwk("not json"),
            Err(ClientKeyError::NotAJwk(_))
        ));
        assert!(matches!(
            ClientKey::from_jwk(&format!("{{\"keys\":[{jwk},{jwk}]}}")),
            Err(ClientKeyError::NotAJwk(_))
        ));
    }

    /// The JWK of a client's P-384 or RSA key, as the client would publish it.
    fn jwk_of(public: &ClientKeyMaterial) -> String {
        use base64ct::{Base64UrlUnpadded, Encoding};
        let b64 = |bytes: &[u8]| Base64UrlUnpadded::encode_string(bytes);
        match public {
            ClientKeyMaterial::P384(point) => serde_json::json!({
                "kty": "EC", "crv": "P-384", "x": b64(&point[1..49]), "y": b64(&point[49..]),
            }),
            ClientKeyMaterial::Rsa(n, e) => {
                serde_json::json!({ "kty": "RSA", "n": b64(n), "e": b64(e) })
            }
        }
        .to_string()
    }

    enum ClientKeyMaterial {
        P384(Vec<u8>),
        Rsa(Vec<u8>, Vec<u8>),
    }

    fn signed<A: Algorithm>(algorithm: A, key: &A::SigningKey, aud: &str) -> String {
        sign_assertion_with(algorithm, key, claims(aud), 1_000, 120)
    }

    #[test]
    fn rs384_and_es384_assertions_verify_with_the_clients_jwk_and_forgeries_do_not() {
        let audiences = vec!["http://node.example/oauth/token".to_string()];
        let random = ring::rand::SystemRandom::new();
        let p384 = |random: &ring::rand::SystemRandom| {
            let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
                &ring::signature::ECDSA_P384_SHA384_FIXED_SIGNING,
                random,
            )
            .unwrap();
            ring::signature::EcdsaKeyPair::from_pkcs8(
                &ring::signature::ECDSA_P384_SHA384_FIXED_SIGNING,
                pkcs8.as_ref(),
                random,
            )
            .unwrap()
        };
        use ring::signature::KeyPair;
        let ec = p384(&random);
        let ec_key = ClientKey::from_jwk(&jwk_of(&ClientKeyMaterial::P384(
            ec.public_key().as_ref().to_vec(),
        )))
        .unwrap();
        let good = signed(Es384, &ec, &audiences[0]);
        assert!(verify_assertion(&good, "app", &ec_key, &audiences, 1_010).is_ok());
        let forged = signed(Es384, &p384(&random), &audiences[0]);
        assert_eq!(
            verify_assertion(&forged, "app", &ec_key, &audiences, 1_010),
            Err(AssertionRefused::Forged)
        );

        // A test-only key, made for this test (`openssl genpkey -algorithm RSA -outform
        // DER`, PKCS#1).
        let rsa =
            ring::rsa::KeyPair::from_der(include_bytes!("testdata/rs384-test-client.der")).unwrap();
        let public = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(rsa.public());
        let rsa_key =
            ClientKey::from_jwk(&jwk_of(&ClientKeyMaterial::Rsa(public.n, public.e))).unwrap();
        let good = signed(Rs384, &rsa, &audiences[0]);
        assert!(verify_assertion(&good, "app", &rsa_key, &audiences, 1_010).is_ok());
        // Signed with another algorithm than the key's: refused before the signature.
        assert!(matches!(
            verify_assertion(&good, "app", &ec_key, &audiences, 1_010),
            Err(AssertionRefused::WrongAlgorithm { .. })
        ));
        // A signature bit changed.
        let (head, signature) = good.rsplit_once('.').unwrap();
        let mut bytes = signature.as_bytes().to_vec();
        bytes[10] = if bytes[10] == b'A' { b'B' } else { b'A' };
        let tampered = format!("{head}.{}", String::from_utf8(bytes).unwrap());
        assert_eq!(
            verify_assertion(&tampered, "app", &rsa_key, &audiences, 1_010),
            Err(AssertionRefused::Forged)
        );
    }
}
