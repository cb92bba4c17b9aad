//! Over real HTTP (reqwest against 127.0.0.1:0, in-memory backend):
//! `identifier` search and conditional requests on it, conditional reads
//! (`If-None-Match`, `If-Modified-Since`, and a transaction's `ifNoneMatch` /
//! `ifModifiedSince`), and searchset links that percent-encode their values
//! and walk the whole result.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/mem.rs"]
mod mem;
#[path = "common/server.rs"]
mod server;

use serde_json::{Value, json};
use server::{Server, TOKEN};

/// What these tests ask of the test server beyond plain requests.
trait SearchServer {
    async fn created(&self, resource: Value) -> Value;
    async fn search_ids(&self, path: &str) -> Vec<String>;
}

impl SearchServer for Server {
    async fn created(&self, resource: Value) -> Value {
        let path = format!("/fhir/{}", resource["resourceType"].as_str().unwrap());
        let response = self.post(&path, &resource).await;
        assert_eq!(response.status(), 201);
        json_of(response).await
    }

    /// Ids of every match of a search, following `next` links to the end.
    async fn search_ids(&self, path: &str) -> Vec<String> {
        let mut ids = Vec::new();
        let mut url = self.url(path);
        loop {
            let bundle = json_of(self.client.get(&url).bearer_auth(TOKEN).send().await.unwrap()).await;
            assert_eq!(bundle["type"], "searchset", "{url}: {bundle}");
            for entry in bundle["entry"].as_array().cloned().unwrap_or_default() {
                if entry["search"]["mode"] == "match" {
                    ids.push(entry["resource"]["id"].as_str().unwrap().to_owned());
                }
            }
            match next_link(&bundle) {
                Some(next) => url = next,
                None => return ids,
            }
        }
    }
}

async fn json_of(response: reqwest::Response) -> Value {
    let bytes = response.bytes().await.unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn next_link(bundle: &Value) -> Option<String> {
    bundle["link"]
        .as_array()?
        .iter()
        .find(|l| l["relation"] == "next")
        .map(|l| l["url"].as_str().unwrap().to_owned())
}

fn statuses(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap().to_owned())
        .collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn id_of(resource: &Value) -> String {
    resource["id"].as_str().unwrap().to_owned()
}

const MRN: &str = "http://hospital.example.org/mrn";

#[tokio::test]
async fn identifier_token_search() {
    let server = Server::start(1024 * 1024).await;
    let with = |ids: Value| json!({"resourceType": "Patient", "identifier": ids});
    let a = id_of(&server.created(with(json!([{"system": MRN, "value": "1001"}]))).await);
    let b = id_of(
        &server
            .created(with(
                json!([{"system": MRN, "value": "1002"}, {"system": "urn:other", "value": "1001"}]),
            ))
            .await,
    );
    let c = id_of(&server.created(with(json!([{"value": "1001"}]))).await);
    let _none = server.created(json!({"resourceType": "Patient"})).await;

    let server = &server;
    let found = |q: &str| {
        let path = format!("/fhir/Patient?identifier={q}");
        async move { sorted(server.search_ids(&path).await) }
    };
    assert_eq!(found("http://hospital.example.org/mrn%7C1001").await, [a.as_str()]);
    assert_eq!(found("1001").await, sorted(vec![a.clone(), b.clone(), c.clone()]));
    assert_eq!(
        found("http://hospital.example.org/mrn%7C").await,
        sorted(vec![a.clone(), b.clone()])
    );
    assert_eq!(found("%7C1001").await, [c.as_str()]);
    assert_eq!(
        found("urn:other%7C1001,%7C1001").await,
        sorted(vec![b.clone(), c.clone()])
    );
    assert!(found("http://hospital.example.org/mrn%7C9999").await.is_empty());
    // Repeating the parameter ANDs.
    assert_eq!(found("1002&identifier=urn:other%7C").await, [b.as_str()]);

    // Other types search their identifiers too; DocumentReference also its masterIdentifier.
    let obs = server
        .created(
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                        "identifier": [{"system": "urn:lab", "value": "L-7"}],
                        "subject": {"reference": format!("Patient/{a}")}}),
        )
        .await;
    assert_eq!(
        server
            .search_ids(&format!(
                "/fhir/Observation?subject=Patient/{a}&identifier=urn:lab%7CL-7"
            ))
            .await,
        [id_of(&obs)]
    );
    let doc = server
        .created(json!({"resourceType": "DocumentReference", "status": "current",
                        "masterIdentifier": {"system": "urn:docs", "value": "D-1"},
                        "content": [{"attachment": {"contentType": "text/plain"}}],
                        "subject": {"reference": format!("Patient/{a}")}}))
        .await;
    assert_eq!(
        server
            .search_ids("/fhir/DocumentReference?identifier=urn:docs%7CD-1")
            .await,
        [id_of(&doc)]
    );

    // Binary has no identifier in R4: ignored with a warning, or 400 when strict.
    let bundle = json_of(server.get("/fhir/Binary?identifier=x").await).await;
    assert!(
        bundle["entry"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["search"]["mode"] == "outcome")),
        "{bundle}"
    );
    // A malformed token is a 400 naming the parameter.
    let bad = server.get("/fhir/Patient?identifier=a%7Cb%7Cc").await;
    assert_eq!(bad.status(), 400);
    assert!(json_of(bad).await.to_string().contains("identifier"));
}

/// Conditional create, update and delete on `identifier`, in a transaction
/// (the HL7 transaction example's conditions, all on `identifier`, are in
/// `http.rs`).
#[tokio::test]
async fn identifier_conditionals_in_transactions() {
    let server = Server::start(1024 * 1024).await;
    let existing = server
        .created(json!({"resourceType": "Patient", "identifier": [{"system": MRN, "value": "77"}], "gender": "female"}))
        .await;
    let pid = id_of(&existing);
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        // 0: matches the existing Patient: not created, and entry 1's reference points to it.
        {"fullUrl": "urn:uuid:aaaaaaaa-1111-4111-8111-111111111111",
         "resource": {"resourceType": "Patient", "identifier": [{"system": MRN, "value": "77"}]},
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": format!("identifier={MRN}|77")}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": "urn:uuid:aaaaaaaa-1111-4111-8111-111111111111"}},
         "request": {"method": "POST", "url": "Observation"}},
        // 2: matches nothing: created.
        {"resource": {"resourceType": "Patient", "identifier": [{"system": MRN, "value": "78"}]},
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": format!("identifier={MRN}|78")}},
        // 3: conditional update of the existing Patient by identifier.
        {"resource": {"resourceType": "Patient", "identifier": [{"system": MRN, "value": "77"}], "gender": "male"},
         "request": {"method": "PUT", "url": format!("Patient?identifier={MRN}%7C77")}},
    ]});
    let response = server.post("/fhir", &tx).await;
    assert_eq!(response.status(), 200);
    let bundle = json_of(response).await;
    assert_eq!(statuses(&bundle), ["200 OK", "201 Created", "201 Created", "200 OK"]);
    let e = bundle["entry"].as_array().unwrap();
    assert_eq!(e[1]["resource"]["subject"]["reference"], format!("Patient/{pid}"));
    assert_eq!(e[3]["resource"]["id"], pid.as_str());
    assert_eq!(e[3]["resource"]["gender"], "male");
    assert_eq!(server.search_ids("/fhir/Patient").await.len(), 2);

    // Conditional delete by identifier.
    let delete = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "DELETE", "url": format!("Patient?identifier={MRN}%7C78")}}]});
    let bundle = json_of(server.post("/fhir", &delete).await).await;
    assert_eq!(statuses(&bundle), ["204 No Content"]);
    assert_eq!(server.search_ids("/fhir/Patient").await, [pid.as_str()]);

    // Two matches: 412, nothing written.
    let _twin = server
        .created(json!({"resourceType": "Patient", "identifier": [{"system": MRN, "value": "77"}]}))
        .await;
    let twice = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient"},
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": format!("identifier={MRN}|77")}}]});
    assert_eq!(server.post("/fhir", &twice).await.status(), 412);
    assert_eq!(server.search_ids("/fhir/Patient").await.len(), 2);
}

/// `If-None-Exist` on `POST /fhir/{type}`: no match creates (201), one match
/// answers it (200, nothing written), several are 412; the
/// CapabilityStatement says conditional create is supported.
#[tokio::test]
async fn if_none_exist_header_creates_once() {
    let server = Server::start(1024 * 1024).await;
    let post = |condition: String| {
        let server = &server;
        async move {
            server
                .client
                .post(server.url("/fhir/Patient"))
                .bearer_auth(TOKEN)
                .header("content-type", "application/fhir+json")
                .header("if-none-exist", condition)
                .body(json!({"resourceType": "Patient", "identifier": [{"system": MRN, "value": "90"}]}).to_string())
                .send()
                .await
                .unwrap()
        }
    };
    let condition = format!("identifier={MRN}|90");
    let first = post(condition.clone()).await;
    assert_eq!(first.status(), 201);
    let first = json_of(first).await;
    let again = post(condition.clone()).await;
    assert_eq!(again.status(), 200);
    assert!(again.headers().contains_key("etag"));
    let again = json_of(again).await;
    assert_eq!(again, first, "the existing resource, unchanged");
    assert_eq!(server.search_ids("/fhir/Patient").await, [id_of(&first)]);
    // Percent-encoded, as a client building a URL query would send it.
    assert_eq!(post(format!("identifier={MRN}%7C90")).await.status(), 200);
    let _twin = server
        .created(json!({"resourceType": "Patient", "identifier": [{"system": MRN, "value": "90"}]}))
        .await;
    let several = post(condition).await;
    assert_eq!(several.status(), 412);
    assert_eq!(json_of(several).await["issue"][0]["code"], "multiple-matches");
    assert_eq!(server.search_ids("/fhir/Patient").await.len(), 2);
    let metadata = json_of(server.get("/fhir/metadata").await).await;
    let resources = metadata["rest"][0]["resource"].as_array().unwrap();
    let writable: Vec<&Value> = resources
        .iter()
        .filter(|r| {
            r["interaction"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["code"] == "create")
        })
        .collect();
    assert!(writable.len() > 10);
    assert!(writable.iter().all(|r| r["conditionalCreate"] == true));
}

#[tokio::test]
async fn conditional_reads_answer_not_modified() {
    let server = Server::start(1024 * 1024).await;
    let response = server.post("/fhir/Patient", &json!({"resourceType": "Patient"})).await;
    let etag = response.headers()["etag"].to_str().unwrap().to_owned();
    let last_modified = response.headers()["last-modified"].to_str().unwrap().to_owned();
    let patient = json_of(response).await;
    let id = id_of(&patient);
    let path = format!("/fhir/Patient/{id}");
    let read = |header: &'static str, value: String| {
        let url = server.url(&path);
        let client = server.client.clone();
        async move {
            client
                .get(url)
                .bearer_auth(TOKEN)
                .header(header, value)
                .send()
                .await
                .unwrap()
        }
    };

    let current = read("if-none-match", etag.clone()).await;
    assert_eq!(current.status(), 304);
    assert_eq!(current.headers()["etag"].to_str().unwrap(), etag);
    assert!(current.bytes().await.unwrap().is_empty());
    assert_eq!(read("if-none-match", "W/\"0000\", *".to_owned()).await.status(), 304);
    assert_eq!(read("if-none-match", "W/\"0000\"".to_owned()).await.status(), 200);
    assert_eq!(read("if-modified-since", last_modified.clone()).await.status(), 304);
    assert_eq!(
        read("if-modified-since", "Thu, 01 Jan 2015 00:00:00 GMT".to_owned())
            .await
            .status(),
        200
    );
    // A date that does not parse is ignored (RFC 9110).
    assert_eq!(read("if-modified-since", "yesterday".to_owned()).await.status(), 200);
    // If-None-Match decides when both are given.
    let both = server
        .client
        .get(server.url(&path))
        .bearer_auth(TOKEN)
        .header("if-none-match", "W/\"0000\"")
        .header("if-modified-since", last_modified)
        .send()
        .await
        .unwrap();
    assert_eq!(both.status(), 200);
    // vread of the same version: its ETag never changes.
    let vid = patient["meta"]["versionId"].as_str().unwrap();
    let vread = server
        .client
        .get(server.url(&format!("{path}/_history/{vid}")))
        .bearer_auth(TOKEN)
        .header("if-none-match", etag.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(vread.status(), 304);

    // The same in a transaction: ifModifiedSince (a FHIR instant), ifNoneMatch first.
    let last_updated = patient["meta"]["lastUpdated"].as_str().unwrap();
    let get = |extra: Value| {
        let mut request = json!({"method": "GET", "url": format!("Patient/{id}")});
        for (k, v) in extra.as_object().unwrap() {
            request[k] = v.clone();
        }
        json!({"request": request})
    };
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        get(json!({"ifModifiedSince": last_updated})),
        get(json!({"ifModifiedSince": "2015-08-31T08:14:33+10:00"})),
        get(json!({"ifNoneMatch": etag, "ifModifiedSince": "2015-08-31T08:14:33+10:00"})),
        get(json!({"ifNoneMatch": "W/\"0000\"", "ifModifiedSince": last_updated})),
    ]});
    let bundle = json_of(server.post("/fhir", &tx).await).await;
    assert_eq!(
        statuses(&bundle),
        ["304 Not Modified", "200 OK", "304 Not Modified", "200 OK"]
    );
    assert!(bundle["entry"][0].get("resource").is_none());
    assert_eq!(bundle["entry"][1]["resource"]["id"], id.as_str());
    let bad = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        get(json!({"ifModifiedSince": "last week"}))]});
    assert_eq!(server.post("/fhir", &bad).await.status(), 400);
}

/// `next` links carry every parameter percent-encoded (a token's `|`, escaped
/// `\,` and `\|`, `&`, `+`, spaces) and, followed as they are, walk the whole
/// result exactly once.
#[tokio::test]
async fn next_links_percent_encode_values_and_walk_the_whole_result() {
    let server = Server::start(1024 * 1024).await;
    let patient = id_of(&server.created(json!({"resourceType": "Patient"})).await);
    // An identifier value with every character a query string can break on.
    let value = "A&B+C D,E|F=G%H";
    let mut expected = Vec::new();
    for i in 0..7 {
        let obs = server
            .created(json!({"resourceType": "Observation", "status": "final",
                            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                            "identifier": [{"system": "urn:ids", "value": value}, {"value": format!("n{i}")}],
                            "subject": {"reference": format!("Patient/{patient}")}}))
            .await;
        expected.push(id_of(&obs));
    }
    // A decoy: the same identifier text without the escapes' meaning.
    server
        .created(
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                        "identifier": [{"system": "urn:ids", "value": "A&B+C D"}],
                        "subject": {"reference": format!("Patient/{patient}")}}),
        )
        .await;
    // `\,` and `\|` escape the value's comma and bar (FHIR search escaping).
    let token = r"urn:ids|A&B+C D\,E\|F=G%H";
    let query = format!(
        "subject=Patient/{patient}&code=http://loinc.org|8867-4&identifier={}&_count=3",
        form_encode(token)
    );
    let mut url = server.url(&format!("/fhir/Observation?{query}"));
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let bundle = json_of(server.client.get(&url).bearer_auth(TOKEN).send().await.unwrap()).await;
        assert_eq!(bundle["total"], 7, "page {pages}: {bundle}");
        for entry in bundle["entry"].as_array().cloned().unwrap_or_default() {
            seen.push(id_of(&entry["resource"]));
        }
        pages += 1;
        let self_link = bundle["link"][0]["url"].as_str().unwrap();
        for link in [Some(self_link.to_owned()), next_link(&bundle)].into_iter().flatten() {
            let query = link.split_once('?').unwrap().1;
            assert!(
                !query.contains(['|', '\\', ' ', ',', '+']),
                "reserved characters left unencoded: {link}"
            );
            // Decoded, the link names exactly the parameters asked for.
            let url = reqwest::Url::parse(&link).unwrap();
            let identifier: Vec<String> = url
                .query_pairs()
                .filter(|(k, _)| k == "identifier")
                .map(|(_, v)| v.into_owned())
                .collect();
            assert_eq!(identifier, [token]);
        }
        match next_link(&bundle) {
            Some(next) => url = next,
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(sorted(seen), sorted(expected));
}

/// Percent-encodes everything but unreserved characters (what a careful client sends).
fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
