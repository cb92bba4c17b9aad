//! Who is who: patients (`did:key`), practices (libp2p `PeerId`), and the
//! secret identity either of them signs with.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::{Error, Result};

pub use libp2p_identity::PeerId;

/// Multicodec prefix of an ed25519 public key (`ed25519-pub`, 0xed as varint).
const ED25519_MULTICODEC: [u8; 2] = [0xed, 0x01];
const DID_KEY_PREFIX: &str = "did:key:z";

/// Milliseconds since the Unix epoch, UTC. Every time medmesh signs is one.
pub type Timestamp = u64;

/// The current time as a [`Timestamp`].
pub fn now() -> Timestamp {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Keys each thread decompressed last (see [`verifying_key`]).
const RECENT_KEYS: usize = 8;

thread_local! {
    static RECENT: std::cell::RefCell<(usize, [Option<VerifyingKey>; RECENT_KEYS])> =
        const { std::cell::RefCell::new((0, [None; RECENT_KEYS])) };
}

/// The key for `bytes`, refusing bytes that are not an ed25519 point.
///
/// Decompressing the point costs about a fifth of a signature check, and a
/// snapshot transfer, a page or a scan of the store names the same patient
/// and author thousands of times: each thread keeps the last few keys it
/// decompressed (public keys; a hit is the very result decompressing those
/// bytes gives).
fn verifying_key(bytes: &[u8; 32]) -> Result<VerifyingKey> {
    let hit = RECENT.with(|recent| {
        recent
            .borrow()
            .1
            .iter()
            .flatten()
            .find(|k| k.as_bytes() == bytes)
            .copied()
    });
    if let Some(key) = hit {
        return Ok(key);
    }
    let key = VerifyingKey::from_bytes(bytes).map_err(|_| Error::InvalidPublicKey)?;
    RECENT.with(|recent| {
        let (next, keys) = &mut *recent.borrow_mut();
        if let Some(slot) = keys.get_mut(*next) {
            *slot = Some(key);
        }
        *next = (*next + 1) % RECENT_KEYS;
    });
    Ok(key)
}

/// A patient: an ed25519 public key, printed as a W3C `did:key:z6Mk…`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PatientId([u8; 32]);

impl PatientId {
    /// From raw public key bytes; refuses bytes that are not an ed25519 point.
    ///
    /// # Errors
    /// [`Error::InvalidPublicKey`].
    pub fn from_bytes(bytes: [u8; 32]) -> Result<Self> {
        verifying_key(&bytes)?;
        Ok(Self(bytes))
    }

    /// The raw public key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub(crate) fn verifying_key(&self) -> Result<VerifyingKey> {
        verifying_key(&self.0)
    }
}

impl fmt::Display for PatientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut raw = Vec::with_capacity(34);
        raw.extend_from_slice(&ED25519_MULTICODEC);
        raw.extend_from_slice(&self.0);
        write!(f, "{DID_KEY_PREFIX}{}", bs58::encode(raw).into_string())
    }
}

impl fmt::Debug for PatientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PatientId({self})")
    }
}

impl FromStr for PatientId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let encoded = s
            .strip_prefix(DID_KEY_PREFIX)
            .ok_or(Error::InvalidDid("expected did:key:z…"))?;
        if encoded.len() > 64 {
            return Err(Error::InvalidDid("too long"));
        }
        let raw = bs58::decode(encoded)
            .into_vec()
            .map_err(|_| Error::InvalidDid("not base58btc"))?;
        let key = raw
            .strip_prefix(&ED25519_MULTICODEC[..])
            .ok_or(Error::InvalidDid("not an ed25519 key"))?;
        let key: [u8; 32] = key.try_into().map_err(|_| Error::InvalidDid("wrong key length"))?;
        Self::from_bytes(key).map_err(|_| Error::InvalidDid("not a valid ed25519 point"))
    }
}

/// A practice node: an ed25519 public key, printed as its libp2p `PeerId`.
#[derive(Clone, Copy)]
pub struct PracticeId {
    key: [u8; 32],
    // Derived from `key` once; kept because every log line and wire message wants it.
    peer: PeerId,
}

impl PartialEq for PracticeId {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}
impl Eq for PracticeId {}
impl std::hash::Hash for PracticeId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key.hash(state);
    }
}
impl PartialOrd for PracticeId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for PracticeId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key.cmp(&other.key)
    }
}

impl PracticeId {
    /// From raw public key bytes; refuses bytes that are not an ed25519 point.
    ///
    /// # Errors
    /// [`Error::InvalidPublicKey`].
    pub fn from_bytes(bytes: [u8; 32]) -> Result<Self> {
        verifying_key(&bytes)?;
        Self::from_valid_key(bytes)
    }

    /// From key bytes already known to be a valid ed25519 point. The PeerId
    /// is built directly (identity multihash of the protobuf-encoded key),
    /// without decompressing the point a second time.
    fn from_valid_key(key: [u8; 32]) -> Result<Self> {
        // multihash(identity = 0x00, 36 bytes) of protobuf { 1: Ed25519 (1), 2: key }.
        let mut raw = [0u8; 6 + 32];
        raw[..6].copy_from_slice(&[0x00, 0x24, 0x08, 0x01, 0x12, 0x20]);
        raw[6..].copy_from_slice(&key);
        let peer = PeerId::from_bytes(&raw).map_err(|_| Error::InvalidPublicKey)?;
        Ok(Self { key, peer })
    }

    /// The raw public key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.key
    }

    /// The libp2p `PeerId` of this practice.
    pub fn peer_id(&self) -> PeerId {
        self.peer
    }

    /// The practice behind a `PeerId`; only ed25519 peer ids (which inline
    /// their key) name a practice.
    ///
    /// # Errors
    /// [`Error::InvalidPeerId`].
    pub fn from_peer_id(peer: &PeerId) -> Result<Self> {
        let multihash = peer.as_ref();
        // Code 0 is the identity multihash: the key itself, not a hash of it.
        if multihash.code() != 0 {
            return Err(Error::InvalidPeerId("not an inlined ed25519 key"));
        }
        let key = libp2p_identity::PublicKey::try_decode_protobuf(multihash.digest())
            .map_err(|_| Error::InvalidPeerId("undecodable key"))?
            .try_into_ed25519()
            .map_err(|_| Error::InvalidPeerId("not an ed25519 key"))?;
        // The decode above already checked the point; decompressing it again
        // doubled the cost of a call the sync actor makes per connected peer.
        Self::from_valid_key(key.to_bytes()).map_err(|_| Error::InvalidPeerId("invalid ed25519 point"))
    }
}

impl fmt::Display for PracticeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.peer_id(), f)
    }
}

impl fmt::Debug for PracticeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PracticeId({self})")
    }
}

impl FromStr for PracticeId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let peer = PeerId::from_str(s).map_err(|_| Error::InvalidPeerId("not a peer id"))?;
        Self::from_peer_id(&peer)
    }
}

/// A party that can author envelopes or receive key shares.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub enum Principal {
    /// The patient, through their own CLI.
    Patient(PatientId),
    /// A practice node.
    Practice(PracticeId),
}

impl Principal {
    /// Wire role number: 0 patient, 1 practice.
    pub(crate) fn role(&self) -> u64 {
        match self {
            Self::Patient(_) => 0,
            Self::Practice(_) => 1,
        }
    }

    /// The raw ed25519 public key.
    pub fn key_bytes(&self) -> &[u8; 32] {
        match self {
            Self::Patient(p) => p.as_bytes(),
            Self::Practice(p) => p.as_bytes(),
        }
    }

    pub(crate) fn from_role(role: u64, key: [u8; 32]) -> Result<Self> {
        match role {
            0 => Ok(Self::Patient(PatientId::from_bytes(key)?)),
            1 => Ok(Self::Practice(PracticeId::from_bytes(key)?)),
            _ => Err(Error::InvalidField {
                field: "principal role",
                reason: "unknown role",
            }),
        }
    }

    pub(crate) fn verifying_key(&self) -> Result<VerifyingKey> {
        verifying_key(self.key_bytes())
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Patient(p) => fmt::Display::fmt(p, f),
            Self::Practice(p) => fmt::Display::fmt(p, f),
        }
    }
}

/// An ed25519 secret key: a patient's (in the keystore) or a practice
/// node's (its libp2p identity). Zeroized on drop; `Debug` shows only the
/// public half.
pub struct SecretIdentity {
    signing: SigningKey,
}

impl SecretIdentity {
    /// A fresh key from the operating system's randomness.
    ///
    /// # Errors
    /// [`Error::Random`].
    pub fn generate() -> Result<Self> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut()).map_err(|_| Error::Random)?;
        Ok(Self::from_seed(&seed))
    }

    /// From the 32-byte ed25519 seed (RFC 8032 "secret key").
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self {
            signing: SigningKey::from_bytes(seed),
        }
    }

    /// The 32-byte seed, for the keystore or the node's key file only.
    pub fn seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.signing.to_bytes())
    }

    /// The public key bytes.
    pub fn public_bytes(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// This key as a patient.
    pub fn patient_id(&self) -> PatientId {
        PatientId(self.public_bytes())
    }

    /// This key as a practice.
    ///
    /// # Errors
    /// Only if the public key cannot be expressed as a libp2p key, which
    /// does not happen for keys made by ed25519-dalek.
    pub fn practice_id(&self) -> Result<PracticeId> {
        // The public half of a secret key is a valid point by construction.
        PracticeId::from_valid_key(self.public_bytes())
    }

    /// Signs `tag || body`.
    pub(crate) fn sign(&self, tag: &[u8], body: &[u8]) -> [u8; 64] {
        self.signing.sign(&crate::canon::tagged(tag, body)).to_bytes()
    }

    /// The X25519 secret for this key by the birational map (clamped scalar
    /// of the expanded ed25519 secret), so anyone can wrap keys to a
    /// principal knowing only its ed25519 public key.
    pub(crate) fn x25519_secret(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.signing.to_scalar_bytes())
    }

    /// The same key as a libp2p identity, so a node's PeerId and a patient's
    /// Noise identity are this key.
    ///
    /// # Errors
    /// Only if libp2p refuses a 32-byte seed, which it does not.
    pub fn to_libp2p(&self) -> Result<libp2p_identity::Keypair> {
        let mut seed = self.seed();
        libp2p_identity::Keypair::ed25519_from_bytes(seed.as_mut())
            .map_err(|_| Error::InvalidPeerId("libp2p refused the ed25519 seed"))
    }

    /// The identity behind an ed25519 libp2p keypair.
    ///
    /// # Errors
    /// [`Error::InvalidPeerId`] for non-ed25519 keypairs.
    pub fn from_libp2p(keypair: &libp2p_identity::Keypair) -> Result<Self> {
        let ed = keypair
            .clone()
            .try_into_ed25519()
            .map_err(|_| Error::InvalidPeerId("not an ed25519 keypair"))?;
        let secret = Zeroizing::new(ed.secret().as_ref().to_owned());
        let seed: &[u8; 32] = secret
            .as_slice()
            .try_into()
            .map_err(|_| Error::InvalidPeerId("bad ed25519 secret"))?;
        Ok(Self::from_seed(seed))
    }
}

impl fmt::Debug for SecretIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretIdentity({})", self.patient_id())
    }
}

/// Signature checks this process has made (every one goes through
/// [`verify`]). Tests count them: a received item is checked once.
static SIGNATURE_CHECKS: AtomicU64 = AtomicU64::new(0);

/// How many signatures this process has checked so far.
pub fn signature_checks() -> u64 {
    SIGNATURE_CHECKS.load(Ordering::Relaxed)
}

pub(crate) fn verify(
    key: &VerifyingKey,
    tag: &[u8],
    body: &[u8],
    signature: &[u8; 64],
    kind: &'static str,
) -> Result<()> {
    SIGNATURE_CHECKS.fetch_add(1, Ordering::Relaxed);
    key.verify_strict(&crate::canon::tagged(tag, body), &Signature::from_bytes(signature))
        .map_err(|_| Error::BadSignature { kind })
}

/// An Automerge actor id as medmesh makes them: the first 16 bytes of
/// SHA-256(author public key), then 8 random bytes per process start, so a
/// restored backup never reuses an (actor, seq) pair and anyone can check
/// that a change's actor belongs to the envelope's author.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ActorId(pub [u8; 24]);

impl ActorId {
    /// The actor id for `author` in a process that drew `process_nonce`.
    pub fn for_author(author: &[u8; 32], process_nonce: [u8; 8]) -> Self {
        let mut id = [0u8; 24];
        id[..16].copy_from_slice(&Sha256::digest(author)[..16]);
        id[16..].copy_from_slice(&process_nonce);
        Self(id)
    }

    /// A fresh actor id for `author`, with a random process nonce.
    ///
    /// # Errors
    /// [`Error::Random`].
    pub fn generate(author: &[u8; 32]) -> Result<Self> {
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|_| Error::Random)?;
        Ok(Self::for_author(author, nonce))
    }

    /// Whether this actor id was derived from `author`'s key.
    pub fn belongs_to(&self, author: &[u8; 32]) -> bool {
        self.0[..16] == Sha256::digest(author)[..16]
    }

    /// The part derived from the author's key, shared by all of that
    /// author's actors (one per process start).
    pub fn author_tag(&self) -> [u8; 16] {
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&self.0[..16]);
        tag
    }
}

impl fmt::Debug for ActorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ActorId({})", hex::encode(self.0))
    }
}

impl fmt::Display for ActorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The per-thread memo of decompressed keys answers exactly what
    /// decompressing answers: valid keys (cached or not) give the same key,
    /// bytes that are no point are refused however often valid keys were
    /// looked up in between, also once the memo has wrapped around.
    #[test]
    fn remembered_keys_decide_like_decompression() {
        let valid = SecretIdentity::generate().unwrap().public_bytes();
        let candidates: Vec<[u8; 32]> = (0..=255u8).map(|b| [b; 32]).collect();
        let invalid = candidates
            .iter()
            .filter(|c| VerifyingKey::from_bytes(c).is_err())
            .count();
        assert!(invalid > 0, "the candidates must include non-points");
        for _round in 0..2 {
            for c in &candidates {
                assert_eq!(
                    verifying_key(&valid).unwrap(),
                    VerifyingKey::from_bytes(&valid).unwrap()
                );
                assert_eq!(
                    PatientId::from_bytes(*c).is_ok(),
                    VerifyingKey::from_bytes(c).is_ok(),
                    "{c:?}"
                );
                if let Ok(key) = verifying_key(c) {
                    assert_eq!(key.as_bytes(), c);
                }
            }
        }
    }
}
