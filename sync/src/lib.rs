//! medmesh-sync: how medmesh nodes talk. A libp2p swarm (TCP and QUIC,
//! Noise, Yamux, identify, ping, optional mDNS) carrying `/medmesh/sync/1`,
//! a size-capped CBOR request-response protocol through which a node pulls
//! "items after my cursor that I may receive" from its peers, nudges them
//! after a write, reconciles a patient's envelopes after a grant, and pushes
//! grants, revocations and key shares along the consent flows of DESIGN §5.
//!
//! What leaves a node is decided at the moment of serving by one function,
//! [`may_disclose`]: envelopes of (patient, collection) only under a grant in
//! force that names the peer and covers the collection; a patient's grants
//! and revocations to the practices holding a grant from that patient; key
//! shares only to their recipient; everything of a patient to that patient.
//! Every disclosure is written to the audit log before it is sent, and a
//! patient (only that patient) can fetch the audit entries about them with
//! [`SyncHandle::audit`] (accounting of disclosures).
//!
//! The crate does not store anything: it talks to the node's store through
//! the [`Backend`] trait ([`NodeBackend`] puts a `medmesh_node::Node` behind
//! it; [`memory::MemoryBackend`] serves tests). It never decrypts: it
//! moves signed, sealed items, and leaves verification and acceptance to the
//! store. The wire format is specified in `docs/protocol.md`.
//!
//! ```text
//! SyncHandle ──mpsc──▶ actor (owns the Swarm) ──▶ tasks (pull pages, reconcile)
//!                        │  serves requests via may_disclose + audit
//!                        ◀── Backend::subscribe() "item stored" events
//! ```

mod actor;
mod address;
mod backend;
pub mod client;
mod config;
mod direct;
mod error;
pub mod memory;
mod metrics;
mod node_backend;
mod serve;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use medmesh_crypto::{PatientId, SecretIdentity};
use tokio::sync::{mpsc, oneshot};

pub use address::AddressRecord;
pub use backend::{
    AuditEntry, Backend, ConsentView, Cursor, DisclosureRecord, IngestReport, InstanceId, Item, ItemId, ItemKind,
    ItemMeta, ItemStored, Owed, StoredItem, Transfer, TransferIngest,
};
pub use config::{Config, Limits, RelayLimits};
pub use direct::serve_request;
pub use error::{Error, Result};
pub use libp2p::multiaddr::Protocol;
pub use libp2p::{Multiaddr, PeerId};
pub use medmesh_node::policy::{Denied, Disclosure, Requester, may_disclose};
pub use node_backend::{MIN_TRANSFER_ENVELOPES, NodeBackend};
pub use serve::SCAN_BUDGET;

/// Most audit entries [`SyncHandle::audit`] collects over all pages before
/// it gives up on a node that keeps answering.
pub const MAX_AUDIT_ENTRIES_TOTAL: usize = 1 << 20;

/// The PeerId an address reaches: its final `/p2p/` component. A circuit
/// address `/…/p2p/<relay>/p2p-circuit/p2p/<target>` reaches the target, not
/// the relay; an address not ending in `/p2p/` names nobody.
pub fn addressed_peer(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => Some(peer),
        _ => None,
    }
}

/// One established connection.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Connection {
    /// The peer at the other end.
    pub peer: PeerId,
    /// The address it runs over: the one dialled, or for an inbound
    /// connection the peer's; a relayed connection's names the relay and
    /// ends in `/p2p-circuit`.
    pub addr: Multiaddr,
    /// Whether it runs through a circuit relay (docs/operations.md).
    pub relayed: bool,
}

/// What one sync run (a pull to the end of a peer's log, or a
/// reconciliation) did.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct SyncReport {
    /// Requests answered (pages, summaries, fetches).
    pub pages: u64,
    /// Items received.
    pub received: u64,
    /// What ingesting them did.
    pub ingest: IngestReport,
}

impl SyncReport {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: SyncReport) {
        self.pages += other.pages;
        self.received += other.received;
        self.ingest.add(other.ingest);
    }
}

/// Counters since the actor started, for `/metrics` and `status`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Status {
    /// Connected peers.
    pub peers: usize,
    /// Items sent (served pages, summaries, fetches and pushes).
    pub items_sent: u64,
    /// Items received (pages, fetches, pushes to us).
    pub items_received: u64,
    /// Received items the store accepted.
    pub items_accepted: u64,
    /// Received items the store rejected.
    pub items_rejected: u64,
    /// Received items the store parked as pending.
    pub items_pending: u64,
    /// Item bytes sent (signed item encodings; framing not counted).
    pub bytes_sent: u64,
    /// Item bytes received.
    pub bytes_received: u64,
    /// The longest time since a connected peer was last fully pulled.
    pub sync_lag: Option<Duration>,
    /// Inbound requests answered `Refused(Busy)` (over a peer's request
    /// rate, over the in-flight caps, or over its pending-queue share).
    pub refused_busy: u64,
    /// Received items not parked because their sender's share of the
    /// pending queue (or the queue's total cap) was used up.
    pub items_pending_refused: u64,
    /// Internal messages dropped because a bounded queue was full (grant and
    /// revocation forwards beyond the outbound cap; pulls and
    /// reconciliation repair them).
    pub dropped: u64,
    /// Requests sent to peers (pulls, summaries, fetches, pushes, forwards,
    /// nudges, audit queries; a retry counts again).
    pub requests_sent: u64,
    /// Requests received from peers (answered, refused or dropped).
    pub requests_received: u64,
    /// Per-patient reconciliations run with a peer (grant-triggered, asked
    /// for by a peer, after a pull that left items pending, on demand).
    pub reconciliations: u64,
    /// Of those, the ones that failed (peer unreachable, refused, store
    /// error); the next trigger repairs.
    pub reconciliations_failed: u64,
    /// Received consent items of patients this node holds nothing of,
    /// refused over the node's caps (docs/protocol.md §10a).
    pub items_unwanted: u64,
    /// Dials a consent flow skipped because the source of its input (or
    /// all sources together) used up the dial budget (§10a).
    pub dials_limited: u64,
    /// Consent items owed to peers that have not answered yet (durable
    /// delivery, docs/protocol.md §8a).
    pub outbox: u64,
}

/// A cheap, cloneable handle on one node's sync actor. The actor stops when
/// [`SyncHandle::shutdown`] is called or when every handle is dropped.
#[derive(Clone, Debug)]
pub struct SyncHandle {
    tx: mpsc::Sender<actor::Command>,
    local_peer_id: PeerId,
}

impl SyncHandle {
    /// Builds the swarm with `identity` (the node's ed25519 key; a patient's
    /// key for the patient CLI) as its libp2p identity, starts listening on
    /// `config.listen` (returns once every listener has an address), dials
    /// the static peers and spawns the actor on the current tokio runtime.
    ///
    /// # Errors
    /// [`Error::Transport`] when a listener cannot start,
    /// [`Error::MissingPeerId`] for a static peer without `/p2p/`.
    pub async fn spawn<B: Backend>(config: Config, identity: &SecretIdentity, backend: Arc<B>) -> Result<Self> {
        let (tx, local_peer_id, _metrics) = actor::spawn(config, identity, backend).await?;
        Ok(Self { tx, local_peer_id })
    }

    /// This node's PeerId.
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> actor::Command) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// The addresses the node listens on, each ending in `/p2p/<PeerId>`.
    ///
    /// # Errors
    /// [`Error::Stopped`].
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>> {
        self.ask(actor::Command::ListenAddrs).await
    }

    /// Dials a full multiaddr (ending in `/p2p/<PeerId>`) and waits until the
    /// connection is up.
    ///
    /// # Errors
    /// [`Error::MissingPeerId`], [`Error::Dial`], [`Error::Request`] when the
    /// connection fails, [`Error::Stopped`].
    pub async fn dial(&self, addr: Multiaddr) -> Result<PeerId> {
        self.ask(|reply| actor::Command::Dial { addr, reply }).await?
    }

    /// Connects to a PeerId without an address: addresses this node already
    /// knows (identify, earlier dials, grants' address hints), else a
    /// Kademlia lookup among the peers it knows. Waits until connected.
    ///
    /// # Errors
    /// [`Error::Request`] when nobody knows the peer or dialing fails,
    /// [`Error::Stopped`].
    pub async fn dial_peer(&self, peer: PeerId) -> Result<PeerId> {
        self.ask(|reply| actor::Command::Ask(actor::Ask::DialPeer { peer, reply }))
            .await?
    }

    /// The peers with an open connection.
    ///
    /// # Errors
    /// [`Error::Stopped`].
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>> {
        self.ask(|reply| actor::Command::Ask(actor::Ask::ConnectedPeers(reply)))
            .await
    }

    /// Every established connection (a peer may have two: a relayed one
    /// and the direct one hole punching opened).
    ///
    /// # Errors
    /// [`Error::Stopped`].
    pub async fn connections(&self) -> Result<Vec<Connection>> {
        self.ask(actor::Command::Connections).await
    }

    /// Pulls from `peer` to the end of its log now, and returns what that
    /// brought. If a pull is already running, waits for a fresh one after it.
    ///
    /// # Errors
    /// Transport failures, a refusal, a response that breaks the protocol,
    /// storage failures.
    pub async fn sync_now(&self, peer: PeerId) -> Result<SyncReport> {
        self.ask(|reply| actor::Command::Ask(actor::Ask::SyncNow { peer, reply }))
            .await?
    }

    /// Reconciles `patient` with `peer`: exchanges the envelope-id summary and
    /// fetches whatever `peer` may send that this node lacks.
    ///
    /// # Errors
    /// As [`SyncHandle::sync_now`].
    pub async fn reconcile(&self, peer: PeerId, patient: PatientId) -> Result<SyncReport> {
        self.ask(|reply| actor::Command::Reconcile { peer, patient, reply })
            .await?
    }

    /// One anti-entropy round with `peer` now (docs/protocol.md §8): every
    /// patient both may read is compared with it in one digest request, and
    /// those that differ are reconciled. The node runs one on every
    /// connection and every `Config::anti_entropy_interval` anyway.
    ///
    /// # Errors
    /// As [`SyncHandle::reconcile`]; the round stops at the first failure.
    pub async fn anti_entropy(&self, peer: PeerId) -> Result<SyncReport> {
        self.ask(|reply| actor::Command::AntiEntropy { peer, reply }).await?
    }

    /// Pushes signed items to `peer` (the patient CLI submitting a grant and
    /// key shares, or a node delivering them). `addrs` are full multiaddrs
    /// the receiver may dial to pass the items on (e.g. the grantee's); a
    /// node honours them only from the patient who signed a pushed grant.
    /// Items of the local identity's own record (the patient CLI) go as they
    /// are; any other item must pass [`may_disclose`] for `peer` (and is
    /// audited), else nothing is sent.
    ///
    /// # Errors
    /// [`Error::Withheld`] naming the first item the filter refuses;
    /// [`Error::Crypto`] for an item that does not verify; transport
    /// failures, a refusal, [`Error::Wire`] for too many items.
    pub async fn push(&self, peer: PeerId, items: Vec<Item>, addrs: Vec<Multiaddr>) -> Result<IngestReport> {
        if items.len() > wire::MAX_ITEMS_PER_MESSAGE || addrs.len() > wire::MAX_PUSH_ADDRS {
            return Err(Error::Wire {
                message: "push",
                reason: "too many items or addresses",
            });
        }
        self.ask(|reply| actor::Command::Push {
            peer,
            items,
            addrs,
            reply,
        })
        .await?
    }

    /// Checkpoints of `peer`'s audit log signed by its node key: of its
    /// head now, and of entry `anchor` as its log holds it now (to compare
    /// with a checkpoint kept from an earlier query). Each verified as
    /// signed by `peer`. Answered only to the patient, as [`Self::audit`].
    ///
    /// # Errors
    /// [`Error::Refused`]; [`Error::Wire`] for a checkpoint of another node
    /// or an anchor at another seq; transport failures (a node that
    /// predates checkpoints cannot decode the request), [`Error::Stopped`].
    pub async fn audit_checkpoints(
        &self,
        peer: PeerId,
        patient: PatientId,
        anchor: Option<u64>,
    ) -> Result<medmesh_node::AuditCheckpoints> {
        let request = wire::Request::Checkpoint { patient, anchor };
        let response = self
            .ask(|reply| actor::Command::Ask(actor::Ask::Request { peer, request, reply }))
            .await??;
        let checkpoints = match response {
            wire::Response::Checkpoint(c) => *c,
            wire::Response::Refused(code) => {
                return Err(Error::Refused {
                    peer,
                    reason: code.as_str(),
                });
            }
            other => {
                return Err(Error::UnexpectedResponse {
                    peer,
                    request: "checkpoint",
                    answer: other.name(),
                });
            }
        };
        let by_peer = |c: &medmesh_crypto::AuditCheckpoint| c.terms().node.peer_id() == peer;
        if !by_peer(&checkpoints.head)
            || !checkpoints.latest.iter().all(by_peer)
            || !checkpoints.anchor.iter().all(by_peer)
        {
            return Err(Error::Wire {
                message: "checkpoint",
                reason: "a checkpoint signed by another node",
            });
        }
        if checkpoints
            .anchor
            .as_ref()
            .is_some_and(|a| Some(a.terms().seq) != anchor)
        {
            return Err(Error::Wire {
                message: "checkpoint",
                reason: "an anchor at another entry than asked",
            });
        }
        Ok(checkpoints)
    }

    /// The audit entries about `patient` that `peer` holds (accounting of
    /// disclosures), every page of them in sequence order. `peer` answers
    /// only when this handle's identity is the patient's own key (the
    /// patient CLI); the node records the read in its audit log.
    ///
    /// # Errors
    /// [`Error::Refused`] when the node refuses (this identity is not the
    /// patient, or its store failed); [`Error::Wire`] for an answer that
    /// breaks the paging rules or runs past [`MAX_AUDIT_ENTRIES_TOTAL`];
    /// transport failures, [`Error::Stopped`].
    pub async fn audit(&self, peer: PeerId, patient: PatientId) -> Result<Vec<AuditEntry>> {
        let limit = wire::MAX_AUDIT_ENTRIES_PER_MESSAGE as u32;
        let mut all: Vec<AuditEntry> = Vec::new();
        let mut after = 0u64;
        loop {
            let request = wire::Request::Audit { patient, after, limit };
            let response = self
                .ask(|reply| actor::Command::Ask(actor::Ask::Request { peer, request, reply }))
                .await??;
            let (entries, more) = match response {
                wire::Response::Audit { entries, more } => (entries, more),
                wire::Response::Refused(code) => {
                    return Err(Error::Refused {
                        peer,
                        reason: code.as_str(),
                    });
                }
                other => {
                    return Err(Error::UnexpectedResponse {
                        peer,
                        request: "audit",
                        answer: other.name(),
                    });
                }
            };
            if entries.len() > limit as usize || entries.first().is_some_and(|e| e.seq <= after) {
                return Err(Error::Wire {
                    message: "audit",
                    reason: "entries outside the page asked for",
                });
            }
            if all.len() + entries.len() > MAX_AUDIT_ENTRIES_TOTAL {
                return Err(Error::Wire {
                    message: "audit",
                    reason: "more entries than one query accepts",
                });
            }
            let Some(last) = entries.last().map(|e| e.seq) else {
                // No progress: done, whatever `more` claims.
                return Ok(all);
            };
            all.extend(entries);
            after = last;
            if !more {
                return Ok(all);
            }
        }
    }

    /// What `peer` still owes others of `patient`'s consent items (issue
    /// 16: delivery per target). Answered only when this handle's identity
    /// is the patient's own key (the patient CLI).
    ///
    /// # Errors
    /// [`Error::Refused`] (this identity is not the patient, or the node's
    /// store failed); transport failures — a node that predates the request
    /// cannot decode it and drops the stream; [`Error::Stopped`].
    pub async fn outbox_of(&self, peer: PeerId, patient: PatientId) -> Result<wire::OutboxReport> {
        let request = wire::Request::Outbox { patient };
        let response = self
            .ask(|reply| actor::Command::Ask(actor::Ask::Request { peer, request, reply }))
            .await??;
        match response {
            wire::Response::Outbox(report) => Ok(*report),
            wire::Response::Refused(code) => Err(Error::Refused {
                peer,
                reason: code.as_str(),
            }),
            other => Err(Error::UnexpectedResponse {
                peer,
                request: "outbox",
                answer: other.name(),
            }),
        }
    }

    /// Asks node `peer` for the signed address records it keeps of the
    /// practices `patient`'s grants name (issue 16: the patient's address
    /// book). Answered only to the patient's own key. Records whose
    /// signature does not verify are dropped.
    ///
    /// # Errors
    /// [`Error::Refused`]; transport failures (a node that predates the
    /// request drops the stream); [`Error::Stopped`].
    pub async fn practices_of(&self, peer: PeerId, patient: PatientId) -> Result<Vec<AddressRecord>> {
        let request = wire::Request::Practices { patient };
        let response = self
            .ask(|reply| actor::Command::Ask(actor::Ask::Request { peer, request, reply }))
            .await??;
        match response {
            // Each record stands on its own signature: one that does not
            // verify is dropped, whoever relayed it.
            wire::Response::Practices { records } => Ok(records
                .iter()
                .filter_map(|bytes| AddressRecord::verify(bytes))
                .collect()),
            wire::Response::Refused(code) => Err(Error::Refused {
                peer,
                reason: code.as_str(),
            }),
            other => Err(Error::UnexpectedResponse {
                peer,
                request: "practices",
                answer: other.name(),
            }),
        }
    }

    /// What this node owes others of `patient`'s consent items (the
    /// report [`Self::outbox_of`] gets from a node), for its operator.
    ///
    /// # Errors
    /// Storage failures, [`Error::Stopped`].
    pub async fn outbox(&self, patient: PatientId) -> Result<wire::OutboxReport> {
        self.ask(|reply| actor::Command::Outbox { patient, reply }).await?
    }

    /// Counters and peer count.
    ///
    /// # Errors
    /// [`Error::Stopped`].
    pub async fn status(&self) -> Result<Status> {
        self.ask(actor::Command::Status).await
    }

    /// Stops the actor when `signal` completes (the CLI's one shutdown
    /// signal, shared with the gateway). Holds no handle meanwhile, so the
    /// actor still stops early if every handle is dropped.
    pub fn shutdown_on(&self, signal: impl Future<Output = ()> + Send + 'static) {
        let weak = self.tx.downgrade();
        tokio::spawn(async move {
            signal.await;
            if let Some(tx) = weak.upgrade() {
                let (reply, _done) = oneshot::channel();
                let _ = tx.send(actor::Command::Shutdown(reply)).await;
            }
        });
    }

    /// Stops the actor (closing listeners and connections) and waits for it.
    /// Other handles then get [`Error::Stopped`].
    ///
    /// # Errors
    /// [`Error::Stopped`] if it had already stopped.
    pub async fn shutdown(&self) -> Result<()> {
        self.ask(actor::Command::Shutdown).await
    }
}
