//! Identifiers and the shape of what caremesh stores and shares.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    #[error(
        "NHS number {0:?} is not 10 digits; an NHS number is exactly ten digits (spaces allowed between groups)"
    )]
    NhsNumberLength(String),
    #[error("NHS number {0} fails the Modulus 11 check digit; check the number for a typing error")]
    NhsNumberCheckDigit(String),
    #[error(
        "ODS code {0:?} is not valid: expected 3 to 10 upper-case letters and digits, such as A81001 or RTH"
    )]
    OdsCode(String),
    #[error("unknown organisation kind {0:?}; expected one of: {kinds}", kinds = OrgKind::NAMES.join(", "))]
    OrgKind(String),
    #[error("unknown section {0:?}")]
    Section(String),
    #[error("unknown data class {0:?}")]
    DataClass(String),
}

/// A validated NHS number: ten digits whose last is the Modulus 11 check digit.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NhsNumber(String);

impl NhsNumber {
    /// Parses an NHS number, accepting the 3-3-4 spaced form people type.
    pub fn parse(raw: &str) -> Result<Self, ModelError> {
        let digits: String = raw.chars().filter(|c| !c.is_whitespace()).collect();
        if digits.len() != 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ModelError::NhsNumberLength(raw.to_string()));
        }
        let bytes = digits.as_bytes();
        match Self::check_digit(&bytes[..9]) {
            Some(check) if check == bytes[9] - b'0' => Ok(NhsNumber(digits)),
            _ => Err(ModelError::NhsNumberCheckDigit(digits)),
        }
    }

    /// The Modulus 11 check digit for nine leading digits, or `None` where no valid number
    /// can end them (remainder 10).
    pub fn check_digit(first_nine: &[u8]) -> Option<u8> {
        assert_eq!(first_nine.len(), 9, "check digit needs exactly nine digits");
        let sum: u32 = first_nine
            .iter()
            .zip((2..=10u32).rev())
            .map(|(digit, weight)| u32::from(digit - b'0') * weight)
            .sum();
        match 11 - (sum % 11) {
            11 => Some(0),
            10 => None,
            check => Some(check as u8),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 3-3-4 form clinicians read, such as `999 123 4560`.
    pub fn formatted(&self) -> String {
        format!("{} {} {}", &self.0[..3], &self.0[3..6], &self.0[6..])
    }
}

impl fmt::Debug for NhsNumber {
    // Debug output ends up in logs; an NHS number must not.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NhsNumber(***{})", &self.0[7..])
    }
}

impl fmt::Display for NhsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for NhsNumber {
    type Error = ModelError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        NhsNumber::parse(&value)
    }
}

impl From<NhsNumber> for String {
    fn from(value: NhsNumber) -> Self {
        value.0
    }
}

impl FromStr for NhsNumber {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NhsNumber::parse(s)
    }
}

/// An Organisation Data Service code, the identity of a care organisation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OdsCode(String);

impl OdsCode {
    pub fn parse(raw: &str) -> Result<Self, ModelError> {
        let valid = (3..=10).contains(&raw.len())
            && raw
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
        if valid {
            Ok(OdsCode(raw.to_string()))
        } else {
            Err(ModelError::OdsCode(raw.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OdsCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for OdsCode {
    type Error = ModelError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        OdsCode::parse(&value)
    }
}

impl From<OdsCode> for String {
    fn from(value: OdsCode) -> Self {
        value.0
    }
}

impl FromStr for OdsCode {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        OdsCode::parse(s)
    }
}

/// Declares a closed vocabulary with stable kebab-case names used in configs, storage and
/// on the wire, so that the three never drift apart.
macro_rules! vocabulary {
    ($(#[$meta:meta])* $name:ident, $error:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "&'static str")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = ModelError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(ModelError::$error(other.to_string())),
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = ModelError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                value.parse()
            }
        }

        impl From<$name> for &'static str {
            fn from(value: $name) -> Self {
                value.as_str()
            }
        }
    };
}

vocabulary!(
    /// What kind of care organisation runs a node; agreements speak in these terms.
    OrgKind, OrgKind {
        Gp => "gp",
        Acute => "acute",
        Community => "community",
        MentalHealth => "mental-health",
        Hospice => "hospice",
        Ooh => "ooh",
        SocialCare => "social-care",
        Ambulance => "ambulance",
        Hub => "hub",
    }
);

vocabulary!(
    /// The sections of a joined-up record, in the order the view shows them.
    Section, Section {
        Demographics => "demographics",
        Alerts => "alerts",
        Allergies => "allergies",
        Medications => "medications",
        Problems => "problems",
        Results => "results",
        Encounters => "encounters",
        Documents => "documents",
        Immunisations => "immunisations",
        Procedures => "procedures",
        CarePlans => "care-plans",
        Referrals => "referrals",
        FamilyHistory => "family-history",
        // Next of kin, carers and other contacts (FHIR RelatedPerson).
        Contacts => "contacts",
        // Not a clinical section: the publisher's sharing record for the patient (consent
        // and what it withheld), which also serves as the purge notice.
        Sharing => "sharing",
        // Not a clinical section either: the publisher's audit trail of views of the
        // patient's record that showed other organisations' data, for those organisations.
        Audit => "audit",
    }
);

impl Section {
    /// Whether the section holds the patient's care (shown, counted, shared by agreement),
    /// rather than the record's own bookkeeping (sharing records, audit trails).
    pub fn is_clinical(self) -> bool {
        !matches!(self, Section::Sharing | Section::Audit)
    }

    pub fn title(self) -> &'static str {
        match self {
            Section::Demographics => "Demographics",
            Section::Alerts => "Alerts",
            Section::Allergies => "Allergies and adverse reactions",
            Section::Medications => "Medications",
            Section::Problems => "Problems",
            Section::Results => "Results",
            Section::Encounters => "Encounters",
            Section::Documents => "Documents",
            Section::Immunisations => "Immunisations",
            Section::Procedures => "Procedures",
            Section::CarePlans => "Care plans",
            Section::Referrals => "Referrals",
            Section::FamilyHistory => "Family history",
            Section::Contacts => "Next of kin and contacts",
            Section::Sharing => "Sharing choices",
            Section::Audit => "Record access",
        }
    }
}

vocabulary!(
    /// The unit sharing rules speak of. `Private` is not a sharing class of its own in the
    /// NHS vocabulary: it marks items that never leave the recording organisation, kept in
    /// their own documents so that no rule can ever match them by accident.
    DataClass, DataClass {
        Coded => "coded",
        FreeText => "free-text",
        Document => "document",
        Sensitive => "sensitive",
        Private => "private",
    }
);

/// A code from a terminology, such as SNOMED CT or dm+d.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Coding {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
}

/// The item format this build writes. Format 1 items carried only a summary (title, one
/// detail string, one status string) and lost dosage, ranges, verification status and end
/// dates; format 2 items also carry the source resource itself (`Item::resource`), from which
/// the view renders. A node keeps serving format 1 items until their publisher re-publishes
/// them, and says so (`caremesh status`).
pub const ITEM_FORMAT: u32 = 2;

/// One clinical fact as a publisher shares it: normalised from a FHIR resource, with its
/// provenance. The publishing organisation and patient are those of the document holding it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// The format the item was written in (see [`ITEM_FORMAT`]); items written before
    /// formats were numbered read as 1.
    #[serde(default = "Item::first_format")]
    pub format: u32,
    /// Unique within the publisher: `ResourceType/id`, with a suffix for derived items.
    pub id: String,
    pub section: Section,
    pub class: DataClass,
    pub resource_type: String,
    /// What a clinician reads first: the code's display text or a title.
    pub title: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<Coding>,
    /// Value, dosage, narrative or document text, as a clinician would read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// When the fact was true (onset, effective or occurrence time), as FHIR gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective: Option<String>,
    /// When it was recorded at source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded: Option<String>,
    /// `meta.lastUpdated` of the source resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated: Option<String>,
    /// The clinical system the extract came from.
    pub source_system: String,
    /// `ResourceType/id` of the source resource.
    pub source_id: String,
    /// Confidentiality code from `meta.security` (HL7 v3 Confidentiality: N, R, V...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidentiality: Option<String>,
    /// Named fields for items that are more than one fact, such as demographics.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub fields: std::collections::BTreeMap<String, String>,
    /// The source FHIR resource as the publisher holds it, normalised: the subject named by
    /// NHS number, referenced Medications inlined, references given display names where the
    /// extract had them, and no narrative (generated `text` and `note`s travel only in the
    /// free-text item, so an agreement that withholds free text withholds them). `None` for
    /// items with no source resource (sharing and access records) and for format 1 items.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<serde_json::Value>,
}

/// Item fields that record a correction of which patient a resource belongs to. Both hold
/// the time of the move (RFC 3339, UTC); neither names the other patient, whose identity
/// is no business of this patient's viewers (the audit trail records both).
pub mod moved {
    /// On the notice a publisher leaves where a resource was, when it moved the resource to
    /// another patient's record. The notice keeps the moved item's title, section and data
    /// class, so it reaches exactly those who could see the entry.
    pub const AWAY: &str = "moved_away";
    /// On an item that its publisher moved here from another patient's record.
    pub const HERE: &str = "moved_here";

    /// The id of the notice left where resource item `item_id` was.
    pub fn notice_id(item_id: &str) -> String {
        format!("{item_id}#moved")
    }
}

impl Item {
    fn first_format() -> u32 {
        1
    }

    /// Whether this item is the notice that a resource moved from here to another patient.
    pub fn is_moved_away_notice(&self) -> bool {
        self.fields.contains_key(moved::AWAY)
    }

    /// Whether the item was written before items carried their source resource.
    pub fn is_summary_only(&self) -> bool {
        self.format < ITEM_FORMAT && self.section.is_clinical()
    }

    /// An item with its identity, title and provenance, and nothing else yet.
    pub fn titled(
        id: &str,
        section: Section,
        class: DataClass,
        resource_type: &str,
        title: &str,
        source_system: &str,
        source_id: &str,
    ) -> Item {
        Item {
            format: ITEM_FORMAT,
            id: id.into(),
            section,
            class,
            resource_type: resource_type.into(),
            title: title.into(),
            code: None,
            detail: None,
            status: None,
            effective: None,
            recorded: None,
            last_updated: None,
            source_system: source_system.into(),
            source_id: source_id.into(),
            confidentiality: None,
            fields: Default::default(),
            resource: None,
        }
    }
}

/// The partition a document covers: one publisher, one patient, one section, one class.
///
/// Policy decides on whole documents, so everything a sharing rule can speak of is part of
/// the partition. That lets a hub filter what it forwards without opening, re-writing or
/// re-signing a publisher's document.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DocMeta {
    pub publisher: OdsCode,
    pub patient: NhsNumber,
    pub section: Section,
    pub class: DataClass,
}

impl DocMeta {
    pub fn id(&self) -> DocId {
        let mut hasher = Sha256::new();
        hasher.update(b"caremesh/doc-id/v1\0");
        for part in [
            self.publisher.as_str(),
            self.patient.as_str(),
            self.section.as_str(),
            self.class.as_str(),
        ] {
            hasher.update((part.len() as u32).to_be_bytes());
            hasher.update(part.as_bytes());
        }
        let digest = hasher.finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        DocId(id)
    }
}

/// A document's identity, derived from its [`DocMeta`] so that a document can never be
/// stored under a partition other than the one its publisher signed.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DocId(pub [u8; 16]);

impl fmt::Debug for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DocId({})", hex::encode(self.0))
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nhs_number_check_digit_accepts_valid_numbers() {
        for valid in ["9912003888", "9434765919", "6700028191", "943 476 5919"] {
            assert!(NhsNumber::parse(valid).is_ok(), "{valid} should be valid");
        }
    }

    #[test]
    fn nhs_number_rejects_wrong_check_digit_and_length() {
        assert_eq!(
            NhsNumber::parse("9434765910"),
            Err(ModelError::NhsNumberCheckDigit("9434765910".into()))
        );
        assert!(matches!(
            NhsNumber::parse("12345"),
            Err(ModelError::NhsNumberLength(_))
        ));
        assert!(matches!(
            NhsNumber::parse("94347659a9"),
            Err(ModelError::NhsNumberLength(_))
        ));
    }

    #[test]
    fn check_digit_follows_modulus_11() {
        // (first nine digits, expected check digit): weights 10..2, check = 11 - sum mod 11,
        // 11 becomes 0, 10 means no valid number.
        let cases: [(&[u8; 9], Option<u8>); 5] = [
            (b"000000000", Some(0)), // sum 0 -> 11 -> 0
            (b"000000001", Some(9)), // sum 2 -> 9
            (b"100000000", Some(1)), // sum 10 -> 1
            (b"000000006", None),    // sum 12, remainder 1 -> 10: invalid
            (b"991200388", Some(8)), // the UK Core example patient
        ];
        for (prefix, expected) in cases {
            assert_eq!(NhsNumber::check_digit(prefix), expected, "{prefix:?}");
        }
    }

    #[test]
    fn nhs_number_formats_three_three_four_and_hides_in_debug() {
        let nhs = NhsNumber::parse("9912003888").unwrap();
        assert_eq!(nhs.formatted(), "991 200 3888");
        assert!(!format!("{nhs:?}").contains("9912003888"));
    }

    #[test]
    fn ods_codes_validate() {
        assert!(OdsCode::parse("A81001").is_ok());
        assert!(OdsCode::parse("RTH").is_ok());
        assert!(OdsCode::parse("rth").is_err());
        assert!(OdsCode::parse("R").is_err());
    }

    #[test]
    fn vocabularies_round_trip_through_names() {
        for kind in OrgKind::ALL {
            assert_eq!(kind.as_str().parse::<OrgKind>().unwrap(), *kind);
        }
        assert_eq!(
            "mental-health".parse::<OrgKind>().unwrap(),
            OrgKind::MentalHealth
        );
        assert!("surgery".parse::<OrgKind>().is_err());
        for section in Section::ALL {
            assert_eq!(section.as_str().parse::<Section>().unwrap(), *section);
        }
    }

    #[test]
    fn doc_id_depends_on_every_part_of_the_partition() {
        let meta = DocMeta {
            publisher: OdsCode::parse("A81001").unwrap(),
            patient: NhsNumber::parse("9912003888").unwrap(),
            section: Section::Allergies,
            class: DataClass::Coded,
        };
        let mut other = meta.clone();
        other.class = DataClass::Sensitive;
        assert_ne!(meta.id(), other.id());
        assert_eq!(meta.id(), meta.clone().id());
    }
}
