//! The vocabulary every layer speaks about what a node stores and sync
//! moves: an [`Item`] (a grant, revocation, key share or envelope as its
//! signed bytes), its [`ItemKind`] with one numbering on disk and on the
//! wire, its [`ItemId`], the [`ItemMeta`] read from its signed fields, the
//! local [`Seq`] log with its [`InstanceId`] and [`Cursor`], and the
//! [`IngestReport`] of taking items in. Defined once, here: the store, sync's
//! backend and wire codec, and the gateway import these types and never
//! mirror them (issue 17).

use std::fmt;

use medmesh_crypto::{
    Collection, Envelope, EnvelopeId, Grant, GrantId, KeyShare, MAX_ENVELOPE_BYTES, MAX_GRANT_BYTES,
    MAX_KEYSHARE_BYTES, MAX_REVOCATION_BYTES, PatientId, PeerId, Principal, Revocation,
};
use sha2::{Digest, Sha256};

/// A local sequence number: every stored item gets the next one. 0 means
/// "before the first item".
pub type Seq = u64;

/// The four kinds of item a node stores and sync moves.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ItemKind {
    /// A consent grant signed by the patient.
    Grant,
    /// A revocation signed by the patient.
    Revocation,
    /// A collection key wrapped for one recipient, signed by the patient.
    KeyShare,
    /// A sealed, signed change.
    Envelope,
}

impl ItemKind {
    /// Every kind, in code order.
    pub const ALL: [ItemKind; 4] = [Self::Grant, Self::Revocation, Self::KeyShare, Self::Envelope];

    /// The kind's number, the same on the wire (`docs/protocol.md`) and on
    /// disk (`docs/storage.md`): 0 grant, 1 revocation, 2 key share, 3
    /// envelope.
    pub fn code(self) -> u8 {
        match self {
            Self::Grant => 0,
            Self::Revocation => 1,
            Self::KeyShare => 2,
            Self::Envelope => 3,
        }
    }

    /// The kind a number names; `None` for any other number.
    pub fn from_code(code: u64) -> Option<Self> {
        Self::ALL.into_iter().find(|k| u64::from(k.code()) == code)
    }

    /// The largest encoded item of this kind that medmesh-crypto decodes.
    pub fn max_bytes(self) -> usize {
        match self {
            Self::Grant => MAX_GRANT_BYTES,
            Self::Revocation => MAX_REVOCATION_BYTES,
            Self::KeyShare => MAX_KEYSHARE_BYTES,
            Self::Envelope => MAX_ENVELOPE_BYTES,
        }
    }

    /// Lowercase name for logs, errors and audit entries.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grant => "grant",
            Self::Revocation => "revocation",
            Self::KeyShare => "key share",
            Self::Envelope => "envelope",
        }
    }
}

/// One item as it travels and is stored: its kind and its canonical signed
/// bytes (signature included), which medmesh-crypto decodes.
#[derive(Clone, PartialEq, Eq)]
pub struct Item {
    /// What it claims to be (it is decoded as that kind, else rejected).
    pub kind: ItemKind,
    /// The canonical signed encoding.
    pub bytes: Vec<u8>,
}

impl fmt::Debug for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the bytes: an envelope's header names the patient.
        write!(f, "Item({}, {} bytes)", self.kind.as_str(), self.bytes.len())
    }
}

impl Item {
    /// An item of `kind` from its bytes (not checked until ingested).
    pub fn new(kind: ItemKind, bytes: Vec<u8>) -> Self {
        Self { kind, bytes }
    }

    /// A grant as an item.
    pub fn grant(grant: &Grant) -> Self {
        Self::new(ItemKind::Grant, grant.encoded().to_vec())
    }

    /// A revocation as an item.
    pub fn revocation(revocation: &Revocation) -> Self {
        Self::new(ItemKind::Revocation, revocation.encoded().to_vec())
    }

    /// A key share as an item.
    pub fn key_share(share: &KeyShare) -> Self {
        Self::new(ItemKind::KeyShare, share.encoded().to_vec())
    }

    /// An envelope as an item.
    pub fn envelope(envelope: &Envelope) -> Self {
        Self::new(ItemKind::Envelope, envelope.encode())
    }

    /// The patient the item names, read **without** checking its signature
    /// (ingest checks it, once): only to say who is acting, where a false
    /// claim grants nothing. `None` when it does not parse.
    pub fn claimed_patient(&self) -> Option<PatientId> {
        match self.kind {
            ItemKind::Grant => Grant::claimed_patient(&self.bytes).ok(),
            ItemKind::Revocation => Revocation::claimed_patient(&self.bytes).ok(),
            ItemKind::KeyShare => KeyShare::claimed_patient(&self.bytes).ok(),
            ItemKind::Envelope => medmesh_crypto::CompactHeader::of_stored_envelope(&self.bytes)
                .ok()
                .map(|h| h.header().patient),
        }
    }
}

/// An item's id: the envelope id for envelopes, SHA-256 of the canonical
/// signed bytes for grants, revocations and key shares.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ItemId(pub [u8; 32]);

impl ItemId {
    /// SHA-256 of `bytes`.
    pub fn digest(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }
}

impl From<EnvelopeId> for ItemId {
    fn from(id: EnvelopeId) -> Self {
        Self(id.0)
    }
}

impl fmt::Display for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ItemId({self})")
    }
}

/// The cleartext facts about an item that consent decisions need, every
/// one read from the item's verified signed fields (never from where it
/// came from), so storing them beside the item saves decoding it again.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ItemMeta {
    /// What it is.
    pub kind: ItemKind,
    /// Its id.
    pub id: ItemId,
    /// Whose record it belongs to (every item names one patient).
    pub patient: PatientId,
    /// The collection (envelopes and key shares).
    pub collection: Option<Collection>,
    /// Grants: their own id. Revocations: the revoked grant. Envelopes: the
    /// grant their author wrote under (`None` when the patient wrote).
    pub grant: Option<GrantId>,
    /// Envelopes: the author. Grants: the grantee (as a practice). Key
    /// shares: the recipient. Revocations: none.
    pub principal: Option<Principal>,
}

impl ItemMeta {
    /// Decodes and verifies `item` with medmesh-crypto and describes it.
    ///
    /// # Errors
    /// Anything that does not decode or verify as its claimed kind.
    pub fn describe(item: &Item) -> Result<Self, medmesh_crypto::Error> {
        Ok(match item.kind {
            ItemKind::Grant => Self::of_grant(&Grant::decode(&item.bytes)?),
            ItemKind::Revocation => Self::of_revocation(&Revocation::decode(&item.bytes)?),
            ItemKind::KeyShare => Self::of_key_share(&KeyShare::decode(&item.bytes)?),
            ItemKind::Envelope => Self::of_envelope(&Envelope::decode(&item.bytes)?),
        })
    }

    /// Describes a verified grant.
    pub fn of_grant(grant: &Grant) -> Self {
        let t = grant.terms();
        Self {
            kind: ItemKind::Grant,
            id: ItemId::digest(grant.encoded()),
            patient: t.patient,
            collection: None,
            grant: Some(t.id),
            principal: Some(Principal::Practice(t.grantee)),
        }
    }

    /// Describes a verified revocation.
    pub fn of_revocation(revocation: &Revocation) -> Self {
        let t = revocation.terms();
        Self {
            kind: ItemKind::Revocation,
            id: ItemId::digest(revocation.encoded()),
            patient: t.patient,
            collection: None,
            grant: Some(t.grant_id),
            principal: None,
        }
    }

    /// Describes a verified key share.
    pub fn of_key_share(share: &KeyShare) -> Self {
        let t = share.terms();
        Self {
            kind: ItemKind::KeyShare,
            id: ItemId::digest(share.encoded()),
            patient: t.patient,
            collection: Some(t.collection),
            grant: None,
            principal: Some(t.recipient),
        }
    }

    /// Describes a verified envelope.
    pub fn of_envelope(envelope: &Envelope) -> Self {
        let h = envelope.header();
        Self {
            kind: ItemKind::Envelope,
            id: envelope.id().into(),
            patient: h.patient,
            collection: Some(h.collection),
            grant: h.grant_id,
            principal: Some(h.author),
        }
    }

    /// An envelope's author.
    pub fn author(&self) -> Option<Principal> {
        self.principal.filter(|_| self.kind == ItemKind::Envelope)
    }

    /// Whom a key share or grant is addressed to (a grant's grantee).
    pub fn recipient(&self) -> Option<Principal> {
        self.principal
            .filter(|_| matches!(self.kind, ItemKind::KeyShare | ItemKind::Grant))
    }
}

/// An item in the local log: its sequence number, metadata and bytes.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct StoredItem {
    /// Its local sequence number (strictly increasing, starts at 1).
    pub seq: Seq,
    /// Its signed metadata.
    pub meta: ItemMeta,
    /// The item itself.
    pub item: Item,
}

/// "An item was stored": published by the node for its own writes and for
/// items taken in (never for duplicates), with the item's signed metadata so
/// that no subscriber reads the store again to learn it. Ids and metadata,
/// never content.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ItemStored {
    /// Its local sequence number.
    pub seq: Seq,
    /// What it is.
    pub meta: ItemMeta,
    /// The peer it was received from; `None` for local writes and for items
    /// the patient or a local app submitted. Sync uses it not to offer an
    /// item back to the peer that just sent it.
    pub from: Option<PeerId>,
}

/// The random id of one store instance, made when the store is created. A
/// restored or rebuilt store gets a new one, which voids the cursors peers
/// hold on it (DESIGN §6).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct InstanceId(pub [u8; 16]);

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InstanceId({self})")
    }
}

/// How far a puller got in one peer's item log: that store's instance and
/// the last sequence number the peer served (scanned, not only sent).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct Cursor {
    /// The serving store's instance.
    pub instance: InstanceId,
    /// Last sequence number covered; the next pull asks for items after it.
    pub seq: Seq,
}

/// What taking items in did, in counts: a node's ingest, a page or a whole
/// pull in sync, a peer's answer to a push. (The node's reasons for each
/// rejection travel beside it, in `medmesh_node::Ingested`.)
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct IngestReport {
    /// Items newly stored (all kinds, including envelopes released from the
    /// pending queue by a grant among them).
    pub accepted: u64,
    /// Of the envelopes stored, those the node could open.
    pub readable: u64,
    /// Of the envelopes stored, those kept opaque (no key held).
    pub opaque: u64,
    /// Items put in the pending queue (waiting for a grant, key share or
    /// dependency; retried when it arrives).
    pub pending: u64,
    /// Items not put in the pending queue because the sender's share of it
    /// was used up (flood limits); nothing of them is kept, and they can be
    /// sent again once what they wait for is here.
    pub refused: u64,
    /// Items refused for good (bad signature, malformed, outside the grant),
    /// each recorded once.
    pub rejected: u64,
    /// Consent items of patients this node holds nothing of, beyond its
    /// caps (docs/protocol.md §10a): not kept and not recorded as rejected;
    /// they are not invalid, only unwanted.
    pub unwanted: u64,
    /// Items already held, already pending or already rejected.
    pub duplicates: u64,
    /// Previously accepted envelopes excluded by a revocation among them.
    pub excluded: u64,
    /// Opaque envelopes made readable by a key share among them.
    pub unlocked: u64,
}

impl IngestReport {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: IngestReport) {
        self.accepted += other.accepted;
        self.readable += other.readable;
        self.opaque += other.opaque;
        self.pending += other.pending;
        self.refused += other.refused;
        self.rejected += other.rejected;
        self.unwanted += other.unwanted;
        self.duplicates += other.duplicates;
        self.excluded += other.excluded;
        self.unlocked += other.unlocked;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_codes_are_one_numbering_and_round_trip() {
        let codes: Vec<u8> = ItemKind::ALL.iter().map(|k| k.code()).collect();
        assert_eq!(codes, [0, 1, 2, 3], "grant, revocation, key share, envelope");
        for kind in ItemKind::ALL {
            assert_eq!(ItemKind::from_code(kind.code().into()), Some(kind));
        }
        assert_eq!(ItemKind::from_code(4), None);
        assert_eq!(ItemKind::from_code(u64::MAX), None);
    }
}
