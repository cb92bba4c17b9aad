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
    /// the network is whatever peers the node was given or met. Off by
    /// default: libp2p-kad bootstraps on every new peer while its table is
    /// small, and every connection that makes starts a pull here, which
    /// swamped a 100-node simulation (docs/decisions.md).
    pub kademlia: bool,
    /// Snapshot transfers (docs/protocol.md): when this node misses at least
    /// this many envelopes of a collection that a peer's local snapshot
    /// covers, it asks for the snapshot's document and compact headers
    /// instead of the envelopes; 0 never asks. Serving them is always on.
    pub snapshot_min_envelopes: usize,
    /// Flood limits on what peers may ask of this node.
    pub limits: Limits,
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
            snapshot_min_envelopes: 64,
            limits: Limits::default(),
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
