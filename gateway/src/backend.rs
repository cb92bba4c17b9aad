//! What the gateway needs from a node. The node crate's record service
//! implements it; tests implement it in memory. Keeping it a trait keeps
//! HTTP concerns (status codes, headers, paging, limits) out of the node.

use std::future::Future;
use std::sync::Arc;

use medmesh_node::item::ItemKind;
use medmesh_node::records::{RenderedResource, Version};
pub use medmesh_node::repository::{TxOp, TxResult};
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

/// Why a transaction failed: the position of the op in the `ops` given to
/// [`Backend::transaction`], and the error. Nothing was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxFailure {
    /// Index into the ops.
    pub op: usize,
    /// What went wrong with it.
    pub error: ApiError,
}

/// What a search scoped to a patient tells the app beside its matches.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SearchNotes {
    /// Why the result may miss what the record holds elsewhere: this node
    /// cannot read the collection the searched type lives in (no grant to
    /// it here, or its key has not arrived). Informational.
    pub unreadable: Option<String>,
    /// One sentence per collection searched that this node is granted but
    /// does not hold complete yet (a first sync not done, changes a peer
    /// listed not arrived, changes waiting). A warning.
    pub incomplete: Vec<String>,
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

    /// What a search scoped to a patient should tell the app beside its
    /// matches ([`SearchNotes`]), judged before the search runs. The
    /// default: nothing.
    fn search_notes(&self, request: &SearchRequest) -> impl Future<Output = Result<SearchNotes, ApiError>> + Send {
        let _ = request;
        async { Ok(SearchNotes::default()) }
    }

    /// What `$everything` of the Patient with this resource id may still
    /// miss ([`SearchNotes::incomplete`]), over every collection this node
    /// is granted. The default: none.
    fn incomplete_everything(
        &self,
        patient_resource_id: &str,
    ) -> impl Future<Output = Result<Vec<String>, ApiError>> + Send {
        let _ = patient_resource_id;
        async { Ok(Vec::new()) }
    }

    /// The patient that the Patient resource with this id belongs to, named as the
    /// backend names patients (on a node, the did:key): what a reference to
    /// `Patient/{id}` files a resource under. `None` when no such Patient is held.
    /// The default reads the Patient and takes its did:key identifier, else its key.
    fn patient_of(&self, patient_resource_id: &str) -> impl Future<Output = Result<Option<String>, ApiError>> + Send {
        let id = patient_resource_id.to_owned();
        async move {
            match self.read("Patient", &id).await {
                Ok(patient) => Ok(Some(
                    medmesh_node::records::linked_did(&patient.json).unwrap_or_else(|| patient.key.clone()),
                )),
                Err(ApiError::NotFound { .. } | ApiError::Gone { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        }
    }

    /// Every resource of the patient with this Patient resource id that the
    /// node can read, across collections; the Patient first.
    fn everything(
        &self,
        patient_resource_id: &str,
    ) -> impl Future<Output = Result<Vec<Arc<RenderedResource>>, ApiError>> + Send;

    /// Accepts a signed grant, revocation or key share; returns a JSON
    /// summary of what the node did with it.
    fn submit(&self, kind: ItemKind, bytes: Vec<u8>) -> impl Future<Output = Result<Value, ApiError>> + Send;

    /// What the node holds for a patient (did:key), as the holdings JSON.
    fn holdings(&self, patient_did: &str) -> impl Future<Output = Result<Value, ApiError>> + Send;

    /// What the node still owes others of a patient's (did:key) consent
    /// items, as the outbox JSON (docs/http-api.md). The default, for a
    /// node without sync, owes nothing.
    fn outbox(&self, patient_did: &str) -> impl Future<Output = Result<Value, ApiError>> + Send {
        let patient = patient_did.to_owned();
        async move { Ok(serde_json::json!({ "patient": patient, "settling": false, "owed": [], "held": [] })) }
    }

    /// The patient's grants as FHIR Consent resources.
    fn consents(&self, patient_did: &str) -> impl Future<Output = Result<Vec<Value>, ApiError>> + Send;

    /// Audit entries about the patient as FHIR AuditEvent resources.
    fn audit_events(&self, patient_did: &str) -> impl Future<Output = Result<Vec<Value>, ApiError>> + Send;

    /// Peers and sync status as JSON.
    fn sync_status(&self) -> impl Future<Output = Value> + Send;

    /// Pulls from `peer` now; a JSON summary of what arrived. Lets an
    /// operator (or the demo) see that a sync round happened.
    fn sync_with(&self, peer: &str) -> impl Future<Output = Result<Value, ApiError>> + Send {
        let peer = peer.to_owned();
        async move {
            Err(ApiError::NotFound {
                resource_type: "peer".to_owned(),
                id: peer,
            })
        }
    }

    /// Audit entries (all, or about one patient did), as `{"entries": [...]}`.
    fn audit_log(&self, patient_did: Option<&str>) -> impl Future<Output = Result<Value, ApiError>> + Send {
        let _ = patient_did;
        async { Ok(serde_json::json!({ "entries": [] })) }
    }

    /// Checks the audit hash chain: `{"intact": true, "entries": N}` or
    /// `{"intact": false, "broken_at": SEQ}`.
    fn audit_verify(&self) -> impl Future<Output = Result<Value, ApiError>> + Send {
        async { Ok(serde_json::json!({ "intact": true, "entries": 0 })) }
    }

    /// A fresh logical id for a resource about to be created in a transaction.
    /// The gateway asks for ids before writing so that it can rewrite the
    /// Bundle's `urn:uuid:` references to `Type/id`; ids that end up unused
    /// (a failed transaction) are simply never written. Must never return an
    /// id already in use, and must be a FHIR id (`[A-Za-z0-9-.]{1,64}`).
    fn new_id(&self) -> String;

    /// Runs `ops` all or nothing: either every op succeeds and every write is
    /// durable together (one store batch: one Automerge change per touched
    /// (patient, collection) document), or nothing is written and the error
    /// names the op that failed. Reads and searches see every write of the
    /// transaction (FHIR processes GETs after the writes, and the gateway
    /// puts them last).
    ///
    /// The gateway has already validated the resources, assigned ids
    /// ([`new_id`](Self::new_id)), resolved conditional requests and rewritten
    /// references, so the backend only re-checks what may have changed since
    /// (a stale `If-Match`, a conditional create that now matches).
    fn transaction(&self, ops: Vec<TxOp>) -> impl Future<Output = Result<Vec<TxResult>, TxFailure>> + Send;

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

impl From<medmesh_node::Error> for ApiError {
    /// Maps the node's errors to HTTP errors (the one place that does).
    /// Anything that is not the client's fault is logged (ids only) and
    /// answered 500 without details.
    fn from(err: medmesh_node::Error) -> Self {
        use crate::fhir::outcome::{Issue, IssueType};
        use medmesh_node::Error as E;
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
            E::DuplicateEdit { key } => Self::InvalidRequest(vec![Issue::error(
                IssueType::Duplicate,
                format!("{key} is changed by more than one entry"),
            )]),
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
            E::UnresolvedPatient { .. } | E::PatientLink { .. } | E::OtherPatient { .. } | E::Unfiled { .. } => {
                Self::Unprocessable(vec![Issue::error(IssueType::BusinessRule, err.to_string())])
            }
            E::ConditionalMatch => Self::MultipleMatches(err.to_string()),
            E::VersionConflict { expected, current, .. } => Self::PreconditionFailed { expected, current },
            E::NoWriteGrant { .. } | E::NoEpochKey { .. } => {
                Self::Forbidden(format!("this node may not write there: {err}"))
            }
            E::ChangeTooLarge { max, .. } => Self::PayloadTooLarge { limit_bytes: max },
            other => {
                tracing::error!(cause = %other, "node error");
                Self::Internal
            }
        }
    }
}
