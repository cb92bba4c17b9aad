//! Syntax of FHIR R4 primitive types (id, code, date, dateTime, instant, time, uri,
//! base64Binary, Reference.reference) and date ranges for search.

use time::{Date, Duration, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

/// A FHIR date/dateTime/instant value as written, at its precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PartialDateTime {
    year: i32,
    month: Option<u8>,
    day: Option<u8>,
    /// Hour, minute, second, fraction in nanoseconds, number of fraction digits.
    time: Option<(u8, u8, u8, u32, u32)>,
    /// Offset in seconds east of UTC; present iff `time` is.
    offset: Option<i32>,
}

/// Which FHIR primitive a date-like string must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DateKind {
    /// `date`: `yyyy`, `yyyy-mm` or `yyyy-mm-dd`.
    Date,
    /// `dateTime`: a date, or a full date with `Thh:mm:ss[.f]` and a zone.
    DateTime,
    /// `instant`: a full date and time to the second with a zone.
    Instant,
}

fn digits(s: &str, n: usize) -> Option<u32> {
    if s.len() == n && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

fn days_in_month(year: i32, month: u8) -> u8 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        _ => 28,
    }
}

/// Parses `hh:mm:ss[.fff]` (FHIR `time`). Returns (h, m, s, nanos, fraction digits).
pub(crate) fn parse_time(s: &str) -> Option<(u8, u8, u8, u32, u32)> {
    let (hms, frac) = match s.split_once('.') {
        Some((hms, frac)) => (hms, Some(frac)),
        None => (s, None),
    };
    let mut parts = hms.split(':');
    let h = digits(parts.next()?, 2)?;
    let m = digits(parts.next()?, 2)?;
    let sec = digits(parts.next()?, 2)?;
    if parts.next().is_some() || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    let (nanos, ndigits) = match frac {
        None => (0, 0),
        Some(f) if !f.is_empty() && f.len() <= 9 && f.bytes().all(|b| b.is_ascii_digit()) => {
            let n: u32 = f.parse().ok()?;
            let len = u32::try_from(f.len()).ok()?;
            (n * 10u32.pow(9 - len), len)
        }
        Some(_) => return None,
    };
    Some((h as u8, m as u8, sec as u8, nanos, ndigits))
}

fn parse_offset(s: &str) -> Option<i32> {
    if s == "Z" {
        return Some(0);
    }
    let sign = match s.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let (h, m) = s.get(1..)?.split_once(':')?;
    let (h, m) = (digits(h, 2)?, digits(m, 2)?);
    if h > 14 || m > 59 || (h == 14 && m > 0) {
        return None;
    }
    Some(sign * i32::try_from(h * 3600 + m * 60).ok()?)
}

impl PartialDateTime {
    /// Parses `s` as the given kind; `None` if the syntax or a field is invalid.
    pub(crate) fn parse(s: &str, kind: DateKind) -> Option<Self> {
        let (date, rest) = match s.split_once('T') {
            Some((d, r)) => (d, Some(r)),
            None => (s, None),
        };
        let mut parts = date.split('-');
        let year = i32::try_from(digits(parts.next()?, 4)?).ok()?;
        let month = parts.next().map(|m| digits(m, 2)).map_or(Some(None), |m| m.map(Some))?;
        let day = parts.next().map(|d| digits(d, 2)).map_or(Some(None), |d| d.map(Some))?;
        if parts.next().is_some() {
            return None;
        }
        let month = match month {
            Some(m) if (1..=12).contains(&m) => Some(m as u8),
            Some(_) => return None,
            None => None,
        };
        let day = match (month, day) {
            (Some(m), Some(d)) if d >= 1 && d <= u32::from(days_in_month(year, m)) => Some(d as u8),
            (_, Some(_)) => return None,
            (_, None) => None,
        };
        let (time, offset) = match rest {
            None => (None, None),
            Some(rest) => {
                day?;
                let split = rest.find(['Z', '+', '-'])?;
                let (t, z) = rest.split_at(split);
                (Some(parse_time(t)?), Some(parse_offset(z)?))
            }
        };
        let value = Self {
            year,
            month,
            day,
            time,
            offset,
        };
        match kind {
            DateKind::Date if time.is_some() => None,
            DateKind::Instant if time.is_none() => None,
            _ => Some(value),
        }
    }

    /// The half-open range `[start, end)` this value covers. Values without a time
    /// (and so without a zone) are taken in UTC.
    pub(crate) fn range(&self) -> Option<DateRange> {
        let month = Month::try_from(self.month.unwrap_or(1)).ok()?;
        let date = Date::from_calendar_date(self.year, month, self.day.unwrap_or(1)).ok()?;
        let start_of = |d: Date| PrimitiveDateTime::new(d, Time::MIDNIGHT).assume_utc();
        let range = match (self.month, self.day, self.time, self.offset) {
            (_, Some(_), Some((h, m, s, nanos, ndigits)), Some(off)) => {
                let t = Time::from_hms_nano(h, m, s.min(59), nanos).ok()?;
                let start = PrimitiveDateTime::new(date, t).assume_offset(UtcOffset::from_whole_seconds(off).ok()?);
                let step = Duration::nanoseconds(10i64.pow(9 - ndigits));
                DateRange {
                    start,
                    end: start + step,
                }
            }
            (_, Some(_), _, _) => DateRange {
                start: start_of(date),
                end: start_of(date.next_day()?),
            },
            (Some(_), None, _, _) => {
                let next = if month == Month::December {
                    Date::from_calendar_date(self.year + 1, Month::January, 1)
                } else {
                    Date::from_calendar_date(self.year, month.next(), 1)
                };
                DateRange {
                    start: start_of(date),
                    end: start_of(next.ok()?),
                }
            }
            (None, _, _, _) => DateRange {
                start: start_of(date),
                end: start_of(Date::from_calendar_date(self.year + 1, Month::January, 1).ok()?),
            },
        };
        Some(range)
    }
}

/// A half-open time range `[start, end)`: what a FHIR date value or period covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateRange {
    /// First instant inside the range.
    pub start: OffsetDateTime,
    /// First instant after the range.
    pub end: OffsetDateTime,
}

impl DateRange {
    /// The range a FHIR `date`, `dateTime` or `instant` string covers at its precision
    /// (`2020` covers the whole year); `None` if it is not valid.
    pub fn from_fhir(value: &str) -> Option<Self> {
        PartialDateTime::parse(value, DateKind::DateTime)?.range()
    }

    /// The range of a FHIR `Period` given its optional `start` and `end` strings; a
    /// missing bound is open.
    pub fn from_period(start: Option<&str>, end: Option<&str>) -> Option<Self> {
        let start = match start {
            Some(s) => Self::from_fhir(s)?.start,
            None => OffsetDateTime::new_utc(Date::MIN, Time::MIDNIGHT),
        };
        let end = match end {
            Some(e) => Self::from_fhir(e)?.end,
            None => OffsetDateTime::new_utc(Date::MAX, Time::MIDNIGHT),
        };
        Some(Self { start, end })
    }
}

/// Whether `s` is a valid date-like primitive of `kind`.
pub(crate) fn is_date(s: &str, kind: DateKind) -> bool {
    PartialDateTime::parse(s, kind).is_some_and(|p| p.range().is_some())
}

/// FHIR `id`: `[A-Za-z0-9\-\.]{1,64}`.
pub fn is_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// FHIR `code`: `[^\s]+( [^\s]+)*` — no leading, trailing or repeated whitespace.
pub(crate) fn is_code(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(char::is_whitespace)
        && !s.ends_with(char::is_whitespace)
        && !s.contains("  ")
        && !s.chars().any(|c| c.is_whitespace() && c != ' ')
}

/// A resource type name as it may appear in a URL: `[A-Z][A-Za-z]*`.
pub(crate) fn is_type_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_uppercase()) && bytes.all(|b| b.is_ascii_alphabetic())
}

/// FHIR `uri`: no whitespace, not empty.
pub(crate) fn is_uri(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(char::is_whitespace)
}

/// An absolute URI: `scheme:rest` with a valid scheme.
pub(crate) fn is_absolute_uri(s: &str) -> bool {
    let Some((scheme, rest)) = s.split_once(':') else {
        return false;
    };
    let mut b = scheme.bytes();
    is_uri(s)
        && !rest.is_empty()
        && b.next().is_some_and(|c| c.is_ascii_alphabetic())
        && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.'))
}

/// `urn:uuid:` followed by a UUID (8-4-4-4-12 hex digits).
pub(crate) fn is_urn_uuid(s: &str) -> bool {
    let Some(uuid) = s.strip_prefix("urn:uuid:") else {
        return false;
    };
    let groups: Vec<&str> = uuid.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups.iter().all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `urn:oid:` followed by a dotted OID.
pub(crate) fn is_urn_oid(s: &str) -> bool {
    s.strip_prefix("urn:oid:").is_some_and(|oid| {
        !oid.is_empty()
            && oid
                .split('.')
                .all(|arc| !arc.is_empty() && arc.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// `Reference.reference`: `Type/id` (optionally `/_history/vid`), a conditional
/// `Type?query` (transactions), an absolute URL, `urn:uuid:`/`urn:oid:`, or `#id`
/// for a contained resource (`#` alone points at the container).
pub(crate) fn is_reference(s: &str) -> bool {
    if let Some(local) = s.strip_prefix('#') {
        return local.is_empty() || is_id(local);
    }
    if s.starts_with("urn:") {
        return is_urn_uuid(s) || is_urn_oid(s);
    }
    if let Some((ty, query)) = s.split_once('?') {
        return is_type_name(ty) && !query.is_empty() && is_uri(query);
    }
    let parts: Vec<&str> = s.split('/').collect();
    match parts.as_slice() {
        [ty, id] => is_type_name(ty) && is_id(id),
        [ty, id, "_history", vid] => is_type_name(ty) && is_id(id) && is_id(vid),
        _ => is_absolute_uri(s) && s.contains("://"),
    }
}

/// `base64Binary`: the base64 alphabet, padded to a multiple of 4 (whitespace ignored).
pub(crate) fn is_base64(s: &str) -> bool {
    let mut n = 0usize;
    let mut padding = 0usize;
    for b in s.bytes() {
        match b {
            b' ' | b'\r' | b'\n' | b'\t' => continue,
            b'=' => padding += 1,
            _ if padding > 0 => return false,
            b if b.is_ascii_alphanumeric() || b == b'+' || b == b'/' => {}
            _ => return false,
        }
        n += 1;
    }
    n > 0 && n.is_multiple_of(4) && padding <= 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        use DateKind::*;
        let cases = [
            ("2020", Date, true),
            ("2020-02", Date, true),
            ("2020-02-29", Date, true),
            ("2019-02-29", Date, false),
            ("2020-13", Date, false),
            ("20", Date, false),
            ("2020-1-01", Date, false),
            ("2020-01-01T10:00:00Z", Date, false),
            ("2020-01-01T10:00:00Z", DateTime, true),
            ("2020-01-01T10:00:00.123+05:30", DateTime, true),
            ("2020-01-01T10:00Z", DateTime, false),
            ("2020-01-01T10:00:00", DateTime, false),
            ("2020-01-01T24:00:00Z", DateTime, false),
            ("2020-01T10:00:00Z", DateTime, false),
            ("2020-01-01", Instant, false),
            ("2015-02-07T13:28:17.239+02:00", Instant, true),
        ];
        for (s, kind, ok) in cases {
            assert_eq!(is_date(s, kind), ok, "{s} as {kind:?}");
        }
    }

    #[test]
    fn ranges() {
        let r = DateRange::from_fhir("2020").unwrap();
        assert_eq!(r.start.to_string(), "2020-01-01 0:00:00.0 +00:00:00");
        assert_eq!(r.end.to_string(), "2021-01-01 0:00:00.0 +00:00:00");
        let r = DateRange::from_fhir("2020-12").unwrap();
        assert_eq!(r.end.year(), 2021);
        let r = DateRange::from_fhir("2020-01-01T10:00:00+01:00").unwrap();
        assert_eq!(r.end - r.start, Duration::seconds(1));
        assert_eq!(r.start.to_offset(UtcOffset::UTC).hour(), 9);
    }

    #[test]
    fn references() {
        for ok in [
            "Patient/123",
            "Patient/123/_history/2",
            "#med1",
            "#",
            "urn:uuid:5cbc121b-cd71-4428-b8b7-31e53eba8184",
            "urn:oid:1.2.3",
            "http://example.org/fhir/Patient/1",
            "Patient?identifier=http://x|1",
        ] {
            assert!(is_reference(ok), "{ok}");
        }
        for bad in [
            "",
            "Patient",
            "patient/1",
            "Patient/",
            "a b",
            "urn:uuid:xyz",
            "Patient/1/2",
        ] {
            assert!(!is_reference(bad), "{bad}");
        }
    }

    #[test]
    fn codes_ids_base64() {
        assert!(is_code("final") && is_code("a b") && !is_code(" final") && !is_code("a  b"));
        assert!(is_id("a-b.C9") && !is_id("a_b") && !is_id(&"x".repeat(65)));
        assert!(is_base64("aGVsbG8=") && !is_base64("aGVsbG8") && !is_base64("a=bc"));
    }
}
