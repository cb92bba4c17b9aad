//! The write path of the repository: which patient a resource is filed
//! under (DESIGN §3, §9.8), and single creates, updates and deletes, each
//! one Automerge change made in the cached document and stored durably
//! before it is served.

use std::collections::HashMap;
use std::sync::Arc;

use medmesh_crypto::{Change, Collection, PatientId};
use serde_json::Value;
use tokio::sync::OwnedMutexGuard;

use super::{DocKey, Error, Repository, Result, SharedDoc, new_resource_id, now_ms};
use crate::node::Actor;
use crate::records::{self, DecodedChange, RenderedResource};

impl Repository {
    /// The patient a resource belongs to (DESIGN §3): a Patient by its
    /// did:key identifier; others through their Patient-compartment
    /// reference; directory resources (Organization, Practitioner, …) to
    /// `context`, the patient of the bundle they arrived in.
    async fn patient_of(&self, resource: &Value, context: Option<PatientId>) -> Result<PatientId> {
        self.resolve_patient(resource, context, &HashMap::new()).await
    }

    /// As the patient resolution of [`Repository::create`], also looking in
    /// `pending`: resource keys (`Patient/id`) that an enclosing transaction
    /// is about to create, with their patient.
    ///
    /// # Errors
    /// [`Error::UnresolvedPatient`].
    pub async fn resolve_patient(
        &self,
        resource: &Value,
        context: Option<PatientId>,
        pending: &HashMap<String, PatientId>,
    ) -> Result<PatientId> {
        let resource_type = resource
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let unresolved = |reason| Error::UnresolvedPatient {
            resource_type: resource_type.clone(),
            reason,
        };
        match context {
            // The caller chose the record: nothing in the resource may name another patient.
            Some(patient) => {
                self.check_names(
                    &resource_type,
                    (patient, records::collection_of(resource)),
                    resource,
                    pending,
                )
                .await?;
                Ok(patient)
            }
            None => self
                .named_patient(resource, pending)
                .await?
                .ok_or_else(|| unresolved("no compartment reference to a Patient")),
        }
    }

    /// The one patient a resource names (DESIGN §3, §9.8): a Patient by its
    /// did:key identifier; any other resource through its Patient-compartment
    /// references ([`records::patient_links`]), every one of which must name a
    /// Patient in `pending` (written with it) or held here, all the same
    /// patient. `None` when it has no such reference (a directory resource).
    ///
    /// # Errors
    /// [`Error::UnresolvedPatient`] for a Patient without a valid did:key link,
    /// [`Error::PatientLink`] for a reference to an unknown patient or to two.
    pub async fn named_patient(
        &self,
        resource: &Value,
        pending: &HashMap<String, PatientId>,
    ) -> Result<Option<PatientId>> {
        let resource_type = resource
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        if resource_type == "Patient" {
            let unresolved = |reason| Error::UnresolvedPatient {
                resource_type: resource_type.clone(),
                reason,
            };
            let did = records::linked_did(resource)
                .ok_or_else(|| unresolved("a Patient needs an identifier urn:ietf:rfc:3986 = did:key:…"))?;
            return did
                .parse()
                .map(Some)
                .map_err(|_| unresolved("its did:key identifier is not valid"));
        }
        let mut resolved = Vec::new();
        for link in records::patient_links(resource) {
            let patient = match &link.key {
                None => None,
                Some(key) => match pending.get(key) {
                    Some(patient) => Some(*patient),
                    None => self.patient_of_key(key).await?,
                },
            };
            resolved.push((link, patient));
        }
        records::one_patient(resolved).map_err(|source| Error::PatientLink { resource_type, source })
    }

    /// The patient whose record holds the Patient resource `key`
    /// (`Patient/{id}`), if this node holds it and it links that patient
    /// ([`records::belongs`]).
    ///
    /// # Errors
    /// Node and record-model errors.
    pub async fn patient_of_key(&self, key: &str) -> Result<Option<PatientId>> {
        let at = match self.locate(key).await {
            Ok(at) => at,
            Err(Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let doc = self.locked(at).await?;
        let linked = match doc.doc.read(key) {
            Ok(patient) => records::belongs(&patient.json, &at.0, at.1),
            // A deleted Patient still names its patient (its did is in its history).
            Err(records::Error::Deleted { .. }) => true,
            Err(records::Error::NotFound { .. }) => false,
            Err(e) => return Err(e),
        };
        Ok(linked.then_some(at.0))
    }

    /// Refuses to write `resource` (named `what` in the error) into the
    /// record `at` when it names another patient than `at`'s (issue 15): a
    /// Patient by its did:key, any other resource by the compartment references
    /// that resolve (`pending`: Patients written with it). Used where the
    /// record is decided already (an update, by where the resource is; a
    /// create, by the caller), so references to patients not held here are
    /// left alone.
    ///
    /// # Errors
    /// [`Error::OtherPatient`].
    pub(super) async fn check_names(
        &self,
        what: &str,
        at: DocKey,
        resource: &Value,
        pending: &HashMap<String, PatientId>,
    ) -> Result<()> {
        let other = || Error::OtherPatient {
            resource: what.to_owned(),
        };
        if resource.get("resourceType").and_then(Value::as_str) == Some("Patient") {
            return if records::belongs(resource, &at.0, at.1) {
                Ok(())
            } else {
                Err(other())
            };
        }
        for link in records::patient_links(resource) {
            let Some(link_key) = &link.key else { continue };
            let patient = match pending.get(link_key) {
                Some(patient) => Some(*patient),
                None => self.patient_of_key(link_key).await?,
            };
            if patient.is_some_and(|p| p != at.0) {
                return Err(other());
            }
        }
        Ok(())
    }

    /// Creates a resource with a server-assigned id (POST).
    ///
    /// # Errors
    /// [`Error::UnresolvedPatient`], record-model errors, and node errors
    /// ([`crate::Error::NoWriteGrant`] when no grant lets this node write).
    pub async fn create(
        &self,
        resource: Value,
        context: Option<PatientId>,
        actor: Actor,
    ) -> Result<Arc<RenderedResource>> {
        let patient = self.patient_of(&resource, context).await?;
        let collection = records::collection_of(&resource);
        let id = new_resource_id()?;
        self.create_with_id(&id, resource, patient, collection, actor).await
    }

    /// Whether this node may write to (patient, collection) now: a
    /// read-write grant in force and the current epoch key.
    ///
    /// # Errors
    /// [`crate::Error::NoWriteGrant`] or [`crate::Error::NoEpochKey`].
    pub fn check_writable(&self, patient: PatientId, collection: Collection) -> Result<()> {
        let node = &self.inner.node;
        let me = node.practice_id();
        if node
            .grant_in_force(
                &patient,
                collection,
                &me,
                medmesh_crypto::Access::ReadWrite,
                medmesh_crypto::now(),
            )
            .is_none()
        {
            return Err(crate::Error::NoWriteGrant { patient, collection });
        }
        if node.current_epoch_key(&patient, collection).is_none() {
            return Err(crate::Error::NoEpochKey { patient, collection });
        }
        Ok(())
    }

    /// Creates a resource under an id chosen by the caller (a transaction
    /// that rewrote `urn:uuid:` references to it).
    ///
    /// # Errors
    /// As [`Repository::create`].
    pub async fn create_with_id(
        &self,
        id: &str,
        resource: Value,
        patient: PatientId,
        collection: Collection,
        actor: Actor,
    ) -> Result<Arc<RenderedResource>> {
        let key = (patient, collection);
        let (doc, written) = {
            let mut cached = self.locked(key).await?;
            let written = cached.doc.create(&self.inner.actor, now_ms(), id, &resource)?;
            (OwnedMutexGuard::mutex(&cached).clone(), written)
        };
        self.persist(key, &doc, &written, actor).await?;
        self.bind(key, [written.key.as_str()]);
        written.resource.ok_or_else(|| records::Error::CorruptResource {
            key: written.key.clone(),
            reason: "create rendered nothing",
        })
    }

    /// Seals and appends a change made in a cached document; on failure the
    /// document leaves the cache so nothing unacknowledged is served.
    async fn persist(&self, key: DocKey, doc: &SharedDoc, written: &records::Written, actor: Actor) -> Result<()> {
        let decoded = DecodedChange::from_bytes(&written.change)?;
        // Sealed compressed: envelopes are ~40% smaller at rest and on the wire.
        let compressed = decoded.compressed_bytes();
        let change = compressed.as_slice();
        let result = self
            .inner
            .node
            .write_change_by(
                actor,
                key.0,
                key.1,
                Change {
                    bytes: change,
                    hash: decoded.hash().0,
                    actor: self.inner.actor_id,
                    seq: decoded.seq(),
                },
            )
            .await;
        match result {
            Ok(envelope) => {
                let mut cached = doc.lock().await;
                cached.envelopes.insert(written.hash, envelope);
                cached.since_snapshot += 1;
                self.maybe_snapshot(key, &mut cached, false);
                Ok(())
            }
            Err(e) => {
                self.discard(&key, &mut *doc.lock().await);
                Err(e)
            }
        }
    }

    /// Three-way update (PUT): writes only what differs between the version
    /// the client read (`base_version`, else the current one) and
    /// `resource`, so peers' edits in between are kept. With
    /// `require_current` (an explicit `If-Match`), a stale base is a
    /// [`Error::VersionConflict`]. No update-as-create.
    ///
    /// # Errors
    /// `NotFound`/`Deleted`, [`Error::VersionConflict`], node errors.
    pub async fn update(
        &self,
        resource_type: &str,
        id: &str,
        resource: Value,
        base_version: Option<&str>,
        require_current: bool,
        actor: Actor,
    ) -> Result<Arc<RenderedResource>> {
        let key = records::resource_key(resource_type, id)?;
        let at = self.locate(&key).await?;
        self.check_names(&key, at, &resource, &HashMap::new()).await?;
        let mut cached = self.locked(at).await?;
        let written = {
            let doc = &mut cached.doc;
            let current = doc.read(&key)?;
            let base = match base_version {
                Some(v) if v != current.version_id => {
                    if require_current {
                        return Err(Error::VersionConflict {
                            key,
                            expected: v.to_owned(),
                            current: current.version_id.clone(),
                        });
                    }
                    doc.vread(&key, v)?.json.clone()
                }
                _ => current.json.clone(),
            };
            match doc.update(&self.inner.actor, now_ms(), &key, &base, &resource)? {
                Some(written) => written,
                None => return Ok(current),
            }
        };
        let doc = OwnedMutexGuard::mutex(&cached).clone();
        drop(cached);
        self.persist(at, &doc, &written, actor).await?;
        written.resource.ok_or_else(|| records::Error::CorruptResource {
            key: written.key.clone(),
            reason: "update rendered nothing",
        })
    }

    /// Marks `Type/id` deleted; its history stays.
    ///
    /// # Errors
    /// `NotFound`/`Deleted`, node errors.
    pub async fn delete(&self, resource_type: &str, id: &str, actor: Actor) -> Result<()> {
        let key = records::resource_key(resource_type, id)?;
        let at = self.locate(&key).await?;
        let (doc, written) = {
            let mut cached = self.locked(at).await?;
            let written = cached.doc.delete(&self.inner.actor, now_ms(), &key)?;
            (OwnedMutexGuard::mutex(&cached).clone(), written)
        };
        self.persist(at, &doc, &written, actor).await
    }
}
