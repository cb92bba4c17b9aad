//! Local snapshots of a collection's document (DESIGN §6 "Storage notes"):
//! what the record layer saved, which envelopes it covers, sealed under the
//! current epoch key with [`medmesh_crypto::SealedSnapshot`].
//!
//! Plaintext payload (inside the AEAD): `medmesh/snapshot-payload/v1` ‖
//! covered count (u32, BE) ‖ per covered change, sorted by envelope id:
//! envelope id (32) ‖ Automerge change hash (32) ‖ the document bytes
//! (`RecordDoc::save`). See `docs/records.md`.

use medmesh_crypto::EnvelopeId;
use zeroize::Zeroizing;

const PAYLOAD_TAG: &[u8] = b"medmesh/snapshot-payload/v1";

/// One change a snapshot holds: its envelope and its Automerge hash.
pub type Covered = (EnvelopeId, [u8; 32]);

/// An opened snapshot: the document and the envelopes whose changes it holds.
pub struct Snapshot {
    /// Every change in `doc` with its envelope (sorted by envelope id).
    pub covered: Vec<Covered>,
    /// The saved document (plaintext; lives in memory only).
    pub doc: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print content: only sizes.
        f.debug_struct("Snapshot")
            .field("covered", &self.covered.len())
            .field("doc_bytes", &self.doc.len())
            .finish()
    }
}

/// The plaintext payload of a snapshot.
pub(crate) fn encode(covered: &[Covered], doc: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut ids: Vec<Covered> = covered.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let mut out = Zeroizing::new(Vec::with_capacity(PAYLOAD_TAG.len() + 4 + 64 * ids.len() + doc.len()));
    out.extend_from_slice(PAYLOAD_TAG);
    out.extend_from_slice(&u32::try_from(ids.len()).unwrap_or(u32::MAX).to_be_bytes());
    for (id, hash) in &ids {
        out.extend_from_slice(&id.0);
        out.extend_from_slice(hash);
    }
    out.extend_from_slice(doc);
    out
}

/// Parses a payload; `None` if it is not one.
pub(crate) fn decode(payload: &[u8]) -> Option<Snapshot> {
    let rest = payload.strip_prefix(PAYLOAD_TAG)?;
    let (count, rest) = rest.split_first_chunk::<4>()?;
    let count = usize::try_from(u32::from_be_bytes(*count)).ok()?;
    let ids_len = count.checked_mul(64)?;
    if rest.len() < ids_len {
        return None;
    }
    let (ids, doc) = rest.split_at(ids_len);
    let covered: Vec<Covered> = ids
        .chunks_exact(64)
        .filter_map(|c| {
            let (id, hash) = c.split_first_chunk::<32>()?;
            Some((EnvelopeId(*id), <[u8; 32]>::try_from(hash).ok()?))
        })
        .collect();
    Some(Snapshot {
        covered,
        doc: Zeroizing::new(doc.to_vec()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let ids = [(EnvelopeId([2; 32]), [5; 32]), (EnvelopeId([1; 32]), [6; 32])];
        let payload = encode(&ids, b"doc bytes");
        let s = decode(&payload).unwrap();
        assert_eq!(
            s.covered,
            vec![(EnvelopeId([1; 32]), [6; 32]), (EnvelopeId([2; 32]), [5; 32])]
        );
        assert_eq!(s.doc.as_slice(), b"doc bytes");
        for cut in 0..PAYLOAD_TAG.len() + 4 + 128 {
            assert!(decode(&payload[..cut]).is_none(), "cut {cut}");
        }
    }
}
