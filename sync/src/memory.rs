//! An in-memory [`Backend`] for tests and demos. It verifies every item with
//! medmesh-crypto and applies DESIGN §5's acceptance rule for envelopes
//! (author is the patient, or writes under a known read-write grant that
//! admits the change); an envelope whose grant is unknown waits as pending
//! and is retried when more items arrive. It does not decrypt or apply
//! changes: that is the node store's business.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use libp2p::PeerId;
use medmesh_crypto::{Collection, Envelope, EnvelopeId, Error as CryptoError, PatientId, Principal, Timestamp, now};
use medmesh_node::audit::{Action, ActorKind};
use medmesh_node::policy::{self, Validity};
use tokio::sync::broadcast;

use crate::backend::{
    Backend, ConsentView, Cursor, DisclosureRecord, IngestReport, InstanceId, Item, ItemId, ItemKind, ItemMeta,
    ItemStored, Owed, StoredItem,
};
use crate::{Error, Result};
use medmesh_node::audit::AuditEntry;

const EVENT_CAPACITY: usize = 4096;

#[derive(Default)]
struct State {
    log: Vec<StoredItem>,
    ids: HashSet<ItemId>,
    pending: Vec<(Option<PeerId>, Item)>,
    rejected: Vec<ItemId>,
    cursors: HashMap<PeerId, Cursor>,
    /// Disclosures with the time they were recorded.
    audit: Vec<(Timestamp, DisclosureRecord)>,
    outbox: BTreeMap<(PeerId, ItemId), Owed>,
}

/// A store in memory. Cheap to share through an `Arc`.
pub struct MemoryBackend {
    instance: InstanceId,
    state: Mutex<State>,
    events: broadcast::Sender<ItemStored>,
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

enum Verdict {
    Accept(Box<ItemMeta>),
    Pending,
    Reject(ItemId),
    Duplicate,
}

impl MemoryBackend {
    /// An empty store with a random instance id.
    pub fn new() -> Self {
        let mut id = [0u8; 16];
        // Tests only: a fixed id is fine if the OS has no randomness.
        let _ = getrandom_fill(&mut id);
        Self::with_instance(InstanceId(id))
    }

    /// An empty store with the given instance id.
    pub fn with_instance(instance: InstanceId) -> Self {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        Self {
            instance,
            state: Mutex::new(State::default()),
            events,
        }
    }

    /// A copy of this store's items (not cursors or audit) under a new
    /// instance id, as a restore from backup would be.
    pub fn restored_copy(&self, instance: InstanceId) -> Self {
        let copy = Self::with_instance(instance);
        {
            let src = self.lock();
            let mut dst = copy.lock();
            dst.log = src.log.clone();
            dst.ids = src.ids.clone();
        }
        copy
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a test failure already; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores an item written locally (the gateway or the patient's CLI
    /// reaching this node), as the node store would.
    ///
    /// # Errors
    /// [`Error::Crypto`] if it does not verify; [`Error::Backend`] if it is
    /// rejected or must wait.
    pub fn write(&self, item: Item) -> Result<u64> {
        let meta = ItemMeta::describe(&item)?;
        let mut state = self.lock();
        match self.judge(&state, &item) {
            Verdict::Accept(meta) => {
                let seq = self.store(&mut state, None, *meta, item);
                self.retry_pending(&mut state);
                Ok(seq)
            }
            Verdict::Duplicate => Ok(state.log.iter().find(|s| s.meta.id == meta.id).map_or(0, |s| s.seq)),
            Verdict::Pending => Err(Error::Backend(format!(
                "{} {} waits for its grant",
                item.kind.as_str(),
                meta.id
            ))),
            Verdict::Reject(id) => Err(Error::Backend(format!("{} {id} rejected", item.kind.as_str()))),
        }
    }

    fn judge(&self, state: &State, item: &Item) -> Verdict {
        let meta = match ItemMeta::describe(item) {
            Ok(m) => m,
            Err(CryptoError::UnsupportedVersion { .. }) => return Verdict::Pending,
            Err(_) => return Verdict::Reject(ItemId::digest(&item.bytes)),
        };
        if state.ids.contains(&meta.id) {
            return Verdict::Duplicate;
        }
        if item.kind != ItemKind::Envelope {
            return Verdict::Accept(Box::new(meta));
        }
        let Ok(envelope) = Envelope::decode(&item.bytes) else {
            return Verdict::Reject(meta.id);
        };
        // The node's own rule (DESIGN §5), on what this store holds.
        let h = envelope.header();
        let view = Self::view(state, &h.patient);
        let grant = h.grant_id.and_then(|id| view.grant(id));
        match policy::admits(h, grant, &view.revocations) {
            Validity::Valid => Verdict::Accept(Box::new(meta)),
            Validity::MissingGrant(..) => Verdict::Pending,
            Validity::Invalid(_) => Verdict::Reject(meta.id),
        }
    }

    fn store(&self, state: &mut State, from: Option<PeerId>, meta: ItemMeta, item: Item) -> u64 {
        let seq = state.log.len() as u64 + 1;
        state.ids.insert(meta.id);
        state.log.push(StoredItem {
            seq,
            meta: meta.clone(),
            item,
        });
        // No subscriber is fine.
        let _ = self.events.send(ItemStored { seq, meta, from });
        seq
    }

    fn retry_pending(&self, state: &mut State) -> IngestReport {
        let mut report = IngestReport::default();
        loop {
            let pending = std::mem::take(&mut state.pending);
            let before = pending.len();
            for (from, item) in pending {
                match self.judge(state, &item) {
                    Verdict::Accept(meta) => {
                        self.store(state, from, *meta, item);
                        report.accepted += 1;
                    }
                    Verdict::Pending => state.pending.push((from, item)),
                    Verdict::Duplicate => {}
                    Verdict::Reject(id) => {
                        state.rejected.push(id);
                        report.rejected += 1;
                    }
                }
            }
            if state.pending.len() == before {
                return report;
            }
        }
    }

    fn view(state: &State, patient: &PatientId) -> ConsentView {
        let mut view = ConsentView::default();
        for s in state.log.iter().filter(|s| s.meta.patient == *patient) {
            match s.item.kind {
                ItemKind::Grant => {
                    if let Ok(g) = medmesh_crypto::Grant::decode(&s.item.bytes) {
                        view.grants.push(g);
                    }
                }
                ItemKind::Revocation => {
                    if let Ok(r) = medmesh_crypto::Revocation::decode(&s.item.bytes) {
                        view.revocations.push(r);
                    }
                }
                _ => {}
            }
        }
        view
    }

    /// Every stored item, in sequence order.
    pub fn items(&self) -> Vec<StoredItem> {
        self.lock().log.clone()
    }

    /// How many envelopes of (patient, collection) the store holds.
    pub fn envelope_count(&self, patient: &PatientId, collection: Collection) -> usize {
        self.lock()
            .log
            .iter()
            .filter(|s| {
                s.meta.kind == ItemKind::Envelope && s.meta.patient == *patient && s.meta.collection == Some(collection)
            })
            .count()
    }

    /// How many items of `patient` the store holds, by kind.
    pub fn count(&self, patient: &PatientId, kind: ItemKind) -> usize {
        self.lock()
            .log
            .iter()
            .filter(|s| s.meta.kind == kind && s.meta.patient == *patient)
            .count()
    }

    /// Whether the store holds the item.
    pub fn holds(&self, id: &ItemId) -> bool {
        self.lock().ids.contains(id)
    }

    /// Items waiting for a grant.
    pub fn pending_count(&self) -> usize {
        self.lock().pending.len()
    }

    /// Ids of permanently rejected items (each recorded once).
    pub fn rejected(&self) -> Vec<ItemId> {
        self.lock().rejected.clone()
    }

    /// The disclosure audit log.
    pub fn disclosures(&self) -> Vec<DisclosureRecord> {
        self.lock().audit.iter().map(|(_, r)| r.clone()).collect()
    }
}

fn getrandom_fill(buf: &mut [u8]) -> Result<()> {
    // medmesh-crypto's randomness, through a throwaway grant id.
    let id = medmesh_crypto::GrantId::generate()?;
    for (b, r) in buf.iter_mut().zip(id.0.iter()) {
        *b = *r;
    }
    Ok(())
}

impl Backend for MemoryBackend {
    fn instance_id(&self) -> InstanceId {
        self.instance
    }

    async fn items_after(&self, after: u64, limit: usize) -> Result<Vec<StoredItem>> {
        let state = self.lock();
        let start = usize::try_from(after).unwrap_or(usize::MAX).min(state.log.len());
        Ok(state.log[start..].iter().take(limit).cloned().collect())
    }

    async fn ingest(&self, from: PeerId, items: Vec<Item>) -> Result<IngestReport> {
        self.ingest_capped(from, items, u64::MAX).await
    }

    async fn ingest_capped(&self, from: PeerId, items: Vec<Item>, pending_room: u64) -> Result<IngestReport> {
        let mut room = pending_room;
        let mut state = self.lock();
        let mut report = IngestReport::default();
        for item in items {
            match self.judge(&state, &item) {
                Verdict::Accept(meta) => {
                    self.store(&mut state, Some(from), *meta, item);
                    report.accepted += 1;
                }
                Verdict::Duplicate => report.duplicates += 1,
                Verdict::Pending if room == 0 => report.refused += 1,
                Verdict::Pending => {
                    room -= 1;
                    state.pending.push((Some(from), item));
                    report.pending += 1;
                }
                Verdict::Reject(id) => {
                    if !state.rejected.contains(&id) {
                        state.rejected.push(id);
                    }
                    report.rejected += 1;
                }
            }
        }
        let retried = self.retry_pending(&mut state);
        report.accepted += retried.accepted;
        report.rejected += retried.rejected;
        Ok(report)
    }

    fn pending_total(&self) -> Result<u64> {
        Ok(self.lock().pending.len() as u64)
    }

    fn cursor(&self, peer: &PeerId) -> Result<Option<Cursor>> {
        Ok(self.lock().cursors.get(peer).copied())
    }

    async fn set_cursor(&self, peer: &PeerId, cursor: Cursor) -> Result<()> {
        self.lock().cursors.insert(*peer, cursor);
        Ok(())
    }

    fn names_grantee(&self, peer: &PeerId) -> Result<bool> {
        let Ok(practice) = medmesh_crypto::PracticeId::from_peer_id(peer) else {
            return Ok(false);
        };
        let grantee = Some(Principal::Practice(practice));
        Ok(self
            .lock()
            .log
            .iter()
            .any(|s| s.meta.kind == ItemKind::Grant && s.meta.recipient() == grantee))
    }

    fn consent(&self, patient: &PatientId) -> Result<ConsentView> {
        Ok(Self::view(&self.lock(), patient))
    }

    fn envelope_ids(&self, patient: &PatientId, collection: Collection) -> Result<Vec<EnvelopeId>> {
        Ok(self
            .lock()
            .log
            .iter()
            .filter(|s| {
                s.meta.kind == ItemKind::Envelope && s.meta.patient == *patient && s.meta.collection == Some(collection)
            })
            .map(|s| EnvelopeId(s.meta.id.0))
            .collect())
    }

    async fn envelopes(&self, ids: &[EnvelopeId]) -> Result<Vec<StoredItem>> {
        let wanted: HashSet<ItemId> = ids.iter().map(|i| ItemId(i.0)).collect();
        Ok(self
            .lock()
            .log
            .iter()
            .filter(|s| s.meta.kind == ItemKind::Envelope && wanted.contains(&s.meta.id))
            .cloned()
            .collect())
    }

    async fn item(&self, id: &ItemId) -> Result<Option<StoredItem>> {
        Ok(self.lock().log.iter().find(|s| s.meta.id == *id).cloned())
    }

    fn outbox(&self) -> Result<Vec<Owed>> {
        Ok(self.lock().outbox.values().cloned().collect())
    }

    fn put_outbox(&self, owed: &[Owed]) -> Result<()> {
        let mut state = self.lock();
        for o in owed {
            state.outbox.insert((o.peer, o.item), o.clone());
        }
        Ok(())
    }

    fn remove_outbox(&self, settled: &[(PeerId, ItemId)]) -> Result<()> {
        let mut state = self.lock();
        for key in settled {
            state.outbox.remove(key);
        }
        Ok(())
    }

    async fn record_disclosure(&self, record: &DisclosureRecord) -> Result<()> {
        self.lock().audit.push((now(), record.clone()));
        Ok(())
    }

    /// The disclosures of `patient`'s items, numbered by their place in the
    /// disclosure log. The memory store keeps no hash chain: both hashes
    /// are zero.
    async fn audit_entries(&self, patient: &PatientId, after: u64, limit: usize) -> Result<Vec<AuditEntry>> {
        Ok(self
            .lock()
            .audit
            .iter()
            .zip(1u64..)
            .filter(|((_, r), seq)| *seq > after && r.patient == *patient)
            .take(limit)
            .map(|((time, r), seq)| AuditEntry {
                seq,
                time: *time,
                actor_kind: ActorKind::Peer,
                actor_id: r.peer.to_string(),
                action: Action::Disclose,
                patient: None,
                item_count: r.items.len() as u64,
                items: r.items.clone(),
                grant: r.grant,
                outcome: "ok".into(),
                prev_hash: [0; 32],
                hash: [0; 32],
            })
            .collect())
    }

    fn subscribe(&self) -> broadcast::Receiver<ItemStored> {
        self.events.subscribe()
    }
}
