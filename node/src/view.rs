//! The read-only record view over HTTP (axum). Reads local storage only, so it keeps
//! serving when every peer is unreachable. No route writes clinical data.

use crate::clock;
use crate::record::{self, Record, Viewer};
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use caremesh_storage::Store;
use caremesh_storage::audit::AuditEvent;
use caremesh_sync::NhsNumber;
use caremesh_sync::policy::ViewDecision;
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;

pub struct ViewState {
    pub database: PathBuf,
    pub organisation: String,
    pub ods: String,
    pub viewer: Viewer,
    /// How long a break-glass lasts.
    pub break_glass_minutes: u32,
    /// The running sync engine's counters, when sync is on.
    pub sync: Option<Arc<crate::network::SyncCounters>>,
}

pub fn router(state: Arc<ViewState>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/patients", get(search))
        .route("/patients/{nhs}", get(patient_page))
        .route("/patients/{nhs}/break-glass", post(break_glass))
        .route("/api/patients/{nhs}", get(patient_json))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::map_response(protect))
        .with_state(state)
}

/// Patient data must not be cached, framed or sniffed.
async fn protect(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'self'",
        ),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

enum Lookup {
    Found(Box<Record>),
    InvalidNumber(String),
    NotHeld,
    Failed(String),
}

async fn lookup(state: &ViewState, raw: String) -> Lookup {
    let nhs = match NhsNumber::parse(&raw) {
        Ok(nhs) => nhs,
        Err(error) => return Lookup::InvalidNumber(error.to_string()),
    };
    let database = state.database.clone();
    let viewer = state.viewer.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let store = Store::open_read_only(&database)?;
        record::assemble(&store, &nhs, &viewer, clock::now_unix())
    })
    .await;
    match outcome {
        Ok(Ok(Some(record))) => Lookup::Found(Box::new(record)),
        Ok(Ok(None)) => Lookup::NotHeld,
        Ok(Err(error)) => {
            tracing::error!(%error, "reading the record failed");
            Lookup::Failed("the node could not read its database; see the node log".into())
        }
        Err(error) => {
            tracing::error!(%error, "record task failed");
            Lookup::Failed("internal error; see the node log".into())
        }
    }
}

async fn patient_json(State(state): State<Arc<ViewState>>, Path(nhs): Path<String>) -> Response {
    match lookup(&state, nhs).await {
        Lookup::Found(record) => Json(*record).into_response(),
        Lookup::InvalidNumber(message) => (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": message })),
        )
            .into_response(),
        Lookup::NotHeld => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({ "error": "no record held for this NHS number on this node" })),
        )
            .into_response(),
        Lookup::Failed(message) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({ "error": message })),
        )
            .into_response(),
    }
}

async fn patient_page(State(state): State<Arc<ViewState>>, Path(nhs): Path<String>) -> Response {
    match lookup(&state, nhs.clone()).await {
        Lookup::Found(record) => Html(render_record(&state, &record)).into_response(),
        Lookup::InvalidNumber(message) => (
            StatusCode::BAD_REQUEST,
            Html(page(
                &state,
                "Not a valid NHS number",
                &format!(
                    "<p class=\"error\">{}</p>{}",
                    escape(&message),
                    search_form()
                ),
            )),
        )
            .into_response(),
        Lookup::NotHeld => (
            StatusCode::NOT_FOUND,
            Html(page(
                &state,
                "No record held",
                &format!(
                    "<p>This node holds no record for NHS number {}.</p>{}",
                    escape(&NhsNumber::parse(&nhs).map(|n| n.formatted()).unwrap_or(nhs)),
                    search_form()
                ),
            )),
        )
            .into_response(),
        Lookup::Failed(message) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Html(page(
                &state,
                "Record unavailable",
                &format!("<p class=\"error\">{}</p>", escape(&message)),
            )),
        )
            .into_response(),
    }
}

/// Limits on what a clinician types into the break-glass form.
const CLINICIAN_MAX_CHARS: usize = 200;
const REASON_MIN_CHARS: usize = 10;
const REASON_MAX_CHARS: usize = 1000;

#[derive(Deserialize)]
struct BreakGlassForm {
    clinician: String,
    reason: String,
}

/// What is wrong with a break-glass request, in words for the clinician.
fn break_glass_problem(form: &BreakGlassForm) -> Option<String> {
    let clinician = form.clinician.trim().chars().count();
    let reason = form.reason.trim().chars().count();
    if clinician == 0 || clinician > CLINICIAN_MAX_CHARS {
        Some(format!(
            "Give your name (up to {CLINICIAN_MAX_CHARS} characters) to use emergency access."
        ))
    } else if !(REASON_MIN_CHARS..=REASON_MAX_CHARS).contains(&reason) {
        Some(format!(
            "Give the reason for emergency access in {REASON_MIN_CHARS} to {REASON_MAX_CHARS} characters: it is recorded and reviewed."
        ))
    } else {
        None
    }
}

fn error_page(state: &ViewState, status: StatusCode, title: &str, message: &str) -> Response {
    (
        status,
        Html(page(
            state,
            title,
            &format!("<p class=\"error\">{}</p>", escape(message)),
        )),
    )
        .into_response()
}

/// Emergency access: records who and why, for `break_glass_minutes`, then shows the record.
/// Only other organisations' data this node holds becomes visible: private items and what an
/// objection withheld never reached it.
async fn break_glass(
    State(state): State<Arc<ViewState>>,
    Path(raw): Path<String>,
    Form(form): Form<BreakGlassForm>,
) -> Response {
    let not_started = "Emergency access not started";
    let nhs = match NhsNumber::parse(&raw) {
        Ok(nhs) => nhs,
        Err(error) => {
            return error_page(
                &state,
                StatusCode::BAD_REQUEST,
                not_started,
                &error.to_string(),
            );
        }
    };
    if let Some(problem) = break_glass_problem(&form) {
        return error_page(&state, StatusCode::BAD_REQUEST, not_started, &problem);
    }
    let database = state.database.clone();
    let minutes = state.break_glass_minutes.max(1);
    let patient = nhs.clone();
    let organisation = state.ods.clone();
    let recorded = tokio::task::spawn_blocking(move || {
        let mut store = Store::open(&database)?;
        let now = clock::now_unix();
        let granted = store.record_break_glass(
            &patient,
            form.clinician.trim(),
            form.reason.trim(),
            now,
            now + i64::from(minutes) * 60,
        )?;
        // Until launch tokens identify the user, the name given stands for them.
        store.append_audit(&AuditEvent {
            at: now,
            user_id: granted.clinician.clone(),
            user_name: granted.clinician.clone(),
            role: "clinician".into(),
            organisation,
            action: "break-glass".into(),
            nhs: Some(patient.to_string()),
            sources: Vec::new(),
            sections: Vec::new(),
            purpose: "direct care (emergency)".into(),
            outcome: "allowed".into(),
            detail: granted.reason.clone(),
        })?;
        Ok::<_, caremesh_storage::StorageError>(granted)
    })
    .await;
    match recorded {
        Ok(Ok(granted)) => {
            tracing::info!(
                id = granted.id,
                minutes,
                "emergency access (break-glass) started"
            );
            Redirect::to(&format!("/patients/{nhs}")).into_response()
        }
        Ok(Err(error)) => {
            tracing::error!(%error, "could not record a break-glass");
            error_page(
                &state,
                StatusCode::INTERNAL_SERVER_ERROR,
                not_started,
                "The node could not record the access, so it was not started; see the node log.",
            )
        }
        Err(error) => {
            tracing::error!(%error, "break-glass task failed");
            error_page(
                &state,
                StatusCode::INTERNAL_SERVER_ERROR,
                not_started,
                "Internal error; see the node log.",
            )
        }
    }
}

#[derive(Deserialize)]
struct SearchQuery {
    nhs: String,
}

async fn search(Query(query): Query<SearchQuery>) -> Redirect {
    let digits: String = query.nhs.chars().filter(|c| !c.is_whitespace()).collect();
    let safe: String = digits.chars().filter(char::is_ascii_alphanumeric).collect();
    Redirect::to(&format!("/patients/{safe}"))
}

async fn index(State(state): State<Arc<ViewState>>) -> Html<String> {
    Html(page(&state, "Find a patient", &search_form()))
}

async fn metrics(State(state): State<Arc<ViewState>>) -> Response {
    let database = state.database.clone();
    let counters = state.sync.clone();
    let rendered = tokio::task::spawn_blocking(move || {
        let store = Store::open_read_only(&database)?;
        crate::metrics::render(&store, counters.as_deref())
    })
    .await;
    match rendered {
        Ok(Ok(text)) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics unavailable: the database could not be read",
        )
            .into_response(),
    }
}

async fn health(State(state): State<Arc<ViewState>>) -> Response {
    let database = state.database.clone();
    let readable = tokio::task::spawn_blocking(move || {
        Store::open_read_only(&database).and_then(|s| s.stats())
    })
    .await;
    match readable {
        Ok(Ok(stats)) => Json(serde_json::json!({
            "status": "ok",
            "organisation": state.ods,
            "documents": stats.documents,
            "patients": stats.patients,
        }))
        .into_response(),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "database unreadable" })),
        )
            .into_response(),
    }
}

fn search_form() -> String {
    "<form method=\"get\" action=\"/patients\" class=\"search\">\
     <label for=\"nhs\">NHS number</label>\
     <input id=\"nhs\" name=\"nhs\" inputmode=\"numeric\" autocomplete=\"off\" required>\
     <button type=\"submit\">Open record</button></form>"
        .into()
}

pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:Arial,sans-serif;margin:0;color:#212b32;background:#f0f4f5}\
header{background:#005eb8;color:#fff;padding:12px 24px}header a{color:#fff}\
main{max-width:1100px;margin:0 auto;padding:16px 24px}\
.banner{background:#fff;border-left:8px solid #005eb8;padding:12px 16px;margin:12px 0}\
.patient{background:#fff;padding:12px 16px;border-bottom:4px solid #005eb8}\
.patient h1{margin:0 0 4px 0;font-size:1.6em}\
section{background:#fff;margin:16px 0;padding:8px 16px}\
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:6px;border-bottom:1px solid #d8dde0;vertical-align:top}\
.muted{color:#4c6272;font-size:.9em}.withheld{border-left-color:#ffeb3b}.withheld p{margin:4px 0}\
.break-glass{border-left-color:#d5281b;background:#fff4f4}tr.break-glass td{background:#fff4f4}\
.break-glass-form label{display:block;font-weight:bold;margin-top:8px}.break-glass-form textarea{width:100%;min-height:4em}.error{color:#d5281b;font-weight:bold}\
.search label{display:block;font-weight:bold;margin-bottom:4px}\
.search input{font-size:1.2em;padding:4px}.search button{font-size:1.1em;margin-left:8px}\
@media print{body *{display:none}body:after{content:'Printing the shared care record is not allowed.'}}";

fn page(state: &ViewState, title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} - caremesh shared care record</title><style>{STYLE}</style></head>\
         <body><header><a href=\"/\">caremesh shared care record</a> \
         <span class=\"muted\" style=\"color:#fff\">at {org} ({ods})</span></header>\
         <main>{body}</main></body></html>",
        title = escape(title),
        org = escape(&state.organisation),
        ods = escape(&state.ods),
    )
}

/// Break-glass in force; other organisations' data held but hidden without Share In (with
/// the break-glass form); organisations whose whole record is withheld.
fn sharing_banners(state: &ViewState, record: &Record) -> String {
    let mut out = String::new();
    if let Some(granted) = &record.break_glass {
        out.push_str(&format!(
            "<div class=\"banner break-glass\" role=\"alert\" id=\"break-glass-active\">\
             <strong>Emergency access (break-glass)</strong> by {} until {}: {}. \
             Rows shown only because of it are marked; this access is recorded.</div>",
            escape(&granted.clinician),
            escape(&clock::uk_date_time(granted.expires_at)),
            escape(&granted.reason)
        ));
    } else if record.hidden_without_share_in > 0 {
        out.push_str(&format!(
            "<div class=\"banner withheld\" id=\"share-in-off\"><p><strong>{} from other \
             organisations not shown</strong>: the patient's Share In is not recorded at {}.</p>\
             <form method=\"post\" action=\"/patients/{}/break-glass\" class=\"break-glass-form\">\
             <p>If there is a serious concern for the patient's safety you may use emergency \
             access. It lasts {} minutes and is recorded with your name and reason.</p>\
             <label for=\"clinician\">Your name</label>\
             <input id=\"clinician\" name=\"clinician\" required maxlength=\"{CLINICIAN_MAX_CHARS}\">\
             <label for=\"reason\">Reason</label>\
             <textarea id=\"reason\" name=\"reason\" required minlength=\"{REASON_MIN_CHARS}\" \
             maxlength=\"{REASON_MAX_CHARS}\"></textarea>\
             <button type=\"submit\">Use emergency access</button></form></div>",
            record::items_phrase(record.hidden_without_share_in),
            escape(&state.organisation),
            escape(&record.nhs_number),
            state.break_glass_minutes
        ));
    }
    for source in &record.withheld_sources {
        out.push_str(&format!(
            "<div class=\"banner withheld\">No data from {} ({}) is shown: {}.</div>",
            escape(&source.name),
            escape(&source.ods),
            escape(&source.reason)
        ));
    }
    out
}

/// "3 items withheld by sharing rules", and what Share In hides, under a section's heading.
fn section_notices(section: &record::SectionView) -> String {
    let mut out = String::new();
    if section.withheld_by_sharing_rules > 0 {
        out.push_str(&format!(
            "<p class=\"withheld\">{} withheld by sharing rules</p>",
            record::items_phrase(section.withheld_by_sharing_rules as usize)
        ));
    }
    if section.hidden_without_share_in > 0 {
        out.push_str(&format!(
            "<p class=\"withheld\">{} from other organisations not shown without Share In</p>",
            record::items_phrase(section.hidden_without_share_in)
        ));
    }
    out
}

fn render_record(state: &ViewState, record: &Record) -> String {
    let mut body = String::new();
    let demographics = record.demographics.as_ref();
    body.push_str(&format!(
        "<div class=\"patient\"><h1>{}</h1><div>NHS number <strong>{}</strong>",
        escape(
            demographics
                .and_then(|d| d.name.as_deref())
                .unwrap_or("Name not held")
        ),
        escape(&record.nhs_number_formatted)
    ));
    if let Some(d) = demographics {
        body.push_str(&format!(
            " &middot; Born {} &middot; {} &middot; Registered GP: {} <span class=\"muted\">(demographics from {})</span>",
            escape(&d.birth_date.as_deref().map(clock::uk_date).unwrap_or_else(|| "not recorded".into())),
            escape(d.gender.as_deref().unwrap_or("gender not recorded")),
            escape(d.registered_gp.as_deref().unwrap_or("not recorded")),
            escape(&d.source)
        ));
    }
    body.push_str("</div></div>");
    body.push_str(&format!(
        "<div class=\"banner\">Read-only view assembled from data held on this node at {}. \
         It does not need the network.</div>",
        escape(&clock::uk_date_time(clock::now_unix()))
    ));
    body.push_str(&sharing_banners(state, record));
    body.push_str(
        "<section id=\"sources\"><h2>Sources</h2><table><thead><tr><th>Organisation</th>\
        <th>Kind</th><th>Feed</th><th>Data as of</th><th>Items</th></tr></thead><tbody>",
    );
    for source in &record.sources {
        body.push_str(&format!(
            "<tr><td>{} ({})</td><td>{}</td><td>{} from {}</td><td>{}</td><td>{}</td></tr>",
            escape(&source.name),
            escape(&source.ods),
            escape(&source.kind),
            escape(&source.feed),
            escape(&source.source_system),
            escape(&clock::uk_date_time(source.data_as_of_unix)),
            source.items
        ));
    }
    body.push_str("</tbody></table></section>");
    for section in &record.sections {
        body.push_str(&format!(
            "<section id=\"{}\"><h2>{} <span class=\"muted\">({})</span></h2>",
            section.section,
            escape(section.title),
            section.count
        ));
        body.push_str(&section_notices(section));
        if section.items.is_empty() {
            body.push_str("<p class=\"muted\">Nothing recorded in the data held.</p></section>");
            continue;
        }
        body.push_str("<table><thead><tr><th>Date</th><th>Entry</th><th>Details</th><th>Source</th></tr></thead><tbody>");
        for item in &section.items {
            let row_class = if item.shown_by == ViewDecision::BreakGlass {
                " class=\"break-glass\""
            } else {
                ""
            };
            body.push_str(&format!(
                "<tr{row_class}><td>{}</td><td>{}{}</td><td>{}</td><td>{}<br><span class=\"muted\">{} &middot; {}</span></td></tr>",
                escape(&item.effective.as_deref().map(clock::uk_date).unwrap_or_else(|| "-".into())),
                escape(&item.title),
                item.status
                    .as_deref()
                    .map(|s| format!(" <span class=\"muted\">({})</span>", escape(s)))
                    .unwrap_or_default(),
                escape(item.detail.as_deref().unwrap_or("")),
                escape(&item.source.organisation_name),
                escape(&item.source.system),
                item.recorded
                    .as_deref()
                    .map(|r| format!("recorded {}", escape(&clock::uk_date(r))))
                    .unwrap_or_else(|| "recorded date not given".into()),
            ));
        }
        body.push_str("</tbody></table></section>");
    }
    page(
        state,
        demographics
            .and_then(|d| d.name.as_deref())
            .unwrap_or("Patient record"),
        &body,
    )
}
