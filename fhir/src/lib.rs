//! FHIR R4 for caremesh. This crate root maps FHIR resources to caremesh items (one clinical
//! fact each, format-neutral: a second format such as HL7 v2 would be a sibling crate making
//! the same items); [`reading`] renders the resource an item carries as a clinician reads it;
//! [`clock`] reads the wall clock and formats the dates both show.
//!
//! Tolerant of what real extracts carry (unknown elements, Synthea's pre-R4 leftovers), strict
//! about what it reads: a field of the wrong JSON type is an error naming the resource and the
//! field, never a silently empty value.

pub mod clock;
mod consent;
pub mod reading;
pub mod strict_json;
pub mod synthetic;

pub use consent::{ConsentFacts, SharingChoice};

use caremesh_sync::{Coding, DataClass, Item, Section};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet};

pub const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";
pub const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
pub const SNOMED: &str = "http://snomed.info/sct";
const CONFIDENTIALITY_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality";
/// `meta.tag` or `meta.security` coding that marks an item private to the recording
/// organisation (clinical systems export their "private" flag as this tag).
pub const PRIVATE_SYSTEM: &str = "urn:caremesh:sharing";
pub const PRIVATE_CODE: &str = "private";

impl MappingError {
    pub fn new(resource: impl Into<String>, problem: impl Into<String>) -> Self {
        MappingError {
            resource: resource.into(),
            problem: problem.into(),
            retry_later: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{resource}: {problem}")]
pub struct MappingError {
    /// `ResourceType/id` or the resource type where there is no id.
    pub resource: String,
    pub problem: String,
    /// The resource refers to something not yet ingested; it may place once that arrives.
    pub retry_later: bool,
}

// ----- FHIR datatypes, read leniently (unknown elements ignored) -----

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(default)]
pub struct FhirCoding {
    pub system: Option<String>,
    pub code: Option<String>,
    pub display: Option<String>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(default)]
pub struct CodeableConcept {
    pub coding: Vec<FhirCoding>,
    pub text: Option<String>,
}

impl CodeableConcept {
    pub fn display(&self) -> Option<String> {
        self.text.clone().filter(|t| !t.is_empty()).or_else(|| {
            self.coding
                .iter()
                .find_map(|c| c.display.clone().or_else(|| c.code.clone()))
        })
    }

    /// The coding a clinician would recognise: SNOMED CT (or dm+d, also under the SNOMED
    /// system) first, else the first coding.
    pub fn primary(&self) -> Option<Coding> {
        let coding = self
            .coding
            .iter()
            .find(|c| c.system.as_deref() == Some(SNOMED))
            .or_else(|| self.coding.first())?;
        Some(Coding {
            system: coding.system.clone(),
            code: coding.code.clone(),
            display: coding.display.clone().or_else(|| self.text.clone()),
        })
    }

    fn has_code(&self, code: &str) -> bool {
        self.coding.iter().any(|c| c.code.as_deref() == Some(code))
    }
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(default)]
pub struct Identifier {
    pub system: Option<String>,
    pub value: Option<String>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(default)]
pub struct Reference {
    pub reference: Option<String>,
    pub identifier: Option<Identifier>,
    pub display: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Quantity {
    value: Option<serde_json::Number>,
    unit: Option<String>,
    code: Option<String>,
    comparator: Option<String>,
}

impl Quantity {
    fn render(&self) -> Option<String> {
        let value = self.value.as_ref()?;
        let unit = self.unit.as_ref().or(self.code.as_ref());
        Some(format!(
            "{}{}{}",
            self.comparator.as_deref().unwrap_or(""),
            value,
            unit.map(|u| format!(" {u}")).unwrap_or_default()
        ))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Period {
    start: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct Meta {
    last_updated: Option<String>,
    security: Vec<FhirCoding>,
    tag: Vec<FhirCoding>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Annotation {
    text: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct HumanName {
    #[serde(rename = "use")]
    name_use: Option<String>,
    text: Option<String>,
    family: Option<String>,
    given: Vec<String>,
    prefix: Vec<String>,
}

impl HumanName {
    fn render(&self) -> Option<String> {
        if let Some(text) = self.text.clone().filter(|t| !t.is_empty()) {
            return Some(text);
        }
        let mut parts: Vec<&str> = self.prefix.iter().map(String::as_str).collect();
        parts.extend(self.given.iter().map(String::as_str));
        parts.extend(self.family.as_deref());
        (!parts.is_empty()).then(|| parts.join(" "))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Dosage {
    text: Option<String>,
}

/// A resource being read: its JSON object, with typed, path-reporting field access.
pub struct Resource<'a> {
    pub resource_type: &'a str,
    pub id: Option<&'a str>,
    object: &'a Map<String, Value>,
}

impl<'a> Resource<'a> {
    pub fn new(value: &'a Value) -> Result<Self, MappingError> {
        let object = value.as_object().ok_or_else(|| {
            MappingError::new(
                "(resource)",
                format!("expected a JSON object, found {}", json_kind(value)),
            )
        })?;
        let resource_type = match object.get("resourceType") {
            Some(Value::String(t)) if !t.is_empty() => t.as_str(),
            Some(other) => {
                return Err(MappingError::new(
                    "(resource)",
                    format!(
                        "`resourceType` should be a string, found {}",
                        json_kind(other)
                    ),
                ));
            }
            None => {
                return Err(MappingError {
                    resource: "(resource)".into(),
                    problem: "no `resourceType`: this is not a FHIR resource".into(),
                    retry_later: false,
                });
            }
        };
        let id = match object.get("id") {
            Some(Value::String(id)) => Some(id.as_str()),
            None => None,
            Some(other) => {
                return Err(MappingError {
                    resource: resource_type.to_string(),
                    problem: format!("`id` should be a string, found {}", json_kind(other)),
                    retry_later: false,
                });
            }
        };
        Ok(Resource {
            resource_type,
            id,
            object,
        })
    }

    pub fn key(&self) -> String {
        match self.id {
            Some(id) => format!("{}/{}", self.resource_type, id),
            None => self.resource_type.to_string(),
        }
    }

    fn error(&self, problem: impl Into<String>) -> MappingError {
        MappingError {
            resource: self.key(),
            problem: problem.into(),
            retry_later: false,
        }
    }

    /// A field deserialised as `T`, or an error naming the field and what it held instead.
    pub fn field<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, MappingError> {
        match self.object.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => T::deserialize(value).map(Some).map_err(|error| {
                self.error(format!(
                    "field `{name}` has the wrong shape ({error}); found {}",
                    json_kind(value)
                ))
            }),
        }
    }

    fn list<T: DeserializeOwned>(&self, name: &str) -> Result<Vec<T>, MappingError> {
        Ok(self.field::<Vec<T>>(name)?.unwrap_or_default())
    }

    fn string(&self, name: &str) -> Result<Option<String>, MappingError> {
        self.field::<String>(name)
    }

    fn first_string(&self, names: &[&str]) -> Result<Option<String>, MappingError> {
        for name in names {
            if let Some(value) = self.string(name)? {
                return Ok(Some(value));
            }
        }
        Ok(None)
    }

    fn period_start(&self, name: &str) -> Result<Option<String>, MappingError> {
        Ok(self.field::<Period>(name)?.and_then(|p| p.start))
    }

    fn concept(&self, name: &str) -> Result<Option<CodeableConcept>, MappingError> {
        self.field::<CodeableConcept>(name)
    }

    fn first_concept(&self, name: &str) -> Result<Option<CodeableConcept>, MappingError> {
        Ok(self.list::<CodeableConcept>(name)?.into_iter().next())
    }

    pub fn raw(&self) -> &'a Map<String, Value> {
        self.object
    }
}

pub fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

// ----- what a resource becomes -----

/// How a clinical resource names its patient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatientRef {
    /// `Patient/xyz`, `urn:uuid:…` or an absolute URL.
    Reference(String),
    /// A logical reference by identifier, such as an NHS number.
    Identifier { system: String, value: String },
}

#[derive(Debug)]
pub struct PatientFacts {
    pub key: String,
    pub identifiers: Vec<Identifier>,
    pub item: Item,
}

#[derive(Debug)]
pub struct ClinicalFacts {
    pub patient: PatientRef,
    /// Items the resource yields now (none if entered in error).
    pub items: Vec<Item>,
    /// Every item id this resource could ever yield; those not in `items` are removed.
    pub family: Vec<String>,
    pub last_updated: Option<String>,
    pub entered_in_error: bool,
}

#[derive(Debug)]
pub enum Mapped {
    Patient(Box<PatientFacts>),
    /// A resource others refer to (Medication, Organization), kept for resolving references.
    Referenced {
        key: String,
        summary: Value,
    },
    Clinical(ClinicalFacts),
    /// A patient's sharing choice at this organisation.
    Consent(ConsentFacts),
    Unsupported,
}

/// The SNOMED CT codes that make an item sensitive (sexual health, HIV, IVF, gender identity,
/// termination of pregnancy, safeguarding).
#[derive(Debug, Clone, Default)]
pub struct SensitiveCodes {
    codes: HashSet<String>,
}

impl SensitiveCodes {
    pub fn new(codes: impl IntoIterator<Item = String>) -> Self {
        SensitiveCodes {
            codes: codes.into_iter().collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.codes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }

    fn matches(&self, concept: &CodeableConcept) -> bool {
        concept.coding.iter().any(|c| {
            c.system.as_deref() == Some(SNOMED)
                && c.code
                    .as_deref()
                    .is_some_and(|code| self.codes.contains(code))
        })
    }
}

/// Resolves references to resources the extract carries beside the clinical ones.
pub trait ReferenceLookup {
    /// A `medicationReference` to the Medication's code.
    fn medication(&self, reference: &str) -> Option<CodeableConcept>;
    /// A reference to an Organization, Practitioner or Location to its name, so that a
    /// recipient who never saw that resource still reads who recorded a fact and where.
    fn display(&self, reference: &str) -> Option<String>;
}

pub struct MappingContext<'a> {
    pub source_system: &'a str,
    pub sensitive: &'a SensitiveCodes,
    pub references: &'a dyn ReferenceLookup,
}

/// Resource types kept only to resolve references to them, with what is kept of each.
pub const REFERENCED_TYPES: &[&str] = &["Medication", "Organization", "Practitioner", "Location"];

const SUPPORTED: &[(&str, Section)] = &[
    ("AllergyIntolerance", Section::Allergies),
    ("MedicationStatement", Section::Medications),
    ("MedicationRequest", Section::Medications),
    ("MedicationAdministration", Section::Medications),
    ("MedicationDispense", Section::Medications),
    ("Condition", Section::Problems),
    ("Observation", Section::Results),
    ("DiagnosticReport", Section::Results),
    ("Encounter", Section::Encounters),
    ("EpisodeOfCare", Section::Encounters),
    ("DocumentReference", Section::Documents),
    ("Composition", Section::Documents),
    ("Immunization", Section::Immunisations),
    ("Procedure", Section::Procedures),
    ("Flag", Section::Alerts),
    ("CarePlan", Section::CarePlans),
    ("ServiceRequest", Section::Referrals),
    ("FamilyMemberHistory", Section::FamilyHistory),
    ("RelatedPerson", Section::Contacts),
];

pub fn section_of(resource_type: &str) -> Option<Section> {
    SUPPORTED
        .iter()
        .find(|(t, _)| *t == resource_type)
        .map(|(_, s)| *s)
}

pub fn map_resource(
    resource: &Resource<'_>,
    context: &MappingContext<'_>,
) -> Result<Mapped, MappingError> {
    match resource.resource_type {
        "Patient" => map_patient(resource, context).map(|p| Mapped::Patient(Box::new(p))),
        "Medication" => Ok(Mapped::Referenced {
            key: resource.key(),
            summary: serde_json::json!({ "code": resource.raw().get("code") }),
        }),
        "Organization" | "Location" => Ok(Mapped::Referenced {
            key: resource.key(),
            summary: serde_json::json!({
                "name": resource.string("name")?,
                "ods": resource.list::<Identifier>("identifier")?.into_iter()
                    .find(|i| i.system.as_deref() == Some(ODS_SYSTEM)).and_then(|i| i.value),
            }),
        }),
        "Practitioner" => {
            let name = official_name(&resource.list::<HumanName>("name")?);
            Ok(Mapped::Referenced {
                key: resource.key(),
                summary: serde_json::json!({ "name": name }),
            })
        }
        "Consent" => Ok(consent::map_consent(resource)?
            .map(Mapped::Consent)
            .unwrap_or(Mapped::Unsupported)),
        other => match section_of(other) {
            Some(section) => map_clinical(resource, section, context).map(Mapped::Clinical),
            None => Ok(Mapped::Unsupported),
        },
    }
}

fn require_id<'a>(resource: &Resource<'a>) -> Result<&'a str, MappingError> {
    resource.id.ok_or_else(|| {
        resource.error("has no `id`; caremesh needs it to track versions and corrections")
    })
}

fn map_patient(
    resource: &Resource<'_>,
    context: &MappingContext<'_>,
) -> Result<PatientFacts, MappingError> {
    require_id(resource)?;
    let identifiers = resource.list::<Identifier>("identifier")?;
    let name = official_name(&resource.list::<HumanName>("name")?);
    let mut fields = BTreeMap::new();
    fields.extend(name.clone().map(|n| ("name".to_string(), n)));
    fields.extend(
        resource
            .string("birthDate")?
            .map(|d| ("birth_date".to_string(), d)),
    );
    fields.extend(
        resource
            .string("gender")?
            .map(|g| ("gender".to_string(), g)),
    );
    if let Some(gp) = resource.list::<Reference>("generalPractitioner")?.first() {
        let gp = gp
            .display
            .clone()
            .or_else(|| gp.identifier.as_ref().and_then(|i| i.value.clone()))
            .or_else(|| gp.reference.clone());
        fields.extend(gp.map(|g| ("registered_gp".to_string(), g)));
    }
    let meta = resource.field::<Meta>("meta")?.unwrap_or_default();
    let item = Item {
        id: resource.key(),
        section: Section::Demographics,
        class: classify(&meta, &[], context.sensitive, DataClass::Coded),
        resource_type: "Patient".into(),
        title: name.unwrap_or_else(|| "Patient".into()),
        code: None,
        detail: None,
        status: resource
            .field::<bool>("active")?
            .map(|a| if a { "active" } else { "inactive" }.to_string()),
        effective: None,
        recorded: None,
        last_updated: meta.last_updated.clone(),
        source_system: context.source_system.to_string(),
        source_id: resource.key(),
        confidentiality: confidentiality(&meta),
        fields,
        format: caremesh_sync::ITEM_FORMAT,
        resource: Some(normalised(resource, context)?),
    };
    Ok(PatientFacts {
        key: resource.key(),
        identifiers,
        item,
    })
}

/// The official name where one is marked, else the first.
fn official_name(names: &[HumanName]) -> Option<String> {
    names
        .iter()
        .find(|n| n.name_use.as_deref() == Some("official"))
        .or_else(|| names.first())
        .and_then(HumanName::render)
}

fn confidentiality(meta: &Meta) -> Option<String> {
    meta.security
        .iter()
        .find(|c| c.system.as_deref() == Some(CONFIDENTIALITY_SYSTEM))
        .and_then(|c| c.code.clone())
}

fn is_private(meta: &Meta) -> bool {
    meta.tag.iter().chain(&meta.security).any(|c| {
        c.system.as_deref() == Some(PRIVATE_SYSTEM) && c.code.as_deref() == Some(PRIVATE_CODE)
    })
}

fn restricted(codings: &[FhirCoding]) -> bool {
    codings.iter().any(|c| {
        c.system.as_deref() == Some(CONFIDENTIALITY_SYSTEM)
            && matches!(c.code.as_deref(), Some("R" | "V"))
    })
}

/// Private beats sensitive beats the natural class of the content.
fn classify(
    meta: &Meta,
    concepts: &[&CodeableConcept],
    sensitive: &SensitiveCodes,
    natural: DataClass,
) -> DataClass {
    if is_private(meta) {
        DataClass::Private
    } else if restricted(&meta.security) || concepts.iter().any(|c| sensitive.matches(c)) {
        DataClass::Sensitive
    } else {
        natural
    }
}

fn patient_ref(resource: &Resource<'_>) -> Result<PatientRef, MappingError> {
    let raw = resource.raw();
    if raw.contains_key("patient") && raw.contains_key("subject") {
        return Err(resource.error(
            "names its patient in both `subject` and `patient`; refused as ambiguous: send one",
        ));
    }
    let field = if raw.contains_key("patient") {
        "patient"
    } else {
        "subject"
    };
    let reference = resource.field::<Reference>(field)?.ok_or_else(|| {
        resource.error("names no patient (`subject` or `patient`); it cannot be placed in a record")
    })?;
    if let Some(target) = reference.reference.filter(|r| !r.is_empty()) {
        return Ok(PatientRef::Reference(target));
    }
    if let Some(Identifier {
        system: Some(system),
        value: Some(value),
    }) = reference.identifier
    {
        return Ok(PatientRef::Identifier { system, value });
    }
    Err(resource.error(format!(
        "`{field}` has neither a reference nor an identifier; it cannot be placed in a record"
    )))
}

fn entered_in_error(resource: &Resource<'_>) -> Result<bool, MappingError> {
    if resource.string("status")?.as_deref() == Some("entered-in-error") {
        return Ok(true);
    }
    Ok(resource
        .concept("verificationStatus")?
        .is_some_and(|c| c.has_code("entered-in-error")))
}

/// What a clinical resource says, before it is split into items.
struct Content {
    concept: Option<CodeableConcept>,
    title: Option<String>,
    detail: Option<String>,
    status: Option<String>,
    effective: Option<String>,
    recorded: Option<String>,
    natural: DataClass,
    extra_concepts: Vec<CodeableConcept>,
}

fn map_clinical(
    resource: &Resource<'_>,
    section: Section,
    context: &MappingContext<'_>,
) -> Result<ClinicalFacts, MappingError> {
    require_id(resource)?;
    let patient = patient_ref(resource)?;
    let meta = resource.field::<Meta>("meta")?.unwrap_or_default();
    let main_id = resource.key();
    let family = item_family(&main_id);
    let note_id = family[1].clone();
    if entered_in_error(resource)? {
        return Ok(ClinicalFacts {
            patient,
            items: Vec::new(),
            family,
            last_updated: meta.last_updated,
            entered_in_error: true,
        });
    }
    let content = read_content(resource, context)?;
    let mut security = meta.security.clone();
    security.extend(
        resource
            .list::<CodeableConcept>("securityLabel")?
            .into_iter()
            .flat_map(|c| c.coding),
    );
    let labelled = Meta {
        last_updated: meta.last_updated.clone(),
        security,
        tag: meta.tag.clone(),
    };
    let mut concepts: Vec<&CodeableConcept> = content.concept.iter().collect();
    concepts.extend(content.extra_concepts.iter());
    let class = classify(&labelled, &concepts, context.sensitive, content.natural);
    let title = content
        .title
        .clone()
        .or_else(|| content.concept.as_ref().and_then(CodeableConcept::display))
        .unwrap_or_else(|| format!("{} (no description)", resource.resource_type));
    let base = Item {
        id: main_id.clone(),
        section,
        class,
        resource_type: resource.resource_type.to_string(),
        title: title.clone(),
        code: content.concept.as_ref().and_then(CodeableConcept::primary),
        detail: content.detail,
        status: content.status,
        effective: content.effective,
        recorded: content.recorded,
        last_updated: meta.last_updated.clone(),
        source_system: context.source_system.to_string(),
        source_id: main_id,
        confidentiality: confidentiality(&labelled),
        fields: BTreeMap::new(),
        format: caremesh_sync::ITEM_FORMAT,
        resource: Some(normalised(resource, context)?),
    };
    let notes = narrative(resource)?;
    let mut items = Vec::with_capacity(2);
    if !notes.is_empty() {
        // Narrative attached to a coded entry is free text: agreements that exclude free text
        // (acute trusts seeing GP data) must be able to withhold it without the coded fact.
        let note_class = match class {
            DataClass::Coded => DataClass::FreeText,
            other => other,
        };
        items.push(Item {
            id: note_id,
            class: note_class,
            code: None,
            title: format!("Note: {title}"),
            detail: Some(notes.join("\n\n")),
            // The narrative is this item's whole content; the coded resource is the base
            // item's, which an agreement may send where this one may not go.
            resource: None,
            ..base.clone()
        });
    }
    items.insert(0, base);
    Ok(ClinicalFacts {
        patient,
        items,
        family,
        last_updated: meta.last_updated,
        entered_in_error: false,
    })
}

/// The resource's narrative: its notes, and each reaction's notes and description. It
/// becomes the free-text item and is left out of the coded resource ([`normalised`]).
fn narrative(resource: &Resource<'_>) -> Result<Vec<String>, MappingError> {
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct ReactionNarrative {
        description: Option<String>,
        note: Vec<Annotation>,
    }
    let mut texts: Vec<String> = resource
        .list::<Annotation>("note")?
        .into_iter()
        .filter_map(|a| a.text)
        .collect();
    if resource.resource_type == "AllergyIntolerance" {
        for reaction in resource.list::<ReactionNarrative>("reaction")? {
            texts.extend(reaction.description.map(|d| format!("Reaction: {d}")));
            texts.extend(reaction.note.into_iter().filter_map(|a| a.text));
        }
    }
    texts.retain(|t| !t.trim().is_empty());
    Ok(texts)
}

fn status_text(resource: &Resource<'_>) -> Result<Option<String>, MappingError> {
    if let Some(clinical) = resource.concept("clinicalStatus")? {
        return Ok(clinical
            .coding
            .first()
            .and_then(|c| c.code.clone())
            .or(clinical.text));
    }
    resource.string("status")
}

fn observation_value(resource: &Resource<'_>) -> Result<Option<String>, MappingError> {
    if let Some(q) = resource.field::<Quantity>("valueQuantity")? {
        return Ok(q.render());
    }
    if let Some(c) = resource.concept("valueCodeableConcept")? {
        return Ok(c.display());
    }
    if let Some(s) = resource.string("valueString")? {
        return Ok(Some(s));
    }
    if let Some(b) = resource.field::<bool>("valueBoolean")? {
        return Ok(Some(if b { "yes" } else { "no" }.into()));
    }
    if let Some(i) = resource.field::<i64>("valueInteger")? {
        return Ok(Some(i.to_string()));
    }
    #[derive(Deserialize, Default)]
    #[serde(default, rename_all = "camelCase")]
    struct Component {
        code: CodeableConcept,
        value_quantity: Option<Quantity>,
        value_codeable_concept: Option<CodeableConcept>,
        value_string: Option<String>,
    }
    let parts: Vec<String> = resource
        .list::<Component>("component")?
        .into_iter()
        .filter_map(|c| {
            let value = c
                .value_quantity
                .and_then(|q| q.render())
                .or_else(|| c.value_codeable_concept.and_then(|v| v.display()))
                .or(c.value_string)?;
            Some(match c.code.display() {
                Some(name) => format!("{name}: {value}"),
                None => value,
            })
        })
        .collect();
    Ok((!parts.is_empty()).then(|| parts.join("; ")))
}

fn read_content(
    resource: &Resource<'_>,
    context: &MappingContext<'_>,
) -> Result<Content, MappingError> {
    let mut content = Content {
        concept: None,
        title: None,
        detail: None,
        status: status_text(resource)?,
        effective: None,
        recorded: None,
        natural: DataClass::Coded,
        extra_concepts: Vec::new(),
    };
    match resource.resource_type {
        "AllergyIntolerance" => allergy_content(resource, &mut content)?,
        "MedicationStatement"
        | "MedicationRequest"
        | "MedicationAdministration"
        | "MedicationDispense" => medication_content(resource, context, &mut content)?,
        "Condition" => condition_content(resource, &mut content)?,
        "Observation" | "DiagnosticReport" => {
            observation_or_report_content(resource, &mut content)?
        }
        "Encounter" | "EpisodeOfCare" => encounter_content(resource, &mut content)?,
        "DocumentReference" => document_reference_content(resource, &mut content)?,
        "Composition" => composition_content(resource, &mut content)?,
        "Immunization" => immunization_content(resource, &mut content)?,
        "Procedure" => procedure_content(resource, &mut content)?,
        "Flag" => flag_content(resource, &mut content)?,
        "CarePlan" => care_plan_content(resource, &mut content)?,
        "ServiceRequest" => service_request_content(resource, &mut content)?,
        "FamilyMemberHistory" => family_history_content(resource, &mut content)?,
        "RelatedPerson" => related_person_content(resource, &mut content)?,
        other => unreachable!("{other} is not a supported clinical type"),
    }
    Ok(content)
}

fn allergy_content(resource: &Resource<'_>, content: &mut Content) -> Result<(), MappingError> {
    content.concept = resource.concept("code")?;
    content.effective = resource.first_string(&["onsetDateTime", "recordedDate"])?;
    content.recorded = resource.string("recordedDate")?;
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Reaction {
        manifestation: Vec<CodeableConcept>,
        severity: Option<String>,
    }
    let reactions: Vec<String> = resource
        .list::<Reaction>("reaction")?
        .into_iter()
        .map(|r| {
            let what: Vec<String> = r
                .manifestation
                .iter()
                .filter_map(CodeableConcept::display)
                .collect();
            match r.severity {
                Some(severity) => format!("{} ({severity})", what.join(", ")),
                None => what.join(", "),
            }
        })
        .filter(|s| !s.is_empty())
        .collect();
    let criticality = resource.string("criticality")?;
    content.detail = match (reactions.is_empty(), criticality) {
        (true, None) => None,
        (true, Some(c)) => Some(format!("criticality {c}")),
        (false, None) => Some(format!("Reaction: {}", reactions.join("; "))),
        (false, Some(c)) => Some(format!(
            "Reaction: {}; criticality {c}",
            reactions.join("; ")
        )),
    };
    Ok(())
}

fn medication_content(
    resource: &Resource<'_>,
    context: &MappingContext<'_>,
    content: &mut Content,
) -> Result<(), MappingError> {
    content.concept = match resource.concept("medicationCodeableConcept")? {
        Some(concept) => Some(concept),
        None => match resource.field::<Reference>("medicationReference")? {
            Some(reference) => {
                let target = reference.reference.clone().unwrap_or_default();
                let resolved = if let Some(local) = target.strip_prefix('#') {
                    contained_medication(resource, local)?
                } else {
                    context.references.medication(&target)
                };
                match (resolved, reference.display) {
                    (Some(concept), _) => Some(concept),
                    (None, Some(display)) => Some(CodeableConcept {
                        coding: Vec::new(),
                        text: Some(display),
                    }),
                    (None, None) => {
                        return Err(MappingError {
                            retry_later: true,
                            ..resource.error(format!(
                                "medicationReference {target:?} does not resolve to a Medication in this extract or an earlier one"
                            ))
                        });
                    }
                }
            }
            None => None,
        },
    };
    content.detail = match resource.resource_type {
        "MedicationRequest" | "MedicationDispense" => resource
            .list::<Dosage>("dosageInstruction")?
            .into_iter()
            .find_map(|d| d.text),
        // One dosage, not a list: what was given.
        "MedicationAdministration" => resource.field::<Dosage>("dosage")?.and_then(|d| d.text),
        _ => resource
            .list::<Dosage>("dosage")?
            .into_iter()
            .find_map(|d| d.text),
    };
    content.effective = match resource.resource_type {
        "MedicationRequest" => resource.string("authoredOn")?,
        "MedicationDispense" => resource.first_string(&["whenHandedOver", "whenPrepared"])?,
        _ => match resource.string("effectiveDateTime")? {
            Some(date) => Some(date),
            None => resource
                .period_start("effectivePeriod")?
                .or(resource.string("dateAsserted")?),
        },
    };
    content.recorded = resource.first_string(&["authoredOn", "dateAsserted"])?;
    Ok(())
}

fn condition_content(resource: &Resource<'_>, content: &mut Content) -> Result<(), MappingError> {
    content.concept = resource.concept("code")?;
    content.extra_concepts = resource.list::<CodeableConcept>("category")?;
    content.effective = match resource.string("onsetDateTime")? {
        Some(date) => Some(date),
        None => resource
            .period_start("onsetPeriod")?
            .or(resource.string("recordedDate")?),
    };
    content.recorded = resource.string("recordedDate")?;
    Ok(())
}

fn observation_or_report_content(
    resource: &Resource<'_>,
    content: &mut Content,
) -> Result<(), MappingError> {
    content.concept = resource.concept("code")?;
    content.effective = match resource.string("effectiveDateTime")? {
        Some(date) => Some(date),
        None => resource
            .period_start("effectivePeriod")?
            .or(resource.string("issued")?),
    };
    content.recorded = resource.string("issued")?;
    if resource.resource_type == "Observation" {
        content.detail = observation_value(resource)?;
        // An observation that is only narrative is consultation free text.
        if resource.raw().contains_key("valueString") {
            content.natural = DataClass::FreeText;
        }
        if let Some(interpretation) = resource.first_concept("interpretation")?
            && let (Some(detail), Some(flag)) = (&content.detail, interpretation.display())
        {
            content.detail = Some(format!("{detail} ({flag})"));
        }
    } else {
        content.detail = resource.string("conclusion")?;
    }
    Ok(())
}

fn encounter_content(resource: &Resource<'_>, content: &mut Content) -> Result<(), MappingError> {
    content.concept = resource.first_concept("type")?;
    if content.concept.is_none() && resource.resource_type == "Encounter" {
        #[derive(Deserialize, Default)]
        #[serde(default)]
        struct ClassCoding {
            display: Option<String>,
            code: Option<String>,
        }
        content.title = resource
            .field::<ClassCoding>("class")?
            .and_then(|c| c.display.or(c.code))
            .map(|c| format!("Encounter ({c})"));
    }
    content.effective = resource.period_start("period")?;
    let reason = resource
        .first_concept("reasonCode")?
        .and_then(|c| c.display());
    let provider = resource
        .field::<Reference>(if resource.resource_type == "Encounter" {
            "serviceProvider"
        } else {
            "managingOrganization"
        })?
        .and_then(|r| r.display);
    content.detail = match (reason, provider) {
        (Some(r), Some(p)) => Some(format!("Reason: {r}; at {p}")),
        (Some(r), None) => Some(format!("Reason: {r}")),
        (None, Some(p)) => Some(format!("At {p}")),
        (None, None) => None,
    };
    Ok(())
}

fn document_reference_content(
    resource: &Resource<'_>,
    content: &mut Content,
) -> Result<(), MappingError> {
    content.natural = DataClass::Document;
    content.concept = resource.concept("type")?;
    content.extra_concepts = resource.list::<CodeableConcept>("category")?;
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Attachment {
        title: Option<String>,
        creation: Option<String>,
        #[serde(rename = "contentType")]
        content_type: Option<String>,
        data: Option<String>,
    }
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct DocContent {
        attachment: Attachment,
    }
    let attachment = resource
        .list::<DocContent>("content")?
        .into_iter()
        .next()
        .map(|c| c.attachment)
        .unwrap_or_default();
    content.title = attachment.title.clone();
    content.detail = resource.string("description")?.or_else(|| {
        (attachment.content_type.as_deref() == Some("text/plain"))
            .then(|| attachment.data.as_deref().and_then(decode_base64_text))
            .flatten()
    });
    content.effective = resource.string("date")?.or(attachment.creation);
    content.recorded = resource.string("date")?;
    Ok(())
}

fn composition_content(resource: &Resource<'_>, content: &mut Content) -> Result<(), MappingError> {
    content.natural = DataClass::Document;
    content.concept = resource.concept("type")?;
    content.title = resource.string("title")?;
    content.effective = resource.string("date")?;
    content.recorded = resource.string("date")?;
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct CompositionSection {
        title: Option<String>,
    }
    let titles: Vec<String> = resource
        .list::<CompositionSection>("section")?
        .into_iter()
        .filter_map(|s| s.title)
        .collect();
    content.detail = (!titles.is_empty()).then(|| format!("Sections: {}", titles.join(", ")));
    Ok(())
}

fn immunization_content(
    resource: &Resource<'_>,
    content: &mut Content,
) -> Result<(), MappingError> {
    content.concept = resource.concept("vaccineCode")?;
    content.effective = resource.first_string(&["occurrenceDateTime", "recorded"])?;
    content.recorded = resource.string("recorded")?;
    content.detail = resource
        .field::<Quantity>("doseQuantity")?
        .and_then(|q| q.render())
        .map(|d| format!("Dose {d}"));
    Ok(())
}

fn procedure_content(resource: &Resource<'_>, content: &mut Content) -> Result<(), MappingError> {
    content.concept = resource.concept("code")?;
    content.effective = match resource.string("performedDateTime")? {
        Some(date) => Some(date),
        None => resource.period_start("performedPeriod")?,
    };
    Ok(())
}

fn flag_content(resource: &Resource<'_>, content: &mut Content) -> Result<(), MappingError> {
    content.concept = resource.concept("code")?;
    content.extra_concepts = resource.list::<CodeableConcept>("category")?;
    content.effective = resource.period_start("period")?;
    Ok(())
}

fn care_plan_content(resource: &Resource<'_>, content: &mut Content) -> Result<(), MappingError> {
    content.title = resource.string("title")?;
    content.concept = resource.first_concept("category")?;
    content.detail = resource.string("description")?;
    content.effective = match resource.period_start("period")? {
        Some(date) => Some(date),
        None => resource.string("created")?,
    };
    content.recorded = resource.string("created")?;
    Ok(())
}

fn service_request_content(
    resource: &Resource<'_>,
    content: &mut Content,
) -> Result<(), MappingError> {
    content.concept = resource.concept("code")?;
    content.effective = resource.first_string(&["occurrenceDateTime", "authoredOn"])?;
    content.recorded = resource.string("authoredOn")?;
    content.detail = resource
        .list::<Reference>("performer")?
        .into_iter()
        .find_map(|p| p.display)
        .map(|p| format!("To {p}"));
    Ok(())
}

fn family_history_content(
    resource: &Resource<'_>,
    content: &mut Content,
) -> Result<(), MappingError> {
    let relationship = resource
        .concept("relationship")?
        .and_then(|c| c.display())
        .map(|r| capitalise(&r));
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct FamilyCondition {
        code: Option<CodeableConcept>,
    }
    let conditions: Vec<CodeableConcept> = resource
        .list::<FamilyCondition>("condition")?
        .into_iter()
        .filter_map(|c| c.code)
        .collect();
    let named: Vec<String> = conditions.iter().filter_map(|c| c.display()).collect();
    content.concept = conditions.first().cloned();
    content.title = Some(match (relationship, named.is_empty()) {
        (Some(who), false) => format!("{who}: {}", named.join(", ")),
        (Some(who), true) => format!("{who}: no condition recorded"),
        (None, false) => format!("Family member: {}", named.join(", ")),
        (None, true) => "Family history (not described)".into(),
    });
    content.extra_concepts = conditions.into_iter().skip(1).collect();
    content.effective = resource.string("date")?;
    content.recorded = resource.string("date")?;
    Ok(())
}

fn related_person_content(
    resource: &Resource<'_>,
    content: &mut Content,
) -> Result<(), MappingError> {
    let relationship: Vec<String> = resource
        .list::<CodeableConcept>("relationship")?
        .iter()
        .filter_map(CodeableConcept::display)
        .collect();
    let name = official_name(&resource.list::<HumanName>("name")?);
    content.title = Some(match (name, relationship.is_empty()) {
        (Some(name), false) => format!("{name} ({})", relationship.join(", ")),
        (Some(name), true) => name,
        (None, false) => capitalise(&relationship.join(", ")),
        (None, true) => "Contact (not named)".into(),
    });
    content.effective = resource.period_start("period")?;
    Ok(())
}

/// The resource as an item carries it: narrative left out (generated `text`, and `note`s,
/// which travel in the free-text item), a referenced or contained Medication inlined as
/// `medicationCodeableConcept`, and references to Organizations, Practitioners and Locations
/// given the display names the extract has for them. The subject is rewritten to the NHS
/// number once ingest has resolved it ([`ClinicalFacts::bind_patient`]).
fn normalised(
    resource: &Resource<'_>,
    context: &MappingContext<'_>,
) -> Result<Value, MappingError> {
    let mut object = resource.raw().clone();
    object.remove("text");
    object.remove("note");
    if let Some(Value::Array(reactions)) = object.get_mut("reaction") {
        for reaction in reactions.iter_mut().filter_map(Value::as_object_mut) {
            reaction.remove("note");
            reaction.remove("description");
        }
    }
    if let Some(reference) = resource.field::<Reference>("medicationReference")? {
        let target = reference.reference.clone().unwrap_or_default();
        let concept = match target.strip_prefix('#') {
            Some(local) => contained_medication(resource, local)?,
            None => context.references.medication(&target),
        };
        let concept = concept.map(concept_json).or_else(|| {
            reference
                .display
                .map(|display| serde_json::json!({ "text": display }))
        });
        if let Some(concept) = concept {
            object.remove("medicationReference");
            object.insert("medicationCodeableConcept".into(), concept);
            if let Some(local) = target.strip_prefix('#')
                && let Some(Value::Array(contained)) = object.get_mut("contained")
            {
                contained.retain(|c| c.get("id").and_then(Value::as_str) != Some(local));
            }
        }
    }
    if matches!(object.get("contained"), Some(Value::Array(c)) if c.is_empty()) {
        object.remove("contained");
    }
    let contained_names = contained_names(&object);
    let mut value = Value::Object(object);
    name_references(
        &mut value,
        &|reference: &str| match reference.strip_prefix('#') {
            Some(local) => contained_names.get(local).cloned(),
            None => context.references.display(reference),
        },
    );
    Ok(value)
}

fn concept_json(concept: CodeableConcept) -> Value {
    let coding: Vec<Value> = concept
        .coding
        .into_iter()
        .map(|c| {
            let mut coding = Map::new();
            coding.extend(c.system.map(|v| ("system".to_string(), Value::String(v))));
            coding.extend(c.code.map(|v| ("code".to_string(), Value::String(v))));
            coding.extend(c.display.map(|v| ("display".to_string(), Value::String(v))));
            Value::Object(coding)
        })
        .collect();
    let mut out = Map::new();
    if !coding.is_empty() {
        out.insert("coding".into(), Value::Array(coding));
    }
    out.extend(concept.text.map(|t| ("text".to_string(), Value::String(t))));
    Value::Object(out)
}

/// Names of contained resources by local id (`#id` references).
fn contained_names(object: &Map<String, Value>) -> HashMap<String, String> {
    let Some(Value::Array(contained)) = object.get("contained") else {
        return HashMap::new();
    };
    contained
        .iter()
        .filter_map(|c| {
            let id = c.get("id")?.as_str()?.to_string();
            let name = match c.get("name")? {
                Value::String(name) => name.clone(),
                Value::Array(names) => serde_json::from_value::<HumanName>(names.first()?.clone())
                    .ok()?
                    .render()?,
                _ => return None,
            };
            Some((id, name))
        })
        .collect()
}

/// Adds `display` to every reference that lacks one and whose target has a name.
fn name_references(value: &mut Value, name_of: &dyn Fn(&str) -> Option<String>) {
    match value {
        Value::Object(object) => {
            if let Some(Value::String(reference)) = object.get("reference")
                && !object.contains_key("display")
                && let Some(name) = name_of(reference)
            {
                object.insert("display".into(), Value::String(name));
            }
            for (key, inner) in object.iter_mut() {
                if key != "contained" {
                    name_references(inner, name_of);
                }
            }
        }
        Value::Array(values) => values
            .iter_mut()
            .for_each(|inner| name_references(inner, name_of)),
        _ => {}
    }
}

/// Every reference in a resource, for loading what earlier extracts said about their targets.
pub fn references_in(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(object) => {
            if let Some(Value::String(reference)) = object.get("reference")
                && !reference.starts_with('#')
            {
                out.push(reference.clone());
            }
            object.values().for_each(|inner| references_in(inner, out));
        }
        Value::Array(values) => values.iter().for_each(|inner| references_in(inner, out)),
        _ => {}
    }
}

impl ClinicalFacts {
    /// Names the patient in every item's resource by NHS number, the identity every node
    /// shares, in place of the extract's local reference (which means nothing elsewhere and
    /// may carry the patient's name as its display). Other references in the resource to
    /// the same patient (an asserter, a performer) are rewritten the same way.
    pub fn bind_patient(&mut self, nhs: &caremesh_sync::NhsNumber) {
        let local = match &self.patient {
            PatientRef::Reference(reference) => Some(reference.clone()),
            PatientRef::Identifier { .. } => None,
        };
        let by_nhs = serde_json::json!({
            "identifier": { "system": NHS_NUMBER_SYSTEM, "value": nhs.as_str() }
        });
        for resource in self.items.iter_mut().filter_map(|i| i.resource.as_mut()) {
            bind_patient_in(resource, local.as_deref(), &by_nhs, true);
        }
    }
}

/// The ids of every item a clinical resource can become: its coded item and the free-text
/// item of its notes.
pub fn item_family(resource_key: &str) -> Vec<String> {
    vec![resource_key.to_string(), format!("{resource_key}#note")]
}

/// Rewrites every place `item`'s resource names the patient by NHS number `from` to name
/// `to`: the item's publisher relinked the Patient it came through to another NHS number.
pub fn rebind_item(
    item: &mut Item,
    from: &caremesh_sync::NhsNumber,
    to: &caremesh_sync::NhsNumber,
) {
    fn rebind(value: &mut Value, from: &Value, to: &Value) {
        if value == from {
            *value = to.clone();
            return;
        }
        match value {
            Value::Object(object) => object.values_mut().for_each(|v| rebind(v, from, to)),
            Value::Array(values) => values.iter_mut().for_each(|v| rebind(v, from, to)),
            _ => {}
        }
    }
    let by_nhs = |nhs: &caremesh_sync::NhsNumber| {
        serde_json::json!({
            "identifier": { "system": NHS_NUMBER_SYSTEM, "value": nhs.as_str() }
        })
    };
    if let Some(resource) = item.resource.as_mut() {
        rebind(resource, &by_nhs(from), &by_nhs(to));
    }
}

fn bind_patient_in(value: &mut Value, local: Option<&str>, by_nhs: &Value, top: bool) {
    match value {
        Value::Object(object) => {
            if top {
                for field in ["subject", "patient"] {
                    if object.contains_key(field) {
                        object.insert(field.into(), by_nhs.clone());
                    }
                }
            }
            for (key, inner) in object.iter_mut() {
                if top && (key == "subject" || key == "patient") {
                    continue;
                }
                let names_patient =
                    local.is_some() && inner.get("reference").and_then(Value::as_str) == local;
                if names_patient {
                    *inner = by_nhs.clone();
                } else {
                    bind_patient_in(inner, local, by_nhs, false);
                }
            }
        }
        Value::Array(values) => values
            .iter_mut()
            .for_each(|inner| bind_patient_in(inner, local, by_nhs, false)),
        _ => {}
    }
}

fn contained_medication(
    resource: &Resource<'_>,
    local_id: &str,
) -> Result<Option<CodeableConcept>, MappingError> {
    let contained = resource.list::<Value>("contained")?;
    for value in &contained {
        let inner = Resource::new(value)?;
        if inner.resource_type == "Medication" && inner.id == Some(local_id) {
            return inner.concept("code");
        }
    }
    Ok(None)
}

fn decode_base64_text(data: &str) -> Option<String> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits: u32 = 0;
    let mut count = 0;
    let mut out = Vec::with_capacity(data.len() * 3 / 4);
    for byte in data
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'=')
    {
        let value = ALPHABET.iter().position(|a| *a == byte)? as u32;
        bits = (bits << 6) | value;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
            bits &= (1 << count) - 1;
        }
    }
    String::from_utf8(out).ok()
}

pub(crate) fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct NoMedications;
    impl ReferenceLookup for NoMedications {
        fn medication(&self, _: &str) -> Option<CodeableConcept> {
            None
        }
        fn display(&self, _: &str) -> Option<String> {
            None
        }
    }

    fn map(value: Value) -> Result<Mapped, MappingError> {
        let sensitive = SensitiveCodes::new(["86406008".to_string()]);
        let context = MappingContext {
            source_system: "TEST",
            sensitive: &sensitive,
            references: &NoMedications,
        };
        map_resource(&Resource::new(&value)?, &context)
    }

    fn clinical(value: Value) -> ClinicalFacts {
        match map(value).unwrap() {
            Mapped::Clinical(facts) => facts,
            other => panic!("expected clinical facts, got {other:?}"),
        }
    }

    #[test]
    fn allergy_becomes_a_coded_item_with_reaction_and_provenance() {
        let facts = clinical(json!({
            "resourceType": "AllergyIntolerance", "id": "a1",
            "meta": {"lastUpdated": "2020-01-01T00:00:00Z"},
            "code": {"coding": [{"system": SNOMED, "code": "372687004", "display": "Amoxicillin"}]},
            "patient": {"reference": "Patient/p1"},
            "recordedDate": "2019-12-10",
            "reaction": [{"manifestation": [{"coding": [{"display": "Urticarial rash"}]}], "severity": "mild"}]
        }));
        assert_eq!(facts.patient, PatientRef::Reference("Patient/p1".into()));
        let item = &facts.items[0];
        assert_eq!(item.title, "Amoxicillin");
        assert_eq!(item.section, Section::Allergies);
        assert_eq!(item.class, DataClass::Coded);
        assert_eq!(
            item.detail.as_deref(),
            Some("Reaction: Urticarial rash (mild)")
        );
        assert_eq!(item.source_id, "AllergyIntolerance/a1");
        assert_eq!(item.last_updated.as_deref(), Some("2020-01-01T00:00:00Z"));
    }

    #[test]
    fn wrong_json_type_names_the_resource_and_field() {
        let error = map(json!({
            "resourceType": "Condition", "id": "c1",
            "subject": {"reference": "Patient/p1"}, "code": 42
        }))
        .unwrap_err();
        assert_eq!(error.resource, "Condition/c1");
        assert!(error.problem.contains("`code`"), "{}", error.problem);
        assert!(error.problem.contains("a number"), "{}", error.problem);
    }

    #[test]
    fn entered_in_error_yields_no_items() {
        let facts = clinical(json!({
            "resourceType": "AllergyIntolerance", "id": "a1",
            "verificationStatus": {"coding": [{"code": "entered-in-error"}]},
            "patient": {"reference": "Patient/p1"}
        }));
        assert!(facts.entered_in_error);
        assert!(facts.items.is_empty());
        assert_eq!(facts.family.len(), 2);
    }

    #[test]
    fn sensitive_codes_and_labels_and_private_tags_classify() {
        let hiv = clinical(json!({
            "resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"},
            "code": {"coding": [{"system": SNOMED, "code": "86406008", "display": "HIV"}]}
        }));
        assert_eq!(hiv.items[0].class, DataClass::Sensitive);
        let restricted = clinical(json!({
            "resourceType": "DocumentReference", "id": "d1",
            "subject": {"identifier": {"system": NHS_NUMBER_SYSTEM, "value": "6700028191"}},
            "securityLabel": [{"coding": [{"system": CONFIDENTIALITY_SYSTEM, "code": "V"}]}]
        }));
        assert_eq!(restricted.items[0].class, DataClass::Sensitive);
        let private = clinical(json!({
            "resourceType": "Condition", "id": "c2", "subject": {"reference": "Patient/p1"},
            "meta": {"tag": [{"system": PRIVATE_SYSTEM, "code": PRIVATE_CODE}]},
            "code": {"text": "Private matter"}
        }));
        assert_eq!(private.items[0].class, DataClass::Private);
    }

    #[test]
    fn notes_become_a_separate_free_text_item() {
        let facts = clinical(json!({
            "resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"},
            "code": {"text": "Asthma"}, "note": [{"text": "Worse in winter"}]
        }));
        assert_eq!(facts.items.len(), 2);
        assert_eq!(facts.items[1].class, DataClass::FreeText);
        assert_eq!(facts.items[1].id, "Condition/c1#note");
    }

    #[test]
    fn blood_pressure_components_render() {
        let facts = clinical(json!({
            "resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/p1"},
            "code": {"text": "Blood pressure"},
            "component": [
                {"code": {"text": "Systolic"}, "valueQuantity": {"value": 120, "unit": "mmHg"}},
                {"code": {"text": "Diastolic"}, "valueQuantity": {"value": 80, "unit": "mmHg"}}
            ]
        }));
        assert_eq!(
            facts.items[0].detail.as_deref(),
            Some("Systolic: 120 mmHg; Diastolic: 80 mmHg")
        );
    }

    #[test]
    fn unresolvable_medication_reference_is_an_error_not_a_blank() {
        let error = map(json!({
            "resourceType": "MedicationRequest", "id": "m1", "subject": {"reference": "Patient/p1"},
            "medicationReference": {"reference": "Medication/unknown"}
        }))
        .unwrap_err();
        assert!(error.problem.contains("Medication/unknown"));
    }

    #[test]
    fn unsupported_types_are_reported_as_such() {
        assert!(matches!(
            map(json!({"resourceType": "Appointment", "id": "x"})).unwrap(),
            Mapped::Unsupported
        ));
    }

    #[test]
    fn items_carry_the_resource_without_narrative_and_named_by_nhs_number() {
        let mut facts = clinical(json!({
            "resourceType": "MedicationStatement", "id": "m1",
            "text": {"status": "generated", "div": "<div>Richard Smith takes</div>"},
            "subject": {"reference": "Patient/p1", "display": "Richard Smith"},
            "informationSource": {"reference": "Patient/p1"},
            "contained": [{"resourceType": "Medication", "id": "med",
                           "code": {"coding": [{"system": SNOMED, "code": "3214", "display": "Simvastatin 20mg tablets"}]}}],
            "medicationReference": {"reference": "#med"},
            "status": "active",
            "dosage": [{"doseAndRate": [{"doseQuantity": {"value": 20, "unit": "mg"}}]}],
            "note": [{"text": "MARKER-NOTE"}]
        }));
        let nhs = caremesh_sync::NhsNumber::parse("9912003888").unwrap();
        facts.bind_patient(&nhs);
        let resource = facts.items[0].resource.as_ref().unwrap();
        let text = resource.to_string();
        assert!(
            !text.contains("MARKER-NOTE"),
            "notes travel only as free text: {text}"
        );
        assert!(!text.contains("Richard"), "no name, no narrative: {text}");
        assert_eq!(resource["subject"]["identifier"]["value"], "9912003888");
        assert_eq!(
            resource["informationSource"]["identifier"]["value"],
            "9912003888"
        );
        assert_eq!(
            resource["medicationCodeableConcept"]["coding"][0]["display"],
            "Simvastatin 20mg tablets"
        );
        assert!(resource.get("contained").is_none());
        assert_eq!(
            resource["dosage"][0]["doseAndRate"][0]["doseQuantity"]["value"],
            20
        );
        assert!(facts.items[1].resource.is_none());
        assert_eq!(facts.items[1].detail.as_deref(), Some("MARKER-NOTE"));
    }

    #[test]
    fn base64_text_attachments_decode() {
        assert_eq!(
            decode_base64_text("aGVsbG8gd29ybGQ=").as_deref(),
            Some("hello world")
        );
    }
}
