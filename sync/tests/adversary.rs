//! The adversarial peer (issue 15, DESIGN §9.7, §9.8, §9.10): a real node
//! (`medmesh_node::Node` on sled in a temporary directory, behind
//! `NodeBackend`, with a running `SyncHandle` on 127.0.0.1) attacked by
//! peers that speak `/medmesh/sync/1` by hand (`common::client`) and push
//! crafted, validly signed items from identities they make
//! (`common::forge`). One test per attack class, each asserting what an
//! honest patient must see. Waits poll a condition inside a timeout; a
//! "never happened" is checked after a positive event that would have
//! followed it.
//!
//! Over 800 lines on purpose: every attack class found so far stays here
//! together (invariant 10), over one attacker fixture.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use medmesh_crypto::{
    Access, ActorId, Collection, Envelope, EnvelopeId, EpochKey, Grant, KeyShare, PatientId, PracticeId, Principal,
    SecretIdentity, Timestamp, now,
};
use medmesh_node::Actor;
use medmesh_node::records::{DecodedChange, RecordDoc};
use medmesh_node::repository::{self, Repository};
use medmesh_node::store::EnvelopeState;
use medmesh_node::testing::{ChangeMaker, OwnedChange, TestPatient};
use medmesh_sync::wire::{Request, Response};
use medmesh_sync::{Cursor, Item, ItemKind, Multiaddr, PeerId};
use serde_json::{Value, json};

mod common;
use common::client::Client;
use common::forge::{self, Terms};
use common::{CliPatient, Practice, until, until_async};

const CORE: Collection = Collection::Core;
const HOUR: Timestamp = 3_600_000;

// ---------------------------------------------------------------- harness

/// A peer the test drives by hand against the node under attack, as
/// `identity` (a patient, a practice, or a stranger it made).
struct Peer {
    client: Client,
    victim: PeerId,
}

impl Peer {
    async fn connect(identity: &SecretIdentity, victim: &Practice) -> Self {
        Self::connect_to(identity, &victim.addr().await, victim.practice().peer_id()).await
    }

    async fn connect_to(identity: &SecretIdentity, addr: &Multiaddr, victim: PeerId) -> Self {
        Self {
            client: Client::connect(identity, addr).await,
            victim,
        }
    }

    async fn push_with_addrs(&mut self, items: Vec<Item>, addrs: Vec<Multiaddr>) -> Response {
        self.client.request(self.victim, Request::Push { items, addrs }).await
    }

    async fn push(&mut self, items: Vec<Item>) -> Response {
        self.push_with_addrs(items, Vec::new()).await
    }

    /// Pushes and expects the items judged (not refused): (accepted, rejected).
    async fn pushed(&mut self, items: Vec<Item>) -> (u64, u64) {
        match self.push(items).await {
            Response::Pushed { accepted, rejected, .. } => (accepted, rejected),
            other => panic!("push answered {other:?}"),
        }
    }

    /// Everything the node serves this peer, pulled page by page from the
    /// start of its log.
    async fn pull_all(&mut self) -> Vec<Item> {
        let mut cursor = Cursor::default();
        let mut out = Vec::new();
        loop {
            let request = Request::Pull {
                cursor,
                limit: 256,
                snapshots: None,
            };
            match self.client.request(self.victim, request).await {
                Response::Page {
                    instance,
                    next,
                    more,
                    items,
                    ..
                } => {
                    out.extend(items);
                    if !more || next == cursor.seq {
                        return out;
                    }
                    cursor = Cursor { instance, seq: next };
                }
                other => panic!("pull answered {other:?}"),
            }
        }
    }
}

/// The envelopes among `items`.
fn envelopes(items: &[Item]) -> Vec<Envelope> {
    items
        .iter()
        .filter(|i| i.kind == ItemKind::Envelope)
        .map(|i| Envelope::decode(&i.bytes).unwrap())
        .collect()
}

fn ids(items: &[Item]) -> BTreeSet<EnvelopeId> {
    envelopes(items).iter().map(Envelope::id).collect()
}

/// Whether `key` opens `envelope` and its change checks out.
fn opens(envelope: &Envelope, key: &EpochKey) -> bool {
    envelope
        .open(key, |plain| automerge::Change::try_from(plain).ok().map(|c| c.hash().0))
        .is_ok()
}

async fn stored(at: &Practice, id: EnvelopeId) -> Option<Envelope> {
    let item = at.node.item(&id.into()).await.unwrap()?;
    Some(Envelope::decode(&item.item.bytes).unwrap())
}

fn incoming_grant(grant: &Grant) -> Item {
    Item::new(ItemKind::Grant, grant.encoded().to_vec())
}

fn incoming_share(share: &KeyShare) -> Item {
    Item::new(ItemKind::KeyShare, share.encoded().to_vec())
}

/// What the patient's CLI submits at `at` for a grant: the grant signed
/// with `terms`, and the epoch-0 keys of its collections for the grantee
/// and for the patient.
async fn grant_at(at: &Practice, x: &mut TestPatient, terms: Terms) -> Grant {
    let grant = forge::grant(&x.identity, terms);
    let mut items = vec![incoming_grant(&grant)];
    for c in grant.terms().collections.clone() {
        items.push(incoming_share(
            &x.share(c, 0, Principal::Practice(grant.terms().grantee)).unwrap(),
        ));
        items.push(incoming_share(&x.share(c, 0, Principal::Patient(x.id())).unwrap()));
    }
    at.node.submit(x.id(), items).await.unwrap();
    grant
}

/// A read-write grant of `collections` to `to`, submitted at `at`.
async fn onboard(at: &Practice, x: &mut TestPatient, to: PracticeId, collections: &[Collection]) -> Grant {
    grant_at(at, x, Terms::read_write(to, collections)).await
}

/// A practice's envelope for patient `x`, sealed under `key` and written
/// under `grant`, created at `at`.
fn sealed(key: &EpochKey, author: &SecretIdentity, grant: &Grant, change: &OwnedChange, at: Timestamp) -> Envelope {
    Envelope::seal(
        (key.patient, key.collection),
        key,
        author,
        Some(grant.id()),
        change.as_change(),
        at,
    )
    .unwrap()
}

/// One change by a fresh actor of `author`.
fn one_change(author: &SecretIdentity) -> OwnedChange {
    ChangeMaker::new(&author.public_bytes()).unwrap().put("k", "v").unwrap()
}

// ---------------------------------------------------------------- item 1

/// Issue 15 item 1, as reproduced: a brand-new identity Y pushes to
/// practice A a key share addressed to A whose key id is X's core key id
/// (in clear in every envelope header) and a grant to A reusing X's grant
/// id. A's next core write for X must still be sealed as X under X's key,
/// readable by X, served to X and X's grantees and not to Y; a third
/// practice's genuine core envelope for X is still accepted at A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_id_collision_cannot_reseal_a_patients_writes() {
    let a = Practice::start().await;
    let c = SecretIdentity::generate().unwrap();
    let mut x = TestPatient::new().unwrap();
    let gx = onboard(&a, &mut x, a.practice(), &[CORE]).await;
    let gc = onboard(&a, &mut x, c.practice_id().unwrap(), &[CORE]).await;
    let x_key = x.key(CORE, 0).unwrap();

    let y = TestPatient::new().unwrap();
    let y_key = forge::key_with_id(y.id(), CORE, 0, x_key.key_id);
    let y_share = KeyShare::create(&y_key, Principal::Practice(a.practice()), &y.identity, now()).unwrap();
    let y_grant = forge::grant(
        &y.identity,
        Terms {
            id: gx.id(),
            ..Terms::read_write(a.practice(), &[CORE])
        },
    );
    let mut mallory = Peer::connect(&y.identity, &a).await;
    mallory
        .push(vec![Item::grant(&y_grant), Item::key_share(&y_share)])
        .await;

    // A's next core write for X.
    let mut maker = ChangeMaker::new(&a.key.public_bytes()).unwrap();
    let change = maker.put("after", "attack").unwrap();
    let id = a
        .node
        .write_change(x.id(), CORE, change.as_change())
        .await
        .expect("A still writes X's core");
    let envelope = stored(&a, id).await.unwrap();
    let h = envelope.header();
    assert_eq!(
        h.patient,
        x.id(),
        "A sealed X's new core write as another patient (the one whose share reused X's key id)"
    );
    assert_eq!(h.key_id, x_key.key_id, "A sealed X's write under another key id");
    assert_eq!(h.grant_id, Some(gx.id()));
    assert!(opens(&envelope, &x_key), "X's own key does not open A's new write");

    // Served to X and to X's grantee C, not to Y.
    let to_x = Peer::connect(&x.identity, &a).await.pull_all().await;
    assert!(ids(&to_x).contains(&id), "A does not serve X its new write");
    let mut c_peer = Peer::connect(&c, &a).await;
    assert!(
        ids(&c_peer.pull_all().await).contains(&id),
        "A does not serve X's grantee C"
    );
    let to_y = mallory.pull_all().await;
    assert!(
        !ids(&to_y).contains(&id) && envelopes(&to_y).iter().all(|e| e.header().patient == y.id()),
        "A served Y (the attacker) X's write"
    );

    // A third practice's genuine core envelope for X is still accepted.
    let genuine = sealed(&x_key, &c, &gc, &one_change(&c), now());
    let (accepted, rejected) = c_peer.pushed(vec![Item::envelope(&genuine)]).await;
    assert_eq!(
        (accepted, rejected),
        (1, 0),
        "A refused C's genuine core envelope for X"
    );
    let entry = a
        .node
        .envelopes(&x.id(), Some(CORE))
        .unwrap()
        .into_iter()
        .find(|e| e.id == genuine.id())
        .unwrap();
    assert_eq!(entry.state, EnvelopeState::Readable);
}

/// The order reversed, and the node restarted (its registry rebuilt from
/// the store): Y's share with the key id of X's core arrives at A first —
/// X's epoch-0 key already exists (X's first practice used it) and Y read
/// its id there — with an envelope that a practice M of Y's own making
/// wrote under it (so the copied id is "in use" at A), and X's genuine
/// grant and share to A arrive after. A must still hold X's key: write
/// X's core sealed as X and accept X's other practices' envelopes, before
/// and after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_id_collision_arriving_first_does_not_cost_the_patient_its_key() {
    let a = Practice::start().await;
    let b = SecretIdentity::generate().unwrap();
    let mut x = TestPatient::new().unwrap();
    let x_key = x.key(CORE, 0).unwrap();
    let y = TestPatient::new().unwrap();
    let m = SecretIdentity::generate().unwrap();
    let y_key = forge::key_with_id(y.id(), CORE, 0, x_key.key_id);
    let y_share = KeyShare::create(&y_key, Principal::Practice(a.practice()), &y.identity, now()).unwrap();
    let y_grant = forge::grant(&y.identity, Terms::read_write(m.practice_id().unwrap(), &[CORE]));
    let in_use = sealed(&y_key, &m, &y_grant, &one_change(&m), now());
    let mut mallory = Peer::connect(&y.identity, &a).await;
    let (accepted, _) = mallory
        .pushed(vec![
            Item::grant(&y_grant),
            Item::key_share(&y_share),
            Item::envelope(&in_use),
        ])
        .await;
    assert_eq!(accepted, 3, "Y's own record, on its own, is welcome at A");

    onboard(&a, &mut x, a.practice(), &[CORE]).await;
    let gb = onboard(&a, &mut x, b.practice_id().unwrap(), &[CORE]).await;
    let a = check_holds_key(a, &x, &x_key, &b, &gb, "before").await;
    let a = a.restart().await;
    check_holds_key(a, &x, &x_key, &b, &gb, "after a restart").await;
}

/// A writes X's core sealed as X under `key`, and accepts B's genuine core
/// envelope for X readable.
async fn check_holds_key(
    a: Practice,
    x: &TestPatient,
    key: &EpochKey,
    b: &SecretIdentity,
    gb: &Grant,
    when: &str,
) -> Practice {
    let change = one_change(&a.key);
    let id = a
        .node
        .write_change(x.id(), CORE, change.as_change())
        .await
        .unwrap_or_else(|e| panic!("A no longer writes X's core {when}: {e}"));
    let envelope = stored(&a, id).await.unwrap();
    assert_eq!(
        envelope.header().patient,
        x.id(),
        "{when}: A sealed X's write as another patient"
    );
    assert!(opens(&envelope, key), "{when}: X's key does not open A's write");
    let genuine = sealed(key, b, gb, &one_change(b), now());
    let (accepted, rejected) = Peer::connect(b, &a).await.pushed(vec![Item::envelope(&genuine)]).await;
    assert_eq!(
        (accepted, rejected),
        (1, 0),
        "{when}: A refused B's genuine core envelope for X"
    );
    a
}

/// Item 1's grant half: Y signs a grant reusing the id of X's grant, read
/// from the header of an envelope A wrote under it. Arriving after X's, it
/// is refused (DESIGN §9.7); X's record at A is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_id_collision_after_the_patients_grant_is_refused() {
    let a = Practice::start().await;
    let mut x = TestPatient::new().unwrap();
    let gx = onboard(&a, &mut x, a.practice(), &[CORE]).await;
    check_serves_patient(&a, &x).await;
    let y = TestPatient::new().unwrap();
    let y_grant = forge::grant(
        &y.identity,
        Terms {
            id: gx.id(),
            ..Terms::read_write(a.practice(), &[CORE])
        },
    );
    Peer::connect(&y.identity, &a)
        .await
        .push(vec![Item::grant(&y_grant)])
        .await;
    assert!(
        a.node.grants(&y.id()).iter().all(|g| g.id() != gx.id()),
        "A stored Y's grant that reuses the id of X's grant"
    );
    check_serves_patient(&a, &x).await;
}

/// The other order: Y's grant reusing an id arrives before the patient's
/// genuine grant with that id (Y read it at another practice and raced it
/// here), with an envelope written under it. The patient's grant must
/// still be stored, forwarded to its grantee and honoured: the attacker
/// cannot make a grant id unusable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_id_collision_before_the_patients_grant_costs_the_patient_nothing() {
    let a = Practice::start().await;
    let b = Practice::start().await;
    let mut x = TestPatient::new().unwrap();
    onboard(&a, &mut x, a.practice(), &[CORE]).await;
    // X's grant to B, signed; Y saw its id and races a grant of its own here.
    // Y's grant with that id goes to a practice M of Y's own making, which
    // writes Y's record under it: the copied id is "in use" at A.
    let terms = Terms::read_write(b.practice(), &[CORE]);
    let mut y = TestPatient::new().unwrap();
    let m = SecretIdentity::generate().unwrap();
    let y_grant = forge::grant(
        &y.identity,
        Terms {
            grantee: m.practice_id().unwrap(),
            ..terms.clone()
        },
    );
    let in_use = sealed(&y.key(CORE, 0).unwrap(), &m, &y_grant, &one_change(&m), now());
    let (accepted, _) = Peer::connect(&y.identity, &a)
        .await
        .pushed(vec![Item::grant(&y_grant), Item::envelope(&in_use)])
        .await;
    assert_eq!(accepted, 2, "Y's own record, on its own, is welcome at A");
    // X submits the grant to B at A, with B's address (`--to <multiaddr>`).
    let gb = forge::grant(&x.identity, terms);
    let share = x.share(CORE, 0, Principal::Practice(b.practice())).unwrap();
    let mut cli = Peer::connect(&x.identity, &a).await;
    cli.push_with_addrs(vec![Item::grant(&gb), Item::key_share(&share)], vec![b.addr().await])
        .await;
    assert!(
        a.node.grants(&x.id()).iter().any(|g| g == &gb),
        "A does not hold X's genuine grant to B"
    );
    until("A forwards X's grant to B", || b.node.grants(&x.id()).contains(&gb)).await;
    let id = check_serves_patient(&a, &x).await;
    b.sync.sync_now(a.practice().peer_id()).await.unwrap();
    until_async("B holds A's write for X", || async {
        b.node.item(&id.into()).await.unwrap().is_some()
    })
    .await;
}

/// A writes X's core, sealed as X, and serves the write to X.
async fn check_serves_patient(a: &Practice, x: &TestPatient) -> EnvelopeId {
    let change = one_change(&a.key);
    let id = a.node.write_change(x.id(), CORE, change.as_change()).await.unwrap();
    assert_eq!(stored(a, id).await.unwrap().header().patient, x.id());
    let to_x = Peer::connect(&x.identity, a).await.pull_all().await;
    assert!(ids(&to_x).contains(&id), "A does not serve X its write");
    id
}

// ---------------------------------------------------------------- items 2–3

/// Issue 15 item 2: while its read-write grant is in force, practice M
/// writes one envelope for a fresh actor with seq 2^62. The patient
/// revokes with the cut computed as the CLI computes it from what A serves
/// the patient; M then keeps writing for that actor under the old epoch
/// key, back-dated before the revocation. A must reject it (and never have
/// counted the gap-opening envelope as readable history).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seq_gap_cannot_inflate_a_revocation_cut() {
    let a = Practice::start().await;
    let m = SecretIdentity::generate().unwrap();
    let mut x = TestPatient::new().unwrap();
    onboard(&a, &mut x, a.practice(), &[CORE]).await;
    let gm = onboard(&a, &mut x, m.practice_id().unwrap(), &[CORE]).await;
    let key0 = x.key(CORE, 0).unwrap();

    let mut mallory = Peer::connect(&m, &a).await;
    let honest = sealed(&key0, &m, &gm, &one_change(&m), now());
    let fresh = ActorId::generate(&m.public_bytes()).unwrap();
    let inflated = sealed(&key0, &m, &gm, &forge::change_with_seq(fresh, 1 << 62), now());
    mallory
        .push(vec![Item::envelope(&honest), Item::envelope(&inflated)])
        .await;

    // `medmesh patient revoke`: the cut from what A serves the patient, a
    // new epoch shared with A and the patient.
    let served = Peer::connect(&x.identity, &a).await.pull_all().await;
    let cut = CliPatient::cut_from(&gm, &served);
    let revocation = x.revoke(&gm, cut).unwrap();
    let items = vec![
        Item::new(ItemKind::Revocation, revocation.encoded().to_vec()),
        incoming_share(&x.share(CORE, 1, Principal::Patient(x.id())).unwrap()),
        incoming_share(&x.share(CORE, 1, Principal::Practice(a.practice())).unwrap()),
    ];
    a.node.submit(x.id(), items).await.unwrap();

    // M keeps writing for the fresh actor under epoch 0, back-dated.
    let back_dated = revocation.terms().issued_at - 1_000;
    let after = sealed(&key0, &m, &gm, &forge::change_with_seq(fresh, 1), back_dated);
    mallory.push(vec![Item::envelope(&after)]).await;
    assert!(
        stored(&a, after.id()).await.is_none(),
        "A accepted M's write after the revocation (cut inflated by a seq 2^62 envelope)"
    );
    let readable_gap = a
        .node
        .envelopes(&x.id(), Some(CORE))
        .unwrap()
        .into_iter()
        .any(|e| e.id == inflated.id() && e.state == EnvelopeState::Readable);
    assert!(
        !readable_gap,
        "A holds readable a change whose 2^62 - 1 predecessors it never saw"
    );
}

/// Issue 15 item 3: after its grant expired, practice M back-dates
/// `created_at` into the grant's window and pushes a new write. A must
/// not accept it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_dated_write_after_expiry_is_refused() {
    let a = Practice::start().await;
    let m = SecretIdentity::generate().unwrap();
    let mut x = TestPatient::new().unwrap();
    onboard(&a, &mut x, a.practice(), &[CORE]).await;
    let t = now();
    let gm = grant_at(
        &a,
        &mut x,
        Terms {
            not_before: t - 3 * HOUR,
            expires: Some(t - HOUR),
            ..Terms::read_write(m.practice_id().unwrap(), &[CORE])
        },
    )
    .await;
    let key0 = x.key(CORE, 0).unwrap();
    let back_dated = sealed(&key0, &m, &gm, &one_change(&m), t - 2 * HOUR);
    Peer::connect(&m, &a)
        .await
        .push(vec![Item::envelope(&back_dated)])
        .await;
    assert!(
        stored(&a, back_dated.id()).await.is_none(),
        "A accepted a write first seen an hour after its grant expired (created_at back-dated into the window)"
    );
}

// ---------------------------------------------------------------- item 4

fn patient_resource(patient: &PatientId) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": patient.to_string()}]
    })
}

fn condition(subject: &str, text: &str) -> Value {
    json!({
        "resourceType": "Condition",
        "code": {"text": text},
        "subject": {"reference": subject}
    })
}

/// A change by a fresh actor of `author` creating `Condition/<id>` in a
/// document of its own (as a peer's repository would make it), sealed for
/// `key`'s record under `grant`.
fn peer_create(key: &EpochKey, author: &SecretIdentity, grant: &Grant, id: &str, resource: &Value) -> Envelope {
    let actor = ActorId::generate(&author.public_bytes()).unwrap();
    let am_actor = automerge::ActorId::from(actor.0.to_vec());
    let mut doc = RecordDoc::default();
    let written = doc.create(&am_actor, 1_700_000_000_000, id, resource).unwrap();
    let decoded = DecodedChange::from_bytes(&written.change).unwrap();
    let change = OwnedChange {
        bytes: decoded.compressed_bytes(),
        hash: decoded.hash().0,
        actor,
        seq: decoded.seq(),
    };
    sealed(key, author, grant, &change, now())
}

/// Issue 15 item 4: X's read-write grantee M writes `Condition/<id of a
/// resource in Y's record>` into X's core document. A later local PUT of
/// Y's resource at A must stay in Y's record, and never reach X's grantees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_key_claimed_across_patients_stays_with_its_patient() {
    let a = Practice::start().await;
    let repo = Repository::new(a.node.clone(), repository::Config::default()).unwrap();
    let m = SecretIdentity::generate().unwrap();
    let mut x = TestPatient::new().unwrap();
    let mut y = TestPatient::new().unwrap();
    onboard(&a, &mut x, a.practice(), &[CORE]).await;
    onboard(&a, &mut y, a.practice(), &[CORE]).await;
    let gm = onboard(&a, &mut x, m.practice_id().unwrap(), &[CORE]).await;
    let app = || Actor::local_app("adversary test");
    repo.create_with_id("px", patient_resource(&x.id()), x.id(), CORE, app())
        .await
        .unwrap();
    repo.create_with_id("py", patient_resource(&y.id()), y.id(), CORE, app())
        .await
        .unwrap();
    repo.create_with_id("cy", condition("Patient/py", "Y's condition"), y.id(), CORE, app())
        .await
        .unwrap();

    // M claims Condition/cy in X's core; then writes a resource of X's own,
    // which tells when A has applied both.
    let key0 = x.key(CORE, 0).unwrap();
    let claim = peer_create(&key0, &m, &gm, "cy", &condition("Patient/py", "claimed by M"));
    let own = peer_create(&key0, &m, &gm, "mx", &condition("Patient/px", "X's condition by M"));
    let mut mallory = Peer::connect(&m, &a).await;
    mallory.push(vec![Item::envelope(&claim)]).await;
    mallory.push(vec![Item::envelope(&own)]).await;
    until_async("A's repository applied M's changes", || async {
        repo.location("Condition", "mx").await.is_ok()
    })
    .await;
    let before = a.node.envelope_ids(&x.id(), CORE).unwrap().len();
    let y_before: BTreeSet<EnvelopeId> = a.node.envelope_ids(&y.id(), CORE).unwrap().into_iter().collect();

    let current = repo.read("Condition", "cy").await.unwrap();
    let mut edited = current.json.clone();
    edited["note"] = json!([{"text": "edited at A"}]);
    repo.update("Condition", "cy", edited, None, false, app())
        .await
        .unwrap();

    assert_eq!(
        repo.location("Condition", "cy").await.unwrap(),
        (y.id(), CORE),
        "Y's Condition/cy is now filed in another patient's record"
    );
    assert_eq!(
        a.node.envelope_ids(&x.id(), CORE).unwrap().len(),
        before,
        "the PUT of Y's resource wrote into X's core record"
    );
    let put: BTreeSet<EnvelopeId> = a
        .node
        .envelope_ids(&y.id(), CORE)
        .unwrap()
        .into_iter()
        .filter(|id| !y_before.contains(id))
        .collect();
    assert!(!put.is_empty(), "the PUT of Y's resource wrote nothing into Y's record");
    let to_m = ids(&mallory.pull_all().await);
    assert!(
        to_m.is_disjoint(&put),
        "X's grantee M received the write of Y's resource"
    );
}

// ---------------------------------------------------------------- item 7

/// Issue 15 item 7: a self-made patient's grant to some practice, with
/// address hints pointing at a listener the test owns, pushed to A by a
/// stranger. A must not dial it. Checked after an honest grant pushed
/// later has made its whole way through A to practice B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_hints_from_a_stranger_are_not_dialled() {
    let a = Practice::start().await;
    let b = Practice::start().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();

    let z = TestPatient::new().unwrap();
    let nobody = SecretIdentity::generate().unwrap().practice_id().unwrap();
    let hint = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{}", nobody.peer_id());
    let stranger = forge::grant(
        &z.identity,
        Terms {
            address_hints: vec![hint],
            ..Terms::read_write(nobody, &[CORE])
        },
    );
    let mut mallory = Peer::connect(&SecretIdentity::generate().unwrap(), &a).await;
    mallory.push(vec![Item::grant(&stranger)]).await;

    // An honest patient of A grants B, with B's address: A delivers it.
    let mut h = TestPatient::new().unwrap();
    onboard(&a, &mut h, a.practice(), &[CORE]).await;
    let gb = forge::grant(&h.identity, Terms::read_write(b.practice(), &[CORE]));
    Peer::connect(&h.identity, &a)
        .await
        .push_with_addrs(vec![Item::grant(&gb)], vec![b.addr().await])
        .await;
    until("A delivers the honest grant to B", || {
        b.node.grants(&h.id()).contains(&gb)
    })
    .await;

    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Ok((_, from)) => panic!("A dialled the stranger's address hint (connection from {from})"),
        Err(e) => panic!("listener: {e}"),
    }
}

/// Issue 15 item 7: one stranger floods A with consent items of patients
/// it made up, for practices that are not A. A stores a bounded number of
/// them (not recording each as a rejection), and an honest patient's first
/// grant to A is still accepted afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_item_flood_from_self_made_identities_is_bounded() {
    const PATIENTS: usize = 256;
    let a = Practice::start().await;
    let elsewhere = SecretIdentity::generate().unwrap().practice_id().unwrap();
    let mut mallory = Peer::connect(&SecretIdentity::generate().unwrap(), &a).await;
    let consent_before = a.node.raw_store().consent_items().unwrap().len();
    let rejected_before = a.node.rejected_count().unwrap();
    let mut flood = Vec::new();
    for _ in 0..PATIENTS {
        let mut z = TestPatient::new().unwrap();
        let grant = forge::grant(&z.identity, Terms::read_write(elsewhere, &[CORE]));
        flood.push(Item::grant(&grant));
        flood.push(Item::key_share(
            &z.share(CORE, 0, Principal::Practice(elsewhere)).unwrap(),
        ));
    }
    for chunk in flood.chunks(128) {
        mallory.push(chunk.to_vec()).await;
    }
    let stored = a.node.raw_store().consent_items().unwrap().len() - consent_before;
    assert!(
        stored <= flood.len() / 4,
        "A stored {stored} of {} consent items of self-made patients from one stranger",
        flood.len()
    );
    assert!(
        a.node.rejected_count().unwrap() - rejected_before < 16,
        "A recorded the unwanted items one by one as permanent rejections"
    );

    // An honest patient's first grant (pushed by the patient's CLI) is accepted.
    let mut h = TestPatient::new().unwrap();
    let grant = h
        .grant(a.practice(), &[CORE], Access::ReadWrite, now() - 60_000, None)
        .unwrap();
    let share = h.share(CORE, 0, Principal::Practice(a.practice())).unwrap();
    let mut cli = Peer::connect(&h.identity, &a).await;
    let (accepted, rejected) = cli.pushed(vec![Item::grant(&grant), Item::key_share(&share)]).await;
    assert_eq!(
        (accepted, rejected),
        (2, 0),
        "A refused an honest patient's first grant after the flood"
    );
    assert!(
        a.node
            .grant_in_force(&h.id(), CORE, &a.practice(), Access::ReadWrite, now())
            .is_some()
    );
}

/// Consent items of `patients` self-made patients, each a grant to
/// `grantee` (read-write core) and, when `with_share`, a key share for it.
fn self_made_consent(patients: usize, grantee: PracticeId, with_share: bool) -> Vec<Item> {
    let mut items = Vec::new();
    for _ in 0..patients {
        let mut z = TestPatient::new().unwrap();
        items.push(Item::grant(&forge::grant(
            &z.identity,
            Terms::read_write(grantee, &[CORE]),
        )));
        if with_share {
            items.push(Item::key_share(
                &z.share(CORE, 0, Principal::Practice(grantee)).unwrap(),
            ));
        }
    }
    items
}

/// Pushes `items` to A from a fresh stranger identity, in pages; the
/// consent items A stored of them.
async fn flood_from_a_stranger(a: &Practice, items: &[Item]) -> usize {
    let before = a.node.raw_store().consent_items().unwrap().len();
    let mut mallory = Peer::connect(&SecretIdentity::generate().unwrap(), a).await;
    for chunk in items.chunks(256) {
        mallory.push(chunk.to_vec()).await;
    }
    a.node.raw_store().consent_items().unwrap().len() - before
}

/// What one stranger may leave at A: the consent items A stores of a flood
/// of 256 self-made patients' grants and shares for another practice.
async fn one_strangers_share(a: &Practice) -> usize {
    let elsewhere = SecretIdentity::generate().unwrap().practice_id().unwrap();
    flood_from_a_stranger(a, &self_made_consent(128, elsewhere, true)).await
}

/// The flood of `consent_item_flood_from_self_made_identities_is_bounded`
/// from several stranger identities (each costs nothing to make): what A
/// stores of self-made patients must stay bounded overall, not grow with
/// the number of sources.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_item_flood_from_many_self_made_sources_is_bounded() {
    const SOURCES: usize = 4;
    let a = Practice::start().await;
    let one = one_strangers_share(&a).await;
    let mut stored = one;
    for _ in 1..SOURCES {
        stored += one_strangers_share(&a).await;
    }
    assert!(
        stored <= 2 * one,
        "A stored {stored} consent items of self-made patients from {SOURCES} strangers ({one} from the first)"
    );
}

/// Self-made patients' grants naming A itself, pushed by one stranger (not
/// by each patient's own session): a grant to the node was always taken (a
/// patient's first grant looks like that) and makes its patient no
/// stranger, so this way one stranger left as much as it liked (all 512).
/// Brought by anyone but the patient, such a grant is an introduction,
/// taken at a rate per source: A bounds it like the stranger's other items.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_self_made_grants_naming_the_node_is_bounded() {
    let a = Practice::start().await;
    let one = one_strangers_share(&a).await;
    let naming = self_made_consent(512, a.practice(), false);
    let stored = flood_from_a_stranger(&a, &naming).await;
    assert!(
        stored <= one,
        "A stored {stored} of {} self-made patients' grants naming it, all pushed by one stranger \
         (a stranger's other items: {one})",
        naming.len()
    );
}

/// Item 7, the grants that name the node itself: every self-made patient
/// may grant A, and a grant to A is a relationship the node honours hints
/// of (where the patient's history is). One stranger pushing many such
/// grants, each hinting at another PeerId on a listener the test owns,
/// must not make A a port scanner: A dials at most a small burst of them,
/// and an honest patient's grant is still delivered (on today's code all
/// 64 are dialled at once, and A's connection to the honest grantee then
/// waits behind them for longer than the test's deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hints_in_many_self_made_grants_to_the_node_are_dialled_at_most_a_burst() {
    const GRANTS: usize = 64;
    const BURST: usize = 16;
    let a = Practice::start().await;
    let b = Practice::start().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut flood = Vec::new();
    for _ in 0..GRANTS {
        let z = TestPatient::new().unwrap();
        let target = SecretIdentity::generate().unwrap().practice_id().unwrap().peer_id();
        flood.push(Item::grant(&forge::grant(
            &z.identity,
            Terms {
                address_hints: vec![format!("/ip4/127.0.0.1/tcp/{port}/p2p/{target}")],
                ..Terms::read_write(a.practice(), &[CORE])
            },
        )));
    }
    Peer::connect(&SecretIdentity::generate().unwrap(), &a)
        .await
        .push(flood)
        .await;

    // An honest patient of A grants B, with B's address: A delivers it.
    let mut h = TestPatient::new().unwrap();
    onboard(&a, &mut h, a.practice(), &[CORE]).await;
    let gb = forge::grant(&h.identity, Terms::read_write(b.practice(), &[CORE]));
    Peer::connect(&h.identity, &a)
        .await
        .push_with_addrs(vec![Item::grant(&gb)], vec![b.addr().await])
        .await;
    until("A delivers the honest grant to B", || {
        b.node.grants(&h.id()).contains(&gb)
    })
    .await;

    let mut dialled = 0;
    loop {
        match listener.accept() {
            Ok(_) => dialled += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("listener: {e}"),
        }
    }
    assert!(
        dialled <= BURST,
        "A dialled {dialled} of the {GRANTS} hints one stranger's self-made grants carried"
    );
}

/// Item 2's queue, attacked: an envelope whose seq is not the next for its
/// actor waits for the gap to fill, in a bounded queue. Strangers fill it
/// with gap envelopes of their own self-made patients (seq 2^62 for fresh
/// actors, validly written under grants they made), before and after an
/// honest grantee's changes reach A out of order. Whatever the queue does
/// when full, it must never cost the honest write: once the grantee sends
/// again what A does not hold, all of it is held readable (an envelope
/// refused for room is retried; one recorded as rejected never is).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap_queue_flood_never_costs_an_honest_out_of_order_write() {
    const PER_PEER: usize = 1024;
    let a = Practice::start().await;
    let b = SecretIdentity::generate().unwrap();
    let mut x = TestPatient::new().unwrap();
    onboard(&a, &mut x, a.practice(), &[CORE]).await;
    let gb = onboard(&a, &mut x, b.practice_id().unwrap(), &[CORE]).await;
    let key0 = x.key(CORE, 0).unwrap();
    let mut maker = ChangeMaker::new(&b.public_bytes()).unwrap();
    let honest: Vec<Envelope> = (0..3)
        .map(|i| sealed(&key0, &b, &gb, &maker.put(&format!("k{i}"), "v").unwrap(), now()))
        .collect();
    let mut from_b = Peer::connect(&b, &a).await;

    let flood = async |a: &Practice| {
        let mut z = TestPatient::new().unwrap();
        let m = SecretIdentity::generate().unwrap();
        let grant = forge::grant(&z.identity, Terms::read_write(m.practice_id().unwrap(), &[CORE]));
        let key = z.key(CORE, 0).unwrap();
        let mut items = vec![Item::grant(&grant)];
        for _ in 0..PER_PEER {
            let actor = ActorId::generate(&m.public_bytes()).unwrap();
            items.push(Item::envelope(&sealed(
                &key,
                &m,
                &grant,
                &forge::change_with_seq(actor, 1 << 62),
                now(),
            )));
        }
        let mut peer = Peer::connect(&m, a).await;
        for chunk in items.chunks(256) {
            peer.push(chunk.to_vec()).await;
        }
    };

    // The last change first (a gap), the flood, then the first two.
    from_b.push(vec![Item::envelope(&honest[2])]).await;
    flood(&a).await;
    flood(&a).await;
    from_b
        .push(vec![Item::envelope(&honest[0]), Item::envelope(&honest[1])])
        .await;
    // The grantee sends again whatever A does not hold yet.
    let mut missing = Vec::new();
    for e in &honest {
        if stored(&a, e.id()).await.is_none() {
            missing.push(Item::envelope(e));
        }
    }
    if !missing.is_empty() {
        from_b.push(missing).await;
    }
    let held: Vec<EnvelopeState> = a
        .node
        .envelopes(&x.id(), Some(CORE))
        .unwrap()
        .into_iter()
        .filter(|e| honest.iter().any(|h| h.id() == e.id))
        .map(|e| e.state)
        .collect();
    assert_eq!(
        held,
        vec![EnvelopeState::Readable; 3],
        "an honest grantee's out-of-order changes were lost to a flood of strangers' gap envelopes"
    );
}

/// The gap queue across a restart: an honest grantee's second change
/// reaches A before its first; A restarts; the first arrives. Both end
/// readable, without the grantee sending the second again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_of_order_write_waits_across_a_restart() {
    let a = Practice::start().await;
    let b = SecretIdentity::generate().unwrap();
    let mut x = TestPatient::new().unwrap();
    onboard(&a, &mut x, a.practice(), &[CORE]).await;
    let gb = onboard(&a, &mut x, b.practice_id().unwrap(), &[CORE]).await;
    let key0 = x.key(CORE, 0).unwrap();
    let mut maker = ChangeMaker::new(&b.public_bytes()).unwrap();
    let first = sealed(&key0, &b, &gb, &maker.put("k1", "v").unwrap(), now());
    let second = sealed(&key0, &b, &gb, &maker.put("k2", "v").unwrap(), now());
    Peer::connect(&b, &a).await.push(vec![Item::envelope(&second)]).await;
    let a = a.restart().await;
    Peer::connect(&b, &a).await.push(vec![Item::envelope(&first)]).await;
    for e in [&first, &second] {
        let state = a
            .node
            .envelopes(&x.id(), Some(CORE))
            .unwrap()
            .into_iter()
            .find(|h| h.id == e.id())
            .map(|h| h.state);
        assert_eq!(
            state,
            Some(EnvelopeState::Readable),
            "seq {} of the grantee's actor is not held readable after the restart",
            e.header().seq
        );
    }
}

/// Item 7's overall cap, attacked: strangers fill what A keeps of patients
/// it has no relationship with. It must not cost A's own patients: one
/// onboarding at A (its first grant, to A, in the same push as a grant for
/// B with B's address) and one already onboarded sharing with B both have
/// their grant and share taken and delivered to B. A patient of none of
/// A's practices gets a clear answer instead: A keeps nothing of theirs
/// beyond the caps (it would forward none of it, nor dial their hints:
/// `limits.rs`), and the count shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_filling_the_overall_cap_do_not_cost_a_patients_own_submission() {
    let a = Practice::start().await;
    let b = Practice::start().await;
    for _ in 0..4 {
        one_strangers_share(&a).await;
    }
    let b_addr = b.addr().await;

    // New at A: first grant to A and the grant for B in one push.
    let mut n = TestPatient::new().unwrap();
    let first = forge::grant(&n.identity, Terms::read_write(a.practice(), &[CORE]));
    let gb_new = forge::grant(&n.identity, Terms::read_write(b.practice(), &[CORE]));
    let share = n.share(CORE, 0, Principal::Practice(b.practice())).unwrap();
    let answer = Peer::connect(&n.identity, &a)
        .await
        .push_with_addrs(
            vec![Item::grant(&first), Item::grant(&gb_new), Item::key_share(&share)],
            vec![b_addr.clone()],
        )
        .await;
    assert!(
        matches!(answer, Response::Pushed { accepted: 3, .. }),
        "A refused a new patient's first grant and share once strangers filled its cap: {answer:?}"
    );

    // Onboarded at A earlier, sharing with B now.
    let mut h = TestPatient::new().unwrap();
    onboard(&a, &mut h, a.practice(), &[CORE]).await;
    let gb = forge::grant(&h.identity, Terms::read_write(b.practice(), &[CORE]));
    let share = h.share(CORE, 0, Principal::Practice(b.practice())).unwrap();
    let answer = Peer::connect(&h.identity, &a)
        .await
        .push_with_addrs(vec![Item::grant(&gb), Item::key_share(&share)], vec![b_addr.clone()])
        .await;
    assert!(
        matches!(answer, Response::Pushed { accepted: 2, .. }),
        "A refused its own patient's grant for another practice once strangers filled its cap: {answer:?}"
    );
    until("A delivers both patients' grants to B", || {
        b.node.grants(&h.id()).contains(&gb) && b.node.grants(&n.id()).contains(&gb_new)
    })
    .await;

    // A patient of none of A's practices: refused, and the count says so.
    let mut s = TestPatient::new().unwrap();
    let gs = forge::grant(&s.identity, Terms::read_write(b.practice(), &[CORE]));
    let share = s.share(CORE, 0, Principal::Practice(b.practice())).unwrap();
    let answer = Peer::connect(&s.identity, &a)
        .await
        .push_with_addrs(vec![Item::grant(&gs), Item::key_share(&share)], vec![b_addr])
        .await;
    assert!(
        matches!(
            answer,
            Response::Pushed {
                accepted: 0,
                duplicates: 0,
                pending: 0,
                ..
            }
        ),
        "{answer:?}"
    );
}
