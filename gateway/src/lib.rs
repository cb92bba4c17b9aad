//! medmesh-gateway owns how a practice's local apps talk to its node: an
//! axum HTTP server speaking FHIR R4 JSON (CRUD, history, patient-scoped
//! search, `$everything`), a small management API (signed consent items,
//! holdings, peers), `/health`, Prometheus `/metrics`.
//!
//! It never binds a non-loopback address unless told to, never answers a
//! route other than `/health` and `/fhir/metadata` without the node's
//! bearer token, never logs resource content, and never answers bad input
//! with a 500: every error is a FHIR `OperationOutcome` with its status.
//! It holds no state of its own: everything goes through a [`Backend`].

mod auth;
mod backend;
pub mod fhir;
mod metrics;
mod openapi;
mod server;
mod transaction;

pub use auth::Token;
pub use backend::{Backend, HistoryEntry, SearchNotes, TxFailure, TxOp, TxResult};
pub use server::{Config, router, serve};
