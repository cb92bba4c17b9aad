//! Search parameters: a query string read into a [`SearchRequest`].
//!
//! The gateway reads the query string; what each parameter means is defined once,
//! by the node's record search ([`medmesh_node::records::search`]): which types
//! have which parameters, how values parse (tokens, dates and their prefixes,
//! escapes) and what they match. A [`SearchRequest`] carries the parsed
//! [`Query`], which every backend runs as it is.
//!
//! Here:
//! - `_count` defaults to [`DEFAULT_COUNT`] and is capped at the server's maximum.
//!   `_count=0` asks for the total only (FHIR's summary count): no entries, no `next`.
//! - Paging is by offset: `_offset=N` skips the first N matches in the server's order.
//!   Next links carry `_offset`. Offsets are not snapshots: writes between pages can
//!   shift results by a few entries. Every offset sum saturates ([`Page`]): an offset
//!   near `usize::MAX` is an empty last page, never a wrapped `next` link.
//! - `_format` (json only) and `_pretty` are accepted.
//! - Names and values are `application/x-www-form-urlencoded`-decoded (`+` is a
//!   space, `%XX` a byte); links re-encode every character but the unreserved ones
//!   and `/`, `:`.
//! - A parameter with an empty value is ignored. Unknown parameters (and parameters the
//!   type does not have) are collected by name in [`SearchRequest::unknown`]: the
//!   handler adds a warning to the Bundle, or fails with 400 under
//!   `Prefer: handling=strict`. Modifiers other than `:Patient` and `:identifier` (a
//!   patient's did) on `patient`/`subject`
//!   are rejected (400).

use medmesh_node::records::{Query, search};

use super::outcome::ApiError;
use super::types::READ_ONLY_TYPES;
use super::validate::is_supported_type;

/// `_count` when the client gives none.
pub const DEFAULT_COUNT: usize = 50;

/// One page of a result list: `_count` and `_offset`, shared by searches and
/// `$everything`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// Page size, capped at the server maximum; 0 asks for the total only.
    pub count: usize,
    /// Matches to skip (the page cursor).
    pub offset: usize,
}

impl Page {
    /// The first page of the default size.
    pub fn first(max_count: usize) -> Self {
        Self {
            count: DEFAULT_COUNT.min(max_count),
            offset: 0,
        }
    }

    /// Reads `_count` or `_offset` (decoded `value`); `Ok(false)` for any other name.
    ///
    /// # Errors
    /// [`ApiError::InvalidParam`] for a value that is not a `usize`.
    pub fn read(&mut self, name: &str, value: &str, max_count: usize) -> Result<bool, ApiError> {
        let number = || {
            value
                .parse::<usize>()
                .map_err(|_| invalid(name, "must be a non-negative integer"))
        };
        match name {
            "_count" => self.count = number()?.min(max_count),
            "_offset" => self.offset = number()?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The offset of the page after this one, when `total` matches leave one.
    /// None for `_count=0`, whose answer is the total alone: a `next` equal to
    /// `self` would send clients that follow it round forever.
    pub fn next_offset(&self, total: usize) -> Option<usize> {
        let next = self.offset.saturating_add(self.count);
        (self.count > 0 && next < total).then_some(next)
    }

    /// This page's share of `all` (empty past the end).
    pub fn of<'a, T>(&self, all: &'a [T]) -> &'a [T] {
        let start = self.offset.min(all.len());
        let end = self.offset.saturating_add(self.count).min(all.len());
        &all[start..end]
    }
}

/// A parsed search request for one resource type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchRequest {
    /// The resource type searched.
    pub resource_type: String,
    /// Which page of the matches to answer.
    pub page: Page,
    /// What to match: the recognised parameters, parsed by the node's search.
    pub query: Query,
    /// The `patient` parameter as given, for the read-only views (Consent,
    /// AuditEvent), which take a did:key.
    pub view_patient: Option<String>,
    /// `_pretty=true` was asked for.
    pub pretty: bool,
    /// Names of parameters not supported for this type (values are not kept).
    pub unknown: Vec<String>,
    /// The recognised parameters as given (decoded), for self/next links.
    kept: Vec<(String, String)>,
}

impl SearchRequest {
    /// The recognised search parameters as given (decoded), without paging ones.
    pub fn params(&self) -> &[(String, String)] {
        &self.kept
    }

    /// The patient (Patient resource id) the search is scoped to, if any.
    pub fn patient(&self) -> Option<&str> {
        self.query.patient()
    }

    /// The medmesh patient (`patient=did:key:…`) the search is scoped to, if any.
    pub fn patient_did(&self) -> Option<medmesh_crypto::PatientId> {
        self.query.patient_did()
    }

    /// The query string (without `?`) for the page starting at `offset`: the
    /// recognised parameters, then `_count` and `_offset`, each percent-encoded.
    pub fn page_query(&self, offset: usize) -> String {
        let mut parts: Vec<String> = self
            .kept
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect();
        parts.push(format!("_count={}", self.page.count));
        if offset > 0 {
            parts.push(format!("_offset={offset}"));
        }
        parts.join("&")
    }
}

/// Parameter names every type accepts, handled here rather than by the query.
const PAGING: &[&str] = &["_count", "_offset", "_format", "_pretty"];

/// The search parameters `resource_type` supports beyond `_id`/`_lastUpdated`
/// and paging: `(name, type)`. `None` for a type the gateway does not serve.
pub(crate) fn type_params(resource_type: &str) -> Option<Vec<(&'static str, &'static str)>> {
    if READ_ONLY_TYPES.contains(&resource_type) {
        return Some(vec![("patient", "reference")]);
    }
    is_supported_type(resource_type).then(|| search::type_params(resource_type))
}

fn invalid(param: &str, reason: impl Into<String>) -> ApiError {
    ApiError::InvalidParam {
        param: param.to_owned(),
        reason: reason.into(),
    }
}

/// The did:key of a `:identifier` token naming a medmesh patient:
/// `urn:ietf:rfc:3986|did:key:…`, the identifier that links a Patient to its
/// patient. Other identifier systems would need the Patient resource, which
/// a node granted only some collections does not hold: refused (400).
fn linked_did(param: &str, token: &str) -> Result<String, ApiError> {
    let (system, value) = token.split_once('|').unwrap_or(("", token));
    if system != medmesh_node::records::DID_SYSTEM {
        return Err(invalid(
            param,
            format!(
                ":identifier searches the patient's did: {}|did:key:…",
                medmesh_node::records::DID_SYSTEM
            ),
        ));
    }
    value
        .parse::<medmesh_crypto::PatientId>()
        .map(|did| did.to_string())
        .map_err(|_| invalid(param, "not a did:key of a patient"))
}

/// Parses the query string of `GET /fhir/{resource_type}?{query}`.
///
/// # Errors
///
/// [`ApiError::UnknownType`] for a type not served; [`ApiError::InvalidParam`] (400)
/// naming the parameter for a value that cannot be parsed or an unsupported modifier.
pub fn parse_search(resource_type: &str, query: &str, max_count: usize) -> Result<SearchRequest, ApiError> {
    let read_only = READ_ONLY_TYPES.contains(&resource_type);
    if !read_only && !is_supported_type(resource_type) {
        return Err(ApiError::UnknownType(resource_type.to_owned()));
    }
    let known = |name: &str| {
        PAGING.contains(&name)
            || if read_only {
                name == "patient"
            } else {
                search::supports(resource_type, name)
            }
    };
    let mut page = Page::first(max_count);
    let mut pretty = false;
    let mut unknown: Vec<String> = Vec::new();
    let mut kept = Vec::new();
    // What the node's query parses: names without the accepted `:Patient` modifier.
    let mut pairs: Vec<(String, String)> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(raw_key).ok_or_else(|| invalid("query", "invalid percent-encoding in a parameter name"))?;
        let (name, modifier) = match key.split_once(':') {
            Some((n, m)) => (n.to_owned(), Some(m.to_owned())),
            None => (key.clone(), None),
        };
        if !known(&name) {
            if !unknown.contains(&key) {
                unknown.push(key);
            }
            continue;
        }
        let value = decode(raw_value).ok_or_else(|| invalid(&name, "invalid percent-encoding"))?;
        if value.is_empty() {
            continue;
        }
        match (name.as_str(), modifier.as_deref()) {
            ("patient" | "subject", None | Some("Patient")) | (_, None) => {}
            // `subject:identifier=urn:ietf:rfc:3986|did:key:…`: the resources of
            // the Patient linked to that medmesh patient (DESIGN §3), whether or
            // not this node holds the Patient — as `patient=did:key:…`.
            ("patient" | "subject", Some("identifier")) if !read_only => {
                pairs.push(("patient".to_owned(), linked_did(&name, &value)?));
                kept.push((key, value));
                continue;
            }
            (_, Some(_)) => return Err(invalid(&name, "modifier not supported")),
        }
        if page.read(&name, &value, max_count)? {
            continue;
        }
        match name.as_str() {
            "_format" => {
                if !matches!(
                    value.as_str(),
                    "json" | "application/json" | "application/fhir+json" | "application/json+fhir"
                ) {
                    return Err(invalid("_format", "only json is supported"));
                }
                kept.push((key, value));
            }
            "_pretty" => {
                pretty = match value.as_str() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(invalid("_pretty", "must be true or false")),
                };
                kept.push((key, value));
            }
            _ => {
                pairs.push((name, value.clone()));
                kept.push((key, value));
            }
        }
    }
    let (query, view_patient) = if read_only {
        (
            Query::parse::<&str, &str>(resource_type, &[])?,
            pairs.pop().map(|(_, v)| v),
        )
    } else {
        (Query::parse(resource_type, &pairs)?, None)
    };
    Ok(SearchRequest {
        resource_type: resource_type.to_owned(),
        page,
        query,
        view_patient,
        pretty,
        unknown,
        kept,
    })
}

/// The first value of query parameter `name`, decoded; `None` when absent
/// or not decodable.
pub(crate) fn query_value(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(key, _)| decode(key).as_deref() == Some(name))
        .and_then(|(_, value)| decode(value))
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

/// Percent-encodes a query name or value: everything but RFC 3986's unreserved
/// characters and `/`, `:` (which a query may hold as they are), so `|`, `,`, `&`,
/// `=`, `+`, `%`, `\`, spaces and non-ASCII text survive a round trip through any
/// client.
pub(crate) fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/' | b':') {
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
        assert_eq!(
            r.page,
            Page {
                count: DEFAULT_COUNT,
                offset: 0
            }
        );
        assert_eq!(
            parse("Observation", "_count=10&_offset=20").unwrap().page,
            Page { count: 10, offset: 20 }
        );
        assert_eq!(parse("Observation", "_count=100000").unwrap().page.count, 200);
        assert_eq!(parse_search("Observation", "", 10).unwrap().page.count, 10);
        assert_eq!(bad_param("Observation", "_count=-1"), "_count");
        assert_eq!(bad_param("Observation", "_count=abc"), "_count");
        assert_eq!(bad_param("Observation", "_offset=1.5"), "_offset");
    }

    #[test]
    fn page_arithmetic_saturates() {
        let page = |count, offset| Page { count, offset };
        let all = [1, 2, 3];
        assert_eq!(page(2, 0).next_offset(3), Some(2));
        assert_eq!(page(2, 2).next_offset(3), None);
        assert_eq!(page(0, 0).next_offset(3), None, "_count=0: the total only");
        assert_eq!(page(20, usize::MAX - 1).next_offset(3), None);
        assert_eq!(page(usize::MAX, 1).next_offset(usize::MAX), None);
        assert_eq!(page(2, 1).of(&all), &[2, 3]);
        assert_eq!(page(0, 0).of(&all), &[] as &[i32]);
        assert_eq!(page(20, usize::MAX - 1).of(&all), &[] as &[i32]);
        assert_eq!(page(usize::MAX, 2).of(&all), &[3]);
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
            assert_eq!(parse("Observation", q).unwrap().patient(), Some(id), "{q}");
        }
        assert_eq!(bad_param("Observation", "subject=Group/1"), "subject");
        assert_eq!(bad_param("Observation", "patient=1,2"), "patient");
        assert_eq!(bad_param("Observation", "patient=1&subject=2"), "subject");
        assert_eq!(bad_param("Observation", "patient:missing=true"), "patient");
        // Immunization has `patient` but no `subject` in R4.
        assert_eq!(parse("Immunization", "subject=1").unwrap().unknown, ["subject"]);
    }

    #[test]
    fn identifier_of_a_patient_did() {
        let did = medmesh_crypto::SecretIdentity::from_seed(&[3; 32]).patient_id();
        for q in [
            format!("subject:identifier=urn:ietf:rfc:3986|{did}"),
            format!("patient:identifier=urn:ietf:rfc:3986%7C{did}"),
        ] {
            let r = parse("Observation", &q).unwrap();
            assert_eq!(r.patient_did(), Some(did), "{q}");
            assert!(r.page_query(0).contains("identifier="), "the self link keeps it: {q}");
        }
        assert_eq!(
            bad_param("Observation", &format!("subject:identifier={did}")),
            "subject"
        );
        assert_eq!(
            bad_param("Observation", "subject:identifier=http://mrn|12345"),
            "subject"
        );
        assert_eq!(
            bad_param("Observation", "subject:identifier=urn:ietf:rfc:3986|nope"),
            "subject"
        );
    }

    #[test]
    fn values_are_parsed_by_the_node_query() {
        // One definition: the request's query is exactly the node's parse of the
        // recognised, decoded parameters.
        let r = parse(
            "Observation",
            "code=http://loinc.org%7C8867-4,%7Cx&code=y&category=vital-signs&date=ge2020-01&_count=5&x=1",
        )
        .unwrap();
        let expected = Query::parse(
            "Observation",
            &[
                ("code", "http://loinc.org|8867-4,|x"),
                ("code", "y"),
                ("category", "vital-signs"),
                ("date", "ge2020-01"),
            ],
        )
        .unwrap();
        assert_eq!(r.query, expected);
        // An unencoded `+` in a time zone arrives as a space and still parses.
        let plus = parse("Observation", "date=lt2020-02-15T10:00:00+01:00").unwrap();
        let encoded = parse("Observation", "date=lt2020-02-15T10:00:00%2B01:00").unwrap();
        assert_eq!(plus.query, encoded.query);
        for q in ["date=2020-13", "date=xx2020", "date=2020-01-01T25:00:00Z"] {
            assert_eq!(bad_param("Observation", q), "date", "{q}");
        }
        assert_eq!(bad_param("Observation", "_lastUpdated=yesterday"), "_lastUpdated");
        assert_eq!(bad_param("Observation", "code=a|b|c"), "code");
        assert_eq!(bad_param("Observation", "code:text=x"), "code");
        assert_eq!(bad_param("Patient", "identifier=a|b|c"), "identifier");
        assert!(parse("Patient", r"identifier=http://x|a\|b").is_ok());
    }

    #[test]
    fn ids_unknown_and_types() {
        let r = parse("Patient", "_id=a,b&name=x&_sort=date&foo:exact=1&code=1&patient=1").unwrap();
        assert_eq!(r.query, Query::parse("Patient", &[("_id", "a,b")]).unwrap());
        // Patient has no `code` or `patient` parameter in R4.
        assert_eq!(r.unknown, ["name", "_sort", "foo:exact", "code", "patient"]);
        assert_eq!(bad_param("Patient", "_id=a_b"), "_id");
        assert!(matches!(parse("Foo", ""), Err(ApiError::UnknownType(t)) if t == "Foo"));
        assert_eq!(
            parse("Consent", "patient=did:key:z6Mk")
                .unwrap()
                .view_patient
                .as_deref(),
            Some("did:key:z6Mk")
        );
        assert_eq!(parse("AuditEvent", "date=2020").unwrap().unknown, ["date"]);
        assert!(parse("Observation", "code=&status=").unwrap().query.is_empty());
        assert_eq!(bad_param("Observation", "_format=xml"), "_format");
        assert!(parse("Observation", "_format=json&_pretty=true").unwrap().pretty);
        assert_eq!(bad_param("Observation", "code=%ZZ"), "code");
        // Binary and Provenance have no identifier in R4; the others do.
        assert_eq!(parse("Binary", "identifier=x").unwrap().unknown, ["identifier"]);
        assert!(parse("Provenance", "identifier=x").unwrap().unknown == ["identifier"]);
        for ty in ["Patient", "Observation", "Organization", "Practitioner", "Encounter"] {
            assert!(parse(ty, "identifier=x").unwrap().unknown.is_empty(), "{ty}");
        }
    }

    #[test]
    fn page_links_are_percent_encoded() {
        let r = parse(
            "Observation",
            "patient=Patient/1&code=http://loinc.org|1%202&identifier=a%26b%2Bc%5C%2Cd&_count=5&x=1",
        )
        .unwrap();
        assert_eq!(
            r.page_query(10),
            "patient=Patient/1&code=http://loinc.org%7C1%202&identifier=a%26b%2Bc%5C%2Cd&_count=5&_offset=10"
        );
        assert_eq!(
            r.page_query(0),
            "patient=Patient/1&code=http://loinc.org%7C1%202&identifier=a%26b%2Bc%5C%2Cd&_count=5"
        );
        // Reading a link back gives the same request.
        let again = parse("Observation", &r.page_query(0)).unwrap();
        assert_eq!(again.query, r.query);
        assert_eq!(again.params(), r.params());
    }
}
