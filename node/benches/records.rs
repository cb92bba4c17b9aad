//! Record-model benchmarks, printed as figures: a 10k-change collection of ~1 KiB
//! Observations applied in one batch (with its phases), loaded from a snapshot,
//! rendered; a cached read vs a HashMap + serde_json. Run with
//! `cargo bench -p medmesh-node --bench records`; `MEDMESH_BENCH_CHANGES` scales it.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use medmesh_node::records::{DecodedChange, RecordDoc, actor_id};
use serde_json::{Value, json};

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

fn build(n: usize) -> (RecordDoc, Vec<Vec<u8>>) {
    let actor = actor_id(&[1; 32], [0; 8]);
    let mut doc = RecordDoc::new();
    let mut changes = Vec::with_capacity(n);
    for i in 0..n {
        let w = doc
            .create(&actor, 1_700_000_000_000 + i as i64, &format!("o{i}"), &observation(i))
            .unwrap();
        changes.push(w.change);
    }
    (doc, changes)
}

/// Median of `runs` timings of `f`.
fn median<T>(runs: usize, mut f: impl FnMut() -> T) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(f());
            start.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:>9.1} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("MEDMESH_BENCH_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 300 } else { 10_000 });
    let runs = if quick { 1 } else { 5 };
    let started = Instant::now();
    let (doc, changes) = build(n);
    let built = started.elapsed();
    let json_bytes = serde_json::to_vec(&observation(0)).unwrap().len();
    let change_bytes: usize = changes.iter().map(Vec::len).sum();
    let snapshot = doc.save();
    println!(
        "records: {n} changes, resource JSON {json_bytes} B, changes {change_bytes} B total, snapshot {} B",
        snapshot.len()
    );

    println!(
        "  create {n} resources, one change each {}  ({:.0} µs per create)",
        ms(built),
        built.as_secs_f64() * 1e6 / n as f64
    );
    let decode = || {
        changes
            .iter()
            .map(|c| DecodedChange::from_bytes(c).unwrap())
            .collect::<Vec<_>>()
    };
    println!("  decode {n} changes                    {}", ms(median(runs, decode)));
    let genesis = RecordDoc::new().save();
    let raw: Vec<automerge::Change> = changes
        .iter()
        .map(|c| automerge::Change::from_bytes(c.clone()).unwrap())
        .collect();
    let t = median(runs, || {
        let mut am = automerge::Automerge::load(&genesis).unwrap();
        am.apply_changes(raw.clone()).unwrap();
        am
    });
    println!("  automerge apply_changes alone         {}", ms(t));
    // Whether one big call matters: Automerge 0.12 batches the op splices of a call.
    let chunk = 1000;
    let t = median(runs, || {
        let mut am = automerge::Automerge::load(&genesis).unwrap();
        for c in raw.chunks(chunk) {
            am.apply_changes(c.to_vec()).unwrap();
        }
        am
    });
    println!("  automerge apply_changes, {chunk} a call {}", ms(t));
    let t = median(runs, || DecodedChange::decode_all(&changes));
    println!("  decode {n} changes on every core        {}", ms(t));
    let apply = |decoded: Vec<DecodedChange>| {
        let mut peer = RecordDoc::new();
        let report = peer.apply_changes(decoded);
        assert_eq!(report.applied.len(), n);
        peer
    };
    let serial = median(runs, || apply(decode()));
    println!("  decode (one core) + RecordDoc::apply_changes {}", ms(serial));
    let t = median(runs, || {
        apply(
            DecodedChange::decode_all(&changes)
                .into_iter()
                .map(|c| c.unwrap())
                .collect(),
        )
    });
    println!(
        "  decode (every core) + RecordDoc::apply_changes {}  (target well under 1 s; {:.0}% of one core)",
        ms(t),
        100.0 * t.as_secs_f64() / serial.as_secs_f64()
    );
    if std::env::var_os("MEDMESH_BENCH_APPLY_ONLY").is_some() {
        return;
    }
    let t = median(runs, || automerge::Automerge::load(&snapshot).unwrap());
    println!("  automerge load of the snapshot        {}", ms(t));
    let t = median(runs, || {
        automerge::Automerge::load_with_options(
            &snapshot,
            automerge::LoadOptions::new().verification_mode(automerge::VerificationMode::DontCheck),
        )
        .unwrap()
    });
    println!("  automerge load, heads not verified    {}", ms(t));
    let am = automerge::Automerge::load(&snapshot).unwrap();
    let t = median(runs, || am.get_changes(&[]).len());
    println!("  automerge get_changes(all)            {}", ms(t));
    let t = median(runs, || am.clone());
    println!("  automerge clone of the doc            {}", ms(t));
    let t = median(runs, || RecordDoc::load(&snapshot).unwrap());
    println!("  RecordDoc::load (checks every change) {}", ms(t));
    let local = doc.save_local();
    let t = median(runs, || RecordDoc::load_local(&local).unwrap());
    println!(
        "  RecordDoc::load_local (own snapshot)  {}  ({} B with the change index)",
        ms(t),
        local.len()
    );
    let t = median(runs, || doc.save());
    println!("  RecordDoc::save                       {}", ms(t));
    let t = median(runs, || doc.save_local());
    println!("  RecordDoc::save_local                 {}", ms(t));

    // Cached read vs HashMap<String, Value> lookup + serde_json::to_vec.
    let warm = RecordDoc::load(&snapshot).unwrap();
    let t = median(1, || warm.resources().unwrap().len());
    println!("  render all {n}, cold                  {}", ms(t));
    let t = median(runs, || warm.resources().unwrap().len());
    println!("  serve all {n} from the render cache   {}", ms(t));
    let keys: Vec<String> = (0..n).map(|i| format!("Observation/o{i}")).collect();
    let map: HashMap<String, Value> = keys
        .iter()
        .map(|k| (k.clone(), warm.read(k).unwrap().json.clone()))
        .collect();
    let reads = if quick { 1_000 } else { 200_000 };
    let t_doc = median(runs, || {
        let mut total = 0;
        for i in 0..reads {
            total += warm.read(&keys[i % n]).unwrap().bytes.len();
        }
        total
    });
    let t_map = median(runs, || {
        let mut total = 0;
        for i in 0..reads {
            total += serde_json::to_vec(map.get(&keys[i % n]).unwrap()).unwrap().len();
        }
        total
    });
    println!(
        "  cached read {:>7.0} ns vs HashMap+serde_json {:>7.0} ns: {:.2}x (target <= 2x)",
        t_doc.as_nanos() as f64 / reads as f64,
        t_map.as_nanos() as f64 / reads as f64,
        t_doc.as_secs_f64() / t_map.as_secs_f64()
    );
}
