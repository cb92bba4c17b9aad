//! The messages the actor receives: from handles and from its own tasks.

use libp2p::request_response::ResponseChannel;
use libp2p::{Multiaddr, PeerId};
use medmesh_crypto::PatientId;
use tokio::sync::oneshot;

use crate::backend::{IngestReport, Item, ItemId};
use crate::serve::Served;
use crate::wire::{OutboxReport, Request, Response};
use crate::{Connection, Result, Status, SyncReport};

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
