//! The history of a resource ([`Version`]s, oldest first) and reading one
//! version of it (vread).

use std::sync::Arc;

use automerge::{ChangeHash, ReadDoc};

use super::index::VersionRef;
use super::{RecordDoc, RenderedResource, deleted_obj, version_id};
use crate::records::error::{Error, Result};
use crate::records::time::format_instant;
use crate::records::value::At;

/// One entry of a resource's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// `meta.versionId` of this version.
    pub version_id: String,
    /// The change that made this version.
    pub hash: ChangeHash,
    /// Change time, ms since the Unix epoch.
    pub time_ms: i64,
    /// Change time as a FHIR instant.
    pub last_updated: String,
    /// Whether this change deleted the resource.
    pub deleted: bool,
}

impl RecordDoc {
    /// The versions of a resource, oldest first: every change that touched it, ordered
    /// by (start op, actor) — an order that extends causality and is the same on every
    /// replica.
    ///
    /// # Errors
    /// [`Error::NotFound`] if no change ever touched the key.
    pub fn history(&self, key: &str) -> Result<Vec<Version>> {
        let refs = self.history_refs(key)?;
        Ok(refs
            .iter()
            .map(|r| Version {
                version_id: version_id(&r.hash),
                hash: r.hash,
                time_ms: r.time,
                last_updated: format_instant(r.time),
                deleted: r.deleted,
            })
            .collect())
    }

    fn history_refs(&self, key: &str) -> Result<&[VersionRef]> {
        self.index
            .key_ids
            .get(key)
            .and_then(|&k| self.index.history.get(k as usize))
            .filter(|h| !h.is_empty())
            .map(Vec::as_slice)
            .ok_or_else(|| Error::NotFound { key: key.to_owned() })
    }

    /// Renders one version of a resource: the document as of that change and every
    /// earlier change (in history order) that touched the resource.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::VersionNotFound`], [`Error::Deleted`] when that
    /// version is a deletion (or the resource was already deleted then).
    pub fn vread(&self, key: &str, version: &str) -> Result<Arc<RenderedResource>> {
        let refs = self.history_refs(key)?;
        let pos = refs
            .iter()
            .position(|r| version_id(&r.hash) == version)
            .ok_or_else(|| Error::VersionNotFound {
                key: key.to_owned(),
                version_id: version.to_owned(),
            })?;
        let Some(v) = refs.get(pos) else {
            return Err(Error::VersionNotFound {
                key: key.to_owned(),
                version_id: version.to_owned(),
            });
        };
        let heads: Vec<ChangeHash> = refs.iter().take(pos + 1).map(|r| r.hash).collect();
        if v.deleted || matches!(self.doc.get_at(deleted_obj(), key, &heads), Ok(Some(_))) {
            return Err(Error::Deleted { key: key.to_owned() });
        }
        Ok(Arc::new(self.render(key, v, At::Heads(&heads))?))
    }
}
