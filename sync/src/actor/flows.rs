//! Consent flows (DESIGN §5): what follows a stored item, and pushes through the consent filter.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use medmesh_crypto::{Collection, Grant, GrantId, PatientId, PracticeId, Principal, Timestamp, now};
use tracing::debug;

use crate::actor::ctx::Ctx;
use crate::actor::messages::Internal;
use crate::actor::outbox::owe;
use crate::addressed_peer as peer_of;
use crate::backend::{
    Backend, ConsentView, DisclosureRecord, IngestReport, Item, ItemId, ItemKind, ItemMeta, ItemStored,
};
use crate::client::unexpected;
use crate::serve::Served;
use crate::wire::{Request, Response};
use crate::{Error, Result};
use medmesh_node::policy::{Requester, may_disclose};

pub(crate) async fn item_at<B: Backend>(ctx: &Ctx<B>, seq: u64) -> Result<Option<Item>> {
    let mut items = ctx.backend.items_after(seq.saturating_sub(1), 1).await?;
    Ok(match items.pop() {
        Some(s) if s.seq == seq => Some(s.item),
        _ => None,
    })
}

/// Sends `item` to `peer` if — and only if — the consent filter lets it go
/// there; audits it first.
pub(crate) async fn push_filtered<B: Backend>(
    ctx: &Ctx<B>,
    view: &ConsentView,
    peer: PeerId,
    item: &Item,
    event: &ItemStored,
) -> Result<()> {
    let meta = &event.meta;
    let requester = Requester::from_peer_id(&peer)?;
    let decision = may_disclose(meta, &requester, view, now());
    if !decision.allowed() {
        debug!(%peer, item = %meta.id, ?decision, "not forwarding");
        return Ok(());
    }
    ctx.backend
        .record_disclosure(&DisclosureRecord {
            peer,
            patient: meta.patient,
            grant: decision.grant(),
            items: vec![meta.id],
        })
        .await?;
    // Owed first, whether or not it goes now: a contact the dial budget
    // skips is tried again by redelivery (at its own bounded rate).
    let addrs = ctx.known_addrs(peer).await?;
    owe(ctx, peer, meta, addrs)?;
    if !ctx.may_dial(peer, event.from).await? {
        return Ok(());
    }
    ctx.metrics.sent(Served {
        items: 1,
        bytes: item.bytes.len() as u64,
    });
    ctx.send(Internal::Forward {
        peer,
        id: meta.id,
        item: item.clone(),
    })
    .await
}

/// A push asked for through the handle. Items of the local identity's own
/// record (the patient CLI submitting) go as they are; every other item must
/// pass the consent filter for `peer` and is audited, so no path around
/// [`may_disclose`] exists.
pub(crate) async fn push_task<B: Backend>(
    ctx: &Ctx<B>,
    me: PeerId,
    peer: PeerId,
    items: Vec<Item>,
    addrs: Vec<Multiaddr>,
) -> Result<IngestReport> {
    let local = Requester::from_peer_id(&me)?;
    let requester = Requester::from_peer_id(&peer)?;
    let t = now();
    let mut audit: BTreeMap<(PatientId, Option<GrantId>), Vec<ItemId>> = BTreeMap::new();
    for item in &items {
        let meta = ItemMeta::describe(item)?;
        if local.is_patient(&meta.patient) {
            continue;
        }
        let view = ctx.backend.consent(&meta.patient)?;
        let decision = may_disclose(&meta, &requester, &view, t);
        if !decision.allowed() {
            return Err(Error::Withheld { peer, item: meta.id });
        }
        audit.entry((meta.patient, decision.grant())).or_default().push(meta.id);
    }
    for ((patient, grant), ids) in audit {
        ctx.backend
            .record_disclosure(&DisclosureRecord {
                peer,
                patient,
                grant,
                items: ids,
            })
            .await?;
    }
    ctx.metrics.sent(Served {
        items: items.len() as u64,
        bytes: items.iter().map(|i| i.bytes.len() as u64).sum(),
    });
    // Reach the peer first: by an address this node knows, else by a
    // Kademlia lookup (a grantee named only by its PeerId).
    if let Err(e) = ctx.dial_peer(peer).await {
        debug!(%peer, cause = %e, "could not connect before pushing");
    }
    match ctx.request(peer, Request::Push { items, addrs }).await? {
        Response::Pushed {
            accepted,
            duplicates,
            pending,
            rejected,
        } => Ok(IngestReport {
            accepted,
            duplicates,
            pending,
            rejected,
            ..IngestReport::default()
        }),
        other => Err(unexpected(peer, "push", &other)),
    }
}

/// What follows a stored item (DESIGN §5 consent flows, §6 nudges):
/// - an envelope: nudge the connected peers that may receive it;
/// - a grant for another practice: push it to the grantee (dialing the
///   addresses known for it) and forward it to every other holder of a grant
///   from the patient;
/// - a grant for this node: reconcile the patient with the node it came
///   from, the nodes in its address hints and the connected peers a grant
///   from the patient names ([`reconcile_targets`]), so history written
///   before the grant arrives;
/// - a revocation: forward it to every holder of a grant from the patient;
/// - a key share for another practice: push it to its recipient.
pub(crate) async fn consent_flow<B: Backend>(
    ctx: &Ctx<B>,
    me: PeerId,
    connected: Vec<PeerId>,
    event: ItemStored,
) -> Result<()> {
    let meta = &event.meta;
    // A patient this node holds nothing of (no envelope, no grant to it)
    // is none of its business: a self-made identity's grants would make it
    // dial whatever their hints name. Its envelopes go only to connected
    // peers (nudges) and need no such gate.
    if meta.kind != ItemKind::Envelope && !ctx.backend.relates_to(&meta.patient, &me)? {
        debug!(
            kind = meta.kind.as_str(),
            "consent item of a patient without a relationship here; not followed"
        );
        return Ok(());
    }
    let view = ctx.backend.consent(&meta.patient)?;
    let holders: Vec<PeerId> = view
        .grants
        .iter()
        .map(|g| g.terms().grantee.peer_id())
        .filter(|p| *p != me && Some(*p) != event.from)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    match meta.kind {
        ItemKind::Envelope => {
            let t = now();
            // Only the patient and the grantees of its grants may receive
            // an envelope: PeerIds are compared first, and only those peers
            // decoded (a point decompression each) for the filter. With
            // Kademlia a node is connected to most of the network, and
            // decoding every connected peer for every stored envelope was
            // the largest CPU cost of the 100-node simulation.
            let patient = PracticeId::from_bytes(*meta.patient.as_bytes())
                .map(|p| p.peer_id())
                .ok();
            let candidates = connected
                .into_iter()
                .filter(|p| Some(*p) != event.from && (holders.contains(p) || Some(*p) == patient));
            for peer in candidates {
                if Requester::from_peer_id(&peer).is_ok_and(|r| may_disclose(meta, &r, &view, t).allowed()) {
                    ctx.send(Internal::Nudge { peer, seq: event.seq }).await?;
                }
            }
        }
        ItemKind::Grant => {
            let Some(item) = item_at(ctx, event.seq).await? else {
                return Ok(());
            };
            let grant = Grant::decode(&item.bytes)?;
            let grantee = grant.terms().grantee.peer_id();
            let mut hinted = HashSet::new();
            for hint in &grant.terms().address_hints {
                if let Ok(addr) = hint.parse::<Multiaddr>()
                    && let Some(peer) = peer_of(&addr)
                    && peer != me
                {
                    hinted.insert(peer);
                    ctx.send(Internal::AddAddress { peer, addr }).await?;
                }
            }
            if grantee == me {
                let patient = meta.patient;
                let from = event.from;
                let not_before = grant.terms().not_before;
                let flow = ctx.clone();
                ctx.spawn(async move {
                    let ctx = flow;
                    // A grant that starts later opens nothing yet: reconcile
                    // when it reaches not-before.
                    let wait = not_before.saturating_sub(now());
                    if wait > 0 {
                        tokio::time::sleep(Duration::from_millis(wait.saturating_add(1000))).await;
                    }
                    let Ok(connected) = ctx.connected_peers().await else {
                        return;
                    };
                    let mut targets = reconcile_targets(&ctx, &patient, connected, hinted, from);
                    targets.remove(&me);
                    // The patient's own CLI serves nothing.
                    targets.retain(|p| Requester::from_peer_id(p).is_ok_and(|r| !r.is_patient(&patient)));
                    for peer in targets {
                        if !ctx.may_dial(peer, from).await.unwrap_or(false) {
                            continue;
                        }
                        let task = ctx.clone();
                        let spawned = ctx.spawn(async move {
                            let ctx = task;
                            // Pull first (joining a pull under way): what the
                            // peer discloses now comes that way, transfers
                            // included, and the summary then lists only
                            // collections not in step.
                            if let Err(e) = ctx.sync_now(peer).await {
                                debug!(%peer, cause = %e, "pull before reconciling failed");
                            }
                            match ctx.client.reconcile(peer, patient).await {
                                Ok(r) => debug!(%peer, fetched = r.received, "reconciled after grant"),
                                Err(e) => debug!(%peer, cause = %e, "reconcile after grant failed"),
                            }
                        });
                        if spawned.await.is_err() {
                            return;
                        }
                    }
                })
                .await?;
            } else {
                if Some(grantee) != event.from {
                    push_filtered(ctx, &view, grantee, &item, &event).await?;
                }
                let mut holds_covered = false;
                for collection in Collection::ALL.into_iter().filter(|c| grant.covers(*c)) {
                    if !ctx.backend.envelope_ids(&meta.patient, collection)?.is_empty() {
                        holds_covered = true;
                        break;
                    }
                }
                if holds_covered && Requester::from_peer_id(&grantee).is_ok() {
                    ask_to_reconcile(ctx, grantee, meta.patient, grant.terms().not_before, event.from).await?;
                }
            }
            for peer in holders.into_iter().filter(|p| *p != grantee) {
                push_filtered(ctx, &view, peer, &item, &event).await?;
            }
        }
        ItemKind::Revocation => {
            let Some(item) = item_at(ctx, event.seq).await? else {
                return Ok(());
            };
            for peer in holders {
                push_filtered(ctx, &view, peer, &item, &event).await?;
            }
        }
        ItemKind::KeyShare => {
            if let Some(Principal::Practice(recipient)) = meta.recipient() {
                let peer = recipient.peer_id();
                if peer != me
                    && Some(peer) != event.from
                    && let Some(item) = item_at(ctx, event.seq).await?
                {
                    push_filtered(ctx, &view, peer, &item, &event).await?;
                }
            }
        }
    }
    Ok(())
}

/// Whom a node reconciles `patient` with once its own grant opens: the
/// node the grant came from, the nodes in its address hints (where the
/// patient's other grants were submitted), and the connected peers a grant
/// from the patient names — the practices that can hold the patient's
/// history. Any other connected peer holds none of it: with Kademlia most
/// of the network is connected, and reconciling with all of it made every
/// peer hold a cursor here, so every pull tick pulled the whole network
/// (docs/decisions.md, "Kademlia"). A holder this node does not know of yet
/// learns the grant and asks for the reconciliation itself
/// ([`ask_to_reconcile`]).
pub(crate) fn reconcile_targets<B: Backend>(
    ctx: &Ctx<B>,
    patient: &PatientId,
    connected: Vec<PeerId>,
    hinted: HashSet<PeerId>,
    from: Option<PeerId>,
) -> HashSet<PeerId> {
    let holders: HashSet<PeerId> = ctx
        .backend
        .consent(patient)
        .map(|view| view.grants.iter().map(|g| g.terms().grantee.peer_id()).collect())
        .unwrap_or_default();
    connected
        .into_iter()
        .filter(|p| holders.contains(p))
        .chain(hinted)
        .chain(from)
        .collect()
}

/// Tells `grantee` that its grant from `patient` opened this node's
/// envelopes to it, once the grant reaches not-before (DESIGN §6: a filter
/// change triggers reconciliation). Without it a grantee that reconciled
/// before this node stored its grant — the grant travels here from another
/// holder — would wait for a later change that may never come.
pub(crate) async fn ask_to_reconcile<B: Backend>(
    ctx: &Ctx<B>,
    grantee: PeerId,
    patient: PatientId,
    not_before: Timestamp,
    source: Option<PeerId>,
) -> Result<()> {
    let task = ctx.clone();
    ctx.spawn(async move {
        let ctx = task;
        let wait = not_before.saturating_sub(now());
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait.saturating_add(1000))).await;
        }
        if !ctx.may_dial(grantee, source).await.unwrap_or(false) {
            return;
        }
        if let Err(e) = ctx.dial_peer(grantee).await {
            debug!(peer = %grantee, cause = %e, "could not connect to ask for a reconciliation");
        }
        match ctx.request(grantee, Request::Reconcile { patient }).await {
            Ok(Response::Ack) => {}
            Ok(other) => debug!(peer = %grantee, answer = other.name(), "reconcile ask not acknowledged"),
            Err(e) => debug!(peer = %grantee, cause = %e, "reconcile ask failed"),
        }
    })
    .await
}
