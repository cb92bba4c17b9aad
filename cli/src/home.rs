//! Where a user's medmesh state lives, and keeping it private: the home
//! directory and everything under it is the owner's alone (directories 0700,
//! files 0600), tightened — and said so — when found looser.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

/// The medmesh home directory: `node/` for a practice node, `patient/` for
/// a patient's keystore. Both may live in one home.
#[derive(Debug, Clone)]
pub(crate) struct Home {
    root: PathBuf,
}

impl Home {
    /// `--home`, else `MEDMESH_HOME` (clap reads it), else the platform data dir.
    pub(crate) fn resolve(explicit: Option<PathBuf>) -> Result<Self> {
        let root = match explicit {
            Some(root) => root,
            None => dirs::data_dir()
                .context("no platform data directory; pass --home DIR or set MEDMESH_HOME")?
                .join("medmesh"),
        };
        Ok(Self { root })
    }

    pub(crate) fn node_dir(&self) -> PathBuf {
        self.root.join("node")
    }

    pub(crate) fn patient_dir(&self) -> PathBuf {
        self.root.join("patient")
    }

    pub(crate) fn keystore_path(&self) -> PathBuf {
        self.patient_dir().join("keystore.mmks")
    }

    /// Creates `dir` (and parents) with mode 0700 where supported.
    pub(crate) fn ensure_private_dir(dir: &Path) -> Result<()> {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt as _;
            builder.mode(0o700);
        }
        builder
            .create(dir)
            .with_context(|| format!("creating directory {}", dir.display()))
    }

    /// Tightens the home and everything under it to the owner alone, and says
    /// on stderr what it changed: another local user must not read headers,
    /// grants, the audit log or keys (sled creates its files 0644).
    pub(crate) fn secure(&self) -> Result<()> {
        secure(&self.root)
    }
}

/// [`Home::secure`] for `dir` and what is under it (a node's store, once sled
/// has created its files).
pub(crate) fn secure(dir: &Path) -> Result<()> {
    for (path, old, new) in tighten(dir)? {
        eprintln!(
            "medmesh: {} was mode {old:04o}, open to other local users; tightened to {new:04o}",
            path.display()
        );
    }
    Ok(())
}

/// Tightens files medmesh has just made through a library that makes them
/// 0644 (sled's store), without a word: nothing was found open.
pub(crate) fn restrict_new(dir: &Path) -> Result<()> {
    tighten(dir).map(drop)
}

/// A path whose mode was changed: (path, old mode, new mode).
type Tightened = (PathBuf, u32, u32);

/// Sets directories under `root` (and `root`) to 0700 and files to 0600 where
/// group or others have any access. Symbolic links are neither followed nor
/// changed; a missing `root` is nothing to do; files that vanish meanwhile
/// (a running node's temporary files) are skipped.
#[cfg(unix)]
fn tighten(root: &Path) -> Result<Vec<Tightened>> {
    use std::os::unix::fs::PermissionsExt as _;

    let mut changed = Vec::new();
    let mut pending = vec![root.to_owned()];
    while let Some(path) = pending.pop() {
        let metadata = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading the mode of {}", path.display())),
        };
        let kind = metadata.file_type();
        if kind.is_symlink() {
            continue;
        }
        let old = metadata.permissions().mode() & 0o7777;
        let new = if kind.is_dir() { 0o700 } else { 0o600 };
        if old & 0o077 != 0 {
            match std::fs::set_permissions(&path, std::fs::Permissions::from_mode(new)) {
                Ok(()) => changed.push((path.clone(), old, new)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("tightening the mode of {}", path.display())),
            }
        }
        if kind.is_dir() {
            let entries = match std::fs::read_dir(&path) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("listing {}", path.display())),
            };
            for entry in entries {
                pending.push(entry.with_context(|| format!("listing {}", path.display()))?.path());
            }
        }
    }
    Ok(changed)
}

/// File modes are a unix idea; elsewhere the platform's ACLs apply.
#[cfg(not(unix))]
fn tighten(_root: &Path) -> Result<Vec<Tightened>> {
    Ok(Vec::new())
}
