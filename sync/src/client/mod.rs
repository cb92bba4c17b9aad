//! The client side of `/medmesh/sync/1`: the steps a node takes to get what
//! its peers may send it — pull, snapshot transfer, reconciliation,
//! anti-entropy — as functions over a [`Link`] (send one request, get its
//! answer) and a [`Backend`], with no swarm, task or timer in them (STYLE
//! §7). The sync actor runs them with a link through its swarm; the
//! schedules property test runs the very same functions over a simulated
//! network that reorders, duplicates and drops messages.

mod anti_entropy;
mod pull;
mod reconcile;
mod transfer;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use libp2p::PeerId;
use medmesh_crypto::PatientId;
use tracing::warn;

use crate::backend::{Backend, IngestReport, Item};
use crate::config::{Config, Limits};
use crate::metrics::Metrics;
use crate::wire::{MAX_ITEMS_PER_MESSAGE, Request, Response};
use crate::{Error, Result, SyncReport};

pub(crate) use transfer::Transfers;

/// One request to a peer, answered: whatever carries it (the node's swarm,
/// a test's simulated network). Every request the client sends is
/// idempotent, so a link may retry one.
pub trait Link: Send + Sync {
    /// Sends `request` to `peer` and returns its answer.
    ///
    /// # Errors
    /// The transport's: [`Error::ConnectionLost`] when the request or its
    /// answer was lost with a connection, [`Error::Request`],
    /// [`Error::Stopped`].
    fn request(&self, peer: PeerId, request: Request) -> impl Future<Output = Result<Response>> + Send;
}

/// One node's client: its store, a link to its peers, and what its client
/// steps share across runs (the pending-queue shares of its peers, the
/// snapshot transfers under way and restored, the counters). Clones share
/// all of it.
pub struct Client<B, L> {
    backend: Arc<B>,
    link: L,
    /// This node's PeerId.
    me: PeerId,
    page_limit: u32,
    /// See [`crate::Config::snapshot_min_envelopes`].
    snapshot_min: usize,
    limits: Arc<Limits>,
    metrics: Arc<Metrics>,
    /// Items each peer parked in the pending queue, as far as sync can tell
    /// (counted from ingest reports; clamped to the queue's size, so items
    /// released by a grant free their senders' shares once the queue
    /// drains). Only peers with a share are kept.
    parked: Arc<Mutex<HashMap<PeerId, u64>>>,
    /// Snapshot transfers: one at a time per (peer, patient, collection),
    /// and the transfers (peer, source) already restored.
    transfers: Arc<Transfers>,
}

impl<B, L: Clone> Clone for Client<B, L> {
    fn clone(&self) -> Self {
        Self {
            backend: self.backend.clone(),
            link: self.link.clone(),
            me: self.me,
            page_limit: self.page_limit,
            snapshot_min: self.snapshot_min,
            limits: self.limits.clone(),
            metrics: self.metrics.clone(),
            parked: self.parked.clone(),
            transfers: self.transfers.clone(),
        }
    }
}

impl<B: Backend, L: Link> Client<B, L> {
    /// The client of node `me` over `backend`, reaching its peers through
    /// `link`, with `config`'s page size, snapshot threshold and
    /// pending-queue limits.
    pub fn new(backend: Arc<B>, link: L, me: PeerId, config: &Config) -> Self {
        Self::with_metrics(backend, link, me, config, Arc::default())
    }

    /// As [`Client::new`], counting into `metrics` (the actor's).
    pub(crate) fn with_metrics(backend: Arc<B>, link: L, me: PeerId, config: &Config, metrics: Arc<Metrics>) -> Self {
        Self {
            backend,
            link,
            me,
            page_limit: config.page_limit.clamp(1, MAX_ITEMS_PER_MESSAGE as u32),
            snapshot_min: config.snapshot_min_envelopes,
            limits: Arc::new(config.limits.clone()),
            metrics,
            parked: Arc::default(),
            transfers: Arc::default(),
        }
    }

    /// Pulls pages from `peer` until its log is exhausted, then takes the
    /// snapshot transfers offered on the way and reconciles what is still
    /// missing (see `pull.rs`).
    ///
    /// # Errors
    /// The link's; a refusal or an answer that breaks the protocol
    /// ([`Error::Wire`], [`Error::UnexpectedResponse`]); storage failures.
    pub async fn pull(&self, peer: PeerId) -> Result<SyncReport> {
        pull::pull(self, peer).await
    }

    /// Reconciles `patient` with `peer`: compares envelope-id summaries and
    /// fetches (or takes as a transfer) what `peer` may send and this node
    /// lacks. Counted in [`crate::Status`] (run, failed).
    ///
    /// # Errors
    /// As [`Client::pull`].
    pub async fn reconcile(&self, peer: PeerId, patient: PatientId) -> Result<SyncReport> {
        reconcile::reconcile(self, peer, patient).await
    }

    /// One anti-entropy round with `peer` (docs/protocol.md §8): every
    /// patient both may read compared in one digest request, those that
    /// differ reconciled.
    ///
    /// # Errors
    /// As [`Client::reconcile`]; the round stops at the first failure.
    pub async fn anti_entropy(&self, peer: PeerId) -> Result<SyncReport> {
        anti_entropy::anti_entropy(self, peer).await
    }

    /// The store.
    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// Sends one request through the link.
    pub(crate) async fn request(&self, peer: PeerId, request: Request) -> Result<Response> {
        self.link.request(peer, request).await
    }

    /// Ingests items received from `peer`, within its share of the pending
    /// queue, and counts them.
    pub(crate) async fn ingest(&self, peer: PeerId, items: Vec<Item>) -> Result<IngestReport> {
        self.metrics.received(&items);
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
