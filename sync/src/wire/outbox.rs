//! Outbox reports: what a node still owes others of a patient's consent
//! items ([`OutboxReport`], [`OwedItem`]) and the decoding of one debt.

use ciborium::Value;
use medmesh_node::item::ItemId;

use super::cbor::{Fields, wire};
use super::{MAX_OUTBOX_ERROR_LEN, MAX_PEER_ID_LEN};
use crate::Result;

/// One consent item a node owes a peer, as an outbox report shows it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct OwedItem {
    /// The item owed.
    pub item: ItemId,
    /// The peer it is owed to.
    pub peer: libp2p::PeerId,
    /// When the debt arose (ms since the Unix epoch).
    pub since: u64,
    /// Deliveries tried and failed so far (0: the first is under way or due).
    pub attempts: u32,
    /// Not tried again before this time (ms since the Unix epoch).
    pub next_at: u64,
    /// Why the last try failed (at most [`MAX_OUTBOX_ERROR_LEN`] bytes;
    /// empty before the first failure).
    pub last_error: String,
}

/// What a node still owes others of one patient's consent items.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct OutboxReport {
    /// Items of the patient stored but not yet followed by the consent
    /// flows (the debts they make may not be listed yet): ask again.
    pub settling: bool,
    /// Every debt of the patient's items, per (item, peer).
    pub owed: Vec<OwedItem>,
    /// The patient's grants and revocations this node holds that it owes
    /// nobody any more: delivered, or never owed.
    pub held: Vec<ItemId>,
}

pub(super) fn decode_owed_item(value: Value) -> Result<OwedItem> {
    const M: &str = "outbox";
    let mut f = Fields::nested(M, value, 6)?;
    let item = ItemId(f.fixed()?);
    let peer = match f.next()? {
        Value::Bytes(b) if b.len() <= MAX_PEER_ID_LEN => {
            libp2p::PeerId::from_bytes(&b).map_err(|_| wire(M, "peer is not a PeerId"))?
        }
        _ => return Err(wire(M, "peer is not a short byte string")),
    };
    let since = f.uint()?;
    let attempts = u32::try_from(f.uint()?).map_err(|_| wire(M, "attempts out of range"))?;
    Ok(OwedItem {
        item,
        peer,
        since,
        attempts,
        next_at: f.uint()?,
        last_error: f.text(MAX_OUTBOX_ERROR_LEN)?,
    })
}
