//! Opening a [`SledStore`]: its trees, its instance id, and the migrations of
//! older on-disk layouts (resumable: a cut-off move continues at the next open).

use std::path::Path;
use std::sync::Mutex;

use sled::Transactional as _;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::codec;
use super::{
    Heads, INSTANCE_KEY, InstanceId, LAYOUT_KEY, LAYOUT_VERSION, MIGRATION_CHUNK, SLED_CACHE_BYTES, SledStore, storage,
};
use crate::{Error, Result, audit};

impl SledStore {
    /// Rewrites pending entries of layout 1, whose key named a grant by id
    /// alone, with the patient of the envelope that waits (layout 2). An
    /// entry whose envelope does not parse is dropped: reconciliation
    /// fetches it again.
    pub(super) fn migrate_pending_v1(&self) -> Result<()> {
        let mut batch = sled::Batch::default();
        let mut moved = 0usize;
        for entry in self.pending.iter() {
            let (k, v) = entry.map_err(storage)?;
            if k.len() != codec::PENDING_KEY_LEN_V1 {
                continue;
            }
            batch.remove(k.as_ref());
            match codec::pending_key_from_v1(&k, &v) {
                Some(key) => batch.insert(key, v),
                None => tracing::warn!(key = %hex::encode(&k), "pending entry of layout 1 does not parse; dropped"),
            }
            moved += 1;
        }
        if moved > 0 {
            self.pending.apply_batch(batch).map_err(storage)?;
            self.db.flush().map_err(storage)?;
            tracing::info!(entries = moved, "pending queue moved to store layout 2");
        }
        Ok(())
    }

    /// Renumbers the item kinds written by layouts 1 and 2 (layout 3). Each
    /// chunk of entries is rewritten in one transaction with the key it got
    /// to, so a crash mid-way resumes where it stopped and never renumbers
    /// an entry twice.
    pub(super) fn migrate_kinds_v2(&self, meta: &sled::Tree) -> Result<()> {
        let trees = [
            ("items", &self.items),
            ("seqlog", &self.seqlog),
            ("consent", &self.consent),
            ("pending", &self.pending),
        ];
        let mut moved = 0usize;
        for (name, tree) in trees {
            let progress_key = format!("layout-3-progress/{name}");
            loop {
                let entries = match meta.get(&progress_key).map_err(storage)? {
                    Some(after) => {
                        tree.range::<&[u8], _>((std::ops::Bound::Excluded(after.as_ref()), std::ops::Bound::Unbounded))
                    }
                    None => tree.iter(),
                };
                let mut chunk = Vec::with_capacity(MIGRATION_CHUNK);
                for entry in entries.take(MIGRATION_CHUNK) {
                    let (k, v) = entry.map_err(storage)?;
                    chunk.push((k, codec::kind_renumbered_from_v2(name, &v)));
                }
                let Some((last, _)) = chunk.last() else {
                    break;
                };
                let last = last.clone();
                (tree, meta)
                    .transaction(|(t, m)| {
                        for (k, v) in &chunk {
                            if let Some(v) = v {
                                t.insert(k, v.as_slice())?;
                            }
                        }
                        m.insert(progress_key.as_bytes(), &last)?;
                        Ok::<_, ConflictableTransactionError<Error>>(())
                    })
                    .map_err(|e| match e {
                        TransactionError::Abort(e) => e,
                        TransactionError::Storage(e) => storage(e),
                    })?;
                moved += chunk.len();
            }
        }
        meta.insert(LAYOUT_KEY, LAYOUT_VERSION).map_err(storage)?;
        for name in ["items", "seqlog", "consent", "pending"] {
            meta.remove(format!("layout-3-progress/{name}")).map_err(storage)?;
        }
        self.db.flush().map_err(storage)?;
        tracing::info!(entries = moved, "item kinds renumbered for store layout 3");
        Ok(())
    }

    /// Opens (or creates) the store in directory `path`.
    ///
    /// # Errors
    /// [`Error::Storage`] when sled cannot open the directory (another
    /// process holds it, I/O errors); [`Error::Corrupt`] for a damaged
    /// instance id.
    pub fn open(path: &Path) -> Result<Self> {
        // sled's page cache defaults to 1 GiB; decrypted documents are cached above it.
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(SLED_CACHE_BYTES)
            .open()
            .map_err(storage)?;
        let tree = |name: &str| db.open_tree(name).map_err(storage);
        let meta = tree("meta")?;
        let instance = match meta.get(INSTANCE_KEY).map_err(storage)? {
            Some(v) => InstanceId(v.as_ref().try_into().map_err(|_| Error::Corrupt {
                what: "instance id",
                key: "meta/instance-id".into(),
            })?),
            None => {
                let mut id = [0u8; 16];
                getrandom::fill(&mut id).map_err(|_| Error::Crypto(medmesh_crypto::Error::Random))?;
                meta.insert(LAYOUT_KEY, LAYOUT_VERSION).map_err(storage)?;
                meta.insert(INSTANCE_KEY, &id[..]).map_err(storage)?;
                db.flush().map_err(storage)?;
                InstanceId(id)
            }
        };
        let store = Self {
            items: tree("items")?,
            seqlog: tree("seqlog")?,
            consent: tree("consent")?,
            envelopes: tree("envelopes")?,
            pending: tree("pending")?,
            rejected: tree("rejected")?,
            cursors: tree("cursors")?,
            audit: tree("audit")?,
            audit_checkpoint: tree("audit-checkpoint")?,
            snapshots: tree("snapshots")?,
            resources: tree("resources")?,
            outbox: tree("outbox")?,
            sync_checks: tree("sync-checks")?,
            address_records: tree("address-records")?,
            db,
            instance,
            heads: Mutex::new(Heads {
                next_seq: 1,
                next_audit: 1,
                audit_head: [0; 32],
            }),
        };
        // A store from before layout 2 kept no layout key.
        let layout = meta.get(LAYOUT_KEY).map_err(storage)?;
        if layout.as_deref() != Some(LAYOUT_VERSION) {
            store.migrate_pending_v1()?;
            store.migrate_kinds_v2(&meta)?;
        }
        let next_seq = match store.seqlog.last().map_err(storage)? {
            Some((k, _)) => codec::seq_from_key(&k)? + 1,
            None => 1,
        };
        let (next_audit, audit_head) = match store.audit.last().map_err(storage)? {
            Some((k, v)) => {
                let seq = codec::seq_from_key(&k)?;
                (seq + 1, audit::head_hash(seq, &v))
            }
            None => (1, [0; 32]),
        };
        if let Ok(mut heads) = store.heads.lock() {
            *heads = Heads {
                next_seq,
                next_audit,
                audit_head,
            };
        }
        Ok(store)
    }
}
