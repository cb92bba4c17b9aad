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

pub use compartment::{
    Collection, DID_SYSTEM, PatientLink, PatientLinkError, belongs, belongs_as, collection_of, collection_of_type,
    is_directory_type, linked_did, one_patient, patient_links, patient_references, supported_types, type_belongs,
};
pub use doc::{
    AppliedChange, ApplyReport, DecodedChange, Edit, EditError, Edited, Edits, MadeChange, RecordDoc, RejectedChange,
    RenderedResource, SavedDoc, Version, Written, genesis_hash, resource_key, split_key,
};
pub use error::{Error, Result};
pub use search::Query;
pub use time::format_instant;

/// Bytes of an actor id taken from the author's key hash.
pub const ACTOR_AUTHOR_PREFIX_LEN: usize = 16;

/// The Automerge actor id for an author in one process (DESIGN §3): the first 16
/// bytes of SHA-256(author public key), then 8 random bytes chosen at process start,
/// so a restored backup never reuses an (actor, seq) pair. The rule itself lives in
/// [`medmesh_crypto::ActorId`], which envelope headers carry.
pub fn actor_id(author_pubkey: &[u8; 32], process_nonce: [u8; 8]) -> ActorId {
    ActorId::from(
        medmesh_crypto::ActorId::for_author(author_pubkey, process_nonce)
            .0
            .to_vec(),
    )
}

/// Whether a change's actor belongs to this author (ingest rejects changes whose
/// actor does not belong to the envelope's author).
pub fn actor_belongs_to(actor: &ActorId, author_pubkey: &[u8; 32]) -> bool {
    <[u8; 24]>::try_from(actor.to_bytes()).is_ok_and(|bytes| medmesh_crypto::ActorId(bytes).belongs_to(author_pubkey))
}
