//! The one error type of the records module.
//!
//! Messages name resource keys (`Observation/123`), change hashes and search
//! parameter names, never resource content: a FHIR field value may be PHI.

use automerge::ChangeHash;

/// Errors of the record model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No resource with this key has ever been written.
    #[error("resource {key} not found")]
    NotFound {
        /// The resource key.
        key: String,
    },
    /// The resource was deleted (FHIR `410 Gone`); its history remains.
    #[error("resource {key} is deleted")]
    Deleted {
        /// The resource key.
        key: String,
    },
    /// A create named a key that exists (or existed and was deleted).
    #[error("resource {key} already exists")]
    AlreadyExists {
        /// The resource key.
        key: String,
    },
    /// One change (a transaction) would write the same resource twice; FHIR
    /// forbids two entries on one resource in a transaction.
    #[error("resource {key} is written by more than one entry of one transaction")]
    DuplicateEdit {
        /// The resource key.
        key: String,
    },
    /// `vread` of a version the resource never had.
    #[error("version {version_id} of resource {key} not found")]
    VersionNotFound {
        /// The resource key.
        key: String,
        /// The version id asked for.
        version_id: String,
    },
    /// The submitted JSON is not a storable FHIR resource.
    #[error("invalid resource {key}: {reason}")]
    InvalidResource {
        /// The resource key, or the resource type when no key could be formed.
        key: String,
        /// What is wrong (fixed text, never content).
        reason: &'static str,
    },
    /// A resource type or id that cannot form a key (`{type}/{id}`).
    #[error("invalid resource key: {reason}")]
    InvalidKey {
        /// What is wrong (fixed text).
        reason: &'static str,
    },
    /// Bytes that do not decode as an Automerge change.
    #[error("malformed change")]
    MalformedChange(#[source] Box<automerge::LoadChangeError>),
    /// A change from a peer that decodes but breaks the record model.
    #[error("change {hash} rejected: {reason}")]
    RejectedChange {
        /// The change hash.
        hash: ChangeHash,
        /// Why (fixed text).
        reason: &'static str,
    },
    /// A snapshot that does not load or is not a record document.
    #[error("invalid snapshot: {reason}")]
    InvalidSnapshot {
        /// Why (fixed text).
        reason: &'static str,
    },
    /// Automerge panicked on data from a peer; the document was left unchanged.
    #[error("automerge panicked while {0}")]
    Panicked(&'static str),
    /// Automerge refused an operation on a resource.
    #[error("automerge failed on resource {key}")]
    Automerge {
        /// The resource key.
        key: String,
        /// The underlying error.
        #[source]
        source: Box<automerge::AutomergeError>,
    },
    /// Stored data of a resource does not render (cannot happen for validated changes).
    #[error("stored data of resource {key} is corrupt: {reason}")]
    Corrupt {
        /// The resource key.
        key: String,
        /// What is wrong (fixed text).
        reason: &'static str,
    },
    /// A search parameter (or modifier) this module does not implement.
    #[error("unsupported search parameter {0}")]
    UnsupportedSearchParam(String),
    /// A search value that does not parse for its parameter.
    #[error("invalid value for search parameter {param}")]
    InvalidSearchValue {
        /// The parameter name.
        param: String,
    },
    /// A collection name that is not one of the seven.
    #[error("unknown collection {0}")]
    UnknownCollection(String),
}

/// Result type of the records module.
pub type Result<T, E = Error> = std::result::Result<T, E>;
