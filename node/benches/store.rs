//! Store benchmarks (issue 4), printed as figures:
//! 1. durable writes, 64 concurrent writers: group commit vs one flush per write;
//! 2. the write path (seal + durable append) vs raw (AEAD seal + unflushed
//!    sled insert), same run, same 64 writers;
//! 3. ingest of a page of 1,000 envelopes (verify + decrypt + store).
//!
//! Run with `cargo bench -p medmesh-node --bench store`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use medmesh_crypto::{Collection, Envelope, PatientId, Principal, SecretIdentity, now};
use medmesh_node::store::{
    Batch, Committed, Cursor, EnvelopeEntry, InstanceId, ItemId, ItemKind, PendingItem, PendingReason, Rejection, Seq,
    SledStore, Store, StoredItem,
};
use medmesh_node::testing::{ChangeMaker, OwnedChange, TestPatient};
use medmesh_node::{Config, Incoming, Node, Source};

const WRITERS: usize = 64;
/// fsync latency modelled for a disk slower than this machine's (cloud block
/// volume, spinning disk).
const SLOW_FSYNC: Duration = Duration::from_millis(2);

/// SledStore whose flush also waits [`SLOW_FSYNC`].
struct SlowFlush(SledStore);

impl Store for SlowFlush {
    fn instance_id(&self) -> InstanceId {
        self.0.instance_id()
    }
    fn commit(&self, batch: &Batch) -> medmesh_node::Result<Committed> {
        self.0.commit(batch)
    }
    fn commit_group(&self, batches: &[&Batch]) -> medmesh_node::Result<Vec<Committed>> {
        self.0.commit_group(batches)
    }
    fn flush(&self) -> medmesh_node::Result<()> {
        self.0.flush()?;
        std::thread::sleep(SLOW_FSYNC);
        Ok(())
    }
    fn last_seq(&self) -> Seq {
        self.0.last_seq()
    }
    fn contains(&self, id: &ItemId) -> medmesh_node::Result<bool> {
        self.0.contains(id)
    }
    fn item(&self, id: &ItemId) -> medmesh_node::Result<Option<StoredItem>> {
        self.0.item(id)
    }
    fn items_after(&self, after: Seq, limit: usize) -> medmesh_node::Result<Vec<StoredItem>> {
        self.0.items_after(after, limit)
    }
    fn consent_items(&self) -> medmesh_node::Result<Vec<StoredItem>> {
        self.0.consent_items()
    }
    fn envelopes(&self, p: &PatientId, c: Option<Collection>) -> medmesh_node::Result<Vec<EnvelopeEntry>> {
        self.0.envelopes(p, c)
    }
    fn patients(&self) -> medmesh_node::Result<Vec<PatientId>> {
        self.0.patients()
    }
    fn pending(&self, reason: Option<PendingReason>) -> medmesh_node::Result<Vec<PendingItem>> {
        self.0.pending(reason)
    }
    fn rejected(&self, key: &[u8; 32]) -> medmesh_node::Result<Option<Rejection>> {
        self.0.rejected(key)
    }
    fn rejected_count(&self) -> medmesh_node::Result<u64> {
        self.0.rejected_count()
    }
    fn cursor(&self, peer: &[u8]) -> medmesh_node::Result<Option<Cursor>> {
        self.0.cursor(peer)
    }
    fn audit_raw(&self, from: u64) -> medmesh_node::Result<Vec<(u64, Vec<u8>)>> {
        self.0.audit_raw(from)
    }
    fn raw_item_bytes(&self, id: &ItemId) -> medmesh_node::Result<Option<Vec<u8>>> {
        self.0.raw_item_bytes(id)
    }
    fn raw_replace_item_bytes(&self, id: &ItemId, bytes: &[u8]) -> medmesh_node::Result<()> {
        self.0.raw_replace_item_bytes(id, bytes)
    }
    fn raw_replace_audit(&self, seq: u64, bytes: &[u8]) -> medmesh_node::Result<()> {
        self.0.raw_replace_audit(seq, bytes)
    }
}
const CORE: Collection = Collection::Core;

fn changes_for(node_key: &[u8; 32], n: usize) -> Vec<OwnedChange> {
    let mut maker = ChangeMaker::new(node_key).unwrap();
    (0..n)
        .map(|i| maker.put("k", &format!("value {i} {}", "x".repeat(200))).unwrap())
        .collect()
}

/// Writes `per_writer` changes from each of 64 tasks; returns writes/s.
async fn durable_writes(config: Config, per_writer: usize) -> f64 {
    durable_writes_on(config, per_writer, false).await
}

async fn durable_writes_on(config: Config, per_writer: usize, slow: bool) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let identity = SecretIdentity::generate().unwrap();
    let key = identity.public_bytes();
    let node = if slow {
        let store = SlowFlush(SledStore::open(dir.path()).unwrap());
        Node::with_store(Arc::new(store), identity, config).await.unwrap()
    } else {
        Node::open(dir.path(), identity, config).await.unwrap()
    };
    let mut patient = TestPatient::new().unwrap();
    let (_, items) = patient.onboard(node.practice_id(), CORE).unwrap();
    node.submit(patient.id(), items).await.unwrap();
    let work: Vec<Vec<OwnedChange>> = (0..WRITERS).map(|_| changes_for(&key, per_writer)).collect();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for changes in work {
        let node = node.clone();
        let p = patient.id();
        tasks.push(tokio::spawn(async move {
            for c in &changes {
                node.write_change(p, CORE, c.as_change()).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = start.elapsed();
    node.close().await;
    (WRITERS * per_writer) as f64 / elapsed.as_secs_f64()
}

/// Raw: AEAD seal + sign + unflushed sled insert, 64 tasks; returns writes/s.
async fn raw_writes(per_writer: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path()).unwrap();
    let tree = db.open_tree("raw").unwrap();
    let identity = Arc::new(SecretIdentity::generate().unwrap());
    let mut patient = TestPatient::new().unwrap();
    let key = patient.key(CORE, 0).unwrap();
    let grant = medmesh_crypto::GrantId::generate().unwrap();
    let work: Vec<Vec<OwnedChange>> = (0..WRITERS)
        .map(|_| changes_for(&identity.public_bytes(), per_writer))
        .collect();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for changes in work {
        let tree = tree.clone();
        let key = key.clone();
        let identity = identity.clone();
        tasks.push(tokio::spawn(async move {
            for c in &changes {
                let e = Envelope::seal(&key, &identity, Some(grant), c.as_change(), now()).unwrap();
                tree.insert(e.id().0, e.encode()).unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (WRITERS * per_writer) as f64 / start.elapsed().as_secs_f64()
}

/// A page of `n` envelopes written by A, ingested by a fresh B that holds
/// A's grant and its own key share; returns (envelopes/s, time per page).
async fn ingest_page(n: usize) -> (f64, Duration) {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a_identity = SecretIdentity::generate().unwrap();
    let a_key = a_identity.public_bytes();
    let a = Node::open(da.path(), a_identity, Config::default()).await.unwrap();
    let mut patient = TestPatient::new().unwrap();
    let (grant, items) = patient.onboard(a.practice_id(), CORE).unwrap();
    a.submit(patient.id(), items).await.unwrap();
    let changes = changes_for(&a_key, n);
    let mut tasks = Vec::new();
    for chunk in changes.chunks(n.div_ceil(WRITERS)) {
        let a = a.clone();
        let chunk = chunk.to_vec();
        let p = patient.id();
        tasks.push(tokio::spawn(async move {
            for c in &chunk {
                a.write_change(p, CORE, c.as_change()).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let page: Vec<Incoming> = a
        .items_after(0, n + 10)
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.meta.kind == ItemKind::Envelope)
        .map(|i| Incoming::new(ItemKind::Envelope, i.bytes))
        .collect();
    assert_eq!(page.len(), n);
    let b = Node::open(db.path(), SecretIdentity::generate().unwrap(), Config::default())
        .await
        .unwrap();
    let share = patient.share(CORE, 0, Principal::Practice(b.practice_id())).unwrap();
    b.submit(
        patient.id(),
        vec![
            Incoming::new(ItemKind::Grant, grant.encoded().to_vec()),
            Incoming::new(ItemKind::KeyShare, share.encoded().to_vec()),
        ],
    )
    .await
    .unwrap();
    let start = Instant::now();
    let report = b.ingest(page, Source::Peer(a.practice_id().peer_id())).await.unwrap();
    let elapsed = start.elapsed();
    assert_eq!(report.readable, n, "{report:?}");
    (n as f64 / elapsed.as_secs_f64(), elapsed)
}

fn main() {
    // `cargo test --benches` runs benches with --bench absent: do a quick smoke run then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let (group_per, single_per, raw_per, page) = if quick { (2, 1, 2, 50) } else { (40, 4, 40, 1000) };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let group = durable_writes(Config::default(), group_per).await;
        let single = durable_writes(
            Config {
                group_commit_max: 1,
                ..Config::default()
            },
            single_per,
        )
        .await;
        println!("durable writes, {WRITERS} concurrent writers:");
        println!("  group commit            {group:>10.0} writes/s");
        println!("  one flush per write     {single:>10.0} writes/s");
        println!("  ratio                   {:>10.1}x  (target >= 10x)", group / single);
        let per_write = Config {
            group_commit_max: 1,
            ..Config::default()
        };
        let slow_group = durable_writes_on(Config::default(), group_per, true).await;
        let slow_single = durable_writes_on(per_write, single_per, true).await;
        println!("same, with a modelled {SLOW_FSYNC:?} fsync (flush sleeps after sled's fsync):");
        println!("  group commit            {slow_group:>10.0} writes/s");
        println!("  one flush per write     {slow_single:>10.0} writes/s");
        println!("  ratio                   {:>10.1}x", slow_group / slow_single);
        let raw = raw_writes(raw_per).await;
        let path = durable_writes(Config::default(), raw_per).await;
        println!("write path vs raw, {WRITERS} concurrent writers, same run:");
        println!("  raw seal + unflushed sled insert {raw:>10.0} writes/s");
        println!("  seal + durable append            {path:>10.0} writes/s");
        println!(
            "  write path / raw                 {:>10.1} %  (target >= 25 %)",
            100.0 * path / raw
        );
        let mut rates = Vec::new();
        for _ in 0..3 {
            let (rate, elapsed) = ingest_page(page).await;
            println!("ingest of a page of {page} envelopes: {elapsed:?} ({rate:.0} envelopes/s)");
            rates.push(rate);
        }
        rates.sort_by(f64::total_cmp);
        println!("  median {:.0} envelopes/s", rates[rates.len() / 2]);
    });
}
