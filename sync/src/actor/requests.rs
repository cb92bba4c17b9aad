//! `/medmesh/sync/1` request-response events: inbound requests admitted and served, answers routed back.

use std::sync::Arc;
use std::time::Instant;

use libp2p::request_response::{self, ResponseChannel};
use libp2p::{Multiaddr, PeerId};
use medmesh_crypto::{Grant, PracticeId, now};
use tracing::{debug, warn};

use crate::Error;
use crate::actor::ctx::Ctx;
use crate::actor::messages::Internal;
use crate::actor::rates;
use crate::actor::{Actor, Outbound};
use crate::addressed_peer as peer_of;
use crate::backend::{Backend, Item, ItemKind};
use crate::metrics::Metrics;
use crate::serve::{self, Served};
use crate::wire::{RefusalCode, Request, Response};
use medmesh_crypto::PatientId;
use medmesh_node::policy::Requester;
use medmesh_node::rate::Bucket;
use std::sync::PoisonError;

/// Address suggestions in a push are honoured only from a patient pushing
/// their own grant (the CLI passing the grantee's address) who has a
/// relationship with this node (envelopes held, or a grant to it held or in
/// this push: [`Backend::relates_to`]), and only full `/p2p/` multiaddrs.
pub(crate) fn adoptable_addrs<B: Backend>(
    backend: &B,
    me: PeerId,
    requester: &Requester,
    items: &[Item],
    addrs: Vec<Multiaddr>,
) -> Vec<(PeerId, Multiaddr)> {
    if addrs.is_empty() {
        return Vec::new();
    }
    let grants: Vec<Grant> = items
        .iter()
        .filter(|i| i.kind == ItemKind::Grant)
        .filter_map(|i| Grant::decode(&i.bytes).ok())
        .filter(|g| requester.is_patient(&g.terms().patient))
        .collect();
    let Some(patient) = grants.first().map(|g| g.terms().patient) else {
        return Vec::new();
    };
    let related =
        grants.iter().any(|g| g.terms().grantee.peer_id() == me) || backend.relates_to(&patient, &me).unwrap_or(false);
    if !related {
        return Vec::new();
    }
    addrs.into_iter().filter_map(|a| peer_of(&a).map(|p| (p, a))).collect()
}

impl<B: Backend> Actor<B> {
    pub(crate) fn on_sync_event(&mut self, event: request_response::Event<Request, Response>) {
        use request_response::{Event, Message};
        match event {
            Event::Message {
                peer,
                message: Message::Request { request, channel, .. },
                ..
            } => self.on_request(peer, request, channel),
            Event::Message {
                peer,
                message: Message::Response { request_id, response },
                ..
            } => match self.outbound.remove(&request_id) {
                Some(Outbound::Reply(reply)) => {
                    let _ = reply.send(Ok(response));
                }
                Some(Outbound::Nudge(p)) => self.nudge_done(p),
                Some(Outbound::Forward(p, item)) => {
                    debug!(peer = %p, answer = response.name(), "push delivered");
                    let outcome = match response {
                        Response::Pushed { .. } => Ok(()),
                        other => Err(format!("answered {}", other.name())),
                    };
                    self.settle_forward(p, item, outcome);
                }
                None => debug!(%peer, "response to an unknown request"),
            },
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => match self.outbound.remove(&request_id) {
                Some(Outbound::Reply(reply)) => {
                    let err = match error {
                        request_response::OutboundFailure::ConnectionClosed
                        | request_response::OutboundFailure::Io(_) => Error::ConnectionLost { peer },
                        other => Error::Request {
                            peer,
                            reason: other.to_string(),
                        },
                    };
                    let _ = reply.send(Err(err));
                }
                Some(Outbound::Nudge(p)) => {
                    self.nudging.remove(&p);
                }
                Some(Outbound::Forward(p, item)) => {
                    warn!(peer = %p, cause = %error, "push failed; kept in the outbox");
                    let reason = match error {
                        request_response::OutboundFailure::DialFailure => self.dial_errors.get(&p).cloned(),
                        _ => None,
                    };
                    self.settle_forward(p, item, Err(reason.unwrap_or_else(|| error.to_string())));
                }
                None => {}
            },
            Event::InboundFailure { peer, error, .. } => {
                // Oversize or malformed frames land here: nothing was decoded,
                // nothing is answered, the connection lives on.
                warn!(%peer, cause = %error, "inbound request failed");
            }
            Event::ResponseSent { .. } => {}
        }
    }

    pub(crate) fn on_request(&mut self, peer: PeerId, request: Request, channel: ResponseChannel<Response>) {
        Metrics::add(&self.ctx.metrics.requests_received, 1);
        let Ok(requester) = Requester::from_peer_id(&peer) else {
            let _ = self
                .swarm
                .behaviour_mut()
                .sync
                .send_response(channel, Response::Refused(RefusalCode::BadIdentity));
            return;
        };
        debug!(%peer, request = request.name(), "request");
        if !self.admit(peer, &request) {
            Metrics::add(&self.ctx.metrics.refused_busy, 1);
            debug!(%peer, request = request.name(), "over a flood limit; refused busy");
            let _ = self
                .swarm
                .behaviour_mut()
                .sync
                .send_response(channel, Response::Refused(RefusalCode::Busy));
            return;
        }
        match request {
            Request::Nudge { instance, seq } => {
                let _ = self.swarm.behaviour_mut().sync.send_response(channel, Response::Ack);
                let behind = match self.backend().cursor(&peer) {
                    Ok(Some(c)) => c.instance != instance || c.seq < seq,
                    _ => true,
                };
                if behind {
                    self.start_pull(peer, None);
                }
            }
            Request::Reconcile { patient } => {
                let _ = self.swarm.behaviour_mut().sync.send_response(channel, Response::Ack);
                let ctx = self.ctx.clone();
                let me = self.me;
                self.spawn_task(async move { asked_reconcile(&ctx, me, peer, patient).await });
            }
            Request::Pull {
                cursor,
                limit,
                snapshots,
            } => {
                self.spawn_serve(peer, channel, move |b| async move {
                    serve::pull(&*b, requester, cursor, limit, snapshots.as_deref(), now()).await
                });
            }
            Request::Snapshot { patient, collection } => {
                self.spawn_serve(peer, channel, move |b| async move {
                    serve::snapshot(&*b, requester, patient, collection, now()).await
                });
            }
            Request::Summary { patient, digests } => {
                self.spawn_serve(peer, channel, move |b| async move {
                    serve::summary(&*b, requester, patient, &digests, now()).await
                });
            }
            Request::Fetch { ids } => {
                self.spawn_serve(peer, channel, move |b| async move {
                    serve::fetch(&*b, requester, &ids, now()).await
                });
            }
            Request::Digests { patients } => match PracticeId::from_peer_id(&self.me) {
                Ok(me) => self.spawn_serve(peer, channel, move |b| async move {
                    serve::digests(&*b, requester, me, &patients, now()).await
                }),
                Err(_) => {
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .sync
                        .send_response(channel, Response::Refused(RefusalCode::Internal));
                }
            },
            Request::Audit { patient, after, limit } => {
                self.spawn_serve(peer, channel, move |b| async move {
                    serve::audit(&*b, requester, patient, after, limit).await
                });
            }
            Request::Checkpoint { patient, anchor } => {
                self.spawn_serve(peer, channel, move |b| async move {
                    serve::checkpoint(&*b, requester, patient, anchor).await
                });
            }
            Request::Outbox { patient } => {
                let settling = self.settling(&patient);
                self.spawn_serve(peer, channel, move |b| async move {
                    serve::outbox(&*b, requester, patient, settling)
                });
            }
            Request::Practices { patient } => {
                self.spawn_serve(peer, channel, move |b| async move {
                    serve::practices(&*b, requester, patient)
                });
            }
            Request::Push { items, addrs } => {
                // Before ingesting: the consent flows that the stored items
                // trigger may need to dial these addresses.
                for (p, a) in adoptable_addrs(self.backend(), self.me, &requester, &items, addrs) {
                    self.note_addr(p, a);
                }
                let ctx = self.ctx.clone();
                self.spawn_task(async move {
                    let response = match ctx.ingest(peer, items).await {
                        Ok(r) if r.refused > 0 => {
                            Metrics::add(&ctx.metrics.refused_busy, 1);
                            Response::Refused(RefusalCode::Busy)
                        }
                        Ok(r) => Response::Pushed {
                            accepted: r.accepted,
                            duplicates: r.duplicates,
                            pending: r.pending,
                            rejected: r.rejected,
                        },
                        Err(e) => {
                            warn!(%peer, cause = %e, "ingesting a push failed");
                            Response::Refused(RefusalCode::Internal)
                        }
                    };
                    let served = Served::default();
                    let _ = ctx
                        .send(Internal::Respond {
                            peer,
                            channel,
                            response,
                            served,
                        })
                        .await;
                    let _ = ctx.send(Internal::Pushed { peer }).await;
                });
            }
        }
    }

    /// Flood limits on one inbound request: a token from the peer's bucket,
    /// and, for requests served in a task, room under the in-flight caps
    /// (taken here, given back by [`Self::served_one`]).
    pub(crate) fn admit(&mut self, peer: PeerId, request: &Request) -> bool {
        let limits = &self.config.limits;
        let at = Instant::now();
        let rate = rates::requests(limits);
        let bucket = self.buckets.entry(peer).or_insert_with(|| Bucket::full(rate, at));
        if !bucket.take(rate, at) {
            return false;
        }
        // Answered at once with an ack: no serving slot.
        if matches!(request, Request::Nudge { .. } | Request::Reconcile { .. }) {
            return true;
        }
        let mine = self.in_flight.get(&peer).copied().unwrap_or(0);
        if mine >= limits.max_in_flight_per_peer || self.in_flight_total >= limits.max_in_flight {
            return false;
        }
        *self.in_flight.entry(peer).or_default() += 1;
        self.in_flight_total += 1;
        true
    }

    /// One served request of `peer` is answered (or its task gave up).
    pub(crate) fn served_one(&mut self, peer: PeerId) {
        if let Some(n) = self.in_flight.get_mut(&peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.in_flight.remove(&peer);
            }
            self.in_flight_total = self.in_flight_total.saturating_sub(1);
        }
    }

    pub(crate) fn spawn_serve<F, Fut>(&mut self, peer: PeerId, channel: ResponseChannel<Response>, f: F)
    where
        F: FnOnce(Arc<B>) -> Fut + Send + 'static,
        Fut: Future<Output = (Response, Served)> + Send + 'static,
    {
        let ctx = self.ctx.clone();
        self.spawn_task(async move {
            let (response, served) = f(ctx.backend.clone()).await;
            let _ = ctx
                .send(Internal::Respond {
                    peer,
                    channel,
                    response,
                    served,
                })
                .await;
        });
    }
}

/// A reconciliation `peer` asked for ([`Request::Reconcile`]): run only when
/// this node holds a grant in force from `patient`, so the ask cannot make
/// it work for records it may not have; one round at a time per (peer,
/// patient), asks meanwhile folded into one more round.
pub(crate) async fn asked_reconcile<B: Backend>(ctx: &Ctx<B>, me: PeerId, peer: PeerId, patient: PatientId) {
    let granted = ctx.backend.consent(&patient).is_ok_and(|view| {
        let t = now();
        view.grants
            .iter()
            .any(|g| g.terms().grantee.peer_id() == me && g.in_force(t, view.is_revoked(g)))
    });
    if !granted {
        debug!(%peer, %patient, "asked to reconcile a patient without a grant in force here; ignored");
        return;
    }
    let key = (peer, patient);
    {
        let mut asked = ctx.asked_reconciles.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(again) = asked.get_mut(&key) {
            *again = true;
            return;
        }
        asked.insert(key, false);
    }
    loop {
        match ctx.client.reconcile(peer, patient).await {
            Ok(r) => debug!(%peer, fetched = r.received, "reconciled when asked"),
            Err(e) => debug!(%peer, cause = %e, "reconciling when asked failed"),
        }
        let mut asked = ctx.asked_reconciles.lock().unwrap_or_else(PoisonError::into_inner);
        match asked.get_mut(&key) {
            Some(again) if *again => *again = false,
            _ => {
                asked.remove(&key);
                return;
            }
        }
    }
}
