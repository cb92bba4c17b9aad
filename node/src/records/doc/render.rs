//! Reading a [`RecordDoc`]: rendering resources as FHIR JSON
//! ([`RenderedResource`]) and the per-document cache of rendered resources.

use std::collections::BTreeMap;
use std::sync::{Arc, MutexGuard};

use automerge::{ChangeHash, ObjType, ReadDoc};
use serde_json::{Map, Value};

use super::index::VersionRef;
use super::{RecordDoc, resources_obj, split_key, version_id};
use crate::records::error::{Error, Result};
use crate::records::time::format_instant;
use crate::records::value::{self, At};

/// One resource rendered as FHIR JSON, with its serialized bytes (what the gateway sends).
#[derive(Debug, Clone, PartialEq)]
pub struct RenderedResource {
    /// `"{resourceType}/{id}"`.
    pub key: String,
    /// `meta.versionId`: first 16 hex characters of the hash of the last change.
    pub version_id: String,
    /// Hash of the change this version is.
    pub hash: ChangeHash,
    /// `meta.lastUpdated` as a FHIR instant (`…Z`).
    pub last_updated: String,
    /// The time of that change, ms since the Unix epoch.
    pub last_updated_ms: i64,
    /// The resource: `resourceType`, `id`, `meta` first, then the stored elements.
    pub json: Value,
    /// `json` serialized (compact), cached because serializing is cheap but rendering is not.
    pub bytes: Vec<u8>,
}

impl RenderedResource {
    /// The resource type (the part of the key before `/`).
    pub fn resource_type(&self) -> &str {
        self.key.split_once('/').map_or(&*self.key, |(t, _)| t)
    }

    /// The logical id (the part of the key after `/`).
    pub fn id(&self) -> &str {
        self.key.split_once('/').map_or("", |(_, id)| id)
    }
}

/// Rendered resources by key. Once [`RecordDoc::resources`] has walked the
/// document, `complete` says every live resource is here except the `stale`
/// keys (those a change touched since), so the next listing re-renders only
/// those instead of walking Automerge's key index again (which costs ~0.6 µs
/// a resource: most of a warm `$everything`).
#[derive(Default)]
pub(super) struct RenderCache {
    by_key: BTreeMap<String, Arc<RenderedResource>>,
    complete: bool,
    stale: Vec<String>,
}

impl RecordDoc {
    fn cache(&self) -> MutexGuard<'_, RenderCache> {
        // A poisoned cache only means a reader panicked mid-insert; entries are whole Arcs.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn invalidate<'k>(&self, keys: impl IntoIterator<Item = &'k str>) {
        let mut cache = self.cache();
        for k in keys {
            cache.by_key.remove(k);
            if cache.complete {
                cache.stale.push(k.to_owned());
            }
        }
        // Many writes and no listing: walking the document again is cheaper
        // than remembering them all.
        if cache.stale.len() > cache.by_key.len() + 1024 {
            cache.complete = false;
            cache.stale = Vec::new();
        }
    }

    /// Reads a live resource (cached).
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::Deleted`], or [`Error::CorruptResource`].
    pub fn read(&self, key: &str) -> Result<Arc<RenderedResource>> {
        if let Some(r) = self.cache().by_key.get(key) {
            return Ok(Arc::clone(r));
        }
        self.check_live(key)?;
        let version = self
            .index
            .key_ids
            .get(key)
            .and_then(|&k| self.index.history.get(k as usize))
            .and_then(|h| h.last())
            .ok_or(Error::CorruptResource {
                key: key.to_owned(),
                reason: "resource has no history",
            })?;
        let rendered = Arc::new(self.render(key, version, At::Now)?);
        self.cache().by_key.insert(key.to_owned(), Arc::clone(&rendered));
        Ok(rendered)
    }

    /// Every live resource, rendered (from the cache where possible), in key order.
    ///
    /// # Errors
    /// [`Error::CorruptResource`] if a resource does not render.
    pub fn resources(&self) -> Result<Vec<Arc<RenderedResource>>> {
        // Not complete while the stale keys are re-rendered, so a concurrent
        // listing walks the document instead of missing them.
        let stale = {
            let mut cache = self.cache();
            std::mem::take(&mut cache.complete).then(|| std::mem::take(&mut cache.stale))
        };
        let keys = match stale {
            // Only what changed since the last listing needs rendering.
            Some(stale) => stale,
            None => self.keys(),
        };
        for key in &keys {
            match self.read(key) {
                Ok(_) | Err(Error::Deleted { .. } | Error::NotFound { .. }) => {}
                // Listed again in full next time.
                Err(e) => return Err(e),
            }
        }
        let mut cache = self.cache();
        cache.complete = true;
        Ok(cache.by_key.values().cloned().collect())
    }

    pub(super) fn render(&self, key: &str, version: &VersionRef, at: At<'_>) -> Result<RenderedResource> {
        let corrupt = |reason| Error::CorruptResource {
            key: key.to_owned(),
            reason,
        };
        let (rtype, id) = split_key(key)?;
        let found = match at {
            At::Now => self.doc.get(resources_obj(), key),
            At::Heads(h) => self.doc.get_at(resources_obj(), key, h),
        }
        .map_err(|source| Error::Automerge {
            key: key.to_owned(),
            source: Box::new(source),
        })?;
        let body_id = match found {
            Some((v, id)) if v.to_objtype() == Some(ObjType::Map) => id,
            Some(_) => return Err(corrupt("resource body is not a map")),
            None => return Err(Error::NotFound { key: key.to_owned() }),
        };
        let body = value::render_map(&self.doc, &body_id, at).map_err(corrupt)?;
        let json = assemble(rtype, id, version, body);
        let bytes = serde_json::to_vec(&json).map_err(|_| corrupt("does not serialize"))?;
        Ok(RenderedResource {
            key: key.to_owned(),
            version_id: version_id(&version.hash),
            hash: version.hash,
            last_updated: format_instant(version.time),
            last_updated_ms: version.time,
            json,
            bytes,
        })
    }
}

/// Puts `resourceType`, `id` and `meta` (derived version fields first) before the
/// stored elements.
fn assemble(rtype: &str, id: &str, version: &VersionRef, body: Map<String, Value>) -> Value {
    let mut out = Map::with_capacity(body.len() + 3);
    out.insert("resourceType".into(), Value::String(rtype.to_owned()));
    out.insert("id".into(), Value::String(id.to_owned()));
    let mut meta = Map::new();
    meta.insert("versionId".into(), Value::String(version_id(&version.hash)));
    meta.insert("lastUpdated".into(), Value::String(format_instant(version.time)));
    let mut rest = Map::with_capacity(body.len());
    for (k, v) in body {
        match (k.as_str(), v) {
            ("meta", Value::Object(stored)) => {
                for (mk, mv) in stored {
                    if mk != "versionId" && mk != "lastUpdated" {
                        meta.insert(mk, mv);
                    }
                }
            }
            ("resourceType" | "id", _) => {}
            (_, v) => {
                rest.insert(k, v);
            }
        }
    }
    out.insert("meta".into(), Value::Object(meta));
    out.extend(rest);
    Value::Object(out)
}
