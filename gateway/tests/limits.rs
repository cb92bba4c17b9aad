//! Issue 15, items 6 and 9, over real HTTP (reqwest against 127.0.0.1:0,
//! in-memory backend): a request the gateway must answer with bounded work —
//! paging with `_count=0` or an offset near `usize::MAX`, a resource with a
//! million empty elements, a resource with thousands of invalid elements.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/mem.rs"]
mod mem;
#[path = "common/server.rs"]
mod server;

use serde_json::{Value, json};
use server::{Server, TOKEN};

async fn json_of(response: reqwest::Response) -> Value {
    let bytes = response.bytes().await.unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn next_link(bundle: &Value) -> Option<String> {
    bundle["link"]
        .as_array()?
        .iter()
        .find(|l| l["relation"] == "next")
        .map(|l| l["url"].as_str().unwrap_or_default().to_owned())
}

fn entries(bundle: &Value) -> usize {
    bundle["entry"].as_array().map_or(0, Vec::len)
}

/// A server holding one Patient and two Observations about them; the Patient's id.
async fn server_with_a_record() -> (Server, String) {
    let server = Server::start(8 * 1024 * 1024).await;
    let created = server
        .post("/fhir/Patient", &json!({"resourceType": "Patient", "gender": "female"}))
        .await;
    assert_eq!(created.status(), 201);
    let patient = json_of(created).await["id"].as_str().unwrap().to_owned();
    for value in [70, 72] {
        let observation = json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": {"reference": format!("Patient/{patient}")},
            "valueQuantity": {"value": value, "unit": "/min"}});
        assert_eq!(server.post("/fhir/Observation", &observation).await.status(), 201);
    }
    (server, patient)
}

#[tokio::test]
async fn count_zero_answers_the_total_and_no_next_link() {
    let (server, patient) = server_with_a_record().await;
    for path in [
        "/fhir/Observation?_count=0".to_owned(),
        format!("/fhir/Observation?subject=Patient/{patient}&_count=0"),
        format!("/fhir/Patient/{patient}/$everything?_count=0"),
    ] {
        let response = server.get(&path).await;
        assert_eq!(response.status(), 200, "{path}");
        let bundle = json_of(response).await;
        let total = if path.contains("$everything") { 3 } else { 2 };
        assert_eq!(bundle["total"], total, "{path}: {bundle}");
        assert_eq!(entries(&bundle), 0, "{path}: {bundle}");
        assert_eq!(next_link(&bundle), None, "{path}: a next link would loop: {bundle}");
    }
}

#[tokio::test]
async fn offsets_near_the_largest_integer_answer_an_empty_last_page() {
    let (server, patient) = server_with_a_record().await;
    let max = usize::MAX;
    for path in [
        format!("/fhir/Observation?_offset={max}"),
        format!("/fhir/Observation?_count=20&_offset={}", max - 1),
        format!("/fhir/Patient/{patient}/$everything?_offset={max}"),
        format!("/fhir/Patient/{patient}/$everything?_count=20&_offset={}", max - 1),
    ] {
        let response = server.get(&path).await;
        assert_eq!(response.status(), 200, "{path}");
        let bundle = json_of(response).await;
        assert_eq!(entries(&bundle), 0, "{path}: {bundle}");
        assert_eq!(next_link(&bundle), None, "{path}: {bundle}");
    }
    // An offset that does not fit at all is a 400 naming the parameter.
    let response = server.get("/fhir/Observation?_offset=18446744073709551616").await;
    assert_eq!(response.status(), 400);
}

/// The process's peak resident set, in KiB (`VmHWM`).
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn post_raw(server: &Server, path: &str, body: String) -> reqwest::Response {
    server
        .client
        .post(server.url(path))
        .bearer_auth(TOKEN)
        .header("content-type", "application/fhir+json")
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_million_empty_names_are_refused_with_a_small_answer_and_bounded_memory() {
    let server = Server::start(8 * 1024 * 1024).await;
    let names = vec!["{}"; 1_000_000].join(",");
    let body = format!(r#"{{"resourceType":"Patient","name":[{names}]}}"#);
    assert!(body.len() > 2_900_000);
    let before = peak_rss_kib();
    let response = post_raw(&server, "/fhir/Patient", body.clone()).await;
    let status = response.status();
    let answer = response.bytes().await.unwrap();
    let grown_mib = peak_rss_kib().saturating_sub(before) / 1024;
    assert_eq!(
        status,
        413,
        "{}",
        String::from_utf8_lossy(&answer[..answer.len().min(500)])
    );
    assert!(answer.len() < 4096, "an answer of {} bytes", answer.len());
    let outcome: Value = serde_json::from_slice(&answer).unwrap();
    let issues = outcome["issue"].as_array().unwrap();
    assert_eq!(issues.len(), 1, "{outcome}");
    assert_eq!(issues[0]["code"], "too-costly", "{outcome}");
    // The body itself is ~3 MB, held a few times over (client, server); a
    // parsed and validated million elements took gigabytes.
    assert!(grown_mib < 128, "peak RSS grew by {grown_mib} MiB");

    // The same inside a transaction Bundle.
    let bundle = format!(
        r#"{{"resourceType":"Bundle","type":"transaction","entry":[{{"resource":{body},"request":{{"method":"POST","url":"Patient"}}}}]}}"#
    );
    let response = post_raw(&server, "/fhir", bundle).await;
    assert_eq!(response.status(), 413);
    assert!(response.bytes().await.unwrap().len() < 4096);
}

#[tokio::test]
async fn validation_reports_at_most_a_hundred_issues_and_says_it_stopped() {
    let server = Server::start(8 * 1024 * 1024).await;
    // 5,000 invalid names: under the structural limits, far over the issue cap.
    let names: Vec<Value> = (0..5_000).map(|_| json!({"family": ""})).collect();
    let patient = json!({"resourceType": "Patient", "name": names});
    for (path, body) in [
        ("/fhir/Patient", patient.clone()),
        (
            "/fhir",
            json!({"resourceType": "Bundle", "type": "transaction", "entry": [
                {"resource": patient.clone(), "request": {"method": "POST", "url": "Patient"}},
                {"resource": patient, "request": {"method": "POST", "url": "Patient"}},
            ]}),
        ),
    ] {
        let response = server.post(path, &body).await;
        assert_eq!(response.status(), 422, "{path}");
        let answer = response.bytes().await.unwrap();
        assert!(answer.len() < 64 * 1024, "{path}: an answer of {} bytes", answer.len());
        let outcome: Value = serde_json::from_slice(&answer).unwrap();
        let issues = outcome["issue"].as_array().unwrap();
        let errors = issues.iter().filter(|i| i["severity"] == "error").count();
        assert_eq!(errors, 100, "{path}");
        let last = issues.last().unwrap();
        assert_eq!(
            (&last["severity"], &last["code"]),
            (&json!("information"), &json!("too-costly")),
            "{path}: {last}"
        );
        assert!(
            last["diagnostics"]
                .as_str()
                .unwrap()
                .contains("stopped after 100 issues"),
            "{last}"
        );
    }
}
