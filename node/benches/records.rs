//! Record-model benchmarks: a 10k-change collection of ~1 KiB Observations applied
//! in one batch (DESIGN §3: "as one batch 0.5 s"), loaded from a snapshot, rendered.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, criterion_group, criterion_main};
use medmesh_node::records::{DecodedChange, RecordDoc, actor_id};
use serde_json::{Value, json};

const CHANGES: usize = 10_000;

/// An Observation of roughly 1 KiB of JSON.
fn observation(i: usize) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "vital-signs", "display": "Vital Signs"}], "text": "Vital Signs"}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9",
            "display": "Blood pressure panel with all children optional"}], "text": "Blood pressure systolic & diastolic"},
        "subject": {"reference": "Patient/example"},
        "effectiveDateTime": format!("2024-{:02}-{:02}T10:{:02}:00Z", 1 + i % 12, 1 + i % 28, i % 60),
        "performer": [{"reference": "Practitioner/example"}],
        "interpretation": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
            "code": "L", "display": "low"}], "text": "Below low normal"}],
        "bodySite": {"coding": [{"system": "http://snomed.info/sct", "code": "368209003", "display": "Right arm"}]},
        "component": [
            {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6", "display": "Systolic blood pressure"}]},
             "valueQuantity": {"value": serde_json::from_str::<Value>(&format!("{}.0", 100 + i % 50)).unwrap(),
                "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}},
            {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4", "display": "Diastolic blood pressure"}]},
             "valueQuantity": {"value": 60 + i % 30, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}
        ]
    })
}

fn build() -> (RecordDoc, Vec<Vec<u8>>) {
    let actor = actor_id(&[1; 32], [0; 8]);
    let mut doc = RecordDoc::new();
    let mut changes = Vec::with_capacity(CHANGES);
    for i in 0..CHANGES {
        let w = doc
            .create(&actor, 1_700_000_000_000 + i as i64, &format!("o{i}"), &observation(i))
            .unwrap();
        changes.push(w.change);
    }
    (doc, changes)
}

fn benches(c: &mut Criterion) {
    let (doc, changes) = build();
    let json_bytes = serde_json::to_vec(&observation(0)).unwrap().len();
    let change_bytes: usize = changes.iter().map(Vec::len).sum();
    let snapshot = doc.save();
    eprintln!(
        "records bench: {CHANGES} changes, resource JSON ~{json_bytes} B, changes {change_bytes} B total, snapshot {} B",
        snapshot.len()
    );

    let mut g = c.benchmark_group("records");
    g.sample_size(10);
    g.bench_function("apply_10k_changes_one_batch", |b| {
        b.iter_batched(
            || {
                changes
                    .iter()
                    .map(|c| DecodedChange::from_bytes(c).unwrap())
                    .collect::<Vec<_>>()
            },
            |decoded| {
                let mut peer = RecordDoc::new();
                let report = peer.apply_changes(decoded);
                assert_eq!(report.applied.len(), CHANGES);
                peer
            },
            criterion::BatchSize::LargeInput,
        );
    });
    g.bench_function("decode_10k_changes", |b| {
        b.iter(|| changes.iter().filter(|c| DecodedChange::from_bytes(c).is_ok()).count());
    });
    g.bench_function("load_snapshot_10k", |b| {
        b.iter(|| RecordDoc::load(&snapshot).unwrap());
    });
    g.bench_function("render_all_10k_cold", |b| {
        b.iter_batched(
            || RecordDoc::load(&snapshot).unwrap(),
            |d| d.resources().unwrap().len(),
            criterion::BatchSize::LargeInput,
        );
    });
    let warm = RecordDoc::load(&snapshot).unwrap();
    warm.resources().unwrap();
    g.bench_function("render_all_10k_cached", |b| {
        b.iter(|| warm.resources().unwrap().len());
    });
    g.finish();

    let mut g = c.benchmark_group("records_write");
    let mut big = RecordDoc::load(&snapshot).unwrap();
    let writer = actor_id(&[2; 32], [0; 8]);
    let mut n = 0usize;
    g.bench_function("create_on_10k_doc", |b| {
        b.iter(|| {
            n += 1;
            big.create(&writer, 1_800_000_000_000, &format!("new{n}"), &observation(n))
                .unwrap()
        });
    });
    g.finish();
}

criterion_group!(records, benches);
criterion_main!(records);
