//! What the actor's tasks share: the store, the client steps with a link
//! through the actor's swarm, a way back to the actor, the counters.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use medmesh_crypto::PatientId;
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use crate::actor::messages::{Ask, Internal};
use crate::backend::{Backend, IngestReport, Item};
use crate::client::{Client, Link};
use crate::config::Limits;
use crate::metrics::Metrics;
use crate::wire::{RefusalCode, Request, Response};
use crate::{Error, Result, SyncReport};

/// The first wait before asking a busy peer again.
pub(crate) const BUSY_BACKOFF: Duration = Duration::from_millis(250);

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
    /// The client steps (pull, reconcile, transfer, anti-entropy), over a
    /// link through this actor's swarm.
    pub(crate) client: Client<B, Swarmed>,
    /// Reconciliations a peer asked for ([`Request::Reconcile`]) under way,
    /// by (peer, patient); `true` when asked again meanwhile, so one more
    /// round runs after it (the ask may come from a grant the running round
    /// started too early to see).
    pub(crate) asked_reconciles: Arc<Mutex<HashMap<(PeerId, PatientId), bool>>>,
    /// A tick's redelivery round is under way.
    pub(crate) redelivering: Arc<std::sync::atomic::AtomicBool>,
    /// When the last anti-entropy round with each peer ended (`None`
    /// while one runs), so a peer that reconnects over and over costs at
    /// most one round per [`super::ANTI_ENTROPY_MIN_GAP`].
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

impl<B> Clone for Ctx<B> {
    fn clone(&self) -> Self {
        Self {
            backend: self.backend.clone(),
            me: self.me,
            tx: self.tx.clone(),
            metrics: self.metrics.clone(),
            client: self.client.clone(),
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
        self.send(Internal::Ask(Ask::DialPeer { peer, reply })).await?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// A pull from `peer`, joining one under way (as [`crate::SyncHandle::sync_now`]).
    pub(crate) async fn sync_now(&self, peer: PeerId) -> Result<SyncReport> {
        let (reply, rx) = oneshot::channel();
        self.send(Internal::Ask(Ask::SyncNow { peer, reply })).await?;
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
        self.send(Internal::Ask(Ask::ConnectedPeers(reply))).await?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// Sends a request through the swarm (see [`Swarmed`]).
    pub(crate) async fn request(&self, peer: PeerId, request: Request) -> Result<Response> {
        self.client.request(peer, request).await
    }

    /// Ingests items received from `peer` (see [`Client`]).
    pub(crate) async fn ingest(&self, peer: PeerId, items: Vec<Item>) -> Result<IngestReport> {
        self.client.ingest(peer, items).await
    }
}

/// The actor's [`Link`]: each request goes to the actor, which sends it over
/// the swarm and routes the answer back. One answered `Busy` is asked again
/// after doubling waits, up to `limits.busy_retries` times, and one lost
/// with its connection once more (every request is idempotent).
#[derive(Clone)]
pub(crate) struct Swarmed {
    pub(crate) tx: mpsc::Sender<Internal>,
    pub(crate) limits: Arc<Limits>,
}

impl Link for Swarmed {
    async fn request(&self, peer: PeerId, request: Request) -> Result<Response> {
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
}

impl Swarmed {
    async fn request_retrying(&self, peer: PeerId, request: Request) -> Result<Response> {
        match self.request_once(peer, request.clone()).await {
            // Idempotent requests: one retry, on whatever connection the swarm has or makes now.
            Err(Error::ConnectionLost { .. }) => {
                debug!(%peer, request = request.name(), "connection closed under a request; retrying once");
                self.request_once(peer, request).await
            }
            other => other,
        }
    }

    async fn request_once(&self, peer: PeerId, request: Request) -> Result<Response> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Internal::Ask(Ask::Request { peer, request, reply }))
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }
}
