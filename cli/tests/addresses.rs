//! Issue 16: a node keeps its addresses. `node init` chooses fixed ports
//! and keeps them in the config, so a restarted node is where grants,
//! patients and peers last saw it; a second node asked to listen on a port
//! that is taken refuses with one line instead of sharing it (libp2p's
//! listeners set SO_REUSEPORT, so the kernel would have let both bind).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{NodeProcess, json_lines, medmesh, stderr};
use serde_json::Value;

fn config(home: &std::path::Path) -> Value {
    serde_json::from_slice(&std::fs::read(home.join("node/config.json")).unwrap()).unwrap()
}

#[test]
fn a_node_keeps_its_ports_across_restarts() {
    let root = tempfile::tempdir().unwrap();
    let home = root.path().join("practice");
    let out = medmesh(&home).args(["--json", "node", "init"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let listen = config(&home)["listen"].clone();
    let tcp = listen[0].as_str().unwrap().to_owned();
    assert!(
        tcp.starts_with("/ip4/127.0.0.1/tcp/") && !tcp.ends_with("/tcp/0"),
        "{listen}"
    );
    let gateway = config(&home)["gateway"].as_str().unwrap().to_owned();
    assert!(!gateway.ends_with(":0"), "{gateway}");

    let mut node = NodeProcess::start_with(&home, &[]);
    assert_eq!(
        node.listen,
        format!("{tcp}/p2p/{}", node.peer_id),
        "the node listens where its config says"
    );
    assert_eq!(node.gateway, format!("http://{gateway}"));
    let first = (node.peer_id.clone(), node.listen.clone(), node.gateway.clone());
    node.stop();
    let node = NodeProcess::start_with(&home, &[]);
    assert_eq!(
        (node.peer_id.clone(), node.listen.clone(), node.gateway.clone()),
        first,
        "a restarted node is where it was"
    );
}

#[test]
fn ports_given_to_init_are_kept() {
    let root = tempfile::tempdir().unwrap();
    let home = root.path().join("practice");
    let (p2p, gateway) = {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        (a.local_addr().unwrap().port(), b.local_addr().unwrap().port())
    };
    let out = medmesh(&home)
        .args(["--json", "node", "init", "--p2p-port", &p2p.to_string()])
        .args(["--gateway-port", &gateway.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json_lines(&out).len(), 1);
    let c = config(&home);
    assert_eq!(c["listen"][0], format!("/ip4/127.0.0.1/tcp/{p2p}"));
    assert_eq!(c["listen"][1], format!("/ip4/127.0.0.1/udp/{p2p}/quic-v1"));
    assert_eq!(c["gateway"], format!("127.0.0.1:{gateway}"));
}

#[test]
fn a_second_node_on_a_taken_p2p_port_refuses_with_one_line() {
    let root = tempfile::tempdir().unwrap();
    let (home_a, home_b) = (root.path().join("a"), root.path().join("b"));
    let a = NodeProcess::start_with(&home_a, &[]);
    let out = medmesh(&home_b).args(["--json", "node", "init"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // A node that started instead would run until `medmesh`'s timeout kills it.
    let out = medmesh(&home_b)
        .args(["--json", "node", "run", "--listen", &a.listen])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a second node bound A's port");
    let said = stderr(&out);
    assert!(said.contains("already in use"), "{said}");
    assert_eq!(said.trim().lines().count(), 1, "{said}");
    // A still listens on its port.
    let port: u16 = a.listen.split('/').nth(4).unwrap().parse().unwrap();
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("A no longer listens");
    drop(a);
}

/// Issue 16: a practice that moves to another port says so in a signed
/// address record (libp2p's signed peer record, on every identify
/// exchange); the practice holding the record it is granted keeps it across
/// its own restarts, and the patient's address book learns it from there
/// (`patient practices --node`), checked by the moved practice's signature,
/// and keeps it offline.
#[test]
fn a_practice_that_moves_is_known_at_its_new_address_by_its_peers_and_the_patient() {
    use common::{grant_to_node, new_patient, patient_records};
    let root = tempfile::tempdir().unwrap();
    let patient = root.path().join("patient");
    let (home_a, home_b) = (root.path().join("a"), root.path().join("b"));
    let mut a = NodeProcess::start_with(&home_a, &[]);
    let mut b = NodeProcess::start_with(&home_b, &[]);
    let did = new_patient(&patient);
    grant_to_node(&patient, &a, true);
    let (status, created) = a.post(
        "/fhir/Patient",
        &serde_json::json!({"resourceType": "Patient",
                            "identifier": [{"system": "urn:ietf:rfc:3986", "value": did}]}),
    );
    assert_eq!(status, 201, "{created}");
    let out = medmesh(&patient)
        .args(["--json", "patient", "grant", "--node", &a.listen, "--to", &b.listen])
        .args(["--collections", "core"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let deadline = std::time::Instant::now() + common::WAIT;
    while patient_records(&patient, &b, "Patient").is_empty() {
        assert!(std::time::Instant::now() < deadline, "B never got the record");
    }

    // B moves: back on another port, it dials the holder its grant names.
    let old = b.listen.clone();
    b.stop();
    let b = NodeProcess::start_with(&home_b, &["--listen", "/ip4/127.0.0.1/tcp/0"]);
    assert_ne!(b.listen, old);
    let new_tcp = b.listen.split("/p2p/").next().unwrap().to_owned();
    // A keeps B's signed record, even across its own restart.
    let practices_at = |a: &NodeProcess| -> Vec<Value> {
        let out = medmesh(&patient)
            .args(["--json", "patient", "practices", "--node", &a.listen])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        json_lines(&out)
    };
    let b_entry = |lines: &[Value]| lines.iter().find(|l| l["peer"] == b.peer_id.as_str()).cloned();
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let lines = practices_at(&a);
        if b_entry(&lines).is_some_and(|e| e["addresses"].as_array().unwrap().iter().any(|x| x == new_tcp.as_str())) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "A never learned B's new address: {lines:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    a.stop();
    let a = NodeProcess::start_with(&home_a, &[]);
    let lines = practices_at(&a);
    let entry = b_entry(&lines).unwrap();
    assert!(
        entry["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x == new_tcp.as_str()),
        "A forgot B's record on restart: {entry}"
    );
    assert_eq!(entry["collections"], serde_json::json!(["core"]), "{entry}");
    // The address book keeps it without a node.
    let out = medmesh(&patient)
        .args(["--json", "patient", "practices"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let offline = json_lines(&out);
    assert_eq!(
        b_entry(&offline).unwrap()["addresses"],
        entry["addresses"],
        "{offline:?}"
    );
}
