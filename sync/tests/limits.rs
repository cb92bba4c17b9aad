//! Flood limits of medmesh-sync (docs/protocol.md, "Flood limits"): real
//! swarms on `/ip4/127.0.0.1/tcp/0` with in-memory backends, a client
//! speaking `/medmesh/sync/1` by hand, no sleeps as synchronisation (waits
//! poll a condition inside a timeout).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use medmesh_crypto::{
    Access, ActorId, Change, Collection, Envelope, EpochKey, Grant, GrantId, GrantTerms, PatientId, SecretIdentity, now,
};
use medmesh_sync::memory::MemoryBackend;
use medmesh_sync::wire::{RefusalCode, Request, Response};
use medmesh_sync::{Config, Cursor, InstanceId, Item, ItemKind, Limits, SyncHandle};

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
