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

use medmesh_crypto::{Collection, Envelope, Principal, SecretIdentity, now};
use medmesh_node::item::Item;
use medmesh_node::store::{Batch, EnvelopeEntry, ItemKind, SledStore, Store};
use medmesh_node::testing::{ChangeMaker, FlushControl, OwnedChange, TestPatient};
use medmesh_node::{Config, Node, Source};

const WRITERS: usize = 64;
/// fsync latency modelled for a disk slower than this machine's (cloud block
/// volume, spinning disk).
const SLOW_FSYNC: Duration = Duration::from_millis(2);

const CORE: Collection = Collection::Core;

fn changes_for(node_key: &[u8; 32], n: usize) -> Vec<OwnedChange> {
    let mut maker = ChangeMaker::new(node_key).unwrap();
    (0..n)
        .map(|i| maker.put("k", &format!("value {i} {}", "x".repeat(200))).unwrap())
        .collect()
}

/// On-CPU time used so far by this process's threads, by thread name (from
/// /proc schedstat): a figure that load from other processes barely moves.
fn thread_cpu() -> std::collections::BTreeMap<String, Duration> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(task.path().join("comm")),
            std::fs::read_to_string(task.path().join("schedstat")),
        ) else {
            continue;
        };
        let ns: u64 = stat.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
        let name = comm
            .trim()
            .trim_end_matches(|c: char| c.is_ascii_digit() || c == '-')
            .to_string();
        *out.entry(name).or_default() += Duration::from_nanos(ns);
    }
    out
}

/// Writes `per_writer` changes from each of 64 tasks; returns writes/s.
async fn durable_writes(config: Config, per_writer: usize) -> f64 {
    durable_writes_on(config, per_writer, false).await.0
}

/// Also returns the CPU time each kind of thread used during the writes.
async fn durable_writes_on(
    config: Config,
    per_writer: usize,
    slow: bool,
) -> (f64, std::collections::BTreeMap<String, Duration>) {
    let dir = tempfile::tempdir().unwrap();
    let identity = SecretIdentity::generate().unwrap();
    let key = identity.public_bytes();
    let node = if slow {
        let store = FlushControl::new(SledStore::open(dir.path()).unwrap(), SLOW_FSYNC);
        Node::with_store(Arc::new(store), identity, config).await.unwrap()
    } else {
        Node::open(dir.path(), identity, config).await.unwrap()
    };
    let mut patient = TestPatient::new().unwrap();
    let (_, items) = patient.onboard(node.practice_id(), CORE).unwrap();
    node.submit(patient.id(), items).await.unwrap();
    let work: Vec<Vec<OwnedChange>> = (0..WRITERS).map(|_| changes_for(&key, per_writer)).collect();
    let cpu_before = thread_cpu();
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
    let cpu = thread_cpu()
        .into_iter()
        .map(|(name, t)| {
            let used = t.saturating_sub(cpu_before.get(&name).copied().unwrap_or_default());
            (name, used)
        })
        .collect();
    node.close().await;
    ((WRITERS * per_writer) as f64 / elapsed.as_secs_f64(), cpu)
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
                let e = Envelope::seal(
                    (key.patient, key.collection),
                    &key,
                    &identity,
                    Some(grant),
                    c.as_change(),
                    now(),
                )
                .unwrap();
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
    let page: Vec<Item> = a
        .items_after(0, n + 10)
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.meta.kind == ItemKind::Envelope)
        .map(|i| Item::new(ItemKind::Envelope, i.item.bytes))
        .collect();
    assert_eq!(page.len(), n);
    let b = Node::open(db.path(), SecretIdentity::generate().unwrap(), Config::default())
        .await
        .unwrap();
    let share = patient.share(CORE, 0, Principal::Practice(b.practice_id())).unwrap();
    b.submit(
        patient.id(),
        vec![
            Item::new(ItemKind::Grant, grant.encoded().to_vec()),
            Item::new(ItemKind::KeyShare, share.encoded().to_vec()),
        ],
    )
    .await
    .unwrap();
    let start = Instant::now();
    let report = b.ingest(page, Source::Peer(a.practice_id().peer_id())).await.unwrap();
    let elapsed = start.elapsed();
    assert_eq!(report.counts.readable, n as u64, "{report:?}");
    (n as f64 / elapsed.as_secs_f64(), elapsed)
}

/// The committer's share of a write: `Store::commit_group` of groups of
/// 64 write batches (item + audit entry) as `Node::write_change` builds them,
/// no flush; returns time per write.
fn append_only(groups: usize) -> Duration {
    use medmesh_node::audit::{Action, ActorKind, AuditRecord};
    use medmesh_node::store::{EnvelopeState, ItemMeta, Op};
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let identity = SecretIdentity::generate().unwrap();
    let mut patient = TestPatient::new().unwrap();
    let key = patient.key(CORE, 0).unwrap();
    let grant = medmesh_crypto::GrantId::generate().unwrap();
    let changes = changes_for(&identity.public_bytes(), groups * WRITERS);
    let batches: Vec<Batch> = changes
        .iter()
        .map(|c| {
            let e = Envelope::seal(
                (key.patient, key.collection),
                &key,
                &identity,
                Some(grant),
                c.as_change(),
                now(),
            )
            .unwrap();
            let h = e.header();
            let meta = ItemMeta {
                kind: ItemKind::Envelope,
                id: e.id().into(),
                patient: h.patient,
                collection: Some(h.collection),
                grant: h.grant_id,
                principal: Some(h.author),
            };
            let entry = EnvelopeEntry {
                id: e.id(),
                patient: h.patient,
                collection: h.collection,
                state: EnvelopeState::Readable,
                epoch: h.epoch,
                key_id: h.key_id,
                grant: h.grant_id,
                actor: h.actor,
                change_seq: h.seq,
                created_at: h.created_at,
                seq: 0,
            };
            let mut batch = Batch::new();
            batch.push(Op::PutItem {
                meta,
                bytes: e.encode(),
                envelope: Some(Box::new(entry)),
            });
            batch.push(Op::Audit(AuditRecord {
                actor_kind: ActorKind::Node,
                actor_id: "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN".into(),
                action: Action::Write,
                patient: Some(h.patient),
                items: vec![e.id().into()],
                grant: h.grant_id,
                outcome: "ok".into(),
            }));
            batch
        })
        .collect();
    let cpu = || -> Duration {
        // On-CPU nanoseconds of this thread: load on the machine barely moves it.
        let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
        Duration::from_nanos(s.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0))
    };
    let (start, cpu_start) = (Instant::now(), cpu());
    for group in batches.chunks(WRITERS) {
        let refs: Vec<&Batch> = group.iter().collect();
        store.commit_group(&refs).unwrap();
    }
    let n = (groups * WRITERS) as u32;
    let (per, per_cpu) = (start.elapsed() / n, (cpu() - cpu_start) / n);
    println!("append only (commit_group of {WRITERS}, no flush): {per:?} per write, {per_cpu:?} on-CPU");
    per_cpu
}

fn main() {
    // `cargo test --benches` runs benches with --bench absent: do a quick smoke run then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let (group_per, single_per, raw_per, page) = if quick { (2, 1, 2, 50) } else { (150, 16, 150, 1000) };
    let rt = tokio::runtime::Runtime::new().unwrap();
    if let Ok(n) = std::env::var("MEDMESH_BENCH_APPEND_ONLY") {
        append_only(n.parse().unwrap());
        return;
    }
    if let Ok(n) = std::env::var("MEDMESH_BENCH_GROUP_ONLY") {
        let n: usize = n.parse().unwrap();
        rt.block_on(async {
            let (rate, cpu) = durable_writes_on(Config::default(), n, false).await;
            println!("group commit {rate:.0} writes/s; CPU per write by thread:");
            for (name, used) in cpu {
                println!(
                    "  {name:<18} {:>6.1} us",
                    used.as_secs_f64() * 1e6 / (n * WRITERS) as f64
                );
            }
        });
        return;
    }
    rt.block_on(async {
        // Warm up (first sled files, thread pools, allocator).
        durable_writes(Config::default(), 10).await;
        let (group, cpu) = durable_writes_on(Config::default(), group_per, false).await;
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
        let cpu: Vec<String> = cpu
            .into_iter()
            .filter(|(_, t)| !t.is_zero())
            .map(|(name, t)| format!("{name} {:.1}", t.as_secs_f64() * 1e6 / (group_per * WRITERS) as f64))
            .collect();
        println!("  group commit CPU per write by thread (us): {}", cpu.join(", "));
        let per_write = Config {
            group_commit_max: 1,
            ..Config::default()
        };
        let slow_group = durable_writes_on(Config::default(), group_per, true).await.0;
        let slow_single = durable_writes_on(per_write, single_per, true).await.0;
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
