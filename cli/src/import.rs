//! `medmesh fhir import`: posts FHIR JSON files (resources and Bundles, e.g.
//! a Synthea output folder) to the running node's gateway.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use crate::home::Home;
use crate::node_cmd;
use crate::output::Output;

/// Largest file read; bigger ones are reported and skipped.
const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

fn collect(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("listing {}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("json"))
                .collect();
            entries.sort();
            files.extend(entries);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

/// Adds the did:key identifier that links a Patient to a medmesh patient.
fn link_patient(resource: &mut Value, did: &str) {
    if resource.get("resourceType").and_then(Value::as_str) != Some("Patient") {
        return;
    }
    let identifier = json!({"system": "urn:ietf:rfc:3986", "value": did});
    match resource.get_mut("identifier").and_then(Value::as_array_mut) {
        Some(list) => {
            if !list.contains(&identifier) {
                list.push(identifier);
            }
        }
        None => {
            if let Some(obj) = resource.as_object_mut() {
                obj.insert("identifier".to_owned(), Value::Array(vec![identifier]));
            }
        }
    }
}

/// What the body of one file becomes: a Bundle is posted to `/fhir` (a
/// collection Bundle is turned into a transaction of creates), a resource
/// to `/fhir/{type}`.
fn prepare(mut body: Value, did: Option<&str>) -> Result<(String, Value)> {
    let resource_type = body
        .get("resourceType")
        .and_then(Value::as_str)
        .context("not a FHIR resource: no resourceType")?
        .to_owned();
    if resource_type != "Bundle" {
        if let Some(did) = did {
            link_patient(&mut body, did);
        }
        return Ok((format!("/fhir/{resource_type}"), body));
    }
    let kind = body.get("type").and_then(Value::as_str).unwrap_or_default().to_owned();
    if let Some(entries) = body.get_mut("entry").and_then(Value::as_array_mut) {
        for entry in entries.iter_mut() {
            if let (Some(did), Some(resource)) = (did, entry.get_mut("resource")) {
                link_patient(resource, did);
            }
            if kind != "transaction" && kind != "batch" {
                let resource_type = entry
                    .pointer("/resource/resourceType")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                if let Some(obj) = entry.as_object_mut() {
                    obj.insert("request".to_owned(), json!({"method": "POST", "url": resource_type}));
                }
            }
        }
    }
    if kind != "transaction" && kind != "batch" {
        body["type"] = json!("transaction");
    }
    Ok(("/fhir".to_owned(), body))
}

pub(crate) fn run(
    home: &Home,
    paths: &[PathBuf],
    did: Option<&str>,
    gateway: Option<String>,
    out: &Output,
) -> Result<()> {
    if let Some(did) = did {
        did.parse::<medmesh_crypto::PatientId>()
            .map_err(|e| anyhow::anyhow!("--patient {did:?}: {e}"))?;
    }
    let dir = home.node_dir();
    let base = match gateway {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => match node_cmd::running(&dir) {
            Some(running) => running.gateway,
            None => bail!(
                "no running node in {}; start one with `medmesh node run` or pass --gateway URL",
                dir.display()
            ),
        },
    };
    let token = node_cmd::read_token(&dir)?;
    let files = collect(paths)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let client = reqwest::Client::new();
    let bar = if out.is_json() {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(files.len() as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut failed = 0;
    for file in &files {
        bar.set_message(file.display().to_string());
        let result = runtime.block_on(import_one(&client, &base, &token, file, did));
        bar.inc(1);
        match result {
            Ok(summary) => bar.suspend(|| {
                out.result(
                    &json!({"file": file.display().to_string(), "ok": true, "status": summary.0, "resources": summary.1}),
                    &format!("ok     {} ({} resources)", file.display(), summary.1),
                )
            }),
            Err(e) => {
                failed += 1;
                bar.suspend(|| {
                    out.result(
                        &json!({"file": file.display().to_string(), "ok": false, "error": format!("{e:#}")}),
                        &format!("FAILED {}: {e:#}", file.display()),
                    )
                });
            }
        }
    }
    bar.finish_and_clear();
    if failed > 0 {
        bail!(
            "{failed} of {} files were not imported (see above); the others were",
            files.len()
        );
    }
    Ok(())
}

async fn import_one(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    file: &Path,
    did: Option<&str>,
) -> Result<(u16, usize)> {
    let size = std::fs::metadata(file)
        .with_context(|| format!("reading {}", file.display()))?
        .len();
    if size > MAX_FILE_BYTES {
        bail!("file is {size} bytes, over the {MAX_FILE_BYTES}-byte import limit");
    }
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let body: Value = serde_json::from_slice(&bytes).context("not JSON")?;
    let (path, body) = prepare(body, did)?;
    let response = client
        .post(format!("{base}{path}"))
        .bearer_auth(token)
        .header("content-type", "application/fhir+json")
        .body(body.to_string())
        .send()
        .await
        .with_context(|| format!("posting to {base}"))?;
    let status = response.status().as_u16();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    if !(200..300).contains(&status) {
        let why: Vec<String> = answer
            .get("issue")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|i| i.get("diagnostics").and_then(Value::as_str).map(str::to_owned))
            .collect();
        bail!("gateway answered {status}: {}", why.join("; "));
    }
    let count = answer.get("entry").and_then(Value::as_array).map_or(1, Vec::len);
    Ok((status, count))
}
