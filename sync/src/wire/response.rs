//! [`Response`]: what the server answers, why it may refuse
//! ([`RefusalCode`]), the CBOR encoding and the validating decoder.

use ciborium::Value;
use medmesh_crypto::{AuditCheckpoint, Collection, EnvelopeId, MAX_AUDIT_CHECKPOINT_BYTES, PatientId};
use medmesh_node::AuditCheckpoints;
use medmesh_node::audit::AuditEntry;
use medmesh_node::item::{InstanceId, Item, ItemId, ItemKind};

use super::audit::{audit_entry_value, decode_audit_entry};
use super::cbor::{Fields, bytes, decode_items, fixed_of, items_value, to_bytes, uint, wire};
use super::outbox::decode_owed_item;
use super::{
    MAX_ADDRESS_RECORD_BYTES, MAX_AUDIT_ENTRIES_PER_MESSAGE, MAX_DIGEST_PATIENTS, MAX_ITEMS_PER_MESSAGE,
    MAX_OFFERS_PER_PAGE, MAX_OUTBOX_HELD, MAX_OUTBOX_OWED, MAX_PRACTICE_RECORDS, MAX_RESPONSE_BYTES,
    MAX_SUMMARY_CONSENT_ITEMS, MAX_SUMMARY_IDS, MAX_TRANSFER_HEADERS, Offer, OutboxReport, SnapshotPayload,
};
use crate::Result;

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
    /// The answer to [`Request::Digests`](super::Request::Digests): the positions in the request
    /// (ascending) of the patients whose digest differs from what this node
    /// would disclose to the asker — or of whom it would disclose nothing,
    /// which reads the same. Every other patient is in step.
    Differing(Vec<u32>),
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
    /// [`Error::Wire`](crate::Error::Wire) for anything over its cap, not CBOR or out of bounds.
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
