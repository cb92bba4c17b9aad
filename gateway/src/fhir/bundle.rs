//! Bundles: building `searchset` and `transaction-response`/`batch-response` Bundles,
//! and parsing an incoming `transaction`/`batch` Bundle into typed entries.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use medmesh_node::records::RenderedResource;
use serde_json::{Map, Value, json};

use super::outcome::{ApiError, Issue, IssueType, OperationOutcome, cap_issues};
use super::primitive;
use super::search_params::SearchRequest;
use super::validate::validate;

/// `Bundle.entry.search.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchMode {
    /// The entry matched the search.
    Match,
    /// The entry was included (e.g. by `$everything` or `_include`).
    Include,
    /// The entry is an `OperationOutcome` about the search (e.g. unknown parameters).
    Outcome,
}

impl SearchMode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Match => "match",
            Self::Include => "include",
            Self::Outcome => "outcome",
        }
    }
}

/// Builds a `searchset` Bundle.
#[derive(Debug, Clone, Default)]
pub struct Searchset {
    self_url: String,
    next_url: Option<String>,
    previous_url: Option<String>,
    total: Option<usize>,
    /// The FHIR base that rendered entries' `fullUrl`s start with.
    base_url: String,
    entries: Vec<SearchEntry>,
}

/// An entry of a [`Searchset`]: built JSON, or a node's rendered resource
/// (written out from its cached JSON bytes).
#[derive(Clone)]
enum SearchEntry {
    Json(Value),
    Rendered {
        resource: Arc<RenderedResource>,
        mode: SearchMode,
    },
}

impl std::fmt::Debug for SearchEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print resource content: only keys and sizes.
        match self {
            Self::Json(_) => f.write_str("SearchEntry::Json(..)"),
            Self::Rendered { resource, mode } => f
                .debug_struct("SearchEntry::Rendered")
                .field("key", &resource.key)
                .field("bytes", &resource.bytes.len())
                .field("mode", mode)
                .finish(),
        }
    }
}

impl Searchset {
    /// A searchset whose `self` link is `self_url` (the full request URL) and
    /// whose rendered entries' `fullUrl` is `{base_url}/{type}/{id}`.
    pub fn new(self_url: impl Into<String>, base_url: impl Into<String>) -> Self {
        Self {
            self_url: self_url.into(),
            base_url: base_url.into(),
            ..Self::default()
        }
    }

    /// Sets `Bundle.total`, the number of matches over all pages.
    #[must_use]
    pub fn total(mut self, total: usize) -> Self {
        self.total = Some(total);
        self
    }

    /// Sets the `next` link.
    #[must_use]
    pub fn next(mut self, url: impl Into<String>) -> Self {
        self.next_url = Some(url.into());
        self
    }

    /// Sets the `previous` link.
    #[must_use]
    pub fn previous(mut self, url: impl Into<String>) -> Self {
        self.previous_url = Some(url.into());
        self
    }

    /// Adds a resource with its absolute `fullUrl` (`{base}/{type}/{id}`).
    pub fn push(&mut self, full_url: impl Into<String>, resource: Value, mode: SearchMode) {
        self.entries.push(SearchEntry::Json(json!({
            "fullUrl": full_url.into(),
            "resource": resource,
            "search": { "mode": mode.as_str() },
        })));
    }

    /// Adds a node's rendered resource. [`to_bytes`](Self::to_bytes) copies its
    /// cached JSON into the Bundle as it is: no clone, parse or re-serialization
    /// of the resource (its decimals keep their exact text).
    pub fn push_rendered(&mut self, resource: Arc<RenderedResource>, mode: SearchMode) {
        self.entries.push(SearchEntry::Rendered { resource, mode });
    }

    /// Adds an `OperationOutcome` entry (search mode `outcome`), e.g. warning about
    /// unknown parameters.
    pub fn push_outcome(&mut self, outcome: Value) {
        self.entries.push(SearchEntry::Json(json!({
            "resource": outcome,
            "search": { "mode": SearchMode::Outcome.as_str() },
        })));
    }

    /// The Bundle serialized (compact JSON, the same document as
    /// [`build`](Self::build)), copying rendered resources' bytes as they are.
    pub fn to_bytes(self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out);
        out
    }

    /// Appends [`to_bytes`](Self::to_bytes) to `out` (e.g. a reused buffer).
    pub fn write_to(self, out: &mut Vec<u8>) {
        let mut entries = Vec::new();
        let mut shell = self;
        std::mem::swap(&mut entries, &mut shell.entries);
        let base = json_string(&format!("{}/", shell.base_url));
        // The escaped base without its closing quote: each fullUrl continues it.
        let base = base.strip_suffix('"').unwrap_or(&base).to_owned();
        let head = shell.build().to_string();
        if entries.is_empty() {
            out.extend_from_slice(head.as_bytes());
            return;
        }
        let size: usize = entries
            .iter()
            .map(|e| match e {
                SearchEntry::Rendered { resource, .. } => resource.bytes.len() + base.len() + 96,
                SearchEntry::Json(_) => 256,
            })
            .sum();
        out.reserve(head.len() + size + 16);
        // `build` puts `entry` last: reopen the object before its closing brace.
        out.extend_from_slice(head.trim_end_matches('}').as_bytes());
        out.extend_from_slice(b",\"entry\":[");
        for (i, entry) in entries.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            match entry {
                SearchEntry::Json(value) => {
                    // Writing a Value into a Vec cannot fail.
                    let _ = serde_json::to_writer(&mut *out, value);
                }
                SearchEntry::Rendered { resource, mode } => {
                    out.extend_from_slice(b"{\"fullUrl\":");
                    out.extend_from_slice(base.as_bytes());
                    write_json_string_contents(out, &resource.key);
                    out.extend_from_slice(b"\",\"resource\":");
                    out.extend_from_slice(&resource.bytes);
                    out.extend_from_slice(b",\"search\":{\"mode\":\"");
                    out.extend_from_slice(mode.as_str().as_bytes());
                    out.extend_from_slice(b"\"}}");
                }
            }
        }
        out.extend_from_slice(b"]}");
    }

    /// The Bundle as FHIR JSON.
    pub fn build(self) -> Value {
        let mut bundle = Map::new();
        bundle.insert("resourceType".into(), "Bundle".into());
        bundle.insert("type".into(), "searchset".into());
        if let Some(total) = self.total {
            bundle.insert("total".into(), total.into());
        }
        let mut links = vec![json!({ "relation": "self", "url": self.self_url })];
        if let Some(next) = self.next_url {
            links.push(json!({ "relation": "next", "url": next }));
        }
        if let Some(previous) = self.previous_url {
            links.push(json!({ "relation": "previous", "url": previous }));
        }
        bundle.insert("link".into(), links.into());
        if !self.entries.is_empty() {
            let base = &self.base_url;
            let entries: Vec<Value> = self
                .entries
                .into_iter()
                .map(|e| match e {
                    SearchEntry::Json(value) => value,
                    SearchEntry::Rendered { resource, mode } => json!({
                        "fullUrl": format!("{base}/{}", resource.key),
                        "resource": resource.json.clone(),
                        "search": { "mode": mode.as_str() },
                    }),
                })
                .collect();
            bundle.insert("entry".into(), entries.into());
        }
        Value::Object(bundle)
    }
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

/// Appends `s` escaped as the inside of a JSON string literal (no quotes).
/// Resource keys are `[A-Za-z]+/[A-Za-z0-9.-]+`, so this is a plain copy but
/// for a key that somehow is not.
fn write_json_string_contents(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.extend_from_slice(s.as_bytes());
    } else {
        let quoted = json_string(s);
        let inner = quoted.strip_prefix('"').and_then(|q| q.strip_suffix('"'));
        out.extend_from_slice(inner.unwrap_or_default().as_bytes());
    }
}

/// Whether a Bundle is processed atomically or entry by entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleKind {
    /// `transaction`: all entries succeed or none.
    Transaction,
    /// `batch`: each entry on its own.
    Batch,
}

impl BundleKind {
    fn response_type(self) -> &'static str {
        match self {
            Self::Transaction => "transaction-response",
            Self::Batch => "batch-response",
        }
    }
}

/// The outcome of one entry of a transaction or batch (`Bundle.entry.response`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EntryResponse {
    /// HTTP status, rendered with its reason phrase (`201 Created`).
    pub status: u16,
    /// `Location`, e.g. `Patient/123/_history/abc`.
    pub location: Option<String>,
    /// `ETag`, e.g. `W/"abc"`.
    pub etag: Option<String>,
    /// `Last-Modified` as a FHIR instant.
    pub last_modified: Option<String>,
    /// The resource, when returned (`Prefer: return=representation`, GET entries).
    pub resource: Option<Value>,
    /// An `OperationOutcome` for a failed batch entry.
    pub outcome: Option<Value>,
}

/// The reason phrase for the statuses the gateway uses.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        410 => "Gone",
        412 => "Precondition Failed",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        _ => "Internal Server Error",
    }
}

/// Builds a `transaction-response` or `batch-response` Bundle, one entry per request
/// entry, in the request's order.
pub fn response_bundle(kind: BundleKind, entries: Vec<EntryResponse>) -> Value {
    let entries: Vec<Value> = entries
        .into_iter()
        .map(|e| {
            let mut response = Map::new();
            response.insert(
                "status".into(),
                format!("{} {}", e.status, reason_phrase(e.status)).into(),
            );
            for (key, value) in [
                ("location", e.location),
                ("etag", e.etag),
                ("lastModified", e.last_modified),
            ] {
                if let Some(v) = value {
                    response.insert(key.into(), v.into());
                }
            }
            if let Some(outcome) = e.outcome {
                response.insert("outcome".into(), outcome);
            }
            let mut entry = Map::new();
            if let Some(resource) = e.resource {
                entry.insert("resource".into(), resource);
            }
            entry.insert("response".into(), Value::Object(response));
            Value::Object(entry)
        })
        .collect();
    let mut bundle = Map::new();
    bundle.insert("resourceType".into(), "Bundle".into());
    bundle.insert("type".into(), kind.response_type().into());
    if !entries.is_empty() {
        bundle.insert("entry".into(), entries.into());
    }
    Value::Object(bundle)
}

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
            outcome: Some(super::outcome::OperationOutcome::from_issues(self.issues.clone()).to_value()),
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

/// Splits a RESTful reference or URL (`[root]Type/id[/_history/vid]`) into its root
/// (empty for a relative reference, else ending in `/`) and `Type/id`, dropping any
/// version; `None` for anything else (`urn:`, `#contained`, a query).
fn restful(url: &str) -> Option<(&str, &str)> {
    if url.contains(['?', '#']) {
        return None;
    }
    let path = match url.find("/_history/") {
        Some(at) => url.get(..at)?,
        None => url,
    };
    let (rest, id) = path.rsplit_once('/')?;
    let (root, resource_type) = match rest.rsplit_once('/') {
        Some((root, t)) => (url.get(..=root.len())?, t),
        None => ("", rest),
    };
    let relative_ok = root.is_empty() || root.contains("://");
    (relative_ok && primitive::is_type_name(resource_type) && primitive::is_id(id))
        .then(|| (root, path.get(root.len()..).unwrap_or_default()))
}

/// The `fullUrl` of the Bundle entry that `reference`, found in the entry whose
/// `fullUrl` is `entry_full_url`, points to, following FHIR R4's rules for resolving
/// references in Bundles (<https://hl7.org/fhir/R4/bundle.html#references>): a
/// `urn:uuid:`/`urn:oid:` or absolute reference matches a `fullUrl` as it is
/// (an absolute one without its `/_history/…`); a relative `Type/id` is first made
/// absolute against the root of the entry's own RESTful `fullUrl` (a relative
/// reference in an entry without one names a resource of this server). `None`
/// when no entry matches.
pub fn resolve_in_bundle(
    reference: &str,
    entry_full_url: Option<&str>,
    is_full_url: impl Fn(&str) -> bool,
) -> Option<String> {
    if reference.starts_with("urn:") {
        return is_full_url(reference).then(|| reference.to_owned());
    }
    let (root, key) = restful(reference)?;
    let absolute = if root.is_empty() {
        let (entry_root, _) = restful(entry_full_url?)?;
        if entry_root.is_empty() {
            return None;
        }
        format!("{entry_root}{key}")
    } else {
        format!("{root}{key}")
    };
    is_full_url(&absolute).then_some(absolute)
}

/// Replaces every `Reference.reference` in `resource` that is a key of `map` (e.g. a
/// transaction's `urn:uuid:` fullUrls) by its value (e.g. `Patient/123`). Returns how
/// many references were rewritten. See [`rewrite_entry_references`] for references
/// relative to the entry's own `fullUrl`.
pub fn rewrite_references(resource: &mut Value, map: &HashMap<String, String>) -> usize {
    rewrite_entry_references(resource, None, map)
}

/// Replaces every `Reference.reference` in `resource`, the resource of the entry whose
/// `fullUrl` is `full_url`, that resolves to a `fullUrl` of the Bundle
/// ([`resolve_in_bundle`]) by the value `map` holds for that `fullUrl` (e.g.
/// `Patient/123`, the id the transaction assigned). Returns how many references were
/// rewritten.
pub fn rewrite_entry_references(resource: &mut Value, full_url: Option<&str>, map: &HashMap<String, String>) -> usize {
    match resource {
        Value::Object(obj) => {
            let mut n = 0;
            for (key, value) in obj.iter_mut() {
                if key == "reference"
                    && let Value::String(r) = value
                {
                    if let Some(new) = resolve_in_bundle(r, full_url, |u| map.contains_key(u)).and_then(|u| map.get(&u))
                    {
                        *r = new.clone();
                        n += 1;
                    }
                } else {
                    n += rewrite_entry_references(value, full_url, map);
                }
            }
            n
        }
        Value::Array(items) => items
            .iter_mut()
            .map(|v| rewrite_entry_references(v, full_url, map))
            .sum(),
        _ => 0,
    }
}

/// One page of a search's matches as a `searchset` Bundle, with `next`
/// link and a warning for every ignored parameter.
pub fn searchset(base: &str, request: &SearchRequest, matches: &[Arc<RenderedResource>]) -> Searchset {
    let resource_type = &request.resource_type;
    let page = |offset: usize| format!("{base}/{resource_type}?{}", request.page_query(offset));
    let mut bundle = Searchset::new(page(request.page.offset), base).total(matches.len());
    if let Some(next) = request.page.next_offset(matches.len()) {
        bundle = bundle.next(page(next));
    }
    let mut bundle = bundle;
    for resource in request.page.of(matches) {
        bundle.push_rendered(Arc::clone(resource), SearchMode::Match);
    }
    if !request.unknown.is_empty() {
        let outcome = OperationOutcome::from_issues(request.unknown.iter().map(|name| {
            Issue::warning(
                IssueType::NotSupported,
                format!("search parameter {name} is not supported and was ignored"),
            )
        }));
        bundle.push_outcome(outcome.to_value());
    }
    bundle
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::fhir::outcome::OperationOutcome;

    const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fhir/examples");

    fn read(name: &str) -> Value {
        let text = std::fs::read_to_string(format!("{EXAMPLES}/{name}")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn expressions(err: &ApiError) -> Vec<String> {
        err.issues().into_iter().flat_map(|i| i.expression).collect()
    }

    /// FHIR's own example of reference resolution in a Bundle
    /// (<https://hl7.org/fhir/R4/bundle-references.json.html>), entry by entry.
    #[test]
    fn references_resolve_by_the_full_url_rules() {
        let bundle = read("Bundle-bundle-references.json");
        let entries = bundle["entry"].as_array().unwrap();
        let full_urls: HashSet<&str> = entries.iter().filter_map(|e| e["fullUrl"].as_str()).collect();
        let resolve = |entry: usize| {
            let e = &entries[entry];
            let mut refs = Vec::new();
            collect_references(&e["resource"], &mut refs);
            assert_eq!(refs.len(), 1, "case entry {entry}");
            resolve_in_bundle(&refs[0], e["fullUrl"].as_str(), |u| full_urls.contains(u))
        };
        let patient_23 = Some("http://example.org/fhir/Patient/23".to_owned());
        // Relative, against the entry's own base.
        assert_eq!(resolve(2), patient_23, "case relative");
        // Absolute, equal to a fullUrl.
        assert_eq!(resolve(3), patient_23, "case absolute");
        // urn:uuid.
        assert_eq!(
            resolve(4).as_deref(),
            Some("urn:uuid:04121321-4af5-424c-a0e1-ed3aab1c349d"),
            "case urn"
        );
        // Absolute, on another server: not in the Bundle.
        assert_eq!(resolve(5), None, "case other server");
        // Relative in an entry of another server: that server's Patient/23, not entry 0.
        assert_eq!(resolve(6), None, "case relative on another base");
        // Versioned: matched without the version.
        assert_eq!(
            resolve(9).as_deref(),
            Some("http://example.org/fhir/Patient/45"),
            "case versioned"
        );
        // No fullUrl: a relative reference names a resource of this server.
        assert_eq!(resolve_in_bundle("Patient/23", None, |u| full_urls.contains(u)), None);
        assert_eq!(resolve_in_bundle("#p1", None, |u| full_urls.contains(u)), None);
    }

    fn collect_references(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(obj) => {
                for (k, v) in obj {
                    match (k.as_str(), v) {
                        ("reference", Value::String(r)) => out.push(r.clone()),
                        _ => collect_references(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| collect_references(v, out)),
            _ => {}
        }
    }

    #[test]
    fn synthea_transaction_parses_and_references_rewrite() {
        let RequestBundle::Transaction(mut entries) =
            parse_request_bundle(read("Bundle-synthea-Brekke496.json")).unwrap()
        else {
            panic!("not a transaction")
        };
        assert_eq!(entries.len(), 319);
        assert!(entries.iter().all(|e| e.method == Method::Post && e.url.id.is_none()));
        let map: HashMap<String, String> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.full_url.clone().unwrap(), format!("{}/id{i}", e.url.resource_type)))
            .collect();
        let rewritten: usize = entries
            .iter_mut()
            .map(|e| rewrite_references(e.resource.as_mut().unwrap(), &map))
            .sum();
        assert!(rewritten > 300, "{rewritten}");
        for e in &entries {
            let text = e.resource.as_ref().unwrap().to_string();
            assert!(!text.contains("\"reference\":\"urn:uuid:"), "entry {}", e.index);
        }
    }

    #[test]
    fn hl7_transaction_example() {
        let bundle = read("Bundle-bundle-transaction.json");
        // Entry 7 is `POST ValueSet/$lookup`: operations are not supported, so the
        // transaction fails as a whole and the issue names the entry.
        let err = parse_request_bundle(bundle.clone()).unwrap_err();
        assert_eq!(err.status(), 400);
        assert_eq!(expressions(&err), ["Bundle.entry[7].request.url"]);
        assert!(err.issues()[0].diagnostics.starts_with("entry 7:"));

        let mut batch = bundle.clone();
        batch["type"] = "batch".into();
        let RequestBundle::Batch(entries) = parse_request_bundle(batch).unwrap() else {
            panic!("not a batch")
        };
        assert_eq!(entries.len(), 10);
        let failed: Vec<usize> = entries
            .iter()
            .filter_map(|e| e.as_ref().err().map(|e| e.index))
            .collect();
        assert_eq!(failed, [7]);
        let e = |i: usize| entries[i].as_ref().unwrap();
        assert_eq!(
            e(1).if_none_exist.as_deref(),
            Some("identifier=http:/example.org/fhir/ids|234234")
        );
        assert_eq!((e(2).method, e(2).url.id.as_deref()), (Method::Put, Some("123")));
        assert_eq!(
            e(3).url.query.as_deref(),
            Some("identifier=http:/example.org/fhir/ids|456456")
        );
        assert_eq!(e(4).if_match.as_deref(), Some("W/\"2\""));
        assert_eq!((e(5).method, e(5).url.id.as_deref()), (Method::Delete, Some("234")));
        assert_eq!(e(6).url.query.as_deref(), Some("identifier=123456"));
        assert_eq!(e(8).url.query.as_deref(), Some("name=peter"));
        assert_eq!(e(9).if_none_match.as_deref(), Some("W/\"4\""));
        let response = entries[7].as_ref().unwrap_err().response();
        assert_eq!(response.status, 400);

        let mut tx = bundle;
        tx["entry"].as_array_mut().unwrap().remove(7);
        let RequestBundle::Transaction(entries) = parse_request_bundle(tx).unwrap() else {
            panic!("not a transaction")
        };
        let methods: Vec<Method> = transaction_order(&entries).iter().map(|&i| entries[i].method).collect();
        assert_eq!(
            methods,
            [
                Method::Delete,
                Method::Delete,
                Method::Post,
                Method::Post,
                Method::Put,
                Method::Put,
                Method::Put,
                Method::Get,
                Method::Get
            ]
        );
    }

    #[test]
    fn entry_errors_name_the_entry() {
        let tx = |entries: Value| json!({ "resourceType": "Bundle", "type": "transaction", "entry": entries });
        let obs = json!({ "resourceType": "Observation", "code": { "text": "x" } });
        let cases: Vec<(Value, u16, Vec<&str>)> = vec![
            (
                tx(json!([{ "request": { "method": "POST", "url": "Observation" }, "resource": obs }])),
                422,
                vec!["Bundle.entry[0].resource.status"],
            ),
            (
                tx(json!([{ "request": { "method": "GET", "url": "Patient/1" } }, { "resource": obs }])),
                400,
                vec!["Bundle.entry[1].request"],
            ),
            (
                tx(json!([{ "request": { "method": "POST", "url": "Patient" }, "resource": obs }])),
                400,
                vec!["Bundle.entry[0].request.url", "Bundle.entry[0].resource.status"],
            ),
            (
                tx(json!([{ "request": { "method": "FETCH", "url": "Patient/1" } }])),
                400,
                vec!["Bundle.entry[0].request.method"],
            ),
            (
                tx(json!([
                    { "fullUrl": "urn:uuid:5cbc121b-cd71-4428-b8b7-31e53eba8184", "request": { "method": "GET", "url": "Patient/1" } },
                    { "fullUrl": "urn:uuid:5cbc121b-cd71-4428-b8b7-31e53eba8184", "request": { "method": "GET", "url": "Patient/2" } },
                    { "fullUrl": "not a url", "request": { "method": "DELETE", "url": "Patient" } }
                ])),
                400,
                vec![
                    "Bundle.entry[1].fullUrl",
                    "Bundle.entry[2].fullUrl",
                    "Bundle.entry[2].request.url",
                ],
            ),
            (
                tx(json!([{ "request": { "method": "PUT", "url": "Patient/1" },
                            "resource": { "resourceType": "Patient", "id": "2" } }])),
                400,
                vec!["Bundle.entry[0].resource.id"],
            ),
            (
                json!({ "resourceType": "Bundle", "type": "collection" }),
                400,
                vec!["Bundle.type"],
            ),
            (
                json!({ "resourceType": "Patient" }),
                400,
                vec!["resourceType", "Bundle.type"],
            ),
        ];
        for (i, (bundle, status, expected)) in cases.into_iter().enumerate() {
            let err = parse_request_bundle(bundle).unwrap_err();
            assert_eq!(err.status(), status, "case {i}: {err:?}");
            assert_eq!(expressions(&err), expected, "case {i}");
        }
        assert!(matches!(
            parse_request_bundle(json!({ "resourceType": "Bundle", "type": "batch" })),
            Ok(RequestBundle::Batch(e)) if e.is_empty()
        ));
    }

    #[test]
    fn built_bundles() {
        let mut s = Searchset::new("http://h/fhir/Observation?patient=1&_count=1", "http://h/fhir")
            .total(2)
            .next("http://h/fhir/Observation?patient=1&_count=1&_offset=1");
        s.push(
            "http://h/fhir/Observation/a",
            json!({ "resourceType": "Observation", "id": "a" }),
            SearchMode::Match,
        );
        s.push_outcome(OperationOutcome::new().to_value());
        let b = s.build();
        assert_eq!(b["type"], "searchset");
        assert_eq!(b["total"], 2);
        assert_eq!(b["link"][1]["relation"], "next");
        assert_eq!(b["entry"][0]["search"]["mode"], "match");
        assert_eq!(b["entry"][1]["search"]["mode"], "outcome");
        assert!(Searchset::new("x", "b").build().get("entry").is_none());
        assert_eq!(
            Searchset::new("x", "b").to_bytes(),
            Searchset::new("x", "b").build().to_string().into_bytes()
        );

        // A rendered resource is written from its cached bytes, decimals as they were.
        let mut doc = medmesh_node::records::RecordDoc::new();
        let actor = medmesh_node::records::actor_id(&[1; 32], [0; 8]);
        let resource: Value =
            serde_json::from_str(r#"{"resourceType":"Observation","valueQuantity":{"value":1.50}}"#).unwrap();
        let rendered = doc.create(&actor, 1, "a", &resource).unwrap().resource.unwrap();
        let mut raw = Searchset::new("http://h/fhir/Observation", "http://h/\"fhir").total(2);
        raw.push_rendered(rendered, SearchMode::Include);
        raw.push(
            "http://h/fhir/Observation/b",
            json!({ "resourceType": "Observation", "id": "b" }),
            SearchMode::Match,
        );
        raw.push_outcome(OperationOutcome::new().to_value());
        let bytes = raw.clone().to_bytes();
        let parsed: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(parsed, raw.build());
        assert_eq!(parsed["entry"][0]["fullUrl"], "http://h/\"fhir/Observation/a");
        assert!(String::from_utf8(bytes).unwrap().contains("\"value\":1.50"));

        let r = response_bundle(
            BundleKind::Transaction,
            vec![EntryResponse {
                status: 201,
                location: Some("Patient/1/_history/v1".into()),
                etag: Some("W/\"v1\"".into()),
                ..EntryResponse::default()
            }],
        );
        assert_eq!(r["type"], "transaction-response");
        assert_eq!(r["entry"][0]["response"]["status"], "201 Created");
        assert_eq!(response_bundle(BundleKind::Batch, vec![])["type"], "batch-response");
    }
}
