//! FHIR resources over the node: the record model (one Automerge document
//! per patient and collection) on top of the encrypted store.
//!
//! Documents are decrypted lazily into a bounded LRU cache, with rendered
//! JSON cached beside them by [`RecordDoc`]. A local write makes one change
//! in the cached document, then the node seals and appends it durably; if
//! that fails the document is dropped from the cache, so what is served is
//! always what is durable. A FHIR transaction ([`Repository::transaction`])
//! makes one change per touched document and stores them all as one atomic
//! durable batch, holding those documents locked until it is durable.
//! Changes that arrive from peers are applied to the cached document as the
//! node reports them readable.
//!
//! A document whose history grew by [`Config::snapshot_every`] changes
//! since its last snapshot is saved as a sealed local snapshot (see
//! [`Node::save_snapshot`]; also [`Repository::save_snapshots`] on close),
//! so a cold load opens the snapshot and replays only the readable changes
//! it does not cover. Only changes durable in the store are ever covered.
//!
//! Resources are addressed by `Type/id` alone (that is what FHIR clients
//! send), so the repository keeps an in-memory index from resource key to
//! (patient, collection), backed by the node's blind index on disk
//! ([`Node::locate_resource`]), which it fills as documents load and
//! change. A key found in neither loads every readable document once
//! (slow, logged), after which events keep the in-memory index complete.
//!
//! A key is bound to the first document this node finds it in and is
//! never re-bound by another (issue 15: a peer may write any key into a
//! document it can write); only keys whose type routes to the document's
//! collection are bound at all. A document shows only the resources bound
//! to it ([`records::belongs`] adds the rules every replica applies alike),
//! so what a peer writes against these rules stays in the history but is
//! served nowhere. See `docs/decisions.md`.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use automerge::{ActorId as AmActorId, ChangeHash};
use lru::LruCache;
use medmesh_crypto::{ActorId, Collection, EnvelopeId, PatientId};
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use crate::node::{Event, Node};
use crate::records::{self, DecodedChange, Query, RecordDoc, RenderedResource, Version};

mod transaction;
mod write;

pub use transaction::{TxError, TxOp, TxResult};

pub use crate::{Error, Result};

/// Tuning of a [`Repository`].
#[derive(Clone, Debug)]
pub struct Config {
    /// Decrypted documents kept in memory.
    pub cached_documents: usize,
    /// A cached document is saved as a sealed snapshot once this many
    /// changes were applied to it since its last snapshot (by local writes,
    /// peers, or the replay of a cold load); 0 turns automatic snapshots
    /// off ([`Repository::save_snapshots`] still writes them).
    pub snapshot_every: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            cached_documents: 512,
            snapshot_every: 100,
        }
    }
}

type DocKey = (PatientId, Collection);
type SharedDoc = Arc<AsyncMutex<Cached>>;

/// A cached document with what its snapshot needs.
struct Cached {
    doc: RecordDoc,
    /// The envelope of each change in `doc` that is durable in the store
    /// (loaded from it, or written and acknowledged). A change not in here
    /// (a write in flight) keeps the document from being snapshotted.
    envelopes: HashMap<ChangeHash, EnvelopeId>,
    /// Changes applied since the last snapshot (or since loading one).
    since_snapshot: usize,
    /// A write into this document failed after its change was made here: the
    /// document left the cache, and whoever still holds it must load it again.
    stale: bool,
}

struct Inner {
    node: Node,
    /// This process's Automerge actor: the node key's prefix + a fresh nonce.
    actor: AmActorId,
    actor_id: ActorId,
    config: Config,
    docs: Mutex<LruCache<DocKey, SharedDoc>>,
    index: Mutex<Index>,
    /// Serialises cold loads so two requests never decrypt one document twice.
    loading: AsyncMutex<()>,
    /// Record events of the node applied to the caches so far, and a wake-up
    /// for [`Repository::settle`].
    events_applied: std::sync::atomic::AtomicU64,
    applied: tokio::sync::Notify,
}

#[derive(Default)]
struct Index {
    location: HashMap<String, DocKey>,
    /// Every readable document has been loaded once; a miss is a real miss.
    complete: bool,
}

/// FHIR resources of the patients whose records this node can read.
#[derive(Clone)]
pub struct Repository {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves only caches behind; they stay usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_ms() -> i64 {
    i64::try_from(medmesh_crypto::now()).unwrap_or(i64::MAX)
}

/// A fresh server-assigned id: 128 random bits in hex (FHIR ids allow 64 chars).
pub fn new_resource_id() -> Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|_| Error::Random)?;
    Ok(hex::encode(bytes))
}

impl Repository {
    /// A repository over `node`; spawns the task that applies peers'
    /// changes to cached documents (needs a tokio runtime).
    ///
    /// # Errors
    /// [`Error::Random`].
    pub fn new(node: Node, config: Config) -> Result<Self> {
        let author = node.practice_id();
        let actor_id = ActorId::generate(author.as_bytes()).map_err(|_| Error::Random)?;
        let capacity = NonZeroUsize::new(config.cached_documents).unwrap_or(NonZeroUsize::MIN);
        let repository = Self {
            inner: Arc::new(Inner {
                actor: AmActorId::from(actor_id.0.to_vec()),
                actor_id,
                config,
                docs: Mutex::new(LruCache::new(capacity)),
                index: Mutex::new(Index::default()),
                loading: AsyncMutex::new(()),
                events_applied: std::sync::atomic::AtomicU64::new(0),
                applied: tokio::sync::Notify::new(),
                node,
            }),
        };
        let events = repository.inner.node.subscribe();
        // What was published before subscribing is in the store, which the
        // caches load from: counted as applied.
        repository.inner.events_applied.store(
            repository.inner.node.record_events_published(),
            std::sync::atomic::Ordering::SeqCst,
        );
        let weak = Arc::downgrade(&repository.inner);
        tokio::spawn(async move { follow_events(weak, events).await });
        Ok(repository)
    }

    /// The node underneath.
    pub fn node(&self) -> &Node {
        &self.inner.node
    }

    /// The cached document of (patient, collection), loading it if needed.
    async fn doc(&self, key: DocKey) -> Result<SharedDoc> {
        if let Some(doc) = lock(&self.inner.docs).get(&key) {
            return Ok(doc.clone());
        }
        let _loading = self.inner.loading.lock().await;
        if let Some(doc) = lock(&self.inner.docs).get(&key) {
            return Ok(doc.clone());
        }
        let (doc, envelopes, replayed) = self.load(key).await?;
        self.bind(key, doc.keys().iter().map(String::as_str));
        let mut cached = Cached {
            doc,
            envelopes,
            since_snapshot: replayed,
            stale: false,
        };
        self.maybe_snapshot(key, &mut cached, false);
        let doc = Arc::new(AsyncMutex::new(cached));
        lock(&self.inner.docs).put(key, doc.clone());
        Ok(doc)
    }

    /// Builds a document from its snapshot (if usable) and the readable
    /// changes the snapshot does not cover; the number of changes replayed.
    async fn load(&self, key: DocKey) -> Result<(RecordDoc, HashMap<ChangeHash, EnvelopeId>, usize)> {
        let load = self.inner.node.load_collection(key.0, key.1).await?;
        let mut envelopes = HashMap::new();
        let mut doc = None;
        let mut changes = load.changes;
        if let Some(snapshot) = load.snapshot {
            match RecordDoc::load_local(&snapshot.doc) {
                Ok(d) if holds_exactly(&d, &snapshot.covered) => {
                    envelopes.extend(snapshot.covered.iter().map(|(id, hash)| (ChangeHash(*hash), *id)));
                    doc = Some(d);
                }
                Ok(_) => {
                    tracing::warn!(collection = %key.1, "snapshot does not match what it covers; replaying the history")
                }
                Err(e) => {
                    tracing::warn!(collection = %key.1, cause = %e, "snapshot does not load; replaying the history")
                }
            }
            if doc.is_none() {
                self.inner.node.drop_snapshot(key.0, key.1)?;
                changes = self.inner.node.load_collection(key.0, key.1).await?.changes;
            }
        }
        let mut doc = doc.unwrap_or_default();
        let mut decoded = Vec::with_capacity(changes.len());
        let bytes: Vec<&[u8]> = changes.iter().map(|(_, b)| b.as_slice()).collect();
        for ((id, _), change) in changes.iter().zip(DecodedChange::decode_all(&bytes)) {
            match change {
                Ok(change) => {
                    envelopes.insert(change.hash(), *id);
                    decoded.push(change);
                }
                Err(e) => tracing::warn!(envelope = %id, cause = %e, "stored change does not decode; skipped"),
            }
        }
        let replayed = decoded.len();
        let report = doc.apply_changes(decoded);
        if !report.rejected.is_empty() {
            tracing::warn!(rejected = report.rejected.len(), collection = %key.1, "changes refused by the record model");
        }
        Ok((doc, envelopes, replayed))
    }

    /// Keeps a sealed snapshot of a cached document when it grew by
    /// [`Config::snapshot_every`] changes since the last one (or always,
    /// with `force`), and every change in it is durable. Failures are
    /// logged: a missing snapshot only costs a replay.
    fn maybe_snapshot(&self, key: DocKey, cached: &mut Cached, force: bool) {
        let every = self.inner.config.snapshot_every;
        let due = if force {
            cached.since_snapshot > 0
        } else {
            every > 0 && cached.since_snapshot >= every
        };
        if !due || cached.doc.change_count() == 0 {
            return;
        }
        let mut covered = Vec::with_capacity(cached.doc.change_count());
        for hash in cached.doc.change_hashes() {
            match cached.envelopes.get(&hash) {
                Some(id) => covered.push((*id, hash.0)),
                // A local write not yet acknowledged: try again later.
                None => return,
            }
        }
        let bytes = zeroize::Zeroizing::new(cached.doc.save_local());
        match self.inner.node.save_snapshot(key.0, key.1, &covered, &bytes) {
            Ok(true) => cached.since_snapshot = 0,
            Ok(false) => {}
            Err(e) => tracing::warn!(collection = %key.1, cause = %e, "keeping a snapshot failed"),
        }
    }

    /// Saves a sealed snapshot of every cached document changed since its
    /// last one (call on close, before [`Node::close`]).
    pub async fn save_snapshots(&self) {
        let docs: Vec<(DocKey, SharedDoc)> = lock(&self.inner.docs).iter().map(|(k, d)| (*k, d.clone())).collect();
        for (key, doc) in docs {
            let mut cached = doc.lock().await;
            self.maybe_snapshot(key, &mut cached, true);
        }
    }

    /// Binds resource keys found in the document `at` to it, in memory and in
    /// the node's blind index on disk: each key whose type routes to `at`'s
    /// collection ([`records::type_belongs`]) and that is bound to no other
    /// document yet. A key bound elsewhere stays there (first binding wins,
    /// and the disk index outlives restarts), so a peer's change can never
    /// move another patient's resource into a document it writes; the
    /// document shows only what is bound to it ([`Repository::patient_resources`]).
    /// Disk failures are logged: a missing entry only costs a scan.
    fn bind<'k>(&self, at: DocKey, keys: impl IntoIterator<Item = &'k str>) {
        let mut index = lock(&self.inner.index);
        let mut new = Vec::new();
        let mut refused = 0usize;
        for key in keys {
            if !records::split_key(key).is_ok_and(|(t, _)| records::type_belongs(t, at.1)) {
                refused += 1;
                continue;
            }
            let bound = match index.location.get(key) {
                Some(bound) => *bound,
                None => {
                    let bound = match self.inner.node.locate_resource(key) {
                        Ok(Some(bound)) => bound,
                        Ok(None) => {
                            new.push(key);
                            at
                        }
                        Err(e) => {
                            // Unknown on disk: bound here in memory only, re-checked next load.
                            tracing::warn!(cause = %e, "resource index lookup failed");
                            at
                        }
                    };
                    index.location.insert(key.to_owned(), bound);
                    bound
                }
            };
            if bound != at {
                refused += 1;
            }
        }
        drop(index);
        if refused > 0 {
            // Ids only in aggregate: keys are not logged (the disk index is blind too).
            tracing::warn!(
                collection = %at.1,
                refused,
                "resource keys of another document or collection written here; hidden from this document"
            );
        }
        if let Err(e) = self.inner.node.index_resources(at.0, at.1, new) {
            tracing::warn!(cause = %e, "recording resource locations failed");
        }
    }

    /// Whether `resource`, read from the document `at`, is served from it:
    /// its key is bound there ([`Repository::bind`]) and it satisfies
    /// [`records::belongs`].
    fn shown(index: &Index, at: DocKey, resource: &RenderedResource) -> bool {
        // Rendering takes `resourceType` from the key, so the key's type is the JSON's.
        let resource_type = resource.key.split_once('/').map_or("", |(t, _)| t);
        index.location.get(&resource.key) == Some(&at)
            && records::belongs_as(resource_type, &resource.json, &at.0, at.1)
    }

    fn evict(&self, key: &DocKey) {
        lock(&self.inner.docs).pop(key);
    }

    /// Drops a document holding a change that is not durable: out of the
    /// cache, and marked so that a request already holding it loads it again.
    fn discard(&self, key: &DocKey, cached: &mut Cached) {
        cached.stale = true;
        self.evict(key);
    }

    /// The cached document of (patient, collection), locked; never one that a
    /// failed write left stale.
    async fn locked(&self, key: DocKey) -> Result<OwnedMutexGuard<Cached>> {
        loop {
            let guard = self.doc(key).await?.lock_owned().await;
            if !guard.stale {
                return Ok(guard);
            }
        }
    }

    /// Where a resource lives, loading every readable document once if the
    /// index does not know it yet.
    async fn locate(&self, resource_key: &str) -> Result<DocKey> {
        if let Some(at) = lock(&self.inner.index).location.get(resource_key) {
            return Ok(*at);
        }
        match self.inner.node.locate_resource(resource_key) {
            Ok(Some(at)) => {
                lock(&self.inner.index).location.insert(resource_key.to_owned(), at);
                return Ok(at);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(cause = %e, "resource index lookup failed; scanning"),
        }
        if !lock(&self.inner.index).complete {
            tracing::info!("resource index incomplete: loading every readable document once");
            for patient in self.inner.node.patients()? {
                for collection in Collection::ALL {
                    if self.inner.node.current_epoch(&patient, collection).is_some() {
                        self.doc((patient, collection)).await?;
                    }
                }
            }
            lock(&self.inner.index).complete = true;
        }
        lock(&self.inner.index)
            .location
            .get(resource_key)
            .copied()
            .ok_or_else(|| records::Error::NotFound {
                key: resource_key.to_owned(),
            })
    }

    /// The current version of `Type/id`.
    ///
    /// # Errors
    /// Record-model errors (`NotFound`, `Deleted`).
    pub async fn read(&self, resource_type: &str, id: &str) -> Result<Arc<RenderedResource>> {
        let key = records::resource_key(resource_type, id)?;
        let at = self.locate(&key).await?;
        let doc = self.locked(at).await?;
        let resource = doc.doc.read(&key)?;
        if !records::belongs(&resource.json, &at.0, at.1) {
            return Err(records::Error::NotFound { key });
        }
        Ok(resource)
    }

    /// Where `Type/id` lives: its patient and collection.
    ///
    /// # Errors
    /// `NotFound`.
    pub async fn location(&self, resource_type: &str, id: &str) -> Result<(PatientId, Collection)> {
        let key = records::resource_key(resource_type, id)?;
        self.locate(&key).await
    }

    /// One version of `Type/id`.
    ///
    /// # Errors
    /// Record-model errors.
    pub async fn vread(&self, resource_type: &str, id: &str, version_id: &str) -> Result<Arc<RenderedResource>> {
        let key = records::resource_key(resource_type, id)?;
        let doc = self.locked(self.locate(&key).await?).await?;
        doc.doc.vread(&key, version_id)
    }

    /// Every version of `Type/id`, oldest first, each with the resource as
    /// it was (`None` for deletes).
    ///
    /// # Errors
    /// Record-model errors.
    pub async fn history(
        &self,
        resource_type: &str,
        id: &str,
    ) -> Result<Vec<(Version, Option<Arc<RenderedResource>>)>> {
        let key = records::resource_key(resource_type, id)?;
        let doc = self.locked(self.locate(&key).await?).await?;
        let doc = &doc.doc;
        let versions = doc.history(&key)?;
        Ok(versions
            .into_iter()
            .map(|v| {
                let rendered = if v.deleted {
                    None
                } else {
                    doc.vread(&key, &v.version_id).ok()
                };
                (v, rendered)
            })
            .collect())
    }

    /// Every live resource of a patient across the collections this node
    /// can read.
    ///
    /// # Errors
    /// Node and record-model errors.
    pub async fn patient_resources(&self, patient: PatientId) -> Result<Vec<Arc<RenderedResource>>> {
        let mut out = Vec::new();
        for collection in Collection::ALL {
            if self.inner.node.current_epoch(&patient, collection).is_none() {
                continue;
            }
            let doc = self.locked((patient, collection)).await?;
            let resources = doc.doc.resources()?;
            let index = lock(&self.inner.index);
            out.extend(
                resources
                    .into_iter()
                    .filter(|r| Self::shown(&index, (patient, collection), r)),
            );
        }
        Ok(out)
    }

    /// `$everything` for the Patient resource `Patient/{id}`: the Patient
    /// first, then every other resource of that patient this node can read.
    ///
    /// # Errors
    /// `NotFound`/`Deleted` for the Patient.
    pub async fn everything(&self, patient_resource_id: &str) -> Result<Vec<Arc<RenderedResource>>> {
        let patient_resource = self.read("Patient", patient_resource_id).await?;
        let (patient, _) = self.location("Patient", patient_resource_id).await?;
        let mut all = vec![patient_resource.clone()];
        all.extend(
            self.patient_resources(patient)
                .await?
                .into_iter()
                .filter(|r| r.key != patient_resource.key),
        );
        Ok(all)
    }

    /// Search, in key order. A query scoped to a patient (`patient=`/`subject=`,
    /// [`Query::patient`]) reads only that patient's documents; without one,
    /// every readable document is scanned (slow on a large node; documented).
    ///
    /// # Errors
    /// Node and record-model errors.
    pub async fn search(&self, query: &Query) -> Result<Vec<Arc<RenderedResource>>> {
        let resources = match (query.patient_did(), query.patient()) {
            // By the patient's did:key: their records here, Patient held or not.
            (Some(did), _) => self.patient_resources(did).await?,
            (None, patient) => self.search_by_patient_resource(patient).await?,
        };
        let mut found = records::search::search(resources.iter(), query);
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }

    async fn search_by_patient_resource(&self, patient: Option<&str>) -> Result<Vec<Arc<RenderedResource>>> {
        Ok(match patient {
            Some(id) => match self.location("Patient", id).await {
                Ok((patient, _)) => self.patient_resources(patient).await?,
                Err(Error::NotFound { .. }) => Vec::new(),
                Err(e) => return Err(e),
            },
            None => {
                let mut all = Vec::new();
                for patient in self.inner.node.patients()? {
                    all.extend(self.patient_resources(patient).await?);
                }
                all
            }
        })
    }

    async fn on_readable(&self, patient: PatientId, collection: Collection, ids: &[medmesh_crypto::EnvelopeId]) {
        let key = (patient, collection);
        let cached = lock(&self.inner.docs).get(&key).cloned();
        let Some(doc) = cached else {
            // Not cached: load it now, so the index learns the new resources.
            if let Err(e) = self.doc(key).await {
                tracing::warn!(cause = %e, collection = %collection, "loading a document after sync failed");
            }
            return;
        };
        let changes = match self.inner.node.changes_by_ids(patient, collection, ids).await {
            Ok(changes) => changes,
            Err(e) => {
                tracing::warn!(cause = %e, "fetching synced changes failed; dropping the cached document");
                self.evict(&key);
                return;
            }
        };
        let mut cached = doc.lock().await;
        let mut decoded = Vec::with_capacity(changes.len());
        let bytes: Vec<&[u8]> = changes.iter().map(|(_, b)| b.as_slice()).collect();
        for ((id, _), change) in changes.iter().zip(DecodedChange::decode_all(&bytes)) {
            if let Ok(change) = change {
                cached.envelopes.insert(change.hash(), *id);
                decoded.push(change);
            }
        }
        let report = cached.doc.apply_changes(decoded);
        cached.since_snapshot += report.applied.len();
        self.maybe_snapshot(key, &mut cached, false);
        drop(cached);
        self.bind(
            key,
            report.applied.iter().flat_map(|a| a.keys.iter().map(String::as_str)),
        );
    }
}

/// Whether the document's changes are exactly the covered ones.
fn holds_exactly(doc: &RecordDoc, covered: &[crate::Covered]) -> bool {
    let mut listed: Vec<ChangeHash> = covered.iter().map(|(_, h)| ChangeHash(*h)).collect();
    listed.sort_unstable();
    listed.dedup();
    listed.len() == covered.len() && listed == doc.change_hashes()
}

impl Repository {
    /// Waits, up to `within`, until the caches have applied every record
    /// event the node published before this call, so that a read after it
    /// shows at least what the store held readable then (the caches follow
    /// the node's events asynchronously, ~0.1–0.2 s behind under load).
    /// `false` when the time ran out first.
    pub async fn settle(&self, within: std::time::Duration) -> bool {
        let target = self.inner.node.record_events_published();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            // Created before the check: `notify_waiters` wakes it even
            // before its first poll.
            let woken = self.inner.applied.notified();
            if self.inner.events_applied.load(std::sync::atomic::Ordering::SeqCst) >= target {
                return true;
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return false;
            }
        }
    }
}

async fn follow_events(inner: std::sync::Weak<Inner>, mut events: tokio::sync::broadcast::Receiver<Event>) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let event = match events.recv().await {
            Ok(event) => event,
            Err(RecvError::Lagged(missed)) => {
                // Missed events: the caches may be stale. Start over from the store.
                tracing::warn!(missed, "repository lagged behind node events; clearing caches");
                if let Some(inner) = inner.upgrade() {
                    lock(&inner.docs).clear();
                    *lock(&inner.index) = Index::default();
                    // Cleared caches reload from the store: everything
                    // published so far is reflected. (Events still queued
                    // then count twice: `settle` may return early once.)
                    let published = inner.node.record_events_published();
                    inner
                        .events_applied
                        .fetch_max(published, std::sync::atomic::Ordering::SeqCst);
                    inner.applied.notify_waiters();
                }
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        let Some(inner) = inner.upgrade() else { return };
        let repository = Repository { inner };
        match event {
            Event::Readable {
                patient,
                collection,
                ids,
            } => repository.on_readable(patient, collection, &ids).await,
            Event::Excluded {
                patient, collection, ..
            } => {
                // Validity shrank (a revocation's cut): rebuild from what is still readable.
                repository.evict(&(patient, collection));
                lock(&repository.inner.index)
                    .location
                    .retain(|_, at| *at != (patient, collection));
                lock(&repository.inner.index).complete = false;
            }
            Event::Stored(_) => continue,
        }
        repository
            .inner
            .events_applied
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        repository.inner.applied.notify_waiters();
    }
}
