//! The one error type of the node crate: its store, consent registry and
//! audit log, the record model, the repository's FHIR operations and
//! snapshot transfers.
//!
//! Variants name the id at fault (envelope id, grant id, patient did,
//! collection, store seq, resource key, change hash, search parameter name),
//! never resource content or key bytes: a FHIR field value may be PHI.

use std::path::PathBuf;

use automerge::ChangeHash;
use medmesh_crypto::{Collection, EnvelopeId, GrantId, PatientId};

/// Everything that can go wrong in the node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // ----- the store, consent and the audit log
    /// The storage engine failed (I/O, corruption it detected itself).
    #[error("store: {0}")]
    Storage(String),
    /// A durable flush failed; the store refuses further writes until it is
    /// reopened, because what is on disk is no longer known.
    #[error("store is poisoned after a failed flush; reopen it")]
    Poisoned,
    /// The committer thread is gone (the node is shutting down).
    #[error("store committer stopped")]
    CommitterStopped,
    /// A stored value does not decode: the disk was altered or damaged.
    #[error("corrupt {what} in the store at {key}")]
    Corrupt {
        /// Which table.
        what: &'static str,
        /// The key at fault (hex).
        key: String,
    },
    /// A stored item no longer verifies (bit rot or tampering); it has been
    /// removed from the store (quarantined) so that a good copy can be
    /// fetched again from a peer.
    #[error("stored item {id} fails verification: {source}")]
    CorruptItem {
        /// Item id (hex).
        id: String,
        /// What the decoder said.
        source: medmesh_crypto::Error,
    },
    /// The node holds no key for the current epoch of this collection.
    #[error("no key held for the current epoch of {collection} of {patient}")]
    NoEpochKey {
        /// Whose record.
        patient: PatientId,
        /// Which collection.
        collection: Collection,
    },
    /// No grant in force gives this node read-write access.
    #[error("no read-write grant in force for {collection} of {patient}")]
    NoWriteGrant {
        /// Whose record.
        patient: PatientId,
        /// Which collection.
        collection: Collection,
    },
    /// The change's actor was not derived from this node's key.
    #[error("change actor does not belong to this node")]
    ForeignActor,
    /// A sealed change larger than any peer accepts
    /// ([`medmesh_crypto::MAX_ENVELOPE_BYTES`]): stored, it could never sync.
    #[error("sealed change for {collection} of {patient} is {bytes} bytes, over the {max}-byte envelope limit")]
    ChangeTooLarge {
        /// Whose record.
        patient: medmesh_crypto::PatientId,
        /// Which collection.
        collection: medmesh_crypto::Collection,
        /// Its encoded size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// An item was refused permanently (and recorded as rejected).
    #[error("{kind} {id} rejected: {reason}")]
    Rejected {
        /// Item kind.
        kind: &'static str,
        /// Item id or hash of its bytes (hex).
        id: String,
        /// Why.
        reason: String,
    },
    /// A grant or key share whose id is already bound here to another
    /// tuple: another patient's grant or key in use here, or another
    /// collection or epoch of the same patient's. Ids are random, so this is
    /// a copied id; refused for good (recorded as rejected).
    #[error("{kind} {id} rejected: its id is already bound to {bound}")]
    IdCollision {
        /// Item kind.
        kind: &'static str,
        /// Hash of the item's bytes (hex).
        id: String,
        /// What the id is bound to.
        bound: &'static str,
    },
    /// No such envelope is held readable.
    #[error("envelope {0} is not held or not readable")]
    NotReadable(EnvelopeId),
    /// A grant the caller named is unknown.
    #[error("unknown grant {0}")]
    UnknownGrant(GrantId),
    /// The node key file is sealed and no passphrase was given.
    #[error("node key at {0} is sealed: set MEDMESH_NODE_PASSPHRASE")]
    NodeKeySealed(PathBuf),
    /// File I/O outside the store (the node key file, the data dir).
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The audit chain does not verify.
    #[error(transparent)]
    AuditBroken(#[from] crate::audit::BrokenAt),
    /// The audit log ends before its latest signed checkpoint.
    #[error(
        "audit log ends at entry {entries}, but the node signed a checkpoint at entry {checkpoint}: \
         entries after {entries} were removed"
    )]
    AuditTruncated {
        /// Entries the log holds.
        entries: u64,
        /// The checkpoint's seq.
        checkpoint: u64,
    },
    /// The audit entry at the latest checkpoint is not the one it signed.
    #[error("audit entry {seq} is not the one the node's signed checkpoint names: the log was rewritten")]
    AuditRewritten {
        /// The checkpoint's seq.
        seq: u64,
    },
    // ----- the record model (FHIR resources in Automerge documents)
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
    CorruptResource {
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
    // ----- the repository (FHIR operations over the node)
    /// The resource names no patient this node knows.
    #[error("{resource_type} does not reference a patient this node holds ({reason})")]
    UnresolvedPatient {
        /// Type of the resource written.
        resource_type: String,
        /// What was missing.
        reason: &'static str,
    },
    /// The resource's Patient-compartment references do not name exactly one
    /// patient held here (a reference to an unknown patient, or to two).
    #[error("{resource_type} {source}")]
    PatientLink {
        /// Type of the resource written.
        resource_type: String,
        /// How its references failed to name one patient.
        #[source]
        source: crate::records::PatientLinkError,
    },
    /// A write names another patient than the one whose record it goes to.
    #[error("{resource} references another patient than the one whose record it is written to")]
    OtherPatient {
        /// Resource key, or type of a resource being created.
        resource: String,
    },
    /// `If-Match` named a version that is not the current one.
    #[error("version conflict on {key}: based on {expected}, current is {current}")]
    VersionConflict {
        /// Resource key.
        key: String,
        /// The version the client read.
        expected: String,
        /// The current version.
        current: String,
    },
    /// A conditional create (`If-None-Exist`) matches a resource by the time
    /// its transaction runs (FHIR: `412`); nothing was created.
    #[error("a conditional create now matches an existing resource")]
    ConditionalMatch,
    /// A resource of a transaction names no patient, and the transaction is
    /// not about exactly one patient: it is filed under nobody's guess.
    #[error("{resource_type} names no patient and this transaction is about {patients} patients: it cannot be filed")]
    Unfiled {
        /// Type of the resource.
        resource_type: String,
        /// How many patients the transaction's other creates name.
        patients: usize,
    },
    /// Randomness for ids was unavailable.
    #[error("operating system randomness unavailable")]
    Random,
    // ----- snapshot transfers
    /// The receiver does not hold a key the document is sealed under.
    #[error("no epoch key {0} for the snapshot document")]
    NoSnapshotKey(medmesh_crypto::KeyId),
    // ----- below
    /// A crypto operation failed.
    #[error(transparent)]
    Crypto(#[from] medmesh_crypto::Error),
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
