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
use crate::item::{IngestReport, Item, ItemStored};
use crate::policy::{self, ConsentView, Denied, Disclosure, Requester};
use crate::rate::Rate;
use crate::snapshot::Snapshot;
use crate::store::{
    Batch, Committed, Cursor, EnvelopeEntry, EnvelopeState, InstanceId, ItemId, ItemKind, ItemMeta, Op, PendingItem,
    PendingReason, Seq, SledStore, Store, StoredItem, SyncCheck,
};
use crate::strangers::Strangers;
use crate::{Error, Result};

mod audit_log;
mod consent_queries;
mod holdings;
mod ingest;
mod ingest_consent;
mod ingest_envelopes;
mod log;
mod reads;
mod write;

pub use audit_log::{AuditCheckpoints, AuditVerified};
pub use reads::CollectionLoad;

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

/// What the node publishes on [`Node::subscribe`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Event {
    /// A new item was stored durably (local write or ingest). Boxed: its
    /// signed metadata is most of the event's size.
    Stored(Box<ItemStored>),
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

/// What one [`Node::ingest`] did: the counts every layer speaks
/// ([`IngestReport`]) and, for items rejected here, why.
#[derive(Debug, Default)]
pub struct Ingested {
    /// How many items went where.
    pub counts: IngestReport,
    /// The items refused for good (each recorded once), with why;
    /// `counts.rejected` is their number.
    pub rejected: Vec<RejectedItem>,
}

impl Ingested {
    fn reject(&mut self, item: RejectedItem) {
        self.counts.rejected += 1;
        self.rejected.push(item);
    }
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

/// An item whose signature was checked: its bytes, their SHA-256 and what
/// they decoded to.
struct CheckedItem {
    item: Item,
    hash: [u8; 32],
    decoded: Decoded,
}

/// Consent items of one page, to apply to the registry after they are stored.
#[derive(Default)]
struct ConsentEffects {
    /// On the page's first pass, the items of patients this node has no
    /// relationship with yet, judged again after it ([`Node::welcome`]).
    deferred: Option<Vec<CheckedItem>>,
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

    /// Sends a record event counted in advance (see `finish_phase`).
    fn publish_counted(&self, event: Event) {
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
                self.publish(Event::Stored(Box::new(ItemStored {
                    seq: *seq,
                    meta: meta.clone(),
                    from,
                })));
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
}

/// One permanent refusal to record.
struct Refusal {
    kind: ItemKind,
    key: [u8; 32],
    patient: Option<PatientId>,
    error: Error,
}
