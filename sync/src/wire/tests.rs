//! Unit tests of the wire module: round trips of every message, typed
//! errors for bad frames and bad fields, bit flips and garbage, the example
//! exchange of `docs/protocol.md`, and the caps. Over 800 lines: one test
//! module sharing its fixtures (items, audit entries, frames patched field by
//! field); a split would only scatter them.

use ciborium::Value;
use medmesh_crypto::{AuditCheckpoint, Collection, CompactHeader, EnvelopeId, GrantId, PatientId};
use medmesh_node::AuditCheckpoints;
use medmesh_node::audit::{Action, ActorKind, AuditEntry};
use medmesh_node::item::{Cursor, InstanceId, Item, ItemId, ItemKind};

use super::audit::{ACTIONS, ACTOR_KINDS, audit_entry_value};
use super::cbor::{bytes, to_bytes, uint};
use super::*;
use crate::Error;

fn item(kind: ItemKind, n: usize) -> Item {
    Item {
        kind,
        bytes: vec![0xab; n],
    }
}

fn audit_entry(seq: u64, items: usize) -> AuditEntry {
    AuditEntry {
        seq,
        time: 1_700_000_000_000 + seq,
        actor_kind: ActorKind::Peer,
        actor_id: "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN".into(),
        action: Action::Disclose,
        patient: None,
        item_count: items as u64,
        items: (0..items).map(|i| ItemId([i as u8; 32])).collect(),
        grant: Some(GrantId([7; 16])),
        outcome: "ok".into(),
        prev_hash: [1; 32],
        hash: [2; 32],
    }
}

fn patient() -> PatientId {
    medmesh_crypto::SecretIdentity::from_seed(&[9; 32]).patient_id()
}

#[test]
fn requests_round_trip() {
    let patient = medmesh_crypto::SecretIdentity::from_seed(&[9; 32]).patient_id();
    let cases = vec![
        Request::Pull {
            cursor: Cursor {
                instance: InstanceId([1; 16]),
                seq: 42,
            },
            limit: 100,
            snapshots: None,
        },
        Request::Pull {
            cursor: Cursor::default(),
            limit: 1,
            snapshots: Some(vec![]),
        },
        Request::Pull {
            cursor: Cursor::default(),
            limit: 1,
            snapshots: Some(vec![[7; 32], [8; 32]]),
        },
        Request::Snapshot {
            patient,
            collection: Collection::Labs,
        },
        Request::Nudge {
            instance: InstanceId([2; 16]),
            seq: 7,
        },
        Request::Push {
            items: vec![item(ItemKind::Grant, 10), item(ItemKind::Envelope, 1000)],
            addrs: vec!["/ip4/127.0.0.1/tcp/1".parse().unwrap()],
        },
        Request::Summary {
            patient,
            digests: vec![],
        },
        Request::Summary {
            patient,
            digests: vec![(Collection::Labs, [3; 32]), (Collection::Core, [4; 32])],
        },
        Request::Fetch {
            ids: vec![EnvelopeId([3; 32])],
        },
        Request::Reconcile { patient },
        Request::Audit {
            patient,
            after: 17,
            limit: MAX_AUDIT_ENTRIES_PER_MESSAGE as u32,
        },
        Request::Checkpoint { patient, anchor: None },
        Request::Checkpoint {
            patient,
            anchor: Some(u64::MAX),
        },
        Request::Outbox { patient },
        Request::Practices { patient },
        Request::Digests {
            patients: vec![(patient, [5; 32])],
        },
        Request::Digests {
            patients: (1..=3u8)
                .map(|i| {
                    (
                        medmesh_crypto::SecretIdentity::from_seed(&[i; 32]).patient_id(),
                        [i; 32],
                    )
                })
                .collect(),
        },
    ];
    for req in cases {
        assert_eq!(Request::decode(&req.encode()).unwrap(), req, "case {}", req.name());
    }
}

#[test]
fn responses_round_trip() {
    let cases = vec![
        Response::Page {
            instance: InstanceId([1; 16]),
            next: 9,
            more: true,
            items: vec![item(ItemKind::KeyShare, 300)],
            offers: vec![],
        },
        Response::Page {
            instance: InstanceId([1; 16]),
            next: 9,
            more: false,
            items: vec![],
            offers: vec![Offer {
                patient: patient(),
                collection: Collection::Core,
                source: [4; 32],
            }],
        },
        Response::Snapshot(None),
        Response::Snapshot(Some(SnapshotPayload {
            source: [6; 32],
            sealed_doc: vec![1, 2, 3],
            headers: vec![4, 5],
            count: 2,
        })),
        Response::Ack,
        Response::Pushed {
            accepted: 1,
            duplicates: 2,
            pending: 3,
            rejected: 4,
        },
        Response::Summary {
            consent: vec![item(ItemKind::Revocation, 50)],
            collections: vec![(Collection::Labs, vec![EnvelopeId([5; 32])])],
        },
        Response::Fetched {
            items: vec![item(ItemKind::Envelope, 5)],
        },
        Response::Refused(RefusalCode::Internal),
        Response::Refused(RefusalCode::NotPatient),
        Response::Refused(RefusalCode::Busy),
        Response::Audit {
            entries: vec![],
            more: false,
        },
        Response::Audit {
            entries: vec![
                audit_entry(1, 0),
                AuditEntry {
                    actor_kind: ActorKind::Patient,
                    action: Action::Read,
                    grant: None,
                    outcome: "ok: audit log".into(),
                    ..audit_entry(5, 3)
                },
                AuditEntry {
                    item_count: 100_000,
                    ..audit_entry(9, MAX_AUDIT_ITEMS_PER_ENTRY)
                },
            ],
            more: true,
        },
        Response::Checkpoint(Box::new(AuditCheckpoints {
            head: checkpoint(9),
            latest: None,
            anchor: None,
        })),
        Response::Checkpoint(Box::new(AuditCheckpoints {
            head: checkpoint(9),
            latest: Some(checkpoint(12)),
            anchor: Some(checkpoint(3)),
        })),
        Response::Outbox(Box::default()),
        Response::Outbox(Box::new(OutboxReport {
            settling: true,
            owed: vec![OwedItem {
                item: ItemId([3; 32]),
                peer: libp2p::PeerId::random(),
                since: 1_700_000_000_000,
                attempts: u32::MAX,
                next_at: u64::MAX,
                last_error: "é".repeat(MAX_OUTBOX_ERROR_LEN / 2),
            }],
            held: vec![ItemId([4; 32]); MAX_OUTBOX_HELD],
        })),
        Response::Practices { records: vec![] },
        Response::Practices {
            records: vec![vec![7; MAX_ADDRESS_RECORD_BYTES]; MAX_PRACTICE_RECORDS],
        },
        Response::Differing(vec![]),
        Response::Differing(vec![0, 7, MAX_DIGEST_PATIENTS as u32 - 1]),
    ];
    for resp in cases {
        assert_eq!(Response::decode(&resp.encode()).unwrap(), resp, "case {}", resp.name());
    }
}

#[test]
fn practices_answers_over_their_caps_are_refused() {
    let too_big = Response::Practices {
        records: vec![vec![7; MAX_ADDRESS_RECORD_BYTES + 1]],
    };
    assert!(Response::decode(&too_big.encode()).is_err());
    let too_many = Response::Practices {
        records: vec![vec![7; 8]; MAX_PRACTICE_RECORDS + 1],
    };
    assert!(Response::decode(&too_many.encode()).is_err());
}

fn checkpoint(seq: u64) -> AuditCheckpoint {
    let node = medmesh_crypto::SecretIdentity::from_seed(&[4; 32]);
    AuditCheckpoint::sign(
        medmesh_crypto::AuditCheckpointTerms {
            node: node.practice_id().unwrap(),
            seq,
            head: [seq as u8; 32],
            time: 1,
        },
        &node,
    )
    .unwrap()
}

#[test]
fn a_checkpoint_answer_with_an_altered_checkpoint_is_an_error() {
    let good = Response::Checkpoint(Box::new(AuditCheckpoints {
        head: checkpoint(9),
        latest: None,
        anchor: None,
    }))
    .encode();
    let at = good.len() - 70;
    let mut bad = good.clone();
    bad[at] ^= 1;
    assert!(Response::decode(&bad).is_err());
}

#[test]
fn bad_frames_are_typed_errors() {
    let oversize_grant = Request::Push {
        items: vec![item(ItemKind::Grant, medmesh_crypto::MAX_GRANT_BYTES + 1)],
        addrs: vec![],
    }
    .encode();
    let zero_limit = Request::Pull {
        cursor: Cursor::default(),
        limit: 0,
        snapshots: None,
    }
    .encode();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("not cbor", vec![0xff, 0x00, 0x13]),
        (
            "truncated",
            Request::Nudge {
                instance: InstanceId([0; 16]),
                seq: 1,
            }
            .encode()[..5]
                .to_vec(),
        ),
        ("a map", vec![0xa0]),
        ("unknown kind", vec![0x81, 0x18, 0x63]),
        ("oversize grant", oversize_grant),
        ("zero limit", zero_limit),
        ("deep nesting", vec![0x81; 64]),
        (
            "huge declared array",
            vec![0x82, 0x02, 0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ),
        ("over the frame cap", vec![0; MAX_REQUEST_BYTES + 1]),
        (
            "audit zero limit",
            Request::Audit {
                patient: patient(),
                after: 0,
                limit: 0,
            }
            .encode(),
        ),
        (
            "audit limit over the cap",
            Request::Audit {
                patient: patient(),
                after: 0,
                limit: MAX_AUDIT_ENTRIES_PER_MESSAGE as u32 + 1,
            }
            .encode(),
        ),
        (
            "audit patient not a key",
            hex::decode(
                "8405 5820 0200000000000000000000000000000000000000000000000000000000000000 00 01".replace(' ', ""),
            )
            .unwrap(),
        ),
        (
            "audit missing limit",
            hex::decode("83055820".to_owned() + &"ab".repeat(32)).unwrap(),
        ),
        (
            "reconcile patient not a key",
            hex::decode("8207 5820 0200000000000000000000000000000000000000000000000000000000000000".replace(' ', ""))
                .unwrap(),
        ),
        ("reconcile without a patient", vec![0x81, 0x07]),
    ];
    for (name, frame) in cases {
        assert!(
            matches!(Request::decode(&frame), Err(Error::Wire { .. })),
            "case {name} should be a wire error"
        );
    }
}

#[test]
fn bad_audit_answers_are_typed_errors() {
    let answer = |entries: Vec<AuditEntry>| Response::Audit { entries, more: false }.encode();
    let too_many = (1..=MAX_AUDIT_ENTRIES_PER_MESSAGE as u64 + 1)
        .map(|s| audit_entry(s, 0))
        .collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("too many entries", answer(too_many)),
        ("out of order", answer(vec![audit_entry(3, 0), audit_entry(2, 0)])),
        ("repeated seq", answer(vec![audit_entry(3, 0), audit_entry(3, 0)])),
        ("seq zero", answer(vec![audit_entry(0, 0)])),
        (
            "count below the list",
            answer(vec![AuditEntry {
                item_count: 1,
                ..audit_entry(1, 2)
            }]),
        ),
        (
            "count above a short list",
            answer(vec![AuditEntry {
                item_count: 5,
                ..audit_entry(1, 2)
            }]),
        ),
        (
            "too many items",
            answer(vec![audit_entry(1, MAX_AUDIT_ITEMS_PER_ENTRY + 1)]),
        ),
        (
            "long outcome",
            answer(vec![AuditEntry {
                outcome: "x".repeat(MAX_AUDIT_OUTCOME_LEN + 1),
                ..audit_entry(1, 0)
            }]),
        ),
        (
            "long actor id",
            answer(vec![AuditEntry {
                actor_id: "x".repeat(MAX_AUDIT_ACTOR_ID_LEN + 1),
                ..audit_entry(1, 0)
            }]),
        ),
        ("missing more", {
            let mut f = answer(vec![]);
            f[0] = 0x82;
            f.pop();
            f
        }),
    ];
    for (name, frame) in cases {
        assert!(
            matches!(Response::decode(&frame), Err(Error::Wire { .. })),
            "case {name} should be a wire error"
        );
    }
    // Fields patched in the encoded entry: each must be refused.
    let patched = [
        (2, uint(4)),
        (4, Value::Text("delete".into())),
        (5, Value::Integer((-1).into())),
        (7, bytes(&[7; 15])),
        (9, bytes(&[1; 31])),
        (10, Value::Null),
    ];
    for (field, value) in patched {
        let Value::Array(mut fields) = audit_entry_value(&audit_entry(1, 0)) else {
            unreachable!()
        };
        fields[field] = value;
        let frame = to_bytes(&Value::Array(vec![
            uint(6),
            Value::Array(vec![Value::Array(fields)]),
            Value::Bool(false),
        ]));
        assert!(
            matches!(Response::decode(&frame), Err(Error::Wire { .. })),
            "patched field {field} should be a wire error"
        );
    }
}

#[test]
fn every_action_and_actor_kind_has_a_wire_form() {
    // A new variant in medmesh-node breaks this match, and so this test's
    // build, until the lists above learn it.
    fn listed(a: Action) -> bool {
        match a {
            Action::Read
            | Action::Write
            | Action::Receive
            | Action::Disclose
            | Action::Grant
            | Action::Revoke
            | Action::KeyShare
            | Action::Reject
            | Action::Exclude
            | Action::Quarantine => ACTIONS.contains(&a),
        }
    }
    assert!(ACTIONS.into_iter().all(listed));
    for (i, a) in ACTIONS.iter().enumerate() {
        assert!(a.as_str().len() <= 16);
        assert!(!ACTIONS[..i].contains(a), "{} listed twice", a.as_str());
    }
    for k in ACTOR_KINDS {
        let e = AuditEntry {
            actor_kind: k,
            ..audit_entry(1, 0)
        };
        let resp = Response::Audit {
            entries: vec![e],
            more: false,
        };
        assert_eq!(Response::decode(&resp.encode()).unwrap(), resp);
    }
}

#[test]
fn a_full_audit_page_fits_the_frame_cap() {
    // The server's byte budget stops a page at PAGE_BYTE_BUDGET plus one
    // entry; the largest entry must leave that under the cap.
    let largest = AuditEntry {
        actor_id: "x".repeat(MAX_AUDIT_ACTOR_ID_LEN),
        outcome: "y".repeat(MAX_AUDIT_OUTCOME_LEN),
        seq: u64::MAX,
        time: u64::MAX,
        item_count: u64::MAX,
        ..audit_entry(1, MAX_AUDIT_ITEMS_PER_ENTRY)
    };
    let one = Response::Audit {
        entries: vec![largest.clone()],
        more: true,
    }
    .encode()
    .len();
    assert!(one <= audit_entry_size_bound(&largest) + 16, "bound {one}");
    assert!(PAGE_BYTE_BUDGET + audit_entry_size_bound(&largest) + 16 < MAX_RESPONSE_BYTES);
}

#[test]
fn every_bit_flip_of_a_request_is_an_error_or_a_valid_request() {
    // A flipped bit must never panic; it decodes to an error or to some
    // other well-formed request that the server then checks as usual.
    let frames = [
        Request::Fetch {
            ids: vec![EnvelopeId([3; 32])],
        }
        .encode(),
        Request::Audit {
            patient: patient(),
            after: 300,
            limit: 64,
        }
        .encode(),
    ];
    for frame in frames {
        for bit in 0..frame.len() * 8 {
            let mut f = frame.clone();
            f[bit / 8] ^= 1 << (bit % 8);
            if let Ok(Request::Audit { limit, .. }) = Request::decode(&f) {
                assert!((1..=MAX_AUDIT_ENTRIES_PER_MESSAGE as u32).contains(&limit), "bit {bit}");
            }
        }
    }
}

#[test]
fn every_bit_flip_of_a_response_is_an_error_or_a_valid_response() {
    let frame = Response::Page {
        instance: InstanceId([1; 16]),
        next: 3,
        more: true,
        items: vec![item(ItemKind::Grant, 20), item(ItemKind::Envelope, 30)],
        offers: vec![],
    }
    .encode();
    for bit in 0..frame.len() * 8 {
        let mut f = frame.clone();
        f[bit / 8] ^= 1 << (bit % 8);
        if let Ok(Response::Page { items, .. }) = Response::decode(&f) {
            assert!(items.iter().all(|i| i.bytes.len() <= i.kind.max_bytes()), "bit {bit}");
        }
    }
}

#[test]
fn every_bit_flip_of_an_audit_answer_is_an_error_or_a_valid_answer() {
    let frame = Response::Audit {
        entries: vec![audit_entry(4, 2), audit_entry(8, 0)],
        more: true,
    }
    .encode();
    for bit in 0..frame.len() * 8 {
        let mut f = frame.clone();
        f[bit / 8] ^= 1 << (bit % 8);
        if let Ok(Response::Audit { entries, .. }) = Response::decode(&f) {
            assert!(entries.len() <= MAX_AUDIT_ENTRIES_PER_MESSAGE, "bit {bit}");
            assert!(entries.windows(2).all(|w| w[0].seq < w[1].seq), "bit {bit}");
            for e in &entries {
                assert!(e.items.len() <= MAX_AUDIT_ITEMS_PER_ENTRY, "bit {bit}");
                assert!(e.outcome.len() <= MAX_AUDIT_OUTCOME_LEN, "bit {bit}");
                assert!(e.actor_id.len() <= MAX_AUDIT_ACTOR_ID_LEN, "bit {bit}");
            }
        }
    }
}

#[test]
fn garbage_never_panics_the_decoders() {
    // Deterministic pseudo-random frames, some starting like an audit
    // message, decode to errors or to values within their caps.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..4000 {
        let len = (next() % 200) as usize;
        let mut f: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if round % 2 == 0 && f.len() > 2 {
            f[0] = 0x83 + (round % 3) as u8;
            f[1] = if round % 4 == 0 { 0x05 } else { 0x06 };
        }
        let _ = Request::decode(&f);
        if let Ok(Response::Audit { entries, .. }) = Response::decode(&f) {
            assert!(entries.len() <= MAX_AUDIT_ENTRIES_PER_MESSAGE);
        }
    }
}

/// The example exchange in `docs/protocol.md`, byte for byte.
#[test]
fn example_exchange_matches_the_docs() {
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "pull",
            Request::Pull {
                cursor: Cursor {
                    instance: InstanceId([0x11; 16]),
                    seq: 42,
                },
                limit: 256,
                snapshots: None,
            }
            .encode(),
            "84005011111111111111111111111111111111 182a190100",
        ),
        (
            "page",
            Response::Page {
                instance: InstanceId([0x22; 16]),
                next: 57,
                more: false,
                items: vec![],
                offers: vec![],
            }
            .encode(),
            "85005022222222222222222222222222222222 1839f480",
        ),
        (
            "nudge",
            Request::Nudge {
                instance: InstanceId([0x22; 16]),
                seq: 58,
            }
            .encode(),
            "83015022222222222222222222222222222222 183a",
        ),
        ("ack", Response::Ack.encode(), "8101"),
        (
            "fetch",
            Request::Fetch {
                ids: vec![EnvelopeId([0xab; 32])],
            }
            .encode(),
            "8204815820abababababababababababababababababababababababababababababababab",
        ),
        (
            "audit",
            Request::Audit {
                patient: patient(),
                after: 0,
                limit: 256,
            }
            .encode(),
            "84055820fd1724385aa0c75b64fb78cd602fa1d991fdebf76b13c58ed702eac835e9f618 00190100",
        ),
        ("refused", Response::Refused(RefusalCode::NotPatient).encode(), "820502"),
        ("refused busy", Response::Refused(RefusalCode::Busy).encode(), "820503"),
        (
            "audit answer",
            Response::Audit {
                entries: vec![],
                more: false,
            }
            .encode(),
            "830680f4",
        ),
        (
            "outbox",
            Request::Outbox { patient: patient() }.encode(),
            "82095820fd1724385aa0c75b64fb78cd602fa1d991fdebf76b13c58ed702eac835e9f618",
        ),
        (
            "outbox answer",
            Response::Outbox(Box::new(OutboxReport {
                settling: false,
                owed: vec![],
                held: vec![ItemId([0xab; 32])],
            }))
            .encode(),
            "8409f480 815820abababababababababababababababababababababababababababababababab",
        ),
        (
            "digests",
            Request::Digests {
                patients: vec![(patient(), [0xcd; 32])],
            }
            .encode(),
            "820a81825820fd1724385aa0c75b64fb78cd602fa1d991fdebf76b13c58ed702eac835e9f618 \
             5820cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd",
        ),
        ("differing", Response::Differing(vec![]).encode(), "820a80"),
        (
            "differing 0 and 300",
            Response::Differing(vec![0, 300]).encode(),
            "820a820019012c",
        ),
        (
            "patient digest",
            patient_digest(&DigestParts {
                consent: vec![(ItemId([0x01; 32]), false)],
                collections: vec![(Collection::Labs, summary_digest(&[]))],
            })
            .to_vec(),
            "93cf77e301d9d0ec7107166a2aa0d907c572ddd86d4e5ab5a22f1105c8546904",
        ),
    ];
    for (name, bytes, expected) in cases {
        let expected: String = expected.split_whitespace().collect();
        assert_eq!(hex::encode(bytes), expected, "case {name}");
    }
}

/// A digest request names each patient once, at least one and at most
/// [`MAX_DIGEST_PATIENTS`]; an answer's positions ascend within the cap.
#[test]
fn bad_digest_messages_are_typed_errors() {
    let entry = |seed: u8| {
        Value::Array(vec![
            bytes(
                medmesh_crypto::SecretIdentity::from_seed(&[seed; 32])
                    .patient_id()
                    .as_bytes(),
            ),
            bytes(&[0; 32]),
        ])
    };
    let request = |entries: Vec<Value>| to_bytes(&Value::Array(vec![uint(10), Value::Array(entries)]));
    let answer = |positions: Vec<Value>| to_bytes(&Value::Array(vec![uint(10), Value::Array(positions)]));
    assert!(Request::decode(&request(vec![entry(1), entry(2)])).is_ok());
    for (name, frame) in [
        ("no patients", request(vec![])),
        ("a patient twice", request(vec![entry(1), entry(1)])),
        ("too many patients", request(vec![entry(1); MAX_DIGEST_PATIENTS + 1])),
        (
            "short digest",
            request(vec![Value::Array(vec![bytes(patient().as_bytes()), bytes(&[0; 31])])]),
        ),
    ] {
        assert!(
            matches!(Request::decode(&frame), Err(Error::Wire { .. })),
            "case {name}"
        );
    }
    assert!(Response::decode(&answer(vec![uint(0), uint(3)])).is_ok());
    for (name, frame) in [
        ("descending", answer(vec![uint(3), uint(0)])),
        ("repeated", answer(vec![uint(3), uint(3)])),
        ("beyond the cap", answer(vec![uint(MAX_DIGEST_PATIENTS as u64)])),
        ("not a number", answer(vec![Value::Null])),
        ("too many", answer((0..=MAX_DIGEST_PATIENTS as u64).map(uint).collect())),
    ] {
        assert!(
            matches!(Response::decode(&frame), Err(Error::Wire { .. })),
            "case {name}"
        );
    }
}

/// Every bound of an outbox answer is checked: a longer failure text,
/// more debts than the cap, a peer that is no PeerId, a short item id.
#[test]
fn bad_outbox_answers_are_typed_errors() {
    let owed = |last_error: String| OwedItem {
        item: ItemId([1; 32]),
        peer: libp2p::PeerId::random(),
        since: 1,
        attempts: 1,
        next_at: 2,
        last_error,
    };
    let report = |owed: Vec<OwedItem>| {
        Response::Outbox(Box::new(OutboxReport {
            settling: false,
            owed,
            held: vec![],
        }))
    };
    let fine = report(vec![owed("x".repeat(MAX_OUTBOX_ERROR_LEN))]);
    assert_eq!(Response::decode(&fine.encode()).unwrap(), fine);
    let bad_peer = to_bytes(&Value::Array(vec![
        uint(9),
        Value::Bool(false),
        Value::Array(vec![Value::Array(vec![
            bytes(&[1; 32]),
            bytes(&[1, 2, 3]),
            uint(1),
            uint(1),
            uint(2),
            Value::Text(String::new()),
        ])]),
        Value::Array(vec![]),
    ]));
    for (name, frame) in [
        (
            "error over its cap",
            report(vec![owed("x".repeat(MAX_OUTBOX_ERROR_LEN + 1))]).encode(),
        ),
        (
            "too many debts",
            report(vec![owed(String::new()); MAX_OUTBOX_OWED + 1]).encode(),
        ),
        ("peer not a PeerId", bad_peer),
        ("short item id", hex::decode("8409f480814100").unwrap()),
        ("missing held list", hex::decode("8309f480").unwrap()),
    ] {
        assert!(
            matches!(Response::decode(&frame), Err(Error::Wire { .. })),
            "case {name}"
        );
    }
}

#[test]
fn compact_headers_round_trip_compressed_and_bombs_are_refused() {
    use medmesh_crypto::{ActorId, Change, Envelope, EpochKey, SecretIdentity};
    let patient = SecretIdentity::from_seed(&[9; 32]);
    let key = EpochKey::generate(patient.patient_id(), Collection::Labs, 0).unwrap();
    let actor = ActorId::for_author(&patient.public_bytes(), [1; 8]);
    let headers: Vec<CompactHeader> = (1..=200)
        .map(|seq| {
            let change = Change {
                bytes: b"change",
                hash: [seq as u8; 32],
                actor,
                seq,
            };
            Envelope::seal(
                (key.patient, key.collection),
                &key,
                &patient,
                None,
                change,
                1_800_000_000_000 + seq,
            )
            .unwrap()
            .signed_header()
            .compact()
        })
        .collect();
    let blob = encode_compact_headers(&headers);
    let plain: usize = headers.iter().map(|h| h.encode().len()).sum();
    // Patient, collection, key id and actor repeat in every header.
    assert!(blob.len() * 10 < plain * 7, "{} vs {plain}", blob.len());
    assert_eq!(decode_compact_headers(&blob, 200).unwrap(), headers);
    assert!(decode_compact_headers(&blob, 199).is_err(), "count must match");
    assert!(decode_compact_headers(&blob[..blob.len() / 2], 200).is_err());
    assert!(decode_compact_headers(b"not deflate at all", 1).is_err());
    assert!(decode_compact_headers(&blob, MAX_TRANSFER_HEADERS as u32 + 1).is_err());
    // 100 MB of zeros deflate to ~100 KB: refused at the inflation cap.
    let mut bomb = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut bomb, &vec![0u8; 100 * 1024 * 1024]).unwrap();
    let bomb = bomb.finish().unwrap();
    assert!(matches!(
        decode_compact_headers(&bomb, 1),
        Err(Error::Wire {
            reason: "headers inflate over the cap",
            ..
        })
    ));
}
