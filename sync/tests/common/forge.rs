//! Crafting validly signed items with chosen fields, as an attacker who
//! makes its own identities can: epoch keys with a chosen key id, grants
//! with a chosen grant id and address hints, and real Automerge changes
//! with a chosen sequence number. Everything here goes through the crates'
//! public signing APIs — the items verify; only the choices are hostile.

use automerge::transaction::Transactable as _;
use automerge::{AutoCommit, ROOT};
use medmesh_crypto::{
    Access, ActorId, Collection, EpochKey, Grant, GrantId, GrantTerms, KeyId, PatientId, PracticeId, SecretIdentity,
    Timestamp, now,
};
use medmesh_node::testing::OwnedChange;

/// An epoch key of `patient`'s `collection` whose id is `key_id` (another
/// patient's, read from any envelope header), with a fresh secret.
pub fn key_with_id(patient: PatientId, collection: Collection, epoch: u64, key_id: KeyId) -> EpochKey {
    let fresh = EpochKey::generate(patient, collection, epoch).unwrap();
    EpochKey::from_parts(patient, collection, epoch, key_id, (*fresh.secret()).into())
}

/// What a crafted grant says.
#[derive(Clone)]
pub struct Terms {
    pub id: GrantId,
    pub grantee: PracticeId,
    pub collections: Vec<Collection>,
    pub access: Access,
    pub not_before: Timestamp,
    pub expires: Option<Timestamp>,
    pub address_hints: Vec<String>,
}

impl Terms {
    /// Read-write, in force from a minute ago, no expiry, no hints, a fresh id.
    pub fn read_write(grantee: PracticeId, collections: &[Collection]) -> Self {
        Self {
            id: GrantId::generate().unwrap(),
            grantee,
            collections: collections.to_vec(),
            access: Access::ReadWrite,
            not_before: now() - 60_000,
            expires: None,
            address_hints: Vec::new(),
        }
    }
}

/// `patient`'s signed grant with exactly these terms.
pub fn grant(patient: &SecretIdentity, terms: Terms) -> Grant {
    Grant::sign(
        GrantTerms {
            id: terms.id,
            patient: patient.patient_id(),
            grantee: terms.grantee,
            collections: terms.collections,
            access: terms.access,
            not_before: terms.not_before,
            expires: terms.expires,
            purpose: "treatment".into(),
            issued_at: now(),
            address_hints: terms.address_hints,
        },
        patient,
    )
    .unwrap()
}

/// A real Automerge change by `actor` (which belongs to its author) whose
/// sequence number reads `seq`: Automerge itself would number it 1, so the
/// change is rebuilt with the chosen number (and its hash recomputed).
pub fn change_with_seq(actor: ActorId, seq: u64) -> OwnedChange {
    let mut doc = AutoCommit::new().with_actor(automerge::ActorId::from(&actor.0[..]));
    doc.put(ROOT, "forged", seq).unwrap();
    let mut expanded = doc.get_last_local_change().unwrap().decode();
    expanded.seq = seq;
    expanded.hash = None;
    let change = automerge::Change::from(expanded);
    OwnedChange {
        bytes: change.raw_bytes().to_vec(),
        hash: change.hash().0,
        actor,
        seq: change.seq(),
    }
}
