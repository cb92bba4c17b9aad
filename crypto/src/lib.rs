//! medmesh-crypto owns every byte medmesh signs, seals or wraps: patient and
//! practice identities, consent grants and revocations with their validity
//! rules, key shares (HPKE), envelopes (XChaCha20-Poly1305 + ed25519),
//! node-signed audit checkpoints, sealed local snapshots, the canonical encoding they share, and the
//! patient's passphrase-sealed keystore.
//!
//! It is pure: no async, no network, no I/O except the keystore file. It
//! never logs, never prints a secret (`Debug` of secret types shows only
//! public parts) and keeps secrets in zeroizing buffers. It implements no
//! primitive itself; it composes RustCrypto, dalek and hpke.
//!
//! Every signed type is only ever built by signing or by decoding with the
//! signature checked first, so holding a [`Grant`], [`Revocation`],
//! [`KeyShare`] or [`Envelope`] means its signature verified. The byte
//! formats are specified with test vectors in `docs/formats.md`.

mod canon;
mod checkpoint;
mod consent;
mod envelope;
mod error;
mod id;
mod keys;
mod keystore;
mod patient;
mod sealed;
mod snapshot;
#[cfg(test)]
mod vectors;

pub use checkpoint::{AUDIT_CHECKPOINT_TAG, AuditCheckpoint, AuditCheckpointTerms, MAX_AUDIT_CHECKPOINT_BYTES};
pub use consent::{
    Access, Collection, GRANT_TAG, Grant, GrantId, GrantTerms, MAX_ADDRESS_HINTS, MAX_GRANT_BYTES,
    MAX_REVOCATION_BYTES, NOT_BEFORE_SKEW_MS, REVOCATION_TAG, Revocation, RevocationTerms, revocation_cut,
};
pub use envelope::{
    Change, CompactHeader, ENVELOPE_AAD_TAG, ENVELOPE_TAG, Envelope, EnvelopeHeader, EnvelopeId,
    MAX_COMPACT_HEADER_BYTES, MAX_ENVELOPE_BYTES, MAX_SIGNED_HEADER_BYTES, SignedHeader, keyed_change_hash,
};
pub use error::{Error, Result};
pub use id::{ActorId, PatientId, PeerId, PracticeId, Principal, SecretIdentity, Timestamp, now, signature_checks};
pub use keys::{Epoch, EpochKey, KEYSHARE_TAG, KeyId, KeyRef, KeyShare, KeyShareTerms, MAX_KEYSHARE_BYTES};
pub use keystore::{KdfParams, Keystore, MAX_ADDRESS_RECORD_BYTES, MAX_KEYSTORE_BYTES, write_atomically};
pub use patient::{GrantRequest, Granted, Rotated};
pub use sealed::SealedSecret;
pub use snapshot::{MAX_SNAPSHOT_BYTES, SNAPSHOT_TAG, SealedSnapshot};
