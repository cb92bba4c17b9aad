//! [`RecordDoc`]: one Automerge document holding the FHIR resources of one
//! (patient, collection), with its change index and rendered-JSON cache.
//!
//! This file owns the document itself (the genesis change every document
//! starts from, the struct, its change bookkeeping and liveness checks); the
//! rest is split by job: resource keys (`key.rs`), the change index and the
//! record-model check of a change (`index.rs`), local writes (`edit.rs`),
//! changes from peers (`apply.rs`), rendering and its cache (`render.rs`),
//! history and vread (`history.rs`), and saving and loading (`snapshot.rs`).

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, Automerge, AutomergeError, Change, ChangeHash, ObjId, ObjType, ReadDoc};

use super::error::{Error, Result};

mod apply;
mod edit;
mod history;
mod index;
mod key;
mod render;
mod snapshot;

pub use apply::{AppliedChange, ApplyReport, DecodedChange, RejectedChange};
pub use edit::{Edit, EditError, Edited, Edits, MadeChange, Written};
pub use history::Version;
use index::Index;
pub(crate) use key::is_id;
pub use key::{resource_key, split_key};
use render::RenderCache;
pub use render::RenderedResource;
pub use snapshot::SavedDoc;

/// Actor of the genesis change. Real actors are 16 bytes of a SHA-256 prefix plus 8
/// random bytes; this fixed text cannot be produced by them in practice.
const GENESIS_ACTOR: &[u8; 24] = b"medmesh/records/genesis/";
/// Root key of the map of resource bodies, keyed `"{resourceType}/{id}"`.
const RESOURCES: &str = "resources";
/// Root key of the map of tombstones (key → `true`).
const DELETED: &str = "deleted";

/// Hex characters of the change hash used as `meta.versionId`.
const VERSION_ID_LEN: usize = 16;

/// The genesis document: one change, identical on every replica (fixed actor, time 0,
/// no deps), that creates the `resources` and `deleted` maps. Every record document
/// starts from it, so two replicas never create competing root maps (which would
/// hide one side's resources behind Automerge's conflict resolution).
static GENESIS: LazyLock<(Automerge, ChangeHash)> = LazyLock::new(build_genesis);

#[allow(
    clippy::expect_used,
    reason = "two puts into a fresh, empty document cannot fail; a failure is a bug in automerge"
)]
fn build_genesis() -> (Automerge, ChangeHash) {
    let mut doc = Automerge::new().with_actor(ActorId::from(&GENESIS_ACTOR[..]));
    let done = doc
        .transact_with(
            |_| CommitOptions::default().with_time(0),
            |tx| {
                tx.put_object(automerge::ROOT, RESOURCES, ObjType::Map)?;
                tx.put_object(automerge::ROOT, DELETED, ObjType::Map)?;
                Ok::<_, AutomergeError>(())
            },
        )
        .map_err(|f| f.error)
        .expect("genesis change");
    let hash = done.hash.expect("genesis change has ops");
    (doc, hash)
}

fn genesis_actor() -> ActorId {
    ActorId::from(&GENESIS_ACTOR[..])
}

/// Object id of the `resources` map (op 1 of the genesis change).
fn resources_obj() -> ObjId {
    ObjId::Id(1, genesis_actor(), 0)
}

/// Object id of the `deleted` map (op 2 of the genesis change).
fn deleted_obj() -> ObjId {
    ObjId::Id(2, genesis_actor(), 0)
}

/// The hash of the genesis change every record document starts with.
pub fn genesis_hash() -> ChangeHash {
    GENESIS.1
}

/// `meta.versionId` for the change with this hash.
pub fn version_id(hash: &ChangeHash) -> String {
    let mut s = hex::encode(hash.0);
    s.truncate(VERSION_ID_LEN);
    s
}

/// One (patient, collection) document: FHIR resources as Automerge maps.
///
/// Writes ([`create`](Self::create), [`update`](Self::update),
/// [`delete`](Self::delete)) each make exactly one Automerge change and return its
/// bytes for the store to seal. Changes from peers go through
/// [`apply_changes`](Self::apply_changes), which checks each change against the record
/// model before Automerge sees it. Reads render JSON and cache it per resource until
/// a change touches that resource.
pub struct RecordDoc {
    doc: Automerge,
    index: Index,
    /// Peer changes waiting for dependencies, not yet given to Automerge (so they are
    /// checked only once their context is known).
    pending: HashMap<ChangeHash, Change>,
    cache: Mutex<RenderCache>,
}

impl std::fmt::Debug for RecordDoc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print content: only sizes.
        f.debug_struct("RecordDoc")
            .field("changes", &self.index.applied.len())
            .field("resources", &self.index.keys.len())
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl Default for RecordDoc {
    fn default() -> Self {
        Self::new()
    }
}

impl RecordDoc {
    /// An empty document (just the genesis change).
    pub fn new() -> Self {
        let mut index = Index::default();
        index.applied.insert(GENESIS.1);
        Self {
            doc: GENESIS.0.clone(),
            index,
            pending: HashMap::new(),
            cache: Mutex::new(RenderCache::default()),
        }
    }

    /// Current heads of the document.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    /// Whether the change is part of the document (pending ones are not).
    pub fn contains_change(&self, hash: &ChangeHash) -> bool {
        self.index.applied.contains(hash)
    }

    /// Hashes of every change in the document except the genesis, e.g. to check a
    /// loaded snapshot against signed envelope headers.
    pub fn change_hashes(&self) -> Vec<ChangeHash> {
        let mut v: Vec<ChangeHash> = self
            .index
            .applied
            .iter()
            .filter(|h| **h != GENESIS.1)
            .copied()
            .collect();
        v.sort_unstable();
        v
    }

    /// Number of changes in the document, genesis excluded.
    pub fn change_count(&self) -> usize {
        self.index.applied.len().saturating_sub(1)
    }

    /// Every resource key ever written here (live and deleted), sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut v: Vec<String> = self.doc.keys(resources_obj()).collect();
        v.sort();
        v
    }

    /// Whether the resource has a tombstone.
    pub fn is_deleted(&self, key: &str) -> bool {
        matches!(self.doc.get(deleted_obj(), key), Ok(Some(_)))
    }

    pub(super) fn body_exists(&self, key: &str) -> bool {
        matches!(self.doc.get(resources_obj(), key), Ok(Some(_)))
    }

    pub(super) fn check_live(&self, key: &str) -> Result<()> {
        if !self.body_exists(key) {
            return Err(Error::NotFound { key: key.to_owned() });
        }
        if self.is_deleted(key) {
            return Err(Error::Deleted { key: key.to_owned() });
        }
        Ok(())
    }
}
