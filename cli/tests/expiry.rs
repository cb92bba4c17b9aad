//! Issue 15, item 3: after a read-write grant expires, its holder can still
//! sign changes dated inside the window. The patient's CLI, on its next run
//! that reaches a node, revokes the expired grant with a cut and rotates
//! the keys it covered, and says so; from then on such back-dated writes
//! are rejected.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{NodeProcess, PASS, WAIT, grant_status, json_lines, medmesh, new_patient, stderr};
use medmesh_crypto::{Collection, Envelope, Keystore, SecretIdentity};
use medmesh_node::testing::ChangeMaker;
use medmesh_sync::memory::MemoryBackend;
use medmesh_sync::{Item, Multiaddr, SyncHandle};

/// Hands `envelope` to the node over libp2p; the node's (accepted, rejected)
/// counts. Any peer may carry an envelope and the node judges it on signed
/// data alone; the patient's key carries it here only because a sending
/// node withholds what its own consent filter would not serve.
async fn relay(node: &NodeProcess, carrier: &SecretIdentity, envelope: &Envelope) -> (u64, u64) {
    let relay = SyncHandle::spawn(medmesh_sync::Config::client(), carrier, Arc::new(MemoryBackend::new()))
        .await
        .unwrap();
    let addr: Multiaddr = node.listen.parse().unwrap();
    let peer = relay.dial(addr).await.unwrap();
    let report = relay
        .push(peer, vec![Item::envelope(envelope)], Vec::new())
        .await
        .unwrap();
    let _ = relay.shutdown().await;
    (report.accepted, report.rejected)
}

#[test]
fn an_expired_grant_is_revoked_on_the_next_run_and_back_dated_writes_are_rejected() {
    let root = tempfile::tempdir().unwrap();
    let patient = root.path().join("patient");
    let node_home = root.path().join("practice");
    let node = NodeProcess::start(&node_home);
    new_patient(&patient);
    let out = medmesh(&patient)
        .args([
            "--json",
            "patient",
            "grant",
            "--node",
            &node.listen,
            "--to",
            &node.peer_id,
        ])
        .args(["--write", "--collections", "core", "--for", "3s"])
        .output()
        .unwrap();
    assert!(out.status.success(), "grant: {}", stderr(&out));
    let grant_id = json_lines(&out)[0]["grant_id"].as_str().unwrap().to_owned();

    // What the practice holds: its node key and the epoch-0 key of core.
    let practice = medmesh_node::load_or_create_identity(&node_home.join("node"), None).unwrap();
    let keystore = Keystore::open(&patient.join("patient").join("keystore.mmks"), PASS.as_bytes()).unwrap();
    let key = keystore
        .keys
        .iter()
        .find(|k| k.collection == Collection::Core && k.epoch == 0)
        .unwrap()
        .clone();
    let grant = keystore
        .grants
        .iter()
        .find(|g| g.id().to_string() == grant_id)
        .unwrap()
        .clone();
    let expires = grant.terms().expires.unwrap();

    // The grant runs out; nothing has run on the patient's side since.
    let deadline = Instant::now() + WAIT;
    while grant_status(&patient, &grant_id) != "expired" {
        assert!(Instant::now() < deadline, "the grant never expired");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Back-dated changes signed by the practice after expiry.
    let mut maker = ChangeMaker::new(practice.practice_id().unwrap().as_bytes()).unwrap();
    let back_dated = |change: &medmesh_node::testing::OwnedChange| {
        Envelope::seal(
            (key.patient, key.collection),
            &key,
            &practice,
            Some(grant.id()),
            change.as_change(),
            expires - 1000,
        )
        .unwrap()
    };
    let first = back_dated(&maker.put("note", "before the patient's next run").unwrap());
    let second = back_dated(&maker.put("note", "after the patient's next run").unwrap());
    let mut fresh = ChangeMaker::new(practice.practice_id().unwrap().as_bytes()).unwrap();
    let third = back_dated(&fresh.put("note", "a fresh actor").unwrap());
    let carrier = SecretIdentity::from_seed(&keystore.identity().seed());
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The window the threat model states: until the patient's next run, it lands.
    assert_eq!(rt.block_on(relay(&node, &carrier, &first)), (1, 0));

    // Any command that reaches the node ends the expired grant, and says so.
    let out = medmesh(&patient)
        .args(["--json", "patient", "records", "--node", &node.listen])
        .output()
        .unwrap();
    assert!(out.status.success(), "records: {}", stderr(&out));
    let notices: Vec<serde_json::Value> = stderr(&out)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v.get("expired_grant").is_some())
        .collect();
    assert_eq!(notices.len(), 1, "stderr: {}", stderr(&out));
    assert_eq!(notices[0]["expired_grant"], grant_id.as_str());
    assert_eq!(notices[0]["rotated"][0]["collection"], "core");
    assert_eq!(notices[0]["rotated"][0]["epoch"], 1);
    assert_eq!(grant_status(&patient, &grant_id), "revoked");

    // Later back-dated writes of that practice are rejected, whatever actor.
    assert_eq!(
        rt.block_on(relay(&node, &carrier, &second)),
        (0, 1),
        "next seq of a cut actor"
    );
    assert_eq!(
        rt.block_on(relay(&node, &carrier, &third)),
        (0, 1),
        "an actor outside the cut"
    );

    // Handled once: the next run says nothing more.
    let out = medmesh(&patient)
        .args(["--json", "patient", "records", "--node", &node.listen])
        .output()
        .unwrap();
    assert!(out.status.success(), "records: {}", stderr(&out));
    assert!(!stderr(&out).contains("expired_grant"), "{}", stderr(&out));
}
