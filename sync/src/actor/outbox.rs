//! Durable delivery of consent items (docs/protocol.md §8a): debts owed, rescheduled, redelivered.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use medmesh_crypto::now;
use tracing::{debug, info, warn};

use crate::actor::Actor;
use crate::actor::ctx::Ctx;
use crate::actor::messages::Internal;
use crate::backend::{Backend, ItemId, ItemMeta, Owed};
use crate::metrics::Metrics;
use crate::wire::{MAX_ITEMS_PER_MESSAGE, Request, Response};
use crate::{Error, Result};
use medmesh_node::policy::{Requester, may_disclose};

/// How often the outbox is looked at for debts due.
pub(crate) const REDELIVERY_TICK: Duration = Duration::from_secs(1);

/// First try of a redelivery after a failure, doubled per failure up to
/// `Config::redelivery_max_backoff`.
pub(crate) const REDELIVERY_FIRST_BACKOFF: Duration = Duration::from_secs(2);

/// A debt older than this is given up (the peer is gone for good); the
/// patient's next grant or revocation, pulls and reconciliation remain.
pub(crate) const OUTBOX_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Most debts kept; beyond, new ones are not recorded (forwarded once, as
/// before the outbox) and counted as dropped.
pub(crate) const OUTBOX_MAX: usize = 65_536;

/// Most debts kept for one patient: a real patient's grants name a handful
/// of practices; a self-made one's must not fill the outbox.
pub(crate) const OUTBOX_MAX_PER_PATIENT: usize = 256;

/// Peers not connected that one redelivery round (each second) dials: a
/// debt names whatever PeerId a patient's grant names, so redelivery must
/// not make the node dial on request at any rate (the ones left wait for
/// the next round; fewest failed tries go first).
pub(crate) const REDELIVERY_DIALS_PER_ROUND: usize = 4;

/// Records that `meta`'s item is owed to `peer` until it answers a push of
/// it, durably, before the first try.
pub(crate) fn owe<B: Backend>(ctx: &Ctx<B>, peer: PeerId, meta: &ItemMeta, addrs: Vec<Multiaddr>) -> Result<()> {
    let owed = ctx.backend.outbox()?;
    if owed.iter().any(|o| o.peer == peer && o.item == meta.id) {
        return Ok(());
    }
    if owed.len() >= OUTBOX_MAX || owed.iter().filter(|o| o.patient == meta.patient).count() >= OUTBOX_MAX_PER_PATIENT {
        Metrics::add(&ctx.metrics.dropped, 1);
        warn!(%peer, "outbox full; this item is forwarded once, not kept for redelivery");
        return Ok(());
    }
    let t = now();
    ctx.backend.put_outbox(&[Owed {
        peer,
        item: meta.id,
        patient: meta.patient,
        since: t,
        attempts: 0,
        next_at: t.saturating_add(millis(REDELIVERY_FIRST_BACKOFF)),
        last_error: String::new(),
        addrs,
    }])
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Counts a failed try of these debts and schedules the next one.
pub(crate) fn reschedule<B: Backend>(
    ctx: &Ctx<B>,
    debts: &[(PeerId, ItemId)],
    error: &str,
    max_backoff: Duration,
) -> Result<()> {
    let t = now();
    let updated: Vec<Owed> = ctx
        .backend
        .outbox()?
        .into_iter()
        .filter(|o| debts.contains(&(o.peer, o.item)))
        .map(|mut o| {
            o.attempts = o.attempts.saturating_add(1);
            let wait = REDELIVERY_FIRST_BACKOFF
                .saturating_mul(
                    1u32.checked_shl(o.attempts.saturating_sub(1).min(20))
                        .unwrap_or(u32::MAX),
                )
                .min(max_backoff);
            o.next_at = t.saturating_add(millis(wait));
            o.last_error = error.chars().take(200).collect();
            o
        })
        .collect();
    ctx.backend.put_outbox(&updated)
}

/// One redelivery round: every debt due (or every debt of `only`), grouped
/// by peer, each peer's sent in one push after the consent filter decides
/// again (what it would not send now is given up, as are debts older than
/// [`OUTBOX_MAX_AGE`]). A push answered settles what it carried.
pub(crate) async fn redeliver<B: Backend>(ctx: &Ctx<B>, only: Option<PeerId>, max_backoff: Duration) -> Result<()> {
    let t = now();
    let mut due: BTreeMap<PeerId, Vec<Owed>> = BTreeMap::new();
    let mut given_up = Vec::new();
    for o in ctx.backend.outbox()? {
        if t.saturating_sub(o.since) > millis(OUTBOX_MAX_AGE) {
            warn!(peer = %o.peer, attempts = o.attempts, "an item owed for 30 days is given up");
            given_up.push((o.peer, o.item));
        } else if only.map_or(o.next_at <= t, |p| p == o.peer) {
            due.entry(o.peer).or_default().push(o);
        }
    }
    let connected: HashSet<PeerId> = ctx.connected_peers().await?.into_iter().collect();
    let mut due: Vec<(PeerId, Vec<Owed>)> = due.into_iter().collect();
    due.sort_by_key(|(peer, debts)| {
        (
            !connected.contains(peer),
            debts.iter().map(|o| o.attempts).min().unwrap_or(0),
        )
    });
    let mut dials = 0;
    for (peer, debts) in due {
        if !connected.contains(&peer) {
            if dials >= REDELIVERY_DIALS_PER_ROUND {
                continue;
            }
            dials += 1;
        }
        let Ok(requester) = Requester::from_peer_id(&peer) else {
            given_up.extend(debts.iter().map(|o| (o.peer, o.item)));
            continue;
        };
        let mut items = Vec::new();
        let mut carried = Vec::new();
        for o in debts.iter().take(MAX_ITEMS_PER_MESSAGE) {
            let Some(stored) = ctx.backend.item(&o.item).await? else {
                given_up.push((peer, o.item));
                continue;
            };
            let view = ctx.backend.consent(&stored.meta.patient)?;
            if may_disclose(&stored.meta, &requester, &view, t).allowed() {
                carried.push((peer, o.item));
                items.push(stored.item);
            } else {
                given_up.push((peer, o.item));
            }
        }
        if items.is_empty() {
            continue;
        }
        // The addresses known when the debt arose (a restart forgets the
        // swarm's): the peer may be back where it was.
        let mut addrs: Vec<&Multiaddr> = debts.iter().flat_map(|o| &o.addrs).collect();
        addrs.sort();
        addrs.dedup();
        for addr in addrs {
            ctx.send(Internal::AddAddress {
                peer,
                addr: addr.clone(),
            })
            .await?;
        }
        // Why the dial failed says more than the push failing after it.
        let dial_failed = match ctx.dial_peer(peer).await {
            Err(Error::Request { reason, .. }) => Some(reason),
            Err(e) => Some(e.to_string()),
            Ok(_) => None,
        };
        if let Some(cause) = &dial_failed {
            debug!(%peer, %cause, "could not connect to redeliver");
        }
        let outcome = match ctx
            .request(
                peer,
                Request::Push {
                    items,
                    addrs: Vec::new(),
                },
            )
            .await
        {
            Ok(Response::Pushed { .. }) => Ok(()),
            Ok(other) => Err(format!("answered {}", other.name())),
            Err(e) => Err(dial_failed.unwrap_or_else(|| e.to_string())),
        };
        match outcome {
            Ok(()) => {
                info!(%peer, items = carried.len(), "owed consent items delivered");
                ctx.backend.remove_outbox(&carried)?;
            }
            Err(error) => {
                debug!(%peer, cause = %error, "redelivery failed; tried again later");
                reschedule(ctx, &carried, &error, max_backoff)?;
            }
        }
    }
    if !given_up.is_empty() {
        ctx.backend.remove_outbox(&given_up)?;
    }
    Ok(())
}

impl<B: Backend> Actor<B> {
    /// A forward's outcome: the debt is settled, or its next try scheduled.
    pub(crate) fn settle_forward(&mut self, peer: PeerId, item: ItemId, outcome: std::result::Result<(), String>) {
        let ctx = self.ctx.clone();
        let max_backoff = self.config.redelivery_max_backoff;
        self.tasks.spawn_blocking(move || {
            let result = match outcome {
                Ok(()) => ctx.backend.remove_outbox(&[(peer, item)]),
                Err(error) => reschedule(&ctx, &[(peer, item)], &error, max_backoff),
            };
            if let Err(e) = result {
                warn!(%peer, cause = %e, "updating the outbox failed");
            }
        });
    }

    /// Delivers what the outbox owes: the debts due now, or every debt of
    /// `peer` (it has just connected). One round at a time for the tick.
    pub(crate) fn redeliver(&mut self, peer: Option<PeerId>) {
        if peer.is_none() && self.ctx.redelivering.swap(true, Ordering::AcqRel) {
            return;
        }
        let ctx = self.ctx.clone();
        let max_backoff = self.config.redelivery_max_backoff;
        self.spawn_task(async move {
            if let Err(e) = redeliver(&ctx, peer, max_backoff).await {
                warn!(cause = %e, "redelivering the outbox failed");
            }
            if peer.is_none() {
                ctx.redelivering.store(false, Ordering::Release);
            }
        });
    }
}
