//! Change notifications over the FHIR API (FHIR Subscriptions R5 Backport for R4, rest-hook
//! channel): `POST /fhir/Subscription` makes one, `GET` reads it, `DELETE` ends it and
//! `$status` says where it stands. Delivery is `notifier.rs`.
//!
//! One topic: a patient's record changed at this node ([`TOPIC`]), from any organisation:
//! this node's own ingest, or a version that arrived from a peer. A subscription follows one
//! patient (filter `Patient?_id=N` or `Patient?identifier=...|N`) or every patient its
//! caller may see. What it is told is decided for the client and user that made it, with the
//! scopes it was made under, as their reads are: a change to data they may not see is no
//! event for them.
//!
//! Making a subscription asks for the scopes that read the `Patient` type: a notification's
//! focus is the patient, and its content only the resource types those scopes read. The
//! API grants no write scopes, and a subscription writes nothing clinical.

use super::fhir::{self, Caller};
use super::{ViewState, blocking};
use crate::fhir_api::NHS_NUMBER_SYSTEM;
use crate::notify_origins;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use caremesh_fhir::clock;
use caremesh_storage::subscriptions::{PayloadContent, Subscription, SubscriptionStatus};
use caremesh_sync::{NhsNumber, OrgKind};
use serde_json::{Value, json};
use std::sync::Arc;

/// The one topic: a patient's record changed at this node.
pub const TOPIC: &str = "urn:caremesh:subscription-topic:patient-record";
pub(super) const BACKPORT: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition";

/// Heartbeats no more often than this, nor less often than [`MAX_HEARTBEAT_SECONDS`].
const MIN_HEARTBEAT_SECONDS: u32 = 10;
const MAX_HEARTBEAT_SECONDS: u32 = 86_400;
/// A subscription made for a user lasts no longer than this: a user's access is a session's,
/// and a clinical system subscribes again when its user comes back.
const USER_SUBSCRIPTION_HOURS: i64 = 12;
const MAX_HEADERS: usize = 8;
const MAX_HEADER_CHARS: usize = 1_024;
const MAX_REASON_CHARS: usize = 500;

/// A refused subscription: the element that was wrong, and what to do.
#[derive(Debug, PartialEq, Eq)]
pub struct Invalid {
    pub element: &'static str,
    pub text: String,
}

fn invalid(element: &'static str, text: impl Into<String>) -> Invalid {
    Invalid {
        element,
        text: text.into(),
    }
}

/// What a client asked for, checked.
#[derive(Debug, PartialEq, Eq)]
pub struct Requested {
    pub nhs: Option<NhsNumber>,
    pub endpoint: String,
    pub headers: Vec<String>,
    pub payload: PayloadContent,
    pub heartbeat_seconds: Option<u32>,
    pub ends_at_ms: Option<i64>,
    pub reason: String,
}

fn extension<'a>(element: &'a Value, url: &str) -> Option<&'a Value> {
    element["extension"]
        .as_array()?
        .iter()
        .find(|e| e["url"].as_str() == Some(url))
}

/// Reads a Subscription as the Backport writes it for R4.
pub fn read_request(resource: &Value, now_ms: i64) -> Result<Requested, Invalid> {
    if resource["resourceType"] != "Subscription" {
        return Err(invalid("resourceType", "POST a Subscription resource"));
    }
    if resource["criteria"].as_str() != Some(TOPIC) {
        return Err(invalid(
            "Subscription.criteria",
            format!("the topic must be {TOPIC} (a patient's record changed); see /fhir/metadata"),
        ));
    }
    let filters: Vec<&str> = resource["_criteria"]["extension"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["url"].as_str() == Some(&format!("{BACKPORT}/backport-filter-criteria")))
        .map(|e| e["valueString"].as_str().unwrap_or(""))
        .collect();
    let nhs = match filters.as_slice() {
        [] => None,
        [filter] => Some(patient_filter(filter)?),
        _ => {
            return Err(invalid(
                "Subscription.criteria.extension",
                "give one filter at most: Patient?_id=N or Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|N",
            ));
        }
    };
    let channel = &resource["channel"];
    if channel["type"].as_str() != Some("rest-hook") {
        return Err(invalid(
            "Subscription.channel.type",
            "only rest-hook is served: the node posts each notification to channel.endpoint",
        ));
    }
    let endpoint = channel["endpoint"]
        .as_str()
        .ok_or_else(|| invalid("Subscription.channel.endpoint", "give the URL to post to"))?;
    check_endpoint(endpoint)?;
    if let Some(payload) = channel["payload"].as_str()
        && payload != "application/fhir+json"
    {
        return Err(invalid(
            "Subscription.channel.payload",
            "notifications are application/fhir+json",
        ));
    }
    let content = extension(
        &channel["_payload"],
        &format!("{BACKPORT}/backport-payload-content"),
    )
    .map(|e| e["valueCode"].as_str().unwrap_or(""));
    let payload = match content {
        None => PayloadContent::IdOnly,
        Some(code) => PayloadContent::from_code(code).ok_or_else(|| {
            invalid(
                "Subscription.channel.payload.extension",
                "payload content is empty, id-only or full-resource",
            )
        })?,
    };
    let headers = channel_headers(&channel["header"])?;
    let heartbeat_seconds = match extension(channel, &format!("{BACKPORT}/backport-heartbeat-period")) {
        None => None,
        Some(e) => Some(
            e["valueUnsignedInt"]
                .as_u64()
                .and_then(|s| u32::try_from(s).ok())
                .filter(|s| (MIN_HEARTBEAT_SECONDS..=MAX_HEARTBEAT_SECONDS).contains(s))
                .ok_or_else(|| {
                    invalid(
                        "Subscription.channel.extension",
                        format!(
                            "the heartbeat period is {MIN_HEARTBEAT_SECONDS} to {MAX_HEARTBEAT_SECONDS} seconds"
                        ),
                    )
                })?,
        ),
    };
    let ends_at_ms = match resource["end"].as_str() {
        None => None,
        Some(end) => {
            let at = chrono::DateTime::parse_from_rfc3339(end)
                .map_err(|_| {
                    invalid(
                        "Subscription.end",
                        "an instant, such as 2026-12-31T12:00:00Z",
                    )
                })?
                .timestamp_millis();
            if at <= now_ms {
                return Err(invalid("Subscription.end", "the end has passed"));
            }
            Some(at)
        }
    };
    let reason = resource["reason"]
        .as_str()
        .unwrap_or("change notifications")
        .chars()
        .take(MAX_REASON_CHARS)
        .collect();
    Ok(Requested {
        nhs,
        endpoint: endpoint.to_string(),
        headers,
        payload,
        heartbeat_seconds,
        ends_at_ms,
        reason,
    })
}

fn patient_filter(filter: &str) -> Result<NhsNumber, Invalid> {
    let wrong = || {
        invalid(
            "Subscription.criteria.extension",
            format!(
                "the filter `{}` is not Patient?_id=N or Patient?identifier={NHS_NUMBER_SYSTEM}|N",
                filter.chars().take(120).collect::<String>()
            ),
        )
    };
    let value = filter
        .strip_prefix("Patient?_id=")
        .or_else(|| {
            filter
                .strip_prefix("Patient?identifier=")
                .and_then(|v| v.strip_prefix(&format!("{NHS_NUMBER_SYSTEM}|")))
        })
        .ok_or_else(wrong)?;
    NhsNumber::parse(value).map_err(|_| wrong())
}

/// An endpoint the node may post patient data to, whoever allowed its origin: https
/// anywhere, plain http only to this machine, never with credentials in it (see
/// [`notify_origins`]). Whether this client may be notified there is checked with its
/// registration, in [`create`].
fn check_endpoint(endpoint: &str) -> Result<(), Invalid> {
    notify_origins::origin_of(endpoint)
        .map(|_| ())
        .map_err(|refused| invalid("Subscription.channel.endpoint", refused.to_string()))
}

fn channel_headers(headers: &Value) -> Result<Vec<String>, Invalid> {
    let Some(headers) = headers.as_array() else {
        return Ok(Vec::new());
    };
    if headers.len() > MAX_HEADERS {
        return Err(invalid(
            "Subscription.channel.header",
            format!("at most {MAX_HEADERS} headers"),
        ));
    }
    headers
        .iter()
        .map(|header| {
            let text = header.as_str().unwrap_or("");
            let valid = text.len() <= MAX_HEADER_CHARS
                && text.split_once(':').is_some_and(|(name, value)| {
                    axum::http::HeaderName::from_bytes(name.trim().as_bytes()).is_ok()
                        && HeaderValue::from_str(value.trim()).is_ok()
                });
            if valid {
                Ok(text.to_string())
            } else {
                Err(invalid(
                    "Subscription.channel.header",
                    "each header is `Name: value`, on one line",
                ))
            }
        })
        .collect()
}

/// The Subscription as the API shows it. Header values are not shown again: they are the
/// client's credentials for its own endpoint.
pub fn resource(subscription: &Subscription, reason: Option<&str>) -> Value {
    let mut resource = json!({
        "resourceType": "Subscription",
        "id": subscription.id,
        "meta": { "profile": [format!("{BACKPORT}/backport-subscription")] },
        "status": subscription.status.code(),
        "reason": reason.unwrap_or("change notifications"),
        "criteria": TOPIC,
        "channel": {
            "type": "rest-hook",
            "endpoint": subscription.endpoint,
            "payload": "application/fhir+json",
            "_payload": { "extension": [{
                "url": format!("{BACKPORT}/backport-payload-content"),
                "valueCode": subscription.payload.code(),
            }]},
        },
    });
    if let Some(nhs) = &subscription.nhs {
        resource["_criteria"] = json!({ "extension": [{
            "url": format!("{BACKPORT}/backport-filter-criteria"),
            "valueString": format!("Patient?_id={nhs}"),
        }]});
    }
    if let Some(seconds) = subscription.heartbeat_seconds {
        resource["channel"]["extension"] = json!([{
            "url": format!("{BACKPORT}/backport-heartbeat-period"),
            "valueUnsignedInt": seconds,
        }]);
    }
    if !subscription.headers.is_empty() {
        resource["channel"]["header"] = subscription
            .headers
            .iter()
            .map(|h| {
                let name = h.split_once(':').map_or(h.as_str(), |(name, _)| name);
                Value::String(format!("{}: (not shown)", name.trim()))
            })
            .collect();
    }
    if let Some(end) = subscription.ends_at_ms {
        resource["end"] = json!(clock::rfc3339(end / 1000));
    }
    if let Some(error) = &subscription.error {
        resource["error"] = json!(error);
    }
    resource
}

/// What the CapabilityStatement says of subscriptions.
pub(super) fn capability() -> Value {
    json!({
        "type": "Subscription",
        "supportedProfile": [format!("{BACKPORT}/backport-subscription")],
        "extension": [{
            "url": format!("{BACKPORT}/capabilitystatement-subscriptiontopic-canonical"),
            "valueCanonical": TOPIC,
        }],
        "interaction": [{ "code": "create" }, { "code": "read" }, { "code": "delete" }],
        "operation": [{
            "name": "status",
            "definition": "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-status",
        }],
        "documentation": format!(
            "Change notifications (Subscriptions R5 Backport, rest-hook, payloads empty, id-only \
             and full-resource) on the topic {TOPIC}: a patient's record changed at this node, \
             from any organisation. Filter Patient?_id=N for one patient; none for every \
             patient the caller may see. Made with a token whose scopes read Patient; what a \
             notification tells is decided for that token's client and user as their reads \
             are. Endpoints are at an origin the node's operator allowed for the \
             client, https, or http on this machine only."
        ),
    })
}

/// `POST /fhir/Subscription`.
pub async fn create(
    State(state): State<Arc<ViewState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    create_subscription(&state, &headers, &body)
        .await
        .unwrap_or_else(|response| response)
}

async fn create_subscription(
    state: &Arc<ViewState>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, Response> {
    let caller = fhir::caller(state, headers, "fhir-subscribe").await?;
    if state.kind == OrgKind::Hub {
        return Err(fhir::outcome(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not-supported",
            "This node is a hub: it holds no patient's record to notify changes of.",
        ));
    }
    let now = clock::now_unix_ms();
    let posted: Value = serde_json::from_slice(body).map_err(|error| {
        fhir::outcome(
            StatusCode::BAD_REQUEST,
            "structure",
            &format!("The body is not JSON: {error}"),
        )
    })?;
    let mut requested = read_request(&posted, now).map_err(|refused| {
        fhir::outcome(
            StatusCode::BAD_REQUEST,
            "invalid",
            &format!("{}: {}", refused.element, refused.text),
        )
    })?;
    // A token for one patient subscribes to that patient only.
    if let Some(only) = &caller.token.nhs {
        match &requested.nhs {
            None => requested.nhs = NhsNumber::parse(only).ok(),
            Some(nhs) if nhs.as_str() != only => return Err(fhir::not_found()),
            Some(_) => {}
        }
    }
    let nhs = requested.nhs.as_ref().map(|n| n.as_str().to_string());
    let mut event = caller.event(state, "fhir-subscribe", nhs.as_deref());
    fhir::check_allowed(state, &caller, "Patient", false, event.clone()).await?;
    if let Some(patient) = &requested.nhs {
        let seen = fhir::caller_record(state, &caller, patient, event.clone()).await?;
        if seen.peek().is_none() {
            seen.audited(state, None).await?;
            return Err(fhir::not_found());
        }
    }
    if caller.token.user.is_some() {
        let cap = now + USER_SUBSCRIPTION_HOURS * 3_600_000;
        requested.ends_at_ms = Some(requested.ends_at_ms.map_or(cap, |end| end.min(cap)));
    }
    let id = crate::launch::random_hex(16).map_err(|error| {
        tracing::error!(%error, "no randomness for a subscription id");
        super::internal_error()
    })?;
    let database = state.database.clone();
    let client_id = caller.token.client_id.clone();
    let (client, cursor) = blocking(move || {
        let store = database.open_read_only()?;
        Ok((store.api_client(&client_id)?, store.feed_tip()?))
    })
    .await?;
    // The token was checked against its client a moment ago; one removed since is refused
    // here as its tokens are.
    let allowed = client
        .map(|client| client.notify_origins)
        .unwrap_or_default();
    if !notify_origins::endpoint_allowed(&requested.endpoint, &allowed).unwrap_or(false) {
        let origin = endpoint_origin(&requested.endpoint);
        return Err(fhir::outcome(
            StatusCode::UNPROCESSABLE_ENTITY,
            "business-rule",
            &format!(
                "Subscription.channel.endpoint: client {} may not be notified at {origin}. \
                 Notifications carry patient data, so the node's operator allows each client \
                 the origins it may be notified at: `caremesh api-client add --id {} \
                 --notify-to {origin}` (with the client's key and scopes).",
                caller.token.client_id, caller.token.client_id
            ),
        ));
    }
    let subscription = new_subscription(
        &caller,
        id,
        &requested,
        fhir::base_url(state, headers),
        cursor,
        now,
    );
    event.detail = format!(
        "{}; subscription {} made ({}, {} payload, to {})",
        event.detail,
        subscription.id,
        nhs.as_deref()
            .map_or("every patient the caller may see", |_| "this patient"),
        subscription.payload.code(),
        endpoint_origin(&subscription.endpoint),
    );
    let audited = state.clone();
    let kept = {
        let subscription = subscription.clone();
        state
            .write(move |store| {
                if !store.add_subscription(&subscription)? {
                    return Ok(false);
                }
                caremesh_storage::publish::record_access(
                    store,
                    &audited.key,
                    &audited.viewer.ods,
                    &event,
                )?;
                Ok(true)
            })
            .await?
    };
    if !kept {
        return Err(fhir::outcome(
            StatusCode::TOO_MANY_REQUESTS,
            "throttled",
            "This node holds as many subscriptions as it serves; end some first.",
        ));
    }
    state.subscriptions_changed.notify_one();
    let mut response = fhir::fhir(
        StatusCode::CREATED,
        &resource(&subscription, Some(&requested.reason)),
    );
    if let Ok(location) = HeaderValue::from_str(&format!(
        "{}/Subscription/{}",
        subscription.base_url, subscription.id
    )) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// Where an endpoint is, without its path (which may carry a client's own identifiers).
pub(super) fn endpoint_origin(endpoint: &str) -> String {
    notify_origins::origin_of(endpoint).unwrap_or_else(|_| "an endpoint".into())
}

fn new_subscription(
    caller: &Caller,
    id: String,
    requested: &Requested,
    base_url: String,
    cursor: u64,
    now: i64,
) -> Subscription {
    Subscription {
        id,
        client_id: caller.token.client_id.clone(),
        scopes: caller.token.scopes.clone(),
        user: caller.token.user.clone(),
        token_nhs: caller.token.nhs.clone(),
        purpose: caller.token.purpose.clone(),
        nhs: requested.nhs.as_ref().map(|n| n.as_str().to_string()),
        base_url,
        endpoint: requested.endpoint.clone(),
        headers: requested.headers.clone(),
        payload: requested.payload,
        heartbeat_seconds: requested.heartbeat_seconds,
        status: SubscriptionStatus::Requested,
        error: None,
        created_at_ms: now,
        ends_at_ms: requested.ends_at_ms,
        cursor,
        events: 0,
        failures: 0,
        due_at_ms: now,
        last_sent_at_ms: None,
    }
}

/// The caller's own subscription of that id: another client's (or another user's) is not
/// found, as a patient the caller may not see is.
async fn own_subscription(
    state: &Arc<ViewState>,
    headers: &HeaderMap,
    id: String,
    action: &str,
) -> Result<(Caller, Subscription), Response> {
    let caller = fhir::caller(state, headers, action).await?;
    let database = state.database.clone();
    let held = blocking(move || Ok(database.open_read_only()?.subscription(&id)?)).await?;
    match held {
        Some(subscription)
            if subscription.client_id == caller.token.client_id
                && subscription.user.as_ref().map(|u| &u.id)
                    == caller.token.user.as_ref().map(|u| &u.id) =>
        {
            Ok((caller, subscription))
        }
        _ => Err(fhir::outcome(
            StatusCode::NOT_FOUND,
            "not-found",
            "No subscription with that id is yours on this node.",
        )),
    }
}

/// `GET /fhir/Subscription/{id}`.
pub async fn read(
    State(state): State<Arc<ViewState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    if query.is_some_and(|q| !q.is_empty()) {
        return fhir::outcome(
            StatusCode::BAD_REQUEST,
            "not-supported",
            "A Subscription is read without parameters.",
        );
    }
    match own_subscription(&state, &headers, id, "fhir-subscription").await {
        Ok((_, subscription)) => fhir::fhir(StatusCode::OK, &resource(&subscription, None)),
        Err(response) => response,
    }
}

/// `DELETE /fhir/Subscription/{id}`: ends it; nothing more is sent.
pub async fn delete(
    State(state): State<Arc<ViewState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        let (_, subscription) = own_subscription(&state, &headers, id, "fhir-unsubscribe").await?;
        let id = subscription.id.clone();
        state
            .write(move |store| Ok(store.end_subscription(&id, Some("ended by the client"))?))
            .await?;
        Ok::<_, Response>(fhir::outcome_information("The subscription is ended."))
    }
    .await;
    result.unwrap_or_else(|response| response)
}

/// `GET /fhir/Subscription/{id}/$status`: a searchset with the subscription's status.
pub async fn status(
    State(state): State<Arc<ViewState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    match own_subscription(&state, &headers, id, "fhir-subscription").await {
        Ok((_, subscription)) => fhir::fhir(
            StatusCode::OK,
            &json!({
                "resourceType": "Bundle",
                "type": "searchset",
                "total": 1,
                "entry": [{
                    "fullUrl": format!("urn:uuid:{}", uuid_like(&subscription.id, subscription.events)),
                    "resource": status_parameters(&subscription, "query-status", &[]),
                    "search": { "mode": "match" },
                }],
            }),
        ),
        Err(response) => response,
    }
}

/// A subscription's status as the Backport writes it for R4 (a Parameters resource), with
/// the notification events given.
pub(super) fn status_parameters(
    subscription: &Subscription,
    kind: &str,
    events: &[Value],
) -> Value {
    let mut parameter = vec![
        json!({ "name": "subscription", "valueReference": {
            "reference": format!("{}/Subscription/{}", subscription.base_url, subscription.id),
        }}),
        json!({ "name": "topic", "valueCanonical": TOPIC }),
        json!({ "name": "status", "valueCode": subscription.status.code() }),
        json!({ "name": "type", "valueCode": kind }),
        json!({ "name": "events-since-subscription-start", "valueString": subscription.events.to_string() }),
    ];
    parameter.extend(events.iter().cloned());
    if let Some(error) = &subscription.error {
        parameter.push(json!({ "name": "error", "valueCodeableConcept": { "text": error } }));
    }
    json!({
        "resourceType": "Parameters",
        "meta": { "profile": [format!("{BACKPORT}/backport-subscription-status-r4")] },
        "parameter": parameter,
    })
}

/// A UUID for a notification's status entry, from the subscription and event: the same
/// notification sent again has the same one.
pub(super) fn uuid_like(id: &str, events: u64) -> String {
    crate::fhir_api::name_based_uuid(&format!("caremesh notification\0{id}\0{events}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(filter: Option<&str>, endpoint: &str) -> Value {
        let mut resource = json!({
            "resourceType": "Subscription",
            "status": "requested",
            "reason": "tell the ward",
            "criteria": TOPIC,
            "channel": {
                "type": "rest-hook",
                "endpoint": endpoint,
                "payload": "application/fhir+json",
                "_payload": { "extension": [{
                    "url": format!("{BACKPORT}/backport-payload-content"),
                    "valueCode": "full-resource",
                }]},
                "header": ["Authorization: Bearer abc"],
                "extension": [{
                    "url": format!("{BACKPORT}/backport-heartbeat-period"),
                    "valueUnsignedInt": 60,
                }],
            },
        });
        if let Some(filter) = filter {
            resource["_criteria"] = json!({ "extension": [{
                "url": format!("{BACKPORT}/backport-filter-criteria"),
                "valueString": filter,
            }]});
        }
        resource
    }

    #[test]
    fn a_backport_subscription_reads_with_its_filter_payload_and_heartbeat() {
        let read = read_request(
            &request(Some("Patient?_id=9990079595"), "https://ehr.example/hook"),
            0,
        )
        .unwrap();
        assert_eq!(read.nhs.unwrap().as_str(), "9990079595");
        assert_eq!(read.payload, PayloadContent::FullResource);
        assert_eq!(read.heartbeat_seconds, Some(60));
        assert_eq!(read.headers, ["Authorization: Bearer abc"]);
        let by_identifier = read_request(
            &request(
                Some("Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|9990079595"),
                "http://127.0.0.1:8080/hook",
            ),
            0,
        )
        .unwrap();
        assert_eq!(by_identifier.nhs.unwrap().as_str(), "9990079595");
        assert_eq!(
            read_request(&request(None, "http://[::1]:1/h"), 0)
                .unwrap()
                .nhs,
            None,
            "every patient the caller may see"
        );
    }

    #[test]
    fn a_subscription_is_refused_naming_the_element_that_is_wrong() {
        let refused = |resource: Value| read_request(&resource, 0).unwrap_err().element;
        assert_eq!(
            refused(request(Some("Patient?_id=1234567890"), "https://e/h")),
            "Subscription.criteria.extension",
            "not an NHS number"
        );
        assert_eq!(
            refused(request(Some("Condition?patient=x"), "https://e/h")),
            "Subscription.criteria.extension"
        );
        // Patient data never goes over plain http off this machine, nor to a URL carrying
        // credentials.
        for endpoint in [
            "http://ehr.example/hook",
            "http://10.0.0.1/hook",
            "ftp://127.0.0.1/x",
            "https://user:pw@ehr.example/hook",
            "not a url",
        ] {
            assert_eq!(
                refused(request(None, endpoint)),
                "Subscription.channel.endpoint",
                "{endpoint}"
            );
        }
        let mut other_topic = request(None, "https://e/h");
        other_topic["criteria"] = json!("Observation?code=x");
        assert_eq!(refused(other_topic), "Subscription.criteria");
        let mut websocket = request(None, "https://e/h");
        websocket["channel"]["type"] = json!("websocket");
        assert_eq!(refused(websocket), "Subscription.channel.type");
        let mut split_header = request(None, "https://e/h");
        split_header["channel"]["header"] = json!(["X: a\r\nY: b"]);
        assert_eq!(refused(split_header), "Subscription.channel.header");
        let mut fast = request(None, "https://e/h");
        fast["channel"]["extension"][0]["valueUnsignedInt"] = json!(1);
        assert_eq!(refused(fast), "Subscription.channel.extension");
        let mut ended = request(None, "https://e/h");
        ended["end"] = json!("2020-01-01T00:00:00Z");
        assert_eq!(
            read_request(&ended, 1_700_000_000_000).unwrap_err().element,
            "Subscription.end"
        );
    }

    #[test]
    fn the_resource_shown_never_repeats_header_values() {
        let read = read_request(&request(None, "https://e/h"), 0).unwrap();
        let subscription = Subscription {
            id: "s1".into(),
            client_id: "app".into(),
            scopes: "system/*.rs".into(),
            user: None,
            token_nhs: None,
            purpose: "direct care".into(),
            nhs: None,
            base_url: "http://localhost/fhir".into(),
            endpoint: read.endpoint,
            headers: read.headers,
            payload: read.payload,
            heartbeat_seconds: read.heartbeat_seconds,
            status: SubscriptionStatus::Active,
            error: None,
            created_at_ms: 0,
            ends_at_ms: None,
            cursor: 0,
            events: 0,
            failures: 0,
            due_at_ms: 0,
            last_sent_at_ms: None,
        };
        let shown = resource(&subscription, None).to_string();
        assert!(!shown.contains("Bearer abc"), "{shown}");
        assert!(shown.contains("Authorization: (not shown)"));
    }
}
