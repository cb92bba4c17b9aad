//! Snapshot transfers (docs/protocol.md §8a): asked for, restored and ingested.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use libp2p::PeerId;
use medmesh_crypto::{Collection, EnvelopeId, PatientId};

use crate::backend::Backend;
use crate::client::{Client, Link, unexpected};
use crate::metrics::Metrics;
use crate::wire::{Request, Response};
use crate::{Result, SyncReport};

/// Whose transfer: one at a time per key.
pub(crate) type TransferKey = (PeerId, PatientId, Collection);

#[derive(Default)]
pub(crate) struct Transfers {
    pub(crate) locks: Mutex<HashMap<TransferKey, Arc<tokio::sync::Mutex<()>>>>,
    pub(crate) restored: Mutex<HashSet<(PeerId, [u8; 32])>>,
}

/// How a snapshot transfer went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TransferOutcome {
    /// Every covered envelope was restored and ingested (or this transfer
    /// was restored before).
    Complete,
    /// Some headers did not restore: their envelopes must be fetched.
    Partial,
    /// The peer had none to give, or this node cannot restore one.
    Unavailable,
}

/// Why a snapshot transfer is asked for.
#[derive(Clone, Copy)]
pub(crate) enum TransferFor<'a> {
    /// A page offered the transfer with this source: skipped when it was
    /// restored already.
    Offer([u8; 32]),
    /// Reconciliation misses envelopes of these: skipped when, by the time
    /// it runs, fewer than `snapshot_min` are still missing.
    Missing(&'a [EnvelopeId]),
}

/// Asks `peer` for the snapshot transfer of (patient, collection), rebuilds
/// the envelopes and ingests them like any envelopes.
pub(crate) async fn transfer<B: Backend, L: Link>(
    client: &Client<B, L>,
    peer: PeerId,
    patient: PatientId,
    collection: Collection,
    why: TransferFor<'_>,
) -> Result<(SyncReport, TransferOutcome)> {
    let mut report = SyncReport::default();
    let lock = client
        .transfers
        .locks
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry((peer, patient, collection))
        .or_default()
        .clone();
    let _one_at_a_time = lock.lock().await;
    let restored_before = |source: [u8; 32]| {
        client
            .transfers
            .restored
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&(peer, source))
    };
    // Another transfer (by a pull and a reconciliation running side by
    // side) may have delivered what this one is for.
    let done = match why {
        TransferFor::Offer(source) => restored_before(source),
        TransferFor::Missing(ids) => {
            let held: HashSet<EnvelopeId> = client.backend.envelope_ids(&patient, collection)?.into_iter().collect();
            ids.iter().filter(|id| !held.contains(id)).count() < client.snapshot_min
        }
    };
    if done {
        return Ok((report, TransferOutcome::Complete));
    }
    let payload = match client.request(peer, Request::Snapshot { patient, collection }).await? {
        Response::Snapshot(Some(p)) => p,
        Response::Snapshot(None) => return Ok((report, TransferOutcome::Unavailable)),
        other => return Err(unexpected(peer, "snapshot", &other)),
    };
    report.pages += 1;
    Metrics::add(&client.metrics.items_received, u64::from(payload.count));
    Metrics::add(
        &client.metrics.bytes_received,
        (payload.sealed_doc.len() + payload.headers.len()) as u64,
    );
    if restored_before(payload.source) {
        return Ok((report, TransferOutcome::Complete));
    }
    let source = payload.source;
    let room = client.pending_room(peer)?;
    let Some(done) = client
        .backend
        .restore_and_ingest(peer, patient, collection, payload, room)
        .await?
    else {
        return Ok((report, TransferOutcome::Unavailable));
    };
    client.note_ingested(peer, &done.report);
    report.received += done.restored;
    report.ingest.add(done.report);
    if done.unrestored > 0 {
        return Ok((report, TransferOutcome::Partial));
    }
    client
        .transfers
        .restored
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert((peer, source));
    Ok((report, TransferOutcome::Complete))
}
