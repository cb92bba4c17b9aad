//! [`Node`]: the handle the record layer, sync and the gateway share. It
//! owns the store, the consent registry and the committer, and implements
//! the write path, the ingest path, holdings and the audit API.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use medmesh_crypto::{
    Access, ActorId, Change, Collection, Envelope, EnvelopeHeader, EnvelopeId, Epoch, EpochKey, Grant, GrantId, KeyId,
    KeyRef, KeyShare, MAX_ENVELOPE_BYTES, PatientId, PeerId, PracticeId, Principal, Revocation, SealedSnapshot,
    SecretIdentity, now,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;
use zeroize::Zeroizing;

use crate::audit::{self, Action, ActorKind, AuditEntry, AuditRecord};
use crate::chains::{Chains, Doc};
use crate::commit::Committer;
use crate::completeness::CollectionCompleteness;
use crate::consent::{Registry, Validity};
use crate::rate::Rate;
use crate::snapshot::Snapshot;
use crate::store::{
    Batch, Committed, Cursor, EnvelopeEntry, EnvelopeState, InstanceId, ItemId, ItemKind, ItemMeta, Op, PendingItem,
    PendingReason, Seq, SledStore, Store, StoredItem, SyncCheck,
};
use crate::strangers::Strangers;
use crate::{Error, Result};

/// Directory of the sled store inside the data directory.
pub const STORE_DIR: &str = "store";
/// Domain tag of the blind resource index key (derived from the node seed).
const INDEX_KEY_TAG: &[u8] = b"medmesh/resource-index-key/v1";
/// Most envelopes of one patient that may wait for an earlier change of one
/// author's actors ([`PendingReason::SeqGap`]); beyond it they are refused
/// (not kept, sent again later), see `docs/decisions.md`.
pub const MAX_SEQ_GAPS_PER_AUTHOR: usize = 1024;

/// Tuning of a [`Node`].
#[derive(Clone, Debug)]
pub struct Config {
    /// Most batches that share one flush; 1 flushes once per write (for
    /// benchmarks and comparison only).
    pub group_commit_max: usize,
    /// Capacity of the event broadcast; slow subscribers lag beyond it.
    pub event_capacity: usize,
    /// Consent items (grants, revocations, key shares) kept for one patient
    /// this node holds nothing of — no envelope, no grant to this node;
    /// beyond it they are refused ([`IngestReport::unwanted`]). A grant to
    /// this node is always taken: any patient's first one looks like that.
    pub stranger_items_per_patient: usize,
    /// As [`Config::stranger_items_per_patient`], over every such patient,
    /// per source (a peer, a patient's CLI session).
    pub stranger_items_per_source: usize,
    /// As [`Config::stranger_items_per_patient`], over every such patient
    /// and every source together (a source costs nothing to make).
    pub stranger_items_total: usize,
    /// Grants naming this node brought by anyone but their patient's own
    /// session (a peer forwarding a patient's grant): each makes the node
    /// keep a new patient's record, so each source may do it at this rate.
    pub introductions_per_source: Rate,
    /// As [`Config::introductions_per_source`], over every source together.
    pub introductions: Rate,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            group_commit_max: 1024,
            event_capacity: 4096,
            stranger_items_per_patient: 32,
            stranger_items_per_source: 128,
            stranger_items_total: 256,
            introductions_per_source: Rate::per_minute(6, 64),
            introductions: Rate::per_minute(60, 512),
        }
    }
}

/// "Item stored": ids and metadata, never content.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ItemStored {
    /// Local seq.
    pub seq: Seq,
    /// Kind.
    pub kind: ItemKind,
    /// Item id (the envelope id for envelopes).
    pub id: ItemId,
    /// Whose record.
    pub patient: PatientId,
    /// Collection (envelopes and key shares).
    pub collection: Option<Collection>,
    /// The peer it was received from; `None` for local writes and for items
    /// the patient or a local app submitted. Sync uses it not to offer an
    /// item back to the peer that just sent it.
    pub from: Option<PeerId>,
}

/// What the node publishes on [`Node::subscribe`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Event {
    /// A new item was stored durably (local write or ingest).
    Stored(ItemStored),
    /// Envelopes received from peers (or unlocked by a new key share) that
    /// the node can now read; fetch them with [`Node::changes_by_ids`].
    /// Not sent for the node's own writes.
    Readable {
        /// Whose record.
        patient: PatientId,
        /// Which collection.
        collection: Collection,
        /// The envelopes.
        ids: Vec<EnvelopeId>,
    },
    /// Envelopes that were accepted before a revocation arrived whose cut
    /// excludes them; they are gone from reads and serving. A cached
    /// document holding them must be rebuilt from [`Node::readable_changes`].
    Excluded {
        /// Whose record.
        patient: PatientId,
        /// Which collection.
        collection: Collection,
        /// The envelopes.
        ids: Vec<EnvelopeId>,
    },
}

/// Who does something through the node API, for the audit log.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Actor {
    /// Kind.
    pub kind: ActorKind,
    /// Id: PeerId, did:key, app name.
    pub id: String,
}

impl Actor {
    /// A local app, by the name the gateway knows it under.
    pub fn local_app(name: impl Into<String>) -> Self {
        Self {
            kind: ActorKind::LocalApp,
            id: name.into(),
        }
    }

    /// A peer node.
    pub fn peer(peer: &PeerId) -> Self {
        Self {
            kind: ActorKind::Peer,
            id: peer.to_string(),
        }
    }

    /// A patient.
    pub fn patient(patient: &PatientId) -> Self {
        Self {
            kind: ActorKind::Patient,
            id: patient.to_string(),
        }
    }
}

/// Where ingested items come from.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Source {
    /// A peer node, through sync.
    Peer(PeerId),
    /// The patient, through their CLI (over libp2p or the management API).
    Patient(PatientId),
    /// A local app submitting signed blobs through the management API.
    LocalApp(String),
}

impl Source {
    fn actor(&self) -> Actor {
        match self {
            Self::Peer(p) => Actor::peer(p),
            Self::Patient(p) => Actor::patient(p),
            Self::LocalApp(name) => Actor::local_app(name.clone()),
        }
    }
}

/// One item handed to [`Node::ingest`], tagged by what it claims to be.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Incoming {
    /// Claimed kind (decoded as that kind; anything else is rejected).
    pub kind: ItemKind,
    /// Signed wire bytes.
    pub bytes: Vec<u8>,
}

impl Incoming {
    /// An item of `kind`.
    pub fn new(kind: ItemKind, bytes: Vec<u8>) -> Self {
        Self { kind, bytes }
    }
}

/// An item refused for good.
#[derive(Debug)]
pub struct RejectedItem {
    /// Claimed kind.
    pub kind: ItemKind,
    /// Item id, or SHA-256 of the bytes when they do not decode (hex).
    pub id: String,
    /// Why, typed.
    pub error: Error,
}

/// What one [`Node::ingest`] did.
#[derive(Debug, Default)]
pub struct IngestReport {
    /// Items newly stored (all kinds, including envelopes released from the
    /// pending queue by a grant in this page).
    pub accepted: usize,
    /// Of the envelopes stored, those the node could open.
    pub readable: usize,
    /// Of the envelopes stored, those kept opaque (no key held).
    pub opaque: usize,
    /// Items put in the pending queue.
    pub pending: usize,
    /// Items not put in the pending queue because the caller's pending room
    /// ([`Node::ingest_capped`]) was used up; nothing of them is kept, and
    /// they can be sent again once the grant they wait for is here.
    pub refused: usize,
    /// Items refused for good (each recorded once).
    pub rejected: Vec<RejectedItem>,
    /// Consent items of patients this node holds nothing of, beyond the
    /// caps ([`Config::stranger_items_per_patient`], per source): not kept
    /// and not recorded as rejected — they are not invalid, only unwanted.
    pub unwanted: usize,
    /// Items already held, already pending or already rejected.
    pub duplicates: usize,
    /// Previously accepted envelopes excluded by a revocation in this page.
    pub excluded: usize,
    /// Opaque envelopes made readable by a key share in this page.
    pub unlocked: usize,
}

/// Most peers whose signed address record a node keeps.
pub const MAX_ADDRESS_RECORDS: usize = 4096;

/// How many envelopes the node holds for a patient (`GET /api/holdings`).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Holdings {
    /// did:key of the patient.
    pub patient: String,
    /// Envelopes held.
    pub envelopes: u64,
    /// Of those, readable here.
    pub readable: u64,
    /// Of those, opaque here.
    pub opaque: u64,
    /// Envelopes per collection name.
    pub by_collection: BTreeMap<String, u64>,
    /// Whether each collection granted to this node is complete here, by
    /// name ([`Node::completeness`]).
    #[serde(default)]
    pub completeness: BTreeMap<String, CollectionCompleteness>,
}

struct Inner {
    store: Arc<dyn Store>,
    identity: SecretIdentity,
    /// Key of the blind resource index, derived from the identity seed.
    index_key: Zeroizing<[u8; 32]>,
    me: PracticeId,
    /// `me` as text, for audit entries (formatting a PeerId costs a base58 encode).
    me_text: String,
    registry: RwLock<Registry>,
    /// Which changes of each actor are held, per document (seq gaps).
    chains: std::sync::Mutex<Chains>,
    committer: Committer,
    /// Signs audit checkpoints asked for (the committer has its own).
    checkpoints: audit::Checkpointer,
    events: broadcast::Sender<Event>,
    /// [`Event::Readable`] and [`Event::Excluded`] published so far: a
    /// reader of the record caches waits until they caught up with it
    /// ([`crate::Repository::settle`]).
    record_events: std::sync::atomic::AtomicU64,
    ingest_lock: tokio::sync::Mutex<()>,
    /// Consent items held of patients this node holds nothing of.
    strangers: std::sync::Mutex<Strangers>,
}

/// A node's store, consent registry and audit log behind one cheap-`Clone`
/// handle.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Node({})", self.inner.me)
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Decodes an Automerge change under `catch_unwind`; its (hash, actor, seq).
fn parse_change(plain: &[u8]) -> Option<([u8; 32], Vec<u8>, u64)> {
    std::panic::catch_unwind(AssertUnwindSafe(|| {
        automerge::Change::try_from(plain)
            .ok()
            .map(|c| (c.hash().0, c.actor_id().to_bytes().to_vec(), c.seq()))
    }))
    .ok()
    .flatten()
}

/// Opens `envelope` with `key`, checking the keyed change hash and that the
/// change's actor and seq are the header's.
/// Takes an item being judged again out of the pending queue (in the same batch).
fn dequeue(phase: &mut Phase, from_pending: Option<(PendingReason, [u8; 32])>) {
    if let Some((reason, hash)) = from_pending {
        phase.batch.push(Op::RemovePending { reason, hash });
    }
}

fn open_checked(envelope: &Envelope, key: &EpochKey) -> Result<Zeroizing<Vec<u8>>> {
    let mut identity = None;
    let plain = envelope.open(key, |plain| {
        let (hash, actor, seq) = parse_change(plain)?;
        identity = Some((actor, seq));
        Some(hash)
    })?;
    let h = envelope.header();
    match identity {
        Some((actor, seq)) if actor.as_slice() == h.actor.0.as_slice() && seq == h.seq => Ok(plain),
        _ => Err(Error::Rejected {
            kind: "envelope",
            id: envelope.id().to_string(),
            reason: "change actor or seq differ from the signed header".into(),
        }),
    }
}

fn envelope_meta(e: &Envelope) -> ItemMeta {
    let h = e.header();
    ItemMeta {
        kind: ItemKind::Envelope,
        id: e.id().into(),
        patient: h.patient,
        collection: Some(h.collection),
        grant: h.grant_id,
        principal: Some(h.author),
    }
}

fn envelope_entry(e: &Envelope, state: EnvelopeState) -> EnvelopeEntry {
    let h = e.header();
    EnvelopeEntry {
        id: e.id(),
        patient: h.patient,
        collection: h.collection,
        state,
        epoch: h.epoch,
        key_id: h.key_id,
        grant: h.grant_id,
        actor: h.actor,
        change_seq: h.seq,
        created_at: h.created_at,
        seq: 0,
    }
}

/// Decodes a stored or received item as `kind` (signature first).
fn decode_item(kind: ItemKind, bytes: &[u8]) -> std::result::Result<Decoded, medmesh_crypto::Error> {
    Ok(match kind {
        ItemKind::Envelope => Decoded::Envelope(Box::new(Envelope::decode(bytes)?)),
        ItemKind::Grant => Decoded::Grant(Grant::decode(bytes)?),
        ItemKind::Revocation => Decoded::Revocation(Revocation::decode(bytes)?),
        ItemKind::KeyShare => Decoded::KeyShare(KeyShare::decode(bytes)?),
    })
}

/// A stored envelope after the per-envelope work of a load.
enum Opened {
    /// Opened with the node's key: the change, or why it does not open.
    Checked(Result<Zeroizing<Vec<u8>>>),
    /// No longer verifies (to quarantine).
    Corrupt(medmesh_crypto::Error),
}

enum Decoded {
    Envelope(Box<Envelope>),
    Grant(Grant),
    Revocation(Revocation),
    KeyShare(KeyShare),
}

/// Consent items of one page, to apply to the registry after they are stored.
#[derive(Default)]
struct ConsentEffects {
    /// On the page's first pass, the items of patients this node has no
    /// relationship with yet, judged again after it ([`Node::welcome`]).
    deferred: Option<Vec<Incoming>>,
    grants: Vec<Grant>,
    revocations: Vec<Revocation>,
    shares: Vec<KeyShare>,
    keys: Vec<EpochKey>,
}

/// An item taken from the pending queue to judge again: its reason and hash
/// there (`None` for a new arrival).
type FromPending = Option<(PendingReason, [u8; 32])>;

/// An envelope parked in this phase: its hash and bytes.
type Parked = ([u8; 32], Vec<u8>);

/// Work of one ingest's second phase.
#[derive(Default)]
struct Phase {
    batch: Batch,
    seen: HashSet<[u8; 32]>,
    metas: HashMap<ItemId, ItemMeta>,
    received: BTreeMap<PatientId, Vec<ItemId>>,
    readable: BTreeMap<(PatientId, Collection), Vec<EnvelopeId>>,
    excluded: BTreeMap<(PatientId, Collection), Vec<EnvelopeId>>,
    /// How many more new items this ingest may park (`None`: no cap).
    pending_room: Option<usize>,
    /// Changes accepted in this phase, (patient, collection, actor, seq).
    changes: HashSet<(PatientId, Collection, ActorId, u64)>,
    /// Of those, the ones whose successor has not been looked for yet.
    to_release: Vec<(PatientId, Collection, ActorId, u64)>,
    /// Envelopes parked for a seq gap in this phase (not in the store yet).
    parked_gaps: HashMap<PendingReason, Vec<Parked>>,
    /// Per (patient, author): seq-gap entries this phase added minus those
    /// it released (the store's count changes only at commit).
    gaps_per_author: HashMap<(PatientId, [u8; 16]), isize>,
    /// Documents some envelopes of which this phase removes.
    removed_from: HashSet<Doc>,
}

impl Node {
    /// Opens the node whose data directory is `dir` (the store lives in
    /// `dir/store`), rebuilds the consent registry from the stored grants,
    /// revocations and key shares (re-opening this node's key shares with
    /// `identity`), and retries the pending queue.
    ///
    /// # Errors
    /// Store errors ([`Error::Storage`] when another process holds the store).
    pub async fn open(dir: &Path, identity: SecretIdentity, config: Config) -> Result<Self> {
        let path = dir.join(STORE_DIR);
        let store = tokio::task::spawn_blocking(move || SledStore::open(&path))
            .await
            .map_err(|e| Error::Storage(format!("open task failed: {e}")))??;
        Self::with_store(Arc::new(store), identity, config).await
    }

    /// As [`Node::open`] on any [`Store`].
    ///
    /// # Errors
    /// Store errors.
    pub async fn with_store(store: Arc<dyn Store>, identity: SecretIdentity, config: Config) -> Result<Self> {
        let me = identity.practice_id()?;
        let anchor = audit::check_anchor(&*store, me)?;
        let signed = match &anchor {
            audit::Anchor::Unanchored => Some(0),
            audit::Anchor::Intact(cp) => Some(cp.terms().seq),
            audit::Anchor::Truncated { entries, checkpoint } => {
                tracing::error!(
                    entries,
                    checkpoint = checkpoint.terms().seq,
                    "the audit log ends before its last signed checkpoint: entries were removed; \
                     no new checkpoint is signed until it is examined (`medmesh audit verify`)"
                );
                None
            }
            audit::Anchor::Rewritten(cp) => {
                tracing::error!(
                    seq = cp.terms().seq,
                    "the audit log's entry at its last signed checkpoint changed: the log was rewritten; \
                     no new checkpoint is signed until it is examined (`medmesh audit verify`)"
                );
                None
            }
        };
        let committer = Committer::start(
            store.clone(),
            config.group_commit_max,
            signed.map(|s| audit::Checkpointer::new(&identity, me, s)),
        )?;
        let checkpoints = audit::Checkpointer::new(&identity, me, 0);
        let (events, _) = broadcast::channel(config.event_capacity.max(1));
        let index_key = {
            let mut h = Sha256::new();
            h.update(INDEX_KEY_TAG);
            h.update(identity.seed().as_slice());
            Zeroizing::new(<[u8; 32]>::from(h.finalize()))
        };
        let node = Self {
            inner: Arc::new(Inner {
                store,
                identity,
                index_key,
                me,
                me_text: me.to_string(),
                registry: RwLock::new(Registry::default()),
                chains: std::sync::Mutex::new(Chains::default()),
                committer,
                checkpoints,
                events,
                record_events: std::sync::atomic::AtomicU64::new(0),
                ingest_lock: tokio::sync::Mutex::new(()),
                strangers: std::sync::Mutex::new(Strangers::new(
                    crate::strangers::Limits {
                        per_patient: config.stranger_items_per_patient,
                        per_source: config.stranger_items_per_source,
                        total: config.stranger_items_total,
                        introductions_per_source: config.introductions_per_source,
                        introductions: config.introductions,
                    },
                    std::time::Instant::now(),
                )),
            }),
        };
        node.rebuild_registry().await?;
        node.count_strangers()?;
        node.retry_all_pending().await?;
        tracing::info!(peer = %me, instance = %node.instance_id(), last_seq = node.last_seq(), "node store open");
        Ok(node)
    }

    fn store(&self) -> &dyn Store {
        &*self.inner.store
    }

    /// The raw store, for tests and repair tools (bit flips at rest).
    pub fn raw_store(&self) -> Arc<dyn Store> {
        self.inner.store.clone()
    }

    fn registry(&self) -> RwLockReadGuard<'_, Registry> {
        self.inner
            .registry
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn registry_mut(&self) -> RwLockWriteGuard<'_, Registry> {
        self.inner
            .registry
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// This node as a practice.
    pub fn practice_id(&self) -> PracticeId {
        self.inner.me
    }

    fn node_actor(&self) -> Actor {
        Actor {
            kind: ActorKind::Node,
            id: self.inner.me_text.clone(),
        }
    }

    /// Subscribes to [`Event`]s.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    fn publish(&self, event: Event) {
        if matches!(event, Event::Readable { .. } | Event::Excluded { .. }) {
            // Counted before it is sent: a waiter that reads the count then
            // waits for this event too.
            self.inner
                .record_events
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        // No subscriber is fine.
        let _ = self.inner.events.send(event);
    }

    /// How many [`Event::Readable`] and [`Event::Excluded`] this node has
    /// published (what a cache of readable records must have applied to
    /// show everything readable so far).
    pub fn record_events_published(&self) -> u64 {
        self.inner.record_events.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn publish_stored(&self, committed: &Committed, metas: &HashMap<ItemId, ItemMeta>, actor: Option<&Actor>) {
        let from = actor.and_then(|a| match a.kind {
            ActorKind::Peer => a.id.parse::<PeerId>().ok(),
            // The patient's CLI session speaks under the patient key.
            ActorKind::Patient => {
                a.id.parse::<PatientId>()
                    .ok()
                    .and_then(|p| PracticeId::from_bytes(*p.as_bytes()).ok())
                    .map(|k| k.peer_id())
            }
            _ => None,
        });
        for (id, seq) in &committed.items {
            if let Some(meta) = metas.get(id) {
                self.publish(Event::Stored(ItemStored {
                    seq: *seq,
                    kind: meta.kind,
                    id: *id,
                    patient: meta.patient,
                    collection: meta.collection,
                    from,
                }));
            }
        }
    }

    async fn commit(&self, batch: Batch, durable: bool) -> Result<Committed> {
        self.inner.committer.commit(batch, durable).await
    }

    /// Finishes queued writes, flushes and stops the committer. Later
    /// writes fail with [`Error::CommitterStopped`]; the store closes when
    /// the last handle is dropped.
    pub async fn close(&self) {
        let inner = self.inner.clone();
        // Joining a thread blocks.
        let _ = tokio::task::spawn_blocking(move || inner.committer.stop()).await;
    }

    // ----- write path -------------------------------------------------

    /// Seals `change` for (patient, collection) under the current epoch key
    /// and this node's read-write grant, stores it, and returns once it is
    /// durable; then publishes [`Event::Stored`]. The audit entry names this
    /// node; see [`Node::write_change_by`] to name the app.
    ///
    /// # Errors
    /// [`Error::NoWriteGrant`], [`Error::NoEpochKey`], [`Error::ForeignActor`],
    /// [`Error::ChangeTooLarge`];
    /// store errors when the durable append fails (the caller must then
    /// drop the change from its cached document).
    pub async fn write_change(
        &self,
        patient: PatientId,
        collection: Collection,
        change: Change<'_>,
    ) -> Result<EnvelopeId> {
        self.write_change_by(self.node_actor(), patient, collection, change)
            .await
    }

    /// [`Node::write_change`] on behalf of `actor` (audit).
    ///
    /// # Errors
    /// As [`Node::write_change`].
    pub async fn write_change_by(
        &self,
        actor: Actor,
        patient: PatientId,
        collection: Collection,
        change: Change<'_>,
    ) -> Result<EnvelopeId> {
        let ids = self
            .write_changes_by(actor, vec![(patient, collection, change)])
            .await?;
        ids.into_iter()
            .next()
            .ok_or_else(|| Error::Storage("a write stored no envelope".into()))
    }

    /// Several changes, for any (patient, collection) documents, written as
    /// **one** atomic store batch (a FHIR transaction): every change is sealed
    /// first, so a refusal ([`Error::NoWriteGrant`], [`Error::NoEpochKey`],
    /// [`Error::ForeignActor`]) of any of them writes nothing; then all
    /// envelopes with their index and audit entries are committed together and
    /// acknowledged once durable. The envelope ids come back in input order;
    /// [`Event::Stored`] is published for each, as for single writes.
    ///
    /// # Errors
    /// As [`Node::write_change`]; on any error none of the changes is stored
    /// (after a failed flush the committer removes them again, see
    /// `docs/storage.md`), and the caller must drop all of them from its
    /// cached documents.
    pub async fn write_changes_by(
        &self,
        actor: Actor,
        changes: Vec<(PatientId, Collection, Change<'_>)>,
    ) -> Result<Vec<EnvelopeId>> {
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        let time = now();
        let mut envelopes = Vec::with_capacity(changes.len());
        for (patient, collection, change) in changes {
            match self.seal_change(patient, collection, change, time) {
                Ok(envelope) => envelopes.push(envelope),
                Err(e) => {
                    let mut batch = Batch::new();
                    batch.push(Op::Audit(AuditRecord {
                        actor_kind: actor.kind,
                        actor_id: actor.id,
                        action: Action::Write,
                        patient: Some(patient),
                        items: Vec::new(),
                        grant: None,
                        outcome: format!("refused: {e}"),
                    }));
                    self.commit(batch, false).await?;
                    return Err(e);
                }
            }
        }
        let mut batch = Batch::new();
        let mut metas = HashMap::with_capacity(envelopes.len());
        let mut ids = Vec::with_capacity(envelopes.len());
        let mut written = Vec::with_capacity(envelopes.len());
        for (envelope, encoded) in envelopes {
            let h = envelope.header();
            written.push((h.patient, h.collection, h.actor, h.seq));
            let id = envelope.id();
            let meta = envelope_meta(&envelope);
            batch.push(Op::PutItem {
                meta: meta.clone(),
                bytes: encoded,
                envelope: Some(Box::new(envelope_entry(&envelope, EnvelopeState::Readable))),
            });
            batch.push(Op::Audit(AuditRecord {
                actor_kind: actor.kind,
                actor_id: actor.id.clone(),
                action: Action::Write,
                patient: Some(meta.patient),
                items: vec![id.into()],
                grant: envelope.header().grant_id,
                outcome: "ok".into(),
            }));
            metas.insert(meta.id, meta);
            ids.push(id);
        }
        let committed = self.commit(batch, true).await?;
        self.note_held(&written, &HashSet::new());
        tracing::debug!(envelopes = ids.len(), "changes stored");
        self.publish_stored(&committed, &metas, None);
        Ok(ids)
    }

    fn seal_change(
        &self,
        patient: PatientId,
        collection: Collection,
        change: Change<'_>,
        time: u64,
    ) -> Result<(Envelope, Vec<u8>)> {
        let me = self.inner.me;
        if !change.actor.belongs_to(me.as_bytes()) {
            return Err(Error::ForeignActor);
        }
        let (key, grant) = {
            let reg = self.registry();
            let grant = reg
                .grant_in_force(&patient, collection, &me, Access::ReadWrite, time)
                .map(Grant::id)
                .ok_or(Error::NoWriteGrant { patient, collection })?;
            let key = reg
                .current_key(&patient, collection)
                .cloned()
                .ok_or(Error::NoEpochKey { patient, collection })?;
            (key, grant)
        };
        // Refused (typed) if the key found is not this record's: the header
        // names the record the caller writes, never the key's.
        let envelope = Envelope::seal(
            (patient, collection),
            &key,
            &self.inner.identity,
            Some(grant),
            change,
            time,
        )?;
        let encoded = envelope.encode();
        if encoded.len() > MAX_ENVELOPE_BYTES {
            return Err(Error::ChangeTooLarge {
                patient,
                collection,
                bytes: encoded.len(),
                max: MAX_ENVELOPE_BYTES,
            });
        }
        // The same rule every other node applies on ingest.
        match self.registry().envelope_validity(envelope.header()) {
            Validity::Valid => Ok((envelope, encoded)),
            _ => Err(Error::NoWriteGrant { patient, collection }),
        }
    }

    // ----- ingest path ------------------------------------------------

    /// Ingests a page of items from a peer or the patient: decode (signature
    /// first), judge validity on signed data (DESIGN §5), open envelopes
    /// whose key the node holds, store, and publish [`Event`]s. Grants,
    /// revocations and key shares of the page are applied before its
    /// envelopes; they release pending envelopes, exclude envelopes beyond a
    /// new revocation's cut, and unlock opaque envelopes.
    ///
    /// # Errors
    /// Only store failures; bad items are reported in [`IngestReport::rejected`].
    pub async fn ingest(&self, items: Vec<Incoming>, source: Source) -> Result<IngestReport> {
        self.ingest_as(items, source.actor(), None).await
    }

    /// As [`Node::ingest`], but parks at most `pending_room` new items in the
    /// pending queue; the others are counted in [`IngestReport::refused`] and
    /// not kept (sync caps what one peer may park this way).
    ///
    /// # Errors
    /// As [`Node::ingest`].
    pub async fn ingest_capped(
        &self,
        items: Vec<Incoming>,
        source: Source,
        pending_room: usize,
    ) -> Result<IngestReport> {
        self.ingest_as(items, source.actor(), Some(pending_room)).await
    }

    /// Ingests envelopes rebuilt from a snapshot transfer
    /// ([`Node::restore_transfer`]) like envelopes of a page — same validity
    /// rules, pending queue, duplicates and audit — without verifying their
    /// signatures or opening their changes again: restoring did both.
    ///
    /// # Errors
    /// As [`Node::ingest`].
    pub async fn ingest_restored(
        &self,
        envelopes: Vec<crate::transfer::RestoredEnvelope>,
        source: Source,
        pending_room: Option<usize>,
    ) -> Result<IngestReport> {
        let actor = source.actor();
        let _guard = self.inner.ingest_lock.lock().await;
        let mut report = IngestReport::default();
        let mut phase = Phase {
            pending_room,
            ..Phase::default()
        };
        let mut envelopes: Vec<Envelope> = envelopes
            .into_iter()
            .map(crate::transfer::RestoredEnvelope::into_envelope)
            .collect();
        // A document's changes in seq order, so that each follows its predecessor.
        envelopes.sort_by_key(|e| e.header().seq);
        for envelope in envelopes {
            let bytes = envelope.encode();
            let hash = sha256(&bytes);
            if self.already_rejected(&phase, &hash)? {
                report.duplicates += 1;
                continue;
            }
            self.judge_decoded(&envelope, &bytes, hash, None, true, &actor, &mut phase, &mut report)?;
        }
        self.release_successors(&actor, &mut phase, &mut report)?;
        self.finish_phase(phase, &actor).await?;
        Ok(report)
    }

    async fn ingest_as(&self, items: Vec<Incoming>, actor: Actor, pending_room: Option<usize>) -> Result<IngestReport> {
        let _guard = self.inner.ingest_lock.lock().await;
        let mut report = IngestReport::default();
        let (consent, envelopes): (Vec<_>, Vec<_>) = items.into_iter().partition(|i| i.kind != ItemKind::Envelope);

        // Phase 1: consent items, stored before anything is judged by them.
        let mut effects = ConsentEffects::default();
        let mut phase = Phase {
            pending_room,
            ..Phase::default()
        };
        effects.deferred = Some(Vec::new());
        for item in consent {
            self.judge_consent(item, &actor, &mut phase, &mut effects, &mut report)?;
        }
        // A grant to this node anywhere in the page makes its patient's
        // other items welcome: those of patients without a relationship are
        // judged once every grant of the page is ([`Node::welcome`]).
        for item in effects.deferred.take().unwrap_or_default() {
            self.judge_consent(item, &actor, &mut phase, &mut effects, &mut report)?;
        }
        let committed = if phase.batch.is_empty() {
            None
        } else {
            Some(self.commit(std::mem::take(&mut phase.batch), true).await?)
        };
        // The registry learns the page's consent items before anyone hears
        // they were stored: sync decides on a `Stored` event whether to
        // follow a grant (`relates_to`), and must see the grant it heard of.
        {
            let mut reg = self.registry_mut();
            for g in &effects.grants {
                reg.add_grant(g.clone());
            }
            let mut strangers = self.strangers();
            for g in effects.grants.iter().filter(|g| g.terms().grantee == self.inner.me) {
                strangers.release(&g.terms().patient);
            }
            for r in &effects.revocations {
                reg.add_revocation(r.clone());
            }
            for s in &effects.shares {
                reg.note_share(s);
            }
            for k in &effects.keys {
                reg.add_key(k.clone());
            }
        }
        if let Some(committed) = committed {
            self.publish_stored(&committed, &phase.metas, Some(&actor));
        }

        // Phase 2: envelopes of the page, released pending ones, exclusions, unlocks.
        let pending_room = phase.pending_room;
        let mut phase = Phase {
            pending_room,
            ..Phase::default()
        };
        for r in &effects.revocations {
            self.exclude_beyond_cut(r, &actor, &mut phase, &mut report)?;
        }
        for k in &effects.keys {
            self.unlock(k, &mut phase, &mut report)?;
        }
        let page = envelopes.into_iter().map(|item| (item.bytes, None)).collect();
        self.judge_envelopes(page, &actor, &mut phase, &mut report)?;
        // Released items were parked already: moving them between reasons
        // parks nothing new.
        phase.pending_room = None;
        let mut released = Vec::new();
        for g in &effects.grants {
            released.extend(
                self.store()
                    .pending(Some(PendingReason::MissingGrant(g.terms().patient, g.id())))?,
            );
        }
        // Envelopes waiting for a change that a new revocation puts beyond
        // its cut are judged again: they are rejected now, not left waiting.
        for r in &effects.revocations {
            released.extend(self.seq_gaps_under(r)?);
        }
        let released = released
            .into_iter()
            .filter(|p| p.kind == ItemKind::Envelope)
            .map(|p| (p.bytes, Some((p.reason, p.hash))))
            .collect();
        self.judge_envelopes(released, &actor, &mut phase, &mut report)?;
        self.release_successors(&actor, &mut phase, &mut report)?;
        self.finish_phase(phase, &actor).await?;
        tracing::debug!(
            accepted = report.accepted,
            pending = report.pending,
            rejected = report.rejected.len(),
            duplicates = report.duplicates,
            "ingested page"
        );
        Ok(report)
    }

    async fn finish_phase(&self, mut phase: Phase, actor: &Actor) -> Result<()> {
        for (patient, items) in std::mem::take(&mut phase.received) {
            phase.batch.push(Op::Audit(AuditRecord {
                actor_kind: actor.kind,
                actor_id: actor.id.clone(),
                action: Action::Receive,
                patient: Some(patient),
                items,
                grant: None,
                outcome: "ok".into(),
            }));
        }
        if phase.batch.is_empty() {
            return Ok(());
        }
        let committed = self.commit(std::mem::take(&mut phase.batch), true).await?;
        let accepted: Vec<_> = phase.changes.drain().collect();
        self.note_held(&accepted, &phase.removed_from);
        self.publish_stored(&committed, &phase.metas, Some(actor));
        for ((patient, collection), ids) in phase.excluded {
            // The snapshot may hold excluded changes; loads check coverage too.
            if let Err(e) = self.drop_snapshot(patient, collection) {
                tracing::warn!(%collection, cause = %e, "dropping a snapshot failed");
            }
            self.publish(Event::Excluded {
                patient,
                collection,
                ids,
            });
        }
        for ((patient, collection), ids) in phase.readable {
            self.publish(Event::Readable {
                patient,
                collection,
                ids,
            });
        }
        Ok(())
    }

    /// Records a permanent rejection once, with an audit entry.
    fn reject(&self, phase: &mut Phase, rejected: &mut Vec<RejectedItem>, refusal: Refusal, actor: &Actor) {
        let Refusal {
            kind,
            key,
            patient,
            error,
        } = refusal;
        let id = hex::encode(key);
        tracing::info!(kind = kind.as_str(), item = %id, cause = %error, "item rejected");
        phase.batch.push(Op::AddRejected {
            key,
            reason: error.to_string(),
        });
        phase.batch.push(Op::Audit(AuditRecord {
            actor_kind: actor.kind,
            actor_id: actor.id.clone(),
            action: Action::Reject,
            patient,
            items: vec![ItemId(key)],
            grant: None,
            outcome: format!("rejected: {error}"),
        }));
        phase.seen.insert(key);
        rejected.push(RejectedItem { kind, id, error });
    }

    fn already_rejected(&self, phase: &Phase, key: &[u8; 32]) -> Result<bool> {
        Ok(phase.seen.contains(key) || self.store().rejected(key)?.is_some())
    }

    fn judge_consent(
        &self,
        item: Incoming,
        actor: &Actor,
        phase: &mut Phase,
        effects: &mut ConsentEffects,
        report: &mut IngestReport,
    ) -> Result<()> {
        let hash = sha256(&item.bytes);
        if self.already_rejected(phase, &hash)? {
            report.duplicates += 1;
            return Ok(());
        }
        let decoded = match decode_item(item.kind, &item.bytes) {
            Ok(d) => d,
            Err(medmesh_crypto::Error::UnsupportedVersion { .. }) => {
                self.queue_pending(phase, report, PendingReason::UnsupportedVersion, hash, item)?;
                return Ok(());
            }
            Err(e) => {
                self.reject(
                    phase,
                    &mut report.rejected,
                    Refusal {
                        kind: item.kind,
                        key: hash,
                        patient: None,
                        error: e.into(),
                    },
                    actor,
                );
                return Ok(());
            }
        };
        let id = ItemId(hash);
        if self.store().contains(&id)? || !phase.seen.insert(hash) {
            report.duplicates += 1;
            return Ok(());
        }
        if let Some(bound) = self.bound_elsewhere(&decoded)? {
            phase.seen.remove(&hash);
            let patient = match &decoded {
                Decoded::Grant(g) => Some(g.terms().patient),
                Decoded::KeyShare(s) => Some(s.terms().patient),
                _ => None,
            };
            self.reject(
                phase,
                &mut report.rejected,
                Refusal {
                    kind: item.kind,
                    key: hash,
                    patient,
                    error: Error::IdCollision {
                        kind: item.kind.as_str(),
                        id: hex::encode(hash),
                        bound,
                    },
                },
                actor,
            );
            return Ok(());
        }
        if !self.welcome(&decoded, actor, effects)? {
            phase.seen.remove(&hash);
            match effects.deferred.as_mut() {
                Some(later) => later.push(item),
                None => report.unwanted += 1,
            }
            return Ok(());
        }
        let (meta, action, grant) = match &decoded {
            Decoded::Grant(g) => (
                ItemMeta {
                    kind: ItemKind::Grant,
                    id,
                    patient: g.terms().patient,
                    collection: None,
                    grant: Some(g.id()),
                    principal: Some(Principal::Practice(g.terms().grantee)),
                },
                Action::Grant,
                Some(g.id()),
            ),
            Decoded::Revocation(r) => (
                ItemMeta {
                    kind: ItemKind::Revocation,
                    id,
                    patient: r.terms().patient,
                    collection: None,
                    grant: Some(r.grant_id()),
                    principal: None,
                },
                Action::Revoke,
                Some(r.grant_id()),
            ),
            Decoded::KeyShare(s) => {
                let t = s.terms();
                if t.recipient == Principal::Practice(self.inner.me) {
                    match s.open(&self.inner.identity) {
                        Ok(key) => effects.keys.push(key),
                        Err(e) => {
                            phase.seen.remove(&hash);
                            self.reject(
                                phase,
                                &mut report.rejected,
                                Refusal {
                                    kind: item.kind,
                                    key: hash,
                                    patient: Some(t.patient),
                                    error: e.into(),
                                },
                                actor,
                            );
                            return Ok(());
                        }
                    }
                }
                (
                    ItemMeta {
                        kind: ItemKind::KeyShare,
                        id,
                        patient: t.patient,
                        collection: Some(t.collection),
                        grant: None,
                        principal: Some(t.recipient),
                    },
                    Action::KeyShare,
                    None,
                )
            }
            // Partitioned out before.
            Decoded::Envelope(_) => return Ok(()),
        };
        phase.batch.push(Op::PutItem {
            meta: meta.clone(),
            bytes: item.bytes,
            envelope: None,
        });
        phase.batch.push(Op::Audit(AuditRecord {
            actor_kind: actor.kind,
            actor_id: actor.id.clone(),
            action,
            patient: Some(meta.patient),
            items: vec![id],
            grant,
            outcome: "ok".into(),
        }));
        phase.metas.insert(id, meta);
        match decoded {
            Decoded::Grant(g) => effects.grants.push(g),
            Decoded::Revocation(r) => effects.revocations.push(r),
            Decoded::KeyShare(s) => effects.shares.push(s),
            Decoded::Envelope(_) => {}
        }
        report.accepted += 1;
        Ok(())
    }

    /// Whether a grant's or key share's id is already bound here to another
    /// tuple, and to what (`docs/decisions.md`, "Copied key ids and grant
    /// ids"): to another collection or epoch of the same patient (only that
    /// patient signs both), or to another patient's grant or key that this
    /// node has itself written under — a use no other identity can bring
    /// about, so a copy can never take an id away from the patient whose
    /// records this node writes. Any other copy is held in its own scope:
    /// every lookup goes by patient, so it reaches nothing of the other
    /// patient's, and refusing it might refuse the genuine item instead.
    fn bound_elsewhere(&self, decoded: &Decoded) -> Result<Option<&'static str>> {
        let mine = |e: &EnvelopeEntry| e.actor.belongs_to(self.inner.me.as_bytes());
        match decoded {
            Decoded::Grant(g) => {
                let id = g.id();
                let others = self.registry().other_patients_with_grant_id(&g.terms().patient, &id);
                for other in others {
                    let written = self.store().envelopes(&other, None)?;
                    if written.iter().any(|e| e.grant == Some(id) && mine(e)) {
                        return Ok(Some("another patient's grant this node writes under"));
                    }
                }
            }
            Decoded::KeyShare(share) => {
                let t = share.terms();
                let others = self.registry().other_keys_with_key_id(t);
                for other in others {
                    if other.patient == t.patient {
                        return Ok(Some("another collection or epoch of its patient"));
                    }
                    let written = self.store().envelopes(&other.patient, Some(other.collection))?;
                    if written
                        .iter()
                        .any(|e| e.epoch == other.epoch && e.key_id == other.key_id && mine(e))
                    {
                        return Ok(Some("another patient's key this node writes under"));
                    }
                }
            }
            Decoded::Revocation(_) | Decoded::Envelope(_) => {}
        }
        Ok(None)
    }

    fn strangers(&self) -> std::sync::MutexGuard<'_, Strangers> {
        self.inner
            .strangers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether this node has a relationship with `patient`: it holds
    /// envelopes of theirs or a grant from them to itself (revoked or
    /// expired included: the practice still takes part in that record's
    /// consent flows). Sync follows a patient's address hints and forwards
    /// their consent items only then, and only then keeps their consent
    /// items without a cap.
    ///
    /// # Errors
    /// Store failures.
    pub fn relates_to(&self, patient: &PatientId) -> Result<bool> {
        let granted = self.registry().peers_with_grant_from(patient).contains(&self.inner.me);
        Ok(granted || !self.store().envelopes(patient, None)?.is_empty())
    }

    /// The patients whose records this node and `peer` may both read now
    /// (a grant in force names each): what anti-entropy compares with it.
    pub fn patients_shared_with(&self, peer: &PracticeId) -> Vec<PatientId> {
        self.registry().patients_shared(&self.inner.me, peer, now())
    }

    /// Whether to keep a new consent item from `actor` (flood limits,
    /// docs/protocol.md §10a, [`Strangers`]): any item of a patient the
    /// node has a relationship with (one made by a grant to it in this page
    /// included); a grant naming this node from its patient's own session
    /// always, from anyone else at the introduction rate; other items
    /// within the caps of [`Strangers`], counted only on the page's second pass
    /// (`effects.deferred` is `None`), when every grant of the page is
    /// known. Items the node itself or a local app (with the gateway's
    /// token) submits are not capped.
    fn welcome(&self, decoded: &Decoded, actor: &Actor, effects: &ConsentEffects) -> Result<bool> {
        let me = self.inner.me;
        let (patient, names_me) = match decoded {
            Decoded::Grant(g) => (g.terms().patient, g.terms().grantee == me),
            Decoded::Revocation(r) => (r.terms().patient, false),
            Decoded::KeyShare(s) => (s.terms().patient, false),
            Decoded::Envelope(e) => (e.header().patient, false),
        };
        if !matches!(actor.kind, ActorKind::Peer | ActorKind::Patient) {
            return Ok(true);
        }
        // The Noise handshake proved the session's patient identity.
        let own_session = actor.kind == ActorKind::Patient && actor.id == patient.to_string();
        if names_me && own_session {
            return Ok(true);
        }
        if self.relates_to(&patient)? {
            self.strangers().release(&patient);
            return Ok(true);
        }
        if names_me {
            let introduced = self.strangers().introduce(&actor.id, std::time::Instant::now());
            if !introduced {
                tracing::info!(source = %actor.id, "grant naming this node for a patient it holds nothing of, over the introduction rate; refused");
            }
            return Ok(introduced);
        }
        let granted_in_page = effects
            .grants
            .iter()
            .any(|g| g.terms().patient == patient && g.terms().grantee == me);
        if granted_in_page {
            self.strangers().release(&patient);
            return Ok(true);
        }
        if effects.deferred.is_some() {
            return Ok(false);
        }
        let admitted = self.strangers().admit(patient, &actor.id);
        if !admitted {
            tracing::debug!(source = %actor.id, "consent item of a patient this node holds nothing of, over the cap; refused");
        }
        Ok(admitted)
    }

    /// Counts the consent items held of patients this node holds nothing
    /// of, at open (their sources are not stored: they count for their
    /// patient only).
    fn count_strangers(&self) -> Result<()> {
        let mut per_patient: HashMap<PatientId, usize> = HashMap::new();
        for item in self.store().consent_items()? {
            *per_patient.entry(item.meta.patient).or_default() += 1;
        }
        for (patient, items) in per_patient {
            if !self.relates_to(&patient)? {
                self.strangers().note_held(patient, items);
            }
        }
        Ok(())
    }

    fn queue_pending(
        &self,
        phase: &mut Phase,
        report: &mut IngestReport,
        reason: PendingReason,
        hash: [u8; 32],
        item: Incoming,
    ) -> Result<()> {
        let already = self.store().pending(Some(reason))?.iter().any(|p| p.hash == hash);
        if already || !phase.seen.insert(hash) {
            report.duplicates += 1;
            return Ok(());
        }
        if let Some(room) = phase.pending_room.as_mut() {
            if *room == 0 {
                phase.seen.remove(&hash);
                report.refused += 1;
                return Ok(());
            }
            *room -= 1;
        }
        tracing::debug!(kind = item.kind.as_str(), item = %hex::encode(hash), ?reason, "item pending");
        phase.batch.push(Op::AddPending(PendingItem {
            reason,
            hash,
            kind: item.kind,
            bytes: item.bytes,
        }));
        report.pending += 1;
        Ok(())
    }

    /// Judges envelopes (of a page, or released from the pending queue) in
    /// change seq order, so that a page carrying an actor's changes out of
    /// order still lands whole.
    fn judge_envelopes(
        &self,
        items: Vec<(Vec<u8>, FromPending)>,
        actor: &Actor,
        phase: &mut Phase,
        report: &mut IngestReport,
    ) -> Result<()> {
        let mut decoded = Vec::with_capacity(items.len());
        for (bytes, from_pending) in items {
            if let Some((envelope, hash)) = self.decode_envelope(&bytes, from_pending, actor, phase, report)? {
                decoded.push((envelope, bytes, hash, from_pending));
            }
        }
        decoded.sort_by_key(|(envelope, ..)| envelope.header().seq);
        for (envelope, bytes, hash, from_pending) in decoded {
            self.judge_decoded(&envelope, &bytes, hash, from_pending, false, actor, phase, report)?;
        }
        Ok(())
    }

    /// Decodes (signature first) an envelope to judge; `None` when it is
    /// already rejected, waits for a newer build, or is rejected now.
    fn decode_envelope(
        &self,
        bytes: &[u8],
        from_pending: Option<(PendingReason, [u8; 32])>,
        actor: &Actor,
        phase: &mut Phase,
        report: &mut IngestReport,
    ) -> Result<Option<(Envelope, [u8; 32])>> {
        let hash = sha256(bytes);
        if from_pending.is_none() && self.already_rejected(phase, &hash)? {
            report.duplicates += 1;
            return Ok(None);
        }
        match Envelope::decode(bytes) {
            Ok(e) => Ok(Some((e, hash))),
            Err(medmesh_crypto::Error::UnsupportedVersion { .. }) => {
                if from_pending.is_none() {
                    self.queue_pending(
                        phase,
                        report,
                        PendingReason::UnsupportedVersion,
                        hash,
                        Incoming::new(ItemKind::Envelope, bytes.to_vec()),
                    )?;
                }
                Ok(None)
            }
            Err(e) => {
                dequeue(phase, from_pending);
                self.reject(
                    phase,
                    &mut report.rejected,
                    Refusal {
                        kind: ItemKind::Envelope,
                        key: hash,
                        patient: None,
                        error: e.into(),
                    },
                    actor,
                );
                Ok(None)
            }
        }
    }

    /// Whether change `seq` of `actor` in `doc` is held, committed or
    /// accepted earlier in this phase.
    fn holds_change(&self, phase: &Phase, doc: Doc, actor: &ActorId, seq: u64) -> Result<bool> {
        if phase.changes.contains(&(doc.0, doc.1, *actor, seq)) {
            return Ok(true);
        }
        let mut chains = self
            .inner
            .chains
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !chains.is_loaded(&doc) {
            let held = self.store().envelopes(&doc.0, Some(doc.1))?;
            chains.load(doc, held.into_iter().map(|e| (e.actor, e.change_seq)));
        }
        Ok(chains.holds(&doc, actor, seq).unwrap_or(false))
    }

    /// Notes committed envelopes in the chains, after forgetting the
    /// documents envelopes were removed from.
    fn note_held(&self, held: &[(PatientId, Collection, ActorId, u64)], removed_from: &HashSet<Doc>) {
        let mut chains = self
            .inner
            .chains
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for doc in removed_from {
            chains.forget(doc);
        }
        for (patient, collection, actor, seq) in held {
            chains.insert(&(*patient, *collection), *actor, *seq);
        }
    }

    /// Parks a valid envelope whose change does not follow one held here,
    /// until the gap fills; refuses it (keeps nothing) when its author
    /// already has [`MAX_SEQ_GAPS_PER_AUTHOR`] waiting for this patient.
    fn park_gap(
        &self,
        h: &EnvelopeHeader,
        bytes: &[u8],
        hash: [u8; 32],
        from_pending: Option<(PendingReason, [u8; 32])>,
        phase: &mut Phase,
        report: &mut IngestReport,
    ) -> Result<()> {
        let reason = PendingReason::SeqGap {
            patient: h.patient,
            actor: h.actor,
            collection: h.collection,
            seq: h.seq,
        };
        if from_pending.map(|(r, _)| r) == Some(reason) {
            // Still waiting.
            return Ok(());
        }
        dequeue(phase, from_pending);
        let author = h.actor.author_tag();
        let in_phase = phase.gaps_per_author.get(&(h.patient, author)).copied().unwrap_or(0);
        let stored = isize::try_from(self.store().seq_gaps_of(&h.patient, &author)?).unwrap_or(isize::MAX);
        let cap = isize::try_from(MAX_SEQ_GAPS_PER_AUTHOR).unwrap_or(isize::MAX);
        if stored.saturating_add(in_phase) >= cap {
            tracing::info!(envelope = %hex::encode(hash), "seq gaps of this author full; envelope refused");
            report.refused += 1;
            return Ok(());
        }
        let before = report.pending;
        self.queue_pending(
            phase,
            report,
            reason,
            hash,
            Incoming::new(ItemKind::Envelope, bytes.to_vec()),
        )?;
        if report.pending > before {
            *phase.gaps_per_author.entry((h.patient, author)).or_default() += 1;
            phase
                .parked_gaps
                .entry(reason)
                .or_default()
                .push((hash, bytes.to_vec()));
        }
        Ok(())
    }

    /// Judges again the envelopes waiting for the successor of each change
    /// accepted in this phase, until no more follow.
    fn release_successors(&self, actor: &Actor, phase: &mut Phase, report: &mut IngestReport) -> Result<()> {
        while let Some((patient, collection, change_actor, seq)) = phase.to_release.pop() {
            let Some(next) = seq.checked_add(1) else {
                continue;
            };
            let reason = PendingReason::SeqGap {
                patient,
                actor: change_actor,
                collection,
                seq: next,
            };
            let mut waiting: Vec<Parked> = self
                .store()
                .pending(Some(reason))?
                .into_iter()
                .map(|p| (p.hash, p.bytes))
                .collect();
            if let Some(parked) = phase.parked_gaps.remove(&reason) {
                report.pending = report.pending.saturating_sub(parked.len());
                waiting.extend(parked);
            }
            // Released now: they no longer count against their author's
            // share, or one long page that parks and releases more than the
            // share in turn would refuse the rest of an honest history.
            let author = change_actor.author_tag();
            let released = isize::try_from(waiting.len()).unwrap_or(isize::MAX);
            if released > 0 {
                *phase.gaps_per_author.entry((patient, author)).or_default() -= released;
            }
            let items = waiting
                .into_iter()
                .map(|(hash, bytes)| (bytes, Some((reason, hash))))
                .collect();
            self.judge_envelopes(items, actor, phase, report)?;
        }
        Ok(())
    }

    /// The envelopes waiting for a seq gap that `revocation`'s grantee wrote
    /// for its patient.
    fn seq_gaps_under(&self, revocation: &Revocation) -> Result<Vec<PendingItem>> {
        let patient = revocation.terms().patient;
        let Some(grantee) = self
            .registry()
            .grant(&patient, &revocation.grant_id())
            .map(|g| g.terms().grantee)
        else {
            return Ok(Vec::new());
        };
        Ok(self
            .store()
            .pending(None)?
            .into_iter()
            .filter(|p| {
                matches!(p.reason, PendingReason::SeqGap { patient: q, actor, .. }
                    if q == patient && actor.belongs_to(grantee.as_bytes()))
            })
            .collect())
    }

    /// [`Node::judge_envelopes`] once the envelope decoded and verified.
    /// `change_checked`: its change was already matched to the signed
    /// keyed change hash, actor and seq (a restored envelope), so a held key
    /// makes it readable without opening it again.
    #[allow(clippy::too_many_arguments)]
    fn judge_decoded(
        &self,
        envelope: &Envelope,
        bytes: &[u8],
        hash: [u8; 32],
        from_pending: Option<(PendingReason, [u8; 32])>,
        change_checked: bool,
        actor: &Actor,
        phase: &mut Phase,
        report: &mut IngestReport,
    ) -> Result<()> {
        let id = envelope.id();
        let h = envelope.header();
        if phase.seen.contains(&id.0) || self.store().contains(&id.into())? || self.store().rejected(&id.0)?.is_some() {
            dequeue(phase, from_pending);
            report.duplicates += 1;
            return Ok(());
        }
        let (validity, key, expired) = {
            let reg = self.registry();
            (
                reg.envelope_validity(h),
                reg.key(&h.key_ref()).cloned(),
                reg.expired_unrevoked(h, now()),
            )
        };
        // First seen now, after its grant expired (envelopes waiting for a
        // seq gap were seen when they were parked).
        let first_seen_now = !matches!(from_pending, Some((PendingReason::SeqGap { .. }, _)));
        match validity {
            Validity::MissingGrant(patient, grant) => {
                let reason = PendingReason::MissingGrant(patient, grant);
                if from_pending.map(|(r, _)| r) != Some(reason) {
                    dequeue(phase, from_pending);
                    self.queue_pending(
                        phase,
                        report,
                        reason,
                        hash,
                        Incoming::new(ItemKind::Envelope, bytes.to_vec()),
                    )?;
                }
            }
            Validity::Invalid(reason) => {
                dequeue(phase, from_pending);
                let error = Error::Rejected {
                    kind: "envelope",
                    id: id.to_string(),
                    reason: reason.into(),
                };
                self.reject(
                    phase,
                    &mut report.rejected,
                    Refusal {
                        kind: ItemKind::Envelope,
                        key: id.0,
                        patient: Some(h.patient),
                        error,
                    },
                    actor,
                );
            }
            Validity::Valid if expired && first_seen_now => {
                dequeue(phase, from_pending);
                tracing::info!(envelope = %id, "first seen after its grant expired; refused until a revocation decides");
                report.refused += 1;
            }
            Validity::Valid
                if h.seq > 1 && !self.holds_change(phase, (h.patient, h.collection), &h.actor, h.seq - 1)? =>
            {
                self.park_gap(h, bytes, hash, from_pending, phase, report)?;
            }
            Validity::Valid => {
                let state = match key.as_ref() {
                    Some(_) if change_checked => EnvelopeState::Readable,
                    Some(key) => match open_checked(envelope, key) {
                        Ok(_plain) => EnvelopeState::Readable,
                        Err(error) => {
                            dequeue(phase, from_pending);
                            self.reject(
                                phase,
                                &mut report.rejected,
                                Refusal {
                                    kind: ItemKind::Envelope,
                                    key: id.0,
                                    patient: Some(h.patient),
                                    error,
                                },
                                actor,
                            );
                            return Ok(());
                        }
                    },
                    None => EnvelopeState::Opaque,
                };
                dequeue(phase, from_pending);
                let meta = envelope_meta(envelope);
                phase.batch.push(Op::PutItem {
                    meta: meta.clone(),
                    bytes: bytes.to_vec(),
                    envelope: Some(Box::new(envelope_entry(envelope, state))),
                });
                phase.seen.insert(id.0);
                phase.metas.insert(meta.id, meta);
                phase.received.entry(h.patient).or_default().push(id.into());
                phase.changes.insert((h.patient, h.collection, h.actor, h.seq));
                phase.to_release.push((h.patient, h.collection, h.actor, h.seq));
                report.accepted += 1;
                match state {
                    EnvelopeState::Readable => {
                        report.readable += 1;
                        phase.readable.entry((h.patient, h.collection)).or_default().push(id);
                    }
                    EnvelopeState::Opaque => report.opaque += 1,
                }
            }
        }
        Ok(())
    }

    /// Envelopes accepted under `revocation`'s grant before it arrived whose
    /// change lies beyond its cut: removed from reads and serving, recorded
    /// as rejected (validity depends on the cut, not on arrival order).
    fn exclude_beyond_cut(
        &self,
        revocation: &Revocation,
        actor: &Actor,
        phase: &mut Phase,
        report: &mut IngestReport,
    ) -> Result<()> {
        let patient = revocation.terms().patient;
        let grant_id = revocation.grant_id();
        let entries = self.store().envelopes(&patient, None)?;
        let reg = self.registry();
        let Some(grant) = reg.grant(&patient, &grant_id) else {
            return Ok(());
        };
        let revocations = reg.revocations_of(&patient, &grant_id);
        let mut excluded = Vec::new();
        for e in entries.into_iter().filter(|e| e.grant == Some(grant_id)) {
            let admitted = revocations
                .iter()
                .all(|r| grant.admits_change(e.collection, e.created_at, &e.actor, e.change_seq, Some(r)));
            if !admitted {
                excluded.push(e);
            }
        }
        drop(reg);
        for e in excluded {
            tracing::info!(envelope = %e.id, grant = %grant_id, "envelope excluded: beyond revocation cut");
            phase.batch.push(Op::RemoveItem(e.id.into()));
            phase.batch.push(Op::AddRejected {
                key: e.id.0,
                reason: "beyond the cut of a revocation of its grant".into(),
            });
            phase.batch.push(Op::Audit(AuditRecord {
                actor_kind: actor.kind,
                actor_id: actor.id.clone(),
                action: Action::Exclude,
                patient: Some(patient),
                items: vec![e.id.into()],
                grant: Some(grant_id),
                outcome: "excluded: beyond revocation cut".into(),
            }));
            phase.seen.insert(e.id.0);
            phase.removed_from.insert((patient, e.collection));
            phase.excluded.entry((patient, e.collection)).or_default().push(e.id);
            report.excluded += 1;
        }
        Ok(())
    }

    /// Opens the opaque envelopes a new key unlocks.
    fn unlock(&self, key: &EpochKey, phase: &mut Phase, report: &mut IngestReport) -> Result<()> {
        let entries = self.store().envelopes(&key.patient, Some(key.collection))?;
        for mut e in entries
            .into_iter()
            .filter(|e| e.state == EnvelopeState::Opaque && e.epoch == key.epoch && e.key_id == key.key_id)
        {
            if phase.seen.contains(&e.id.0) {
                continue;
            }
            let Some(item) = self.store().item(&e.id.into())? else {
                continue;
            };
            let verdict = Envelope::decode(&item.bytes)
                .map_err(Error::from)
                .and_then(|env| open_checked(&env, key).map(|_| ()));
            match verdict {
                Ok(()) => {
                    e.state = EnvelopeState::Readable;
                    phase.readable.entry((e.patient, e.collection)).or_default().push(e.id);
                    phase.batch.push(Op::PutEnvelopeEntry(Box::new(e)));
                    report.unlocked += 1;
                }
                Err(error) => {
                    let actor = self.node_actor();
                    phase.batch.push(Op::RemoveItem(e.id.into()));
                    phase.removed_from.insert((e.patient, e.collection));
                    self.reject(
                        phase,
                        &mut report.rejected,
                        Refusal {
                            kind: ItemKind::Envelope,
                            key: e.id.0,
                            patient: Some(e.patient),
                            error,
                        },
                        &actor,
                    );
                }
            }
        }
        Ok(())
    }

    async fn rebuild_registry(&self) -> Result<()> {
        let items = self.store().consent_items()?;
        // Verifying signatures dominates the open of a large store: spread it
        // over the cores, keeping store order for the registry.
        let decoded: Vec<(ItemMeta, std::result::Result<Decoded, medmesh_crypto::Error>)> =
            crate::par::map(&items, 64, |item| {
                (item.meta.clone(), decode_item(item.meta.kind, &item.bytes))
            })
            .ok_or_else(|| Error::Storage("verifying consent items at open failed".into()))?;
        drop(items);
        let mut corrupt = Vec::new();
        {
            let mut reg = self.registry_mut();
            for (meta, item) in decoded {
                match item {
                    Ok(Decoded::Grant(g)) => reg.add_grant(g),
                    Ok(Decoded::Revocation(r)) => {
                        reg.add_revocation(r);
                    }
                    Ok(Decoded::KeyShare(s)) => {
                        reg.note_share(&s);
                        // Opened on first use, not here (HPKE per share at open is slow).
                        if s.terms().recipient == Principal::Practice(self.inner.me) {
                            reg.add_unopened_share(s, &self.inner.identity);
                        }
                    }
                    Ok(Decoded::Envelope(_)) => {}
                    Err(e) => corrupt.push((meta, e)),
                }
            }
        }
        for (meta, e) in corrupt {
            self.quarantine(&meta, e).await?;
        }
        Ok(())
    }

    async fn retry_all_pending(&self) -> Result<()> {
        let pending = self.store().pending(None)?;
        if pending.is_empty() {
            return Ok(());
        }
        let actor = self.node_actor();
        // Consent items of a format this build now reads are ingested anew.
        let mut readable_now = Vec::new();
        let mut dequeue = Batch::new();
        let mut envelopes = Vec::new();
        for p in pending {
            if p.kind == ItemKind::Envelope {
                envelopes.push(p);
            } else if !matches!(
                decode_item(p.kind, &p.bytes),
                Err(medmesh_crypto::Error::UnsupportedVersion { .. })
            ) {
                dequeue.push(Op::RemovePending {
                    reason: p.reason,
                    hash: p.hash,
                });
                readable_now.push(Incoming::new(p.kind, p.bytes));
            }
        }
        if !dequeue.is_empty() {
            self.commit(dequeue, true).await?;
        }
        if !readable_now.is_empty() {
            self.ingest_as(readable_now, actor.clone(), None).await?;
        }
        let _guard = self.inner.ingest_lock.lock().await;
        let mut phase = Phase::default();
        let mut report = IngestReport::default();
        let envelopes = envelopes
            .into_iter()
            .map(|p| (p.bytes, Some((p.reason, p.hash))))
            .collect();
        self.judge_envelopes(envelopes, &actor, &mut phase, &mut report)?;
        self.release_successors(&actor, &mut phase, &mut report)?;
        self.finish_phase(phase, &actor).await
    }

    /// Removes a stored item that no longer verifies (bit rot, tampering),
    /// with an audit entry; reconciliation fetches it again from a peer.
    async fn quarantine(&self, meta: &ItemMeta, error: medmesh_crypto::Error) -> Result<Error> {
        tracing::error!(item = %meta.id, kind = meta.kind.as_str(), cause = %error, "stored item fails verification; quarantined");
        let mut batch = Batch::new();
        // Removed, not recorded as rejected: bit rot is not the author's
        // fault, and the good copy must be accepted again from a peer.
        batch.push(Op::RemoveItem(meta.id));
        batch.push(Op::Audit(AuditRecord {
            actor_kind: ActorKind::Node,
            actor_id: self.inner.me.to_string(),
            action: Action::Quarantine,
            patient: Some(meta.patient),
            items: vec![meta.id],
            grant: None,
            outcome: format!("quarantined: {error}"),
        }));
        self.commit(batch, true).await?;
        if let (ItemKind::Envelope, Some(collection)) = (meta.kind, meta.collection) {
            self.note_held(&[], &HashSet::from([(meta.patient, collection)]));
            if let Err(e) = self.drop_snapshot(meta.patient, collection) {
                tracing::warn!(%collection, cause = %e, "dropping a snapshot failed");
            }
            self.publish(Event::Excluded {
                patient: meta.patient,
                collection,
                ids: vec![EnvelopeId(meta.id.0)],
            });
        }
        Ok(Error::CorruptItem {
            id: meta.id.to_string(),
            source: error,
        })
    }

    /// Decodes a stored item; one that no longer verifies is quarantined
    /// and reported as [`Error::CorruptItem`].
    async fn verified(&self, item: &StoredItem) -> Result<Decoded> {
        match decode_item(item.meta.kind, &item.bytes) {
            Ok(d) => Ok(d),
            Err(e) => Err(self.quarantine(&item.meta, e).await?),
        }
    }

    // ----- submission API ---------------------------------------------

    /// Grants, revocations and key shares submitted by the patient (CLI or
    /// management API); they go through [`Node::ingest`].
    ///
    /// # Errors
    /// As [`Node::ingest`].
    pub async fn submit(&self, patient: PatientId, items: Vec<Incoming>) -> Result<IngestReport> {
        self.ingest(items, Source::Patient(patient)).await
    }

    /// Submits one grant.
    ///
    /// # Errors
    /// As [`Node::ingest`].
    pub async fn submit_grant(&self, patient: PatientId, grant: Vec<u8>) -> Result<IngestReport> {
        self.submit(patient, vec![Incoming::new(ItemKind::Grant, grant)]).await
    }

    /// Submits one revocation.
    ///
    /// # Errors
    /// As [`Node::ingest`].
    pub async fn submit_revocation(&self, patient: PatientId, revocation: Vec<u8>) -> Result<IngestReport> {
        self.submit(patient, vec![Incoming::new(ItemKind::Revocation, revocation)])
            .await
    }

    /// Submits key shares.
    ///
    /// # Errors
    /// As [`Node::ingest`].
    pub async fn submit_key_shares(&self, patient: PatientId, shares: Vec<Vec<u8>>) -> Result<IngestReport> {
        let items = shares
            .into_iter()
            .map(|s| Incoming::new(ItemKind::KeyShare, s))
            .collect();
        self.submit(patient, items).await
    }

    // ----- reads for the record layer -----------------------------------

    /// Every readable change of a collection, decrypted, in store order
    /// (a cold load of the document). Corrupt items are quarantined and
    /// skipped.
    ///
    /// # Errors
    /// Store failures.
    pub async fn readable_changes(
        &self,
        patient: PatientId,
        collection: Collection,
    ) -> Result<Vec<Zeroizing<Vec<u8>>>> {
        let ids = self.readable_envelope_ids(patient, collection)?;
        Ok(self
            .changes_by_ids(patient, collection, &ids)
            .await?
            .into_iter()
            .map(|(_, c)| c)
            .collect())
    }

    /// Ids of the envelopes of a collection held readable, in store order.
    ///
    /// # Errors
    /// Store failures.
    pub fn readable_envelope_ids(&self, patient: PatientId, collection: Collection) -> Result<Vec<EnvelopeId>> {
        let mut entries: Vec<EnvelopeEntry> = self
            .store()
            .envelopes(&patient, Some(collection))?
            .into_iter()
            .filter(|e| e.state == EnvelopeState::Readable)
            .collect();
        entries.sort_by_key(|e| e.seq);
        Ok(entries.into_iter().map(|e| e.id).collect())
    }

    /// What a cold load of a collection needs: its local snapshot if one is
    /// usable (see [`Node::load_snapshot`]; also dropped here if it covers
    /// an envelope no longer held readable), and the decrypted readable
    /// changes it does not cover, in store order, with their envelope ids.
    ///
    /// # Errors
    /// Store failures.
    pub async fn load_collection(&self, patient: PatientId, collection: Collection) -> Result<CollectionLoad> {
        let ids = self.readable_envelope_ids(patient, collection)?;
        let mut snapshot = match self.load_snapshot(patient, collection) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%collection, cause = %e, "reading the snapshot failed; replaying the history");
                None
            }
        };
        if let Some(s) = &snapshot {
            let held: HashSet<&EnvelopeId> = ids.iter().collect();
            if !s.covered.iter().all(|(id, _)| held.contains(id)) {
                tracing::info!(%collection, "snapshot covers envelopes no longer readable; dropped");
                self.drop_snapshot(patient, collection)?;
                snapshot = None;
            }
        }
        let rest: Vec<EnvelopeId> = match &snapshot {
            Some(s) => {
                let covered: HashSet<&EnvelopeId> = s.covered.iter().map(|(id, _)| id).collect();
                ids.iter().filter(|id| !covered.contains(id)).copied().collect()
            }
            None => ids,
        };
        let changes = self.changes_by_ids(patient, collection, &rest).await?;
        Ok(CollectionLoad { snapshot, changes })
    }

    /// Seals `doc` (the record layer's saved document) together with the
    /// (envelope id, change hash) of every change it holds under the current epoch
    /// key, and keeps it as the local snapshot of (patient, collection).
    /// Returns `false`, keeping nothing, when the node holds no current
    /// epoch key. Snapshots are local: never synced, never flushed on their
    /// own (a lost one costs a replay).
    ///
    /// # Errors
    /// Crypto and store failures.
    pub fn save_snapshot(
        &self,
        patient: PatientId,
        collection: Collection,
        covered: &[crate::snapshot::Covered],
        doc: &[u8],
    ) -> Result<bool> {
        let Some(key) = self.current_epoch_key(&patient, collection) else {
            return Ok(false);
        };
        let payload = crate::snapshot::encode(covered, doc);
        let sealed = SealedSnapshot::seal(&key, &payload)?;
        self.store().put_snapshot(&patient, collection, &sealed)?;
        tracing::debug!(%collection, covered = covered.len(), bytes = sealed.len(), "snapshot kept");
        Ok(true)
    }

    /// The local snapshot of (patient, collection), opened, if one is kept
    /// and sealed under the current epoch key. One sealed under an older
    /// key is dropped (it is rebuilt under the new one); one that does not
    /// open or parse (bit rot, tampering) is dropped with a warning. Either
    /// way the caller replays the history.
    ///
    /// # Errors
    /// Store failures.
    pub fn load_snapshot(&self, patient: PatientId, collection: Collection) -> Result<Option<Snapshot>> {
        let Some(sealed) = self.store().snapshot(&patient, collection)? else {
            return Ok(None);
        };
        let key = self.current_epoch_key(&patient, collection);
        let current = key.as_ref().map(|k| k.key_id);
        match (SealedSnapshot::key_id(&sealed), key) {
            (Ok(id), Some(key)) if Some(id) == current => {
                match SealedSnapshot::open(&key, &sealed)
                    .ok()
                    .and_then(|p| crate::snapshot::decode(&p))
                {
                    Some(s) => return Ok(Some(s)),
                    None => {
                        tracing::warn!(%collection, "snapshot does not open or parse; dropped, replaying the history");
                    }
                }
            }
            (Ok(_), _) => tracing::info!(%collection, "snapshot sealed under another epoch key; dropped"),
            (Err(e), _) => tracing::warn!(%collection, cause = %e, "snapshot is malformed; dropped"),
        }
        self.drop_snapshot(patient, collection)?;
        Ok(None)
    }

    /// The blind key of a resource key (`Type/id`): SHA-256 of the node's
    /// index key (derived from its identity seed) and the resource key, so
    /// the disk shows neither types nor ids, and guesses cannot be checked
    /// without the node key.
    fn blind(&self, resource_key: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.inner.index_key.as_slice());
        h.update(resource_key.as_bytes());
        h.finalize().into()
    }

    /// Where the resource `Type/id` lives, from the blind resource index on
    /// disk (filled by the record layer with [`Node::index_resources`]).
    ///
    /// # Errors
    /// Store failures.
    pub fn locate_resource(&self, resource_key: &str) -> Result<Option<(PatientId, Collection)>> {
        self.store().resource_location(&self.blind(resource_key))
    }

    /// Records in the blind resource index that these resource keys live in
    /// (patient, collection). Not flushed on its own; a lost entry costs a
    /// scan of the readable documents, which records it again.
    ///
    /// # Errors
    /// Store failures.
    pub fn index_resources<'k>(
        &self,
        patient: PatientId,
        collection: Collection,
        keys: impl IntoIterator<Item = &'k str>,
    ) -> Result<()> {
        let entries: Vec<([u8; 32], PatientId, Collection)> =
            keys.into_iter().map(|k| (self.blind(k), patient, collection)).collect();
        if entries.is_empty() {
            return Ok(());
        }
        self.store().put_resource_locations(&entries)
    }

    /// Drops the local snapshot of (patient, collection), if any.
    ///
    /// # Errors
    /// Store failures.
    pub fn drop_snapshot(&self, patient: PatientId, collection: Collection) -> Result<()> {
        self.store().remove_snapshot(&patient, collection)
    }

    /// The decrypted changes of the given envelopes of a collection (those
    /// held readable; others are skipped).
    ///
    /// # Errors
    /// Store failures.
    pub async fn changes_by_ids(
        &self,
        patient: PatientId,
        collection: Collection,
        ids: &[EnvelopeId],
    ) -> Result<Vec<(EnvelopeId, Zeroizing<Vec<u8>>)>> {
        let mut items = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(item) = self.store().item(&(*id).into())? else {
                tracing::debug!(envelope = %id, "not held");
                continue;
            };
            if item.meta.patient == patient && item.meta.collection == Some(collection) {
                items.push((*id, item));
            }
        }
        // Checking the signature, decrypting and parsing the change are independent
        // per envelope and dominate a cold load: spread them over the cores.
        let opened = crate::par::map(&items, 32, |(_, item)| match decode_item(item.meta.kind, &item.bytes) {
            Ok(Decoded::Envelope(envelope)) => {
                let key = self.registry().key(&envelope.header().key_ref()).cloned();
                key.map(|key| Opened::Checked(open_checked(&envelope, &key)))
            }
            Ok(_) => None,
            Err(e) => Some(Opened::Corrupt(e)),
        })
        .ok_or_else(|| Error::Storage("opening stored envelopes failed".into()))?;
        let mut out = Vec::with_capacity(items.len());
        for ((id, item), opened) in items.iter().zip(opened) {
            match opened {
                Some(Opened::Checked(Ok(plain))) => out.push((*id, plain)),
                Some(Opened::Checked(Err(e))) => {
                    tracing::warn!(envelope = %id, cause = %e, "stored envelope does not open")
                }
                Some(Opened::Corrupt(e)) => {
                    let e = self.quarantine(&item.meta, e).await?;
                    tracing::warn!(envelope = %id, cause = %e, "skipped");
                }
                None => {}
            }
        }
        Ok(out)
    }

    // ----- consent registry -------------------------------------------

    /// The grant in force from `patient` to `peer` covering `collection`
    /// with at least `access`, if any.
    pub fn grant_in_force(
        &self,
        patient: &PatientId,
        collection: Collection,
        peer: &PracticeId,
        access: Access,
        at: u64,
    ) -> Option<GrantId> {
        self.registry()
            .grant_in_force(patient, collection, peer, access, at)
            .map(Grant::id)
    }

    /// DESIGN §5 validity of an envelope header, on signed data only.
    pub fn grant_valid_for_envelope(&self, header: &EnvelopeHeader) -> Validity {
        self.registry().envelope_validity(header)
    }

    /// Whether `peer` may receive the item now: the one consent check sync
    /// applies at the moment of serving (DESIGN §6, invariant 1).
    pub fn may_receive(&self, peer: &PeerId, meta: &ItemMeta) -> bool {
        match PracticeId::from_peer_id(peer) {
            Ok(p) => self.registry().may_receive(&p, meta, now()),
            Err(_) => false,
        }
    }

    /// Every peer that may receive the item now (nudges after a write).
    pub fn peers_that_may_receive(&self, meta: &ItemMeta) -> Vec<PracticeId> {
        self.registry().peers_that_may_receive(meta, now())
    }

    /// Every grantee of a grant from `patient` (revocation forwarding).
    pub fn peers_with_grant_from(&self, patient: &PatientId) -> Vec<PracticeId> {
        self.registry().peers_with_grant_from(patient)
    }

    /// Whether a grant held here (from any patient) names `peer` as its
    /// grantee: sync pulls such peers unasked.
    pub fn holds_grant_to(&self, peer: &PracticeId) -> bool {
        self.registry().names_grantee(peer)
    }

    /// Grants known from `patient`, newest first.
    pub fn grants(&self, patient: &PatientId) -> Vec<Grant> {
        self.registry().grants_of(patient)
    }

    /// Whether a revocation of the grant is known.
    pub fn is_revoked(&self, patient: &PatientId, grant: &GrantId) -> bool {
        self.registry().is_revoked(patient, grant)
    }

    /// The current epoch of a collection (highest seen in any key share)
    /// and its key id.
    pub fn current_epoch(&self, patient: &PatientId, collection: Collection) -> Option<(Epoch, KeyId)> {
        self.registry().current_epoch(patient, collection)
    }

    /// The current epoch key, if this node holds it (snapshot sealing).
    pub fn current_epoch_key(&self, patient: &PatientId, collection: Collection) -> Option<EpochKey> {
        self.registry().current_key(patient, collection).cloned()
    }

    /// The epoch key `key_ref` names, if this node holds it.
    pub(crate) fn epoch_key(&self, key_ref: &KeyRef) -> Option<EpochKey> {
        self.registry().key(key_ref).cloned()
    }

    /// The key of (patient, collection) with this id, if this node holds it
    /// (sealed snapshots name their key by id only).
    pub(crate) fn epoch_key_of(&self, patient: &PatientId, collection: Collection, key_id: &KeyId) -> Option<EpochKey> {
        self.registry().key_of(patient, collection, key_id).cloned()
    }

    // ----- sync support -----------------------------------------------

    /// The store instance id (cursors are (instance id, seq)).
    pub fn instance_id(&self) -> InstanceId {
        self.store().instance_id()
    }

    /// Highest seq given out.
    pub fn last_seq(&self) -> Seq {
        self.store().last_seq()
    }

    /// Items with seq > `after`, at most `limit`, each re-verified; corrupt
    /// ones are quarantined and left out. Filter them with
    /// [`Node::may_receive`] before serving.
    ///
    /// # Errors
    /// Store failures.
    pub async fn items_after(&self, after: Seq, limit: usize) -> Result<Vec<StoredItem>> {
        let items = self.store().items_after(after, limit)?;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            if self.verified(&item).await.is_ok() {
                out.push(item);
            }
        }
        Ok(out)
    }

    /// Items with seq > `after`, at most `limit`, **not** re-verified: for a
    /// server that decides from their metadata what to send and checks each
    /// item it does send with [`Node::check_stored`] (items it leaves out,
    /// e.g. envelopes a snapshot transfer covers, then cost no signature check).
    ///
    /// # Errors
    /// Store failures.
    pub fn scan_after(&self, after: Seq, limit: usize) -> Result<Vec<StoredItem>> {
        self.store().items_after(after, limit)
    }

    /// Re-verifies an item read by [`Node::scan_after`] before it is sent:
    /// `false` when it fails (it is then quarantined, as by [`Node::items_after`]).
    ///
    /// # Errors
    /// Store failures while quarantining.
    pub async fn check_stored(&self, meta: &ItemMeta, bytes: &[u8]) -> Result<bool> {
        match decode_item(meta.kind, bytes) {
            Ok(_) => Ok(true),
            Err(e) => {
                self.quarantine(meta, e).await?;
                Ok(false)
            }
        }
    }

    /// One item, re-verified.
    ///
    /// # Errors
    /// [`Error::CorruptItem`] (the item is quarantined), store failures.
    pub async fn item(&self, id: &ItemId) -> Result<Option<StoredItem>> {
        let Some(item) = self.store().item(id)? else {
            return Ok(None);
        };
        self.verified(&item).await?;
        Ok(Some(item))
    }

    /// A peer's cursor.
    ///
    /// # Errors
    /// Store failures.
    pub fn cursor(&self, peer: &PeerId) -> Result<Option<Cursor>> {
        self.store().cursor(&peer.to_bytes())
    }

    /// Sets a peer's cursor (not flushed at once: a lost cursor only costs
    /// a re-pull).
    ///
    /// # Errors
    /// Store failures.
    pub async fn set_cursor(&self, peer: &PeerId, cursor: Cursor) -> Result<()> {
        let mut batch = Batch::new();
        batch.push(Op::SetCursor {
            peer: peer.to_bytes(),
            cursor,
        });
        self.commit(batch, false).await.map(|_| ())
    }

    /// The consent items this node owes peers (issue 16, durable delivery).
    ///
    /// # Errors
    /// Store failures.
    pub fn outbox(&self) -> Result<Vec<crate::store::OutboxEntry>> {
        self.store().outbox()
    }

    /// Records debts, durably (flushed before this returns).
    ///
    /// # Errors
    /// Store failures.
    pub fn put_outbox(&self, entries: &[crate::store::OutboxEntry]) -> Result<()> {
        self.store().put_outbox(entries)
    }

    /// Clears debts by (peer bytes, item).
    ///
    /// # Errors
    /// Store failures.
    pub fn remove_outbox(&self, keys: &[(Vec<u8>, ItemId)]) -> Result<()> {
        self.store().remove_outbox(keys)
    }

    /// Index entries of the envelopes held for (patient, collection), or
    /// all collections: the summaries reconciliation exchanges.
    ///
    /// # Errors
    /// Store failures.
    pub fn envelopes(&self, patient: &PatientId, collection: Option<Collection>) -> Result<Vec<EnvelopeEntry>> {
        self.store().envelopes(patient, collection)
    }

    /// Ids of the envelopes held for (patient, collection), in change order:
    /// each actor's changes by ascending seq. A peer that fetches them in this
    /// order receives every change after its predecessor, so none waits for
    /// a seq gap (the store's own order, by id, would park almost all of a
    /// long history and overflow the gap queue).
    ///
    /// # Errors
    /// Store failures.
    pub fn envelope_ids(&self, patient: &PatientId, collection: Collection) -> Result<Vec<EnvelopeId>> {
        let mut held = self.store().envelopes(patient, Some(collection))?;
        held.sort_unstable_by_key(|e| (e.change_seq, e.actor, e.id));
        Ok(held.into_iter().map(|e| e.id).collect())
    }

    /// Patients with envelopes held here.
    ///
    /// # Errors
    /// Store failures.
    pub fn patients(&self) -> Result<Vec<PatientId>> {
        self.store().patients()
    }

    /// Number of items waiting in the pending queue.
    ///
    /// # Errors
    /// Store failures.
    pub fn pending_count(&self) -> Result<usize> {
        Ok(self.store().pending(None)?.len())
    }

    /// Whether an item id (or hash of undecodable bytes) is recorded rejected.
    ///
    /// # Errors
    /// Store failures.
    pub fn is_rejected(&self, key: &[u8; 32]) -> Result<bool> {
        Ok(self.store().rejected(key)?.is_some())
    }

    /// Number of rejections recorded.
    ///
    /// # Errors
    /// Store failures.
    pub fn rejected_count(&self) -> Result<u64> {
        self.store().rejected_count()
    }

    // ----- holdings and audit -----------------------------------------

    /// What the node holds for `patient`.
    ///
    /// # Errors
    /// Store failures.
    pub fn holdings(&self, patient: &PatientId) -> Result<Holdings> {
        let mut h = Holdings {
            patient: patient.to_string(),
            envelopes: 0,
            readable: 0,
            opaque: 0,
            by_collection: BTreeMap::new(),
            completeness: self
                .completeness(patient)?
                .into_iter()
                .map(|c| (c.collection.as_str().to_owned(), c))
                .collect(),
        };
        for e in self.store().envelopes(patient, None)? {
            h.envelopes += 1;
            match e.state {
                EnvelopeState::Readable => h.readable += 1,
                EnvelopeState::Opaque => h.opaque += 1,
            }
            *h.by_collection.entry(e.collection.as_str().to_owned()).or_default() += 1;
        }
        Ok(h)
    }

    /// Whether this node holds each collection of `patient`'s record it is
    /// granted complete ([`crate::completeness`]), in [`Collection::ALL`]
    /// order; empty when no grant in force names this node.
    ///
    /// # Errors
    /// Store failures.
    pub fn completeness(&self, patient: &PatientId) -> Result<Vec<CollectionCompleteness>> {
        let t = now();
        let me = self.inner.me;
        let grants = self.registry().grants_of(patient);
        let revoked: Vec<bool> = {
            let registry = self.registry();
            grants.iter().map(|g| registry.is_revoked(patient, &g.id())).collect()
        };
        let mine: Vec<&Grant> = grants
            .iter()
            .zip(&revoked)
            .filter(|(g, revoked)| g.terms().grantee == me && g.in_force(t, **revoked))
            .map(|(g, _)| g)
            .collect();
        if mine.is_empty() {
            return Ok(Vec::new());
        }
        let store = self.store();
        let checks = store.sync_checks(patient)?;
        let mut pending: HashMap<Collection, u64> = HashMap::new();
        for item in store.pending_of(patient)? {
            let collection = match item.reason {
                PendingReason::SeqGap { collection, .. } => Some(collection),
                _ => medmesh_crypto::CompactHeader::of_stored_envelope(&item.bytes)
                    .ok()
                    .map(|h| h.header().collection),
            };
            if let Some(c) = collection {
                *pending.entry(c).or_default() += 1;
            }
        }
        let still_missing = |check: &SyncCheck| -> u64 {
            let remembered = check.missing_ids.len() as u64;
            let lacking = check
                .missing_ids
                .iter()
                .filter(|id| {
                    !store.contains(&ItemId::from(**id)).unwrap_or(false)
                        && !store.rejected(&id.0).is_ok_and(|r| r.is_some())
                })
                .count() as u64;
            // Ids beyond those remembered are taken as still lacking.
            lacking + check.missing.saturating_sub(remembered)
        };
        let peer_name =
            |bytes: &[u8]| PeerId::from_bytes(bytes).map_or_else(|_| "unknown".to_owned(), |p| p.to_string());
        let mut out = Vec::new();
        for collection in Collection::ALL {
            let Some(since) = mine
                .iter()
                .filter(|g| g.covers(collection))
                .map(|g| g.terms().issued_at)
                .min()
            else {
                continue;
            };
            let earlier_holders: Vec<Vec<u8>> = grants
                .iter()
                .zip(&revoked)
                .filter(|(g, revoked)| {
                    let terms = g.terms();
                    terms.grantee != me && g.covers(collection) && terms.issued_at < since && g.in_force(t, **revoked)
                })
                .map(|(g, _)| g.terms().grantee.peer_id().to_bytes())
                .chain(
                    // The nodes the patient handed this node's grants to hold
                    // the record: their addresses end in `/p2p/<PeerId>`. This
                    // node may know of them before it learns their own grants.
                    mine.iter()
                        .filter(|g| g.covers(collection))
                        .flat_map(|g| &g.terms().address_hints)
                        .filter_map(|hint| hint.rsplit_once("/p2p/")?.1.parse::<PeerId>().ok())
                        .filter(|peer| *peer != me.peer_id())
                        .map(|peer| peer.to_bytes()),
                )
                .collect();
            let of_collection: Vec<SyncCheck> = checks.iter().filter(|c| c.collection == collection).cloned().collect();
            out.push(CollectionCompleteness::judge(
                collection,
                &of_collection,
                still_missing,
                pending.get(&collection).copied().unwrap_or(0),
                &earlier_holders,
                peer_name,
            ));
        }
        Ok(out)
    }

    /// How many (patient, collection) records granted to this node are
    /// incomplete here (`/metrics`).
    ///
    /// # Errors
    /// Store failures.
    pub fn incomplete_records(&self) -> Result<u64> {
        let patients = self.registry().patients_granting(&self.inner.me, now());
        let mut n = 0;
        for patient in patients {
            n += self.completeness(&patient)?.iter().filter(|c| !c.complete).count() as u64;
        }
        Ok(n)
    }

    /// The address hints (multiaddr text) of the grants in force to this
    /// node, its own addresses left out, without repeats: where the
    /// practices holding the records it is granted were reached by the
    /// patient. Sync reconnects to them after a restart.
    pub fn holder_addresses(&self) -> Vec<String> {
        let me = self.inner.me;
        let mine = format!("/p2p/{}", me.peer_id());
        let t = now();
        let registry = self.registry();
        let mut out: Vec<String> = registry
            .patients_granting(&me, t)
            .iter()
            .flat_map(|patient| registry.grants_of(patient))
            .filter(|g| g.terms().grantee == me && g.in_force(t, registry.is_revoked(&g.terms().patient, &g.id())))
            .flat_map(|g| g.terms().address_hints.clone())
            .filter(|hint| !hint.ends_with(&mine))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Keeps `peer`'s signed address record (issue 16: a practice whose
    /// address changed is found again after this node restarts, and the
    /// patient's CLI learns where its practices are) when it is newer than
    /// the one kept and the peer is a practice some grant held here names
    /// (so a stranger cannot fill the table). The caller verified the
    /// signature and that it is `peer`'s; this node keeps the bytes as
    /// received, so whoever reads them can verify again. At most
    /// [`MAX_ADDRESS_RECORDS`] peers. Returns whether it was kept.
    ///
    /// # Errors
    /// Store failures.
    pub fn note_address_record(&self, peer: &PracticeId, seq: u64, signed: &[u8]) -> Result<bool> {
        if signed.len() > medmesh_crypto::MAX_ADDRESS_RECORD_BYTES || !self.registry().names_grantee(peer) {
            return Ok(false);
        }
        let key = peer.peer_id().to_bytes();
        match self.store().address_record(&key)? {
            // Seqs count seconds: a record signed in the same second as the
            // kept one (a node that announced before its listeners were up,
            // then again) replaces it if it differs.
            Some(old) if old.seq > seq || (old.seq == seq && old.signed == signed) => return Ok(false),
            None if self.store().address_record_count()? >= MAX_ADDRESS_RECORDS => return Ok(false),
            _ => {}
        }
        self.store().put_address_record(&key, seq, signed)?;
        Ok(true)
    }

    /// The signed address records kept ([`Node::note_address_record`]):
    /// (peer, signed bytes); only of `peers` when given.
    ///
    /// # Errors
    /// Store failures.
    pub fn address_records(&self, peers: Option<&[PracticeId]>) -> Result<Vec<(PracticeId, Vec<u8>)>> {
        let mut out = Vec::new();
        for record in self.store().address_records()? {
            let Ok(peer) = PeerId::from_bytes(&record.peer) else {
                continue;
            };
            let Ok(practice) = PracticeId::from_peer_id(&peer) else {
                continue;
            };
            if peers.is_none_or(|wanted| wanted.contains(&practice)) {
                out.push((practice, record.signed));
            }
        }
        Ok(out)
    }

    /// Records what a reconciliation with a peer found ([`SyncCheck`]).
    ///
    /// # Errors
    /// Store failures.
    pub fn note_sync_check(&self, check: &SyncCheck) -> Result<()> {
        self.store().put_sync_check(check)
    }

    /// Appends an audit entry (gateway reads, sync disclosures), durably;
    /// returns its seq.
    ///
    /// # Errors
    /// Store failures.
    pub async fn audit(&self, record: AuditRecord) -> Result<u64> {
        let mut batch = Batch::new();
        batch.push(Op::Audit(record));
        let committed = self.commit(batch, true).await?;
        Ok(committed.audit.first().copied().unwrap_or(0))
    }

    /// Records that `items` of `patient` were sent to `peer` under `grant`.
    ///
    /// # Errors
    /// Store failures.
    pub async fn record_disclosure(
        &self,
        peer: &PeerId,
        patient: PatientId,
        items: Vec<ItemId>,
        grant: Option<GrantId>,
    ) -> Result<u64> {
        self.audit(AuditRecord {
            actor_kind: ActorKind::Peer,
            actor_id: peer.to_string(),
            action: Action::Disclose,
            patient: Some(patient),
            items,
            grant,
            outcome: "ok".into(),
        })
        .await
    }

    /// Checks the audit chain, and that it still reaches the latest signed
    /// checkpoint with the hash signed there.
    ///
    /// # Errors
    /// [`Error::AuditBroken`] naming the first bad entry;
    /// [`Error::AuditTruncated`] when entries after the checkpoint's seq are
    /// missing; [`Error::AuditRewritten`] when the checkpointed entry
    /// changed; [`Error::Corrupt`] for a checkpoint that does not verify;
    /// store failures.
    pub fn audit_verify(&self) -> Result<AuditVerified> {
        let raw = self.store().audit_raw(1)?;
        let entries = audit::verify_chain(&raw).map_err(Error::AuditBroken)?;
        match audit::check_anchor(self.store(), self.inner.me)? {
            audit::Anchor::Unanchored => Ok(AuditVerified {
                entries,
                checkpoint: None,
            }),
            audit::Anchor::Intact(cp) => Ok(AuditVerified {
                entries,
                checkpoint: Some(cp.terms().seq),
            }),
            audit::Anchor::Truncated { entries, checkpoint } => Err(Error::AuditTruncated {
                entries,
                checkpoint: checkpoint.terms().seq,
            }),
            audit::Anchor::Rewritten(cp) => Err(Error::AuditRewritten { seq: cp.terms().seq }),
        }
    }

    /// Checkpoints for a patient's audit query: one signed now of the log's
    /// head, the latest kept (which a cut tail leaves above the head), and,
    /// if asked, one of entry `anchor` as the log holds it now, to compare
    /// with a checkpoint the patient kept from an earlier query.
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a kept checkpoint that does not verify; store
    /// failures.
    pub fn audit_checkpoints(&self, anchor: Option<u64>) -> Result<AuditCheckpoints> {
        let store = self.store();
        let (seq, head) = store.audit_head();
        let latest = match audit::check_anchor(store, self.inner.me)? {
            audit::Anchor::Unanchored => None,
            audit::Anchor::Intact(cp) | audit::Anchor::Rewritten(cp) => Some(cp),
            audit::Anchor::Truncated { checkpoint, .. } => Some(checkpoint),
        };
        Ok(AuditCheckpoints {
            head: self.inner.checkpoints.sign(seq, head)?,
            latest,
            anchor: anchor
                .map(|s| audit::checkpoint_at(store, &self.inner.checkpoints, s))
                .transpose()?
                .flatten(),
        })
    }

    /// Audit entries, all or those about one patient.
    ///
    /// # Errors
    /// [`Error::Corrupt`] for an entry that does not decode; store failures.
    pub fn audit_entries(&self, patient: Option<&PatientId>) -> Result<Vec<AuditEntry>> {
        let entries = audit::decode_entries(self.store().audit_raw(1)?)?;
        let did = patient.map(ToString::to_string);
        Ok(match did {
            None => entries,
            Some(did) => entries
                .into_iter()
                .filter(|e| e.patient.as_deref() == Some(did.as_str()))
                .collect(),
        })
    }
}

/// What [`Node::audit_verify`] found.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct AuditVerified {
    /// Entries in the log, every hash and link checked.
    pub entries: u64,
    /// The seq of the latest signed checkpoint, which the log reaches with
    /// the hash signed there; `None` when none is kept (not anchored).
    pub checkpoint: Option<u64>,
}

/// What [`Node::audit_checkpoints`] returns.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct AuditCheckpoints {
    /// Signed now, of the log's last entry.
    pub head: medmesh_crypto::AuditCheckpoint,
    /// The latest checkpoint kept apart from the log.
    pub latest: Option<medmesh_crypto::AuditCheckpoint>,
    /// Signed now, of the entry asked for, if the log holds it.
    pub anchor: Option<medmesh_crypto::AuditCheckpoint>,
}

/// What [`Node::load_collection`] returns.
#[derive(Debug)]
pub struct CollectionLoad {
    /// The usable local snapshot, if any.
    pub snapshot: Option<Snapshot>,
    /// Readable changes the snapshot does not cover (all of them without
    /// one), decrypted, in store order.
    pub changes: Vec<(EnvelopeId, Zeroizing<Vec<u8>>)>,
}

/// One permanent refusal to record.
struct Refusal {
    kind: ItemKind,
    key: [u8; 32],
    patient: Option<PatientId>,
    error: Error,
}
