//! Flood limits of medmesh-sync (docs/protocol.md, "Flood limits"): real
//! swarms on `/ip4/127.0.0.1/tcp/0` with in-memory backends, a client
//! speaking `/medmesh/sync/1` by hand, no sleeps as synchronisation (waits
//! poll a condition inside a timeout).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use medmesh_crypto::{
    Access, ActorId, Change, Collection, Envelope, EpochKey, Grant, GrantId, GrantTerms, KeyShare, PatientId,
    PracticeId, Principal, SecretIdentity, now,
};
use medmesh_sync::memory::MemoryBackend;
use medmesh_sync::wire::{RefusalCode, Request, Response};
use medmesh_sync::{Config, Cursor, InstanceId, Item, ItemKind, Limits, NodeBackend, SyncHandle};

mod common;
use common::client::Client;

const WAIT: Duration = Duration::from_secs(30);

/// Waits for `cond` inside a timeout, polling.
async fn until(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !cond().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for: {what}"));
}

fn config(limits: Limits) -> Config {
    Config {
        pull_interval: Duration::from_secs(3600),
        page_limit: 64,
        limits,
        ..Config::loopback_tcp()
    }
}

struct Node {
    key: SecretIdentity,
    store: Arc<MemoryBackend>,
    sync: SyncHandle,
    peer: PeerId,
    addr: Multiaddr,
}

impl Node {
    async fn new(limits: Limits) -> Self {
        let key = SecretIdentity::generate().unwrap();
        let store = Arc::new(MemoryBackend::new());
        let sync = SyncHandle::spawn(config(limits), &key, store.clone()).await.unwrap();
        let addr = sync.listen_addrs().await.unwrap().remove(0);
        Self {
            peer: sync.local_peer_id(),
            key,
            store,
            sync,
            addr,
        }
    }
}

struct Patient {
    key: SecretIdentity,
    core: EpochKey,
    seq: u64,
}

impl Patient {
    fn new() -> Self {
        let key = SecretIdentity::generate().unwrap();
        let core = EpochKey::generate(key.patient_id(), Collection::Core, 0).unwrap();
        Self { key, core, seq: 0 }
    }

    fn id(&self) -> PatientId {
        self.key.patient_id()
    }

    /// An envelope written by `author` (the patient, or a practice under
    /// `grant`); a fake change, sync never decrypts.
    fn envelope_by(&mut self, author: Option<&SecretIdentity>, grant: Option<GrantId>) -> Item {
        self.seq += 1;
        let author = author.unwrap_or(&self.key);
        let actor = ActorId::for_author(&author.public_bytes(), [1; 8]);
        let body = format!("change {}", self.seq);
        let change = Change {
            bytes: body.as_bytes(),
            hash: [(self.seq % 251) as u8; 32],
            actor,
            seq: self.seq,
        };
        Item::envelope(
            &Envelope::seal(
                (self.core.patient, self.core.collection),
                &self.core,
                author,
                grant,
                change,
                now(),
            )
            .unwrap(),
        )
    }

    fn envelope(&mut self) -> Item {
        self.envelope_by(None, None)
    }

    fn grant_to(&self, grantee: &SecretIdentity, access: Access) -> Grant {
        Grant::sign(
            GrantTerms {
                id: GrantId::generate().unwrap(),
                patient: self.id(),
                grantee: grantee.practice_id().unwrap(),
                collections: vec![Collection::Core],
                access,
                not_before: now() - 60_000,
                expires: None,
                purpose: "treatment".into(),
                issued_at: now(),
                address_hints: vec![],
            },
            &self.key,
        )
        .unwrap()
    }
}

fn pull() -> Request {
    Request::Pull {
        cursor: Cursor {
            instance: InstanceId::default(),
            seq: 0,
        },
        limit: 16,
        snapshots: None,
    }
}

fn busy(answers: &[Response]) -> usize {
    answers
        .iter()
        .filter(|r| matches!(r, Response::Refused(RefusalCode::Busy)))
        .count()
}

fn pages(answers: &[Response]) -> usize {
    answers.iter().filter(|r| matches!(r, Response::Page { .. })).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_hammering_pulls_is_refused_busy_and_a_well_behaved_peer_is_still_served() {
    let limits = Limits {
        requests_per_second: 5,
        request_burst: 10,
        max_in_flight_per_peer: 4,
        ..Limits::default()
    };
    let a = Node::new(limits).await;
    let b = Node::new(Limits::default()).await;
    let mut p = Patient::new();
    a.store
        .write(Item::grant(&p.grant_to(&a.key, Access::ReadWrite)))
        .unwrap();
    a.store.write(p.envelope()).unwrap();
    b.sync.dial(a.addr.clone()).await.unwrap();
    a.store.write(Item::grant(&p.grant_to(&b.key, Access::Read))).unwrap();
    until("B holds the history", async || {
        b.store.count(&p.id(), ItemKind::Envelope) == 1
    })
    .await;

    let mallory = SecretIdentity::generate().unwrap();
    let mut m = Client::connect(&mallory, &a.addr).await;
    let answers = m.burst(a.peer, &vec![pull(); 100]).await;
    assert_eq!(answers.len(), 100);
    let refused = busy(&answers);
    assert!(pages(&answers) >= 1, "mallory's first pulls are served");
    assert!(refused >= 80, "only {refused} of 100 pulls refused busy");
    assert_eq!(pages(&answers) + refused, 100, "every answer is a page or busy");
    let status = a.sync.status().await.unwrap();
    assert!(status.refused_busy >= refused as u64);

    // A still serves B: a new write reaches it by nudge and pull.
    a.store.write(p.envelope()).unwrap();
    until("B holds the new write", async || {
        b.store.count(&p.id(), ItemKind::Envelope) == 2
    })
    .await;
    assert_eq!(b.sync.status().await.unwrap().refused_busy, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_rate_limit_resets_over_time() {
    let limits = Limits {
        requests_per_second: 4,
        request_burst: 4,
        ..Limits::default()
    };
    let a = Node::new(limits).await;
    let mallory = SecretIdentity::generate().unwrap();
    let mut m = Client::connect(&mallory, &a.addr).await;
    let first = m.burst(a.peer, &vec![pull(); 20]).await;
    assert!(busy(&first) >= 10, "burst beyond the bucket is refused busy");
    assert!(pages(&first) >= 4, "the bucket's worth is served");
    // The bucket refills: a later pull is served again.
    let mut served = false;
    tokio::time::timeout(WAIT, async {
        while !served {
            served = matches!(m.request(a.peer, pull()).await, Response::Page { .. });
            if !served {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    })
    .await
    .expect("a pull is served again after the bucket refills");
    // And the refill is capped by the burst: hammering is refused again.
    let again = m.burst(a.peer, &vec![pull(); 20]).await;
    assert!(busy(&again) >= 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_parks_at_most_its_share_of_the_pending_queue() {
    let limits = Limits {
        max_pending_per_peer: 3,
        max_pending: 5,
        ..Limits::default()
    };
    let a = Node::new(limits).await;
    let mut p = Patient::new();
    let mallory = SecretIdentity::generate().unwrap();
    let eve = SecretIdentity::generate().unwrap();
    let gm = p.grant_to(&mallory, Access::ReadWrite);
    let ge = p.grant_to(&eve, Access::ReadWrite);
    // Envelopes written under grants A does not hold yet: they would wait.
    let from_m: Vec<Item> = (0..5).map(|_| p.envelope_by(Some(&mallory), Some(gm.id()))).collect();
    let from_e: Vec<Item> = (0..5).map(|_| p.envelope_by(Some(&eve), Some(ge.id()))).collect();

    let mut m = Client::connect(&mallory, &a.addr).await;
    let push = |items: Vec<Item>| Request::Push { items, addrs: vec![] };
    let answer = m.request(a.peer, push(from_m.clone())).await;
    assert_eq!(answer, Response::Refused(RefusalCode::Busy), "beyond its share");
    assert_eq!(a.store.pending_count(), 3, "mallory parked its share, no more");
    // Again: nothing more is parked (its share is used up).
    let answer = m.request(a.peer, push(from_m.clone())).await;
    assert_eq!(answer, Response::Refused(RefusalCode::Busy));
    assert_eq!(a.store.pending_count(), 3);

    // Eve gets what is left of the total.
    let mut e = Client::connect(&eve, &a.addr).await;
    let answer = e.request(a.peer, push(from_e.clone())).await;
    assert_eq!(answer, Response::Refused(RefusalCode::Busy));
    assert_eq!(a.store.pending_count(), 5, "the total cap holds");
    let status = a.sync.status().await.unwrap();
    assert_eq!(status.items_pending_refused, 2 + 5 + 3);
    assert_eq!(status.refused_busy, 3);

    // Once the grant is here, the refused items are welcome again.
    let answer = m.request(a.peer, push(vec![Item::grant(&gm)])).await;
    assert!(matches!(answer, Response::Pushed { accepted: 4, .. }), "{answer:?}");
    assert_eq!(a.store.pending_count(), 2);
    let answer = m.request(a.peer, push(from_m.clone())).await;
    assert!(
        matches!(
            answer,
            Response::Pushed {
                accepted: 2,
                duplicates: 3,
                ..
            }
        ),
        "{answer:?}"
    );
    until("mallory's envelopes are all stored", async || {
        a.store.count(&p.id(), ItemKind::Envelope) == 5
    })
    .await;
    // Eve's share frees as the queue drains: her grant releases hers.
    let answer = e.request(a.peer, push(vec![Item::grant(&ge)])).await;
    assert!(matches!(answer, Response::Pushed { .. }), "{answer:?}");
    let answer = e.request(a.peer, push(from_e)).await;
    assert!(matches!(answer, Response::Pushed { .. }), "{answer:?}");
    assert_eq!(a.store.count(&p.id(), ItemKind::Envelope), 10);
    assert_eq!(a.store.pending_count(), 0);
}

// ---- dialling and storage only for relationships (issue 15, item 7) ----

/// A practice over a real node store (sled in a temporary directory).
struct Practice {
    node: medmesh_node::Node,
    sync: SyncHandle,
    peer: PeerId,
    addr: Multiaddr,
    _dir: tempfile::TempDir,
}

impl Practice {
    async fn new(node_config: medmesh_node::Config, limits: Limits) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretIdentity::generate().unwrap();
        let node = medmesh_node::Node::open(dir.path(), SecretIdentity::from_seed(&key.seed()), node_config)
            .await
            .unwrap();
        let sync = SyncHandle::spawn(config(limits), &key, NodeBackend::new(node.clone()))
            .await
            .unwrap();
        let addr = sync.listen_addrs().await.unwrap().remove(0);
        Self {
            node,
            peer: sync.local_peer_id(),
            sync,
            addr,
            _dir: dir,
        }
    }

    fn practice(&self) -> PracticeId {
        PracticeId::from_peer_id(&self.peer).unwrap()
    }
}

/// A TCP listener on 127.0.0.1 that counts the connections made to it (a
/// port a node must not be made to probe, or a control that it does dial).
struct Listener {
    port: u16,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Listener {
    async fn new() -> Self {
        let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = socket.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let seen = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = socket.accept().await {
                seen.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        Self {
            port,
            connections,
            task,
        }
    }

    /// This listener's address as a hint naming `peer`.
    fn hint(&self, peer: &PracticeId) -> String {
        format!("/ip4/127.0.0.1/tcp/{}/p2p/{}", self.port, peer.peer_id())
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn some_practice() -> PracticeId {
    SecretIdentity::generate().unwrap().practice_id().unwrap()
}

/// A grant from `patient` to `grantee` carrying `hints`.
fn grant_with_hints(patient: &SecretIdentity, grantee: PracticeId, hints: Vec<String>) -> Grant {
    Grant::sign(
        GrantTerms {
            id: GrantId::generate().unwrap(),
            patient: patient.patient_id(),
            grantee,
            collections: vec![Collection::Core],
            access: Access::ReadWrite,
            not_before: now() - 60_000,
            expires: None,
            purpose: "treatment".into(),
            issued_at: now(),
            address_hints: hints,
        },
        patient,
    )
    .unwrap()
}

fn push(items: Vec<Item>) -> Request {
    Request::Push { items, addrs: vec![] }
}

fn accepted(answer: &Response) -> u64 {
    match answer {
        Response::Pushed { accepted, .. } => *accepted,
        other => panic!("push not taken: {other:?}"),
    }
}

/// A patient the node has a relationship with: their first grant, to the
/// node itself, submitted by their CLI (a session under the patient key).
async fn onboarded(at: &Practice) -> (SecretIdentity, Client) {
    let patient = SecretIdentity::generate().unwrap();
    let mut cli = Client::connect(&patient, &at.addr).await;
    let first = grant_with_hints(&patient, at.practice(), vec![]);
    let answer = cli.request(at.peer, push(vec![Item::grant(&first)])).await;
    assert_eq!(accepted(&answer), 1, "a first grant to the node is accepted");
    (patient, cli)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_patients_grant_never_makes_the_node_dial_its_hints() {
    let a = Practice::new(medmesh_node::Config::default(), Limits::default()).await;
    let trap = Listener::new().await;
    let control = Listener::new().await;

    // A self-made identity pushes its own grant to some other practice,
    // the hints (and the push's address suggestions) pointing at a port of
    // the node's network; a peer relays another such grant.
    let stranger = SecretIdentity::generate().unwrap();
    let z = some_practice();
    let lure = grant_with_hints(&stranger, z, vec![trap.hint(&z)]);
    let mut s = Client::connect(&stranger, &a.addr).await;
    let answer = s
        .request(
            a.peer,
            Request::Push {
                items: vec![Item::grant(&lure)],
                addrs: vec![trap.hint(&z).parse().unwrap()],
            },
        )
        .await;
    assert_eq!(accepted(&answer), 1);
    let other = SecretIdentity::generate().unwrap();
    let y = some_practice();
    let relayed = grant_with_hints(&other, y, vec![trap.hint(&y)]);
    let mallory = SecretIdentity::generate().unwrap();
    let mut m = Client::connect(&mallory, &a.addr).await;
    assert_eq!(accepted(&m.request(a.peer, push(vec![Item::grant(&relayed)])).await), 1);

    // Control: a patient of this node shares with another practice; the
    // node does dial that one.
    let (patient, mut cli) = onboarded(&a).await;
    let w = some_practice();
    let share = grant_with_hints(&patient, w, vec![control.hint(&w)]);
    assert_eq!(accepted(&cli.request(a.peer, push(vec![Item::grant(&share)])).await), 1);
    until("the node dials the grantee of its own patient's grant", async || {
        control.connections() > 0
    })
    .await;
    assert_eq!(trap.connections(), 0, "a stranger's grant made the node dial its hints");
}

/// The caps on consent items of patients the node holds nothing of
/// (`caps_config`).
const PER_PATIENT: usize = 8;
const PER_SOURCE: usize = 20;

fn caps_config() -> medmesh_node::Config {
    medmesh_node::Config {
        stranger_items_per_patient: PER_PATIENT,
        stranger_items_per_source: PER_SOURCE,
        ..medmesh_node::Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_consent_items_from_self_made_patients_is_capped_and_real_patients_still_get_in() {
    let a = Practice::new(caps_config(), Limits::default()).await;

    // One self-made patient pushes three times its cap of grants to
    // practices this node has nothing to do with.
    let flooder = SecretIdentity::generate().unwrap();
    let mut f = Client::connect(&flooder, &a.addr).await;
    let grants: Vec<Item> = (0..3 * PER_PATIENT)
        .map(|_| Item::grant(&grant_with_hints(&flooder, some_practice(), vec![])))
        .collect();
    let answer = f.request(a.peer, push(grants)).await;
    assert_eq!(accepted(&answer), PER_PATIENT as u64, "{answer:?}");
    assert_eq!(a.node.grants(&flooder.patient_id()).len(), PER_PATIENT);

    // A peer pushes one grant each of many self-made patients: its own cap.
    let mallory = SecretIdentity::generate().unwrap();
    let mut m = Client::connect(&mallory, &a.addr).await;
    let patients: Vec<SecretIdentity> = (0..PER_SOURCE + 10)
        .map(|_| SecretIdentity::generate().unwrap())
        .collect();
    let grants: Vec<Item> = patients
        .iter()
        .map(|p| Item::grant(&grant_with_hints(p, some_practice(), vec![])))
        .collect();
    let answer = m.request(a.peer, push(grants)).await;
    assert_eq!(accepted(&answer), PER_SOURCE as u64, "{answer:?}");
    let held: usize = patients.iter().map(|p| a.node.grants(&p.patient_id()).len()).sum();
    assert_eq!(held, PER_SOURCE);
    // Refused, not rejected: nothing is recorded about them one by one;
    // counted.
    assert_eq!(a.node.rejected_count().unwrap(), 0);
    let unwanted = (2 * PER_PATIENT + 10) as u64;
    assert_eq!(a.sync.status().await.unwrap().items_unwanted, unwanted);

    // A real patient's first grant to this node and its key shares are
    // still accepted, whoever brings them: the patient's CLI...
    let real = SecretIdentity::generate().unwrap();
    let key = EpochKey::generate(real.patient_id(), Collection::Core, 0).unwrap();
    let items = vec![
        Item::grant(&grant_with_hints(&real, a.practice(), vec![])),
        Item::key_share(&KeyShare::create(&key, Principal::Practice(a.practice()), &real, now()).unwrap()),
        Item::key_share(&KeyShare::create(&key, Principal::Patient(real.patient_id()), &real, now()).unwrap()),
    ];
    let mut cli = Client::connect(&real, &a.addr).await;
    assert_eq!(accepted(&cli.request(a.peer, push(items)).await), 3);
    // ...or the peer over its cap (a grant to this node is always welcome),
    // and then the rest of that patient's items too.
    let forwarded = SecretIdentity::generate().unwrap();
    let to_a = grant_with_hints(&forwarded, a.practice(), vec![]);
    let to_b = grant_with_hints(&forwarded, some_practice(), vec![]);
    let answer = m
        .request(a.peer, push(vec![Item::grant(&to_b), Item::grant(&to_a)]))
        .await;
    assert_eq!(accepted(&answer), 2, "{answer:?}");
    assert_eq!(a.node.grants(&forwarded.patient_id()).len(), 2);
    assert_eq!(a.sync.status().await.unwrap().items_unwanted, unwanted);
}

fn dial_limits() -> Limits {
    Limits {
        dial_burst_per_source: 2,
        dials_per_minute_per_source: 1,
        ..Limits::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dials_on_behalf_of_one_source_are_rate_limited() {
    let a = Practice::new(medmesh_node::Config::default(), dial_limits()).await;
    // A self-made identity's grant to this node (which it must take: any
    // new patient's first grant looks like that) names five addresses.
    let traps = [
        Listener::new().await,
        Listener::new().await,
        Listener::new().await,
        Listener::new().await,
        Listener::new().await,
    ];
    let hints = traps.iter().map(|t| t.hint(&some_practice())).collect();
    let scanner = SecretIdentity::generate().unwrap();
    let mut s = Client::connect(&scanner, &a.addr).await;
    let lure = grant_with_hints(&scanner, a.practice(), hints);
    assert_eq!(accepted(&s.request(a.peer, push(vec![Item::grant(&lure)])).await), 1);

    // Control: another patient's grant to this node, from another source:
    // its one hint is followed.
    let control = Listener::new().await;
    let patient = SecretIdentity::generate().unwrap();
    let mut cli = Client::connect(&patient, &a.addr).await;
    let grant = grant_with_hints(&patient, a.practice(), vec![control.hint(&some_practice())]);
    assert_eq!(accepted(&cli.request(a.peer, push(vec![Item::grant(&grant)])).await), 1);
    until("the node follows the second patient's hint", async || {
        control.connections() > 0
    })
    .await;
    let dialled: usize = traps.iter().map(Listener::connections).sum();
    assert!(dialled <= 2, "one source made the node dial {dialled} addresses");
    assert!(a.sync.status().await.unwrap().dials_limited >= 3);
}
