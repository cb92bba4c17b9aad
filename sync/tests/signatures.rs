//! Issue 17: a received item's signature is checked once. Items arrive the
//! way sync hands a page to the store (`Backend::ingest` on a
//! `NodeBackend`, as the actor does after decoding a page), and the process
//! counts every ed25519 check (`medmesh_crypto::signature_checks`). Alone in
//! its test binary, so no other test's checks are counted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use medmesh_crypto::{Access, Collection, SecretIdentity, signature_checks};
use medmesh_node::item::{Item, ItemKind};
use medmesh_node::testing::{ChangeMaker, TestPatient};
use medmesh_node::{Config, Node};
use medmesh_sync::{Backend as _, NodeBackend};

const ENVELOPES: usize = 20;

#[tokio::test(flavor = "current_thread")]
async fn a_received_item_is_signature_checked_once() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let a = Node::open(dirs[0].path(), SecretIdentity::from_seed(&[1; 32]), Config::default())
        .await
        .unwrap();
    let b = Node::open(dirs[1].path(), SecretIdentity::from_seed(&[2; 32]), Config::default())
        .await
        .unwrap();
    let mut patient = TestPatient::new().unwrap();
    let (grant_a, to_a) = patient.onboard(a.practice_id(), Collection::Labs).unwrap();
    a.submit(patient.id(), to_a).await.unwrap();
    let mut maker = ChangeMaker::new(a.practice_id().as_bytes()).unwrap();
    for i in 0..ENVELOPES {
        let change = maker.put(&format!("k{i}"), "v").unwrap();
        a.write_change(patient.id(), Collection::Labs, change.as_change())
            .await
            .unwrap();
    }
    let (_, to_b) = patient
        .grant_with_share(b.practice_id(), Collection::Labs, Access::Read)
        .unwrap();
    let envelopes: Vec<Item> = a
        .items_after(0, usize::MAX)
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.meta.kind == ItemKind::Envelope)
        .map(|s| s.item)
        .collect();
    assert_eq!(envelopes.len(), ENVELOPES);

    let b = NodeBackend::new(b);
    let from = a.practice_id().peer_id();
    // What A serves B: the grant B's envelopes were written under, B's own
    // grant and key share, then the envelopes.
    let mut consent = vec![Item::grant(&grant_a)];
    consent.extend(to_b);
    let before = signature_checks();
    let report = b.ingest(from, consent.clone()).await.unwrap();
    let consent_checks = signature_checks() - before;
    assert_eq!(report.accepted, consent.len() as u64, "{report:?}");

    let before = signature_checks();
    let report = b.ingest(from, envelopes.clone()).await.unwrap();
    let envelope_checks = signature_checks() - before;
    assert_eq!(
        (report.accepted, report.readable),
        (ENVELOPES as u64, ENVELOPES as u64),
        "{report:?}"
    );

    assert_eq!(
        (consent_checks, envelope_checks),
        (consent.len() as u64, envelopes.len() as u64),
        "signature checks for {} consent items and {} envelopes",
        consent.len(),
        envelopes.len()
    );
}
