//! FHIR R4 Patient compartment, patient linking and collection routing (DESIGN §3).
//!
//! The compartment table is FHIR R4's `CompartmentDefinition/patient`
//! (<http://hl7.org/fhir/R4/compartmentdefinition-patient.html>): for each resource
//! type, the search parameters that put it in a patient's compartment, translated to
//! the element paths those parameters search.

use serde_json::Value;

/// The seven collections a patient's record is split into (defined with the
/// grants that name them).
pub use medmesh_crypto::Collection;

/// R4 Patient compartment: resource type → element paths (dotted, through arrays)
/// whose references put a resource in a patient's compartment. Sorted by type. The
/// first path is the resource's own patient link (`subject`/`patient`) where it has one.
const COMPARTMENT: &[(&str, &[&str])] = &[
    ("Account", &["subject"]),
    ("AdverseEvent", &["subject"]),
    ("AllergyIntolerance", &["patient", "recorder", "asserter"]),
    ("Appointment", &["participant.actor"]),
    ("AppointmentResponse", &["actor"]),
    ("AuditEvent", &["entity.what", "agent.who"]),
    ("Basic", &["subject", "author"]),
    ("BodyStructure", &["patient"]),
    ("CarePlan", &["subject", "activity.detail.performer"]),
    ("CareTeam", &["subject", "participant.member"]),
    ("ChargeItem", &["subject"]),
    ("Claim", &["patient", "payee.party"]),
    ("ClaimResponse", &["patient"]),
    ("ClinicalImpression", &["subject"]),
    ("Communication", &["subject", "sender", "recipient"]),
    ("CommunicationRequest", &["subject", "sender", "recipient", "requester"]),
    ("Composition", &["subject", "author", "attester.party"]),
    ("Condition", &["subject", "asserter"]),
    ("Consent", &["patient"]),
    ("Coverage", &["beneficiary", "subscriber", "policyHolder", "payor"]),
    ("CoverageEligibilityRequest", &["patient"]),
    ("CoverageEligibilityResponse", &["patient"]),
    ("DetectedIssue", &["patient"]),
    ("DeviceRequest", &["subject", "performer"]),
    ("DeviceUseStatement", &["subject"]),
    ("DiagnosticReport", &["subject"]),
    ("DocumentManifest", &["subject", "author", "recipient"]),
    ("DocumentReference", &["subject", "author"]),
    ("Encounter", &["subject"]),
    ("EnrollmentRequest", &["candidate"]),
    ("EpisodeOfCare", &["patient"]),
    ("ExplanationOfBenefit", &["patient", "payee.party"]),
    ("FamilyMemberHistory", &["patient"]),
    ("Flag", &["subject"]),
    ("Goal", &["subject"]),
    ("Group", &["member.entity"]),
    ("ImagingStudy", &["subject"]),
    ("Immunization", &["patient"]),
    ("ImmunizationEvaluation", &["patient"]),
    ("ImmunizationRecommendation", &["patient"]),
    ("Invoice", &["subject", "recipient"]),
    ("List", &["subject", "source"]),
    ("MeasureReport", &["subject"]),
    ("Media", &["subject"]),
    ("MedicationAdministration", &["subject", "performer.actor"]),
    ("MedicationDispense", &["subject", "receiver"]),
    ("MedicationRequest", &["subject"]),
    ("MedicationStatement", &["subject"]),
    ("MolecularSequence", &["patient"]),
    ("NutritionOrder", &["patient"]),
    ("Observation", &["subject", "performer"]),
    ("Patient", &["link.other"]),
    ("Person", &["link.target"]),
    ("Procedure", &["subject", "performer.actor"]),
    ("Provenance", &["target"]),
    ("QuestionnaireResponse", &["subject", "author"]),
    ("RelatedPerson", &["patient"]),
    ("RequestGroup", &["subject", "action.participant"]),
    ("ResearchSubject", &["individual"]),
    ("RiskAssessment", &["subject"]),
    ("Schedule", &["actor"]),
    ("ServiceRequest", &["subject", "performer"]),
    ("Specimen", &["subject"]),
    ("SupplyDelivery", &["patient"]),
    ("SupplyRequest", &["requester"]),
    ("VisionPrescription", &["patient"]),
];

/// Resources outside the compartment that a patient's resources reference; stored in
/// that patient's `core` collection so references do not dangle after sync.
const DIRECTORY_TYPES: &[&str] = &[
    "Device",
    "Location",
    "Medication",
    "Organization",
    "Practitioner",
    "PractitionerRole",
];

/// Types stored even though they are in neither list (DESIGN §3 routes them).
const OTHER_TYPES: &[&str] = &["Binary"];

/// Security-label systems whose codes mark restricted sensitivity.
const ACT_CODE_SYSTEMS: &[&str] = &[
    "http://terminology.hl7.org/CodeSystem/v3-ActCode",
    "http://hl7.org/fhir/v3/ActCode",
];
const CONFIDENTIALITY_SYSTEMS: &[&str] = &[
    "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
    "http://hl7.org/fhir/v3/Confidentiality",
];
/// v3 ActCode information-sensitivity codes that send a resource to `sensitive`:
/// substance use (ETH and its *UD children), psychiatry / behavioural health,
/// sexual and reproductive health, sexual assault / domestic violence, STD, HIV.
const SENSITIVE_ACT_CODES: &[&str] = &[
    "ALCUD", "BH", "COCAUD", "DRGUD", "ETH", "ETHUD", "HIV", "MH", "OPIOIDUD", "PSY", "PSYTHPN", "SDV", "SEX", "STD",
    "SUD",
];
/// v3 Confidentiality codes that send a resource to `sensitive`: restricted, very restricted.
const SENSITIVE_CONFIDENTIALITY: &[&str] = &["R", "V"];

/// Identifier system that links a Patient to a medmesh patient's did:key.
pub const DID_SYSTEM: &str = "urn:ietf:rfc:3986";

/// Resource types of FHIR R4's Patient compartment.
pub fn compartment_types() -> impl Iterator<Item = &'static str> {
    COMPARTMENT.iter().map(|(t, _)| *t)
}

/// Every resource type a node stores: the compartment, the directory types, Binary.
pub fn supported_types() -> Vec<&'static str> {
    let mut v: Vec<&str> = compartment_types()
        .chain(DIRECTORY_TYPES.iter().copied())
        .chain(OTHER_TYPES.iter().copied())
        .collect();
    v.sort_unstable();
    v
}

/// Whether a type is supported (see [`supported_types`]).
pub fn is_supported_type(t: &str) -> bool {
    in_compartment(t) || is_directory_type(t) || OTHER_TYPES.contains(&t)
}

/// Whether the type is in FHIR R4's Patient compartment.
pub fn in_compartment(t: &str) -> bool {
    compartment_paths(t).is_some()
}

/// Whether the type is a directory resource (Organization, Practitioner, …).
pub fn is_directory_type(t: &str) -> bool {
    DIRECTORY_TYPES.contains(&t)
}

/// The element paths that put a resource of this type in the Patient compartment.
pub fn compartment_paths(t: &str) -> Option<&'static [&'static str]> {
    COMPARTMENT
        .binary_search_by(|(ct, _)| (*ct).cmp(t))
        .ok()
        .and_then(|i| COMPARTMENT.get(i))
        .map(|(_, p)| *p)
}

/// Collects the values at a dotted path, flattening arrays at every step.
pub(crate) fn values_at<'a>(v: &'a Value, path: &str) -> Vec<&'a Value> {
    let mut current: Vec<&Value> = vec![v];
    for step in path.split('.') {
        let mut next = Vec::new();
        for c in current {
            match c.get(step) {
                Some(Value::Array(items)) => next.extend(items.iter()),
                Some(x) => next.push(x),
                None => {}
            }
        }
        current = next;
    }
    current
        .into_iter()
        .flat_map(|v| match v {
            Value::Array(items) => items.iter().collect(),
            other => vec![other],
        })
        .collect()
}

/// Every `reference` string at the compartment paths of the resource's type, whatever
/// it points to (`urn:uuid:` references of a transaction included), in table order.
pub fn compartment_references(resource: &Value) -> Vec<String> {
    let Some(t) = resource.get("resourceType").and_then(Value::as_str) else {
        return Vec::new();
    };
    let Some(paths) = compartment_paths(t) else {
        return Vec::new();
    };
    let mut out: Vec<String> = Vec::new();
    for p in paths {
        for v in values_at(resource, p) {
            if let Some(r) = v.get("reference").and_then(Value::as_str)
                && !out.iter().any(|o| o == r)
            {
                out.push(r.to_owned());
            }
        }
    }
    out
}

/// The `Patient/{id}` a reference points to, if it is a (relative or absolute)
/// reference to a Patient, without any `/_history/…` suffix.
pub fn patient_of_reference(reference: &str) -> Option<String> {
    let path = reference.split(['?', '#']).next()?;
    let segs: Vec<&str> = path.split('/').collect();
    // Find the last "Patient/{id}" pair (absolute URLs have a base before it).
    let i = segs.iter().rposition(|s| *s == "Patient")?;
    let id = segs.get(i + 1)?;
    let rest = &segs[i + 2..];
    if id.is_empty() || !(rest.is_empty() || rest.first() == Some(&"_history")) {
        return None;
    }
    Some(format!("Patient/{id}"))
}

/// The Patient references that put this resource in a patient's compartment, as
/// `Patient/{id}` strings, the resource's own patient (`subject`/`patient`) first.
/// A Patient resource yields itself first, then the patients it links to.
pub fn patient_references(resource: &Value) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    if resource.get("resourceType").and_then(Value::as_str) == Some("Patient")
        && let Some(id) = resource.get("id").and_then(Value::as_str)
    {
        out.push(format!("Patient/{id}"));
    }
    for r in compartment_references(resource) {
        if let Some(p) = patient_of_reference(&r)
            && !out.contains(&p)
        {
            out.push(p);
        }
    }
    out
}

/// The did:key a Patient resource is linked to: the value of an `identifier` whose
/// system is `urn:ietf:rfc:3986` and whose value starts with `did:key:`.
pub fn linked_did(patient_resource: &Value) -> Option<String> {
    if patient_resource.get("resourceType").and_then(Value::as_str) != Some("Patient") {
        return None;
    }
    patient_resource
        .get("identifier")?
        .as_array()?
        .iter()
        .filter(|i| i.get("system").and_then(Value::as_str) == Some(DID_SYSTEM))
        .filter_map(|i| i.get("value").and_then(Value::as_str))
        .find(|v| v.starts_with("did:key:") && v.len() > "did:key:".len())
        .map(str::to_owned)
}

/// Whether `meta.security` carries a restricted-sensitivity label. Codes are matched
/// with their system, or without one (a label without a system is treated as the
/// v3 code it spells: routing errs on the side of `sensitive`).
pub fn is_sensitive(resource: &Value) -> bool {
    let Some(labels) = resource.pointer("/meta/security").and_then(Value::as_array) else {
        return false;
    };
    labels.iter().any(|label| {
        let code = label.get("code").and_then(Value::as_str).unwrap_or("");
        let system = label.get("system").and_then(Value::as_str);
        let act = SENSITIVE_ACT_CODES.contains(&code) && system.is_none_or(|s| ACT_CODE_SYSTEMS.contains(&s));
        let conf =
            SENSITIVE_CONFIDENTIALITY.contains(&code) && system.is_none_or(|s| CONFIDENTIALITY_SYSTEMS.contains(&s));
        act || conf
    })
}

/// The collection a resource belongs to (DESIGN §3): `sensitive` when labelled so,
/// else by type; other compartment types, directory types and anything unknown go
/// to `core`.
pub fn collection_of(resource: &Value) -> Collection {
    if is_sensitive(resource) {
        return Collection::Sensitive;
    }
    let t = resource.get("resourceType").and_then(Value::as_str).unwrap_or("");
    collection_of_type(t)
}

/// The collection for a resource type when no security label applies.
pub fn collection_of_type(t: &str) -> Collection {
    match t {
        "MedicationRequest" | "MedicationStatement" | "MedicationDispense" => Collection::Medications,
        "Observation" | "DiagnosticReport" | "Specimen" => Collection::Labs,
        "DocumentReference" | "Binary" => Collection::Documents,
        "Appointment" => Collection::Scheduling,
        "Claim" | "ExplanationOfBenefit" | "Coverage" => Collection::Billing,
        _ => Collection::Core,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_sorted() {
        assert!(COMPARTMENT.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(DIRECTORY_TYPES.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn collection_names_round_trip() {
        for c in Collection::ALL {
            assert_eq!(c.as_str().parse::<Collection>().unwrap(), c);
        }
        assert!("all".parse::<Collection>().is_err());
    }

    #[test]
    fn references() {
        assert_eq!(patient_of_reference("Patient/123"), Some("Patient/123".into()));
        assert_eq!(
            patient_of_reference("https://x.org/fhir/Patient/123/_history/2"),
            Some("Patient/123".into())
        );
        assert_eq!(patient_of_reference("Practitioner/1"), None);
        assert_eq!(patient_of_reference("urn:uuid:abc"), None);
        assert_eq!(patient_of_reference("Patient/1/Observation"), None);
    }

    #[test]
    fn routing() {
        assert_eq!(collection_of(&json!({"resourceType":"Condition"})), Collection::Core);
        assert_eq!(collection_of(&json!({"resourceType":"Goal"})), Collection::Core);
        assert_eq!(collection_of(&json!({"resourceType":"Organization"})), Collection::Core);
        assert_eq!(collection_of(&json!({"resourceType":"Coverage"})), Collection::Billing);
        assert_eq!(collection_of(&json!({"resourceType":"Binary"})), Collection::Documents);
        let hiv = json!({"resourceType":"Observation","meta":{"security":[
            {"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"HIV"}]}});
        assert_eq!(collection_of(&hiv), Collection::Sensitive);
        let r = json!({"resourceType":"Condition","meta":{"security":[
            {"system":"http://terminology.hl7.org/CodeSystem/v3-Confidentiality","code":"R"}]}});
        assert_eq!(collection_of(&r), Collection::Sensitive);
        let n = json!({"resourceType":"Condition","meta":{"security":[
            {"system":"http://terminology.hl7.org/CodeSystem/v3-Confidentiality","code":"N"}]}});
        assert_eq!(collection_of(&n), Collection::Core);
        // "R" in another system is not restricted confidentiality.
        let other = json!({"resourceType":"Condition","meta":{"security":[
            {"system":"http://example.org/labels","code":"R"}]}});
        assert_eq!(collection_of(&other), Collection::Core);
    }

    #[test]
    fn did_link() {
        let p = json!({"resourceType":"Patient","id":"p","identifier":[
            {"system":"urn:oid:1.2.3","value":"123"},
            {"system":"urn:ietf:rfc:3986","value":"did:key:z6MkExample"}]});
        assert_eq!(linked_did(&p).as_deref(), Some("did:key:z6MkExample"));
        let none = json!({"resourceType":"Patient","identifier":[
            {"system":"urn:ietf:rfc:3986","value":"urn:uuid:1"}]});
        assert_eq!(linked_did(&none), None);
    }
}
