//! Search over rendered resources: `_id`, `_lastUpdated`, `code`, `date`, `status`,
//! `category`, `patient`/`subject`. A scan of the cached JSON; scoping to one
//! patient's documents is the caller's job (DESIGN §3).
//!
//! Parameters are ANDed; comma-separated values of one parameter are ORed
//! (backslash-escaped commas are not supported). Modifiers (`code:text`, …) are
//! refused with [`Error::UnsupportedSearchParam`], as is any unknown parameter, so a
//! client never silently gets an unfiltered result. Paging/format parameters
//! (`_count`, `_format`, `_pretty`) are ignored here: the gateway handles them.

use std::sync::Arc;

use serde_json::Value;

use super::compartment::{patient_of_reference, patient_references, values_at};
use super::doc::RenderedResource;
use super::error::{Error, Result};
use super::time::parse_range;

/// Element paths searched by `code`, per type; others search `code`.
const CODE_PATHS: &[(&str, &[&str])] = &[
    ("DocumentReference", &["type"]),
    ("FamilyMemberHistory", &["condition.code"]),
    ("Immunization", &["vaccineCode"]),
    ("MedicationAdministration", &["medicationCodeableConcept"]),
    ("MedicationDispense", &["medicationCodeableConcept"]),
    ("MedicationRequest", &["medicationCodeableConcept"]),
    ("MedicationStatement", &["medicationCodeableConcept"]),
    ("Specimen", &["type"]),
];

/// The main date of each type for `date`: the first path present is used. A path's
/// last step may be a choice element (`effective` → `effectiveDateTime`,
/// `effectivePeriod`, `effectiveInstant`, `effectiveDate`).
const DATE_PATHS: &[(&str, &[&str])] = &[
    ("AllergyIntolerance", &["recordedDate", "onset"]),
    ("Appointment", &["start"]),
    ("CarePlan", &["period"]),
    ("CareTeam", &["period"]),
    ("Claim", &["created"]),
    ("ClinicalImpression", &["date"]),
    ("Communication", &["sent"]),
    ("Composition", &["date"]),
    ("Condition", &["onset", "recordedDate"]),
    ("Consent", &["dateTime"]),
    ("Coverage", &["period"]),
    ("DiagnosticReport", &["effective", "issued"]),
    ("DocumentReference", &["date"]),
    ("Encounter", &["period"]),
    ("EpisodeOfCare", &["period"]),
    ("ExplanationOfBenefit", &["created"]),
    ("FamilyMemberHistory", &["date"]),
    ("Flag", &["period"]),
    ("ImagingStudy", &["started"]),
    ("Immunization", &["occurrence"]),
    ("MedicationAdministration", &["effective"]),
    ("MedicationDispense", &["whenHandedOver"]),
    ("MedicationRequest", &["authoredOn"]),
    ("MedicationStatement", &["effective", "dateAsserted"]),
    ("Observation", &["effective", "issued"]),
    ("Procedure", &["performed"]),
    ("Provenance", &["occurred", "recorded"]),
    ("RiskAssessment", &["occurrence"]),
    ("ServiceRequest", &["occurrence", "authoredOn"]),
    ("Specimen", &["collection.collected"]),
];

/// A comparison prefix of a date search value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
    Ap,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct DateCond {
    prefix: Prefix,
    start: i64,
    end: i64,
}

/// A token: `system|code`, `|code` (no system), `system|`, or `code` (any system).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Token {
    /// `None`: any system; `Some("")`: no system.
    system: Option<String>,
    /// `None`: any code of the system.
    code: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Param {
    Id(Vec<String>),
    LastUpdated(Vec<DateCond>),
    Code(Vec<Token>),
    Date(Vec<DateCond>),
    Status(Vec<Token>),
    Category(Vec<Token>),
    Patient(Vec<String>),
}

/// A parsed search over one resource type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    resource_type: String,
    params: Vec<Param>,
}

/// Search parameters this module understands.
pub const SUPPORTED_PARAMS: &[&str] = &[
    "_id",
    "_lastUpdated",
    "code",
    "date",
    "status",
    "category",
    "patient",
    "subject",
];

/// Parameters accepted and left to the caller (paging and formatting).
const IGNORED_PARAMS: &[&str] = &["_count", "_format", "_pretty"];

impl Query {
    /// Parses `(name, value)` pairs of a search on `resource_type`.
    ///
    /// # Errors
    /// [`Error::UnsupportedSearchParam`] for unknown parameters or modifiers,
    /// [`Error::InvalidSearchValue`] for values that do not parse.
    pub fn parse<N: AsRef<str>, V: AsRef<str>>(resource_type: &str, pairs: &[(N, V)]) -> Result<Self> {
        let mut params = Vec::new();
        for (name, value) in pairs {
            let (name, value) = (name.as_ref(), value.as_ref());
            if IGNORED_PARAMS.contains(&name) {
                continue;
            }
            let invalid = || Error::InvalidSearchValue { param: name.to_owned() };
            let values: Vec<&str> = value.split(',').collect();
            if values.iter().any(|v| v.is_empty()) {
                return Err(invalid());
            }
            let param = match name {
                "_id" => Param::Id(values.iter().map(|v| (*v).to_owned()).collect()),
                "_lastUpdated" => Param::LastUpdated(dates(&values).ok_or_else(invalid)?),
                "date" => Param::Date(dates(&values).ok_or_else(invalid)?),
                "code" => Param::Code(values.iter().map(|v| token(v)).collect()),
                "status" => Param::Status(values.iter().map(|v| token(v)).collect()),
                "category" => Param::Category(values.iter().map(|v| token(v)).collect()),
                "patient" | "subject" => Param::Patient(
                    values
                        .iter()
                        .map(|v| patient_of_reference(v).unwrap_or_else(|| format!("Patient/{v}")))
                        .collect(),
                ),
                other => return Err(Error::UnsupportedSearchParam(other.to_owned())),
            };
            params.push(param);
        }
        Ok(Self {
            resource_type: resource_type.to_owned(),
            params,
        })
    }

    /// The resource type searched.
    pub fn resource_type(&self) -> &str {
        &self.resource_type
    }

    /// Whether a rendered resource matches every parameter.
    pub fn matches(&self, resource: &Value) -> bool {
        if resource.get("resourceType").and_then(Value::as_str) != Some(self.resource_type.as_str()) {
            return false;
        }
        self.params
            .iter()
            .all(|p| param_matches(&self.resource_type, p, resource))
    }
}

/// Filters rendered resources by a query, keeping their order.
pub fn search<'a, I>(resources: I, query: &Query) -> Vec<Arc<RenderedResource>>
where
    I: IntoIterator<Item = &'a Arc<RenderedResource>>,
{
    resources
        .into_iter()
        .filter(|r| query.matches(&r.json))
        .cloned()
        .collect()
}

fn dates(values: &[&str]) -> Option<Vec<DateCond>> {
    values.iter().map(|v| date_cond(v)).collect()
}

fn date_cond(v: &str) -> Option<DateCond> {
    let prefixes = [
        ("eq", Prefix::Eq),
        ("ne", Prefix::Ne),
        ("gt", Prefix::Gt),
        ("lt", Prefix::Lt),
        ("ge", Prefix::Ge),
        ("le", Prefix::Le),
        ("sa", Prefix::Sa),
        ("eb", Prefix::Eb),
        ("ap", Prefix::Ap),
    ];
    let (prefix, rest) = prefixes
        .iter()
        .find_map(|(p, e)| v.strip_prefix(p).map(|r| (*e, r)))
        .unwrap_or((Prefix::Eq, v));
    let (start, end) = parse_range(rest)?;
    Some(DateCond { prefix, start, end })
}

fn token(v: &str) -> Token {
    match v.split_once('|') {
        Some((s, c)) => Token {
            system: Some(s.to_owned()),
            code: (!c.is_empty()).then(|| c.to_owned()),
        },
        None => Token {
            system: None,
            code: Some(v.to_owned()),
        },
    }
}

fn param_matches(rtype: &str, p: &Param, r: &Value) -> bool {
    match p {
        Param::Id(ids) => r
            .get("id")
            .and_then(Value::as_str)
            .is_some_and(|id| ids.iter().any(|x| x == id)),
        Param::LastUpdated(conds) => {
            let range = r
                .pointer("/meta/lastUpdated")
                .and_then(Value::as_str)
                .and_then(parse_range);
            range.is_some_and(|t| conds.iter().any(|c| date_matches(c, t)))
        }
        Param::Date(conds) => {
            let paths = lookup(DATE_PATHS, rtype).unwrap_or(&["date"]);
            let ranges = paths
                .iter()
                .map(|p| date_ranges(r, p))
                .find(|v| !v.is_empty())
                .unwrap_or_default();
            ranges.iter().any(|t| conds.iter().any(|c| date_matches(c, *t)))
        }
        Param::Code(tokens) => {
            let paths = lookup(CODE_PATHS, rtype).unwrap_or(&["code"]);
            paths
                .iter()
                .flat_map(|p| values_at(r, p))
                .any(|v| tokens.iter().any(|t| token_matches(v, t)))
        }
        Param::Status(tokens) => values_at(r, "status")
            .into_iter()
            .any(|v| tokens.iter().any(|t| token_matches(v, t))),
        Param::Category(tokens) => values_at(r, "category")
            .into_iter()
            .any(|v| tokens.iter().any(|t| token_matches(v, t))),
        Param::Patient(refs) => {
            let mine = patient_references(r);
            refs.iter().any(|x| mine.contains(x))
        }
    }
}

fn lookup(table: &'static [(&'static str, &'static [&'static str])], t: &str) -> Option<&'static [&'static str]> {
    table.iter().find(|(k, _)| *k == t).map(|(_, v)| *v)
}

/// The ranges of every date value at `path` (last step possibly a choice element).
fn date_ranges(r: &Value, path: &str) -> Vec<(i64, i64)> {
    let (parent, last) = match path.rsplit_once('.') {
        Some((p, l)) => (values_at(r, p), l),
        None => (vec![r], path),
    };
    let mut out = Vec::new();
    for obj in parent {
        let Some(map) = obj.as_object() else { continue };
        let candidates = [
            last.to_owned(),
            format!("{last}DateTime"),
            format!("{last}Instant"),
            format!("{last}Date"),
            format!("{last}Period"),
        ];
        for k in &candidates {
            if let Some(v) = map.get(k) {
                out.extend(range_of(v));
            }
        }
    }
    out
}

fn range_of(v: &Value) -> Option<(i64, i64)> {
    match v {
        Value::String(s) => parse_range(s),
        Value::Object(period) => {
            let start = period.get("start").and_then(Value::as_str);
            let end = period.get("end").and_then(Value::as_str);
            if start.is_none() && end.is_none() {
                return None;
            }
            let s = match start {
                Some(s) => parse_range(s)?.0,
                None => i64::MIN,
            };
            let e = match end {
                Some(e) => parse_range(e)?.1,
                None => i64::MAX,
            };
            Some((s, e))
        }
        _ => None,
    }
}

/// FHIR R4 prefix semantics on ranges: target `[ts, te)`, search `[ss, se)`.
fn date_matches(c: &DateCond, (ts, te): (i64, i64)) -> bool {
    let (ss, se) = (c.start, c.end);
    let eq = ss <= ts && te <= se;
    match c.prefix {
        Prefix::Eq => eq,
        Prefix::Ne => !eq,
        Prefix::Gt => te > se,
        Prefix::Lt => ts < ss,
        Prefix::Ge => te > ss,
        Prefix::Le => ts < se,
        Prefix::Sa => ts >= se,
        Prefix::Eb => te <= ss,
        Prefix::Ap => {
            // FHIR leaves "approximately" to the server: here the search range widened
            // by 10% of its width, at least one day, on each side, overlapping the target.
            let slack = ((se.saturating_sub(ss)) / 10).max(86_400_000);
            ts < se.saturating_add(slack) && te > ss.saturating_sub(slack)
        }
    }
}

/// Token match against a code string, a Coding, a CodeableConcept, or arrays of them.
fn token_matches(v: &Value, t: &Token) -> bool {
    match v {
        Value::String(code) => t.system.as_deref().is_none_or(str::is_empty) && t.code.as_deref() == Some(code),
        Value::Array(items) => items.iter().any(|i| token_matches(i, t)),
        Value::Object(map) => {
            if let Some(codings) = map.get("coding") {
                return token_matches_coding_list(codings, t);
            }
            coding_matches(v, t)
        }
        _ => false,
    }
}

fn token_matches_coding_list(codings: &Value, t: &Token) -> bool {
    match codings {
        Value::Array(items) => items.iter().any(|c| coding_matches(c, t)),
        other => coding_matches(other, t),
    }
}

fn coding_matches(coding: &Value, t: &Token) -> bool {
    let system = coding.get("system").and_then(Value::as_str);
    let code = coding.get("code").and_then(Value::as_str);
    let system_ok = match t.system.as_deref() {
        None => true,
        Some("") => system.is_none(),
        Some(s) => system == Some(s),
    };
    let code_ok = match t.code.as_deref() {
        None => true,
        Some(c) => code == Some(c),
    };
    system_ok && code_ok && (code.is_some() || t.code.is_none())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn q(t: &str, pairs: &[(&str, &str)]) -> Query {
        Query::parse(t, pairs).unwrap()
    }

    #[test]
    fn tokens() {
        let obs = json!({"resourceType":"Observation","id":"x","status":"final",
            "category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs"}]}],
            "code":{"coding":[{"system":"http://loinc.org","code":"39156-5"}]}});
        assert!(q("Observation", &[("code", "http://loinc.org|39156-5")]).matches(&obs));
        assert!(q("Observation", &[("code", "39156-5")]).matches(&obs));
        assert!(q("Observation", &[("code", "http://loinc.org|")]).matches(&obs));
        assert!(!q("Observation", &[("code", "|39156-5")]).matches(&obs));
        assert!(!q("Observation", &[("code", "http://snomed.info/sct|39156-5")]).matches(&obs));
        assert!(q("Observation", &[("code", "1,39156-5")]).matches(&obs));
        assert!(q("Observation", &[("status", "final")]).matches(&obs));
        assert!(!q("Observation", &[("status", "amended")]).matches(&obs));
        assert!(q("Observation", &[("category", "vital-signs")]).matches(&obs));
        assert!(q("Observation", &[("_id", "x")]).matches(&obs));
        assert!(!q("Condition", &[("_id", "x")]).matches(&obs));
        assert!(Query::parse("Observation", &[("code:text", "x")]).is_err());
        assert!(Query::parse("Observation", &[("foo", "x")]).is_err());
        assert!(Query::parse("Observation", &[("date", "gt20")]).is_err());
    }

    #[test]
    fn dates() {
        let obs = json!({"resourceType":"Observation","effectiveDateTime":"2024-03-15T10:00:00Z",
            "meta":{"lastUpdated":"2024-04-01T00:00:00.000Z"}});
        let m = |v: &str| q("Observation", &[("date", v)]).matches(&obs);
        assert!(m("2024"));
        assert!(m("2024-03"));
        assert!(m("eq2024-03-15"));
        assert!(!m("2024-03-16"));
        assert!(m("ne2024-03-16"));
        assert!(m("gt2024-03-14"));
        assert!(!m("gt2024-03-15"));
        assert!(m("ge2024-03-15"));
        assert!(m("lt2024-03-16"));
        assert!(!m("lt2024-03-15"));
        assert!(m("le2024-03-15"));
        assert!(m("sa2024-03-14"));
        assert!(!m("sa2024-03-15"));
        assert!(m("eb2024-03-16"));
        assert!(m("ap2024-03-16"));
        assert!(!m("ap2025-03-16"));
        let lu = |v: &str| q("Observation", &[("_lastUpdated", v)]).matches(&obs);
        assert!(lu("ge2024-04-01"));
        assert!(!lu("lt2024-04-01"));
        // Partial target: the whole of March 2024.
        let cond = json!({"resourceType":"Condition","onsetDateTime":"2024-03"});
        let c = |v: &str| q("Condition", &[("date", v)]).matches(&cond);
        assert!(c("2024"));
        assert!(!c("2024-03-15"));
        assert!(c("ge2024-03-15"));
        assert!(c("le2024-03-15"));
        // Periods, open-ended.
        let enc = json!({"resourceType":"Encounter","period":{"start":"2024-01-01"}});
        let e = |v: &str| q("Encounter", &[("date", v)]).matches(&enc);
        assert!(e("gt2030-01-01"));
        assert!(!e("lt2024-01-01"));
        assert!(!e("eq2024-01-01"));
    }

    #[test]
    fn patient_param() {
        let obs = json!({"resourceType":"Observation","subject":{"reference":"Patient/example"}});
        assert!(q("Observation", &[("patient", "example")]).matches(&obs));
        assert!(q("Observation", &[("subject", "Patient/example")]).matches(&obs));
        assert!(!q("Observation", &[("patient", "other")]).matches(&obs));
    }
}
