//! The FHIR REST handlers: create (also conditional), read and vread (with
//! conditional reads), update, delete, history, `$everything`, search, the
//! read-only `Consent`/`AuditEvent` views, and transaction/batch Bundles.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use medmesh_node::records::RenderedResource;
use serde_json::{Value, json};

use super::api::required_patient;
use super::body::{Return, if_match, parse_json, prefer, prefers_minimal, read_json_bytes, resource_response};
use super::{AppState, Shared};
use crate::backend::{Backend, HistoryEntry};
use crate::fhir::bundle::{SearchMode, Searchset, parse_request_bundle, searchset};
use crate::fhir::outcome::{ApiError, Issue, IssueType, OperationOutcome, fhir_response};
use crate::fhir::search_params::{Page, parse_search};
use crate::fhir::validate::check_type;

pub(super) async fn system_interaction<B: Backend>(
    State(state): Shared<B>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_json_bytes(&headers, body, state.config.body_limit).await?;
    let bundle = state
        .off_thread(bytes.len(), move || parse_request_bundle(parse_json(&bytes)?))
        .await?;
    let context = crate::transaction::Context {
        backend: state.backend.as_ref(),
        base_url: &state.config.base_url,
        max_count: state.config.max_count,
        minimal: prefers_minimal(&headers),
    };
    let response = crate::transaction::process(&context, bundle).await?;
    Ok(fhir_response(StatusCode::OK, &response))
}

pub(super) async fn create<B: Backend>(
    State(state): Shared<B>,
    Path(resource_type): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_type(&resource_type)?;
    let resource = state.read_resource(&headers, body, &resource_type, |_| Ok(())).await?;
    let answer = Return::preferred(&headers);
    let minimal = answer != Return::Representation;
    // Conditional create (FHIR R4 §3.1.0.8.1): `If-None-Exist: identifier=…`.
    let stored = match headers.get(IF_NONE_EXIST) {
        None => state.backend.create(resource).await?,
        Some(value) => {
            let query = value
                .to_str()
                .ok()
                .filter(|q| !q.trim().is_empty())
                .ok_or_else(|| ApiError::InvalidParam {
                    param: IF_NONE_EXIST.to_owned(),
                    reason: "expected search parameters, e.g. identifier=system|value".to_owned(),
                })?;
            let context = crate::transaction::Context {
                backend: state.backend.as_ref(),
                base_url: &state.config.base_url,
                max_count: state.config.max_count,
                minimal,
            };
            use crate::transaction::{ConditionalCreate, conditional_create, create_if_none};
            match conditional_create(&context, &resource_type, query.trim()).await? {
                ConditionalCreate::Existing(existing) => {
                    return Ok(resource_response(
                        StatusCode::OK,
                        &existing,
                        &state.config.base_url,
                        answer,
                    ));
                }
                ConditionalCreate::Create(request) => create_if_none(state.backend.as_ref(), resource, request).await?,
            }
        }
    };
    Ok(resource_response(
        StatusCode::CREATED,
        &stored,
        &state.config.base_url,
        answer,
    ))
}

/// The conditional-create header.
pub(crate) const IF_NONE_EXIST: &str = "if-none-exist";

pub(super) async fn read<B: Backend>(
    State(state): Shared<B>,
    Path((resource_type, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_type(&resource_type)?;
    let stored = state.backend.read(&resource_type, &id).await?;
    Ok(read_response(&stored, &state.config.base_url, &headers))
}

pub(super) async fn vread<B: Backend>(
    State(state): Shared<B>,
    Path((resource_type, id, vid)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_type(&resource_type)?;
    let stored = state.backend.vread(&resource_type, &id, &vid).await?;
    Ok(read_response(&stored, &state.config.base_url, &headers))
}

/// A read's answer: `304 Not Modified` (no body) when the client's copy is
/// current by `If-None-Match` or, without it, `If-Modified-Since`; else the
/// resource.
fn read_response(stored: &Arc<RenderedResource>, base_url: &str, headers: &HeaderMap) -> Response {
    let header = |name| headers.get(name).and_then(|v: &HeaderValue| v.to_str().ok());
    let not_modified = match header(header::IF_NONE_MATCH) {
        Some(tags) => etag_list_matches(tags, &stored.version_id),
        None => header(header::IF_MODIFIED_SINCE)
            .and_then(parse_http_date)
            // HTTP dates have whole seconds.
            .is_some_and(|since| stored.last_updated_ms.div_euclid(1000) <= since),
    };
    let (status, answer) = if not_modified {
        (StatusCode::NOT_MODIFIED, Return::Minimal)
    } else {
        (StatusCode::OK, Return::Representation)
    };
    resource_response(status, stored, base_url, answer)
}

/// Whether an `If-None-Match` list (`W/"a", "b"` or `*`) names `version_id`.
fn etag_list_matches(tags: &str, version_id: &str) -> bool {
    tags.split(',').any(|tag| {
        let tag = tag.trim();
        tag == "*" || tag.trim_start_matches("W/").trim_matches('"') == version_id
    })
}

/// An HTTP date (IMF-fixdate, as [`http_date`] writes) as seconds since the
/// epoch; `None` for anything else (the header is then ignored, RFC 9110).
fn parse_http_date(text: &str) -> Option<i64> {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let t = time::PrimitiveDateTime::parse(text.trim(), &format).ok()?;
    Some(t.assume_utc().unix_timestamp())
}

pub(super) async fn update<B: Backend>(
    State(state): Shared<B>,
    Path((resource_type, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_type(&resource_type)?;
    let explicit = if_match(&headers)?;
    let (url_id, id_path) = (id.clone(), format!("{resource_type}.id"));
    let resource = state
        .read_resource(&headers, body, &resource_type, move |resource| {
            if resource.get("id").and_then(Value::as_str) == Some(url_id.as_str()) {
                Ok(())
            } else {
                Err(ApiError::InvalidRequest(vec![
                    Issue::error(IssueType::Invalid, "the body's id must equal the id in the URL").at(id_path),
                ]))
            }
        })
        .await?;
    let body_version = resource
        .pointer("/meta/versionId")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let require_current = explicit.is_some();
    let base = explicit.or(body_version);
    let stored = state
        .backend
        .update(&resource_type, &id, resource, base, require_current)
        .await?;
    Ok(resource_response(
        StatusCode::OK,
        &stored,
        &state.config.base_url,
        Return::preferred(&headers),
    ))
}

pub(super) async fn delete<B: Backend>(
    State(state): Shared<B>,
    Path((resource_type, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    check_type(&resource_type)?;
    state.backend.delete(&resource_type, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(super) async fn instance_operation<B: Backend>(
    State(state): Shared<B>,
    Path((resource_type, id, op)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    check_type(&resource_type)?;
    match op.as_str() {
        "_history" => history(&state, &resource_type, &id).await,
        "$everything" if resource_type == "Patient" => everything(&state, &id, query.as_deref().unwrap_or("")).await,
        _ => Err(ApiError::NotFound {
            resource_type: resource_type.clone(),
            id: format!("{id}/{op}"),
        }),
    }
}

async fn history<B: Backend>(state: &AppState<B>, resource_type: &str, id: &str) -> Result<Response, ApiError> {
    let entries = state.backend.history(resource_type, id).await?;
    let base = &state.config.base_url;
    // A history Bundle lists newest first.
    let entries: Vec<Value> = entries
        .iter()
        .rev()
        .map(|HistoryEntry { version, resource }| {
            let mut entry = json!({
                "fullUrl": format!("{base}/{resource_type}/{id}"),
                "request": {
                    "method": if version.deleted { "DELETE" } else { "PUT" },
                    "url": format!("{resource_type}/{id}"),
                },
                "response": {
                    "status": if version.deleted { "204" } else { "200" },
                    "etag": format!("W/\"{}\"", version.version_id),
                    "lastModified": version.last_updated,
                },
            });
            if let (Some(resource), Some(obj)) = (resource, entry.as_object_mut()) {
                obj.insert("resource".to_owned(), resource.json.clone());
            }
            entry
        })
        .collect();
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "history",
        "total": entries.len(),
        "link": [{ "relation": "self", "url": format!("{base}/{resource_type}/{id}/_history") }],
        "entry": entries,
    });
    Ok(fhir_response(StatusCode::OK, &bundle))
}

/// `_count` and `_offset` of `$everything`; other parameters are ignored.
fn paging(query: &str, max_count: usize) -> Result<Page, ApiError> {
    let mut page = Page::first(max_count);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        page.read(key, value, max_count)?;
    }
    Ok(page)
}

async fn everything<B: Backend>(state: &AppState<B>, id: &str, query: &str) -> Result<Response, ApiError> {
    let page = paging(query, state.config.max_count)?;
    // Judged before the read: a record completing in between then warns
    // once too often, never once too few.
    let incomplete = state.backend.incomplete_everything(id).await?;
    let all = state.backend.everything(id).await?;
    let base = &state.config.base_url;
    let link = |offset: usize| format!("{base}/Patient/{id}/$everything?_count={}&_offset={offset}", page.count);
    let mut bundle = Searchset::new(link(page.offset), base.as_str()).total(all.len());
    if let Some(next) = page.next_offset(all.len()) {
        bundle = bundle.next(link(next));
    }
    let mut bundle = bundle;
    for resource in page.of(&all) {
        let mode = if resource.resource_type() == "Patient" && resource.id() == id {
            SearchMode::Match
        } else {
            SearchMode::Include
        };
        bundle.push_rendered(Arc::clone(resource), mode);
    }
    push_incomplete(&mut bundle, incomplete);
    Ok(state.buffers.respond(bundle))
}

/// An OperationOutcome entry warning that the record read is incomplete
/// here (issue 16), one issue per collection still arriving.
fn push_incomplete(bundle: &mut Searchset, warnings: Vec<String>) {
    if warnings.is_empty() {
        return;
    }
    bundle.push_outcome(
        OperationOutcome::from_issues(
            warnings
                .into_iter()
                .map(|why| Issue::warning(IssueType::Incomplete, why)),
        )
        .to_value(),
    );
}

pub(super) async fn search<B: Backend>(
    State(state): Shared<B>,
    Path(resource_type): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let query = query.unwrap_or_default();
    let base = &state.config.base_url;
    if resource_type == "Consent" || resource_type == "AuditEvent" {
        return read_only_search(&state, &resource_type, &query).await;
    }
    check_type(&resource_type)?;
    let request = parse_search(&resource_type, &query, state.config.max_count)?;
    let strict = prefer(&headers, "handling").is_some_and(|v| v == "strict");
    if strict && !request.unknown.is_empty() {
        return Err(ApiError::InvalidParam {
            param: request.unknown.join(","),
            reason: "not supported for this type (Prefer: handling=strict)".to_owned(),
        });
    }
    // Judged before the read, as for `$everything`.
    let notes = state.backend.search_notes(&request).await?;
    let matches = state.backend.search(&request).await?;
    let mut bundle = searchset(base, &request, &matches);
    if let Some(why) = notes.unreadable {
        bundle.push_outcome(
            OperationOutcome::from_issues([Issue::information(IssueType::Informational, why)]).to_value(),
        );
    }
    push_incomplete(&mut bundle, notes.incomplete);
    Ok(state.buffers.respond(bundle))
}

/// `Consent` and `AuditEvent` are views of the node's consent registry and
/// audit log: searchable by patient (did:key) only.
async fn read_only_search<B: Backend>(
    state: &AppState<B>,
    resource_type: &str,
    query: &str,
) -> Result<Response, ApiError> {
    let patient = required_patient(query)?;
    let resources = if resource_type == "Consent" {
        state.backend.consents(&patient).await?
    } else {
        state.backend.audit_events(&patient).await?
    };
    let base = &state.config.base_url;
    let mut bundle = Searchset::new(format!("{base}/{resource_type}?{query}"), base.as_str()).total(resources.len());
    for resource in resources {
        let id = resource
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        bundle.push(format!("{base}/{resource_type}/{id}"), resource, SearchMode::Match);
    }
    Ok(fhir_response(StatusCode::OK, &bundle.build()))
}
