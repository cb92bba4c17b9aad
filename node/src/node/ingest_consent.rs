//! Judging consent items (grants, revocations, key shares) on ingest: verified, bound to their patient, capped for patients this node holds nothing of.

use super::*;

impl Node {
    pub(super) fn judge_consent(
        &self,
        item: Item,
        actor: &Actor,
        phase: &mut Phase,
        effects: &mut ConsentEffects,
        report: &mut Ingested,
    ) -> Result<()> {
        let hash = sha256(&item.bytes);
        if self.already_rejected(phase, &hash)? {
            report.counts.duplicates += 1;
            return Ok(());
        }
        let decoded = match decode_item(item.kind, &item.bytes) {
            Ok(d) => d,
            Err(medmesh_crypto::Error::UnsupportedVersion { .. }) => {
                self.queue_pending(phase, report, PendingReason::UnsupportedVersion, hash, item)?;
                return Ok(());
            }
            Err(e) => {
                self.reject(
                    phase,
                    report,
                    Refusal {
                        kind: item.kind,
                        key: hash,
                        patient: None,
                        error: e.into(),
                    },
                    actor,
                );
                return Ok(());
            }
        };
        let checked = CheckedItem { item, hash, decoded };
        self.judge_consent_decoded(checked, actor, phase, effects, report)
    }

    /// [`Node::judge_consent`] after decoding (which checked the signature):
    /// a deferred item comes back here with what was decoded, so no item's
    /// signature is checked twice.
    pub(super) fn judge_consent_decoded(
        &self,
        checked: CheckedItem,
        actor: &Actor,
        phase: &mut Phase,
        effects: &mut ConsentEffects,
        report: &mut Ingested,
    ) -> Result<()> {
        let CheckedItem { item, hash, decoded } = checked;
        let id = ItemId(hash);
        if self.store().contains(&id)? || !phase.seen.insert(hash) {
            report.counts.duplicates += 1;
            return Ok(());
        }
        if let Some(bound) = self.bound_elsewhere(&decoded)? {
            phase.seen.remove(&hash);
            let patient = match &decoded {
                Decoded::Grant(g) => Some(g.terms().patient),
                Decoded::KeyShare(s) => Some(s.terms().patient),
                _ => None,
            };
            self.reject(
                phase,
                report,
                Refusal {
                    kind: item.kind,
                    key: hash,
                    patient,
                    error: Error::IdCollision {
                        kind: item.kind.as_str(),
                        id: hex::encode(hash),
                        bound,
                    },
                },
                actor,
            );
            return Ok(());
        }
        if !self.welcome(&decoded, actor, effects)? {
            phase.seen.remove(&hash);
            match effects.deferred.as_mut() {
                Some(later) => later.push(CheckedItem { item, hash, decoded }),
                None => report.counts.unwanted += 1,
            }
            return Ok(());
        }
        let (meta, action, grant) = match &decoded {
            Decoded::Grant(g) => (
                ItemMeta {
                    kind: ItemKind::Grant,
                    id,
                    patient: g.terms().patient,
                    collection: None,
                    grant: Some(g.id()),
                    principal: Some(Principal::Practice(g.terms().grantee)),
                },
                Action::Grant,
                Some(g.id()),
            ),
            Decoded::Revocation(r) => (
                ItemMeta {
                    kind: ItemKind::Revocation,
                    id,
                    patient: r.terms().patient,
                    collection: None,
                    grant: Some(r.grant_id()),
                    principal: None,
                },
                Action::Revoke,
                Some(r.grant_id()),
            ),
            Decoded::KeyShare(s) => {
                let t = s.terms();
                if t.recipient == Principal::Practice(self.inner.me) {
                    match s.open(&self.inner.identity) {
                        Ok(key) => effects.keys.push(key),
                        Err(e) => {
                            phase.seen.remove(&hash);
                            self.reject(
                                phase,
                                report,
                                Refusal {
                                    kind: item.kind,
                                    key: hash,
                                    patient: Some(t.patient),
                                    error: e.into(),
                                },
                                actor,
                            );
                            return Ok(());
                        }
                    }
                }
                (
                    ItemMeta {
                        kind: ItemKind::KeyShare,
                        id,
                        patient: t.patient,
                        collection: Some(t.collection),
                        grant: None,
                        principal: Some(t.recipient),
                    },
                    Action::KeyShare,
                    None,
                )
            }
            // Partitioned out before.
            Decoded::Envelope(_) => return Ok(()),
        };
        phase.batch.push(Op::PutItem {
            meta: meta.clone(),
            bytes: item.bytes,
            envelope: None,
        });
        phase.batch.push(Op::Audit(AuditRecord {
            actor_kind: actor.kind,
            actor_id: actor.id.clone(),
            action,
            patient: Some(meta.patient),
            items: vec![id],
            grant,
            outcome: "ok".into(),
        }));
        phase.metas.insert(id, meta);
        match decoded {
            Decoded::Grant(g) => effects.grants.push(g),
            Decoded::Revocation(r) => effects.revocations.push(r),
            Decoded::KeyShare(s) => effects.shares.push(s),
            Decoded::Envelope(_) => {}
        }
        report.counts.accepted += 1;
        Ok(())
    }

    /// Whether a grant's or key share's id is already bound here to another
    /// tuple, and to what (`docs/decisions.md`, "Copied key ids and grant
    /// ids"): to another collection or epoch of the same patient (only that
    /// patient signs both), or to another patient's grant or key that this
    /// node has itself written under — a use no other identity can bring
    /// about, so a copy can never take an id away from the patient whose
    /// records this node writes. Any other copy is held in its own scope:
    /// every lookup goes by patient, so it reaches nothing of the other
    /// patient's, and refusing it might refuse the genuine item instead.
    pub(super) fn bound_elsewhere(&self, decoded: &Decoded) -> Result<Option<&'static str>> {
        let mine = |e: &EnvelopeEntry| e.actor.belongs_to(self.inner.me.as_bytes());
        match decoded {
            Decoded::Grant(g) => {
                let id = g.id();
                let others = self.registry().other_patients_with_grant_id(&g.terms().patient, &id);
                for other in others {
                    let written = self.store().envelopes(&other, None)?;
                    if written.iter().any(|e| e.grant == Some(id) && mine(e)) {
                        return Ok(Some("another patient's grant this node writes under"));
                    }
                }
            }
            Decoded::KeyShare(share) => {
                let t = share.terms();
                let others = self.registry().other_keys_with_key_id(t);
                for other in others {
                    if other.patient == t.patient {
                        return Ok(Some("another collection or epoch of its patient"));
                    }
                    let written = self.store().envelopes(&other.patient, Some(other.collection))?;
                    if written
                        .iter()
                        .any(|e| e.epoch == other.epoch && e.key_id == other.key_id && mine(e))
                    {
                        return Ok(Some("another patient's key this node writes under"));
                    }
                }
            }
            Decoded::Revocation(_) | Decoded::Envelope(_) => {}
        }
        Ok(None)
    }

    pub(super) fn strangers(&self) -> std::sync::MutexGuard<'_, Strangers> {
        self.inner
            .strangers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether this node has a relationship with `patient`: it holds
    /// envelopes of theirs or a grant from them to itself (revoked or
    /// expired included: the practice still takes part in that record's
    /// consent flows). Sync follows a patient's address hints and forwards
    /// their consent items only then, and only then keeps their consent
    /// items without a cap.
    ///
    /// # Errors
    /// Store failures.
    pub fn relates_to(&self, patient: &PatientId) -> Result<bool> {
        let granted = self.registry().peers_with_grant_from(patient).contains(&self.inner.me);
        Ok(granted || !self.store().envelopes(patient, None)?.is_empty())
    }

    /// The patients whose records this node and `peer` may both read now
    /// (a grant in force names each): what anti-entropy compares with it.
    pub fn patients_shared_with(&self, peer: &PracticeId) -> Vec<PatientId> {
        self.registry().patients_shared(&self.inner.me, peer, now())
    }

    /// Whether to keep a new consent item from `actor` (flood limits,
    /// docs/protocol.md §10a, [`Strangers`]): any item of a patient the
    /// node has a relationship with (one made by a grant to it in this page
    /// included); a grant naming this node from its patient's own session
    /// always, from anyone else at the introduction rate; other items
    /// within the caps of [`Strangers`], counted only on the page's second pass
    /// (`effects.deferred` is `None`), when every grant of the page is
    /// known. Items the node itself or a local app (with the gateway's
    /// token) submits are not capped.
    pub(super) fn welcome(&self, decoded: &Decoded, actor: &Actor, effects: &ConsentEffects) -> Result<bool> {
        let me = self.inner.me;
        let (patient, names_me) = match decoded {
            Decoded::Grant(g) => (g.terms().patient, g.terms().grantee == me),
            Decoded::Revocation(r) => (r.terms().patient, false),
            Decoded::KeyShare(s) => (s.terms().patient, false),
            Decoded::Envelope(e) => (e.header().patient, false),
        };
        if !matches!(actor.kind, ActorKind::Peer | ActorKind::Patient) {
            return Ok(true);
        }
        // The Noise handshake proved the session's patient identity.
        let own_session = actor.kind == ActorKind::Patient && actor.id == patient.to_string();
        if names_me && own_session {
            return Ok(true);
        }
        if self.relates_to(&patient)? {
            self.strangers().release(&patient);
            return Ok(true);
        }
        if names_me {
            let introduced = self.strangers().introduce(&actor.id, std::time::Instant::now());
            if !introduced {
                tracing::info!(source = %actor.id, "grant naming this node for a patient it holds nothing of, over the introduction rate; refused");
            }
            return Ok(introduced);
        }
        let granted_in_page = effects
            .grants
            .iter()
            .any(|g| g.terms().patient == patient && g.terms().grantee == me);
        if granted_in_page {
            self.strangers().release(&patient);
            return Ok(true);
        }
        if effects.deferred.is_some() {
            return Ok(false);
        }
        let admitted = self.strangers().admit(patient, &actor.id);
        if !admitted {
            tracing::debug!(source = %actor.id, "consent item of a patient this node holds nothing of, over the cap; refused");
        }
        Ok(admitted)
    }

    /// Counts the consent items held of patients this node holds nothing
    /// of, at open (their sources are not stored: they count for their
    /// patient only).
    pub(super) fn count_strangers(&self) -> Result<()> {
        let mut per_patient: HashMap<PatientId, usize> = HashMap::new();
        for item in self.store().consent_items()? {
            *per_patient.entry(item.meta.patient).or_default() += 1;
        }
        for (patient, items) in per_patient {
            if !self.relates_to(&patient)? {
                self.strangers().note_held(patient, items);
            }
        }
        Ok(())
    }
}
