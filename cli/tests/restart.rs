//! Issue 16, with real node processes: the receiver of a first sync is
//! stopped (SIGTERM or kill -9, alternately) at a different point of the
//! sync in each of ten runs, and restarted on its port. Every run must end
//! with the whole record at the receiver, without a new grant (before:
//! 68 of 124 envelopes for good after one SIGTERM), and an app searching
//! the receiver's labs meanwhile must be told, every time it gets fewer
//! than all, that the record is incomplete (or not readable yet); once
//! complete, the warning goes.
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

/// Writes at `node`, for `did`, a Patient and `n` glucose Observations, one
/// write (envelope) each.
fn write_labs(node: &NodeProcess, did: &str, n: usize) {
    let (status, created) = node.post(
        "/fhir/Patient",
        &json!({"resourceType": "Patient", "name": [{"family": "Okonkwo"}],
                "identifier": [{"system": "urn:ietf:rfc:3986", "value": did}]}),
    );
    assert_eq!(status, 201, "{created}");
    let subject = format!("Patient/{}", created["id"].as_str().unwrap());
    for i in 0..n {
        let (status, body) = node.post(
            "/fhir/Observation",
            &json!({"resourceType": "Observation", "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
                    "subject": {"reference": subject},
                    "valueQuantity": {"value": i, "unit": "mmol/L"}}),
        );
        assert_eq!(status, 201, "{body}");
    }
}

/// What an app searching `node`'s labs of `did` sees: how many, and whether
/// the searchset warns that the record is incomplete here (an
/// OperationOutcome issue `incomplete`) or says it cannot read labs yet.
fn labs_search(node: &NodeProcess, did: &str) -> (u64, bool, String) {
    let (status, bundle) = node.get(&format!("/fhir/Observation?patient={did}&_count=1"));
    assert_eq!(status, 200, "{bundle}");
    let issues: Vec<&serde_json::Value> = bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["search"]["mode"] == "outcome")
        .flat_map(|e| e["resource"]["issue"].as_array().into_iter().flatten())
        .collect();
    let told = issues.iter().any(|i| {
        (i["severity"] == "warning" && i["code"] == "incomplete")
            || (i["code"] == "informational" && i["diagnostics"].as_str().is_some_and(|d| d.contains("cannot read")))
    });
    let said = issues
        .iter()
        .filter_map(|i| i["diagnostics"].as_str())
        .collect::<Vec<_>>()
        .join(" | ");
    (bundle["total"].as_u64().unwrap_or(0), told, said)
}

/// Fails unless an app that got fewer than all labs was told so; returns
/// whether it got a warning.
fn check_told(node: &NodeProcess, did: &str, run: u64) -> (u64, bool, String) {
    let (found, told, said) = labs_search(node, did);
    assert!(
        found == LABS as u64 || told,
        "run {run}: a search found {found} of {LABS} labs with no word that the record is incomplete"
    );
    (found, told, said)
}

#[test]
fn a_receiver_stopped_during_its_first_sync_completes_after_a_restart() {
    let root = tempfile::tempdir().unwrap();
    let patient = root.path().join("patient");
    let home_a = root.path().join("a");
    let a = NodeProcess::start_with(&home_a, &[]);
    let did = new_patient(&patient);
    grant_to_node(&patient, &a, true);
    write_labs(&a, &did, LABS);
    // Stopped and started once: A keeps a local snapshot on stop, so a
    // first sync from it is offered as a snapshot transfer too.
    let mut a = a;
    a.stop();
    let a = NodeProcess::start_with(&home_a, &[]);

    let mut warned_runs = 0u32;
    for run in 0..10u64 {
        let mut warned = false;
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
            warned |= check_told(&b, &did, run).1;
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
            let (found, told, said) = check_told(&b, &did, run);
            warned |= told;
            // Complete, and said so: the warning is gone.
            if held == LABS as u64 && found == LABS as u64 && !told {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "run {run} (cut after {cut_at}): B holds {held} of {LABS} labs after its restart, \
                 a search finds {found}, and says: {said}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        warned_runs += u32::from(warned);
        // Holdings say the same.
        let (_, holdings) = b.get(&format!("/api/holdings?patient={did}"));
        assert_eq!(
            holdings["completeness"]["labs"]["complete"], true,
            "run {run}: {holdings}"
        );
    }
    // Whether a poll fell inside a run's incomplete window depends on
    // timing (a snapshot transfer brings the labs at once); the test below
    // holds one open on purpose.
    println!("{warned_runs} of 10 runs showed an app the incomplete-record warning");
}

/// A practice granted while the record's only holder is down holds the
/// grant and nothing else: its apps are told the labs are incomplete (not
/// "none"), until the holder is back and the first sync is done.
#[test]
fn a_practice_granted_while_the_holder_is_down_warns_its_apps_until_its_first_sync() {
    let root = tempfile::tempdir().unwrap();
    let patient = root.path().join("patient");
    let home_a = root.path().join("a");
    let mut a = NodeProcess::start_with(&home_a, &[]);
    let did = new_patient(&patient);
    grant_to_node(&patient, &a, true);
    write_labs(&a, &did, 3);
    a.stop();
    // The patient hands D its grant directly (A is down): D's grant names A
    // in its address hints, as the node that holds the record.
    let d = NodeProcess::start_with(&root.path().join("d"), &[]);
    let out = medmesh(&patient)
        .args(["--json", "patient", "grant", "--node", &d.listen, "--to", &d.listen])
        .args(["--collections", "labs"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let (found, told, said) = labs_search(&d, &did);
    assert_eq!(found, 0);
    assert!(
        told && said.contains("incomplete"),
        "D holds a grant to labs and none of them, and says: {said:?}"
    );
    let (_, holdings) = d.get(&format!("/api/holdings?patient={did}"));
    assert_eq!(
        holdings["completeness"]["labs"]["awaiting_first_sync"], true,
        "{holdings}"
    );

    // A is back: D syncs, and the warning goes.
    let _a = NodeProcess::start_with(&home_a, &[]);
    let deadline = Instant::now() + common::WAIT;
    loop {
        let (found, told, said) = labs_search(&d, &did);
        if found == 3 && !told {
            break;
        }
        assert!(found == 3 || told, "D found {found} of 3 labs and said nothing");
        assert!(Instant::now() < deadline, "D found {found} of 3 labs, saying: {said}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
