//! The joined-up record as the view shows it, assembled from the local read model only.

use crate::identity::{self, Conflict, Demographics};
use caremesh_fhir::clock;
use caremesh_fhir::reading::{self, Reading, Standing};
use caremesh_storage::{BreakGlass, SourceRow, StorageError, Store, StoredItem};
use caremesh_sync::policy::{self, Consent, SharingRecord, ViewDecision, WithholdReason};
use caremesh_sync::{DataClass, Item, NhsNumber, OdsCode, Section, moved};
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
    /// Keys the trust registry in force revoked (compromised or withdrawn for cause), with
    /// the organisation each was revoked for: what they signed is not shown.
    pub revoked_signers: BTreeMap<[u8; 32], OdsCode>,
}

#[derive(Debug, Serialize)]
pub struct Record {
    pub nhs_number: String,
    pub nhs_number_formatted: String,
    /// The banner: this organisation's own demographics, else the registered GP's.
    pub demographics: Option<Demographics>,
    /// Where sources disagree on name, date of birth, gender or death: each one's version.
    pub demographic_conflicts: Vec<Conflict>,
    /// Entries their publishers moved to or from this record, having filed them against
    /// the wrong patient.
    pub corrections: Vec<Correction>,
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
    /// Organisations whose entries held here are not shown because the key that signed them
    /// was revoked, or their signature does not read.
    pub unverified_sources: Vec<UnverifiedSource>,
    /// Each shown source's Patient resource, banner's source first, for the FHIR API. Not
    /// part of the JSON API, whose banner and conflicts say what they hold.
    #[serde(skip)]
    pub patients: Vec<SourcedPatient>,
}

/// One organisation's Patient resource for this patient, as shown to this viewer.
#[derive(Debug)]
pub struct SourcedPatient {
    pub ods: String,
    pub system: String,
    /// `Patient/id` at the publisher.
    pub source_id: String,
    pub resource: serde_json::Value,
    pub confidentiality: Option<String>,
}

/// Entries of one organisation held here but not shown: nothing vouches for them any more.
#[derive(Debug, Serialize)]
pub struct UnverifiedSource {
    pub ods: String,
    pub name: String,
    /// Entries not shown.
    pub items: usize,
    pub reason: &'static str,
}

impl UnverifiedSource {
    /// What the clinician is told, in full.
    pub fn notice(&self) -> String {
        format!(
            "{} from {} ({}) {} not shown: {}. Ask {} to publish them again, and confirm anything you need with them directly.",
            items_phrase(self.items),
            self.name,
            self.ods,
            if self.items == 1 { "is" } else { "are" },
            self.reason,
            self.name
        )
    }
}

const REVOKED_SIGNER: &str =
    "the regional authority revoked the key that signed them, so they may not be genuine";
const UNREADABLE_SIGNATURE: &str = "their signature could not be read from this node's storage";

/// An entry its publisher moved between this record and another patient's.
#[derive(Debug, Serialize)]
pub struct Correction {
    /// "away" (the entry left this record) or "here" (it came to this record).
    pub direction: &'static str,
    /// What the view says, naming the organisation, the entry, its section and when.
    pub text: String,
}

impl Correction {
    fn of(item: &Item, organisation: &str) -> Option<Correction> {
        let (direction, at, text) = if let Some(at) = item.fields.get(moved::AWAY) {
            ("away", at, "from this record to another patient's record")
        } else if let Some(at) = item.fields.get(moved::HERE) {
            ("here", at, "to this record from another patient's record")
        } else {
            return None;
        };
        Some(Correction {
            direction,
            text: format!(
                "{organisation} moved \u{201c}{}\u{201d} ({}) {text} on {}.",
                item.title,
                item.section.title(),
                clock::uk_when(at)
            ),
        })
    }
}

#[derive(Debug, Serialize)]
pub struct WithheldSource {
    pub ods: String,
    pub name: String,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct SectionView {
    pub section: Section,
    pub title: &'static str,
    /// Versions held and shown: one per source's item.
    pub count: usize,
    /// What must be seen before the entries, such as "no known allergies" recorded beside
    /// a current allergy.
    pub warnings: Vec<String>,
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
    /// Where the fact stands: the most current any source gives it (a problem one source
    /// records as active and another as resolved is listed as current, each version shown).
    pub standing: Standing,
    /// Warnings any version carries, each once.
    pub warnings: Vec<String>,
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

/// What makes two items the same fact: their reading's identity (code and words; for
/// medicines product and dose; for results test, time and value) and their class (a coded
/// fact and a narrative about it stay apart).
fn fact_key(item: &ItemView) -> (String, DataClass) {
    (item.reading.identity.clone(), item.data_class)
}

/// Groups a section's items (sorted newest first) into entries, keeping that order.
pub fn group_entries(items: &[ItemView]) -> Vec<EntryView> {
    let mut entries: Vec<EntryView> = Vec::new();
    let mut by_key: std::collections::HashMap<(String, DataClass), usize> =
        std::collections::HashMap::new();
    for (index, item) in items.iter().enumerate() {
        if item.note_of.is_some() {
            continue;
        }
        let key = fact_key(item);
        match by_key.get(&key) {
            Some(&entry) => {
                let entry = &mut entries[entry];
                entry.items.push(index);
                entry.standing = entry.standing.min(item.reading.standing);
                for warning in &item.reading.warnings {
                    if !entry.warnings.contains(warning) {
                        entry.warnings.push(warning.clone());
                    }
                }
                if !entry.sources.contains(&item.source.organisation) {
                    entry.sources.push(item.source.organisation.clone());
                }
            }
            None => {
                by_key.insert(key, entries.len());
                entries.push(EntryView {
                    title: item.reading.title.clone(),
                    standing: item.reading.standing,
                    warnings: item.reading.warnings.clone(),
                    code: item.code.clone(),
                    effective: item.reading.date.clone().or(item.effective.clone()),
                    items: vec![index],
                    sources: vec![item.source.organisation.clone()],
                });
            }
        }
    }
    debug_assert_eq!(
        entries.iter().map(|e| e.items.len()).sum::<usize>(),
        items.iter().filter(|i| i.note_of.is_none()).count(),
        "every item but the notes read with their fact is in exactly one entry"
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
    /// What a clinician reads of it, rendered from the source resource.
    pub reading: Reading,
    /// For a narrative note shown with its coded fact: that fact's source resource. Such a
    /// note is in no entry of its own; its text is a detail of the fact's reading.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note_of: Option<String>,
    /// The source resource as its publisher holds it (normalised, without narrative), for
    /// the FHIR API (`fhir_api`); `None` for notes and items without one. Not part of the
    /// JSON API, which serves readings.
    #[serde(skip)]
    pub resource: Option<serde_json::Value>,
    /// The publisher's confidentiality label (HL7 v3 Confidentiality), for the FHIR API.
    #[serde(skip)]
    pub confidentiality: Option<String>,
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
    // Sharing records are consent state for policy (and access records, which the store
    // does not return here, are audit), not part of the clinical record: a node holding only
    // those about a patient holds no record.
    let (sharing, stored): (Vec<StoredItem>, Vec<StoredItem>) = store
        .patient_items(nhs)?
        .into_iter()
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
    let sources = Sources(
        store
            .sources()?
            .into_iter()
            .map(|s| (s.publisher.clone(), s))
            .collect(),
    );
    let mut sorted = Sorted::default();
    for stored_item in stored {
        sorted.admit(
            store,
            stored_item,
            viewer,
            &consent,
            break_glass.is_some(),
            &sources,
        )?;
    }
    let withheld = withheld_by_sharing_rules(&sharing, &sorted.held, &viewer.ods);
    let withheld_sources = sharing
        .iter()
        .filter(|(publisher, _)| **publisher != viewer.ods)
        .filter_map(|(publisher, record)| {
            let reason = record.consent.withholds_everything()?;
            Some(WithheldSource {
                ods: publisher.to_string(),
                name: sources.name(publisher.as_str()),
                reason: withheld_record_reason(&reason).into(),
            })
        })
        .collect();
    let demographics = sorted
        .by_section
        .remove(&Section::Demographics)
        .unwrap_or_default();
    let mut patients: Vec<SourcedPatient> = demographics
        .iter()
        .filter_map(|(publisher, item, _)| {
            Some(SourcedPatient {
                ods: publisher.clone(),
                system: item.source_system.clone(),
                source_id: item.source_id.clone(),
                resource: item.resource.clone()?,
                confidentiality: item.confidentiality.clone(),
            })
        })
        .collect();
    let identified = identify_patient(demographics, &sources, viewer, now);
    if let Some(banner) = &identified.demographics {
        // Stable: the banner's source first, then as held.
        patients.sort_by_key(|p| p.ods != banner.source_ods);
    }
    let sections = Section::ALL
        .iter()
        .filter(|s| s.is_clinical() && **s != Section::Demographics)
        .map(|section| {
            let held = sorted.by_section.remove(section).unwrap_or_default();
            let mut view = section_view(*section, held, &sources);
            view.withheld_by_sharing_rules = withheld.get(section).copied().unwrap_or(0);
            view.hidden_without_share_in = sorted.hidden.get(section).copied().unwrap_or(0);
            view
        })
        .collect();
    let source_views = sorted
        .items_per_source
        .into_iter()
        .map(|(ods, items)| sources.view(ods, items, now))
        .collect();
    Ok(Some(Record {
        nhs_number: nhs.to_string(),
        nhs_number_formatted: nhs.formatted(),
        demographics: identified.demographics,
        demographic_conflicts: identified.conflicts,
        corrections: sorted.corrections,
        sections,
        sources: source_views,
        assembled_at: clock::rfc3339(now),
        share_in: consent.share_in,
        break_glass,
        hidden_without_share_in: sorted.hidden.values().sum(),
        withheld_sources,
        unverified_sources: sorted
            .unverified
            .into_iter()
            .map(|((ods, reason), items)| UnverifiedSource {
                name: sources.name(ods.as_str()),
                ods: ods.to_string(),
                items,
                reason,
            })
            .collect(),
        patients,
    }))
}

/// The sources this node knows, by ODS code.
struct Sources(BTreeMap<String, SourceRow>);

impl Sources {
    /// The organisation's name where known, else its code.
    fn name(&self, ods: &str) -> String {
        self.0
            .get(ods)
            .map(|s| s.name.clone())
            .unwrap_or_else(|| ods.to_string())
    }

    fn kind(&self, ods: &str) -> &str {
        self.0.get(ods).map(|s| s.kind.as_str()).unwrap_or("")
    }

    /// What the view says of a source that contributed `items` entries.
    fn view(&self, ods: String, items: usize, now: i64) -> SourceView {
        let row = self.0.get(&ods);
        SourceView {
            name: self.name(&ods),
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
    }
}

/// A patient's items sorted by the rules of viewing: what is shown, by section, and what is
/// counted instead (hidden without Share In, from an unvouched signer).
#[derive(Default)]
struct Sorted {
    by_section: BTreeMap<Section, Vec<(String, Item, ViewDecision)>>,
    items_per_source: BTreeMap<String, usize>,
    /// Items held per publisher and section, whatever the viewer sees: what sharing rules
    /// withheld is the publisher's stated count less these.
    held: BTreeMap<(OdsCode, Section), u64>,
    hidden: BTreeMap<Section, usize>,
    unverified: BTreeMap<(OdsCode, &'static str), usize>,
    /// The signer of each document read so far (only for publishers with a revoked key).
    signers: BTreeMap<caremesh_sync::DocId, Option<[u8; 32]>>,
    corrections: Vec<Correction>,
}

impl Sorted {
    /// Files one held item where the view rules put it.
    fn admit(
        &mut self,
        store: &Store,
        stored_item: StoredItem,
        viewer: &Viewer,
        consent: &Consent,
        break_glass: bool,
        sources: &Sources,
    ) -> Result<(), StorageError> {
        if let Some(reason) = self.unvouched(store, &stored_item, viewer)? {
            if !stored_item.item.is_moved_away_notice() && !stored_item.item.id.ends_with("#note") {
                *self
                    .unverified
                    .entry((stored_item.publisher.clone(), reason))
                    .or_default() += 1;
            }
            return Ok(());
        }
        *self
            .held
            .entry((stored_item.publisher.clone(), stored_item.item.section))
            .or_default() += 1;
        let decision =
            policy::decide_view(&stored_item.publisher, &viewer.ods, consent, break_glass);
        if !decision.shown() {
            *self.hidden.entry(stored_item.item.section).or_default() += 1;
            return Ok(());
        }
        let publisher = stored_item.publisher.to_string();
        // A note travels with its fact: one correction per moved entry.
        if !stored_item.item.id.ends_with("#note")
            && let Some(correction) = Correction::of(&stored_item.item, &sources.name(&publisher))
        {
            self.corrections.push(correction);
        }
        if stored_item.item.is_moved_away_notice() {
            return Ok(()); // a notice, not an entry
        }
        *self.items_per_source.entry(publisher.clone()).or_default() += 1;
        self.by_section
            .entry(stored_item.item.section)
            .or_default()
            .push((publisher, stored_item.item, decision));
        Ok(())
    }

    /// Why another organisation's item is not vouched for, if it is not: it is shown only
    /// while a key the registry has not revoked vouches for it. The viewing organisation's
    /// own entries come from its own extract, whatever becomes of its key. Only publishers
    /// with a revoked key have their documents' signers read (past each document's
    /// snapshot): none, almost always.
    fn unvouched(
        &mut self,
        store: &Store,
        stored_item: &StoredItem,
        viewer: &Viewer,
    ) -> Result<Option<&'static str>, StorageError> {
        let has_revoked_key = viewer
            .revoked_signers
            .values()
            .any(|ods| *ods == stored_item.publisher);
        if stored_item.publisher == viewer.ods || !has_revoked_key {
            return Ok(None);
        }
        let signer = match self.signers.get(&stored_item.doc_id) {
            Some(signer) => *signer,
            None => {
                let signer = store.document_signer(stored_item.doc_id)?;
                self.signers.insert(stored_item.doc_id, signer);
                signer
            }
        };
        Ok(match signer {
            None => Some(UNREADABLE_SIGNATURE),
            Some(key) => viewer
                .revoked_signers
                .contains_key(&key)
                .then_some(REVOKED_SIGNER),
        })
    }
}

/// The banner: the patient's demographics as each source gives them, reconciled for the
/// viewer ([`identity::identify`]), with a registered GP given only by ODS code named when
/// it is one of the sources.
fn identify_patient(
    demographics: Vec<(String, Item, ViewDecision)>,
    sources: &Sources,
    viewer: &Viewer,
    now: i64,
) -> identity::Identity {
    let versions = demographics
        .into_iter()
        .map(|(publisher, item, _)| {
            identity::version_of(
                &item,
                &publisher,
                &sources.name(&publisher),
                sources.kind(&publisher),
            )
        })
        .collect();
    let today = clock::rfc3339(now);
    let mut identified = identity::identify(versions, viewer.ods.as_str(), &today[..10]);
    if let Some(gp) = identified
        .demographics
        .as_mut()
        .and_then(|d| d.registered_gp.as_mut())
        && let Some(row) = sources.0.get(gp.as_str())
    {
        *gp = format!("{} ({})", row.name, row.publisher);
    }
    identified
}

/// One clinical section as the view shows it: each shown item read, notes with their facts,
/// newest first, grouped into entries, with the section's warnings. What was withheld or
/// hidden is for the caller to count in.
fn section_view(
    section: Section,
    held: Vec<(String, Item, ViewDecision)>,
    sources: &Sources,
) -> SectionView {
    let notes = notes_with_their_fact(&held);
    let mut items: Vec<ItemView> = held
        .into_iter()
        .map(|(publisher, item, shown_by)| item_view(publisher, item, shown_by, &notes, sources))
        .collect();
    sort_newest_first(&mut items);
    let entries = group_entries(&items);
    SectionView {
        section,
        title: section.title(),
        count: items.iter().filter(|i| i.note_of.is_none()).count(),
        warnings: section_warnings(section, &items, &entries),
        entries,
        items,
        withheld_by_sharing_rules: 0,
        hidden_without_share_in: 0,
    }
}

/// One item as the view shows it: its reading, and its note when the note belongs to it.
fn item_view(
    publisher: String,
    item: Item,
    shown_by: ViewDecision,
    notes: &BTreeMap<(String, String), String>,
    sources: &Sources,
) -> ItemView {
    let mut reading = reading::read(&item);
    let key = (publisher.clone(), item.source_id.clone());
    let note_of =
        (item.id.ends_with("#note") && notes.contains_key(&key)).then(|| item.source_id.clone());
    if note_of.is_none()
        && let Some(note) = notes.get(&key)
    {
        reading.details.push(reading::Detail {
            label: "Note",
            value: note.clone(),
        });
    }
    ItemView {
        note_of,
        resource: item.resource,
        confidentiality: item.confidentiality,
        code: item.code.as_ref().and_then(|c| c.code.clone()),
        title: item.title,
        detail: item.detail,
        status: item.status,
        effective: item.effective,
        recorded: item.recorded,
        last_updated: item.last_updated,
        data_class: item.class,
        source: ItemSource {
            organisation_name: sources.name(&publisher),
            organisation: publisher,
            system: item.source_system,
            resource: item.source_id,
        },
        shown_by,
        reading,
    }
}

/// The narrative notes of a section's items, keyed by (publisher, source resource), for the
/// notes whose coded item is also shown: a note is read with its fact, not as an entry of
/// its own. It stays an item (it is held and shown, and the audit and the API account for
/// it), marked with what it belongs to.
fn notes_with_their_fact(
    items: &[(String, Item, ViewDecision)],
) -> BTreeMap<(String, String), String> {
    let bases: std::collections::BTreeSet<(&str, &str)> = items
        .iter()
        .filter(|(_, item, _)| !item.id.ends_with("#note"))
        .map(|(publisher, item, _)| (publisher.as_str(), item.source_id.as_str()))
        .collect();
    items
        .iter()
        .filter(|(publisher, item, _)| {
            item.id.ends_with("#note")
                && bases.contains(&(publisher.as_str(), item.source_id.as_str()))
        })
        .map(|(publisher, item, _)| {
            (
                (publisher.clone(), item.source_id.clone()),
                item.detail.clone().unwrap_or_default(),
            )
        })
        .collect()
}

/// Newest first by when each fact started or happened, in real time (an instant late on
/// 30 June UTC sorts after 30 June); undated last, then by title.
fn sort_newest_first(items: &mut [ItemView]) {
    items.sort_by_cached_key(|item| {
        let when = item
            .reading
            .date
            .as_deref()
            .or(item.effective.as_deref())
            .and_then(clock::sort_key);
        (std::cmp::Reverse(when), item.reading.title.clone())
    });
}

/// Warnings for a whole section: "no known allergies" recorded beside a current allergy
/// contradicts it, whichever sources recorded each.
fn section_warnings(section: Section, items: &[ItemView], entries: &[EntryView]) -> Vec<String> {
    if section != Section::Allergies {
        return Vec::new();
    }
    let live = |standing: Standing| matches!(standing, Standing::Current | Standing::NotStated);
    let mut negations = Vec::new();
    let mut allergies = Vec::new();
    for entry in entries.iter().filter(|e| live(e.standing)) {
        let first = &items[entry.items[0]];
        if first.reading.negation {
            negations.push(format!(
                "{} ({})",
                entry.title, first.source.organisation_name
            ));
        } else {
            allergies.push(format!(
                "{} ({})",
                entry.title, first.source.organisation_name
            ));
        }
    }
    if negations.is_empty() || allergies.is_empty() {
        return Vec::new();
    }
    vec![format!(
        "Conflict: {} is recorded, but so is an allergy: {}. Check with the patient and the sources before prescribing.",
        negations.join(", "),
        allergies.join(", ")
    )]
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

/// The record as plain text, for `caremesh record`: the same readings the page shows.
/// The record as text for a terminal: every line's control characters shown, not obeyed
/// (names and notes come from other organisations' systems).
pub fn render_text(record: &Record) -> String {
    render_text_unescaped(record)
        .lines()
        .map(|line| clock::printable(line) + "\n")
        .collect()
}

fn render_text_unescaped(record: &Record) -> String {
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
            "Born {}{}  Gender {}  Postcode {}\nRegistered GP {}{}\nDemographics from {} ({})\n",
            d.birth_date
                .as_deref()
                .map(clock::uk_date)
                .unwrap_or_else(|| "-".into()),
            d.age
                .as_deref()
                .map(|a| format!(" ({a})"))
                .unwrap_or_default(),
            d.gender.as_deref().unwrap_or("-"),
            d.postcode.as_deref().unwrap_or("-"),
            d.registered_gp.as_deref().unwrap_or("not recorded"),
            d.registered_gp_source
                .as_deref()
                .map(|s| format!(" (from {s})"))
                .unwrap_or_default(),
            d.source,
            d.chosen_because,
        ));
        if let Some(deceased) = &d.deceased {
            out.push_str(&format!("DECEASED {}\n", deceased_phrase(deceased)));
        }
    }
    for conflict in &record.demographic_conflicts {
        out.push_str(&format!(
            "WARNING: sources disagree on {}: {}\n",
            conflict.field.to_lowercase(),
            conflict
                .versions
                .iter()
                .map(|(source, value)| format!("{source} says {value}"))
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    for correction in &record.corrections {
        out.push_str(&format!("CORRECTION: {}\n", correction.text));
    }
    out.push_str("\nSources:\n");
    for source in &record.sources {
        out.push_str(&format!(
            "  {} ({}, {}) - {} feed from {}, data as of {} - {} items{}\n",
            source.name,
            source.ods,
            source.kind,
            source.feed,
            source.source_system,
            clock::uk_date_time(source.data_as_of_unix),
            source.items,
            if source.stale { " - OUT OF DATE" } else { "" }
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
    for source in &record.unverified_sources {
        out.push_str(&format!("WARNING: {}\n", source.notice()));
    }
    for section in &record.sections {
        out.push_str(&format!(
            "\n{} ({})\n",
            section.title,
            section.count_phrase()
        ));
        for warning in &section.warnings {
            out.push_str(&format!("  WARNING: {warning}\n"));
        }
        if section.withheld_by_sharing_rules > 0 {
            out.push_str(&format!(
                "  {} withheld by sharing rules\n",
                items_phrase(section.withheld_by_sharing_rules as usize)
            ));
        }
        for (heading, entries) in section.by_standing() {
            if let Some(heading) = heading {
                out.push_str(&format!("  {heading}:\n"));
            }
            for series in section.series(&entries) {
                if series.len() > 1 {
                    out.push_str(&format!(
                        "  {} ({} results, latest first):\n",
                        series[0].title,
                        series.len()
                    ));
                }
                for entry in series {
                    render_entry_text(&mut out, section, entry);
                }
            }
        }
    }
    out
}

fn render_entry_text(out: &mut String, section: &SectionView, entry: &EntryView) {
    let date = entry
        .effective
        .as_deref()
        .map(clock::uk_date)
        .unwrap_or_else(|| "undated".into());
    out.push_str(&format!("    {date:<12} {}", entry.title));
    if entry.items.len() > 1 {
        out.push_str(&format!(" ({})", entry.versions_phrase(section)));
    }
    out.push('\n');
    for warning in &entry.warnings {
        out.push_str(&format!("                 ! {warning}\n"));
    }
    for &index in &entry.items {
        let item = &section.items[index];
        let mut line = format!("from {}", item.source.organisation_name);
        if let Some(status) = &item.reading.status {
            line.push_str(&format!(" [{status}]"));
        }
        if item.reading.title != entry.title {
            line.push_str(&format!(" {}", item.reading.title));
        }
        let details = item.reading.details_line();
        if !details.is_empty() {
            line.push_str(&format!(": {}", details.replace('\n', " ")));
        }
        out.push_str(&format!("                 - {line}\n"));
    }
}

/// "deceased 10-Feb-2026", or with no date given, "(date not recorded)".
pub fn deceased_phrase(deceased: &str) -> String {
    if deceased.is_empty() {
        "(date not recorded)".into()
    } else {
        clock::uk_when(deceased)
    }
}

impl SectionView {
    /// "12" when each entry is one version, else "12 entries, 57 versions".
    pub fn count_phrase(&self) -> String {
        if self.entries.len() == self.count {
            self.count.to_string()
        } else {
            format!("{} entries, {} versions", self.entries.len(), self.count)
        }
    }

    /// Results grouped into one series per test (by code, else by name), each latest
    /// first, the series in order of their latest result; other sections one entry a group.
    pub fn series<'s>(&self, entries: &[&'s EntryView]) -> Vec<Vec<&'s EntryView>> {
        if self.section != Section::Results {
            return entries.iter().map(|e| vec![*e]).collect();
        }
        let mut series: Vec<Vec<&EntryView>> = Vec::new();
        let mut by_test: BTreeMap<String, usize> = BTreeMap::new();
        for entry in entries {
            let test = entry
                .code
                .clone()
                .unwrap_or_else(|| entry.title.to_lowercase());
            match by_test.get(&test) {
                Some(&at) => series[at].push(entry),
                None => {
                    by_test.insert(test, series.len());
                    series.push(vec![entry]);
                }
            }
        }
        series
    }

    /// Entries grouped for reading: for sections of states, current (with those whose
    /// status is not stated, marked), then past, then refuted; events as one list.
    pub fn by_standing(&self) -> Vec<(Option<&'static str>, Vec<&EntryView>)> {
        let of = |wanted: &[Standing]| -> Vec<&EntryView> {
            self.entries
                .iter()
                .filter(|e| wanted.contains(&e.standing))
                .collect()
        };
        let events = of(&[Standing::Event]);
        let current = of(&[Standing::Current, Standing::NotStated]);
        let past = of(&[Standing::Past]);
        let refuted = of(&[Standing::Refuted]);
        if current.is_empty() && past.is_empty() && refuted.is_empty() {
            return vec![(None, events)];
        }
        let mut groups = vec![
            (Some(current_heading(self.section)), current),
            (Some(past_heading(self.section)), past),
            (Some("Refuted (recorded as not the case)"), refuted),
        ];
        if !events.is_empty() {
            groups.push((Some("Events"), events));
        }
        groups.retain(|(_, entries)| !entries.is_empty());
        groups
    }
}

fn current_heading(section: Section) -> &'static str {
    match section {
        Section::Medications => "Current medication",
        Section::Problems => "Active problems",
        Section::Allergies => "Current allergies and adverse reactions",
        _ => "Current",
    }
}

fn past_heading(section: Section) -> &'static str {
    match section {
        Section::Medications => "Past medication",
        Section::Problems => "Past problems",
        Section::Allergies => "Resolved or inactive",
        _ => "Past",
    }
}

impl EntryView {
    /// "3 versions from 2 sources", or for one source's repeat issues, "4 issues".
    pub fn versions_phrase(&self, section: &SectionView) -> String {
        let issues = self
            .items
            .iter()
            .all(|&i| section.items[i].reading.standing != Standing::Event)
            && section.section == Section::Medications;
        let noun = if issues { "issues" } else { "versions" };
        if self.sources.len() > 1 {
            format!(
                "{} {noun} from {} sources",
                self.items.len(),
                self.sources.len()
            )
        } else {
            format!("{} {noun}", self.items.len())
        }
    }
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
    use serde_json::{Value, json};

    fn view(ods: &str, class: DataClass, section: Section, resource: Value) -> ItemView {
        let resource_type = resource["resourceType"].as_str().unwrap().to_string();
        let item = Item {
            resource: Some(resource),
            ..Item::titled("x", section, class, &resource_type, "t", "test", "X/1")
        };
        item_view(
            ods.into(),
            item,
            ViewDecision::Own,
            &BTreeMap::new(),
            &Sources(BTreeMap::new()),
        )
    }

    fn medicine(ods: &str, code: &str, text: &str, dose: &str, issued: &str) -> ItemView {
        view(
            ods,
            DataClass::Coded,
            Section::Medications,
            json!({"resourceType": "MedicationRequest", "status": "active", "authoredOn": issued,
                   "medicationCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": code, "display": text}]},
                   "dosageInstruction": [{"text": dose}]}),
        )
    }

    #[test]
    fn one_medicine_and_dose_is_one_entry_and_another_dose_is_another() {
        let items = [
            medicine(
                "RTH",
                "320000",
                "Atorvastatin 20mg tablets",
                "One at night",
                "2024-01-01",
            ),
            medicine(
                "A81001",
                "320000",
                "Atorvastatin 20mg tablets",
                "one at  night",
                "2019-05-01",
            ),
            medicine(
                "A81001",
                "320000",
                "Atorvastatin 20mg tablets",
                "Two at night",
                "2019-01-01",
            ),
            medicine(
                "A81001",
                "319283",
                "Amlodipine 5mg tablets",
                "One daily",
                "2018-01-01",
            ),
        ];
        let entries = group_entries(&items);
        let grouped: Vec<Vec<usize>> = entries.iter().map(|e| e.items.clone()).collect();
        assert_eq!(grouped, vec![vec![0, 1], vec![2], vec![3]]);
        assert_eq!(
            entries[0].sources,
            vec!["RTH".to_string(), "A81001".to_string()]
        );
        assert_eq!(entries[0].effective.as_deref(), Some("2024-01-01"));
    }

    #[test]
    fn allergies_sharing_a_degraded_code_are_never_one_entry() {
        let allergy = |text: &str| {
            view(
                "A81001",
                DataClass::Coded,
                Section::Allergies,
                json!({"resourceType": "AllergyIntolerance",
                       "clinicalStatus": {"coding": [{"code": "active"}]},
                       "code": {"coding": [{"system": "http://snomed.info/sct", "code": "196461000000101",
                                            "display": "Transfer-degraded drug allergy"}], "text": text}}),
            )
        };
        let items = [
            allergy("Septrin"),
            allergy("213020009 | Allergy to egg protein"),
            allergy("Amoxicillin 250mg capsules"),
        ];
        let entries = group_entries(&items);
        let titles: Vec<&str> = entries.iter().map(|e| e.title.as_str()).collect();
        assert_eq!(
            titles,
            [
                "Septrin",
                "213020009 | Allergy to egg protein",
                "Amoxicillin 250mg capsules"
            ]
        );
    }

    #[test]
    fn no_known_allergy_beside_a_current_allergy_is_a_conflict() {
        let nka = view(
            "RTH",
            DataClass::Coded,
            Section::Allergies,
            json!({"resourceType": "AllergyIntolerance", "clinicalStatus": {"coding": [{"code": "active"}]},
                   "code": {"coding": [{"system": "http://snomed.info/sct", "code": "409137002", "display": "No known drug allergy"}]}}),
        );
        let penicillin = view(
            "A81001",
            DataClass::Coded,
            Section::Allergies,
            json!({"resourceType": "AllergyIntolerance", "clinicalStatus": {"coding": [{"code": "active"}]},
                   "code": {"text": "Penicillin"}}),
        );
        let items = [nka, penicillin];
        let entries = group_entries(&items);
        let warnings = section_warnings(Section::Allergies, &items, &entries);
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("No known drug allergy (RTH)")
                && warnings[0].contains("Penicillin (A81001)")
        );
    }

    #[test]
    fn the_same_test_is_one_entry_only_at_the_same_time_with_the_same_value() {
        let potassium = |ods: &str, when: &str, value: f64| {
            view(
                ods,
                DataClass::Coded,
                Section::Results,
                json!({"resourceType": "Observation", "code": {"coding": [{"code": "1000", "display": "Serum potassium"}]},
                       "effectiveDateTime": when, "valueQuantity": {"value": value, "unit": "mmol/L"}}),
            )
        };
        let items = [
            potassium("RTH", "2024-02-01T10:00:00Z", 4.1),
            potassium("A81001", "2024-02-01T10:00:00Z", 4.1),
            potassium("A81001", "2024-02-01T11:00:00Z", 4.1),
            potassium("A81001", "2024-02-01T10:00:00Z", 5.9),
        ];
        let grouped: Vec<Vec<usize>> = group_entries(&items).into_iter().map(|e| e.items).collect();
        assert_eq!(grouped, vec![vec![0, 1], vec![2], vec![3]]);
    }
}
