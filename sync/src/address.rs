//! Signed address records (issue 16): where a practice says it listens,
//! signed by its own key — libp2p's `PeerRecord` in a signed envelope,
//! which identify carries on every connection. Nodes keep the newest of the
//! practices they deal with and hand them to patients; a record relayed by
//! anyone stands on its signature alone.

use libp2p::core::{PeerRecord, SignedEnvelope};
use libp2p::{Multiaddr, PeerId};

/// A verified signed address record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressRecord {
    /// The practice whose key signed it.
    pub peer: PeerId,
    /// Its sequence number (seconds since the Unix epoch when signed): the
    /// newest wins.
    pub seq: u64,
    /// Where it said it listens.
    pub addrs: Vec<Multiaddr>,
    /// The signed envelope (protobuf bytes), to keep and relay as it is.
    pub signed: Vec<u8>,
}

impl AddressRecord {
    /// The record in `bytes` if its signature verifies (by the key of the
    /// peer it names) and it is no larger than
    /// [`crate::wire::MAX_ADDRESS_RECORD_BYTES`].
    pub fn verify(bytes: &[u8]) -> Option<Self> {
        if bytes.len() > crate::wire::MAX_ADDRESS_RECORD_BYTES {
            return None;
        }
        let envelope = SignedEnvelope::from_protobuf_encoding(bytes).ok()?;
        Self::of_envelope(envelope)
    }

    /// The record in a signed envelope (as identify hands it over) if its
    /// signature verifies.
    pub(crate) fn of_envelope(envelope: SignedEnvelope) -> Option<Self> {
        let record = PeerRecord::from_signed_envelope(envelope).ok()?;
        let signed = record.to_signed_envelope().into_protobuf_encoding();
        (signed.len() <= crate::wire::MAX_ADDRESS_RECORD_BYTES).then(|| Self {
            peer: record.peer_id(),
            seq: record.seq(),
            addrs: record.addresses().to_vec(),
            signed,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_record_verifies_as_its_signer_and_a_flipped_bit_does_not() {
        let key = libp2p::identity::Keypair::generate_ed25519();
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().unwrap();
        let record = PeerRecord::new(&key, vec![addr.clone()]).unwrap();
        let bytes = record.into_signed_envelope().into_protobuf_encoding();
        let verified = AddressRecord::verify(&bytes).unwrap();
        assert_eq!(verified.peer, key.public().to_peer_id());
        assert_eq!(verified.addrs, vec![addr]);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert!(
                AddressRecord::verify(&bad).is_none_or(|r| r == verified),
                "byte {i} flipped still verifies as another record"
            );
        }
    }
}
