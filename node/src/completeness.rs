//! Whether a node holds all of a patient's record that its peers hold for
//! it (issue 16, DESIGN §9.9): per collection, from the last reconciliation
//! with each peer ([`SyncCheck`]), the pending queue, and whether a first
//! synchronisation is still owed. Said in holdings, in `/metrics` and to
//! apps (an OperationOutcome warning on searches over an incomplete record).
//!
//! The rule, on facts this node holds (docs/protocol.md §12):
//! - a collection is **awaiting its first sync** while practices granted it
//!   (in force) before this node was exist and no reconciliation with any of
//!   them has been noted (the first practice of a record owes nobody a sync;
//!   one with a later practice, which may hold nothing, does not count);
//! - a peer's check is **open** while ids it listed are neither held nor
//!   recorded rejected here (a check that lists more than it remembers stays
//!   open until the next reconciliation with that peer);
//! - changes in the pending queue (waiting for a grant, a key or an earlier
//!   change) are still arriving.
//!
//! A collection is complete when none of the three holds.

use medmesh_crypto::Collection;
use serde::{Deserialize, Serialize};

use crate::records::format_instant;
use crate::store::SyncCheck;

/// What one peer's last reconciliation found for a collection.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct SourceCheck {
    /// The peer (PeerId, base58).
    pub peer: String,
    /// When the reconciliation ended (ms since the Unix epoch).
    pub checked_at: u64,
    /// Envelopes the peer listed (when it held exactly what this node holds:
    /// that count).
    pub listed: u64,
    /// Of those, still not held here now.
    pub missing: u64,
}

/// Whether this node holds one collection of a patient's record complete.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct CollectionCompleteness {
    /// The collection (by name in JSON).
    #[serde(with = "collection_name")]
    pub collection: Collection,
    /// Nothing is known to be still arriving.
    pub complete: bool,
    /// Practices granted this collection before this node hold it, and no
    /// reconciliation with any of them has been noted yet.
    pub awaiting_first_sync: bool,
    /// Changes received that wait in the pending queue.
    pub pending: u64,
    /// The last check with each peer, newest first.
    pub sources: Vec<SourceCheck>,
}

impl CollectionCompleteness {
    /// Judges one collection. `checks` are this collection's; `still_missing`
    /// tells how many of a check's lacking ids are still lacking now;
    /// `earlier_holders` are the practices (PeerId bytes) whose grant in
    /// force covering it predates this node's.
    pub(crate) fn judge(
        collection: Collection,
        checks: &[SyncCheck],
        still_missing: impl Fn(&SyncCheck) -> u64,
        pending: u64,
        earlier_holders: &[Vec<u8>],
        peer_name: impl Fn(&[u8]) -> String,
    ) -> Self {
        let awaiting_first_sync =
            !earlier_holders.is_empty() && !checks.iter().any(|c| earlier_holders.contains(&c.peer));
        let mut sources: Vec<SourceCheck> = checks
            .iter()
            .map(|c| SourceCheck {
                peer: peer_name(&c.peer),
                checked_at: c.at,
                listed: c.listed,
                missing: if c.missing == 0 { 0 } else { still_missing(c) },
            })
            .collect();
        sources.sort_by(|a, b| b.checked_at.cmp(&a.checked_at).then_with(|| a.peer.cmp(&b.peer)));
        let complete = !awaiting_first_sync && pending == 0 && sources.iter().all(|s| s.missing == 0);
        Self {
            collection,
            complete,
            awaiting_first_sync,
            pending,
            sources,
        }
    }

    /// One sentence for an app: what is still arriving; `None` when complete.
    pub fn warning(&self) -> Option<String> {
        if self.complete {
            return None;
        }
        let mut parts = Vec::new();
        if self.awaiting_first_sync {
            parts.push("not yet synchronised with the practices that hold it".to_owned());
        }
        for s in self.sources.iter().filter(|s| s.missing > 0) {
            parts.push(format!(
                "{} change(s) still to arrive from practice {} (it listed them at {})",
                s.missing,
                s.peer,
                format_instant(i64::try_from(s.checked_at).unwrap_or(i64::MAX))
            ));
        }
        if self.pending > 0 {
            parts.push(format!(
                "{} change(s) received and waiting for a grant, key or earlier change",
                self.pending
            ));
        }
        Some(format!(
            "this patient's {} record is incomplete at this node: {}",
            self.collection,
            parts.join("; ")
        ))
    }
}

/// A collection as its name in JSON.
mod collection_name {
    use medmesh_crypto::Collection;
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(c: &Collection, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(c.as_str())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Collection, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use medmesh_crypto::{EnvelopeId, SecretIdentity};

    use super::*;

    fn check(missing: u64, ids: usize, at: u64) -> SyncCheck {
        SyncCheck {
            patient: SecretIdentity::from_seed(&[1; 32]).patient_id(),
            collection: Collection::Labs,
            peer: vec![7; 4],
            at,
            listed: 10,
            missing,
            missing_ids: (0..ids).map(|i| EnvelopeId([u8::try_from(i).unwrap(); 32])).collect(),
        }
    }

    fn name(p: &[u8]) -> String {
        format!("{p:?}")
    }

    #[test]
    fn the_first_practice_owes_nobody_a_sync() {
        let c = CollectionCompleteness::judge(Collection::Labs, &[], |_| 0, 0, &[], name);
        assert!(c.complete && !c.awaiting_first_sync && c.warning().is_none());
    }

    #[test]
    fn a_later_practice_waits_for_its_first_sync_with_an_earlier_one() {
        let earlier = [vec![7; 4]];
        let c = CollectionCompleteness::judge(Collection::Labs, &[], |_| 0, 0, &earlier, name);
        assert!(!c.complete && c.awaiting_first_sync);
        assert!(c.warning().unwrap().contains("not yet synchronised"));
        // A check with a practice granted after this one does not count.
        let mut later = check(0, 0, 5);
        later.peer = vec![9; 4];
        let c = CollectionCompleteness::judge(Collection::Labs, &[later], |_| 0, 0, &earlier, name);
        assert!(!c.complete && c.awaiting_first_sync);
        let c = CollectionCompleteness::judge(Collection::Labs, &[check(0, 0, 5)], |_| 0, 0, &earlier, name);
        assert!(c.complete, "{c:?}");
    }

    #[test]
    fn an_open_check_or_a_pending_change_keeps_it_incomplete() {
        let open = CollectionCompleteness::judge(Collection::Labs, &[check(3, 3, 5)], |_| 2, 0, &[], name);
        assert!(!open.complete && !open.awaiting_first_sync);
        assert!(
            open.warning().unwrap().contains("2 change(s) still to arrive"),
            "{open:?}"
        );
        let closed = CollectionCompleteness::judge(Collection::Labs, &[check(3, 3, 5)], |_| 0, 0, &[], name);
        assert!(closed.complete, "{closed:?}");
        let pending = CollectionCompleteness::judge(Collection::Labs, &[check(0, 0, 5)], |_| 0, 4, &[], name);
        assert!(!pending.complete);
        assert!(pending.warning().unwrap().contains("4 change(s) received and waiting"));
    }
}
