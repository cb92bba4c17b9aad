//! The digests of the reconciling requests: [`summary_digest`] of a set of
//! envelope ids (`Summary`) and [`patient_digest`] of all a node holds of a
//! patient (`Digests`, anti-entropy).

use medmesh_crypto::{Collection, EnvelopeId};
use medmesh_node::item::ItemId;

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

/// The digest of one patient in a [`Request::Digests`](super::Request::Digests): SHA-256 of
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
