//! What the record layer reads: readable changes, collection loads with local snapshots, the blind resource index.

use super::*;

/// What [`Node::load_collection`] returns.
#[derive(Debug)]
pub struct CollectionLoad {
    /// The usable local snapshot, if any.
    pub snapshot: Option<Snapshot>,
    /// Readable changes the snapshot does not cover (all of them without
    /// one), decrypted, in store order.
    pub changes: Vec<(EnvelopeId, Zeroizing<Vec<u8>>)>,
}

impl Node {
    /// Every readable change of a collection, decrypted, in store order
    /// (a cold load of the document). Corrupt items are quarantined and
    /// skipped.
    ///
    /// # Errors
    /// Store failures.
    pub async fn readable_changes(
        &self,
        patient: PatientId,
        collection: Collection,
    ) -> Result<Vec<Zeroizing<Vec<u8>>>> {
        let ids = self.readable_envelope_ids(patient, collection)?;
        Ok(self
            .changes_by_ids(patient, collection, &ids)
            .await?
            .into_iter()
            .map(|(_, c)| c)
            .collect())
    }

    /// Ids of the envelopes of a collection held readable, in store order.
    ///
    /// # Errors
    /// Store failures.
    pub fn readable_envelope_ids(&self, patient: PatientId, collection: Collection) -> Result<Vec<EnvelopeId>> {
        let mut entries: Vec<EnvelopeEntry> = self
            .store()
            .envelopes(&patient, Some(collection))?
            .into_iter()
            .filter(|e| e.state == EnvelopeState::Readable)
            .collect();
        entries.sort_by_key(|e| e.seq);
        Ok(entries.into_iter().map(|e| e.id).collect())
    }

    /// What a cold load of a collection needs: its local snapshot if one is
    /// usable (see [`Node::load_snapshot`]; also dropped here if it covers
    /// an envelope no longer held readable), and the decrypted readable
    /// changes it does not cover, in store order, with their envelope ids.
    ///
    /// # Errors
    /// Store failures.
    pub async fn load_collection(&self, patient: PatientId, collection: Collection) -> Result<CollectionLoad> {
        let ids = self.readable_envelope_ids(patient, collection)?;
        let mut snapshot = match self.load_snapshot(patient, collection) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%collection, cause = %e, "reading the snapshot failed; replaying the history");
                None
            }
        };
        if let Some(s) = &snapshot {
            let held: HashSet<&EnvelopeId> = ids.iter().collect();
            if !s.covered.iter().all(|(id, _)| held.contains(id)) {
                tracing::info!(%collection, "snapshot covers envelopes no longer readable; dropped");
                self.drop_snapshot(patient, collection)?;
                snapshot = None;
            }
        }
        let rest: Vec<EnvelopeId> = match &snapshot {
            Some(s) => {
                let covered: HashSet<&EnvelopeId> = s.covered.iter().map(|(id, _)| id).collect();
                ids.iter().filter(|id| !covered.contains(id)).copied().collect()
            }
            None => ids,
        };
        let changes = self.changes_by_ids(patient, collection, &rest).await?;
        Ok(CollectionLoad { snapshot, changes })
    }

    /// Seals `doc` (the record layer's saved document) together with the
    /// (envelope id, change hash) of every change it holds under the current epoch
    /// key, and keeps it as the local snapshot of (patient, collection).
    /// Returns `false`, keeping nothing, when the node holds no current
    /// epoch key. Snapshots are local: never synced, never flushed on their
    /// own (a lost one costs a replay).
    ///
    /// # Errors
    /// Crypto and store failures.
    pub fn save_snapshot(
        &self,
        patient: PatientId,
        collection: Collection,
        covered: &[crate::snapshot::Covered],
        doc: &[u8],
    ) -> Result<bool> {
        let Some(key) = self.current_epoch_key(&patient, collection) else {
            return Ok(false);
        };
        let payload = crate::snapshot::encode(covered, doc);
        let sealed = SealedSnapshot::seal(&key, &payload)?;
        self.store().put_snapshot(&patient, collection, &sealed)?;
        tracing::debug!(%collection, covered = covered.len(), bytes = sealed.len(), "snapshot kept");
        Ok(true)
    }

    /// The local snapshot of (patient, collection), opened, if one is kept
    /// and sealed under the current epoch key. One sealed under an older
    /// key is dropped (it is rebuilt under the new one); one that does not
    /// open or parse (bit rot, tampering) is dropped with a warning. Either
    /// way the caller replays the history.
    ///
    /// # Errors
    /// Store failures.
    pub fn load_snapshot(&self, patient: PatientId, collection: Collection) -> Result<Option<Snapshot>> {
        let Some(sealed) = self.store().snapshot(&patient, collection)? else {
            return Ok(None);
        };
        let key = self.current_epoch_key(&patient, collection);
        let current = key.as_ref().map(|k| k.key_id);
        match (SealedSnapshot::key_id(&sealed), key) {
            (Ok(id), Some(key)) if Some(id) == current => {
                match SealedSnapshot::open(&key, &sealed)
                    .ok()
                    .and_then(|p| crate::snapshot::decode(&p))
                {
                    Some(s) => return Ok(Some(s)),
                    None => {
                        tracing::warn!(%collection, "snapshot does not open or parse; dropped, replaying the history");
                    }
                }
            }
            (Ok(_), _) => tracing::info!(%collection, "snapshot sealed under another epoch key; dropped"),
            (Err(e), _) => tracing::warn!(%collection, cause = %e, "snapshot is malformed; dropped"),
        }
        self.drop_snapshot(patient, collection)?;
        Ok(None)
    }

    /// The blind key of a resource key (`Type/id`): SHA-256 of the node's
    /// index key (derived from its identity seed) and the resource key, so
    /// the disk shows neither types nor ids, and guesses cannot be checked
    /// without the node key.
    pub(super) fn blind(&self, resource_key: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.inner.index_key.as_slice());
        h.update(resource_key.as_bytes());
        h.finalize().into()
    }

    /// Where the resource `Type/id` lives, from the blind resource index on
    /// disk (filled by the record layer with [`Node::index_resources`]).
    ///
    /// # Errors
    /// Store failures.
    pub fn locate_resource(&self, resource_key: &str) -> Result<Option<(PatientId, Collection)>> {
        self.store().resource_location(&self.blind(resource_key))
    }

    /// Records in the blind resource index that these resource keys live in
    /// (patient, collection). Not flushed on its own; a lost entry costs a
    /// scan of the readable documents, which records it again.
    ///
    /// # Errors
    /// Store failures.
    pub fn index_resources<'k>(
        &self,
        patient: PatientId,
        collection: Collection,
        keys: impl IntoIterator<Item = &'k str>,
    ) -> Result<()> {
        let entries: Vec<([u8; 32], PatientId, Collection)> =
            keys.into_iter().map(|k| (self.blind(k), patient, collection)).collect();
        if entries.is_empty() {
            return Ok(());
        }
        self.store().put_resource_locations(&entries)
    }

    /// Drops the local snapshot of (patient, collection), if any.
    ///
    /// # Errors
    /// Store failures.
    pub fn drop_snapshot(&self, patient: PatientId, collection: Collection) -> Result<()> {
        self.store().remove_snapshot(&patient, collection)
    }

    /// The decrypted changes of the given envelopes of a collection (those
    /// held readable; others are skipped).
    ///
    /// # Errors
    /// Store failures.
    pub async fn changes_by_ids(
        &self,
        patient: PatientId,
        collection: Collection,
        ids: &[EnvelopeId],
    ) -> Result<Vec<(EnvelopeId, Zeroizing<Vec<u8>>)>> {
        let mut items = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(item) = self.store().item(&(*id).into())? else {
                tracing::debug!(envelope = %id, "not held");
                continue;
            };
            if item.meta.patient == patient && item.meta.collection == Some(collection) {
                items.push((*id, item));
            }
        }
        // Checking the signature, decrypting and parsing the change are independent
        // per envelope and dominate a cold load: spread them over the cores.
        let opened = crate::par::map(&items, 32, |(_, item)| {
            match decode_item(item.meta.kind, &item.item.bytes) {
                Ok(Decoded::Envelope(envelope)) => {
                    let key = self.registry().key(&envelope.header().key_ref()).cloned();
                    key.map(|key| Opened::Checked(open_checked(&envelope, &key)))
                }
                Ok(_) => None,
                Err(e) => Some(Opened::Corrupt(e)),
            }
        })
        .ok_or_else(|| Error::Storage("opening stored envelopes failed".into()))?;
        let mut out = Vec::with_capacity(items.len());
        for ((id, item), opened) in items.iter().zip(opened) {
            match opened {
                Some(Opened::Checked(Ok(plain))) => out.push((*id, plain)),
                Some(Opened::Checked(Err(e))) => {
                    tracing::warn!(envelope = %id, cause = %e, "stored envelope does not open")
                }
                Some(Opened::Corrupt(e)) => {
                    let e = self.quarantine(&item.meta, e).await?;
                    tracing::warn!(envelope = %id, cause = %e, "skipped");
                }
                None => {}
            }
        }
        Ok(out)
    }

    // ----- consent registry -------------------------------------------
}
