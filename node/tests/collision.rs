//! Issue 15 item 1: key ids and grant ids are random, but a patient signs
//! whatever ids it likes. A fresh identity Y copies victim X's core key id
//! and X's grant id (both in clear in every envelope header) into its own
//! key share and grant for practice A. Nothing of Y's may reach X's state at
//! A (DESIGN §9 invariant 7).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use medmesh_crypto::{
    Access, Collection, Envelope, EpochKey, Grant, GrantId, GrantTerms, KeyShare, Principal, SecretIdentity, now,
};
use medmesh_node::audit::Action;
use medmesh_node::item::Item;
use medmesh_node::store::{ItemKind, StoredItem};
use medmesh_node::testing::{ChangeMaker, TestPatient};
use medmesh_node::{Config, Ingested, Node, Source};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

const CORE: Collection = Collection::Core;

async fn open(dir: &Path, seed: u8) -> Node {
    Node::open(dir, SecretIdentity::from_seed(&[seed; 32]), Config::default())
        .await
        .unwrap()
}

/// Y's forgeries for practice `a`: a share of a key of Y's own whose id is
/// X's core key id, and a read-write core grant whose id is X's grant id.
struct Forgery {
    y: TestPatient,
    share: KeyShare,
    grant: Grant,
}

impl Forgery {
    fn new(a: &Node, x_key: &EpochKey, x_grant: GrantId) -> Self {
        let y = TestPatient::new().unwrap();
        let key = EpochKey::from_parts(y.id(), CORE, x_key.epoch, x_key.key_id, Zeroizing::new([0x59; 32]));
        let share = KeyShare::create(&key, Principal::Practice(a.practice_id()), &y.identity, now()).unwrap();
        let grant = Grant::sign(
            GrantTerms {
                id: x_grant,
                patient: y.id(),
                grantee: a.practice_id(),
                collections: vec![CORE],
                access: Access::ReadWrite,
                not_before: now() - 60_000,
                expires: None,
                purpose: "treatment".into(),
                issued_at: now(),
                address_hints: Vec::new(),
            },
            &y.identity,
        )
        .unwrap();
        Self { y, share, grant }
    }

    fn items(&self) -> Vec<Item> {
        vec![
            Item::new(ItemKind::Grant, self.grant.encoded().to_vec()),
            Item::new(ItemKind::KeyShare, self.share.encoded().to_vec()),
        ]
    }

    fn hashes(&self) -> [[u8; 32]; 2] {
        [
            Sha256::digest(self.grant.encoded()).into(),
            Sha256::digest(self.share.encoded()).into(),
        ]
    }
}

fn stored_envelopes(items: &[StoredItem]) -> Vec<Item> {
    items
        .iter()
        .filter(|i| i.meta.kind == ItemKind::Envelope)
        .map(|i| Item::new(i.meta.kind, i.item.bytes.clone()))
        .collect()
}

/// Writes one core change for X at `node`; the envelope as stored.
async fn write_for(node: &Node, x: &TestPatient, maker: &mut ChangeMaker, value: &str) -> Envelope {
    let change = maker.put("note", value).unwrap();
    let id = node.write_change(x.id(), CORE, change.as_change()).await.unwrap();
    let item = node.item(&id.into()).await.unwrap().unwrap();
    Envelope::decode(&item.item.bytes).unwrap()
}

/// The envelope is X's, sealed under X's own core key, and X's key opens it.
fn assert_sealed_for_x(envelope: &Envelope, x_key: &EpochKey) {
    let h = envelope.header();
    assert_eq!(h.patient, x_key.patient, "sealed as another patient");
    assert_eq!((h.collection, h.epoch, h.key_id), (CORE, x_key.epoch, x_key.key_id));
    envelope
        .open(x_key, |plain| {
            automerge::Change::try_from(plain).ok().map(|c| c.hash().0)
        })
        .expect("X's own key opens A's write for X");
}

fn assert_rejected_and_audited(a: &Node, forgery: &Forgery, report: &Ingested) {
    assert_eq!(
        report.counts.accepted, 0,
        "Y's colliding items were accepted: {report:?}"
    );
    assert_eq!(report.rejected.len(), 2, "{report:?}");
    for hash in forgery.hashes() {
        assert!(
            a.is_rejected(&hash).unwrap(),
            "a colliding item is not recorded as rejected"
        );
    }
    let rejects = a
        .audit_entries(Some(&forgery.y.id()))
        .unwrap()
        .into_iter()
        .filter(|e| e.action == Action::Reject)
        .count();
    assert_eq!(rejects, 2, "each colliding item is audited once");
    assert!(a.grants(&forgery.y.id()).is_empty(), "Y's colliding grant is held");
}

/// The scenario at the `Node` API: A already holds X's record; Y's
/// colliding share and grant arrive; A keeps sealing X's writes as X under
/// X's key, X reads them, a third practice's genuine envelope for X is still
/// accepted at A, and Y's items are refused and audited.
#[tokio::test]
async fn a_colliding_share_and_grant_of_another_patient_change_nothing_of_x() {
    let (da, dc) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut x = TestPatient::new().unwrap();
    let a = open(da.path(), 1).await;
    let c = open(dc.path(), 3).await;
    let (x_grant_a, items) = x.onboard(a.practice_id(), CORE).unwrap();
    assert_eq!(a.submit(x.id(), items).await.unwrap().counts.accepted, 2);
    let (_, items) = x.onboard(c.practice_id(), CORE).unwrap();
    assert_eq!(c.submit(x.id(), items).await.unwrap().counts.accepted, 2);
    let x_key = x.key(CORE, 0).unwrap();
    let mut at_a = ChangeMaker::new(a.practice_id().as_bytes()).unwrap();
    write_for(&a, &x, &mut at_a, "before").await;

    let forgery = Forgery::new(&a, &x_key, x_grant_a.id());
    let from_y = Source::Peer(SecretIdentity::generate().unwrap().practice_id().unwrap().peer_id());
    let report = a.ingest(forgery.items(), from_y.clone()).await.unwrap();

    let after = write_for(&a, &x, &mut at_a, "after").await;
    assert_sealed_for_x(&after, &x_key);
    assert_eq!(after.header().grant_id, Some(x_grant_a.id()));
    assert_eq!(a.readable_changes(x.id(), CORE).await.unwrap().len(), 2);
    assert_eq!(a.holdings(&forgery.y.id()).unwrap().envelopes, 0);

    // C's genuine core envelope for X (and C's grant from X) reach A.
    let mut at_c = ChangeMaker::new(c.practice_id().as_bytes()).unwrap();
    write_for(&c, &x, &mut at_c, "from C").await;
    let from_c = c.items_after(0, 100).await.unwrap();
    let mut page: Vec<Item> = from_c
        .iter()
        .filter(|i| i.meta.kind == ItemKind::Grant)
        .map(|i| Item::new(i.meta.kind, i.item.bytes.clone()))
        .collect();
    page.extend(stored_envelopes(&from_c));
    let r = a.ingest(page, Source::Peer(c.practice_id().peer_id())).await.unwrap();
    assert!(r.rejected.is_empty(), "{r:?}");
    assert_eq!((r.counts.accepted, r.counts.readable), (2, 1), "{r:?}");
    assert_eq!(a.readable_changes(x.id(), CORE).await.unwrap().len(), 3);

    assert_rejected_and_audited(&a, &forgery, &report);
    // Sent again: a duplicate of a rejection, not a second audit entry.
    let again = a.ingest(forgery.items(), from_y).await.unwrap();
    assert_eq!((again.counts.accepted, again.counts.duplicates), (0, 2), "{again:?}");
    assert_rejected_and_audited(&a, &forgery, &report);

    // The same after a restart (the registry is rebuilt from the store).
    a.close().await;
    drop(a);
    let a = open(da.path(), 1).await;
    let reopened = write_for(&a, &x, &mut at_a, "after restart").await;
    assert_sealed_for_x(&reopened, &x_key);
}

/// The order reversed, at a practice being granted for the first time: Y's
/// colliding share and grant are there first. X's grant and share must still
/// give A X's key and grant, and A's writes for X are X's.
#[tokio::test]
async fn a_colliding_share_and_grant_that_arrive_first_do_not_cost_x_service() {
    let (da, dc) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut x = TestPatient::new().unwrap();
    let a = open(da.path(), 1).await;
    let c = open(dc.path(), 3).await;
    // X's key and a grant id for A that Y learned (a former grantee's headers).
    let (x_grant_a, x_items) = x.onboard(a.practice_id(), CORE).unwrap();
    let x_key = x.key(CORE, 0).unwrap();
    let forgery = Forgery::new(&a, &x_key, x_grant_a.id());
    let from_y = Source::Peer(SecretIdentity::generate().unwrap().practice_id().unwrap().peer_id());
    a.ingest(forgery.items(), from_y.clone()).await.unwrap();

    let r = a.submit(x.id(), x_items).await.unwrap();
    assert!(r.rejected.is_empty(), "X's own grant and share refused: {r:?}");
    assert_eq!(r.counts.accepted, 2, "{r:?}");
    let mut at_a = ChangeMaker::new(a.practice_id().as_bytes()).unwrap();
    let written = write_for(&a, &x, &mut at_a, "first").await;
    assert_sealed_for_x(&written, &x_key);
    assert_eq!(written.header().grant_id, Some(x_grant_a.id()));

    // Y tries again now that X's key is in use here: refused, and X's
    // writes stay X's.
    let again = Forgery::new(&a, &x_key, x_grant_a.id());
    let r = a.ingest(vec![again.items().remove(1)], from_y.clone()).await.unwrap();
    let written = write_for(&a, &x, &mut at_a, "second").await;
    assert_sealed_for_x(&written, &x_key);
    assert_eq!((r.counts.accepted, r.rejected.len()), (0, 1), "{r:?}");

    // C's genuine core envelope for X is accepted and readable at A.
    let (_, items) = x.onboard(c.practice_id(), CORE).unwrap();
    c.submit(x.id(), items).await.unwrap();
    let mut at_c = ChangeMaker::new(c.practice_id().as_bytes()).unwrap();
    write_for(&c, &x, &mut at_c, "from C").await;
    let from_c = c.items_after(0, 100).await.unwrap();
    let mut page: Vec<Item> = from_c
        .iter()
        .filter(|i| i.meta.kind == ItemKind::Grant)
        .map(|i| Item::new(i.meta.kind, i.item.bytes.clone()))
        .collect();
    page.extend(stored_envelopes(&from_c));
    let r = a.ingest(page, Source::Peer(c.practice_id().peer_id())).await.unwrap();
    assert!(r.rejected.is_empty(), "{r:?}");
    assert_eq!(r.counts.readable, 1, "{r:?}");
    assert_eq!(a.readable_changes(x.id(), CORE).await.unwrap().len(), 3);
    // Nothing of X's is filed under Y.
    assert_eq!(a.holdings(&forgery.y.id()).unwrap().envelopes, 0);
}
