//! FHIR R4 validation of a resource held as `serde_json::Value`.
//!
//! What is checked (all issues are gathered, not just the first):
//!
//! | check | issue code | expression |
//! |---|---|---|
//! | body is not a JSON object, `resourceType` not a string | `structure` | — / `resourceType` |
//! | `resourceType` missing | `required` | `resourceType` |
//! | `resourceType` not one of [`SUPPORTED_TYPES`] | `not-supported` | `resourceType` |
//! | `id` not `[A-Za-z0-9\-\.]{1,64}` | `value` | `Type.id` |
//! | `null`, `{}`, `[]` (FHIR JSON forbids them) | `structure` | the element |
//! | `""` (empty string) | `value` | the element |
//! | wrong JSON type for a primitive of known type (e.g. a string `"true"` for a boolean, a string for a decimal) | `structure` | the element |
//! | bad primitive syntax (date, dateTime, instant, time, integer ranges, code whitespace, uri, base64, `Reference.reference`, narrative `div`) | `value` | the element |
//! | two alternatives of one choice element (`valueQuantity` + `valueString`) | `structure` | both elements |
//! | a required element (min cardinality 1) missing | `required` | the missing element (`Type.status`, `Type.occurrence[x]`, `Type.participant[0].status`) |
//! | a code outside a required binding (`Observation.status`) | `code-invalid` | the element |
//! | an extension without `url` | `required` | `...extension[0].url` |
//!
//! The primitive type of an element is known from its name (a table of well-known
//! names such as `birthDate`, `issued`, `active`, `status`), from the type suffix of a
//! choice element (`valueDateTime`, `deceasedBoolean`), or from its parent (`value` in a
//! Quantity-like element is a decimal). Unknown elements are not an error: the store
//! keeps them. Contained resources are validated like top-level ones (generic checks
//! only when their type is not in the table) and must not contain resources themselves.
//!
//! Diagnostics name paths and, for code elements, the bad code; never other values.
//!
//! The work is bounded: the walk stops at [`MAX_ISSUES`] issues (the list then ends
//! with [`Issue::truncation`]) and at [`BUDGET`] of time (an issue `too-costly`
//! says so). Bodies are held to [`super::shape`]'s structural limits before they
//! get here.

use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use super::outcome::{ApiError, Issue, IssueType, MAX_ISSUES};
use super::primitive::{self, DateKind};
use super::types::{self, Rule};

pub use super::types::SUPPORTED_TYPES;

/// Validates `resource` as a FHIR R4 resource of a supported type.
///
/// # Errors
///
/// All issues found, each with its issue-type code and the FHIRPath of the offending
/// element.
pub fn validate(resource: &Value) -> Result<(), Vec<Issue>> {
    validate_until(resource, Instant::now() + BUDGET)
}

/// The time one validation may take. A resource within the structural limits
/// validates in well under a second; this is a backstop, not a tuning knob.
pub const BUDGET: Duration = Duration::from_secs(2);

/// Elements visited between two looks at the clock.
const CLOCK_EVERY: u32 = 1024;

/// [`validate`] that stops at `deadline` with an issue `too-costly`.
///
/// # Errors
/// As [`validate`].
pub fn validate_until(resource: &Value, deadline: Instant) -> Result<(), Vec<Issue>> {
    let mut v = Validator {
        issues: Vec::new(),
        deadline,
        visited: 0,
        stopped: None,
    };
    v.resource(resource, None, true);
    match v.stopped {
        Some(Stop::Issues) => v.issues.push(Issue::truncation()),
        Some(Stop::Deadline) => v.issues.push(Issue::error(
            IssueType::TooCostly,
            format!("validation stopped: it took longer than {} s", BUDGET.as_secs()),
        )),
        None => {}
    }
    if v.issues.is_empty() { Ok(()) } else { Err(v.issues) }
}

/// Whether `name` is a resource type the gateway stores.
pub fn is_supported_type(name: &str) -> bool {
    SUPPORTED_TYPES.contains(&name)
}

/// The primitive (or complex) type an element must have, when known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prim {
    Boolean,
    Integer,
    PositiveInt,
    UnsignedInt,
    Decimal,
    Date,
    DateTime,
    Instant,
    Time,
    /// A `code` that must be a string.
    Code,
    /// A name that is a `code` in some types and a complex type in others: checked
    /// as a code only when it is a string.
    MaybeCode,
    Uri,
    Base64,
    Reference,
    Xhtml,
    /// `string`, `markdown`: any non-empty JSON string.
    String,
    /// Any complex type: a JSON object.
    Complex,
}

/// Choice-element prefixes whose `[x]` alternatives are checked (type from suffix, at
/// most one present).
const CHOICE_PREFIXES: &[&str] = &[
    "value",
    "effective",
    "onset",
    "abatement",
    "occurrence",
    "performed",
    "deceased",
    "multipleBirth",
    "born",
    "age",
    "asNeeded",
    "medication",
    "reported",
    "serviced",
    "location",
    "timing",
    "collected",
    "allowed",
    "defaultValue",
    "rate",
    "dose",
    "bounds",
    "scheduled",
    "start",
    "due",
    "detail",
    "item",
    "content",
    "probability",
    "diagnosis",
    "procedure",
    "code",
    "fastingStatus",
    "occurred",
    "created",
    "doseNumber",
    "seriesDoses",
    "chargeItem",
    "target",
];

/// FHIR data type names that may follow a choice prefix, with the check they imply.
const CHOICE_TYPES: &[(&str, Prim)] = &[
    ("Base64Binary", Prim::Base64),
    ("Boolean", Prim::Boolean),
    ("Canonical", Prim::Uri),
    ("Code", Prim::Code),
    ("DateTime", Prim::DateTime),
    ("Date", Prim::Date),
    ("Decimal", Prim::Decimal),
    ("Id", Prim::String),
    ("Instant", Prim::Instant),
    ("Integer", Prim::Integer),
    ("Markdown", Prim::String),
    ("Oid", Prim::Uri),
    ("PositiveInt", Prim::PositiveInt),
    ("String", Prim::String),
    ("Time", Prim::Time),
    ("UnsignedInt", Prim::UnsignedInt),
    ("Uri", Prim::Uri),
    ("Url", Prim::Uri),
    ("Uuid", Prim::Uri),
    ("Address", Prim::Complex),
    ("Age", Prim::Complex),
    ("Annotation", Prim::Complex),
    ("Attachment", Prim::Complex),
    ("CodeableConcept", Prim::Complex),
    ("Coding", Prim::Complex),
    ("ContactPoint", Prim::Complex),
    ("Count", Prim::Complex),
    ("Distance", Prim::Complex),
    ("Duration", Prim::Complex),
    ("HumanName", Prim::Complex),
    ("Identifier", Prim::Complex),
    ("Money", Prim::Complex),
    ("Period", Prim::Complex),
    ("Quantity", Prim::Complex),
    ("Range", Prim::Complex),
    ("Ratio", Prim::Complex),
    ("Reference", Prim::Complex),
    ("SampledData", Prim::Complex),
    ("Signature", Prim::Complex),
    ("Timing", Prim::Complex),
    ("ContactDetail", Prim::Complex),
    ("Contributor", Prim::Complex),
    ("DataRequirement", Prim::Complex),
    ("Expression", Prim::Complex),
    ("ParameterDefinition", Prim::Complex),
    ("RelatedArtifact", Prim::Complex),
    ("TriggerDefinition", Prim::Complex),
    ("UsageContext", Prim::Complex),
    ("Dosage", Prim::Complex),
    ("Meta", Prim::Complex),
];

/// Element names whose type is the same wherever R4 uses them (within the supported types).
const NAMED: &[(&str, Prim)] = &[
    ("active", Prim::Boolean),
    ("primarySource", Prim::Boolean),
    ("isSubpotent", Prim::Boolean),
    ("doNotPerform", Prim::Boolean),
    ("preferred", Prim::Boolean),
    ("focal", Prim::Boolean),
    ("userSelected", Prim::Boolean),
    ("experimental", Prim::Boolean),
    ("subrogation", Prim::Boolean),
    ("wasSubstituted", Prim::Boolean),
    ("sequence", Prim::PositiveInt),
    ("rank", Prim::PositiveInt),
    ("minutesDuration", Prim::PositiveInt),
    ("noteNumber", Prim::PositiveInt),
    ("careTeamSequence", Prim::PositiveInt),
    ("diagnosisSequence", Prim::PositiveInt),
    ("procedureSequence", Prim::PositiveInt),
    ("informationSequence", Prim::PositiveInt),
    ("itemSequence", Prim::PositiveInt),
    ("detailSequence", Prim::PositiveInt),
    ("subDetailSequence", Prim::PositiveInt),
    ("frequency", Prim::PositiveInt),
    ("frequencyMax", Prim::PositiveInt),
    ("count", Prim::PositiveInt),
    ("countMax", Prim::PositiveInt),
    ("size", Prim::UnsignedInt),
    ("numberOfRepeatsAllowed", Prim::UnsignedInt),
    ("numberOfSeries", Prim::UnsignedInt),
    ("numberOfInstances", Prim::UnsignedInt),
    ("factor", Prim::Decimal),
    ("latitude", Prim::Decimal),
    ("longitude", Prim::Decimal),
    ("altitude", Prim::Decimal),
    ("birthDate", Prim::Date),
    ("statusDate", Prim::Date),
    ("date", Prim::DateTime),
    ("start", Prim::DateTime),
    ("end", Prim::DateTime),
    ("authoredOn", Prim::DateTime),
    ("recordedDate", Prim::DateTime),
    ("created", Prim::DateTime),
    ("creation", Prim::DateTime),
    ("sent", Prim::DateTime),
    ("received", Prim::DateTime),
    ("whenPrepared", Prim::DateTime),
    ("whenHandedOver", Prim::DateTime),
    ("started", Prim::DateTime),
    ("authored", Prim::DateTime),
    ("dateAsserted", Prim::DateTime),
    ("expirationDate", Prim::DateTime),
    ("lastOccurrence", Prim::DateTime),
    ("time", Prim::DateTime),
    ("dateWritten", Prim::DateTime),
    ("dateTime", Prim::DateTime),
    ("issued", Prim::Instant),
    ("lastUpdated", Prim::Instant),
    ("timestamp", Prim::Instant),
    ("recorded", Prim::Instant),
    ("timeOfDay", Prim::Time),
    ("availableStartTime", Prim::Time),
    ("availableEndTime", Prim::Time),
    ("openingTime", Prim::Time),
    ("closingTime", Prim::Time),
    ("status", Prim::Code),
    ("intent", Prim::Code),
    ("gender", Prim::Code),
    ("language", Prim::MaybeCode),
    ("contentType", Prim::Code),
    ("comparator", Prim::Code),
    ("criticality", Prim::Code),
    ("lifecycleStatus", Prim::Code),
    ("actuality", Prim::Code),
    ("currency", Prim::Code),
    ("code", Prim::MaybeCode),
    ("use", Prim::MaybeCode),
    ("type", Prim::MaybeCode),
    ("severity", Prim::MaybeCode),
    ("priority", Prim::MaybeCode),
    ("outcome", Prim::MaybeCode),
    ("mode", Prim::MaybeCode),
    ("system", Prim::MaybeCode),
    ("url", Prim::Uri),
    ("fullUrl", Prim::Uri),
    ("profile", Prim::Uri),
    ("implicitRules", Prim::Uri),
    ("instantiatesCanonical", Prim::Uri),
    ("instantiatesUri", Prim::Uri),
    ("data", Prim::Base64),
    ("reference", Prim::Reference),
    ("div", Prim::Xhtml),
    ("meta", Prim::Complex),
    ("extension", Prim::Complex),
    ("modifierExtension", Prim::Complex),
    ("identifier", Prim::Complex),
    ("coding", Prim::Complex),
    ("subject", Prim::Complex),
    ("patient", Prim::Complex),
];

/// Parents whose `value` is a decimal (Quantity, Money and their profiles).
const QUANTITY_PARENTS: &[&str] = &[
    "quantity",
    "low",
    "high",
    "numerator",
    "denominator",
    "unitPrice",
    "net",
    "amount",
    "length",
    "doseQuantity",
    "maxDosePerAdministration",
    "maxDosePerLifetime",
    "expectedSupplyDuration",
    "dispenseInterval",
    "gross",
];

const QUANTITY_SUFFIXES: &[&str] = &["Quantity", "Age", "Duration", "Distance", "Count", "Money"];

/// The longest [`CHOICE_TYPES`] suffix of `name` that leaves a non-empty prefix.
fn choice_split(name: &str) -> Option<(&str, Prim)> {
    CHOICE_TYPES
        .iter()
        .filter(|(suffix, _)| name.len() > suffix.len() && name.ends_with(suffix))
        .max_by_key(|(suffix, _)| suffix.len())
        .map(|(suffix, prim)| (&name[..name.len() - suffix.len()], *prim))
}

/// The type of element `name` inside an element called `parent`, when known.
fn prim_of(name: &str, parent: &str) -> Option<Prim> {
    if name == "value" && (QUANTITY_PARENTS.contains(&parent) || QUANTITY_SUFFIXES.iter().any(|s| parent.ends_with(s)))
    {
        return Some(Prim::Decimal);
    }
    if name == "data" && parent.ends_with("SampledData") {
        return Some(Prim::String);
    }
    if let Some((_, prim)) = NAMED.iter().find(|(n, _)| *n == name) {
        return Some(*prim);
    }
    match choice_split(name) {
        Some((prefix, prim)) if CHOICE_PREFIXES.contains(&prefix) => Some(prim),
        _ => None,
    }
}

struct Validator {
    issues: Vec<Issue>,
    deadline: Instant,
    /// Elements visited, for [`CLOCK_EVERY`].
    visited: u32,
    /// Why the walk stopped early, if it did.
    stopped: Option<Stop>,
}

#[derive(Clone, Copy)]
enum Stop {
    Issues,
    Deadline,
}

impl Validator {
    fn push(&mut self, code: IssueType, path: &str, diagnostics: impl Into<String>) {
        self.add(Issue::error(code, diagnostics).at(path));
    }

    fn add(&mut self, issue: Issue) {
        if self.issues.len() < MAX_ISSUES {
            self.issues.push(issue);
        } else {
            self.stopped.get_or_insert(Stop::Issues);
        }
    }

    /// Counts one element; whether the walk must stop (issues full, time up).
    fn stop(&mut self) -> bool {
        self.visited = self.visited.wrapping_add(1);
        if self.visited.is_multiple_of(CLOCK_EVERY) && Instant::now() >= self.deadline {
            self.stopped = Some(Stop::Deadline);
        }
        self.stopped.is_some()
    }

    /// Validates a resource at `path` (`None`: top level, path is its type).
    fn resource(&mut self, value: &Value, path: Option<&str>, top: bool) {
        let Value::Object(obj) = value else {
            let at = path.unwrap_or("");
            let mut issue = Issue::error(IssueType::Structure, "a resource must be a JSON object");
            if !at.is_empty() {
                issue = issue.at(at);
            }
            self.add(issue);
            return;
        };
        let rt_path = path.map_or_else(|| "resourceType".to_owned(), |p| format!("{p}.resourceType"));
        let type_name = match obj.get("resourceType") {
            Some(Value::String(t)) if primitive::is_type_name(t) => Some(t.as_str()),
            Some(Value::String(_)) => {
                self.push(IssueType::Value, &rt_path, "resourceType is not a resource type name");
                None
            }
            Some(_) => {
                self.push(IssueType::Structure, &rt_path, "resourceType must be a string");
                None
            }
            None => {
                self.push(IssueType::Required, &rt_path, "resourceType is missing");
                None
            }
        };
        let def = type_name.and_then(types::type_def);
        if let (Some(t), None, true) = (type_name, def, top) {
            self.push(
                IssueType::NotSupported,
                &rt_path,
                format!("resource type {t} is not supported"),
            );
        }
        let base = path.map_or_else(|| type_name.unwrap_or("Resource").to_owned(), str::to_owned);
        match obj.get("id") {
            Some(Value::String(id)) if !id.is_empty() && !primitive::is_id(id) => self.push(
                IssueType::Value,
                &format!("{base}.id"),
                "id must match [A-Za-z0-9-.]{1,64}",
            ),
            _ => {}
        }
        if let Some(Value::Object(text)) = obj.get("text") {
            let tp = format!("{base}.text");
            for req in ["status", "div"] {
                if !text.contains_key(req) {
                    self.push(
                        IssueType::Required,
                        &format!("{tp}.{req}"),
                        format!("{tp}.{req} is required"),
                    );
                }
            }
            self.code_in(
                text.get("status"),
                &format!("{tp}.status"),
                &["generated", "extensions", "additional", "empty"],
            );
        }
        self.object(obj, &base, type_name.unwrap_or(""), true);
        if let Some(Value::Array(contained)) = obj.get("contained") {
            for (i, c) in contained.iter().enumerate() {
                if self.stopped.is_some() {
                    return;
                }
                let cp = format!("{base}.contained[{i}]");
                if !top {
                    self.push(
                        IssueType::Structure,
                        &cp,
                        "contained resources must not contain resources",
                    );
                }
                if top {
                    self.resource(c, Some(&cp), false);
                }
            }
        }
        if let Some(def) = def {
            for rule in def.rules {
                self.rule(obj, &base, *rule);
            }
        }
    }

    /// Generic checks of every element of `obj` (at `path`, named `name`).
    fn object(&mut self, obj: &Map<String, Value>, path: &str, name: &str, is_resource: bool) {
        let mut choices: Vec<(&str, String)> = Vec::new();
        for (key, value) in obj {
            if self.stop() {
                return;
            }
            if is_resource && (key == "resourceType" || key == "contained") {
                if key == "contained" {
                    self.shape(value, &format!("{path}.contained"), true);
                }
                continue;
            }
            let (ext, elem) = match key.strip_prefix('_') {
                Some(e) => (true, e),
                None => (false, key.as_str()),
            };
            let child = format!("{path}.{elem}");
            if let Some((prefix, _)) = choice_split(elem)
                && CHOICE_PREFIXES.contains(&prefix)
                && !choices.iter().any(|(_, c)| *c == child)
            {
                choices.push((prefix, child.clone()));
            }
            match value {
                Value::Null => self.push(IssueType::Structure, &child, "null is not allowed in FHIR JSON"),
                Value::Array(items) => {
                    if items.is_empty() {
                        self.push(
                            IssueType::Structure,
                            &child,
                            "empty arrays are not allowed in FHIR JSON",
                        );
                    }
                    let twin_key = if ext { elem.to_owned() } else { format!("_{elem}") };
                    let twin = obj.get(&twin_key).and_then(Value::as_array);
                    for (i, item) in items.iter().enumerate() {
                        if self.stop() {
                            return;
                        }
                        let ip = format!("{child}[{i}]");
                        if item.is_null() {
                            if twin.and_then(|t| t.get(i)).is_none_or(Value::is_null) {
                                self.push(IssueType::Structure, &ip, "null is not allowed in FHIR JSON");
                            }
                        } else {
                            self.element(elem, name, item, &ip, ext);
                        }
                    }
                }
                _ => self.element(elem, name, value, &child, ext),
            }
        }
        let mut seen: Vec<(&str, &str)> = Vec::new();
        for (prefix, child) in &choices {
            if let Some((_, first)) = seen.iter().find(|(p, _)| p == prefix) {
                self.add(
                    Issue::error(
                        IssueType::Structure,
                        format!("only one alternative of {path}.{prefix}[x] may be present"),
                    )
                    .at(*first)
                    .at(child.as_str()),
                );
            } else {
                seen.push((prefix, child));
            }
        }
    }

    /// Checks that `value` is a non-empty array or object; used for `contained`.
    fn shape(&mut self, value: &Value, path: &str, array: bool) {
        match value {
            Value::Array(a) if a.is_empty() => {
                self.push(IssueType::Structure, path, "empty arrays are not allowed in FHIR JSON");
            }
            Value::Array(_) if array => {}
            Value::Null => self.push(IssueType::Structure, path, "null is not allowed in FHIR JSON"),
            _ => self.push(IssueType::Structure, path, "must be an array"),
        }
    }

    /// Checks one element value (not an array) named `name` inside `parent`.
    fn element(&mut self, name: &str, parent: &str, value: &Value, path: &str, ext: bool) {
        if ext {
            // `_name`: the id/extension part of a primitive.
            match value {
                Value::Object(o) if o.is_empty() => {
                    self.push(IssueType::Structure, path, "empty objects are not allowed in FHIR JSON");
                }
                Value::Object(o) => self.object(o, path, name, false),
                _ => self.push(IssueType::Structure, path, "a primitive's _element must be an object"),
            }
            return;
        }
        let prim = prim_of(name, parent);
        match value {
            Value::Object(o) => {
                if o.is_empty() {
                    self.push(IssueType::Structure, path, "empty objects are not allowed in FHIR JSON");
                    return;
                }
                if prim.is_some_and(|p| !matches!(p, Prim::Complex | Prim::MaybeCode)) {
                    self.push(IssueType::Structure, path, "must be a primitive value, not an object");
                    return;
                }
                if (name == "extension" || name == "modifierExtension") && !o.contains_key("url") {
                    self.push(IssueType::Required, &format!("{path}.url"), "Extension.url is required");
                }
                self.object(o, path, name, false);
            }
            Value::String(s) => {
                if s.is_empty() {
                    self.push(IssueType::Value, path, "empty strings are not allowed in FHIR JSON");
                    return;
                }
                if let Some(p) = prim {
                    self.string(p, s, path);
                }
            }
            Value::Number(n) => {
                if let Some(p) = prim.filter(|p| *p != Prim::MaybeCode) {
                    self.number(p, &n.to_string(), path);
                }
            }
            Value::Bool(_) => {
                if prim.is_some_and(|p| !matches!(p, Prim::Boolean | Prim::MaybeCode)) {
                    self.push(IssueType::Structure, path, "must not be a JSON boolean");
                }
            }
            Value::Null | Value::Array(_) => {
                self.push(IssueType::Structure, path, "nested arrays and nulls are not allowed");
            }
        }
    }

    fn string(&mut self, prim: Prim, s: &str, path: &str) {
        let (ok, what) = match prim {
            Prim::Boolean | Prim::Integer | Prim::PositiveInt | Prim::UnsignedInt | Prim::Decimal => {
                self.push(
                    IssueType::Structure,
                    path,
                    "must be a JSON number or boolean, not a string",
                );
                return;
            }
            Prim::Complex => {
                self.push(IssueType::Structure, path, "must be a JSON object, not a string");
                return;
            }
            Prim::Date => (
                primitive::is_date(s, DateKind::Date),
                "a date (yyyy, yyyy-mm or yyyy-mm-dd)",
            ),
            Prim::DateTime => (
                primitive::is_date(s, DateKind::DateTime),
                "a dateTime (a date, or yyyy-mm-ddThh:mm:ss[.f] with a time zone)",
            ),
            Prim::Instant => (
                primitive::is_date(s, DateKind::Instant),
                "an instant (yyyy-mm-ddThh:mm:ss[.f] with a time zone)",
            ),
            Prim::Time => (primitive::parse_time(s).is_some(), "a time (hh:mm:ss)"),
            Prim::Code | Prim::MaybeCode => (
                primitive::is_code(s),
                "a code (no leading, trailing or repeated whitespace)",
            ),
            Prim::Uri => (primitive::is_uri(s), "a uri (no whitespace)"),
            Prim::Base64 => (primitive::is_base64(s), "base64Binary"),
            Prim::Reference => (
                primitive::is_reference(s),
                "a reference (Type/id, an absolute URL, urn:uuid:, urn:oid: or #id)",
            ),
            Prim::Xhtml => {
                let t = s.trim();
                (
                    t.starts_with("<div") && t.ends_with("</div>"),
                    "xhtml in a <div> element",
                )
            }
            Prim::String => (true, ""),
        };
        if !ok {
            self.push(IssueType::Value, path, format!("{path} must be {what}"));
        }
    }

    fn number(&mut self, prim: Prim, text: &str, path: &str) {
        let int = |min: i64| {
            text.bytes()
                .enumerate()
                .all(|(i, b)| b.is_ascii_digit() || (i == 0 && b == b'-'))
                && text.parse::<i32>().is_ok_and(|n| i64::from(n) >= min)
        };
        let (ok, what) = match prim {
            Prim::Decimal => (true, ""),
            Prim::Integer => (int(i64::from(i32::MIN)), "an integer (32-bit)"),
            Prim::PositiveInt => (int(1), "a positiveInt (1 or more)"),
            Prim::UnsignedInt => (int(0), "an unsignedInt (0 or more)"),
            Prim::Boolean => (false, "a JSON boolean"),
            Prim::Complex => (false, "a JSON object"),
            _ => (false, "a JSON string"),
        };
        if !ok {
            let code = if matches!(prim, Prim::Integer | Prim::PositiveInt | Prim::UnsignedInt) {
                IssueType::Value
            } else {
                IssueType::Structure
            };
            self.push(code, path, format!("{path} must be {what}"));
        }
    }

    /// Checks that an optional code value (or array of codes) is in `codes`.
    fn code_in(&mut self, value: Option<&Value>, path: &str, codes: &[&str]) {
        match value {
            Some(Value::String(s)) if !codes.contains(&s.as_str()) => {
                // Codes of a required binding are not PHI; naming it helps the client.
                let shown: String = s.chars().take(64).collect();
                self.push(
                    IssueType::CodeInvalid,
                    path,
                    format!(
                        "{path}: code '{shown}' is not in the required value set ({})",
                        codes.join(" | ")
                    ),
                );
            }
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    self.code_in(Some(item), &format!("{path}[{i}]"), codes);
                }
            }
            _ => {}
        }
    }

    fn rule(&mut self, root: &Map<String, Value>, base: &str, rule: Rule) {
        let (path, check) = match rule {
            Rule::Req(p) => (p, Check::Present(None)),
            Rule::ReqCode(p, codes) => (p, Check::Present(Some(codes))),
            Rule::Code(p, codes) => (p, Check::Codes(codes)),
            Rule::Coding(p, system, codes) => (p, Check::Coding(system, codes)),
        };
        let (parents, last) = match path.rsplit_once('.') {
            Some((parents, last)) => (Some(parents), last),
            None => (None, path),
        };
        let mut holders: Vec<(String, &Map<String, Value>)> = vec![(base.to_owned(), root)];
        if let Some(parents) = parents {
            for seg in parents.split('.') {
                let mut next = Vec::new();
                for (p, obj) in holders {
                    match obj.get(seg) {
                        Some(Value::Object(o)) => next.push((format!("{p}.{seg}"), o)),
                        Some(Value::Array(items)) => {
                            for (i, item) in items.iter().enumerate() {
                                if let Value::Object(o) = item {
                                    next.push((format!("{p}.{seg}[{i}]"), o));
                                }
                            }
                        }
                        _ => {}
                    }
                }
                holders = next;
            }
        }
        for (p, obj) in holders {
            let at = format!("{p}.{last}");
            match check {
                Check::Present(codes) => {
                    let present = match last.strip_suffix("[x]") {
                        Some(prefix) => obj.keys().any(|k| {
                            let k = k.strip_prefix('_').unwrap_or(k);
                            k.strip_prefix(prefix)
                                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase()))
                        }),
                        None => obj.contains_key(last) || obj.contains_key(&format!("_{last}")),
                    };
                    if !present {
                        self.push(IssueType::Required, &at, format!("{at} is required"));
                    } else if let Some(codes) = codes {
                        self.code_in(obj.get(last), &at, codes);
                    }
                }
                Check::Codes(codes) => self.code_in(obj.get(last), &at, codes),
                Check::Coding(system, codes) => {
                    let system = types::terminology_system(system);
                    let Some(Value::Array(codings)) = obj.get(last).and_then(|cc| cc.get("coding")) else {
                        continue;
                    };
                    for (i, coding) in codings.iter().enumerate() {
                        if coding.get("system").and_then(Value::as_str) == Some(system.as_str()) {
                            self.code_in(coding.get("code"), &format!("{at}.coding[{i}].code"), codes);
                        }
                    }
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Check {
    Present(Option<&'static [&'static str]>),
    Codes(&'static [&'static str]),
    Coding(&'static str, &'static [&'static str]),
}

/// `Ok` for a resource type this gateway serves; [`ApiError::UnknownType`] else.
///
/// # Errors
/// [`ApiError::UnknownType`].
pub fn check_type(resource_type: &str) -> Result<(), ApiError> {
    if is_supported_type(resource_type) {
        Ok(())
    } else {
        Err(ApiError::UnknownType(resource_type.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fhir/examples");

    fn read(name: &str) -> Value {
        let path = format!("{EXAMPLES}/{name}");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap()
    }

    fn example_files() -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(EXAMPLES)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".json"))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn every_example_of_a_supported_type_validates() {
        let mut checked = 0;
        for name in example_files() {
            let value = read(&name);
            let ty = value["resourceType"].as_str().unwrap().to_owned();
            if ty == "Bundle" {
                for (i, entry) in value["entry"].as_array().unwrap().iter().enumerate() {
                    let Some(resource) = entry.get("resource") else {
                        continue;
                    };
                    let rt = resource["resourceType"].as_str().unwrap();
                    if is_supported_type(rt) {
                        assert_eq!(validate(resource), Ok(()), "{name} entry {i} ({rt})");
                        checked += 1;
                    } else {
                        assert!(validate(resource).is_err(), "{name} entry {i}: {rt} is unsupported");
                    }
                }
            } else if is_supported_type(&ty) {
                assert_eq!(validate(&value), Ok(()), "{name}");
                checked += 1;
            } else {
                assert_eq!(ty, "Consent", "{name}: only Consent examples are of an unstored type");
            }
        }
        assert!(checked > 340, "checked {checked}");
    }

    #[test]
    fn synthea_bundle_entries_all_validate() {
        let bundle = read("Bundle-synthea-Brekke496.json");
        let entries = bundle["entry"].as_array().unwrap();
        assert_eq!(entries.len(), 319);
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(validate(&e["resource"]), Ok(()), "entry {i}");
        }
    }

    fn obs() -> Value {
        json!({
            "resourceType": "Observation",
            "id": "bp-1",
            "status": "final",
            "code": { "coding": [{ "system": "http://loinc.org", "code": "8867-4" }] },
            "subject": { "reference": "Patient/example" },
            "effectiveDateTime": "2020-01-01T10:00:00Z",
            "valueQuantity": { "value": 1.00, "unit": "mg" }
        })
    }

    fn with(mut base: Value, pointer: &str, value: Option<Value>) -> Value {
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        let obj = base.pointer_mut(parent).unwrap().as_object_mut().unwrap();
        match value {
            Some(v) => obj.insert(key.to_owned(), v),
            None => obj.remove(key),
        };
        base
    }

    /// (name, resource, expected (issue code, expressions) in any order)
    type Case = (&'static str, serde_json::Value, Vec<(IssueType, Vec<&'static str>)>);

    #[test]
    fn invalid_resources_give_exact_issues() {
        use IssueType::*;
        let cases: Vec<Case> = vec![
            (
                "missing status",
                with(obs(), "/status", None),
                vec![(Required, vec!["Observation.status"])],
            ),
            (
                "bad status code",
                with(obs(), "/status", Some(json!("done"))),
                vec![(CodeInvalid, vec!["Observation.status"])],
            ),
            (
                "status not a string",
                with(obs(), "/status", Some(json!(1))),
                vec![(Structure, vec!["Observation.status"])],
            ),
            (
                "bad dateTime",
                with(obs(), "/effectiveDateTime", Some(json!("2020-02-30"))),
                vec![(Value, vec!["Observation.effectiveDateTime"])],
            ),
            (
                "dateTime without zone",
                with(obs(), "/effectiveDateTime", Some(json!("2020-02-01T10:00:00"))),
                vec![(Value, vec!["Observation.effectiveDateTime"])],
            ),
            (
                "bad instant",
                with(obs(), "/issued", Some(json!("2020-02-01"))),
                vec![(Value, vec!["Observation.issued"])],
            ),
            (
                "bad id",
                with(obs(), "/id", Some(json!("a_b"))),
                vec![(Value, vec!["Observation.id"])],
            ),
            (
                "null value",
                with(obs(), "/subject", Some(json!(null))),
                vec![(Structure, vec!["Observation.subject"])],
            ),
            (
                "empty array",
                with(obs(), "/category", Some(json!([]))),
                vec![(Structure, vec!["Observation.category"])],
            ),
            (
                "empty object",
                with(obs(), "/subject", Some(json!({}))),
                vec![(Structure, vec!["Observation.subject"])],
            ),
            (
                "empty string",
                with(obs(), "/subject/display", Some(json!(""))),
                vec![(Value, vec!["Observation.subject.display"])],
            ),
            (
                "two value[x]",
                with(obs(), "/valueString", Some(json!("high"))),
                vec![(Structure, vec!["Observation.valueQuantity", "Observation.valueString"])],
            ),
            (
                "decimal as string",
                with(obs(), "/valueQuantity/value", Some(json!("1.0"))),
                vec![(Structure, vec!["Observation.valueQuantity.value"])],
            ),
            (
                "bad reference",
                with(obs(), "/subject/reference", Some(json!("Patient/a b"))),
                vec![(Value, vec!["Observation.subject.reference"])],
            ),
            (
                "code with whitespace",
                with(obs(), "/code/coding/0/code", Some(json!(" 8867-4"))),
                vec![(Value, vec!["Observation.code.coding[0].code"])],
            ),
            (
                "missing code",
                with(obs(), "/code", None),
                vec![(Required, vec!["Observation.code"])],
            ),
            (
                "unsupported type",
                json!({ "resourceType": "Questionnaire", "status": "active" }),
                vec![(NotSupported, vec!["resourceType"])],
            ),
            (
                "no resourceType",
                json!({ "id": "x" }),
                vec![(Required, vec!["resourceType"])],
            ),
            (
                "extension without url",
                with(obs(), "/extension", Some(json!([{ "valueString": "x" }]))),
                vec![(Required, vec!["Observation.extension[0].url"])],
            ),
            (
                "boolean as string",
                json!({ "resourceType": "Patient", "active": "true" }),
                vec![(Structure, vec!["Patient.active"])],
            ),
            (
                "bad birthDate",
                json!({ "resourceType": "Patient", "birthDate": "1970-01-01T00:00:00Z" }),
                vec![(Value, vec!["Patient.birthDate"])],
            ),
            (
                "bad gender",
                json!({ "resourceType": "Patient", "gender": "F" }),
                vec![(CodeInvalid, vec!["Patient.gender"])],
            ),
            (
                "appointment participant without status",
                json!({ "resourceType": "Appointment", "status": "booked",
                        "participant": [{ "status": "accepted" }, { "actor": { "reference": "Patient/1" } }] }),
                vec![(Required, vec!["Appointment.participant[1].status"])],
            ),
            (
                "immunization occurrence[x]",
                json!({ "resourceType": "Immunization", "status": "completed",
                        "vaccineCode": { "text": "x" }, "patient": { "reference": "Patient/1" } }),
                vec![(Required, vec!["Immunization.occurrence[x]"])],
            ),
            (
                "condition clinicalStatus binding",
                json!({ "resourceType": "Condition", "subject": { "reference": "Patient/1" },
                        "clinicalStatus": { "coding": [{
                            "system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "gone" }] } }),
                vec![(CodeInvalid, vec!["Condition.clinicalStatus.coding[0].code"])],
            ),
            (
                "positiveInt zero",
                json!({ "resourceType": "Coverage", "status": "active", "beneficiary": { "reference": "Patient/1" },
                        "payor": [{ "display": "x" }], "order": 1,
                        "extension": [{ "url": "http://x", "valueInteger": 1 }],
                        "class": [{ "type": { "text": "t" }, "value": "v" }],
                        "costToBeneficiary": [{ "valueMoney": { "value": 10 } }] ,
                        "contract": [{ "reference": "Contract/1" }], "dependent": "1",
                        "network": "n", "_network": { "id": "n1" },
                        "subrogation": false, "sequence": 0 }),
                vec![],
            ),
            (
                "contained without resourceType, nested contained",
                with(
                    obs(),
                    "/contained",
                    Some(json!([{ "id": "a" }, { "resourceType": "Medication", "id": "m",
                                  "contained": [{ "resourceType": "Substance" }] }])),
                ),
                vec![
                    (Required, vec!["Observation.contained[0].resourceType"]),
                    (Structure, vec!["Observation.contained[1].contained[0]"]),
                ],
            ),
            (
                "bad narrative",
                with(
                    obs(),
                    "/text",
                    Some(json!({ "status": "made-up", "div": "plain text" })),
                ),
                vec![
                    (CodeInvalid, vec!["Observation.text.status"]),
                    (Value, vec!["Observation.text.div"]),
                ],
            ),
        ];
        for (name, resource, expected) in cases {
            let issues = validate(&resource).err().unwrap_or_default();
            assert!(
                issues.iter().all(|i| i.severity == super::super::Severity::Error),
                "{name}"
            );
            let mut got: Vec<(IssueType, Vec<&str>)> = issues
                .iter()
                .map(|i| (i.code, i.expression.iter().map(String::as_str).collect()))
                .collect();
            let mut expected = expected;
            got.sort_by(|a, b| a.1.cmp(&b.1));
            expected.sort_by(|a, b| a.1.cmp(&b.1));
            if name == "positiveInt zero" {
                assert_eq!(got, vec![(Value, vec!["Coverage.sequence"])], "{name}");
                continue;
            }
            assert_eq!(got, expected, "{name}");
        }
    }

    #[test]
    fn stops_after_a_hundred_issues_and_says_so() {
        let names = |n: usize| -> Vec<Value> { (0..n).map(|_| json!({})).collect() };
        let exactly = validate(&json!({ "resourceType": "Patient", "name": names(MAX_ISSUES) })).unwrap_err();
        assert_eq!(exactly.len(), MAX_ISSUES, "no note when nothing was cut");
        let issues = validate(&json!({ "resourceType": "Patient", "name": names(5_000) })).unwrap_err();
        assert_eq!(issues.len(), MAX_ISSUES + 1);
        assert_eq!(issues.last(), Some(&Issue::truncation()));
        assert_eq!(issues[MAX_ISSUES - 1].expression, ["Patient.name[99]"]);
    }

    #[test]
    fn stops_at_its_deadline() {
        let names: Vec<Value> = (0..5_000).map(|_| json!({ "family": "x" })).collect();
        let patient = json!({ "resourceType": "Patient", "name": names });
        assert_eq!(validate(&patient), Ok(()));
        let issues = validate_until(&patient, Instant::now()).unwrap_err();
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].code, IssueType::TooCostly);
        assert_eq!(issues[0].severity, super::super::Severity::Error);
    }

    #[test]
    fn gathers_all_issues() {
        let bad = json!({ "resourceType": "Observation", "id": "", "valueString": "x", "valueBoolean": true,
                          "subject": null, "category": [] });
        let issues = validate(&bad).unwrap_err();
        let codes: Vec<&str> = issues.iter().map(|i| i.code.as_str()).collect();
        assert_eq!(codes.len(), 6, "{issues:?}");
        for code in ["value", "structure", "required"] {
            assert!(codes.contains(&code), "{code}: {codes:?}");
        }
    }

    #[test]
    fn diagnostics_do_not_echo_values() {
        let marker = "ZZMARKER Smith";
        let cases = [
            json!({ "resourceType": "Patient", "birthDate": marker }),
            json!({ "resourceType": "Patient", "id": marker }),
            json!({ "resourceType": "Patient", "active": marker }),
            json!({ "resourceType": "Observation", "status": "final", "code": { "text": marker },
                    "subject": { "reference": marker } }),
            json!({ "resourceType": marker }),
        ];
        for case in cases {
            let issues = validate(&case).unwrap_err();
            for issue in issues {
                assert!(!issue.diagnostics.contains("MARKER"), "{}", issue.diagnostics);
            }
        }
    }

    #[test]
    fn primitive_extension_nulls_and_unknown_elements() {
        let ok = json!({ "resourceType": "Patient",
            "name": [{ "given": ["Bob", null], "_given": [null, { "extension": [{ "url": "http://x", "valueString": "y" }] }] }],
            "_birthDate": { "extension": [{ "url": "http://x", "valueDateTime": "1970-01-01T10:00:00+01:00" }] },
            "someFutureElement": { "anything": "goes" },
            "deceasedBoolean": false,
            "multipleBirthInteger": 2 });
        assert_eq!(validate(&ok), Ok(()));
        let bad = json!({ "resourceType": "Patient", "name": [{ "given": ["Bob", null] }] });
        let issues = validate(&bad).unwrap_err();
        assert_eq!(issues[0].expression, ["Patient.name[0].given[1]"]);
        // Status present only as a primitive extension still counts as present.
        let ext_only = json!({ "resourceType": "Observation", "code": { "text": "x" },
            "_status": { "extension": [{ "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                                           "valueCode": "unknown" }] } });
        assert_eq!(validate(&ext_only), Ok(()));
    }
}
