//! The messages the actor receives: [`Command`]s from handles, [`Internal`]
//! messages from its own tasks — two types on two channels, so that the
//! actor stops when the last handle is gone whatever its tasks still hold.

use libp2p::request_response::ResponseChannel;
use libp2p::{Multiaddr, PeerId};
use medmesh_crypto::PatientId;
use tokio::sync::oneshot;

use crate::backend::{IngestReport, Item, ItemId};
use crate::serve::Served;
use crate::wire::{OutboxReport, Request, Response};
use crate::{Connection, Result, Status, SyncReport};

/// What both a handle and the actor's own tasks may ask of the actor (only
/// the owner of the swarm can do these); each carries its reply sender.
pub(crate) enum Ask {
    /// Send one request over the swarm; the answer (or the failure) goes to
    /// `reply`.
    Request {
        peer: PeerId,
        request: Request,
        reply: oneshot::Sender<Result<Response>>,
    },
    /// Connect to a PeerId: known addresses first, else a Kademlia lookup.
    DialPeer {
        peer: PeerId,
        reply: oneshot::Sender<Result<PeerId>>,
    },
    /// A pull, joining one under way.
    SyncNow {
        peer: PeerId,
        reply: oneshot::Sender<Result<SyncReport>>,
    },
    ConnectedPeers(oneshot::Sender<Vec<PeerId>>),
}

/// What a [`crate::SyncHandle`] asks of the actor; each carries its reply
/// sender.
pub(crate) enum Command {
    /// As the actor's tasks may ask too.
    Ask(Ask),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<PeerId>>,
    },
    Connections(oneshot::Sender<Vec<Connection>>),
    Reconcile {
        peer: PeerId,
        patient: PatientId,
        reply: oneshot::Sender<Result<SyncReport>>,
    },
    AntiEntropy {
        peer: PeerId,
        reply: oneshot::Sender<Result<SyncReport>>,
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
}

/// A task for the actor to run ([`Internal::Spawn`]).
pub(crate) type Task = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// What the actor's own tasks send it: results to act on, and the few
/// things only the owner of the swarm can do for them.
pub(crate) enum Internal {
    /// Run this in the actor's task set (tasks that start tasks: a consent
    /// flow's reconciliations, a reconciliation ask waiting for not-before).
    Spawn(Task),
    /// As a handle may ask.
    Ask(Ask),
    /// The addresses this node knows for `peer` (kept with what it owes it).
    KnownAddrs {
        peer: PeerId,
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    /// May a consent flow contact `peer` for input from `source`
    /// ([`super::dial::DialBudget`])?
    MayDial {
        peer: PeerId,
        source: PeerId,
        reply: oneshot::Sender<bool>,
    },
    AddAddress {
        peer: PeerId,
        addr: Multiaddr,
    },
    /// A served request's answer, to send on its channel.
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
    /// `peer` pushed to us: pull it.
    Pushed {
        peer: PeerId,
    },
    /// Push a consent item owed to `peer` ([`crate::Owed`]).
    Forward {
        peer: PeerId,
        id: ItemId,
        item: Item,
    },
    Nudge {
        peer: PeerId,
        seq: u64,
    },
}
