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

/// A Patient-compartment reference of a resource that points to a Patient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatientLink {
    /// The reference as written.
    pub reference: String,
    /// The resource key it names on this server (`Patient/{id}`, without any
    /// `/_history/…`), when it is a relative reference; an absolute reference
    /// names another server's Patient.
    pub key: Option<String>,
}

/// The references that put this resource in a Patient's compartment and point to a
/// Patient (DESIGN §3), in table order. Empty for a Patient itself, which is filed
/// by its did:key identifier, not by the patients it links to.
pub fn patient_links(resource: &Value) -> Vec<PatientLink> {
    if resource.get("resourceType").and_then(Value::as_str) == Some("Patient") {
        return Vec::new();
    }
    compartment_references(resource)
        .into_iter()
        .filter_map(|reference| {
            let key = patient_of_reference(&reference)?;
            let relative = !reference.contains(':');
            Some(PatientLink {
                key: relative.then_some(key),
                reference,
            })
        })
        .collect()
}

/// Why a resource's Patient-compartment references do not name exactly one patient.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatientLinkError {
    /// A reference names a Patient that is neither written with the resource nor held.
    #[error("references {reference}, which is not a patient known here")]
    Unknown {
        /// The reference as written.
        reference: String,
    },
    /// The references name two different patients.
    #[error("references two different patients ({first} and {second})")]
    Several {
        /// A reference to the first patient.
        first: String,
        /// A reference to another patient.
        second: String,
    },
}

/// The one patient a resource's [`patient_links`] name, given what each resolved to
/// (`None`: to no patient known here); `Ok(None)` when there are no links. A resource
/// is filed under a patient only through this: never a guess, never a default.
///
/// # Errors
/// [`PatientLinkError`].
pub fn one_patient<P: PartialEq>(
    resolved: impl IntoIterator<Item = (PatientLink, Option<P>)>,
) -> Result<Option<P>, PatientLinkError> {
    let mut found: Option<(String, P)> = None;
    for (link, patient) in resolved {
        let Some(patient) = patient else {
            return Err(PatientLinkError::Unknown {
                reference: link.reference,
            });
        };
        match &found {
            None => found = Some((link.reference, patient)),
            Some((first, p)) if *p != patient => {
                return Err(PatientLinkError::Several {
                    first: first.clone(),
                    second: link.reference,
                });
            }
            Some(_) => {}
        }
    }
    Ok(found.map(|(_, p)| p))
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

/// Whether resources of this type may live in a `collection` document (DESIGN §3):
/// the collection its type routes to ([`collection_of_type`]: directory and other
/// compartment types to `core`), or `sensitive`, which takes any type.
pub fn type_belongs(resource_type: &str, collection: Collection) -> bool {
    collection == Collection::Sensitive || collection_of_type(resource_type) == collection
}

/// Whether `resource`, read from `patient`'s `collection` document, is part of that
/// record: its type may live there ([`type_belongs`]) and, if it is a Patient, it
/// links `patient`'s did:key. A peer that can write a document can write anything
/// into it; what breaks these rules stays in the history, served by no replica.
pub fn belongs(resource: &Value, patient: &medmesh_crypto::PatientId, collection: Collection) -> bool {
    let t = resource.get("resourceType").and_then(Value::as_str).unwrap_or_default();
    belongs_as(t, resource, patient, collection)
}

/// [`belongs`] for a resource whose type is known already (a rendered
/// resource's key names it): listing a document asks this of every resource,
/// and looking `resourceType` up in the JSON cost more than the rest of it.
pub fn belongs_as(
    resource_type: &str,
    resource: &Value,
    patient: &medmesh_crypto::PatientId,
    collection: Collection,
) -> bool {
    type_belongs(resource_type, collection)
        && (resource_type != "Patient"
            || linked_did(resource)
                .and_then(|did| did.parse::<medmesh_crypto::PatientId>().ok())
                .is_some_and(|did| did == *patient))
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
    fn patient_links_name_one_patient() {
        let obs = json!({"resourceType":"Observation","subject":{"reference":"Patient/a/_history/2"},
            "performer":[{"reference":"Practitioner/x"},{"reference":"https://other.org/fhir/Patient/b"}]});
        let links = patient_links(&obs);
        assert_eq!(
            links,
            [
                PatientLink {
                    reference: "Patient/a/_history/2".into(),
                    key: Some("Patient/a".into())
                },
                PatientLink {
                    reference: "https://other.org/fhir/Patient/b".into(),
                    key: None
                },
            ]
        );
        let resolve = |known: &[(&str, u8)]| {
            one_patient(links.iter().map(|l| {
                let p = l
                    .key
                    .as_deref()
                    .and_then(|k| known.iter().find(|(kk, _)| *kk == k).map(|(_, p)| *p));
                (l.clone(), p)
            }))
        };
        assert!(
            matches!(resolve(&[("Patient/a", 1)]), Err(PatientLinkError::Unknown { reference }) if reference.starts_with("https:"))
        );
        let two = json!({"resourceType":"Observation","subject":{"reference":"Patient/a"},
            "performer":[{"reference":"Patient/b"}]});
        let links = patient_links(&two);
        let resolved = |pa: u8, pb: u8| one_patient(links.iter().cloned().zip([Some(pa), Some(pb)]));
        assert_eq!(resolved(1, 1), Ok(Some(1)));
        assert!(matches!(resolved(1, 2), Err(PatientLinkError::Several { .. })));
        assert_eq!(one_patient::<u8>([]), Ok(None));
        assert!(
            patient_links(&json!({"resourceType":"Patient","link":[{"other":{"reference":"Patient/b"}}]})).is_empty()
        );
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
