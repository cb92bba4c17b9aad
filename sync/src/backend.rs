//! What sync needs from a node's store: the [`Backend`] trait and the item
//! types it speaks in. `medmesh_node::Node` implements it through an adapter;
//! [`crate::memory::MemoryBackend`] implements it for tests.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::sync::Arc;

use libp2p::{Multiaddr, PeerId};
use medmesh_crypto::{
    Collection, Envelope, EnvelopeId, Grant, GrantId, KeyShare, MAX_ENVELOPE_BYTES, MAX_GRANT_BYTES,
    MAX_KEYSHARE_BYTES, MAX_REVOCATION_BYTES, PatientId, Principal, Revocation, Timestamp,
};
use medmesh_node::audit::{Action, ActorKind};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;

use crate::Result;
use crate::wire::SnapshotPayload;

/// The random id of one store instance. A restored or rebuilt store gets a
/// new one, which resets the cursors peers hold on it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct InstanceId(pub [u8; 16]);

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InstanceId({self})")
    }
}

/// How far a puller got in one peer's item log: that store's instance id and
/// the last local sequence number the peer served (scanned, not only sent).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct Cursor {
    /// The serving store's instance.
    pub instance: InstanceId,
    /// Last sequence number covered; the next pull asks for items after it.
    pub seq: u64,
}

/// The four kinds of item a node stores and sync moves.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub enum ItemKind {
    /// A consent grant signed by the patient.
    Grant,
    /// A revocation signed by the patient.
    Revocation,
    /// A collection key wrapped for one recipient, signed by the patient.
    KeyShare,
    /// A sealed, signed change.
    Envelope,
}

impl ItemKind {
    /// Every kind, in wire order.
    pub const ALL: [ItemKind; 4] = [Self::Grant, Self::Revocation, Self::KeyShare, Self::Envelope];

    /// The wire number: 0 grant, 1 revocation, 2 key share, 3 envelope.
    pub fn wire(self) -> u64 {
        match self {
            Self::Grant => 0,
            Self::Revocation => 1,
            Self::KeyShare => 2,
            Self::Envelope => 3,
        }
    }

    /// The kind for a wire number.
    pub fn from_wire(n: u64) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.wire() == n)
    }

    /// The largest encoded item of this kind that medmesh-crypto decodes.
    pub fn max_bytes(self) -> usize {
        match self {
            Self::Grant => MAX_GRANT_BYTES,
            Self::Revocation => MAX_REVOCATION_BYTES,
            Self::KeyShare => MAX_KEYSHARE_BYTES,
            Self::Envelope => MAX_ENVELOPE_BYTES,
        }
    }

    /// Lowercase name for logs and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grant => "grant",
            Self::Revocation => "revocation",
            Self::KeyShare => "key share",
            Self::Envelope => "envelope",
        }
    }
}

/// One item as it travels: its kind and its canonical signed bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Item {
    /// What it is.
    pub kind: ItemKind,
    /// The canonical encoding medmesh-crypto decodes (signature included).
    pub bytes: Vec<u8>,
}

impl fmt::Debug for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the bytes: an envelope's header names the patient.
        write!(f, "Item({}, {} bytes)", self.kind.as_str(), self.bytes.len())
    }
}

impl Item {
    /// A grant as an item.
    pub fn grant(grant: &Grant) -> Self {
        Self {
            kind: ItemKind::Grant,
            bytes: grant.encoded().to_vec(),
        }
    }

    /// A revocation as an item.
    pub fn revocation(revocation: &Revocation) -> Self {
        Self {
            kind: ItemKind::Revocation,
            bytes: revocation.encoded().to_vec(),
        }
    }

    /// A key share as an item.
    pub fn key_share(share: &KeyShare) -> Self {
        Self {
            kind: ItemKind::KeyShare,
            bytes: share.encoded().to_vec(),
        }
    }

    /// An envelope as an item.
    pub fn envelope(envelope: &Envelope) -> Self {
        Self {
            kind: ItemKind::Envelope,
            bytes: envelope.encode(),
        }
    }
}

/// An item's id: the envelope id for envelopes, SHA-256 of the canonical
/// signed bytes for grants, revocations and key shares.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ItemId(pub [u8; 32]);

impl ItemId {
    /// SHA-256 of `bytes`.
    pub fn digest(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }
}

impl From<EnvelopeId> for ItemId {
    fn from(id: EnvelopeId) -> Self {
        Self(id.0)
    }
}

impl fmt::Display for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ItemId({self})")
    }
}

/// The signed, cleartext facts about an item that the consent filter and the
/// consent flows need. Everything here comes from verified signed data.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ItemMeta {
    /// What it is.
    pub kind: ItemKind,
    /// Its id.
    pub id: ItemId,
    /// Whose record it belongs to.
    pub patient: PatientId,
    /// The collection (envelopes and key shares).
    pub collection: Option<Collection>,
    /// Grants: their own id. Revocations: the revoked grant. Envelopes: the
    /// grant their author wrote under (`None` when the patient wrote).
    pub grant: Option<GrantId>,
    /// Envelopes: the author.
    pub author: Option<Principal>,
    /// Key shares: the recipient. Grants: the grantee (as a practice).
    pub recipient: Option<Principal>,
}

impl ItemMeta {
    /// Decodes and verifies `item` with medmesh-crypto and describes it.
    ///
    /// # Errors
    /// [`crate::Error::Crypto`] for anything that does not decode or verify.
    pub fn describe(item: &Item) -> Result<Self> {
        Ok(match item.kind {
            ItemKind::Grant => Self::of_grant(&Grant::decode(&item.bytes)?),
            ItemKind::Revocation => Self::of_revocation(&Revocation::decode(&item.bytes)?),
            ItemKind::KeyShare => Self::of_key_share(&KeyShare::decode(&item.bytes)?),
            ItemKind::Envelope => Self::of_envelope(&Envelope::decode(&item.bytes)?),
        })
    }

    /// Describes a verified grant.
    pub fn of_grant(grant: &Grant) -> Self {
        let t = grant.terms();
        Self {
            kind: ItemKind::Grant,
            id: ItemId::digest(grant.encoded()),
            patient: t.patient,
            collection: None,
            grant: Some(t.id),
            author: None,
            recipient: Some(Principal::Practice(t.grantee)),
        }
    }

    /// Describes a verified revocation.
    pub fn of_revocation(revocation: &Revocation) -> Self {
        let t = revocation.terms();
        Self {
            kind: ItemKind::Revocation,
            id: ItemId::digest(revocation.encoded()),
            patient: t.patient,
            collection: None,
            grant: Some(t.grant_id),
            author: None,
            recipient: None,
        }
    }

    /// Describes a verified key share.
    pub fn of_key_share(share: &KeyShare) -> Self {
        let t = share.terms();
        Self {
            kind: ItemKind::KeyShare,
            id: ItemId::digest(share.encoded()),
            patient: t.patient,
            collection: Some(t.collection),
            grant: None,
            author: None,
            recipient: Some(t.recipient),
        }
    }

    /// Describes a verified envelope.
    pub fn of_envelope(envelope: &Envelope) -> Self {
        let h = envelope.header();
        Self {
            kind: ItemKind::Envelope,
            id: envelope.id().into(),
            patient: h.patient,
            collection: Some(h.collection),
            grant: h.grant_id,
            author: Some(h.author),
            recipient: None,
        }
    }
}

/// An item in the local log, as [`Backend::items_after`] returns it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct StoredItem {
    /// Its local sequence number (strictly increasing, starts at 1).
    pub seq: u64,
    /// What the filter needs to know.
    pub meta: ItemMeta,
    /// The item itself.
    pub item: Item,
}

/// "An item was stored": published by the backend for local writes and for
/// items ingested from peers (never for duplicates).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct StoredEvent {
    /// Its local sequence number.
    pub seq: u64,
    /// What it is.
    pub meta: ItemMeta,
    /// The peer it came from; `None` for a local write (gateway, or a backend
    /// that does not know).
    pub from: Option<PeerId>,
}

/// What ingesting a page of items did.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct IngestReport {
    /// Stored now.
    pub accepted: u64,
    /// Already held; ignored.
    pub duplicates: u64,
    /// Waiting for a grant, key share or dependency (retried later).
    pub pending: u64,
    /// Permanently rejected (bad signature, malformed, outside the grant).
    pub rejected: u64,
    /// Not parked because the sender's share of the pending queue was used
    /// up (flood limits); nothing of them was kept, they can be sent again
    /// once their grant is here.
    pub refused: u64,
    /// Consent items of patients this node holds nothing of, refused over
    /// the node's caps (docs/protocol.md §10a): not kept, not rejected.
    pub unwanted: u64,
}

impl IngestReport {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: IngestReport) {
        self.accepted += other.accepted;
        self.duplicates += other.duplicates;
        self.pending += other.pending;
        self.rejected += other.rejected;
        self.refused += other.refused;
        self.unwanted += other.unwanted;
    }
}

/// The consent items a node knows for one patient: verified grants and the
/// revocations of them.
#[derive(Clone, Debug, Default)]
pub struct ConsentView {
    /// Every grant from this patient the node holds.
    pub grants: Vec<Grant>,
    /// Ids of the grants known to be revoked.
    pub revoked: BTreeSet<GrantId>,
    /// The revocations themselves, where the backend has them at hand (sent
    /// in reconciliation summaries); a grant is revoked if it is listed in
    /// `revoked` or here.
    pub revocations: Vec<Revocation>,
}

impl ConsentView {
    /// Whether the node knows a revocation of `grant`.
    pub fn is_revoked(&self, grant: &Grant) -> bool {
        self.revoked.contains(&grant.id()) || self.revocations.iter().any(|r| r.revokes(grant))
    }

    /// The grant with this id, if known.
    pub fn grant(&self, id: GrantId) -> Option<&Grant> {
        self.grants.iter().find(|g| g.id() == id)
    }
}

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

/// One audit-log entry about a patient, as the patient's audit query
/// carries it: ids and actions only, never record content. The fields are
/// those of `medmesh_node::audit::AuditEntry` (less the patient, which the
/// query names) in binary form.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct AuditEntryWire {
    /// Position in the node's audit log, from 1.
    pub seq: u64,
    /// When it was appended (ms since the Unix epoch).
    pub time: Timestamp,
    /// Who acted.
    pub actor_kind: ActorKind,
    /// Their id: a PeerId, a did:key, an app name, or the node's PeerId.
    pub actor_id: String,
    /// What they did.
    pub action: Action,
    /// How many items the stored entry names; `items` holds at most
    /// [`crate::wire::MAX_AUDIT_ITEMS_PER_ENTRY`] of them.
    pub item_count: u64,
    /// The item ids concerned (envelope ids, item hashes).
    pub items: Vec<ItemId>,
    /// The grant concerned, if any.
    pub grant: Option<GrantId>,
    /// `ok`, `refused: …`, `rejected: …`: a reason, never content.
    pub outcome: String,
    /// Hash of the previous entry in the node's log (all zero for the first).
    pub prev_hash: [u8; 32],
    /// Hash of this entry as stored.
    pub hash: [u8; 32],
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
    fn subscribe(&self) -> broadcast::Receiver<StoredEvent>;

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
    ) -> impl Future<Output = Result<Vec<AuditEntryWire>>> + Send {
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
