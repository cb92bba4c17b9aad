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
//!
//! This file owns the walk over the resource ([`validate`] and its checks);
//! the tables that say which primitive type an element has are in
//! `prim.rs`, the tests in `tests.rs`.

use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use super::outcome::{ApiError, Issue, IssueType, MAX_ISSUES};
use super::primitive::{self, DateKind};
use super::types::{self, Rule};

mod prim;
#[cfg(test)]
mod tests;

use prim::{CHOICE_PREFIXES, Prim, choice_split, prim_of};

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
