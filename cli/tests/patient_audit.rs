//! `medmesh patient audit` end to end: a real node process on loopback, a
//! patient who grants it access, and the patient's accounting of
//! disclosures fetched over libp2p as the patient. The node is stopped with
//! SIGTERM at the end (also when an assertion fails).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{NodeProcess, PASS, grant_to_node, json_lines, medmesh, new_patient, stderr};
use medmesh_crypto::Keystore;
use serde_json::Value;

fn audit(home: &Path, node: &str) -> Vec<Value> {
    let out = medmesh(home)
        .args(["--json", "patient", "audit", "--node", node])
        .output()
        .unwrap();
    assert!(out.status.success(), "patient audit failed: {}", stderr(&out));
    json_lines(&out)
}

#[test]
fn patient_audit_shows_the_grant_the_node_received_and_the_patients_own_reads() {
    let root = tempfile::tempdir().unwrap();
    let (node_home, patient_home, other_home) = (
        root.path().join("node"),
        root.path().join("patient"),
        root.path().join("other"),
    );
    let mut node = NodeProcess::start(&node_home);

    let did = new_patient(&patient_home);
    let granted = grant_to_node(&patient_home, &node, true);
    let grant_id = granted["grant_id"].as_str().unwrap().to_owned();

    // The grant's item id, from the keystore.
    let keystore = Keystore::open(&patient_home.join("patient/keystore.mmks"), PASS.as_bytes()).unwrap();
    let grant = keystore.grants.iter().find(|g| g.id().to_string() == grant_id).unwrap();
    let grant_item = medmesh_sync::ItemId::digest(grant.encoded()).to_string();

    let entries = audit(&patient_home, &node.listen);
    let granted = entries
        .iter()
        .find(|e| e["action"] == "grant" && e["grant"] == grant_id.as_str())
        .unwrap_or_else(|| panic!("no grant entry for {grant_id}: {entries:#?}"));
    assert_eq!(granted["items"], serde_json::json!([grant_item]), "{granted}");
    assert_eq!(granted["item_count"], 1);
    // Submitted by the patient's CLI, whose libp2p identity is the patient key:
    // the node records the patient, not an anonymous peer.
    assert_eq!(granted["actor_kind"], "patient", "{granted}");
    assert_eq!(granted["actor_id"], did.as_str(), "{granted}");
    assert_eq!(granted["outcome"], "ok");
    assert_eq!(granted["patient"], did.as_str());
    // The key shares that came with it (the patient's and the grantee's).
    assert!(
        entries.iter().filter(|e| e["action"] == "key-share").count() >= 2,
        "{entries:#?}"
    );
    assert!(entries.windows(2).all(|w| w[0]["seq"].as_u64() < w[1]["seq"].as_u64()));
    for e in &entries {
        for key in [
            "seq",
            "time",
            "at",
            "actor_kind",
            "actor_id",
            "action",
            "items",
            "outcome",
            "hash",
        ] {
            assert!(e.get(key).is_some(), "entry lacks {key}: {e}");
        }
        let at = e["at"].as_str().unwrap();
        time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|err| panic!("{at:?} is not RFC 3339: {err}"));
    }

    // The first query is itself in the log, as a read by the patient.
    let again = audit(&patient_home, &node.listen);
    assert!(
        again
            .iter()
            .any(|e| e["action"] == "read" && e["actor_kind"] == "patient" && e["actor_id"] == did.as_str()),
        "the first audit query was not recorded: {again:#?}"
    );

    // Human output: one line per entry and a count.
    let out = medmesh(&patient_home)
        .args(["patient", "audit", "--node", &node.listen])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains(&format!("grant {grant_id}")) && text.contains("(you)"),
        "{text}"
    );
    assert!(text.contains("entries about you"), "{text}");

    // Another patient at the same node sees nothing of this one.
    medmesh(&other_home).args(["patient", "new"]).assert().success();
    let theirs = audit(&other_home, &node.listen);
    assert!(
        theirs
            .iter()
            .all(|e| e["patient"] != did.as_str() && e["actor_id"] != did.as_str()),
        "another patient saw this patient's entries: {theirs:#?}"
    );

    // Bad input: a one-line error and a non-zero exit.
    let out = medmesh(&patient_home)
        .args(["patient", "audit", "--node", "/ip4/127.0.0.1/tcp/1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(stderr(&out).trim().lines().count(), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("/p2p/"), "{}", stderr(&out));

    let status = node.stop().expect("the node did not stop on SIGTERM");
    assert!(status.success(), "node exited with {status}");
}
