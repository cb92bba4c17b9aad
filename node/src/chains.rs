//! Which changes of each actor a node holds, per document, so that ingest
//! can tell whether an envelope's change is the next of its actor (issue 15:
//! one envelope with a far-ahead seq must not inflate a revocation cut).
//!
//! Kept in memory, built from the envelope index on first use of a document
//! and updated after each commit: an extra on-disk index would cost one more
//! sled key per write (docs/storage.md). A document whose envelopes are
//! removed (exclusion, quarantine) is forgotten and rebuilt on next use.

use std::collections::{BTreeSet, HashMap};

use medmesh_crypto::{ActorId, Collection, PatientId};

/// A (patient, collection) document.
pub(crate) type Doc = (PatientId, Collection);

/// The held seqs of one actor: `1..=contiguous`, plus any held beyond a gap
/// (only stores written before the rule, or a removal, leave such gaps).
#[derive(Default)]
struct Chain {
    contiguous: u64,
    beyond: BTreeSet<u64>,
}

impl Chain {
    fn insert(&mut self, seq: u64) {
        if seq == self.contiguous.saturating_add(1) {
            self.contiguous = seq;
            while self.beyond.remove(&self.contiguous.saturating_add(1)) {
                self.contiguous += 1;
            }
        } else if seq > self.contiguous {
            self.beyond.insert(seq);
        }
    }

    fn holds(&self, seq: u64) -> bool {
        (1..=self.contiguous).contains(&seq) || self.beyond.contains(&seq)
    }
}

/// The chains of the documents loaded so far.
#[derive(Default)]
pub(crate) struct Chains {
    docs: HashMap<Doc, HashMap<ActorId, Chain>>,
}

impl Chains {
    /// Whether `doc` was loaded (its chains reflect every committed envelope).
    pub(crate) fn is_loaded(&self, doc: &Doc) -> bool {
        self.docs.contains_key(doc)
    }

    /// Loads `doc` from the (actor, seq) of every envelope held for it.
    pub(crate) fn load(&mut self, doc: Doc, held: impl IntoIterator<Item = (ActorId, u64)>) {
        let mut chains: HashMap<ActorId, Chain> = HashMap::new();
        let mut held: Vec<(ActorId, u64)> = held.into_iter().collect();
        held.sort_unstable();
        for (actor, seq) in held {
            chains.entry(actor).or_default().insert(seq);
        }
        self.docs.insert(doc, chains);
    }

    /// Whether change `seq` of `actor` is held; `None` when `doc` is not loaded.
    pub(crate) fn holds(&self, doc: &Doc, actor: &ActorId, seq: u64) -> Option<bool> {
        let chains = self.docs.get(doc)?;
        Some(chains.get(actor).is_some_and(|c| c.holds(seq)))
    }

    /// Notes a committed envelope; nothing when `doc` is not loaded (its
    /// load will read it from the store).
    pub(crate) fn insert(&mut self, doc: &Doc, actor: ActorId, seq: u64) {
        if let Some(chains) = self.docs.get_mut(doc) {
            chains.entry(actor).or_default().insert(seq);
        }
    }

    /// Forgets `doc` after envelopes of it were removed.
    pub(crate) fn forget(&mut self, doc: &Doc) {
        self.docs.remove(doc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_grows_through_filled_gaps() {
        let mut c = Chain::default();
        for seq in [1, 2, 4, 5, 1 << 62] {
            c.insert(seq);
        }
        assert_eq!(c.contiguous, 2);
        assert!(c.holds(4) && !c.holds(3) && !c.holds(0));
        c.insert(3);
        assert_eq!(c.contiguous, 5);
        assert!(c.holds(1 << 62));
    }
}
