//! Search parameters: a query string parsed into a typed [`SearchRequest`].
//!
//! Supported on every type: `_id`, `_lastUpdated`, `_count`, `_offset`, `_format`,
//! `_pretty`. Per type, where FHIR R4 defines them: `patient`, `subject`, `code`,
//! `date`, `status`, `category` (see `capability_statement`).
//!
//! - `_count` defaults to [`DEFAULT_COUNT`] and is capped at the server's maximum.
//! - Paging is by offset: `_offset=N` skips the first N matches in the server's order
//!   (last updated, newest first, then id). Next links carry `_offset`. Offsets are not
//!   snapshots: writes between pages can shift results by a few entries.
//! - `patient`/`subject` take `Patient/123` or `123` (the `:Patient` modifier is
//!   accepted); a subject of another type is an error: search is scoped to a patient.
//! - Dates take the prefixes `eq ne gt lt ge le sa eb ap` and FHIR partial dates
//!   (`2020`, `2020-03`, `2020-03-01`, `2020-03-01T10:00:00+01:00`); a dateTime without
//!   a zone is taken as UTC, and an unencoded `+` in the zone (which arrives as a
//!   space) is read as `+`.
//! - Tokens: `system|code`, `|code` (no system), `code` (any system), `system|` (any
//!   code of the system); commas separate alternatives (OR); repeating a parameter ANDs.
//!   `\,` `\|` `\\` escape.
//! - A parameter with an empty value is ignored. Unknown parameters (and parameters the
//!   type does not have) are collected by name in [`SearchRequest::unknown`]: the
//!   handler adds a warning to the Bundle, or fails with 400 under
//!   `Prefer: handling=strict`. Modifiers other than `:Patient` are rejected (400).

use time::Duration;

use super::outcome::ApiError;
use super::primitive::{self, DateKind, DateRange, PartialDateTime};
use super::types::{self, C, D, K, P, S, T};

/// `_count` when the client gives none.
pub const DEFAULT_COUNT: usize = 50;

/// A date search prefix (FHIR R4 search §3.1.1.4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    /// `eq`: the target lies within the search value's range (the default).
    Eq,
    /// `ne`: the target does not lie within the range.
    Ne,
    /// `gt`: the target extends after the range.
    Gt,
    /// `lt`: the target extends before the range.
    Lt,
    /// `ge`: `gt` or `eq`.
    Ge,
    /// `le`: `lt` or `eq`.
    Le,
    /// `sa`: the target starts after the range ends.
    Sa,
    /// `eb`: the target ends before the range starts.
    Eb,
    /// `ap`: the target overlaps the range widened by 10% of its length plus a day on
    /// each side.
    Ap,
}

impl Prefix {
    fn split(value: &str) -> (Self, &str) {
        let table = [
            ("eq", Self::Eq),
            ("ne", Self::Ne),
            ("gt", Self::Gt),
            ("lt", Self::Lt),
            ("ge", Self::Ge),
            ("le", Self::Le),
            ("sa", Self::Sa),
            ("eb", Self::Eb),
            ("ap", Self::Ap),
        ];
        for (text, prefix) in table {
            if let Some(rest) = value.strip_prefix(text) {
                return (prefix, rest);
            }
        }
        (Self::Eq, value)
    }
}

/// One date condition: a prefix and the range of the (partial) date it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateParam {
    /// How the target range must relate to `range`.
    pub prefix: Prefix,
    /// The range the search value covers at its precision.
    pub range: DateRange,
}

impl DateParam {
    /// Whether a resource's date range (see [`DateRange::from_fhir`],
    /// [`DateRange::from_period`]) satisfies this condition.
    pub fn matches(&self, target: &DateRange) -> bool {
        let s = &self.range;
        let eq = target.start >= s.start && target.end <= s.end;
        match self.prefix {
            Prefix::Eq => eq,
            Prefix::Ne => !eq,
            Prefix::Gt => target.end > s.end,
            Prefix::Lt => target.start < s.start,
            Prefix::Ge => eq || target.end > s.end,
            Prefix::Le => eq || target.start < s.start,
            Prefix::Sa => target.start >= s.end,
            Prefix::Eb => target.end <= s.start,
            Prefix::Ap => {
                let slack = (s.end - s.start) / 10 + Duration::DAY;
                target.start < s.end + slack && target.end > s.start - slack
            }
        }
    }
}

/// A token search value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// `None`: any system; `Some("")`: no system (`|code`); else that system.
    pub system: Option<String>,
    /// `None`: any code of the system (`system|`).
    pub code: Option<String>,
}

impl Token {
    /// Whether a coding (`system`, `code`) matches.
    pub fn matches(&self, system: Option<&str>, code: &str) -> bool {
        let system_ok = match self.system.as_deref() {
            None => true,
            Some("") => system.is_none(),
            Some(s) => system == Some(s),
        };
        system_ok && self.code.as_deref().is_none_or(|c| c == code)
    }
}

/// A parsed search request for one resource type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchRequest {
    /// The resource type searched.
    pub resource_type: String,
    /// Page size, capped at the server maximum.
    pub count: usize,
    /// Matches to skip (the page cursor).
    pub offset: usize,
    /// `_id`: any of these ids (empty: no condition).
    pub ids: Vec<String>,
    /// `patient`/`subject`: the patient's resource id.
    pub patient: Option<String>,
    /// `_lastUpdated`: all must hold.
    pub last_updated: Vec<DateParam>,
    /// `date`: all must hold.
    pub date: Vec<DateParam>,
    /// `code`: every inner list must have a matching token (AND of ORs).
    pub code: Vec<Vec<Token>>,
    /// `status`: every inner list must contain the status (AND of ORs).
    pub status: Vec<Vec<String>>,
    /// `category`: AND of ORs, like `code`.
    pub category: Vec<Vec<Token>>,
    /// `_pretty=true` was asked for.
    pub pretty: bool,
    /// Names of parameters not supported for this type (values are not kept).
    pub unknown: Vec<String>,
    /// The recognised parameters as given (decoded), for self/next links.
    kept: Vec<(String, String)>,
}

impl SearchRequest {
    /// The recognised search parameters as given (decoded), without paging
    /// ones: what a backend's matcher takes.
    pub fn params(&self) -> &[(String, String)] {
        &self.kept
    }

    /// The query string (without `?`) for the page starting at `offset`: the
    /// recognised parameters, then `_count` and `_offset`.
    pub fn page_query(&self, offset: usize) -> String {
        let mut parts: Vec<String> = self
            .kept
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect();
        parts.push(format!("_count={}", self.count));
        if offset > 0 {
            parts.push(format!("_offset={offset}"));
        }
        parts.join("&")
    }
}

/// Parameter names every type accepts.
const COMMON: &[&str] = &["_id", "_lastUpdated", "_count", "_offset", "_format", "_pretty"];

/// The search parameters `resource_type` supports, beyond [`COMMON`]: `(name, type)`.
pub(crate) fn type_params(resource_type: &str) -> Option<Vec<(&'static str, &'static str)>> {
    if types::READ_ONLY_TYPES.contains(&resource_type) {
        return Some(vec![("patient", "reference")]);
    }
    let def = types::type_def(resource_type)?;
    let table = [
        (P, "patient", "reference"),
        (S, "subject", "reference"),
        (C, "code", "token"),
        (D, "date", "date"),
        (T, "status", "token"),
        (K, "category", "token"),
    ];
    Some(
        table
            .iter()
            .filter(|(bit, _, _)| def.search & bit != 0)
            .map(|(_, name, ty)| (*name, *ty))
            .collect(),
    )
}

fn invalid(param: &str, reason: impl Into<String>) -> ApiError {
    ApiError::InvalidParam {
        param: param.to_owned(),
        reason: reason.into(),
    }
}

/// Parses the query string of `GET /fhir/{resource_type}?{query}`.
///
/// # Errors
///
/// [`ApiError::UnknownType`] for a type not served; [`ApiError::InvalidParam`] (400)
/// naming the parameter for a value that cannot be parsed or an unsupported modifier.
pub fn parse_search(resource_type: &str, query: &str, max_count: usize) -> Result<SearchRequest, ApiError> {
    let allowed = type_params(resource_type).ok_or_else(|| ApiError::UnknownType(resource_type.to_owned()))?;
    let mut req = SearchRequest {
        resource_type: resource_type.to_owned(),
        count: DEFAULT_COUNT.min(max_count),
        offset: 0,
        ids: Vec::new(),
        patient: None,
        last_updated: Vec::new(),
        date: Vec::new(),
        code: Vec::new(),
        status: Vec::new(),
        category: Vec::new(),
        pretty: false,
        unknown: Vec::new(),
        kept: Vec::new(),
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(raw_key).ok_or_else(|| invalid("query", "invalid percent-encoding in a parameter name"))?;
        let (name, modifier) = match key.split_once(':') {
            Some((n, m)) => (n.to_owned(), Some(m.to_owned())),
            None => (key.clone(), None),
        };
        let known = COMMON.contains(&name.as_str()) || allowed.iter().any(|(n, _)| *n == name);
        if !known {
            if !req.unknown.contains(&key) {
                req.unknown.push(key);
            }
            continue;
        }
        let value = decode(raw_value).ok_or_else(|| invalid(&name, "invalid percent-encoding"))?;
        if value.is_empty() {
            continue;
        }
        match (name.as_str(), modifier.as_deref()) {
            ("patient" | "subject", None | Some("Patient")) => {}
            (_, None) => {}
            (_, Some(_)) => return Err(invalid(&name, "modifier not supported")),
        }
        let mut keep = true;
        match name.as_str() {
            "_count" => {
                let n: usize = value
                    .parse()
                    .map_err(|_| invalid("_count", "must be a non-negative integer"))?;
                req.count = n.min(max_count);
                keep = false;
            }
            "_offset" => {
                req.offset = value
                    .parse()
                    .map_err(|_| invalid("_offset", "must be a non-negative integer"))?;
                keep = false;
            }
            "_format" => {
                if !matches!(
                    value.as_str(),
                    "json" | "application/json" | "application/fhir+json" | "application/json+fhir"
                ) {
                    return Err(invalid("_format", "only json is supported"));
                }
            }
            "_pretty" => {
                req.pretty = match value.as_str() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(invalid("_pretty", "must be true or false")),
                };
            }
            "_id" => {
                for id in split_unescaped(&value, ',') {
                    if !primitive::is_id(&id) {
                        return Err(invalid("_id", "not a valid id"));
                    }
                    req.ids.push(id);
                }
            }
            "patient" | "subject" => {
                let id = match value.split_once('/') {
                    Some(("Patient", id)) => id,
                    Some(_) => return Err(invalid(&name, "only Patient references are supported")),
                    None => value.as_str(),
                };
                if !primitive::is_id(id) {
                    return Err(invalid(&name, "not a valid Patient id (one id, no commas)"));
                }
                match &req.patient {
                    Some(p) if p != id => {
                        return Err(invalid(&name, "conflicts with another patient/subject parameter"));
                    }
                    _ => req.patient = Some(id.to_owned()),
                }
            }
            "_lastUpdated" | "date" => {
                let mut params = Vec::new();
                for v in split_unescaped(&value, ',') {
                    params.push(parse_date_param(&v).ok_or_else(|| invalid(&name, "not a valid date"))?);
                }
                if params.len() > 1 {
                    return Err(invalid(&name, "OR of dates (commas) is not supported"));
                }
                if name == "date" {
                    req.date.extend(params);
                } else {
                    req.last_updated.extend(params);
                }
            }
            "code" | "category" => {
                let tokens = split_unescaped(&value, ',')
                    .iter()
                    .map(|t| parse_token(t))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| invalid(&name, "not a valid token (system|code)"))?;
                if name == "code" {
                    req.code.push(tokens);
                } else {
                    req.category.push(tokens);
                }
            }
            "status" => {
                let codes: Vec<String> = split_unescaped(&value, ',');
                if codes.iter().any(|c| !primitive::is_code(c)) {
                    return Err(invalid("status", "not a valid code"));
                }
                req.status.push(codes);
            }
            _ => keep = false,
        }
        if keep {
            req.kept.push((key, value));
        }
    }
    Ok(req)
}

fn parse_date_param(value: &str) -> Option<DateParam> {
    let (prefix, rest) = Prefix::split(value);
    let mut date = rest.replace(' ', "+");
    if let Some((_, time)) = date.split_once('T')
        && !time.contains(['Z', '+', '-'])
    {
        date.push('Z');
    }
    let range = PartialDateTime::parse(&date, DateKind::DateTime)?.range()?;
    Some(DateParam { prefix, range })
}

fn parse_token(value: &str) -> Option<Token> {
    let parts = split_unescaped(value, '|');
    let token = match parts.as_slice() {
        [code] => Token {
            system: None,
            code: Some(code.clone()),
        },
        [system, code] => Token {
            system: Some(system.clone()),
            code: (!code.is_empty()).then(|| code.clone()),
        },
        _ => return None,
    };
    (token.code.is_some() || token.system.as_deref().is_some_and(|s| !s.is_empty())).then_some(token)
}

/// Splits at `sep` not preceded by `\`, and removes the escapes.
fn split_unescaped(value: &str, sep: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let (Some(next), Some(last)) = (chars.next(), parts.last_mut()) {
                    if !matches!(next, ',' | '|' | '$' | '\\') {
                        last.push('\\');
                    }
                    last.push(next);
                }
            }
            c if c == sep => parts.push(String::new()),
            c => {
                if let Some(last) = parts.last_mut() {
                    last.push(c);
                }
            }
        }
    }
    parts
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte; the
/// result must be UTF-8.
fn decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = (bytes.next()? as char).to_digit(16)?;
                let lo = (bytes.next()? as char).to_digit(16)?;
                out.push(u8::try_from(hi * 16 + lo).ok()?);
            }
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encodes everything but unreserved characters and `|`, `/`, `:`.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'|' | b'/' | b':') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(ty: &str, q: &str) -> Result<SearchRequest, ApiError> {
        parse_search(ty, q, 200)
    }

    fn bad_param(ty: &str, q: &str) -> String {
        match parse(ty, q) {
            Err(ApiError::InvalidParam { param, .. }) => param,
            other => panic!("{q}: expected InvalidParam, got {other:?}"),
        }
    }

    #[test]
    fn counts_and_paging() {
        let r = parse("Observation", "").unwrap();
        assert_eq!((r.count, r.offset), (DEFAULT_COUNT, 0));
        assert_eq!(parse("Observation", "_count=10&_offset=20").unwrap().count, 10);
        assert_eq!(parse("Observation", "_count=10&_offset=20").unwrap().offset, 20);
        assert_eq!(parse("Observation", "_count=100000").unwrap().count, 200);
        assert_eq!(parse_search("Observation", "", 10).unwrap().count, 10);
        assert_eq!(bad_param("Observation", "_count=-1"), "_count");
        assert_eq!(bad_param("Observation", "_count=abc"), "_count");
        assert_eq!(bad_param("Observation", "_offset=1.5"), "_offset");
    }

    #[test]
    fn patient_and_subject() {
        let cases = [
            ("patient=123", "123"),
            ("patient=Patient/123", "123"),
            ("subject=Patient%2F123", "123"),
            ("subject:Patient=abc.1", "abc.1"),
            ("patient=123&subject=Patient/123", "123"),
        ];
        for (q, id) in cases {
            assert_eq!(parse("Observation", q).unwrap().patient.as_deref(), Some(id), "{q}");
        }
        assert_eq!(bad_param("Observation", "subject=Group/1"), "subject");
        assert_eq!(bad_param("Observation", "patient=1,2"), "patient");
        assert_eq!(bad_param("Observation", "patient=1&subject=2"), "subject");
        assert_eq!(bad_param("Observation", "patient:missing=true"), "patient");
        // Immunization has `patient` but no `subject` in R4.
        assert_eq!(parse("Immunization", "subject=1").unwrap().unknown, ["subject"]);
    }

    #[test]
    fn dates() {
        let r = parse("Observation", "date=ge2020-01&date=lt2020-02-15T10:00:00+01:00").unwrap();
        assert_eq!(r.date.len(), 2);
        assert_eq!(r.date[0].prefix, Prefix::Ge);
        assert_eq!(r.date[0].range, DateRange::from_fhir("2020-01").unwrap());
        assert_eq!(r.date[1].prefix, Prefix::Lt);
        // An unencoded `+` arrives as a space.
        let r2 = parse("Observation", "date=lt2020-02-15T10:00:00+01:00").unwrap();
        let r3 = parse("Observation", "date=lt2020-02-15T10:00:00%2B01:00").unwrap();
        assert_eq!(r2.date, r3.date);
        let r = parse("Observation", "_lastUpdated=2020").unwrap();
        assert_eq!(r.last_updated[0].prefix, Prefix::Eq);
        let r = parse("Observation", "date=2020-01-01T10:00:00").unwrap();
        assert_eq!(r.date[0].range.start.offset(), time::UtcOffset::UTC);
        for q in [
            "date=2020-13",
            "date=xx2020",
            "date=2020-01-01T25:00:00Z",
            "date=2020,2021",
        ] {
            assert_eq!(bad_param("Observation", q), "date", "{q}");
        }
        assert_eq!(bad_param("Observation", "_lastUpdated=yesterday"), "_lastUpdated");
    }

    #[test]
    fn date_prefix_semantics() {
        let p = |q: &str| parse_date_param(q).unwrap();
        let day = DateRange::from_fhir("2020-03-05").unwrap();
        let instant = DateRange::from_fhir("2020-03-05T10:00:00Z").unwrap();
        assert!(p("2020").matches(&day));
        assert!(p("eq2020-03").matches(&instant));
        assert!(!p("ne2020-03").matches(&instant));
        assert!(p("gt2020-03-04").matches(&day));
        assert!(!p("gt2020-03-05").matches(&day));
        assert!(p("ge2020-03-05").matches(&day));
        assert!(p("lt2020-03-06").matches(&day));
        assert!(p("le2020-03-05").matches(&day));
        assert!(p("sa2020-03-04").matches(&day));
        assert!(!p("sa2020-03-05").matches(&day));
        assert!(p("eb2020-03-06").matches(&day));
        assert!(p("ap2020-03-06").matches(&day));
        assert!(!p("ap2020-06").matches(&day));
        let open = DateRange::from_period(Some("2020-01-01"), None).unwrap();
        assert!(p("gt2021").matches(&open));
    }

    #[test]
    fn tokens_and_status() {
        let r = parse(
            "Observation",
            "code=http://loinc.org|8867-4,|x&code=y&category=vital-signs",
        )
        .unwrap();
        assert_eq!(r.code.len(), 2);
        assert_eq!(
            r.code[0],
            vec![
                Token {
                    system: Some("http://loinc.org".into()),
                    code: Some("8867-4".into())
                },
                Token {
                    system: Some(String::new()),
                    code: Some("x".into())
                },
            ]
        );
        assert!(r.code[0][0].matches(Some("http://loinc.org"), "8867-4"));
        assert!(!r.code[0][1].matches(Some("http://loinc.org"), "x"));
        assert!(r.code[1][0].matches(Some("any"), "y"));
        assert_eq!(r.category[0][0].code.as_deref(), Some("vital-signs"));
        let r = parse("Observation", "code=http://loinc.org|").unwrap();
        assert!(r.code[0][0].matches(Some("http://loinc.org"), "anything"));
        let r = parse("Observation", r"code=a\,b").unwrap();
        assert_eq!(r.code[0][0].code.as_deref(), Some("a,b"));
        assert_eq!(bad_param("Observation", "code=a|b|c"), "code");
        assert_eq!(bad_param("Observation", "code:text=x"), "code");
        let r = parse("Observation", "status=final,amended").unwrap();
        assert_eq!(r.status, vec![vec!["final".to_owned(), "amended".to_owned()]]);
        assert_eq!(bad_param("Observation", "status=%20final"), "status");
    }

    #[test]
    fn ids_unknown_and_types() {
        let r = parse("Patient", "_id=a,b&name=x&_sort=date&foo:exact=1&code=1&patient=1").unwrap();
        assert_eq!(r.ids, ["a", "b"]);
        // Patient has no `code` or `patient` parameter in R4.
        assert_eq!(r.unknown, ["name", "_sort", "foo:exact", "code", "patient"]);
        assert_eq!(bad_param("Patient", "_id=a_b"), "_id");
        assert!(matches!(parse("Foo", ""), Err(ApiError::UnknownType(t)) if t == "Foo"));
        assert!(parse("Consent", "patient=1").is_ok());
        assert_eq!(parse("AuditEvent", "date=2020").unwrap().unknown, ["date"]);
        assert_eq!(parse("Observation", "code=&status=").unwrap().code.len(), 0);
        assert_eq!(bad_param("Observation", "_format=xml"), "_format");
        assert!(parse("Observation", "_format=json&_pretty=true").unwrap().pretty);
        assert_eq!(bad_param("Observation", "code=%ZZ"), "code");
    }

    #[test]
    fn page_links() {
        let r = parse(
            "Observation",
            "patient=Patient/1&code=http://loinc.org|1%202&_count=5&x=1",
        )
        .unwrap();
        assert_eq!(
            r.page_query(10),
            "patient=Patient/1&code=http://loinc.org|1%202&_count=5&_offset=10"
        );
        assert_eq!(
            r.page_query(0),
            "patient=Patient/1&code=http://loinc.org|1%202&_count=5"
        );
    }
}
