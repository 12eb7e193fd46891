//! The FHIR API's clients as an operator manages them: `caremesh api-client add|list|remove`
//! and `caremesh api-token`. Each runs as a [`crate::store_command::StoreCommand`], in the
//! running node when there is one, and each is an entry in the audit trail.

use crate::home::Home;
use anyhow::{Result, bail};
use caremesh_fhir::clock;
use caremesh_storage::Store;
use caremesh_storage::api_access::{ApiClient, ApiToken, ApiUser, ClientRegistered};
use caremesh_sync::NhsNumber;
use caremesh_view::api_access::{self, ClientKey, ScopeContext};
use caremesh_view::launch::Role;
use caremesh_view::notify_origins;
use clap::Subcommand;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

const ID_MAX_CHARS: usize = 128;
const NAME_MAX_CHARS: usize = 200;
/// A JWK is a few hundred bytes; a JWK Set of one, a little more.
const PUBLIC_KEY_MAX_BYTES: u64 = 16 * 1024;
/// A client posts to its own system, perhaps a standby: a handful of origins at most.
const MAX_NOTIFY_ORIGINS: usize = 16;

#[derive(Subcommand)]
pub enum ApiClientCommand {
    /// Register a client of the FHIR API, or replace one of the same id (its tokens end).
    Add {
        #[arg(long)]
        dir: PathBuf,
        /// The client's id: `iss` and `sub` of its client assertions.
        #[arg(long)]
        id: String,
        /// The public key its client assertions are signed with: a JWK or a JWK Set of one
        /// key (RS384: kty RSA; ES384: kty EC, crv P-384; EdDSA: kty OKP, crv Ed25519), or an
        /// Ed25519 public key in hex. Without one
        /// the client gets tokens only from `caremesh api-token`.
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// SMART scopes it may be granted, such as system/AllergyIntolerance.rs or
        /// user/*.rs; repeat, or give several separated by spaces.
        #[arg(long = "scope", default_value = api_access::DEFAULT_SCOPES)]
        scopes: Vec<String>,
        /// An origin its change notifications may be posted to (https://host[:port], or
        /// http://127.0.0.1:PORT for a listener on this machine); repeat for several.
        /// Without one, the client may not subscribe.
        #[arg(long = "notify-to", value_name = "ORIGIN")]
        notify_to: Vec<String>,
    },
    /// Set the origins a client's change notifications may be posted to, keeping its key,
    /// scopes and tokens; its subscriptions to any other origin end. None: it may not
    /// subscribe.
    NotifyTo {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        id: String,
        /// The origins, such as https://ward.example.nhs.uk or http://127.0.0.1:9999.
        #[arg(value_name = "ORIGIN")]
        origins: Vec<String>,
    },
    /// List the registered clients.
    List {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Remove a client; its tokens end at once.
    Remove {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        id: String,
    },
}

/// A client as `caremesh api-client add` registers it, checked by the CLI.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientAsked {
    pub client_id: String,
    /// The JWK.
    pub public_key: Option<String>,
    pub scopes: String,
    /// Canonical origins.
    pub notify_origins: Vec<String>,
}

/// What `caremesh api-token` asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenAsked {
    pub client: String,
    /// The user the client acts for: id, name and role.
    pub user: Option<(String, String, String)>,
    pub nhs: Option<NhsNumber>,
    pub purpose: String,
    pub scope: Option<String>,
    pub valid_seconds: i64,
}

/// A client's id: what its assertions name as `iss`, so printable and short.
pub fn check_client_id(id: &str) -> Result<()> {
    let valid = !id.is_empty()
        && id.chars().count() <= ID_MAX_CHARS
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    if !valid {
        bail!(
            "the client id `{}` must be 1 to {ID_MAX_CHARS} letters, digits, '-', '.' or '_'",
            id.chars().take(ID_MAX_CHARS).collect::<String>()
        );
    }
    Ok(())
}

/// The public key file as the JWK to register, checked.
pub fn read_public_key(path: &Path) -> Result<String> {
    let size = std::fs::metadata(path)
        .map_err(|e| anyhow::anyhow!("reading the public key {}: {e}", path.display()))?
        .len();
    if size > PUBLIC_KEY_MAX_BYTES {
        bail!(
            "{} is {size} bytes; a public key (a JWK) is at most {PUBLIC_KEY_MAX_BYTES}",
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading the public key {}: {e}", path.display()))?;
    let jwk = match caremesh_sync::trust::parse_key("public key", text.trim()) {
        Ok(bytes) => ClientKey::ed25519_jwk(&bytes),
        Err(_) => text.trim().to_string(),
    };
    ClientKey::from_jwk(&jwk).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(jwk)
}

/// The scopes given, checked: each one a read scope this API grants.
pub fn check_scopes(scopes: &[String]) -> Result<String> {
    let joined = scopes.join(" ");
    let parsed = api_access::parse_scopes(&joined)?;
    if parsed.is_empty() {
        bail!("give the client at least one scope, such as system/*.rs");
    }
    Ok(api_access::scopes_text(&parsed))
}

/// The origins given, checked and put in canonical form, each once.
pub fn check_origins(origins: &[String]) -> Result<Vec<String>> {
    let mut checked: Vec<String> = Vec::new();
    for origin in origins {
        let origin = notify_origins::allowed_origin(origin.trim())
            .map_err(|refused| anyhow::anyhow!("--notify-to {origin}: {refused}"))?;
        if !checked.contains(&origin) {
            checked.push(origin);
        }
    }
    if checked.len() > MAX_NOTIFY_ORIGINS {
        bail!("give a client at most {MAX_NOTIFY_ORIGINS} origins to be notified at");
    }
    Ok(checked)
}

fn origins_text(origins: &[String]) -> String {
    if origins.is_empty() {
        "none (it may not subscribe)".into()
    } else {
        origins.join(", ")
    }
}

fn audit(
    home: &Home,
    store: &mut Store,
    operator: &str,
    action: &str,
    detail: String,
) -> Result<()> {
    store.append_audit(&caremesh_storage::audit::AuditEvent {
        detail,
        ..crate::audit::operator_event(home, operator, action, "FHIR API access")
    })?;
    Ok(())
}

pub fn add(
    home: &Home,
    store: &mut Store,
    operator: &str,
    client: ClientAsked,
    out: &mut String,
) -> Result<u8> {
    let ClientAsked {
        client_id,
        public_key,
        scopes,
        notify_origins,
    } = client;
    let registered = store.register_api_client(&ApiClient {
        client_id: client_id.clone(),
        public_key: public_key.clone(),
        scopes: scopes.clone(),
        added_at: clock::now_unix(),
        added_by: operator.to_string(),
        notify_origins: notify_origins.clone(),
    })?;
    let key = if public_key.is_some() {
        "with a public key for client assertions"
    } else {
        "without a public key (tokens from `caremesh api-token` only)"
    };
    let done = match registered {
        ClientRegistered::Added => "registered",
        ClientRegistered::Replaced => "replaced (its tokens and subscriptions ended)",
    };
    let origins = origins_text(&notify_origins);
    audit(
        home,
        store,
        operator,
        "api-client-add",
        format!("client {client_id} {done} {key}, scopes {scopes}, notified at {origins}"),
    )?;
    writeln!(
        out,
        "client {client_id} {done} {key}; scopes: {scopes}; notifications to: {origins}"
    )?;
    Ok(0)
}

/// Sets the origins a client's notifications may go to, and ends its subscriptions to any
/// other origin, in one group with its audit entry.
pub fn notify_to(
    home: &Home,
    store: &mut Store,
    operator: &str,
    (client_id, origins): (String, Vec<String>),
    out: &mut String,
) -> Result<u8> {
    if !store.set_api_client_notify_origins(&client_id, &origins)? {
        bail!("no API client `{client_id}` is registered (see caremesh api-client list)");
    }
    let ending: Vec<String> = store
        .live_subscriptions()?
        .into_iter()
        .filter(|s| s.client_id == client_id)
        .filter(|s| !notify_origins::endpoint_allowed(&s.endpoint, &origins).unwrap_or(false))
        .map(|s| s.id)
        .collect();
    for id in &ending {
        store.end_subscription(
            id,
            Some("its endpoint's origin is no longer allowed for its client"),
        )?;
    }
    let origins = origins_text(&origins);
    let ended = match ending.len() {
        0 => String::new(),
        1 => "; 1 subscription to another origin ended".into(),
        n => format!("; {n} subscriptions to other origins ended"),
    };
    audit(
        home,
        store,
        operator,
        "api-client-notify-to",
        format!("client {client_id} notified at {origins}{ended}"),
    )?;
    writeln!(out, "client {client_id}: notifications to {origins}{ended}")?;
    Ok(0)
}

pub fn remove(
    home: &Home,
    store: &mut Store,
    operator: &str,
    client_id: &str,
    out: &mut String,
) -> Result<u8> {
    if !store.remove_api_client(client_id)? {
        bail!("no API client `{client_id}` is registered (see caremesh api-client list)");
    }
    audit(
        home,
        store,
        operator,
        "api-client-remove",
        format!("client {client_id} removed; its tokens ended"),
    )?;
    writeln!(out, "client {client_id} removed; its tokens ended")?;
    Ok(0)
}

pub fn list(store: &Store, json: bool, out: &mut String) -> Result<u8> {
    let clients = store.api_clients()?;
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&clients)?)?;
        return Ok(0);
    }
    if clients.is_empty() {
        writeln!(out, "no API clients are registered")?;
    }
    for client in clients {
        writeln!(
            out,
            "{}  {}  scopes: {}  notifications to: {}  added {} by {}",
            client.client_id,
            if client.public_key.is_some() {
                "key registered"
            } else {
                "no key"
            },
            client.scopes,
            origins_text(&client.notify_origins),
            clock::rfc3339(client.added_at),
            client.added_by
        )?;
    }
    Ok(0)
}

/// Issues a token as the operator asks, registering the client with the default scopes if
/// it is not registered. Prints the token on the last line.
pub fn token(
    home: &Home,
    store: &mut Store,
    operator: &str,
    asked: TokenAsked,
    out: &mut String,
) -> Result<u8> {
    let client = match store.api_client(&asked.client)? {
        Some(client) => client,
        None => {
            add(
                home,
                store,
                operator,
                ClientAsked {
                    client_id: asked.client.clone(),
                    public_key: None,
                    scopes: api_access::DEFAULT_SCOPES.into(),
                    notify_origins: Vec::new(),
                },
                out,
            )?;
            store
                .api_client(&asked.client)?
                .expect("the client was registered just now")
        }
    };
    let context = match asked.user {
        Some(_) => ScopeContext::User,
        None => ScopeContext::System,
    };
    let held = api_access::parse_scopes(&client.scopes)?;
    // Without --scope, all the client holds for this kind of access.
    let wanted = asked.scope.clone().unwrap_or_else(|| client.scopes.clone());
    let granted: Vec<_> = api_access::grant(&held, &wanted)
        .into_iter()
        .filter(|scope| {
            scope.context == context
                || (scope.context == ScopeContext::Patient && asked.nhs.is_some())
        })
        .collect();
    if granted.is_empty() {
        bail!(
            "client {} is registered for {}, which grants none of {wanted} to {}; register it with the scopes it needs (caremesh api-client add)",
            client.client_id,
            client.scopes,
            if context == ScopeContext::User {
                "a user"
            } else {
                "system access"
            }
        );
    }
    let now = clock::now_unix();
    let user = asked
        .user
        .map(|(id, name, role)| ApiUser { id, name, role });
    let token = ApiToken {
        client_id: client.client_id.clone(),
        scopes: api_access::scopes_text(&granted),
        user: user.clone(),
        nhs: asked.nhs.as_ref().map(|n| n.to_string()),
        purpose: asked.purpose.clone(),
        issued_at: now,
        expires_at: now + asked.valid_seconds,
    };
    let secret = caremesh_view::launch::random_hex(32)?;
    let hash: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
    store.issue_api_token(&hash, &token)?;
    let acting = match &user {
        Some(user) => format!("acting for {} ({}, {})", user.name, user.id, user.role),
        None => "for system access".into(),
    };
    let patient = if token.nhs.is_some() {
        ", for one patient"
    } else {
        ""
    };
    audit(
        home,
        store,
        operator,
        "api-token",
        format!(
            "access token issued to client {} {acting}{patient}, scopes {}, until {}",
            token.client_id,
            token.scopes,
            clock::rfc3339(token.expires_at)
        ),
    )?;
    writeln!(
        out,
        "access token for client {} {acting}{patient}; scopes {}; valid until {}:",
        token.client_id,
        token.scopes,
        clock::rfc3339(token.expires_at)
    )?;
    writeln!(out, "{secret}")?;
    Ok(0)
}

/// `caremesh api-token`: an access token for the FHIR API, for demos, tests and
/// integrators trying the API (a client in production uses `POST /oauth/token`).
#[derive(clap::Args)]
pub struct ApiTokenArgs {
    #[arg(long)]
    pub dir: PathBuf,
    /// The client the token is for; registered with the default scopes
    /// (system/*.rs user/*.rs) if it is not yet.
    #[arg(long)]
    client: String,
    /// The user the client acts for (their id in the clinical system): the token then sees
    /// what that user may see. Without one, system access.
    #[arg(long)]
    user: Option<String>,
    /// The user's name, as the audit trail shows it.
    #[arg(long)]
    name: Option<String>,
    /// The user's role: clinician reads records.
    #[arg(long, default_value = "clinician")]
    role: String,
    /// Limit the token to this patient's NHS number.
    #[arg(long)]
    nhs: Option<String>,
    #[arg(long, default_value = "direct care")]
    purpose: String,
    /// The scopes asked for; by default every scope the client is registered for that fits
    /// the access (user scopes for a user, system scopes otherwise).
    #[arg(long)]
    scope: Option<String>,
    /// How long the token is valid, in seconds (15 minutes by default, at most an hour).
    #[arg(long)]
    valid_seconds: Option<i64>,
}

impl ApiTokenArgs {
    /// What is asked, checked before anything is written.
    pub fn asked(self) -> Result<TokenAsked> {
        let ApiTokenArgs {
            dir: _,
            client,
            user,
            name,
            role,
            nhs,
            purpose,
            scope,
            valid_seconds,
        } = self;
        token_asked(
            client,
            (user, name, role),
            nhs,
            purpose,
            scope,
            valid_seconds,
        )
    }
}

fn token_asked(
    client: String,
    (user, name, role): (Option<String>, Option<String>, String),
    nhs: Option<String>,
    purpose: String,
    scope: Option<String>,
    valid_seconds: Option<i64>,
) -> Result<TokenAsked> {
    check_client_id(&client)?;
    let printable = |what: &str, text: &str, max: usize| -> Result<()> {
        if text.trim().is_empty()
            || text.chars().count() > max
            || text.chars().any(char::is_control)
        {
            bail!("--{what} must be printable, 1 to {max} characters");
        }
        Ok(())
    };
    let user = match (user, name) {
        (Some(user), Some(name)) => {
            printable("user", &user, ID_MAX_CHARS)?;
            printable("name", &name, NAME_MAX_CHARS)?;
            let role: Role = role.parse().map_err(anyhow::Error::msg)?;
            Some((
                user.trim().to_string(),
                name.trim().to_string(),
                role.as_str().to_string(),
            ))
        }
        (None, None) => None,
        _ => bail!(
            "give --user and --name together: the user the client acts for, as the audit trail names them"
        ),
    };
    printable("purpose", &purpose, NAME_MAX_CHARS)?;
    let valid_seconds = valid_seconds.unwrap_or(api_access::TOKEN_SECONDS);
    if !(1..=api_access::TOKEN_MAX_SECONDS).contains(&valid_seconds) {
        bail!(
            "--valid-seconds must be 1 to {} (access tokens are short-lived)",
            api_access::TOKEN_MAX_SECONDS
        );
    }
    if let Some(scope) = &scope {
        api_access::parse_scopes(scope)?;
    }
    Ok(TokenAsked {
        client,
        user,
        nhs: nhs.as_deref().map(NhsNumber::parse).transpose()?,
        purpose: purpose.trim().to_string(),
        scope,
        valid_seconds,
    })
}
