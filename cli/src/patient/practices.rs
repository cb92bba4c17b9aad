//! The patient's address book of practices (their signed address records,
//! kept in the keystore) and `patient practices`.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, Result};
use medmesh_crypto::{Collection, Keystore, now};
use medmesh_sync::{AddressRecord, PeerId};
use serde_json::json;

use super::keystore::{open_keystore, save_keystore};
use super::session::Session;
use crate::home::Home;
use crate::output::Output;

/// The address book: the newest verified signed address record of each
/// practice kept in the keystore (a record that no longer verifies is left out).
pub(super) fn address_book(keystore: &Keystore) -> BTreeMap<PeerId, AddressRecord> {
    let mut book: BTreeMap<PeerId, AddressRecord> = BTreeMap::new();
    for record in keystore.practices.iter().filter_map(|b| AddressRecord::verify(b)) {
        if book.get(&record.peer).is_none_or(|kept| kept.seq < record.seq) {
            book.insert(record.peer, record);
        }
    }
    book
}

/// Keeps in the address book the records of `fetched` that are newer than
/// those kept, for practices the patient's grants name only (a node cannot
/// fill the book with others). Returns whether anything changed.
pub(super) fn remember_addresses(keystore: &mut Keystore, fetched: Vec<AddressRecord>) -> bool {
    let grantees: BTreeSet<PeerId> = keystore.grants.iter().map(|g| g.terms().grantee.peer_id()).collect();
    let mut book = address_book(keystore);
    let mut changed = false;
    for record in fetched.into_iter().filter(|r| grantees.contains(&r.peer)) {
        // Seqs count seconds: a practice that restarted within the second of
        // its last record signs another with the same seq. The node hands
        // over the one it kept last, so at a tie the fetched record wins.
        if book
            .get(&record.peer)
            .is_none_or(|kept| kept.seq < record.seq || (kept.seq == record.seq && kept.signed != record.signed))
        {
            book.insert(record.peer, record);
            changed = true;
        }
    }
    if changed {
        keystore.practices = book.into_values().map(|r| r.signed).collect();
    }
    changed
}

/// `patient practices`: every practice the patient's grants name, with the
/// collections its live grants cover and where it last said it is.
pub(super) async fn practices(home: &Home, node: Option<&str>, out: &Output) -> Result<()> {
    let (mut keystore, passphrase) = open_keystore(home)?;
    if let Some(node) = node {
        let session = Session::open(&keystore, node).await?;
        let fetched = session.sync.practices_of(session.node, keystore.patient()).await;
        session.close().await;
        let fetched = fetched.with_context(|| format!("asking {node} where your practices are"))?;
        if remember_addresses(&mut keystore, fetched) {
            save_keystore(home, &keystore, &passphrase)?;
        }
    }
    let now_ms = now();
    let book = address_book(&keystore);
    let mut seen = BTreeSet::new();
    for grant in &keystore.grants {
        let peer = grant.terms().grantee.peer_id();
        if !seen.insert(peer) {
            continue;
        }
        let live: BTreeSet<&str> = keystore
            .live_grants(now_ms)
            .filter(|g| g.terms().grantee.peer_id() == peer)
            .flat_map(|g| g.terms().collections.iter().map(Collection::as_str))
            .collect();
        let record = book.get(&peer);
        let addrs: Vec<String> = record
            .map(|r| r.addrs.iter().map(ToString::to_string).collect())
            .unwrap_or_default();
        let signed_at = record.map(|r| {
            medmesh_node::records::format_instant(i64::try_from(r.seq.saturating_mul(1000)).unwrap_or(i64::MAX))
        });
        let where_text = match (&signed_at, addrs.first()) {
            (Some(at), Some(first)) => format!("{first} (signed {at})"),
            _ => "address unknown (refresh with --node)".to_owned(),
        };
        out.result(
            &json!({"peer": peer.to_string(), "collections": live, "addresses": addrs, "signed_at": signed_at}),
            &format!(
                "{peer}  {}  {where_text}",
                if live.is_empty() {
                    "(no live grant)".to_owned()
                } else {
                    live.into_iter().collect::<Vec<_>>().join(",")
                }
            ),
        );
    }
    Ok(())
}
