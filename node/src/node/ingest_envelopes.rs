//! Judging envelopes on ingest: validity under their grant (`policy::admits`), the pending queue and seq gaps, exclusion beyond a revocation's cut, unlocking opaque envelopes when a key arrives.

use super::*;

impl Node {
    pub(super) fn queue_pending(
        &self,
        phase: &mut Phase,
        report: &mut Ingested,
        reason: PendingReason,
        hash: [u8; 32],
        item: Item,
    ) -> Result<()> {
        let already = self.store().pending(Some(reason))?.iter().any(|p| p.hash == hash);
        if already || !phase.seen.insert(hash) {
            report.counts.duplicates += 1;
            return Ok(());
        }
        if let Some(room) = phase.pending_room.as_mut() {
            if *room == 0 {
                phase.seen.remove(&hash);
                report.counts.refused += 1;
                return Ok(());
            }
            *room -= 1;
        }
        tracing::debug!(kind = item.kind.as_str(), item = %hex::encode(hash), ?reason, "item pending");
        phase.batch.push(Op::AddPending(PendingItem {
            reason,
            hash,
            kind: item.kind,
            bytes: item.bytes,
        }));
        report.counts.pending += 1;
        Ok(())
    }

    /// Judges envelopes (of a page, or released from the pending queue) in
    /// change seq order, so that a page carrying an actor's changes out of
    /// order still lands whole.
    pub(super) fn judge_envelopes(
        &self,
        items: Vec<(Vec<u8>, FromPending)>,
        actor: &Actor,
        phase: &mut Phase,
        report: &mut Ingested,
    ) -> Result<()> {
        let mut decoded = Vec::with_capacity(items.len());
        for (bytes, from_pending) in items {
            if let Some((envelope, hash)) = self.decode_envelope(&bytes, from_pending, actor, phase, report)? {
                decoded.push((envelope, bytes, hash, from_pending));
            }
        }
        decoded.sort_by_key(|(envelope, ..)| envelope.header().seq);
        for (envelope, bytes, hash, from_pending) in decoded {
            self.judge_decoded(&envelope, &bytes, hash, from_pending, false, actor, phase, report)?;
        }
        Ok(())
    }

    /// Decodes (signature first) an envelope to judge; `None` when it is
    /// already rejected, waits for a newer build, or is rejected now.
    pub(super) fn decode_envelope(
        &self,
        bytes: &[u8],
        from_pending: Option<(PendingReason, [u8; 32])>,
        actor: &Actor,
        phase: &mut Phase,
        report: &mut Ingested,
    ) -> Result<Option<(Envelope, [u8; 32])>> {
        let hash = sha256(bytes);
        if from_pending.is_none() && self.already_rejected(phase, &hash)? {
            report.counts.duplicates += 1;
            return Ok(None);
        }
        match Envelope::decode(bytes) {
            Ok(e) => Ok(Some((e, hash))),
            Err(medmesh_crypto::Error::UnsupportedVersion { .. }) => {
                if from_pending.is_none() {
                    self.queue_pending(
                        phase,
                        report,
                        PendingReason::UnsupportedVersion,
                        hash,
                        Item::new(ItemKind::Envelope, bytes.to_vec()),
                    )?;
                }
                Ok(None)
            }
            Err(e) => {
                dequeue(phase, from_pending);
                self.reject(
                    phase,
                    report,
                    Refusal {
                        kind: ItemKind::Envelope,
                        key: hash,
                        patient: None,
                        error: e.into(),
                    },
                    actor,
                );
                Ok(None)
            }
        }
    }

    /// Whether change `seq` of `actor` in `doc` is held, committed or
    /// accepted earlier in this phase.
    pub(super) fn holds_change(&self, phase: &Phase, doc: Doc, actor: &ActorId, seq: u64) -> Result<bool> {
        if phase.changes.contains(&(doc.0, doc.1, *actor, seq)) {
            return Ok(true);
        }
        let mut chains = self
            .inner
            .chains
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !chains.is_loaded(&doc) {
            let held = self.store().envelopes(&doc.0, Some(doc.1))?;
            chains.load(doc, held.into_iter().map(|e| (e.actor, e.change_seq)));
        }
        Ok(chains.holds(&doc, actor, seq).unwrap_or(false))
    }

    /// Notes committed envelopes in the chains, after forgetting the
    /// documents envelopes were removed from.
    pub(super) fn note_held(&self, held: &[(PatientId, Collection, ActorId, u64)], removed_from: &HashSet<Doc>) {
        let mut chains = self
            .inner
            .chains
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for doc in removed_from {
            chains.forget(doc);
        }
        for (patient, collection, actor, seq) in held {
            chains.insert(&(*patient, *collection), *actor, *seq);
        }
    }

    /// Parks a valid envelope whose change does not follow one held here,
    /// until the gap fills; refuses it (keeps nothing) when its author
    /// already has [`MAX_SEQ_GAPS_PER_AUTHOR`] waiting for this patient.
    pub(super) fn park_gap(
        &self,
        h: &EnvelopeHeader,
        bytes: &[u8],
        hash: [u8; 32],
        from_pending: Option<(PendingReason, [u8; 32])>,
        phase: &mut Phase,
        report: &mut Ingested,
    ) -> Result<()> {
        let reason = PendingReason::SeqGap {
            patient: h.patient,
            actor: h.actor,
            collection: h.collection,
            seq: h.seq,
        };
        if from_pending.map(|(r, _)| r) == Some(reason) {
            // Still waiting.
            return Ok(());
        }
        dequeue(phase, from_pending);
        let author = h.actor.author_tag();
        let in_phase = phase.gaps_per_author.get(&(h.patient, author)).copied().unwrap_or(0);
        let stored = isize::try_from(self.store().seq_gaps_of(&h.patient, &author)?).unwrap_or(isize::MAX);
        let cap = isize::try_from(MAX_SEQ_GAPS_PER_AUTHOR).unwrap_or(isize::MAX);
        if stored.saturating_add(in_phase) >= cap {
            tracing::info!(envelope = %hex::encode(hash), "seq gaps of this author full; envelope refused");
            report.counts.refused += 1;
            return Ok(());
        }
        let before = report.counts.pending;
        self.queue_pending(
            phase,
            report,
            reason,
            hash,
            Item::new(ItemKind::Envelope, bytes.to_vec()),
        )?;
        if report.counts.pending > before {
            *phase.gaps_per_author.entry((h.patient, author)).or_default() += 1;
            phase
                .parked_gaps
                .entry(reason)
                .or_default()
                .push((hash, bytes.to_vec()));
        }
        Ok(())
    }

    /// Judges again the envelopes waiting for the successor of each change
    /// accepted in this phase, until no more follow.
    pub(super) fn release_successors(&self, actor: &Actor, phase: &mut Phase, report: &mut Ingested) -> Result<()> {
        while let Some((patient, collection, change_actor, seq)) = phase.to_release.pop() {
            let Some(next) = seq.checked_add(1) else {
                continue;
            };
            let reason = PendingReason::SeqGap {
                patient,
                actor: change_actor,
                collection,
                seq: next,
            };
            let mut waiting: Vec<Parked> = self
                .store()
                .pending(Some(reason))?
                .into_iter()
                .map(|p| (p.hash, p.bytes))
                .collect();
            if let Some(parked) = phase.parked_gaps.remove(&reason) {
                report.counts.pending = report.counts.pending.saturating_sub(parked.len() as u64);
                waiting.extend(parked);
            }
            // Released now: they no longer count against their author's
            // share, or one long page that parks and releases more than the
            // share in turn would refuse the rest of an honest history.
            let author = change_actor.author_tag();
            let released = isize::try_from(waiting.len()).unwrap_or(isize::MAX);
            if released > 0 {
                *phase.gaps_per_author.entry((patient, author)).or_default() -= released;
            }
            let items = waiting
                .into_iter()
                .map(|(hash, bytes)| (bytes, Some((reason, hash))))
                .collect();
            self.judge_envelopes(items, actor, phase, report)?;
        }
        Ok(())
    }

    /// The envelopes waiting for a seq gap that `revocation`'s grantee wrote
    /// for its patient.
    pub(super) fn seq_gaps_under(&self, revocation: &Revocation) -> Result<Vec<PendingItem>> {
        let patient = revocation.terms().patient;
        let Some(grantee) = self
            .registry()
            .grant(&patient, &revocation.grant_id())
            .map(|g| g.terms().grantee)
        else {
            return Ok(Vec::new());
        };
        Ok(self
            .store()
            .pending(None)?
            .into_iter()
            .filter(|p| {
                matches!(p.reason, PendingReason::SeqGap { patient: q, actor, .. }
                    if q == patient && actor.belongs_to(grantee.as_bytes()))
            })
            .collect())
    }

    /// [`Node::judge_envelopes`] once the envelope decoded and verified.
    /// `change_checked`: its change was already matched to the signed
    /// keyed change hash, actor and seq (a restored envelope), so a held key
    /// makes it readable without opening it again.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn judge_decoded(
        &self,
        envelope: &Envelope,
        bytes: &[u8],
        hash: [u8; 32],
        from_pending: Option<(PendingReason, [u8; 32])>,
        change_checked: bool,
        actor: &Actor,
        phase: &mut Phase,
        report: &mut Ingested,
    ) -> Result<()> {
        let id = envelope.id();
        let h = envelope.header();
        if phase.seen.contains(&id.0) || self.store().contains(&id.into())? || self.store().rejected(&id.0)?.is_some() {
            dequeue(phase, from_pending);
            report.counts.duplicates += 1;
            return Ok(());
        }
        let (validity, key, expired) = {
            let reg = self.registry();
            (
                reg.envelope_validity(h),
                reg.key(&h.key_ref()).cloned(),
                reg.expired_unrevoked(h, now()),
            )
        };
        // First seen now, after its grant expired (envelopes waiting for a
        // seq gap were seen when they were parked).
        let first_seen_now = !matches!(from_pending, Some((PendingReason::SeqGap { .. }, _)));
        match validity {
            Validity::MissingGrant(patient, grant) => {
                let reason = PendingReason::MissingGrant(patient, grant);
                if from_pending.map(|(r, _)| r) != Some(reason) {
                    dequeue(phase, from_pending);
                    self.queue_pending(
                        phase,
                        report,
                        reason,
                        hash,
                        Item::new(ItemKind::Envelope, bytes.to_vec()),
                    )?;
                }
            }
            Validity::Invalid(reason) => {
                dequeue(phase, from_pending);
                let error = Error::Rejected {
                    kind: "envelope",
                    id: id.to_string(),
                    reason: reason.into(),
                };
                self.reject(
                    phase,
                    report,
                    Refusal {
                        kind: ItemKind::Envelope,
                        key: id.0,
                        patient: Some(h.patient),
                        error,
                    },
                    actor,
                );
            }
            Validity::Valid if expired && first_seen_now => {
                dequeue(phase, from_pending);
                tracing::info!(envelope = %id, "first seen after its grant expired; refused until a revocation decides");
                report.counts.refused += 1;
            }
            Validity::Valid
                if h.seq > 1 && !self.holds_change(phase, (h.patient, h.collection), &h.actor, h.seq - 1)? =>
            {
                self.park_gap(h, bytes, hash, from_pending, phase, report)?;
            }
            Validity::Valid => {
                let state = match key.as_ref() {
                    Some(_) if change_checked => EnvelopeState::Readable,
                    Some(key) => match open_checked(envelope, key) {
                        Ok(_plain) => EnvelopeState::Readable,
                        Err(error) => {
                            dequeue(phase, from_pending);
                            self.reject(
                                phase,
                                report,
                                Refusal {
                                    kind: ItemKind::Envelope,
                                    key: id.0,
                                    patient: Some(h.patient),
                                    error,
                                },
                                actor,
                            );
                            return Ok(());
                        }
                    },
                    None => EnvelopeState::Opaque,
                };
                dequeue(phase, from_pending);
                let meta = envelope_meta(envelope);
                phase.batch.push(Op::PutItem {
                    meta: meta.clone(),
                    bytes: bytes.to_vec(),
                    envelope: Some(Box::new(envelope_entry(envelope, state))),
                });
                phase.seen.insert(id.0);
                phase.metas.insert(meta.id, meta);
                phase.received.entry(h.patient).or_default().push(id.into());
                phase.changes.insert((h.patient, h.collection, h.actor, h.seq));
                phase.to_release.push((h.patient, h.collection, h.actor, h.seq));
                report.counts.accepted += 1;
                match state {
                    EnvelopeState::Readable => {
                        report.counts.readable += 1;
                        phase.readable.entry((h.patient, h.collection)).or_default().push(id);
                    }
                    EnvelopeState::Opaque => report.counts.opaque += 1,
                }
            }
        }
        Ok(())
    }

    /// Envelopes accepted under `revocation`'s grant before it arrived whose
    /// change lies beyond its cut: removed from reads and serving, recorded
    /// as rejected (validity depends on the cut, not on arrival order).
    pub(super) fn exclude_beyond_cut(
        &self,
        revocation: &Revocation,
        actor: &Actor,
        phase: &mut Phase,
        report: &mut Ingested,
    ) -> Result<()> {
        let patient = revocation.terms().patient;
        let grant_id = revocation.grant_id();
        let entries = self.store().envelopes(&patient, None)?;
        let reg = self.registry();
        let Some(grant) = reg.grant(&patient, &grant_id) else {
            return Ok(());
        };
        let revocations = reg.revocations_of(&patient, &grant_id);
        let mut excluded = Vec::new();
        for e in entries.into_iter().filter(|e| e.grant == Some(grant_id)) {
            let admitted = revocations
                .iter()
                .all(|r| grant.admits_change(e.collection, e.created_at, &e.actor, e.change_seq, Some(r)));
            if !admitted {
                excluded.push(e);
            }
        }
        drop(reg);
        for e in excluded {
            tracing::info!(envelope = %e.id, grant = %grant_id, "envelope excluded: beyond revocation cut");
            phase.batch.push(Op::RemoveItem(e.id.into()));
            phase.batch.push(Op::AddRejected {
                key: e.id.0,
                reason: "beyond the cut of a revocation of its grant".into(),
            });
            phase.batch.push(Op::Audit(AuditRecord {
                actor_kind: actor.kind,
                actor_id: actor.id.clone(),
                action: Action::Exclude,
                patient: Some(patient),
                items: vec![e.id.into()],
                grant: Some(grant_id),
                outcome: "excluded: beyond revocation cut".into(),
            }));
            phase.seen.insert(e.id.0);
            phase.removed_from.insert((patient, e.collection));
            phase.excluded.entry((patient, e.collection)).or_default().push(e.id);
            report.counts.excluded += 1;
        }
        Ok(())
    }

    /// Opens the opaque envelopes a new key unlocks.
    pub(super) fn unlock(&self, key: &EpochKey, phase: &mut Phase, report: &mut Ingested) -> Result<()> {
        let entries = self.store().envelopes(&key.patient, Some(key.collection))?;
        for mut e in entries
            .into_iter()
            .filter(|e| e.state == EnvelopeState::Opaque && e.epoch == key.epoch && e.key_id == key.key_id)
        {
            if phase.seen.contains(&e.id.0) {
                continue;
            }
            let Some(item) = self.store().item(&e.id.into())? else {
                continue;
            };
            let verdict = Envelope::decode(&item.item.bytes)
                .map_err(Error::from)
                .and_then(|env| open_checked(&env, key).map(|_| ()));
            match verdict {
                Ok(()) => {
                    e.state = EnvelopeState::Readable;
                    phase.readable.entry((e.patient, e.collection)).or_default().push(e.id);
                    phase.batch.push(Op::PutEnvelopeEntry(Box::new(e)));
                    report.counts.unlocked += 1;
                }
                Err(error) => {
                    let actor = self.node_actor();
                    phase.batch.push(Op::RemoveItem(e.id.into()));
                    phase.removed_from.insert((e.patient, e.collection));
                    self.reject(
                        phase,
                        report,
                        Refusal {
                            kind: ItemKind::Envelope,
                            key: e.id.0,
                            patient: Some(e.patient),
                            error,
                        },
                        &actor,
                    );
                }
            }
        }
        Ok(())
    }
}
