//! Consent items of patients this node has no relationship with: it holds
//! none of their envelopes and no grant from them to itself. Nothing obliges
//! a node to keep those — a self-made identity can sign any number — so:
//!
//! - their items are kept up to a cap per patient, per source (the peer or
//!   patient session that brought them), and over all sources together;
//!   a patient with no relationship here has no use for them (the node
//!   forwards nothing of theirs and follows none of their hints), so a
//!   patient's own session is refused like anyone beyond those caps;
//! - a grant naming this node makes its patient a relationship (any
//!   patient's first grant looks like that). From the patient's own session
//!   it is always taken; brought by anyone else it is an *introduction*,
//!   taken at a rate per source and over all sources, so one peer cannot
//!   make the node keep the records of as many self-made patients as it likes.
//!
//! Beyond a cap or a rate, items are refused, counted and not recorded as
//! rejected (they are not invalid, only unwanted here). A patient stops
//! counting once the node has a relationship with it.

use std::collections::HashMap;
use std::time::Instant;

use medmesh_crypto::PatientId;

use crate::rate::{Bucket, Rate};

/// The source items held before this start are counted under: no live
/// source (actor ids are never empty) is charged for them.
const EARLIER: &str = "";

/// The caps and rates of [`Strangers`] (from the node's `Config`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) per_patient: usize,
    pub(crate) per_source: usize,
    pub(crate) total: usize,
    pub(crate) introductions_per_source: Rate,
    pub(crate) introductions: Rate,
}

/// What is held of stranger patients, per patient and per source.
#[derive(Debug)]
pub(crate) struct Strangers {
    limits: Limits,
    /// Items held of every stranger patient together.
    count: usize,
    /// Items held per stranger patient, by the source that brought them.
    held: HashMap<PatientId, HashMap<String, usize>>,
    /// Items held per source, over every stranger patient.
    by_source: HashMap<String, usize>,
    /// Introductions per source (absent: full) and over all sources.
    introductions: HashMap<String, Bucket>,
    all_introductions: Bucket,
}

impl Strangers {
    pub(crate) fn new(limits: Limits, at: Instant) -> Self {
        Self {
            limits,
            count: 0,
            held: HashMap::new(),
            by_source: HashMap::new(),
            introductions: HashMap::new(),
            all_introductions: Bucket::full(limits.introductions, at),
        }
    }

    /// Counts one more item of `patient` from `source` if no cap (per
    /// patient, per source, all together) is reached; `false` (and nothing
    /// counted) if one is.
    pub(crate) fn admit(&mut self, patient: PatientId, source: &str) -> bool {
        let of_patient: usize = self.held.get(&patient).map_or(0, |by| by.values().sum());
        let of_source = self.by_source.get(source).copied().unwrap_or(0);
        if of_patient >= self.limits.per_patient
            || of_source >= self.limits.per_source
            || self.count >= self.limits.total
        {
            return false;
        }
        self.count += 1;
        *self
            .held
            .entry(patient)
            .or_default()
            .entry(source.to_owned())
            .or_default() += 1;
        *self.by_source.entry(source.to_owned()).or_default() += 1;
        true
    }

    /// Whether `source` may introduce one more patient now (a grant naming
    /// this node that the patient's own session did not bring); takes a
    /// token from its bucket and the overall one if so.
    pub(crate) fn introduce(&mut self, source: &str, at: Instant) -> bool {
        let (mine, all) = (self.limits.introductions_per_source, self.limits.introductions);
        let bucket = self
            .introductions
            .entry(source.to_owned())
            .or_insert_with(|| Bucket::full(mine, at));
        let taken = Bucket::take_both((bucket, mine), (&mut self.all_introductions, all), at);
        // Full buckets are the default: forget them, so that sources that
        // come and go leave nothing behind.
        self.introductions.retain(|_, b| !b.is_full(mine, at));
        taken
    }

    /// Items of `patient` already held when the node opened.
    pub(crate) fn note_held(&mut self, patient: PatientId, items: usize) {
        self.count += items;
        *self
            .held
            .entry(patient)
            .or_default()
            .entry(EARLIER.to_owned())
            .or_default() += items;
    }

    /// The node now has a relationship with `patient`: its items no longer
    /// count against anyone.
    pub(crate) fn release(&mut self, patient: &PatientId) {
        let Some(by) = self.held.remove(patient) else {
            return;
        };
        for (source, n) in by {
            self.count = self.count.saturating_sub(n);
            if let Some(total) = self.by_source.get_mut(&source) {
                *total = total.saturating_sub(n);
                if *total == 0 {
                    self.by_source.remove(&source);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use medmesh_crypto::SecretIdentity;

    use super::*;

    fn patient() -> PatientId {
        SecretIdentity::generate().unwrap().patient_id()
    }

    fn strangers(per_patient: usize, per_source: usize, total: usize) -> Strangers {
        Strangers::new(
            Limits {
                per_patient,
                per_source,
                total,
                introductions_per_source: Rate::per_minute(0, 2),
                introductions: Rate::per_minute(0, 3),
            },
            Instant::now(),
        )
    }

    #[test]
    fn caps_hold_per_patient_and_per_source_and_release_frees_both() {
        let mut s = strangers(2, 3, 100);
        let (p, q) = (patient(), patient());
        assert!(s.admit(p, "m"));
        assert!(s.admit(p, "e"));
        assert!(!s.admit(p, "m"), "per patient");
        assert!(s.admit(q, "m"));
        assert!(s.admit(q, "m"));
        let r = patient();
        assert!(!s.admit(r, "m"), "per source");
        s.release(&p);
        assert!(s.admit(r, "m"), "released items free their source's share");
        assert!(s.admit(p, "e"), "and the patient's");
    }

    #[test]
    fn the_total_cap_holds_over_every_source() {
        let mut s = strangers(10, 10, 3);
        let p = patient();
        s.note_held(p, 1);
        assert!(s.admit(patient(), "m"));
        assert!(s.admit(patient(), "e"));
        assert!(!s.admit(patient(), "f"), "three held in all");
        s.release(&p);
        assert!(s.admit(patient(), "f"));
    }

    #[test]
    fn items_held_at_open_count_for_their_patient_only() {
        let mut s = strangers(2, 1, 100);
        let p = patient();
        s.note_held(p, 2);
        assert!(!s.admit(p, "m"));
        assert!(s.admit(patient(), "m"));
    }

    #[test]
    fn introductions_are_rate_limited_per_source_and_overall() {
        let mut s = strangers(2, 10, 10);
        let at = Instant::now();
        assert!(s.introduce("m", at) && s.introduce("m", at));
        assert!(!s.introduce("m", at), "per source");
        assert!(s.introduce("e", at));
        assert!(!s.introduce("f", at), "overall");
    }
}
