//! `patient records` and `patient export`: fetching the patient's envelopes
//! from a node, opening them with the keystore's keys and rendering the
//! record.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context as _, Result, anyhow};
use medmesh_crypto::{Collection, Envelope, Keystore, now};
use medmesh_node::records::{DecodedChange, RecordDoc, RenderedResource};
use medmesh_sync::ItemKind;
use serde_json::{Value, json};

use super::keystore::open_keystore;
use super::revoke::end_expired_grants;
use super::session::Session;
use crate::home::Home;
use crate::output::Output;

/// Decrypts every envelope of this patient that the node holds with the
/// keystore's keys and renders the record, collection by collection.
async fn fetch_record(keystore: &Keystore, node: &str) -> Result<Vec<Arc<RenderedResource>>> {
    let session = Session::open(keystore, node).await?;
    let items = session.pull().await;
    session.close().await;
    let mut by_collection: BTreeMap<Collection, Vec<DecodedChange>> = BTreeMap::new();
    let mut unreadable = 0usize;
    for stored in items? {
        if stored.item.kind != ItemKind::Envelope {
            continue;
        }
        let Ok(envelope) = Envelope::decode(&stored.item.bytes) else {
            unreadable += 1;
            continue;
        };
        let h = envelope.header();
        // By the whole (patient, collection, epoch, key id): a key id alone
        // is one any patient can copy.
        let Some(key) = keystore.keys.iter().find(|k| k.key_ref() == h.key_ref()) else {
            unreadable += 1;
            continue;
        };
        let mut decoded = None;
        let opened = envelope.open(key, |plain| {
            let change = DecodedChange::from_bytes(plain).ok()?;
            let hash = change.hash().0;
            decoded = Some(change);
            Some(hash)
        });
        match (opened, decoded) {
            (Ok(_), Some(change)) => by_collection.entry(h.collection).or_default().push(change),
            _ => unreadable += 1,
        }
    }
    if unreadable > 0 {
        tracing::warn!(
            unreadable,
            "some envelopes could not be opened with this keystore's keys"
        );
    }
    let mut resources = Vec::new();
    let patient = keystore.patient();
    for (collection, changes) in by_collection {
        let mut doc = RecordDoc::new();
        doc.apply_changes(changes);
        let rendered = doc.resources().map_err(|e| anyhow!("rendering your record: {e}"))?;
        // What a grantee wrote against the record's rules is shown by no node; nor here.
        resources.extend(
            rendered
                .into_iter()
                .filter(|r| medmesh_node::records::belongs(&r.json, &patient, collection)),
        );
    }
    Ok(resources)
}

pub(super) async fn records(home: &Home, node: &str, resource_type: Option<&str>, out: &Output) -> Result<()> {
    let (mut keystore, passphrase) = open_keystore(home)?;
    end_expired_grants(home, &mut keystore, &passphrase, node, out).await?;
    let resources = fetch_record(&keystore, node).await?;
    let mut shown = 0;
    for r in resources
        .iter()
        .filter(|r| resource_type.is_none_or(|t| r.resource_type() == t))
    {
        shown += 1;
        out.result(
            &r.json,
            &format!("{:<28} {}  {}", r.key, r.last_updated, summary(&r.json)),
        );
    }
    if !out.is_json() {
        println!("{shown} resources");
    }
    Ok(())
}

/// One line about a resource for people: its code or name text.
fn summary(resource: &Value) -> String {
    let text = |v: &Value| -> Option<String> {
        v.get("text").and_then(Value::as_str).map(str::to_owned).or_else(|| {
            v.pointer("/coding/0/display")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
    };
    resource
        .get("code")
        .and_then(text)
        .or_else(|| resource.get("vaccineCode").and_then(text))
        .or_else(|| resource.get("medicationCodeableConcept").and_then(text))
        .or_else(|| {
            resource.pointer("/name/0").map(|n| {
                let given: Vec<&str> = n
                    .get("given")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                format!(
                    "{} {}",
                    given.join(" "),
                    n.get("family").and_then(Value::as_str).unwrap_or("")
                )
            })
        })
        .unwrap_or_default()
}

pub(super) async fn export(home: &Home, node: &str, output: &std::path::Path, out: &Output) -> Result<()> {
    let (mut keystore, passphrase) = open_keystore(home)?;
    end_expired_grants(home, &mut keystore, &passphrase, node, out).await?;
    let resources = fetch_record(&keystore, node).await?;
    let entries: Vec<Value> = resources
        .iter()
        .map(|r| json!({"fullUrl": format!("urn:medmesh:{}", r.key), "resource": r.json}))
        .collect();
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": medmesh_node::records::format_instant(i64::try_from(now()).unwrap_or(i64::MAX)),
        "entry": entries,
    });
    let bytes = serde_json::to_vec_pretty(&bundle)?;
    medmesh_crypto::write_atomically(output, &bytes).with_context(|| format!("writing {}", output.display()))?;
    out.result(
        &json!({"file": output.display().to_string(), "resources": resources.len()}),
        &format!(
            "wrote {} resources to {} (FHIR R4 collection Bundle)",
            resources.len(),
            output.display()
        ),
    );
    Ok(())
}
