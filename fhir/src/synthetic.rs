//! Synthetic, UK-flavoured FHIR R4 extracts a clinician would believe, for `caremesh
//! generate`, the demo and the benchmarks.
//!
//! Deterministic for a seed (`caremesh_sync::rng`, no OS randomness, a fixed reference date),
//! so benchmarks and demos are reproducible. Test NHS numbers are in the 999 range with valid
//! Modulus 11 check digits. One collection Bundle per patient, as a practice extract sends,
//! named by the organisation and the patient's place in the list, never by NHS number.
//!
//! The region's people come first ([`person`]): each has one identity, age and sex, and the
//! conditions, allergies and life events that fit them, the same whichever organisation
//! writes about them. Each organisation then records its own part of their care
//! ([`GenerateOptions::kind`]): the GP practice the long-term record (problems, repeat
//! medicines, results with reference ranges, immunisations, consultations), the hospital the
//! admissions of those it admitted (laboratory panels, the reason for admission, a discharge
//! summary), the hospice its palliative patients (medicines given, an advance care plan, a
//! resuscitation decision, next of kin). Everyone names the practice the patient is
//! registered with as their GP. A few records disagree as real ones do: a hospital spelling
//! of a name, a death the hospital has not been told of.

use crate::{NHS_NUMBER_SYSTEM, ODS_SYSTEM, PRIVATE_CODE, PRIVATE_SYSTEM, SNOMED};
use caremesh_sync::rng::Rng;
use caremesh_sync::{NhsNumber, OdsCode, OrgKind};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// Days since 1970-01-01 of the generator's "today" (2026-01-01), fixed for determinism.
const REFERENCE_DAY: i64 = 20_454;
const YEAR: i64 = 365;
const UCUM: &str = "http://unitsofmeasure.org";
const DMD: &str = "https://dmd.nhs.uk";
const INTERPRETATION: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation";

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

/// A time in working hours on `day`.
fn date_time(day: i64, rng: &mut Rng) -> String {
    let seconds = day * 86_400 + 8 * 3600 + rng.below(10 * 3600) as i64;
    crate::clock::rfc3339(seconds)
}

/// A time at any hour of `day` (wards and hospices work nights).
fn any_time(day: i64, rng: &mut Rng) -> String {
    crate::clock::rfc3339(day * 86_400 + rng.below(86_400) as i64)
}

/// A measurement as a laboratory reports it: whole numbers without a decimal point.
fn measured(value: f64) -> Value {
    if value.fract() == 0.0 && value.abs() < 1e9 {
        json!(value as i64)
    } else {
        json!(value)
    }
}

fn concept(code: &str, display: &str) -> Value {
    json!({ "coding": [{ "system": SNOMED, "code": code, "display": display }], "text": display })
}

fn medicine(code: &str, display: &str) -> Value {
    json!({ "coding": [{ "system": DMD, "code": code, "display": display }] })
}

const GIVEN_F: &[&str] = &[
    "Olivia", "Amelia", "Isla", "Ava", "Mia", "Freya", "Lily", "Grace", "Margaret", "Joan",
    "Priya", "Aisha",
];
const GIVEN_M: &[&str] = &[
    "Oliver", "George", "Arthur", "Noah", "Muhammad", "Leo", "Harry", "Oscar", "William", "Arjun",
    "David", "Kwame",
];
/// Family names, each with a spelling a busy admissions desk might write instead.
const FAMILY: &[(&str, &str)] = &[
    ("Smith", "Smyth"),
    ("Jones", "Jone"),
    ("Taylor", "Tailor"),
    ("Brown", "Browne"),
    ("Williams", "Williamson"),
    ("Wilson", "Willson"),
    ("Johnson", "Johnston"),
    ("Davies", "Davis"),
    ("Patel", "Patil"),
    ("Robinson", "Robertson"),
    ("Wright", "Wight"),
    ("Thompson", "Thomson"),
    ("Evans", "Evens"),
    ("Walker", "Walkers"),
    ("Khan", "Kahn"),
    ("Hughes", "Hughs"),
    ("Edwards", "Edward"),
    ("Green", "Greene"),
    ("Okafor", "Okafo"),
    ("Murphy", "Murphey"),
];
const TOWNS: &[(&str, &str)] = &[
    ("Oxford", "OX1"),
    ("Banbury", "OX16"),
    ("Witney", "OX28"),
    ("Bicester", "OX26"),
    ("Abingdon", "OX14"),
    ("Didcot", "OX11"),
];

/// (SNOMED code, display, reaction, category)
type AllergySpec = (&'static str, &'static str, &'static str, &'static str);
const ALLERGIES: &[AllergySpec] = &[
    (
        "91936005",
        "Allergy to penicillin",
        "Urticarial rash",
        "medication",
    ),
    ("294505008", "Allergy to amoxicillin", "Rash", "medication"),
    (
        "300916003",
        "Latex allergy",
        "Contact dermatitis",
        "environment",
    ),
    ("91935009", "Allergy to peanuts", "Anaphylaxis", "food"),
    ("293586001", "Allergy to aspirin", "Wheeze", "medication"),
];

/// A long-term condition: who gets it, from what age, and what follows from it.
#[derive(Debug)]
struct ConditionSpec {
    code: &'static str,
    display: &'static str,
    /// Youngest age (years) at onset.
    min_age: i64,
    /// Chance (percent) at ages 18-59 and at 60 and over; children get half the adult chance
    /// of conditions that start in childhood.
    percent_adult: u64,
    percent_older: u64,
    /// Only this sex (`Some(true)`: female), if any.
    female: Option<bool>,
    /// The repeat medicines that treat it: (dm+d code, name, dose text).
    medicines: &'static [(&'static str, &'static str, &'static str)],
}

const SALBUTAMOL: (&str, &str, &str) = (
    "39113611000001102",
    "Salbutamol 100micrograms/dose inhaler CFC free",
    "Two puffs up to four times a day when required",
);
const CONDITIONS: &[ConditionSpec] = &[
    ConditionSpec {
        code: "195967001",
        display: "Asthma",
        min_age: 3,
        percent_adult: 10,
        percent_older: 8,
        female: None,
        medicines: &[SALBUTAMOL],
    },
    ConditionSpec {
        code: "38341003",
        display: "Hypertensive disorder",
        min_age: 35,
        percent_adult: 12,
        percent_older: 45,
        female: None,
        medicines: &[(
            "39695211000001102",
            "Amlodipine 5mg tablets",
            "One tablet once a day",
        )],
    },
    ConditionSpec {
        code: "44054006",
        display: "Type 2 diabetes mellitus",
        min_age: 30,
        percent_adult: 6,
        percent_older: 18,
        female: None,
        medicines: &[(
            "42109611000001109",
            "Metformin 500mg tablets",
            "One tablet twice a day with meals",
        )],
    },
    ConditionSpec {
        code: "13645005",
        display: "Chronic obstructive pulmonary disease",
        min_age: 45,
        percent_adult: 2,
        percent_older: 10,
        female: None,
        medicines: &[
            SALBUTAMOL,
            (
                "35936511000001108",
                "Tiotropium 2.5micrograms/dose solution for inhalation cartridge",
                "Two puffs once a day",
            ),
        ],
    },
    ConditionSpec {
        code: "35489007",
        display: "Depressive disorder",
        min_age: 14,
        percent_adult: 12,
        percent_older: 8,
        female: None,
        medicines: &[(
            "39109611000001101",
            "Sertraline 50mg tablets",
            "One tablet once a day",
        )],
    },
    ConditionSpec {
        code: "396275006",
        display: "Osteoarthritis",
        min_age: 45,
        percent_adult: 5,
        percent_older: 30,
        female: None,
        medicines: &[(
            "42109211000001100",
            "Paracetamol 500mg tablets",
            "Two tablets up to four times a day when required",
        )],
    },
    ConditionSpec {
        code: "49436004",
        display: "Atrial fibrillation",
        min_age: 55,
        percent_adult: 1,
        percent_older: 10,
        female: None,
        medicines: &[(
            "41982611000001101",
            "Apixaban 5mg tablets",
            "One tablet twice a day",
        )],
    },
    ConditionSpec {
        code: "433144002",
        display: "Chronic kidney disease stage 3",
        min_age: 50,
        percent_adult: 1,
        percent_older: 12,
        female: None,
        medicines: &[],
    },
    ConditionSpec {
        code: "40930008",
        display: "Hypothyroidism",
        min_age: 20,
        percent_adult: 4,
        percent_older: 8,
        female: Some(true),
        medicines: &[(
            "42382511000001102",
            "Levothyroxine sodium 100microgram tablets",
            "One tablet each morning",
        )],
    },
    ConditionSpec {
        code: "84757009",
        display: "Epilepsy",
        min_age: 2,
        percent_adult: 1,
        percent_older: 1,
        female: None,
        medicines: &[(
            "39688611000001101",
            "Levetiracetam 500mg tablets",
            "One tablet twice a day",
        )],
    },
];

/// Life-limiting illnesses that bring people to a hospice: (code, display, sex if only one).
const LIFE_LIMITING: &[(&str, &str, Option<bool>)] = &[
    ("363358000", "Malignant tumour of lung", None),
    ("254837009", "Malignant neoplasm of breast", Some(true)),
    ("399068003", "Malignant tumour of prostate", Some(false)),
    ("363406005", "Malignant tumour of colon", None),
    ("84114007", "Heart failure", None),
    ("37340000", "Motor neurone disease", None),
];

const SENSITIVE_PROBLEMS: &[(&str, &str)] = &[
    ("86406008", "Human immunodeficiency virus infection"),
    ("105629000", "Chlamydial infection"),
    ("386639001", "Termination of pregnancy"),
];

const CONSULTATIONS: &[&str] = &[
    "Presents with cough for two weeks, no fever. Chest clear. Advised fluids and rest; return if worse.",
    "Medication review. Tolerating treatment well, no side effects reported. Continue.",
    "Reports low mood and poor sleep. Discussed options; referred to talking therapies.",
    "Annual review. Blood pressure satisfactory. Bloods requested.",
    "Knee pain after a fall. No bony tenderness. Analgesia and physiotherapy advice given.",
];
const CHILD_CONSULTATIONS: &[&str] = &[
    "Seen with mother. Two days of fever and runny nose, eating and drinking. Ears and throat normal. Safety-netting advice given.",
    "Eczema on both elbows. Emollients and advice on bathing given.",
];

/// A test with its unit and reference range (`None`: no bound on that side).
struct LabTest {
    code: &'static str,
    display: &'static str,
    unit: &'static str,
    low: Option<f64>,
    high: Option<f64>,
}

const CREATININE: LabTest = LabTest {
    code: "1000731000000107",
    display: "Serum creatinine level",
    unit: "umol/L",
    low: Some(59.0),
    high: Some(104.0),
};
const CRP: LabTest = LabTest {
    code: "1001371000000100",
    display: "Serum C reactive protein level",
    unit: "mg/L",
    low: None,
    high: Some(5.0),
};
const EGFR: LabTest = LabTest {
    code: "1011481000000105",
    display: "eGFR using creatinine (CKD-EPI) per 1.73 square metres",
    unit: "mL/min/{1.73_m2}",
    low: Some(60.0),
    high: None,
};
const HBA1C: LabTest = LabTest {
    code: "1049301000000100",
    display: "HbA1c level",
    unit: "mmol/mol",
    low: Some(20.0),
    high: Some(41.0),
};
const POTASSIUM: LabTest = LabTest {
    code: "1000651000000109",
    display: "Serum potassium level",
    unit: "mmol/L",
    low: Some(3.5),
    high: Some(5.3),
};
const SODIUM: LabTest = LabTest {
    code: "1000661000000107",
    display: "Serum sodium level",
    unit: "mmol/L",
    low: Some(133.0),
    high: Some(146.0),
};
const WEIGHT: LabTest = LabTest {
    code: "27113001",
    display: "Body weight",
    unit: "kg",
    low: None,
    high: None,
};
const WHITE_CELLS: LabTest = LabTest {
    code: "1022541000000102",
    display: "Total white blood count",
    unit: "10*9/L",
    low: Some(4.0),
    high: Some(11.0),
};

/// One of the region's people, the same whoever records their care.
#[derive(Debug, Clone)]
pub struct Person {
    pub index: u64,
    pub nhs: NhsNumber,
    pub female: bool,
    pub given: &'static str,
    family: (&'static str, &'static str),
    pub birth_day: i64,
    town: (&'static str, &'static str),
    postcode_tail: String,
    /// Long-term conditions with their onset day.
    conditions: Vec<(&'static ConditionSpec, i64)>,
    allergies: Vec<(&'static AllergySpec, i64)>,
    /// The illness that brought them to palliative care, and its diagnosis day.
    pub life_limiting: Option<(&'static str, &'static str, i64)>,
    pub deceased_day: Option<i64>,
    /// Was admitted to hospital in the last two years (the hospital's caseload).
    pub admitted: bool,
    /// The hospital spells their family name differently.
    hospital_misspells: bool,
    sensitive: Option<(&'static str, &'static str, i64)>,
}

impl Person {
    pub fn age_years(&self) -> i64 {
        (REFERENCE_DAY - self.birth_day) / YEAR
    }

    /// The last day anything can happen to them.
    fn last_day(&self) -> i64 {
        self.deceased_day.unwrap_or(REFERENCE_DAY)
    }

    fn has(&self, code: &str) -> bool {
        self.conditions.iter().any(|(c, _)| c.code == code)
    }

    /// Whether `kind` of organisation cares for them.
    pub fn in_caseload_of(&self, kind: OrgKind) -> bool {
        match kind {
            OrgKind::Hub => false,
            OrgKind::Hospice => self.life_limiting.is_some(),
            OrgKind::Acute => self.admitted,
            _ => true,
        }
    }
}

/// The `index`-th person of the region generated from `seed`.
pub fn person(seed: u64, index: u64) -> Person {
    let mut rng = Rng::new(seed.wrapping_mul(1_000_003).wrapping_add(index));
    let female = rng.percent(51);
    let given = *rng.pick(if female { GIVEN_F } else { GIVEN_M });
    let family = *rng.pick(FAMILY);
    let age = rng.range(0, 95) as i64;
    let birth_day = REFERENCE_DAY - age * YEAR - rng.below(YEAR as u64) as i64;
    let town = *rng.pick(TOWNS);
    let postcode_tail = format!(
        "{}{}",
        rng.range(1, 9),
        ["AB", "JD", "TR", "XY"][rng.below(4) as usize]
    );
    // A day between reaching `min_age` and today, or `None` if they have not reached it.
    let onset = |rng: &mut Rng, min_age: i64| {
        let from = birth_day + min_age * YEAR;
        (from < REFERENCE_DAY).then(|| from + rng.below((REFERENCE_DAY - from) as u64) as i64)
    };
    let mut conditions = Vec::new();
    for spec in CONDITIONS {
        if spec.female.is_some_and(|f| f != female) || age < spec.min_age {
            continue;
        }
        let percent = match age {
            0..=17 => spec.percent_adult / 2,
            18..=59 => spec.percent_adult,
            _ => spec.percent_older,
        };
        if rng.percent(percent)
            && let Some(day) = onset(&mut rng, spec.min_age)
        {
            conditions.push((spec, day));
        }
    }
    let mut allergies = Vec::new();
    if rng.percent(15) {
        let allergy = rng.pick(ALLERGIES);
        if let Some(day) = onset(&mut rng, 1) {
            allergies.push((allergy, day));
        }
    }
    let palliative_percent = match age {
        0..=54 => 0,
        55..=74 => 12,
        _ => 25,
    };
    let life_limiting = if rng.percent(palliative_percent) {
        let choices: Vec<_> = LIFE_LIMITING
            .iter()
            .filter(|(_, _, sex)| sex.is_none_or(|f| f == female))
            .collect();
        let (code, display, _) = **rng.pick(&choices);
        Some((code, display, REFERENCE_DAY - rng.range(60, 700) as i64))
    } else {
        None
    };
    // A third of the hospice's patients died in the last two months.
    let deceased_day = life_limiting
        .filter(|_| rng.percent(33))
        .map(|_| REFERENCE_DAY - rng.range(3, 60) as i64);
    let admitted = life_limiting.is_some() || rng.percent(if age >= 65 { 30 } else { 12 });
    let hospital_misspells = rng.percent(5);
    let sensitive = (age >= 16 && rng.percent(4))
        .then(|| *rng.pick(SENSITIVE_PROBLEMS))
        .and_then(|(code, display)| Some((code, display, onset(&mut rng, 16)?)));
    let mut person = Person {
        index,
        nhs: test_nhs_number(seed, index),
        female,
        given,
        family,
        birth_day,
        town,
        postcode_tail,
        conditions,
        allergies,
        life_limiting,
        deceased_day,
        admitted,
        hospital_misspells,
        sensitive,
    };
    // Nothing is diagnosed after death.
    let last = person.last_day();
    for (_, day) in &mut person.conditions {
        *day = (*day).min(last - 1);
    }
    person
}

pub struct GenerateOptions {
    pub org: OdsCode,
    /// The organisation's name, as its own records name it.
    pub org_name: String,
    /// What kind of organisation: which of the region's people it cares for and what it
    /// records about them follow from it.
    pub kind: OrgKind,
    /// The practice the region's people are registered with: their `generalPractitioner`.
    pub registered_gp: OdsCode,
    /// The size of the region's population the caseload is drawn from (people 0 to
    /// `patients - 1`): a GP practice writes all of them, others those they care for.
    pub patients: u64,
    pub seed: u64,
    pub out: PathBuf,
}

impl GenerateOptions {
    /// The id the organisation's system gives the person's Patient resource (and the stem
    /// of their other resources' ids and of their file): its code, the seed and the person's
    /// place in the list, so extracts of other seeds never reuse an id for another patient.
    pub fn patient_id(&self, person: &Person) -> String {
        format!("{}-S{}-P{}", self.org, self.seed, person.index)
    }

    /// A GP practice's extract of its whole list.
    pub fn practice(org: OdsCode, patients: u64, seed: u64, out: PathBuf) -> GenerateOptions {
        GenerateOptions {
            org_name: format!("{org} practice"),
            registered_gp: org.clone(),
            org,
            kind: OrgKind::Gp,
            patients,
            seed,
            out,
        }
    }
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
        nhs_numbers: Vec::new(),
    };
    for index in 0..options.patients {
        let person = person(options.seed, index);
        if !person.in_caseload_of(options.kind) {
            continue;
        }
        let bundle = patient_bundle(options, &person);
        generated.resources += bundle["entry"].as_array().map_or(0, Vec::len);
        let name = format!("{}.json", options.patient_id(&person));
        write_file(&options.out.join(name), &bundle)?;
        generated.files += 1;
        generated.nhs_numbers.push(person.nhs);
    }
    Ok(generated)
}

fn write_file(path: &Path, value: &Value) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(value).expect("generated JSON serialises");
    std::fs::write(path, bytes)
}

/// One organisation's writing about one person.
struct Builder<'a> {
    options: &'a GenerateOptions,
    person: &'a Person,
    rng: Rng,
    subject: Value,
    entries: Vec<Value>,
    counter: usize,
}

impl Builder<'_> {
    fn add(&mut self, mut resource: Value, day: i64) -> String {
        self.counter += 1;
        let kind = resource["resourceType"]
            .as_str()
            .expect("typed")
            .to_string();
        let id = format!("{}-{}", self.options.patient_id(self.person), self.counter);
        resource["id"] = json!(id);
        let updated = date_time(day.min(REFERENCE_DAY), &mut self.rng);
        let meta = resource
            .as_object_mut()
            .expect("object")
            .entry("meta")
            .or_insert_with(|| json!({}));
        meta["lastUpdated"] = json!(updated);
        let reference = format!("{kind}/{id}");
        self.entries.push(json!({
            "fullUrl": format!("urn:caremesh:{}:{reference}", self.options.org),
            "resource": resource
        }));
        reference
    }

    /// A day in the last `within_days` days of the person's life, after their birth.
    fn recent(&mut self, within_days: u64) -> i64 {
        let last = self.person.last_day();
        (last - self.rng.below(within_days) as i64).max(self.person.birth_day + 1)
    }

    fn own_organisation(&self) -> Value {
        json!({
            "identifier": { "system": ODS_SYSTEM, "value": self.options.org.as_str() },
            "display": self.options.org_name
        })
    }

    fn patient(&mut self) {
        let person = self.person;
        let hospital = self.options.kind == OrgKind::Acute;
        let family = if hospital && person.hospital_misspells {
            person.family.1
        } else {
            person.family.0
        };
        let title = match (person.age_years() >= 18, person.female) {
            (false, _) => Vec::new(),
            (true, true) => vec!["Ms"],
            (true, false) => vec!["Mr"],
        };
        let mut patient = json!({
            "resourceType": "Patient",
            "id": self.options.patient_id(person),
            "meta": { "lastUpdated": date_time(person.last_day() - 1, &mut self.rng) },
            "identifier": [{ "system": NHS_NUMBER_SYSTEM, "value": person.nhs.as_str() }],
            "name": [{ "use": "official", "family": family, "given": [person.given], "prefix": title }],
            "gender": if person.female { "female" } else { "male" },
            "birthDate": date(person.birth_day),
            "address": [{ "city": person.town.0, "postalCode": format!("{} {}", person.town.1, person.postcode_tail) }],
            "generalPractitioner": [{
                "identifier": { "system": ODS_SYSTEM, "value": self.options.registered_gp.as_str() }
            }]
        });
        // The practice and the hospice are told of a death; the hospital, where the patient
        // did not die, may not have been.
        if let Some(day) = person.deceased_day
            && !hospital
        {
            patient["deceasedDateTime"] = json!(any_time(day, &mut self.rng));
        }
        let id = patient["id"].as_str().expect("set").to_string();
        self.entries.push(json!({
            "fullUrl": format!("urn:caremesh:{}:Patient/{id}", self.options.org),
            "resource": patient
        }));
    }

    fn allergies(&mut self) {
        for &(allergy, day) in &self.person.allergies {
            let (code, display, reaction, category) = *allergy;
            let recorded = match self.options.kind {
                OrgKind::Gp => day,
                // Asked again on admission.
                _ => self.recent(400),
            };
            self.add(json!({
                "resourceType": "AllergyIntolerance",
                "clinicalStatus": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active" }] },
                "verificationStatus": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "code": "confirmed" }] },
                "category": [category],
                "criticality": if reaction == "Anaphylaxis" { "high" } else { "low" },
                "code": concept(code, display),
                "patient": self.subject,
                "recordedDate": date(recorded),
                "reaction": [{ "manifestation": [concept("0", reaction)], "severity": if reaction == "Anaphylaxis" { "severe" } else { "moderate" } }]
            }), recorded);
        }
    }

    fn condition(&mut self, code: &str, display: &str, onset: i64, recorded: i64) {
        self.add(
            json!({
                "resourceType": "Condition",
                "clinicalStatus": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active" }] },
                "verificationStatus": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed" }] },
                "category": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": "problem-list-item" }] }],
                "code": concept(code, display),
                "subject": self.subject,
                "onsetDateTime": date(onset),
                "recordedDate": date(recorded)
            }),
            recorded,
        );
    }

    /// A laboratory or clinic result with its range, flagged when outside it.
    fn result(&mut self, test: &LabTest, value: f64, day: i64, at: String) {
        let LabTest {
            code,
            display,
            unit,
            low,
            high,
        } = *test;
        let mut observation = json!({
            "resourceType": "Observation",
            "status": "final",
            "category": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory" }] }],
            "code": concept(code, display),
            "subject": self.subject,
            "effectiveDateTime": at,
            "valueQuantity": { "value": measured(value), "unit": unit, "system": UCUM, "code": unit }
        });
        let mut bound = serde_json::Map::new();
        if let Some(low) = low {
            bound.insert(
                "low".into(),
                json!({ "value": low, "unit": unit, "system": UCUM, "code": unit }),
            );
        }
        if let Some(high) = high {
            bound.insert(
                "high".into(),
                json!({ "value": high, "unit": unit, "system": UCUM, "code": unit }),
            );
        }
        if !bound.is_empty() {
            observation["referenceRange"] = json!([Value::Object(bound)]);
            let flag = if low.is_some_and(|l| value < l) {
                ("L", "Low")
            } else if high.is_some_and(|h| value > h) {
                ("H", "High")
            } else {
                ("N", "Normal")
            };
            observation["interpretation"] = json!([{ "coding": [{ "system": INTERPRETATION, "code": flag.0, "display": flag.1 }] }]);
        }
        self.add(observation, day);
    }

    /// A value drawn around `centre`, to `decimals` places.
    fn around(&mut self, centre: f64, spread: f64, decimals: i32) -> f64 {
        let value = centre + (self.rng.unit() * 2.0 - 1.0) * spread;
        let scale = 10f64.powi(decimals);
        (value * scale).round() / scale
    }

    fn encounter(
        &mut self,
        class: (&str, &str),
        kind: (&str, &str),
        start: i64,
        end: Option<i64>,
    ) -> String {
        let mut period = json!({ "start": date_time(start, &mut self.rng) });
        if let Some(end) = end {
            period["end"] = json!(date_time(end, &mut self.rng));
        }
        let encounter = json!({
            "resourceType": "Encounter",
            "status": "finished",
            "class": { "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": class.0, "display": class.1 },
            "type": [concept(kind.0, kind.1)],
            "subject": self.subject,
            "period": period,
            "serviceProvider": self.own_organisation()
        });
        self.add(encounter, end.unwrap_or(start))
    }

    fn note(&mut self, encounter: &str, day: i64, text: &str) {
        let at = date_time(day, &mut self.rng);
        self.add(
            json!({
                "resourceType": "Observation",
                "status": "final",
                "code": concept("371530004", "Clinical consultation report"),
                "subject": self.subject,
                "encounter": { "reference": encounter },
                "effectiveDateTime": at,
                "valueString": text
            }),
            day,
        );
    }

    fn bundle(self) -> Value {
        json!({
            "resourceType": "Bundle",
            "type": "collection",
            "timestamp": crate::clock::rfc3339(REFERENCE_DAY * 86_400),
            "entry": self.entries
        })
    }
}

fn patient_bundle(options: &GenerateOptions, person: &Person) -> Value {
    let org_salt = options
        .org
        .as_str()
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    let mut builder = Builder {
        options,
        person,
        rng: Rng::new(
            options
                .seed
                .wrapping_mul(1_000_003)
                .wrapping_add(person.index)
                ^ org_salt.rotate_left(17),
        ),
        subject: json!({ "reference": format!("Patient/{}", options.patient_id(person)) }),
        entries: Vec::new(),
        counter: 0,
    };
    builder.patient();
    match options.kind {
        OrgKind::Hospice => hospice_record(&mut builder),
        OrgKind::Acute => hospital_record(&mut builder),
        _ => practice_record(&mut builder),
    }
    builder.bundle()
}

/// The GP practice: the long-term record.
fn practice_record(b: &mut Builder<'_>) {
    let person = b.person;
    let age = person.age_years();
    let alive = person.deceased_day.is_none();
    b.allergies();
    for &(spec, onset) in &person.conditions {
        b.condition(spec.code, spec.display, onset, onset);
    }
    if let Some((code, display, day)) = person.life_limiting {
        b.condition(code, display, day, day + 14);
    }
    if let Some((code, display, day)) = person.sensitive {
        b.add(
            json!({
                "resourceType": "Condition",
                "clinicalStatus": { "coding": [{ "code": "active" }] },
                "code": concept(code, display),
                "subject": b.subject,
                "onsetDateTime": date(day),
                "recordedDate": date(day)
            }),
            day,
        );
    }
    if b.rng.percent(2) {
        let day = b.recent(1000);
        b.add(
            json!({
                "resourceType": "Condition",
                "meta": { "tag": [{ "system": PRIVATE_SYSTEM, "code": PRIVATE_CODE }] },
                "code": { "text": "Private consultation entry" },
                "subject": b.subject,
                "recordedDate": date(day)
            }),
            day,
        );
    }
    if b.rng.percent(3) {
        let day = b.recent(1000);
        b.add(
            json!({
                "resourceType": "Flag",
                "status": "active",
                "category": [concept("1110481000000106", "Adult safeguarding concern")],
                "code": concept("766870000", "Safeguarding concern"),
                "subject": b.subject,
                "period": { "start": date(day) }
            }),
            day,
        );
    }
    // Repeat medicines: the latest issue of each, and for some an earlier one.
    let mut medicines: Vec<(&str, &str, &str)> = person
        .conditions
        .iter()
        .flat_map(|(spec, _)| spec.medicines.iter().copied())
        .collect();
    if age >= 40 && (person.has("44054006") || person.has("38341003")) {
        medicines.push((
            "39732311000001104",
            "Atorvastatin 20mg tablets",
            "One tablet at night",
        ));
    }
    medicines.dedup_by_key(|m| m.0);
    for (code, display, dose) in medicines {
        let issues = 1 + u64::from(b.rng.percent(50));
        for issue in 0..issues {
            let day = (person.last_day() - 5 - b.rng.below(50) as i64 - issue as i64 * 56)
                .max(person.birth_day + 1);
            b.add(
                json!({
                    "resourceType": "MedicationRequest",
                    "status": if alive { "active" } else { "stopped" },
                    "intent": "order",
                    "courseOfTherapyType": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/medicationrequest-course-of-therapy", "code": "continuous", "display": "Continuous long term therapy" }] },
                    "medicationCodeableConcept": medicine(code, display),
                    "subject": b.subject,
                    "authoredOn": date(day),
                    "dosageInstruction": [{ "text": dose }],
                    "dispenseRequest": { "numberOfRepeatsAllowed": 5, "expectedSupplyDuration": { "value": 56, "unit": "days", "system": UCUM, "code": "d" } }
                }),
                day,
            );
        }
    }
    practice_results(b);
    for _ in 0..b.rng.range(1, 3) {
        let day = b.recent(1500);
        let encounter = b.encounter(
            ("AMB", "ambulatory"),
            ("185389009", "Follow-up visit"),
            day,
            None,
        );
        let text = if age < 16 {
            *b.rng.pick(CHILD_CONSULTATIONS)
        } else {
            *b.rng.pick(CONSULTATIONS)
        };
        b.note(&encounter, day, text);
    }
    immunisations(b);
    if age >= 40 && b.rng.percent(10) {
        let day = b.recent(3000);
        let (code, display) = if age >= 60 && b.rng.percent(50) {
            ("52734007", "Total hip replacement")
        } else {
            ("73761001", "Colonoscopy")
        };
        b.add(
            json!({
                "resourceType": "Procedure",
                "status": "completed",
                "code": concept(code, display),
                "subject": b.subject,
                "performedDateTime": date(day)
            }),
            day,
        );
    }
    if !person.conditions.is_empty() && alive && b.rng.percent(30) {
        let day = b.recent(365);
        b.add(
            json!({
                "resourceType": "CarePlan",
                "status": "active",
                "intent": "plan",
                "title": "Long-term condition care plan",
                "category": [concept("734163000", "Care plan")],
                "description": "Annual review, self-management advice, escalation contacts.",
                "subject": b.subject,
                "period": { "start": date(day) }
            }),
            day,
        );
    }
    if person.has("396275006") && alive && b.rng.percent(40) {
        let day = b.recent(200);
        b.add(
            json!({
                "resourceType": "ServiceRequest",
                "status": "active",
                "intent": "order",
                "code": concept("306206005", "Referral to physiotherapy service"),
                "subject": b.subject,
                "authoredOn": date(day),
                "requester": b.own_organisation(),
                "performer": [{ "display": "Community physiotherapy" }]
            }),
            day,
        );
    }
}

/// The practice's results: those its patients' age and conditions call for.
fn practice_results(b: &mut Builder<'_>) {
    let person = b.person;
    let age = person.age_years();
    let weight = if age < 13 {
        // About 3.5 kg at birth, 10 at one, then 2 to 3 kg a year.
        let years = (REFERENCE_DAY - person.birth_day) as f64 / YEAR as f64;
        let typical = if years < 1.0 {
            3.5 + years * 6.5
        } else {
            8.0 + years * 2.6
        };
        b.around(typical, typical * 0.1, 1)
    } else {
        b.around(if person.female { 70.0 } else { 84.0 }, 14.0, 1)
    };
    let day = b.recent(400);
    let at = date_time(day, &mut b.rng);
    b.result(&WEIGHT, weight, day, at);
    if age >= 16 {
        for _ in 0..b.rng.range(1, 2) {
            let day = b.recent(700);
            let at = date_time(day, &mut b.rng);
            let hypertensive = person.has("38341003");
            let systolic = b.around(if hypertensive { 146.0 } else { 124.0 }, 14.0, 0);
            let diastolic = b.around(if hypertensive { 88.0 } else { 77.0 }, 8.0, 0);
            b.add(
                json!({
                    "resourceType": "Observation",
                    "status": "final",
                    "category": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs" }] }],
                    "code": concept("75367002", "Blood pressure"),
                    "subject": b.subject,
                    "effectiveDateTime": at,
                    "component": [
                        { "code": concept("271649006", "Systolic blood pressure"), "valueQuantity": { "value": measured(systolic), "unit": "mmHg", "system": UCUM, "code": "mm[Hg]" } },
                        { "code": concept("271650006", "Diastolic blood pressure"), "valueQuantity": { "value": measured(diastolic), "unit": "mmHg", "system": UCUM, "code": "mm[Hg]" } }
                    ]
                }),
                day,
            );
        }
    }
    if person.has("44054006") {
        for _ in 0..b.rng.range(1, 3) {
            let day = b.recent(700);
            let at = date_time(day, &mut b.rng);
            let value = b.around(58.0, 10.0, 0);
            b.result(&HBA1C, value, day, at);
        }
    } else if age >= 40 && b.rng.percent(30) {
        let day = b.recent(1000);
        let at = date_time(day, &mut b.rng);
        let value = b.around(36.0, 4.0, 0);
        b.result(&HBA1C, value, day, at);
    }
    if age >= 18 && (person.has("38341003") || person.has("433144002") || b.rng.percent(20)) {
        let day = b.recent(500);
        let at = date_time(day, &mut b.rng);
        let potassium = b.around(4.4, 0.6, 1);
        b.result(&POTASSIUM, potassium, day, at.clone());
        let egfr = if person.has("433144002") {
            b.around(45.0, 14.0, 0)
        } else {
            b.around(82.0, 8.0, 0)
        };
        b.result(&EGFR, egfr, day, at);
    }
}

/// Childhood immunisations at their ages; flu and COVID-19 vaccines for older adults.
fn immunisations(b: &mut Builder<'_>) {
    let person = b.person;
    let schedule: &[(&str, &str, i64)] = &[
        (
            "871895005",
            "Diphtheria, tetanus, pertussis, poliomyelitis, Haemophilus influenzae type b and hepatitis B vaccine",
            56,
        ),
        ("871831003", "Measles, mumps and rubella vaccine", 365),
    ];
    for &(code, display, at_age_days) in schedule {
        let day = person.birth_day + at_age_days;
        if day < person.last_day() && day > REFERENCE_DAY - 30 * YEAR {
            vaccinate(b, code, display, day);
        }
    }
    if person.age_years() >= 65 {
        for (code, display) in [
            ("1037311000000106", "Influenza vaccine"),
            ("1119349007", "COVID-19 mRNA vaccine"),
        ] {
            let day = (REFERENCE_DAY - b.rng.range(60, 120) as i64).min(person.last_day() - 1);
            vaccinate(b, code, display, day);
        }
    }
}

fn vaccinate(b: &mut Builder<'_>, code: &str, display: &str, day: i64) {
    b.add(
        json!({
            "resourceType": "Immunization",
            "status": "completed",
            "vaccineCode": concept(code, display),
            "patient": b.subject,
            "occurrenceDateTime": date(day)
        }),
        day,
    );
}

/// The hospital: an admission, its laboratory panel and its discharge summary.
fn hospital_record(b: &mut Builder<'_>) {
    let person = b.person;
    let (reason_code, reason) = match person.life_limiting {
        Some((code, display, _)) => (code, display),
        None if person.has("13645005") => (
            "195951007",
            "Acute exacerbation of chronic obstructive pulmonary disease",
        ),
        None if person.age_years() >= 70 && b.rng.percent(40) => {
            ("5913000", "Fracture of neck of femur")
        }
        None => ("385093006", "Community acquired pneumonia"),
    };
    let infection = reason_code == "385093006" || reason_code == "195951007";
    let admitted = match person.life_limiting {
        Some((_, _, diagnosed)) => diagnosed - 3,
        None => b.recent(700),
    }
    .min(person.last_day() - 10)
    .max(person.birth_day + 1);
    let discharged = admitted + b.rng.range(2, 9) as i64;
    b.allergies();
    let encounter = b.encounter(
        ("IMP", "inpatient encounter"),
        ("183452005", "Emergency hospital admission"),
        admitted,
        Some(discharged),
    );
    if person.life_limiting.is_none() {
        b.condition(reason_code, reason, admitted, admitted);
    } else {
        b.condition(reason_code, reason, admitted + 3, admitted + 3);
    }
    // The hospital records the long-term conditions it is told of: the same facts as the
    // practice's, from another source.
    let comorbidities: Vec<(&str, &str, i64)> = person
        .conditions
        .iter()
        .filter(|(spec, _)| spec.medicines.len() == 1 || spec.code == "433144002")
        .take(2)
        .map(|(spec, onset)| (spec.code, spec.display, *onset))
        .collect();
    for (code, display, onset) in comorbidities {
        b.condition(code, display, onset, admitted);
    }
    let at = any_time(admitted, &mut b.rng);
    let male = !person.female;
    let haemoglobin = b.around(if male { 138.0 } else { 126.0 }, 16.0, 0);
    let haemoglobin_test = LabTest {
        code: "1022431000000105",
        display: "Haemoglobin estimation",
        unit: "g/L",
        // Ranges differ by sex.
        low: Some(if male { 130.0 } else { 120.0 }),
        high: Some(if male { 170.0 } else { 150.0 }),
    };
    b.result(&haemoglobin_test, haemoglobin, admitted, at.clone());
    let white_cells = if infection {
        b.around(14.5, 3.0, 1)
    } else {
        b.around(7.5, 2.5, 1)
    };
    b.result(&WHITE_CELLS, white_cells, admitted, at.clone());
    let sodium = b.around(138.0, 5.0, 0);
    b.result(&SODIUM, sodium, admitted, at.clone());
    let potassium = b.around(4.3, 0.7, 1);
    b.result(&POTASSIUM, potassium, admitted, at.clone());
    let creatinine = if person.has("433144002") {
        b.around(150.0, 30.0, 0)
    } else {
        b.around(80.0, 20.0, 0)
    };
    b.result(&CREATININE, creatinine, admitted, at.clone());
    let crp = if infection {
        b.around(120.0, 60.0, 0)
    } else {
        b.around(4.0, 3.0, 0).max(1.0)
    };
    b.result(&CRP, crp, admitted, at);
    match reason_code {
        "5913000" => {
            let at = date_time(admitted + 1, &mut b.rng);
            b.add(
                json!({
                    "resourceType": "Procedure",
                    "status": "completed",
                    "code": concept("265132005", "Hemiarthroplasty of hip"),
                    "subject": b.subject,
                    "performedDateTime": at
                }),
                admitted + 1,
            );
        }
        "363358000" => {
            let at = date_time(admitted + 1, &mut b.rng);
            b.add(
                json!({
                    "resourceType": "Procedure",
                    "status": "completed",
                    "code": concept("169069000", "Computed tomography of chest"),
                    "subject": b.subject,
                    "performedDateTime": at
                }),
                admitted + 1,
            );
        }
        _ => {}
    }
    if infection {
        b.add(
            json!({
                "resourceType": "MedicationRequest",
                "status": "completed",
                "intent": "order",
                "medicationCodeableConcept": medicine("39732011000001106", "Amoxicillin 500mg capsules"),
                "subject": b.subject,
                "authoredOn": date(admitted),
                "dosageInstruction": [{
                    "timing": { "repeat": { "frequency": 3, "period": 1, "periodUnit": "d", "boundsDuration": { "value": 5, "unit": "days", "system": UCUM, "code": "d" } } },
                    "route": concept("26643006", "Oral"),
                    "doseAndRate": [{ "doseQuantity": { "value": 500, "unit": "mg", "system": UCUM, "code": "mg" } }]
                }]
            }),
            admitted,
        );
    }
    let summary = format!(
        "Admitted as an emergency with {}. Treated and discharged on day {}. GP to review medicines in two weeks.",
        reason.to_lowercase(),
        discharged - admitted
    );
    let at = date_time(discharged, &mut b.rng);
    b.add(
        json!({
            "resourceType": "DocumentReference",
            "status": "current",
            "type": concept("373942005", "Discharge summary"),
            "subject": b.subject,
            "date": at,
            "author": [b.own_organisation()],
            "custodian": b.own_organisation(),
            "description": summary,
            "context": { "encounter": [{ "reference": encounter }] },
            "content": [{ "attachment": { "contentType": "text/plain", "title": "Discharge summary" } }]
        }),
        discharged,
    );
}

/// The hospice: palliative care, anticipatory medicines and what was given.
fn hospice_record(b: &mut Builder<'_>) {
    let person = b.person;
    let Some((code, display, diagnosed)) = person.life_limiting else {
        return;
    };
    let referred = (diagnosed + b.rng.range(20, 60) as i64).min(person.last_day() - 14);
    b.condition(code, display, diagnosed, referred);
    b.allergies();
    let last = person.last_day();
    let encounter = b.encounter(
        ("HH", "home health"),
        ("305686008", "Seen by palliative care physician"),
        referred,
        None,
    );
    b.note(
        &encounter,
        referred,
        "First visit at home with family present. Discussed priorities: wishes to stay at home. Pain controlled on current medicines.",
    );
    let (kin_given, kin_relationship, kin_code) = if person.female {
        ("Daniel", "son", "SON")
    } else {
        ("Susan", "wife", "WIFE")
    };
    b.add(
        json!({
            "resourceType": "RelatedPerson",
            "patient": b.subject,
            "relationship": [
                { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": kin_code, "display": kin_relationship }] },
                { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v2-0131", "code": "N", "display": "Next-of-Kin" }] }
            ],
            "name": [{ "use": "official", "family": person.family.0, "given": [kin_given] }],
            "telecom": [{ "system": "phone", "value": format!("07700 900{:03}", person.index % 1000), "use": "mobile" }]
        }),
        referred,
    );
    b.add(
        json!({
            "resourceType": "Flag",
            "status": "active",
            "category": [concept("1287261000000108", "Resuscitation status")],
            "code": concept("304253006", "Not for resuscitation"),
            "subject": b.subject,
            "period": { "start": date(referred) },
            "author": b.own_organisation()
        }),
        referred,
    );
    b.add(
        json!({
            "resourceType": "CarePlan",
            "status": if person.deceased_day.is_some() { "completed" } else { "active" },
            "intent": "plan",
            "title": "Advance care plan",
            "category": [concept("736366004", "Advance care plan")],
            "description": "Preferred place of care and of death: home. Anticipatory medicines in the house. Family aware of the plan.",
            "subject": b.subject,
            "period": { "start": date(referred) }
        }),
        referred,
    );
    // Anticipatory ("just in case") medicines, then the doses given in the last days.
    const ANTICIPATORY: &[(&str, &str, &str, f64, &str)] = &[
        (
            "36128011000001101",
            "Morphine sulfate 10mg/5ml oral solution",
            "26643006",
            2.5,
            "mL",
        ),
        (
            "34998611000001106",
            "Midazolam 10mg/2ml solution for injection ampoules",
            "34206005",
            2.5,
            "mg",
        ),
    ];
    for &(code, name, route, dose, unit) in ANTICIPATORY {
        b.add(
            json!({
                "resourceType": "MedicationRequest",
                "status": if person.deceased_day.is_some() { "stopped" } else { "active" },
                "intent": "order",
                "medicationCodeableConcept": medicine(code, name),
                "subject": b.subject,
                "authoredOn": date(referred),
                "dosageInstruction": [{
                    "asNeededCodeableConcept": concept("22253000", "Pain"),
                    "timing": { "repeat": { "frequency": 1, "period": 4, "periodUnit": "h" } },
                    "route": concept(route, if route == "26643006" { "Oral" } else { "Subcutaneous" }),
                    "doseAndRate": [{ "doseQuantity": { "value": dose, "unit": unit, "system": UCUM, "code": unit } }]
                }]
            }),
            referred,
        );
        for _ in 0..b.rng.range(1, 3) {
            let day = last - b.rng.below(5) as i64;
            let at = any_time(day, &mut b.rng);
            b.add(
                json!({
                    "resourceType": "MedicationAdministration",
                    "status": "completed",
                    "medicationCodeableConcept": medicine(code, name),
                    "subject": b.subject,
                    "effectiveDateTime": at,
                    "performer": [{ "actor": { "display": "Hospice community nurse" } }],
                    "dosage": {
                        "route": concept(route, if route == "26643006" { "Oral" } else { "Subcutaneous" }),
                        "dose": { "value": dose, "unit": unit, "system": UCUM, "code": unit }
                    }
                }),
                day,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(kind: OrgKind, org: &str) -> GenerateOptions {
        GenerateOptions {
            org: OdsCode::parse(org).unwrap(),
            org_name: format!("{org} organisation"),
            kind,
            registered_gp: OdsCode::parse("A81001").unwrap(),
            patients: 400,
            seed: 3,
            out: PathBuf::new(),
        }
    }

    /// Every bundle each kind of organisation writes for the first 400 people of seed 3.
    fn bundles(kind: OrgKind, org: &str) -> Vec<(Person, Value)> {
        let options = options(kind, org);
        (0..options.patients)
            .map(|index| person(options.seed, index))
            .filter(|p| p.in_caseload_of(kind))
            .map(|p| {
                let bundle = patient_bundle(&options, &p);
                (p, bundle)
            })
            .collect()
    }

    fn resources(bundle: &Value) -> impl Iterator<Item = &Value> {
        bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| &e["resource"])
    }

    fn coded(resource: &Value, field: &str) -> String {
        resource[field]["coding"][0]["display"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    const ALL: &[(OrgKind, &str)] = &[
        (OrgKind::Gp, "A81001"),
        (OrgKind::Acute, "RTH"),
        (OrgKind::Hospice, "8HA15"),
    ];

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
    fn nothing_happens_before_birth_or_after_death() {
        for &(kind, org) in ALL {
            for (person, bundle) in bundles(kind, org) {
                let birth = date(person.birth_day);
                let death = person.deceased_day.map(|d| date(d + 1));
                for resource in resources(&bundle).skip(1) {
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
                                "{org}: {field} {date} before birth {birth}"
                            );
                            if let Some(death) = &death {
                                assert!(
                                    date[..10] <= death[..],
                                    "{org}: {field} {date} after death {death}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// No child with chronic kidney disease, HbA1c or a blood pressure; no man with
    /// hypothyroidism from the female-only list; weights that fit the age; diabetics'
    /// HbA1c flagged against its range.
    #[test]
    fn conditions_medicines_and_results_fit_age_and_sex() {
        for (person, bundle) in bundles(OrgKind::Gp, "A81001") {
            let age = person.age_years();
            for (spec, onset) in &person.conditions {
                assert!(age >= spec.min_age, "{} at {age}", spec.display);
                assert!(
                    *onset >= person.birth_day + spec.min_age * YEAR,
                    "{} onset too young",
                    spec.display
                );
                assert!(spec.female.is_none_or(|f| f == person.female));
            }
            for resource in resources(&bundle) {
                let code = coded(resource, "code");
                if resource["resourceType"] == "Observation" {
                    if age < 16 {
                        assert!(
                            !code.contains("HbA1c") && !code.contains("Blood pressure"),
                            "{code} at {age}"
                        );
                    }
                    if code == "Body weight" {
                        let kg = resource["valueQuantity"]["value"].as_f64().unwrap();
                        let plausible = match age {
                            0 => 2.0..12.0,
                            1..=12 => 7.0..60.0,
                            _ => 30.0..140.0,
                        };
                        assert!(plausible.contains(&kg), "{kg} kg at {age}");
                    }
                    if code == "HbA1c level" {
                        let value = resource["valueQuantity"]["value"].as_f64().unwrap();
                        let flag = resource["interpretation"][0]["coding"][0]["code"]
                            .as_str()
                            .unwrap();
                        assert_eq!(flag == "H", value > 41.0, "{value} flagged {flag}");
                        assert!(resource["referenceRange"][0]["high"]["value"].is_number());
                    }
                }
                if resource["resourceType"] == "Condition" && age < 50 {
                    assert_ne!(code, "Chronic kidney disease stage 3", "CKD at {age}");
                }
            }
        }
    }

    /// Each organisation writes its own part of the care, and everyone names the practice
    /// the patient is registered with as their GP.
    #[test]
    fn each_organisation_records_its_own_care_and_names_the_registered_gp() {
        let count = |kind: OrgKind, org: &str, resource_type: &str| {
            bundles(kind, org)
                .iter()
                .flat_map(|(_, b)| {
                    resources(b)
                        .filter(|r| r["resourceType"] == resource_type)
                        .cloned()
                        .collect::<Vec<_>>()
                })
                .count()
        };
        assert!(count(OrgKind::Hospice, "8HA15", "MedicationAdministration") > 0);
        assert_eq!(count(OrgKind::Gp, "A81001", "MedicationAdministration"), 0);
        assert_eq!(count(OrgKind::Acute, "RTH", "MedicationAdministration"), 0);
        assert!(count(OrgKind::Hospice, "8HA15", "RelatedPerson") > 0);
        assert!(count(OrgKind::Acute, "RTH", "DocumentReference") > 0);
        assert_eq!(count(OrgKind::Gp, "A81001", "DocumentReference"), 0);
        assert_eq!(count(OrgKind::Hospice, "8HA15", "Immunization"), 0);
        for &(kind, org) in ALL {
            for (_, bundle) in bundles(kind, org) {
                let patient = resources(&bundle).next().unwrap();
                assert_eq!(
                    patient["generalPractitioner"][0]["identifier"]["value"], "A81001",
                    "{org}"
                );
            }
        }
        // Caseloads: the hospice's people are the practice's too, and admitted to hospital.
        let hospice = bundles(OrgKind::Hospice, "8HA15");
        assert!(
            hospice.len() >= 10,
            "{} hospice patients in 400",
            hospice.len()
        );
        assert!(
            hospice
                .iter()
                .all(|(p, _)| p.admitted && p.age_years() >= 55)
        );
        let acute = bundles(OrgKind::Acute, "RTH").len();
        assert!(
            acute > hospice.len() && acute < 200,
            "{acute} admitted of 400"
        );
    }

    /// A few records disagree as real ones do: some hospice patients have died (the
    /// practice and the hospice say so, the hospital does not), and the hospital spells
    /// some names differently.
    #[test]
    fn some_patients_have_died_and_some_records_disagree() {
        let people: Vec<Person> = (0..400).map(|i| person(3, i)).collect();
        let deceased: Vec<&Person> = people.iter().filter(|p| p.deceased_day.is_some()).collect();
        assert!(!deceased.is_empty());
        let died = deceased[0];
        let says_died = |kind, org| {
            let bundle = patient_bundle(&options(kind, org), died);
            resources(&bundle).next().unwrap()["deceasedDateTime"].is_string()
        };
        assert!(says_died(OrgKind::Gp, "A81001") && says_died(OrgKind::Hospice, "8HA15"));
        assert!(!says_died(OrgKind::Acute, "RTH"));
        let misspelt = people
            .iter()
            .find(|p| p.admitted && p.hospital_misspells)
            .expect("a name the hospital spells differently");
        let family = |kind, org| {
            let bundle = patient_bundle(&options(kind, org), misspelt);
            resources(&bundle).next().unwrap()["name"][0]["family"].clone()
        };
        assert_ne!(family(OrgKind::Gp, "A81001"), family(OrgKind::Acute, "RTH"));
    }

    #[test]
    fn files_are_named_by_organisation_and_list_position_never_by_nhs_number() {
        let dir = tempfile::tempdir().unwrap();
        let generated = generate(&GenerateOptions {
            patients: 20,
            out: dir.path().to_path_buf(),
            ..options(OrgKind::Gp, "A81001")
        })
        .unwrap();
        assert_eq!(generated.files, 20);
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().to_string();
            assert!(
                name.starts_with("A81001-S3-P") && name.ends_with(".json"),
                "{name}"
            );
            assert!(
                !generated
                    .nhs_numbers
                    .iter()
                    .any(|n| name.contains(n.as_str())),
                "{name}"
            );
        }
    }

    #[test]
    fn same_seed_same_output_and_other_seed_differs() {
        let options = options(OrgKind::Gp, "A81001");
        let a = patient_bundle(&options, &person(1, 0));
        let b = patient_bundle(&options, &person(1, 0));
        let c = patient_bundle(&options, &person(2, 0));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
