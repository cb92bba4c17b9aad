//! Issue 16, with real node processes: the receiver of a first sync is
//! stopped (SIGTERM or kill -9, alternately) at a different point of the
//! sync in each of ten runs, and restarted on its port. Every run must end
//! with the whole record at the receiver, without a new grant (before:
//! 68 of 124 envelopes for good after one SIGTERM).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{NodeProcess, grant_to_node, medmesh, new_patient, stderr};
use serde_json::json;

/// Envelopes of labs the receiver must end up with.
const LABS: usize = 120;

/// The labs count at `node` for `did` (its holdings).
fn labs_at(node: &NodeProcess, did: &str) -> u64 {
    let (status, holdings) = node.get(&format!("/api/holdings?patient={did}"));
    assert_eq!(status, 200, "{holdings}");
    holdings["by_collection"]["labs"].as_u64().unwrap_or(0)
}

#[test]
fn a_receiver_stopped_during_its_first_sync_completes_after_a_restart() {
    let root = tempfile::tempdir().unwrap();
    let patient = root.path().join("patient");
    let home_a = root.path().join("a");
    let a = NodeProcess::start_with(&home_a, &[]);
    let did = new_patient(&patient);
    grant_to_node(&patient, &a, true);
    // A's record: a Patient and LABS Observations, one write (envelope) each.
    let (status, created) = a.post(
        "/fhir/Patient",
        &json!({"resourceType": "Patient", "name": [{"family": "Okonkwo"}],
                "identifier": [{"system": "urn:ietf:rfc:3986", "value": did}]}),
    );
    assert_eq!(status, 201, "{created}");
    let subject = format!("Patient/{}", created["id"].as_str().unwrap());
    for i in 0..LABS {
        let (status, body) = a.post(
            "/fhir/Observation",
            &json!({"resourceType": "Observation", "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
                    "subject": {"reference": subject},
                    "valueQuantity": {"value": i, "unit": "mmol/L"}}),
        );
        assert_eq!(status, 201, "{body}");
    }
    // Stopped and started once: A keeps a local snapshot on stop, so a
    // first sync from it is offered as a snapshot transfer too.
    let mut a = a;
    a.stop();
    let a = NodeProcess::start_with(&home_a, &[]);

    for run in 0..10u64 {
        let home_b = root.path().join(format!("b{run}"));
        let mut b = NodeProcess::start_with(&home_b, &[]);
        let out = medmesh(&patient)
            .args(["--json", "patient", "grant", "--node", &a.listen, "--to", &b.listen])
            .args(["--collections", "labs"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        // A different point of the sync each run: after 0, 1, … envelopes.
        let cut_at = run * LABS as u64 / 12;
        let deadline = Instant::now() + common::WAIT;
        while labs_at(&b, &did) < cut_at {
            assert!(Instant::now() < deadline, "run {run}: B's first sync never started");
            std::thread::sleep(Duration::from_millis(1));
        }
        if run % 2 == 0 {
            b.kill();
        } else {
            b.stop();
        }
        let b = NodeProcess::start_with(&home_b, &[]);
        let deadline = Instant::now() + common::WAIT;
        loop {
            let held = labs_at(&b, &did);
            if held == LABS as u64 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "run {run} (cut after {cut_at}): B holds {held} of {LABS} labs after its restart"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
