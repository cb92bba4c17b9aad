//! The item log as sync sees it: instance, seqs, items, cursors, the outbox, pending and rejected counts.

use super::*;

impl Node {
    /// The store instance id (cursors are (instance id, seq)).
    pub fn instance_id(&self) -> InstanceId {
        self.store().instance_id()
    }

    /// Highest seq given out.
    pub fn last_seq(&self) -> Seq {
        self.store().last_seq()
    }

    /// Items with seq > `after`, at most `limit`, each re-verified; corrupt
    /// ones are quarantined and left out. Filter them with
    /// [`Node::may_disclose`] before serving.
    ///
    /// # Errors
    /// Store failures.
    pub async fn items_after(&self, after: Seq, limit: usize) -> Result<Vec<StoredItem>> {
        let items = self.store().items_after(after, limit)?;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            if self.verified(&item).await.is_ok() {
                out.push(item);
            }
        }
        Ok(out)
    }

    /// Items with seq > `after`, at most `limit`, **not** re-verified: for a
    /// server that decides from their metadata what to send and checks each
    /// item it does send with [`Node::check_stored`] (items it leaves out,
    /// e.g. envelopes a snapshot transfer covers, then cost no signature check).
    ///
    /// # Errors
    /// Store failures.
    pub fn scan_after(&self, after: Seq, limit: usize) -> Result<Vec<StoredItem>> {
        self.store().items_after(after, limit)
    }

    /// Re-verifies an item read by [`Node::scan_after`] before it is sent:
    /// `false` when it fails (it is then quarantined, as by [`Node::items_after`]).
    ///
    /// # Errors
    /// Store failures while quarantining.
    pub async fn check_stored(&self, meta: &ItemMeta, bytes: &[u8]) -> Result<bool> {
        match decode_item(meta.kind, bytes) {
            Ok(_) => Ok(true),
            Err(e) => {
                self.quarantine(meta, e).await?;
                Ok(false)
            }
        }
    }

    /// One item, re-verified.
    ///
    /// # Errors
    /// [`Error::CorruptItem`] (the item is quarantined), store failures.
    pub async fn item(&self, id: &ItemId) -> Result<Option<StoredItem>> {
        let Some(item) = self.store().item(id)? else {
            return Ok(None);
        };
        self.verified(&item).await?;
        Ok(Some(item))
    }

    /// A peer's cursor.
    ///
    /// # Errors
    /// Store failures.
    pub fn cursor(&self, peer: &PeerId) -> Result<Option<Cursor>> {
        self.store().cursor(&peer.to_bytes())
    }

    /// Sets a peer's cursor (not flushed at once: a lost cursor only costs
    /// a re-pull).
    ///
    /// # Errors
    /// Store failures.
    pub async fn set_cursor(&self, peer: &PeerId, cursor: Cursor) -> Result<()> {
        let mut batch = Batch::new();
        batch.push(Op::SetCursor {
            peer: peer.to_bytes(),
            cursor,
        });
        self.commit(batch, false).await.map(|_| ())
    }

    /// The consent items this node owes peers (issue 16, durable delivery).
    ///
    /// # Errors
    /// Store failures.
    pub fn outbox(&self) -> Result<Vec<crate::store::OutboxEntry>> {
        self.store().outbox()
    }

    /// Records debts, durably (flushed before this returns).
    ///
    /// # Errors
    /// Store failures.
    pub fn put_outbox(&self, entries: &[crate::store::OutboxEntry]) -> Result<()> {
        self.store().put_outbox(entries)
    }

    /// Clears debts by (peer bytes, item).
    ///
    /// # Errors
    /// Store failures.
    pub fn remove_outbox(&self, keys: &[(Vec<u8>, ItemId)]) -> Result<()> {
        self.store().remove_outbox(keys)
    }

    /// Index entries of the envelopes held for (patient, collection), or
    /// all collections: the summaries reconciliation exchanges.
    ///
    /// # Errors
    /// Store failures.
    pub fn envelopes(&self, patient: &PatientId, collection: Option<Collection>) -> Result<Vec<EnvelopeEntry>> {
        self.store().envelopes(patient, collection)
    }

    /// Ids of the envelopes held for (patient, collection), in change order:
    /// each actor's changes by ascending seq. A peer that fetches them in this
    /// order receives every change after its predecessor, so none waits for
    /// a seq gap (the store's own order, by id, would park almost all of a
    /// long history and overflow the gap queue).
    ///
    /// # Errors
    /// Store failures.
    pub fn envelope_ids(&self, patient: &PatientId, collection: Collection) -> Result<Vec<EnvelopeId>> {
        let mut held = self.store().envelopes(patient, Some(collection))?;
        held.sort_unstable_by_key(|e| (e.change_seq, e.actor, e.id));
        Ok(held.into_iter().map(|e| e.id).collect())
    }

    /// Patients with envelopes held here.
    ///
    /// # Errors
    /// Store failures.
    pub fn patients(&self) -> Result<Vec<PatientId>> {
        self.store().patients()
    }

    /// Number of items waiting in the pending queue.
    ///
    /// # Errors
    /// Store failures.
    pub fn pending_count(&self) -> Result<usize> {
        Ok(self.store().pending(None)?.len())
    }

    /// Whether an item id (or hash of undecodable bytes) is recorded rejected.
    ///
    /// # Errors
    /// Store failures.
    pub fn is_rejected(&self, key: &[u8; 32]) -> Result<bool> {
        Ok(self.store().rejected(key)?.is_some())
    }

    /// Number of rejections recorded.
    ///
    /// # Errors
    /// Store failures.
    pub fn rejected_count(&self) -> Result<u64> {
        self.store().rejected_count()
    }

    // ----- holdings and audit -----------------------------------------
}
