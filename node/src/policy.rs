//! The consent policy, written once (DESIGN §5, §6; invariants 1, 6, 7):
//! [`may_disclose`] decides whether an item may leave this node for a
//! peer, [`admits`] whether an envelope's signed header is valid under its
//! grant. Sync's serving and consent flows, the node's ingest and every
//! in-memory test backend call these two; nothing else decides consent.
//! Both are pure: signed data and the clock in, a verdict with its reason
//! out.

use medmesh_crypto::{EnvelopeHeader, Grant, GrantId, PatientId, PeerId, PracticeId, Principal, Revocation, Timestamp};

use crate::item::{ItemKind, ItemMeta};

/// The consent items a node holds for one patient: verified grants and the
/// revocations of them, both bound to that patient.
#[derive(Clone, Debug, Default)]
pub struct ConsentView {
    /// Every grant from this patient the node holds.
    pub grants: Vec<Grant>,
    /// Every revocation of one of them the node holds.
    pub revocations: Vec<Revocation>,
}

impl ConsentView {
    /// Whether the node holds a revocation of `grant`.
    pub fn is_revoked(&self, grant: &Grant) -> bool {
        self.revocations.iter().any(|r| r.revokes(grant))
    }

    /// The grant with this id, if held.
    pub fn grant(&self, id: GrantId) -> Option<&Grant> {
        self.grants.iter().find(|g| g.id() == id)
    }

    /// The revocations held of `grant`.
    pub fn revocations_of<'a>(&'a self, grant: &'a Grant) -> impl Iterator<Item = &'a Revocation> {
        self.revocations.iter().filter(|r| r.revokes(grant))
    }
}

/// A PeerId that does not inline an ed25519 key: no practice or patient.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
#[error("peer {0} has no ed25519 key")]
pub struct NotEd25519(pub PeerId);

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
    /// [`NotEd25519`] for a PeerId that does not inline an ed25519 key.
    pub fn from_peer_id(peer: &PeerId) -> Result<Self, NotEd25519> {
        PracticeId::from_peer_id(peer)
            .map(|key| Self { key })
            .map_err(|_| NotEd25519(*peer))
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
        ItemKind::KeyShare => match item.recipient() {
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
                ItemKind::Grant => item.recipient().is_some_and(|r| peer.is(&r)),
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

/// The verdict on an envelope's signed header.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Validity {
    /// Written by the patient, or under a grant that admits it.
    Valid,
    /// Its grant (the header's patient's, with this id) is not held: wait.
    MissingGrant(PatientId, GrantId),
    /// Permanently invalid (reason without content).
    Invalid(&'static str),
}

/// Is the envelope with header `h` valid (DESIGN §5)? Decided on signed
/// data only, so every node decides the same whatever the arrival order:
/// the patient wrote it, or its author is the grantee of `grant` (the
/// header's patient's grant with the header's grant id, as held), its actor
/// belongs to that author, and its signed created-at lies inside the
/// grant's window with read-write access to its collection; if the grant
/// is revoked, its change must lie inside *every* held revocation's cut.
pub fn admits<'a>(
    h: &EnvelopeHeader,
    grant: Option<&Grant>,
    revocations: impl IntoIterator<Item = &'a Revocation>,
) -> Validity {
    if h.seq == 0 {
        // An actor's changes count from 1: seq 0 could never follow a held change.
        return Validity::Invalid("change seq 0");
    }
    let (author, grant_id) = match (h.author, h.grant_id) {
        (Principal::Patient(p), None) if p == h.patient => return Validity::Valid,
        (Principal::Practice(author), Some(g)) => (author, g),
        _ => return Validity::Invalid("author and grant do not fit"),
    };
    let Some(grant) = grant else {
        return Validity::MissingGrant(h.patient, grant_id);
    };
    let t = grant.terms();
    if t.patient != h.patient || t.id != grant_id {
        // The caller looked up the wrong grant; never judge under it.
        return Validity::MissingGrant(h.patient, grant_id);
    }
    if t.grantee != author {
        return Validity::Invalid("author is not the grantee");
    }
    if !h.actor.belongs_to(author.as_bytes()) {
        return Validity::Invalid("actor does not belong to the author");
    }
    let mut revoked = false;
    for r in revocations.into_iter().filter(|r| r.revokes(grant)) {
        revoked = true;
        if !grant.admits_change(h.collection, h.created_at, &h.actor, h.seq, Some(r)) {
            return Validity::Invalid("outside the grant's window, access or revocation cut");
        }
    }
    if revoked || grant.admits_change(h.collection, h.created_at, &h.actor, h.seq, None) {
        Validity::Valid
    } else {
        Validity::Invalid("outside the grant's window or access")
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
        };
        let empty = ConsentView::default();
        let by_id = ConsentView {
            grants: vec![revoked.clone()],
            revocations: vec![revocation.clone()],
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

    fn write_grant(patient: &SecretIdentity, to: &SecretIdentity, id: GrantId, access: Access) -> Grant {
        Grant::sign(
            GrantTerms {
                id,
                patient: patient.patient_id(),
                grantee: to.practice_id().unwrap(),
                collections: vec![Collection::Labs],
                access,
                not_before: NOW - HOUR,
                expires: None,
                purpose: "treatment".into(),
                issued_at: NOW - HOUR,
                address_hints: vec![],
            },
            patient,
        )
        .unwrap()
    }

    fn revoke_at(patient: &SecretIdentity, g: &Grant, cut: &[(ActorId, u64)]) -> Revocation {
        Revocation::sign(
            RevocationTerms {
                patient: patient.patient_id(),
                grant_id: g.id(),
                issued_at: NOW,
                cut: cut.iter().copied().collect(),
            },
            patient,
        )
        .unwrap()
    }

    /// An envelope header of change `seq` of `actor`, by `author` under `grant`.
    fn header(
        patient: &SecretIdentity,
        author: &SecretIdentity,
        grant: Option<GrantId>,
        actor: ActorId,
        seq: u64,
    ) -> medmesh_crypto::EnvelopeHeader {
        let key = EpochKey::generate(patient.patient_id(), Collection::Labs, 0).unwrap();
        let change = Change {
            bytes: b"change",
            hash: [7; 32],
            actor,
            seq,
        };
        Envelope::seal((key.patient, key.collection), &key, author, grant, change, NOW - 60_000)
            .unwrap()
            .header()
            .clone()
    }

    /// `admits`, the rule ingest and every test backend apply, case by case.
    #[test]
    fn admits_table() {
        let w = world();
        let id = GrantId::generate().unwrap();
        let rw = write_grant(&w.patient, &w.b, id, Access::ReadWrite);
        let read_only = write_grant(&w.patient, &w.b, id, Access::Read);
        // Another patient's grant that copies the id.
        let copy = write_grant(&w.other_patient, &w.b, id, Access::ReadWrite);
        let b_actor = ActorId::for_author(&w.b.public_bytes(), [1; 8]);
        let c_actor = ActorId::for_author(&w.c.public_bytes(), [1; 8]);
        let p_actor = ActorId::for_author(&w.patient.public_bytes(), [1; 8]);
        let by_b = header(&w.patient, &w.b, Some(id), b_actor, 3);
        let by_c = header(&w.patient, &w.c, Some(id), c_actor, 1);
        let by_patient = header(&w.patient, &w.patient, None, p_actor, 1);
        let seq_0 = header(&w.patient, &w.b, Some(id), b_actor, 0);
        let up_to_3 = revoke_at(&w.patient, &rw, &[(b_actor, 3)]);
        let up_to_2 = revoke_at(&w.patient, &rw, &[(b_actor, 2)]);
        let none: [&Revocation; 0] = [];

        use Validity::*;
        type Case<'a> = (
            &'a str,
            &'a medmesh_crypto::EnvelopeHeader,
            Option<&'a Grant>,
            Vec<&'a Revocation>,
            Validity,
        );
        #[rustfmt::skip]
        let cases: Vec<Case<'_>> = vec![
            ("the patient writes",                 &by_patient,     None,             vec![],                  Valid),
            ("the grantee under its grant",        &by_b,           Some(&rw),        vec![],                  Valid),
            ("its grant not held yet",             &by_b,           None,             vec![],                  MissingGrant(w.patient.patient_id(), id)),
            ("another patient's grant, same id",   &by_b,           Some(&copy),      vec![],                  MissingGrant(w.patient.patient_id(), id)),
            ("a read-only grant",                  &by_b,           Some(&read_only), vec![],                  Invalid("outside the grant's window or access")),
            ("not the grantee",                    &by_c,           Some(&rw),        vec![],                  Invalid("author is not the grantee")),
            ("change seq 0",                       &seq_0,          Some(&rw),        vec![],                  Invalid("change seq 0")),
            ("inside the revocation's cut",        &by_b,           Some(&rw),        vec![&up_to_3],          Valid),
            ("beyond one of two revocations' cut", &by_b,           Some(&rw),        vec![&up_to_3, &up_to_2], Invalid("outside the grant's window, access or revocation cut")),
        ];
        for (label, h, grant, revocations, expected) in cases {
            assert_eq!(admits(h, grant, revocations), expected, "case {label}");
        }
        assert_eq!(admits(&by_b, Some(&rw), none), Valid, "no revocations");
    }
}
