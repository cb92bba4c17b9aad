//! `medmesh demo`: two practices and a patient on loopback, consent at
//! work, every step checked. It runs this very binary as separate
//! processes — the same commands a person would type — in a temporary home
//! that is removed at the end.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt as _;
use tokio::process::{Child, Command};

use crate::output::Output;

const PASSPHRASE: &str = "demo passphrase: not for real records";
const WAIT: Duration = Duration::from_secs(30);

struct Demo<'a> {
    exe: PathBuf,
    root: PathBuf,
    out: &'a Output,
    http: reqwest::Client,
    step: usize,
    started: Instant,
}

/// One practice node process.
struct Practice {
    name: &'static str,
    child: Child,
    peer_id: String,
    listen: String,
    gateway: String,
    token: String,
}

impl Practice {
    async fn stop(mut self) -> Result<()> {
        if let Some(pid) = self.child.id() {
            // SIGTERM: the node drains and flushes. `kill` keeps this crate free of unsafe.
            let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
        }
        match tokio::time::timeout(WAIT, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => bail!("practice {} exited with {status}", self.name),
            Ok(Err(e)) => Err(e).context("waiting for a practice to stop"),
            Err(_) => {
                let _ = self.child.kill().await;
                bail!("practice {} did not stop within {WAIT:?}", self.name)
            }
        }
    }
}

impl Demo<'_> {
    fn say(&mut self, what: &str, detail: Value) {
        self.step += 1;
        let elapsed = self.started.elapsed().as_secs_f64();
        let mut line = json!({"step": self.step, "ok": true, "what": what, "seconds": (elapsed * 10.0).round() / 10.0});
        if let (Some(obj), Value::Object(extra)) = (line.as_object_mut(), detail.clone()) {
            obj.extend(extra);
        }
        let human = match detail {
            Value::Object(ref m) if !m.is_empty() => format!(
                "[{:>5.1}s] ✓ {what}\n          {}",
                elapsed,
                m.iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join("\n          ")
            ),
            _ => format!("[{elapsed:>5.1}s] ✓ {what}"),
        };
        self.out.result(&line, &human);
    }

    async fn start_practice(&self, name: &'static str) -> Result<Practice> {
        let home = self.root.join(name);
        let log = std::fs::File::create(self.root.join(format!("{name}.log")))?;
        let mut child = Command::new(&self.exe)
            .arg("--home")
            .arg(&home)
            .args(["--json", "node", "run"])
            .env_remove("MEDMESH_HOME")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting practice {name}"))?;
        let stdout = child.stdout.take().context("no stdout from the node")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .map_err(|_| anyhow!("practice {name} did not report ready within {WAIT:?}"))??
            .with_context(|| format!("practice {name} exited before it was ready (see {name}.log)"))?;
        let ready: Value = serde_json::from_str(&line).context("the node's ready line is not JSON")?;
        let field = |k: &str| {
            ready[k]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("ready line lacks {k}"))
        };
        let listen = ready["listen"]
            .as_array()
            .and_then(|l| l.iter().filter_map(Value::as_str).find(|a| a.contains("/tcp/")))
            .map(str::to_owned)
            .context("the node listens on no TCP address")?;
        let token = std::fs::read_to_string(home.join("node/gateway.token"))?
            .trim()
            .to_owned();
        Ok(Practice {
            name,
            peer_id: field("peer_id")?,
            gateway: field("gateway")?,
            listen,
            token,
            child,
        })
    }

    /// Runs a `medmesh patient …` command as the patient; its JSON lines.
    async fn patient(&self, args: &[&str]) -> Result<Vec<Value>> {
        let output = Command::new(&self.exe)
            .arg("--home")
            .arg(self.root.join("patient"))
            .arg("--json")
            .args(args)
            .env("MEDMESH_PASSPHRASE", PASSPHRASE)
            .env_remove("MEDMESH_HOME")
            .stdin(Stdio::null())
            .output()
            .await
            .context("running the patient CLI")?;
        if !output.status.success() {
            bail!(
                "`medmesh patient {}` failed: {}",
                args.first().copied().unwrap_or_default(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).context("patient CLI printed a non-JSON line"))
            .collect()
    }

    async fn post(&self, at: &Practice, resource: &Value) -> Result<Value> {
        let resource_type = resource["resourceType"].as_str().unwrap_or_default();
        let response = self
            .http
            .post(format!("{}/fhir/{resource_type}", at.gateway))
            .bearer_auth(&at.token)
            .header("content-type", "application/fhir+json")
            .body(resource.to_string())
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        if status.as_u16() != 201 {
            bail!("practice {} refused a {resource_type}: {status} {body}", at.name);
        }
        Ok(body)
    }

    async fn get(&self, at: &Practice, path: &str) -> Result<Value> {
        let response = self
            .http
            .get(format!("{}{path}", at.gateway))
            .bearer_auth(&at.token)
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        if !status.is_success() {
            bail!("practice {} answered {status} to {path}: {body}", at.name);
        }
        Ok(body)
    }

    /// Polls `check` until it returns `Some`, or fails after [`WAIT`].
    async fn until<T, F, Fut>(&self, what: &str, mut check: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>>>,
    {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(value) = check().await? {
                return Ok(value);
            }
            if Instant::now() > deadline {
                bail!("timed out after {WAIT:?} waiting for: {what}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn holdings_of(v: &Value, collection: &str) -> u64 {
    v["by_collection"][collection].as_u64().unwrap_or(0)
}

pub(crate) fn run(out: &Output) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let root = tempfile::Builder::new().prefix("medmesh-demo-").tempdir()?;
    let result = runtime.block_on(demo(root.path(), out));
    if result.is_err() {
        eprintln!("demo home kept for inspection: {}", root.keep().display());
    }
    result
}

async fn demo(root: &Path, out: &Output) -> Result<()> {
    let mut d = Demo {
        exe: std::env::current_exe().context("finding the medmesh binary")?,
        root: root.to_owned(),
        out,
        http: reqwest::Client::builder().timeout(WAIT).build()?,
        step: 0,
        started: Instant::now(),
    };
    let a = d.start_practice("a").await?;
    let b = d.start_practice("b").await?;
    d.say(
        "practices A and B are running (loopback, free ports)",
        json!({"A": a.listen, "B": b.listen}),
    );

    let did = d.patient(&["patient", "new"]).await?[0]["did"]
        .as_str()
        .context("no did")?
        .to_owned();
    d.say("patient created their keys", json!({"patient": did}));

    let g = d
        .patient(&["patient", "grant", "--node", &a.listen, "--to", &a.peer_id, "--write"])
        .await?;
    d.say(
        "patient granted A read-write on all collections but sensitive",
        json!({"grant": g[0]["grant_id"], "collections": g[0]["collections"]}),
    );

    let patient = d
        .post(
            &a,
            &json!({
                "resourceType": "Patient",
                "identifier": [{"system": "urn:ietf:rfc:3986", "value": did}],
                "name": [{"family": "Rivera", "given": ["Ana"]}],
                "gender": "female",
                "birthDate": "1968-04-12"
            }),
        )
        .await?;
    let pid = patient["id"].as_str().context("no patient id")?.to_owned();
    let subject = json!({"reference": format!("Patient/{pid}")});
    let record = [
        json!({"resourceType": "Condition", "subject": subject,
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006", "display": "Diabetes mellitus type 2"}]},
            "onsetDateTime": "2019-03-01"}),
        json!({"resourceType": "AllergyIntolerance", "patient": subject,
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "764146007", "display": "Penicillin"}]},
            "criticality": "high"}),
        json!({"resourceType": "Observation", "status": "final", "subject": subject,
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4", "display": "Hemoglobin A1c"}]},
            "effectiveDateTime": "2026-10-02", "valueQuantity": {"value": 7.20, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}}),
        json!({"resourceType": "Observation", "status": "final", "subject": subject,
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7", "display": "Glucose"}]},
            "effectiveDateTime": "2026-10-02", "valueQuantity": {"value": 6.90, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"}}),
        json!({"resourceType": "MedicationRequest", "status": "active", "intent": "order", "subject": subject,
            "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "860975", "display": "metformin 500 MG"}]},
            "authoredOn": "2026-10-02"}),
    ];
    for resource in &record {
        d.post(&a, resource).await?;
    }
    let at_a = d.get(&a, &format!("/api/holdings?patient={did}")).await?;
    d.say(
        "A's practice app wrote the record through A's FHIR gateway",
        json!({"resources": record.len() + 1, "A holds": at_a["by_collection"]}),
    );

    d.patient(&[
        "patient",
        "grant",
        "--node",
        &a.listen,
        "--to",
        &b.listen,
        "--collections",
        "core,labs",
    ])
    .await?;
    let (core, labs) = (holdings_of(&at_a, "core"), holdings_of(&at_a, "labs"));
    let at_b = d
        .until("B to hold the patient's core and labs", || async {
            let h = d.get(&b, &format!("/api/holdings?patient={did}")).await?;
            Ok((holdings_of(&h, "core") == core && holdings_of(&h, "labs") == labs).then_some(h))
        })
        .await?;
    if at_b["opaque"].as_u64() != Some(0) || holdings_of(&at_b, "medications") != 0 {
        bail!("B holds more than it was granted: {at_b}");
    }
    d.say(
        "patient granted B read on core+labs via A; B received exactly those, history included",
        json!({"B holds": at_b["by_collection"], "opaque at B": at_b["opaque"]}),
    );

    let labs_at_b = d.get(&b, &format!("/fhir/Observation?patient={pid}")).await?;
    let meds_at_b = d.get(&b, &format!("/fhir/MedicationRequest?patient={pid}")).await?;
    if labs_at_b["total"] != 2 || meds_at_b["total"] != 0 {
        bail!(
            "B's gateway shows {} labs and {} medications",
            labs_at_b["total"],
            meds_at_b["total"]
        );
    }
    d.say(
        "B's practice app reads the labs through B's gateway; no medications are there",
        json!({"Observations at B": labs_at_b["total"], "MedicationRequests at B": meds_at_b["total"]}),
    );

    let grants = d.patient(&["patient", "grants"]).await?;
    let b_grant = grants
        .iter()
        .find(|g| g["grantee"] == b.peer_id.as_str())
        .and_then(|g| g["grant_id"].as_str())
        .context("no grant to B in the keystore")?
        .to_owned();
    let revoked = d.patient(&["patient", "revoke", "--node", &a.listen, &b_grant]).await?;
    d.say(
        "patient revoked B's grant via A; the core and labs keys were rotated",
        json!({"rotated": revoked[0]["rotated"], "notice": revoked[0]["notice"]}),
    );

    d.until("B to learn of the revocation", || async {
        let consents = d.get(&b, &format!("/fhir/Consent?patient={did}")).await?;
        let inactive = consents["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["resource"]["id"] == b_grant.as_str() && e["resource"]["status"] == "inactive");
        Ok(inactive.then_some(()))
    })
    .await?;
    d.post(
        &a,
        &json!({"resourceType": "Observation", "status": "final", "subject": subject,
            "code": {"coding": [{"system": "http://loinc.org", "code": "2823-3", "display": "Potassium"}]},
            "effectiveDateTime": "2026-11-20", "valueQuantity": {"value": 4.1, "unit": "mmol/L"}}),
    )
    .await?;
    let report = d
        .http
        .post(format!("{}/api/peers/{}/sync", b.gateway, a.peer_id))
        .bearer_auth(&b.token)
        .send()
        .await?
        .json::<Value>()
        .await?;
    let after_a = d.get(&a, &format!("/api/holdings?patient={did}")).await?;
    let after_b = d.get(&b, &format!("/api/holdings?patient={did}")).await?;
    // What B holds, not what it says of its completeness (which changes
    // with the revocation: B is granted nothing any more).
    let held = |h: &Value| ["envelopes", "readable", "opaque", "by_collection"].map(|k| h[k].clone());
    if holdings_of(&after_a, "labs") != labs + 1 || held(&after_b) != held(&at_b) {
        bail!("after the revocation and A's new lab: A holds {after_a}; B held {at_b}, holds {after_b}");
    }
    d.say(
        "A wrote a new lab; B pulled from A and received nothing new",
        json!({"A labs": holdings_of(&after_a, "labs"), "B labs": holdings_of(&after_b, "labs"), "B sync round": report}),
    );

    let mine = d.patient(&["patient", "records", "--node", &a.listen]).await?;
    d.say(
        "the patient fetched and decrypted their own record from A",
        json!({"resources": mine.len()}),
    );

    for practice in [&a, &b] {
        let verdict = d.get(practice, "/api/audit/verify").await?;
        if verdict["intact"] != true {
            bail!("practice {}'s audit chain is broken: {verdict}", practice.name);
        }
    }
    let log = d.get(&a, &format!("/api/audit?patient={did}")).await?;
    let to_b = log["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["action"] == "disclose" && e["actor_id"] == b.peer_id.as_str())
        .count();
    if to_b == 0 {
        bail!("A's audit log records no disclosure to B, though B received the record");
    }
    d.say(
        "both audit chains verify; A's log records its disclosures to B",
        json!({"disclosure entries naming B": to_b}),
    );

    a.stop().await?;
    b.stop().await?;
    d.say("both practices shut down cleanly; every step was verified", json!({}));
    Ok(())
}
