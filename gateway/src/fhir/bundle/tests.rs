//! Tests of Bundle building and parsing: reference resolution by FHIR's own
//! example, the Synthea and HL7 transactions, entry errors, built Bundles.

use std::collections::{HashMap, HashSet};

use serde_json::{Value, json};

use super::*;
use crate::fhir::outcome::{ApiError, OperationOutcome};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fhir/examples");

fn read(name: &str) -> Value {
    let text = std::fs::read_to_string(format!("{EXAMPLES}/{name}")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn expressions(err: &ApiError) -> Vec<String> {
    err.issues().into_iter().flat_map(|i| i.expression).collect()
}

/// FHIR's own example of reference resolution in a Bundle
/// (<https://hl7.org/fhir/R4/bundle-references.json.html>), entry by entry.
#[test]
fn references_resolve_by_the_full_url_rules() {
    let bundle = read("Bundle-bundle-references.json");
    let entries = bundle["entry"].as_array().unwrap();
    let full_urls: HashSet<&str> = entries.iter().filter_map(|e| e["fullUrl"].as_str()).collect();
    let resolve = |entry: usize| {
        let e = &entries[entry];
        let mut refs = Vec::new();
        collect_references(&e["resource"], &mut refs);
        assert_eq!(refs.len(), 1, "case entry {entry}");
        resolve_in_bundle(&refs[0], e["fullUrl"].as_str(), |u| full_urls.contains(u))
    };
    let patient_23 = Some("http://example.org/fhir/Patient/23".to_owned());
    // Relative, against the entry's own base.
    assert_eq!(resolve(2), patient_23, "case relative");
    // Absolute, equal to a fullUrl.
    assert_eq!(resolve(3), patient_23, "case absolute");
    // urn:uuid.
    assert_eq!(
        resolve(4).as_deref(),
        Some("urn:uuid:04121321-4af5-424c-a0e1-ed3aab1c349d"),
        "case urn"
    );
    // Absolute, on another server: not in the Bundle.
    assert_eq!(resolve(5), None, "case other server");
    // Relative in an entry of another server: that server's Patient/23, not entry 0.
    assert_eq!(resolve(6), None, "case relative on another base");
    // Versioned: matched without the version.
    assert_eq!(
        resolve(9).as_deref(),
        Some("http://example.org/fhir/Patient/45"),
        "case versioned"
    );
    // No fullUrl: a relative reference names a resource of this server.
    assert_eq!(resolve_in_bundle("Patient/23", None, |u| full_urls.contains(u)), None);
    assert_eq!(resolve_in_bundle("#p1", None, |u| full_urls.contains(u)), None);
}

fn collect_references(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(obj) => {
            for (k, v) in obj {
                match (k.as_str(), v) {
                    ("reference", Value::String(r)) => out.push(r.clone()),
                    _ => collect_references(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_references(v, out)),
        _ => {}
    }
}

#[test]
fn synthea_transaction_parses_and_references_rewrite() {
    let RequestBundle::Transaction(mut entries) = parse_request_bundle(read("Bundle-synthea-Brekke496.json")).unwrap()
    else {
        panic!("not a transaction")
    };
    assert_eq!(entries.len(), 319);
    assert!(entries.iter().all(|e| e.method == Method::Post && e.url.id.is_none()));
    let map: HashMap<String, String> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.full_url.clone().unwrap(), format!("{}/id{i}", e.url.resource_type)))
        .collect();
    let rewritten: usize = entries
        .iter_mut()
        .map(|e| rewrite_references(e.resource.as_mut().unwrap(), &map))
        .sum();
    assert!(rewritten > 300, "{rewritten}");
    for e in &entries {
        let text = e.resource.as_ref().unwrap().to_string();
        assert!(!text.contains("\"reference\":\"urn:uuid:"), "entry {}", e.index);
    }
}

#[test]
fn hl7_transaction_example() {
    let bundle = read("Bundle-bundle-transaction.json");
    // Entry 7 is `POST ValueSet/$lookup`: operations are not supported, so the
    // transaction fails as a whole and the issue names the entry.
    let err = parse_request_bundle(bundle.clone()).unwrap_err();
    assert_eq!(err.status(), 400);
    assert_eq!(expressions(&err), ["Bundle.entry[7].request.url"]);
    assert!(err.issues()[0].diagnostics.starts_with("entry 7:"));

    let mut batch = bundle.clone();
    batch["type"] = "batch".into();
    let RequestBundle::Batch(entries) = parse_request_bundle(batch).unwrap() else {
        panic!("not a batch")
    };
    assert_eq!(entries.len(), 10);
    let failed: Vec<usize> = entries
        .iter()
        .filter_map(|e| e.as_ref().err().map(|e| e.index))
        .collect();
    assert_eq!(failed, [7]);
    let e = |i: usize| entries[i].as_ref().unwrap();
    assert_eq!(
        e(1).if_none_exist.as_deref(),
        Some("identifier=http:/example.org/fhir/ids|234234")
    );
    assert_eq!((e(2).method, e(2).url.id.as_deref()), (Method::Put, Some("123")));
    assert_eq!(
        e(3).url.query.as_deref(),
        Some("identifier=http:/example.org/fhir/ids|456456")
    );
    assert_eq!(e(4).if_match.as_deref(), Some("W/\"2\""));
    assert_eq!((e(5).method, e(5).url.id.as_deref()), (Method::Delete, Some("234")));
    assert_eq!(e(6).url.query.as_deref(), Some("identifier=123456"));
    assert_eq!(e(8).url.query.as_deref(), Some("name=peter"));
    assert_eq!(e(9).if_none_match.as_deref(), Some("W/\"4\""));
    let response = entries[7].as_ref().unwrap_err().response();
    assert_eq!(response.status, 400);

    let mut tx = bundle;
    tx["entry"].as_array_mut().unwrap().remove(7);
    let RequestBundle::Transaction(entries) = parse_request_bundle(tx).unwrap() else {
        panic!("not a transaction")
    };
    let methods: Vec<Method> = transaction_order(&entries).iter().map(|&i| entries[i].method).collect();
    assert_eq!(
        methods,
        [
            Method::Delete,
            Method::Delete,
            Method::Post,
            Method::Post,
            Method::Put,
            Method::Put,
            Method::Put,
            Method::Get,
            Method::Get
        ]
    );
}

#[test]
fn entry_errors_name_the_entry() {
    let tx = |entries: Value| json!({ "resourceType": "Bundle", "type": "transaction", "entry": entries });
    let obs = json!({ "resourceType": "Observation", "code": { "text": "x" } });
    let cases: Vec<(Value, u16, Vec<&str>)> = vec![
        (
            tx(json!([{ "request": { "method": "POST", "url": "Observation" }, "resource": obs }])),
            422,
            vec!["Bundle.entry[0].resource.status"],
        ),
        (
            tx(json!([{ "request": { "method": "GET", "url": "Patient/1" } }, { "resource": obs }])),
            400,
            vec!["Bundle.entry[1].request"],
        ),
        (
            tx(json!([{ "request": { "method": "POST", "url": "Patient" }, "resource": obs }])),
            400,
            vec!["Bundle.entry[0].request.url", "Bundle.entry[0].resource.status"],
        ),
        (
            tx(json!([{ "request": { "method": "FETCH", "url": "Patient/1" } }])),
            400,
            vec!["Bundle.entry[0].request.method"],
        ),
        (
            tx(json!([
                { "fullUrl": "urn:uuid:5cbc121b-cd71-4428-b8b7-31e53eba8184", "request": { "method": "GET", "url": "Patient/1" } },
                { "fullUrl": "urn:uuid:5cbc121b-cd71-4428-b8b7-31e53eba8184", "request": { "method": "GET", "url": "Patient/2" } },
                { "fullUrl": "not a url", "request": { "method": "DELETE", "url": "Patient" } }
            ])),
            400,
            vec![
                "Bundle.entry[1].fullUrl",
                "Bundle.entry[2].fullUrl",
                "Bundle.entry[2].request.url",
            ],
        ),
        (
            tx(json!([{ "request": { "method": "PUT", "url": "Patient/1" },
                        "resource": { "resourceType": "Patient", "id": "2" } }])),
            400,
            vec!["Bundle.entry[0].resource.id"],
        ),
        (
            json!({ "resourceType": "Bundle", "type": "collection" }),
            400,
            vec!["Bundle.type"],
        ),
        (
            json!({ "resourceType": "Patient" }),
            400,
            vec!["resourceType", "Bundle.type"],
        ),
    ];
    for (i, (bundle, status, expected)) in cases.into_iter().enumerate() {
        let err = parse_request_bundle(bundle).unwrap_err();
        assert_eq!(err.status(), status, "case {i}: {err:?}");
        assert_eq!(expressions(&err), expected, "case {i}");
    }
    assert!(matches!(
        parse_request_bundle(json!({ "resourceType": "Bundle", "type": "batch" })),
        Ok(RequestBundle::Batch(e)) if e.is_empty()
    ));
}

#[test]
fn built_bundles() {
    let mut s = Searchset::new("http://h/fhir/Observation?patient=1&_count=1", "http://h/fhir")
        .total(2)
        .next("http://h/fhir/Observation?patient=1&_count=1&_offset=1");
    s.push(
        "http://h/fhir/Observation/a",
        json!({ "resourceType": "Observation", "id": "a" }),
        SearchMode::Match,
    );
    s.push_outcome(OperationOutcome::new().to_value());
    let b = s.build();
    assert_eq!(b["type"], "searchset");
    assert_eq!(b["total"], 2);
    assert_eq!(b["link"][1]["relation"], "next");
    assert_eq!(b["entry"][0]["search"]["mode"], "match");
    assert_eq!(b["entry"][1]["search"]["mode"], "outcome");
    assert!(Searchset::new("x", "b").build().get("entry").is_none());
    assert_eq!(
        Searchset::new("x", "b").to_bytes(),
        Searchset::new("x", "b").build().to_string().into_bytes()
    );

    // A rendered resource is written from its cached bytes, decimals as they were.
    let mut doc = medmesh_node::records::RecordDoc::new();
    let actor = medmesh_node::records::actor_id(&[1; 32], [0; 8]);
    let resource: Value =
        serde_json::from_str(r#"{"resourceType":"Observation","valueQuantity":{"value":1.50}}"#).unwrap();
    let rendered = doc.create(&actor, 1, "a", &resource).unwrap().resource.unwrap();
    let mut raw = Searchset::new("http://h/fhir/Observation", "http://h/\"fhir").total(2);
    raw.push_rendered(rendered, SearchMode::Include);
    raw.push(
        "http://h/fhir/Observation/b",
        json!({ "resourceType": "Observation", "id": "b" }),
        SearchMode::Match,
    );
    raw.push_outcome(OperationOutcome::new().to_value());
    let bytes = raw.clone().to_bytes();
    let parsed: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(parsed, raw.build());
    assert_eq!(parsed["entry"][0]["fullUrl"], "http://h/\"fhir/Observation/a");
    assert!(String::from_utf8(bytes).unwrap().contains("\"value\":1.50"));

    let r = response_bundle(
        BundleKind::Transaction,
        vec![EntryResponse {
            status: 201,
            location: Some("Patient/1/_history/v1".into()),
            etag: Some("W/\"v1\"".into()),
            ..EntryResponse::default()
        }],
    );
    assert_eq!(r["type"], "transaction-response");
    assert_eq!(r["entry"][0]["response"]["status"], "201 Created");
    assert_eq!(response_bundle(BundleKind::Batch, vec![])["type"], "batch-response");
}
