//! The sync actor: one task owns the libp2p `Swarm` and every piece of
//! connection state; [`crate::SyncHandle`] drives it through a bounded
//! channel of commands that carry their reply senders (STYLE §3). Multi-step
//! work (pulling pages, reconciling) runs in spawned tasks that talk to the
//! actor through a weak sender, so the actor ends once every handle is gone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder, connection_limits, dcutr, identify, kad, mdns, noise, ping,
    relay, tcp, yamux,
};
use medmesh_crypto::{
    Collection, EnvelopeId, Grant, GrantId, PatientId, PracticeId, Principal, SecretIdentity, Timestamp, now,
};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::backend::{
    Backend, ConsentView, Cursor, DisclosureRecord, IngestReport, Item, ItemId, ItemKind, ItemMeta, ItemStored, Owed,
};
use crate::config::{Config, Limits, RelayLimits};
use crate::serve::{self, Served};
use crate::wire::{
    Codec, MAX_DIGEST_PATIENTS, MAX_FETCH_IDS, MAX_ITEMS_PER_MESSAGE, MAX_OFFERS_PER_PAGE, MAX_PUSH_ADDRS, Offer,
    OutboxReport, PROTOCOL, RefusalCode, Request, Response, patient_digest, summary_digest,
};
use crate::{Connection, Error, Result, Status, SyncReport};
use medmesh_node::policy::{Requester, may_disclose};
use medmesh_node::rate::Bucket;

const COMMAND_CAPACITY: usize = 256;
const LISTEN_SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopping actor waits for its connections to close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
const IDENTIFY_PROTOCOL: &str = "/medmesh/id/1";
/// Our own Kademlia network: never the public IPFS DHT.
const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/medmesh/kad/1");
/// A node joins the Kademlia network by looking up the peers closest to its
/// own id — this many: they and the peers met on the way add it to their
/// routing tables, so a lookup for it ends at nodes that know it. It does
/// so instead of libp2p-kad's bootstrap, which asks for the 20 closest of
/// its own id and of one id in every farther bucket, again after every peer
/// that joins a table of fewer than 20 — in a 100-node network every node
/// contacted every other, twice per start (docs/decisions.md, "Kademlia").
const KAD_JOIN_CLOSEST: NonZeroUsize = match NonZeroUsize::new(8) {
    Some(n) => n,
    None => NonZeroUsize::MIN,
};
/// How often the join lookup runs again (on the next identify report of a
/// Kademlia peer after this long), to stay known near its id as nodes come
/// and go.
const KAD_REJOIN: Duration = Duration::from_secs(30 * 60);
/// The first wait before asking a busy peer again.
const BUSY_BACKOFF: Duration = Duration::from_millis(250);

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    kad: Toggle<kad::Behaviour<kad::store::MemoryStore>>,
    /// Dials `/p2p-circuit` addresses and holds reservations on relays.
    relay_client: relay::client::Behaviour,
    /// Serves circuits for other nodes (`Config::relay_server`).
    relay: Toggle<relay::Behaviour>,
    dcutr: Toggle<dcutr::Behaviour>,
    sync: request_response::Behaviour<Codec>,
}

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
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn received(&self, items: &[Item]) {
        Self::add(&self.items_received, items.len() as u64);
        Self::add(&self.bytes_received, items.iter().map(|i| i.bytes.len() as u64).sum());
    }

    fn ingested(&self, report: &IngestReport) {
        Self::add(&self.items_accepted, report.accepted);
        Self::add(&self.items_rejected, report.rejected);
        Self::add(&self.items_pending, report.pending);
        Self::add(&self.items_pending_refused, report.refused);
        Self::add(&self.items_unwanted, report.unwanted);
    }

    fn sent(&self, served: Served) {
        Self::add(&self.items_sent, served.items);
        Self::add(&self.bytes_sent, served.bytes);
    }
}

/// Messages to the actor: from handles (with reply senders) and from its own
/// tasks.
pub(crate) enum Command {
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<PeerId>>,
    },
    ConnectedPeers(oneshot::Sender<Vec<PeerId>>),
    Connections(oneshot::Sender<Vec<Connection>>),
    /// Connect to a PeerId: known addresses first, else a Kademlia lookup.
    DialPeer {
        peer: PeerId,
        reply: oneshot::Sender<Result<PeerId>>,
    },
    SyncNow {
        peer: PeerId,
        reply: oneshot::Sender<Result<SyncReport>>,
    },
    Reconcile {
        peer: PeerId,
        patient: PatientId,
        reply: oneshot::Sender<Result<SyncReport>>,
    },
    AntiEntropy {
        peer: PeerId,
        reply: oneshot::Sender<Result<SyncReport>>,
    },
    Request {
        peer: PeerId,
        request: Request,
        reply: oneshot::Sender<Result<Response>>,
    },
    Push {
        peer: PeerId,
        items: Vec<Item>,
        addrs: Vec<Multiaddr>,
        reply: oneshot::Sender<Result<IngestReport>>,
    },
    Status(oneshot::Sender<Status>),
    /// What this node owes others of a patient's consent items.
    Outbox {
        patient: PatientId,
        reply: oneshot::Sender<Result<OutboxReport>>,
    },
    Shutdown(oneshot::Sender<()>),
    Respond {
        peer: PeerId,
        channel: ResponseChannel<Response>,
        response: Response,
        served: Served,
    },
    PullDone {
        peer: PeerId,
        result: Result<SyncReport>,
    },
    /// A pull that failed, or was cut off with its connection, is due again.
    RetryPull(PeerId),
    Pushed {
        peer: PeerId,
    },
    Forward {
        peer: PeerId,
        id: ItemId,
        item: Item,
    },
    Nudge {
        peer: PeerId,
        seq: u64,
    },
    AddAddress {
        peer: PeerId,
        addr: Multiaddr,
    },
    /// The addresses this node knows for `peer` (kept with what it owes it).
    KnownAddrs {
        peer: PeerId,
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    /// May a consent flow contact `peer` for input from `source`
    /// ([`DialBudget`])?
    MayDial {
        peer: PeerId,
        source: PeerId,
        reply: oneshot::Sender<bool>,
    },
}

/// What tasks need: the store, a way back to the actor, the counters.
pub(crate) struct Ctx<B> {
    backend: Arc<B>,
    /// This node's PeerId.
    me: PeerId,
    tx: mpsc::WeakSender<Command>,
    metrics: Arc<Metrics>,
    page_limit: u32,
    limits: Arc<Limits>,
    /// Items each peer parked in the pending queue, as far as sync can tell
    /// (counted from ingest reports; clamped to the queue's size, so items
    /// released by a grant free their senders' shares once the queue
    /// drains). Only peers with a share are kept.
    parked: Arc<Mutex<HashMap<PeerId, u64>>>,
    /// See [`crate::Config::snapshot_min_envelopes`].
    snapshot_min: usize,
    /// Snapshot transfers: one at a time per (peer, patient, collection),
    /// and the transfers (peer, source) already restored.
    transfers: Arc<Transfers>,
    /// Reconciliations a peer asked for ([`Request::Reconcile`]) under way,
    /// by (peer, patient); `true` when asked again meanwhile, so one more
    /// round runs after it (the ask may come from a grant the running round
    /// started too early to see).
    asked_reconciles: Arc<Mutex<HashMap<(PeerId, PatientId), bool>>>,
    /// A tick's redelivery round is under way.
    redelivering: Arc<std::sync::atomic::AtomicBool>,
    /// When the last anti-entropy round with each peer ended (`None`
    /// while one runs), so a peer that reconnects over and over costs at
    /// most one round per [`ANTI_ENTROPY_MIN_GAP`].
    anti_entropy: Arc<Mutex<HashMap<PeerId, Option<Instant>>>>,
    /// Consent flows under way, per patient ([`Following`]).
    following: Arc<Mutex<HashMap<PatientId, usize>>>,
    /// The highest seq of a stored item handed to the consent flows: below
    /// the store's last seq, stored items still wait for theirs.
    followed: Arc<AtomicU64>,
}

/// One consent flow under way for a patient, counted in
/// [`Ctx::following`] until dropped: an outbox report made meanwhile may
/// miss the debts the flow is about to record, and says so.
struct Following {
    counts: Arc<Mutex<HashMap<PatientId, usize>>>,
    patient: PatientId,
}

impl Following {
    fn start(counts: &Arc<Mutex<HashMap<PatientId, usize>>>, patient: PatientId) -> Self {
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
type TransferKey = (PeerId, PatientId, Collection);

#[derive(Default)]
struct Transfers {
    locks: Mutex<HashMap<TransferKey, Arc<tokio::sync::Mutex<()>>>>,
    restored: Mutex<HashSet<(PeerId, [u8; 32])>>,
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

/// The token-bucket rates of sync's limits.
mod rates {
    use medmesh_node::rate::Rate;

    use crate::config::Limits;

    /// Inbound requests of one peer.
    pub(super) fn requests(limits: &Limits) -> Rate {
        Rate::per_second(limits.requests_per_second, limits.request_burst)
    }

    /// Dials made on behalf of one source.
    pub(super) fn dials_per_source(limits: &Limits) -> Rate {
        Rate::per_minute(limits.dials_per_minute_per_source, limits.dial_burst_per_source)
    }

    /// Dials made on behalf of any remote input.
    pub(super) fn dials(limits: &Limits) -> Rate {
        Rate::per_minute(limits.dials_per_minute, limits.dial_burst)
    }
}

/// Dials the node makes on behalf of remote input (consent flows of items
/// a peer or a patient's session brought): a bucket per source and one for
/// all (docs/protocol.md §10a). Connected and static peers cost nothing.
struct DialBudget {
    per_source: HashMap<PeerId, Bucket>,
    all: Bucket,
}

impl DialBudget {
    fn new(limits: &Limits, at: Instant) -> Self {
        Self {
            per_source: HashMap::new(),
            all: Bucket::full(rates::dials(limits), at),
        }
    }

    /// Takes a token from `source`'s bucket and from the global one, or
    /// from neither.
    fn take(&mut self, limits: &Limits, source: PeerId, at: Instant) -> bool {
        let (mine, all) = (rates::dials_per_source(limits), rates::dials(limits));
        let bucket = self.per_source.entry(source).or_insert_with(|| Bucket::full(mine, at));
        Bucket::take_both((bucket, mine), (&mut self.all, all), at)
    }

    /// Forgets the full buckets (absent means full).
    fn prune(&mut self, limits: &Limits, at: Instant) {
        let mine = rates::dials_per_source(limits);
        self.per_source.retain(|_, b| !b.is_full(mine, at));
    }
}

impl<B: Backend> Ctx<B> {
    async fn send(&self, command: Command) -> Result<()> {
        let tx = self.tx.upgrade().ok_or(Error::Stopped)?;
        tx.send(command).await.map_err(|_| Error::Stopped)
    }

    /// Connects to `peer` (known addresses, else Kademlia).
    async fn dial_peer(&self, peer: PeerId) -> Result<PeerId> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::DialPeer { peer, reply }).await?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// A pull from `peer`, joining one under way (as [`crate::SyncHandle::sync_now`]).
    async fn sync_now(&self, peer: PeerId) -> Result<SyncReport> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::SyncNow { peer, reply }).await?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// Whether a consent flow may contact `peer` for input that `source`
    /// brought (`None`: a local write, never limited).
    async fn may_dial(&self, peer: PeerId, source: Option<PeerId>) -> Result<bool> {
        let Some(source) = source else {
            return Ok(true);
        };
        let (reply, rx) = oneshot::channel();
        self.send(Command::MayDial { peer, source, reply }).await?;
        rx.await.map_err(|_| Error::Stopped)
    }

    async fn known_addrs(&self, peer: PeerId) -> Result<Vec<Multiaddr>> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::KnownAddrs { peer, reply }).await?;
        rx.await.map_err(|_| Error::Stopped)
    }

    async fn connected_peers(&self) -> Result<Vec<PeerId>> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::ConnectedPeers(reply)).await?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// Sends a request; one answered `Busy` is asked again after doubling
    /// waits, up to `limits.busy_retries` times (every request is
    /// idempotent).
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
        self.send(Command::Request { peer, request, reply }).await?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    async fn ingest(&self, peer: PeerId, items: Vec<Item>) -> Result<IngestReport> {
        self.metrics.received(&items);
        self.ingest_received(peer, items).await
    }

    /// [`Ctx::ingest`] of items already counted as received.
    async fn ingest_received(&self, peer: PeerId, items: Vec<Item>) -> Result<IngestReport> {
        if items.is_empty() {
            return Ok(IngestReport::default());
        }
        let room = self.pending_room(peer)?;
        let report = self.backend.ingest_capped(peer, items, room).await?;
        self.note_ingested(peer, &report);
        Ok(report)
    }

    /// Counts what an ingest did, and the pending-queue share it used.
    fn note_ingested(&self, peer: PeerId, report: &IngestReport) {
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
    fn pending_room(&self, peer: PeerId) -> Result<u64> {
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

/// Pulls pages from `peer` until its log is exhausted; the cursor is stored
/// only after the page it covers was ingested.
///
/// Snapshot offers collected on the way are taken at the end, when the
/// pages have brought the grants and key shares they need; a collection
/// whose transfer fails is reconciled instead (its envelopes were left out
/// of the pages).
async fn pull_task<B: Backend>(ctx: &Ctx<B>, peer: PeerId) -> Result<SyncReport> {
    let mut report = SyncReport::default();
    let mut offers: Vec<Offer> = Vec::new();
    // Patients of pages that left envelopes pending: the peer holds them,
    // so it may well hold the grant they wait for — one this node scanned
    // past while its own grant had not started, or whose reconciliation
    // failed. Reconciling with the peer asks for it again.
    let mut waiting: Vec<PatientId> = Vec::new();
    let mut cursor = ctx.backend.cursor(&peer)?.unwrap_or_default();
    // Pages that offer a snapshot transfer carry no envelopes of it: the
    // stored cursor stays before the first of them until the transfers (or
    // the reconciliations replacing them) are done, so a restart in between
    // pulls those pages again instead of skipping their envelopes for good.
    let mut held = false;
    loop {
        let limit = ctx.page_limit;
        let snapshots = (ctx.snapshot_min > 0).then(|| offers.iter().map(|o| o.source).collect());
        let response = ctx
            .request(
                peer,
                Request::Pull {
                    cursor,
                    limit,
                    snapshots,
                },
            )
            .await?;
        let (instance, next, more, items, page_offers) = match response {
            Response::Page {
                instance,
                next,
                more,
                items,
                offers,
            } => (instance, next, more, items, offers),
            other => return Err(unexpected(peer, "pull", &other)),
        };
        if items.len() > limit as usize {
            return Err(Error::Wire {
                message: "page",
                reason: "more items than the limit asked for",
            });
        }
        if !page_offers.is_empty() && ctx.snapshot_min == 0 {
            return Err(Error::Wire {
                message: "page",
                reason: "snapshot offers to a puller that takes none",
            });
        }
        for offer in page_offers {
            if !offers.contains(&offer) && offers.len() < MAX_OFFERS_PER_PAGE {
                offers.push(offer);
            }
        }
        let same_instance = instance == cursor.instance;
        if same_instance && next < cursor.seq {
            return Err(Error::Wire {
                message: "page",
                reason: "cursor went backwards",
            });
        }
        if !same_instance {
            info!(%peer, %instance, "peer store instance changed; cursor reset");
        }
        report.pages += 1;
        report.received += items.len() as u64;
        // Who the page's envelopes belong to, read without verifying (the
        // ingest verifies; this only picks whom to reconcile).
        let mut envelope_patients: Vec<PatientId> = Vec::new();
        for item in items.iter().filter(|i| i.kind == ItemKind::Envelope) {
            if let Ok(h) = medmesh_crypto::CompactHeader::of_stored_envelope(&item.bytes)
                && !envelope_patients.contains(&h.header().patient)
            {
                envelope_patients.push(h.header().patient);
            }
        }
        let ingested = ctx.ingest(peer, items).await?;
        if ingested.pending > 0 {
            waiting.extend(envelope_patients);
        }
        report.ingest.add(ingested);
        let new = Cursor { instance, seq: next };
        held |= !offers.is_empty();
        if !held {
            ctx.backend.set_cursor(&peer, new).await?;
        }
        // Stop on the server's word, or when it makes no progress (a peer
        // that lies about `more` must not keep us looping).
        let stalled = same_instance && next == cursor.seq;
        cursor = new;
        if !more || stalled {
            break;
        }
    }
    let mut reconcile = waiting;
    for offer in offers {
        match snapshot_task(
            ctx,
            peer,
            offer.patient,
            offer.collection,
            TransferFor::Offer(offer.source),
        )
        .await
        {
            Ok((r, TransferOutcome::Complete)) => report.add(r),
            Ok((r, outcome)) => {
                debug!(%peer, collection = %offer.collection, ?outcome, "snapshot transfer incomplete; reconciling");
                report.add(r);
                reconcile.push(offer.patient);
            }
            Err(e) => {
                debug!(%peer, collection = %offer.collection, cause = %e, "snapshot transfer failed; reconciling");
                reconcile.push(offer.patient);
            }
        }
    }
    reconcile.sort_unstable();
    reconcile.dedup();
    for patient in reconcile {
        report.add(reconcile_task(ctx, peer, patient).await?);
    }
    if held {
        ctx.backend.set_cursor(&peer, cursor).await?;
    }
    Ok(report)
}

/// How a snapshot transfer went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TransferOutcome {
    /// Every covered envelope was restored and ingested (or this transfer
    /// was restored before).
    Complete,
    /// Some headers did not restore: their envelopes must be fetched.
    Partial,
    /// The peer had none to give, or this node cannot restore one.
    Unavailable,
}

/// Why a snapshot transfer is asked for.
#[derive(Clone, Copy)]
enum TransferFor<'a> {
    /// A page offered the transfer with this source: skipped when it was
    /// restored already.
    Offer([u8; 32]),
    /// Reconciliation misses envelopes of these: skipped when, by the time
    /// it runs, fewer than `snapshot_min` are still missing.
    Missing(&'a [EnvelopeId]),
}

/// Asks `peer` for the snapshot transfer of (patient, collection), rebuilds
/// the envelopes and ingests them like any envelopes.
async fn snapshot_task<B: Backend>(
    ctx: &Ctx<B>,
    peer: PeerId,
    patient: PatientId,
    collection: Collection,
    why: TransferFor<'_>,
) -> Result<(SyncReport, TransferOutcome)> {
    let mut report = SyncReport::default();
    let lock = ctx
        .transfers
        .locks
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry((peer, patient, collection))
        .or_default()
        .clone();
    let _one_at_a_time = lock.lock().await;
    let restored_before = |source: [u8; 32]| {
        ctx.transfers
            .restored
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&(peer, source))
    };
    // Another transfer (by a pull and a reconciliation running side by
    // side) may have delivered what this one is for.
    let done = match why {
        TransferFor::Offer(source) => restored_before(source),
        TransferFor::Missing(ids) => {
            let held: HashSet<EnvelopeId> = ctx.backend.envelope_ids(&patient, collection)?.into_iter().collect();
            ids.iter().filter(|id| !held.contains(id)).count() < ctx.snapshot_min
        }
    };
    if done {
        return Ok((report, TransferOutcome::Complete));
    }
    let payload = match ctx.request(peer, Request::Snapshot { patient, collection }).await? {
        Response::Snapshot(Some(p)) => p,
        Response::Snapshot(None) => return Ok((report, TransferOutcome::Unavailable)),
        other => return Err(unexpected(peer, "snapshot", &other)),
    };
    report.pages += 1;
    Metrics::add(&ctx.metrics.items_received, u64::from(payload.count));
    Metrics::add(
        &ctx.metrics.bytes_received,
        (payload.sealed_doc.len() + payload.headers.len()) as u64,
    );
    if restored_before(payload.source) {
        return Ok((report, TransferOutcome::Complete));
    }
    let source = payload.source;
    let room = ctx.pending_room(peer)?;
    let Some(done) = ctx
        .backend
        .restore_and_ingest(peer, patient, collection, payload, room)
        .await?
    else {
        return Ok((report, TransferOutcome::Unavailable));
    };
    ctx.note_ingested(peer, &done.report);
    report.received += done.restored;
    report.ingest.add(done.report);
    if done.unrestored > 0 {
        return Ok((report, TransferOutcome::Partial));
    }
    ctx.transfers
        .restored
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert((peer, source));
    Ok((report, TransferOutcome::Complete))
}

/// Most holders [`Actor::reach_holders`] dials per round.
const HOLDER_DIALS: usize = 16;
/// Most patients one anti-entropy round reconciles with one peer.
const ANTI_ENTROPY_PATIENTS: usize = 1024;
/// Least time between two rounds with one peer started by connections or
/// the interval (a peer cycling its connection must not make this node
/// send a thousand summaries each time).
const ANTI_ENTROPY_MIN_GAP: Duration = Duration::from_secs(60);

/// Reconciles with `peer` every patient both may read: a page lost, a
/// transfer cut by a restart, a nudge missed, items refused by a full
/// queue — whatever left a gap is found and fetched without a new grant.
/// One [`Request::Digests`] compares them all at once; only the patients
/// that differ are reconciled one by one ([`reconcile_task`]), and those in
/// step get their sync checks noted as a reconciliation would. A peer that
/// does not answer the digests (one that predates them) gets every patient
/// reconciled one by one. Stops at the first failure (the peer left).
async fn anti_entropy<B: Backend>(ctx: &Ctx<B>, peer: PeerId) -> Result<SyncReport> {
    let patients: Vec<PatientId> = ctx
        .backend
        .patients_shared_with(&peer)?
        .into_iter()
        .take(ANTI_ENTROPY_PATIENTS)
        .collect();
    let mut report = SyncReport::default();
    for batch in patients.chunks(MAX_DIGEST_PATIENTS) {
        let differing = match compare_digests(ctx, peer, batch, &mut report).await {
            Ok(differing) => differing,
            Err(e) => {
                debug!(%peer, cause = %e, "digests not answered; reconciling each patient");
                batch.to_vec()
            }
        };
        for patient in differing {
            report.add(reconcile_task(ctx, peer, patient).await?);
        }
    }
    Ok(report)
}

/// Asks `peer` which of `patients` differ ([`Request::Digests`]) and notes
/// a sync check, per collection compared, for each patient in step (as a
/// reconciliation that found nothing missing would: completeness, §8b).
/// Returns the patients that differ.
async fn compare_digests<B: Backend>(
    ctx: &Ctx<B>,
    peer: PeerId,
    patients: &[PatientId],
    report: &mut SyncReport,
) -> Result<Vec<PatientId>> {
    // Both ed25519 keys (a node's own identity is; a peer sharing patients is).
    let (Ok(me), Ok(holder)) = (Requester::from_peer_id(&ctx.me), PracticeId::from_peer_id(&peer)) else {
        return Ok(patients.to_vec());
    };
    let t = now();
    let mut parts = Vec::with_capacity(patients.len());
    for patient in patients {
        let view = ctx.backend.consent(patient)?;
        parts.push(serve::digest_parts(&*ctx.backend, &view, patient, &me, &holder, t)?);
    }
    let digests = patients
        .iter()
        .zip(&parts)
        // A patient this node may read nothing of here (its grant lapsed
        // since the list was made) cannot be in step: any digest will do.
        .map(|(p, parts)| (*p, parts.as_ref().map_or([0; 32], patient_digest)))
        .collect();
    let positions = match ctx.request(peer, Request::Digests { patients: digests }).await? {
        Response::Differing(positions) => positions,
        other => return Err(unexpected(peer, "digests", &other)),
    };
    report.pages += 1;
    // Ascending (checked by the decoder), and about the patients asked.
    if positions.last().is_some_and(|p| *p as usize >= patients.len()) {
        return Err(Error::Wire {
            message: "differing",
            reason: "position beyond the patients asked about",
        });
    }
    let mut differing = Vec::new();
    let mut next = positions.iter().map(|p| *p as usize).peekable();
    for (i, (patient, parts)) in patients.iter().zip(parts).enumerate() {
        if next.next_if_eq(&i).is_some() {
            differing.push(*patient);
            continue;
        }
        let Some(parts) = parts else {
            differing.push(*patient);
            continue;
        };
        for (collection, _) in &parts.collections {
            let held = ctx.backend.envelope_ids(patient, *collection)?.len() as u64;
            ctx.backend.note_reconciled(&peer, patient, *collection, held, &[])?;
        }
    }
    Ok(differing)
}

/// A reconciliation `peer` asked for ([`Request::Reconcile`]): run only when
/// this node holds a grant in force from `patient`, so the ask cannot make
/// it work for records it may not have; one round at a time per (peer,
/// patient), asks meanwhile folded into one more round.
async fn asked_reconcile<B: Backend>(ctx: &Ctx<B>, me: PeerId, peer: PeerId, patient: PatientId) {
    let granted = ctx.backend.consent(&patient).is_ok_and(|view| {
        let t = now();
        view.grants
            .iter()
            .any(|g| g.terms().grantee.peer_id() == me && g.in_force(t, view.is_revoked(g)))
    });
    if !granted {
        debug!(%peer, %patient, "asked to reconcile a patient without a grant in force here; ignored");
        return;
    }
    let key = (peer, patient);
    {
        let mut asked = ctx.asked_reconciles.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(again) = asked.get_mut(&key) {
            *again = true;
            return;
        }
        asked.insert(key, false);
    }
    loop {
        match reconcile_task(ctx, peer, patient).await {
            Ok(r) => debug!(%peer, fetched = r.received, "reconciled when asked"),
            Err(e) => debug!(%peer, cause = %e, "reconciling when asked failed"),
        }
        let mut asked = ctx.asked_reconciles.lock().unwrap_or_else(PoisonError::into_inner);
        match asked.get_mut(&key) {
            Some(again) if *again => *again = false,
            _ => {
                asked.remove(&key);
                return;
            }
        }
    }
}

/// Tells `grantee` that its grant from `patient` opened this node's
/// envelopes to it, once the grant reaches not-before (DESIGN §6: a filter
/// change triggers reconciliation). Without it a grantee that reconciled
/// before this node stored its grant — the grant travels here from another
/// holder — would wait for a later change that may never come.
fn ask_to_reconcile<B: Backend>(
    ctx: &Ctx<B>,
    grantee: PeerId,
    patient: PatientId,
    not_before: Timestamp,
    source: Option<PeerId>,
) {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let wait = not_before.saturating_sub(now());
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait.saturating_add(1000))).await;
        }
        if !ctx.may_dial(grantee, source).await.unwrap_or(false) {
            return;
        }
        if let Err(e) = ctx.dial_peer(grantee).await {
            debug!(peer = %grantee, cause = %e, "could not connect to ask for a reconciliation");
        }
        match ctx.request(grantee, Request::Reconcile { patient }).await {
            Ok(Response::Ack) => {}
            Ok(other) => debug!(peer = %grantee, answer = other.name(), "reconcile ask not acknowledged"),
            Err(e) => debug!(peer = %grantee, cause = %e, "reconcile ask failed"),
        }
    });
}

/// Reconciles one patient with `peer`: learns its consent items and the
/// envelope ids it may send, fetches the missing ones. Counted in
/// [`crate::Status`] (run, failed).
async fn reconcile_task<B: Backend>(ctx: &Ctx<B>, peer: PeerId, patient: PatientId) -> Result<SyncReport> {
    Metrics::add(&ctx.metrics.reconciliations, 1);
    let result = reconcile_once(ctx, peer, patient).await;
    if result.is_err() {
        Metrics::add(&ctx.metrics.reconciliations_failed, 1);
    }
    result
}

async fn reconcile_once<B: Backend>(ctx: &Ctx<B>, peer: PeerId, patient: PatientId) -> Result<SyncReport> {
    let mut report = SyncReport::default();
    // Digests of what is held, so collections already in step cost no ids.
    let mut digests = Vec::new();
    for collection in Collection::ALL {
        let ids = ctx.backend.envelope_ids(&patient, collection)?;
        if !ids.is_empty() {
            digests.push((collection, summary_digest(&ids)));
        }
    }
    let (consent, collections) = match ctx.request(peer, Request::Summary { patient, digests }).await? {
        Response::Summary { consent, collections } => (consent, collections),
        other => return Err(unexpected(peer, "summary", &other)),
    };
    report.pages += 1;
    report.received += consent.len() as u64;
    report.ingest.add(ctx.ingest(peer, consent).await?);
    let held = |collections: &HashSet<medmesh_crypto::Collection>| -> Result<HashSet<medmesh_crypto::EnvelopeId>> {
        let mut local = HashSet::new();
        for collection in collections {
            local.extend(ctx.backend.envelope_ids(&patient, *collection)?);
        }
        Ok(local)
    };
    let wanted: HashSet<medmesh_crypto::Collection> = collections.iter().map(|(c, _)| *c).collect();
    let mut local = held(&wanted)?;
    // What the peer listed and this node lacks, kept before fetching: a
    // crash or a cut connection from here on leaves the record known
    // incomplete until a later reconciliation closes the check.
    let note = |local: &HashSet<EnvelopeId>| -> Result<()> {
        for (collection, ids) in &collections {
            let lacking: Vec<EnvelopeId> = ids.iter().filter(|id| !local.contains(id)).copied().collect();
            ctx.backend
                .note_reconciled(&peer, &patient, *collection, ids.len() as u64, &lacking)?;
        }
        Ok(())
    };
    note(&local)?;
    if ctx.snapshot_min > 0 {
        let mut took_snapshot = false;
        for (collection, ids) in &collections {
            let missing = ids.iter().filter(|id| !local.contains(id)).count();
            if missing >= ctx.snapshot_min {
                match snapshot_task(ctx, peer, patient, *collection, TransferFor::Missing(ids)).await {
                    Ok((r, outcome)) => {
                        debug!(%peer, %collection, ?outcome, "snapshot transfer while reconciling");
                        report.add(r);
                        took_snapshot = true;
                    }
                    Err(e) => debug!(%peer, %collection, cause = %e, "snapshot transfer failed; fetching envelopes"),
                }
            }
        }
        if took_snapshot {
            local = held(&wanted)?;
        }
    }
    // In the order the peer listed them (each actor's changes by ascending
    // seq, `Backend::envelope_ids`), so that fetched changes follow their
    // predecessors instead of waiting for seq gaps.
    let mut missing = Vec::new();
    let mut listed = HashSet::new();
    for (_, ids) in &collections {
        missing.extend(
            ids.iter()
                .filter(|id| !local.contains(id) && listed.insert(**id))
                .copied(),
        );
    }
    for chunk in missing.chunks(MAX_FETCH_IDS) {
        // A pull running beside this reconciliation (a new grant starts both)
        // may have delivered part of the chunk meanwhile: ask only for the rest.
        let local = if chunk.len() < missing.len() {
            held(&wanted)?
        } else {
            local.clone()
        };
        let chunk: Vec<medmesh_crypto::EnvelopeId> = chunk.iter().filter(|id| !local.contains(id)).copied().collect();
        if chunk.is_empty() {
            continue;
        }
        let items = match ctx.request(peer, Request::Fetch { ids: chunk.clone() }).await? {
            Response::Fetched { items } => items,
            other => return Err(unexpected(peer, "fetch", &other)),
        };
        if items.len() > chunk.len() {
            return Err(Error::Wire {
                message: "fetched",
                reason: "more envelopes than asked for",
            });
        }
        report.pages += 1;
        report.received += items.len() as u64;
        report.ingest.add(ctx.ingest(peer, items).await?);
    }
    note(&held(&wanted)?)?;
    Ok(report)
}

struct PullSlot {
    again: bool,
    waiters: Vec<oneshot::Sender<Result<SyncReport>>>,
    report: SyncReport,
}

enum Outbound {
    Reply(oneshot::Sender<Result<Response>>),
    Nudge(PeerId),
    /// A consent item owed to the peer ([`Owed`]): settled by its answer.
    Forward(PeerId, ItemId),
}

pub(crate) struct Actor<B: Backend> {
    swarm: Swarm<Behaviour>,
    ctx: Ctx<B>,
    commands: mpsc::Receiver<Command>,
    stored: broadcast::Receiver<ItemStored>,
    config: Config,
    me: PeerId,
    static_peers: Vec<(PeerId, Multiaddr)>,
    outbound: HashMap<OutboundRequestId, Outbound>,
    /// Addresses learned for peers (hints, pushes, dials that worked).
    known_addrs: HashMap<PeerId, Vec<Multiaddr>>,
    pulls: HashMap<PeerId, PullSlot>,
    /// Peers whose pulls failed in a row (or whose connection broke), and
    /// how many times: each is pulled again after [`pull_retry_wait`].
    pull_retries: HashMap<PeerId, u32>,
    /// Peers with a nudge in flight, and the sequence number of a follow-up
    /// to send when it returns.
    nudging: HashMap<PeerId, Option<u64>>,
    dial_waiters: HashMap<PeerId, Vec<oneshot::Sender<Result<PeerId>>>>,
    /// Peers dialled at addresses the swarm knew while Kademlia is on: if
    /// those fail (the peer moved), the dial falls back to a lookup once.
    dials_before_lookup: HashSet<PeerId>,
    /// Why the last dial of each peer failed ([`dial_reason`]), until it
    /// connects: the reason a forward's debt keeps (request-response only
    /// says "Failed to dial the requested peer").
    dial_errors: HashMap<PeerId, String>,
    /// Kademlia lookups under way, and the peer each is for.
    lookups: HashMap<kad::QueryId, PeerId>,
    /// When this node last looked up its own id ([`KAD_JOIN_CLOSEST`]).
    kad_joined: Option<Instant>,
    /// Peers the handle asked to connect to: pulled on connecting even
    /// without a grant or cursor (see [`Actor::worth_pulling`]).
    asked: HashSet<PeerId>,
    /// Relays to hold a circuit reservation on (`Config::relays`).
    relays: Vec<(PeerId, Multiaddr)>,
    /// The `/p2p-circuit` listener of each relay (index into `relays`) that
    /// holds or is asking for a reservation.
    relay_listeners: HashMap<ListenerId, usize>,
    /// Established connections: whose, and over which address.
    connections: HashMap<ConnectionId, Connection>,
    last_synced: HashMap<PeerId, Instant>,
    /// Token buckets of peers that used some of theirs (full ones are
    /// pruned on every tick: absent means full).
    buckets: HashMap<PeerId, Bucket>,
    /// Inbound requests being served, per peer (only non-zero entries).
    in_flight: HashMap<PeerId, usize>,
    in_flight_total: usize,
    dial_budget: DialBudget,
}

use crate::addressed_peer as peer_of;

/// The error for an answer that is not the one asked for: a refusal, or
/// another kind of response.
fn unexpected(peer: PeerId, request: &'static str, answer: &Response) -> Error {
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

/// Fails with [`Error::AddressInUse`] when `addr` names a fixed TCP or UDP
/// port that something listens on already. libp2p-tcp sets SO_REUSEPORT on
/// its listeners, so a second node would bind the same port and the kernel
/// would split connections between the two: a probe bound without it fails
/// instead while the port is held. Port 0 and other transports pass.
fn refuse_taken_port(addr: &Multiaddr) -> Result<()> {
    let mut ip = None;
    let mut taken = None;
    for part in addr.iter() {
        match part {
            Protocol::Ip4(a) => ip = Some(std::net::IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(std::net::IpAddr::V6(a)),
            Protocol::Tcp(port) if port != 0 => {
                taken = ip.map(|ip| std::net::TcpListener::bind((ip, port)).err());
            }
            Protocol::Udp(port) if port != 0 => {
                taken = ip.map(|ip| std::net::UdpSocket::bind((ip, port)).err());
            }
            _ => {}
        }
    }
    match taken.flatten() {
        Some(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(Error::AddressInUse { addr: addr.clone() }),
        _ => Ok(()),
    }
}

/// Peers whose last dial error is kept (see `Actor::dial_errors`).
const MAX_DIAL_ERRORS: usize = 4096;

/// Why a dial failed, short: the transport's error per address tried
/// (e.g. "Connection refused"), or that no address is known. libp2p's own
/// text nests each cause behind an empty one and repeats the PeerId.
fn dial_reason(error: &libp2p::swarm::DialError) -> String {
    use libp2p::TransportError;
    use libp2p::swarm::DialError;
    match error {
        DialError::NoAddresses => "no known address".to_owned(),
        DialError::Transport(tried) => {
            let each: Vec<String> = tried
                .iter()
                .map(|(addr, e)| {
                    let addr: Multiaddr = addr.iter().filter(|p| !matches!(p, Protocol::P2p(_))).collect();
                    match e {
                        TransportError::MultiaddrNotSupported(_) => format!("{addr}: address not supported"),
                        TransportError::Other(io) => format!("{addr}: {io}"),
                    }
                })
                .collect();
            format!("could not connect: {}", each.join("; "))
        }
        other => other.to_string(),
    }
}

fn transport(e: impl std::fmt::Display) -> Error {
    Error::Transport(e.to_string())
}

fn echo_error(e: &Error, peer: PeerId) -> Error {
    Error::Request {
        peer,
        reason: e.to_string(),
    }
}

fn relay_config(limits: &RelayLimits) -> relay::Config {
    relay::Config {
        max_reservations: limits.max_reservations,
        max_reservations_per_peer: limits.max_reservations_per_peer,
        reservation_duration: limits.reservation_duration,
        max_circuits: limits.max_circuits,
        max_circuits_per_peer: limits.max_circuits_per_peer,
        max_circuit_duration: limits.max_circuit_duration,
        max_circuit_bytes: limits.max_circuit_bytes,
        // libp2p's rate limiters: per node and per IP address, a burst of 30
        // (60) reservations and circuits refilled at one per 2 minutes (1).
        ..relay::Config::default()
    }
}

/// What a relay server logs: who reserved and who talks to whom through it
/// (metadata the relay operator sees anyway; the traffic is Noise-encrypted
/// end to end).
#[allow(deprecated)] // libp2p 0.57 still emits the deprecated failure variants
fn on_relay_event(event: relay::Event) {
    match event {
        relay::Event::ReservationReqAccepted { src_peer_id, renewed } => {
            debug!(peer = %src_peer_id, renewed, "relay: reservation accepted");
        }
        relay::Event::ReservationReqDenied { src_peer_id, status } => {
            info!(peer = %src_peer_id, ?status, "relay: reservation denied");
        }
        relay::Event::CircuitReqAccepted {
            src_peer_id,
            dst_peer_id,
        } => debug!(src = %src_peer_id, dst = %dst_peer_id, "relay: circuit opened"),
        relay::Event::CircuitReqDenied {
            src_peer_id,
            dst_peer_id,
            status,
        } => info!(src = %src_peer_id, dst = %dst_peer_id, ?status, "relay: circuit denied"),
        relay::Event::CircuitClosed {
            src_peer_id,
            dst_peer_id,
            error,
        } => debug!(src = %src_peer_id, dst = %dst_peer_id, ?error, "relay: circuit closed"),
        other => debug!(event = ?other, "relay"),
    }
}

/// Builds the swarm, starts listening, and spawns the actor.
pub(crate) async fn spawn<B: Backend>(
    config: Config,
    identity: &SecretIdentity,
    backend: Arc<B>,
) -> Result<(mpsc::Sender<Command>, PeerId, Arc<Metrics>)> {
    let keypair = identity.to_libp2p()?;
    let me = keypair.public().to_peer_id();
    let mut static_peers = Vec::new();
    for addr in &config.peers {
        let peer = peer_of(addr).ok_or_else(|| Error::MissingPeerId(addr.clone()))?;
        static_peers.push((peer, addr.clone()));
    }
    let mut relays = Vec::new();
    for addr in &config.relays {
        let peer = peer_of(addr).ok_or_else(|| Error::MissingPeerId(addr.clone()))?;
        relays.push((peer, addr.clone()));
    }
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(config.max_connections))
        .with_max_established_per_peer(Some(config.max_connections_per_peer))
        .with_max_pending_incoming(Some(config.max_pending_connections))
        .with_max_pending_outgoing(Some(config.max_pending_connections));
    let rr_config = request_response::Config::default().with_request_timeout(config.request_timeout);
    let use_mdns = config.mdns;
    let use_kad = config.kademlia;
    let use_dcutr = config.dcutr;
    let relay_server = config.relay_server.then(|| relay_config(&config.relay_limits));
    let idle = config.idle_connection_timeout;
    // Configured external addresses are where others must reach this node
    // (a port forward, a proxy): announcing the listen addresses beside
    // them would have peers dial around it.
    let hide_listen_addrs = !config.external_addrs.is_empty();
    let mut swarm = SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(transport)?
        .with_quic()
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(transport)?
        .with_behaviour(
            |key, relay_client| -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
                let mdns = if use_mdns {
                    Some(mdns::tokio::Behaviour::new(
                        mdns::Config::default(),
                        key.public().to_peer_id(),
                    )?)
                } else {
                    None
                };
                let kad = use_kad.then(|| {
                    let id = key.public().to_peer_id();
                    let mut kad_config = kad::Config::new(KAD_PROTOCOL);
                    // The join lookup replaces libp2p's bootstrap, periodic
                    // ones included (see `Actor::cut_kad_bootstraps`).
                    kad_config.set_periodic_bootstrap_interval(None);
                    let mut kad = kad::Behaviour::with_config(id, kad::store::MemoryStore::new(id), kad_config);
                    // Practices answer lookups whatever libp2p guesses about
                    // their reachability: a LAN or loopback node has no
                    // confirmed external address, yet others can reach it.
                    kad.set_mode(Some(kad::Mode::Server));
                    kad
                });
                let id = key.public().to_peer_id();
                let relay = relay_server.map(|config| {
                    let mut relay = relay::Behaviour::new(id, config);
                    // A relay serves whether or not libp2p has confirmed an
                    // external address for it (it has none on a LAN or loopback).
                    relay.set_status(Some(relay::Status::Enable));
                    relay
                });
                Ok(Behaviour {
                    limits: connection_limits::Behaviour::new(limits),
                    identify: identify::Behaviour::new(
                        // Signed peer records: a practice's addresses, signed
                        // by its key, that peers keep and hand to patients
                        // (issue 16: a moved practice is found again).
                        identify::Config::new_with_signed_peer_record(IDENTIFY_PROTOCOL.into(), key)
                            .with_hide_listen_addrs(hide_listen_addrs)
                            // Connected peers hear of a new address at once.
                            .with_push_listen_addr_updates(true),
                    ),
                    ping: ping::Behaviour::default(),
                    mdns: Toggle::from(mdns),
                    kad: Toggle::from(kad),
                    relay_client,
                    relay: Toggle::from(relay),
                    dcutr: Toggle::from(use_dcutr.then(|| dcutr::Behaviour::new(id))),
                    sync: request_response::Behaviour::with_codec(
                        Codec,
                        [(PROTOCOL, ProtocolSupport::Full)],
                        rr_config,
                    ),
                })
            },
        )
        .map_err(transport)?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
        .build();

    let mut waiting = HashSet::new();
    for addr in &config.listen {
        refuse_taken_port(addr)?;
        waiting.insert(swarm.listen_on(addr.clone()).map_err(transport)?);
    }
    // Wait until every listener has an address, so `listen_addrs` is
    // meaningful as soon as `spawn` returns.
    tokio::time::timeout(LISTEN_SETUP_TIMEOUT, async {
        while !waiting.is_empty() {
            match swarm.select_next_some().await {
                SwarmEvent::NewListenAddr { listener_id, .. } => {
                    waiting.remove(&listener_id);
                }
                SwarmEvent::ListenerError { error, .. } => return Err(transport(error)),
                SwarmEvent::ListenerClosed { reason: Err(e), .. } => return Err(transport(e)),
                _ => {}
            }
        }
        Ok(())
    })
    .await
    .map_err(|_| Error::Transport("listeners did not start in time".into()))??;
    for addr in &config.external_addrs {
        swarm.add_external_address(addr.clone());
    }
    if config.relay_server && config.external_addrs.is_empty() {
        // Reservations hand out the relay's external addresses; without a
        // configured one, the addresses it listens on are the best guess.
        let listening: Vec<Multiaddr> = swarm.listeners().cloned().collect();
        for addr in listening {
            swarm.add_external_address(addr);
        }
    }

    for (peer, addr) in &static_peers {
        swarm.add_peer_address(*peer, addr.clone());
        if let Err(e) = swarm.dial(addr.clone()) {
            warn!(%peer, cause = %e, "dialing static peer failed");
        }
    }

    let (tx, commands) = mpsc::channel(COMMAND_CAPACITY);
    let metrics = Arc::new(Metrics::default());
    let dial_budget = DialBudget::new(&config.limits, Instant::now());
    let stored = backend.subscribe();
    // What a previous run stored was followed then (or is owed in the
    // outbox): only items stored from now on are waited for.
    let followed = Arc::new(AtomicU64::new(backend.last_seq()));
    let ctx = Ctx {
        backend,
        me,
        tx: tx.downgrade(),
        metrics: metrics.clone(),
        page_limit: config.page_limit.clamp(1, crate::wire::MAX_ITEMS_PER_MESSAGE as u32),
        limits: Arc::new(config.limits.clone()),
        parked: Arc::new(Mutex::new(HashMap::new())),
        snapshot_min: config.snapshot_min_envelopes,
        transfers: Arc::default(),
        asked_reconciles: Arc::default(),
        redelivering: Arc::default(),
        anti_entropy: Arc::default(),
        following: Arc::default(),
        followed,
    };
    let actor = Actor {
        swarm,
        ctx,
        commands,
        stored,
        config,
        me,
        static_peers,
        outbound: HashMap::new(),
        known_addrs: HashMap::new(),
        pulls: HashMap::new(),
        pull_retries: HashMap::new(),
        nudging: HashMap::new(),
        dial_waiters: HashMap::new(),
        dials_before_lookup: HashSet::new(),
        dial_errors: HashMap::new(),
        lookups: HashMap::new(),
        kad_joined: None,
        asked: HashSet::new(),
        relays,
        relay_listeners: HashMap::new(),
        connections: HashMap::new(),
        last_synced: HashMap::new(),
        buckets: HashMap::new(),
        in_flight: HashMap::new(),
        in_flight_total: 0,
        dial_budget,
    };
    tokio::spawn(actor.run().instrument(info_span!("sync actor", peer = %me)));
    Ok((tx, me, metrics))
}

impl<B: Backend> Actor<B> {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(self.config.pull_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick fires at once; connections pull on establishment anyway
        // The outbox is looked at every second (a scan of a small tree);
        // the first round, at once, takes over what a previous run owed.
        let mut redelivery = tokio::time::interval(REDELIVERY_TICK);
        redelivery.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut anti_entropy = tokio::time::interval(self.config.anti_entropy_interval);
        anti_entropy.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        anti_entropy.tick().await; // connections start their own round
        self.reserve_relays();
        self.learn_kept_addresses();
        if self.config.consent_flows {
            self.reach_holders();
        }
        let mut stored_open = true;
        let shutdown_reply = loop {
            tokio::select! {
                command = self.commands.recv() => match command {
                    None => break None,
                    Some(Command::Shutdown(reply)) => break Some(reply),
                    Some(command) => self.on_command(command),
                },
                event = self.swarm.select_next_some() => {
                    self.on_swarm_event(event);
                    self.cut_kad_bootstraps();
                }
                event = self.stored.recv(), if stored_open => match event {
                    Ok(event) => self.on_stored(event),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        warn!(missed = n, "missed item-stored events; nudging every connected peer");
                        // Their flows will not run: nothing to wait for.
                        self.ctx.followed.fetch_max(self.backend().last_seq(), Ordering::AcqRel);
                        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
                        for peer in peers {
                            self.nudge(peer, u64::MAX);
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => stored_open = false,
                },
                _ = tick.tick() => self.on_tick(),
                _ = redelivery.tick(), if self.config.consent_flows => self.redeliver(None),
                _ = anti_entropy.tick(), if self.config.consent_flows => {
                    let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
                    for peer in peers {
                        self.start_anti_entropy(peer);
                    }
                    self.reach_holders();
                }
            }
        };
        info!("sync actor stopping");
        self.close_connections().await;
        drop(self.swarm);
        if let Some(reply) = shutdown_reply {
            let _ = reply.send(());
        }
    }

    /// Closes every connection and lets the swarm send the closes. A swarm
    /// dropped without that leaves its peers holding the connections until
    /// their idle timeout — and a patient's next CLI session (same PeerId)
    /// then finds its node's per-peer connection limit taken by them.
    async fn close_connections(&mut self) {
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            while self.swarm.network_info().num_peers() > 0 {
                self.swarm.select_next_some().await;
            }
        })
        .await;
    }

    fn backend(&self) -> &B {
        &self.ctx.backend
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::ListenAddrs(reply) => {
                let me = self.me;
                // Listeners first (callers take the first as "the" address),
                // then external ones: configured, and relay circuits.
                let mut addrs: Vec<Multiaddr> = Vec::new();
                for a in self.swarm.listeners().chain(self.swarm.external_addresses()) {
                    let a = a.clone().with_p2p(me).unwrap_or_else(|a| a);
                    if !addrs.contains(&a) {
                        addrs.push(a);
                    }
                }
                let _ = reply.send(addrs);
            }
            Command::Dial { addr, reply } => {
                let Some(peer) = peer_of(&addr) else {
                    let _ = reply.send(Err(Error::MissingPeerId(addr)));
                    return;
                };
                self.asked.insert(peer);
                if self.swarm.is_connected(&peer) {
                    let _ = reply.send(Ok(peer));
                    return;
                }
                self.swarm.add_peer_address(peer, addr.clone());
                match self.swarm.dial(addr.clone()) {
                    Ok(()) => self.dial_waiters.entry(peer).or_default().push(reply),
                    Err(e) => {
                        let _ = reply.send(Err(Error::Dial {
                            addr,
                            reason: e.to_string(),
                        }));
                    }
                }
            }
            Command::ConnectedPeers(reply) => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::Connections(reply) => {
                let _ = reply.send(self.connections.values().cloned().collect());
            }
            Command::DialPeer { peer, reply } => self.dial_peer(peer, reply),
            Command::SyncNow { peer, reply } => self.start_pull(peer, Some(reply)),
            Command::Reconcile { peer, patient, reply } => {
                let ctx = self.ctx.clone();
                tokio::spawn(async move {
                    let _ = reply.send(reconcile_task(&ctx, peer, patient).await);
                });
            }
            Command::AntiEntropy { peer, reply } => {
                let ctx = self.ctx.clone();
                tokio::spawn(async move {
                    let _ = reply.send(anti_entropy(&ctx, peer).await);
                });
            }
            Command::Push {
                peer,
                items,
                addrs,
                reply,
            } => {
                let ctx = self.ctx.clone();
                let me = self.me;
                tokio::spawn(async move {
                    let _ = reply.send(push_task(&ctx, me, peer, items, addrs).await);
                });
            }
            Command::Outbox { patient, reply } => {
                let settling = self.settling(&patient);
                let backend = self.ctx.backend.clone();
                tokio::task::spawn_blocking(move || {
                    let _ = reply.send(serve::outbox_report(&*backend, &patient, settling));
                });
            }
            Command::Request { peer, request, reply } => {
                let id = self.swarm.behaviour_mut().sync.send_request(&peer, request);
                Metrics::add(&self.ctx.metrics.requests_sent, 1);
                self.outbound.insert(id, Outbound::Reply(reply));
            }
            Command::Status(reply) => {
                let m = &self.ctx.metrics;
                let now = Instant::now();
                let sync_lag = self
                    .swarm
                    .connected_peers()
                    .filter_map(|p| self.last_synced.get(p))
                    .map(|t| now.saturating_duration_since(*t))
                    .max();
                let _ = reply.send(Status {
                    peers: self.swarm.connected_peers().count(),
                    items_sent: m.items_sent.load(Ordering::Relaxed),
                    items_received: m.items_received.load(Ordering::Relaxed),
                    items_accepted: m.items_accepted.load(Ordering::Relaxed),
                    items_rejected: m.items_rejected.load(Ordering::Relaxed),
                    items_pending: m.items_pending.load(Ordering::Relaxed),
                    bytes_sent: m.bytes_sent.load(Ordering::Relaxed),
                    bytes_received: m.bytes_received.load(Ordering::Relaxed),
                    sync_lag,
                    refused_busy: m.refused_busy.load(Ordering::Relaxed),
                    items_pending_refused: m.items_pending_refused.load(Ordering::Relaxed),
                    dropped: m.dropped.load(Ordering::Relaxed),
                    requests_sent: m.requests_sent.load(Ordering::Relaxed),
                    requests_received: m.requests_received.load(Ordering::Relaxed),
                    reconciliations: m.reconciliations.load(Ordering::Relaxed),
                    reconciliations_failed: m.reconciliations_failed.load(Ordering::Relaxed),
                    items_unwanted: m.items_unwanted.load(Ordering::Relaxed),
                    dials_limited: m.dials_limited.load(Ordering::Relaxed),
                    outbox: self.backend().outbox().map_or(0, |o| o.len() as u64),
                });
            }
            Command::Shutdown(reply) => {
                // Handled in `run`; kept for exhaustiveness.
                let _ = reply.send(());
            }
            Command::Respond {
                peer,
                channel,
                response,
                served,
            } => {
                self.served_one(peer);
                if self.swarm.behaviour_mut().sync.send_response(channel, response).is_ok() {
                    self.ctx.metrics.sent(served);
                }
            }
            Command::PullDone { peer, result } => self.on_pull_done(peer, result),
            Command::RetryPull(peer) => self.start_pull(peer, None),
            Command::Pushed { peer } => self.start_pull(peer, None),
            Command::Forward { peer, id, item } => self.forward(peer, id, item),
            Command::Nudge { peer, seq } => self.nudge(peer, seq),
            Command::AddAddress { peer, addr } => self.note_addr(peer, addr),
            Command::KnownAddrs { peer, reply } => {
                let _ = reply.send(self.known_addrs.get(&peer).cloned().unwrap_or_default());
            }
            Command::MayDial { peer, source, reply } => {
                let free = self.swarm.is_connected(&peer) || self.static_peers.iter().any(|(p, _)| *p == peer);
                let allowed = free || self.dial_budget.take(&self.config.limits, source, Instant::now());
                if !allowed {
                    Metrics::add(&self.ctx.metrics.dials_limited, 1);
                    debug!(%peer, %source, "dial on behalf of a source over its dial budget; skipped");
                }
                let _ = reply.send(allowed);
            }
        }
    }

    fn start_pull(&mut self, peer: PeerId, waiter: Option<oneshot::Sender<Result<SyncReport>>>) {
        if peer == self.me {
            if let Some(w) = waiter {
                let _ = w.send(Ok(SyncReport::default()));
            }
            return;
        }
        if let Some(slot) = self.pulls.get_mut(&peer) {
            slot.again = true;
            slot.waiters.extend(waiter);
            return;
        }
        self.pulls.insert(
            peer,
            PullSlot {
                again: false,
                waiters: waiter.into_iter().collect(),
                report: SyncReport::default(),
            },
        );
        self.spawn_pull(peer);
    }

    fn spawn_pull(&self, peer: PeerId) {
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            let result = pull_task(&ctx, peer).await;
            let _ = ctx.send(Command::PullDone { peer, result }).await;
        });
    }

    fn on_pull_done(&mut self, peer: PeerId, result: Result<SyncReport>) {
        let Some(slot) = self.pulls.get_mut(&peer) else {
            return;
        };
        if let Ok(r) = &result {
            slot.report.add(*r);
            self.last_synced.insert(peer, Instant::now());
            if slot.again {
                slot.again = false;
                self.spawn_pull(peer);
                return;
            }
        }
        let Some(slot) = self.pulls.remove(&peer) else {
            return;
        };
        match result {
            Ok(_) => {
                self.pull_retries.remove(&peer);
                debug!(%peer, pages = slot.report.pages, received = slot.report.received, "pull done");
                for w in slot.waiters {
                    let _ = w.send(Ok(slot.report));
                }
            }
            Err(e) => {
                warn!(%peer, cause = %e, "pull failed");
                for w in slot.waiters {
                    let _ = w.send(Err(echo_error(&e, peer)));
                }
                self.retry_pull_later(peer);
            }
        }
    }

    /// Pulls `peer` again after a backoff ([`pull_retry_wait`]), dialing it
    /// if need be: a first sync cut off with its connection, or a nudge lost
    /// with one, is otherwise left until something else connects the two
    /// (the pull tick pulls connected peers only). Given up after
    /// [`PULL_RETRIES`] failures in a row; a success starts the count again.
    fn retry_pull_later(&mut self, peer: PeerId) {
        let tries = self.pull_retries.entry(peer).or_default();
        if *tries >= PULL_RETRIES {
            self.pull_retries.remove(&peer);
            warn!(%peer, "pulls failed {PULL_RETRIES} times in a row; left to the next connection");
            return;
        }
        let wait = pull_retry_wait(*tries, self.config.pull_interval);
        *tries += 1;
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let _ = ctx.send(Command::RetryPull(peer)).await;
        });
    }

    fn on_tick(&mut self) {
        let at = Instant::now();
        let limits = &self.config.limits;
        self.buckets.retain(|_, b| !b.is_full(rates::requests(limits), at));
        self.dial_budget.prune(limits, at);
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            if self.worth_pulling(&peer) {
                self.start_pull(peer, None);
            }
        }
        self.reserve_relays();
        let redial: Vec<Multiaddr> = self
            .static_peers
            .iter()
            .filter(|(p, _)| !self.swarm.is_connected(p))
            .map(|(_, a)| a.clone())
            .collect();
        for addr in redial {
            if let Err(e) = self.swarm.dial(addr) {
                debug!(cause = %e, "redialing static peer failed");
            }
        }
    }

    /// Whether to pull `peer` unasked, on connecting and on every pull
    /// tick: a static peer, a peer the handle asked to connect to, one this
    /// node pulled before (it holds a cursor) or one a grant held here
    /// names. A peer met only through a Kademlia lookup, mDNS or an inbound
    /// connection shares nothing with this node yet; it is pulled once it
    /// nudges or pushes. (Every connection pulling made Kademlia's lookups
    /// swamp a 100-node simulation: docs/decisions.md.)
    fn worth_pulling(&self, peer: &PeerId) -> bool {
        self.static_peers.iter().any(|(p, _)| p == peer)
            || self.asked.contains(peer)
            || !matches!(self.backend().cursor(peer), Ok(None))
            || self.backend().names_grantee(peer).unwrap_or(true)
    }

    /// Asks every configured relay without a reservation under way for one.
    fn reserve_relays(&mut self) {
        for (i, (relay, addr)) in self.relays.iter().enumerate() {
            if self.relay_listeners.values().any(|j| *j == i) {
                continue;
            }
            self.swarm.add_peer_address(*relay, addr.clone());
            match self.swarm.listen_on(addr.clone().with(Protocol::P2pCircuit)) {
                Ok(id) => {
                    debug!(%relay, "asking relay for a reservation");
                    self.relay_listeners.insert(id, i);
                }
                Err(e) => warn!(%relay, cause = %e, "cannot listen through relay"),
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => info!(%address, "listening"),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                // Connected: a failure of this dial no longer calls for a lookup.
                self.dials_before_lookup.remove(&peer_id);
                let relayed = endpoint.is_relayed();
                let addr = match &endpoint {
                    libp2p::core::ConnectedPoint::Dialer { address, .. } => address.clone(),
                    libp2p::core::ConnectedPoint::Listener { local_addr, .. } if relayed => local_addr.clone(),
                    libp2p::core::ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr.clone(),
                };
                debug!(peer = %peer_id, %addr, relayed, "connection established");
                self.dial_errors.remove(&peer_id);
                self.connections.insert(
                    connection_id,
                    Connection {
                        peer: peer_id,
                        addr,
                        relayed,
                    },
                );
                for w in self.dial_waiters.remove(&peer_id).unwrap_or_default() {
                    let _ = w.send(Ok(peer_id));
                }
                if let libp2p::core::ConnectedPoint::Dialer { address, .. } = &endpoint
                    && !relayed
                {
                    // An address that just worked: kept with what this node owes the peer.
                    self.remember_addr(peer_id, address.clone());
                }
                if num_established.get() == 1 {
                    self.last_synced.insert(peer_id, Instant::now());
                    if self.config.consent_flows {
                        // Back (or new): whatever it is owed goes now, and
                        // what either missed meanwhile is found.
                        self.redeliver(Some(peer_id));
                        self.start_anti_entropy(peer_id);
                    }
                    if self.worth_pulling(&peer_id) {
                        self.start_pull(peer_id, None);
                    }
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => {
                self.connections.remove(&connection_id);
                if num_established == 0 {
                    debug!(peer = %peer_id, "disconnected");
                    // A connection that broke (not closed, not idle) may
                    // have taken a nudge with it, or a pull's last page:
                    // a peer this node syncs with is pulled again soon
                    // (a pull under way retries when it fails).
                    let broke = matches!(cause, Some(libp2p::swarm::ConnectionError::IO(_)));
                    if broke && !self.pulls.contains_key(&peer_id) && self.worth_pulling(&peer_id) {
                        self.retry_pull_later(peer_id);
                    }
                    self.last_synced.remove(&peer_id);
                    self.nudging.remove(&peer_id);
                    self.asked.remove(&peer_id);
                }
            }
            SwarmEvent::ListenerClosed {
                listener_id, reason, ..
            } => {
                if let Some(i) = self.relay_listeners.remove(&listener_id) {
                    let relay = self.relays.get(i).map(|(p, _)| *p);
                    match reason {
                        Ok(()) => info!(?relay, "relay reservation ended; renewing on the next tick"),
                        Err(e) => warn!(?relay, cause = %e, "relay reservation failed; retrying on the next tick"),
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(event)) => match event {
                relay::client::Event::ReservationReqAccepted {
                    relay_peer_id, renewal, ..
                } => {
                    if !renewal {
                        info!(relay = %relay_peer_id, "relay reservation accepted; reachable through its circuit");
                    }
                }
                relay::client::Event::OutboundCircuitEstablished { relay_peer_id, .. } => {
                    debug!(relay = %relay_peer_id, "circuit through relay established");
                }
                relay::client::Event::InboundCircuitEstablished { src_peer_id, .. } => {
                    debug!(peer = %src_peer_id, "inbound circuit through our relay");
                }
            },
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event { remote_peer_id, result })) => match result {
                Ok(_) => info!(peer = %remote_peer_id, "relayed connection upgraded to a direct one"),
                Err(e) => debug!(peer = %remote_peer_id, cause = %e, "hole punching failed; staying relayed"),
            },
            SwarmEvent::Behaviour(BehaviourEvent::Relay(event)) => on_relay_event(event),
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } if !self.swarm.is_connected(&peer) => {
                let reason = dial_reason(&error);
                if self.dial_errors.len() < MAX_DIAL_ERRORS || self.dial_errors.contains_key(&peer) {
                    self.dial_errors.insert(peer, reason.clone());
                }
                // The addresses known may be stale (the peer came back on
                // another port): ask the network once before giving up.
                if self.dials_before_lookup.remove(&peer) && self.dial_waiters.contains_key(&peer) {
                    self.look_up(peer, "its known addresses failed");
                    return;
                }
                for w in self.dial_waiters.remove(&peer).unwrap_or_default() {
                    let _ = w.send(Err(Error::Request {
                        peer,
                        reason: reason.clone(),
                    }));
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                if let Some(signed) = info.signed_peer_record.clone() {
                    self.keep_address_record(peer_id, signed);
                }
                let speaks_kad = info.protocols.contains(&KAD_PROTOCOL);
                for addr in info.listen_addrs.into_iter().take(MAX_PUSH_ADDRS) {
                    if speaks_kad && let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() {
                        kad.add_address(&peer_id, addr.clone());
                    }
                    self.swarm.add_peer_address(peer_id, addr);
                }
                if speaks_kad {
                    self.join_kademlia();
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetClosestPeers(result),
                step,
                ..
            })) => self.on_lookup(id, result, step.last),
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    self.swarm.add_peer_address(peer, addr);
                    if !self.swarm.is_connected(&peer)
                        && let Err(e) = self.swarm.dial(peer)
                    {
                        debug!(%peer, cause = %e, "dialing mDNS peer failed");
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Sync(event)) => self.on_sync_event(event),
            _ => {}
        }
    }

    /// Looks up the peers closest to this node's own id (see
    /// [`KAD_JOIN_CLOSEST`]) unless it did so less than [`KAD_REJOIN`] ago:
    /// at start, as soon as it knows a Kademlia peer.
    fn join_kademlia(&mut self) {
        if self.kad_joined.is_some_and(|t| t.elapsed() < KAD_REJOIN) {
            return;
        }
        let me = self.me;
        if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() {
            debug!("joining Kademlia: looking up the peers closest to this node");
            kad.get_n_closest_peers(me, KAD_JOIN_CLOSEST);
            self.kad_joined = Some(Instant::now());
        }
    }

    /// Ends every bootstrap libp2p-kad started on its own. libp2p-kad 0.49
    /// starts one 500 ms after any peer joins a routing table of fewer than
    /// 20 entries and offers no way to turn that off
    /// (`Config::set_automatic_bootstrap_throttle` is `pub(crate)`); each
    /// asks for the 20 closest peers of this node's id and of one id in
    /// every bucket farther than its nearest neighbour. Finished at the
    /// first swarm event after it starts, one costs the few requests of its
    /// first step instead of a request to nearly every node of a
    /// 100-node network (3 requests per bootstrap on average in the 100-node
    /// simulation). [`Actor::join_kademlia`] does the joining.
    fn cut_kad_bootstraps(&mut self) {
        if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() {
            for mut query in kad.iter_queries_mut() {
                if matches!(query.info(), kad::QueryInfo::Bootstrap { .. }) {
                    query.finish();
                }
            }
        }
    }

    /// Connects to `peer`, answering `reply` once connected (or failed):
    /// at once if connected; by dialing the addresses the swarm knows; else
    /// by asking the Kademlia network who has it.
    fn dial_peer(&mut self, peer: PeerId, reply: oneshot::Sender<Result<PeerId>>) {
        if self.swarm.is_connected(&peer) {
            let _ = reply.send(Ok(peer));
            return;
        }
        self.asked.insert(peer);
        let waiting = self.dial_waiters.contains_key(&peer);
        self.dial_waiters.entry(peer).or_default().push(reply);
        if waiting {
            return;
        }
        if self.swarm.dial(peer).is_ok() {
            if self.swarm.behaviour().kad.is_enabled() {
                self.dials_before_lookup.insert(peer);
            }
            return;
        }
        self.look_up(peer, "no known address");
    }

    /// Asks the Kademlia network for `peer`'s addresses (the dial waiters
    /// are answered when the lookup ends), or fails the waiters when
    /// Kademlia is off.
    fn look_up(&mut self, peer: PeerId, why: &str) {
        match self.swarm.behaviour_mut().kad.as_mut() {
            Some(kad) => {
                debug!(%peer, why, "looking the peer up");
                let query = kad.get_closest_peers(peer);
                self.lookups.insert(query, peer);
            }
            None => self.fail_dial(peer, &format!("{why} and Kademlia is off")),
        }
    }

    /// Keeps a peer's signed address record (identify verified it is
    /// `peer`'s: libp2p-identify drops a record another key signed).
    fn keep_address_record(&mut self, peer: PeerId, signed: libp2p::core::SignedEnvelope) {
        let Some(record) = crate::AddressRecord::of_envelope(signed) else {
            return;
        };
        // A record without addresses (sent before the peer's listeners were
        // up) tells nothing, and must not replace one that does.
        if record.peer != peer || record.addrs.is_empty() {
            return;
        }
        match self.backend().note_address_record(&peer, record.seq, &record.signed) {
            Ok(true) => debug!(%peer, seq = record.seq, "kept a newer signed address record"),
            Ok(false) => {}
            Err(e) => debug!(%peer, cause = %e, "could not keep an address record"),
        }
    }

    /// Adds the addresses of every kept signed address record to the swarm,
    /// at start: a practice that moved while this node was down is dialled
    /// where it last said it is, not where a grant's hint or a debt's
    /// address put it.
    fn learn_kept_addresses(&mut self) {
        let records = match self.backend().address_records(None) {
            Ok(r) => r,
            Err(e) => {
                debug!(cause = %e, "could not read the kept address records");
                return;
            }
        };
        for bytes in records {
            let Some(record) = crate::AddressRecord::verify(&bytes) else {
                continue;
            };
            for addr in record.addrs.into_iter().take(MAX_PUSH_ADDRS) {
                self.note_addr(record.peer, addr);
            }
        }
    }

    /// Dials the practices that hold the records this node is granted (its
    /// grants' address hints) when not connected to them, at most
    /// [`HOLDER_DIALS`] per round: at start and every anti-entropy interval.
    /// A node back from a restart would otherwise wait until one of them
    /// dials it, and anti-entropy, which runs on connection, would not find
    /// what a sync cut short left missing (nor close its completeness check).
    fn reach_holders(&mut self) {
        let hints = match self.backend().holder_addresses() {
            Ok(h) => h,
            Err(e) => {
                debug!(cause = %e, "could not list the holders to reach");
                return;
            }
        };
        let me = *self.swarm.local_peer_id();
        let mut dialed = HashSet::new();
        for hint in hints {
            let Ok(addr) = hint.parse::<Multiaddr>() else { continue };
            let Some(peer) = peer_of(&addr) else { continue };
            if peer == me || self.swarm.is_connected(&peer) {
                continue;
            }
            self.note_addr(peer, addr);
            if dialed.len() < HOLDER_DIALS
                && dialed.insert(peer)
                && let Err(e) = self.swarm.dial(peer)
            {
                debug!(%peer, cause = %e, "could not dial a holder");
            }
        }
    }

    fn fail_dial(&mut self, peer: PeerId, reason: &str) {
        for w in self.dial_waiters.remove(&peer).unwrap_or_default() {
            let _ = w.send(Err(Error::Request {
                peer,
                reason: reason.to_owned(),
            }));
        }
    }

    /// A Kademlia lookup progressed: dial the peer once someone named its
    /// addresses; give up when the lookup ends without them.
    fn on_lookup(
        &mut self,
        id: kad::QueryId,
        result: std::result::Result<kad::GetClosestPeersOk, kad::GetClosestPeersError>,
        last: bool,
    ) {
        let Some(&peer) = self.lookups.get(&id) else {
            return;
        };
        let found = match &result {
            Ok(ok) => ok.peers.iter().find(|p| p.peer_id == peer).map(|p| p.addrs.clone()),
            Err(kad::GetClosestPeersError::Timeout { peers, .. }) => {
                peers.iter().find(|p| p.peer_id == peer).map(|p| p.addrs.clone())
            }
        };
        if let Some(addrs) = found.filter(|a| !a.is_empty()) {
            self.lookups.remove(&id);
            for addr in addrs.into_iter().take(MAX_PUSH_ADDRS) {
                self.swarm.add_peer_address(peer, addr);
            }
            if self.swarm.is_connected(&peer) {
                for w in self.dial_waiters.remove(&peer).unwrap_or_default() {
                    let _ = w.send(Ok(peer));
                }
            } else if let Err(e) = self.swarm.dial(peer) {
                self.fail_dial(peer, &format!("dialing found addresses failed: {e}"));
            }
        } else if last {
            self.lookups.remove(&id);
            if self.swarm.is_connected(&peer) {
                for w in self.dial_waiters.remove(&peer).unwrap_or_default() {
                    let _ = w.send(Ok(peer));
                }
            } else {
                self.fail_dial(peer, "no peer knows an address for it");
            }
        }
    }

    fn on_sync_event(&mut self, event: request_response::Event<Request, Response>) {
        use request_response::{Event, Message};
        match event {
            Event::Message {
                peer,
                message: Message::Request { request, channel, .. },
                ..
            } => self.on_request(peer, request, channel),
            Event::Message {
                peer,
                message: Message::Response { request_id, response },
                ..
            } => match self.outbound.remove(&request_id) {
                Some(Outbound::Reply(reply)) => {
                    let _ = reply.send(Ok(response));
                }
                Some(Outbound::Nudge(p)) => self.nudge_done(p),
                Some(Outbound::Forward(p, item)) => {
                    debug!(peer = %p, answer = response.name(), "push delivered");
                    let outcome = match response {
                        Response::Pushed { .. } => Ok(()),
                        other => Err(format!("answered {}", other.name())),
                    };
                    self.settle_forward(p, item, outcome);
                }
                None => debug!(%peer, "response to an unknown request"),
            },
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => match self.outbound.remove(&request_id) {
                Some(Outbound::Reply(reply)) => {
                    let err = match error {
                        request_response::OutboundFailure::ConnectionClosed
                        | request_response::OutboundFailure::Io(_) => Error::ConnectionLost { peer },
                        other => Error::Request {
                            peer,
                            reason: other.to_string(),
                        },
                    };
                    let _ = reply.send(Err(err));
                }
                Some(Outbound::Nudge(p)) => {
                    self.nudging.remove(&p);
                }
                Some(Outbound::Forward(p, item)) => {
                    warn!(peer = %p, cause = %error, "push failed; kept in the outbox");
                    let reason = match error {
                        request_response::OutboundFailure::DialFailure => self.dial_errors.get(&p).cloned(),
                        _ => None,
                    };
                    self.settle_forward(p, item, Err(reason.unwrap_or_else(|| error.to_string())));
                }
                None => {}
            },
            Event::InboundFailure { peer, error, .. } => {
                // Oversize or malformed frames land here: nothing was decoded,
                // nothing is answered, the connection lives on.
                warn!(%peer, cause = %error, "inbound request failed");
            }
            Event::ResponseSent { .. } => {}
        }
    }

    fn on_request(&mut self, peer: PeerId, request: Request, channel: ResponseChannel<Response>) {
        Metrics::add(&self.ctx.metrics.requests_received, 1);
        let Ok(requester) = Requester::from_peer_id(&peer) else {
            let _ = self
                .swarm
                .behaviour_mut()
                .sync
                .send_response(channel, Response::Refused(RefusalCode::BadIdentity));
            return;
        };
        debug!(%peer, request = request.name(), "request");
        if !self.admit(peer, &request) {
            Metrics::add(&self.ctx.metrics.refused_busy, 1);
            debug!(%peer, request = request.name(), "over a flood limit; refused busy");
            let _ = self
                .swarm
                .behaviour_mut()
                .sync
                .send_response(channel, Response::Refused(RefusalCode::Busy));
            return;
        }
        match request {
            Request::Nudge { instance, seq } => {
                let _ = self.swarm.behaviour_mut().sync.send_response(channel, Response::Ack);
                let behind = match self.backend().cursor(&peer) {
                    Ok(Some(c)) => c.instance != instance || c.seq < seq,
                    _ => true,
                };
                if behind {
                    self.start_pull(peer, None);
                }
            }
            Request::Reconcile { patient } => {
                let _ = self.swarm.behaviour_mut().sync.send_response(channel, Response::Ack);
                let ctx = self.ctx.clone();
                let me = self.me;
                tokio::spawn(async move { asked_reconcile(&ctx, me, peer, patient).await });
            }
            Request::Pull {
                cursor,
                limit,
                snapshots,
            } => {
                self.spawn_serve(peer, channel, move |b| async move {
                    serve::pull(&*b, requester, cursor, limit, snapshots.as_deref(), now()).await
                });
            }
            Request::Snapshot { patient, collection } => {
                self.spawn_serve(peer, channel, move |b| async move {
                    serve::snapshot(&*b, requester, patient, collection, now()).await
                });
            }
            Request::Summary { patient, digests } => {
                self.spawn_serve(peer, channel, move |b| async move {
                    serve::summary(&*b, requester, patient, &digests, now()).await
                });
            }
            Request::Fetch { ids } => {
                self.spawn_serve(peer, channel, move |b| async move {
                    serve::fetch(&*b, requester, &ids, now()).await
                });
            }
            Request::Digests { patients } => match PracticeId::from_peer_id(&self.me) {
                Ok(me) => self.spawn_serve(peer, channel, move |b| async move {
                    serve::digests(&*b, requester, me, &patients, now()).await
                }),
                Err(_) => {
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .sync
                        .send_response(channel, Response::Refused(RefusalCode::Internal));
                }
            },
            Request::Audit { patient, after, limit } => {
                self.spawn_serve(peer, channel, move |b| async move {
                    serve::audit(&*b, requester, patient, after, limit).await
                });
            }
            Request::Checkpoint { patient, anchor } => {
                self.spawn_serve(peer, channel, move |b| async move {
                    serve::checkpoint(&*b, requester, patient, anchor).await
                });
            }
            Request::Outbox { patient } => {
                let settling = self.settling(&patient);
                self.spawn_serve(peer, channel, move |b| async move {
                    serve::outbox(&*b, requester, patient, settling)
                });
            }
            Request::Practices { patient } => {
                self.spawn_serve(peer, channel, move |b| async move {
                    serve::practices(&*b, requester, patient)
                });
            }
            Request::Push { items, addrs } => {
                // Before ingesting: the consent flows that the stored items
                // trigger may need to dial these addresses.
                for (p, a) in adoptable_addrs(self.backend(), self.me, &requester, &items, addrs) {
                    self.note_addr(p, a);
                }
                let ctx = self.ctx.clone();
                tokio::spawn(async move {
                    let response = match ctx.ingest(peer, items).await {
                        Ok(r) if r.refused > 0 => {
                            Metrics::add(&ctx.metrics.refused_busy, 1);
                            Response::Refused(RefusalCode::Busy)
                        }
                        Ok(r) => Response::Pushed {
                            accepted: r.accepted,
                            duplicates: r.duplicates,
                            pending: r.pending,
                            rejected: r.rejected,
                        },
                        Err(e) => {
                            warn!(%peer, cause = %e, "ingesting a push failed");
                            Response::Refused(RefusalCode::Internal)
                        }
                    };
                    let served = Served::default();
                    let _ = ctx
                        .send(Command::Respond {
                            peer,
                            channel,
                            response,
                            served,
                        })
                        .await;
                    let _ = ctx.send(Command::Pushed { peer }).await;
                });
            }
        }
    }

    /// Flood limits on one inbound request: a token from the peer's bucket,
    /// and, for requests served in a task, room under the in-flight caps
    /// (taken here, given back by [`Self::served_one`]).
    fn admit(&mut self, peer: PeerId, request: &Request) -> bool {
        let limits = &self.config.limits;
        let at = Instant::now();
        let rate = rates::requests(limits);
        let bucket = self.buckets.entry(peer).or_insert_with(|| Bucket::full(rate, at));
        if !bucket.take(rate, at) {
            return false;
        }
        // Answered at once with an ack: no serving slot.
        if matches!(request, Request::Nudge { .. } | Request::Reconcile { .. }) {
            return true;
        }
        let mine = self.in_flight.get(&peer).copied().unwrap_or(0);
        if mine >= limits.max_in_flight_per_peer || self.in_flight_total >= limits.max_in_flight {
            return false;
        }
        *self.in_flight.entry(peer).or_default() += 1;
        self.in_flight_total += 1;
        true
    }

    /// One served request of `peer` is answered (or its task gave up).
    fn served_one(&mut self, peer: PeerId) {
        if let Some(n) = self.in_flight.get_mut(&peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.in_flight.remove(&peer);
            }
            self.in_flight_total = self.in_flight_total.saturating_sub(1);
        }
    }

    fn spawn_serve<F, Fut>(&self, peer: PeerId, channel: ResponseChannel<Response>, f: F)
    where
        F: FnOnce(Arc<B>) -> Fut + Send + 'static,
        Fut: Future<Output = (Response, Served)> + Send + 'static,
    {
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            let (response, served) = f(ctx.backend.clone()).await;
            let _ = ctx
                .send(Command::Respond {
                    peer,
                    channel,
                    response,
                    served,
                })
                .await;
        });
    }

    /// Tells `peer` that our log reached `seq`; at most one nudge per peer
    /// is in flight, later ones are folded into one follow-up.
    fn nudge(&mut self, peer: PeerId, seq: u64) {
        if peer == self.me {
            return;
        }
        if let Some(again) = self.nudging.get_mut(&peer) {
            *again = Some(again.map_or(seq, |s| s.max(seq)));
            return;
        }
        let instance = self.backend().instance_id();
        let id = self
            .swarm
            .behaviour_mut()
            .sync
            .send_request(&peer, Request::Nudge { instance, seq });
        Metrics::add(&self.ctx.metrics.requests_sent, 1);
        self.nudging.insert(peer, None);
        self.outbound.insert(id, Outbound::Nudge(peer));
    }

    fn nudge_done(&mut self, peer: PeerId) {
        if let Some(Some(seq)) = self.nudging.remove(&peer) {
            self.nudge(peer, seq);
        }
    }

    /// Hands a stored item to the consent-flow task (which needs the store's
    /// async API) with a snapshot of the connected peers.
    fn on_stored(&mut self, event: ItemStored) {
        self.ctx.followed.fetch_max(event.seq, Ordering::AcqRel);
        if !self.config.consent_flows {
            return;
        }
        let connected: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        let ctx = self.ctx.clone();
        let me = self.me;
        let following = Following::start(&self.ctx.following, event.meta.patient);
        tokio::spawn(async move {
            let _following = following;
            if let Err(e) = consent_flow(&ctx, me, connected, event).await {
                warn!(cause = %e, "consent flow failed");
            }
        });
    }

    /// Whether an outbox report on `patient` made now may miss debts:
    /// stored items not yet handed to the consent flows, or flows of the
    /// patient under way.
    fn settling(&self, patient: &PatientId) -> bool {
        if !self.config.consent_flows {
            return false;
        }
        self.backend().last_seq() > self.ctx.followed.load(Ordering::Acquire)
            || self
                .ctx
                .following
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains_key(patient)
    }

    fn forward(&mut self, peer: PeerId, item_id: ItemId, item: Item) {
        if self.outbound.len() >= self.config.limits.max_outbound {
            Metrics::add(&self.ctx.metrics.dropped, 1);
            warn!(%peer, outbound = self.outbound.len(), "outbound requests at their cap; forward left to redelivery");
            return;
        }
        let request = Request::Push {
            items: vec![item],
            addrs: Vec::new(),
        };
        let id = self.swarm.behaviour_mut().sync.send_request(&peer, request);
        Metrics::add(&self.ctx.metrics.requests_sent, 1);
        self.outbound.insert(id, Outbound::Forward(peer, item_id));
    }

    /// Adds an address for `peer` to the swarm and to what this node knows.
    fn note_addr(&mut self, peer: PeerId, addr: Multiaddr) {
        self.remember_addr(peer, addr.clone());
        self.swarm.add_peer_address(peer, addr);
    }

    /// Remembers an address of `peer` (the newest few per peer, for a
    /// bounded number of peers).
    fn remember_addr(&mut self, peer: PeerId, addr: Multiaddr) {
        const PER_PEER: usize = 4;
        const PEERS: usize = 4096;
        if self.known_addrs.len() >= PEERS && !self.known_addrs.contains_key(&peer) {
            return;
        }
        let addrs = self.known_addrs.entry(peer).or_default();
        addrs.retain(|a| *a != addr);
        addrs.insert(0, addr);
        addrs.truncate(PER_PEER);
    }

    /// A forward's outcome: the debt is settled, or its next try scheduled.
    fn settle_forward(&self, peer: PeerId, item: ItemId, outcome: std::result::Result<(), String>) {
        let ctx = self.ctx.clone();
        let max_backoff = self.config.redelivery_max_backoff;
        tokio::task::spawn_blocking(move || {
            let result = match outcome {
                Ok(()) => ctx.backend.remove_outbox(&[(peer, item)]),
                Err(error) => reschedule(&ctx, &[(peer, item)], &error, max_backoff),
            };
            if let Err(e) = result {
                warn!(%peer, cause = %e, "updating the outbox failed");
            }
        });
    }

    /// One anti-entropy round with `peer`, unless one runs already or the
    /// last ended less than [`ANTI_ENTROPY_MIN_GAP`] ago.
    fn start_anti_entropy(&self, peer: PeerId) {
        {
            let mut rounds = self.ctx.anti_entropy.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            rounds.retain(|_, last| last.is_none_or(|t| now.saturating_duration_since(t) < ANTI_ENTROPY_MIN_GAP));
            if rounds.contains_key(&peer) {
                return;
            }
            rounds.insert(peer, None);
        }
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            let finished = match anti_entropy(&ctx, peer).await {
                Ok(r) => {
                    if r.ingest.accepted > 0 {
                        info!(%peer, accepted = r.ingest.accepted, "anti-entropy repaired a gap");
                    }
                    // A round with no patient in common (the connection came
                    // before the grant) compared nothing either.
                    r.pages > 0
                }
                Err(e) => {
                    debug!(%peer, cause = %e, "anti-entropy round stopped");
                    false
                }
            };
            let mut rounds = ctx.anti_entropy.lock().unwrap_or_else(PoisonError::into_inner);
            if finished {
                rounds.insert(peer, Some(Instant::now()));
            } else {
                // A round cut short (the connection broke) or empty compared
                // nothing: the next connection runs one at once. A cut round
                // costs at most one Summary per connection.
                rounds.remove(&peer);
            }
        });
    }

    /// Delivers what the outbox owes: the debts due now, or every debt of
    /// `peer` (it has just connected). One round at a time for the tick.
    fn redeliver(&self, peer: Option<PeerId>) {
        if peer.is_none() && self.ctx.redelivering.swap(true, Ordering::AcqRel) {
            return;
        }
        let ctx = self.ctx.clone();
        let max_backoff = self.config.redelivery_max_backoff;
        tokio::spawn(async move {
            if let Err(e) = redeliver(&ctx, peer, max_backoff).await {
                warn!(cause = %e, "redelivering the outbox failed");
            }
            if peer.is_none() {
                ctx.redelivering.store(false, Ordering::Release);
            }
        });
    }
}

async fn item_at<B: Backend>(ctx: &Ctx<B>, seq: u64) -> Result<Option<Item>> {
    let mut items = ctx.backend.items_after(seq.saturating_sub(1), 1).await?;
    Ok(match items.pop() {
        Some(s) if s.seq == seq => Some(s.item),
        _ => None,
    })
}

/// Sends `item` to `peer` if — and only if — the consent filter lets it go
/// there; audits it first.
async fn push_filtered<B: Backend>(
    ctx: &Ctx<B>,
    view: &ConsentView,
    peer: PeerId,
    item: &Item,
    event: &ItemStored,
) -> Result<()> {
    let meta = &event.meta;
    let requester = Requester::from_peer_id(&peer)?;
    let decision = may_disclose(meta, &requester, view, now());
    if !decision.allowed() {
        debug!(%peer, item = %meta.id, ?decision, "not forwarding");
        return Ok(());
    }
    ctx.backend
        .record_disclosure(&DisclosureRecord {
            peer,
            patient: meta.patient,
            grant: decision.grant(),
            items: vec![meta.id],
        })
        .await?;
    // Owed first, whether or not it goes now: a contact the dial budget
    // skips is tried again by redelivery (at its own bounded rate).
    let addrs = ctx.known_addrs(peer).await?;
    owe(ctx, peer, meta, addrs)?;
    if !ctx.may_dial(peer, event.from).await? {
        return Ok(());
    }
    ctx.metrics.sent(Served {
        items: 1,
        bytes: item.bytes.len() as u64,
    });
    ctx.send(Command::Forward {
        peer,
        id: meta.id,
        item: item.clone(),
    })
    .await
}

/// Pulls tried again after failing in a row before the node waits for the
/// next connection ([`Actor::retry_pull_later`]).
const PULL_RETRIES: u32 = 6;

/// The wait before the pull retry that follows `tries` failures: 1 s,
/// doubling, at most the pull interval.
fn pull_retry_wait(tries: u32, pull_interval: Duration) -> Duration {
    Duration::from_secs(1u64 << tries.min(16)).min(pull_interval)
}

/// How often the outbox is looked at for debts due.
const REDELIVERY_TICK: Duration = Duration::from_secs(1);

/// First try of a redelivery after a failure, doubled per failure up to
/// `Config::redelivery_max_backoff`.
const REDELIVERY_FIRST_BACKOFF: Duration = Duration::from_secs(2);
/// A debt older than this is given up (the peer is gone for good); the
/// patient's next grant or revocation, pulls and reconciliation remain.
const OUTBOX_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Most debts kept; beyond, new ones are not recorded (forwarded once, as
/// before the outbox) and counted as dropped.
const OUTBOX_MAX: usize = 65_536;
/// Most debts kept for one patient: a real patient's grants name a handful
/// of practices; a self-made one's must not fill the outbox.
const OUTBOX_MAX_PER_PATIENT: usize = 256;
/// Peers not connected that one redelivery round (each second) dials: a
/// debt names whatever PeerId a patient's grant names, so redelivery must
/// not make the node dial on request at any rate (the ones left wait for
/// the next round; fewest failed tries go first).
const REDELIVERY_DIALS_PER_ROUND: usize = 4;

/// Records that `meta`'s item is owed to `peer` until it answers a push of
/// it, durably, before the first try.
fn owe<B: Backend>(ctx: &Ctx<B>, peer: PeerId, meta: &ItemMeta, addrs: Vec<Multiaddr>) -> Result<()> {
    let owed = ctx.backend.outbox()?;
    if owed.iter().any(|o| o.peer == peer && o.item == meta.id) {
        return Ok(());
    }
    if owed.len() >= OUTBOX_MAX || owed.iter().filter(|o| o.patient == meta.patient).count() >= OUTBOX_MAX_PER_PATIENT {
        Metrics::add(&ctx.metrics.dropped, 1);
        warn!(%peer, "outbox full; this item is forwarded once, not kept for redelivery");
        return Ok(());
    }
    let t = now();
    ctx.backend.put_outbox(&[Owed {
        peer,
        item: meta.id,
        patient: meta.patient,
        since: t,
        attempts: 0,
        next_at: t.saturating_add(millis(REDELIVERY_FIRST_BACKOFF)),
        last_error: String::new(),
        addrs,
    }])
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Counts a failed try of these debts and schedules the next one.
fn reschedule<B: Backend>(ctx: &Ctx<B>, debts: &[(PeerId, ItemId)], error: &str, max_backoff: Duration) -> Result<()> {
    let t = now();
    let updated: Vec<Owed> = ctx
        .backend
        .outbox()?
        .into_iter()
        .filter(|o| debts.contains(&(o.peer, o.item)))
        .map(|mut o| {
            o.attempts = o.attempts.saturating_add(1);
            let wait = REDELIVERY_FIRST_BACKOFF
                .saturating_mul(
                    1u32.checked_shl(o.attempts.saturating_sub(1).min(20))
                        .unwrap_or(u32::MAX),
                )
                .min(max_backoff);
            o.next_at = t.saturating_add(millis(wait));
            o.last_error = error.chars().take(200).collect();
            o
        })
        .collect();
    ctx.backend.put_outbox(&updated)
}

/// One redelivery round: every debt due (or every debt of `only`), grouped
/// by peer, each peer's sent in one push after the consent filter decides
/// again (what it would not send now is given up, as are debts older than
/// [`OUTBOX_MAX_AGE`]). A push answered settles what it carried.
async fn redeliver<B: Backend>(ctx: &Ctx<B>, only: Option<PeerId>, max_backoff: Duration) -> Result<()> {
    let t = now();
    let mut due: BTreeMap<PeerId, Vec<Owed>> = BTreeMap::new();
    let mut given_up = Vec::new();
    for o in ctx.backend.outbox()? {
        if t.saturating_sub(o.since) > millis(OUTBOX_MAX_AGE) {
            warn!(peer = %o.peer, attempts = o.attempts, "an item owed for 30 days is given up");
            given_up.push((o.peer, o.item));
        } else if only.map_or(o.next_at <= t, |p| p == o.peer) {
            due.entry(o.peer).or_default().push(o);
        }
    }
    let connected: HashSet<PeerId> = ctx.connected_peers().await?.into_iter().collect();
    let mut due: Vec<(PeerId, Vec<Owed>)> = due.into_iter().collect();
    due.sort_by_key(|(peer, debts)| {
        (
            !connected.contains(peer),
            debts.iter().map(|o| o.attempts).min().unwrap_or(0),
        )
    });
    let mut dials = 0;
    for (peer, debts) in due {
        if !connected.contains(&peer) {
            if dials >= REDELIVERY_DIALS_PER_ROUND {
                continue;
            }
            dials += 1;
        }
        let Ok(requester) = Requester::from_peer_id(&peer) else {
            given_up.extend(debts.iter().map(|o| (o.peer, o.item)));
            continue;
        };
        let mut items = Vec::new();
        let mut carried = Vec::new();
        for o in debts.iter().take(MAX_ITEMS_PER_MESSAGE) {
            let Some(stored) = ctx.backend.item(&o.item).await? else {
                given_up.push((peer, o.item));
                continue;
            };
            let view = ctx.backend.consent(&stored.meta.patient)?;
            if may_disclose(&stored.meta, &requester, &view, t).allowed() {
                carried.push((peer, o.item));
                items.push(stored.item);
            } else {
                given_up.push((peer, o.item));
            }
        }
        if items.is_empty() {
            continue;
        }
        // The addresses known when the debt arose (a restart forgets the
        // swarm's): the peer may be back where it was.
        let mut addrs: Vec<&Multiaddr> = debts.iter().flat_map(|o| &o.addrs).collect();
        addrs.sort();
        addrs.dedup();
        for addr in addrs {
            ctx.send(Command::AddAddress {
                peer,
                addr: addr.clone(),
            })
            .await?;
        }
        // Why the dial failed says more than the push failing after it.
        let dial_failed = match ctx.dial_peer(peer).await {
            Err(Error::Request { reason, .. }) => Some(reason),
            Err(e) => Some(e.to_string()),
            Ok(_) => None,
        };
        if let Some(cause) = &dial_failed {
            debug!(%peer, %cause, "could not connect to redeliver");
        }
        let outcome = match ctx
            .request(
                peer,
                Request::Push {
                    items,
                    addrs: Vec::new(),
                },
            )
            .await
        {
            Ok(Response::Pushed { .. }) => Ok(()),
            Ok(other) => Err(format!("answered {}", other.name())),
            Err(e) => Err(dial_failed.unwrap_or_else(|| e.to_string())),
        };
        match outcome {
            Ok(()) => {
                info!(%peer, items = carried.len(), "owed consent items delivered");
                ctx.backend.remove_outbox(&carried)?;
            }
            Err(error) => {
                debug!(%peer, cause = %error, "redelivery failed; tried again later");
                reschedule(ctx, &carried, &error, max_backoff)?;
            }
        }
    }
    if !given_up.is_empty() {
        ctx.backend.remove_outbox(&given_up)?;
    }
    Ok(())
}

/// A push asked for through the handle. Items of the local identity's own
/// record (the patient CLI submitting) go as they are; every other item must
/// pass the consent filter for `peer` and is audited, so no path around
/// [`may_disclose`] exists.
async fn push_task<B: Backend>(
    ctx: &Ctx<B>,
    me: PeerId,
    peer: PeerId,
    items: Vec<Item>,
    addrs: Vec<Multiaddr>,
) -> Result<IngestReport> {
    let local = Requester::from_peer_id(&me)?;
    let requester = Requester::from_peer_id(&peer)?;
    let t = now();
    let mut audit: BTreeMap<(PatientId, Option<GrantId>), Vec<ItemId>> = BTreeMap::new();
    for item in &items {
        let meta = ItemMeta::describe(item)?;
        if local.is_patient(&meta.patient) {
            continue;
        }
        let view = ctx.backend.consent(&meta.patient)?;
        let decision = may_disclose(&meta, &requester, &view, t);
        if !decision.allowed() {
            return Err(Error::Withheld { peer, item: meta.id });
        }
        audit.entry((meta.patient, decision.grant())).or_default().push(meta.id);
    }
    for ((patient, grant), ids) in audit {
        ctx.backend
            .record_disclosure(&DisclosureRecord {
                peer,
                patient,
                grant,
                items: ids,
            })
            .await?;
    }
    ctx.metrics.sent(Served {
        items: items.len() as u64,
        bytes: items.iter().map(|i| i.bytes.len() as u64).sum(),
    });
    // Reach the peer first: by an address this node knows, else by a
    // Kademlia lookup (a grantee named only by its PeerId).
    if let Err(e) = ctx.dial_peer(peer).await {
        debug!(%peer, cause = %e, "could not connect before pushing");
    }
    match ctx.request(peer, Request::Push { items, addrs }).await? {
        Response::Pushed {
            accepted,
            duplicates,
            pending,
            rejected,
        } => Ok(IngestReport {
            accepted,
            duplicates,
            pending,
            rejected,
            ..IngestReport::default()
        }),
        other => Err(unexpected(peer, "push", &other)),
    }
}

/// What follows a stored item (DESIGN §5 consent flows, §6 nudges):
/// - an envelope: nudge the connected peers that may receive it;
/// - a grant for another practice: push it to the grantee (dialing the
///   addresses known for it) and forward it to every other holder of a grant
///   from the patient;
/// - a grant for this node: reconcile the patient with the node it came
///   from, the nodes in its address hints and the connected peers a grant
///   from the patient names ([`reconcile_targets`]), so history written
///   before the grant arrives;
/// - a revocation: forward it to every holder of a grant from the patient;
/// - a key share for another practice: push it to its recipient.
async fn consent_flow<B: Backend>(ctx: &Ctx<B>, me: PeerId, connected: Vec<PeerId>, event: ItemStored) -> Result<()> {
    let meta = &event.meta;
    // A patient this node holds nothing of (no envelope, no grant to it)
    // is none of its business: a self-made identity's grants would make it
    // dial whatever their hints name. Its envelopes go only to connected
    // peers (nudges) and need no such gate.
    if meta.kind != ItemKind::Envelope && !ctx.backend.relates_to(&meta.patient, &me)? {
        debug!(
            kind = meta.kind.as_str(),
            "consent item of a patient without a relationship here; not followed"
        );
        return Ok(());
    }
    let view = ctx.backend.consent(&meta.patient)?;
    let holders: Vec<PeerId> = view
        .grants
        .iter()
        .map(|g| g.terms().grantee.peer_id())
        .filter(|p| *p != me && Some(*p) != event.from)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    match meta.kind {
        ItemKind::Envelope => {
            let t = now();
            // Only the patient and the grantees of its grants may receive
            // an envelope: PeerIds are compared first, and only those peers
            // decoded (a point decompression each) for the filter. With
            // Kademlia a node is connected to most of the network, and
            // decoding every connected peer for every stored envelope was
            // the largest CPU cost of the 100-node simulation.
            let patient = PracticeId::from_bytes(*meta.patient.as_bytes())
                .map(|p| p.peer_id())
                .ok();
            let candidates = connected
                .into_iter()
                .filter(|p| Some(*p) != event.from && (holders.contains(p) || Some(*p) == patient));
            for peer in candidates {
                if Requester::from_peer_id(&peer).is_ok_and(|r| may_disclose(meta, &r, &view, t).allowed()) {
                    ctx.send(Command::Nudge { peer, seq: event.seq }).await?;
                }
            }
        }
        ItemKind::Grant => {
            let Some(item) = item_at(ctx, event.seq).await? else {
                return Ok(());
            };
            let grant = Grant::decode(&item.bytes)?;
            let grantee = grant.terms().grantee.peer_id();
            let mut hinted = HashSet::new();
            for hint in &grant.terms().address_hints {
                if let Ok(addr) = hint.parse::<Multiaddr>()
                    && let Some(peer) = peer_of(&addr)
                    && peer != me
                {
                    hinted.insert(peer);
                    ctx.send(Command::AddAddress { peer, addr }).await?;
                }
            }
            if grantee == me {
                let patient = meta.patient;
                let from = event.from;
                let not_before = grant.terms().not_before;
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    // A grant that starts later opens nothing yet: reconcile
                    // when it reaches not-before.
                    let wait = not_before.saturating_sub(now());
                    if wait > 0 {
                        tokio::time::sleep(Duration::from_millis(wait.saturating_add(1000))).await;
                    }
                    let Ok(connected) = ctx.connected_peers().await else {
                        return;
                    };
                    let mut targets = reconcile_targets(&ctx, &patient, connected, hinted, from);
                    targets.remove(&me);
                    // The patient's own CLI serves nothing.
                    targets.retain(|p| Requester::from_peer_id(p).is_ok_and(|r| !r.is_patient(&patient)));
                    for peer in targets {
                        if !ctx.may_dial(peer, from).await.unwrap_or(false) {
                            continue;
                        }
                        let ctx = ctx.clone();
                        tokio::spawn(async move {
                            // Pull first (joining a pull under way): what the
                            // peer discloses now comes that way, transfers
                            // included, and the summary then lists only
                            // collections not in step.
                            if let Err(e) = ctx.sync_now(peer).await {
                                debug!(%peer, cause = %e, "pull before reconciling failed");
                            }
                            match reconcile_task(&ctx, peer, patient).await {
                                Ok(r) => debug!(%peer, fetched = r.received, "reconciled after grant"),
                                Err(e) => debug!(%peer, cause = %e, "reconcile after grant failed"),
                            }
                        });
                    }
                });
            } else {
                if Some(grantee) != event.from {
                    push_filtered(ctx, &view, grantee, &item, &event).await?;
                }
                let mut holds_covered = false;
                for collection in Collection::ALL.into_iter().filter(|c| grant.covers(*c)) {
                    if !ctx.backend.envelope_ids(&meta.patient, collection)?.is_empty() {
                        holds_covered = true;
                        break;
                    }
                }
                if holds_covered && Requester::from_peer_id(&grantee).is_ok() {
                    ask_to_reconcile(ctx, grantee, meta.patient, grant.terms().not_before, event.from);
                }
            }
            for peer in holders.into_iter().filter(|p| *p != grantee) {
                push_filtered(ctx, &view, peer, &item, &event).await?;
            }
        }
        ItemKind::Revocation => {
            let Some(item) = item_at(ctx, event.seq).await? else {
                return Ok(());
            };
            for peer in holders {
                push_filtered(ctx, &view, peer, &item, &event).await?;
            }
        }
        ItemKind::KeyShare => {
            if let Some(Principal::Practice(recipient)) = meta.recipient() {
                let peer = recipient.peer_id();
                if peer != me
                    && Some(peer) != event.from
                    && let Some(item) = item_at(ctx, event.seq).await?
                {
                    push_filtered(ctx, &view, peer, &item, &event).await?;
                }
            }
        }
    }
    Ok(())
}

/// Whom a node reconciles `patient` with once its own grant opens: the
/// node the grant came from, the nodes in its address hints (where the
/// patient's other grants were submitted), and the connected peers a grant
/// from the patient names — the practices that can hold the patient's
/// history. Any other connected peer holds none of it: with Kademlia most
/// of the network is connected, and reconciling with all of it made every
/// peer hold a cursor here, so every pull tick pulled the whole network
/// (docs/decisions.md, "Kademlia"). A holder this node does not know of yet
/// learns the grant and asks for the reconciliation itself
/// ([`ask_to_reconcile`]).
fn reconcile_targets<B: Backend>(
    ctx: &Ctx<B>,
    patient: &PatientId,
    connected: Vec<PeerId>,
    hinted: HashSet<PeerId>,
    from: Option<PeerId>,
) -> HashSet<PeerId> {
    let holders: HashSet<PeerId> = ctx
        .backend
        .consent(patient)
        .map(|view| view.grants.iter().map(|g| g.terms().grantee.peer_id()).collect())
        .unwrap_or_default();
    connected
        .into_iter()
        .filter(|p| holders.contains(p))
        .chain(hinted)
        .chain(from)
        .collect()
}

/// Address suggestions in a push are honoured only from a patient pushing
/// their own grant (the CLI passing the grantee's address) who has a
/// relationship with this node (envelopes held, or a grant to it held or in
/// this push: [`Backend::relates_to`]), and only full `/p2p/` multiaddrs.
fn adoptable_addrs<B: Backend>(
    backend: &B,
    me: PeerId,
    requester: &Requester,
    items: &[Item],
    addrs: Vec<Multiaddr>,
) -> Vec<(PeerId, Multiaddr)> {
    if addrs.is_empty() {
        return Vec::new();
    }
    let grants: Vec<Grant> = items
        .iter()
        .filter(|i| i.kind == ItemKind::Grant)
        .filter_map(|i| Grant::decode(&i.bytes).ok())
        .filter(|g| requester.is_patient(&g.terms().patient))
        .collect();
    let Some(patient) = grants.first().map(|g| g.terms().patient) else {
        return Vec::new();
    };
    let related =
        grants.iter().any(|g| g.terms().grantee.peer_id() == me) || backend.relates_to(&patient, &me).unwrap_or(false);
    if !related {
        return Vec::new();
    }
    addrs.into_iter().filter_map(|a| peer_of(&a).map(|p| (p, a))).collect()
}
