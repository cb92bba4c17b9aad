//! Issue 16, with real node processes: a grant to a practice that is down
//! when the patient grants reaches it once it is back on its (fixed) port —
//! the node the patient reached owes it the grant and tries again — and
//! the practice then holds exactly the granted collection; and the patient's
//! CLI says per practice whether it is delivered or pending, since when and
//! why (the node's outbox, asked over `/medmesh/sync/1` by the patient only).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{NodeProcess, grant_status, grant_to_node, medmesh, new_patient, patient_records, stderr};
use serde_json::json;

#[test]
fn a_grant_to_a_practice_that_is_down_reaches_it_when_it_is_back() {
    let root = tempfile::tempdir().unwrap();
    let patient = root.path().join("patient");
    let (home_a, home_b) = (root.path().join("a"), root.path().join("b"));
    let a = NodeProcess::start_with(&home_a, &[]);
    let mut b = NodeProcess::start_with(&home_b, &[]);
    let b_addr = b.listen.clone();
    b.stop();

    // The patient's record at A: a Patient, a lab and a condition.
    let did = new_patient(&patient);
    grant_to_node(&patient, &a, true);
    import_lab(root.path(), &home_a, &did, 5.4, true);

    // B is down: the grant of labs is taken at A all the same.
    let out = medmesh(&patient)
        .args(["--json", "patient", "grant", "--node", &a.listen, "--to", &b_addr])
        .args(["--collections", "labs"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    // B comes back on its port: A delivers, B pulls exactly the labs.
    let b = NodeProcess::start_with(&home_b, &[]);
    assert_eq!(b.listen, b_addr, "B is back where it was");
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        if let [lab] = patient_records(&patient, &b, "Observation").as_slice() {
            assert_eq!(lab["valueQuantity"]["value"].to_string(), "5.4");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "B never received the labs granted while it was down"
        );
    }
    assert!(
        patient_records(&patient, &b, "Condition").is_empty(),
        "B holds a collection it was not granted"
    );
    let outcome = |bundle: &serde_json::Value| {
        bundle["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["search"]["mode"] == "outcome")
            .map(|e| e["resource"].to_string())
            .collect::<String>()
    };
    // B's apps find the labs by the patient's did: B holds no Patient
    // resource. Until B's reconciliation with A is noted, the answer may warn
    // that the record is incomplete; then it carries no outcome at all.
    let found = loop {
        let (status, found) = b.get(&format!("/fhir/Observation?patient={did}"));
        assert_eq!(status, 200, "{found}");
        assert_eq!(found["total"], 1, "{found}");
        if outcome(&found).is_empty() {
            break found;
        }
        assert!(outcome(&found).contains("incomplete"), "{found}");
        assert!(
            std::time::Instant::now() < deadline,
            "B's labs never stopped warning: {found}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // The same by the identifier that links a Patient to its patient.
    let (status, by_identifier) = b.get(&format!(
        "/fhir/Observation?subject:identifier=urn:ietf:rfc:3986%7C{did}"
    ));
    assert_eq!((status, &by_identifier["total"]), (200, &json!(1)), "{by_identifier}");
    let (status, none) = b.get(&format!("/fhir/Observation?patient=Patient/{}", "x"));
    assert_eq!((status, none["entry"].as_array().map_or(0, Vec::len)), (200, 0));
    // Nothing of the conditions here, and the answer says why: not granted.
    let (status, conditions) = b.get(&format!("/fhir/Condition?patient={did}"));
    assert_eq!(status, 200, "{conditions}");
    assert_eq!(conditions["total"], 0, "{conditions}");
    assert!(
        outcome(&conditions).contains("cannot read this patient's core collection"),
        "{conditions}"
    );
    assert!(
        outcome(&found).is_empty(),
        "a readable collection explained away: {found}"
    );
}

/// The Observations B's own apps find at B's gateway (B holds no Patient:
/// a search without a patient scans what B can read).
fn observations_at(node: &NodeProcess) -> usize {
    let (status, bundle) = node.get("/fhir/Observation");
    assert_eq!(status, 200, "{bundle}");
    bundle["entry"].as_array().map_or(0, Vec::len)
}

/// Imports one glucose Observation (and its Patient, linked to `did`) at the node of `home`.
/// Imports at `home`'s node, for `did`: a Patient and a glucose lab of
/// `value` (labs), and with `condition` a Condition too (core).
fn import_lab(root: &std::path::Path, home: &std::path::Path, did: &str, value: f64, condition: bool) {
    let subject = "urn:uuid:8a1e3c55-7b2d-4f09-b6a4-2d9c0e5f7a13";
    let mut entries = vec![
        json!({"fullUrl": subject, "resource": {"resourceType": "Patient", "name": [{"family": "Adeyemi"}]}}),
        json!({"resource": {"resourceType": "Observation", "status": "final",
                            "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7", "display": "Glucose"}]},
                            "subject": {"reference": subject},
                            "valueQuantity": {"value": value, "unit": "mmol/L"}}}),
    ];
    if condition {
        entries.push(
            json!({"resource": {"resourceType": "Condition", "code": {"text": "Type 2 diabetes"},
                                         "subject": {"reference": subject}}}),
        );
    }
    let bundle = json!({"resourceType": "Bundle", "type": "collection", "entry": entries});
    let file = root.join(format!("lab-{value}.json"));
    std::fs::write(&file, bundle.to_string()).unwrap();
    let out = medmesh(home)
        .args(["--json", "fhir", "import", "--patient", did])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Revoking one of two grants a practice holds for the same collection
/// rotates that collection's key: the practice's other grant is still in
/// force, so it must get the new epoch's key and read what is written after.
#[test]
fn revoking_one_of_two_grants_to_a_practice_keeps_the_other_readable() {
    let root = tempfile::tempdir().unwrap();
    let patient = root.path().join("patient");
    let (home_a, home_b) = (root.path().join("a"), root.path().join("b"));
    let (a, b) = (NodeProcess::start(&home_a), NodeProcess::start(&home_b));
    let did = new_patient(&patient);
    grant_to_node(&patient, &a, true);
    import_lab(root.path(), &home_a, &did, 5.4, false);

    let mut ids = Vec::new();
    for collections in ["labs", "labs,core"] {
        let out = medmesh(&patient)
            .args(["--json", "patient", "grant", "--node", &a.listen, "--to", &b.listen])
            .args(["--collections", collections])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        ids.push(common::json_lines(&out)[0]["grant_id"].as_str().unwrap().to_owned());
    }
    let deadline = std::time::Instant::now() + common::WAIT;
    while observations_at(&b) < 1 {
        assert!(std::time::Instant::now() < deadline, "B never read the first lab");
    }

    let out = medmesh(&patient)
        .args(["--json", "patient", "revoke", "--node", &a.listen, &ids[1]])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // B is up: the revocation reached it, and the command says so.
    let revoked = common::json_lines(&out).remove(0);
    assert_eq!(
        revoked["delivery"],
        json!([{"peer": b.peer_id, "status": "delivered"}]),
        "{revoked}"
    );
    import_lab(root.path(), &home_a, &did, 6.1, false);
    while observations_at(&b) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "B, still granted labs, cannot read the lab written after the other grant's revocation"
        );
    }
}

/// A grant the CLI could not hand to any node is not "in force": the
/// command fails saying how to finish, `patient grants` lists it as not
/// submitted, no other command sends it along, and `patient submit` hands
/// it over once the node is up.
#[test]
fn a_grant_that_could_not_be_submitted_is_kept_as_not_submitted() {
    let root = tempfile::tempdir().unwrap();
    let patient = root.path().join("patient");
    let home = root.path().join("practice");
    let mut node = NodeProcess::start_with(&home, &[]);
    let (addr, peer) = (node.listen.clone(), node.peer_id.clone());
    node.stop();
    let did = new_patient(&patient);

    let out = medmesh(&patient)
        .args(["--json", "patient", "grant", "--node", &addr, "--to", &peer, "--write"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a grant to a node that is down reported success");
    let said = stderr(&out);
    assert!(
        said.contains("not submitted") && said.contains("patient submit"),
        "{said}"
    );
    let id = said
        .split("grant ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_owned();
    assert_eq!(grant_status(&patient, &id), "not submitted");

    let node = NodeProcess::start_with(&home, &[]);
    let out = medmesh(&patient)
        .args(["--json", "patient", "submit", "--node", &node.listen, &id])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let submitted = common::json_lines(&out).remove(0);
    assert_eq!(submitted["submitted"], true);
    assert_eq!(
        submitted["delivery"],
        json!([{"peer": peer, "status": "delivered"}]),
        "the node reached took its own grant: {submitted}"
    );
    assert_eq!(grant_status(&patient, &id), "in force");
    // The node took it.
    let (status, consents) = node.get(&format!("/fhir/Consent?patient={did}"));
    assert_eq!(status, 200, "{consents}");
    assert!(
        consents.to_string().contains(&id),
        "the node does not show the grant: {consents}"
    );
}

/// The delivery `patient grants --node` reports for grant `id` (its
/// `delivery` object: status, and since/attempts/error while pending).
fn grant_delivery(patient: &std::path::Path, node: &NodeProcess, id: &str) -> serde_json::Value {
    let out = medmesh(patient)
        .args(["--json", "patient", "grants", "--node", &node.listen])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    common::json_lines(&out)
        .into_iter()
        .find(|g| g["grant_id"] == id)
        .map(|g| g["delivery"].clone())
        .unwrap()
}

/// Issue 16, "the CLI reports per target: delivered, or pending since when
/// and why": a grant to a practice that is down is reported pending with
/// the node's reason (by `grant`, `grants --node` and the practice's
/// `/api/outbox`); once the practice is back, delivered.
#[test]
fn a_grant_to_a_practice_that_is_down_is_reported_pending_with_a_reason_then_delivered() {
    let root = tempfile::tempdir().unwrap();
    let patient = root.path().join("patient");
    let (home_a, home_b) = (root.path().join("a"), root.path().join("b"));
    let a = NodeProcess::start_with(&home_a, &[]);
    let mut b = NodeProcess::start_with(&home_b, &[]);
    let (b_addr, b_peer) = (b.listen.clone(), b.peer_id.clone());
    b.stop();
    let did = new_patient(&patient);
    // A grant to the node reached: A took it, nothing to deliver elsewhere.
    let first = grant_to_node(&patient, &a, true);
    assert_eq!(
        first["delivery"],
        json!([{"peer": a.peer_id, "status": "delivered"}]),
        "{first}"
    );

    let out = medmesh(&patient)
        .args(["--json", "patient", "grant", "--node", &a.listen, "--to", &b_addr])
        .args(["--collections", "labs"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let granted = common::json_lines(&out).remove(0);
    let id = granted["grant_id"].as_str().unwrap().to_owned();
    let to_b = granted["delivery"]
        .as_array()
        .and_then(|d| d.iter().find(|t| t["peer"] == b_peer))
        .cloned()
        .unwrap_or_else(|| panic!("no delivery to B reported: {granted}"));
    assert_eq!(to_b["status"], "pending", "{granted}");
    assert!(
        to_b["attempts"].as_u64().unwrap() >= 1,
        "the first try never settled: {granted}"
    );
    let why = to_b["error"].as_str().unwrap();
    // Why, as the transport saw it: B's port refuses connections.
    assert!(why.starts_with("could not connect: /ip4/127.0.0.1/"), "{granted}");
    assert!(
        to_b["since"].as_u64().unwrap() > 0 && to_b["since_at"].is_string(),
        "{granted}"
    );
    // The same in text: "pending since <time>: <why>".
    let pending = grant_delivery(&patient, &a, &id);
    assert_eq!(pending["status"], "pending", "{pending}");
    let out = medmesh(&patient)
        .args(["patient", "grants", "--node", &a.listen])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text.lines().find(|l| l.starts_with(&id)).unwrap();
    assert!(line.contains("pending since ") && line.contains(why), "{line}");
    // The practice's staff see it at A's management API.
    let (status, outbox) = a.get(&format!("/api/outbox?patient={did}"));
    assert_eq!(status, 200, "{outbox}");
    let owed_b: Vec<&serde_json::Value> = outbox["owed"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["peer"] == b_peer)
        .collect();
    assert!(
        !owed_b.is_empty() && owed_b.iter().all(|o| o["attempts"].as_u64() >= Some(1)),
        "{outbox}"
    );

    // A node that cannot be reached: the list comes from the keystore all the same.
    let out = medmesh(&patient)
        .args(["--json", "patient", "grants", "--node", &b_addr])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let offline = common::json_lines(&out);
    assert!(
        offline
            .iter()
            .any(|g| g["grant_id"] == id && g["status"] == "in force" && g.get("delivery").is_none()),
        "{offline:?}"
    );
    assert!(stderr(&out).contains("delivery_error"), "{}", stderr(&out));

    // B is back on its port: A delivers, and says so.
    let b = NodeProcess::start_with(&home_b, &[]);
    assert_eq!(b.listen, b_addr);
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let delivery = grant_delivery(&patient, &a, &id);
        if delivery["status"] == "delivered" {
            assert_eq!(delivery["peer"], b_peer);
            break;
        }
        assert_eq!(delivery["status"], "pending", "{delivery}");
        assert!(
            std::time::Instant::now() < deadline,
            "A never delivered the grant to B: {delivery}"
        );
    }
    let (status, outbox) = a.get(&format!("/api/outbox?patient={did}"));
    assert_eq!(status, 200, "{outbox}");
    assert!(
        outbox["owed"].as_array().unwrap().iter().all(|o| o["peer"] != b_peer),
        "{outbox}"
    );
    // Without --node, the keystore alone: no delivery field, same status.
    assert_eq!(common::grant_status(&patient, &id), "in force");
}

/// The outbox report is the patient's alone: another patient's key asking
/// a node about this patient is refused, and learns nothing.
#[test]
fn a_foreign_identity_is_refused_the_delivery_report() {
    use std::sync::Arc;

    use medmesh_crypto::{Keystore, PatientId};
    use medmesh_sync::memory::MemoryBackend;
    use medmesh_sync::{Multiaddr, SyncHandle};

    let root = tempfile::tempdir().unwrap();
    let (patient, stranger) = (root.path().join("patient"), root.path().join("stranger"));
    let a = NodeProcess::start(&root.path().join("a"));
    let did: PatientId = new_patient(&patient).parse().unwrap();
    grant_to_node(&patient, &a, true);
    let own: PatientId = new_patient(&stranger).parse().unwrap();
    let keystore = Keystore::open(&stranger.join("patient").join("keystore.mmks"), common::PASS.as_bytes()).unwrap();
    let identity = medmesh_crypto::SecretIdentity::from_seed(&keystore.identity().seed());

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let sync = SyncHandle::spawn(
            medmesh_sync::Config::client(),
            &identity,
            Arc::new(MemoryBackend::new()),
        )
        .await
        .unwrap();
        let node = sync.dial(a.listen.parse::<Multiaddr>().unwrap()).await.unwrap();
        match sync.outbox_of(node, did).await {
            Err(medmesh_sync::Error::Refused { reason, .. }) => {
                assert!(reason.contains("only the patient"), "{reason}");
            }
            other => panic!("another patient's key got an answer about this patient: {other:?}"),
        }
        // Its own question is answered (it has nothing there).
        let mine = sync.outbox_of(node, own).await.unwrap();
        assert!(mine.owed.is_empty() && mine.held.is_empty(), "{mine:?}");
        let _ = sync.shutdown().await;
    });
}

/// Issue 16: a grant to practices that stay down for an hour reaches them
/// when they come back — one on its port, one on a new port that only the
/// Kademlia network (through a third node) can tell — and each holds
/// exactly the collection granted.
///
/// The hour is simulated by what it leaves behind at A: twelve failed
/// tries of each debt at the longest wait between tries (an hour of the
/// default five minutes), with that wait set to 1 s in A's config so the
/// test takes seconds. What must hold after it: the debt is still owed, the
/// known address of the moved practice is stale, and the next try finds it.
#[test]
fn practices_down_for_an_hour_get_their_grant_on_the_same_port_and_on_a_new_one() {
    const TRIES_IN_AN_HOUR: u64 = 12;
    let root = tempfile::tempdir().unwrap();
    let patient = root.path().join("patient");
    let home = |name: &str| root.path().join(name);
    // TCP only: a dial to a practice that is down fails at once (a QUIC
    // dial waits out its handshake timeout), so an hour's tries take seconds.
    const TCP: [&str; 2] = ["--listen", "/ip4/127.0.0.1/tcp/0"];
    // C: a node both sides know, to look peers up through.
    let c = NodeProcess::start_with(&home("c"), &[&TCP[..], &["--kademlia"]].concat());
    let joined = [&TCP[..], &["--kademlia", "--peer", c.listen.as_str()]].concat();
    let out = medmesh(&home("a")).args(["--json", "node", "init"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let config_path = home("a").join("node/config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["redelivery_max_backoff_secs"] = json!(1);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let a = NodeProcess::start_with(&home("a"), &joined);
    let (mut same, mut moved) = (
        NodeProcess::start_with(&home("same"), &joined),
        NodeProcess::start_with(&home("moved"), &joined),
    );
    let (same_addr, moved_addr) = (same.listen.clone(), moved.listen.clone());
    same.stop();
    moved.stop();

    let did = new_patient(&patient);
    grant_to_node(&patient, &a, true);
    import_lab(root.path(), &home("a"), &did, 7.2, true);
    for to in [&same_addr, &moved_addr] {
        let out = medmesh(&patient)
            .args(["--json", "patient", "grant", "--node", &a.listen, "--to", to])
            .args(["--collections", "labs"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }

    // An hour of failed tries at A.
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let (status, outbox) = a.get(&format!("/api/outbox?patient={did}"));
        assert_eq!(status, 200, "{outbox}");
        let least_tries = [&same_addr, &moved_addr]
            .iter()
            .map(|addr| {
                outbox["owed"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|d| addr.ends_with(d["peer"].as_str().unwrap_or("?")))
                    .filter_map(|d| d["attempts"].as_u64())
                    .min()
                    .unwrap_or(0)
            })
            .min()
            .unwrap_or(0);
        if least_tries >= TRIES_IN_AN_HOUR {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "A stopped trying: {outbox}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    // Back: one where it was, one on another port.
    let same_port = same_addr.split("/p2p/").next().unwrap();
    let same = NodeProcess::start_with(
        &home("same"),
        &["--listen", same_port, "--kademlia", "--peer", c.listen.as_str()],
    );
    assert_eq!(same.listen, same_addr);
    let moved = NodeProcess::start_with(&home("moved"), &joined);
    assert_ne!(moved.listen, moved_addr, "the moved practice is on a new port");
    for node in [&same, &moved] {
        let deadline = std::time::Instant::now() + common::WAIT;
        loop {
            if let [lab] = patient_records(&patient, node, "Observation").as_slice() {
                assert_eq!(lab["valueQuantity"]["value"].to_string(), "7.2");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} never received the labs granted an hour before",
                node.listen
            );
        }
        assert!(
            patient_records(&patient, node, "Condition").is_empty(),
            "{} holds a collection it was not granted",
            node.listen
        );
    }
    // Nothing is owed any more.
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let (_, outbox) = a.get(&format!("/api/outbox?patient={did}"));
        if outbox["owed"].as_array().is_some_and(Vec::is_empty) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "A still owes: {outbox}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
