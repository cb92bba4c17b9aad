//! FHIR date/time text ↔ milliseconds since the Unix epoch (UTC), without a calendar
//! dependency: the civil-date conversions are Howard Hinnant's `days_from_civil` /
//! `civil_from_days` algorithms.

const MS_PER_DAY: i64 = 86_400_000;

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Formats ms since the epoch as a FHIR instant, `YYYY-MM-DDThh:mm:ss.sssZ` (UTC).
pub fn format_instant(ms: i64) -> String {
    let days = ms.div_euclid(MS_PER_DAY);
    let rem = ms.rem_euclid(MS_PER_DAY);
    let (y, m, d) = civil_from_days(days);
    let (h, rem) = (rem / 3_600_000, rem % 3_600_000);
    let (min, rem) = (rem / 60_000, rem % 60_000);
    let (s, milli) = (rem / 1000, rem % 1000);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{milli:03}Z")
}

/// A FHIR date, dateTime or instant as the half-open range `[start, end)` of ms it
/// covers: `2024` is the whole year, `2024-03-01T10:00:00Z` one second. Values
/// without a time zone are read as UTC (FHIR requires a zone when a time is given;
/// a bare date's zone is unknown, and UTC is this module's documented choice).
pub(crate) fn parse_range(text: &str) -> Option<(i64, i64)> {
    let (date, time) = match text.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (text, None),
    };
    let mut parts = date.split('-');
    let y: i64 = num(parts.next()?, 4)?;
    let m: Option<i64> = parts.next().map(|p| num(p, 2)).map_or(Some(None), |v| v.map(Some))?;
    let d: Option<i64> = parts.next().map(|p| num(p, 2)).map_or(Some(None), |v| v.map(Some))?;
    if parts.next().is_some() {
        return None;
    }
    if m.is_some_and(|m| !(1..=12).contains(&m)) || d.is_some_and(|d| !(1..=31).contains(&d)) {
        return None;
    }
    let Some(time) = time else {
        return Some(match (m, d) {
            (None, _) => (
                days_from_civil(y, 1, 1) * MS_PER_DAY,
                days_from_civil(y + 1, 1, 1) * MS_PER_DAY,
            ),
            (Some(m), None) => {
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                (
                    days_from_civil(y, m, 1) * MS_PER_DAY,
                    days_from_civil(ny, nm, 1) * MS_PER_DAY,
                )
            }
            (Some(m), Some(d)) => {
                let s = days_from_civil(y, m, d) * MS_PER_DAY;
                (s, s + MS_PER_DAY)
            }
        });
    };
    let (m, d) = (m?, d?);
    // Split off the zone: `Z`, `+hh:mm` or `-hh:mm`.
    let (clock, offset_ms) = if let Some(c) = time.strip_suffix('Z') {
        (c, 0)
    } else if let Some(pos) = time.rfind(['+', '-']) {
        let (c, z) = time.split_at(pos);
        let sign = if z.starts_with('-') { -1 } else { 1 };
        let (zh, zm) = z.get(1..)?.split_once(':')?;
        (c, sign * (num(zh, 2)? * 3_600_000 + num(zm, 2)? * 60_000))
    } else {
        (time, 0)
    };
    let mut hms = clock.split(':');
    let h: i64 = num(hms.next()?, 2)?;
    let min: i64 = num(hms.next()?, 2)?;
    let (sec_ms, width) = match hms.next() {
        None => (0, 60_000),
        Some(s) => {
            let (whole, frac) = match s.split_once('.') {
                Some((w, f)) => (w, Some(f)),
                None => (s, None),
            };
            let whole: i64 = num(whole, 2)?;
            match frac {
                None => (whole * 1000, 1000),
                Some(f) if !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) => {
                    let digits = &f[..f.len().min(3)];
                    let mut v: i64 = digits.parse().ok()?;
                    for _ in digits.len()..3 {
                        v *= 10;
                    }
                    (whole * 1000 + v, 1)
                }
                Some(_) => return None,
            }
        }
    };
    if hms.next().is_some() || h > 23 || min > 59 || sec_ms >= 61_000 {
        return None;
    }
    let start = days_from_civil(y, m, d) * MS_PER_DAY + h * 3_600_000 + min * 60_000 + sec_ms - offset_ms;
    Some((start, start + width))
}

fn num(s: &str, width: usize) -> Option<i64> {
    if s.len() == width && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instant_format() {
        assert_eq!(format_instant(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_instant(1_709_287_200_123), "2024-03-01T10:00:00.123Z");
        assert_eq!(format_instant(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn ranges() {
        let day = MS_PER_DAY;
        let (s, e) = parse_range("2024").unwrap();
        assert_eq!(format_instant(s), "2024-01-01T00:00:00.000Z");
        assert_eq!(e - s, 366 * day);
        let (s, e) = parse_range("2024-02").unwrap();
        assert_eq!(format_instant(s), "2024-02-01T00:00:00.000Z");
        assert_eq!(e - s, 29 * day);
        let (s, e) = parse_range("2024-12-31").unwrap();
        assert_eq!(format_instant(e), "2025-01-01T00:00:00.000Z");
        assert_eq!(e - s, day);
        let (s, e) = parse_range("2024-03-01T10:00:00+01:00").unwrap();
        assert_eq!(format_instant(s), "2024-03-01T09:00:00.000Z");
        assert_eq!(e - s, 1000);
        let (s, _) = parse_range("2024-03-01T10:00:00.5Z").unwrap();
        assert_eq!(format_instant(s), "2024-03-01T10:00:00.500Z");
        assert!(parse_range("2024-13").is_none());
        assert!(parse_range("24").is_none());
        assert!(parse_range("2024-03-01T25:00:00Z").is_none());
    }
}
