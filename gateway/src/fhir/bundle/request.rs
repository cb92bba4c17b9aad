//! Parsing an incoming `transaction` or `batch` Bundle into typed
//! [`RequestEntry`]s (each resource validated), and the order a transaction's
//! entries are processed in.

use std::collections::HashSet;

use serde_json::{Map, Value};

use super::{BundleKind, EntryResponse};
use crate::fhir::outcome::{ApiError, Issue, IssueType, cap_issues};
use crate::fhir::primitive;
use crate::fhir::validate::validate;

/// `Bundle.entry.request.method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// Read, vread or search.
    Get,
    /// Like GET, without a body.
    Head,
    /// Create.
    Post,
    /// Update (or conditional update).
    Put,
    /// Delete (or conditional delete).
    Delete,
    /// Patch.
    Patch,
}

impl Method {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "GET" => Self::Get,
            "HEAD" => Self::Head,
            "POST" => Self::Post,
            "PUT" => Self::Put,
            "DELETE" => Self::Delete,
            "PATCH" => Self::Patch,
            _ => return None,
        })
    }

    /// The order FHIR processes a transaction in: DELETE, POST, PUT/PATCH, GET/HEAD.
    pub fn transaction_rank(self) -> u8 {
        match self {
            Self::Delete => 0,
            Self::Post => 1,
            Self::Put | Self::Patch => 2,
            Self::Get | Self::Head => 3,
        }
    }
}

/// What `Bundle.entry.request.url` addresses, relative to the FHIR base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryUrl {
    /// The resource type (first segment).
    pub resource_type: String,
    /// The id, for `Type/id[...]`.
    pub id: Option<String>,
    /// The version, for `Type/id/_history/vid`.
    pub version: Option<String>,
    /// The query after `?` (search, conditional update/delete), still encoded.
    pub query: Option<String>,
}

/// One parsed request entry of a transaction or batch.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestEntry {
    /// Position in `Bundle.entry` (0-based).
    pub index: usize,
    /// `fullUrl`, e.g. `urn:uuid:…` that other entries reference.
    pub full_url: Option<String>,
    /// The HTTP method.
    pub method: Method,
    /// The parsed `request.url`.
    pub url: EntryUrl,
    /// `request.ifNoneExist` (conditional create query).
    pub if_none_exist: Option<String>,
    /// `request.ifMatch` (ETag the update is based on).
    pub if_match: Option<String>,
    /// `request.ifNoneMatch`.
    pub if_none_match: Option<String>,
    /// `request.ifModifiedSince`.
    pub if_modified_since: Option<String>,
    /// The resource (POST, PUT), validated.
    pub resource: Option<Value>,
}

/// A batch entry that cannot be processed: its index, status and issues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryError {
    /// Position in `Bundle.entry` (0-based).
    pub index: usize,
    /// 400 for a malformed request, 422 for an invalid resource.
    pub status: u16,
    /// What is wrong, with expressions under `Bundle.entry[index]`.
    pub issues: Vec<Issue>,
}

impl EntryError {
    /// The entry's response: its status and an `OperationOutcome`.
    pub fn response(&self) -> EntryResponse {
        EntryResponse {
            status: self.status,
            outcome: Some(crate::fhir::outcome::OperationOutcome::from_issues(self.issues.clone()).to_value()),
            ..EntryResponse::default()
        }
    }
}

/// A parsed incoming Bundle for `POST /fhir`.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestBundle {
    /// A transaction: every entry parsed and valid.
    Transaction(Vec<RequestEntry>),
    /// A batch: each entry parsed, or the reason it fails (to answer in its response).
    Batch(Vec<Result<RequestEntry, EntryError>>),
}

/// Parses and validates a `transaction` or `batch` Bundle.
///
/// Resources of POST and PUT entries are validated with [`validate`]. Issue
/// expressions point into the Bundle (`Bundle.entry[3].resource.status`) and
/// diagnostics start with `entry 3:`.
///
/// # Errors
///
/// 400 ([`ApiError::InvalidRequest`]) if the Bundle is not a transaction or batch or, for
/// a transaction, any entry's request is malformed; 422 ([`ApiError::Unprocessable`]) if
/// a transaction's requests are fine but a resource is invalid. A batch fails only as a
/// whole Bundle; its entries' errors are returned in [`RequestBundle::Batch`].
pub fn parse_request_bundle(bundle: Value) -> Result<RequestBundle, ApiError> {
    let Value::Object(mut bundle) = bundle else {
        return Err(ApiError::MalformedBody("the body must be a JSON object".into()));
    };
    let mut issues = Vec::new();
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        issues.push(
            Issue::error(
                IssueType::NotSupported,
                "POST to the base takes a transaction or batch Bundle",
            )
            .at("resourceType"),
        );
    }
    let kind = match bundle.get("type").and_then(Value::as_str) {
        Some("transaction") => Some(BundleKind::Transaction),
        Some("batch") => Some(BundleKind::Batch),
        Some(_) => {
            issues.push(
                Issue::error(IssueType::NotSupported, "Bundle.type must be transaction or batch").at("Bundle.type"),
            );
            None
        }
        None => {
            issues.push(Issue::error(IssueType::Required, "Bundle.type is required").at("Bundle.type"));
            None
        }
    };
    let entries = match bundle.remove("entry") {
        None => Vec::new(),
        Some(Value::Array(entries)) if !entries.is_empty() => entries,
        Some(_) => {
            issues
                .push(Issue::error(IssueType::Structure, "Bundle.entry must be a non-empty array").at("Bundle.entry"));
            Vec::new()
        }
    };
    let Some(kind) = kind.filter(|_| issues.is_empty()) else {
        return Err(ApiError::InvalidRequest(issues));
    };
    let mut seen_full_urls = HashSet::new();
    let parsed: Vec<Result<RequestEntry, EntryError>> = entries
        .into_iter()
        .enumerate()
        .map(|(index, entry)| parse_entry(index, entry, &mut seen_full_urls))
        .collect();
    match kind {
        BundleKind::Batch => Ok(RequestBundle::Batch(parsed)),
        BundleKind::Transaction => {
            let mut status = 422;
            let mut ok = Vec::with_capacity(parsed.len());
            for entry in parsed {
                match entry {
                    Ok(e) => ok.push(e),
                    Err(e) => {
                        if e.status == 400 {
                            status = 400;
                        }
                        issues.extend(e.issues);
                    }
                }
            }
            let issues = cap_issues(issues);
            match (issues.is_empty(), status) {
                (true, _) => Ok(RequestBundle::Transaction(ok)),
                (false, 400) => Err(ApiError::InvalidRequest(issues)),
                (false, _) => Err(ApiError::Unprocessable(issues)),
            }
        }
    }
}

/// Re-roots a resource-level expression (`Observation.status`) under `prefix`.
fn reroot(expression: &str, prefix: &str) -> String {
    if expression == "resourceType" {
        return format!("{prefix}.resourceType");
    }
    match expression.split_once('.') {
        Some((_, rest)) => format!("{prefix}.{rest}"),
        None => prefix.to_owned(),
    }
}

fn parse_entry(index: usize, entry: Value, seen: &mut HashSet<String>) -> Result<RequestEntry, EntryError> {
    let at = format!("Bundle.entry[{index}]");
    let mut issues = Vec::new();
    let mut bad = |code: IssueType, path: &str, text: &str| {
        issues.push(Issue::error(code, format!("entry {index}: {text}")).at(path));
    };
    let Value::Object(mut entry) = entry else {
        bad(IssueType::Structure, &at, "an entry must be a JSON object");
        return Err(EntryError {
            index,
            status: 400,
            issues,
        });
    };
    let full_url = match entry.get("fullUrl") {
        None => None,
        Some(Value::String(u)) if primitive::is_absolute_uri(u) => {
            if !seen.insert(u.clone()) {
                bad(
                    IssueType::Invalid,
                    &format!("{at}.fullUrl"),
                    "fullUrl is used by an earlier entry",
                );
            }
            Some(u.clone())
        }
        Some(_) => {
            bad(
                IssueType::Value,
                &format!("{at}.fullUrl"),
                "fullUrl must be an absolute URL or urn:uuid:/urn:oid:",
            );
            None
        }
    };
    let resource = entry.remove("resource");
    let req_at = format!("{at}.request");
    let empty = Map::new();
    let request = match entry.get("request") {
        Some(Value::Object(r)) => r,
        Some(_) => {
            bad(IssueType::Structure, &req_at, "request must be an object");
            &empty
        }
        None => {
            bad(IssueType::Required, &req_at, "request is required");
            &empty
        }
    };
    let text = |key: &str| request.get(key).and_then(Value::as_str).map(str::to_owned);
    let method = match request.get("method").and_then(Value::as_str) {
        Some(m) => Method::parse(m).or_else(|| {
            bad(
                IssueType::CodeInvalid,
                &format!("{req_at}.method"),
                "request.method must be GET, HEAD, POST, PUT, DELETE or PATCH",
            );
            None
        }),
        None if request.is_empty() => None,
        None => {
            bad(
                IssueType::Required,
                &format!("{req_at}.method"),
                "request.method is required",
            );
            None
        }
    };
    let url = match text("url") {
        Some(u) => parse_url(&u)
            .map_err(|why| bad(IssueType::Value, &format!("{req_at}.url"), why))
            .ok(),
        None if request.is_empty() => None,
        None => {
            bad(IssueType::Required, &format!("{req_at}.url"), "request.url is required");
            None
        }
    };
    let res_at = format!("{at}.resource");
    if let (Some(method), Some(url)) = (method, url.as_ref()) {
        let url_at = format!("{req_at}.url");
        match method {
            Method::Patch => bad(IssueType::NotSupported, &req_at, "PATCH is not supported"),
            Method::Post if url.id.is_some() || url.query.is_some() => {
                bad(IssueType::Value, &url_at, "POST takes the resource type as url")
            }
            Method::Put | Method::Delete if url.id.is_none() && url.query.is_none() => bad(
                IssueType::Value,
                &url_at,
                "PUT and DELETE need Type/id or a conditional Type?query",
            ),
            Method::Put | Method::Delete if url.version.is_some() => {
                bad(IssueType::Value, &url_at, "PUT and DELETE do not take a version")
            }
            _ => {}
        }
        if matches!(method, Method::Post | Method::Put) {
            match &resource {
                None => bad(IssueType::Required, &res_at, "POST and PUT entries need a resource"),
                Some(r) => {
                    let rt = r.get("resourceType").and_then(Value::as_str);
                    if rt.is_some_and(|t| t != url.resource_type) {
                        bad(
                            IssueType::Invalid,
                            &url_at,
                            "the resource type differs from request.url",
                        );
                    }
                    if method == Method::Put
                        && url.id.is_some()
                        && r.get("id").and_then(Value::as_str) != url.id.as_deref()
                    {
                        bad(
                            IssueType::Invalid,
                            &format!("{res_at}.id"),
                            "the resource id must equal the id in request.url",
                        );
                    }
                }
            }
        }
    }
    // Request problems are 400; resource problems alone are 422.
    let status = if issues.is_empty() { 422 } else { 400 };
    // The resource is validated once the request says what it is for.
    if let (Some(Method::Post | Method::Put), true, Some(r)) = (method, url.is_some(), &resource)
        && let Err(found) = validate(r)
    {
        issues.extend(found.into_iter().map(|mut issue| {
            issue.diagnostics = format!("entry {index}: {}", issue.diagnostics);
            issue.expression = issue.expression.iter().map(|e| reroot(e, &res_at)).collect();
            issue
        }));
    }
    match (method, url) {
        (Some(method), Some(url)) if issues.is_empty() => Ok(RequestEntry {
            index,
            full_url,
            method,
            url,
            if_none_exist: text("ifNoneExist"),
            if_match: text("ifMatch"),
            if_none_match: text("ifNoneMatch"),
            if_modified_since: text("ifModifiedSince"),
            resource,
        }),
        _ => Err(EntryError { index, status, issues }),
    }
}

/// Parses a relative `request.url`: `Type`, `Type/id`, `Type/id/_history/vid`, each
/// optionally with `?query`. Operations (`$op`) are not supported.
fn parse_url(url: &str) -> Result<EntryUrl, &'static str> {
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p, Some(q.to_owned())),
        None => (url, None),
    };
    if path.contains('$') {
        return Err("operations in a transaction or batch are not supported");
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (ty, id, version) = match segments.as_slice() {
        [ty] => (*ty, None, None),
        [ty, id] => (*ty, Some(*id), None),
        [ty, id, "_history", vid] => (*ty, Some(*id), Some(*vid)),
        _ => return Err("request.url must be Type, Type/id or Type/id/_history/vid, relative to the base"),
    };
    if !primitive::is_type_name(ty) {
        return Err("request.url must start with a resource type");
    }
    if id.is_some_and(|i| !primitive::is_id(i)) || version.is_some_and(|v| !primitive::is_id(v)) {
        return Err("request.url has an invalid id or version");
    }
    if query.as_deref() == Some("") {
        return Err("request.url has an empty query");
    }
    Ok(EntryUrl {
        resource_type: ty.to_owned(),
        id: id.map(str::to_owned),
        version: version.map(str::to_owned),
        query,
    })
}

/// The order to process transaction entries in (indexes into `entries`): DELETE, POST,
/// PUT/PATCH, GET/HEAD, keeping the Bundle order within each.
pub fn transaction_order(entries: &[RequestEntry]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by_key(|&i| entries.get(i).map(|e| e.method.transaction_rank()));
    order
}
