//! Property and rule tests of medmesh-crypto's public API: round trips,
//! single-bit flips (invariant 4), canonical-encoding rejections, version
//! and size limits, who can open what, consent validity, envelope header
//! rules, the keystore file, and `Debug` never showing secrets.
//!
//! Over 800 lines on purpose: the properties of one public API, sharing
//! generators and fixtures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use ciborium::Value;
use medmesh_crypto::*;
use proptest::prelude::*;
use zeroize::Zeroizing;

const SMALL_KDF: KdfParams = KdfParams {
    m_cost_kib: 64,
    t_cost: 1,
    p_cost: 1,
};
const NB: Timestamp = 1_700_000_000_000;
const EXP: Timestamp = 1_800_000_000_000;
const HASH: [u8; 32] = [0x44; 32];

struct Fx {
    patient: SecretIdentity,
    other_patient: SecretIdentity,
    a: SecretIdentity,
    b: SecretIdentity,
    key: EpochKey,
    actor_a: ActorId,
    actor_patient: ActorId,
    grant: Grant,
    revocation: Revocation,
    share: KeyShare,
    envelope: Envelope,
    envelope_patient: Envelope,
}

fn key_for(patient: &SecretIdentity, collection: Collection, epoch: Epoch, key_id: u8, key: u8) -> EpochKey {
    EpochKey::from_parts(
        patient.patient_id(),
        collection,
        epoch,
        KeyId([key_id; 16]),
        Zeroizing::new([key; 32]),
    )
}

fn terms(patient: &SecretIdentity, grantee: &SecretIdentity) -> GrantTerms {
    GrantTerms {
        id: GrantId([7; 16]),
        patient: patient.patient_id(),
        grantee: grantee.practice_id().unwrap(),
        collections: Collection::parse_list("core,labs").unwrap(),
        access: Access::ReadWrite,
        not_before: NB,
        expires: Some(EXP),
        purpose: "treatment".into(),
        issued_at: NB - 1000,
        address_hints: vec!["/ip4/192.0.2.1/tcp/4001".into()],
    }
}

fn change(bytes: &[u8], actor: ActorId, seq: u64) -> Change<'_> {
    Change {
        bytes,
        hash: HASH,
        actor,
        seq,
    }
}

fn fx() -> Fx {
    let patient = SecretIdentity::from_seed(&[1; 32]);
    let other_patient = SecretIdentity::from_seed(&[9; 32]);
    let a = SecretIdentity::from_seed(&[2; 32]);
    let b = SecretIdentity::from_seed(&[3; 32]);
    let key = key_for(&patient, Collection::Labs, 0, 0x11, 0x22);
    let actor_a = ActorId::for_author(&a.public_bytes(), [0xa; 8]);
    let actor_patient = ActorId::for_author(&patient.public_bytes(), [0xb; 8]);
    let grant = Grant::sign(terms(&patient, &a), &patient).unwrap();
    let revocation = Revocation::sign(
        RevocationTerms {
            patient: patient.patient_id(),
            grant_id: grant.id(),
            issued_at: NB + 5000,
            cut: [(actor_a, 42)].into_iter().collect(),
        },
        &patient,
    )
    .unwrap();
    let share = KeyShare::create(&key, Principal::Practice(a.practice_id().unwrap()), &patient, NB).unwrap();
    let envelope = Envelope::seal(
        (key.patient, key.collection),
        &key,
        &a,
        Some(grant.id()),
        change(b"practice change", actor_a, 1),
        NB + 10,
    )
    .unwrap();
    let envelope_patient = Envelope::seal(
        (key.patient, key.collection),
        &key,
        &patient,
        None,
        change(b"patient change", actor_patient, 3),
        NB,
    )
    .unwrap();
    Fx {
        patient,
        other_patient,
        a,
        b,
        key,
        actor_a,
        actor_patient,
        grant,
        revocation,
        share,
        envelope,
        envelope_patient,
    }
}

fn flip(bytes: &[u8], bit: usize) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[bit / 8] ^= 1 << (bit % 8);
    b
}

fn cbor(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(v, &mut out).unwrap();
    out
}

fn uncbor(b: &[u8]) -> Value {
    ciborium::de::from_reader(b).unwrap()
}

// ---------------------------------------------------------------- round trips

#[test]
fn every_object_round_trips() {
    let f = fx();
    assert_eq!(Grant::decode(f.grant.encoded()).unwrap(), f.grant);
    assert_eq!(Revocation::decode(f.revocation.encoded()).unwrap(), f.revocation);
    assert_eq!(KeyShare::decode(f.share.encoded()).unwrap(), f.share);
    for env in [&f.envelope, &f.envelope_patient] {
        let back = Envelope::decode(&env.encode()).unwrap();
        assert_eq!(&back, env);
        assert_eq!(back.encode(), env.encode());
        let sh = SignedHeader::decode(&env.signed_header().encode()).unwrap();
        assert_eq!(&sh, env.signed_header());
        assert!(sh.matches_change(&f.key, &HASH));
        assert!(!sh.matches_change(&f.key, &[0; 32]));
    }
    assert_eq!(
        &f.envelope.open(&f.key, |_| Some(HASH)).unwrap()[..],
        b"practice change"
    );
    assert_eq!(
        &f.envelope_patient.open(&f.key, |_| Some(HASH)).unwrap()[..],
        b"patient change"
    );
    assert_eq!(f.share.open(&f.a).unwrap().secret(), f.key.secret());
}

fn arb_terms() -> impl Strategy<Value = GrantTerms> {
    (
        any::<[u8; 16]>(),
        proptest::sample::subsequence(Collection::ALL.to_vec(), 1..=7),
        any::<bool>(),
        0u64..u64::MAX / 2,
        proptest::option::of(1u64..u64::MAX / 2),
        "[a-z-]{1,32}",
        any::<u64>(),
        proptest::collection::vec("[ -~]{0,256}", 0..16),
    )
        .prop_map(|(id, collections, rw, nb, dur, purpose, issued, hints)| {
            let patient = SecretIdentity::from_seed(&[1; 32]);
            let a = SecretIdentity::from_seed(&[2; 32]);
            GrantTerms {
                id: GrantId(id),
                patient: patient.patient_id(),
                grantee: a.practice_id().unwrap(),
                collections,
                access: if rw { Access::ReadWrite } else { Access::Read },
                not_before: nb,
                expires: dur.map(|d| nb + d),
                purpose,
                issued_at: issued,
                address_hints: hints,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_grants_round_trip(t in arb_terms()) {
        let patient = SecretIdentity::from_seed(&[1; 32]);
        let g = Grant::sign(t.clone(), &patient).unwrap();
        let back = Grant::decode(g.encoded()).unwrap();
        prop_assert_eq!(back.terms(), &t);
        prop_assert_eq!(back.encoded(), g.encoded());
    }

    #[test]
    fn random_revocations_round_trip(cut in proptest::collection::btree_map(any::<[u8; 24]>(), any::<u64>(), 0..64),
                                     issued in any::<u64>()) {
        let patient = SecretIdentity::from_seed(&[1; 32]);
        let t = RevocationTerms {
            patient: patient.patient_id(),
            grant_id: GrantId([5; 16]),
            issued_at: issued,
            cut: cut.into_iter().map(|(a, s)| (ActorId(a), s)).collect(),
        };
        let r = Revocation::sign(t.clone(), &patient).unwrap();
        let back = Revocation::decode(r.encoded()).unwrap();
        prop_assert_eq!(back.terms(), &t);
    }

    #[test]
    fn random_changes_seal_and_open(bytes in proptest::collection::vec(any::<u8>(), 0..4096), seq in any::<u64>(),
                                    created in any::<u64>()) {
        let f = fx();
        let env = Envelope::seal((f.key.patient, f.key.collection),&f.key, &f.a, Some(f.grant.id()), change(&bytes, f.actor_a, seq), created).unwrap();
        let back = Envelope::decode(&env.encode()).unwrap();
        prop_assert_eq!(&back.open(&f.key, |_| Some(HASH)).unwrap()[..], &bytes[..]);
        prop_assert_eq!(back.header().seq, seq);
        prop_assert_eq!(back.header().created_at, created);
    }
}

// ---------------------------------------------------------------- bit flips

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn flipped_grant_is_rejected(i in any::<prop::sample::Index>()) {
        let f = fx();
        let bytes = f.grant.encoded();
        prop_assert!(Grant::decode(&flip(bytes, i.index(bytes.len() * 8))).is_err());
    }

    #[test]
    fn flipped_revocation_is_rejected(i in any::<prop::sample::Index>()) {
        let f = fx();
        let bytes = f.revocation.encoded();
        prop_assert!(Revocation::decode(&flip(bytes, i.index(bytes.len() * 8))).is_err());
    }

    #[test]
    fn flipped_key_share_is_rejected(i in any::<prop::sample::Index>()) {
        let f = fx();
        let bytes = f.share.encoded();
        let b = flip(bytes, i.index(bytes.len() * 8));
        prop_assert!(KeyShare::decode(&b).and_then(|s| s.open(&f.a)).is_err());
    }

    #[test]
    fn flipped_envelope_is_rejected(i in any::<prop::sample::Index>()) {
        let f = fx();
        let bytes = f.envelope.encode();
        let b = flip(&bytes, i.index(bytes.len() * 8));
        prop_assert!(Envelope::decode(&b).and_then(|e| e.open(&f.key, |_| Some(HASH))).is_err());
    }

    #[test]
    fn flipped_signed_header_is_rejected(i in any::<prop::sample::Index>()) {
        let f = fx();
        let bytes = f.envelope.signed_header().encode();
        prop_assert!(SignedHeader::decode(&flip(&bytes, i.index(bytes.len() * 8))).is_err());
    }

    #[test]
    fn flipped_compact_header_never_restores_another_envelope(i in any::<prop::sample::Index>()) {
        let f = fx();
        let bytes = f.envelope.signed_header().compact().encode();
        let b = flip(&bytes, i.index(bytes.len() * 8));
        let restored = CompactHeader::decode(&b)
            .and_then(|c| c.restore(&f.key, change(b"practice change", f.actor_a, 1)));
        prop_assert!(restored.is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = Grant::decode(&bytes);
        let _ = Revocation::decode(&bytes);
        let _ = CompactHeader::decode(&bytes);
        let _ = KeyShare::decode(&bytes);
        let _ = Envelope::decode(&bytes);
        let _ = SignedHeader::decode(&bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn flipped_keystore_file_is_rejected(i in any::<prop::sample::Index>()) {
        let f = fx();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ks");
        let mut ks = Keystore::new(SecretIdentity::from_seed(&[1; 32]), SMALL_KDF);
        ks.keys.push(f.key.clone());
        ks.grants.push(f.grant.clone());
        ks.create(&path, b"pw").unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, flip(&bytes, i.index(bytes.len() * 8))).unwrap();
        prop_assert!(Keystore::open(&path, b"pw").is_err());
    }
}

// ---------------------------------------------------------------- canonical form, versions, sizes

fn is_noncanonical_or_malformed(r: Result<impl std::fmt::Debug>) -> bool {
    matches!(r, Err(Error::NonCanonical { .. } | Error::Malformed { .. }))
}

#[test]
fn non_canonical_encodings_are_rejected() {
    let f = fx();
    let g = f.grant.encoded();
    // g = 82 8b 01 …: the version 1 as a one-byte-argument integer (18 01).
    assert_eq!(&g[..3], &[0x82, 0x8b, 0x01]);
    let mut long_int = vec![0x82, 0x8b, 0x18, 0x01];
    long_int.extend_from_slice(&g[3..]);
    assert!(matches!(Grant::decode(&long_int), Err(Error::NonCanonical { .. })));
    // Indefinite-length outer array.
    let mut indefinite = vec![0x9f];
    indefinite.extend_from_slice(&g[1..]);
    indefinite.push(0xff);
    assert!(matches!(Grant::decode(&indefinite), Err(Error::NonCanonical { .. })));
    // A trailing byte.
    let mut trailing = g.to_vec();
    trailing.push(0x00);
    assert!(is_noncanonical_or_malformed(Grant::decode(&trailing)));
    // Length of the signature byte string in long form (59 00 40 instead of 58 40).
    let n = g.len();
    assert_eq!(&g[n - 66..n - 64], &[0x58, 0x40]);
    let mut long_len = g[..n - 66].to_vec();
    long_len.extend_from_slice(&[0x59, 0x00, 0x40]);
    long_len.extend_from_slice(&g[n - 64..]);
    assert!(matches!(Grant::decode(&long_len), Err(Error::NonCanonical { .. })));
    // Same for an envelope and a key share: indefinite outer array.
    for bytes in [
        f.envelope.encode(),
        f.share.encoded().to_vec(),
        f.revocation.encoded().to_vec(),
    ] {
        let mut ind = vec![0x9f];
        ind.extend_from_slice(&bytes[1..]);
        ind.push(0xff);
        assert!(matches!(Envelope::decode(&ind), Err(Error::NonCanonical { .. })));
        assert!(matches!(KeyShare::decode(&ind), Err(Error::NonCanonical { .. })));
        assert!(matches!(Revocation::decode(&ind), Err(Error::NonCanonical { .. })));
    }
    // Maps, floats, tags and truncation are malformed.
    for bad in [
        vec![0xa0],
        vec![0xf9, 0x3c, 0x00],
        vec![0xc1, 0x00],
        g[..g.len() - 1].to_vec(),
        vec![],
    ] {
        assert!(
            matches!(Grant::decode(&bad), Err(Error::Malformed { .. })),
            "{bad:02x?}"
        );
    }
}

#[test]
fn revocation_cut_must_be_sorted() {
    let f = fx();
    // Re-encode the revocation body with two cut entries in descending order;
    // the decoder refuses before even looking at the signature.
    let Value::Array(outer) = uncbor(f.revocation.encoded()) else {
        panic!()
    };
    let Value::Array(mut body) = outer[0].clone() else {
        panic!()
    };
    body[4] = Value::Array(vec![
        Value::Array(vec![Value::Bytes(vec![2; 24]), Value::Integer(1.into())]),
        Value::Array(vec![Value::Bytes(vec![1; 24]), Value::Integer(1.into())]),
    ]);
    let bytes = cbor(&Value::Array(vec![Value::Array(body), outer[1].clone()]));
    assert!(matches!(Revocation::decode(&bytes), Err(Error::NonCanonical { .. })));
}

#[test]
fn unknown_versions_are_reported_as_such() {
    let f = fx();
    let bump = |bytes: &[u8], extra: bool| {
        let Value::Array(mut outer) = uncbor(bytes) else {
            panic!()
        };
        let Value::Array(mut body) = outer[0].clone() else {
            panic!()
        };
        body[0] = Value::Integer(2.into());
        if extra {
            body.push(Value::Text("a field from the future".into()));
        }
        outer[0] = Value::Array(body);
        cbor(&Value::Array(outer))
    };
    for extra in [false, true] {
        let v = |r: Result<_>| matches!(r, Err(Error::UnsupportedVersion { version: 2, .. }));
        assert!(v(Grant::decode(&bump(f.grant.encoded(), extra)).map(|_| ())));
        assert!(v(Revocation::decode(&bump(f.revocation.encoded(), extra)).map(|_| ())));
        assert!(v(KeyShare::decode(&bump(f.share.encoded(), extra)).map(|_| ())));
        assert!(v(Envelope::decode(&bump(&f.envelope.encode(), extra)).map(|_| ())));
        assert!(v(SignedHeader::decode(&bump(
            &f.envelope.signed_header().encode(),
            extra
        ))
        .map(|_| ())));
    }
}

#[test]
fn oversize_inputs_are_refused_before_parsing() {
    let too_large = |r: Result<()>| matches!(r, Err(Error::TooLarge { .. }));
    assert!(too_large(Grant::decode(&vec![0; MAX_GRANT_BYTES + 1]).map(|_| ())));
    assert!(too_large(
        Revocation::decode(&vec![0; MAX_REVOCATION_BYTES + 1]).map(|_| ())
    ));
    assert!(too_large(
        KeyShare::decode(&vec![0; MAX_KEYSHARE_BYTES + 1]).map(|_| ())
    ));
    assert!(too_large(
        SignedHeader::decode(&vec![0; MAX_SIGNED_HEADER_BYTES + 1]).map(|_| ())
    ));
    assert!(too_large(
        Envelope::decode(&vec![0; MAX_ENVELOPE_BYTES + 1]).map(|_| ())
    ));
}

#[test]
fn item_bombs_are_refused_without_building_them() {
    // An array header claiming 2^32-1 members, and a real array of 100 000 zeros.
    assert!(matches!(
        Envelope::decode(&[0x9a, 0xff, 0xff, 0xff, 0xff]),
        Err(Error::Malformed { .. })
    ));
    let mut many = vec![0x83, 0x9a, 0x00, 0x01, 0x86, 0xa0];
    many.extend(std::iter::repeat_n(0u8, 100_000));
    assert!(matches!(Envelope::decode(&many), Err(Error::Malformed { .. })));
    // Deep nesting.
    let deep = vec![0x81; 10_000];
    assert!(matches!(Envelope::decode(&deep), Err(Error::Malformed { .. })));
}

// ---------------------------------------------------------------- who can open what

#[test]
fn key_share_opens_only_for_its_recipient() {
    let f = fx();
    assert!(f.share.open(&f.a).is_ok());
    assert!(matches!(f.share.open(&f.b), Err(Error::NotRecipient { .. })));
    assert!(matches!(f.share.open(&f.patient), Err(Error::NotRecipient { .. })));
    let own = KeyShare::create(&f.key, Principal::Patient(f.patient.patient_id()), &f.patient, NB).unwrap();
    assert_eq!(own.open(&f.patient).unwrap().secret(), f.key.secret());
    assert!(matches!(own.open(&f.a), Err(Error::NotRecipient { .. })));
    // Only the key's patient can sign a share of it.
    assert!(matches!(
        KeyShare::create(
            &f.key,
            Principal::Practice(f.a.practice_id().unwrap()),
            &f.other_patient,
            NB
        ),
        Err(Error::WrongSigner { .. })
    ));
}

#[test]
fn envelope_opens_only_with_its_epoch_key() {
    let f = fx();
    let ok = |k: &EpochKey| f.envelope.open(k, |_| Some(HASH));
    assert!(ok(&f.key).is_ok());
    let next_epoch = key_for(&f.patient, Collection::Labs, 1, 0x12, 0x23);
    let other_collection = key_for(&f.patient, Collection::Core, 0, 0x13, 0x24);
    let other_patient = key_for(&f.other_patient, Collection::Labs, 0, 0x11, 0x22);
    for k in [&next_epoch, &other_collection, &other_patient] {
        assert!(matches!(ok(k), Err(Error::WrongKey { .. })), "{k:?}");
    }
    // Same labels, other key bytes: the AEAD refuses.
    let forged = key_for(&f.patient, Collection::Labs, 0, 0x11, 0x99);
    assert!(matches!(ok(&forged), Err(Error::Decrypt { .. })));
    // Right key, wrong change: the keyed change hash refuses.
    assert!(matches!(
        f.envelope.open(&f.key, |_| Some([0; 32])),
        Err(Error::ChangeHash { .. })
    ));
    assert!(matches!(
        f.envelope.open(&f.key, |_| None),
        Err(Error::ChangeHash { .. })
    ));
}

// ---------------------------------------------------------------- consent validity

#[test]
fn grant_in_force_window() {
    let f = fx();
    let g = &f.grant;
    assert!(!g.in_force(NB - 1, false), "before not-before");
    assert!(g.in_force(NB, false), "at not-before");
    assert!(g.in_force(EXP - 1, false), "just before expiry");
    assert!(!g.in_force(EXP, false), "at expiry");
    assert!(!g.in_force(EXP + 1, false), "after expiry");
    assert!(!g.in_force(NB + 1, true), "revoked");
    assert!(f.revocation.revokes(g));
    let mut open_ended = terms(&f.patient, &f.a);
    open_ended.expires = None;
    assert!(Grant::sign(open_ended, &f.patient).unwrap().in_force(u64::MAX, false));
}

#[test]
fn grant_terms_are_checked_when_signing() {
    let f = fx();
    let bad = |t: GrantTerms| Grant::sign(t, &f.patient);
    let mut t = terms(&f.patient, &f.a);
    t.expires = Some(NB);
    assert!(matches!(bad(t), Err(Error::InvalidField { field: "expires", .. })));
    let mut t = terms(&f.patient, &f.a);
    t.collections = vec![Collection::Labs, Collection::Core];
    assert!(matches!(bad(t), Err(Error::InvalidField { .. })));
    let mut t = terms(&f.patient, &f.a);
    t.collections.clear();
    assert!(matches!(bad(t), Err(Error::InvalidField { .. })));
    let mut t = terms(&f.patient, &f.a);
    t.purpose = "Treatment".into();
    assert!(matches!(bad(t), Err(Error::InvalidField { field: "purpose", .. })));
    assert!(matches!(
        Grant::sign(terms(&f.patient, &f.a), &f.other_patient),
        Err(Error::WrongSigner { .. })
    ));
    assert!(!Collection::parse_list("all").unwrap().contains(&Collection::Sensitive));
    assert!(
        Collection::parse_list("all,sensitive")
            .unwrap()
            .contains(&Collection::Sensitive)
    );
    assert!(matches!(
        Collection::parse_list("nope"),
        Err(Error::UnknownCollection(_))
    ));
}

#[test]
fn admits_change_rules() {
    let f = fx();
    let g = &f.grant;
    let a = f.actor_a;
    let skew = NOT_BEFORE_SKEW_MS;
    assert!(
        g.admits_change(Collection::Labs, NB + 1, &a, 1, None),
        "inside the window"
    );
    assert!(
        g.admits_change(Collection::Labs, NB - skew, &a, 1, None),
        "at the skew edge"
    );
    assert!(
        !g.admits_change(Collection::Labs, NB - skew - 1, &a, 1, None),
        "beyond the skew"
    );
    assert!(
        g.admits_change(Collection::Labs, EXP - 1, &a, 1, None),
        "just before expiry"
    );
    assert!(!g.admits_change(Collection::Labs, EXP, &a, 1, None), "at expiry");
    assert!(
        !g.admits_change(Collection::Billing, NB + 1, &a, 1, None),
        "other collection"
    );
    let b_actor = ActorId::for_author(&f.b.public_bytes(), [0xa; 8]);
    assert!(
        !g.admits_change(Collection::Labs, NB + 1, &b_actor, 1, None),
        "actor of another author"
    );
    assert!(
        !g.admits_change(Collection::Labs, NB + 1, &f.actor_patient, 1, None),
        "patient's actor"
    );
    // Cut: seq ≤ 42 of actor a stays valid, later changes and other actors do not.
    let r = Some(&f.revocation);
    assert!(g.admits_change(Collection::Labs, NB + 1, &a, 42, r), "inside the cut");
    assert!(!g.admits_change(Collection::Labs, NB + 1, &a, 43, r), "after the cut");
    let a2 = ActorId::for_author(&f.a.public_bytes(), [0xc; 8]);
    assert!(
        !g.admits_change(Collection::Labs, NB + 1, &a2, 1, r),
        "actor not in the cut"
    );
    // Issue 15: a change signed after the revocation is outside it, whatever its seq.
    let issued = f.revocation.terms().issued_at;
    assert!(
        g.admits_change(Collection::Labs, issued, &a, 1, r),
        "signed at the revocation"
    );
    assert!(
        !g.admits_change(Collection::Labs, issued + 1, &a, 1, r),
        "signed after the revocation, inside the cut's seq"
    );
    // A revocation of another grant does not count as this grant's cut.
    let other = Revocation::sign(
        RevocationTerms {
            patient: f.patient.patient_id(),
            grant_id: GrantId([8; 16]),
            issued_at: NB,
            cut: [(a, u64::MAX)].into_iter().collect(),
        },
        &f.patient,
    )
    .unwrap();
    assert!(!g.admits_change(Collection::Labs, NB + 1, &a, 1, Some(&other)));
    // Nor does one with this grant's id signed by another patient.
    let foreign = Revocation::sign(
        RevocationTerms {
            patient: f.other_patient.patient_id(),
            grant_id: g.id(),
            issued_at: NB,
            cut: [(a, u64::MAX)].into_iter().collect(),
        },
        &f.other_patient,
    )
    .unwrap();
    assert!(!foreign.revokes(g));
    assert!(!g.admits_change(Collection::Labs, NB + 1, &a, 1, Some(&foreign)));
    // Read-only grants admit no change at all.
    let mut t = terms(&f.patient, &f.a);
    t.access = Access::Read;
    let read = Grant::sign(t, &f.patient).unwrap();
    assert!(!read.admits_change(Collection::Labs, NB + 1, &a, 1, None), "read-only");
}

/// Issue 15: one envelope with a huge seq for a fresh actor must not
/// inflate the cut; the cut stops at the first gap of each actor, per
/// collection.
#[test]
fn revocation_cut_is_contiguous() {
    let f = fx();
    let a = f.actor_a;
    let fresh = ActorId::for_author(&f.a.public_bytes(), [0xd; 8]);
    let held = [
        (Collection::Labs, a, 1),
        (Collection::Labs, a, 3),
        (Collection::Labs, a, 2),
        (Collection::Labs, a, 5),
        (Collection::Labs, fresh, 1 << 62),
    ];
    let cut = revocation_cut(held);
    assert_eq!(cut.get(&a), Some(&3), "up to the first gap");
    assert_eq!(cut.get(&fresh), None, "an actor without seq 1 is not in the cut");
    // Per collection: core 1..=2 and labs 1..=4 give 4, never core's 7 after a gap.
    let per_collection = revocation_cut([
        (Collection::Core, a, 1),
        (Collection::Core, a, 2),
        (Collection::Core, a, 7),
        (Collection::Labs, a, 1),
        (Collection::Labs, a, 2),
        (Collection::Labs, a, 3),
        (Collection::Labs, a, 4),
        (Collection::Labs, a, 4),
    ]);
    assert_eq!(per_collection.get(&a), Some(&4));
}

// ---------------------------------------------------------------- envelope header rules

/// Issue 15 item 1: the record decides whose envelope it is. A key of
/// another patient (found by a key id that patient copied) or of another
/// collection is refused, never used to relabel the change.
#[test]
fn seal_refuses_a_key_of_another_record() {
    let f = fx();
    let x = f.patient.patient_id();
    // Another patient's key with the very same key id.
    let copied = key_for(&f.other_patient, Collection::Labs, 0, 0x11, 0x33);
    assert_eq!(copied.key_id, f.key.key_id);
    let refused = |r: Result<Envelope>| matches!(r, Err(Error::KeyNotOfRecord { collection: "labs" }));
    assert!(refused(Envelope::seal(
        (x, Collection::Labs),
        &copied,
        &f.a,
        Some(f.grant.id()),
        change(b"x", f.actor_a, 1),
        NB
    )));
    // The record's patient, but the key of another collection.
    let core = key_for(&f.patient, Collection::Core, 0, 0x11, 0x22);
    assert!(refused(Envelope::seal(
        (x, Collection::Labs),
        &core,
        &f.a,
        Some(f.grant.id()),
        change(b"x", f.actor_a, 1),
        NB
    )));
    assert!(refused(Envelope::seal_with_nonce(
        (x, Collection::Labs),
        &copied,
        &f.patient,
        None,
        change(b"x", f.actor_patient, 1),
        NB,
        [7; 24]
    )));
    // The record's own key: sealed as the record, and only that key opens it.
    let sealed = Envelope::seal(
        (x, Collection::Labs),
        &f.key,
        &f.a,
        Some(f.grant.id()),
        change(b"x", f.actor_a, 1),
        NB,
    )
    .unwrap();
    assert_eq!(
        (sealed.header().patient, sealed.header().collection),
        (x, Collection::Labs)
    );
    assert_eq!(sealed.header().key_ref(), f.key.key_ref());
    assert!(matches!(
        sealed.open(&copied, |_| Some(HASH)),
        Err(Error::WrongKey { .. })
    ));
    assert!(sealed.open(&f.key, |_| Some(HASH)).is_ok());
}

#[test]
fn envelope_header_rules() {
    let f = fx();
    let invalid = |r: Result<Envelope>| matches!(r, Err(Error::InvalidField { .. }));
    // A practice must name its grant; the patient must not.
    assert!(invalid(Envelope::seal(
        (f.key.patient, f.key.collection),
        &f.key,
        &f.a,
        None,
        change(b"x", f.actor_a, 1),
        NB
    )));
    assert!(invalid(Envelope::seal(
        (f.key.patient, f.key.collection),
        &f.key,
        &f.patient,
        Some(f.grant.id()),
        change(b"x", f.actor_patient, 1),
        NB
    )));
    // The actor must belong to the author.
    assert!(invalid(Envelope::seal(
        (f.key.patient, f.key.collection),
        &f.key,
        &f.a,
        Some(f.grant.id()),
        change(b"x", f.actor_patient, 1),
        NB
    )));
    assert!(invalid(Envelope::seal(
        (f.key.patient, f.key.collection),
        &f.key,
        &f.patient,
        None,
        change(b"x", f.actor_a, 1),
        NB
    )));
    assert_eq!(f.envelope.header().grant_id, Some(f.grant.id()));
    assert_eq!(f.envelope_patient.header().grant_id, None);
    assert!(matches!(f.envelope.header().author, Principal::Practice(_)));
    assert_eq!(
        f.envelope_patient.header().author,
        Principal::Patient(f.patient.patient_id())
    );
}

#[test]
fn decoded_headers_enforce_the_same_rules() {
    // A validly signed header that drops its grant id is refused on decode
    // (re-signed here with the practice key, as a lying peer could).
    let f = fx();
    let Value::Array(outer) = uncbor(&f.envelope.signed_header().encode()) else {
        panic!()
    };
    let Value::Array(mut body) = outer[0].clone() else {
        panic!()
    };
    body[7] = Value::Null;
    let body_bytes = cbor(&Value::Array(body.clone()));
    let signer = ed25519_dalek::SigningKey::from_bytes(&[2; 32]);
    let mut msg = ENVELOPE_TAG.to_vec();
    msg.extend_from_slice(&body_bytes);
    let sig = ed25519_dalek::Signer::sign(&signer, &msg).to_bytes();
    let bytes = cbor(&Value::Array(vec![Value::Array(body), Value::Bytes(sig.to_vec())]));
    assert!(matches!(SignedHeader::decode(&bytes), Err(Error::InvalidField { .. })));
}

#[test]
fn compact_header_restores_the_exact_envelope() {
    let f = fx();
    for (envelope, author_actor, bytes, seq) in [
        (&f.envelope, f.actor_a, &b"practice change"[..], 1),
        (&f.envelope_patient, f.actor_patient, &b"patient change"[..], 3),
    ] {
        let compact = CompactHeader::decode(&envelope.signed_header().compact().encode()).unwrap();
        // Both hashes travel nowhere: the compact form is shorter by them.
        assert!(compact.encode().len() + 2 * 34 <= envelope.signed_header().encode().len());
        assert_eq!(CompactHeader::of_stored_envelope(&envelope.encode()).unwrap(), compact);
        let restored = compact.restore(&f.key, change(bytes, author_actor, seq)).unwrap();
        assert_eq!(restored.encode(), envelope.encode());
        assert_eq!(restored.id(), envelope.id());

        // Another change, actor, sequence number or key: never an envelope.
        assert!(matches!(
            compact.restore(&f.key, change(b"another change", author_actor, seq)),
            Err(Error::BadSignature { .. })
        ));
        let mut other_hash = change(bytes, author_actor, seq);
        other_hash.hash = [0x77; 32];
        assert!(matches!(
            compact.restore(&f.key, other_hash),
            Err(Error::BadSignature { .. })
        ));
        assert!(matches!(
            compact.restore(&f.key, change(bytes, author_actor, seq + 1)),
            Err(Error::InvalidField { .. })
        ));
        let other_key = key_for(&f.patient, Collection::Labs, 0, 0x12, 0x22);
        assert!(matches!(
            compact.restore(&other_key, change(bytes, author_actor, seq)),
            Err(Error::WrongKey { .. })
        ));
    }
}

#[test]
fn ciphertext_swap_is_caught() {
    let f = fx();
    let other = Envelope::seal(
        (f.key.patient, f.key.collection),
        &f.key,
        &f.a,
        Some(f.grant.id()),
        change(b"other", f.actor_a, 2),
        NB,
    )
    .unwrap();
    // Header of one envelope with the ciphertext of another.
    let mut bytes = f.envelope.signed_header().encode();
    bytes[0] = 0x83;
    let ct = other.ciphertext();
    bytes.push(0x40 | ct.len() as u8);
    bytes.extend_from_slice(ct);
    assert!(matches!(Envelope::decode(&bytes), Err(Error::CiphertextHash { .. })));
}

// ---------------------------------------------------------------- ids

#[test]
fn did_key_and_peer_id_parsing() {
    let f = fx();
    let did = f.patient.patient_id().to_string();
    assert!(did.starts_with("did:key:z6Mk"));
    assert_eq!(did.parse::<PatientId>().unwrap(), f.patient.patient_id());
    for bad in [
        "did:key:6Mk",
        "did:web:example.com",
        &did.replace('z', "Z"),
        &format!("{did}0"),
        &format!("{}l", &did[..did.len() - 1]),
    ] {
        assert!(matches!(bad.parse::<PatientId>(), Err(Error::InvalidDid(_))), "{bad}");
    }
    let pid = f.a.practice_id().unwrap();
    assert_eq!(pid.to_string().parse::<PracticeId>().unwrap(), pid);
    assert_eq!(f.a.to_libp2p().unwrap().public().to_peer_id(), pid.peer_id());
    assert_eq!(
        SecretIdentity::from_libp2p(&f.a.to_libp2p().unwrap())
            .unwrap()
            .public_bytes(),
        f.a.public_bytes()
    );
    // A PeerId that hashes its key (here a secp256k1-sized fake) is not a practice.
    assert!(
        "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
            .parse::<PracticeId>()
            .is_err()
    );
    assert!(f.actor_a.belongs_to(&f.a.public_bytes()));
    assert!(!f.actor_a.belongs_to(&f.b.public_bytes()));
}

// ---------------------------------------------------------------- keystore

fn keystore(f: &Fx, params: KdfParams) -> Keystore {
    let mut ks = Keystore::new(SecretIdentity::from_seed(&[1; 32]), params);
    ks.keys.push(f.key.clone());
    ks.grants.push(f.grant.clone());
    ks.revocations.push(f.revocation.clone());
    ks
}

#[test]
fn keystore_round_trip_passphrase_and_permissions() {
    let f = fx();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("patient.keystore");
    keystore(&f, SMALL_KDF).create(&path, b"right").unwrap();
    let back = Keystore::open(&path, b"right").unwrap();
    assert_eq!(back.patient(), f.patient.patient_id());
    assert_eq!(back.keys.len(), 1);
    assert_eq!(back.keys[0].secret(), f.key.secret());
    assert_eq!(back.grants, vec![f.grant.clone()]);
    assert_eq!(back.revocations, vec![f.revocation.clone()]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
    // A wrong passphrase fails and leaves the file as it was.
    let before = std::fs::read(&path).unwrap();
    assert!(matches!(Keystore::open(&path, b"wrong"), Err(Error::KeystoreLocked)));
    assert!(matches!(Keystore::open(&path, b""), Err(Error::KeystoreLocked)));
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // `create` refuses to overwrite, and does not touch the existing file.
    let other = Keystore::new(SecretIdentity::from_seed(&[9; 32]), SMALL_KDF);
    assert!(matches!(other.create(&path, b"x"), Err(Error::KeystoreExists(_))));
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // Only the keystore itself is left in the directory (no temporary files).
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    // `save` replaces atomically.
    let mut ks = Keystore::open(&path, b"right").unwrap();
    ks.keys.push(key_for(&f.patient, Collection::Labs, 1, 0x12, 0x23));
    ks.save(&path, b"new").unwrap();
    assert_eq!(Keystore::open(&path, b"new").unwrap().keys.len(), 2);
    // An unsubmitted grant survives a save (a sixth field) and is not live.
    let mut ks = Keystore::open(&path, b"new").unwrap();
    ks.unsubmitted.push(f.grant.id());
    ks.save(&path, b"new").unwrap();
    let back = Keystore::open(&path, b"new").unwrap();
    assert_eq!(back.unsubmitted, vec![f.grant.id()]);
    assert!(!back.is_submitted(&f.grant));
    assert_eq!(back.live_grants(0).count(), 0);
    // An address book survives too (a seventh field), the unsubmitted grant
    // with it; and with no unsubmitted grant, the sixth field is kept empty.
    let mut ks = back;
    ks.practices.push(vec![0xAB; 120]);
    ks.save(&path, b"new").unwrap();
    let mut back = Keystore::open(&path, b"new").unwrap();
    assert_eq!(
        (back.practices.clone(), back.unsubmitted.clone()),
        (vec![vec![0xAB; 120]], vec![f.grant.id()])
    );
    back.unsubmitted.clear();
    back.save(&path, b"new").unwrap();
    let back = Keystore::open(&path, b"new").unwrap();
    assert_eq!((back.practices.len(), back.unsubmitted.len()), (1, 0));
    assert!(matches!(Keystore::open(&path, b"right"), Err(Error::KeystoreLocked)));
    // Missing file: an I/O error, not a panic.
    assert!(matches!(
        Keystore::open(&dir.path().join("none"), b"x"),
        Err(Error::Io { .. })
    ));
}

#[test]
fn keystore_with_default_kdf_params() {
    let f = fx();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ks");
    keystore(&f, KdfParams::DEFAULT).create(&path, b"pass").unwrap();
    assert_eq!(
        Keystore::open(&path, b"pass").unwrap().patient(),
        f.patient.patient_id()
    );
}

// ---------------------------------------------------------------- Debug hides secrets

#[test]
fn debug_never_shows_secret_bytes() {
    let f = fx();
    let seed_hex = hex::encode(f.patient.seed().as_ref());
    let key_hex = hex::encode(f.key.secret());
    let ks = keystore(&f, SMALL_KDF);
    for (what, text) in [
        ("identity", format!("{:?} {:#?}", f.patient, f.patient)),
        ("epoch key", format!("{:?} {:#?}", f.key, f.key)),
        ("keystore", format!("{ks:?} {ks:#?}")),
    ] {
        for secret in [&seed_hex, &key_hex] {
            assert!(!text.contains(secret.as_str()), "{what} Debug shows a secret");
        }
        // Also not as a decimal byte list (the derived Debug of an array).
        assert!(!text.contains("34, 34, 34, 34"), "{what} Debug shows key bytes");
        assert!(!text.contains("1, 1, 1, 1, 1"), "{what} Debug shows seed bytes");
    }
    // Errors carry no secrets either.
    let err = f
        .envelope
        .open(&key_for(&f.patient, Collection::Labs, 0, 0x11, 0x99), |_| Some(HASH));
    assert!(!format!("{err:?}").contains("9999"));
}

#[test]
fn revocation_cut_map_is_sorted_on_the_wire() {
    let f = fx();
    let cut: BTreeMap<ActorId, u64> = (0u8..5).map(|i| (ActorId([5 - i; 24]), u64::from(i))).collect();
    let r = Revocation::sign(
        RevocationTerms {
            patient: f.patient.patient_id(),
            grant_id: GrantId([7; 16]),
            issued_at: NB,
            cut,
        },
        &f.patient,
    )
    .unwrap();
    assert_eq!(Revocation::decode(r.encoded()).unwrap(), r);
}
