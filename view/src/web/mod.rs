//! The read-only record view over HTTP (axum). Reads local storage only, so it keeps
//! serving when every peer is unreachable. No route writes clinical data; what the view
//! writes (sessions, launch tokens used, break-glass, access records) goes through the
//! node's one store writer ([`RunningNode::write_now`]).
//!
//! Nothing is shown without a session, and a session comes only from a launch token
//! (`/launch?token=`, see `launch.rs`): one user, one role, and for clinicians one patient.
//! Every route names the role it needs; every access and every refusal naming a patient is
//! appended to the audit trail.

// Handlers stop early with the response a refusal gives (`Result<_, Response>`); a request
// makes one, so its size does not matter.
#![allow(clippy::result_large_err)]

use crate::audit_report::{ReportFormat, ReportQuery};
use crate::launch::{Launch, LaunchConfig, LaunchRefused, LaunchVerifier, Role};
use crate::metrics::SyncCounters;
use crate::record::{self, Record, Viewer};
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use caremesh_fhir::clock;
use caremesh_storage::Store;
use caremesh_storage::access::{LaunchSession, TokenUse};
use caremesh_storage::audit::AuditEvent;
use caremesh_sync::{NhsNumber, OrgKind, PublisherKey};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

mod assets;
pub mod fhir;
pub mod listener;
pub mod notifier;
mod render;
mod subscriptions;
pub mod tls;

pub use render::escape;
use render::{ReportForm, page, problem_body};

/// A write as the node's store writer runs it: it sends its own result back.
pub type LocalWrite = Box<dyn FnOnce(&mut Store) + Send>;

/// What the view needs of the running node beyond its database: the one store writer and
/// the trust registry in force. The node implements it over its engine; the view holds no
/// node types, so that the view and the node's plumbing change apart.
pub trait RunningNode: Send + Sync + 'static {
    /// Runs `write` on the node's one store writer ahead of other local writes (a clinician
    /// is waiting), also between the commits of a long ingest under way. Fails only when the
    /// node is stopping; `write` then was not run.
    fn write_now(
        &self,
        write: LocalWrite,
    ) -> Pin<Box<dyn Future<Output = Result<(), WriterStopped>> + Send + '_>>;

    /// The feed position up to which everything this node holds is durable; it changes as
    /// the feed grows (the FHIR API's change notifications wait on it).
    fn durable_feed(&self) -> tokio::sync::watch::Receiver<u64>;

    /// The signing keys revoked in the trust registry in force now, and whose they were;
    /// none while sync is off (no registry).
    fn revoked_keys(&self) -> BTreeMap<[u8; 32], caremesh_sync::OdsCode>;
}

/// The node is stopping and made no write.
#[derive(Debug, thiserror::Error)]
#[error("the node is shutting down and did not make this write")]
pub struct WriterStopped;

/// Why a request's storage work failed. It is logged, never shown: it may name a patient.
#[derive(Debug, thiserror::Error)]
enum RequestFailed {
    #[error(transparent)]
    Storage(#[from] caremesh_storage::StorageError),
    #[error("recording the access: {0}")]
    Publish(#[from] caremesh_storage::publish::PublishError),
    #[error("making a session secret: {0}")]
    Random(#[from] std::io::Error),
    #[error(transparent)]
    Stopped(#[from] WriterStopped),
}

impl RequestFailed {
    fn is_disk_full(&self) -> bool {
        match self {
            RequestFailed::Storage(error) => caremesh_storage::is_disk_full(error),
            RequestFailed::Publish(error) => caremesh_storage::is_disk_full(error),
            RequestFailed::Random(error) => caremesh_storage::is_disk_full(error),
            RequestFailed::Stopped(_) => false,
        }
    }
}

pub struct ViewState {
    /// The node's database, with its key when it is encrypted.
    pub database: caremesh_storage::at_rest::Database,
    pub organisation: String,
    pub ods: String,
    /// This organisation's kind. A hub keeps no read model of clinical items
    /// (`caremesh_storage::read_model_keeps`), so it opens no patient's record.
    pub kind: OrgKind,
    /// This organisation as viewer; each request fills in its user and the keys revoked in
    /// the registry then in force.
    pub viewer: Viewer,
    /// How long a break-glass lasts.
    pub break_glass_minutes: u32,
    /// The running sync engine's counters, when sync is on.
    pub sync: Option<Arc<SyncCounters>>,
    /// Checks launch tokens.
    pub launch: LaunchVerifier,
    pub launch_config: LaunchConfig,
    /// Signs this node's access records, which tell data owners who viewed their data.
    pub key: PublisherKey,
    /// Organisation names from the trust registry, by ODS code.
    pub names: std::collections::BTreeMap<String, String>,
    /// Requests without a session refused since the last summary went to the audit trail.
    pub anonymous: std::sync::Mutex<AnonymousRefusals>,
    /// The bearer token that may scrape `/metrics` (kept in the node home).
    pub metrics_token: Option<String>,
    /// Why the drop folder is paused, if it is: set by the node's drop-folder watcher.
    pub drop_folder_paused: Arc<std::sync::Mutex<Option<String>>>,
    /// The running node: its one store writer (the view writes only through it) and its
    /// trust registry.
    pub node: Arc<dyn RunningNode>,
    /// Told when a subscription is made, so that the notifier greets its endpoint at once.
    pub subscriptions_changed: tokio::sync::Notify,
    /// Served over HTTPS: the session cookie is `Secure`, browsers are told to keep to
    /// HTTPS (HSTS), and the FHIR API's URLs are `https://`.
    pub https: bool,
}

/// Refused requests that carried no session (or a token whose signature failed): counted,
/// and written to the audit trail as one summary a minute. A row each would let anyone fill
/// the trail (and a patient's access report) from outside at hundreds of rows a second;
/// nobody signed in made them, so no patient's report lists them.
#[derive(Debug, Default)]
pub struct AnonymousRefusals {
    since: Option<i64>,
    by_action: std::collections::BTreeMap<String, u64>,
}

impl AnonymousRefusals {
    fn count(&mut self, action: &str, now: i64) {
        self.since.get_or_insert(now);
        *self.by_action.entry(action.to_string()).or_default() += 1;
    }

    /// The summary of what was counted, if anything, and a fresh count.
    fn take(&mut self, organisation: &str, now: i64) -> Option<AuditEvent> {
        let since = self.since.take()?;
        let by_action = std::mem::take(&mut self.by_action);
        let total: u64 = by_action.values().sum();
        let actions: Vec<String> = by_action
            .iter()
            .map(|(action, count)| format!("{action} {count}"))
            .collect();
        Some(AuditEvent {
            at: now,
            user_id: "anonymous".into(),
            user_name: "no session".into(),
            role: String::new(),
            organisation: organisation.to_string(),
            action: "refused-anonymous".into(),
            nhs: None,
            sources: Vec::new(),
            sections: Vec::new(),
            purpose: String::new(),
            outcome: "refused".into(),
            detail: format!(
                "{total} request(s) without a valid session refused from {} to {} ({}); the patients they named are not recorded",
                clock::rfc3339(since),
                clock::rfc3339(now),
                actions.join(", ")
            ),
        })
    }
}

pub fn router(state: Arc<ViewState>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/launch", get(launch))
        .route("/patients", get(search))
        .route("/patients/{nhs}", get(patient_page))
        .route("/patients/{nhs}/break-glass", post(break_glass))
        .route("/api/patients/{nhs}", get(patient_json))
        .route("/audit", get(audit_page))
        .route("/api/audit", get(audit_api))
        .route("/status", get(status))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/assets/{*path}", get(assets::asset))
        .route("/fhir/metadata", get(fhir::metadata))
        .route("/fhir/Patient", get(fhir::patient_search))
        .route("/fhir/Patient/{id}", get(fhir::patient_read))
        .route("/fhir/{resource_type}", get(fhir::type_search))
        .route("/fhir/{resource_type}/{id}", get(fhir::resource_read))
        .route(
            "/fhir/Patient/{id}/$everything",
            get(fhir::patient_everything),
        )
        .route("/fhir/Patient/{id}/$summary", get(fhir::patient_summary))
        .route("/fhir/Subscription", post(subscriptions::create))
        .route(
            "/fhir/Subscription/{id}",
            get(subscriptions::read).delete(subscriptions::delete),
        )
        .route(
            "/fhir/Subscription/{id}/$status",
            get(subscriptions::status),
        )
        .route("/oauth/token", post(fhir::token))
        .route(
            "/.well-known/smart-configuration",
            get(fhir::smart_configuration),
        )
        .layer(axum::middleware::map_response_with_state(
            state.clone(),
            protect,
        ))
        .with_state(state)
}

/// Patient data must not be cached, framed or sniffed; over HTTPS, browsers must not come
/// back over plain HTTP.
async fn protect(State(state): State<Arc<ViewState>>, mut response: Response) -> Response {
    let headers = response.headers_mut();
    if state.https {
        headers.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; frame-ancestors 'self'; form-action 'self'; base-uri 'none'",
        ),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

const SESSION_COOKIE: &str = "caremesh_session";

/// Runs storage work off the async threads. A failure is logged and becomes a 500 that
/// says where to look, never the error's text (it may name a patient).
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, RequestFailed> + Send + 'static,
) -> Result<T, Response> {
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => {
            tracing::error!(%error, "a view request failed");
            Err(internal_error())
        }
        Err(error) => {
            tracing::error!(%error, "a view task failed");
            Err(internal_error())
        }
    }
}

fn internal_error() -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        "The node could not read or write its database; see the node log.",
    )
        .into_response()
}

impl ViewState {
    /// An event for this node's audit trail; who is filled in from the session.
    fn event(
        &self,
        session: Option<&LaunchSession>,
        action: &str,
        nhs: Option<&str>,
    ) -> AuditEvent {
        AuditEvent {
            at: clock::now_unix(),
            user_id: session.map_or_else(|| "anonymous".into(), |s| s.user_id.clone()),
            user_name: session.map_or_else(|| "no session".into(), |s| s.user_name.clone()),
            role: session.map_or_else(String::new, |s| s.role.clone()),
            organisation: self.ods.clone(),
            action: action.into(),
            nhs: nhs.map(str::to_string),
            sources: Vec::new(),
            sections: Vec::new(),
            purpose: session.map_or_else(String::new, |s| s.purpose.clone()),
            outcome: "allowed".into(),
            detail: String::new(),
        }
    }

    /// Appends `event` to the trail (and the data owners' access records when it showed
    /// their data).
    async fn audit(self: &Arc<Self>, event: AuditEvent) -> Result<(), Response> {
        let state = self.clone();
        self.write(move |store| {
            caremesh_storage::publish::record_access(store, &state.key, &state.viewer.ods, &event)?;
            Ok(())
        })
        .await
    }

    /// Makes `write` through the node's one store writer, even on a full disk (from the
    /// reserve, see `disk.rs`): the view's writes are its audit and its sessions, which it
    /// cannot do without. A failure is logged and becomes a 500, as in [`blocking`].
    async fn write<T: Send + 'static>(
        &self,
        mut write: impl FnMut(&mut Store) -> Result<T, RequestFailed> + Send + 'static,
    ) -> Result<T, Response> {
        let home_dir = self.home_dir().to_path_buf();
        let (reply, answer) = tokio::sync::oneshot::channel();
        let made = self
            .node
            .write_now(Box::new(move |store| {
                let outcome = caremesh_storage::disk_space::write_even_when_full(
                    &home_dir,
                    RequestFailed::is_disk_full,
                    || write(store),
                );
                // The request may have gone (a closed connection): the write stands.
                let _ = reply.send(outcome);
            }))
            .await;
        let written = match made {
            Ok(()) => answer
                .await
                .unwrap_or(Err(RequestFailed::Stopped(WriterStopped))),
            Err(stopped) => Err(stopped.into()),
        };
        written.map_err(|error| {
            tracing::error!(%error, "a view's write failed");
            internal_error()
        })
    }

    /// The node home: the folder holding the database.
    fn home_dir(&self) -> &std::path::Path {
        self.database
            .path()
            .parent()
            .unwrap_or_else(|| std::path::Path::new("."))
    }

    /// Counts a refusal of a request that carried no session; see [`AnonymousRefusals`].
    fn count_anonymous(&self, action: &str) {
        self.anonymous
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .count(action, clock::now_unix());
    }

    /// Writes the summary of anonymous refusals counted so far, if any.
    pub async fn flush_anonymous(self: &Arc<Self>) {
        let summary = self
            .anonymous
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take(&self.ods, clock::now_unix());
        if let Some(event) = summary
            && self.audit(event).await.is_err()
        {
            tracing::error!("could not write the summary of anonymous refusals to the audit trail");
        }
    }

    /// Records a refusal and answers with `status` and `message`.
    async fn refuse(
        self: &Arc<Self>,
        mut event: AuditEvent,
        status: StatusCode,
        message: &str,
        api: bool,
    ) -> Response {
        event.outcome = "refused".into();
        event.detail = message.to_string();
        // The reason may quote a claim (an NHS number): it goes to the audit trail only.
        tracing::warn!(status = status.as_u16(), action = %event.action, "access refused; see the audit trail");
        if let Err(response) = self.audit(event).await {
            return response;
        }
        self.problem(status, "Access refused", message, api)
    }

    fn problem(&self, status: StatusCode, title: &str, message: &str, api: bool) -> Response {
        if api {
            (status, Json(serde_json::json!({ "error": message }))).into_response()
        } else {
            (
                status,
                Html(page(self, None, title, &problem_body(title, message))),
            )
                .into_response()
        }
    }
}

fn session_secret(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.to_string())
        .filter(|value| value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn secret_hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The session the request carries, if it is one in force.
async fn current_session(
    state: &Arc<ViewState>,
    headers: &HeaderMap,
) -> Result<Option<LaunchSession>, Response> {
    let Some(secret) = session_secret(headers) else {
        return Ok(None);
    };
    let database = state.database.clone();
    blocking(move || {
        let store = database.open_read_only()?;
        Ok(store.session(&secret_hash(&secret), clock::now_unix())?)
    })
    .await
}

const NO_SESSION: &str = "Open the shared care record from your clinical system: it launches the view for you and your patient. Direct links, bookmarks and expired sessions are refused.";

/// The request's session if it has `role` and, for a patient's record, was launched for
/// that patient. Otherwise the refusal, recorded in the audit trail when it named a patient
/// or came from a signed-in user.
async fn authorise(
    state: &Arc<ViewState>,
    headers: &HeaderMap,
    role: Role,
    patient: Option<&NhsNumber>,
    action: &str,
    api: bool,
) -> Result<LaunchSession, Response> {
    let session = current_session(state, headers).await?;
    let nhs = patient.map(|p| p.to_string());
    let Some(session) = session else {
        state.count_anonymous(action);
        return Err(state.problem(
            StatusCode::UNAUTHORIZED,
            "Sign in through your clinical system",
            NO_SESSION,
            api,
        ));
    };
    let event = state.event(Some(&session), action, nhs.as_deref());
    if session.role != role.as_str() {
        let message = format!(
            "This needs the {role} role; you were launched as {}.",
            session.role
        );
        return Err(state
            .refuse(event, StatusCode::FORBIDDEN, &message, api)
            .await);
    }
    if let Some(patient) = patient
        && session.nhs.as_deref() != Some(patient.as_str())
    {
        return Err(state
            .refuse(
                event,
                StatusCode::FORBIDDEN,
                "You were launched for a different patient. Open this patient from your clinical system.",
                api,
            )
            .await);
    }
    Ok(session)
}

#[derive(Deserialize)]
struct LaunchQuery {
    token: String,
}

/// Checks a launch token, uses it up, opens a session and sends the user where their role
/// starts: a clinician to the patient, an auditor to reports, an admin to status.
async fn launch(State(state): State<Arc<ViewState>>, Query(query): Query<LaunchQuery>) -> Response {
    let now = clock::now_unix();
    let verified = state
        .launch
        .verify(&query.token, &state.launch_config, &state.viewer.ods, now);
    let launch = match verified {
        Ok(launch) => launch,
        Err(refused) => return refuse_launch(&state, None, &refused).await,
    };
    if state.kind == OrgKind::Hub && launch.role == Role::Clinician {
        let refused = LaunchRefused::NoRecordsAtHub {
            ods: state.ods.clone(),
        };
        return refuse_launch(&state, Some(&launch), &refused).await;
    }
    let secret = match crate::launch::random_hex(32) {
        Ok(secret) => secret,
        Err(error) => {
            tracing::error!(%error, "no randomness for a session secret");
            return internal_error();
        }
    };
    let session = LaunchSession {
        user_id: launch.user_id.clone(),
        user_name: launch.user_name.clone(),
        role: launch.role.as_str().into(),
        organisation: launch.organisation.to_string(),
        nhs: launch.nhs.as_ref().map(|n| n.to_string()),
        purpose: launch.purpose.clone(),
        started_at: now,
        expires_at: now + i64::from(state.launch_config.session_minutes.max(1)) * 60,
    };
    let (token_id, expires_at, hash) = (
        launch.token_id.clone(),
        launch.expires_at,
        secret_hash(&secret),
    );
    let opened = state
        .write(move |store| {
            let used = store.use_launch_token(&token_id, expires_at, now)?;
            if used == TokenUse::First {
                store.open_session(&hash, &session)?;
            }
            Ok(used)
        })
        .await;
    match opened {
        Ok(TokenUse::First) => {}
        Ok(TokenUse::Replayed) => {
            return refuse_launch(&state, Some(&launch), &LaunchRefused::Replayed).await;
        }
        Err(response) => return response,
    }
    tracing::info!(role = %launch.role, "launched");
    let landing = match (&launch.role, &launch.nhs) {
        (Role::Clinician, Some(nhs)) => format!("/patients/{nhs}"),
        (Role::Auditor, _) => "/audit".into(),
        _ => "/status".into(),
    };
    // Secure over HTTPS: the browser then never sends the session over plain HTTP.
    let cookie = format!(
        "{SESSION_COOKIE}={secret}; HttpOnly; SameSite=Lax; Path=/; Max-Age={}{}",
        i64::from(state.launch_config.session_minutes.max(1)) * 60,
        if state.https { "; Secure" } else { "" }
    );
    let mut response = Redirect::to(&landing).into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// A refused launch, recorded with what the token claimed only when its signature held.
async fn refuse_launch(
    state: &Arc<ViewState>,
    launch: Option<&Launch>,
    refused: &LaunchRefused,
) -> Response {
    let mut event = state.event(
        None,
        "launch",
        launch.and_then(|l| l.nhs.as_ref()).map(|n| n.as_str()),
    );
    let Some(launch) = launch else {
        // Nothing in an unverified token can be believed: counted, not recorded as a user.
        state.count_anonymous("launch");
        return state.problem(
            StatusCode::UNAUTHORIZED,
            "Access refused",
            &refused.to_string(),
            false,
        );
    };
    event.user_id = launch.user_id.clone();
    event.user_name = launch.user_name.clone();
    event.role = launch.role.as_str().into();
    event.purpose = launch.purpose.clone();
    let status = match refused {
        // The token is good: this node is the wrong place for what it asks.
        LaunchRefused::NoRecordsAtHub { .. } => StatusCode::FORBIDDEN,
        _ => StatusCode::UNAUTHORIZED,
    };
    state
        .refuse(event, status, &refused.to_string(), false)
        .await
}

enum Lookup {
    /// The record, and for pages the offline banner (empty when every peer is connected).
    Found(Box<Record>, String),
    NotHeld,
}

/// Assembles the record for the session's user and records the view: which organisations'
/// data and which sections it showed.
async fn view_record(
    state: &Arc<ViewState>,
    session: &LaunchSession,
    nhs: &NhsNumber,
    api: bool,
) -> Result<Lookup, Response> {
    let database = state.database.clone();
    let mut viewer = state.viewer.clone();
    viewer.user_id = session.user_id.clone();
    viewer.revoked_signers = state.node.revoked_keys();
    let patient = nhs.clone();
    let names = state.names.clone();
    let (record, offline) = blocking(move || {
        let store = database.open_read_only()?;
        let now = clock::now_unix();
        let record = record::assemble(&store, &patient, &viewer, now)?;
        if api {
            // JSON callers read no banners.
            return Ok((record, String::new()));
        }
        let peers = store.current_peer_statuses()?;
        let name = |ods: &str| names.get(ods).cloned().unwrap_or_else(|| ods.to_string());
        Ok((record, render::offline_banner(&peers, &name, now)))
    })
    .await?;
    let mut event = state.event(Some(session), "view", Some(nhs.as_str()));
    match &record {
        Some(record) => {
            (event.sources, event.sections) = record.shown();
            if let Some(granted) = &record.break_glass {
                event.purpose = format!("{} (emergency access)", event.purpose);
                event.detail = format!("break-glass: {}", granted.reason);
            }
        }
        None => event.detail = "no record held".into(),
    }
    if api {
        event.detail = [event.detail.as_str(), "via the JSON API"]
            .iter()
            .filter(|s| !s.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join("; ");
    }
    state.audit(event).await?;
    Ok(match record {
        Some(record) => Lookup::Found(Box::new(record), offline),
        None => Lookup::NotHeld,
    })
}

/// The NHS number in a path, or the 400 that says what is wrong with it.
fn patient_in_path(state: &ViewState, raw: &str, api: bool) -> Result<NhsNumber, Response> {
    NhsNumber::parse(raw).map_err(|error| {
        state.problem(
            StatusCode::BAD_REQUEST,
            "Not a valid NHS number",
            &error.to_string(),
            api,
        )
    })
}

/// The clinician's record of the patient in the path: checked, authorised, assembled and
/// audited.
async fn open_record(
    state: &Arc<ViewState>,
    headers: &HeaderMap,
    raw: &str,
    api: bool,
) -> Result<(LaunchSession, NhsNumber, Lookup), Response> {
    let nhs = patient_in_path(state, raw, api)?;
    let session = authorise(state, headers, Role::Clinician, Some(&nhs), "view", api).await?;
    let lookup = view_record(state, &session, &nhs, api).await?;
    Ok((session, nhs, lookup))
}

async fn patient_json(
    State(state): State<Arc<ViewState>>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Response {
    match open_record(&state, &headers, &raw, true).await {
        Ok((_, _, Lookup::Found(record, _))) => Json(*record).into_response(),
        Ok((_, _, Lookup::NotHeld)) => state.problem(
            StatusCode::NOT_FOUND,
            "No record held",
            "no record held for this NHS number on this node",
            true,
        ),
        Err(response) => response,
    }
}

async fn patient_page(
    State(state): State<Arc<ViewState>>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Response {
    match open_record(&state, &headers, &raw, false).await {
        Ok((session, _, Lookup::Found(record, offline))) => {
            let token = session_secret(&headers)
                .map(|secret| form_token(&secret))
                .unwrap_or_default();
            Html(render::render_record(
                &state, &session, &record, &offline, &token,
            ))
            .into_response()
        }
        Ok((session, nhs, Lookup::NotHeld)) => (
            StatusCode::NOT_FOUND,
            Html(page(
                &state,
                Some(&session),
                "No record held",
                &format!(
                    "<h1 class=\"nhsuk-heading-l\">No record held</h1>\
                     <p>This node holds no record for NHS number {}.</p>",
                    escape(&nhs.formatted())
                ),
            )),
        )
            .into_response(),
        Err(response) => response,
    }
}

/// Limits on what a clinician types into the break-glass form.
pub(crate) const REASON_MIN_CHARS: usize = 10;
pub(crate) const REASON_MAX_CHARS: usize = 1000;

#[derive(Deserialize)]
struct BreakGlassForm {
    reason: String,
    /// The session's form token ([`form_token`]): a page of this node put it there.
    #[serde(default)]
    form_token: String,
}

/// The token a form of this node carries for the session `secret`: derived from the secret
/// only the user's browser holds, so another site cannot know it (CSRF).
pub fn form_token(secret: &str) -> String {
    hex::encode(Sha256::digest(
        format!("caremesh form token\0{secret}").as_bytes(),
    ))
}

/// Whether a state-changing request came from a page of this node. A browser's
/// `Sec-Fetch-Site` other than same-origin, or an `Origin` naming another site, is refused;
/// so is a form without the session's token. (Our pages send no referrer, so browsers send
/// `Origin: null` for their forms: the token is what proves them ours.)
fn same_site_form(headers: &HeaderMap, token: &str) -> Result<(), &'static str> {
    const ELSEWHERE: &str = "This request came from another site, so it was refused. Use the form on the patient's page.";
    let text = |name: &str| headers.get(name).and_then(|h| h.to_str().ok());
    if text("sec-fetch-site").is_some_and(|site| site != "same-origin") {
        return Err(ELSEWHERE);
    }
    if let Some(origin) = text("origin").filter(|origin| *origin != "null") {
        let authority = origin
            .split_once("://")
            .map_or(origin, |(_, rest)| rest)
            .split('/')
            .next()
            .unwrap_or_default();
        if Some(authority) != text("host") {
            return Err(ELSEWHERE);
        }
    }
    let expected = session_secret(headers).map(|secret| form_token(&secret));
    if expected.as_deref() != Some(token) {
        return Err(
            "This form has expired or did not come from this page. Reload the patient's page and try again.",
        );
    }
    Ok(())
}

/// What is wrong with a break-glass reason, in words for the clinician.
fn break_glass_problem(form: &BreakGlassForm) -> Option<String> {
    let reason = form.reason.trim().chars().count();
    if (REASON_MIN_CHARS..=REASON_MAX_CHARS).contains(&reason) {
        None
    } else {
        Some(format!(
            "Give the reason for emergency access in {REASON_MIN_CHARS} to {REASON_MAX_CHARS} characters: it is recorded and reviewed."
        ))
    }
}

/// Emergency access for the session's clinician: records who and why, for
/// `break_glass_minutes`, then shows the record. Only other organisations' data this node
/// holds becomes visible: private items and what an objection withheld never reached it.
async fn break_glass(
    State(state): State<Arc<ViewState>>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    Form(form): Form<BreakGlassForm>,
) -> Response {
    let result = async {
        let nhs = patient_in_path(&state, &raw, false)?;
        let session = authorise(
            &state,
            &headers,
            Role::Clinician,
            Some(&nhs),
            "break-glass",
            false,
        )
        .await?;
        if let Err(problem) = same_site_form(&headers, &form.form_token) {
            let event = state.event(Some(&session), "break-glass", Some(nhs.as_str()));
            return Err(state
                .refuse(event, StatusCode::FORBIDDEN, problem, false)
                .await);
        }
        if let Some(problem) = break_glass_problem(&form) {
            return Err(state.problem(
                StatusCode::BAD_REQUEST,
                "Emergency access not started",
                &problem,
                false,
            ));
        }
        let minutes = state.break_glass_minutes.max(1);
        let reason = form.reason.trim().to_string();
        let mut event = state.event(Some(&session), "break-glass", Some(nhs.as_str()));
        event.purpose = format!("{} (emergency access)", event.purpose);
        event.detail = reason.clone();
        let patient = nhs.clone();
        let audited = state.clone();
        // An emergency must not fail for want of disk space: the reserve is for this. The
        // grant and its audit entry are one transaction: never one without the other.
        let granted = state
            .write(move |store| {
                let now = clock::now_unix();
                let batch = store.write()?;
                let granted = batch.record_break_glass(
                    &patient,
                    &session.user_id,
                    &session.user_name,
                    &reason,
                    now,
                    now + i64::from(minutes) * 60,
                )?;
                caremesh_storage::publish::record_access_in(
                    &batch,
                    &audited.key,
                    &audited.viewer.ods,
                    &event,
                )?;
                batch.commit()?;
                Ok(granted)
            })
            .await?;
        tracing::info!(
            id = granted.id,
            minutes,
            "emergency access (break-glass) started"
        );
        Ok(Redirect::to(&format!("/patients/{nhs}")).into_response())
    }
    .await;
    result.unwrap_or_else(|response| response)
}

#[derive(Deserialize)]
struct SearchQuery {
    nhs: String,
}

/// A clinician's search by NHS number: recorded, and only the launched patient opens.
async fn search(
    State(state): State<Arc<ViewState>>,
    headers: HeaderMap,
    Query(query): Query<SearchQuery>,
) -> Response {
    let digits: String = query.nhs.chars().filter(|c| !c.is_whitespace()).collect();
    let result = async {
        let nhs = patient_in_path(&state, &digits, false)?;
        let session = authorise(
            &state,
            &headers,
            Role::Clinician,
            Some(&nhs),
            "search",
            false,
        )
        .await?;
        state
            .audit(state.event(Some(&session), "search", Some(nhs.as_str())))
            .await?;
        Ok(Redirect::to(&format!("/patients/{nhs}")).into_response())
    }
    .await;
    result.unwrap_or_else(|response| response)
}

/// The start page: where the session's role begins, or how to sign in.
async fn index(State(state): State<Arc<ViewState>>, headers: HeaderMap) -> Response {
    match current_session(&state, &headers).await {
        Ok(Some(session)) => match (session.role.as_str(), &session.nhs) {
            ("clinician", Some(nhs)) => Redirect::to(&format!("/patients/{nhs}")).into_response(),
            ("auditor", _) => Redirect::to("/audit").into_response(),
            _ => Redirect::to("/status").into_response(),
        },
        Ok(None) => state.problem(
            StatusCode::UNAUTHORIZED,
            "Sign in through your clinical system",
            NO_SESSION,
            false,
        ),
        Err(response) => response,
    }
}

#[derive(Deserialize, Default)]
struct AuditQuery {
    patient: Option<String>,
    user: Option<String>,
    from: Option<String>,
    to: Option<String>,
    format: Option<String>,
}

impl AuditQuery {
    fn report_query(&self) -> Result<ReportQuery, String> {
        ReportQuery::parse(
            self.patient.as_deref(),
            self.user.as_deref(),
            self.from.as_deref(),
            self.to.as_deref(),
        )
    }
}

/// Runs an auditor's report and records that it was read.
async fn run_report(
    state: &Arc<ViewState>,
    session: &LaunchSession,
    query: &ReportQuery,
) -> Result<Vec<crate::audit_report::ReportRow>, Response> {
    let mut event = state.event(
        Some(session),
        "audit-report",
        query.patient.as_ref().map(|p| p.as_str()),
    );
    if let Some(user) = &query.user {
        event.detail = format!("report on user {user}");
    }
    let (database, own, report_query) = (
        state.database.clone(),
        state.viewer.ods.clone(),
        query.clone(),
    );
    let rows = blocking(move || {
        let store = database.open_read_only()?;
        Ok(crate::audit_report::report(&store, &own, &report_query)?)
    })
    .await?;
    state.audit(event).await?;
    Ok(rows)
}

/// Reports for auditors: JSON (default), CSV or a FHIR Bundle of AuditEvent.
async fn audit_api(
    State(state): State<Arc<ViewState>>,
    headers: HeaderMap,
    Query(params): Query<AuditQuery>,
) -> Response {
    let result = async {
        let session =
            authorise(&state, &headers, Role::Auditor, None, "audit-report", true).await?;
        let format = match params.format.as_deref() {
            None => ReportFormat::Json,
            Some(text) => ReportFormat::parse(text).ok_or_else(|| {
                state.problem(
                    StatusCode::BAD_REQUEST,
                    "Unknown format",
                    "format must be table, csv, json or fhir",
                    true,
                )
            })?,
        };
        let query = params.report_query().map_err(|problem| {
            state.problem(StatusCode::BAD_REQUEST, "Bad report", &problem, true)
        })?;
        let rows = run_report(&state, &session, &query).await?;
        Ok((
            [(header::CONTENT_TYPE, format.content_type())],
            crate::audit_report::render(&rows, format),
        )
            .into_response())
    }
    .await;
    result.unwrap_or_else(|response| response)
}

/// The auditor's page: a form, and the report it asked for.
async fn audit_page(
    State(state): State<Arc<ViewState>>,
    headers: HeaderMap,
    Query(params): Query<AuditQuery>,
) -> Response {
    let result = async {
        let session =
            authorise(&state, &headers, Role::Auditor, None, "audit-report", false).await?;
        let form = ReportForm {
            patient: params.patient.as_deref().unwrap_or(""),
            user: params.user.as_deref().unwrap_or(""),
            from: params.from.as_deref().unwrap_or(""),
            to: params.to.as_deref().unwrap_or(""),
        };
        let mut body = render::audit_form(&form);
        let asked = params
            .patient
            .as_deref()
            .is_some_and(|p| !p.trim().is_empty())
            || params.user.as_deref().is_some_and(|u| !u.trim().is_empty());
        if asked {
            match params.report_query() {
                Ok(query) => {
                    let rows = run_report(&state, &session, &query).await?;
                    body.push_str(&render::render_report(&rows, &form));
                }
                Err(problem) => body.push_str(&problem_body("Report not run", &problem)),
            }
        }
        Ok(Html(page(&state, Some(&session), "Audit reports", &body)).into_response())
    }
    .await;
    result.unwrap_or_else(|response| response)
}

/// Node status for admins: what is held, and each peer's sync state.
async fn status(State(state): State<Arc<ViewState>>, headers: HeaderMap) -> Response {
    let result = async {
        authorise(&state, &headers, Role::Admin, None, "status", true).await?;
        let database = state.database.clone();
        let (stats, peers) = blocking(move || {
            let store = database.open_read_only()?;
            Ok((store.stats()?, store.current_peer_statuses()?))
        })
        .await?;
        Ok(Json(serde_json::json!({
            "organisation": state.ods,
            "stats": stats,
            "peers": peers,
        }))
        .into_response())
    }
    .await;
    result.unwrap_or_else(|response| response)
}

/// Whether the request presents the scrape token: `Authorization: Bearer <token>`, compared
/// in time independent of where it differs.
fn presents_metrics_token(state: &ViewState, headers: &HeaderMap) -> bool {
    let (Some(expected), Some(presented)) = (
        state.metrics_token.as_deref(),
        headers
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer ")),
    ) else {
        return false;
    };
    expected.len() == presented.len()
        && expected
            .bytes()
            .zip(presented.bytes())
            .fold(0u8, |differs, (a, b)| differs | (a ^ b))
            == 0
}

async fn metrics(State(state): State<Arc<ViewState>>, headers: HeaderMap) -> Response {
    if !presents_metrics_token(&state, &headers)
        && let Err(response) = authorise(&state, &headers, Role::Admin, None, "metrics", true).await
    {
        return response;
    }
    let database = state.database.clone();
    let counters = state.sync.clone();
    let home_dir = state.home_dir().to_path_buf();
    let drop_folder_paused = state
        .drop_folder_paused
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .is_some();
    let rendered = blocking(move || {
        let store = database.open_read_only()?;
        let local = crate::metrics::Local {
            home_dir: &home_dir,
            drop_folder_paused,
        };
        Ok(crate::metrics::render(&store, counters.as_deref(), &local)?)
    })
    .await;
    match rendered {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(response) => response,
    }
}

/// Liveness for load balancers and the demo: answers without a session, and says nothing
/// about the patients held.
async fn health(State(state): State<Arc<ViewState>>) -> Response {
    let database = state.database.clone();
    // One indexed read: proof the database opens and answers, at any size. (It counted
    // every row once, which took minutes at a million documents.)
    let readable = blocking(move || Ok(database.open_read_only()?.feed_tip()?)).await;
    let paused = state
        .drop_folder_paused
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let disk = caremesh_storage::disk_space::status(state.home_dir());
    match readable {
        // Reads still work while the drop folder is paused or the disk is full: degraded,
        // not down.
        Ok(_) => {
            let degraded = paused.is_some() || disk.problem.is_some();
            let mut body = serde_json::json!({
                "status": if degraded { "degraded" } else { "ok" },
                "organisation": state.ods,
                "disk": disk,
            });
            if let Some(reason) = paused {
                body["drop_folder"] = serde_json::json!(format!("paused: {reason}"));
            }
            Json(body).into_response()
        }
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "database unreadable" })),
        )
            .into_response(),
    }
}
