//! The sync actor: one task owns the libp2p `Swarm` and every piece of
//! connection state; [`crate::SyncHandle`] drives it through a bounded
//! channel of commands that carry their reply senders (STYLE §3). Multi-step
//! work (pulling pages, reconciling) runs in tasks that talk to the actor on
//! a channel of their own, so the actor ends once every handle is gone.
//!
//! This file holds the actor's state and its loop (commands, swarm events,
//! stored-item events, ticks); the jobs live in the modules below.

mod connections;
mod ctx;
mod dial;
mod flows;
pub(crate) mod messages;
mod outbox;
mod pulls;
mod rates;
mod requests;
mod swarm;

pub(crate) use crate::metrics::Metrics;
use messages::Internal;
pub(crate) use messages::{Ask, Command};

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::request_response::OutboundRequestId;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, identify, kad, mdns};
use medmesh_crypto::{PatientId, SecretIdentity};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::addressed_peer as peer_of;
use crate::backend::{Backend, Item, ItemId, ItemStored};
use crate::config::Config;
use crate::serve::{self};
use crate::wire::{Request, Response};
use crate::{Connection, Error, Result, Status};
use medmesh_node::rate::Bucket;

use crate::actor::ctx::{Ctx, Following, Swarmed};
use crate::actor::dial::DialBudget;
use crate::actor::flows::{consent_flow, push_task};
use crate::actor::outbox::REDELIVERY_TICK;
use crate::actor::pulls::PullSlot;
use crate::actor::swarm::{Behaviour, BehaviourEvent, on_dcutr_event, on_relay_client_event, on_relay_event};
use crate::client::Client;

pub(crate) const COMMAND_CAPACITY: usize = 256;

/// How long a stopping actor waits for its connections to close.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) enum Outbound {
    Reply(oneshot::Sender<Result<Response>>),
    Nudge(PeerId),
    /// A consent item owed to the peer ([`crate::Owed`]): settled by its answer.
    Forward(PeerId, ItemId),
}

/// Least time between two rounds with one peer started by connections or
/// the interval (a peer cycling its connection must not make this node
/// send a thousand summaries each time).
pub(crate) const ANTI_ENTROPY_MIN_GAP: Duration = Duration::from_secs(60);

pub(crate) struct Actor<B: Backend> {
    swarm: Swarm<Behaviour>,
    ctx: Ctx<B>,
    /// From handles: closed when the last one is dropped, which stops the actor.
    commands: mpsc::Receiver<Command>,
    /// From the actor's own tasks (their senders are in [`Ctx`]).
    internal: mpsc::Receiver<Internal>,
    stored: broadcast::Receiver<ItemStored>,
    config: Config,
    me: PeerId,
    static_peers: Vec<(PeerId, Multiaddr)>,
    outbound: HashMap<OutboundRequestId, Outbound>,
    /// Addresses learned for peers (hints, pushes, dials that worked).
    known_addrs: HashMap<PeerId, Vec<Multiaddr>>,
    pulls: HashMap<PeerId, PullSlot>,
    /// Peers whose pulls failed in a row (or whose connection broke), and
    /// how many times: each is pulled again after [`pulls::pull_retry_wait`].
    pull_retries: HashMap<PeerId, u32>,
    /// Peers with a nudge in flight, and the sequence number of a follow-up
    /// to send when it returns.
    nudging: HashMap<PeerId, Option<u64>>,
    dial_waiters: HashMap<PeerId, Vec<oneshot::Sender<Result<PeerId>>>>,
    /// Peers dialled at addresses the swarm knew while Kademlia is on: if
    /// those fail (the peer moved), the dial falls back to a lookup once.
    dials_before_lookup: HashSet<PeerId>,
    /// Why the last dial of each peer failed ([`dial::dial_reason`]), until it
    /// connects: the reason a forward's debt keeps (request-response only
    /// says "Failed to dial the requested peer").
    dial_errors: HashMap<PeerId, String>,
    /// Kademlia lookups under way, and the peer each is for.
    lookups: HashMap<kad::QueryId, PeerId>,
    /// When this node last looked up its own id ([`swarm::KAD_JOIN_CLOSEST`]).
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
    /// Every task this actor started (pulls, serving, reconciliations,
    /// consent flows, redelivery, timers), and those its tasks asked it to
    /// start ([`Internal::Spawn`]): reaped as they finish, aborted and
    /// awaited when the actor stops, so no task of a stopped node still
    /// holds its store or writes to it (STYLE §3).
    tasks: JoinSet<()>,
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
    let swarm = swarm::build(&config, keypair, &static_peers).await?;

    let (tx, commands) = mpsc::channel(COMMAND_CAPACITY);
    let (internal_tx, internal) = mpsc::channel(COMMAND_CAPACITY);
    let metrics = Arc::new(Metrics::default());
    let dial_budget = DialBudget::new(&config.limits, Instant::now());
    let stored = backend.subscribe();
    // What a previous run stored was followed then (or is owed in the
    // outbox): only items stored from now on are waited for.
    let followed = Arc::new(AtomicU64::new(backend.last_seq()));
    let link = Swarmed {
        tx: internal_tx.clone(),
        limits: Arc::new(config.limits.clone()),
    };
    let client = Client::with_metrics(backend.clone(), link, me, &config, metrics.clone());
    let ctx = Ctx {
        backend,
        me,
        tx: internal_tx,
        metrics: metrics.clone(),
        client,
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
        internal,
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
        tasks: JoinSet::new(),
    };
    // The actor itself is the one detached task: it owns every other, and
    // stops (after them) on `Shutdown` or when the last handle is dropped.
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
                Some(message) = self.internal.recv() => self.on_internal(message),
                Some(done) = self.tasks.join_next() => {
                    if let Err(e) = done
                        && e.is_panic()
                    {
                        warn!(cause = %e, "a sync task panicked");
                    }
                }
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
        // Tasks first: aborted at their next await (a blocking one runs to
        // its end), and awaited, so that when `shutdown` returns nothing of
        // this node runs any more.
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
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
            Command::Ask(ask) => self.on_ask(ask),
            Command::Connections(reply) => {
                let _ = reply.send(self.connections.values().cloned().collect());
            }
            Command::Reconcile { peer, patient, reply } => {
                let ctx = self.ctx.clone();
                self.spawn_task(async move {
                    let _ = reply.send(ctx.client.reconcile(peer, patient).await);
                });
            }
            Command::AntiEntropy { peer, reply } => {
                let ctx = self.ctx.clone();
                self.spawn_task(async move {
                    let _ = reply.send(ctx.client.anti_entropy(peer).await);
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
                self.spawn_task(async move {
                    let _ = reply.send(push_task(&ctx, me, peer, items, addrs).await);
                });
            }
            Command::Outbox { patient, reply } => {
                let settling = self.settling(&patient);
                let backend = self.ctx.backend.clone();
                self.tasks.spawn_blocking(move || {
                    let _ = reply.send(serve::outbox_report(&*backend, &patient, settling));
                });
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
        }
    }

    /// What a handle or a task asks of the owner of the swarm.
    fn on_ask(&mut self, ask: Ask) {
        match ask {
            Ask::Request { peer, request, reply } => self.send_request(peer, request, reply),
            Ask::DialPeer { peer, reply } => self.dial_peer(peer, reply),
            Ask::SyncNow { peer, reply } => self.start_pull(peer, Some(reply)),
            Ask::ConnectedPeers(reply) => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
        }
    }

    /// Runs `task` in the actor's [`JoinSet`], in the actor's span.
    fn spawn_task(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task.in_current_span());
    }

    /// What the actor's tasks report or ask for.
    fn on_internal(&mut self, message: Internal) {
        match message {
            Internal::Spawn(task) => self.spawn_task(task),
            Internal::Ask(ask) => self.on_ask(ask),
            Internal::Respond {
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
            Internal::PullDone { peer, result } => self.on_pull_done(peer, result),
            Internal::RetryPull(peer) => self.start_pull(peer, None),
            Internal::Pushed { peer } => self.start_pull(peer, None),
            Internal::Forward { peer, id, item } => self.forward(peer, id, item),
            Internal::Nudge { peer, seq } => self.nudge(peer, seq),
            Internal::AddAddress { peer, addr } => self.note_addr(peer, addr),
            Internal::KnownAddrs { peer, reply } => {
                let _ = reply.send(self.known_addrs.get(&peer).cloned().unwrap_or_default());
            }
            Internal::MayDial { peer, source, reply } => {
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

    /// Sends one request over the swarm; its answer goes to `reply`.
    fn send_request(&mut self, peer: PeerId, request: Request, reply: oneshot::Sender<Result<Response>>) {
        let id = self.swarm.behaviour_mut().sync.send_request(&peer, request);
        Metrics::add(&self.ctx.metrics.requests_sent, 1);
        self.outbound.insert(id, Outbound::Reply(reply));
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

    /// Routes a swarm event to the part of the actor it concerns.
    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => info!(%address, "listening"),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => self.on_connected(peer_id, connection_id, &endpoint, num_established.get()),
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => self.on_disconnected(peer_id, connection_id, num_established, cause.as_ref()),
            SwarmEvent::ListenerClosed {
                listener_id, reason, ..
            } => self.on_listener_closed(listener_id, reason),
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(event)) => on_relay_client_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(event)) => on_dcutr_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Relay(event)) => on_relay_event(event),
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } if !self.swarm.is_connected(&peer) => self.on_dial_failed(peer, &error),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                self.on_identified(peer_id, info);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetClosestPeers(result),
                step,
                ..
            })) => self.on_lookup(id, result, step.last),
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                self.on_mdns_discovered(found)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Sync(event)) => self.on_sync_event(event),
            _ => {}
        }
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
        self.spawn_task(async move {
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

    /// One anti-entropy round with `peer`, unless one runs already or the
    /// last ended less than [`ANTI_ENTROPY_MIN_GAP`] ago.
    fn start_anti_entropy(&mut self, peer: PeerId) {
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
        self.spawn_task(async move {
            let finished = match pulls::unwound("anti-entropy", ctx.client.anti_entropy(peer)).await {
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
}
