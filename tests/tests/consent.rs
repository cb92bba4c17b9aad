//! Consent-gated replication end to end (issue 6, DESIGN §5, §6, §9):
//! real practice nodes (`Node` on sled in temporary directories, the FHIR
//! `Repository` over it, `SyncHandle` over `NodeBackend`) and a patient who
//! is a libp2p peer with the patient key as identity (as `cli/src/patient.rs`
//! does), all in one process on `/ip4/127.0.0.1/tcp/0`, no mDNS.
//!
//! - a grant for `core,labs` via A moves exactly those FHIR resources to B
//!   (same JSON, same versionIds, history written before the grant), B
//!   holds nothing opaque, and C (connected, no grant) holds nothing;
//! - a revocation via A with new-epoch keys: B receives nothing new and
//!   cannot read the new epoch even when handed its envelope (invariant 6);
//! - read-write grants: concurrent edits of different fields of one
//!   resource on partitioned nodes both survive on both;
//! - invariant 5 across the wire: a marker written at A and synced to B is
//!   nowhere in either data directory.
//!
//! Waits poll a condition inside a timeout; no sleep synchronises anything.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use medmesh_crypto::{Access, Collection, Envelope, Grant, PatientId, PracticeId, Revocation, SecretIdentity, now};
use medmesh_node::records::RenderedResource;
use medmesh_node::repository::{self, Repository};
use medmesh_node::testing::CliPatient;
use medmesh_node::{Actor, Holdings, Node, Source};
use medmesh_sync::memory::MemoryBackend;
use medmesh_sync::{Config, Item, ItemKind, Multiaddr, NodeBackend, PeerId, SyncHandle};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(25);

/// Waits until `cond` holds, polling it inside a timeout.
async fn until(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !cond().await {
            tokio::time::sleep(POLL).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for: {what}"));
}

fn sync_config() -> Config {
    Config {
        // Only nudges, pushes, consent flows and explicit syncs move data.
        pull_interval: Duration::from_secs(3600),
        ..Config::loopback_tcp()
    }
}

fn app() -> Actor {
    Actor::local_app("consent-test")
}

// ----- practices ------------------------------------------------------

struct Practice {
    key: SecretIdentity,
    node: Node,
    repo: Repository,
    sync: SyncHandle,
    addr: Multiaddr,
    dir: tempfile::TempDir,
}

impl Practice {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretIdentity::generate().unwrap();
        let node = Node::open(dir.path(), SecretIdentity::from_seed(&key.seed()), Default::default())
            .await
            .unwrap();
        let repo = Repository::new(node.clone(), repository::Config::default()).unwrap();
        let (sync, addr) = start_sync(&key, &node).await;
        Self {
            key,
            node,
            repo,
            sync,
            addr,
            dir,
        }
    }

    fn id(&self) -> PracticeId {
        self.key.practice_id().unwrap()
    }

    fn peer(&self) -> PeerId {
        self.sync.local_peer_id()
    }

    async fn connect(&self, other: &Practice) {
        tokio::time::timeout(WAIT, self.sync.dial(other.addr.clone()))
            .await
            .expect("dial timed out")
            .unwrap();
    }

    fn holdings(&self, patient: &Patient) -> Holdings {
        self.node.holdings(&patient.id()).unwrap()
    }

    /// Takes this node off the network (its store and repository stay up).
    async fn go_offline(&self) {
        self.sync.shutdown().await.unwrap();
    }

    /// A fresh swarm over the same node (new port).
    async fn go_online(&mut self) {
        let (sync, addr) = start_sync(&self.key, &self.node).await;
        self.sync = sync;
        self.addr = addr;
    }

    /// Reads `Type/id` as it is now, or `None`.
    async fn read(&self, resource: &RenderedResource) -> Option<Arc<RenderedResource>> {
        self.repo.read(resource.resource_type(), resource.id()).await.ok()
    }
}

async fn start_sync(key: &SecretIdentity, node: &Node) -> (SyncHandle, Multiaddr) {
    let sync = SyncHandle::spawn(sync_config(), key, NodeBackend::new(node.clone()))
        .await
        .unwrap();
    let addrs = sync.listen_addrs().await.unwrap();
    assert!(
        addrs.iter().all(|a| a.to_string().starts_with("/ip4/127.0.0.1/tcp/")),
        "listening beyond loopback TCP: {addrs:?}"
    );
    (sync, addrs[0].clone())
}

// ----- the patient ------------------------------------------------------

/// The patient's CLI: a `CliPatient` (a real keystore deciding what a grant
/// and a revocation carry) and a libp2p session whose identity is the
/// patient key, on an in-memory store, with `Config::client()` (no consent
/// flows).
struct Patient {
    cli: CliPatient,
    sync: SyncHandle,
    store: Arc<MemoryBackend>,
    connected: BTreeSet<PeerId>,
}

impl Patient {
    async fn new() -> Self {
        let cli = CliPatient::new().unwrap();
        let store = Arc::new(MemoryBackend::new());
        let sync = SyncHandle::spawn(Config::client(), cli.identity(), store.clone())
            .await
            .unwrap();
        Self {
            cli,
            sync,
            store,
            connected: BTreeSet::new(),
        }
    }

    fn id(&self) -> PatientId {
        self.cli.id()
    }

    fn did(&self) -> String {
        self.id().to_string()
    }

    async fn reach(&mut self, node: &Practice) {
        if self.connected.insert(node.peer()) {
            tokio::time::timeout(WAIT, self.sync.dial(node.addr.clone()))
                .await
                .expect("patient dial timed out")
                .unwrap();
        }
    }

    async fn push(&mut self, node: &Practice, items: Vec<Item>, hints: Vec<Multiaddr>) {
        self.reach(node).await;
        let count = items.len();
        let report = tokio::time::timeout(WAIT, self.sync.push(node.peer(), items, hints))
            .await
            .expect("push timed out")
            .unwrap();
        assert_eq!(report.rejected, 0, "{report:?} of {count} items");
    }

    /// `medmesh patient grant --node via --to to [--write]`: what
    /// `Keystore::grant` makes (the grant, epoch-0 keys where none exist
    /// with the patient's own share, the grantee's shares of every epoch)
    /// and the patient's other live grants, submitted to `via` with the
    /// grantee's address as a hint.
    async fn grant(&mut self, via: &Practice, to: &Practice, collections: &[Collection], access: Access) -> Grant {
        let (index, items) = self
            .cli
            .grant(
                to.id(),
                collections,
                access,
                now() - 60_000,
                None,
                vec![via.addr.to_string()],
            )
            .unwrap();
        let hints = if via.peer() == to.peer() {
            Vec::new()
        } else {
            vec![to.addr.clone()]
        };
        self.push(via, items, hints).await;
        self.cli.grants[index].grant.clone()
    }

    /// `medmesh patient revoke --node via`: the cut from the envelopes `via`
    /// serves the patient, then `Keystore::revoke` and `rotate` (a new epoch
    /// of every covered collection for the remaining readers and the
    /// patient), submitted to `via`.
    async fn revoke(&mut self, via: &Practice, grant: &Grant) -> Revocation {
        self.reach(via).await;
        tokio::time::timeout(WAIT, self.sync.sync_now(via.peer()))
            .await
            .expect("patient pull timed out")
            .unwrap();
        let served: Vec<Item> = self.store.items().into_iter().map(|stored| stored.item).collect();
        let held = CliPatient::held_under(grant, &served);
        let index = self.cli.index_of(grant).expect("a grant this patient issued");
        let items = self.cli.revoke(index, held, now()).unwrap().unwrap();
        self.push(via, items, Vec::new()).await;
        self.cli.grants[index].revocation.clone().unwrap()
    }
}

// ----- FHIR resources ---------------------------------------------------

fn patient_resource(did: &str, name: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": did}],
        "name": [{"family": "Lovelace", "given": ["Ada"], "text": name}],
        "gender": "unknown",
        "birthDate": "1815-12-10"
    })
}

fn subject(p: &RenderedResource) -> Value {
    json!({"reference": format!("Patient/{}", p.id())})
}

fn condition(p: &RenderedResource, note: &str) -> Value {
    json!({
        "resourceType": "Condition",
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003"}], "text": "Hypertension"},
        "subject": subject(p),
        "note": [{"text": note}]
    })
}

fn allergy(p: &RenderedResource) -> Value {
    json!({
        "resourceType": "AllergyIntolerance",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "91936005"}], "text": "Penicillin"},
        "patient": subject(p),
        "criticality": "high"
    })
}

fn observation(p: &RenderedResource, value: &str) -> Value {
    let value: Value = serde_json::from_str(value).unwrap();
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}], "text": "Glucose"},
        "subject": subject(p),
        "effectiveDateTime": "2026-01-02T08:30:00Z",
        "valueQuantity": {"value": value, "unit": "mmol/L"}
    })
}

fn medication(p: &RenderedResource) -> Value {
    json!({
        "resourceType": "MedicationRequest",
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": {"text": "Lisinopril 10 mg"},
        "subject": subject(p),
        "dosageInstruction": [{"text": "once daily"}]
    })
}

/// What A wrote of the patient, by collection.
struct Record {
    patient: Arc<RenderedResource>,
    core: Vec<Arc<RenderedResource>>,
    labs: Vec<Arc<RenderedResource>>,
    medications: Vec<Arc<RenderedResource>>,
}

async fn write_record(repo: &Repository, patient: &Patient, note: &str) -> Record {
    let p = repo
        .create(patient_resource(&patient.did(), "Ada Lovelace"), None, app())
        .await
        .unwrap();
    let mut core = vec![p.clone()];
    core.push(repo.create(condition(&p, note), None, app()).await.unwrap());
    core.push(repo.create(allergy(&p), None, app()).await.unwrap());
    let mut labs = Vec::new();
    for v in ["5.40", "6.10"] {
        labs.push(repo.create(observation(&p, v), None, app()).await.unwrap());
    }
    let medications = vec![repo.create(medication(&p), None, app()).await.unwrap()];
    for (collection, written) in [
        (Collection::Core, &core),
        (Collection::Labs, &labs),
        (Collection::Medications, &medications),
    ] {
        for r in written {
            assert_eq!(
                repo.location(r.resource_type(), r.id()).await.unwrap(),
                (patient.id(), collection),
                "{}",
                r.key
            );
        }
    }
    Record {
        patient: p,
        core,
        labs,
        medications,
    }
}

/// A with a read-write grant on all (epoch-0 keys, shares for A and the
/// patient), A's record written, and B granted `collections` via A.
struct Granted {
    patient: Patient,
    a: Practice,
    b: Practice,
    record: Record,
    grant_b: Grant,
}

/// `bystander`, if any, connects to A before anything is written.
async fn granted(b_collections: &[Collection], b_access: Access, note: &str, bystander: Option<&Practice>) -> Granted {
    let mut patient = Patient::new().await;
    let a = Practice::start().await;
    let b = Practice::start().await;
    if let Some(c) = bystander {
        c.connect(&a).await;
    }
    let all = Collection::parse_list("all").unwrap();
    patient.grant(&a, &a, &all, Access::ReadWrite).await;
    until("A can write every collection", async || {
        all.iter().all(|c| a.repo.check_writable(patient.id(), *c).is_ok())
    })
    .await;
    let record = write_record(&a.repo, &patient, note).await;
    let grant_b = patient.grant(&a, &b, b_collections, b_access).await;
    Granted {
        patient,
        a,
        b,
        record,
        grant_b,
    }
}

/// Waits until `at` renders every resource of `expected` exactly as it was
/// written (same JSON, same versionId).
async fn until_same(what: &str, at: &Practice, expected: &[Arc<RenderedResource>]) {
    until(what, async || {
        for r in expected {
            match at.read(r).await {
                Some(got) if got.version_id == r.version_id => {}
                _ => return false,
            }
        }
        true
    })
    .await;
    for r in expected {
        let got = at.read(r).await.unwrap();
        assert_eq!(got.json, r.json, "{}", r.key);
        assert_eq!(got.version_id, r.version_id, "{}", r.key);
    }
}

// ----- 1. a grant moves exactly the granted collections ---------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_via_a_moves_exactly_core_and_labs_to_b_and_nothing_to_c() {
    let started = tokio::time::Instant::now();
    let c = Practice::start().await;
    let g = granted(&[Collection::Core, Collection::Labs], Access::Read, "stable", Some(&c)).await;
    let (a, b, patient, record) = (&g.a, &g.b, &g.patient, &g.record);
    assert!(c.sync.connected_peers().await.unwrap().contains(&a.peer()));

    // B: the history written before the grant, core and labs, readable.
    let expected: Vec<_> = record.core.iter().chain(&record.labs).cloned().collect();
    until_same("B renders A's core and labs", b, &expected).await;
    let h = b.holdings(patient);
    assert_eq!((h.envelopes, h.readable, h.opaque), (5, 5, 0), "B holdings {h:?}");
    assert_eq!(
        h.by_collection,
        BTreeMap::from([("core".to_owned(), 3), ("labs".to_owned(), 2)]),
        "B holdings {h:?}"
    );
    assert!(!h.by_collection.contains_key("medications"));

    // An explicit pull and reconciliation bring nothing more.
    b.sync.sync_now(a.peer()).await.unwrap();
    b.sync.reconcile(a.peer(), patient.id()).await.unwrap();
    let after = b.holdings(patient);
    assert_eq!(
        (after.envelopes, after.readable, after.opaque, &after.by_collection),
        (h.envelopes, h.readable, h.opaque, &h.by_collection),
        "B's holdings moved after a full pull"
    );
    // And B knows it: the reconciliation with A found nothing missing.
    assert!(
        after.completeness.values().all(|c| c.complete) && after.completeness.len() == 2,
        "B after reconciling with A: {after:?}"
    );

    // Exactly those resources, nothing of medications.
    let mut served: Vec<String> = b
        .repo
        .patient_resources(patient.id())
        .await
        .unwrap()
        .iter()
        .map(|r| r.key.clone())
        .collect();
    served.sort();
    let mut want: Vec<String> = expected.iter().map(|r| r.key.clone()).collect();
    want.sort();
    assert_eq!(served, want);
    for m in &record.medications {
        assert!(b.read(m).await.is_none(), "B reads {}", m.key);
    }
    let found = b.repo.everything(record.patient.id()).await.unwrap();
    assert_eq!(found.len(), 5);

    // C: connected to A, no grant, holds nothing of the patient.
    c.sync.sync_now(a.peer()).await.unwrap();
    let r = c.sync.reconcile(a.peer(), patient.id()).await.unwrap();
    assert_eq!(r.received, 0, "C received items of the patient: {r:?}");
    let hc = c.holdings(patient);
    assert_eq!((hc.envelopes, hc.readable, hc.opaque), (0, 0, 0), "C holdings {hc:?}");
    assert!(
        c.node.grants(&patient.id()).is_empty(),
        "C learned the patient's grants"
    );
    let leaked: Vec<_> = c
        .node
        .items_after(0, 10_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.meta.patient == patient.id())
        .map(|i| i.meta.kind)
        .collect();
    assert!(leaked.is_empty(), "C holds items of the patient: {leaked:?}");
    assert!(c.read(&record.patient).await.is_none());

    // A's audit log names disclosures to B and none to C.
    let entries = format!("{:?}", a.node.audit_entries(Some(&patient.id())).unwrap());
    assert!(entries.contains(&b.peer().to_string()), "no disclosure to B audited");
    assert!(!entries.contains(&c.peer().to_string()), "disclosure to C audited");
    eprintln!("grant test: {:?}", started.elapsed());
}

// ----- 2. revocation: nothing new, no new epoch -----------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_b_via_a_stops_everything_new_and_b_cannot_read_the_new_epoch() {
    let started = tokio::time::Instant::now();
    let mut g = granted(&[Collection::Core, Collection::Labs], Access::Read, "stable", None).await;
    let expected: Vec<_> = g.record.core.iter().chain(&g.record.labs).cloned().collect();
    until_same("B renders A's core and labs", &g.b, &expected).await;
    let pid = g.patient.id();
    let grant_b = g.grant_b.clone();
    let a_before_revocation = g.a.node.last_seq();
    let revocation = g.patient.revoke(&g.a, &grant_b).await;
    assert!(revocation.terms().cut.is_empty(), "B wrote nothing: the cut is empty");
    let (a, b, record) = (&g.a, &g.b, &g.record);

    until(
        "A knows the revocation and holds epoch 1 of core and labs",
        async || {
            a.node.is_revoked(&pid, &grant_b.id())
                && [Collection::Core, Collection::Labs]
                    .iter()
                    .all(|c| a.node.current_epoch_key(&pid, *c).is_some_and(|k| k.epoch == 1))
        },
    )
    .await;
    assert_eq!(
        a.node.current_epoch_key(&pid, Collection::Medications).unwrap().epoch,
        0,
        "an uncovered collection rotated"
    );
    until("the revocation reaches B", async || {
        b.node.is_revoked(&pid, &grant_b.id())
    })
    .await;
    let before = b.holdings(&g.patient);
    let b_seq = b.node.last_seq();

    // A writes a new lab, under the new epoch.
    let a_seq = a.node.last_seq();
    let lab = a
        .repo
        .create(observation(&record.patient, "7.25"), None, app())
        .await
        .unwrap();
    let new_items = a.node.items_after(a_seq, 100).await.unwrap();
    let new_envelopes: Vec<_> = new_items.iter().filter(|i| i.meta.kind == ItemKind::Envelope).collect();
    assert_eq!(new_envelopes.len(), 1, "one write, one envelope");
    let envelope = new_envelopes[0].item.bytes.clone();
    let header = Envelope::decode(&envelope).unwrap().header().clone();
    assert_eq!((header.collection, header.epoch), (Collection::Labs, 1));

    // B pulls explicitly: nothing new.
    let pulled = b.sync.sync_now(a.peer()).await.unwrap();
    assert_eq!(pulled.ingest.accepted, 0, "{pulled:?}");
    // A may refuse a revoked peer's summary; if it answers, nothing new comes.
    if let Ok(r) = b.sync.reconcile(a.peer(), pid).await {
        assert_eq!(r.ingest.accepted, 0, "{r:?}");
    }
    assert_eq!(
        b.holdings(&g.patient),
        before,
        "B received something after the revocation ({pulled:?})"
    );
    let b_new: Vec<_> = b
        .node
        .items_after(b_seq, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.meta.kind == ItemKind::Envelope || i.meta.kind == ItemKind::KeyShare)
        .map(|i| i.meta.kind)
        .collect();
    assert!(b_new.is_empty(), "B stored new envelopes or key shares: {b_new:?}");

    // Handed the new envelope directly, B cannot read it.
    let report = b
        .node
        .ingest(vec![Item::new(ItemKind::Envelope, envelope)], Source::Peer(a.peer()))
        .await;
    if let Ok(report) = &report {
        assert_eq!(report.counts.readable, 0, "B opened a new-epoch envelope: {report:?}");
    }
    // Nor with every item A stored since the revocation, the new epoch's
    // key shares (for A and the patient) included.
    let handed: Vec<Item> = a
        .node
        .items_after(a_before_revocation, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.item)
        .collect();
    assert!(handed.iter().filter(|i| i.kind == ItemKind::KeyShare).count() >= 2);
    let report = b.node.ingest(handed, Source::Peer(a.peer())).await;
    if let Ok(report) = &report {
        assert_eq!((report.counts.readable, report.counts.unlocked), (0, 0), "{report:?}");
    }
    let after = b.holdings(&g.patient);
    assert_eq!(after.readable, before.readable, "B holdings {after:?}");
    assert!(after.envelopes <= before.envelopes + 1, "B holdings {after:?}");
    assert!(b.read(&lab).await.is_none(), "B renders the new lab");
    for c in [Collection::Core, Collection::Labs] {
        let key = b.node.current_epoch_key(&pid, c);
        assert!(
            key.as_ref().is_none_or(|k| k.epoch == 0),
            "B holds a key of a later epoch of {c:?}: epoch {:?}",
            key.map(|k| k.epoch)
        );
    }
    // What B already had stays readable there.
    for r in &expected {
        assert_eq!(b.read(r).await.unwrap().json, r.json);
    }
    // A and the patient can read the new lab.
    assert_eq!(a.read(&lab).await.unwrap().json, lab.json);
    eprintln!("revocation test: {:?}", started.elapsed());
}

// ----- 3. read-write: concurrent edits to different fields ----------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_edits_to_different_fields_survive_on_both() {
    let started = tokio::time::Instant::now();
    let mut g = granted(&[Collection::Core], Access::ReadWrite, "stable", None).await;
    let p = g.record.patient.clone();
    until_same("B renders the Patient", &g.b, std::slice::from_ref(&p)).await;
    until("B can write core", async || {
        g.b.repo.check_writable(g.patient.id(), Collection::Core).is_ok()
    })
    .await;

    // Partition: B leaves the network; both edit the same version.
    g.b.go_offline().await;
    let base = p.version_id.clone();
    let mut at_a = p.json.clone();
    at_a["birthDate"] = json!("1815-12-11");
    let edited_a =
        g.a.repo
            .update("Patient", p.id(), at_a, Some(&base), true, app())
            .await
            .unwrap();
    let mut at_b = p.json.clone();
    at_b["gender"] = json!("female");
    let edited_b =
        g.b.repo
            .update("Patient", p.id(), at_b, Some(&base), true, app())
            .await
            .unwrap();
    assert_ne!(edited_a.version_id, edited_b.version_id);
    assert_eq!(edited_a.json["gender"], "unknown");
    assert_eq!(edited_b.json["birthDate"], "1815-12-10");

    // Heal and sync both ways.
    g.b.go_online().await;
    let (a, b) = (&g.a, &g.b);
    b.connect(a).await;
    b.sync.sync_now(a.peer()).await.unwrap();
    a.sync.sync_now(b.peer()).await.unwrap();
    let merged = async |at: &Practice| at.read(&p).await.unwrap();
    until("both render both edits", async || {
        let (on_a, on_b) = (merged(a).await, merged(b).await);
        [&on_a, &on_b]
            .iter()
            .all(|r| r.json["birthDate"] == "1815-12-11" && r.json["gender"] == "female")
            && on_a.version_id == on_b.version_id
    })
    .await;
    let (on_a, on_b) = (merged(a).await, merged(b).await);
    assert_eq!(on_a.json, on_b.json);
    assert_eq!(on_a.json["name"], p.json["name"]);
    assert!(
        on_a.version_id == edited_a.version_id || on_a.version_id == edited_b.version_id,
        "the merged version is one of the two edits"
    );
    let ha = a.holdings(&g.patient);
    let hb = b.holdings(&g.patient);
    assert_eq!(ha.by_collection.get("core"), hb.by_collection.get("core"));
    assert_eq!((hb.opaque, ha.opaque), (0, 0));
    eprintln!("concurrent edit test: {:?}", started.elapsed());
}

// ----- 4. invariant 5 across the wire ---------------------------------------

fn needles(marker: &str) -> Vec<Vec<u8>> {
    medmesh_node::testing::plaintext_needles(marker)
}

fn scan_dir(dir: &Path, needles: &[Vec<u8>]) -> (usize, Vec<String>) {
    medmesh_node::testing::scan_for_plaintext(dir, needles).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marker_synced_from_a_to_b_is_nowhere_on_either_disk() {
    let started = tokio::time::Instant::now();
    let marker = format!("MEDMESH-PHI-MARKER-{}", repository::new_resource_id().unwrap());
    let g = granted(&[Collection::Core, Collection::Labs], Access::Read, &marker, None).await;
    let (a, b) = (&g.a, &g.b);
    let condition = g.record.core[1].clone();
    assert!(condition.json.to_string().contains(&marker));
    until_same("B renders the Condition", b, std::slice::from_ref(&condition)).await;
    assert!(b.read(&condition).await.unwrap().json.to_string().contains(&marker));
    // A second resource with the marker, after the grant, reaches B by nudge.
    let lab = a
        .repo
        .create(
            {
                let mut o = observation(&g.record.patient, "4.90");
                o["note"] = json!([{"text": format!("{marker} (fasting)")}]);
                o
            },
            None,
            app(),
        )
        .await
        .unwrap();
    until_same("B renders the new lab", b, std::slice::from_ref(&lab)).await;

    // Sealed snapshots too, then everything flushed and closed.
    a.repo.save_snapshots().await;
    b.repo.save_snapshots().await;
    for p in [a, b] {
        p.sync.shutdown().await.unwrap();
        p.node.close().await;
    }
    let needles = needles(&marker);
    for (name, p) in [("A", a), ("B", b)] {
        let (files, hits) = scan_dir(p.dir.path(), &needles);
        assert!(files > 0, "{name}: empty data dir");
        assert!(hits.is_empty(), "plaintext at rest on {name}: {hits:?}");
    }
    // The scan finds what it looks for.
    let probe = tempfile::tempdir().unwrap();
    for (i, n) in [
        marker.as_bytes().to_vec(),
        medmesh_node::testing::base64_unpadded(format!("ab{marker}").as_bytes()),
        marker.encode_utf16().flat_map(u16::to_le_bytes).collect(),
    ]
    .iter()
    .enumerate()
    {
        std::fs::write(probe.path().join(format!("f{i}")), n).unwrap();
    }
    assert_eq!(scan_dir(probe.path(), &needles).1.len(), 3);
    eprintln!("invariant 5 test: {:?}", started.elapsed());
}
