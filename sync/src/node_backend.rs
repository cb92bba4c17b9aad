//! The adapter that puts a real node store behind sync:
//! [`NodeBackend`] implements [`Backend`] on `medmesh_node::Node`.
//!
//! The node publishes "item stored" with the item's signed metadata; the
//! adapter passes those events on to the sync actor unchanged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use libp2p::PeerId;
use medmesh_crypto::{Collection, CompactHeader, EnvelopeId, PatientId, PracticeId};
use medmesh_node::audit::{Action, ActorKind, AuditRecord};
use medmesh_node::store::{self as node_store};
use medmesh_node::{Event, Node, Source};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::backend::{
    AuditEntry, Backend, ConsentView, Cursor, DisclosureRecord, IngestReport, InstanceId, Item, ItemId, ItemStored,
    Owed, StoredItem, Transfer, TransferIngest,
};
use crate::wire::{SnapshotPayload, decode_transfer_headers, encode_compact_headers};
use crate::{Error, Result};

const EVENT_CAPACITY: usize = 4096;

/// A `medmesh_node::Node` as a sync [`Backend`].
pub struct NodeBackend {
    node: Node,
    events: broadcast::Sender<ItemStored>,
    forwarder: JoinHandle<()>,
    /// Snapshot transfers made, by (patient, collection); each is reused
    /// while the local snapshot it was made from stays the same.
    transfers: Mutex<HashMap<(PatientId, Collection), Arc<Transfer>>>,
    /// Fewest envelopes a transfer covers ([`MIN_TRANSFER_ENVELOPES`]).
    min_transfer: usize,
}

/// Envelopes restored per part of a transfer (ingested while the next
/// part is restored).
const RESTORE_PART: usize = 1024;

/// A collection's history must be at least this long before it is worth a
/// snapshot transfer rather than its envelopes.
pub const MIN_TRANSFER_ENVELOPES: usize = 32;

impl std::fmt::Debug for NodeBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeBackend({:?})", self.node)
    }
}

impl Drop for NodeBackend {
    fn drop(&mut self) {
        self.forwarder.abort();
    }
}

fn backend_error(e: medmesh_node::Error) -> Error {
    Error::Node(e)
}

/// The outcome written when a patient reads the audit entries about them.
const AUDIT_READ_OUTCOME: &str = "ok: audit log";

impl NodeBackend {
    /// Wraps `node` and starts the task that turns its events into
    /// [`ItemStored`]s. Call inside a tokio runtime.
    pub fn new(node: Node) -> Arc<Self> {
        Self::with_min_transfer_envelopes(node, MIN_TRANSFER_ENVELOPES)
    }

    /// As [`NodeBackend::new`], serving snapshot transfers of collections
    /// whose local snapshot covers at least `min` envelopes (instead of
    /// [`MIN_TRANSFER_ENVELOPES`]). For tests whose histories are short
    /// (the schedules property test) and for measuring where transfers
    /// start to pay.
    pub fn with_min_transfer_envelopes(node: Node, min: usize) -> Arc<Self> {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let forwarder = tokio::spawn(forward_events(node.clone(), events.clone()));
        Arc::new(Self {
            node,
            events,
            forwarder,
            transfers: Mutex::new(HashMap::new()),
            min_transfer: min,
        })
    }

    /// The wrapped node.
    pub fn node(&self) -> &Node {
        &self.node
    }
}

async fn forward_events(node: Node, events: broadcast::Sender<ItemStored>) {
    let mut rx = node.subscribe();
    loop {
        match rx.recv().await {
            Ok(Event::Stored(stored)) => {
                // The node's event carries the signed metadata it stored:
                // nothing is read back (a read would verify the signature
                // again, one ed25519 check per item). No subscriber is fine.
                let _ = events.send(*stored);
            }
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(n)) => {
                // Missed events only delay delivery: the periodic pull and
                // reconciliation cover them.
                warn!(missed = n, "sync lagged behind the node's events");
            }
            Err(broadcast::error::RecvError::Closed) => {
                debug!("node event channel closed");
                return;
            }
        }
    }
}

/// Who submitted a page, for the audit log: the patient when the peer's key
/// is the key of the patient the page is about (a patient's CLI session, whose
/// Noise identity is the patient key), else the peer. Only the first item is
/// looked at: a patient submits items of their own record.
fn source_of(from: PeerId, first: &Option<Item>) -> Source {
    let as_patient = medmesh_crypto::PracticeId::from_peer_id(&from)
        .ok()
        .and_then(|key| medmesh_crypto::PatientId::from_bytes(*key.as_bytes()).ok());
    // Unverified: a peer whose own key is the claimed patient is that
    // patient whatever the item holds, and ingest checks the signature.
    if let (Some(patient), Some(item)) = (as_patient, first)
        && item.claimed_patient() == Some(patient)
    {
        return Source::Patient(patient);
    }
    Source::Peer(from)
}

impl Backend for NodeBackend {
    fn instance_id(&self) -> InstanceId {
        self.node.instance_id()
    }

    async fn items_after(&self, after: u64, limit: usize) -> Result<Vec<StoredItem>> {
        self.node.items_after(after, limit).await.map_err(backend_error)
    }

    async fn scan_after(&self, after: u64, limit: usize) -> Result<Vec<StoredItem>> {
        self.node.scan_after(after, limit).map_err(backend_error)
    }

    async fn check(&self, item: &StoredItem) -> Result<bool> {
        self.node
            .check_stored(&item.meta, &item.item.bytes)
            .await
            .map_err(backend_error)
    }

    async fn ingest(&self, from: PeerId, items: Vec<Item>) -> Result<IngestReport> {
        self.ingest_capped(from, items, u64::MAX).await
    }

    async fn ingest_capped(&self, from: PeerId, items: Vec<Item>, pending_room: u64) -> Result<IngestReport> {
        let first = items.first().cloned();
        let room = usize::try_from(pending_room).unwrap_or(usize::MAX);
        let source = source_of(from, &first);
        let report = self
            .node
            .ingest_capped(items, source, room)
            .await
            .map_err(backend_error)?;
        Ok(report.counts)
    }

    fn pending_total(&self) -> Result<u64> {
        Ok(self.node.pending_count().map_err(backend_error)? as u64)
    }

    fn cursor(&self, peer: &PeerId) -> Result<Option<Cursor>> {
        self.node.cursor(peer).map_err(backend_error)
    }

    async fn set_cursor(&self, peer: &PeerId, cursor: Cursor) -> Result<()> {
        self.node.set_cursor(peer, cursor).await.map_err(backend_error)
    }

    fn names_grantee(&self, peer: &PeerId) -> Result<bool> {
        Ok(medmesh_crypto::PracticeId::from_peer_id(peer).is_ok_and(|p| self.node.holds_grant_to(&p)))
    }

    fn relates_to(&self, patient: &PatientId, me: &PeerId) -> Result<bool> {
        // The node's own definition; `me` is its PeerId.
        let _ = me;
        self.node.relates_to(patient).map_err(backend_error)
    }

    fn consent(&self, patient: &PatientId) -> Result<ConsentView> {
        Ok(self.node.consent_view(patient))
    }

    fn envelope_ids(&self, patient: &PatientId, collection: Collection) -> Result<Vec<EnvelopeId>> {
        self.node.envelope_ids(patient, collection).map_err(backend_error)
    }

    fn patients_shared_with(&self, peer: &PeerId) -> Result<Vec<PatientId>> {
        Ok(PracticeId::from_peer_id(peer)
            .map(|p| self.node.patients_shared_with(&p))
            .unwrap_or_default())
    }

    fn note_address_record(&self, peer: &PeerId, seq: u64, signed: &[u8]) -> Result<bool> {
        let Ok(practice) = PracticeId::from_peer_id(peer) else {
            return Ok(false);
        };
        self.node
            .note_address_record(&practice, seq, signed)
            .map_err(backend_error)
    }

    fn address_records(&self, peers: Option<&[PeerId]>) -> Result<Vec<Vec<u8>>> {
        let wanted: Option<Vec<PracticeId>> =
            peers.map(|ps| ps.iter().filter_map(|p| PracticeId::from_peer_id(p).ok()).collect());
        Ok(self
            .node
            .address_records(wanted.as_deref())
            .map_err(backend_error)?
            .into_iter()
            .map(|(_, signed)| signed)
            .collect())
    }

    fn holder_addresses(&self) -> Result<Vec<String>> {
        Ok(self.node.holder_addresses())
    }

    fn note_reconciled(
        &self,
        peer: &PeerId,
        patient: &PatientId,
        collection: Collection,
        listed: u64,
        missing: &[EnvelopeId],
    ) -> Result<()> {
        let remembered = &missing[..missing.len().min(node_store::SyncCheck::REMEMBERED)];
        self.node
            .note_sync_check(&node_store::SyncCheck {
                patient: *patient,
                collection,
                peer: peer.to_bytes(),
                at: medmesh_crypto::now(),
                listed,
                missing: missing.len() as u64,
                missing_ids: remembered.to_vec(),
            })
            .map_err(backend_error)
    }

    async fn item(&self, id: &ItemId) -> Result<Option<StoredItem>> {
        self.node.item(id).await.map_err(backend_error)
    }

    fn last_seq(&self) -> u64 {
        self.node.last_seq()
    }

    fn outbox(&self) -> Result<Vec<Owed>> {
        let entries = self.node.outbox().map_err(backend_error)?;
        Ok(entries
            .into_iter()
            .filter_map(|e| {
                Some(Owed {
                    peer: PeerId::from_bytes(&e.peer).ok()?,
                    item: ItemId(e.item.0),
                    patient: e.patient,
                    since: e.since,
                    attempts: e.attempts,
                    next_at: e.next_at,
                    last_error: e.last_error,
                    addrs: e.addrs.iter().filter_map(|a| a.parse().ok()).collect(),
                })
            })
            .collect())
    }

    fn put_outbox(&self, owed: &[Owed]) -> Result<()> {
        let entries: Vec<node_store::OutboxEntry> = owed
            .iter()
            .map(|o| node_store::OutboxEntry {
                peer: o.peer.to_bytes(),
                item: node_store::ItemId(o.item.0),
                patient: o.patient,
                since: o.since,
                attempts: o.attempts,
                next_at: o.next_at,
                last_error: o.last_error.clone(),
                addrs: o.addrs.iter().map(ToString::to_string).collect(),
            })
            .collect();
        self.node.put_outbox(&entries).map_err(backend_error)
    }

    fn remove_outbox(&self, settled: &[(PeerId, ItemId)]) -> Result<()> {
        let keys: Vec<(Vec<u8>, node_store::ItemId)> = settled
            .iter()
            .map(|(peer, item)| (peer.to_bytes(), node_store::ItemId(item.0)))
            .collect();
        self.node.remove_outbox(&keys).map_err(backend_error)
    }

    async fn envelopes(&self, ids: &[EnvelopeId]) -> Result<Vec<StoredItem>> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match self.node.item(&ItemId::from(*id)).await {
                Ok(Some(item)) => out.push(item),
                Ok(None) => {}
                Err(e) => warn!(envelope = %id, cause = %e, "skipped"),
            }
        }
        Ok(out)
    }

    async fn record_disclosure(&self, record: &DisclosureRecord) -> Result<()> {
        let items = record.items.iter().map(|i| node_store::ItemId(i.0)).collect();
        self.node
            .record_disclosure(&record.peer, record.patient, items, record.grant)
            .await
            .map(|_| ())
            .map_err(backend_error)
    }

    fn subscribe(&self) -> broadcast::Receiver<ItemStored> {
        self.events.subscribe()
    }

    async fn audit_entries(&self, patient: &PatientId, after: u64, limit: usize) -> Result<Vec<AuditEntry>> {
        // The node reads and decodes its whole log from sled: off the
        // async workers.
        let node = self.node.clone();
        let patient = *patient;
        let entries = tokio::task::spawn_blocking(move || node.audit_entries(Some(&patient)))
            .await
            .map_err(|e| Error::Backend(format!("reading the audit log: {e}")))?
            .map_err(backend_error)?;
        Ok(entries
            .into_iter()
            .filter(|e| e.seq > after)
            .take(limit)
            .map(|e| AuditEntry { patient: None, ..e })
            .collect())
    }

    async fn snapshot_transfer(&self, patient: &PatientId, collection: Collection) -> Result<Option<Arc<Transfer>>> {
        let key = (*patient, collection);
        let Some(source) = self
            .node
            .snapshot_fingerprint(*patient, collection)
            .map_err(backend_error)?
        else {
            return Ok(None);
        };
        let cached = self
            .transfers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .filter(|t| t.source == source)
            .cloned();
        if let Some(t) = cached {
            return Ok(Some(t));
        }
        let Some(made) = self
            .node
            .snapshot_transfer(*patient, collection)
            .await
            .map_err(Error::from)?
        else {
            return Ok(None);
        };
        if made.covered.len() < self.min_transfer {
            return Ok(None);
        }
        let headers: Vec<CompactHeader> = made.covered.iter().map(|(_, h)| h.clone()).collect();
        let transfer = Arc::new(Transfer {
            patient: made.patient,
            collection: made.collection,
            source: made.source,
            headers: encode_compact_headers(&headers),
            count: u32::try_from(headers.len()).unwrap_or(u32::MAX),
            ids: made.covered.iter().map(|(id, _)| *id).collect(),
            first_seq: made.first_seq,
            sealed_doc: made.sealed_doc,
        });
        debug!(
            %collection,
            covered = transfer.count,
            doc_bytes = transfer.sealed_doc.len(),
            header_bytes = transfer.headers.len(),
            "snapshot transfer made"
        );
        self.transfers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, transfer.clone());
        Ok(Some(transfer))
    }

    async fn restore_and_ingest(
        &self,
        from: PeerId,
        patient: PatientId,
        collection: Collection,
        payload: SnapshotPayload,
        pending_room: u64,
    ) -> Result<Option<TransferIngest>> {
        let blocking = |e: tokio::task::JoinError| Error::Backend(format!("restoring a snapshot transfer: {e}"));
        // Loading the document and re-sealing thousands of changes is CPU
        // work: off the async workers. Loading the document takes one core
        // for most of a second: the headers are decoded beside it.
        let SnapshotPayload {
            sealed_doc,
            headers,
            count,
            ..
        } = payload;
        let node = self.node.clone();
        let opening = tokio::task::spawn_blocking(move || node.open_transfer(patient, collection, &sealed_doc));
        let decoding =
            tokio::task::spawn_blocking(move || decode_transfer_headers(&headers, count, patient, collection));
        let headers = decoding.await.map_err(blocking)?;
        let opened = opening.await.map_err(blocking)?;
        // Parts are ingested one after another: each must carry the
        // predecessors of its changes, whatever order the sender chose.
        let mut headers = headers?;
        headers.sort_unstable_by_key(|h| (h.header().seq, h.header().actor));
        let headers = Arc::new(headers);
        let opened = match opened {
            Ok(o) => Arc::new(o),
            Err(medmesh_node::Error::NoSnapshotKey(key)) => {
                debug!(%key, "no key for a snapshot transfer's document");
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let restore_part = |range: std::ops::Range<usize>| {
            let (node, opened, headers) = (self.node.clone(), opened.clone(), headers.clone());
            tokio::task::spawn_blocking(move || opened.restore(&node, &headers[range]))
        };
        // Restore part k+1 while part k is being ingested.
        let parts: Vec<_> = (0..headers.len())
            .step_by(RESTORE_PART)
            .map(|start| start..(start + RESTORE_PART).min(headers.len()))
            .collect();
        let mut done = TransferIngest::default();
        let mut covered = Vec::with_capacity(headers.len());
        let mut room = pending_room;
        let mut next = parts.first().cloned().map(restore_part);
        for i in 0..parts.len() {
            let Some(current) = next.take() else { break };
            let restored = current.await.map_err(blocking)?;
            next = parts.get(i + 1).cloned().map(restore_part);
            done.restored += restored.envelopes.len() as u64;
            done.unrestored += restored.unrestored as u64;
            covered.extend(restored.covered);
            let room_now = usize::try_from(room).unwrap_or(usize::MAX);
            let report = self
                .node
                .ingest_restored(restored.envelopes, Source::Peer(from), Some(room_now))
                .await
                .map_err(backend_error)?;
            room = room.saturating_sub(report.counts.pending);
            done.report.add(report.counts);
        }
        // The document, every change of which is now verified and held, is
        // what the first read would otherwise rebuild from them: keep it as
        // the local snapshot (only if that holds; see `keep_as_snapshot`).
        if done.unrestored == 0
            && let Ok(opened) = Arc::try_unwrap(opened)
        {
            let node = self.node.clone();
            let kept =
                tokio::task::spawn_blocking(move || opened.keep_as_snapshot(&node, patient, collection, &covered))
                    .await
                    .map_err(blocking)?;
            match kept {
                Ok(kept) => debug!(%collection, kept, "snapshot transfer as local snapshot"),
                Err(e) => warn!(%collection, cause = %e, "keeping a transfer's document as the local snapshot failed"),
            }
        }
        Ok(Some(done))
    }

    async fn audit_checkpoints(&self, anchor: Option<u64>) -> Result<Option<medmesh_node::AuditCheckpoints>> {
        let node = self.node.clone();
        tokio::task::spawn_blocking(move || node.audit_checkpoints(anchor))
            .await
            .map_err(|e| Error::Backend(format!("signing audit checkpoints: {e}")))?
            .map(Some)
            .map_err(backend_error)
    }

    async fn record_audit_read(&self, patient: &PatientId) -> Result<()> {
        self.node
            .audit(AuditRecord {
                actor_kind: ActorKind::Patient,
                actor_id: patient.to_string(),
                action: Action::Read,
                patient: Some(*patient),
                items: Vec::new(),
                grant: None,
                outcome: AUDIT_READ_OUTCOME.into(),
            })
            .await
            .map(|_| ())
            .map_err(backend_error)
    }
}
