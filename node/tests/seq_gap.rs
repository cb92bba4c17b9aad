//! Issue 15, item 2: a change that is not the next of its actor waits in
//! the pending queue until the gap fills, so one envelope with a far-ahead
//! seq can neither be read, nor counted, nor inflate a revocation cut; and
//! a change signed after a revocation is outside it whatever its seq.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;

use medmesh_crypto::{Access, Collection, Envelope, EnvelopeId, Grant, PatientId, SecretIdentity, now, revocation_cut};
use medmesh_node::item::Item;
use medmesh_node::store::ItemKind;
use medmesh_node::testing::{ChangeMaker, OwnedChange, TestPatient};
use medmesh_node::{Config, Node, Source};

const CORE: Collection = Collection::Core;
const A_SEED: u8 = 21;
const B_SEED: u8 = 22;

async fn open(dir: &Path, seed: u8) -> Node {
    Node::open(dir, SecretIdentity::from_seed(&[seed; 32]), Config::default())
        .await
        .unwrap()
}

/// A practice A with a read-write grant on `core`, and a practice B that
/// reads `core` and knows A's grant.
struct Pair {
    patient: TestPatient,
    a: Node,
    b: Node,
    a_grant: Grant,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl Pair {
    async fn new() -> Self {
        let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut patient = TestPatient::new().unwrap();
        let a = open(dirs.0.path(), A_SEED).await;
        let b = open(dirs.1.path(), B_SEED).await;
        let (a_grant, items) = patient.onboard(a.practice_id(), CORE).unwrap();
        a.submit(patient.id(), items).await.unwrap();
        let (_, mut items) = patient.grant_with_share(b.practice_id(), CORE, Access::Read).unwrap();
        items.push(Item::new(ItemKind::Grant, a_grant.encoded().to_vec()));
        let r = b.submit(patient.id(), items).await.unwrap();
        assert_eq!(r.counts.accepted, 3, "{r:?}");
        Self {
            patient,
            a,
            b,
            a_grant,
            _dirs: dirs,
        }
    }

    fn pid(&self) -> PatientId {
        self.patient.id()
    }

    /// A writes `change` (its write path seals whatever seq it is given).
    async fn write_at_a(&self, change: &OwnedChange) -> (EnvelopeId, Vec<u8>) {
        let id = self.a.write_change(self.pid(), CORE, change.as_change()).await.unwrap();
        let bytes = self.a.item(&id.into()).await.unwrap().unwrap().item.bytes;
        (id, bytes)
    }

    /// B ingests envelopes from A, in one page.
    async fn to_b(&self, envelopes: &[&[u8]]) -> medmesh_node::Ingested {
        let items = envelopes
            .iter()
            .map(|e| Item::new(ItemKind::Envelope, e.to_vec()))
            .collect();
        self.b
            .ingest(items, Source::Peer(self.a.practice_id().peer_id()))
            .await
            .unwrap()
    }

    /// The cut the patient's CLI computes from what `node` holds of A's grant.
    fn cut_from(&self, node: &Node) -> BTreeMap<medmesh_crypto::ActorId, u64> {
        let held = node.envelopes(&self.pid(), None).unwrap();
        revocation_cut(
            held.iter()
                .filter(|e| e.grant == Some(self.a_grant.id()))
                .map(|e| (e.collection, e.actor, e.change_seq)),
        )
    }
}

#[tokio::test]
async fn a_change_after_a_gap_waits_until_the_gap_fills() {
    let p = Pair::new().await;
    let mut maker = ChangeMaker::new(p.a.practice_id().as_bytes()).unwrap();
    let mut sent = Vec::new();
    for i in 0..3 {
        let c = maker.put("k", &i.to_string()).unwrap();
        sent.push(p.write_at_a(&c).await.1);
    }

    let r = p.to_b(&[&sent[0], &sent[2]]).await;
    assert_eq!(
        (r.counts.accepted, r.counts.pending),
        (1, 1),
        "seq 3 waits for seq 2: {r:?}"
    );
    assert_eq!(p.b.holdings(&p.pid()).unwrap().readable, 1);
    assert_eq!(p.b.readable_changes(p.pid(), CORE).await.unwrap().len(), 1);

    let r = p.to_b(&[&sent[1]]).await;
    assert_eq!(r.counts.accepted, 2, "seq 2 lands and releases seq 3: {r:?}");
    assert_eq!(p.b.pending_count().unwrap(), 0);
    assert_eq!(p.b.holdings(&p.pid()).unwrap().readable, 3);
}

#[tokio::test]
async fn a_page_out_of_order_lands_whole_and_a_restart_releases() {
    let p = Pair::new().await;
    let mut maker = ChangeMaker::new(p.a.practice_id().as_bytes()).unwrap();
    let mut sent = Vec::new();
    for i in 0..5 {
        let c = maker.put("k", &i.to_string()).unwrap();
        sent.push(p.write_at_a(&c).await.1);
    }
    let r = p.to_b(&[&sent[2], &sent[1], &sent[0]]).await;
    assert_eq!((r.counts.accepted, r.counts.pending), (3, 0), "{r:?}");

    // Seq 5 waits; B restarts; seq 4 then releases it.
    let r = p.to_b(&[&sent[4]]).await;
    assert_eq!(r.counts.pending, 1, "{r:?}");
    let Pair { a, b, _dirs: dirs, .. } = p;
    b.close().await;
    drop(b);
    let b = open(dirs.1.path(), B_SEED).await;
    assert_eq!(b.pending_count().unwrap(), 1);
    let r = b
        .ingest(
            vec![Item::new(ItemKind::Envelope, sent[3].clone())],
            Source::Peer(a.practice_id().peer_id()),
        )
        .await
        .unwrap();
    assert_eq!(r.counts.accepted, 2, "{r:?}");
    assert_eq!(b.pending_count().unwrap(), 0);
}

#[tokio::test]
async fn a_far_ahead_seq_is_never_readable_nor_in_the_cut_and_a_revocation_rejects_it() {
    let mut p = Pair::new().await;
    let mut maker = ChangeMaker::new(p.a.practice_id().as_bytes()).unwrap();
    let c1 = maker.put("k", "1").unwrap();
    let (_, e1) = p.write_at_a(&c1).await;
    // A fresh actor whose only change claims seq 2^62.
    let mut fresh = ChangeMaker::new(p.a.practice_id().as_bytes()).unwrap();
    let far = fresh.put("k", "far").unwrap().with_seq(1 << 62).unwrap();
    let (far_id, e_far) = p.write_at_a(&far).await;

    let r = p.to_b(&[&e1, &e_far]).await;
    assert_eq!((r.counts.accepted, r.counts.pending), (1, 1), "{r:?}");
    let h = p.b.holdings(&p.pid()).unwrap();
    assert_eq!((h.envelopes, h.readable), (1, 1), "the far-ahead change is not held");
    assert!(!p.b.envelope_ids(&p.pid(), CORE).unwrap().contains(&far_id));

    // The cut counts only contiguous seqs, even from A, which holds its own envelope.
    let expected = BTreeMap::from([(maker.actor(), 1)]);
    assert_eq!(p.cut_from(&p.b), expected);
    assert_eq!(
        p.cut_from(&p.a),
        expected,
        "a seq without its predecessors inflates no cut"
    );

    let revocation = p.patient.revoke(&p.a_grant, expected).unwrap();
    let r =
        p.b.submit_revocation(p.pid(), revocation.encoded().to_vec())
            .await
            .unwrap();
    assert_eq!(
        r.rejected.len(),
        1,
        "the waiting envelope is now outside the cut: {r:?}"
    );
    assert_eq!(p.b.pending_count().unwrap(), 0);
    assert!(p.b.is_rejected(&far_id.0).unwrap());
    // Writing on with the fresh actor after the revocation gets nowhere either.
    let next = fresh.put("k", "more").unwrap().with_seq((1 << 62) + 1).unwrap();
    let late = Envelope::seal(
        (p.pid(), CORE),
        &p.patient.key(CORE, 0).unwrap(),
        &SecretIdentity::from_seed(&[A_SEED; 32]),
        Some(p.a_grant.id()),
        next.as_change(),
        now(),
    )
    .unwrap();
    let r = p.to_b(&[&late.encode()]).await;
    assert_eq!((r.counts.accepted, r.rejected.len()), (0, 1), "{r:?}");
}

#[tokio::test]
async fn a_change_signed_after_the_revocation_is_outside_it_whatever_its_seq() {
    let mut p = Pair::new().await;
    let mut maker = ChangeMaker::new(p.a.practice_id().as_bytes()).unwrap();
    let c1 = maker.put("k", "1").unwrap();
    let (_, e1) = p.write_at_a(&c1).await;
    assert_eq!(p.to_b(&[&e1]).await.counts.accepted, 1);
    // A generous cut (as an older CLI made it): seq 2 is inside by seq alone.
    let revocation = p
        .patient
        .revoke(&p.a_grant, BTreeMap::from([(maker.actor(), 5)]))
        .unwrap();
    p.b.submit_revocation(p.pid(), revocation.encoded().to_vec())
        .await
        .unwrap();
    let c2 = maker.put("k", "2").unwrap();
    let after = Envelope::seal(
        (p.pid(), CORE),
        &p.patient.key(CORE, 0).unwrap(),
        &SecretIdentity::from_seed(&[A_SEED; 32]),
        Some(p.a_grant.id()),
        c2.as_change(),
        revocation.terms().issued_at + 1,
    )
    .unwrap();
    let r = p.to_b(&[&after.encode()]).await;
    assert_eq!((r.counts.accepted, r.rejected.len()), (0, 1), "{r:?}");
    assert_eq!(p.b.holdings(&p.pid()).unwrap().envelopes, 1);
}
