//! The hash-chained audit log: appending, disclosures, verification, signed checkpoints and a patient's entries.

use super::*;

/// What [`Node::audit_verify`] found.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct AuditVerified {
    /// Entries in the log, every hash and link checked.
    pub entries: u64,
    /// The seq of the latest signed checkpoint, which the log reaches with
    /// the hash signed there; `None` when none is kept (not anchored).
    pub checkpoint: Option<u64>,
}

/// What [`Node::audit_checkpoints`] returns.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct AuditCheckpoints {
    /// Signed now, of the log's last entry.
    pub head: medmesh_crypto::AuditCheckpoint,
    /// The latest checkpoint kept apart from the log.
    pub latest: Option<medmesh_crypto::AuditCheckpoint>,
    /// Signed now, of the entry asked for, if the log holds it.
    pub anchor: Option<medmesh_crypto::AuditCheckpoint>,
}

impl Node {
    /// Appends an audit entry (gateway reads, sync disclosures), durably;
    /// returns its seq.
    ///
    /// # Errors
    /// Store failures.
    pub async fn audit(&self, record: AuditRecord) -> Result<u64> {
        let mut batch = Batch::new();
        batch.push(Op::Audit(record));
        let committed = self.commit(batch, true).await?;
        Ok(committed.audit.first().copied().unwrap_or(0))
    }

    /// Records that `items` of `patient` were sent to `peer` under `grant`.
    ///
    /// # Errors
    /// Store failures.
    pub async fn record_disclosure(
        &self,
        peer: &PeerId,
        patient: PatientId,
        items: Vec<ItemId>,
        grant: Option<GrantId>,
    ) -> Result<u64> {
        self.audit(AuditRecord {
            actor_kind: ActorKind::Peer,
            actor_id: peer.to_string(),
            action: Action::Disclose,
            patient: Some(patient),
            items,
            grant,
            outcome: "ok".into(),
        })
        .await
    }

    /// Checks the audit chain, and that it still reaches the latest signed
    /// checkpoint with the hash signed there.
    ///
    /// # Errors
    /// [`Error::AuditBroken`] naming the first bad entry;
    /// [`Error::AuditTruncated`] when entries after the checkpoint's seq are
    /// missing; [`Error::AuditRewritten`] when the checkpointed entry
    /// changed; [`Error::Corrupt`] for a checkpoint that does not verify;
    /// store failures.
    pub fn audit_verify(&self) -> Result<AuditVerified> {
        let raw = self.store().audit_raw(1)?;
        let entries = audit::verify_chain(&raw).map_err(Error::AuditBroken)?;
        match audit::check_anchor(self.store(), self.inner.me)? {
            audit::Anchor::Unanchored => Ok(AuditVerified {
                entries,
                checkpoint: None,
            }),
            audit::Anchor::Intact(cp) => Ok(AuditVerified {
                entries,
                checkpoint: Some(cp.terms().seq),
            }),
            audit::Anchor::Truncated { entries, checkpoint } => Err(Error::AuditTruncated {
                entries,
                checkpoint: checkpoint.terms().seq,
            }),
            audit::Anchor::Rewritten(cp) => Err(Error::AuditRewritten { seq: cp.terms().seq }),
        }
    }

    /// Checkpoints for a patient's audit query: one signed now of the log's
    /// head, the latest kept (which a cut tail leaves above the head), and,
    /// if asked, one of entry `anchor` as the log holds it now, to compare
    /// with a checkpoint the patient kept from an earlier query.
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a kept checkpoint that does not verify; store
    /// failures.
    pub fn audit_checkpoints(&self, anchor: Option<u64>) -> Result<AuditCheckpoints> {
        let store = self.store();
        let (seq, head) = store.audit_head();
        let latest = match audit::check_anchor(store, self.inner.me)? {
            audit::Anchor::Unanchored => None,
            audit::Anchor::Intact(cp) | audit::Anchor::Rewritten(cp) => Some(cp),
            audit::Anchor::Truncated { checkpoint, .. } => Some(checkpoint),
        };
        Ok(AuditCheckpoints {
            head: self.inner.checkpoints.sign(seq, head)?,
            latest,
            anchor: anchor
                .map(|s| audit::checkpoint_at(store, &self.inner.checkpoints, s))
                .transpose()?
                .flatten(),
        })
    }

    /// Audit entries, all or those about one patient.
    ///
    /// # Errors
    /// [`Error::Corrupt`] for an entry that does not decode; store failures.
    pub fn audit_entries(&self, patient: Option<&PatientId>) -> Result<Vec<AuditEntry>> {
        let entries = audit::decode_entries(self.store().audit_raw(1)?)?;
        Ok(match patient {
            None => entries,
            Some(p) => entries.into_iter().filter(|e| e.patient.as_ref() == Some(p)).collect(),
        })
    }
}
