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
