//! The gateway's view of this node: `medmesh_gateway::Backend` over the
//! node's repository, consent registry and audit log. Lives in the binary
//! because it is wiring: the gateway and node crates do not know each other
//! beyond the record types.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use medmesh_crypto::{Collection, PatientId};
use medmesh_gateway::fhir::outcome::{ApiError, Issue, IssueType};
use medmesh_gateway::fhir::search_params::SearchRequest;
use medmesh_gateway::fhir::views;
use medmesh_gateway::{Backend, HistoryEntry, SearchNotes, TxFailure, TxOp, TxResult};
use medmesh_node::audit::{Action, ActorKind, AuditRecord};
use medmesh_node::item::Item;
use medmesh_node::records::RenderedResource;
use medmesh_node::repository::{self, Repository};
use medmesh_node::store::ItemKind;
use medmesh_node::{Actor, Node, Source};
use serde_json::{Value, json};

/// Every gateway caller holds the node's one bearer token: the practice's apps.
const APP: &str = "gateway";

pub(crate) struct NodeBackend {
    node: Node,
    repository: Repository,
    sync: Option<medmesh_sync::SyncHandle>,
    /// Refreshed in the background: `/metrics` is synchronous and must not
    /// wait on the sync actor or walk the disk per scrape.
    gauges: Arc<std::sync::Mutex<Gauges>>,
}

#[derive(Default)]
struct Gauges {
    sync: Option<medmesh_sync::Status>,
    store_bytes: u64,
    /// (patient, collection) records granted here and not yet complete.
    incomplete_records: u64,
}

/// Longest a patient-scoped read waits for the record caches to apply what
/// the store already holds ([`medmesh_node::Repository::settle`]).
const CACHE_SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// How often the gauges behind `/metrics` are refreshed.
const GAUGE_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

impl NodeBackend {
    /// Needs a tokio runtime: spawns the gauge refresher, which ends with the backend.
    pub(crate) fn new(
        node: Node,
        repository: Repository,
        sync: Option<medmesh_sync::SyncHandle>,
        store_dir: std::path::PathBuf,
    ) -> Self {
        let gauges = Arc::new(std::sync::Mutex::new(Gauges::default()));
        let weak = Arc::downgrade(&gauges);
        let handle = sync.clone();
        let counted = node.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(GAUGE_REFRESH);
            loop {
                tick.tick().await;
                let Some(gauges) = weak.upgrade() else { return };
                let status = match &handle {
                    Some(h) => h.status().await.ok(),
                    None => None,
                };
                let dir = store_dir.clone();
                let bytes = tokio::task::spawn_blocking(move || dir_bytes(&dir)).await.unwrap_or(0);
                let node = counted.clone();
                let incomplete = tokio::task::spawn_blocking(move || node.incomplete_records())
                    .await
                    .ok()
                    .and_then(Result::ok);
                let mut g = gauges.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                g.sync = status;
                g.store_bytes = bytes;
                if let Some(n) = incomplete {
                    g.incomplete_records = n;
                }
            }
        });
        Self {
            node,
            repository,
            sync,
            gauges,
        }
    }

    fn actor() -> Actor {
        Actor::local_app(APP)
    }

    /// The patient a search is scoped to, by did (`patient=did:key:…`) or by
    /// a Patient resource this node holds; `None` otherwise.
    async fn searched_patient(&self, request: &SearchRequest) -> Result<Option<PatientId>, ApiError> {
        Ok(match (request.patient_did(), request.patient()) {
            (Some(did), _) => Some(did),
            (None, Some(id)) => self.patient_of(id).await?.and_then(|did| did.parse::<PatientId>().ok()),
            (None, None) => None,
        })
    }

    /// One warning per collection of `patient`'s record (only `only`, when
    /// given) that this node is granted and does not hold complete yet.
    /// Judged on the store; then the record caches are let catch up with it
    /// (they follow the store's events a moment behind), so the read that
    /// follows shows at least what was judged — or says it may not.
    async fn incomplete(&self, patient: &PatientId, only: Option<Collection>) -> Result<Vec<String>, ApiError> {
        let mut warnings: Vec<String> = self
            .node
            .completeness(patient)
            .map_err(ApiError::from)?
            .iter()
            .filter(|c| only.is_none_or(|o| o == c.collection))
            .filter_map(medmesh_node::completeness::CollectionCompleteness::warning)
            .collect();
        if !self.repository.settle(CACHE_SETTLE).await {
            warnings.push(
                "changes this node received moments ago are still being applied and may be missing from this \
                 result; repeat the request to see them"
                    .to_owned(),
            );
        }
        Ok(warnings)
    }

    /// Records a read of a patient's data by the practice's apps, durably,
    /// before the caller returns the data: a read the log cannot record is
    /// refused (503), never served unrecorded.
    async fn audit_read(&self, resources: &[Arc<RenderedResource>]) -> Result<(), ApiError> {
        let mut patients: Vec<PatientId> = Vec::new();
        for r in resources {
            if let Ok((patient, _)) = self.repository.location(r.resource_type(), r.id()).await
                && !patients.contains(&patient)
            {
                patients.push(patient);
            }
        }
        for patient in patients {
            let record = AuditRecord {
                actor_kind: ActorKind::LocalApp,
                actor_id: APP.to_owned(),
                action: Action::Read,
                patient: Some(patient),
                items: Vec::new(),
                grant: None,
                outcome: "ok".to_owned(),
            };
            if let Err(e) = self.node.audit(record).await {
                tracing::error!(cause = %e, "audit append failed; the read is refused");
                return Err(ApiError::AuditUnavailable);
            }
        }
        Ok(())
    }
}

fn parse_did(did: &str) -> Result<PatientId, ApiError> {
    did.parse().map_err(|_| ApiError::InvalidParam {
        param: "patient".to_owned(),
        reason: "expected the patient's did:key".to_owned(),
    })
}

impl Backend for NodeBackend {
    async fn create(&self, resource: Value) -> Result<Arc<RenderedResource>, ApiError> {
        self.repository
            .create(resource, None, Self::actor())
            .await
            .map_err(ApiError::from)
    }

    async fn read(&self, resource_type: &str, id: &str) -> Result<Arc<RenderedResource>, ApiError> {
        let resource = self.repository.read(resource_type, id).await.map_err(ApiError::from)?;
        self.audit_read(std::slice::from_ref(&resource)).await?;
        Ok(resource)
    }

    async fn vread(&self, resource_type: &str, id: &str, version_id: &str) -> Result<Arc<RenderedResource>, ApiError> {
        let resource = self
            .repository
            .vread(resource_type, id, version_id)
            .await
            .map_err(ApiError::from)?;
        self.audit_read(std::slice::from_ref(&resource)).await?;
        Ok(resource)
    }

    async fn history(&self, resource_type: &str, id: &str) -> Result<Vec<HistoryEntry>, ApiError> {
        let versions = self
            .repository
            .history(resource_type, id)
            .await
            .map_err(ApiError::from)?;
        let rendered: Vec<Arc<RenderedResource>> = versions.iter().filter_map(|(_, r)| r.clone()).collect();
        self.audit_read(&rendered).await?;
        Ok(versions
            .into_iter()
            .map(|(version, resource)| HistoryEntry { version, resource })
            .collect())
    }

    async fn update(
        &self,
        resource_type: &str,
        id: &str,
        resource: Value,
        base_version: Option<String>,
        require_current: bool,
    ) -> Result<Arc<RenderedResource>, ApiError> {
        self.repository
            .update(
                resource_type,
                id,
                resource,
                base_version.as_deref(),
                require_current,
                Self::actor(),
            )
            .await
            .map_err(ApiError::from)
    }

    async fn delete(&self, resource_type: &str, id: &str) -> Result<(), ApiError> {
        self.repository
            .delete(resource_type, id, Self::actor())
            .await
            .map_err(ApiError::from)
    }

    async fn search(&self, request: &SearchRequest) -> Result<Vec<Arc<RenderedResource>>, ApiError> {
        let found = self.repository.search(&request.query).await.map_err(ApiError::from)?;
        self.audit_read(&found).await?;
        Ok(found)
    }

    async fn search_notes(&self, request: &SearchRequest) -> Result<SearchNotes, ApiError> {
        let Some(patient) = self.searched_patient(request).await? else {
            return Ok(SearchNotes::default());
        };
        let collection = medmesh_node::records::collection_of_type(&request.resource_type);
        let unreadable = self.node.current_epoch(&patient, collection).is_none().then(|| {
            format!(
                "this node cannot read this patient's {collection} collection (no grant to it here, or its key has \
                 not arrived yet): {} resources of theirs held at other practices are not in this result",
                request.resource_type
            )
        });
        Ok(SearchNotes {
            unreadable,
            incomplete: self.incomplete(&patient, Some(collection)).await?,
        })
    }

    async fn incomplete_everything(&self, patient_resource_id: &str) -> Result<Vec<String>, ApiError> {
        match self
            .patient_of(patient_resource_id)
            .await?
            .and_then(|did| did.parse::<PatientId>().ok())
        {
            Some(patient) => self.incomplete(&patient, None).await,
            None => Ok(Vec::new()),
        }
    }

    async fn patient_of(&self, patient_resource_id: &str) -> Result<Option<String>, ApiError> {
        let key = medmesh_node::records::resource_key("Patient", patient_resource_id)?;
        let patient = self.repository.patient_of_key(&key).await.map_err(ApiError::from)?;
        Ok(patient.map(|p| p.to_string()))
    }

    async fn everything(&self, patient_resource_id: &str) -> Result<Vec<Arc<RenderedResource>>, ApiError> {
        let all = self
            .repository
            .everything(patient_resource_id)
            .await
            .map_err(ApiError::from)?;
        if let Some(first) = all.first() {
            self.audit_read(std::slice::from_ref(first)).await?;
        }
        Ok(all)
    }

    async fn submit(&self, kind: ItemKind, bytes: Vec<u8>) -> Result<Value, ApiError> {
        let report = self
            .node
            .ingest(vec![Item::new(kind, bytes)], Source::LocalApp(APP.to_owned()))
            .await
            .map_err(ApiError::from)?;
        if let Some(rejected) = report.rejected.first() {
            return Err(ApiError::Unprocessable(vec![Issue::error(
                IssueType::Invalid,
                format!("{} rejected: {}", rejected.kind.as_str(), rejected.error),
            )]));
        }
        Ok(json!({
            "accepted": report.counts.accepted,
            "pending": report.counts.pending,
            "duplicates": report.counts.duplicates,
        }))
    }

    async fn holdings(&self, patient_did: &str) -> Result<Value, ApiError> {
        let patient = parse_did(patient_did)?;
        let holdings = self.node.holdings(&patient).map_err(ApiError::from)?;
        serde_json::to_value(holdings).map_err(|_| ApiError::Internal)
    }

    async fn outbox(&self, patient_did: &str) -> Result<Value, ApiError> {
        let patient = parse_did(patient_did)?;
        let report = match &self.sync {
            Some(sync) => sync.outbox(patient).await.map_err(|e| {
                tracing::error!(cause = %e, "reading the outbox failed");
                ApiError::Internal
            })?,
            // No sync, no delivery: nothing is owed from here.
            None => medmesh_sync::wire::OutboxReport::default(),
        };
        Ok(crate::delivery::report_json(&patient, &report))
    }

    async fn consents(&self, patient_did: &str) -> Result<Vec<Value>, ApiError> {
        let patient = parse_did(patient_did)?;
        let now = medmesh_crypto::now();
        Ok(self
            .node
            .grants(&patient)
            .iter()
            .map(|g| views::consent(g, self.node.is_revoked(&patient, &g.id()), now))
            .collect())
    }

    async fn audit_events(&self, patient_did: &str) -> Result<Vec<Value>, ApiError> {
        let patient = parse_did(patient_did)?;
        let peer = self.node.practice_id().to_string();
        Ok(self
            .node
            .audit_entries(Some(&patient))
            .map_err(ApiError::from)?
            .iter()
            .map(|e| views::audit_event(e, &peer))
            .collect())
    }

    async fn sync_status(&self) -> Value {
        let mut status = json!({
            "peer_id": self.node.practice_id().to_string(),
            "pending": self.node.pending_count().unwrap_or(0),
            "rejected": self.node.rejected_count().unwrap_or(0),
        });
        if let Some(sync) = &self.sync {
            let peers: Vec<String> = sync
                .connected_peers()
                .await
                .map(|p| p.iter().map(ToString::to_string).collect())
                .unwrap_or_default();
            let listen: Vec<String> = sync
                .listen_addrs()
                .await
                .map(|a| a.iter().map(ToString::to_string).collect())
                .unwrap_or_default();
            status["connected"] = json!(peers);
            status["listen"] = json!(listen);
            if let Ok(s) = sync.status().await {
                status["sync"] = json!({
                    "peers": s.peers,
                    "items_sent": s.items_sent,
                    "items_received": s.items_received,
                    "items_accepted": s.items_accepted,
                    "items_rejected": s.items_rejected,
                    "items_pending": s.items_pending,
                    "bytes_sent": s.bytes_sent,
                    "bytes_received": s.bytes_received,
                    "sync_lag_seconds": s.sync_lag.map(|d| d.as_secs_f64()),
                    "outbox": s.outbox,
                });
            }
        }
        status
    }

    async fn sync_with(&self, peer: &str) -> Result<Value, ApiError> {
        let Some(sync) = &self.sync else {
            return Err(ApiError::NotFound {
                resource_type: "peer".to_owned(),
                id: peer.to_owned(),
            });
        };
        let peer_id: medmesh_sync::PeerId = peer.parse().map_err(|_| ApiError::InvalidParam {
            param: "peer".to_owned(),
            reason: "not a PeerId".to_owned(),
        })?;
        match sync.sync_now(peer_id).await {
            Ok(report) => Ok(json!({
                "peer": peer,
                "received": report.received,
                "accepted": report.ingest.accepted,
                "duplicates": report.ingest.duplicates,
                "pending": report.ingest.pending,
                "rejected": report.ingest.rejected,
            })),
            Err(e) => Err(ApiError::Conflict(format!("sync with {peer} failed: {e}"))),
        }
    }

    async fn audit_log(&self, patient_did: Option<&str>) -> Result<Value, ApiError> {
        let patient = patient_did.map(parse_did).transpose()?;
        let entries = self.node.audit_entries(patient.as_ref()).map_err(ApiError::from)?;
        Ok(json!({ "entries": entries }))
    }

    async fn audit_verify(&self) -> Result<Value, ApiError> {
        match self.node.audit_verify() {
            Ok(v) => Ok(json!({ "intact": true, "entries": v.entries, "checkpoint": v.checkpoint })),
            Err(e @ medmesh_node::Error::AuditBroken(at)) => {
                Ok(json!({ "intact": false, "broken_at": at.seq, "reason": e.to_string() }))
            }
            Err(e @ medmesh_node::Error::AuditTruncated { entries, checkpoint }) => Ok(json!({
                "intact": false, "entries": entries, "checkpoint": checkpoint, "reason": e.to_string()
            })),
            Err(e @ medmesh_node::Error::AuditRewritten { seq }) => {
                Ok(json!({ "intact": false, "checkpoint": seq, "reason": e.to_string() }))
            }
            Err(e) => Err(ApiError::from(e)),
        }
    }

    fn new_id(&self) -> String {
        repository::new_resource_id().unwrap_or_else(|_| {
            // Only if the OS has no randomness: unique within this process, never reused.
            static NEXT: AtomicU64 = AtomicU64::new(0);
            format!("t{}-{}", medmesh_crypto::now(), NEXT.fetch_add(1, Ordering::Relaxed))
        })
    }

    /// Runs the transaction on the repository ([`Repository::transaction`]:
    /// patients resolved, conditional creates re-checked, reads checked
    /// before anything is written, one change per touched document in one
    /// durable batch), then records every read of it in the audit log before
    /// answering, as a read over HTTP would be.
    async fn transaction(&self, ops: Vec<TxOp>) -> Result<Vec<TxResult>, TxFailure> {
        let results = self
            .repository
            .transaction(ops, Self::actor())
            .await
            .map_err(|e| TxFailure {
                op: e.op,
                error: ApiError::from(e.error),
            })?;
        let mut read = Vec::new();
        let mut first_read = None;
        for (i, result) in results.iter().enumerate() {
            match result {
                TxResult::Read(r) => read.push(r.clone()),
                TxResult::Found(found) => read.extend(found.iter().cloned()),
                _ => continue,
            }
            first_read.get_or_insert(i);
        }
        if let Some(op) = first_read {
            self.audit_read(&read).await.map_err(|error| TxFailure { op, error })?;
        }
        Ok(results)
    }

    fn write_metrics(&self, out: &mut String) {
        let pending = self.node.pending_count().unwrap_or(0);
        let rejected = self.node.rejected_count().unwrap_or(0);
        let seq = self.node.last_seq();
        out.push_str(&format!(
            "# TYPE medmesh_node_items_stored counter\nmedmesh_node_items_stored_total {seq}\n\
             # TYPE medmesh_node_items_pending gauge\nmedmesh_node_items_pending {pending}\n\
             # TYPE medmesh_node_items_rejected counter\nmedmesh_node_items_rejected_total {rejected}\n"
        ));
        let gauges = self.gauges.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        out.push_str(&format!(
            "# TYPE medmesh_node_store_bytes gauge\n# UNIT medmesh_node_store_bytes bytes\nmedmesh_node_store_bytes {}\n",
            gauges.store_bytes
        ));
        out.push_str(&format!(
            "# TYPE medmesh_node_records_incomplete gauge\nmedmesh_node_records_incomplete {}\n",
            gauges.incomplete_records
        ));
        if let Some(s) = &gauges.sync {
            let counters = [
                ("items_sent", s.items_sent),
                ("items_received", s.items_received),
                ("items_accepted", s.items_accepted),
                ("items_rejected", s.items_rejected),
                ("items_pending", s.items_pending),
                ("bytes_sent", s.bytes_sent),
                ("bytes_received", s.bytes_received),
                ("requests_sent", s.requests_sent),
                ("requests_received", s.requests_received),
                ("requests_refused_busy", s.refused_busy),
                ("items_pending_refused", s.items_pending_refused),
                ("forwards_dropped", s.dropped),
                ("reconciliations", s.reconciliations),
                ("reconciliations_failed", s.reconciliations_failed),
                ("items_unwanted", s.items_unwanted),
                ("dials_limited", s.dials_limited),
            ];
            for (name, value) in counters {
                out.push_str(&format!(
                    "# TYPE medmesh_sync_{name} counter\nmedmesh_sync_{name}_total {value}\n"
                ));
            }
            out.push_str(&format!(
                "# TYPE medmesh_sync_peers gauge\nmedmesh_sync_peers {}\n",
                s.peers
            ));
            out.push_str(&format!(
                "# TYPE medmesh_sync_outbox_items gauge\nmedmesh_sync_outbox_items {}\n",
                s.outbox
            ));
            if let Some(lag) = s.sync_lag {
                out.push_str(&format!(
                    "# TYPE medmesh_sync_lag_seconds gauge\n# UNIT medmesh_sync_lag_seconds seconds\nmedmesh_sync_lag_seconds {}\n",
                    lag.as_secs_f64()
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medmesh_crypto::{Collection, SecretIdentity};
    use medmesh_node::testing::TestPatient;

    fn patient_resource(patient: &PatientId) -> Value {
        json!({"resourceType": "Patient",
               "identifier": [{"system": "urn:ietf:rfc:3986", "value": patient.to_string()}]})
    }

    fn observation(subject: &str) -> Value {
        json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
               "subject": {"reference": subject}})
    }

    fn create(id: &str, resource: Value) -> TxOp {
        TxOp::Create {
            id: id.to_owned(),
            resource,
            if_none_exist: None,
        }
    }

    /// Issue 15 item 5 on a real node: a transaction files each create under
    /// the patient its compartment references name, whatever the entry order;
    /// a reference to a patient not held is a 422 at that op, nothing written;
    /// a resource naming no patient goes with the transaction's one patient,
    /// and with two patients it cannot be filed.
    #[tokio::test]
    async fn a_transaction_files_nothing_under_a_guessed_patient() {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::open(
            dir.path(),
            SecretIdentity::from_seed(&[1; 32]),
            medmesh_node::Config::default(),
        )
        .await
        .unwrap();
        let mut x = TestPatient::new().unwrap();
        let mut y = TestPatient::new().unwrap();
        for p in [&mut x, &mut y] {
            for c in [Collection::Core, Collection::Labs] {
                let (_, items) = p.onboard(node.practice_id(), c).unwrap();
                node.submit(p.id(), items).await.unwrap();
            }
        }
        let repository = Repository::new(node.clone(), repository::Config::default()).unwrap();
        let backend = NodeBackend::new(node.clone(), repository.clone(), None, dir.path().to_path_buf());
        let organization = json!({"resourceType": "Organization", "name": "Clinic"});

        let unknown = backend
            .transaction(vec![
                create("px", patient_resource(&x.id())),
                create("o1", observation("Patient/someone-else")),
            ])
            .await
            .unwrap_err();
        assert_eq!((unknown.op, unknown.error.status()), (1, 422), "{unknown:?}");
        assert!(node.envelope_ids(&x.id(), Collection::Core).unwrap().is_empty());

        backend
            .transaction(vec![
                create("o2", observation("Patient/px")),
                create("px", patient_resource(&x.id())),
                create("org1", organization.clone()),
            ])
            .await
            .unwrap();
        assert_eq!(
            repository.location("Observation", "o2").await.unwrap(),
            (x.id(), Collection::Labs)
        );
        assert_eq!(
            repository.location("Organization", "org1").await.unwrap(),
            (x.id(), Collection::Core)
        );

        let two = backend
            .transaction(vec![
                create("py", patient_resource(&y.id())),
                create("o3", observation("Patient/py")),
                create("o4", observation("Patient/px")),
                create("org2", organization),
            ])
            .await
            .unwrap_err();
        assert_eq!((two.op, two.error.status()), (3, 422), "{two:?}");
        assert!(node.envelope_ids(&y.id(), Collection::Core).unwrap().is_empty());
    }
}

#[cfg(test)]
mod audit_fail_closed {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use medmesh_crypto::{Collection, SecretIdentity};
    use medmesh_node::store::SledStore;
    use medmesh_node::testing::{FlushControl, TestPatient};

    use super::*;

    /// Issue 15, item 8 (fail closed): once the audit log cannot take an
    /// entry durably (here every flush fails), a read, a search and
    /// `$everything` of a patient's record answer 503 with an
    /// OperationOutcome and carry none of the record.
    #[tokio::test]
    async fn a_read_whose_audit_entry_cannot_be_written_is_refused_with_503() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FlushControl::new(
            SledStore::open(&dir.path().join("store")).unwrap(),
            Duration::ZERO,
        ));
        let node = Node::with_store(
            store.clone(),
            SecretIdentity::from_seed(&[21; 32]),
            medmesh_node::Config::default(),
        )
        .await
        .unwrap();
        let mut patient = TestPatient::new().unwrap();
        let (_, items) = patient.onboard(node.practice_id(), Collection::Core).unwrap();
        node.submit(patient.id(), items).await.unwrap();
        let repository = Repository::new(node.clone(), repository::Config::default()).unwrap();
        let backend = Arc::new(NodeBackend::new(
            node.clone(),
            repository,
            None,
            dir.path().join("store"),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = medmesh_gateway::router(
            backend,
            medmesh_gateway::Token::new("secret"),
            medmesh_gateway::Config::for_addr(addr),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(medmesh_gateway::serve(listener, router, async move {
            let _ = stopped.await;
        }));
        let client = reqwest::Client::new();
        let base = format!("http://{addr}/fhir");

        let created = client
            .post(format!("{base}/Patient"))
            .bearer_auth("secret")
            .header("content-type", "application/fhir+json")
            .body(
                json!({
                    "resourceType": "Patient",
                    "identifier": [{"system": "urn:ietf:rfc:3986", "value": patient.id().to_string()}],
                    "name": [{"family": "Lovelace"}]
                })
                .to_string(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 201);
        let id = created.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let read = client
            .get(format!("{base}/Patient/{id}"))
            .bearer_auth("secret")
            .send()
            .await
            .unwrap();
        assert_eq!(read.status(), 200);

        store.fail_flushes(true);
        for path in [
            format!("Patient/{id}"),
            format!("Patient?_id={id}"),
            format!("Patient/{id}/$everything"),
        ] {
            let response = client
                .get(format!("{base}/{path}"))
                .bearer_auth("secret")
                .send()
                .await
                .unwrap();
            let status = response.status();
            let body = response.text().await.unwrap();
            assert_eq!(
                status, 503,
                "GET {path} was served although its read could not be audited: {body}"
            );
            assert!(
                body.contains("OperationOutcome") && !body.contains("Lovelace"),
                "{body}"
            );
        }
        let _ = stop.send(());
        server.await.unwrap().unwrap();
        node.close().await;
    }
}
