//! What the gateway needs from a node. The node crate's record service
//! implements it; tests implement it in memory. Keeping it a trait keeps
//! HTTP concerns (status codes, headers, paging, limits) out of the node.

use std::future::Future;
use std::sync::Arc;

use medmesh_node::records::{RenderedResource, Version};
use serde_json::Value;

use crate::fhir::outcome::ApiError;
use crate::fhir::search_params::SearchRequest;

/// One entry of a resource's history: the version, and the resource as it
/// was (absent for a delete).
#[derive(Debug, Clone)]
pub struct HistoryEntry {
    /// The version.
    pub version: Version,
    /// The resource at that version; `None` when the version is a delete.
    pub resource: Option<Arc<RenderedResource>>,
}

/// A signed consent item submitted through the management API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignedKind {
    /// A grant.
    Grant,
    /// A revocation.
    Revocation,
    /// A key share.
    KeyShare,
}

/// The node operations behind the HTTP routes. Every method is called only
/// after the caller's bearer token was checked.
pub trait Backend: Send + Sync + 'static {
    /// Creates a resource (server-assigned id) and returns it as stored.
    fn create(&self, resource: Value) -> impl Future<Output = Result<Arc<RenderedResource>, ApiError>> + Send;

    /// The current version of a resource; [`ApiError::Gone`] when deleted.
    fn read(
        &self,
        resource_type: &str,
        id: &str,
    ) -> impl Future<Output = Result<Arc<RenderedResource>, ApiError>> + Send;

    /// One version of a resource.
    fn vread(
        &self,
        resource_type: &str,
        id: &str,
        version_id: &str,
    ) -> impl Future<Output = Result<Arc<RenderedResource>, ApiError>> + Send;

    /// Every version of a resource, oldest first.
    fn history(
        &self,
        resource_type: &str,
        id: &str,
    ) -> impl Future<Output = Result<Vec<HistoryEntry>, ApiError>> + Send;

    /// Three-way update: `base_version` is the version the client read
    /// (from `If-Match`, else `meta.versionId`); `require_current` makes a
    /// stale base a [`ApiError::PreconditionFailed`] (an explicit `If-Match`).
    fn update(
        &self,
        resource_type: &str,
        id: &str,
        resource: Value,
        base_version: Option<String>,
        require_current: bool,
    ) -> impl Future<Output = Result<Arc<RenderedResource>, ApiError>> + Send;

    /// Marks a resource deleted (history stays).
    fn delete(&self, resource_type: &str, id: &str) -> impl Future<Output = Result<(), ApiError>> + Send;

    /// Every match of a search, in a stable order; the gateway pages it.
    fn search(
        &self,
        request: &SearchRequest,
    ) -> impl Future<Output = Result<Vec<Arc<RenderedResource>>, ApiError>> + Send;

    /// Every resource of the patient with this Patient resource id that the
    /// node can read, across collections; the Patient first.
    fn everything(
        &self,
        patient_resource_id: &str,
    ) -> impl Future<Output = Result<Vec<Arc<RenderedResource>>, ApiError>> + Send;

    /// Accepts a signed grant, revocation or key share; returns a JSON
    /// summary of what the node did with it.
    fn submit(&self, kind: SignedKind, bytes: Vec<u8>) -> impl Future<Output = Result<Value, ApiError>> + Send;

    /// What the node holds for a patient (did:key), as the holdings JSON.
    fn holdings(&self, patient_did: &str) -> impl Future<Output = Result<Value, ApiError>> + Send;

    /// The patient's grants as FHIR Consent resources.
    fn consents(&self, patient_did: &str) -> impl Future<Output = Result<Vec<Value>, ApiError>> + Send;

    /// Audit entries about the patient as FHIR AuditEvent resources.
    fn audit_events(&self, patient_did: &str) -> impl Future<Output = Result<Vec<Value>, ApiError>> + Send;

    /// Peers and sync status as JSON.
    fn sync_status(&self) -> impl Future<Output = Value> + Send;

    /// Appends node-level metrics (store size, sync counters) in Prometheus
    /// text format.
    fn write_metrics(&self, out: &mut String);
}

fn split(key: &str) -> (String, String) {
    match key.split_once('/') {
        Some((t, id)) => (t.to_owned(), id.to_owned()),
        None => (key.to_owned(), String::new()),
    }
}

impl From<medmesh_node::records::Error> for ApiError {
    /// Maps record-model errors to HTTP errors. Anything that is not the
    /// client's fault is logged (ids only) and answered 500 without details.
    fn from(err: medmesh_node::records::Error) -> Self {
        use crate::fhir::outcome::{Issue, IssueType};
        use medmesh_node::records::Error as E;
        match err {
            E::NotFound { key } => {
                let (resource_type, id) = split(&key);
                Self::NotFound { resource_type, id }
            }
            E::Deleted { key } => {
                let (resource_type, id) = split(&key);
                Self::Gone { resource_type, id }
            }
            E::VersionNotFound { key, version_id } => {
                let (resource_type, id) = split(&key);
                Self::NotFound {
                    resource_type,
                    id: format!("{id}/_history/{version_id}"),
                }
            }
            E::AlreadyExists { key } => Self::Conflict(format!("{key} already exists")),
            E::InvalidResource { key, reason } => Self::Unprocessable(vec![Issue::error(
                IssueType::Invalid,
                format!("invalid resource {key}: {reason}"),
            )]),
            E::InvalidKey { reason } => Self::InvalidParam {
                param: "id".to_owned(),
                reason: reason.to_owned(),
            },
            E::UnsupportedSearchParam(param) => Self::InvalidParam {
                param,
                reason: "not supported".to_owned(),
            },
            E::InvalidSearchValue { param } => Self::InvalidParam {
                param,
                reason: "invalid value".to_owned(),
            },
            other => {
                tracing::error!(error = %other, "record model error");
                Self::Internal
            }
        }
    }
}
