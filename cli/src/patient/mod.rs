//! Patient commands: the keystore, and grant, revoke, read, export and
//! audit over libp2p, with the patient's own key as the libp2p identity.
//!
//! This file owns the command line (the subcommands and their dispatch);
//! the commands live in submodules by job: the keystore and its passphrase
//! (`keystore.rs`), the libp2p session with a node and delivery reports
//! (`session.rs`), grant, submit and the grant list (`grant.rs`), revoke and
//! the ending of expired grants (`revoke.rs`), the address book of practices
//! (`practices.rs`), reading and exporting the record (`record.rs`), and the
//! accounting of disclosures (`audit.rs`).

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::home::Home;
use crate::output::Output;

mod audit;
mod grant;
mod keystore;
mod practices;
mod record;
mod revoke;
mod session;

use audit::audit;
use grant::{grant, grants, submit};
use keystore::new;
pub(crate) use keystore::open_keystore;
use practices::practices;
use record::{export, records};
use revoke::revoke;

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
