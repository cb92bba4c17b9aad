//! Which peers are pulled when: one pull per peer at a time, retries after failures.

use std::time::{Duration, Instant};

use futures::FutureExt as _;
use libp2p::PeerId;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::actor::Actor;
use crate::actor::messages::Internal;
use crate::backend::Backend;
use crate::{Error, Result, SyncReport};

pub(crate) struct PullSlot {
    again: bool,
    waiters: Vec<oneshot::Sender<Result<SyncReport>>>,
    report: SyncReport,
}

/// Pulls tried again after failing in a row before the node waits for the
/// next connection ([`Actor::retry_pull_later`]).
pub(crate) const PULL_RETRIES: u32 = 6;

/// The wait before the pull retry that follows `tries` failures: 1 s,
/// doubling, at most the pull interval.
pub(crate) fn pull_retry_wait(tries: u32, pull_interval: Duration) -> Duration {
    Duration::from_secs(1u64 << tries.min(16)).min(pull_interval)
}

/// Runs `step`, turning a panic inside it into [`Error::Panicked`].
pub(crate) async fn unwound<T>(what: &'static str, step: impl Future<Output = Result<T>>) -> Result<T> {
    match std::panic::AssertUnwindSafe(step).catch_unwind().await {
        Ok(result) => result,
        Err(_) => {
            warn!(task = what, "a sync task panicked; its slot is freed");
            Err(Error::Panicked(what))
        }
    }
}

pub(crate) fn echo_error(e: &Error, peer: PeerId) -> Error {
    Error::Request {
        peer,
        reason: e.to_string(),
    }
}

impl<B: Backend> Actor<B> {
    pub(crate) fn start_pull(&mut self, peer: PeerId, waiter: Option<oneshot::Sender<Result<SyncReport>>>) {
        if peer == self.me {
            if let Some(w) = waiter {
                let _ = w.send(Ok(SyncReport::default()));
            }
            return;
        }
        if let Some(slot) = self.pulls.get_mut(&peer) {
            slot.again = true;
            slot.waiters.extend(waiter);
            return;
        }
        self.pulls.insert(
            peer,
            PullSlot {
                again: false,
                waiters: waiter.into_iter().collect(),
                report: SyncReport::default(),
            },
        );
        self.spawn_pull(peer);
    }

    pub(crate) fn spawn_pull(&mut self, peer: PeerId) {
        let ctx = self.ctx.clone();
        self.spawn_task(async move {
            // A panic inside the pull still reports the pull done, else the
            // slot would stay taken and every later pull of `peer` would
            // join one that never ends.
            let result = unwound("pull", ctx.client.pull(peer)).await;
            let _ = ctx.send(Internal::PullDone { peer, result }).await;
        });
    }

    pub(crate) fn on_pull_done(&mut self, peer: PeerId, result: Result<SyncReport>) {
        let Some(slot) = self.pulls.get_mut(&peer) else {
            return;
        };
        if let Ok(r) = &result {
            slot.report.add(*r);
            self.last_synced.insert(peer, Instant::now());
            if slot.again {
                slot.again = false;
                self.spawn_pull(peer);
                return;
            }
        }
        let Some(slot) = self.pulls.remove(&peer) else {
            return;
        };
        match result {
            Ok(_) => {
                self.pull_retries.remove(&peer);
                debug!(%peer, pages = slot.report.pages, received = slot.report.received, "pull done");
                for w in slot.waiters {
                    let _ = w.send(Ok(slot.report));
                }
            }
            Err(e) => {
                warn!(%peer, cause = %e, "pull failed");
                for w in slot.waiters {
                    let _ = w.send(Err(echo_error(&e, peer)));
                }
                self.retry_pull_later(peer);
            }
        }
    }

    /// Pulls `peer` again after a backoff ([`pull_retry_wait`]), dialing it
    /// if need be: a first sync cut off with its connection, or a nudge lost
    /// with one, is otherwise left until something else connects the two
    /// (the pull tick pulls connected peers only). Given up after
    /// [`PULL_RETRIES`] failures in a row; a success starts the count again.
    pub(crate) fn retry_pull_later(&mut self, peer: PeerId) {
        let tries = self.pull_retries.entry(peer).or_default();
        if *tries >= PULL_RETRIES {
            self.pull_retries.remove(&peer);
            warn!(%peer, "pulls failed {PULL_RETRIES} times in a row; left to the next connection");
            return;
        }
        let wait = pull_retry_wait(*tries, self.config.pull_interval);
        *tries += 1;
        let ctx = self.ctx.clone();
        self.spawn_task(async move {
            tokio::time::sleep(wait).await;
            let _ = ctx.send(Internal::RetryPull(peer)).await;
        });
    }

    /// Whether to pull `peer` unasked, on connecting and on every pull
    /// tick: a static peer, a peer the handle asked to connect to, one this
    /// node pulled before (it holds a cursor) or one a grant held here
    /// names. A peer met only through a Kademlia lookup, mDNS or an inbound
    /// connection shares nothing with this node yet; it is pulled once it
    /// nudges or pushes. (Every connection pulling made Kademlia's lookups
    /// swamp a 100-node simulation: docs/decisions.md.)
    pub(crate) fn worth_pulling(&self, peer: &PeerId) -> bool {
        self.static_peers.iter().any(|(p, _)| p == peer)
            || self.asked.contains(peer)
            || !matches!(self.backend().cursor(peer), Ok(None))
            || self.backend().names_grantee(peer).unwrap_or(true)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use super::unwound;
    use crate::Error;

    /// A step that panics reports [`Error::Panicked`] instead of never
    /// reporting at all (its pull slot used to stay taken for good).
    #[tokio::test]
    async fn a_panicking_step_reports_an_error() {
        let ok = unwound("pull", async { Ok(7) }).await.unwrap();
        assert_eq!(ok, 7);
        let panicked = unwound::<u8>("pull", async { panic!("a dependency panicked on a peer's data") }).await;
        assert!(matches!(panicked, Err(Error::Panicked("pull"))), "{panicked:?}");
    }
}
