//! Repository benchmarks, printed as figures (issue 5):
//! 1. a patient with 1,000 resources written through the node's write path:
//!    cold load (full replay, and from a sealed snapshot), `$everything` cold
//!    and warm;
//! 2. scale: N patients × 20 resources (default 10,000; `MEDMESH_BENCH_PATIENTS`
//!    scales it), built by a direct path that still makes real envelopes
//!    (patient-authored, sealed and signed, stored with real key shares):
//!    disk size vs plaintext JSON, then in a fresh process RSS after open and
//!    after the first read, and open-to-first-read time. One change per
//!    resource by default (an EMR writing as it goes); `MEDMESH_BENCH_IMPORT=1`
//!    one change per patient and collection (a practice importing its patients'
//!    Bundles as transactions).
//! 3. transaction import: a 5,000-resource patient Bundle's writes as one
//!    `Repository::transaction` (one change per document, one atomic durable
//!    batch) against the same writes entry by entry (one durable write each,
//!    what a transaction cost before) and against the record documents' raw
//!    write path (no node): resources/s, envelopes, and store bytes per resource.
//!
//! Run with `cargo bench -p medmesh-node --bench repository`;
//! `MEDMESH_BENCH_ONLY=thousand,scale,import` picks parts (default: all).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use medmesh_crypto::{ActorId, Change, Collection, Envelope, PatientId, Principal, SecretIdentity, now};
use medmesh_node::records::{self, RecordDoc};
use medmesh_node::repository::{self, Repository};
use medmesh_node::store::{Batch, EnvelopeEntry, EnvelopeState, ItemId, ItemKind, ItemMeta, Op, Store};
use medmesh_node::testing::TestPatient;
use medmesh_node::{Actor, Config, Node};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const NODE_SEED: [u8; 32] = [9; 32];
const PER_PATIENT: usize = 20;
static LOGICAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static CHANGE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn ms(d: Duration) -> String {
    format!("{:>8.1} ms", d.as_secs_f64() * 1e3)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}

fn patient_json(did: &str, i: usize) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": did},
                       {"system": "http://hospital.example/mrn", "value": format!("MRN{i:08}")}],
        "name": [{"family": format!("Family{i}"), "given": ["Given", "Middle"]}],
        "gender": if i.is_multiple_of(2) { "female" } else { "male" },
        "birthDate": format!("19{:02}-{:02}-{:02}", 40 + i % 60, 1 + i % 12, 1 + i % 28),
        "address": [{"line": [format!("{} Main Street", i % 999)], "city": "Springfield", "postalCode": "12345"}]
    })
}

/// A realistic small mix: vitals and labs, conditions, encounters,
/// medications, immunizations, allergies, procedures, reports.
fn resource(i: usize, patient_ref: &str) -> Value {
    let date = format!("2024-{:02}-{:02}T09:{:02}:00Z", 1 + i % 12, 1 + i % 28, i % 60);
    let subject = json!({"reference": patient_ref});
    match i % 10 {
        0 | 5 => json!({
            "resourceType": "Observation", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
            "subject": subject, "effectiveDateTime": date,
            "valueQuantity": {"value": 60 + i % 40, "unit": "beats/minute", "system": "http://unitsofmeasure.org", "code": "/min"}
        }),
        1 => json!({
            "resourceType": "Observation", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0", "display": "Glucose [Mass/volume] in Blood"}]},
            "subject": subject, "effectiveDateTime": date,
            "valueQuantity": {"value": serde_json::from_str::<Value>(&format!("{}.{}0", 70 + i % 50, i % 10)).unwrap(), "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
            "referenceRange": [{"low": {"value": 70, "unit": "mg/dL"}, "high": {"value": 99, "unit": "mg/dL"}}]
        }),
        2 => json!({
            "resourceType": "Condition",
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
            "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006", "display": "Diabetes mellitus type 2"}]},
            "subject": subject, "onsetDateTime": date
        }),
        3 => json!({
            "resourceType": "Encounter", "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "type": [{"coding": [{"system": "http://snomed.info/sct", "code": "185349003", "display": "Encounter for check up"}]}],
            "subject": subject, "period": {"start": date, "end": date}
        }),
        4 => json!({
            "resourceType": "MedicationRequest", "status": "active", "intent": "order",
            "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "860975", "display": "metformin 500 MG Oral Tablet"}]},
            "subject": subject, "authoredOn": date,
            "dosageInstruction": [{"text": "1 tablet twice daily", "timing": {"repeat": {"frequency": 2, "period": 1, "periodUnit": "d"}}}]
        }),
        6 => json!({
            "resourceType": "Immunization", "status": "completed",
            "vaccineCode": {"coding": [{"system": "http://hl7.org/fhir/sid/cvx", "code": "140", "display": "Influenza, seasonal"}]},
            "patient": subject, "occurrenceDateTime": date, "primarySource": true
        }),
        7 => json!({
            "resourceType": "AllergyIntolerance",
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}]},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "91936005", "display": "Allergy to penicillin"}]},
            "patient": subject, "recordedDate": date
        }),
        8 => json!({
            "resourceType": "Procedure", "status": "completed",
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "73761001", "display": "Colonoscopy"}]},
            "subject": subject, "performedDateTime": date
        }),
        _ => json!({
            "resourceType": "DiagnosticReport", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "24323-8", "display": "Comprehensive metabolic panel"}]},
            "subject": subject, "effectiveDateTime": date, "issued": date,
            "conclusion": "Within normal limits"
        }),
    }
}

// ----- 1. one patient with 1,000 resources --------------------------------

async fn thousand(quick: bool) {
    let n = if quick { 100 } else { 1_000 };
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(dir.path(), SecretIdentity::generate().unwrap(), Config::default())
        .await
        .unwrap();
    let mut patient = TestPatient::new().unwrap();
    for c in [Collection::Core, Collection::Labs, Collection::Medications] {
        let (_, items) = patient.onboard(node.practice_id(), c).unwrap();
        node.submit(patient.id(), items).await.unwrap();
    }
    let no_auto = repository::Config {
        snapshot_every: 0,
        ..repository::Config::default()
    };
    let repo = Repository::new(node.clone(), no_auto.clone()).unwrap();
    let app = Actor::local_app("bench");
    let p = repo
        .create(patient_json(&patient.id().to_string(), 0), None, app.clone())
        .await
        .unwrap();
    let patient_ref = format!("Patient/{}", p.id());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..32 {
        let repo = repo.clone();
        let app = app.clone();
        let patient_ref = patient_ref.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..n - 1).step_by(32) {
                repo.create(resource(i, &patient_ref), None, app.clone()).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    println!(
        "one patient, {n} resources written through the node write path (32 writers) in {:?}",
        start.elapsed()
    );
    for c in Collection::ALL {
        node.drop_snapshot(patient.id(), c).unwrap();
    }
    let fresh = Repository::new(node.clone(), no_auto.clone()).unwrap();
    let start = Instant::now();
    let all = fresh.patient_resources(patient.id()).await.unwrap();
    let cold_replay = start.elapsed();
    assert_eq!(all.len(), n);
    repo.save_snapshots().await;
    let fresh = Repository::new(node.clone(), no_auto.clone()).unwrap();
    let start = Instant::now();
    let all = fresh.patient_resources(patient.id()).await.unwrap();
    let cold_snapshot = start.elapsed();
    assert_eq!(all.len(), n);
    let fresh = Repository::new(node.clone(), no_auto.clone()).unwrap();
    let start = Instant::now();
    let everything = fresh.everything(p.id()).await.unwrap();
    let everything_cold = start.elapsed();
    assert_eq!(everything.len(), n);
    let mut warm = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let everything = fresh.everything(p.id()).await.unwrap();
        let bytes: usize = everything.iter().map(|r| r.bytes.len()).sum();
        std::hint::black_box(bytes);
        warm.push(start.elapsed());
    }
    warm.sort();
    // Cached read through the repository (Type/id → index → LRU → document
    // → rendered bytes) vs a HashMap<String, Value> lookup + serde_json::to_vec.
    let ids: Vec<(String, String)> = everything
        .iter()
        .map(|r| (r.resource_type().to_owned(), r.id().to_owned()))
        .collect();
    let map: std::collections::HashMap<String, Value> =
        everything.iter().map(|r| (r.key.clone(), r.json.clone())).collect();
    let keys: Vec<String> = everything.iter().map(|r| r.key.clone()).collect();
    let reads = if quick { 2_000 } else { 200_000 };
    let start = Instant::now();
    let mut total = 0;
    for i in 0..reads {
        let (t, id) = &ids[i % ids.len()];
        total += fresh.read(t, id).await.unwrap().bytes.len();
    }
    let repo_read = start.elapsed();
    let start = Instant::now();
    for i in 0..reads {
        total += serde_json::to_vec(map.get(&keys[i % keys.len()]).unwrap())
            .unwrap()
            .len();
    }
    let map_read = start.elapsed();
    std::hint::black_box(total);
    println!(
        "  cached Repository::read {:.0} ns vs HashMap + serde_json::to_vec {:.0} ns: {:.2}x (target <= 2x)",
        repo_read.as_nanos() as f64 / reads as f64,
        map_read.as_nanos() as f64 / reads as f64,
        repo_read.as_secs_f64() / map_read.as_secs_f64()
    );
    println!("  cold load of the patient, full replay   {}", ms(cold_replay));
    println!("  cold load of the patient, from snapshot {}", ms(cold_snapshot));
    println!("  $everything, cold (snapshots)           {}", ms(everything_cold));
    println!(
        "  $everything, warm (median of 5)         {:>8.1} µs",
        warm[2].as_secs_f64() * 1e6
    );
    node.close().await;
}

// ----- 2. scale -------------------------------------------------------------

/// `MEDMESH_BENCH_IMPORT=1`: each patient's resources written as a FHIR
/// transaction import writes them (one change per collection), instead of
/// one change per resource.
fn imported() -> bool {
    std::env::var_os("MEDMESH_BENCH_IMPORT").is_some()
}

/// Everything one patient contributes: items to store and resource keys.
struct Built {
    batch: Batch,
    keys: Vec<(PatientId, Collection, String)>,
    json_bytes: u64,
}

fn build_patient(i: usize, node: &Principal) -> Built {
    let mut seed = [0u8; 32];
    seed.copy_from_slice(&Sha256::digest(format!("bench patient {i}")));
    let mut patient = TestPatient::from_seed(&seed);
    let pid = patient.id();
    let author = patient.identity.public_bytes();
    let actor = ActorId::generate(&author).unwrap();
    let am_actor = records::actor_id(&author, actor.0[16..].try_into().unwrap());
    let mut docs: std::collections::HashMap<Collection, RecordDoc> = std::collections::HashMap::new();
    let mut built = Built {
        batch: Batch::new(),
        keys: Vec::new(),
        json_bytes: 0,
    };
    let mut used: std::collections::BTreeSet<Collection> = std::collections::BTreeSet::new();
    let patient_id = format!("p{i:06}");
    let mut resources = vec![(patient_id.clone(), patient_json(&pid.to_string(), i))];
    for k in 0..PER_PATIENT - 1 {
        resources.push((
            format!("r{i:06}x{k:02}"),
            resource(i * 7 + k, &format!("Patient/{patient_id}")),
        ));
    }
    let time = now();
    // (collection, raw change bytes, change hash) in write order.
    let mut changes = Vec::new();
    if imported() {
        // As `fhir import` of the patient's Bundle: one transaction, one change per collection.
        let mut by_collection: std::collections::BTreeMap<Collection, Vec<(String, Value)>> = Default::default();
        for (id, r) in resources {
            built.json_bytes += serde_json::to_vec(&r).unwrap().len() as u64;
            by_collection
                .entry(records::collection_of(&r))
                .or_default()
                .push((id, r));
        }
        for (collection, resources) in by_collection {
            let edits: Vec<records::doc::Edit<'_>> = resources
                .iter()
                .map(|(id, resource)| records::doc::Edit::Create { id, resource })
                .collect();
            let doc = docs.entry(collection).or_default();
            let made = doc.edit(&am_actor, time as i64, &edits).unwrap();
            let change = made.change.unwrap();
            for (id, resource) in &resources {
                let key = records::resource_key(resource["resourceType"].as_str().unwrap(), id).unwrap();
                built.keys.push((pid, collection, key));
            }
            changes.push((collection, change.change, change.hash));
        }
    } else {
        // As an EMR screen writes: one resource per change.
        for (id, r) in resources {
            built.json_bytes += serde_json::to_vec(&r).unwrap().len() as u64;
            let collection: Collection = records::collection_of(&r);
            let doc = docs.entry(collection).or_default();
            let w = doc.create(&am_actor, time as i64, &id, &r).unwrap();
            built.keys.push((pid, collection, w.key));
            changes.push((collection, w.change, w.hash));
        }
    }
    for (collection, raw, hash) in changes {
        let key = patient.key(collection, 0).unwrap();
        let change = medmesh_node::records::DecodedChange::from_bytes(&raw).unwrap();
        // As the repository seals it.
        let sealed_bytes = change.compressed_bytes();
        let e = Envelope::seal(
            (key.patient, key.collection),
            &key,
            &patient.identity,
            None,
            Change {
                bytes: &sealed_bytes,
                hash: hash.0,
                actor,
                seq: change.seq(),
            },
            time,
        )
        .unwrap();
        let h = e.header();
        built.batch.push(Op::PutItem {
            meta: ItemMeta {
                kind: ItemKind::Envelope,
                id: e.id().into(),
                patient: pid,
                collection: Some(collection),
                grant: None,
                principal: Some(h.author),
            },
            bytes: e.encode(),
            envelope: Some(Box::new(EnvelopeEntry {
                id: e.id(),
                patient: pid,
                collection,
                state: EnvelopeState::Readable,
                epoch: h.epoch,
                key_id: h.key_id,
                grant: None,
                actor: h.actor,
                change_seq: h.seq,
                created_at: h.created_at,
                seq: 0,
            })),
        });
        LOGICAL.fetch_add(e.encode().len() as u64, std::sync::atomic::Ordering::Relaxed);
        CHANGE.fetch_add(sealed_bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        used.insert(collection);
    }
    for collection in &used {
        let share = patient.share(*collection, 0, *node).unwrap();
        let bytes = share.encoded().to_vec();
        built.batch.push(Op::PutItem {
            meta: ItemMeta {
                kind: ItemKind::KeyShare,
                id: ItemId(Sha256::digest(&bytes).into()),
                patient: pid,
                collection: Some(*collection),
                grant: None,
                principal: Some(*node),
            },
            bytes,
            envelope: None,
        });
    }
    built
}

async fn scale(patients: usize) {
    let dir = tempfile::tempdir().unwrap();
    // MEDMESH_BENCH_STORE=<dir>: build there once and keep it (to re-measure the open).
    let kept = std::env::var_os("MEDMESH_BENCH_STORE").map(PathBuf::from);
    let data = kept.clone().unwrap_or_else(|| dir.path().to_path_buf());
    let sample = data.join("bench-sample");
    if let (Some(_), Ok(line)) = (&kept, std::fs::read_to_string(&sample)) {
        let parts: Vec<&str> = line.split(' ').collect();
        println!("scale: reusing the store at {}", data.display());
        measure_open(&data, parts[0], parts[1]);
        if let Some(json_bytes) = parts.get(2).and_then(|j| j.trim().parse().ok()) {
            disk_breakdown(&data.join("store"), json_bytes);
        }
        return;
    }
    let node = Node::open(&data, SecretIdentity::from_seed(&NODE_SEED), Config::default())
        .await
        .unwrap();
    let me = Principal::Practice(node.practice_id());
    let store: Arc<dyn Store> = node.raw_store();
    let start = Instant::now();
    let threads: usize = std::env::var("MEDMESH_BENCH_BUILD_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let (json_bytes, keys) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let store = store.clone();
                s.spawn(move || {
                    let mut json = 0u64;
                    let mut keys = Vec::new();
                    let mut batch = Batch::new();
                    for i in (t..patients).step_by(threads) {
                        let b = build_patient(i, &me);
                        json += b.json_bytes;
                        keys.extend(b.keys);
                        batch.ops.extend(b.batch.ops);
                        if batch.ops.len() >= 2_000 {
                            store.commit(&std::mem::take(&mut batch)).unwrap();
                        }
                    }
                    store.commit(&batch).unwrap();
                    (json, keys)
                })
            })
            .collect();
        let mut json = 0;
        let mut keys = Vec::new();
        for h in handles {
            let (j, k) = h.join().unwrap();
            json += j;
            keys.extend(k);
        }
        (json, keys)
    });
    for chunk in keys.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
        node.index_resources(chunk[0].0, chunk[0].1, chunk.iter().map(|k| k.2.as_str()))
            .unwrap();
    }
    store.flush().unwrap();
    println!(
        "scale: {patients} patients x {PER_PATIENT} resources built (real envelopes, direct store path) in {:?}",
        start.elapsed()
    );
    node.close().await;
    drop(store);
    drop(node);
    // Let sled finish with the files before measuring and reopening.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let disk = dir_bytes(&data);
    println!(
        "  plaintext JSON {:>8.1} MiB, disk {:>8.1} MiB: {:.2}x (target <= 3x)",
        json_bytes as f64 / 1048576.0,
        disk as f64 / 1048576.0,
        disk as f64 / json_bytes as f64
    );
    println!(
        "  envelopes {:.1} MiB (change bytes {:.1} MiB)",
        LOGICAL.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1048576.0,
        CHANGE.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1048576.0
    );
    let (pid, _, key) = &keys[keys.len() / 2 + 7];
    if kept.is_some() {
        std::fs::write(&sample, format!("{key} {pid} {json_bytes}")).unwrap();
    }
    measure_open(&data, key, &pid.to_string());
    println!(
        "  disk after that reopen {:.1} MiB (sled reclaims segments lazily)",
        dir_bytes(&data) as f64 / 1048576.0
    );
    disk_breakdown(&data.join("store"), json_bytes);
}

/// What the stored bytes are made of: keys + values per sled tree (read with
/// sled itself, the node closed), against the plaintext JSON; with
/// `MEDMESH_BENCH_SLED_FLOOR=1` also the size of a fresh export/import copy
/// (sled's own floor for the same data: no garbage left by earlier writes).
fn disk_breakdown(store_dir: &Path, json_bytes: u64) {
    let db = sled::Config::new().path(store_dir).open().unwrap();
    let mut logical = 0u64;
    let mut rows = Vec::new();
    for name in db.tree_names() {
        let tree = db.open_tree(&name).unwrap();
        let (mut entries, mut bytes) = (0u64, 0u64);
        for entry in tree.iter() {
            let (k, v) = entry.unwrap();
            entries += 1;
            bytes += (k.len() + v.len()) as u64;
        }
        if let Some(each) = bytes.checked_div(entries) {
            logical += bytes;
            rows.push(format!(
                "{} {:.1} MiB ({entries} entries, {each} B each)",
                String::from_utf8_lossy(&name),
                bytes as f64 / 1048576.0,
            ));
        }
    }
    println!("  logical bytes (keys + values) per tree: {}", rows.join("; "));
    println!(
        "  logical total {:.1} MiB = {:.2}x the JSON; sled's files {:.2}x that",
        logical as f64 / 1048576.0,
        logical as f64 / json_bytes as f64,
        dir_bytes(store_dir) as f64 / logical as f64
    );
    if std::env::var_os("MEDMESH_BENCH_SLED_FLOOR").is_some() {
        let copy = tempfile::tempdir().unwrap();
        let fresh = sled::Config::new().path(copy.path()).open().unwrap();
        fresh.import(db.export());
        fresh.flush().unwrap();
        drop(fresh);
        println!(
            "  a fresh sled export/import of the same data: {:.1} MiB, {:.2}x logical",
            dir_bytes(copy.path()) as f64 / 1048576.0,
            dir_bytes(copy.path()) as f64 / logical as f64
        );
    }
}

/// Opens the store in a fresh process and reads one resource; then, in
/// another, times the phases of the open.
fn measure_open(data: &Path, key: &str, patient: &str) {
    for phases in [false, true] {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.arg("--open-child").arg(data).arg(key).arg(patient);
        if phases {
            cmd.env("MEDMESH_BENCH_OPEN_PHASES", "1");
        } else {
            cmd.env_remove("MEDMESH_BENCH_OPEN_PHASES");
        }
        let out = cmd.output().unwrap();
        print!("{}", String::from_utf8_lossy(&out.stdout));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

/// In a fresh process: open the node, read one resource.
fn open_child(data: PathBuf, key: String, patient: String) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let base = rss_kib();
        if std::env::var_os("MEDMESH_BENCH_OPEN_PHASES").is_some() {
            let start = Instant::now();
            let store = medmesh_node::store::SledStore::open(&data.join(medmesh_node::STORE_DIR)).unwrap();
            println!(
                "  phases (second open): sled open {}, RSS {} MiB",
                ms(start.elapsed()),
                rss_kib() / 1024
            );
            let start = Instant::now();
            let n = store.consent_items().unwrap().len();
            println!(
                "  phases: read {n} consent items {}, RSS {} MiB",
                ms(start.elapsed()),
                rss_kib() / 1024
            );
            drop(store);
            return;
        }
        let start = Instant::now();
        let node = Node::open(&data, SecretIdentity::from_seed(&NODE_SEED), Config::default())
            .await
            .unwrap();
        let repo = Repository::new(node.clone(), repository::Config::default()).unwrap();
        let opened = start.elapsed();
        let rss_open = rss_kib();
        let (t, id) = key.split_once('/').unwrap();
        let r = repo.read(t, id).await.unwrap();
        let first = start.elapsed();
        assert_eq!(r.key, key);
        let rss_read = rss_kib();
        let p: PatientId = patient.parse().unwrap();
        let start = Instant::now();
        let all = repo.patient_resources(p).await.unwrap();
        let patient_load = start.elapsed();
        assert_eq!(all.len(), PER_PATIENT);
        println!("  open (store + registry of every key share) {}", ms(opened));
        println!(
            "  open-to-first-read (Type/id, cold)         {}  (target <= 3 s)",
            ms(first)
        );
        println!(
            "  then all {PER_PATIENT} resources of that patient    {}",
            ms(patient_load)
        );
        println!(
            "  RSS: process start {} MiB, after open {} MiB, after first read {} MiB",
            base / 1024,
            rss_open / 1024,
            rss_read / 1024
        );
        node.close().await;
    });
}

// ----- 3. transaction import ----------------------------------------------

/// A fresh node with a patient granted to it, and its repository.
async fn import_node(dir: &Path) -> (Node, Repository, TestPatient) {
    let node = Node::open(dir, SecretIdentity::generate().unwrap(), Config::default())
        .await
        .unwrap();
    let mut patient = TestPatient::new().unwrap();
    for c in [Collection::Core, Collection::Labs, Collection::Medications] {
        let (_, items) = patient.onboard(node.practice_id(), c).unwrap();
        node.submit(patient.id(), items).await.unwrap();
    }
    let repo = Repository::new(node.clone(), repository::Config::default()).unwrap();
    (node, repo, patient)
}

/// The Bundle's writes: a Patient and `n - 1` resources of the realistic mix.
fn import_writes(patient: &TestPatient, n: usize) -> Vec<(String, Value)> {
    let patient_id = repository::new_resource_id().unwrap();
    (0..n)
        .map(|i| {
            let (id, resource) = if i == 0 {
                (patient_id.clone(), patient_json(&patient.id().to_string(), 0))
            } else {
                (
                    repository::new_resource_id().unwrap(),
                    resource(i, &format!("Patient/{patient_id}")),
                )
            };
            (id, resource)
        })
        .collect()
}

/// Envelopes held, and the store's bytes on disk after close.
async fn import_footprint(node: Node, repo: Repository, patient: &TestPatient, dir: &Path) -> (usize, u64) {
    let envelopes = node.envelopes(&patient.id(), None).unwrap().len();
    node.close().await;
    drop(repo);
    drop(node);
    (envelopes, dir_bytes(&dir.join(medmesh_node::STORE_DIR)))
}

async fn import(quick: bool) {
    let n = if quick { 200 } else { 5_000 };
    let app = Actor::local_app("bench");
    println!("\n## transaction import: {n} resources of one patient (3 collections), one Bundle");

    // Entry by entry: one durable write (change, envelope, signature, flush wait) each.
    let dir = tempfile::tempdir().unwrap();
    let (node, repo, patient) = import_node(dir.path()).await;
    let writes = import_writes(&patient, n);
    let started = Instant::now();
    for (id, resource) in writes {
        let collection = records::collection_of(&resource);
        repo.create_with_id(&id, resource, patient.id(), collection, app.clone())
            .await
            .unwrap();
    }
    let one_by_one = started.elapsed().as_secs_f64();
    let (envelopes, bytes) = import_footprint(node, repo, &patient, dir.path()).await;
    println!(
        "entry by entry:      {one_by_one:>7.3} s  {:>8.0} resources/s  {envelopes:>5} envelopes  {:>6} B/resource on disk",
        n as f64 / one_by_one,
        bytes / n as u64
    );

    // One transaction: one change per document, one atomic durable batch.
    let mut best = f64::MAX;
    for run in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let (node, repo, patient) = import_node(dir.path()).await;
        let ops = import_writes(&patient, n)
            .into_iter()
            .map(|(id, resource)| repository::TxOp::Create {
                id,
                resource,
                if_none_exist: None,
            })
            .collect();
        let started = Instant::now();
        let outcomes = repo.transaction(ops, app.clone()).await.unwrap();
        let elapsed = started.elapsed().as_secs_f64();
        assert_eq!(outcomes.len(), n);
        best = best.min(elapsed);
        let (envelopes, bytes) = import_footprint(node, repo, &patient, dir.path()).await;
        println!(
            "one transaction #{run}: {elapsed:>7.3} s  {:>8.0} resources/s  {envelopes:>5} envelopes  {:>6} B/resource on disk",
            n as f64 / elapsed,
            bytes / n as u64
        );
    }

    // The record documents' raw write path: the same resources, one change each, no node.
    let patient = TestPatient::new().unwrap();
    let writes = import_writes(&patient, n);
    let actor = records::actor_id(&[9; 32], [2; 8]);
    let mut docs: std::collections::HashMap<Collection, RecordDoc> = std::collections::HashMap::new();
    let started = Instant::now();
    for (id, resource) in &writes {
        docs.entry(records::collection_of(resource))
            .or_default()
            .create(&actor, 1_700_000_000_000, id, resource)
            .unwrap();
    }
    let raw = started.elapsed().as_secs_f64();
    println!(
        "records raw write path: {raw:>7.3} s  {:>8.0} resources/s",
        n as f64 / raw
    );
    println!(
        "one transaction (best) vs entry by entry: {:.1}x faster; vs raw write path: {:.2}x the time",
        one_by_one / best,
        best / raw
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--open-child") {
        open_child(PathBuf::from(&args[at + 1]), args[at + 2].clone(), args[at + 3].clone());
        return;
    }
    // `cargo test --benches` runs benches without --bench: a quick smoke run then.
    let quick = !args.iter().any(|a| a == "--bench");
    let patients: usize = std::env::var("MEDMESH_BENCH_PATIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 50 } else { 10_000 });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let only = std::env::var("MEDMESH_BENCH_ONLY").unwrap_or_default();
    let wanted = |part: &str| only.is_empty() || only.split(',').any(|p| p.trim() == part);
    rt.block_on(async {
        if wanted("thousand") {
            thousand(quick).await;
        }
        if wanted("scale") {
            scale(patients).await;
        }
        if wanted("import") {
            import(quick).await;
        }
    });
}
