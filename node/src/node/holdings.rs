//! What the node holds per patient: holdings, completeness, the addresses of the practices holding the records it is granted.

use super::*;

impl Node {
    /// What the node holds for `patient`.
    ///
    /// # Errors
    /// Store failures.
    pub fn holdings(&self, patient: &PatientId) -> Result<Holdings> {
        let mut h = Holdings {
            patient: patient.to_string(),
            envelopes: 0,
            readable: 0,
            opaque: 0,
            by_collection: BTreeMap::new(),
            completeness: self
                .completeness(patient)?
                .into_iter()
                .map(|c| (c.collection.as_str().to_owned(), c))
                .collect(),
        };
        for e in self.store().envelopes(patient, None)? {
            h.envelopes += 1;
            match e.state {
                EnvelopeState::Readable => h.readable += 1,
                EnvelopeState::Opaque => h.opaque += 1,
            }
            *h.by_collection.entry(e.collection.as_str().to_owned()).or_default() += 1;
        }
        Ok(h)
    }

    /// Whether this node holds each collection of `patient`'s record it is
    /// granted complete ([`crate::completeness`]), in [`Collection::ALL`]
    /// order; empty when no grant in force names this node.
    ///
    /// # Errors
    /// Store failures.
    pub fn completeness(&self, patient: &PatientId) -> Result<Vec<CollectionCompleteness>> {
        let t = now();
        let me = self.inner.me;
        let grants = self.registry().grants_of(patient);
        let revoked: Vec<bool> = {
            let registry = self.registry();
            grants.iter().map(|g| registry.is_revoked(patient, &g.id())).collect()
        };
        let mine: Vec<&Grant> = grants
            .iter()
            .zip(&revoked)
            .filter(|(g, revoked)| g.terms().grantee == me && g.in_force(t, **revoked))
            .map(|(g, _)| g)
            .collect();
        if mine.is_empty() {
            return Ok(Vec::new());
        }
        let store = self.store();
        let checks = store.sync_checks(patient)?;
        let mut pending: HashMap<Collection, u64> = HashMap::new();
        for item in store.pending_of(patient)? {
            let collection = match item.reason {
                PendingReason::SeqGap { collection, .. } => Some(collection),
                _ => medmesh_crypto::CompactHeader::of_stored_envelope(&item.bytes)
                    .ok()
                    .map(|h| h.header().collection),
            };
            if let Some(c) = collection {
                *pending.entry(c).or_default() += 1;
            }
        }
        let still_missing = |check: &SyncCheck| -> u64 {
            let remembered = check.missing_ids.len() as u64;
            let lacking = check
                .missing_ids
                .iter()
                .filter(|id| {
                    !store.contains(&ItemId::from(**id)).unwrap_or(false)
                        && !store.rejected(&id.0).is_ok_and(|r| r.is_some())
                })
                .count() as u64;
            // Ids beyond those remembered are taken as still lacking.
            lacking + check.missing.saturating_sub(remembered)
        };
        let peer_name =
            |bytes: &[u8]| PeerId::from_bytes(bytes).map_or_else(|_| "unknown".to_owned(), |p| p.to_string());
        let mut out = Vec::new();
        for collection in Collection::ALL {
            let Some(since) = mine
                .iter()
                .filter(|g| g.covers(collection))
                .map(|g| g.terms().issued_at)
                .min()
            else {
                continue;
            };
            let earlier_holders: Vec<Vec<u8>> = grants
                .iter()
                .zip(&revoked)
                .filter(|(g, revoked)| {
                    let terms = g.terms();
                    terms.grantee != me && g.covers(collection) && terms.issued_at < since && g.in_force(t, **revoked)
                })
                .map(|(g, _)| g.terms().grantee.peer_id().to_bytes())
                .chain(
                    // The nodes the patient handed this node's grants to hold
                    // the record: their addresses end in `/p2p/<PeerId>`. This
                    // node may know of them before it learns their own grants.
                    mine.iter()
                        .filter(|g| g.covers(collection))
                        .flat_map(|g| &g.terms().address_hints)
                        .filter_map(|hint| hint.rsplit_once("/p2p/")?.1.parse::<PeerId>().ok())
                        .filter(|peer| *peer != me.peer_id())
                        .map(|peer| peer.to_bytes()),
                )
                .collect();
            let of_collection: Vec<SyncCheck> = checks.iter().filter(|c| c.collection == collection).cloned().collect();
            out.push(CollectionCompleteness::judge(
                collection,
                &of_collection,
                still_missing,
                pending.get(&collection).copied().unwrap_or(0),
                &earlier_holders,
                peer_name,
            ));
        }
        Ok(out)
    }

    /// How many (patient, collection) records granted to this node are
    /// incomplete here (`/metrics`).
    ///
    /// # Errors
    /// Store failures.
    pub fn incomplete_records(&self) -> Result<u64> {
        let patients = self.registry().patients_granting(&self.inner.me, now());
        let mut n = 0;
        for patient in patients {
            n += self.completeness(&patient)?.iter().filter(|c| !c.complete).count() as u64;
        }
        Ok(n)
    }

    /// The address hints (multiaddr text) of the grants in force to this
    /// node, its own addresses left out, without repeats: where the
    /// practices holding the records it is granted were reached by the
    /// patient. Sync reconnects to them after a restart.
    pub fn holder_addresses(&self) -> Vec<String> {
        let me = self.inner.me;
        let mine = format!("/p2p/{}", me.peer_id());
        let t = now();
        let registry = self.registry();
        let mut out: Vec<String> = registry
            .patients_granting(&me, t)
            .iter()
            .flat_map(|patient| registry.grants_of(patient))
            .filter(|g| g.terms().grantee == me && g.in_force(t, registry.is_revoked(&g.terms().patient, &g.id())))
            .flat_map(|g| g.terms().address_hints.clone())
            .filter(|hint| !hint.ends_with(&mine))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Keeps `peer`'s signed address record (issue 16: a practice whose
    /// address changed is found again after this node restarts, and the
    /// patient's CLI learns where its practices are) when it is newer than
    /// the one kept and the peer is a practice some grant held here names
    /// (so a stranger cannot fill the table). The caller verified the
    /// signature and that it is `peer`'s; this node keeps the bytes as
    /// received, so whoever reads them can verify again. At most
    /// [`MAX_ADDRESS_RECORDS`] peers. Returns whether it was kept.
    ///
    /// # Errors
    /// Store failures.
    pub fn note_address_record(&self, peer: &PracticeId, seq: u64, signed: &[u8]) -> Result<bool> {
        if signed.len() > medmesh_crypto::MAX_ADDRESS_RECORD_BYTES || !self.registry().names_grantee(peer) {
            return Ok(false);
        }
        let key = peer.peer_id().to_bytes();
        match self.store().address_record(&key)? {
            // Seqs count seconds: a record signed in the same second as the
            // kept one (a node that announced before its listeners were up,
            // then again) replaces it if it differs.
            Some(old) if old.seq > seq || (old.seq == seq && old.signed == signed) => return Ok(false),
            None if self.store().address_record_count()? >= MAX_ADDRESS_RECORDS => return Ok(false),
            _ => {}
        }
        self.store().put_address_record(&key, seq, signed)?;
        Ok(true)
    }

    /// The signed address records kept ([`Node::note_address_record`]):
    /// (peer, signed bytes); only of `peers` when given.
    ///
    /// # Errors
    /// Store failures.
    pub fn address_records(&self, peers: Option<&[PracticeId]>) -> Result<Vec<(PracticeId, Vec<u8>)>> {
        let mut out = Vec::new();
        for record in self.store().address_records()? {
            let Ok(peer) = PeerId::from_bytes(&record.peer) else {
                continue;
            };
            let Ok(practice) = PracticeId::from_peer_id(&peer) else {
                continue;
            };
            if peers.is_none_or(|wanted| wanted.contains(&practice)) {
                out.push((practice, record.signed));
            }
        }
        Ok(out)
    }

    /// Records what a reconciliation with a peer found ([`SyncCheck`]).
    ///
    /// # Errors
    /// Store failures.
    pub fn note_sync_check(&self, check: &SyncCheck) -> Result<()> {
        self.store().put_sync_check(check)
    }
}
