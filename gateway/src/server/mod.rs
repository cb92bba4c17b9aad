//! The axum application: routes, bearer-token auth, body/time/concurrency
//! limits, metrics, and the FHIR REST handlers on top of a [`Backend`].
//!
//! This file owns the application (its state, the route table, the
//! middleware and the operational routes); the rest is split by job: request
//! bodies in and responses out (`body.rs`), the FHIR REST handlers
//! (`rest.rs`), and the management routes under `/api` (`api.rs`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use serde_json::json;

use crate::auth::Token;
use crate::backend::Backend;
use crate::fhir::capability::capability_statement;
use crate::fhir::outcome::{ApiError, Issue, IssueType, OperationOutcome, fhir_response};
use crate::metrics::HttpMetrics;

mod api;
mod body;
mod rest;

use api::{
    audit_log, audit_verify, holdings, outbox, peers, submit_grant, submit_keyshare, submit_revocation, sync_with,
};
use body::Buffers;
use rest::{create, delete, instance_operation, read, search, system_interaction, update, vread};

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
    /// Browser origins allowed to call the gateway (CORS), exactly as the
    /// browser sends them (`https://emr.example.org`). Empty: no CORS
    /// headers, so browsers refuse cross-origin calls.
    pub cors_origins: Vec<String>,
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
            cors_origins: Vec::new(),
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
    let cors = cors(&state.config.cors_origins);
    // Exactly the routes the OpenAPI document lists, each also with a
    // trailing slash: FHIR client libraries post transactions to `[base]/`.
    let mut router = Router::new();
    for route in crate::openapi::routes() {
        router = router
            .route(route, handlers::<B>(route))
            .route(&format!("{route}/"), handlers::<B>(route));
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(negotiate))
        .layer(middleware::from_fn_with_state(state.clone(), timeout::<B>))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate::<B>))
        .layer(middleware::from_fn_with_state(state.clone(), record_metrics::<B>))
        .layer(tower::limit::ConcurrencyLimitLayer::new(max_concurrency))
        // gzip when the client asks for it (`Accept-Encoding`); Bundles shrink ~10x.
        .layer(tower_http::compression::CompressionLayer::new())
        // Outermost, so a browser's preflight is answered before auth asks for a token.
        .layer(cors)
        .with_state(state)
}

/// CORS for the configured origins only; with none, a layer that adds nothing.
fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let allowed: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|origin| match HeaderValue::from_str(origin.trim_end_matches('/')) {
            Ok(value) => Some(value),
            Err(_) => {
                tracing::warn!(%origin, "not a valid origin; left out of CORS");
                None
            }
        })
        .collect();
    if allowed.is_empty() {
        return CorsLayer::new();
    }
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(allowed))
        .allow_methods([
            axum::http::Method::GET,
            axum::http::Method::HEAD,
            axum::http::Method::POST,
            axum::http::Method::PUT,
            axum::http::Method::PATCH,
            axum::http::Method::DELETE,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            header::IF_MATCH,
            header::IF_NONE_MATCH,
            header::IF_MODIFIED_SINCE,
            axum::http::HeaderName::from_static("if-none-exist"),
            axum::http::HeaderName::from_static("prefer"),
        ])
        .expose_headers([
            header::LOCATION,
            header::ETAG,
            header::LAST_MODIFIED,
            header::CONTENT_LOCATION,
        ])
        .max_age(Duration::from_secs(600))
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
    let path = request.uri().path();
    if PUBLIC_PATHS.contains(&path.strip_suffix('/').unwrap_or(path)) {
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

/// Content negotiation on the FHIR routes (FHIR R4 http.html#mime-type):
/// JSON is the one format served, so a request that accepts none of it (`Accept` without a
/// JSON type or a wildcard, or `_format` naming another format) is a 406
/// before any handler runs, instead of a 200 in a format it did not ask for.
async fn negotiate(request: Request, next: Next) -> Response {
    // FHIR routes only: /metrics answers Prometheus text whatever it is asked.
    if !request.uri().path().starts_with("/fhir") {
        return next.run(request).await;
    }
    let format = request
        .uri()
        .query()
        .and_then(|query| crate::fhir::search_params::query_value(query, "_format"));
    let refused = match format {
        Some(format) => (!serves_format(&format)).then_some(format),
        None => request
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .filter(|accept| !accepts_json(accept))
            .map(str::to_owned),
    };
    match refused {
        Some(asked) => ApiError::NotAcceptable(asked.chars().take(100).collect()).into_response(),
        None => next.run(request).await,
    }
}

/// Whether a `_format` value names JSON (`json`, or a JSON media type).
fn serves_format(format: &str) -> bool {
    let format = format.trim().to_ascii_lowercase();
    format == "json" || accepts_json(&format)
}

/// Whether an `Accept` value lets a JSON answer through: a JSON media type
/// (`application/fhir+json`, `application/json`, any `+json`) or a wildcard
/// (`*/*`, `application/*`), with any parameters, at a non-zero quality.
fn accepts_json(accept: &str) -> bool {
    accept.split(',').any(|range| {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        let refused = parts.any(|p| {
            let p = p.trim();
            p.strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        !refused
            && (media.is_empty()
                || media == "*/*"
                || media == "application/*"
                || media == "application/json"
                || media.ends_with("+json"))
    })
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

// ---- operational routes -----------------------------------------------------

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
