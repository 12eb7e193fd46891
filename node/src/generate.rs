//! `caremesh generate`: synthetic, UK-flavoured FHIR R4 extracts.
//!
//! Deterministic for a seed (`caremesh_sync::rng`, no OS randomness, a fixed reference date),
//! so benchmarks and demos are reproducible. Test NHS numbers are in the 999 range with valid
//! Modulus 11 check digits. One collection Bundle per patient, as a practice extract sends.

use crate::fhir::{NHS_NUMBER_SYSTEM, ODS_SYSTEM, PRIVATE_CODE, PRIVATE_SYSTEM, SNOMED};
use caremesh_sync::rng::Rng;
use caremesh_sync::{NhsNumber, OdsCode};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// Days since 1970-01-01 of the generator's "today" (2026-01-01), fixed for determinism.
const REFERENCE_DAY: i64 = 20_454;

/// The `index`-th test NHS number for a seed: 999 followed by six digits and a check digit,
/// skipping prefixes that have no valid check digit. Unique per (seed, index).
pub fn test_nhs_number(seed: u64, index: u64) -> NhsNumber {
    // Spread seeds apart; within a seed, consecutive indexes give consecutive bodies.
    let mut body = (seed.wrapping_mul(7_919) % 500_000) + index * 2;
    loop {
        let digits = format!("999{:06}", body % 1_000_000);
        if let Some(check) = NhsNumber::check_digit(digits.as_bytes()) {
            return NhsNumber::parse(&format!("{digits}{check}")).expect("constructed valid");
        }
        body += 1;
    }
}

fn date(day: i64) -> String {
    crate::clock::rfc3339(day * 86_400)[..10].to_string()
}

fn date_time(day: i64, rng: &mut Rng) -> String {
    let seconds = day * 86_400 + 8 * 3600 + rng.below(10 * 3600) as i64;
    crate::clock::rfc3339(seconds)
}

fn concept(code: &str, display: &str) -> Value {
    json!({ "coding": [{ "system": SNOMED, "code": code, "display": display }], "text": display })
}

const GIVEN_F: &[&str] = &[
    "Olivia", "Amelia", "Isla", "Ava", "Mia", "Freya", "Lily", "Grace", "Margaret", "Joan",
    "Priya", "Aisha",
];
const GIVEN_M: &[&str] = &[
    "Oliver", "George", "Arthur", "Noah", "Muhammad", "Leo", "Harry", "Oscar", "William", "Arjun",
    "David", "Kwame",
];
const FAMILY: &[&str] = &[
    "Smith", "Jones", "Taylor", "Brown", "Williams", "Wilson", "Johnson", "Davies", "Patel",
    "Robinson", "Wright", "Thompson", "Evans", "Walker", "Khan", "Hughes", "Edwards", "Green",
    "Okafor", "Murphy",
];
const TOWNS: &[(&str, &str)] = &[
    ("Oxford", "OX1"),
    ("Banbury", "OX16"),
    ("Witney", "OX28"),
    ("Bicester", "OX26"),
    ("Abingdon", "OX14"),
    ("Didcot", "OX11"),
];

const ALLERGIES: &[(&str, &str, &str)] = &[
    ("91936005", "Allergy to penicillin", "Urticarial rash"),
    ("294505008", "Allergy to amoxicillin", "Rash"),
    ("300916003", "Latex allergy", "Contact dermatitis"),
    ("91935009", "Allergy to peanuts", "Anaphylaxis"),
    ("293586001", "Allergy to aspirin", "Wheeze"),
];
const PROBLEMS: &[(&str, &str)] = &[
    ("195967001", "Asthma"),
    ("44054006", "Type 2 diabetes mellitus"),
    ("38341003", "Hypertensive disorder"),
    ("13645005", "Chronic obstructive pulmonary disease"),
    ("35489007", "Depressive disorder"),
    ("396275006", "Osteoarthritis"),
    ("49436004", "Atrial fibrillation"),
    ("433144002", "Chronic kidney disease stage 3"),
    ("40930008", "Hypothyroidism"),
    ("84757009", "Epilepsy"),
];
const SENSITIVE_PROBLEMS: &[(&str, &str)] = &[
    ("86406008", "Human immunodeficiency virus infection"),
    ("105629000", "Chlamydial infection"),
    ("93461009", "Gender dysphoria"),
    ("386639001", "Termination of pregnancy"),
];
const MEDICATIONS: &[(&str, &str, &str)] = &[
    (
        "39113611000001102",
        "Salbutamol 100micrograms/dose inhaler CFC free",
        "Two puffs when required",
    ),
    (
        "42109611000001109",
        "Metformin 500mg tablets",
        "One tablet twice a day with meals",
    ),
    (
        "39695211000001102",
        "Amlodipine 5mg tablets",
        "One tablet once a day",
    ),
    (
        "42206511000001102",
        "Ramipril 5mg capsules",
        "One capsule once a day",
    ),
    (
        "39732311000001104",
        "Atorvastatin 20mg tablets",
        "One tablet at night",
    ),
    (
        "42382511000001102",
        "Levothyroxine sodium 100microgram tablets",
        "One tablet each morning",
    ),
    (
        "39109611000001101",
        "Sertraline 50mg tablets",
        "One tablet once a day",
    ),
    (
        "41982611000001101",
        "Apixaban 5mg tablets",
        "One tablet twice a day",
    ),
];
const IMMUNISATIONS: &[(&str, &str)] = &[
    ("1037311000000106", "Influenza vaccine"),
    ("1119349007", "COVID-19 mRNA vaccine"),
    ("871751006", "Hepatitis A vaccine"),
    ("836380007", "Haemophilus influenzae type b vaccine"),
];
const PROCEDURES: &[(&str, &str)] = &[
    ("80146002", "Appendicectomy"),
    ("52734007", "Total hip replacement"),
    ("73761001", "Colonoscopy"),
    ("232717009", "Coronary artery bypass graft"),
];
const LETTERS: &[(&str, &str, &str)] = &[
    (
        "373942005",
        "Discharge summary",
        "Admitted with shortness of breath. Treated and discharged home; GP to review medication in two weeks.",
    ),
    (
        "371531000",
        "Outpatient clinic letter",
        "Seen in clinic. Condition stable. Continue current treatment; review in six months.",
    ),
    (
        "736253002",
        "Mental health crisis plan",
        "Crisis plan agreed with the patient: contacts, early warning signs and what helps.",
    ),
];
const CONSULTATIONS: &[&str] = &[
    "Presents with cough for two weeks, no fever. Chest clear. Advised fluids and rest; return if worse.",
    "Medication review. Tolerating treatment well, no side effects reported. Continue.",
    "Reports low mood and poor sleep. Discussed options; referred to talking therapies.",
    "Annual review. Blood pressure satisfactory. Bloods requested.",
    "Knee pain after a fall. No bony tenderness. Analgesia and physiotherapy advice given.",
];

pub struct GenerateOptions {
    pub org: OdsCode,
    pub patients: u64,
    pub seed: u64,
    pub out: PathBuf,
}

pub struct Generated {
    pub files: usize,
    pub resources: usize,
    pub nhs_numbers: Vec<NhsNumber>,
}

pub fn generate(options: &GenerateOptions) -> std::io::Result<Generated> {
    std::fs::create_dir_all(&options.out)?;
    let mut generated = Generated {
        files: 0,
        resources: 0,
        nhs_numbers: Vec::with_capacity(options.patients as usize),
    };
    for index in 0..options.patients {
        let nhs = test_nhs_number(options.seed, index);
        let mut rng = Rng::new(options.seed.wrapping_mul(1_000_003).wrapping_add(index));
        let bundle = patient_bundle(&options.org, &nhs, index, &mut rng);
        generated.resources += bundle["entry"].as_array().map_or(0, Vec::len);
        write_file(&options.out.join(format!("{nhs}.json")), &bundle)?;
        generated.files += 1;
        generated.nhs_numbers.push(nhs);
    }
    Ok(generated)
}

fn write_file(path: &Path, value: &Value) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(value).expect("generated JSON serialises");
    std::fs::write(path, bytes)
}

struct Builder<'a> {
    org: &'a OdsCode,
    patient_ref: String,
    prefix: String,
    entries: Vec<Value>,
    counter: usize,
}

impl Builder<'_> {
    fn add(&mut self, mut resource: Value, rng: &mut Rng, day: i64) -> String {
        self.counter += 1;
        let kind = resource["resourceType"]
            .as_str()
            .expect("typed")
            .to_string();
        let id = format!("{}-{}", self.prefix, self.counter);
        resource["id"] = json!(id);
        let updated = date_time(day.min(REFERENCE_DAY), rng);
        let meta = resource
            .as_object_mut()
            .expect("object")
            .entry("meta")
            .or_insert_with(|| json!({}));
        meta["lastUpdated"] = json!(updated);
        let reference = format!("{kind}/{id}");
        self.entries.push(json!({ "fullUrl": format!("urn:caremesh:{}:{reference}", self.org), "resource": resource }));
        reference
    }
}

/// Titles are for adults; children's records carry none.
fn title(female: bool, age_years: i64) -> Vec<&'static str> {
    match (age_years >= 18, female) {
        (false, _) => Vec::new(),
        (true, true) => vec!["Ms"],
        (true, false) => vec!["Mr"],
    }
}

fn patient_bundle(org: &OdsCode, nhs: &NhsNumber, index: u64, rng: &mut Rng) -> Value {
    let female = rng.percent(52);
    let given = *rng.pick(if female { GIVEN_F } else { GIVEN_M });
    let family = *rng.pick(FAMILY);
    let age_years = rng.range(1, 95) as i64;
    let birth_day = REFERENCE_DAY - age_years * 365 - rng.below(365) as i64;
    let (town, postcode) = *rng.pick(TOWNS);
    let patient_id = format!("{org}-P{index}");
    let mut builder = Builder {
        org,
        patient_ref: format!("Patient/{patient_id}"),
        prefix: format!("{org}-P{index}"),
        entries: Vec::new(),
        counter: 0,
    };
    builder.entries.push(json!({
        "fullUrl": format!("urn:caremesh:{org}:Patient/{patient_id}"),
        "resource": {
            "resourceType": "Patient",
            "id": patient_id,
            "meta": { "lastUpdated": date_time(REFERENCE_DAY - 30, rng) },
            "identifier": [{ "system": NHS_NUMBER_SYSTEM, "value": nhs.as_str() }],
            "name": [{ "use": "official", "family": family, "given": [given], "prefix": title(female, age_years) }],
            "gender": if female { "female" } else { "male" },
            "birthDate": date(birth_day),
            "address": [{ "city": town, "postalCode": format!("{postcode} {}{}", rng.range(1, 9), ["AB", "JD", "TR", "XY"][rng.below(4) as usize]) }],
            "generalPractitioner": [{ "identifier": { "system": ODS_SYSTEM, "value": org.as_str() }, "display": format!("{org} practice") }]
        }
    }));
    let subject = json!({ "reference": builder.patient_ref.clone() });
    // Nothing can happen to a patient before they were born.
    let recent = |rng: &mut Rng, within_days: u64| {
        (REFERENCE_DAY - rng.below(within_days) as i64).max(birth_day + 1)
    };

    for _ in 0..rng.range(0, 2) {
        let (code, display, reaction) = *rng.pick(ALLERGIES);
        let day = recent(rng, 3650);
        builder.add(json!({
            "resourceType": "AllergyIntolerance",
            "clinicalStatus": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active" }] },
            "verificationStatus": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "code": "confirmed" }] },
            "code": concept(code, display),
            "patient": subject,
            "recordedDate": date(day),
            "reaction": [{ "manifestation": [concept("0", reaction)], "severity": "moderate" }]
        }), rng, day);
    }
    for _ in 0..rng.range(1, 5) {
        let (code, display) = *rng.pick(PROBLEMS);
        let day = recent(rng, 7300);
        let mut condition = json!({
            "resourceType": "Condition",
            "clinicalStatus": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active" }] },
            "code": concept(code, display),
            "subject": subject,
            "onsetDateTime": date(day),
            "recordedDate": date(day)
        });
        if rng.percent(30) {
            condition["note"] = json!([{ "text": format!("{display}: reviewed, management plan discussed with the patient.") }]);
        }
        builder.add(condition, rng, day);
    }
    if rng.percent(6) {
        let (code, display) = *rng.pick(SENSITIVE_PROBLEMS);
        let day = recent(rng, 3650);
        builder.add(
            json!({
                "resourceType": "Condition",
                "clinicalStatus": { "coding": [{ "code": "active" }] },
                "code": concept(code, display),
                "subject": subject,
                "onsetDateTime": date(day)
            }),
            rng,
            day,
        );
    }
    if rng.percent(3) {
        let day = recent(rng, 1000);
        builder.add(
            json!({
                "resourceType": "Flag",
                "status": "active",
                "category": [concept("1110481000000106", "Adult safeguarding concern")],
                "code": concept("766870000", "Safeguarding concern"),
                "subject": subject,
                "period": { "start": date(day) }
            }),
            rng,
            day,
        );
    }
    if rng.percent(2) {
        let day = recent(rng, 1000);
        builder.add(
            json!({
                "resourceType": "Condition",
                "meta": { "tag": [{ "system": PRIVATE_SYSTEM, "code": PRIVATE_CODE }] },
                "code": { "text": "Private consultation entry" },
                "subject": subject,
                "recordedDate": date(day)
            }),
            rng,
            day,
        );
    }
    for _ in 0..rng.range(1, 5) {
        let (code, display, dose) = *rng.pick(MEDICATIONS);
        let day = recent(rng, 720);
        builder.add(
            json!({
                "resourceType": "MedicationRequest",
                "status": "active",
                "intent": "order",
                "medicationCodeableConcept": concept(code, display),
                "subject": subject,
                "authoredOn": date(day),
                "dosageInstruction": [{ "text": dose }]
            }),
            rng,
            day,
        );
    }
    for _ in 0..rng.range(3, 10) {
        let day = recent(rng, 1825);
        let observation = match rng.below(5) {
            0 => json!({
                "code": concept("75367002", "Blood pressure"),
                "component": [
                    { "code": concept("271649006", "Systolic blood pressure"), "valueQuantity": { "value": rng.range(105, 165), "unit": "mmHg" } },
                    { "code": concept("271650006", "Diastolic blood pressure"), "valueQuantity": { "value": rng.range(60, 100), "unit": "mmHg" } }
                ]
            }),
            1 => json!({ "code": concept("1000651000000109", "Serum potassium level"),
                         "valueQuantity": { "value": (35 + rng.below(20)) as f64 / 10.0, "unit": "mmol/L" } }),
            2 => json!({ "code": concept("1049301000000100", "HbA1c level"),
                         "valueQuantity": { "value": rng.range(35, 85), "unit": "mmol/mol" } }),
            3 => json!({ "code": concept("27113001", "Body weight"),
                         "valueQuantity": { "value": rng.range(12, 120), "unit": "kg" } }),
            _ => json!({ "code": concept("364075005", "Heart rate"),
                         "valueQuantity": { "value": rng.range(50, 110), "unit": "beats/minute" } }),
        };
        let mut observation = observation;
        observation["resourceType"] = json!("Observation");
        observation["status"] = json!("final");
        observation["subject"] = subject.clone();
        observation["effectiveDateTime"] = json!(date_time(day, rng));
        builder.add(observation, rng, day);
    }
    for _ in 0..rng.range(1, 5) {
        let day = recent(rng, 1825);
        let encounter = builder.add(json!({
            "resourceType": "Encounter",
            "status": "finished",
            "class": { "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB", "display": "ambulatory" },
            "type": [concept("185316007", "Indirect encounter")],
            "subject": subject,
            "period": { "start": date_time(day, rng) },
            "serviceProvider": { "display": format!("{org} practice") }
        }), rng, day);
        builder.add(
            json!({
                "resourceType": "Observation",
                "status": "final",
                "code": concept("371530004", "Clinical consultation report"),
                "subject": subject,
                "encounter": { "reference": encounter },
                "effectiveDateTime": date_time(day, rng),
                "valueString": *rng.pick(CONSULTATIONS)
            }),
            rng,
            day,
        );
    }
    for _ in 0..rng.range(0, 2) {
        let (code, display, text) = *rng.pick(LETTERS);
        let day = recent(rng, 1825);
        let mut document = json!({
            "resourceType": "DocumentReference",
            "status": "current",
            "type": concept(code, display),
            "subject": subject,
            "date": date_time(day, rng),
            "description": text,
            "content": [{ "attachment": { "contentType": "text/plain", "title": display } }]
        });
        if code == "736253002" {
            document["securityLabel"] = json!([{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R" }] }]);
        }
        builder.add(document, rng, day);
    }
    for _ in 0..rng.range(1, 3) {
        let (code, display) = *rng.pick(IMMUNISATIONS);
        let day = recent(rng, 3650);
        builder.add(
            json!({
                "resourceType": "Immunization",
                "status": "completed",
                "vaccineCode": concept(code, display),
                "patient": subject,
                "occurrenceDateTime": date(day)
            }),
            rng,
            day,
        );
    }
    if rng.percent(25) {
        let (code, display) = *rng.pick(PROCEDURES);
        let day = recent(rng, 7300);
        builder.add(
            json!({
                "resourceType": "Procedure",
                "status": "completed",
                "code": concept(code, display),
                "subject": subject,
                "performedDateTime": date(day)
            }),
            rng,
            day,
        );
    }
    if rng.percent(20) {
        let day = recent(rng, 365);
        builder.add(
            json!({
                "resourceType": "CarePlan",
                "status": "active",
                "intent": "plan",
                "title": "Long-term condition care plan",
                "category": [concept("734163000", "Care plan")],
                "description": "Annual review, self-management advice, escalation contacts.",
                "subject": subject,
                "period": { "start": date(day) }
            }),
            rng,
            day,
        );
    }
    if rng.percent(15) {
        let day = recent(rng, 365);
        builder.add(
            json!({
                "resourceType": "ServiceRequest",
                "status": "active",
                "intent": "order",
                "code": concept("306206005", "Referral to service"),
                "subject": subject,
                "authoredOn": date(day),
                "performer": [{ "display": "Community physiotherapy" }]
            }),
            rng,
            day,
        );
    }
    json!({
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": crate::clock::rfc3339(REFERENCE_DAY * 86_400),
        "entry": builder.entries
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_nhs_numbers_are_valid_unique_and_in_the_999_range() {
        let mut seen = std::collections::HashSet::new();
        for index in 0..5_000 {
            let nhs = test_nhs_number(42, index);
            assert!(nhs.as_str().starts_with("999"));
            assert!(seen.insert(nhs), "duplicate at {index}");
        }
    }

    #[test]
    fn no_event_precedes_the_patients_birth() {
        let org = OdsCode::parse("A81001").unwrap();
        for index in 0..200 {
            let nhs = test_nhs_number(3, index);
            let bundle = patient_bundle(&org, &nhs, index, &mut Rng::new(index));
            let entries = bundle["entry"].as_array().unwrap();
            let birth = entries[0]["resource"]["birthDate"]
                .as_str()
                .unwrap()
                .to_string();
            for entry in &entries[1..] {
                let resource = &entry["resource"];
                for field in [
                    "onsetDateTime",
                    "recordedDate",
                    "authoredOn",
                    "occurrenceDateTime",
                    "effectiveDateTime",
                    "performedDateTime",
                    "date",
                ] {
                    if let Some(date) = resource[field].as_str() {
                        assert!(
                            date[..10] >= birth[..],
                            "{field} {date} before birth {birth}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn same_seed_same_output_and_other_seed_differs() {
        let org = OdsCode::parse("A81001").unwrap();
        let nhs = test_nhs_number(1, 0);
        let a = patient_bundle(&org, &nhs, 0, &mut Rng::new(7));
        let b = patient_bundle(&org, &nhs, 0, &mut Rng::new(7));
        let c = patient_bundle(&org, &nhs, 0, &mut Rng::new(8));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
