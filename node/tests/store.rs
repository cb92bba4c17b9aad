//! Store, write path, ingest, consent and audit tests of medmesh-node
//! (DESIGN §5, §8, §9 invariants 4 and 5; validity order independence).
//!
//! Over 800 lines on purpose: one subject (the node's store and ingest), one
//! scenario per test, fixtures shared.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use medmesh_crypto::{Access, Collection, Envelope, EnvelopeId, Grant, PatientId, Principal, SecretIdentity, now};
use medmesh_node::audit::{Action, ActorKind, AuditRecord};
use medmesh_node::item::Item;
use medmesh_node::repository::{self, Repository};
use medmesh_node::store::{ItemId, ItemKind, SledStore, Store as _, StoredItem};
use medmesh_node::testing::{ChangeMaker, FlushControl, TestPatient};
use medmesh_node::{Config, Error, Event, Node, Source};

const CORE: Collection = Collection::Core;

async fn open(dir: &Path, seed: u8) -> Node {
    Node::open(dir, SecretIdentity::from_seed(&[seed; 32]), Config::default())
        .await
        .unwrap()
}

/// A node with a read-write grant and the epoch-0 key of `core`.
async fn onboarded(dir: &Path, seed: u8, patient: &mut TestPatient) -> (Node, Grant) {
    let node = open(dir, seed).await;
    let (grant, items) = patient.onboard(node.practice_id(), CORE).unwrap();
    let report = node.submit(patient.id(), items).await.unwrap();
    assert_eq!(report.counts.accepted, 2, "{report:?}");
    (node, grant)
}

fn envelopes_of(items: &[StoredItem]) -> Vec<Item> {
    items
        .iter()
        .filter(|i| i.meta.kind == ItemKind::Envelope)
        .map(|i| Item::new(i.meta.kind, i.item.bytes.clone()))
        .collect()
}

#[tokio::test]
async fn write_read_back_holdings_and_audit() {
    let dir = tempfile::tempdir().unwrap();
    let mut patient = TestPatient::new().unwrap();
    let (node, grant) = onboarded(dir.path(), 1, &mut patient).await;
    let mut events = node.subscribe();
    let mut maker = ChangeMaker::new(node.practice_id().as_bytes()).unwrap();
    let change = maker.put("name", "Ada").unwrap();
    let id = node.write_change(patient.id(), CORE, change.as_change()).await.unwrap();

    match events.recv().await.unwrap() {
        Event::Stored(s) => {
            assert_eq!(s.meta.id, ItemId::from(id));
            assert_eq!(s.meta.kind, ItemKind::Envelope);
            assert_eq!(s.meta.patient, patient.id());
            assert_eq!(s.meta.collection, Some(CORE));
            assert_eq!(s.meta.grant, Some(grant.id()), "the grant it was written under");
            assert_eq!(s.seq, node.last_seq());
        }
        other => panic!("unexpected {other:?}"),
    }
    let changes = node.readable_changes(patient.id(), CORE).await.unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].as_slice(), change.bytes.as_slice());

    let h = node.holdings(&patient.id()).unwrap();
    assert_eq!((h.envelopes, h.readable, h.opaque), (1, 1, 0));
    assert_eq!(h.by_collection.get("core"), Some(&1));
    let json = serde_json::to_value(&h).unwrap();
    assert_eq!(json["patient"], patient.id().to_string());
    assert_eq!(json["by_collection"]["core"], 1);

    node.audit(AuditRecord {
        actor_kind: ActorKind::LocalApp,
        actor_id: "emr".into(),
        action: Action::Read,
        patient: Some(patient.id()),
        items: vec![id.into()],
        grant: None,
        outcome: "ok".into(),
    })
    .await
    .unwrap();
    let entries = node.audit_entries(Some(&patient.id())).unwrap();
    let actions: Vec<Action> = entries.iter().map(|e| e.action).collect();
    assert_eq!(actions, [Action::Grant, Action::KeyShare, Action::Write, Action::Read]);
    assert_eq!(entries[2].grant, Some(grant.id()));
    assert_eq!(node.audit_verify().unwrap().entries, 4);
}

#[tokio::test]
async fn write_refused_without_grant_or_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut patient = TestPatient::new().unwrap();
    let node = open(dir.path(), 2).await;
    let mut maker = ChangeMaker::new(node.practice_id().as_bytes()).unwrap();
    let c = maker.put("k", "v").unwrap();
    assert!(matches!(
        node.write_change(patient.id(), CORE, c.as_change()).await,
        Err(Error::NoWriteGrant { .. })
    ));
    // A grant but no key share.
    let grant = patient
        .grant(node.practice_id(), &[CORE], Access::ReadWrite, now() - 1000, None)
        .unwrap();
    node.submit_grant(patient.id(), grant.encoded().to_vec()).await.unwrap();
    assert!(matches!(
        node.write_change(patient.id(), CORE, c.as_change()).await,
        Err(Error::NoEpochKey { .. })
    ));
    // A read-only grant for labs: no write.
    let share = patient
        .share(Collection::Labs, 0, Principal::Practice(node.practice_id()))
        .unwrap();
    let read = patient
        .grant(
            node.practice_id(),
            &[Collection::Labs],
            Access::Read,
            now() - 1000,
            None,
        )
        .unwrap();
    node.submit(
        patient.id(),
        vec![
            Item::new(ItemKind::Grant, read.encoded().to_vec()),
            Item::new(ItemKind::KeyShare, share.encoded().to_vec()),
        ],
    )
    .await
    .unwrap();
    assert!(matches!(
        node.write_change(patient.id(), Collection::Labs, c.as_change()).await,
        Err(Error::NoWriteGrant { .. })
    ));
    // Another author's actor.
    let mut foreign = ChangeMaker::new(&[9; 32]).unwrap();
    let f = foreign.put("k", "v").unwrap();
    assert!(matches!(
        node.write_change(patient.id(), CORE, f.as_change()).await,
        Err(Error::ForeignActor)
    ));
    assert_eq!(node.holdings(&patient.id()).unwrap().envelopes, 0);
    assert!(node.audit_verify().is_ok());
}

#[tokio::test]
async fn concurrent_writers_all_durable_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut patient = TestPatient::new().unwrap();
    let (node, _) = onboarded(dir.path(), 3, &mut patient).await;
    let mut tasks = Vec::new();
    for w in 0..64 {
        let node = node.clone();
        let p = patient.id();
        tasks.push(tokio::spawn(async move {
            let mut maker = ChangeMaker::new(node.practice_id().as_bytes()).unwrap();
            let mut ids = Vec::new();
            for i in 0..4 {
                let c = maker.put("k", &format!("{w}-{i}")).unwrap();
                ids.push(node.write_change(p, CORE, c.as_change()).await.unwrap());
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    assert_eq!(ids.len(), 256);
    node.close().await;
    drop(node);
    let node = open(dir.path(), 3).await;
    let held = node.envelope_ids(&patient.id(), CORE).unwrap();
    for id in &ids {
        assert!(held.contains(id), "{id} lost");
    }
    assert_eq!(node.readable_changes(patient.id(), CORE).await.unwrap().len(), 256);
    // Keys were re-opened from the stored share: writing still works.
    let mut maker = ChangeMaker::new(node.practice_id().as_bytes()).unwrap();
    let c = maker.put("after", "reopen").unwrap();
    node.write_change(patient.id(), CORE, c.as_change()).await.unwrap();
    assert_eq!(node.audit_verify().unwrap().entries, 2 + 256 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_flush_fails_every_waiting_writer_and_poisons_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FlushControl::new(
        SledStore::open(dir.path()).unwrap(),
        std::time::Duration::ZERO,
    ));
    let node = Node::with_store(store.clone(), SecretIdentity::from_seed(&[4; 32]), Config::default())
        .await
        .unwrap();
    let mut patient = TestPatient::new().unwrap();
    let (_, items) = patient.onboard(node.practice_id(), CORE).unwrap();
    node.submit(patient.id(), items).await.unwrap();
    let mut maker = ChangeMaker::new(node.practice_id().as_bytes()).unwrap();
    let before = maker.put("k", "durable").unwrap();
    node.write_change(patient.id(), CORE, before.as_change()).await.unwrap();
    store.fail_flushes(true);
    let mut tasks = Vec::new();
    for w in 0..16 {
        let node = node.clone();
        let c = maker.put("k", &format!("{w}")).unwrap();
        let p = patient.id();
        tasks.push(tokio::spawn(
            async move { node.write_change(p, CORE, c.as_change()).await },
        ));
    }
    for t in tasks {
        // No writer whose flush failed, or that came after it, is told its write is durable.
        let outcome = t.await.unwrap();
        assert!(
            matches!(outcome, Err(Error::Storage(_) | Error::Poisoned)),
            "{outcome:?}"
        );
    }
    // The store stays poisoned even once flushes work again: what is on disk is unknown.
    store.fail_flushes(false);
    let after = maker.put("k", "after").unwrap();
    let outcome = node.write_change(patient.id(), CORE, after.as_change()).await;
    assert!(matches!(outcome, Err(Error::Poisoned)), "{outcome:?}");
    node.close().await;
}

#[tokio::test]
async fn ingest_opaque_then_unlocked_pending_then_released() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut patient = TestPatient::new().unwrap();
    let (a, _) = onboarded(da.path(), 4, &mut patient).await;
    let b = open(db.path(), 5).await;
    let mut maker = ChangeMaker::new(a.practice_id().as_bytes()).unwrap();
    for i in 0..5 {
        let c = maker.put("k", &i.to_string()).unwrap();
        a.write_change(patient.id(), CORE, c.as_change()).await.unwrap();
    }
    let all = a.items_after(0, 100).await.unwrap();
    assert_eq!(all.len(), 7);
    let from = Source::Peer(a.practice_id().peer_id());

    // Envelopes first: A's grant is unknown at B, so they wait.
    let r = b.ingest(envelopes_of(&all), from.clone()).await.unwrap();
    assert_eq!((r.counts.accepted, r.counts.pending), (0, 5), "{r:?}");
    assert_eq!(b.pending_count().unwrap(), 5);
    // Same page again: duplicates, still pending once.
    let r = b.ingest(envelopes_of(&all), from.clone()).await.unwrap();
    assert_eq!((r.counts.pending, r.counts.duplicates), (0, 5));

    // A's grant arrives: released, opaque (B holds no key).
    let grant = all.iter().find(|i| i.meta.kind == ItemKind::Grant).unwrap();
    let r = b
        .ingest(vec![Item::new(ItemKind::Grant, grant.item.bytes.clone())], from.clone())
        .await
        .unwrap();
    assert_eq!(
        (r.counts.accepted, r.counts.opaque, r.counts.readable),
        (6, 5, 0),
        "{r:?}"
    );
    assert_eq!(b.pending_count().unwrap(), 0);
    let h = b.holdings(&patient.id()).unwrap();
    assert_eq!((h.envelopes, h.readable, h.opaque), (5, 0, 5));

    // B gets a read grant and its key share: the opaque envelopes unlock.
    let mut events = b.subscribe();
    let read = patient
        .grant(b.practice_id(), &[CORE], Access::Read, now() - 1000, None)
        .unwrap();
    let share = patient.share(CORE, 0, Principal::Practice(b.practice_id())).unwrap();
    let r = b
        .submit(
            patient.id(),
            vec![
                Item::new(ItemKind::Grant, read.encoded().to_vec()),
                Item::new(ItemKind::KeyShare, share.encoded().to_vec()),
            ],
        )
        .await
        .unwrap();
    assert_eq!(r.counts.unlocked, 5, "{r:?}");
    let h = b.holdings(&patient.id()).unwrap();
    assert_eq!((h.envelopes, h.readable, h.opaque), (5, 5, 0));
    let mut readable = Vec::new();
    while let Ok(e) = events.try_recv() {
        if let Event::Readable { ids, .. } = e {
            readable.extend(ids);
        }
    }
    assert_eq!(readable.len(), 5);
    let changes = b.changes_by_ids(patient.id(), CORE, &readable).await.unwrap();
    assert_eq!(changes.len(), 5);
    // Consent checks for serving.
    let env_meta = &all.iter().find(|i| i.meta.kind == ItemKind::Envelope).unwrap().meta;
    assert!(!a.may_disclose(&b.practice_id().peer_id(), env_meta).allowed());
    assert!(b.may_disclose(&a.practice_id().peer_id(), env_meta).allowed());
    assert_eq!(b.peers_with_grant_from(&patient.id()).len(), 2);
}

/// A (grantee A) writes 6 changes; the patient revokes with a cut at seq 3.
struct Scenario {
    patient: PatientId,
    grant: Vec<u8>,
    shares: Vec<Vec<u8>>,
    revocation: Vec<u8>,
    /// (envelope bytes, id, inside the cut)
    envelopes: Vec<(Vec<u8>, EnvelopeId, bool)>,
}

async fn scenario(reader: &SecretIdentity) -> Scenario {
    let dir = tempfile::tempdir().unwrap();
    let mut patient = TestPatient::new().unwrap();
    let (a, grant) = onboarded(dir.path(), 6, &mut patient).await;
    let mut maker = ChangeMaker::new(a.practice_id().as_bytes()).unwrap();
    let mut envelopes = Vec::new();
    for i in 0..6 {
        let c = maker.put("k", &i.to_string()).unwrap();
        let id = a.write_change(patient.id(), CORE, c.as_change()).await.unwrap();
        let bytes = a.item(&id.into()).await.unwrap().unwrap().item.bytes;
        envelopes.push((bytes, id, c.seq <= 3));
    }
    let revocation = patient.revoke(&grant, BTreeMap::from([(maker.actor(), 3)])).unwrap();
    let reader_share = patient
        .share(CORE, 0, Principal::Practice(reader.practice_id().unwrap()))
        .unwrap();
    Scenario {
        patient: patient.id(),
        grant: grant.encoded().to_vec(),
        shares: vec![reader_share.encoded().to_vec()],
        revocation: revocation.encoded().to_vec(),
        envelopes,
    }
}

#[tokio::test]
async fn revocation_excludes_envelopes_beyond_the_cut() {
    let reader = SecretIdentity::from_seed(&[7; 32]);
    let s = scenario(&reader).await;
    let dir = tempfile::tempdir().unwrap();
    let b = Node::open(dir.path(), SecretIdentity::from_seed(&[7; 32]), Config::default())
        .await
        .unwrap();
    let mut items = vec![Item::new(ItemKind::Grant, s.grant.clone())];
    items.extend(s.shares.iter().map(|x| Item::new(ItemKind::KeyShare, x.clone())));
    items.extend(
        s.envelopes
            .iter()
            .map(|(b, _, _)| Item::new(ItemKind::Envelope, b.clone())),
    );
    let r = b.ingest(items, Source::Patient(s.patient)).await.unwrap();
    assert_eq!(r.counts.readable, 6, "{r:?}");
    let mut events = b.subscribe();
    let r = b.submit_revocation(s.patient, s.revocation.clone()).await.unwrap();
    assert_eq!(r.counts.excluded, 3);
    let held = b.envelope_ids(&s.patient, CORE).unwrap();
    for (_, id, inside) in &s.envelopes {
        assert_eq!(held.contains(id), *inside);
        assert_eq!(b.is_rejected(&id.0).unwrap(), !*inside);
    }
    let mut excluded = 0;
    while let Ok(e) = events.try_recv() {
        if let Event::Excluded { ids, .. } = e {
            excluded += ids.len();
        }
    }
    assert_eq!(excluded, 3);
    assert_eq!(b.readable_changes(s.patient, CORE).await.unwrap().len(), 3);
    // A late envelope beyond the cut is rejected at once, once.
    let late = Item::new(ItemKind::Envelope, s.envelopes[5].0.clone());
    let r = b.ingest(vec![late], Source::Patient(s.patient)).await.unwrap();
    assert_eq!((r.counts.accepted, r.counts.duplicates), (0, 1));
}

mod order {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn runtime() -> &'static tokio::runtime::Runtime {
        static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
        RT.get_or_init(|| tokio::runtime::Runtime::new().unwrap())
    }

    fn fixed() -> &'static Scenario {
        static S: OnceLock<Scenario> = OnceLock::new();
        S.get_or_init(|| runtime().block_on(scenario(&SecretIdentity::from_seed(&[8; 32]))))
    }

    /// Delivers every item of the scenario in `order`, in pages of `page`
    /// items, and returns the (held, readable) envelope ids.
    fn deliver(order: &[usize], page: usize) -> (Vec<EnvelopeId>, u64) {
        let s = fixed();
        let mut all = vec![Item::new(ItemKind::Grant, s.grant.clone())];
        all.extend(s.shares.iter().map(|x| Item::new(ItemKind::KeyShare, x.clone())));
        all.push(Item::new(ItemKind::Revocation, s.revocation.clone()));
        all.extend(
            s.envelopes
                .iter()
                .map(|(b, _, _)| Item::new(ItemKind::Envelope, b.clone())),
        );
        let items: Vec<Item> = order.iter().map(|i| all[*i].clone()).collect();
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let b = Node::open(dir.path(), SecretIdentity::from_seed(&[8; 32]), Config::default())
                .await
                .unwrap();
            for chunk in items.chunks(page.max(1)) {
                b.ingest(chunk.to_vec(), Source::Patient(s.patient)).await.unwrap();
                // Duplicates change nothing.
                b.ingest(chunk[..1].to_vec(), Source::Patient(s.patient)).await.unwrap();
            }
            let mut held = b.envelope_ids(&s.patient, CORE).unwrap();
            held.sort();
            let readable = b.holdings(&s.patient).unwrap().readable;
            assert!(b.audit_verify().is_ok());
            (held, readable)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn same_items_any_order_same_accepted_set(
            order in Just((0..9usize).collect::<Vec<_>>()).prop_shuffle(),
            page in 1usize..5,
        ) {
            let s = fixed();
            let mut expected: Vec<EnvelopeId> =
                s.envelopes.iter().filter(|(_, _, inside)| *inside).map(|(_, id, _)| *id).collect();
            expected.sort();
            let (held, readable) = deliver(&order, page);
            prop_assert_eq!(&held, &expected);
            prop_assert_eq!(readable, 3);
        }
    }
}

fn flip_all(bytes: &[u8]) -> Vec<Item> {
    (0..bytes.len() * 8)
        .map(|i| {
            let mut b = bytes.to_vec();
            b[i / 8] ^= 1 << (i % 8);
            b
        })
        .map(|b| Item::new(ItemKind::Envelope, b))
        .collect()
}

#[tokio::test]
async fn every_bit_flip_of_received_items_is_refused() {
    let reader = SecretIdentity::from_seed(&[10; 32]);
    let s = scenario(&reader).await;
    let dir = tempfile::tempdir().unwrap();
    let b = Node::open(dir.path(), SecretIdentity::from_seed(&[10; 32]), Config::default())
        .await
        .unwrap();
    // The node knows the grant and key, so only the flip can stop an item.
    let mut base = vec![Item::new(ItemKind::Grant, s.grant.clone())];
    base.extend(s.shares.iter().map(|x| Item::new(ItemKind::KeyShare, x.clone())));
    b.ingest(base, Source::Patient(s.patient)).await.unwrap();
    let cases: Vec<(ItemKind, Vec<u8>)> = vec![
        (ItemKind::Envelope, s.envelopes[0].0.clone()),
        (ItemKind::Grant, s.grant.clone()),
        (ItemKind::Revocation, s.revocation.clone()),
        (ItemKind::KeyShare, s.shares[0].clone()),
    ];
    for (kind, bytes) in cases {
        let flipped: Vec<Item> = flip_all(&bytes).into_iter().map(|i| Item::new(kind, i.bytes)).collect();
        let n = flipped.len();
        let r = b.ingest(flipped, Source::Patient(s.patient)).await.unwrap();
        assert_eq!(r.counts.accepted, 0, "{kind:?}: a flipped item was accepted");
        // Only flips of the format version field may wait (a newer format).
        assert!(r.counts.pending <= 8, "{kind:?}: {} pending", r.counts.pending);
        assert_eq!(
            r.counts.rejected + r.counts.pending + r.counts.duplicates,
            n as u64,
            "{kind:?}"
        );
        assert_eq!(
            r.counts.rejected,
            r.rejected.len() as u64,
            "{kind:?}: one count, one reason per rejection"
        );
        for x in &r.rejected {
            assert!(
                matches!(x.error, Error::Crypto(_) | Error::Rejected { .. }),
                "{:?}",
                x.error
            );
        }
    }
    // The genuine envelope is still accepted afterwards: no flip poisoned its id.
    let r = b
        .ingest(
            vec![Item::new(ItemKind::Envelope, s.envelopes[0].0.clone())],
            Source::Patient(s.patient),
        )
        .await
        .unwrap();
    assert_eq!(r.counts.readable, 1, "{r:?}");
}

#[tokio::test]
async fn bit_flips_at_rest_are_caught_and_repairable() {
    let dir = tempfile::tempdir().unwrap();
    let mut patient = TestPatient::new().unwrap();
    let (node, _) = onboarded(dir.path(), 11, &mut patient).await;
    let mut maker = ChangeMaker::new(node.practice_id().as_bytes()).unwrap();
    let c = maker.put("k", "v").unwrap();
    let id = node.write_change(patient.id(), CORE, c.as_change()).await.unwrap();
    let store = node.raw_store();
    let original = store.raw_item_bytes(&id.into()).unwrap().unwrap();
    let bits = original.len() * 8;
    // A spread of positions over header, signature and ciphertext.
    for i in (0..bits).step_by(bits / 48) {
        let mut b = original.clone();
        b[i / 8] ^= 1 << (i % 8);
        store.raw_replace_item_bytes(&id.into(), &b).unwrap();
        match node.item(&id.into()).await {
            Err(Error::CorruptItem { .. }) => {}
            other => panic!("bit {i}: {other:?}"),
        }
        assert!(node.envelope_ids(&patient.id(), CORE).unwrap().is_empty(), "bit {i}");
        // Repair from a good copy (as reconciliation would).
        let r = node
            .ingest(
                vec![Item::new(ItemKind::Envelope, original.clone())],
                Source::Patient(patient.id()),
            )
            .await
            .unwrap();
        assert_eq!(r.counts.readable, 1, "bit {i}: {r:?}");
    }
    let actions: Vec<Action> = node.audit_entries(None).unwrap().iter().map(|e| e.action).collect();
    assert!(actions.contains(&Action::Quarantine));
}

#[tokio::test]
async fn a_load_skips_and_quarantines_an_envelope_corrupted_at_rest() {
    let dir = tempfile::tempdir().unwrap();
    let mut patient = TestPatient::new().unwrap();
    let (node, _) = onboarded(dir.path(), 12, &mut patient).await;
    let mut maker = ChangeMaker::new(node.practice_id().as_bytes()).unwrap();
    // Enough envelopes that the load checks them on several threads.
    let mut ids = Vec::new();
    for i in 0..100 {
        let c = maker.put("k", &format!("v{i}")).unwrap();
        ids.push(node.write_change(patient.id(), CORE, c.as_change()).await.unwrap());
    }
    let store = node.raw_store();
    let bad = ids[77];
    let mut bytes = store.raw_item_bytes(&bad.into()).unwrap().unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x10;
    store.raw_replace_item_bytes(&bad.into(), &bytes).unwrap();
    let loaded = node.changes_by_ids(patient.id(), CORE, &ids).await.unwrap();
    let loaded_ids: Vec<EnvelopeId> = loaded.iter().map(|(id, _)| *id).collect();
    let expected: Vec<EnvelopeId> = ids.iter().copied().filter(|id| *id != bad).collect();
    assert_eq!(loaded_ids, expected, "in store order, without the corrupt one");
    assert!(!node.envelope_ids(&patient.id(), CORE).unwrap().contains(&bad));
    let quarantined = node
        .audit_entries(None)
        .unwrap()
        .into_iter()
        .filter(|e| e.action == Action::Quarantine)
        .count();
    assert_eq!(quarantined, 1);
}

#[tokio::test]
async fn audit_tampering_is_located() {
    let dir = tempfile::tempdir().unwrap();
    let mut patient = TestPatient::new().unwrap();
    let (node, _) = onboarded(dir.path(), 12, &mut patient).await;
    let mut maker = ChangeMaker::new(node.practice_id().as_bytes()).unwrap();
    for i in 0..3 {
        let c = maker.put("k", &i.to_string()).unwrap();
        node.write_change(patient.id(), CORE, c.as_change()).await.unwrap();
    }
    assert_eq!(node.audit_verify().unwrap().entries, 5);
    let store = node.raw_store();
    let raw = store.audit_raw(3).unwrap();
    let mut third = raw[0].1.clone();
    let at = third.len() / 2;
    third[at] ^= 0x01;
    store.raw_replace_audit(3, &third).unwrap();
    match node.audit_verify() {
        Err(Error::AuditBroken(b)) => assert_eq!(b.seq, 3),
        other => panic!("{other:?}"),
    }
}

/// Issue 15, item 8: someone holding the data directory but not the node
/// key removes the last audit entries of a stopped node (the chain that is
/// left is whole). The checkpoint the node signed and kept apart from the
/// log names the true head, so `audit verify` fails and says what is gone.
#[tokio::test]
async fn audit_tail_cut_on_a_stopped_node_fails_against_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut patient = TestPatient::new().unwrap();
    let (node, _) = onboarded(dir.path(), 14, &mut patient).await;
    let mut maker = ChangeMaker::new(node.practice_id().as_bytes()).unwrap();
    for i in 0..3 {
        let c = maker.put("k", &i.to_string()).unwrap();
        node.write_change(patient.id(), CORE, c.as_change()).await.unwrap();
    }
    let before = node.audit_verify().unwrap();
    assert_eq!(before.checkpoint, Some(before.entries), "every commit is checkpointed");
    node.close().await;
    drop(node);

    let store = SledStore::open(&dir.path().join(medmesh_node::STORE_DIR)).unwrap();
    store.raw_truncate_audit(before.entries - 1).unwrap();
    drop(store);

    let node = open(dir.path(), 14).await;
    match node.audit_verify() {
        Err(e @ Error::AuditTruncated { entries, checkpoint }) => {
            assert_eq!((entries, checkpoint), (before.entries - 2, before.entries));
            assert!(e.to_string().contains("were removed"), "{e}");
        }
        other => panic!("audit verify passed a log whose last two entries were removed: {other:?}"),
    }
    // What the node signs for a patient tells the cut too: the kept
    // checkpoint is above the head, and the removed entry has no anchor.
    let cps = node.audit_checkpoints(Some(before.entries)).unwrap();
    assert_eq!(cps.head.terms().seq, before.entries - 2);
    assert_eq!(cps.latest.map(|c| c.terms().seq), Some(before.entries));
    assert!(cps.anchor.is_none());
    node.close().await;
}

/// The checkpointed entry replaced by another whose chain verifies (the
/// whole log re-chained without the node key): the checkpoint's head no
/// longer matches.
#[tokio::test]
async fn audit_rewrite_below_the_checkpoint_fails_verify() {
    let dir = tempfile::tempdir().unwrap();
    let mut patient = TestPatient::new().unwrap();
    let (node, _) = onboarded(dir.path(), 15, &mut patient).await;
    let before = node.audit_verify().unwrap();
    node.close().await;
    drop(node);
    // Re-chain: drop the last entry and append a different one in its place,
    // through the store's own writer, so every hash and link is right.
    let store = SledStore::open(&dir.path().join(medmesh_node::STORE_DIR)).unwrap();
    store.raw_truncate_audit(before.entries).unwrap();
    drop(store);
    let store = SledStore::open(&dir.path().join(medmesh_node::STORE_DIR)).unwrap();
    let mut batch = medmesh_node::store::Batch::new();
    batch.push(medmesh_node::store::Op::Audit(AuditRecord {
        actor_kind: ActorKind::Node,
        actor_id: "someone else".into(),
        action: Action::Read,
        patient: None,
        items: vec![],
        grant: None,
        outcome: "ok".into(),
    }));
    store.commit(&batch).unwrap();
    store.flush().unwrap();
    drop(store);

    let node = open(dir.path(), 15).await;
    match node.audit_verify() {
        Err(Error::AuditRewritten { seq }) => assert_eq!(seq, before.entries),
        other => panic!("audit verify passed a rewritten log: {other:?}"),
    }
    node.close().await;
}

// ----- invariant 5: no plaintext at rest or in logs ---------------------

fn needles(marker: &str) -> Vec<Vec<u8>> {
    medmesh_node::testing::plaintext_needles(marker)
}

fn scan_dir(dir: &Path, needles: &[Vec<u8>]) -> Vec<String> {
    medmesh_node::testing::scan_for_plaintext(dir, needles).unwrap().1
}

#[derive(Clone, Default)]
struct LogBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn no_plaintext_at_rest_or_in_logs() {
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let dir = tempfile::tempdir().unwrap();
    let marker = "MEDMESH-MARKER-7f3a9c1e-allergy-penicillin";
    let automerge_magic = [0x85u8, 0x6f, 0x4a, 0x83];
    let resource_id = tracing::subscriber::with_default(subscriber, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut patient = TestPatient::new().unwrap();
            let (a, _) = onboarded(&dir.path().join("a"), 13, &mut patient).await;
            let b = open(&dir.path().join("b"), 14).await;
            let mut maker = ChangeMaker::new(a.practice_id().as_bytes()).unwrap();
            for i in 0..20 {
                let c = maker.put(&format!("note-{i}"), &format!("{marker} #{i}")).unwrap();
                assert!(c.bytes.windows(marker.len()).any(|w| w == marker.as_bytes()));
                a.write_change(patient.id(), CORE, c.as_change()).await.unwrap();
            }
            // B relays them opaque, then can read them too.
            let items = a.items_after(0, 100).await.unwrap();
            let page: Vec<Item> = items
                .iter()
                .map(|i| Item::new(i.meta.kind, i.item.bytes.clone()))
                .collect();
            b.ingest(page, Source::Peer(a.practice_id().peer_id())).await.unwrap();
            let share = patient.share(CORE, 0, Principal::Practice(b.practice_id())).unwrap();
            let read = patient
                .grant(b.practice_id(), &[CORE], Access::Read, now() - 1000, None)
                .unwrap();
            b.submit(
                patient.id(),
                vec![
                    Item::new(ItemKind::Grant, read.encoded().to_vec()),
                    Item::new(ItemKind::KeyShare, share.encoded().to_vec()),
                ],
            )
            .await
            .unwrap();
            assert_eq!(b.readable_changes(patient.id(), CORE).await.unwrap().len(), 20);
            // FHIR resources through the repository, with a sealed snapshot kept.
            let mut other = TestPatient::new().unwrap();
            let (_, items) = other.onboard(a.practice_id(), CORE).unwrap();
            a.submit(other.id(), items).await.unwrap();
            let repo = Repository::new(a.clone(), repository::Config::default()).unwrap();
            let p = repo
                .create(
                    serde_json::json!({
                        "resourceType": "Patient",
                        "identifier": [{"system": "urn:ietf:rfc:3986", "value": other.id().to_string()}],
                        "name": [{"text": marker}]
                    }),
                    None,
                    medmesh_node::Actor::local_app("test"),
                )
                .await
                .unwrap();
            for i in 0..5 {
                repo.create(
                    serde_json::json!({
                        "resourceType": "AllergyIntolerance",
                        "patient": {"reference": format!("Patient/{}", p.id())},
                        "note": [{"text": format!("{marker} #{i}")}]
                    }),
                    None,
                    medmesh_node::Actor::local_app("test"),
                )
                .await
                .unwrap();
            }
            repo.save_snapshots().await;
            let snapshot = a.load_snapshot(other.id(), CORE).unwrap().unwrap();
            assert_eq!(snapshot.covered.len(), 6);
            // In memory it is a plain Automerge document, which the scan would find.
            assert!(snapshot.doc.windows(4).any(|w| w == automerge_magic));
            // The blind resource index finds it without naming it on disk.
            assert_eq!(a.locate_resource(&p.key).unwrap(), Some((other.id(), CORE)));
            drop(repo);
            a.close().await;
            b.close().await;
            p.id().to_owned()
        })
    });
    let mut needles = needles(marker);
    needles.push(automerge_magic.to_vec());
    // Resource ids (and so `Type/id` keys) are not on disk either.
    needles.push(resource_id.into_bytes());
    let hits = scan_dir(dir.path(), &needles);
    assert!(hits.is_empty(), "plaintext at rest: {hits:?}");
    let logs = logs.0.lock().unwrap().clone();
    assert!(!logs.is_empty(), "no logs captured");
    for n in &needles {
        assert!(!logs.windows(n.len()).any(|w| w == n.as_slice()), "plaintext in logs");
    }
    // The scan itself finds what it looks for.
    let probe = tempfile::tempdir().unwrap();
    std::fs::write(
        probe.path().join("f"),
        medmesh_node::testing::base64_unpadded(format!("ab{marker}").as_bytes()),
    )
    .unwrap();
    assert!(!scan_dir(probe.path(), &needles).is_empty());
}

#[tokio::test]
async fn envelope_decoder_sanity() {
    // The bytes the store hands out are exactly what peers verify.
    let dir = tempfile::tempdir().unwrap();
    let mut patient = TestPatient::new().unwrap();
    let (node, _) = onboarded(dir.path(), 15, &mut patient).await;
    let mut maker = ChangeMaker::new(node.practice_id().as_bytes()).unwrap();
    let c = maker.put("k", "v").unwrap();
    let id = node.write_change(patient.id(), CORE, c.as_change()).await.unwrap();
    let item = node.item(&id.into()).await.unwrap().unwrap();
    assert_eq!(Envelope::decode(&item.item.bytes).unwrap().id(), id);
    assert_eq!(item.meta.patient, patient.id());
    assert_eq!(node.cursor(&node.practice_id().peer_id()).unwrap(), None);
}

#[tokio::test]
async fn ingest_capped_parks_no_more_than_the_room_given() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut patient = TestPatient::new().unwrap();
    let (a, _) = onboarded(da.path(), 4, &mut patient).await;
    let b = open(db.path(), 5).await;
    let mut maker = ChangeMaker::new(a.practice_id().as_bytes()).unwrap();
    for i in 0..5 {
        let c = maker.put("k", &i.to_string()).unwrap();
        a.write_change(patient.id(), CORE, c.as_change()).await.unwrap();
    }
    let all = a.items_after(0, 100).await.unwrap();
    let from = Source::Peer(a.practice_id().peer_id());

    // Room for 2: two wait, three are refused and not kept.
    let r = b.ingest_capped(envelopes_of(&all), from.clone(), 2).await.unwrap();
    assert_eq!(
        (r.counts.accepted, r.counts.pending, r.counts.refused),
        (0, 2, 3),
        "{r:?}"
    );
    assert_eq!(b.pending_count().unwrap(), 2);
    // No room: the parked two are duplicates, the others refused again.
    let r = b.ingest_capped(envelopes_of(&all), from.clone(), 0).await.unwrap();
    assert_eq!(
        (r.counts.pending, r.counts.duplicates, r.counts.refused),
        (0, 2, 3),
        "{r:?}"
    );
    assert_eq!(b.pending_count().unwrap(), 2);

    // The grant releases the parked two (a cap of 0 does not hold them back);
    // the refused three are welcome once sent again.
    let grant = all.iter().find(|i| i.meta.kind == ItemKind::Grant).unwrap();
    let r = b
        .ingest_capped(
            vec![Item::new(ItemKind::Grant, grant.item.bytes.clone())],
            from.clone(),
            0,
        )
        .await
        .unwrap();
    assert_eq!((r.counts.accepted, r.counts.refused), (3, 0), "{r:?}");
    assert_eq!(b.pending_count().unwrap(), 0);
    let r = b.ingest_capped(envelopes_of(&all), from, 0).await.unwrap();
    assert_eq!(
        (r.counts.accepted, r.counts.duplicates, r.counts.refused),
        (3, 2, 0),
        "{r:?}"
    );
    assert_eq!(b.holdings(&patient.id()).unwrap().envelopes, 5);
}
