//! Sharing rules: the decisions every document and every item pass through.
//!
//! Two decision functions, pure and total, each returning its reason:
//!
//! - [`decide`]: may `recipient` *hold* this document? Asked by a publisher before it offers
//!   or sends, by a hub before it forwards, and by a receiver before it stores. Inputs are the
//!   document's metadata, the region's [`Agreements`] (signed inside the trust registry, so
//!   every node enforces the same ones) and [`Facts`] the caller looks up: the publisher's
//!   kind, the patient's consent at the publisher, whether the recipient cares for the patient.
//! - [`decide_view`]: may a viewer at one organisation *see* an item held from another?
//!   Share In at the viewing organisation, or an active break-glass.
//!
//! Deny unless allowed: an unknown publisher, a pair of kinds with no agreement, or a class an
//! agreement does not name is withheld.

use crate::model::{DataClass, DocMeta, OdsCode, OrgKind, Section};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Who a document would go to.
#[derive(Debug, Clone)]
pub struct Recipient {
    pub ods: OdsCode,
    pub kind: OrgKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Send,
    Withhold(WithholdReason),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WithholdReason {
    /// Marked private at the recording organisation: visible only there.
    Private,
    /// The patient objected to sharing for direct care at the publishing organisation.
    Objection,
    /// Share Out is off for the patient at the publishing organisation.
    ShareOutOff,
    /// Sensitive items are withheld unless an agreement names the sensitive class.
    Sensitive,
    /// The trust registry does not list the publisher.
    UnknownPublisher,
    /// No agreement lets this kind of recipient receive from this kind of publisher.
    NoAgreement {
        publisher: OrgKind,
        recipient: OrgKind,
    },
    /// The agreement between the two kinds leaves this class or section out.
    NotAgreed { class: DataClass, section: Section },
    /// The recipient holds only its caseload, and the patient is not on it.
    NotInCaseload,
}

impl std::fmt::Display for WithholdReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WithholdReason::Private => f.write_str("private to the recording organisation"),
            WithholdReason::Objection => f.write_str("the patient objected to sharing"),
            WithholdReason::ShareOutOff => f.write_str("Share Out is off for the patient"),
            WithholdReason::Sensitive => f.write_str("sensitive, and no agreement shares it"),
            WithholdReason::UnknownPublisher => {
                f.write_str("the publisher is not in the trust registry")
            }
            WithholdReason::NoAgreement {
                publisher,
                recipient,
            } => write!(f, "no agreement shares {publisher} data with {recipient}"),
            WithholdReason::NotAgreed { class, section } => {
                write!(f, "the agreement does not share {class} items in {section}")
            }
            WithholdReason::NotInCaseload => {
                f.write_str("the patient is not on the recipient's caseload")
            }
        }
    }
}

/// One agreement: what recipients of some kinds may hold from publishers of one kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agreement {
    pub publisher: OrgKind,
    pub recipients: Vec<OrgKind>,
    /// Classes shared; `sensitive` only where named. `private` can never be shared.
    pub classes: Vec<DataClass>,
    /// Sections left out even for the classes above.
    #[serde(default)]
    pub except_sections: Vec<Section>,
}

/// A region's sharing agreements, signed by the regional authority inside the trust registry.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Agreements {
    #[serde(default)]
    pub agreements: Vec<Agreement>,
    /// Kinds that hold the whole region's shareable data rather than a caseload (an emergency
    /// department, an ambulance service). Hubs always do: they relay.
    #[serde(default)]
    pub region_wide: Vec<OrgKind>,
    /// Per publisher: items dated before this day (`YYYY-MM-DD`) stay at the publisher.
    #[serde(default)]
    pub share_from: BTreeMap<OdsCode, String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AgreementError {
    #[error(
        "an agreement lists `private` among its classes; private items never leave their publisher, remove it"
    )]
    PrivateShared,
    #[error("an agreement names hub as a publisher or recipient; hubs relay and need no agreement")]
    HubAgreement,
    #[error("share_from for {0} is `{1}`, not a YYYY-MM-DD date")]
    ShareFromDate(OdsCode, String),
}

impl Agreements {
    /// Rejects agreements that could never be meant: sharing private items, agreements for
    /// hubs, malformed dates.
    pub fn validate(&self) -> Result<(), AgreementError> {
        for agreement in &self.agreements {
            if agreement.classes.contains(&DataClass::Private) {
                return Err(AgreementError::PrivateShared);
            }
            if agreement.publisher == OrgKind::Hub || agreement.recipients.contains(&OrgKind::Hub) {
                return Err(AgreementError::HubAgreement);
            }
        }
        for (ods, day) in &self.share_from {
            if !is_iso_day(day) {
                return Err(AgreementError::ShareFromDate(ods.clone(), day.clone()));
            }
        }
        Ok(())
    }

    /// Whether some agreement lets recipients of any kind hold sensitive items from this
    /// kind of publisher (a hub may then hold them, to relay).
    fn shares_sensitive_from(&self, publisher: OrgKind) -> bool {
        self.agreements
            .iter()
            .any(|a| a.publisher == publisher && a.classes.contains(&DataClass::Sensitive))
    }

    fn between(&self, publisher: OrgKind, recipient: OrgKind) -> impl Iterator<Item = &Agreement> {
        self.agreements
            .iter()
            .filter(move |a| a.publisher == publisher && a.recipients.contains(&recipient))
    }

    pub fn holds_region_wide(&self, kind: OrgKind) -> bool {
        kind == OrgKind::Hub || self.region_wide.contains(&kind)
    }

    /// Whether an item dated `day` (`YYYY-MM-DD…`) may be shared by `publisher` at all.
    pub fn shareable_date(&self, publisher: &OdsCode, day: Option<&str>) -> bool {
        match (self.share_from.get(publisher), day) {
            (None, _) => true,
            // An undated item cannot be shown to fall after the date: it stays.
            (Some(_), None) => false,
            (Some(from), Some(day)) => day.get(..10).is_some_and(|d| d >= from.as_str()),
        }
    }
}

fn is_iso_day(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() == 10
        && bytes[4] == b'-'
        && bytes[7] == b'-'
        && bytes
            .iter()
            .enumerate()
            .all(|(i, b)| i == 4 || i == 7 || b.is_ascii_digit())
}

/// A patient's sharing choices recorded at one organisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consent {
    /// May data recorded here leave here.
    pub share_out: bool,
    /// May this organisation view what others made shareable.
    pub share_in: bool,
    /// The patient objects to sharing for direct care: nothing recorded here is shared.
    pub objection: bool,
}

impl Consent {
    /// Field names in the sharing record's item, as stored and sent.
    const FIELDS: [&'static str; 3] = ["share_out", "share_in", "objection"];

    /// What a recipient assumes of a publisher whose sharing record it does not hold yet:
    /// the publisher decided before sending, so its sending is the evidence.
    pub const SENT_BY_PUBLISHER: Consent = Consent {
        share_out: true,
        share_in: true,
        objection: false,
    };

    pub fn to_fields(self) -> BTreeMap<String, String> {
        let values = [self.share_out, self.share_in, self.objection];
        Self::FIELDS
            .iter()
            .zip(values)
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect()
    }

    /// Reads a sharing record's fields; `None` if any is missing or not `true`/`false`.
    pub fn from_fields(fields: &BTreeMap<String, String>) -> Option<Consent> {
        let flag = |name: &str| fields.get(name)?.parse::<bool>().ok();
        Some(Consent {
            share_out: flag(Self::FIELDS[0])?,
            share_in: flag(Self::FIELDS[1])?,
            objection: flag(Self::FIELDS[2])?,
        })
    }

    /// Whether the organisation's data about the patient may leave it at all.
    pub fn withholds_everything(&self) -> Option<WithholdReason> {
        if self.objection {
            Some(WithholdReason::Objection)
        } else if !self.share_out {
            Some(WithholdReason::ShareOutOff)
        } else {
            None
        }
    }
}

/// What a publisher's sharing record states: the patient's choices there and, unless those
/// withhold everything, how many items it holds about the patient per section. A recipient
/// compares the counts with what it holds to say "3 items withheld by sharing rules"
/// without learning which items, of what class, or why. After an objection the counts are
/// left out, so not even the shape of what it withheld travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharingRecord {
    pub consent: Consent,
    pub items_per_section: BTreeMap<Section, u64>,
    /// How the publisher's data reaches it, so a viewer can tell how fresh it should be.
    pub source: Option<SourceStatement>,
}

/// A publisher's statement of its feed: "live" (as things happen) or "batch" (periodic
/// extracts, expected every `refresh_hours`), and the clinical system it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceStatement {
    pub feed: String,
    pub system: String,
    pub refresh_hours: Option<u32>,
}

impl SourceStatement {
    const FEED_MAX_CHARS: usize = 16;
    const SYSTEM_MAX_CHARS: usize = 200;

    fn to_fields(&self, fields: &mut BTreeMap<String, String>) {
        fields.insert("source.feed".into(), self.feed.clone());
        fields.insert("source.system".into(), self.system.clone());
        if let Some(hours) = self.refresh_hours {
            fields.insert("source.refresh_hours".into(), hours.to_string());
        }
    }

    /// The statement in a sharing record's fields; `None` when absent or implausible
    /// (these are another organisation's words: bounded before they reach a page).
    fn from_fields(fields: &BTreeMap<String, String>) -> Option<SourceStatement> {
        let feed = fields.get("source.feed")?;
        let system = fields.get("source.system")?;
        if feed.is_empty()
            || feed.chars().count() > Self::FEED_MAX_CHARS
            || system.chars().count() > Self::SYSTEM_MAX_CHARS
        {
            return None;
        }
        Some(SourceStatement {
            feed: feed.clone(),
            system: system.clone(),
            refresh_hours: fields
                .get("source.refresh_hours")
                .and_then(|h| h.parse().ok()),
        })
    }
}

impl SharingRecord {
    const COUNT_PREFIX: &'static str = "items.";

    pub fn new(consent: Consent, items_per_section: BTreeMap<Section, u64>) -> SharingRecord {
        let items_per_section = if consent.withholds_everything().is_some() {
            BTreeMap::new()
        } else {
            items_per_section
        };
        debug_assert!(items_per_section.keys().all(|s| s.is_clinical()));
        SharingRecord {
            consent,
            items_per_section,
            source: None,
        }
    }

    pub fn with_source(mut self, source: Option<SourceStatement>) -> SharingRecord {
        self.source = source;
        self
    }

    pub fn to_fields(&self) -> BTreeMap<String, String> {
        let mut fields = self.consent.to_fields();
        for (section, count) in &self.items_per_section {
            fields.insert(
                format!("{}{}", Self::COUNT_PREFIX, section.as_str()),
                count.to_string(),
            );
        }
        if let Some(source) = &self.source {
            source.to_fields(&mut fields);
        }
        fields
    }

    /// Reads a sharing record's fields; `None` if the consent fields do not read. Counts
    /// that do not read are left out rather than guessed.
    pub fn from_fields(fields: &BTreeMap<String, String>) -> Option<SharingRecord> {
        let consent = Consent::from_fields(fields)?;
        let items_per_section = fields
            .iter()
            .filter_map(|(name, value)| {
                let section = name.strip_prefix(Self::COUNT_PREFIX)?.parse().ok()?;
                Some((section, value.parse().ok()?))
            })
            .collect();
        Some(
            SharingRecord::new(consent, items_per_section)
                .with_source(SourceStatement::from_fields(fields)),
        )
    }
}

/// What the caller looks up about one document and one recipient before deciding.
#[derive(Debug, Clone, Copy)]
pub struct Facts {
    /// The publisher's kind from the trust registry; `None` when it is not listed.
    pub publisher_kind: Option<OrgKind>,
    /// The patient's consent at the publisher (recorded, or the publisher's defaults).
    pub consent: Consent,
    /// Whether the recipient has a care relationship with the patient: it has published
    /// something about them (data, or its own sharing record).
    pub recipient_cares_for_patient: bool,
    /// Whether the document travels straight from its publisher on this link.
    pub direct_from_publisher: bool,
}

/// Decides whether `recipient` may hold the document described by `meta`.
pub fn decide(
    meta: &DocMeta,
    recipient: &Recipient,
    agreements: &Agreements,
    facts: &Facts,
) -> Decision {
    use Decision::{Send, Withhold};
    if meta.publisher == recipient.ods {
        // A node's own documents, restored from a peer that holds them.
        return Send;
    }
    let on_caseload =
        facts.recipient_cares_for_patient || agreements.holds_region_wide(recipient.kind);
    if meta.section == Section::Sharing {
        // The sharing record carries consent, not clinical content. It must reach everyone
        // holding the publisher's data about the patient (it is also the purge notice), and
        // a publisher gives it to its direct peers so that each side learns the other's
        // caseload; hubs relay it only to those caring for the patient.
        return if on_caseload || facts.direct_from_publisher {
            Send
        } else {
            Withhold(WithholdReason::NotInCaseload)
        };
    }
    if meta.section == Section::Audit {
        // Who viewed the patient's record, for the organisations whose data was shown: all
        // of them care for the patient. Access records are not clinical data, so consent and
        // agreements do not hold them back: a withdrawal must not hide who saw what.
        return if meta.class != DataClass::Coded {
            Withhold(WithholdReason::Private)
        } else if on_caseload || recipient.kind == OrgKind::Hub {
            Send
        } else {
            Withhold(WithholdReason::NotInCaseload)
        };
    }
    if meta.class == DataClass::Private {
        return Withhold(WithholdReason::Private);
    }
    let Some(publisher_kind) = facts.publisher_kind else {
        return Withhold(WithholdReason::UnknownPublisher);
    };
    if let Some(reason) = facts.consent.withholds_everything() {
        return Withhold(reason);
    }
    if recipient.kind == OrgKind::Hub {
        // A hub holds whatever some recipient may hold, and decides again when forwarding.
        if meta.class == DataClass::Sensitive && !agreements.shares_sensitive_from(publisher_kind) {
            return Withhold(WithholdReason::Sensitive);
        }
        return Send;
    }
    if !on_caseload {
        return Withhold(WithholdReason::NotInCaseload);
    }
    let mut agreed = agreements
        .between(publisher_kind, recipient.kind)
        .peekable();
    if agreed.peek().is_none() {
        return Withhold(WithholdReason::NoAgreement {
            publisher: publisher_kind,
            recipient: recipient.kind,
        });
    }
    if agreed.any(|a| a.classes.contains(&meta.class) && !a.except_sections.contains(&meta.section))
    {
        return Send;
    }
    if meta.class == DataClass::Sensitive {
        Withhold(WithholdReason::Sensitive)
    } else {
        Withhold(WithholdReason::NotAgreed {
            class: meta.class,
            section: meta.section,
        })
    }
}

/// What [`decide`] answers when that needs no facts beyond whether the recipient `cares`
/// for the patient: the publisher's own documents go back to it, and a recipient off the
/// caseload that is not a hub, does not hold region-wide and is not being given the
/// publisher's sharing record on the publisher's own link is refused whatever the consent
/// and the publisher's kind. `None`: ask [`decide`] with the facts. A host checks this
/// before looking consent up, so that of a hub's hundreds of peers only the few caring for
/// the patient cost more than the care check.
pub fn decided_without_facts(
    meta: &DocMeta,
    recipient: &Recipient,
    agreements: &Agreements,
    cares: bool,
    direct_from_publisher: bool,
) -> Option<Decision> {
    if meta.publisher == recipient.ods {
        return Some(Decision::Send);
    }
    let may_hold_off_caseload = agreements.holds_region_wide(recipient.kind)
        || recipient.kind == OrgKind::Hub
        || (meta.section == Section::Sharing && direct_from_publisher);
    (!cares && !may_hold_off_caseload).then_some(Decision::Withhold(WithholdReason::NotInCaseload))
}

/// Why an item held at the viewing node is, or is not, shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ViewDecision {
    /// The viewing organisation's own data.
    Own,
    /// Another organisation's data, shown because Share In is recorded here.
    ShareIn,
    /// Shown without Share In because a clinician invoked break-glass.
    BreakGlass,
    /// Hidden: Share In is not recorded at the viewing organisation.
    NoShareIn,
}

impl ViewDecision {
    pub fn shown(self) -> bool {
        !matches!(self, ViewDecision::NoShareIn)
    }
}

/// Decides whether a viewer at `viewer` sees an item published by `publisher`. Private
/// items of other organisations and what an objection withheld never reach the viewing node
/// ([`decide`]), so break-glass cannot reveal them.
pub fn decide_view(
    publisher: &OdsCode,
    viewer: &OdsCode,
    viewer_consent: &Consent,
    break_glass_active: bool,
) -> ViewDecision {
    if publisher == viewer {
        ViewDecision::Own
    } else if viewer_consent.share_in {
        ViewDecision::ShareIn
    } else if break_glass_active {
        ViewDecision::BreakGlass
    } else {
        ViewDecision::NoShareIn
    }
}

#[cfg(test)]
mod tests;
