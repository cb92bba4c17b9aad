//! A node process for the kill -9 test: opens the store in the directory
//! given as first argument (making the node key, a test patient and its
//! grant on first use), prints `READY`, then runs N concurrent writers
//! (second argument, default 16) that write changes as fast as they can
//! and print `ACK <envelope id>` for every write the node acknowledged,
//! until the process is killed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::path::PathBuf;

use medmesh_crypto::{Access, Collection, write_atomically};
use medmesh_node::testing::{ChangeMaker, TestPatient};
use medmesh_node::{Config, Node, load_or_create_identity};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("usage: store_writer DIR [WRITERS]"));
    let writers: usize = args.next().map_or(16, |w| w.parse().expect("writers"));
    let identity = load_or_create_identity(&dir, None).expect("node key");
    let seed_path = dir.join("patient.seed");
    let seed: [u8; 32] = match std::fs::read(&seed_path) {
        Ok(b) => b.try_into().expect("seed"),
        Err(_) => {
            let mut s = [0u8; 32];
            s.copy_from_slice(&identity.public_bytes());
            s[0] ^= 0x5a;
            write_atomically(&seed_path, &s).expect("write seed");
            s
        }
    };
    let mut patient = TestPatient::from_seed(&seed);
    let node = Node::open(&dir, identity, Config::default()).await.expect("open store");
    let me = node.practice_id();
    if node
        .grant_in_force(
            &patient.id(),
            Collection::Core,
            &me,
            Access::ReadWrite,
            medmesh_crypto::now(),
        )
        .is_none()
    {
        let (_, items) = patient.onboard(me, Collection::Core).expect("onboard");
        node.submit(patient.id(), items).await.expect("submit grant");
    }
    println!("READY");
    std::io::stdout().flush().expect("stdout");
    let mut tasks = Vec::new();
    for w in 0..writers {
        let node = node.clone();
        let p = patient.id();
        tasks.push(tokio::spawn(async move {
            let mut maker = ChangeMaker::new(node.practice_id().as_bytes()).expect("maker");
            let mut i = 0u64;
            #[allow(clippy::infinite_loop)]
            loop {
                let change = maker.put("n", &format!("{w}-{i}")).expect("change");
                let id = node
                    .write_change(p, Collection::Core, change.as_change())
                    .await
                    .expect("durable write");
                let mut out = std::io::stdout().lock();
                writeln!(out, "ACK {id}").expect("stdout");
                out.flush().expect("stdout");
                i += 1;
            }
        }));
    }
    // The writers never stop; the process ends when it is killed (or when a
    // writer fails, which panics with the cause).
    join_writers(tasks).await;
}

async fn join_writers(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        if let Err(e) = t.await {
            panic!("writer task failed: {e}");
        }
    }
}
