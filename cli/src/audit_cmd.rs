//! `medmesh audit verify|show`: the node's hash-chained audit log, through
//! the running node's gateway when one runs (sled allows one process), else
//! on the store directly. `verify` checks every link and that the log still
//! reaches the latest checkpoint the node signed (kept apart from the log).

use anyhow::{Context as _, Result, bail};
use medmesh_crypto::PatientId;
use serde_json::{Value, json};

use crate::home::Home;
use crate::node_cmd;
use crate::output::Output;

async fn get(base: &str, token: &str, path: &str) -> Result<(u16, Value)> {
    let response = reqwest::Client::new()
        .get(format!("{base}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("asking the running node at {base}"))?;
    let status = response.status().as_u16();
    let body = response.json().await.context("the node's answer is not JSON")?;
    Ok((status, body))
}

/// Opens the node's store when no node runs on it.
async fn open_offline(home: &Home) -> Result<medmesh_node::Node> {
    let dir = home.node_dir();
    let identity = node_cmd::load_identity(&dir)?;
    medmesh_node::Node::open(&dir, identity, medmesh_node::Config::default())
        .await
        .with_context(|| format!("opening the store in {}", dir.display()))
}

/// What `audit verify` found: intact (with the checkpoint the log reaches,
/// if one is kept) or broken, and why.
enum Verdict {
    Intact { entries: u64, checkpoint: Option<u64> },
    Broken { report: Value, reason: String },
}

fn verdict_of(result: medmesh_node::Result<medmesh_node::AuditVerified>) -> Result<Verdict> {
    use medmesh_node::Error;
    Ok(match result {
        Ok(v) => Verdict::Intact {
            entries: v.entries,
            checkpoint: v.checkpoint,
        },
        Err(e @ Error::AuditBroken(at)) => Verdict::Broken {
            report: json!({"intact": false, "broken_at": at.seq}),
            reason: format!("{e}: it or its link was altered"),
        },
        Err(e @ Error::AuditTruncated { entries, checkpoint }) => Verdict::Broken {
            report: json!({"intact": false, "entries": entries, "checkpoint": checkpoint}),
            reason: e.to_string(),
        },
        Err(e @ Error::AuditRewritten { seq }) => Verdict::Broken {
            report: json!({"intact": false, "checkpoint": seq}),
            reason: e.to_string(),
        },
        Err(e) => return Err(e).context("reading the audit log"),
    })
}

pub(crate) fn verify(home: &Home, out: &Output) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let dir = home.node_dir();
        let verdict = match node_cmd::running(&dir) {
            Some(running) => {
                let token = node_cmd::read_token(&dir)?;
                let (status, body) = get(&running.gateway, &token, "/api/audit/verify").await?;
                match (status, body.get("intact").and_then(Value::as_bool)) {
                    (200, Some(true)) => Verdict::Intact {
                        entries: body.get("entries").and_then(Value::as_u64).unwrap_or(0),
                        checkpoint: body.get("checkpoint").and_then(Value::as_u64),
                    },
                    (200, Some(false)) => Verdict::Broken {
                        reason: body
                            .get("reason")
                            .and_then(Value::as_str)
                            .unwrap_or("the audit chain is broken")
                            .to_owned(),
                        report: body,
                    },
                    _ => bail!("the running node answered {status} to an audit check: {body}"),
                }
            }
            None => {
                let node = open_offline(home).await?;
                let verdict = verdict_of(node.audit_verify());
                node.close().await;
                verdict?
            }
        };
        match verdict {
            Verdict::Intact { entries, checkpoint } => {
                let human = match checkpoint {
                    Some(seq) => format!(
                        "audit log intact: {entries} entries, every link verified, \
                         reaching the node-signed checkpoint at entry {seq}"
                    ),
                    None => format!(
                        "audit log intact: {entries} entries, every link verified; \
                         no signed checkpoint is kept, so a cut of its last entries would not show"
                    ),
                };
                out.result(
                    &json!({"intact": true, "entries": entries, "checkpoint": checkpoint}),
                    &human,
                );
                Ok(())
            }
            Verdict::Broken { report, reason } => {
                out.result(&report, &format!("audit log BROKEN: {reason}"));
                bail!("{reason}")
            }
        }
    })
}

pub(crate) fn show(home: &Home, patient: Option<&str>, out: &Output) -> Result<()> {
    let patient: Option<PatientId> = patient
        .map(|p| p.parse().map_err(|e| anyhow::anyhow!("--patient {p:?}: {e}")))
        .transpose()?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let dir = home.node_dir();
        let entries: Vec<Value> = match node_cmd::running(&dir) {
            Some(running) => {
                let token = node_cmd::read_token(&dir)?;
                let path = match &patient {
                    Some(p) => format!("/api/audit?patient={p}"),
                    None => "/api/audit".to_owned(),
                };
                let (status, body) = get(&running.gateway, &token, &path).await?;
                if status != 200 {
                    bail!("the running node answered {status}: {body}");
                }
                body.get("entries")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default()
            }
            None => {
                let node = open_offline(home).await?;
                let entries = node.audit_entries(patient.as_ref()).context("reading the audit log")?;
                node.close().await;
                entries
                    .iter()
                    .map(|e| serde_json::to_value(e).unwrap_or(Value::Null))
                    .collect()
            }
        };
        for entry in &entries {
            let human = format!(
                "#{:<5} {} {:<10} {:<9} {} {}",
                entry["seq"],
                entry["time"],
                entry["action"].as_str().unwrap_or("?"),
                entry["actor_kind"].as_str().unwrap_or("?"),
                entry["actor_id"].as_str().unwrap_or("?"),
                entry["outcome"].as_str().unwrap_or("")
            );
            out.result(entry, &human);
        }
        Ok(())
    })
}
