//! The libp2p behaviour and the swarm builder: transports, identify, Kademlia, relay.

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::time::Duration;

use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder, connection_limits, dcutr, identify, kad, mdns, noise, ping,
    relay, tcp, yamux,
};
use tracing::{debug, info, warn};

use crate::actor::Actor;
use crate::backend::Backend;
use crate::config::{Config, RelayLimits};
use crate::wire::{Codec, PROTOCOL};
use crate::{Error, Result};

pub(crate) const LISTEN_SETUP_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) const IDENTIFY_PROTOCOL: &str = "/medmesh/id/1";

/// Our own Kademlia network: never the public IPFS DHT.
pub(crate) const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/medmesh/kad/1");

/// A node joins the Kademlia network by looking up the peers closest to its
/// own id — this many: they and the peers met on the way add it to their
/// routing tables, so a lookup for it ends at nodes that know it. It does
/// so instead of libp2p-kad's bootstrap, which asks for the 20 closest of
/// its own id and of one id in every farther bucket, again after every peer
/// that joins a table of fewer than 20 — in a 100-node network every node
/// contacted every other, twice per start (docs/decisions.md, "Kademlia").
pub(crate) const KAD_JOIN_CLOSEST: NonZeroUsize = match NonZeroUsize::new(8) {
    Some(n) => n,
    None => NonZeroUsize::MIN,
};

/// How often the join lookup runs again (on the next identify report of a
/// Kademlia peer after this long), to stay known near its id as nodes come
/// and go.
pub(crate) const KAD_REJOIN: Duration = Duration::from_secs(30 * 60);

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub(crate) limits: connection_limits::Behaviour,
    pub(crate) identify: identify::Behaviour,
    pub(crate) ping: ping::Behaviour,
    pub(crate) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(crate) kad: Toggle<kad::Behaviour<kad::store::MemoryStore>>,
    /// Dials `/p2p-circuit` addresses and holds reservations on relays.
    pub(crate) relay_client: relay::client::Behaviour,
    /// Serves circuits for other nodes (`Config::relay_server`).
    pub(crate) relay: Toggle<relay::Behaviour>,
    pub(crate) dcutr: Toggle<dcutr::Behaviour>,
    pub(crate) sync: request_response::Behaviour<Codec>,
}

/// Fails with [`Error::AddressInUse`] when `addr` names a fixed TCP or UDP
/// port that something listens on already. libp2p-tcp sets SO_REUSEPORT on
/// its listeners, so a second node would bind the same port and the kernel
/// would split connections between the two: a probe bound without it fails
/// instead while the port is held. Port 0 and other transports pass.
pub(crate) fn refuse_taken_port(addr: &Multiaddr) -> Result<()> {
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

pub(crate) fn transport(e: impl std::fmt::Display) -> Error {
    Error::Transport(e.to_string())
}

pub(crate) fn relay_config(limits: &RelayLimits) -> relay::Config {
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
pub(crate) fn on_relay_event(event: relay::Event) {
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

impl<B: Backend> Actor<B> {
    /// Asks every configured relay without a reservation under way for one.
    pub(crate) fn reserve_relays(&mut self) {
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
}

/// Builds the swarm with `keypair` as its identity, starts listening on
/// `config.listen` (returning once every listener has an address) and dials
/// the static peers.
pub(crate) async fn build(
    config: &Config,
    keypair: libp2p::identity::Keypair,
    static_peers: &[(PeerId, Multiaddr)],
) -> Result<Swarm<Behaviour>> {
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

    for (peer, addr) in static_peers {
        swarm.add_peer_address(*peer, addr.clone());
        if let Err(e) = swarm.dial(addr.clone()) {
            warn!(%peer, cause = %e, "dialing static peer failed");
        }
    }
    Ok(swarm)
}

/// What the relay client reports (reservations and circuits), logged.
pub(crate) fn on_relay_client_event(event: relay::client::Event) {
    match event {
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
    }
}

/// Hole punching's outcome, logged.
pub(crate) fn on_dcutr_event(event: dcutr::Event) {
    let dcutr::Event { remote_peer_id, result } = event;
    match result {
        Ok(_) => info!(peer = %remote_peer_id, "relayed connection upgraded to a direct one"),
        Err(e) => debug!(peer = %remote_peer_id, cause = %e, "hole punching failed; staying relayed"),
    }
}

impl<B: Backend> Actor<B> {
    /// A listener closed: a relay's, whose reservation is asked for again
    /// on the next tick.
    pub(crate) fn on_listener_closed(
        &mut self,
        listener_id: libp2p::core::transport::ListenerId,
        reason: std::result::Result<(), std::io::Error>,
    ) {
        if let Some(i) = self.relay_listeners.remove(&listener_id) {
            let relay = self.relays.get(i).map(|(p, _)| *p);
            match reason {
                Ok(()) => info!(?relay, "relay reservation ended; renewing on the next tick"),
                Err(e) => warn!(?relay, cause = %e, "relay reservation failed; retrying on the next tick"),
            }
        }
    }
}
