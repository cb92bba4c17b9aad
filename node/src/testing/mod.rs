//! Helpers for tests, benchmarks and demos. Nothing here is used by the
//! node itself.
//!
//! Two patients: [`CliPatient`] is the honest one, the patient's CLI on a
//! real keystore (what a grant or revocation carries is the library's
//! rule, never re-coded here); [`TestPatient`] signs whatever terms a test
//! hands it (a grant's window, a revocation's cut, a key share of any
//! epoch), for tests that build items by hand or attack the node. Also real
//! Automerge changes with medmesh actor ids, and a store whose flushes fail
//! on demand.

use std::collections::{BTreeMap, HashMap};

use automerge::transaction::Transactable as _;
use automerge::{AutoCommit, ROOT};
use medmesh_crypto::{
    Access, ActorId, Change, Collection, Epoch, EpochKey, Grant, GrantId, GrantTerms, KeyShare, PatientId, PracticeId,
    Principal, Revocation, RevocationTerms, SecretIdentity, Timestamp, now,
};

use crate::item::Item;

mod cli_patient;

use crate::store::ItemKind;
use crate::{Error, Result};
pub use cli_patient::{CliPatient, IssuedGrant};

/// A patient with their collection keys, as the CLI keystore would hold them.
pub struct TestPatient {
    /// The patient's key.
    pub identity: SecretIdentity,
    keys: HashMap<(Collection, Epoch), EpochKey>,
}

impl TestPatient {
    /// A fresh patient.
    ///
    /// # Errors
    /// Randomness failures.
    pub fn new() -> Result<Self> {
        Ok(Self {
            identity: SecretIdentity::generate()?,
            keys: HashMap::new(),
        })
    }

    /// A patient from a fixed seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self {
            identity: SecretIdentity::from_seed(seed),
            keys: HashMap::new(),
        }
    }

    /// The patient id.
    pub fn id(&self) -> PatientId {
        self.identity.patient_id()
    }

    /// The key of (collection, epoch), made on first use.
    ///
    /// # Errors
    /// Randomness failures.
    pub fn key(&mut self, collection: Collection, epoch: Epoch) -> Result<EpochKey> {
        if let Some(k) = self.keys.get(&(collection, epoch)) {
            return Ok(k.clone());
        }
        let k = EpochKey::generate(self.id(), collection, epoch)?;
        self.keys.insert((collection, epoch), k.clone());
        Ok(k)
    }

    /// Signs a grant to `to` for `collections`, valid from `not_before`.
    ///
    /// # Errors
    /// Signing failures.
    pub fn grant(
        &self,
        to: PracticeId,
        collections: &[Collection],
        access: Access,
        not_before: Timestamp,
        expires: Option<Timestamp>,
    ) -> Result<Grant> {
        let mut collections = collections.to_vec();
        collections.sort();
        collections.dedup();
        Ok(Grant::sign(
            GrantTerms {
                id: GrantId::generate()?,
                patient: self.id(),
                grantee: to,
                collections,
                access,
                not_before,
                expires,
                purpose: "treatment".into(),
                issued_at: now(),
                address_hints: Vec::new(),
            },
            &self.identity,
        )?)
    }

    /// A key share of (collection, epoch) for `to`.
    ///
    /// # Errors
    /// Wrapping failures.
    pub fn share(&mut self, collection: Collection, epoch: Epoch, to: Principal) -> Result<KeyShare> {
        let key = self.key(collection, epoch)?;
        Ok(KeyShare::create(&key, to, &self.identity, now())?)
    }

    /// Revokes `grant` with `cut` (actor → highest accepted seq).
    ///
    /// # Errors
    /// Signing failures.
    pub fn revoke(&self, grant: &Grant, cut: BTreeMap<ActorId, u64>) -> Result<Revocation> {
        Ok(Revocation::sign(
            RevocationTerms {
                patient: self.id(),
                grant_id: grant.id(),
                issued_at: now(),
                cut,
            },
            &self.identity,
        )?)
    }

    /// A read-write grant to `to` for `collection` from now minus a minute,
    /// plus its epoch-0 key share, ready for [`crate::Node::submit`].
    ///
    /// # Errors
    /// Signing and wrapping failures.
    pub fn onboard(&mut self, to: PracticeId, collection: Collection) -> Result<(Grant, Vec<Item>)> {
        self.grant_with_share(to, collection, Access::ReadWrite)
    }

    /// A grant to `to` for `collection` with `access`, from now minus a
    /// minute, plus its epoch-0 key share, ready for [`crate::Node::submit`].
    ///
    /// # Errors
    /// Signing and wrapping failures.
    pub fn grant_with_share(
        &mut self,
        to: PracticeId,
        collection: Collection,
        access: Access,
    ) -> Result<(Grant, Vec<Item>)> {
        let grant = self.grant(to, &[collection], access, now().saturating_sub(60_000), None)?;
        let share = self.share(collection, 0, Principal::Practice(to))?;
        let items = vec![
            Item::new(ItemKind::Grant, grant.encoded().to_vec()),
            Item::new(ItemKind::KeyShare, share.encoded().to_vec()),
        ];
        Ok((grant, items))
    }
}

/// A change as the record layer hands it to the store.
#[derive(Clone, Debug)]
pub struct OwnedChange {
    /// Raw Automerge change bytes.
    pub bytes: Vec<u8>,
    /// Its hash.
    pub hash: [u8; 32],
    /// Its actor.
    pub actor: ActorId,
    /// Its seq.
    pub seq: u64,
}

impl OwnedChange {
    /// Borrowed as [`Change`] for [`crate::Node::write_change`].
    pub fn as_change(&self) -> Change<'_> {
        Change {
            bytes: &self.bytes,
            hash: self.hash,
            actor: self.actor,
            seq: self.seq,
        }
    }
}

impl OwnedChange {
    /// This change re-encoded with another seq (so another hash): what an
    /// author who skips seqs signs, for tests of the seq rules.
    ///
    /// # Errors
    /// Automerge failures (reported as storage errors; test code only).
    pub fn with_seq(&self, seq: u64) -> Result<OwnedChange> {
        let change = automerge::Change::try_from(self.bytes.as_slice())
            .map_err(|e| Error::Storage(format!("automerge: {e}")))?;
        let mut expanded = change.decode();
        expanded.seq = seq;
        let mut rebuilt = automerge::Change::from(expanded);
        Ok(OwnedChange {
            bytes: rebuilt.bytes().to_vec(),
            hash: rebuilt.hash().0,
            actor: self.actor,
            seq,
        })
    }
}

/// Makes real Automerge changes, one per call, for one actor.
pub struct ChangeMaker {
    doc: AutoCommit,
    actor: ActorId,
}

impl ChangeMaker {
    /// A maker whose actor belongs to `author` (random process nonce).
    ///
    /// # Errors
    /// Randomness failures.
    pub fn new(author: &[u8; 32]) -> Result<Self> {
        let actor = ActorId::generate(author)?;
        Ok(Self {
            doc: AutoCommit::new().with_actor(automerge::ActorId::from(&actor.0[..])),
            actor,
        })
    }

    /// The actor id.
    pub fn actor(&self) -> ActorId {
        self.actor
    }

    /// One change that puts `value` under `key` in the root map.
    ///
    /// # Errors
    /// Automerge failures (reported as storage errors; test code only).
    pub fn put(&mut self, key: &str, value: &str) -> Result<OwnedChange> {
        self.doc
            .put(ROOT, key, value)
            .map_err(|e| Error::Storage(format!("automerge: {e}")))?;
        let change = self
            .doc
            .get_last_local_change()
            .ok_or_else(|| Error::Storage("automerge made no change".into()))?;
        Ok(OwnedChange {
            bytes: change.raw_bytes().to_vec(),
            hash: change.hash().0,
            actor: self.actor,
            seq: change.seq(),
        })
    }
}

/// The encodings of `marker` that a plaintext leak would show: raw UTF-8,
/// UTF-16LE, and the stable middle of its base64 at each of the three
/// alignments (DESIGN §9 invariant 5).
pub fn plaintext_needles(marker: &str) -> Vec<Vec<u8>> {
    let raw = marker.as_bytes().to_vec();
    let utf16: Vec<u8> = marker.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let mut out = vec![raw.clone(), utf16];
    for pad in 0..3 {
        let mut shifted = vec![b'x'; pad];
        shifted.extend_from_slice(&raw);
        let enc = base64_unpadded(&shifted);
        // Skip the characters that mix in padding bytes, and the last partial group.
        let start = (pad * 8).div_ceil(6);
        let end = enc.len().saturating_sub(4);
        if start < end {
            out.push(enc[start..end].to_vec());
        }
    }
    out
}

/// Unpadded standard base64, for the plaintext scans (tests check that the
/// scan itself finds an encoded marker). Not used for anything else.
pub fn base64_unpadded(data: &[u8]) -> Vec<u8> {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(B64[((n >> (18 - 6 * i)) & 63) as usize]);
        }
    }
    out
}

/// Every file under `dir` (recursively) that contains one of `needles`:
/// the number of files read and one line per hit.
///
/// # Errors
/// I/O errors reading the tree.
pub fn scan_for_plaintext(dir: &std::path::Path, needles: &[Vec<u8>]) -> std::io::Result<(usize, Vec<String>)> {
    let mut files = 0;
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            files += 1;
            let data = std::fs::read(&path)?;
            for n in needles {
                if data.windows(n.len()).any(|w| w == n.as_slice()) {
                    hits.push(format!("{} contains {:?}", path.display(), String::from_utf8_lossy(n)));
                }
            }
        }
    }
    Ok((files, hits))
}

/// A [`SledStore`](crate::store::SledStore) whose flush can be slowed down
/// (to model a slower disk in benchmarks) or made to fail (to test what a
/// failed durable flush does to the writers waiting on it).
pub struct FlushControl {
    inner: crate::store::SledStore,
    delay: std::time::Duration,
    fail: std::sync::atomic::AtomicBool,
}

impl FlushControl {
    /// Wraps `inner`; every flush also waits `delay` after sled's own fsync.
    pub fn new(inner: crate::store::SledStore, delay: std::time::Duration) -> Self {
        Self {
            inner,
            delay,
            fail: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// From now on every flush fails (`true`) or works again (`false`).
    pub fn fail_flushes(&self, fail: bool) {
        self.fail.store(fail, std::sync::atomic::Ordering::SeqCst);
    }
}

impl crate::store::Store for FlushControl {
    fn instance_id(&self) -> crate::store::InstanceId {
        self.inner.instance_id()
    }
    fn commit(&self, batch: &crate::store::Batch) -> Result<crate::store::Committed> {
        self.inner.commit(batch)
    }
    fn commit_group(&self, batches: &[&crate::store::Batch]) -> Result<Vec<crate::store::Committed>> {
        self.inner.commit_group(batches)
    }
    fn flush(&self) -> Result<()> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::Storage("injected flush failure".into()));
        }
        self.inner.flush()?;
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        Ok(())
    }
    fn last_seq(&self) -> crate::store::Seq {
        self.inner.last_seq()
    }
    fn contains(&self, id: &crate::store::ItemId) -> Result<bool> {
        self.inner.contains(id)
    }
    fn item(&self, id: &crate::store::ItemId) -> Result<Option<crate::store::StoredItem>> {
        self.inner.item(id)
    }
    fn items_after(&self, after: crate::store::Seq, limit: usize) -> Result<Vec<crate::store::StoredItem>> {
        self.inner.items_after(after, limit)
    }
    fn consent_items(&self) -> Result<Vec<crate::store::StoredItem>> {
        self.inner.consent_items()
    }
    fn envelopes(&self, p: &PatientId, c: Option<Collection>) -> Result<Vec<crate::store::EnvelopeEntry>> {
        self.inner.envelopes(p, c)
    }
    fn patients(&self) -> Result<Vec<PatientId>> {
        self.inner.patients()
    }
    fn pending(&self, reason: Option<crate::store::PendingReason>) -> Result<Vec<crate::store::PendingItem>> {
        self.inner.pending(reason)
    }
    fn seq_gaps_of(&self, patient: &PatientId, author: &[u8; 16]) -> Result<usize> {
        self.inner.seq_gaps_of(patient, author)
    }
    fn rejected(&self, key: &[u8; 32]) -> Result<Option<crate::store::Rejection>> {
        self.inner.rejected(key)
    }
    fn rejected_count(&self) -> Result<u64> {
        self.inner.rejected_count()
    }
    fn cursor(&self, peer: &[u8]) -> Result<Option<crate::store::Cursor>> {
        self.inner.cursor(peer)
    }
    fn audit_raw(&self, from: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        self.inner.audit_raw(from)
    }
    fn raw_item_bytes(&self, id: &crate::store::ItemId) -> Result<Option<Vec<u8>>> {
        self.inner.raw_item_bytes(id)
    }
    fn raw_replace_item_bytes(&self, id: &crate::store::ItemId, bytes: &[u8]) -> Result<()> {
        self.inner.raw_replace_item_bytes(id, bytes)
    }
    fn raw_replace_audit(&self, seq: u64, bytes: &[u8]) -> Result<()> {
        self.inner.raw_replace_audit(seq, bytes)
    }
    fn audit_head(&self) -> (u64, [u8; 32]) {
        self.inner.audit_head()
    }
    fn audit_entry(&self, seq: u64) -> Result<Option<Vec<u8>>> {
        self.inner.audit_entry(seq)
    }
    fn audit_checkpoint(&self) -> Result<Option<Vec<u8>>> {
        self.inner.audit_checkpoint()
    }
    fn put_audit_checkpoint(&self, signed: &[u8]) -> Result<()> {
        self.inner.put_audit_checkpoint(signed)
    }
    fn raw_truncate_audit(&self, from: u64) -> Result<()> {
        self.inner.raw_truncate_audit(from)
    }
    fn snapshot(&self, patient: &PatientId, collection: Collection) -> Result<Option<Vec<u8>>> {
        self.inner.snapshot(patient, collection)
    }
    fn snapshot_head(&self, patient: &PatientId, collection: Collection, len: usize) -> Result<Option<(Vec<u8>, u64)>> {
        self.inner.snapshot_head(patient, collection, len)
    }
    fn put_snapshot(&self, patient: &PatientId, collection: Collection, sealed: &[u8]) -> Result<()> {
        self.inner.put_snapshot(patient, collection, sealed)
    }
    fn resource_location(&self, blind: &[u8; 32]) -> Result<Option<(PatientId, Collection)>> {
        self.inner.resource_location(blind)
    }
    fn put_resource_locations(&self, entries: &[([u8; 32], PatientId, Collection)]) -> Result<()> {
        self.inner.put_resource_locations(entries)
    }
    fn remove_snapshot(&self, patient: &PatientId, collection: Collection) -> Result<()> {
        self.inner.remove_snapshot(patient, collection)
    }
    fn outbox(&self) -> Result<Vec<crate::store::OutboxEntry>> {
        self.inner.outbox()
    }
    fn put_outbox(&self, entries: &[crate::store::OutboxEntry]) -> Result<()> {
        self.inner.put_outbox(entries)
    }
    fn remove_outbox(&self, keys: &[(Vec<u8>, crate::store::ItemId)]) -> Result<()> {
        self.inner.remove_outbox(keys)
    }
    fn pending_of(&self, patient: &PatientId) -> Result<Vec<crate::store::PendingItem>> {
        self.inner.pending_of(patient)
    }
    fn sync_checks(&self, patient: &PatientId) -> Result<Vec<crate::store::SyncCheck>> {
        self.inner.sync_checks(patient)
    }
    fn put_sync_check(&self, check: &crate::store::SyncCheck) -> Result<()> {
        self.inner.put_sync_check(check)
    }
    fn address_records(&self) -> Result<Vec<crate::store::KeptAddressRecord>> {
        self.inner.address_records()
    }
    fn address_record(&self, peer: &[u8]) -> Result<Option<crate::store::KeptAddressRecord>> {
        self.inner.address_record(peer)
    }
    fn address_record_count(&self) -> Result<usize> {
        self.inner.address_record_count()
    }
    fn put_address_record(&self, peer: &[u8], seq: u64, signed: &[u8]) -> Result<()> {
        self.inner.put_address_record(peer, seq, signed)
    }
}
