//! The OpenAPI 3.1 document (`GET /openapi.json`), built with utoipa's
//! builder API from one table of operations. The router registers exactly the
//! routes of this table (see `server::router`), so the document cannot miss a
//! route; a test checks every documented method is served and every other
//! method on those paths answers 405.

use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::response::{ResponseBuilder, ResponsesBuilder};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ComponentsBuilder, ContentBuilder, InfoBuilder, OpenApi, OpenApiBuilder, PathsBuilder, Required, ServerBuilder,
};

/// One documented operation.
pub(crate) struct Op {
    /// HTTP method, upper case.
    pub(crate) method: &'static str,
    /// The path as documented (OpenAPI template).
    pub(crate) path: &'static str,
    /// The axum route serving it (differs only where one route serves several
    /// documented paths: `/fhir/{type}/{id}/{op}`).
    pub(crate) route: &'static str,
    id: &'static str,
    summary: &'static str,
    description: &'static str,
    /// No bearer token needed.
    pub(crate) public: bool,
    /// Request body media type, when the operation takes one.
    body: Option<&'static str>,
    /// Query parameters and header parameters: (in, name, description).
    params: &'static [(Where, &'static str, &'static str)],
    /// Success status and what it returns.
    ok: &'static str,
    ok_description: &'static str,
    /// Media type of the success body (empty: none).
    produces: &'static str,
}

#[derive(Clone, Copy)]
enum Where {
    Query,
    Header,
}

const FHIR: &str = "application/fhir+json";
const JSON: &str = "application/json";

const SEARCH_PARAMS: &[(Where, &str, &str)] = &[
    (
        Where::Query,
        "patient",
        "The patient: `Patient/{id}` or `{id}`; `subject` is the same. For Consent and AuditEvent: the patient's did:key (required).",
    ),
    (Where::Query, "subject", "As `patient`."),
    (Where::Query, "_id", "Logical ids, comma-separated."),
    (
        Where::Query,
        "_lastUpdated",
        "Date with prefix (eq ne gt lt ge le sa eb ap).",
    ),
    (
        Where::Query,
        "code",
        "Token `system|code`, `|code` or `code`; commas OR.",
    ),
    (Where::Query, "date", "The type's main date, with prefix."),
    (Where::Query, "status", "Status codes, comma-separated."),
    (Where::Query, "category", "Token, as `code`."),
    (
        Where::Query,
        "_count",
        "Page size (default 50, capped by the server; see the CapabilityStatement).",
    ),
    (
        Where::Query,
        "_offset",
        "Matches to skip: the page cursor carried by `next` links.",
    ),
    (
        Where::Query,
        "_format",
        "Only `json` / `application/fhir+json`; any other format is a 406.",
    ),
    (
        Where::Query,
        "_pretty",
        "`true` or `false` (accepted, output is compact).",
    ),
    (
        Where::Header,
        "Prefer",
        "`handling=strict`: unknown parameters are a 400 instead of a warning in the Bundle.",
    ),
];

const PREFER_RETURN: (Where, &str, &str) = (
    Where::Header,
    "Prefer",
    "`return=minimal`: no resource in the body (headers only; for Bundles, no resources in write entries); \
     `return=OperationOutcome`: an OperationOutcome naming the resource and version instead (Bundles: as minimal).",
);

/// Every operation the gateway serves.
pub(crate) const OPS: &[Op] = &[
    Op {
        method: "GET",
        path: "/health",
        route: "/health",
        id: "health",
        summary: "Liveness",
        description: "`{\"status\":\"ok\"}`. No token needed.",
        public: true,
        body: None,
        params: &[],
        ok: "200",
        ok_description: "The gateway is up.",
        produces: JSON,
    },
    Op {
        method: "GET",
        path: "/metrics",
        route: "/metrics",
        id: "metrics",
        summary: "Prometheus metrics",
        description: "OpenMetrics text: `medmesh_gateway_http_requests_total{route,method,status}`, `medmesh_gateway_http_request_duration_seconds{route}`, then the node's own metrics.",
        public: false,
        body: None,
        params: &[],
        ok: "200",
        ok_description: "Metrics in OpenMetrics text format.",
        produces: "application/openmetrics-text",
    },
    Op {
        method: "GET",
        path: "/openapi.json",
        route: "/openapi.json",
        id: "openapi",
        summary: "This document",
        description: "The OpenAPI document of every route.",
        public: false,
        body: None,
        params: &[],
        ok: "200",
        ok_description: "OpenAPI 3.1 JSON.",
        produces: JSON,
    },
    Op {
        method: "GET",
        path: "/fhir/metadata",
        route: "/fhir/metadata",
        id: "capabilities",
        summary: "CapabilityStatement",
        description: "What this server supports: types, interactions, search parameters, the `_count` cap. No token needed.",
        public: true,
        body: None,
        params: &[],
        ok: "200",
        ok_description: "A FHIR R4 CapabilityStatement.",
        produces: FHIR,
    },
    Op {
        method: "POST",
        path: "/fhir",
        route: "/fhir",
        id: "transactionOrBatch",
        summary: "Transaction or batch Bundle",
        description: "A `transaction` Bundle is processed all or nothing (its writes are stored as one atomic, durable batch), in FHIR order (DELETE, POST, PUT, GET), with `urn:uuid:` fullUrls and references rewritten to the assigned `Type/id`, conditional create (`ifNoneExist`), conditional update and delete (`Type?query`) and `ifMatch`; an entry that cannot be honoured fails the whole transaction with an OperationOutcome naming `Bundle.entry[i]`. A `batch` answers every entry on its own. The response is a `transaction-response` / `batch-response` Bundle.",
        public: false,
        body: Some(FHIR),
        params: &[PREFER_RETURN],
        ok: "200",
        ok_description: "The response Bundle, one entry per request entry with `response.status`, `location`, `etag`, `lastModified`.",
        produces: FHIR,
    },
    Op {
        method: "GET",
        path: "/fhir/{type}",
        route: "/fhir/{type}",
        id: "search",
        summary: "Search a type",
        description: "A `searchset` Bundle with `total` and a `next` link while more matches remain. `Consent` and `AuditEvent` are read-only views of the node's grants and audit log, searched by `patient` (did:key).",
        public: false,
        body: None,
        params: SEARCH_PARAMS,
        ok: "200",
        ok_description: "A searchset Bundle.",
        produces: FHIR,
    },
    Op {
        method: "POST",
        path: "/fhir/{type}",
        route: "/fhir/{type}",
        id: "create",
        summary: "Create a resource",
        description: "The server assigns the id. 201 with `Location` (`…/{type}/{id}/_history/{vid}`), `ETag` and `Last-Modified`. With `If-None-Exist` (conditional create): no match creates (201), one match answers that resource with 200 and writes nothing, several are 412.",
        public: false,
        body: Some(FHIR),
        params: &[
            (
                Where::Header,
                "If-None-Exist",
                "Search parameters, e.g. `identifier=http://hospital.example.org/mrn|12345`: create only if nothing matches. Parameters the server cannot search are 400.",
            ),
            PREFER_RETURN,
        ],
        ok: "201",
        ok_description: "The resource as stored.",
        produces: FHIR,
    },
    Op {
        method: "GET",
        path: "/fhir/{type}/{id}",
        route: "/fhir/{type}/{id}",
        id: "read",
        summary: "Read a resource",
        description: "The current version, with `ETag` and `Last-Modified`; 410 once deleted.",
        public: false,
        body: None,
        params: &[],
        ok: "200",
        ok_description: "The resource.",
        produces: FHIR,
    },
    Op {
        method: "PUT",
        path: "/fhir/{type}/{id}",
        route: "/fhir/{type}/{id}",
        id: "update",
        summary: "Update a resource (three-way merge)",
        description: "Writes only what changed since the version the client read (`If-Match`, else `meta.versionId`), keeping peers' edits. A stale `If-Match` is 412. No update-as-create (404).",
        public: false,
        body: Some(FHIR),
        params: &[
            (
                Where::Header,
                "If-Match",
                "`W/\"{versionId}\"`: fail with 412 unless this is the current version.",
            ),
            PREFER_RETURN,
        ],
        ok: "200",
        ok_description: "The resource as stored.",
        produces: FHIR,
    },
    Op {
        method: "DELETE",
        path: "/fhir/{type}/{id}",
        route: "/fhir/{type}/{id}",
        id: "delete",
        summary: "Delete a resource",
        description: "Marks it deleted; its history stays.",
        public: false,
        body: None,
        params: &[],
        ok: "204",
        ok_description: "Deleted.",
        produces: "",
    },
    Op {
        method: "GET",
        path: "/fhir/{type}/{id}/_history",
        route: "/fhir/{type}/{id}/{op}",
        id: "history",
        summary: "History of a resource",
        description: "A `history` Bundle, newest first; deletes appear as `DELETE` entries.",
        public: false,
        body: None,
        params: &[],
        ok: "200",
        ok_description: "A history Bundle.",
        produces: FHIR,
    },
    Op {
        method: "GET",
        path: "/fhir/Patient/{id}/$everything",
        route: "/fhir/{type}/{id}/{op}",
        id: "everything",
        summary: "Patient $everything",
        description: "Every resource of the patient's record this node can read, across collections, the Patient first; paged like a search.",
        public: false,
        body: None,
        params: &[
            (Where::Query, "_count", "Page size (capped)."),
            (Where::Query, "_offset", "Page cursor."),
        ],
        ok: "200",
        ok_description: "A searchset Bundle.",
        produces: FHIR,
    },
    Op {
        method: "GET",
        path: "/fhir/{type}/{id}/_history/{vid}",
        route: "/fhir/{type}/{id}/_history/{vid}",
        id: "vread",
        summary: "Read one version",
        description: "The resource as it was at `vid`; 410 if that version is a delete.",
        public: false,
        body: None,
        params: &[],
        ok: "200",
        ok_description: "The resource at that version.",
        produces: FHIR,
    },
    Op {
        method: "GET",
        path: "/api/holdings",
        route: "/api/holdings",
        id: "holdings",
        summary: "What the node holds for a patient",
        description: "Envelope counts (readable, opaque) by collection.",
        public: false,
        body: None,
        params: &[(Where::Query, "patient", "The patient's did:key (required).")],
        ok: "200",
        ok_description: "Holdings JSON.",
        produces: JSON,
    },
    Op {
        method: "GET",
        path: "/api/outbox",
        route: "/api/outbox",
        id: "outbox",
        summary: "What the node still owes others of a patient's consent items",
        description: "Per (item, peer): pending since (ms), attempts, next try, last error; the patient's grants \
                      the node holds and owes nobody (delivered, or never owed); `settling` while stored items \
                      wait for their consent flows.",
        public: false,
        body: None,
        params: &[(Where::Query, "patient", "The patient's did:key (required).")],
        ok: "200",
        ok_description: "Outbox JSON.",
        produces: JSON,
    },
    Op {
        method: "POST",
        path: "/api/grants",
        route: "/api/grants",
        id: "submitGrant",
        summary: "Submit a signed grant",
        description: "The grant's canonical signed bytes (at most 1 MiB).",
        public: false,
        body: Some("application/octet-stream"),
        params: &[],
        ok: "202",
        ok_description: "What the node did with it.",
        produces: JSON,
    },
    Op {
        method: "POST",
        path: "/api/revocations",
        route: "/api/revocations",
        id: "submitRevocation",
        summary: "Submit a signed revocation",
        description: "The revocation's canonical signed bytes (at most 1 MiB).",
        public: false,
        body: Some("application/octet-stream"),
        params: &[],
        ok: "202",
        ok_description: "What the node did with it.",
        produces: JSON,
    },
    Op {
        method: "POST",
        path: "/api/keyshares",
        route: "/api/keyshares",
        id: "submitKeyShare",
        summary: "Submit a signed key share",
        description: "The key share's canonical signed bytes (at most 1 MiB).",
        public: false,
        body: Some("application/octet-stream"),
        params: &[],
        ok: "202",
        ok_description: "What the node did with it.",
        produces: JSON,
    },
    Op {
        method: "GET",
        path: "/api/peers",
        route: "/api/peers",
        id: "peers",
        summary: "Peers and sync status",
        description: "The node's peer id, peers and sync counters.",
        public: false,
        body: None,
        params: &[],
        ok: "200",
        ok_description: "Sync status JSON.",
        produces: JSON,
    },
    Op {
        method: "POST",
        path: "/api/peers/{peer}/sync",
        route: "/api/peers/{peer}/sync",
        id: "syncWithPeer",
        summary: "Pull from a peer now",
        description: "Runs one sync round with the peer (a PeerId) and returns what arrived.",
        public: false,
        body: None,
        params: &[],
        ok: "200",
        ok_description: "Counts of items received, accepted, pending and rejected.",
        produces: JSON,
    },
    Op {
        method: "GET",
        path: "/api/audit",
        route: "/api/audit",
        id: "auditLog",
        summary: "Audit log entries",
        description: "Hash-chained audit entries (ids and actions only), all or about one patient.",
        public: false,
        body: None,
        params: &[(Where::Query, "patient", "Only entries about this patient (did:key).")],
        ok: "200",
        ok_description: "`{\"entries\": [...]}`.",
        produces: JSON,
    },
    Op {
        method: "GET",
        path: "/api/audit/verify",
        route: "/api/audit/verify",
        id: "auditVerify",
        summary: "Check the audit hash chain",
        description: "Verifies every entry and link of the audit log.",
        public: false,
        body: None,
        params: &[],
        ok: "200",
        ok_description: "`{\"intact\": true, \"entries\": N}` or `{\"intact\": false, \"broken_at\": SEQ}`.",
        produces: JSON,
    },
];

/// The distinct axum routes of [`OPS`], in table order.
pub(crate) fn routes() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for op in OPS {
        if !out.contains(&op.route) {
            out.push(op.route);
        }
    }
    out
}

fn http_method(method: &str) -> HttpMethod {
    match method {
        "POST" => HttpMethod::Post,
        "PUT" => HttpMethod::Put,
        "DELETE" => HttpMethod::Delete,
        _ => HttpMethod::Get,
    }
}

const OUTCOME: &str = "An OperationOutcome: 400 malformed body or parameter, 401 no or wrong token, 403 no grant allows it, 404 unknown type, id or route, 405 method, 409/412 version conflict or several matches, 413 body too large, 415 media type, 422 invalid resource, 503 timeout.";

/// The document for a gateway whose FHIR base is `base_url`.
pub(crate) fn document(base_url: &str) -> OpenApi {
    let mut paths = PathsBuilder::new();
    for op in OPS {
        let mut operation = OperationBuilder::new()
            .operation_id(Some(op.id))
            .summary(Some(op.summary))
            .description(Some(op.description))
            .tag(if op.path.starts_with("/fhir") { "fhir" } else { "node" });
        for name in op
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        {
            operation = operation.parameter(
                ParameterBuilder::new()
                    .name(name)
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True),
            );
        }
        for (at, name, description) in op.params {
            operation = operation.parameter(
                ParameterBuilder::new()
                    .name(*name)
                    .parameter_in(match at {
                        Where::Query => ParameterIn::Query,
                        Where::Header => ParameterIn::Header,
                    })
                    .required(Required::False)
                    .description(Some(*description)),
            );
        }
        if let Some(media_type) = op.body {
            operation = operation.request_body(Some(
                RequestBodyBuilder::new()
                    .required(Some(Required::True))
                    .content(media_type, ContentBuilder::new().build())
                    .build(),
            ));
        }
        let mut ok = ResponseBuilder::new().description(op.ok_description);
        if !op.produces.is_empty() {
            ok = ok.content(op.produces, ContentBuilder::new().build());
        }
        let error = ResponseBuilder::new()
            .description(OUTCOME)
            .content(FHIR, ContentBuilder::new().build());
        operation = operation.responses(
            ResponsesBuilder::new()
                .response(op.ok, ok)
                .response("default", error)
                .build(),
        );
        if op.public {
            // An empty requirement list: no authentication.
            operation = operation.securities(Some(Vec::<SecurityRequirement>::new()));
        }
        paths = paths.path(op.path, PathItem::new(http_method(op.method), operation));
    }
    let base = base_url.strip_suffix("/fhir").unwrap_or(base_url);
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("medmesh node gateway")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "FHIR R4 JSON and the management API of one medmesh node. Every route except /health and /fhir/metadata needs `Authorization: Bearer <token>`. See docs/http-api.md.",
                )),
        )
        .servers(Some([ServerBuilder::new().url(base).build()]))
        .paths(paths)
        .components(Some(
            ComponentsBuilder::new()
                .security_scheme(
                    "bearer",
                    SecurityScheme::Http(
                        HttpBuilder::new()
                            .scheme(HttpAuthScheme::Bearer)
                            .description(Some("The node's gateway token, made at `medmesh node init`."))
                            .build(),
                    ),
                )
                .build(),
        ))
        .security(Some([SecurityRequirement::new("bearer", Vec::<String>::new())]))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_is_in_the_document_once() {
        let doc = serde_json::to_value(document("http://127.0.0.1:1/fhir")).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(doc["servers"][0]["url"], "http://127.0.0.1:1");
        let mut seen = std::collections::HashSet::new();
        for op in OPS {
            let o = &doc["paths"][op.path][op.method.to_ascii_lowercase()];
            assert_eq!(o["operationId"], op.id, "{} {}", op.method, op.path);
            assert!(seen.insert(op.id), "duplicate id {}", op.id);
            assert_eq!(o["security"] == serde_json::json!([]), op.public, "{}", op.id);
        }
        let documented: usize = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|p| p.as_object().unwrap().len())
            .sum();
        assert_eq!(documented, OPS.len());
    }
}
