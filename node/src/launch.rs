//! Launch keys as a node home keeps them, and the launch URLs `caremesh launch` and the demo
//! make with them. What a launch token is and how it is checked is `caremesh_view::launch`.

use crate::home::{CONFIG_FILE, Home, HomeError, check_private, load_secret_key};
use caremesh_view::launch::{
    LaunchAlgorithm, LaunchClaims, LaunchKeyError, LaunchSigner, LaunchVerifier, random_hex,
};
use std::path::Path;

/// The verifier for launch tokens, from the key the home's `[launch]` names.
pub fn verifier(home: &Home) -> Result<LaunchVerifier, HomeError> {
    let config = &home.config.launch;
    let path = home.resolve(&config.key);
    let key = match config.algorithm {
        LaunchAlgorithm::EdDsa => read(&path)?,
        LaunchAlgorithm::Hs256 => read_private(&path)?,
    };
    LaunchVerifier::from_key(config.algorithm, &key).map_err(|error| unusable(&path, error))
}

/// The signer `caremesh launch` uses, from the signing key kept in the home.
pub fn signer(home: &Home) -> Result<LaunchSigner, HomeError> {
    let config = &home.config.launch;
    match config.algorithm {
        LaunchAlgorithm::EdDsa => {
            let path = home.resolve(config.signing_key.as_ref().ok_or_else(|| {
                HomeError::Config {
                    path: home.dir.join(CONFIG_FILE),
                    message: "[launch] signing_key is not set: this node holds no key to sign launch tokens with (the clinical system signs them)".into(),
                }
            })?);
            Ok(LaunchSigner::eddsa(&load_secret_key(&path)?.secret()))
        }
        LaunchAlgorithm::Hs256 => {
            let path = home.resolve(&config.key);
            LaunchSigner::hs256(&read_private(&path)?).map_err(|error| unusable(&path, error))
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, HomeError> {
    std::fs::read(path).map_err(|source| HomeError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A shared secret: refused if others can read it.
fn read_private(path: &Path) -> Result<Vec<u8>, HomeError> {
    check_private(path)?;
    read(path)
}

fn unusable(path: &Path, error: LaunchKeyError) -> HomeError {
    HomeError::Config {
        path: path.to_path_buf(),
        message: error.to_string(),
    }
}

/// What `caremesh launch` and the demo put in a token.
pub struct LaunchRequest<'a> {
    pub user: &'a str,
    pub name: &'a str,
    pub role: &'a str,
    pub nhs: Option<&'a str>,
    pub purpose: &'a str,
    pub issued_at: i64,
    pub valid_seconds: i64,
}

/// A launch URL for the node in `home`, signed with the launch key kept there, as the
/// clinical system would make it. `base` is the view's address as the browser reaches it.
pub fn launch_url(home: &Home, base: &str, request: &LaunchRequest<'_>) -> anyhow::Result<String> {
    anyhow::ensure!(
        request.valid_seconds > 0,
        "a launch token must be valid for some time"
    );
    let signer = signer(home)?;
    let claims = LaunchClaims {
        sub: request.user.into(),
        name: request.name.into(),
        role: request.role.into(),
        org: home.config.organisation.ods.to_string(),
        nhs: request.nhs.map(str::to_string),
        pou: request.purpose.into(),
        jti: random_hex(16)?,
    };
    let token = signer.sign(claims, request.issued_at, request.valid_seconds);
    Ok(format!(
        "{}/launch?token={token}",
        base.trim_end_matches('/')
    ))
}
