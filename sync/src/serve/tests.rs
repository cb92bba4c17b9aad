//! Tests of serving: the snapshot path discloses exactly what the envelope
//! path would, and a pull withholds an item corrupted at rest.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use medmesh_crypto::{Access, Collection, SecretIdentity, now};
use medmesh_node::audit::Action;
use medmesh_node::repository::{self, Repository};
use medmesh_node::testing::TestPatient;
use medmesh_node::{Actor, Node};

use super::*;
use crate::NodeBackend;
use crate::backend::{Cursor, ItemKind};

fn disclosed_to(node: &Node, patient: &PatientId, peer: &SecretIdentity) -> usize {
    let peer = peer.practice_id().unwrap().peer_id().to_string();
    node.audit_entries(Some(patient))
        .unwrap()
        .iter()
        .filter(|e| e.action == Action::Disclose && e.actor_id == peer)
        .map(|e| e.items.len())
        .sum()
}

/// The snapshot path discloses exactly what the envelope path would: a
/// transfer only to a peer whose grant covers the collection and is in
/// force now, every covered envelope audited; offers only to pullers
/// that take them and may receive the envelopes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_and_offers_follow_the_consent_filter() {
    const N: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(dir.path(), SecretIdentity::generate().unwrap(), Default::default())
        .await
        .unwrap();
    let mut patient = TestPatient::new().unwrap();
    let pid = patient.id();
    let (_, items) = patient.onboard(node.practice_id(), Collection::Labs).unwrap();
    node.submit(pid, items).await.unwrap();
    let repo = Repository::new(
        node.clone(),
        repository::Config {
            snapshot_every: 0,
            ..repository::Config::default()
        },
    )
    .unwrap();
    for i in 0..N {
        let obs = serde_json::json!({
            "resourceType": "Observation", "status": "final",
            "code": {"text": format!("reading {i}")},
            "subject": {"reference": "Patient/example"}
        });
        repo.create(obs, Some(pid), Actor::local_app("test")).await.unwrap();
    }
    repo.save_snapshots().await;
    let backend = NodeBackend::new(node.clone());

    let (b, c) = (SecretIdentity::generate().unwrap(), SecretIdentity::generate().unwrap());
    let requester = |k: &SecretIdentity| Requester::from_peer_id(&k.practice_id().unwrap().peer_id()).unwrap();
    let (gb, items) = patient
        .grant_with_share(b.practice_id().unwrap(), Collection::Labs, Access::Read)
        .unwrap();
    node.submit(pid, items).await.unwrap();

    // C: no grant, no transfer, no offer, nothing audited.
    let (r, _) = snapshot(&*backend, requester(&c), pid, Collection::Labs, now()).await;
    assert!(matches!(r, Response::Snapshot(None)), "{r:?}");
    let (r, _) = pull(&*backend, requester(&c), Cursor::default(), 1024, Some(&[]), now()).await;
    let Response::Page { items, offers, .. } = r else {
        panic!("{r:?}")
    };
    assert!(offers.is_empty() && items.iter().all(|i| i.kind != ItemKind::Envelope));
    assert_eq!(disclosed_to(&node, &pid, &c), 0);

    // B: a puller that takes offers gets one instead of the envelopes;
    // one that does not gets the envelopes.
    let (r, _) = pull(&*backend, requester(&b), Cursor::default(), 1024, Some(&[]), now()).await;
    let Response::Page { items, offers, .. } = r else {
        panic!("{r:?}")
    };
    assert_eq!(offers.len(), 1);
    assert_eq!(items.iter().filter(|i| i.kind == ItemKind::Envelope).count(), 0);
    assert_eq!(
        disclosed_to(&node, &pid, &b),
        items.len(),
        "only the page's (consent) items are disclosed, not the offered envelopes"
    );
    let (r, _) = pull(&*backend, requester(&b), Cursor::default(), 1024, None, now()).await;
    let Response::Page { items, offers, .. } = r else {
        panic!("{r:?}")
    };
    assert!(offers.is_empty());
    assert_eq!(items.iter().filter(|i| i.kind == ItemKind::Envelope).count(), N);
    let after_pages = disclosed_to(&node, &pid, &b);

    let (r, _) = snapshot(&*backend, requester(&b), pid, Collection::Labs, now()).await;
    let Response::Snapshot(Some(payload)) = r else {
        panic!("{r:?}")
    };
    assert_eq!(payload.count as usize, N);
    assert_eq!(
        disclosed_to(&node, &pid, &b),
        after_pages + N,
        "every covered envelope audited"
    );
    // Another collection B may not receive: none.
    let (r, _) = snapshot(&*backend, requester(&b), pid, Collection::Core, now()).await;
    assert!(matches!(r, Response::Snapshot(None)));

    // Revoked: no transfer any more.
    let revocation = patient.revoke(&gb, Default::default()).unwrap();
    node.submit_revocation(pid, revocation.encoded().to_vec())
        .await
        .unwrap();
    let (r, _) = snapshot(&*backend, requester(&b), pid, Collection::Labs, now()).await;
    assert!(matches!(r, Response::Snapshot(None)), "{r:?}");
}

/// Pulls check every item they send: one that rotted at rest is
/// withheld and quarantined, never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_withholds_and_quarantines_an_item_corrupted_at_rest() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(dir.path(), SecretIdentity::generate().unwrap(), Default::default())
        .await
        .unwrap();
    let mut patient = TestPatient::new().unwrap();
    let pid = patient.id();
    let (_, items) = patient.onboard(node.practice_id(), Collection::Core).unwrap();
    node.submit(pid, items).await.unwrap();
    let mut maker = medmesh_node::testing::ChangeMaker::new(node.practice_id().as_bytes()).unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        let c = maker.put("k", &i.to_string()).unwrap();
        ids.push(node.write_change(pid, Collection::Core, c.as_change()).await.unwrap());
    }
    let store = node.raw_store();
    let mut rotten = store.raw_item_bytes(&ids[1].into()).unwrap().unwrap();
    let at = rotten.len() - 5;
    rotten[at] ^= 0x10;
    store.raw_replace_item_bytes(&ids[1].into(), &rotten).unwrap();

    let backend = NodeBackend::new(node.clone());
    let patient_peer = Requester::from_peer_id(
        &medmesh_crypto::PracticeId::from_bytes(*pid.as_bytes())
            .unwrap()
            .peer_id(),
    )
    .unwrap();
    let (r, _) = pull(&*backend, patient_peer, Cursor::default(), 1024, None, now()).await;
    let Response::Page { items, .. } = r else {
        panic!("{r:?}")
    };
    let sent: Vec<ItemId> = items.iter().map(|i| ItemId::digest(&i.bytes)).collect();
    assert!(items.iter().all(|i| i.bytes != rotten), "the rotten item was sent");
    assert_eq!(
        items.iter().filter(|i| i.kind == ItemKind::Envelope).count(),
        2,
        "{sent:?}"
    );
    assert!(
        !node.envelope_ids(&pid, Collection::Core).unwrap().contains(&ids[1]),
        "not quarantined"
    );
}
