//! The gateway over real HTTP (reqwest against 127.0.0.1:0) with an
//! in-memory backend on one record document: status codes, headers,
//! OperationOutcomes, paging, and real FHIR examples round-tripping.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use automerge::ActorId;
use medmesh_gateway::fhir::outcome::ApiError;
use medmesh_gateway::fhir::search_params::SearchRequest;
use medmesh_gateway::{Backend, Config, HistoryEntry, SignedKind, Token};
use medmesh_node::records::{Query, RecordDoc, RenderedResource, actor_id};
use serde_json::{Value, json};

const TOKEN: &str = "test-token-1234";

struct MemBackend {
    doc: Mutex<RecordDoc>,
    actor: ActorId,
    next_id: Mutex<u64>,
}

impl MemBackend {
    fn new() -> Self {
        Self {
            doc: Mutex::new(RecordDoc::new()),
            actor: actor_id(&[7; 32], [1; 8]),
            next_id: Mutex::new(0),
        }
    }

    fn now() -> i64 {
        i64::try_from(medmesh_crypto::now()).unwrap()
    }
}

impl Backend for MemBackend {
    async fn create(&self, resource: Value) -> Result<Arc<RenderedResource>, ApiError> {
        let id = {
            let mut next = self.next_id.lock().unwrap();
            *next += 1;
            format!("m{next}")
        };
        let written = self
            .doc
            .lock()
            .unwrap()
            .create(&self.actor, Self::now(), &id, &resource)?;
        written.resource.ok_or(ApiError::Internal)
    }

    async fn read(&self, t: &str, id: &str) -> Result<Arc<RenderedResource>, ApiError> {
        Ok(self.doc.lock().unwrap().read(&format!("{t}/{id}"))?)
    }

    async fn vread(&self, t: &str, id: &str, vid: &str) -> Result<Arc<RenderedResource>, ApiError> {
        Ok(self.doc.lock().unwrap().vread(&format!("{t}/{id}"), vid)?)
    }

    async fn history(&self, t: &str, id: &str) -> Result<Vec<HistoryEntry>, ApiError> {
        let key = format!("{t}/{id}");
        let doc = self.doc.lock().unwrap();
        let versions = doc.history(&key)?;
        Ok(versions
            .into_iter()
            .map(|version| {
                let resource = if version.deleted {
                    None
                } else {
                    doc.vread(&key, &version.version_id).ok()
                };
                HistoryEntry { version, resource }
            })
            .collect())
    }

    async fn update(
        &self,
        t: &str,
        id: &str,
        resource: Value,
        base: Option<String>,
        require_current: bool,
    ) -> Result<Arc<RenderedResource>, ApiError> {
        let key = format!("{t}/{id}");
        let mut doc = self.doc.lock().unwrap();
        let current = doc.read(&key)?;
        let base_json = match &base {
            Some(v) if *v != current.version_id => {
                if require_current {
                    return Err(ApiError::PreconditionFailed {
                        expected: v.clone(),
                        current: current.version_id.clone(),
                    });
                }
                doc.vread(&key, v)?.json.clone()
            }
            _ => current.json.clone(),
        };
        match doc.update(&self.actor, Self::now(), &key, &base_json, &resource)? {
            Some(written) => written.resource.ok_or(ApiError::Internal),
            None => Ok(current),
        }
    }

    async fn delete(&self, t: &str, id: &str) -> Result<(), ApiError> {
        self.doc
            .lock()
            .unwrap()
            .delete(&self.actor, Self::now(), &format!("{t}/{id}"))?;
        Ok(())
    }

    async fn search(&self, request: &SearchRequest) -> Result<Vec<Arc<RenderedResource>>, ApiError> {
        let query = Query::parse(&request.resource_type, request.params())?;
        let doc = self.doc.lock().unwrap();
        Ok(medmesh_node::records::search::search(doc.resources()?.iter(), &query))
    }

    async fn everything(&self, id: &str) -> Result<Vec<Arc<RenderedResource>>, ApiError> {
        let doc = self.doc.lock().unwrap();
        let patient = doc.read(&format!("Patient/{id}"))?;
        let mut all = vec![patient];
        all.extend(
            doc.resources()?
                .into_iter()
                .filter(|r| r.key != format!("Patient/{id}")),
        );
        Ok(all)
    }

    async fn submit(&self, _kind: SignedKind, _bytes: Vec<u8>) -> Result<Value, ApiError> {
        Err(ApiError::Forbidden(
            "no consent registry in this test backend".to_owned(),
        ))
    }

    async fn holdings(&self, did: &str) -> Result<Value, ApiError> {
        Ok(json!({ "patient": did, "envelopes": 0, "readable": 0, "opaque": 0, "by_collection": {} }))
    }

    async fn consents(&self, _did: &str) -> Result<Vec<Value>, ApiError> {
        Ok(Vec::new())
    }

    async fn audit_events(&self, _did: &str) -> Result<Vec<Value>, ApiError> {
        Ok(Vec::new())
    }

    async fn sync_status(&self) -> Value {
        json!({ "peers": [] })
    }

    fn write_metrics(&self, out: &mut String) {
        out.push_str("# TYPE medmesh_test_backend gauge\nmedmesh_test_backend 1\n");
    }
}

struct Server {
    base: String,
    client: reqwest::Client,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Server {
    async fn start(body_limit: usize) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = Config::for_addr(addr);
        config.body_limit = body_limit;
        config.max_count = 20;
        let app = medmesh_gateway::router(Arc::new(MemBackend::new()), Token::new(TOKEN), config);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(medmesh_gateway::serve(listener, app, async {
            let _ = rx.await;
        }));
        Self {
            base: format!("http://{addr}"),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            shutdown: Some(tx),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(TOKEN)
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).bearer_auth(TOKEN).send().await.unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

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
    }
    let row = |name, method, path: &str, token, content_type, body: String, status| Row {
        name,
        method,
        path: path.to_owned(),
        token,
        content_type,
        body,
        status,
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
