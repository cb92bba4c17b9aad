//! Tests of [`validate`](super::validate): every example of a supported type
//! and the Synthea bundle validate; invalid resources give exact issues; the
//! walk stops at its issue cap and its deadline.

use serde_json::json;

use super::*;

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fhir/examples");

fn read(name: &str) -> Value {
    let path = format!("{EXAMPLES}/{name}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn example_files() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(EXAMPLES)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".json"))
        .collect();
    names.sort();
    names
}

#[test]
fn every_example_of_a_supported_type_validates() {
    let mut checked = 0;
    for name in example_files() {
        let value = read(&name);
        let ty = value["resourceType"].as_str().unwrap().to_owned();
        if ty == "Bundle" {
            for (i, entry) in value["entry"].as_array().unwrap().iter().enumerate() {
                let Some(resource) = entry.get("resource") else {
                    continue;
                };
                let rt = resource["resourceType"].as_str().unwrap();
                if is_supported_type(rt) {
                    assert_eq!(validate(resource), Ok(()), "{name} entry {i} ({rt})");
                    checked += 1;
                } else {
                    assert!(validate(resource).is_err(), "{name} entry {i}: {rt} is unsupported");
                }
            }
        } else if is_supported_type(&ty) {
            assert_eq!(validate(&value), Ok(()), "{name}");
            checked += 1;
        } else {
            assert_eq!(ty, "Consent", "{name}: only Consent examples are of an unstored type");
        }
    }
    assert!(checked > 340, "checked {checked}");
}

#[test]
fn synthea_bundle_entries_all_validate() {
    let bundle = read("Bundle-synthea-Brekke496.json");
    let entries = bundle["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 319);
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(validate(&e["resource"]), Ok(()), "entry {i}");
    }
}

fn obs() -> Value {
    json!({
        "resourceType": "Observation",
        "id": "bp-1",
        "status": "final",
        "code": { "coding": [{ "system": "http://loinc.org", "code": "8867-4" }] },
        "subject": { "reference": "Patient/example" },
        "effectiveDateTime": "2020-01-01T10:00:00Z",
        "valueQuantity": { "value": 1.00, "unit": "mg" }
    })
}

fn with(mut base: Value, pointer: &str, value: Option<Value>) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let obj = base.pointer_mut(parent).unwrap().as_object_mut().unwrap();
    match value {
        Some(v) => obj.insert(key.to_owned(), v),
        None => obj.remove(key),
    };
    base
}

/// (name, resource, expected (issue code, expressions) in any order)
type Case = (&'static str, serde_json::Value, Vec<(IssueType, Vec<&'static str>)>);

#[test]
fn invalid_resources_give_exact_issues() {
    use IssueType::*;
    let cases: Vec<Case> = vec![
        (
            "missing status",
            with(obs(), "/status", None),
            vec![(Required, vec!["Observation.status"])],
        ),
        (
            "bad status code",
            with(obs(), "/status", Some(json!("done"))),
            vec![(CodeInvalid, vec!["Observation.status"])],
        ),
        (
            "status not a string",
            with(obs(), "/status", Some(json!(1))),
            vec![(Structure, vec!["Observation.status"])],
        ),
        (
            "bad dateTime",
            with(obs(), "/effectiveDateTime", Some(json!("2020-02-30"))),
            vec![(Value, vec!["Observation.effectiveDateTime"])],
        ),
        (
            "dateTime without zone",
            with(obs(), "/effectiveDateTime", Some(json!("2020-02-01T10:00:00"))),
            vec![(Value, vec!["Observation.effectiveDateTime"])],
        ),
        (
            "bad instant",
            with(obs(), "/issued", Some(json!("2020-02-01"))),
            vec![(Value, vec!["Observation.issued"])],
        ),
        (
            "bad id",
            with(obs(), "/id", Some(json!("a_b"))),
            vec![(Value, vec!["Observation.id"])],
        ),
        (
            "null value",
            with(obs(), "/subject", Some(json!(null))),
            vec![(Structure, vec!["Observation.subject"])],
        ),
        (
            "empty array",
            with(obs(), "/category", Some(json!([]))),
            vec![(Structure, vec!["Observation.category"])],
        ),
        (
            "empty object",
            with(obs(), "/subject", Some(json!({}))),
            vec![(Structure, vec!["Observation.subject"])],
        ),
        (
            "empty string",
            with(obs(), "/subject/display", Some(json!(""))),
            vec![(Value, vec!["Observation.subject.display"])],
        ),
        (
            "two value[x]",
            with(obs(), "/valueString", Some(json!("high"))),
            vec![(Structure, vec!["Observation.valueQuantity", "Observation.valueString"])],
        ),
        (
            "decimal as string",
            with(obs(), "/valueQuantity/value", Some(json!("1.0"))),
            vec![(Structure, vec!["Observation.valueQuantity.value"])],
        ),
        (
            "bad reference",
            with(obs(), "/subject/reference", Some(json!("Patient/a b"))),
            vec![(Value, vec!["Observation.subject.reference"])],
        ),
        (
            "code with whitespace",
            with(obs(), "/code/coding/0/code", Some(json!(" 8867-4"))),
            vec![(Value, vec!["Observation.code.coding[0].code"])],
        ),
        (
            "missing code",
            with(obs(), "/code", None),
            vec![(Required, vec!["Observation.code"])],
        ),
        (
            "unsupported type",
            json!({ "resourceType": "Questionnaire", "status": "active" }),
            vec![(NotSupported, vec!["resourceType"])],
        ),
        (
            "no resourceType",
            json!({ "id": "x" }),
            vec![(Required, vec!["resourceType"])],
        ),
        (
            "extension without url",
            with(obs(), "/extension", Some(json!([{ "valueString": "x" }]))),
            vec![(Required, vec!["Observation.extension[0].url"])],
        ),
        (
            "boolean as string",
            json!({ "resourceType": "Patient", "active": "true" }),
            vec![(Structure, vec!["Patient.active"])],
        ),
        (
            "bad birthDate",
            json!({ "resourceType": "Patient", "birthDate": "1970-01-01T00:00:00Z" }),
            vec![(Value, vec!["Patient.birthDate"])],
        ),
        (
            "bad gender",
            json!({ "resourceType": "Patient", "gender": "F" }),
            vec![(CodeInvalid, vec!["Patient.gender"])],
        ),
        (
            "appointment participant without status",
            json!({ "resourceType": "Appointment", "status": "booked",
                    "participant": [{ "status": "accepted" }, { "actor": { "reference": "Patient/1" } }] }),
            vec![(Required, vec!["Appointment.participant[1].status"])],
        ),
        (
            "immunization occurrence[x]",
            json!({ "resourceType": "Immunization", "status": "completed",
                    "vaccineCode": { "text": "x" }, "patient": { "reference": "Patient/1" } }),
            vec![(Required, vec!["Immunization.occurrence[x]"])],
        ),
        (
            "condition clinicalStatus binding",
            json!({ "resourceType": "Condition", "subject": { "reference": "Patient/1" },
                    "clinicalStatus": { "coding": [{
                        "system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "gone" }] } }),
            vec![(CodeInvalid, vec!["Condition.clinicalStatus.coding[0].code"])],
        ),
        (
            "positiveInt zero",
            json!({ "resourceType": "Coverage", "status": "active", "beneficiary": { "reference": "Patient/1" },
                    "payor": [{ "display": "x" }], "order": 1,
                    "extension": [{ "url": "http://x", "valueInteger": 1 }],
                    "class": [{ "type": { "text": "t" }, "value": "v" }],
                    "costToBeneficiary": [{ "valueMoney": { "value": 10 } }] ,
                    "contract": [{ "reference": "Contract/1" }], "dependent": "1",
                    "network": "n", "_network": { "id": "n1" },
                    "subrogation": false, "sequence": 0 }),
            vec![],
        ),
        (
            "contained without resourceType, nested contained",
            with(
                obs(),
                "/contained",
                Some(json!([{ "id": "a" }, { "resourceType": "Medication", "id": "m",
                              "contained": [{ "resourceType": "Substance" }] }])),
            ),
            vec![
                (Required, vec!["Observation.contained[0].resourceType"]),
                (Structure, vec!["Observation.contained[1].contained[0]"]),
            ],
        ),
        (
            "bad narrative",
            with(
                obs(),
                "/text",
                Some(json!({ "status": "made-up", "div": "plain text" })),
            ),
            vec![
                (CodeInvalid, vec!["Observation.text.status"]),
                (Value, vec!["Observation.text.div"]),
            ],
        ),
    ];
    for (name, resource, expected) in cases {
        let issues = validate(&resource).err().unwrap_or_default();
        assert!(
            issues.iter().all(|i| i.severity == super::super::Severity::Error),
            "{name}"
        );
        let mut got: Vec<(IssueType, Vec<&str>)> = issues
            .iter()
            .map(|i| (i.code, i.expression.iter().map(String::as_str).collect()))
            .collect();
        let mut expected = expected;
        got.sort_by(|a, b| a.1.cmp(&b.1));
        expected.sort_by(|a, b| a.1.cmp(&b.1));
        if name == "positiveInt zero" {
            assert_eq!(got, vec![(Value, vec!["Coverage.sequence"])], "{name}");
            continue;
        }
        assert_eq!(got, expected, "{name}");
    }
}

#[test]
fn stops_after_a_hundred_issues_and_says_so() {
    let names = |n: usize| -> Vec<Value> { (0..n).map(|_| json!({})).collect() };
    let exactly = validate(&json!({ "resourceType": "Patient", "name": names(MAX_ISSUES) })).unwrap_err();
    assert_eq!(exactly.len(), MAX_ISSUES, "no note when nothing was cut");
    let issues = validate(&json!({ "resourceType": "Patient", "name": names(5_000) })).unwrap_err();
    assert_eq!(issues.len(), MAX_ISSUES + 1);
    assert_eq!(issues.last(), Some(&Issue::truncation()));
    assert_eq!(issues[MAX_ISSUES - 1].expression, ["Patient.name[99]"]);
}

#[test]
fn stops_at_its_deadline() {
    let names: Vec<Value> = (0..5_000).map(|_| json!({ "family": "x" })).collect();
    let patient = json!({ "resourceType": "Patient", "name": names });
    assert_eq!(validate(&patient), Ok(()));
    let issues = validate_until(&patient, Instant::now()).unwrap_err();
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert_eq!(issues[0].code, IssueType::TooCostly);
    assert_eq!(issues[0].severity, super::super::Severity::Error);
}

#[test]
fn gathers_all_issues() {
    let bad = json!({ "resourceType": "Observation", "id": "", "valueString": "x", "valueBoolean": true,
                      "subject": null, "category": [] });
    let issues = validate(&bad).unwrap_err();
    let codes: Vec<&str> = issues.iter().map(|i| i.code.as_str()).collect();
    assert_eq!(codes.len(), 6, "{issues:?}");
    for code in ["value", "structure", "required"] {
        assert!(codes.contains(&code), "{code}: {codes:?}");
    }
}

#[test]
fn diagnostics_do_not_echo_values() {
    let marker = "ZZMARKER Smith";
    let cases = [
        json!({ "resourceType": "Patient", "birthDate": marker }),
        json!({ "resourceType": "Patient", "id": marker }),
        json!({ "resourceType": "Patient", "active": marker }),
        json!({ "resourceType": "Observation", "status": "final", "code": { "text": marker },
                "subject": { "reference": marker } }),
        json!({ "resourceType": marker }),
    ];
    for case in cases {
        let issues = validate(&case).unwrap_err();
        for issue in issues {
            assert!(!issue.diagnostics.contains("MARKER"), "{}", issue.diagnostics);
        }
    }
}

#[test]
fn primitive_extension_nulls_and_unknown_elements() {
    let ok = json!({ "resourceType": "Patient",
        "name": [{ "given": ["Bob", null], "_given": [null, { "extension": [{ "url": "http://x", "valueString": "y" }] }] }],
        "_birthDate": { "extension": [{ "url": "http://x", "valueDateTime": "1970-01-01T10:00:00+01:00" }] },
        "someFutureElement": { "anything": "goes" },
        "deceasedBoolean": false,
        "multipleBirthInteger": 2 });
    assert_eq!(validate(&ok), Ok(()));
    let bad = json!({ "resourceType": "Patient", "name": [{ "given": ["Bob", null] }] });
    let issues = validate(&bad).unwrap_err();
    assert_eq!(issues[0].expression, ["Patient.name[0].given[1]"]);
    // Status present only as a primitive extension still counts as present.
    let ext_only = json!({ "resourceType": "Observation", "code": { "text": "x" },
        "_status": { "extension": [{ "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                                       "valueCode": "unknown" }] } });
    assert_eq!(validate(&ext_only), Ok(()));
}
