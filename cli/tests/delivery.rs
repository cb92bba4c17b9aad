//! Issue 16, with real node processes: a grant to a practice that is down
//! when the patient grants reaches it once it is back on its (fixed) port —
//! the node the patient reached owes it the grant and tries again — and
//! the practice then holds exactly the granted collection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{NodeProcess, grant_to_node, medmesh, new_patient, patient_records, stderr};
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
}
