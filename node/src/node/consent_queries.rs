//! Consent questions about what the node holds, answered by its registry and `policy`.

use super::*;

impl Node {
    /// The grant in force from `patient` to `peer` covering `collection`
    /// with at least `access`, if any.
    pub fn grant_in_force(
        &self,
        patient: &PatientId,
        collection: Collection,
        peer: &PracticeId,
        access: Access,
        at: u64,
    ) -> Option<GrantId> {
        self.registry()
            .grant_in_force(patient, collection, peer, access, at)
            .map(Grant::id)
    }

    /// DESIGN §5 validity of an envelope header, on signed data only.
    pub fn grant_valid_for_envelope(&self, header: &EnvelopeHeader) -> Validity {
        self.registry().envelope_validity(header)
    }

    /// What the node holds of `patient`'s consent (grants and their
    /// revocations), for [`crate::policy::may_disclose`].
    pub fn consent_view(&self, patient: &PatientId) -> ConsentView {
        self.registry().view(patient)
    }

    /// May the item leave this node for `peer` now? [`crate::policy::may_disclose`]
    /// on what the node holds of the item's patient (DESIGN §6, invariant 1).
    pub fn may_disclose(&self, peer: &PeerId, meta: &ItemMeta) -> Disclosure {
        match Requester::from_peer_id(peer) {
            Ok(requester) => policy::may_disclose(meta, &requester, &self.consent_view(&meta.patient), now()),
            Err(_) => Disclosure::Deny(Denied::NoGrant),
        }
    }

    /// Every grantee of a grant from `patient` (revocation forwarding).
    pub fn peers_with_grant_from(&self, patient: &PatientId) -> Vec<PracticeId> {
        self.registry().peers_with_grant_from(patient)
    }

    /// Whether a grant held here (from any patient) names `peer` as its
    /// grantee: sync pulls such peers unasked.
    pub fn holds_grant_to(&self, peer: &PracticeId) -> bool {
        self.registry().names_grantee(peer)
    }

    /// Grants known from `patient`, newest first.
    pub fn grants(&self, patient: &PatientId) -> Vec<Grant> {
        self.registry().grants_of(patient)
    }

    /// Whether a revocation of the grant is known.
    pub fn is_revoked(&self, patient: &PatientId, grant: &GrantId) -> bool {
        self.registry().is_revoked(patient, grant)
    }

    /// The current epoch of a collection (highest seen in any key share)
    /// and its key id.
    pub fn current_epoch(&self, patient: &PatientId, collection: Collection) -> Option<(Epoch, KeyId)> {
        self.registry().current_epoch(patient, collection)
    }

    /// The current epoch key, if this node holds it (snapshot sealing).
    pub fn current_epoch_key(&self, patient: &PatientId, collection: Collection) -> Option<EpochKey> {
        self.registry().current_key(patient, collection).cloned()
    }

    /// The epoch key `key_ref` names, if this node holds it.
    pub(crate) fn epoch_key(&self, key_ref: &KeyRef) -> Option<EpochKey> {
        self.registry().key(key_ref).cloned()
    }

    /// The key of (patient, collection) with this id, if this node holds it
    /// (sealed snapshots name their key by id only).
    pub(crate) fn epoch_key_of(&self, patient: &PatientId, collection: Collection, key_id: &KeyId) -> Option<EpochKey> {
        self.registry().key_of(patient, collection, key_id).cloned()
    }

    // ----- sync support -----------------------------------------------
}
