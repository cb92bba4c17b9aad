//! The patient's audit query over real node stores (`medmesh_node::Node` on
//! sled in temporary directories, through `NodeBackend`): after a grant to
//! B and a sync, the patient asking A gets A's disclosures to B, every page
//! of them; any other peer asking about that patient is refused and gets
//! nothing; the patient's read is itself audited. Swarms on
//! `/ip4/127.0.0.1/tcp/0`, waits poll inside a timeout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use medmesh_crypto::{Access, Collection, Principal, SecretIdentity, now};
use medmesh_node::audit::{Action, ActorKind, AuditRecord};
use medmesh_node::testing::{ChangeMaker, TestPatient};
use medmesh_sync::memory::MemoryBackend;
use medmesh_sync::wire::MAX_AUDIT_ENTRIES_PER_MESSAGE;
use medmesh_sync::{Config, Error, Item, ItemId, ItemKind, SyncHandle};

mod common;
use common::{Practice, until};

/// A client session (as the patient CLI runs one) with `identity`.
async fn client(identity: &SecretIdentity) -> SyncHandle {
    SyncHandle::spawn(Config::client(), identity, Arc::new(MemoryBackend::new()))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patient_reads_the_disclosures_about_them_and_no_one_else_can() {
    let mut patient = TestPatient::new().unwrap();
    let a = Practice::start().await;
    let b = Practice::start().await;

    // A holds the patient's core record, written under a read-write grant.
    let ga = patient
        .grant(
            a.practice(),
            &[Collection::Core],
            Access::ReadWrite,
            now() - 60_000,
            None,
        )
        .unwrap();
    let share_a = patient
        .share(Collection::Core, 0, Principal::Practice(a.practice()))
        .unwrap();
    a.node
        .submit(
            patient.id(),
            vec![
                Item::new(ItemKind::Grant, ga.encoded().to_vec()),
                Item::new(ItemKind::KeyShare, share_a.encoded().to_vec()),
            ],
        )
        .await
        .unwrap();
    let mut core = ChangeMaker::new(&a.key.public_bytes()).unwrap();
    for i in 0..2 {
        let change = core.put(&format!("k{i}"), "v").unwrap();
        a.node
            .write_change(patient.id(), Collection::Core, change.as_change())
            .await
            .unwrap();
    }

    // Grant B core; B pulls it from A.
    let (gb, items) = patient
        .grant_with_share(b.practice(), Collection::Core, Access::Read)
        .unwrap();
    a.node.submit(patient.id(), items).await.unwrap();
    let a_addr = a.sync.listen_addrs().await.unwrap().remove(0);
    let a_peer = a.sync.local_peer_id();
    b.sync.dial(a_addr.clone()).await.unwrap();
    b.sync.sync_now(a_peer).await.unwrap();
    until("B holds A's core history", || {
        b.node.holdings(&patient.id()).is_ok_and(|h| h.envelopes == 2)
    })
    .await;

    // The patient asks A, as itself.
    let me = client(&patient.identity).await;
    me.dial(a_addr.clone()).await.unwrap();
    let entries = me.audit(a_peer, patient.id()).await.unwrap();
    let b_peer = b.sync.local_peer_id().to_string();
    let to_b: Vec<_> = entries
        .iter()
        .filter(|e| e.action == Action::Disclose && e.actor_id == b_peer)
        .collect();
    assert!(!to_b.is_empty(), "no disclosure to B among {} entries", entries.len());
    assert!(to_b.iter().all(|e| e.actor_kind == ActorKind::Peer));
    assert!(to_b.iter().all(|e| e.outcome == "ok"));
    assert!(
        to_b.iter().any(|e| e.grant == Some(gb.id())),
        "no disclosure to B names B's grant"
    );
    let disclosed: Vec<ItemId> = to_b.iter().flat_map(|e| e.items.iter().copied()).collect();
    for id in b.node.envelope_ids(&patient.id(), Collection::Core).unwrap() {
        assert!(disclosed.contains(&ItemId(id.0)), "envelope {id:?} reached B unaudited");
    }
    assert!(entries.windows(2).all(|w| w[0].seq < w[1].seq));
    assert!(entries.iter().all(|e| e.item_count == e.items.len() as u64));
    // The same entries as the node shows locally (same seqs and hashes).
    let local = a.node.audit_entries(Some(&patient.id())).unwrap();
    let wire_hashes: Vec<String> = entries.iter().map(|e| hex::encode(e.hash)).collect();
    let local_hashes: Vec<String> = local.iter().take(entries.len()).map(|e| hex::encode(e.hash)).collect();
    assert_eq!(wire_hashes, local_hashes);

    // The query itself is audited as a read by the patient.
    let again = me.audit(a_peer, patient.id()).await.unwrap();
    let did = patient.id().to_string();
    assert!(
        again
            .iter()
            .any(|e| e.action == Action::Read && e.actor_kind == ActorKind::Patient && e.actor_id == did),
        "the first query was not audited"
    );

    // B, and another patient, asking about this patient: refused, nothing.
    match b.sync.audit(a_peer, patient.id()).await {
        Err(Error::Refused { peer, .. }) => assert_eq!(peer, a_peer),
        other => panic!("B's audit query was not refused: {other:?}"),
    }
    let stranger = client(&SecretIdentity::generate().unwrap()).await;
    stranger.dial(a_addr.clone()).await.unwrap();
    assert!(matches!(
        stranger.audit(a_peer, patient.id()).await,
        Err(Error::Refused { .. })
    ));
    // Refusals add nothing to the patient's audit (no one can grow it by asking).
    let stranger_id = stranger.local_peer_id().to_string();
    let last = me.audit(a_peer, patient.id()).await.unwrap();
    assert!(
        last.iter()
            .all(|e| e.actor_id != stranger_id && !(e.actor_id == b_peer && e.action == Action::Read)),
        "a refused query left an entry"
    );

    me.shutdown().await.unwrap();
    stranger.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_audit_comes_back_in_pages_complete_and_in_order() {
    let patient = TestPatient::new().unwrap();
    let other = TestPatient::new().unwrap();
    let a = Practice::start().await;
    let n = MAX_AUDIT_ENTRIES_PER_MESSAGE + 40;
    for i in 0..n {
        // Interleave another patient's entries, which must not show.
        for who in [patient.id(), other.id()] {
            a.node
                .audit(AuditRecord {
                    actor_kind: ActorKind::LocalApp,
                    actor_id: format!("app-{i}"),
                    action: Action::Read,
                    patient: Some(who),
                    items: Vec::new(),
                    grant: None,
                    outcome: "ok".into(),
                })
                .await
                .unwrap();
        }
    }
    let me = client(&patient.identity).await;
    me.dial(a.sync.listen_addrs().await.unwrap().remove(0)).await.unwrap();
    let entries = me.audit(a.sync.local_peer_id(), patient.id()).await.unwrap();
    assert!(entries.windows(2).all(|w| w[0].seq < w[1].seq));
    let (apps, reads): (Vec<_>, Vec<_>) = entries.iter().partition(|e| e.actor_kind == ActorKind::LocalApp);
    assert_eq!(apps.len(), n);
    for (i, e) in apps.iter().enumerate() {
        assert_eq!(e.actor_id, format!("app-{i}"));
    }
    // Every page served is audited as the patient's read; a later page
    // shows the reads of the earlier ones (two pages here: one read).
    assert_eq!(reads.len(), 1, "{reads:?}");
    assert!(
        reads
            .iter()
            .all(|e| e.action == Action::Read && e.actor_kind == ActorKind::Patient)
    );
    me.shutdown().await.unwrap();
}
