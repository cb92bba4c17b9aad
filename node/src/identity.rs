//! The node's identity key file, `node.key` in the data directory, mode 0600:
//! either the raw 32-byte ed25519 seed behind a short magic (the default, for
//! unattended start) or the seed sealed under a passphrase with
//! [`medmesh_crypto::SealedSecret`] (Argon2id → XChaCha20-Poly1305), when
//! `MEDMESH_NODE_PASSPHRASE` is set at init (DESIGN §4).

use std::path::{Path, PathBuf};

use medmesh_crypto::{KdfParams, SealedSecret, SecretIdentity, write_atomically};
use zeroize::Zeroizing;

use crate::{Error, Result};

/// File name of the node key inside the data directory.
pub const NODE_KEY_FILE: &str = "node.key";
/// Environment variable holding the passphrase that seals the node key.
pub const PASSPHRASE_ENV: &str = "MEDMESH_NODE_PASSPHRASE";
const PLAIN_MAGIC: &[u8; 24] = b"medmesh/node-key/plain/1";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// What [`open_identity`] found or did to the key file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFile {
    /// There was none: a new key was written (sealed under the passphrase, if any).
    Created,
    /// The key was read as it was (sealed and opened, or plain without a passphrase).
    Opened,
    /// The key was plain and a passphrase was given: it is now sealed under it.
    SealedInPlace,
}

/// Loads the node key from `dir/node.key`, or creates one (and `dir`).
///
/// With `passphrase`, a new key is sealed under it, a sealed key is opened
/// with it, and a plain key is sealed in place under it (atomically: a
/// temporary file, fsync, rename). Without one, a sealed key is refused.
///
/// # Errors
/// [`Error::NodeKeySealed`], [`Error::Io`], [`Error::Crypto`] (wrong
/// passphrase: `KeystoreLocked`; damaged file: `Malformed`).
pub fn load_or_create_identity(dir: &Path, passphrase: Option<&[u8]>) -> Result<SecretIdentity> {
    load_or_create_with(dir, passphrase, KdfParams::DEFAULT)
}

/// [`load_or_create_identity`] with explicit Argon2 costs (tests use cheap ones).
///
/// # Errors
/// As [`load_or_create_identity`].
pub fn load_or_create_with(dir: &Path, passphrase: Option<&[u8]>, params: KdfParams) -> Result<SecretIdentity> {
    open_identity(dir, passphrase, params).map(|(identity, _)| identity)
}

/// [`load_or_create_with`], saying what it found or did to the key file.
///
/// # Errors
/// As [`load_or_create_identity`].
pub fn open_identity(dir: &Path, passphrase: Option<&[u8]>, params: KdfParams) -> Result<(SecretIdentity, KeyFile)> {
    let path: PathBuf = dir.join(NODE_KEY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let bytes = Zeroizing::new(bytes);
            let identity = decode(&path, &bytes, passphrase)?;
            match passphrase {
                Some(p) if !SealedSecret::is_sealed(&bytes) => {
                    // The operator asked for a sealed key: never go on with a plain one.
                    let sealed = Zeroizing::new(SealedSecret::seal(identity.seed().as_ref(), p, params)?);
                    write_atomically(&path, &sealed)?;
                    tracing::info!(peer = %identity.practice_id()?, "sealed the plain node key in place");
                    Ok((identity, KeyFile::SealedInPlace))
                }
                _ => Ok((identity, KeyFile::Opened)),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            let identity = SecretIdentity::generate()?;
            let seed = identity.seed();
            let file = match passphrase {
                Some(p) => Zeroizing::new(SealedSecret::seal(seed.as_ref(), p, params)?),
                None => {
                    let mut v = Zeroizing::new(Vec::with_capacity(56));
                    v.extend_from_slice(PLAIN_MAGIC);
                    v.extend_from_slice(seed.as_ref());
                    v
                }
            };
            write_atomically(&path, &file)?;
            tracing::info!(peer = %identity.practice_id()?, sealed = passphrase.is_some(), "created node key");
            Ok((identity, KeyFile::Created))
        }
        Err(e) => Err(io(&path)(e)),
    }
}

fn decode(path: &Path, bytes: &[u8], passphrase: Option<&[u8]>) -> Result<SecretIdentity> {
    let seed: Zeroizing<Vec<u8>> = if SealedSecret::is_sealed(bytes) {
        let Some(p) = passphrase else {
            return Err(Error::NodeKeySealed(path.to_owned()));
        };
        SealedSecret::open(bytes, p)?
    } else if let Some(seed) = bytes.strip_prefix(PLAIN_MAGIC) {
        Zeroizing::new(seed.to_vec())
    } else {
        return Err(Error::Crypto(medmesh_crypto::Error::Malformed {
            kind: "node key file",
            reason: "unknown format",
        }));
    };
    let seed: &[u8; 32] = seed.as_slice().try_into().map_err(|_| {
        Error::Crypto(medmesh_crypto::Error::Malformed {
            kind: "node key file",
            reason: "seed is not 32 bytes",
        })
    })?;
    Ok(SecretIdentity::from_seed(seed))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHEAP: KdfParams = KdfParams {
        m_cost_kib: 64,
        t_cost: 1,
        p_cost: 1,
    };

    #[test]
    fn unsealed_round_trip_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_with(dir.path(), None, CHEAP).unwrap();
        let b = load_or_create_with(dir.path(), None, CHEAP).unwrap();
        assert_eq!(a.public_bytes(), b.public_bytes());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join(NODE_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_plain_key_met_with_a_passphrase_is_sealed_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let (plain, file) = open_identity(dir.path(), None, CHEAP).unwrap();
        assert_eq!(file, KeyFile::Created);
        let (same, file) = open_identity(dir.path(), Some(b"pw"), CHEAP).unwrap();
        assert_eq!(
            (same.public_bytes(), file),
            (plain.public_bytes(), KeyFile::SealedInPlace)
        );
        let raw = std::fs::read(dir.path().join(NODE_KEY_FILE)).unwrap();
        assert!(SealedSecret::is_sealed(&raw));
        assert!(
            !raw.windows(32).any(|w| w == plain.seed().as_slice()),
            "seed on disk in clear"
        );
        assert!(matches!(
            open_identity(dir.path(), None, CHEAP),
            Err(Error::NodeKeySealed(_))
        ));
        let (again, file) = open_identity(dir.path(), Some(b"pw"), CHEAP).unwrap();
        assert_eq!((again.public_bytes(), file), (plain.public_bytes(), KeyFile::Opened));
    }

    #[test]
    fn sealed_needs_the_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_with(dir.path(), Some(b"pw"), CHEAP).unwrap();
        let raw = std::fs::read(dir.path().join(NODE_KEY_FILE)).unwrap();
        assert!(
            !raw.windows(32).any(|w| w == a.seed().as_slice()),
            "seed on disk in clear"
        );
        assert!(matches!(
            load_or_create_with(dir.path(), None, CHEAP),
            Err(Error::NodeKeySealed(_))
        ));
        assert!(load_or_create_with(dir.path(), Some(b"nope"), CHEAP).is_err());
        let b = load_or_create_with(dir.path(), Some(b"pw"), CHEAP).unwrap();
        assert_eq!(a.public_bytes(), b.public_bytes());
    }
}
