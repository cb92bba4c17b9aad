//! Saving and loading a [`RecordDoc`]: whole documents from peers
//! ([`SavedDoc`], every change checked) and local snapshots that carry the
//! change index (its compact encoding is here).

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;

use automerge::{ActorId, Automerge, Change, ChangeHash, LoadOptions, OnPartialLoad, ReadDoc};

use super::apply::topo_order;
use super::index::{Index, Overlay, VersionRef};
use super::{DecodedChange, GENESIS, RecordDoc, RenderCache, split_key};
use crate::records::error::{Error, Result};

/// Tag of [`RecordDoc::save_local`]'s output.
const LOCAL_TAG: &[u8] = b"medmesh/records/local-snapshot/v1";

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
}
