//! The FHIR repository over a real node: create/read/update/delete/search,
//! durability across reopen, and identical resources on a second node that
//! ingests the first node's envelopes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use medmesh_crypto::{Collection, SecretIdentity};
use medmesh_node::records::Query;
use medmesh_node::repository::{self, Repository};
use medmesh_node::store::ItemKind;
use medmesh_node::testing::TestPatient;
use medmesh_node::{Actor, Config, Incoming, Node, Source};
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

    let query = Query::parse("Observation", &[("code", "http://loinc.org|8302-2")]).unwrap();
    let found = repo.search(&query, Some(p.id())).await.unwrap();
    assert_eq!(found.len(), 1);
    let everything = repo.everything(p.id()).await.unwrap();
    assert_eq!(everything.len(), 2);
    assert_eq!(everything[0].key, p.key);

    let orphan = repo
        .create(observation("does-not-exist", "1"), None, app())
        .await
        .unwrap_err();
    assert!(
        matches!(orphan, repository::Error::UnresolvedPatient { .. }),
        "{orphan:?}"
    );

    repo.delete("Patient", p.id(), app()).await.unwrap();
    let gone = repo.read("Patient", p.id()).await.unwrap_err();
    assert!(matches!(
        gone,
        repository::Error::Record(medmesh_node::records::Error::Deleted { .. })
    ));

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
    assert!(matches!(err, repository::Error::Node(_)), "{err:?}");
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
        let envelopes: Vec<Incoming> = items
            .iter()
            .filter(|i| matches!(i.meta.kind, ItemKind::Envelope | ItemKind::Grant))
            .map(|i| Incoming::new(i.meta.kind, i.bytes.clone()))
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
