//! The patient's side of consent as library code (DESIGN §5, consent flows):
//! what a grant carries (its terms, the address hints, a key share for every
//! epoch of every collection it covers, epoch 0 made on first use), what a
//! revocation cuts, and who reads the epoch a revocation starts. Methods on
//! the [`Keystore`], in memory only: the CLI saves and sends what they make,
//! and tests call the same code. No I/O, no clock (callers pass `now`).

use std::collections::BTreeSet;

use crate::consent::{Access, Collection, Grant, GrantId, GrantTerms, Revocation, RevocationTerms, revocation_cut};
use crate::error::Result;
use crate::id::{ActorId, PracticeId, Principal, Timestamp};
use crate::keys::{Epoch, EpochKey, KeyShare};
use crate::keystore::Keystore;

/// What the patient asks a grant to say.
#[derive(Clone, Debug)]
pub struct GrantRequest {
    /// The practice that may receive (and, with read-write, write).
    pub grantee: PracticeId,
    /// The collections, an explicit list (`all` is expanded by the caller).
    pub collections: Vec<Collection>,
    /// Read or read-write.
    pub access: Access,
    /// In force from (a little before now, for nodes whose clock is behind).
    pub not_before: Timestamp,
    /// In force until, if ever.
    pub expires: Option<Timestamp>,
    /// Why (`treatment`, `emergency`, …).
    pub purpose: String,
    /// Where the caller knows the record is, first the multiaddr of the node
    /// the grant is submitted to; [`Keystore::address_hints`] adds the rest.
    pub address_hints: Vec<String>,
}

/// A signed grant and everything that must travel with it.
#[derive(Debug)]
pub struct Granted {
    /// The grant, recorded in the keystore as not yet submitted.
    pub grant: Grant,
    /// The patient's own share of every key made now, and the grantee's
    /// share of every epoch of every collection covered.
    pub shares: Vec<KeyShare>,
    /// The collections whose first key was made now.
    pub created: Vec<Collection>,
}

/// A new epoch of one collection and the shares that hand it out.
#[derive(Debug)]
pub struct Rotated {
    /// Which collection.
    pub collection: Collection,
    /// The new epoch.
    pub epoch: Epoch,
    /// The practices that read it (grantees of live grants covering it).
    pub readers: BTreeSet<PracticeId>,
    /// The patient's share, then one per reader.
    pub shares: Vec<KeyShare>,
}

impl Keystore {
    /// Every key of `collection`, oldest epoch first.
    pub fn keys_of(&self, collection: Collection) -> Vec<&EpochKey> {
        let mut keys: Vec<&EpochKey> = self.keys.iter().filter(|k| k.collection == collection).collect();
        keys.sort_by_key(|k| k.epoch);
        keys
    }

    /// Whether the patient revoked `grant`.
    pub fn is_revoked(&self, grant: &Grant) -> bool {
        self.revocations.iter().any(|r| r.revokes(grant))
    }

    /// Where a grantee finds the record: `first` (the node the grant goes
    /// to), then the nodes the patient's other live grants were submitted
    /// to, without repeats, up to what a grant carries.
    pub fn address_hints(&self, first: &[String], now: Timestamp) -> Vec<String> {
        let mut hints: Vec<String> = Vec::new();
        for hint in first
            .iter()
            .chain(self.live_grants(now).flat_map(|g| &g.terms().address_hints))
        {
            if hints.len() == crate::consent::MAX_ADDRESS_HINTS {
                break;
            }
            if !hints.contains(hint) {
                hints.push(hint.clone());
            }
        }
        hints
    }

    /// The grantee's share of every epoch of every collection `grant`
    /// covers (what a grant carries; again when it is submitted later).
    ///
    /// # Errors
    /// Wrapping and signing failures.
    pub fn grantee_shares(&self, grant: &Grant, now: Timestamp) -> Result<Vec<KeyShare>> {
        let to = Principal::Practice(grant.terms().grantee);
        let mut shares = Vec::new();
        for collection in &grant.terms().collections {
            for key in self.keys_of(*collection) {
                shares.push(KeyShare::create(key, to, self.identity(), now)?);
            }
        }
        Ok(shares)
    }

    /// Signs the grant `request` describes and the key shares it needs:
    /// for each covered collection without a key yet, epoch 0 is made (with
    /// the patient's own share, so any node holding the record can hand the
    /// key back); the grantee gets a share of every epoch, so it reads the
    /// history too. The grant and new keys are recorded here, the grant as
    /// not submitted: save the keystore before anything leaves.
    ///
    /// # Errors
    /// Randomness, signing and wrapping failures.
    pub fn grant(&mut self, request: GrantRequest, now: Timestamp) -> Result<Granted> {
        let patient = self.patient();
        let mut collections = request.collections.clone();
        collections.sort();
        collections.dedup();
        let terms = GrantTerms {
            id: GrantId::generate()?,
            patient,
            grantee: request.grantee,
            collections: collections.clone(),
            access: request.access,
            not_before: request.not_before,
            expires: request.expires,
            purpose: request.purpose,
            issued_at: now,
            address_hints: self.address_hints(&request.address_hints, now),
        };
        let grant = Grant::sign(terms, self.identity())?;
        let mut shares = Vec::new();
        let mut created = Vec::new();
        for collection in collections {
            if self.keys_of(collection).is_empty() {
                let key = EpochKey::generate(patient, collection, 0)?;
                shares.push(KeyShare::create(
                    &key,
                    Principal::Patient(patient),
                    self.identity(),
                    now,
                )?);
                self.keys.push(key);
                created.push(collection);
            }
        }
        shares.extend(self.grantee_shares(&grant, now)?);
        self.grants.push(grant.clone());
        self.unsubmitted.push(grant.id());
        Ok(Granted { grant, shares, created })
    }

    /// Signs the revocation of `grant` and records it. Its cut holds, per
    /// actor of the grantee, the changes written under this grant among
    /// `held` (collection, actor, seq of what the node reached holds) up to
    /// the first gap, so a far-ahead seq inflates nothing
    /// ([`revocation_cut`]). A grant no node ever took gets an empty cut.
    ///
    /// # Errors
    /// Signing failures.
    pub fn revoke(
        &mut self,
        grant: &Grant,
        held: impl IntoIterator<Item = (Collection, ActorId, u64)>,
        now: Timestamp,
    ) -> Result<Revocation> {
        let revocation = Revocation::sign(
            RevocationTerms {
                patient: self.patient(),
                grant_id: grant.id(),
                issued_at: now,
                cut: revocation_cut(held),
            },
            self.identity(),
        )?;
        self.revocations.push(revocation.clone());
        self.unsubmitted.retain(|g| *g != grant.id());
        Ok(revocation)
    }

    /// Starts a new epoch of each collection, shared with the patient and
    /// with the grantee of every grant still live that covers it (call it
    /// after recording the revocations that end the others).
    ///
    /// # Errors
    /// Randomness and wrapping failures.
    pub fn rotate(&mut self, collections: &[Collection], now: Timestamp) -> Result<Vec<Rotated>> {
        let patient = self.patient();
        let mut out = Vec::new();
        for collection in collections.iter().copied().collect::<BTreeSet<_>>() {
            let epoch = self.keys_of(collection).last().map_or(0, |k| k.epoch + 1);
            let key = EpochKey::generate(patient, collection, epoch)?;
            let readers: BTreeSet<PracticeId> = self
                .live_grants(now)
                .filter(|g| g.covers(collection))
                .map(|g| g.terms().grantee)
                .collect();
            let mut shares = vec![KeyShare::create(
                &key,
                Principal::Patient(patient),
                self.identity(),
                now,
            )?];
            for reader in &readers {
                shares.push(KeyShare::create(
                    &key,
                    Principal::Practice(*reader),
                    self.identity(),
                    now,
                )?);
            }
            self.keys.push(key);
            out.push(Rotated {
                collection,
                epoch,
                readers,
                shares,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::id::SecretIdentity;
    use crate::keystore::KdfParams;

    const NOW: Timestamp = 1_800_000_000_000;

    fn practice(n: u8) -> PracticeId {
        SecretIdentity::from_seed(&[n; 32]).practice_id().unwrap()
    }

    fn request(to: PracticeId, collections: &[Collection]) -> GrantRequest {
        GrantRequest {
            grantee: to,
            collections: collections.to_vec(),
            access: Access::Read,
            not_before: NOW - 60_000,
            expires: None,
            purpose: "treatment".into(),
            address_hints: vec!["/ip4/127.0.0.1/tcp/1/p2p/x".into()],
        }
    }

    #[test]
    fn a_grant_carries_every_epoch_and_a_revocation_rotates_for_the_rest() {
        let mut ks = Keystore::new(SecretIdentity::from_seed(&[1; 32]), KdfParams::DEFAULT);
        let (a, b) = (practice(2), practice(3));
        let first = ks
            .grant(request(a, &[Collection::Labs, Collection::Core]), NOW)
            .unwrap();
        assert_eq!(first.created, [Collection::Core, Collection::Labs]);
        // Patient's own share and A's, per collection.
        assert_eq!(first.shares.len(), 4);
        assert!(!ks.is_submitted(&first.grant), "recorded as not submitted");
        ks.unsubmitted.clear();

        let to_b = ks.grant(request(b, &[Collection::Labs]), NOW).unwrap();
        assert!(to_b.created.is_empty());
        assert_eq!(to_b.shares.len(), 1, "B gets labs epoch 0 only");
        assert_eq!(to_b.grant.terms().address_hints[0], "/ip4/127.0.0.1/tcp/1/p2p/x");
        ks.unsubmitted.clear();

        let actor = ActorId::for_author(a.as_bytes(), [0; 8]);
        let held = [
            (Collection::Labs, actor, 1),
            (Collection::Labs, actor, 2),
            (Collection::Labs, actor, 9),
        ];
        let revocation = ks.revoke(&first.grant, held, NOW).unwrap();
        assert!(ks.is_revoked(&first.grant));
        assert!(
            revocation.cut_admits(&actor, 2) && !revocation.cut_admits(&actor, 3),
            "cut stops at the gap"
        );

        let rotated = ks.rotate(&first.grant.terms().collections, NOW).unwrap();
        let labs = rotated.iter().find(|r| r.collection == Collection::Labs).unwrap();
        let core = rotated.iter().find(|r| r.collection == Collection::Core).unwrap();
        assert_eq!(
            (labs.epoch, labs.readers.iter().copied().collect::<Vec<_>>()),
            (1, vec![b])
        );
        assert_eq!(
            (core.epoch, core.readers.len(), core.shares.len()),
            (1, 0, 1),
            "only the patient reads core now"
        );
        assert_eq!(ks.keys_of(Collection::Labs).len(), 2);
    }
}
