//! Sync-at-scale benchmarks (issue 9), printed as figures and ratios: first sync of 1k and 10k ~1 KiB Observations between real node stores over loopback TCP, the same bytes over a raw libp2p request-response pair, medmesh vs automerge-repo's published figures, and the delta of one change after 1k vs 10k (100k with `MEDMESH_BENCH_DELTA_100K=1`). `cargo bench -p medmesh-sync --bench sync`; `MEDMESH_BENCH_N=<n>` replaces the 10k size (the 1k size becomes min(1k, n/10)); `MEDMESH_BENCH_ONLY=anti_entropy` runs part 5 (anti-entropy over patients in step) alone, at `MEDMESH_BENCH_PATIENTS=100,1000` patients.
//!
//! Over 800 lines on purpose: one benchmark binary whose parts share setup
//! and one printed comparison.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use futures::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{StreamProtocol, SwarmBuilder, noise, tcp, yamux};
use medmesh_crypto::{Access, Collection, EnvelopeId, PatientId, SecretIdentity};
use medmesh_node::repository::{self, Repository};
use medmesh_node::testing::TestPatient;
use medmesh_node::{Actor, Node};
use medmesh_sync::{
    Backend, Config, ConsentView, Cursor, DisclosureRecord, IngestReport, InstanceId, Item, ItemStored, NodeBackend,
    PeerId, StoredItem, SyncHandle, Transfer, TransferIngest,
};
use serde_json::{Value, json};
use tokio::sync::broadcast;

// ----- reference figures (issue 9) -----------------------------------------

/// automerge-repo 2.5 over a loopback websocket, 10k changes of ~1 KiB, fresh peer.
const AM_REPO_SECS: f64 = 18.0;
const AM_REPO_BYTES: f64 = 0.9e6;

// ----- workload --------------------------------------------------------------

/// An Observation of roughly 1 KiB of JSON (as node/benches/records.rs).
fn observation(i: usize) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "vital-signs", "display": "Vital Signs"}], "text": "Vital Signs"}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9",
            "display": "Blood pressure panel with all children optional"}], "text": "Blood pressure systolic & diastolic"},
        "subject": {"reference": "Patient/example"},
        "effectiveDateTime": format!("2024-{:02}-{:02}T10:{:02}:00Z", 1 + i % 12, 1 + i % 28, i % 60),
        "performer": [{"reference": "Practitioner/example"}],
        "interpretation": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
            "code": "L", "display": "low"}], "text": "Below low normal"}],
        "bodySite": {"coding": [{"system": "http://snomed.info/sct", "code": "368209003", "display": "Right arm"}]},
        "component": [
            {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6", "display": "Systolic blood pressure"}]},
             "valueQuantity": {"value": 100 + i % 50,
                "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}},
            {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4", "display": "Diastolic blood pressure"}]},
             "valueQuantity": {"value": 60 + i % 30, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}
        ]
    })
}

// ----- a Backend that times the serving side ---------------------------------

/// `NodeBackend` plus the time spent in the store calls that serving a pull
/// makes (`items_after`, `consent`, `record_disclosure`, `envelopes`).
struct Timed {
    inner: Arc<NodeBackend>,
    serve_ns: AtomicU64,
    /// items_after, envelopes (reconcile fetches), record_disclosure.
    split_ns: [AtomicU64; 3],
    items_after_calls: AtomicU64,
    items_scanned: AtomicU64,
}

impl Timed {
    fn new(inner: Arc<NodeBackend>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            serve_ns: AtomicU64::new(0),
            split_ns: Default::default(),
            items_after_calls: AtomicU64::new(0),
            items_scanned: AtomicU64::new(0),
        })
    }

    fn add(&self, start: Instant) {
        self.serve_ns
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    fn add_split(&self, which: usize, start: Instant) {
        self.split_ns[which].fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.add(start);
    }

    /// items_after, envelopes, record_disclosure times since the last call.
    fn take_split(&self) -> [Duration; 3] {
        [0, 1, 2].map(|i| Duration::from_nanos(self.split_ns[i].swap(0, Ordering::Relaxed)))
    }

    /// (store time, items_after calls, items scanned) since the last call.
    fn take(&self) -> (Duration, u64, u64) {
        (
            Duration::from_nanos(self.serve_ns.swap(0, Ordering::Relaxed)),
            self.items_after_calls.swap(0, Ordering::Relaxed),
            self.items_scanned.swap(0, Ordering::Relaxed),
        )
    }
}

impl Backend for Timed {
    fn instance_id(&self) -> InstanceId {
        self.inner.instance_id()
    }

    async fn items_after(&self, after: u64, limit: usize) -> medmesh_sync::Result<Vec<StoredItem>> {
        let start = Instant::now();
        let r = self.inner.items_after(after, limit).await;
        self.add_split(0, start);
        self.items_after_calls.fetch_add(1, Ordering::Relaxed);
        if let Ok(items) = &r {
            self.items_scanned.fetch_add(items.len() as u64, Ordering::Relaxed);
        }
        r
    }

    async fn scan_after(&self, after: u64, limit: usize) -> medmesh_sync::Result<Vec<StoredItem>> {
        let start = Instant::now();
        let r = self.inner.scan_after(after, limit).await;
        self.add_split(0, start);
        self.items_after_calls.fetch_add(1, Ordering::Relaxed);
        if let Ok(items) = &r {
            self.items_scanned.fetch_add(items.len() as u64, Ordering::Relaxed);
        }
        r
    }

    async fn check(&self, item: &StoredItem) -> medmesh_sync::Result<bool> {
        let start = Instant::now();
        let r = self.inner.check(item).await;
        self.add_split(0, start);
        r
    }

    async fn ingest(&self, from: PeerId, items: Vec<Item>) -> medmesh_sync::Result<IngestReport> {
        self.inner.ingest(from, items).await
    }

    fn cursor(&self, peer: &PeerId) -> medmesh_sync::Result<Option<Cursor>> {
        self.inner.cursor(peer)
    }

    async fn set_cursor(&self, peer: &PeerId, cursor: Cursor) -> medmesh_sync::Result<()> {
        self.inner.set_cursor(peer, cursor).await
    }

    fn consent(&self, patient: &PatientId) -> medmesh_sync::Result<ConsentView> {
        let start = Instant::now();
        let r = self.inner.consent(patient);
        self.add(start);
        r
    }

    fn envelope_ids(&self, patient: &PatientId, collection: Collection) -> medmesh_sync::Result<Vec<EnvelopeId>> {
        self.inner.envelope_ids(patient, collection)
    }

    async fn item(&self, id: &medmesh_sync::ItemId) -> medmesh_sync::Result<Option<StoredItem>> {
        self.inner.item(id).await
    }

    // The trait's defaults answer for a backend that cannot tell: the
    // node's answers are what the bench must measure.
    async fn ingest_capped(&self, from: PeerId, items: Vec<Item>, room: u64) -> medmesh_sync::Result<IngestReport> {
        self.inner.ingest_capped(from, items, room).await
    }

    fn pending_total(&self) -> medmesh_sync::Result<u64> {
        self.inner.pending_total()
    }

    fn names_grantee(&self, peer: &PeerId) -> medmesh_sync::Result<bool> {
        self.inner.names_grantee(peer)
    }

    fn relates_to(&self, patient: &PatientId, me: &PeerId) -> medmesh_sync::Result<bool> {
        self.inner.relates_to(patient, me)
    }

    fn patients_shared_with(&self, peer: &PeerId) -> medmesh_sync::Result<Vec<PatientId>> {
        self.inner.patients_shared_with(peer)
    }

    fn last_seq(&self) -> u64 {
        self.inner.last_seq()
    }

    fn note_address_record(&self, peer: &PeerId, seq: u64, signed: &[u8]) -> medmesh_sync::Result<bool> {
        self.inner.note_address_record(peer, seq, signed)
    }

    fn address_records(&self, peers: Option<&[PeerId]>) -> medmesh_sync::Result<Vec<Vec<u8>>> {
        self.inner.address_records(peers)
    }

    fn holder_addresses(&self) -> medmesh_sync::Result<Vec<String>> {
        self.inner.holder_addresses()
    }

    fn note_reconciled(
        &self,
        peer: &PeerId,
        patient: &PatientId,
        collection: Collection,
        listed: u64,
        missing: &[EnvelopeId],
    ) -> medmesh_sync::Result<()> {
        self.inner.note_reconciled(peer, patient, collection, listed, missing)
    }

    async fn audit_checkpoints(
        &self,
        anchor: Option<u64>,
    ) -> medmesh_sync::Result<Option<medmesh_node::AuditCheckpoints>> {
        self.inner.audit_checkpoints(anchor).await
    }

    fn outbox(&self) -> medmesh_sync::Result<Vec<medmesh_sync::Owed>> {
        self.inner.outbox()
    }

    fn put_outbox(&self, owed: &[medmesh_sync::Owed]) -> medmesh_sync::Result<()> {
        self.inner.put_outbox(owed)
    }

    fn remove_outbox(&self, settled: &[(PeerId, medmesh_sync::ItemId)]) -> medmesh_sync::Result<()> {
        self.inner.remove_outbox(settled)
    }

    async fn envelopes(&self, ids: &[EnvelopeId]) -> medmesh_sync::Result<Vec<StoredItem>> {
        let start = Instant::now();
        let r = self.inner.envelopes(ids).await;
        self.add_split(1, start);
        r
    }

    async fn record_disclosure(&self, record: &DisclosureRecord) -> medmesh_sync::Result<()> {
        let start = Instant::now();
        let r = self.inner.record_disclosure(record).await;
        self.add_split(2, start);
        r
    }

    fn subscribe(&self) -> broadcast::Receiver<ItemStored> {
        self.inner.subscribe()
    }

    async fn audit_entries(
        &self,
        patient: &PatientId,
        after: u64,
        limit: usize,
    ) -> medmesh_sync::Result<Vec<medmesh_sync::AuditEntry>> {
        self.inner.audit_entries(patient, after, limit).await
    }

    async fn record_audit_read(&self, patient: &PatientId) -> medmesh_sync::Result<()> {
        self.inner.record_audit_read(patient).await
    }

    async fn snapshot_transfer(
        &self,
        patient: &PatientId,
        collection: Collection,
    ) -> medmesh_sync::Result<Option<Arc<Transfer>>> {
        let start = Instant::now();
        let r = self.inner.snapshot_transfer(patient, collection).await;
        self.add_split(1, start);
        r
    }

    async fn restore_and_ingest(
        &self,
        from: PeerId,
        patient: PatientId,
        collection: Collection,
        payload: medmesh_sync::wire::SnapshotPayload,
        pending_room: u64,
    ) -> medmesh_sync::Result<Option<TransferIngest>> {
        self.inner
            .restore_and_ingest(from, patient, collection, payload, pending_room)
            .await
    }
}

// ----- loopback byte counter ---------------------------------------------------

/// Bytes received on `lo` (all loopback traffic on the machine: TCP/IP
/// headers, Noise, Yamux and both directions; noisy if anything else uses
/// loopback meanwhile).
fn lo_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/dev").ok()?;
    let line = text.lines().find(|l| l.trim_start().starts_with("lo:"))?;
    line.split(':').nth(1)?.split_whitespace().next()?.parse().ok()
}

fn lo_delta(before: Option<u64>) -> Option<u64> {
    Some(lo_bytes()?.saturating_sub(before?))
}

// ----- practices -----------------------------------------------------------------

struct Practice {
    node: Node,
    sync: SyncHandle,
    backend: Arc<Timed>,
    _dir: tempfile::TempDir,
}

impl Practice {
    async fn open() -> (SecretIdentity, Node, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretIdentity::generate().unwrap();
        let node = Node::open(dir.path(), SecretIdentity::from_seed(&key.seed()), Default::default())
            .await
            .unwrap();
        (key, node, dir)
    }

    async fn start(key: SecretIdentity, node: Node, dir: tempfile::TempDir) -> Self {
        let mut config = Config {
            pull_interval: Duration::from_secs(3600),
            ..Config::loopback_tcp()
        };
        if envelopes_only() {
            config.snapshot_min_envelopes = 0;
        }
        let backend = Timed::new(NodeBackend::new(node.clone()));
        let sync = SyncHandle::spawn(config, &key, backend.clone()).await.unwrap();
        Self {
            node,
            sync,
            backend,
            _dir: dir,
        }
    }
}

/// `MEDMESH_BENCH_ENVELOPES=1`: pullers take no snapshot transfers (the
/// envelope-by-envelope first sync, for comparison).
fn envelopes_only() -> bool {
    std::env::var_os("MEDMESH_BENCH_ENVELOPES").is_some()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn mb(b: f64) -> String {
    format!("{:.2} MB", b / 1e6)
}

fn opt_mb(b: Option<u64>) -> String {
    b.map_or_else(|| "n/a".into(), |b| mb(b as f64))
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISSED" }
}

/// What one first sync and its delta measured.
struct Run {
    n: usize,
    write: Duration,
    snapshot_save: Duration,
    /// B: open + load the transfer's document; the whole restore.
    restore: Option<(Duration, Duration)>,
    /// A's snapshot transfer: sealed document bytes, compressed header bytes, headers.
    transfer: Option<(usize, usize, u32)>,
    first: Duration,
    /// Until sync_now returned (the transfer's document kept as B's
    /// snapshot by then, if it was).
    synced: Duration,
    /// Whether B kept the transfer's document as its local snapshot.
    kept: bool,
    /// B's first read after the sync (cold load + render one).
    first_read: Duration,
    pages: u64,
    received: u64,
    bytes: u64,
    lo: Option<u64>,
    a_store: Duration,
    a_split: [Duration; 3],
    a_calls: u64,
    /// Items and bytes A received from B meanwhile (echo of its own items).
    echo: (u64, u64),
    accepted: u64,
    duplicates: u64,
    load_decrypt: Duration,
    apply: Duration,
    delta_wall: Duration,
    delta_bytes: u64,
    delta_items: u64,
    delta_store: Duration,
    delta_scanned: u64,
    delta_lo: Option<u64>,
}

/// A repository that keeps snapshots only when asked.
fn no_auto_snapshots() -> repository::Config {
    repository::Config {
        snapshot_every: 0,
        ..repository::Config::default()
    }
}

/// `n` Observations of `pid` written at `node` through its real write path
/// (Repository → seal → sled; 32 writers, as the repository bench), then
/// the sealed local snapshot a node keeps every `snapshot_every` changes
/// and on stop (which a snapshot transfer is made from): one resource id,
/// the write time and the snapshot time, with the repository.
async fn write_history(node: &Node, pid: PatientId, n: usize) -> (Repository, String, Duration, Duration) {
    let repo = Repository::new(node.clone(), no_auto_snapshots()).unwrap();
    let app = Actor::local_app("bench");
    let start = Instant::now();
    let mut tasks = Vec::new();
    let writers = 32.min(n);
    for w in 0..writers {
        let repo = repo.clone();
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let mut first = None;
            for i in (w..n).step_by(writers) {
                let r = repo.create(observation(i), Some(pid), app.clone()).await.unwrap();
                first.get_or_insert_with(|| r.id().to_owned());
            }
            first
        }));
    }
    let mut some_id = None;
    for t in tasks {
        if let Some(id) = t.await.unwrap() {
            some_id.get_or_insert(id);
        }
    }
    let write = start.elapsed();
    let start = Instant::now();
    repo.save_snapshots().await;
    (repo, some_id.unwrap(), write, start.elapsed())
}

/// Writes `n` Observations at A (32 writers, as the repository bench), then
/// a fresh B granted read on labs pulls them; then A writes one more.
async fn run(n: usize) -> Run {
    let mut patient = TestPatient::new().unwrap();
    let (a_key, a_node, a_dir) = Practice::open().await;
    let (b_key, b_node, b_dir) = Practice::open().await;
    let (_, items) = patient.onboard(a_node.practice_id(), Collection::Labs).unwrap();
    a_node.submit(patient.id(), items).await.unwrap();
    let b_practice = b_key.practice_id().unwrap();
    let (_, items) = patient
        .grant_with_share(b_practice, Collection::Labs, Access::Read)
        .unwrap();
    a_node.submit(patient.id(), items).await.unwrap();

    let pid = patient.id();
    let no_auto = no_auto_snapshots();
    let (repo, some_id, write, snapshot_save) = write_history(&a_node, pid, n).await;
    let app = Actor::local_app("bench");

    let a = Practice::start(a_key, a_node, a_dir).await;
    let transfer = a
        .backend
        .inner
        .snapshot_transfer(&pid, Collection::Labs)
        .await
        .unwrap()
        .map(|t| (t.sealed_doc.len(), t.headers.len(), t.count));
    let b = Practice::start(b_key, b_node, b_dir).await;
    let a_peer = a.sync.local_peer_id();
    b.sync
        .dial(a.sync.listen_addrs().await.unwrap().remove(0))
        .await
        .unwrap();
    a.backend.take();
    a.backend.take_split();
    let before = b.sync.status().await.unwrap();
    let a_before = a.sync.status().await.unwrap();
    let lo = lo_bytes();

    // 1. First sync: wall time to B holding all n envelopes readable, told
    // by B's events (polling `holdings`, a scan of every envelope entry,
    // would take the cores the sync needs).
    let mut events = b.node.subscribe();
    let start = Instant::now();
    let sync = {
        let b_sync = b.sync.clone();
        tokio::spawn(async move { b_sync.sync_now(a_peer).await.unwrap() })
    };
    // `MEDMESH_BENCH_WAIT=<s>` shortens the wait (diagnosing a stall).
    let wait = Duration::from_secs(
        std::env::var("MEDMESH_BENCH_WAIT")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(600),
    );
    let mut readable = 0usize;
    while readable < n {
        match tokio::time::timeout(wait, events.recv()).await {
            Ok(Ok(medmesh_node::Event::Readable { patient, ids, .. })) if patient == pid => readable += ids.len(),
            Ok(Ok(_)) => {}
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                readable = b.node.holdings(&pid).unwrap().readable as usize;
            }
            Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => {
                panic!(
                    "B never held all: {:?}; pending {:?}; {:?}",
                    b.node.holdings(&pid),
                    b.node.pending_count(),
                    b.sync.status().await
                )
            }
        }
    }
    let first = start.elapsed();
    let report = sync.await.unwrap();
    let synced = start.elapsed();
    assert!(b.node.holdings(&pid).unwrap().readable >= n as u64);
    let lo = lo_delta(lo);
    let after = b.sync.status().await.unwrap();
    let a_after = a.sync.status().await.unwrap();
    let (a_store, a_calls, _) = a.backend.take();
    let a_split = a.backend.take_split();

    // B's restore of A's transfer alone (again, after the sync): loading
    // the document, then rebuilding every envelope.
    let mut restore = None;
    if let Some(t) = a.backend.inner.snapshot_transfer(&pid, Collection::Labs).await.unwrap() {
        let headers = medmesh_sync::wire::decode_compact_headers(&t.headers, t.count).unwrap();
        let key = b.node.current_epoch_key(&pid, Collection::Labs).unwrap();
        let start = Instant::now();
        let doc = medmesh_crypto::SealedSnapshot::open(&key, &t.sealed_doc).unwrap();
        let changes = medmesh_node::records::RecordDoc::changes_of_saved(&doc).unwrap();
        let load = start.elapsed();
        drop(changes);
        let start = Instant::now();
        let r = b
            .node
            .restore_transfer(pid, Collection::Labs, &t.sealed_doc, &headers)
            .unwrap();
        assert_eq!((r.envelopes.len(), r.unrestored), (n, 0));
        restore = Some((load, start.elapsed()));
    }

    // B's first read: a cold load of the collection through a fresh
    // Repository (from the transfer's document if B kept it as its local
    // snapshot, else decrypt + Automerge apply of every change) + render one.
    let kept = b.node.load_snapshot(pid, Collection::Labs).unwrap().is_some();
    let b_repo = Repository::new(b.node.clone(), no_auto.clone()).unwrap();
    let start = Instant::now();
    b_repo.read("Observation", &some_id).await.unwrap();
    let first_read = start.elapsed();
    drop(b_repo);
    // For comparison, the same without a snapshot: decrypt only, then the
    // cold load replaying every change.
    b.node.drop_snapshot(pid, Collection::Labs).unwrap();
    let start = Instant::now();
    let load = b.node.load_collection(pid, Collection::Labs).await.unwrap();
    assert_eq!(load.changes.len(), n);
    let load_decrypt = start.elapsed();
    drop(load);
    let b_repo = Repository::new(b.node.clone(), no_auto.clone()).unwrap();
    let start = Instant::now();
    b_repo.read("Observation", &some_id).await.unwrap();
    let apply = start.elapsed();
    drop(b_repo);

    // 4. Delta: one more change at A; B pulls it (median of DELTAS rounds).
    // Nudges may pull it first, so count what B received from the end of
    // the write on, whichever request carried it.
    let mut rounds = Vec::new();
    for k in 0..DELTAS {
        repo.create(observation(n + k), Some(pid), app.clone()).await.unwrap();
        let d_before = b.sync.status().await.unwrap();
        a.backend.take();
        let lo_d = lo_bytes();
        let start = Instant::now();
        // Returns after a pull that started after the write (a nudge's pull
        // may have carried the item first).
        b.sync.sync_now(a_peer).await.unwrap();
        let wall = start.elapsed();
        assert!(
            b.node.holdings(&pid).unwrap().readable > (n + k) as u64,
            "delta not readable after sync_now"
        );
        let lo = lo_delta(lo_d);
        let d_after = b.sync.status().await.unwrap();
        let (store, _, scanned) = a.backend.take();
        rounds.push((
            wall,
            d_after.bytes_received - d_before.bytes_received,
            d_after.items_received - d_before.items_received,
            store,
            scanned,
            lo,
        ));
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let delta_wall = median(rounds.iter().map(|r| r.0).collect());
    let delta_store = median(rounds.iter().map(|r| r.3).collect());
    let mut bytes: Vec<u64> = rounds.iter().map(|r| r.1).collect();
    bytes.sort_unstable();
    let delta_bytes = bytes[bytes.len() / 2];
    let delta_items = rounds.iter().map(|r| r.2).max().unwrap_or(0);
    let delta_scanned = rounds.iter().map(|r| r.4).max().unwrap_or(0);
    let mut los: Vec<u64> = rounds.iter().filter_map(|r| r.5).collect();
    los.sort_unstable();
    let delta_lo = los.get(los.len() / 2).copied();

    a.sync.shutdown().await.unwrap();
    b.sync.shutdown().await.unwrap();
    drop(repo);
    Run {
        n,
        write,
        snapshot_save,
        restore,
        transfer,
        first,
        synced,
        kept,
        first_read,
        pages: report.pages,
        received: after.items_received - before.items_received,
        bytes: after.bytes_received - before.bytes_received,
        lo,
        a_store,
        a_split,
        a_calls,
        echo: (
            a_after.items_received - a_before.items_received,
            a_after.bytes_received - a_before.bytes_received,
        ),
        accepted: after.items_accepted - before.items_accepted,
        duplicates: (after.items_received - before.items_received)
            .saturating_sub(after.items_accepted - before.items_accepted),
        load_decrypt,
        apply,
        delta_wall,
        delta_bytes,
        delta_items,
        delta_store,
        delta_scanned,
        delta_lo,
    }
}

// ----- 2. raw libp2p request-response --------------------------------------------

/// Delta rounds per size (medians reported).
const DELTAS: usize = 5;

const RAW_PROTOCOL: StreamProtocol = StreamProtocol::new("/bench/raw/1");

/// Requests are a page size (u32 LE); responses are that many bytes.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = u32;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<u32>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut b = [0u8; 4];
        io.read_exact(&mut b).await?;
        Ok(u32::from_le_bytes(b))
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut buf = Vec::new();
        io.take(64 << 20).read_to_end(&mut buf).await?;
        Ok(buf)
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: u32) -> std::io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&req.to_le_bytes()).await
    }

    async fn write_response<T>(&mut self, _: &StreamProtocol, io: &mut T, resp: Vec<u8>) -> std::io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&resp).await
    }
}

type RawBehaviour = request_response::Behaviour<RawCodec>;

fn raw_swarm() -> libp2p::Swarm<RawBehaviour> {
    SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| {
            RawBehaviour::with_codec(
                RawCodec,
                [(RAW_PROTOCOL, ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(Duration::from_secs(120)),
            )
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build()
}

/// Moves `total` bytes in `pages` sequential request-response pages between
/// two fresh swarms on loopback; returns the time from the first request to
/// the last response (connection set up before) and loopback bytes.
async fn raw_transfer(total: u64, pages: u64) -> (Duration, Option<u64>) {
    let pages = pages.max(1);
    let page = (total / pages) as usize;
    let last = (total - page as u64 * (pages - 1)) as usize;
    let payload = Arc::new(vec![0x5au8; page.max(last)]);
    let mut server = raw_swarm();
    server.listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap()).unwrap();
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = server.select_next_some().await {
            break address;
        }
    };
    let server_peer = *server.local_peer_id();
    let serving = tokio::spawn(async move {
        loop {
            if let SwarmEvent::Behaviour(request_response::Event::Message {
                message: request_response::Message::Request { request, channel, .. },
                ..
            }) = server.select_next_some().await
            {
                let body = payload[..request as usize].to_vec();
                let _ = server.behaviour_mut().send_response(channel, body);
            }
        }
    });
    let mut client = raw_swarm();
    client
        .dial(addr.with(libp2p::multiaddr::Protocol::P2p(server_peer)))
        .unwrap();
    loop {
        if let SwarmEvent::ConnectionEstablished { .. } = client.select_next_some().await {
            break;
        }
    }
    let lo = lo_bytes();
    let start = Instant::now();
    let mut got = 0u64;
    for i in 0..pages {
        let size = if i + 1 == pages { last } else { page };
        client.behaviour_mut().send_request(&server_peer, size as u32);
        loop {
            match client.select_next_some().await {
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message: request_response::Message::Response { response, .. },
                    ..
                }) => {
                    got += response.len() as u64;
                    break;
                }
                SwarmEvent::Behaviour(request_response::Event::OutboundFailure { error, .. }) => {
                    panic!("raw request failed: {error}")
                }
                _ => {}
            }
        }
    }
    let elapsed = start.elapsed();
    let lo = lo_delta(lo);
    assert_eq!(got, total);
    serving.abort();
    (elapsed, lo)
}

// ----- report --------------------------------------------------------------------------

fn print_run(r: &Run, raw: (Duration, Option<u64>)) {
    let mbps = |bytes: u64, d: Duration| bytes as f64 / d.as_secs_f64() / 1e6;
    println!("\n== first sync of {} envelopes (~1 KiB Observations, labs) ==", r.n);
    println!(
        "  A wrote {} resources through its write path (32 writers) in {}, then kept a sealed local snapshot in {}",
        r.n,
        ms(r.write),
        ms(r.snapshot_save)
    );
    if let Some((doc, headers, count)) = r.transfer {
        println!(
            "  A's snapshot transfer: sealed document {}, compact headers {} ({} B/envelope) for {count} envelopes",
            mb(doc as f64),
            mb(headers as f64),
            headers / (count as usize).max(1)
        );
    }
    if let Some((load, all)) = r.restore {
        println!(
            "  B's restore of the transfer alone: {} (open + load the document and list its changes {})",
            ms(all),
            ms(load)
        );
    }
    println!(
        "  first sync by {}",
        if envelopes_only() {
            "envelopes only (MEDMESH_BENCH_ENVELOPES)"
        } else {
            "snapshot transfer where offered"
        }
    );
    println!(
        "  B pulled {} items in {} pages: {} to all {} envelopes readable",
        r.received,
        r.pages,
        ms(r.first),
        r.n
    );
    println!(
        "  bytes: items {} ({} B/envelope); loopback incl. framing, Noise, Yamux, TCP/IP, both directions: {}",
        mb(r.bytes as f64),
        r.bytes / r.received.max(1),
        opt_mb(r.lo)
    );
    println!(
        "  items received {}: accepted {}, not accepted (duplicates, pending) {} — pull pages and the grant-triggered reconciliation overlap",
        r.received, r.accepted, r.duplicates
    );
    println!(
        "  meanwhile A received {} items, {} back from B (B nudges A, which may read labs, and A pulls its own envelopes back)",
        r.echo.0,
        mb(r.echo.1 as f64)
    );
    println!(
        "  A's store time serving: {} ({:.0}% of the wall time): items_after {} ({} calls), envelopes (reconcile fetch) + snapshot transfers {}, record_disclosure {}",
        ms(r.a_store),
        100.0 * r.a_store.as_secs_f64() / r.first.as_secs_f64(),
        ms(r.a_split[0]),
        r.a_calls,
        ms(r.a_split[1]),
        ms(r.a_split[2])
    );
    println!(
        "  B's first read after the sync (cold Repository load + render one; transfer's document kept as B's snapshot: {}): {}; sync_now returned after {}",
        if r.kept { "yes" } else { "no" },
        ms(r.first_read),
        ms(r.synced)
    );
    println!(
        "  without a snapshot, for comparison: load_collection (read + decrypt {} changes) {}; cold Repository load (decrypt + Automerge apply + render one) {}",
        r.n,
        ms(r.load_decrypt),
        ms(r.apply)
    );
    println!(
        "  raw libp2p request-response, same {} in {} pages: {} ({:.1} MB/s), loopback {}",
        mb(r.bytes as f64),
        r.pages,
        ms(raw.0),
        mbps(r.bytes, raw.0),
        opt_mb(raw.1)
    );
    let ratio = raw.0.as_secs_f64() / r.first.as_secs_f64();
    println!(
        "  medmesh throughput {:.1} MB/s = {:.1}% of raw (target >= 50%: {})",
        mbps(r.bytes, r.first),
        100.0 * ratio,
        verdict(ratio >= 0.5)
    );
    println!(
        "  delta of 1 change (median of {DELTAS}): {} items, {} B of items, loopback {} B, A store time {} ({} items read), B sync_now after the write {}",
        r.delta_items,
        r.delta_bytes,
        r.delta_lo.map_or_else(|| "n/a".into(), |b| b.to_string()),
        ms(r.delta_store),
        r.delta_scanned,
        ms(r.delta_wall)
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    // Part 5 alone: `MEDMESH_BENCH_ONLY=anti_entropy` (with
    // `MEDMESH_BENCH_PATIENTS=100,1000` to choose the sizes).
    if std::env::var("MEDMESH_BENCH_ONLY").is_ok_and(|v| v == "anti_entropy") {
        for patients in anti_entropy_sizes(quick) {
            anti_entropy_cost(patients).await;
        }
        return;
    }
    let big: usize = std::env::var("MEDMESH_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 200 } else { 10_000 });
    let small = (big / 10).clamp(1, 1_000);
    let mut sizes = vec![small, big];
    if std::env::var_os("MEDMESH_BENCH_DELTA_100K").is_some() {
        sizes.push(100_000);
    }
    println!("sync bench: sizes {sizes:?} (MEDMESH_BENCH_N scales; MEDMESH_BENCH_DELTA_100K=1 adds 100k)");
    let mut runs = Vec::new();
    for &n in &sizes {
        let r = run(n).await;
        let raw = raw_transfer(r.bytes, r.pages).await;
        print_run(&r, raw);
        runs.push(r);
    }

    // 3. The peer to beat.
    let r = &runs[1];
    let t = r.first.as_secs_f64();
    println!("\n== the peer to beat: automerge-repo 2.5, fresh peer, 10k changes of ~1 KiB ==");
    println!(
        "  time:  medmesh {:.2} s ({} envelopes) vs ~{AM_REPO_SECS} s: {:.3}x (target <= 0.1: {})",
        t,
        r.n,
        t / AM_REPO_SECS,
        verdict(t / AM_REPO_SECS <= 0.1)
    );
    let read = r.synced.as_secs_f64() + r.first_read.as_secs_f64();
    println!(
        "         first sync + first read (sync_now returned, then a cold read): {read:.2} s: {:.3}x (without the kept snapshot, all readable + replaying cold load: {:.2} s)",
        read / AM_REPO_SECS,
        t + r.apply.as_secs_f64()
    );
    println!(
        "  bytes: medmesh {} items (loopback {}) vs ~{}: {:.2}x (target <= 2: {})",
        mb(r.bytes as f64),
        opt_mb(r.lo),
        mb(AM_REPO_BYTES),
        r.bytes as f64 / AM_REPO_BYTES,
        verdict(r.bytes as f64 / AM_REPO_BYTES <= 2.0)
    );
    if r.n != 10_000 {
        println!("  (scaled run: the reference is for 10k)");
    }

    // 4. Delta flatness.
    println!(
        "\n== delta of 1 change: after {} vs after larger histories ==",
        runs[0].n
    );
    let s = &runs[0];
    for l in &runs[1..] {
        let bytes = l.delta_bytes as f64 / s.delta_bytes.max(1) as f64;
        let store = l.delta_store.as_secs_f64() / s.delta_store.as_secs_f64().max(1e-9);
        let wall = l.delta_wall.as_secs_f64() / s.delta_wall.as_secs_f64().max(1e-9);
        println!(
            "  {} vs {}: bytes {} / {} B = {bytes:.2}x (target <= 1.5: {}); A store time {} / {} = {store:.2}x (target <= 1.5: {}); B wall {} / {} = {wall:.2}x",
            l.n,
            s.n,
            l.delta_bytes,
            s.delta_bytes,
            verdict(bytes <= 1.5),
            ms(l.delta_store),
            ms(s.delta_store),
            verdict(store <= 1.5),
            ms(l.delta_wall),
            ms(s.delta_wall),
        );
    }
    if !runs.iter().any(|r| r.n >= 100_000) {
        println!(
            "  100k not run by default (writing 100k resources through the write path takes ~5 min, the whole run ~9 min); MEDMESH_BENCH_DELTA_100K=1 or MEDMESH_BENCH_N=100000 adds it"
        );
    }

    // 5. Anti-entropy over records in step.
    for patients in anti_entropy_sizes(quick) {
        anti_entropy_cost(patients).await;
    }

    // 6. A practice that was down when the patient granted it (opt-in:
    // `MEDMESH_BENCH_BACK_ONLINE=1`; the process then hangs at exit in a
    // sled flush of a store dropped after `Node::close`, to be found).
    if std::env::var_os("MEDMESH_BENCH_BACK_ONLINE").is_some() {
        back_online(big).await;
    }
}

/// Issue 16: B is down when the patient grants it labs at A (A holds `n`
/// envelopes and a local snapshot); A owes B the grant. B comes back on its
/// address: time until A redelivers (B holds the grant) and until B holds
/// all `n` envelopes readable. A's first retry is due 2 s after the failed
/// push (the outbox's first backoff), so that is the floor.
async fn back_online(n: usize) {
    let mut patient = TestPatient::new().unwrap();
    let pid = patient.id();
    let (a_key, a_node, a_dir) = Practice::open().await;
    // B, down: a key and a port nothing listens on (what the patient passes).
    let b_key = SecretIdentity::generate().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let b_practice = b_key.practice_id().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let b_addr: libp2p::Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{}", b_practice.peer_id())
        .parse()
        .unwrap();
    let (_, items) = patient.onboard(a_node.practice_id(), Collection::Labs).unwrap();
    a_node.submit(pid, items).await.unwrap();
    write_history(&a_node, pid, n).await;
    let a = Practice::start(a_key, a_node, a_dir).await;

    // The patient grants B at A, passing B's address: A's push fails.
    let (_, items) = patient
        .grant_with_share(b_practice, Collection::Labs, Access::Read)
        .unwrap();
    let cli = SyncHandle::spawn(
        Config::client(),
        &patient.identity,
        Arc::new(medmesh_sync::memory::MemoryBackend::new()),
    )
    .await
    .unwrap();
    let a_peer = cli.dial(a.sync.listen_addrs().await.unwrap().remove(0)).await.unwrap();
    cli.push(a_peer, items, vec![b_addr.clone()]).await.unwrap();
    cli.shutdown().await.unwrap();
    while a.sync.status().await.unwrap().outbox < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // B back where it was.
    let b_node = Node::open(
        b_dir.path(),
        SecretIdentity::from_seed(&b_key.seed()),
        Default::default(),
    )
    .await
    .unwrap();
    let listen: libp2p::Multiaddr = b_addr
        .iter()
        .filter(|p| !matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
        .collect();
    let mut events = b_node.subscribe();
    let start = Instant::now();
    let config = Config {
        listen: vec![listen],
        pull_interval: Duration::from_secs(3600),
        ..Config::loopback_tcp()
    };
    let b_sync = SyncHandle::spawn(config, &b_key, NodeBackend::new(b_node.clone()))
        .await
        .unwrap();
    let mut granted = None;
    let mut readable = 0usize;
    while readable < n {
        match tokio::time::timeout(Duration::from_secs(600), events.recv()).await {
            Ok(Ok(medmesh_node::Event::Readable { patient, ids, .. })) if patient == pid => readable += ids.len(),
            Ok(Ok(_)) => {}
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                readable = b_node.holdings(&pid).unwrap().readable as usize;
            }
            Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => {
                panic!("B never completed after coming back: {:?}", b_node.holdings(&pid))
            }
        }
        if granted.is_none() && !b_node.grants(&pid).is_empty() {
            granted = Some(start.elapsed());
        }
    }
    let complete = start.elapsed();
    println!("\n== a practice down at grant time, back online ({n} envelopes owed by transfer or pages) ==");
    println!(
        "  from B's start: grant redelivered by A after {}, record complete after {} (A's first retry is due 2 s after its failed push)",
        granted.map_or_else(|| "n/a".to_owned(), ms),
        ms(complete)
    );
    // Stopped as a node process stops (actors first, then the stores).
    b_sync.shutdown().await.unwrap();
    b_node.close().await;
    a.sync.shutdown().await.unwrap();
    a.node.close().await;
}

/// The patient counts of part 5: `MEDMESH_BENCH_PATIENTS` (comma-separated),
/// else 100 quick and 1,000 under `cargo bench`.
fn anti_entropy_sizes(quick: bool) -> Vec<usize> {
    std::env::var("MEDMESH_BENCH_PATIENTS")
        .ok()
        .map(|v| {
            v.split(',')
                .filter_map(|n| n.trim().parse().ok())
                .collect::<Vec<usize>>()
        })
        .filter(|sizes| !sizes.is_empty())
        .unwrap_or_else(|| vec![if quick { 100 } else { 1_000 }])
}

/// CPU time the live threads of this process have run, in ns, from each
/// thread's `/proc/self/task/<tid>/schedstat` (threads that exit meanwhile
/// are missed; the runtime's and sled's threads live on).
fn process_cpu() -> Option<Duration> {
    let mut ns = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        ns += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(ns))
}

/// Anti-entropy (issue 16): `patients` patients whose labs A and B both
/// hold, in step (each granted A read-write and B read, two changes written
/// at A, pulled by B); then one round of B with A, which finds nothing to
/// fetch: bytes (items counted by sync, and loopback) and wall time per
/// patient, against the target of <= 1 KiB and <= 1 ms.
async fn anti_entropy_cost(patients: usize) {
    let (a_key, a_node, a_dir) = Practice::open().await;
    let (b_key, b_node, b_dir) = Practice::open().await;
    let b_practice = b_key.practice_id().unwrap();
    for _ in 0..patients {
        let mut patient = TestPatient::new().unwrap();
        let pid = patient.id();
        let (grant_a, items_a) = patient.onboard(a_node.practice_id(), Collection::Labs).unwrap();
        a_node.submit(pid, items_a).await.unwrap();
        let (_, items_b) = patient
            .grant_with_share(b_practice, Collection::Labs, Access::Read)
            .unwrap();
        a_node.submit(pid, items_b.clone()).await.unwrap();
        let mut at_b = items_b;
        at_b.push(Item::new(medmesh_sync::ItemKind::Grant, grant_a.encoded().to_vec()));
        b_node.submit(pid, at_b).await.unwrap();
        let mut labs = medmesh_node::testing::ChangeMaker::new(&a_key.public_bytes()).unwrap();
        for i in 0..2 {
            let change = labs.put(&format!("lab{i}"), "v").unwrap();
            a_node
                .write_change(pid, Collection::Labs, change.as_change())
                .await
                .unwrap();
        }
    }
    let a = Practice::start(a_key, a_node, a_dir).await;
    let b = Practice::start(b_key, b_node, b_dir).await;
    let a_peer = a.sync.local_peer_id();
    b.sync
        .dial(a.sync.listen_addrs().await.unwrap().remove(0))
        .await
        .unwrap();
    // In step: B pulled everything, and the round on connection ran.
    b.sync.sync_now(a_peer).await.unwrap();
    let settle = b.sync.anti_entropy(a_peer).await.unwrap();
    // Quiet: the consent flows of the setup (each node forwarding and
    // delivering the grants it was handed) done, no request in 0.5 s.
    let mut last = (u64::MAX, u64::MAX);
    loop {
        let (sa, sb) = (a.sync.status().await.unwrap(), b.sync.status().await.unwrap());
        let now = (sa.requests_sent, sb.requests_sent);
        if sa.outbox == 0 && sb.outbox == 0 && now == last {
            break;
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let before = b.sync.status().await.unwrap();
    let a_before = a.sync.status().await.unwrap();
    // Several rounds, averaged: a round over 100 patients is a few ms, as
    // long as the connection's own rounds and pulls that may overlap it.
    const ROUNDS: usize = 5;
    let lo = lo_bytes();
    let cpu = process_cpu();
    let start = Instant::now();
    let mut round = medmesh_sync::SyncReport::default();
    for _ in 0..ROUNDS {
        round.add(b.sync.anti_entropy(a_peer).await.unwrap());
    }
    let wall = start.elapsed() / ROUNDS as u32;
    let cpu = cpu.and_then(|c| Some(process_cpu()?.saturating_sub(c) / ROUNDS as u32));
    let lo = lo_delta(lo).map(|l| l / ROUNDS as u64);
    let after = b.sync.status().await.unwrap();
    let a_after = a.sync.status().await.unwrap();
    let items = (after.bytes_received - before.bytes_received) / ROUNDS as u64;
    let per = |x: f64| x / patients as f64;
    println!(
        "\n== anti-entropy: one round over {patients} patients in step (issue 16 target: <= 1 KiB and <= 1 ms per patient) =="
    );
    println!(
        "  settling round fetched {} items; the {ROUNDS} measured rounds: {} requests' answers, {} items fetched",
        settle.ingest.accepted, round.pages, round.ingest.accepted
    );
    println!(
        "  per patient and round: {:.0} B of items received (consent items answering a summary), loopback {} B both ways incl. framing, Noise, Yamux; wall {:.3} ms (both nodes in this process)",
        per(items as f64),
        lo.map_or_else(|| "n/a".to_owned(), |l| format!("{:.0}", per(l as f64))),
        per(wall.as_secs_f64() * 1e3)
    );
    println!(
        "  CPU (both nodes, every thread): {} ms per patient and round; in {ROUNDS} rounds B sent {} requests, A answered {}",
        cpu.map_or_else(|| "n/a".to_owned(), |c| format!("{:.4}", per(c.as_secs_f64() * 1e3))),
        after.requests_sent - before.requests_sent,
        a_after.requests_received - a_before.requests_received
    );
    println!(
        "  bytes target: {}; time target: {}",
        verdict(lo.map_or(per(items as f64), |l| per(l as f64)) <= 1024.0),
        verdict(per(wall.as_secs_f64() * 1e3) <= 1.0)
    );
    b.sync.shutdown().await.unwrap();
    a.sync.shutdown().await.unwrap();
    b.node.close().await;
    a.node.close().await;
}
