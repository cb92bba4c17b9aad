//! medmesh-sync over real node stores (`medmesh_node::Node` on sled in
//! temporary directories, through `NodeBackend`): a grant moves exactly the
//! granted collection's envelopes, readable at the grantee, history
//! included; a node without a grant receives nothing. Swarms on
//! `/ip4/127.0.0.1/tcp/0`, waits poll inside a timeout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use medmesh_crypto::{Access, Collection, Principal, now};
use medmesh_node::item::{Item, ItemKind};
use medmesh_node::testing::{ChangeMaker, TestPatient};

mod common;
use common::{Practice, labs_repository, until, write_observations};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_moves_readable_history_between_real_nodes() {
    let mut patient = TestPatient::new().unwrap();
    let a = Arc::new(Practice::start().await);
    let b = Practice::start().await;
    let c = Practice::start().await;

    // First grant at A (read-write core and labs), then history written by A.
    let mut items = Vec::new();
    let ga = patient
        .grant(
            a.practice(),
            &[Collection::Core, Collection::Labs],
            Access::ReadWrite,
            now() - 60_000,
            None,
        )
        .unwrap();
    items.push(Item::new(ItemKind::Grant, ga.encoded().to_vec()));
    for c in [Collection::Core, Collection::Labs] {
        let share = patient.share(c, 0, Principal::Practice(a.practice())).unwrap();
        items.push(Item::new(ItemKind::KeyShare, share.encoded().to_vec()));
    }
    a.node.submit(patient.id(), items).await.unwrap();
    let mut core = ChangeMaker::new(&a.key.public_bytes()).unwrap();
    for i in 0..3 {
        let change = core.put(&format!("k{i}"), "v").unwrap();
        a.node
            .write_change(patient.id(), Collection::Core, change.as_change())
            .await
            .unwrap();
    }
    let mut labs = ChangeMaker::new(&a.key.public_bytes()).unwrap();
    let change = labs.put("lab", "v").unwrap();
    a.node
        .write_change(patient.id(), Collection::Labs, change.as_change())
        .await
        .unwrap();

    let a_addr = a.sync.listen_addrs().await.unwrap().remove(0);
    b.sync.dial(a_addr.clone()).await.unwrap();
    c.sync.dial(a_addr.clone()).await.unwrap();
    let a_peer = a.sync.local_peer_id();
    assert_eq!(
        b.sync.sync_now(a_peer).await.unwrap().received,
        0,
        "B got items before its grant"
    );

    // Grant B core only, submitted at A with B's epoch-0 core key share.
    let (_, items) = patient
        .grant_with_share(b.practice(), Collection::Core, Access::Read)
        .unwrap();
    a.node.submit(patient.id(), items).await.unwrap();

    until("B holds A's core history, readable", || {
        b.node
            .holdings(&patient.id())
            .is_ok_and(|h| h.envelopes == 3 && h.readable == 3)
    })
    .await;
    b.sync.sync_now(a_peer).await.unwrap();
    b.sync.reconcile(a_peer, patient.id()).await.unwrap();
    let h = b.node.holdings(&patient.id()).unwrap();
    assert_eq!((h.envelopes, h.readable, h.opaque), (3, 3, 0), "B holdings {h:?}");
    assert_eq!(h.by_collection.get("labs"), None, "B received labs");

    // A later write by A reaches B by nudge.
    let change = core.put("k3", "v").unwrap();
    a.node
        .write_change(patient.id(), Collection::Core, change.as_change())
        .await
        .unwrap();
    until("B holds the new write", || {
        b.node.holdings(&patient.id()).is_ok_and(|h| h.envelopes == 4)
    })
    .await;

    // C: nothing of the patient.
    c.sync.sync_now(a_peer).await.unwrap();
    c.sync.reconcile(a_peer, patient.id()).await.unwrap();
    assert_eq!(c.node.holdings(&patient.id()).unwrap().envelopes, 0);
    assert!(
        c.node.grants(&patient.id()).is_empty(),
        "C learned the patient's grants"
    );

    // A's audit log names the disclosures to B.
    let entries = a.node.audit_entries(Some(&patient.id())).unwrap();
    assert!(!entries.is_empty());
}

/// A long history reaches a new grantee as a snapshot transfer (the
/// collection's sealed document and compact headers) instead of envelope by
/// envelope: B ends up holding A's exact envelopes, readable, for fewer
/// bytes; A's audit log names every covered envelope as disclosed to B; a
/// later single write still travels as one envelope; a peer without a
/// grant gets no transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_history_moves_as_a_snapshot_transfer() {
    const N: usize = 80;
    let mut patient = TestPatient::new().unwrap();
    let pid = patient.id();
    let a = Practice::start().await;
    let b = Practice::start().await;
    let c = Practice::start().await;
    let (_, items) = patient.onboard(a.practice(), Collection::Labs).unwrap();
    a.node.submit(pid, items).await.unwrap();
    let repo = labs_repository(&a.node);
    write_observations(&repo, pid, 0..N, 1).await;
    let mut envelope_bytes = 0;
    for id in a.node.envelope_ids(&pid, Collection::Labs).unwrap() {
        envelope_bytes += a.node.item(&id.into()).await.unwrap().unwrap().item.bytes.len() as u64;
    }

    let (_, items) = patient
        .grant_with_share(b.practice(), Collection::Labs, Access::Read)
        .unwrap();
    a.node.submit(pid, items).await.unwrap();
    let a_addr = a.sync.listen_addrs().await.unwrap().remove(0);
    let a_peer = a.sync.local_peer_id();
    b.sync.dial(a_addr.clone()).await.unwrap();
    c.sync.dial(a_addr).await.unwrap();
    let before = b.sync.status().await.unwrap();
    b.sync.sync_now(a_peer).await.unwrap();
    until("B holds A's history, readable", || {
        b.node.holdings(&pid).is_ok_and(|h| h.readable == N as u64)
    })
    .await;
    let after = b.sync.status().await.unwrap();
    let received = after.bytes_received - before.bytes_received;
    assert!(
        received * 2 < envelope_bytes,
        "a transfer should cost well under the envelopes: {received} vs {envelope_bytes} bytes"
    );
    let mut on_a = a.node.envelope_ids(&pid, Collection::Labs).unwrap();
    let mut on_b = b.node.envelope_ids(&pid, Collection::Labs).unwrap();
    on_a.sort();
    on_b.sort();
    assert_eq!(on_a, on_b, "B holds A's exact envelopes");
    let disclosed: usize = a
        .node
        .audit_entries(Some(&pid))
        .unwrap()
        .iter()
        .filter(|e| {
            e.action == medmesh_node::audit::Action::Disclose && e.actor_id == b.sync.local_peer_id().to_string()
        })
        .map(|e| e.items.len())
        .sum();
    assert!(disclosed >= N, "A audited {disclosed} disclosures to B");

    // One more write (and a new local snapshot covering it): B gets the one
    // envelope, not the transfer again.
    write_observations(&repo, pid, N..N + 1, 1).await;
    let before = b.sync.status().await.unwrap();
    until("B holds the new write", || {
        b.node.holdings(&pid).is_ok_and(|h| h.readable == N as u64 + 1)
    })
    .await;
    b.sync.sync_now(a_peer).await.unwrap();
    let delta = b.sync.status().await.unwrap().bytes_received - before.bytes_received;
    assert!(delta < 8 * 1024, "a one-change delta cost {delta} bytes");

    // C: no grant, no transfer.
    c.sync.sync_now(a_peer).await.unwrap();
    c.sync.reconcile(a_peer, pid).await.unwrap();
    assert_eq!(c.node.holdings(&pid).unwrap().envelopes, 0);
}

/// A history longer than one author's share of the seq-gap queue (1,024)
/// and than one restore part reaches a new grantee whole, by snapshot
/// transfer: the transfer's headers, listed by envelope id, once made every
/// restore part but the first wait on seq gaps until the share overflowed
/// and the rest was refused (the 10k first sync never finished).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_longer_than_the_seq_gap_share_arrives_whole() {
    const N: usize = 1_500;
    let mut patient = TestPatient::new().unwrap();
    let pid = patient.id();
    let a = Practice::start().await;
    let b = Practice::start().await;
    let (_, items) = patient.onboard(a.practice(), Collection::Labs).unwrap();
    a.node.submit(pid, items).await.unwrap();
    write_observations(&labs_repository(&a.node), pid, 0..N, 8).await;

    let (_, items) = patient
        .grant_with_share(b.practice(), Collection::Labs, Access::Read)
        .unwrap();
    a.node.submit(pid, items).await.unwrap();
    let a_peer = a.sync.local_peer_id();
    b.sync.dial(a.addr().await).await.unwrap();
    b.sync.sync_now(a_peer).await.unwrap();
    until("B holds A's whole history, readable", || {
        b.node.holdings(&pid).is_ok_and(|h| h.readable == N as u64)
    })
    .await;
    let status = b.sync.status().await.unwrap();
    assert_eq!(
        status.items_pending_refused, 0,
        "B refused part of an honest history: {status:?}"
    );
    assert_eq!(b.node.pending_count().unwrap(), 0, "B still waits on seq gaps");
}
