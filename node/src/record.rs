//! The joined-up record as the view shows it, assembled from the local read model only.

use crate::clock;
use caremesh_storage::{SourceRow, StorageError, Store};
use caremesh_sync::{DataClass, Item, NhsNumber, Section};
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Serialize)]
pub struct Record {
    pub nhs_number: String,
    pub nhs_number_formatted: String,
    pub demographics: Option<Demographics>,
    pub sections: Vec<SectionView>,
    pub sources: Vec<SourceView>,
    /// When this view was assembled (the node's clock).
    pub assembled_at: String,
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
    pub items: usize,
}

/// Assembles the record, or `None` when this node holds nothing about the patient.
pub fn assemble(store: &Store, nhs: &NhsNumber, now: i64) -> Result<Option<Record>, StorageError> {
    // Sharing records are consent state for policy, not part of the clinical record: a node
    // holding only those about a patient holds no record of them.
    let stored: Vec<_> = store
        .patient_items(nhs)?
        .into_iter()
        .filter(|s| s.item.section != Section::Sharing)
        .collect();
    if stored.is_empty() {
        return Ok(None);
    }
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
    let mut by_section: BTreeMap<Section, Vec<(String, Item)>> = BTreeMap::new();
    let mut items_per_source: BTreeMap<String, usize> = BTreeMap::new();
    for stored_item in stored {
        let publisher = stored_item.publisher.to_string();
        *items_per_source.entry(publisher.clone()).or_default() += 1;
        by_section
            .entry(stored_item.item.section)
            .or_default()
            .push((publisher, stored_item.item));
    }
    let demographics = by_section
        .remove(&Section::Demographics)
        .and_then(|mut items| {
            // The most recently updated demographics win; the source is always named.
            items.sort_by(|a, b| b.1.last_updated.cmp(&a.1.last_updated));
            let (publisher, item) = items.into_iter().next()?;
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
        .filter(|s| !matches!(s, Section::Demographics | Section::Sharing))
        .map(|section| {
            let mut items: Vec<ItemView> = by_section
                .remove(section)
                .unwrap_or_default()
                .into_iter()
                .map(|(publisher, item)| ItemView {
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
                items,
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
    }))
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
    for section in &record.sections {
        out.push_str(&format!("\n{} ({})\n", section.title, section.count));
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
