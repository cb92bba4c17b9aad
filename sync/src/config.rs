//! `sync::Config`: how a node's swarm listens, whom it contacts and how often
//! it pulls.

use std::time::Duration;

use libp2p::Multiaddr;

/// Settings for one node's sync actor.
#[derive(Clone, Debug)]
pub struct Config {
    /// Addresses to listen on. The default is loopback only (TCP and QUIC on
    /// ephemeral ports): a practice opens itself to its network on purpose.
    pub listen: Vec<Multiaddr>,
    /// Static peers, each a full multiaddr ending in `/p2p/<PeerId>`; dialed
    /// at start and redialed on every pull tick while disconnected. There is
    /// no built-in public bootstrap list.
    pub peers: Vec<Multiaddr>,
    /// Discover peers on the LAN with mDNS (multicast). Off by default and
    /// never on in tests or CI.
    pub mdns: bool,
    /// How often every connected peer is pulled, to cover missed nudges.
    pub pull_interval: Duration,
    /// Items asked for per pull page.
    pub page_limit: u32,
    /// Most established connections in total.
    pub max_connections: u32,
    /// Most established connections to one peer.
    pub max_connections_per_peer: u32,
    /// Most connections being set up at once (incoming plus outgoing).
    pub max_pending_connections: u32,
    /// How long a request may wait for its response.
    pub request_timeout: Duration,
    /// How long an unused connection stays open.
    pub idle_connection_timeout: Duration,
    /// Run the consent flows (nudge, forward grants and revocations, push
    /// grants to their grantee). A node does; a patient's CLI session, which
    /// only submits and pulls its own items, does not.
    pub consent_flows: bool,
    /// Kademlia on `/medmesh/kad/1` (docs/operations.md): find a PeerId's
    /// addresses from the peers this node knows. No public bootstrap list:
    /// the network is whatever peers the node was given or met. A node
    /// joins with one lookup of the peers closest to its own id (again
    /// every 30 minutes) instead of libp2p-kad's bootstraps, which it cuts
    /// short. Off by default for now (docs/decisions.md, "Kademlia").
    pub kademlia: bool,
    /// Addresses others reach this node at (a public address in front of
    /// NAT port forwarding, a relay server's public address), announced
    /// through identify and Kademlia and, on a relay server, handed to the
    /// nodes that reserve a circuit on it. Each without `/p2p/`.
    pub external_addrs: Vec<Multiaddr>,
    /// Relays to reserve a circuit on, each a full multiaddr ending in
    /// `/p2p/<relay PeerId>`: a node behind NAT is then reachable at
    /// `<relay>/p2p-circuit/p2p/<its PeerId>` (docs/operations.md). The
    /// reservation is renewed while the connection lasts and made again on
    /// the next pull tick after it drops.
    pub relays: Vec<Multiaddr>,
    /// Upgrade relayed connections to direct ones by hole punching (DCUtR)
    /// when both sides can. On by default.
    pub dcutr: bool,
    /// Serve as a circuit relay (v2) for other nodes, within
    /// [`Config::relay_limits`]. Off by default: a relay carries other
    /// practices' (Noise-encrypted) traffic on its uplink.
    pub relay_server: bool,
    /// Limits of the relay server.
    pub relay_limits: RelayLimits,
    /// Snapshot transfers (docs/protocol.md): when this node misses at least
    /// this many envelopes of a collection that a peer's local snapshot
    /// covers, it asks for the snapshot's document and compact headers
    /// instead of the envelopes; 0 never asks. Serving them is always on.
    pub snapshot_min_envelopes: usize,
    /// Flood limits on what peers may ask of this node.
    pub limits: Limits,
    /// Durable delivery (docs/protocol.md §8a): a consent item owed to a
    /// peer that did not answer is tried again after 2 s, doubling per
    /// failure up to this wait; a peer that connects gets its debts at once.
    pub redelivery_max_backoff: Duration,
    /// Anti-entropy (docs/protocol.md §8): every this often, and whenever a
    /// peer connects, the node reconciles with each connected peer every
    /// patient both may read (one digest request for them all, a summary
    /// only for those that differ), so any gap is found and repaired.
    pub anti_entropy_interval: Duration,
}

/// Flood limits (docs/protocol.md, "Flood limits"). Requests over a limit
/// are answered `Refused(Busy)` at once instead of being queued.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Inbound requests per second one peer may make, on average (the
    /// refill rate of its token bucket).
    pub requests_per_second: u32,
    /// Inbound requests one peer may make in a burst (the bucket's size).
    pub request_burst: u32,
    /// Inbound requests of one peer being served at once.
    pub max_in_flight_per_peer: usize,
    /// Inbound requests being served at once, all peers together.
    pub max_in_flight: usize,
    /// Items one peer may park in the pending queue (waiting for a grant).
    pub max_pending_per_peer: u64,
    /// Items all peers together may park in the pending queue.
    pub max_pending: u64,
    /// Outbound requests awaiting an answer; grant and revocation forwards
    /// beyond it are dropped (counted in `Status::dropped`; pulls repair).
    pub max_outbound: usize,
    /// How many times a request answered `Busy` is asked again (with
    /// doubling waits from 250 ms) before the caller sees the refusal.
    pub busy_retries: u32,
    /// Dials the consent flows may make on behalf of one source (the peer
    /// or patient session whose item they follow) in a burst; dials to
    /// connected and static peers are free. Beyond it the contact is
    /// skipped (`Status::dials_limited`); pulls and reconciliation repair.
    pub dial_burst_per_source: u32,
    /// The refill of a source's dial bucket, per minute.
    pub dials_per_minute_per_source: u32,
    /// As [`Limits::dial_burst_per_source`], all sources together.
    pub dial_burst: u32,
    /// The refill of the global dial bucket, per minute.
    pub dials_per_minute: u32,
}

/// What a relay server grants the nodes that use it (docs/operations.md,
/// "Finding each other"). A circuit that reaches its byte or time limit is
/// closed; the sync connection over it drops, and the next request opens a
/// new circuit (pulls resume from their cursor).
#[derive(Clone, Debug)]
pub struct RelayLimits {
    /// Reservations held at once, all nodes together.
    pub max_reservations: usize,
    /// Reservations one node may hold at once.
    pub max_reservations_per_peer: usize,
    /// How long a reservation lasts before its holder renews it.
    pub reservation_duration: Duration,
    /// Circuits open at once, all nodes together.
    pub max_circuits: usize,
    /// Circuits open at once with one node at either end.
    pub max_circuits_per_peer: usize,
    /// How long one circuit may stay open.
    pub max_circuit_duration: Duration,
    /// Bytes one circuit may carry (both directions together).
    pub max_circuit_bytes: u64,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            max_reservations: 128,
            max_reservations_per_peer: 4,
            reservation_duration: Duration::from_secs(3600),
            max_circuits: 64,
            max_circuits_per_peer: 16,
            max_circuit_duration: Duration::from_secs(10 * 60),
            // Room for the largest request and response frames
            // (docs/protocol.md §2), so a full page always gets through.
            max_circuit_bytes: 32 * 1024 * 1024,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            requests_per_second: 100,
            request_burst: 400,
            max_in_flight_per_peer: 32,
            max_in_flight: 256,
            max_pending_per_peer: 1024,
            max_pending: 8192,
            max_outbound: 4096,
            busy_retries: 3,
            dial_burst_per_source: 8,
            dials_per_minute_per_source: 6,
            dial_burst: 32,
            dials_per_minute: 60,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: vec![
                loopback("/ip4/127.0.0.1/tcp/0"),
                loopback("/ip4/127.0.0.1/udp/0/quic-v1"),
            ],
            peers: Vec::new(),
            mdns: false,
            pull_interval: Duration::from_secs(30),
            page_limit: 256,
            max_connections: 256,
            max_connections_per_peer: 2,
            max_pending_connections: 64,
            request_timeout: Duration::from_secs(60),
            idle_connection_timeout: Duration::from_secs(120),
            consent_flows: true,
            kademlia: false,
            external_addrs: Vec::new(),
            relays: Vec::new(),
            dcutr: true,
            relay_server: false,
            relay_limits: RelayLimits::default(),
            snapshot_min_envelopes: 64,
            limits: Limits::default(),
            redelivery_max_backoff: Duration::from_secs(300),
            anti_entropy_interval: Duration::from_secs(600),
        }
    }
}

impl Config {
    /// A patient's CLI session: loopback TCP for its own (unused) listener,
    /// no consent flows, no periodic pulls.
    pub fn client() -> Self {
        Self {
            consent_flows: false,
            pull_interval: Duration::from_secs(24 * 3600),
            ..Self::loopback_tcp()
        }
    }

    /// Loopback TCP only on an ephemeral port, as tests and demos use.
    pub fn loopback_tcp() -> Self {
        Self {
            listen: vec![loopback("/ip4/127.0.0.1/tcp/0")],
            ..Self::default()
        }
    }
}

fn loopback(s: &str) -> Multiaddr {
    // The literals above are valid multiaddrs; an empty address (which the
    // swarm then fails to listen on, loudly) is the fallback.
    s.parse().unwrap_or_else(|_| Multiaddr::empty())
}
