//! What the integration tests over real node stores share: waiting on a
//! condition inside a timeout; a practice (a `medmesh_node::Node` on sled
//! in a temporary directory, behind `NodeBackend`) that can be stopped and
//! reopened from its directory, with or without a running sync actor; and
//! the patient's CLI keystore (grants with their key shares, revocations
//! with new epochs), which doubles as the tests' ledger of what the patient
//! allowed.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use medmesh_crypto::{
    Access, ActorId, Collection, Envelope, Epoch, EpochKey, Grant, GrantRequest, KdfParams, KeyShare, Keystore,
    PatientId, PracticeId, Principal, Revocation, SecretIdentity, Timestamp, now,
};
use medmesh_node::Node;
use medmesh_sync::{Config, Item, ItemKind, Multiaddr, NodeBackend, PeerId, SyncHandle};

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

/// A grant the patient issued, and its revocation once issued.
pub struct IssuedGrant {
    pub grant: Grant,
    pub revocation: Option<Revocation>,
}

impl IssuedGrant {
    /// The patient's truth: not revoked and `at` inside the window.
    pub fn in_force(&self, at: Timestamp) -> bool {
        self.revocation.is_none() && self.grant.in_force(at, false)
    }
}

/// The patient's CLI as the tests drive it: a real `Keystore` whose
/// patient-side rules (`Keystore::grant`, `revoke`, `rotate`, the library
/// code `medmesh patient` calls) decide what a grant or revocation carries,
/// plus the tests' ledger: every grant issued with its revocation, and every
/// key share made for a practice.
pub struct CliPatient {
    keystore: Keystore,
    /// Every epoch key made, per collection, oldest first (a view of the
    /// keystore's keys, refreshed after each grant and revocation).
    pub keys: BTreeMap<Collection, Vec<EpochKey>>,
    pub grants: Vec<IssuedGrant>,
    /// (recipient, collection, epoch) of every key share made for a practice.
    pub shares: BTreeSet<(PracticeId, Collection, Epoch)>,
}

impl CliPatient {
    pub fn new() -> Self {
        Self {
            keystore: Keystore::new(SecretIdentity::generate().unwrap(), KdfParams::DEFAULT),
            keys: BTreeMap::new(),
            grants: Vec::new(),
            shares: BTreeSet::new(),
        }
    }

    pub fn identity(&self) -> &SecretIdentity {
        self.keystore.identity()
    }

    pub fn id(&self) -> PatientId {
        self.keystore.patient()
    }

    /// The patient's key as a libp2p peer: the CLI session's identity.
    pub fn peer(&self) -> PeerId {
        self.identity().practice_id().unwrap().peer_id()
    }

    /// Notes the shares made for practices and refreshes [`CliPatient::keys`].
    fn record(&mut self, shares: &[KeyShare]) -> Vec<Item> {
        for share in shares {
            let t = share.terms();
            if let Principal::Practice(p) = t.recipient {
                self.shares.insert((p, t.collection, t.epoch));
            }
        }
        self.keys = Collection::ALL
            .into_iter()
            .map(|c| (c, self.keystore.keys_of(c).into_iter().cloned().collect::<Vec<_>>()))
            .filter(|(_, k)| !k.is_empty())
            .collect();
        shares.iter().map(Item::key_share).collect()
    }

    /// The current key of `collection`, if any grant made one.
    pub fn current_key(&self, collection: Collection) -> Option<&EpochKey> {
        self.keys.get(&collection).and_then(|k| k.last())
    }

    /// `medmesh patient grant`: the signed grant (its index in
    /// [`CliPatient::grants`]) and the items the CLI submits: the grant, the
    /// patient's other live grants, and what `Keystore::grant` made (an
    /// epoch-0 key with the patient's own share for a collection granted for
    /// the first time, the grantee's shares of every epoch). `address_hints`
    /// come first among the grant's hints, as the node reached does in the CLI.
    #[allow(clippy::too_many_arguments)]
    pub fn grant(
        &mut self,
        grantee: PracticeId,
        collections: &[Collection],
        access: Access,
        not_before: Timestamp,
        expires: Option<Timestamp>,
        address_hints: Vec<String>,
    ) -> (usize, Vec<Item>) {
        let at = now();
        let granted = self
            .keystore
            .grant(
                GrantRequest {
                    grantee,
                    collections: collections.to_vec(),
                    access,
                    not_before,
                    expires,
                    purpose: "treatment".into(),
                    address_hints,
                },
                at,
            )
            .unwrap();
        let grant = granted.grant;
        // Submitted as it is made (the tests hand the items over).
        self.keystore.unsubmitted.retain(|g| *g != grant.id());
        let mut items = vec![Item::grant(&grant)];
        // As the CLI: the patient's other live grants go along, so the node
        // reached learns every practice it must forward to.
        items.extend(
            self.keystore
                .live_grants(at)
                .filter(|g| g.id() != grant.id())
                .map(Item::grant),
        );
        items.extend(self.record(&granted.shares));
        self.grants.push(IssuedGrant {
            grant,
            revocation: None,
        });
        (self.grants.len() - 1, items)
    }

    /// `medmesh patient revoke` of grant `index`, its cut made from `held`
    /// ((collection, actor, seq) of the grantee's changes under it that the
    /// node reached holds: [`CliPatient::held_under`]), with a new epoch of
    /// every collection it covered for the patient and the readers still
    /// live at `at` (`Keystore::revoke` and `Keystore::rotate`).
    pub fn revoke(&mut self, index: usize, held: Vec<(Collection, ActorId, u64)>, at: Timestamp) -> Vec<Item> {
        let grant = self.grants[index].grant.clone();
        let revocation = self.keystore.revoke(&grant, held, now()).unwrap();
        let mut items = vec![Item::revocation(&revocation)];
        items.extend(self.keystore.live_grants(now()).map(Item::grant));
        let rotated = self.keystore.rotate(&grant.terms().collections, at).unwrap();
        let shares: Vec<KeyShare> = rotated.into_iter().flat_map(|r| r.shares).collect();
        items.extend(self.record(&shares));
        self.grants[index].revocation = Some(revocation);
        items
    }

    /// What the CLI reads from what a node serves the patient for the cut:
    /// the grantee's changes written under `grant`, as (collection, actor,
    /// seq).
    pub fn held_under(grant: &Grant, served: &[Item]) -> Vec<(Collection, ActorId, u64)> {
        let grantee = grant.terms().grantee;
        let mut held = Vec::new();
        for item in served.iter().filter(|i| i.kind == ItemKind::Envelope) {
            let envelope = Envelope::decode(&item.bytes).unwrap();
            let h = envelope.header();
            if h.author == Principal::Practice(grantee) && h.grant_id == Some(grant.id()) {
                held.push((h.collection, h.actor, h.seq));
            }
        }
        held
    }

    /// The cut the CLI computes from what a node serves the patient: for
    /// the grantee's actors, the highest change written under `grant`
    /// without a gap (`medmesh_crypto::revocation_cut`).
    pub fn cut_from(grant: &Grant, served: &[Item]) -> BTreeMap<ActorId, u64> {
        medmesh_crypto::revocation_cut(Self::held_under(grant, served))
    }

    /// Whether the patient shared the key of (collection, epoch) with `practice`.
    pub fn shared(&self, practice: PracticeId, collection: Collection, epoch: Epoch) -> bool {
        self.shares.contains(&(practice, collection, epoch))
    }
}

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
