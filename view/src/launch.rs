//! In-context launch: the clinical system opens the view for one user and one patient with a
//! signed launch token (a JWT), so there is no second login.
//!
//! The token is checked whole before anything is shown: the algorithm named in its header
//! must be the one configured (no switching to `none` or from EdDSA to HS256 with the public
//! key as the secret), its signature must verify, it must be within its time, short-lived,
//! for this organisation, and never used before. Then it opens a session (see `web`).
//!
//! EdDSA is preferred: the node holds only the clinical system's public key, so a copy of the
//! node's files cannot mint tokens. HS256 is there for clinical systems that only do shared
//! secrets.

use caremesh_sync::{NhsNumber, OdsCode};
use chrono::{DateTime, Utc};
use jwt_compact::alg::{Hs256, Hs256Key};
use jwt_compact::{Algorithm, AlgorithmExt, AlgorithmSignature, Claims, Header, UntrustedToken};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::fmt;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::str::FromStr;

/// Longest token accepted, before any parsing: a launch token is a few hundred bytes.
pub const TOKEN_MAX_BYTES: usize = 8 * 1024;
/// Clock difference tolerated between the clinical system and this node.
pub const LEEWAY_SECONDS: i64 = 60;
const ID_MAX_CHARS: usize = 128;
const NAME_MAX_CHARS: usize = 200;
const PURPOSE_MAX_CHARS: usize = 200;
/// Where a node home keeps the clinical system's launch public key, by default.
pub const LAUNCH_PUBLIC_FILE: &str = "keys/launch.pub";
/// Where a node home keeps a launch signing key for `caremesh launch`, by default.
pub const LAUNCH_SIGNING_FILE: &str = "keys/launch-signing.key";

/// In-context launch: how launch tokens from the clinical system are checked (`[launch]` in
/// the node's configuration).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
#[serde(deny_unknown_fields)]
pub struct LaunchConfig {
    /// "EdDSA" (the node holds the clinical system's public key) or "HS256" (a shared secret).
    pub algorithm: LaunchAlgorithm,
    /// EdDSA: the clinical system's public key, hex. HS256: the shared secret (mode 0600).
    pub key: PathBuf,
    /// EdDSA: a secret key for `caremesh launch` to sign with (demos and tests). A real
    /// clinical system keeps its key; remove this file and setting in production.
    pub signing_key: Option<PathBuf>,
    /// How long a launched session lasts.
    pub session_minutes: u32,
    /// The longest validity a launch token may have (exp - iat).
    pub max_token_minutes: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LaunchAlgorithm {
    #[serde(rename = "EdDSA")]
    EdDsa,
    #[serde(rename = "HS256")]
    Hs256,
}

impl Default for LaunchConfig {
    fn default() -> Self {
        LaunchConfig {
            algorithm: LaunchAlgorithm::EdDsa,
            key: PathBuf::from(LAUNCH_PUBLIC_FILE),
            signing_key: Some(PathBuf::from(LAUNCH_SIGNING_FILE)),
            session_minutes: 30,
            max_token_minutes: 10,
        }
    }
}

/// Why a launch key cannot be used; the node names the file it came from.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LaunchKeyError {
    #[error("not a 32-byte hex Ed25519 public key; put the clinical system's launch key here")]
    NotAnEd25519PublicKey,
    #[error("an HS256 launch secret must be at least 32 bytes")]
    Hs256SecretTooShort,
}

/// What a launched user may do. Each HTTP route names the role it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Views patients' records.
    Clinician,
    /// Reads audit reports.
    Auditor,
    /// Reads the node's status and metrics.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Clinician => "clinician",
            Role::Auditor => "auditor",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "clinician" => Ok(Role::Clinician),
            "auditor" => Ok(Role::Auditor),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role `{other}`: use clinician, auditor or admin"
            )),
        }
    }
}

/// The claims of a launch token besides `exp`, `iat` and `nbf`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchClaims {
    /// The user's id in the clinical system.
    pub sub: String,
    /// The user's name, as the audit trail will show it.
    pub name: String,
    pub role: String,
    /// The ODS code of the organisation the user works for: this node's.
    pub org: String,
    /// The patient's NHS number: required for clinicians.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nhs: Option<String>,
    /// Purpose of use, as the audit trail records it.
    pub pou: String,
    /// The token's unique id: a token is used once.
    pub jti: String,
}

/// A launch whose token passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub user_id: String,
    pub user_name: String,
    pub role: Role,
    pub organisation: OdsCode,
    pub nhs: Option<NhsNumber>,
    pub purpose: String,
    pub token_id: String,
    pub expires_at: i64,
}

/// Why a launch token was refused. Shown to the user and kept in the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LaunchRefused {
    #[error("the launch token is longer than {TOKEN_MAX_BYTES} bytes")]
    TooLong,
    #[error("the launch token is not a JWT: {0}")]
    Malformed(String),
    #[error("the launch token is signed with {found}; this node accepts {expected} only")]
    WrongAlgorithm { expected: String, found: String },
    #[error("the launch token's signature does not verify: it was altered or forged")]
    Forged,
    #[error("the launch token has no `{0}` claim")]
    MissingClaim(&'static str),
    #[error("the launch token's `{claim}` claim is not valid: {why}")]
    InvalidClaim { claim: &'static str, why: String },
    #[error("the launch token expired; launch again from the clinical system")]
    Expired,
    #[error("the launch token is not valid yet (check the clinical system's clock)")]
    NotYetValid,
    #[error(
        "the launch token is valid for {minutes} minutes; this node accepts at most {max} (tokens are for one launch, not a login)"
    )]
    LivesTooLong { minutes: i64, max: u32 },
    #[error("the launch token is for organisation {found}, not this node's {expected}")]
    WrongOrganisation { expected: String, found: String },
    #[error("the launch token was used before; a launch token opens the record once")]
    Replayed,
    #[error(
        "{ods} is a hub: it relays records between organisations and keeps none to show; open the patient's record at a care organisation's node"
    )]
    NoRecordsAtHub { ods: String },
}

/// EdDSA over Ed25519 with the ed25519-dalek the rest of caremesh uses, so that one
/// implementation of the curve signs documents, authenticates TLS and checks launches.
#[derive(Debug, Clone, Copy, Default)]
pub struct EdDsa;

/// An Ed25519 signature as jwt-compact handles it.
pub struct EdDsaSignature(ed25519_dalek::Signature);

impl AlgorithmSignature for EdDsaSignature {
    const LENGTH: Option<NonZeroUsize> = NonZeroUsize::new(ed25519_dalek::SIGNATURE_LENGTH);

    fn try_from_slice(slice: &[u8]) -> anyhow::Result<Self> {
        let bytes: [u8; ed25519_dalek::SIGNATURE_LENGTH] = slice
            .try_into()
            .map_err(|_| anyhow::anyhow!("an Ed25519 signature is 64 bytes"))?;
        Ok(EdDsaSignature(ed25519_dalek::Signature::from_bytes(&bytes)))
    }

    fn as_bytes(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.0.to_bytes().to_vec())
    }
}

impl Algorithm for EdDsa {
    type SigningKey = ed25519_dalek::SigningKey;
    type VerifyingKey = ed25519_dalek::VerifyingKey;
    type Signature = EdDsaSignature;

    fn name(&self) -> Cow<'static, str> {
        Cow::Borrowed("EdDSA")
    }

    fn sign(&self, signing_key: &Self::SigningKey, message: &[u8]) -> Self::Signature {
        use ed25519_dalek::Signer;
        EdDsaSignature(signing_key.sign(message))
    }

    fn verify_signature(
        &self,
        signature: &Self::Signature,
        verifying_key: &Self::VerifyingKey,
        message: &[u8],
    ) -> bool {
        verifying_key.verify_strict(message, &signature.0).is_ok()
    }
}

/// The key that checks launch tokens.
pub enum LaunchVerifier {
    EdDsa(ed25519_dalek::VerifyingKey),
    Hs256(Hs256Key),
}

/// The key that signs launch tokens: the clinical system's, kept in the node home only for
/// `caremesh launch` (demos, tests, integrators trying the view).
pub enum LaunchSigner {
    EdDsa(Box<ed25519_dalek::SigningKey>),
    Hs256(Hs256Key),
}

impl LaunchVerifier {
    /// The verifier for the launch key as its file holds it: for EdDSA the clinical
    /// system's public key in hex, for HS256 the shared secret.
    pub fn from_key(
        algorithm: LaunchAlgorithm,
        key: &[u8],
    ) -> Result<LaunchVerifier, LaunchKeyError> {
        match algorithm {
            LaunchAlgorithm::EdDsa => {
                let key = std::str::from_utf8(key)
                    .ok()
                    .and_then(|text| {
                        caremesh_sync::trust::parse_key("launch public key", text).ok()
                    })
                    .and_then(|bytes| ed25519_dalek::VerifyingKey::from_bytes(&bytes).ok())
                    .ok_or(LaunchKeyError::NotAnEd25519PublicKey)?;
                Ok(LaunchVerifier::EdDsa(key))
            }
            LaunchAlgorithm::Hs256 => Ok(LaunchVerifier::Hs256(hs256_secret(key)?)),
        }
    }

    fn algorithm_name(&self) -> &'static str {
        match self {
            LaunchVerifier::EdDsa(_) => "EdDSA",
            LaunchVerifier::Hs256(_) => "HS256",
        }
    }

    /// Checks everything but single use, which needs the store ([`Launch::token_id`]).
    pub fn verify(
        &self,
        token: &str,
        config: &LaunchConfig,
        own: &OdsCode,
        now: i64,
    ) -> Result<Launch, LaunchRefused> {
        if token.len() > TOKEN_MAX_BYTES {
            return Err(LaunchRefused::TooLong);
        }
        check_header(token)?;
        let untrusted =
            UntrustedToken::new(token).map_err(|e| LaunchRefused::Malformed(e.to_string()))?;
        if untrusted.algorithm() != self.algorithm_name() {
            return Err(LaunchRefused::WrongAlgorithm {
                expected: self.algorithm_name().into(),
                found: clip(untrusted.algorithm(), 32),
            });
        }
        let validated = match self {
            LaunchVerifier::EdDsa(key) => EdDsa.validator::<LaunchClaims>(key).validate(&untrusted),
            LaunchVerifier::Hs256(key) => Hs256.validator::<LaunchClaims>(key).validate(&untrusted),
        };
        let claims = validated
            .map_err(|error| match error {
                jwt_compact::ValidationError::MalformedClaims(e) => {
                    LaunchRefused::Malformed(format!("its claims do not read: {e}"))
                }
                _ => LaunchRefused::Forged,
            })?
            .claims()
            .clone();
        check_claims(claims, config, own, now)
    }
}

/// The header, read strictly: a key given twice is refused, and so is `crit` (RFC 7515
/// 4.1.11: extensions the recipient does not understand must make it refuse the token, and
/// caremesh understands none).
fn check_header(token: &str) -> Result<(), LaunchRefused> {
    use base64ct::{Base64UrlUnpadded, Encoding};
    let encoded = token.split('.').next().unwrap_or_default();
    let bytes = Base64UrlUnpadded::decode_vec(encoded)
        .map_err(|_| LaunchRefused::Malformed("its header is not base64url".into()))?;
    let header = caremesh_fhir::strict_json::from_slice(&bytes)
        .map_err(|e| LaunchRefused::Malformed(format!("its header does not read: {e}")))?;
    if header.get("crit").is_some() {
        return Err(LaunchRefused::Malformed(
            "its header marks extensions critical (`crit`), and this node understands none".into(),
        ));
    }
    Ok(())
}

/// Time, organisation, role and patient: everything but the signature.
fn check_claims(
    claims: Claims<LaunchClaims>,
    config: &LaunchConfig,
    own: &OdsCode,
    now: i64,
) -> Result<Launch, LaunchRefused> {
    let expires_at = claims
        .expiration
        .ok_or(LaunchRefused::MissingClaim("exp"))?
        .timestamp();
    let issued_at = claims
        .issued_at
        .ok_or(LaunchRefused::MissingClaim("iat"))?
        .timestamp();
    if expires_at + LEEWAY_SECONDS <= now {
        return Err(LaunchRefused::Expired);
    }
    let not_before = claims.not_before.map_or(issued_at, |t| t.timestamp());
    if issued_at.max(not_before) > now + LEEWAY_SECONDS {
        return Err(LaunchRefused::NotYetValid);
    }
    let lifetime = expires_at - issued_at;
    if lifetime <= 0 {
        return Err(LaunchRefused::InvalidClaim {
            claim: "exp",
            why: "it is not after `iat`: the token expires before it was issued".into(),
        });
    }
    if lifetime > i64::from(config.max_token_minutes) * 60 {
        return Err(LaunchRefused::LivesTooLong {
            minutes: lifetime / 60,
            max: config.max_token_minutes,
        });
    }
    let custom = claims.custom;
    let organisation = OdsCode::parse(&custom.org).map_err(|e| LaunchRefused::InvalidClaim {
        claim: "org",
        why: e.to_string(),
    })?;
    if organisation != *own {
        return Err(LaunchRefused::WrongOrganisation {
            expected: own.to_string(),
            found: organisation.to_string(),
        });
    }
    let role: Role = custom
        .role
        .parse()
        .map_err(|why| LaunchRefused::InvalidClaim { claim: "role", why })?;
    let nhs = match custom.nhs.as_deref() {
        Some(raw) => Some(
            NhsNumber::parse(raw).map_err(|e| LaunchRefused::InvalidClaim {
                claim: "nhs",
                why: e.to_string(),
            })?,
        ),
        None if role == Role::Clinician => return Err(LaunchRefused::MissingClaim("nhs")),
        None => None,
    };
    Ok(Launch {
        user_id: bounded("sub", custom.sub, ID_MAX_CHARS)?,
        user_name: bounded("name", custom.name, NAME_MAX_CHARS)?,
        role,
        organisation,
        nhs,
        purpose: bounded("pou", custom.pou, PURPOSE_MAX_CHARS)?,
        token_id: bounded("jti", custom.jti, ID_MAX_CHARS)?,
        expires_at,
    })
}

/// A claim that must be present, printable and at most `max` characters.
fn bounded(claim: &'static str, value: String, max: usize) -> Result<String, LaunchRefused> {
    let value = value.trim().to_string();
    if value.is_empty() {
        return Err(LaunchRefused::MissingClaim(claim));
    }
    if value.chars().count() > max || value.chars().any(char::is_control) {
        return Err(LaunchRefused::InvalidClaim {
            claim,
            why: format!("must be printable and at most {max} characters"),
        });
    }
    Ok(value)
}

fn clip(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

fn hs256_secret(secret: &[u8]) -> Result<Hs256Key, LaunchKeyError> {
    if secret.len() < 32 {
        return Err(LaunchKeyError::Hs256SecretTooShort);
    }
    Ok(Hs256Key::new(secret))
}

impl LaunchSigner {
    /// Signs with an Ed25519 secret key.
    pub fn eddsa(secret: &[u8; 32]) -> LaunchSigner {
        LaunchSigner::EdDsa(Box::new(ed25519_dalek::SigningKey::from_bytes(secret)))
    }

    /// Signs with an HS256 shared secret.
    pub fn hs256(secret: &[u8]) -> Result<LaunchSigner, LaunchKeyError> {
        Ok(LaunchSigner::Hs256(hs256_secret(secret)?))
    }

    /// A signed token for `claims`, issued at `issued_at` and valid for `valid_seconds`.
    pub fn sign(&self, claims: LaunchClaims, issued_at: i64, valid_seconds: i64) -> String {
        assert!(
            valid_seconds > 0,
            "a launch token must be valid for some time"
        );
        let mut claims = Claims::new(claims);
        claims.issued_at = DateTime::<Utc>::from_timestamp(issued_at, 0);
        claims.expiration = DateTime::<Utc>::from_timestamp(issued_at + valid_seconds, 0);
        let header = Header::empty().with_token_type("JWT");
        match self {
            LaunchSigner::EdDsa(key) => EdDsa.token(&header, &claims, key),
            LaunchSigner::Hs256(key) => Hs256.token(&header, &claims, key),
        }
        .expect("launch claims always serialise")
    }
}

/// A fresh random id for a token or a session secret, hex.
pub fn random_hex(bytes: usize) -> std::io::Result<String> {
    let mut buffer = vec![0u8; bytes];
    getrandom::fill(&mut buffer).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(hex::encode(buffer))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_795_305_600;

    fn config() -> LaunchConfig {
        LaunchConfig::default()
    }

    fn claims(role: &str, nhs: Option<&str>) -> LaunchClaims {
        LaunchClaims {
            sub: "G1234567".into(),
            name: "Dr Ada Lovelace".into(),
            role: role.into(),
            org: "A81001".into(),
            nhs: nhs.map(str::to_string),
            pou: "direct care".into(),
            jti: "t-1".into(),
        }
    }

    fn eddsa_pair(seed: u8) -> (LaunchSigner, LaunchVerifier) {
        let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let verifying = key.verifying_key();
        (
            LaunchSigner::EdDsa(Box::new(key)),
            LaunchVerifier::EdDsa(verifying),
        )
    }

    fn own() -> OdsCode {
        OdsCode::parse("A81001").unwrap()
    }

    #[test]
    fn a_good_token_opens_its_user_role_and_patient() {
        let (signer, verifier) = eddsa_pair(1);
        let token = signer.sign(claims("clinician", Some("9912003888")), NOW, 300);
        let launch = verifier
            .verify(&token, &config(), &own(), NOW + 10)
            .unwrap();
        assert_eq!(launch.user_id, "G1234567");
        assert_eq!(launch.role, Role::Clinician);
        assert_eq!(launch.nhs, Some(NhsNumber::parse("9912003888").unwrap()));
        assert_eq!(launch.expires_at, NOW + 300);
        assert_eq!(launch.token_id, "t-1");
    }

    #[test]
    fn forged_altered_and_foreign_tokens_are_refused() {
        let (signer, verifier) = eddsa_pair(1);
        let (other_signer, _) = eddsa_pair(2);
        let good = claims("clinician", Some("9912003888"));
        let foreign = other_signer.sign(good.clone(), NOW, 300);
        assert_eq!(
            verifier.verify(&foreign, &config(), &own(), NOW),
            Err(LaunchRefused::Forged)
        );
        // The payload changed to another patient, the signature kept.
        let token = signer.sign(good.clone(), NOW, 300);
        let other = signer.sign(claims("clinician", Some("9434765919")), NOW, 300);
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[1] = other.split('.').nth(1).unwrap();
        assert_eq!(
            verifier.verify(&parts.join("."), &config(), &own(), NOW),
            Err(LaunchRefused::Forged)
        );
        // alg "none", and HS256 signed with the public key as the secret.
        let header = jwt_compact::Header::empty();
        let none = format!(
            "{}.{}.",
            base64_url(br#"{"alg":"none"}"#),
            token.split('.').nth(1).unwrap()
        );
        assert!(matches!(
            verifier.verify(&none, &config(), &own(), NOW),
            Err(LaunchRefused::WrongAlgorithm { .. })
        ));
        let LaunchVerifier::EdDsa(public) = &verifier else {
            unreachable!()
        };
        let confused = Hs256
            .token(
                &header,
                &Claims::new(good.clone()),
                &Hs256Key::new(public.as_bytes()),
            )
            .unwrap();
        assert!(matches!(
            verifier.verify(&confused, &config(), &own(), NOW),
            Err(LaunchRefused::WrongAlgorithm { .. })
        ));
        assert!(matches!(
            verifier.verify("not a token", &config(), &own(), NOW),
            Err(LaunchRefused::Malformed(_))
        ));
        assert_eq!(
            verifier.verify(&"a".repeat(TOKEN_MAX_BYTES + 1), &config(), &own(), NOW),
            Err(LaunchRefused::TooLong)
        );
    }

    fn base64_url(bytes: &[u8]) -> String {
        use base64ct::{Base64UrlUnpadded, Encoding};
        Base64UrlUnpadded::encode_string(bytes)
    }

    /// RFC 7515: a `crit` header the recipient does not understand means refuse; a token
    /// that expires before it was issued is refused even within the clock leeway; a header
    /// naming a key twice is refused. Each is signed properly, so only the rule refuses it.
    #[test]
    fn critical_headers_reversed_times_and_doubled_header_keys_are_refused() {
        use ed25519_dalek::Signer;
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let (signer, verifier) = eddsa_pair(1);
        let payload = signer
            .sign(claims("clinician", Some("9912003888")), NOW, 300)
            .split('.')
            .nth(1)
            .unwrap()
            .to_string();
        let signed = |header: &[u8]| {
            let input = format!("{}.{payload}", base64_url(header));
            let signature = key.sign(input.as_bytes());
            format!("{input}.{}", base64_url(&signature.to_bytes()))
        };
        assert!(
            verifier
                .verify(&signed(br#"{"alg":"EdDSA"}"#), &config(), &own(), NOW)
                .is_ok(),
            "the hand-made token verifies without the rule under test"
        );
        let critical = signed(br#"{"alg":"EdDSA","crit":["exp-ext"],"exp-ext":1}"#);
        assert!(matches!(
            verifier.verify(&critical, &config(), &own(), NOW),
            Err(LaunchRefused::Malformed(why)) if why.contains("crit")
        ));
        let doubled = signed(br#"{"alg":"EdDSA","alg":"EdDSA"}"#);
        assert!(matches!(
            verifier.verify(&doubled, &config(), &own(), NOW),
            Err(LaunchRefused::Malformed(why)) if why.contains("appears twice")
        ));
        let mut claims_json: serde_json::Value = serde_json::from_slice(
            &<base64ct::Base64UrlUnpadded as base64ct::Encoding>::decode_vec(&payload).unwrap(),
        )
        .unwrap();
        claims_json["exp"] = serde_json::json!(NOW - 10);
        let reversed = format!(
            "{}.{}",
            base64_url(br#"{"alg":"EdDSA"}"#),
            base64_url(claims_json.to_string().as_bytes())
        );
        let reversed = format!(
            "{reversed}.{}",
            base64_url(&key.sign(reversed.as_bytes()).to_bytes())
        );
        assert!(matches!(
            verifier.verify(&reversed, &config(), &own(), NOW),
            Err(LaunchRefused::InvalidClaim { claim: "exp", .. })
        ));
    }

    #[test]
    fn time_organisation_role_and_patient_are_checked() {
        let (signer, verifier) = eddsa_pair(1);
        let check = |claims: LaunchClaims, issued: i64, valid: i64, now: i64| {
            verifier.verify(&signer.sign(claims, issued, valid), &config(), &own(), now)
        };
        let good = claims("clinician", Some("9912003888"));
        assert_eq!(
            check(good.clone(), NOW, 300, NOW + 300 + LEEWAY_SECONDS),
            Err(LaunchRefused::Expired)
        );
        assert!(check(good.clone(), NOW, 300, NOW + 300 + LEEWAY_SECONDS - 1).is_ok());
        assert_eq!(
            check(good.clone(), NOW + 3_600, 300, NOW),
            Err(LaunchRefused::NotYetValid)
        );
        assert!(matches!(
            check(good.clone(), NOW, 24 * 3_600, NOW),
            Err(LaunchRefused::LivesTooLong { .. })
        ));
        let mut elsewhere = good.clone();
        elsewhere.org = "RTH".into();
        assert!(matches!(
            check(elsewhere, NOW, 300, NOW),
            Err(LaunchRefused::WrongOrganisation { .. })
        ));
        assert_eq!(
            check(claims("clinician", None), NOW, 300, NOW),
            Err(LaunchRefused::MissingClaim("nhs"))
        );
        assert!(matches!(
            check(claims("clinician", Some("9912003880")), NOW, 300, NOW),
            Err(LaunchRefused::InvalidClaim { claim: "nhs", .. })
        ));
        assert!(matches!(
            check(claims("superuser", None), NOW, 300, NOW),
            Err(LaunchRefused::InvalidClaim { claim: "role", .. })
        ));
        let auditor = check(claims("auditor", None), NOW, 300, NOW).unwrap();
        assert_eq!((auditor.role, auditor.nhs), (Role::Auditor, None));
        let mut nameless = good;
        nameless.name = "  ".into();
        assert_eq!(
            check(nameless, NOW, 300, NOW),
            Err(LaunchRefused::MissingClaim("name"))
        );
    }

    #[test]
    fn hs256_tokens_verify_with_the_shared_secret_only() {
        let secret = [9u8; 32];
        let signer = LaunchSigner::Hs256(Hs256Key::new(secret));
        let verifier = LaunchVerifier::Hs256(Hs256Key::new(secret));
        let token = signer.sign(claims("admin", None), NOW, 300);
        assert_eq!(
            verifier
                .verify(&token, &config(), &own(), NOW)
                .unwrap()
                .role,
            Role::Admin
        );
        let wrong = LaunchVerifier::Hs256(Hs256Key::new([8u8; 32]));
        assert_eq!(
            wrong.verify(&token, &config(), &own(), NOW),
            Err(LaunchRefused::Forged)
        );
    }
}
