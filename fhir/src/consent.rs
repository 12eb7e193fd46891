//! FHIR Consent resources to a patient's sharing choices at this organisation.
//!
//! FHIR has no codes named "Share Out" or "Share In"; clinical systems export the choices
//! as R4 Consents, and caremesh reads them by what they govern:
//!
//! | Consent                                                       | choice    | permit | deny |
//! |---------------------------------------------------------------|-----------|--------|------|
//! | `category` v3-ActCode `IDSCL` (information disclosure)        | Share Out | on     | off  |
//! | `category` v3-ActCode `INFA`, `INFAO`, `INFASO` (access)       | Share In  | on     | off  |
//! | neither category, `provision.purpose` v3-ActReason `TREAT`    | objection | none   | recorded |
//!
//! `provision.type` absent means permit, as in the UK Core example. An `active` Consent sets
//! the choice; an `inactive`, `rejected` or `entered-in-error` one takes it back to the
//! organisation's default; `draft` and `proposed` are not in force and change nothing.
//! Consents about anything else (research, advance directives) are counted as unsupported.

use super::{CodeableConcept, FhirCoding, MappingError, PatientRef, Resource, patient_ref};
use caremesh_sync::policy::Consent;
use serde::Deserialize;

const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
const ACT_REASON: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";

/// Which of a patient's sharing choices a Consent records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharingChoice {
    ShareOut,
    ShareIn,
    Objection,
}

#[derive(Debug)]
pub struct ConsentFacts {
    pub patient: PatientRef,
    pub choice: SharingChoice,
    /// The choice's new value; `None` when the Consent is no longer in force, so the
    /// organisation's default applies again.
    pub value: Option<bool>,
    pub last_updated: Option<String>,
}

impl ConsentFacts {
    /// `current` with this Consent's choice applied.
    pub fn apply(&self, current: Consent, defaults: Consent) -> Consent {
        let mut consent = current;
        match self.choice {
            SharingChoice::ShareOut => consent.share_out = self.value.unwrap_or(defaults.share_out),
            SharingChoice::ShareIn => consent.share_in = self.value.unwrap_or(defaults.share_in),
            SharingChoice::Objection => {
                consent.objection = self.value.unwrap_or(defaults.objection)
            }
        }
        consent
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Provision {
    #[serde(rename = "type")]
    kind: Option<String>,
    purpose: Vec<FhirCoding>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Meta {
    #[serde(rename = "lastUpdated")]
    last_updated: Option<String>,
}

/// `Ok(None)`: a Consent caremesh does not act on (not a sharing choice, or not in force).
pub fn map_consent(resource: &Resource<'_>) -> Result<Option<ConsentFacts>, MappingError> {
    let status = resource
        .string("status")?
        .ok_or_else(|| resource.error("has no `status`; caremesh cannot tell if it is in force"))?;
    let in_force = match status.as_str() {
        "active" => true,
        "inactive" | "rejected" | "entered-in-error" => false,
        "draft" | "proposed" => return Ok(None),
        other => {
            return Err(resource.error(format!(
                "`status` is `{other}`, not an R4 Consent status (active, inactive, rejected, entered-in-error, draft, proposed)"
            )));
        }
    };
    let categories = resource.list::<CodeableConcept>("category")?;
    let provision = resource
        .field::<Provision>("provision")?
        .unwrap_or_default();
    let has_category = |codes: &[&str]| {
        categories.iter().flat_map(|c| &c.coding).any(|c| {
            c.system.as_deref() == Some(ACT_CODE)
                && c.code.as_deref().is_some_and(|code| codes.contains(&code))
        })
    };
    let choice = if has_category(&["IDSCL"]) {
        SharingChoice::ShareOut
    } else if has_category(&["INFA", "INFAO", "INFASO"]) {
        SharingChoice::ShareIn
    } else if provision
        .purpose
        .iter()
        .any(|p| p.system.as_deref() == Some(ACT_REASON) && p.code.as_deref() == Some("TREAT"))
    {
        SharingChoice::Objection
    } else {
        return Ok(None);
    };
    let permit = match provision.kind.as_deref() {
        None | Some("permit") => true,
        Some("deny") => false,
        Some(other) => {
            return Err(resource.error(format!(
                "`provision.type` is `{other}`, expected `permit` or `deny`"
            )));
        }
    };
    let value = match choice {
        SharingChoice::Objection => !permit,
        SharingChoice::ShareOut | SharingChoice::ShareIn => permit,
    };
    Ok(Some(ConsentFacts {
        patient: patient_ref(resource)?,
        choice,
        value: in_force.then_some(value),
        last_updated: resource.field::<Meta>("meta")?.and_then(|m| m.last_updated),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(value: serde_json::Value) -> Result<Option<ConsentFacts>, MappingError> {
        map_consent(&Resource::new(&value).unwrap())
    }

    fn consent(status: &str, category: Option<&str>, kind: Option<&str>) -> serde_json::Value {
        let mut value = json!({
            "resourceType": "Consent", "id": "c1", "status": status,
            "patient": {"reference": "Patient/p1"},
            "provision": {"purpose": [{"system": ACT_REASON, "code": "TREAT"}]}
        });
        if let Some(code) = category {
            value["category"] = json!([{"coding": [{"system": ACT_CODE, "code": code}]}]);
        }
        if let Some(kind) = kind {
            value["provision"]["type"] = json!(kind);
        }
        value
    }

    const DEFAULTS: Consent = Consent {
        share_out: true,
        share_in: true,
        objection: false,
    };

    #[test]
    fn each_choice_is_read_from_its_category_or_purpose() {
        let cases = [
            (Some("IDSCL"), Some("deny"), SharingChoice::ShareOut, false),
            (Some("IDSCL"), Some("permit"), SharingChoice::ShareOut, true),
            (Some("INFA"), None, SharingChoice::ShareIn, true),
            (Some("INFASO"), Some("deny"), SharingChoice::ShareIn, false),
            (None, Some("deny"), SharingChoice::Objection, true),
            (None, Some("permit"), SharingChoice::Objection, false),
        ];
        for (category, kind, choice, value) in cases {
            let facts = map(consent("active", category, kind)).unwrap().unwrap();
            assert_eq!((facts.choice, facts.value), (choice, Some(value)));
        }
        let objection = map(consent("active", None, Some("deny"))).unwrap().unwrap();
        assert!(objection.apply(DEFAULTS, DEFAULTS).objection);
    }

    #[test]
    fn a_consent_no_longer_in_force_returns_the_choice_to_the_default() {
        let facts = map(consent("inactive", Some("IDSCL"), Some("deny")))
            .unwrap()
            .unwrap();
        assert_eq!(facts.value, None);
        let withdrawn = Consent {
            share_out: false,
            ..DEFAULTS
        };
        assert!(facts.apply(withdrawn, DEFAULTS).share_out);
        assert!(
            map(consent("draft", Some("IDSCL"), None))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn consents_about_other_things_are_not_sharing_choices_and_bad_values_are_named() {
        let mut research = consent("active", None, None);
        research["provision"]["purpose"] = json!([{"system": ACT_REASON, "code": "HRESCH"}]);
        assert!(map(research).unwrap().is_none());
        let error = map(consent("signed", Some("IDSCL"), None)).unwrap_err();
        assert!(error.problem.contains("`status` is `signed`"), "{error}");
        let error = map(consent("active", Some("IDSCL"), Some("maybe"))).unwrap_err();
        assert!(error.problem.contains("provision.type"), "{error}");
    }
}
