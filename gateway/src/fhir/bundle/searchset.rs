//! `searchset` Bundles: [`Searchset`] builds one, writing rendered resources
//! out from their cached JSON bytes; [`searchset()`] pages a search's matches.

use std::sync::Arc;

use medmesh_node::records::RenderedResource;
use serde_json::{Map, Value, json};

use crate::fhir::outcome::{Issue, IssueType, OperationOutcome};
use crate::fhir::search_params::SearchRequest;

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
