//! Issue 16, with real node processes: a TCP proxy of the test's own stands
//! between two practices and, driven by a seeded RNG, delays chunks, cuts
//! connections mid-stream (FIN or RST, both halves) and stalls them (holds
//! what it read for a while, then cuts) during a first sync of several
//! hundred envelopes in three collections while A keeps writing. Once it
//! stops faulting, B must hold what A holds of the granted collections —
//! nothing lost, nothing twice, nothing of the collection not granted —
//! with nothing left pending or owed. (This kernel has no netem, and TCP
//! cannot lose bytes inside a stream: loss here is a stall or a cut.)
//!
//! Every p2p byte between A and B crosses a proxy: each node listens on TCP
//! only and announces only its proxy's address (`--external-address`, which
//! keeps its listen addresses out of identify), the grants name the proxies,
//! and at the end, the proxies closed, the nodes must lose each other.
//!
//! The seed is printed; `MEDMESH_FAULT_SEED=N` replays its schedule of
//! decisions (which connection draws which is up to timing).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{NodeProcess, medmesh, new_patient, stderr};
use rand::rngs::StdRng;
use rand::{RngExt as _, SeedableRng as _};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The record at A before the grant: core (a Patient and conditions), labs
/// and medications, one envelope per write.
const CONDITIONS: usize = 40;
const LABS: usize = 300;
const MEDICATIONS: usize = 100;
/// Written at A while the proxy faults: labs, medications, and one update
/// of every condition (a second version B must end up with).
const LABS_LATER: usize = 60;
const MEDICATIONS_LATER: usize = 20;
/// B is granted these; medications is the collection it must not get.
const GRANTED: &str = "core,labs";
const GRANTED_TYPES: [&str; 3] = ["Patient", "Condition", "Observation"];

/// The proxy faults until it has cut or stalled this many connections, B
/// has caught up, or [`FAULT_DEADLINE`]; meanwhile a chunk is held back
/// 10–60 ms with this chance in 100.
const MIN_FAULTS: u64 = 8;
const DELAY_PERCENT: u64 = 10;
/// A connection faults once 0.5 KiB to this many bytes went through it,
/// drawn log-uniformly: some die in their handshake, some in a page, some
/// carry a few pages first (the record is ~350 KiB on the wire).
const MAX_BYTES_BEFORE_FAULT: u64 = 64 * 1024;
const FAULT_DEADLINE: Duration = Duration::from_secs(15);
/// From the last fault to B holding everything with nothing pending or
/// owed on either side, and from then to B's apps reading it.
const SETTLE_DEADLINE: Duration = Duration::from_secs(30);
const READ_DEADLINE: Duration = Duration::from_secs(5);

/// What the proxy does to one connection once enough bytes went through
/// it while faulting is on.
#[derive(Debug, Clone, Copy)]
enum Plan {
    Cut { after: u64 },
    Stall { after: u64, hold: Duration },
}

/// The fault schedule both proxies draw from, its switch and its tally.
struct Faults {
    /// Seeded: the same seed draws the same schedule.
    rng: Mutex<StdRng>,
    on: watch::Sender<bool>,
    connections: AtomicU64,
    cuts: AtomicU64,
    stalls: AtomicU64,
    delays: AtomicU64,
}

impl Faults {
    fn new(seed: u64) -> Self {
        Self {
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            on: watch::Sender::new(false),
            connections: AtomicU64::new(0),
            cuts: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
            delays: AtomicU64::new(0),
        }
    }

    /// A number in `0..n`.
    fn draw(&self, n: u64) -> u64 {
        self.rng.lock().unwrap().random_range(0..n)
    }

    fn plan(&self) -> Plan {
        let scale = MAX_BYTES_BEFORE_FAULT >> self.draw(8);
        let after = scale / 2 + self.draw(scale / 2);
        match self.draw(100) {
            0..50 => Plan::Cut { after },
            _ => Plan::Stall {
                after,
                hold: Duration::from_millis(200 + self.draw(1800)),
            },
        }
    }

    fn is_on(&self) -> bool {
        *self.on.borrow()
    }

    fn injected(&self) -> u64 {
        self.cuts.load(Ordering::Relaxed) + self.stalls.load(Ordering::Relaxed)
    }

    fn tally(&self) -> String {
        format!(
            "{} connections, {} cut, {} stalled then cut, {} chunks delayed",
            self.connections.load(Ordering::Relaxed),
            self.cuts.load(Ordering::Relaxed),
            self.stalls.load(Ordering::Relaxed),
            self.delays.load(Ordering::Relaxed)
        )
    }
}

/// A TCP proxy on 127.0.0.1 in front of one node's p2p port.
struct Proxy {
    port: u16,
    target: Arc<OnceLock<SocketAddr>>,
    closed: watch::Sender<bool>,
}

impl Proxy {
    fn start(rt: &tokio::runtime::Runtime, faults: &Arc<Faults>) -> Self {
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = Arc::new(OnceLock::new());
        let closed = watch::Sender::new(false);
        rt.spawn(accept(
            listener,
            Arc::clone(&target),
            Arc::clone(faults),
            closed.subscribe(),
        ));
        Self { port, target, closed }
    }

    /// The address peers are told to reach the node at.
    fn addr(&self) -> String {
        format!("/ip4/127.0.0.1/tcp/{}", self.port)
    }

    /// Forwards to the TCP port of `listen` (a node's listen multiaddr).
    fn forward_to(&self, listen: &str) {
        let port: u16 = listen
            .split('/')
            .skip_while(|p| *p != "tcp")
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no TCP port in {listen}"));
        self.target.set(SocketAddr::from(([127, 0, 0, 1], port))).unwrap();
    }

    /// Stops accepting and cuts every connection.
    fn close(&self) {
        self.closed.send_replace(true);
    }
}

async fn accept(
    listener: TcpListener,
    target: Arc<OnceLock<SocketAddr>>,
    faults: Arc<Faults>,
    mut closed: watch::Receiver<bool>,
) {
    loop {
        let inbound = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((inbound, _)) => inbound,
                Err(_) => continue,
            },
            _ = closed.wait_for(|c| *c) => return,
        };
        // Before the node is up nobody knows this address; drop anything else.
        if let Some(&target) = target.get() {
            tokio::spawn(relay(inbound, target, Arc::clone(&faults), closed.clone()));
        }
    }
}

/// Carries one connection both ways until both sides close it, its fault
/// strikes or the proxy closes; then closes both halves of both sockets
/// (half the cuts abortively, with a reset).
async fn relay(mut inbound: TcpStream, target: SocketAddr, faults: Arc<Faults>, mut closed: watch::Receiver<bool>) {
    let Ok(mut outbound) = TcpStream::connect(target).await else {
        return;
    };
    faults.connections.fetch_add(1, Ordering::Relaxed);
    let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
    let plan = faults.plan();
    let abortive = faults.draw(2) == 0;
    let link = Link {
        faults: &faults,
        forwarded: watch::Sender::new(0),
        stalled: AtomicBool::new(false),
    };
    let cut = {
        let (from_in, to_in) = inbound.split();
        let (from_out, to_out) = outbound.split();
        tokio::select! {
            _ = async { tokio::join!(link.pump(from_in, to_out), link.pump(from_out, to_in)) } => false,
            () = link.fault(plan) => true,
            _ = closed.wait_for(|c| *c) => true,
        }
    };
    if cut && abortive {
        let _ = (inbound.set_zero_linger(), outbound.set_zero_linger());
    }
}

/// One proxied connection's state.
struct Link<'a> {
    faults: &'a Faults,
    /// Bytes forwarded, both ways.
    forwarded: watch::Sender<u64>,
    /// A stall holds every chunk read from then on.
    stalled: AtomicBool,
}

impl Link<'_> {
    async fn pump(&self, mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin) {
        let mut buf = vec![0; 16 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            if self.faults.is_on() && self.faults.draw(100) < DELAY_PERCENT {
                self.faults.delays.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10 + self.faults.draw(50))).await;
            }
            if self.stalled.load(Ordering::Relaxed) {
                std::future::pending::<()>().await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                break;
            }
            self.forwarded.send_modify(|b| *b += n as u64);
        }
        // A side's close (FIN) passes on: a half-close, as TCP has it.
        let _ = to.shutdown().await;
    }

    /// Returns when the connection is to be cut.
    async fn fault(&self, plan: Plan) {
        let (after, hold) = match plan {
            Plan::Cut { after } => (after, None),
            Plan::Stall { after, hold } => (after, Some(hold)),
        };
        let _ = self.forwarded.subscribe().wait_for(|b| *b >= after).await;
        // Only while faulting: a connection that gets there later passes.
        let _ = self.faults.on.subscribe().wait_for(|on| *on).await;
        match hold {
            None => {
                self.faults.cuts.fetch_add(1, Ordering::Relaxed);
            }
            Some(hold) => {
                self.faults.stalls.fetch_add(1, Ordering::Relaxed);
                self.stalled.store(true, Ordering::Relaxed);
                tokio::time::sleep(hold).await;
            }
        }
    }
}

fn seed() -> u64 {
    match std::env::var("MEDMESH_FAULT_SEED") {
        Ok(s) => s.parse().unwrap_or_else(|e| panic!("MEDMESH_FAULT_SEED={s:?}: {e}")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    }
}

/// `POST` asserted to create: the new resource's id.
fn create(node: &NodeProcess, resource: &Value) -> String {
    let resource_type = resource["resourceType"].as_str().unwrap();
    let (status, created) = node.post(&format!("/fhir/{resource_type}"), resource);
    assert_eq!(status, 201, "{created}");
    created["id"].as_str().unwrap().to_owned()
}

fn lab(subject: &str, i: usize) -> Value {
    // A few hundred bytes of note: pages span many chunks, and cuts land inside them.
    json!({"resourceType": "Observation", "status": "final",
           "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
           "subject": {"reference": subject},
           "valueQuantity": {"value": i, "unit": "mmol/L"},
           "note": [{"text": format!("reading {i}: {}", "fasting, taken at the practice. ".repeat(12))}]})
}

fn medication(subject: &str, i: usize) -> Value {
    json!({"resourceType": "MedicationRequest", "status": "active", "intent": "order",
           "medicationCodeableConcept": {"text": format!("medication {i}")},
           "subject": {"reference": subject}})
}

fn condition(subject: &str, i: usize) -> Value {
    json!({"resourceType": "Condition", "code": {"text": format!("condition {i}")},
           "subject": {"reference": subject}})
}

/// Envelopes per collection `node` holds for `did`.
fn holdings(node: &NodeProcess, did: &str) -> BTreeMap<String, u64> {
    let (status, holdings) = node.get(&format!("/api/holdings?patient={did}"));
    assert_eq!(status, 200, "{holdings}");
    holdings["by_collection"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(c, n)| (c.clone(), n.as_u64().unwrap()))
        .collect()
}

/// Items waiting at `node` for a grant, a key or dependencies, and items
/// it still owes peers (its outbox).
fn pending_and_owed(node: &NodeProcess) -> (u64, u64) {
    let (status, peers) = node.get("/api/peers");
    assert_eq!(status, 200, "{peers}");
    (
        peers["pending"].as_u64().unwrap(),
        peers["sync"]["outbox"].as_u64().unwrap(),
    )
}

fn connected(node: &NodeProcess, peer: &str) -> bool {
    let (status, peers) = node.get("/api/peers");
    assert_eq!(status, 200, "{peers}");
    peers["connected"].as_array().unwrap().iter().any(|p| p == peer)
}

/// (type, id, versionId) of every granted-type resource in the patient's
/// `$everything` at `node`, sorted; asserts each id appears once.
fn readable(node: &NodeProcess, patient_id: &str) -> Vec<(String, String, String)> {
    let (status, bundle) = node.get(&format!("/fhir/Patient/{patient_id}/$everything?_count=1000"));
    assert_eq!(status, 200, "{bundle}");
    assert!(
        !bundle["link"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["relation"] == "next"),
        "more than one page"
    );
    let mut found: Vec<(String, String, String)> = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["search"]["mode"] != "outcome")
        .map(|e| &e["resource"])
        .filter(|r| GRANTED_TYPES.contains(&r["resourceType"].as_str().unwrap()))
        .map(|r| {
            (
                r["resourceType"].as_str().unwrap().to_owned(),
                r["id"].as_str().unwrap().to_owned(),
                r["meta"]["versionId"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    found.sort();
    let ids: BTreeSet<(&str, &str)> = found.iter().map(|(t, id, _)| (t.as_str(), id.as_str())).collect();
    assert_eq!(ids.len(), found.len(), "a resource twice in $everything: {found:?}");
    found
}

#[test]
fn a_proxy_that_delays_cuts_and_stalls_connections_during_a_first_sync_loses_and_duplicates_nothing() {
    let seed = seed();
    println!("fault seed {seed} (MEDMESH_FAULT_SEED={seed} replays it)");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let faults = Arc::new(Faults::new(seed));
    let (proxy_a, proxy_b) = (Proxy::start(&rt, &faults), Proxy::start(&rt, &faults));

    let root = tempfile::tempdir().unwrap();
    let patient = root.path().join("patient");
    let start = |home: &str, proxy: &Proxy| {
        let external = proxy.addr();
        let node = NodeProcess::start_with(
            &root.path().join(home),
            &["--listen", "/ip4/127.0.0.1/tcp/0", "--external-address", &external],
        );
        proxy.forward_to(&node.listen);
        let via_proxy = format!("{external}/p2p/{}", node.peer_id);
        (node, via_proxy)
    };
    let (a, a_via_proxy) = start("a", &proxy_a);
    let (b, b_via_proxy) = start("b", &proxy_b);

    let did = new_patient(&patient);
    let grant = |to: &str, extra: &[&str]| {
        let out = medmesh(&patient)
            .args(["--json", "patient", "grant", "--node", &a_via_proxy, "--to", to])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "grant failed: {}", stderr(&out));
    };
    grant(&a.peer_id, &["--write"]);
    let patient_id = create(
        &a,
        &json!({"resourceType": "Patient", "name": [{"family": "Okafor"}],
                "identifier": [{"system": "urn:ietf:rfc:3986", "value": did}]}),
    );
    let subject = format!("Patient/{patient_id}");
    let conditions: Vec<String> = (0..CONDITIONS).map(|i| create(&a, &condition(&subject, i))).collect();
    for i in 0..LABS.max(MEDICATIONS) {
        if i < LABS {
            create(&a, &lab(&subject, i));
        }
        if i < MEDICATIONS {
            create(&a, &medication(&subject, i));
        }
    }

    // The first sync starts with the grant; the faults with it.
    grant(&b_via_proxy, &["--collections", GRANTED]);
    faults.on.send_replace(true);
    let faulted_at = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..LABS_LATER.max(CONDITIONS) {
                if i < LABS_LATER {
                    create(&a, &lab(&subject, LABS + i));
                }
                if i < MEDICATIONS_LATER {
                    create(&a, &medication(&subject, MEDICATIONS + i));
                }
                if let Some(id) = conditions.get(i) {
                    let mut updated = condition(&subject, i);
                    updated["id"] = json!(id);
                    updated["clinicalStatus"] = json!({"coding": [{
                        "system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "resolved"}]});
                    let (status, body) = a.put(&format!("/fhir/Condition/{id}"), &updated);
                    assert_eq!(status, 200, "{body}");
                }
            }
        });
    });
    // A's record is final: B must come to hold the granted part of it.
    let at_a = holdings(&a, &did);
    let expected: BTreeMap<String, u64> = at_a
        .iter()
        .filter(|(c, _)| GRANTED.split(',').any(|g| g == c.as_str()))
        .map(|(c, n)| (c.clone(), *n))
        .collect();
    assert_eq!(
        expected.values().sum::<u64>(),
        (1 + 2 * CONDITIONS + LABS + LABS_LATER) as u64,
        "A's own record: {at_a:?}"
    );
    // Faults until enough were injected, B caught up, or the deadline.
    while faults.injected() < MIN_FAULTS && holdings(&b, &did) != expected && faulted_at.elapsed() < FAULT_DEADLINE {
        std::thread::sleep(Duration::from_millis(20));
    }
    faults.on.send_replace(false);
    let fault_phase = faulted_at.elapsed();
    println!(
        "faulted for {fault_phase:.1?}: {}; B then held {:?}",
        faults.tally(),
        holdings(&b, &did)
    );
    assert!(
        faults.injected() > 0,
        "seed {seed}: B caught up before any fault struck ({})",
        faults.tally()
    );
    let settle = Instant::now() + SETTLE_DEADLINE;
    let settled_in = loop {
        let at_b = holdings(&b, &did);
        let (left_a, left_b) = (pending_and_owed(&a), pending_and_owed(&b));
        if at_b == expected && left_a == (0, 0) && left_b == (0, 0) {
            break faulted_at.elapsed() - fault_phase;
        }
        assert!(
            Instant::now() < settle,
            "seed {seed}: {SETTLE_DEADLINE:?} after the faults B holds {at_b:?}, A {expected:?}; \
             (pending, owed) at A {left_a:?}, at B {left_b:?} ({})",
            faults.tally()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    println!("B complete {settled_in:.1?} after the last fault");

    // What B's apps read is what A's read of the granted collections: the
    // same resources at the same versions, each once. (A node applies what
    // it stored to the documents apps read a moment later: holdings can be
    // ahead of reads for a little while.)
    let reads = Instant::now() + READ_DEADLINE;
    loop {
        let (at_b, at_a) = (readable(&b, &patient_id), readable(&a, &patient_id));
        if at_b == at_a {
            break;
        }
        assert!(
            Instant::now() < reads,
            "seed {seed}: B holds A's envelopes but reads {} resources, A {}: {at_b:?} vs {at_a:?}",
            at_b.len(),
            at_a.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // And B knows it holds them complete: holdings say so, and its apps'
    // reads carry no incomplete-record warning any more.
    let told = Instant::now() + READ_DEADLINE;
    loop {
        let (_, h) = b.get(&format!("/api/holdings?patient={did}"));
        let (_, everything) = b.get(&format!("/fhir/Patient/{patient_id}/$everything?_count=1"));
        let warned = everything["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["search"]["mode"] == "outcome" && e["resource"].to_string().contains("incomplete"));
        if h["completeness"]["core"]["complete"] == true && h["completeness"]["labs"]["complete"] == true && !warned {
            break;
        }
        assert!(
            Instant::now() < told,
            "seed {seed}: B holds all of core and labs but does not say it is complete: {}",
            h["completeness"]
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, medications) = b.get(&format!("/fhir/MedicationRequest?patient={did}"));
    assert_eq!((status, medications["total"].as_u64()), (200, Some(0)), "{medications}");

    // Nothing went around the proxies: closed, they leave A and B apart.
    proxy_a.close();
    proxy_b.close();
    let apart = Instant::now() + Duration::from_secs(10);
    while connected(&a, &b.peer_id) || connected(&b, &a.peer_id) {
        assert!(
            Instant::now() < apart,
            "A and B still connected with both proxies closed: a connection bypassed them"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
