//! Reaching peers: dials, Kademlia lookups, known addresses, the dial budget.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId, kad};
use tokio::sync::oneshot;
use tracing::debug;

use crate::actor::Actor;
use crate::actor::rates;
use crate::actor::swarm::{KAD_JOIN_CLOSEST, KAD_PROTOCOL, KAD_REJOIN};
use crate::addressed_peer as peer_of;
use crate::backend::Backend;
use crate::config::Limits;
use crate::wire::MAX_PUSH_ADDRS;
use crate::{Error, Result};
use medmesh_node::rate::Bucket;

/// Dials the node makes on behalf of remote input (consent flows of items
/// a peer or a patient's session brought): a bucket per source and one for
/// all (docs/protocol.md §10a). Connected and static peers cost nothing.
pub(crate) struct DialBudget {
    per_source: HashMap<PeerId, Bucket>,
    all: Bucket,
}

impl DialBudget {
    pub(crate) fn new(limits: &Limits, at: Instant) -> Self {
        Self {
            per_source: HashMap::new(),
            all: Bucket::full(rates::dials(limits), at),
        }
    }

    /// Takes a token from `source`'s bucket and from the global one, or
    /// from neither.
    pub(crate) fn take(&mut self, limits: &Limits, source: PeerId, at: Instant) -> bool {
        let (mine, all) = (rates::dials_per_source(limits), rates::dials(limits));
        let bucket = self.per_source.entry(source).or_insert_with(|| Bucket::full(mine, at));
        Bucket::take_both((bucket, mine), (&mut self.all, all), at)
    }

    /// Forgets the full buckets (absent means full).
    pub(crate) fn prune(&mut self, limits: &Limits, at: Instant) {
        let mine = rates::dials_per_source(limits);
        self.per_source.retain(|_, b| !b.is_full(mine, at));
    }
}

/// Peers whose last dial error is kept (see `Actor::dial_errors`).
pub(crate) const MAX_DIAL_ERRORS: usize = 4096;

/// Why a dial failed, short: the transport's error per address tried
/// (e.g. "Connection refused"), or that no address is known. libp2p's own
/// text nests each cause behind an empty one and repeats the PeerId.
pub(crate) fn dial_reason(error: &libp2p::swarm::DialError) -> String {
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

/// Most holders [`Actor::reach_holders`] dials per round.
pub(crate) const HOLDER_DIALS: usize = 16;

impl<B: Backend> Actor<B> {
    /// Looks up the peers closest to this node's own id (see
    /// [`KAD_JOIN_CLOSEST`]) unless it did so less than [`KAD_REJOIN`] ago:
    /// at start, as soon as it knows a Kademlia peer.
    pub(crate) fn join_kademlia(&mut self) {
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
    pub(crate) fn cut_kad_bootstraps(&mut self) {
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
    pub(crate) fn dial_peer(&mut self, peer: PeerId, reply: oneshot::Sender<Result<PeerId>>) {
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
    pub(crate) fn look_up(&mut self, peer: PeerId, why: &str) {
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
    pub(crate) fn keep_address_record(&mut self, peer: PeerId, signed: libp2p::core::SignedEnvelope) {
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
    pub(crate) fn learn_kept_addresses(&mut self) {
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
    pub(crate) fn reach_holders(&mut self) {
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

    pub(crate) fn fail_dial(&mut self, peer: PeerId, reason: &str) {
        for w in self.dial_waiters.remove(&peer).unwrap_or_default() {
            let _ = w.send(Err(Error::Request {
                peer,
                reason: reason.to_owned(),
            }));
        }
    }

    /// A Kademlia lookup progressed: dial the peer once someone named its
    /// addresses; give up when the lookup ends without them.
    pub(crate) fn on_lookup(
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

    /// Adds an address for `peer` to the swarm and to what this node knows.
    pub(crate) fn note_addr(&mut self, peer: PeerId, addr: Multiaddr) {
        self.remember_addr(peer, addr.clone());
        self.swarm.add_peer_address(peer, addr);
    }

    /// Remembers an address of `peer` (the newest few per peer, for a
    /// bounded number of peers).
    pub(crate) fn remember_addr(&mut self, peer: PeerId, addr: Multiaddr) {
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

    /// A dial failed: its reason is kept, and its waiters get it — unless
    /// Kademlia may still find the peer elsewhere.
    pub(crate) fn on_dial_failed(&mut self, peer: PeerId, error: &libp2p::swarm::DialError) {
        let reason = dial_reason(error);
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

    /// Identify told us a peer's addresses, protocols and signed record.
    pub(crate) fn on_identified(&mut self, peer_id: PeerId, info: libp2p::identify::Info) {
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

    /// mDNS found peers on the LAN: dialled.
    pub(crate) fn on_mdns_discovered(&mut self, found: Vec<(PeerId, Multiaddr)>) {
        for (peer, addr) in found {
            self.swarm.add_peer_address(peer, addr);
            if !self.swarm.is_connected(&peer)
                && let Err(e) = self.swarm.dial(peer)
            {
                debug!(%peer, cause = %e, "dialing mDNS peer failed");
            }
        }
    }
}
