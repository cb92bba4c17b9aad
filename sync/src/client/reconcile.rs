//! Per-patient reconciliation: summaries compared, missing envelopes fetched.

use std::collections::HashSet;

use libp2p::PeerId;
use medmesh_crypto::{Collection, EnvelopeId, PatientId};
use tracing::debug;

use crate::backend::Backend;
use crate::client::transfer::{TransferFor, transfer};
use crate::client::{Client, Link, unexpected};
use crate::metrics::Metrics;
use crate::wire::{MAX_FETCH_IDS, Request, Response, summary_digest};
use crate::{Error, Result, SyncReport};

/// Reconciles one patient with `peer`: learns its consent items and the
/// envelope ids it may send, fetches the missing ones. Counted in
/// [`crate::Status`] (run, failed).
pub(crate) async fn reconcile<B: Backend, L: Link>(
    client: &Client<B, L>,
    peer: PeerId,
    patient: PatientId,
) -> Result<SyncReport> {
    Metrics::add(&client.metrics.reconciliations, 1);
    let result = reconcile_once(client, peer, patient).await;
    if result.is_err() {
        Metrics::add(&client.metrics.reconciliations_failed, 1);
    }
    result
}

pub(crate) async fn reconcile_once<B: Backend, L: Link>(
    client: &Client<B, L>,
    peer: PeerId,
    patient: PatientId,
) -> Result<SyncReport> {
    let mut report = SyncReport::default();
    // Digests of what is held, so collections already in step cost no ids.
    let mut digests = Vec::new();
    for collection in Collection::ALL {
        let ids = client.backend.envelope_ids(&patient, collection)?;
        if !ids.is_empty() {
            digests.push((collection, summary_digest(&ids)));
        }
    }
    let (consent, collections) = match client.request(peer, Request::Summary { patient, digests }).await? {
        Response::Summary { consent, collections } => (consent, collections),
        other => return Err(unexpected(peer, "summary", &other)),
    };
    report.pages += 1;
    report.received += consent.len() as u64;
    report.ingest.add(client.ingest(peer, consent).await?);
    let held = |collections: &HashSet<medmesh_crypto::Collection>| -> Result<HashSet<medmesh_crypto::EnvelopeId>> {
        let mut local = HashSet::new();
        for collection in collections {
            local.extend(client.backend.envelope_ids(&patient, *collection)?);
        }
        Ok(local)
    };
    let wanted: HashSet<medmesh_crypto::Collection> = collections.iter().map(|(c, _)| *c).collect();
    let mut local = held(&wanted)?;
    // What the peer listed and this node lacks, kept before fetching: a
    // crash or a cut connection from here on leaves the record known
    // incomplete until a later reconciliation closes the check.
    let note = |local: &HashSet<EnvelopeId>| -> Result<()> {
        for (collection, ids) in &collections {
            let lacking: Vec<EnvelopeId> = ids.iter().filter(|id| !local.contains(id)).copied().collect();
            client
                .backend
                .note_reconciled(&peer, &patient, *collection, ids.len() as u64, &lacking)?;
        }
        Ok(())
    };
    note(&local)?;
    if client.snapshot_min > 0 {
        let mut took_snapshot = false;
        for (collection, ids) in &collections {
            let missing = ids.iter().filter(|id| !local.contains(id)).count();
            if missing >= client.snapshot_min {
                match transfer(client, peer, patient, *collection, TransferFor::Missing(ids)).await {
                    Ok((r, outcome)) => {
                        debug!(%peer, %collection, ?outcome, "snapshot transfer while reconciling");
                        report.add(r);
                        took_snapshot = true;
                    }
                    Err(e) => debug!(%peer, %collection, cause = %e, "snapshot transfer failed; fetching envelopes"),
                }
            }
        }
        if took_snapshot {
            local = held(&wanted)?;
        }
    }
    // In the order the peer listed them (each actor's changes by ascending
    // seq, `Backend::envelope_ids`), so that fetched changes follow their
    // predecessors instead of waiting for seq gaps.
    let mut missing = Vec::new();
    let mut listed = HashSet::new();
    for (_, ids) in &collections {
        missing.extend(
            ids.iter()
                .filter(|id| !local.contains(id) && listed.insert(**id))
                .copied(),
        );
    }
    for chunk in missing.chunks(MAX_FETCH_IDS) {
        // A pull running beside this reconciliation (a new grant starts both)
        // may have delivered part of the chunk meanwhile: ask only for the rest.
        let local = if chunk.len() < missing.len() {
            held(&wanted)?
        } else {
            local.clone()
        };
        let chunk: Vec<medmesh_crypto::EnvelopeId> = chunk.iter().filter(|id| !local.contains(id)).copied().collect();
        if chunk.is_empty() {
            continue;
        }
        let items = match client.request(peer, Request::Fetch { ids: chunk.clone() }).await? {
            Response::Fetched { items } => items,
            other => return Err(unexpected(peer, "fetch", &other)),
        };
        if items.len() > chunk.len() {
            return Err(Error::Wire {
                message: "fetched",
                reason: "more envelopes than asked for",
            });
        }
        report.pages += 1;
        report.received += items.len() as u64;
        report.ingest.add(client.ingest(peer, items).await?);
    }
    note(&held(&wanted)?)?;
    Ok(report)
}
