//! The FHIR R4 API at `/fhir`, and the token endpoint its clients use (`/oauth/token`).
//!
//! Every read is served from local storage, so the API answers offline as the page does.
//! Access is by bearer token only (no cookies: a page of another site cannot read through a
//! clinician's browser). What a token's holder sees of a patient is decided by
//! `record::assemble`, as for the page: for a user, that user (their Share In at this
//! organisation, their break-glass); for system access, this organisation. The token's
//! scopes then decide which resource types it reads.
//!
//! A patient the caller may not see is "not found", as GP Connect answers: the answer never
//! says whether the node holds them.

use super::{RequestFailed, ViewState, blocking, secret_hash};
use crate::api_access::{self, ClientKey, ScopeContext};
use crate::fhir_api::{self, NHS_NUMBER_SYSTEM};
use crate::fhir_search;
use crate::fhir_summary;
use crate::launch::Role;
use crate::record::{self, Record};
use axum::extract::{Form, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use caremesh_fhir::clock;
use caremesh_storage::access::TokenUse;
use caremesh_storage::api_access::{ApiToken, ApiUser};
use caremesh_storage::audit::AuditEvent;
use caremesh_sync::{NhsNumber, OrgKind};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// A FHIR answer: the resource as `application/fhir+json`.
pub(super) fn fhir(status: StatusCode, resource: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON))],
        resource.to_string(),
    )
        .into_response()
}

/// An OperationOutcome: `code` from FHIR's IssueType, `text` for the integrator.
pub(super) fn outcome(status: StatusCode, code: &str, text: &str) -> Response {
    let severity = if status.is_server_error() {
        "fatal"
    } else {
        "error"
    };
    let mut response = fhir(
        status,
        &json!({
            "resourceType": "OperationOutcome",
            "issue": [{ "severity": severity, "code": code, "diagnostics": text }],
        }),
    );
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"caremesh FHIR API\""),
        );
    }
    response
}

/// A success that has no resource to return (an OperationOutcome of severity information).
pub(super) fn outcome_information(text: &str) -> Response {
    fhir(
        StatusCode::OK,
        &json!({
            "resourceType": "OperationOutcome",
            "issue": [{ "severity": "information", "code": "informational", "diagnostics": text }],
        }),
    )
}

pub(super) fn not_found() -> Response {
    outcome(
        StatusCode::NOT_FOUND,
        "not-found",
        "No patient with that id or identifier is available to you on this node.",
    )
}

/// The FHIR base URL as the client reached it, for `fullUrl`s and links.
pub(super) fn base_url(state: &ViewState, headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("localhost");
    let scheme = if state.https { "https" } else { "http" };
    format!("{scheme}://{host}/fhir")
}

/// Who is calling: a token in force, and what it grants.
pub(super) struct Caller {
    pub(super) token: ApiToken,
    pub(super) scopes: Vec<api_access::Scope>,
}

impl Caller {
    /// System access, or access for a user (or one patient, for a patient-limited token).
    fn context(&self) -> ScopeContext {
        if self.token.user.is_some() {
            ScopeContext::User
        } else {
            ScopeContext::System
        }
    }

    /// The record as FHIR, less the resource types the token's scopes do not read.
    pub(super) fn render(&self, record: &Record) -> fhir_api::FhirRecord {
        let mut rendered = fhir_api::render(record);
        rendered
            .resources
            .retain(|resource| self.allows(resource["resourceType"].as_str().unwrap_or(""), true));
        rendered
    }

    pub(super) fn allows(&self, resource_type: &str, search: bool) -> bool {
        api_access::allows(&self.scopes, self.context(), resource_type, search)
            || (self.token.nhs.is_some()
                && api_access::allows(&self.scopes, ScopeContext::Patient, resource_type, search))
    }

    /// The audit trail's who: the user, or the client as a system.
    pub(super) fn event(&self, state: &ViewState, action: &str, nhs: Option<&str>) -> AuditEvent {
        let mut event = state.event(None, action, nhs);
        let client = &self.token.client_id;
        match &self.token.user {
            Some(ApiUser { id, name, role }) => {
                event.user_id = id.clone();
                event.user_name = name.clone();
                event.role = role.clone();
            }
            None => {
                event.user_id = format!("client:{client}");
                event.user_name = format!("system access by API client {client}");
                event.role = "system".into();
            }
        }
        event.purpose = self.token.purpose.clone();
        event.detail = format!("via the FHIR API, client {client}");
        event
    }
}

/// The token the request presents, if it is one in force. Otherwise a 401 (counted as an
/// anonymous refusal, as the page's are).
pub(super) async fn caller(
    state: &Arc<ViewState>,
    headers: &HeaderMap,
    action: &str,
) -> Result<Caller, Response> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(|t| secret_hash(&t.to_ascii_lowercase()));
    let token = match presented {
        Some(hash) => {
            let database = state.database.clone();
            blocking(move || {
                let store = database.open_read_only()?;
                Ok(store.api_token(&hash, clock::now_unix())?)
            })
            .await?
        }
        None => None,
    };
    let Some(token) = token else {
        state.count_anonymous(action);
        return Err(outcome(
            StatusCode::UNAUTHORIZED,
            "login",
            "Present an access token (Authorization: Bearer ...) from POST /oauth/token, or from `caremesh api-token` on the node. It may have expired.",
        ));
    };
    let scopes = api_access::parse_scopes(&token.scopes).unwrap_or_default();
    Ok(Caller { token, scopes })
}

/// Refuses what the token's scopes or the user's role do not allow, recorded when it names
/// a patient.
pub(super) async fn check_allowed(
    state: &Arc<ViewState>,
    caller: &Caller,
    resource_type: &str,
    search: bool,
    event: AuditEvent,
) -> Result<(), Response> {
    let refusal = if !caller.allows(resource_type, search) {
        Some(format!(
            "The token's scopes ({}) do not allow {} {resource_type}.",
            caller.token.scopes,
            if search { "searching" } else { "reading" }
        ))
    } else if let Some(user) = &caller.token.user
        && user.role != Role::Clinician.as_str()
    {
        Some(format!(
            "Patients' records are read by the clinician role; this token acts for a user with the {} role.",
            user.role
        ))
    } else {
        None
    };
    match refusal {
        Some(text) => Err(refuse(state, event, StatusCode::FORBIDDEN, "forbidden", &text).await),
        None => Ok(()),
    }
}

async fn refuse(
    state: &Arc<ViewState>,
    mut event: AuditEvent,
    status: StatusCode,
    code: &str,
    text: &str,
) -> Response {
    event.outcome = "refused".into();
    event.detail = format!("{}; {text}", event.detail);
    tracing::warn!(status = status.as_u16(), action = %event.action, "FHIR API access refused; see the audit trail");
    if let Err(response) = state.audit(event).await {
        return response;
    }
    outcome(status, code, text)
}

/// The patient's record as the caller may see it, not yet audited: only
/// [`Unaudited::audited`] hands it out, once its access is in the audit trail.
#[must_use = "the record is shown only once its access is audited"]
pub(super) struct Unaudited {
    record: Option<Record>,
    event: AuditEvent,
}

impl Unaudited {
    /// The record to render from before the audit entry says what was shown.
    pub(super) fn peek(&self) -> Option<&Record> {
        self.record.as_ref()
    }

    /// The record, once the access is in the audit trail, `detail` added to the entry.
    pub(super) async fn audited(
        mut self,
        state: &Arc<ViewState>,
        detail: Option<String>,
    ) -> Result<Option<Record>, Response> {
        if let Some(detail) = detail {
            self.event.detail = format!("{}; {detail}", self.event.detail);
        }
        state.audit(self.event).await?;
        Ok(self.record)
    }
}

/// Who sees a record for an API caller: a user sees what they may (their break-glass among
/// it); system access sees what this organisation may, and no user's break-glass.
pub(super) fn viewer_for(state: &ViewState, user: Option<&ApiUser>) -> record::Viewer {
    let mut viewer = state.viewer.clone();
    viewer.user_id = user.map(|u| u.id.clone()).unwrap_or_default();
    viewer.revoked_signers = state.node.revoked_keys();
    viewer
}

/// The patient's record as the caller may see it; `None` is "not found" (not held, or not
/// this token's patient).
pub(super) async fn caller_record(
    state: &Arc<ViewState>,
    caller: &Caller,
    nhs: &NhsNumber,
    mut event: AuditEvent,
) -> Result<Unaudited, Response> {
    let other_patient = caller
        .token
        .nhs
        .as_deref()
        .is_some_and(|only| only != nhs.as_str());
    if state.kind == OrgKind::Hub || other_patient {
        if other_patient {
            event.outcome = "refused".into();
            event.detail = format!("{}; the token is for another patient", event.detail);
        }
        return Ok(Unaudited {
            record: None,
            event,
        });
    }
    let database = state.database.clone();
    let viewer = viewer_for(state, caller.token.user.as_ref());
    let patient = nhs.clone();
    let record = blocking(move || {
        let store = database.open_read_only()?;
        Ok(record::assemble(
            &store,
            &patient,
            &viewer,
            clock::now_unix(),
        )?)
    })
    .await?;
    match &record {
        Some(record) => {
            (event.sources, event.sections) = record.shown();
            if let Some(granted) = &record.break_glass {
                event.purpose = format!("{} (emergency access)", event.purpose);
                event.detail = format!("{}; break-glass: {}", event.detail, granted.reason);
            }
        }
        None => event.detail = format!("{}; no record held", event.detail),
    }
    Ok(Unaudited { record, event })
}

/// The query's parameters, each once at most; any other than `known` is an error (a
/// search that ignored a parameter would answer a question it was not asked).
fn parameters(query: &Option<String>, known: &[&str]) -> Result<Vec<(String, String)>, Response> {
    let pairs = query_pairs(query)?;
    for (name, _) in &pairs {
        if !known.contains(&name.as_str()) {
            let supported = if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            };
            return Err(outcome(
                StatusCode::BAD_REQUEST,
                "not-supported",
                &format!(
                    "The parameter `{}` is not supported here (supported: {supported}); see /fhir/metadata.",
                    clip(name, 64)
                ),
            ));
        }
        if pairs.iter().filter(|(other, _)| other == name).count() > 1 {
            return Err(outcome(
                StatusCode::BAD_REQUEST,
                "not-supported",
                &format!(
                    "The parameter `{}` is given more than once.",
                    clip(name, 64)
                ),
            ));
        }
    }
    Ok(pairs)
}

/// A query holds at most this many parameters.
const MAX_PARAMETERS: usize = 32;

/// The query's parameters, decoded, in order.
fn query_pairs(query: &Option<String>) -> Result<Vec<(String, String)>, Response> {
    let pairs: Vec<(String, String)> = query
        .as_deref()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .take(MAX_PARAMETERS + 1)
                .map(|(name, value)| (name.into_owned(), value.into_owned()))
                .collect()
        })
        .unwrap_or_default();
    if pairs.len() > MAX_PARAMETERS {
        return Err(outcome(
            StatusCode::BAD_REQUEST,
            "too-costly",
            &format!("A search takes at most {MAX_PARAMETERS} parameters."),
        ));
    }
    Ok(pairs)
}

fn clip(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

fn parameter<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// `GET /fhir/metadata`: what this server does, and only that.
pub async fn metadata(State(state): State<Arc<ViewState>>, headers: HeaderMap) -> Response {
    let base = base_url(&state, &headers);
    fhir(StatusCode::OK, &capability_statement(&state, &base))
}

fn capability_statement(state: &ViewState, base: &str) -> Value {
    let token_url = format!("{}/oauth/token", base.trim_end_matches("/fhir"));
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": clock::rfc3339(clock::now_unix()),
        "publisher": state.organisation,
        "kind": "instance",
        "software": { "name": "caremesh", "version": env!("CARGO_PKG_VERSION") },
        "implementation": {
            "description": format!("caremesh shared care record at {} ({}): read-only, served from this node's local store", state.organisation, state.ods),
            "url": base,
        },
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json"],
        "rest": [{
            "mode": "server",
            "documentation": "Read-only. Each resource is its publisher's, named in meta.source; the same fact from several organisations is several resources. A patient the caller may not see is not found.",
            "security": {
                "cors": false,
                "service": [{
                    "coding": [{
                        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                        "code": "SMART-on-FHIR",
                    }],
                }],
                "extension": [{
                    "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [{ "url": "token", "valueUri": token_url }],
                }],
                "description": "SMART Backend Services: POST a client_credentials grant with a private_key_jwt client assertion (RS384, ES384 or EdDSA) to the token endpoint, then present the access token as a Bearer token. For a signed-in user, the grant urn:ietf:params:oauth:grant-type:jwt-bearer with the user's launch token as the assertion.",
            },
            "resource": std::iter::once(patient_capability()).chain(
                fhir_search::SEARCHABLE_TYPES.iter().map(|t| type_capability(t))
            ).chain(std::iter::once(super::subscriptions::capability())).collect::<Vec<Value>>(),
        }],
    })
}

/// What the API does with one type: search within a patient's record.
fn type_capability(resource_type: &str) -> Value {
    let parameter = |name: &str, kind: &str, documentation: String| json!({ "name": name, "type": kind, "documentation": documentation });
    let mut parameters = vec![
        parameter(
            "patient",
            "reference",
            format!(
                "Required: the patient's NHS number (also as Patient/N, or patient.identifier={NHS_NUMBER_SYSTEM}|N)"
            ),
        ),
        parameter(
            "code",
            "token",
            format!(
                "Matches {}; code, system|code or system|, comma-separated for any of several",
                fhir_search::code_documentation(resource_type)
            ),
        ),
        parameter(
            "date",
            "date",
            format!(
                "Compares {} with FHIR's prefixes (eq, ne, gt, lt, ge, le); give it twice for a range",
                fhir_search::date_documentation(resource_type)
            ),
        ),
        parameter(
            "_lastUpdated",
            "date",
            "Compares the publisher's meta.lastUpdated".into(),
        ),
        parameter(
            "_count",
            "number",
            format!(
                "Page size, 1 to {} ({} unless given); the next link pages on",
                fhir_search::MAX_COUNT,
                fhir_search::DEFAULT_COUNT
            ),
        ),
    ];
    let supported = fhir_search::supported_parameters(resource_type);
    if supported.contains(&"category") {
        parameters.push(parameter("category", "token", "Matches category".into()));
    }
    if supported.contains(&"clinical-status") {
        parameters.push(parameter(
            "clinical-status",
            "token",
            "Matches clinicalStatus".into(),
        ));
    }
    json!({
        "type": resource_type,
        "interaction": [
            { "code": "read", "documentation": "By the logical id the API gives ({ODS}-{publisher's id}), as the caller may read it" },
            { "code": "search-type", "documentation": "Within one patient's record; _sort=-date (or date) sorts by the date parameter's element" },
        ],
        "searchParam": parameters,
    })
}

fn patient_capability() -> Value {
    json!({
                "type": "Patient",
                "interaction": [{ "code": "read" }, { "code": "search-type" }],
                "searchParam": [{
                    "name": "identifier",
                    "type": "token",
                    "documentation": format!("{NHS_NUMBER_SYSTEM}|{{NHS number}}"),
                }],
                "operation": [{
                    "name": "summary",
                    "definition": "http://hl7.org/fhir/uv/ips/OperationDefinition/summary",
                    "documentation": "An International Patient Summary document: allergies, medicines and problems, and the rest as held; what each section leaves out, and the record's notices, are said in its narrative",
                }, {
                    "name": "everything",
                    "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
                    "documentation": "The patient's record as the caller may see it; _since limits it to resources that arrived at this node at or after the instant, or whose publisher's meta.lastUpdated is (resources without one are included; meta.lastUpdated stays the publisher's)",
                }],
    })
}

/// `GET /.well-known/smart-configuration`: SMART's discovery document.
pub async fn smart_configuration(
    State(state): State<Arc<ViewState>>,
    headers: HeaderMap,
) -> Response {
    let base = base_url(&state, &headers);
    let token_url = format!("{}/oauth/token", base.trim_end_matches("/fhir"));
    (
        [(header::CONTENT_TYPE, "application/json")],
        json!({
            "token_endpoint": token_url,
            "grant_types_supported": ["client_credentials", USER_GRANT],
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384", "EdDSA"],
            "scopes_supported": ["system/*.rs", "user/*.rs", "patient/*.rs"],
            "capabilities": ["client-confidential-asymmetric", "permission-v2", "permission-v1"],
        })
        .to_string(),
    )
        .into_response()
}

/// A request about the patient in the path (`id`, an NHS number): the token checked, the
/// query's parameters read by `read_query` (which refuses what it does not take), the
/// scopes and role checked, and the record the caller may see, its access audited as
/// `action`. A patient the caller may not see is "not found".
async fn patient_request<T>(
    state: &Arc<ViewState>,
    headers: &HeaderMap,
    (id, query): (&str, &Option<String>),
    action: &str,
    read_query: impl FnOnce(&Option<String>) -> Result<T, Response>,
) -> Result<(Caller, Record, T), Response> {
    let caller = caller(state, headers, action).await?;
    let asked = read_query(query)?;
    let Ok(nhs) = NhsNumber::parse(id) else {
        return Err(not_found());
    };
    let event = caller.event(state, action, Some(nhs.as_str()));
    check_allowed(state, &caller, "Patient", false, event.clone()).await?;
    let seen = caller_record(state, &caller, &nhs, event).await?;
    match seen.audited(state, None).await? {
        Some(record) => Ok((caller, record, asked)),
        None => Err(not_found()),
    }
}

/// `GET /fhir/{type}/{id}`: one resource of a patient's record, by the logical id the API
/// gave it (`{ODS}-{publisher's id}`), as the caller may read it. What the caller may not
/// see, like what is not held, is "not found".
pub async fn resource_read(
    State(state): State<Arc<ViewState>>,
    headers: HeaderMap,
    Path((resource_type, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Response {
    let result = async {
        let caller = caller(&state, &headers, "fhir-read").await?;
        no_parameters(&query)?;
        if !fhir_search::SEARCHABLE_TYPES.contains(&resource_type.as_str()) {
            return Err(outcome(
                StatusCode::NOT_FOUND,
                "not-supported",
                &format!(
                    "`{}` is not a resource type this API reads by id (see /fhir/metadata).",
                    clip(&resource_type, 64)
                ),
            ));
        }
        let not_held = || {
            outcome(
                StatusCode::NOT_FOUND,
                "not-found",
                &format!("No {resource_type} with that id is available to you on this node."),
            )
        };
        // The logical id names its publisher (an ODS code has no '-') and the publisher's id.
        let (ods, own) = id.split_once('-').ok_or_else(not_held)?;
        let (database, reference) = (state.database.clone(), format!("{resource_type}/{own}"));
        let publisher = ods.to_string();
        let held = blocking(move || {
            Ok(database
                .open_read_only()?
                .patient_of_resource(&publisher, &reference)?)
        })
        .await?;
        let nhs = held
            .and_then(|nhs| NhsNumber::parse(&nhs).ok())
            .ok_or_else(not_held)?;
        let event = caller.event(&state, "fhir-read", Some(nhs.as_str()));
        check_allowed(&state, &caller, &resource_type, false, event.clone()).await?;
        let seen = caller_record(&state, &caller, &nhs, event).await?;
        let found = seen.peek().and_then(|record| {
            fhir_api::render(record)
                .resources
                .into_iter()
                .find(|r| r["resourceType"] == resource_type.as_str() && r["id"] == id.as_str())
        });
        let served = match &found {
            Some(_) => format!("read {resource_type}/{id}"),
            None => format!("read {resource_type}/{id}: not shown to this caller"),
        };
        seen.audited(&state, Some(served)).await?;
        found
            .map(|resource| fhir(StatusCode::OK, &resource))
            .ok_or_else(not_held)
    }
    .await;
    result.unwrap_or_else(|response| response)
}

/// A query that takes no parameters.
fn no_parameters(query: &Option<String>) -> Result<(), Response> {
    parameters(query, &[]).map(drop)
}

/// `GET /fhir/Patient/{id}`: the patient's Patient resource, by NHS number.
pub async fn patient_read(
    State(state): State<Arc<ViewState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let request = (id.as_str(), &query);
    match patient_request(&state, &headers, request, "fhir-read", no_parameters).await {
        Ok((_, record, ())) => fhir(StatusCode::OK, &fhir_api::render(&record).patient),
        Err(response) => response,
    }
}

/// `GET /fhir/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|N`: a searchset of the
/// patient, or of none.
pub async fn patient_search(
    State(state): State<Arc<ViewState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let result = async {
        let caller = caller(&state, &headers, "fhir-search").await?;
        let pairs = parameters(&query, &["identifier", "_id"])?;
        let nhs_text = match (parameter(&pairs, "identifier"), parameter(&pairs, "_id")) {
            (Some(identifier), None) => match identifier.split_once('|') {
                Some((NHS_NUMBER_SYSTEM, value)) => value.to_string(),
                _ => {
                    return Err(outcome(
                        StatusCode::BAD_REQUEST,
                        "value",
                        &format!("Search patients by NHS number: identifier={NHS_NUMBER_SYSTEM}|{{NHS number}}."),
                    ));
                }
            },
            (None, Some(id)) => id.to_string(),
            _ => {
                return Err(outcome(
                    StatusCode::BAD_REQUEST,
                    "required",
                    &format!("Search patients by one NHS number: identifier={NHS_NUMBER_SYSTEM}|{{NHS number}} or _id={{NHS number}}; listing every patient is not supported."),
                ));
            }
        };
        let nhs = NhsNumber::parse(&nhs_text).map_err(|error| {
            outcome(StatusCode::BAD_REQUEST, "value", &format!("Not a valid NHS number: {error}"))
        })?;
        let event = caller.event(&state, "fhir-search", Some(nhs.as_str()));
        check_allowed(&state, &caller, "Patient", true, event.clone()).await?;
        let base = base_url(&state, &headers);
        let seen = caller_record(&state, &caller, &nhs, event).await?;
        let record = seen.audited(&state, None).await?;
        let entries: Vec<Value> = record
            .iter()
            .map(|record| {
                let patient = fhir_api::render(record).patient;
                json!({
                    "fullUrl": format!("{base}/Patient/{}", nhs.as_str()),
                    "resource": patient,
                    "search": { "mode": "match" },
                })
            })
            .collect();
        let self_link = format!(
            "{base}/Patient?{}",
            query.as_deref().unwrap_or_default()
        );
        Ok(fhir(
            StatusCode::OK,
            &json!({
                "resourceType": "Bundle",
                "type": "searchset",
                "total": entries.len(),
                "link": [{ "relation": "self", "url": self_link }],
                "entry": entries,
            }),
        ))
    }
    .await;
    result.unwrap_or_else(|response| response)
}

/// `GET /fhir/Patient/{id}/$everything`: the record as the caller may see it, with a
/// Provenance per publisher.
pub async fn patient_everything(
    State(state): State<Arc<ViewState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let result = async {
        let read_since = |query: &Option<String>| {
            let pairs = parameters(query, &["_since"])?;
            parameter(&pairs, "_since").map(instant).transpose()
        };
        let request = (id.as_str(), &query);
        let (caller, record, since) =
            patient_request(&state, &headers, request, "fhir-everything", read_since).await?;
        let mut rendered = caller.render(&record);
        if let Some(since) = since {
            // New here since then, or updated by its publisher since then: a version that
            // arrived late from a node that was offline is new to the client all the same.
            let nhs = NhsNumber::parse(&record.nhs_number).map_err(|_| not_found())?;
            let database = state.database.clone();
            let stored =
                blocking(move || Ok(database.open_read_only()?.items_stored_at(&nhs)?)).await?;
            let stored_at: std::collections::HashMap<String, i64> = stored
                .into_iter()
                .map(|(publisher, item_id, at)| (fhir_api::logical_id(&publisher, &item_id), at))
                .collect();
            rendered.resources.retain(|resource| {
                let arrived = resource["id"]
                    .as_str()
                    .and_then(|id| stored_at.get(id))
                    .is_some_and(|at| *at >= since);
                arrived || updated_since(resource, since)
            });
        }
        let base = base_url(&state, &headers);
        Ok(fhir(
            StatusCode::OK,
            &fhir_api::everything_bundle(&rendered, Some(&base)),
        ))
    }
    .await;
    result.unwrap_or_else(|response| response)
}

/// `GET /fhir/Patient/{id}/$summary`: the record as an International Patient Summary
/// document (see `fhir_summary`).
pub async fn patient_summary(
    State(state): State<Arc<ViewState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let result = async {
        let request = (id.as_str(), &query);
        let (caller, record, ()) =
            patient_request(&state, &headers, request, "fhir-summary", no_parameters).await?;
        let rendered = caller.render(&record);
        let made_at = fhir_summary::MadeAt {
            ods: &state.ods,
            name: &state.organisation,
            at: &clock::rfc3339(clock::now_unix()),
        };
        Ok(fhir(
            StatusCode::OK,
            &fhir_summary::summary_bundle(&rendered, &made_at, &base_url(&state, &headers)),
        ))
    }
    .await;
    result.unwrap_or_else(|response| response)
}

/// A FHIR instant (or a date-time with a zone) as Unix seconds.
fn instant(text: &str) -> Result<i64, Response> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp())
        .map_err(|_| {
            outcome(
                StatusCode::BAD_REQUEST,
                "value",
                &format!(
                    "`_since` must be an instant with a time zone, as 2026-01-31T09:00:00Z; it was `{}`.",
                    clip(text, 64)
                ),
            )
        })
}

/// Whether the publisher last updated `resource` at or after `since`. One that does not say
/// is kept: dropping it would hide what may be new.
fn updated_since(resource: &Value, since: i64) -> bool {
    resource["meta"]["lastUpdated"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .is_none_or(|t| t.timestamp() >= since)
}

/// `GET /fhir/{type}?patient=…`: one type's resources in a patient's record as the caller
/// may see it, filtered, sorted and paged (`_offset` in the `next` link). A patient the
/// caller may not see gives an empty searchset, as one not held does.
pub async fn type_search(
    State(state): State<Arc<ViewState>>,
    headers: HeaderMap,
    Path(resource_type): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let result = async {
        let caller = caller(&state, &headers, "fhir-search").await?;
        if !fhir_search::SEARCHABLE_TYPES.contains(&resource_type.as_str()) {
            return Err(outcome(
                StatusCode::NOT_FOUND,
                "not-supported",
                &format!(
                    "`{}` is not a resource type this API serves (see /fhir/metadata).",
                    clip(&resource_type, 64)
                ),
            ));
        }
        let pairs = query_pairs(&query)?;
        let search = fhir_search::Search::parse(&resource_type, &pairs).map_err(|error| {
            let code = match error {
                fhir_search::SearchError::NoPatient => "required",
                fhir_search::SearchError::Invalid { .. } => "value",
                _ => "not-supported",
            };
            outcome(StatusCode::BAD_REQUEST, code, &format!("{error}."))
        })?;
        let nhs = NhsNumber::parse(&search.patient).map_err(|error| {
            outcome(
                StatusCode::BAD_REQUEST,
                "value",
                &format!("The patient must be given by NHS number: {error}."),
            )
        })?;
        let event = caller.event(&state, "fhir-search", Some(nhs.as_str()));
        check_allowed(&state, &caller, &resource_type, true, event.clone()).await?;
        let seen = caller_record(&state, &caller, &nhs, event).await?;
        let rendered = seen.peek().map(fhir_api::render);
        let found: Vec<&Value> = rendered
            .as_ref()
            .map(|r| search.apply(&r.resources))
            .unwrap_or_default();
        let page: Vec<&Value> = found
            .iter()
            .skip(search.offset)
            .take(search.count)
            .copied()
            .collect();
        let served = format!(
            "search {resource_type}: {} of {} matches served",
            page.len(),
            found.len()
        );
        seen.audited(&state, Some(served)).await?;
        let base = base_url(&state, &headers);
        let link = |offset: usize| {
            let mut query: Vec<(String, String)> = pairs
                .iter()
                .filter(|(name, _)| name != "_offset")
                .cloned()
                .collect();
            query.push(("_offset".into(), offset.to_string()));
            let encoded = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(query)
                .finish();
            format!("{base}/{resource_type}?{encoded}")
        };
        let mut links = vec![json!({ "relation": "self", "url": link(search.offset) })];
        if search.offset + page.len() < found.len() {
            links.push(json!({ "relation": "next", "url": link(search.offset + page.len()) }));
        }
        if search.offset > 0 {
            let previous = search.offset.saturating_sub(search.count);
            links.push(json!({ "relation": "previous", "url": link(previous) }));
        }
        let mut entries: Vec<Value> = page
            .iter()
            .map(|resource| {
                json!({
                    "fullUrl": format!("{base}/{resource_type}/{}", resource["id"].as_str().unwrap_or_default()),
                    "resource": resource,
                    "search": { "mode": "match" },
                })
            })
            .collect();
        if let Some(outcome) = rendered.as_ref().and_then(fhir_api::notices_outcome) {
            entries.push(json!({ "resource": outcome, "search": { "mode": "outcome" } }));
        }
        Ok(fhir(
            StatusCode::OK,
            &json!({
                "resourceType": "Bundle",
                "type": "searchset",
                "total": found.len(),
                "link": links,
                "entry": entries,
            }),
        ))
    }
    .await;
    result.unwrap_or_else(|response| response)
}

#[derive(Deserialize)]
pub struct TokenRequest {
    #[serde(default)]
    grant_type: String,
    #[serde(default)]
    scope: String,
    #[serde(default)]
    client_assertion_type: String,
    #[serde(default)]
    client_assertion: String,
    /// For the user grant: the user's launch token, as the page takes it.
    #[serde(default)]
    assertion: String,
}

const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// RFC 7523's grant: a clinical system presents a signed-in user's launch token (the
/// page's, signed with the clinical system's launch key) and gets a token for that user.
pub const USER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// An OAuth 2.0 error response (RFC 6749 5.2).
fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        json!({ "error": error, "error_description": description }).to_string(),
    )
        .into_response()
}

/// A client that proved itself with a client assertion signed by its registered key.
struct AuthenticatedClient {
    client: caremesh_storage::api_access::ApiClient,
    /// The assertion's `jti`, to be marked used with the token's issue.
    assertion_jti: String,
    assertion_expires_at: i64,
}

/// An `invalid_client` answer, counted as an anonymous refusal (nobody proved who they are).
fn invalid_client(state: &ViewState, refused: &api_access::AssertionRefused) -> Response {
    state.count_anonymous("oauth-token");
    oauth_error(
        StatusCode::UNAUTHORIZED,
        "invalid_client",
        &refused.to_string(),
    )
}

/// Checks the request's client assertion against the key of the client it names.
async fn authenticate_client(
    state: &Arc<ViewState>,
    headers: &HeaderMap,
    request: &TokenRequest,
    now: i64,
) -> Result<AuthenticatedClient, Response> {
    use api_access::AssertionRefused;
    if request.client_assertion_type != ASSERTION_TYPE {
        return Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &format!("client_assertion_type must be {ASSERTION_TYPE}"),
        ));
    }
    let refuse = |refused: AssertionRefused| invalid_client(state, &refused);
    let client_id = api_access::claimed_client(&request.client_assertion).map_err(refuse)?;
    let database = state.database.clone();
    let looked_up = {
        let client_id = client_id.clone();
        blocking(move || {
            let store = database.open_read_only()?;
            Ok(store.api_client(&client_id)?)
        })
        .await?
    };
    let client = looked_up.ok_or_else(|| refuse(AssertionRefused::UnknownClient))?;
    let key_text = client
        .public_key
        .as_deref()
        .ok_or_else(|| refuse(AssertionRefused::NoKey(client_id.clone())))?;
    let key = ClientKey::from_jwk(key_text).map_err(|error| {
        tracing::error!(%error, "a registered API client's key does not read");
        super::internal_error()
    })?;
    let base = base_url(state, headers);
    let host_part = base
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches("/fhir");
    let audiences = vec![
        format!("https://{host_part}/oauth/token"),
        format!("http://{host_part}/oauth/token"),
    ];
    let assertion =
        api_access::verify_assertion(&request.client_assertion, &client_id, &key, &audiences, now)
            .map_err(refuse)?;
    Ok(AuthenticatedClient {
        client,
        assertion_jti: assertion.jti,
        assertion_expires_at: assertion.expires_at,
    })
}

/// The scopes of `asked` the client holds, for system access or for a user (and their
/// patient's scopes when the launch named one); `invalid_scope` when none is.
fn granted_scopes(
    client: &caremesh_storage::api_access::ApiClient,
    asked: &str,
    for_user: bool,
    with_patient: bool,
) -> Result<Vec<api_access::Scope>, Response> {
    let held = api_access::parse_scopes(&client.scopes).unwrap_or_default();
    let granted: Vec<_> = api_access::grant(&held, asked)
        .into_iter()
        .filter(|scope| match scope.context {
            ScopeContext::System => !for_user,
            ScopeContext::User => for_user,
            ScopeContext::Patient => for_user && with_patient,
        })
        .collect();
    if granted.is_empty() {
        let kind = if for_user { "user" } else { "system" };
        return Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            &format!(
                "none of the scopes asked for ({}) is a {kind} scope this client is registered for ({})",
                clip(asked, 200),
                client.scopes
            ),
        ));
    }
    Ok(granted)
}

/// `POST /oauth/token`. A registered client authenticates with a client assertion signed
/// with its key (SMART Backend Services) and gets an access token with the scopes asked
/// for that it holds:
///
/// * `grant_type=client_credentials`: system access, for this organisation;
/// * `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer` with `assertion` = a
///   signed-in user's launch token, checked and used up exactly as the page's launch: a
///   token for that user, their role, and the patient the launch names.
pub async fn token(
    State(state): State<Arc<ViewState>>,
    headers: HeaderMap,
    Form(request): Form<TokenRequest>,
) -> Response {
    let for_user = match request.grant_type.as_str() {
        "client_credentials" => false,
        USER_GRANT => true,
        _ => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                &format!(
                    "this token endpoint grants client_credentials (system access) and {USER_GRANT} (a user's launch token as the assertion)"
                ),
            );
        }
    };
    let now = clock::now_unix();
    let result = async {
        let authenticated = authenticate_client(&state, &headers, &request, now).await?;
        let launch = if for_user {
            let verified = state.launch.verify(
                &request.assertion,
                &state.launch_config,
                &state.viewer.ods,
                now,
            );
            Some(verified.map_err(|refused| {
                oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    &refused.to_string(),
                )
            })?)
        } else {
            None
        };
        let with_patient = launch.as_ref().is_some_and(|l| l.nhs.is_some());
        let granted = granted_scopes(
            &authenticated.client,
            &request.scope,
            for_user,
            with_patient,
        )?;
        issue_token(&state, authenticated, launch, granted, now).await
    }
    .await;
    result.unwrap_or_else(|response| response)
}

/// Issues the token: the client assertion's `jti` (and a user's launch token) marked used,
/// the token kept, and its issue in the audit trail, in one write.
async fn issue_token(
    state: &Arc<ViewState>,
    authenticated: AuthenticatedClient,
    launch: Option<crate::launch::Launch>,
    granted: Vec<api_access::Scope>,
    now: i64,
) -> Result<Response, Response> {
    let client_id = authenticated.client.client_id.clone();
    let secret = crate::launch::random_hex(32).map_err(|error| {
        tracing::error!(%error, "no randomness for an access token");
        super::internal_error()
    })?;
    let token = ApiToken {
        client_id: client_id.clone(),
        scopes: api_access::scopes_text(&granted),
        user: launch.as_ref().map(|l| ApiUser {
            id: l.user_id.clone(),
            name: l.user_name.clone(),
            role: l.role.as_str().to_string(),
        }),
        nhs: launch
            .as_ref()
            .and_then(|l| l.nhs.as_ref())
            .map(|n| n.to_string()),
        purpose: launch
            .as_ref()
            .map_or_else(|| "direct care".to_string(), |l| l.purpose.clone()),
        issued_at: now,
        // Never beyond the launch's own session: a user token lasts as a page session would.
        expires_at: now
            + launch.as_ref().map_or(api_access::TOKEN_SECONDS, |_| {
                api_access::TOKEN_SECONDS
                    .min(i64::from(state.launch_config.session_minutes.max(1)) * 60)
            }),
    };
    let caller = Caller {
        token: token.clone(),
        scopes: granted,
    };
    let mut event = caller.event(state, "api-token", token.nhs.as_deref());
    event.detail = format!(
        "access token issued to API client {client_id} for {}",
        token.scopes
    );
    let client_jti = format!(
        "client-assertion:{client_id}:{}",
        authenticated.assertion_jti
    );
    let client_jti_expires = authenticated.assertion_expires_at;
    let launch_jti = launch.as_ref().map(|l| (l.token_id.clone(), l.expires_at));
    let (hash, issued, audited) = (secret_hash(&secret), token.clone(), state.clone());
    let stored = state
        .write(move |store| {
            // A client assertion is used up once presented, whatever follows.
            if store.use_launch_token(&client_jti, client_jti_expires, now)? == TokenUse::Replayed {
                return Ok(Issue::ClientAssertionReplayed);
            }
            if let Some((jti, expires_at)) = &launch_jti
                && store.use_launch_token(jti, *expires_at, now)? == TokenUse::Replayed
            {
                return Ok(Issue::LaunchReplayed);
            }
            store.issue_api_token(&hash, &issued)?;
            caremesh_storage::publish::record_access(
                store,
                &audited.key,
                &audited.viewer.ods,
                &event,
            )
            .map_err(RequestFailed::from)?;
            Ok(Issue::Issued)
        })
        .await?;
    match stored {
        Issue::Issued => Ok((
            [(header::CONTENT_TYPE, "application/json")],
            json!({
                "access_token": secret,
                "token_type": "bearer",
                "expires_in": token.expires_at - now,
                "scope": token.scopes,
            })
            .to_string(),
        )
            .into_response()),
        Issue::ClientAssertionReplayed => Err(invalid_client(
            state,
            &api_access::AssertionRefused::Replayed,
        )),
        Issue::LaunchReplayed => Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            &crate::launch::LaunchRefused::Replayed.to_string(),
        )),
    }
}

/// What became of a token's issue.
enum Issue {
    Issued,
    ClientAssertionReplayed,
    LaunchReplayed,
}
