//! Delivers the FHIR API's change notifications (see `subscriptions.rs`).
//!
//! One task per node. It wakes when the feed's durable tip moves (the engine says so,
//! [`super::RunningNode::durable_feed`]: a change is never told before a power cut could no
//! longer take it back), when a subscription is made, and when a retry or heartbeat is due.
//! Each pass:
//!
//! 1. ends subscriptions whose end has passed;
//! 2. reads the feed from the oldest subscription's cursor to the durable tip, and files
//!    for each subscription the changes its caller may see: a clinical document of a
//!    patient it follows, from an organisation whose data the caller sees of that patient
//!    (`record::assemble`, as for a read). Events and the cursor move in one transaction;
//! 3. posts to each endpoint that is due: a handshake to a new subscription, its waiting
//!    events in order (up to [`EVENTS_PER_NOTIFICATION`] at a time), or a heartbeat. A
//!    failed post is tried again after 1 s, doubling to [`MAX_BACKOFF_MS`] (10 minutes); the
//!    events wait in the database meanwhile, so a client that is down loses nothing.
//!
//! A notification's content is assembled when it is sent, for its caller, with its scopes:
//! what they may no longer see (consent withdrawn meanwhile) is not sent. Every notification
//! naming a patient is an audit entry naming the client and user, as a read is, written
//! before the notification is posted.

use super::fhir::{self, Caller};
use super::subscriptions::{self, endpoint_origin};
use super::{RequestFailed, ViewState, blocking};
use crate::api_access;
use crate::fhir_api;
use crate::record::{self, Record};
use axum::body::Bytes;
use caremesh_fhir::clock;
use caremesh_storage::Store;
use caremesh_storage::api_access::ApiToken;
use caremesh_storage::audit::AuditEvent;
use caremesh_storage::subscriptions::{
    Delivered, NewEvent, PayloadContent, Subscription, SubscriptionEvent, SubscriptionStatus,
};
use caremesh_sync::NhsNumber;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// At most this many events in one notification; more wait for the next.
pub const EVENTS_PER_NOTIFICATION: usize = 50;
/// A failed delivery is tried again after 1 s, doubling up to this.
pub const MAX_BACKOFF_MS: i64 = 600_000;
/// How long an endpoint has to answer.
const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// Feed positions read in one pass; the rest wait for the next, at once.
const FEED_ROWS_PER_PASS: usize = 4_096;
/// With no live subscription the notifier looks again this often, besides when one is made
/// through the API (which wakes it at once).
const IDLE_RECHECK: Duration = Duration::from_secs(60);

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

fn http_client() -> HttpClient {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let builder = match builder.with_provider_and_native_roots(provider.clone()) {
        Ok(builder) => builder,
        Err(error) => {
            tracing::error!(%error, "no trusted certificates on this machine: change notifications to https endpoints will fail until its certificate store is installed");
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(
                rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default protocol versions")
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth(),
            )
        }
    };
    let connector = builder.https_or_http().enable_http1().build();
    Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector)
}

/// Runs until the node stops (its engine drops the durable-feed sender).
pub async fn run(state: Arc<ViewState>) {
    let mut durable = state.node.durable_feed();
    let http = http_client();
    loop {
        let tip = *durable.borrow_and_update();
        let next_due = match pass(&state, &http, tip).await {
            Ok(AfterPass::Due(next_due)) => next_due,
            Ok(AfterPass::NoSubscriptions) => {
                // Nothing follows the feed, so its moving is no reason to look (a hub's feed
                // moves hundreds of times a second, and a pass opens connections).
                loop {
                    tokio::select! {
                        changed = durable.changed() => if changed.is_err() { return },
                        () = state.subscriptions_changed.notified() => break,
                        () = tokio::time::sleep(IDLE_RECHECK) => break,
                    }
                }
                continue;
            }
            // Logged where it failed; the pass is tried again shortly.
            Err(_) => Some(clock::now_unix_ms() + 5_000),
        };
        let wait = next_due.map_or(Duration::from_secs(3_600), |at| {
            Duration::from_millis((at - clock::now_unix_ms()).clamp(0, 3_600_000) as u64)
        });
        tokio::select! {
            changed = durable.changed() => if changed.is_err() { return },
            () = state.subscriptions_changed.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// What a pass leaves for the next.
enum AfterPass {
    /// No subscription is live: nothing to do until one is made.
    NoSubscriptions,
    /// When the next pass is due, if anything is waiting on time.
    Due(Option<i64>),
}

/// One pass; says when the next is due.
async fn pass(
    state: &Arc<ViewState>,
    http: &HttpClient,
    durable_tip: u64,
) -> Result<AfterPass, axum::response::Response> {
    let now = clock::now_unix_ms();
    let live = read_live(state).await?;
    if live.is_empty() {
        return Ok(AfterPass::NoSubscriptions);
    }
    let (ended, live): (Vec<_>, Vec<_>) = live
        .into_iter()
        .partition(|s| s.ends_at_ms.is_some_and(|end| end <= now));
    if !ended.is_empty() {
        state
            .write(move |store| {
                for subscription in &ended {
                    store.end_subscription(&subscription.id, Some("its end passed"))?;
                }
                Ok(())
            })
            .await?;
    }
    let behind: Vec<Subscription> = live
        .iter()
        .filter(|s| s.cursor < durable_tip)
        .cloned()
        .collect();
    let mut more_to_read = false;
    // Records assembled to decide what to file serve the notifications of the same pass.
    let mut assembled = Assembled::default();
    if !behind.is_empty() {
        let (state_for_read, database) = (state.clone(), state.database.clone());
        let (Filed { events, read_to }, reused) = blocking(move || {
            let store = database.open_read_only()?;
            let filed = file_events(
                &store,
                &state_for_read,
                &mut assembled,
                &behind,
                durable_tip,
                now,
            )?;
            Ok((filed, assembled))
        })
        .await?;
        assembled = reused;
        more_to_read = read_to < durable_tip;
        state
            .write(move |store| {
                for (id, filed) in &events {
                    store.file_subscription_events(id, read_to, filed)?;
                }
                Ok(())
            })
            .await?;
    }
    let (state_for_read, database) = (state.clone(), state.database.clone());
    let due = blocking(move || {
        let store = database.open_read_only()?;
        let mut due = Vec::new();
        for subscription in store.live_subscriptions()? {
            if let Some(notification) =
                due_notification(&store, &state_for_read, &mut assembled, &subscription, now)?
            {
                due.push((subscription, notification));
            }
        }
        Ok(due)
    })
    .await?;
    // What a notification tells is in the audit trail before it leaves, as a page's view
    // is before the page is sent: a post that then fails is recorded as an attempt, never a
    // disclosure left out. Each attempt is an entry of its own.
    let disclosed: Vec<AuditEvent> = due
        .iter()
        .flat_map(|(_, notification)| notification.disclosed.iter().cloned())
        .collect();
    if !disclosed.is_empty() {
        let audited = state.clone();
        state
            .write(move |store| {
                // One transaction and one wait for the disk for the whole pass: a change to
                // a patient followed by 500 subscriptions is 500 entries.
                let batch = store.write()?;
                for event in &disclosed {
                    caremesh_storage::publish::record_access_in(
                        &batch,
                        &audited.key,
                        &audited.viewer.ods,
                        event,
                    )?;
                }
                batch.commit()?;
                Ok(())
            })
            .await?;
    }
    let mut deliveries = tokio::task::JoinSet::new();
    for (subscription, due) in due {
        let http = http.clone();
        deliveries.spawn(async move {
            let outcome = post(&http, &subscription, &due.bundle).await;
            (subscription, due, outcome)
        });
    }
    let mut outcomes = Vec::new();
    while let Some(joined) = deliveries.join_next().await {
        match joined {
            Ok(outcome) => outcomes.push(outcome),
            Err(error) => tracing::error!(%error, "a notification delivery task failed"),
        }
    }
    if !outcomes.is_empty() {
        record_outcomes(state, outcomes).await?;
    }
    if more_to_read {
        return Ok(AfterPass::Due(Some(now)));
    }
    let live = read_live(state).await?;
    Ok(AfterPass::Due(
        live.iter()
            .filter(|s| s.due_at_ms < i64::MAX)
            .map(|s| s.due_at_ms)
            .min(),
    ))
}

async fn read_live(state: &Arc<ViewState>) -> Result<Vec<Subscription>, axum::response::Response> {
    let database = state.database.clone();
    blocking(move || Ok(database.open_read_only()?.live_subscriptions()?)).await
}

/// The caller a subscription acts for, as its reads would.
fn caller_of(subscription: &Subscription) -> Caller {
    Caller {
        token: ApiToken {
            client_id: subscription.client_id.clone(),
            scopes: subscription.scopes.clone(),
            user: subscription.user.clone(),
            nhs: subscription.token_nhs.clone(),
            purpose: subscription.purpose.clone(),
            issued_at: 0,
            expires_at: 0,
        },
        scopes: api_access::parse_scopes(&subscription.scopes).unwrap_or_default(),
    }
}

/// A record assembled in a pass, and its FHIR rendering once a notification needs it.
struct Seen {
    record: Record,
    rendered: std::cell::OnceCell<fhir_api::FhirRecord>,
}

impl Seen {
    fn rendered(&self) -> &fhir_api::FhirRecord {
        self.rendered.get_or_init(|| fhir_api::render(&self.record))
    }
}

/// Records assembled in one pass, by user (empty for system access) and patient: every
/// subscription of the same caller to the same patient shares one assembly and one
/// rendering.
#[derive(Default)]
struct Assembled(HashMap<(String, String), Option<Seen>>);

impl Assembled {
    fn get(
        &mut self,
        store: &Store,
        state: &ViewState,
        subscription: &Subscription,
        nhs: &NhsNumber,
    ) -> Result<Option<&Seen>, caremesh_storage::StorageError> {
        let user = subscription.user.as_ref();
        let key = (
            user.map(|u| u.id.clone()).unwrap_or_default(),
            nhs.as_str().to_string(),
        );
        if !self.0.contains_key(&key) {
            let viewer = fhir::viewer_for(state, user);
            let record = record::assemble(store, nhs, &viewer, clock::now_unix())?;
            let seen = record.map(|record| Seen {
                record,
                rendered: std::cell::OnceCell::new(),
            });
            self.0.insert(key.clone(), seen);
        }
        Ok(self.0[&key].as_ref())
    }
}

/// Per subscription (by id), the changes to file for it.
struct Filed {
    events: Vec<(String, Vec<NewEvent>)>,
    /// Where reading the feed stopped: every subscription's cursor moves there.
    read_to: u64,
}

/// The events each subscription is to be told of, from the feed after the oldest cursor up
/// to `durable_tip` (or as far as one pass reads), and where reading stopped.
fn file_events(
    store: &Store,
    state: &ViewState,
    assembled: &mut Assembled,
    behind: &[Subscription],
    durable_tip: u64,
    now: i64,
) -> Result<Filed, RequestFailed> {
    let from = behind.iter().map(|s| s.cursor).min().unwrap_or(durable_tip);
    let mut rows = Vec::new();
    let mut read_to = from;
    while read_to < durable_tip && rows.len() < FEED_ROWS_PER_PASS {
        let page = store.feed_after(read_to, 512)?;
        let Some(last) = page.last() else {
            read_to = durable_tip;
            break;
        };
        read_to = last.seq.min(durable_tip);
        rows.extend(page.into_iter().filter(|row| row.seq <= durable_tip));
    }
    let mut filed = Vec::new();
    for subscription in behind {
        let mut changes = BTreeSet::new();
        // Rows after the subscription's cursor: the event tells of what changed after it.
        for row in rows.iter().filter(|row| row.seq > subscription.cursor) {
            let meta = &row.meta;
            let patient = meta.patient.as_str();
            let follows = subscription.nhs.as_deref().is_none_or(|n| n == patient)
                && subscription
                    .token_nhs
                    .as_deref()
                    .is_none_or(|n| n == patient);
            if meta.section.is_clinical() && follows {
                changes.insert((
                    meta.patient.clone(),
                    meta.publisher.as_str().to_string(),
                    meta.section.as_str().to_string(),
                ));
            }
        }
        let mut events = Vec::new();
        for (nhs, publisher, section) in changes {
            let Some(seen) = assembled.get(store, state, subscription, &nhs)? else {
                continue;
            };
            // Only a change to data the caller sees: never a sign of what is withheld.
            if seen.record.sources.iter().any(|s| s.ods == publisher) {
                events.push(NewEvent {
                    at_ms: now,
                    nhs: nhs.as_str().to_string(),
                    publisher,
                    section,
                    after_seq: subscription.cursor,
                });
            }
        }
        filed.push((subscription.id.clone(), events));
    }
    Ok(Filed {
        events: filed,
        read_to,
    })
}

/// A notification ready to post, and what it tells.
struct Due {
    bundle: Value,
    /// The newest event it carries (0 for a handshake or heartbeat).
    through: u64,
    /// What it disclosed, for the audit trail: per patient, the sources and sections.
    disclosed: Vec<AuditEvent>,
}

/// What is due to post to a subscription's endpoint now, if anything.
fn due_notification(
    store: &Store,
    state: &ViewState,
    assembled: &mut Assembled,
    subscription: &Subscription,
    now: i64,
) -> Result<Option<Due>, caremesh_storage::StorageError> {
    let retry_due = subscription.due_at_ms <= now;
    match subscription.status {
        SubscriptionStatus::Off => return Ok(None),
        SubscriptionStatus::Requested if !retry_due => return Ok(None),
        SubscriptionStatus::Requested => {
            return Ok(Some(Due {
                bundle: notification(subscription, "handshake", &[], Vec::new()),
                through: 0,
                disclosed: Vec::new(),
            }));
        }
        SubscriptionStatus::Error if !retry_due => return Ok(None),
        SubscriptionStatus::Active | SubscriptionStatus::Error => {}
    }
    let waiting = store.waiting_events(&subscription.id, EVENTS_PER_NOTIFICATION)?;
    if waiting.is_empty() {
        let heartbeat_due = subscription.heartbeat_seconds.is_some() && retry_due;
        return Ok(heartbeat_due.then(|| Due {
            bundle: notification(subscription, "heartbeat", &[], Vec::new()),
            through: 0,
            disclosed: Vec::new(),
        }));
    }
    event_notification(store, state, assembled, subscription, &waiting).map(Some)
}

/// The notification of `waiting`, its content assembled now for the subscription's caller.
fn event_notification(
    store: &Store,
    state: &ViewState,
    assembled: &mut Assembled,
    subscription: &Subscription,
    waiting: &[SubscriptionEvent],
) -> Result<Due, caremesh_storage::StorageError> {
    let caller = caller_of(subscription);
    let base = &subscription.base_url;
    let mut events = Vec::new();
    let mut entries: Vec<Value> = Vec::new();
    let mut listed = BTreeSet::new();
    let mut disclosed: HashMap<String, (BTreeSet<String>, BTreeSet<String>)> = HashMap::new();
    for event in waiting {
        let mut parts = vec![
            json!({ "name": "event-number", "valueString": event.event_number.to_string() }),
            json!({ "name": "timestamp", "valueInstant": instant_ms(event.at_ms) }),
        ];
        let changed = match event.after_seq {
            Some(after) => {
                Some(store.changed_sources(&event.nhs, &event.publisher, &event.section, after)?)
            }
            None => None,
        };
        let shown = match NhsNumber::parse(&event.nhs) {
            Ok(nhs) => assembled
                .get(store, state, subscription, &nhs)?
                .filter(|seen| seen.record.sources.iter().any(|s| s.ods == event.publisher))
                .map(|seen| changed_resources(&caller, seen, event, changed.as_ref())),
            Err(_) => None,
        };
        if let (Some((patient, resources)), false) =
            (shown, subscription.payload == PayloadContent::Empty)
        {
            parts.push(json!({ "name": "focus", "valueReference": {
                "reference": format!("{base}/Patient/{}", event.nhs),
            }}));
            let seen = disclosed.entry(event.nhs.clone()).or_default();
            seen.0.insert(event.publisher.clone());
            seen.1.insert(event.section.clone());
            for resource in std::iter::once(&patient).chain(&resources) {
                let url = full_url(base, resource);
                if resource["resourceType"] != "Patient" {
                    parts.push(json!({ "name": "additional-context", "valueReference": { "reference": url } }));
                }
                if listed.insert(url.clone()) {
                    entries.push(resource_entry(&url, resource, subscription.payload));
                }
            }
        }
        events.push(json!({ "name": "notification-event", "part": parts }));
    }
    let through = waiting.last().map_or(0, |e| e.event_number);
    let disclosed = disclosed
        .into_iter()
        .map(|(nhs, (sources, sections))| {
            let mut event = caller.event(state, "fhir-notify", Some(&nhs));
            event.sources = sources.into_iter().collect();
            event.sections = sections.into_iter().collect();
            event.detail = format!(
                "{}; change notification ({} payload) posted for subscription {} to {}",
                event.detail,
                subscription.payload.code(),
                subscription.id,
                endpoint_origin(&subscription.endpoint)
            );
            event
        })
        .collect();
    Ok(Due {
        bundle: notification(subscription, "event-notification", &events, entries),
        through,
        disclosed,
    })
}

/// The patient's Patient resource and the resources the event tells of, as the record shows
/// them to the caller and its scopes read them: those of the event's publisher and section
/// that changed here after the event's cursor (`changed`, by the publisher's `Type/id`), or
/// all of that section where the event does not say what changed (filed before versions
/// recorded it). A resource the caller may not see is not in the record, so not told of.
fn changed_resources(
    caller: &Caller,
    seen: &Seen,
    event: &SubscriptionEvent,
    changed: Option<&BTreeSet<String>>,
) -> (Value, Vec<Value>) {
    let (publisher, section) = (event.publisher.as_str(), event.section.as_str());
    let record = &seen.record;
    let ids: BTreeSet<String> = record
        .sections
        .iter()
        .filter(|s| s.section.as_str() == section)
        .flat_map(|s| &s.items)
        .filter(|item| item.source.organisation == publisher)
        .filter(|item| changed.is_none_or(|changed| changed.contains(&item.source.resource)))
        .map(|item| fhir_api::logical_id(&item.source.organisation, &item.source.resource))
        .chain(
            record
                .patients
                .iter()
                .filter(|p| p.ods == publisher && section == "demographics")
                .filter(|p| changed.is_none_or(|changed| changed.contains(&p.source_id)))
                .map(|p| fhir_api::logical_id(&p.ods, &p.source_id)),
        )
        .collect();
    let rendered = seen.rendered();
    let resources = rendered
        .resources
        .iter()
        .filter(|r| r["id"].as_str().is_some_and(|id| ids.contains(id)))
        .filter(|r| caller.allows(r["resourceType"].as_str().unwrap_or(""), true))
        .cloned()
        .collect();
    (rendered.patient.clone(), resources)
}

fn full_url(base: &str, resource: &Value) -> String {
    format!(
        "{base}/{}/{}",
        resource["resourceType"].as_str().unwrap_or_default(),
        resource["id"].as_str().unwrap_or_default()
    )
}

fn resource_entry(url: &str, resource: &Value, payload: PayloadContent) -> Value {
    let relative = url.rsplitn(3, '/').collect::<Vec<_>>();
    let mut entry = json!({
        "fullUrl": url,
        "request": { "method": "PUT", "url": format!("{}/{}", relative.get(1).unwrap_or(&""), relative[0]) },
        "response": { "status": "200" },
    });
    if payload == PayloadContent::FullResource {
        entry["resource"] = resource.clone();
    }
    entry
}

fn instant_ms(at_ms: i64) -> String {
    let seconds = clock::rfc3339(at_ms.div_euclid(1000));
    format!(
        "{}.{:03}Z",
        seconds.trim_end_matches('Z'),
        at_ms.rem_euclid(1000)
    )
}

/// A Backport notification bundle (R4): the status first, then what changed.
fn notification(
    subscription: &Subscription,
    kind: &str,
    events: &[Value],
    entries: Vec<Value>,
) -> Value {
    let mut status = subscription.clone();
    if kind == "event-notification" {
        status.status = SubscriptionStatus::Active;
        status.error = None;
    }
    let through = events.len() as u64;
    let status_entry = json!({
        "fullUrl": format!("urn:uuid:{}", subscriptions::uuid_like(&subscription.id, subscription.events + through)),
        "resource": subscriptions::status_parameters(&status, kind, events),
        "request": { "method": "GET", "url": format!("{}/Subscription/{}/$status", subscription.base_url, subscription.id) },
        "response": { "status": "200" },
    });
    json!({
        "resourceType": "Bundle",
        "meta": { "profile": [format!("{}/backport-subscription-notification-r4", subscriptions::BACKPORT)] },
        "type": "history",
        "timestamp": instant_ms(clock::now_unix_ms()),
        "entry": std::iter::once(status_entry).chain(entries).collect::<Vec<_>>(),
    })
}

/// Posts a notification; `Ok` when the endpoint took it (any 2xx).
async fn post(
    http: &HttpClient,
    subscription: &Subscription,
    bundle: &Value,
) -> Result<(), String> {
    let mut request = hyper::Request::post(&subscription.endpoint)
        .header(hyper::header::CONTENT_TYPE, fhir::FHIR_JSON);
    for header in &subscription.headers {
        if let Some((name, value)) = header.split_once(':') {
            request = request.header(name.trim(), value.trim());
        }
    }
    let request = request
        .body(Full::new(Bytes::from(bundle.to_string())))
        .map_err(|error| format!("the notification could not be made: {error}"))?;
    match tokio::time::timeout(POST_TIMEOUT, http.request(request)).await {
        Err(_) => Err(format!(
            "the endpoint did not answer within {} s",
            POST_TIMEOUT.as_secs()
        )),
        Ok(Err(error)) => Err(format!("the endpoint could not be reached: {error}")),
        Ok(Ok(response)) if response.status().is_success() => Ok(()),
        Ok(Ok(response)) => Err(format!("the endpoint answered {}", response.status())),
    }
}

fn backoff_ms(failures: u32) -> i64 {
    (1_000i64 << failures.min(20)).min(MAX_BACKOFF_MS)
}

/// Records every delivery of a pass in one write.
async fn record_outcomes(
    state: &Arc<ViewState>,
    outcomes: Vec<(Subscription, Due, Result<(), String>)>,
) -> Result<(), axum::response::Response> {
    let now = clock::now_unix_ms();
    state
        .write(move |store| {
            for (subscription, due, outcome) in &outcomes {
                let delivered = match outcome {
                    Ok(()) => Delivered::Through {
                        event_number: due.through,
                        at_ms: now,
                    },
                    Err(reason) => {
                        tracing::warn!(subscription = %subscription.id, endpoint = %endpoint_origin(&subscription.endpoint), %reason, "a change notification was not delivered; it is tried again");
                        Delivered::Failed {
                            reason: reason.clone(),
                            retry_at_ms: now + backoff_ms(subscription.failures),
                        }
                    }
                };
                let heartbeat = subscription
                    .heartbeat_seconds
                    .map(|seconds| now + i64::from(seconds) * 1000);
                store.record_delivery(&subscription.id, &delivered, heartbeat)?;
            }
            Ok(())
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_from_a_second_to_ten_minutes() {
        assert_eq!(backoff_ms(0), 1_000);
        assert_eq!(backoff_ms(3), 8_000);
        assert_eq!(backoff_ms(9), 512_000);
        assert_eq!(backoff_ms(10), MAX_BACKOFF_MS);
        assert_eq!(backoff_ms(u32::MAX), MAX_BACKOFF_MS);
    }

    #[test]
    fn instants_carry_milliseconds() {
        assert_eq!(instant_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }
}
