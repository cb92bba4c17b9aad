//! The consent registry: every grant, revocation and key share the node
//! holds, in memory, rebuilt from the store at open; the epoch keys this
//! node can open (memory only, never on disk); and the policy questions
//! sync and the write path ask (DESIGN §5, §6).
//!
//! Validity of an envelope depends only on signed data: its grant, the
//! grant's window, and the cuts of every known revocation of that grant.

use std::collections::{BTreeSet, HashMap};
use std::sync::OnceLock;

use medmesh_crypto::{
    Access, Collection, EnvelopeHeader, Epoch, EpochKey, Grant, GrantId, KeyId, KeyShare, PatientId, PracticeId,
    Principal, Revocation, SecretIdentity, Timestamp,
};

use crate::store::{ItemKind, ItemMeta};

/// The verdict on an envelope's header.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Validity {
    /// Written by the patient, or under a grant that admits it.
    Valid,
    /// Its grant is unknown here: wait.
    MissingGrant(GrantId),
    /// Permanently invalid (reason without content).
    Invalid(&'static str),
}

/// Highest epoch seen per collection, from any key share (to anyone).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Current {
    epoch: Epoch,
    issued_at: Timestamp,
    key_id: KeyId,
}

/// Grants, revocations, key shares and held keys.
#[derive(Default)]
pub(crate) struct Registry {
    grants: HashMap<(PatientId, GrantId), Grant>,
    revocations: HashMap<(PatientId, GrantId), Vec<Revocation>>,
    keys: HashMap<KeyId, EpochKey>,
    /// Shares addressed to this node found at open, opened on first use
    /// (HPKE costs ~0.1 ms each; a node with 30k shares opens in seconds
    /// otherwise). A share that does not open stays `None` (logged once).
    unopened: HashMap<KeyId, (KeyShare, OnceLock<Option<EpochKey>>)>,
    /// The node key that opens `unopened` shares.
    opener: Option<SecretIdentity>,
    current: HashMap<(PatientId, Collection), Current>,
}

impl Registry {
    pub(crate) fn add_grant(&mut self, grant: Grant) {
        let key = (grant.terms().patient, grant.id());
        // Two different grants under one id (only the patient can sign
        // either): keep the one with the smaller bytes, whatever the order.
        match self.grants.get(&key) {
            Some(existing) if existing.encoded() <= grant.encoded() => {}
            _ => {
                self.grants.insert(key, grant);
            }
        }
    }

    /// Adds a revocation; false if it was already known.
    pub(crate) fn add_revocation(&mut self, revocation: Revocation) -> bool {
        let t = revocation.terms();
        let list = self.revocations.entry((t.patient, t.grant_id)).or_default();
        if list.contains(&revocation) {
            return false;
        }
        list.push(revocation);
        true
    }

    /// Notes the epoch a share belongs to (any recipient).
    pub(crate) fn note_share(&mut self, share: &KeyShare) {
        let t = share.terms();
        let candidate = Current {
            epoch: t.epoch,
            issued_at: t.issued_at,
            key_id: t.key_id,
        };
        let slot = self.current.entry((t.patient, t.collection)).or_insert(candidate);
        // Deterministic whatever the arrival order: highest epoch, then latest
        // issue, then highest key id.
        if (candidate.epoch, candidate.issued_at, candidate.key_id) > (slot.epoch, slot.issued_at, slot.key_id) {
            *slot = candidate;
        }
    }

    pub(crate) fn add_key(&mut self, key: EpochKey) {
        self.keys.insert(key.key_id, key);
    }

    /// Keeps a share addressed to this node, to open with `opener` on first use.
    pub(crate) fn add_unopened_share(&mut self, share: KeyShare, opener: &SecretIdentity) {
        if self.opener.is_none() {
            self.opener = Some(SecretIdentity::from_seed(&opener.seed()));
        }
        let key_id = share.terms().key_id;
        if !self.keys.contains_key(&key_id) {
            self.unopened.insert(key_id, (share, OnceLock::new()));
        }
    }

    pub(crate) fn key(&self, key_id: &KeyId) -> Option<&EpochKey> {
        if let Some(k) = self.keys.get(key_id) {
            return Some(k);
        }
        let (share, cell) = self.unopened.get(key_id)?;
        cell.get_or_init(|| {
            let opened = self.opener.as_ref().map(|identity| share.open(identity));
            match opened {
                Some(Ok(key)) => Some(key),
                Some(Err(e)) => {
                    tracing::warn!(key_id = %key_id, cause = %e, "stored key share does not open");
                    None
                }
                None => None,
            }
        })
        .as_ref()
    }

    pub(crate) fn grant(&self, patient: &PatientId, id: &GrantId) -> Option<&Grant> {
        self.grants.get(&(*patient, *id))
    }

    pub(crate) fn revocations_of(&self, patient: &PatientId, id: &GrantId) -> &[Revocation] {
        self.revocations.get(&(*patient, *id)).map_or(&[], Vec::as_slice)
    }

    pub(crate) fn is_revoked(&self, patient: &PatientId, id: &GrantId) -> bool {
        !self.revocations_of(patient, id).is_empty()
    }

    /// A grant in force from `patient` to `peer` covering `collection` with
    /// at least `access` (read-write satisfies read).
    pub(crate) fn grant_in_force(
        &self,
        patient: &PatientId,
        collection: Collection,
        peer: &PracticeId,
        access: Access,
        now: Timestamp,
    ) -> Option<&Grant> {
        self.grants
            .values()
            .filter(|g| {
                let t = g.terms();
                t.patient == *patient
                    && t.grantee == *peer
                    && g.covers(collection)
                    && (access == Access::Read || t.access == Access::ReadWrite)
                    && g.in_force(now, self.is_revoked(patient, &t.id))
            })
            // Deterministic choice among several: the latest issued, then id.
            .max_by_key(|g| (g.terms().issued_at, g.id()))
    }

    /// DESIGN §5 on signed data only.
    pub(crate) fn envelope_validity(&self, h: &EnvelopeHeader) -> Validity {
        let (author, grant_id) = match (h.author, h.grant_id) {
            (Principal::Patient(p), None) if p == h.patient => return Validity::Valid,
            (Principal::Practice(author), Some(g)) => (author, g),
            _ => return Validity::Invalid("author and grant do not fit"),
        };
        let Some(grant) = self.grant(&h.patient, &grant_id) else {
            return Validity::MissingGrant(grant_id);
        };
        if grant.terms().grantee != author {
            return Validity::Invalid("author is not the grantee");
        }
        if !h.actor.belongs_to(author.as_bytes()) {
            return Validity::Invalid("actor does not belong to the author");
        }
        let revocations = self.revocations_of(&h.patient, &grant_id);
        let admitted = if revocations.is_empty() {
            grant.admits_change(h.collection, h.created_at, &h.actor, h.seq, None)
        } else {
            revocations
                .iter()
                .all(|r| grant.admits_change(h.collection, h.created_at, &h.actor, h.seq, Some(r)))
        };
        if admitted {
            Validity::Valid
        } else if revocations.is_empty() {
            Validity::Invalid("outside the grant's window or access")
        } else {
            Validity::Invalid("outside the grant's window, access or revocation cut")
        }
    }

    /// Every grantee of any grant from `patient`, revoked or not (so the
    /// revoked practice also learns of its revocation).
    pub(crate) fn peers_with_grant_from(&self, patient: &PatientId) -> Vec<PracticeId> {
        self.grants
            .values()
            .filter(|g| g.terms().patient == *patient)
            .map(|g| g.terms().grantee)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// Whether any grant names `peer` as its grantee.
    pub(crate) fn names_grantee(&self, peer: &PracticeId) -> bool {
        self.grants.values().any(|g| g.terms().grantee == *peer)
    }

    /// Whether `peer` may receive an item with `meta` now (DESIGN §6).
    pub(crate) fn may_receive(&self, peer: &PracticeId, meta: &ItemMeta, now: Timestamp) -> bool {
        match meta.kind {
            ItemKind::Envelope => meta
                .collection
                .is_some_and(|c| self.grant_in_force(&meta.patient, c, peer, Access::Read, now).is_some()),
            ItemKind::Grant | ItemKind::Revocation => self
                .grants
                .values()
                .any(|g| g.terms().patient == meta.patient && g.terms().grantee == *peer),
            ItemKind::KeyShare => meta.principal == Some(Principal::Practice(*peer)),
        }
    }

    /// Peers that may receive an item now.
    pub(crate) fn peers_that_may_receive(&self, meta: &ItemMeta, now: Timestamp) -> Vec<PracticeId> {
        match meta.kind {
            ItemKind::KeyShare => match meta.principal {
                Some(Principal::Practice(p)) => vec![p],
                _ => Vec::new(),
            },
            _ => self
                .peers_with_grant_from(&meta.patient)
                .into_iter()
                .filter(|p| self.may_receive(p, meta, now))
                .collect(),
        }
    }

    /// Current epoch of a collection and its key id.
    pub(crate) fn current_epoch(&self, patient: &PatientId, collection: Collection) -> Option<(Epoch, KeyId)> {
        self.current.get(&(*patient, collection)).map(|c| (c.epoch, c.key_id))
    }

    /// The current epoch key, if this node holds it.
    pub(crate) fn current_key(&self, patient: &PatientId, collection: Collection) -> Option<&EpochKey> {
        let (_, key_id) = self.current_epoch(patient, collection)?;
        self.key(&key_id)
    }

    /// Grants known for a patient, newest first.
    pub(crate) fn grants_of(&self, patient: &PatientId) -> Vec<Grant> {
        let mut out: Vec<Grant> = self
            .grants
            .values()
            .filter(|g| g.terms().patient == *patient)
            .cloned()
            .collect();
        out.sort_by_key(|g| std::cmp::Reverse((g.terms().issued_at, g.id())));
        out
    }
}
