//! Anti-entropy (docs/protocol.md §8): all shared patients compared in one digest request.

use libp2p::PeerId;
use medmesh_crypto::{PatientId, PracticeId, now};
use tracing::debug;

use crate::backend::Backend;
use crate::client::reconcile::reconcile;
use crate::client::{Client, Link, unexpected};
use crate::serve::{self};
use crate::wire::{MAX_DIGEST_PATIENTS, Request, Response, patient_digest};
use crate::{Error, Result, SyncReport};
use medmesh_node::policy::Requester;

/// Most patients one anti-entropy round reconciles with one peer.
pub(crate) const ANTI_ENTROPY_PATIENTS: usize = 1024;

/// Reconciles with `peer` every patient both may read: a page lost, a
/// transfer cut by a restart, a nudge missed, items refused by a full
/// queue — whatever left a gap is found and fetched without a new grant.
/// One [`Request::Digests`] compares them all at once; only the patients
/// that differ are reconciled one by one ([`reconcile()`]), and those in
/// step get their sync checks noted as a reconciliation would. A peer that
/// does not answer the digests (one that predates them) gets every patient
/// reconciled one by one. Stops at the first failure (the peer left).
pub(crate) async fn anti_entropy<B: Backend, L: Link>(client: &Client<B, L>, peer: PeerId) -> Result<SyncReport> {
    let patients: Vec<PatientId> = client
        .backend
        .patients_shared_with(&peer)?
        .into_iter()
        .take(ANTI_ENTROPY_PATIENTS)
        .collect();
    let mut report = SyncReport::default();
    for batch in patients.chunks(MAX_DIGEST_PATIENTS) {
        let differing = match compare_digests(client, peer, batch, &mut report).await {
            Ok(differing) => differing,
            Err(e) => {
                debug!(%peer, cause = %e, "digests not answered; reconciling each patient");
                batch.to_vec()
            }
        };
        for patient in differing {
            report.add(reconcile(client, peer, patient).await?);
        }
    }
    Ok(report)
}

/// Asks `peer` which of `patients` differ ([`Request::Digests`]) and notes
/// a sync check, per collection compared, for each patient in step (as a
/// reconciliation that found nothing missing would: completeness, §8b).
/// Returns the patients that differ.
pub(crate) async fn compare_digests<B: Backend, L: Link>(
    client: &Client<B, L>,
    peer: PeerId,
    patients: &[PatientId],
    report: &mut SyncReport,
) -> Result<Vec<PatientId>> {
    // Both ed25519 keys (a node's own identity is; a peer sharing patients is).
    let (Ok(me), Ok(holder)) = (Requester::from_peer_id(&client.me), PracticeId::from_peer_id(&peer)) else {
        return Ok(patients.to_vec());
    };
    let t = now();
    let mut parts = Vec::with_capacity(patients.len());
    for patient in patients {
        let view = client.backend.consent(patient)?;
        parts.push(serve::digest_parts(&*client.backend, &view, patient, &me, &holder, t)?);
    }
    let digests = patients
        .iter()
        .zip(&parts)
        // A patient this node may read nothing of here (its grant lapsed
        // since the list was made) cannot be in step: any digest will do.
        .map(|(p, parts)| (*p, parts.as_ref().map_or([0; 32], patient_digest)))
        .collect();
    let positions = match client.request(peer, Request::Digests { patients: digests }).await? {
        Response::Differing(positions) => positions,
        other => return Err(unexpected(peer, "digests", &other)),
    };
    report.pages += 1;
    // Ascending (checked by the decoder), and about the patients asked.
    if positions.last().is_some_and(|p| *p as usize >= patients.len()) {
        return Err(Error::Wire {
            message: "differing",
            reason: "position beyond the patients asked about",
        });
    }
    let mut differing = Vec::new();
    let mut next = positions.iter().map(|p| *p as usize).peekable();
    for (i, (patient, parts)) in patients.iter().zip(parts).enumerate() {
        if next.next_if_eq(&i).is_some() {
            differing.push(*patient);
            continue;
        }
        let Some(parts) = parts else {
            differing.push(*patient);
            continue;
        };
        for (collection, _) in &parts.collections {
            let held = client.backend.envelope_ids(patient, *collection)?.len() as u64;
            client.backend.note_reconciled(&peer, patient, *collection, held, &[])?;
        }
    }
    Ok(differing)
}
