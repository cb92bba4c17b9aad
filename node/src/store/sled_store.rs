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

use std::path::Path;
use std::sync::Mutex;

use medmesh_crypto::{Collection, PatientId, now};
use sled::Transactional as _;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};

use super::codec::{self, seq_key};
use super::{
    Batch, Committed, Cursor, EnvelopeEntry, InstanceId, Item, ItemId, ItemKind, KeptAddressRecord, Op, OutboxEntry,
    PendingItem, PendingReason, Rejection, Seq, Store, StoredItem, SyncCheck,
};
use crate::audit;
use crate::{Error, Result};

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

impl SledStore {
    /// Rewrites pending entries of layout 1, whose key named a grant by id
    /// alone, with the patient of the envelope that waits (layout 2). An
    /// entry whose envelope does not parse is dropped: reconciliation
    /// fetches it again.
    fn migrate_pending_v1(&self) -> Result<()> {
        let mut batch = sled::Batch::default();
        let mut moved = 0usize;
        for entry in self.pending.iter() {
            let (k, v) = entry.map_err(storage)?;
            if k.len() != codec::PENDING_KEY_LEN_V1 {
                continue;
            }
            batch.remove(k.as_ref());
            match codec::pending_key_from_v1(&k, &v) {
                Some(key) => batch.insert(key, v),
                None => tracing::warn!(key = %hex::encode(&k), "pending entry of layout 1 does not parse; dropped"),
            }
            moved += 1;
        }
        if moved > 0 {
            self.pending.apply_batch(batch).map_err(storage)?;
            self.db.flush().map_err(storage)?;
            tracing::info!(entries = moved, "pending queue moved to store layout 2");
        }
        Ok(())
    }

    /// Renumbers the item kinds written by layouts 1 and 2 (layout 3). Each
    /// chunk of entries is rewritten in one transaction with the key it got
    /// to, so a crash mid-way resumes where it stopped and never renumbers
    /// an entry twice.
    fn migrate_kinds_v2(&self, meta: &sled::Tree) -> Result<()> {
        let trees = [
            ("items", &self.items),
            ("seqlog", &self.seqlog),
            ("consent", &self.consent),
            ("pending", &self.pending),
        ];
        let mut moved = 0usize;
        for (name, tree) in trees {
            let progress_key = format!("layout-3-progress/{name}");
            loop {
                let entries = match meta.get(&progress_key).map_err(storage)? {
                    Some(after) => {
                        tree.range::<&[u8], _>((std::ops::Bound::Excluded(after.as_ref()), std::ops::Bound::Unbounded))
                    }
                    None => tree.iter(),
                };
                let mut chunk = Vec::with_capacity(MIGRATION_CHUNK);
                for entry in entries.take(MIGRATION_CHUNK) {
                    let (k, v) = entry.map_err(storage)?;
                    chunk.push((k, codec::kind_renumbered_from_v2(name, &v)));
                }
                let Some((last, _)) = chunk.last() else {
                    break;
                };
                let last = last.clone();
                (tree, meta)
                    .transaction(|(t, m)| {
                        for (k, v) in &chunk {
                            if let Some(v) = v {
                                t.insert(k, v.as_slice())?;
                            }
                        }
                        m.insert(progress_key.as_bytes(), &last)?;
                        Ok::<_, ConflictableTransactionError<Error>>(())
                    })
                    .map_err(|e| match e {
                        TransactionError::Abort(e) => e,
                        TransactionError::Storage(e) => storage(e),
                    })?;
                moved += chunk.len();
            }
        }
        meta.insert(LAYOUT_KEY, LAYOUT_VERSION).map_err(storage)?;
        for name in ["items", "seqlog", "consent", "pending"] {
            meta.remove(format!("layout-3-progress/{name}")).map_err(storage)?;
        }
        self.db.flush().map_err(storage)?;
        tracing::info!(entries = moved, "item kinds renumbered for store layout 3");
        Ok(())
    }

    /// Opens (or creates) the store in directory `path`.
    ///
    /// # Errors
    /// [`Error::Storage`] when sled cannot open the directory (another
    /// process holds it, I/O errors); [`Error::Corrupt`] for a damaged
    /// instance id.
    pub fn open(path: &Path) -> Result<Self> {
        // sled's page cache defaults to 1 GiB; decrypted documents are cached above it.
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(SLED_CACHE_BYTES)
            .open()
            .map_err(storage)?;
        let tree = |name: &str| db.open_tree(name).map_err(storage);
        let meta = tree("meta")?;
        let instance = match meta.get(INSTANCE_KEY).map_err(storage)? {
            Some(v) => InstanceId(v.as_ref().try_into().map_err(|_| Error::Corrupt {
                what: "instance id",
                key: "meta/instance-id".into(),
            })?),
            None => {
                let mut id = [0u8; 16];
                getrandom::fill(&mut id).map_err(|_| Error::Crypto(medmesh_crypto::Error::Random))?;
                meta.insert(LAYOUT_KEY, LAYOUT_VERSION).map_err(storage)?;
                meta.insert(INSTANCE_KEY, &id[..]).map_err(storage)?;
                db.flush().map_err(storage)?;
                InstanceId(id)
            }
        };
        let store = Self {
            items: tree("items")?,
            seqlog: tree("seqlog")?,
            consent: tree("consent")?,
            envelopes: tree("envelopes")?,
            pending: tree("pending")?,
            rejected: tree("rejected")?,
            cursors: tree("cursors")?,
            audit: tree("audit")?,
            audit_checkpoint: tree("audit-checkpoint")?,
            snapshots: tree("snapshots")?,
            resources: tree("resources")?,
            outbox: tree("outbox")?,
            sync_checks: tree("sync-checks")?,
            address_records: tree("address-records")?,
            db,
            instance,
            heads: Mutex::new(Heads {
                next_seq: 1,
                next_audit: 1,
                audit_head: [0; 32],
            }),
        };
        // A store from before layout 2 kept no layout key.
        let layout = meta.get(LAYOUT_KEY).map_err(storage)?;
        if layout.as_deref() != Some(LAYOUT_VERSION) {
            store.migrate_pending_v1()?;
            store.migrate_kinds_v2(&meta)?;
        }
        let next_seq = match store.seqlog.last().map_err(storage)? {
            Some((k, _)) => codec::seq_from_key(&k)? + 1,
            None => 1,
        };
        let (next_audit, audit_head) = match store.audit.last().map_err(storage)? {
            Some((k, v)) => {
                let seq = codec::seq_from_key(&k)?;
                (seq + 1, audit::head_hash(seq, &v))
            }
            None => (1, [0; 32]),
        };
        if let Ok(mut heads) = store.heads.lock() {
            *heads = Heads {
                next_seq,
                next_audit,
                audit_head,
            };
        }
        Ok(store)
    }
}

type Tx<'a> = &'a TransactionalTree;
type Abortable<T> = std::result::Result<T, ConflictableTransactionError<Error>>;

fn abort<T>(e: Error) -> Abortable<T> {
    Err(ConflictableTransactionError::Abort(e))
}

struct Trees<'a> {
    items: Tx<'a>,
    seqlog: Tx<'a>,
    consent: Tx<'a>,
    envelopes: Tx<'a>,
    pending: Tx<'a>,
    rejected: Tx<'a>,
    cursors: Tx<'a>,
    audit: Tx<'a>,
}

fn apply_op(t: &Trees<'_>, op: &Op, heads: &mut Heads, out: &mut Committed, time: u64) -> Abortable<()> {
    match op {
        Op::PutItem { meta, bytes, envelope } => {
            if t.items.get(meta.id.0)?.is_some() {
                return Ok(());
            }
            let seq = heads.next_seq;
            t.items.insert(&meta.id.0, codec::item_value(meta.kind, seq, bytes))?;
            t.seqlog.insert(&seq_key(seq), codec::meta_value(meta))?;
            if meta.kind != ItemKind::Envelope {
                t.consent.insert(&seq_key(seq), codec::consent_value(meta, bytes))?;
            }
            if let Some(entry) = envelope {
                let mut entry = (**entry).clone();
                entry.seq = seq;
                t.envelopes.insert(
                    codec::envelope_key(&entry.patient, entry.collection, &entry.id),
                    codec::envelope_value(&entry),
                )?;
            }
            heads.next_seq += 1;
            out.items.push((meta.id, seq));
        }
        Op::PutEnvelopeEntry(entry) => {
            t.envelopes.insert(
                codec::envelope_key(&entry.patient, entry.collection, &entry.id),
                codec::envelope_value(entry),
            )?;
        }
        Op::RemoveItem(id) => {
            let Some(value) = t.items.get(id.0)? else {
                return Ok(());
            };
            let seq = match codec::split_item_value(id, &value) {
                Ok((_, seq, _)) => seq,
                Err(e) => return abort(e),
            };
            t.items.remove(&id.0)?;
            if let Some(meta) = t.seqlog.remove(&seq_key(seq))? {
                let meta = match codec::meta_from(&seq_key(seq), &meta) {
                    Ok(m) => m,
                    Err(e) => return abort(e),
                };
                if let (ItemKind::Envelope, Some(c)) = (meta.kind, meta.collection) {
                    t.envelopes
                        .remove(codec::envelope_key(&meta.patient, c, &medmesh_crypto::EnvelopeId(id.0)))?;
                }
            }
            t.consent.remove(&seq_key(seq))?;
        }
        Op::AddPending(p) => {
            t.pending
                .insert(codec::pending_key(p.reason, &p.hash), codec::pending_value(p))?;
        }
        Op::RemovePending { reason, hash } => {
            t.pending.remove(codec::pending_key(*reason, hash))?;
        }
        Op::AddRejected { key, reason } => {
            if t.rejected.get(key)?.is_none() {
                t.rejected.insert(
                    &key[..],
                    codec::rejection_value(&Rejection {
                        time,
                        reason: reason.clone(),
                    }),
                )?;
            }
        }
        Op::SetCursor { peer, cursor } => {
            t.cursors.insert(peer.as_slice(), codec::cursor_value(cursor))?;
        }
        Op::Audit(record) => {
            let seq = heads.next_audit;
            let (bytes, hash) = audit::seal(seq, time, record, &heads.audit_head);
            t.audit.insert(&seq_key(seq), bytes)?;
            heads.next_audit += 1;
            heads.audit_head = hash;
            out.audit.push(seq);
        }
    }
    Ok(())
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use medmesh_crypto::{Collection, Envelope, GrantId, SecretIdentity};

    use super::*;
    use crate::testing::{ChangeMaker, TestPatient};

    /// A pending entry of layout 1 (grant id only) is found under its
    /// envelope's patient once moved (at open).
    #[test]
    fn pending_entries_of_layout_1_are_moved_to_their_patient() {
        let dir = tempfile::tempdir().unwrap();
        let mut patient = TestPatient::new().unwrap();
        let practice = SecretIdentity::from_seed(&[8; 32]);
        let key = patient.key(Collection::Core, 0).unwrap();
        let change = ChangeMaker::new(&practice.public_bytes())
            .unwrap()
            .put("k", "v")
            .unwrap();
        let grant = GrantId([5; 16]);
        let envelope = Envelope::seal(
            (patient.id(), Collection::Core),
            &key,
            &practice,
            Some(grant),
            change.as_change(),
            1,
        )
        .unwrap()
        .encode();
        let hash = [3; 32];
        let store = SledStore::open(dir.path()).unwrap();
        let mut v1 = vec![0];
        v1.extend_from_slice(&grant.0);
        v1.extend_from_slice(&hash);
        // Layouts 1 and 2 numbered an envelope 1.
        let mut value = vec![1];
        value.extend_from_slice(&envelope);
        store.pending.insert(v1, value).unwrap();
        // What `open` does (reopening here would race sled's own lock release).
        store.migrate_pending_v1().unwrap();
        store.migrate_kinds_v2(&store.db.open_tree("meta").unwrap()).unwrap();
        let found = store
            .pending(Some(PendingReason::MissingGrant(patient.id(), grant)))
            .unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].hash, found[0].kind), (hash, ItemKind::Envelope));
        assert_eq!(found[0].bytes, envelope);
        assert_eq!(store.pending(None).unwrap().len(), 1);
    }

    /// The kind numbers of layout 2 (1 envelope, 2 grant, 3 revocation, 4
    /// key share), put back into a layout-3 store's trees.
    fn write_layout_2(store: &SledStore) {
        let v2 = |kind: ItemKind| match kind {
            ItemKind::Envelope => 1u8,
            ItemKind::Grant => 2,
            ItemKind::Revocation => 3,
            ItemKind::KeyShare => 4,
        };
        for (k, v) in store.items.iter().map(Result::unwrap) {
            let mut v = v.to_vec();
            v[0] = v2(ItemKind::from_code(v[0].into()).unwrap());
            store.items.insert(k, v).unwrap();
        }
        let meta_v2 = |v: &[u8]| {
            let mut a = codec::decode(v).unwrap();
            let kind = ItemKind::from_code(codec::get_uint(&a[0]).unwrap()).unwrap();
            a[0] = codec::uint(v2(kind).into());
            codec::encode(&ciborium::Value::Array(a))
        };
        for (k, v) in store.seqlog.iter().map(Result::unwrap) {
            store.seqlog.insert(k, meta_v2(&v)).unwrap();
        }
        for (k, v) in store.consent.iter().map(Result::unwrap) {
            let (meta, wire) = codec::split_consent_value(&k, &v).unwrap();
            let m = meta_v2(&codec::meta_value(&meta));
            let mut out = vec![2];
            out.extend_from_slice(&u32::try_from(m.len()).unwrap().to_be_bytes());
            out.extend_from_slice(&m);
            out.extend_from_slice(wire);
            store.consent.insert(k, out).unwrap();
        }
        store.db.open_tree("meta").unwrap().insert(LAYOUT_KEY, b"2").unwrap();
    }

    /// A store of layout 2 reads the same once its kinds are renumbered,
    /// also when the move was cut off after its first chunk (it resumes
    /// where it stopped and renumbers nothing twice).
    #[test]
    fn a_layout_2_store_moves_to_layout_3_and_resumes_a_cut_off_move() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let mut patient = TestPatient::new().unwrap();
        let mut batch = Batch::new();
        // More grants and shares than one migration chunk.
        for n in 0..(MIGRATION_CHUNK / 2 + 10) {
            let practice = SecretIdentity::from_seed(&[u8::try_from(n % 250).unwrap() + 1; 32]);
            let (_, items) = patient
                .onboard(practice.practice_id().unwrap(), Collection::Core)
                .unwrap();
            for item in items {
                let meta = crate::item::ItemMeta::describe(&item).unwrap();
                batch.push(Op::PutItem {
                    meta,
                    bytes: item.bytes,
                    envelope: None,
                });
            }
        }
        store.commit(&batch).unwrap();
        let before = store.items_after(0, usize::MAX).unwrap();
        let consent_before = store.consent_items().unwrap();
        assert!(before.len() > MIGRATION_CHUNK, "{}", before.len());
        assert!(before.iter().any(|i| i.meta.kind == ItemKind::Grant));
        assert!(before.iter().any(|i| i.meta.kind == ItemKind::KeyShare));

        write_layout_2(&store);
        let meta = store.db.open_tree("meta").unwrap();
        // A move cut off after the first chunk of `items`: those entries
        // are renumbered already and the progress key names the last.
        let first: Vec<_> = store.items.iter().take(MIGRATION_CHUNK).map(Result::unwrap).collect();
        for (k, v) in &first {
            store
                .items
                .insert(k, codec::kind_renumbered_from_v2("items", v).unwrap())
                .unwrap();
        }
        meta.insert("layout-3-progress/items", &first.last().unwrap().0)
            .unwrap();
        assert!(
            store.items_after(0, usize::MAX).is_err() || store.items_after(0, usize::MAX).unwrap() != before,
            "the layout-2 numbers must not read as layout 3"
        );

        store.migrate_kinds_v2(&meta).unwrap();
        assert_eq!(store.items_after(0, usize::MAX).unwrap(), before);
        assert_eq!(store.consent_items().unwrap(), consent_before);
        assert_eq!(meta.get(LAYOUT_KEY).unwrap().as_deref(), Some(LAYOUT_VERSION));
        assert!(meta.scan_prefix("layout-3-progress/").next().is_none());
    }
}
