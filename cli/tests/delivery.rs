//! Issue 16, with real node processes: a grant to a practice that is down
//! when the patient grants reaches it once it is back on its (fixed) port —
//! the node the patient reached owes it the grant and tries again — and
//! the practice then holds exactly the granted collection.
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
    let bundle = json!({"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:5d0c7b8e-2f4a-4d3b-9a61-0e8f2c7d1b34",
         "resource": {"resourceType": "Patient", "name": [{"family": "Adeyemi"}]}},
        {"resource": {"resourceType": "Observation", "status": "final",
                      "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7", "display": "Glucose"}]},
                      "subject": {"reference": "urn:uuid:5d0c7b8e-2f4a-4d3b-9a61-0e8f2c7d1b34"},
                      "valueQuantity": {"value": 5.4, "unit": "mmol/L"}}},
        {"resource": {"resourceType": "Condition",
                      "code": {"text": "Type 2 diabetes"},
                      "subject": {"reference": "urn:uuid:5d0c7b8e-2f4a-4d3b-9a61-0e8f2c7d1b34"}}}]});
    let file = root.path().join("bundle.json");
    std::fs::write(&file, bundle.to_string()).unwrap();
    let out = medmesh(&home_a)
        .args(["--json", "fhir", "import", "--patient", &did])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

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
fn import_lab(root: &std::path::Path, home: &std::path::Path, did: &str, value: f64) {
    let bundle = json!({"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:8a1e3c55-7b2d-4f09-b6a4-2d9c0e5f7a13",
         "resource": {"resourceType": "Patient", "name": [{"family": "Adeyemi"}]}},
        {"resource": {"resourceType": "Observation", "status": "final",
                      "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
                      "subject": {"reference": "urn:uuid:8a1e3c55-7b2d-4f09-b6a4-2d9c0e5f7a13"},
                      "valueQuantity": {"value": value, "unit": "mmol/L"}}}]});
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
    import_lab(root.path(), &home_a, &did, 5.4);

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
    import_lab(root.path(), &home_a, &did, 6.1);
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
    assert_eq!(common::json_lines(&out)[0]["submitted"], true);
    assert_eq!(grant_status(&patient, &id), "in force");
    // The node took it.
    let (status, consents) = node.get(&format!("/fhir/Consent?patient={did}"));
    assert_eq!(status, 200, "{consents}");
    assert!(
        consents.to_string().contains(&id),
        "the node does not show the grant: {consents}"
    );
}
