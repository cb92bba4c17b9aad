use std::path::PathBuf;

/// Everything that can go wrong in medmesh-crypto.
///
/// Messages name the object kind and, where there is one, its id; they never
/// carry key bytes, plaintext or passphrases.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Input is larger than the cap for its kind; nothing was parsed.
    #[error("{kind} is {len} bytes, over the {max}-byte limit")]
    TooLarge {
        /// Object kind, e.g. "grant".
        kind: &'static str,
        /// Size of the input.
        len: usize,
        /// The cap for this kind.
        max: usize,
    },
    /// Input is not the structure its kind requires.
    #[error("malformed {kind}: {reason}")]
    Malformed {
        /// Object kind.
        kind: &'static str,
        /// What was wrong, without echoing the input.
        reason: &'static str,
    },
    /// Input decodes, but is not the one canonical encoding of its value.
    #[error("{kind} is not canonically encoded")]
    NonCanonical {
        /// Object kind.
        kind: &'static str,
    },
    /// A format version this build does not know; a newer node may have
    /// written it, so callers keep such items pending rather than reject them.
    #[error("unsupported {kind} format version {version}")]
    UnsupportedVersion {
        /// Object kind.
        kind: &'static str,
        /// The version found.
        version: u64,
    },
    /// The signature does not verify against the signer named in the object.
    #[error("bad signature on {kind}")]
    BadSignature {
        /// Object kind.
        kind: &'static str,
    },
    /// The signing key does not belong to the principal the object names.
    #[error("{kind} must be signed by {expected}")]
    WrongSigner {
        /// Object kind.
        kind: &'static str,
        /// Who must sign it.
        expected: &'static str,
    },
    /// Not a valid `did:key` for an ed25519 key.
    #[error("invalid did:key: {0}")]
    InvalidDid(&'static str),
    /// Not a PeerId with an inlined ed25519 key.
    #[error("invalid practice peer id: {0}")]
    InvalidPeerId(&'static str),
    /// A public key that is not a valid ed25519 point.
    #[error("invalid ed25519 public key")]
    InvalidPublicKey,
    /// A collection name medmesh does not know.
    #[error("unknown collection {0:?}")]
    UnknownCollection(String),
    /// A grant or revocation field outside its allowed values.
    #[error("invalid {field}: {reason}")]
    InvalidField {
        /// Field name.
        field: &'static str,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// The key share is addressed to someone else.
    #[error("key share for {collection} epoch {epoch} is not addressed to this key")]
    NotRecipient {
        /// Collection of the share.
        collection: &'static str,
        /// Epoch of the share.
        epoch: u64,
    },
    /// HPKE refused to open the share (tampered, or wrong recipient key).
    #[error("key share for {collection} epoch {epoch} does not open")]
    KeyShareOpen {
        /// Collection of the share.
        collection: &'static str,
        /// Epoch of the share.
        epoch: u64,
    },
    /// The key offered is not the one the envelope was sealed under.
    #[error("envelope {envelope} was sealed under another key")]
    WrongKey {
        /// Envelope id (hex).
        envelope: String,
    },
    /// Sealing a change of one record under the key of another: the key's
    /// patient or collection is not the record's.
    #[error("a {collection} change cannot be sealed under a key of another patient or collection")]
    KeyNotOfRecord {
        /// The record's collection.
        collection: &'static str,
    },
    /// The ciphertext does not hash to the value in the signed header.
    #[error("envelope {envelope}: ciphertext does not match its signed hash")]
    CiphertextHash {
        /// Envelope id (hex).
        envelope: String,
    },
    /// AEAD authentication failed.
    #[error("envelope {envelope}: decryption failed")]
    Decrypt {
        /// Envelope id (hex).
        envelope: String,
    },
    /// The decrypted change does not match the signed keyed change hash.
    #[error("envelope {envelope}: change does not match its signed keyed hash")]
    ChangeHash {
        /// Envelope id (hex).
        envelope: String,
    },
    /// A sealed snapshot does not open with the key offered.
    #[error("snapshot does not open: {reason}")]
    SnapshotOpen {
        /// Another key, or altered bytes.
        reason: &'static str,
    },
    /// Wrong passphrase, or the keystore file was altered.
    #[error("keystore does not open: wrong passphrase or corrupted file")]
    KeystoreLocked,
    /// Refused to overwrite an existing keystore.
    #[error("a keystore already exists at {0}")]
    KeystoreExists(PathBuf),
    /// File I/O on the keystore.
    #[error("keystore at {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Argon2 rejected its parameters.
    #[error("passphrase key derivation failed: {0}")]
    Kdf(&'static str),
    /// The operating system's randomness source failed.
    #[error("operating system randomness unavailable")]
    Random,
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
