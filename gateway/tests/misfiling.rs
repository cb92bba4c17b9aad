//! Issue 15, item 5: a transaction files a resource only under the patient its
//! Patient-compartment references name, resolved per FHIR's `fullUrl` rules or
//! through stored Patients; never under "the Bundle's first patient".
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/mem.rs"]
mod mem;
#[path = "common/server.rs"]
mod server;

use serde_json::{Value, json};
use server::Server;

async fn json_of(response: reqwest::Response) -> Value {
    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
}

fn patient(did: &str) -> Value {
    json!({"resourceType": "Patient",
           "identifier": [{"system": "urn:ietf:rfc:3986", "value": did}],
           "name": [{"family": "Lovelace"}]})
}

fn observation(subject: &str) -> Value {
    json!({"resourceType": "Observation", "status": "final", "code": {"text": "glucose"},
           "subject": {"reference": subject}})
}

fn post(full_url: &str, resource: Value) -> Value {
    json!({"fullUrl": full_url, "resource": resource,
           "request": {"method": "POST", "url": resource["resourceType"]}})
}

fn transaction(entries: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

async fn total(server: &Server, path: &str) -> u64 {
    json_of(server.get(path).await).await["total"].as_u64().unwrap()
}

const DID_X: &str = "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK";
const DID_Y: &str = "did:key:z6MkjchhfUsD6mmvni8mCdXHw216Xrm9bQe2mBH1P5RDjVJG";

/// Asserts a 422 OperationOutcome about entry `index` whose diagnostics name its
/// `fullUrl` and contain `says`, and that nothing was written.
async fn assert_refused(server: &Server, bundle: &Value, index: usize, says: &str) {
    let response = server.post("/fhir", bundle).await;
    let status = response.status().as_u16();
    let outcome = json_of(response).await;
    assert_eq!(status, 422, "{outcome}");
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    let issue = &outcome["issue"][0];
    assert_eq!(issue["expression"][0], format!("Bundle.entry[{index}]"), "{outcome}");
    let diagnostics = issue["diagnostics"].as_str().unwrap();
    let full_url = bundle["entry"][index]["fullUrl"].as_str().unwrap();
    assert!(diagnostics.starts_with(&format!("entry {index}: ")), "{diagnostics}");
    assert!(diagnostics.contains(full_url), "{diagnostics}");
    assert!(diagnostics.contains(says), "{diagnostics}");
}

/// A did-linked Patient and an Observation about `Patient/someone-else`, which is
/// neither in the Bundle nor stored: 422 naming the Observation's entry, nothing
/// written (before the fix: 200, the Observation filed with the first patient).
#[tokio::test]
async fn a_reference_to_an_unknown_patient_is_refused_naming_the_entry() {
    let server = Server::start(1024 * 1024).await;
    let bundle = transaction(vec![
        post("urn:uuid:0b6e1c4a-1111-4a11-8111-000000000001", patient(DID_X)),
        post(
            "urn:uuid:0b6e1c4a-1111-4a11-8111-000000000002",
            observation("Patient/someone-else"),
        ),
    ]);
    assert_refused(&server, &bundle, 1, "Patient/someone-else").await;
    // The same through a relative reference in an entry of another server: it
    // names that server's Patient/p1, not this Bundle's.
    let bundle = transaction(vec![
        post("http://example.org/fhir/Patient/p1", patient(DID_X)),
        post("http://example.org/fhir-2/Observation/o1", observation("Patient/p1")),
    ]);
    assert_refused(&server, &bundle, 1, "Patient/p1").await;
    assert_eq!(total(&server, "/fhir/Patient").await, 0);
    assert_eq!(total(&server, "/fhir/Observation").await, 0);
}

/// One resource whose compartment references name two different patients (two
/// Patients of the Bundle; a Patient of the Bundle and a stored one) is a 422.
#[tokio::test]
async fn references_to_two_patients_are_refused() {
    let server = Server::start(1024 * 1024).await;
    let stored = json_of(server.post("/fhir/Patient", &patient(DID_Y)).await).await;
    let stored = format!("Patient/{}", stored["id"].as_str().unwrap());
    let x = "urn:uuid:0b6e1c4a-2222-4a22-8222-000000000001";
    let y = "urn:uuid:0b6e1c4a-2222-4a22-8222-000000000002";
    let mut both = observation(x);
    both["performer"] = json!([{"reference": y}]);
    let bundle = transaction(vec![
        post(x, patient(DID_X)),
        post(y, patient(DID_Y)),
        post("urn:uuid:0b6e1c4a-2222-4a22-8222-000000000003", both),
    ]);
    assert_refused(&server, &bundle, 2, "two different patients").await;

    let mut mixed = observation(x);
    mixed["performer"] = json!([{"reference": stored}]);
    let bundle = transaction(vec![
        post(x, patient(DID_X)),
        post("urn:uuid:0b6e1c4a-2222-4a22-8222-000000000003", mixed),
    ]);
    assert_refused(&server, &bundle, 1, "two different patients").await;
    assert_eq!(total(&server, "/fhir/Patient").await, 1, "only the stored one");
    assert_eq!(total(&server, "/fhir/Observation").await, 0);

    // Both references naming the same stored patient are fine.
    let mut same = observation(&stored);
    same["performer"] = json!([{"reference": stored}]);
    let response = server
        .post(
            "/fhir",
            &transaction(vec![post("urn:uuid:0b6e1c4a-2222-4a22-8222-000000000004", same)]),
        )
        .await;
    assert_eq!(response.status(), 200);
}

/// References relative to an entry's absolute `fullUrl` (plain, versioned) and
/// absolute references equal to a `fullUrl` resolve to that entry: each
/// Observation is written about its own Patient, under the id the transaction
/// gave it (before the fix, `Patient/p1` stayed as written).
#[tokio::test]
async fn relative_references_resolve_against_the_absolute_full_url() {
    let server = Server::start(1024 * 1024).await;
    let bundle = transaction(vec![
        post("http://example.org/fhir/Patient/p1", patient(DID_X)),
        post("http://example.org/fhir/Patient/p2", patient(DID_Y)),
        post("http://example.org/fhir/Observation/o1", observation("Patient/p1")),
        post(
            "http://example.org/fhir/Observation/o2",
            observation("http://example.org/fhir/Patient/p2"),
        ),
        post(
            "http://example.org/fhir/Observation/o3",
            observation("Patient/p2/_history/1"),
        ),
    ]);
    let response = server.post("/fhir", &bundle).await;
    let status = response.status();
    let result = json_of(response).await;
    assert_eq!(status, 200, "{result}");
    let keys: Vec<String> = result["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let location = e["response"]["location"].as_str().unwrap();
            location.split('/').take(2).collect::<Vec<_>>().join("/")
        })
        .collect();
    for (observation, patient) in [(2, 0), (3, 1), (4, 1)] {
        let read = json_of(server.get(&format!("/fhir/{}", keys[observation])).await).await;
        assert_eq!(
            read["subject"]["reference"], keys[patient],
            "case entry {observation}: {read}"
        );
    }
}
