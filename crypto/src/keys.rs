//! Collection keys and the key shares that hand them out.
//!
//! A collection key is 32 random bytes per (patient, collection, epoch)
//! with a random 16-byte key id. A key share wraps it for one recipient
//! with HPKE base mode (X25519-HKDF-SHA256, ChaCha20-Poly1305; RFC 9180) to
//! the X25519 form of the recipient's ed25519 key, and is signed by the
//! patient.

use std::fmt;

use ciborium::Value;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, OpModeR, OpModeS, Serializable};
use zeroize::Zeroizing;

use crate::canon::{self, Fields};
use crate::consent::{Collection, signed_wire, split_signed};
use crate::id::{PatientId, Principal, SecretIdentity, Timestamp, verify};
use crate::{Error, Result};

type Kem = X25519HkdfSha256;
type Kdf = hpke::kdf::HkdfSha256;
type Aead = hpke::aead::ChaCha20Poly1305;

/// Domain tag of a key share signature (and prefix of its HPKE info).
pub const KEYSHARE_TAG: &[u8] = b"medmesh/keyshare/v1";
/// Largest encoded key share accepted.
pub const MAX_KEYSHARE_BYTES: usize = 1024;
const FORMAT_VERSION: u64 = 1;
/// HPKE ciphertext of a 32-byte key: key plus 16-byte tag.
const WRAPPED_KEY_LEN: usize = 48;

/// A collection key epoch number: 0 at the first grant, +1 per revocation.
pub type Epoch = u64;

/// The random id of one epoch key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 16]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// What names one epoch key: its patient, collection, epoch and key id.
///
/// A key id alone names nothing: it is random, but any patient signs key
/// shares with whatever id it likes, so another identity can copy a victim's
/// key id (headers carry it in clear). Every lookup of a key goes by the
/// whole tuple (DESIGN §9 invariant 7).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct KeyRef {
    /// Whose record.
    pub patient: PatientId,
    /// Which collection.
    pub collection: Collection,
    /// Which epoch.
    pub epoch: Epoch,
    /// The key's random id.
    pub key_id: KeyId,
}

/// One collection key of one epoch. Zeroized on drop; `Debug` hides the key.
#[derive(Clone)]
pub struct EpochKey {
    /// Whose record.
    pub patient: PatientId,
    /// Which collection.
    pub collection: Collection,
    /// Which epoch.
    pub epoch: Epoch,
    /// Random id carried in shares and envelope headers.
    pub key_id: KeyId,
    key: Zeroizing<[u8; 32]>,
}

impl EpochKey {
    /// A fresh random key.
    ///
    /// # Errors
    /// [`Error::Random`].
    pub fn generate(patient: PatientId, collection: Collection, epoch: Epoch) -> Result<Self> {
        let mut key = Zeroizing::new([0u8; 32]);
        getrandom::fill(key.as_mut()).map_err(|_| Error::Random)?;
        let mut key_id = [0u8; 16];
        getrandom::fill(&mut key_id).map_err(|_| Error::Random)?;
        Ok(Self::from_parts(patient, collection, epoch, KeyId(key_id), key))
    }

    /// From stored parts (keystore, test vectors).
    pub fn from_parts(
        patient: PatientId,
        collection: Collection,
        epoch: Epoch,
        key_id: KeyId,
        key: Zeroizing<[u8; 32]>,
    ) -> Self {
        Self {
            patient,
            collection,
            epoch,
            key_id,
            key,
        }
    }

    /// What names this key.
    pub fn key_ref(&self) -> KeyRef {
        KeyRef {
            patient: self.patient,
            collection: self.collection,
            epoch: self.epoch,
            key_id: self.key_id,
        }
    }

    /// Whether this is a key of (patient, collection).
    pub fn is_of(&self, patient: &PatientId, collection: Collection) -> bool {
        self.patient == *patient && self.collection == collection
    }

    /// The secret key bytes, for sealing and for the keystore only.
    pub fn secret(&self) -> &[u8; 32] {
        &self.key
    }
}

impl fmt::Debug for EpochKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EpochKey")
            .field("patient", &self.patient)
            .field("collection", &self.collection)
            .field("epoch", &self.epoch)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// The signed fields of a key share.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct KeyShareTerms {
    /// Whose record (and the signer).
    pub patient: PatientId,
    /// Which collection.
    pub collection: Collection,
    /// Which epoch.
    pub epoch: Epoch,
    /// Id of the wrapped key.
    pub key_id: KeyId,
    /// Who can open it.
    pub recipient: Principal,
    /// HPKE encapsulated key.
    pub encapped: [u8; 32],
    /// HPKE ciphertext of the 32-byte key.
    pub wrapped: Vec<u8>,
    /// When the patient made it.
    pub issued_at: Timestamp,
}

/// A collection key wrapped for one recipient, signed by the patient.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct KeyShare {
    terms: KeyShareTerms,
    encoded: Vec<u8>,
}

/// HPKE info: binds the share to patient, collection, epoch, key id and
/// recipient, so a share cannot be replayed as another one.
pub(crate) fn hpke_info(
    patient: &PatientId,
    collection: Collection,
    epoch: Epoch,
    key_id: &KeyId,
    recipient: &Principal,
) -> Vec<u8> {
    let context = Value::Array(vec![
        canon::bytes(patient.as_bytes()),
        canon::text(collection.as_str()),
        canon::uint(epoch),
        canon::bytes(&key_id.0),
        canon::uint(recipient.role()),
        canon::bytes(recipient.key_bytes()),
    ]);
    canon::tagged(KEYSHARE_TAG, &canon::encode(&context))
}

/// The X25519 public key of an ed25519 principal (birational map).
fn x25519_public(recipient: &Principal) -> Result<<Kem as hpke::Kem>::PublicKey> {
    let montgomery = recipient.verifying_key()?.to_montgomery();
    <Kem as hpke::Kem>::PublicKey::from_bytes(montgomery.as_bytes()).map_err(|_| Error::InvalidPublicKey)
}

impl KeyShareTerms {
    /// What names the key this share wraps.
    pub fn key_ref(&self) -> KeyRef {
        KeyRef {
            patient: self.patient,
            collection: self.collection,
            epoch: self.epoch,
            key_id: self.key_id,
        }
    }

    fn to_value(&self) -> Value {
        Value::Array(vec![
            canon::uint(FORMAT_VERSION),
            canon::bytes(self.patient.as_bytes()),
            canon::text(self.collection.as_str()),
            canon::uint(self.epoch),
            canon::bytes(&self.key_id.0),
            canon::uint(self.recipient.role()),
            canon::bytes(self.recipient.key_bytes()),
            canon::bytes(&self.encapped),
            canon::bytes(&self.wrapped),
            canon::uint(self.issued_at),
        ])
    }

    fn from_value(value: Value) -> Result<Self> {
        let mut f = Fields::versioned("key share", value, FORMAT_VERSION, 10)?;
        let patient = PatientId::from_bytes(f.bytes()?)?;
        let collection = f.text(16)?.parse()?;
        let epoch = f.uint()?;
        let key_id = KeyId(f.bytes()?);
        let role = f.uint()?;
        let recipient = Principal::from_role(role, f.bytes()?)?;
        let encapped = f.bytes()?;
        let wrapped = f.byte_vec(WRAPPED_KEY_LEN)?;
        if wrapped.len() != WRAPPED_KEY_LEN {
            return Err(Error::Malformed {
                kind: f.kind(),
                reason: "wrapped key of wrong length",
            });
        }
        let issued_at = f.uint()?;
        Ok(Self {
            patient,
            collection,
            epoch,
            key_id,
            recipient,
            encapped,
            wrapped,
            issued_at,
        })
    }
}

impl KeyShare {
    /// Wraps `key` for `recipient` and signs the share with the patient's key.
    ///
    /// # Errors
    /// [`Error::WrongSigner`] when `patient` does not own `key`; HPKE failures.
    pub fn create(
        key: &EpochKey,
        recipient: Principal,
        patient: &SecretIdentity,
        issued_at: Timestamp,
    ) -> Result<Self> {
        Self::create_inner(key, recipient, patient, issued_at, |pk, info, plain| {
            hpke::single_shot_seal::<Aead, Kdf, Kem>(&OpModeS::Base, pk, info, plain, &[])
        })
    }

    /// As [`KeyShare::create`] with a caller-chosen RNG: for test vectors only.
    #[cfg(test)]
    pub(crate) fn create_with_rng(
        key: &EpochKey,
        recipient: Principal,
        patient: &SecretIdentity,
        issued_at: Timestamp,
        rng: &mut impl hpke::rand_core::CryptoRng,
    ) -> Result<Self> {
        Self::create_inner(key, recipient, patient, issued_at, |pk, info, plain| {
            hpke::single_shot_seal_with_rng::<Aead, Kdf, Kem>(&OpModeS::Base, pk, info, plain, &[], rng)
        })
    }

    fn create_inner(
        key: &EpochKey,
        recipient: Principal,
        patient: &SecretIdentity,
        issued_at: Timestamp,
        seal: impl FnOnce(
            &<Kem as hpke::Kem>::PublicKey,
            &[u8],
            &[u8],
        ) -> std::result::Result<(<Kem as hpke::Kem>::EncappedKey, Vec<u8>), hpke::HpkeError>,
    ) -> Result<Self> {
        if patient.patient_id() != key.patient {
            return Err(Error::WrongSigner {
                kind: "key share",
                expected: "the patient who owns the key",
            });
        }
        let info = hpke_info(&key.patient, key.collection, key.epoch, &key.key_id, &recipient);
        let (encapped, wrapped) =
            seal(&x25519_public(&recipient)?, &info, key.secret()).map_err(|_| Error::KeyShareOpen {
                collection: key.collection.as_str(),
                epoch: key.epoch,
            })?;
        let encapped: [u8; 32] = encapped
            .to_bytes()
            .as_slice()
            .try_into()
            .map_err(|_| Error::Malformed {
                kind: "key share",
                reason: "encapsulated key of wrong length",
            })?;
        let terms = KeyShareTerms {
            patient: key.patient,
            collection: key.collection,
            epoch: key.epoch,
            key_id: key.key_id,
            recipient,
            encapped,
            wrapped,
            issued_at,
        };
        let body = terms.to_value();
        let signature = patient.sign(KEYSHARE_TAG, &canon::encode(&body));
        Ok(Self {
            encoded: signed_wire(body, &signature),
            terms,
        })
    }

    /// The patient an encoded key share names, read **without** checking
    /// its signature (`Grant::claimed_patient`).
    ///
    /// # Errors
    /// Any decoding error.
    pub fn claimed_patient(bytes: &[u8]) -> Result<PatientId> {
        let (body, _, _) = split_signed("key share", bytes, MAX_KEYSHARE_BYTES, 32)?;
        Ok(KeyShareTerms::from_value(body)?.patient)
    }

    /// Parses and verifies a key share (the patient's signature).
    ///
    /// # Errors
    /// Any decoding error, [`Error::BadSignature`].
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let (body, body_bytes, signature) = split_signed("key share", bytes, MAX_KEYSHARE_BYTES, 32)?;
        let terms = KeyShareTerms::from_value(body)?;
        verify(
            &terms.patient.verifying_key()?,
            KEYSHARE_TAG,
            &body_bytes,
            &signature,
            "key share",
        )?;
        Ok(Self {
            terms,
            encoded: bytes.to_vec(),
        })
    }

    /// Opens the share with the recipient's secret key.
    ///
    /// # Errors
    /// [`Error::NotRecipient`] when `recipient` is not the addressee;
    /// [`Error::KeyShareOpen`] when HPKE authentication fails.
    pub fn open(&self, recipient: &SecretIdentity) -> Result<EpochKey> {
        let t = &self.terms;
        if recipient.public_bytes() != *t.recipient.key_bytes() {
            return Err(Error::NotRecipient {
                collection: t.collection.as_str(),
                epoch: t.epoch,
            });
        }
        let failed = || Error::KeyShareOpen {
            collection: t.collection.as_str(),
            epoch: t.epoch,
        };
        let secret =
            <Kem as hpke::Kem>::PrivateKey::from_bytes(recipient.x25519_secret().as_slice()).map_err(|_| failed())?;
        let encapped = <Kem as hpke::Kem>::EncappedKey::from_bytes(&t.encapped).map_err(|_| failed())?;
        let info = hpke_info(&t.patient, t.collection, t.epoch, &t.key_id, &t.recipient);
        let plain = Zeroizing::new(
            hpke::single_shot_open::<Aead, Kdf, Kem>(&OpModeR::Base, &secret, &encapped, &info, &t.wrapped, &[])
                .map_err(|_| failed())?,
        );
        let key: [u8; 32] = plain.as_slice().try_into().map_err(|_| failed())?;
        Ok(EpochKey::from_parts(
            t.patient,
            t.collection,
            t.epoch,
            t.key_id,
            Zeroizing::new(key),
        ))
    }

    /// The canonical signed bytes.
    pub fn encoded(&self) -> &[u8] {
        &self.encoded
    }

    /// The signed fields.
    pub fn terms(&self) -> &KeyShareTerms {
        &self.terms
    }
}
