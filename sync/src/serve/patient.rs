//! The queries only a patient may make about itself: its audit entries,
//! checkpoints of the audit log, the outbox of its consent items, and the
//! address records of its practices. Anyone else is refused and learns
//! nothing.

use medmesh_crypto::PatientId;
use tracing::debug;

use super::{Served, answer};
use crate::backend::{Backend, ItemMeta};
use crate::wire::{
    MAX_AUDIT_ACTOR_ID_LEN, MAX_AUDIT_ENTRIES_PER_MESSAGE, MAX_AUDIT_ITEMS_PER_ENTRY, MAX_AUDIT_OUTCOME_LEN,
    MAX_OUTBOX_ERROR_LEN, MAX_OUTBOX_HELD, MAX_OUTBOX_OWED, OutboxReport, OwedItem, PAGE_BYTE_BUDGET, RefusalCode,
    Response,
};
use crate::{Error, Result};
use medmesh_node::audit::AuditEntry;
use medmesh_node::policy::Requester;

/// Answers a patient's audit query: the audit entries about `patient` after
/// `after`, only if the asker is that patient (its Noise identity is the
/// patient key); anyone else is refused and learns nothing, not even
/// whether the node knows the patient. The read is audited before the
/// answer leaves.
pub(crate) async fn audit<B: Backend>(
    backend: &B,
    peer: Requester,
    patient: PatientId,
    after: u64,
    limit: u32,
) -> (Response, Served) {
    if !peer.is_patient(&patient) {
        debug!(peer = %peer.peer_id(), "audit query refused: the asker is not the patient");
        return (Response::Refused(RefusalCode::NotPatient), Served::default());
    }
    answer(audit_inner(backend, patient, after, limit).await, &peer, "audit")
}

async fn audit_inner<B: Backend>(
    backend: &B,
    patient: PatientId,
    after: u64,
    limit: u32,
) -> Result<(Response, Served)> {
    let limit = (limit as usize).clamp(1, MAX_AUDIT_ENTRIES_PER_MESSAGE);
    // One more than asked, to know whether more follow.
    let fetched = backend.audit_entries(&patient, after, limit + 1).await?;
    let mut more = fetched.len() > limit;
    let mut entries: Vec<AuditEntry> = Vec::with_capacity(fetched.len().min(limit));
    let mut bytes = 0usize;
    let mut last = after;
    for entry in fetched.into_iter().take(limit) {
        if entry.seq <= last {
            return Err(Error::Backend("audit_entries returned an old sequence number".into()));
        }
        last = entry.seq;
        let entry = fit_to_wire(entry);
        if bytes >= PAGE_BYTE_BUDGET {
            more = true;
            break;
        }
        bytes += crate::wire::audit_entry_size_bound(&entry);
        entries.push(entry);
    }
    backend.record_audit_read(&patient).await?;
    Ok((Response::Audit { entries, more }, Served::default()))
}

/// Answers a patient's checkpoint query: checkpoints of this node's audit
/// log signed by its key, only to that patient (as [`audit`]).
pub(crate) async fn checkpoint<B: Backend>(
    backend: &B,
    peer: Requester,
    patient: PatientId,
    anchor: Option<u64>,
) -> (Response, Served) {
    if !peer.is_patient(&patient) {
        debug!(peer = %peer.peer_id(), "checkpoint query refused: the asker is not the patient");
        return (Response::Refused(RefusalCode::NotPatient), Served::default());
    }
    let result = backend.audit_checkpoints(anchor).await.and_then(|c| {
        c.map(|c| (Response::Checkpoint(Box::new(c)), Served::default()))
            .ok_or_else(|| Error::Backend("this store signs no audit checkpoints".into()))
    });
    answer(result, &peer, "checkpoint")
}

/// Answers a patient's outbox query: what this node still owes others of
/// the patient's consent items ([`outbox_report`]), only to that patient
/// (as [`audit`]). `settling` comes from the actor, which alone knows
/// whether stored items still wait for their consent flows.
pub(crate) fn outbox<B: Backend>(
    backend: &B,
    peer: Requester,
    patient: PatientId,
    settling: bool,
) -> (Response, Served) {
    if !peer.is_patient(&patient) {
        debug!(peer = %peer.peer_id(), "outbox query refused: the asker is not the patient");
        return (Response::Refused(RefusalCode::NotPatient), Served::default());
    }
    let result = outbox_report(backend, &patient, settling).map(|r| (Response::Outbox(Box::new(r)), Served::default()));
    answer(result, &peer, "outbox")
}

/// Answers a patient's `Practices` request: the signed address records
/// kept of the practices its grants name (none to anyone else).
pub(crate) fn practices<B: Backend>(backend: &B, peer: Requester, patient: PatientId) -> (Response, Served) {
    if !peer.is_patient(&patient) {
        debug!(peer = %peer.peer_id(), "practices query refused: the asker is not the patient");
        return (Response::Refused(RefusalCode::NotPatient), Served::default());
    }
    let result = (|| -> Result<(Response, Served)> {
        let grantees: Vec<libp2p::PeerId> = backend
            .consent(&patient)?
            .grants
            .iter()
            .map(|g| g.terms().grantee.peer_id())
            .collect();
        let mut records = backend.address_records(Some(&grantees))?;
        records.truncate(crate::wire::MAX_PRACTICE_RECORDS);
        Ok((Response::Practices { records }, Served::default()))
    })();
    answer(result, &peer, "practices")
}

/// What this node owes others of `patient`'s consent items, per (item,
/// peer), oldest first, within the wire caps; and the patient's grants and
/// revocations it holds that it owes nobody.
///
/// # Errors
/// Storage failures.
pub(crate) fn outbox_report<B: Backend>(backend: &B, patient: &PatientId, settling: bool) -> Result<OutboxReport> {
    let mut owed: Vec<OwedItem> = backend
        .outbox()?
        .into_iter()
        .filter(|o| o.patient == *patient)
        .map(|o| {
            let mut last_error = o.last_error;
            truncate_text(&mut last_error, MAX_OUTBOX_ERROR_LEN);
            OwedItem {
                item: o.item,
                peer: o.peer,
                since: o.since,
                attempts: o.attempts,
                next_at: o.next_at,
                last_error,
            }
        })
        .collect();
    owed.sort_by_key(|o| (o.since, o.peer, o.item));
    owed.truncate(MAX_OUTBOX_OWED);
    let view = backend.consent(patient)?;
    let held = view
        .grants
        .iter()
        .map(|g| ItemMeta::of_grant(g).id)
        .chain(view.revocations.iter().map(|r| ItemMeta::of_revocation(r).id))
        .filter(|id| !owed.iter().any(|o| o.item == *id))
        .take(MAX_OUTBOX_HELD)
        .collect();
    Ok(OutboxReport { settling, owed, held })
}

/// Brings a stored entry within the wire caps: at most
/// [`MAX_AUDIT_ITEMS_PER_ENTRY`] item ids (the count stays whole) and texts
/// cut at their caps. The node writes none that large; this keeps one odd
/// entry from making the whole audit unanswerable.
fn fit_to_wire(mut entry: AuditEntry) -> AuditEntry {
    entry.item_count = entry.item_count.max(entry.items.len() as u64);
    entry.items.truncate(MAX_AUDIT_ITEMS_PER_ENTRY);
    truncate_text(&mut entry.actor_id, MAX_AUDIT_ACTOR_ID_LEN);
    truncate_text(&mut entry.outcome, MAX_AUDIT_OUTCOME_LEN);
    entry
}

fn truncate_text(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}
