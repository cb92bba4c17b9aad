//! The serving side of `/medmesh/sync/1`: answers pulls, summaries and
//! fetches through [`may_disclose`], and audits every disclosure before the
//! answer leaves; answers a patient's audit query only to that patient.
//! Runs in tasks spawned by the actor.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use medmesh_crypto::{Collection, EnvelopeId, GrantId, PatientId, PracticeId, Timestamp};
use tracing::{debug, warn};

use crate::backend::{
    Backend, ConsentView, Cursor, DisclosureRecord, Item, ItemId, ItemKind, ItemMeta, StoredItem, Transfer,
};
use crate::wire::{
    DigestParts, MAX_AUDIT_ACTOR_ID_LEN, MAX_AUDIT_ENTRIES_PER_MESSAGE, MAX_AUDIT_ITEMS_PER_ENTRY,
    MAX_AUDIT_OUTCOME_LEN, MAX_OFFERS_PER_PAGE, MAX_OUTBOX_ERROR_LEN, MAX_OUTBOX_HELD, MAX_OUTBOX_OWED,
    MAX_SUMMARY_IDS, Offer, OutboxReport, OwedItem, PAGE_BYTE_BUDGET, RefusalCode, Response, SnapshotPayload,
    patient_digest, summary_digest,
};
use crate::{Error, Result};
use medmesh_node::audit::AuditEntry;
use medmesh_node::policy::{Disclosure, Requester, may_disclose};

/// Most log entries one pull scans (allowed or not), so a peer that may
/// receive little does not make the server read its whole log per request.
pub const SCAN_BUDGET: usize = 4096;
const SCAN_BATCH: usize = 256;

/// What a served answer disclosed, for metrics.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Served {
    pub(crate) items: u64,
    pub(crate) bytes: u64,
}

/// Caches consent views per patient for one request, and groups the
/// disclosures for the audit log.
struct Disclosures<'a, B: Backend> {
    backend: &'a B,
    peer: Requester,
    now: Timestamp,
    views: HashMap<PatientId, ConsentView>,
    audit: BTreeMap<(PatientId, Option<GrantId>), Vec<ItemId>>,
}

impl<'a, B: Backend> Disclosures<'a, B> {
    fn new(backend: &'a B, peer: Requester, now: Timestamp) -> Self {
        Self {
            backend,
            peer,
            now,
            views: HashMap::new(),
            audit: BTreeMap::new(),
        }
    }

    fn view(&mut self, patient: &PatientId) -> Result<&ConsentView> {
        if !self.views.contains_key(patient) {
            let view = self.backend.consent(patient)?;
            self.views.insert(*patient, view);
        }
        self.views
            .get(patient)
            .ok_or_else(|| Error::Backend("consent view vanished".into()))
    }

    /// Runs the filter; on yes, notes the disclosure.
    fn admit(&mut self, stored: &StoredItem) -> Result<bool> {
        let decision = self.decide(&stored.meta)?;
        if decision.allowed() {
            self.note(&stored.meta, decision);
            Ok(true)
        } else {
            debug!(peer = %self.peer.peer_id(), item = %stored.meta.id, ?decision, "withheld");
            Ok(false)
        }
    }

    /// Runs the filter without noting anything.
    fn decide(&mut self, meta: &ItemMeta) -> Result<Disclosure> {
        let (peer, now) = (self.peer, self.now);
        let view = self.view(&meta.patient)?;
        Ok(may_disclose(meta, &peer, view, now))
    }

    /// Notes an allowed disclosure for the audit log.
    fn note(&mut self, meta: &ItemMeta, decision: Disclosure) {
        self.audit
            .entry((meta.patient, decision.grant()))
            .or_default()
            .push(meta.id);
    }

    /// Writes the audit entries; only then may the answer be sent.
    async fn record(self) -> Result<()> {
        for ((patient, grant), items) in self.audit {
            self.backend
                .record_disclosure(&DisclosureRecord {
                    peer: self.peer.peer_id(),
                    patient,
                    grant,
                    items,
                })
                .await?;
        }
        Ok(())
    }
}

/// The answer, or `Refused(Internal)` (logged) when serving it failed.
fn answer(result: Result<(Response, Served)>, peer: &Requester, what: &'static str) -> (Response, Served) {
    result.unwrap_or_else(|e| refuse(&e, peer, what))
}

fn refuse(err: &Error, peer: &Requester, what: &'static str) -> (Response, Served) {
    warn!(peer = %peer.peer_id(), cause = %err, "failed to serve {what}");
    (Response::Refused(RefusalCode::Internal), Served::default())
}

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
fn envelope_probe(patient: PatientId, collection: Collection) -> ItemMeta {
    ItemMeta {
        kind: ItemKind::Envelope,
        id: ItemId([0; 32]),
        patient,
        collection: Some(collection),
        grant: None,
        principal: None,
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use medmesh_crypto::{Access, SecretIdentity, now};
    use medmesh_node::audit::Action;
    use medmesh_node::repository::{self, Repository};
    use medmesh_node::testing::TestPatient;
    use medmesh_node::{Actor, Node};

    use super::*;
    use crate::NodeBackend;

    fn disclosed_to(node: &Node, patient: &PatientId, peer: &SecretIdentity) -> usize {
        let peer = peer.practice_id().unwrap().peer_id().to_string();
        node.audit_entries(Some(patient))
            .unwrap()
            .iter()
            .filter(|e| e.action == Action::Disclose && e.actor_id == peer)
            .map(|e| e.items.len())
            .sum()
    }

    /// The snapshot path discloses exactly what the envelope path would: a
    /// transfer only to a peer whose grant covers the collection and is in
    /// force now, every covered envelope audited; offers only to pullers
    /// that take them and may receive the envelopes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn transfers_and_offers_follow_the_consent_filter() {
        const N: usize = 40;
        let dir = tempfile::tempdir().unwrap();
        let node = Node::open(dir.path(), SecretIdentity::generate().unwrap(), Default::default())
            .await
            .unwrap();
        let mut patient = TestPatient::new().unwrap();
        let pid = patient.id();
        let (_, items) = patient.onboard(node.practice_id(), Collection::Labs).unwrap();
        node.submit(pid, items).await.unwrap();
        let repo = Repository::new(
            node.clone(),
            repository::Config {
                snapshot_every: 0,
                ..repository::Config::default()
            },
        )
        .unwrap();
        for i in 0..N {
            let obs = serde_json::json!({
                "resourceType": "Observation", "status": "final",
                "code": {"text": format!("reading {i}")},
                "subject": {"reference": "Patient/example"}
            });
            repo.create(obs, Some(pid), Actor::local_app("test")).await.unwrap();
        }
        repo.save_snapshots().await;
        let backend = NodeBackend::new(node.clone());

        let (b, c) = (SecretIdentity::generate().unwrap(), SecretIdentity::generate().unwrap());
        let requester = |k: &SecretIdentity| Requester::from_peer_id(&k.practice_id().unwrap().peer_id()).unwrap();
        let (gb, items) = patient
            .grant_with_share(b.practice_id().unwrap(), Collection::Labs, Access::Read)
            .unwrap();
        node.submit(pid, items).await.unwrap();

        // C: no grant, no transfer, no offer, nothing audited.
        let (r, _) = snapshot(&*backend, requester(&c), pid, Collection::Labs, now()).await;
        assert!(matches!(r, Response::Snapshot(None)), "{r:?}");
        let (r, _) = pull(&*backend, requester(&c), Cursor::default(), 1024, Some(&[]), now()).await;
        let Response::Page { items, offers, .. } = r else {
            panic!("{r:?}")
        };
        assert!(offers.is_empty() && items.iter().all(|i| i.kind != ItemKind::Envelope));
        assert_eq!(disclosed_to(&node, &pid, &c), 0);

        // B: a puller that takes offers gets one instead of the envelopes;
        // one that does not gets the envelopes.
        let (r, _) = pull(&*backend, requester(&b), Cursor::default(), 1024, Some(&[]), now()).await;
        let Response::Page { items, offers, .. } = r else {
            panic!("{r:?}")
        };
        assert_eq!(offers.len(), 1);
        assert_eq!(items.iter().filter(|i| i.kind == ItemKind::Envelope).count(), 0);
        assert_eq!(
            disclosed_to(&node, &pid, &b),
            items.len(),
            "only the page's (consent) items are disclosed, not the offered envelopes"
        );
        let (r, _) = pull(&*backend, requester(&b), Cursor::default(), 1024, None, now()).await;
        let Response::Page { items, offers, .. } = r else {
            panic!("{r:?}")
        };
        assert!(offers.is_empty());
        assert_eq!(items.iter().filter(|i| i.kind == ItemKind::Envelope).count(), N);
        let after_pages = disclosed_to(&node, &pid, &b);

        let (r, _) = snapshot(&*backend, requester(&b), pid, Collection::Labs, now()).await;
        let Response::Snapshot(Some(payload)) = r else {
            panic!("{r:?}")
        };
        assert_eq!(payload.count as usize, N);
        assert_eq!(
            disclosed_to(&node, &pid, &b),
            after_pages + N,
            "every covered envelope audited"
        );
        // Another collection B may not receive: none.
        let (r, _) = snapshot(&*backend, requester(&b), pid, Collection::Core, now()).await;
        assert!(matches!(r, Response::Snapshot(None)));

        // Revoked: no transfer any more.
        let revocation = patient.revoke(&gb, Default::default()).unwrap();
        node.submit_revocation(pid, revocation.encoded().to_vec())
            .await
            .unwrap();
        let (r, _) = snapshot(&*backend, requester(&b), pid, Collection::Labs, now()).await;
        assert!(matches!(r, Response::Snapshot(None)), "{r:?}");
    }

    /// Pulls check every item they send: one that rotted at rest is
    /// withheld and quarantined, never sent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pull_withholds_and_quarantines_an_item_corrupted_at_rest() {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::open(dir.path(), SecretIdentity::generate().unwrap(), Default::default())
            .await
            .unwrap();
        let mut patient = TestPatient::new().unwrap();
        let pid = patient.id();
        let (_, items) = patient.onboard(node.practice_id(), Collection::Core).unwrap();
        node.submit(pid, items).await.unwrap();
        let mut maker = medmesh_node::testing::ChangeMaker::new(node.practice_id().as_bytes()).unwrap();
        let mut ids = Vec::new();
        for i in 0..3 {
            let c = maker.put("k", &i.to_string()).unwrap();
            ids.push(node.write_change(pid, Collection::Core, c.as_change()).await.unwrap());
        }
        let store = node.raw_store();
        let mut rotten = store.raw_item_bytes(&ids[1].into()).unwrap().unwrap();
        let at = rotten.len() - 5;
        rotten[at] ^= 0x10;
        store.raw_replace_item_bytes(&ids[1].into(), &rotten).unwrap();

        let backend = NodeBackend::new(node.clone());
        let patient_peer = Requester::from_peer_id(
            &medmesh_crypto::PracticeId::from_bytes(*pid.as_bytes())
                .unwrap()
                .peer_id(),
        )
        .unwrap();
        let (r, _) = pull(&*backend, patient_peer, Cursor::default(), 1024, None, now()).await;
        let Response::Page { items, .. } = r else {
            panic!("{r:?}")
        };
        let sent: Vec<ItemId> = items.iter().map(|i| ItemId::digest(&i.bytes)).collect();
        assert!(items.iter().all(|i| i.bytes != rotten), "the rotten item was sent");
        assert_eq!(
            items.iter().filter(|i| i.kind == ItemKind::Envelope).count(),
            2,
            "{sent:?}"
        );
        assert!(
            !node.envelope_ids(&pid, Collection::Core).unwrap().contains(&ids[1]),
            "not quarantined"
        );
    }
}
