//! What `medmesh patient audit` checks in what a node shows it (issue 15,
//! item 8): every entry it received hashes to what the node says and links
//! to its predecessor where they are adjacent; the entries end at a
//! checkpoint the node signed now; and that checkpoint extends the one the
//! patient kept from its previous query of that node (not a lower head, not
//! another hash at the kept seq). The patient sees only the entries about
//! them, so the links between them run through entries it cannot see: the
//! kept checkpoint is what ties one query to the next.

use medmesh_crypto::{AuditCheckpoint, PatientId};
use medmesh_node::AuditCheckpoints;
use medmesh_node::audit::entry_hash;
use medmesh_sync::AuditEntry;
use medmesh_sync::wire::{MAX_AUDIT_ACTOR_ID_LEN, MAX_AUDIT_OUTCOME_LEN};
use serde_json::{Value, json};

/// The verdict on one query.
#[derive(Debug)]
pub(crate) struct Verdict {
    /// `ok`, `unanchored` (the node signs no checkpoints, and none was kept),
    /// or the first problem's kind: `altered`, `truncated`, `regression`,
    /// `fork`, `unanchored-now` (the node signed checkpoints before and no
    /// longer does).
    pub(crate) status: &'static str,
    /// Every problem found, one sentence each.
    pub(crate) problems: Vec<String>,
    /// Entries whose hash was recomputed (the others were cut to fit the wire).
    pub(crate) verified: usize,
    /// The checkpoint to keep for next time (only when nothing is wrong).
    pub(crate) keep: Option<AuditCheckpoint>,
    /// The node's signed head, if it gave one.
    pub(crate) head: Option<(u64, [u8; 32])>,
}

impl Verdict {
    pub(crate) fn flagged(&self) -> bool {
        !self.problems.is_empty()
    }

    pub(crate) fn to_json(&self, kept: Option<&AuditCheckpoint>) -> Value {
        json!({
            "checkpoint": {
                "status": self.status,
                "problems": self.problems,
                "verified_entries": self.verified,
                "head_seq": self.head.map(|(s, _)| s),
                "head_hash": self.head.map(|(_, h)| hex::encode(h)),
                "kept_seq": kept.map(|c| c.terms().seq),
                "kept_hash": kept.map(|c| hex::encode(c.terms().head)),
            }
        })
    }
}

/// Whether an entry reached us whole (the server cuts item lists and long
/// texts to fit the wire; those cannot be rehashed).
fn whole(e: &AuditEntry) -> bool {
    e.item_count == e.items.len() as u64
        && e.actor_id.len() < MAX_AUDIT_ACTOR_ID_LEN.saturating_sub(4)
        && e.outcome.len() < MAX_AUDIT_OUTCOME_LEN.saturating_sub(4)
}

/// Checks `entries` (in seq order) against `checkpoints` (`None` when the
/// node signed none) and the checkpoint `kept` from the previous query.
pub(crate) fn check(
    patient: &PatientId,
    entries: &[AuditEntry],
    kept: Option<&AuditCheckpoint>,
    checkpoints: Option<AuditCheckpoints>,
) -> Verdict {
    let mut problems: Vec<(&'static str, String)> = Vec::new();
    let mut verified = 0;
    for e in entries.iter().filter(|e| whole(e)) {
        if entry_hash(e.seq, e.time, &e.record(Some(*patient)), &e.prev_hash) == e.hash {
            verified += 1;
        } else {
            problems.push((
                "altered",
                format!("entry #{} does not hash to what the node says: it was altered", e.seq),
            ));
        }
    }
    for w in entries.windows(2) {
        if w[1].seq == w[0].seq + 1 && w[1].prev_hash != w[0].hash {
            problems.push((
                "altered",
                format!("entry #{} does not link to entry #{}", w[1].seq, w[0].seq),
            ));
        }
    }
    let Some(cps) = checkpoints else {
        if let Some(k) = kept {
            problems.push((
                "unanchored-now",
                format!(
                    "the node signed your audit up to entry #{} before and signs no checkpoint now",
                    k.terms().seq
                ),
            ));
        }
        return Verdict {
            status: problems.first().map_or("unanchored", |(kind, _)| *kind),
            problems: problems.into_iter().map(|(_, p)| p).collect(),
            verified,
            keep: None,
            head: None,
        };
    };
    let head = *cps.head.terms();
    if let Some(last) = entries.last()
        && last.seq > head.seq
    {
        problems.push((
            "truncated",
            format!(
                "the node showed entry #{} but signs its log as ending at #{}",
                last.seq, head.seq
            ),
        ));
    }
    if let Some(e) = entries.iter().find(|e| e.seq == head.seq)
        && e.hash != head.head
    {
        problems.push((
            "altered",
            format!("entry #{} is not the one the node's signed head names", e.seq),
        ));
    }
    if let Some(k) = kept {
        let k = k.terms();
        if head.seq < k.seq {
            problems.push((
                "regression",
                format!(
                    "the node's log now ends at entry #{}, but it showed you entry #{} before: entries were removed",
                    head.seq, k.seq
                ),
            ));
        } else {
            match &cps.anchor {
                None => problems.push((
                    "truncated",
                    format!(
                        "the node can no longer show entry #{} that it signed for you before",
                        k.seq
                    ),
                )),
                Some(a) if a.terms().head != k.head => problems.push((
                    "fork",
                    format!(
                        "entry #{} now hashes to {}, but the node signed {} for you before: its log was rewritten",
                        k.seq,
                        hex::encode(a.terms().head),
                        hex::encode(k.head)
                    ),
                )),
                Some(_) => {}
            }
        }
    }
    if let Some(latest) = &cps.latest
        && latest.terms().seq > head.seq
    {
        problems.push((
            "truncated",
            format!(
                "the node signed a checkpoint at entry #{} but its log now ends at #{}: entries were removed",
                latest.terms().seq,
                head.seq
            ),
        ));
    }
    let status = problems.first().map_or("ok", |(kind, _)| *kind);
    let flagged = !problems.is_empty();
    Verdict {
        status,
        problems: problems.into_iter().map(|(_, p)| p).collect(),
        verified,
        keep: (!flagged).then_some(cps.head),
        head: Some((head.seq, head.head)),
    }
}
