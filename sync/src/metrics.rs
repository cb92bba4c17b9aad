//! Counters the actor, its tasks and the client steps share, for [`crate::Status`].

use std::sync::atomic::{AtomicU64, Ordering};

use crate::backend::{IngestReport, Item};
use crate::serve::Served;

/// Counters shared by the actor, its tasks and the client steps.
#[derive(Default, Debug)]
pub(crate) struct Metrics {
    pub(crate) items_sent: AtomicU64,
    pub(crate) items_received: AtomicU64,
    pub(crate) items_accepted: AtomicU64,
    pub(crate) items_rejected: AtomicU64,
    pub(crate) items_pending: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) refused_busy: AtomicU64,
    pub(crate) items_pending_refused: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) requests_sent: AtomicU64,
    pub(crate) requests_received: AtomicU64,
    pub(crate) reconciliations: AtomicU64,
    pub(crate) reconciliations_failed: AtomicU64,
    pub(crate) items_unwanted: AtomicU64,
    pub(crate) dials_limited: AtomicU64,
}

impl Metrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn received(&self, items: &[Item]) {
        Self::add(&self.items_received, items.len() as u64);
        Self::add(&self.bytes_received, items.iter().map(|i| i.bytes.len() as u64).sum());
    }

    pub(crate) fn ingested(&self, report: &IngestReport) {
        Self::add(&self.items_accepted, report.accepted);
        Self::add(&self.items_rejected, report.rejected);
        Self::add(&self.items_pending, report.pending);
        Self::add(&self.items_pending_refused, report.refused);
        Self::add(&self.items_unwanted, report.unwanted);
    }

    pub(crate) fn sent(&self, served: Served) {
        Self::add(&self.items_sent, served.items);
        Self::add(&self.bytes_sent, served.bytes);
    }
}
