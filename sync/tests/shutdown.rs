//! Shutdown waits for every task of the node (STYLE §3): real swarms on
//! `/ip4/127.0.0.1/tcp/0`, a store that blocks — forever — in the middle of
//! serving a pull or of ingesting one, and [`SyncHandle::shutdown`] called
//! while it does. When `shutdown` returns, the blocked call must have been
//! dropped: a task left running (a detached `tokio::spawn`) would still hold
//! the node's store, and a store reopened in its directory (sled's lock)
//! or a flush after shutdown would race it. No sleeps: the test waits for
//! the store to report the blocked call, with a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use medmesh_crypto::{Access, Collection, EnvelopeId, PatientId, now};
use medmesh_sync::memory::MemoryBackend;
use medmesh_sync::wire::SnapshotPayload;
use medmesh_sync::{
    AuditEntry, Backend, ConsentView, Cursor, DisclosureRecord, IngestReport, InstanceId, Item, ItemId, ItemStored,
    Owed, PeerId, StoredItem, SyncHandle, TransferIngest,
};
use tokio::sync::{Notify, broadcast};

use common::{CliPatient, WAIT, quiet_config};

/// Which call of [`Gated`] blocks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Block {
    /// Scanning the log, as serving a pull does.
    Serve,
    /// Ingesting received items, as a pull does with each page.
    Ingest,
}

/// A [`MemoryBackend`] whose serving scan or ingest never returns: the
/// blocked call holds a clone of `held` until its future is dropped, and
/// says it started on `entered`.
struct Gated {
    inner: MemoryBackend,
    block: Block,
    held: Arc<()>,
    entered: Arc<Notify>,
}

impl Gated {
    fn new(block: Block) -> Self {
        Self {
            inner: MemoryBackend::new(),
            block,
            held: Arc::new(()),
            entered: Arc::new(Notify::new()),
        }
    }

    /// Blocks forever if `which` is the blocked call; only dropping the
    /// future ends it.
    async fn gate(&self, which: Block) {
        if self.block != which {
            return;
        }
        let _held = self.held.clone();
        self.entered.notify_one();
        std::future::pending::<()>().await;
    }

    /// Futures of the blocked call still alive.
    fn blocked_calls(&self) -> usize {
        Arc::strong_count(&self.held) - 1
    }
}

impl Backend for Gated {
    fn instance_id(&self) -> InstanceId {
        self.inner.instance_id()
    }

    async fn items_after(&self, after: u64, limit: usize) -> medmesh_sync::Result<Vec<StoredItem>> {
        self.gate(Block::Serve).await;
        self.inner.items_after(after, limit).await
    }

    async fn ingest(&self, from: PeerId, items: Vec<Item>) -> medmesh_sync::Result<IngestReport> {
        self.gate(Block::Ingest).await;
        self.inner.ingest(from, items).await
    }

    async fn ingest_capped(
        &self,
        from: PeerId,
        items: Vec<Item>,
        pending_room: u64,
    ) -> medmesh_sync::Result<IngestReport> {
        self.gate(Block::Ingest).await;
        self.inner.ingest_capped(from, items, pending_room).await
    }

    fn pending_total(&self) -> medmesh_sync::Result<u64> {
        self.inner.pending_total()
    }

    fn cursor(&self, peer: &PeerId) -> medmesh_sync::Result<Option<Cursor>> {
        self.inner.cursor(peer)
    }

    async fn set_cursor(&self, peer: &PeerId, cursor: Cursor) -> medmesh_sync::Result<()> {
        self.inner.set_cursor(peer, cursor).await
    }

    fn names_grantee(&self, peer: &PeerId) -> medmesh_sync::Result<bool> {
        self.inner.names_grantee(peer)
    }

    fn consent(&self, patient: &PatientId) -> medmesh_sync::Result<ConsentView> {
        self.inner.consent(patient)
    }

    fn envelope_ids(&self, patient: &PatientId, collection: Collection) -> medmesh_sync::Result<Vec<EnvelopeId>> {
        self.inner.envelope_ids(patient, collection)
    }

    async fn envelopes(&self, ids: &[EnvelopeId]) -> medmesh_sync::Result<Vec<StoredItem>> {
        self.inner.envelopes(ids).await
    }

    async fn item(&self, id: &ItemId) -> medmesh_sync::Result<Option<StoredItem>> {
        self.inner.item(id).await
    }

    fn outbox(&self) -> medmesh_sync::Result<Vec<Owed>> {
        self.inner.outbox()
    }

    fn put_outbox(&self, owed: &[Owed]) -> medmesh_sync::Result<()> {
        self.inner.put_outbox(owed)
    }

    fn remove_outbox(&self, settled: &[(PeerId, ItemId)]) -> medmesh_sync::Result<()> {
        self.inner.remove_outbox(settled)
    }

    async fn record_disclosure(&self, record: &DisclosureRecord) -> medmesh_sync::Result<()> {
        self.inner.record_disclosure(record).await
    }

    async fn audit_entries(
        &self,
        patient: &PatientId,
        after: u64,
        limit: usize,
    ) -> medmesh_sync::Result<Vec<AuditEntry>> {
        self.inner.audit_entries(patient, after, limit).await
    }

    async fn restore_and_ingest(
        &self,
        from: PeerId,
        patient: PatientId,
        collection: Collection,
        payload: SnapshotPayload,
        pending_room: u64,
    ) -> medmesh_sync::Result<Option<TransferIngest>> {
        self.inner
            .restore_and_ingest(from, patient, collection, payload, pending_room)
            .await
    }

    fn subscribe(&self) -> broadcast::Receiver<ItemStored> {
        self.inner.subscribe()
    }
}

/// Waits until the gated store reports its blocked call started.
async fn until_blocked(store: &Gated) {
    tokio::time::timeout(WAIT, store.entered.notified())
        .await
        .expect("the gated call started");
    assert!(store.blocked_calls() >= 1);
}

/// A serving task blocked in the store: A serves B's pull and never gets
/// past its scan; A shuts down; the scan's future is gone when `shutdown`
/// returns (it would block forever in a detached task).
#[tokio::test]
async fn shutdown_ends_a_serving_task_blocked_in_the_store() {
    let a_key = medmesh_crypto::SecretIdentity::generate().unwrap();
    let a_store = Arc::new(Gated::new(Block::Serve));
    let a = SyncHandle::spawn(quiet_config(), &a_key, a_store.clone())
        .await
        .unwrap();
    let b_key = medmesh_crypto::SecretIdentity::generate().unwrap();
    let b = SyncHandle::spawn(quiet_config(), &b_key, Arc::new(MemoryBackend::new()))
        .await
        .unwrap();

    let a_addr = a.listen_addrs().await.unwrap().remove(0);
    b.dial(a_addr).await.unwrap();
    let puller = b.clone();
    let a_peer = a.local_peer_id();
    let pull = tokio::spawn(async move { puller.sync_now(a_peer).await });
    until_blocked(&a_store).await;

    a.shutdown().await.unwrap();
    assert_eq!(
        a_store.blocked_calls(),
        0,
        "a serving task still ran after shutdown returned"
    );
    // B's pull fails with A gone; B stops as cleanly.
    let pulled = tokio::time::timeout(WAIT, pull).await.expect("B's pull ended").unwrap();
    assert!(pulled.is_err(), "a pull from a stopped node succeeded");
    b.shutdown().await.unwrap();
}

/// A pull task blocked in the store: B pulls A, which serves B's grant, and
/// B's ingest of that page never returns; B shuts down; the ingest's future
/// is gone when `shutdown` returns, and the caller of `sync_now` hears that
/// the node stopped.
#[tokio::test]
async fn shutdown_ends_a_pull_blocked_in_ingest() {
    let a_key = medmesh_crypto::SecretIdentity::generate().unwrap();
    let a_store = Arc::new(MemoryBackend::new());
    let a = SyncHandle::spawn(quiet_config(), &a_key, a_store.clone())
        .await
        .unwrap();
    let b_key = medmesh_crypto::SecretIdentity::generate().unwrap();
    let b_store = Arc::new(Gated::new(Block::Ingest));
    let b = SyncHandle::spawn(quiet_config(), &b_key, b_store.clone())
        .await
        .unwrap();

    // The patient grants B core at A: A discloses that grant to B.
    let mut patient = CliPatient::new().unwrap();
    let (_, items) = patient
        .grant(
            b_key.practice_id().unwrap(),
            &[Collection::Core],
            Access::Read,
            now() - 60_000,
            None,
            Vec::new(),
        )
        .unwrap();
    let report = a_store.ingest(patient.peer().unwrap(), items).await.unwrap();
    assert!(report.accepted > 0, "A took the patient's grant: {report:?}");

    let a_addr = a.listen_addrs().await.unwrap().remove(0);
    b.dial(a_addr).await.unwrap();
    let puller = b.clone();
    let a_peer = a.local_peer_id();
    let pull = tokio::spawn(async move { puller.sync_now(a_peer).await });
    until_blocked(&b_store).await;

    b.shutdown().await.unwrap();
    assert_eq!(
        b_store.blocked_calls(),
        0,
        "a pull task still ran after shutdown returned"
    );
    let pulled = tokio::time::timeout(WAIT, pull)
        .await
        .expect("the pull's caller was answered")
        .unwrap();
    assert!(
        matches!(pulled, Err(medmesh_sync::Error::Stopped)),
        "sync_now on a stopped node: {pulled:?}"
    );
    a.shutdown().await.unwrap();
}
