//! Taking items in: a page from a peer, a patient's or app's submission, or a restored transfer, judged consent items first, then envelopes; the pending queue retried at open; stored items re-verified before they leave.

use super::*;

impl Node {
    /// Ingests a page of items from a peer or the patient: decode (signature
    /// first), judge validity on signed data (DESIGN §5), open envelopes
    /// whose key the node holds, store, and publish [`Event`]s. Grants,
    /// revocations and key shares of the page are applied before its
    /// envelopes; they release pending envelopes, exclude envelopes beyond a
    /// new revocation's cut, and unlock opaque envelopes.
    ///
    /// # Errors
    /// Only store failures; bad items are reported in [`Ingested::rejected`].
    pub async fn ingest(&self, items: Vec<Item>, source: Source) -> Result<Ingested> {
        self.ingest_as(items, source.actor(), None).await
    }

    /// As [`Node::ingest`], but parks at most `pending_room` new items in the
    /// pending queue; the others are counted in [`IngestReport::refused`] and
    /// not kept (sync caps what one peer may park this way).
    ///
    /// # Errors
    /// As [`Node::ingest`].
    pub async fn ingest_capped(&self, items: Vec<Item>, source: Source, pending_room: usize) -> Result<Ingested> {
        self.ingest_as(items, source.actor(), Some(pending_room)).await
    }

    /// Ingests envelopes rebuilt from a snapshot transfer
    /// ([`Node::restore_transfer`]) like envelopes of a page — same validity
    /// rules, pending queue, duplicates and audit — without verifying their
    /// signatures or opening their changes again: restoring did both.
    ///
    /// # Errors
    /// As [`Node::ingest`].
    pub async fn ingest_restored(
        &self,
        envelopes: Vec<crate::transfer::RestoredEnvelope>,
        source: Source,
        pending_room: Option<usize>,
    ) -> Result<Ingested> {
        let actor = source.actor();
        let _guard = self.inner.ingest_lock.lock().await;
        let mut report = Ingested::default();
        let mut phase = Phase {
            pending_room,
            ..Phase::default()
        };
        let mut envelopes: Vec<Envelope> = envelopes
            .into_iter()
            .map(crate::transfer::RestoredEnvelope::into_envelope)
            .collect();
        // A document's changes in seq order, so that each follows its predecessor.
        envelopes.sort_by_key(|e| e.header().seq);
        for envelope in envelopes {
            let bytes = envelope.encode();
            let hash = sha256(&bytes);
            if self.already_rejected(&phase, &hash)? {
                report.counts.duplicates += 1;
                continue;
            }
            self.judge_decoded(&envelope, &bytes, hash, None, true, &actor, &mut phase, &mut report)?;
        }
        self.release_successors(&actor, &mut phase, &mut report)?;
        self.finish_phase(phase, &actor).await?;
        Ok(report)
    }

    pub(super) async fn ingest_as(
        &self,
        items: Vec<Item>,
        actor: Actor,
        pending_room: Option<usize>,
    ) -> Result<Ingested> {
        let _guard = self.inner.ingest_lock.lock().await;
        let mut report = Ingested::default();
        let (consent, envelopes): (Vec<_>, Vec<_>) = items.into_iter().partition(|i| i.kind != ItemKind::Envelope);

        // Phase 1: consent items, stored before anything is judged by them.
        let mut effects = ConsentEffects::default();
        let mut phase = Phase {
            pending_room,
            ..Phase::default()
        };
        effects.deferred = Some(Vec::new());
        for item in consent {
            self.judge_consent(item, &actor, &mut phase, &mut effects, &mut report)?;
        }
        // A grant to this node anywhere in the page makes its patient's
        // other items welcome: those of patients without a relationship are
        // judged once every grant of the page is ([`Node::welcome`]).
        for checked in effects.deferred.take().unwrap_or_default() {
            self.judge_consent_decoded(checked, &actor, &mut phase, &mut effects, &mut report)?;
        }
        let committed = if phase.batch.is_empty() {
            None
        } else {
            Some(self.commit(std::mem::take(&mut phase.batch), true).await?)
        };
        // The registry learns the page's consent items before anyone hears
        // they were stored: sync decides on a `Stored` event whether to
        // follow a grant (`relates_to`), and must see the grant it heard of.
        {
            let mut reg = self.registry_mut();
            for g in &effects.grants {
                reg.add_grant(g.clone());
            }
            let mut strangers = self.strangers();
            for g in effects.grants.iter().filter(|g| g.terms().grantee == self.inner.me) {
                strangers.release(&g.terms().patient);
            }
            for r in &effects.revocations {
                reg.add_revocation(r.clone());
            }
            for s in &effects.shares {
                reg.note_share(s);
            }
            for k in &effects.keys {
                reg.add_key(k.clone());
            }
        }
        if let Some(committed) = committed {
            self.publish_stored(&committed, &phase.metas, Some(&actor));
        }

        // Phase 2: envelopes of the page, released pending ones, exclusions, unlocks.
        let pending_room = phase.pending_room;
        let mut phase = Phase {
            pending_room,
            ..Phase::default()
        };
        for r in &effects.revocations {
            self.exclude_beyond_cut(r, &actor, &mut phase, &mut report)?;
        }
        for k in &effects.keys {
            self.unlock(k, &mut phase, &mut report)?;
        }
        let page = envelopes.into_iter().map(|item| (item.bytes, None)).collect();
        self.judge_envelopes(page, &actor, &mut phase, &mut report)?;
        // Released items were parked already: moving them between reasons
        // parks nothing new.
        phase.pending_room = None;
        let mut released = Vec::new();
        for g in &effects.grants {
            released.extend(
                self.store()
                    .pending(Some(PendingReason::MissingGrant(g.terms().patient, g.id())))?,
            );
        }
        // Envelopes waiting for a change that a new revocation puts beyond
        // its cut are judged again: they are rejected now, not left waiting.
        for r in &effects.revocations {
            released.extend(self.seq_gaps_under(r)?);
        }
        let released = released
            .into_iter()
            .filter(|p| p.kind == ItemKind::Envelope)
            .map(|p| (p.bytes, Some((p.reason, p.hash))))
            .collect();
        self.judge_envelopes(released, &actor, &mut phase, &mut report)?;
        self.release_successors(&actor, &mut phase, &mut report)?;
        self.finish_phase(phase, &actor).await?;
        tracing::debug!(
            accepted = report.counts.accepted,
            pending = report.counts.pending,
            rejected = report.counts.rejected,
            duplicates = report.counts.duplicates,
            "ingested page"
        );
        Ok(report)
    }

    pub(super) async fn finish_phase(&self, mut phase: Phase, actor: &Actor) -> Result<()> {
        for (patient, items) in std::mem::take(&mut phase.received) {
            phase.batch.push(Op::Audit(AuditRecord {
                actor_kind: actor.kind,
                actor_id: actor.id.clone(),
                action: Action::Receive,
                patient: Some(patient),
                items,
                grant: None,
                outcome: "ok".into(),
            }));
        }
        if phase.batch.is_empty() {
            return Ok(());
        }
        // The store shows the batch to readers (completeness included) as
        // soon as it is applied, before the flush this awaits; the record
        // events that bring it into the caches are sent after. So they are
        // counted now: a read judged on the store from here on waits for
        // them too (`Repository::settle`), and never shows less than it judged.
        let record_events = (phase.excluded.len() + phase.readable.len()) as u64;
        self.inner
            .record_events
            .fetch_add(record_events, std::sync::atomic::Ordering::SeqCst);
        let committed = match self.commit(std::mem::take(&mut phase.batch), true).await {
            Ok(committed) => committed,
            Err(e) => {
                self.inner
                    .record_events
                    .fetch_sub(record_events, std::sync::atomic::Ordering::SeqCst);
                return Err(e);
            }
        };
        let accepted: Vec<_> = phase.changes.drain().collect();
        self.note_held(&accepted, &phase.removed_from);
        self.publish_stored(&committed, &phase.metas, Some(actor));
        for ((patient, collection), ids) in phase.excluded {
            // The snapshot may hold excluded changes; loads check coverage too.
            if let Err(e) = self.drop_snapshot(patient, collection) {
                tracing::warn!(%collection, cause = %e, "dropping a snapshot failed");
            }
            self.publish_counted(Event::Excluded {
                patient,
                collection,
                ids,
            });
        }
        for ((patient, collection), ids) in phase.readable {
            self.publish_counted(Event::Readable {
                patient,
                collection,
                ids,
            });
        }
        Ok(())
    }

    /// Records a permanent rejection once, with an audit entry.
    pub(super) fn reject(&self, phase: &mut Phase, report: &mut Ingested, refusal: Refusal, actor: &Actor) {
        let Refusal {
            kind,
            key,
            patient,
            error,
        } = refusal;
        let id = hex::encode(key);
        tracing::info!(kind = kind.as_str(), item = %id, cause = %error, "item rejected");
        phase.batch.push(Op::AddRejected {
            key,
            reason: error.to_string(),
        });
        phase.batch.push(Op::Audit(AuditRecord {
            actor_kind: actor.kind,
            actor_id: actor.id.clone(),
            action: Action::Reject,
            patient,
            items: vec![ItemId(key)],
            grant: None,
            outcome: format!("rejected: {error}"),
        }));
        phase.seen.insert(key);
        report.reject(RejectedItem { kind, id, error });
    }

    pub(super) fn already_rejected(&self, phase: &Phase, key: &[u8; 32]) -> Result<bool> {
        Ok(phase.seen.contains(key) || self.store().rejected(key)?.is_some())
    }

    pub(super) async fn rebuild_registry(&self) -> Result<()> {
        let items = self.store().consent_items()?;
        // Verifying signatures dominates the open of a large store: spread it
        // over the cores, keeping store order for the registry.
        let decoded: Vec<(ItemMeta, std::result::Result<Decoded, medmesh_crypto::Error>)> =
            crate::par::map(&items, 64, |item| {
                (item.meta.clone(), decode_item(item.meta.kind, &item.item.bytes))
            })
            .ok_or_else(|| Error::Storage("verifying consent items at open failed".into()))?;
        drop(items);
        let mut corrupt = Vec::new();
        {
            let mut reg = self.registry_mut();
            for (meta, item) in decoded {
                match item {
                    Ok(Decoded::Grant(g)) => reg.add_grant(g),
                    Ok(Decoded::Revocation(r)) => {
                        reg.add_revocation(r);
                    }
                    Ok(Decoded::KeyShare(s)) => {
                        reg.note_share(&s);
                        // Opened on first use, not here (HPKE per share at open is slow).
                        if s.terms().recipient == Principal::Practice(self.inner.me) {
                            reg.add_unopened_share(s, &self.inner.identity);
                        }
                    }
                    Ok(Decoded::Envelope(_)) => {}
                    Err(e) => corrupt.push((meta, e)),
                }
            }
        }
        for (meta, e) in corrupt {
            self.quarantine(&meta, e).await?;
        }
        Ok(())
    }

    pub(super) async fn retry_all_pending(&self) -> Result<()> {
        let pending = self.store().pending(None)?;
        if pending.is_empty() {
            return Ok(());
        }
        let actor = self.node_actor();
        // Consent items of a format this build now reads are ingested anew.
        let mut readable_now = Vec::new();
        let mut dequeue = Batch::new();
        let mut envelopes = Vec::new();
        for p in pending {
            if p.kind == ItemKind::Envelope {
                envelopes.push(p);
            } else if !matches!(
                decode_item(p.kind, &p.bytes),
                Err(medmesh_crypto::Error::UnsupportedVersion { .. })
            ) {
                dequeue.push(Op::RemovePending {
                    reason: p.reason,
                    hash: p.hash,
                });
                readable_now.push(Item::new(p.kind, p.bytes));
            }
        }
        if !dequeue.is_empty() {
            self.commit(dequeue, true).await?;
        }
        if !readable_now.is_empty() {
            self.ingest_as(readable_now, actor.clone(), None).await?;
        }
        let _guard = self.inner.ingest_lock.lock().await;
        let mut phase = Phase::default();
        let mut report = Ingested::default();
        let envelopes = envelopes
            .into_iter()
            .map(|p| (p.bytes, Some((p.reason, p.hash))))
            .collect();
        self.judge_envelopes(envelopes, &actor, &mut phase, &mut report)?;
        self.release_successors(&actor, &mut phase, &mut report)?;
        self.finish_phase(phase, &actor).await
    }

    /// Removes a stored item that no longer verifies (bit rot, tampering),
    /// with an audit entry; reconciliation fetches it again from a peer.
    pub(super) async fn quarantine(&self, meta: &ItemMeta, error: medmesh_crypto::Error) -> Result<Error> {
        tracing::error!(item = %meta.id, kind = meta.kind.as_str(), cause = %error, "stored item fails verification; quarantined");
        let mut batch = Batch::new();
        // Removed, not recorded as rejected: bit rot is not the author's
        // fault, and the good copy must be accepted again from a peer.
        batch.push(Op::RemoveItem(meta.id));
        batch.push(Op::Audit(AuditRecord {
            actor_kind: ActorKind::Node,
            actor_id: self.inner.me.to_string(),
            action: Action::Quarantine,
            patient: Some(meta.patient),
            items: vec![meta.id],
            grant: None,
            outcome: format!("quarantined: {error}"),
        }));
        self.commit(batch, true).await?;
        if let (ItemKind::Envelope, Some(collection)) = (meta.kind, meta.collection) {
            self.note_held(&[], &HashSet::from([(meta.patient, collection)]));
            if let Err(e) = self.drop_snapshot(meta.patient, collection) {
                tracing::warn!(%collection, cause = %e, "dropping a snapshot failed");
            }
            self.publish(Event::Excluded {
                patient: meta.patient,
                collection,
                ids: vec![EnvelopeId(meta.id.0)],
            });
        }
        Ok(Error::CorruptItem {
            id: meta.id.to_string(),
            source: error,
        })
    }

    /// Decodes a stored item; one that no longer verifies is quarantined
    /// and reported as [`Error::CorruptItem`].
    pub(super) async fn verified(&self, item: &StoredItem) -> Result<Decoded> {
        match decode_item(item.meta.kind, &item.item.bytes) {
            Ok(d) => Ok(d),
            Err(e) => Err(self.quarantine(&item.meta, e).await?),
        }
    }

    // ----- submission API ---------------------------------------------

    /// Grants, revocations and key shares submitted by the patient (CLI or
    /// management API); they go through [`Node::ingest`].
    ///
    /// # Errors
    /// As [`Node::ingest`].
    pub async fn submit(&self, patient: PatientId, items: Vec<Item>) -> Result<Ingested> {
        self.ingest(items, Source::Patient(patient)).await
    }

    /// Submits one grant.
    ///
    /// # Errors
    /// As [`Node::ingest`].
    pub async fn submit_grant(&self, patient: PatientId, grant: Vec<u8>) -> Result<Ingested> {
        self.submit(patient, vec![Item::new(ItemKind::Grant, grant)]).await
    }

    /// Submits one revocation.
    ///
    /// # Errors
    /// As [`Node::ingest`].
    pub async fn submit_revocation(&self, patient: PatientId, revocation: Vec<u8>) -> Result<Ingested> {
        self.submit(patient, vec![Item::new(ItemKind::Revocation, revocation)])
            .await
    }

    /// Submits key shares.
    ///
    /// # Errors
    /// As [`Node::ingest`].
    pub async fn submit_key_shares(&self, patient: PatientId, shares: Vec<Vec<u8>>) -> Result<Ingested> {
        let items = shares.into_iter().map(|s| Item::new(ItemKind::KeyShare, s)).collect();
        self.submit(patient, items).await
    }

    // ----- reads for the record layer -----------------------------------
}
