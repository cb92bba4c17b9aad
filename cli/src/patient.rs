//! Patient commands: the keystore, and grant, revoke, read, export and
//! audit over libp2p, with the patient's own key as the libp2p identity.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use clap::{Args, Subcommand};
use medmesh_crypto::{
    Access, ActorId, Collection, Envelope, Error as CryptoError, Grant, GrantId, GrantRequest, KdfParams, Keystore,
    PracticeId, Principal, SecretIdentity, now,
};
use medmesh_node::records::{DecodedChange, RecordDoc, RenderedResource};
use medmesh_sync::memory::MemoryBackend;
use medmesh_sync::wire::OutboxReport;
use medmesh_sync::{AddressRecord, Item, ItemId, ItemKind, Multiaddr, PeerId, SyncHandle};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::delivery::Delivery;
use crate::home::Home;
use crate::output::Output;

#[derive(Debug, Subcommand)]
pub(crate) enum PatientCommand {
    /// Create the keystore and print the patient's did:key (refuses to overwrite).
    New,
    /// Print the patient's did:key.
    Id,
    /// Grant a practice access to collections of your record.
    Grant(GrantArgs),
    /// Revoke a grant: rotates the keys of the collections it covered.
    Revoke {
        /// A node that holds your record (multiaddr ending in /p2p/<PeerId>).
        #[arg(long, value_name = "MULTIADDR")]
        node: String,
        /// The grant id (as printed by `patient grant` or `patient grants`).
        grant_id: String,
    },
    /// Submit again a grant no node has taken yet (`patient grants` lists it
    /// as "not submitted"), with its key shares.
    Submit {
        /// The node to reach (multiaddr ending in /p2p/<PeerId>).
        #[arg(long, value_name = "MULTIADDR")]
        node: String,
        /// The grant id.
        grant_id: String,
    },
    /// The grants you issued, with their status (from your keystore).
    Grants {
        /// Also ask this node how delivery of each grant to its practice stands.
        #[arg(long, value_name = "MULTIADDR")]
        node: Option<String>,
    },
    /// The practices your grants name and where they last said they are
    /// (your address book of their signed address records).
    Practices {
        /// First refresh the address book from this node (it keeps the
        /// records the practices signed; each is checked by its signature).
        #[arg(long, value_name = "MULTIADDR")]
        node: Option<String>,
    },
    /// Fetch and decrypt your record from a node.
    Records {
        /// A node that holds your record.
        #[arg(long, value_name = "MULTIADDR")]
        node: String,
        /// Only resources of this FHIR type.
        #[arg(long = "type", value_name = "TYPE")]
        resource_type: Option<String>,
    },
    /// Export your whole record as a FHIR R4 collection Bundle.
    Export {
        /// A node that holds your record.
        #[arg(long, value_name = "MULTIADDR")]
        node: String,
        /// Where to write the Bundle.
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
    },
    /// Disclosures and accesses of your record at a node (accounting of disclosures).
    Audit {
        /// The node.
        #[arg(long, value_name = "MULTIADDR")]
        node: String,
    },
}

#[derive(Debug, Args)]
pub(crate) struct GrantArgs {
    /// The node to reach (multiaddr ending in /p2p/<PeerId>).
    #[arg(long, value_name = "MULTIADDR")]
    node: String,
    /// The practice granted: a PeerId, or its multiaddr ending in /p2p/<PeerId>.
    #[arg(long, value_name = "PEERID|MULTIADDR")]
    to: String,
    /// Collections: a comma list (core,medications,labs,documents,scheduling,billing,sensitive) or `all` (all but sensitive).
    #[arg(long, default_value = "all")]
    collections: String,
    /// Let the practice write to these collections.
    #[arg(long)]
    write: bool,
    /// How long the grant lasts (e.g. 30d, 12h).
    #[arg(long = "for", value_name = "DURATION", conflicts_with = "expires")]
    duration: Option<String>,
    /// When the grant ends (RFC 3339).
    #[arg(long, value_name = "RFC3339")]
    expires: Option<String>,
    /// Why: treatment, emergency, payment, operations, research, …
    #[arg(long, default_value = "treatment")]
    purpose: String,
}

pub(crate) fn run(cmd: PatientCommand, home: &Home, out: &Output) -> Result<()> {
    match cmd {
        PatientCommand::New => new(home, out),
        PatientCommand::Id => {
            let (keystore, _) = open_keystore(home)?;
            let did = keystore.patient().to_string();
            out.result(&json!({ "did": did }), &did);
            Ok(())
        }
        PatientCommand::Grant(args) => block_on(grant(home, args, out)),
        PatientCommand::Revoke { node, grant_id } => block_on(revoke(home, &node, &grant_id, out)),
        PatientCommand::Grants { node } => block_on(grants(home, node.as_deref(), out)),
        PatientCommand::Submit { node, grant_id } => block_on(submit(home, &node, &grant_id, out)),
        PatientCommand::Practices { node } => block_on(practices(home, node.as_deref(), out)),
        PatientCommand::Records { node, resource_type } => {
            block_on(records(home, &node, resource_type.as_deref(), out))
        }
        PatientCommand::Export { node, output } => block_on(export(home, &node, &output, out)),
        PatientCommand::Audit { node } => block_on(audit(home, &node, out)),
    }
}

fn block_on<F: std::future::Future<Output = Result<()>>>(f: F) -> Result<()> {
    tokio::runtime::Runtime::new()
        .context("starting the async runtime")?
        .block_on(f)
}

fn new(home: &Home, out: &Output) -> Result<()> {
    let path = home.keystore_path();
    if path.exists() {
        bail!(
            "a patient keystore already exists at {}; refusing to overwrite it (use another --home)",
            path.display()
        );
    }
    let passphrase = passphrase(true)?;
    crate::passphrase::check_strength(&passphrase, "keystore passphrase")?;
    Home::ensure_private_dir(&home.patient_dir())?;
    let keystore = Keystore::new(SecretIdentity::generate()?, KdfParams::DEFAULT);
    keystore
        .create(&path, passphrase.as_bytes())
        .with_context(|| format!("writing keystore at {}", path.display()))?;
    let did = keystore.patient().to_string();
    out.result(
        &json!({ "did": did }),
        &format!(
            "{did}\nkeystore: {} (keep your passphrase: it cannot be recovered)",
            path.display()
        ),
    );
    Ok(())
}

/// Opens the keystore with the passphrase from `MEDMESH_PASSPHRASE` or a
/// prompt; the passphrase comes back too, to save changes.
pub(crate) fn open_keystore(home: &Home) -> Result<(Keystore, Zeroizing<String>)> {
    let path = home.keystore_path();
    if !path.exists() {
        bail!(
            "no patient keystore at {}; create one with `medmesh patient new`",
            path.display()
        );
    }
    let passphrase = passphrase(false)?;
    match Keystore::open(&path, passphrase.as_bytes()) {
        Ok(keystore) => Ok((keystore, passphrase)),
        Err(CryptoError::KeystoreLocked) => {
            bail!(
                "wrong passphrase for the keystore at {} (or the file was altered)",
                path.display()
            )
        }
        Err(err) => Err(err).with_context(|| format!("reading keystore at {}", path.display())),
    }
}

fn save_keystore(home: &Home, keystore: &Keystore, passphrase: &str) -> Result<()> {
    let path = home.keystore_path();
    keystore
        .save(&path, passphrase.as_bytes())
        .with_context(|| format!("saving keystore at {}", path.display()))
}

fn passphrase(confirm: bool) -> Result<Zeroizing<String>> {
    if let Ok(value) = std::env::var("MEDMESH_PASSPHRASE") {
        if value.is_empty() {
            bail!("MEDMESH_PASSPHRASE is empty; a keystore needs a passphrase");
        }
        return Ok(Zeroizing::new(value));
    }
    let first = Zeroizing::new(
        rpassword::prompt_password("keystore passphrase: ")
            .context("reading the passphrase (set MEDMESH_PASSPHRASE when there is no terminal)")?,
    );
    if first.is_empty() {
        bail!("an empty passphrase is not allowed");
    }
    if confirm {
        let second =
            Zeroizing::new(rpassword::prompt_password("repeat passphrase: ").context("reading the passphrase")?);
        if *first != *second {
            bail!("the passphrases differ; nothing was written");
        }
    }
    Ok(first)
}

/// A multiaddr that names its peer (`…/p2p/12D3…`).
fn addressed(spec: &str, flag: &str) -> Result<(Multiaddr, PeerId)> {
    let addr: Multiaddr = spec
        .parse()
        .map_err(|_| anyhow!("{flag} {spec:?} is not a multiaddr (e.g. /ip4/127.0.0.1/tcp/4001/p2p/12D3KooW…)"))?;
    // The last /p2p/: a relay circuit (`…/p2p/RELAY/p2p-circuit/p2p/NODE`) names the node last.
    let peer = medmesh_sync::addressed_peer(&addr)
        .ok_or_else(|| anyhow!("{flag} {spec:?} must end in /p2p/<PeerId> (print it with `medmesh node id`)"))?;
    Ok((addr, peer))
}

/// The patient's side of a libp2p session with one node: a sync peer
/// whose identity is the patient key, with an in-memory store that never
/// touches disk.
struct Session {
    sync: SyncHandle,
    store: Arc<MemoryBackend>,
    node: PeerId,
    addr: Multiaddr,
}

/// How long a command waits for the node's first tries to deliver what it
/// submitted before it reports them as they stand.
const DELIVERY_WAIT: Duration = Duration::from_secs(10);
/// How often the node is asked meanwhile.
const DELIVERY_POLL: Duration = Duration::from_millis(100);

/// Per target, where delivery of what a command submitted stands; or why
/// the node could not say.
type Deliveries = std::result::Result<Vec<(PeerId, Delivery)>, String>;

/// Adds the delivery per target to a command's JSON (`delivery`, or
/// `delivery_error` when the node could not say) and returns its text.
fn delivery_output(value: &mut Value, deliveries: &Deliveries) -> String {
    match deliveries {
        Ok(per) => {
            value["delivery"] = Value::Array(per.iter().map(|(peer, d)| d.to_json(*peer)).collect());
            per.iter()
                .map(|(peer, d)| format!("\n  delivery to {peer}: {}", d.text()))
                .collect()
        }
        Err(why) => {
            value["delivery_error"] = json!(why);
            format!("\n  delivery: unknown: {why}")
        }
    }
}

/// The practices a submission to `node` about `first`'s grant concerns:
/// `first`, then the grantees of the patient's other live grants (the node
/// forwards a patient's grants and revocations to them) but `node` itself,
/// once each.
fn delivery_targets(keystore: &Keystore, node: &str, first: PracticeId, now_ms: u64) -> Result<Vec<PeerId>> {
    let (_, node) = addressed(node, "--node")?;
    let mut targets = vec![first.peer_id()];
    for grant in keystore.live_grants(now_ms) {
        let peer = grant.terms().grantee.peer_id();
        if peer != node && !targets.contains(&peer) {
            targets.push(peer);
        }
    }
    Ok(targets)
}

/// Why a node did not answer an outbox query, for people.
fn outbox_error(e: medmesh_sync::Error) -> String {
    match e {
        medmesh_sync::Error::Refused { reason, .. } => format!("the node refused to say ({reason})"),
        other => format!("the node could not say ({other}); a node older than this question cannot answer it"),
    }
}

fn item_ids(items: &[Item]) -> Vec<ItemId> {
    items.iter().map(|i| ItemId::digest(&i.bytes)).collect()
}

/// Tries a request to the node, re-dialling once if the connection dropped
/// under it (a node restarting, or a connection replaced by a newer one).
/// Pushes and pulls are idempotent: items are identified by their hash.
const ATTEMPTS: usize = 3;

impl Session {
    async fn open(keystore: &Keystore, node: &str) -> Result<Self> {
        let (addr, peer) = addressed(node, "--node")?;
        let identity = SecretIdentity::from_seed(&keystore.identity().seed());
        let store = Arc::new(MemoryBackend::new());
        let sync = SyncHandle::spawn(medmesh_sync::Config::client(), &identity, store.clone())
            .await
            .context("starting libp2p")?;
        tokio::time::timeout(Duration::from_secs(20), sync.dial(addr.clone()))
            .await
            .map_err(|_| anyhow!("timed out reaching {addr}; is the node running (`medmesh node run`)?"))?
            .with_context(|| format!("reaching {addr}; is the node running (`medmesh node run`)?"))?;
        Ok(Self {
            sync,
            store,
            node: peer,
            addr,
        })
    }

    async fn redial(&self, attempt: usize, cause: &medmesh_sync::Error) {
        tracing::info!(attempt, cause = %cause, "request to the node failed; reconnecting");
        let _ = tokio::time::timeout(Duration::from_secs(10), self.sync.dial(self.addr.clone())).await;
    }

    async fn push(&self, items: Vec<Item>, hints: Vec<Multiaddr>) -> Result<medmesh_sync::IngestReport> {
        let count = items.len() as u64;
        let mut attempt = 1;
        let report = loop {
            match self.sync.push(self.node, items.clone(), hints.clone()).await {
                Ok(report) => break report,
                Err(e) if attempt < ATTEMPTS => {
                    self.redial(attempt, &e).await;
                    attempt += 1;
                }
                Err(e) => return Err(e).context("submitting to the node"),
            }
        };
        if report.rejected > 0 {
            bail!(
                "the node rejected {} of {count} items (accepted {}, pending {})",
                report.rejected,
                report.accepted,
                report.pending
            );
        }
        // What the node took, waits on or held already: the rest it did
        // not keep (the reply over the wire carries no count of refused
        // items). A node keeps little of a patient it holds nothing of.
        let kept = report.accepted + report.duplicates + report.pending;
        if kept < count {
            bail!(
                "the node kept {kept} of {count} items: a node that holds none of your records and no \
                 grant from you keeps only a few of your items (flood limits); submit through one of \
                 your practices with --node"
            );
        }
        Ok(report)
    }

    /// Where delivery of `items` to each of `targets` stands at the node,
    /// asked until the node has followed what it stored and made its first
    /// try to the first target (the practice the command is about; the
    /// others, holders the node forwards to, are reported as they stand
    /// then: a patient with practices down would otherwise wait for each),
    /// or until [`DELIVERY_WAIT`] has passed. The node reached itself took
    /// what was pushed: delivered. A node that cannot answer (an older
    /// version) makes this an error text, not a failure.
    async fn deliveries(&self, patient: medmesh_crypto::PatientId, targets: &[PeerId], items: &[ItemId]) -> Deliveries {
        let per = |report: &OutboxReport| -> Vec<(PeerId, Delivery)> {
            targets
                .iter()
                .map(|t| {
                    let d = if *t == self.node {
                        Delivery::Delivered
                    } else {
                        Delivery::of(report, *t, Some(items))
                    };
                    (*t, d)
                })
                .collect()
        };
        let report = self
            .outbox_when(patient, |r| per(r).first().is_none_or(|(_, d)| d.settled()))
            .await?;
        Ok(per(&report))
    }

    /// The node's outbox report on `patient`, asked every
    /// [`DELIVERY_POLL`] until it is not settling and `done` says so, or
    /// until [`DELIVERY_WAIT`] has passed (then as it stands).
    async fn outbox_when(
        &self,
        patient: medmesh_crypto::PatientId,
        done: impl Fn(&OutboxReport) -> bool,
    ) -> std::result::Result<OutboxReport, String> {
        let deadline = tokio::time::Instant::now() + DELIVERY_WAIT;
        loop {
            let report = self.sync.outbox_of(self.node, patient).await.map_err(outbox_error)?;
            let now = tokio::time::Instant::now();
            if (!report.settling && done(&report)) || now >= deadline {
                return Ok(report);
            }
            tokio::time::sleep(DELIVERY_POLL.min(deadline - now)).await;
        }
    }

    /// Pulls every item of this patient the node holds.
    async fn pull(&self) -> Result<Vec<medmesh_sync::StoredItem>> {
        self.sync
            .sync_now(self.node)
            .await
            .context("fetching your record from the node")?;
        Ok(self.store.items())
    }

    async fn close(self) {
        let _ = self.sync.shutdown().await;
    }
}

/// `patient audit`: asks the node, as the patient, for the audit entries
/// about the patient (disclosures, reads, writes, consent items received)
/// and prints one line (or JSON object) per entry. The node answers only
/// the patient's own key, and records the query as a read. Then checks
/// what it received against checkpoints the node signs (see
/// [`crate::audit_anchor`]) and the one kept from the previous query of
/// that node: a log that lost entries or was rewritten is reported loudly
/// and the command fails; otherwise the new checkpoint is kept.
async fn audit(home: &Home, node: &str, out: &Output) -> Result<()> {
    let (mut keystore, passphrase) = open_keystore(home)?;
    end_expired_grants(home, &mut keystore, &passphrase, node, out).await?;
    let patient = keystore.patient();
    let session = Session::open(&keystore, node).await?;
    let node_peer = session.node;
    let node_practice = PracticeId::from_peer_id(&node_peer).context("the node's peer id names no ed25519 key")?;
    let kept = keystore.audit_checkpoint(&node_practice).cloned();
    let mut attempt = 1;
    let result = loop {
        match session.sync.audit(session.node, patient).await {
            Err(e @ (medmesh_sync::Error::Request { .. } | medmesh_sync::Error::ConnectionLost { .. }))
                if attempt < ATTEMPTS =>
            {
                session.redial(attempt, &e).await;
                attempt += 1;
            }
            other => break other,
        }
    };
    // After the entries, so that the signed head covers every one of them.
    let checkpoints = match &result {
        Ok(_) => session
            .sync
            .audit_checkpoints(node_peer, patient, kept.as_ref().map(|k| k.terms().seq))
            .await
            .map_err(|e| tracing::debug!(cause = %e, "the node signed no audit checkpoint"))
            .ok(),
        Err(_) => None,
    };
    session.close().await;
    let entries = match result {
        Ok(entries) => entries,
        Err(medmesh_sync::Error::Refused { reason, .. }) => {
            bail!("node {node_peer} refused to show your audit entries ({reason}); try again, or ask the practice")
        }
        Err(e) => return Err(e).context("fetching your audit entries from the node"),
    };
    let verdict = crate::audit_anchor::check(&patient, &entries, kept.as_ref(), checkpoints);
    let did = patient.to_string();
    let own_peer = PracticeId::from_bytes(*patient.as_bytes())
        .map(|p| p.peer_id().to_string())
        .unwrap_or_default();
    for e in &entries {
        let at = medmesh_node::records::format_instant(i64::try_from(e.time).unwrap_or(i64::MAX));
        let items: Vec<String> = e.items.iter().map(ToString::to_string).collect();
        let grant = e.grant.map(|g| g.to_string());
        let actor_kind = match e.actor_kind {
            medmesh_node::audit::ActorKind::LocalApp => "local-app",
            medmesh_node::audit::ActorKind::Peer => "peer",
            medmesh_node::audit::ActorKind::Patient => "patient",
            medmesh_node::audit::ActorKind::Node => "node",
        };
        let you = if e.actor_id == did || e.actor_id == own_peer {
            " (you)"
        } else {
            ""
        };
        out.result(
            &json!({
                "seq": e.seq,
                "time": e.time,
                "at": at,
                "actor_kind": actor_kind,
                "actor_id": e.actor_id,
                "action": e.action.as_str(),
                "patient": did,
                "item_count": e.item_count,
                "items": items,
                "grant": grant,
                "outcome": e.outcome,
                "prev_hash": hex::encode(e.prev_hash),
                "hash": hex::encode(e.hash),
            }),
            &format!(
                "#{:<6} {at}  {:<10} {actor_kind:<9} {}{you}  {} item{}  grant {}  {}",
                e.seq,
                e.action.as_str(),
                e.actor_id,
                e.item_count,
                if e.item_count == 1 { "" } else { "s" },
                grant.as_deref().unwrap_or("-"),
                e.outcome
            ),
        );
    }
    if !out.is_json() {
        println!("{} entries about you at node {node_peer}", entries.len());
    }
    out.result(&verdict.to_json(kept.as_ref()), &anchor_text(&verdict));
    if verdict.flagged() {
        bail!(
            "node {node_peer}'s audit log does not hold what it showed you before ({}): {}",
            verdict.status,
            verdict.problems.join("; ")
        );
    }
    if let Some(keep) = verdict.keep {
        keystore.remember_audit_checkpoint(keep);
        save_keystore(home, &keystore, &passphrase)?;
    }
    Ok(())
}

/// The human line for a verdict: loud when something is wrong.
fn anchor_text(verdict: &crate::audit_anchor::Verdict) -> String {
    match (verdict.flagged(), verdict.head) {
        (true, _) => format!(
            "WARNING: THIS NODE'S AUDIT LOG LOST OR CHANGED ENTRIES ({}):\n  {}",
            verdict.status.to_uppercase(),
            verdict.problems.join("\n  ")
        ),
        (false, Some((seq, _))) => format!(
            "checked: {} entries rehashed, the log runs to the node-signed checkpoint at entry {seq}, \
             kept to compare with your next query",
            verdict.verified
        ),
        (false, None) => format!(
            "note: this node signs no audit checkpoints (an older version); {} entries rehashed, \
             but a removal of entries would not show",
            verdict.verified
        ),
    }
}

fn parse_expiry(args: &GrantArgs, now_ms: u64) -> Result<Option<u64>> {
    if let Some(d) = &args.duration {
        let d = humantime::parse_duration(d).map_err(|e| anyhow!("--for {d:?}: {e} (e.g. 30d, 12h)"))?;
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        return Ok(Some(now_ms.saturating_add(ms)));
    }
    if let Some(t) = &args.expires {
        let when = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
            .map_err(|e| anyhow!("--expires {t:?}: {e} (e.g. 2027-01-31T00:00:00Z)"))?;
        let ms =
            u64::try_from(when.unix_timestamp_nanos() / 1_000_000).map_err(|_| anyhow!("--expires is before 1970"))?;
        if ms <= now_ms {
            bail!("--expires {t} is in the past");
        }
        return Ok(Some(ms));
    }
    Ok(None)
}

async fn grant(home: &Home, args: GrantArgs, out: &Output) -> Result<()> {
    let (mut keystore, passphrase) = open_keystore(home)?;
    let expired = end_expired_grants(home, &mut keystore, &passphrase, &args.node, out).await?;
    let (grantee_peer, grantee_addr) = if args.to.starts_with('/') {
        let (addr, peer) = addressed(&args.to, "--to")?;
        (peer, Some(addr))
    } else {
        let peer: PeerId = args
            .to
            .parse()
            .map_err(|_| anyhow!("--to {:?} is not a PeerId or multiaddr", args.to))?;
        // Where the practice last said it is, from the address book.
        let known = address_book(&keystore)
            .remove(&peer)
            .and_then(|r| r.addrs.into_iter().next())
            .map(|a| a.with(medmesh_sync::Protocol::P2p(peer)));
        (peer, known)
    };
    let grantee = PracticeId::from_peer_id(&grantee_peer).map_err(|e| anyhow!("--to: {e}"))?;
    let (_, node_peer) = addressed(&args.node, "--node")?;
    let collections = Collection::parse_list(&args.collections).map_err(|e| anyhow!("--collections: {e}"))?;
    let now_ms = now();
    let expires = parse_expiry(&args, now_ms)?;
    // A minute back, so a node whose clock is a little behind still sees it in force.
    let not_before = now_ms.saturating_sub(60_000);
    let granted = keystore
        .grant(
            GrantRequest {
                grantee,
                collections: collections.clone(),
                access: if args.write { Access::ReadWrite } else { Access::Read },
                not_before,
                expires,
                purpose: args.purpose.clone(),
                address_hints: vec![args.node.clone()],
            },
            now_ms,
        )
        .map_err(|e| anyhow!("signing the grant and its key shares: {e}"))?;
    let grant = granted.grant;
    let created: Vec<&str> = granted.created.iter().map(|c| c.as_str()).collect();
    let mut items = vec![Item::grant(&grant)];
    // The node reached may know nothing of the patient's other practices (their
    // grants were submitted elsewhere); a node forwards a patient's grants only to
    // practices whose grant it knows, so without these it would tell no one and
    // neither side would ever learn where the rest of the record is.
    items.extend(keystore.live_grants(now_ms).map(Item::grant));
    items.extend(granted.shares.iter().map(Item::key_share));
    // Saved before anything leaves: a key a node holds must never be missing here.
    save_keystore(home, &keystore, &passphrase)?;
    let hints = grantee_addr.into_iter().collect();
    let targets = delivery_targets(&keystore, &args.node, grantee, now_ms)?;
    let (report, deliveries, records) = hand_over(&keystore, &args.node, items, hints, &targets)
        .await
        .with_context(|| not_submitted(&grant, &args.node))?;
    keystore.unsubmitted.retain(|g| *g != grant.id());
    remember_addresses(&mut keystore, records);
    save_keystore(home, &keystore, &passphrase)?;
    let id = grant.id().to_string();
    let names: Vec<&str> = collections.iter().map(Collection::as_str).collect();
    let mut value = json!({
        "grant_id": id,
        "grantee": grantee.to_string(),
        "collections": names,
        "access": grant.terms().access.as_str(),
        "node": node_peer.to_string(),
        "accepted": report.accepted,
        "expired": expired,
    });
    let delivery = delivery_output(&mut value, &deliveries);
    out.result(
        &value,
        &format!(
            "grant {id}\n  to:          {grantee}\n  collections: {}\n  access:      {}{}\n  submitted to {node_peer}{delivery}",
            names.join(","),
            grant.terms().access.as_str(),
            if created.is_empty() {
                String::new()
            } else {
                format!("\n  new keys:    {}", created.join(","))
            }
        ),
    );
    Ok(())
}

/// Pushes `items` to `node` in one session, then asks it how their
/// delivery to `targets` stands ([`Session::deliveries`]) and where the
/// patient's practices are (their signed address records, for the address
/// book: refreshed from every node a submission reaches; none from a node
/// that cannot say).
async fn hand_over(
    keystore: &Keystore,
    node: &str,
    items: Vec<Item>,
    hints: Vec<Multiaddr>,
    targets: &[PeerId],
) -> Result<(medmesh_sync::IngestReport, Deliveries, Vec<AddressRecord>)> {
    let ids = item_ids(&items);
    let session = Session::open(keystore, node).await?;
    let result = session.push(items, hints).await;
    let (deliveries, records) = match &result {
        Ok(_) => (
            session.deliveries(keystore.patient(), targets, &ids).await,
            session
                .sync
                .practices_of(session.node, keystore.patient())
                .await
                .unwrap_or_default(),
        ),
        Err(_) => (Err(String::new()), Vec::new()),
    };
    session.close().await;
    Ok((result?, deliveries, records))
}

/// What a failed submission leaves behind, and how to finish it.
fn not_submitted(grant: &Grant, node: &str) -> String {
    format!(
        "grant {id} was not taken by the node; your keystore keeps it as not submitted \
         (`medmesh patient grants`); submit it again with `medmesh patient submit --node {node} {id}`",
        id = grant.id()
    )
}

/// The keystore's grant with the id `grant_id` (as the user typed it).
fn grant_named(keystore: &Keystore, grant_id: &str) -> Result<Grant> {
    let id: GrantId = grant_id
        .parse()
        .map_err(|_| anyhow!("{grant_id:?} is not a grant id (32 hex digits; see `medmesh patient grants`)"))?;
    keystore
        .grants
        .iter()
        .find(|g| g.id() == id)
        .cloned()
        .ok_or_else(|| anyhow!("no grant {id} in your keystore (see `medmesh patient grants`)"))
}

/// `patient submit`: a grant no node took, with its key shares for every
/// epoch of the collections it covers and the patient's live grants (as
/// `patient grant` sends them).
async fn submit(home: &Home, node: &str, grant_id: &str, out: &Output) -> Result<()> {
    let (mut keystore, passphrase) = open_keystore(home)?;
    let grant = grant_named(&keystore, grant_id)?;
    let id = grant.id();
    if keystore.is_revoked(&grant) {
        bail!("grant {id} is revoked");
    }
    if keystore.is_submitted(&grant) {
        bail!("grant {id} was submitted already; `medmesh patient grants` shows it");
    }
    let now_ms = now();
    let grantee = grant.terms().grantee;
    let mut items = vec![Item::grant(&grant)];
    items.extend(keystore.live_grants(now_ms).map(Item::grant));
    items.extend(keystore.grantee_shares(&grant, now_ms)?.iter().map(Item::key_share));
    let targets = delivery_targets(&keystore, node, grantee, now_ms)?;
    let (_, deliveries, records) = hand_over(&keystore, node, items, Vec::new(), &targets)
        .await
        .with_context(|| not_submitted(&grant, node))?;
    keystore.unsubmitted.retain(|g| *g != id);
    remember_addresses(&mut keystore, records);
    save_keystore(home, &keystore, &passphrase)?;
    let mut value = json!({"grant_id": id.to_string(), "grantee": grantee.to_string(), "submitted": true});
    let delivery = delivery_output(&mut value, &deliveries);
    out.result(
        &value,
        &format!("grant {id} submitted; the node delivers it to {grantee}{delivery}"),
    );
    Ok(())
}

async fn revoke(home: &Home, node: &str, grant_id: &str, out: &Output) -> Result<()> {
    let (mut keystore, passphrase) = open_keystore(home)?;
    let expired = end_expired_grants(home, &mut keystore, &passphrase, node, out).await?;
    let grant = grant_named(&keystore, grant_id)?;
    let id = grant.id();
    if expired.iter().any(|e| e["expired_grant"] == id.to_string()) {
        out.result(
            &json!({"revoked": id.to_string(), "grantee": grant.terms().grantee.to_string(), "expired": expired}),
            &format!("grant {id} had expired; it is revoked now"),
        );
        return Ok(());
    }
    if keystore.is_revoked(&grant) {
        bail!("grant {id} is already revoked");
    }
    if !keystore.is_submitted(&grant) {
        // No node ever took it: revoked here, nothing to tell anyone, no key to rotate.
        keystore
            .revoke(&grant, [], now())
            .map_err(|e| anyhow!("signing the revocation of grant {id}: {e}"))?;
        save_keystore(home, &keystore, &passphrase)?;
        let notice = "no node ever took this grant; it is revoked in your keystore only";
        out.result(
            &json!({"revoked": id.to_string(), "grantee": grant.terms().grantee.to_string(), "rotated": [], "notice": notice, "expired": expired}),
            &format!("revoked grant {id}\nNote: {notice}."),
        );
        return Ok(());
    }
    let session = Session::open(&keystore, node).await?;
    let pulled = session.pull().await?;
    let now_ms = now();
    let revocation = keystore
        .revoke(&grant, held_under(&keystore, &grant, &pulled), now_ms)
        .map_err(|e| anyhow!("signing the revocation of grant {id}: {e}"))?;
    let mut items = vec![Item::revocation(&revocation)];
    let rotated = rotate(&mut keystore, &grant.terms().collections, now_ms, &mut items)?;
    // The revoked grant and the others still live go along, so the node reached
    // knows every practice it must forward the revocation to (see `grant`).
    items.push(Item::grant(&grant));
    items.extend(keystore.live_grants(now_ms).map(Item::grant));
    save_keystore(home, &keystore, &passphrase)?;
    let grantee = grant.terms().grantee;
    let ids = item_ids(&items);
    let targets = delivery_targets(&keystore, node, grantee, now_ms)?;
    let result = session.push(items, Vec::new()).await;
    let deliveries = match &result {
        Ok(_) => session.deliveries(keystore.patient(), &targets, &ids).await,
        Err(_) => Err(String::new()),
    };
    session.close().await;
    result?;
    let notice = "copies of your record that this practice already received remain with it; \
                  it receives nothing new and cannot read anything written from now on";
    let mut value = json!({"revoked": id.to_string(), "grantee": grantee.to_string(), "rotated": rotated, "notice": notice, "expired": expired});
    let delivery = delivery_output(&mut value, &deliveries);
    out.result(
        &value,
        &format!(
            "revoked grant {id} of {grantee}\nrotated keys: {}{delivery}\nNote: {notice}.",
            rotated_text(&rotated)
        ),
    );
    Ok(())
}

/// The changes of `grant`'s grantee written under it among `pulled` (what
/// the node reached holds), as (collection, actor, seq), for the cut of its
/// revocation ([`Keystore::revoke`]).
fn held_under(
    keystore: &Keystore,
    grant: &Grant,
    pulled: &[medmesh_sync::StoredItem],
) -> Vec<(Collection, ActorId, u64)> {
    let grantee = Principal::Practice(grant.terms().grantee);
    pulled
        .iter()
        .filter(|stored| stored.item.kind == ItemKind::Envelope)
        .filter_map(|stored| Envelope::decode(&stored.item.bytes).ok())
        .filter_map(|envelope| {
            let h = envelope.header();
            // The grant by (patient, id): another patient may reuse the id.
            (h.patient == keystore.patient() && h.author == grantee && h.grant_id == Some(grant.id())).then_some((
                h.collection,
                h.actor,
                h.seq,
            ))
        })
        .collect()
}

/// [`Keystore::rotate`], its key shares added to `items`; one JSON object
/// per collection rotated.
fn rotate(
    keystore: &mut Keystore,
    collections: &[Collection],
    now_ms: u64,
    items: &mut Vec<Item>,
) -> Result<Vec<Value>> {
    let rotated = keystore
        .rotate(collections, now_ms)
        .context("making the new epoch keys")?;
    Ok(rotated
        .into_iter()
        .map(|r| {
            items.extend(r.shares.iter().map(Item::key_share));
            json!({"collection": r.collection.as_str(), "epoch": r.epoch, "readers": r.readers.len()})
        })
        .collect())
}

fn rotated_text(rotated: &[Value]) -> String {
    rotated
        .iter()
        .map(|r| format!("{} (epoch {})", r["collection"].as_str().unwrap_or("?"), r["epoch"]))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Ends every grant in the keystore that has expired and was not ended yet
/// (issue 15): nodes stop serving an expired grant, but its holder can still
/// sign changes dated inside the window. So each one gets a revocation whose
/// cut holds what `node` has of its changes (any later change, however
/// dated, is invalid on every node), and the collections they covered get a
/// new epoch for the grants still live. Says so on stderr; returns one JSON
/// object per grant ended, for commands that print JSON. Reaches `node` only
/// when there is something to end.
async fn end_expired_grants(
    home: &Home,
    keystore: &mut Keystore,
    passphrase: &str,
    node: &str,
    out: &Output,
) -> Result<Vec<Value>> {
    let now_ms = now();
    let expired: Vec<Grant> = keystore
        .grants
        .iter()
        .filter(|g| {
            g.terms().expires.is_some_and(|e| e <= now_ms) && !keystore.is_revoked(g) && keystore.is_submitted(g)
        })
        .cloned()
        .collect();
    if expired.is_empty() {
        return Ok(Vec::new());
    }
    let session = Session::open(keystore, node).await?;
    let result = async {
        let pulled = session.pull().await?;
        let mut items = Vec::new();
        let mut collections = BTreeSet::new();
        let mut ended = Vec::new();
        for grant in &expired {
            let held = held_under(keystore, grant, &pulled);
            let revocation = keystore
                .revoke(grant, held, now_ms)
                .map_err(|e| anyhow!("signing the revocation of grant {}: {e}", grant.id()))?;
            items.push(Item::revocation(&revocation));
            collections.extend(grant.terms().collections.iter().copied());
            ended.push(grant);
        }
        let collections: Vec<Collection> = collections.into_iter().collect();
        let rotated = rotate(keystore, &collections, now_ms, &mut items)?;
        // The expired grants go along: the node reached forwards the
        // revocations to the practices whose grants it knows.
        items.extend(expired.iter().map(Item::grant));
        items.extend(keystore.live_grants(now_ms).map(Item::grant));
        save_keystore(home, keystore, passphrase)?;
        session.push(items, Vec::new()).await?;
        let mut notices = Vec::new();
        for grant in ended {
            let t = grant.terms();
            let expires = t.expires.unwrap_or_default();
            let at = medmesh_node::records::format_instant(i64::try_from(expires).unwrap_or(i64::MAX));
            let notice = json!({
                "expired_grant": grant.id().to_string(),
                "grantee": t.grantee.to_string(),
                "expired_at": at,
                "revoked": true,
                "rotated": rotated,
            });
            out.notice(
                &notice,
                &format!(
                    "grant {} of {} expired at {at}: revoked (its later changes are invalid everywhere); rotated keys: {}",
                    grant.id(),
                    t.grantee,
                    rotated_text(&rotated)
                ),
            );
            notices.push(notice);
        }
        Ok::<_, anyhow::Error>(notices)
    }
    .await;
    session.close().await;
    result.context("ending expired grants")
}

/// `patient grants`: every grant of the keystore with its status; with
/// `--node`, also how delivery of each to its practice stands at that node
/// (a node that cannot be reached or cannot say is noted on stderr, and the
/// list comes from the keystore all the same).
async fn grants(home: &Home, node: Option<&str>, out: &Output) -> Result<()> {
    let (keystore, _) = open_keystore(home)?;
    let now_ms = now();
    let deliveries = match node {
        Some(node) => match grant_deliveries(&keystore, node).await {
            Ok(per) => Some(per),
            Err(e) => {
                let why = format!("{e:#}");
                out.notice(
                    &json!({"delivery_error": why}),
                    &format!("delivery unknown: {why}; listing from your keystore"),
                );
                None
            }
        },
        None => None,
    };
    for grant in &keystore.grants {
        let t = grant.terms();
        let status = if keystore.is_revoked(grant) {
            "revoked"
        } else if t.expires.is_some_and(|e| e <= now_ms) {
            "expired"
        } else if !keystore.is_submitted(grant) {
            "not submitted"
        } else if now_ms < t.not_before {
            "not yet in force"
        } else {
            "in force"
        };
        let names: Vec<&str> = t.collections.iter().map(Collection::as_str).collect();
        let mut value = json!({
            "grant_id": grant.id().to_string(),
            "grantee": t.grantee.to_string(),
            "collections": names,
            "access": t.access.as_str(),
            "purpose": t.purpose,
            "status": status,
            "expires": t.expires,
        });
        let mut delivery = String::new();
        if let Some(d) = deliveries.as_ref().and_then(|per| per.get(&grant.id())) {
            value["delivery"] = d.to_json(t.grantee.peer_id());
            delivery = format!("  {}", d.text());
        }
        out.result(
            &value,
            &format!(
                "{}  {:<17} {}  {}  {}{delivery}",
                grant.id(),
                status,
                t.grantee,
                names.join(","),
                t.access.as_str()
            ),
        );
    }
    Ok(())
}

/// The address book: the newest verified signed address record of each
/// practice kept in the keystore (a record that no longer verifies is left out).
fn address_book(keystore: &Keystore) -> BTreeMap<PeerId, AddressRecord> {
    let mut book: BTreeMap<PeerId, AddressRecord> = BTreeMap::new();
    for record in keystore.practices.iter().filter_map(|b| AddressRecord::verify(b)) {
        if book.get(&record.peer).is_none_or(|kept| kept.seq < record.seq) {
            book.insert(record.peer, record);
        }
    }
    book
}

/// Keeps in the address book the records of `fetched` that are newer than
/// those kept, for practices the patient's grants name only (a node cannot
/// fill the book with others). Returns whether anything changed.
fn remember_addresses(keystore: &mut Keystore, fetched: Vec<AddressRecord>) -> bool {
    let grantees: BTreeSet<PeerId> = keystore.grants.iter().map(|g| g.terms().grantee.peer_id()).collect();
    let mut book = address_book(keystore);
    let mut changed = false;
    for record in fetched.into_iter().filter(|r| grantees.contains(&r.peer)) {
        // Seqs count seconds: a practice that restarted within the second of
        // its last record signs another with the same seq. The node hands
        // over the one it kept last, so at a tie the fetched record wins.
        if book
            .get(&record.peer)
            .is_none_or(|kept| kept.seq < record.seq || (kept.seq == record.seq && kept.signed != record.signed))
        {
            book.insert(record.peer, record);
            changed = true;
        }
    }
    if changed {
        keystore.practices = book.into_values().map(|r| r.signed).collect();
    }
    changed
}

/// `patient practices`: every practice the patient's grants name, with the
/// collections its live grants cover and where it last said it is.
async fn practices(home: &Home, node: Option<&str>, out: &Output) -> Result<()> {
    let (mut keystore, passphrase) = open_keystore(home)?;
    if let Some(node) = node {
        let session = Session::open(&keystore, node).await?;
        let fetched = session.sync.practices_of(session.node, keystore.patient()).await;
        session.close().await;
        let fetched = fetched.with_context(|| format!("asking {node} where your practices are"))?;
        if remember_addresses(&mut keystore, fetched) {
            save_keystore(home, &keystore, &passphrase)?;
        }
    }
    let now_ms = now();
    let book = address_book(&keystore);
    let mut seen = BTreeSet::new();
    for grant in &keystore.grants {
        let peer = grant.terms().grantee.peer_id();
        if !seen.insert(peer) {
            continue;
        }
        let live: BTreeSet<&str> = keystore
            .live_grants(now_ms)
            .filter(|g| g.terms().grantee.peer_id() == peer)
            .flat_map(|g| g.terms().collections.iter().map(Collection::as_str))
            .collect();
        let record = book.get(&peer);
        let addrs: Vec<String> = record
            .map(|r| r.addrs.iter().map(ToString::to_string).collect())
            .unwrap_or_default();
        let signed_at = record.map(|r| {
            medmesh_node::records::format_instant(i64::try_from(r.seq.saturating_mul(1000)).unwrap_or(i64::MAX))
        });
        let where_text = match (&signed_at, addrs.first()) {
            (Some(at), Some(first)) => format!("{first} (signed {at})"),
            _ => "address unknown (refresh with --node)".to_owned(),
        };
        out.result(
            &json!({"peer": peer.to_string(), "collections": live, "addresses": addrs, "signed_at": signed_at}),
            &format!(
                "{peer}  {}  {where_text}",
                if live.is_empty() {
                    "(no live grant)".to_owned()
                } else {
                    live.into_iter().collect::<Vec<_>>().join(",")
                }
            ),
        );
    }
    Ok(())
}

/// How delivery of each submitted grant to its grantee stands at `node`:
/// pending while the node owes the grantee any of the patient's consent
/// items; delivered when it holds the grant and owes nothing; unknown when
/// it does not hold the grant (submitted elsewhere).
async fn grant_deliveries(keystore: &Keystore, node: &str) -> Result<BTreeMap<GrantId, Delivery>> {
    let session = Session::open(keystore, node).await?;
    let report = session.outbox_when(keystore.patient(), |_| true).await;
    session.close().await;
    let report = report.map_err(|e| anyhow!(e))?;
    let mut per = BTreeMap::new();
    for grant in keystore.grants.iter().filter(|g| keystore.is_submitted(g)) {
        let item = ItemId::digest(Item::grant(grant).bytes.as_slice());
        let holds = report.held.contains(&item) || report.owed.iter().any(|o| o.item == item);
        let grantee = grant.terms().grantee.peer_id();
        let d = match Delivery::of(&report, grantee, None) {
            Delivery::Delivered if !holds => Delivery::Unknown,
            d => d,
        };
        per.insert(grant.id(), d);
    }
    Ok(per)
}

/// Decrypts every envelope of this patient that the node holds with the
/// keystore's keys and renders the record, collection by collection.
async fn fetch_record(keystore: &Keystore, node: &str) -> Result<Vec<Arc<RenderedResource>>> {
    let session = Session::open(keystore, node).await?;
    let items = session.pull().await;
    session.close().await;
    let mut by_collection: BTreeMap<Collection, Vec<DecodedChange>> = BTreeMap::new();
    let mut unreadable = 0usize;
    for stored in items? {
        if stored.item.kind != ItemKind::Envelope {
            continue;
        }
        let Ok(envelope) = Envelope::decode(&stored.item.bytes) else {
            unreadable += 1;
            continue;
        };
        let h = envelope.header();
        // By the whole (patient, collection, epoch, key id): a key id alone
        // is one any patient can copy.
        let Some(key) = keystore.keys.iter().find(|k| k.key_ref() == h.key_ref()) else {
            unreadable += 1;
            continue;
        };
        let mut decoded = None;
        let opened = envelope.open(key, |plain| {
            let change = DecodedChange::from_bytes(plain).ok()?;
            let hash = change.hash().0;
            decoded = Some(change);
            Some(hash)
        });
        match (opened, decoded) {
            (Ok(_), Some(change)) => by_collection.entry(h.collection).or_default().push(change),
            _ => unreadable += 1,
        }
    }
    if unreadable > 0 {
        tracing::warn!(
            unreadable,
            "some envelopes could not be opened with this keystore's keys"
        );
    }
    let mut resources = Vec::new();
    let patient = keystore.patient();
    for (collection, changes) in by_collection {
        let mut doc = RecordDoc::new();
        doc.apply_changes(changes);
        let rendered = doc.resources().map_err(|e| anyhow!("rendering your record: {e}"))?;
        // What a grantee wrote against the record's rules is shown by no node; nor here.
        resources.extend(
            rendered
                .into_iter()
                .filter(|r| medmesh_node::records::belongs(&r.json, &patient, collection)),
        );
    }
    Ok(resources)
}

async fn records(home: &Home, node: &str, resource_type: Option<&str>, out: &Output) -> Result<()> {
    let (mut keystore, passphrase) = open_keystore(home)?;
    end_expired_grants(home, &mut keystore, &passphrase, node, out).await?;
    let resources = fetch_record(&keystore, node).await?;
    let mut shown = 0;
    for r in resources
        .iter()
        .filter(|r| resource_type.is_none_or(|t| r.resource_type() == t))
    {
        shown += 1;
        out.result(
            &r.json,
            &format!("{:<28} {}  {}", r.key, r.last_updated, summary(&r.json)),
        );
    }
    if !out.is_json() {
        println!("{shown} resources");
    }
    Ok(())
}

/// One line about a resource for people: its code or name text.
fn summary(resource: &Value) -> String {
    let text = |v: &Value| -> Option<String> {
        v.get("text").and_then(Value::as_str).map(str::to_owned).or_else(|| {
            v.pointer("/coding/0/display")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
    };
    resource
        .get("code")
        .and_then(text)
        .or_else(|| resource.get("vaccineCode").and_then(text))
        .or_else(|| resource.get("medicationCodeableConcept").and_then(text))
        .or_else(|| {
            resource.pointer("/name/0").map(|n| {
                let given: Vec<&str> = n
                    .get("given")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                format!(
                    "{} {}",
                    given.join(" "),
                    n.get("family").and_then(Value::as_str).unwrap_or("")
                )
            })
        })
        .unwrap_or_default()
}

async fn export(home: &Home, node: &str, output: &std::path::Path, out: &Output) -> Result<()> {
    let (mut keystore, passphrase) = open_keystore(home)?;
    end_expired_grants(home, &mut keystore, &passphrase, node, out).await?;
    let resources = fetch_record(&keystore, node).await?;
    let entries: Vec<Value> = resources
        .iter()
        .map(|r| json!({"fullUrl": format!("urn:medmesh:{}", r.key), "resource": r.json}))
        .collect();
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": medmesh_node::records::format_instant(i64::try_from(now()).unwrap_or(i64::MAX)),
        "entry": entries,
    });
    let bytes = serde_json::to_vec_pretty(&bundle)?;
    medmesh_crypto::write_atomically(output, &bytes).with_context(|| format!("writing {}", output.display()))?;
    out.result(
        &json!({"file": output.display().to_string(), "resources": resources.len()}),
        &format!(
            "wrote {} resources to {} (FHIR R4 collection Bundle)",
            resources.len(),
            output.display()
        ),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_circuit_address_names_the_node_behind_the_relay() {
        let (relay, node) = (PeerId::random(), PeerId::random());
        let circuit = format!("/ip4/127.0.0.1/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{node}");
        assert_eq!(addressed(&circuit, "--node").unwrap().1, node);
        let direct = format!("/ip4/127.0.0.1/tcp/4001/p2p/{node}");
        assert_eq!(addressed(&direct, "--to").unwrap().1, node);
        assert!(addressed("/ip4/127.0.0.1/tcp/4001", "--to").is_err());
    }
}
