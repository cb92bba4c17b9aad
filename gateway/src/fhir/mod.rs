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
pub mod shape;
mod types;
pub mod validate;
pub mod views;

pub use outcome::{ApiError, Issue, IssueType, OperationOutcome, Severity};
pub use types::{READ_ONLY_TYPES, SUPPORTED_TYPES};
pub use validate::validate;

#[cfg(test)]
#[path = "../../tests/common/fhirval.rs"]
mod fhirval;

/// Checks what this module builds with the external R4 validator
/// (`shared/fhir/validate`), when it is installed at `.fhirval` in the workspace.
#[cfg(test)]
mod external_validator {
    use serde_json::{Value, json};

    use super::bundle::{BundleKind, EntryResponse, SearchMode, Searchset, response_bundle};
    use super::{ApiError, Issue, IssueType, capability::capability_statement};

    use super::fhirval;

    const SHARED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fhir");

    /// A read-write grant, revoked, as a Consent; a disclosure under it as
    /// an AuditEvent.
    fn views() -> (Value, Value) {
        use medmesh_crypto::{Access, Collection, Grant, GrantId, GrantTerms, SecretIdentity};
        use medmesh_node::audit::{Action, ActorKind, AuditEntry};
        use medmesh_node::item::ItemId;
        let patient = SecretIdentity::from_seed(&[1; 32]);
        let practice = SecretIdentity::from_seed(&[2; 32]).practice_id().unwrap();
        let grant = Grant::sign(
            GrantTerms {
                id: GrantId([7; 16]),
                patient: patient.patient_id(),
                grantee: practice,
                collections: vec![Collection::Core, Collection::Labs],
                access: Access::ReadWrite,
                not_before: 1_700_000_000_000,
                expires: Some(1_800_000_000_000),
                purpose: "treatment".into(),
                issued_at: 1_700_000_000_000,
                address_hints: vec![],
            },
            &patient,
        )
        .unwrap();
        let consent = super::views::consent(&grant, true, 1_750_000_000_000);
        assert_eq!(consent["status"], "inactive", "a revoked grant");
        assert_eq!(
            consent["provision"]["action"].as_array().map(Vec::len),
            Some(2),
            "read-write"
        );
        let entry = AuditEntry {
            seq: 3,
            time: 1_750_000_000_000,
            actor_kind: ActorKind::Peer,
            actor_id: practice.peer_id().to_string(),
            action: Action::Disclose,
            patient: Some(patient.patient_id()),
            items: vec![ItemId([9; 32])],
            item_count: 1,
            grant: Some(grant.id()),
            outcome: "ok".into(),
            prev_hash: [0; 32],
            hash: [1; 32],
        };
        let event = super::views::audit_event(&entry, &practice.peer_id().to_string());
        assert_eq!(
            (event["action"].as_str(), event["outcome"].as_str()),
            (Some("E"), Some("0"))
        );
        let entities = event["entity"].as_array().cloned().unwrap_or_default();
        assert!(
            entities
                .iter()
                .any(|e| e["what"]["identifier"]["value"] == grant.id().to_string()),
            "{event}"
        );
        (consent, event)
    }

    fn built() -> Vec<(&'static str, Value)> {
        let example: Value =
            serde_json::from_str(&std::fs::read_to_string(format!("{SHARED}/examples/Observation-bmi.json")).unwrap())
                .unwrap();
        let mut searchset = Searchset::new(
            "http://127.0.0.1:8080/fhir/Observation?patient=example&_count=1",
            "http://127.0.0.1:8080/fhir",
        )
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
        let (consent, audit_event) = views();
        vec![
            ("consent", consent),
            ("audit-event", audit_event),
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
        if let Some(verdict) = fhirval::validate(&built()) {
            verdict.unwrap_or_else(|text| panic!("validator says:\n{text}"));
        }
    }
}
