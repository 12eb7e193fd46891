//! HTML for the view, in the NHS design system's markup (nhsuk-frontend, vendored in
//! `node/assets/nhsuk`). Everything that comes from data is escaped here.

use super::ViewState;
use crate::clock;
use crate::record::{self, Record};
use caremesh_storage::PeerStatus;
use caremesh_storage::access::LaunchSession;
use caremesh_sync::policy::ViewDecision;

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

pub fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A whole page: the NHS header with who is signed in, and `body` in the main wrapper.
pub fn page(state: &ViewState, session: Option<&LaunchSession>, title: &str, body: &str) -> String {
    let user = session
        .map(|s| {
            format!(
                "<p class=\"nhsuk-body-s caremesh-user\" id=\"signed-in\">{} &middot; {} &middot; {}</p>",
                escape(&s.user_name),
                escape(&s.role),
                escape(&s.purpose)
            )
        })
        .unwrap_or_default();
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} - caremesh shared care record</title>\
         <link rel=\"icon\" href=\"/assets/images/favicon.svg\" type=\"image/svg+xml\">\
         <link rel=\"stylesheet\" href=\"/assets/nhsuk-frontend.min.css\">\
         <link rel=\"stylesheet\" href=\"/assets/view.css\">\
         <script src=\"/assets/view.js\" defer></script></head>\
         <body><a class=\"nhsuk-skip-link\" href=\"#maincontent\">Skip to main content</a>\
         <header class=\"nhsuk-header\" role=\"banner\"><div class=\"nhsuk-header__container nhsuk-width-container\">\
         <div class=\"nhsuk-header__service\"><a class=\"nhsuk-header__service-logo\" href=\"/\">\
         <span class=\"nhsuk-header__service-name\">caremesh shared care record</span></a></div>\
         <p class=\"nhsuk-body-s caremesh-where\">{org} ({ods})</p>{user}</div></header>\
         <div class=\"nhsuk-width-container\"><main class=\"nhsuk-main-wrapper\" id=\"maincontent\" role=\"main\">\
         {body}</main></div>\
         <p class=\"caremesh-print-notice\">Printing the shared care record is not allowed. Use \
         \"Copy reference\" to cite an entry.</p></body></html>",
        title = escape(title),
        org = escape(&state.organisation),
        ods = escape(&state.ods),
    )
}

/// An error or refusal, as the design system's error summary.
pub fn problem_body(title: &str, message: &str) -> String {
    format!(
        "<div class=\"nhsuk-error-summary\" role=\"alert\" tabindex=\"-1\">\
         <h1 class=\"nhsuk-error-summary__title\">{}</h1>\
         <div class=\"nhsuk-error-summary__body\"><p class=\"error\">{}</p></div></div>",
        escape(title),
        escape(message)
    )
}

/// Peers this node syncs with that are not connected now: the record is as of the last sync.
pub fn offline_banner(peers: &[PeerStatus], names: &dyn Fn(&str) -> String, now: i64) -> String {
    let down: Vec<&PeerStatus> = peers.iter().filter(|p| !p.is_connected(now)).collect();
    if down.is_empty() {
        return String::new();
    }
    let all_down = down.len() == peers.len();
    let mut lines = String::new();
    for peer in &down {
        let last_synced = peer
            .last_sync_at
            .map(|at| format!("last synced {}", clock::uk_date_time(at)))
            .unwrap_or_else(|| "never synced".into());
        lines.push_str(&format!(
            "<li>{} ({}) unreachable since {}; {}</li>",
            escape(&names(&peer.peer)),
            escape(&peer.peer),
            escape(&clock::uk_date_time(peer.updated_at)),
            escape(&last_synced)
        ));
    }
    format!(
        "<div class=\"nhsuk-warning-callout\" id=\"offline\"><h2 class=\"nhsuk-warning-callout__label\">\
         <span role=\"text\"><span class=\"nhsuk-u-visually-hidden\">Important: </span>{}</span></h2>\
         <ul>{lines}</ul><p>Showing data held on this device. Changes made elsewhere since the last \
         sync are not shown.</p></div>",
        if all_down {
            "Offline"
        } else {
            "Some sources unreachable"
        }
    )
}

/// Break-glass in force; other organisations' data held but hidden without Share In (with
/// the break-glass form); organisations whose whole record is withheld.
fn sharing_banners(state: &ViewState, record: &Record) -> String {
    let mut out = String::new();
    if let Some(granted) = &record.break_glass {
        out.push_str(&format!(
            "<div class=\"nhsuk-warning-callout caremesh-break-glass\" role=\"alert\" id=\"break-glass-active\">\
             <h2 class=\"nhsuk-warning-callout__label\"><span role=\"text\">\
             <span class=\"nhsuk-u-visually-hidden\">Important: </span>Emergency access (break-glass)</span></h2>\
             <p><strong>Emergency access (break-glass)</strong> by {} until {}: {}. \
             Rows shown only because of it are marked; this access is recorded and the \
             organisations whose data it shows are told.</p></div>",
            escape(&granted.clinician),
            escape(&clock::uk_date_time(granted.expires_at)),
            escape(&granted.reason)
        ));
    } else if record.hidden_without_share_in > 0 {
        out.push_str(&format!(
            "<div class=\"nhsuk-warning-callout\" id=\"share-in-off\"><h2 class=\"nhsuk-warning-callout__label\">\
             <span role=\"text\"><span class=\"nhsuk-u-visually-hidden\">Important: </span>\
             {} from other organisations not shown</span></h2>\
             <p>The patient's Share In is not recorded at {}.</p>\
             <form method=\"post\" action=\"/patients/{}/break-glass\" class=\"break-glass-form\">\
             <p>If there is a serious concern for the patient's safety you may use emergency \
             access. It lasts {} minutes, is yours alone, and is recorded with your name and \
             reason; the organisations whose data it shows are told.</p>\
             <div class=\"nhsuk-form-group\"><label class=\"nhsuk-label\" for=\"reason\">Reason</label>\
             <textarea class=\"nhsuk-textarea\" id=\"reason\" name=\"reason\" rows=\"3\" required \
             minlength=\"{}\" maxlength=\"{}\"></textarea></div>\
             <button class=\"nhsuk-button nhsuk-button--warning\" data-module=\"nhsuk-button\" type=\"submit\">\
             Use emergency access</button></form></div>",
            record::items_phrase(record.hidden_without_share_in),
            escape(&state.organisation),
            escape(&record.nhs_number),
            state.break_glass_minutes,
            super::REASON_MIN_CHARS,
            super::REASON_MAX_CHARS,
        ));
    }
    for source in record.sources.iter().filter(|s| s.stale) {
        out.push_str(&format!(
            "<div class=\"nhsuk-warning-callout caremesh-stale\" id=\"stale-{ods}\"><h2 class=\"nhsuk-warning-callout__label\">\
             <span role=\"text\"><span class=\"nhsuk-u-visually-hidden\">Important: </span>\
             Data from {name} may be out of date</span></h2><p>The newest data from {name} ({ods}) is \
             from {as_of}; it is expected every {hours} hours. Check with {name} for anything recent.</p></div>",
            ods = escape(&source.ods),
            name = escape(&source.name),
            as_of = escape(&clock::uk_date_time(source.data_as_of_unix)),
            hours = source.expected_refresh_hours.unwrap_or_default(),
        ));
    }
    for source in &record.withheld_sources {
        out.push_str(&format!(
            "<div class=\"nhsuk-inset-text caremesh-withheld\"><span class=\"nhsuk-u-visually-hidden\">Information: </span>\
             <p>No data from {} ({}) is shown: {}.</p></div>",
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
            "<p class=\"nhsuk-body-s withheld\">{} withheld by sharing rules</p>",
            record::items_phrase(section.withheld_by_sharing_rules as usize)
        ));
    }
    if section.hidden_without_share_in > 0 {
        out.push_str(&format!(
            "<p class=\"nhsuk-body-s withheld\">{} from other organisations not shown without Share In</p>",
            record::items_phrase(section.hidden_without_share_in)
        ));
    }
    out
}

fn patient_header(record: &Record) -> String {
    let demographics = record.demographics.as_ref();
    let row = |key: &str, value: String| {
        format!(
            "<div class=\"nhsuk-summary-list__row\"><dt class=\"nhsuk-summary-list__key\">{key}</dt>\
             <dd class=\"nhsuk-summary-list__value\">{value}</dd></div>"
        )
    };
    let mut rows = row(
        "NHS number",
        format!(
            "<strong id=\"nhs-number\">{}</strong>",
            escape(&record.nhs_number_formatted)
        ),
    );
    if let Some(d) = demographics {
        rows.push_str(&row(
            "Date of birth",
            escape(
                &d.birth_date
                    .as_deref()
                    .map(clock::uk_date)
                    .unwrap_or_else(|| "not recorded".into()),
            ),
        ));
        rows.push_str(&row(
            "Gender",
            escape(d.gender.as_deref().unwrap_or("not recorded")),
        ));
        rows.push_str(&row(
            "Registered GP",
            escape(d.registered_gp.as_deref().unwrap_or("not recorded")),
        ));
        rows.push_str(&row("Demographics from", escape(&d.source)));
    }
    format!(
        "<h1 class=\"nhsuk-heading-l\" id=\"patient-name\">{}</h1>\
         <dl class=\"nhsuk-summary-list caremesh-patient\">{rows}</dl>",
        escape(
            demographics
                .and_then(|d| d.name.as_deref())
                .unwrap_or("Name not held")
        )
    )
}

/// The sources panel: each contributing organisation, its kind, data as of and feed, with a
/// box that hides its items when unticked (view.js; without scripts every item shows).
fn sources_panel(record: &Record) -> String {
    let mut boxes = String::new();
    for (index, source) in record.sources.iter().enumerate() {
        let feed_tag = match source.feed.as_str() {
            "live" => "nhsuk-tag--green",
            "batch" => "nhsuk-tag--blue",
            _ => "nhsuk-tag--grey",
        };
        boxes.push_str(&format!(
            "<div class=\"nhsuk-checkboxes__item\"><input class=\"nhsuk-checkboxes__input\" \
             id=\"source-{index}\" type=\"checkbox\" checked data-source=\"{ods}\">\
             <label class=\"nhsuk-label nhsuk-checkboxes__label\" for=\"source-{index}\">\
             <strong>{name}</strong> ({ods}), {kind} &middot; {items}\
             <span class=\"nhsuk-hint\">Data as of {as_of} &middot; \
             <strong class=\"nhsuk-tag {feed_tag}\">{feed}</strong>{stale} from {system}</span></label></div>",
            ods = escape(&source.ods),
            name = escape(&source.name),
            kind = escape(&source.kind),
            items = record::items_phrase(source.items),
            as_of = escape(&clock::uk_date_time(source.data_as_of_unix)),
            feed = escape(&source.feed),
            system = escape(&source.source_system),
            stale = if source.stale {
                " <strong class=\"nhsuk-tag nhsuk-tag--orange\">out of date</strong>"
            } else {
                ""
            },
        ));
    }
    format!(
        "<section id=\"sources\" class=\"nhsuk-card\"><div class=\"nhsuk-card__content\">\
         <h2 class=\"nhsuk-card__heading\">Sources</h2><fieldset class=\"nhsuk-fieldset\">\
         <legend class=\"nhsuk-fieldset__legend nhsuk-fieldset__legend--s\">Show data from</legend>\
         <div class=\"nhsuk-checkboxes nhsuk-checkboxes--small\">{boxes}</div></fieldset></div></section>"
    )
}

/// "Serum potassium level 4.1 mmol/L, Oxford University Hospitals, 15/04/2022 — viewed in
/// the shared care record 23/08/2022": what a clinician pastes into their own notes.
fn citation(item: &record::ItemView, today: &str) -> String {
    let what = match item.detail.as_deref().filter(|d| !d.is_empty()) {
        Some(detail) if detail.chars().count() <= 120 => format!("{} {detail}", item.title),
        _ => item.title.clone(),
    };
    let date = item
        .effective
        .as_deref()
        .or(item.recorded.as_deref())
        .map(clock::uk_date)
        .unwrap_or_else(|| "undated".into());
    format!(
        "{what}, {}, {date} \u{2014} viewed in the shared care record {today}",
        item.source.organisation_name
    )
}

/// One source's version of an entry: its details, organisation, system and dates, and a
/// control to copy a citation of it.
fn item_from(item: &record::ItemView, today: &str) -> String {
    let break_glass = item.shown_by == ViewDecision::BreakGlass;
    let recorded = item
        .recorded
        .as_deref()
        .map(|r| format!("recorded {}", clock::uk_date(r)))
        .unwrap_or_else(|| "recorded date not given".into());
    let dated = item
        .effective
        .as_deref()
        .map(|e| format!("{} &middot; ", escape(&clock::uk_date(e))))
        .unwrap_or_default();
    format!(
        "<div class=\"caremesh-from{bg}\" data-source=\"{ods}\"><strong>{organisation}</strong>{status}\
         {detail}<br><span class=\"nhsuk-body-s caremesh-muted\">{dated}{system} &middot; {recorded}{bg_note}</span> \
         <button type=\"button\" class=\"caremesh-copy\" data-reference=\"{reference}\">Copy reference</button></div>",
        bg = if break_glass { " break-glass" } else { "" },
        ods = escape(&item.source.organisation),
        organisation = escape(&item.source.organisation_name),
        status = item
            .status
            .as_deref()
            .map(|s| format!(" <span class=\"caremesh-muted\">({})</span>", escape(s)))
            .unwrap_or_default(),
        detail = item
            .detail
            .as_deref()
            .filter(|d| !d.is_empty())
            .map(|d| format!("<br>{}", escape(d)))
            .unwrap_or_default(),
        system = escape(&item.source.system),
        recorded = escape(&recorded),
        bg_note = if break_glass {
            " &middot; shown by emergency access"
        } else {
            ""
        },
        reference = escape(&citation(item, today)),
    )
}

/// An entry: one fact, with each source's version of it listed, never merged.
fn entry_row(section: &record::SectionView, entry: &record::EntryView, today: &str) -> String {
    let members: Vec<&record::ItemView> = entry.items.iter().map(|&i| &section.items[i]).collect();
    let break_glass = members
        .iter()
        .any(|item| item.shown_by == ViewDecision::BreakGlass);
    let several = if entry.sources.len() > 1 {
        format!(
            " <strong class=\"nhsuk-tag nhsuk-tag--purple caremesh-sources-tag\">{} sources</strong>",
            entry.sources.len()
        )
    } else {
        String::new()
    };
    let date = entry
        .effective
        .as_deref()
        .map(clock::uk_date)
        .unwrap_or_else(|| "-".into());
    let from: String = members.iter().map(|item| item_from(item, today)).collect();
    format!(
        "<tr class=\"nhsuk-table__row caremesh-entry{}\" data-sources=\"{}\">\
         <td class=\"nhsuk-table__cell\">{}</td><td class=\"nhsuk-table__cell\">{}{several}</td>\
         <td class=\"nhsuk-table__cell\">{from}</td></tr>",
        if break_glass { " break-glass" } else { "" },
        escape(&entry.sources.join(" ")),
        escape(&date),
        escape(&entry.title),
    )
}

fn section_card(section: &record::SectionView, today: &str) -> String {
    let mut out = format!(
        "<section id=\"{id}\" class=\"nhsuk-card caremesh-section\"><div class=\"nhsuk-card__content\">\
         <h2 class=\"nhsuk-card__heading\">{title} <span class=\"nhsuk-caption-m caremesh-count\">({count})</span></h2>",
        id = section.section,
        title = escape(section.title),
        count = section.count
    );
    out.push_str(&section_notices(section));
    if section.items.is_empty() {
        out.push_str(
            "<p class=\"caremesh-muted\">Nothing recorded in the data held.</p></div></section>",
        );
        return out;
    }
    out.push_str(&format!(
        "<table class=\"nhsuk-table\"><caption class=\"nhsuk-table__caption nhsuk-u-visually-hidden\">{}</caption>\
         <thead class=\"nhsuk-table__head\"><tr class=\"nhsuk-table__row\">\
         <th class=\"nhsuk-table__header\" scope=\"col\">Date</th><th class=\"nhsuk-table__header\" scope=\"col\">Entry</th>\
         <th class=\"nhsuk-table__header\" scope=\"col\">From</th>\
         </tr></thead><tbody class=\"nhsuk-table__body\">",
        escape(section.title)
    ));
    for entry in &section.entries {
        out.push_str(&entry_row(section, entry, today));
    }
    out.push_str("</tbody></table></div></section>");
    out
}

/// Encounters and documents from every organisation, newest first: the story of the
/// patient's care across organisations at a glance.
fn timeline(record: &Record) -> String {
    let mut events: Vec<&record::ItemView> = record
        .sections
        .iter()
        .filter(|s| {
            matches!(
                s.section,
                caremesh_sync::Section::Encounters | caremesh_sync::Section::Documents
            )
        })
        .flat_map(|s| s.items.iter())
        .collect();
    if events.is_empty() {
        return String::new();
    }
    events.sort_by(|a, b| {
        b.effective
            .cmp(&a.effective)
            .then_with(|| a.title.cmp(&b.title))
    });
    let mut out = String::from(
        "<section id=\"timeline\" class=\"nhsuk-card\"><div class=\"nhsuk-card__content\">\
         <h2 class=\"nhsuk-card__heading\">Timeline of encounters and documents</h2>\
         <ol class=\"caremesh-timeline\">",
    );
    for event in events {
        out.push_str(&format!(
            "<li class=\"caremesh-event\" data-source=\"{ods}\" data-date=\"{date_iso}\"><strong>{date}</strong> \
             {title}{detail} <span class=\"caremesh-muted\">&middot; {organisation}</span></li>",
            ods = escape(&event.source.organisation),
            date_iso = escape(event.effective.as_deref().unwrap_or("")),
            date = escape(
                &event
                    .effective
                    .as_deref()
                    .map(clock::uk_date)
                    .unwrap_or_else(|| "undated".into())
            ),
            title = escape(&event.title),
            detail = event
                .detail
                .as_deref()
                .filter(|d| !d.is_empty())
                .map(|d| format!(": {}", escape(d)))
                .unwrap_or_default(),
            organisation = escape(&event.source.organisation_name),
        ));
    }
    out.push_str("</ol></div></section>");
    out
}

pub fn render_record(
    state: &ViewState,
    session: &LaunchSession,
    record: &Record,
    offline: &str,
) -> String {
    let mut body = patient_header(record);
    body.push_str(offline);
    body.push_str(&format!(
        "<div class=\"nhsuk-inset-text\"><span class=\"nhsuk-u-visually-hidden\">Information: </span>\
         <p>Read-only view assembled from data held on this node at {}. It does not need the network.</p></div>",
        escape(&clock::uk_date_time(clock::now_unix()))
    ));
    body.push_str(&sharing_banners(state, record));
    body.push_str(&sources_panel(record));
    body.push_str(&timeline(record));
    let today = clock::uk_date(&clock::rfc3339(clock::now_unix()));
    for section in &record.sections {
        body.push_str(&section_card(section, &today));
    }
    page(
        state,
        Some(session),
        record
            .demographics
            .as_ref()
            .and_then(|d| d.name.as_deref())
            .unwrap_or("Patient record"),
        &body,
    )
}

pub struct ReportForm<'a> {
    pub patient: &'a str,
    pub user: &'a str,
    pub from: &'a str,
    pub to: &'a str,
}

pub fn audit_form(form: &ReportForm<'_>) -> String {
    let field = |id: &str, label: &str, value: &str| {
        format!(
            "<div class=\"nhsuk-form-group\"><label class=\"nhsuk-label\" for=\"{id}\">{label}</label>\
             <input class=\"nhsuk-input nhsuk-input--width-20\" id=\"{id}\" name=\"{id}\" value=\"{}\"></div>",
            escape(value)
        )
    };
    format!(
        "<h1 class=\"nhsuk-heading-l\">Audit reports</h1><form method=\"get\" action=\"/audit\" class=\"search\">{}{}{}{}\
         <button class=\"nhsuk-button\" data-module=\"nhsuk-button\" type=\"submit\">Report</button></form>",
        field("patient", "NHS number", form.patient),
        field("user", "or user id", form.user),
        field("from", "From (YYYY-MM-DD)", form.from),
        field("to", "To (YYYY-MM-DD)", form.to),
    )
}

pub fn render_report(rows: &[crate::audit::ReportRow], form: &ReportForm<'_>) -> String {
    let link_query: String = [
        ("patient", form.patient),
        ("user", form.user),
        ("from", form.from),
        ("to", form.to),
    ]
    .iter()
    .filter(|(_, value)| !value.trim().is_empty())
    .map(|(name, value)| format!("{name}={}", url_encode(value.trim())))
    .collect::<Vec<_>>()
    .join("&amp;");
    let header = crate::audit::REPORT_COLUMNS
        .iter()
        .map(|h| format!("<th class=\"nhsuk-table__header\" scope=\"col\">{h}</th>"))
        .collect::<String>();
    let mut out = format!(
        "<section id=\"report\"><h2 class=\"nhsuk-heading-m\">{} access(es)</h2><p>Download: \
         <a href=\"/api/audit?{link_query}&amp;format=csv\">CSV</a> &middot; \
         <a href=\"/api/audit?{link_query}&amp;format=json\">JSON</a> &middot; \
         <a href=\"/api/audit?{link_query}&amp;format=fhir\">FHIR AuditEvent</a></p>\
         <div class=\"nhsuk-table-responsive\"><table class=\"nhsuk-table\">\
         <caption class=\"nhsuk-table__caption nhsuk-u-visually-hidden\">Accesses</caption>\
         <thead class=\"nhsuk-table__head\"><tr class=\"nhsuk-table__row\">{header}</tr></thead>\
         <tbody class=\"nhsuk-table__body\">",
        rows.len()
    );
    for row in rows {
        let cells = crate::audit::report_cells(row);
        out.push_str("<tr class=\"nhsuk-table__row\">");
        for cell in cells {
            out.push_str(&format!(
                "<td class=\"nhsuk-table__cell\">{}</td>",
                escape(&cell)
            ));
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table></div></section>");
    out
}
