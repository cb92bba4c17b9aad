//! The storage interface: what a node keeps on disk, independent of the
//! engine. [`SledStore`] implements it on sled 0.34; no sled type appears
//! outside `store::sled_store`, so a redb or fjall store is a drop-in.
//!
//! What is stored (see `docs/storage.md`):
//! - items by id: envelopes, grants, revocations and key shares, as their
//!   signed wire bytes, each with the next local sequence number;
//! - the sequence log (seq → item metadata), for sync's "items after N";
//! - indexes holding only ids and signed metadata (patient did bytes,
//!   collection, envelope id, grant id, epoch, actor/seq) — never content;
//! - the pending queue, the rejected set, per-peer cursors;
//! - the hash-chained audit log;
//! - sealed snapshots, one per (patient, collection): a local cache of the
//!   document, encrypted under the current epoch key, never synced;
//! - the blind resource index: keyed hash of `Type/id` → (patient, collection);
//! - the store instance id (16 random bytes made at creation).
//!
//! One [`Batch`] is applied atomically (all its ops or none). Durability is
//! a separate [`Store::flush`], so a committer can share one flush among
//! many batches (group commit).

mod codec;
mod sled_store;

use medmesh_crypto::{ActorId, Collection, EnvelopeId, Epoch, GrantId, KeyId, PatientId, Timestamp};

use crate::Result;
use crate::audit::AuditRecord;

pub use sled_store::SledStore;

pub use crate::item::{Cursor, InstanceId, Item, ItemId, ItemKind, ItemMeta, Seq, StoredItem};

/// Whether the node can read an envelope it holds.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EnvelopeState {
    /// Valid, but the node holds no key for its epoch: kept and relayed.
    Opaque,
    /// Opened and checked with a key the node holds.
    Readable,
}

/// Index entry of one held envelope: ids and signed header fields only.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct EnvelopeEntry {
    /// Envelope id.
    pub id: EnvelopeId,
    /// Whose record.
    pub patient: PatientId,
    /// Which collection.
    pub collection: Collection,
    /// Readable or opaque.
    pub state: EnvelopeState,
    /// Epoch of its key.
    pub epoch: Epoch,
    /// Id of its key.
    pub key_id: KeyId,
    /// The grant it was written under (`None`: written by the patient).
    pub grant: Option<GrantId>,
    /// Automerge actor of the change.
    pub actor: ActorId,
    /// Sequence of the change for its actor.
    pub change_seq: u64,
    /// Signed created-at.
    pub created_at: Timestamp,
    /// Local store seq (filled in by the store on insert).
    pub seq: Seq,
}

/// Why an item waits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum PendingReason {
    /// An envelope whose grant the node does not know yet: that patient's
    /// grant with that id (another patient may sign a grant with a copy of
    /// the id; it releases nothing here).
    MissingGrant(PatientId, GrantId),
    /// A format version this build cannot read.
    UnsupportedVersion,
    /// An envelope whose change is not the next of its actor in its
    /// document: change `seq - 1` of `actor` in (patient, collection) is not
    /// held yet. Every field comes from the envelope's own signed header and
    /// the actor belongs to its author, so no other identity can release or
    /// evict it.
    SeqGap {
        /// Whose record.
        patient: PatientId,
        /// The change's actor.
        actor: ActorId,
        /// Which collection.
        collection: Collection,
        /// The change's seq (it waits for `seq - 1`).
        seq: u64,
    },
}

/// An item in the pending queue, kept as received.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PendingItem {
    /// Why it waits.
    pub reason: PendingReason,
    /// SHA-256 of the bytes (its key in the queue).
    pub hash: [u8; 32],
    /// What it claims to be.
    pub kind: ItemKind,
    /// The bytes as received.
    pub bytes: Vec<u8>,
}

/// A consent item this node owes a peer (issue 16: durable delivery): a
/// grant to its grantee, a grant or revocation to another holder of the
/// patient's grants, a key share to its recipient. Kept until the peer
/// answers a push of it, across restarts; metadata only, no PHI.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct OutboxEntry {
    /// The peer owed (PeerId bytes).
    pub peer: Vec<u8>,
    /// The item owed.
    pub item: ItemId,
    /// Whose item.
    pub patient: PatientId,
    /// When the debt arose (ms since the Unix epoch).
    pub since: u64,
    /// Deliveries tried and failed so far.
    pub attempts: u32,
    /// Not before this time is it tried again (ms since the Unix epoch).
    pub next_at: u64,
    /// Why the last attempt failed (no content of the item).
    pub last_error: String,
    /// Where the peer was known to listen (multiaddrs as text).
    pub addrs: Vec<String>,
}

/// What the last reconciliation with one peer found for one (patient,
/// collection) (issue 16: completeness): how many envelopes the peer listed
/// and which of them this node still lacked when it ended. Kept across
/// restarts, so a record cut short by a crash is still known incomplete
/// when the node comes back; replaced by the next reconciliation with that
/// peer. Envelope ids and counts only, no PHI.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SyncCheck {
    /// Whose record.
    pub patient: PatientId,
    /// Which collection.
    pub collection: Collection,
    /// The peer that listed its holdings (PeerId bytes).
    pub peer: Vec<u8>,
    /// When the reconciliation ended (ms since the Unix epoch).
    pub at: u64,
    /// Envelopes the peer listed for the collection.
    pub listed: u64,
    /// Of those, how many this node lacked at `at`.
    pub missing: u64,
    /// The first [`SyncCheck::REMEMBERED`] of the ids lacking, so a later
    /// arrival (by a pull, or from another peer) is seen without asking.
    pub missing_ids: Vec<EnvelopeId>,
}

impl SyncCheck {
    /// Most lacking ids a check remembers (32 KiB of ids); beyond, only the count.
    pub const REMEMBERED: usize = 1024;
}

/// A practice's signed address record as a node keeps it (issue 16): the
/// bytes as received, so whoever reads them verifies them again.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct KeptAddressRecord {
    /// The practice (PeerId bytes).
    pub peer: Vec<u8>,
    /// The record's sequence number (seconds when signed).
    pub seq: u64,
    /// The signed record.
    pub signed: Vec<u8>,
}

/// One logical mutation; a [`Batch`] of them is applied atomically.
#[derive(Clone, Debug)]
pub enum Op {
    /// Store an item under the next seq (a no-op if the id is present),
    /// with its envelope index entry if it is an envelope.
    PutItem {
        /// Metadata (kind, id, patient, …).
        meta: ItemMeta,
        /// Signed wire bytes.
        bytes: Vec<u8>,
        /// Index entry for envelopes (its `seq` is filled in).
        envelope: Option<Box<EnvelopeEntry>>,
    },
    /// Overwrite an envelope's index entry (opaque → readable).
    PutEnvelopeEntry(Box<EnvelopeEntry>),
    /// Remove an item with its seq entry and index entries (exclusion,
    /// quarantine of a corrupt item).
    RemoveItem(ItemId),
    /// Queue an item.
    AddPending(PendingItem),
    /// Dequeue an item.
    RemovePending {
        /// Its reason (part of the key).
        reason: PendingReason,
        /// Its hash.
        hash: [u8; 32],
    },
    /// Record a permanent rejection (kept once: the first reason stays).
    AddRejected {
        /// Item id, or SHA-256 of undecodable bytes.
        key: [u8; 32],
        /// Why (no content).
        reason: String,
    },
    /// Set a peer's cursor.
    SetCursor {
        /// The peer (PeerId bytes).
        peer: Vec<u8>,
        /// Its cursor.
        cursor: Cursor,
    },
    /// Append an audit entry (seq, time and chain hash are the store's).
    Audit(AuditRecord),
}

/// Ops applied all or nothing.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// The ops, in order.
    pub ops: Vec<Op>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an op.
    pub fn push(&mut self, op: Op) {
        self.ops.push(op);
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// What a committed batch got.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Committed {
    /// Items newly stored, with their seqs (items already present are absent).
    pub items: Vec<(ItemId, Seq)>,
    /// Seqs of the audit entries appended.
    pub audit: Vec<u64>,
}

/// A rejection as recorded.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Rejection {
    /// When it was first recorded.
    pub time: Timestamp,
    /// Why.
    pub reason: String,
}

/// A node's storage engine. Implementations apply each [`Batch`]
/// atomically and make it durable on [`Store::flush`]; reads see every
/// committed batch. All methods may be called from many threads.
pub trait Store: Send + Sync + 'static {
    /// The instance id made at creation.
    fn instance_id(&self) -> InstanceId;

    /// Applies `batch` atomically (not yet durable).
    ///
    /// # Errors
    /// Engine failures; nothing of the batch is applied then.
    fn commit(&self, batch: &Batch) -> Result<Committed>;

    /// Applies several batches as one atomic unit (group commit); one
    /// [`Committed`] per batch. If it fails, nothing is applied and the
    /// caller retries the batches one by one to isolate the failure. The
    /// default applies them one by one.
    ///
    /// # Errors
    /// Engine failures, or the first batch's error.
    fn commit_group(&self, batches: &[&Batch]) -> Result<Vec<Committed>> {
        batches.iter().map(|b| self.commit(b)).collect()
    }

    /// Makes every committed batch durable.
    ///
    /// # Errors
    /// Engine or I/O failures.
    fn flush(&self) -> Result<()>;

    /// Highest seq given out (0 when empty).
    fn last_seq(&self) -> Seq;

    /// Whether an item is held.
    ///
    /// # Errors
    /// Engine failures.
    fn contains(&self, id: &ItemId) -> Result<bool>;

    /// One item.
    ///
    /// # Errors
    /// Engine failures, [`crate::Error::Corrupt`].
    fn item(&self, id: &ItemId) -> Result<Option<StoredItem>>;

    /// Items with seq > `after`, in seq order, at most `limit`.
    ///
    /// # Errors
    /// Engine failures, [`crate::Error::Corrupt`].
    fn items_after(&self, after: Seq, limit: usize) -> Result<Vec<StoredItem>>;

    /// Every grant, revocation and key share, in seq order.
    ///
    /// # Errors
    /// Engine failures, [`crate::Error::Corrupt`].
    fn consent_items(&self) -> Result<Vec<StoredItem>>;

    /// Index entries of held envelopes of `patient` (of one collection, or all).
    ///
    /// # Errors
    /// Engine failures, [`crate::Error::Corrupt`].
    fn envelopes(&self, patient: &PatientId, collection: Option<Collection>) -> Result<Vec<EnvelopeEntry>>;

    /// Patients with at least one held envelope.
    ///
    /// # Errors
    /// Engine failures, [`crate::Error::Corrupt`].
    fn patients(&self) -> Result<Vec<PatientId>>;

    /// Pending items, all or those waiting for one reason.
    ///
    /// # Errors
    /// Engine failures, [`crate::Error::Corrupt`].
    fn pending(&self, reason: Option<PendingReason>) -> Result<Vec<PendingItem>>;

    /// How many envelopes of `patient` wait in the pending queue for an
    /// earlier change of an actor of the author whose actor ids begin with
    /// `author` ([`PendingReason::SeqGap`]). The default counts the whole queue.
    ///
    /// # Errors
    /// Engine failures, [`crate::Error::Corrupt`].
    fn seq_gaps_of(&self, patient: &PatientId, author: &[u8; 16]) -> Result<usize> {
        Ok(self
            .pending(None)?
            .iter()
            .filter(|p| {
                matches!(p.reason, PendingReason::SeqGap { patient: q, actor, .. }
                    if q == *patient && actor.author_tag() == *author)
            })
            .count())
    }

    /// The rejection recorded under `key`, if any.
    ///
    /// # Errors
    /// Engine failures, [`crate::Error::Corrupt`].
    fn rejected(&self, key: &[u8; 32]) -> Result<Option<Rejection>>;

    /// Number of rejections recorded.
    ///
    /// # Errors
    /// Engine failures.
    fn rejected_count(&self) -> Result<u64>;

    /// A peer's cursor.
    ///
    /// # Errors
    /// Engine failures, [`crate::Error::Corrupt`].
    fn cursor(&self, peer: &[u8]) -> Result<Option<Cursor>>;

    /// Raw audit entries (seq, encoded entry) with seq ≥ `from`, in order.
    ///
    /// # Errors
    /// Engine failures.
    fn audit_raw(&self, from: u64) -> Result<Vec<(u64, Vec<u8>)>>;

    /// The signed wire bytes of an item as they lie on disk, for tests and
    /// repair tools.
    ///
    /// # Errors
    /// Engine failures.
    fn raw_item_bytes(&self, id: &ItemId) -> Result<Option<Vec<u8>>>;

    /// Overwrites an item's wire bytes on disk without any check, for
    /// tests (bit flips at rest) and repair tools only.
    ///
    /// # Errors
    /// Engine failures.
    fn raw_replace_item_bytes(&self, id: &ItemId, bytes: &[u8]) -> Result<()>;

    /// Overwrites an audit entry's raw bytes without any check, for tests
    /// of `audit verify`.
    ///
    /// # Errors
    /// Engine failures.
    fn raw_replace_audit(&self, seq: u64, bytes: &[u8]) -> Result<()>;

    /// The last audit entry's seq and hash (0 and zeros when the log is
    /// empty), as the single writer last appended them.
    fn audit_head(&self) -> (u64, [u8; 32]);

    /// One raw audit entry.
    ///
    /// # Errors
    /// Engine failures.
    fn audit_entry(&self, seq: u64) -> Result<Option<Vec<u8>>>;

    /// The latest signed audit checkpoint kept, if any (kept apart from the
    /// log, so a cut of the log's tail does not remove it).
    ///
    /// # Errors
    /// Engine failures.
    fn audit_checkpoint(&self) -> Result<Option<Vec<u8>>>;

    /// Keeps `signed` as the latest audit checkpoint. Not flushed: the
    /// committer writes it before the flush that makes its entries durable.
    ///
    /// # Errors
    /// Engine failures.
    fn put_audit_checkpoint(&self, signed: &[u8]) -> Result<()>;

    /// Removes every audit entry with seq ≥ `from`, without any check, for
    /// tests of tail truncation on a stopped node (reopen the store after).
    ///
    /// # Errors
    /// Engine failures.
    fn raw_truncate_audit(&self, from: u64) -> Result<()>;

    /// The sealed snapshot of (patient, collection), if one is kept. A
    /// store without snapshot support keeps none (the default).
    ///
    /// # Errors
    /// Engine failures.
    fn snapshot(&self, patient: &PatientId, collection: Collection) -> Result<Option<Vec<u8>>> {
        let _ = (patient, collection);
        Ok(None)
    }

    /// The first `len` bytes of the sealed snapshot of (patient,
    /// collection) and its whole length, if one is kept: enough to tell
    /// snapshots apart (`Node::snapshot_fingerprint`) without copying
    /// megabytes on every pull. The default reads the whole snapshot.
    ///
    /// # Errors
    /// Engine failures.
    fn snapshot_head(&self, patient: &PatientId, collection: Collection, len: usize) -> Result<Option<(Vec<u8>, u64)>> {
        Ok(self
            .snapshot(patient, collection)?
            .map(|s| (s[..s.len().min(len)].to_vec(), s.len() as u64)))
    }

    /// Keeps `sealed` as the snapshot of (patient, collection), replacing
    /// any previous one. Not flushed: a lost snapshot costs a replay.
    ///
    /// # Errors
    /// Engine failures.
    fn put_snapshot(&self, patient: &PatientId, collection: Collection, sealed: &[u8]) -> Result<()> {
        let _ = (patient, collection, sealed);
        Ok(())
    }

    /// Where the resource with this blind key lives (see
    /// [`crate::Node::locate_resource`]); none in a store without the index
    /// (the default).
    ///
    /// # Errors
    /// Engine failures, [`crate::Error::Corrupt`].
    fn resource_location(&self, blind: &[u8; 32]) -> Result<Option<(PatientId, Collection)>> {
        let _ = blind;
        Ok(None)
    }

    /// Records where resources live, by blind key. Not flushed: a lost
    /// entry costs a scan, which records it again.
    ///
    /// # Errors
    /// Engine failures.
    fn put_resource_locations(&self, entries: &[([u8; 32], PatientId, Collection)]) -> Result<()> {
        let _ = entries;
        Ok(())
    }

    /// Drops the snapshot of (patient, collection), if any.
    ///
    /// # Errors
    /// Engine failures.
    fn remove_snapshot(&self, patient: &PatientId, collection: Collection) -> Result<()> {
        let _ = (patient, collection);
        Ok(())
    }

    /// Every entry of the delivery outbox ([`OutboxEntry`]); a store
    /// without one has none (the default).
    ///
    /// # Errors
    /// Engine failures, [`crate::Error::Corrupt`].
    fn outbox(&self) -> Result<Vec<OutboxEntry>> {
        Ok(Vec::new())
    }

    /// Records (or replaces, by (peer, item)) outbox entries, durably: a
    /// debt must outlive a crash right after the item it is for.
    ///
    /// # Errors
    /// Engine failures.
    fn put_outbox(&self, entries: &[OutboxEntry]) -> Result<()> {
        let _ = entries;
        Ok(())
    }

    /// Removes outbox entries by (peer, item); absent ones are ignored.
    ///
    /// # Errors
    /// Engine failures.
    fn remove_outbox(&self, keys: &[(Vec<u8>, ItemId)]) -> Result<()> {
        let _ = keys;
        Ok(())
    }

    /// The pending items of `patient` (waiting for a grant of theirs or for
    /// a seq gap in their record). The default filters the whole queue.
    ///
    /// # Errors
    /// Engine failures, [`crate::Error::Corrupt`].
    fn pending_of(&self, patient: &PatientId) -> Result<Vec<PendingItem>> {
        Ok(self
            .pending(None)?
            .into_iter()
            .filter(|p| match p.reason {
                PendingReason::MissingGrant(q, _) | PendingReason::SeqGap { patient: q, .. } => q == *patient,
                PendingReason::UnsupportedVersion => false,
            })
            .collect())
    }

    /// The last reconciliation checks of `patient`'s record, every peer and
    /// collection ([`SyncCheck`]); a store without them has none (the default).
    ///
    /// # Errors
    /// Engine failures, [`crate::Error::Corrupt`].
    fn sync_checks(&self, patient: &PatientId) -> Result<Vec<SyncCheck>> {
        let _ = patient;
        Ok(Vec::new())
    }

    /// Records a check, replacing the one of the same (patient, collection,
    /// peer).
    ///
    /// # Errors
    /// Engine failures.
    fn put_sync_check(&self, check: &SyncCheck) -> Result<()> {
        let _ = check;
        Ok(())
    }

    /// Every kept address record ([`KeptAddressRecord`]). A store without
    /// them has none (the default).
    ///
    /// # Errors
    /// Engine failures, [`crate::Error::Corrupt`].
    fn address_records(&self) -> Result<Vec<KeptAddressRecord>> {
        Ok(Vec::new())
    }

    /// The kept address record of `peer` (PeerId bytes), if any. The
    /// default searches [`Store::address_records`].
    ///
    /// # Errors
    /// Engine failures, [`crate::Error::Corrupt`].
    fn address_record(&self, peer: &[u8]) -> Result<Option<KeptAddressRecord>> {
        Ok(self.address_records()?.into_iter().find(|r| r.peer == peer))
    }

    /// How many address records are kept.
    ///
    /// # Errors
    /// Engine failures, [`crate::Error::Corrupt`].
    fn address_record_count(&self) -> Result<usize> {
        Ok(self.address_records()?.len())
    }

    /// Keeps `peer`'s signed address record, replacing the one kept.
    ///
    /// # Errors
    /// Engine failures.
    fn put_address_record(&self, peer: &[u8], seq: u64, signed: &[u8]) -> Result<()> {
        let _ = (peer, seq, signed);
        Ok(())
    }
}

impl<T: Store + ?Sized> crate::audit::AuditLog for T {
    fn audit_head(&self) -> (u64, [u8; 32]) {
        Store::audit_head(self)
    }

    fn audit_entry(&self, seq: u64) -> Result<Option<Vec<u8>>> {
        Store::audit_entry(self, seq)
    }

    fn audit_checkpoint(&self) -> Result<Option<Vec<u8>>> {
        Store::audit_checkpoint(self)
    }

    fn put_audit_checkpoint(&self, signed: &[u8]) -> Result<()> {
        Store::put_audit_checkpoint(self, signed)
    }
}
