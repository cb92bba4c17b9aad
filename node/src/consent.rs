//! The consent registry: every grant, revocation and key share the node
//! holds, in memory, rebuilt from the store at open; the epoch keys this
//! node can open (memory only, never on disk); and the policy questions
//! sync and the write path ask (DESIGN §5, §6).
//!
//! Validity of an envelope depends only on signed data: its grant, the
//! grant's window, and the cuts of every known revocation of that grant.
//!
//! Key ids and grant ids are random, but a patient signs whatever ids it
//! likes, and every envelope header shows them in clear: any identity can
//! copy another patient's ids into its own shares and grants. So nothing
//! here is found by an id alone: keys by their [`KeyRef`] (patient,
//! collection, epoch, key id), grants and revocations by (patient, grant
//! id). The id indexes below only tell the node which other tuples claim
//! an id, to refuse copies (DESIGN §9 invariant 7).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::OnceLock;

use medmesh_crypto::{
    Access, Collection, EnvelopeHeader, Epoch, EpochKey, Grant, GrantId, KeyId, KeyRef, KeyShare, KeyShareTerms,
    NOT_BEFORE_SKEW_MS, PatientId, PracticeId, Revocation, SecretIdentity, Timestamp,
};

pub use crate::policy::Validity;
use crate::policy::{self, ConsentView};

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
    /// Ordered by patient, so one patient's grants are a range: the
    /// questions asked per patient (anti-entropy asks them of every shared
    /// patient each round) cost that patient's grants, not every grant held.
    grants: BTreeMap<(PatientId, GrantId), Grant>,
    /// The patients that hold a grant with this id (more than one: a copy).
    grant_id_patients: HashMap<GrantId, BTreeSet<PatientId>>,
    revocations: HashMap<(PatientId, GrantId), Vec<Revocation>>,
    keys: HashMap<KeyRef, EpochKey>,
    /// Shares addressed to this node found at open, opened on first use
    /// (HPKE costs ~0.1 ms each; a node with 30k shares opens in seconds
    /// otherwise). A share that does not open stays `None` (logged once).
    unopened: HashMap<KeyRef, (KeyShare, OnceLock<Option<EpochKey>>)>,
    /// The keys a key id names in the shares held (to anyone): one, unless
    /// an id was copied.
    key_id_bindings: HashMap<KeyId, BTreeSet<KeyRef>>,
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
                self.grant_id_patients.entry(key.1).or_default().insert(key.0);
                self.grants.insert(key, grant);
            }
        }
    }

    /// Other patients that hold a grant whose id is `id`.
    pub(crate) fn other_patients_with_grant_id(&self, patient: &PatientId, id: &GrantId) -> Vec<PatientId> {
        self.grant_id_patients
            .get(id)
            .into_iter()
            .flatten()
            .filter(|p| *p != patient)
            .copied()
            .collect()
    }

    /// The keys other than the share's that its key id already names here.
    pub(crate) fn other_keys_with_key_id(&self, share: &KeyShareTerms) -> Vec<KeyRef> {
        let own = share.key_ref();
        self.key_id_bindings
            .get(&own.key_id)
            .into_iter()
            .flatten()
            .filter(|r| **r != own)
            .copied()
            .collect()
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
        self.key_id_bindings.entry(t.key_id).or_default().insert(t.key_ref());
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
        self.keys.insert(key.key_ref(), key);
    }

    /// Keeps a share addressed to this node, to open with `opener` on first use.
    pub(crate) fn add_unopened_share(&mut self, share: KeyShare, opener: &SecretIdentity) {
        if self.opener.is_none() {
            self.opener = Some(SecretIdentity::from_seed(&opener.seed()));
        }
        let key_ref = share.terms().key_ref();
        if !self.keys.contains_key(&key_ref) {
            self.unopened.insert(key_ref, (share, OnceLock::new()));
        }
    }

    /// The key named by `key_ref`, if this node holds it.
    pub(crate) fn key(&self, key_ref: &KeyRef) -> Option<&EpochKey> {
        if let Some(k) = self.keys.get(key_ref) {
            return Some(k);
        }
        let (share, cell) = self.unopened.get(key_ref)?;
        cell.get_or_init(|| {
            let opened = self.opener.as_ref().map(|identity| share.open(identity));
            match opened {
                Some(Ok(key)) => Some(key),
                Some(Err(e)) => {
                    tracing::warn!(key_id = %key_ref.key_id, cause = %e, "stored key share does not open");
                    None
                }
                None => None,
            }
        })
        .as_ref()
    }

    /// The key of (patient, collection) with this id, whatever its epoch
    /// (a sealed snapshot names its key by id only). A patient's key id
    /// names one of its keys: a share binding it to a second is refused.
    pub(crate) fn key_of(&self, patient: &PatientId, collection: Collection, key_id: &KeyId) -> Option<&EpochKey> {
        self.key_id_bindings
            .get(key_id)?
            .iter()
            .filter(|r| r.patient == *patient && r.collection == collection)
            .find_map(|r| self.key(r))
    }

    pub(crate) fn grant(&self, patient: &PatientId, id: &GrantId) -> Option<&Grant> {
        self.grants.get(&(*patient, *id))
    }

    /// Every grant from `patient`.
    fn grants_from(&self, patient: &PatientId) -> impl Iterator<Item = &Grant> {
        self.grants
            .range((*patient, GrantId([0; 16]))..=(*patient, GrantId([0xff; 16])))
            .map(|(_, g)| g)
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
        self.grants_from(patient)
            .filter(|g| {
                let t = g.terms();
                t.grantee == *peer
                    && g.covers(collection)
                    && (access == Access::Read || t.access == Access::ReadWrite)
                    && g.in_force(now, self.is_revoked(patient, &t.id))
            })
            // Deterministic choice among several: the latest issued, then id.
            .max_by_key(|g| (g.terms().issued_at, g.id()))
    }

    /// DESIGN §5 on signed data only: [`policy::admits`] under the grant
    /// and revocations held for the header's patient and grant id.
    pub(crate) fn envelope_validity(&self, h: &EnvelopeHeader) -> Validity {
        let grant = h.grant_id.and_then(|id| self.grant(&h.patient, &id));
        let revocations = h.grant_id.map_or(&[][..], |id| self.revocations_of(&h.patient, &id));
        policy::admits(h, grant, revocations)
    }

    /// Whether `h` was written under a grant that expired more than
    /// [`NOT_BEFORE_SKEW_MS`] before `now` and that no known revocation ends
    /// yet. Such an envelope, first seen now, is refused (not kept, not
    /// rejected): once the patient's CLI revokes the expired grant, the cut
    /// decides on signed data alone (docs/decisions.md).
    pub(crate) fn expired_unrevoked(&self, h: &EnvelopeHeader, now: Timestamp) -> bool {
        let Some(grant_id) = h.grant_id else {
            return false;
        };
        let Some(grant) = self.grant(&h.patient, &grant_id) else {
            return false;
        };
        grant
            .terms()
            .expires
            .is_some_and(|e| now >= e.saturating_add(NOT_BEFORE_SKEW_MS))
            && !self.is_revoked(&h.patient, &grant_id)
    }

    /// Every grantee of any grant from `patient`, revoked or not (so the
    /// revoked practice also learns of its revocation).
    pub(crate) fn peers_with_grant_from(&self, patient: &PatientId) -> Vec<PracticeId> {
        self.grants_from(patient)
            .map(|g| g.terms().grantee)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// The patients whose records both `me` and `peer` may read now: a grant
    /// in force (any collection) names each. Anti-entropy compares those.
    pub(crate) fn patients_shared(&self, me: &PracticeId, peer: &PracticeId, now: Timestamp) -> Vec<PatientId> {
        let mine = self.patients_granting(me, now);
        self.patients_granting(peer, now).intersection(&mine).copied().collect()
    }

    /// The patients with a grant in force to `who` (any collection).
    pub(crate) fn patients_granting(&self, who: &PracticeId, now: Timestamp) -> BTreeSet<PatientId> {
        self.grants
            .values()
            .filter(|g| g.terms().grantee == *who)
            .filter(|g| g.in_force(now, self.is_revoked(&g.terms().patient, &g.id())))
            .map(|g| g.terms().patient)
            .collect()
    }

    /// Whether any grant names `peer` as its grantee.
    pub(crate) fn names_grantee(&self, peer: &PracticeId) -> bool {
        self.grants.values().any(|g| g.terms().grantee == *peer)
    }

    /// What the node holds of `patient`'s consent: every grant and every
    /// revocation of one, for [`policy::may_disclose`].
    pub(crate) fn view(&self, patient: &PatientId) -> ConsentView {
        let grants = self.grants_of(patient);
        let revocations = grants
            .iter()
            .flat_map(|g| self.revocations_of(patient, &g.id()).iter().cloned())
            .collect();
        ConsentView { grants, revocations }
    }

    /// Current epoch of a collection and its key id.
    pub(crate) fn current_epoch(&self, patient: &PatientId, collection: Collection) -> Option<(Epoch, KeyId)> {
        self.current.get(&(*patient, collection)).map(|c| (c.epoch, c.key_id))
    }

    /// The current epoch key, if this node holds it.
    pub(crate) fn current_key(&self, patient: &PatientId, collection: Collection) -> Option<&EpochKey> {
        let (epoch, key_id) = self.current_epoch(patient, collection)?;
        self.key(&KeyRef {
            patient: *patient,
            collection,
            epoch,
            key_id,
        })
    }

    /// Grants known for a patient, newest first.
    pub(crate) fn grants_of(&self, patient: &PatientId) -> Vec<Grant> {
        let mut out: Vec<Grant> = self.grants_from(patient).cloned().collect();
        out.sort_by_key(|g| std::cmp::Reverse((g.terms().issued_at, g.id())));
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use medmesh_crypto::{Principal, now};
    use zeroize::Zeroizing;

    use super::*;
    use crate::testing::TestPatient;

    /// Issue 15 item 1: a share of another patient with a copied key id is
    /// held under its own patient's tuple; X's key, current key and keyed
    /// lookups stay X's, whatever the order the two arrive in.
    #[test]
    fn a_copied_key_id_names_each_patients_own_key() {
        let node = SecretIdentity::from_seed(&[4; 32]);
        let me = Principal::Practice(node.practice_id().unwrap());
        let mut x = TestPatient::new().unwrap();
        let y = TestPatient::new().unwrap();
        let x_key = x.key(Collection::Core, 0).unwrap();
        let x_share = x.share(Collection::Core, 0, me).unwrap();
        let copied = EpochKey::from_parts(y.id(), Collection::Core, 0, x_key.key_id, Zeroizing::new([9; 32]));
        let y_share = KeyShare::create(&copied, me, &y.identity, now() + 1).unwrap();

        for x_first in [true, false] {
            let mut reg = Registry::default();
            let mut shares = vec![(&x_share, x_key.clone()), (&y_share, copied.clone())];
            if !x_first {
                shares.reverse();
            }
            for (share, key) in shares {
                reg.note_share(share);
                reg.add_key(key);
            }
            let current = reg.current_key(&x.id(), Collection::Core).unwrap();
            assert_eq!(current.patient, x.id());
            assert_eq!(current.secret(), x_key.secret());
            assert_eq!(reg.key(&x_key.key_ref()).unwrap().secret(), x_key.secret());
            assert_eq!(reg.key(&copied.key_ref()).unwrap().secret(), copied.secret());
            let of = reg.key_of(&x.id(), Collection::Core, &x_key.key_id).unwrap();
            assert_eq!(of.patient, x.id());
            assert!(reg.key_of(&x.id(), Collection::Labs, &x_key.key_id).is_none());
            // Each share sees the other tuple its id is claimed by.
            assert_eq!(reg.other_keys_with_key_id(y_share.terms()), vec![x_key.key_ref()]);
            assert_eq!(reg.other_keys_with_key_id(x_share.terms()), vec![copied.key_ref()]);
        }
    }

    /// Opened lazily (as at open) the same: by the whole tuple.
    #[test]
    fn unopened_shares_are_found_by_their_whole_tuple() {
        let node = SecretIdentity::from_seed(&[5; 32]);
        let me = Principal::Practice(node.practice_id().unwrap());
        let mut x = TestPatient::new().unwrap();
        let y = TestPatient::new().unwrap();
        let x_key = x.key(Collection::Core, 0).unwrap();
        let copied = EpochKey::from_parts(y.id(), Collection::Core, 0, x_key.key_id, Zeroizing::new([9; 32]));
        let mut reg = Registry::default();
        for share in [
            x.share(Collection::Core, 0, me).unwrap(),
            KeyShare::create(&copied, me, &y.identity, now()).unwrap(),
        ] {
            reg.note_share(&share);
            reg.add_unopened_share(share, &node);
        }
        assert_eq!(
            reg.current_key(&x.id(), Collection::Core).unwrap().secret(),
            x_key.secret()
        );
        assert_eq!(
            reg.current_key(&y.id(), Collection::Core).unwrap().secret(),
            copied.secret()
        );
    }

    /// Grants are found by (patient, grant id); a copied id is visible as
    /// another patient's.
    #[test]
    fn a_copied_grant_id_names_each_patients_own_grant() {
        let practice = SecretIdentity::from_seed(&[6; 32]).practice_id().unwrap();
        let x = TestPatient::new().unwrap();
        let y = TestPatient::new().unwrap();
        let x_grant = x
            .grant(practice, &[Collection::Core], Access::ReadWrite, now() - 1000, None)
            .unwrap();
        let mut terms = x_grant.terms().clone();
        terms.patient = y.id();
        let y_grant = Grant::sign(terms, &y.identity).unwrap();
        let mut reg = Registry::default();
        reg.add_grant(y_grant.clone());
        reg.add_grant(x_grant.clone());
        assert_eq!(reg.grant(&x.id(), &x_grant.id()), Some(&x_grant));
        assert_eq!(reg.grant(&y.id(), &x_grant.id()), Some(&y_grant));
        assert_eq!(reg.other_patients_with_grant_id(&y.id(), &x_grant.id()), vec![x.id()]);
        assert!(reg.other_patients_with_grant_id(&x.id(), &GrantId([0; 16])).is_empty());
    }
}
