//! Where a user's medmesh state lives.

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
}
