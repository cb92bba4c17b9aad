//! medmesh-node owns what a practice node knows and keeps: the encrypted
//! item store (envelopes, grants, revocations and key shares as their signed
//! wire bytes, on sled behind the [`store::Store`] trait), the durable write
//! path with group commit, the ingest path that judges items by DESIGN §5 on
//! signed data only (with a pending queue and a rejected set), the consent
//! registry, the hash-chained audit log, the node's identity file, and the
//! FHIR-on-Automerge record model ([`records`]).
//!
//! It must never write plaintext PHI to disk or to logs (decrypted changes
//! live in memory only, epoch keys are re-opened from key shares at start),
//! never acknowledge a write before it is durable, never accept an item on
//! arrival order rather than signed data, and never panic on bytes from disk
//! or peers. It does no networking: `sync` subscribes to its [`Event`]s and
//! calls its sync API; `gateway` calls its read/write and audit API.
//!
//! - [`Node`]: the cheap-`Clone` handle with the write, ingest, consent,
//!   sync-support, holdings and audit API.
//! - [`store`]: the storage trait, its sled implementation and the on-disk layout.
//! - [`consent`]: validity verdicts; [`audit`]: the audit log;
//!   [`identity`]: the node key file; [`testing`]: helpers for tests and benches.
//!
//! See `docs/storage.md`.

pub mod audit;
mod cbor;
mod chains;
mod commit;
pub mod completeness;
pub mod consent;
mod error;
pub mod identity;
pub mod item;
mod node;
mod par;
pub mod policy;
pub mod rate;
pub mod records;
pub mod repository;
mod snapshot;
pub mod store;
mod strangers;
pub mod testing;
pub mod transfer;

pub use error::{Error, Result};
pub use identity::load_or_create_identity;
pub use item::ItemStored;
pub use node::{
    Actor, AuditCheckpoints, AuditVerified, CollectionLoad, Config, Event, Holdings, Ingested, MAX_ADDRESS_RECORDS,
    MAX_SEQ_GAPS_PER_AUTHOR, Node, RejectedItem, STORE_DIR, Source,
};
pub use repository::Repository;
pub use snapshot::{Covered, Snapshot};
