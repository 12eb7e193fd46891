//! Who the record is about, as the patient banner shows it: a safety control.
//!
//! The NHS number is the key, but a record filed against the wrong number shows itself as a
//! mismatch in name, date of birth, gender or death. So the banner shows the viewing
//! organisation's own demographics where it has them, else the registered GP's, else the
//! most recently updated, and always names the source; and when sources disagree on any of
//! those four it lists each source's version. No source can take over the banner by sending
//! a newer Patient.

use caremesh_fhir::clock;
use caremesh_sync::Item;
use serde::Serialize;
use serde_json::Value;

/// One source's demographics for the patient.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DemographicsVersion {
    pub ods: String,
    pub organisation: String,
    pub kind: String,
    pub name: Option<String>,
    pub birth_date: Option<String>,
    pub gender: Option<String>,
    /// `Some` when the source records the patient as deceased: the date, or "" when it
    /// gives none.
    pub deceased: Option<String>,
    pub postcode: Option<String>,
    /// `Patient.generalPractitioner` as this source records it.
    pub general_practitioner: Option<String>,
    pub last_updated: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Demographics {
    pub name: Option<String>,
    pub birth_date: Option<String>,
    /// Age in years (months under two), at death for a deceased patient.
    pub age: Option<String>,
    pub gender: Option<String>,
    pub deceased: Option<String>,
    pub postcode: Option<String>,
    pub registered_gp: Option<String>,
    /// Where the registered GP was read from.
    pub registered_gp_source: Option<String>,
    /// The organisation whose demographics the banner shows.
    pub source: String,
    pub source_ods: String,
    /// Why that organisation's: own record, registered GP's, or the newest.
    pub chosen_because: &'static str,
}

/// Sources disagreeing on one identifying field, with each source's version.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Conflict {
    pub field: &'static str,
    /// (organisation, its value or "not recorded").
    pub versions: Vec<(String, String)>,
}

pub struct Identity {
    pub demographics: Option<Demographics>,
    pub conflicts: Vec<Conflict>,
    pub versions: Vec<DemographicsVersion>,
}

/// Reads one source's demographics item: from its Patient resource, or from the summary
/// fields of a format 1 item.
pub fn version_of(item: &Item, ods: &str, organisation: &str, kind: &str) -> DemographicsVersion {
    let field = |name: &str| item.fields.get(name).cloned();
    let mut version = DemographicsVersion {
        ods: ods.to_string(),
        organisation: organisation.to_string(),
        kind: kind.to_string(),
        name: field("name"),
        birth_date: field("birth_date"),
        gender: field("gender"),
        deceased: None,
        postcode: None,
        general_practitioner: field("registered_gp"),
        last_updated: item.last_updated.clone(),
    };
    if let Some(patient) = &item.resource {
        if let Some(date) = patient.get("deceasedDateTime").and_then(Value::as_str) {
            version.deceased = Some(date.to_string());
        } else if patient.get("deceasedBoolean").and_then(Value::as_bool) == Some(true) {
            version.deceased = Some(String::new());
        }
        let addresses = patient.get("address").and_then(Value::as_array);
        version.postcode = addresses.and_then(|list| {
            list.iter()
                .find(|a| a.get("use").and_then(Value::as_str) == Some("home"))
                .or_else(|| list.first())
                .and_then(|a| a.get("postalCode"))
                .and_then(Value::as_str)
                .map(str::to_string)
        });
        if let Some(gp) = patient
            .get("generalPractitioner")
            .and_then(Value::as_array)
            .and_then(|l| l.first())
        {
            version.general_practitioner = gp
                .get("display")
                .and_then(Value::as_str)
                .or_else(|| gp.pointer("/identifier/value").and_then(Value::as_str))
                .map(str::to_string)
                .or(version.general_practitioner);
        }
    }
    version
}

/// Chooses the banner's demographics and finds disagreements. `today` is a `YYYY-MM-DD`
/// date for working out age.
pub fn identify(mut versions: Vec<DemographicsVersion>, viewer: &str, today: &str) -> Identity {
    // Newest first, so that within one organisation its latest Patient speaks.
    versions.sort_by(|a, b| b.last_updated.cmp(&a.last_updated));
    let own = versions.iter().find(|v| v.ods == viewer);
    let gp = versions.iter().find(|v| v.kind == "gp");
    let (chosen, chosen_because) = match (own, gp) {
        (Some(own), _) => (Some(own), "this organisation's own record"),
        (None, Some(gp)) => (Some(gp), "the registered GP's record"),
        (None, None) => (
            versions.first(),
            "the most recently updated record: neither this organisation nor a GP practice holds one",
        ),
    };
    let demographics = chosen.map(|chosen| {
        let (registered_gp, registered_gp_source) = registered_gp(&versions, chosen);
        // Death recorded by any source is shown even when the chosen one lacks it; the
        // conflict below names who says so.
        let deceased = chosen
            .deceased
            .clone()
            .or_else(|| versions.iter().find_map(|v| v.deceased.clone()));
        let died_on = deceased.as_deref().filter(|d| !d.is_empty());
        Demographics {
            name: chosen.name.clone(),
            birth_date: chosen.birth_date.clone(),
            // A dead patient's age is their age at death, and says so.
            age: chosen.birth_date.as_deref().and_then(|born| {
                let years = age(born, died_on.unwrap_or(today))?;
                Some(match died_on {
                    Some(_) => format!("{years} at death"),
                    None => years,
                })
            }),
            gender: chosen.gender.clone(),
            deceased,
            postcode: chosen.postcode.clone(),
            registered_gp,
            registered_gp_source,
            source: chosen.organisation.clone(),
            source_ods: chosen.ods.clone(),
            chosen_because,
        }
    });
    let conflicts = conflicts(&versions);
    Identity {
        demographics,
        conflicts,
        versions,
    }
}

/// The registered GP: `generalPractitioner` as a GP practice records it, else the GP
/// practice that publishes about the patient, else what the chosen source records, named.
fn registered_gp(
    versions: &[DemographicsVersion],
    chosen: &DemographicsVersion,
) -> (Option<String>, Option<String>) {
    if let Some(gp) = versions
        .iter()
        .find(|v| v.kind == "gp" && v.general_practitioner.is_some())
    {
        return (
            gp.general_practitioner.clone(),
            Some(gp.organisation.clone()),
        );
    }
    if let Some(gp) = versions.iter().find(|v| v.kind == "gp") {
        return (
            Some(format!("{} ({})", gp.organisation, gp.ods)),
            Some(format!(
                "{} publishes this patient's GP record",
                gp.organisation
            )),
        );
    }
    match &chosen.general_practitioner {
        Some(gp) => (Some(gp.clone()), Some(chosen.organisation.clone())),
        None => (None, None),
    }
}

/// Reads one identifying field of a version, normalised for comparison.
type FieldReader = fn(&DemographicsVersion) -> Option<String>;

fn conflicts(versions: &[DemographicsVersion]) -> Vec<Conflict> {
    let fields: [(&'static str, FieldReader); 4] = [
        ("Name", |v| v.name.as_deref().map(normalise_name)),
        ("Date of birth", |v| v.birth_date.clone()),
        ("Gender", |v| v.gender.clone()),
        ("Deceased", |v| {
            Some(match &v.deceased {
                Some(date) if !date.is_empty() => format!("deceased {}", clock::uk_date(date)),
                Some(_) => "deceased".into(),
                None => "not recorded as deceased".into(),
            })
        }),
    ];
    let mut out = Vec::new();
    for (field, value_of) in fields {
        let mut distinct: Vec<String> = versions.iter().filter_map(value_of).collect();
        distinct.sort();
        distinct.dedup();
        if distinct.len() < 2 {
            continue;
        }
        let shown = |v: &DemographicsVersion| match field {
            "Name" => v.name.clone(),
            "Date of birth" => v.birth_date.as_deref().map(clock::uk_date),
            "Gender" => v.gender.clone(),
            _ => value_of(v),
        };
        let mut listed: Vec<(String, String)> = Vec::new();
        for version in versions {
            let entry = (
                format!("{} ({})", version.organisation, version.ods),
                shown(version).unwrap_or_else(|| "not recorded".into()),
            );
            if !listed.contains(&entry) {
                listed.push(entry);
            }
        }
        out.push(Conflict {
            field,
            versions: listed,
        });
    }
    out
}

/// Names compare without case, punctuation or spacing differences ("SMITH, Richard" and
/// "Richard Smith" are the same words in another order, which is also the same name).
fn normalise_name(name: &str) -> String {
    let mut words: Vec<String> = name
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .filter(|w| !matches!(w.as_str(), "mr" | "mrs" | "ms" | "miss" | "dr" | "mx"))
        .collect();
    words.sort();
    words.join(" ")
}

/// Age between a FHIR birth date and a date (`YYYY-MM-DD…`): years, or months under two.
pub fn age(born: &str, on: &str) -> Option<String> {
    let parse = |text: &str| chrono::NaiveDate::parse_from_str(text.get(..10)?, "%Y-%m-%d").ok();
    use chrono::Datelike;
    let (born, on) = (parse(born)?, parse(on)?);
    let mut months = (on.year() - born.year()) * 12 + on.month() as i32 - born.month() as i32;
    if on.day() < born.day() {
        months -= 1;
    }
    let months = u32::try_from(months).ok()?;
    Some(if months < 24 {
        format!("{months} months")
    } else {
        format!("{} years", months / 12)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(
        ods: &str,
        kind: &str,
        name: &str,
        born: &str,
        updated: &str,
    ) -> DemographicsVersion {
        DemographicsVersion {
            ods: ods.into(),
            organisation: format!("Org {ods}"),
            kind: kind.into(),
            name: Some(name.into()),
            birth_date: Some(born.into()),
            gender: Some("male".into()),
            deceased: None,
            postcode: None,
            general_practitioner: None,
            last_updated: Some(updated.into()),
        }
    }

    #[test]
    fn a_newer_patient_from_another_source_never_takes_over_the_banner() {
        let gp = version("A81001", "gp", "Arthur Smith", "2018-08-27", "2020-01-01");
        let hospice = version(
            "8HA15",
            "hospice",
            "Arthur James Smyth",
            "1950-03-01",
            "2026-11-30",
        );
        let identity = identify(vec![hospice, gp], "A81001", "2026-11-30");
        let shown = identity.demographics.unwrap();
        assert_eq!(shown.name.as_deref(), Some("Arthur Smith"));
        assert_eq!(shown.source_ods, "A81001");
        assert_eq!(shown.registered_gp.as_deref(), Some("Org A81001 (A81001)"));
        let fields: Vec<&str> = identity.conflicts.iter().map(|c| c.field).collect();
        assert_eq!(fields, ["Name", "Date of birth"]);
        assert!(identity.conflicts[0].versions.contains(&(
            "Org 8HA15 (8HA15)".to_string(),
            "Arthur James Smyth".to_string()
        )));
    }

    #[test]
    fn without_its_own_record_a_viewer_sees_the_gps_and_the_same_name_is_no_conflict() {
        let gp = version("A81001", "gp", "SMITH, Richard", "1950-03-01", "2020-01-01");
        let acute = version("RTH", "acute", "Richard Smith", "1950-03-01", "2026-01-01");
        let identity = identify(vec![acute, gp], "8HA15", "2026-11-30");
        assert_eq!(identity.demographics.unwrap().source_ods, "A81001");
        assert!(identity.conflicts.is_empty());
    }

    #[test]
    fn death_recorded_anywhere_is_shown_and_disagreement_is_a_conflict() {
        let gp = version("A81001", "gp", "Ann Lee", "1940-01-05", "2020-01-01");
        let mut hospice = version("8HA15", "hospice", "Ann Lee", "1940-01-05", "2026-01-01");
        hospice.deceased = Some("2026-02-10T09:00:00Z".into());
        let identity = identify(vec![gp, hospice], "A81001", "2026-11-30");
        let shown = identity.demographics.unwrap();
        assert_eq!(shown.deceased.as_deref(), Some("2026-02-10T09:00:00Z"));
        assert_eq!(identity.conflicts[0].field, "Deceased");
    }

    #[test]
    fn ages_count_whole_years_months_for_infants_and_stop_at_death() {
        assert_eq!(age("1950-03-01", "2026-02-28").as_deref(), Some("75 years"));
        // Dead, by another source's record: the age is at death and says so.
        let mut hospice = version(
            "8HA15",
            "hospice",
            "Arthur Smith",
            "1950-03-01",
            "2026-01-02",
        );
        hospice.deceased = Some("2024-05-01".into());
        let gp = version("A81001", "gp", "Arthur Smith", "1950-03-01", "2026-01-01");
        let shown = identify(vec![hospice, gp], "A81001", "2026-11-30")
            .demographics
            .unwrap();
        assert_eq!(shown.deceased.as_deref(), Some("2024-05-01"));
        assert_eq!(shown.age.as_deref(), Some("74 years at death"));
        assert_eq!(age("1950-03-01", "2026-03-01").as_deref(), Some("76 years"));
        assert_eq!(
            age("2025-06-15", "2026-11-30").as_deref(),
            Some("17 months")
        );
        assert_eq!(
            age("1950", "2026-11-30"),
            None,
            "a partial birth date gives no age"
        );
    }
}
