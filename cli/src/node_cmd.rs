//! Practice node commands: init, id, token, run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::{Context as _, Result, bail};
use medmesh_crypto::{KdfParams, SealedSecret, SecretIdentity, write_atomically};
use medmesh_node::identity::{KeyFile, NODE_KEY_FILE, PASSPHRASE_ENV, open_identity};
use medmesh_node::{Node, Repository};
use serde::{Deserialize, Serialize};
use serde_json::json;
use zeroize::Zeroizing;

use crate::backend::NodeBackend;
use crate::home::Home;
use crate::output::Output;

const TOKEN_FILE: &str = "gateway.token";
const CONFIG_FILE: &str = "config.json";
/// Written by a running node so other commands find its gateway; removed at shutdown.
pub(crate) const RUNNING_FILE: &str = "running.json";

/// What `node init` writes and `node run` reads; flags override it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct NodeConfig {
    /// libp2p listen addresses.
    pub(crate) listen: Vec<String>,
    /// Gateway bind address.
    pub(crate) gateway: String,
    /// Peers to connect to at start.
    pub(crate) peers: Vec<String>,
    /// LAN discovery.
    pub(crate) mdns: bool,
    /// Kademlia lookups of peers' addresses (docs/operations.md).
    #[serde(default)]
    pub(crate) kademlia: bool,
    /// Relays to reserve a circuit on, for a node behind NAT.
    #[serde(default)]
    pub(crate) relays: Vec<String>,
    /// Serve as a circuit relay for other practices.
    #[serde(default)]
    pub(crate) relay_server: bool,
    /// Addresses others reach this node at (announced; a relay hands them out).
    #[serde(default)]
    pub(crate) external_addresses: Vec<String>,
    /// Longest wait between two tries to deliver what this node owes a
    /// practice that is down (seconds; default 300). Not written unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) redelivery_max_backoff_secs: Option<u64>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            listen: vec![
                "/ip4/127.0.0.1/tcp/0".to_owned(),
                "/ip4/127.0.0.1/udp/0/quic-v1".to_owned(),
            ],
            gateway: "127.0.0.1:0".to_owned(),
            peers: Vec::new(),
            mdns: false,
            kademlia: false,
            relays: Vec::new(),
            relay_server: false,
            external_addresses: Vec::new(),
            redelivery_max_backoff_secs: None,
        }
    }
}

/// Where a running node can be reached; `running.json` in the node dir.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Running {
    pub(crate) peer_id: String,
    pub(crate) listen: Vec<String>,
    pub(crate) gateway: String,
    pub(crate) pid: u32,
}

/// The systemd credential that holds the node passphrase
/// (`LoadCredential=medmesh-node-passphrase:/etc/medmesh/node-passphrase`).
pub(crate) const PASSPHRASE_CREDENTIAL: &str = "medmesh-node-passphrase";

/// `--node-passphrase-file`, set once by `main` before any command runs.
static PASSPHRASE_FILE: OnceLock<PathBuf> = OnceLock::new();

/// Records `--node-passphrase-file` for the commands that open the node key.
pub(crate) fn passphrase_file(path: Option<PathBuf>) {
    if let Some(path) = path {
        let _ = PASSPHRASE_FILE.set(path);
    }
}

/// The passphrase that seals the node key: `--node-passphrase-file`, else
/// `MEDMESH_NODE_PASSPHRASE`, else the systemd credential
/// [`PASSPHRASE_CREDENTIAL`] in `$CREDENTIALS_DIRECTORY`; none of them: the key
/// is plain.
fn node_passphrase() -> Result<Option<Zeroizing<String>>> {
    if let Some(path) = PASSPHRASE_FILE.get() {
        return read_passphrase_file(path).map(Some);
    }
    if let Ok(value) = std::env::var(PASSPHRASE_ENV)
        && !value.is_empty()
    {
        return Ok(Some(Zeroizing::new(value)));
    }
    if let Some(credentials) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        let path = Path::new(&credentials).join(PASSPHRASE_CREDENTIAL);
        if path.exists() {
            return read_passphrase_file(&path).map(Some);
        }
    }
    Ok(None)
}

/// Longest passphrase file read: a passphrase, not a document.
const MAX_PASSPHRASE_FILE: u64 = 4096;

/// A passphrase file's content less one trailing newline (`echo` and editors add one).
fn read_passphrase_file(path: &Path) -> Result<Zeroizing<String>> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading the node passphrase file {}", path.display()))?
        .len();
    if len > MAX_PASSPHRASE_FILE {
        bail!(
            "the node passphrase file {} is {len} bytes; a passphrase file holds one line",
            path.display()
        );
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("reading the node passphrase file {}", path.display()))?,
    );
    let line = text
        .strip_suffix('\n')
        .map_or(text.as_str(), |l| l.strip_suffix('\r').unwrap_or(l));
    if line.is_empty() {
        bail!("the node passphrase file {} is empty", path.display());
    }
    Ok(Zeroizing::new(line.to_owned()))
}

/// Opens (or creates) the node key with the node passphrase, if any. A plain key
/// met with a passphrase is sealed in place under it, and the command says so:
/// it never leaves a key plain that the operator asked to seal. Passphrases that
/// seal are checked for strength; one that opens an existing sealed key is not.
fn open_node_key(dir: &Path) -> Result<SecretIdentity> {
    let passphrase = node_passphrase()?;
    if let Some(p) = &passphrase
        && node_key_needs_sealing(dir)
    {
        crate::passphrase::check_strength(p, "node passphrase")?;
    }
    let (identity, file) = open_identity(dir, passphrase.as_ref().map(|p| p.as_bytes()), KdfParams::DEFAULT)
        .with_context(|| {
            format!(
                "loading the node key in {} (a sealed key needs its passphrase: --node-passphrase-file, {PASSPHRASE_ENV} or the credential {PASSPHRASE_CREDENTIAL})",
                dir.display()
            )
        })?;
    if file == KeyFile::SealedInPlace {
        eprintln!(
            "medmesh: the node key in {} was plain; it is now sealed under the node passphrase",
            dir.display()
        );
    }
    Ok(identity)
}

/// Whether opening the node key with a passphrase would seal something: no key
/// yet, or a plain one.
fn node_key_needs_sealing(dir: &Path) -> bool {
    std::fs::read(dir.join(NODE_KEY_FILE)).map_or(true, |bytes| !SealedSecret::is_sealed(&bytes))
}

/// Creates (or loads) the node key, the gateway token and the config.
/// Ports for a new node's config; `None`: a free one, chosen now.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Ports {
    pub(crate) p2p: Option<u16>,
    pub(crate) gateway: Option<u16>,
}

/// A port free for both TCP and UDP on `ip` now (libp2p listens on TCP and
/// QUIC with one number), chosen by the kernel.
fn free_p2p_port(ip: std::net::IpAddr) -> Result<u16> {
    for _ in 0..32 {
        let tcp = std::net::TcpListener::bind((ip, 0)).context("finding a free port")?;
        let port = tcp.local_addr().context("finding a free port")?.port();
        if std::net::UdpSocket::bind((ip, port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("found no port free for both TCP and UDP; pass --p2p-port")
}

/// The config of a new node, with fixed ports: the addresses that grants,
/// patients' address books and peers keep stay true across restarts.
fn initial_config(ports: Ports) -> Result<NodeConfig> {
    let loopback = std::net::IpAddr::from([127, 0, 0, 1]);
    let p2p = match ports.p2p {
        Some(port) => port,
        None => free_p2p_port(loopback)?,
    };
    let gateway = match ports.gateway {
        Some(port) => port,
        None => loop {
            let probe = std::net::TcpListener::bind((loopback, 0)).context("finding a free gateway port")?;
            let port = probe.local_addr().context("finding a free gateway port")?.port();
            if port != p2p {
                break port;
            }
        },
    };
    Ok(NodeConfig {
        listen: vec![
            format!("/ip4/127.0.0.1/tcp/{p2p}"),
            format!("/ip4/127.0.0.1/udp/{p2p}/quic-v1"),
        ],
        gateway: format!("127.0.0.1:{gateway}"),
        ..NodeConfig::default()
    })
}

/// Writes a new node's config (fixed ports) unless one exists.
pub(crate) fn ensure_config(dir: &Path, ports: Ports) -> Result<()> {
    Home::ensure_private_dir(dir)?;
    let config_path = dir.join(CONFIG_FILE);
    if !config_path.exists() {
        let text = serde_json::to_vec_pretty(&initial_config(ports)?)?;
        write_atomically(&config_path, &text)
            .with_context(|| format!("writing the node config at {}", config_path.display()))?;
    }
    Ok(())
}

pub(crate) fn init(dir: &Path, ports: Ports) -> Result<SecretIdentity> {
    Home::ensure_private_dir(dir)?;
    let identity = open_node_key(dir)?;
    let token_path = dir.join(TOKEN_FILE);
    if !token_path.exists() {
        let mut raw = Zeroizing::new([0u8; 32]);
        getrandom::fill(raw.as_mut()).map_err(|_| anyhow::anyhow!("operating system randomness unavailable"))?;
        let token = Zeroizing::new(hex::encode(raw.as_ref()));
        write_atomically(&token_path, token.as_bytes())
            .with_context(|| format!("writing the gateway token at {}", token_path.display()))?;
    }
    ensure_config(dir, ports)?;
    Ok(identity)
}

pub(crate) fn load_identity(dir: &Path) -> Result<SecretIdentity> {
    if !dir.join(NODE_KEY_FILE).exists() {
        bail!("no node in {}; create one with `medmesh node init`", dir.display());
    }
    open_node_key(dir)
}

pub(crate) fn read_token(dir: &Path) -> Result<Zeroizing<String>> {
    let path = dir.join(TOKEN_FILE);
    let token = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading the gateway token at {}; run `medmesh node init`",
            path.display()
        )
    })?;
    Ok(Zeroizing::new(token.trim().to_owned()))
}

pub(crate) fn read_config(dir: &Path) -> Result<NodeConfig> {
    let path = dir.join(CONFIG_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(NodeConfig::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The running node of this home, if its `running.json` names a live process.
pub(crate) fn running(dir: &Path) -> Option<Running> {
    let bytes = std::fs::read(dir.join(RUNNING_FILE)).ok()?;
    let running: Running = serde_json::from_slice(&bytes).ok()?;
    // A stale file from a killed node: its pid is gone.
    let alive = PathBuf::from(format!("/proc/{}", running.pid)).exists() || !cfg!(target_os = "linux");
    alive.then_some(running)
}

pub(crate) fn print_id(dir: &Path, out: &Output) -> Result<()> {
    let identity = load_identity(dir)?;
    let peer_id = identity.practice_id()?.to_string();
    out.result(&json!({ "peer_id": peer_id }), &peer_id);
    Ok(())
}

/// Flags of `node run`, already merged with the config file.
pub(crate) struct RunOptions {
    pub(crate) listen: Vec<String>,
    pub(crate) gateway: String,
    pub(crate) peers: Vec<String>,
    pub(crate) mdns: bool,
    pub(crate) kademlia: bool,
    pub(crate) relays: Vec<String>,
    pub(crate) relay_server: bool,
    pub(crate) external_addresses: Vec<String>,
    pub(crate) allow_remote_gateway: bool,
    pub(crate) cors_origins: Vec<String>,
    pub(crate) redelivery_max_backoff: Option<std::time::Duration>,
}

/// A started node: store, repository, gateway (and sync when wired).
pub(crate) struct StartedNode {
    pub(crate) peer_id: String,
    pub(crate) listen: Vec<String>,
    pub(crate) gateway_url: String,
    pub(crate) node: Node,
    repository: Repository,
    pub(crate) sync: medmesh_sync::SyncHandle,
    shutdown: tokio::sync::watch::Sender<bool>,
    gateway_task: tokio::task::JoinHandle<std::io::Result<()>>,
    dir: PathBuf,
}

impl StartedNode {
    /// Stops the gateway (draining requests) and sync, then flushes and
    /// closes the store.
    pub(crate) async fn stop(self) -> Result<()> {
        let _ = self.shutdown.send(true);
        if let Err(e) = self.sync.shutdown().await {
            tracing::warn!(cause = %e, "sync stopped with an error");
        }
        match self.gateway_task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(cause = %e, "gateway stopped with an error"),
            Err(e) => tracing::warn!(cause = %e, "gateway task failed"),
        }
        // Snapshots spare the next start a full replay of long histories.
        self.repository.save_snapshots().await;
        self.node.close().await;
        let _ = std::fs::remove_file(self.dir.join(RUNNING_FILE));
        Ok(())
    }
}

fn gateway_addr(spec: &str, allow_remote: bool) -> Result<SocketAddr> {
    let addr: SocketAddr = spec
        .parse()
        .with_context(|| format!("--gateway {spec:?} is not ADDR:PORT (e.g. 127.0.0.1:8080)"))?;
    if !addr.ip().is_loopback() {
        if !allow_remote {
            bail!(
                "refusing to bind the gateway to {addr}: it is not a loopback address; \
                 pass --allow-remote-gateway if you really mean to expose it"
            );
        }
        tracing::warn!(%addr, "THE GATEWAY IS BOUND TO A NON-LOOPBACK ADDRESS: anyone who can reach it and holds the token can read patient data");
        eprintln!("WARNING: the gateway listens on {addr}, beyond this machine");
    }
    Ok(addr)
}

/// Starts a node in `dir`: initialises it if needed, opens the store,
/// starts the gateway. Used by `node run` and by the demo.
pub(crate) async fn start(dir: &Path, options: RunOptions) -> Result<StartedNode> {
    let identity = init(dir, Ports::default())?;
    let peer_id = identity.practice_id()?.to_string();
    let token = read_token(dir)?;
    let addr = gateway_addr(&options.gateway, options.allow_remote_gateway)?;
    let sync_config = sync_config(&options)?;
    let sync_identity = SecretIdentity::from_seed(&identity.seed());
    let node = Node::open(dir, identity, medmesh_node::Config::default())
        .await
        .with_context(|| {
            format!(
                "opening the store in {} (is another node running on it?)",
                dir.display()
            )
        })?;
    // sled has just created its files 0644; the node dir (0700) kept them
    // private meanwhile.
    crate::home::restrict_new(dir)?;
    let repository = Repository::new(node.clone(), medmesh_node::repository::Config::default())
        .context("starting the record repository")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the gateway to {addr}"))?;
    let bound = listener.local_addr().context("reading the gateway's bound address")?;
    let sync = medmesh_sync::SyncHandle::spawn(
        sync_config,
        &sync_identity,
        medmesh_sync::NodeBackend::new(node.clone()),
    )
    .await
    .context("starting sync (libp2p)")?;
    let listen: Vec<String> = sync
        .listen_addrs()
        .await
        .context("reading sync listen addresses")?
        .iter()
        .map(ToString::to_string)
        .collect();
    let config = medmesh_gateway::Config {
        cors_origins: options.cors_origins.clone(),
        ..medmesh_gateway::Config::for_addr(bound)
    };
    let backend = Arc::new(NodeBackend::new(
        node.clone(),
        repository.clone(),
        Some(sync.clone()),
        dir.join(medmesh_node::STORE_DIR),
    ));
    let router = medmesh_gateway::router(backend, medmesh_gateway::Token::new(&token), config);
    let (shutdown, mut stop) = tokio::sync::watch::channel(false);
    let gateway_task = tokio::spawn(medmesh_gateway::serve(listener, router, async move {
        let _ = stop.wait_for(|s| *s).await;
    }));
    let started = StartedNode {
        peer_id,
        listen,
        gateway_url: format!("http://{bound}"),
        node,
        repository,
        sync,
        shutdown,
        gateway_task,
        dir: dir.to_owned(),
    };
    let running = Running {
        peer_id: started.peer_id.clone(),
        listen: started.listen.clone(),
        gateway: started.gateway_url.clone(),
        pid: std::process::id(),
    };
    write_atomically(&dir.join(RUNNING_FILE), &serde_json::to_vec(&running)?)?;
    Ok(started)
}

fn sync_config(options: &RunOptions) -> Result<medmesh_sync::Config> {
    let parse = |what: &str, s: &String| -> Result<medmesh_sync::Multiaddr> {
        s.parse()
            .with_context(|| format!("{what} {s:?} is not a multiaddr (e.g. /ip4/127.0.0.1/tcp/4001)"))
    };
    let mut config = medmesh_sync::Config::default();
    if !options.listen.is_empty() {
        config.listen = options
            .listen
            .iter()
            .map(|s| parse("--listen", s))
            .collect::<Result<_>>()?;
    }
    config.peers = options
        .peers
        .iter()
        .map(|s| parse("--peer", s))
        .collect::<Result<_>>()?;
    for peer in &config.peers {
        if medmesh_sync::addressed_peer(peer).is_none() {
            bail!("--peer {peer} must end in /p2p/<PeerId> so the node knows whom it reaches");
        }
    }
    config.relays = options
        .relays
        .iter()
        .map(|s| parse("--relay", s))
        .collect::<Result<_>>()?;
    for relay in &config.relays {
        if medmesh_sync::addressed_peer(relay).is_none()
            || relay.iter().any(|p| p == medmesh_sync::Protocol::P2pCircuit)
        {
            bail!("--relay {relay} must be the relay's own address ending in /p2p/<PeerId>");
        }
    }
    config.external_addrs = options
        .external_addresses
        .iter()
        .map(|s| parse("--external-address", s))
        .collect::<Result<_>>()?;
    config.relay_server = options.relay_server;
    config.mdns = options.mdns;
    config.kademlia = options.kademlia;
    if let Some(max) = options.redelivery_max_backoff {
        if max.is_zero() {
            bail!("redelivery_max_backoff_secs must be at least 1");
        }
        config.redelivery_max_backoff = max;
    }
    Ok(config)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

pub(crate) fn run(dir: &Path, options: RunOptions, out: &Output) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let started = start(dir, options).await?;
        out.result(
            &json!({ "peer_id": started.peer_id, "listen": started.listen, "gateway": started.gateway_url }),
            &format!(
                "node {} running\n  listen:  {}\n  gateway: {}\n(Ctrl-C to stop)",
                started.peer_id,
                if started.listen.is_empty() {
                    "(sync not wired yet)".to_owned()
                } else {
                    started.listen.join(" ")
                },
                started.gateway_url
            ),
        );
        wait_for_signal().await;
        tracing::info!("shutting down");
        started.stop().await
    })
}
