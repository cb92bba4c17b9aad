//! [`RecordDoc`]: one Automerge document holding the FHIR resources of one
//! (patient, collection), with its change index and rendered-JSON cache.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use automerge::legacy;
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{
    ActorId, Automerge, AutomergeError, Change, ChangeHash, LoadOptions, ObjId, ObjType, OnPartialLoad, ReadDoc,
    ScalarValue,
};
use serde_json::{Map, Value};

use super::error::{Error, Result};
use super::time::format_instant;
use super::value::{self, At};

/// Actor of the genesis change. Real actors are 16 bytes of a SHA-256 prefix plus 8
/// random bytes; this fixed text cannot be produced by them in practice.
const GENESIS_ACTOR: &[u8; 24] = b"medmesh/records/genesis/";
/// Root key of the map of resource bodies, keyed `"{resourceType}/{id}"`.
const RESOURCES: &str = "resources";
/// Root key of the map of tombstones (key → `true`).
const DELETED: &str = "deleted";
/// Ready changes from which [`RecordDoc::apply_changes`] applies and checks in
/// parallel (below it, the thread costs more than it saves).
const SPECULATE_MIN: usize = 64;
/// Tag of [`RecordDoc::save_local`]'s output.
const LOCAL_TAG: &[u8] = b"medmesh/records/local-snapshot/v1";
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

/// Builds a resource key `"{resourceType}/{id}"`, checking both parts.
///
/// # Errors
/// [`Error::InvalidKey`] when the type is not `[A-Z][A-Za-z]*` or the id is not a FHIR
/// id (`[A-Za-z0-9-.]{1,64}`).
pub fn resource_key(resource_type: &str, id: &str) -> Result<String> {
    check_type(resource_type)?;
    check_id(id)?;
    Ok(format!("{resource_type}/{id}"))
}

/// Splits a resource key into (type, id), checking it.
///
/// # Errors
/// [`Error::InvalidKey`] as for [`resource_key`].
pub fn split_key(key: &str) -> Result<(&str, &str)> {
    let (t, id) = key.split_once('/').ok_or(Error::InvalidKey {
        reason: "expected {resourceType}/{id}",
    })?;
    check_type(t)?;
    check_id(id)?;
    Ok((t, id))
}

fn check_type(t: &str) -> Result<()> {
    let mut chars = t.chars();
    let ok =
        chars.next().is_some_and(|c| c.is_ascii_uppercase()) && chars.all(|c| c.is_ascii_alphabetic()) && t.len() <= 64;
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidKey {
            reason: "resource type must be [A-Z][A-Za-z]*",
        })
    }
}

/// Whether `id` is a FHIR logical id: `[A-Za-z0-9-.]{1,64}`.
pub(crate) fn is_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn check_id(id: &str) -> Result<()> {
    if is_id(id) {
        Ok(())
    } else {
        Err(Error::InvalidKey {
            reason: "id must be [A-Za-z0-9-.]{1,64}",
        })
    }
}

/// One resource rendered as FHIR JSON, with its serialized bytes (what the gateway sends).
#[derive(Debug, Clone, PartialEq)]
pub struct RenderedResource {
    /// `"{resourceType}/{id}"`.
    pub key: String,
    /// `meta.versionId`: first 16 hex characters of the hash of the last change.
    pub version_id: String,
    /// Hash of the change this version is.
    pub hash: ChangeHash,
    /// `meta.lastUpdated` as a FHIR instant (`…Z`).
    pub last_updated: String,
    /// The time of that change, ms since the Unix epoch.
    pub last_updated_ms: i64,
    /// The resource: `resourceType`, `id`, `meta` first, then the stored elements.
    pub json: Value,
    /// `json` serialized (compact), cached because serializing is cheap but rendering is not.
    pub bytes: Vec<u8>,
}

impl RenderedResource {
    /// The resource type (the part of the key before `/`).
    pub fn resource_type(&self) -> &str {
        self.key.split_once('/').map_or(&*self.key, |(t, _)| t)
    }

    /// The logical id (the part of the key after `/`).
    pub fn id(&self) -> &str {
        self.key.split_once('/').map_or("", |(_, id)| id)
    }
}

/// One entry of a resource's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// `meta.versionId` of this version.
    pub version_id: String,
    /// The change that made this version.
    pub hash: ChangeHash,
    /// Change time, ms since the Unix epoch.
    pub time_ms: i64,
    /// Change time as a FHIR instant.
    pub last_updated: String,
    /// Whether this change deleted the resource.
    pub deleted: bool,
}

/// What a local write produced: the one Automerge change to seal and store.
#[derive(Debug, Clone)]
pub struct Written {
    /// The resource key written.
    pub key: String,
    /// The change's hash.
    pub hash: ChangeHash,
    /// The change's raw bytes (`Change::raw_bytes`), to seal into an envelope.
    pub change: Vec<u8>,
    /// The resource's new `meta.versionId`.
    pub version_id: String,
    /// The change time (ms since the Unix epoch), as passed by the caller.
    pub time_ms: i64,
    /// The resource as now rendered; `None` after a delete.
    pub resource: Option<Arc<RenderedResource>>,
}

/// One write of [`RecordDoc::edit`]; the same checks and effects as the
/// single-write methods of the same name.
#[derive(Debug, Clone, Copy)]
pub enum Edit<'a> {
    /// As [`RecordDoc::create`].
    Create {
        /// The server-assigned id.
        id: &'a str,
        /// The resource.
        resource: &'a Value,
    },
    /// As [`RecordDoc::update`].
    Update {
        /// `"{resourceType}/{id}"`.
        key: &'a str,
        /// The version the client read.
        base: &'a Value,
        /// What it submitted.
        submitted: &'a Value,
    },
    /// As [`RecordDoc::delete`].
    Delete {
        /// `"{resourceType}/{id}"`.
        key: &'a str,
    },
}

/// What one [`Edit`] did, at the same position.
#[derive(Debug, Clone)]
pub enum Edited {
    /// Created; the resource as now rendered.
    Created(Arc<RenderedResource>),
    /// Updated; the resource as now rendered.
    Updated(Arc<RenderedResource>),
    /// An update identical to its base: nothing written; the current resource.
    Unchanged(Arc<RenderedResource>),
    /// Deleted (the key).
    Deleted(String),
}

/// The one change [`RecordDoc::edit`] made.
#[derive(Debug, Clone)]
pub struct MadeChange {
    /// The change's hash.
    pub hash: ChangeHash,
    /// Its raw bytes (`Change::raw_bytes`), to seal into an envelope.
    pub change: Vec<u8>,
    /// The `meta.versionId` of every resource it touched.
    pub version_id: String,
    /// The change time (ms since the Unix epoch), as passed by the caller.
    pub time_ms: i64,
}

/// What [`RecordDoc::edit`] did.
#[derive(Debug, Clone)]
pub struct Edits {
    /// The change; `None` when every edit was an update that changed nothing.
    pub change: Option<MadeChange>,
    /// One outcome per edit, in order.
    pub outcomes: Vec<Edited>,
}

/// A [`RecordDoc::edit`] that failed; the document is as it was.
#[derive(Debug, thiserror::Error)]
#[error("edit {edit}: {error}")]
pub struct EditError {
    /// Position of the edit at fault.
    pub edit: usize,
    /// Why.
    #[source]
    pub error: Error,
}

/// An edit checked against the document, ready to be made.
enum Planned {
    Create {
        key: String,
        body: Map<String, Value>,
    },
    Update {
        key: String,
        base: Map<String, Value>,
        submitted: Map<String, Value>,
    },
    Unchanged {
        key: String,
    },
    Delete {
        key: String,
    },
}

impl Planned {
    fn key(&self) -> &str {
        match self {
            Self::Create { key, .. } | Self::Update { key, .. } | Self::Unchanged { key } | Self::Delete { key } => key,
        }
    }
}

/// A change decoded from bytes (under `catch_unwind`), ready for
/// [`RecordDoc::apply_changes`].
#[derive(Debug, Clone)]
pub struct DecodedChange {
    change: Change,
    hash: ChangeHash,
}

impl DecodedChange {
    /// Decodes a change from its raw bytes.
    ///
    /// # Errors
    /// [`Error::MalformedChange`] for bytes that are not a change, [`Error::Panicked`] if
    /// the decoder panicked.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let owned = bytes.to_vec();
        let change = catch_unwind(AssertUnwindSafe(|| Change::from_bytes(owned)))
            .map_err(|_| Error::Panicked("decoding a change"))?
            .map_err(|e| Error::MalformedChange(Box::new(e)))?;
        let hash = change.hash();
        Ok(Self { change, hash })
    }

    /// [`DecodedChange::from_bytes`] of each of `changes`, in order, spread
    /// over the cores for a large batch (decoding is about a tenth of what
    /// applying a change costs, and it cannot overlap the apply).
    pub fn decode_all<B: AsRef<[u8]> + Sync>(changes: &[B]) -> Vec<Result<Self>> {
        crate::par::map(changes, 256, |bytes| Self::from_bytes(bytes.as_ref()))
            .unwrap_or_else(|| changes.iter().map(|b| Self::from_bytes(b.as_ref())).collect())
    }

    /// The change hash.
    pub fn hash(&self) -> ChangeHash {
        self.hash
    }

    /// The actor that made the change (check it against the envelope's author with
    /// [`super::actor_belongs_to`]).
    pub fn actor(&self) -> &ActorId {
        self.change.actor_id()
    }

    /// The change's sequence number for its actor.
    pub fn seq(&self) -> u64 {
        self.change.seq()
    }

    /// The change time (ms since the Unix epoch, as its author claimed).
    pub fn time_ms(&self) -> i64 {
        self.change.timestamp()
    }

    /// The hashes this change depends on.
    pub fn deps(&self) -> &[ChangeHash] {
        self.change.deps()
    }

    /// The raw bytes.
    pub fn raw_bytes(&self) -> &[u8] {
        self.change.raw_bytes()
    }

    /// The change as Automerge's compressed change chunk (DEFLATE of its
    /// columns; the raw bytes when under Automerge's 256-byte threshold).
    /// Same hash; [`DecodedChange::from_bytes`] reads either form. What the
    /// node seals, to keep envelopes small at rest and on the wire.
    pub fn compressed_bytes(&self) -> Vec<u8> {
        let mut change = self.change.clone();
        catch_unwind(AssertUnwindSafe(move || change.bytes().into_owned()))
            .unwrap_or_else(|_| self.raw_bytes().to_vec())
    }
}

/// A change from a peer that is now part of the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedChange {
    /// The change hash.
    pub hash: ChangeHash,
    /// The resource keys it touched (sorted).
    pub keys: Vec<String>,
}

/// A change from a peer that will never be applied.
#[derive(Debug)]
pub struct RejectedChange {
    /// The change hash.
    pub hash: ChangeHash,
    /// Why.
    pub error: Error,
}

/// Outcome of [`RecordDoc::apply_changes`].
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// Changes applied by this call, including earlier pending ones whose
    /// dependencies arrived, in causal order.
    pub applied: Vec<AppliedChange>,
    /// Changes rejected for good (malformed, or breaking the record model).
    pub rejected: Vec<RejectedChange>,
    /// Changes skipped because they were already applied or pending.
    pub duplicates: usize,
    /// Changes now waiting for dependencies (all of them, not only from this call).
    pub pending: Vec<ChangeHash>,
}

/// The history of one resource key, as change references.
#[derive(Debug, Clone)]
struct VersionRef {
    hash: ChangeHash,
    start_op: u64,
    actor: u32,
    time: i64,
    deleted: bool,
}

/// Where an operation of a change lands.
enum Target<'a> {
    Root,
    Resources,
    Deleted,
    /// A resource already known to the index or the batch overlay.
    Resource(&'a str),
    /// A resource whose body this same change created (index into `touched`).
    Local(usize),
    Unknown,
}

/// What one change does, found by reading its operations.
#[derive(Debug, Clone)]
struct Effects {
    hash: ChangeHash,
    actor: ActorId,
    seq: u64,
    start_op: u64,
    time: i64,
    /// Touched keys, with whether the change tombstoned them. Sorted, unique.
    touched: Vec<(String, bool)>,
    /// Objects the change creates (op counter) and the resource each belongs to
    /// (index into `touched`).
    created: Vec<(u64, usize)>,
}

/// Objects and sequence numbers of changes accepted in a batch but not yet applied
/// (interned like [`Index`], so checking a large batch allocates little).
#[derive(Default)]
struct Overlay {
    actor_ids: HashMap<ActorId, u32>,
    keys: Vec<String>,
    key_ids: HashMap<String, u32>,
    owners: HashMap<(u64, u32), u32>,
    max_seq: HashMap<u32, u64>,
}

impl Overlay {
    fn add(&mut self, e: &Effects) {
        let next = u32::try_from(self.actor_ids.len()).unwrap_or(u32::MAX);
        let a = *self.actor_ids.entry(e.actor.clone()).or_insert(next);
        let ids: Vec<u32> = e
            .touched
            .iter()
            .map(|(k, _)| match self.key_ids.get(k) {
                Some(&i) => i,
                None => {
                    let i = u32::try_from(self.keys.len()).unwrap_or(u32::MAX);
                    self.keys.push(k.clone());
                    self.key_ids.insert(k.clone(), i);
                    i
                }
            })
            .collect();
        for (counter, t) in &e.created {
            if let Some(&k) = ids.get(*t) {
                self.owners.insert((*counter, a), k);
            }
        }
        self.max_seq.insert(a, e.seq);
    }

    fn owner(&self, counter: u64, actor: &ActorId) -> Option<&str> {
        let a = self.actor_ids.get(actor)?;
        let k = self.owners.get(&(counter, *a))?;
        self.keys.get(*k as usize).map(String::as_str)
    }
}

/// Per-document index: which objects belong to which resource, which changes
/// touched which resource (for `versionId`, history and vread).
#[derive(Debug, Clone, Default)]
struct Index {
    applied: HashSet<ChangeHash>,
    actors: Vec<ActorId>,
    actor_ids: HashMap<ActorId, u32>,
    max_seq: Vec<u64>,
    keys: Vec<String>,
    key_ids: HashMap<String, u32>,
    owners: HashMap<(u64, u32), u32>,
    history: Vec<Vec<VersionRef>>,
}

/// Appends `v` as unsigned LEB128.
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads an unsigned LEB128 of at most 10 bytes.
fn take_u64(b: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..10 {
        let (byte, rest) = b.split_first()?;
        *b = rest;
        v |= u64::from(byte & 0x7f).checked_shl(7 * i)?;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn take_bytes<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if b.len() < n {
        return None;
    }
    let (v, rest) = b.split_at(n);
    *b = rest;
    Some(v)
}

/// A count that cannot claim more items than the bytes left could hold.
fn take_count(b: &mut &[u8], min_item: usize) -> Option<usize> {
    let n = usize::try_from(take_u64(b)?).ok()?;
    (n.checked_mul(min_item)? <= b.len()).then_some(n)
}

impl Index {
    /// Appends the index (see [`RecordDoc::save_local`]): applied hashes; actors
    /// with their max seq; keys; owners; per key its versions.
    fn encode(&self, out: &mut Vec<u8>) {
        let put = put_varint;
        let mut applied: Vec<&ChangeHash> = self.applied.iter().collect();
        applied.sort_unstable();
        put(out, applied.len() as u64);
        for h in applied {
            out.extend_from_slice(&h.0);
        }
        put(out, self.actors.len() as u64);
        for (a, seq) in self.actors.iter().zip(&self.max_seq) {
            let bytes = a.to_bytes();
            put(out, bytes.len() as u64);
            out.extend_from_slice(bytes);
            put(out, *seq);
        }
        put(out, self.keys.len() as u64);
        for k in &self.keys {
            put(out, k.len() as u64);
            out.extend_from_slice(k.as_bytes());
        }
        put(out, self.owners.len() as u64);
        for ((counter, actor), key) in &self.owners {
            put(out, *counter);
            put(out, u64::from(*actor));
            put(out, u64::from(*key));
        }
        for versions in &self.history {
            put(out, versions.len() as u64);
            for v in versions {
                out.extend_from_slice(&v.hash.0);
                put(out, v.start_op);
                put(out, u64::from(v.actor));
                put(out, v.time as u64);
                out.push(u8::from(v.deleted));
            }
        }
    }

    /// Parses [`Index::encode`]'s output, checking every cross reference.
    fn decode(b: &mut &[u8]) -> Option<Self> {
        let mut index = Self::default();
        for _ in 0..take_count(b, 32)? {
            index.applied.insert(ChangeHash(take_bytes(b, 32)?.try_into().ok()?));
        }
        for _ in 0..take_count(b, 2)? {
            let n = usize::try_from(take_u64(b)?).ok()?;
            let actor = ActorId::from(take_bytes(b, n)?);
            let seq = take_u64(b)?;
            let i = u32::try_from(index.actors.len()).ok()?;
            if index.actor_ids.insert(actor.clone(), i).is_some() {
                return None;
            }
            index.actors.push(actor);
            index.max_seq.push(seq);
        }
        for _ in 0..take_count(b, 1)? {
            let n = usize::try_from(take_u64(b)?).ok()?;
            let key = std::str::from_utf8(take_bytes(b, n)?).ok()?.to_owned();
            split_key(&key).ok()?;
            let i = u32::try_from(index.keys.len()).ok()?;
            if index.key_ids.insert(key.clone(), i).is_some() {
                return None;
            }
            index.keys.push(key);
        }
        for _ in 0..take_count(b, 3)? {
            let counter = take_u64(b)?;
            let actor = u32::try_from(take_u64(b)?).ok()?;
            let key = u32::try_from(take_u64(b)?).ok()?;
            if actor as usize >= index.actors.len() || key as usize >= index.keys.len() {
                return None;
            }
            index.owners.insert((counter, actor), key);
        }
        for _ in 0..index.keys.len() {
            let mut versions = Vec::new();
            for _ in 0..take_count(b, 36)? {
                let hash = ChangeHash(take_bytes(b, 32)?.try_into().ok()?);
                let start_op = take_u64(b)?;
                let actor = u32::try_from(take_u64(b)?).ok()?;
                let time = take_u64(b)? as i64;
                let deleted = match take_bytes(b, 1)? {
                    [0] => false,
                    [1] => true,
                    _ => return None,
                };
                if actor as usize >= index.actors.len() || !index.applied.contains(&hash) {
                    return None;
                }
                versions.push(VersionRef {
                    hash,
                    start_op,
                    actor,
                    time,
                    deleted,
                });
            }
            index.history.push(versions);
        }
        Some(index)
    }
}

/// Index of `key` in `touched`, adding it (not tombstoned) if absent. A change
/// normally touches one resource, so a linear search beats hashing.
fn touch(touched: &mut Vec<(String, bool)>, key: &str) -> usize {
    match touched.iter().position(|(k, _)| k == key) {
        Some(i) => i,
        None => {
            touched.push((key.to_owned(), false));
            touched.len() - 1
        }
    }
}

impl Index {
    fn actor_id(&mut self, actor: &ActorId) -> u32 {
        if let Some(&i) = self.actor_ids.get(actor) {
            return i;
        }
        let i = u32::try_from(self.actors.len()).unwrap_or(u32::MAX);
        self.actors.push(actor.clone());
        self.actor_ids.insert(actor.clone(), i);
        self.max_seq.push(0);
        i
    }

    fn key_id(&mut self, key: &str) -> u32 {
        if let Some(&i) = self.key_ids.get(key) {
            return i;
        }
        let i = u32::try_from(self.keys.len()).unwrap_or(u32::MAX);
        self.keys.push(key.to_owned());
        self.key_ids.insert(key.to_owned(), i);
        self.history.push(Vec::new());
        i
    }

    fn max_seq(&self, actor: &ActorId, overlay: &Overlay) -> u64 {
        if let Some(s) = overlay.actor_ids.get(actor).and_then(|a| overlay.max_seq.get(a)) {
            return *s;
        }
        self.actor_ids
            .get(actor)
            .and_then(|&i| self.max_seq.get(i as usize))
            .copied()
            .unwrap_or(0)
    }

    fn owner<'a>(&'a self, id: &legacy::OpId, overlay: &'a Overlay) -> Target<'a> {
        let actor = id.actor();
        if actor.to_bytes() == GENESIS_ACTOR {
            return match id.counter() {
                1 => Target::Resources,
                2 => Target::Deleted,
                _ => Target::Unknown,
            };
        }
        let known = self
            .actor_ids
            .get(actor)
            .and_then(|&a| self.owners.get(&(id.counter(), a)))
            .and_then(|&k| self.keys.get(k as usize));
        if let Some(k) = known {
            return Target::Resource(k);
        }
        match overlay.owner(id.counter(), actor) {
            Some(k) => Target::Resource(k),
            None => Target::Unknown,
        }
    }

    /// Reads a change's operations and checks that it only does what the record model
    /// allows: add or replace resource bodies in `resources`, put `true` tombstones in
    /// `deleted`, and edit maps/lists/strings/booleans inside a resource body.
    fn analyse(&self, change: &Change, overlay: &Overlay) -> Result<Effects, &'static str> {
        let actor = change.actor_id();
        if actor.to_bytes() == GENESIS_ACTOR {
            return Err("uses the genesis actor");
        }
        if change.seq() != self.max_seq(actor, overlay).saturating_add(1) {
            return Err("reuses or skips an actor sequence number");
        }
        let expanded = catch_unwind(AssertUnwindSafe(|| change.decode())).map_err(|_| "operations do not decode")?;
        let start_op = change.start_op().get();
        let mut touched: Vec<(String, bool)> = Vec::new();
        let mut created: Vec<(u64, usize)> = Vec::new();
        // Objects made by this change → index into `touched`.
        let mut local: HashMap<u64, usize> = HashMap::new();
        for (i, op) in expanded.operations.iter().enumerate() {
            let counter = start_op.saturating_add(i as u64);
            let target = match &op.obj {
                legacy::ObjectId::Root => Target::Root,
                legacy::ObjectId::Id(id) => match local.get(&id.counter()) {
                    Some(&t) if id.actor() == actor => Target::Local(t),
                    _ => self.owner(id, overlay),
                },
            };
            let map_key = match &op.key {
                legacy::Key::Map(k) => Some(k.as_str()),
                legacy::Key::Seq(_) => None,
            };
            let t = match target {
                Target::Root => return Err("writes the document root"),
                Target::Unknown => return Err("writes an object outside any resource"),
                Target::Resources => {
                    let key = map_key.ok_or("malformed resources key")?;
                    split_key(key).map_err(|_| "malformed resource key")?;
                    if !matches!(op.action, legacy::OpType::Make(ObjType::Map)) {
                        return Err("removes or replaces a resource body with a non-map");
                    }
                    let t = touch(&mut touched, key);
                    local.insert(counter, t);
                    created.push((counter, t));
                    continue;
                }
                Target::Deleted => {
                    let key = map_key.ok_or("malformed tombstone key")?;
                    split_key(key).map_err(|_| "malformed resource key")?;
                    if !matches!(op.action, legacy::OpType::Put(ScalarValue::Boolean(true))) {
                        return Err("writes a tombstone other than true");
                    }
                    let t = touch(&mut touched, key);
                    if let Some(entry) = touched.get_mut(t) {
                        entry.1 = true;
                    }
                    continue;
                }
                Target::Resource(key) => touch(&mut touched, key),
                Target::Local(t) => t,
            };
            match &op.action {
                legacy::OpType::Make(ObjType::Map | ObjType::List) => {
                    local.insert(counter, t);
                    created.push((counter, t));
                }
                legacy::OpType::Put(ScalarValue::Str(s)) => value::check_stored_string(s)?,
                legacy::OpType::Put(ScalarValue::Boolean(_) | ScalarValue::Null) | legacy::OpType::Delete => {}
                _ => return Err("uses an operation the record model does not"),
            }
        }
        // Sort keys for reporting, remapping `created`'s indices.
        let mut order: Vec<usize> = (0..touched.len()).collect();
        order.sort_by(|&x, &y| touched.get(x).cmp(&touched.get(y)));
        let mut new_pos = vec![0usize; touched.len()];
        for (new, &old) in order.iter().enumerate() {
            if let Some(p) = new_pos.get_mut(old) {
                *p = new;
            }
        }
        let sorted: Vec<(String, bool)> = order.iter().filter_map(|&i| touched.get(i).cloned()).collect();
        for (_, t) in &mut created {
            *t = new_pos.get(*t).copied().unwrap_or(*t);
        }
        Ok(Effects {
            hash: change.hash(),
            actor: actor.clone(),
            seq: change.seq(),
            start_op,
            time: change.timestamp(),
            touched: sorted,
            created,
        })
    }

    /// Records an applied change.
    fn commit(&mut self, e: &Effects) {
        let a = self.actor_id(&e.actor);
        if let Some(s) = self.max_seq.get_mut(a as usize) {
            *s = e.seq;
        }
        let ids: Vec<u32> = e.touched.iter().map(|(k, _)| self.key_id(k)).collect();
        for (counter, t) in &e.created {
            if let Some(&k) = ids.get(*t) {
                self.owners.insert((*counter, a), k);
            }
        }
        for (key, deleted) in &e.touched {
            let k = self.key_id(key) as usize;
            let v = VersionRef {
                hash: e.hash,
                start_op: e.start_op,
                actor: a,
                time: e.time,
                deleted: *deleted,
            };
            let actors = &self.actors;
            let order = |r: &VersionRef| (r.start_op, actors.get(r.actor as usize));
            if let Some(h) = self.history.get_mut(k) {
                // Versions are ordered by (start op, actor): a total order that extends
                // causality, identical on every replica. Appends are the common case.
                let pos = h.partition_point(|r| order(r) <= order(&v));
                h.insert(pos, v);
            }
        }
        self.applied.insert(e.hash);
    }
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

/// Rendered resources by key. Once [`RecordDoc::resources`] has walked the
/// document, `complete` says every live resource is here except the `stale`
/// keys (those a change touched since), so the next listing re-renders only
/// those instead of walking Automerge's key index again (which costs ~0.6 µs
/// a resource: most of a warm `$everything`).
#[derive(Default)]
struct RenderCache {
    by_key: BTreeMap<String, Arc<RenderedResource>>,
    complete: bool,
    stale: Vec<String>,
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

/// A saved document (e.g. from a peer's snapshot transfer), loaded by
/// Automerge, with its changes listed but not yet checked against the
/// record model: their bytes can be matched to signed envelope headers
/// first, and the document becomes a [`RecordDoc`] only through
/// [`SavedDoc::into_record_doc`], which checks every change like
/// [`RecordDoc::apply_changes`] would.
pub struct SavedDoc {
    doc: Automerge,
    /// Every change in `doc`, genesis excluded.
    changes: Vec<DecodedChange>,
    /// Whether `doc` holds the genesis change (every record document does).
    has_genesis: bool,
}

impl std::fmt::Debug for SavedDoc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print content: only sizes.
        f.debug_struct("SavedDoc")
            .field("changes", &self.changes.len())
            .finish_non_exhaustive()
    }
}

impl SavedDoc {
    /// Loads a document made by [`RecordDoc::save`] and lists its changes.
    ///
    /// # Errors
    /// [`Error::InvalidSnapshot`] if it does not load; [`Error::Panicked`]
    /// if Automerge panicked.
    pub fn load(bytes: &[u8]) -> Result<Self> {
        let doc = catch_unwind(AssertUnwindSafe(|| {
            Automerge::load_with_options(bytes, LoadOptions::new().on_partial_load(OnPartialLoad::Error))
        }))
        .map_err(|_| Error::Panicked("loading a snapshot"))?
        .map_err(|_| Error::InvalidSnapshot {
            reason: "does not load",
        })?;
        let all = catch_unwind(AssertUnwindSafe(|| doc.get_changes(&[])))
            .map_err(|_| Error::Panicked("reading a snapshot"))?;
        let mut has_genesis = false;
        let mut changes = Vec::with_capacity(all.len());
        for change in all {
            let hash = change.hash();
            if hash == GENESIS.1 {
                has_genesis = true;
            } else {
                changes.push(DecodedChange { hash, change });
            }
        }
        Ok(Self {
            doc,
            changes,
            has_genesis,
        })
    }

    /// Every change in the document, genesis excluded (Automerge's order).
    pub fn changes(&self) -> &[DecodedChange] {
        &self.changes
    }

    /// The document as a [`RecordDoc`], after checking every change in it
    /// like [`RecordDoc::apply_changes`] would.
    ///
    /// # Errors
    /// [`Error::InvalidSnapshot`] if it is not a record document, has
    /// changes with missing dependencies or a change that breaks the record
    /// model; [`Error::Panicked`] if Automerge panicked.
    pub fn into_record_doc(self) -> Result<RecordDoc> {
        let Self {
            doc,
            changes,
            has_genesis,
        } = self;
        let missing = catch_unwind(AssertUnwindSafe(|| doc.get_missing_deps(&[])))
            .map_err(|_| Error::Panicked("reading a snapshot"))?;
        if !missing.is_empty() {
            return Err(Error::InvalidSnapshot {
                reason: "has changes with missing dependencies",
            });
        }
        if !has_genesis {
            return Err(Error::InvalidSnapshot {
                reason: "is not a record document",
            });
        }
        let mut index = Index::default();
        index.applied.insert(GENESIS.1);
        let rest: Vec<Change> = changes.into_iter().map(|c| c.change).collect();
        let (ordered, blocked) = topo_order(rest, &index.applied);
        if !blocked.is_empty() {
            return Err(Error::InvalidSnapshot {
                reason: "has changes with missing dependencies",
            });
        }
        for change in &ordered {
            let effects = index
                .analyse(change, &Overlay::default())
                .map_err(|reason| Error::InvalidSnapshot { reason })?;
            index.commit(&effects);
        }
        Ok(RecordDoc {
            doc,
            index,
            pending: HashMap::new(),
            cache: Mutex::new(RenderCache::default()),
        })
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

    /// Loads a snapshot made by [`save`](Self::save) (possibly by a peer), checking every
    /// change in it like [`apply_changes`](Self::apply_changes) would.
    ///
    /// # Errors
    /// [`Error::InvalidSnapshot`] if it does not load, is not a record document, has
    /// changes with missing dependencies or a change that breaks the record model;
    /// [`Error::Panicked`] if Automerge panicked.
    pub fn load(bytes: &[u8]) -> Result<Self> {
        SavedDoc::load(bytes)?.into_record_doc()
    }

    /// The document and its change index, for a snapshot this node keeps
    /// itself (sealed by the store): [`RecordDoc::load_local`] then skips
    /// re-reading and re-checking every change, which is most of the cost of
    /// [`RecordDoc::load`]. Not for peers: they must check every change.
    pub fn save_local(&self) -> Vec<u8> {
        let doc = self.doc.save();
        let mut out = Vec::with_capacity(LOCAL_TAG.len() + 8 + doc.len() + 64 * self.index.applied.len());
        out.extend_from_slice(LOCAL_TAG);
        out.extend_from_slice(&(doc.len() as u64).to_be_bytes());
        out.extend_from_slice(&doc);
        self.index.encode(&mut out);
        out
    }

    /// Loads what [`RecordDoc::save_local`] wrote. The bytes must come from
    /// this node (authenticated by the store's seal): the change index is
    /// taken as written, after checks that it is well formed and agrees with
    /// the document's heads.
    ///
    /// # Errors
    /// [`Error::InvalidSnapshot`]; [`Error::Panicked`] if Automerge panicked.
    pub fn load_local(bytes: &[u8]) -> Result<Self> {
        let invalid = |reason| Error::InvalidSnapshot { reason };
        let rest = bytes.strip_prefix(LOCAL_TAG).ok_or(invalid("not a local snapshot"))?;
        let (len, rest) = rest.split_first_chunk::<8>().ok_or(invalid("truncated"))?;
        let len = usize::try_from(u64::from_be_bytes(*len)).map_err(|_| invalid("truncated"))?;
        if rest.len() < len {
            return Err(invalid("truncated"));
        }
        let (doc_bytes, mut index_bytes) = rest.split_at(len);
        let index = Index::decode(&mut index_bytes).ok_or(invalid("change index does not parse"))?;
        if !index_bytes.is_empty() {
            return Err(invalid("trailing bytes"));
        }
        let doc = catch_unwind(AssertUnwindSafe(|| {
            Automerge::load_with_options(doc_bytes, LoadOptions::new().on_partial_load(OnPartialLoad::Error))
        }))
        .map_err(|_| Error::Panicked("loading a snapshot"))?
        .map_err(|_| invalid("does not load"))?;
        let heads =
            catch_unwind(AssertUnwindSafe(|| doc.get_heads())).map_err(|_| Error::Panicked("reading a snapshot"))?;
        if !index.applied.contains(&GENESIS.1) || heads.iter().any(|h| !index.applied.contains(h)) {
            return Err(invalid("change index does not match the document"));
        }
        Ok(Self {
            doc,
            index,
            pending: HashMap::new(),
            cache: Mutex::new(RenderCache::default()),
        })
    }

    /// The whole document, compressed, for a snapshot (the store encrypts it).
    /// Pending changes are not included.
    pub fn save(&self) -> Vec<u8> {
        self.doc.save()
    }

    /// The Automerge document inside what [`RecordDoc::save_local`] wrote
    /// (what [`RecordDoc::save`] would give), without loading it: a node
    /// ships it to a peer in a snapshot transfer. `None` if the bytes are
    /// not a local snapshot.
    pub fn document_of_local(bytes: &[u8]) -> Option<&[u8]> {
        let rest = bytes.strip_prefix(LOCAL_TAG)?;
        let (len, rest) = rest.split_first_chunk::<8>()?;
        let len = usize::try_from(u64::from_be_bytes(*len)).ok()?;
        rest.get(..len)
    }

    /// Every change of a saved document (e.g. from a peer's snapshot
    /// transfer), genesis excluded, without checking them against the
    /// record model: see [`SavedDoc::load`].
    ///
    /// # Errors
    /// As [`SavedDoc::load`].
    pub fn changes_of_saved(bytes: &[u8]) -> Result<Vec<DecodedChange>> {
        Ok(SavedDoc::load(bytes)?.changes)
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

    fn cache(&self) -> MutexGuard<'_, RenderCache> {
        // A poisoned cache only means a reader panicked mid-insert; entries are whole Arcs.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn invalidate<'k>(&self, keys: impl IntoIterator<Item = &'k str>) {
        let mut cache = self.cache();
        for k in keys {
            cache.by_key.remove(k);
            if cache.complete {
                cache.stale.push(k.to_owned());
            }
        }
        // Many writes and no listing: walking the document again is cheaper
        // than remembering them all.
        if cache.stale.len() > cache.by_key.len() + 1024 {
            cache.complete = false;
            cache.stale = Vec::new();
        }
    }

    fn body_exists(&self, key: &str) -> bool {
        matches!(self.doc.get(resources_obj(), key), Ok(Some(_)))
    }

    fn check_live(&self, key: &str) -> Result<()> {
        if !self.body_exists(key) {
            return Err(Error::NotFound { key: key.to_owned() });
        }
        if self.is_deleted(key) {
            return Err(Error::Deleted { key: key.to_owned() });
        }
        Ok(())
    }

    /// Reads a live resource (cached).
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::Deleted`], or [`Error::Corrupt`].
    pub fn read(&self, key: &str) -> Result<Arc<RenderedResource>> {
        if let Some(r) = self.cache().by_key.get(key) {
            return Ok(Arc::clone(r));
        }
        self.check_live(key)?;
        let version = self
            .index
            .key_ids
            .get(key)
            .and_then(|&k| self.index.history.get(k as usize))
            .and_then(|h| h.last())
            .ok_or(Error::Corrupt {
                key: key.to_owned(),
                reason: "resource has no history",
            })?;
        let rendered = Arc::new(self.render(key, version, At::Now)?);
        self.cache().by_key.insert(key.to_owned(), Arc::clone(&rendered));
        Ok(rendered)
    }

    /// Every live resource, rendered (from the cache where possible), in key order.
    ///
    /// # Errors
    /// [`Error::Corrupt`] if a resource does not render.
    pub fn resources(&self) -> Result<Vec<Arc<RenderedResource>>> {
        // Not complete while the stale keys are re-rendered, so a concurrent
        // listing walks the document instead of missing them.
        let stale = {
            let mut cache = self.cache();
            std::mem::take(&mut cache.complete).then(|| std::mem::take(&mut cache.stale))
        };
        let keys = match stale {
            // Only what changed since the last listing needs rendering.
            Some(stale) => stale,
            None => self.keys(),
        };
        for key in &keys {
            match self.read(key) {
                Ok(_) | Err(Error::Deleted { .. } | Error::NotFound { .. }) => {}
                // Listed again in full next time.
                Err(e) => return Err(e),
            }
        }
        let mut cache = self.cache();
        cache.complete = true;
        Ok(cache.by_key.values().cloned().collect())
    }

    /// The versions of a resource, oldest first: every change that touched it, ordered
    /// by (start op, actor) — an order that extends causality and is the same on every
    /// replica.
    ///
    /// # Errors
    /// [`Error::NotFound`] if no change ever touched the key.
    pub fn history(&self, key: &str) -> Result<Vec<Version>> {
        let refs = self.history_refs(key)?;
        Ok(refs
            .iter()
            .map(|r| Version {
                version_id: version_id(&r.hash),
                hash: r.hash,
                time_ms: r.time,
                last_updated: format_instant(r.time),
                deleted: r.deleted,
            })
            .collect())
    }

    fn history_refs(&self, key: &str) -> Result<&[VersionRef]> {
        self.index
            .key_ids
            .get(key)
            .and_then(|&k| self.index.history.get(k as usize))
            .filter(|h| !h.is_empty())
            .map(Vec::as_slice)
            .ok_or_else(|| Error::NotFound { key: key.to_owned() })
    }

    /// Renders one version of a resource: the document as of that change and every
    /// earlier change (in history order) that touched the resource.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::VersionNotFound`], [`Error::Deleted`] when that
    /// version is a deletion (or the resource was already deleted then).
    pub fn vread(&self, key: &str, version: &str) -> Result<Arc<RenderedResource>> {
        let refs = self.history_refs(key)?;
        let pos = refs
            .iter()
            .position(|r| version_id(&r.hash) == version)
            .ok_or_else(|| Error::VersionNotFound {
                key: key.to_owned(),
                version_id: version.to_owned(),
            })?;
        let Some(v) = refs.get(pos) else {
            return Err(Error::VersionNotFound {
                key: key.to_owned(),
                version_id: version.to_owned(),
            });
        };
        let heads: Vec<ChangeHash> = refs.iter().take(pos + 1).map(|r| r.hash).collect();
        if v.deleted || matches!(self.doc.get_at(deleted_obj(), key, &heads), Ok(Some(_))) {
            return Err(Error::Deleted { key: key.to_owned() });
        }
        Ok(Arc::new(self.render(key, v, At::Heads(&heads))?))
    }

    fn render(&self, key: &str, version: &VersionRef, at: At<'_>) -> Result<RenderedResource> {
        let corrupt = |reason| Error::Corrupt {
            key: key.to_owned(),
            reason,
        };
        let (rtype, id) = split_key(key)?;
        let found = match at {
            At::Now => self.doc.get(resources_obj(), key),
            At::Heads(h) => self.doc.get_at(resources_obj(), key, h),
        }
        .map_err(|source| Error::Automerge {
            key: key.to_owned(),
            source: Box::new(source),
        })?;
        let body_id = match found {
            Some((v, id)) if v.to_objtype() == Some(ObjType::Map) => id,
            Some(_) => return Err(corrupt("resource body is not a map")),
            None => return Err(Error::NotFound { key: key.to_owned() }),
        };
        let body = value::render_map(&self.doc, &body_id, at).map_err(corrupt)?;
        let json = assemble(rtype, id, version, body);
        let bytes = serde_json::to_vec(&json).map_err(|_| corrupt("does not serialize"))?;
        Ok(RenderedResource {
            key: key.to_owned(),
            version_id: version_id(&version.hash),
            hash: version.hash,
            last_updated: format_instant(version.time),
            last_updated_ms: version.time,
            json,
            bytes,
        })
    }

    /// Creates a resource with the server-assigned `id`, as one change by `actor` at
    /// `time_ms`. `id` and `meta.versionId`/`meta.lastUpdated` in the body are ignored.
    ///
    /// # Errors
    /// [`Error::InvalidResource`] (not an object, no `resourceType`, a `null`),
    /// [`Error::InvalidKey`], [`Error::AlreadyExists`] (also for a deleted key).
    pub fn create(&mut self, actor: &ActorId, time_ms: i64, id: &str, resource: &Value) -> Result<Written> {
        let planned = self.plan(&Edit::Create { id, resource })?;
        let key = planned.key().to_owned();
        let made = self
            .write(actor, time_ms, std::slice::from_ref(&planned))
            .map_err(|e| e.error)?;
        self.written(key, time_ms, made, "create made no change")
    }

    /// Three-way update: writes only what differs between `base` (the version the
    /// client read) and `submitted`, so peers' edits to other elements since `base`
    /// are kept. Returns `None` when nothing differs (no change is made).
    ///
    /// # Errors
    /// [`Error::NotFound`] / [`Error::Deleted`] (no update-as-create),
    /// [`Error::InvalidResource`] when `submitted`'s `resourceType`/`id` do not match
    /// `key` or it holds a `null`.
    pub fn update(
        &mut self,
        actor: &ActorId,
        time_ms: i64,
        key: &str,
        base: &Value,
        submitted: &Value,
    ) -> Result<Option<Written>> {
        let planned = self.plan(&Edit::Update { key, base, submitted })?;
        if matches!(planned, Planned::Unchanged { .. }) {
            return Ok(None);
        }
        let made = self
            .write(actor, time_ms, std::slice::from_ref(&planned))
            .map_err(|e| e.error)?;
        self.written(key.to_owned(), time_ms, made, "update made no change")
            .map(Some)
    }

    /// Deletes a resource: one change that writes its tombstone. The body and its
    /// history stay.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::Deleted`].
    pub fn delete(&mut self, actor: &ActorId, time_ms: i64, key: &str) -> Result<Written> {
        let planned = self.plan(&Edit::Delete { key })?;
        let made = self
            .write(actor, time_ms, std::slice::from_ref(&planned))
            .map_err(|e| e.error)?;
        self.written(key.to_owned(), time_ms, made, "delete made no change")
    }

    /// Several writes as **one** Automerge change by `actor` at `time_ms` (a FHIR
    /// transaction's writes to this document): every resource it touches gets the
    /// same new `meta.versionId`, the change's. All edits are checked before any is
    /// made, so an error leaves the document as it was. Updates that change nothing
    /// make no change; when all of them are such, no change is made at all.
    ///
    /// # Errors
    /// [`Error::DuplicateEdit`] when two edits name one resource; otherwise the
    /// errors of [`create`](Self::create), [`update`](Self::update) and
    /// [`delete`](Self::delete), for the first edit that fails.
    pub fn edit(&mut self, actor: &ActorId, time_ms: i64, edits: &[Edit<'_>]) -> std::result::Result<Edits, EditError> {
        let at = |edit: usize| move |error: Error| EditError { edit, error };
        let mut keys = HashSet::with_capacity(edits.len());
        let mut planned = Vec::with_capacity(edits.len());
        for (i, edit) in edits.iter().enumerate() {
            let p = self.plan(edit).map_err(at(i))?;
            if !keys.insert(p.key().to_owned()) {
                return Err(at(i)(Error::DuplicateEdit {
                    key: p.key().to_owned(),
                }));
            }
            planned.push(p);
        }
        let made = self.write(actor, time_ms, &planned)?;
        let mut outcomes = Vec::with_capacity(planned.len());
        for (i, p) in planned.iter().enumerate() {
            let read = |key: &str| self.read(key).map_err(at(i));
            outcomes.push(match p {
                Planned::Create { key, .. } => Edited::Created(read(key)?),
                Planned::Update { key, .. } => Edited::Updated(read(key)?),
                Planned::Unchanged { key } => Edited::Unchanged(read(key)?),
                Planned::Delete { key } => Edited::Deleted(key.clone()),
            });
        }
        Ok(Edits {
            change: made.map(|(hash, change)| MadeChange {
                hash,
                change,
                version_id: version_id(&hash),
                time_ms,
            }),
            outcomes,
        })
    }

    /// Checks one edit against the document and the record model, without writing.
    fn plan(&self, edit: &Edit<'_>) -> Result<Planned> {
        match *edit {
            Edit::Create { id, resource } => {
                let map = resource.as_object().ok_or(Error::InvalidResource {
                    key: id.to_owned(),
                    reason: "not a JSON object",
                })?;
                let rtype = map
                    .get("resourceType")
                    .and_then(Value::as_str)
                    .ok_or(Error::InvalidResource {
                        key: id.to_owned(),
                        reason: "missing resourceType",
                    })?;
                let key = resource_key(rtype, id)?;
                let body = stored_body(&key, map)?;
                if self.body_exists(&key) || self.is_deleted(&key) {
                    return Err(Error::AlreadyExists { key });
                }
                Ok(Planned::Create { key, body })
            }
            Edit::Update { key, base, submitted } => {
                let (rtype, id) = split_key(key)?;
                self.check_live(key)?;
                let invalid = |reason| Error::InvalidResource {
                    key: key.to_owned(),
                    reason,
                };
                let sub = submitted.as_object().ok_or(invalid("not a JSON object"))?;
                if sub.get("resourceType").and_then(Value::as_str) != Some(rtype) {
                    return Err(invalid("resourceType does not match the key"));
                }
                if let Some(sid) = sub.get("id")
                    && sid.as_str() != Some(id)
                {
                    return Err(invalid("id does not match the key"));
                }
                let base = base.as_object().ok_or(invalid("base is not a JSON object"))?;
                let base = stored_body(key, base)?;
                let submitted = stored_body(key, sub)?;
                if base == submitted {
                    return Ok(Planned::Unchanged { key: key.to_owned() });
                }
                Ok(Planned::Update {
                    key: key.to_owned(),
                    base,
                    submitted,
                })
            }
            Edit::Delete { key } => {
                split_key(key)?;
                self.check_live(key)?;
                Ok(Planned::Delete { key: key.to_owned() })
            }
        }
    }

    /// A single write's [`Written`], from the change [`write`](Self::write) made.
    fn written(
        &self,
        key: String,
        time_ms: i64,
        made: Option<(ChangeHash, Vec<u8>)>,
        none: &'static str,
    ) -> Result<Written> {
        let (hash, change) = made.ok_or(Error::Corrupt {
            key: key.clone(),
            reason: none,
        })?;
        let resource = match self.read(&key) {
            Ok(r) => Some(r),
            Err(Error::Deleted { .. }) => None,
            Err(e) => return Err(e),
        };
        Ok(Written {
            key,
            hash,
            change,
            version_id: version_id(&hash),
            time_ms,
            resource,
        })
    }

    /// Makes the planned edits as one transaction by `actor` at `time_ms` and
    /// indexes the resulting change: its hash and raw bytes, or `None` when the
    /// edits changed nothing.
    fn write(
        &mut self,
        actor: &ActorId,
        time_ms: i64,
        planned: &[Planned],
    ) -> std::result::Result<Option<(ChangeHash, Vec<u8>)>, EditError> {
        let first = |error| EditError { edit: 0, error };
        if actor.to_bytes() == GENESIS_ACTOR {
            return Err(first(Error::InvalidKey {
                reason: "the genesis actor cannot write",
            }));
        }
        let first_key = planned.first().map(Planned::key).unwrap_or_default().to_owned();
        self.doc.set_actor(actor.clone());
        let done = self
            .doc
            .transact_with(
                |_| CommitOptions::default().with_time(time_ms),
                |tx| {
                    for (edit, p) in planned.iter().enumerate() {
                        let on = |source| EditError {
                            edit,
                            error: Error::Automerge {
                                key: p.key().to_owned(),
                                source: Box::new(source),
                            },
                        };
                        match p {
                            Planned::Create { key, body } => {
                                tx.batch_create_object(resources_obj(), key.as_str(), &value::hydrate_map(body), false)
                                    .map_err(on)?;
                            }
                            Planned::Update { key, base, submitted } => {
                                let Some((_, obj)) = tx.get(resources_obj(), key.as_str()).map_err(on)? else {
                                    return Err(on(AutomergeError::NotAnObject));
                                };
                                value::merge_map(tx, &obj, base, submitted).map_err(on)?;
                            }
                            Planned::Delete { key } => {
                                tx.put(deleted_obj(), key.as_str(), ScalarValue::Boolean(true))
                                    .map_err(on)?;
                            }
                            Planned::Unchanged { .. } => {}
                        }
                    }
                    Ok::<(), EditError>(())
                },
            )
            .map_err(|failure| failure.error)?;
        let Some(hash) = done.hash else {
            return Ok(None);
        };
        let change = self.doc.get_change_by_hash(&hash).ok_or(first(Error::Corrupt {
            key: first_key.clone(),
            reason: "committed change not found",
        }))?;
        let effects = self
            .index
            .analyse(&change, &Overlay::default())
            .map_err(|reason| first(Error::Corrupt { key: first_key, reason }))?;
        self.index.commit(&effects);
        self.invalidate(effects.touched.iter().map(|(k, _)| k.as_str()));
        Ok(Some((hash, change.raw_bytes().to_vec())))
    }

    /// Applies changes from peers, in one Automerge batch.
    ///
    /// Duplicates are skipped; changes whose dependencies are missing are held as
    /// pending (see [`missing_deps`](Self::missing_deps)) and applied by a later call
    /// once the dependencies arrive; each ready change is checked against the record
    /// model (only resource bodies and tombstones, only the value types this module
    /// writes, contiguous actor sequence numbers) and rejected otherwise. A panic or
    /// error inside Automerge leaves the document as it was; the batch is then retried
    /// one change at a time so only the offending change is rejected.
    pub fn apply_changes(&mut self, changes: Vec<DecodedChange>) -> ApplyReport {
        let mut report = ApplyReport::default();
        for c in changes {
            if self.index.applied.contains(&c.hash) || self.pending.contains_key(&c.hash) {
                report.duplicates += 1;
            } else {
                self.pending.insert(c.hash, c.change);
            }
        }
        let pending: Vec<Change> = self.pending.drain().map(|(_, c)| c).collect();
        let (ordered, blocked) = topo_order(pending, &self.index.applied);
        for c in blocked {
            self.pending.insert(c.hash(), c);
        }
        if ordered.len() >= SPECULATE_MIN
            && let Some(effects) = self.apply_speculatively(&ordered)
        {
            for e in &effects {
                self.accept(e, &mut report);
            }
            report.pending = self.pending.keys().copied().collect();
            report.pending.sort_unstable();
            return report;
        }
        // Check each ready change in causal order; a rejected change blocks its dependents.
        let mut overlay = Overlay::default();
        let mut failed: HashSet<ChangeHash> = HashSet::new();
        let mut ready: Vec<(Change, Effects)> = Vec::new();
        for c in ordered {
            if c.deps().iter().any(|d| failed.contains(d)) {
                failed.insert(c.hash());
                self.pending.insert(c.hash(), c);
                continue;
            }
            match self.index.analyse(&c, &overlay) {
                Ok(e) => {
                    overlay.add(&e);
                    ready.push((c, e));
                }
                Err(reason) => {
                    let hash = c.hash();
                    failed.insert(hash);
                    report.rejected.push(RejectedChange {
                        hash,
                        error: Error::RejectedChange { hash, reason },
                    });
                }
            }
        }
        if !ready.is_empty() {
            let changes: Vec<Change> = ready.iter().map(|(c, _)| c.clone()).collect();
            if self.try_apply(changes).is_ok() {
                for (_, e) in &ready {
                    self.accept(e, &mut report);
                }
            } else {
                self.apply_one_by_one(ready, &mut report);
            }
        }
        report.pending = self.pending.keys().copied().collect();
        report.pending.sort_unstable();
        report
    }

    /// The fast path for a large batch: Automerge applies every ready change
    /// to a copy of the document on one thread while this thread checks them
    /// against the record model. The copy replaces the document only when
    /// every change passes and Automerge applied them all; otherwise nothing
    /// changed and the caller takes the careful path.
    fn apply_speculatively(&mut self, ordered: &[Change]) -> Option<Vec<Effects>> {
        let doc = &self.doc;
        let index = &self.index;
        let (effects, applied) = std::thread::scope(|scope| {
            let apply = scope.spawn(move || {
                catch_unwind(AssertUnwindSafe(|| {
                    let mut copy = doc.clone();
                    let ok =
                        copy.apply_changes(ordered.iter().cloned()).is_ok() && copy.get_missing_deps(&[]).is_empty();
                    ok.then_some(copy)
                }))
                .ok()
                .flatten()
            });
            let mut overlay = Overlay::default();
            let mut effects = Vec::with_capacity(ordered.len());
            for c in ordered {
                let Ok(e) = index.analyse(c, &overlay) else {
                    break;
                };
                overlay.add(&e);
                effects.push(e);
            }
            (effects, apply.join().ok().flatten())
        });
        if effects.len() != ordered.len() {
            return None;
        }
        self.doc = applied?;
        Some(effects)
    }

    /// Applies a batch under `catch_unwind`, restoring the document on failure.
    fn try_apply(&mut self, changes: Vec<Change>) -> Result<()> {
        let backup = self.doc.clone();
        let outcome = catch_unwind(AssertUnwindSafe(|| self.doc.apply_changes(changes)));
        let ok = match outcome {
            Ok(Ok(())) => catch_unwind(AssertUnwindSafe(|| self.doc.get_missing_deps(&[])))
                .map(|m| m.is_empty())
                .unwrap_or(false),
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            self.doc = backup;
            Err(Error::Panicked("applying changes"))
        }
    }

    fn apply_one_by_one(&mut self, ready: Vec<(Change, Effects)>, report: &mut ApplyReport) {
        let mut failed: HashSet<ChangeHash> = HashSet::new();
        for (c, e) in ready {
            let hash = c.hash();
            if c.deps().iter().any(|d| failed.contains(d)) {
                failed.insert(hash);
                self.pending.insert(hash, c);
                continue;
            }
            match self.try_apply(vec![c]) {
                Ok(()) => self.accept(&e, report),
                Err(_) => {
                    failed.insert(hash);
                    report.rejected.push(RejectedChange {
                        hash,
                        error: Error::RejectedChange {
                            hash,
                            reason: "automerge refused or panicked on it",
                        },
                    });
                }
            }
        }
    }

    fn accept(&mut self, e: &Effects, report: &mut ApplyReport) {
        self.index.commit(e);
        self.invalidate(e.touched.iter().map(|(k, _)| k.as_str()));
        report.applied.push(AppliedChange {
            hash: e.hash,
            keys: e.touched.iter().map(|(k, _)| k.clone()).collect(),
        });
    }

    /// Hashes that pending changes depend on and that are neither applied nor
    /// pending: what the store should fetch.
    pub fn missing_deps(&self) -> Vec<ChangeHash> {
        let mut missing: Vec<ChangeHash> = self
            .pending
            .values()
            .flat_map(|c| c.deps().iter().copied())
            .filter(|d| !self.index.applied.contains(d) && !self.pending.contains_key(d))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        missing
    }

    /// Hashes of changes held back until their dependencies arrive.
    pub fn pending(&self) -> Vec<ChangeHash> {
        let mut v: Vec<ChangeHash> = self.pending.keys().copied().collect();
        v.sort_unstable();
        v
    }
}

/// Builds the stored body: everything but `resourceType`, `id` and the derived
/// `meta.versionId`/`meta.lastUpdated`; checks that it holds no `null`.
fn stored_body(key: &str, resource: &Map<String, Value>) -> Result<Map<String, Value>> {
    let mut body = Map::with_capacity(resource.len());
    for (k, v) in resource {
        match k.as_str() {
            "resourceType" | "id" => {}
            "meta" => {
                let meta = v.as_object().ok_or(Error::InvalidResource {
                    key: key.to_owned(),
                    reason: "meta is not an object",
                })?;
                let kept: Map<String, Value> = meta
                    .iter()
                    .filter(|(mk, _)| *mk != "versionId" && *mk != "lastUpdated")
                    .map(|(mk, mv)| (mk.clone(), mv.clone()))
                    .collect();
                if !kept.is_empty() {
                    body.insert(k.clone(), Value::Object(kept));
                }
            }
            _ => {
                body.insert(k.clone(), v.clone());
            }
        }
    }
    for v in body.values() {
        value::validate(v, false).map_err(|reason| Error::InvalidResource {
            key: key.to_owned(),
            reason,
        })?;
    }
    Ok(body)
}

/// Puts `resourceType`, `id` and `meta` (derived version fields first) before the
/// stored elements.
fn assemble(rtype: &str, id: &str, version: &VersionRef, body: Map<String, Value>) -> Value {
    let mut out = Map::with_capacity(body.len() + 3);
    out.insert("resourceType".into(), Value::String(rtype.to_owned()));
    out.insert("id".into(), Value::String(id.to_owned()));
    let mut meta = Map::new();
    meta.insert("versionId".into(), Value::String(version_id(&version.hash)));
    meta.insert("lastUpdated".into(), Value::String(format_instant(version.time)));
    let mut rest = Map::with_capacity(body.len());
    for (k, v) in body {
        match (k.as_str(), v) {
            ("meta", Value::Object(stored)) => {
                for (mk, mv) in stored {
                    if mk != "versionId" && mk != "lastUpdated" {
                        meta.insert(mk, mv);
                    }
                }
            }
            ("resourceType" | "id", _) => {}
            (_, v) => {
                rest.insert(k, v);
            }
        }
    }
    out.insert("meta".into(), Value::Object(meta));
    out.extend(rest);
    Value::Object(out)
}

/// Orders changes causally (Kahn). Returns the changes whose dependencies are all in
/// `applied` or earlier in the order, and the rest (blocked on missing dependencies).
fn topo_order(changes: Vec<Change>, applied: &HashSet<ChangeHash>) -> (Vec<Change>, Vec<Change>) {
    let mut by_hash: HashMap<ChangeHash, Change> = HashMap::with_capacity(changes.len());
    for c in changes {
        by_hash.entry(c.hash()).or_insert(c);
    }
    let mut waiting: HashMap<ChangeHash, usize> = HashMap::new();
    let mut dependents: HashMap<ChangeHash, Vec<ChangeHash>> = HashMap::new();
    let mut queue: VecDeque<ChangeHash> = VecDeque::new();
    let mut hashes: Vec<ChangeHash> = by_hash.keys().copied().collect();
    // Sorted so the order (and thus which of two bad changes is reported) is reproducible.
    hashes.sort_unstable();
    for h in &hashes {
        let Some(c) = by_hash.get(h) else { continue };
        let mut n = 0;
        let mut deps: Vec<ChangeHash> = c.deps().to_vec();
        deps.sort_unstable();
        deps.dedup();
        for d in deps {
            if applied.contains(&d) {
                continue;
            }
            n += 1;
            if by_hash.contains_key(&d) {
                dependents.entry(d).or_default().push(*h);
            }
        }
        if n == 0 {
            queue.push_back(*h);
        } else {
            waiting.insert(*h, n);
        }
    }
    let mut ordered = Vec::with_capacity(by_hash.len());
    while let Some(h) = queue.pop_front() {
        if let Some(ds) = dependents.remove(&h) {
            for d in ds {
                if let Entry::Occupied(mut e) = waiting.entry(d) {
                    *e.get_mut() -= 1;
                    if *e.get() == 0 {
                        e.remove();
                        queue.push_back(d);
                    }
                }
            }
        }
        if let Some(c) = by_hash.remove(&h) {
            ordered.push(c);
        }
    }
    (ordered, by_hash.into_values().collect())
}
