//! Golden tests against `docs/vectors/crypto.txt`, and the generator that
//! writes that file (`generate`, ignored; run it deliberately).
//!
//! This lives inside the crate because key-share vectors need
//! [`KeyShare::create_with_rng`] and keystore vectors a fixed salt and nonce,
//! neither of which is public.
//!
//! File format: one `case name value` per line, `#` comments. Values are
//! lowercase hex for bytes, decimal for integers, text otherwise.

use std::collections::BTreeMap;
use std::convert::Infallible;

use hpke::rand_core::{TryCryptoRng, TryRng};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::canon;
use crate::*;

const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/vectors/crypto.txt");

/// Deterministic "randomness" for vectors: block i is SHA-256(seed || i as u64 BE).
pub(crate) struct TestRng {
    seed: [u8; 32],
    counter: u64,
    buf: Vec<u8>,
}

impl TestRng {
    pub(crate) fn new(seed: [u8; 32]) -> Self {
        Self {
            seed,
            counter: 0,
            buf: Vec::new(),
        }
    }
}

impl TryRng for TestRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        let mut b = [0u8; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut b = [0u8; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        for byte in dst {
            if self.buf.is_empty() {
                let mut h = Sha256::new();
                h.update(self.seed);
                h.update(self.counter.to_be_bytes());
                self.counter += 1;
                self.buf = h.finalize().to_vec();
                self.buf.reverse();
            }
            *byte = self.buf.pop().unwrap_or_default();
        }
        Ok(())
    }
}

impl TryCryptoRng for TestRng {}

/// The fixed inputs every vector is made from.
pub(crate) struct Fixture {
    pub(crate) patient: SecretIdentity,
    pub(crate) practice_a: SecretIdentity,
    pub(crate) practice_b: SecretIdentity,
    pub(crate) key: EpochKey,
    pub(crate) actor_a: ActorId,
    pub(crate) actor_patient: ActorId,
    pub(crate) grant: Grant,
    pub(crate) grant_read: Grant,
    pub(crate) revocation: Revocation,
    pub(crate) share_a: KeyShare,
    pub(crate) share_patient: KeyShare,
    pub(crate) envelope_practice: Envelope,
    pub(crate) envelope_patient: Envelope,
    pub(crate) checkpoint: AuditCheckpoint,
}

pub(crate) const PATIENT_SEED: [u8; 32] = [0x01; 32];
pub(crate) const PRACTICE_A_SEED: [u8; 32] = [0x02; 32];
pub(crate) const PRACTICE_B_SEED: [u8; 32] = [0x03; 32];
const KEY_ID: [u8; 16] = [0x11; 16];
const KEY: [u8; 32] = [0x22; 32];
const GRANT_ID: [u8; 16] = [0x07; 16];
const GRANT_READ_ID: [u8; 16] = [0x08; 16];
const ACTOR_A_NONCE: [u8; 8] = [0x0a; 8];
const ACTOR_PATIENT_NONCE: [u8; 8] = [0x0b; 8];
const SHARE_A_RNG: [u8; 32] = [0x33; 32];
const SHARE_PATIENT_RNG: [u8; 32] = [0x34; 32];
const CHANGE_PRACTICE: &[u8] = b"medmesh test change by practice a";
const CHANGE_PRACTICE_HASH: [u8; 32] = [0x44; 32];
const NONCE_PRACTICE: [u8; 24] = [0x55; 24];
const CHANGE_PATIENT: &[u8] = b"medmesh test change by the patient";
const CHANGE_PATIENT_HASH: [u8; 32] = [0x66; 32];
const NONCE_PATIENT: [u8; 24] = [0x77; 24];
const CHECKPOINT_SEQ: u64 = 42;
const CHECKPOINT_HEAD: [u8; 32] = [0xcc; 32];
const KEYSTORE_SALT: [u8; 16] = [0x88; 16];
const KEYSTORE_NONCE: [u8; 24] = [0x99; 24];
const KEYSTORE_PASSPHRASE: &str = "correct horse battery staple";
pub(crate) const SMALL_KDF: KdfParams = KdfParams {
    m_cost_kib: 64,
    t_cost: 1,
    p_cost: 1,
};

impl Fixture {
    pub(crate) fn new() -> Self {
        let patient = SecretIdentity::from_seed(&PATIENT_SEED);
        let practice_a = SecretIdentity::from_seed(&PRACTICE_A_SEED);
        let practice_b = SecretIdentity::from_seed(&PRACTICE_B_SEED);
        let pid = patient.patient_id();
        let a = practice_a.practice_id().unwrap();
        let b = practice_b.practice_id().unwrap();
        let key = EpochKey::from_parts(pid, Collection::Labs, 0, KeyId(KEY_ID), Zeroizing::new(KEY));
        let actor_a = ActorId::for_author(&practice_a.public_bytes(), ACTOR_A_NONCE);
        let actor_patient = ActorId::for_author(&patient.public_bytes(), ACTOR_PATIENT_NONCE);
        let grant = Grant::sign(
            GrantTerms {
                id: GrantId(GRANT_ID),
                patient: pid,
                grantee: a,
                collections: Collection::parse_list("all").unwrap(),
                access: Access::ReadWrite,
                not_before: 1_700_000_000_000,
                expires: Some(1_800_000_000_000),
                purpose: "treatment".into(),
                issued_at: 1_699_999_999_000,
                address_hints: vec!["/ip4/192.0.2.1/tcp/4001".into()],
            },
            &patient,
        )
        .unwrap();
        let grant_read = Grant::sign(
            GrantTerms {
                id: GrantId(GRANT_READ_ID),
                patient: pid,
                grantee: b,
                collections: vec![Collection::Sensitive],
                access: Access::Read,
                not_before: 1_700_000_000_000,
                expires: None,
                purpose: "emergency".into(),
                issued_at: 1_700_000_000_000,
                address_hints: vec![],
            },
            &patient,
        )
        .unwrap();
        let revocation = Revocation::sign(
            RevocationTerms {
                patient: pid,
                grant_id: GrantId(GRANT_ID),
                issued_at: 1_750_000_000_000,
                cut: [(actor_a, 42)].into_iter().collect(),
            },
            &patient,
        )
        .unwrap();
        let share_a = KeyShare::create_with_rng(
            &key,
            Principal::Practice(a),
            &patient,
            1_700_000_000_000,
            &mut TestRng::new(SHARE_A_RNG),
        )
        .unwrap();
        let share_patient = KeyShare::create_with_rng(
            &key,
            Principal::Patient(pid),
            &patient,
            1_700_000_000_000,
            &mut TestRng::new(SHARE_PATIENT_RNG),
        )
        .unwrap();
        let envelope_practice = Envelope::seal_with_nonce(
            (key.patient, key.collection),
            &key,
            &practice_a,
            Some(GrantId(GRANT_ID)),
            Change {
                bytes: CHANGE_PRACTICE,
                hash: CHANGE_PRACTICE_HASH,
                actor: actor_a,
                seq: 1,
            },
            1_700_000_100_000,
            NONCE_PRACTICE,
        )
        .unwrap();
        let envelope_patient = Envelope::seal_with_nonce(
            (key.patient, key.collection),
            &key,
            &patient,
            None,
            Change {
                bytes: CHANGE_PATIENT,
                hash: CHANGE_PATIENT_HASH,
                actor: actor_patient,
                seq: 7,
            },
            1_700_000_200_000,
            NONCE_PATIENT,
        )
        .unwrap();
        let checkpoint = AuditCheckpoint::sign(
            AuditCheckpointTerms {
                node: a,
                seq: CHECKPOINT_SEQ,
                head: CHECKPOINT_HEAD,
                time: 1_700_000_300_000,
            },
            &practice_a,
        )
        .unwrap();
        Self {
            checkpoint,
            patient,
            practice_a,
            practice_b,
            key,
            actor_a,
            actor_patient,
            grant,
            grant_read,
            revocation,
            share_a,
            share_patient,
            envelope_practice,
            envelope_patient,
        }
    }

    pub(crate) fn keystore(&self) -> Keystore {
        let mut ks = Keystore::new(SecretIdentity::from_seed(&PATIENT_SEED), SMALL_KDF);
        ks.keys.push(self.key.clone());
        ks.grants.push(self.grant.clone());
        ks.revocations.push(self.revocation.clone());
        ks
    }

    pub(crate) fn keystore_bytes(&self) -> Vec<u8> {
        self.keystore()
            .seal_with(KEYSTORE_PASSPHRASE.as_bytes(), KEYSTORE_SALT, KEYSTORE_NONCE)
            .unwrap()
    }
}

/// Collects `case name value` lines.
#[derive(Default)]
struct Out(Vec<(String, String, String)>);

impl Out {
    fn hex(&mut self, case: &str, name: &str, bytes: &[u8]) {
        self.0.push((case.into(), name.into(), hex::encode(bytes)));
    }
    fn text(&mut self, case: &str, name: &str, text: impl ToString) {
        self.0.push((case.into(), name.into(), text.to_string()));
    }
}

/// The `[body, signature]` parts of a signed wire object.
fn body_and_signature(encoded: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let value = canon::decode("vector", encoded, usize::MAX, usize::MAX).unwrap();
    let ciborium::Value::Array(items) = value else {
        panic!("not an array")
    };
    let ciborium::Value::Bytes(sig) = &items[1] else {
        panic!("no signature")
    };
    (canon::encode(&items[0]), sig.clone())
}

fn signed(out: &mut Out, case: &str, tag: &[u8], encoded: &[u8]) {
    let (body, sig) = body_and_signature(encoded);
    out.hex(case, "body", &body);
    out.hex(case, "signed-message", &canon::tagged(tag, &body));
    out.hex(case, "signature", &sig);
    out.hex(case, "encoded", encoded);
}

fn envelope(out: &mut Out, case: &str, env: &Envelope, change: &[u8], change_hash: &[u8; 32], author_seed: &[u8]) {
    let h = env.header();
    out.hex(case, "author-seed", author_seed);
    out.text(
        case,
        "grant-id",
        h.grant_id.map_or("null".to_string(), |g| g.to_string()),
    );
    out.hex(case, "actor", &h.actor.0);
    out.text(case, "seq", h.seq);
    out.hex(case, "change", change);
    out.hex(case, "change-hash", change_hash);
    out.text(case, "created-at", h.created_at);
    out.hex(case, "nonce", &h.nonce);
    out.hex(case, "keyed-change-hash", &h.keyed_change_hash);
    out.hex(case, "aad", &h.aad());
    out.hex(case, "ciphertext", env.ciphertext());
    out.hex(case, "ciphertext-sha256", &h.ciphertext_sha256);
    out.hex(case, "header", &env.signed.body);
    out.hex(case, "signed-message", &canon::tagged(ENVELOPE_TAG, &env.signed.body));
    out.hex(case, "signature", &env.signed.signature);
    out.hex(case, "signed-header", &env.signed_header().encode());
    out.hex(case, "envelope-id", &env.id().0);
    out.hex(case, "encoded", &env.encode());
    out.hex(case, "compact-header", &env.signed_header().compact().encode());
}

fn compute() -> Vec<(String, String, String)> {
    let f = Fixture::new();
    let mut o = Out::default();
    for (case, seed, id) in [
        ("identity-patient", &PATIENT_SEED, &f.patient),
        ("identity-practice-a", &PRACTICE_A_SEED, &f.practice_a),
        ("identity-practice-b", &PRACTICE_B_SEED, &f.practice_b),
    ] {
        o.hex(case, "seed", seed);
        o.hex(case, "public", &id.public_bytes());
        let montgomery = Principal::Patient(id.patient_id())
            .verifying_key()
            .unwrap()
            .to_montgomery();
        o.hex(case, "x25519-public", montgomery.as_bytes());
        if case == "identity-patient" {
            o.text(case, "did", id.patient_id());
        } else {
            o.text(case, "peer-id", id.practice_id().unwrap());
            o.hex(case, "peer-id-bytes", &id.practice_id().unwrap().peer_id().to_bytes());
        }
    }
    for (case, id, nonce, actor) in [
        ("actor-practice-a", &f.practice_a, ACTOR_A_NONCE, f.actor_a),
        ("actor-patient", &f.patient, ACTOR_PATIENT_NONCE, f.actor_patient),
    ] {
        o.hex(case, "author", &id.public_bytes());
        o.hex(case, "process-nonce", &nonce);
        o.hex(case, "actor", &actor.0);
    }
    let case = "epoch-key";
    o.text(case, "collection", f.key.collection);
    o.text(case, "epoch", f.key.epoch);
    o.hex(case, "key-id", &f.key.key_id.0);
    o.hex(case, "key", f.key.secret());

    for (case, g) in [("grant-read-write", &f.grant), ("grant-read", &f.grant_read)] {
        let t = g.terms();
        o.hex(case, "id", &t.id.0);
        o.text(case, "grantee", t.grantee);
        let names: Vec<&str> = t.collections.iter().map(|c| c.as_str()).collect();
        o.text(case, "collections", names.join(","));
        o.text(case, "access", t.access.as_str());
        o.text(case, "not-before", t.not_before);
        o.text(case, "expires", t.expires.map_or("null".into(), |e| e.to_string()));
        o.text(case, "purpose", &t.purpose);
        o.text(case, "issued-at", t.issued_at);
        o.text(
            case,
            "address-hints",
            if t.address_hints.is_empty() {
                "-".to_string()
            } else {
                t.address_hints.join(",")
            },
        );
        signed(&mut o, case, GRANT_TAG, g.encoded());
    }
    let case = "revocation";
    let t = f.revocation.terms();
    o.hex(case, "grant-id", &t.grant_id.0);
    o.text(case, "issued-at", t.issued_at);
    for (actor, seq) in &t.cut {
        o.text(case, "cut", format!("{actor}:{seq}"));
    }
    signed(&mut o, case, REVOCATION_TAG, f.revocation.encoded());

    for (case, share, rng) in [
        ("keyshare-practice-a", &f.share_a, SHARE_A_RNG),
        ("keyshare-patient", &f.share_patient, SHARE_PATIENT_RNG),
    ] {
        let t = share.terms();
        o.hex(case, "rng-seed", &rng);
        o.text(case, "recipient", t.recipient);
        o.text(case, "issued-at", t.issued_at);
        o.hex(
            case,
            "hpke-info",
            &keys::hpke_info(&t.patient, t.collection, t.epoch, &t.key_id, &t.recipient),
        );
        o.hex(case, "encapped", &t.encapped);
        o.hex(case, "wrapped", &t.wrapped);
        signed(&mut o, case, KEYSHARE_TAG, share.encoded());
    }
    envelope(
        &mut o,
        "envelope-practice-a",
        &f.envelope_practice,
        CHANGE_PRACTICE,
        &CHANGE_PRACTICE_HASH,
        &PRACTICE_A_SEED,
    );
    envelope(
        &mut o,
        "envelope-patient",
        &f.envelope_patient,
        CHANGE_PATIENT,
        &CHANGE_PATIENT_HASH,
        &PATIENT_SEED,
    );
    let case = "audit-checkpoint";
    let t = f.checkpoint.terms();
    o.text(case, "node", t.node);
    o.text(case, "seq", t.seq);
    o.hex(case, "head", &t.head);
    o.text(case, "time", t.time);
    signed(&mut o, case, AUDIT_CHECKPOINT_TAG, f.checkpoint.encoded());
    let case = "keystore";
    o.text(case, "passphrase", KEYSTORE_PASSPHRASE);
    o.text(case, "m-cost-kib", SMALL_KDF.m_cost_kib);
    o.text(case, "t-cost", SMALL_KDF.t_cost);
    o.text(case, "p-cost", SMALL_KDF.p_cost);
    o.hex(case, "salt", &KEYSTORE_SALT);
    o.hex(case, "nonce", &KEYSTORE_NONCE);
    let file = f.keystore_bytes();
    let (header, _) = split_keystore(&file);
    o.hex(case, "header", &header);
    o.hex(case, "file", &file);
    o.0
}

/// The header encoding (the AEAD's AAD) and the ciphertext of a keystore file.
fn split_keystore(file: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let value = canon::decode("vector", file, usize::MAX, usize::MAX).unwrap();
    let ciborium::Value::Array(items) = value else {
        panic!("not an array")
    };
    let ciborium::Value::Bytes(ct) = &items[1] else {
        panic!("no ciphertext")
    };
    (canon::encode(&items[0]), ct.clone())
}

fn render(lines: &[(String, String, String)]) -> String {
    let mut s = String::from(
        "# medmesh-crypto test vectors; the format of every object is in docs/formats.md.\n\
         # One `case name value` per line: bytes in lowercase hex, integers in decimal, else text.\n\
         # Checked by crypto/src/vectors.rs (cargo test -p medmesh-crypto vectors).\n\
         # Regenerate deliberately: MEDMESH_WRITE_VECTORS=1 cargo test -p medmesh-crypto --lib vectors::generate -- --ignored\n",
    );
    let mut last = "";
    for (case, name, value) in lines {
        if case != last {
            s.push('\n');
            last = case;
        }
        s.push_str(&format!("{case} {name} {value}\n"));
    }
    s
}

fn read_file() -> Vec<(usize, String, String, String)> {
    let text = std::fs::read_to_string(VECTORS).unwrap_or_else(|e| panic!("reading {VECTORS}: {e}"));
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|(n, l)| {
            let mut parts = l.splitn(3, ' ');
            let case = parts.next().unwrap_or_default().to_string();
            let name = parts
                .next()
                .unwrap_or_else(|| panic!("line {}: no name", n + 1))
                .to_string();
            let value = parts.next().unwrap_or_default().to_string();
            (n + 1, case, name, value)
        })
        .collect()
}

/// Values of the file by (case, name); repeated names (e.g. `cut`) are joined with `;`.
fn file_map() -> BTreeMap<(String, String), String> {
    let mut map: BTreeMap<(String, String), String> = BTreeMap::new();
    for (_, case, name, value) in read_file() {
        map.entry((case, name))
            .and_modify(|v| {
                v.push(';');
                v.push_str(&value);
            })
            .or_insert(value);
    }
    map
}

fn get_hex(map: &BTreeMap<(String, String), String>, case: &str, name: &str) -> Vec<u8> {
    let v = map
        .get(&(case.to_string(), name.to_string()))
        .unwrap_or_else(|| panic!("{case}: no {name} in {VECTORS}"));
    hex::decode(v).unwrap_or_else(|e| panic!("{case} {name}: not hex: {e}"))
}

fn arr<const N: usize>(v: Vec<u8>) -> [u8; N] {
    v.try_into().unwrap()
}

/// Generator: prints the vector file (`--ignored --nocapture`), or writes it
/// to docs/vectors/crypto.txt when `MEDMESH_WRITE_VECTORS` is set. Do that
/// only when a format change is intended, and say so in the commit.
#[test]
#[ignore = "prints the vectors; run deliberately to regenerate docs/vectors/crypto.txt"]
fn generate() {
    let text = render(&compute());
    if std::env::var_os("MEDMESH_WRITE_VECTORS").is_some() {
        std::fs::write(VECTORS, &text).unwrap();
    } else {
        print!("{text}");
    }
}

#[test]
fn code_produces_the_file_exactly() {
    let file = read_file();
    let computed = compute();
    for (line, case, name, value) in &file {
        let found = computed.iter().find(|(c, n, v)| c == case && n == name && v == value);
        assert!(
            found.is_some(),
            "case {case}, line {line}: {name} in the file is not what the code produces (expected one of {:?})",
            computed
                .iter()
                .filter(|(c, n, _)| c == case && n == name)
                .map(|(_, _, v)| v)
                .collect::<Vec<_>>()
        );
    }
    for (case, name, value) in &computed {
        assert!(
            file.iter().any(|(_, c, n, v)| c == case && n == name && v == value),
            "case {case}: the code produces {name} = {value}, missing from {VECTORS}"
        );
    }
}

#[test]
fn identities_from_the_file() {
    let m = file_map();
    let patient = SecretIdentity::from_seed(&arr(get_hex(&m, "identity-patient", "seed")));
    let did = &m[&("identity-patient".into(), "did".into())];
    assert_eq!(&patient.patient_id().to_string(), did, "case identity-patient: did");
    assert_eq!(
        did.parse::<PatientId>().unwrap(),
        patient.patient_id(),
        "case identity-patient"
    );
    for case in ["identity-practice-a", "identity-practice-b"] {
        let id = SecretIdentity::from_seed(&arr(get_hex(&m, case, "seed")));
        let peer = &m[&(case.to_string(), "peer-id".to_string())];
        let practice: PracticeId = peer.parse().unwrap();
        assert_eq!(
            practice.as_bytes(),
            &id.public_bytes(),
            "case {case}: peer id names the key"
        );
        assert_eq!(
            id.to_libp2p().unwrap().public().to_peer_id().to_string(),
            *peer,
            "case {case}: libp2p agrees"
        );
        assert_eq!(
            practice.peer_id().to_bytes(),
            get_hex(&m, case, "peer-id-bytes"),
            "case {case}"
        );
    }
}

#[test]
fn file_bytes_decode_and_verify() {
    let m = file_map();
    let patient = SecretIdentity::from_seed(&arr(get_hex(&m, "identity-patient", "seed")));
    let practice_a = SecretIdentity::from_seed(&arr(get_hex(&m, "identity-practice-a", "seed")));
    for case in ["grant-read-write", "grant-read"] {
        let bytes = get_hex(&m, case, "encoded");
        let g = Grant::decode(&bytes).unwrap_or_else(|e| panic!("case {case}: {e}"));
        assert_eq!(g.encoded(), &bytes[..], "case {case}");
        assert_eq!(g.id().0.to_vec(), get_hex(&m, case, "id"), "case {case}");
        assert_eq!(g.terms().patient, patient.patient_id(), "case {case}");
    }
    let bytes = get_hex(&m, "revocation", "encoded");
    let r = Revocation::decode(&bytes).unwrap_or_else(|e| panic!("case revocation: {e}"));
    assert_eq!(
        r.grant_id().0.to_vec(),
        get_hex(&m, "revocation", "grant-id"),
        "case revocation"
    );

    let key_bytes: [u8; 32] = arr(get_hex(&m, "epoch-key", "key"));
    let key_id = KeyId(arr(get_hex(&m, "epoch-key", "key-id")));
    for (case, recipient) in [("keyshare-practice-a", &practice_a), ("keyshare-patient", &patient)] {
        let share = KeyShare::decode(&get_hex(&m, case, "encoded")).unwrap_or_else(|e| panic!("case {case}: {e}"));
        let key = share.open(recipient).unwrap_or_else(|e| panic!("case {case}: {e}"));
        assert_eq!(key.secret(), &key_bytes, "case {case}: opens to the epoch key");
        assert_eq!(key.key_id, key_id, "case {case}");
    }
    let key = EpochKey::from_parts(
        patient.patient_id(),
        Collection::Labs,
        0,
        key_id,
        Zeroizing::new(key_bytes),
    );
    for case in ["envelope-practice-a", "envelope-patient"] {
        let bytes = get_hex(&m, case, "encoded");
        let env = Envelope::decode(&bytes).unwrap_or_else(|e| panic!("case {case}: {e}"));
        assert_eq!(env.id().0.to_vec(), get_hex(&m, case, "envelope-id"), "case {case}");
        let id = Sha256::digest(get_hex(&m, case, "signed-header")).to_vec();
        assert_eq!(env.id().0.to_vec(), id, "case {case}: id = SHA-256(signed header)");
        let sh =
            SignedHeader::decode(&get_hex(&m, case, "signed-header")).unwrap_or_else(|e| panic!("case {case}: {e}"));
        assert_eq!(sh.id(), env.id(), "case {case}");
        let hash: [u8; 32] = arr(get_hex(&m, case, "change-hash"));
        let plain = env
            .open(&key, |_| Some(hash))
            .unwrap_or_else(|e| panic!("case {case}: {e}"));
        assert_eq!(plain.to_vec(), get_hex(&m, case, "change"), "case {case}");
        // The compact header, the change and the key give back the envelope.
        let compact =
            CompactHeader::decode(&get_hex(&m, case, "compact-header")).unwrap_or_else(|e| panic!("case {case}: {e}"));
        let h = env.header();
        let change = get_hex(&m, case, "change");
        let restored = compact
            .restore(
                &key,
                Change {
                    bytes: &change,
                    hash,
                    actor: h.actor,
                    seq: h.seq,
                },
            )
            .unwrap_or_else(|e| panic!("case {case}: {e}"));
        assert_eq!(restored.encode(), bytes, "case {case}: restored byte for byte");
        assert_eq!(env.encode(), bytes, "case {case}: re-encodes identically");
    }
    let bytes = get_hex(&m, "audit-checkpoint", "encoded");
    let cp = AuditCheckpoint::decode(&bytes).unwrap_or_else(|e| panic!("case audit-checkpoint: {e}"));
    assert_eq!(cp.encoded(), &bytes[..], "case audit-checkpoint");
    assert_eq!(
        cp.terms().node,
        practice_a.practice_id().unwrap(),
        "case audit-checkpoint"
    );
    assert_eq!(cp.terms().seq, CHECKPOINT_SEQ, "case audit-checkpoint");
    assert_eq!(
        cp.terms().head.to_vec(),
        get_hex(&m, "audit-checkpoint", "head"),
        "case audit-checkpoint"
    );
    let passphrase = &m[&("keystore".into(), "passphrase".into())];
    let ks = Keystore::unseal(&get_hex(&m, "keystore", "file"), passphrase.as_bytes())
        .unwrap_or_else(|e| panic!("case keystore: {e}"));
    assert_eq!(ks.patient(), patient.patient_id(), "case keystore");
    assert_eq!(ks.keys[0].secret(), &key_bytes, "case keystore");
    assert!(
        matches!(
            Keystore::unseal(&get_hex(&m, "keystore", "file"), b"wrong"),
            Err(Error::KeystoreLocked)
        ),
        "case keystore: wrong passphrase"
    );
}

#[test]
fn signatures_in_the_file_verify_with_dalek_directly() {
    use ed25519_dalek::{Signature, Verifier, VerifyingKey};
    let m = file_map();
    let patient_pk = VerifyingKey::from_bytes(&arr(get_hex(&m, "identity-patient", "public"))).unwrap();
    let a_pk = VerifyingKey::from_bytes(&arr(get_hex(&m, "identity-practice-a", "public"))).unwrap();
    for (case, pk) in [
        ("grant-read-write", &patient_pk),
        ("grant-read", &patient_pk),
        ("revocation", &patient_pk),
        ("keyshare-practice-a", &patient_pk),
        ("keyshare-patient", &patient_pk),
        ("envelope-practice-a", &a_pk),
        ("envelope-patient", &patient_pk),
        ("audit-checkpoint", &a_pk),
    ] {
        let msg = get_hex(&m, case, "signed-message");
        let sig = Signature::from_bytes(&arr(get_hex(&m, case, "signature")));
        pk.verify(&msg, &sig).unwrap_or_else(|e| panic!("case {case}: {e}"));
    }
}

/// Flips every bit of one object of each kind (exhaustive; invariant 4).
#[test]
fn every_single_bit_flip_is_rejected() {
    let f = Fixture::new();
    let hash_of = |case: &str| {
        if case == "envelope" {
            CHANGE_PRACTICE_HASH
        } else {
            CHANGE_PATIENT_HASH
        }
    };
    for (case, env) in [
        ("envelope", &f.envelope_practice),
        ("envelope-patient", &f.envelope_patient),
    ] {
        assert!(
            env.open(&f.key, |_| Some(hash_of(case))).is_ok(),
            "case {case}: unflipped opens"
        );
    }
    let objects: [(&str, Vec<u8>); 8] = [
        ("audit-checkpoint", f.checkpoint.encoded().to_vec()),
        ("grant", f.grant.encoded().to_vec()),
        ("grant-read", f.grant_read.encoded().to_vec()),
        ("revocation", f.revocation.encoded().to_vec()),
        ("keyshare", f.share_a.encoded().to_vec()),
        ("envelope", f.envelope_practice.encode()),
        ("envelope-patient", f.envelope_patient.encode()),
        ("signed-header", f.envelope_practice.signed_header().encode()),
    ];
    for (case, bytes) in objects {
        for bit in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            let accepted = match case {
                "grant" | "grant-read" => Grant::decode(&b).is_ok(),
                "revocation" => Revocation::decode(&b).is_ok(),
                "keyshare" => KeyShare::decode(&b).and_then(|s| s.open(&f.practice_a)).is_ok(),
                "signed-header" => SignedHeader::decode(&b).is_ok(),
                "audit-checkpoint" => AuditCheckpoint::decode(&b).is_ok(),
                _ => Envelope::decode(&b)
                    .and_then(|e| e.open(&f.key, |_| Some(hash_of(case))))
                    .is_ok(),
            };
            assert!(!accepted, "case {case}: flipping bit {bit} was accepted");
        }
    }
    let file = f.keystore_bytes();
    for bit in 0..file.len() * 8 {
        let mut b = file.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        assert!(
            Keystore::unseal(&b, KEYSTORE_PASSPHRASE.as_bytes()).is_err(),
            "case keystore: flipping bit {bit} was accepted"
        );
    }
}

#[test]
fn key_share_vectors_are_deterministic_and_private_rng_is_used() {
    let a = Fixture::new();
    let b = Fixture::new();
    assert_eq!(a.share_a.encoded(), b.share_a.encoded(), "case keyshare-practice-a");
    assert_ne!(
        a.share_a.terms().encapped,
        a.share_patient.terms().encapped,
        "case keyshare-*"
    );
}
