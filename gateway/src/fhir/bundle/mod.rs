//! Bundles: building `searchset` and `transaction-response`/`batch-response` Bundles,
//! and parsing an incoming `transaction`/`batch` Bundle into typed entries.
//!
//! By job: `searchset` Bundles (`searchset.rs`), `transaction-response` and
//! `batch-response` Bundles (`response.rs`), parsing incoming Bundles
//! (`request.rs`), and resolving and rewriting references inside a Bundle
//! (`references.rs`).

mod references;
mod request;
mod response;
mod searchset;
#[cfg(test)]
mod tests;

pub use references::{resolve_in_bundle, rewrite_entry_references, rewrite_references};
pub use request::{EntryError, EntryUrl, Method, RequestBundle, RequestEntry, parse_request_bundle, transaction_order};
pub use response::{BundleKind, EntryResponse, reason_phrase, response_bundle};
pub use searchset::{SearchMode, Searchset, searchset};
