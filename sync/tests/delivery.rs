//! Issue 16, durable delivery: a grant submitted while its practice is
//! offline reaches it once it is back — the node that took the grant keeps
//! it in its outbox (on disk, across its own restarts) and tries again,
//! with backoff and whenever the practice connects. Real node stores on
//! sled, swarms on 127.0.0.1; waits poll inside a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use medmesh_crypto::{Access, Collection, SecretIdentity};
use medmesh_node::Node;
use medmesh_node::testing::{ChangeMaker, TestPatient};
use medmesh_sync::memory::MemoryBackend;
use medmesh_sync::{Config, Item, ItemKind, Multiaddr, NodeBackend, SyncHandle};

mod common;
use common::{open_node, until, until_async};

/// A practice whose store lives in `dir` and whose swarm listens on `listen`.
struct Site {
    key: SecretIdentity,
    node: Node,
    sync: SyncHandle,
}

fn config(listen: Multiaddr) -> Config {
    Config {
        listen: vec![listen],
        pull_interval: Duration::from_secs(3600),
        // Retries every second at most: the test's practice is back within seconds.
        redelivery_max_backoff: Duration::from_secs(1),
        ..Config::loopback_tcp()
    }
}

impl Site {
    async fn start(dir: &std::path::Path, key: &SecretIdentity, listen: Multiaddr) -> Self {
        let node = open_node(dir, key).await;
        let sync = SyncHandle::spawn(config(listen), key, NodeBackend::new(node.clone()))
            .await
            .unwrap();
        Self {
            key: SecretIdentity::from_seed(&key.seed()),
            node,
            sync,
        }
    }

    async fn stop(self) -> SecretIdentity {
        self.sync.shutdown().await.unwrap();
        self.node.close().await;
        self.key
    }

    async fn addr(&self) -> Multiaddr {
        self.sync.listen_addrs().await.unwrap().remove(0)
    }
}

fn any_port() -> Multiaddr {
    "/ip4/127.0.0.1/tcp/0".parse().unwrap()
}

/// The patient's CLI: pushes its items to a node, with the grantee's address.
async fn submit(patient: &TestPatient, node: &Site, items: &[medmesh_node::Incoming], addrs: Vec<Multiaddr>) {
    let cli = SyncHandle::spawn(Config::client(), &patient.identity, Arc::new(MemoryBackend::new()))
        .await
        .unwrap();
    let peer = cli.dial(node.addr().await).await.unwrap();
    let items = items
        .iter()
        .map(|i| match i.kind {
            medmesh_node::store::ItemKind::Grant => Item {
                kind: ItemKind::Grant,
                bytes: i.bytes.clone(),
            },
            _ => Item {
                kind: ItemKind::KeyShare,
                bytes: i.bytes.clone(),
            },
        })
        .collect();
    let report = cli.push(peer, items, addrs).await.unwrap();
    assert_eq!(report.rejected, 0, "{report:?}");
    cli.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_to_a_practice_that_was_down_reaches_it_when_it_is_back() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let key_a = SecretIdentity::generate().unwrap();
    let key_b = SecretIdentity::generate().unwrap();
    let mut patient = TestPatient::new().unwrap();
    let pid = patient.id();

    // A holds the patient's labs, written by A.
    let a = Site::start(dir_a.path(), &key_a, any_port()).await;
    let (_, items) = patient.onboard(a.key.practice_id().unwrap(), Collection::Labs).unwrap();
    a.node.submit(pid, items).await.unwrap();
    let mut labs = ChangeMaker::new(&key_a.public_bytes()).unwrap();
    for i in 0..3 {
        let change = labs.put(&format!("lab{i}"), "v").unwrap();
        a.node
            .write_change(pid, Collection::Labs, change.as_change())
            .await
            .unwrap();
    }

    // B was up once (its address is what the patient passes), and is down now.
    let b = Site::start(dir_b.path(), &key_b, any_port()).await;
    let b_addr = b.addr().await;
    let b_practice = key_b.practice_id().unwrap();
    let key_b = b.stop().await;

    // The patient grants B labs at A, passing B's address: A's push fails.
    let (grant, items) = patient
        .grant_with_share(b_practice, Collection::Labs, Access::Read)
        .unwrap();
    submit(&patient, &a, &items, vec![b_addr.clone()]).await;
    until_async("A owes B the grant and its key share", async || {
        a.sync.status().await.unwrap().outbox == 2
    })
    .await;

    // A restarts meanwhile: what it owes is on disk.
    let key_a = a.stop().await;
    let a = Site::start(dir_a.path(), &key_a, any_port()).await;
    assert_eq!(
        a.sync.status().await.unwrap().outbox,
        2,
        "A forgot what it owes across a restart"
    );

    // B comes back where it was: A delivers, B pulls the labs.
    let listen: Multiaddr = b_addr
        .iter()
        .filter(|p| !matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
        .collect();
    let b = Site::start(dir_b.path(), &key_b, listen).await;
    until("B holds the grant A kept for it", || {
        b.node.grants(&pid).contains(&grant)
    })
    .await;
    until("B holds the labs, readable", || {
        b.node.holdings(&pid).is_ok_and(|h| h.readable == 3)
    })
    .await;
    until_async("A owes B nothing", async || a.sync.status().await.unwrap().outbox == 0).await;
    let _ = (a.stop().await, b.stop().await);
}
