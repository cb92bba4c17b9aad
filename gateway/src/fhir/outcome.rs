//! `OperationOutcome` issues and the gateway's error type ([`ApiError`]).
//!
//! Every error the gateway returns is an `OperationOutcome` with an HTTP status. The
//! diagnostics name element paths, parameters and ids — never resource content (PHI):
//! a bad value is echoed only when it comes from a code element (e.g. `status`).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// The media type of every FHIR JSON response.
pub const FHIR_JSON: &str = "application/fhir+json";

/// `OperationOutcome.issue.severity` (required binding `issue-severity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The issue caused the action to fail and no further checking could be done.
    Fatal,
    /// The issue is sufficiently important to cause the action to fail.
    Error,
    /// The issue is not important enough to cause the action to fail.
    Warning,
    /// The issue has no relation to the degree of success of the action.
    Information,
}

impl Severity {
    /// The FHIR code, e.g. `"error"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fatal => "fatal",
            Self::Error => "error",
            Self::Warning => "warning",
            Self::Information => "information",
        }
    }
}

/// `OperationOutcome.issue.code` (required binding `issue-type`), the subset the gateway uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueType {
    /// `invalid`: content invalid against the specification.
    Invalid,
    /// `structure`: a structural issue (wrong JSON type, null, empty object or array,
    /// two alternatives of a choice element).
    Structure,
    /// `required`: a required element is missing.
    Required,
    /// `value`: an element value is invalid (syntax of a date, id, reference, ...).
    Value,
    /// `code-invalid`: a code is not in the element's required value set.
    CodeInvalid,
    /// `not-supported`: the content or request is valid but not supported here.
    NotSupported,
    /// `not-found`: the referenced resource or type is not known.
    NotFound,
    /// `deleted`: the resource existed but was deleted.
    Deleted,
    /// `login`: the client must authenticate.
    Login,
    /// `forbidden`: the client is not allowed to do this (e.g. no consent grant).
    Forbidden,
    /// `conflict`: a version or content conflict.
    Conflict,
    /// `too-long`: the request is too large.
    TooLong,
    /// `processing`: processing failed for a reason not covered above.
    Processing,
    /// `exception`: an internal error.
    Exception,
    /// `informational`: a note, not an error.
    Informational,
    /// `duplicate`: an attempt to create a duplicate.
    Duplicate,
    /// `timeout`: the request took too long.
    Timeout,
    /// `throttled`: too many requests.
    Throttled,
    /// `security`: a security problem (authentication or authorization in general).
    Security,
    /// `business-rule`: a rule of the server prevents the action.
    BusinessRule,
    /// `transient`: a temporary problem; the client may retry.
    Transient,
    /// `incomplete`: not all the data asked for is available (yet).
    Incomplete,
    /// More than one resource matched a conditional request.
    MultipleMatches,
    /// `too-costly`: the work was stopped, or not begun, to protect the server.
    TooCostly,
}

impl IssueType {
    /// The FHIR code, e.g. `"required"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::Structure => "structure",
            Self::Required => "required",
            Self::Value => "value",
            Self::CodeInvalid => "code-invalid",
            Self::NotSupported => "not-supported",
            Self::NotFound => "not-found",
            Self::Deleted => "deleted",
            Self::Login => "login",
            Self::Forbidden => "forbidden",
            Self::Conflict => "conflict",
            Self::TooLong => "too-long",
            Self::Processing => "processing",
            Self::Exception => "exception",
            Self::Informational => "informational",
            Self::Duplicate => "duplicate",
            Self::Timeout => "timeout",
            Self::Throttled => "throttled",
            Self::Security => "security",
            Self::BusinessRule => "business-rule",
            Self::Transient => "transient",
            Self::Incomplete => "incomplete",
            Self::MultipleMatches => "multiple-matches",
            Self::TooCostly => "too-costly",
        }
    }
}

/// One `OperationOutcome.issue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// How bad it is.
    pub severity: Severity,
    /// What kind of issue it is.
    pub code: IssueType,
    /// A human-readable message; names paths and codes, never resource content.
    pub diagnostics: String,
    /// FHIRPath expressions of the offending elements, e.g. `Observation.status`.
    pub expression: Vec<String>,
}

impl Issue {
    /// An `error` issue without location.
    pub fn error(code: IssueType, diagnostics: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            code,
            diagnostics: diagnostics.into(),
            expression: Vec::new(),
        }
    }

    /// A `warning` issue without location.
    pub fn warning(code: IssueType, diagnostics: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            ..Self::error(code, diagnostics)
        }
    }

    /// A note that does not bear on the success of the request.
    pub fn information(code: IssueType, diagnostics: impl Into<String>) -> Self {
        Self {
            severity: Severity::Information,
            ..Self::error(code, diagnostics)
        }
    }

    /// The note that ends a list cut at [`MAX_ISSUES`] errors.
    pub fn truncation() -> Self {
        Self {
            severity: Severity::Information,
            code: IssueType::TooCostly,
            diagnostics: format!("validation stopped after {MAX_ISSUES} issues; there may be more"),
            expression: Vec::new(),
        }
    }

    /// Whether this is a [`Issue::truncation`] note (wherever it was re-rooted).
    pub fn is_truncation(&self) -> bool {
        self.severity == Severity::Information && self.code == IssueType::TooCostly
    }

    /// Adds one FHIRPath expression.
    #[must_use]
    pub fn at(mut self, expression: impl Into<String>) -> Self {
        self.expression.push(expression.into());
        self
    }

    /// The issue as a JSON object for `OperationOutcome.issue`.
    pub fn to_json(&self) -> Value {
        let mut issue = Map::new();
        issue.insert("severity".into(), self.severity.as_str().into());
        issue.insert("code".into(), self.code.as_str().into());
        if !self.diagnostics.is_empty() {
            issue.insert("diagnostics".into(), self.diagnostics.clone().into());
        }
        if !self.expression.is_empty() {
            issue.insert("expression".into(), self.expression.clone().into());
        }
        Value::Object(issue)
    }
}

/// Most issues one validation (a resource, or a transaction's entries together)
/// reports: a body with a million bad elements must not answer a million issues.
pub const MAX_ISSUES: usize = 100;

/// The first [`MAX_ISSUES`] of `issues` (notes of earlier cuts dropped), then
/// [`Issue::truncation`] when any was cut.
pub fn cap_issues(issues: Vec<Issue>) -> Vec<Issue> {
    let mut cut = false;
    let mut kept = Vec::with_capacity(issues.len().min(MAX_ISSUES + 1));
    for issue in issues {
        if issue.is_truncation() || kept.len() == MAX_ISSUES {
            cut = true;
        } else {
            kept.push(issue);
        }
    }
    if cut {
        kept.push(Issue::truncation());
    }
    kept
}

/// Builds an `OperationOutcome` resource.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OperationOutcome {
    issues: Vec<Issue>,
}

impl OperationOutcome {
    /// An outcome with no issues yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// An outcome holding `issues`.
    pub fn from_issues(issues: impl IntoIterator<Item = Issue>) -> Self {
        Self {
            issues: issues.into_iter().collect(),
        }
    }

    /// Adds an issue.
    #[must_use]
    pub fn issue(mut self, issue: Issue) -> Self {
        self.issues.push(issue);
        self
    }

    /// Adds an issue in place.
    pub fn push(&mut self, issue: Issue) {
        self.issues.push(issue);
    }

    /// The issues so far.
    pub fn issues(&self) -> &[Issue] {
        &self.issues
    }

    /// The `OperationOutcome` as FHIR JSON. FHIR requires at least one issue, so an
    /// empty outcome gets an `information`/`informational` "all ok" issue.
    pub fn to_value(&self) -> Value {
        let issues: Vec<Value> = if self.issues.is_empty() {
            vec![
                Issue {
                    severity: Severity::Information,
                    code: IssueType::Informational,
                    diagnostics: "all ok".into(),
                    expression: Vec::new(),
                }
                .to_json(),
            ]
        } else {
            self.issues.iter().map(Issue::to_json).collect()
        };
        json!({ "resourceType": "OperationOutcome", "issue": issues })
    }
}

/// Every error the FHIR gateway returns, with its HTTP status and `OperationOutcome`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 400: the body is not JSON (or not a JSON object).
    #[error("malformed request body: {0}")]
    MalformedBody(String),
    /// 400: a query parameter or header has an invalid value.
    #[error("invalid parameter {param}: {reason}")]
    InvalidParam {
        /// The parameter or header name, e.g. `_count`.
        param: String,
        /// What is wrong, without the value.
        reason: String,
    },
    /// 400: the request is structurally wrong (e.g. a transaction entry); the issues say where.
    #[error("invalid request ({} issues)", .0.len())]
    InvalidRequest(Vec<Issue>),
    /// 401: no or a wrong bearer token.
    #[error("authentication required")]
    Unauthorized,
    /// 403: the caller is authenticated but not allowed (e.g. no consent grant covers it).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// 404: the resource type is not served here.
    #[error("unsupported resource type {0}")]
    UnknownType(String),
    /// 404: no resource of that type and id (or version).
    #[error("{resource_type}/{id} not found")]
    NotFound {
        /// The resource type.
        resource_type: String,
        /// The id (with `/_history/{vid}` for a version read).
        id: String,
    },
    /// 410: the resource was deleted.
    #[error("{resource_type}/{id} was deleted")]
    Gone {
        /// The resource type.
        resource_type: String,
        /// The id.
        id: String,
    },
    /// 405: the method is not allowed on this path.
    #[error("method {0} not allowed")]
    MethodNotAllowed(String),
    /// 409: a conflict (e.g. the id in the body differs from the URL, or a duplicate).
    #[error("conflict: {0}")]
    Conflict(String),
    /// 412: `If-Match` names a version that is no longer current.
    #[error("version conflict: If-Match {expected} but current is {current}")]
    PreconditionFailed {
        /// The version the client based its change on.
        expected: String,
        /// The current version.
        current: String,
    },
    /// 412: a conditional request (`ifNoneExist`, conditional update or delete)
    /// matched more than one resource, or a conditional create now matches.
    #[error("precondition failed: {0}")]
    MultipleMatches(String),
    /// 406: the client accepts only formats this server does not produce
    /// (`Accept`, or `_format`, naming XML or RDF): JSON is all it serves.
    #[error("not acceptable: this server answers application/fhir+json only, not {0}")]
    NotAcceptable(String),
    /// 413: the body exceeds the limit.
    #[error("request body larger than {limit_bytes} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit_bytes: usize,
    },
    /// 413: the body crosses a structural limit (values, array items, depth);
    /// it is refused before it is parsed or validated.
    #[error("request body too complex: {0}")]
    TooComplex(String),
    /// 415: the body is not `application/fhir+json` or `application/json`.
    #[error("unsupported media type")]
    UnsupportedMediaType,
    /// 422: the resource is not valid FHIR R4; the issues say where.
    #[error("invalid resource ({} issues)", .0.len())]
    Unprocessable(Vec<Issue>),
    /// An error of one entry of a transaction or batch Bundle: the status of
    /// `source`, its issues prefixed `entry {index}:` and located under
    /// `Bundle.entry[index]`.
    #[error("entry {index}: {source}")]
    InEntry {
        /// Position of the entry in `Bundle.entry` (0-based).
        index: usize,
        /// What went wrong with it.
        source: Box<ApiError>,
    },
    /// 500: an internal error. The details go to the log, not to the client.
    #[error("internal error")]
    Internal,
    /// 503: the read could not be written to the audit log, so it is not
    /// served (reads fail closed, issue 15).
    #[error("the audit log cannot record this read now, so it is not served; try again later")]
    AuditUnavailable,
}

impl ApiError {
    /// 400 for a body that `serde_json` could not parse. Keeps only the error category
    /// and position: `serde_json` data errors can quote values.
    pub fn malformed_json(err: &serde_json::Error) -> Self {
        let what = match err.classify() {
            serde_json::error::Category::Io => "i/o error",
            serde_json::error::Category::Syntax => "invalid JSON syntax",
            serde_json::error::Category::Data => "unexpected JSON structure",
            serde_json::error::Category::Eof => "unexpected end of JSON",
        };
        Self::MalformedBody(format!("{what} at line {} column {}", err.line(), err.column()))
    }

    /// The HTTP status code.
    pub fn status(&self) -> u16 {
        match self {
            Self::MalformedBody(_) | Self::InvalidParam { .. } | Self::InvalidRequest(_) => 400,
            Self::Unauthorized => 401,
            Self::Forbidden(_) => 403,
            Self::UnknownType(_) | Self::NotFound { .. } => 404,
            Self::MethodNotAllowed(_) => 405,
            Self::NotAcceptable(_) => 406,
            Self::Conflict(_) => 409,
            Self::Gone { .. } => 410,
            Self::PreconditionFailed { .. } | Self::MultipleMatches(_) => 412,
            Self::PayloadTooLarge { .. } | Self::TooComplex(_) => 413,
            Self::UnsupportedMediaType => 415,
            Self::Unprocessable(_) => 422,
            Self::InEntry { source, .. } => source.status(),
            Self::Internal => 500,
            Self::AuditUnavailable => 503,
        }
    }

    /// The issues that describe this error.
    pub fn issues(&self) -> Vec<Issue> {
        let one = |code, text: String| vec![Issue::error(code, text)];
        match self {
            Self::InvalidRequest(issues) | Self::Unprocessable(issues) => issues.clone(),
            Self::InvalidParam { param, .. } => {
                vec![Issue::error(IssueType::Invalid, self.to_string()).at(param.clone())]
            }
            Self::MalformedBody(_) => one(IssueType::Structure, self.to_string()),
            Self::Unauthorized => one(IssueType::Login, self.to_string()),
            Self::Forbidden(_) => one(IssueType::Forbidden, self.to_string()),
            Self::UnknownType(_) | Self::MethodNotAllowed(_) | Self::UnsupportedMediaType | Self::NotAcceptable(_) => {
                one(IssueType::NotSupported, self.to_string())
            }
            Self::NotFound { .. } => one(IssueType::NotFound, self.to_string()),
            Self::Gone { .. } => one(IssueType::Deleted, self.to_string()),
            Self::Conflict(_) | Self::PreconditionFailed { .. } => one(IssueType::Conflict, self.to_string()),
            Self::MultipleMatches(_) => one(IssueType::MultipleMatches, self.to_string()),
            Self::PayloadTooLarge { .. } => one(IssueType::TooLong, self.to_string()),
            Self::TooComplex(_) => one(IssueType::TooCostly, self.to_string()),
            Self::InEntry { index, source } => {
                let prefix = format!("entry {index}: ");
                let at = format!("Bundle.entry[{index}]");
                source
                    .issues()
                    .into_iter()
                    .map(|mut issue| {
                        if !issue.diagnostics.starts_with(&prefix) {
                            issue.diagnostics = format!("{prefix}{}", issue.diagnostics);
                        }
                        if !issue.expression.iter().any(|e| e.starts_with("Bundle.")) {
                            issue.expression = vec![at.clone()];
                        }
                        issue
                    })
                    .collect()
            }
            Self::AuditUnavailable => one(IssueType::Transient, self.to_string()),
            Self::Internal => vec![Issue {
                severity: Severity::Fatal,
                ..Issue::error(IssueType::Exception, "internal error")
            }],
        }
    }

    /// This error as the error of entry `index` of a Bundle.
    pub fn in_entry(self, index: usize) -> Self {
        match self {
            already @ Self::InEntry { .. } => already,
            source => Self::InEntry {
                index,
                source: Box::new(source),
            },
        }
    }

    /// The `OperationOutcome` body for this error.
    pub fn outcome(&self) -> Value {
        OperationOutcome::from_issues(self.issues()).to_value()
    }
}

/// Renders `value` as an `application/fhir+json` response with `status`.
pub fn fhir_response(status: StatusCode, value: &Value) -> Response {
    let body = value.to_string();
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON))],
        body,
    )
        .into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = fhir_response(status, &self.outcome());
        if matches!(self, Self::Unauthorized) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_are_capped_with_one_note() {
        let errors = |n: usize| (0..n).map(|i| Issue::error(IssueType::Value, format!("e{i}")));
        assert_eq!(cap_issues(errors(MAX_ISSUES).collect()).len(), MAX_ISSUES);
        let capped = cap_issues(errors(MAX_ISSUES + 1).collect());
        assert_eq!(capped.len(), MAX_ISSUES + 1);
        assert_eq!(capped.last(), Some(&Issue::truncation()));
        // Two cut lists together: one note, at the end.
        let mut both = cap_issues(errors(150).collect());
        both.extend(cap_issues(errors(150).collect()));
        let capped = cap_issues(both);
        assert_eq!(capped.len(), MAX_ISSUES + 1);
        assert_eq!(capped.iter().filter(|i| **i == Issue::truncation()).count(), 1);
        assert_eq!(capped.last(), Some(&Issue::truncation()));
        // A short list with a note keeps it.
        let short = cap_issues(vec![Issue::error(IssueType::Value, "e"), Issue::truncation()]);
        assert_eq!(short.len(), 2);
    }

    #[test]
    fn statuses_and_outcomes() {
        let cases: Vec<(ApiError, u16, &str)> = vec![
            (ApiError::MalformedBody("x".into()), 400, "structure"),
            (
                ApiError::InvalidParam {
                    param: "_count".into(),
                    reason: "bad".into(),
                },
                400,
                "invalid",
            ),
            (
                ApiError::InvalidRequest(vec![Issue::error(IssueType::Required, "r")]),
                400,
                "required",
            ),
            (ApiError::Unauthorized, 401, "login"),
            (ApiError::Forbidden("no grant covers labs".into()), 403, "forbidden"),
            (ApiError::UnknownType("Foo".into()), 404, "not-supported"),
            (
                ApiError::NotFound {
                    resource_type: "Patient".into(),
                    id: "1".into(),
                },
                404,
                "not-found",
            ),
            (
                ApiError::Gone {
                    resource_type: "Patient".into(),
                    id: "1".into(),
                },
                410,
                "deleted",
            ),
            (ApiError::MethodNotAllowed("PATCH".into()), 405, "not-supported"),
            (ApiError::Conflict("id differs".into()), 409, "conflict"),
            (
                ApiError::PreconditionFailed {
                    expected: "W/\"1\"".into(),
                    current: "W/\"2\"".into(),
                },
                412,
                "conflict",
            ),
            (ApiError::PayloadTooLarge { limit_bytes: 10 }, 413, "too-long"),
            (ApiError::TooComplex("deep".into()), 413, "too-costly"),
            (ApiError::UnsupportedMediaType, 415, "not-supported"),
            (
                ApiError::Unprocessable(vec![Issue::error(IssueType::Value, "v").at("Patient.id")]),
                422,
                "value",
            ),
            (ApiError::Internal, 500, "exception"),
        ];
        for (err, status, code) in cases {
            assert_eq!(err.status(), status, "{err}");
            let o = err.outcome();
            assert_eq!(o["resourceType"], "OperationOutcome");
            assert_eq!(o["issue"][0]["code"], code, "{err}");
            assert!(o["issue"][0]["severity"].is_string());
        }
        let o = ApiError::InvalidParam {
            param: "_count".into(),
            reason: "bad".into(),
        }
        .outcome();
        assert_eq!(o["issue"][0]["expression"], serde_json::json!(["_count"]));
        assert_eq!(
            ApiError::Internal.outcome()["issue"][0]["diagnostics"],
            "internal error"
        );
        assert_eq!(OperationOutcome::new().to_value()["issue"][0]["code"], "informational");
    }

    #[test]
    fn malformed_json_does_not_echo_content() {
        let err = serde_json::from_str::<serde_json::Value>(r#"{"name": "Smith" "x"}"#).unwrap_err();
        let api = ApiError::malformed_json(&err);
        assert_eq!(api.status(), 400);
        assert!(!api.to_string().contains("Smith"), "{api}");
        assert!(api.to_string().contains("line 1"), "{api}");
    }

    #[test]
    fn into_response() {
        let response = ApiError::Unauthorized.into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()[header::CONTENT_TYPE], FHIR_JSON);
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let response = ApiError::Unprocessable(vec![]).into_response();
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    }
}
