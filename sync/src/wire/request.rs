//! [`Request`]: what a peer asks, its CBOR encoding and its validating
//! decoder (one numbered array per message kind).

use ciborium::Value;
use libp2p::Multiaddr;
use medmesh_crypto::{Collection, EnvelopeId, PatientId};
use medmesh_node::item::{Cursor, InstanceId, Item};

use super::cbor::{Fields, bytes, decode_items, fixed_of, items_value, to_bytes, uint, wire};
use super::{
    MAX_ADDR_LEN, MAX_AUDIT_ENTRIES_PER_MESSAGE, MAX_DIGEST_PATIENTS, MAX_FETCH_IDS, MAX_ITEMS_PER_MESSAGE,
    MAX_OFFERS_PER_PAGE, MAX_PUSH_ADDRS, MAX_REQUEST_BYTES,
};
use crate::Result;

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
        /// Per collection, the [`summary_digest`](super::summary_digest) of the envelope ids the
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
    /// patient; the answer is [`Response::Ack`](super::Response::Ack) either way.
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
    /// [`patient_digest`](super::patient_digest) of what the asker holds of it. Answered with
    /// [`Response::Differing`](super::Response::Differing). Added after `Outbox`: a node that predates
    /// it cannot decode it and drops the stream, and the asker falls back
    /// to one `Summary` per patient.
    Digests {
        /// (patient, digest), 1..=[`MAX_DIGEST_PATIENTS`], no patient twice.
        patients: Vec<(PatientId, [u8; 32])>,
    },
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
    /// [`Error::Wire`](crate::Error::Wire) for anything over its cap, not CBOR or out of bounds.
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
