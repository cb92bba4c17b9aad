//! Connections coming and going: what a new connection starts (redelivery,
//! anti-entropy, a pull) and what a lost one leaves to retry.

use std::time::Instant;

use libp2p::PeerId;
use libp2p::core::ConnectedPoint;
use libp2p::swarm::{ConnectionError, ConnectionId};
use tracing::debug;

use crate::Connection;
use crate::actor::Actor;
use crate::backend::Backend;

impl<B: Backend> Actor<B> {
    /// A connection is up: dial waiters are answered, and a peer's first
    /// connection starts what a peer coming back calls for.
    pub(crate) fn on_connected(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        endpoint: &ConnectedPoint,
        num_established: u32,
    ) {
        // Connected: a failure of this dial no longer calls for a lookup.
        self.dials_before_lookup.remove(&peer_id);
        let relayed = endpoint.is_relayed();
        let addr = match endpoint {
            ConnectedPoint::Dialer { address, .. } => address.clone(),
            ConnectedPoint::Listener { local_addr, .. } if relayed => local_addr.clone(),
            ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr.clone(),
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
        if let ConnectedPoint::Dialer { address, .. } = endpoint
            && !relayed
        {
            // An address that just worked: kept with what this node owes the peer.
            self.remember_addr(peer_id, address.clone());
        }
        if num_established == 1 {
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

    /// A connection is gone; with the peer's last one, what it was doing.
    pub(crate) fn on_disconnected(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        num_established: u32,
        cause: Option<&ConnectionError>,
    ) {
        self.connections.remove(&connection_id);
        if num_established == 0 {
            debug!(peer = %peer_id, "disconnected");
            // A connection that broke (not closed, not idle) may
            // have taken a nudge with it, or a pull's last page:
            // a peer this node syncs with is pulled again soon
            // (a pull under way retries when it fails).
            let broke = matches!(cause, Some(ConnectionError::IO(_)));
            if broke && !self.pulls.contains_key(&peer_id) && self.worth_pulling(&peer_id) {
                self.retry_pull_later(peer_id);
            }
            self.last_synced.remove(&peer_id);
            self.nudging.remove(&peer_id);
            self.asked.remove(&peer_id);
        }
    }
}
