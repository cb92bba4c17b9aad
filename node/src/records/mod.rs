//! FHIR R4 resources on Automerge: the record model of DESIGN §3.
//!
//! One [`RecordDoc`] per (patient, collection): an Automerge document whose root map
//! `resources` holds each resource, keyed `"{resourceType}/{id}"`, as nested
//! Automerge maps, lists and scalars, and whose root map `deleted` holds tombstones.
//! Every write is exactly one Automerge change, returned as raw bytes
//! ([`Written::change`]) for the store to seal; changes from peers come back in through
//! [`RecordDoc::apply_changes`] (batched, checked, under `catch_unwind`).
//!
//! This module does no I/O, no encryption and no storage. See `docs/records.md` for
//! the mapping, number encoding, merge rules, choice-element resolution, version ids
//! and the routing table.
//!
//! - [`doc`]: the document, writes, reads, history, peer changes, snapshots.
//! - [`value`]: JSON ↔ Automerge mapping (numbers as tagged exact text).
//! - [`choice`]: R4 choice elements (`value[x]`, …).
//! - [`compartment`]: Patient compartment, did:key link, collection routing.
//! - [`search`]: filtering rendered resources.

pub mod choice;
pub mod compartment;
pub mod doc;
mod error;
pub mod search;
mod time;
pub mod value;

#[cfg(test)]
mod tests;

use automerge::ActorId;
use sha2::{Digest, Sha256};

pub use compartment::{Collection, collection_of, is_directory_type, linked_did, patient_references, supported_types};
pub use doc::{
    AppliedChange, ApplyReport, DecodedChange, RecordDoc, RejectedChange, RenderedResource, Version, Written,
    genesis_hash, resource_key, split_key,
};
pub use error::{Error, Result};
pub use search::Query;
pub use time::format_instant;

/// Bytes of an actor id taken from the author's key hash.
pub const ACTOR_AUTHOR_PREFIX_LEN: usize = 16;

/// The author part of actor ids: the first 16 bytes of SHA-256(author public key).
pub fn actor_prefix(author_pubkey: &[u8; 32]) -> [u8; ACTOR_AUTHOR_PREFIX_LEN] {
    let digest = Sha256::digest(author_pubkey);
    let mut out = [0u8; ACTOR_AUTHOR_PREFIX_LEN];
    out.copy_from_slice(&digest[..ACTOR_AUTHOR_PREFIX_LEN]);
    out
}

/// The Automerge actor id for an author in one process: the first 16 bytes of
/// SHA-256(author public key) then 8 random bytes chosen at process start, so a
/// restored backup never reuses an (actor, seq) pair (DESIGN §3).
pub fn actor_id(author_pubkey: &[u8; 32], process_nonce: [u8; 8]) -> ActorId {
    let mut bytes = Vec::with_capacity(ACTOR_AUTHOR_PREFIX_LEN + 8);
    bytes.extend_from_slice(&actor_prefix(author_pubkey));
    bytes.extend_from_slice(&process_nonce);
    ActorId::from(bytes)
}

/// Whether a change's actor belongs to this author (ingest rejects changes whose
/// actor does not belong to the envelope's author).
pub fn actor_belongs_to(actor: &ActorId, author_pubkey: &[u8; 32]) -> bool {
    let bytes = actor.to_bytes();
    bytes.len() == ACTOR_AUTHOR_PREFIX_LEN + 8 && bytes[..ACTOR_AUTHOR_PREFIX_LEN] == actor_prefix(author_pubkey)
}
