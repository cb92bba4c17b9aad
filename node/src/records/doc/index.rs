//! The change index of a [`RecordDoc`](super::RecordDoc): which objects belong
//! to which resource and which changes touched each resource (for
//! `versionId`, history and vread), and [`Index::analyse`], the check of a
//! change against the record model before Automerge sees it.

use std::collections::{HashMap, HashSet};
use std::panic::{AssertUnwindSafe, catch_unwind};

use automerge::legacy;
use automerge::{ActorId, Change, ChangeHash, ObjType, ScalarValue};

use super::{GENESIS_ACTOR, split_key};
use crate::records::error::Result;
use crate::records::value;

/// The history of one resource key, as change references.
#[derive(Debug, Clone)]
pub(super) struct VersionRef {
    pub(super) hash: ChangeHash,
    pub(super) start_op: u64,
    pub(super) actor: u32,
    pub(super) time: i64,
    pub(super) deleted: bool,
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
pub(super) struct Effects {
    pub(super) hash: ChangeHash,
    actor: ActorId,
    seq: u64,
    start_op: u64,
    time: i64,
    /// Touched keys, with whether the change tombstoned them. Sorted, unique.
    pub(super) touched: Vec<(String, bool)>,
    /// Objects the change creates (op counter) and the resource each belongs to
    /// (index into `touched`).
    created: Vec<(u64, usize)>,
}

/// Objects and sequence numbers of changes accepted in a batch but not yet applied
/// (interned like [`Index`], so checking a large batch allocates little).
#[derive(Default)]
pub(super) struct Overlay {
    actor_ids: HashMap<ActorId, u32>,
    keys: Vec<String>,
    key_ids: HashMap<String, u32>,
    owners: HashMap<(u64, u32), u32>,
    max_seq: HashMap<u32, u64>,
}

impl Overlay {
    pub(super) fn add(&mut self, e: &Effects) {
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
pub(super) struct Index {
    pub(super) applied: HashSet<ChangeHash>,
    pub(super) actors: Vec<ActorId>,
    pub(super) actor_ids: HashMap<ActorId, u32>,
    pub(super) max_seq: Vec<u64>,
    pub(super) keys: Vec<String>,
    pub(super) key_ids: HashMap<String, u32>,
    pub(super) owners: HashMap<(u64, u32), u32>,
    pub(super) history: Vec<Vec<VersionRef>>,
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
    pub(super) fn analyse(&self, change: &Change, overlay: &Overlay) -> Result<Effects, &'static str> {
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
    pub(super) fn commit(&mut self, e: &Effects) {
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
