//! `/medmesh/sync/1`: the wire messages, their CBOR encoding, their size caps
//! and the request-response codec that enforces them. Every message is
//! decoded into a typed value and checked against its bounds before any
//! other code sees it. Specified in `docs/protocol.md`.

use std::io;

use ciborium::Value;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::{Multiaddr, StreamProtocol};
use medmesh_crypto::{
    AuditCheckpoint, Collection, CompactHeader, EnvelopeId, GrantId, MAX_AUDIT_CHECKPOINT_BYTES, PatientId,
};
use medmesh_node::AuditCheckpoints;
use medmesh_node::audit::{Action, ActorKind};

use crate::{Error, Result};
use medmesh_node::audit::AuditEntry;
use medmesh_node::item::{Cursor, InstanceId, Item, ItemId, ItemKind};

/// The protocol name.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/medmesh/sync/1");
/// Largest request frame: one push of a maximal envelope plus framing.
pub const MAX_REQUEST_BYTES: usize = 9 * 1024 * 1024;
/// Largest response frame: a page's byte budget plus one maximal envelope.
pub const MAX_RESPONSE_BYTES: usize = 17 * 1024 * 1024;
/// A server stops adding items to a page once it holds this many bytes.
pub const PAGE_BYTE_BUDGET: usize = 8 * 1024 * 1024;
/// Most items in one page, push or fetch answer.
pub const MAX_ITEMS_PER_MESSAGE: usize = 1024;
/// Most envelope ids in one fetch request.
pub const MAX_FETCH_IDS: usize = 256;
/// Most envelope ids in one summary (all collections together).
pub const MAX_SUMMARY_IDS: usize = 200_000;
/// Most consent items (grants and revocations) in one summary.
pub const MAX_SUMMARY_CONSENT_ITEMS: usize = 1024;
/// Most patients in one digest request (one anti-entropy round's worth).
pub const MAX_DIGEST_PATIENTS: usize = 1024;
/// Most address suggestions in one push.
pub const MAX_PUSH_ADDRS: usize = 16;
/// Longest address suggestion, in bytes.
pub const MAX_ADDR_LEN: usize = 256;
/// Most audit entries in one audit answer (and the largest `limit` an audit
/// request may ask for).
pub const MAX_AUDIT_ENTRIES_PER_MESSAGE: usize = 256;
/// Most item ids one audit entry carries; a stored entry naming more is sent
/// with the first this many and its full `item_count`.
pub const MAX_AUDIT_ITEMS_PER_ENTRY: usize = 4096;
/// Longest actor id in an audit entry, in bytes.
pub const MAX_AUDIT_ACTOR_ID_LEN: usize = 256;
/// Longest outcome text in an audit entry, in bytes.
pub const MAX_AUDIT_OUTCOME_LEN: usize = 1024;
/// Most snapshot offers in one page.
pub const MAX_OFFERS_PER_PAGE: usize = 64;
/// Most compact headers in one snapshot transfer.
pub const MAX_TRANSFER_HEADERS: usize = 200_000;
/// Most bytes the compact headers of one transfer may inflate to.
pub const MAX_INFLATED_HEADERS_BYTES: usize = 64 * 1024 * 1024;
/// Most debts one outbox report lists (a node keeps at most 256 per
/// patient; the rest of a larger list is left out).
pub const MAX_OUTBOX_OWED: usize = 1024;
/// Most held consent items one outbox report lists.
pub const MAX_OUTBOX_HELD: usize = 1024;
/// Longest failure text of one debt in an outbox report, in bytes.
pub const MAX_OUTBOX_ERROR_LEN: usize = 256;
/// Longest PeerId in an outbox report, in bytes (an ed25519 PeerId is 38).
const MAX_PEER_ID_LEN: usize = 64;
/// A server offers a transfer only if its answer fits a response with this
/// much room to spare.
const TRANSFER_SLACK: usize = 4096;

/// What a peer asks.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Request {
    /// "Items after this cursor that I may receive", at most `limit`.
    Pull {
        /// Where the puller is in this server's log.
        cursor: Cursor,
        /// Most items wanted (1..=[`MAX_ITEMS_PER_MESSAGE`]).
        limit: u32,
        /// `Some` when the puller takes snapshot offers: envelopes a
        /// snapshot transfer covers may then be left out of the page and the
        /// transfer offered instead — when the puller's cursor is before all
        /// of them, or the transfer is one it was offered earlier in this
        /// pull (listed here by source, at most [`MAX_OFFERS_PER_PAGE`]).
        snapshots: Option<Vec<[u8; 32]>>,
    },
    /// "I stored something you may receive; my log is at `seq`."
    Nudge {
        /// The sender's store instance.
        instance: InstanceId,
        /// The sender's newest sequence number.
        seq: u64,
    },
    /// "Store these items" (consent flows, the patient CLI).
    Push {
        /// Signed items.
        items: Vec<Item>,
        /// Multiaddrs (with `/p2p/`) the receiver may dial to deliver what it
        /// learns, e.g. the grantee's address; honoured only from a patient.
        addrs: Vec<Multiaddr>,
    },
    /// "Which envelopes of this patient may I have?"
    Summary {
        /// The patient.
        patient: PatientId,
        /// Per collection, the [`summary_digest`] of the envelope ids the
        /// asker holds: where the server's own list has the same digest it
        /// answers that collection with no ids (nothing is missing).
        digests: Vec<(Collection, [u8; 32])>,
    },
    /// "Send me these envelopes."
    Fetch {
        /// Envelope ids (1..=[`MAX_FETCH_IDS`]).
        ids: Vec<EnvelopeId>,
    },
    /// "Send me the snapshot transfer of this collection" (after an offer,
    /// or when reconciling finds much missing).
    Snapshot {
        /// The patient.
        patient: PatientId,
        /// The collection.
        collection: Collection,
    },
    /// "Your access to this patient's record here just opened (a grant
    /// naming you arrived, or reached its not-before): reconcile it with
    /// me." Acted on only by a peer holding a grant in force from that
    /// patient; the answer is [`Response::Ack`] either way.
    Reconcile {
        /// The patient.
        patient: PatientId,
    },
    /// "The audit entries about me after `after`" (accounting of
    /// disclosures). Answered only when the asker is that patient.
    Audit {
        /// The patient; must be the asker's own key.
        patient: PatientId,
        /// The last audit sequence number already seen (0 for the start).
        after: u64,
        /// Most entries wanted (1..=[`MAX_AUDIT_ENTRIES_PER_MESSAGE`]).
        limit: u32,
    },
    /// "Sign me checkpoints of your audit log": of its head now, and of
    /// entry `anchor` (the seq of the checkpoint the patient kept from an
    /// earlier query), to tell a log that lost entries or forked. Answered
    /// only when the asker is that patient. Added after `Audit`: a node
    /// that predates it cannot decode it, and the CLI reports its audit
    /// unanchored.
    Checkpoint {
        /// The patient; must be the asker's own key.
        patient: PatientId,
        /// The seq of a checkpoint to compare with, if the patient kept one.
        anchor: Option<u64>,
    },
    /// "What do you still owe others of my consent items?" (issue 16: the
    /// CLI reports delivery per target). Answered only when the asker is
    /// that patient. Added after `Checkpoint`: a node that predates it
    /// cannot decode it and drops the stream (the asker sees a failed
    /// request, not an answer).
    Outbox {
        /// The patient; must be the asker's own key.
        patient: PatientId,
    },
    /// "Where are my practices?" (issue 16: the patient's address book): the
    /// signed address records this node keeps of the practices the
    /// patient's grants name. Answered only when the asker is that patient.
    /// Added after `Digests`, like it unknown to older nodes.
    Practices {
        /// The patient; must be the asker's own key.
        patient: PatientId,
    },
    /// "Which of these patients differ from what you would disclose to me?"
    /// (anti-entropy, docs/protocol.md §8): per patient, the
    /// [`patient_digest`] of what the asker holds of it. Answered with
    /// [`Response::Differing`]. Added after `Outbox`: a node that predates
    /// it cannot decode it and drops the stream, and the asker falls back
    /// to one `Summary` per patient.
    Digests {
        /// (patient, digest), 1..=[`MAX_DIGEST_PATIENTS`], no patient twice.
        patients: Vec<(PatientId, [u8; 32])>,
    },
}

/// Most signed address records one `Practices` answer carries.
pub const MAX_PRACTICE_RECORDS: usize = 256;
/// Largest signed address record on the wire (the node keeps none larger).
pub use medmesh_crypto::MAX_ADDRESS_RECORD_BYTES;

/// One consent item a node owes a peer, as an outbox report shows it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct OwedItem {
    /// The item owed.
    pub item: ItemId,
    /// The peer it is owed to.
    pub peer: libp2p::PeerId,
    /// When the debt arose (ms since the Unix epoch).
    pub since: u64,
    /// Deliveries tried and failed so far (0: the first is under way or due).
    pub attempts: u32,
    /// Not tried again before this time (ms since the Unix epoch).
    pub next_at: u64,
    /// Why the last try failed (at most [`MAX_OUTBOX_ERROR_LEN`] bytes;
    /// empty before the first failure).
    pub last_error: String,
}

/// What a node still owes others of one patient's consent items.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct OutboxReport {
    /// Items of the patient stored but not yet followed by the consent
    /// flows (the debts they make may not be listed yet): ask again.
    pub settling: bool,
    /// Every debt of the patient's items, per (item, peer).
    pub owed: Vec<OwedItem>,
    /// The patient's grants and revocations this node holds that it owes
    /// nobody any more: delivered, or never owed.
    pub held: Vec<ItemId>,
}

/// Why a server refused.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RefusalCode {
    /// The server failed internally (storage).
    Internal,
    /// The peer's identity is not an ed25519 key.
    BadIdentity,
    /// Only the patient may ask this (an audit query about someone else).
    NotPatient,
    /// The server is over one of its flood limits for this peer (request
    /// rate, requests being served, pending-queue share): nothing was done;
    /// ask again later. Every request is idempotent.
    Busy,
}

impl RefusalCode {
    fn wire(self) -> u64 {
        match self {
            Self::Internal => 0,
            Self::BadIdentity => 1,
            Self::NotPatient => 2,
            Self::Busy => 3,
        }
    }

    fn from_wire(n: u64) -> Option<Self> {
        match n {
            0 => Some(Self::Internal),
            1 => Some(Self::BadIdentity),
            2 => Some(Self::NotPatient),
            3 => Some(Self::Busy),
            _ => None,
        }
    }

    /// Text for errors and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Internal => "internal error",
            Self::BadIdentity => "peer identity is not ed25519",
            Self::NotPatient => "only the patient may ask for this",
            Self::Busy => "busy: over a flood limit, ask again later",
        }
    }
}

/// "Envelopes of (patient, collection) were left out of this page: the
/// snapshot transfer made from local snapshot `source` covers them."
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Offer {
    /// The patient.
    pub patient: PatientId,
    /// The collection.
    pub collection: Collection,
    /// Which transfer (its local snapshot's fingerprint).
    pub source: [u8; 32],
}

/// A snapshot transfer on the wire (see `medmesh_node::transfer`).
#[derive(Clone, PartialEq, Eq)]
pub struct SnapshotPayload {
    /// Which transfer (its local snapshot's fingerprint).
    pub source: [u8; 32],
    /// The document, sealed under an epoch key of the collection.
    pub sealed_doc: Vec<u8>,
    /// The compact headers ([`encode_compact_headers`]).
    pub headers: Vec<u8>,
    /// How many headers.
    pub count: u32,
}

impl std::fmt::Debug for SnapshotPayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotPayload")
            .field("doc_bytes", &self.sealed_doc.len())
            .field("header_bytes", &self.headers.len())
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl SnapshotPayload {
    /// Whether a payload of these sizes fits one response frame.
    pub fn fits(sealed_doc: usize, headers: usize) -> bool {
        sealed_doc.saturating_add(headers).saturating_add(TRANSFER_SLACK) <= MAX_RESPONSE_BYTES
    }
}

/// The digest of a set of envelope ids in a Summary request: SHA-256 of
/// `medmesh/summary-digest/v1` and the ids in ascending order.
pub fn summary_digest(ids: &[EnvelopeId]) -> [u8; 32] {
    use sha2::{Digest as _, Sha256};
    let mut sorted: Vec<&EnvelopeId> = ids.iter().collect();
    sorted.sort_unstable();
    let mut h = Sha256::new();
    h.update(b"medmesh/summary-digest/v1");
    for id in sorted {
        h.update(id.0);
    }
    h.finalize().into()
}

/// What a [`patient_digest`] covers, in the order it hashes them.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct DigestParts {
    /// The ids of the patient's consent items, each with whether the grant
    /// it is (or revokes) is known revoked.
    pub consent: Vec<(ItemId, bool)>,
    /// Per collection compared, the [`summary_digest`] of the envelope ids
    /// held (the digest of no ids where none are).
    pub collections: Vec<(Collection, [u8; 32])>,
}

/// The digest of one patient in a [`Request::Digests`]: SHA-256 of
/// `medmesh/patient-digest/v1`, the number of consent items (u32, big
/// endian), each consent item as its 32-byte id and one byte (1 when its
/// grant is known revoked, else 0) in ascending id order, then each
/// collection compared, in [`Collection::ALL`] order, as its name's length
/// (one byte), its name and its [`summary_digest`].
pub fn patient_digest(parts: &DigestParts) -> [u8; 32] {
    use sha2::{Digest as _, Sha256};
    let mut consent: Vec<&(ItemId, bool)> = parts.consent.iter().collect();
    consent.sort_unstable();
    let mut collections: Vec<&(Collection, [u8; 32])> = parts.collections.iter().collect();
    collections.sort_by_key(|(c, _)| Collection::ALL.iter().position(|a| a == c));
    let mut h = Sha256::new();
    h.update(b"medmesh/patient-digest/v1");
    h.update(u32::try_from(consent.len()).unwrap_or(u32::MAX).to_be_bytes());
    for (id, revoked) in consent {
        h.update(id.0);
        h.update([u8::from(*revoked)]);
    }
    for (collection, digest) in collections {
        let name = collection.as_str().as_bytes();
        h.update([u8::try_from(name.len()).unwrap_or(u8::MAX)]);
        h.update(name);
        h.update(digest);
    }
    h.finalize().into()
}

/// Compact headers as a transfer carries them: the CBOR array of their
/// encodings, DEFLATE-compressed (they repeat patient, collection, key id,
/// author and grant, which compress away).
pub fn encode_compact_headers(headers: &[CompactHeader]) -> Vec<u8> {
    let value = Value::Array(headers.iter().map(CompactHeader::to_value).collect());
    let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing into a Vec cannot fail; an empty result is refused by the peer.
    if ciborium::into_writer(&value, &mut encoder).is_err() {
        return Vec::new();
    }
    encoder.finish().unwrap_or_default()
}

/// Inflates and parses what [`encode_compact_headers`] made, expecting
/// `count` headers; bounded by [`MAX_INFLATED_HEADERS_BYTES`] and
/// [`MAX_TRANSFER_HEADERS`].
///
/// # Errors
/// [`Error::Wire`] for anything else.
pub fn decode_compact_headers(blob: &[u8], count: u32) -> Result<Vec<CompactHeader>> {
    use std::io::Read as _;
    if count as usize > MAX_TRANSFER_HEADERS {
        return Err(wire("snapshot", "too many headers"));
    }
    let mut inflated = Vec::new();
    flate2::read::DeflateDecoder::new(blob)
        .take(MAX_INFLATED_HEADERS_BYTES as u64 + 1)
        .read_to_end(&mut inflated)
        .map_err(|_| wire("snapshot", "headers do not inflate"))?;
    if inflated.len() > MAX_INFLATED_HEADERS_BYTES {
        return Err(wire("snapshot", "headers inflate over the cap"));
    }
    let value: Value = ciborium::de::from_reader_with_recursion_limit(&inflated[..], 16)
        .map_err(|_| wire("snapshot", "headers are not well-formed CBOR"))?;
    let Value::Array(values) = value else {
        return Err(wire("snapshot", "headers are not an array"));
    };
    if values.len() != count as usize {
        return Err(wire("snapshot", "header count differs from the announced one"));
    }
    values
        .into_iter()
        .map(|v| CompactHeader::from_value(v).map_err(|_| wire("snapshot", "a compact header does not parse")))
        .collect()
}

/// [`decode_compact_headers`] of a transfer of (patient, collection): every
/// header must name them.
///
/// # Errors
/// [`Error::Wire`].
pub fn decode_transfer_headers(
    blob: &[u8],
    count: u32,
    patient: PatientId,
    collection: Collection,
) -> Result<Vec<CompactHeader>> {
    let headers = decode_compact_headers(blob, count)?;
    if headers
        .iter()
        .any(|h| h.header().patient != patient || h.header().collection != collection)
    {
        return Err(wire("snapshot", "a header of another patient or collection"));
    }
    Ok(headers)
}

/// What the server answers.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Response {
    /// A page of a pull.
    Page {
        /// The server's store instance (a change resets the puller's cursor).
        instance: InstanceId,
        /// The last sequence number scanned; the next pull starts after it.
        next: u64,
        /// Whether more of the log remains to scan.
        more: bool,
        /// The items the puller may receive.
        items: Vec<Item>,
        /// Snapshot transfers covering envelopes this page left out (only
        /// for a puller that takes them).
        offers: Vec<Offer>,
    },
    /// A nudge was noted.
    Ack,
    /// What storing pushed items did.
    Pushed {
        /// Stored.
        accepted: u64,
        /// Held already.
        duplicates: u64,
        /// Waiting for dependencies.
        pending: u64,
        /// Rejected.
        rejected: u64,
    },
    /// A patient's summary, filtered for the asker.
    Summary {
        /// The patient's grants and revocations the asker may receive.
        consent: Vec<Item>,
        /// Envelope ids per collection the asker may receive.
        collections: Vec<(Collection, Vec<EnvelopeId>)>,
    },
    /// Fetched envelopes (only those the asker may receive).
    Fetched {
        /// The envelopes.
        items: Vec<Item>,
    },
    /// The request was well-formed but refused.
    Refused(RefusalCode),
    /// A snapshot transfer, or `None` when the server has none to give
    /// (no snapshot, or the asker may not receive the collection).
    Snapshot(Option<SnapshotPayload>),
    /// A page of the audit entries about the asking patient.
    Audit {
        /// Entries in increasing `seq`, all after the request's `after`, at
        /// most its `limit`.
        entries: Vec<AuditEntry>,
        /// Whether more entries follow the last one sent.
        more: bool,
    },
    /// Audit checkpoints signed by the answering node (see
    /// `medmesh_node::Node::audit_checkpoints`).
    Checkpoint(Box<AuditCheckpoints>),
    /// What the answering node still owes others of the asking patient's
    /// consent items.
    Outbox(Box<OutboxReport>),
    /// Signed address records (libp2p `PeerRecord` envelopes, protobuf
    /// bytes, each verifiable by itself) of the asking patient's practices.
    Practices {
        /// The records, as the node received them.
        records: Vec<Vec<u8>>,
    },
    /// The answer to [`Request::Digests`]: the positions in the request
    /// (ascending) of the patients whose digest differs from what this node
    /// would disclose to the asker — or of whom it would disclose nothing,
    /// which reads the same. Every other patient is in step.
    Differing(Vec<u32>),
}

impl Request {
    /// The message kind, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Pull { .. } => "pull",
            Self::Nudge { .. } => "nudge",
            Self::Push { .. } => "push",
            Self::Summary { .. } => "summary",
            Self::Fetch { .. } => "fetch",
            Self::Snapshot { .. } => "snapshot",
            Self::Audit { .. } => "audit",
            Self::Checkpoint { .. } => "checkpoint",
            Self::Reconcile { .. } => "reconcile",
            Self::Outbox { .. } => "outbox",
            Self::Practices { .. } => "practices",
            Self::Digests { .. } => "digests",
        }
    }
}

impl Response {
    /// The message kind, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Page { .. } => "page",
            Self::Ack => "ack",
            Self::Pushed { .. } => "pushed",
            Self::Summary { .. } => "summary",
            Self::Fetched { .. } => "fetched",
            Self::Refused(_) => "refused",
            Self::Snapshot(_) => "snapshot",
            Self::Audit { .. } => "audit",
            Self::Checkpoint(_) => "checkpoint",
            Self::Outbox(_) => "outbox",
            Self::Practices { .. } => "practices",
            Self::Differing(_) => "differing",
        }
    }
}

// ---- encoding ----

fn uint(n: u64) -> Value {
    Value::Integer(n.into())
}

fn bytes(b: &[u8]) -> Value {
    Value::Bytes(b.to_vec())
}

fn items_value(items: &[Item]) -> Value {
    Value::Array(
        items
            .iter()
            .map(|i| Value::Array(vec![uint(i.kind.code().into()), bytes(&i.bytes)]))
            .collect(),
    )
}

/// The wire number of an actor kind (as in the node's audit log).
fn actor_kind_wire(kind: ActorKind) -> u64 {
    match kind {
        ActorKind::LocalApp => 0,
        ActorKind::Peer => 1,
        ActorKind::Patient => 2,
        ActorKind::Node => 3,
    }
}

const ACTOR_KINDS: [ActorKind; 4] = [
    ActorKind::LocalApp,
    ActorKind::Peer,
    ActorKind::Patient,
    ActorKind::Node,
];

/// Every action, for decoding its name (a test checks the list is complete).
const ACTIONS: [Action; 10] = [
    Action::Read,
    Action::Write,
    Action::Receive,
    Action::Disclose,
    Action::Grant,
    Action::Revoke,
    Action::KeyShare,
    Action::Reject,
    Action::Exclude,
    Action::Quarantine,
];

fn audit_entry_value(e: &AuditEntry) -> Value {
    Value::Array(vec![
        uint(e.seq),
        uint(e.time),
        uint(actor_kind_wire(e.actor_kind)),
        Value::Text(e.actor_id.clone()),
        Value::Text(e.action.as_str().into()),
        uint(e.item_count),
        Value::Array(e.items.iter().map(|i| bytes(&i.0)).collect()),
        e.grant.map_or(Value::Null, |g| bytes(&g.0)),
        Value::Text(e.outcome.clone()),
        bytes(&e.prev_hash),
        bytes(&e.hash),
    ])
}

/// An upper bound of `e`'s encoded size in an Audit answer, for a server's
/// page byte budget.
pub fn audit_entry_size_bound(e: &AuditEntry) -> usize {
    // 11 fields: heads of at most 9 bytes each, the items' 35-byte
    // encodings, the texts, the grant and both hashes.
    11 * 9 + e.items.len() * 35 + e.actor_id.len() + e.outcome.len() + 16 + 2 * 34 + 16
}

fn to_bytes(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail; an error here would be a ciborium bug,
    // and an empty frame is then rejected by the peer.
    if ciborium::into_writer(value, &mut out).is_err() {
        out.clear();
    }
    out
}

impl Request {
    /// The CBOR encoding.
    pub fn encode(&self) -> Vec<u8> {
        let v = match self {
            Self::Pull {
                cursor,
                limit,
                snapshots,
            } => {
                let mut fields = vec![
                    uint(0),
                    bytes(&cursor.instance.0),
                    uint(cursor.seq),
                    uint(u64::from(*limit)),
                ];
                // Left out when `None`, so a puller that takes no offers
                // speaks the original four-field pull.
                if let Some(taking) = snapshots {
                    fields.push(Value::Array(taking.iter().map(|s| bytes(s)).collect()));
                }
                Value::Array(fields)
            }
            Self::Nudge { instance, seq } => Value::Array(vec![uint(1), bytes(&instance.0), uint(*seq)]),
            Self::Push { items, addrs } => Value::Array(vec![
                uint(2),
                items_value(items),
                Value::Array(addrs.iter().map(|a| Value::Text(a.to_string())).collect()),
            ]),
            Self::Summary { patient, digests } => {
                let mut fields = vec![uint(3), bytes(patient.as_bytes())];
                // Left out when empty: the original two-field summary.
                if !digests.is_empty() {
                    fields.push(Value::Array(
                        digests
                            .iter()
                            .map(|(c, d)| Value::Array(vec![Value::Text(c.as_str().into()), bytes(d)]))
                            .collect(),
                    ));
                }
                Value::Array(fields)
            }
            Self::Fetch { ids } => Value::Array(vec![uint(4), Value::Array(ids.iter().map(|i| bytes(&i.0)).collect())]),
            Self::Snapshot { patient, collection } => Value::Array(vec![
                uint(6),
                bytes(patient.as_bytes()),
                Value::Text(collection.as_str().into()),
            ]),
            Self::Reconcile { patient } => Value::Array(vec![uint(7), bytes(patient.as_bytes())]),
            Self::Audit { patient, after, limit } => Value::Array(vec![
                uint(5),
                bytes(patient.as_bytes()),
                uint(*after),
                uint(u64::from(*limit)),
            ]),
            Self::Checkpoint { patient, anchor } => Value::Array(vec![
                uint(8),
                bytes(patient.as_bytes()),
                anchor.map_or(Value::Null, uint),
            ]),
            Self::Outbox { patient } => Value::Array(vec![uint(9), bytes(patient.as_bytes())]),
            Self::Practices { patient } => Value::Array(vec![uint(11), bytes(patient.as_bytes())]),
            Self::Digests { patients } => Value::Array(vec![
                uint(10),
                Value::Array(
                    patients
                        .iter()
                        .map(|(p, d)| Value::Array(vec![bytes(p.as_bytes()), bytes(d)]))
                        .collect(),
                ),
            ]),
        };
        to_bytes(&v)
    }

    /// Decodes and validates a request frame.
    ///
    /// # Errors
    /// [`Error::Wire`] for anything over its cap, not CBOR or out of bounds.
    pub fn decode(frame: &[u8]) -> Result<Self> {
        if frame.len() > MAX_REQUEST_BYTES {
            return Err(wire("request", "frame over the size cap"));
        }
        let mut f = Fields::top("request", frame)?;
        let req = match f.uint()? {
            0 => {
                let with_snapshots = f.len == 5;
                if !with_snapshots {
                    f.expect_len(4)?;
                }
                let instance = InstanceId(f.fixed()?);
                let seq = f.uint()?;
                let limit = f.uint()?;
                if limit == 0 || limit > MAX_ITEMS_PER_MESSAGE as u64 {
                    return Err(wire("pull", "limit out of range"));
                }
                let snapshots = if with_snapshots {
                    Some(
                        f.array(MAX_OFFERS_PER_PAGE)?
                            .into_iter()
                            .map(|v| fixed_of::<32>("pull", v))
                            .collect::<Result<Vec<_>>>()?,
                    )
                } else {
                    None
                };
                Self::Pull {
                    cursor: Cursor { instance, seq },
                    limit: u32::try_from(limit).map_err(|_| wire("pull", "limit out of range"))?,
                    snapshots,
                }
            }
            1 => {
                f.expect_len(3)?;
                Self::Nudge {
                    instance: InstanceId(f.fixed()?),
                    seq: f.uint()?,
                }
            }
            2 => {
                f.expect_len(3)?;
                let items = decode_items("push", f.array(MAX_ITEMS_PER_MESSAGE)?)?;
                let addrs = f
                    .array(MAX_PUSH_ADDRS)?
                    .into_iter()
                    .map(|v| match v {
                        Value::Text(t) if t.len() <= MAX_ADDR_LEN => t
                            .parse::<Multiaddr>()
                            .map_err(|_| wire("push", "address is not a multiaddr")),
                        _ => Err(wire("push", "address is not short text")),
                    })
                    .collect::<Result<Vec<_>>>()?;
                Self::Push { items, addrs }
            }
            3 => {
                let with_digests = f.len == 3;
                if !with_digests {
                    f.expect_len(2)?;
                }
                let patient = PatientId::from_bytes(f.fixed()?).map_err(|_| wire("summary", "patient key invalid"))?;
                let mut digests = Vec::new();
                if with_digests {
                    for v in f.array(Collection::ALL.len())? {
                        let mut d = Fields::nested("summary", v, 2)?;
                        let collection: Collection =
                            d.text(16)?.parse().map_err(|_| wire("summary", "unknown collection"))?;
                        if digests.iter().any(|(c, _)| *c == collection) {
                            return Err(wire("summary", "collection listed twice"));
                        }
                        digests.push((collection, d.fixed()?));
                    }
                }
                Self::Summary { patient, digests }
            }
            4 => {
                f.expect_len(2)?;
                let ids = f
                    .array(MAX_FETCH_IDS)?
                    .into_iter()
                    .map(|v| fixed_of::<32>("fetch", v).map(EnvelopeId))
                    .collect::<Result<Vec<_>>>()?;
                if ids.is_empty() {
                    return Err(wire("fetch", "no ids"));
                }
                Self::Fetch { ids }
            }
            5 => {
                f.expect_len(4)?;
                let patient = PatientId::from_bytes(f.fixed()?).map_err(|_| wire("audit", "patient key invalid"))?;
                let after = f.uint()?;
                let limit = f.uint()?;
                if limit == 0 || limit > MAX_AUDIT_ENTRIES_PER_MESSAGE as u64 {
                    return Err(wire("audit", "limit out of range"));
                }
                Self::Audit {
                    patient,
                    after,
                    limit: u32::try_from(limit).map_err(|_| wire("audit", "limit out of range"))?,
                }
            }
            6 => {
                f.expect_len(3)?;
                let patient = PatientId::from_bytes(f.fixed()?).map_err(|_| wire("snapshot", "patient key invalid"))?;
                let collection = f
                    .text(16)?
                    .parse()
                    .map_err(|_| wire("snapshot", "unknown collection"))?;
                Self::Snapshot { patient, collection }
            }
            7 => {
                f.expect_len(2)?;
                let patient =
                    PatientId::from_bytes(f.fixed()?).map_err(|_| wire("reconcile", "patient key invalid"))?;
                Self::Reconcile { patient }
            }
            8 => {
                f.expect_len(3)?;
                let patient =
                    PatientId::from_bytes(f.fixed()?).map_err(|_| wire("checkpoint", "patient key invalid"))?;
                let anchor = match f.next()? {
                    Value::Null => None,
                    Value::Integer(i) => Some(u64::try_from(i).map_err(|_| wire("checkpoint", "anchor out of range"))?),
                    _ => return Err(wire("checkpoint", "anchor is not a number")),
                };
                Self::Checkpoint { patient, anchor }
            }
            9 => {
                f.expect_len(2)?;
                let patient = PatientId::from_bytes(f.fixed()?).map_err(|_| wire("outbox", "patient key invalid"))?;
                Self::Outbox { patient }
            }
            10 => {
                f.expect_len(2)?;
                let mut patients: Vec<(PatientId, [u8; 32])> = Vec::new();
                let mut seen = std::collections::HashSet::new();
                for v in f.array(MAX_DIGEST_PATIENTS)? {
                    let mut e = Fields::nested("digests", v, 2)?;
                    let patient =
                        PatientId::from_bytes(e.fixed()?).map_err(|_| wire("digests", "patient key invalid"))?;
                    if !seen.insert(patient) {
                        return Err(wire("digests", "patient listed twice"));
                    }
                    patients.push((patient, e.fixed()?));
                }
                if patients.is_empty() {
                    return Err(wire("digests", "no patients"));
                }
                Self::Digests { patients }
            }
            11 => {
                f.expect_len(2)?;
                let patient =
                    PatientId::from_bytes(f.fixed()?).map_err(|_| wire("practices", "patient key invalid"))?;
                Self::Practices { patient }
            }
            _ => return Err(wire("request", "unknown message kind")),
        };
        Ok(req)
    }
}

impl Response {
    /// The CBOR encoding.
    pub fn encode(&self) -> Vec<u8> {
        let v = match self {
            Self::Page {
                instance,
                next,
                more,
                items,
                offers,
            } => {
                let mut fields = vec![
                    uint(0),
                    bytes(&instance.0),
                    uint(*next),
                    Value::Bool(*more),
                    items_value(items),
                ];
                // Only pullers that take offers get any, and only they
                // read a sixth field.
                if !offers.is_empty() {
                    fields.push(Value::Array(
                        offers
                            .iter()
                            .map(|o| {
                                Value::Array(vec![
                                    bytes(o.patient.as_bytes()),
                                    Value::Text(o.collection.as_str().into()),
                                    bytes(&o.source),
                                ])
                            })
                            .collect(),
                    ));
                }
                Value::Array(fields)
            }
            Self::Ack => Value::Array(vec![uint(1)]),
            Self::Pushed {
                accepted,
                duplicates,
                pending,
                rejected,
            } => Value::Array(vec![
                uint(2),
                uint(*accepted),
                uint(*duplicates),
                uint(*pending),
                uint(*rejected),
            ]),
            Self::Summary { consent, collections } => Value::Array(vec![
                uint(3),
                items_value(consent),
                Value::Array(
                    collections
                        .iter()
                        .map(|(c, ids)| {
                            Value::Array(vec![
                                Value::Text(c.as_str().into()),
                                Value::Array(ids.iter().map(|i| bytes(&i.0)).collect()),
                            ])
                        })
                        .collect(),
                ),
            ]),
            Self::Fetched { items } => Value::Array(vec![uint(4), items_value(items)]),
            Self::Refused(code) => Value::Array(vec![uint(5), uint(code.wire())]),
            Self::Snapshot(None) => Value::Array(vec![uint(7), Value::Null]),
            Self::Snapshot(Some(p)) => Value::Array(vec![
                uint(7),
                Value::Array(vec![
                    bytes(&p.source),
                    bytes(&p.sealed_doc),
                    bytes(&p.headers),
                    uint(u64::from(p.count)),
                ]),
            ]),
            Self::Audit { entries, more } => Value::Array(vec![
                uint(6),
                Value::Array(entries.iter().map(audit_entry_value).collect()),
                Value::Bool(*more),
            ]),
            Self::Checkpoint(c) => {
                let opt = |c: &Option<AuditCheckpoint>| c.as_ref().map_or(Value::Null, |c| bytes(c.encoded()));
                Value::Array(vec![uint(8), bytes(c.head.encoded()), opt(&c.latest), opt(&c.anchor)])
            }
            Self::Outbox(report) => Value::Array(vec![
                uint(9),
                Value::Bool(report.settling),
                Value::Array(
                    report
                        .owed
                        .iter()
                        .map(|o| {
                            Value::Array(vec![
                                bytes(&o.item.0),
                                bytes(&o.peer.to_bytes()),
                                uint(o.since),
                                uint(u64::from(o.attempts)),
                                uint(o.next_at),
                                Value::Text(o.last_error.clone()),
                            ])
                        })
                        .collect(),
                ),
                Value::Array(report.held.iter().map(|i| bytes(&i.0)).collect()),
            ]),
            Self::Practices { records } => {
                Value::Array(vec![uint(11), Value::Array(records.iter().map(|r| bytes(r)).collect())])
            }
            Self::Differing(positions) => Value::Array(vec![
                uint(10),
                Value::Array(positions.iter().map(|i| uint(u64::from(*i))).collect()),
            ]),
        };
        to_bytes(&v)
    }

    /// Decodes and validates a response frame.
    ///
    /// # Errors
    /// [`Error::Wire`] for anything over its cap, not CBOR or out of bounds.
    pub fn decode(frame: &[u8]) -> Result<Self> {
        if frame.len() > MAX_RESPONSE_BYTES {
            return Err(wire("response", "frame over the size cap"));
        }
        let mut f = Fields::top("response", frame)?;
        let resp = match f.uint()? {
            0 => {
                let with_offers = f.len == 6;
                if !with_offers {
                    f.expect_len(5)?;
                }
                let instance = InstanceId(f.fixed()?);
                let next = f.uint()?;
                let more = f.bool()?;
                let items = decode_items("page", f.array(MAX_ITEMS_PER_MESSAGE)?)?;
                let offers = if with_offers {
                    f.array(MAX_OFFERS_PER_PAGE)?
                        .into_iter()
                        .map(|v| {
                            let mut o = Fields::nested("page", v, 3)?;
                            Ok(Offer {
                                patient: PatientId::from_bytes(o.fixed()?)
                                    .map_err(|_| wire("page", "patient key invalid"))?,
                                collection: o.text(16)?.parse().map_err(|_| wire("page", "unknown collection"))?,
                                source: o.fixed()?,
                            })
                        })
                        .collect::<Result<Vec<_>>>()?
                } else {
                    Vec::new()
                };
                Self::Page {
                    instance,
                    next,
                    more,
                    items,
                    offers,
                }
            }
            1 => {
                f.expect_len(1)?;
                Self::Ack
            }
            2 => {
                f.expect_len(5)?;
                Self::Pushed {
                    accepted: f.uint()?,
                    duplicates: f.uint()?,
                    pending: f.uint()?,
                    rejected: f.uint()?,
                }
            }
            3 => {
                f.expect_len(3)?;
                let consent = decode_items("summary", f.array(MAX_SUMMARY_CONSENT_ITEMS)?)?;
                if consent
                    .iter()
                    .any(|i| !matches!(i.kind, ItemKind::Grant | ItemKind::Revocation))
                {
                    return Err(wire("summary", "consent list holds a non-consent item"));
                }
                let mut total = 0usize;
                let mut collections = Vec::new();
                for entry in f.array(Collection::ALL.len())? {
                    let mut e = Fields::nested("summary", entry, 2)?;
                    let name = e.text(16)?;
                    let collection: Collection = name.parse().map_err(|_| wire("summary", "unknown collection"))?;
                    if collections.iter().any(|(c, _)| *c == collection) {
                        return Err(wire("summary", "collection listed twice"));
                    }
                    let ids = e
                        .array(MAX_SUMMARY_IDS)?
                        .into_iter()
                        .map(|v| fixed_of::<32>("summary", v).map(EnvelopeId))
                        .collect::<Result<Vec<_>>>()?;
                    total += ids.len();
                    if total > MAX_SUMMARY_IDS {
                        return Err(wire("summary", "too many ids"));
                    }
                    collections.push((collection, ids));
                }
                Self::Summary { consent, collections }
            }
            4 => {
                f.expect_len(2)?;
                let items = decode_items("fetched", f.array(MAX_ITEMS_PER_MESSAGE)?)?;
                if items.iter().any(|i| i.kind != ItemKind::Envelope) {
                    return Err(wire("fetched", "non-envelope item"));
                }
                Self::Fetched { items }
            }
            5 => {
                f.expect_len(2)?;
                let code = RefusalCode::from_wire(f.uint()?).ok_or_else(|| wire("refused", "unknown code"))?;
                Self::Refused(code)
            }
            6 => {
                f.expect_len(3)?;
                let entries = f
                    .array(MAX_AUDIT_ENTRIES_PER_MESSAGE)?
                    .into_iter()
                    .map(decode_audit_entry)
                    .collect::<Result<Vec<_>>>()?;
                if entries.iter().any(|e| e.seq == 0) || entries.windows(2).any(|w| w[0].seq >= w[1].seq) {
                    return Err(wire("audit", "entries not in increasing sequence"));
                }
                Self::Audit {
                    entries,
                    more: f.bool()?,
                }
            }
            7 => {
                f.expect_len(2)?;
                match f.next()? {
                    Value::Null => Self::Snapshot(None),
                    v => {
                        let mut p = Fields::nested("snapshot", v, 4)?;
                        let source = p.fixed()?;
                        let sealed_doc = p.byte_vec()?;
                        let headers = p.byte_vec()?;
                        let count = u32::try_from(p.uint()?)
                            .ok()
                            .filter(|c| *c as usize <= MAX_TRANSFER_HEADERS)
                            .ok_or_else(|| wire("snapshot", "too many headers"))?;
                        if sealed_doc.is_empty() || headers.is_empty() {
                            return Err(wire("snapshot", "empty document or headers"));
                        }
                        Self::Snapshot(Some(SnapshotPayload {
                            source,
                            sealed_doc,
                            headers,
                            count,
                        }))
                    }
                }
            }
            8 => {
                f.expect_len(4)?;
                let checkpoint = |v: Value| match v {
                    Value::Bytes(b) if b.len() <= MAX_AUDIT_CHECKPOINT_BYTES => {
                        AuditCheckpoint::decode(&b).map_err(|_| wire("checkpoint", "checkpoint does not verify"))
                    }
                    _ => Err(wire("checkpoint", "expected a checkpoint")),
                };
                let opt = |v: Value| match v {
                    Value::Null => Ok(None),
                    v => checkpoint(v).map(Some),
                };
                Self::Checkpoint(Box::new(AuditCheckpoints {
                    head: checkpoint(f.next()?)?,
                    latest: opt(f.next()?)?,
                    anchor: opt(f.next()?)?,
                }))
            }
            9 => {
                f.expect_len(4)?;
                let settling = f.bool()?;
                let owed = f
                    .array(MAX_OUTBOX_OWED)?
                    .into_iter()
                    .map(decode_owed_item)
                    .collect::<Result<Vec<_>>>()?;
                let held = f
                    .array(MAX_OUTBOX_HELD)?
                    .into_iter()
                    .map(|v| fixed_of::<32>("outbox", v).map(ItemId))
                    .collect::<Result<Vec<_>>>()?;
                Self::Outbox(Box::new(OutboxReport { settling, owed, held }))
            }
            10 => {
                f.expect_len(2)?;
                let positions = f
                    .array(MAX_DIGEST_PATIENTS)?
                    .into_iter()
                    .map(|v| match v {
                        Value::Integer(i) => u32::try_from(i)
                            .ok()
                            .filter(|i| (*i as usize) < MAX_DIGEST_PATIENTS)
                            .ok_or_else(|| wire("differing", "position out of range")),
                        _ => Err(wire("differing", "position is not a number")),
                    })
                    .collect::<Result<Vec<u32>>>()?;
                if positions.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(wire("differing", "positions not ascending"));
                }
                Self::Differing(positions)
            }
            11 => {
                f.expect_len(2)?;
                let records = f
                    .array(MAX_PRACTICE_RECORDS)?
                    .into_iter()
                    .map(|v| match v {
                        Value::Bytes(b) if b.len() <= MAX_ADDRESS_RECORD_BYTES => Ok(b),
                        _ => Err(wire("practices", "expected a signed record of at most 4 KiB")),
                    })
                    .collect::<Result<Vec<_>>>()?;
                Self::Practices { records }
            }
            _ => return Err(wire("response", "unknown message kind")),
        };
        Ok(resp)
    }
}

fn wire(message: &'static str, reason: &'static str) -> Error {
    Error::Wire { message, reason }
}

fn fixed_of<const N: usize>(message: &'static str, v: Value) -> Result<[u8; N]> {
    match v {
        Value::Bytes(b) => b.try_into().map_err(|_| wire(message, "byte string of wrong length")),
        _ => Err(wire(message, "expected a byte string")),
    }
}

fn decode_audit_entry(value: Value) -> Result<AuditEntry> {
    const M: &str = "audit";
    let mut f = Fields::nested(M, value, 11)?;
    let seq = f.uint()?;
    let time = f.uint()?;
    let kind = f.uint()?;
    let actor_kind = ACTOR_KINDS
        .into_iter()
        .find(|k| actor_kind_wire(*k) == kind)
        .ok_or_else(|| wire(M, "unknown actor kind"))?;
    let actor_id = f.text(MAX_AUDIT_ACTOR_ID_LEN)?;
    let action_name = f.text(16)?;
    let action = ACTIONS
        .into_iter()
        .find(|a| a.as_str() == action_name)
        .ok_or_else(|| wire(M, "unknown action"))?;
    let item_count = f.uint()?;
    let items = f
        .array(MAX_AUDIT_ITEMS_PER_ENTRY)?
        .into_iter()
        .map(|v| fixed_of::<32>(M, v).map(ItemId))
        .collect::<Result<Vec<_>>>()?;
    let expected = usize::try_from(item_count).map_or(MAX_AUDIT_ITEMS_PER_ENTRY, |n| n.min(MAX_AUDIT_ITEMS_PER_ENTRY));
    if items.len() != expected {
        return Err(wire(M, "item list does not match the item count"));
    }
    let grant = match f.next()? {
        Value::Null => None,
        v => Some(GrantId(fixed_of::<16>(M, v)?)),
    };
    let outcome = f.text(MAX_AUDIT_OUTCOME_LEN)?;
    Ok(AuditEntry {
        seq,
        time,
        actor_kind,
        actor_id,
        action,
        // The query named the patient; the answer does not repeat it.
        patient: None,
        item_count,
        items,
        grant,
        outcome,
        prev_hash: f.fixed()?,
        hash: f.fixed()?,
    })
}

fn decode_owed_item(value: Value) -> Result<OwedItem> {
    const M: &str = "outbox";
    let mut f = Fields::nested(M, value, 6)?;
    let item = ItemId(f.fixed()?);
    let peer = match f.next()? {
        Value::Bytes(b) if b.len() <= MAX_PEER_ID_LEN => {
            libp2p::PeerId::from_bytes(&b).map_err(|_| wire(M, "peer is not a PeerId"))?
        }
        _ => return Err(wire(M, "peer is not a short byte string")),
    };
    let since = f.uint()?;
    let attempts = u32::try_from(f.uint()?).map_err(|_| wire(M, "attempts out of range"))?;
    Ok(OwedItem {
        item,
        peer,
        since,
        attempts,
        next_at: f.uint()?,
        last_error: f.text(MAX_OUTBOX_ERROR_LEN)?,
    })
}

fn decode_items(message: &'static str, values: Vec<Value>) -> Result<Vec<Item>> {
    values
        .into_iter()
        .map(|v| {
            let mut f = Fields::nested(message, v, 2)?;
            let kind = ItemKind::from_code(f.uint()?).ok_or_else(|| wire(message, "unknown item kind"))?;
            let bytes = match f.next()? {
                Value::Bytes(b) if !b.is_empty() && b.len() <= kind.max_bytes() => b,
                Value::Bytes(_) => return Err(wire(message, "item empty or over its kind's cap")),
                _ => return Err(wire(message, "item is not a byte string")),
            };
            Ok(Item { kind, bytes })
        })
        .collect()
}

/// Reads the fields of one CBOR array in order.
struct Fields {
    message: &'static str,
    len: usize,
    values: std::vec::IntoIter<Value>,
}

impl Fields {
    fn top(message: &'static str, frame: &[u8]) -> Result<Self> {
        let value: Value = ciborium::de::from_reader_with_recursion_limit(frame, 16)
            .map_err(|_| wire(message, "not well-formed CBOR"))?;
        match value {
            Value::Array(values) if !values.is_empty() => Ok(Self {
                message,
                len: values.len(),
                values: values.into_iter(),
            }),
            _ => Err(wire(message, "not a non-empty array")),
        }
    }

    fn nested(message: &'static str, value: Value, len: usize) -> Result<Self> {
        match value {
            Value::Array(values) if values.len() == len => Ok(Self {
                message,
                len,
                values: values.into_iter(),
            }),
            _ => Err(wire(message, "wrong field count")),
        }
    }

    fn expect_len(&self, len: usize) -> Result<()> {
        if self.len == len {
            Ok(())
        } else {
            Err(wire(self.message, "wrong field count"))
        }
    }

    fn next(&mut self) -> Result<Value> {
        self.values.next().ok_or_else(|| wire(self.message, "missing field"))
    }

    fn uint(&mut self) -> Result<u64> {
        match self.next()? {
            Value::Integer(i) => u64::try_from(i).map_err(|_| wire(self.message, "integer out of range")),
            _ => Err(wire(self.message, "expected an unsigned integer")),
        }
    }

    fn bool(&mut self) -> Result<bool> {
        match self.next()? {
            Value::Bool(b) => Ok(b),
            _ => Err(wire(self.message, "expected a boolean")),
        }
    }

    fn text(&mut self, max: usize) -> Result<String> {
        match self.next()? {
            Value::Text(t) if t.len() <= max => Ok(t),
            _ => Err(wire(self.message, "expected short text")),
        }
    }

    fn fixed<const N: usize>(&mut self) -> Result<[u8; N]> {
        let message = self.message;
        fixed_of(message, self.next()?)
    }

    /// A byte string (bounded by the frame cap the caller already checked).
    fn byte_vec(&mut self) -> Result<Vec<u8>> {
        match self.next()? {
            Value::Bytes(b) => Ok(b),
            _ => Err(wire(self.message, "expected a byte string")),
        }
    }

    fn array(&mut self, max: usize) -> Result<Vec<Value>> {
        match self.next()? {
            Value::Array(a) if a.len() <= max => Ok(a),
            Value::Array(_) => Err(wire(self.message, "too many elements")),
            _ => Err(wire(self.message, "expected an array")),
        }
    }
}

/// The request-response codec: reads at most the cap (plus one byte to
/// detect an oversize frame), then decodes and validates.
#[derive(Clone, Copy, Debug, Default)]
pub struct Codec;

async fn read_capped<T: AsyncRead + Unpin + Send>(io: &mut T, max: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    io.take(max as u64 + 1).read_to_end(&mut buf).await?;
    if buf.len() > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "frame over the size cap"));
    }
    Ok(buf)
}

fn invalid(err: Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, err.to_string())
}

impl libp2p::request_response::Codec for Codec {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        let frame = read_capped(io, MAX_REQUEST_BYTES).await?;
        Request::decode(&frame).map_err(invalid)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        let frame = read_capped(io, MAX_RESPONSE_BYTES).await?;
        Response::decode(&frame).map_err(invalid)
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Request) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let frame = req.encode();
        if frame.len() > MAX_REQUEST_BYTES {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "request over the size cap"));
        }
        io.write_all(&frame).await
    }

    async fn write_response<T>(&mut self, _: &StreamProtocol, io: &mut T, resp: Response) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let frame = resp.encode();
        if frame.len() > MAX_RESPONSE_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "response over the size cap",
            ));
        }
        io.write_all(&frame).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(kind: ItemKind, n: usize) -> Item {
        Item {
            kind,
            bytes: vec![0xab; n],
        }
    }

    fn audit_entry(seq: u64, items: usize) -> AuditEntry {
        AuditEntry {
            seq,
            time: 1_700_000_000_000 + seq,
            actor_kind: ActorKind::Peer,
            actor_id: "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN".into(),
            action: Action::Disclose,
            patient: None,
            item_count: items as u64,
            items: (0..items).map(|i| ItemId([i as u8; 32])).collect(),
            grant: Some(GrantId([7; 16])),
            outcome: "ok".into(),
            prev_hash: [1; 32],
            hash: [2; 32],
        }
    }

    fn patient() -> PatientId {
        medmesh_crypto::SecretIdentity::from_seed(&[9; 32]).patient_id()
    }

    #[test]
    fn requests_round_trip() {
        let patient = medmesh_crypto::SecretIdentity::from_seed(&[9; 32]).patient_id();
        let cases = vec![
            Request::Pull {
                cursor: Cursor {
                    instance: InstanceId([1; 16]),
                    seq: 42,
                },
                limit: 100,
                snapshots: None,
            },
            Request::Pull {
                cursor: Cursor::default(),
                limit: 1,
                snapshots: Some(vec![]),
            },
            Request::Pull {
                cursor: Cursor::default(),
                limit: 1,
                snapshots: Some(vec![[7; 32], [8; 32]]),
            },
            Request::Snapshot {
                patient,
                collection: Collection::Labs,
            },
            Request::Nudge {
                instance: InstanceId([2; 16]),
                seq: 7,
            },
            Request::Push {
                items: vec![item(ItemKind::Grant, 10), item(ItemKind::Envelope, 1000)],
                addrs: vec!["/ip4/127.0.0.1/tcp/1".parse().unwrap()],
            },
            Request::Summary {
                patient,
                digests: vec![],
            },
            Request::Summary {
                patient,
                digests: vec![(Collection::Labs, [3; 32]), (Collection::Core, [4; 32])],
            },
            Request::Fetch {
                ids: vec![EnvelopeId([3; 32])],
            },
            Request::Reconcile { patient },
            Request::Audit {
                patient,
                after: 17,
                limit: MAX_AUDIT_ENTRIES_PER_MESSAGE as u32,
            },
            Request::Checkpoint { patient, anchor: None },
            Request::Checkpoint {
                patient,
                anchor: Some(u64::MAX),
            },
            Request::Outbox { patient },
            Request::Practices { patient },
            Request::Digests {
                patients: vec![(patient, [5; 32])],
            },
            Request::Digests {
                patients: (1..=3u8)
                    .map(|i| {
                        (
                            medmesh_crypto::SecretIdentity::from_seed(&[i; 32]).patient_id(),
                            [i; 32],
                        )
                    })
                    .collect(),
            },
        ];
        for req in cases {
            assert_eq!(Request::decode(&req.encode()).unwrap(), req, "case {}", req.name());
        }
    }

    #[test]
    fn responses_round_trip() {
        let cases = vec![
            Response::Page {
                instance: InstanceId([1; 16]),
                next: 9,
                more: true,
                items: vec![item(ItemKind::KeyShare, 300)],
                offers: vec![],
            },
            Response::Page {
                instance: InstanceId([1; 16]),
                next: 9,
                more: false,
                items: vec![],
                offers: vec![Offer {
                    patient: patient(),
                    collection: Collection::Core,
                    source: [4; 32],
                }],
            },
            Response::Snapshot(None),
            Response::Snapshot(Some(SnapshotPayload {
                source: [6; 32],
                sealed_doc: vec![1, 2, 3],
                headers: vec![4, 5],
                count: 2,
            })),
            Response::Ack,
            Response::Pushed {
                accepted: 1,
                duplicates: 2,
                pending: 3,
                rejected: 4,
            },
            Response::Summary {
                consent: vec![item(ItemKind::Revocation, 50)],
                collections: vec![(Collection::Labs, vec![EnvelopeId([5; 32])])],
            },
            Response::Fetched {
                items: vec![item(ItemKind::Envelope, 5)],
            },
            Response::Refused(RefusalCode::Internal),
            Response::Refused(RefusalCode::NotPatient),
            Response::Refused(RefusalCode::Busy),
            Response::Audit {
                entries: vec![],
                more: false,
            },
            Response::Audit {
                entries: vec![
                    audit_entry(1, 0),
                    AuditEntry {
                        actor_kind: ActorKind::Patient,
                        action: Action::Read,
                        grant: None,
                        outcome: "ok: audit log".into(),
                        ..audit_entry(5, 3)
                    },
                    AuditEntry {
                        item_count: 100_000,
                        ..audit_entry(9, MAX_AUDIT_ITEMS_PER_ENTRY)
                    },
                ],
                more: true,
            },
            Response::Checkpoint(Box::new(AuditCheckpoints {
                head: checkpoint(9),
                latest: None,
                anchor: None,
            })),
            Response::Checkpoint(Box::new(AuditCheckpoints {
                head: checkpoint(9),
                latest: Some(checkpoint(12)),
                anchor: Some(checkpoint(3)),
            })),
            Response::Outbox(Box::default()),
            Response::Outbox(Box::new(OutboxReport {
                settling: true,
                owed: vec![OwedItem {
                    item: ItemId([3; 32]),
                    peer: libp2p::PeerId::random(),
                    since: 1_700_000_000_000,
                    attempts: u32::MAX,
                    next_at: u64::MAX,
                    last_error: "é".repeat(MAX_OUTBOX_ERROR_LEN / 2),
                }],
                held: vec![ItemId([4; 32]); MAX_OUTBOX_HELD],
            })),
            Response::Practices { records: vec![] },
            Response::Practices {
                records: vec![vec![7; MAX_ADDRESS_RECORD_BYTES]; MAX_PRACTICE_RECORDS],
            },
            Response::Differing(vec![]),
            Response::Differing(vec![0, 7, MAX_DIGEST_PATIENTS as u32 - 1]),
        ];
        for resp in cases {
            assert_eq!(Response::decode(&resp.encode()).unwrap(), resp, "case {}", resp.name());
        }
    }

    #[test]
    fn practices_answers_over_their_caps_are_refused() {
        let too_big = Response::Practices {
            records: vec![vec![7; MAX_ADDRESS_RECORD_BYTES + 1]],
        };
        assert!(Response::decode(&too_big.encode()).is_err());
        let too_many = Response::Practices {
            records: vec![vec![7; 8]; MAX_PRACTICE_RECORDS + 1],
        };
        assert!(Response::decode(&too_many.encode()).is_err());
    }

    fn checkpoint(seq: u64) -> AuditCheckpoint {
        let node = medmesh_crypto::SecretIdentity::from_seed(&[4; 32]);
        AuditCheckpoint::sign(
            medmesh_crypto::AuditCheckpointTerms {
                node: node.practice_id().unwrap(),
                seq,
                head: [seq as u8; 32],
                time: 1,
            },
            &node,
        )
        .unwrap()
    }

    #[test]
    fn a_checkpoint_answer_with_an_altered_checkpoint_is_an_error() {
        let good = Response::Checkpoint(Box::new(AuditCheckpoints {
            head: checkpoint(9),
            latest: None,
            anchor: None,
        }))
        .encode();
        let at = good.len() - 70;
        let mut bad = good.clone();
        bad[at] ^= 1;
        assert!(Response::decode(&bad).is_err());
    }

    #[test]
    fn bad_frames_are_typed_errors() {
        let oversize_grant = Request::Push {
            items: vec![item(ItemKind::Grant, medmesh_crypto::MAX_GRANT_BYTES + 1)],
            addrs: vec![],
        }
        .encode();
        let zero_limit = Request::Pull {
            cursor: Cursor::default(),
            limit: 0,
            snapshots: None,
        }
        .encode();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("not cbor", vec![0xff, 0x00, 0x13]),
            (
                "truncated",
                Request::Nudge {
                    instance: InstanceId([0; 16]),
                    seq: 1,
                }
                .encode()[..5]
                    .to_vec(),
            ),
            ("a map", vec![0xa0]),
            ("unknown kind", vec![0x81, 0x18, 0x63]),
            ("oversize grant", oversize_grant),
            ("zero limit", zero_limit),
            ("deep nesting", vec![0x81; 64]),
            (
                "huge declared array",
                vec![0x82, 0x02, 0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            ),
            ("over the frame cap", vec![0; MAX_REQUEST_BYTES + 1]),
            (
                "audit zero limit",
                Request::Audit {
                    patient: patient(),
                    after: 0,
                    limit: 0,
                }
                .encode(),
            ),
            (
                "audit limit over the cap",
                Request::Audit {
                    patient: patient(),
                    after: 0,
                    limit: MAX_AUDIT_ENTRIES_PER_MESSAGE as u32 + 1,
                }
                .encode(),
            ),
            (
                "audit patient not a key",
                hex::decode(
                    "8405 5820 0200000000000000000000000000000000000000000000000000000000000000 00 01".replace(' ', ""),
                )
                .unwrap(),
            ),
            (
                "audit missing limit",
                hex::decode("83055820".to_owned() + &"ab".repeat(32)).unwrap(),
            ),
            (
                "reconcile patient not a key",
                hex::decode(
                    "8207 5820 0200000000000000000000000000000000000000000000000000000000000000".replace(' ', ""),
                )
                .unwrap(),
            ),
            ("reconcile without a patient", vec![0x81, 0x07]),
        ];
        for (name, frame) in cases {
            assert!(
                matches!(Request::decode(&frame), Err(Error::Wire { .. })),
                "case {name} should be a wire error"
            );
        }
    }

    #[test]
    fn bad_audit_answers_are_typed_errors() {
        let answer = |entries: Vec<AuditEntry>| Response::Audit { entries, more: false }.encode();
        let too_many = (1..=MAX_AUDIT_ENTRIES_PER_MESSAGE as u64 + 1)
            .map(|s| audit_entry(s, 0))
            .collect();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("too many entries", answer(too_many)),
            ("out of order", answer(vec![audit_entry(3, 0), audit_entry(2, 0)])),
            ("repeated seq", answer(vec![audit_entry(3, 0), audit_entry(3, 0)])),
            ("seq zero", answer(vec![audit_entry(0, 0)])),
            (
                "count below the list",
                answer(vec![AuditEntry {
                    item_count: 1,
                    ..audit_entry(1, 2)
                }]),
            ),
            (
                "count above a short list",
                answer(vec![AuditEntry {
                    item_count: 5,
                    ..audit_entry(1, 2)
                }]),
            ),
            (
                "too many items",
                answer(vec![audit_entry(1, MAX_AUDIT_ITEMS_PER_ENTRY + 1)]),
            ),
            (
                "long outcome",
                answer(vec![AuditEntry {
                    outcome: "x".repeat(MAX_AUDIT_OUTCOME_LEN + 1),
                    ..audit_entry(1, 0)
                }]),
            ),
            (
                "long actor id",
                answer(vec![AuditEntry {
                    actor_id: "x".repeat(MAX_AUDIT_ACTOR_ID_LEN + 1),
                    ..audit_entry(1, 0)
                }]),
            ),
            ("missing more", {
                let mut f = answer(vec![]);
                f[0] = 0x82;
                f.pop();
                f
            }),
        ];
        for (name, frame) in cases {
            assert!(
                matches!(Response::decode(&frame), Err(Error::Wire { .. })),
                "case {name} should be a wire error"
            );
        }
        // Fields patched in the encoded entry: each must be refused.
        let patched = [
            (2, uint(4)),
            (4, Value::Text("delete".into())),
            (5, Value::Integer((-1).into())),
            (7, bytes(&[7; 15])),
            (9, bytes(&[1; 31])),
            (10, Value::Null),
        ];
        for (field, value) in patched {
            let Value::Array(mut fields) = audit_entry_value(&audit_entry(1, 0)) else {
                unreachable!()
            };
            fields[field] = value;
            let frame = to_bytes(&Value::Array(vec![
                uint(6),
                Value::Array(vec![Value::Array(fields)]),
                Value::Bool(false),
            ]));
            assert!(
                matches!(Response::decode(&frame), Err(Error::Wire { .. })),
                "patched field {field} should be a wire error"
            );
        }
    }

    #[test]
    fn every_action_and_actor_kind_has_a_wire_form() {
        // A new variant in medmesh-node breaks this match, and so this test's
        // build, until the lists above learn it.
        fn listed(a: Action) -> bool {
            match a {
                Action::Read
                | Action::Write
                | Action::Receive
                | Action::Disclose
                | Action::Grant
                | Action::Revoke
                | Action::KeyShare
                | Action::Reject
                | Action::Exclude
                | Action::Quarantine => ACTIONS.contains(&a),
            }
        }
        assert!(ACTIONS.into_iter().all(listed));
        for (i, a) in ACTIONS.iter().enumerate() {
            assert!(a.as_str().len() <= 16);
            assert!(!ACTIONS[..i].contains(a), "{} listed twice", a.as_str());
        }
        for k in ACTOR_KINDS {
            let e = AuditEntry {
                actor_kind: k,
                ..audit_entry(1, 0)
            };
            let resp = Response::Audit {
                entries: vec![e],
                more: false,
            };
            assert_eq!(Response::decode(&resp.encode()).unwrap(), resp);
        }
    }

    #[test]
    fn a_full_audit_page_fits_the_frame_cap() {
        // The server's byte budget stops a page at PAGE_BYTE_BUDGET plus one
        // entry; the largest entry must leave that under the cap.
        let largest = AuditEntry {
            actor_id: "x".repeat(MAX_AUDIT_ACTOR_ID_LEN),
            outcome: "y".repeat(MAX_AUDIT_OUTCOME_LEN),
            seq: u64::MAX,
            time: u64::MAX,
            item_count: u64::MAX,
            ..audit_entry(1, MAX_AUDIT_ITEMS_PER_ENTRY)
        };
        let one = Response::Audit {
            entries: vec![largest.clone()],
            more: true,
        }
        .encode()
        .len();
        assert!(one <= audit_entry_size_bound(&largest) + 16, "bound {one}");
        assert!(PAGE_BYTE_BUDGET + audit_entry_size_bound(&largest) + 16 < MAX_RESPONSE_BYTES);
    }

    #[test]
    fn every_bit_flip_of_a_request_is_an_error_or_a_valid_request() {
        // A flipped bit must never panic; it decodes to an error or to some
        // other well-formed request that the server then checks as usual.
        let frames = [
            Request::Fetch {
                ids: vec![EnvelopeId([3; 32])],
            }
            .encode(),
            Request::Audit {
                patient: patient(),
                after: 300,
                limit: 64,
            }
            .encode(),
        ];
        for frame in frames {
            for bit in 0..frame.len() * 8 {
                let mut f = frame.clone();
                f[bit / 8] ^= 1 << (bit % 8);
                if let Ok(Request::Audit { limit, .. }) = Request::decode(&f) {
                    assert!((1..=MAX_AUDIT_ENTRIES_PER_MESSAGE as u32).contains(&limit), "bit {bit}");
                }
            }
        }
    }

    #[test]
    fn every_bit_flip_of_a_response_is_an_error_or_a_valid_response() {
        let frame = Response::Page {
            instance: InstanceId([1; 16]),
            next: 3,
            more: true,
            items: vec![item(ItemKind::Grant, 20), item(ItemKind::Envelope, 30)],
            offers: vec![],
        }
        .encode();
        for bit in 0..frame.len() * 8 {
            let mut f = frame.clone();
            f[bit / 8] ^= 1 << (bit % 8);
            if let Ok(Response::Page { items, .. }) = Response::decode(&f) {
                assert!(items.iter().all(|i| i.bytes.len() <= i.kind.max_bytes()), "bit {bit}");
            }
        }
    }

    #[test]
    fn every_bit_flip_of_an_audit_answer_is_an_error_or_a_valid_answer() {
        let frame = Response::Audit {
            entries: vec![audit_entry(4, 2), audit_entry(8, 0)],
            more: true,
        }
        .encode();
        for bit in 0..frame.len() * 8 {
            let mut f = frame.clone();
            f[bit / 8] ^= 1 << (bit % 8);
            if let Ok(Response::Audit { entries, .. }) = Response::decode(&f) {
                assert!(entries.len() <= MAX_AUDIT_ENTRIES_PER_MESSAGE, "bit {bit}");
                assert!(entries.windows(2).all(|w| w[0].seq < w[1].seq), "bit {bit}");
                for e in &entries {
                    assert!(e.items.len() <= MAX_AUDIT_ITEMS_PER_ENTRY, "bit {bit}");
                    assert!(e.outcome.len() <= MAX_AUDIT_OUTCOME_LEN, "bit {bit}");
                    assert!(e.actor_id.len() <= MAX_AUDIT_ACTOR_ID_LEN, "bit {bit}");
                }
            }
        }
    }

    #[test]
    fn garbage_never_panics_the_decoders() {
        // Deterministic pseudo-random frames, some starting like an audit
        // message, decode to errors or to values within their caps.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..4000 {
            let len = (next() % 200) as usize;
            let mut f: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 2 == 0 && f.len() > 2 {
                f[0] = 0x83 + (round % 3) as u8;
                f[1] = if round % 4 == 0 { 0x05 } else { 0x06 };
            }
            let _ = Request::decode(&f);
            if let Ok(Response::Audit { entries, .. }) = Response::decode(&f) {
                assert!(entries.len() <= MAX_AUDIT_ENTRIES_PER_MESSAGE);
            }
        }
    }

    /// The example exchange in `docs/protocol.md`, byte for byte.
    #[test]
    fn example_exchange_matches_the_docs() {
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "pull",
                Request::Pull {
                    cursor: Cursor {
                        instance: InstanceId([0x11; 16]),
                        seq: 42,
                    },
                    limit: 256,
                    snapshots: None,
                }
                .encode(),
                "84005011111111111111111111111111111111 182a190100",
            ),
            (
                "page",
                Response::Page {
                    instance: InstanceId([0x22; 16]),
                    next: 57,
                    more: false,
                    items: vec![],
                    offers: vec![],
                }
                .encode(),
                "85005022222222222222222222222222222222 1839f480",
            ),
            (
                "nudge",
                Request::Nudge {
                    instance: InstanceId([0x22; 16]),
                    seq: 58,
                }
                .encode(),
                "83015022222222222222222222222222222222 183a",
            ),
            ("ack", Response::Ack.encode(), "8101"),
            (
                "fetch",
                Request::Fetch {
                    ids: vec![EnvelopeId([0xab; 32])],
                }
                .encode(),
                "8204815820abababababababababababababababababababababababababababababababab",
            ),
            (
                "audit",
                Request::Audit {
                    patient: patient(),
                    after: 0,
                    limit: 256,
                }
                .encode(),
                "84055820fd1724385aa0c75b64fb78cd602fa1d991fdebf76b13c58ed702eac835e9f618 00190100",
            ),
            ("refused", Response::Refused(RefusalCode::NotPatient).encode(), "820502"),
            ("refused busy", Response::Refused(RefusalCode::Busy).encode(), "820503"),
            (
                "audit answer",
                Response::Audit {
                    entries: vec![],
                    more: false,
                }
                .encode(),
                "830680f4",
            ),
            (
                "outbox",
                Request::Outbox { patient: patient() }.encode(),
                "82095820fd1724385aa0c75b64fb78cd602fa1d991fdebf76b13c58ed702eac835e9f618",
            ),
            (
                "outbox answer",
                Response::Outbox(Box::new(OutboxReport {
                    settling: false,
                    owed: vec![],
                    held: vec![ItemId([0xab; 32])],
                }))
                .encode(),
                "8409f480 815820abababababababababababababababababababababababababababababababab",
            ),
            (
                "digests",
                Request::Digests {
                    patients: vec![(patient(), [0xcd; 32])],
                }
                .encode(),
                "820a81825820fd1724385aa0c75b64fb78cd602fa1d991fdebf76b13c58ed702eac835e9f618 \
                 5820cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd",
            ),
            ("differing", Response::Differing(vec![]).encode(), "820a80"),
            (
                "differing 0 and 300",
                Response::Differing(vec![0, 300]).encode(),
                "820a820019012c",
            ),
            (
                "patient digest",
                patient_digest(&DigestParts {
                    consent: vec![(ItemId([0x01; 32]), false)],
                    collections: vec![(Collection::Labs, summary_digest(&[]))],
                })
                .to_vec(),
                "93cf77e301d9d0ec7107166a2aa0d907c572ddd86d4e5ab5a22f1105c8546904",
            ),
        ];
        for (name, bytes, expected) in cases {
            let expected: String = expected.split_whitespace().collect();
            assert_eq!(hex::encode(bytes), expected, "case {name}");
        }
    }

    /// A digest request names each patient once, at least one and at most
    /// [`MAX_DIGEST_PATIENTS`]; an answer's positions ascend within the cap.
    #[test]
    fn bad_digest_messages_are_typed_errors() {
        let entry = |seed: u8| {
            Value::Array(vec![
                bytes(
                    medmesh_crypto::SecretIdentity::from_seed(&[seed; 32])
                        .patient_id()
                        .as_bytes(),
                ),
                bytes(&[0; 32]),
            ])
        };
        let request = |entries: Vec<Value>| to_bytes(&Value::Array(vec![uint(10), Value::Array(entries)]));
        let answer = |positions: Vec<Value>| to_bytes(&Value::Array(vec![uint(10), Value::Array(positions)]));
        assert!(Request::decode(&request(vec![entry(1), entry(2)])).is_ok());
        for (name, frame) in [
            ("no patients", request(vec![])),
            ("a patient twice", request(vec![entry(1), entry(1)])),
            ("too many patients", request(vec![entry(1); MAX_DIGEST_PATIENTS + 1])),
            (
                "short digest",
                request(vec![Value::Array(vec![bytes(patient().as_bytes()), bytes(&[0; 31])])]),
            ),
        ] {
            assert!(
                matches!(Request::decode(&frame), Err(Error::Wire { .. })),
                "case {name}"
            );
        }
        assert!(Response::decode(&answer(vec![uint(0), uint(3)])).is_ok());
        for (name, frame) in [
            ("descending", answer(vec![uint(3), uint(0)])),
            ("repeated", answer(vec![uint(3), uint(3)])),
            ("beyond the cap", answer(vec![uint(MAX_DIGEST_PATIENTS as u64)])),
            ("not a number", answer(vec![Value::Null])),
            ("too many", answer((0..=MAX_DIGEST_PATIENTS as u64).map(uint).collect())),
        ] {
            assert!(
                matches!(Response::decode(&frame), Err(Error::Wire { .. })),
                "case {name}"
            );
        }
    }

    /// Every bound of an outbox answer is checked: a longer failure text,
    /// more debts than the cap, a peer that is no PeerId, a short item id.
    #[test]
    fn bad_outbox_answers_are_typed_errors() {
        let owed = |last_error: String| OwedItem {
            item: ItemId([1; 32]),
            peer: libp2p::PeerId::random(),
            since: 1,
            attempts: 1,
            next_at: 2,
            last_error,
        };
        let report = |owed: Vec<OwedItem>| {
            Response::Outbox(Box::new(OutboxReport {
                settling: false,
                owed,
                held: vec![],
            }))
        };
        let fine = report(vec![owed("x".repeat(MAX_OUTBOX_ERROR_LEN))]);
        assert_eq!(Response::decode(&fine.encode()).unwrap(), fine);
        let bad_peer = to_bytes(&Value::Array(vec![
            uint(9),
            Value::Bool(false),
            Value::Array(vec![Value::Array(vec![
                bytes(&[1; 32]),
                bytes(&[1, 2, 3]),
                uint(1),
                uint(1),
                uint(2),
                Value::Text(String::new()),
            ])]),
            Value::Array(vec![]),
        ]));
        for (name, frame) in [
            (
                "error over its cap",
                report(vec![owed("x".repeat(MAX_OUTBOX_ERROR_LEN + 1))]).encode(),
            ),
            (
                "too many debts",
                report(vec![owed(String::new()); MAX_OUTBOX_OWED + 1]).encode(),
            ),
            ("peer not a PeerId", bad_peer),
            ("short item id", hex::decode("8409f480814100").unwrap()),
            ("missing held list", hex::decode("8309f480").unwrap()),
        ] {
            assert!(
                matches!(Response::decode(&frame), Err(Error::Wire { .. })),
                "case {name}"
            );
        }
    }

    #[test]
    fn compact_headers_round_trip_compressed_and_bombs_are_refused() {
        use medmesh_crypto::{ActorId, Change, Envelope, EpochKey, SecretIdentity};
        let patient = SecretIdentity::from_seed(&[9; 32]);
        let key = EpochKey::generate(patient.patient_id(), Collection::Labs, 0).unwrap();
        let actor = ActorId::for_author(&patient.public_bytes(), [1; 8]);
        let headers: Vec<CompactHeader> = (1..=200)
            .map(|seq| {
                let change = Change {
                    bytes: b"change",
                    hash: [seq as u8; 32],
                    actor,
                    seq,
                };
                Envelope::seal(
                    (key.patient, key.collection),
                    &key,
                    &patient,
                    None,
                    change,
                    1_800_000_000_000 + seq,
                )
                .unwrap()
                .signed_header()
                .compact()
            })
            .collect();
        let blob = encode_compact_headers(&headers);
        let plain: usize = headers.iter().map(|h| h.encode().len()).sum();
        // Patient, collection, key id and actor repeat in every header.
        assert!(blob.len() * 10 < plain * 7, "{} vs {plain}", blob.len());
        assert_eq!(decode_compact_headers(&blob, 200).unwrap(), headers);
        assert!(decode_compact_headers(&blob, 199).is_err(), "count must match");
        assert!(decode_compact_headers(&blob[..blob.len() / 2], 200).is_err());
        assert!(decode_compact_headers(b"not deflate at all", 1).is_err());
        assert!(decode_compact_headers(&blob, MAX_TRANSFER_HEADERS as u32 + 1).is_err());
        // 100 MB of zeros deflate to ~100 KB: refused at the inflation cap.
        let mut bomb = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut bomb, &vec![0u8; 100 * 1024 * 1024]).unwrap();
        let bomb = bomb.finish().unwrap();
        assert!(matches!(
            decode_compact_headers(&bomb, 1),
            Err(Error::Wire {
                reason: "headers inflate over the cap",
                ..
            })
        ));
    }
}
