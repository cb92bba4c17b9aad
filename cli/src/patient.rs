//! Patient commands: the keystore, and (as the layers land) grant, revoke,
//! read and export over libp2p.

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;
use medmesh_crypto::{Error as CryptoError, KdfParams, Keystore, SecretIdentity};
use serde_json::json;
use zeroize::Zeroizing;

use crate::home::Home;
use crate::output::Output;

#[derive(Debug, Subcommand)]
pub(crate) enum PatientCommand {
    /// Create the keystore and print the patient's did:key (refuses to overwrite).
    New,
    /// Print the patient's did:key.
    Id,
}

pub(crate) fn run(cmd: PatientCommand, home: &Home, out: &Output) -> Result<()> {
    match cmd {
        PatientCommand::New => new(home, out),
        PatientCommand::Id => {
            let keystore = open_keystore(home)?;
            let did = keystore.patient().to_string();
            out.result(&json!({ "did": did }), &did);
            Ok(())
        }
    }
}

fn new(home: &Home, out: &Output) -> Result<()> {
    let path = home.keystore_path();
    if path.exists() {
        bail!(
            "a patient keystore already exists at {}; refusing to overwrite it (use another --home)",
            path.display()
        );
    }
    let passphrase = passphrase(true)?;
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

/// Opens the keystore with the passphrase from `MEDMESH_PASSPHRASE` or a prompt.
pub(crate) fn open_keystore(home: &Home) -> Result<Keystore> {
    let path = home.keystore_path();
    if !path.exists() {
        bail!(
            "no patient keystore at {}; create one with `medmesh patient new`",
            path.display()
        );
    }
    let passphrase = passphrase(false)?;
    match Keystore::open(&path, passphrase.as_bytes()) {
        Ok(keystore) => Ok(keystore),
        Err(CryptoError::KeystoreLocked) => {
            bail!(
                "wrong passphrase for the keystore at {} (or the file was altered)",
                path.display()
            )
        }
        Err(err) => Err(err).with_context(|| format!("reading keystore at {}", path.display())),
    }
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
