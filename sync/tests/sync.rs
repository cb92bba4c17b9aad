//! Integration tests of medmesh-sync: real swarms on `/ip4/127.0.0.1/tcp/0`
//! with in-memory backends, no mDNS, no sleeps as synchronisation (waits
//! poll a condition inside a timeout). Covers the consent flows of
//! DESIGN §5, invariant 1 (nothing leaves without a grant in force),
//! invariant 6 (nothing new after a revocation), nudges, cursors, restarts
//! and an adversarial peer speaking the protocol by hand.
//!
//! Over 800 lines on purpose: one swarm fixture shared by every consent
//! flow's test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use medmesh_crypto::{
    Access, ActorId, Change, Collection, Envelope, EnvelopeId, Grant, GrantId, GrantTerms, PatientId, SecretIdentity,
    now,
};
use medmesh_sync::memory::MemoryBackend;
use medmesh_sync::wire::{self, Request, Response};
use medmesh_sync::{Backend, Config, Cursor, InstanceId, Item, ItemId, ItemKind, ItemMeta, Protocol, SyncHandle};

mod common;
use common::client::Client;
use common::{CliPatient, WAIT};

/// Waits for `cond`, polling the backends, inside a timeout.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for: {what}"));
}

fn config() -> Config {
    Config {
        // Only nudges, pushes and explicit syncs move data in these tests.
        pull_interval: Duration::from_secs(3600),
        page_limit: 64,
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
    async fn start(key: SecretIdentity, store: Arc<MemoryBackend>) -> Self {
        Self::start_with(config(), key, store).await
    }

    async fn start_with(config: Config, key: SecretIdentity, store: Arc<MemoryBackend>) -> Self {
        let sync = SyncHandle::spawn(config, &key, store.clone()).await.unwrap();
        let addr = sync.listen_addrs().await.unwrap().remove(0);
        Self {
            peer: sync.local_peer_id(),
            key,
            store,
            sync,
            addr,
        }
    }

    async fn new() -> Self {
        Self::start(SecretIdentity::generate().unwrap(), Arc::new(MemoryBackend::new())).await
    }

    async fn with_kademlia() -> Self {
        let config = Config {
            kademlia: true,
            ..config()
        };
        Self::start_with(
            config,
            SecretIdentity::generate().unwrap(),
            Arc::new(MemoryBackend::new()),
        )
        .await
    }

    async fn connect(&self, other: &Node) {
        tokio::time::timeout(WAIT, self.sync.dial(other.addr.clone()))
            .await
            .unwrap()
            .unwrap();
    }

    fn count(&self, p: &Patient, c: Collection) -> usize {
        self.store.envelope_count(&p.id(), c)
    }

    fn envelopes(&self, p: &Patient) -> usize {
        self.store.count(&p.id(), ItemKind::Envelope)
    }
}

/// The patient: the CLI's keystore (`CliPatient`), writing envelopes of its
/// own under the current key of a collection (fake changes: sync never
/// decrypts).
struct Patient {
    cli: CliPatient,
    seq: u64,
}

impl Patient {
    fn new() -> Self {
        Self {
            cli: CliPatient::new().unwrap(),
            seq: 0,
        }
    }

    fn id(&self) -> PatientId {
        self.cli.id()
    }

    /// An envelope the patient writes under the current key of `c`.
    fn envelope(&mut self, c: Collection) -> Item {
        self.seq += 1;
        let identity = self.cli.identity();
        let actor = ActorId::for_author(&identity.public_bytes(), [1; 8]);
        let body = format!("change {}", self.seq);
        let change = Change {
            bytes: body.as_bytes(),
            hash: [(self.seq % 251) as u8; 32],
            actor,
            seq: self.seq,
        };
        let key = self.cli.current_key(c).expect("a grant made this collection's key");
        Item::envelope(&Envelope::seal((key.patient, c), key, identity, None, change, now()).unwrap())
    }

    /// `medmesh patient grant`: the grant, and every item the CLI submits
    /// with it (the grant first).
    fn grant(
        &mut self,
        to: &Node,
        collections: &[Collection],
        access: Access,
        hints: Vec<String>,
    ) -> (Grant, Vec<Item>) {
        self.grant_from(now() - 60_000, to, collections, access, hints)
    }

    fn grant_from(
        &mut self,
        not_before: u64,
        to: &Node,
        collections: &[Collection],
        access: Access,
        hints: Vec<String>,
    ) -> (Grant, Vec<Item>) {
        let grantee = to.key.practice_id().unwrap();
        let (index, items) = self
            .cli
            .grant(grantee, collections, access, not_before, None, hints)
            .unwrap();
        (self.cli.grants[index].grant.clone(), items)
    }

    /// `medmesh patient revoke` with an empty cut (nothing the grantee wrote
    /// is kept): the revocation first, then the new epoch's shares.
    fn revoke(&mut self, grant: &Grant) -> Vec<Item> {
        let index = self.cli.index_of(grant).expect("a grant this patient issued");
        self.cli.revoke(index, Vec::new(), now()).unwrap().unwrap()
    }
}

/// A's patient: first grant to A (read-write, everything but sensitive),
/// and a history written at A before anyone else has a grant.
async fn home_practice(p: &mut Patient) -> (Node, Grant) {
    let a = Node::new().await;
    let hint = a.addr.to_string();
    home_practice_at(p, a, hint)
}

/// [`home_practice`] at a given node, whose grant hints at `hint`.
fn home_practice_at(p: &mut Patient, a: Node, hint: String) -> (Node, Grant) {
    let all = [
        Collection::Core,
        Collection::Medications,
        Collection::Labs,
        Collection::Documents,
        Collection::Sensitive,
    ];
    let (g, items) = p.grant(&a, &all, Access::ReadWrite, vec![hint]);
    for item in items {
        a.store.write(item).unwrap();
    }
    for c in [
        Collection::Core,
        Collection::Core,
        Collection::Core,
        Collection::Labs,
        Collection::Labs,
        Collection::Medications,
        Collection::Medications,
        Collection::Sensitive,
    ] {
        a.store.write(p.envelope(c)).unwrap();
    }
    (a, g)
}

/// Grants B core+labs at A, as the patient's CLI submitting to A does.
fn grant_core_labs(p: &mut Patient, a: &Node, b: &Node) -> Grant {
    let (g, items) = p.grant(
        b,
        &[Collection::Core, Collection::Labs],
        Access::Read,
        vec![a.addr.to_string()],
    );
    for item in items {
        a.store.write(item).unwrap();
    }
    g
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_moves_exactly_the_granted_collections_including_history() {
    let mut p = Patient::new();
    let (a, _) = home_practice(&mut p).await;
    let b = Node::new().await;
    let c = Node::new().await;
    b.connect(&a).await;
    c.connect(&a).await;
    // Before the grant: B and C pull A's whole log and get nothing of the
    // patient, so their cursors now lie past the history.
    let before = b.sync.sync_now(a.peer).await.unwrap();
    assert_eq!(before.received, 0, "B received items before any grant");
    assert_eq!(c.sync.sync_now(a.peer).await.unwrap().received, 0);
    assert!(b.store.items().is_empty());

    let g = grant_core_labs(&mut p, &a, &b);
    // A pushes the grant and B's key shares; B reconciles the history.
    until("B holds core and labs", || {
        b.count(&p, Collection::Core) == 3 && b.count(&p, Collection::Labs) == 2
    })
    .await;
    // Settle every path (pull and reconcile) and check nothing else came.
    b.sync.sync_now(a.peer).await.unwrap();
    b.sync.reconcile(a.peer, p.id()).await.unwrap();
    assert_eq!(b.envelopes(&p), 5, "B holds exactly 3 core + 2 labs envelopes");
    assert_eq!(b.count(&p, Collection::Medications), 0);
    assert_eq!(b.count(&p, Collection::Sensitive), 0);
    assert_eq!(
        b.store.count(&p.id(), ItemKind::KeyShare),
        2,
        "B holds only its own key shares"
    );
    assert_eq!(b.store.pending_count(), 0, "B holds no opaque or waiting items");
    assert!(b.store.rejected().is_empty());

    // C, without a grant, gets nothing of the patient, by pull or reconcile.
    c.sync.sync_now(a.peer).await.unwrap();
    let r = c.sync.reconcile(a.peer, p.id()).await.unwrap();
    assert_eq!(r.received, 0);
    assert!(c.store.items().is_empty(), "C holds nothing of the patient");

    // A's audit: every disclosure of envelopes to B names B's grant; none to C.
    let audit = a.store.disclosures();
    assert!(audit.iter().all(|d| d.peer != c.peer), "nothing disclosed to C");
    let to_b: Vec<_> = audit.iter().filter(|d| d.peer == b.peer).collect();
    assert!(!to_b.is_empty());
    let envelope_ids: Vec<ItemId> = b
        .store
        .items()
        .iter()
        .filter(|s| s.meta.kind == ItemKind::Envelope)
        .map(|s| s.meta.id)
        .collect();
    for id in envelope_ids {
        assert!(
            to_b.iter().any(|d| d.grant == Some(g.id()) && d.items.contains(&id)),
            "envelope {id} sent to B without an audit entry under B's grant"
        );
    }
}

/// B's grant reaches B first (the patient's CLI submitted it there), B
/// reconciles with A and gets nothing — A does not know the grant yet —
/// and B's cursor at A now lies past the history. When the grant reaches A
/// later (forwarded by another holder, here written straight into A), A's
/// filter opens to B: A asks B to reconcile, and the history moves
/// (DESIGN §6: every filter change triggers reconciliation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_reaching_a_holder_after_the_grantee_reconciled_still_moves_the_history() {
    let mut p = Patient::new();
    let (a, _) = home_practice(&mut p).await;
    let b = Node::new().await;
    b.connect(&a).await;
    let (g, items) = p.grant(&b, &[Collection::Core, Collection::Labs], Access::Read, vec![]);
    // Only B's grant and shares: the patient's other live grants, which the
    // CLI sends along, would tell B that A holds the record, and B would
    // forward its grant to A at once.
    for (i, item) in items.into_iter().enumerate() {
        if i == 0 || item.kind != ItemKind::Grant {
            b.store.write(item).unwrap();
        }
    }
    assert_eq!(b.sync.sync_now(a.peer).await.unwrap().received, 0);
    assert_eq!(b.sync.reconcile(a.peer, p.id()).await.unwrap().received, 0);
    assert_eq!(b.envelopes(&p), 0, "A served B before it knew B's grant");

    a.store.write(Item::grant(&g)).unwrap();
    until("B holds core and labs", || {
        b.count(&p, Collection::Core) == 3 && b.count(&p, Collection::Labs) == 2
    })
    .await;
    b.sync.reconcile(a.peer, p.id()).await.unwrap();
    assert_eq!(b.envelopes(&p), 5, "B holds exactly 3 core + 2 labs envelopes");
}

/// B's grant makes B reconcile with the practices that can hold the
/// patient's history (A, which pushed the grant and is in its hints), not
/// with every peer connected to it: with Kademlia that is most of the
/// network, and a peer once pulled holds a cursor here, so every later pull
/// tick pulled it again (docs/decisions.md, "Kademlia").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_reconciles_with_the_patients_practices_not_every_connected_peer() {
    let mut p = Patient::new();
    let (a, _) = home_practice(&mut p).await;
    let b = Node::new().await;
    // U shares no patient with B; it dialed B, so B has no reason to pull it.
    let u = Node::new().await;
    b.connect(&a).await;
    u.connect(&b).await;
    grant_core_labs(&mut p, &a, &b);
    until("B holds core and labs", || {
        b.count(&p, Collection::Core) == 3 && b.count(&p, Collection::Labs) == 2
    })
    .await;
    // One pull at a time per peer: this one runs after any the grant started.
    b.sync.sync_now(u.peer).await.unwrap();
    assert_eq!(
        u.sync.status().await.unwrap().requests_received,
        1,
        "B's grant made B pull or reconcile an unrelated connected peer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nudge_delivers_a_new_write_and_revocation_stops_everything_new() {
    let mut p = Patient::new();
    let (a, _) = home_practice(&mut p).await;
    let b = Node::new().await;
    b.connect(&a).await;
    let g = grant_core_labs(&mut p, &a, &b);
    until("B holds the history", || b.envelopes(&p) == 5).await;

    // A new write at A reaches B by nudge alone (the periodic pull is an hour).
    a.store.write(p.envelope(Collection::Labs)).unwrap();
    until("B holds the new labs envelope", || b.count(&p, Collection::Labs) == 3).await;
    // A write in a collection B may not read does not.
    a.store.write(p.envelope(Collection::Medications)).unwrap();

    // Revocation at A: forwarded to B, and A stops serving B at once.
    for item in p.revoke(&g) {
        a.store.write(item).unwrap();
    }
    until("B holds the revocation", || {
        b.store.count(&p.id(), ItemKind::Revocation) == 1
    })
    .await;
    let held = b.envelopes(&p);
    for _ in 0..3 {
        a.store.write(p.envelope(Collection::Core)).unwrap();
    }
    let pulled = b.sync.sync_now(a.peer).await.unwrap();
    let reconciled = b.sync.reconcile(a.peer, p.id()).await.unwrap();
    assert_eq!(pulled.ingest.accepted + reconciled.ingest.accepted, 0);
    assert_eq!(b.envelopes(&p), held, "B received an envelope after the revocation");
    assert_eq!(b.count(&p, Collection::Medications), 0);
    // A's log of what went to B after the revocation: nothing under the grant.
    let status = b.sync.status().await.unwrap();
    assert!(status.items_received >= 5);
    assert_eq!(status.peers, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patient_cli_grants_via_a_node_which_dials_the_grantee() {
    let mut p = Patient::new();
    let (a, _) = home_practice(&mut p).await;
    let b = Node::new().await; // not connected to anyone
    // The patient's CLI: a peer whose identity is the patient key.
    let cli_store = Arc::new(MemoryBackend::new());
    let cli = SyncHandle::spawn(config(), p.cli.identity(), cli_store.clone())
        .await
        .unwrap();
    cli.dial(a.addr.clone()).await.unwrap();

    // `patient grant --node A --to <B's multiaddr>`.
    let (_, items) = p.grant(
        &b,
        &[Collection::Core, Collection::Labs],
        Access::Read,
        vec![a.addr.to_string()],
    );
    let report = cli.push(a.peer, items, vec![b.addr.clone()]).await.unwrap();
    assert_eq!(report.accepted, 3);
    until("B holds core and labs", || b.envelopes(&p) == 5).await;
    assert!(b.sync.connected_peers().await.unwrap().contains(&a.peer));

    // The patient pulls its own items from A: everything, sensitive included.
    cli.sync_now(a.peer).await.unwrap();
    assert_eq!(cli_store.count(&p.id(), ItemKind::Envelope), 8);
    assert_eq!(cli_store.envelope_count(&p.id(), Collection::Sensitive), 1);
    assert_eq!(cli_store.count(&p.id(), ItemKind::Grant), 2);
    cli.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_and_revocations_reach_every_holder_and_write_back_converges() {
    let mut p = Patient::new();
    let (a, _) = home_practice(&mut p).await;
    let b = Node::new().await;
    let c = Node::new().await;
    b.connect(&a).await;
    c.connect(&a).await;
    b.connect(&c).await;
    // C holds a read-write grant for core; B gets one for core and labs.
    let (gc, items) = p.grant(&c, &[Collection::Core], Access::ReadWrite, vec![a.addr.to_string()]);
    for item in items {
        a.store.write(item).unwrap();
    }
    until("C holds its grant", || c.store.count(&p.id(), ItemKind::Grant) >= 1).await;
    let gb = grant_core_labs(&mut p, &a, &b);
    // C, a holder, learns of B's grant (forwarded).
    until("C holds B's grant", || {
        c.store
            .items()
            .iter()
            .any(|s| s.meta.grant == Some(gb.id()) && s.meta.kind == ItemKind::Grant)
    })
    .await;
    until("C holds core history", || c.count(&p, Collection::Core) == 3).await;
    assert_eq!(c.count(&p, Collection::Labs), 0, "C may not read labs");

    // Write-back: C writes core under its read-write grant; it reaches A and B.
    let key = p.cli.current_key(Collection::Core).unwrap().clone();
    let actor = ActorId::for_author(&c.key.public_bytes(), [2; 8]);
    let change = Change {
        bytes: b"c writes",
        hash: [42; 32],
        actor,
        seq: 1,
    };
    let env = Envelope::seal(
        (key.patient, key.collection),
        &key,
        &c.key,
        Some(gc.id()),
        change,
        now(),
    )
    .unwrap();
    c.store.write(Item::envelope(&env)).unwrap();
    let id: ItemId = env.id().into();
    until("A holds C's write", || a.store.holds(&id)).await;
    until("B holds C's write", || b.store.holds(&id)).await;

    // Revoking C's grant at A reaches B too (a holder).
    for item in p.revoke(&gc) {
        a.store.write(item).unwrap();
    }
    until("B holds C's revocation", || {
        b.store.count(&p.id(), ItemKind::Revocation) == 1
    })
    .await;
    until("C holds its revocation", || {
        c.store.count(&p.id(), ItemKind::Revocation) == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_from_the_cursor_and_a_new_instance_resets_it() {
    let mut p = Patient::new();
    let (a, _) = home_practice(&mut p).await;
    let b_key = SecretIdentity::generate().unwrap();
    let b_store = Arc::new(MemoryBackend::new());
    let b = Node::start(SecretIdentity::from_seed(&b_key.seed()), b_store.clone()).await;
    b.connect(&a).await;
    let _g = grant_core_labs(&mut p, &a, &b);
    until("B holds the history", || b.envelopes(&p) == 5).await;
    b.sync.sync_now(a.peer).await.unwrap();
    let cursor = b_store.cursor(&a.peer).unwrap().unwrap();
    b.sync.shutdown().await.unwrap();
    assert!(b.sync.status().await.is_err(), "stopped actor still answers");

    // B is offline while A writes 500 labs envelopes.
    for _ in 0..500 {
        a.store.write(p.envelope(Collection::Labs)).unwrap();
    }
    let b2 = Node::start(b_key, b_store.clone()).await;
    b2.connect(&a).await;
    let first = b2.sync.sync_now(a.peer).await.unwrap();
    until("B converged", || b2.count(&p, Collection::Labs) == 502).await;
    assert!(first.received <= 500, "B re-received history: {first:?}");
    assert!(b_store.cursor(&a.peer).unwrap().unwrap().seq > cursor.seq);
    // The second sync moves only the delta: nothing.
    let second = b2.sync.sync_now(a.peer).await.unwrap();
    assert_eq!(second.received, 0, "second sync moved {second:?}");

    // A restored from backup (new instance id) resets B's cursor: B scans
    // from 0, receives only duplicates, stores nothing new.
    let a_key = SecretIdentity::from_seed(&a.key.seed());
    a.sync.shutdown().await.unwrap();
    let restored = Arc::new(a.store.restored_copy(InstanceId([9; 16])));
    let a2 = Node::start(a_key, restored).await;
    b2.connect(&a2).await;
    let again = b2.sync.sync_now(a2.peer).await.unwrap();
    assert_eq!(again.ingest.accepted, 0);
    assert_eq!(b_store.cursor(&a2.peer).unwrap().unwrap().instance, InstanceId([9; 16]));
    assert_eq!(b2.count(&p, Collection::Labs), 502);
}

// ---- an adversarial client speaking /medmesh/sync/1 by hand ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adversarial_client_gets_nothing_and_the_node_stays_up() {
    let mut p = Patient::new();
    let (a, _) = home_practice(&mut p).await;
    let b = Node::new().await;
    b.connect(&a).await;
    let g = grant_core_labs(&mut p, &a, &b);
    until("B holds the history", || b.envelopes(&p) == 5).await;

    let mallory_key = SecretIdentity::generate().unwrap();
    let mut m = Client::connect(&mallory_key, &a.addr).await;

    // Oversize frame and garbage: no answer, the node lives on.
    let oversize = vec![0x80; wire::MAX_REQUEST_BYTES + 10];
    assert!(m.ask(a.peer, oversize).await.is_err(), "oversize frame was answered");
    assert!(
        m.ask(a.peer, vec![0xff, 0xfe, 0x00]).await.is_err(),
        "garbage was answered"
    );
    let mut truncated = Request::Summary {
        patient: p.id(),
        digests: vec![],
    }
    .encode();
    truncated.truncate(10);
    assert!(m.ask(a.peer, truncated).await.is_err(), "truncated frame was answered");

    // Pull everything from 0, any instance: nothing of the patient.
    for instance in [InstanceId::default(), a.store.instance_id()] {
        let page = m
            .request(
                a.peer,
                Request::Pull {
                    cursor: Cursor { instance, seq: 0 },
                    limit: 1024,
                    snapshots: None,
                },
            )
            .await;
        match page {
            Response::Page { items, .. } => assert!(items.is_empty(), "mallory got {} items", items.len()),
            other => panic!("unexpected {other:?}"),
        }
    }
    // Another patient's summary and envelopes by id: nothing.
    match m
        .request(
            a.peer,
            Request::Summary {
                patient: p.id(),
                digests: vec![],
            },
        )
        .await
    {
        Response::Summary { consent, collections } => {
            assert!(consent.is_empty() && collections.is_empty())
        }
        other => panic!("unexpected {other:?}"),
    }
    let ids: Vec<EnvelopeId> = a
        .store
        .items()
        .iter()
        .filter(|s| s.meta.kind == ItemKind::Envelope)
        .map(|s| EnvelopeId(s.meta.id.0))
        .collect();
    match m.request(a.peer, Request::Fetch { ids: ids.clone() }).await {
        Response::Fetched { items } => assert!(items.is_empty()),
        other => panic!("unexpected {other:?}"),
    }
    // A forged grant naming mallory (signed by mallory, not the patient) is
    // rejected, and opens nothing.
    let forged = Grant::sign(
        GrantTerms {
            id: GrantId::generate().unwrap(),
            patient: mallory_key.patient_id(),
            grantee: mallory_key.practice_id().unwrap(),
            collections: vec![Collection::Core],
            access: Access::ReadWrite,
            not_before: 0,
            expires: None,
            purpose: "treatment".into(),
            issued_at: 0,
            address_hints: vec![],
        },
        &mallory_key,
    )
    .unwrap();
    let mut forged_bytes = forged.encoded().to_vec();
    // Re-point the grant at the real patient: the signature no longer holds.
    let pk = mallory_key.patient_id();
    let pos = forged_bytes.windows(32).position(|w| w == pk.as_bytes()).unwrap();
    forged_bytes[pos..pos + 32].copy_from_slice(p.id().as_bytes());
    // Replays and bit flips of real envelopes.
    let real = a
        .store
        .items()
        .into_iter()
        .find(|s| s.meta.kind == ItemKind::Envelope)
        .unwrap();
    let mut flipped = real.item.bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    let push = Request::Push {
        items: vec![
            Item {
                kind: ItemKind::Grant,
                bytes: forged_bytes,
            },
            Item {
                kind: ItemKind::Envelope,
                bytes: flipped,
            },
            real.item.clone(),
        ],
        addrs: vec![],
    };
    match m.request(a.peer, push.clone()).await {
        Response::Pushed {
            accepted,
            duplicates,
            rejected,
            ..
        } => {
            assert_eq!(accepted, 0);
            assert_eq!(duplicates, 1, "the replay is a duplicate");
            assert_eq!(rejected, 2, "forged grant and flipped envelope are rejected");
        }
        other => panic!("unexpected {other:?}"),
    }
    // Still nothing for mallory after all that.
    match m.request(a.peer, Request::Fetch { ids }).await {
        Response::Fetched { items } => assert!(items.is_empty()),
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        a.store
            .disclosures()
            .iter()
            .all(|d| d.peer != mallory_key.practice_id().unwrap().peer_id())
    );

    // The node is up and still serves B.
    a.store.write(p.envelope(Collection::Core)).unwrap();
    until("B holds the new write", || b.count(&p, Collection::Core) == 4).await;
    let _ = g;
    let meta = ItemMeta::describe(&real.item).unwrap();
    assert_eq!(meta.id, real.meta.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_that_starts_later_moves_history_at_not_before() {
    let mut p = Patient::new();
    let (a, _) = home_practice(&mut p).await;
    let b = Node::new().await;
    b.connect(&a).await;
    let (g, items) = p.grant_from(
        now() + 1500,
        &b,
        &[Collection::Core],
        Access::Read,
        vec![a.addr.to_string()],
    );
    for item in items {
        a.store.write(item).unwrap();
    }
    until("B holds its future grant", || {
        b.store.count(&p.id(), ItemKind::Grant) == 1
    })
    .await;
    // Not in force yet: a pull brings no envelope.
    b.sync.sync_now(a.peer).await.unwrap();
    if now() < g.terms().not_before {
        assert_eq!(b.envelopes(&p), 0, "envelopes before not-before");
    }
    // At not-before B reconciles on its own.
    until("B holds core history", || b.count(&p, Collection::Core) == 3).await;
    assert_eq!(b.envelopes(&p), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_through_the_handle_pass_the_consent_filter() {
    let mut p = Patient::new();
    let (a, _) = home_practice(&mut p).await;
    let b = Node::new().await;
    let c = Node::new().await;
    b.connect(&a).await;
    c.connect(&a).await;
    let g = grant_core_labs(&mut p, &a, &b);
    until("B holds the history", || b.envelopes(&p) == 5).await;
    let core = a.store.write(p.envelope(Collection::Core)).unwrap();
    let item = a.store.items()[core as usize - 1].item.clone();
    // To C (no grant): refused before anything is sent.
    match a.sync.push(c.peer, vec![item.clone()], vec![]).await {
        Err(medmesh_sync::Error::Withheld { peer, .. }) => assert_eq!(peer, c.peer),
        other => panic!("push to C: {other:?}"),
    }
    assert!(c.store.items().is_empty());
    // To B (grant in force): sent and audited under B's grant.
    let r = a.sync.push(b.peer, vec![item.clone()], vec![]).await.unwrap();
    assert_eq!(r.accepted + r.duplicates, 1);
    let id = ItemMeta::describe(&item).unwrap().id;
    assert!(
        a.store
            .disclosures()
            .iter()
            .any(|d| d.peer == b.peer && d.grant == Some(g.id()) && d.items.contains(&id))
    );
    let status = a.sync.status().await.unwrap();
    assert!(status.items_sent >= 6 && status.bytes_sent > 0, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_peers_are_dialed_and_a_shutdown_signal_stops_the_actor() {
    let a = Node::new().await;
    let with_peer = Config {
        peers: vec![a.addr.clone()],
        ..config()
    };
    let key = SecretIdentity::generate().unwrap();
    let b = SyncHandle::spawn(with_peer, &key, Arc::new(MemoryBackend::new()))
        .await
        .unwrap();
    let addrs = b.listen_addrs().await.unwrap();
    assert!(
        addrs
            .iter()
            .all(|a| a.to_string().ends_with(&format!("/p2p/{}", b.local_peer_id())))
    );
    tokio::time::timeout(WAIT, async {
        while !b.connected_peers().await.unwrap().contains(&a.peer) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("B dialed its static peer");

    let (stop, signal) = tokio::sync::oneshot::channel::<()>();
    b.shutdown_on(async {
        let _ = signal.await;
    });
    stop.send(()).unwrap();
    tokio::time::timeout(WAIT, async {
        while b.status().await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("actor stopped on the signal");
    assert!(matches!(
        b.dial(a.addr.clone()).await,
        Err(medmesh_sync::Error::Stopped)
    ));
    // A static peer without /p2p/ is refused at start.
    let bad = Config {
        peers: vec!["/ip4/127.0.0.1/tcp/1".parse().unwrap()],
        ..config()
    };
    assert!(matches!(
        SyncHandle::spawn(bad, &key, Arc::new(MemoryBackend::new())).await,
        Err(medmesh_sync::Error::MissingPeerId(_))
    ));
}

/// Kademlia on `/medmesh/kad/1`: C, which knows only B, connects to A by its
/// PeerId alone (B knows A); a PeerId nobody knows fails with an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kademlia_finds_a_peer_by_its_id_alone() {
    let a = Node::with_kademlia().await;
    let b = Node::with_kademlia().await;
    let c = Node::with_kademlia().await;
    b.connect(&a).await;
    c.connect(&b).await;
    // Identify tells each side the other's addresses and protocols just
    // after connecting; until C has heard from B, its lookup has nobody to ask.
    let found = tokio::time::timeout(WAIT, async {
        loop {
            match c.sync.dial_peer(a.peer).await {
                Ok(peer) => break peer,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .expect("C never found A");
    assert_eq!(found, a.peer);
    assert!(c.sync.connected_peers().await.unwrap().contains(&a.peer));
    // Only the side that asked pulls: A shares no patient with B or C and
    // asked for neither, so the connections they (and C's lookup) opened
    // start no pull at A.
    assert!(c.sync.sync_now(a.peer).await.unwrap().pages > 0);
    b.sync.sync_now(a.peer).await.unwrap();
    assert_eq!(
        a.sync.status().await.unwrap().requests_sent,
        0,
        "A pulled peers it shares nothing with"
    );

    let nobody = SecretIdentity::generate().unwrap().practice_id().unwrap().peer_id();
    let err = tokio::time::timeout(WAIT, c.sync.dial_peer(nobody))
        .await
        .expect("a lookup for an unknown peer must end");
    assert!(err.is_err(), "{err:?}");
}

/// A practice behind NAT, as loopback can show one: it listens nowhere and
/// holds a circuit reservation on relay `r`, so it is reachable only as
/// `<r>/p2p-circuit/p2p/<it>` (its `addr`).
async fn behind_relay(r: &Node, dcutr: bool) -> Node {
    let config = Config {
        listen: Vec::new(),
        relays: vec![r.addr.clone()],
        dcutr,
        ..config()
    };
    let key = SecretIdentity::generate().unwrap();
    let store = Arc::new(MemoryBackend::new());
    let sync = SyncHandle::spawn(config, &key, store.clone()).await.unwrap();
    let addr = tokio::time::timeout(WAIT, async {
        loop {
            let addrs = sync.listen_addrs().await.unwrap();
            if let Some(a) = addrs.into_iter().find(|a| a.iter().any(|p| p == Protocol::P2pCircuit)) {
                break a;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the relay accepted a reservation");
    Node {
        peer: sync.local_peer_id(),
        key,
        store,
        sync,
        addr,
    }
}

fn relay() -> Config {
    Config {
        relay_server: true,
        ..config()
    }
}

/// Relay R; practice A reachable only through its circuit on R (hole
/// punching off, so nothing goes direct); practice B, granted core+labs,
/// learns A's circuit address only from its grant's address hint. B gets
/// exactly the granted history over relayed connections; C, connected
/// through the same circuit without a grant, gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn granted_record_syncs_through_a_relay_circuit() {
    let r = Node::start_with(
        relay(),
        SecretIdentity::generate().unwrap(),
        Arc::new(MemoryBackend::new()),
    )
    .await;
    let a = behind_relay(&r, false).await;
    let circuit = a.addr.clone();
    assert_eq!(
        circuit.to_string(),
        format!("{}/p2p-circuit/p2p/{}", r.addr, a.peer),
        "A's address is its circuit on R"
    );
    let mut p = Patient::new();
    let (a, _) = home_practice_at(&mut p, a, circuit.to_string());
    let b = Node::new().await;
    // The patient's grant for B, hinting at A's circuit, reaches both
    // practices (A to serve B, B to know where to ask).
    let (g, items) = p.grant(
        &b,
        &[Collection::Core, Collection::Labs],
        Access::Read,
        vec![circuit.to_string()],
    );
    for node in [&a, &b] {
        for item in &items {
            node.store.write(item.clone()).unwrap();
        }
    }
    until("B holds core and labs", || {
        b.count(&p, Collection::Core) == 3 && b.count(&p, Collection::Labs) == 2
    })
    .await;
    b.sync.sync_now(a.peer).await.unwrap();
    b.sync.reconcile(a.peer, p.id()).await.unwrap();
    assert_eq!(b.envelopes(&p), 5, "B holds exactly 3 core + 2 labs envelopes");
    assert_eq!(
        b.count(&p, Collection::Medications) + b.count(&p, Collection::Sensitive),
        0
    );
    let to_a: Vec<_> = b
        .sync
        .connections()
        .await
        .unwrap()
        .into_iter()
        .filter(|c| c.peer == a.peer)
        .collect();
    assert!(!to_a.is_empty(), "B is connected to A");
    assert!(
        to_a.iter()
            .all(|c| c.relayed && c.addr.to_string().starts_with(&r.addr.to_string())),
        "every connection between B and A runs through R: {to_a:?}"
    );
    let audit = a.store.disclosures();
    assert!(
        audit.iter().any(|d| d.peer == b.peer && d.grant == Some(g.id())),
        "A audited its disclosures to B under B's grant"
    );

    // C reaches A through the same circuit but holds no grant.
    let c = Node::new().await;
    tokio::time::timeout(WAIT, c.sync.dial(circuit.clone()))
        .await
        .unwrap()
        .unwrap();
    c.sync.sync_now(a.peer).await.unwrap();
    assert_eq!(c.sync.reconcile(a.peer, p.id()).await.unwrap().received, 0);
    assert!(c.store.items().is_empty(), "C holds nothing of the patient");
    assert!(a.store.disclosures().iter().all(|d| d.peer != c.peer));
}
