//! One [`Op`] of a batch inside the sled transaction that commits it: the
//! trees it writes and the heads (seq, audit chain) it advances.

use sled::transaction::{ConflictableTransactionError, TransactionalTree};

use super::codec::{self, seq_key};
use super::{Committed, Heads, ItemKind, Op, Rejection};
use crate::{Error, audit};

type Tx<'a> = &'a TransactionalTree;
type Abortable<T> = std::result::Result<T, ConflictableTransactionError<Error>>;

fn abort<T>(e: Error) -> Abortable<T> {
    Err(ConflictableTransactionError::Abort(e))
}

pub(super) struct Trees<'a> {
    pub(super) items: Tx<'a>,
    pub(super) seqlog: Tx<'a>,
    pub(super) consent: Tx<'a>,
    pub(super) envelopes: Tx<'a>,
    pub(super) pending: Tx<'a>,
    pub(super) rejected: Tx<'a>,
    pub(super) cursors: Tx<'a>,
    pub(super) audit: Tx<'a>,
}

pub(super) fn apply_op(t: &Trees<'_>, op: &Op, heads: &mut Heads, out: &mut Committed, time: u64) -> Abortable<()> {
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
