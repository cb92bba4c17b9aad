//! Snapshot transfers (DESIGN §6): instead of the envelopes a collection's
//! local snapshot covers, a node ships that snapshot's Automerge document,
//! sealed under the current epoch key, and each covered envelope's
//! [`CompactHeader`]. The receiver rebuilds every envelope byte for byte —
//! the change comes from the document, both hashes from the change and the
//! epoch key, the nonce from the header — and the author's signature proves
//! it got the very envelope the author sealed. What it rebuilt then goes
//! through the ordinary ingest path, so a snapshot transfer can never make a
//! node accept anything a plain envelope transfer would not.
//!
//! Why: a collection's document is far smaller than its envelopes (Automerge
//! compresses a history column-wise; envelopes are one sealed change each),
//! so a first sync of a long history moves a fraction of the bytes.
//!
//! The document discloses every change it holds at once, so it may hold only
//! changes whose envelopes the node would send now (held readable: none a
//! revocation's cut excluded since the snapshot was saved), and it opens only
//! for a holder of the key of **every** epoch its changes were sealed under:
//! it is sealed once per such epoch key, the oldest innermost. One key would
//! not do: a practice the patient left out of an epoch's key shares (a
//! revocation of one of its grants) may receive a later epoch's key again (a
//! remaining reader at the next revocation), and a document sealed under that
//! later key alone would show it the epoch it was left out of.

use std::collections::{BTreeSet, HashMap, HashSet};

use medmesh_crypto::{
    Change, Collection, CompactHeader, Envelope, EnvelopeId, KeyId, KeyRef, PatientId, SNAPSHOT_TAG, SealedSnapshot,
};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use crate::Node;
use crate::records::{RecordDoc, SavedDoc};
use crate::snapshot::Covered;
use crate::store::EnvelopeState;

/// Tag, key id and nonce of a sealed snapshot (`medmesh_crypto::SealedSnapshot`).
const SEALED_HEAD_LEN: usize = medmesh_crypto::SNAPSHOT_TAG.len() + 16 + 24;

/// What a node sends instead of the envelopes its local snapshot covers.
pub struct SnapshotTransfer {
    /// Whose record.
    pub patient: PatientId,
    /// Which collection.
    pub collection: Collection,
    /// The collection's Automerge document (`save()`), sealed with
    /// [`SealedSnapshot`] under the key of every epoch its changes belong
    /// to, one layer per key, the oldest epoch innermost.
    pub sealed_doc: Vec<u8>,
    /// Every envelope whose change the document holds, with its compact header.
    pub covered: Vec<(EnvelopeId, CompactHeader)>,
    /// The lowest local sequence number among them.
    pub first_seq: u64,
    /// SHA-256 of the sealed local snapshot it was made from, so a cache
    /// knows when to make a new one.
    pub source: [u8; 32],
}

impl std::fmt::Debug for SnapshotTransfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotTransfer")
            .field("collection", &self.collection)
            .field("doc_bytes", &self.sealed_doc.len())
            .field("covered", &self.covered.len())
            .finish_non_exhaustive()
    }
}

/// An envelope [`Node::restore_transfer`] rebuilt: byte for byte its
/// author's, its signature verified, its change matched to the signed keyed
/// change hash, actor and sequence number. Only restoring makes one, so
/// [`Node::ingest_restored`] need not check those again.
#[derive(Debug, Clone)]
pub struct RestoredEnvelope(Envelope);

impl RestoredEnvelope {
    /// The envelope.
    pub fn envelope(&self) -> &Envelope {
        &self.0
    }

    /// The envelope, by value.
    pub fn into_envelope(self) -> Envelope {
        self.0
    }
}

/// What [`Node::restore_transfer`] rebuilt.
#[derive(Debug, Default)]
pub struct Restored {
    /// The envelopes, exactly as their authors sealed them.
    pub envelopes: Vec<RestoredEnvelope>,
    /// Headers it could not restore (no key for their epoch, their change is
    /// not in the document, or the change is not the one signed for): the
    /// caller fetches those envelopes the ordinary way.
    pub unrestored: usize,
    /// Each restored envelope's id with the Automerge hash of its change,
    /// for [`OpenedTransfer::keep_as_snapshot`].
    pub covered: Vec<Covered>,
}

impl Node {
    /// The fingerprint of the local snapshot of (patient, collection), if
    /// one is kept: a transfer made from it stays valid while this is equal.
    ///
    /// # Errors
    /// Store failures.
    pub fn snapshot_fingerprint(&self, patient: PatientId, collection: Collection) -> crate::Result<Option<[u8; 32]>> {
        // Every seal draws a fresh random nonce, which sits in the sealed
        // snapshot's first bytes: hashing those (and the length) tells
        // snapshots apart without hashing megabytes on every pull.
        Ok(self
            .raw_store()
            .snapshot_head(&patient, collection, SEALED_HEAD_LEN)?
            .map(|(head, len)| {
                let mut h = Sha256::new();
                h.update(head);
                h.update(len.to_be_bytes());
                h.finalize().into()
            }))
    }

    /// A snapshot transfer of (patient, collection) made from its local
    /// snapshot, if one is kept and usable: every envelope it covers is
    /// held readable (a snapshot that covers one no longer readable — a
    /// revocation's cut excluded it after the snapshot was saved — is
    /// dropped, and no transfer made), and the document is sealed under
    /// the key of every epoch those envelopes were sealed under (module
    /// docs). Each covered envelope's header is read back (one that does
    /// not parse is left out; the puller then gets that envelope, if at
    /// all, as an envelope).
    ///
    /// # Errors
    /// [`crate::Error::Crypto`] when sealing fails; store failures.
    pub async fn snapshot_transfer(
        &self,
        patient: PatientId,
        collection: Collection,
    ) -> Result<Option<SnapshotTransfer>, crate::Error> {
        let Some(source) = self.snapshot_fingerprint(patient, collection)? else {
            return Ok(None);
        };
        let Some(snapshot) = self.load_snapshot(patient, collection)? else {
            return Ok(None);
        };
        let readable: HashMap<EnvelopeId, _> = self
            .envelopes(&patient, Some(collection))?
            .into_iter()
            .filter(|e| e.state == EnvelopeState::Readable)
            .map(|e| (e.id, (e.epoch, e.key_id)))
            .collect();
        let mut epochs = BTreeSet::new();
        for (id, _) in &snapshot.covered {
            let Some(epoch) = readable.get(id) else {
                tracing::info!(%collection, envelope = %id, "snapshot covers an envelope no longer readable; dropped, no transfer");
                self.drop_snapshot(patient, collection)?;
                return Ok(None);
            };
            epochs.insert(*epoch);
        }
        let Some(doc) = RecordDoc::document_of_local(&snapshot.doc) else {
            tracing::warn!(%collection, "local snapshot holds no document; no transfer");
            return Ok(None);
        };
        let mut sealed_doc: Option<Vec<u8>> = None;
        for (epoch, key_id) in epochs {
            let key_ref = KeyRef {
                patient,
                collection,
                epoch,
                key_id,
            };
            let Some(key) = self.epoch_key(&key_ref) else {
                return Ok(None);
            };
            sealed_doc = Some(SealedSnapshot::seal(&key, sealed_doc.as_deref().unwrap_or(doc))?);
        }
        let Some(sealed_doc) = sealed_doc else {
            return Ok(None);
        };
        let mut covered = Vec::with_capacity(snapshot.covered.len());
        let mut first_seq = u64::MAX;
        let store = self.raw_store();
        for (id, _) in &snapshot.covered {
            // Not re-verified here (verified when stored; the receiver
            // verifies every restored envelope): one that rotted at rest
            // fails to restore there and is fetched as an envelope, which
            // quarantines it here.
            match store.item(&(*id).into())? {
                Some(item) => match CompactHeader::of_stored_envelope(&item.item.bytes) {
                    Ok(compact) => {
                        first_seq = first_seq.min(item.seq);
                        covered.push((*id, compact));
                    }
                    Err(e) => tracing::warn!(envelope = %id, cause = %e, "covered envelope does not parse"),
                },
                None => tracing::debug!(envelope = %id, "covered envelope not held"),
            }
        }
        // In change order (each actor's changes by ascending seq): a
        // receiver restores and ingests a long history in parts, and a part
        // whose changes lack their predecessors would wait on seq gaps.
        covered.sort_unstable_by_key(|(id, h)| (h.header().seq, h.header().actor, *id));
        Ok(Some(SnapshotTransfer {
            patient,
            collection,
            sealed_doc,
            covered,
            first_seq,
            source,
        }))
    }

    /// Rebuilds the envelopes of a snapshot transfer from its sealed
    /// document and compact headers (see the module docs): [`Node::open_transfer`]
    /// then [`OpenedTransfer::restore`]. Nothing is stored: hand
    /// [`Restored::envelopes`] to [`Node::ingest_restored`].
    ///
    /// # Errors
    /// As [`Node::open_transfer`]. Headers that do not restore are counted,
    /// not errors.
    pub fn restore_transfer(
        &self,
        patient: PatientId,
        collection: Collection,
        sealed_doc: &[u8],
        headers: &[CompactHeader],
    ) -> Result<Restored, crate::Error> {
        Ok(self
            .open_transfer(patient, collection, sealed_doc)?
            .restore(self, headers))
    }

    /// Opens and loads a transfer's document of (patient, collection), ready
    /// to restore headers against it (in parts, so restoring can run beside
    /// ingesting): peels one sealing layer per epoch key (module docs), each
    /// a key of that patient's collection, until the document.
    ///
    /// # Errors
    /// [`crate::Error::NoSnapshotKey`] (a layer's key is not held),
    /// [`crate::Error::Crypto`] (a layer does not open under its key, or
    /// names a key twice), record-model errors (it does not load).
    pub fn open_transfer(
        &self,
        patient: PatientId,
        collection: Collection,
        sealed_doc: &[u8],
    ) -> Result<OpenedTransfer, crate::Error> {
        let mut keys = HashSet::new();
        let mut doc = self.open_layer(patient, collection, sealed_doc, &mut keys)?;
        // An Automerge document starts with its own magic bytes, never
        // with the sealing tag.
        while doc.starts_with(SNAPSHOT_TAG) {
            let inner = self.open_layer(patient, collection, &doc, &mut keys)?;
            doc = inner;
        }
        let saved = SavedDoc::load(&doc)?;
        let by_actor_seq = saved
            .changes()
            .iter()
            .enumerate()
            .map(|(i, c)| ((c.actor().to_bytes().to_vec(), c.seq()), i))
            .collect();
        Ok(OpenedTransfer {
            patient,
            collection,
            saved,
            by_actor_seq,
        })
    }

    /// Opens one sealing layer of a transfer's document. Every layer needs
    /// another key of this node's, which bounds how many a sender can make
    /// it peel.
    fn open_layer(
        &self,
        patient: PatientId,
        collection: Collection,
        sealed: &[u8],
        keys: &mut HashSet<KeyId>,
    ) -> Result<Zeroizing<Vec<u8>>, crate::Error> {
        let key_id = SealedSnapshot::key_id(sealed)?;
        if !keys.insert(key_id) {
            return Err(crate::Error::Crypto(medmesh_crypto::Error::Malformed {
                kind: "snapshot",
                reason: "a document sealed twice under one key",
            }));
        }
        let key = self
            .epoch_key_of(&patient, collection, &key_id)
            .ok_or(crate::Error::NoSnapshotKey(key_id))?;
        Ok(SealedSnapshot::open(&key, sealed)?)
    }
}

/// A transfer's document, loaded: its changes by (actor, seq). Plaintext,
/// in memory only.
pub struct OpenedTransfer {
    patient: PatientId,
    collection: Collection,
    saved: SavedDoc,
    by_actor_seq: HashMap<(Vec<u8>, u64), usize>,
}

impl std::fmt::Debug for OpenedTransfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedTransfer")
            .field("changes", &self.saved.changes().len())
            .finish_non_exhaustive()
    }
}

impl OpenedTransfer {
    /// Rebuilds the envelopes of `headers` (any part of the transfer's) with
    /// `node`'s epoch keys, spread over the cores: per header, compress the
    /// change as Automerge does, re-seal it, hash, verify the signature.
    pub fn restore(&self, node: &Node, headers: &[CompactHeader]) -> Restored {
        let threads = std::thread::available_parallelism().map_or(1, usize::from).min(8);
        let chunk = headers.len().div_ceil(threads).max(1);
        let parts: Vec<Restored> = std::thread::scope(|scope| {
            let workers: Vec<_> = headers
                .chunks(chunk)
                .map(|part| (part.len(), scope.spawn(|| self.restore_part(node, part))))
                .collect();
            // A worker that panicked restored nothing of its part.
            workers
                .into_iter()
                .map(|(len, w)| {
                    w.join().unwrap_or_else(|_| Restored {
                        unrestored: len,
                        ..Restored::default()
                    })
                })
                .collect()
        });
        let mut restored = Restored::default();
        for part in parts {
            restored.envelopes.extend(part.envelopes);
            restored.unrestored += part.unrestored;
            restored.covered.extend(part.covered);
        }
        restored
    }

    fn restore_part(&self, node: &Node, headers: &[CompactHeader]) -> Restored {
        let mut keys = HashMap::new();
        let mut restored = Restored::default();
        for compact in headers {
            let h = compact.header();
            // Only this document's own envelopes, under its own keys.
            if h.patient != self.patient || h.collection != self.collection {
                restored.unrestored += 1;
                continue;
            }
            let Some(change) = self
                .by_actor_seq
                .get(&(h.actor.0.to_vec(), h.seq))
                .and_then(|i| self.saved.changes().get(*i))
            else {
                restored.unrestored += 1;
                continue;
            };
            let key_ref = h.key_ref();
            let key = keys.entry(key_ref).or_insert_with(|| node.epoch_key(&key_ref)).as_ref();
            let Some(key) = key else {
                restored.unrestored += 1;
                continue;
            };
            let hash = change.hash().0;
            let restore = |bytes: &[u8]| {
                compact.restore(
                    key,
                    Change {
                        bytes,
                        hash,
                        actor: h.actor,
                        seq: h.seq,
                    },
                )
            };
            // The node seals Automerge's compressed chunk; an author that
            // sealed the raw chunk is restored from that.
            match restore(&change.compressed_bytes()).or_else(|_| restore(change.raw_bytes())) {
                Ok(envelope) => {
                    restored.covered.push((envelope.id(), hash));
                    restored.envelopes.push(RestoredEnvelope(envelope));
                }
                Err(e) => {
                    tracing::debug!(cause = %e, "compact header does not restore");
                    restored.unrestored += 1;
                }
            }
        }
        restored
    }
}

impl OpenedTransfer {
    /// Keeps the transfer's document as `node`'s sealed local snapshot of
    /// (patient, collection), so that the first read after a first sync
    /// loads it instead of replaying every change — only when the node
    /// keeps none yet, every change in the document is one whose envelope
    /// was restored (`covered`, from [`OpenedTransfer::restore`]) and is now
    /// held readable (its signature verified, accepted by the validity
    /// rules), and the record model accepts every change (the checks of
    /// [`RecordDoc::load`]). A document holding anything else is never
    /// kept. Returns whether it was kept.
    ///
    /// # Errors
    /// Store and sealing failures.
    pub fn keep_as_snapshot(
        self,
        node: &Node,
        patient: PatientId,
        collection: Collection,
        covered: &[Covered],
    ) -> Result<bool, crate::Error> {
        if node.snapshot_fingerprint(patient, collection)?.is_some() {
            return Ok(false);
        }
        let readable: HashSet<EnvelopeId> = node
            .envelopes(&patient, Some(collection))?
            .into_iter()
            .filter(|e| e.state == EnvelopeState::Readable)
            .map(|e| e.id)
            .collect();
        // One envelope per change (an author may have sealed a change
        // twice; the snapshot names one, the other is replayed on load).
        let mut by_change: HashMap<[u8; 32], EnvelopeId> = HashMap::with_capacity(covered.len());
        for (id, hash) in covered {
            if readable.contains(id) {
                by_change.entry(*hash).or_insert(*id);
            }
        }
        let in_doc: HashSet<[u8; 32]> = self.saved.changes().iter().map(|c| c.hash().0).collect();
        if in_doc.len() != by_change.len() || !in_doc.iter().all(|h| by_change.contains_key(h)) {
            tracing::debug!(%collection, "transfer document holds changes not restored and accepted; not kept");
            return Ok(false);
        }
        let doc = match self.saved.into_record_doc() {
            Ok(doc) => doc,
            Err(e) => {
                tracing::debug!(%collection, cause = %e, "transfer document refused by the record model; not kept");
                return Ok(false);
            }
        };
        let covered: Vec<Covered> = by_change.into_iter().map(|(hash, id)| (id, hash)).collect();
        let local = zeroize::Zeroizing::new(doc.save_local());
        node.save_snapshot(patient, collection, &covered, &local)
    }
}
