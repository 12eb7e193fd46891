//! Wall-clock access and date formatting. The only place in the node that reads the clock,
//! so that everything else takes time as an argument.

pub fn now_unix() -> i64 {
    now_unix_ms().div_euclid(1000)
}

/// Milliseconds since 1970, for what is timed finer than a second (change notifications).
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `2026-11-22T10:42:00Z`
pub fn rfc3339(unix: i64) -> String {
    let (year, month, day) = civil_from_days(unix.div_euclid(86_400));
    let seconds = unix.rem_euclid(86_400);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        seconds / 3600,
        seconds % 3600 / 60,
        seconds % 60
    )
}

/// The start of a `YYYY-MM-DD` day (UTC) in unix seconds; `None` if it is no such date.
pub fn unix_from_date(text: &str) -> Option<i64> {
    let mut parts = text.trim().splitn(3, '-');
    let (year, month, day) = (parts.next()?, parts.next()?, parts.next()?);
    if year.len() != 4 || month.len() != 2 || day.len() != 2 {
        return None;
    }
    let date = chrono::NaiveDate::from_ymd_opt(
        year.parse().ok()?,
        month.parse().ok()?,
        day.parse().ok()?,
    )?;
    Some(date.and_hms_opt(0, 0, 0)?.and_utc().timestamp())
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `22-Nov-2026 10:42`: an instant in UK local time (Europe/London, so BST in summer), in the
/// NHS Common User Interface's date form, which no reader can take for month-first.
pub fn uk_date_time(unix: i64) -> String {
    use chrono::TimeZone;
    match chrono_tz::Europe::London.timestamp_opt(unix, 0).single() {
        Some(local) => local_date_time(&local),
        None => rfc3339(unix),
    }
}

fn local_date_time(local: &chrono::DateTime<chrono_tz::Tz>) -> String {
    use chrono::{Datelike, Timelike};
    format!(
        "{:02}-{}-{:04} {:02}:{:02}",
        local.day(),
        MONTHS[local.month0() as usize],
        local.year(),
        local.hour(),
        local.minute()
    )
}

/// A FHIR date or dateTime as a clinician reads it: a date stays a date (`15-Apr-2022`), a
/// partial date stays partial (`Apr-2022`, `2022`), and a dateTime is shown in UK local
/// time with its time of day (`2022-06-30T23:30:00Z` is `01-Jul-2022 00:30`). Anything that
/// does not parse is shown as given, never guessed at.
pub fn uk_when(fhir: &str) -> String {
    let text = fhir.trim();
    if text.contains('T') {
        return match chrono::DateTime::parse_from_rfc3339(text) {
            Ok(instant) => local_date_time(&instant.with_timezone(&chrono_tz::Europe::London)),
            Err(_) => text.to_string(),
        };
    }
    let parts: Vec<&str> = text.split('-').collect();
    let number = |part: &str, digits: usize| {
        (part.len() == digits && part.bytes().all(|b| b.is_ascii_digit()))
            .then(|| part.parse::<u32>().ok())
            .flatten()
    };
    match parts.as_slice() {
        [year] if number(year, 4).is_some() => year.to_string(),
        [year, month] => match (number(year, 4), number(month, 2)) {
            (Some(_), Some(m @ 1..=12)) => format!("{}-{year}", MONTHS[m as usize - 1]),
            _ => text.to_string(),
        },
        [year, month, day] => match (number(year, 4), number(month, 2), number(day, 2)) {
            (Some(y), Some(m), Some(d))
                if chrono::NaiveDate::from_ymd_opt(y as i32, m, d).is_some() =>
            {
                format!("{day}-{}-{year}", MONTHS[m as usize - 1])
            }
            _ => text.to_string(),
        },
        _ => text.to_string(),
    }
}

/// The date alone of a FHIR date or dateTime, in UK local time: what a list shows in its
/// date column and what a citation gives.
pub fn uk_date(fhir: &str) -> String {
    let when = uk_when(fhir);
    match when.split_once(' ') {
        Some((date, _time)) if fhir.contains('T') => date.to_string(),
        _ => when,
    }
}

/// The UK local calendar day of a FHIR date or dateTime as `YYYY-MM-DD` (or the partial
/// date as given), for deciding what happened on the same day.
pub fn uk_day(fhir: &str) -> String {
    let text = fhir.trim();
    if text.contains('T')
        && let Ok(instant) = chrono::DateTime::parse_from_rfc3339(text)
    {
        use chrono::Datelike;
        let local = instant.with_timezone(&chrono_tz::Europe::London);
        return format!(
            "{:04}-{:02}-{:02}",
            local.year(),
            local.month(),
            local.day()
        );
    }
    text.chars().take(10).collect()
}

/// A sortable instant for a FHIR date or dateTime (unix seconds; a date is its UK day's
/// start), so that `2024-06-30T23:30:00Z` sorts after `2024-06-30`; `None` if unparseable.
pub fn sort_key(fhir: &str) -> Option<i64> {
    let text = fhir.trim();
    if text.contains('T') {
        return chrono::DateTime::parse_from_rfc3339(text)
            .ok()
            .map(|t| t.timestamp());
    }
    let padded = match text.len() {
        4 => format!("{text}-01-01"),
        7 => format!("{text}-01"),
        _ => text.to_string(),
    };
    unix_from_date(&padded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_650_000_000), "2022-04-15T05:20:00Z");
        // 15 April 2022 is in British Summer Time: 05:20 UTC is 06:20 in the UK.
        assert_eq!(uk_date_time(1_650_000_000), "15-Apr-2022 06:20");
        assert_eq!(uk_date_time(1_642_248_000), "15-Jan-2022 12:00");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn dates_read_as_the_start_of_their_day() {
        assert_eq!(unix_from_date("2022-04-15"), Some(1_649_980_800));
        assert_eq!(unix_from_date("2000-02-29"), Some(951_782_400));
        assert_eq!(unix_from_date("2001-02-29"), None);
        assert_eq!(unix_from_date("15/04/2022"), None);
        assert_eq!(unix_from_date("2022-4-15"), None);
    }

    #[test]
    fn fhir_dates_show_unambiguously_and_partial_dates_stay_partial() {
        assert_eq!(uk_date("2022-04-15T10:00:00+01:00"), "15-Apr-2022");
        assert_eq!(uk_when("2022-04-15"), "15-Apr-2022");
        assert_eq!(uk_when("2022-04"), "Apr-2022");
        assert_eq!(uk_when("2022"), "2022");
        assert_eq!(uk_when("soon"), "soon");
        assert_eq!(
            uk_when("2022-02-30"),
            "2022-02-30",
            "no such day: shown as given"
        );
    }

    #[test]
    fn instants_show_in_uk_local_time_with_the_day_they_fell_on_there() {
        // 23:30 UTC on 30 June is 00:30 on 1 July in British Summer Time.
        assert_eq!(uk_when("2024-06-30T23:30:00Z"), "01-Jul-2024 00:30");
        assert_eq!(uk_date("2024-06-30T23:30:00Z"), "01-Jul-2024");
        assert_eq!(uk_day("2024-06-30T23:30:00Z"), "2024-07-01");
        // In winter the UK is on UTC.
        assert_eq!(uk_when("2024-01-30T23:30:00Z"), "30-Jan-2024 23:30");
        // An offset given by the source is honoured.
        assert_eq!(uk_when("2024-01-30T23:30:00-05:00"), "31-Jan-2024 04:30");
        // The autumn change: 00:30 UTC on 27 October 2024 is 01:30 BST, 01:30 UTC is 01:30 GMT.
        assert_eq!(uk_when("2024-10-27T00:30:00Z"), "27-Oct-2024 01:30");
        assert_eq!(uk_when("2024-10-27T01:30:00Z"), "27-Oct-2024 01:30");
        assert!(sort_key("2024-06-30T23:30:00Z") > sort_key("2024-06-30"));
    }
}

/// `text` safe to print to a terminal: control characters (escape sequences that could
/// clear the screen, move the cursor or hide what follows; newlines that would forge a line
/// of a report) are shown as `\u{1b}` instead of acting.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod printable_tests {
    #[test]
    fn control_characters_are_shown_not_obeyed() {
        assert_eq!(super::printable("ok: 5 mg"), "ok: 5 mg");
        assert_eq!(
            super::printable("\u{1b}[2Jcleared\nforged line\u{9b}"),
            "\\u{1b}[2Jcleared\\u{a}forged line\\u{9b}"
        );
    }
}
