//! HTML for the view, in the NHS design system's markup (nhsuk-frontend, vendored in
//! `view/assets/nhsuk`). Everything that comes from data is escaped here.

use super::ViewState;
use crate::record::{self, Record};
use caremesh_fhir::clock;
use caremesh_fhir::reading::Standing;
use caremesh_storage::PeerStatus;
use caremesh_storage::access::LaunchSession;
use caremesh_sync::policy::ViewDecision;
use caremesh_sync::{DataClass, Section};

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
fn sharing_banners(state: &ViewState, record: &Record, form_token: &str) -> String {
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
             <input type=\"hidden\" name=\"form_token\" value=\"{}\">\
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
            escape(form_token),
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
    for source in &record.unverified_sources {
        out.push_str(&format!(
            "<div class=\"nhsuk-warning-callout caremesh-unverified\" role=\"alert\" id=\"unverified-{ods}\"><h2 class=\"nhsuk-warning-callout__label\">\
             <span role=\"text\"><span class=\"nhsuk-u-visually-hidden\">Important: </span>\
             Entries from {name} not shown</span></h2><p>{notice}</p></div>",
            ods = escape(&source.ods),
            name = escape(&source.name),
            notice = escape(&source.notice()),
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

/// The patient banner, kept in view while scrolling: whose demographics it shows and why,
/// age, postcode, registered GP with where that came from, death, and any disagreement
/// between sources on who this is.
fn patient_header(record: &Record) -> String {
    let demographics = record.demographics.as_ref();
    let item = |key: &str, value: String| {
        format!("<div class=\"caremesh-banner__item\"><dt>{key}</dt><dd>{value}</dd></div>")
    };
    let mut rows = item(
        "NHS number",
        format!(
            "<strong id=\"nhs-number\">{}</strong>",
            escape(&record.nhs_number_formatted)
        ),
    );
    let mut deceased = String::new();
    if let Some(d) = demographics {
        let born = d
            .birth_date
            .as_deref()
            .map(clock::uk_date)
            .unwrap_or_else(|| "not recorded".into());
        let age = d
            .age
            .as_deref()
            .map(|a| format!(" ({a})"))
            .unwrap_or_default();
        rows.push_str(&item("Date of birth", escape(&format!("{born}{age}"))));
        rows.push_str(&item(
            "Gender",
            escape(d.gender.as_deref().unwrap_or("not recorded")),
        ));
        rows.push_str(&item(
            "Postcode",
            escape(d.postcode.as_deref().unwrap_or("not recorded")),
        ));
        rows.push_str(&item(
            "Registered GP",
            format!(
                "<span id=\"registered-gp\">{}</span>{}",
                escape(d.registered_gp.as_deref().unwrap_or("not recorded")),
                d.registered_gp_source
                    .as_deref()
                    .map(|s| format!(
                        " <span class=\"caremesh-muted\">(from {})</span>",
                        escape(s)
                    ))
                    .unwrap_or_default()
            ),
        ));
        rows.push_str(&item(
            "Demographics from",
            format!(
                "<span id=\"demographics-source\">{}</span> <span class=\"caremesh-muted\">({})</span>",
                escape(&d.source),
                escape(d.chosen_because)
            ),
        ));
        if let Some(date) = &d.deceased {
            deceased = format!(
                " <strong class=\"nhsuk-tag nhsuk-tag--grey caremesh-deceased\" id=\"deceased\">Deceased {}</strong>",
                escape(&record::deceased_phrase(date))
            );
        }
    }
    let name = demographics
        .and_then(|d| d.name.as_deref())
        .unwrap_or("Name not held");
    let mut out = format!(
        "<div class=\"caremesh-banner\" id=\"patient-banner\"><h1 class=\"nhsuk-heading-l\">\
         <span id=\"patient-name\">{}</span>{deceased}</h1>\
         <dl class=\"caremesh-patient\">{rows}</dl></div>",
        escape(name)
    );
    if !record.demographic_conflicts.is_empty() {
        let mut lines = String::new();
        for conflict in &record.demographic_conflicts {
            let versions = conflict
                .versions
                .iter()
                .map(|(source, value)| {
                    format!("{}: <strong>{}</strong>", escape(source), escape(value))
                })
                .collect::<Vec<_>>()
                .join("; ");
            lines.push_str(&format!("<li>{}: {versions}</li>", escape(conflict.field)));
        }
        out.push_str(&format!(
            "<div class=\"nhsuk-error-summary caremesh-identity-conflict\" id=\"identity-conflict\" role=\"alert\" tabindex=\"-1\">\
             <h2 class=\"nhsuk-error-summary__title\">Check this is the right patient: sources disagree</h2>\
             <div class=\"nhsuk-error-summary__body\"><p>Organisations give different details for NHS number {}; \
             a record may be filed against the wrong patient.</p><ul>{lines}</ul></div></div>",
            escape(&record.nhs_number_formatted)
        ));
    }
    if !record.corrections.is_empty() {
        let lines: String = record
            .corrections
            .iter()
            .map(|c| {
                format!(
                    "<li data-direction=\"{}\">{}</li>",
                    c.direction,
                    escape(&c.text)
                )
            })
            .collect();
        out.push_str(&format!(
            "<div class=\"nhsuk-warning-callout\" id=\"record-corrections\">\
             <h2 class=\"nhsuk-warning-callout__label\"><span role=\"text\">\
             <span class=\"nhsuk-u-visually-hidden\">Important: </span>Entries moved between patients' records</span></h2>\
             <p>These entries were filed against the wrong patient and corrected by their source. \
             Check decisions made from this record since they were filed.</p><ul>{lines}</ul></div>"
        ));
    }
    out
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

/// "Serum potassium 4.1 mmol/L, Oxford University Hospitals, 15-Apr-2022 — viewed in the
/// shared care record 23-Aug-2022": what a clinician pastes into their own notes.
fn citation(item: &record::ItemView, today: &str) -> String {
    let reading = &item.reading;
    let value = reading
        .details
        .iter()
        .find(|d| matches!(d.label, "Value" | "Dose"))
        .map(|d| d.value.as_str())
        .filter(|v| v.chars().count() <= 120);
    let what = match value {
        Some(value) => format!("{} {value}", reading.title),
        None => reading.title.clone(),
    };
    let status = reading
        .status
        .as_deref()
        .map(|s| format!(" ({s})"))
        .unwrap_or_default();
    let date = reading
        .date
        .as_deref()
        .or(item.recorded.as_deref())
        .map(clock::uk_date)
        .unwrap_or_else(|| "undated".into());
    format!(
        "{what}{status}, {}, {date} \u{2014} viewed in the shared care record {today}",
        item.source.organisation_name
    )
}

fn warning_tags(warnings: &[String]) -> String {
    warnings
        .iter()
        .map(|w| {
            format!(
                " <strong class=\"nhsuk-tag nhsuk-tag--red caremesh-warning\">{}</strong>",
                escape(w)
            )
        })
        .collect()
}

/// One source's version of an entry: its status, details, organisation, system and dates,
/// and a control to copy a citation of it.
fn item_from(item: &record::ItemView, today: &str, entry_title: &str) -> String {
    let reading = &item.reading;
    let break_glass = item.shown_by == ViewDecision::BreakGlass;
    let recorded = item
        .recorded
        .as_deref()
        .map(|r| format!("recorded {}", clock::uk_date(r)))
        .unwrap_or_else(|| "recorded date not given".into());
    let details: String = reading
        .details
        .iter()
        .map(|d| {
            format!(
                "<div class=\"caremesh-detail\"><dt>{}</dt><dd>{}</dd></div>",
                escape(d.label),
                escape(&d.value)
            )
        })
        .collect();
    let details = if details.is_empty() {
        String::new()
    } else {
        format!("<dl class=\"caremesh-details\">{details}</dl>")
    };
    let own_title = if reading.title != entry_title {
        format!(" &middot; {}", escape(&reading.title))
    } else {
        String::new()
    };
    format!(
        "<div class=\"caremesh-from{bg}\" data-source=\"{ods}\"><strong>{organisation}</strong>{own_title}{status}\
         {details}<span class=\"nhsuk-body-s caremesh-muted\">{system} &middot; {recorded}{bg_note}</span> \
         <button type=\"button\" class=\"caremesh-copy\" data-reference=\"{reference}\">Copy reference</button></div>",
        bg = if break_glass { " break-glass" } else { "" },
        ods = escape(&item.source.organisation),
        organisation = escape(&item.source.organisation_name),
        status = reading
            .status
            .as_deref()
            .map(|s| format!(" <span class=\"caremesh-status\">({})</span>", escape(s)))
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

/// An entry: one fact, with each source's version of it listed, never merged. Beyond the
/// newest three, versions fold away (repeat issues of one medicine can number dozens).
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
    let versions = if entry.items.len() > 1 {
        format!(
            "<br><span class=\"nhsuk-body-s caremesh-muted caremesh-versions\">{}, latest first</span>",
            escape(&entry.versions_phrase(section))
        )
    } else {
        String::new()
    };
    let not_stated = if entry.standing == Standing::NotStated {
        " <strong class=\"nhsuk-tag nhsuk-tag--yellow\">status not stated</strong>"
    } else {
        ""
    };
    let date = entry
        .effective
        .as_deref()
        .map(clock::uk_when)
        .unwrap_or_else(|| "-".into());
    const SHOWN: usize = 3;
    let mut from: String = members
        .iter()
        .take(SHOWN)
        .map(|item| item_from(item, today, &entry.title))
        .collect();
    if members.len() > SHOWN {
        let rest: String = members
            .iter()
            .skip(SHOWN)
            .map(|item| item_from(item, today, &entry.title))
            .collect();
        from.push_str(&format!(
            "<details class=\"nhsuk-details caremesh-older\"><summary class=\"nhsuk-details__summary\">\
             <span class=\"nhsuk-details__summary-text\">{} older</span></summary>\
             <div class=\"nhsuk-details__text\">{rest}</div></details>",
            members.len() - SHOWN
        ));
    }
    format!(
        "<tr class=\"nhsuk-table__row caremesh-entry{bg}\" data-sources=\"{sources}\" data-standing=\"{standing}\">\
         <td class=\"nhsuk-table__cell caremesh-date\">{date}</td><td class=\"nhsuk-table__cell\">\
         <span class=\"caremesh-entry-title\">{title}</span>{not_stated}{warnings}{several}{versions}</td>\
         <td class=\"nhsuk-table__cell\">{from}</td></tr>",
        bg = if break_glass { " break-glass" } else { "" },
        sources = escape(&entry.sources.join(" ")),
        standing = entry.standing.label(),
        date = escape(&date),
        title = escape(&entry.title),
        warnings = warning_tags(&entry.warnings),
    )
}

/// One entry's row; for a test's series, its latest result's row and the earlier results
/// folded beneath it, latest first.
fn series_rows(
    section: &record::SectionView,
    series: &[&record::EntryView],
    today: &str,
) -> String {
    let (latest, earlier) = series.split_first().expect("a series has a result");
    let mut rows = entry_row(section, latest, today);
    if !earlier.is_empty() {
        let earlier_rows: String = earlier
            .iter()
            .map(|entry| entry_row(section, entry, today))
            .collect();
        rows.push_str(&format!(
            "<tr class=\"nhsuk-table__row caremesh-series-earlier\"><td class=\"nhsuk-table__cell\" colspan=\"3\">\
             <details class=\"nhsuk-details caremesh-series\"><summary class=\"nhsuk-details__summary\">\
             <span class=\"nhsuk-details__summary-text\">{} earlier {} result{}</span></summary>\
             <div class=\"nhsuk-details__text\">{}</div></details></td></tr>",
            earlier.len(),
            escape(&latest.title),
            if earlier.len() == 1 { "" } else { "s" },
            entries_table(&format!("Earlier {}", latest.title), earlier_rows),
        ));
    }
    rows
}

fn entries_table(caption: &str, rows: String) -> String {
    format!(
        "<table class=\"nhsuk-table caremesh-entries\"><caption class=\"nhsuk-table__caption nhsuk-table__caption--s\">{}</caption>\
         <thead class=\"nhsuk-table__head\"><tr class=\"nhsuk-table__row\">\
         <th class=\"nhsuk-table__header\" scope=\"col\">Date</th><th class=\"nhsuk-table__header\" scope=\"col\">Entry</th>\
         <th class=\"nhsuk-table__header\" scope=\"col\">From</th>\
         </tr></thead><tbody class=\"nhsuk-table__body\">{rows}</tbody></table>",
        escape(caption)
    )
}

/// Events beyond this many fold away, latest first above the fold.
const EVENTS_SHOWN: usize = 10;

fn section_card(section: &record::SectionView, today: &str) -> String {
    let mut out = format!(
        "<section id=\"{id}\" class=\"nhsuk-card caremesh-section\" data-versions=\"{count}\"><div class=\"nhsuk-card__content\">\
         <h2 class=\"nhsuk-card__heading\">{title} <span class=\"nhsuk-caption-m caremesh-count\">({phrase})</span></h2>",
        id = section.section,
        title = escape(section.title),
        count = section.count,
        phrase = escape(&section.count_phrase()),
    );
    for warning in &section.warnings {
        out.push_str(&format!(
            "<div class=\"nhsuk-warning-callout caremesh-section-warning\" role=\"alert\"><h3 class=\"nhsuk-warning-callout__label\">\
             <span role=\"text\"><span class=\"nhsuk-u-visually-hidden\">Important: </span>Conflict</span></h3><p>{}</p></div>",
            escape(warning)
        ));
    }
    out.push_str(&section_notices(section));
    if section.items.is_empty() {
        out.push_str(
            "<p class=\"caremesh-muted\">Nothing recorded in the data held.</p></div></section>",
        );
        return out;
    }
    for (heading, entries) in section.by_standing() {
        let caption = heading.unwrap_or(section.title);
        // Each group is one row: an entry, or a test's latest result with its earlier ones.
        let groups = section.series(&entries);
        let rows = |groups: &[Vec<&record::EntryView>]| -> String {
            groups
                .iter()
                .map(|group| series_rows(section, group, today))
                .collect()
        };
        let folds = heading.is_none() || heading == Some("Events");
        if folds && groups.len() > EVENTS_SHOWN {
            out.push_str(&entries_table(caption, rows(&groups[..EVENTS_SHOWN])));
            out.push_str(&format!(
                "<details class=\"nhsuk-details caremesh-more\"><summary class=\"nhsuk-details__summary\">\
                 <span class=\"nhsuk-details__summary-text\">{} earlier {}</span></summary>\
                 <div class=\"nhsuk-details__text\">{}</div></details>",
                groups.len() - EVENTS_SHOWN,
                if groups.len() - EVENTS_SHOWN == 1 { "entry" } else { "entries" },
                entries_table(&format!("{caption}, earlier"), rows(&groups[EVENTS_SHOWN..]))
            ));
        } else if heading.is_some_and(|h| {
            h.starts_with("Past") || h.starts_with("Resolved") || h.starts_with("Refuted")
        }) {
            out.push_str(&format!(
                "<details class=\"nhsuk-details caremesh-past\"><summary class=\"nhsuk-details__summary\">\
                 <span class=\"nhsuk-details__summary-text\">{} ({})</span></summary>\
                 <div class=\"nhsuk-details__text\">{}</div></details>",
                escape(caption),
                entries.len(),
                entries_table(caption, rows(&groups))
            ));
        } else {
            out.push_str(&entries_table(caption, rows(&groups)));
        }
    }
    out.push_str("</div></section>");
    out
}

/// The first screen: what must be seen before prescribing or treating. Alerts, allergies
/// (with any conflict), current medication, active problems and the latest results, each
/// entry linking down to its section, where every version is.
fn summary(record: &Record) -> String {
    let section = |wanted: Section| record.sections.iter().find(|s| s.section == wanted);
    let mut out = String::from(
        "<section id=\"summary\" class=\"nhsuk-card caremesh-summary\"><div class=\"nhsuk-card__content\">\
         <h2 class=\"nhsuk-card__heading nhsuk-u-visually-hidden\">Summary</h2><div class=\"caremesh-summary__grid\">",
    );
    let block = |title: &str, id: &str, lines: Vec<String>, empty: &str, warnings: &[String]| {
        let body = if lines.is_empty() {
            format!(
                "<p class=\"caremesh-muted nhsuk-body-s\">{}</p>",
                escape(empty)
            )
        } else {
            format!(
                "<ul class=\"nhsuk-list caremesh-summary__list\">{}</ul>",
                lines.concat()
            )
        };
        let warnings: String = warnings
            .iter()
            .map(|w| {
                format!(
                    "<p class=\"caremesh-summary__warning\" role=\"alert\"><strong>{}</strong></p>",
                    escape(w)
                )
            })
            .collect();
        format!(
            "<div class=\"caremesh-summary__block\" id=\"summary-{id}\"><h3 class=\"nhsuk-heading-xs\">\
             <a href=\"#{id}\">{}</a></h3>{warnings}{body}</div>",
            escape(title)
        )
    };
    let line = |s: &record::SectionView, entry: &record::EntryView, extra: Option<String>| {
        let first = &s.items[entry.items[0]];
        let sources: Vec<String> = entry
            .items
            .iter()
            .map(|&i| s.items[i].source.organisation_name.clone())
            .fold(Vec::new(), |mut names, name| {
                if !names.contains(&name) {
                    names.push(name);
                }
                names
            });
        format!(
            "<li data-sources=\"{}\"><strong>{}</strong>{}{}{} <span class=\"caremesh-muted nhsuk-body-s\">{}</span></li>",
            escape(&entry.sources.join(" ")),
            escape(&entry.title),
            extra
                .map(|e| format!(" {}", escape(&e)))
                .unwrap_or_default(),
            if entry.standing == Standing::NotStated {
                " (status not stated)"
            } else {
                ""
            },
            warning_tags(&entry.warnings),
            escape(&format!(
                "{}{}",
                sources.join(", "),
                first
                    .reading
                    .date
                    .as_deref()
                    .map(|d| format!(", {}", clock::uk_date(d)))
                    .unwrap_or_default()
            )),
        )
    };
    let live =
        |e: &&record::EntryView| matches!(e.standing, Standing::Current | Standing::NotStated);
    let detail = |s: &record::SectionView, e: &record::EntryView, label: &str| {
        s.items[e.items[0]]
            .reading
            .details
            .iter()
            .find(|d| d.label == label)
            .map(|d| format!("\u{2014} {}", d.value))
    };
    if let Some(s) = section(Section::Alerts) {
        let lines: Vec<String> = s
            .entries
            .iter()
            .filter(live)
            .map(|e| line(s, e, None))
            .collect();
        if !lines.is_empty() {
            out.push_str(&block("Alerts", "alerts", lines, "", &[]));
        }
    }
    if let Some(s) = section(Section::Allergies) {
        let lines = s
            .entries
            .iter()
            .filter(live)
            .map(|e| line(s, e, detail(s, e, "Reaction")))
            .collect();
        out.push_str(&block(
            "Allergies and adverse reactions",
            "allergies",
            lines,
            "None recorded in the data held (this is not a record of no allergies)",
            &s.warnings,
        ));
    }
    if let Some(s) = section(Section::Medications) {
        let lines = s
            .entries
            .iter()
            .filter(live)
            .filter(|e| s.items[e.items[0]].reading.standing != Standing::Event)
            .map(|e| line(s, e, detail(s, e, "Dose")))
            .collect();
        out.push_str(&block(
            "Current medication",
            "medications",
            lines,
            "None current in the data held",
            &[],
        ));
    }
    if let Some(s) = section(Section::Problems) {
        let lines = s
            .entries
            .iter()
            .filter(live)
            .map(|e| line(s, e, None))
            .collect();
        out.push_str(&block(
            "Active problems",
            "problems",
            lines,
            "None active in the data held",
            &[],
        ));
    }
    if let Some(s) = section(Section::Results) {
        // The latest of each test; consultation notes filed as observations are not results.
        let mut seen = std::collections::HashSet::new();
        let lines = s
            .entries
            .iter()
            .filter(|e| {
                e.items
                    .iter()
                    .all(|&i| s.items[i].data_class != DataClass::FreeText)
            })
            .filter(|e| seen.insert(e.title.to_lowercase()))
            .take(6)
            .map(|e| line(s, e, detail(s, e, "Value")))
            .collect();
        out.push_str(&block(
            "Latest results",
            "results",
            lines,
            "None in the data held",
            &[],
        ));
    }
    out.push_str("</div></div></section>");
    out
}

/// Links to each section with something in it, so a long record is quick to move through.
fn jump_links(record: &Record) -> String {
    let links: String = record
        .sections
        .iter()
        .filter(|s| !s.items.is_empty() || s.withheld_by_sharing_rules > 0)
        .map(|s| {
            format!(
                "<li class=\"nhsuk-contents-list__item\"><a class=\"nhsuk-contents-list__link\" href=\"#{}\">{} ({})</a></li>",
                s.section,
                escape(s.title),
                s.entries.len()
            )
        })
        .collect();
    format!(
        "<nav class=\"nhsuk-contents-list caremesh-jump\" role=\"navigation\" aria-label=\"Sections of the record\">\
         <h2 class=\"nhsuk-u-visually-hidden\">Sections</h2><ol class=\"nhsuk-contents-list__list\">{links}\
         <li class=\"nhsuk-contents-list__item\"><a class=\"nhsuk-contents-list__link\" href=\"#timeline\">Timeline</a></li>\
         <li class=\"nhsuk-contents-list__item\"><a class=\"nhsuk-contents-list__link\" href=\"#sources\">Sources</a></li></ol></nav>"
    )
}

/// Encounters and documents from every organisation, newest first: the story of the
/// patient's care across organisations, folded away below the clinical sections.
fn timeline(record: &Record) -> String {
    let mut events: Vec<&record::ItemView> = record
        .sections
        .iter()
        .filter(|s| matches!(s.section, Section::Encounters | Section::Documents))
        .flat_map(|s| s.items.iter())
        .collect();
    if events.is_empty() {
        return String::new();
    }
    events.sort_by_cached_key(|e| {
        (
            std::cmp::Reverse(e.reading.date.as_deref().and_then(clock::sort_key)),
            e.reading.title.clone(),
        )
    });
    let mut out = format!(
        "<section id=\"timeline\" class=\"nhsuk-card\"><div class=\"nhsuk-card__content\">\
         <details class=\"nhsuk-details caremesh-timeline-details\"><summary class=\"nhsuk-details__summary\">\
         <h2 class=\"nhsuk-card__heading nhsuk-details__summary-text\">Timeline of encounters and documents ({})</h2></summary>\
         <div class=\"nhsuk-details__text\"><ol class=\"caremesh-timeline\">",
        events.len()
    );
    for event in events {
        let detail = event
            .reading
            .details
            .iter()
            .find(|d| matches!(d.label, "Reason" | "Description" | "Location" | "Custodian"))
            .map(|d| format!(": {}", escape(&d.value)))
            .unwrap_or_default();
        out.push_str(&format!(
            "<li class=\"caremesh-event\" data-source=\"{ods}\" data-date=\"{sortable}\"><strong>{date}</strong> \
             {title}{detail} <span class=\"caremesh-muted\">&middot; {organisation}</span></li>",
            ods = escape(&event.source.organisation),
            sortable = event
                .reading
                .date
                .as_deref()
                .and_then(clock::sort_key)
                .map(clock::rfc3339)
                .unwrap_or_default(),
            date = escape(
                &event
                    .reading
                    .date
                    .as_deref()
                    .map(clock::uk_when)
                    .unwrap_or_else(|| "undated".into())
            ),
            title = escape(&event.reading.title),
            organisation = escape(&event.source.organisation_name),
        ));
    }
    out.push_str("</ol></div></details></div></section>");
    out
}

pub fn render_record(
    state: &ViewState,
    session: &LaunchSession,
    record: &Record,
    offline: &str,
    form_token: &str,
) -> String {
    let mut body = patient_header(record);
    body.push_str(offline);
    body.push_str(&summary(record));
    body.push_str(&sharing_banners(state, record, form_token));
    body.push_str(&jump_links(record));
    let today = clock::uk_date(&clock::rfc3339(clock::now_unix()));
    for section in &record.sections {
        body.push_str(&section_card(section, &today));
    }
    body.push_str(&timeline(record));
    body.push_str(&sources_panel(record));
    body.push_str(&format!(
        "<div class=\"nhsuk-inset-text\"><span class=\"nhsuk-u-visually-hidden\">Information: </span>\
         <p>Read-only view assembled from data held on this node at {}. It does not need the network.</p></div>",
        escape(&clock::uk_date_time(clock::now_unix()))
    ));
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

pub fn render_report(rows: &[crate::audit_report::ReportRow], form: &ReportForm<'_>) -> String {
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
    let header = crate::audit_report::REPORT_COLUMNS
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
        let cells = crate::audit_report::report_cells(row);
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
