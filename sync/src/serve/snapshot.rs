//! Answering a snapshot request: the transfer of (patient, collection) to a
//! peer that may receive that collection now, every covered envelope
//! audited before the answer leaves.

use medmesh_crypto::{Collection, PatientId, Timestamp};
use tracing::debug;

use super::{Disclosures, Served, answer};
use crate::Result;
use crate::backend::{Backend, ItemId, ItemKind, ItemMeta};
use crate::wire::{Response, SnapshotPayload};
use medmesh_node::policy::Requester;

/// Answers a snapshot request: the transfer of (patient, collection) if the
/// backend has one and the peer may receive that collection's envelopes
/// now (the decision depends only on patient and collection); every
/// envelope it covers is audited as disclosed before the answer leaves.
pub(crate) async fn snapshot<B: Backend>(
    backend: &B,
    peer: Requester,
    patient: PatientId,
    collection: Collection,
    now: Timestamp,
) -> (Response, Served) {
    answer(
        snapshot_inner(backend, peer, patient, collection, now).await,
        &peer,
        "snapshot",
    )
}

async fn snapshot_inner<B: Backend>(
    backend: &B,
    peer: Requester,
    patient: PatientId,
    collection: Collection,
    now: Timestamp,
) -> Result<(Response, Served)> {
    let Some(transfer) = backend.snapshot_transfer(&patient, collection).await? else {
        return Ok((Response::Snapshot(None), Served::default()));
    };
    if !SnapshotPayload::fits(transfer.sealed_doc.len(), transfer.headers.len()) {
        debug!(%collection, "snapshot transfer too large for one answer; envelopes instead");
        return Ok((Response::Snapshot(None), Served::default()));
    }
    let mut d = Disclosures::new(backend, peer, now);
    let probe = envelope_probe(patient, collection);
    let decision = d.decide(&probe)?;
    if !decision.allowed() {
        debug!(peer = %peer.peer_id(), %collection, ?decision, "snapshot withheld");
        return Ok((Response::Snapshot(None), Served::default()));
    }
    for id in &transfer.ids {
        d.note(
            &ItemMeta {
                id: ItemId(id.0),
                ..probe.clone()
            },
            decision,
        );
    }
    d.record().await?;
    let served = Served {
        items: transfer.ids.len() as u64,
        bytes: (transfer.sealed_doc.len() + transfer.headers.len()) as u64,
    };
    Ok((
        Response::Snapshot(Some(SnapshotPayload {
            source: transfer.source,
            sealed_doc: transfer.sealed_doc.clone(),
            headers: transfer.headers.clone(),
            count: transfer.count,
        })),
        served,
    ))
}

/// A stand-in envelope of (patient, collection) for the filter, whose
/// decision on envelopes depends only on those two.
pub(super) fn envelope_probe(patient: PatientId, collection: Collection) -> ItemMeta {
    ItemMeta {
        kind: ItemKind::Envelope,
        id: ItemId([0; 32]),
        patient,
        collection: Some(collection),
        grant: None,
        principal: None,
    }
}
