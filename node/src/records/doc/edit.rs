//! Local writes: create, update (three-way), delete and [`RecordDoc::edit`]
//! (several writes as one change); each makes exactly one Automerge change
//! and returns its bytes for the store to seal.

use std::collections::HashSet;
use std::sync::Arc;

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, AutomergeError, ChangeHash, ReadDoc, ScalarValue};
use serde_json::{Map, Value};

use super::index::Overlay;
use super::{
    GENESIS_ACTOR, RecordDoc, RenderedResource, deleted_obj, resource_key, resources_obj, split_key, version_id,
};
use crate::records::error::{Error, Result};
use crate::records::value;

/// What a local write produced: the one Automerge change to seal and store.
#[derive(Debug, Clone)]
pub struct Written {
    /// The resource key written.
    pub key: String,
    /// The change's hash.
    pub hash: ChangeHash,
    /// The change's raw bytes (`Change::raw_bytes`), to seal into an envelope.
    pub change: Vec<u8>,
    /// The resource's new `meta.versionId`.
    pub version_id: String,
    /// The change time (ms since the Unix epoch), as passed by the caller.
    pub time_ms: i64,
    /// The resource as now rendered; `None` after a delete.
    pub resource: Option<Arc<RenderedResource>>,
}

/// One write of [`RecordDoc::edit`]; the same checks and effects as the
/// single-write methods of the same name.
#[derive(Debug, Clone, Copy)]
pub enum Edit<'a> {
    /// As [`RecordDoc::create`].
    Create {
        /// The server-assigned id.
        id: &'a str,
        /// The resource.
        resource: &'a Value,
    },
    /// As [`RecordDoc::update`].
    Update {
        /// `"{resourceType}/{id}"`.
        key: &'a str,
        /// The version the client read.
        base: &'a Value,
        /// What it submitted.
        submitted: &'a Value,
    },
    /// As [`RecordDoc::delete`].
    Delete {
        /// `"{resourceType}/{id}"`.
        key: &'a str,
    },
}

/// What one [`Edit`] did, at the same position.
#[derive(Debug, Clone)]
pub enum Edited {
    /// Created; the resource as now rendered.
    Created(Arc<RenderedResource>),
    /// Updated; the resource as now rendered.
    Updated(Arc<RenderedResource>),
    /// An update identical to its base: nothing written; the current resource.
    Unchanged(Arc<RenderedResource>),
    /// Deleted (the key).
    Deleted(String),
}

/// The one change [`RecordDoc::edit`] made.
#[derive(Debug, Clone)]
pub struct MadeChange {
    /// The change's hash.
    pub hash: ChangeHash,
    /// Its raw bytes (`Change::raw_bytes`), to seal into an envelope.
    pub change: Vec<u8>,
    /// The `meta.versionId` of every resource it touched.
    pub version_id: String,
    /// The change time (ms since the Unix epoch), as passed by the caller.
    pub time_ms: i64,
}

/// What [`RecordDoc::edit`] did.
#[derive(Debug, Clone)]
pub struct Edits {
    /// The change; `None` when every edit was an update that changed nothing.
    pub change: Option<MadeChange>,
    /// One outcome per edit, in order.
    pub outcomes: Vec<Edited>,
}

/// A [`RecordDoc::edit`] that failed; the document is as it was.
#[derive(Debug, thiserror::Error)]
#[error("edit {edit}: {error}")]
pub struct EditError {
    /// Position of the edit at fault.
    pub edit: usize,
    /// Why.
    #[source]
    pub error: Error,
}

/// An edit checked against the document, ready to be made.
enum Planned {
    Create {
        key: String,
        body: Map<String, Value>,
    },
    Update {
        key: String,
        base: Map<String, Value>,
        submitted: Map<String, Value>,
    },
    Unchanged {
        key: String,
    },
    Delete {
        key: String,
    },
}

impl Planned {
    fn key(&self) -> &str {
        match self {
            Self::Create { key, .. } | Self::Update { key, .. } | Self::Unchanged { key } | Self::Delete { key } => key,
        }
    }
}

impl RecordDoc {
    /// Creates a resource with the server-assigned `id`, as one change by `actor` at
    /// `time_ms`. `id` and `meta.versionId`/`meta.lastUpdated` in the body are ignored.
    ///
    /// # Errors
    /// [`Error::InvalidResource`] (not an object, no `resourceType`, a `null`),
    /// [`Error::InvalidKey`], [`Error::AlreadyExists`] (also for a deleted key).
    pub fn create(&mut self, actor: &ActorId, time_ms: i64, id: &str, resource: &Value) -> Result<Written> {
        let planned = self.plan(&Edit::Create { id, resource })?;
        let key = planned.key().to_owned();
        let made = self
            .write(actor, time_ms, std::slice::from_ref(&planned))
            .map_err(|e| e.error)?;
        self.written(key, time_ms, made, "create made no change")
    }

    /// Three-way update: writes only what differs between `base` (the version the
    /// client read) and `submitted`, so peers' edits to other elements since `base`
    /// are kept. Returns `None` when nothing differs (no change is made).
    ///
    /// # Errors
    /// [`Error::NotFound`] / [`Error::Deleted`] (no update-as-create),
    /// [`Error::InvalidResource`] when `submitted`'s `resourceType`/`id` do not match
    /// `key` or it holds a `null`.
    pub fn update(
        &mut self,
        actor: &ActorId,
        time_ms: i64,
        key: &str,
        base: &Value,
        submitted: &Value,
    ) -> Result<Option<Written>> {
        let planned = self.plan(&Edit::Update { key, base, submitted })?;
        if matches!(planned, Planned::Unchanged { .. }) {
            return Ok(None);
        }
        let made = self
            .write(actor, time_ms, std::slice::from_ref(&planned))
            .map_err(|e| e.error)?;
        self.written(key.to_owned(), time_ms, made, "update made no change")
            .map(Some)
    }

    /// Deletes a resource: one change that writes its tombstone. The body and its
    /// history stay.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::Deleted`].
    pub fn delete(&mut self, actor: &ActorId, time_ms: i64, key: &str) -> Result<Written> {
        let planned = self.plan(&Edit::Delete { key })?;
        let made = self
            .write(actor, time_ms, std::slice::from_ref(&planned))
            .map_err(|e| e.error)?;
        self.written(key.to_owned(), time_ms, made, "delete made no change")
    }

    /// Several writes as **one** Automerge change by `actor` at `time_ms` (a FHIR
    /// transaction's writes to this document): every resource it touches gets the
    /// same new `meta.versionId`, the change's. All edits are checked before any is
    /// made, so an error leaves the document as it was. Updates that change nothing
    /// make no change; when all of them are such, no change is made at all.
    ///
    /// # Errors
    /// [`Error::DuplicateEdit`] when two edits name one resource; otherwise the
    /// errors of [`create`](Self::create), [`update`](Self::update) and
    /// [`delete`](Self::delete), for the first edit that fails.
    pub fn edit(&mut self, actor: &ActorId, time_ms: i64, edits: &[Edit<'_>]) -> std::result::Result<Edits, EditError> {
        let at = |edit: usize| move |error: Error| EditError { edit, error };
        let mut keys = HashSet::with_capacity(edits.len());
        let mut planned = Vec::with_capacity(edits.len());
        for (i, edit) in edits.iter().enumerate() {
            let p = self.plan(edit).map_err(at(i))?;
            if !keys.insert(p.key().to_owned()) {
                return Err(at(i)(Error::DuplicateEdit {
                    key: p.key().to_owned(),
                }));
            }
            planned.push(p);
        }
        let made = self.write(actor, time_ms, &planned)?;
        let mut outcomes = Vec::with_capacity(planned.len());
        for (i, p) in planned.iter().enumerate() {
            let read = |key: &str| self.read(key).map_err(at(i));
            outcomes.push(match p {
                Planned::Create { key, .. } => Edited::Created(read(key)?),
                Planned::Update { key, .. } => Edited::Updated(read(key)?),
                Planned::Unchanged { key } => Edited::Unchanged(read(key)?),
                Planned::Delete { key } => Edited::Deleted(key.clone()),
            });
        }
        Ok(Edits {
            change: made.map(|(hash, change)| MadeChange {
                hash,
                change,
                version_id: version_id(&hash),
                time_ms,
            }),
            outcomes,
        })
    }

    /// Checks one edit against the document and the record model, without writing.
    fn plan(&self, edit: &Edit<'_>) -> Result<Planned> {
        match *edit {
            Edit::Create { id, resource } => {
                let map = resource.as_object().ok_or(Error::InvalidResource {
                    key: id.to_owned(),
                    reason: "not a JSON object",
                })?;
                let rtype = map
                    .get("resourceType")
                    .and_then(Value::as_str)
                    .ok_or(Error::InvalidResource {
                        key: id.to_owned(),
                        reason: "missing resourceType",
                    })?;
                let key = resource_key(rtype, id)?;
                let body = stored_body(&key, map)?;
                if self.body_exists(&key) || self.is_deleted(&key) {
                    return Err(Error::AlreadyExists { key });
                }
                Ok(Planned::Create { key, body })
            }
            Edit::Update { key, base, submitted } => {
                let (rtype, id) = split_key(key)?;
                self.check_live(key)?;
                let invalid = |reason| Error::InvalidResource {
                    key: key.to_owned(),
                    reason,
                };
                let sub = submitted.as_object().ok_or(invalid("not a JSON object"))?;
                if sub.get("resourceType").and_then(Value::as_str) != Some(rtype) {
                    return Err(invalid("resourceType does not match the key"));
                }
                if let Some(sid) = sub.get("id")
                    && sid.as_str() != Some(id)
                {
                    return Err(invalid("id does not match the key"));
                }
                let base = base.as_object().ok_or(invalid("base is not a JSON object"))?;
                let base = stored_body(key, base)?;
                let submitted = stored_body(key, sub)?;
                if base == submitted {
                    return Ok(Planned::Unchanged { key: key.to_owned() });
                }
                Ok(Planned::Update {
                    key: key.to_owned(),
                    base,
                    submitted,
                })
            }
            Edit::Delete { key } => {
                split_key(key)?;
                self.check_live(key)?;
                Ok(Planned::Delete { key: key.to_owned() })
            }
        }
    }

    /// A single write's [`Written`], from the change [`write`](Self::write) made.
    fn written(
        &self,
        key: String,
        time_ms: i64,
        made: Option<(ChangeHash, Vec<u8>)>,
        none: &'static str,
    ) -> Result<Written> {
        let (hash, change) = made.ok_or(Error::CorruptResource {
            key: key.clone(),
            reason: none,
        })?;
        let resource = match self.read(&key) {
            Ok(r) => Some(r),
            Err(Error::Deleted { .. }) => None,
            Err(e) => return Err(e),
        };
        Ok(Written {
            key,
            hash,
            change,
            version_id: version_id(&hash),
            time_ms,
            resource,
        })
    }

    /// Makes the planned edits as one transaction by `actor` at `time_ms` and
    /// indexes the resulting change: its hash and raw bytes, or `None` when the
    /// edits changed nothing.
    fn write(
        &mut self,
        actor: &ActorId,
        time_ms: i64,
        planned: &[Planned],
    ) -> std::result::Result<Option<(ChangeHash, Vec<u8>)>, EditError> {
        let first = |error| EditError { edit: 0, error };
        if actor.to_bytes() == GENESIS_ACTOR {
            return Err(first(Error::InvalidKey {
                reason: "the genesis actor cannot write",
            }));
        }
        let first_key = planned.first().map(Planned::key).unwrap_or_default().to_owned();
        self.doc.set_actor(actor.clone());
        let done = self
            .doc
            .transact_with(
                |_| CommitOptions::default().with_time(time_ms),
                |tx| {
                    for (edit, p) in planned.iter().enumerate() {
                        let on = |source| EditError {
                            edit,
                            error: Error::Automerge {
                                key: p.key().to_owned(),
                                source: Box::new(source),
                            },
                        };
                        match p {
                            Planned::Create { key, body } => {
                                tx.batch_create_object(resources_obj(), key.as_str(), &value::hydrate_map(body), false)
                                    .map_err(on)?;
                            }
                            Planned::Update { key, base, submitted } => {
                                let Some((_, obj)) = tx.get(resources_obj(), key.as_str()).map_err(on)? else {
                                    return Err(on(AutomergeError::NotAnObject));
                                };
                                value::merge_map(tx, &obj, base, submitted).map_err(on)?;
                            }
                            Planned::Delete { key } => {
                                tx.put(deleted_obj(), key.as_str(), ScalarValue::Boolean(true))
                                    .map_err(on)?;
                            }
                            Planned::Unchanged { .. } => {}
                        }
                    }
                    Ok::<(), EditError>(())
                },
            )
            .map_err(|failure| failure.error)?;
        let Some(hash) = done.hash else {
            return Ok(None);
        };
        let change = self.doc.get_change_by_hash(&hash).ok_or(first(Error::CorruptResource {
            key: first_key.clone(),
            reason: "committed change not found",
        }))?;
        let effects = self
            .index
            .analyse(&change, &Overlay::default())
            .map_err(|reason| first(Error::CorruptResource { key: first_key, reason }))?;
        self.index.commit(&effects);
        self.invalidate(effects.touched.iter().map(|(k, _)| k.as_str()));
        Ok(Some((hash, change.raw_bytes().to_vec())))
    }
}

/// Builds the stored body: everything but `resourceType`, `id` and the derived
/// `meta.versionId`/`meta.lastUpdated`; checks that it holds no `null`.
fn stored_body(key: &str, resource: &Map<String, Value>) -> Result<Map<String, Value>> {
    let mut body = Map::with_capacity(resource.len());
    for (k, v) in resource {
        match k.as_str() {
            "resourceType" | "id" => {}
            "meta" => {
                let meta = v.as_object().ok_or(Error::InvalidResource {
                    key: key.to_owned(),
                    reason: "meta is not an object",
                })?;
                let kept: Map<String, Value> = meta
                    .iter()
                    .filter(|(mk, _)| *mk != "versionId" && *mk != "lastUpdated")
                    .map(|(mk, mv)| (mk.clone(), mv.clone()))
                    .collect();
                if !kept.is_empty() {
                    body.insert(k.clone(), Value::Object(kept));
                }
            }
            _ => {
                body.insert(k.clone(), v.clone());
            }
        }
    }
    for v in body.values() {
        value::validate(v, false).map_err(|reason| Error::InvalidResource {
            key: key.to_owned(),
            reason,
        })?;
    }
    Ok(body)
}
