//! Invariant 2 (DESIGN §9): every write the node acknowledged survives
//! `kill -9`. A real writer process (`store_writer`) is SIGKILLed at random
//! moments while writes are in flight, over many cycles; then the store is
//! reopened and every acknowledged envelope must be held and readable, the
//! audit chain must verify, and the store must take new writes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use medmesh_crypto::{Collection, EnvelopeId};
use medmesh_node::testing::{ChangeMaker, TestPatient};
use medmesh_node::{Config, Node, load_or_create_identity};

const CYCLES: usize = 20;

/// xorshift64*: the kill moments; seeded from the clock and printed, so a
/// failing schedule can be replayed with `MEDMESH_CRASH_SEED`.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn parse_id(hex_id: &str) -> EnvelopeId {
    let mut id = [0u8; 32];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex_id[2 * i..2 * i + 2], 16).unwrap();
    }
    EnvelopeId(id)
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let seed = std::env::var("MEDMESH_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("kill schedule seed {seed}");
    let mut rng = Rng(seed);
    let mut acked: Vec<EnvelopeId> = Vec::new();
    let started = Instant::now();
    for cycle in 0..CYCLES {
        let mut child = Command::new(env!("CARGO_BIN_EXE_store_writer"))
            .arg(dir.path())
            .arg("16")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Wait for the store to open (recovery after the previous kill).
        let ready = rx.recv_timeout(Duration::from_secs(30));
        assert_eq!(ready.as_deref(), Ok("READY"), "cycle {cycle}: writer did not start");
        // Let writes flow, then kill at a random moment while they are in flight.
        let first = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        let mut lines = vec![first];
        let delay = Duration::from_millis(5 + rng.next() % 200);
        let until = Instant::now() + delay;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(l) => lines.push(l),
                Err(_) => break,
            }
        }
        child.kill().unwrap(); // SIGKILL on unix
        child.wait().unwrap();
        // Every ACK the writer printed before it died counts.
        reader.join().unwrap();
        lines.extend(rx.try_iter());
        let before = acked.len();
        for line in lines {
            let id = line
                .strip_prefix("ACK ")
                .unwrap_or_else(|| panic!("unexpected output {line:?}"));
            acked.push(parse_id(id));
        }
        eprintln!("cycle {cycle}: killed after {delay:?}, {} acks", acked.len() - before);
    }
    assert!(acked.len() > CYCLES, "too few writes to mean anything");

    // Reopen and check every acknowledged write.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let identity = load_or_create_identity(dir.path(), None).unwrap();
        let seed: [u8; 32] = std::fs::read(dir.path().join("patient.seed"))
            .unwrap()
            .try_into()
            .unwrap();
        let patient = TestPatient::from_seed(&seed).id();
        let node = Node::open(dir.path(), identity, Config::default()).await.unwrap();
        let held = node.envelope_ids(&patient, Collection::Core).unwrap();
        let held: std::collections::HashSet<EnvelopeId> = held.into_iter().collect();
        let lost: Vec<&EnvelopeId> = acked.iter().filter(|id| !held.contains(id)).collect();
        assert!(
            lost.is_empty(),
            "{} of {} acknowledged writes lost: {lost:?}",
            lost.len(),
            acked.len()
        );
        let changes = node.changes_by_ids(patient, Collection::Core, &acked).await.unwrap();
        assert_eq!(changes.len(), acked.len(), "acknowledged writes not readable");
        node.audit_verify().unwrap();
        let mut maker = ChangeMaker::new(node.practice_id().as_bytes()).unwrap();
        let c = maker.put("after", "crashes").unwrap();
        node.write_change(patient, Collection::Core, c.as_change())
            .await
            .unwrap();
        eprintln!(
            "{} acknowledged writes intact after {CYCLES} kills ({} held) in {:?}",
            acked.len(),
            held.len(),
            started.elapsed()
        );
    });
}
