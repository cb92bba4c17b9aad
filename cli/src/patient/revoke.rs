//! `patient revoke`, and the ending of expired grants every command does
//! first: a revocation with its cut, then new epoch keys for the
//! collections it covered.

use std::collections::BTreeSet;

use anyhow::{Context as _, Result, anyhow, bail};
use medmesh_crypto::{ActorId, Collection, Envelope, Grant, Keystore, Principal, now};
use medmesh_sync::{Item, ItemKind};
use serde_json::{Value, json};

use super::grant::grant_named;
use super::keystore::{open_keystore, save_keystore};
use super::session::{Session, delivery_output, delivery_targets, item_ids};
use crate::home::Home;
use crate::output::Output;

pub(super) async fn revoke(home: &Home, node: &str, grant_id: &str, out: &Output) -> Result<()> {
    let (mut keystore, passphrase) = open_keystore(home)?;
    let expired = end_expired_grants(home, &mut keystore, &passphrase, node, out).await?;
    let grant = grant_named(&keystore, grant_id)?;
    let id = grant.id();
    if expired.iter().any(|e| e["expired_grant"] == id.to_string()) {
        out.result(
            &json!({"revoked": id.to_string(), "grantee": grant.terms().grantee.to_string(), "expired": expired}),
            &format!("grant {id} had expired; it is revoked now"),
        );
        return Ok(());
    }
    if keystore.is_revoked(&grant) {
        bail!("grant {id} is already revoked");
    }
    if !keystore.is_submitted(&grant) {
        // No node ever took it: revoked here, nothing to tell anyone, no key to rotate.
        keystore
            .revoke(&grant, [], now())
            .map_err(|e| anyhow!("signing the revocation of grant {id}: {e}"))?;
        save_keystore(home, &keystore, &passphrase)?;
        let notice = "no node ever took this grant; it is revoked in your keystore only";
        out.result(
            &json!({"revoked": id.to_string(), "grantee": grant.terms().grantee.to_string(), "rotated": [], "notice": notice, "expired": expired}),
            &format!("revoked grant {id}\nNote: {notice}."),
        );
        return Ok(());
    }
    let session = Session::open(&keystore, node).await?;
    let pulled = session.pull().await?;
    let now_ms = now();
    let revocation = keystore
        .revoke(&grant, held_under(&keystore, &grant, &pulled), now_ms)
        .map_err(|e| anyhow!("signing the revocation of grant {id}: {e}"))?;
    let mut items = vec![Item::revocation(&revocation)];
    let rotated = rotate(&mut keystore, &grant.terms().collections, now_ms, &mut items)?;
    // The revoked grant and the others still live go along, so the node reached
    // knows every practice it must forward the revocation to (see `grant`).
    items.push(Item::grant(&grant));
    items.extend(keystore.live_grants(now_ms).map(Item::grant));
    save_keystore(home, &keystore, &passphrase)?;
    let grantee = grant.terms().grantee;
    let ids = item_ids(&items);
    let targets = delivery_targets(&keystore, node, grantee, now_ms)?;
    let result = session.push(items, Vec::new()).await;
    let deliveries = match &result {
        Ok(_) => session.deliveries(keystore.patient(), &targets, &ids).await,
        Err(_) => Err(String::new()),
    };
    session.close().await;
    result?;
    let notice = "copies of your record that this practice already received remain with it; \
                  it receives nothing new and cannot read anything written from now on";
    let mut value = json!({"revoked": id.to_string(), "grantee": grantee.to_string(), "rotated": rotated, "notice": notice, "expired": expired});
    let delivery = delivery_output(&mut value, &deliveries);
    out.result(
        &value,
        &format!(
            "revoked grant {id} of {grantee}\nrotated keys: {}{delivery}\nNote: {notice}.",
            rotated_text(&rotated)
        ),
    );
    Ok(())
}

/// The changes of `grant`'s grantee written under it among `pulled` (what
/// the node reached holds), as (collection, actor, seq), for the cut of its
/// revocation ([`Keystore::revoke`]).
fn held_under(
    keystore: &Keystore,
    grant: &Grant,
    pulled: &[medmesh_sync::StoredItem],
) -> Vec<(Collection, ActorId, u64)> {
    let grantee = Principal::Practice(grant.terms().grantee);
    pulled
        .iter()
        .filter(|stored| stored.item.kind == ItemKind::Envelope)
        .filter_map(|stored| Envelope::decode(&stored.item.bytes).ok())
        .filter_map(|envelope| {
            let h = envelope.header();
            // The grant by (patient, id): another patient may reuse the id.
            (h.patient == keystore.patient() && h.author == grantee && h.grant_id == Some(grant.id())).then_some((
                h.collection,
                h.actor,
                h.seq,
            ))
        })
        .collect()
}

/// [`Keystore::rotate`], its key shares added to `items`; one JSON object
/// per collection rotated.
fn rotate(
    keystore: &mut Keystore,
    collections: &[Collection],
    now_ms: u64,
    items: &mut Vec<Item>,
) -> Result<Vec<Value>> {
    let rotated = keystore
        .rotate(collections, now_ms)
        .context("making the new epoch keys")?;
    Ok(rotated
        .into_iter()
        .map(|r| {
            items.extend(r.shares.iter().map(Item::key_share));
            json!({"collection": r.collection.as_str(), "epoch": r.epoch, "readers": r.readers.len()})
        })
        .collect())
}

fn rotated_text(rotated: &[Value]) -> String {
    rotated
        .iter()
        .map(|r| format!("{} (epoch {})", r["collection"].as_str().unwrap_or("?"), r["epoch"]))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Ends every grant in the keystore that has expired and was not ended yet
/// (issue 15): nodes stop serving an expired grant, but its holder can still
/// sign changes dated inside the window. So each one gets a revocation whose
/// cut holds what `node` has of its changes (any later change, however
/// dated, is invalid on every node), and the collections they covered get a
/// new epoch for the grants still live. Says so on stderr; returns one JSON
/// object per grant ended, for commands that print JSON. Reaches `node` only
/// when there is something to end.
pub(super) async fn end_expired_grants(
    home: &Home,
    keystore: &mut Keystore,
    passphrase: &str,
    node: &str,
    out: &Output,
) -> Result<Vec<Value>> {
    let now_ms = now();
    let expired: Vec<Grant> = keystore
        .grants
        .iter()
        .filter(|g| {
            g.terms().expires.is_some_and(|e| e <= now_ms) && !keystore.is_revoked(g) && keystore.is_submitted(g)
        })
        .cloned()
        .collect();
    if expired.is_empty() {
        return Ok(Vec::new());
    }
    let session = Session::open(keystore, node).await?;
    let result = async {
        let pulled = session.pull().await?;
        let mut items = Vec::new();
        let mut collections = BTreeSet::new();
        let mut ended = Vec::new();
        for grant in &expired {
            let held = held_under(keystore, grant, &pulled);
            let revocation = keystore
                .revoke(grant, held, now_ms)
                .map_err(|e| anyhow!("signing the revocation of grant {}: {e}", grant.id()))?;
            items.push(Item::revocation(&revocation));
            collections.extend(grant.terms().collections.iter().copied());
            ended.push(grant);
        }
        let collections: Vec<Collection> = collections.into_iter().collect();
        let rotated = rotate(keystore, &collections, now_ms, &mut items)?;
        // The expired grants go along: the node reached forwards the
        // revocations to the practices whose grants it knows.
        items.extend(expired.iter().map(Item::grant));
        items.extend(keystore.live_grants(now_ms).map(Item::grant));
        save_keystore(home, keystore, passphrase)?;
        session.push(items, Vec::new()).await?;
        let mut notices = Vec::new();
        for grant in ended {
            let t = grant.terms();
            let expires = t.expires.unwrap_or_default();
            let at = medmesh_node::records::format_instant(i64::try_from(expires).unwrap_or(i64::MAX));
            let notice = json!({
                "expired_grant": grant.id().to_string(),
                "grantee": t.grantee.to_string(),
                "expired_at": at,
                "revoked": true,
                "rotated": rotated,
            });
            out.notice(
                &notice,
                &format!(
                    "grant {} of {} expired at {at}: revoked (its later changes are invalid everywhere); rotated keys: {}",
                    grant.id(),
                    t.grantee,
                    rotated_text(&rotated)
                ),
            );
            notices.push(notice);
        }
        Ok::<_, anyhow::Error>(notices)
    }
    .await;
    session.close().await;
    result.context("ending expired grants")
}
