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

/// One `patient audit --json` run: its exit, the entries and the checkpoint verdict.
struct AuditRun {
    success: bool,
    entries: Vec<Value>,
    checkpoint: Value,
    stderr: String,
}

fn audit_run(home: &Path, node: &str) -> AuditRun {
    let out = medmesh(home)
        .args(["--json", "patient", "audit", "--node", node])
        .output()
        .unwrap();
    let (checkpoint, entries): (Vec<Value>, Vec<Value>) = json_lines(&out)
        .into_iter()
        .partition(|l| l.get("checkpoint").is_some());
    AuditRun {
        success: out.status.success(),
        entries,
        checkpoint: checkpoint
            .into_iter()
            .next()
            .map_or(Value::Null, |c| c["checkpoint"].clone()),
        stderr: stderr(&out),
    }
}

fn audit(home: &Path, node: &str) -> Vec<Value> {
    let run = audit_run(home, node);
    assert!(run.success, "patient audit failed: {}", run.stderr);
    assert_eq!(run.checkpoint["status"], "ok", "{}", run.checkpoint);
    run.entries
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

/// The node's store, opened as someone holding its data directory would
/// (the node process is stopped: sled allows one process).
fn node_store(node_home: &Path) -> medmesh_node::store::SledStore {
    medmesh_node::store::SledStore::open(&node_home.join("node").join(medmesh_node::STORE_DIR)).unwrap()
}

/// Issue 15, item 8: between two queries, someone holding the node's data
/// directory (not its key) cuts the last entries of its audit log. The
/// second `patient audit` compares with the checkpoint the first one kept,
/// says so loudly and fails; so does every later run, and `audit verify`
/// on the node's side.
#[test]
fn a_cut_of_the_audit_log_between_two_patient_queries_is_flagged() {
    use medmesh_node::store::Store as _;
    let root = tempfile::tempdir().unwrap();
    let (node_home, patient_home) = (root.path().join("node"), root.path().join("patient"));
    let mut node = NodeProcess::start(&node_home);
    new_patient(&patient_home);
    grant_to_node(&patient_home, &node, true);
    let first = audit_run(&patient_home, &node.listen);
    assert!(first.success, "{}", first.stderr);
    assert_eq!(first.checkpoint["status"], "ok", "{}", first.checkpoint);
    let kept = first.checkpoint["head_seq"].as_u64().unwrap();
    assert!(
        first.checkpoint["verified_entries"].as_u64().unwrap() >= 3,
        "{}",
        first.checkpoint
    );
    assert!(node.stop().is_some());

    // Everything after the first entry goes: the grant, its key shares and
    // the patient's read at least (a restarted node appends an entry or two
    // of its own, which must not reach the kept seq again).
    assert!(kept >= 8, "{}", first.checkpoint);
    let store = node_store(&node_home);
    store.raw_truncate_audit(2).unwrap();
    drop(store);

    let mut node = NodeProcess::start(&node_home);
    let second = audit_run(&patient_home, &node.listen);
    assert!(!second.success, "a cut audit log passed: {}", second.checkpoint);
    assert_eq!(second.checkpoint["status"], "regression", "{}", second.checkpoint);
    assert_eq!(second.checkpoint["kept_seq"], kept);
    assert!(second.stderr.contains("removed"), "{}", second.stderr);
    // The human form says it loudly.
    let out = medmesh(&patient_home)
        .args(["patient", "audit", "--node", &node.listen])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("WARNING"), "{text}");
    // The node's own check finds its signed checkpoint above the log's end.
    let out = medmesh(&node_home).args(["audit", "verify"]).output().unwrap();
    assert!(!out.status.success(), "audit verify passed a cut log");
    assert!(stderr(&out).contains("were removed"), "{}", stderr(&out));
    assert!(node.stop().is_some());
}

/// Whoever holds the node key as well can rewrite the log and re-sign its
/// checkpoint, so the node's own `audit verify` passes; the checkpoint the
/// patient kept still names the old entry, and the next query reports a
/// fork.
#[test]
fn a_rewrite_with_the_node_key_is_flagged_as_a_fork_by_the_patient() {
    use medmesh_node::audit::{Action, ActorKind, AuditRecord};
    use medmesh_node::store::{Batch, Op, Store as _};
    let root = tempfile::tempdir().unwrap();
    let (node_home, patient_home) = (root.path().join("node"), root.path().join("patient"));
    let mut node = NodeProcess::start(&node_home);
    new_patient(&patient_home);
    grant_to_node(&patient_home, &node, true);
    let first = audit_run(&patient_home, &node.listen);
    assert!(first.success, "{}", first.stderr);
    let kept = first.checkpoint["head_seq"].as_u64().unwrap();
    assert!(node.stop().is_some());

    let identity = medmesh_node::load_or_create_identity(&node_home.join("node"), None).unwrap();
    let store = node_store(&node_home);
    store.raw_truncate_audit(kept - 1).unwrap();
    drop(store);
    let store = node_store(&node_home);
    let mut batch = Batch::new();
    for _ in 0..3 {
        batch.push(Op::Audit(AuditRecord {
            actor_kind: ActorKind::Node,
            actor_id: "rewritten".into(),
            action: Action::Read,
            patient: None,
            items: vec![],
            grant: None,
            outcome: "ok".into(),
        }));
    }
    store.commit(&batch).unwrap();
    let (seq, head) = store.audit_head();
    let resigned = medmesh_crypto::AuditCheckpoint::sign(
        medmesh_crypto::AuditCheckpointTerms {
            node: identity.practice_id().unwrap(),
            seq,
            head,
            time: medmesh_crypto::now(),
        },
        &identity,
    )
    .unwrap();
    store.put_audit_checkpoint(resigned.encoded()).unwrap();
    store.flush().unwrap();
    drop(store);

    let mut node = NodeProcess::start(&node_home);
    let out = medmesh(&node_home).args(["audit", "verify"]).output().unwrap();
    assert!(
        out.status.success(),
        "the node's own check cannot tell: {}",
        stderr(&out)
    );
    let second = audit_run(&patient_home, &node.listen);
    assert!(!second.success, "a rewritten audit log passed: {}", second.checkpoint);
    assert_eq!(second.checkpoint["status"], "fork", "{}", second.checkpoint);
    assert!(second.stderr.contains("rewritten"), "{}", second.stderr);
    assert!(node.stop().is_some());
}
