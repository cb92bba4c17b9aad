//! The one error type of medmesh-sync.

use libp2p::{Multiaddr, PeerId};

/// Everything that can go wrong in medmesh-sync.
///
/// Messages name the peer, item or grant at fault; they never carry record
/// content, key bytes or anything a patient wrote.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A wire message broke the protocol: too large, not CBOR, or a field
    /// outside its bounds. Nothing in it was used.
    #[error("invalid {message} message: {reason}")]
    Wire {
        /// Which message kind (or "frame" when the kind is unknown).
        message: &'static str,
        /// What was wrong, without echoing the input.
        reason: &'static str,
    },
    /// A request to a peer failed in transport (dial, timeout, closed).
    #[error("request to peer {peer} failed: {reason}")]
    Request {
        /// The peer.
        peer: PeerId,
        /// Transport-level cause.
        reason: String,
    },
    /// The connection carrying a request closed before the answer came
    /// (the peer restarted, or an older connection to it was replaced).
    /// Every request of the protocol is idempotent, so it is retried once
    /// on a fresh connection before this reaches the caller.
    #[error("connection to peer {peer} closed before it answered")]
    ConnectionLost {
        /// The peer.
        peer: PeerId,
    },
    /// The peer answered with something that does not fit the request.
    #[error("peer {peer} answered a {request} request with {answer}")]
    UnexpectedResponse {
        /// The peer.
        peer: PeerId,
        /// The request kind.
        request: &'static str,
        /// What came back.
        answer: &'static str,
    },
    /// The peer refused the request.
    #[error("peer {peer} refused the request: {reason}")]
    Refused {
        /// The peer.
        peer: PeerId,
        /// The refusal code as text.
        reason: &'static str,
    },
    /// A push through the handle named an item the consent filter does not
    /// let go to that peer; nothing was sent.
    #[error("item {item} may not be sent to peer {peer}")]
    Withheld {
        /// The peer.
        peer: PeerId,
        /// The first withheld item.
        item: crate::ItemId,
    },
    /// A PeerId that does not inline an ed25519 key (every medmesh
    /// principal has one).
    #[error("peer {0} has no ed25519 identity")]
    NotEd25519(PeerId),
    /// A multiaddr without the `/p2p/<PeerId>` suffix where one is required.
    #[error("address {0} does not end in /p2p/<peer id>")]
    MissingPeerId(Multiaddr),
    /// Building the swarm or listening failed.
    #[error("transport setup: {0}")]
    Transport(String),
    /// A listen address's port is taken: another node (libp2p's listeners
    /// share ports with each other by SO_REUSEPORT, so the kernel would let
    /// a second node bind it too) or another program listens there.
    #[error("listen address {addr} is already in use (another node or program listens on that port)")]
    AddressInUse {
        /// The address asked for.
        addr: Multiaddr,
    },
    /// Dialing failed immediately.
    #[error("dialing {addr} failed: {reason}")]
    Dial {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// The sync actor has stopped (shutdown, or every handle dropped).
    #[error("the sync actor has stopped")]
    Stopped,
    /// A task of the actor panicked (a bug, or a dependency's panic on a
    /// peer's data); its slot is freed and the step may be tried again.
    #[error("{0} task panicked")]
    Panicked(&'static str),
    /// The storage backend failed.
    #[error("backend: {0}")]
    Backend(String),
    /// The node behind [`crate::NodeBackend`] failed: its store, or a
    /// snapshot transfer's document that could not be opened or restored
    /// (typed, not flattened into text).
    #[error(transparent)]
    Node(#[from] medmesh_node::Error),
    /// An item failed to decode or verify (medmesh-crypto).
    #[error(transparent)]
    Crypto(#[from] medmesh_crypto::Error),
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<medmesh_node::policy::NotEd25519> for Error {
    fn from(e: medmesh_node::policy::NotEd25519) -> Self {
        Self::NotEd25519(e.0)
    }
}
