//! Request bodies in and responses out: reading and parsing JSON bodies
//! (media type, size and structural limits, large ones off the async
//! workers), FHIR responses sharing cached bytes or pooled buffers, and the
//! request headers the handlers read (`Prefer`, `If-Match`).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use medmesh_node::records::RenderedResource;
use serde_json::Value;

use super::AppState;
use crate::fhir::bundle::Searchset;
use crate::fhir::outcome::{ApiError, FHIR_JSON, Issue, IssueType};
use crate::fhir::shape;
use crate::fhir::validate::validate;

/// A response with an `application/fhir+json` body shared, not copied, from
/// `owner` (a rendered resource, a pooled Bundle buffer).
fn fhir_body(status: StatusCode, owner: impl AsRef<[u8]> + Send + 'static) -> Response {
    let mut response = (status, Body::from(axum::body::Bytes::from_owner(owner))).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    response
}

/// Response buffers for searchset Bundles, reused: a fresh buffer for a
/// 600 KiB `$everything` costs ~150 page faults and, measured, about as much
/// time as everything else the gateway does for it.
#[derive(Default)]
pub(super) struct Buffers(std::sync::Mutex<Vec<Vec<u8>>>);

/// Buffers kept for reuse, and the largest kept: at most 16 MiB held idle.
const POOLED_BUFFERS: usize = 8;
const POOLED_CAPACITY: usize = 2 * 1024 * 1024;

impl Buffers {
    fn free(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        // Buffers are whole Vecs: a poisoned lock holds nothing half-made.
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A searchset Bundle's bytes in a pooled buffer, as a `200` response;
    /// the buffer goes back to the pool once the body is sent.
    pub(super) fn respond(self: &Arc<Self>, bundle: Searchset) -> Response {
        let mut bytes = self.free().pop().unwrap_or_default();
        bundle.write_to(&mut bytes);
        let pooled = Pooled {
            bytes,
            pool: Arc::clone(self),
        };
        fhir_body(StatusCode::OK, pooled)
    }
}

struct Pooled {
    bytes: Vec<u8>,
    pool: Arc<Buffers>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let mut bytes = std::mem::take(&mut self.bytes);
        if bytes.capacity() <= POOLED_CAPACITY {
            bytes.clear();
            let mut free = self.pool.free();
            if free.len() < POOLED_BUFFERS {
                free.push(bytes);
            }
        }
    }
}

/// A rendered resource's cached JSON bytes as a response body, without a copy.
struct SharedJson(Arc<RenderedResource>);

impl AsRef<[u8]> for SharedJson {
    fn as_ref(&self) -> &[u8] {
        &self.0.bytes
    }
}

/// What a create or update answers with (`Prefer: return=…`, FHIR R4
/// http.html#ops): the resource (the default), nothing, or an
/// OperationOutcome about the write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Return {
    Representation,
    Minimal,
    OperationOutcome,
}

impl Return {
    pub(crate) fn preferred(headers: &HeaderMap) -> Self {
        match prefer(headers, "return").as_deref() {
            Some("minimal") => Self::Minimal,
            Some("OperationOutcome") => Self::OperationOutcome,
            _ => Self::Representation,
        }
    }
}

pub(super) fn resource_response(
    status: StatusCode,
    resource: &Arc<RenderedResource>,
    base_url: &str,
    answer: Return,
) -> Response {
    let mut response = match answer {
        Return::Minimal => status.into_response(),
        Return::OperationOutcome => {
            let done = if status == StatusCode::CREATED {
                "created"
            } else {
                "stored"
            };
            let text = format!("{} {done}, version {}", resource.key, resource.version_id);
            let outcome = crate::fhir::outcome::OperationOutcome::from_issues([Issue::information(
                IssueType::Informational,
                text,
            )]);
            crate::fhir::outcome::fhir_response(status, &outcome.to_value())
        }
        Return::Representation => fhir_body(status, SharedJson(Arc::clone(resource))),
    };
    let headers = response.headers_mut();
    if let Ok(etag) = HeaderValue::from_str(&format!("W/\"{}\"", resource.version_id)) {
        headers.insert(header::ETAG, etag);
    }
    if let Some(date) = http_date(resource.last_updated_ms)
        && let Ok(value) = HeaderValue::from_str(&date)
    {
        headers.insert(header::LAST_MODIFIED, value);
    }
    if status == StatusCode::CREATED
        && let Ok(location) = HeaderValue::from_str(&format!(
            "{base_url}/{}/{}/_history/{}",
            resource.resource_type(),
            resource.id(),
            resource.version_id
        ))
    {
        headers.insert(header::LOCATION, location);
    }
    response
}

pub(crate) fn http_date(ms: i64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()?;
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    t.format(&format).ok()
}

/// Reads a JSON body's bytes: media type (415), size (413).
pub(super) async fn read_json_bytes(headers: &HeaderMap, body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    let media_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    if !matches!(
        media_type.as_deref(),
        Some("application/fhir+json" | "application/json")
    ) {
        return Err(ApiError::UnsupportedMediaType);
    }
    read_body(headers, body, limit).await
}

/// Parses a JSON body: structural limits (413, before anything is built), syntax (400).
pub(super) fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    shape::check(bytes).map_err(|exceeded| ApiError::TooComplex(exceeded.to_string()))?;
    let value: Value = serde_json::from_slice(bytes).map_err(|e| ApiError::malformed_json(&e))?;
    if !value.is_object() {
        return Err(ApiError::MalformedBody("expected a JSON object".to_owned()));
    }
    Ok(value)
}

/// Bodies up to this size are parsed and validated where they are received:
/// that takes well under a millisecond. Larger ones go to the blocking pool.
const INLINE_BODY_BYTES: usize = 64 * 1024;

impl<B> AppState<B> {
    /// Runs `work` on a body of `len` bytes (parsing, validating) off the async
    /// worker threads when the body is large, at most [`AppState::parsers`] at
    /// once: a few large bodies must not stall every other request. The work
    /// itself is bounded ([`shape`] limits, [`crate::fhir::validate::BUDGET`]),
    /// so a request given up on by its timeout still frees its permit soon.
    pub(super) async fn off_thread<T: Send + 'static>(
        &self,
        len: usize,
        work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        if len <= INLINE_BODY_BYTES {
            return work();
        }
        let permit = Arc::clone(&self.parsers)
            .acquire_owned()
            .await
            .map_err(|_| ApiError::Internal)?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await
        .map_err(|e| {
            tracing::error!(cause = %e, "parsing a request body failed");
            ApiError::Internal
        })?
    }

    /// A resource body of `resource_type` (as in the URL), parsed, checked by
    /// `check` and validated.
    pub(super) async fn read_resource(
        &self,
        headers: &HeaderMap,
        body: Body,
        resource_type: &str,
        check: impl FnOnce(&Value) -> Result<(), ApiError> + Send + 'static,
    ) -> Result<Value, ApiError> {
        let bytes = read_json_bytes(headers, body, self.config.body_limit).await?;
        let resource_type = resource_type.to_owned();
        self.off_thread(bytes.len(), move || {
            let resource = parse_json(&bytes)?;
            if resource.get("resourceType").and_then(Value::as_str) != Some(resource_type.as_str()) {
                return Err(ApiError::Unprocessable(vec![
                    Issue::error(IssueType::Invalid, "resourceType does not match the URL")
                        .at(format!("{resource_type}.resourceType")),
                ]));
            }
            check(&resource)?;
            validate(&resource).map_err(ApiError::Unprocessable)?;
            Ok(resource)
        })
        .await
    }
}

pub(super) async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(ApiError::PayloadTooLarge { limit_bytes: limit });
    }
    axum::body::to_bytes(body, limit)
        .await
        .map(|b| b.to_vec())
        .map_err(|_| ApiError::PayloadTooLarge { limit_bytes: limit })
}

/// For Bundles: `return=minimal` (and, until entries carry outcomes,
/// `return=OperationOutcome`) leaves resources out of write entries.
pub(crate) fn prefers_minimal(headers: &HeaderMap) -> bool {
    Return::preferred(headers) != Return::Representation
}

pub(super) fn prefer(headers: &HeaderMap, key: &str) -> Option<String> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .filter_map(|part| part.trim().split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().trim_matches('"').to_owned())
}

/// The version named by `If-Match: W/"vid"` (or `"vid"`).
pub(super) fn if_match(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(raw) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let raw = raw.to_str().map_err(|_| ApiError::InvalidParam {
        param: "If-Match".to_owned(),
        reason: "not ASCII".to_owned(),
    })?;
    let trimmed = raw.trim().trim_start_matches("W/").trim_matches('"');
    if trimmed.is_empty() {
        return Err(ApiError::InvalidParam {
            param: "If-Match".to_owned(),
            reason: "expected W/\"versionId\"".to_owned(),
        });
    }
    Ok(Some(trimmed.to_owned()))
}
