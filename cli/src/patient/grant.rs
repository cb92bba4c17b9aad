//! `patient grant`, `patient submit` and `patient grants`: signing a grant
//! with its key shares, handing it to a node, and how delivery of each
//! grant stands.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, anyhow, bail};
use medmesh_crypto::{Access, Collection, Grant, GrantId, GrantRequest, Keystore, PracticeId, now};
use medmesh_sync::{AddressRecord, Item, ItemId, Multiaddr, PeerId};
use serde_json::json;

use super::GrantArgs;
use super::keystore::{open_keystore, save_keystore};
use super::practices::{address_book, remember_addresses};
use super::revoke::end_expired_grants;
use super::session::{Deliveries, Session, addressed, delivery_output, delivery_targets, item_ids};
use crate::delivery::Delivery;
use crate::home::Home;
use crate::output::Output;

fn parse_expiry(args: &GrantArgs, now_ms: u64) -> Result<Option<u64>> {
    if let Some(d) = &args.duration {
        let d = humantime::parse_duration(d).map_err(|e| anyhow!("--for {d:?}: {e} (e.g. 30d, 12h)"))?;
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        return Ok(Some(now_ms.saturating_add(ms)));
    }
    if let Some(t) = &args.expires {
        let when = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
            .map_err(|e| anyhow!("--expires {t:?}: {e} (e.g. 2027-01-31T00:00:00Z)"))?;
        let ms =
            u64::try_from(when.unix_timestamp_nanos() / 1_000_000).map_err(|_| anyhow!("--expires is before 1970"))?;
        if ms <= now_ms {
            bail!("--expires {t} is in the past");
        }
        return Ok(Some(ms));
    }
    Ok(None)
}

pub(super) async fn grant(home: &Home, args: GrantArgs, out: &Output) -> Result<()> {
    let (mut keystore, passphrase) = open_keystore(home)?;
    let expired = end_expired_grants(home, &mut keystore, &passphrase, &args.node, out).await?;
    let (grantee_peer, grantee_addr) = if args.to.starts_with('/') {
        let (addr, peer) = addressed(&args.to, "--to")?;
        (peer, Some(addr))
    } else {
        let peer: PeerId = args
            .to
            .parse()
            .map_err(|_| anyhow!("--to {:?} is not a PeerId or multiaddr", args.to))?;
        // Where the practice last said it is, from the address book.
        let known = address_book(&keystore)
            .remove(&peer)
            .and_then(|r| r.addrs.into_iter().next())
            .map(|a| a.with(medmesh_sync::Protocol::P2p(peer)));
        (peer, known)
    };
    let grantee = PracticeId::from_peer_id(&grantee_peer).map_err(|e| anyhow!("--to: {e}"))?;
    let (_, node_peer) = addressed(&args.node, "--node")?;
    let collections = Collection::parse_list(&args.collections).map_err(|e| anyhow!("--collections: {e}"))?;
    let now_ms = now();
    let expires = parse_expiry(&args, now_ms)?;
    // A minute back, so a node whose clock is a little behind still sees it in force.
    let not_before = now_ms.saturating_sub(60_000);
    let granted = keystore
        .grant(
            GrantRequest {
                grantee,
                collections: collections.clone(),
                access: if args.write { Access::ReadWrite } else { Access::Read },
                not_before,
                expires,
                purpose: args.purpose.clone(),
                address_hints: vec![args.node.clone()],
            },
            now_ms,
        )
        .map_err(|e| anyhow!("signing the grant and its key shares: {e}"))?;
    let grant = granted.grant;
    let created: Vec<&str> = granted.created.iter().map(|c| c.as_str()).collect();
    let mut items = vec![Item::grant(&grant)];
    // The node reached may know nothing of the patient's other practices (their
    // grants were submitted elsewhere); a node forwards a patient's grants only to
    // practices whose grant it knows, so without these it would tell no one and
    // neither side would ever learn where the rest of the record is.
    items.extend(keystore.live_grants(now_ms).map(Item::grant));
    items.extend(granted.shares.iter().map(Item::key_share));
    // Saved before anything leaves: a key a node holds must never be missing here.
    save_keystore(home, &keystore, &passphrase)?;
    let hints = grantee_addr.into_iter().collect();
    let targets = delivery_targets(&keystore, &args.node, grantee, now_ms)?;
    let (report, deliveries, records) = hand_over(&keystore, &args.node, items, hints, &targets)
        .await
        .with_context(|| not_submitted(&grant, &args.node))?;
    keystore.unsubmitted.retain(|g| *g != grant.id());
    remember_addresses(&mut keystore, records);
    save_keystore(home, &keystore, &passphrase)?;
    let id = grant.id().to_string();
    let names: Vec<&str> = collections.iter().map(Collection::as_str).collect();
    let mut value = json!({
        "grant_id": id,
        "grantee": grantee.to_string(),
        "collections": names,
        "access": grant.terms().access.as_str(),
        "node": node_peer.to_string(),
        "accepted": report.accepted,
        "expired": expired,
    });
    let delivery = delivery_output(&mut value, &deliveries);
    out.result(
        &value,
        &format!(
            "grant {id}\n  to:          {grantee}\n  collections: {}\n  access:      {}{}\n  submitted to {node_peer}{delivery}",
            names.join(","),
            grant.terms().access.as_str(),
            if created.is_empty() {
                String::new()
            } else {
                format!("\n  new keys:    {}", created.join(","))
            }
        ),
    );
    Ok(())
}

/// Pushes `items` to `node` in one session, then asks it how their
/// delivery to `targets` stands ([`Session::deliveries`]) and where the
/// patient's practices are (their signed address records, for the address
/// book: refreshed from every node a submission reaches; none from a node
/// that cannot say).
async fn hand_over(
    keystore: &Keystore,
    node: &str,
    items: Vec<Item>,
    hints: Vec<Multiaddr>,
    targets: &[PeerId],
) -> Result<(medmesh_sync::IngestReport, Deliveries, Vec<AddressRecord>)> {
    let ids = item_ids(&items);
    let session = Session::open(keystore, node).await?;
    let result = session.push(items, hints).await;
    let (deliveries, records) = match &result {
        Ok(_) => (
            session.deliveries(keystore.patient(), targets, &ids).await,
            session
                .sync
                .practices_of(session.node, keystore.patient())
                .await
                .unwrap_or_default(),
        ),
        Err(_) => (Err(String::new()), Vec::new()),
    };
    session.close().await;
    Ok((result?, deliveries, records))
}

/// What a failed submission leaves behind, and how to finish it.
fn not_submitted(grant: &Grant, node: &str) -> String {
    format!(
        "grant {id} was not taken by the node; your keystore keeps it as not submitted \
         (`medmesh patient grants`); submit it again with `medmesh patient submit --node {node} {id}`",
        id = grant.id()
    )
}

/// The keystore's grant with the id `grant_id` (as the user typed it).
pub(super) fn grant_named(keystore: &Keystore, grant_id: &str) -> Result<Grant> {
    let id: GrantId = grant_id
        .parse()
        .map_err(|_| anyhow!("{grant_id:?} is not a grant id (32 hex digits; see `medmesh patient grants`)"))?;
    keystore
        .grants
        .iter()
        .find(|g| g.id() == id)
        .cloned()
        .ok_or_else(|| anyhow!("no grant {id} in your keystore (see `medmesh patient grants`)"))
}

/// `patient submit`: a grant no node took, with its key shares for every
/// epoch of the collections it covers and the patient's live grants (as
/// `patient grant` sends them).
pub(super) async fn submit(home: &Home, node: &str, grant_id: &str, out: &Output) -> Result<()> {
    let (mut keystore, passphrase) = open_keystore(home)?;
    let grant = grant_named(&keystore, grant_id)?;
    let id = grant.id();
    if keystore.is_revoked(&grant) {
        bail!("grant {id} is revoked");
    }
    if keystore.is_submitted(&grant) {
        bail!("grant {id} was submitted already; `medmesh patient grants` shows it");
    }
    let now_ms = now();
    let grantee = grant.terms().grantee;
    let mut items = vec![Item::grant(&grant)];
    items.extend(keystore.live_grants(now_ms).map(Item::grant));
    items.extend(keystore.grantee_shares(&grant, now_ms)?.iter().map(Item::key_share));
    let targets = delivery_targets(&keystore, node, grantee, now_ms)?;
    let (_, deliveries, records) = hand_over(&keystore, node, items, Vec::new(), &targets)
        .await
        .with_context(|| not_submitted(&grant, node))?;
    keystore.unsubmitted.retain(|g| *g != id);
    remember_addresses(&mut keystore, records);
    save_keystore(home, &keystore, &passphrase)?;
    let mut value = json!({"grant_id": id.to_string(), "grantee": grantee.to_string(), "submitted": true});
    let delivery = delivery_output(&mut value, &deliveries);
    out.result(
        &value,
        &format!("grant {id} submitted; the node delivers it to {grantee}{delivery}"),
    );
    Ok(())
}

/// `patient grants`: every grant of the keystore with its status; with
/// `--node`, also how delivery of each to its practice stands at that node
/// (a node that cannot be reached or cannot say is noted on stderr, and the
/// list comes from the keystore all the same).
pub(super) async fn grants(home: &Home, node: Option<&str>, out: &Output) -> Result<()> {
    let (keystore, _) = open_keystore(home)?;
    let now_ms = now();
    let deliveries = match node {
        Some(node) => match grant_deliveries(&keystore, node).await {
            Ok(per) => Some(per),
            Err(e) => {
                let why = format!("{e:#}");
                out.notice(
                    &json!({"delivery_error": why}),
                    &format!("delivery unknown: {why}; listing from your keystore"),
                );
                None
            }
        },
        None => None,
    };
    for grant in &keystore.grants {
        let t = grant.terms();
        let status = if keystore.is_revoked(grant) {
            "revoked"
        } else if t.expires.is_some_and(|e| e <= now_ms) {
            "expired"
        } else if !keystore.is_submitted(grant) {
            "not submitted"
        } else if now_ms < t.not_before {
            "not yet in force"
        } else {
            "in force"
        };
        let names: Vec<&str> = t.collections.iter().map(Collection::as_str).collect();
        let mut value = json!({
            "grant_id": grant.id().to_string(),
            "grantee": t.grantee.to_string(),
            "collections": names,
            "access": t.access.as_str(),
            "purpose": t.purpose,
            "status": status,
            "expires": t.expires,
        });
        let mut delivery = String::new();
        if let Some(d) = deliveries.as_ref().and_then(|per| per.get(&grant.id())) {
            value["delivery"] = d.to_json(t.grantee.peer_id());
            delivery = format!("  {}", d.text());
        }
        out.result(
            &value,
            &format!(
                "{}  {:<17} {}  {}  {}{delivery}",
                grant.id(),
                status,
                t.grantee,
                names.join(","),
                t.access.as_str()
            ),
        );
    }
    Ok(())
}

/// How delivery of each submitted grant to its grantee stands at `node`:
/// pending while the node owes the grantee any of the patient's consent
/// items; delivered when it holds the grant and owes nothing; unknown when
/// it does not hold the grant (submitted elsewhere).
async fn grant_deliveries(keystore: &Keystore, node: &str) -> Result<BTreeMap<GrantId, Delivery>> {
    let session = Session::open(keystore, node).await?;
    let report = session.outbox_when(keystore.patient(), |_| true).await;
    session.close().await;
    let report = report.map_err(|e| anyhow!(e))?;
    let mut per = BTreeMap::new();
    for grant in keystore.grants.iter().filter(|g| keystore.is_submitted(g)) {
        let item = ItemId::digest(Item::grant(grant).bytes.as_slice());
        let holds = report.held.contains(&item) || report.owed.iter().any(|o| o.item == item);
        let grantee = grant.terms().grantee.peer_id();
        let d = match Delivery::of(&report, grantee, None) {
            Delivery::Delivered if !holds => Delivery::Unknown,
            d => d,
        };
        per.insert(grant.id(), d);
    }
    Ok(per)
}
