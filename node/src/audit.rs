//! The audit log (DESIGN §8): an append-only, hash-chained record of every
//! read and write through the node API, every disclosure to a peer, every
//! grant, revocation, key share and rejection. Entries hold ids and actions
//! only, never resource content.
//!
//! Each entry is a CBOR array `[seq, time, actor kind, actor id, action,
//! patient|null, [item ids], grant|null, outcome, prev hash, hash]`, where
//! `hash = SHA-256("medmesh/audit/v1" ‖ CBOR of the first ten fields)` and
//! `prev hash` is the previous entry's `hash` (32 zero bytes for the first).
//! [`verify_chain`] recomputes every hash and link and names the first entry
//! that does not fit.
//!
//! The chain alone catches an edit of one entry in place, not a cut of its
//! tail or a consistent rewrite. So after every group commit that appended
//! entries, the committer signs an [`AuditCheckpoint`] of the head (seq and
//! hash) with the node key and keeps the latest apart from the log (written
//! before the flush that makes the entries durable): `check_anchor` then
//! tells a log that lost entries after its checkpoint, or whose checkpointed
//! entry changed. Whoever also holds the node key can re-sign a rewritten
//! log; only checkpoints kept elsewhere (the patient's CLI) catch that.

use ciborium::Value;
use medmesh_crypto::{
    AuditCheckpoint, AuditCheckpointTerms, GrantId, PatientId, PracticeId, SecretIdentity, Timestamp,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::item::ItemId;
use crate::{Error, Result};

const AUDIT_TAG: &[u8] = b"medmesh/audit/v1";

/// Who acted.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActorKind {
    /// An app of the practice, through the gateway.
    LocalApp,
    /// Another practice's node, through sync.
    Peer,
    /// The patient, through their CLI.
    Patient,
    /// This node itself.
    Node,
}

impl ActorKind {
    fn tag(self) -> u64 {
        match self {
            Self::LocalApp => 0,
            Self::Peer => 1,
            Self::Patient => 2,
            Self::Node => 3,
        }
    }

    fn from_tag(t: u64) -> Option<Self> {
        Some(match t {
            0 => Self::LocalApp,
            1 => Self::Peer,
            2 => Self::Patient,
            3 => Self::Node,
            _ => return None,
        })
    }
}

/// What was done.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Read of a patient's data.
    Read,
    /// Local write of a change.
    Write,
    /// Items received from a peer or the patient and stored.
    Receive,
    /// Items of a patient sent to a peer.
    Disclose,
    /// A grant stored.
    Grant,
    /// A revocation stored.
    Revoke,
    /// A key share stored.
    KeyShare,
    /// An item refused permanently.
    Reject,
    /// Previously accepted envelopes excluded (beyond a revocation's cut).
    Exclude,
    /// A stored item failed verification at rest and was quarantined.
    Quarantine,
}

impl Action {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Receive => "receive",
            Self::Disclose => "disclose",
            Self::Grant => "grant",
            Self::Revoke => "revoke",
            Self::KeyShare => "key-share",
            Self::Reject => "reject",
            Self::Exclude => "exclude",
            Self::Quarantine => "quarantine",
        }
    }

    fn from_str(s: &str) -> Option<Self> {
        [
            Self::Read,
            Self::Write,
            Self::Receive,
            Self::Disclose,
            Self::Grant,
            Self::Revoke,
            Self::KeyShare,
            Self::Reject,
            Self::Exclude,
            Self::Quarantine,
        ]
        .into_iter()
        .find(|a| a.as_str() == s)
    }
}

/// What to record (the store adds seq, time and the chain hashes).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct AuditRecord {
    /// Who acted.
    pub actor_kind: ActorKind,
    /// Their id: a PeerId, a did:key, an app/token name, or this node's PeerId.
    pub actor_id: String,
    /// What they did.
    pub action: Action,
    /// Whose data, if one patient's.
    pub patient: Option<PatientId>,
    /// Item ids concerned (envelope ids, item hashes).
    pub items: Vec<ItemId>,
    /// The grant concerned, if any.
    pub grant: Option<GrantId>,
    /// `ok`, `refused: …`, `rejected: …` — a reason, never content.
    pub outcome: String,
}

/// One entry as stored, and as it travels to a patient (sync's Audit
/// answer) and to local tools (`GET /api/audit`, as JSON with ids in hex and
/// the patient as did:key). One type for all three.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct AuditEntry {
    /// Position in the log, from 1.
    pub seq: u64,
    /// When it was appended (ms since the Unix epoch).
    pub time: Timestamp,
    /// Who acted.
    pub actor_kind: ActorKind,
    /// Their id: a PeerId, a did:key, an app name, or the node's PeerId.
    pub actor_id: String,
    /// What they did.
    pub action: Action,
    /// Whose data. `None` in a patient's audit answer, whose query names
    /// the patient (sync leaves it out on the wire).
    #[serde(serialize_with = "as_display_opt")]
    pub patient: Option<PatientId>,
    /// The item ids concerned (envelope ids, item hashes). A server may cut
    /// the list to fit the wire; `item_count` keeps the stored number.
    #[serde(serialize_with = "as_hex_items")]
    pub items: Vec<ItemId>,
    /// How many items the stored entry names.
    pub item_count: u64,
    /// The grant concerned, if any.
    #[serde(serialize_with = "as_hex_grant")]
    pub grant: Option<GrantId>,
    /// `ok`, `refused: …`, `rejected: …`: a reason, never content.
    pub outcome: String,
    /// Hash of the previous entry (all zero for the first).
    #[serde(serialize_with = "as_hex")]
    pub prev_hash: [u8; 32],
    /// Hash of this entry as stored.
    #[serde(serialize_with = "as_hex")]
    pub hash: [u8; 32],
}

impl AuditEntry {
    /// The record this entry holds for `patient` (what [`entry_hash`]
    /// hashes with the seq, time and previous hash).
    pub fn record(&self, patient: Option<PatientId>) -> AuditRecord {
        AuditRecord {
            actor_kind: self.actor_kind,
            actor_id: self.actor_id.clone(),
            action: self.action,
            patient,
            items: self.items.clone(),
            grant: self.grant,
            outcome: self.outcome.clone(),
        }
    }
}

fn as_hex<S: serde::Serializer>(bytes: &[u8; 32], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(bytes))
}

fn as_hex_items<S: serde::Serializer>(items: &[ItemId], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_seq(items.iter().map(ToString::to_string))
}

fn as_hex_grant<S: serde::Serializer>(grant: &Option<GrantId>, s: S) -> std::result::Result<S::Ok, S::Error> {
    match grant {
        Some(g) => s.serialize_some(&hex::encode(g.0)),
        None => s.serialize_none(),
    }
}

fn as_display_opt<S: serde::Serializer>(patient: &Option<PatientId>, s: S) -> std::result::Result<S::Ok, S::Error> {
    match patient {
        Some(p) => s.serialize_some(&p.to_string()),
        None => s.serialize_none(),
    }
}

fn body_values(seq: u64, time: Timestamp, r: &AuditRecord, prev: &[u8; 32]) -> Vec<Value> {
    vec![
        Value::Integer(seq.into()),
        Value::Integer(time.into()),
        Value::Integer(r.actor_kind.tag().into()),
        Value::Text(r.actor_id.clone()),
        Value::Text(r.action.as_str().to_owned()),
        r.patient.map_or(Value::Null, |p| Value::Bytes(p.as_bytes().to_vec())),
        Value::Array(r.items.iter().map(|i| Value::Bytes(i.0.to_vec())).collect()),
        r.grant.map_or(Value::Null, |g| Value::Bytes(g.0.to_vec())),
        Value::Text(r.outcome.clone()),
        Value::Bytes(prev.to_vec()),
    ]
}

fn hash_body(body: &[Value]) -> [u8; 32] {
    let encoded = crate::cbor::encode(&Value::Array(body.to_vec()));
    let mut h = Sha256::new();
    h.update(AUDIT_TAG);
    h.update(&encoded);
    h.finalize().into()
}

/// The hash of entry `seq` holding `record` after `prev`: what the node
/// stores, and what a patient recomputes from the fields it received.
pub fn entry_hash(seq: u64, time: Timestamp, record: &AuditRecord, prev: &[u8; 32]) -> [u8; 32] {
    hash_body(&body_values(seq, time, record, prev))
}

/// Encodes entry `seq` and returns its bytes and hash.
pub(crate) fn seal(seq: u64, time: Timestamp, record: &AuditRecord, prev: &[u8; 32]) -> (Vec<u8>, [u8; 32]) {
    let mut values = body_values(seq, time, record, prev);
    let hash = hash_body(&values);
    values.push(Value::Bytes(hash.to_vec()));
    (crate::cbor::encode(&Value::Array(values)), hash)
}

struct Decoded {
    entry: AuditEntry,
    prev: [u8; 32],
    stored_hash: [u8; 32],
    computed_hash: [u8; 32],
}

fn decode(seq_key: u64, bytes: &[u8]) -> Option<Decoded> {
    let Value::Array(mut values) = ciborium::de::from_reader::<Value, _>(bytes).ok()? else {
        return None;
    };
    if values.len() != 11 {
        return None;
    }
    let stored_hash: [u8; 32] = match values.pop()? {
        Value::Bytes(b) => b.try_into().ok()?,
        _ => return None,
    };
    let computed_hash = hash_body(&values);
    let uint = |v: &Value| match v {
        Value::Integer(i) => u64::try_from(*i).ok(),
        _ => None,
    };
    let text = |v: &Value| match v {
        Value::Text(t) => Some(t.clone()),
        _ => None,
    };
    let seq = uint(&values[0])?;
    if seq != seq_key {
        return None;
    }
    let patient = match &values[5] {
        Value::Null => None,
        Value::Bytes(b) => Some(PatientId::from_bytes(b.as_slice().try_into().ok()?).ok()?),
        _ => return None,
    };
    let items = match &values[6] {
        Value::Array(a) => a
            .iter()
            .map(|v| match v {
                Value::Bytes(b) => Some(ItemId(b.as_slice().try_into().ok()?)),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()?,
        _ => return None,
    };
    let grant = match &values[7] {
        Value::Null => None,
        Value::Bytes(b) => Some(GrantId(b.as_slice().try_into().ok()?)),
        _ => return None,
    };
    let prev: [u8; 32] = match &values[9] {
        Value::Bytes(b) => b.as_slice().try_into().ok()?,
        _ => return None,
    };
    Some(Decoded {
        entry: AuditEntry {
            seq,
            time: uint(&values[1])?,
            actor_kind: ActorKind::from_tag(uint(&values[2])?)?,
            actor_id: text(&values[3])?,
            action: Action::from_str(&text(&values[4])?)?,
            patient,
            item_count: items.len() as u64,
            items,
            grant,
            outcome: text(&values[8])?,
            prev_hash: prev,
            hash: stored_hash,
        },
        prev,
        stored_hash,
        computed_hash,
    })
}

/// The stored hash of the last entry, to continue the chain at open; an
/// undecodable last entry chains on the hash of its raw bytes (and
/// [`verify_chain`] reports it).
pub(crate) fn head_hash(seq: u64, bytes: &[u8]) -> [u8; 32] {
    decode(seq, bytes).map_or_else(|| Sha256::digest(bytes).into(), |d| d.stored_hash)
}

/// Decodes entries for display.
///
/// # Errors
/// [`Error::Corrupt`] for an entry that does not decode.
pub(crate) fn decode_entries(raw: Vec<(u64, Vec<u8>)>) -> Result<Vec<AuditEntry>> {
    raw.into_iter()
        .map(|(seq, bytes)| {
            decode(seq, &bytes).map(|d| d.entry).ok_or_else(|| Error::Corrupt {
                what: "audit entry",
                key: seq.to_string(),
            })
        })
        .collect()
}

/// Where the chain breaks.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
#[error("audit chain broken at entry {seq}")]
pub struct BrokenAt {
    /// The first entry that does not decode, whose hash does not match its
    /// content, whose link does not match its predecessor, or that is
    /// missing from the sequence.
    pub seq: u64,
}

/// Checks every entry and link; returns the number of entries.
///
/// # Errors
/// [`BrokenAt`] naming the first bad entry.
pub fn verify_chain(raw: &[(u64, Vec<u8>)]) -> Result<u64, BrokenAt> {
    let mut prev = [0u8; 32];
    let mut expected_seq = 1u64;
    for (seq, bytes) in raw {
        if *seq != expected_seq {
            return Err(BrokenAt { seq: expected_seq });
        }
        let d = decode(*seq, bytes).ok_or(BrokenAt { seq: *seq })?;
        if d.computed_hash != d.stored_hash || d.prev != prev {
            return Err(BrokenAt { seq: *seq });
        }
        prev = d.stored_hash;
        expected_seq += 1;
    }
    Ok(expected_seq - 1)
}

/// The hash of entry `seq` as stored, if the entry decodes and its hash
/// matches its content.
fn verified_hash(seq: u64, bytes: &[u8]) -> Option<[u8; 32]> {
    decode(seq, bytes)
        .filter(|d| d.computed_hash == d.stored_hash)
        .map(|d| d.stored_hash)
}

/// How the log stands against the latest checkpoint kept.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Anchor {
    /// No checkpoint is kept (a store from before checkpoints, or one whose
    /// checkpoint was removed): nothing local tells a cut tail.
    Unanchored,
    /// The log reaches the checkpoint, and its entry there has the hash the
    /// checkpoint signed.
    Intact(AuditCheckpoint),
    /// The log ends at `entries`, before the checkpoint's seq.
    Truncated {
        /// Entries the log holds.
        entries: u64,
        /// The checkpoint kept.
        checkpoint: AuditCheckpoint,
    },
    /// The entry at the checkpoint's seq is not the one it signed.
    Rewritten(AuditCheckpoint),
}

/// What the checkpoint code needs of a store (the store implements it for
/// every [`crate::store::Store`]; this module does not know the store).
pub(crate) trait AuditLog {
    /// The seq and hash of the last entry.
    fn audit_head(&self) -> (u64, [u8; 32]);
    /// The stored bytes of entry `seq`.
    fn audit_entry(&self, seq: u64) -> Result<Option<Vec<u8>>>;
    /// The latest checkpoint kept.
    fn audit_checkpoint(&self) -> Result<Option<Vec<u8>>>;
    /// Keeps a checkpoint (replacing the one kept).
    fn put_audit_checkpoint(&self, signed: &[u8]) -> Result<()>;
}

/// Compares the log with the latest checkpoint kept.
///
/// # Errors
/// [`Error::Corrupt`] for a kept checkpoint that does not decode, does not
/// verify or names another node; store failures.
pub(crate) fn check_anchor(store: &(impl AuditLog + ?Sized), me: PracticeId) -> Result<Anchor> {
    let Some(bytes) = store.audit_checkpoint()? else {
        return Ok(Anchor::Unanchored);
    };
    let corrupt = || Error::Corrupt {
        what: "audit checkpoint",
        key: "audit-checkpoint/last".into(),
    };
    let checkpoint = AuditCheckpoint::decode(&bytes).map_err(|_| corrupt())?;
    let terms = *checkpoint.terms();
    if terms.node != me {
        return Err(corrupt());
    }
    let (entries, _) = store.audit_head();
    if entries < terms.seq {
        return Ok(Anchor::Truncated { entries, checkpoint });
    }
    let at = match terms.seq {
        0 => Some([0; 32]),
        seq => store.audit_entry(seq)?.and_then(|b| verified_hash(seq, &b)),
    };
    Ok(if at == Some(terms.head) {
        Anchor::Intact(checkpoint)
    } else {
        Anchor::Rewritten(checkpoint)
    })
}

/// Signs checkpoints of this node's log.
pub(crate) struct Checkpointer {
    identity: SecretIdentity,
    me: PracticeId,
    /// The seq of the latest checkpoint kept: the next is signed once the
    /// head moves past it.
    signed: u64,
}

impl Checkpointer {
    /// A signer for a log whose latest kept checkpoint is at `signed`.
    pub(crate) fn new(identity: &SecretIdentity, me: PracticeId, signed: u64) -> Self {
        Self {
            identity: SecretIdentity::from_seed(&identity.seed()),
            me,
            signed,
        }
    }

    /// Signs (seq, head) of this node's log now.
    ///
    /// # Errors
    /// Signing errors (none for a node's own key).
    pub(crate) fn sign(&self, seq: u64, head: [u8; 32]) -> Result<AuditCheckpoint> {
        Ok(AuditCheckpoint::sign(
            AuditCheckpointTerms {
                node: self.me,
                seq,
                head,
                time: medmesh_crypto::now(),
            },
            &self.identity,
        )?)
    }

    /// After a commit: if the head moved, signs it and keeps the checkpoint
    /// (the caller's flush makes it durable with the entries it covers).
    pub(crate) fn after_commit(&mut self, store: &(impl AuditLog + ?Sized)) {
        let (seq, head) = store.audit_head();
        if seq <= self.signed {
            return;
        }
        match self
            .sign(seq, head)
            .and_then(|cp| store.put_audit_checkpoint(cp.encoded()))
        {
            Ok(()) => self.signed = seq,
            Err(e) => tracing::error!(cause = %e, seq, "audit checkpoint not written"),
        }
    }
}

/// Signs a checkpoint of entry `seq` as the log holds it now (`None` when
/// the log no longer holds it, or it does not verify): what a patient asks
/// to compare with the checkpoint it kept.
///
/// # Errors
/// Store failures.
pub(crate) fn checkpoint_at(
    store: &(impl AuditLog + ?Sized),
    signer: &Checkpointer,
    seq: u64,
) -> Result<Option<AuditCheckpoint>> {
    let head = match seq {
        0 => Some([0; 32]),
        seq => store.audit_entry(seq)?.and_then(|b| verified_hash(seq, &b)),
    };
    head.map(|head| signer.sign(seq, head)).transpose()
}
