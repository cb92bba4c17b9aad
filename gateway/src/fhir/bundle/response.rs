//! `transaction-response` and `batch-response` Bundles: one
//! [`EntryResponse`] per request entry, in the request's order.

use serde_json::{Map, Value};

/// Whether a Bundle is processed atomically or entry by entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleKind {
    /// `transaction`: all entries succeed or none.
    Transaction,
    /// `batch`: each entry on its own.
    Batch,
}

impl BundleKind {
    fn response_type(self) -> &'static str {
        match self {
            Self::Transaction => "transaction-response",
            Self::Batch => "batch-response",
        }
    }
}

/// The outcome of one entry of a transaction or batch (`Bundle.entry.response`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EntryResponse {
    /// HTTP status, rendered with its reason phrase (`201 Created`).
    pub status: u16,
    /// `Location`, e.g. `Patient/123/_history/abc`.
    pub location: Option<String>,
    /// `ETag`, e.g. `W/"abc"`.
    pub etag: Option<String>,
    /// `Last-Modified` as a FHIR instant.
    pub last_modified: Option<String>,
    /// The resource, when returned (`Prefer: return=representation`, GET entries).
    pub resource: Option<Value>,
    /// An `OperationOutcome` for a failed batch entry.
    pub outcome: Option<Value>,
}

/// The reason phrase for the statuses the gateway uses.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        410 => "Gone",
        412 => "Precondition Failed",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        _ => "Internal Server Error",
    }
}

/// Builds a `transaction-response` or `batch-response` Bundle, one entry per request
/// entry, in the request's order.
pub fn response_bundle(kind: BundleKind, entries: Vec<EntryResponse>) -> Value {
    let entries: Vec<Value> = entries
        .into_iter()
        .map(|e| {
            let mut response = Map::new();
            response.insert(
                "status".into(),
                format!("{} {}", e.status, reason_phrase(e.status)).into(),
            );
            for (key, value) in [
                ("location", e.location),
                ("etag", e.etag),
                ("lastModified", e.last_modified),
            ] {
                if let Some(v) = value {
                    response.insert(key.into(), v.into());
                }
            }
            if let Some(outcome) = e.outcome {
                response.insert("outcome".into(), outcome);
            }
            let mut entry = Map::new();
            if let Some(resource) = e.resource {
                entry.insert("resource".into(), resource);
            }
            entry.insert("response".into(), Value::Object(response));
            Value::Object(entry)
        })
        .collect();
    let mut bundle = Map::new();
    bundle.insert("resourceType".into(), "Bundle".into());
    bundle.insert("type".into(), kind.response_type().into());
    if !entries.is_empty() {
        bundle.insert("entry".into(), entries.into());
    }
    Value::Object(bundle)
}
