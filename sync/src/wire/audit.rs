//! Audit entries on the wire (accounting of disclosures): their encoding,
//! their decoding against the caps, and the wire numbers of actor kinds
//! and action names.

use ciborium::Value;
use medmesh_crypto::GrantId;
use medmesh_node::audit::{Action, ActorKind, AuditEntry};
use medmesh_node::item::ItemId;

use super::cbor::{Fields, bytes, fixed_of, uint, wire};
use super::{MAX_AUDIT_ACTOR_ID_LEN, MAX_AUDIT_ITEMS_PER_ENTRY, MAX_AUDIT_OUTCOME_LEN};
use crate::Result;

/// The wire number of an actor kind (as in the node's audit log).
fn actor_kind_wire(kind: ActorKind) -> u64 {
    match kind {
        ActorKind::LocalApp => 0,
        ActorKind::Peer => 1,
        ActorKind::Patient => 2,
        ActorKind::Node => 3,
    }
}

pub(super) const ACTOR_KINDS: [ActorKind; 4] = [
    ActorKind::LocalApp,
    ActorKind::Peer,
    ActorKind::Patient,
    ActorKind::Node,
];

/// Every action, for decoding its name (a test checks the list is complete).
pub(super) const ACTIONS: [Action; 10] = [
    Action::Read,
    Action::Write,
    Action::Receive,
    Action::Disclose,
    Action::Grant,
    Action::Revoke,
    Action::KeyShare,
    Action::Reject,
    Action::Exclude,
    Action::Quarantine,
];

pub(super) fn audit_entry_value(e: &AuditEntry) -> Value {
    Value::Array(vec![
        uint(e.seq),
        uint(e.time),
        uint(actor_kind_wire(e.actor_kind)),
        Value::Text(e.actor_id.clone()),
        Value::Text(e.action.as_str().into()),
        uint(e.item_count),
        Value::Array(e.items.iter().map(|i| bytes(&i.0)).collect()),
        e.grant.map_or(Value::Null, |g| bytes(&g.0)),
        Value::Text(e.outcome.clone()),
        bytes(&e.prev_hash),
        bytes(&e.hash),
    ])
}

/// An upper bound of `e`'s encoded size in an Audit answer, for a server's
/// page byte budget.
pub fn audit_entry_size_bound(e: &AuditEntry) -> usize {
    // 11 fields: heads of at most 9 bytes each, the items' 35-byte
    // encodings, the texts, the grant and both hashes.
    11 * 9 + e.items.len() * 35 + e.actor_id.len() + e.outcome.len() + 16 + 2 * 34 + 16
}

pub(super) fn decode_audit_entry(value: Value) -> Result<AuditEntry> {
    const M: &str = "audit";
    let mut f = Fields::nested(M, value, 11)?;
    let seq = f.uint()?;
    let time = f.uint()?;
    let kind = f.uint()?;
    let actor_kind = ACTOR_KINDS
        .into_iter()
        .find(|k| actor_kind_wire(*k) == kind)
        .ok_or_else(|| wire(M, "unknown actor kind"))?;
    let actor_id = f.text(MAX_AUDIT_ACTOR_ID_LEN)?;
    let action_name = f.text(16)?;
    let action = ACTIONS
        .into_iter()
        .find(|a| a.as_str() == action_name)
        .ok_or_else(|| wire(M, "unknown action"))?;
    let item_count = f.uint()?;
    let items = f
        .array(MAX_AUDIT_ITEMS_PER_ENTRY)?
        .into_iter()
        .map(|v| fixed_of::<32>(M, v).map(ItemId))
        .collect::<Result<Vec<_>>>()?;
    let expected = usize::try_from(item_count).map_or(MAX_AUDIT_ITEMS_PER_ENTRY, |n| n.min(MAX_AUDIT_ITEMS_PER_ENTRY));
    if items.len() != expected {
        return Err(wire(M, "item list does not match the item count"));
    }
    let grant = match f.next()? {
        Value::Null => None,
        v => Some(GrantId(fixed_of::<16>(M, v)?)),
    };
    let outcome = f.text(MAX_AUDIT_OUTCOME_LEN)?;
    Ok(AuditEntry {
        seq,
        time,
        actor_kind,
        actor_id,
        action,
        // The query named the patient; the answer does not repeat it.
        patient: None,
        item_count,
        items,
        grant,
        outcome,
        prev_hash: f.fixed()?,
        hash: f.fixed()?,
    })
}
