//! Sealed snapshots: a collection's compressed Automerge document (plus
//! whatever the node keeps beside it) encrypted like an envelope, with
//! XChaCha20-Poly1305 under the collection's epoch key, so a node can keep
//! it at rest without holding plaintext (DESIGN §4, §6).
//!
//! Layout: `medmesh/snapshot/v1` (19 bytes) ‖ key id (16) ‖ nonce (24) ‖
//! ciphertext+tag. The associated data is those first 59 bytes followed by
//! the canonical CBOR `[patient key, collection, epoch]` of the key, so a
//! snapshot cannot be passed off as another patient's or collection's.
//! Snapshots are not signed: they are local caches, authenticated by the
//! epoch key only.

use chacha20poly1305::aead::{Aead as _, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use ciborium::Value;
use zeroize::Zeroizing;

use crate::canon;
use crate::keys::{EpochKey, KeyId};
use crate::{Error, Result};

/// Domain tag that starts every sealed snapshot (and its associated data).
pub const SNAPSHOT_TAG: &[u8] = b"medmesh/snapshot/v1";
/// Largest sealed snapshot accepted.
pub const MAX_SNAPSHOT_BYTES: usize = 1 << 30;
const HEADER_LEN: usize = SNAPSHOT_TAG.len() + 16 + 24;
const AEAD_TAG_LEN: usize = 16;

/// Seals and opens snapshots under an epoch key.
pub struct SealedSnapshot;

impl SealedSnapshot {
    /// Encrypts `plain` under `key` (random nonce).
    ///
    /// # Errors
    /// [`Error::TooLarge`], [`Error::Random`].
    pub fn seal(key: &EpochKey, plain: &[u8]) -> Result<Vec<u8>> {
        if plain.len() + HEADER_LEN + AEAD_TAG_LEN > MAX_SNAPSHOT_BYTES {
            return Err(Error::TooLarge {
                kind: "snapshot",
                len: plain.len(),
                max: MAX_SNAPSHOT_BYTES,
            });
        }
        let mut nonce = [0u8; 24];
        getrandom::fill(&mut nonce).map_err(|_| Error::Random)?;
        let mut out = Vec::with_capacity(HEADER_LEN + plain.len() + AEAD_TAG_LEN);
        out.extend_from_slice(SNAPSHOT_TAG);
        out.extend_from_slice(&key.key_id.0);
        out.extend_from_slice(&nonce);
        let aad = aad(key, &out);
        let ciphertext = XChaCha20Poly1305::new(key.secret().into())
            .encrypt(&XNonce::from(nonce), Payload { msg: plain, aad: &aad })
            .map_err(|_| Error::TooLarge {
                kind: "snapshot",
                len: plain.len(),
                max: MAX_SNAPSHOT_BYTES,
            })?;
        out.extend_from_slice(&ciphertext);
        Ok(out)
    }

    /// The id of the key a sealed snapshot claims to be sealed under (not
    /// authenticated until [`SealedSnapshot::open`]).
    ///
    /// # Errors
    /// [`Error::Malformed`].
    pub fn key_id(sealed: &[u8]) -> Result<KeyId> {
        let header = header(sealed)?;
        let mut id = [0u8; 16];
        id.copy_from_slice(&header[SNAPSHOT_TAG.len()..SNAPSHOT_TAG.len() + 16]);
        Ok(KeyId(id))
    }

    /// Decrypts a sealed snapshot with `key`.
    ///
    /// # Errors
    /// [`Error::Malformed`] when the bytes are not a sealed snapshot,
    /// [`Error::SnapshotOpen`] for another key, patient or collection, or
    /// altered bytes.
    pub fn open(key: &EpochKey, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let header = header(sealed)?;
        if Self::key_id(sealed)? != key.key_id {
            return Err(Error::SnapshotOpen {
                reason: "sealed under another key",
            });
        }
        let mut nonce = [0u8; 24];
        nonce.copy_from_slice(&header[SNAPSHOT_TAG.len() + 16..HEADER_LEN]);
        let aad = aad(key, header);
        let plain = XChaCha20Poly1305::new(key.secret().into())
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: &sealed[HEADER_LEN..],
                    aad: &aad,
                },
            )
            .map_err(|_| Error::SnapshotOpen {
                reason: "authentication failed",
            })?;
        Ok(Zeroizing::new(plain))
    }
}

fn header(sealed: &[u8]) -> Result<&[u8]> {
    let malformed = |reason| Error::Malformed {
        kind: "snapshot",
        reason,
    };
    if sealed.len() > MAX_SNAPSHOT_BYTES {
        return Err(Error::TooLarge {
            kind: "snapshot",
            len: sealed.len(),
            max: MAX_SNAPSHOT_BYTES,
        });
    }
    if !sealed.starts_with(SNAPSHOT_TAG) {
        return Err(malformed("not a medmesh sealed snapshot"));
    }
    if sealed.len() < HEADER_LEN + AEAD_TAG_LEN {
        return Err(malformed("too short"));
    }
    Ok(&sealed[..HEADER_LEN])
}

/// Header bytes ‖ canonical CBOR `[patient key, collection, epoch]`.
fn aad(key: &EpochKey, header: &[u8]) -> Vec<u8> {
    let context = Value::Array(vec![
        canon::bytes(key.patient.as_bytes()),
        canon::text(key.collection.as_str()),
        canon::uint(key.epoch),
    ]);
    canon::tagged(header, &canon::encode(&context))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Collection, SecretIdentity};

    fn key(collection: Collection) -> EpochKey {
        let patient = SecretIdentity::from_seed(&[3; 32]).patient_id();
        EpochKey::generate(patient, collection, 0).unwrap()
    }

    #[test]
    fn round_trip_and_every_flipped_bit_fails() {
        let k = key(Collection::Labs);
        let sealed = SealedSnapshot::seal(&k, b"a compressed automerge document").unwrap();
        assert_eq!(SealedSnapshot::key_id(&sealed).unwrap(), k.key_id);
        assert_eq!(
            SealedSnapshot::open(&k, &sealed).unwrap().as_slice(),
            b"a compressed automerge document"
        );
        for i in 0..sealed.len() * 8 {
            let mut b = sealed.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(SealedSnapshot::open(&k, &b).is_err(), "bit {i}");
        }
        assert!(SealedSnapshot::open(&k, &sealed[..sealed.len() - 1]).is_err());
        assert!(SealedSnapshot::open(&k, &sealed[..20]).is_err());
    }

    #[test]
    fn another_key_or_collection_does_not_open() {
        let k = key(Collection::Labs);
        let sealed = SealedSnapshot::seal(&k, b"doc").unwrap();
        let other = key(Collection::Labs);
        assert!(matches!(
            SealedSnapshot::open(&other, &sealed),
            Err(Error::SnapshotOpen { .. })
        ));
        // Same key bytes and id, relabelled as another collection.
        let relabelled = EpochKey::from_parts(
            k.patient,
            Collection::Core,
            k.epoch,
            k.key_id,
            Zeroizing::new(*k.secret()),
        );
        assert!(SealedSnapshot::open(&relabelled, &sealed).is_err());
    }
}
