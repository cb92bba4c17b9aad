//! `patient audit`: the audit entries about the patient at a node
//! (accounting of disclosures), checked against the checkpoints it signs.

use anyhow::{Context as _, Result, bail};
use medmesh_crypto::PracticeId;
use serde_json::json;

use super::keystore::{open_keystore, save_keystore};
use super::revoke::end_expired_grants;
use super::session::{ATTEMPTS, Session};
use crate::home::Home;
use crate::output::Output;

/// `patient audit`: asks the node, as the patient, for the audit entries
/// about the patient (disclosures, reads, writes, consent items received)
/// and prints one line (or JSON object) per entry. The node answers only
/// the patient's own key, and records the query as a read. Then checks
/// what it received against checkpoints the node signs (see
/// [`crate::audit_anchor`]) and the one kept from the previous query of
/// that node: a log that lost entries or was rewritten is reported loudly
/// and the command fails; otherwise the new checkpoint is kept.
pub(super) async fn audit(home: &Home, node: &str, out: &Output) -> Result<()> {
    let (mut keystore, passphrase) = open_keystore(home)?;
    end_expired_grants(home, &mut keystore, &passphrase, node, out).await?;
    let patient = keystore.patient();
    let session = Session::open(&keystore, node).await?;
    let node_peer = session.node;
    let node_practice = PracticeId::from_peer_id(&node_peer).context("the node's peer id names no ed25519 key")?;
    let kept = keystore.audit_checkpoint(&node_practice).cloned();
    let mut attempt = 1;
    let result = loop {
        match session.sync.audit(session.node, patient).await {
            Err(e @ (medmesh_sync::Error::Request { .. } | medmesh_sync::Error::ConnectionLost { .. }))
                if attempt < ATTEMPTS =>
            {
                session.redial(attempt, &e).await;
                attempt += 1;
            }
            other => break other,
        }
    };
    // After the entries, so that the signed head covers every one of them.
    let checkpoints = match &result {
        Ok(_) => session
            .sync
            .audit_checkpoints(node_peer, patient, kept.as_ref().map(|k| k.terms().seq))
            .await
            .map_err(|e| tracing::debug!(cause = %e, "the node signed no audit checkpoint"))
            .ok(),
        Err(_) => None,
    };
    session.close().await;
    let entries = match result {
        Ok(entries) => entries,
        Err(medmesh_sync::Error::Refused { reason, .. }) => {
            bail!("node {node_peer} refused to show your audit entries ({reason}); try again, or ask the practice")
        }
        Err(e) => return Err(e).context("fetching your audit entries from the node"),
    };
    let verdict = crate::audit_anchor::check(&patient, &entries, kept.as_ref(), checkpoints);
    let did = patient.to_string();
    let own_peer = PracticeId::from_bytes(*patient.as_bytes())
        .map(|p| p.peer_id().to_string())
        .unwrap_or_default();
    for e in &entries {
        let at = medmesh_node::records::format_instant(i64::try_from(e.time).unwrap_or(i64::MAX));
        let items: Vec<String> = e.items.iter().map(ToString::to_string).collect();
        let grant = e.grant.map(|g| g.to_string());
        let actor_kind = match e.actor_kind {
            medmesh_node::audit::ActorKind::LocalApp => "local-app",
            medmesh_node::audit::ActorKind::Peer => "peer",
            medmesh_node::audit::ActorKind::Patient => "patient",
            medmesh_node::audit::ActorKind::Node => "node",
        };
        let you = if e.actor_id == did || e.actor_id == own_peer {
            " (you)"
        } else {
            ""
        };
        out.result(
            &json!({
                "seq": e.seq,
                "time": e.time,
                "at": at,
                "actor_kind": actor_kind,
                "actor_id": e.actor_id,
                "action": e.action.as_str(),
                "patient": did,
                "item_count": e.item_count,
                "items": items,
                "grant": grant,
                "outcome": e.outcome,
                "prev_hash": hex::encode(e.prev_hash),
                "hash": hex::encode(e.hash),
            }),
            &format!(
                "#{:<6} {at}  {:<10} {actor_kind:<9} {}{you}  {} item{}  grant {}  {}",
                e.seq,
                e.action.as_str(),
                e.actor_id,
                e.item_count,
                if e.item_count == 1 { "" } else { "s" },
                grant.as_deref().unwrap_or("-"),
                e.outcome
            ),
        );
    }
    if !out.is_json() {
        println!("{} entries about you at node {node_peer}", entries.len());
    }
    out.result(&verdict.to_json(kept.as_ref()), &anchor_text(&verdict));
    if verdict.flagged() {
        bail!(
            "node {node_peer}'s audit log does not hold what it showed you before ({}): {}",
            verdict.status,
            verdict.problems.join("; ")
        );
    }
    if let Some(keep) = verdict.keep {
        keystore.remember_audit_checkpoint(keep);
        save_keystore(home, &keystore, &passphrase)?;
    }
    Ok(())
}

/// The human line for a verdict: loud when something is wrong.
fn anchor_text(verdict: &crate::audit_anchor::Verdict) -> String {
    match (verdict.flagged(), verdict.head) {
        (true, _) => format!(
            "WARNING: THIS NODE'S AUDIT LOG LOST OR CHANGED ENTRIES ({}):\n  {}",
            verdict.status.to_uppercase(),
            verdict.problems.join("\n  ")
        ),
        (false, Some((seq, _))) => format!(
            "checked: {} entries rehashed, the log runs to the node-signed checkpoint at entry {seq}, \
             kept to compare with your next query",
            verdict.verified
        ),
        (false, None) => format!(
            "note: this node signs no audit checkpoints (an older version); {} entries rehashed, \
             but a removal of entries would not show",
            verdict.verified
        ),
    }
}
