//! The FHIR repository over a real node: create/read/update/delete/search,
//! durability across reopen, and identical resources on a second node that
//! ingests the first node's envelopes.
//!
//! Over 800 lines on purpose: one subject (the repository over a real node)
//! with shared fixtures; each test is one scenario.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use medmesh_crypto::{Collection, PatientId, SecretIdentity};
use medmesh_node::item::Item;
use medmesh_node::records::{Query, RenderedResource};
use medmesh_node::repository::{self, Repository, TxOp, TxResult};
use medmesh_node::store::{ItemKind, SledStore};
use medmesh_node::testing::{FlushControl, TestPatient};
use medmesh_node::{Actor, Config, Node, Source};
use serde_json::{Value, json};

async fn open(dir: &Path, seed: u8) -> Node {
    Node::open(dir, SecretIdentity::from_seed(&[seed; 32]), Config::default())
        .await
        .unwrap()
}

async fn onboard(node: &Node, patient: &mut TestPatient, collections: &[Collection]) {
    for c in collections {
        let (_, items) = patient.onboard(node.practice_id(), *c).unwrap();
        node.submit(patient.id(), items).await.unwrap();
    }
}

fn app() -> Actor {
    Actor::local_app("test")
}

fn patient_resource(did: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": did}],
        "name": [{"family": "Lovelace", "given": ["Ada"]}],
        "birthDate": "1815-12-10"
    })
}

fn observation(patient_id: &str, value: &str) -> Value {
    let value: Value = serde_json::from_str(value).unwrap();
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8302-2"}]},
        "subject": {"reference": format!("Patient/{patient_id}")},
        "effectiveDateTime": "2026-01-02",
        "valueQuantity": {"value": value, "unit": "cm"}
    })
}

#[tokio::test]
async fn create_read_update_delete_search_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut patient = TestPatient::new().unwrap();
    let did = patient.id().to_string();
    let node = open(dir.path(), 1).await;
    onboard(&node, &mut patient, &[Collection::Core, Collection::Labs]).await;
    let repo = Repository::new(node.clone(), repository::Config::default()).unwrap();

    let p = repo.create(patient_resource(&did), None, app()).await.unwrap();
    let obs = repo.create(observation(p.id(), "172.50"), None, app()).await.unwrap();
    assert_eq!(
        repo.location("Observation", obs.id()).await.unwrap(),
        (patient.id(), Collection::Labs)
    );
    let read = repo.read("Observation", obs.id()).await.unwrap();
    assert_eq!(read.json["valueQuantity"]["value"].to_string(), "172.50");

    let mut edited = read.json.clone();
    edited["status"] = json!("amended");
    let updated = repo
        .update("Observation", obs.id(), edited, Some(&read.version_id), true, app())
        .await
        .unwrap();
    assert_ne!(updated.version_id, read.version_id);
    let stale = repo
        .update(
            "Observation",
            obs.id(),
            read.json.clone(),
            Some(&read.version_id),
            true,
            app(),
        )
        .await;
    assert!(
        matches!(stale, Err(repository::Error::VersionConflict { .. })),
        "{stale:?}"
    );

    let patient = format!("Patient/{}", p.id());
    let query = Query::parse(
        "Observation",
        &[("code", "http://loinc.org|8302-2"), ("patient", patient.as_str())],
    )
    .unwrap();
    let found = repo.search(&query).await.unwrap();
    assert_eq!(found.len(), 1);
    // By identifier (the did:key link), unscoped: every readable document is scanned.
    let link = format!("urn:ietf:rfc:3986|{did}");
    let by_identifier = Query::parse("Patient", &[("identifier", link.as_str())]).unwrap();
    let found = repo.search(&by_identifier).await.unwrap();
    assert_eq!(
        found.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
        [p.key.as_str()]
    );
    let other = Query::parse("Patient", &[("identifier", "urn:ietf:rfc:3986|did:key:z6MkOther")]).unwrap();
    assert!(repo.search(&other).await.unwrap().is_empty());
    let everything = repo.everything(p.id()).await.unwrap();
    assert_eq!(everything.len(), 2);
    assert_eq!(everything[0].key, p.key);

    let orphan = repo
        .create(observation("does-not-exist", "1"), None, app())
        .await
        .unwrap_err();
    assert!(matches!(orphan, repository::Error::PatientLink { .. }), "{orphan:?}");

    repo.delete("Patient", p.id(), app()).await.unwrap();
    let gone = repo.read("Patient", p.id()).await.unwrap_err();
    assert!(matches!(gone, medmesh_node::Error::Deleted { .. }));

    // Reopen: what was acknowledged is served again, found by id alone.
    node.close().await;
    drop(repo);
    drop(node);
    let node = open(dir.path(), 1).await;
    let repo = Repository::new(node.clone(), repository::Config::default()).unwrap();
    let again = repo.read("Observation", obs.id()).await.unwrap();
    assert_eq!(again.json, updated.json);
    assert_eq!(again.version_id, updated.version_id);
}

#[tokio::test]
async fn writes_without_a_grant_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let patient = TestPatient::new().unwrap();
    let node = open(dir.path(), 1).await;
    let repo = Repository::new(node, repository::Config::default()).unwrap();
    let err = repo
        .create(patient_resource(&patient.id().to_string()), None, app())
        .await
        .unwrap_err();
    assert!(matches!(err, medmesh_node::Error::NoWriteGrant { .. }), "{err:?}");
}

/// Node B ingests A's envelopes (as sync would deliver them) and serves the
/// same resources with the same version ids; a later edit reaches B's cache.
#[tokio::test]
async fn a_second_node_shows_identical_resources() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let mut patient = TestPatient::new().unwrap();
    let did = patient.id().to_string();
    let a = open(dir_a.path(), 1).await;
    let b = open(dir_b.path(), 2).await;
    onboard(&a, &mut patient, &[Collection::Core, Collection::Labs]).await;
    onboard(&b, &mut patient, &[Collection::Core, Collection::Labs]).await;
    let repo_a = Repository::new(a.clone(), repository::Config::default()).unwrap();
    let repo_b = Repository::new(b.clone(), repository::Config::default()).unwrap();

    let p = repo_a.create(patient_resource(&did), None, app()).await.unwrap();
    let obs = repo_a.create(observation(p.id(), "1.00"), None, app()).await.unwrap();

    let deliver = |from: Node, to: Node, after: u64| async move {
        let items = from.items_after(after, 1000).await.unwrap();
        // What sync would serve B: A's grants (so B can judge A's envelopes) and the envelopes.
        let envelopes: Vec<Item> = items
            .iter()
            .filter(|i| matches!(i.meta.kind, ItemKind::Envelope | ItemKind::Grant))
            .map(|i| Item::new(i.meta.kind, i.item.bytes.clone()))
            .collect();
        to.ingest(envelopes, Source::Peer(from.practice_id().peer_id()))
            .await
            .unwrap();
        from.last_seq()
    };
    let seen = deliver(a.clone(), b.clone(), 0).await;
    let on_b = repo_b.read("Observation", obs.id()).await.unwrap();
    assert_eq!(on_b.json, obs.json);
    assert_eq!(on_b.version_id, obs.version_id);

    // B has the document cached now; an edit at A must reach that cache.
    let mut edited = obs.json.clone();
    edited["status"] = json!("corrected");
    let edited = repo_a
        .update("Observation", obs.id(), edited, None, false, app())
        .await
        .unwrap();
    deliver(a.clone(), b.clone(), seen).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = repo_b.read("Observation", obs.id()).await.unwrap();
        if now.version_id == edited.version_id {
            assert_eq!(now.json, edited.json);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "edit never reached B's cache");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ----- sealed snapshots ----------------------------------------------

/// Practices A and B, both onboarded for core and labs, and A's repository
/// (no automatic snapshots) holding the patient's Patient resource: the
/// setting of the snapshot-transfer tests.
struct TransferPair {
    patient: TestPatient,
    a: Node,
    b: Node,
    repo: Repository,
    patient_resource: Arc<RenderedResource>,
}

impl TransferPair {
    async fn open(dir_a: &Path, dir_b: &Path) -> Self {
        let mut patient = TestPatient::new().unwrap();
        let a = open(dir_a, 1).await;
        let b = open(dir_b, 2).await;
        onboard(&a, &mut patient, &[Collection::Core, Collection::Labs]).await;
        onboard(&b, &mut patient, &[Collection::Core, Collection::Labs]).await;
        let repo = Repository::new(a.clone(), no_auto_snapshots()).unwrap();
        let did = patient.id().to_string();
        let patient_resource = repo.create(patient_resource(&did), None, app()).await.unwrap();
        Self {
            patient,
            a,
            b,
            repo,
            patient_resource,
        }
    }
}

fn no_auto_snapshots() -> repository::Config {
    repository::Config {
        snapshot_every: 0,
        ..repository::Config::default()
    }
}

/// Everything a fresh repository (empty cache) serves for the patient:
/// every resource with its version, and every history entry.
async fn render_all(node: &Node, patient: medmesh_crypto::PatientId) -> Vec<(String, String, Value)> {
    let repo = Repository::new(node.clone(), no_auto_snapshots()).unwrap();
    let mut out = Vec::new();
    for r in repo.patient_resources(patient).await.unwrap() {
        out.push((r.key.clone(), r.version_id.clone(), r.json.clone()));
        for (v, old) in repo.history(r.resource_type(), r.id()).await.unwrap() {
            out.push((
                format!("{} history", r.key),
                v.version_id,
                old.map_or(Value::Null, |o| o.json.clone()),
            ));
        }
    }
    out
}

#[tokio::test]
async fn snapshot_load_equals_full_replay_and_bad_snapshots_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let mut patient = TestPatient::new().unwrap();
    let did = patient.id().to_string();
    let node = open(dir.path(), 1).await;
    onboard(&node, &mut patient, &[Collection::Core, Collection::Labs]).await;
    let repo = Repository::new(node.clone(), no_auto_snapshots()).unwrap();
    let p = repo.create(patient_resource(&did), None, app()).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..30 {
        let o = repo
            .create(observation(p.id(), &format!("{i}.10")), None, app())
            .await
            .unwrap();
        ids.push(o.id().to_owned());
    }
    for id in &ids[..5] {
        let cur = repo.read("Observation", id).await.unwrap();
        let mut edited = cur.json.clone();
        edited["status"] = json!("amended");
        repo.update("Observation", id, edited, None, false, app())
            .await
            .unwrap();
    }
    repo.delete("Observation", &ids[29], app()).await.unwrap();
    repo.save_snapshots().await;
    let load = node.load_collection(patient.id(), Collection::Labs).await.unwrap();
    assert_eq!(load.snapshot.as_ref().unwrap().covered.len(), 36);
    assert!(load.changes.is_empty());

    // Changes after the snapshot are replayed on top of it.
    for i in 0..5 {
        repo.create(observation(p.id(), &format!("{i}.200")), None, app())
            .await
            .unwrap();
    }
    let cur = repo.read("Observation", &ids[6]).await.unwrap();
    let mut edited = cur.json.clone();
    edited["status"] = json!("corrected");
    repo.update("Observation", &ids[6], edited, None, false, app())
        .await
        .unwrap();
    let load = node.load_collection(patient.id(), Collection::Labs).await.unwrap();
    assert!(load.snapshot.is_some());
    assert_eq!(load.changes.len(), 6);
    let with_snapshot = render_all(&node, patient.id()).await;
    // 35 live resources; their histories: 35 creates and 6 updates.
    assert_eq!(with_snapshot.len(), 35 + 35 + 6);

    let store = node.raw_store();
    let sealed = store.snapshot(&patient.id(), Collection::Labs).unwrap().unwrap();
    node.drop_snapshot(patient.id(), Collection::Labs).unwrap();
    let without = render_all(&node, patient.id()).await;
    assert_eq!(with_snapshot, without, "load with snapshot == load without");

    // Bit flips anywhere (header, key id, nonce, ciphertext, tag): ignored
    // with a warning, dropped, full replay, same data.
    let mut positions: Vec<usize> = (0..70).collect();
    positions.extend((0..30).map(|i| 70 + i * (sealed.len() - 71) / 29));
    for (n, pos) in positions.into_iter().enumerate() {
        let mut bad = sealed.clone();
        bad[pos] ^= 1 << (n % 8);
        store.put_snapshot(&patient.id(), Collection::Labs, &bad).unwrap();
        assert_eq!(render_all(&node, patient.id()).await, without, "flip at byte {pos}");
        assert!(
            store.snapshot(&patient.id(), Collection::Labs).unwrap().is_none(),
            "flipped snapshot at {pos} not dropped"
        );
    }

    // Snapshots that open but lie: not a document, or not what they claim to cover.
    store.put_snapshot(&patient.id(), Collection::Labs, &sealed).unwrap();
    let good = node.load_snapshot(patient.id(), Collection::Labs).unwrap().unwrap();
    assert!(
        node.save_snapshot(patient.id(), Collection::Labs, &good.covered, b"not a document")
            .unwrap()
    );
    assert_eq!(render_all(&node, patient.id()).await, without);
    assert!(
        node.save_snapshot(patient.id(), Collection::Labs, &good.covered[1..], &good.doc)
            .unwrap()
    );
    assert_eq!(render_all(&node, patient.id()).await, without);
    assert!(store.snapshot(&patient.id(), Collection::Labs).unwrap().is_none());

    // A new epoch key: the old snapshot is dropped and rebuilt under the new key.
    store.put_snapshot(&patient.id(), Collection::Labs, &sealed).unwrap();
    let share = patient
        .share(
            Collection::Labs,
            1,
            medmesh_crypto::Principal::Practice(node.practice_id()),
        )
        .unwrap();
    node.submit_key_shares(patient.id(), vec![share.encoded().to_vec()])
        .await
        .unwrap();
    assert!(node.load_snapshot(patient.id(), Collection::Labs).unwrap().is_none());
    assert!(store.snapshot(&patient.id(), Collection::Labs).unwrap().is_none());
    let fresh = Repository::new(node.clone(), no_auto_snapshots()).unwrap();
    fresh.patient_resources(patient.id()).await.unwrap();
    fresh.save_snapshots().await;
    let resealed = store.snapshot(&patient.id(), Collection::Labs).unwrap().unwrap();
    assert_eq!(
        medmesh_crypto::SealedSnapshot::key_id(&resealed).unwrap(),
        node.current_epoch_key(&patient.id(), Collection::Labs).unwrap().key_id
    );
    assert_eq!(render_all(&node, patient.id()).await, without);
}

#[tokio::test]
async fn snapshots_are_written_every_n_changes_and_dropped_on_exclusion() {
    let dir = tempfile::tempdir().unwrap();
    let mut patient = TestPatient::new().unwrap();
    let did = patient.id().to_string();
    let node = open(dir.path(), 1).await;
    let (grant, items) = patient.onboard(node.practice_id(), Collection::Core).unwrap();
    node.submit(patient.id(), items).await.unwrap();
    let repo = Repository::new(
        node.clone(),
        repository::Config {
            snapshot_every: 4,
            ..repository::Config::default()
        },
    )
    .unwrap();
    let p = repo.create(patient_resource(&did), None, app()).await.unwrap();
    let store = node.raw_store();
    for i in 0..5 {
        let mut c = json!({"resourceType": "Condition", "subject": {"reference": format!("Patient/{}", p.id())}});
        c["note"] = json!([{"text": format!("note {i}")}]);
        repo.create(c, None, app()).await.unwrap();
    }
    let load = node.load_collection(patient.id(), Collection::Core).await.unwrap();
    assert_eq!(load.snapshot.unwrap().covered.len(), 4, "written after 4 changes");
    assert_eq!(load.changes.len(), 2);

    // A revocation whose cut excludes changes 3.. drops the snapshot.
    let actor = node.envelopes(&patient.id(), Some(Collection::Core)).unwrap()[0].actor;
    let revocation = patient
        .revoke(&grant, std::collections::BTreeMap::from([(actor, 2)]))
        .unwrap();
    let report = node
        .submit_revocation(patient.id(), revocation.encoded().to_vec())
        .await
        .unwrap();
    assert_eq!(report.counts.excluded, 4);
    assert!(store.snapshot(&patient.id(), Collection::Core).unwrap().is_none());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = repo.patient_resources(patient.id()).await.unwrap();
        if left.len() == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "exclusion never reached the cache"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ----- snapshot transfers ----------------------------------------------

/// A's local snapshot, shipped as a transfer (document + compact headers),
/// gives B A's exact envelopes; B ingests them and shows what A shows. A
/// receiver without the key, a tampered document or headers that belong to
/// other changes never yield an envelope.
#[tokio::test]
async fn a_snapshot_transfer_rebuilds_the_authors_exact_envelopes() {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let dir_c = tempfile::tempdir().unwrap();
    let TransferPair {
        patient,
        a,
        b,
        repo,
        patient_resource: p,
    } = TransferPair::open(dirs.0.path(), dirs.1.path()).await;
    let pid = patient.id();
    let c = open(dir_c.path(), 3).await;
    let mut ids = Vec::new();
    for i in 0..40 {
        let o = repo
            .create(observation(p.id(), &format!("{i}.50")), None, app())
            .await
            .unwrap();
        ids.push(o.id().to_owned());
    }
    let cur = repo.read("Observation", &ids[3]).await.unwrap();
    let mut edited = cur.json.clone();
    edited["status"] = json!("amended");
    repo.update("Observation", &ids[3], edited, None, false, app())
        .await
        .unwrap();
    repo.delete("Observation", &ids[7], app()).await.unwrap();
    assert!(
        a.snapshot_transfer(pid, Collection::Labs).await.unwrap().is_none(),
        "no snapshot yet"
    );
    repo.save_snapshots().await;

    let transfer = a.snapshot_transfer(pid, Collection::Labs).await.unwrap().unwrap();
    let mut held = a.envelope_ids(&pid, Collection::Labs).unwrap();
    let mut covered: Vec<_> = transfer.covered.iter().map(|(id, _)| *id).collect();
    held.sort();
    covered.sort();
    assert_eq!(covered, held, "the transfer covers every envelope of the collection");
    assert_eq!(
        a.snapshot_fingerprint(pid, Collection::Labs).unwrap(),
        Some(transfer.source)
    );
    let headers: Vec<_> = transfer.covered.iter().map(|(_, h)| h.clone()).collect();
    let envelope_bytes: usize = {
        let mut total = 0;
        for id in &held {
            total += a.item(&(*id).into()).await.unwrap().unwrap().item.bytes.len();
        }
        total
    };
    let header_bytes: usize = headers.iter().map(|h| h.encode().len()).sum();
    assert!(
        transfer.sealed_doc.len() + header_bytes < envelope_bytes,
        "a transfer is smaller than the envelopes: {} + {header_bytes} vs {envelope_bytes}",
        transfer.sealed_doc.len()
    );

    // B (granted, holding the keys) rebuilds A's envelopes byte for byte.
    let restored = b
        .restore_transfer(transfer.patient, transfer.collection, &transfer.sealed_doc, &headers)
        .unwrap();
    assert_eq!(restored.unrestored, 0);
    assert_eq!(restored.envelopes.len(), held.len());
    for restored in &restored.envelopes {
        let envelope = restored.envelope();
        let original = a.item(&envelope.id().into()).await.unwrap().unwrap();
        assert_eq!(envelope.encode(), original.item.bytes);
    }
    // B ingests them (with A's grant, as sync delivers it) and shows what A shows.
    let grants: Vec<Item> = a
        .items_after(0, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.meta.kind == ItemKind::Grant)
        .map(|i| Item::new(i.meta.kind, i.item.bytes))
        .collect();
    let from_a = Source::Peer(a.practice_id().peer_id());
    b.ingest(grants, from_a.clone()).await.unwrap();
    // The first five changes: a change that skips its predecessor would wait.
    let mut in_order = restored.envelopes.clone();
    in_order.sort_by_key(|e| e.envelope().header().seq);
    let (first, rest) = in_order.split_at(5);
    // Through the ordinary ingest (bytes, verified again) ...
    let report = b
        .ingest(
            first
                .iter()
                .map(|e| Item::new(ItemKind::Envelope, e.envelope().encode()))
                .collect(),
            from_a.clone(),
        )
        .await
        .unwrap();
    assert_eq!((report.counts.accepted, report.counts.readable), (5, 5), "{report:?}");
    // ... and the restored-envelope ingest, which skips re-verifying; both
    // see duplicates the same way.
    let report = b
        .ingest_restored(restored.envelopes.clone(), from_a, None)
        .await
        .unwrap();
    assert_eq!(
        (report.counts.accepted, report.counts.readable, report.counts.duplicates),
        (rest.len() as u64, rest.len() as u64, 5),
        "{report:?}"
    );
    let on_a: Vec<_> = render_all(&a, pid)
        .await
        .into_iter()
        .filter(|r| r.0.starts_with("Observation"))
        .collect();
    let on_b = render_all(&b, pid).await;
    assert_eq!(on_b, on_a);

    // C holds no key for the collection: nothing to rebuild with.
    assert!(matches!(
        c.restore_transfer(transfer.patient, transfer.collection, &transfer.sealed_doc, &headers),
        Err(medmesh_node::Error::NoSnapshotKey(_))
    ));
    // A tampered document does not open.
    let mut bad = transfer.sealed_doc.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(
        b.restore_transfer(transfer.patient, transfer.collection, &bad, &headers)
            .is_err()
    );
    // Headers of changes the document does not hold, or headers swapped
    // between changes, rebuild nothing.
    let mut swapped = headers.clone();
    swapped.swap(0, 1);
    let from_swapped = b
        .restore_transfer(transfer.patient, transfer.collection, &transfer.sealed_doc, &swapped)
        .unwrap();
    assert_eq!(from_swapped.envelopes.len(), headers.len(), "order does not matter");
    let mut forged = headers[0].encode();
    // The nonce is near the end of the header, before the signature.
    let at = forged.len() - 70;
    forged[at] ^= 0x20;
    let forged = medmesh_crypto::CompactHeader::decode(&forged).unwrap();
    let from_forged = b
        .restore_transfer(transfer.patient, transfer.collection, &transfer.sealed_doc, &[forged])
        .unwrap();
    assert_eq!((from_forged.envelopes.len(), from_forged.unrestored), (0, 1));
}

// ----- transactions: one atomic write ----------------------------------

fn example(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fhir/examples")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// A Synthea patient Bundle's resources as transaction creates, its Patient
/// linked to `patient`'s did:key, with ids assigned and every `fullUrl`
/// reference rewritten to `Type/id`, as the gateway hands a transaction over.
fn synthea_writes(patient: &TestPatient) -> Vec<TxOp> {
    let bundle = example("Bundle-synthea-Brekke496.json");
    let entries = bundle["entry"].as_array().unwrap();
    let mut ids = HashMap::new();
    let mut resources = Vec::new();
    for entry in entries {
        let mut resource = entry["resource"].clone();
        if resource["resourceType"] == "Patient" {
            resource["identifier"]
                .as_array_mut()
                .unwrap()
                .push(json!({"system": "urn:ietf:rfc:3986", "value": patient.id().to_string()}));
        }
        let id = repository::new_resource_id().unwrap();
        let key = format!("{}/{id}", resource["resourceType"].as_str().unwrap());
        if let Some(full_url) = entry["fullUrl"].as_str() {
            ids.insert(full_url.to_owned(), key);
        }
        resources.push((id, resource));
    }
    resources
        .into_iter()
        .map(|(id, mut resource)| {
            rewrite_references(&mut resource, &ids);
            TxOp::Create {
                id,
                resource,
                if_none_exist: None,
            }
        })
        .collect()
}

/// Rewrites every `reference` naming a key of `ids` to its value.
fn rewrite_references(value: &mut Value, ids: &HashMap<String, String>) {
    match value {
        Value::Object(obj) => {
            for (key, child) in obj.iter_mut() {
                match child {
                    Value::String(r) if key == "reference" => {
                        if let Some(to) = ids.get(r.as_str()) {
                            *r = to.clone();
                        }
                    }
                    _ => rewrite_references(child, ids),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| rewrite_references(v, ids)),
        _ => {}
    }
}

fn created(outcomes: &[TxResult]) -> Vec<Arc<RenderedResource>> {
    outcomes
        .iter()
        .map(|o| match o {
            TxResult::Created(r) => r.clone(),
            other => panic!("expected a create, got {other:?}"),
        })
        .collect()
}

/// Envelopes held per (patient, collection).
fn envelope_counts(node: &Node, patients: &[&TestPatient]) -> Vec<(String, Collection, usize)> {
    let mut counts = Vec::new();
    for p in patients {
        for c in Collection::ALL {
            let n = node.envelope_ids(&p.id(), c).unwrap().len();
            if n > 0 {
                counts.push((p.id().to_string(), c, n));
            }
        }
    }
    counts
}

/// A real Synthea Bundle (319 resources over four collections) plus a second
/// patient's Condition, as one transaction: one envelope per touched
/// document, one versionId per document, history and vread per resource; a
/// later transaction updating and deleting across documents; all of it the
/// same after reopen and on a second node that ingests the envelopes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_patient_transaction_is_one_change_per_document_and_survives_reopen() {
    let (dir, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut ada = TestPatient::new().unwrap();
    let mut bob = TestPatient::new().unwrap();
    let collections = [
        Collection::Core,
        Collection::Labs,
        Collection::Billing,
        Collection::Medications,
    ];
    let node = open(dir.path(), 1).await;
    onboard(&node, &mut ada, &collections).await;
    onboard(&node, &mut bob, &[Collection::Core]).await;
    let repo = Repository::new(node.clone(), repository::Config::default()).unwrap();
    let seq_before = node.last_seq();

    // Directory resources (Organization, Practitioner, …) name no patient: in
    // a transaction about two patients they could not be filed, so they stay out.
    let mut writes: Vec<TxOp> = synthea_writes(&ada)
        .into_iter()
        .filter(|op| {
            let TxOp::Create { resource, .. } = op else { return true };
            resource["resourceType"] == "Patient" || !medmesh_node::records::patient_links(resource).is_empty()
        })
        .collect();
    let synthea = writes.len();
    // Bob's Patient, created in the same transaction after a resource that references it.
    let bob_patient = repository::new_resource_id().unwrap();
    let mut condition = example("Condition-example.json");
    condition["subject"] = json!({"reference": format!("Patient/{bob_patient}")});
    writes.push(TxOp::Create {
        id: repository::new_resource_id().unwrap(),
        resource: condition,
        if_none_exist: None,
    });
    writes.push(TxOp::Create {
        id: bob_patient,
        resource: patient_resource(&bob.id().to_string()),
        if_none_exist: None,
    });
    let outcomes = created(&repo.transaction(writes, app()).await.unwrap());
    assert_eq!(outcomes.len(), synthea + 2);
    // One envelope per touched document, all stored by one batch.
    let counts = envelope_counts(&node, &[&ada, &bob]);
    assert_eq!(counts.len(), 5, "{counts:?}");
    assert!(counts.iter().all(|(_, _, n)| *n == 1), "{counts:?}");
    assert_eq!(node.last_seq(), seq_before + 5);
    // Resources of one document share their change's versionId; documents differ.
    let mut by_doc: HashMap<(PatientId, Collection), HashSet<String>> = HashMap::new();
    for r in &outcomes {
        let at = repo.location(r.resource_type(), r.id()).await.unwrap();
        by_doc.entry(at).or_default().insert(r.version_id.clone());
    }
    assert_eq!(by_doc.len(), 5);
    assert!(by_doc.values().all(|v| v.len() == 1), "{by_doc:?}");
    let versions: HashSet<&String> = by_doc.values().flatten().collect();
    assert_eq!(versions.len(), 5);

    // A second transaction across two documents of Ada: update a lab and a core resource, delete another.
    let lab = outcomes
        .iter()
        .find(|r| r.resource_type() == "Observation")
        .unwrap()
        .clone();
    let encounter = outcomes
        .iter()
        .find(|r| r.resource_type() == "Encounter")
        .unwrap()
        .clone();
    let goal = outcomes.iter().find(|r| r.resource_type() == "Goal").unwrap().clone();
    let mut amended = lab.json.clone();
    amended["status"] = json!("amended");
    let mut finished = encounter.json.clone();
    finished["status"] = json!("cancelled");
    let second = repo
        .transaction(
            vec![
                TxOp::Update {
                    resource_type: "Observation".into(),
                    id: lab.id().into(),
                    resource: amended,
                    base_version: Some(lab.version_id.clone()),
                    require_current: true,
                },
                TxOp::Update {
                    resource_type: "Encounter".into(),
                    id: encounter.id().into(),
                    resource: finished,
                    base_version: None,
                    require_current: false,
                },
                TxOp::Delete {
                    resource_type: "Goal".into(),
                    id: goal.id().into(),
                },
            ],
            app(),
        )
        .await
        .unwrap();
    let (TxResult::Updated(lab2), TxResult::Updated(encounter2), TxResult::Deleted) =
        (&second[0], &second[1], &second[2])
    else {
        panic!("{second:?}");
    };
    assert_eq!(lab2.json["status"], "amended");
    assert_ne!(lab2.version_id, encounter2.version_id, "two documents, two changes");
    assert_eq!(node.last_seq(), seq_before + 7);
    let check = |repo: Repository| {
        let (lab, lab2, encounter2, goal) = (lab.clone(), lab2.clone(), encounter2.clone(), goal.clone());
        async move {
            let history = repo.history("Observation", lab.id()).await.unwrap();
            assert_eq!(
                history.iter().map(|(v, _)| v.version_id.clone()).collect::<Vec<_>>(),
                [lab.version_id.clone(), lab2.version_id.clone()]
            );
            let old = repo.vread("Observation", lab.id(), &lab.version_id).await.unwrap();
            assert_eq!(old.json, lab.json);
            assert_eq!(repo.read("Observation", lab.id()).await.unwrap().json, lab2.json);
            assert_eq!(
                repo.read("Encounter", encounter2.id()).await.unwrap().json,
                encounter2.json
            );
            let gone = repo.read("Goal", goal.id()).await.unwrap_err();
            assert!(matches!(gone, medmesh_node::Error::Deleted { .. }), "{gone:?}");
            assert_eq!(repo.history("Goal", goal.id()).await.unwrap().len(), 2);
        }
    };
    check(repo.clone()).await;

    // Reopen: every resource is served again with the same versionId.
    node.close().await;
    drop(repo);
    drop(node);
    let node = open(dir.path(), 1).await;
    let repo = Repository::new(node.clone(), repository::Config::default()).unwrap();
    for r in outcomes
        .iter()
        .filter(|r| ![lab.id(), encounter.id(), goal.id()].contains(&r.id()))
    {
        let again = repo.read(r.resource_type(), r.id()).await.unwrap();
        assert_eq!((&again.json, &again.version_id), (&r.json, &r.version_id), "{}", r.key);
    }
    check(repo.clone()).await;

    // A second node that ingests the envelopes shows the same versions.
    let b = open(dir_b.path(), 2).await;
    onboard(&b, &mut ada, &collections).await;
    let repo_b = Repository::new(b.clone(), repository::Config::default()).unwrap();
    let items: Vec<Item> = node
        .items_after(0, 1000)
        .await
        .unwrap()
        .iter()
        .filter(|i| matches!(i.meta.kind, ItemKind::Envelope | ItemKind::Grant) && i.meta.patient == ada.id())
        .map(|i| Item::new(i.meta.kind, i.item.bytes.clone()))
        .collect();
    b.ingest(items, Source::Peer(node.practice_id().peer_id()))
        .await
        .unwrap();
    check(repo_b.clone()).await;
    let on_b = repo_b.read("Patient", outcomes[0].id()).await.unwrap();
    assert_eq!(on_b.version_id, outcomes[0].version_id);
}

/// A transaction whose durable write fails leaves nothing: not served, not
/// in the store after reopen; and the reopened store takes writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_whose_flush_fails_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut ada = TestPatient::new().unwrap();
    let collections = [
        Collection::Core,
        Collection::Labs,
        Collection::Billing,
        Collection::Medications,
    ];
    let store = Arc::new(FlushControl::new(
        SledStore::open(&dir.path().join(medmesh_node::STORE_DIR)).unwrap(),
        Duration::ZERO,
    ));
    let node = Node::with_store(store.clone(), SecretIdentity::from_seed(&[1; 32]), Config::default())
        .await
        .unwrap();
    onboard(&node, &mut ada, &collections).await;
    let repo = Repository::new(node.clone(), repository::Config::default()).unwrap();
    // Something durable first, cached, that the failed transaction updates.
    let p = repo
        .create(patient_resource(&ada.id().to_string()), None, app())
        .await
        .unwrap();
    let before = envelope_counts(&node, &[&ada]);
    let audit_before = node.audit_verify().unwrap().entries;

    let mut writes = synthea_writes(&ada);
    let ids: Vec<(String, String)> = writes
        .iter()
        .map(|w| match w {
            TxOp::Create { id, resource, .. } => (resource["resourceType"].as_str().unwrap().to_owned(), id.clone()),
            _ => unreachable!(),
        })
        .collect();
    let mut renamed = p.json.clone();
    renamed["name"] = json!([{"family": "Byron"}]);
    writes.push(TxOp::Update {
        resource_type: "Patient".into(),
        id: p.id().into(),
        resource: renamed,
        base_version: None,
        require_current: false,
    });
    store.fail_flushes(true);
    let err = repo.transaction(writes, app()).await.unwrap_err();
    assert!(matches!(err.error, medmesh_node::Error::Storage(_)), "{err:?}");
    // Nothing of it is served: the update is not seen, no created resource is found.
    assert_eq!(repo.read("Patient", p.id()).await.unwrap().json, p.json);
    for (t, id) in &ids {
        let missing = repo.read(t, id).await.unwrap_err();
        assert!(
            matches!(missing, medmesh_node::Error::NotFound { .. }),
            "{t}/{id}: {missing:?}"
        );
    }
    assert_eq!(envelope_counts(&node, &[&ada]), before);
    // Until reopened the store refuses writes (what reached the disk is unknown).
    let poisoned = repo.create(patient_resource(&ada.id().to_string()), None, app()).await;
    assert!(matches!(poisoned, Err(medmesh_node::Error::Poisoned)), "{poisoned:?}");

    store.fail_flushes(false);
    node.close().await;
    drop((repo, node, store));
    let node = open(dir.path(), 1).await;
    assert_eq!(envelope_counts(&node, &[&ada]), before);
    // The audit log says what happened and still verifies.
    assert!(node.audit_verify().unwrap().entries > audit_before);
    let withdrawn = node
        .audit_entries(Some(&ada.id()))
        .unwrap()
        .iter()
        .filter(|e| e.outcome.starts_with("withdrawn"))
        .count();
    assert_eq!(withdrawn, 4, "one per document the transaction touched");
    let repo = Repository::new(node.clone(), repository::Config::default()).unwrap();
    assert_eq!(repo.read("Patient", p.id()).await.unwrap().json, p.json);
    for (t, id) in &ids {
        assert!(repo.read(t, id).await.is_err(), "{t}/{id} came back after reopen");
    }
    // The same transaction now goes through.
    let outcomes = repo.transaction(synthea_writes(&ada), app()).await.unwrap();
    assert_eq!(outcomes.len(), ids.len());
}

/// Refusals are found before anything is written: a document without a
/// write grant, two writes of one resource, a stale `If-Match`.
#[tokio::test]
async fn a_refused_transaction_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut ada = TestPatient::new().unwrap();
    let node = open(dir.path(), 1).await;
    onboard(&node, &mut ada, &[Collection::Core]).await;
    let repo = Repository::new(node.clone(), repository::Config::default()).unwrap();
    let p = repo
        .create(patient_resource(&ada.id().to_string()), None, app())
        .await
        .unwrap();
    let seq = node.last_seq();
    let create = |resource: Value| TxOp::Create {
        id: repository::new_resource_id().unwrap(),
        resource,
        if_none_exist: None,
    };
    let update = |base: Option<String>| TxOp::Update {
        resource_type: "Patient".into(),
        id: p.id().into(),
        resource: p.json.clone(),
        base_version: base,
        require_current: true,
    };
    // Labs: no grant. The Condition before it must not be written either.
    let mut condition = example("Condition-example.json");
    condition["subject"] = json!({"reference": format!("Patient/{}", p.id())});
    let mut observation = example("Observation-example.json");
    observation["subject"] = json!({"reference": format!("Patient/{}", p.id())});
    let err = repo
        .transaction(vec![create(condition.clone()), create(observation)], app())
        .await
        .unwrap_err();
    assert_eq!(err.op, 1);
    assert!(matches!(err.error, medmesh_node::Error::NoWriteGrant { .. }), "{err:?}");
    let err = repo
        .transaction(vec![create(condition.clone()), update(None), update(None)], app())
        .await
        .unwrap_err();
    assert_eq!(err.op, 2);
    assert!(
        matches!(err.error, medmesh_node::Error::DuplicateEdit { .. }),
        "{err:?}"
    );
    let err = repo
        .transaction(vec![create(condition), update(Some("0000000000000000".into()))], app())
        .await
        .unwrap_err();
    assert_eq!(err.op, 1);
    assert!(
        matches!(err.error, repository::Error::VersionConflict { .. }),
        "{err:?}"
    );
    assert_eq!(node.last_seq(), seq);
    assert_eq!(repo.patient_resources(ada.id()).await.unwrap().len(), 1);
}

/// FHIR's transaction rules, run by the repository: a conditional create is
/// searched again under the write (against the store and the creates before
/// it); a read that cannot succeed fails the transaction before anything is
/// written; reads and searches see the transaction's writes, and a resource
/// it deletes is gone.
#[tokio::test]
async fn a_transaction_rechecks_conditions_and_reads_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let mut ada = TestPatient::new().unwrap();
    let node = open(dir.path(), 1).await;
    onboard(&node, &mut ada, &[Collection::Core]).await;
    let repo = Repository::new(node.clone(), repository::Config::default()).unwrap();
    let p = repo
        .create(patient_resource(&ada.id().to_string()), None, app())
        .await
        .unwrap();
    let condition = |code: &str| {
        json!({"resourceType": "Condition", "subject": {"reference": format!("Patient/{}", p.id())},
               "code": {"coding": [{"system": "http://snomed.info/sct", "code": code}]}})
    };
    let create = |resource: Value, if_none_exist: Option<Query>| TxOp::Create {
        id: repository::new_resource_id().unwrap(),
        resource,
        if_none_exist,
    };
    let by_code = |code: &str| Some(Query::parse("Condition", &[("code", code)]).unwrap());
    let seq = node.last_seq();

    // The second create's condition matches the first create of the same transaction.
    let err = repo
        .transaction(
            vec![create(condition("111"), None), create(condition("111"), by_code("111"))],
            app(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.op, 1);
    assert!(matches!(err.error, repository::Error::ConditionalMatch), "{err:?}");
    assert_eq!(node.last_seq(), seq, "nothing written");

    // A read of a resource that does not exist fails before the write.
    let err = repo
        .transaction(
            vec![
                create(condition("222"), None),
                TxOp::Read {
                    resource_type: "Condition".into(),
                    id: "nowhere".into(),
                    version_id: None,
                },
            ],
            app(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.op, 1);
    assert!(matches!(err.error, medmesh_node::Error::NotFound { .. }), "{err:?}");
    assert_eq!(node.last_seq(), seq, "nothing written");

    // Writes, then the reads see them.
    let done = repo
        .transaction(
            vec![
                create(condition("333"), by_code("333")),
                TxOp::Search(Query::parse("Condition", &[("patient", format!("Patient/{}", p.id()))]).unwrap()),
            ],
            app(),
        )
        .await
        .unwrap();
    let (TxResult::Created(created), TxResult::Found(found)) = (&done[0], &done[1]) else {
        panic!("{done:?}");
    };
    assert_eq!(found.iter().map(|r| r.id()).collect::<Vec<_>>(), [created.id()]);

    // Now stored, the same conditional create is refused; a resource deleted
    // in a transaction cannot be read in it.
    let err = repo
        .transaction(vec![create(condition("333"), by_code("333"))], app())
        .await
        .unwrap_err();
    assert!(matches!(err.error, repository::Error::ConditionalMatch), "{err:?}");
    let err = repo
        .transaction(
            vec![
                TxOp::Delete {
                    resource_type: "Condition".into(),
                    id: created.id().into(),
                },
                TxOp::Read {
                    resource_type: "Condition".into(),
                    id: created.id().into(),
                    version_id: None,
                },
            ],
            app(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err.error, medmesh_node::Error::Deleted { .. }), "{err:?}");
    assert!(
        repo.read("Condition", created.id()).await.is_ok(),
        "the delete was not written"
    );
}

// ----- snapshot transfers as the receiver's snapshot ----------------------

/// B keeps a transfer's document as its local snapshot only once every
/// change in it was restored from a signed header and is held readable;
/// then B's first read replays nothing and shows what A shows. A document
/// with a change B did not restore, or before the restored envelopes are
/// ingested, or when B keeps a snapshot already, is not kept.
#[tokio::test]
async fn a_transfer_document_becomes_the_snapshot_only_when_every_change_is_held() {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let TransferPair {
        patient,
        a,
        b,
        repo,
        patient_resource: p,
    } = TransferPair::open(dirs.0.path(), dirs.1.path()).await;
    let pid = patient.id();
    for i in 0..40 {
        repo.create(observation(p.id(), &format!("{i}.25")), None, app())
            .await
            .unwrap();
    }
    repo.save_snapshots().await;
    let transfer = a.snapshot_transfer(pid, Collection::Labs).await.unwrap().unwrap();
    let headers: Vec<_> = transfer.covered.iter().map(|(_, h)| h.clone()).collect();
    let grants: Vec<Item> = a
        .items_after(0, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.meta.kind == ItemKind::Grant)
        .map(|i| Item::new(i.meta.kind, i.item.bytes))
        .collect();
    let from_a = Source::Peer(a.practice_id().peer_id());
    b.ingest(grants, from_a.clone()).await.unwrap();
    let keep = |restored: &medmesh_node::transfer::Restored| {
        let opened = b
            .open_transfer(transfer.patient, transfer.collection, &transfer.sealed_doc)
            .unwrap();
        opened
            .keep_as_snapshot(&b, pid, Collection::Labs, &restored.covered)
            .unwrap()
    };

    // One change of the document restored from no header: not kept, even
    // once everything restored is held.
    let opened = b
        .open_transfer(transfer.patient, transfer.collection, &transfer.sealed_doc)
        .unwrap();
    let partial = opened.restore(&b, &headers[1..]);
    assert_eq!(partial.covered.len(), headers.len() - 1);
    b.ingest_restored(partial.envelopes.clone(), from_a.clone(), None)
        .await
        .unwrap();
    assert!(!keep(&partial));
    // Every change restored, but the envelope of one not held yet.
    let all = b
        .restore_transfer(transfer.patient, transfer.collection, &transfer.sealed_doc, &headers)
        .unwrap();
    assert_eq!(all.covered.len(), headers.len());
    assert!(!keep(&all));
    assert!(b.load_snapshot(pid, Collection::Labs).unwrap().is_none());

    // All held: kept; B's first read replays nothing and equals A's.
    b.ingest_restored(all.envelopes.clone(), from_a, None).await.unwrap();
    assert!(keep(&all));
    let kept = b.load_snapshot(pid, Collection::Labs).unwrap().unwrap();
    assert_eq!(kept.covered.len(), headers.len());
    let load = b.load_collection(pid, Collection::Labs).await.unwrap();
    assert!(load.snapshot.is_some() && load.changes.is_empty(), "nothing to replay");
    let on_a: Vec<_> = render_all(&a, pid)
        .await
        .into_iter()
        .filter(|r| r.0.starts_with("Observation"))
        .collect();
    assert_eq!(render_all(&b, pid).await, on_a);
    // A snapshot B keeps already is not replaced.
    assert!(!keep(&all));
}

/// A transfer's document opens only for a holder of the key of every epoch
/// its changes were sealed under. B, left out of epoch 1's key shares (as
/// the CLI leaves out a practice one of whose grants it revokes) but given
/// epoch 2's again (a remaining reader at a later revocation, through
/// another grant), must not read A's epoch-1 changes from a document of
/// epochs 0–2 — it gets the envelopes of epoch 1 opaque, and so nothing of
/// the transfer. C, holding all three keys, restores every envelope.
#[tokio::test]
async fn a_transfer_document_opens_only_with_the_key_of_every_epoch_it_holds() {
    use medmesh_crypto::{Principal, SealedSnapshot};

    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let dir_c = tempfile::tempdir().unwrap();
    let TransferPair {
        mut patient,
        a,
        b,
        repo,
        patient_resource: p,
    } = TransferPair::open(dirs.0.path(), dirs.1.path()).await;
    let pid = patient.id();
    let c = open(dir_c.path(), 3).await;
    onboard(&c, &mut patient, &[Collection::Labs]).await;
    let share = |patient: &mut TestPatient, epoch, to: &Node| {
        let share = patient
            .share(Collection::Labs, epoch, Principal::Practice(to.practice_id()))
            .unwrap();
        vec![Item::new(ItemKind::KeyShare, share.encoded().to_vec())]
    };
    for epoch in 0..3 {
        if epoch > 0 {
            for to in [&a, &c] {
                to.submit(pid, share(&mut patient, epoch, to)).await.unwrap();
            }
        }
        for i in 0..4 {
            repo.create(observation(p.id(), &format!("{epoch}.{i}")), None, app())
                .await
                .unwrap();
        }
    }
    b.submit(pid, share(&mut patient, 2, &b)).await.unwrap();
    let epochs: HashSet<u64> = a
        .envelopes(&pid, Some(Collection::Labs))
        .unwrap()
        .iter()
        .map(|e| e.epoch)
        .collect();
    assert_eq!(epochs, HashSet::from([0, 1, 2]), "A wrote under each epoch");
    repo.save_snapshots().await;
    let transfer = a.snapshot_transfer(pid, Collection::Labs).await.unwrap().unwrap();
    let epoch_1 = patient.key(Collection::Labs, 1).unwrap().key_id;
    assert_eq!(
        SealedSnapshot::key_id(&transfer.sealed_doc).unwrap(),
        patient.key(Collection::Labs, 2).unwrap().key_id,
        "the newest epoch's layer is outermost"
    );
    match b.open_transfer(transfer.patient, transfer.collection, &transfer.sealed_doc) {
        Err(medmesh_node::Error::NoSnapshotKey(k)) => assert_eq!(k, epoch_1),
        Err(e) => panic!("B: {e}"),
        Ok(opened) => panic!("B, without epoch 1's key, opened a document holding epoch 1: {opened:?}"),
    }
    let headers: Vec<_> = transfer.covered.iter().map(|(_, h)| h.clone()).collect();
    let restored = c
        .restore_transfer(transfer.patient, transfer.collection, &transfer.sealed_doc, &headers)
        .unwrap();
    assert_eq!(restored.unrestored, 0);
    assert_eq!(
        restored.envelopes.len(),
        a.envelope_ids(&pid, Collection::Labs).unwrap().len()
    );
}

/// A local snapshot that covers an envelope a revocation's cut has since
/// excluded — the repository saves its cached document when it next writes
/// or stops, which may come before it hears of the exclusion — makes no
/// transfer: its document would show the receiver a change this node no
/// longer discloses. The snapshot is dropped, as a cold load drops it.
#[tokio::test]
async fn a_snapshot_covering_an_excluded_envelope_makes_no_transfer() {
    let dir = tempfile::tempdir().unwrap();
    let mut patient = TestPatient::new().unwrap();
    let pid = patient.id();
    let node = open(dir.path(), 1).await;
    let (grant, items) = patient.onboard(node.practice_id(), Collection::Labs).unwrap();
    node.submit(pid, items).await.unwrap();
    let repo = Repository::new(node.clone(), no_auto_snapshots()).unwrap();
    for i in 0..6 {
        repo.create(observation("example", &format!("{i}.5")), Some(pid), app())
            .await
            .unwrap();
    }
    repo.save_snapshots().await;
    assert!(node.snapshot_transfer(pid, Collection::Labs).await.unwrap().is_some());
    let saved = node.load_snapshot(pid, Collection::Labs).unwrap().unwrap();

    let actor = node.envelopes(&pid, Some(Collection::Labs)).unwrap()[0].actor;
    let revocation = patient
        .revoke(&grant, std::collections::BTreeMap::from([(actor, 3)]))
        .unwrap();
    let report = node
        .submit_revocation(pid, revocation.encoded().to_vec())
        .await
        .unwrap();
    assert_eq!(report.counts.excluded, 3);
    // The repository's cached document, saved before the exclusion reached it.
    assert!(
        node.save_snapshot(pid, Collection::Labs, &saved.covered, &saved.doc)
            .unwrap()
    );
    assert!(
        node.snapshot_transfer(pid, Collection::Labs).await.unwrap().is_none(),
        "a transfer of a document holding excluded changes"
    );
    assert!(
        node.load_snapshot(pid, Collection::Labs).unwrap().is_none(),
        "not dropped"
    );
}

// ----- resources bound to their patient (issue 15, item 4) -----------

fn condition(patient_id: &str, text: &str) -> Value {
    json!({
        "resourceType": "Condition",
        "code": {"text": text},
        "subject": {"reference": format!("Patient/{patient_id}")}
    })
}

/// What a read-write grantee of `patient` can write into one of its documents
/// with its own node key, whatever resource keys and types it chooses: each
/// resource created by one change of its own, sealed and stored at `by`.
async fn craft_creates(by: &Node, patient: PatientId, collection: Collection, resources: &[(&str, Value)]) {
    let actor = medmesh_node::records::actor_id(by.practice_id().as_bytes(), [9; 8]);
    let mut doc = medmesh_node::records::RecordDoc::new();
    for (i, (id, resource)) in resources.iter().enumerate() {
        let written = doc.create(&actor, 1_700_000_000_000 + i as i64, id, resource).unwrap();
        let decoded = medmesh_node::records::DecodedChange::from_bytes(&written.change).unwrap();
        let change = medmesh_crypto::Change {
            bytes: &written.change,
            hash: decoded.hash().0,
            actor: medmesh_crypto::ActorId(actor.to_bytes().try_into().unwrap()),
            seq: decoded.seq(),
        };
        by.write_change_by(app(), patient, collection, change).await.unwrap();
    }
}

/// Issue 15, item 4. Practice M, a read-write grantee of patient X only, writes
/// into X's `core` document a Condition under the key of one of patient Y's
/// Conditions, and an Observation (a `labs` type). Node A holds X and Y. Read
/// cold on A, in any order, Y's Condition stays Y's (located, read and updated
/// there); neither of M's resources shows in X's record; and an update whose
/// compartment patient is not the document's patient is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_change_cannot_claim_another_patients_resource_or_a_foreign_type() {
    let (dir_a, dir_m) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut x = TestPatient::new().unwrap();
    let mut y = TestPatient::new().unwrap();
    let a = open(dir_a.path(), 1).await;
    let m = open(dir_m.path(), 3).await;
    onboard(&a, &mut x, &[Collection::Core, Collection::Labs]).await;
    onboard(&a, &mut y, &[Collection::Core]).await;
    onboard(&m, &mut x, &[Collection::Core]).await;
    let repo = Repository::new(a.clone(), no_auto_snapshots()).unwrap();
    let px = repo
        .create(patient_resource(&x.id().to_string()), None, app())
        .await
        .unwrap();
    let py = repo
        .create(patient_resource(&y.id().to_string()), None, app())
        .await
        .unwrap();
    let cy = repo.create(condition(py.id(), "Y's own"), None, app()).await.unwrap();

    craft_creates(
        &m,
        x.id(),
        Collection::Core,
        &[
            (cy.id(), condition(px.id(), "M's claim")),
            ("lab-in-core", observation(px.id(), "1")),
        ],
    )
    .await;
    let items = m.items_after(0, 1000).await.unwrap();
    let incoming: Vec<Item> = items
        .iter()
        .filter(|i| matches!(i.meta.kind, ItemKind::Envelope | ItemKind::Grant))
        .map(|i| Item::new(i.meta.kind, i.item.bytes.clone()))
        .collect();
    let report = a
        .ingest(incoming, Source::Peer(m.practice_id().peer_id()))
        .await
        .unwrap();
    assert!(
        report.rejected.is_empty(),
        "M's envelopes are validly sealed and signed"
    );
    assert_eq!(a.envelope_ids(&x.id(), Collection::Core).unwrap().len(), 3);

    // Cold, X's record first (its document loads before anything asks for the key).
    for x_first in [true, false] {
        let cold = Repository::new(a.clone(), no_auto_snapshots()).unwrap();
        if x_first {
            let keys: Vec<String> = cold
                .patient_resources(x.id())
                .await
                .unwrap()
                .iter()
                .map(|r| r.key.clone())
                .collect();
            assert_eq!(
                keys,
                [px.key.as_str()],
                "case x_first={x_first}: M's resources hidden in X's record"
            );
        }
        assert_eq!(
            cold.location("Condition", cy.id()).await.unwrap(),
            (y.id(), Collection::Core),
            "case x_first={x_first}"
        );
        let read = cold.read("Condition", cy.id()).await.unwrap();
        assert_eq!(read.json["code"]["text"], "Y's own", "case x_first={x_first}");
        let lab = cold.read("Observation", "lab-in-core").await.unwrap_err();
        assert!(
            matches!(lab, medmesh_node::Error::NotFound { .. }),
            "case x_first={x_first}: {lab:?}"
        );
        let everything: Vec<String> = cold
            .everything(px.id())
            .await
            .unwrap()
            .iter()
            .map(|r| r.key.clone())
            .collect();
        assert_eq!(everything, [px.key.as_str()], "case x_first={x_first}");
    }

    // A local update of Y's Condition lands in Y's record, not X's.
    let cold = Repository::new(a.clone(), no_auto_snapshots()).unwrap();
    cold.patient_resources(x.id()).await.unwrap();
    let mut edited = cy.json.clone();
    edited["code"]["text"] = json!("Y's own, amended");
    cold.update("Condition", cy.id(), edited.clone(), None, false, app())
        .await
        .unwrap();
    assert_eq!(a.envelope_ids(&x.id(), Collection::Core).unwrap().len(), 3);
    assert_eq!(a.envelope_ids(&y.id(), Collection::Core).unwrap().len(), 3);
    // An update that would move Y's Condition to X is refused.
    let mut moved = edited;
    moved["subject"]["reference"] = json!(format!("Patient/{}", px.id()));
    let refused = cold
        .update("Condition", cy.id(), moved, None, false, app())
        .await
        .unwrap_err();
    assert!(matches!(refused, repository::Error::OtherPatient { .. }), "{refused:?}");
}

/// A resource is filed only under the one patient its compartment references
/// name: references to two patients, or to a patient not held, are refused; a
/// record chosen by the caller (`context`) never takes a resource that names
/// another patient.
#[tokio::test]
async fn a_resource_naming_two_patients_or_an_unknown_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut x = TestPatient::new().unwrap();
    let mut y = TestPatient::new().unwrap();
    let node = open(dir.path(), 1).await;
    onboard(&node, &mut x, &[Collection::Core, Collection::Labs]).await;
    onboard(&node, &mut y, &[Collection::Core, Collection::Labs]).await;
    let repo = Repository::new(node.clone(), repository::Config::default()).unwrap();
    let px = repo
        .create(patient_resource(&x.id().to_string()), None, app())
        .await
        .unwrap();
    let py = repo
        .create(patient_resource(&y.id().to_string()), None, app())
        .await
        .unwrap();
    let mut both = observation(px.id(), "1");
    both["performer"] = json!([{"reference": format!("Patient/{}", py.id())}]);
    let err = repo.create(both.clone(), None, app()).await.unwrap_err();
    assert!(matches!(err, repository::Error::PatientLink { .. }), "{err:?}");
    let err = repo.create(both, Some(x.id()), app()).await.unwrap_err();
    assert!(matches!(err, repository::Error::OtherPatient { .. }), "{err:?}");
    let unknown = repo
        .create(observation("someone-else", "1"), None, app())
        .await
        .unwrap_err();
    assert!(matches!(unknown, repository::Error::PatientLink { .. }), "{unknown:?}");
    assert!(node.envelope_ids(&x.id(), Collection::Labs).unwrap().is_empty());
    assert!(node.envelope_ids(&y.id(), Collection::Labs).unwrap().is_empty());
}
