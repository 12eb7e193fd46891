//! Wall-clock access and date formatting. The only place in the node that reads the clock,
//! so that everything else takes time as an argument.

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
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

/// `22/11/2026 10:42` (UTC), the form NHS screens use.
pub fn uk_date_time(unix: i64) -> String {
    let (year, month, day) = civil_from_days(unix.div_euclid(86_400));
    let seconds = unix.rem_euclid(86_400);
    format!(
        "{day:02}/{month:02}/{year:04} {:02}:{:02}",
        seconds / 3600,
        seconds % 3600 / 60
    )
}

/// A FHIR date or dateTime shown as `15/04/2022`; anything unparseable is shown as given.
pub fn uk_date(fhir: &str) -> String {
    let bytes = fhir.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        bytes
            .get(range.clone())
            .filter(|b| b.iter().all(u8::is_ascii_digit))
            .map(|_| &fhir[range])
    };
    match (
        digits(0..4),
        bytes.get(4),
        digits(5..7),
        bytes.get(7),
        digits(8..10),
    ) {
        (Some(y), Some(b'-'), Some(m), Some(b'-'), Some(d)) => format!("{d}/{m}/{y}"),
        (Some(y), Some(b'-'), Some(m), None, None) => format!("{m}/{y}"),
        (Some(y), None, ..) => y.to_string(),
        _ => fhir.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_650_000_000), "2022-04-15T05:20:00Z");
        assert_eq!(uk_date_time(1_650_000_000), "15/04/2022 05:20");
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
    fn fhir_dates_show_in_uk_order() {
        assert_eq!(uk_date("2022-04-15T10:00:00+01:00"), "15/04/2022");
        assert_eq!(uk_date("2022-04"), "04/2022");
        assert_eq!(uk_date("2022"), "2022");
        assert_eq!(uk_date("soon"), "soon");
    }
}
