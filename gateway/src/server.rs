//! The axum application: routes, bearer-token auth, body/time/concurrency
//! limits, metrics, and the FHIR REST handlers on top of a [`Backend`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use serde_json::{Value, json};

use crate::auth::Token;
use medmesh_node::item::ItemKind;

use crate::backend::{Backend, HistoryEntry};
use crate::fhir::bundle::{SearchMode, Searchset, parse_request_bundle, searchset};
use crate::fhir::capability::capability_statement;
use crate::fhir::outcome::{ApiError, FHIR_JSON, Issue, IssueType, OperationOutcome, fhir_response};
use crate::fhir::search_params::{Page, parse_search};
use crate::fhir::shape;
use crate::fhir::validate::{check_type, validate};
use crate::metrics::HttpMetrics;
use medmesh_node::records::RenderedResource;

/// Gateway limits and addresses.
#[derive(Debug, Clone)]
pub struct Config {
    /// Largest request body accepted (413 beyond).
    pub body_limit: usize,
    /// Longest a request may take before it is answered 503.
    pub request_timeout: Duration,
    /// Requests handled at once; more wait.
    pub max_concurrency: usize,
    /// Cap on `_count`.
    pub max_count: usize,
    /// The FHIR base URL clients use, e.g. `http://127.0.0.1:8080/fhir`.
    pub base_url: String,
}

impl Config {
    /// Defaults for a gateway reachable at `addr`.
    pub fn for_addr(addr: SocketAddr) -> Self {
        Self {
            body_limit: 8 * 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            max_concurrency: 256,
            max_count: 1000,
            base_url: format!("http://{addr}/fhir"),
        }
    }
}

struct AppState<B> {
    backend: Arc<B>,
    /// Large bodies parsed and validated at once ([`AppState::off_thread`]).
    parsers: Arc<tokio::sync::Semaphore>,
    /// Buffers that searchset Bundles are written into, reused.
    buffers: Arc<Buffers>,
    /// `GET /openapi.json`, serialized once.
    openapi: Vec<u8>,
    token: Token,
    config: Config,
    metrics: HttpMetrics,
}

type Shared<B> = State<Arc<AppState<B>>>;

/// The whole gateway as an axum `Router`.
pub fn router<B: Backend>(backend: Arc<B>, token: Token, config: Config) -> Router {
    let openapi = serde_json::to_vec(&crate::openapi::document(&config.base_url)).unwrap_or_default();
    let parsers = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    let state = Arc::new(AppState {
        backend,
        parsers: Arc::new(tokio::sync::Semaphore::new(parsers)),
        buffers: Arc::default(),
        openapi,
        token,
        metrics: HttpMetrics::new(),
        config,
    });
    let max_concurrency = state.config.max_concurrency;
    // Exactly the routes the OpenAPI document lists.
    let mut router = Router::new();
    for route in crate::openapi::routes() {
        router = router.route(route, handlers::<B>(route));
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), timeout::<B>))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate::<B>))
        .layer(middleware::from_fn_with_state(state.clone(), record_metrics::<B>))
        .layer(tower::limit::ConcurrencyLimitLayer::new(max_concurrency))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains.
///
/// # Errors
/// I/O errors from the listener.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

// ---- middleware -------------------------------------------------------------

const PUBLIC_PATHS: [&str; 2] = ["/health", "/fhir/metadata"];

/// The handlers of one route of [`crate::openapi::OPS`]. A route missing here
/// answers 405 to every method, which the route test catches.
fn handlers<B: Backend>(route: &str) -> MethodRouter<Arc<AppState<B>>> {
    match route {
        "/health" => get(health),
        "/metrics" => get(metrics::<B>),
        "/openapi.json" => get(openapi::<B>),
        "/fhir/metadata" => get(metadata::<B>),
        "/fhir" => post(system_interaction::<B>),
        "/fhir/{type}" => get(search::<B>).post(create::<B>),
        "/fhir/{type}/{id}" => get(read::<B>).put(update::<B>).delete(delete::<B>),
        "/fhir/{type}/{id}/{op}" => get(instance_operation::<B>),
        "/fhir/{type}/{id}/_history/{vid}" => get(vread::<B>),
        "/api/holdings" => get(holdings::<B>),
        "/api/outbox" => get(outbox::<B>),
        "/api/grants" => post(submit_grant::<B>),
        "/api/revocations" => post(submit_revocation::<B>),
        "/api/keyshares" => post(submit_keyshare::<B>),
        "/api/peers" => get(peers::<B>),
        "/api/peers/{peer}/sync" => post(sync_with::<B>),
        "/api/audit" => get(audit_log::<B>),
        "/api/audit/verify" => get(audit_verify::<B>),
        _ => MethodRouter::new(),
    }
}

async fn authenticate<B: Backend>(State(state): Shared<B>, request: Request, next: Next) -> Response {
    if PUBLIC_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !state.token.accepts(authorization) {
        let mut response = ApiError::Unauthorized.into_response();
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    next.run(request).await
}

async fn timeout<B: Backend>(State(state): Shared<B>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(state.config.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            let outcome = OperationOutcome::from_issues([Issue::error(IssueType::Timeout, "request timed out")]);
            fhir_response(StatusCode::SERVICE_UNAVAILABLE, &outcome.to_value())
        }
    }
}

async fn record_metrics<B: Backend>(State(state): Shared<B>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().to_string();
    let response = next.run(request).await;
    state.metrics.record(
        &route,
        &method,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

// ---- helpers ----------------------------------------------------------------

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
struct Buffers(std::sync::Mutex<Vec<Vec<u8>>>);

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
    fn respond(self: &Arc<Self>, bundle: Searchset) -> Response {
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

fn resource_response(status: StatusCode, resource: &Arc<RenderedResource>, base_url: &str, minimal: bool) -> Response {
    let mut response = if minimal {
        let mut r = status.into_response();
        *r.status_mut() = status;
        r
    } else {
        fhir_body(status, SharedJson(Arc::clone(resource)))
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
async fn read_json_bytes(headers: &HeaderMap, body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
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
fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
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
    async fn off_thread<T: Send + 'static>(
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
    async fn read_resource(
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

async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
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

pub(crate) fn prefers_minimal(headers: &HeaderMap) -> bool {
    prefer(headers, "return").is_some_and(|v| v == "minimal")
}

fn prefer(headers: &HeaderMap, key: &str) -> Option<String> {
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
fn if_match(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
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

// ---- handlers ---------------------------------------------------------------

async fn health() -> Response {
    axum::Json(json!({ "status": "ok" })).into_response()
}

async fn metrics<B: Backend>(State(state): Shared<B>) -> Response {
    let mut text = String::new();
    state.metrics.encode(&mut text);
    state.backend.write_metrics(&mut text);
    text.push_str("# EOF\n");
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

async fn openapi<B: Backend>(State(state): Shared<B>) -> Response {
    let mut response = state.openapi.clone().into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

async fn metadata<B: Backend>(State(state): Shared<B>) -> Response {
    fhir_response(
        StatusCode::OK,
        &capability_statement(&state.config.base_url, state.config.max_count),
    )
}

async fn not_found() -> Response {
    ApiError::NotFound {
        resource_type: "route".to_owned(),
        id: "unknown".to_owned(),
    }
    .into_response()
}

async fn method_not_allowed(method: Method) -> Response {
    ApiError::MethodNotAllowed(method.to_string()).into_response()
}

async fn system_interaction<B: Backend>(
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

async fn create<B: Backend>(
    State(state): Shared<B>,
    Path(resource_type): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_type(&resource_type)?;
    let resource = state.read_resource(&headers, body, &resource_type, |_| Ok(())).await?;
    let minimal = prefers_minimal(&headers);
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
                        minimal,
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
        minimal,
    ))
}

/// The conditional-create header.
pub(crate) const IF_NONE_EXIST: &str = "if-none-exist";

async fn read<B: Backend>(
    State(state): Shared<B>,
    Path((resource_type, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_type(&resource_type)?;
    let stored = state.backend.read(&resource_type, &id).await?;
    Ok(read_response(&stored, &state.config.base_url, &headers))
}

async fn vread<B: Backend>(
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
    let status = if not_modified {
        StatusCode::NOT_MODIFIED
    } else {
        StatusCode::OK
    };
    resource_response(status, stored, base_url, not_modified)
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

async fn update<B: Backend>(
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
        prefers_minimal(&headers),
    ))
}

async fn delete<B: Backend>(
    State(state): Shared<B>,
    Path((resource_type, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    check_type(&resource_type)?;
    state.backend.delete(&resource_type, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn instance_operation<B: Backend>(
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

async fn search<B: Backend>(
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

/// The first value of `name` in a raw query string, percent-decoded.
fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| percent_decode(v))
}

/// The `patient` parameter (a did:key) the management and view routes require.
fn required_patient(query: &str) -> Result<String, ApiError> {
    query_param(query, "patient").ok_or_else(|| ApiError::InvalidParam {
        param: "patient".to_owned(),
        reason: "required: the patient's did:key".to_owned(),
    })
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 3)
            .filter(|_| bytes[i] == b'%')
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, b) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn holdings<B: Backend>(State(state): Shared<B>, RawQuery(query): RawQuery) -> Result<Response, ApiError> {
    let query = query.unwrap_or_default();
    let patient = required_patient(&query)?;
    let value = state.backend.holdings(&patient).await?;
    Ok(axum::Json(value).into_response())
}

async fn outbox<B: Backend>(State(state): Shared<B>, RawQuery(query): RawQuery) -> Result<Response, ApiError> {
    let query = query.unwrap_or_default();
    let patient = required_patient(&query)?;
    let value = state.backend.outbox(&patient).await?;
    Ok(axum::Json(value).into_response())
}

async fn submit<B: Backend>(
    state: &AppState<B>,
    kind: ItemKind,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(headers, body, 1024 * 1024).await?;
    let value = state.backend.submit(kind, bytes).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(value)).into_response())
}

async fn submit_grant<B: Backend>(
    State(state): Shared<B>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    submit(&state, ItemKind::Grant, &headers, body).await
}

async fn submit_revocation<B: Backend>(
    State(state): Shared<B>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    submit(&state, ItemKind::Revocation, &headers, body).await
}

async fn submit_keyshare<B: Backend>(
    State(state): Shared<B>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    submit(&state, ItemKind::KeyShare, &headers, body).await
}

async fn sync_with<B: Backend>(State(state): Shared<B>, Path(peer): Path<String>) -> Result<Response, ApiError> {
    Ok(axum::Json(state.backend.sync_with(&peer).await?).into_response())
}

async fn audit_log<B: Backend>(State(state): Shared<B>, RawQuery(query): RawQuery) -> Result<Response, ApiError> {
    let query = query.unwrap_or_default();
    let patient = query_param(&query, "patient");
    Ok(axum::Json(state.backend.audit_log(patient.as_deref()).await?).into_response())
}

async fn audit_verify<B: Backend>(State(state): Shared<B>) -> Result<Response, ApiError> {
    Ok(axum::Json(state.backend.audit_verify().await?).into_response())
}

async fn peers<B: Backend>(State(state): Shared<B>) -> Response {
    axum::Json(state.backend.sync_status().await).into_response()
}
