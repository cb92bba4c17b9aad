//! [`Store`] on sled 0.34. Every [`Batch`] is one sled transaction across
//! the trees below; [`Store::flush`] is `Db::flush` (fsync). No sled type
//! leaves this module.
//!
//! Trees: `meta` (instance id), `items` (id → kind ‖ seq ‖ wire bytes),
//! `seqlog` (seq → item metadata), `consent` (seq → id of grants,
//! revocations, key shares), `envelopes` (patient ‖ collection ‖ envelope id
//! → index entry), `pending`, `rejected`, `cursors`, `audit`, `snapshots`
//! (patient ‖ collection → sealed snapshot; outside transactions),
//! `resources` (blind resource key → patient ‖ collection; outside transactions).
//!
//! This file owns the store and its [`Store`] implementation (one trait
//! impl, kept whole); opening and the layout migrations are in `open.rs`,
//! the effect of each [`Op`] inside the batch transaction in `apply.rs`.

use std::sync::Mutex;

use medmesh_crypto::{Collection, PatientId, now};
use sled::Transactional as _;
use sled::transaction::TransactionError;

use super::codec::{self, seq_key};
use super::{
    Batch, Committed, Cursor, EnvelopeEntry, InstanceId, Item, ItemId, ItemKind, KeptAddressRecord, Op, OutboxEntry,
    PendingItem, PendingReason, Rejection, Seq, Store, StoredItem, SyncCheck,
};
use crate::{Error, Result};

mod apply;
mod open;
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

use apply::{Trees, apply_op};

const INSTANCE_KEY: &[u8] = b"instance-id";
const LAYOUT_KEY: &[u8] = b"layout-version";
/// 2: pending keys name the patient of the grant an envelope waits for.
/// 3: item kinds are written with their one number ([`ItemKind::code`]).
const LAYOUT_VERSION: &[u8] = b"3";
/// Entries rewritten per transaction when a store moves to layout 3.
const MIGRATION_CHUNK: usize = 512;
/// Key of the one checkpoint kept (the latest) in the `audit-checkpoint` tree.
const CHECKPOINT_KEY: &[u8] = b"last";

/// sled page cache (bounds the store's share of RSS).
const SLED_CACHE_BYTES: u64 = 64 * 1024 * 1024;

fn storage(e: sled::Error) -> Error {
    Error::Storage(e.to_string())
}

/// Counters the single writer advances after each successful commit.
struct Heads {
    next_seq: Seq,
    next_audit: u64,
    audit_head: [u8; 32],
}

/// The sled implementation of [`Store`].
pub struct SledStore {
    db: sled::Db,
    items: sled::Tree,
    seqlog: sled::Tree,
    consent: sled::Tree,
    envelopes: sled::Tree,
    pending: sled::Tree,
    rejected: sled::Tree,
    cursors: sled::Tree,
    audit: sled::Tree,
    // Apart from `audit`, so that cutting the log's tail leaves the
    // checkpoint that names its true head.
    audit_checkpoint: sled::Tree,
    snapshots: sled::Tree,
    resources: sled::Tree,
    outbox: sled::Tree,
    sync_checks: sled::Tree,
    address_records: sled::Tree,
    instance: InstanceId,
    // Commits are serialised: seqs and the audit chain need one writer.
    heads: Mutex<Heads>,
}

impl Store for SledStore {
    fn instance_id(&self) -> InstanceId {
        self.instance
    }

    fn commit(&self, batch: &Batch) -> Result<Committed> {
        let mut out = self.commit_group(&[batch])?;
        Ok(out.pop().unwrap_or_default())
    }

    fn commit_group(&self, batches: &[&Batch]) -> Result<Vec<Committed>> {
        if batches.iter().all(|b| b.is_empty()) {
            return Ok(vec![Committed::default(); batches.len()]);
        }
        let mut heads = self
            .heads
            .lock()
            .map_err(|_| Error::Storage("store writer lock poisoned".into()))?;
        let time = now();
        let start = Heads {
            next_seq: heads.next_seq,
            next_audit: heads.next_audit,
            audit_head: heads.audit_head,
        };
        let result = (
            &self.items,
            &self.seqlog,
            &self.consent,
            &self.envelopes,
            &self.pending,
            &self.rejected,
            &self.cursors,
            &self.audit,
        )
            .transaction(
                |(items, seqlog, consent, envelopes, pending, rejected, cursors, audit)| {
                    let trees = Trees {
                        items,
                        seqlog,
                        consent,
                        envelopes,
                        pending,
                        rejected,
                        cursors,
                        audit,
                    };
                    // A retried closure starts again from the same heads.
                    let mut local = Heads {
                        next_seq: start.next_seq,
                        next_audit: start.next_audit,
                        audit_head: start.audit_head,
                    };
                    let mut outs = Vec::with_capacity(batches.len());
                    for batch in batches {
                        let mut out = Committed::default();
                        for op in &batch.ops {
                            apply_op(&trees, op, &mut local, &mut out, time)?;
                        }
                        outs.push(out);
                    }
                    Ok((local, outs))
                },
            );
        match result {
            Ok((local, outs)) => {
                *heads = local;
                Ok(outs)
            }
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(storage(e)),
        }
    }

    fn flush(&self) -> Result<()> {
        self.db.flush().map(|_| ()).map_err(storage)
    }

    fn last_seq(&self) -> Seq {
        self.heads.lock().map_or(0, |h| h.next_seq.saturating_sub(1))
    }

    fn contains(&self, id: &ItemId) -> Result<bool> {
        self.items.contains_key(id.0).map_err(storage)
    }

    fn item(&self, id: &ItemId) -> Result<Option<StoredItem>> {
        let Some(value) = self.items.get(id.0).map_err(storage)? else {
            return Ok(None);
        };
        let (kind, seq, wire) = codec::split_item_value(id, &value)?;
        let Some(meta) = self.seqlog.get(seq_key(seq)).map_err(storage)? else {
            return Err(Error::Corrupt {
                what: "sequence log",
                key: seq.to_string(),
            });
        };
        Ok(Some(StoredItem {
            seq,
            meta: codec::meta_from(&seq_key(seq), &meta)?,
            item: Item::new(kind, wire.to_vec()),
        }))
    }

    fn items_after(&self, after: Seq, limit: usize) -> Result<Vec<StoredItem>> {
        let mut out = Vec::new();
        let start = after.saturating_add(1);
        for entry in self.seqlog.range(seq_key(start)..) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = entry.map_err(storage)?;
            let seq = codec::seq_from_key(&k)?;
            let meta = codec::meta_from(&k, &v)?;
            let Some(value) = self.items.get(meta.id.0).map_err(storage)? else {
                continue;
            };
            let (kind, _, wire) = codec::split_item_value(&meta.id, &value)?;
            out.push(StoredItem {
                seq,
                item: Item::new(kind, wire.to_vec()),
                meta,
            });
        }
        Ok(out)
    }

    fn consent_items(&self) -> Result<Vec<StoredItem>> {
        let mut out = Vec::new();
        for entry in self.consent.iter() {
            let (k, v) = entry.map_err(storage)?;
            if v.len() == 32 {
                // Layout 1: the item id only.
                let id = ItemId(v.as_ref().try_into().map_err(|_| Error::Corrupt {
                    what: "consent index",
                    key: hex::encode(&v),
                })?);
                if let Some(item) = self.item(&id)? {
                    out.push(item);
                }
                continue;
            }
            let (meta, wire) = codec::split_consent_value(&k, &v)?;
            out.push(StoredItem {
                seq: codec::seq_from_key(&k)?,
                item: Item::new(meta.kind, wire.to_vec()),
                meta,
            });
        }
        Ok(out)
    }

    fn envelopes(&self, patient: &PatientId, collection: Option<Collection>) -> Result<Vec<EnvelopeEntry>> {
        self.envelopes
            .scan_prefix(codec::envelope_prefix(patient, collection))
            .map(|entry| {
                let (k, v) = entry.map_err(storage)?;
                codec::envelope_from(&k, &v)
            })
            .collect()
    }

    fn patients(&self) -> Result<Vec<PatientId>> {
        let mut out = Vec::new();
        let mut start: Vec<u8> = Vec::new();
        loop {
            let Some(entry) = self.envelopes.range(start.clone()..).next() else {
                break;
            };
            let (k, _) = entry.map_err(storage)?;
            let key: [u8; 32] = k
                .get(..32)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| Error::Corrupt {
                    what: "envelope index key",
                    key: hex::encode(&k),
                })?;
            out.push(PatientId::from_bytes(key).map_err(|_| Error::Corrupt {
                what: "envelope index key",
                key: hex::encode(&k),
            })?);
            // Jump past every key of this patient: the next 32-byte prefix.
            start = key.to_vec();
            start.push(0xff);
            start.push(0xff);
        }
        Ok(out)
    }

    fn pending(&self, reason: Option<PendingReason>) -> Result<Vec<PendingItem>> {
        let prefix = reason.map(codec::pending_prefix).unwrap_or_default();
        self.pending
            .scan_prefix(prefix)
            .map(|entry| {
                let (k, v) = entry.map_err(storage)?;
                codec::pending_from(&k, &v)
            })
            .collect()
    }

    fn seq_gaps_of(&self, patient: &PatientId, author: &[u8; 16]) -> Result<usize> {
        let mut n = 0;
        for key in self.pending.scan_prefix(codec::seq_gap_prefix(patient, author)).keys() {
            key.map_err(storage)?;
            n += 1;
        }
        Ok(n)
    }

    fn rejected(&self, key: &[u8; 32]) -> Result<Option<Rejection>> {
        self.rejected
            .get(key)
            .map_err(storage)?
            .map(|v| codec::rejection_from(key, &v))
            .transpose()
    }

    fn rejected_count(&self) -> Result<u64> {
        Ok(self.rejected.len() as u64)
    }

    fn cursor(&self, peer: &[u8]) -> Result<Option<Cursor>> {
        self.cursors
            .get(peer)
            .map_err(storage)?
            .map(|v| codec::cursor_from(peer, &v))
            .transpose()
    }

    fn audit_raw(&self, from: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        self.audit
            .range(seq_key(from)..)
            .map(|entry| {
                let (k, v) = entry.map_err(storage)?;
                Ok((codec::seq_from_key(&k)?, v.to_vec()))
            })
            .collect()
    }

    fn raw_item_bytes(&self, id: &ItemId) -> Result<Option<Vec<u8>>> {
        let Some(value) = self.items.get(id.0).map_err(storage)? else {
            return Ok(None);
        };
        let (_, _, wire) = codec::split_item_value(id, &value)?;
        Ok(Some(wire.to_vec()))
    }

    fn raw_replace_item_bytes(&self, id: &ItemId, bytes: &[u8]) -> Result<()> {
        let Some(value) = self.items.get(id.0).map_err(storage)? else {
            return Ok(());
        };
        let (kind, seq, _) = codec::split_item_value(id, &value)?;
        self.items
            .insert(id.0, codec::item_value(kind, seq, bytes))
            .map_err(storage)?;
        if kind != ItemKind::Envelope
            && let Some(meta) = self.seqlog.get(seq_key(seq)).map_err(storage)?
        {
            let meta = codec::meta_from(&seq_key(seq), &meta)?;
            self.consent
                .insert(seq_key(seq), codec::consent_value(&meta, bytes))
                .map_err(storage)?;
        }
        self.flush()
    }

    fn raw_replace_audit(&self, seq: u64, bytes: &[u8]) -> Result<()> {
        self.audit.insert(seq_key(seq), bytes).map_err(storage)?;
        self.flush()
    }

    fn audit_head(&self) -> (u64, [u8; 32]) {
        self.heads
            .lock()
            .map_or((0, [0; 32]), |h| (h.next_audit - 1, h.audit_head))
    }

    fn audit_entry(&self, seq: u64) -> Result<Option<Vec<u8>>> {
        Ok(self.audit.get(seq_key(seq)).map_err(storage)?.map(|v| v.to_vec()))
    }

    fn audit_checkpoint(&self) -> Result<Option<Vec<u8>>> {
        Ok(self
            .audit_checkpoint
            .get(CHECKPOINT_KEY)
            .map_err(storage)?
            .map(|v| v.to_vec()))
    }

    fn put_audit_checkpoint(&self, signed: &[u8]) -> Result<()> {
        self.audit_checkpoint.insert(CHECKPOINT_KEY, signed).map_err(storage)?;
        Ok(())
    }

    fn raw_truncate_audit(&self, from: u64) -> Result<()> {
        for entry in self.audit.range(seq_key(from)..) {
            let (k, _) = entry.map_err(storage)?;
            self.audit.remove(k).map_err(storage)?;
        }
        self.flush()
    }

    fn snapshot(&self, patient: &PatientId, collection: Collection) -> Result<Option<Vec<u8>>> {
        Ok(self
            .snapshots
            .get(codec::envelope_prefix(patient, Some(collection)))
            .map_err(storage)?
            .map(|v| v.to_vec()))
    }

    fn snapshot_head(&self, patient: &PatientId, collection: Collection, len: usize) -> Result<Option<(Vec<u8>, u64)>> {
        Ok(self
            .snapshots
            .get(codec::envelope_prefix(patient, Some(collection)))
            .map_err(storage)?
            .map(|v| (v[..v.len().min(len)].to_vec(), v.len() as u64)))
    }

    fn put_snapshot(&self, patient: &PatientId, collection: Collection, sealed: &[u8]) -> Result<()> {
        self.snapshots
            .insert(codec::envelope_prefix(patient, Some(collection)), sealed)
            .map(|_| ())
            .map_err(storage)
    }

    fn resource_location(&self, blind: &[u8; 32]) -> Result<Option<(PatientId, Collection)>> {
        let Some(v) = self.resources.get(blind).map_err(storage)? else {
            return Ok(None);
        };
        let parsed = (v.len() == 33)
            .then(|| {
                let patient = PatientId::from_bytes(v[..32].try_into().ok()?).ok()?;
                Some((patient, codec::collection_from_tag(v[32])?))
            })
            .flatten();
        parsed.map(Some).ok_or_else(|| Error::Corrupt {
            what: "resource index",
            key: hex::encode(blind),
        })
    }

    fn put_resource_locations(&self, entries: &[([u8; 32], PatientId, Collection)]) -> Result<()> {
        let mut batch = sled::Batch::default();
        for (blind, patient, collection) in entries {
            batch.insert(&blind[..], codec::envelope_prefix(patient, Some(*collection)));
        }
        self.resources.apply_batch(batch).map_err(storage)
    }

    fn remove_snapshot(&self, patient: &PatientId, collection: Collection) -> Result<()> {
        self.snapshots
            .remove(codec::envelope_prefix(patient, Some(collection)))
            .map(|_| ())
            .map_err(storage)
    }

    fn outbox(&self) -> Result<Vec<OutboxEntry>> {
        let mut out = Vec::new();
        for kv in &self.outbox {
            let (k, v) = kv.map_err(storage)?;
            out.push(codec::outbox_entry(&k, &v)?);
        }
        Ok(out)
    }

    fn put_outbox(&self, entries: &[OutboxEntry]) -> Result<()> {
        let mut batch = sled::Batch::default();
        for e in entries {
            batch.insert(codec::outbox_key(&e.peer, &e.item), codec::outbox_value(e));
        }
        self.outbox.apply_batch(batch).map_err(storage)?;
        self.outbox.flush().map(|_| ()).map_err(storage)
    }

    fn remove_outbox(&self, keys: &[(Vec<u8>, ItemId)]) -> Result<()> {
        let mut batch = sled::Batch::default();
        for (peer, item) in keys {
            batch.remove(codec::outbox_key(peer, item));
        }
        self.outbox.apply_batch(batch).map_err(storage)
    }

    fn pending_of(&self, patient: &PatientId) -> Result<Vec<PendingItem>> {
        let mut out = Vec::new();
        for tag in [0u8, 2] {
            let mut prefix = vec![tag];
            prefix.extend_from_slice(patient.as_bytes());
            for entry in self.pending.scan_prefix(prefix) {
                let (k, v) = entry.map_err(storage)?;
                out.push(codec::pending_from(&k, &v)?);
            }
        }
        Ok(out)
    }

    fn sync_checks(&self, patient: &PatientId) -> Result<Vec<SyncCheck>> {
        self.sync_checks
            .scan_prefix(patient.as_bytes())
            .map(|entry| {
                let (k, v) = entry.map_err(storage)?;
                codec::sync_check(&k, &v)
            })
            .collect()
    }

    fn address_records(&self) -> Result<Vec<KeptAddressRecord>> {
        self.address_records
            .iter()
            .map(|entry| {
                let (k, v) = entry.map_err(storage)?;
                codec::address_record(&k, &v)
            })
            .collect()
    }

    fn address_record(&self, peer: &[u8]) -> Result<Option<KeptAddressRecord>> {
        self.address_records
            .get(peer)
            .map_err(storage)?
            .map(|v| codec::address_record(peer, &v))
            .transpose()
    }

    fn address_record_count(&self) -> Result<usize> {
        Ok(self.address_records.len())
    }

    fn put_address_record(&self, peer: &[u8], seq: u64, signed: &[u8]) -> Result<()> {
        self.address_records
            .insert(peer, codec::address_record_value(seq, signed))
            .map(|_| ())
            .map_err(storage)
    }

    fn put_sync_check(&self, check: &SyncCheck) -> Result<()> {
        self.sync_checks
            .insert(
                codec::sync_check_key(&check.patient, check.collection, &check.peer),
                codec::sync_check_value(check),
            )
            .map(|_| ())
            .map_err(storage)
    }
}
