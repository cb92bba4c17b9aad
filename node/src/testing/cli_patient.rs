//! [`CliPatient`]: the patient's CLI as tests drive it, on a real
//! [`Keystore`]. What a grant or a revocation carries is decided by the
//! library code `medmesh patient` calls (`Keystore::grant`, `revoke`,
//! `rotate`); this adds only what the CLI adds around it (the patient's other
//! live grants travel along) and the tests' ledger.

use std::collections::{BTreeMap, BTreeSet};

use medmesh_crypto::{
    Access, ActorId, Collection, Envelope, Epoch, EpochKey, Grant, GrantRequest, KdfParams, KeyShare, Keystore,
    PatientId, PeerId, PracticeId, Principal, Revocation, SecretIdentity, Timestamp, now,
};

use crate::Result;
use crate::item::{Item, ItemKind};

/// A grant the patient issued, and its revocation once issued.
#[derive(Debug, Clone)]
pub struct IssuedGrant {
    /// The grant.
    pub grant: Grant,
    /// Its revocation, once the patient revoked it.
    pub revocation: Option<Revocation>,
}

impl IssuedGrant {
    /// The patient's truth: not revoked and `at` inside the window.
    pub fn in_force(&self, at: Timestamp) -> bool {
        self.revocation.is_none() && self.grant.in_force(at, false)
    }
}

/// The patient's CLI as the tests drive it: a real [`Keystore`] plus the
/// tests' ledger (every grant issued with its revocation, every key share
/// made for a practice).
pub struct CliPatient {
    keystore: Keystore,
    /// Every epoch key made, per collection, oldest first (a view of the
    /// keystore's keys, refreshed after each grant and revocation).
    pub keys: BTreeMap<Collection, Vec<EpochKey>>,
    /// Every grant issued, in order.
    pub grants: Vec<IssuedGrant>,
    /// (recipient, collection, epoch) of every key share made for a practice.
    pub shares: BTreeSet<(PracticeId, Collection, Epoch)>,
}

impl CliPatient {
    /// A fresh patient.
    ///
    /// # Errors
    /// Randomness failures.
    pub fn new() -> Result<Self> {
        Ok(Self {
            keystore: Keystore::new(SecretIdentity::generate()?, KdfParams::DEFAULT),
            keys: BTreeMap::new(),
            grants: Vec::new(),
            shares: BTreeSet::new(),
        })
    }

    /// The patient's key.
    pub fn identity(&self) -> &SecretIdentity {
        self.keystore.identity()
    }

    /// The patient id.
    pub fn id(&self) -> PatientId {
        self.keystore.patient()
    }

    /// The patient's key as a libp2p peer: the CLI session's identity.
    ///
    /// # Errors
    /// A key libp2p refuses (never for an ed25519 key made here).
    pub fn peer(&self) -> Result<PeerId> {
        Ok(self.identity().practice_id()?.peer_id())
    }

    /// Notes the shares made for practices and refreshes [`CliPatient::keys`].
    fn record(&mut self, shares: &[KeyShare]) -> Vec<Item> {
        for share in shares {
            let t = share.terms();
            if let Principal::Practice(p) = t.recipient {
                self.shares.insert((p, t.collection, t.epoch));
            }
        }
        self.keys = Collection::ALL
            .into_iter()
            .map(|c| (c, self.keystore.keys_of(c).into_iter().cloned().collect::<Vec<_>>()))
            .filter(|(_, k)| !k.is_empty())
            .collect();
        shares.iter().map(Item::key_share).collect()
    }

    /// The current key of `collection`, if any grant made one.
    pub fn current_key(&self, collection: Collection) -> Option<&EpochKey> {
        self.keys.get(&collection).and_then(|k| k.last())
    }

    /// `medmesh patient grant`: the signed grant (its index in
    /// [`CliPatient::grants`]) and the items the CLI submits: the grant, the
    /// patient's other live grants, and what `Keystore::grant` made (an
    /// epoch-0 key with the patient's own share for a collection granted for
    /// the first time, the grantee's shares of every epoch). `address_hints`
    /// come first among the grant's hints, as the node reached does in the CLI.
    ///
    /// # Errors
    /// Randomness, signing and wrapping failures.
    #[allow(clippy::too_many_arguments)]
    pub fn grant(
        &mut self,
        grantee: PracticeId,
        collections: &[Collection],
        access: Access,
        not_before: Timestamp,
        expires: Option<Timestamp>,
        address_hints: Vec<String>,
    ) -> Result<(usize, Vec<Item>)> {
        let at = now();
        let granted = self.keystore.grant(
            GrantRequest {
                grantee,
                collections: collections.to_vec(),
                access,
                not_before,
                expires,
                purpose: "treatment".into(),
                address_hints,
            },
            at,
        )?;
        let grant = granted.grant;
        // Submitted as it is made (the tests hand the items over).
        self.keystore.unsubmitted.retain(|g| *g != grant.id());
        let mut items = vec![Item::grant(&grant)];
        // As the CLI: the patient's other live grants go along, so the node
        // reached learns every practice it must forward to.
        items.extend(
            self.keystore
                .live_grants(at)
                .filter(|g| g.id() != grant.id())
                .map(Item::grant),
        );
        items.extend(self.record(&granted.shares));
        self.grants.push(IssuedGrant {
            grant,
            revocation: None,
        });
        Ok((self.grants.len() - 1, items))
    }

    /// `medmesh patient revoke` of grant `index`, its cut made from `held`
    /// ((collection, actor, seq) of the grantee's changes under it that the
    /// node reached holds: [`CliPatient::held_under`]), with a new epoch of
    /// every collection it covered for the patient and the readers still
    /// live at `at` (`Keystore::revoke` and `Keystore::rotate`). `None` for
    /// an index never issued.
    ///
    /// # Errors
    /// Randomness, signing and wrapping failures.
    pub fn revoke(
        &mut self,
        index: usize,
        held: Vec<(Collection, ActorId, u64)>,
        at: Timestamp,
    ) -> Result<Option<Vec<Item>>> {
        let Some(grant) = self.grants.get(index).map(|g| g.grant.clone()) else {
            return Ok(None);
        };
        let revocation = self.keystore.revoke(&grant, held, now())?;
        let mut items = vec![Item::revocation(&revocation)];
        items.extend(self.keystore.live_grants(now()).map(Item::grant));
        let rotated = self.keystore.rotate(&grant.terms().collections, at)?;
        let shares: Vec<KeyShare> = rotated.into_iter().flat_map(|r| r.shares).collect();
        items.extend(self.record(&shares));
        if let Some(issued) = self.grants.get_mut(index) {
            issued.revocation = Some(revocation);
        }
        Ok(Some(items))
    }

    /// The index in [`CliPatient::grants`] of `grant`, if this patient issued it.
    pub fn index_of(&self, grant: &Grant) -> Option<usize> {
        self.grants.iter().position(|g| g.grant.id() == grant.id())
    }

    /// What the CLI reads from what a node serves the patient for the cut:
    /// the grantee's changes written under `grant`, as (collection, actor,
    /// seq). Items that are not envelopes, or do not decode, are skipped.
    pub fn held_under(grant: &Grant, served: &[Item]) -> Vec<(Collection, ActorId, u64)> {
        let grantee = grant.terms().grantee;
        served
            .iter()
            .filter(|i| i.kind == ItemKind::Envelope)
            .filter_map(|i| Envelope::decode(&i.bytes).ok())
            .map(|envelope| envelope.header().clone())
            .filter(|h| h.author == Principal::Practice(grantee) && h.grant_id == Some(grant.id()))
            .map(|h| (h.collection, h.actor, h.seq))
            .collect()
    }

    /// The cut the CLI computes from what a node serves the patient: for
    /// the grantee's actors, the highest change written under `grant`
    /// without a gap (`medmesh_crypto::revocation_cut`).
    pub fn cut_from(grant: &Grant, served: &[Item]) -> BTreeMap<ActorId, u64> {
        medmesh_crypto::revocation_cut(Self::held_under(grant, served))
    }

    /// Whether the patient shared the key of (collection, epoch) with `practice`.
    pub fn shared(&self, practice: PracticeId, collection: Collection, epoch: Epoch) -> bool {
        self.shares.contains(&(practice, collection, epoch))
    }
}
