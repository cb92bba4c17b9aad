//! The gateway over real HTTP (reqwest against 127.0.0.1:0) with an
//! in-memory backend on one record document: status codes, headers,
//! OperationOutcomes, paging, and real FHIR examples round-tripping.
//!
//! Over 800 lines on purpose: one HTTP fixture shared by the tests of every
//! route.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/fhirval.rs"]
mod fhirval;
#[path = "common/mem.rs"]
mod mem;
#[path = "common/server.rs"]
mod server;

use std::path::PathBuf;

use serde_json::{Value, json};
use server::{Server, TOKEN};

async fn json_of(response: reqwest::Response) -> Value {
    let bytes = response.bytes().await.unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fhir/examples")
}

/// Drops what the server owns (`id`, `meta.versionId`, `meta.lastUpdated`) and an emptied `meta`.
fn strip_server_fields(mut v: Value) -> Value {
    if let Some(obj) = v.as_object_mut() {
        obj.remove("id");
        if let Some(meta) = obj.get_mut("meta").and_then(Value::as_object_mut) {
            meta.remove("versionId");
            meta.remove("lastUpdated");
            if meta.is_empty() {
                obj.remove("meta");
            }
        }
    }
    v
}

#[tokio::test]
async fn crud_round_trip_with_headers() {
    let server = Server::start(1024 * 1024).await;
    let patient = json!({"resourceType": "Patient", "name": [{"family": "Testperson"}], "birthDate": "1970-01-01"});
    let created = server.post("/fhir/Patient", &patient).await;
    assert_eq!(created.status(), 201);
    let location = created.headers()["location"].to_str().unwrap().to_owned();
    let etag = created.headers()["etag"].to_str().unwrap().to_owned();
    assert!(
        created.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/fhir+json")
    );
    let body = json_of(created).await;
    let id = body["id"].as_str().unwrap().to_owned();
    assert!(
        location.contains(&format!("/fhir/Patient/{id}/_history/")),
        "{location}"
    );
    assert_eq!(etag, format!("W/\"{}\"", body["meta"]["versionId"].as_str().unwrap()));

    let read = server.get(&format!("/fhir/Patient/{id}")).await;
    assert_eq!(read.status(), 200);
    assert_eq!(json_of(read).await, body);

    // Update with the current version, then a stale If-Match.
    let mut changed = body.clone();
    changed["birthDate"] = json!("1970-01-02");
    let updated = server
        .client
        .put(server.url(&format!("/fhir/Patient/{id}")))
        .bearer_auth(TOKEN)
        .header("content-type", "application/fhir+json")
        .header("if-match", etag.clone())
        .body(changed.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(updated.status(), 200);
    let updated = json_of(updated).await;
    assert_eq!(updated["birthDate"], "1970-01-02");
    let stale = server
        .client
        .put(server.url(&format!("/fhir/Patient/{id}")))
        .bearer_auth(TOKEN)
        .header("content-type", "application/fhir+json")
        .header("if-match", etag)
        .body(changed.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), 412);
    assert_eq!(json_of(stale).await["resourceType"], "OperationOutcome");

    let history = json_of(server.get(&format!("/fhir/Patient/{id}/_history")).await).await;
    assert_eq!(history["type"], "history");
    assert_eq!(history["total"], 2);

    let old_vid = body["meta"]["versionId"].as_str().unwrap();
    let old = json_of(server.get(&format!("/fhir/Patient/{id}/_history/{old_vid}")).await).await;
    assert_eq!(old["birthDate"], "1970-01-01");

    let deleted = server
        .client
        .delete(server.url(&format!("/fhir/Patient/{id}")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(server.get(&format!("/fhir/Patient/{id}")).await.status(), 410);
}

#[tokio::test]
async fn prefer_return_minimal_has_no_body() {
    let server = Server::start(1024 * 1024).await;
    let response = server
        .client
        .post(server.url("/fhir/Patient"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/fhir+json")
        .header("prefer", "return=minimal")
        .body(json!({"resourceType": "Patient"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert!(response.headers().contains_key("location"));
    assert!(response.bytes().await.unwrap().is_empty());
}

/// `Prefer: return=OperationOutcome` (issue 18): a create and an update
/// answer an OperationOutcome naming the resource and its version, with the
/// usual status and headers; the resource itself is stored as sent.
#[tokio::test]
async fn prefer_return_operation_outcome() {
    let server = Server::start(1024 * 1024).await;
    let send = |method: reqwest::Method, path: String, body: Value| {
        server
            .client
            .request(method, server.url(&path))
            .bearer_auth(TOKEN)
            .header("content-type", "application/fhir+json")
            .header("prefer", "return=OperationOutcome")
            .body(body.to_string())
            .send()
    };
    let created = send(
        reqwest::Method::POST,
        "/fhir/Patient".to_owned(),
        json!({"resourceType": "Patient", "gender": "female"}),
    )
    .await
    .unwrap();
    assert_eq!(created.status(), 201);
    let location = created.headers()["location"].to_str().unwrap().to_owned();
    let etag = created.headers()["etag"].to_str().unwrap().to_owned();
    let outcome = json_of(created).await;
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert_eq!(outcome["issue"][0]["severity"], "information");
    let id = location.split('/').rev().nth(2).unwrap().to_owned();
    let text = outcome["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(
        text.contains(&format!("Patient/{id}")) && text.contains("created"),
        "{text}"
    );
    assert!(text.contains(etag.trim_start_matches("W/").trim_matches('"')), "{text}");

    let updated = send(
        reqwest::Method::PUT,
        format!("/fhir/Patient/{id}"),
        json!({"resourceType": "Patient", "id": id, "gender": "male"}),
    )
    .await
    .unwrap();
    assert_eq!(updated.status(), 200);
    assert_eq!(json_of(updated).await["resourceType"], "OperationOutcome");
    let stored = json_of(server.get(&format!("/fhir/Patient/{id}")).await).await;
    assert_eq!(stored["gender"], "male");
}

/// What FHIR client libraries send (issue 18): transactions posted to
/// `[base]/` and reads with a trailing slash work, the auth scheme in any
/// case is accepted, and a client that accepts only XML gets a 406
/// OperationOutcome instead of a 200 in JSON (`Accept` or `_format`); a
/// JSON or wildcard `Accept` still reads.
#[tokio::test]
async fn client_library_conventions() {
    let server = Server::start(1024 * 1024).await;
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}}
    ]});
    let response = server.post("/fhir/", &batch).await;
    assert_eq!(response.status(), 200);
    let bundle = json_of(response).await;
    assert_eq!(bundle["type"], "batch-response");
    let location = bundle["entry"][0]["response"]["location"].as_str().unwrap().to_owned();
    let key = location.split("/_history").next().unwrap().to_owned();

    let get = |path: String, accept: Option<&'static str>, auth: &'static str| {
        let mut request = server
            .client
            .get(server.url(&path))
            .header("authorization", format!("{auth} {TOKEN}"));
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        request.send()
    };
    assert_eq!(
        get(format!("/fhir/{key}/"), None, "Bearer").await.unwrap().status(),
        200
    );
    assert_eq!(
        get("/fhir/metadata/".to_owned(), None, "Bearer")
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(get(format!("/fhir/{key}"), None, "bearer").await.unwrap().status(), 200);
    assert_eq!(get(format!("/fhir/{key}"), None, "BEARER").await.unwrap().status(), 200);
    assert_eq!(get(format!("/fhir/{key}"), None, "Basic").await.unwrap().status(), 401);
    for accept in [
        "application/fhir+json",
        "application/json",
        "*/*",
        "application/fhir+xml;q=0.9, application/fhir+json",
        "text/html, */*;q=0.1",
    ] {
        let response = get(format!("/fhir/{key}"), Some(accept), "Bearer").await.unwrap();
        assert_eq!(response.status(), 200, "Accept: {accept}");
    }
    for accept in [
        "application/fhir+xml",
        "application/xml, text/xml",
        "application/fhir+json;q=0",
    ] {
        let response = get(format!("/fhir/{key}"), Some(accept), "Bearer").await.unwrap();
        assert_eq!(response.status(), 406, "Accept: {accept}");
        assert_eq!(json_of(response).await["resourceType"], "OperationOutcome");
    }
    for (format, status) in [
        ("json", 200),
        ("application/fhir%2Bjson", 200),
        ("xml", 406),
        ("ttl", 406),
    ] {
        let response = get(format!("/fhir/{key}?_format={format}"), None, "Bearer")
            .await
            .unwrap();
        assert_eq!(response.status(), status, "_format={format}");
        let response = get(format!("/fhir/Patient?_format={format}"), None, "Bearer")
            .await
            .unwrap();
        assert_eq!(response.status(), status, "search, _format={format}");
    }
}

/// Browser apps and large answers (issue 18): a configured origin's
/// preflight is answered without a token and its requests carry the CORS
/// headers; another origin gets none; with no origin configured there is no
/// CORS at all. A client that accepts gzip gets it.
#[tokio::test]
async fn cors_for_configured_origins_and_gzip_on_request() {
    const EMR: &str = "https://emr.example.org";
    let server = Server::start_with(|config| config.cors_origins = vec![EMR.to_owned()]).await;
    let preflight = |origin: &'static str| {
        server
            .client
            .request(reqwest::Method::OPTIONS, server.url("/fhir/Patient"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization, content-type")
            .send()
    };
    let allowed = preflight(EMR).await.unwrap();
    assert!(allowed.status().is_success(), "{}", allowed.status());
    assert_eq!(allowed.headers()["access-control-allow-origin"], EMR);
    let methods = allowed.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(methods.contains("POST"), "{methods}");
    let other = preflight("https://evil.example").await.unwrap();
    assert!(!other.headers().contains_key("access-control-allow-origin"));

    let read = server
        .client
        .get(server.url("/fhir/Patient"))
        .bearer_auth(TOKEN)
        .header("origin", EMR)
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    assert_eq!(read.headers()["access-control-allow-origin"], EMR);
    // The token is still required: CORS only lets the browser ask.
    let unauthorized = server
        .client
        .get(server.url("/fhir/Patient"))
        .header("origin", EMR)
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);

    let plain = Server::start(1024 * 1024).await;
    let response = plain
        .client
        .request(reqwest::Method::OPTIONS, plain.url("/fhir/Patient"))
        .header("origin", EMR)
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert!(!response.headers().contains_key("access-control-allow-origin"));

    for i in 0..20 {
        let patient = json!({"resourceType": "Patient", "name": [{"family": format!("Gzip{i}")}]});
        assert_eq!(plain.post("/fhir/Patient", &patient).await.status(), 201);
    }
    let gzipped = plain
        .client
        .get(plain.url("/fhir/Patient"))
        .bearer_auth(TOKEN)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(gzipped.status(), 200);
    assert_eq!(gzipped.headers()["content-encoding"], "gzip");
    let compressed = gzipped.bytes().await.unwrap().len();
    let identity = plain.get("/fhir/Patient").await;
    assert!(!identity.headers().contains_key("content-encoding"));
    let full = identity.bytes().await.unwrap().len();
    assert!(compressed < full / 2, "gzip {compressed} B vs {full} B");
}

/// Every row: a bad request → its exact status and an OperationOutcome.
#[tokio::test]
async fn bad_requests_map_to_fhir_errors() {
    let server = Server::start(64 * 1024).await;
    let created = json_of(server.post("/fhir/Patient", &json!({"resourceType": "Patient"})).await).await;
    let id = created["id"].as_str().unwrap().to_owned();
    let huge = "x".repeat(70 * 1024);
    struct Row {
        name: &'static str,
        method: &'static str,
        path: String,
        token: Option<&'static str>,
        content_type: Option<&'static str>,
        body: String,
        status: u16,
        /// One more request header.
        header: Option<(&'static str, &'static str)>,
    }
    let row = |name, method, path: &str, token, content_type, body: String, status| Row {
        name,
        method,
        path: path.to_owned(),
        token,
        content_type,
        body,
        status,
        header: None,
    };
    let fhir = Some("application/fhir+json");
    let rows = vec![
        row("no token", "GET", "/fhir/Patient", None, None, String::new(), 401),
        row(
            "wrong token",
            "GET",
            "/fhir/Patient",
            Some("nope"),
            None,
            String::new(),
            401,
        ),
        row(
            "malformed json",
            "POST",
            "/fhir/Patient",
            Some(TOKEN),
            fhir,
            "{not json".into(),
            400,
        ),
        row(
            "json array",
            "POST",
            "/fhir/Patient",
            Some(TOKEN),
            fhir,
            "[]".into(),
            400,
        ),
        row(
            "bad _count",
            "GET",
            "/fhir/Patient?_count=abc",
            Some(TOKEN),
            None,
            String::new(),
            400,
        ),
        row(
            "unknown type",
            "GET",
            "/fhir/Spaceship/1",
            Some(TOKEN),
            None,
            String::new(),
            404,
        ),
        row(
            "unknown id",
            "GET",
            "/fhir/Patient/nothere",
            Some(TOKEN),
            None,
            String::new(),
            404,
        ),
        row(
            "unknown route",
            "GET",
            "/nowhere",
            Some(TOKEN),
            None,
            String::new(),
            404,
        ),
        row(
            "method not allowed",
            "PATCH",
            "/fhir/Patient",
            Some(TOKEN),
            fhir,
            "{}".into(),
            405,
        ),
        row(
            "too large",
            "POST",
            "/fhir/Patient",
            Some(TOKEN),
            fhir,
            json!({"resourceType": "Patient", "text": {"status": "generated", "div": huge}}).to_string(),
            413,
        ),
        row(
            "wrong media type",
            "POST",
            "/fhir/Patient",
            Some(TOKEN),
            Some("text/plain"),
            "{}".into(),
            415,
        ),
        row(
            "invalid resource",
            "POST",
            "/fhir/Observation",
            Some(TOKEN),
            fhir,
            json!({"resourceType": "Observation", "code": {"text": "x"}}).to_string(),
            422,
        ),
        row(
            "type mismatch",
            "POST",
            "/fhir/Observation",
            Some(TOKEN),
            fhir,
            json!({"resourceType": "Patient"}).to_string(),
            422,
        ),
        row(
            "update id mismatch",
            "PUT",
            &format!("/fhir/Patient/{id}"),
            Some(TOKEN),
            fhir,
            json!({"resourceType": "Patient", "id": "other"}).to_string(),
            400,
        ),
        row(
            "update as create",
            "PUT",
            "/fhir/Patient/nothere",
            Some(TOKEN),
            fhir,
            json!({"resourceType": "Patient", "id": "nothere"}).to_string(),
            404,
        ),
        Row {
            header: Some(("if-none-exist", "name=Chalmers")),
            ..row(
                "If-None-Exist on a parameter the server cannot search",
                "POST",
                "/fhir/Patient",
                Some(TOKEN),
                fhir,
                json!({"resourceType": "Patient"}).to_string(),
                400,
            )
        },
        Row {
            header: Some(("if-none-exist", " ")),
            ..row(
                "empty If-None-Exist",
                "POST",
                "/fhir/Patient",
                Some(TOKEN),
                fhir,
                json!({"resourceType": "Patient"}).to_string(),
                400,
            )
        },
        Row {
            header: Some(("if-none-exist", "_count=abc")),
            ..row(
                "If-None-Exist with a bad value",
                "POST",
                "/fhir/Patient",
                Some(TOKEN),
                fhir,
                json!({"resourceType": "Patient"}).to_string(),
                400,
            )
        },
        row(
            "submit refused",
            "POST",
            "/api/grants",
            Some(TOKEN),
            None,
            "junk".into(),
            403,
        ),
    ];
    for row in rows {
        let method = reqwest::Method::from_bytes(row.method.as_bytes()).unwrap();
        let mut request = server
            .client
            .request(method, server.url(&row.path))
            .body(row.body.clone());
        if let Some(token) = row.token {
            request = request.bearer_auth(token);
        }
        if let Some(ct) = row.content_type {
            request = request.header("content-type", ct);
        }
        if let Some((name, value)) = row.header {
            request = request.header(name, value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), row.status, "row {:?}", row.name);
        let body = json_of(response).await;
        assert_eq!(body["resourceType"], "OperationOutcome", "row {:?}: {body}", row.name);
        assert!(!body["issue"].as_array().unwrap().is_empty(), "row {:?}", row.name);
    }
    let invalid = json_of(
        server
            .post(
                "/fhir/Observation",
                &json!({"resourceType": "Observation", "code": {"text": "x"}}),
            )
            .await,
    )
    .await;
    let expressions: Vec<&str> = invalid["issue"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|i| i["expression"].as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    assert!(expressions.contains(&"Observation.status"), "{invalid}");
}

#[tokio::test]
async fn public_routes_and_metrics() {
    let server = Server::start(1024 * 1024).await;
    let health = server.client.get(server.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let metadata = server.client.get(server.url("/fhir/metadata")).send().await.unwrap();
    assert_eq!(metadata.status(), 200);
    assert_eq!(json_of(metadata).await["resourceType"], "CapabilityStatement");
    assert_eq!(
        server.client.get(server.url("/metrics")).send().await.unwrap().status(),
        401
    );
    let _ = server.get("/fhir/Patient").await;
    let metrics = server.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("medmesh_gateway_http_requests_total"), "{metrics}");
    assert!(metrics.contains("route=\"/fhir/{type}\""), "{metrics}");
    assert!(metrics.contains("medmesh_test_backend 1"));
    assert!(metrics.trim_end().ends_with("# EOF"));
}

#[tokio::test]
async fn search_pages_walk_every_match_and_warn_on_unknown_params() {
    let server = Server::start(1024 * 1024).await;
    for i in 0..7 {
        let r = server
            .post(
                "/fhir/Patient",
                &json!({"resourceType": "Patient", "name": [{"family": format!("P{i}")}]}),
            )
            .await;
        assert_eq!(r.status(), 201);
    }
    let mut url = server.url("/fhir/Patient?_count=3&foo=bar");
    let mut seen = 0;
    let mut pages = 0;
    loop {
        let bundle = json_of(server.client.get(&url).bearer_auth(TOKEN).send().await.unwrap()).await;
        assert_eq!(bundle["type"], "searchset");
        assert_eq!(bundle["total"], 7);
        let entries = bundle["entry"].as_array().cloned().unwrap_or_default();
        seen += entries.iter().filter(|e| e["search"]["mode"] == "match").count();
        // The first page carries the warning; next links keep only recognised parameters.
        let warned = entries.iter().any(|e| e["search"]["mode"] == "outcome");
        assert_eq!(warned, pages == 0, "page {pages}: {bundle}");
        pages += 1;
        let next = bundle["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
            .map(|l| l["url"].as_str().unwrap().to_owned());
        match next {
            Some(n) => url = n,
            None => break,
        }
    }
    assert_eq!((seen, pages), (7, 3));
    let strict = server
        .client
        .get(server.url("/fhir/Patient?foo=bar"))
        .bearer_auth(TOKEN)
        .header("prefer", "handling=strict")
        .send()
        .await
        .unwrap();
    assert_eq!(strict.status(), 400);
}

/// Every example resource of a supported type: create, read back, compare.
#[tokio::test]
async fn fhir_examples_round_trip_over_http() {
    let server = Server::start(8 * 1024 * 1024).await;
    let mut checked = 0;
    for entry in std::fs::read_dir(examples_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let input: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let resource_type = input["resourceType"].as_str().unwrap().to_owned();
        if !medmesh_gateway::fhir::validate::is_supported_type(&resource_type) {
            continue;
        }
        let created = server.post(&format!("/fhir/{resource_type}"), &input).await;
        assert_eq!(created.status(), 201, "{}", path.display());
        let body = json_of(created).await;
        let id = body["id"].as_str().unwrap();
        let read = json_of(server.get(&format!("/fhir/{resource_type}/{id}")).await).await;
        assert_eq!(
            strip_server_fields(read),
            strip_server_fields(input.clone()),
            "{}",
            path.display()
        );
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} examples checked");
}

fn read_example(name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(examples_dir().join(name)).unwrap()).unwrap()
}

/// Every `reference` string in a resource.
fn references(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(obj) => {
            for (k, v) in obj {
                match (k.as_str(), v) {
                    ("reference", Value::String(r)) => out.push(r.clone()),
                    _ => references(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| references(v, out)),
        _ => {}
    }
}

async fn total(server: &Server, path: &str) -> u64 {
    json_of(server.get(path).await).await["total"].as_u64().unwrap()
}

fn statuses(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap().to_owned())
        .collect()
}

fn outcome_expressions(outcome: &Value) -> Vec<String> {
    outcome["issue"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|i| i["expression"].as_array().cloned().unwrap_or_default())
        .map(|e| e.as_str().unwrap().to_owned())
        .collect()
}

/// The Synthea patient bundle (319 entries) imports whole: every entry is
/// created, reads back equal to the input with its references rewritten to
/// the assigned ids, and every reference between entries resolves.
#[tokio::test]
async fn synthea_transaction_imports_whole() {
    let server = Server::start(8 * 1024 * 1024).await;
    let input = read_example("Bundle-synthea-Brekke496.json");
    let response = server.post("/fhir", &input).await;
    assert_eq!(response.status(), 200);
    let bundle = json_of(response).await;
    assert_eq!(bundle["type"], "transaction-response");
    let entries = bundle["entry"].as_array().unwrap();
    let inputs = input["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 319);
    // fullUrl → assigned Type/id, from each response's location.
    let mut map = std::collections::HashMap::new();
    for (e, i) in entries.iter().zip(inputs) {
        assert_eq!(e["response"]["status"], "201 Created", "{}", e["response"]);
        let location = e["response"]["location"].as_str().unwrap();
        let key: Vec<&str> = location.split('/').take(2).collect();
        assert!(e["response"]["etag"].as_str().unwrap().starts_with("W/\""));
        assert!(e["response"]["lastModified"].as_str().unwrap().ends_with('Z'));
        map.insert(i["fullUrl"].as_str().unwrap().to_owned(), key.join("/"));
    }
    let assigned: std::collections::HashSet<&String> = map.values().collect();
    assert_eq!(assigned.len(), 319, "every entry got its own id");
    let mut checked_refs = 0;
    for i in inputs {
        let key = &map[i["fullUrl"].as_str().unwrap()];
        let read = server.get(&format!("/fhir/{key}")).await;
        assert_eq!(read.status(), 200, "{key}");
        let read = json_of(read).await;
        let mut expected = i["resource"].clone();
        medmesh_gateway::fhir::bundle::rewrite_references(&mut expected, &map);
        assert_eq!(
            strip_server_fields(read.clone()),
            strip_server_fields(expected),
            "{key}"
        );
        let mut refs = Vec::new();
        references(&read, &mut refs);
        for r in refs {
            assert!(!r.starts_with("urn:"), "{key} still references {r}");
            if assigned.contains(&r) {
                checked_refs += 1;
            }
        }
    }
    assert!(checked_refs > 300, "{checked_refs}");
    let patient = map.values().find(|k| k.starts_with("Patient/")).unwrap();
    assert_eq!(total(&server, &format!("/fhir/{patient}/$everything")).await, 319);
}

/// HL7's transaction example mixes every method. This node honours POST,
/// conditional requests on the search parameters it supports, PUT of existing
/// resources, DELETE and GET; it does not honour operations (`$lookup`),
/// conditional requests on parameters it cannot search (`identifier`), or
/// update-as-create. So the transaction fails as a whole, naming the entry,
/// and writes nothing; as a batch, each entry gets its own status.
#[tokio::test]
async fn hl7_transaction_example_fails_whole_and_batch_answers_each() {
    let server = Server::start(8 * 1024 * 1024).await;
    let input = read_example("Bundle-bundle-transaction.json");
    let response = server.post("/fhir", &input).await;
    assert_eq!(response.status(), 400);
    let outcome = json_of(response).await;
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert_eq!(outcome_expressions(&outcome), ["Bundle.entry[7].request.url"]);

    // Without the operation, the first entry in processing order that cannot be
    // honoured is the DELETE of Patient/234, which is not there (DELETEs go
    // first; the conditional DELETE on `identifier` before it matches nothing).
    let mut without_op = input.clone();
    without_op["entry"].as_array_mut().unwrap().remove(7);
    let response = server.post("/fhir", &without_op).await;
    assert_eq!(response.status(), 404);
    let outcome = json_of(response).await;
    let diagnostics = outcome["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(diagnostics.starts_with("entry 5:"), "{diagnostics}");
    assert_eq!(total(&server, "/fhir/Patient").await, 0, "nothing written");

    let mut batch = input;
    batch["type"] = json!("batch");
    let response = server.post("/fhir", &batch).await;
    assert_eq!(response.status(), 200);
    let bundle = json_of(response).await;
    assert_eq!(bundle["type"], "batch-response");
    assert_eq!(
        statuses(&bundle),
        [
            "201 Created",     // POST Patient
            "201 Created",     // POST Patient, ifNoneExist identifier=…|234234: no match
            "404 Not Found",   // PUT Patient/123: no update-as-create
            "201 Created",     // PUT Patient?identifier=…|456456: no match, no id: created
            "404 Not Found",   // PUT Patient/123a with ifMatch: not there
            "404 Not Found",   // DELETE Patient/234: not there
            "204 No Content",  // DELETE Patient?identifier=123456: no match
            "400 Bad Request", // POST ValueSet/$lookup: operations not supported
            "200 OK",          // GET Patient?name=peter: searchset, name ignored with a warning
            "404 Not Found",   // GET Patient/12334
        ]
    );
    let entries = bundle["entry"].as_array().unwrap();
    for (i, e) in entries.iter().enumerate() {
        if !e["response"]["status"].as_str().unwrap().starts_with('2') {
            let outcome = &e["response"]["outcome"];
            assert_eq!(outcome["resourceType"], "OperationOutcome", "entry {i}");
            assert!(
                outcome["issue"][0]["diagnostics"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("entry {i}:")),
                "entry {i}: {outcome}"
            );
        }
    }
    let search = &entries[8]["resource"];
    assert_eq!(search["type"], "searchset");
    assert_eq!(search["total"], 3, "the Patients entries 0, 1 and 3 created");
    assert!(
        search["entry"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["search"]["mode"] == "outcome")
    );
    assert_eq!(total(&server, "/fhir/Patient").await, 3);
    // Again: the ifNoneExist on identifier now matches, so entry 1 creates nothing.
    let again = json_of(server.post("/fhir", &batch).await).await;
    assert_eq!(statuses(&again)[1], "200 OK");
    assert_eq!(
        total(&server, "/fhir/Patient?identifier=http:/example.org/fhir/ids%7C234234").await,
        1
    );
}

/// Every method and conditional form this node honours, in one transaction,
/// processed in FHIR order (DELETE, POST, PUT, GET) whatever the Bundle order.
#[tokio::test]
async fn transaction_methods_conditionals_and_references() {
    let server = Server::start(1024 * 1024).await;
    let patient = json_of(
        server
            .post("/fhir/Patient", &json!({"resourceType": "Patient", "gender": "female"}))
            .await,
    )
    .await;
    let pid = patient["id"].as_str().unwrap().to_owned();
    let pvid = patient["meta"]["versionId"].as_str().unwrap().to_owned();
    let doomed = json_of(server.post("/fhir/Patient", &json!({"resourceType": "Patient"})).await).await;
    let doomed_id = doomed["id"].as_str().unwrap().to_owned();
    let obs = |subject: &str| {
        json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
               "subject": {"reference": subject}})
    };
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        // 0: GET (runs last: sees the update of entry 3)
        {"request": {"method": "GET", "url": format!("Patient/{pid}")}},
        // 1: references entry 2 by its urn:uuid
        {"fullUrl": "urn:uuid:11111111-1111-4111-8111-111111111111",
         "resource": obs("urn:uuid:22222222-2222-4222-8222-222222222222"),
         "request": {"method": "POST", "url": "Observation"}},
        // 2: conditional create that matches the existing Patient: not created, 200
        {"fullUrl": "urn:uuid:22222222-2222-4222-8222-222222222222",
         "resource": {"resourceType": "Patient"},
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": format!("_id={pid}")}},
        // 3: update with the current ETag
        {"resource": {"resourceType": "Patient", "id": pid, "gender": "male"},
         "request": {"method": "PUT", "url": format!("Patient/{pid}"), "ifMatch": format!("W/\"{pvid}\"")}},
        // 4: delete
        {"request": {"method": "DELETE", "url": format!("Patient/{doomed_id}")}},
        // 5: conditional delete matching nothing
        {"request": {"method": "DELETE", "url": "Observation?_id=none"}},
        // 6: search
        {"request": {"method": "GET", "url": format!("Observation?subject=Patient/{pid}")}},
        // 7: conditional create that matches nothing: created
        {"fullUrl": "urn:uuid:33333333-3333-4333-8333-333333333333",
         "resource": obs(&format!("Patient/{pid}")),
         "request": {"method": "POST", "url": "Observation", "ifNoneExist": "_id=none"}},
    ]});
    let response = server.post("/fhir", &tx).await;
    assert_eq!(response.status(), 200);
    let bundle = json_of(response).await;
    assert_eq!(
        statuses(&bundle),
        [
            "200 OK",
            "201 Created",
            "200 OK",
            "200 OK",
            "204 No Content",
            "204 No Content",
            "200 OK",
            "201 Created"
        ]
    );
    let e = bundle["entry"].as_array().unwrap();
    assert_eq!(e[0]["resource"]["gender"], "male", "GET ran after PUT");
    assert_eq!(e[1]["resource"]["subject"]["reference"], format!("Patient/{pid}"));
    assert_eq!(
        e[2]["response"]["location"].as_str().unwrap(),
        format!("Patient/{pid}/_history/{pvid}")
    );
    assert_eq!(e[6]["resource"]["type"], "searchset");
    assert_eq!(e[6]["resource"]["total"], 2, "both Observations, written before GETs");
    assert_eq!(server.get(&format!("/fhir/Patient/{doomed_id}")).await.status(), 410);
    assert_eq!(total(&server, "/fhir/Patient").await, 1);
    assert_eq!(total(&server, "/fhir/Observation").await, 2);

    // Prefer: return=minimal leaves resources out of write entries.
    let minimal = server
        .client
        .post(server.url("/fhir"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/fhir+json")
        .header("prefer", "return=minimal")
        .body(
            json!({"resourceType": "Bundle", "type": "transaction", "entry": [
                {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}}]})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    let minimal = json_of(minimal).await;
    assert!(minimal["entry"][0].get("resource").is_none(), "{minimal}");
    assert!(minimal["entry"][0]["response"]["location"].is_string());
}

/// A transaction that cannot be honoured writes nothing and names the entry:
/// an invalid resource (422), a stale `ifMatch` found only when writing (412,
/// the creates before it rolled back), several matches of `ifNoneExist` (412),
/// a `urn:uuid:` reference to no entry (400), one resource changed twice (400).
#[tokio::test]
async fn failing_transactions_write_nothing() {
    let server = Server::start(1024 * 1024).await;
    let patient = json_of(server.post("/fhir/Patient", &json!({"resourceType": "Patient"})).await).await;
    let pid = patient["id"].as_str().unwrap().to_owned();
    let _ = server.post("/fhir/Patient", &json!({"resourceType": "Patient"})).await;
    let post =
        |resource: Value| json!({"resource": resource, "request": {"method": "POST", "url": resource["resourceType"]}});
    let good = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}});
    let cases: Vec<(&str, Vec<Value>, u16, &str, &str)> = vec![
        (
            "invalid resource",
            vec![
                post(good.clone()),
                post(json!({"resourceType": "Observation", "code": {"text": "x"}})),
            ],
            422,
            "Bundle.entry[1].resource.status",
            "required",
        ),
        (
            "stale ifMatch",
            vec![
                post(good.clone()),
                json!({"resource": {"resourceType": "Patient", "id": pid, "gender": "other"},
                       "request": {"method": "PUT", "url": format!("Patient/{pid}"), "ifMatch": "W/\"0000\""}}),
            ],
            412,
            "Bundle.entry[1]",
            "conflict",
        ),
        (
            "ifNoneExist matches two",
            vec![
                post(good.clone()),
                json!({"resource": {"resourceType": "Patient"},
                       "request": {"method": "POST", "url": "Patient", "ifNoneExist": "_lastUpdated=ge2000"}}),
            ],
            412,
            "Bundle.entry[1]",
            "multiple-matches",
        ),
        (
            "dangling urn:uuid",
            vec![
                post(good.clone()),
                post(
                    json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                            "subject": {"reference": "urn:uuid:9e8b1a7c-0000-4000-8000-000000000000"}}),
                ),
            ],
            400,
            "Bundle.entry[1].resource.subject.reference",
            "not-found",
        ),
        (
            "changed twice",
            vec![
                post(good.clone()),
                json!({"request": {"method": "DELETE", "url": format!("Patient/{pid}")}}),
                json!({"resource": {"resourceType": "Patient", "id": pid},
                       "request": {"method": "PUT", "url": format!("Patient/{pid}")}}),
            ],
            400,
            "Bundle.entry[2]",
            "duplicate",
        ),
        (
            "missing resource to delete",
            vec![
                post(good.clone()),
                json!({"request": {"method": "DELETE", "url": "Patient/nothere"}}),
            ],
            404,
            "Bundle.entry[1]",
            "not-found",
        ),
    ];
    for (name, entries, status, expression, code) in cases {
        let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
        let response = server.post("/fhir", &tx).await;
        assert_eq!(response.status().as_u16(), status, "{name}");
        let outcome = json_of(response).await;
        assert_eq!(outcome["resourceType"], "OperationOutcome", "{name}");
        assert!(
            outcome_expressions(&outcome).contains(&expression.to_owned()),
            "{name}: {outcome}"
        );
        assert_eq!(outcome["issue"][0]["code"], code, "{name}: {outcome}");
        assert_eq!(total(&server, "/fhir/Observation").await, 0, "{name}: nothing written");
        assert_eq!(total(&server, "/fhir/Patient").await, 2, "{name}: nothing deleted");
        let read = json_of(server.get(&format!("/fhir/Patient/{pid}")).await).await;
        assert_eq!(read, patient, "{name}: unchanged");
    }
}

/// A transaction is all or nothing at the backend too: the Synthea Bundle
/// with one more entry that only the backend can refuse (a stale `ifMatch`,
/// checked before the writes; a GET of a missing resource, run after them)
/// fails whole, and none of its 319 creates is left behind.
#[tokio::test]
async fn a_transaction_whose_last_entry_fails_leaves_no_earlier_entry() {
    let server = Server::start(8 * 1024 * 1024).await;
    let existing = json_of(
        server
            .post("/fhir/Patient", &json!({"resourceType": "Patient", "gender": "female"}))
            .await,
    )
    .await;
    let id = existing["id"].as_str().unwrap();
    let total = |t: &'static str| {
        let server = &server;
        async move { json_of(server.get(&format!("/fhir/{t}?_count=1")).await).await["total"].clone() }
    };
    let failing_entries = [
        (
            json!({"resource": {"resourceType": "Patient", "id": id, "gender": "male"},
                   "request": {"method": "PUT", "url": format!("Patient/{id}"), "ifMatch": "W/\"0000000000000000\""}}),
            412,
        ),
        (json!({"request": {"method": "GET", "url": "Patient/not-there"}}), 404),
    ];
    for (last, status) in failing_entries {
        let mut bundle = read_example("Bundle-synthea-Brekke496.json");
        let entries = bundle["entry"].as_array_mut().unwrap();
        entries.push(last);
        let index = entries.len() - 1;
        let response = server.post("/fhir", &bundle).await;
        assert_eq!(response.status(), status);
        let outcome = json_of(response).await;
        assert!(
            outcome["issue"][0]["diagnostics"]
                .as_str()
                .unwrap()
                .starts_with(&format!("entry {index}:")),
            "{outcome}"
        );
        for t in ["Patient", "Observation", "Claim", "Encounter", "Organization"] {
            let expected = if t == "Patient" { 1 } else { 0 };
            assert_eq!(total(t).await, expected, "{t} left behind by a failed transaction");
        }
        let now = json_of(server.get(&format!("/fhir/Patient/{id}")).await).await;
        assert_eq!(now, existing);
    }
}

/// What the server builds passes the external R4 validator (when installed):
/// the CapabilityStatement, a searchset with a warning, a transaction-response
/// and a batch-response with OperationOutcomes.
#[tokio::test]
async fn served_bundles_pass_the_external_validator() {
    let server = Server::start(8 * 1024 * 1024).await;
    let metadata = json_of(server.get("/fhir/metadata").await).await;
    let transaction = json_of(
        server
            .post("/fhir", &read_example("Bundle-synthea-Brekke496.json"))
            .await,
    )
    .await;
    let searchset = json_of(server.get("/fhir/Observation?_count=5&foo=bar").await).await;
    let mut batch = read_example("Bundle-bundle-transaction.json");
    batch["type"] = json!("batch");
    let batch = json_of(server.post("/fhir", &batch).await).await;
    let documents = [
        ("metadata", metadata),
        ("transaction-response", transaction),
        ("searchset", searchset),
        ("batch-response", batch),
    ];
    if let Some(verdict) = fhirval::validate(&documents) {
        verdict.unwrap_or_else(|text| panic!("validator says:\n{text}"));
    }
}

/// `GET /openapi.json` documents every route: each documented method is
/// served (never the unknown-route 404 or a 405), every other method on a
/// documented path answers 405, and only the public operations work without
/// the token.
#[tokio::test]
async fn openapi_documents_every_route() {
    let server = Server::start(1024 * 1024).await;
    assert_eq!(
        server
            .client
            .get(server.url("/openapi.json"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let doc = json_of(server.get("/openapi.json").await).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let patient = json_of(server.post("/fhir/Patient", &json!({"resourceType": "Patient"})).await).await;
    let id = patient["id"].as_str().unwrap();
    let vid = patient["meta"]["versionId"].as_str().unwrap();
    let paths = doc["paths"].as_object().unwrap();
    let mut checked = 0;
    for (path, item) in paths {
        let concrete = path
            .replace("{type}", "Patient")
            .replace("{id}", id)
            .replace("{vid}", vid);
        for method in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
            let documented = item.get(method.to_ascii_lowercase()).is_some();
            let request = server.client.request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                server.url(&concrete),
            );
            let response = request.try_clone().unwrap().bearer_auth(TOKEN).send().await.unwrap();
            let status = response.status().as_u16();
            let body = response.text().await.unwrap();
            if documented {
                assert_ne!(status, 405, "{method} {path}");
                assert!(!body.contains("route/unknown"), "{method} {path} is not routed");
                let public = item[method.to_ascii_lowercase()]["security"] == json!([]);
                let anonymous = request.send().await.unwrap().status().as_u16();
                assert_eq!(anonymous == 401, !public, "{method} {path} without token: {anonymous}");
                checked += 1;
            } else {
                assert_eq!(status, 405, "{method} {path} is served but not documented");
            }
        }
    }
    assert_eq!(checked, 22);
}

/// The ```` ```sh runnable ```` blocks of `docs/http-api.md`, in order, as one
/// `sh -eu` script run with the machine's `curl` against a test gateway.
#[tokio::test]
async fn docs_curl_examples_run() {
    if std::process::Command::new("curl").arg("--version").output().is_err() {
        println!("skipped: curl is not installed");
        return;
    }
    let doc_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/http-api.md");
    let doc = std::fs::read_to_string(&doc_path).unwrap();
    let mut script = String::from("set -eu\n");
    let mut blocks = 0;
    let mut inside = false;
    for (n, line) in doc.lines().enumerate() {
        if !inside && line.trim_end() == "```sh runnable" {
            inside = true;
            blocks += 1;
            script.push_str(&format!(
                "echo '>>> docs/http-api.md block {blocks} (line {})'\n",
                n + 1
            ));
        } else if inside && line.trim_end() == "```" {
            inside = false;
        } else if inside {
            script.push_str(line);
            script.push('\n');
        }
    }
    assert!(!inside, "unterminated block");
    assert!(blocks >= 8, "only {blocks} runnable blocks");
    let server = Server::start(1024 * 1024).await;
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .env("BASE", &server.base)
        .env("TOKEN", TOKEN)
        .current_dir(dir.path())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "a docs example failed (the last >>> marker names its block)\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    assert!(stdout.contains(&format!("block {blocks} ")), "{stdout}");
    println!("{stdout}");
}
