//! What a clinician reads of one item: rendered from the source FHIR resource the item
//! carries, one reader per resource type, showing what the source says and never more.
//!
//! A [`Reading`] is the single rendering the page, `caremesh record` and the JSON API all
//! show, so the three cannot disagree. It says where the fact stands (current, past,
//! refuted, an event), the labelled details a clinician needs (dose, route, range,
//! reaction, who recorded it), warnings (high criticality, an abnormal result, a value the
//! source could not give) and what makes two items the same fact. Items written before
//! items carried their resource (format 1) are read from their summary and say so.

use crate::capitalise;
use crate::clock;
use caremesh_sync::Item;
use serde::Serialize;
use serde_json::Value;

/// Where a fact stands, which decides the list it is shown in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Standing {
    /// Active: a current medicine, an active problem or allergy.
    Current,
    /// The source does not say whether it is current; shown with the current ones, marked.
    NotStated,
    /// Resolved, inactive, stopped, completed.
    Past,
    /// The source says it is not true. Never shown as a fact: listed apart, marked refuted.
    Refuted,
    /// Something that happened once: a result, an encounter, a document, a dose given.
    Event,
}

impl Standing {
    pub fn label(self) -> &'static str {
        match self {
            Standing::Current => "current",
            Standing::NotStated => "status not stated",
            Standing::Past => "past",
            Standing::Refuted => "refuted",
            Standing::Event => "event",
        }
    }
}

/// One labelled detail, such as `Dose: 500 mg twice a day`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Detail {
    pub label: &'static str,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reading {
    /// The substance, medicine, problem, test or event, as the source names it. Where the
    /// source's own text differs from its code's display (a degraded code after a GP2GP
    /// transfer, say), the text: the code is given as a detail.
    pub title: String,
    pub standing: Standing,
    /// The source's statuses in words, such as `active, confirmed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    pub details: Vec<Detail>,
    /// What must not be missed: high criticality, an abnormal or critical result, a value
    /// the source could not give, a refuted or unconfirmed entry, a dose not given.
    pub warnings: Vec<String>,
    /// When it started or happened, as FHIR gave it (shown with [`clock::uk_when`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub date: Option<String>,
    /// When it ended (abatement, end of a course), as FHIR gave it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
    /// A statement of no known allergies (or similar): flagged when it stands beside a
    /// current allergy.
    pub negation: bool,
    /// What makes two items the same fact (see [`Reading::same_fact`]).
    #[serde(skip)]
    pub identity: String,
    /// Read from a format 1 item's summary, not from its resource.
    pub summary_only: bool,
}

impl Reading {
    /// Whether two readings are the same fact, so that they may be one entry listing each
    /// source's version: the same code and the same words (a degraded code shared by
    /// different substances never joins them), for medicines the same product and dose,
    /// for results the same test, time and value.
    pub fn same_fact(&self, other: &Reading) -> bool {
        self.identity == other.identity
    }

    fn detail(&mut self, label: &'static str, value: Option<String>) {
        if let Some(value) = value.filter(|v| !v.trim().is_empty()) {
            self.details.push(Detail { label, value });
        }
    }

    fn date_detail(&mut self, label: &'static str, fhir: Option<String>) {
        self.detail(label, fhir.map(|f| clock::uk_when(&f)));
    }

    /// The details as one line, for text output and citations.
    pub fn details_line(&self) -> String {
        self.details
            .iter()
            .map(|d| format!("{}: {}", d.label, d.value))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Reads an item: from its resource where it carries one, else from its summary.
pub fn read(item: &Item) -> Reading {
    match &item.resource {
        Some(resource) => read_resource(item, resource),
        None => read_summary(item),
    }
}

fn blank(item: &Item, title: String) -> Reading {
    Reading {
        title,
        standing: Standing::Event,
        status: None,
        details: Vec::new(),
        warnings: Vec::new(),
        date: None,
        ended: None,
        negation: false,
        identity: String::new(),
        summary_only: item.resource.is_none(),
    }
}

/// A format 1 item, or one with no resource (free-text notes): its title, detail and
/// status string as the publisher summarised them.
fn read_summary(item: &Item) -> Reading {
    let mut reading = blank(item, item.title.clone());
    reading.status = item.status.clone();
    reading.standing = match item.status.as_deref() {
        None => Standing::NotStated,
        Some(status) => standing_of_status(status),
    };
    if !states(item) || item.id.ends_with("#note") {
        reading.standing = Standing::Event;
    }
    reading.detail(
        if item.id.ends_with("#note") {
            "Note"
        } else {
            "Detail"
        },
        item.detail.clone(),
    );
    reading.date = item.effective.clone().or(item.recorded.clone());
    let code = item.code.as_ref().and_then(|c| c.code.clone());
    reading.identity = identity(&[
        code.as_deref().unwrap_or(""),
        &normalise_words(&item.title),
        &event_day(item, &reading),
    ]);
    if item.resource.is_none() && item.section.is_clinical() && !item.id.ends_with("#note") {
        reading.summary_only = true;
        reading.warnings.push(
            "Summary only: this source has not re-published this entry with its full detail \
             (dose, range, statuses may be missing)"
                .into(),
        );
    }
    reading
}

/// Sections whose items are states (current or past) rather than events.
fn states(item: &Item) -> bool {
    use caremesh_sync::Section::*;
    match item.section {
        Allergies | Problems | Alerts | CarePlans | FamilyHistory | Contacts => true,
        Medications => matches!(
            item.resource_type.as_str(),
            "MedicationStatement" | "MedicationRequest"
        ),
        _ => false,
    }
}

fn standing_of_status(status: &str) -> Standing {
    match status {
        "active" | "recurrence" | "relapse" | "intended" | "on-hold" | "draft" => Standing::Current,
        "refuted" => Standing::Refuted,
        "unknown" => Standing::NotStated,
        _ => Standing::Past,
    }
}

fn event_day(item: &Item, reading: &Reading) -> String {
    if states(item) {
        String::new()
    } else {
        reading
            .date
            .as_deref()
            .map(clock::uk_day)
            .unwrap_or_default()
    }
}

fn identity(parts: &[&str]) -> String {
    parts.join("\u{1f}")
}

fn normalise_words(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

// ----- reading FHIR JSON -----

fn text(value: &Value, field: &str) -> Option<String> {
    match value.get(field)? {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn list<'v>(value: &'v Value, field: &str) -> &'v [Value] {
    value
        .get(field)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// A CodeableConcept's words: its text where given (what the clinician chose or typed),
/// else its first coding's display, else its code.
fn concept(value: Option<&Value>) -> Option<String> {
    let value = value?;
    text(value, "text").or_else(|| {
        list(value, "coding")
            .iter()
            .find_map(|c| text(c, "display").or_else(|| text(c, "code")))
    })
}

/// The display of its first coding that has one.
fn coded_display(value: &Value) -> Option<String> {
    list(value, "coding")
        .iter()
        .find_map(|c| text(c, "display"))
}

/// The code a clinician's system would match on: SNOMED CT (dm+d shares its system) first.
fn primary_code(value: Option<&Value>) -> Option<String> {
    let codings = list(value?, "coding");
    codings
        .iter()
        .find(|c| text(c, "system").as_deref() == Some(crate::SNOMED))
        .or_else(|| codings.first())
        .and_then(|c| text(c, "code"))
}

/// A concept's code, or where the source's text says something other than the code's
/// display, both: degraded codes carry the real substance only in their text.
fn concept_identity(value: Option<&Value>) -> String {
    let Some(value) = value else {
        return String::new();
    };
    let code = primary_code(Some(value)).unwrap_or_default();
    let words = concept(Some(value)).map(|w| normalise_words(&w));
    let display = coded_display(value).map(|d| normalise_words(&d));
    match (words, display) {
        (Some(words), Some(display)) if words == display => code,
        (Some(words), _) if code.is_empty() || text(value, "text").is_some() => {
            format!("{code}:{words}")
        }
        _ => code,
    }
}

/// When the text differs from the coding's display, a detail saying how it was coded, so
/// a degraded code is visible as such.
fn coded_as(value: Option<&Value>) -> Option<String> {
    let value = value?;
    let words = text(value, "text")?;
    let display = coded_display(value)?;
    (normalise_words(&words) != normalise_words(&display)).then(|| {
        match primary_code(Some(value)) {
            Some(code) => format!("{display} ({code})"),
            None => display,
        }
    })
}

fn code_of(value: Option<&Value>) -> Option<String> {
    list(value?, "coding")
        .iter()
        .find_map(|c| text(c, "code"))
        .or_else(|| text(value?, "text"))
}

/// Who or what a reference names: its display, else its identifier; a bare reference to a
/// resource the extract did not include names nobody a clinician would know, so it reads
/// as such rather than as an internal id.
fn reference_name(value: Option<&Value>) -> Option<String> {
    let value = value?;
    text(value, "display")
        .or_else(|| value.get("identifier").and_then(|i| text(i, "value")))
        .or_else(|| {
            let reference = text(value, "reference")?;
            let kind = reference
                .rsplit('/')
                .nth(1)
                .filter(|k| k.chars().next().is_some_and(char::is_uppercase))
                .unwrap_or("resource");
            let kind = match kind {
                "Organization" => "an organisation",
                "Practitioner" | "PractitionerRole" => "a practitioner",
                "Location" => "a location",
                "Patient" => "the patient",
                "RelatedPerson" => "a relative or carer",
                "Device" => "a device",
                _ => "a resource",
            };
            Some(format!("{kind} not named in this extract"))
        })
}

fn names(values: &[Value], field: Option<&str>) -> Option<String> {
    let names: Vec<String> = values
        .iter()
        .filter_map(|v| reference_name(field.map_or(Some(v), |f| v.get(f))))
        .collect();
    (!names.is_empty()).then(|| names.join(", "))
}

fn concepts(values: &[Value]) -> Option<String> {
    let words: Vec<String> = values.iter().filter_map(|v| concept(Some(v))).collect();
    (!words.is_empty()).then(|| words.join(", "))
}

/// The start of a choice of `[x]` fields: `onsetDateTime`, `onsetPeriod.start`,
/// `onsetAge`, `onsetString`.
fn when_x(resource: &Value, prefix: &str) -> Option<String> {
    text(resource, &format!("{prefix}DateTime"))
        .or_else(|| {
            resource
                .get(format!("{prefix}Period"))
                .and_then(|p| text(p, "start"))
        })
        .or_else(|| text(resource, &format!("{prefix}String")))
        .or_else(|| text(resource, &format!("{prefix}Date")))
}

/// A choice of `[x]` fields read as words (age and string forms included), for details.
fn when_x_words(resource: &Value, prefix: &str) -> Option<String> {
    if let Some(date) = text(resource, &format!("{prefix}DateTime"))
        .or_else(|| text(resource, &format!("{prefix}Date")))
    {
        return Some(clock::uk_when(&date));
    }
    if let Some(period) = resource.get(format!("{prefix}Period")) {
        return period_words(period);
    }
    if let Some(age) = resource.get(format!("{prefix}Age")) {
        return quantity(age).map(|a| format!("at age {a}"));
    }
    if let Some(range) = resource.get(format!("{prefix}Range")) {
        return range_words(range).map(|r| format!("at age {r}"));
    }
    if let Some(true) = resource
        .get(format!("{prefix}Boolean"))
        .and_then(Value::as_bool)
    {
        return Some("yes (date not given)".into());
    }
    text(resource, &format!("{prefix}String"))
}

fn period_words(period: &Value) -> Option<String> {
    match (text(period, "start"), text(period, "end")) {
        (Some(start), Some(end)) => Some(format!(
            "{} to {}",
            clock::uk_when(&start),
            clock::uk_when(&end)
        )),
        (Some(start), None) => Some(format!("from {}", clock::uk_when(&start))),
        (None, Some(end)) => Some(format!("until {}", clock::uk_when(&end))),
        (None, None) => None,
    }
}

// ----- quantities, units and precision -----

/// A UCUM unit as people write it: `mm[Hg]` is mmHg, `10*9/L` is ×10⁹/L, `Cel` is °C.
pub fn readable_unit(unit: &str) -> String {
    const KNOWN: &[(&str, &str)] = &[
        ("mm[Hg]", "mmHg"),
        ("Cel", "°C"),
        ("[degF]", "°F"),
        ("kg/m2", "kg/m²"),
        ("/min", "/min"),
        ("{beats}/min", "beats/min"),
        ("{breaths}/min", "breaths/min"),
        ("/[HPF]", "/HPF"),
        ("[in_i]", "in"),
        ("[lb_av]", "lb"),
        ("mL/min/{1.73_m2}", "mL/min/1.73m²"),
        ("mL/min/1.73m2", "mL/min/1.73m²"),
        ("a", "years"),
        ("mo", "months"),
        ("wk", "weeks"),
        ("d", "days"),
        ("h", "hours"),
        ("min", "minutes"),
        ("ug", "micrograms"),
        ("ug/L", "micrograms/L"),
        ("umol/L", "µmol/L"),
        ("{score}", ""),
        ("1", ""),
    ];
    if let Some((_, readable)) = KNOWN.iter().find(|(ucum, _)| *ucum == unit) {
        return readable.to_string();
    }
    let mut out = unit.to_string();
    for (power, superscript) in [
        ("10*12", "×10¹²"),
        ("10*9", "×10⁹"),
        ("10*6", "×10⁶"),
        ("10*3", "×10³"),
    ] {
        out = out.replace(power, superscript);
    }
    out = out.replace("m2", "m²").replace("umol", "µmol");
    // Annotations ({cells}) are words for the reader; brackets are UCUM syntax.
    out.retain(|c| !matches!(c, '{' | '}' | '[' | ']'));
    out
}

/// A number as the source gave it, unless it carries more significant digits than any
/// measurement has (a float artefact such as 82.62744253235653): then to three significant
/// figures, never fewer decimals than `min_decimals` (those of its reference range).
pub fn readable_number(number: &serde_json::Number, min_decimals: usize) -> String {
    let given = number.to_string();
    let significant = given
        .chars()
        .filter(char::is_ascii_digit)
        .skip_while(|c| *c == '0')
        .count();
    if significant <= 6 || given.contains(['e', 'E']) {
        return given;
    }
    let Some(value) = number.as_f64() else {
        return given;
    };
    if value == 0.0 {
        return "0".into();
    }
    let magnitude = value.abs().log10().floor() as i32;
    let decimals = (2 - magnitude).max(0) as usize;
    format!("{value:.*}", decimals.max(min_decimals))
}

fn decimals_of(number: &serde_json::Number) -> usize {
    let given = number.to_string();
    given.split_once('.').map_or(0, |(_, d)| d.len())
}

fn quantity_with(value: &Value, min_decimals: usize) -> Option<String> {
    let number = match value.get("value")? {
        Value::Number(n) => readable_number(n, min_decimals),
        _ => return None,
    };
    // A UCUM code reads the same from every source ("mm[Hg]" where one writes "millimeter
    // of mercury" and another "mmHg"); otherwise the unit as the source wrote it.
    let ucum = text(value, "system").as_deref() == Some("http://unitsofmeasure.org");
    let unit = match (ucum, text(value, "code"), text(value, "unit")) {
        (true, Some(code), _) => readable_unit(&code),
        (_, _, Some(unit)) => readable_unit(&unit),
        (_, Some(code), None) => readable_unit(&code),
        (_, None, None) => String::new(),
    };
    let comparator = text(value, "comparator").unwrap_or_default();
    Some(if unit.is_empty() {
        format!("{comparator}{number}")
    } else if unit.starts_with('/') || unit == "%" || unit.starts_with('°') {
        format!("{comparator}{number}{unit}")
    } else {
        format!("{comparator}{number} {unit}")
    })
}

fn quantity(value: &Value) -> Option<String> {
    quantity_with(value, 0)
}

fn range_words(range: &Value) -> Option<String> {
    let low = range.get("low").and_then(quantity);
    let high = range.get("high").and_then(quantity);
    let unit = |bound: &str| {
        range
            .get(bound)
            .and_then(|q| text(q, "unit").or_else(|| text(q, "code")))
    };
    let bare = |bound: &str| {
        range
            .get(bound)
            .and_then(|q| q.get("value"))
            .map(Value::to_string)
    };
    match (low, high) {
        (Some(_), Some(high)) if unit("low") == unit("high") && unit("low").is_some() => {
            Some(format!("{} to {high}", bare("low").unwrap_or_default()))
        }
        (Some(low), Some(high)) => Some(format!("{low} to {high}")),
        (Some(low), None) => Some(format!("{low} or more")),
        (None, Some(high)) => Some(format!("up to {high}")),
        (None, None) => None,
    }
}

/// Decimals the reference range shows, so a value is never shown less precisely.
fn range_decimals(resource: &Value) -> usize {
    list(resource, "referenceRange")
        .iter()
        .flat_map(|r| [r.get("low"), r.get("high")])
        .flatten()
        .filter_map(|q| match q.get("value") {
            Some(Value::Number(n)) => Some(decimals_of(n)),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// An observation's (or a component's) value, or why there is none.
fn observation_value(value: &Value, min_decimals: usize) -> (Option<String>, Option<String>) {
    if let Some(q) = value.get("valueQuantity") {
        return (quantity_with(q, min_decimals), None);
    }
    if let Some(c) = value.get("valueCodeableConcept") {
        return (concept(Some(c)), None);
    }
    if let Some(s) = text(value, "valueString") {
        return (Some(s), None);
    }
    if let Some(b) = value.get("valueBoolean").and_then(Value::as_bool) {
        return (Some(if b { "yes" } else { "no" }.into()), None);
    }
    if let Some(i) = text(value, "valueInteger") {
        return (Some(i), None);
    }
    if let Some(r) = value.get("valueRange") {
        return (range_words(r), None);
    }
    if let Some(r) = value.get("valueRatio") {
        let n = r.get("numerator").and_then(quantity);
        let d = r.get("denominator").and_then(quantity);
        return (n.zip(d).map(|(n, d)| format!("{n} : {d}")), None);
    }
    if let Some(t) = text(value, "valueDateTime").or_else(|| text(value, "valueTime")) {
        return (Some(clock::uk_when(&t)), None);
    }
    if let Some(p) = value.get("valuePeriod") {
        return (period_words(p), None);
    }
    let absent = value.get("dataAbsentReason").and_then(|r| concept(Some(r)));
    (None, absent)
}

fn reference_ranges(resource: &Value) -> Option<String> {
    let ranges: Vec<String> = list(resource, "referenceRange")
        .iter()
        .filter_map(|range| {
            let bounds = range_words(range);
            let words = text(range, "text");
            let applies = concepts(list(range, "appliesTo"));
            let mut out = match (bounds, words) {
                (Some(bounds), Some(words)) if words != bounds => format!("{bounds} ({words})"),
                (Some(bounds), _) => bounds,
                (None, Some(words)) => words,
                (None, None) => return None,
            };
            if let Some(applies) = applies {
                out.push_str(&format!(" for {applies}"));
            }
            if let Some(age) = range.get("age").and_then(range_words) {
                out.push_str(&format!(" at age {age}"));
            }
            Some(out)
        })
        .collect();
    (!ranges.is_empty()).then(|| ranges.join("; "))
}

/// HL7 v3 ObservationInterpretation codes in words; a code not listed shows as given.
fn interpretation_words(resource: &Value) -> Option<(String, bool)> {
    let interpretation = list(resource, "interpretation").first()?;
    let code = code_of(Some(interpretation)).unwrap_or_default();
    let (words, abnormal) = match code.as_str() {
        "H" => ("High", true),
        "HH" | "HU" => ("Critically high", true),
        "L" => ("Low", true),
        "LL" | "LU" => ("Critically low", true),
        "A" => ("Abnormal", true),
        "AA" => ("Critically abnormal", true),
        "N" => ("Normal", false),
        "POS" | "DET" => ("Positive", true),
        "NEG" | "ND" => ("Negative", false),
        _ => {
            let words = concept(Some(interpretation))?;
            let abnormal = !matches!(words.to_lowercase().as_str(), "normal" | "negative");
            return Some((words, abnormal));
        }
    };
    Some((words.to_string(), abnormal))
}

// ----- dosage -----

/// A dosage as a prescriber would write it. Its text where the source gives one (that is
/// what was prescribed), with the structured parts the text may not repeat; else built
/// from dose, route, frequency and as-needed.
pub fn dosage_words(dosage: &Value) -> Option<String> {
    let structured = structured_dosage(dosage);
    match (text(dosage, "text"), structured) {
        (Some(text), _) => Some(text),
        (None, structured) => structured,
    }
}

fn structured_dosage(dosage: &Value) -> Option<String> {
    let mut parts = Vec::new();
    for dose_and_rate in list(dosage, "doseAndRate") {
        if let Some(dose) = dose_and_rate.get("doseQuantity").and_then(quantity) {
            parts.push(dose);
        } else if let Some(range) = dose_and_rate.get("doseRange").and_then(range_words) {
            parts.push(range);
        }
        if let Some(rate) = dose_and_rate
            .get("rateQuantity")
            .and_then(quantity)
            .or_else(|| dose_and_rate.get("rateRange").and_then(range_words))
        {
            parts.push(format!("at {rate}"));
        }
    }
    // MedicationAdministration.dosage carries dose and rate directly.
    if let Some(dose) = dosage.get("dose").and_then(quantity) {
        parts.push(dose);
    }
    if let Some(rate) = dosage.get("rateQuantity").and_then(quantity) {
        parts.push(format!("at {rate}"));
    }
    if let Some(route) = concept(dosage.get("route")) {
        parts.push(route.to_lowercase());
    }
    if let Some(timing) = dosage.get("timing").and_then(timing_words) {
        parts.push(timing);
    }
    if let Some(as_needed) = as_needed_words(dosage) {
        parts.push(as_needed);
    }
    if let Some(max) = dosage.get("maxDosePerPeriod").and_then(|r| {
        let n = r.get("numerator").and_then(quantity)?;
        let d = r.get("denominator").and_then(quantity)?;
        Some(format!("maximum {n} in {d}"))
    }) {
        parts.push(max);
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

fn as_needed_words(dosage: &Value) -> Option<String> {
    if let Some(reason) = concept(dosage.get("asNeededCodeableConcept")) {
        return Some(format!("when required for {}", reason.to_lowercase()));
    }
    (dosage.get("asNeededBoolean").and_then(Value::as_bool) == Some(true))
        .then(|| "when required".to_string())
}

fn timing_words(timing: &Value) -> Option<String> {
    if let Some(code) = concept(timing.get("code")) {
        return Some(code);
    }
    let repeat = timing.get("repeat")?;
    let frequency = repeat.get("frequency").and_then(Value::as_u64);
    let frequency_max = repeat.get("frequencyMax").and_then(Value::as_u64);
    let period = repeat.get("period").and_then(Value::as_f64);
    let unit = text(repeat, "periodUnit");
    let mut words = match (frequency, period, unit.as_deref()) {
        (Some(f), Some(p), Some(u)) => Some(frequency_words(f, frequency_max, p, u)),
        (None, Some(p), Some(u)) => Some(every(p, u)),
        _ => None,
    };
    let when: Vec<String> = list(repeat, "when")
        .iter()
        .filter_map(Value::as_str)
        .map(event_timing)
        .collect();
    if !when.is_empty() {
        let joined = when.join(" and ");
        words = Some(match words {
            Some(w) => format!("{w}, {joined}"),
            None => joined,
        });
    }
    let times: Vec<&str> = list(repeat, "timeOfDay")
        .iter()
        .filter_map(Value::as_str)
        .map(|t| t.get(..5).unwrap_or(t))
        .collect();
    if !times.is_empty() {
        let at = format!("at {}", times.join(", "));
        words = Some(match words {
            Some(w) => format!("{w} {at}"),
            None => at,
        });
    }
    if let Some(duration) = repeat.get("boundsDuration").and_then(quantity) {
        words = Some(match words {
            Some(w) => format!("{w} for {duration}"),
            None => format!("for {duration}"),
        });
    }
    words
}

fn unit_words(unit: &str, plural: bool) -> &'static str {
    match (unit, plural) {
        ("s", false) => "second",
        ("s", true) => "seconds",
        ("min", false) => "minute",
        ("min", true) => "minutes",
        ("h", false) => "hour",
        ("h", true) => "hours",
        ("d", false) => "day",
        ("d", true) => "days",
        ("wk", false) => "week",
        ("wk", true) => "weeks",
        ("mo", false) => "month",
        ("mo", true) => "months",
        ("a", false) => "year",
        ("a", true) => "years",
        _ => "period",
    }
}

fn every(period: f64, unit: &str) -> String {
    if period == 1.0 {
        format!("every {}", unit_words(unit, false))
    } else {
        format!("every {} {}", trim_float(period), unit_words(unit, true))
    }
}

fn frequency_words(frequency: u64, max: Option<u64>, period: f64, unit: &str) -> String {
    if period == 1.0 && max.is_none() {
        let per = unit_words(unit, false);
        return match frequency {
            1 => match unit {
                "d" => "once a day".into(),
                _ => format!("once a {per}"),
            },
            2 => format!("twice a {per}"),
            n => format!("{n} times a {per}"),
        };
    }
    let times = match max {
        Some(max) => format!("{frequency} to {max} times"),
        None if frequency == 1 => "once".into(),
        None => format!("{frequency} times"),
    };
    format!("{times} {}", every(period, unit))
}

fn trim_float(value: f64) -> String {
    if value.fract() == 0.0 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

fn event_timing(code: &str) -> String {
    match code {
        "MORN" => "in the morning",
        "AFT" => "in the afternoon",
        "EVE" => "in the evening",
        "NIGHT" => "at night",
        "HS" => "at bedtime",
        "WAKE" => "on waking",
        "C" => "with a meal",
        "CM" => "with breakfast",
        "CD" => "with lunch",
        "CV" => "with the evening meal",
        "AC" => "before a meal",
        "ACM" => "before breakfast",
        "ACD" => "before lunch",
        "ACV" => "before the evening meal",
        "PC" => "after a meal",
        "PCM" => "after breakfast",
        "PCD" => "after lunch",
        "PCV" => "after the evening meal",
        other => return other.to_string(),
    }
    .to_string()
}

// ----- per resource type -----

/// SNOMED CT codes that state an absence of allergies.
const NO_KNOWN_ALLERGY_CODES: &[&str] = &[
    "716186003",  // No known allergy
    "409137002",  // No known drug allergy
    "428607008",  // No known environmental allergy
    "429625007",  // No known food allergy
    "1003774007", // No known Hevea brasiliensis latex allergy
    "1003776009", // No known insect allergy
];

fn read_resource(item: &Item, resource: &Value) -> Reading {
    let mut reading = blank(item, item.title.clone());
    match item.resource_type.as_str() {
        "AllergyIntolerance" => allergy(&mut reading, resource),
        "Condition" => condition(&mut reading, resource),
        "MedicationStatement"
        | "MedicationRequest"
        | "MedicationAdministration"
        | "MedicationDispense" => medication(&mut reading, item, resource),
        "Observation" => observation(&mut reading, resource),
        "DiagnosticReport" => report(&mut reading, resource),
        "Encounter" | "EpisodeOfCare" => encounter(&mut reading, resource),
        "DocumentReference" | "Composition" => document(&mut reading, resource),
        "Immunization" => immunisation(&mut reading, resource),
        "Procedure" => procedure(&mut reading, resource),
        "Flag" => flag(&mut reading, resource),
        "CarePlan" => care_plan(&mut reading, resource),
        "ServiceRequest" => referral(&mut reading, resource),
        "FamilyMemberHistory" => family_history(&mut reading, resource),
        "RelatedPerson" => contact(&mut reading, resource),
        "Patient" => {
            reading.standing = Standing::Current;
        }
        _ => {
            reading.detail("Detail", item.detail.clone());
            reading.date = item.effective.clone();
        }
    }
    if reading.identity.is_empty() {
        reading.identity =
            identity(&[&normalise_words(&reading.title), &event_day(item, &reading)]);
    }
    flag_current_past_its_end(&mut reading, &clock::rfc3339(clock::now_unix())[..10]);
    reading
}

/// A source can leave a status "active" after the end it recorded has passed (a course
/// finished, a prescription expired): listed as current, it must say so.
fn flag_current_past_its_end(reading: &mut Reading, today: &str) {
    if reading.standing == Standing::Current
        && let Some(end) = reading.ended.as_deref()
        && end.get(..10).is_some_and(|day| day < today)
    {
        reading.warnings.push(format!(
            "Recorded as current, but its end date ({}) has passed",
            clock::uk_when(end)
        ));
    }
}

fn clinical_and_verification(reading: &mut Reading, resource: &Value) -> (String, String) {
    let clinical = code_of(resource.get("clinicalStatus")).unwrap_or_default();
    let verification = code_of(resource.get("verificationStatus")).unwrap_or_default();
    let mut words = Vec::new();
    if !clinical.is_empty() {
        words.push(clinical.clone());
    }
    if !verification.is_empty() {
        words.push(verification.clone());
    }
    reading.status = (!words.is_empty()).then(|| words.join(", "));
    reading.standing = match (clinical.as_str(), verification.as_str()) {
        (_, "refuted") => Standing::Refuted,
        ("active" | "recurrence" | "relapse", _) => Standing::Current,
        ("inactive" | "remission" | "resolved", _) => Standing::Past,
        _ => Standing::NotStated,
    };
    match verification.as_str() {
        "refuted" => reading
            .warnings
            .push("Refuted: the source records that this is not the case".into()),
        "unconfirmed" | "provisional" | "differential" => reading
            .warnings
            .push(format!("Not confirmed ({verification})")),
        _ => {}
    }
    (clinical, verification)
}

fn allergy(reading: &mut Reading, resource: &Value) {
    let code = resource.get("code");
    reading.title = concept(code).unwrap_or_else(|| "Allergy (substance not given)".into());
    reading.negation =
        primary_code(code).is_some_and(|c| NO_KNOWN_ALLERGY_CODES.contains(&c.as_str()));
    clinical_and_verification(reading, resource);
    reading.detail("Coded as", coded_as(code));
    reading.detail(
        "Category",
        list(resource, "category")
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .reduce(|a, b| format!("{a}, {b}")),
    );
    reading.detail("Type", text(resource, "type"));
    let criticality = text(resource, "criticality");
    if criticality.as_deref() == Some("high") && reading.standing != Standing::Refuted {
        reading.warnings.push("High criticality".into());
    }
    reading.detail("Criticality", criticality);
    for reaction in list(resource, "reaction") {
        let manifestations = concepts(list(reaction, "manifestation"));
        let mut words = manifestations.unwrap_or_else(|| "reaction not described".into());
        if let Some(severity) = text(reaction, "severity") {
            words.push_str(&format!(" ({severity})"));
        }
        if let Some(substance) = concept(reaction.get("substance")) {
            words.push_str(&format!(" to {substance}"));
        }
        if let Some(onset) = text(reaction, "onset") {
            words.push_str(&format!(", {}", clock::uk_when(&onset)));
        }
        reading.detail("Reaction", Some(words));
    }
    reading.detail("Onset", when_x_words(resource, "onset"));
    reading.detail(
        "Last occurrence",
        text(resource, "lastOccurrence").map(|d| clock::uk_when(&d)),
    );
    reading.date_detail("Recorded", text(resource, "recordedDate"));
    reading.detail("Recorded by", reference_name(resource.get("recorder")));
    reading.detail("Asserted by", reference_name(resource.get("asserter")));
    reading.date = when_x(resource, "onset").or_else(|| text(resource, "recordedDate"));
    reading.identity = identity(&["allergy", &concept_identity(code)]);
}

fn condition(reading: &mut Reading, resource: &Value) {
    let code = resource.get("code");
    reading.title = concept(code).unwrap_or_else(|| "Problem (not described)".into());
    clinical_and_verification(reading, resource);
    reading.detail("Coded as", coded_as(code));
    reading.detail("Severity", concept(resource.get("severity")));
    reading.detail("Body site", concepts(list(resource, "bodySite")));
    reading.detail("Category", concepts(list(resource, "category")));
    reading.detail("Onset", when_x_words(resource, "onset"));
    let abatement = when_x_words(resource, "abatement");
    reading.detail("Resolved", abatement);
    reading.date_detail("Recorded", text(resource, "recordedDate"));
    reading.detail("Recorded by", reference_name(resource.get("recorder")));
    reading.detail("Asserted by", reference_name(resource.get("asserter")));
    reading.date = when_x(resource, "onset").or_else(|| text(resource, "recordedDate"));
    reading.ended = when_x(resource, "abatement");
    reading.identity = identity(&["problem", &concept_identity(code)]);
}

fn medication(reading: &mut Reading, item: &Item, resource: &Value) {
    let medicine = resource.get("medicationCodeableConcept");
    reading.title = concept(medicine)
        .or_else(|| reference_name(resource.get("medicationReference")))
        .unwrap_or_else(|| "Medicine not named".into());
    let status = text(resource, "status");
    reading.status = status.clone();
    reading.detail("Coded as", coded_as(medicine));
    let dosages: &[Value] = match item.resource_type.as_str() {
        "MedicationRequest" | "MedicationDispense" => list(resource, "dosageInstruction"),
        "MedicationAdministration" => {
            std::slice::from_ref(resource.get("dosage").unwrap_or(&Value::Null))
        }
        _ => list(resource, "dosage"),
    };
    let dose: Vec<String> = dosages
        .iter()
        .filter(|d| !d.is_null())
        .filter_map(dosage_words)
        .collect();
    let dose = (!dose.is_empty()).then(|| dose.join("; then "));
    reading.detail(
        "Dose",
        dose.clone().or(Some("not stated by the source".into())),
    );
    if let Some(first) = dosages.first().filter(|d| !d.is_null()) {
        // Where the text was shown, the route may not be in it: show it on its own too.
        if text(first, "text").is_some() {
            reading.detail("Route", concept(first.get("route")));
        }
        reading.detail("Instructions", text(first, "patientInstruction"));
    }
    reading.detail("Reason", concepts(list(resource, "reasonCode")));
    reading.detail(
        "Status reason",
        concepts(list(resource, "statusReason")).or_else(|| concept(resource.get("statusReason"))),
    );
    match item.resource_type.as_str() {
        "MedicationRequest" => {
            reading.standing = status
                .as_deref()
                .map_or(Standing::NotStated, standing_of_status);
            reading.detail("Course", concept(resource.get("courseOfTherapyType")));
            reading.detail("Intent", text(resource, "intent"));
            if let Some(dispense) = resource.get("dispenseRequest") {
                reading.detail("Quantity", dispense.get("quantity").and_then(quantity));
                reading.detail("Repeats allowed", text(dispense, "numberOfRepeatsAllowed"));
                reading.detail(
                    "Supply for",
                    dispense.get("expectedSupplyDuration").and_then(quantity),
                );
                if let Some(validity) = dispense.get("validityPeriod") {
                    reading.ended = text(validity, "end");
                    reading.detail("Valid", period_words(validity));
                }
            }
            reading.date_detail("Issued", text(resource, "authoredOn"));
            reading.detail("Prescriber", reference_name(resource.get("requester")));
            reading.date = text(resource, "authoredOn");
        }
        "MedicationStatement" => {
            reading.standing = match status.as_deref() {
                None | Some("unknown") => Standing::NotStated,
                Some("active" | "intended" | "on-hold") => Standing::Current,
                Some(_) => Standing::Past,
            };
            if status.as_deref() == Some("not-taken") {
                reading.warnings.push("Not taken".into());
            }
            let period = resource.get("effectivePeriod");
            reading.date = text(resource, "effectiveDateTime")
                .or_else(|| period.and_then(|p| text(p, "start")))
                .or_else(|| text(resource, "dateAsserted"));
            reading.ended = period.and_then(|p| text(p, "end"));
            reading.date_detail("Started", reading.date.clone());
            reading.date_detail("Ended", reading.ended.clone());
            reading.date_detail("Asserted", text(resource, "dateAsserted"));
            reading.detail(
                "Information from",
                reference_name(resource.get("informationSource")),
            );
        }
        "MedicationAdministration" => {
            reading.standing = Standing::Event;
            // Only a completed (or still running) administration was given: a dose not
            // given must never read as given.
            let (warning, when_label) = match status.as_deref() {
                Some("not-done") => (Some("Not given"), "Due"),
                Some("stopped") => (Some("Stopped before the whole dose was given"), "Given"),
                Some("entered-in-error") => (Some("Entered in error"), "Recorded"),
                Some("on-hold") => (Some("On hold: not given"), "Due"),
                Some("in-progress") => (None, "Being given from"),
                Some("completed") => (None, "Given"),
                _ => (Some("Not stated whether given"), "Recorded"),
            };
            reading.warnings.extend(warning.map(str::to_string));
            let period = resource.get("effectivePeriod");
            reading.date = text(resource, "effectiveDateTime")
                .or_else(|| period.and_then(|p| text(p, "start")));
            reading.ended = period.and_then(|p| text(p, "end"));
            reading.detail(
                when_label,
                text(resource, "effectiveDateTime")
                    .map(|d| clock::uk_when(&d))
                    .or_else(|| period.and_then(period_words)),
            );
            reading.detail(
                "Given by",
                names(list(resource, "performer"), Some("actor")),
            );
        }
        "MedicationDispense" => {
            reading.standing = Standing::Event;
            reading.detail("Quantity", resource.get("quantity").and_then(quantity));
            reading.detail("Supply for", resource.get("daysSupply").and_then(quantity));
            reading.date =
                text(resource, "whenHandedOver").or_else(|| text(resource, "whenPrepared"));
            reading.date_detail("Handed over", text(resource, "whenHandedOver"));
            reading.detail(
                "Dispensed by",
                names(list(resource, "performer"), Some("actor")),
            );
        }
        _ => {}
    }
    // One medicine is the same product and dose; repeat issues of it are one entry.
    reading.identity = identity(&[
        "medicine",
        &item.resource_type,
        &concept_identity(medicine),
        &normalise_words(dose.as_deref().unwrap_or("")),
        &if reading.standing == Standing::Event {
            reading.date.clone().unwrap_or_default()
        } else {
            String::new()
        },
    ]);
}

fn observation(reading: &mut Reading, resource: &Value) {
    let code = resource.get("code");
    reading.title = concept(code).unwrap_or_else(|| "Observation (not described)".into());
    reading.standing = Standing::Event;
    let status = text(resource, "status");
    reading.status = status.clone();
    if matches!(status.as_deref(), Some("preliminary" | "registered")) {
        reading.warnings.push(format!(
            "{} result",
            capitalise(status.as_deref().unwrap_or_default())
        ));
    }
    if matches!(status.as_deref(), Some("cancelled")) {
        reading.warnings.push("Cancelled".into());
    }
    let decimals = range_decimals(resource);
    let (value, absent) = observation_value(resource, decimals);
    reading.detail("Value", value.clone());
    if let Some(absent) = &absent {
        reading.warnings.push(format!("No value: {absent}"));
    }
    reading.detail("Range", reference_ranges(resource));
    if let Some((words, abnormal)) = interpretation_words(resource) {
        if abnormal {
            reading.warnings.push(words.clone());
        }
        reading.detail("Interpretation", Some(words));
    }
    let mut component_values = Vec::new();
    for component in list(resource, "component") {
        let name = concept(component.get("code")).unwrap_or_else(|| "Component".into());
        let (value, absent) = observation_value(component, range_decimals(component));
        let mut words = match (value, absent) {
            (Some(value), _) => value,
            (None, Some(absent)) => format!("no value ({absent})"),
            (None, None) => "no value".into(),
        };
        if let Some(range) = reference_ranges(component) {
            words.push_str(&format!(" (range {range})"));
        }
        if let Some((interpretation, abnormal)) = interpretation_words(component) {
            words.push_str(&format!(" {interpretation}"));
            if abnormal {
                reading.warnings.push(format!("{name}: {interpretation}"));
            }
        }
        component_values.push(words.clone());
        reading.details.push(Detail {
            label: "Component",
            value: format!("{name}: {words}"),
        });
    }
    reading.detail("Method", concept(resource.get("method")));
    reading.detail("Body site", concept(resource.get("bodySite")));
    let period = resource.get("effectivePeriod");
    reading.date = text(resource, "effectiveDateTime")
        .or_else(|| text(resource, "effectiveInstant"))
        .or_else(|| period.and_then(|p| text(p, "start")))
        .or_else(|| text(resource, "issued"));
    reading.date_detail("Taken", reading.date.clone());
    reading.date_detail("Issued", text(resource, "issued"));
    reading.detail("Performer", names(list(resource, "performer"), None));
    reading.identity = identity(&[
        "result",
        &concept_identity(code),
        reading.date.as_deref().unwrap_or(""),
        value.as_deref().unwrap_or(absent.as_deref().unwrap_or("")),
        &component_values.join("|"),
    ]);
}

fn report(reading: &mut Reading, resource: &Value) {
    let code = resource.get("code");
    reading.title = concept(code).unwrap_or_else(|| "Report (not described)".into());
    reading.standing = Standing::Event;
    let status = text(resource, "status");
    reading.status = status.clone();
    if matches!(
        status.as_deref(),
        Some("preliminary" | "partial" | "registered")
    ) {
        reading.warnings.push(format!(
            "{} report",
            capitalise(status.as_deref().unwrap_or_default())
        ));
    }
    reading.detail("Conclusion", text(resource, "conclusion"));
    reading.detail(
        "Coded conclusion",
        concepts(list(resource, "conclusionCode")),
    );
    let results = list(resource, "result").len();
    if results > 0 {
        reading.detail(
            "Results",
            Some(format!("{results} listed with the results")),
        );
    }
    let period = resource.get("effectivePeriod");
    reading.date = text(resource, "effectiveDateTime")
        .or_else(|| period.and_then(|p| text(p, "start")))
        .or_else(|| text(resource, "issued"));
    reading.date_detail("Taken", reading.date.clone());
    reading.date_detail("Issued", text(resource, "issued"));
    reading.detail("Performer", names(list(resource, "performer"), None));
    reading.identity = identity(&[
        "report",
        &concept_identity(code),
        reading.date.as_deref().unwrap_or(""),
    ]);
}

fn encounter(reading: &mut Reading, resource: &Value) {
    let kind = list(resource, "type").first();
    let class = resource
        .get("class")
        .and_then(|c| text(c, "display").or_else(|| text(c, "code")));
    reading.title = concept(kind)
        .or_else(|| class.clone().map(|c| format!("Encounter ({c})")))
        .unwrap_or_else(|| "Encounter".into());
    reading.standing = Standing::Event;
    reading.status = text(resource, "status");
    reading.detail("Class", class);
    reading.detail("Reason", concepts(list(resource, "reasonCode")));
    let period = resource.get("period");
    reading.date = period.and_then(|p| text(p, "start"));
    reading.ended = period.and_then(|p| text(p, "end"));
    reading.detail("When", period.and_then(period_words));
    reading.detail(
        "Location",
        names(list(resource, "location"), Some("location")),
    );
    reading.detail(
        "Organisation",
        reference_name(resource.get("serviceProvider"))
            .or_else(|| reference_name(resource.get("managingOrganization"))),
    );
    reading.detail(
        "Seen by",
        names(list(resource, "participant"), Some("individual")),
    );
    if let Some(hospitalisation) = resource.get("hospitalization") {
        reading.detail(
            "Discharged to",
            concept(hospitalisation.get("dischargeDisposition")),
        );
    }
    reading.identity = titled_identity("encounter", kind, reading);
}

fn document(reading: &mut Reading, resource: &Value) {
    let kind = resource.get("type");
    let attachment = list(resource, "content")
        .first()
        .and_then(|c| c.get("attachment"));
    reading.title = text(resource, "title")
        .or_else(|| attachment.and_then(|a| text(a, "title")))
        .or_else(|| concept(kind))
        .unwrap_or_else(|| "Document".into());
    reading.standing = Standing::Event;
    reading.status = text(resource, "status");
    if reading.status.as_deref() == Some("superseded") {
        reading
            .warnings
            .push("Superseded by a newer version".into());
    }
    reading.detail("Type", concept(kind));
    reading.detail("Description", text(resource, "description"));
    reading.detail("Author", names(list(resource, "author"), None));
    reading.detail("Custodian", reference_name(resource.get("custodian")));
    if let Some(attachment) = attachment {
        let mut words = text(attachment, "title").unwrap_or_else(|| "attachment".into());
        if let Some(kind) = text(attachment, "contentType") {
            words.push_str(&format!(", {kind}"));
        }
        if let Some(size) = attachment.get("size").and_then(Value::as_u64) {
            words.push_str(&format!(", {}", byte_size(size)));
        }
        reading.detail("Attachment", Some(words));
    }
    let sections: Vec<String> = list(resource, "section")
        .iter()
        .filter_map(|s| text(s, "title"))
        .collect();
    if !sections.is_empty() {
        reading.detail("Sections", Some(sections.join(", ")));
    }
    reading.date = text(resource, "date")
        .or_else(|| attachment.and_then(|a| text(a, "creation")))
        .or_else(|| {
            resource
                .get("context")
                .and_then(|c| c.get("period"))
                .and_then(|p| text(p, "start"))
        });
    reading.date_detail("Dated", reading.date.clone());
    reading.identity = titled_identity("document", kind, reading);
}

fn byte_size(size: u64) -> String {
    match size {
        0..1024 => format!("{size} bytes"),
        1024..1_048_576 => format!("{} KB", size.div_ceil(1024)),
        _ => format!("{:.1} MB", size as f64 / 1_048_576.0),
    }
}

fn immunisation(reading: &mut Reading, resource: &Value) {
    let code = resource.get("vaccineCode");
    reading.title = concept(code).unwrap_or_else(|| "Vaccine not named".into());
    reading.standing = Standing::Event;
    let status = text(resource, "status");
    reading.status = status.clone();
    if status.as_deref() == Some("not-done") {
        let reason = concept(resource.get("statusReason"));
        reading.warnings.push(match reason {
            Some(reason) => format!("Not given: {reason}"),
            None => "Not given".into(),
        });
    }
    reading.detail("Dose", resource.get("doseQuantity").and_then(quantity));
    reading.detail("Route", concept(resource.get("route")));
    reading.detail("Site", concept(resource.get("site")));
    reading.detail("Batch", text(resource, "lotNumber"));
    reading.detail("Manufacturer", reference_name(resource.get("manufacturer")));
    reading.detail(
        "Given by",
        names(list(resource, "performer"), Some("actor")),
    );
    for protocol in list(resource, "protocolApplied") {
        reading.detail(
            "Dose number",
            text(protocol, "doseNumberPositiveInt").or_else(|| text(protocol, "doseNumberString")),
        );
    }
    reading.date = text(resource, "occurrenceDateTime")
        .or_else(|| text(resource, "occurrenceString"))
        .or_else(|| text(resource, "recorded"));
    reading.date_detail("Given", text(resource, "occurrenceDateTime"));
    reading.identity = event_identity("immunisation", code, reading);
}

/// What makes an entry known by its title the same from two sources: its kind, its code,
/// its title and when it began.
fn titled_identity(kind: &str, code: Option<&Value>, reading: &Reading) -> String {
    identity(&[
        kind,
        &concept_identity(code),
        &normalise_words(&reading.title),
        reading.date.as_deref().unwrap_or(""),
    ])
}

/// What makes an event the same event from two sources: its kind, its code and its day.
fn event_identity(kind: &str, code: Option<&Value>, reading: &Reading) -> String {
    let day = reading
        .date
        .as_deref()
        .map(clock::uk_day)
        .unwrap_or_default();
    identity(&[kind, &concept_identity(code), &day])
}

fn procedure(reading: &mut Reading, resource: &Value) {
    let code = resource.get("code");
    reading.title = concept(code).unwrap_or_else(|| "Procedure (not described)".into());
    reading.standing = Standing::Event;
    let status = text(resource, "status");
    reading.status = status.clone();
    if matches!(status.as_deref(), Some("not-done" | "stopped")) {
        reading.warnings.push(capitalise(
            &status.clone().unwrap_or_default().replace('-', " "),
        ));
    }
    reading.detail("Body site", concepts(list(resource, "bodySite")));
    reading.detail("Outcome", concept(resource.get("outcome")));
    reading.detail("Reason", concepts(list(resource, "reasonCode")));
    reading.detail(
        "Performed by",
        names(list(resource, "performer"), Some("actor")),
    );
    reading.detail("Location", reference_name(resource.get("location")));
    let period = resource.get("performedPeriod");
    reading.date =
        text(resource, "performedDateTime").or_else(|| period.and_then(|p| text(p, "start")));
    reading.ended = period.and_then(|p| text(p, "end"));
    reading.detail("Performed", when_x_words(resource, "performed"));
    reading.identity = event_identity("procedure", code, reading);
}

fn flag(reading: &mut Reading, resource: &Value) {
    let code = resource.get("code");
    reading.title = concept(code).unwrap_or_else(|| "Alert (not described)".into());
    let status = text(resource, "status");
    reading.status = status.clone();
    reading.standing = match status.as_deref() {
        Some("active") => Standing::Current,
        Some(_) => Standing::Past,
        None => Standing::NotStated,
    };
    reading.detail("Category", concepts(list(resource, "category")));
    reading.detail("Raised by", reference_name(resource.get("author")));
    let period = resource.get("period");
    reading.detail("Period", period.and_then(period_words));
    reading.date = period.and_then(|p| text(p, "start"));
    reading.ended = period.and_then(|p| text(p, "end"));
    reading.identity = identity(&["alert", &concept_identity(code)]);
}

fn care_plan(reading: &mut Reading, resource: &Value) {
    let category = list(resource, "category").first();
    reading.title = text(resource, "title")
        .or_else(|| concept(category))
        .unwrap_or_else(|| "Care plan".into());
    let status = text(resource, "status");
    reading.status = status.clone();
    reading.standing = match status.as_deref() {
        Some("active" | "on-hold" | "draft") => Standing::Current,
        Some("unknown") | None => Standing::NotStated,
        Some(_) => Standing::Past,
    };
    reading.detail("Category", concepts(list(resource, "category")));
    reading.detail("Description", text(resource, "description"));
    reading.detail("Addresses", names(list(resource, "addresses"), None));
    let activities: Vec<String> = list(resource, "activity")
        .iter()
        .filter_map(|a| a.get("detail"))
        .filter_map(|d| concept(d.get("code")))
        .collect();
    if !activities.is_empty() {
        reading.detail("Activities", Some(activities.join(", ")));
    }
    let period = resource.get("period");
    reading.detail("Period", period.and_then(period_words));
    reading.detail("Author", reference_name(resource.get("author")));
    reading.date = period
        .and_then(|p| text(p, "start"))
        .or_else(|| text(resource, "created"));
    reading.ended = period.and_then(|p| text(p, "end"));
    reading.identity = titled_identity("care-plan", category, reading);
}

fn referral(reading: &mut Reading, resource: &Value) {
    let code = resource.get("code");
    reading.title = concept(code).unwrap_or_else(|| "Request (not described)".into());
    reading.standing = Standing::Event;
    reading.status = text(resource, "status");
    reading.detail("Intent", text(resource, "intent"));
    reading.detail("Priority", text(resource, "priority"));
    reading.detail("Reason", concepts(list(resource, "reasonCode")));
    reading.detail("Requested by", reference_name(resource.get("requester")));
    reading.detail("To", names(list(resource, "performer"), None));
    reading.date = text(resource, "occurrenceDateTime").or_else(|| text(resource, "authoredOn"));
    reading.date_detail("Requested", text(resource, "authoredOn"));
    reading.identity = event_identity("referral", code, reading);
}

fn family_history(reading: &mut Reading, resource: &Value) {
    let relationship = resource.get("relationship");
    let status = text(resource, "status");
    reading.status = status.clone();
    reading.standing = match status.as_deref() {
        Some("health-unknown") | None => Standing::NotStated,
        Some(_) => Standing::Current,
    };
    reading.detail("Relationship", concept(relationship));
    reading.detail("Sex", concept(resource.get("sex")));
    reading.detail("Born", when_x_words(resource, "born"));
    if resource.get("deceasedBoolean").and_then(Value::as_bool) == Some(true) {
        reading.detail("Deceased", Some("yes".into()));
    } else {
        reading.detail("Deceased", when_x_words(resource, "deceased"));
    }
    let mut codes = Vec::new();
    for condition in list(resource, "condition") {
        let code = condition.get("code");
        codes.push(concept_identity(code));
        let onset = when_x_words(condition, "onset").map(|o| format!(", onset {o}"));
        let outcome = concept(condition.get("outcome")).map(|o| format!(", outcome {o}"));
        reading.detail(
            "Condition",
            concept(code).map(|c| {
                format!(
                    "{c}{}{}",
                    onset.unwrap_or_default(),
                    outcome.unwrap_or_default()
                )
            }),
        );
    }
    reading.date = text(resource, "date");
    reading.date_detail("Recorded", text(resource, "date"));
    let mut parts = vec!["family".to_string(), concept_identity(relationship)];
    parts.extend(codes);
    reading.identity = identity(&parts.iter().map(String::as_str).collect::<Vec<_>>());
}

/// A next of kin, carer or other contact: who, how related, and how to reach them.
fn contact(reading: &mut Reading, resource: &Value) {
    reading.standing = match resource.get("active").and_then(Value::as_bool) {
        Some(false) => Standing::Past,
        _ => Standing::Current,
    };
    reading.detail("Relationship", concepts(list(resource, "relationship")));
    for telecom in list(resource, "telecom") {
        let label = match text(telecom, "system").as_deref() {
            Some("phone") => "Phone",
            Some("email") => "Email",
            _ => "Contact",
        };
        let usage = text(telecom, "use").map(|u| format!(" ({u})"));
        reading.detail(
            label,
            text(telecom, "value").map(|v| format!("{v}{}", usage.unwrap_or_default())),
        );
    }
    let period = resource.get("period");
    reading.detail("Period", period.and_then(period_words));
    reading.date = period.and_then(|p| text(p, "start"));
    reading.ended = period.and_then(|p| text(p, "end"));
    reading.identity = identity(&["contact", &normalise_words(&reading.title)]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use caremesh_sync::{DataClass, Section};
    use serde_json::json;

    fn item(section: Section, resource: Value) -> Item {
        let resource_type = resource["resourceType"].as_str().unwrap().to_string();
        Item {
            resource: Some(resource),
            ..Item::titled(
                "x",
                section,
                DataClass::Coded,
                &resource_type,
                "summary title",
                "TEST",
                "X/1",
            )
        }
    }

    #[test]
    fn float_artefacts_are_rounded_and_real_precision_is_kept() {
        let n = |s: &str| serde_json::from_str::<serde_json::Number>(s).unwrap();
        assert_eq!(readable_number(&n("82.62744253235653"), 0), "82.6");
        assert_eq!(readable_number(&n("4.1"), 0), "4.1");
        assert_eq!(readable_number(&n("0.01234567891"), 0), "0.0123");
        assert_eq!(readable_number(&n("123456.78912"), 0), "123457");
        assert_eq!(readable_number(&n("5.123456789"), 3), "5.123");
    }

    #[test]
    fn ucum_units_read_as_people_write_them() {
        assert_eq!(readable_unit("mm[Hg]"), "mmHg");
        assert_eq!(readable_unit("10*9/L"), "×10⁹/L");
        assert_eq!(readable_unit("10*12/L"), "×10¹²/L");
        assert_eq!(readable_unit("kg/m2"), "kg/m²");
        assert_eq!(readable_unit("mmol/L"), "mmol/L");
        assert_eq!(readable_unit("{cells}/uL"), "cells/uL");
    }

    #[test]
    fn structured_dosage_without_text_is_written_out() {
        let dosage = json!({
            "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d", "when": ["NIGHT"]}},
            "route": {"coding": [{"display": "Oral"}]},
            "doseAndRate": [{"doseQuantity": {"value": 20, "unit": "mg"}}]
        });
        assert_eq!(
            dosage_words(&dosage).as_deref(),
            Some("20 mg, oral, once a day, at night")
        );
        let prn = json!({
            "timing": {"repeat": {"frequency": 1, "frequencyMax": 2, "period": 4, "periodUnit": "h"}},
            "asNeededCodeableConcept": {"text": "Pain"},
            "doseAndRate": [{"doseRange": {"low": {"value": 1, "unit": "tablet"}, "high": {"value": 2, "unit": "tablet"}}}],
            "maxDosePerPeriod": {"numerator": {"value": 8, "unit": "tablet"}, "denominator": {"value": 24, "unit": "h"}}
        });
        assert_eq!(
            dosage_words(&prn).as_deref(),
            Some(
                "1 to 2 tablet, 1 to 2 times every 4 hours, when required for pain, maximum 8 tablet in 24 hours"
            )
        );
    }

    #[test]
    fn refuted_problem_is_never_current_and_says_so() {
        let reading = read(&item(
            Section::Problems,
            json!({"resourceType": "Condition",
                   "clinicalStatus": {"coding": [{"code": "active"}]},
                   "verificationStatus": {"coding": [{"code": "refuted"}]},
                   "code": {"text": "Myocardial infarction"}}),
        ));
        assert_eq!(reading.standing, Standing::Refuted);
        assert!(reading.warnings.iter().any(|w| w.starts_with("Refuted")));
    }

    #[test]
    fn degraded_codes_keep_their_substance_and_stay_apart() {
        let allergy = |text: &str| {
            read(&item(
                Section::Allergies,
                json!({"resourceType": "AllergyIntolerance",
                       "code": {"coding": [{"system": "http://snomed.info/sct", "code": "196461000000101",
                                            "display": "Transfer-degraded drug allergy"}], "text": text}}),
            ))
        };
        let septrin = allergy("Septrin");
        let amoxicillin = allergy("Amoxicillin 250mg capsules");
        assert_eq!(septrin.title, "Septrin");
        assert!(!septrin.same_fact(&amoxicillin));
        assert!(septrin.same_fact(&allergy("septrin ")));
        assert!(
            septrin
                .details
                .iter()
                .any(|d| d.label == "Coded as" && d.value.contains("Transfer-degraded"))
        );
    }

    #[test]
    fn results_carry_range_interpretation_and_absent_values() {
        let reading = read(&item(
            Section::Results,
            json!({"resourceType": "Observation", "status": "final",
                   "code": {"text": "Serum potassium"},
                   "effectiveDateTime": "2024-06-30T23:30:00Z",
                   "valueQuantity": {"value": 6.2, "unit": "mmol/L"},
                   "interpretation": [{"coding": [{"code": "H"}]}],
                   "referenceRange": [{"low": {"value": 3.5, "unit": "mmol/L"}, "high": {"value": 5.3, "unit": "mmol/L"}}]}),
        ));
        assert_eq!(
            reading.details_line(),
            "Value: 6.2 mmol/L; Range: 3.5 to 5.3 mmol/L; Interpretation: High; Taken: 01-Jul-2024 00:30"
        );
        assert_eq!(reading.warnings, vec!["High".to_string()]);
        let absent = read(&item(
            Section::Results,
            json!({"resourceType": "Observation", "code": {"text": "Haemoglobin"},
                   "dataAbsentReason": {"coding": [{"display": "Sample haemolysed"}]}}),
        ));
        assert_eq!(
            absent.warnings,
            vec!["No value: Sample haemolysed".to_string()]
        );
    }
}
