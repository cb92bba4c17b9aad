//! Simulation of many practices in one process (issue 9): real node stores
//! (`medmesh_node::Node` on sled) behind real sync actors (`SyncHandle`)
//! on `/ip4/127.0.0.1/tcp/…`, patients whose CLI sessions submit grants,
//! key shares and revocations over libp2p as `medmesh patient` does,
//! practices writing under read-write grants, node restarts and an offline
//! partition (a group of nodes loses the network while both sides keep
//! writing, granting and revoking), then convergence.
//!
//! Practices know a few static peers each (a ring plus chords); a patient's
//! practices are their home practice and some of its static peers, as
//! practices that refer patients to each other know each other. Home
//! grants are never revoked: a node redials only its static peers after a
//! restart or a partition, so a patient's other practices reach each other
//! through the home practice.
//!
//! Grants that start later (not-before 1.5 s ahead) are issued only once no
//! node restarts or goes offline any more: a grantee reconciles once, at
//! not-before, and does not retry if its peers are down then. It has by
//! then scanned past the other practices' grants (withheld while its own
//! grant had not started), so it never learns them: their envelopes wait in
//! its pending queue for good and it never serves them its own writes. The
//! 100-node run found this; `later_grant_whose_reconciliation_fails_*`
//! keeps the case (ignored until fixed).
//!
//! Checked once the network is quiet (a condition polled inside a
//! timeout, no sleeps as synchronisation):
//! - §9.3: every practice holding a grant in force for (patient, collection)
//!   holds exactly the valid envelopes written for it (the patient's
//!   ledger says which: everything the patient wrote, and each practice's
//!   writes not beyond the cut of a revocation of the grant written under);
//!   each holds readable exactly those of epochs shared with it.
//! - §9.6: no practice reads an epoch whose key was not shared with it.
//! - §9.1, from the audit logs: every envelope a node disclosed went to a
//!   grantee of a grant covering its collection, inside the grant's window,
//!   and not after the node had stored that grant's revocation; every key
//!   share disclosed went to its recipient.
//!
//! - With Kademlia on: nodes find peers they are not connected to by their
//!   PeerId alone (`SyncHandle::dial_peer`), for random pairs.
//!
//! `small_simulation_converges` and `small_simulation_with_kademlia_converges`
//! run in CI (20 nodes); `hundred_node_simulation` (100 nodes, `#[ignore]`)
//! prints time, process CPU, requests and bytes per delivered envelope:
//! `cargo test -p medmesh-sync --release --test sim -- --ignored --nocapture`,
//! with Kademlia on when `SIM_KADEMLIA` is set.
//!
//! Over 800 lines on purpose: one simulation, whose driver, model and checks
//! are read together.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{CliPatient, Store};
use medmesh_crypto::{Access, ActorId, Collection, EnvelopeId, GrantId, now};
use medmesh_node::audit::Action;
use medmesh_node::store::EnvelopeState;
use medmesh_node::testing::ChangeMaker;
use medmesh_sync::memory::MemoryBackend;
use medmesh_sync::{Config, Item, Multiaddr, PeerId, Protocol, Status, SyncHandle};

const COLLECTIONS: [Collection; 2] = [Collection::Core, Collection::Labs];

/// splitmix64: a seeded, dependency-free RNG, so a run can be repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

#[derive(Clone, Copy, Debug)]
struct Scale {
    nodes: usize,
    patients: usize,
    /// Writes per read-write holder and collection, per writing phase.
    writes: usize,
    restarts: usize,
    partitioned: usize,
    wait: Duration,
    /// Kademlia on every node (`Config::kademlia`).
    kademlia: bool,
}

struct SimNode {
    store: Option<Store>,
    sync: Option<SyncHandle>,
    /// The address it listens on (kept across restarts).
    addr: Multiaddr,
    /// Static peers it dials and redials.
    peers: Vec<Multiaddr>,
    /// Neighbours (static edges either way).
    neighbours: BTreeSet<usize>,
    /// Counters of earlier actor lifetimes.
    status: Status,
    /// What happened to it ("restarted", "offline"), for failure reports.
    history: String,
}

/// One change written: whose, which collection, by whom, under which grant.
struct Written {
    patient: usize,
    collection: Collection,
    id: EnvelopeId,
    grant: Option<GrantId>,
    actor: ActorId,
    seq: u64,
    /// The writing node and the phase it wrote in, for failure reports.
    by: usize,
    phase: &'static str,
}

struct Sim {
    rng: Rng,
    nodes: Vec<SimNode>,
    patients: Vec<CliPatient>,
    home: Vec<usize>,
    written: Vec<Written>,
    /// One change maker per (node, patient, collection): its actor's seqs
    /// stay continuous, as one repository process's would.
    makers: HashMap<(usize, usize, Collection), ChangeMaker>,
    pull_interval: Duration,
    kademlia: bool,
    client_requests: u64,
    phase: &'static str,
}

fn add_status(total: &mut Status, s: &Status) {
    total.items_sent += s.items_sent;
    total.items_received += s.items_received;
    total.items_accepted += s.items_accepted;
    total.bytes_sent += s.bytes_sent;
    total.bytes_received += s.bytes_received;
    total.requests_sent += s.requests_sent;
    total.requests_received += s.requests_received;
    total.refused_busy += s.refused_busy;
    total.dropped += s.dropped;
    total.reconciliations += s.reconciliations;
    total.reconciliations_failed += s.reconciliations_failed;
}

impl Sim {
    fn config(&self, node: &SimNode) -> Config {
        Config {
            listen: vec![node.addr.clone()],
            peers: node.peers.clone(),
            pull_interval: self.pull_interval,
            kademlia: self.kademlia,
            ..Config::loopback_tcp()
        }
    }

    async fn new(scale: Scale, seed: u64) -> Self {
        let mut sim = Self {
            rng: Rng(seed),
            nodes: Vec::new(),
            patients: Vec::new(),
            home: Vec::new(),
            written: Vec::new(),
            makers: HashMap::new(),
            pull_interval: Duration::from_secs(5),
            kademlia: scale.kademlia,
            client_requests: 0,
            phase: "start",
        };
        let n = scale.nodes;
        // A ring at distances 1 and 2, plus one random chord per node.
        let mut neighbours: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); n];
        for i in 0..n {
            for d in [1, 2] {
                let j = (i + d) % n;
                neighbours[i].insert(j);
                neighbours[j].insert(i);
            }
            let j = sim.rng.below(n);
            if j != i {
                neighbours[i].insert(j);
                neighbours[j].insert(i);
            }
        }
        // Node i lists its neighbours started before it as static peers, so
        // every edge is redialed by one side.
        for (i, neighbours) in neighbours.into_iter().enumerate() {
            let store = Store::create().await;
            let peers: Vec<Multiaddr> = neighbours
                .iter()
                .filter(|j| **j < i)
                .map(|j| sim.nodes[*j].addr.clone())
                .collect();
            let mut node = SimNode {
                store: Some(store),
                sync: None,
                addr: "/ip4/127.0.0.1/tcp/0".parse().unwrap(),
                peers,
                neighbours,
                status: Status::default(),
                history: String::new(),
            };
            let sync = SyncHandle::spawn(sim.config(&node), &node.store.as_ref().unwrap().key, sim.backend(&node))
                .await
                .unwrap();
            node.addr = sync.listen_addrs().await.unwrap().remove(0);
            node.sync = Some(sync);
            sim.nodes.push(node);
        }
        sim
    }

    fn backend(&self, node: &SimNode) -> Arc<medmesh_sync::NodeBackend> {
        node.store.as_ref().unwrap().backend.clone()
    }

    fn store(&self, i: usize) -> &Store {
        self.nodes[i].store.as_ref().unwrap()
    }

    fn index_of(&self, p: &medmesh_crypto::PracticeId) -> usize {
        (0..self.nodes.len()).find(|i| self.store(*i).practice() == *p).unwrap()
    }

    /// The listen address without `/p2p/`, for a respawn on the same port.
    fn bare(addr: &Multiaddr) -> Multiaddr {
        addr.iter().filter(|p| !matches!(p, Protocol::P2p(_))).collect()
    }

    async fn stop_sync(&mut self, i: usize) {
        if let Some(sync) = self.nodes[i].sync.take() {
            let s = sync.status().await.unwrap();
            add_status(&mut self.nodes[i].status, &s);
            sync.shutdown().await.unwrap();
        }
    }

    async fn start_sync(&mut self, i: usize) {
        let mut config = self.config(&self.nodes[i]);
        config.listen = vec![Self::bare(&self.nodes[i].addr)];
        let store = self.store(i);
        let sync = SyncHandle::spawn(config, &store.key, store.backend.clone())
            .await
            .unwrap();
        self.nodes[i].sync = Some(sync);
    }

    async fn restart(&mut self, i: usize) {
        self.nodes[i].history.push_str(" restarted");
        self.stop_sync(i).await;
        let store = self.nodes[i].store.take().unwrap();
        self.nodes[i].store = Some(store.restart().await);
        self.start_sync(i).await;
    }

    /// A CLI session of patient `x` submitting `items` at node `at` (with
    /// the grantee's address for a grant), as `medmesh patient` does.
    async fn submit(&mut self, x: usize, at: usize, items: Vec<Item>, grantee: Option<usize>) {
        let identity = self.patients[x].identity();
        let client = SyncHandle::spawn(Config::client(), identity, Arc::new(MemoryBackend::new()))
            .await
            .unwrap();
        let peer = tokio::time::timeout(common::WAIT, client.dial(self.nodes[at].addr.clone()))
            .await
            .unwrap()
            .unwrap();
        let addrs = grantee.map(|g| self.nodes[g].addr.clone()).into_iter().collect();
        tokio::time::timeout(common::WAIT, client.push(peer, items, addrs))
            .await
            .unwrap()
            .unwrap();
        self.client_requests += client.status().await.unwrap().requests_sent;
        client.shutdown().await.unwrap();
    }

    async fn grant(&mut self, x: usize, to: usize, collections: &[Collection], access: Access, not_before: u64) {
        let home = self.home[x];
        let grantee = self.store(to).practice();
        let hints = vec![self.nodes[home].addr.to_string()];
        let (_, items) = self.patients[x]
            .grant(grantee, collections, access, not_before, None, hints)
            .unwrap();
        let grantee = (to != home).then_some(to);
        self.submit(x, home, items, grantee).await;
    }

    async fn onboard(&mut self, scale: Scale) {
        for x in 0..scale.patients {
            self.patients.push(CliPatient::new().unwrap());
            let home = self.rng.below(self.nodes.len());
            self.home.push(home);
            self.grant(x, home, &COLLECTIONS, Access::ReadWrite, now() - 60_000)
                .await;
            let others: Vec<usize> = self.nodes[home].neighbours.iter().copied().collect();
            for _ in 0..1 + self.rng.below(3) {
                self.more_grant(x, &others, false).await;
            }
        }
    }

    /// Another grant of patient `x` to one of `candidates`; with `later`,
    /// some start 1.5 s from now (the grantee reconciles at not-before).
    async fn more_grant(&mut self, x: usize, candidates: &[usize], later: bool) {
        let to = candidates[self.rng.below(candidates.len())];
        let collections = match self.rng.below(3) {
            0 => vec![Collection::Core],
            1 => vec![Collection::Labs],
            _ => COLLECTIONS.to_vec(),
        };
        let access = if self.rng.chance(60) {
            Access::ReadWrite
        } else {
            Access::Read
        };
        let not_before = if later && self.rng.chance(25) {
            now() + 1_500
        } else {
            now() - 60_000
        };
        self.grant(x, to, &collections, access, not_before).await;
    }

    /// Every practice holding a read-write grant in force writes to each
    /// collection it covers, through its node (sealed under its current key).
    async fn writes(&mut self, rounds: usize, only: Option<&BTreeSet<usize>>) {
        for x in 0..self.patients.len() {
            let patient = self.patients[x].id();
            for g in 0..self.patients[x].grants.len() {
                let issued = &self.patients[x].grants[g];
                if issued.revocation.is_some() || issued.grant.terms().access != Access::ReadWrite {
                    continue;
                }
                let grant = issued.grant.clone();
                let i = self.index_of(&grant.terms().grantee);
                if only.is_some_and(|o| !o.contains(&i)) {
                    continue;
                }
                for c in grant.terms().collections.clone() {
                    for _ in 0..rounds {
                        let node = self.store(i).node.clone();
                        let me = node.practice_id();
                        if node
                            .grant_in_force(&patient, c, &me, Access::ReadWrite, now())
                            .is_none()
                            || node.current_epoch_key(&patient, c).is_none()
                        {
                            continue;
                        }
                        let key = self.store(i).key.public_bytes();
                        let maker = self
                            .makers
                            .entry((i, x, c))
                            .or_insert_with(|| ChangeMaker::new(&key).unwrap());
                        let change = maker.put(&format!("k{}", self.written.len()), "v").unwrap();
                        let id = node.write_change(patient, c, change.as_change()).await.unwrap();
                        let stored = node.item(&medmesh_node::store::ItemId(id.0)).await.unwrap().unwrap();
                        let envelope = medmesh_crypto::Envelope::decode(&stored.item.bytes).unwrap();
                        self.written.push(Written {
                            patient: x,
                            collection: c,
                            id,
                            grant: envelope.header().grant_id,
                            actor: change.actor,
                            seq: change.seq,
                            by: i,
                            phase: self.phase,
                        });
                    }
                }
            }
        }
    }

    /// The patient revokes a grant that is not the home practice's, via the
    /// home practice: cut from what home holds, new epochs.
    async fn revoke_one(&mut self, x: usize) {
        let home = self.home[x];
        let home_practice = self.store(home).practice();
        let live: Vec<usize> = (0..self.patients[x].grants.len())
            .filter(|g| {
                let i = &self.patients[x].grants[*g];
                i.revocation.is_none() && i.grant.terms().grantee != home_practice
            })
            .collect();
        if live.is_empty() {
            return;
        }
        let g = live[self.rng.below(live.len())];
        let grant = self.patients[x].grants[g].grant.clone();
        // What the CLI pulls from home to make the cut.
        let patient = self.patients[x].id();
        let node = &self.store(home).node;
        let mut served = Vec::new();
        for e in node.envelopes(&patient, None).unwrap() {
            let stored = node.item(&medmesh_node::store::ItemId(e.id.0)).await.unwrap().unwrap();
            served.push(Item {
                kind: medmesh_sync::ItemKind::Envelope,
                bytes: stored.item.bytes,
            });
        }
        let held = CliPatient::held_under(&grant, &served);
        let items = self.patients[x]
            .revoke(g, held, now())
            .unwrap()
            .expect("a grant the patient issued");
        self.submit(x, home, items, None).await;
    }

    /// The valid envelopes written for (patient, collection): the patient's
    /// and each practice's not beyond the cut of its grant's revocation.
    fn expected(&self, x: usize, c: Collection) -> BTreeSet<EnvelopeId> {
        self.written
            .iter()
            .filter(|w| w.patient == x && w.collection == c)
            .filter(|w| {
                let Some(g) = w.grant else { return true };
                let issued = self.patients[x].grants.iter().find(|i| i.grant.id() == g).unwrap();
                issued.revocation.as_ref().is_none_or(|r| r.cut_admits(&w.actor, w.seq))
            })
            .map(|w| w.id)
            .collect()
    }

    /// What is still missing: (patient, collection, node) lines, empty once
    /// every holder of a grant in force holds exactly the valid envelopes,
    /// readable exactly where the key was shared.
    fn missing(&self) -> Vec<String> {
        let t = now();
        let mut out = Vec::new();
        for (x, p) in self.patients.iter().enumerate() {
            for c in COLLECTIONS {
                let expected = self.expected(x, c);
                let holders: BTreeSet<usize> = p
                    .grants
                    .iter()
                    .filter(|g| g.in_force(t) && g.grant.covers(c))
                    .map(|g| self.index_of(&g.grant.terms().grantee))
                    .collect();
                for i in holders {
                    let me = self.store(i).practice();
                    let entries = self.store(i).node.envelopes(&p.id(), Some(c)).unwrap();
                    let held: BTreeSet<EnvelopeId> = entries.iter().map(|e| e.id).collect();
                    if held != expected {
                        let home = self.home[x];
                        let grants: Vec<String> = p
                            .grants
                            .iter()
                            .filter(|g| g.grant.terms().grantee == me)
                            .map(|g| {
                                let t = g.grant.terms();
                                format!(
                                    "{:?} {} starts {:+} ms{}",
                                    t.collections,
                                    t.access.as_str(),
                                    t.not_before as i64 - t.issued_at as i64,
                                    if g.revocation.is_some() { " revoked" } else { "" }
                                )
                            })
                            .collect();
                        let missing_by: BTreeSet<String> = self
                            .written
                            .iter()
                            .filter(|w| expected.contains(&w.id) && !held.contains(&w.id))
                            .map(|w| {
                                let writer = self.store(w.by);
                                let grant = p.grants.iter().find(|g| Some(g.grant.id()) == w.grant).unwrap();
                                let t = grant.grant.terms();
                                format!(
                                    "node {} ({}) in {}, still held there: {}, its grant revoked: {}, \
                                     starts {:+} ms; the writer knows {} grants",
                                    w.by,
                                    self.nodes[w.by].history,
                                    w.phase,
                                    writer
                                        .node
                                        .envelope_ids(&p.id(), c)
                                        .is_ok_and(|ids| ids.contains(&w.id)),
                                    grant.revocation.is_some(),
                                    t.not_before as i64 - t.issued_at as i64,
                                    writer.node.grants(&p.id()).len(),
                                )
                            })
                            .collect();
                        out.push(format!(
                            "patient {x} {c} at node {i} (home {home}, static edge {}, {}): holds {} of {} (extra {}); \
                             its grants {grants:?}; missing ones written under {missing_by:?}; node knows {} grants",
                            self.nodes[home].neighbours.contains(&i),
                            self.nodes[i].history,
                            held.intersection(&expected).count(),
                            expected.len(),
                            held.difference(&expected).count(),
                            self.store(i).node.grants(&p.id()).len(),
                        ));
                        continue;
                    }
                    let unread = entries
                        .iter()
                        .filter(|e| (e.state == EnvelopeState::Readable) != p.shared(me, c, e.epoch))
                        .count();
                    if unread > 0 {
                        out.push(format!(
                            "patient {x} {c} at node {i}: {unread} envelopes not yet readable"
                        ));
                    }
                }
            }
        }
        out
    }

    /// §9.6 over every node: nothing readable without a shared key.
    fn check_keys(&self) {
        for i in 0..self.nodes.len() {
            let me = self.store(i).practice();
            for (x, p) in self.patients.iter().enumerate() {
                for c in COLLECTIONS {
                    for e in self.store(i).node.envelopes(&p.id(), Some(c)).unwrap() {
                        assert!(
                            e.state != EnvelopeState::Readable || p.shared(me, c, e.epoch),
                            "§9.6: node {i} reads patient {x} {c} epoch {} without its key share",
                            e.epoch
                        );
                    }
                }
            }
        }
    }

    /// §9.1 from every node's audit log. Returns the envelope disclosures.
    fn check_disclosures(&self) -> u64 {
        let envelopes: HashMap<EnvelopeId, (usize, Collection)> =
            self.written.iter().map(|w| (w.id, (w.patient, w.collection))).collect();
        let mut count = 0;
        for i in 0..self.nodes.len() {
            let mut revoked_here: BTreeSet<String> = BTreeSet::new();
            for e in self.store(i).node.audit_entries(None).unwrap() {
                match e.action {
                    Action::Revoke => {
                        revoked_here.extend(e.grant.map(|g| hex::encode(g.0)));
                    }
                    Action::Disclose => {
                        let to: PeerId = e.actor_id.parse().unwrap();
                        for item in &e.items {
                            let Some((x, c)) = envelopes.get(&EnvelopeId(item.0)).copied() else {
                                continue;
                            };
                            count += 1;
                            let p = &self.patients[x];
                            if to == p.peer().unwrap() {
                                continue;
                            }
                            let allowed = p.grants.iter().any(|g| {
                                g.grant.terms().grantee.peer_id() == to
                                    && g.grant.covers(c)
                                    && g.grant.in_force(e.time, false)
                                    && !revoked_here.contains(&g.grant.id().to_string())
                            });
                            assert!(
                                allowed,
                                "§9.1: node {i} disclosed a {c} envelope of patient {x} to {to} (audit seq {}) \
                                 without a grant in force there",
                                e.seq
                            );
                        }
                    }
                    _ => {}
                }
            }
        }
        count
    }

    async fn totals(&mut self) -> Status {
        let mut total = Status::default();
        for i in 0..self.nodes.len() {
            add_status(&mut total, &self.nodes[i].status.clone());
            if let Some(sync) = &self.nodes[i].sync {
                add_status(&mut total, &sync.status().await.unwrap());
            }
        }
        total
    }

    /// With Kademlia on: nodes connect to nodes they are not connected to
    /// by PeerId alone (known addresses, else a lookup), a random one per
    /// node in turn, up to `max` in all. Returns how many connected (none
    /// when every node is connected to every other).
    async fn check_lookups(&mut self, max: usize) -> usize {
        let n = self.nodes.len();
        let mut found = 0;
        for i in (0..n).cycle().take(3 * n) {
            if found == max {
                break;
            }
            let sync = self.nodes[i].sync.clone().unwrap();
            let connected = sync.connected_peers().await.unwrap();
            let unconnected: Vec<usize> = (0..n)
                .filter(|j| *j != i && !connected.contains(&self.store(*j).peer()))
                .collect();
            if unconnected.is_empty() {
                continue;
            }
            let j = unconnected[self.rng.below(unconnected.len())];
            let target = self.store(j).peer();
            let peer = tokio::time::timeout(common::WAIT, sync.dial_peer(target))
                .await
                .unwrap_or_else(|_| panic!("node {i}'s lookup of node {j} did not end"))
                .unwrap_or_else(|e| panic!("node {i} did not find node {j} by its PeerId: {e}"));
            assert_eq!(peer, target);
            found += 1;
        }
        found
    }

    async fn shutdown(&mut self) {
        for i in 0..self.nodes.len() {
            self.stop_sync(i).await;
            if let Some(store) = &self.nodes[i].store {
                store.node.close().await;
            }
        }
    }
}

/// Figures of one run.
#[derive(Debug)]
struct Figures {
    nodes: usize,
    patients: usize,
    written: usize,
    delivered: u64,
    requests: u64,
    bytes: u64,
    disclosures: u64,
    setup: Duration,
    active: Duration,
    converge: Duration,
    /// CPU time of the whole test process until convergence (user and
    /// system; meaningful when the test runs alone), where /proc says.
    cpu: Option<Duration>,
    kademlia: bool,
    /// Peers found by their PeerId alone (Kademlia on).
    lookups: usize,
}

/// User and system CPU time of this process so far, from /proc (Linux).
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 12th and 13th of them, in clock ticks (100 per second on Linux).
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

async fn simulate(scale: Scale, seed: u64) -> Figures {
    let cpu0 = process_cpu();
    let t0 = Instant::now();
    let mut sim = Sim::new(scale, seed).await;
    let setup = t0.elapsed();
    let t1 = Instant::now();
    sim.onboard(scale).await;
    sim.phase = "first writes";
    sim.writes(scale.writes, None).await;

    // Restarts while data moves.
    for _ in 0..scale.restarts {
        let i = sim.rng.below(scale.nodes);
        sim.restart(i).await;
    }

    // An offline partition: these nodes lose the network; both sides keep
    // writing, the patients grant and revoke meanwhile.
    let mut offline = BTreeSet::new();
    while offline.len() < scale.partitioned {
        offline.insert(sim.rng.below(scale.nodes));
    }
    for i in &offline {
        sim.nodes[*i].history.push_str(" offline");
        sim.stop_sync(*i).await;
    }
    sim.phase = "partition";
    sim.writes(scale.writes, None).await;
    for x in 0..scale.patients {
        // The patient's CLI reaches the home practice only if it is online.
        if offline.contains(&sim.home[x]) {
            continue;
        }
        if sim.rng.chance(40) {
            sim.revoke_one(x).await;
        }
        if sim.rng.chance(30) {
            let home = sim.home[x];
            let others: Vec<usize> = sim.nodes[home]
                .neighbours
                .iter()
                .copied()
                .filter(|i| !offline.contains(i))
                .collect();
            if !others.is_empty() {
                sim.more_grant(x, &others, false).await;
            }
        }
    }
    sim.writes(scale.writes, Some(&offline)).await;
    for i in &offline {
        sim.start_sync(*i).await;
    }
    // Grants that start a little later, once no node restarts or goes
    // offline any more: the one reconciliation a grantee runs at not-before
    // is not retried if its peers are down then (reported; see the module
    // docs).
    for x in 0..scale.patients {
        if sim.rng.chance(30) {
            let others: Vec<usize> = sim.nodes[sim.home[x]].neighbours.iter().copied().collect();
            sim.more_grant(x, &others, true).await;
        }
    }
    // Writes after the revocations: new epochs.
    sim.phase = "after healing";
    sim.writes(scale.writes, None).await;
    let active = t1.elapsed();

    let t2 = Instant::now();
    let deadline = t2 + scale.wait;
    loop {
        let missing = sim.missing();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no convergence after {:?}: {} gaps, e.g. {:?}",
            scale.wait,
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let converge = t2.elapsed();
    let cpu = process_cpu().zip(cpu0).map(|(now, start)| now.saturating_sub(start));
    sim.check_keys();
    let disclosures = sim.check_disclosures();
    let lookups = if scale.kademlia {
        sim.check_lookups(2 * scale.nodes).await
    } else {
        0
    };

    let total = sim.totals().await;
    let held: u64 = (0..scale.nodes)
        .map(|i| {
            sim.patients
                .iter()
                .map(|p| sim.store(i).node.envelopes(&p.id(), None).unwrap().len() as u64)
                .sum::<u64>()
        })
        .sum();
    let figures = Figures {
        nodes: scale.nodes,
        patients: scale.patients,
        written: sim.written.len(),
        delivered: held.saturating_sub(sim.written.len() as u64),
        requests: total.requests_sent + sim.client_requests,
        bytes: total.bytes_sent,
        disclosures,
        setup,
        active,
        converge,
        cpu,
        kademlia: scale.kademlia,
        lookups,
    };
    sim.shutdown().await;
    figures
}

fn report(f: &Figures) {
    let per = |n: u64| n as f64 / f.delivered.max(1) as f64;
    let cpu = f.cpu.map_or("n/a".into(), |c| format!("{:.1} s", c.as_secs_f64()));
    println!(
        "sim: {} nodes{}, {} patients, {} changes written, {} envelope deliveries ({} disclosures audited)\n  \
         setup {:.1} s, schedule {:.1} s, converged {:.1} s after the last operation; process CPU until then {cpu}\n  \
         {} requests in all = {:.2} requests per delivered envelope; {:.0} item bytes sent per delivered envelope{}",
        f.nodes,
        if f.kademlia { " with Kademlia" } else { "" },
        f.patients,
        f.written,
        f.delivered,
        f.disclosures,
        f.setup.as_secs_f64(),
        f.active.as_secs_f64(),
        f.converge.as_secs_f64(),
        f.requests,
        per(f.requests),
        per(f.bytes),
        if f.kademlia {
            format!("\n  {} peers found by their PeerId alone", f.lookups)
        } else {
            String::new()
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_simulation_converges() {
    let f = simulate(
        Scale {
            nodes: 20,
            patients: 8,
            writes: 2,
            restarts: 2,
            partitioned: 3,
            wait: Duration::from_secs(90),
            kademlia: false,
        },
        7,
    )
    .await;
    report(&f);
    assert!(f.delivered > 0 && f.disclosures > 0, "nothing moved: {f:?}");
}

/// The same with Kademlia on every node: its join lookups, the bootstraps
/// the actor cuts short, and lookups by PeerId alone at the end (of the
/// pairs still unconnected: at 20 nodes the join lookups leave few).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_simulation_with_kademlia_converges() {
    let f = simulate(
        Scale {
            nodes: 20,
            patients: 8,
            writes: 2,
            restarts: 2,
            partitioned: 3,
            wait: Duration::from_secs(90),
            kademlia: true,
        },
        7,
    )
    .await;
    report(&f);
    assert!(f.delivered > 0 && f.disclosures > 0, "nothing moved: {f:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "100 nodes: minutes on 2 cores; run with --release --ignored --nocapture for the figures"]
async fn hundred_node_simulation() {
    let f = simulate(
        Scale {
            nodes: 100,
            patients: 60,
            writes: 3,
            restarts: 8,
            partitioned: 10,
            wait: Duration::from_secs(300),
            kademlia: std::env::var("SIM_KADEMLIA").is_ok(),
        },
        2026,
    )
    .await;
    report(&f);
    assert!(f.delivered > 0 && f.disclosures > 0, "nothing moved: {f:?}");
}

/// The gap the 100-node run found, minimised: B's grant starts 1.5 s after
/// it is issued at A (home, which already holds the patient's record
/// written under A's grant). A is offline when B's one reconciliation at
/// not-before runs; it is not retried. B had scanned past A's grant while
/// its own had not started, so it never learns A's grant: A's later writes
/// reach B but wait in its pending queue for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_grant_whose_reconciliation_fails_still_gets_the_record() {
    let scale = Scale {
        nodes: 2,
        patients: 1,
        writes: 2,
        restarts: 0,
        partitioned: 0,
        wait: Duration::from_secs(30),
        kademlia: false,
    };
    let mut sim = Sim::new(scale, 1).await;
    sim.patients.push(CliPatient::new().unwrap());
    sim.home.push(0);
    sim.grant(0, 0, &[Collection::Core], Access::ReadWrite, now() - 60_000)
        .await;
    sim.writes(scale.writes, None).await;
    let not_before = now() + 1_500;
    sim.grant(0, 1, &[Collection::Core], Access::Read, not_before).await;
    // B holds its grant and has pulled A to the end of its log (the pull a
    // push triggers), while its grant had not started: A's grant withheld.
    let a_peer = sim.store(0).peer();
    let a_end = sim.store(0).node.last_seq();
    let patient = sim.patients[0].id();
    common::until("B holds its grant and pulled A past A's grant", || {
        let b = sim.store(1);
        b.node.grants(&patient).len() == 1 && b.node.cursor(&a_peer).ok().flatten().is_some_and(|c| c.seq >= a_end)
    })
    .await;
    let b = sim.nodes[1].sync.clone().unwrap();
    let failed_before = b.status().await.unwrap().reconciliations_failed;
    sim.stop_sync(0).await;
    // B's reconciliation runs one second after not-before, and fails: A is down.
    common::until_async("B's reconciliation at not-before has failed", || {
        let b = b.clone();
        async move { b.status().await.unwrap().reconciliations_failed > failed_before }
    })
    .await;
    sim.start_sync(0).await;
    sim.writes(scale.writes, None).await;
    let deadline = Instant::now() + scale.wait;
    while !sim.missing().is_empty() {
        assert!(Instant::now() < deadline, "B never got the record: {:?}", sim.missing());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    sim.shutdown().await;
}
