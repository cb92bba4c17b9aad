//! What the actor's tasks share: the store, a way back to the actor, the counters.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use medmesh_crypto::{Collection, PatientId};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::actor::messages::Internal;
use crate::backend::{Backend, IngestReport, Item};
use crate::config::Limits;
use crate::serve::Served;
use crate::wire::{RefusalCode, Request, Response};
use crate::{Error, Result, SyncReport};

/// The first wait before asking a busy peer again.
pub(crate) const BUSY_BACKOFF: Duration = Duration::from_millis(250);

/// Counters shared by the actor and its tasks.
#[derive(Default, Debug)]
pub(crate) struct Metrics {
    pub(crate) items_sent: AtomicU64,
    pub(crate) items_received: AtomicU64,
    pub(crate) items_accepted: AtomicU64,
    pub(crate) items_rejected: AtomicU64,
    pub(crate) items_pending: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) refused_busy: AtomicU64,
    pub(crate) items_pending_refused: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) requests_sent: AtomicU64,
    pub(crate) requests_received: AtomicU64,
    pub(crate) reconciliations: AtomicU64,
    pub(crate) reconciliations_failed: AtomicU64,
    pub(crate) items_unwanted: AtomicU64,
    pub(crate) dials_limited: AtomicU64,
}

impl Metrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn received(&self, items: &[Item]) {
        Self::add(&self.items_received, items.len() as u64);
        Self::add(&self.bytes_received, items.iter().map(|i| i.bytes.len() as u64).sum());
    }

    pub(crate) fn ingested(&self, report: &IngestReport) {
        Self::add(&self.items_accepted, report.accepted);
        Self::add(&self.items_rejected, report.rejected);
        Self::add(&self.items_pending, report.pending);
        Self::add(&self.items_pending_refused, report.refused);
        Self::add(&self.items_unwanted, report.unwanted);
    }

    pub(crate) fn sent(&self, served: Served) {
        Self::add(&self.items_sent, served.items);
        Self::add(&self.bytes_sent, served.bytes);
    }
}

/// What tasks need: the store, a way back to the actor, the counters.
pub(crate) struct Ctx<B> {
    pub(crate) backend: Arc<B>,
    /// This node's PeerId.
    pub(crate) me: PeerId,
    /// The actor's channel for its tasks. A strong sender: tasks do not
    /// outlive the actor (they run in its `JoinSet`), and the actor stops
    /// on its handles' channel, not on this one.
    pub(crate) tx: mpsc::Sender<Internal>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) page_limit: u32,
    pub(crate) limits: Arc<Limits>,
    /// Items each peer parked in the pending queue, as far as sync can tell
    /// (counted from ingest reports; clamped to the queue's size, so items
    /// released by a grant free their senders' shares once the queue
    /// drains). Only peers with a share are kept.
    pub(crate) parked: Arc<Mutex<HashMap<PeerId, u64>>>,
    /// See [`crate::Config::snapshot_min_envelopes`].
    pub(crate) snapshot_min: usize,
    /// Snapshot transfers: one at a time per (peer, patient, collection),
    /// and the transfers (peer, source) already restored.
    pub(crate) transfers: Arc<Transfers>,
    /// Reconciliations a peer asked for ([`Request::Reconcile`]) under way,
    /// by (peer, patient); `true` when asked again meanwhile, so one more
    /// round runs after it (the ask may come from a grant the running round
    /// started too early to see).
    pub(crate) asked_reconciles: Arc<Mutex<HashMap<(PeerId, PatientId), bool>>>,
    /// A tick's redelivery round is under way.
    pub(crate) redelivering: Arc<std::sync::atomic::AtomicBool>,
    /// When the last anti-entropy round with each peer ended (`None`
    /// while one runs), so a peer that reconnects over and over costs at
    /// most one round per [`ANTI_ENTROPY_MIN_GAP`].
    pub(crate) anti_entropy: Arc<Mutex<HashMap<PeerId, Option<Instant>>>>,
    /// Consent flows under way, per patient ([`Following`]).
    pub(crate) following: Arc<Mutex<HashMap<PatientId, usize>>>,
    /// The highest seq of a stored item handed to the consent flows: below
    /// the store's last seq, stored items still wait for theirs.
    pub(crate) followed: Arc<AtomicU64>,
}

/// One consent flow under way for a patient, counted in
/// [`Ctx::following`] until dropped: an outbox report made meanwhile may
/// miss the debts the flow is about to record, and says so.
pub(crate) struct Following {
    pub(crate) counts: Arc<Mutex<HashMap<PatientId, usize>>>,
    pub(crate) patient: PatientId,
}

impl Following {
    pub(crate) fn start(counts: &Arc<Mutex<HashMap<PatientId, usize>>>, patient: PatientId) -> Self {
        *counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(patient)
            .or_default() += 1;
        Self {
            counts: counts.clone(),
            patient,
        }
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.patient) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.patient);
            }
        }
    }
}

/// Whose transfer: one at a time per key.
pub(crate) type TransferKey = (PeerId, PatientId, Collection);

#[derive(Default)]
pub(crate) struct Transfers {
    pub(crate) locks: Mutex<HashMap<TransferKey, Arc<tokio::sync::Mutex<()>>>>,
    pub(crate) restored: Mutex<HashSet<(PeerId, [u8; 32])>>,
}

impl<B> Clone for Ctx<B> {
    fn clone(&self) -> Self {
        Self {
            backend: self.backend.clone(),
            me: self.me,
            tx: self.tx.clone(),
            metrics: self.metrics.clone(),
            page_limit: self.page_limit,
            limits: self.limits.clone(),
            parked: self.parked.clone(),
            snapshot_min: self.snapshot_min,
            transfers: self.transfers.clone(),
            asked_reconciles: self.asked_reconciles.clone(),
            redelivering: self.redelivering.clone(),
            anti_entropy: self.anti_entropy.clone(),
            following: self.following.clone(),
            followed: self.followed.clone(),
        }
    }
}

impl<B: Backend> Ctx<B> {
    pub(crate) async fn send(&self, message: Internal) -> Result<()> {
        self.tx.send(message).await.map_err(|_| Error::Stopped)
    }

    /// Has the actor run `task` beside this one, in its task set (so that
    /// shutdown ends it too).
    ///
    /// # Errors
    /// [`Error::Stopped`]: the actor is gone, and `task` with it.
    pub(crate) async fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        self.send(Internal::Spawn(Box::pin(task))).await
    }

    /// Connects to `peer` (known addresses, else Kademlia).
    pub(crate) async fn dial_peer(&self, peer: PeerId) -> Result<PeerId> {
        let (reply, rx) = oneshot::channel();
        self.send(Internal::DialPeer { peer, reply }).await?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// A pull from `peer`, joining one under way (as [`crate::SyncHandle::sync_now`]).
    pub(crate) async fn sync_now(&self, peer: PeerId) -> Result<SyncReport> {
        let (reply, rx) = oneshot::channel();
        self.send(Internal::SyncNow { peer, reply }).await?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// Whether a consent flow may contact `peer` for input that `source`
    /// brought (`None`: a local write, never limited).
    pub(crate) async fn may_dial(&self, peer: PeerId, source: Option<PeerId>) -> Result<bool> {
        let Some(source) = source else {
            return Ok(true);
        };
        let (reply, rx) = oneshot::channel();
        self.send(Internal::MayDial { peer, source, reply }).await?;
        rx.await.map_err(|_| Error::Stopped)
    }

    pub(crate) async fn known_addrs(&self, peer: PeerId) -> Result<Vec<Multiaddr>> {
        let (reply, rx) = oneshot::channel();
        self.send(Internal::KnownAddrs { peer, reply }).await?;
        rx.await.map_err(|_| Error::Stopped)
    }

    pub(crate) async fn connected_peers(&self) -> Result<Vec<PeerId>> {
        let (reply, rx) = oneshot::channel();
        self.send(Internal::ConnectedPeers(reply)).await?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// Sends a request; one answered `Busy` is asked again after doubling
    /// waits, up to `limits.busy_retries` times (every request is
    /// idempotent).
    pub(crate) async fn request(&self, peer: PeerId, request: Request) -> Result<Response> {
        let mut wait = BUSY_BACKOFF;
        for _ in 0..self.limits.busy_retries {
            match self.request_retrying(peer, request.clone()).await? {
                Response::Refused(RefusalCode::Busy) => {
                    debug!(%peer, request = request.name(), "peer busy; asking again later");
                    tokio::time::sleep(wait).await;
                    wait = wait.saturating_mul(2);
                }
                other => return Ok(other),
            }
        }
        self.request_retrying(peer, request).await
    }

    pub(crate) async fn request_retrying(&self, peer: PeerId, request: Request) -> Result<Response> {
        match self.request_once(peer, request.clone()).await {
            // Idempotent requests: one retry, on whatever connection the swarm has or makes now.
            Err(Error::ConnectionLost { .. }) => {
                debug!(%peer, request = request.name(), "connection closed under a request; retrying once");
                self.request_once(peer, request).await
            }
            other => other,
        }
    }

    pub(crate) async fn request_once(&self, peer: PeerId, request: Request) -> Result<Response> {
        let (reply, rx) = oneshot::channel();
        self.send(Internal::Request { peer, request, reply }).await?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    pub(crate) async fn ingest(&self, peer: PeerId, items: Vec<Item>) -> Result<IngestReport> {
        self.metrics.received(&items);
        self.ingest_received(peer, items).await
    }

    /// [`Ctx::ingest`] of items already counted as received.
    pub(crate) async fn ingest_received(&self, peer: PeerId, items: Vec<Item>) -> Result<IngestReport> {
        if items.is_empty() {
            return Ok(IngestReport::default());
        }
        let room = self.pending_room(peer)?;
        let report = self.backend.ingest_capped(peer, items, room).await?;
        self.note_ingested(peer, &report);
        Ok(report)
    }

    /// Counts what an ingest did, and the pending-queue share it used.
    pub(crate) fn note_ingested(&self, peer: PeerId, report: &IngestReport) {
        self.metrics.ingested(report);
        if report.pending > 0 {
            let mut parked = self.parked.lock().unwrap_or_else(PoisonError::into_inner);
            *parked.entry(peer).or_default() += report.pending;
        }
        if report.refused > 0 {
            warn!(%peer, refused = report.refused, "pending-queue share used up; items refused");
        }
    }

    /// How many more items `peer` may park in the pending queue now.
    pub(crate) fn pending_room(&self, peer: PeerId) -> Result<u64> {
        let total = self.backend.pending_total()?;
        let mut parked = self.parked.lock().unwrap_or_else(PoisonError::into_inner);
        parked.retain(|_, n| {
            *n = (*n).min(total);
            *n > 0
        });
        let mine = parked.get(&peer).copied().unwrap_or(0);
        Ok(self
            .limits
            .max_pending_per_peer
            .saturating_sub(mine)
            .min(self.limits.max_pending.saturating_sub(total)))
    }
}

/// The error for an answer that is not the one asked for: a refusal, or
/// another kind of response.
pub(crate) fn unexpected(peer: PeerId, request: &'static str, answer: &Response) -> Error {
    match answer {
        Response::Refused(code) => Error::Refused {
            peer,
            reason: code.as_str(),
        },
        other => Error::UnexpectedResponse {
            peer,
            request,
            answer: other.name(),
        },
    }
}
