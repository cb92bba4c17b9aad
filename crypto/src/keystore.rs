//! The patient's keystore: their secret key, their collection keys, the
//! grants and revocations they issued and the last audit checkpoint each
//! node showed them, in one file encrypted under a
//! passphrase (Argon2id → XChaCha20-Poly1305), written atomically, mode 0600.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{Aead as _, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use ciborium::Value;
use zeroize::Zeroizing;

use crate::canon::{self, Fields};
use crate::checkpoint::AuditCheckpoint;
use crate::consent::{Grant, GrantId, Revocation};
use crate::id::{PatientId, PracticeId, SecretIdentity, Timestamp};
use crate::keys::{EpochKey, KeyId};
use crate::{Error, Result};

const MAGIC: &str = "medmesh/keystore/v1";
/// Largest keystore file read.
pub const MAX_KEYSTORE_BYTES: usize = 16 * 1024 * 1024;
const MAX_ITEMS: usize = 100_000;

/// Argon2id cost, stored in the file so it can be raised later.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_cost_kib: u32,
    /// Passes.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
}

impl KdfParams {
    /// 64 MiB, 3 passes, 1 lane: a fraction of a second on a laptop.
    pub const DEFAULT: Self = Self {
        m_cost_kib: 64 * 1024,
        t_cost: 3,
        p_cost: 1,
    };

    /// Refuses costs a hostile file could use to exhaust memory or time.
    fn check(&self) -> Result<()> {
        if self.m_cost_kib > 1024 * 1024 || self.t_cost > 64 || self.p_cost > 16 {
            return Err(Error::Kdf("cost parameters out of range"));
        }
        Ok(())
    }

    fn derive(&self, passphrase: &[u8], salt: &[u8; 16]) -> Result<Zeroizing<[u8; 32]>> {
        self.check()?;
        let params = Params::new(self.m_cost_kib, self.t_cost, self.p_cost, Some(32))
            .map_err(|_| Error::Kdf("invalid cost parameters"))?;
        let mut key = Zeroizing::new([0u8; 32]);
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password_into(passphrase, salt, key.as_mut())
            .map_err(|_| Error::Kdf("argon2 failed"))?;
        Ok(key)
    }
}

/// Largest signed address record (a practice's addresses, signed by it)
/// that a keystore, a node or a sync message carries.
pub const MAX_ADDRESS_RECORD_BYTES: usize = 4096;

/// What a patient's keystore holds, in memory.
#[derive(Debug)]
pub struct Keystore {
    identity: SecretIdentity,
    /// Every collection key the patient made, all epochs.
    pub keys: Vec<EpochKey>,
    /// Every grant the patient issued.
    pub grants: Vec<Grant>,
    /// Every revocation the patient issued.
    pub revocations: Vec<Revocation>,
    /// The last audit checkpoint each node showed the patient (one per
    /// node), to tell a later answer that lost entries or forked.
    pub audit_checkpoints: Vec<AuditCheckpoint>,
    /// Grants signed here that no node has taken yet (the node was down,
    /// or refused): in force nowhere, so not live, not sent along with
    /// other commands, and given no new keys until submitted.
    pub unsubmitted: Vec<GrantId>,
    /// The patient's address book: the newest signed address record of
    /// each practice, as a node handed it over (a libp2p signed peer
    /// record; the CLI verifies it before keeping it and again before use —
    /// this crate only stores the bytes).
    pub practices: Vec<Vec<u8>>,
    params: KdfParams,
}

impl Keystore {
    /// A new keystore for `identity`, not yet written.
    pub fn new(identity: SecretIdentity, params: KdfParams) -> Self {
        Self {
            identity,
            keys: Vec::new(),
            grants: Vec::new(),
            revocations: Vec::new(),
            audit_checkpoints: Vec::new(),
            unsubmitted: Vec::new(),
            practices: Vec::new(),
            params,
        }
    }

    /// The audit checkpoint last remembered for `node`.
    pub fn audit_checkpoint(&self, node: &PracticeId) -> Option<&AuditCheckpoint> {
        self.audit_checkpoints.iter().find(|c| c.terms().node == *node)
    }

    /// Remembers `checkpoint` as its node's last, replacing the previous one.
    pub fn remember_audit_checkpoint(&mut self, checkpoint: AuditCheckpoint) {
        self.audit_checkpoints
            .retain(|c| c.terms().node != checkpoint.terms().node);
        self.audit_checkpoints.push(checkpoint);
    }

    /// The patient's secret identity.
    pub fn identity(&self) -> &SecretIdentity {
        &self.identity
    }

    /// The patient.
    pub fn patient(&self) -> PatientId {
        self.identity.patient_id()
    }

    /// The grants issued here that are neither revoked nor expired at `now`
    /// (one whose not-before is still ahead counts: it will come into force).
    pub fn live_grants(&self, now: Timestamp) -> impl Iterator<Item = &Grant> {
        self.grants.iter().filter(move |grant| {
            !self.revocations.iter().any(|r| r.revokes(grant))
                && grant.terms().expires.is_none_or(|e| now < e)
                && !self.unsubmitted.contains(&grant.id())
        })
    }

    /// Whether some node has taken `grant` (see [`Keystore::unsubmitted`]).
    pub fn is_submitted(&self, grant: &Grant) -> bool {
        !self.unsubmitted.contains(&grant.id())
    }

    /// Writes a new keystore; refuses to overwrite an existing file.
    ///
    /// # Errors
    /// [`Error::KeystoreExists`], I/O errors.
    pub fn create(&self, path: &Path, passphrase: &[u8]) -> Result<()> {
        if path.exists() {
            return Err(Error::KeystoreExists(path.to_owned()));
        }
        let bytes = self.seal(passphrase)?;
        // The check above is only a fast path: the final step links the new
        // file into place and fails if a file appeared there meanwhile.
        write_file(path, &bytes, false)
    }

    /// Encrypts and writes the keystore atomically: a temporary file in the
    /// same directory (mode 0600), fsync, rename, fsync of the directory.
    /// A crash leaves either the old file or the new one, never a mix.
    ///
    /// # Errors
    /// I/O and KDF errors.
    pub fn save(&self, path: &Path, passphrase: &[u8]) -> Result<()> {
        let bytes = self.seal(passphrase)?;
        write_atomically(path, &bytes)
    }

    /// Reads and decrypts a keystore.
    ///
    /// # Errors
    /// [`Error::KeystoreLocked`] for a wrong passphrase or altered file;
    /// I/O errors (a missing file is `Io` with `NotFound`).
    pub fn open(path: &Path, passphrase: &[u8]) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_owned(),
            source,
        };
        let len = fs::metadata(path).map_err(io)?.len();
        if len > MAX_KEYSTORE_BYTES as u64 {
            return Err(Error::TooLarge {
                kind: "keystore",
                len: usize::try_from(len).unwrap_or(usize::MAX),
                max: MAX_KEYSTORE_BYTES,
            });
        }
        let bytes = fs::read(path).map_err(io)?;
        Self::unseal(&bytes, passphrase)
    }

    fn seal(&self, passphrase: &[u8]) -> Result<Vec<u8>> {
        let mut salt = [0u8; 16];
        let mut nonce = [0u8; 24];
        getrandom::fill(&mut salt).map_err(|_| Error::Random)?;
        getrandom::fill(&mut nonce).map_err(|_| Error::Random)?;
        self.seal_with(passphrase, salt, nonce)
    }

    /// The file bytes for a given salt and nonce (test vectors; `seal` draws them).
    pub(crate) fn seal_with(&self, passphrase: &[u8], salt: [u8; 16], nonce: [u8; 24]) -> Result<Vec<u8>> {
        let header = header_value(&self.params, &salt, &nonce);
        let aad = canon::encode(&header);
        let mut contents = self.contents_value();
        let plain = canon::encode_secret(&contents, self.contents_capacity());
        canon::zeroize_value(&mut contents);
        let key = self.params.derive(passphrase, &salt)?;
        let ciphertext = XChaCha20Poly1305::new((&*key).into())
            .encrypt(&XNonce::from(nonce), Payload { msg: &plain, aad: &aad })
            .map_err(|_| Error::Malformed {
                kind: "keystore",
                reason: "too large to seal",
            })?;
        Ok(canon::encode(&Value::Array(vec![header, canon::bytes(&ciphertext)])))
    }

    pub(crate) fn unseal(bytes: &[u8], passphrase: &[u8]) -> Result<Self> {
        let value = canon::decode("keystore", bytes, MAX_KEYSTORE_BYTES, 16)?;
        let mut f = Fields::new("keystore", value, 2)?;
        let header = f.value()?;
        let ciphertext = f.byte_vec(MAX_KEYSTORE_BYTES)?;
        let aad = canon::encode(&header);
        let mut h = Fields::new("keystore", header, 6)?;
        if h.text(64)? != MAGIC {
            return Err(Error::Malformed {
                kind: "keystore",
                reason: "not a medmesh keystore",
            });
        }
        let small = |v: u64| u32::try_from(v).map_err(|_| Error::Kdf("cost parameters out of range"));
        let params = KdfParams {
            m_cost_kib: small(h.uint()?)?,
            t_cost: small(h.uint()?)?,
            p_cost: small(h.uint()?)?,
        };
        let salt: [u8; 16] = h.bytes()?;
        let nonce: [u8; 24] = h.bytes()?;
        let key = params.derive(passphrase, &salt)?;
        let plain = Zeroizing::new(
            XChaCha20Poly1305::new((&*key).into())
                .decrypt(
                    &XNonce::from(nonce),
                    Payload {
                        msg: &ciphertext,
                        aad: &aad,
                    },
                )
                .map_err(|_| Error::KeystoreLocked)?,
        );
        let contents = canon::decode_secret("keystore contents", &plain, MAX_KEYSTORE_BYTES, 8 * MAX_ITEMS)?;
        Self::from_contents(contents, params)
    }

    /// An upper bound on the encoded contents, so the buffer never reallocates.
    fn contents_capacity(&self) -> usize {
        let blobs: usize = self.grants.iter().map(|g| g.encoded().len() + 9).sum::<usize>()
            + self.revocations.iter().map(|r| r.encoded().len() + 9).sum::<usize>()
            + self
                .audit_checkpoints
                .iter()
                .map(|c| c.encoded().len() + 9)
                .sum::<usize>();
        let records: usize = self.practices.iter().map(|r| r.len() + 9).sum();
        64 + 96 * self.keys.len() + 24 * self.unsubmitted.len() + blobs + records
    }

    fn contents_value(&self) -> Value {
        let mut fields = vec![
            canon::bytes(self.identity.seed().as_ref()),
            Value::Array(
                self.keys
                    .iter()
                    .map(|k| {
                        Value::Array(vec![
                            canon::text(k.collection.as_str()),
                            canon::uint(k.epoch),
                            canon::bytes(&k.key_id.0),
                            canon::bytes(k.secret()),
                        ])
                    })
                    .collect(),
            ),
            Value::Array(self.grants.iter().map(|g| canon::bytes(g.encoded())).collect()),
            Value::Array(self.revocations.iter().map(|r| canon::bytes(r.encoded())).collect()),
        ];
        // A fifth, sixth and seventh field only when there is something in
        // them (or in a later one), so keystores without checkpoints,
        // unsubmitted grants or an address book keep the layout older CLIs read.
        let book = !self.practices.is_empty();
        if !self.audit_checkpoints.is_empty() || !self.unsubmitted.is_empty() || book {
            fields.push(Value::Array(
                self.audit_checkpoints
                    .iter()
                    .map(|c| canon::bytes(c.encoded()))
                    .collect(),
            ));
        }
        if !self.unsubmitted.is_empty() || book {
            fields.push(Value::Array(
                self.unsubmitted.iter().map(|id| canon::bytes(&id.0)).collect(),
            ));
        }
        if book {
            fields.push(Value::Array(self.practices.iter().map(|r| canon::bytes(r)).collect()));
        }
        Value::Array(fields)
    }

    fn from_contents(value: Value, params: KdfParams) -> Result<Self> {
        let len = match &value {
            Value::Array(a) if (5..=7).contains(&a.len()) => a.len(),
            _ => 4,
        };
        let mut f = Fields::new("keystore contents", value, len)?;
        let seed = f.secret_bytes::<32>()?;
        let identity = SecretIdentity::from_seed(&seed);
        let patient = identity.patient_id();
        let keys = f
            .array(MAX_ITEMS)?
            .into_iter()
            .map(|entry| {
                let mut k = Fields::new("keystore key", entry, 4)?;
                let collection = k.text(16)?.parse()?;
                let epoch = k.uint()?;
                let key_id = KeyId(k.bytes()?);
                let key = k.secret_bytes::<32>()?;
                Ok(EpochKey::from_parts(patient, collection, epoch, key_id, key))
            })
            .collect::<Result<Vec<_>>>()?;
        let blob = |v: Value| match v {
            Value::Bytes(b) => Ok(b),
            _ => Err(Error::Malformed {
                kind: "keystore contents",
                reason: "expected byte string",
            }),
        };
        let grants = f
            .array(MAX_ITEMS)?
            .into_iter()
            .map(|v| Grant::decode(&blob(v)?))
            .collect::<Result<Vec<_>>>()?;
        let revocations = f
            .array(MAX_ITEMS)?
            .into_iter()
            .map(|v| Revocation::decode(&blob(v)?))
            .collect::<Result<Vec<_>>>()?;
        let audit_checkpoints = if len >= 5 {
            f.array(MAX_ITEMS)?
                .into_iter()
                .map(|v| AuditCheckpoint::decode(&blob(v)?))
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let unsubmitted = if len >= 6 {
            f.array(MAX_ITEMS)?
                .into_iter()
                .map(|v| {
                    let id: [u8; 16] = blob(v)?.try_into().map_err(|_| Error::Malformed {
                        kind: "keystore contents",
                        reason: "a grant id is 16 bytes",
                    })?;
                    Ok(GrantId(id))
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let practices = if len == 7 {
            f.array(MAX_ITEMS)?
                .into_iter()
                .map(|v| match blob(v)? {
                    b if b.len() <= MAX_ADDRESS_RECORD_BYTES => Ok(b),
                    _ => Err(Error::Malformed {
                        kind: "keystore contents",
                        reason: "an address record is at most 4 KiB",
                    }),
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        Ok(Self {
            identity,
            keys,
            grants,
            revocations,
            audit_checkpoints,
            unsubmitted,
            practices,
            params,
        })
    }
}

fn header_value(params: &KdfParams, salt: &[u8; 16], nonce: &[u8; 24]) -> Value {
    Value::Array(vec![
        canon::text(MAGIC),
        canon::uint(params.m_cost_kib.into()),
        canon::uint(params.t_cost.into()),
        canon::uint(params.p_cost.into()),
        canon::bytes(salt),
        canon::bytes(nonce),
    ])
}

/// Writes `bytes` to `path` atomically with mode 0600. Shared with callers
/// that keep other secrets (a node's key file, its gateway token).
///
/// # Errors
/// [`Error::Io`].
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file(path, bytes, true)
}

/// Writes a temporary file (mode 0600, fsynced), then renames it over
/// `path` (`overwrite`) or hard-links it to `path`, which fails if `path`
/// exists ([`Error::KeystoreExists`]); then fsyncs the directory.
fn write_file(path: &Path, bytes: &[u8], overwrite: bool) -> Result<()> {
    let io = |p: &Path| {
        let p: PathBuf = p.to_owned();
        move |source| Error::Io { path: p, source }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut suffix = [0u8; 8];
    getrandom::fill(&mut suffix).map_err(|_| Error::Random)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.{}.tmp", hex::encode(suffix)));
    let result = (|| {
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp).map_err(io(&tmp))?;
        file.write_all(bytes).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        if overwrite {
            fs::rename(&tmp, path).map_err(io(path))?;
        } else {
            fs::hard_link(&tmp, path).map_err(|source| {
                if source.kind() == std::io::ErrorKind::AlreadyExists {
                    Error::KeystoreExists(path.to_owned())
                } else {
                    Error::Io {
                        path: path.to_owned(),
                        source,
                    }
                }
            })?;
            fs::remove_file(&tmp).map_err(io(&tmp))?;
        }
        #[cfg(unix)]
        fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
