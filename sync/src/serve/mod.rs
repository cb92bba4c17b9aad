//! The serving side of `/medmesh/sync/1`: answers pulls, summaries and
//! fetches through [`may_disclose`], and audits every disclosure before the
//! answer leaves; answers a patient's audit query only to that patient.
//! Runs in tasks spawned by the actor.
//!
//! This file owns what every answer shares: the per-request consent cache
//! and disclosure record ([`Disclosures`]) and the refusal on failure. The
//! answers are split by job: pulls (`pull.rs`); summaries, digests and
//! fetches, the reconciling requests (`reconcile.rs`); snapshot transfers
//! (`snapshot.rs`); and the queries only a patient may make about itself:
//! audit, checkpoints, outbox, practices (`patient.rs`).

use std::collections::{BTreeMap, HashMap};

use medmesh_crypto::{GrantId, PatientId, Timestamp};
use tracing::{debug, warn};

use crate::backend::{Backend, ConsentView, DisclosureRecord, ItemId, ItemMeta, StoredItem};
use crate::wire::{RefusalCode, Response};
use crate::{Error, Result};
use medmesh_node::policy::{Disclosure, Requester, may_disclose};

mod patient;
mod pull;
mod reconcile;
mod snapshot;
#[cfg(test)]
mod tests;

pub(crate) use patient::{audit, checkpoint, outbox, outbox_report, practices};
pub(crate) use pull::pull;
pub(crate) use reconcile::{digest_parts, digests, fetch, summary};
pub(crate) use snapshot::snapshot;

/// Most log entries one pull scans (allowed or not), so a peer that may
/// receive little does not make the server read its whole log per request.
pub const SCAN_BUDGET: usize = 4096;
const SCAN_BATCH: usize = 256;

/// What a served answer disclosed, for metrics.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Served {
    pub(crate) items: u64,
    pub(crate) bytes: u64,
}

/// Caches consent views per patient for one request, and groups the
/// disclosures for the audit log.
struct Disclosures<'a, B: Backend> {
    backend: &'a B,
    peer: Requester,
    now: Timestamp,
    views: HashMap<PatientId, ConsentView>,
    audit: BTreeMap<(PatientId, Option<GrantId>), Vec<ItemId>>,
}

impl<'a, B: Backend> Disclosures<'a, B> {
    fn new(backend: &'a B, peer: Requester, now: Timestamp) -> Self {
        Self {
            backend,
            peer,
            now,
            views: HashMap::new(),
            audit: BTreeMap::new(),
        }
    }

    fn view(&mut self, patient: &PatientId) -> Result<&ConsentView> {
        if !self.views.contains_key(patient) {
            let view = self.backend.consent(patient)?;
            self.views.insert(*patient, view);
        }
        self.views
            .get(patient)
            .ok_or_else(|| Error::Backend("consent view vanished".into()))
    }

    /// Runs the filter; on yes, notes the disclosure.
    fn admit(&mut self, stored: &StoredItem) -> Result<bool> {
        let decision = self.decide(&stored.meta)?;
        if decision.allowed() {
            self.note(&stored.meta, decision);
            Ok(true)
        } else {
            debug!(peer = %self.peer.peer_id(), item = %stored.meta.id, ?decision, "withheld");
            Ok(false)
        }
    }

    /// Runs the filter without noting anything.
    fn decide(&mut self, meta: &ItemMeta) -> Result<Disclosure> {
        let (peer, now) = (self.peer, self.now);
        let view = self.view(&meta.patient)?;
        Ok(may_disclose(meta, &peer, view, now))
    }

    /// Notes an allowed disclosure for the audit log.
    fn note(&mut self, meta: &ItemMeta, decision: Disclosure) {
        self.audit
            .entry((meta.patient, decision.grant()))
            .or_default()
            .push(meta.id);
    }

    /// Writes the audit entries; only then may the answer be sent.
    async fn record(self) -> Result<()> {
        for ((patient, grant), items) in self.audit {
            self.backend
                .record_disclosure(&DisclosureRecord {
                    peer: self.peer.peer_id(),
                    patient,
                    grant,
                    items,
                })
                .await?;
        }
        Ok(())
    }
}

/// The answer, or `Refused(Internal)` (logged) when serving it failed.
fn answer(result: Result<(Response, Served)>, peer: &Requester, what: &'static str) -> (Response, Served) {
    result.unwrap_or_else(|e| refuse(&e, peer, what))
}

fn refuse(err: &Error, peer: &Requester, what: &'static str) -> (Response, Served) {
    warn!(peer = %peer.peer_id(), cause = %err, "failed to serve {what}");
    (Response::Refused(RefusalCode::Internal), Served::default())
}
