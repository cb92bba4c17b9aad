//! The one error type of the node's store, consent registry and audit log.
//!
//! Variants name the id at fault (envelope id, grant id, patient did,
//! collection, store seq), never resource content or key bytes.

use std::path::PathBuf;

use medmesh_crypto::{Collection, EnvelopeId, GrantId, PatientId};

/// Everything that can go wrong in the node's storage and consent layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
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
    /// A crypto operation failed.
    #[error(transparent)]
    Crypto(#[from] medmesh_crypto::Error),
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
