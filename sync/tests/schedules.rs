//! Property test over random schedules (issue 9, DESIGN §9.1, §9.3, §9.6):
//! 3–5 real node stores (`medmesh_node::Node` on sled, through
//! `NodeBackend`, with a FHIR `Repository` each) and 1–2 patients. The test
//! is the network: every request is answered by the real serving code
//! ([`medmesh_sync::serve_request`]: page building, summaries and fetches
//! through `may_disclose`, audited first) at a simulated clock, and every
//! request is made — and every answer taken — by the real client code, the
//! very functions the sync actor runs (`medmesh_sync::client::Client`: pull
//! with its cursor and held offers, reconciliation with digests, snapshot
//! transfers, ingest within the pending-queue share), over a `Link` into
//! this simulated network. A client step runs as a task on the test's
//! current-thread runtime until it waits on a request; the schedule then
//! delivers messages in any order, duplicates them (a duplicated request is
//! served twice, the first answer wins) or drops them (the step then fails
//! as over a broken connection); a restart aborts the node's client steps
//! and reopens its store from disk; the clock jumps past not-before and
//! expiry times. Only one step runs at a time, so a schedule replays the
//! same way every run.
//!
//! Snapshot transfers (protocol §8a) run too: every node keeps local
//! snapshots often (its repository saves one every [`SNAPSHOT_EVERY`]
//! changes, and on `SaveSnapshots` and restarts) and serves transfers of
//! [`MIN_TRANSFER`] envelopes and more; some pulls take offers (a client
//! with `snapshot_min_envelopes` [`SNAPSHOT_MIN`]), which the client asks
//! for at the end of the pull, and a reconciliation missing
//! [`SNAPSHOT_MIN`] envelopes of a collection asks for its transfer.
//! Answers travel through the same faulty network and are restored and
//! ingested by the real receiving code (`Backend::restore_and_ingest`).
//!
//! Checked after every step:
//! - §9.1, on what the serving code actually hands out: every envelope
//!   (and every summary listing, snapshot offer and transfer) of (patient
//!   X, collection C) sent to peer P is covered by a grant the patient
//!   issued to P for C whose window holds the clock, which the server holds
//!   and whose revocation (if the patient issued one) the server does not
//!   hold; key shares go only to their recipient; grants and revocations
//!   only to their grantee or to a holder of a grant in force. Judged from
//!   the patient's ledger and the server's store contents, not by calling
//!   the filter. A transfer discloses every envelope it covers, and its
//!   document — opened here with the patient's keys — holds only changes
//!   of envelopes the server holds (so none a revocation's cut excluded),
//!   and none of an epoch whose key the patient did not share with P if P
//!   was given every key the document is sealed under (§9.6 too: what P
//!   could read from it).
//! - §9.6: a node holds readable only envelopes of epochs whose key the
//!   patient shared with it, and its current key is such an epoch's.
//!
//! At the end, after every message in flight is delivered and a full
//! exchange (every node pulls and reconciles every patient with every
//! other node) runs until nothing new is stored:
//! - the servers' audit logs name exactly the items the test saw disclosed;
//! - §9.3: nodes holding a grant in force for (X, C) hold the same
//!   envelopes; every node holds readable exactly the envelopes of the
//!   epochs shared with it; nodes holding the same readable envelopes
//!   render the same FHIR resources (byte for byte), both from a cold load
//!   and in the repository that followed the node's events.
//!
//! Adversaries (issue 15, DESIGN §9.7, §9.10): in
//! `random_schedules_with_adversaries_keep_consent`, attackers' crafted,
//! validly signed items are pushed into the nodes between the honest
//! steps — self-made patients whose key shares and grants reuse an honest
//! patient's key ids and grant ids, practices that write a seq 2^62
//! envelope for a fresh actor while their grant is in force and keep
//! writing (back-dated) after the patient revoked it, strangers' grants
//! with address hints. The same checks must hold for every honest patient,
//! and more after every step: a node's current key of an honest patient's
//! collection is the very key the patient made (id, patient and secret),
//! every envelope it holds readable of that patient is sealed under one of
//! them, and no node that holds a revocation holds an envelope written
//! under its grant after it. Disclosures of the attackers' own patients are not
//! judged (they may consent to anything). `SCHEDULE_ATTACKS` (e.g.
//! `CollidingShare,StrangerGrant`) runs only some of the attacks.
//!
//! `PROPTEST_CASES` sets the number of schedules (default 16);
//! `PROPTEST_RNG_SEED` another set of them (default: a fixed seed). The
//! run fails if the schedules did not exercise each thing counted in
//! `Coverage`, transfers included.
//!
//! Over 800 lines on purpose: one property, whose schedule generator, model of
//! what each node may hold, driver and checks are read together.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::forge::{self, Terms};
use common::{CliPatient, Store};
use medmesh_crypto::{
    Access, ActorId, Change, Collection, Envelope, EnvelopeId, Epoch, EpochKey, GrantId, KeyShare, PatientId,
    PracticeId, Principal, SNAPSHOT_TAG, SealedSnapshot, SecretIdentity, Timestamp, now,
};
use medmesh_node::Actor;
use medmesh_node::audit::Action;
use medmesh_node::records::{self, DecodedChange, RecordDoc};
use medmesh_node::repository::{self, Repository};
use medmesh_node::store::{EnvelopeState, ItemId as NodeItemId};
use medmesh_sync::client::{Client, Link};
use medmesh_sync::wire::{Request, Response, SnapshotPayload, decode_transfer_headers};
use medmesh_sync::{
    Backend, Config, Cursor, Item, ItemId, ItemKind, ItemMeta, NodeBackend, PeerId, SyncReport, serve_request,
};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed, TestRunner};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

/// The collections schedules write to and grant.
const COLLECTIONS: [Collection; 2] = [Collection::Core, Collection::Labs];
/// One step of the simulated clock: beyond the 5-minute not-before skew.
const UNIT: Timestamp = 10 * 60_000;
/// Items per pull page: small, so schedules page.
const PAGE: u32 = 4;
/// A site's repository keeps a local snapshot every this many changes:
/// often, so that most schedules have transfers to serve.
const SNAPSHOT_EVERY: usize = 1;
/// The fewest envelopes a site serves as a transfer (32 in production;
/// schedules write a few dozen changes in all).
const MIN_TRANSFER: usize = 2;
/// A reconciliation missing this many envelopes of a collection asks for
/// its transfer first (`Config::snapshot_min_envelopes`, 64 in production).
const SNAPSHOT_MIN: usize = 2;

// ---------------------------------------------------------------- schedule

#[derive(Clone, Copy, Debug)]
enum Window {
    /// From a minute before the run started, no expiry.
    Open,
    /// Not before the clock plus this many units.
    NotBefore(u8),
    /// Expires at the clock plus this many units.
    Expires(u8),
}

#[derive(Clone, Debug)]
enum Op {
    /// The patient's CLI grants `to` the collections of `collections`
    /// (bit 0 core, bit 1 labs), submitted at the patient's home node
    /// (see `World::home`) or, with `at_grantee`, at the grantee's own node
    /// (`patient grant --node B --to B`).
    Grant {
        patient: u8,
        to: u8,
        collections: u8,
        write: bool,
        window: Window,
        at_grantee: bool,
    },
    /// The patient's CLI revokes one of its unrevoked grants: the cut from
    /// what the node it reaches holds, a new epoch for every covered
    /// collection shared with the remaining readers and the patient.
    Revoke { patient: u8, pick: u8 },
    /// A practice that the patient gave a read-write grant in force (`pick`
    /// chooses the grant and collection) writes through its repository —
    /// creates, or updates one of the resources it can read — if its node
    /// lets it (it may not know the grant yet, or know its revocation);
    /// `count` times in a row (a visit), so histories grow long enough for
    /// snapshot transfers.
    PracticeWrite {
        patient: u8,
        pick: u8,
        update: bool,
        count: u8,
    },
    /// The patient writes a resource of their own and submits the envelope
    /// at a node holding a grant in force for that collection; `count`
    /// times in a row.
    PatientWrite {
        patient: u8,
        collection: u8,
        update: bool,
        via: u8,
        count: u8,
    },
    /// `puller` asks `server` for a page after its cursor; with `offers`,
    /// it takes snapshot offers (and asks for them after the last page).
    Pull { puller: u8, server: u8, offers: bool },
    /// `puller` asks `server` for a patient's summary (then fetches).
    Reconcile { puller: u8, server: u8, patient: u8 },
    /// The network delivers one message in flight (any of them).
    Deliver { pick: u8 },
    /// The network duplicates one message in flight.
    Duplicate { pick: u8 },
    /// The network loses one message in flight.
    Lose { pick: u8 },
    /// A node restarts from disk.
    Restart { node: u8 },
    /// A node's repository saves a local snapshot of every cached
    /// document changed since its last one (as on stop).
    SaveSnapshots { node: u8 },
    /// The clock moves on.
    Advance { units: u8 },
    /// An attacker pushes crafted items to node `at` (only in schedules
    /// with adversaries); `patient` and `pick` choose the honest patient
    /// and the key, grant or writer it aims at.
    Attack {
        kind: Attack,
        patient: u8,
        pick: u8,
        at: u8,
    },
}

/// What an attacker does (issue 15).
#[derive(Clone, Copy, Debug)]
enum Attack {
    /// A self-made patient Y pushes a key share addressed to the node whose
    /// key id is one of the patient's (ids are in clear in every envelope
    /// header), with a grant to the node reusing one of the patient's grant
    /// ids.
    CollidingShare,
    /// A practice holding a read-write grant in force writes one envelope
    /// for a fresh actor with seq 2^62, so that a cut taken as the highest
    /// seq seen would admit anything of that actor.
    InflatedSeq,
    /// A practice whose grant the patient revoked keeps writing under the
    /// last key it was given, back-dated before the revocation: for an
    /// actor it inflated before, or a fresh one.
    WriteAfterRevocation,
    /// A self-made patient's grant to the node, with address hints, and its
    /// key share.
    StrangerGrant,
}

fn window() -> impl Strategy<Value = Window> {
    prop_oneof![
        4 => Just(Window::Open),
        1 => (1u8..=2).prop_map(Window::NotBefore),
        1 => (1u8..=2).prop_map(Window::Expires),
    ]
}

impl Attack {
    /// `SCHEDULE_ATTACKS` (names as in `Debug`, comma-separated) runs only
    /// those attacks, e.g. to check one fix alone; default: all.
    fn enabled(self) -> bool {
        std::env::var("SCHEDULE_ATTACKS").map_or(true, |list| {
            list.split(',').any(|name| name.trim() == format!("{self:?}"))
        })
    }
}

fn attack() -> impl Strategy<Value = Op> {
    let kind = prop_oneof![
        Just(Attack::CollidingShare),
        Just(Attack::InflatedSeq),
        Just(Attack::WriteAfterRevocation),
        Just(Attack::StrangerGrant),
    ];
    (kind, any::<u8>(), any::<u8>(), any::<u8>()).prop_map(|(kind, patient, pick, at)| Op::Attack {
        kind,
        patient,
        pick,
        at,
    })
}

/// The honest steps, and attacks among them when `adversaries`.
fn op(adversaries: bool) -> BoxedStrategy<Op> {
    if adversaries {
        // More revocations than honest schedules make: the attacks on cuts
        // need a revoked read-write grant.
        let revoke = (any::<u8>(), any::<u8>()).prop_map(|(patient, pick)| Op::Revoke { patient, pick });
        prop_oneof![8 => honest_op(), 3 => attack(), 1 => revoke].boxed()
    } else {
        honest_op().boxed()
    }
}

fn honest_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<u8>(), any::<u8>(), 1u8..=3, any::<bool>(), window(), any::<bool>()).prop_map(
            |(patient, to, collections, write, window, at_grantee)| Op::Grant { patient, to, collections, write, window, at_grantee }
        ),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(patient, pick)| Op::Revoke { patient, pick }),
        4 => (any::<u8>(), any::<u8>(), any::<bool>(), 1u8..=5).prop_map(|(patient, pick, update, count)| {
            Op::PracticeWrite { patient, pick, update, count }
        }),
        3 => (any::<u8>(), any::<u8>(), any::<bool>(), any::<u8>(), 1u8..=5).prop_map(
            |(patient, collection, update, via, count)| Op::PatientWrite { patient, collection, update, via, count }
        ),
        4 => (any::<u8>(), any::<u8>(), any::<bool>()).prop_map(|(puller, server, offers)| Op::Pull {
            puller,
            server,
            offers
        }),
        2 => (any::<u8>(), any::<u8>(), any::<u8>()).prop_map(|(puller, server, patient)| Op::Reconcile {
            puller,
            server,
            patient
        }),
        8 => any::<u8>().prop_map(|pick| Op::Deliver { pick }),
        1 => any::<u8>().prop_map(|pick| Op::Duplicate { pick }),
        1 => any::<u8>().prop_map(|pick| Op::Lose { pick }),
        1 => any::<u8>().prop_map(|node| Op::Restart { node }),
        1 => any::<u8>().prop_map(|node| Op::SaveSnapshots { node }),
        1 => (1u8..=2).prop_map(|units| Op::Advance { units }),
    ]
}

#[derive(Clone, Debug)]
struct Schedule {
    nodes: usize,
    patients: usize,
    ops: Vec<Op>,
}

fn schedule(adversaries: bool) -> impl Strategy<Value = Schedule> {
    (
        3usize..=5,
        1usize..=2,
        proptest::collection::vec(op(adversaries), 24..80),
    )
        .prop_map(|(nodes, patients, ops)| Schedule { nodes, patients, ops })
}

// ---------------------------------------------------------------- the world

/// What the schedules did, over all cases: a run that exercised nothing
/// must not pass.
struct Coverage {
    grants: AtomicU64,
    revocations: AtomicU64,
    practice_writes: AtomicU64,
    patient_writes: AtomicU64,
    restarts: AtomicU64,
    requests: AtomicU64,
    envelopes_disclosed: AtomicU64,
    unlocked_later_epochs: AtomicU64,
    /// Offers made to pullers that take them.
    offers: AtomicU64,
    /// Transfers served to a practice (`Response::Snapshot(Some(..))`).
    transfers: AtomicU64,
    /// Envelopes those transfers covered (each disclosed to the receiver).
    transfer_envelopes: AtomicU64,
    /// Transfers whose document is sealed under more than one epoch key.
    multi_epoch_transfers: AtomicU64,
    /// Transfers sealed under a key the patient did not give the receiver.
    sealed_beyond_receiver: AtomicU64,
    /// Transfers a receiver restored and ingested at least one envelope of.
    transfers_restored: AtomicU64,
    /// Schedules in which at least one transfer was served.
    schedules_with_transfers: AtomicU64,
}

static COVERAGE: Coverage = Coverage {
    grants: AtomicU64::new(0),
    revocations: AtomicU64::new(0),
    practice_writes: AtomicU64::new(0),
    patient_writes: AtomicU64::new(0),
    restarts: AtomicU64::new(0),
    requests: AtomicU64::new(0),
    envelopes_disclosed: AtomicU64::new(0),
    unlocked_later_epochs: AtomicU64::new(0),
    offers: AtomicU64::new(0),
    transfers: AtomicU64::new(0),
    transfer_envelopes: AtomicU64::new(0),
    multi_epoch_transfers: AtomicU64::new(0),
    sealed_beyond_receiver: AtomicU64::new(0),
    transfers_restored: AtomicU64::new(0),
    schedules_with_transfers: AtomicU64::new(0),
};

/// What the attackers did, over the schedules with adversaries.
struct AttackCoverage {
    colliding_shares: AtomicU64,
    inflated_seqs: AtomicU64,
    writes_after_revocation: AtomicU64,
    /// Of those, for an actor whose seq the practice inflated before.
    writes_after_inflated_cut: AtomicU64,
    stranger_grants: AtomicU64,
}

static ATTACKS: AttackCoverage = AttackCoverage {
    colliding_shares: AtomicU64::new(0),
    inflated_seqs: AtomicU64::new(0),
    writes_after_revocation: AtomicU64::new(0),
    writes_after_inflated_cut: AtomicU64::new(0),
    stranger_grants: AtomicU64::new(0),
};

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A practice: its store and the FHIR repository over it.
struct Site {
    store: Store,
    repo: Repository,
}

fn repository_config() -> repository::Config {
    repository::Config {
        snapshot_every: SNAPSHOT_EVERY,
        ..repository::Config::default()
    }
}

impl Site {
    async fn create() -> Self {
        let store = Store::with_min_transfer(MIN_TRANSFER).await;
        let repo = Repository::new(store.node.clone(), repository_config()).unwrap();
        Self { store, repo }
    }

    async fn restart(self) -> Self {
        self.repo.save_snapshots().await;
        let Self { store, repo } = self;
        drop(repo);
        let store = store.restart().await;
        let repo = Repository::new(store.node.clone(), repository_config()).unwrap();
        Self { store, repo }
    }

    /// Whether the store holds this grant or revocation (by its bytes).
    async fn holds(&self, bytes: &[u8]) -> bool {
        let id = NodeItemId(ItemId::digest(bytes).0);
        self.store.node.item(&id).await.unwrap().is_some()
    }
}

/// The patient: the CLI keystore (and ledger), and the patient's own
/// record documents for the resources they write themselves.
struct Patient {
    cli: CliPatient,
    docs: BTreeMap<Collection, RecordDoc>,
    own: Vec<String>,
    actor: ActorId,
    am_actor: automerge::ActorId,
}

impl Patient {
    fn new() -> Self {
        let cli = CliPatient::new().unwrap();
        let actor = ActorId::generate(&cli.identity().public_bytes()).unwrap();
        Self {
            am_actor: automerge::ActorId::from(actor.0.to_vec()),
            actor,
            cli,
            docs: BTreeMap::new(),
            own: Vec::new(),
        }
    }

    fn id(&self) -> PatientId {
        self.cli.id()
    }
}

/// Where a request's answer goes: the client task that asked, parked on
/// it. Shared by the copies of a duplicated message (the first answer
/// delivered wins); when the last copy is lost the sender drops with it and
/// the client's request fails as over a broken connection.
type Reply = Arc<Mutex<Option<oneshot::Sender<medmesh_sync::Result<Response>>>>>;

#[derive(Clone)]
enum Msg {
    Ask {
        client: usize,
        server: usize,
        request: Request,
        reply: Reply,
    },
    Answer {
        client: usize,
        request: Request,
        response: Response,
        reply: Reply,
    },
}

/// The simulated network between the client tasks and the World: messages
/// in flight, and how many client tasks are alive, parked on a request, or
/// woken by an answer (or a loss) and not yet past it — the World steps the
/// tasks until they are all parked (or done) before the next op.
#[derive(Default)]
struct Net {
    msgs: Vec<Msg>,
    live: usize,
    parked: usize,
    woken: usize,
    /// Client errors other than a lost request: the test fails on them.
    unexpected: Vec<String>,
}

type SharedNet = Arc<Mutex<Net>>;

fn lock(net: &SharedNet) -> std::sync::MutexGuard<'_, Net> {
    net.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Counts a client task parked on a request until dropped (its answer came,
/// or the task was aborted with its node's restart).
struct Parked(SharedNet);

impl Drop for Parked {
    fn drop(&mut self) {
        lock(&self.0).parked -= 1;
    }
}

/// Counts a client task alive until dropped.
struct Live(SharedNet);

impl Live {
    fn new(net: &SharedNet) -> Self {
        lock(net).live += 1;
        Self(net.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        lock(&self.0).live -= 1;
    }
}

/// The schedules' [`Link`]: a request becomes a message in flight that the
/// schedule delivers (to the real serving code), duplicates or loses; its
/// answer comes back the same way.
#[derive(Clone)]
struct SimLink {
    net: SharedNet,
    client: usize,
    peers: Arc<Vec<PeerId>>,
}

impl Link for SimLink {
    async fn request(&self, peer: PeerId, request: Request) -> medmesh_sync::Result<Response> {
        let Some(server) = self.peers.iter().position(|p| *p == peer) else {
            return Err(medmesh_sync::Error::ConnectionLost { peer });
        };
        let (tx, rx) = oneshot::channel();
        {
            let mut net = lock(&self.net);
            net.parked += 1;
            net.msgs.push(Msg::Ask {
                client: self.client,
                server,
                request,
                reply: Arc::new(Mutex::new(Some(tx))),
            });
        }
        let parked = Parked(self.net.clone());
        let answer = rx.await;
        lock(&self.net).woken -= 1;
        drop(parked);
        answer.unwrap_or(Err(medmesh_sync::Error::ConnectionLost { peer }))
    }
}

/// A change by its Automerge actor (bytes) and sequence number.
type ChangeId = (Vec<u8>, u64);

/// What the attackers did so far in a schedule.
#[derive(Default)]
struct Attacks {
    /// Fresh actors a practice gave seq 2^62: (patient, index of the grant
    /// in the patient's ledger, the key it wrote under, the actor).
    inflated: Vec<(usize, usize, EpochKey, ActorId)>,
    /// Envelopes written under a grant after the patient revoked it, with
    /// that grant's id: no node that holds the revocation may hold one.
    after_revocation: BTreeMap<EnvelopeId, GrantId>,
}

/// The peer attackers push from (whoever signed the items).
fn attacker_peer() -> PeerId {
    SecretIdentity::from_seed(&[0xad; 32]).practice_id().unwrap().peer_id()
}

struct World {
    sites: Vec<Option<Site>>,
    patients: Vec<Patient>,
    net: SharedNet,
    /// The client steps running on each site's behalf (aborted when it
    /// restarts).
    tasks: Vec<JoinSet<()>>,
    /// The simulated clock the servers judge grants by.
    t: Timestamp,
    start: Timestamp,
    /// Every item a server handed out: (server, requester, item id).
    disclosed: BTreeSet<(usize, PeerId, ItemId)>,
    /// Every envelope any node ever held (recorded after each write, so
    /// also those a revocation's cut later removed), by its change's
    /// (Automerge actor, seq): its id and epoch.
    written: BTreeMap<ChangeId, BTreeSet<(EnvelopeId, Epoch)>>,
    /// The same envelopes by their nonce (random, 24 bytes), which a
    /// transfer's compact headers carry: the id of each.
    nonces: BTreeMap<[u8; 24], EnvelopeId>,
    /// Transfers served in this schedule.
    transfers: u64,
    writes: u64,
    requests: u64,
    attacks: Attacks,
}

fn resource(collection: Collection, patient: &PatientId, n: u64) -> Value {
    let subject = json!({"reference": format!("Patient/{}", hex_of(patient))});
    match collection {
        Collection::Labs => json!({
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8302-2"}]},
            "subject": subject,
            "valueQuantity": {"value": n, "unit": "cm"}
        }),
        _ => json!({
            "resourceType": "Condition",
            "code": {"text": format!("condition {n}")},
            "subject": subject
        }),
    }
}

fn hex_of(patient: &PatientId) -> String {
    patient.as_bytes().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn edited(json: &Value, n: u64) -> Value {
    let mut json = json.clone();
    json["note"] = json!([{"text": format!("edit {n}")}]);
    json
}

impl World {
    async fn new(nodes: usize, patients: usize) -> Self {
        let mut sites = Vec::new();
        for _ in 0..nodes {
            sites.push(Some(Site::create().await));
        }
        let start = now();
        Self {
            tasks: (0..nodes).map(|_| JoinSet::new()).collect(),
            sites,
            patients: (0..patients).map(|_| Patient::new()).collect(),
            net: SharedNet::default(),
            t: start,
            start,
            disclosed: BTreeSet::new(),
            written: BTreeMap::new(),
            nonces: BTreeMap::new(),
            transfers: 0,
            writes: 0,
            requests: 0,
            attacks: Attacks::default(),
        }
    }

    /// A client of site `i` over its current store, as its sync actor builds
    /// one (page size; snapshot threshold if it takes `offers`, else none),
    /// with a link into the simulated network. One per step: a node's steps
    /// share one client (its transfer locks), but a step waiting on another's
    /// lock would be neither parked on the network nor running, and the
    /// schedule could not tell when the tasks have settled.
    fn client(&self, i: usize, offers: bool) -> Client<NodeBackend, SimLink> {
        let peers: Arc<Vec<PeerId>> = Arc::new((0..self.sites.len()).map(|j| self.peer(j)).collect());
        let link = SimLink {
            net: self.net.clone(),
            client: i,
            peers,
        };
        let backend = self.site(i).store.backend.clone();
        let config = Config {
            page_limit: PAGE,
            snapshot_min_envelopes: if offers { SNAPSHOT_MIN } else { 0 },
            ..Config::default()
        };
        Client::new(backend, link, self.peer(i), &config)
    }

    fn site(&self, i: usize) -> &Site {
        self.sites[i].as_ref().unwrap()
    }

    fn peer(&self, i: usize) -> PeerId {
        self.site(i).store.peer()
    }

    fn practice(&self, i: usize) -> PracticeId {
        self.site(i).store.practice()
    }

    fn index_of(&self, p: &PracticeId) -> Option<usize> {
        (0..self.sites.len()).find(|i| self.practice(*i) == *p)
    }

    /// Sites holding a grant in force from patient `x` (covering `c`, if given).
    fn holders(&self, x: usize, c: Option<Collection>) -> Vec<usize> {
        let mut out: Vec<usize> = self.patients[x]
            .cli
            .grants
            .iter()
            .filter(|g| g.in_force(self.t) && c.is_none_or(|c| g.grant.covers(c)))
            .filter_map(|g| self.index_of(&g.grant.terms().grantee))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The node the patient's CLI submits grants and revocations to: that
    /// of the practice of its first grant, which thus knows every consent
    /// item and hands each practice in force all of them. (Submitting at
    /// nodes that do not know each other's grants — say each grant at its
    /// own grantee — leaves separate circles of practices that never learn
    /// of one another: a node discloses consent items only to practices
    /// whose grant it knows. See `consent_submitted_at_each_grantee_*`.)
    fn home(&self, x: usize) -> Option<usize> {
        let first = self.patients[x].cli.grants.first()?;
        self.index_of(&first.grant.terms().grantee)
    }

    async fn run(&mut self, op: &Op) {
        let n = self.sites.len();
        let np = self.patients.len();
        match *op {
            Op::Grant {
                patient,
                to,
                collections,
                write,
                window,
                at_grantee,
            } => {
                let to = to as usize % n;
                let at = at_grantee.then_some(to);
                self.grant(patient as usize % np, to, collections, write, window, at)
                    .await
            }
            Op::Revoke { patient, pick } => self.revoke(patient as usize % np, pick).await,
            Op::PracticeWrite {
                patient,
                pick,
                update,
                count,
            } => {
                let x = patient as usize % np;
                let writers: Vec<(usize, Collection)> = self.patients[x]
                    .cli
                    .grants
                    .iter()
                    .filter(|g| g.in_force(self.t) && g.grant.terms().access == Access::ReadWrite)
                    .flat_map(|g| {
                        let i = self.index_of(&g.grant.terms().grantee).unwrap();
                        g.grant.terms().collections.iter().map(move |c| (i, *c))
                    })
                    .collect();
                if !writers.is_empty() {
                    let (i, c) = writers[pick as usize % writers.len()];
                    for _ in 0..count {
                        self.practice_write(i, x, c, update).await;
                    }
                    self.note_written(i).await;
                }
            }
            Op::PatientWrite {
                patient,
                collection,
                update,
                via,
                count,
            } => {
                let c = COLLECTIONS[collection as usize % COLLECTIONS.len()];
                for _ in 0..count {
                    self.patient_write(patient as usize % np, c, update, via).await;
                }
            }
            Op::Pull { puller, server, offers } => {
                let (client, server) = (puller as usize % n, server as usize % n);
                if client != server {
                    self.start_pull(client, server, offers).await;
                }
            }
            Op::Reconcile {
                puller,
                server,
                patient,
            } => {
                let (client, server) = (puller as usize % n, server as usize % n);
                if client != server {
                    let patient = self.patients[patient as usize % np].id();
                    self.start_reconcile(client, server, patient).await;
                }
            }
            Op::Deliver { pick } => {
                let m = {
                    let mut net = lock(&self.net);
                    let len = net.msgs.len();
                    (len > 0).then(|| net.msgs.remove(pick as usize % len))
                };
                if let Some(m) = m {
                    self.deliver(m).await;
                }
            }
            Op::Duplicate { pick } => {
                let mut net = lock(&self.net);
                if !net.msgs.is_empty() {
                    let len = net.msgs.len();
                    let m = net.msgs[pick as usize % len].clone();
                    net.msgs.push(m);
                }
            }
            Op::Lose { pick } => {
                let lost = {
                    let mut net = lock(&self.net);
                    let len = net.msgs.len();
                    (len > 0).then(|| net.msgs.remove(pick as usize % len))
                };
                if let Some(m) = lost {
                    self.lose(m).await;
                }
            }
            Op::Restart { node } => {
                count(&COVERAGE.restarts);
                let i = node as usize % n;
                // The node's client tasks die with it (and let go of its
                // store); answers still in flight to them go nowhere.
                self.tasks[i].abort_all();
                while let Some(done) = self.tasks[i].join_next().await {
                    if let Err(e) = done
                        && e.is_panic()
                    {
                        std::panic::resume_unwind(e.into_panic());
                    }
                }
                let site = self.sites[i].take().unwrap();
                self.sites[i] = Some(site.restart().await);
            }
            Op::SaveSnapshots { node } => self.site(node as usize % n).repo.save_snapshots().await,
            Op::Advance { units } => self.t += u64::from(units) * UNIT,
            Op::Attack {
                kind,
                patient,
                pick,
                at,
            } => {
                let at = at as usize % n;
                self.attack(kind, patient as usize % np, pick as usize, at).await;
            }
        }
    }

    // ---- the adversaries

    async fn attack(&mut self, kind: Attack, x: usize, pick: usize, at: usize) {
        if !kind.enabled() {
            return;
        }
        let items = match kind {
            Attack::CollidingShare => self.colliding_share(x, pick, at),
            Attack::InflatedSeq => self.inflated_seq(x, pick),
            Attack::WriteAfterRevocation => self.write_after_revocation(x, pick),
            Attack::StrangerGrant => {
                let mut z = medmesh_node::testing::TestPatient::new().unwrap();
                let hint = format!("/ip4/127.0.0.1/tcp/9/p2p/{}", self.peer(at));
                let grant = forge::grant(
                    &z.identity,
                    Terms {
                        address_hints: vec![hint],
                        ..Terms::read_write(self.practice(at), &COLLECTIONS)
                    },
                );
                let share = z
                    .share(Collection::Core, 0, Principal::Practice(self.practice(at)))
                    .unwrap();
                count(&ATTACKS.stranger_grants);
                vec![Item::grant(&grant), Item::key_share(&share)]
            }
        };
        // Envelopes go where the patient's CLI submits consent and takes its
        // cuts from (it holds every grant and revocation of the patient):
        // they would get there by sync anyway.
        let at = match kind {
            Attack::InflatedSeq | Attack::WriteAfterRevocation => self.home(x).unwrap_or(at),
            _ => at,
        };
        if !items.is_empty() {
            let backend = self.site(at).store.backend.clone();
            backend.ingest(attacker_peer(), items).await.unwrap();
        }
    }

    fn colliding_share(&self, x: usize, pick: usize, at: usize) -> Vec<Item> {
        let cli = &self.patients[x].cli;
        let keys: Vec<&EpochKey> = cli.keys.values().flatten().collect();
        if keys.is_empty() {
            return Vec::new();
        }
        let victim = keys[pick % keys.len()];
        let y = SecretIdentity::generate().unwrap();
        let forged = forge::key_with_id(y.patient_id(), victim.collection, victim.epoch, victim.key_id);
        let share = KeyShare::create(&forged, Principal::Practice(self.practice(at)), &y, now()).unwrap();
        let mut items = vec![Item::key_share(&share)];
        if let Some(g) = cli.grants.get(pick % cli.grants.len().max(1)) {
            let grant = forge::grant(
                &y,
                Terms {
                    id: g.grant.id(),
                    ..Terms::read_write(self.practice(at), &COLLECTIONS)
                },
            );
            items.insert(0, Item::grant(&grant));
        }
        count(&ATTACKS.colliding_shares);
        items
    }

    fn inflated_seq(&mut self, x: usize, pick: usize) -> Vec<Item> {
        let cli = &self.patients[x].cli;
        let writers: Vec<(usize, Collection)> = (0..cli.grants.len())
            .filter(|g| cli.grants[*g].in_force(self.t) && cli.grants[*g].grant.terms().access == Access::ReadWrite)
            .flat_map(|g| cli.grants[g].grant.terms().collections.iter().map(move |c| (g, *c)))
            .collect();
        if writers.is_empty() {
            return Vec::new();
        }
        let (g, c) = writers[pick % writers.len()];
        let grant = cli.grants[g].grant.clone();
        let Some(i) = self.index_of(&grant.terms().grantee) else {
            return Vec::new();
        };
        let Some(key) = cli
            .current_key(c)
            .filter(|k| cli.shared(self.practice(i), c, k.epoch))
            .cloned()
        else {
            return Vec::new();
        };
        let author = &self.site(i).store.key;
        let actor = ActorId::generate(&author.public_bytes()).unwrap();
        let change = forge::change_with_seq(actor, 1 << 62);
        let created_at = self.t.max(grant.terms().not_before);
        let envelope = Envelope::seal(
            (key.patient, key.collection),
            &key,
            author,
            Some(grant.id()),
            change.as_change(),
            created_at,
        )
        .unwrap();
        self.attacks.inflated.push((x, g, key, actor));
        count(&ATTACKS.inflated_seqs);
        vec![Item::envelope(&envelope)]
    }

    fn write_after_revocation(&mut self, x: usize, pick: usize) -> Vec<Item> {
        let cli = &self.patients[x].cli;
        let revoked: Vec<usize> = (0..cli.grants.len())
            .filter(|g| cli.grants[*g].revocation.is_some() && cli.grants[*g].grant.terms().access == Access::ReadWrite)
            .collect();
        if revoked.is_empty() {
            return Vec::new();
        }
        // A revoked grant whose grantee inflated a seq first, if any.
        let g = revoked
            .iter()
            .copied()
            .find(|g| self.attacks.inflated.iter().any(|(px, pg, _, _)| *px == x && pg == g))
            .unwrap_or(revoked[pick % revoked.len()]);
        let issued = &cli.grants[g];
        let grantee = issued.grant.terms().grantee;
        let Some(i) = self.index_of(&grantee) else {
            return Vec::new();
        };
        let inflated = self
            .attacks
            .inflated
            .iter()
            .find(|(px, pg, _, _)| *px == x && *pg == g)
            .map(|(_, _, key, actor)| (key.clone(), *actor));
        let (key, actor) = match inflated {
            Some(found) => {
                count(&ATTACKS.writes_after_inflated_cut);
                found
            }
            None => {
                // The last key of a covered collection the patient gave it.
                let c = issued.grant.terms().collections[pick % issued.grant.terms().collections.len()];
                let Some(key) = cli.keys[&c]
                    .iter()
                    .rev()
                    .find(|k| cli.shared(grantee, c, k.epoch))
                    .cloned()
                else {
                    return Vec::new();
                };
                let actor = ActorId::generate(&self.site(i).store.key.public_bytes()).unwrap();
                (key, actor)
            }
        };
        let revoked_at = issued.revocation.as_ref().unwrap().terms().issued_at;
        let created_at = revoked_at.saturating_sub(1).max(issued.grant.terms().not_before);
        let author = &self.site(i).store.key;
        let change = forge::change_with_seq(actor, 1);
        let envelope = Envelope::seal(
            (key.patient, key.collection),
            &key,
            author,
            Some(issued.grant.id()),
            change.as_change(),
            created_at,
        )
        .unwrap();
        self.attacks.after_revocation.insert(envelope.id(), issued.grant.id());
        count(&ATTACKS.writes_after_revocation);
        vec![Item::envelope(&envelope)]
    }

    // ---- the patient's CLI

    /// Grants `to`, submitted at node `at` (`None`: the patient's home).
    async fn grant(&mut self, x: usize, to: usize, collections: u8, write: bool, window: Window, at: Option<usize>) {
        let (not_before, expires) = match window {
            Window::Open => (self.start - 60_000, None),
            Window::NotBefore(k) => (self.t + u64::from(k) * UNIT, None),
            Window::Expires(k) => (self.start - 60_000, Some(self.t + u64::from(k) * UNIT)),
        };
        let covered: Vec<Collection> = COLLECTIONS
            .iter()
            .enumerate()
            .filter(|(i, _)| collections & (1 << i) != 0)
            .map(|(_, c)| *c)
            .collect();
        let grantee = self.practice(to);
        let at = at.or(self.home(x)).unwrap_or(to);
        let access = if write { Access::ReadWrite } else { Access::Read };
        let p = &mut self.patients[x].cli;
        let (_, items) = p
            .grant(grantee, &covered, access, not_before, expires, Vec::new())
            .unwrap();
        count(&COVERAGE.grants);
        let patient = p.id();
        self.site(at).store.node.submit(patient, items.clone()).await.unwrap();
    }

    async fn revoke(&mut self, x: usize, pick: u8) {
        let cli = &self.patients[x].cli;
        let live: Vec<usize> = (0..cli.grants.len())
            .filter(|g| cli.grants[*g].revocation.is_none())
            .collect();
        if live.is_empty() {
            return;
        }
        let g = live[pick as usize % live.len()];
        let grant = cli.grants[g].grant.clone();
        let at = self.home(x).unwrap();
        // The cut, as the CLI makes it: from what the reached node serves
        // the patient.
        let served = self.pull_as_patient(x, at).await;
        let held = CliPatient::held_under(&grant, &served);
        let t = self.t;
        let p = &mut self.patients[x].cli;
        let items = p.revoke(g, held, t).unwrap().expect("a grant the patient issued");
        count(&COVERAGE.revocations);
        let patient = p.id();
        self.site(at).store.node.submit(patient, items.clone()).await.unwrap();
    }

    /// Everything node `at` serves the patient (rule 1), page by page.
    async fn pull_as_patient(&mut self, x: usize, at: usize) -> Vec<Item> {
        let peer = self.patients[x].cli.peer().unwrap();
        let mut cursor = Cursor::default();
        let mut out = Vec::new();
        loop {
            let request = Request::Pull {
                cursor,
                limit: 64,
                snapshots: None,
            };
            let response = serve_request(&*self.site(at).store.backend, peer, request.clone(), self.t).await;
            self.requests += 1;
            count(&COVERAGE.requests);
            self.observe(at, peer, &response, None, &request).await;
            let Response::Page {
                instance,
                next,
                more,
                items,
                offers: _,
            } = response
            else {
                panic!("patient pull answered {response:?}");
            };
            out.extend(items);
            if !more || next == cursor.seq {
                return out;
            }
            cursor = Cursor { instance, seq: next };
        }
    }

    // ---- writes

    async fn practice_write(&mut self, i: usize, x: usize, c: Collection, update: bool) {
        let patient = self.patients[x].id();
        let repo = self.site(i).repo.clone();
        if let Err(e) = repo.check_writable(patient, c) {
            if std::env::var("SCHEDULE_DEBUG").is_ok() {
                eprintln!("site {i} may not write patient {x} {c}: {e}");
            }
            return;
        }
        self.writes += 1;
        let n = self.writes;
        let actor = Actor::local_app("schedule");
        if update {
            let resources = repo.patient_resources(patient).await.unwrap();
            if let Some(r) = resources.iter().find(|r| records::collection_of(&r.json) == c) {
                let result = repo
                    .update(r.resource_type(), r.id(), edited(&r.json, n), None, false, actor)
                    .await;
                result.unwrap_or_else(|e| panic!("site {i} update of {}: {e}", r.key));
                count(&COVERAGE.practice_writes);
                return;
            }
        }
        let id = format!("s{i}w{n}");
        repo.create_with_id(&id, resource(c, &patient, n), patient, c, actor)
            .await
            .unwrap_or_else(|e| panic!("site {i} create {id}: {e}"));
        count(&COVERAGE.practice_writes);
    }

    async fn patient_write(&mut self, x: usize, c: Collection, update: bool, via: u8) {
        let holders = self.holders(x, Some(c));
        if holders.is_empty() {
            return;
        }
        let at = holders[via as usize % holders.len()];
        self.writes += 1;
        let n = self.writes;
        let p = &mut self.patients[x];
        let Some(key) = p.cli.current_key(c).cloned() else {
            return;
        };
        let patient = p.id();
        let time = i64::try_from(now()).unwrap();
        let doc = p.docs.entry(c).or_default();
        let own = p
            .own
            .iter()
            .find(|k| doc.read(k).is_ok_and(|r| records::collection_of(&r.json) == c));
        let written = match own {
            Some(k) if update => {
                let current = doc.read(k).unwrap();
                doc.update(&p.am_actor, time, k, &current.json, &edited(&current.json, n))
                    .unwrap()
                    .unwrap()
            }
            _ => {
                let id = format!("p{x}w{n}");
                let w = doc.create(&p.am_actor, time, &id, &resource(c, &patient, n)).unwrap();
                p.own.push(w.key.clone());
                w
            }
        };
        let decoded = DecodedChange::from_bytes(&written.change).unwrap();
        let compressed = decoded.compressed_bytes();
        let change = Change {
            bytes: &compressed,
            hash: decoded.hash().0,
            actor: p.actor,
            seq: decoded.seq(),
        };
        let envelope = Envelope::seal(
            (key.patient, key.collection),
            &key,
            p.cli.identity(),
            None,
            change,
            now(),
        )
        .unwrap();
        // Recorded as written now: the node it goes to may hold it back
        // (its actor's previous change went to another node), so
        // `note_written` would not see it there.
        let h = envelope.header();
        self.nonces.insert(h.nonce, envelope.id());
        self.written
            .entry((h.actor.0.to_vec(), h.seq))
            .or_default()
            .insert((envelope.id(), h.epoch));
        self.site(at)
            .store
            .node
            .submit(patient, vec![Item::envelope(&envelope)])
            .await
            .unwrap();
        count(&COVERAGE.patient_writes);
        self.note_written(at).await;
    }

    /// Records every envelope site `i` holds in [`World::written`] and
    /// [`World::nonces`].
    async fn note_written(&mut self, i: usize) {
        let node = self.site(i).store.node.clone();
        let known: BTreeSet<EnvelopeId> = self.nonces.values().copied().collect();
        for p in &self.patients {
            for e in node.envelopes(&p.id(), None).unwrap() {
                if known.contains(&e.id) {
                    continue;
                }
                let item = node.item(&e.id.into()).await.unwrap().unwrap();
                let envelope = Envelope::decode(&item.item.bytes).unwrap();
                self.nonces.insert(envelope.header().nonce, e.id);
                self.written
                    .entry((e.actor.0.to_vec(), e.change_seq))
                    .or_default()
                    .insert((e.id, e.epoch));
            }
        }
    }

    // ---- the network

    /// Starts site `client`'s pull of `server` (the real client code,
    /// `Client::pull`), taking snapshot offers if `offers`, and runs it
    /// until it waits on the network.
    async fn start_pull(&mut self, client: usize, server: usize, offers: bool) {
        let c = self.client(client, offers);
        let peer = self.peer(server);
        self.start(client, async move { c.pull(peer).await }).await;
    }

    /// Starts site `client`'s reconciliation of `patient` with `server`
    /// (`Client::reconcile`, transfers taken) until it waits on the network.
    async fn start_reconcile(&mut self, client: usize, server: usize, patient: PatientId) {
        let c = self.client(client, true);
        let peer = self.peer(server);
        self.start(client, async move { c.reconcile(peer, patient).await })
            .await;
    }

    /// Runs a client step of site `client` as a task of that site until it
    /// waits on the network (or ends). A step may fail only because the
    /// network lost one of its messages.
    async fn start<F>(&mut self, client: usize, step: F)
    where
        F: Future<Output = medmesh_sync::Result<SyncReport>> + Send + 'static,
    {
        let live = Live::new(&self.net);
        let net = self.net.clone();
        self.tasks[client].spawn(async move {
            let _live = live;
            match step.await {
                Ok(_) | Err(medmesh_sync::Error::ConnectionLost { .. }) => {}
                Err(e) => lock(&net)
                    .unexpected
                    .push(format!("site {client}'s client step failed: {e}")),
            }
        });
        self.quiesce().await;
    }

    /// Lets the client tasks run until each is parked on a request or done:
    /// only one ever runs at a time (each op wakes at most one), so the
    /// order of the messages they send is the schedule's alone.
    async fn quiesce(&mut self) {
        let deadline = std::time::Instant::now() + common::WAIT;
        loop {
            {
                let net = lock(&self.net);
                if net.live == net.parked && net.woken == 0 {
                    break;
                }
            }
            assert!(std::time::Instant::now() < deadline, "client tasks did not settle");
            tokio::task::yield_now().await;
        }
        for tasks in &mut self.tasks {
            while let Some(done) = tasks.try_join_next() {
                if let Err(e) = done
                    && e.is_panic()
                {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }
        let unexpected = std::mem::take(&mut lock(&self.net).unexpected);
        assert!(unexpected.is_empty(), "{unexpected:?}");
    }

    /// Hands a response (or, with `None`, the news that it is lost) to the
    /// client task parked on it, if it still waits, and lets it run.
    async fn answer(&mut self, reply: &Reply, response: Option<Response>) {
        let sender = reply.lock().unwrap().take();
        let Some(sender) = sender else {
            return;
        };
        if sender.is_closed() {
            return;
        }
        lock(&self.net).woken += 1;
        match response {
            Some(response) => {
                // The receiver is alive: it is parked in `SimLink::request`.
                let _ = sender.send(Ok(response));
            }
            None => drop(sender),
        }
        self.quiesce().await;
    }

    /// The network loses `m`: if no copy of it is left in flight, the client
    /// waiting on it learns that its request failed.
    async fn lose(&mut self, m: Msg) {
        let (Msg::Ask { reply, .. } | Msg::Answer { reply, .. }) = m;
        if Arc::strong_count(&reply) == 1 {
            self.answer(&reply, None).await;
        }
    }

    async fn deliver(&mut self, m: Msg) {
        match m {
            Msg::Ask {
                client,
                server,
                request,
                reply,
            } => {
                let peer = self.peer(client);
                let response = serve_request(&*self.site(server).store.backend, peer, request.clone(), self.t).await;
                self.requests += 1;
                count(&COVERAGE.requests);
                self.observe(server, peer, &response, Some(client), &request).await;
                lock(&self.net).msgs.push(Msg::Answer {
                    client,
                    request,
                    response,
                    reply,
                });
            }
            Msg::Answer {
                client,
                request,
                response,
                reply,
            } => {
                // A transfer the client restores shows as envelopes it holds
                // once its step has run on.
                let transfer = match (&request, &response) {
                    (Request::Snapshot { patient, collection }, Response::Snapshot(Some(_))) => {
                        Some((*patient, *collection))
                    }
                    _ => None,
                };
                let held =
                    |w: &Self| transfer.map(|(p, c)| w.site(client).store.backend.envelope_ids(&p, c).unwrap().len());
                let before = held(self);
                self.answer(&reply, Some(response)).await;
                if held(self) > before {
                    count(&COVERAGE.transfers_restored);
                }
            }
        }
    }

    // ---- §9.1 on what left the server

    /// Records and judges one answer of `server` to `peer` (`client` is the
    /// practice asking; `None` for the patient, who gets their own record).
    async fn observe(
        &mut self,
        server: usize,
        peer: PeerId,
        response: &Response,
        client: Option<usize>,
        request: &Request,
    ) {
        let items: &[Item] = match response {
            Response::Page { items, offers, .. } => {
                assert!(
                    offers.is_empty() || matches!(request, Request::Pull { snapshots: Some(_), .. }),
                    "site {server} offered a transfer to a puller that takes none"
                );
                for offer in offers {
                    count(&COVERAGE.offers);
                    let client = client.expect("an offer to the patient, who takes none");
                    let Some(x) = self.patient_index(&offer.patient) else {
                        continue;
                    };
                    let c = offer.collection;
                    assert!(
                        self.may_have_envelopes(server, client, x, c).await,
                        "§9.1: site {server} offered a {c} transfer of patient {x} to site {client} \
                         without a grant in force at {}",
                        self.t
                    );
                }
                items
            }
            Response::Fetched { items } => items,
            Response::Snapshot(payload) => {
                if let (Some(payload), Request::Snapshot { patient, collection }) = (payload, request) {
                    let client = client.expect("a transfer to the patient, who asks for none");
                    self.observe_transfer(server, client, *patient, *collection, payload)
                        .await;
                }
                return;
            }
            Response::Summary { consent, collections } => {
                if let (Some(client), Request::Summary { patient, .. }) = (client, request) {
                    let x = self.patient_index(patient).unwrap();
                    for (c, ids) in collections {
                        if !ids.is_empty() {
                            assert!(
                                self.may_have_envelopes(server, client, x, *c).await,
                                "§9.1: site {server} listed {} {c} envelope ids to site {client} without a grant in force",
                                ids.len()
                            );
                        }
                    }
                }
                consent
            }
            other => panic!("site {server} answered {other:?}"),
        };
        for item in items {
            let meta = ItemMeta::describe(item).unwrap();
            // An attacker's own patient: not judged, nor audited here.
            let Some(x) = self.patient_index(&meta.patient) else {
                continue;
            };
            self.disclosed.insert((server, peer, meta.id));
            let Some(client) = client else {
                assert!(
                    self.patients
                        .iter()
                        .any(|p| p.id() == meta.patient && p.cli.peer().unwrap() == peer),
                    "site {server} served the patient someone else's item"
                );
                continue;
            };
            match item.kind {
                ItemKind::Envelope => {
                    count(&COVERAGE.envelopes_disclosed);
                    let c = meta.collection.unwrap();
                    assert!(
                        self.may_have_envelopes(server, client, x, c).await,
                        "§9.1: site {server} disclosed a {c} envelope of patient {x} to site {client} \
                         without a grant in force at {}",
                        self.t
                    );
                }
                ItemKind::KeyShare => assert_eq!(
                    meta.recipient(),
                    Some(Principal::Practice(self.practice(client))),
                    "site {server} gave site {client} a key share for someone else"
                ),
                ItemKind::Grant | ItemKind::Revocation => {
                    let me = self.practice(client);
                    let own = self.patients[x]
                        .cli
                        .grants
                        .iter()
                        .any(|g| Some(g.grant.id()) == meta.grant && g.grant.terms().grantee == me);
                    assert!(
                        own || self.holds_grant_in_force(server, client, x, None).await,
                        "site {server} gave site {client} a {} of patient {x} it may not have",
                        item.kind.as_str()
                    );
                }
            }
        }
    }

    /// A transfer `server` handed `client`: it counts as disclosing every
    /// envelope it covers (each must be one the server holds, under a grant
    /// in force for the client), and its document — opened here with the
    /// patient's keys — holds only changes of envelopes the server holds,
    /// and, if the patient gave the client every key the document is sealed
    /// under, none of an epoch whose key the client was not given.
    async fn observe_transfer(
        &mut self,
        server: usize,
        client: usize,
        patient: PatientId,
        c: Collection,
        payload: &SnapshotPayload,
    ) {
        let Some(x) = self.patient_index(&patient) else {
            return;
        };
        count(&COVERAGE.transfers);
        self.transfers += 1;
        assert!(
            self.may_have_envelopes(server, client, x, c).await,
            "§9.1: site {server} sent a {c} transfer of patient {x} to site {client} without a grant in force at {}",
            self.t
        );
        // Which envelopes it covers: those its compact headers name (by
        // nonce), each one the server holds.
        let headers = decode_transfer_headers(&payload.headers, payload.count, patient, c).unwrap();
        let held: BTreeSet<EnvelopeId> = self
            .site(server)
            .store
            .node
            .envelope_ids(&patient, c)
            .unwrap()
            .into_iter()
            .collect();
        let peer = self.peer(client);
        for h in &headers {
            let id = *self
                .nonces
                .get(&h.header().nonce)
                .expect("a transfer header of an envelope nobody wrote");
            assert!(
                held.contains(&id),
                "site {server}'s {c} transfer covers an envelope it does not hold"
            );
            self.disclosed.insert((server, peer, ItemId(id.0)));
        }
        COVERAGE
            .transfer_envelopes
            .fetch_add(headers.len() as u64, Ordering::Relaxed);

        let cli = &self.patients[x].cli;
        let me = self.practice(client);
        let mut layers = Vec::new();
        let mut doc = payload.sealed_doc.clone();
        loop {
            let key_id = SealedSnapshot::key_id(&doc).unwrap();
            let key = cli.keys[&c]
                .iter()
                .find(|k| k.key_id == key_id)
                .expect("a transfer sealed under a key the patient did not make");
            layers.push(key.epoch);
            doc = SealedSnapshot::open(key, &doc).unwrap().to_vec();
            if !doc.starts_with(SNAPSHOT_TAG) {
                break;
            }
        }
        if layers.len() > 1 {
            count(&COVERAGE.multi_epoch_transfers);
        }
        let opens = layers.iter().all(|e| cli.shared(me, c, *e));
        if !opens {
            count(&COVERAGE.sealed_beyond_receiver);
        }
        for change in RecordDoc::changes_of_saved(&doc).unwrap() {
            let envelopes = self
                .written
                .get(&(change.actor().to_bytes().to_vec(), change.seq()))
                .unwrap_or_else(|| panic!("site {server}'s {c} transfer document holds a change no envelope carries"));
            assert!(
                envelopes.iter().any(|(id, _)| held.contains(id)),
                "§9.1: site {server}'s {c} transfer to site {client} holds a change of patient {x} whose envelope \
                 it does not hold (excluded by a revocation's cut?)"
            );
            if opens {
                let epochs: Vec<Epoch> = envelopes.iter().map(|(_, e)| *e).collect();
                assert!(
                    epochs.iter().any(|e| cli.shared(me, c, *e)),
                    "§9.6: site {server}'s {c} transfer (layers of epochs {layers:?}) lets site {client} read \
                     a change of patient {x}'s epoch {epochs:?}, whose key the patient did not give it"
                );
            }
        }
    }

    /// The honest patient's index; `None` for a patient an attacker made.
    fn patient_index(&self, patient: &PatientId) -> Option<usize> {
        self.patients.iter().position(|p| p.id() == *patient)
    }

    async fn may_have_envelopes(&self, server: usize, client: usize, x: usize, c: Collection) -> bool {
        self.holds_grant_in_force(server, client, x, Some(c)).await
    }

    /// Whether the patient issued `client` a grant covering `c` whose window
    /// holds the clock, which `server` holds, without holding its revocation.
    async fn holds_grant_in_force(&self, server: usize, client: usize, x: usize, c: Option<Collection>) -> bool {
        let site = self.site(server);
        let me = self.practice(client);
        for g in &self.patients[x].cli.grants {
            if g.grant.terms().grantee != me
                || c.is_some_and(|c| !g.grant.covers(c))
                || !g.grant.in_force(self.t, false)
            {
                continue;
            }
            if !site.holds(g.grant.encoded()).await {
                continue;
            }
            match &g.revocation {
                Some(r) if site.holds(r.encoded()).await => continue,
                _ => return true,
            }
        }
        false
    }

    // ---- §9.6

    /// Every readable envelope (and the current key) of a node is of an
    /// epoch whose key the patient shared with it, sealed under (and being)
    /// the very key the patient made for that epoch (§9.7: no share of
    /// another patient can stand in for it); no node that holds a
    /// revocation holds an envelope written under its grant after it.
    fn check_keys(&self) {
        for i in 0..self.sites.len() {
            let node = &self.site(i).store.node;
            let me = self.practice(i);
            for (x, p) in self.patients.iter().enumerate() {
                let made = |c: Collection, epoch: Epoch| p.cli.keys.get(&c).and_then(|k| k.get(epoch as usize));
                for c in COLLECTIONS {
                    for e in node.envelopes(&p.id(), Some(c)).unwrap() {
                        let revoked_here = self
                            .attacks
                            .after_revocation
                            .get(&e.id)
                            .is_some_and(|g| node.is_revoked(&p.id(), g));
                        assert!(
                            !revoked_here,
                            "site {i} holds the revocation of a grant and a {c} envelope of patient {x} written \
                             under it after the revocation"
                        );
                        if e.state == EnvelopeState::Readable {
                            assert!(
                                p.cli.shared(me, c, e.epoch),
                                "§9.6: site {i} reads patient {x}'s {c} epoch {} without a key share for it",
                                e.epoch
                            );
                            assert_eq!(
                                Some(e.key_id),
                                made(c, e.epoch).map(|k| k.key_id),
                                "§9.7: site {i} reads patient {x}'s {c} epoch {} under a key id the patient did not make",
                                e.epoch
                            );
                        }
                    }
                    if let Some(key) = node.current_epoch_key(&p.id(), c) {
                        assert!(
                            p.cli.shared(me, c, key.epoch),
                            "§9.6: site {i} holds patient {x}'s {c} epoch {} key",
                            key.epoch
                        );
                        let genuine = made(c, key.epoch).expect("a current epoch the patient never made");
                        assert!(
                            key.patient == p.id()
                                && key.collection == c
                                && key.key_id == genuine.key_id
                                && key.secret() == genuine.secret(),
                            "§9.7: site {i}'s current {c} key of patient {x} is not the one the patient made \
                             (a colliding share of patient {} replaced it)",
                            key.patient
                        );
                    }
                }
            }
        }
    }

    // ---- the end

    /// Delivers what is in flight, then runs full exchanges (every node
    /// pulls every other to the end and reconciles every patient) until
    /// one stores nothing new.
    async fn settle(&mut self) {
        self.drain().await;
        let n = self.sites.len();
        for round in 0..8 {
            let before: u64 = (0..n).map(|i| self.site(i).store.node.last_seq()).sum();
            for client in 0..n {
                for server in (0..n).filter(|s| *s != client) {
                    // Half the pulls take offers.
                    self.start_pull(client, server, (client + server + round) % 2 == 0)
                        .await;
                    for p in 0..self.patients.len() {
                        let patient = self.patients[p].id();
                        self.start_reconcile(client, server, patient).await;
                    }
                    self.drain().await;
                }
            }
            let after: u64 = (0..n).map(|i| self.site(i).store.node.last_seq()).sum();
            if after == before {
                return;
            }
        }
        panic!("the full exchange kept storing new items after 8 rounds");
    }

    /// Per site, patient and collection: envelopes held, `s` if a local
    /// snapshot is kept (`SCHEDULE_DEBUG`: how often schedules can transfer).
    fn holdings(&self) -> String {
        let mut held = Vec::new();
        for i in 0..self.sites.len() {
            let node = &self.site(i).store.node;
            for (x, p) in self.patients.iter().enumerate() {
                for c in COLLECTIONS {
                    let n = node.envelope_ids(&p.id(), c).unwrap().len();
                    let kept = node.snapshot_fingerprint(p.id(), c).unwrap().is_some();
                    held.push(format!("{i}/{x}/{c}:{n}{}", if kept { "s" } else { "" }));
                }
            }
        }
        format!("writes {} transfers {} held {held:?}", self.writes, self.transfers)
    }

    /// Delivers every message in flight, oldest first, until none is
    /// left; then every client step has ended.
    async fn drain(&mut self) {
        let mut budget = 1_000_000;
        loop {
            let m = {
                let mut net = lock(&self.net);
                (!net.msgs.is_empty()).then(|| net.msgs.remove(0))
            };
            let Some(m) = m else { break };
            self.deliver(m).await;
            budget -= 1;
            assert!(budget > 0, "messages keep coming");
        }
        assert_eq!(
            lock(&self.net).live,
            0,
            "client steps wait on messages no longer in flight"
        );
    }

    /// What the servers' audit logs say they disclosed equals what the test
    /// saw leave them.
    fn check_audit(&self) {
        for i in 0..self.sites.len() {
            let mut audited = BTreeSet::new();
            let honest: BTreeSet<PatientId> = self.patients.iter().map(|p| p.id()).collect();
            for e in self.site(i).store.node.audit_entries(None).unwrap() {
                if e.action == Action::Disclose && e.patient.as_ref().is_some_and(|p| honest.contains(p)) {
                    for item in e.items {
                        audited.insert((e.actor_id.clone(), item.to_string()));
                    }
                }
            }
            let seen: BTreeSet<(String, String)> = self
                .disclosed
                .iter()
                .filter(|(s, _, _)| *s == i)
                .map(|(_, peer, id)| (peer.to_string(), id.to_string()))
                .collect();
            assert_eq!(audited, seen, "site {i}: audit log and disclosures differ");
        }
    }

    async fn check_convergence(&self) {
        let n = self.sites.len();
        for (x, p) in self.patients.iter().enumerate() {
            let patient = p.id();
            // Rendered resources per site and collection: cold and live.
            let mut rendered: Vec<BTreeMap<Collection, BTreeMap<String, Vec<u8>>>> = Vec::new();
            for i in 0..n {
                let site = self.site(i);
                let cold = Repository::new(site.store.node.clone(), repository::Config::default()).unwrap();
                let by_collection = |resources: Vec<Arc<records::RenderedResource>>| {
                    let mut out: BTreeMap<Collection, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
                    for r in resources {
                        out.entry(records::collection_of(&r.json))
                            .or_default()
                            .insert(r.key.clone(), r.bytes.clone());
                    }
                    out
                };
                let cold = by_collection(cold.patient_resources(patient).await.unwrap());
                // The live repository applies the node's events on its own task:
                // let it catch up (it runs when this task yields) before comparing.
                let deadline = std::time::Instant::now() + common::WAIT;
                loop {
                    let live = by_collection(site.repo.patient_resources(patient).await.unwrap());
                    if live == cold {
                        break;
                    }
                    assert!(
                        std::time::Instant::now() < deadline,
                        "site {i}: the repository that followed events differs from a cold load\n\
                         cold: {cold:?}\nlive: {live:?}"
                    );
                    tokio::task::yield_now().await;
                }
                rendered.push(cold);
            }
            for c in COLLECTIONS {
                let mut held = Vec::new();
                let mut readable = Vec::new();
                for i in 0..n {
                    let me = self.practice(i);
                    let entries = self.site(i).store.node.envelopes(&patient, Some(c)).unwrap();
                    for e in &entries {
                        if e.epoch > 0 && e.state == EnvelopeState::Readable {
                            count(&COVERAGE.unlocked_later_epochs);
                        }
                        let shared = p.cli.shared(me, c, e.epoch);
                        assert_eq!(
                            e.state == EnvelopeState::Readable,
                            shared,
                            "site {i}: patient {x} {c} epoch {} envelope is {:?} (key shared: {shared})",
                            e.epoch,
                            e.state
                        );
                    }
                    held.push(entries.iter().map(|e| e.id).collect::<BTreeSet<_>>());
                    readable.push(
                        entries
                            .iter()
                            .filter(|e| e.state == EnvelopeState::Readable)
                            .map(|e| e.id)
                            .collect::<BTreeSet<_>>(),
                    );
                }
                let holders = self.holders(x, Some(c));
                for pair in holders.windows(2) {
                    assert_eq!(
                        held[pair[0]], held[pair[1]],
                        "§9.3: sites {} and {} both hold a grant in force for patient {x} {c} \
                         but hold different envelopes",
                        pair[0], pair[1]
                    );
                }
                for a in 0..n {
                    for b in a + 1..n {
                        if readable[a] == readable[b] && !readable[a].is_empty() {
                            assert_eq!(
                                rendered[a].get(&c),
                                rendered[b].get(&c),
                                "§9.3: sites {a} and {b} read the same {c} envelopes of patient {x} \
                                 but render different resources"
                            );
                        }
                    }
                }
            }
        }
    }
}

async fn run_schedule(s: Schedule, adversaries: bool) {
    let mut world = World::new(s.nodes, s.patients).await;
    for op in &s.ops {
        world.run(op).await;
        world.check_keys();
    }
    world.settle().await;
    // The transfer ratio asserted below is the honest schedules'.
    if world.transfers > 0 && !adversaries {
        count(&COVERAGE.schedules_with_transfers);
    }
    if std::env::var("SCHEDULE_DEBUG").is_ok() {
        eprintln!("{}", world.holdings());
    }
    world.check_keys();
    world.check_audit();
    world.check_convergence().await;
}

fn block_on<F: Future<Output = ()>>(f: F) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f);
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16)
}

#[test]
fn random_schedules_keep_consent_and_converge() {
    let config = ProptestConfig {
        cases: cases(),
        // Failures are kept as named regression tests below, not in a file.
        failure_persistence: None,
        // The same schedules on every run unless asked otherwise, so the
        // coverage figures below are stable; PROPTEST_RNG_SEED explores.
        rng_seed: std::env::var("PROPTEST_RNG_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(RngSeed::Fixed(2026), RngSeed::Fixed),
        ..ProptestConfig::default()
    };
    let mut runner = TestRunner::new(config);
    runner
        .run(&schedule(false), |s| {
            block_on(run_schedule(s, false));
            Ok(())
        })
        .unwrap();
    let c = &COVERAGE;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let figures = [
        ("grants", get(&c.grants)),
        ("revocations", get(&c.revocations)),
        ("practice writes", get(&c.practice_writes)),
        ("patient writes", get(&c.patient_writes)),
        ("restarts", get(&c.restarts)),
        ("requests served", get(&c.requests)),
        ("envelopes disclosed", get(&c.envelopes_disclosed)),
        ("readable envelopes of later epochs", get(&c.unlocked_later_epochs)),
        ("snapshot offers", get(&c.offers)),
        ("transfers", get(&c.transfers)),
        ("envelopes covered by transfers", get(&c.transfer_envelopes)),
        ("transfers sealed under several epochs", get(&c.multi_epoch_transfers)),
        ("transfers restored", get(&c.transfers_restored)),
    ];
    // Rare (a practice left out of an epoch it has a grant for): reported,
    // not required; `a_transfer_never_shows_a_practice_an_epoch_it_was_left_out_of`
    // builds the case.
    let beyond = get(&c.sealed_beyond_receiver);
    let with_transfers = get(&c.schedules_with_transfers);
    println!(
        "{} schedules ({with_transfers} with transfers): {figures:?}; \
         transfers sealed under a key the receiver was not given: {beyond}",
        cases()
    );
    for (what, n) in figures {
        assert!(n > 0, "the schedules never exercised: {what}");
    }
    assert!(
        with_transfers * 2 >= u64::from(cases()),
        "transfers ran in only {with_transfers} of {} schedules",
        cases()
    );
}

fn adversary_cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}

/// Issue 15's property test: the random schedules with attackers' crafted
/// items pushed into the nodes between the honest steps (see the module
/// comment); §9.1 and §9.6 — and the key binding of §9.7 — hold for every
/// honest patient after every step, and the nodes still converge.
#[test]
fn random_schedules_with_adversaries_keep_consent() {
    let config = ProptestConfig {
        cases: adversary_cases(),
        failure_persistence: None,
        rng_seed: std::env::var("PROPTEST_RNG_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(RngSeed::Fixed(15), RngSeed::Fixed),
        ..ProptestConfig::default()
    };
    let mut runner = TestRunner::new(config);
    runner
        .run(&schedule(true), |s| {
            block_on(run_schedule(s, true));
            Ok(())
        })
        .unwrap();
    let a = &ATTACKS;
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let both = Attack::InflatedSeq.enabled() && Attack::WriteAfterRevocation.enabled();
    let figures = [
        (
            Attack::CollidingShare.enabled(),
            "colliding key shares and grant ids",
            get(&a.colliding_shares),
        ),
        (
            Attack::InflatedSeq.enabled(),
            "seq 2^62 envelopes",
            get(&a.inflated_seqs),
        ),
        (
            Attack::WriteAfterRevocation.enabled(),
            "writes after a revocation",
            get(&a.writes_after_revocation),
        ),
        (
            both,
            "writes after a revocation by an inflated actor",
            get(&a.writes_after_inflated_cut),
        ),
        (
            Attack::StrangerGrant.enabled(),
            "strangers' grants with hints",
            get(&a.stranger_grants),
        ),
    ];
    println!("{} schedules with adversaries: {figures:?}", adversary_cases());
    for (enabled, what, n) in figures {
        assert!(n > 0 || !enabled, "the schedules never attacked with: {what}");
    }
}

/// The minimised case the schedules once found: a patient grants practice A
/// core (submitted at A) and writes there, then grants B core submitted at B
/// itself. A node discloses a patient's grants only to practices whose grant
/// it knows in force (filter rule 4), so B must learn A's grant from the
/// patient: the CLI sends its other live grants with each new one.
#[test]
fn consent_submitted_at_each_grantee_reaches_the_other_practice() {
    block_on(async {
        let mut w = World::new(2, 1).await;
        w.grant(0, 0, 0b01, false, Window::Open, Some(0)).await;
        w.patient_write(0, Collection::Core, false, 0).await;
        w.grant(0, 1, 0b01, false, Window::Open, Some(1)).await;
        w.settle().await;
        w.check_convergence().await;
    });
}

/// The case the transfer checks above caught (200 random schedules build
/// it under each seed tried; CI's 16 do not): the patient
/// revokes one of the two core grants practice 1 holds, so epoch 1's key
/// is not shared with it; revoking practice 2's grant later shares epoch
/// 2's key with it again (its other grant is live). Practice 0 writes under
/// epochs 0, 1 and 2 and keeps a snapshot; practice 1's first pull takes
/// the offered transfer. A document sealed under epoch 2's key alone would
/// show practice 1 the changes of epoch 1 (§9.6); sealed under every
/// epoch's key, it does not open there, and practice 1 gets epoch 1's
/// envelopes opaque like any others.
#[test]
fn a_transfer_never_shows_a_practice_an_epoch_it_was_left_out_of() {
    block_on(async {
        let mut w = World::new(3, 1).await;
        let core = 0b01;
        w.grant(0, 0, core, true, Window::Open, Some(0)).await;
        w.grant(0, 1, core, false, Window::Open, None).await;
        w.grant(0, 1, core, false, Window::Open, None).await;
        w.grant(0, 2, core, false, Window::Open, None).await;
        let write = |update| Op::PracticeWrite {
            patient: 0,
            pick: 0,
            update,
            count: 2,
        };
        w.run(&write(false)).await;
        // Unrevoked grants in order: practice 0's, 1's two, 2's.
        w.revoke(0, 1).await;
        w.run(&write(false)).await;
        w.revoke(0, 2).await;
        w.run(&write(true)).await;
        w.start_pull(1, 0, true).await;
        w.drain().await;
        assert!(w.transfers > 0, "no transfer served");
        w.settle().await;
        w.check_keys();
        w.check_audit();
        w.check_convergence().await;
    });
}
