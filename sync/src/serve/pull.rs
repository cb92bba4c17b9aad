//! Answering a pull: the items after the puller's cursor it may receive,
//! within the scan and byte budgets, with snapshot offers for a puller that
//! takes them.

use std::collections::HashMap;
use std::sync::Arc;

use medmesh_crypto::{Collection, EnvelopeId, PatientId, Timestamp};
use tracing::debug;

use super::{Disclosures, SCAN_BATCH, SCAN_BUDGET, Served, answer};
use crate::backend::{Backend, Cursor, Item, ItemKind, Transfer};
use crate::wire::{MAX_OFFERS_PER_PAGE, Offer, PAGE_BYTE_BUDGET, Response};
use crate::{Error, Result};
use medmesh_node::policy::Requester;

/// Answers a pull: items after the cursor (from 0 when the cursor names
/// another instance) that the peer may receive. For a puller that takes
/// `snapshots`, envelopes a snapshot transfer covers are left out and the
/// transfer is offered instead.
pub(crate) async fn pull<B: Backend>(
    backend: &B,
    peer: Requester,
    cursor: Cursor,
    limit: u32,
    snapshots: Option<&[[u8; 32]]>,
    now: Timestamp,
) -> (Response, Served) {
    answer(
        pull_inner(backend, peer, cursor, limit, snapshots, now).await,
        &peer,
        "pull",
    )
}

async fn pull_inner<B: Backend>(
    backend: &B,
    peer: Requester,
    cursor: Cursor,
    limit: u32,
    snapshots: Option<&[[u8; 32]]>,
    now: Timestamp,
) -> Result<(Response, Served)> {
    let instance = backend.instance_id();
    let mut pos = if cursor.instance == instance { cursor.seq } else { 0 };
    let start = pos;
    let limit = limit as usize;
    let mut d = Disclosures::new(backend, peer, now);
    let mut items: Vec<Item> = Vec::new();
    let mut bytes = 0usize;
    let mut scanned = 0usize;
    let mut more = true;
    let mut transfers: HashMap<(PatientId, Collection), Option<Arc<Transfer>>> = HashMap::new();
    let mut offers: Vec<Offer> = Vec::new();
    'scan: while items.len() < limit && bytes < PAGE_BYTE_BUDGET && scanned < SCAN_BUDGET {
        let batch = backend.scan_after(pos, SCAN_BATCH).await?;
        let end = batch.len() < SCAN_BATCH;
        for stored in batch {
            if stored.seq <= pos {
                return Err(Error::Backend("items_after returned an old sequence number".into()));
            }
            if items.len() >= limit || bytes >= PAGE_BYTE_BUDGET || scanned >= SCAN_BUDGET {
                break 'scan;
            }
            scanned += 1;
            pos = stored.seq;
            let decision = d.decide(&stored.meta)?;
            if !decision.allowed() {
                debug!(peer = %peer.peer_id(), item = %stored.meta.id, ?decision, "withheld");
                continue;
            }
            if let (Some(taking), ItemKind::Envelope, Some(collection)) =
                (snapshots, stored.meta.kind, stored.meta.collection)
            {
                let key = (stored.meta.patient, collection);
                let transfer = match transfers.get(&key) {
                    Some(t) => t.clone(),
                    None => {
                        let t = backend.snapshot_transfer(&key.0, collection).await?;
                        transfers.insert(key, t.clone());
                        t
                    }
                };
                // Offered only to a puller that holds none of the covered
                // envelopes from here, or took this transfer earlier in the
                // pull: one that already holds most gets the few it lacks.
                if let Some(t) = transfer.filter(|t| {
                    (start < t.first_seq || taking.contains(&t.source)) && t.ids.contains(&EnvelopeId(stored.meta.id.0))
                }) {
                    let offer = Offer {
                        patient: key.0,
                        collection,
                        source: t.source,
                    };
                    if offers.contains(&offer) {
                        continue;
                    }
                    if offers.len() < MAX_OFFERS_PER_PAGE {
                        offers.push(offer);
                        continue;
                    }
                }
            }
            if !backend.check(&stored).await? {
                continue;
            }
            d.note(&stored.meta, decision);
            bytes += stored.item.bytes.len();
            items.push(stored.item);
        }
        if end {
            more = false;
            break;
        }
    }
    d.record().await?;
    let served = Served {
        items: items.len() as u64,
        bytes: bytes as u64,
    };
    Ok((
        Response::Page {
            instance,
            next: pos,
            more,
            items,
            offers,
        },
        served,
    ))
}
