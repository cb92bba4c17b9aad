//! The management routes under `/api`: holdings, outbox, submitting grants,
//! revocations and key shares, peers and sync, and the audit log.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use medmesh_node::item::ItemKind;

use super::body::read_body;
use super::{AppState, Shared};
use crate::backend::Backend;
use crate::fhir::outcome::ApiError;

/// The first value of `name` in a raw query string, percent-decoded.
fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| percent_decode(v))
}

/// The `patient` parameter (a did:key) the management and view routes require.
pub(super) fn required_patient(query: &str) -> Result<String, ApiError> {
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

pub(super) async fn holdings<B: Backend>(
    State(state): Shared<B>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let query = query.unwrap_or_default();
    let patient = required_patient(&query)?;
    let value = state.backend.holdings(&patient).await?;
    Ok(axum::Json(value).into_response())
}

pub(super) async fn outbox<B: Backend>(
    State(state): Shared<B>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
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

pub(super) async fn submit_grant<B: Backend>(
    State(state): Shared<B>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    submit(&state, ItemKind::Grant, &headers, body).await
}

pub(super) async fn submit_revocation<B: Backend>(
    State(state): Shared<B>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    submit(&state, ItemKind::Revocation, &headers, body).await
}

pub(super) async fn submit_keyshare<B: Backend>(
    State(state): Shared<B>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    submit(&state, ItemKind::KeyShare, &headers, body).await
}

pub(super) async fn sync_with<B: Backend>(
    State(state): Shared<B>,
    Path(peer): Path<String>,
) -> Result<Response, ApiError> {
    Ok(axum::Json(state.backend.sync_with(&peer).await?).into_response())
}

pub(super) async fn audit_log<B: Backend>(
    State(state): Shared<B>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let query = query.unwrap_or_default();
    let patient = query_param(&query, "patient");
    Ok(axum::Json(state.backend.audit_log(patient.as_deref()).await?).into_response())
}

pub(super) async fn audit_verify<B: Backend>(State(state): Shared<B>) -> Result<Response, ApiError> {
    Ok(axum::Json(state.backend.audit_verify().await?).into_response())
}

pub(super) async fn peers<B: Backend>(State(state): Shared<B>) -> Response {
    axum::Json(state.backend.sync_status().await).into_response()
}
