//! The patient's libp2p session with one node ([`Session`]): dialling it by
//! multiaddr, pushing and pulling with retries, and asking how delivery of
//! what a command submitted stands.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use medmesh_crypto::{Keystore, PracticeId, SecretIdentity};
use medmesh_sync::memory::MemoryBackend;
use medmesh_sync::wire::OutboxReport;
use medmesh_sync::{Item, ItemId, Multiaddr, PeerId, SyncHandle};
use serde_json::{Value, json};

use crate::delivery::Delivery;

/// A multiaddr that names its peer (`…/p2p/12D3…`).
pub(super) fn addressed(spec: &str, flag: &str) -> Result<(Multiaddr, PeerId)> {
    let addr: Multiaddr = spec
        .parse()
        .map_err(|_| anyhow!("{flag} {spec:?} is not a multiaddr (e.g. /ip4/127.0.0.1/tcp/4001/p2p/12D3KooW…)"))?;
    // The last /p2p/: a relay circuit (`…/p2p/RELAY/p2p-circuit/p2p/NODE`) names the node last.
    let peer = medmesh_sync::addressed_peer(&addr)
        .ok_or_else(|| anyhow!("{flag} {spec:?} must end in /p2p/<PeerId> (print it with `medmesh node id`)"))?;
    Ok((addr, peer))
}

/// The patient's side of a libp2p session with one node: a sync peer
/// whose identity is the patient key, with an in-memory store that never
/// touches disk.
pub(super) struct Session {
    pub(super) sync: SyncHandle,
    pub(super) store: Arc<MemoryBackend>,
    pub(super) node: PeerId,
    pub(super) addr: Multiaddr,
}

/// How long a command waits for the node's first tries to deliver what it
/// submitted before it reports them as they stand.
const DELIVERY_WAIT: Duration = Duration::from_secs(10);
/// How often the node is asked meanwhile.
const DELIVERY_POLL: Duration = Duration::from_millis(100);

/// Per target, where delivery of what a command submitted stands; or why
/// the node could not say.
pub(super) type Deliveries = std::result::Result<Vec<(PeerId, Delivery)>, String>;

/// Adds the delivery per target to a command's JSON (`delivery`, or
/// `delivery_error` when the node could not say) and returns its text.
pub(super) fn delivery_output(value: &mut Value, deliveries: &Deliveries) -> String {
    match deliveries {
        Ok(per) => {
            value["delivery"] = Value::Array(per.iter().map(|(peer, d)| d.to_json(*peer)).collect());
            per.iter()
                .map(|(peer, d)| format!("\n  delivery to {peer}: {}", d.text()))
                .collect()
        }
        Err(why) => {
            value["delivery_error"] = json!(why);
            format!("\n  delivery: unknown: {why}")
        }
    }
}

/// The practices a submission to `node` about `first`'s grant concerns:
/// `first`, then the grantees of the patient's other live grants (the node
/// forwards a patient's grants and revocations to them) but `node` itself,
/// once each.
pub(super) fn delivery_targets(keystore: &Keystore, node: &str, first: PracticeId, now_ms: u64) -> Result<Vec<PeerId>> {
    let (_, node) = addressed(node, "--node")?;
    let mut targets = vec![first.peer_id()];
    for grant in keystore.live_grants(now_ms) {
        let peer = grant.terms().grantee.peer_id();
        if peer != node && !targets.contains(&peer) {
            targets.push(peer);
        }
    }
    Ok(targets)
}

/// Why a node did not answer an outbox query, for people.
fn outbox_error(e: medmesh_sync::Error) -> String {
    match e {
        medmesh_sync::Error::Refused { reason, .. } => format!("the node refused to say ({reason})"),
        other => format!("the node could not say ({other}); a node older than this question cannot answer it"),
    }
}

pub(super) fn item_ids(items: &[Item]) -> Vec<ItemId> {
    items.iter().map(|i| ItemId::digest(&i.bytes)).collect()
}

/// Tries a request to the node, re-dialling once if the connection dropped
/// under it (a node restarting, or a connection replaced by a newer one).
/// Pushes and pulls are idempotent: items are identified by their hash.
pub(super) const ATTEMPTS: usize = 3;

impl Session {
    pub(super) async fn open(keystore: &Keystore, node: &str) -> Result<Self> {
        let (addr, peer) = addressed(node, "--node")?;
        let identity = SecretIdentity::from_seed(&keystore.identity().seed());
        let store = Arc::new(MemoryBackend::new());
        let sync = SyncHandle::spawn(medmesh_sync::Config::client(), &identity, store.clone())
            .await
            .context("starting libp2p")?;
        tokio::time::timeout(Duration::from_secs(20), sync.dial(addr.clone()))
            .await
            .map_err(|_| anyhow!("timed out reaching {addr}; is the node running (`medmesh node run`)?"))?
            .with_context(|| format!("reaching {addr}; is the node running (`medmesh node run`)?"))?;
        Ok(Self {
            sync,
            store,
            node: peer,
            addr,
        })
    }

    pub(super) async fn redial(&self, attempt: usize, cause: &medmesh_sync::Error) {
        tracing::info!(attempt, cause = %cause, "request to the node failed; reconnecting");
        let _ = tokio::time::timeout(Duration::from_secs(10), self.sync.dial(self.addr.clone())).await;
    }

    pub(super) async fn push(&self, items: Vec<Item>, hints: Vec<Multiaddr>) -> Result<medmesh_sync::IngestReport> {
        let count = items.len() as u64;
        let mut attempt = 1;
        let report = loop {
            match self.sync.push(self.node, items.clone(), hints.clone()).await {
                Ok(report) => break report,
                Err(e) if attempt < ATTEMPTS => {
                    self.redial(attempt, &e).await;
                    attempt += 1;
                }
                Err(e) => return Err(e).context("submitting to the node"),
            }
        };
        if report.rejected > 0 {
            bail!(
                "the node rejected {} of {count} items (accepted {}, pending {})",
                report.rejected,
                report.accepted,
                report.pending
            );
        }
        // What the node took, waits on or held already: the rest it did
        // not keep (the reply over the wire carries no count of refused
        // items). A node keeps little of a patient it holds nothing of.
        let kept = report.accepted + report.duplicates + report.pending;
        if kept < count {
            bail!(
                "the node kept {kept} of {count} items: a node that holds none of your records and no \
                 grant from you keeps only a few of your items (flood limits); submit through one of \
                 your practices with --node"
            );
        }
        Ok(report)
    }

    /// Where delivery of `items` to each of `targets` stands at the node,
    /// asked until the node has followed what it stored and made its first
    /// try to the first target (the practice the command is about; the
    /// others, holders the node forwards to, are reported as they stand
    /// then: a patient with practices down would otherwise wait for each),
    /// or until [`DELIVERY_WAIT`] has passed. The node reached itself took
    /// what was pushed: delivered. A node that cannot answer (an older
    /// version) makes this an error text, not a failure.
    pub(super) async fn deliveries(
        &self,
        patient: medmesh_crypto::PatientId,
        targets: &[PeerId],
        items: &[ItemId],
    ) -> Deliveries {
        let per = |report: &OutboxReport| -> Vec<(PeerId, Delivery)> {
            targets
                .iter()
                .map(|t| {
                    let d = if *t == self.node {
                        Delivery::Delivered
                    } else {
                        Delivery::of(report, *t, Some(items))
                    };
                    (*t, d)
                })
                .collect()
        };
        let report = self
            .outbox_when(patient, |r| per(r).first().is_none_or(|(_, d)| d.settled()))
            .await?;
        Ok(per(&report))
    }

    /// The node's outbox report on `patient`, asked every
    /// [`DELIVERY_POLL`] until it is not settling and `done` says so, or
    /// until [`DELIVERY_WAIT`] has passed (then as it stands).
    pub(super) async fn outbox_when(
        &self,
        patient: medmesh_crypto::PatientId,
        done: impl Fn(&OutboxReport) -> bool,
    ) -> std::result::Result<OutboxReport, String> {
        let deadline = tokio::time::Instant::now() + DELIVERY_WAIT;
        loop {
            let report = self.sync.outbox_of(self.node, patient).await.map_err(outbox_error)?;
            let now = tokio::time::Instant::now();
            if (!report.settling && done(&report)) || now >= deadline {
                return Ok(report);
            }
            tokio::time::sleep(DELIVERY_POLL.min(deadline - now)).await;
        }
    }

    /// Pulls every item of this patient the node holds.
    pub(super) async fn pull(&self) -> Result<Vec<medmesh_sync::StoredItem>> {
        self.sync
            .sync_now(self.node)
            .await
            .context("fetching your record from the node")?;
        Ok(self.store.items())
    }

    pub(super) async fn close(self) {
        let _ = self.sync.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_circuit_address_names_the_node_behind_the_relay() {
        let (relay, node) = (PeerId::random(), PeerId::random());
        let circuit = format!("/ip4/127.0.0.1/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{node}");
        assert_eq!(addressed(&circuit, "--node").unwrap().1, node);
        let direct = format!("/ip4/127.0.0.1/tcp/4001/p2p/{node}");
        assert_eq!(addressed(&direct, "--to").unwrap().1, node);
        assert!(addressed("/ip4/127.0.0.1/tcp/4001", "--to").is_err());
    }
}
