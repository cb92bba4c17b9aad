//! Consent items of patients this node has no relationship with: it holds
//! none of their envelopes and no grant from them to itself. Nothing obliges
//! a node to keep those — a self-made identity can sign any number — so they
//! are kept only up to a cap per patient and a cap per source (the peer or
//! patient session that brought them); beyond it they are refused, counted
//! and not recorded as rejected (they are not invalid, only unwanted here).
//! A patient stops counting once the node has a relationship with it.

use std::collections::HashMap;

use medmesh_crypto::PatientId;

/// The source items held before this start are counted under: no live
/// source (actor ids are never empty) is charged for them.
const EARLIER: &str = "";

/// What is held of stranger patients, per patient and per source.
#[derive(Debug)]
pub(crate) struct Strangers {
    per_patient: usize,
    per_source: usize,
    total: usize,
    /// Items held of every stranger patient together.
    count: usize,
    /// Items held per stranger patient, by the source that brought them.
    held: HashMap<PatientId, HashMap<String, usize>>,
    /// Items held per source, over every stranger patient.
    by_source: HashMap<String, usize>,
}

impl Strangers {
    pub(crate) fn new(per_patient: usize, per_source: usize, total: usize) -> Self {
        Self {
            per_patient,
            per_source,
            total,
            count: 0,
            held: HashMap::new(),
            by_source: HashMap::new(),
        }
    }

    /// Counts one more item of `patient` from `source` if no cap (per
    /// patient, per source, all together) is reached; `false` (and nothing
    /// counted) if one is.
    pub(crate) fn admit(&mut self, patient: PatientId, source: &str) -> bool {
        let of_patient: usize = self.held.get(&patient).map_or(0, |by| by.values().sum());
        let of_source = self.by_source.get(source).copied().unwrap_or(0);
        if of_patient >= self.per_patient || of_source >= self.per_source || self.count >= self.total {
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

    #[test]
    fn caps_hold_per_patient_and_per_source_and_release_frees_both() {
        let mut s = Strangers::new(2, 3, 100);
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
        let mut s = Strangers::new(10, 10, 3);
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
        let mut s = Strangers::new(2, 1, 100);
        let p = patient();
        s.note_held(p, 2);
        assert!(!s.admit(p, "m"));
        assert!(s.admit(patient(), "m"));
    }
}
