//! The `medmesh` binary: the composition root. It runs a practice node
//! (store, sync, gateway wired together), holds a patient's keys and
//! consent, imports FHIR, and runs the end-to-end demo.
//!
//! It is the only place that uses `anyhow`, prints to stdout, or reads
//! passphrases; libraries below it return typed errors and never print.

mod audit_anchor;
mod audit_cmd;
mod backend;
mod delivery;
mod demo;
mod home;
mod import;
mod node_cmd;
mod output;
mod passphrase;
mod patient;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::home::Home;
use crate::output::Output;

/// medmesh — a peer-to-peer electronic health record.
#[derive(Debug, Parser)]
#[command(name = "medmesh", version, about, propagate_version = true)]
struct Cli {
    /// Where medmesh keeps this user's node and keystore.
    #[arg(long, global = true, env = "MEDMESH_HOME", value_name = "DIR")]
    home: Option<PathBuf>,
    /// Machine output: one JSON object per result line.
    #[arg(long, global = true)]
    json: bool,
    /// More logging (repeat for more); logs go to stderr and never carry PHI.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Less logging.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "verbose")]
    quiet: u8,
    /// A file holding the passphrase that seals the node key (its first line);
    /// else `MEDMESH_NODE_PASSPHRASE`, else the systemd credential
    /// `medmesh-node-passphrase` in `$CREDENTIALS_DIRECTORY`.
    #[arg(long, global = true, value_name = "PATH")]
    node_passphrase_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run and manage this practice's node.
    #[command(subcommand)]
    Node(NodeCommand),
    /// A patient's keys and consent.
    #[command(subcommand)]
    Patient(patient::PatientCommand),
    /// Import FHIR JSON into the running node.
    #[command(subcommand)]
    Fhir(FhirCommand),
    /// The node's tamper-evident audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Start two practices and a patient on loopback and show consent at work.
    Demo,
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Create the node's identity key, gateway token and config (never overwrites).
    Init(NodeInitArgs),
    /// Run the node: store, sync and gateway.
    Run(NodeRunArgs),
    /// Print the node's PeerId.
    Id,
    /// Print the gateway bearer token alone on stdout.
    Token,
}

/// The fixed ports a new node's config keeps (free ones are chosen when not given).
#[derive(Debug, Args)]
struct NodeInitArgs {
    /// libp2p port, TCP and QUIC (UDP) alike.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    p2p_port: Option<u16>,
    /// Gateway port (on 127.0.0.1).
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    gateway_port: Option<u16>,
}

#[derive(Debug, Args)]
struct NodeRunArgs {
    /// libp2p listen address (repeatable); port 0 picks a free port.
    #[arg(long, value_name = "MULTIADDR")]
    listen: Vec<String>,
    /// Gateway address (default from the node's config: 127.0.0.1:0, a free port).
    #[arg(long, value_name = "ADDR:PORT")]
    gateway: Option<String>,
    /// Allow a gateway address beyond loopback (exposes patient data to the network).
    #[arg(long)]
    allow_remote_gateway: bool,
    /// A browser origin allowed to call the gateway (CORS), e.g.
    /// https://emr.example.org (repeatable; none by default).
    #[arg(long, value_name = "ORIGIN")]
    cors_origin: Vec<String>,
    /// A peer to connect to (repeatable).
    #[arg(long, value_name = "MULTIADDR")]
    peer: Vec<String>,
    /// Discover peers on the LAN with mDNS (off by default).
    #[arg(long)]
    mdns: bool,
    /// Find peers' addresses with Kademlia lookups through known peers (off by default).
    #[arg(long)]
    kademlia: bool,
    /// Behind NAT: reserve a circuit on this relay (repeatable; the relay's
    /// multiaddr ending in /p2p/<PeerId>). Peers then reach this node at
    /// <relay>/p2p-circuit/p2p/<this node>.
    #[arg(long, value_name = "MULTIADDR")]
    relay: Vec<String>,
    /// Serve as a circuit relay for practices behind NAT (off by default; limits in docs/operations.md).
    #[arg(long)]
    relay_server: bool,
    /// An address others reach this node at, e.g. its public address in front of a port forward (repeatable).
    #[arg(long, value_name = "MULTIADDR")]
    external_address: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum FhirCommand {
    /// Post FHIR JSON resources and Bundles to the running node's gateway.
    Import {
        /// Files or directories of .json files.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Link the Bundle's Patient to this medmesh patient (did:key).
        #[arg(long, value_name = "DID")]
        patient: Option<String>,
        /// Gateway base URL (default: the running node's).
        #[arg(long, value_name = "URL")]
        gateway: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the audit hash chain; exit non-zero naming the first broken entry.
    Verify,
    /// Print audit entries.
    Show {
        /// Only entries about this patient.
        #[arg(long, value_name = "DID")]
        patient: Option<String>,
    },
}

fn init_tracing(verbose: u8, quiet: u8) {
    let level = match (verbose, quiet) {
        (0, 0) => "warn",
        (1, _) => "info",
        (2, _) => "debug",
        (v, _) if v > 2 => "trace",
        _ => "error",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MEDMESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn main() -> std::process::ExitCode {
    // Everything this process creates is its owner's alone: the node's store
    // (sled makes its files 0644 by itself, and more of them while it runs),
    // the keystore, exports of a patient's record.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let cli = Cli::parse();
    init_tracing(cli.verbose, cli.quiet);
    let out = Output::new(cli.json);
    match run(cli, &out) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            out.error(&err);
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli, out: &Output) -> Result<()> {
    let home = Home::resolve(cli.home)?;
    if !matches!(cli.command, Command::Completions { .. } | Command::Demo) {
        home.secure()?;
    }
    node_cmd::passphrase_file(cli.node_passphrase_file);
    match cli.command {
        Command::Patient(cmd) => patient::run(cmd, &home, out),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "medmesh", &mut std::io::stdout());
            Ok(())
        }
        Command::Node(NodeCommand::Init(args)) => {
            let ports = node_cmd::Ports {
                p2p: args.p2p_port,
                gateway: args.gateway_port,
            };
            let identity = node_cmd::init(&home.node_dir(), ports)?;
            let peer_id = identity.practice_id()?.to_string();
            out.result(
                &serde_json::json!({ "peer_id": peer_id }),
                &format!(
                    "{peer_id}
node: {}",
                    home.node_dir().display()
                ),
            );
            Ok(())
        }
        Command::Node(NodeCommand::Run(args)) => {
            let dir = home.node_dir();
            // A first run initialises the node: its config (fixed ports) is
            // written before it is read, so this run uses the ports the next keeps.
            node_cmd::ensure_config(&dir, node_cmd::Ports::default())?;
            let config = node_cmd::read_config(&dir)?;
            let options = node_cmd::RunOptions {
                listen: if args.listen.is_empty() {
                    config.listen
                } else {
                    args.listen
                },
                gateway: args.gateway.unwrap_or(config.gateway),
                peers: if args.peer.is_empty() { config.peers } else { args.peer },
                mdns: args.mdns || config.mdns,
                kademlia: args.kademlia || config.kademlia,
                relays: if args.relay.is_empty() {
                    config.relays
                } else {
                    args.relay
                },
                relay_server: args.relay_server || config.relay_server,
                external_addresses: if args.external_address.is_empty() {
                    config.external_addresses
                } else {
                    args.external_address
                },
                allow_remote_gateway: args.allow_remote_gateway,
                cors_origins: args.cors_origin,
                redelivery_max_backoff: config.redelivery_max_backoff_secs.map(std::time::Duration::from_secs),
            };
            node_cmd::run(&dir, options, out)
        }
        Command::Node(NodeCommand::Id) => node_cmd::print_id(&home.node_dir(), out),
        Command::Node(NodeCommand::Token) => {
            let token = node_cmd::read_token(&home.node_dir())?;
            println!("{}", token.as_str());
            Ok(())
        }
        Command::Fhir(FhirCommand::Import {
            paths,
            patient,
            gateway,
        }) => import::run(&home, &paths, patient.as_deref(), gateway, out),
        Command::Audit(AuditCommand::Verify) => audit_cmd::verify(&home, out),
        Command::Audit(AuditCommand::Show { patient }) => audit_cmd::show(&home, patient.as_deref(), out),
        Command::Demo => demo::run(out),
    }
}
