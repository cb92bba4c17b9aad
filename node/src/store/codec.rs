//! Engine-neutral byte layouts of keys and values (CBOR arrays for values),
//! shared by every [`super::Store`] implementation.

use ciborium::Value;
use medmesh_crypto::{ActorId, Collection, EnvelopeId, GrantId, KeyId, PatientId, PracticeId, Principal};

use super::{
    Cursor, EnvelopeEntry, EnvelopeState, InstanceId, ItemId, ItemKind, ItemMeta, KeptAddressRecord, OutboxEntry,
    PendingItem, PendingReason, Rejection, Seq, SyncCheck,
};
use crate::{Error, Result};

pub(crate) fn collection_tag(c: Collection) -> u8 {
    Collection::ALL
        .iter()
        .position(|x| *x == c)
        .map_or(u8::MAX, |i| i as u8)
}

pub(crate) fn collection_from_tag(tag: u8) -> Option<Collection> {
    Collection::ALL.get(usize::from(tag)).copied()
}

fn corrupt(what: &'static str, key: &[u8]) -> Error {
    Error::Corrupt {
        what,
        key: hex::encode(key),
    }
}

pub(crate) use crate::cbor::encode;

pub(crate) fn decode(bytes: &[u8]) -> Option<Vec<Value>> {
    match ciborium::de::from_reader::<Value, _>(bytes).ok()? {
        Value::Array(a) => Some(a),
        _ => None,
    }
}

fn bytes(b: &[u8]) -> Value {
    Value::Bytes(b.to_vec())
}

pub(crate) fn uint(v: u64) -> Value {
    Value::Integer(v.into())
}

pub(crate) fn get_uint(v: &Value) -> Option<u64> {
    match v {
        Value::Integer(i) => u64::try_from(*i).ok(),
        _ => None,
    }
}

fn get_bytes<const N: usize>(v: &Value) -> Option<[u8; N]> {
    match v {
        Value::Bytes(b) => b.as_slice().try_into().ok(),
        _ => None,
    }
}

fn get_opt_bytes<const N: usize>(v: &Value) -> Option<Option<[u8; N]>> {
    match v {
        Value::Null => Some(None),
        other => get_bytes(other).map(Some),
    }
}

fn principal_value(p: &Option<Principal>) -> Value {
    match p {
        None => Value::Null,
        Some(Principal::Patient(x)) => Value::Array(vec![uint(0), bytes(x.as_bytes())]),
        Some(Principal::Practice(x)) => Value::Array(vec![uint(1), bytes(x.as_bytes())]),
    }
}

fn principal_from(v: &Value) -> Option<Option<Principal>> {
    match v {
        Value::Null => Some(None),
        Value::Array(a) if a.len() == 2 => {
            let key = get_bytes::<32>(&a[1])?;
            match get_uint(&a[0])? {
                0 => PatientId::from_bytes(key).ok().map(|p| Some(Principal::Patient(p))),
                1 => PracticeId::from_bytes(key).ok().map(|p| Some(Principal::Practice(p))),
                _ => None,
            }
        }
        _ => None,
    }
}

pub(crate) fn seq_key(seq: Seq) -> [u8; 8] {
    seq.to_be_bytes()
}

pub(crate) fn seq_from_key(key: &[u8]) -> Result<Seq> {
    let b: [u8; 8] = key.try_into().map_err(|_| corrupt("sequence key", key))?;
    Ok(u64::from_be_bytes(b))
}

/// items value: kind code ‖ seq (8, BE) ‖ wire bytes.
pub(crate) fn item_value(kind: ItemKind, seq: Seq, wire: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + wire.len());
    v.push(kind.code());
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(wire);
    v
}

pub(crate) fn split_item_value<'a>(id: &ItemId, v: &'a [u8]) -> Result<(ItemKind, Seq, &'a [u8])> {
    if v.len() < 9 {
        return Err(corrupt("item", &id.0));
    }
    let kind = ItemKind::from_code(v[0].into()).ok_or_else(|| corrupt("item", &id.0))?;
    let seq = seq_from_key(&v[1..9])?;
    Ok((kind, seq, &v[9..]))
}

/// `consent` tree value: `0x02` ‖ metadata length (u32 BE) ‖ metadata ‖ wire
/// bytes, so the registry is rebuilt from one sequential scan. (Layout 1
/// stored only the 32-byte item id; both are read.)
pub(crate) fn consent_value(m: &ItemMeta, wire: &[u8]) -> Vec<u8> {
    let meta = meta_value(m);
    let mut v = Vec::with_capacity(5 + meta.len() + wire.len());
    v.push(2);
    v.extend_from_slice(&u32::try_from(meta.len()).unwrap_or(u32::MAX).to_be_bytes());
    v.extend_from_slice(&meta);
    v.extend_from_slice(wire);
    v
}

/// Splits a layout-2 `consent` value into (metadata, wire bytes).
pub(crate) fn split_consent_value<'a>(key: &[u8], v: &'a [u8]) -> Result<(ItemMeta, &'a [u8])> {
    let parts = || -> Option<(&'a [u8], &'a [u8])> {
        let (tag, rest) = v.split_first()?;
        if *tag != 2 {
            return None;
        }
        let (len, rest) = rest.split_first_chunk::<4>()?;
        let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
        (rest.len() >= len).then(|| rest.split_at(len))
    };
    let (meta, wire) = parts().ok_or_else(|| corrupt("consent index", key))?;
    Ok((meta_from(key, meta)?, wire))
}

pub(crate) fn meta_value(m: &ItemMeta) -> Vec<u8> {
    encode(&Value::Array(vec![
        uint(m.kind.code().into()),
        bytes(&m.id.0),
        bytes(m.patient.as_bytes()),
        m.collection.map_or(Value::Null, |c| uint(collection_tag(c).into())),
        m.grant.map_or(Value::Null, |g| bytes(&g.0)),
        principal_value(&m.principal),
    ]))
}

pub(crate) fn meta_from(key: &[u8], v: &[u8]) -> Result<ItemMeta> {
    let parse = || -> Option<ItemMeta> {
        let a = decode(v)?;
        if a.len() != 6 {
            return None;
        }
        let kind = ItemKind::from_code(get_uint(&a[0])?)?;
        let collection = match &a[3] {
            Value::Null => None,
            other => Some(collection_from_tag(u8::try_from(get_uint(other)?).ok()?)?),
        };
        Some(ItemMeta {
            kind,
            id: ItemId(get_bytes(&a[1])?),
            patient: PatientId::from_bytes(get_bytes(&a[2])?).ok()?,
            collection,
            grant: get_opt_bytes(&a[4])?.map(GrantId),
            principal: principal_from(&a[5])?,
        })
    };
    parse().ok_or_else(|| corrupt("item metadata", key))
}

/// envelopes key: patient (32) ‖ collection tag (1) ‖ envelope id (32).
pub(crate) fn envelope_key(patient: &PatientId, collection: Collection, id: &EnvelopeId) -> Vec<u8> {
    let mut k = Vec::with_capacity(65);
    k.extend_from_slice(patient.as_bytes());
    k.push(collection_tag(collection));
    k.extend_from_slice(&id.0);
    k
}

pub(crate) fn envelope_prefix(patient: &PatientId, collection: Option<Collection>) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.extend_from_slice(patient.as_bytes());
    if let Some(c) = collection {
        k.push(collection_tag(c));
    }
    k
}

pub(crate) fn envelope_value(e: &EnvelopeEntry) -> Vec<u8> {
    encode(&Value::Array(vec![
        uint(match e.state {
            EnvelopeState::Opaque => 0,
            EnvelopeState::Readable => 1,
        }),
        uint(e.epoch),
        bytes(&e.key_id.0),
        e.grant.map_or(Value::Null, |g| bytes(&g.0)),
        bytes(&e.actor.0),
        uint(e.change_seq),
        uint(e.created_at),
        uint(e.seq),
    ]))
}

pub(crate) fn envelope_from(key: &[u8], v: &[u8]) -> Result<EnvelopeEntry> {
    let parse = || -> Option<EnvelopeEntry> {
        if key.len() != 65 {
            return None;
        }
        let patient = PatientId::from_bytes(key[..32].try_into().ok()?).ok()?;
        let collection = collection_from_tag(key[32])?;
        let id = EnvelopeId(key[33..].try_into().ok()?);
        let a = decode(v)?;
        if a.len() != 8 {
            return None;
        }
        Some(EnvelopeEntry {
            id,
            patient,
            collection,
            state: match get_uint(&a[0])? {
                0 => EnvelopeState::Opaque,
                1 => EnvelopeState::Readable,
                _ => return None,
            },
            epoch: get_uint(&a[1])?,
            key_id: KeyId(get_bytes(&a[2])?),
            grant: get_opt_bytes(&a[3])?.map(GrantId),
            actor: ActorId(get_bytes(&a[4])?),
            change_seq: get_uint(&a[5])?,
            created_at: get_uint(&a[6])?,
            seq: get_uint(&a[7])?,
        })
    };
    parse().ok_or_else(|| corrupt("envelope index entry", key))
}

/// Length of a pending key: reason tag (1) ‖ patient or zeros (32) ‖ grant
/// id or zeros (16) ‖ SHA-256 of the bytes (32).
pub(crate) const PENDING_KEY_LEN: usize = 81;
/// Length of a pending key of layout 1 (no patient), migrated at open.
pub(crate) const PENDING_KEY_LEN_V1: usize = 49;
/// Length of a seq-gap pending key: tag 2 ‖ patient (32) ‖ actor (24) ‖
/// collection tag (1) ‖ seq (8, BE) ‖ SHA-256 of the bytes (32), so the gaps
/// of one author's actors for one patient share a prefix ([`seq_gap_prefix`]).
const SEQ_GAP_KEY_LEN: usize = 1 + 32 + 24 + 1 + 8 + 32;

/// pending key prefix: reason tag (1) ‖ patient or zeros (32) ‖ grant id or
/// zeros (16); for a seq gap, all of its key but the hash.
pub(crate) fn pending_prefix(reason: PendingReason) -> Vec<u8> {
    let mut k = Vec::with_capacity(SEQ_GAP_KEY_LEN);
    match reason {
        PendingReason::MissingGrant(patient, g) => {
            k.push(0);
            k.extend_from_slice(patient.as_bytes());
            k.extend_from_slice(&g.0);
        }
        PendingReason::UnsupportedVersion => {
            k.push(1);
            k.extend_from_slice(&[0; 48]);
        }
        PendingReason::SeqGap {
            patient,
            actor,
            collection,
            seq,
        } => {
            k.push(2);
            k.extend_from_slice(patient.as_bytes());
            k.extend_from_slice(&actor.0);
            k.push(collection_tag(collection));
            k.extend_from_slice(&seq.to_be_bytes());
        }
    }
    k
}

/// The layout-2 key of a layout-1 pending entry (grant ids were not bound to
/// their patient): the patient comes from the waiting envelope's header,
/// parsed without verifying (it is verified when judged). `None` when the
/// entry is not a layout-1 one or its envelope does not parse.
pub(crate) fn pending_key_from_v1(key: &[u8], v: &[u8]) -> Option<Vec<u8>> {
    if key.len() != PENDING_KEY_LEN_V1 {
        return None;
    }
    let hash: [u8; 32] = key[17..].try_into().ok()?;
    let reason = match key[0] {
        0 => {
            let header = medmesh_crypto::CompactHeader::of_stored_envelope(v.get(1..)?).ok()?;
            PendingReason::MissingGrant(header.header().patient, GrantId(key[1..17].try_into().ok()?))
        }
        1 => PendingReason::UnsupportedVersion,
        _ => return None,
    };
    Some(pending_key(reason, &hash))
}

/// The pending keys of every seq gap of `patient` for the actors of one
/// author (the first 16 bytes of its actor ids).
pub(crate) fn seq_gap_prefix(patient: &PatientId, author: &[u8; 16]) -> Vec<u8> {
    let mut k = Vec::with_capacity(49);
    k.push(2);
    k.extend_from_slice(patient.as_bytes());
    k.extend_from_slice(author);
    k
}

pub(crate) fn pending_key(reason: PendingReason, hash: &[u8; 32]) -> Vec<u8> {
    let mut k = pending_prefix(reason);
    k.extend_from_slice(hash);
    k
}

/// pending value: kind code ‖ bytes as received.
pub(crate) fn pending_value(p: &PendingItem) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + p.bytes.len());
    v.push(p.kind.code());
    v.extend_from_slice(&p.bytes);
    v
}

pub(crate) fn pending_from(key: &[u8], v: &[u8]) -> Result<PendingItem> {
    let parse = || -> Option<PendingItem> {
        let expected = if key.first() == Some(&2) {
            SEQ_GAP_KEY_LEN
        } else {
            PENDING_KEY_LEN
        };
        if key.len() != expected || v.is_empty() {
            return None;
        }
        let reason = match key[0] {
            0 => PendingReason::MissingGrant(
                PatientId::from_bytes(key[1..33].try_into().ok()?).ok()?,
                GrantId(key[33..49].try_into().ok()?),
            ),
            1 => PendingReason::UnsupportedVersion,
            2 => PendingReason::SeqGap {
                patient: PatientId::from_bytes(key[1..33].try_into().ok()?).ok()?,
                actor: ActorId(key[33..57].try_into().ok()?),
                collection: collection_from_tag(key[57])?,
                seq: u64::from_be_bytes(key[58..66].try_into().ok()?),
            },
            _ => return None,
        };
        Some(PendingItem {
            reason,
            hash: key[key.len() - 32..].try_into().ok()?,
            kind: ItemKind::from_code(v[0].into())?,
            bytes: v[1..].to_vec(),
        })
    };
    parse().ok_or_else(|| corrupt("pending item", key))
}

pub(crate) fn rejection_value(r: &Rejection) -> Vec<u8> {
    encode(&Value::Array(vec![uint(r.time), Value::Text(r.reason.clone())]))
}

pub(crate) fn rejection_from(key: &[u8], v: &[u8]) -> Result<Rejection> {
    let parse = || -> Option<Rejection> {
        let a = decode(v)?;
        match a.as_slice() {
            [t, Value::Text(reason)] => Some(Rejection {
                time: get_uint(t)?,
                reason: reason.clone(),
            }),
            _ => None,
        }
    };
    parse().ok_or_else(|| corrupt("rejection", key))
}

pub(crate) fn cursor_value(c: &Cursor) -> Vec<u8> {
    let mut v = Vec::with_capacity(24);
    v.extend_from_slice(&c.instance.0);
    v.extend_from_slice(&c.seq.to_be_bytes());
    v
}

pub(crate) fn cursor_from(key: &[u8], v: &[u8]) -> Result<Cursor> {
    if v.len() != 24 {
        return Err(corrupt("cursor", key));
    }
    let mut instance = [0u8; 16];
    instance.copy_from_slice(&v[..16]);
    Ok(Cursor {
        instance: InstanceId(instance),
        seq: seq_from_key(&v[16..])?,
    })
}

/// Outbox key: peer length (1) ‖ peer (PeerId bytes) ‖ item id (32), so a
/// peer's entries share a prefix.
pub(crate) fn outbox_key(peer: &[u8], item: &ItemId) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + peer.len() + 32);
    k.push(u8::try_from(peer.len()).unwrap_or(u8::MAX));
    k.extend_from_slice(peer);
    k.extend_from_slice(&item.0);
    k
}

/// Outbox value: patient (32) ‖ since (8, BE) ‖ attempts (4, BE) ‖
/// next_at (8, BE) ‖ error length (2, BE) ‖ last error (UTF-8) ‖ the
/// peer's addresses (UTF-8 multiaddrs, one per line).
pub(crate) fn outbox_value(e: &OutboxEntry) -> Vec<u8> {
    let error = &e.last_error.as_bytes()[..e.last_error.len().min(usize::from(u16::MAX))];
    let addrs = e.addrs.join("\n");
    let mut v = Vec::with_capacity(54 + error.len() + addrs.len());
    v.extend_from_slice(e.patient.as_bytes());
    v.extend_from_slice(&e.since.to_be_bytes());
    v.extend_from_slice(&e.attempts.to_be_bytes());
    v.extend_from_slice(&e.next_at.to_be_bytes());
    v.extend_from_slice(&u16::try_from(error.len()).unwrap_or(u16::MAX).to_be_bytes());
    v.extend_from_slice(error);
    v.extend_from_slice(addrs.as_bytes());
    v
}

pub(crate) fn outbox_entry(key: &[u8], v: &[u8]) -> Result<OutboxEntry> {
    let parse = || -> Option<OutboxEntry> {
        let (&len, rest) = key.split_first()?;
        let len = usize::from(len);
        if rest.len() != len + 32 || v.len() < 54 {
            return None;
        }
        let patient = PatientId::from_bytes(v[..32].try_into().ok()?).ok()?;
        let error_len = usize::from(u16::from_be_bytes(v[52..54].try_into().ok()?));
        let error = v.get(54..54 + error_len)?;
        let addrs = std::str::from_utf8(v.get(54 + error_len..)?).ok()?;
        Some(OutboxEntry {
            peer: rest[..len].to_vec(),
            item: ItemId(rest[len..].try_into().ok()?),
            patient,
            since: u64::from_be_bytes(v[32..40].try_into().ok()?),
            attempts: u32::from_be_bytes(v[40..44].try_into().ok()?),
            next_at: u64::from_be_bytes(v[44..52].try_into().ok()?),
            last_error: String::from_utf8_lossy(error).into_owned(),
            addrs: addrs.split('\n').filter(|a| !a.is_empty()).map(str::to_owned).collect(),
        })
    };
    parse().ok_or_else(|| corrupt("outbox entry", key))
}

/// Sync-check key: patient (32) ‖ collection tag (1) ‖ peer (PeerId bytes),
/// so a patient's checks share a prefix.
pub(crate) fn sync_check_key(patient: &PatientId, collection: Collection, peer: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(33 + peer.len());
    k.extend_from_slice(patient.as_bytes());
    k.push(collection_tag(collection));
    k.extend_from_slice(peer);
    k
}

/// Sync-check value: at (8, BE) ‖ listed (8, BE) ‖ missing (8, BE) ‖ the
/// remembered missing ids (32 each).
pub(crate) fn sync_check_value(c: &SyncCheck) -> Vec<u8> {
    let ids = &c.missing_ids[..c.missing_ids.len().min(SyncCheck::REMEMBERED)];
    let mut v = Vec::with_capacity(24 + 32 * ids.len());
    v.extend_from_slice(&c.at.to_be_bytes());
    v.extend_from_slice(&c.listed.to_be_bytes());
    v.extend_from_slice(&c.missing.to_be_bytes());
    for id in ids {
        v.extend_from_slice(&id.0);
    }
    v
}

pub(crate) fn sync_check(key: &[u8], v: &[u8]) -> Result<SyncCheck> {
    let parse = || -> Option<SyncCheck> {
        if key.len() < 34 || v.len() < 24 || !(v.len() - 24).is_multiple_of(32) {
            return None;
        }
        Some(SyncCheck {
            patient: PatientId::from_bytes(key[..32].try_into().ok()?).ok()?,
            collection: collection_from_tag(key[32])?,
            peer: key[33..].to_vec(),
            at: u64::from_be_bytes(v[..8].try_into().ok()?),
            listed: u64::from_be_bytes(v[8..16].try_into().ok()?),
            missing: u64::from_be_bytes(v[16..24].try_into().ok()?),
            missing_ids: v[24..]
                .chunks_exact(32)
                .map(|c| c.try_into().ok().map(EnvelopeId))
                .collect::<Option<Vec<_>>>()?,
        })
    };
    parse().ok_or_else(|| corrupt("sync check", key))
}

/// Address-record value: seq (8, BE) ‖ the signed record as received; the
/// key is the peer's PeerId bytes.
pub(crate) fn address_record_value(seq: u64, signed: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + signed.len());
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(signed);
    v
}

pub(crate) fn address_record(key: &[u8], v: &[u8]) -> Result<KeptAddressRecord> {
    let (seq, signed) = v
        .split_first_chunk::<8>()
        .ok_or_else(|| corrupt("address record", key))?;
    Ok(KeptAddressRecord {
        peer: key.to_vec(),
        seq: u64::from_be_bytes(*seq),
        signed: signed.to_vec(),
    })
}

/// Layouts 1 and 2 numbered item kinds 1 envelope, 2 grant, 3 revocation,
/// 4 key share; layout 3 writes [`ItemKind::code`], the wire's numbering.
fn kind_code_from_v2(tag: u64) -> Option<u8> {
    let kind = match tag {
        1 => ItemKind::Envelope,
        2 => ItemKind::Grant,
        3 => ItemKind::Revocation,
        4 => ItemKind::KeyShare,
        _ => return None,
    };
    Some(kind.code())
}

/// A layout-2 value of `tree` with its item kind renumbered for layout 3;
/// `None` leaves the value as it is (it does not parse as layout 2, and
/// reading it reports it).
pub(crate) fn kind_renumbered_from_v2(tree: &str, v: &[u8]) -> Option<Vec<u8>> {
    let first_byte = |v: &[u8]| -> Option<Vec<u8>> {
        let (tag, rest) = v.split_first()?;
        let mut out = vec![kind_code_from_v2((*tag).into())?];
        out.extend_from_slice(rest);
        Some(out)
    };
    let meta = |v: &[u8]| -> Option<Vec<u8>> {
        let mut a = decode(v)?;
        let code = kind_code_from_v2(get_uint(a.first()?)?)?;
        a[0] = uint(code.into());
        Some(encode(&Value::Array(a)))
    };
    match tree {
        "items" | "pending" => first_byte(v),
        "seqlog" => meta(v),
        "consent" => {
            let (tag, rest) = v.split_first()?;
            let (len, rest) = rest.split_first_chunk::<4>()?;
            let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
            if *tag != 2 || rest.len() < len {
                return None;
            }
            let (m, wire) = rest.split_at(len);
            let m = meta(m)?;
            let mut out = Vec::with_capacity(5 + m.len() + wire.len());
            out.push(2);
            out.extend_from_slice(&u32::try_from(m.len()).ok()?.to_be_bytes());
            out.extend_from_slice(&m);
            out.extend_from_slice(wire);
            Some(out)
        }
        _ => None,
    }
}
