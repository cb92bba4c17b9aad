//! An in-memory [`Backend`] on one record document, shared by the HTTP tests
//! and the benches (`#[path]`-included): every resource in one `RecordDoc`,
//! ids `m1`, `m2`, …; a transaction's writes are one change of the document
//! (`RecordDoc::edit`), as on the node.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use automerge::ActorId;
use medmesh_gateway::fhir::outcome::ApiError;
use medmesh_gateway::fhir::search_params::SearchRequest;
use medmesh_gateway::{Backend, HistoryEntry, TxFailure, TxOp, TxResult};
use medmesh_node::item::ItemKind;
use medmesh_node::records::{Edit, Edited, Query, RecordDoc, RenderedResource, actor_id};
use serde_json::{Value, json};

/// The in-memory backend.
pub(crate) struct MemBackend {
    doc: Mutex<RecordDoc>,
    actor: ActorId,
    next_id: Mutex<u64>,
}

impl MemBackend {
    /// An empty backend.
    pub(crate) fn new() -> Self {
        Self {
            doc: Mutex::new(RecordDoc::new()),
            actor: actor_id(&[7; 32], [1; 8]),
            next_id: Mutex::new(0),
        }
    }

    /// Number of live resources.
    pub(crate) fn len(&self) -> usize {
        self.doc.lock().unwrap().resources().unwrap().len()
    }

    /// Number of Automerge changes written.
    pub(crate) fn change_count(&self) -> usize {
        self.doc.lock().unwrap().change_count()
    }

    fn now() -> i64 {
        i64::try_from(medmesh_crypto::now()).unwrap()
    }

    fn create_in(&self, doc: &mut RecordDoc, id: &str, resource: &Value) -> Result<Arc<RenderedResource>, ApiError> {
        let written = doc.create(&self.actor, Self::now(), id, resource)?;
        written.resource.ok_or(ApiError::Internal)
    }

    /// The version an update is based on: `base`, or the current one; with
    /// `require_current`, a stale `base` is a 412.
    fn base_of(doc: &RecordDoc, key: &str, base: Option<&str>, require_current: bool) -> Result<Value, ApiError> {
        let current = doc.read(key)?;
        match base {
            Some(v) if v != current.version_id => {
                if require_current {
                    return Err(ApiError::PreconditionFailed {
                        expected: v.to_owned(),
                        current: current.version_id.clone(),
                    });
                }
                Ok(doc.vread(key, v)?.json.clone())
            }
            _ => Ok(current.json.clone()),
        }
    }

    /// Returns the resource and whether a change was written.
    fn update_in(
        &self,
        doc: &mut RecordDoc,
        t: &str,
        id: &str,
        resource: &Value,
        base: Option<String>,
        require_current: bool,
    ) -> Result<(Arc<RenderedResource>, bool), ApiError> {
        let key = format!("{t}/{id}");
        let base_json = Self::base_of(doc, &key, base.as_deref(), require_current)?;
        match doc.update(&self.actor, Self::now(), &key, &base_json, resource)? {
            Some(written) => Ok((written.resource.ok_or(ApiError::Internal)?, true)),
            None => Ok((doc.read(&key)?, false)),
        }
    }

    fn search_in(doc: &RecordDoc, query: &Query) -> Result<Vec<Arc<RenderedResource>>, ApiError> {
        Ok(medmesh_node::records::search::search(doc.resources()?.iter(), query))
    }

    /// A read or search of a transaction.
    fn read_op(doc: &RecordDoc, op: TxOp) -> Result<TxResult, ApiError> {
        Ok(match op {
            TxOp::Read {
                resource_type,
                id,
                version_id,
            } => {
                let key = format!("{resource_type}/{id}");
                TxResult::Read(match version_id {
                    Some(v) => doc.vread(&key, &v)?,
                    None => doc.read(&key)?,
                })
            }
            TxOp::Search(query) => TxResult::Found(Self::search_in(doc, &query)?),
            _ => return Err(ApiError::Internal),
        })
    }
}

impl Backend for MemBackend {
    async fn create(&self, resource: Value) -> Result<Arc<RenderedResource>, ApiError> {
        let id = self.new_id();
        let mut doc = self.doc.lock().unwrap();
        self.create_in(&mut doc, &id, &resource)
    }

    async fn read(&self, t: &str, id: &str) -> Result<Arc<RenderedResource>, ApiError> {
        Ok(self.doc.lock().unwrap().read(&format!("{t}/{id}"))?)
    }

    async fn vread(&self, t: &str, id: &str, vid: &str) -> Result<Arc<RenderedResource>, ApiError> {
        Ok(self.doc.lock().unwrap().vread(&format!("{t}/{id}"), vid)?)
    }

    async fn history(&self, t: &str, id: &str) -> Result<Vec<HistoryEntry>, ApiError> {
        let key = format!("{t}/{id}");
        let doc = self.doc.lock().unwrap();
        let versions = doc.history(&key)?;
        Ok(versions
            .into_iter()
            .map(|version| {
                let resource = if version.deleted {
                    None
                } else {
                    doc.vread(&key, &version.version_id).ok()
                };
                HistoryEntry { version, resource }
            })
            .collect())
    }

    async fn update(
        &self,
        t: &str,
        id: &str,
        resource: Value,
        base: Option<String>,
        require_current: bool,
    ) -> Result<Arc<RenderedResource>, ApiError> {
        let mut doc = self.doc.lock().unwrap();
        self.update_in(&mut doc, t, id, &resource, base, require_current)
            .map(|(r, _)| r)
    }

    async fn delete(&self, t: &str, id: &str) -> Result<(), ApiError> {
        self.doc
            .lock()
            .unwrap()
            .delete(&self.actor, Self::now(), &format!("{t}/{id}"))?;
        Ok(())
    }

    async fn search(&self, request: &SearchRequest) -> Result<Vec<Arc<RenderedResource>>, ApiError> {
        Self::search_in(&self.doc.lock().unwrap(), &request.query)
    }

    async fn everything(&self, id: &str) -> Result<Vec<Arc<RenderedResource>>, ApiError> {
        let doc = self.doc.lock().unwrap();
        let key = format!("Patient/{id}");
        let patient = doc.read(&key)?;
        let mut all = vec![patient];
        all.extend(doc.resources()?.into_iter().filter(|r| r.key != key));
        Ok(all)
    }

    fn new_id(&self) -> String {
        let mut next = self.next_id.lock().unwrap();
        *next += 1;
        format!("m{next}")
    }

    /// As the node: every write of the transaction is one change of the
    /// document (made only once every op checked out), then the reads run.
    async fn transaction(&self, ops: Vec<TxOp>) -> Result<Vec<TxResult>, TxFailure> {
        let mut doc = self.doc.lock().unwrap();
        let keys: Vec<String> = ops
            .iter()
            .map(|op| match op {
                TxOp::Update { resource_type, id, .. } | TxOp::Delete { resource_type, id } => {
                    format!("{resource_type}/{id}")
                }
                _ => String::new(),
            })
            .collect();
        let mut bases = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter().enumerate() {
            let fail = |error| TxFailure { op: i, error };
            bases.push(match op {
                TxOp::Create {
                    if_none_exist: Some(query),
                    ..
                } => {
                    let found = Self::search_in(&doc, query).map_err(fail)?.len();
                    let here = ops[..i]
                        .iter()
                        .any(|o| matches!(o, TxOp::Create { resource, .. } if query.matches(resource)));
                    if found > 0 || here {
                        return Err(fail(ApiError::MultipleMatches(
                            "ifNoneExist now matches a resource".to_owned(),
                        )));
                    }
                    None
                }
                TxOp::Update {
                    base_version,
                    require_current,
                    ..
                } => Some(Self::base_of(&doc, &keys[i], base_version.as_deref(), *require_current).map_err(fail)?),
                TxOp::Delete { .. } => {
                    doc.read(&keys[i]).map_err(|e| fail(e.into()))?;
                    None
                }
                _ => None,
            });
        }
        let mut edits = Vec::new();
        let mut edit_ops = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            edits.push(match op {
                TxOp::Create { id, resource, .. } => Edit::Create { id, resource },
                TxOp::Update { resource, .. } => Edit::Update {
                    key: &keys[i],
                    base: bases[i].as_ref().unwrap(),
                    submitted: resource,
                },
                TxOp::Delete { .. } => Edit::Delete { key: &keys[i] },
                TxOp::Read { .. } | TxOp::Search(_) => continue,
            });
            edit_ops.push(i);
        }
        // A failed read must not leave the writes behind.
        let snapshot = (!edits.is_empty() && edits.len() < ops.len()).then(|| doc.save());
        let edited = doc.edit(&self.actor, Self::now(), &edits).map_err(|e| TxFailure {
            op: edit_ops[e.edit],
            error: e.error.into(),
        })?;
        drop(edits);
        let mut results: Vec<Option<TxResult>> = vec![None; ops.len()];
        for (i, outcome) in edit_ops.into_iter().zip(edited.outcomes) {
            results[i] = Some(match outcome {
                Edited::Created(r) => TxResult::Created(r),
                Edited::Updated(r) => TxResult::Updated(r),
                Edited::Unchanged(r) => TxResult::Unchanged(r),
                Edited::Deleted(_) => TxResult::Deleted,
            });
        }
        for (i, op) in ops.into_iter().enumerate() {
            if results[i].is_some() {
                continue;
            }
            match Self::read_op(&doc, op) {
                Ok(result) => results[i] = Some(result),
                Err(error) => {
                    if let Some(snapshot) = snapshot {
                        *doc = RecordDoc::load(&snapshot).unwrap();
                    }
                    return Err(TxFailure { op: i, error });
                }
            }
        }
        Ok(results.into_iter().map(Option::unwrap).collect())
    }

    async fn submit(&self, _kind: ItemKind, _bytes: Vec<u8>) -> Result<Value, ApiError> {
        Err(ApiError::Forbidden(
            "no consent registry in this test backend".to_owned(),
        ))
    }

    async fn holdings(&self, did: &str) -> Result<Value, ApiError> {
        Ok(json!({ "patient": did, "envelopes": 0, "readable": 0, "opaque": 0, "by_collection": {} }))
    }

    async fn consents(&self, _did: &str) -> Result<Vec<Value>, ApiError> {
        Ok(Vec::new())
    }

    async fn audit_events(&self, _did: &str) -> Result<Vec<Value>, ApiError> {
        Ok(Vec::new())
    }

    async fn sync_status(&self) -> Value {
        json!({ "peers": [] })
    }

    fn write_metrics(&self, out: &mut String) {
        out.push_str("# TYPE medmesh_test_backend gauge\nmedmesh_test_backend 1\n");
    }
}
