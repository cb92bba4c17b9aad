//! Changes from peers: decoding them ([`DecodedChange`]), ordering them
//! causally, checking each against the record model and applying them in one
//! Automerge batch ([`RecordDoc::apply_changes`]), with pending changes held
//! until their dependencies arrive.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};

use automerge::{ActorId, Change, ChangeHash, ReadDoc};

use super::RecordDoc;
use super::index::{Effects, Overlay};
use crate::records::error::{Error, Result};

/// Ready changes from which [`RecordDoc::apply_changes`] applies and checks in
/// parallel (below it, the thread costs more than it saves).
const SPECULATE_MIN: usize = 64;

/// A change decoded from bytes (under `catch_unwind`), ready for
/// [`RecordDoc::apply_changes`].
#[derive(Debug, Clone)]
pub struct DecodedChange {
    pub(super) change: Change,
    pub(super) hash: ChangeHash,
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
    /// [`super::actor_belongs_to`](crate::records::actor_belongs_to)).
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

impl RecordDoc {
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

/// Orders changes causally (Kahn). Returns the changes whose dependencies are all in
/// `applied` or earlier in the order, and the rest (blocked on missing dependencies).
pub(super) fn topo_order(changes: Vec<Change>, applied: &HashSet<ChangeHash>) -> (Vec<Change>, Vec<Change>) {
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
