//! What sync needs from a node's store: the [`Backend`] trait and the item
//! types it speaks in. `medmesh_node::Node` implements it through an adapter;
//! [`crate::memory::MemoryBackend`] implements it for tests.

use std::collections::HashSet;
use std::sync::Arc;

use libp2p::{Multiaddr, PeerId};
use medmesh_crypto::{Collection, EnvelopeId, GrantId, PatientId, Timestamp};
pub use medmesh_node::audit::AuditEntry;
use tokio::sync::broadcast;

pub use medmesh_node::item::{
    Cursor, IngestReport, InstanceId, Item, ItemId, ItemKind, ItemMeta, ItemStored, StoredItem,
};
pub use medmesh_node::policy::ConsentView;

use crate::Result;
use crate::wire::SnapshotPayload;

/// One disclosure for the audit log: items of `patient` sent to `peer`,
/// under `grant` (`None` when the peer is the patient or the recipient of a
/// key share).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct DisclosureRecord {
    /// Who received.
    pub peer: PeerId,
    /// Whose items.
    pub patient: PatientId,
    /// The grant that allowed it, if one did.
    pub grant: Option<GrantId>,
    /// What was sent.
    pub items: Vec<ItemId>,
}

/// What restoring and ingesting a received transfer did.
#[derive(Debug, Default)]
pub struct TransferIngest {
    /// Envelopes rebuilt.
    pub restored: u64,
    /// Headers that did not restore (the puller fetches those envelopes).
    pub unrestored: u64,
    /// What ingesting the rebuilt envelopes did.
    pub report: IngestReport,
}

/// A snapshot transfer a backend can serve (DESIGN §6; see
/// `medmesh_node::transfer`): instead of the envelopes of (patient,
/// collection) that its local snapshot covers, the snapshot's document
/// sealed under the current epoch key and the envelopes' compact headers.
/// Made once per local snapshot and shared by every request it answers.
#[derive(Debug)]
pub struct Transfer {
    /// Whose record.
    pub patient: PatientId,
    /// Which collection.
    pub collection: Collection,
    /// Fingerprint of the local snapshot it was made from (offers name it,
    /// so a puller does not fetch the same transfer twice).
    pub source: [u8; 32],
    /// The sealed document.
    pub sealed_doc: Vec<u8>,
    /// The compact headers as they go on the wire
    /// ([`crate::wire::encode_compact_headers`]).
    pub headers: Vec<u8>,
    /// How many headers.
    pub count: u32,
    /// The envelopes it covers.
    pub ids: HashSet<EnvelopeId>,
    /// The lowest sequence number among them: a puller whose cursor is
    /// before it holds none of them from this node.
    pub first_seq: u64,
}

/// A consent item this node owes a peer until the peer answers a push of it
/// (durable delivery, docs/protocol.md §8a). Metadata only.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Owed {
    /// The peer owed.
    pub peer: PeerId,
    /// The item owed.
    pub item: ItemId,
    /// Whose item.
    pub patient: PatientId,
    /// When the debt arose (ms since the Unix epoch).
    pub since: Timestamp,
    /// Deliveries tried and failed so far.
    pub attempts: u32,
    /// Not tried again before this time (ms since the Unix epoch).
    pub next_at: Timestamp,
    /// Why the last attempt failed.
    pub last_error: String,
    /// Where the peer was known to listen when the debt arose.
    pub addrs: Vec<Multiaddr>,
}

/// The operations sync needs from a node's store. Cheap lookups are plain
/// functions (called from the actor); the ones that may touch the disk or
/// wait for a flush are futures, run in spawned tasks.
pub trait Backend: Send + Sync + 'static {
    /// This store instance's id (see [`InstanceId`]).
    fn instance_id(&self) -> InstanceId;

    /// Up to `limit` items with a sequence number greater than `after`, in
    /// sequence order.
    ///
    /// # Errors
    /// Storage failures.
    fn items_after(&self, after: u64, limit: usize) -> impl Future<Output = Result<Vec<StoredItem>>> + Send;

    /// As [`Backend::items_after`], but the items need not be re-verified
    /// yet: a server checks each one it sends with [`Backend::check`]. The
    /// default is [`Backend::items_after`].
    ///
    /// # Errors
    /// Storage failures.
    fn scan_after(&self, after: u64, limit: usize) -> impl Future<Output = Result<Vec<StoredItem>>> + Send {
        self.items_after(after, limit)
    }

    /// Whether an item from [`Backend::scan_after`] still verifies and may be
    /// sent (a backend quarantines one that does not). The default, for
    /// backends whose scan already verifies, is yes.
    ///
    /// # Errors
    /// Storage failures.
    fn check(&self, item: &StoredItem) -> impl Future<Output = Result<bool>> + Send {
        let _ = item;
        std::future::ready(Ok(true))
    }

    /// Verifies and stores items received from `from`. Permanent rejections
    /// are recorded by the backend (audit) and counted, never returned as an
    /// error.
    ///
    /// # Errors
    /// Storage failures only.
    fn ingest(&self, from: PeerId, items: Vec<Item>) -> impl Future<Output = Result<IngestReport>> + Send;

    /// As [`Backend::ingest`], but parks at most `pending_room` new items in
    /// the pending queue and counts the others in [`IngestReport::refused`]
    /// without keeping them. The default has no pending queue to cap and
    /// ingests everything.
    ///
    /// # Errors
    /// Storage failures only.
    fn ingest_capped(
        &self,
        from: PeerId,
        items: Vec<Item>,
        pending_room: u64,
    ) -> impl Future<Output = Result<IngestReport>> + Send {
        let _ = pending_room;
        self.ingest(from, items)
    }

    /// Items waiting in the pending queue now, from every source. The
    /// default (a backend without a queue) is 0.
    ///
    /// # Errors
    /// Storage failures.
    fn pending_total(&self) -> Result<u64> {
        Ok(0)
    }

    /// The cursor this node holds on `peer`'s log.
    ///
    /// # Errors
    /// Storage failures.
    fn cursor(&self, peer: &PeerId) -> Result<Option<Cursor>>;

    /// Stores the cursor on `peer`'s log.
    ///
    /// # Errors
    /// Storage failures.
    fn set_cursor(&self, peer: &PeerId, cursor: Cursor) -> impl Future<Output = Result<()>> + Send;

    /// Whether a grant this node holds names `peer` as its grantee: the
    /// peer then shares a patient with this node, and is pulled when it
    /// connects and on every pull tick. Other peers (met through Kademlia
    /// lookups, mDNS or an inbound connection) are pulled only once there is
    /// a reason: a cursor on them, a nudge, a push, a dial asked for. The
    /// default, for a backend without a consent registry, is yes.
    ///
    /// # Errors
    /// Storage failures.
    fn names_grantee(&self, peer: &PeerId) -> Result<bool> {
        let _ = peer;
        Ok(true)
    }

    /// Whether this node (`me`) has a relationship with `patient`: it holds
    /// envelopes of theirs or a grant from them naming `me`. Only then do
    /// the consent flows follow that patient's address hints and forward
    /// their consent items. The default asks [`Backend::consent`] and
    /// [`Backend::envelope_ids`].
    ///
    /// # Errors
    /// Storage failures.
    fn relates_to(&self, patient: &PatientId, me: &PeerId) -> Result<bool> {
        if self
            .consent(patient)?
            .grants
            .iter()
            .any(|g| g.terms().grantee.peer_id() == *me)
        {
            return Ok(true);
        }
        for collection in Collection::ALL {
            if !self.envelope_ids(patient, collection)?.is_empty() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The grants and revocations known for `patient`.
    ///
    /// # Errors
    /// Storage failures.
    fn consent(&self, patient: &PatientId) -> Result<ConsentView>;

    /// The patients whose records this node and `peer` may both read now
    /// (anti-entropy reconciles those with it). The default: none.
    ///
    /// # Errors
    /// Storage failures.
    fn patients_shared_with(&self, peer: &PeerId) -> Result<Vec<PatientId>> {
        let _ = peer;
        Ok(Vec::new())
    }

    /// Records what a reconciliation with `peer` found for (patient,
    /// collection): it listed `listed` envelopes, and these ids of them are
    /// not held here (issue 16: completeness; the node keeps the last per
    /// peer and tells apps while any stays missing). The default keeps nothing.
    ///
    /// # Errors
    /// Storage failures.
    fn note_reconciled(
        &self,
        peer: &PeerId,
        patient: &PatientId,
        collection: Collection,
        listed: u64,
        missing: &[EnvelopeId],
    ) -> Result<()> {
        let _ = (peer, patient, collection, listed, missing);
        Ok(())
    }

    /// Keeps `peer`'s signed address record (libp2p `PeerRecord` in its
    /// signed envelope, verified by the caller) if newer than the one kept
    /// and `peer` is a practice this node has a relationship with. Returns
    /// whether it was kept. The default keeps nothing.
    ///
    /// # Errors
    /// Storage failures.
    fn note_address_record(&self, peer: &PeerId, seq: u64, signed: &[u8]) -> Result<bool> {
        let _ = (peer, seq, signed);
        Ok(false)
    }

    /// The signed address records kept, as received; only of `peers` when
    /// given. The default: none.
    ///
    /// # Errors
    /// Storage failures.
    fn address_records(&self, peers: Option<&[PeerId]>) -> Result<Vec<Vec<u8>>> {
        let _ = peers;
        Ok(Vec::new())
    }

    /// Addresses (multiaddr text ending in `/p2p/<PeerId>`) of the practices
    /// holding the records this node is granted, to reconnect to after a
    /// restart. The default: none.
    ///
    /// # Errors
    /// Storage failures.
    fn holder_addresses(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// Any stored item by id (a grant, revocation, key share or envelope).
    ///
    /// # Errors
    /// Storage failures.
    fn item(&self, id: &ItemId) -> impl Future<Output = Result<Option<StoredItem>>> + Send;

    /// The seq of the newest stored item (0 when empty). The default, for
    /// stores that do not keep one, is 0: an outbox report then never
    /// waits for stored items to be followed.
    fn last_seq(&self) -> u64 {
        0
    }

    /// Every consent item this node owes a peer ([`Owed`]).
    ///
    /// # Errors
    /// Storage failures.
    fn outbox(&self) -> Result<Vec<Owed>>;

    /// Records debts (replacing any of the same (peer, item)), durably.
    ///
    /// # Errors
    /// Storage failures.
    fn put_outbox(&self, owed: &[Owed]) -> Result<()>;

    /// Clears debts, delivered or given up.
    ///
    /// # Errors
    /// Storage failures.
    fn remove_outbox(&self, settled: &[(PeerId, ItemId)]) -> Result<()>;

    /// The ids of every envelope held for (patient, collection), each
    /// actor's changes by ascending seq (a summary lists them in this order,
    /// and a fetch in it never leaves a change waiting for its predecessor).
    ///
    /// # Errors
    /// Storage failures.
    fn envelope_ids(&self, patient: &PatientId, collection: Collection) -> Result<Vec<EnvelopeId>>;

    /// The envelopes with these ids that the store holds (unknown ids are
    /// skipped).
    ///
    /// # Errors
    /// Storage failures.
    fn envelopes(&self, ids: &[EnvelopeId]) -> impl Future<Output = Result<Vec<StoredItem>>> + Send;

    /// Appends a disclosure to the audit log, durably.
    ///
    /// # Errors
    /// Storage failures; sync then does not send the items.
    fn record_disclosure(&self, record: &DisclosureRecord) -> impl Future<Output = Result<()>> + Send;

    /// Subscribes to "item stored" events.
    fn subscribe(&self) -> broadcast::Receiver<ItemStored>;

    /// Up to `limit` audit entries about `patient` with a sequence number
    /// greater than `after`, in sequence order. The default has no audit
    /// log to show and returns none.
    ///
    /// # Errors
    /// Storage failures, an entry that does not decode.
    fn audit_entries(
        &self,
        patient: &PatientId,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<AuditEntry>>> + Send {
        let _ = (patient, after, limit);
        std::future::ready(Ok(Vec::new()))
    }

    /// The snapshot transfer of (patient, collection) this backend can
    /// serve now, if any. The default keeps no snapshots.
    ///
    /// # Errors
    /// Storage failures.
    fn snapshot_transfer(
        &self,
        patient: &PatientId,
        collection: Collection,
    ) -> impl Future<Output = Result<Option<Arc<Transfer>>>> + Send {
        let _ = (patient, collection);
        std::future::ready(Ok(None))
    }

    /// Rebuilds the envelopes of the transfer of (patient, collection)
    /// received from `from` (its headers: [`crate::wire::decode_transfer_headers`])
    /// and ingests them like envelopes of a page (parking at most
    /// `pending_room` in the pending queue). `None`: this backend cannot (it
    /// holds no key for the document), and the puller fetches the envelopes
    /// instead. The default cannot.
    ///
    /// # Errors
    /// [`crate::Error::Wire`] for headers that do not parse or name another
    /// patient or collection; a document that does not open or load under
    /// the keys held; storage failures.
    fn restore_and_ingest(
        &self,
        from: PeerId,
        patient: PatientId,
        collection: Collection,
        payload: SnapshotPayload,
        pending_room: u64,
    ) -> impl Future<Output = Result<Option<TransferIngest>>> + Send {
        let _ = (from, patient, collection, payload, pending_room);
        std::future::ready(Ok(None))
    }

    /// Checkpoints of this node's audit log for a patient's query (see
    /// `medmesh_node::Node::audit_checkpoints`); `None` from a backend that
    /// signs none (the default, and the in-memory test store).
    ///
    /// # Errors
    /// Storage failures.
    fn audit_checkpoints(
        &self,
        anchor: Option<u64>,
    ) -> impl Future<Output = Result<Option<medmesh_node::AuditCheckpoints>>> + Send {
        let _ = anchor;
        async { Ok(None) }
    }

    /// Appends "the patient read the audit entries about them" to the audit
    /// log, durably, before they are sent. The default records nothing.
    ///
    /// # Errors
    /// Storage failures; sync then does not send the entries.
    fn record_audit_read(&self, patient: &PatientId) -> impl Future<Output = Result<()>> + Send {
        let _ = patient;
        std::future::ready(Ok(()))
    }
}
