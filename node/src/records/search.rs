//! Search over rendered resources: `_id`, `_lastUpdated`, `code`, `date`, `status`,
//! `category`, `identifier`, `patient`/`subject`. A scan of the cached JSON; scoping
//! to one patient's documents is the caller's job (DESIGN §3).
//!
//! This module is the one definition of search: which parameters each type has
//! ([`type_params`]), how their values parse ([`Query::parse`]) and what they match.
//! The gateway only reads the query string (percent-decoding, paging, modifiers,
//! unknown parameters) and hands the rest here.
//!
//! Parameters are ANDed; comma-separated values of one parameter are ORed; `\,`,
//! `\|`, `\$` and `\\` escape. Tokens are `system|code`, `|code` (no system),
//! `code` (any system) and `system|` (any code of the system); for `identifier`
//! the code is the identifier's `value`. `patient`/`subject` take one `Patient/{id}`
//! or `{id}` (searches are scoped to one patient). Modifiers (`code:text`, …) are
//! refused with [`Error::UnsupportedSearchParam`], as is any parameter the type does
//! not have, so a client never silently gets an unfiltered result. Paging/format
//! parameters (`_count`, `_format`, `_pretty`) are ignored here: the gateway handles
//! them.

use std::sync::Arc;

use serde_json::Value;

use super::compartment::{patient_references, values_at};
use super::doc::RenderedResource;
use super::error::{Error, Result};
use super::time::parse_range;

/// The search parameters each supported type has in FHIR R4 and this module
/// serves, beyond [`COMMON_PARAMS`]. Types not listed have only those.
const TYPE_PARAMS: &[(&str, &[&str])] = &[
    ("Patient", &["identifier"]),
    (
        "AllergyIntolerance",
        &["patient", "code", "date", "category", "identifier"],
    ),
    ("Condition", &["patient", "subject", "code", "category", "identifier"]),
    (
        "Procedure",
        &["patient", "subject", "code", "date", "status", "category", "identifier"],
    ),
    ("Immunization", &["patient", "date", "status", "identifier"]),
    ("Encounter", &["patient", "subject", "date", "status", "identifier"]),
    (
        "CarePlan",
        &["patient", "subject", "date", "status", "category", "identifier"],
    ),
    (
        "FamilyMemberHistory",
        &["patient", "code", "date", "status", "identifier"],
    ),
    (
        "MedicationRequest",
        &["patient", "subject", "code", "status", "category", "identifier"],
    ),
    (
        "MedicationStatement",
        &["patient", "subject", "code", "status", "category", "identifier"],
    ),
    (
        "MedicationDispense",
        &["patient", "subject", "code", "status", "identifier"],
    ),
    (
        "MedicationAdministration",
        &["patient", "subject", "code", "status", "identifier"],
    ),
    (
        "Observation",
        &["patient", "subject", "code", "date", "status", "category", "identifier"],
    ),
    (
        "DiagnosticReport",
        &["patient", "subject", "code", "date", "status", "category", "identifier"],
    ),
    ("Specimen", &["patient", "subject", "status", "identifier"]),
    (
        "DocumentReference",
        &["patient", "subject", "date", "status", "category", "identifier"],
    ),
    ("Binary", &[]),
    ("Appointment", &["patient", "date", "status", "identifier"]),
    ("AppointmentResponse", &["patient", "identifier"]),
    ("Claim", &["patient", "status", "identifier"]),
    ("ClaimResponse", &["patient", "status", "identifier"]),
    ("ExplanationOfBenefit", &["patient", "status", "identifier"]),
    ("Coverage", &["patient", "status", "identifier"]),
    (
        "CareTeam",
        &["patient", "subject", "date", "status", "category", "identifier"],
    ),
    ("Goal", &["patient", "subject", "category", "identifier"]),
    (
        "ServiceRequest",
        &["patient", "subject", "code", "status", "category", "identifier"],
    ),
    ("Provenance", &["patient"]),
    ("ImagingStudy", &["patient", "subject", "status", "identifier"]),
    ("DeviceRequest", &["patient", "subject", "code", "status", "identifier"]),
    ("DeviceUseStatement", &["patient", "subject", "identifier"]),
    ("NutritionOrder", &["patient", "status", "identifier"]),
    ("RiskAssessment", &["patient", "subject", "date", "identifier"]),
    ("QuestionnaireResponse", &["patient", "subject", "status", "identifier"]),
    (
        "Communication",
        &["patient", "subject", "status", "category", "identifier"],
    ),
    (
        "CommunicationRequest",
        &["patient", "subject", "status", "category", "identifier"],
    ),
    ("Flag", &["patient", "subject", "date", "identifier"]),
    ("List", &["patient", "subject", "code", "date", "status", "identifier"]),
    (
        "Composition",
        &["patient", "subject", "date", "status", "category", "identifier"],
    ),
    ("EpisodeOfCare", &["patient", "date", "status", "identifier"]),
    ("RelatedPerson", &["patient", "identifier"]),
    ("Task", &["patient", "subject", "code", "status", "identifier"]),
    ("AdverseEvent", &["subject", "date", "category", "identifier"]),
    ("BodyStructure", &["patient", "identifier"]),
    (
        "ClinicalImpression",
        &["patient", "subject", "date", "status", "identifier"],
    ),
    ("DetectedIssue", &["patient", "code", "identifier"]),
    ("ImmunizationRecommendation", &["patient", "identifier"]),
    ("Media", &["patient", "subject", "status", "identifier"]),
    ("Account", &["patient", "subject", "status", "identifier"]),
    ("ChargeItem", &["patient", "subject", "code", "identifier"]),
    ("Invoice", &["patient", "subject", "status", "identifier"]),
    ("SupplyDelivery", &["patient", "status", "identifier"]),
    (
        "SupplyRequest",
        &["subject", "date", "status", "category", "identifier"],
    ),
    ("VisionPrescription", &["patient", "status", "identifier"]),
    ("ResearchSubject", &["patient", "date", "status", "identifier"]),
    ("Organization", &["identifier"]),
    ("Practitioner", &["identifier"]),
    ("PractitionerRole", &["identifier"]),
    ("Location", &["status", "identifier"]),
    ("Medication", &["code", "status", "identifier"]),
    ("Device", &["patient", "status", "identifier"]),
];

/// Parameters every type has.
pub const COMMON_PARAMS: &[&str] = &["_id", "_lastUpdated"];

/// The search parameters `resource_type` has beyond [`COMMON_PARAMS`], with their
/// FHIR search parameter type (`reference`, `token`, `date`).
pub fn type_params(resource_type: &str) -> Vec<(&'static str, &'static str)> {
    lookup(TYPE_PARAMS, resource_type)
        .unwrap_or_default()
        .iter()
        .map(|name| {
            let kind = match *name {
                "patient" | "subject" => "reference",
                "date" => "date",
                _ => "token",
            };
            (*name, kind)
        })
        .collect()
}

/// Whether `resource_type` can be searched by the parameter `name` (no modifier).
pub fn supports(resource_type: &str, name: &str) -> bool {
    COMMON_PARAMS.contains(&name) || lookup(TYPE_PARAMS, resource_type).is_some_and(|p| p.contains(&name))
}

/// Element paths searched by `identifier`, per type; others search `identifier`.
const IDENTIFIER_PATHS: &[(&str, &[&str])] = &[("DocumentReference", &["masterIdentifier", "identifier"])];

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
    Identifier(Vec<Token>),
    /// `Patient/{id}`.
    Patient(String),
    /// The medmesh patient itself (`patient=did:key:…`): every resource of
    /// the type in that patient's records, whether or not this node holds
    /// their Patient resource (a labs-only practice holds none). The scope is
    /// the caller's ([`Query::patient_did`]); as a condition it holds.
    PatientDid(medmesh_crypto::PatientId),
}

/// A parsed search over one resource type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    resource_type: String,
    params: Vec<Param>,
}

/// Parameters accepted and left to the caller (paging and formatting).
const IGNORED_PARAMS: &[&str] = &["_count", "_offset", "_format", "_pretty"];

impl Query {
    /// Parses `(name, value)` pairs of a search on `resource_type`: values as
    /// they arrive after percent-decoding (backslash escapes still in).
    ///
    /// # Errors
    /// [`Error::UnsupportedSearchParam`] for parameters the type does not have and
    /// for modifiers, [`Error::InvalidSearchValue`] for values that do not parse, a
    /// second patient, or an empty value.
    pub fn parse<N: AsRef<str>, V: AsRef<str>>(resource_type: &str, pairs: &[(N, V)]) -> Result<Self> {
        let mut params = Vec::new();
        let mut patient: Option<String> = None;
        for (name, value) in pairs {
            let (name, value) = (name.as_ref(), value.as_ref());
            if IGNORED_PARAMS.contains(&name) {
                continue;
            }
            if !supports(resource_type, name) {
                return Err(Error::UnsupportedSearchParam(name.to_owned()));
            }
            let invalid = || Error::InvalidSearchValue { param: name.to_owned() };
            let values = split_unescaped(value, ',');
            if values.iter().any(String::is_empty) {
                return Err(invalid());
            }
            let tokens = || {
                values
                    .iter()
                    .map(|v| token(v))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(invalid)
            };
            let param = match name {
                "_id" => {
                    if !values.iter().all(|v| super::doc::is_id(v)) {
                        return Err(invalid());
                    }
                    Param::Id(values)
                }
                "_lastUpdated" => Param::LastUpdated(dates(&values).ok_or_else(invalid)?),
                "date" => Param::Date(dates(&values).ok_or_else(invalid)?),
                "code" => Param::Code(tokens()?),
                "status" => Param::Status(tokens()?),
                "category" => Param::Category(tokens()?),
                "identifier" => Param::Identifier(tokens()?),
                "patient" | "subject" => {
                    // Scoped to one patient: one Patient, the same in every parameter.
                    let [value] = values.as_slice() else {
                        return Err(invalid());
                    };
                    if value.starts_with("did:key:") {
                        let did: medmesh_crypto::PatientId = value.parse().map_err(|_| invalid())?;
                        if patient.as_deref().is_some_and(|p| p != value) {
                            return Err(invalid());
                        }
                        patient = Some(value.clone());
                        params.push(Param::PatientDid(did));
                        continue;
                    }
                    let id = match value.split_once('/') {
                        Some(("Patient", id)) => id,
                        Some(_) => return Err(invalid()),
                        None => value.as_str(),
                    };
                    if !super::doc::is_id(id) || patient.as_deref().is_some_and(|p| p != id) {
                        return Err(invalid());
                    }
                    patient = Some(id.to_owned());
                    Param::Patient(format!("Patient/{id}"))
                }
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

    /// The id of the Patient a `patient`/`subject` parameter scopes the search to.
    pub fn patient(&self) -> Option<&str> {
        self.params.iter().find_map(|p| match p {
            Param::Patient(reference) => reference.strip_prefix("Patient/"),
            _ => None,
        })
    }

    /// The medmesh patient a `patient=did:key:…` parameter scopes the search to.
    pub fn patient_did(&self) -> Option<medmesh_crypto::PatientId> {
        self.params.iter().find_map(|p| match p {
            Param::PatientDid(did) => Some(*did),
            _ => None,
        })
    }

    /// Whether the query has no condition at all (it matches every resource of
    /// the type).
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
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

/// Splits at `sep` not escaped by `\`, and removes the escapes of `,`, `|`, `$`
/// and `\` (FHIR search §3.1.1.4.3); any other backslash stays.
fn split_unescaped(value: &str, sep: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        let Some(last) = parts.last_mut() else { break };
        match c {
            '\\' => match chars.next() {
                Some(next @ (',' | '|' | '$' | '\\')) if next != sep => {
                    // Kept escaped for the next split (a token's `|`).
                    last.push('\\');
                    last.push(next);
                }
                Some(next) if next == sep => last.push(next),
                Some(next) => {
                    last.push('\\');
                    last.push(next);
                }
                None => last.push('\\'),
            },
            c if c == sep => parts.push(String::new()),
            c => last.push(c),
        }
    }
    parts
}

/// Removes the escapes [`split_unescaped`] left in.
fn unescape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match (c, chars.clone().next()) {
            ('\\', Some(next @ (',' | '|' | '$' | '\\'))) => {
                out.push(next);
                chars.next();
            }
            _ => out.push(c),
        }
    }
    out
}

fn dates(values: &[String]) -> Option<Vec<DateCond>> {
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
    // An unencoded `+` of a time zone arrives as a space.
    let (start, end) = parse_range(&rest.replace(' ', "+"))?;
    Some(DateCond { prefix, start, end })
}

/// A token: `system|code`, `|code`, `system|` or `code`; `None` for more than
/// one unescaped `|` or nothing at all.
fn token(v: &str) -> Option<Token> {
    let parts = split_unescaped(v, '|');
    let token = match parts.as_slice() {
        [code] => Token {
            system: None,
            code: Some(unescape(code)),
        },
        [system, code] => Token {
            system: Some(unescape(system)),
            code: (!code.is_empty()).then(|| unescape(code)),
        },
        _ => return None,
    };
    (token.code.is_some() || token.system.as_deref().is_some_and(|s| !s.is_empty())).then_some(token)
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
        Param::Identifier(tokens) => {
            let paths = lookup(IDENTIFIER_PATHS, rtype).unwrap_or(&["identifier"]);
            paths
                .iter()
                .flat_map(|p| values_at(r, p))
                .any(|v| tokens.iter().any(|t| identifier_matches(v, t)))
        }
        Param::Patient(reference) => patient_references(r).contains(reference),
        Param::PatientDid(_) => true,
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

/// Token match against an `Identifier` (`system`, `value`).
fn identifier_matches(identifier: &Value, t: &Token) -> bool {
    let system = identifier.get("system").and_then(Value::as_str);
    let value = identifier.get("value").and_then(Value::as_str);
    system_matches(t, system) && t.code.as_deref().is_none_or(|c| value == Some(c))
}

fn system_matches(t: &Token, system: Option<&str>) -> bool {
    match t.system.as_deref() {
        None => true,
        Some("") => system.is_none(),
        Some(s) => system == Some(s),
    }
}

fn coding_matches(coding: &Value, t: &Token) -> bool {
    let system = coding.get("system").and_then(Value::as_str);
    let code = coding.get("code").and_then(Value::as_str);
    let system_ok = system_matches(t, system);
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
        let allergy = json!({"resourceType":"AllergyIntolerance","onsetDateTime":"2024-03"});
        let c = |v: &str| q("AllergyIntolerance", &[("date", v)]).matches(&allergy);
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
    fn identifiers_and_escapes() {
        let p = json!({"resourceType":"Patient","id":"p",
            "identifier":[{"system":"http://mrn","value":"12,3|4"},{"value":"x"}]});
        let m = |v: &str| q("Patient", &[("identifier", v)]).matches(&p);
        assert!(m(r"http://mrn|12\,3\|4"));
        assert!(m(r"12\,3\|4"));
        assert!(m("http://mrn|"));
        assert!(m("|x"));
        assert!(!m("|12"));
        assert!(!m("http://mrn|12"));
        assert!(m(r"nope,12\,3\|4"));
        let doc = json!({"resourceType":"DocumentReference","masterIdentifier":{"system":"s","value":"m"}});
        assert!(q("DocumentReference", &[("identifier", "s|m")]).matches(&doc));
        assert!(Query::parse("Patient", &[("identifier", "a|b|c")]).is_err());
        assert!(Query::parse("Patient", &[("identifier", "|")]).is_err());
        assert!(Query::parse("Binary", &[("identifier", "x")]).is_err());
        assert!(Query::parse("Patient", &[("code", "x")]).is_err());
        assert!(Query::parse("Patient", &[("_id", "a_b")]).is_err());
        assert!(supports("Observation", "identifier") && !supports("Provenance", "identifier"));
    }

    #[test]
    fn patient_scope() {
        let scoped = q("Observation", &[("patient", "a"), ("subject", "Patient/a")]);
        assert_eq!(scoped.patient(), Some("a"));
        assert_eq!(q("Observation", &[("status", "final")]).patient(), None);
        for pairs in [
            &[("patient", "a,b")][..],
            &[("patient", "a"), ("subject", "b")],
            &[("subject", "Group/1")],
        ] {
            assert!(Query::parse("Observation", pairs).is_err(), "{pairs:?}");
        }
    }

    #[test]
    fn patient_by_did() {
        let did = medmesh_crypto::SecretIdentity::generate().unwrap().patient_id();
        let text = did.to_string();
        let scoped = q("Observation", &[("patient", text.as_str())]);
        assert_eq!(scoped.patient_did(), Some(did));
        assert_eq!(scoped.patient(), None);
        assert!(scoped.matches(&json!({"resourceType":"Observation"})));
        for pairs in [
            &[("patient", "did:key:z6Mknot")][..],
            &[("patient", text.as_str()), ("subject", "Patient/a")],
        ] {
            assert!(Query::parse("Observation", pairs).is_err(), "{pairs:?}");
        }
    }

    #[test]
    fn patient_param() {
        let obs = json!({"resourceType":"Observation","subject":{"reference":"Patient/example"}});
        assert!(q("Observation", &[("patient", "example")]).matches(&obs));
        assert!(q("Observation", &[("subject", "Patient/example")]).matches(&obs));
        assert!(!q("Observation", &[("patient", "other")]).matches(&obs));
    }
}
