//! The serving side without a network: one request answered exactly as a
//! running node answers it (the same page building, summaries and fetches
//! through [`crate::may_disclose`], the same audit entries written before
//! the answer), at a clock the caller chooses. For tests that play the
//! network themselves — deliveries reordered, duplicated or dropped on
//! purpose — and for tools that inspect what a store would disclose.

use libp2p::PeerId;
use medmesh_crypto::Timestamp;

use crate::backend::Backend;
use crate::serve;
use crate::wire::{RefusalCode, Request, Response};
use medmesh_node::policy::Requester;

/// Answers `request` from `peer` (as its Noise handshake would have proven
/// it) with `backend`'s store at time `now`: Pull, Summary, Fetch, Snapshot
/// Audit, Checkpoint and Outbox as the node's actor serves them, disclosures audited first. Nudges and
/// pushes change the caller's own state (a pull to start, items to ingest
/// with [`Backend::ingest`]), so they are answered `Refused(Internal)` here,
/// as are Digests (their answer depends on the serving node's own identity,
/// which a backend does not know); a `peer` whose PeerId is not an ed25519
/// key gets `Refused(BadIdentity)`.
pub async fn serve_request<B: Backend>(backend: &B, peer: PeerId, request: Request, now: Timestamp) -> Response {
    let Ok(requester) = Requester::from_peer_id(&peer) else {
        return Response::Refused(RefusalCode::BadIdentity);
    };
    let (response, _served) = match request {
        Request::Pull {
            cursor,
            limit,
            snapshots,
        } => serve::pull(backend, requester, cursor, limit, snapshots.as_deref(), now).await,
        Request::Summary { patient, digests } => serve::summary(backend, requester, patient, &digests, now).await,
        Request::Snapshot { patient, collection } => {
            serve::snapshot(backend, requester, patient, collection, now).await
        }
        Request::Fetch { ids } => serve::fetch(backend, requester, &ids, now).await,
        Request::Audit { patient, after, limit } => serve::audit(backend, requester, patient, after, limit).await,
        Request::Checkpoint { patient, anchor } => serve::checkpoint(backend, requester, patient, anchor).await,
        // Nothing here follows stored items: nothing is settling.
        Request::Outbox { patient } => serve::outbox(backend, requester, patient, false),
        _ => return Response::Refused(RefusalCode::Internal),
    };
    response
}
