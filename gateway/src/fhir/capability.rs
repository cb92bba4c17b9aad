//! The gateway's `CapabilityStatement` (`GET /fhir/metadata`).

use serde_json::{Value, json};

use super::search_params::{DEFAULT_COUNT, type_params};
use super::types::{READ_ONLY_TYPES, SUPPORTED_TYPES};

/// Interactions on every stored type.
const INTERACTIONS: &[&str] = &[
    "read",
    "vread",
    "create",
    "update",
    "delete",
    "history-instance",
    "search-type",
];

fn param(name: &str, ty: &str, documentation: &str) -> Value {
    json!({ "name": name, "type": ty, "documentation": documentation })
}

fn search_params(resource_type: &str, max_count: usize) -> Vec<Value> {
    let mut params = Vec::new();
    for (name, ty) in type_params(resource_type).unwrap_or_default() {
        let doc = match name {
            "patient" | "subject" => {
                "The patient the resource belongs to: `Patient/{id}` or `{id}`. Searches are scoped to one patient; without it the node scans its cache (slow)."
            }
            "date" => {
                "Prefixes eq, ne, gt, lt, ge, le, sa, eb, ap; partial dates (yyyy, yyyy-mm, yyyy-mm-dd) or a dateTime."
            }
            "code" | "category" | "status" => {
                "Token: system|code, |code (no system), code (any system) or system| (any code); comma-separated alternatives; \\, \\| escape."
            }
            "identifier" => {
                "Token on the resource's identifiers: system|value, |value (no system), value (any system) or system| (any value); comma-separated alternatives; \\, \\| escape. Usable in conditional requests (ifNoneExist, conditional update and delete)."
            }
            _ => "Comma-separated alternatives.",
        };
        params.push(param(name, ty, doc));
    }
    params.push(param("_id", "token", "Logical id; comma-separated alternatives."));
    if !READ_ONLY_TYPES.contains(&resource_type) {
        params.push(param(
            "_lastUpdated",
            "date",
            "When the resource last changed; same prefixes as other dates.",
        ));
    }
    params.push(param(
        "_count",
        "number",
        &format!(
            "Page size; default {}, capped at {max_count}.",
            DEFAULT_COUNT.min(max_count)
        ),
    ));
    params
}

/// The `CapabilityStatement` for a gateway at `base_url` whose searches return at most
/// `max_count` entries per page.
pub fn capability_statement(base_url: &str, max_count: usize) -> Value {
    let date = time::OffsetDateTime::now_utc().date().to_string();
    let mut resources = Vec::new();
    for &ty in SUPPORTED_TYPES {
        let mut res = json!({
            "type": ty,
            "interaction": INTERACTIONS.iter().map(|code| json!({ "code": code })).collect::<Vec<_>>(),
            "versioning": "versioned",
            "readHistory": true,
            "updateCreate": false,
            "conditionalCreate": true,
            "conditionalRead": "full-support",
            "conditionalUpdate": false,
            "conditionalDelete": "not-supported",
            "searchParam": search_params(ty, max_count),
        });
        if ty == "Patient"
            && let Some(obj) = res.as_object_mut()
        {
            obj.insert(
                "operation".into(),
                json!([{
                    "name": "everything",
                    "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
                    "documentation": "Every resource of the patient's record the caller may read, as a searchset Bundle."
                }]),
            );
        }
        resources.push(res);
    }
    for &ty in READ_ONLY_TYPES {
        let documentation = if ty == "Consent" {
            "The consent grants the node holds for a patient, shown as FHIR Consent. Read-only."
        } else {
            "The node's audit log entries about a patient, shown as FHIR AuditEvent. Read-only."
        };
        resources.push(json!({
            "type": ty,
            "documentation": documentation,
            "interaction": [{ "code": "search-type" }],
            "searchParam": search_params(ty, max_count),
        }));
    }
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date,
        "publisher": "medmesh",
        "kind": "instance",
        "software": { "name": "medmesh", "version": env!("CARGO_PKG_VERSION") },
        "implementation": { "description": "medmesh node gateway", "url": base_url },
        "fhirVersion": "4.0.1",
        "format": ["json", "application/fhir+json"],
        "rest": [{
            "mode": "server",
            "documentation": format!(
                "medmesh peer-to-peer health record node. Every request needs the node's bearer token. \
                 Search results are paged with _count (default {}, capped at {max_count}) and _offset; \
                 searches are scoped to a patient with patient= or subject= (a Patient reference, or the \
                 patient's did:key). Unknown search parameters \
                 are reported in the Bundle, or rejected with 400 under Prefer: handling=strict. \
                 POST assigns ids; update-as-create is not supported. POST to the base takes transaction \
                 (all or nothing, urn:uuid: references rewritten) and batch Bundles; inside them, \
                 conditional create (ifNoneExist), conditional update and conditional delete are \
                 supported on the search parameters listed here (others are rejected with 400), \
                 ifMatch on PUT, and ifNoneMatch / ifModifiedSince on GET (304). Reads and vreads \
                 answer If-None-Match and If-Modified-Since with 304 Not Modified. POST /{{type}} takes \
                 If-None-Exist (conditional create: no match creates, one match answers it with 200, \
                 several are 412).",
                DEFAULT_COUNT.min(max_count)
            ),
            "security": {
                "cors": false,
                "description": "Bearer token issued at node init (Authorization: Bearer ...)."
            },
            "resource": resources,
            "interaction": [
                { "code": "transaction" },
                { "code": "batch" }
            ]
        }]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_every_type_and_cap() {
        let cs = capability_statement("http://127.0.0.1:8080/fhir", 200);
        let resources = cs["rest"][0]["resource"].as_array().unwrap();
        let listed: Vec<&str> = resources.iter().map(|r| r["type"].as_str().unwrap()).collect();
        for ty in SUPPORTED_TYPES.iter().chain(READ_ONLY_TYPES) {
            assert!(listed.contains(ty), "{ty} missing");
        }
        assert_eq!(listed.len(), SUPPORTED_TYPES.len() + READ_ONLY_TYPES.len());
        assert!(
            cs["rest"][0]["documentation"]
                .as_str()
                .unwrap()
                .contains("capped at 200")
        );
        let obs = resources.iter().find(|r| r["type"] == "Observation").unwrap();
        let names: Vec<&str> = obs["searchParam"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "patient",
                "subject",
                "code",
                "date",
                "status",
                "category",
                "identifier",
                "_id",
                "_lastUpdated",
                "_count"
            ]
        );
        let params = |ty: &str| -> Vec<String> {
            let r = resources.iter().find(|r| r["type"] == ty).unwrap();
            r["searchParam"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["name"].as_str().unwrap().to_owned())
                .collect()
        };
        assert!(params("Patient").contains(&"identifier".to_owned()));
        assert!(!params("Binary").contains(&"identifier".to_owned()));
        let patient = resources.iter().find(|r| r["type"] == "Patient").unwrap();
        assert_eq!(patient["operation"][0]["name"], "everything");
        let consent = resources.iter().find(|r| r["type"] == "Consent").unwrap();
        assert_eq!(consent["interaction"], json!([{ "code": "search-type" }]));
        assert_eq!(cs["fhirVersion"], "4.0.1");
        assert!(super::super::validate::validate(&cs).is_err(), "not a stored type");
    }
}
