//! Issue 16, anti-entropy at scale: a round compares every shared patient
//! with one digest request (docs/protocol.md §8), reconciles only those that
//! differ, notes sync checks for those in step (completeness, §8b), tells a
//! peer not granted a patient nothing, and falls back to one summary per
//! patient with a peer that predates digests. Real node stores on sled,
//! swarms on 127.0.0.1; waits poll inside a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures::StreamExt as _;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use medmesh_crypto::{Access, Collection, PatientId, SecretIdentity, now};
use medmesh_node::Node;
use medmesh_node::audit::Action;
use medmesh_node::testing::{ChangeMaker, TestPatient};
use medmesh_sync::wire::{DigestParts, Request, Response, patient_digest, summary_digest};
use medmesh_sync::{Config, Item, ItemId, ItemKind, Multiaddr, PeerId, Protocol, SyncHandle, serve_request};

mod common;
use common::client::{Client, raw_swarm};
use common::{Store, WAIT, quiet_config};

/// No consent flows: no nudges and no rounds on connection, so the only
/// anti-entropy rounds are the ones a test starts and the counters it reads
/// move for them alone.
fn still_config() -> Config {
    Config {
        consent_flows: false,
        ..quiet_config()
    }
}

struct Site {
    store: Store,
    sync: SyncHandle,
}

impl Site {
    async fn start() -> Self {
        let store = Store::create().await;
        let sync = SyncHandle::spawn(still_config(), &store.key, store.backend.clone())
            .await
            .unwrap();
        Self { store, sync }
    }

    fn node(&self) -> &Node {
        &self.store.node
    }

    async fn addr(&self) -> Multiaddr {
        self.sync.listen_addrs().await.unwrap().remove(0)
    }
}

/// A patient whose labs `a` holds (granted read-write, `changes` written
/// there) and `b` may read (granted read); both nodes hold both grants.
async fn shared_patient(a: &Store, b: &Store, changes: usize) -> (TestPatient, ChangeMaker) {
    let mut patient = TestPatient::new().unwrap();
    let pid = patient.id();
    let (grant_a, items_a) = patient.onboard(a.practice(), Collection::Labs).unwrap();
    a.node.submit(pid, items_a).await.unwrap();
    let (_, mut items_b) = patient
        .grant_with_share(b.practice(), Collection::Labs, Access::Read)
        .unwrap();
    a.node.submit(pid, items_b.clone()).await.unwrap();
    items_b.push(Item::new(ItemKind::Grant, grant_a.encoded().to_vec()));
    b.node.submit(pid, items_b).await.unwrap();
    let mut labs = ChangeMaker::new(&a.key.public_bytes()).unwrap();
    for i in 0..changes {
        write_lab(a, pid, &mut labs, i).await;
    }
    (patient, labs)
}

async fn write_lab(a: &Store, pid: PatientId, labs: &mut ChangeMaker, i: usize) {
    let change = labs.put(&format!("lab{i}"), "v").unwrap();
    a.node
        .write_change(pid, Collection::Labs, change.as_change())
        .await
        .unwrap();
}

/// Items of `patient` that `node`'s audit log says it disclosed to `peer`.
fn disclosed_to(node: &Node, patient: &PatientId, peer: &PeerId) -> usize {
    node.audit_entries(Some(patient))
        .unwrap()
        .iter()
        .filter(|e| e.action == Action::Disclose && e.actor_id == peer.to_string())
        .map(|e| e.items.len())
        .sum()
}

/// Whether `node`'s labs of `patient` are judged complete, and whether a
/// sync check with `peer` is among their sources.
fn labs_checked(node: &Node, patient: &PatientId, peer: &PeerId) -> (bool, bool) {
    let holdings = node.holdings(patient).unwrap();
    let labs = &holdings.completeness["labs"];
    (labs.complete, labs.sources.iter().any(|s| s.peer == peer.to_string()))
}

/// Four patients in step and one that lacks a change: one round sends one
/// digest request, reconciles (one summary, one fetch) only the patient
/// that differs and repairs it; the patients in step cost no summary, no
/// audited disclosure, and get their sync check with A (their labs turn
/// complete: A holds them since before B's grant).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_sends_one_digest_request_and_reconciles_only_the_patient_that_differs() {
    let (a, b) = (Site::start().await, Site::start().await);
    let mut patients = Vec::new();
    for _ in 0..5 {
        patients.push(shared_patient(&a.store, &b.store, 2).await);
    }
    let a_peer = a.store.peer();
    b.sync.dial(a.addr().await).await.unwrap();
    b.sync.sync_now(a_peer).await.unwrap();
    let pids: Vec<PatientId> = patients.iter().map(|(p, _)| p.id()).collect();
    for pid in &pids {
        assert_eq!(b.node().envelope_ids(pid, Collection::Labs).unwrap().len(), 2);
        assert_eq!(
            labs_checked(b.node(), pid, &a_peer),
            (false, false),
            "a pull notes no check: B still awaits its first sync with A"
        );
    }
    // The last patient's newest change B does not hear of (no nudges here).
    let (last, labs) = patients.last_mut().unwrap();
    let last = last.id();
    write_lab(&a.store, last, labs, 2).await;
    let disclosed: Vec<usize> = pids
        .iter()
        .map(|p| disclosed_to(a.node(), p, &b.store.peer()))
        .collect();

    let (b_before, a_before) = (b.sync.status().await.unwrap(), a.sync.status().await.unwrap());
    let round = tokio::time::timeout(WAIT, b.sync.anti_entropy(a_peer))
        .await
        .unwrap()
        .unwrap();
    let (b_after, a_after) = (b.sync.status().await.unwrap(), a.sync.status().await.unwrap());

    assert_eq!(round.ingest.accepted, 1, "{round:?}");
    assert_eq!(b.node().envelope_ids(&last, Collection::Labs).unwrap().len(), 3);
    assert_eq!(
        b_after.reconciliations - b_before.reconciliations,
        1,
        "only the patient that differs is reconciled"
    );
    assert_eq!(
        b_after.requests_sent - b_before.requests_sent,
        3,
        "digests, then one summary and one fetch"
    );
    assert_eq!(a_after.requests_received - a_before.requests_received, 3);
    for (i, pid) in pids.iter().enumerate() {
        assert_eq!(labs_checked(b.node(), pid, &a_peer), (true, true), "patient {i}");
        if *pid != last {
            assert_eq!(
                disclosed_to(a.node(), pid, &b.store.peer()),
                disclosed[i],
                "patient {i} in step: nothing disclosed, nothing audited"
            );
        }
    }

    // In step everywhere now: the next round is the digest request alone.
    let before = b.sync.status().await.unwrap();
    let round = b.sync.anti_entropy(a_peer).await.unwrap();
    let after = b.sync.status().await.unwrap();
    assert_eq!((round.pages, round.received), (1, 0), "{round:?}");
    assert_eq!(after.requests_sent - before.requests_sent, 1);
    assert_eq!(after.reconciliations, before.reconciliations);
}

/// What A would hash of `patient` for B: its grants (none revoked) and its
/// labs ids (docs/protocol.md §8), computed here from the spec.
fn digest_as_served(a: &Node, patient: &PatientId) -> [u8; 32] {
    let parts = DigestParts {
        consent: a
            .grants(patient)
            .iter()
            .map(|g| (ItemId::digest(g.encoded()), false))
            .collect(),
        collections: vec![(
            Collection::Labs,
            summary_digest(&a.envelope_ids(patient, Collection::Labs).unwrap()),
        )],
    };
    patient_digest(&parts)
}

/// A peer not granted a patient learns nothing from a digest request: the
/// patient reads "differs" whatever digest it sends — the true one, or the
/// digest of nothing (what a server that disclosed nothing would hash) —
/// exactly as a patient the node never heard of; nothing is audited. The
/// granted peer's true digest reads in step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_not_granted_a_patient_learns_nothing_from_digests() {
    let (a, b) = (Site::start().await, Store::create().await);
    let (patient, _) = shared_patient(&a.store, &b, 2).await;
    let pid = patient.id();
    let unknown = TestPatient::new().unwrap().id();
    let a_peer = a.store.peer();
    let truth = digest_as_served(a.node(), &pid);
    let nothing = patient_digest(&DigestParts::default());

    let mut granted = Client::connect(&b.key, &a.addr().await).await;
    let answer = granted
        .request(
            a_peer,
            Request::Digests {
                patients: vec![(unknown, truth), (pid, truth)],
            },
        )
        .await;
    assert_eq!(answer, Response::Differing(vec![0]), "B's true digest is in step");

    let stranger = SecretIdentity::generate().unwrap();
    let stranger_peer = stranger.practice_id().unwrap().peer_id();
    let mut c = Client::connect(&stranger, &a.addr().await).await;
    for digest in [truth, nothing, [0; 32]] {
        let answer = c
            .request(
                a_peer,
                Request::Digests {
                    patients: vec![(pid, digest), (unknown, digest)],
                },
            )
            .await;
        assert_eq!(
            answer,
            Response::Differing(vec![0, 1]),
            "digest {}",
            hex::encode(digest)
        );
    }
    assert_eq!(disclosed_to(a.node(), &pid, &stranger_peer), 0);
}

/// A node that predates digests: a swarm that drops the stream of a
/// request it cannot decode (as an older node's codec does) and answers
/// every other request as a node does ([`serve_request`]).
async fn legacy_node(store: &Store) -> Multiaddr {
    let mut swarm = raw_swarm(&store.key, ProtocolSupport::Inbound);
    swarm.listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap()).unwrap();
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            break address.with(Protocol::P2p(store.peer()));
        }
    };
    let backend = store.backend.clone();
    tokio::spawn(async move {
        loop {
            if let SwarmEvent::Behaviour(request_response::Event::Message {
                peer,
                message: request_response::Message::Request { request, channel, .. },
                ..
            }) = swarm.select_next_some().await
            {
                match Request::decode(&request) {
                    Ok(Request::Digests { .. }) | Err(_) => drop(channel),
                    Ok(request) => {
                        let answer = serve_request(&*backend, peer, request, now()).await;
                        let _ = swarm.behaviour_mut().send_response(channel, answer.encode());
                    }
                }
            }
        }
    });
    addr
}

/// With a peer that predates digests, a round reconciles every shared
/// patient with a summary, as before, and repairs what differs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_predates_digests_gets_a_summary_per_patient() {
    let (old, b) = (Store::create().await, Site::start().await);
    let mut pids = Vec::new();
    for _ in 0..3 {
        pids.push(shared_patient(&old, &b.store, 2).await.0.id());
    }
    let addr = legacy_node(&old).await;
    let old_peer = old.peer();
    b.sync.dial(addr).await.unwrap();
    let before = b.sync.status().await.unwrap();
    let round = tokio::time::timeout(WAIT, b.sync.anti_entropy(old_peer))
        .await
        .unwrap()
        .unwrap();
    let after = b.sync.status().await.unwrap();
    // (The pull B starts on connecting may have fetched them first.)
    assert_eq!(after.reconciliations - before.reconciliations, 3, "{round:?}");
    for pid in &pids {
        assert_eq!(b.node().envelope_ids(pid, Collection::Labs).unwrap().len(), 2);
    }
}

/// The `Practices` request (the patient's address book, protocol §9c) is
/// answered only to the patient's own key: a practice granted the patient,
/// and a stranger, are refused; the patient gets the node's kept records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_patient_learns_where_its_practices_are() {
    let (a, b) = (Site::start().await, Store::create().await);
    let (patient, _) = shared_patient(&a.store, &b, 1).await;
    let pid = patient.id();
    let a_peer = a.store.peer();
    let stranger = SecretIdentity::generate().unwrap();
    for key in [&b.key, &stranger] {
        let mut c = Client::connect(key, &a.addr().await).await;
        let answer = c.request(a_peer, Request::Practices { patient: pid }).await;
        assert_eq!(
            answer,
            Response::Refused(medmesh_sync::wire::RefusalCode::NotPatient),
            "a key that is not the patient's asked"
        );
    }
    let mut own = Client::connect(&patient.identity, &a.addr().await).await;
    let answer = own.request(a_peer, Request::Practices { patient: pid }).await;
    assert!(matches!(answer, Response::Practices { .. }), "{answer:?}");
}
