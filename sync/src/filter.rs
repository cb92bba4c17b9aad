//! The serve-time consent filter: the one function that decides whether an
//! item may leave this node for a peer (DESIGN §6, invariant 1).

use libp2p::PeerId;
use medmesh_crypto::{GrantId, PatientId, PracticeId, Principal, Timestamp};

use crate::backend::{ConsentView, ItemKind, ItemMeta};
use crate::{Error, Result};

/// The peer asking, as proven by its Noise handshake: an ed25519 key. The
/// same key is a practice (its PeerId) and, if it equals a patient's key,
/// that patient (the patient CLI uses the patient key as its identity).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Requester {
    key: PracticeId,
}

impl Requester {
    /// The requester behind a connected peer's PeerId.
    ///
    /// # Errors
    /// [`Error::NotEd25519`] for a PeerId that does not inline an ed25519 key.
    pub fn from_peer_id(peer: &PeerId) -> Result<Self> {
        PracticeId::from_peer_id(peer)
            .map(|key| Self { key })
            .map_err(|_| Error::NotEd25519(*peer))
    }

    /// The requester as a practice.
    pub fn practice(&self) -> PracticeId {
        self.key
    }

    /// Its PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.key.peer_id()
    }

    /// Whether the requester is `patient` (same ed25519 key).
    pub fn is_patient(&self, patient: &PatientId) -> bool {
        self.key.as_bytes() == patient.as_bytes()
    }

    fn is(&self, principal: &Principal) -> bool {
        self.key.as_bytes() == principal.key_bytes()
    }
}

/// Why an item was withheld.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Denied {
    /// No grant from the patient names the peer.
    NoGrant,
    /// The peer's grants do not cover the envelope's collection.
    NotCovered,
    /// A covering grant exists but is revoked, expired or not yet valid.
    NotInForce,
    /// A key share addressed to someone else.
    NotRecipient,
    /// The item lacks the metadata its kind needs (a backend bug); withheld.
    Incomplete,
}

/// The filter's answer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Disclosure {
    /// The peer is the item's patient: it gets all of its own items.
    ToPatient,
    /// An envelope, allowed by this grant in force.
    UnderGrant(GrantId),
    /// A grant or revocation of the patient, sent to a holder of this grant
    /// (in force, or the very grant the item is or revokes).
    ToGrantHolder(GrantId),
    /// A key share, sent to its recipient.
    ToRecipient,
    /// Withheld.
    Deny(Denied),
}

impl Disclosure {
    /// Whether the item may be sent.
    pub fn allowed(&self) -> bool {
        !matches!(self, Self::Deny(_))
    }

    /// The grant to name in the audit entry.
    pub fn grant(&self) -> Option<GrantId> {
        match self {
            Self::UnderGrant(g) | Self::ToGrantHolder(g) => Some(*g),
            _ => None,
        }
    }
}

/// May `item` be sent to `peer` now? Pure: decided on signed data (`consent`
/// holds only verified grants and revocations of the item's patient) and the
/// clock. Rules, first match wins:
///
/// 1. The peer is the item's patient → [`Disclosure::ToPatient`].
/// 2. Envelope of (X, C) → allowed iff a grant from X names the peer, covers
///    C and is in force at `now` (not revoked, inside [not-before, expiry)).
/// 3. Key share → only to its recipient.
/// 4. Grant or revocation of X → to the grantee of the grant it is or
///    revokes (in any state: a practice learns its own revocation), and to
///    any peer holding a grant from X in force now.
pub fn may_disclose(item: &ItemMeta, peer: &Requester, consent: &ConsentView, now: Timestamp) -> Disclosure {
    if peer.is_patient(&item.patient) {
        return Disclosure::ToPatient;
    }
    let peer_grants = || {
        consent
            .grants
            .iter()
            .filter(|g| g.terms().patient == item.patient && g.terms().grantee == peer.practice())
    };
    match item.kind {
        ItemKind::Envelope => {
            let Some(collection) = item.collection else {
                return Disclosure::Deny(Denied::Incomplete);
            };
            let mut covered = false;
            for grant in peer_grants().filter(|g| g.covers(collection)) {
                covered = true;
                if grant.in_force(now, consent.is_revoked(grant)) {
                    return Disclosure::UnderGrant(grant.id());
                }
            }
            if covered {
                Disclosure::Deny(Denied::NotInForce)
            } else if peer_grants().next().is_some() {
                Disclosure::Deny(Denied::NotCovered)
            } else {
                Disclosure::Deny(Denied::NoGrant)
            }
        }
        ItemKind::KeyShare => match item.recipient {
            Some(r) if peer.is(&r) => Disclosure::ToRecipient,
            Some(_) => Disclosure::Deny(Denied::NotRecipient),
            None => Disclosure::Deny(Denied::Incomplete),
        },
        ItemKind::Grant | ItemKind::Revocation => {
            let Some(subject) = item.grant else {
                return Disclosure::Deny(Denied::Incomplete);
            };
            // The grant the item is (or revokes) names the peer.
            let own = match item.kind {
                ItemKind::Grant => item.recipient.is_some_and(|r| peer.is(&r)),
                _ => peer_grants().any(|g| g.id() == subject),
            };
            if own {
                return Disclosure::ToGrantHolder(subject);
            }
            match peer_grants().find(|g| g.in_force(now, consent.is_revoked(g))) {
                Some(g) => Disclosure::ToGrantHolder(g.id()),
                None if peer_grants().next().is_some() => Disclosure::Deny(Denied::NotInForce),
                None => Disclosure::Deny(Denied::NoGrant),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use medmesh_crypto::{
        Access, ActorId, Change, Collection, Envelope, EpochKey, Grant, GrantTerms, KeyShare, Revocation,
        RevocationTerms, SecretIdentity,
    };

    use super::*;

    const NOW: Timestamp = 1_800_000_000_000;
    const HOUR: Timestamp = 3_600_000;

    struct World {
        patient: SecretIdentity,
        other_patient: SecretIdentity,
        a: SecretIdentity,
        b: SecretIdentity,
        c: SecretIdentity,
    }

    fn seeded(n: u8) -> SecretIdentity {
        SecretIdentity::from_seed(&[n; 32])
    }

    fn world() -> World {
        World {
            patient: seeded(1),
            other_patient: seeded(2),
            a: seeded(3),
            b: seeded(4),
            c: seeded(5),
        }
    }

    fn grant(
        patient: &SecretIdentity,
        to: &SecretIdentity,
        collections: &[Collection],
        nb: Timestamp,
        exp: Option<Timestamp>,
    ) -> Grant {
        Grant::sign(
            GrantTerms {
                id: GrantId::generate().unwrap(),
                patient: patient.patient_id(),
                grantee: to.practice_id().unwrap(),
                collections: collections.to_vec(),
                access: Access::Read,
                not_before: nb,
                expires: exp,
                purpose: "treatment".into(),
                issued_at: nb,
                address_hints: vec![],
            },
            patient,
        )
        .unwrap()
    }

    fn revoke(patient: &SecretIdentity, g: &Grant) -> Revocation {
        Revocation::sign(
            RevocationTerms {
                patient: patient.patient_id(),
                grant_id: g.id(),
                issued_at: NOW,
                cut: BTreeMap::new(),
            },
            patient,
        )
        .unwrap()
    }

    fn envelope(patient: &SecretIdentity, collection: Collection) -> ItemMeta {
        let key = EpochKey::generate(patient.patient_id(), collection, 0).unwrap();
        let actor = ActorId::for_author(&patient.public_bytes(), [0; 8]);
        let change = Change {
            bytes: b"change",
            hash: [7; 32],
            actor,
            seq: 1,
        };
        ItemMeta::of_envelope(
            &Envelope::seal((key.patient, key.collection), &key, patient, None, change, NOW - HOUR).unwrap(),
        )
    }

    fn share(patient: &SecretIdentity, to: &SecretIdentity) -> ItemMeta {
        let key = EpochKey::generate(patient.patient_id(), Collection::Core, 0).unwrap();
        let recipient = Principal::Practice(to.practice_id().unwrap());
        ItemMeta::of_key_share(&KeyShare::create(&key, recipient, patient, NOW).unwrap())
    }

    fn req(who: &SecretIdentity) -> Requester {
        Requester::from_peer_id(&who.practice_id().unwrap().peer_id()).unwrap()
    }

    #[test]
    fn table() {
        let w = world();
        let core_labs = grant(
            &w.patient,
            &w.b,
            &[Collection::Core, Collection::Labs],
            NOW - HOUR,
            None,
        );
        let future = grant(&w.patient, &w.c, &[Collection::Core], NOW + HOUR, None);
        let expired = grant(&w.patient, &w.c, &[Collection::Labs], NOW - 2 * HOUR, Some(NOW - HOUR));
        let revoked = grant(&w.patient, &w.a, &[Collection::Core], NOW - HOUR, None);
        let revocation = revoke(&w.patient, &revoked);
        let view = ConsentView {
            grants: vec![core_labs.clone(), future.clone(), expired.clone(), revoked.clone()],
            revocations: vec![revocation.clone()],
            ..Default::default()
        };
        let empty = ConsentView::default();
        let by_id = ConsentView {
            grants: vec![revoked.clone()],
            revoked: [revoked.id()].into_iter().collect(),
            ..Default::default()
        };
        let core = envelope(&w.patient, Collection::Core);
        let labs = envelope(&w.patient, Collection::Labs);
        let meds = envelope(&w.patient, Collection::Medications);
        let sensitive = envelope(&w.patient, Collection::Sensitive);
        let others = envelope(&w.other_patient, Collection::Core);
        let share_b = share(&w.patient, &w.b);
        let g_b = ItemMeta::of_grant(&core_labs);
        let g_future = ItemMeta::of_grant(&future);
        let rev = ItemMeta::of_revocation(&revocation);
        let patient_req = Requester::from_peer_id(&w.patient.practice_id().unwrap().peer_id()).unwrap();

        use Denied::*;
        use Disclosure::*;
        #[rustfmt::skip]
        let cases: Vec<(&str, &ItemMeta, Requester, &ConsentView, Disclosure)> = vec![
            ("core to B under grant",            &core,      req(&w.b),   &view,  UnderGrant(core_labs.id())),
            ("labs to B under grant",            &labs,      req(&w.b),   &view,  UnderGrant(core_labs.id())),
            ("meds to B: not covered",           &meds,      req(&w.b),   &view,  Deny(NotCovered)),
            ("sensitive to B: not covered",      &sensitive, req(&w.b),   &view,  Deny(NotCovered)),
            ("core to B without consent known",  &core,      req(&w.b),   &empty, Deny(NoGrant)),
            ("core to C before not-before",      &core,      req(&w.c),   &view,  Deny(NotInForce)),
            ("labs to C after expiry",           &labs,      req(&w.c),   &view,  Deny(NotInForce)),
            ("core to A after revocation",       &core,      req(&w.a),   &view,  Deny(NotInForce)),
            ("core to A, revoked by id only",    &core,      req(&w.a),   &by_id, Deny(NotInForce)),
            ("other patient's core to B",        &others,    req(&w.b),   &view,  Deny(NoGrant)),
            ("core to the patient",              &core,      patient_req, &empty, ToPatient),
            ("sensitive to the patient",         &sensitive, patient_req, &view,  ToPatient),
            ("key share to its recipient",       &share_b,   req(&w.b),   &empty, ToRecipient),
            ("key share to another grantee",     &share_b,   req(&w.c),   &view,  Deny(NotRecipient)),
            ("key share to the patient",         &share_b,   patient_req, &empty, ToPatient),
            ("B's grant to B",                   &g_b,       req(&w.b),   &empty, ToGrantHolder(core_labs.id())),
            ("C's future grant to C",            &g_future,  req(&w.c),   &view,  ToGrantHolder(future.id())),
            ("C's grant to holder B",            &g_future,  req(&w.b),   &view,  ToGrantHolder(core_labs.id())),
            ("B's grant to C (not in force)",    &g_b,       req(&w.c),   &view,  Deny(NotInForce)),
            ("B's grant to a stranger",          &g_b,       req(&w.a),   &empty, Deny(NoGrant)),
            ("revocation to revoked A",          &rev,       req(&w.a),   &view,  ToGrantHolder(revoked.id())),
            ("revocation to holder B",           &rev,       req(&w.b),   &view,  ToGrantHolder(core_labs.id())),
            ("revocation to C (not in force)",   &rev,       req(&w.c),   &view,  Deny(NotInForce)),
        ];
        for (name, item, peer, consent, expected) in cases {
            assert_eq!(may_disclose(item, &peer, consent, NOW), expected, "case: {name}");
        }
    }

    #[test]
    fn window_edges() {
        let w = world();
        let g = grant(&w.patient, &w.b, &[Collection::Core], NOW, Some(NOW + HOUR));
        let view = ConsentView {
            grants: vec![g.clone()],
            ..Default::default()
        };
        let core = envelope(&w.patient, Collection::Core);
        let b = req(&w.b);
        assert!(
            !may_disclose(&core, &b, &view, NOW - 1).allowed(),
            "one ms before not-before"
        );
        assert!(may_disclose(&core, &b, &view, NOW).allowed(), "at not-before");
        assert!(may_disclose(&core, &b, &view, NOW + HOUR - 1).allowed(), "last ms");
        assert!(
            !may_disclose(&core, &b, &view, NOW + HOUR).allowed(),
            "at expiry (exclusive)"
        );
    }

    #[test]
    fn revocation_of_one_grant_leaves_another() {
        let w = world();
        let g1 = grant(&w.patient, &w.b, &[Collection::Core], NOW - HOUR, None);
        let g2 = grant(&w.patient, &w.b, &[Collection::Core], NOW - HOUR, None);
        let view = ConsentView {
            grants: vec![g1.clone(), g2.clone()],
            revocations: vec![revoke(&w.patient, &g1)],
            ..Default::default()
        };
        let core = envelope(&w.patient, Collection::Core);
        assert_eq!(
            may_disclose(&core, &req(&w.b), &view, NOW),
            Disclosure::UnderGrant(g2.id())
        );
    }

    #[test]
    fn grant_of_another_patient_in_view_does_not_count() {
        // A backend bug that mixes patients must not open the door.
        let w = world();
        let g = grant(&w.other_patient, &w.b, &[Collection::Core], NOW - HOUR, None);
        let view = ConsentView {
            grants: vec![g],
            ..Default::default()
        };
        let core = envelope(&w.patient, Collection::Core);
        assert_eq!(
            may_disclose(&core, &req(&w.b), &view, NOW),
            Disclosure::Deny(Denied::NoGrant)
        );
    }

    #[test]
    fn incomplete_meta_is_withheld() {
        let w = world();
        let mut core = envelope(&w.patient, Collection::Core);
        core.collection = None;
        let view = ConsentView::default();
        assert_eq!(
            may_disclose(&core, &req(&w.b), &view, NOW),
            Disclosure::Deny(Denied::Incomplete)
        );
    }
}
