//! The write path: a local change sealed as an envelope under the current epoch key, signed, and committed durably.

use super::*;

impl Node {
    /// Seals `change` for (patient, collection) under the current epoch key
    /// and this node's read-write grant, stores it, and returns once it is
    /// durable; then publishes [`Event::Stored`]. The audit entry names this
    /// node; see [`Node::write_change_by`] to name the app.
    ///
    /// # Errors
    /// [`Error::NoWriteGrant`], [`Error::NoEpochKey`], [`Error::ForeignActor`],
    /// [`Error::ChangeTooLarge`];
    /// store errors when the durable append fails (the caller must then
    /// drop the change from its cached document).
    pub async fn write_change(
        &self,
        patient: PatientId,
        collection: Collection,
        change: Change<'_>,
    ) -> Result<EnvelopeId> {
        self.write_change_by(self.node_actor(), patient, collection, change)
            .await
    }

    /// [`Node::write_change`] on behalf of `actor` (audit).
    ///
    /// # Errors
    /// As [`Node::write_change`].
    pub async fn write_change_by(
        &self,
        actor: Actor,
        patient: PatientId,
        collection: Collection,
        change: Change<'_>,
    ) -> Result<EnvelopeId> {
        let ids = self
            .write_changes_by(actor, vec![(patient, collection, change)])
            .await?;
        ids.into_iter()
            .next()
            .ok_or_else(|| Error::Storage("a write stored no envelope".into()))
    }

    /// Several changes, for any (patient, collection) documents, written as
    /// **one** atomic store batch (a FHIR transaction): every change is sealed
    /// first, so a refusal ([`Error::NoWriteGrant`], [`Error::NoEpochKey`],
    /// [`Error::ForeignActor`]) of any of them writes nothing; then all
    /// envelopes with their index and audit entries are committed together and
    /// acknowledged once durable. The envelope ids come back in input order;
    /// [`Event::Stored`] is published for each, as for single writes.
    ///
    /// # Errors
    /// As [`Node::write_change`]; on any error none of the changes is stored
    /// (after a failed flush the committer removes them again, see
    /// `docs/storage.md`), and the caller must drop all of them from its
    /// cached documents.
    pub async fn write_changes_by(
        &self,
        actor: Actor,
        changes: Vec<(PatientId, Collection, Change<'_>)>,
    ) -> Result<Vec<EnvelopeId>> {
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        let time = now();
        let mut envelopes = Vec::with_capacity(changes.len());
        for (patient, collection, change) in changes {
            match self.seal_change(patient, collection, change, time) {
                Ok(envelope) => envelopes.push(envelope),
                Err(e) => {
                    let mut batch = Batch::new();
                    batch.push(Op::Audit(AuditRecord {
                        actor_kind: actor.kind,
                        actor_id: actor.id,
                        action: Action::Write,
                        patient: Some(patient),
                        items: Vec::new(),
                        grant: None,
                        outcome: format!("refused: {e}"),
                    }));
                    self.commit(batch, false).await?;
                    return Err(e);
                }
            }
        }
        let mut batch = Batch::new();
        let mut metas = HashMap::with_capacity(envelopes.len());
        let mut ids = Vec::with_capacity(envelopes.len());
        let mut written = Vec::with_capacity(envelopes.len());
        for (envelope, encoded) in envelopes {
            let h = envelope.header();
            written.push((h.patient, h.collection, h.actor, h.seq));
            let id = envelope.id();
            let meta = envelope_meta(&envelope);
            batch.push(Op::PutItem {
                meta: meta.clone(),
                bytes: encoded,
                envelope: Some(Box::new(envelope_entry(&envelope, EnvelopeState::Readable))),
            });
            batch.push(Op::Audit(AuditRecord {
                actor_kind: actor.kind,
                actor_id: actor.id.clone(),
                action: Action::Write,
                patient: Some(meta.patient),
                items: vec![id.into()],
                grant: envelope.header().grant_id,
                outcome: "ok".into(),
            }));
            metas.insert(meta.id, meta);
            ids.push(id);
        }
        let committed = self.commit(batch, true).await?;
        self.note_held(&written, &HashSet::new());
        tracing::debug!(envelopes = ids.len(), "changes stored");
        self.publish_stored(&committed, &metas, None);
        Ok(ids)
    }

    pub(super) fn seal_change(
        &self,
        patient: PatientId,
        collection: Collection,
        change: Change<'_>,
        time: u64,
    ) -> Result<(Envelope, Vec<u8>)> {
        let me = self.inner.me;
        if !change.actor.belongs_to(me.as_bytes()) {
            return Err(Error::ForeignActor);
        }
        let (key, grant) = {
            let reg = self.registry();
            let grant = reg
                .grant_in_force(&patient, collection, &me, Access::ReadWrite, time)
                .map(Grant::id)
                .ok_or(Error::NoWriteGrant { patient, collection })?;
            let key = reg
                .current_key(&patient, collection)
                .cloned()
                .ok_or(Error::NoEpochKey { patient, collection })?;
            (key, grant)
        };
        // Refused (typed) if the key found is not this record's: the header
        // names the record the caller writes, never the key's.
        let envelope = Envelope::seal(
            (patient, collection),
            &key,
            &self.inner.identity,
            Some(grant),
            change,
            time,
        )?;
        let encoded = envelope.encode();
        if encoded.len() > MAX_ENVELOPE_BYTES {
            return Err(Error::ChangeTooLarge {
                patient,
                collection,
                bytes: encoded.len(),
                max: MAX_ENVELOPE_BYTES,
            });
        }
        // The same rule every other node applies on ingest.
        match self.registry().envelope_validity(envelope.header()) {
            Validity::Valid => Ok((envelope, encoded)),
            _ => Err(Error::NoWriteGrant { patient, collection }),
        }
    }

    // ----- ingest path ------------------------------------------------
}
