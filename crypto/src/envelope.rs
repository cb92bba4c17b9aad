//! Envelopes: one Automerge change sealed under its collection's epoch key
//! (XChaCha20-Poly1305, random 24-byte nonce) and signed by its author.
//!
//! The signature covers the header only, and the envelope id is the
//! SHA-256 of the signed header, so a node that received a snapshot and
//! the signed headers instead of ciphertexts still knows every envelope id
//! and can attribute every change to its author and grant.

use std::fmt;

use chacha20poly1305::aead::{Aead as _, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use ciborium::Value;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::canon::{self, Fields};
use crate::consent::{Collection, GrantId};
use crate::id::{ActorId, PatientId, Principal, SecretIdentity, Timestamp, verify};
use crate::keys::{Epoch, EpochKey, KeyId, KeyRef};
use crate::{Error, Result};

/// Domain tag of an envelope header signature.
pub const ENVELOPE_TAG: &[u8] = b"medmesh/envelope/v1";
/// Domain tag that prefixes the AEAD associated data.
pub const ENVELOPE_AAD_TAG: &[u8] = b"medmesh/envelope-aad/v1";
/// Largest encoded envelope accepted (one change, e.g. a scanned document).
pub const MAX_ENVELOPE_BYTES: usize = 8 * 1024 * 1024;
/// Largest encoded signed header accepted.
pub const MAX_SIGNED_HEADER_BYTES: usize = 1024;
const FORMAT_VERSION: u64 = 1;
const HEADER_FIELDS: usize = 14;

/// SHA-256 of an envelope's signed header.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EnvelopeId(pub [u8; 32]);

impl fmt::Display for EnvelopeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for EnvelopeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EnvelopeId({self})")
    }
}

/// The signed, cleartext part of an envelope.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct EnvelopeHeader {
    /// Whose record.
    pub patient: PatientId,
    /// Which collection.
    pub collection: Collection,
    /// Epoch of the key it is sealed under.
    pub epoch: Epoch,
    /// Id of that key.
    pub key_id: KeyId,
    /// Who wrote the change and signed the header.
    pub author: Principal,
    /// The grant the author wrote under; `None` exactly when the author is the patient.
    pub grant_id: Option<GrantId>,
    /// Automerge actor of the change; must belong to the author.
    pub actor: ActorId,
    /// Sequence number of the change for its actor (checked against revocation cuts).
    pub seq: u64,
    /// HMAC-SHA256 under the epoch key of the Automerge change hash.
    pub keyed_change_hash: [u8; 32],
    /// SHA-256 of the ciphertext.
    pub ciphertext_sha256: [u8; 32],
    /// When the author sealed it.
    pub created_at: Timestamp,
    /// XChaCha20-Poly1305 nonce.
    pub nonce: [u8; 24],
}

/// Which of a header's encodings (they differ only in the hashes they carry).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Form {
    /// Every field: what the author signs.
    Signed,
    /// Without the ciphertext hash: the AEAD's associated data, which cannot
    /// include the hash of its own output.
    Aad,
    /// Without the keyed change hash and the ciphertext hash, which the
    /// receiver of a snapshot transfer recomputes from the change and the key.
    Compact,
}

impl EnvelopeHeader {
    /// Fields in wire order for `form`.
    fn to_value(&self, form: Form) -> Value {
        let mut fields = vec![
            canon::uint(FORMAT_VERSION),
            canon::bytes(self.patient.as_bytes()),
            canon::text(self.collection.as_str()),
            canon::uint(self.epoch),
            canon::bytes(&self.key_id.0),
            canon::uint(self.author.role()),
            canon::bytes(self.author.key_bytes()),
            canon::opt_bytes(self.grant_id.as_ref().map(|g| &g.0[..])),
            canon::bytes(&self.actor.0),
            canon::uint(self.seq),
        ];
        if form != Form::Compact {
            fields.push(canon::bytes(&self.keyed_change_hash));
        }
        if form == Form::Signed {
            fields.push(canon::bytes(&self.ciphertext_sha256));
        }
        fields.push(canon::uint(self.created_at));
        fields.push(canon::bytes(&self.nonce));
        Value::Array(fields)
    }

    /// Reads the fields of `form` from `f`; hashes the form lacks are zero.
    fn from_fields(f: &mut Fields, form: Form) -> Result<Self> {
        let patient = PatientId::from_bytes(f.bytes()?)?;
        let collection = f.text(16)?.parse()?;
        let epoch = f.uint()?;
        let key_id = KeyId(f.bytes()?);
        let role = f.uint()?;
        let author = Principal::from_role(role, f.bytes()?)?;
        let grant_id = f.opt_bytes()?.map(GrantId);
        let actor = ActorId(f.bytes()?);
        let seq = f.uint()?;
        let keyed_change_hash = if form == Form::Compact { [0; 32] } else { f.bytes()? };
        let ciphertext_sha256 = if form == Form::Signed { f.bytes()? } else { [0; 32] };
        let created_at = f.uint()?;
        let nonce = f.bytes()?;
        let header = Self {
            patient,
            collection,
            epoch,
            key_id,
            author,
            grant_id,
            actor,
            seq,
            keyed_change_hash,
            ciphertext_sha256,
            created_at,
            nonce,
        };
        header.check()?;
        Ok(header)
    }

    fn from_value(value: Value) -> Result<Self> {
        let mut f = Fields::versioned("envelope header", value, FORMAT_VERSION, HEADER_FIELDS)?;
        Self::from_fields(&mut f, Form::Signed)
    }

    fn check(&self) -> Result<()> {
        let by_patient = self.author == Principal::Patient(self.patient);
        if by_patient == self.grant_id.is_some() {
            return Err(Error::InvalidField {
                field: "envelope grant id",
                reason: "present exactly when a practice is the author",
            });
        }
        if matches!(self.author, Principal::Patient(_)) && !by_patient {
            return Err(Error::InvalidField {
                field: "envelope author",
                reason: "a patient may write only their own record",
            });
        }
        if !self.actor.belongs_to(self.author.key_bytes()) {
            return Err(Error::InvalidField {
                field: "envelope actor",
                reason: "does not belong to the author",
            });
        }
        Ok(())
    }

    /// What names the key it is sealed under.
    pub fn key_ref(&self) -> KeyRef {
        KeyRef {
            patient: self.patient,
            collection: self.collection,
            epoch: self.epoch,
            key_id: self.key_id,
        }
    }

    pub(crate) fn aad(&self) -> Vec<u8> {
        canon::tagged(ENVELOPE_AAD_TAG, &canon::encode(&self.to_value(Form::Aad)))
    }
}

/// A verified signed header: what snapshots ship instead of ciphertexts.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SignedHeader {
    header: EnvelopeHeader,
    /// Canonical CBOR of the header: what the signature covers (after the tag).
    pub(crate) body: Vec<u8>,
    pub(crate) signature: [u8; 64],
    id: EnvelopeId,
}

impl SignedHeader {
    fn from_parts(header: EnvelopeHeader, body: Vec<u8>, signature: [u8; 64]) -> Self {
        let encoded = Self::encode_parts(&body, &signature);
        let id = EnvelopeId(Sha256::digest(&encoded).into());
        Self {
            header,
            body,
            signature,
            id,
        }
    }

    fn encode_parts(body: &[u8], signature: &[u8; 64]) -> Vec<u8> {
        // [body, signature]: body is already canonical CBOR, spliced in as is.
        let mut out = Vec::with_capacity(body.len() + 68);
        out.push(0x82);
        out.extend_from_slice(body);
        out.extend_from_slice(&[0x58, 64]);
        out.extend_from_slice(signature);
        out
    }

    fn verified(value_body: Value, signature: [u8; 64]) -> Result<Self> {
        let body = canon::encode(&value_body);
        let header = EnvelopeHeader::from_value(value_body)?;
        verify(
            &header.author.verifying_key()?,
            ENVELOPE_TAG,
            &body,
            &signature,
            "envelope",
        )?;
        Ok(Self::from_parts(header, body, signature))
    }

    /// Parses and verifies a signed header.
    ///
    /// # Errors
    /// Any decoding error, [`Error::BadSignature`].
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let value = canon::decode("envelope header", bytes, MAX_SIGNED_HEADER_BYTES, 32)?;
        let mut f = Fields::new("envelope header", value, 2)?;
        let body = f.value()?;
        let signature = f.bytes()?;
        Self::verified(body, signature)
    }

    /// The canonical `[header, signature]` bytes.
    pub fn encode(&self) -> Vec<u8> {
        Self::encode_parts(&self.body, &self.signature)
    }

    /// The header.
    pub fn header(&self) -> &EnvelopeHeader {
        &self.header
    }

    /// The envelope id.
    pub fn id(&self) -> EnvelopeId {
        self.id
    }

    /// Whether `change_hash` is the change this header signs for; used to
    /// check changes that arrived inside a snapshot rather than sealed.
    pub fn matches_change(&self, key: &EpochKey, change_hash: &[u8; 32]) -> bool {
        key.key_ref() == self.header.key_ref() && check_keyed_hash(key, change_hash, &self.header.keyed_change_hash)
    }
}

/// HMAC-SHA256 under the epoch key of an Automerge change hash. Keyed so
/// that headers do not let anyone confirm guesses about small edits.
pub fn keyed_change_hash(key: &EpochKey, change_hash: &[u8; 32]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.secret()).unwrap_or_else(|_| unreachable_hmac());
    mac.update(change_hash);
    mac.finalize().into_bytes().into()
}

// HMAC accepts keys of any length; this only exists so no `expect` is needed.
fn unreachable_hmac() -> Hmac<Sha256> {
    <Hmac<Sha256> as KeyInit>::new(&Default::default())
}

fn check_keyed_hash(key: &EpochKey, change_hash: &[u8; 32], expected: &[u8; 32]) -> bool {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.secret()).unwrap_or_else(|_| unreachable_hmac());
    mac.update(change_hash);
    mac.verify_slice(expected).is_ok()
}

/// What the author seals: one Automerge change and its identity.
#[derive(Clone, Copy, Debug)]
pub struct Change<'a> {
    /// The change's bytes.
    pub bytes: &'a [u8],
    /// Its Automerge hash.
    pub hash: [u8; 32],
    /// Its actor.
    pub actor: ActorId,
    /// Its sequence number for that actor.
    pub seq: u64,
}

/// A sealed, signed change.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Envelope {
    pub(crate) signed: SignedHeader,
    ciphertext: Vec<u8>,
}

impl Envelope {
    /// Seals `change`, a change of the record `(patient, collection)`, under
    /// `key` and signs the header as `author`. The header names the record
    /// given here; `key` must be one of that record's keys.
    ///
    /// `grant_id` must be `None` when the author is the patient, and the
    /// grant the practice writes under otherwise.
    ///
    /// # Errors
    /// [`Error::KeyNotOfRecord`] when `key` belongs to another patient or
    /// collection; [`Error::InvalidField`] for an inconsistent author, grant
    /// or actor; [`Error::Random`].
    pub fn seal(
        record: (PatientId, Collection),
        key: &EpochKey,
        author: &SecretIdentity,
        grant_id: Option<GrantId>,
        change: Change<'_>,
        created_at: Timestamp,
    ) -> Result<Self> {
        let mut nonce = [0u8; 24];
        getrandom::fill(&mut nonce).map_err(|_| Error::Random)?;
        Self::seal_with_nonce(record, key, author, grant_id, change, created_at, nonce)
    }

    /// [`Envelope::seal`] with a given nonce, for test vectors. A nonce must
    /// never be reused under one key: production code calls `seal`.
    ///
    /// # Errors
    /// As [`Envelope::seal`].
    #[doc(hidden)]
    pub fn seal_with_nonce(
        (patient, collection): (PatientId, Collection),
        key: &EpochKey,
        author: &SecretIdentity,
        grant_id: Option<GrantId>,
        change: Change<'_>,
        created_at: Timestamp,
        nonce: [u8; 24],
    ) -> Result<Self> {
        // The record decides whose envelope this is, never the key: a key
        // found by an id another patient chose must not relabel the change.
        if !key.is_of(&patient, collection) {
            return Err(Error::KeyNotOfRecord {
                collection: collection.as_str(),
            });
        }
        let author_principal = if author.patient_id() == patient {
            Principal::Patient(patient)
        } else {
            Principal::Practice(author.practice_id()?)
        };
        let mut header = EnvelopeHeader {
            patient,
            collection,
            epoch: key.epoch,
            key_id: key.key_id,
            author: author_principal,
            grant_id,
            actor: change.actor,
            seq: change.seq,
            keyed_change_hash: keyed_change_hash(key, &change.hash),
            ciphertext_sha256: [0; 32],
            created_at,
            nonce,
        };
        header.check()?;
        let ciphertext = encrypt(key, &mut header, change.bytes)?;
        let body = canon::encode(&header.to_value(Form::Signed));
        let signature = author.sign(ENVELOPE_TAG, &body);
        Ok(Self {
            signed: SignedHeader::from_parts(header, body, signature),
            ciphertext,
        })
    }

    /// Parses an envelope, verifies the author's signature and then the
    /// ciphertext hash. Does not decrypt.
    ///
    /// # Errors
    /// Any decoding error, [`Error::BadSignature`], [`Error::CiphertextHash`].
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let value = canon::decode("envelope", bytes, MAX_ENVELOPE_BYTES, 32)?;
        let mut f = Fields::new("envelope", value, 3)?;
        let body = f.value()?;
        let signature = f.bytes()?;
        let ciphertext = f.byte_vec(MAX_ENVELOPE_BYTES)?;
        let signed = SignedHeader::verified(body, signature)?;
        let hash: [u8; 32] = Sha256::digest(&ciphertext).into();
        if hash != signed.header.ciphertext_sha256 {
            return Err(Error::CiphertextHash {
                envelope: signed.id.to_string(),
            });
        }
        Ok(Self { signed, ciphertext })
    }

    /// The canonical `[header, signature, ciphertext]` bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.signed.body.len() + self.ciphertext.len() + 80);
        out.push(0x83);
        out.extend_from_slice(&self.signed.body);
        out.extend_from_slice(&[0x58, 64]);
        out.extend_from_slice(&self.signed.signature);
        push_bstr_head(&mut out, self.ciphertext.len());
        out.extend_from_slice(&self.ciphertext);
        out
    }

    /// Decrypts with `key`, then checks that `change_hash_of(plaintext)` (the
    /// Automerge hash of the decoded change, `None` if it does not decode)
    /// matches the signed keyed change hash.
    ///
    /// # Errors
    /// [`Error::WrongKey`], [`Error::Decrypt`], [`Error::ChangeHash`].
    pub fn open(
        &self,
        key: &EpochKey,
        change_hash_of: impl FnOnce(&[u8]) -> Option<[u8; 32]>,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let h = &self.signed.header;
        let id = || self.signed.id.to_string();
        if key.key_ref() != h.key_ref() {
            return Err(Error::WrongKey { envelope: id() });
        }
        let cipher = XChaCha20Poly1305::new(key.secret().into());
        let plain = Zeroizing::new(
            cipher
                .decrypt(
                    &XNonce::from(h.nonce),
                    Payload {
                        msg: &self.ciphertext,
                        aad: &h.aad(),
                    },
                )
                .map_err(|_| Error::Decrypt { envelope: id() })?,
        );
        let hash = change_hash_of(&plain).ok_or_else(|| Error::ChangeHash { envelope: id() })?;
        if !check_keyed_hash(key, &hash, &h.keyed_change_hash) {
            return Err(Error::ChangeHash { envelope: id() });
        }
        Ok(plain)
    }

    /// The header.
    pub fn header(&self) -> &EnvelopeHeader {
        &self.signed.header
    }

    /// The signed header.
    pub fn signed_header(&self) -> &SignedHeader {
        &self.signed
    }

    /// The envelope id.
    pub fn id(&self) -> EnvelopeId {
        self.signed.id
    }

    /// The ciphertext.
    pub fn ciphertext(&self) -> &[u8] {
        &self.ciphertext
    }
}

/// Encrypts `plain` under `key` with the header's nonce and associated
/// data, and records the ciphertext's hash in the header.
fn encrypt(key: &EpochKey, header: &mut EnvelopeHeader, plain: &[u8]) -> Result<Vec<u8>> {
    let cipher = XChaCha20Poly1305::new(key.secret().into());
    let aad = header.aad();
    let ciphertext = cipher
        .encrypt(&XNonce::from(header.nonce), Payload { msg: plain, aad: &aad })
        .map_err(|_| Error::Malformed {
            kind: "envelope",
            reason: "change too large to seal",
        })?;
    header.ciphertext_sha256 = Sha256::digest(&ciphertext).into();
    Ok(ciphertext)
}

/// Fields of a compact header: the signed header's minus its two hashes,
/// plus the signature.
const COMPACT_FIELDS: usize = HEADER_FIELDS - 2 + 1;
/// Largest encoded compact header accepted.
pub const MAX_COMPACT_HEADER_BYTES: usize = MAX_SIGNED_HEADER_BYTES;

/// A signed header without its keyed change hash and ciphertext hash: what a
/// snapshot transfer ships per envelope instead of the envelope (DESIGN §6).
///
/// Both hashes are functions of the change, the epoch key and the nonce,
/// so whoever holds the key and the change (from the snapshot's document)
/// re-seals the very ciphertext the author made — the nonce is in the
/// header — and [`CompactHeader::restore`] gets back the original envelope,
/// byte for byte, which the author's signature then verifies. Nothing here
/// is trusted before that signature check.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct CompactHeader {
    /// The header; its two hashes are zero until restored.
    header: EnvelopeHeader,
    signature: [u8; 64],
}

impl CompactHeader {
    /// The unverified header fields (both hashes zero). Routing only: e.g.
    /// which key and which change to restore it with.
    pub fn header(&self) -> &EnvelopeHeader {
        &self.header
    }

    /// Canonical CBOR `[version, …header fields but the two hashes…, signature]`.
    pub fn encode(&self) -> Vec<u8> {
        canon::encode(&self.to_value())
    }

    /// As a CBOR value, for embedding in a list.
    pub fn to_value(&self) -> Value {
        let Value::Array(mut fields) = self.header.to_value(Form::Compact) else {
            return Value::Null;
        };
        fields.push(canon::bytes(&self.signature));
        Value::Array(fields)
    }

    /// Parses a compact header (structure only: it cannot be verified before
    /// [`CompactHeader::restore`]).
    ///
    /// # Errors
    /// Any decoding error; [`Error::UnsupportedVersion`].
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let value = canon::decode("compact header", bytes, MAX_COMPACT_HEADER_BYTES, 32)?;
        Self::from_value(value)
    }

    /// The compact header of an encoded envelope, parsed **without**
    /// verifying its signature or ciphertext hash: for a node re-shipping
    /// envelopes it verified when it stored them. Costs no signature check;
    /// the receiver verifies in [`CompactHeader::restore`], so a header
    /// damaged at rest only fails to restore there.
    ///
    /// # Errors
    /// Any decoding error.
    pub fn of_stored_envelope(bytes: &[u8]) -> Result<Self> {
        let value = canon::decode("envelope", bytes, MAX_ENVELOPE_BYTES, 32)?;
        let mut f = Fields::new("envelope", value, 3)?;
        let mut header = EnvelopeHeader::from_value(f.value()?)?;
        header.keyed_change_hash = [0; 32];
        header.ciphertext_sha256 = [0; 32];
        let signature = f.bytes()?;
        Ok(Self { header, signature })
    }

    /// [`CompactHeader::decode`] of an already parsed CBOR value.
    ///
    /// # Errors
    /// As [`CompactHeader::decode`].
    pub fn from_value(value: Value) -> Result<Self> {
        let mut f = Fields::versioned("compact header", value, FORMAT_VERSION, COMPACT_FIELDS)?;
        let header = EnvelopeHeader::from_fields(&mut f, Form::Compact)?;
        let signature = f.bytes()?;
        Ok(Self { header, signature })
    }

    /// Rebuilds the envelope from its change and its epoch key: recomputes
    /// the keyed change hash, re-seals the change with the header's nonce,
    /// hashes the ciphertext, and verifies the author's signature over the
    /// completed header.
    ///
    /// `change.bytes` must be the exact plaintext the author sealed (the
    /// node seals Automerge's compressed change chunk). A ciphertext made
    /// from other bytes never leaves this function: it fails the signature
    /// and is dropped.
    ///
    /// # Errors
    /// [`Error::WrongKey`] when `key` is not the header's epoch key;
    /// [`Error::InvalidField`] when the change's actor or sequence number is
    /// not the header's; [`Error::BadSignature`] when the change is not the
    /// one the author signed for.
    pub fn restore(&self, key: &EpochKey, change: Change<'_>) -> Result<Envelope> {
        let h = &self.header;
        if key.key_ref() != h.key_ref() {
            return Err(Error::WrongKey {
                envelope: "compact header".into(),
            });
        }
        if change.actor != h.actor || change.seq != h.seq {
            return Err(Error::InvalidField {
                field: "compact header change",
                reason: "actor or sequence number differs from the header's",
            });
        }
        let mut header = h.clone();
        header.keyed_change_hash = keyed_change_hash(key, &change.hash);
        let ciphertext = encrypt(key, &mut header, change.bytes)?;
        let body = canon::encode(&header.to_value(Form::Signed));
        verify(
            &header.author.verifying_key()?,
            ENVELOPE_TAG,
            &body,
            &self.signature,
            "envelope",
        )?;
        Ok(Envelope {
            signed: SignedHeader::from_parts(header, body, self.signature),
            ciphertext,
        })
    }
}

impl SignedHeader {
    /// The compact form of this header, for a snapshot transfer.
    pub fn compact(&self) -> CompactHeader {
        let mut header = self.header.clone();
        header.keyed_change_hash = [0; 32];
        header.ciphertext_sha256 = [0; 32];
        CompactHeader {
            header,
            signature: self.signature,
        }
    }
}

/// Writes a canonical CBOR byte-string head (major type 2) for `len`.
fn push_bstr_head(out: &mut Vec<u8>, len: usize) {
    let len = len as u64;
    match len {
        0..=23 => out.push(0x40 | len as u8),
        24..=0xff => out.extend_from_slice(&[0x58, len as u8]),
        0x100..=0xffff => {
            out.push(0x59);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(0x5a);
            out.extend_from_slice(&(len as u32).to_be_bytes());
        }
        _ => {
            out.push(0x5b);
            out.extend_from_slice(&len.to_be_bytes());
        }
    }
}
