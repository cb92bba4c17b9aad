//! The reconciling requests: a patient's summary, anti-entropy digests
//! (with [`digest_parts`], computed alike by the asker), and fetches of
//! envelopes by id.

use medmesh_crypto::{Collection, PatientId, PracticeId, Timestamp};

use super::snapshot::envelope_probe;
use super::{Disclosures, Served, answer};
use crate::Result;
use crate::backend::{Backend, ConsentView, Item, ItemKind, ItemMeta, StoredItem};
use crate::wire::{DigestParts, MAX_SUMMARY_IDS, PAGE_BYTE_BUDGET, Response, patient_digest, summary_digest};
use medmesh_node::policy::{Requester, may_disclose};

/// Answers a summary: the patient's consent items and, per collection the
/// peer may receive, the envelope ids held.
pub(crate) async fn summary<B: Backend>(
    backend: &B,
    peer: Requester,
    patient: PatientId,
    digests: &[(Collection, [u8; 32])],
    now: Timestamp,
) -> (Response, Served) {
    answer(
        summary_inner(backend, peer, patient, digests, now).await,
        &peer,
        "summary",
    )
}

async fn summary_inner<B: Backend>(
    backend: &B,
    peer: Requester,
    patient: PatientId,
    digests: &[(Collection, [u8; 32])],
    now: Timestamp,
) -> Result<(Response, Served)> {
    let view = backend.consent(&patient)?;
    let mut d = Disclosures::new(backend, peer, now);
    let mut consent = Vec::new();
    let mut bytes = 0usize;
    let consent_items = view
        .grants
        .iter()
        .map(|g| (crate::backend::ItemMeta::of_grant(g), Item::grant(g)))
        .chain(
            view.revocations
                .iter()
                .map(|r| (crate::backend::ItemMeta::of_revocation(r), Item::revocation(r))),
        );
    for (meta, item) in consent_items {
        let stored = StoredItem { seq: 0, meta, item };
        if d.admit(&stored)? {
            bytes += stored.item.bytes.len();
            consent.push(stored.item);
        }
    }
    let mut collections = Vec::new();
    let mut total = 0usize;
    for collection in Collection::ALL {
        // Would an envelope of this collection be disclosed?
        if !may_disclose(&envelope_probe(patient, collection), &peer, &view, now).allowed() {
            continue;
        }
        let mut ids = backend.envelope_ids(&patient, collection)?;
        // The asker holds exactly these already: nothing to list.
        if digests
            .iter()
            .any(|(c, d)| *c == collection && *d == summary_digest(&ids))
        {
            ids.clear();
        }
        ids.truncate(MAX_SUMMARY_IDS.saturating_sub(total));
        total += ids.len();
        collections.push((collection, ids));
    }
    d.record().await?;
    let served = Served {
        items: consent.len() as u64,
        bytes: bytes as u64,
    };
    Ok((Response::Summary { consent, collections }, served))
}

/// Answers a digest request (anti-entropy, docs/protocol.md §8): the
/// positions of the patients whose [`patient_digest`] differs from the one
/// this node (`me`) computes of what it would disclose to the asker, or of
/// whom it would disclose nothing. Nothing is sent but positions, so nothing
/// is audited: a match tells the asker only that this node holds what the
/// asker holds already (docs/threat-model.md).
pub(crate) async fn digests<B: Backend>(
    backend: &B,
    peer: Requester,
    me: PracticeId,
    patients: &[(PatientId, [u8; 32])],
    now: Timestamp,
) -> (Response, Served) {
    let result = (|| {
        let mut differing = Vec::new();
        for (position, (patient, digest)) in (0u32..).zip(patients) {
            let view = backend.consent(patient)?;
            let parts = digest_parts(backend, &view, patient, &peer, &me, now)?;
            if parts.is_none_or(|p| patient_digest(&p) != *digest) {
                differing.push(position);
            }
        }
        Ok((Response::Differing(differing), Served::default()))
    })();
    answer(result, &peer, "digests")
}

/// What the [`patient_digest`] of `patient` covers between a node that may
/// read (`reader`, the asker) and one that holds (`holder`, the answering
/// node), from `backend`'s store and consent view — computed alike on both
/// sides, so two nodes holding the same agree:
/// - the patient's consent items `reader` may receive ([`may_disclose`]),
///   each with whether its grant is known revoked;
/// - per collection whose envelopes `reader` may receive and that a grant
///   from the patient to `holder` covers (in any state: it may hold that
///   collection's history), the [`summary_digest`] of the ids held here. A
///   collection `holder` was never granted is left out, so two practices
///   granted different collections are still in step.
///
/// `None` when `reader` may receive nothing of the patient: the answer is
/// then "differs" whatever the asker sent, as for a patient not held.
///
/// # Errors
/// Storage failures.
pub(crate) fn digest_parts<B: Backend>(
    backend: &B,
    view: &ConsentView,
    patient: &PatientId,
    reader: &Requester,
    holder: &PracticeId,
    now: Timestamp,
) -> Result<Option<DigestParts>> {
    let mut parts = DigestParts::default();
    for grant in &view.grants {
        let meta = ItemMeta::of_grant(grant);
        if may_disclose(&meta, reader, view, now).allowed() {
            parts.consent.push((meta.id, view.is_revoked(grant)));
        }
    }
    for revocation in &view.revocations {
        let meta = ItemMeta::of_revocation(revocation);
        if may_disclose(&meta, reader, view, now).allowed() {
            parts.consent.push((meta.id, true));
        }
    }
    for collection in Collection::ALL {
        let held_by_holder = view
            .grants
            .iter()
            .any(|g| g.terms().patient == *patient && g.terms().grantee == *holder && g.covers(collection));
        if held_by_holder && may_disclose(&envelope_probe(*patient, collection), reader, view, now).allowed() {
            let ids = backend.envelope_ids(patient, collection)?;
            parts.collections.push((collection, summary_digest(&ids)));
        }
    }
    Ok((!parts.consent.is_empty() || !parts.collections.is_empty()).then_some(parts))
}

/// Answers a fetch: the requested envelopes the peer may receive.
pub(crate) async fn fetch<B: Backend>(
    backend: &B,
    peer: Requester,
    ids: &[medmesh_crypto::EnvelopeId],
    now: Timestamp,
) -> (Response, Served) {
    answer(fetch_inner(backend, peer, ids, now).await, &peer, "fetch")
}

async fn fetch_inner<B: Backend>(
    backend: &B,
    peer: Requester,
    ids: &[medmesh_crypto::EnvelopeId],
    now: Timestamp,
) -> Result<(Response, Served)> {
    let mut d = Disclosures::new(backend, peer, now);
    let mut items = Vec::new();
    let mut bytes = 0usize;
    for stored in backend.envelopes(ids).await? {
        if stored.meta.kind != ItemKind::Envelope {
            continue;
        }
        if bytes >= PAGE_BYTE_BUDGET {
            break;
        }
        if d.admit(&stored)? {
            bytes += stored.item.bytes.len();
            items.push(stored.item);
        }
    }
    d.record().await?;
    let served = Served {
        items: items.len() as u64,
        bytes: bytes as u64,
    };
    Ok((Response::Fetched { items }, served))
}
