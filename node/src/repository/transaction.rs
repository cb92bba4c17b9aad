//! FHIR transactions on the repository: [`TxOp`] is the one operation type
//! the gateway hands over, [`Repository::transaction`] gives them FHIR's
//! semantics (every Patient-compartment reference resolved, conditional
//! creates re-checked under the write, reads that must succeed checked
//! before anything is written, then one Automerge change per touched
//! document stored as one atomic durable batch, then the reads and
//! searches, which see every write).

use std::collections::HashMap;
use std::sync::Arc;

use medmesh_crypto::{Collection, PatientId};
use serde_json::Value;
use tokio::sync::OwnedMutexGuard;

use super::{Cached, DocKey, Error, Repository, now_ms};
use crate::node::Actor;
use crate::records::{self, DecodedChange, Query, RenderedResource};
use medmesh_crypto::Change;

/// One operation of a FHIR transaction, as the gateway resolved it: ids
/// assigned, `fullUrl` references rewritten to `Type/id`. A resource's
/// patient is never given: [`Repository::transaction`] files it under the
/// patient its references name.
#[derive(Debug, Clone)]
pub enum TxOp {
    /// Create `resource` under `id` ([`new_resource_id`](super::new_resource_id)).
    Create {
        /// The server-assigned id.
        id: String,
        /// The resource (its `id` and `meta.versionId`/`lastUpdated` are ignored).
        resource: Value,
        /// Conditional create (`If-None-Exist`): if this search matches a
        /// stored resource, or a resource an earlier op of the transaction
        /// creates, when the transaction runs, it fails with
        /// [`Error::ConditionalMatch`] instead of creating a duplicate.
        if_none_exist: Option<Query>,
    },
    /// Three-way update, as [`Repository::update`].
    Update {
        /// Resource type.
        resource_type: String,
        /// Id.
        id: String,
        /// The submitted resource.
        resource: Value,
        /// The version the client read.
        base_version: Option<String>,
        /// Whether a stale base is a [`Error::VersionConflict`].
        require_current: bool,
    },
    /// Delete, as [`Repository::delete`].
    Delete {
        /// Resource type.
        resource_type: String,
        /// Id.
        id: String,
    },
    /// Read the current version, or `version_id` (vread).
    Read {
        /// Resource type.
        resource_type: String,
        /// Id.
        id: String,
        /// A version to read instead of the current one.
        version_id: Option<String>,
    },
    /// A search, as [`Repository::search`].
    Search(Query),
}

/// What one [`TxOp`] produced, at the same position as the op.
#[derive(Debug, Clone)]
pub enum TxResult {
    /// Created: the resource as stored.
    Created(Arc<RenderedResource>),
    /// Updated: the resource as stored.
    Updated(Arc<RenderedResource>),
    /// An update that changed nothing: the current resource.
    Unchanged(Arc<RenderedResource>),
    /// Deleted.
    Deleted,
    /// A read.
    Read(Arc<RenderedResource>),
    /// A search's matches, in the search's stable order.
    Found(Vec<Arc<RenderedResource>>),
}

/// A [`Repository::transaction`] that wrote nothing: the op at fault (its
/// position) and why.
#[derive(Debug, thiserror::Error)]
#[error("transaction op {op}: {error}")]
pub struct TxError {
    /// Position of the op in the transaction.
    pub op: usize,
    /// Why.
    #[source]
    pub error: Error,
}

/// A write of a transaction with its patient resolved.
#[derive(Debug, Clone)]
enum Write {
    Create {
        id: String,
        resource: Value,
        patient: PatientId,
        collection: Collection,
    },
    Update {
        resource_type: String,
        id: String,
        resource: Value,
        base_version: Option<String>,
        require_current: bool,
    },
    Delete {
        resource_type: String,
        id: String,
    },
}

impl Write {
    /// Whether this write leaves `Type/id` created, updated or deleted.
    fn touches(&self, resource_type: &str, id: &str) -> bool {
        match self {
            Write::Create { id: wid, resource, .. } => {
                wid == id && resource.get("resourceType").and_then(Value::as_str) == Some(resource_type)
            }
            Write::Update {
                resource_type: t,
                id: wid,
                ..
            }
            | Write::Delete {
                resource_type: t,
                id: wid,
            } => t == resource_type && wid == id,
        }
    }
}

impl Repository {
    /// Runs a FHIR transaction (DESIGN §3, §9.8), all or nothing:
    ///
    /// 1. Every create is filed under the one patient its references name
    ///    ([`Repository::named_patient`]; a Patient created here counts,
    ///    whatever the op order). A resource that names none (Organization,
    ///    Practitioner, …) goes with the one patient the transaction's other
    ///    creates name; with several, nothing is guessed
    ///    ([`Error::Unfiled`]).
    /// 2. Every conditional create is searched again, against the store and
    ///    the creates before it ([`Error::ConditionalMatch`]).
    /// 3. Every read must succeed (a resource this transaction deletes is
    ///    gone, one it writes exists) before anything is written.
    /// 4. The writes, as one change per touched document in one durable
    ///    batch (`write_all`).
    /// 5. The reads and searches, which see every write.
    ///
    /// Results come back in the order of `ops`.
    ///
    /// # Errors
    /// [`TxError`] naming the op at fault; nothing was written.
    pub async fn transaction(&self, ops: Vec<TxOp>, actor: Actor) -> Result<Vec<TxResult>, TxError> {
        let fail = |op: usize| move |error: Error| TxError { op, error };
        // The Patients created here first, so that references to them resolve
        // whatever the op order; then every create's own patient.
        let mut pending: HashMap<String, PatientId> = HashMap::new();
        for op in &ops {
            if let TxOp::Create { id, resource, .. } = op
                && resource.get("resourceType").and_then(Value::as_str) == Some("Patient")
                && let Ok(Some(patient)) = self.named_patient(resource, &HashMap::new()).await
            {
                pending.insert(format!("Patient/{id}"), patient);
            }
        }
        let mut named: HashMap<usize, PatientId> = HashMap::new();
        for (i, op) in ops.iter().enumerate() {
            if let TxOp::Create { resource, .. } = op
                && let Some(patient) = self.named_patient(resource, &pending).await.map_err(fail(i))?
            {
                named.insert(i, patient);
            }
        }
        let mut patients: Vec<PatientId> = named.values().copied().collect();
        patients.sort_unstable();
        patients.dedup();
        let context = match patients.as_slice() {
            [one] => Some(*one),
            _ => None,
        };
        let mut writes = Vec::with_capacity(ops.len());
        // Per write, the op it came from.
        let mut write_ops = Vec::with_capacity(ops.len());
        let mut reads = Vec::new();
        for (i, op) in ops.into_iter().enumerate() {
            let write = match op {
                TxOp::Create {
                    id,
                    resource,
                    if_none_exist,
                } => {
                    if let Some(query) = if_none_exist {
                        let found = self.search(&query).await.map_err(fail(i))?;
                        let created_here = writes
                            .iter()
                            .any(|w| matches!(w, Write::Create { resource, .. } if query.matches(resource)));
                        if !found.is_empty() || created_here {
                            return Err(fail(i)(Error::ConditionalMatch));
                        }
                    }
                    let Some(patient) = named.get(&i).copied().or(context) else {
                        return Err(fail(i)(Error::Unfiled {
                            resource_type: resource
                                .get("resourceType")
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                                .to_owned(),
                            patients: patients.len(),
                        }));
                    };
                    let collection = records::collection_of(&resource);
                    Write::Create {
                        id,
                        resource,
                        patient,
                        collection,
                    }
                }
                TxOp::Update {
                    resource_type,
                    id,
                    resource,
                    base_version,
                    require_current,
                } => Write::Update {
                    resource_type,
                    id,
                    resource,
                    base_version,
                    require_current,
                },
                TxOp::Delete { resource_type, id } => Write::Delete { resource_type, id },
                read @ (TxOp::Read { .. } | TxOp::Search(_)) => {
                    reads.push((i, read));
                    continue;
                }
            };
            writes.push(write);
            write_ops.push(i);
        }
        // A read that cannot succeed fails the transaction before anything is written.
        for (i, op) in &reads {
            let TxOp::Read {
                resource_type,
                id,
                version_id,
            } = op
            else {
                continue;
            };
            let written_here = writes.iter().find(|w| w.touches(resource_type, id));
            let found = match (written_here, version_id) {
                (Some(Write::Delete { .. }), None) => Err(records::Error::Deleted {
                    key: format!("{resource_type}/{id}"),
                }),
                (Some(_), None) => Ok(()),
                (_, Some(v)) => self.vread(resource_type, id, v).await.map(drop),
                (None, None) => self.read(resource_type, id).await.map(drop),
            };
            found.map_err(fail(*i))?;
        }
        let count = write_ops.len() + reads.len();
        let written = self.write_all(writes, actor).await.map_err(|e| TxError {
            op: write_ops.get(e.op).copied().unwrap_or_default(),
            error: e.error,
        })?;
        let mut results: Vec<Option<TxResult>> = vec![None; count];
        for (i, outcome) in write_ops.into_iter().zip(written) {
            if let Some(slot) = results.get_mut(i) {
                *slot = Some(outcome);
            }
        }
        for (i, op) in reads {
            let result = match op {
                TxOp::Read {
                    resource_type,
                    id,
                    version_id,
                } => TxResult::Read(
                    match version_id {
                        Some(v) => self.vread(&resource_type, &id, &v).await,
                        None => self.read(&resource_type, &id).await,
                    }
                    .map_err(fail(i))?,
                ),
                TxOp::Search(query) => TxResult::Found(self.search(&query).await.map_err(fail(i))?),
                TxOp::Create { .. } | TxOp::Update { .. } | TxOp::Delete { .. } => continue,
            };
            if let Some(slot) = results.get_mut(i) {
                *slot = Some(result);
            }
        }
        // Every slot is filled: each op was either a write or a read.
        Ok(results.into_iter().flatten().collect())
    }

    /// Writes a FHIR transaction's creates, updates and deletes **all or
    /// nothing**: one Automerge change per touched (patient, collection)
    /// document (every resource it touches gets that change's
    /// `meta.versionId`), sealed and stored as one atomic, durable store
    /// batch ([`Node::write_changes_by`]). Every refusal (no write grant, no
    /// epoch key, a stale version, a resource that is missing, deleted or
    /// already exists) is found before anything is written. The touched
    /// documents stay locked until the batch is durable, so no read sees a
    /// write that is not; if anything fails, every touched document is
    /// dropped from the cache and nothing of the transaction is served.
    ///
    /// Outcomes come back in the order of `writes`.
    ///
    /// # Errors
    /// [`TxError`] naming the write at fault: as [`Repository::create`],
    /// [`Repository::update`] and [`Repository::delete`], and
    /// `records::Error::DuplicateEdit` when two writes name one resource
    /// (FHIR forbids it). Node errors of the durable write name the first
    /// write of the document concerned.
    async fn write_all(&self, writes: Vec<Write>, actor: Actor) -> Result<Vec<TxResult>, TxError> {
        let at = |write: usize| move |error: Error| TxError { op: write, error };
        // Where each write goes; FHIR allows one write per resource.
        let mut keys = Vec::with_capacity(writes.len());
        let mut docs: std::collections::BTreeMap<DocKey, Vec<usize>> = std::collections::BTreeMap::new();
        let mut seen = std::collections::HashSet::with_capacity(writes.len());
        // Patients created here, for updates that reference them.
        let created_patients: HashMap<String, PatientId> = writes
            .iter()
            .filter_map(|w| match w {
                Write::Create {
                    id, resource, patient, ..
                } if resource.get("resourceType").and_then(Value::as_str) == Some("Patient") => {
                    Some((format!("Patient/{id}"), *patient))
                }
                _ => None,
            })
            .collect();
        for (i, write) in writes.iter().enumerate() {
            let (key, place) = match write {
                Write::Create {
                    id,
                    resource,
                    patient,
                    collection,
                } => {
                    let resource_type = resource.get("resourceType").and_then(Value::as_str).unwrap_or_default();
                    let key = records::resource_key(resource_type, id).map_err(|e| at(i)(e))?;
                    (key, (*patient, *collection))
                }
                Write::Update { resource_type, id, .. } | Write::Delete { resource_type, id } => {
                    let key = records::resource_key(resource_type, id).map_err(|e| at(i)(e))?;
                    let place = self.locate(&key).await.map_err(at(i))?;
                    (key, place)
                }
            };
            if let Write::Update { resource, .. } = write {
                self.check_names(&key, place, resource, &created_patients)
                    .await
                    .map_err(at(i))?;
            }
            if !seen.insert(key.clone()) {
                return Err(at(i)(records::Error::DuplicateEdit { key }));
            }
            docs.entry(place).or_default().push(i);
            keys.push(key);
        }
        for (place, members) in &docs {
            self.check_writable(place.0, place.1)
                .map_err(at(members.first().copied().unwrap_or_default()))?;
        }
        // Locked in key order, so two transactions never wait on each other in a cycle.
        let mut locked = Vec::with_capacity(docs.len());
        for (place, members) in docs {
            let first = members.first().copied().unwrap_or_default();
            locked.push((place, members, self.locked(place).await.map_err(at(first))?));
        }
        let time = now_ms();
        let mut made: Vec<(usize, records::MadeChange)> = Vec::with_capacity(locked.len());
        let mut outcomes: Vec<Option<TxResult>> = vec![None; writes.len()];
        let mut failure = None;
        for (n, (_, members, cached)) in locked.iter_mut().enumerate() {
            match self.edit_locked(cached, members, &writes, &keys, time) {
                Ok(edits) => {
                    for (&i, edited) in members.iter().zip(edits.outcomes) {
                        outcomes[i] = Some(match edited {
                            records::Edited::Created(r) => TxResult::Created(r),
                            records::Edited::Updated(r) => TxResult::Updated(r),
                            records::Edited::Unchanged(r) => TxResult::Unchanged(r),
                            records::Edited::Deleted(_) => TxResult::Deleted,
                        });
                    }
                    if let Some(change) = edits.change {
                        made.push((n, change));
                    }
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let result = match failure {
            Some(e) => Err(e),
            None => self.store_changes(&mut locked, &made, &writes, actor).await,
        };
        if let Err(e) = result {
            for (n, _) in &made {
                if let Some((place, _, cached)) = locked.get_mut(*n) {
                    self.discard(place, cached);
                }
            }
            return Err(e);
        }
        Ok(outcomes.into_iter().flatten().collect())
    }

    /// The one change of a transaction in one locked document: bases
    /// resolved (and `If-Match` checked) for its updates, then
    /// [`RecordDoc::edit`]. Nothing is changed on error.
    fn edit_locked(
        &self,
        cached: &mut Cached,
        members: &[usize],
        writes: &[Write],
        keys: &[String],
        time: i64,
    ) -> Result<records::Edits, TxError> {
        let at = |write: usize| move |error: Error| TxError { op: write, error };
        let mut bases: Vec<Option<Value>> = Vec::with_capacity(members.len());
        for &i in members {
            let base = match (writes.get(i), keys.get(i)) {
                (
                    Some(Write::Update {
                        base_version,
                        require_current,
                        ..
                    }),
                    Some(key),
                ) => {
                    let current = cached.doc.read(key).map_err(|e| at(i)(e))?;
                    Some(match base_version {
                        Some(v) if *v != current.version_id => {
                            if *require_current {
                                return Err(at(i)(Error::VersionConflict {
                                    key: key.clone(),
                                    expected: v.clone(),
                                    current: current.version_id.clone(),
                                }));
                            }
                            cached.doc.vread(key, v).map_err(|e| at(i)(e))?.json.clone()
                        }
                        _ => current.json.clone(),
                    })
                }
                _ => None,
            };
            bases.push(base);
        }
        let mut edits = Vec::with_capacity(members.len());
        for (&i, base) in members.iter().zip(&bases) {
            let (Some(write), Some(key)) = (writes.get(i), keys.get(i)) else {
                continue;
            };
            edits.push(match write {
                Write::Create { id, resource, .. } => records::Edit::Create { id, resource },
                Write::Update { resource, .. } => records::Edit::Update {
                    key,
                    // Every update got its base above.
                    base: base.as_ref().unwrap_or(resource),
                    submitted: resource,
                },
                Write::Delete { .. } => records::Edit::Delete { key },
            });
        }
        cached
            .doc
            .edit(&self.inner.actor, time, &edits)
            .map_err(|e| at(members.get(e.edit).copied().unwrap_or_default())(e.error))
    }

    /// Seals the changes a transaction made in its locked documents and
    /// stores them as one durable batch; then records their envelopes and the
    /// created resources' locations.
    async fn store_changes(
        &self,
        locked: &mut [(DocKey, Vec<usize>, OwnedMutexGuard<Cached>)],
        made: &[(usize, records::MadeChange)],
        writes: &[Write],
        actor: Actor,
    ) -> Result<(), TxError> {
        let first_of = |n: usize| {
            locked
                .get(n)
                .and_then(|(_, members, _)| members.first().copied())
                .unwrap_or_default()
        };
        let mut sealed = Vec::with_capacity(made.len());
        for (n, change) in made {
            let decoded = DecodedChange::from_bytes(&change.change).map_err(|e| TxError {
                op: first_of(*n),
                error: e,
            })?;
            // Sealed compressed, as single writes are.
            sealed.push((decoded.compressed_bytes(), decoded.hash().0, decoded.seq()));
        }
        let mut changes = Vec::with_capacity(made.len());
        for ((n, _), (bytes, hash, seq)) in made.iter().zip(&sealed) {
            let Some((place, _, _)) = locked.get(*n) else { continue };
            changes.push((
                place.0,
                place.1,
                Change {
                    bytes,
                    hash: *hash,
                    actor: self.inner.actor_id,
                    seq: *seq,
                },
            ));
        }
        let envelopes = self.inner.node.write_changes_by(actor, changes).await.map_err(|e| {
            let at = match &e {
                crate::Error::NoWriteGrant { patient, collection }
                | crate::Error::NoEpochKey { patient, collection } => made
                    .iter()
                    .find(|(n, _)| locked.get(*n).is_some_and(|(p, _, _)| *p == (*patient, *collection)))
                    .map_or(0, |(n, _)| first_of(*n)),
                _ => made.first().map_or(0, |(n, _)| first_of(*n)),
            };
            TxError { op: at, error: e }
        })?;
        for ((n, change), envelope) in made.iter().zip(envelopes) {
            let Some((place, members, cached)) = locked.get_mut(*n) else {
                continue;
            };
            cached.envelopes.insert(change.hash, envelope);
            cached.since_snapshot += 1;
            self.maybe_snapshot(*place, cached, false);
            let created: Vec<String> = members
                .iter()
                .filter_map(|&i| match writes.get(i) {
                    Some(Write::Create { id, resource, .. }) => {
                        let resource_type = resource.get("resourceType").and_then(Value::as_str)?;
                        records::resource_key(resource_type, id).ok()
                    }
                    _ => None,
                })
                .collect();
            self.bind(*place, created.iter().map(String::as_str));
        }
        Ok(())
    }
}
