//! medmesh-sync over real node stores (`medmesh_node::Node` on sled in
//! temporary directories, through `NodeBackend`): a grant moves exactly the
//! granted collection's envelopes, readable at the grantee, history
//! included; a node without a grant receives nothing. Swarms on
//! `/ip4/127.0.0.1/tcp/0`, waits poll inside a timeout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use medmesh_crypto::{Access, Collection, Principal, SecretIdentity, now};
use medmesh_node::testing::{ChangeMaker, TestPatient};
use medmesh_node::{Incoming, Node, store::ItemKind as NodeKind};
use medmesh_sync::{Config, NodeBackend, SyncHandle};

const WAIT: Duration = Duration::from_secs(30);

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for: {what}"));
}

struct Practice {
    key: SecretIdentity,
    node: Node,
    sync: SyncHandle,
    _dir: tempfile::TempDir,
}

impl Practice {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretIdentity::generate().unwrap();
        let node = Node::open(dir.path(), SecretIdentity::from_seed(&key.seed()), Default::default())
            .await
            .unwrap();
        let config = Config {
            pull_interval: Duration::from_secs(3600),
            ..Config::loopback_tcp()
        };
        let sync = SyncHandle::spawn(config, &key, NodeBackend::new(node.clone()))
            .await
            .unwrap();
        Self {
            key,
            node,
            sync,
            _dir: dir,
        }
    }

    fn practice(&self) -> medmesh_crypto::PracticeId {
        self.key.practice_id().unwrap()
    }
}

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
    items.push(Incoming::new(NodeKind::Grant, ga.encoded().to_vec()));
    for c in [Collection::Core, Collection::Labs] {
        let share = patient.share(c, 0, Principal::Practice(a.practice())).unwrap();
        items.push(Incoming::new(NodeKind::KeyShare, share.encoded().to_vec()));
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
    let gb = patient
        .grant(b.practice(), &[Collection::Core], Access::Read, now() - 60_000, None)
        .unwrap();
    let share = patient
        .share(Collection::Core, 0, Principal::Practice(b.practice()))
        .unwrap();
    a.node
        .submit(
            patient.id(),
            vec![
                Incoming::new(NodeKind::Grant, gb.encoded().to_vec()),
                Incoming::new(NodeKind::KeyShare, share.encoded().to_vec()),
            ],
        )
        .await
        .unwrap();

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
