//! The patient keystore on disk: creating it (`patient new`), opening and
//! saving it, and the passphrase (from `MEDMESH_PASSPHRASE` or a prompt).

use anyhow::{Context as _, Result, bail};
use medmesh_crypto::{Error as CryptoError, KdfParams, Keystore, SecretIdentity};
use serde_json::json;
use zeroize::Zeroizing;

use crate::home::Home;
use crate::output::Output;

pub(super) fn new(home: &Home, out: &Output) -> Result<()> {
    let path = home.keystore_path();
    if path.exists() {
        bail!(
            "a patient keystore already exists at {}; refusing to overwrite it (use another --home)",
            path.display()
        );
    }
    let passphrase = passphrase(true)?;
    crate::passphrase::check_strength(&passphrase, "keystore passphrase")?;
    Home::ensure_private_dir(&home.patient_dir())?;
    let keystore = Keystore::new(SecretIdentity::generate()?, KdfParams::DEFAULT);
    keystore
        .create(&path, passphrase.as_bytes())
        .with_context(|| format!("writing keystore at {}", path.display()))?;
    let did = keystore.patient().to_string();
    out.result(
        &json!({ "did": did }),
        &format!(
            "{did}\nkeystore: {} (keep your passphrase: it cannot be recovered)",
            path.display()
        ),
    );
    Ok(())
}

/// Opens the keystore with the passphrase from `MEDMESH_PASSPHRASE` or a
/// prompt; the passphrase comes back too, to save changes.
pub(crate) fn open_keystore(home: &Home) -> Result<(Keystore, Zeroizing<String>)> {
    let path = home.keystore_path();
    if !path.exists() {
        bail!(
            "no patient keystore at {}; create one with `medmesh patient new`",
            path.display()
        );
    }
    let passphrase = passphrase(false)?;
    match Keystore::open(&path, passphrase.as_bytes()) {
        Ok(keystore) => Ok((keystore, passphrase)),
        Err(CryptoError::KeystoreLocked) => {
            bail!(
                "wrong passphrase for the keystore at {} (or the file was altered)",
                path.display()
            )
        }
        Err(err) => Err(err).with_context(|| format!("reading keystore at {}", path.display())),
    }
}

pub(super) fn save_keystore(home: &Home, keystore: &Keystore, passphrase: &str) -> Result<()> {
    let path = home.keystore_path();
    keystore
        .save(&path, passphrase.as_bytes())
        .with_context(|| format!("saving keystore at {}", path.display()))
}

fn passphrase(confirm: bool) -> Result<Zeroizing<String>> {
    if let Ok(value) = std::env::var("MEDMESH_PASSPHRASE") {
        if value.is_empty() {
            bail!("MEDMESH_PASSPHRASE is empty; a keystore needs a passphrase");
        }
        return Ok(Zeroizing::new(value));
    }
    let first = Zeroizing::new(
        rpassword::prompt_password("keystore passphrase: ")
            .context("reading the passphrase (set MEDMESH_PASSPHRASE when there is no terminal)")?,
    );
    if first.is_empty() {
        bail!("an empty passphrase is not allowed");
    }
    if confirm {
        let second =
            Zeroizing::new(rpassword::prompt_password("repeat passphrase: ").context("reading the passphrase")?);
        if *first != *second {
            bail!("the passphrases differ; nothing was written");
        }
    }
    Ok(first)
}
