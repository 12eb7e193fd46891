//! The joined-up record as the view shows it, assembled from the local read model only.

use crate::clock;
use caremesh_storage::{BreakGlass, SourceRow, StorageError, Store, StoredItem};
use caremesh_sync::policy::{self, Consent, SharingRecord, ViewDecision, WithholdReason};
use caremesh_sync::{DataClass, Item, NhsNumber, OdsCode, Section};
use serde::Serialize;
use std::collections::BTreeMap;

/// Who is looking: the viewing organisation, whose Share In governs what of other
/// organisations' data is shown, and its defaults for patients without a recorded choice;
/// and the user, whose own break-glass (if any) shows what Share In would.
#[derive(Debug, Clone)]
pub struct Viewer {
    pub ods: OdsCode,
    pub defaults: Consent,
    pub user_id: String,
}

#[derive(Debug, Serialize)]
pub struct Record {
    pub nhs_number: String,
    pub nhs_number_formatted: String,
    pub demographics: Option<Demographics>,
    pub sections: Vec<SectionView>,
    pub sources: Vec<SourceView>,
    /// When this view was assembled (the node's clock).
    pub assembled_at: String,
    /// Whether the patient's Share In is recorded at the viewing organisation.
    pub share_in: bool,
    /// The emergency access in force, which shows what Share In would.
    pub break_glass: Option<BreakGlass>,
    /// Items of other organisations held here but not shown: no Share In, no break-glass.
    pub hidden_without_share_in: usize,
    /// Organisations whose whole record of the patient is withheld, with the reason.
    pub withheld_sources: Vec<WithheldSource>,
}

#[derive(Debug, Serialize)]
pub struct WithheldSource {
    pub ods: String,
    pub name: String,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct Demographics {
    pub name: Option<String>,
    pub birth_date: Option<String>,
    pub gender: Option<String>,
    pub registered_gp: Option<String>,
    pub source: String,
}

#[derive(Debug, Serialize)]
pub struct SectionView {
    pub section: Section,
    pub title: &'static str,
    pub count: usize,
    pub items: Vec<ItemView>,
    /// The items as the view lists them: the same fact from several sources is one entry
    /// naming each (indexes into `items`), never merged into one source's version.
    pub entries: Vec<EntryView>,
    /// Items the publishers hold in this section that sharing rules kept from this node
    /// (private, sensitive, outside the agreement), from their sharing records' counts.
    pub withheld_by_sharing_rules: u64,
    /// Items held here but not shown without Share In.
    pub hidden_without_share_in: usize,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct EntryView {
    pub title: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// The newest of its items' dates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub effective: Option<String>,
    /// Indexes into the section's items, newest first.
    pub items: Vec<usize>,
    /// The organisations (ODS codes) whose items it lists, in order of first appearance.
    pub sources: Vec<String>,
}

/// Whether the section records ongoing states (a medication, a problem: the same code is
/// the same fact whenever each source recorded it) rather than events (a result, an
/// encounter: the same code on another day is another fact).
fn records_states(section: Section) -> bool {
    matches!(
        section,
        Section::Alerts
            | Section::Allergies
            | Section::Medications
            | Section::Problems
            | Section::CarePlans
    )
}

/// What makes two items the same fact: their code (or, uncoded, their title), their class
/// (a coded fact and a narrative about it stay apart), and for events their day.
fn fact_key(section: Section, item: &ItemView) -> (String, DataClass, String) {
    let what = match &item.code {
        Some(code) if !code.is_empty() => format!("code:{code}"),
        _ => format!("title:{}", item.title.trim().to_lowercase()),
    };
    let day = if records_states(section) {
        String::new()
    } else {
        item.effective
            .as_deref()
            .map(|e| e.chars().take(10).collect())
            .unwrap_or_default()
    };
    (what, item.data_class, day)
}

/// Groups a section's items (sorted newest first) into entries, keeping that order.
pub fn group_entries(section: Section, items: &[ItemView]) -> Vec<EntryView> {
    let mut entries: Vec<EntryView> = Vec::new();
    let mut by_key: std::collections::HashMap<(String, DataClass, String), usize> =
        std::collections::HashMap::new();
    for (index, item) in items.iter().enumerate() {
        let key = fact_key(section, item);
        match by_key.get(&key) {
            Some(&entry) => {
                let entry = &mut entries[entry];
                entry.items.push(index);
                if !entry.sources.contains(&item.source.organisation) {
                    entry.sources.push(item.source.organisation.clone());
                }
            }
            None => {
                by_key.insert(key, entries.len());
                entries.push(EntryView {
                    title: item.title.clone(),
                    code: item.code.clone(),
                    effective: item.effective.clone(),
                    items: vec![index],
                    sources: vec![item.source.organisation.clone()],
                });
            }
        }
    }
    debug_assert_eq!(
        entries.iter().map(|e| e.items.len()).sum::<usize>(),
        items.len(),
        "every item is in exactly one entry"
    );
    entries
}

#[derive(Debug, Serialize)]
pub struct ItemView {
    pub title: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub effective: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recorded: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_updated: Option<String>,
    pub data_class: DataClass,
    pub source: ItemSource,
    /// Why it is shown: own data, Share In, or break-glass.
    pub shown_by: ViewDecision,
}

#[derive(Debug, Serialize)]
pub struct ItemSource {
    pub organisation: String,
    pub organisation_name: String,
    pub system: String,
    pub resource: String,
}

#[derive(Debug, Serialize)]
pub struct SourceView {
    pub ods: String,
    pub name: String,
    pub kind: String,
    pub source_system: String,
    pub feed: String,
    pub data_as_of: String,
    pub data_as_of_unix: i64,
    /// For a batch feed: how often its publisher expects to refresh it.
    pub expected_refresh_hours: Option<u32>,
    /// Its newest data is older than the expected refresh.
    pub stale: bool,
    pub items: usize,
}

impl Record {
    /// What the view showed, for the audit trail: the organisations whose data it showed
    /// and the sections that showed any, in the view's order.
    pub fn shown(&self) -> (Vec<String>, Vec<String>) {
        let sources = self.sources.iter().map(|s| s.ods.clone()).collect();
        let mut sections = Vec::new();
        if self.demographics.is_some() {
            sections.push(Section::Demographics.as_str().to_string());
        }
        sections.extend(
            self.sections
                .iter()
                .filter(|s| !s.items.is_empty())
                .map(|s| s.section.as_str().to_string()),
        );
        (sources, sections)
    }
}

/// Assembles the record, or `None` when this node holds nothing about the patient.
pub fn assemble(
    store: &Store,
    nhs: &NhsNumber,
    viewer: &Viewer,
    now: i64,
) -> Result<Option<Record>, StorageError> {
    // Sharing records are consent state for policy and access records are audit, not part
    // of the clinical record: a node holding only those about a patient holds no record.
    let (sharing, stored): (Vec<StoredItem>, Vec<StoredItem>) = store
        .patient_items(nhs)?
        .into_iter()
        .filter(|s| s.item.section != Section::Audit)
        .partition(|s| s.item.section == Section::Sharing);
    if stored.is_empty() {
        return Ok(None);
    }
    let sharing: BTreeMap<OdsCode, SharingRecord> = sharing
        .into_iter()
        .filter_map(|s| Some((s.publisher, SharingRecord::from_fields(&s.item.fields)?)))
        .collect();
    let consent = sharing
        .get(&viewer.ods)
        .map_or(viewer.defaults, |record| record.consent);
    let break_glass = store.active_break_glass(nhs, &viewer.user_id, now)?;
    let sources: BTreeMap<String, SourceRow> = store
        .sources()?
        .into_iter()
        .map(|s| (s.publisher.clone(), s))
        .collect();
    let organisation_name = |ods: &str| {
        sources
            .get(ods)
            .map(|s| s.name.clone())
            .unwrap_or_else(|| ods.to_string())
    };
    let mut by_section: BTreeMap<Section, Vec<(String, Item, ViewDecision)>> = BTreeMap::new();
    let mut items_per_source: BTreeMap<String, usize> = BTreeMap::new();
    let mut held: BTreeMap<(OdsCode, Section), u64> = BTreeMap::new();
    let mut hidden: BTreeMap<Section, usize> = BTreeMap::new();
    for stored_item in stored {
        *held
            .entry((stored_item.publisher.clone(), stored_item.item.section))
            .or_default() += 1;
        let decision = policy::decide_view(
            &stored_item.publisher,
            &viewer.ods,
            &consent,
            break_glass.is_some(),
        );
        if !decision.shown() {
            *hidden.entry(stored_item.item.section).or_default() += 1;
            continue;
        }
        let publisher = stored_item.publisher.to_string();
        *items_per_source.entry(publisher.clone()).or_default() += 1;
        by_section
            .entry(stored_item.item.section)
            .or_default()
            .push((publisher, stored_item.item, decision));
    }
    let withheld = withheld_by_sharing_rules(&sharing, &held, &viewer.ods);
    let withheld_sources = sharing
        .iter()
        .filter(|(publisher, _)| **publisher != viewer.ods)
        .filter_map(|(publisher, record)| {
            let reason = record.consent.withholds_everything()?;
            Some(WithheldSource {
                ods: publisher.to_string(),
                name: organisation_name(publisher.as_str()),
                reason: withheld_record_reason(&reason).into(),
            })
        })
        .collect();
    let demographics = by_section
        .remove(&Section::Demographics)
        .and_then(|mut items| {
            // The most recently updated demographics win; the source is always named.
            items.sort_by(|a, b| b.1.last_updated.cmp(&a.1.last_updated));
            let (publisher, item, _) = items.into_iter().next()?;
            let field = |name: &str| item.fields.get(name).cloned();
            Some(Demographics {
                name: field("name"),
                birth_date: field("birth_date"),
                gender: field("gender"),
                registered_gp: field("registered_gp"),
                source: organisation_name(&publisher),
            })
        });
    let sections = Section::ALL
        .iter()
        .filter(|s| s.is_clinical() && **s != Section::Demographics)
        .map(|section| {
            let mut items: Vec<ItemView> = by_section
                .remove(section)
                .unwrap_or_default()
                .into_iter()
                .map(|(publisher, item, shown_by)| ItemView {
                    code: item.code.as_ref().and_then(|c| c.code.clone()),
                    title: item.title,
                    detail: item.detail,
                    status: item.status,
                    effective: item.effective,
                    recorded: item.recorded,
                    last_updated: item.last_updated,
                    data_class: item.class,
                    source: ItemSource {
                        organisation_name: organisation_name(&publisher),
                        organisation: publisher,
                        system: item.source_system,
                        resource: item.source_id,
                    },
                    shown_by,
                })
                .collect();
            items.sort_by(|a, b| {
                b.effective
                    .cmp(&a.effective)
                    .then_with(|| a.title.cmp(&b.title))
            });
            SectionView {
                section: *section,
                title: section.title(),
                count: items.len(),
                entries: group_entries(*section, &items),
                items,
                withheld_by_sharing_rules: withheld.get(section).copied().unwrap_or(0),
                hidden_without_share_in: hidden.get(section).copied().unwrap_or(0),
            }
        })
        .collect();
    let sources = items_per_source
        .into_iter()
        .map(|(ods, items)| {
            let row = sources.get(&ods);
            SourceView {
                name: organisation_name(&ods),
                kind: row.map(|r| r.kind.clone()).unwrap_or_default(),
                source_system: row.map(|r| r.source_system.clone()).unwrap_or_default(),
                feed: row.map(|r| r.feed.clone()).unwrap_or_default(),
                data_as_of: row
                    .map(|r| clock::rfc3339(r.data_as_of))
                    .unwrap_or_default(),
                data_as_of_unix: row.map(|r| r.data_as_of).unwrap_or_default(),
                expected_refresh_hours: row.and_then(|r| r.expected_refresh_hours),
                stale: row.is_some_and(|r| r.is_stale(now)),
                ods,
                items,
            }
        })
        .collect();
    Ok(Some(Record {
        nhs_number: nhs.to_string(),
        nhs_number_formatted: nhs.formatted(),
        demographics,
        sections,
        sources,
        assembled_at: clock::rfc3339(now),
        share_in: consent.share_in,
        break_glass,
        hidden_without_share_in: hidden.values().sum(),
        withheld_sources,
    }))
}

/// Per section: what other publishers state they hold about the patient, less what this
/// node holds from them. Never negative: a publisher's newer items may arrive before its
/// newer sharing record.
fn withheld_by_sharing_rules(
    sharing: &BTreeMap<OdsCode, SharingRecord>,
    held: &BTreeMap<(OdsCode, Section), u64>,
    viewer: &OdsCode,
) -> BTreeMap<Section, u64> {
    let mut withheld: BTreeMap<Section, u64> = BTreeMap::new();
    for (publisher, record) in sharing.iter().filter(|(p, _)| *p != viewer) {
        for (section, stated) in &record.items_per_section {
            let have = held
                .get(&(publisher.clone(), *section))
                .copied()
                .unwrap_or(0);
            *withheld.entry(*section).or_default() += stated.saturating_sub(have);
        }
    }
    withheld
}

fn withheld_record_reason(reason: &WithholdReason) -> &'static str {
    match reason {
        WithholdReason::Objection => "the patient objected to sharing this organisation's record",
        _ => "the patient chose not to share this organisation's record (Share Out off)",
    }
}

/// The record as plain text, for `caremesh record`.
pub fn render_text(record: &Record) -> String {
    let mut out = String::new();
    let demographics = record.demographics.as_ref();
    out.push_str(&format!(
        "{}  NHS number {}\n",
        demographics
            .and_then(|d| d.name.clone())
            .unwrap_or_else(|| "(name not held)".into()),
        record.nhs_number_formatted
    ));
    if let Some(d) = demographics {
        out.push_str(&format!(
            "Born {}  Gender {}  Registered GP {}\n",
            d.birth_date
                .as_deref()
                .map(clock::uk_date)
                .unwrap_or_else(|| "-".into()),
            d.gender.as_deref().unwrap_or("-"),
            d.registered_gp.as_deref().unwrap_or("-")
        ));
    }
    out.push_str("\nSources:\n");
    for source in &record.sources {
        out.push_str(&format!(
            "  {} ({}, {}) - {} feed from {}, data as of {} - {} items\n",
            source.name,
            source.ods,
            source.kind,
            source.feed,
            source.source_system,
            clock::uk_date_time(source.data_as_of_unix),
            source.items
        ));
    }
    if let Some(granted) = &record.break_glass {
        out.push_str(&format!(
            "\nEMERGENCY ACCESS (break-glass) by {} until {}: {}\n",
            granted.clinician,
            clock::uk_date_time(granted.expires_at),
            granted.reason
        ));
    } else if record.hidden_without_share_in > 0 {
        out.push_str(&format!(
            "\n{} from other organisations not shown: Share In is not recorded here\n",
            items_phrase(record.hidden_without_share_in)
        ));
    }
    for source in &record.withheld_sources {
        out.push_str(&format!(
            "No data from {} is shown: {}\n",
            source.name, source.reason
        ));
    }
    for section in &record.sections {
        out.push_str(&format!("\n{} ({})\n", section.title, section.count));
        if section.withheld_by_sharing_rules > 0 {
            out.push_str(&format!(
                "  {} withheld by sharing rules\n",
                items_phrase(section.withheld_by_sharing_rules as usize)
            ));
        }
        for item in &section.items {
            let date = item
                .effective
                .as_deref()
                .map(clock::uk_date)
                .unwrap_or_else(|| "date not recorded".into());
            out.push_str(&format!("  {date:<12} {}", item.title));
            if let Some(detail) = &item.detail {
                out.push_str(&format!(" - {}", detail.replace('\n', " ")));
            }
            out.push_str(&format!("  [{}]\n", item.source.organisation_name));
        }
    }
    out
}

/// "1 item", "3 items".
pub fn items_phrase(count: usize) -> String {
    if count == 1 {
        "1 item".into()
    } else {
        format!("{count} items")
    }
}

#[cfg(test)]
mod grouping_tests {
    use super::*;

    fn item(
        title: &str,
        code: Option<&str>,
        effective: &str,
        ods: &str,
        class: DataClass,
    ) -> ItemView {
        ItemView {
            title: title.into(),
            code: code.map(str::to_string),
            detail: None,
            status: None,
            effective: Some(effective.into()),
            recorded: None,
            last_updated: None,
            data_class: class,
            source: ItemSource {
                organisation: ods.into(),
                organisation_name: ods.into(),
                system: "test".into(),
                resource: format!("X/{title}"),
            },
            shown_by: ViewDecision::Own,
        }
    }

    #[test]
    fn one_fact_from_several_sources_is_one_entry_listing_each() {
        let items = [
            item(
                "Atorvastatin 20mg",
                Some("320000"),
                "2024-01-01",
                "RTH",
                DataClass::Coded,
            ),
            item(
                "Atorvastatin 20mg tablets",
                Some("320000"),
                "2019-05-01",
                "A81001",
                DataClass::Coded,
            ),
            item(
                "Amlodipine",
                Some("319283"),
                "2018-01-01",
                "A81001",
                DataClass::Coded,
            ),
            item(
                "Note: atorvastatin",
                Some("320000"),
                "2019-05-01",
                "A81001",
                DataClass::FreeText,
            ),
        ];
        let entries = group_entries(Section::Medications, &items);
        assert_eq!(
            entries.len(),
            3,
            "a narrative stays apart from the coded fact"
        );
        assert_eq!(entries[0].items, vec![0, 1]);
        assert_eq!(
            entries[0].sources,
            vec!["RTH".to_string(), "A81001".to_string()]
        );
        assert_eq!(entries[0].effective.as_deref(), Some("2024-01-01"));
    }

    #[test]
    fn the_same_test_on_another_day_is_another_result() {
        let items = [
            item(
                "Serum potassium",
                Some("1000"),
                "2024-02-01T10:00:00Z",
                "RTH",
                DataClass::Coded,
            ),
            item(
                "Serum potassium",
                Some("1000"),
                "2024-02-01T11:00:00Z",
                "A81001",
                DataClass::Coded,
            ),
            item(
                "Serum potassium",
                Some("1000"),
                "2023-07-01",
                "A81001",
                DataClass::Coded,
            ),
            item(
                "Clinic letter",
                None,
                "2023-07-01",
                "RTH",
                DataClass::Document,
            ),
            item(
                "clinic letter ",
                None,
                "2023-07-01",
                "A81001",
                DataClass::Document,
            ),
        ];
        let entries = group_entries(Section::Results, &items);
        let grouped: Vec<Vec<usize>> = entries.into_iter().map(|e| e.items).collect();
        assert_eq!(grouped, vec![vec![0, 1], vec![2], vec![3, 4]]);
    }
}
