//! Quick end-to-end use of the public API.
use medmesh_crypto::*;

#[test]
fn grant_keyshare_envelope_round_trip() {
    let patient = SecretIdentity::from_seed(&[1; 32]);
    let practice = SecretIdentity::from_seed(&[2; 32]);
    let pid = patient.patient_id();
    let did = pid.to_string();
    assert!(did.starts_with("did:key:z6Mk"), "{did}");
    assert_eq!(did.parse::<PatientId>().unwrap(), pid);
    let practice_id = practice.practice_id().unwrap();
    let peer = practice_id.to_string();
    assert!(peer.starts_with("12D3KooW"), "{peer}");
    assert_eq!(peer.parse::<PracticeId>().unwrap(), practice_id);
    assert_eq!(
        practice.to_libp2p().unwrap().public().to_peer_id(),
        practice_id.peer_id()
    );

    let grant = Grant::sign(
        GrantTerms {
            id: GrantId([7; 16]),
            patient: pid,
            grantee: practice_id,
            collections: Collection::parse_list("all").unwrap(),
            access: Access::ReadWrite,
            not_before: 1000,
            expires: Some(2000),
            purpose: "treatment".into(),
            issued_at: 900,
            address_hints: vec!["/ip4/127.0.0.1/tcp/1".into()],
        },
        &patient,
    )
    .unwrap();
    let back = Grant::decode(grant.encoded()).unwrap();
    assert_eq!(back, grant);
    assert!(!grant.covers(Collection::Sensitive));

    let key = EpochKey::generate(pid, Collection::Labs, 0).unwrap();
    let share = KeyShare::create(&key, Principal::Practice(practice_id), &patient, 1000).unwrap();
    let share = KeyShare::decode(share.encoded()).unwrap();
    let opened = share.open(&practice).unwrap();
    assert_eq!(opened.secret(), key.secret());
    assert!(share.open(&patient).is_err());

    let actor = ActorId::for_author(&practice.public_bytes(), [0; 8]);
    let env = Envelope::seal(
        (key.patient, key.collection),
        &key,
        &practice,
        Some(grant.id()),
        Change {
            bytes: b"change bytes",
            hash: [9; 32],
            actor,
            seq: 1,
        },
        1500,
    )
    .unwrap();
    let bytes = env.encode();
    let env2 = Envelope::decode(&bytes).unwrap();
    assert_eq!(env2.id(), env.id());
    let plain = env2.open(&opened, |_| Some([9; 32])).unwrap();
    assert_eq!(&plain[..], b"change bytes");
    assert!(env2.open(&opened, |_| Some([8; 32])).is_err());
    let sh = SignedHeader::decode(&env.signed_header().encode()).unwrap();
    assert_eq!(sh.id(), env.id());
    assert!(grant.admits_change(Collection::Labs, 1500, &actor, 1, None));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ks");
    let mut ks = Keystore::new(
        SecretIdentity::from_seed(&[1; 32]),
        KdfParams {
            m_cost_kib: 64,
            t_cost: 1,
            p_cost: 1,
        },
    );
    ks.keys.push(key.clone());
    ks.grants.push(grant.clone());
    ks.create(&path, b"pw").unwrap();
    let ks2 = Keystore::open(&path, b"pw").unwrap();
    assert_eq!(ks2.patient(), pid);
    assert_eq!(ks2.grants, vec![grant]);
    assert!(matches!(Keystore::open(&path, b"bad"), Err(Error::KeystoreLocked)));
}
