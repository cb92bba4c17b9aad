//! What the integration tests over real node stores share: waiting on a
//! condition inside a timeout; a practice (a `medmesh_node::Node` on sled
//! in a temporary directory, behind `NodeBackend`) that can be stopped and
//! reopened from its directory, with or without a running sync actor; and
//! the patient's CLI (`medmesh_node::testing::CliPatient`, on a real
//! keystore), which doubles as the tests' ledger of what the patient allowed.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use medmesh_crypto::{PatientId, PracticeId, SecretIdentity};
use medmesh_node::Node;
use medmesh_sync::{Config, Multiaddr, NodeBackend, PeerId, SyncHandle};

pub mod client;
pub mod forge;

/// How long any wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(30);

/// Waits for `cond` inside [`WAIT`], polling.
pub async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for: {what}"));
}

/// Waits for the async `cond` inside [`WAIT`], polling.
pub async fn until_async<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    tokio::time::timeout(WAIT, async {
        while !cond().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for: {what}"));
}

/// Loopback TCP, no periodic pulls: only nudges, pushes, consent flows and
/// explicit syncs move data.
pub fn quiet_config() -> Config {
    Config {
        pull_interval: Duration::from_secs(3600),
        ..Config::loopback_tcp()
    }
}

/// Opens the node store in `dir`. A store just closed in this process may
/// still be held by a task that has not dropped its handle yet (sled's lock
/// is per open file): retry, yielding to the runtime, until it is free.
pub async fn open_node(dir: &std::path::Path, key: &SecretIdentity) -> Node {
    // A count of yields ran out under load (a slow actor's tasks still
    // held the store); a deadline does not.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match Node::open(dir, SecretIdentity::from_seed(&key.seed()), Default::default()).await {
            Ok(node) => return node,
            Err(e) if std::time::Instant::now() >= deadline => {
                panic!("node store in {} does not open within {WAIT:?}: {e:?}", dir.display())
            }
            Err(_) => tokio::task::yield_now().await,
        }
    }
}

/// A practice's store on disk, its node and its sync backend.
pub struct Store {
    pub key: SecretIdentity,
    pub node: Node,
    pub backend: Arc<NodeBackend>,
    pub dir: tempfile::TempDir,
    /// The backend's smallest snapshot transfer, kept across restarts.
    min_transfer: usize,
}

impl Store {
    /// A fresh practice key and an empty store.
    pub async fn create() -> Self {
        Self::with_min_transfer(medmesh_sync::MIN_TRANSFER_ENVELOPES).await
    }

    /// As [`Store::create`], with a backend that serves snapshot transfers
    /// covering at least `min` envelopes.
    pub async fn with_min_transfer(min: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretIdentity::generate().unwrap();
        let node = open_node(dir.path(), &key).await;
        let backend = NodeBackend::with_min_transfer_envelopes(node.clone(), min);
        Self {
            key,
            node,
            backend,
            dir,
            min_transfer: min,
        }
    }

    pub fn practice(&self) -> PracticeId {
        self.key.practice_id().unwrap()
    }

    pub fn peer(&self) -> PeerId {
        self.practice().peer_id()
    }

    /// Closes the store (queued writes finish) and opens it again from
    /// disk, as a node process restart does.
    pub async fn restart(self) -> Self {
        self.node.close().await;
        let Self {
            key,
            node,
            backend,
            dir,
            min_transfer,
        } = self;
        drop((node, backend));
        let node = open_node(dir.path(), &key).await;
        let backend = NodeBackend::with_min_transfer_envelopes(node.clone(), min_transfer);
        Self {
            key,
            node,
            backend,
            dir,
            min_transfer,
        }
    }
}

/// A practice with a running sync actor over its store.
pub struct Practice {
    pub key: SecretIdentity,
    pub node: Node,
    pub sync: SyncHandle,
    _dir: tempfile::TempDir,
}

impl Practice {
    pub async fn start() -> Self {
        let store = Store::create().await;
        let sync = SyncHandle::spawn(quiet_config(), &store.key, store.backend.clone())
            .await
            .unwrap();
        Self {
            key: store.key,
            node: store.node,
            sync,
            _dir: store.dir,
        }
    }

    pub fn practice(&self) -> PracticeId {
        self.key.practice_id().unwrap()
    }

    /// The address its swarm listens on (127.0.0.1).
    pub async fn addr(&self) -> Multiaddr {
        self.sync.listen_addrs().await.unwrap().remove(0)
    }

    /// Stops the sync actor, closes the store and starts both again from
    /// the store's directory, as a node process restart does.
    pub async fn restart(self) -> Self {
        self.sync.shutdown().await.unwrap();
        self.node.close().await;
        let Self { key, node, sync, _dir } = self;
        drop((node, sync));
        let node = open_node(_dir.path(), &key).await;
        let backend = NodeBackend::new(node.clone());
        let sync = SyncHandle::spawn(quiet_config(), &key, backend).await.unwrap();
        Self { key, node, sync, _dir }
    }
}

/// The patient's CLI on a real keystore: one model for every test.
#[allow(unused_imports)]
pub use medmesh_node::testing::{CliPatient, IssuedGrant};

/// A Repository over `node` that keeps snapshots only when asked.
pub fn labs_repository(node: &medmesh_node::Node) -> medmesh_node::Repository {
    let config = medmesh_node::repository::Config {
        snapshot_every: 0,
        ..medmesh_node::repository::Config::default()
    };
    medmesh_node::Repository::new(node.clone(), config).unwrap()
}

/// Writes Observations `range` of `patient` through the node's real write
/// path (`writers` at once, as an EMR's screens would), then keeps a local
/// snapshot (which a snapshot transfer is made from).
pub async fn write_observations(
    repo: &medmesh_node::Repository,
    patient: PatientId,
    range: std::ops::Range<usize>,
    writers: usize,
) {
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let repo = repo.clone();
            let range = range.clone();
            tokio::spawn(async move {
                let app = medmesh_node::Actor::local_app("test");
                for i in range.skip(w).step_by(writers) {
                    let observation = serde_json::json!({
                        "resourceType": "Observation",
                        "status": "final",
                        "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                        "effectiveDateTime": format!("2024-01-{:02}", 1 + i % 28),
                        "valueQuantity": {"value": 100 + i, "unit": "mmHg"}
                    });
                    repo.create(observation, Some(patient), app.clone()).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    repo.save_snapshots().await;
}
