//! Envelope seal/open and grant sign/verify beside the raw primitives they
//! are built from, on the same inputs in the same run, so the overhead of
//! medmesh's framing (canonical CBOR, hashes, header checks) is visible.
//!
//! Target: sealing a 1 KiB envelope costs at most 1/0.7 of a raw
//! XChaCha20-Poly1305 encryption plus a raw ed25519 signature of the same
//! bytes. Run: `cargo bench -p medmesh-crypto`.
#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ed25519_dalek::{Signer, SigningKey};
use medmesh_crypto::{
    Access, ActorId, Change, Collection, Envelope, EpochKey, Grant, GrantId, GrantTerms, KeyId, SecretIdentity,
};
use zeroize::Zeroizing;

fn envelopes(c: &mut Criterion) {
    let patient = SecretIdentity::from_seed(&[1; 32]);
    let practice = SecretIdentity::from_seed(&[2; 32]);
    let key = EpochKey::from_parts(
        patient.patient_id(),
        Collection::Labs,
        0,
        KeyId([0x11; 16]),
        Zeroizing::new([0x22; 32]),
    );
    let actor = ActorId::for_author(&practice.public_bytes(), [0; 8]);
    let raw_cipher = XChaCha20Poly1305::new(key.secret().into());
    let raw_signer = SigningKey::from_bytes(&[2; 32]);
    let raw_verifier = raw_signer.verifying_key();
    let nonce = XNonce::from([0x55; 24]);

    for size in [1024usize, 64 * 1024] {
        let change: Vec<u8> = (0..size).map(|i| i as u8).collect();
        let label = format!("{}KiB", size / 1024);
        let mut group = c.benchmark_group(format!("envelope-{label}"));
        group.throughput(Throughput::Bytes(size as u64));
        let mk = || Change {
            bytes: &change,
            hash: [9; 32],
            actor,
            seq: 1,
        };
        group.bench_function(BenchmarkId::new("seal+sign", &label), |b| {
            b.iter(|| {
                Envelope::seal(
                    (key.patient, key.collection),
                    &key,
                    &practice,
                    Some(GrantId([7; 16])),
                    black_box(mk()),
                    1_700_000_000_000,
                )
                .unwrap()
            })
        });
        let sealed = Envelope::seal(
            (key.patient, key.collection),
            &key,
            &practice,
            Some(GrantId([7; 16])),
            mk(),
            1_700_000_000_000,
        )
        .unwrap()
        .encode();
        group.bench_function(BenchmarkId::new("decode+verify+open", &label), |b| {
            b.iter(|| {
                let env = Envelope::decode(black_box(&sealed)).unwrap();
                env.open(&key, |_| Some([9; 32])).unwrap()
            })
        });
        group.bench_function(BenchmarkId::new("raw-aead-encrypt", &label), |b| {
            b.iter(|| {
                raw_cipher
                    .encrypt(
                        &nonce,
                        Payload {
                            msg: black_box(&change),
                            aad: &[0u8; 256],
                        },
                    )
                    .unwrap()
            })
        });
        let ct = raw_cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: &change,
                    aad: &[0u8; 256],
                },
            )
            .unwrap();
        group.bench_function(BenchmarkId::new("raw-aead-decrypt", &label), |b| {
            b.iter(|| {
                raw_cipher
                    .decrypt(
                        &nonce,
                        Payload {
                            msg: black_box(&ct),
                            aad: &[0u8; 256],
                        },
                    )
                    .unwrap()
            })
        });
        group.bench_function(BenchmarkId::new("raw-ed25519-sign", &label), |b| {
            b.iter(|| raw_signer.sign(black_box(&change)))
        });
        let sig = raw_signer.sign(&change);
        group.bench_function(BenchmarkId::new("raw-ed25519-verify", &label), |b| {
            b.iter(|| raw_verifier.verify_strict(black_box(&change), &sig).unwrap())
        });
        group.finish();
    }
}

fn grants(c: &mut Criterion) {
    let patient = SecretIdentity::from_seed(&[1; 32]);
    let practice = SecretIdentity::from_seed(&[2; 32]);
    let terms = GrantTerms {
        id: GrantId([7; 16]),
        patient: patient.patient_id(),
        grantee: practice.practice_id().unwrap(),
        collections: Collection::parse_list("all").unwrap(),
        access: Access::ReadWrite,
        not_before: 1_700_000_000_000,
        expires: Some(1_800_000_000_000),
        purpose: "treatment".into(),
        issued_at: 1_699_999_999_000,
        address_hints: vec!["/ip4/192.0.2.1/tcp/4001".into()],
    };
    let grant = Grant::sign(terms.clone(), &patient).unwrap();
    let encoded = grant.encoded().to_vec();
    let raw_signer = SigningKey::from_bytes(&[1; 32]);
    let raw_verifier = raw_signer.verifying_key();
    let sig = raw_signer.sign(&encoded);
    let mut group = c.benchmark_group("grant");
    group.bench_function("sign", |b| {
        b.iter(|| Grant::sign(black_box(terms.clone()), &patient).unwrap())
    });
    group.bench_function("decode+verify", |b| {
        b.iter(|| Grant::decode(black_box(&encoded)).unwrap())
    });
    group.bench_function("raw-ed25519-sign", |b| b.iter(|| raw_signer.sign(black_box(&encoded))));
    group.bench_function("raw-ed25519-verify", |b| {
        b.iter(|| raw_verifier.verify_strict(black_box(&encoded), &sig).unwrap())
    });
    group.finish();
}

criterion_group!(benches, envelopes, grants);
criterion_main!(benches);
