//! `POST /fhir`: transaction and batch Bundles.
//!
//! A transaction is resolved entirely before anything is written: entries in
//! FHIR order (DELETE, POST, PUT, GET), conditional requests searched, ids
//! assigned ([`Backend::new_id`]), every `fullUrl` mapped to `Type/id` and
//! every reference rewritten. Then one [`Backend::transaction`] call writes it
//! all or nothing. Any entry the gateway or the node cannot honour fails the
//! whole transaction with an `OperationOutcome` naming the entry.
//!
//! A batch runs each entry on its own (in Bundle order), with the same code,
//! and reports each entry's status or `OperationOutcome` in a `batch-response`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use medmesh_node::records::{self, RenderedResource};
use serde_json::Value;

use crate::backend::{Backend, TxFailure, TxOp, TxResult};
use crate::fhir::bundle::{
    BundleKind, EntryResponse, Method, RequestBundle, RequestEntry, response_bundle, rewrite_entry_references,
    searchset, transaction_order,
};
use crate::fhir::outcome::{ApiError, Issue, IssueType};
use crate::fhir::primitive::{DateKind, PartialDateTime};
use crate::fhir::search_params::{SearchRequest, parse_search};
use crate::fhir::validate::check_type;

/// What processing a Bundle needs from the server.
pub(crate) struct Context<'a, B> {
    pub(crate) backend: &'a B,
    pub(crate) base_url: &'a str,
    pub(crate) max_count: usize,
    /// `Prefer: return=minimal`: no resources in write entries' responses.
    pub(crate) minimal: bool,
}

/// Processes a `transaction` or `batch` Bundle, parsed and validated by
/// [`crate::fhir::bundle::parse_request_bundle`]; returns the response Bundle.
///
/// # Errors
/// For a transaction, the first entry that cannot be honoured (its status,
/// issues under `Bundle.entry[i]`).
pub(crate) async fn process<B: Backend>(context: &Context<'_, B>, bundle: RequestBundle) -> Result<Value, ApiError> {
    match bundle {
        RequestBundle::Transaction(entries) => transaction(context, entries).await,
        RequestBundle::Batch(entries) => Ok(batch(context, entries).await),
    }
}

/// How an op's result becomes an entry response.
enum Kind {
    Create,
    Update,
    Delete,
    Read {
        if_none_match: Option<String>,
        /// `ifModifiedSince`, ms since the epoch.
        if_modified_since: Option<i64>,
        head: bool,
    },
    Search {
        request: Box<SearchRequest>,
        head: bool,
    },
}

/// The resolved form of some entries: ops to run, and answers known already.
#[derive(Default)]
struct Plan {
    ops: Vec<TxOp>,
    /// Per op: the entry it serves and how to answer.
    steps: Vec<(usize, Kind)>,
    /// Entries answered without an op (a conditional create that matched, a
    /// conditional delete that matched nothing).
    answered: Vec<(usize, EntryResponse)>,
    /// `fullUrl` → `Type/id`.
    ids: HashMap<String, String>,
    /// Entry position → its `fullUrl`, the base its relative references resolve against.
    full_urls: HashMap<usize, String>,
    /// Keys written (updated or deleted) by an entry so far.
    written: HashSet<String>,
}

impl Plan {
    fn push(&mut self, entry: usize, op: TxOp, kind: Kind) {
        self.ops.push(op);
        self.steps.push((entry, kind));
    }

    fn claim(&mut self, key: String) -> Result<(), ApiError> {
        if self.written.insert(key.clone()) {
            Ok(())
        } else {
            Err(ApiError::InvalidRequest(vec![Issue::error(
                IssueType::Duplicate,
                format!("{key} is changed by more than one entry"),
            )]))
        }
    }

    fn map_full_url(&mut self, entry: &RequestEntry, key: &str) {
        if let Some(full_url) = &entry.full_url {
            self.ids.insert(full_url.clone(), key.to_owned());
        }
    }
}

async fn transaction<B: Backend>(context: &Context<'_, B>, mut entries: Vec<RequestEntry>) -> Result<Value, ApiError> {
    let count = entries.len();
    let mut plan = Plan::default();
    for position in transaction_order(&entries) {
        let Some(entry) = entries.get_mut(position) else {
            continue;
        };
        let index = entry.index;
        resolve(context, entry, &mut plan)
            .await
            .map_err(|e| e.in_entry(index))?;
    }
    rewrite(&mut plan)?;
    check_patients(context, &plan).await?;
    let Plan {
        ops, steps, answered, ..
    } = plan;
    let results = context
        .backend
        .transaction(ops)
        .await
        .map_err(|TxFailure { op, error }| {
            let index = steps.get(op).map_or(op, |(entry, _)| *entry);
            error.in_entry(index)
        })?;
    let mut responses: Vec<EntryResponse> = vec![EntryResponse::default(); count];
    for (position, response) in answered {
        if let Some(slot) = responses.get_mut(position) {
            *slot = response;
        }
    }
    for ((position, kind), result) in steps.into_iter().zip(results) {
        let response = respond(context, kind, result);
        if let Some(slot) = responses.get_mut(position) {
            *slot = response;
        }
    }
    Ok(response_bundle(BundleKind::Transaction, responses))
}

async fn batch<B: Backend>(
    context: &Context<'_, B>,
    entries: Vec<Result<RequestEntry, crate::fhir::bundle::EntryError>>,
) -> Value {
    let mut responses = Vec::with_capacity(entries.len());
    for entry in entries {
        let response = match entry {
            Err(error) => error.response(),
            Ok(mut entry) => {
                let index = entry.index;
                match batch_entry(context, &mut entry).await {
                    Ok(response) => response,
                    Err(error) => {
                        let error = error.in_entry(index);
                        EntryResponse {
                            status: error.status(),
                            outcome: Some(error.outcome()),
                            ..EntryResponse::default()
                        }
                    }
                }
            }
        };
        responses.push(response);
    }
    response_bundle(BundleKind::Batch, responses)
}

/// One batch entry: resolved alone (no references to other entries), run as
/// a transaction of its own.
async fn batch_entry<B: Backend>(
    context: &Context<'_, B>,
    entry: &mut RequestEntry,
) -> Result<EntryResponse, ApiError> {
    let mut plan = Plan::default();
    resolve(context, entry, &mut plan).await?;
    plan.ids.clear();
    rewrite(&mut plan)?;
    check_patients(context, &plan).await?;
    if let Some((_, response)) = plan.answered.pop() {
        return Ok(response);
    }
    let Plan { ops, mut steps, .. } = plan;
    let mut results = context
        .backend
        .transaction(ops)
        .await
        .map_err(|failure| failure.error)?;
    match (steps.pop(), results.pop()) {
        (Some((_, kind)), Some(result)) => Ok(respond(context, kind, result)),
        _ => Err(ApiError::Internal),
    }
}

/// What a conditional create (`If-None-Exist`, `ifNoneExist`) found.
pub(crate) enum ConditionalCreate {
    /// No match: create, with this search re-checked when the write runs.
    Create(SearchRequest),
    /// Exactly one match: answer it (`200`), write nothing.
    Existing(Arc<RenderedResource>),
}

/// Searches for a conditional create; several matches are a `412`.
///
/// # Errors
/// As [`conditional`], and [`ApiError::MultipleMatches`].
pub(crate) async fn conditional_create<B: Backend>(
    context: &Context<'_, B>,
    resource_type: &str,
    query: &str,
) -> Result<ConditionalCreate, ApiError> {
    let (request, mut found) = conditional(context, resource_type, query).await?;
    match found.len() {
        0 => Ok(ConditionalCreate::Create(request)),
        1 => Ok(ConditionalCreate::Existing(found.remove(0))),
        n => Err(multiple("ifNoneExist", n)),
    }
}

/// Creates `resource` unless `request` matches something by the time it is
/// written (then [`ApiError::MultipleMatches`]): a one-op transaction, so the
/// backend re-checks the search under its write.
pub(crate) async fn create_if_none<B: Backend>(
    backend: &B,
    resource: Value,
    request: SearchRequest,
) -> Result<Arc<RenderedResource>, ApiError> {
    let op = TxOp::Create {
        id: backend.new_id(),
        resource,
        if_none_exist: Some(request.query),
    };
    let mut results = backend.transaction(vec![op]).await.map_err(|failure| failure.error)?;
    match results.pop() {
        Some(TxResult::Created(created)) => Ok(created),
        _ => Err(ApiError::Internal),
    }
}

/// Searches for a conditional request: every parameter must be understood (an
/// ignored one would widen the match).
async fn conditional<B: Backend>(
    context: &Context<'_, B>,
    resource_type: &str,
    query: &str,
) -> Result<(SearchRequest, Vec<Arc<RenderedResource>>), ApiError> {
    let request = parse_search(resource_type, query, context.max_count)?;
    if !request.unknown.is_empty() {
        return Err(ApiError::InvalidParam {
            param: request.unknown.join(","),
            reason: "not supported in a conditional request".to_owned(),
        });
    }
    if request.query.is_empty() {
        return Err(ApiError::InvalidParam {
            param: "query".to_owned(),
            reason: "a conditional request needs at least one search parameter".to_owned(),
        });
    }
    let found = context.backend.search(&request).await?;
    Ok((request, found))
}

fn multiple(what: &str, n: usize) -> ApiError {
    ApiError::MultipleMatches(format!("{what} matched {n} resources"))
}

/// Resolves one entry into ops (or an answer) of `plan`.
async fn resolve<B: Backend>(
    context: &Context<'_, B>,
    entry: &mut RequestEntry,
    plan: &mut Plan,
) -> Result<(), ApiError> {
    // Entries are addressed by their Bundle index (for a transaction, also
    // their position in the parsed list: every entry parsed).
    let position = entry.index;
    let resource_type = entry.url.resource_type.clone();
    check_type(&resource_type)?;
    if let Some(full_url) = &entry.full_url {
        plan.full_urls.insert(position, full_url.clone());
    }
    match entry.method {
        Method::Delete => {
            let id = match (&entry.url.id, &entry.url.query) {
                (Some(id), _) => id.clone(),
                (None, Some(query)) => {
                    let (_, found) = conditional(context, &resource_type, query).await?;
                    match found.as_slice() {
                        [] => {
                            plan.answered.push((
                                position,
                                EntryResponse {
                                    status: 204,
                                    ..EntryResponse::default()
                                },
                            ));
                            return Ok(());
                        }
                        [one] => one.id().to_owned(),
                        more => return Err(multiple("conditional delete", more.len())),
                    }
                }
                (None, None) => return Err(ApiError::Internal),
            };
            plan.claim(format!("{resource_type}/{id}"))?;
            plan.push(position, TxOp::Delete { resource_type, id }, Kind::Delete);
        }
        Method::Post => {
            let resource = entry.resource.take().ok_or(ApiError::Internal)?;
            let mut condition = None;
            if let Some(query) = &entry.if_none_exist {
                match conditional_create(context, &resource_type, query).await? {
                    ConditionalCreate::Create(request) => condition = Some(request.query),
                    ConditionalCreate::Existing(existing) => {
                        plan.map_full_url(entry, &existing.key);
                        plan.answered
                            .push((position, existing_response(context, &existing, 200)));
                        return Ok(());
                    }
                }
            }
            let id = context.backend.new_id();
            plan.map_full_url(entry, &format!("{resource_type}/{id}"));
            plan.push(
                position,
                TxOp::Create {
                    id,
                    resource,
                    if_none_exist: condition,
                },
                Kind::Create,
            );
        }
        Method::Put => {
            let resource = entry.resource.take().ok_or(ApiError::Internal)?;
            let explicit = entry.if_match.as_deref().map(parse_etag).transpose()?;
            let id = match (&entry.url.id, &entry.url.query) {
                (Some(id), _) => id.clone(),
                (None, Some(query)) => {
                    let (request, found) = conditional(context, &resource_type, query).await?;
                    match found.as_slice() {
                        [] => {
                            if resource.get("id").is_some() {
                                return Err(ApiError::InvalidRequest(vec![Issue::error(
                                    IssueType::NotSupported,
                                    "conditional update matched nothing and the resource has an id: update-as-create is not supported",
                                )]));
                            }
                            let id = context.backend.new_id();
                            plan.map_full_url(entry, &format!("{resource_type}/{id}"));
                            plan.push(
                                position,
                                TxOp::Create {
                                    id,
                                    resource,
                                    if_none_exist: Some(request.query),
                                },
                                Kind::Create,
                            );
                            return Ok(());
                        }
                        [one] => {
                            if resource
                                .get("id")
                                .and_then(Value::as_str)
                                .is_some_and(|id| id != one.id())
                            {
                                return Err(ApiError::InvalidRequest(vec![Issue::error(
                                    IssueType::Invalid,
                                    "the resource id differs from the resource the conditional update matched",
                                )]));
                            }
                            one.id().to_owned()
                        }
                        more => return Err(multiple("conditional update", more.len())),
                    }
                }
                (None, None) => return Err(ApiError::Internal),
            };
            let mut resource = resource;
            if let Some(obj) = resource.as_object_mut() {
                obj.insert("id".to_owned(), Value::String(id.clone()));
            }
            let key = format!("{resource_type}/{id}");
            plan.claim(key.clone())?;
            plan.map_full_url(entry, &key);
            let body_version = resource
                .pointer("/meta/versionId")
                .and_then(Value::as_str)
                .map(str::to_owned);
            let require_current = explicit.is_some();
            plan.push(
                position,
                TxOp::Update {
                    resource_type,
                    id,
                    resource,
                    base_version: explicit.or(body_version),
                    require_current,
                },
                Kind::Update,
            );
        }
        Method::Get | Method::Head => {
            let head = entry.method == Method::Head;
            match (&entry.url.id, &entry.url.query) {
                (Some(id), _) => {
                    let if_none_match = entry.if_none_match.as_deref().map(parse_etag).transpose()?;
                    let if_modified_since = entry.if_modified_since.as_deref().map(parse_instant).transpose()?;
                    plan.push(
                        position,
                        TxOp::Read {
                            resource_type,
                            id: id.clone(),
                            version_id: entry.url.version.clone(),
                        },
                        Kind::Read {
                            if_none_match,
                            if_modified_since,
                            head,
                        },
                    );
                }
                (None, query) => {
                    let request = parse_search(&resource_type, query.as_deref().unwrap_or(""), context.max_count)?;
                    plan.push(
                        position,
                        TxOp::Search(request.query.clone()),
                        Kind::Search {
                            request: Box::new(request),
                            head,
                        },
                    );
                }
            }
        }
        Method::Patch => {
            return Err(ApiError::InvalidRequest(vec![Issue::error(
                IssueType::NotSupported,
                "PATCH is not supported",
            )]));
        }
    }
    Ok(())
}

/// The version named by an ETag (`W/"vid"` or `"vid"`).
fn parse_etag(raw: &str) -> Result<String, ApiError> {
    let vid = raw.trim().trim_start_matches("W/").trim_matches('"');
    if vid.is_empty() {
        return Err(ApiError::InvalidParam {
            param: "ifMatch".to_owned(),
            reason: "expected W/\"versionId\"".to_owned(),
        });
    }
    Ok(vid.to_owned())
}

/// `ifModifiedSince` (a FHIR instant) as ms since the epoch.
fn parse_instant(raw: &str) -> Result<i64, ApiError> {
    PartialDateTime::parse(raw.trim(), DateKind::Instant)
        .and_then(|p| p.range())
        .and_then(|r| i64::try_from(r.start.unix_timestamp_nanos() / 1_000_000).ok())
        .ok_or_else(|| ApiError::InvalidParam {
            param: "ifModifiedSince".to_owned(),
            reason: "expected a FHIR instant, e.g. 2024-05-01T10:00:00Z".to_owned(),
        })
}

/// Rewrites every reference to a `fullUrl` of the Bundle to its `Type/id`, then
/// fails the first entry still holding a `urn:uuid:`/`urn:oid:` reference
/// (one that names no entry).
fn rewrite(plan: &mut Plan) -> Result<(), ApiError> {
    for (op, (position, _)) in plan.ops.iter_mut().zip(&plan.steps) {
        let (TxOp::Create { resource, .. } | TxOp::Update { resource, .. }) = op else {
            continue;
        };
        if !plan.ids.is_empty() {
            rewrite_entry_references(resource, plan.full_urls.get(position).map(String::as_str), &plan.ids);
        }
        let mut dangling = Vec::new();
        let at = format!("Bundle.entry[{position}].resource");
        unresolved(resource, &mut at.clone(), &mut dangling);
        if !dangling.is_empty() {
            let issues = dangling
                .into_iter()
                .map(|path| {
                    Issue::error(
                        IssueType::NotFound,
                        "a urn: reference names no fullUrl of this Bundle (batch entries cannot reference each other)",
                    )
                    .at(path)
                })
                .collect();
            return Err(ApiError::InvalidRequest(issues).in_entry(*position));
        }
    }
    Ok(())
}

/// Files nothing under a guessed patient (DESIGN §9.8): every Patient-compartment
/// reference of a resource this Bundle writes must name a Patient the Bundle itself
/// writes or one the backend holds, and all of them the same patient; otherwise the
/// entry is a 422 naming its index and `fullUrl`. Run after [`rewrite`], so
/// references between entries already read `Type/id`.
async fn check_patients<B: Backend>(context: &Context<'_, B>, plan: &Plan) -> Result<(), ApiError> {
    // The patient of each Patient written here, as the backend would name it.
    let mut known: HashMap<String, Option<String>> = HashMap::new();
    for op in &plan.ops {
        let (key, resource) = match op {
            TxOp::Create { id, resource, .. } => (format!("{}/{id}", type_of(resource)), resource),
            TxOp::Update {
                resource_type,
                id,
                resource,
                ..
            } => (format!("{resource_type}/{id}"), resource),
            _ => continue,
        };
        if type_of(resource) == "Patient" {
            let patient = records::linked_did(resource).unwrap_or_else(|| key.clone());
            known.insert(key, Some(patient));
        }
    }
    for (op, (position, _)) in plan.ops.iter().zip(&plan.steps) {
        let (TxOp::Create { resource, .. } | TxOp::Update { resource, .. }) = op else {
            continue;
        };
        let mut resolved = Vec::new();
        for link in records::patient_links(resource) {
            let patient = match &link.key {
                None => None,
                Some(key) => match known.get(key) {
                    Some(patient) => patient.clone(),
                    None => {
                        let id = key.strip_prefix("Patient/").unwrap_or(key);
                        let patient = context.backend.patient_of(id).await?;
                        known.insert(key.clone(), patient.clone());
                        patient
                    }
                },
            };
            resolved.push((link, patient));
        }
        if let Err(e) = records::one_patient(resolved) {
            let full_url = plan
                .full_urls
                .get(position)
                .map(|u| format!(" (fullUrl {u})"))
                .unwrap_or_default();
            let text = format!(
                "{}{full_url} {e}: a resource is filed only under the one patient its compartment references name",
                type_of(resource)
            );
            return Err(ApiError::Unprocessable(vec![Issue::error(IssueType::BusinessRule, text)]).in_entry(*position));
        }
    }
    Ok(())
}

fn type_of(resource: &Value) -> &str {
    resource.get("resourceType").and_then(Value::as_str).unwrap_or_default()
}

/// Collects the FHIRPath of every `reference` still starting with `urn:`.
fn unresolved(value: &Value, path: &mut String, out: &mut Vec<String>) {
    match value {
        Value::Object(obj) => {
            for (key, child) in obj {
                let len = path.len();
                path.push('.');
                path.push_str(key);
                if key == "reference"
                    && let Value::String(r) = child
                {
                    if r.starts_with("urn:") {
                        out.push(path.clone());
                    }
                } else {
                    unresolved(child, path, out);
                }
                path.truncate(len);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                unresolved(child, path, out);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

fn existing_response<B>(context: &Context<'_, B>, resource: &RenderedResource, status: u16) -> EntryResponse {
    EntryResponse {
        status,
        location: Some(format!("{}/_history/{}", resource.key, resource.version_id)),
        etag: Some(format!("W/\"{}\"", resource.version_id)),
        last_modified: Some(resource.last_updated.clone()),
        resource: (!context.minimal).then(|| resource.json.clone()),
        outcome: None,
    }
}

fn respond<B>(context: &Context<'_, B>, kind: Kind, result: TxResult) -> EntryResponse {
    match (kind, result) {
        (Kind::Create, TxResult::Created(r)) => existing_response(context, &r, 201),
        (Kind::Update, TxResult::Updated(r) | TxResult::Unchanged(r)) => existing_response(context, &r, 200),
        (Kind::Delete, _) => EntryResponse {
            status: 204,
            ..EntryResponse::default()
        },
        (
            Kind::Read {
                if_none_match,
                if_modified_since,
                head,
            },
            TxResult::Read(r),
        ) => {
            // As over HTTP: ifNoneMatch decides when given, else ifModifiedSince.
            let not_modified = match (if_none_match, if_modified_since) {
                (Some(tag), _) => tag == r.version_id,
                (None, Some(since)) => r.last_updated_ms <= since,
                (None, None) => false,
            };
            if not_modified {
                return EntryResponse {
                    status: 304,
                    etag: Some(format!("W/\"{}\"", r.version_id)),
                    ..EntryResponse::default()
                };
            }
            let mut response = existing_response(context, &r, 200);
            response.location = None;
            response.resource = (!head).then(|| r.json.clone());
            response
        }
        (Kind::Search { request, head }, TxResult::Found(found)) => EntryResponse {
            status: 200,
            resource: (!head).then(|| searchset(context.base_url, &request, &found).build()),
            ..EntryResponse::default()
        },
        _ => {
            tracing::error!("backend returned a result of the wrong kind for a transaction op");
            EntryResponse {
                status: 500,
                outcome: Some(ApiError::Internal.outcome()),
                ..EntryResponse::default()
            }
        }
    }
}
