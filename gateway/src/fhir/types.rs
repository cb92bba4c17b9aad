//! The table of supported resource types: FHIR R4 required elements (min cardinality 1),
//! required-binding value sets, and which common search parameters each type has.
//!
//! Taken from the FHIR R4 (4.0.1) resource definitions. Only elements whose minimum
//! cardinality is 1 in the base resource (or in a backbone element that is present) and
//! `code`/`CodeableConcept` elements with a *required* binding are listed.

/// Every resource type the gateway stores (DESIGN §3): the R4 Patient-compartment types
/// medmesh serves plus the non-compartment types patients' resources reference.
pub const SUPPORTED_TYPES: &[&str] = &[
    "Patient",
    "AllergyIntolerance",
    "Condition",
    "Procedure",
    "Immunization",
    "Encounter",
    "CarePlan",
    "FamilyMemberHistory",
    "MedicationRequest",
    "MedicationStatement",
    "MedicationDispense",
    "MedicationAdministration",
    "Observation",
    "DiagnosticReport",
    "Specimen",
    "DocumentReference",
    "Binary",
    "Appointment",
    "AppointmentResponse",
    "Claim",
    "ClaimResponse",
    "ExplanationOfBenefit",
    "Coverage",
    "CareTeam",
    "Goal",
    "ServiceRequest",
    "Provenance",
    "ImagingStudy",
    "DeviceRequest",
    "DeviceUseStatement",
    "NutritionOrder",
    "RiskAssessment",
    "QuestionnaireResponse",
    "Communication",
    "CommunicationRequest",
    "Flag",
    "List",
    "Composition",
    "EpisodeOfCare",
    "RelatedPerson",
    "Task",
    "AdverseEvent",
    "BodyStructure",
    "ClinicalImpression",
    "DetectedIssue",
    "ImmunizationRecommendation",
    "Media",
    "Account",
    "ChargeItem",
    "Invoice",
    "SupplyDelivery",
    "SupplyRequest",
    "VisionPrescription",
    "ResearchSubject",
    "Organization",
    "Practitioner",
    "PractitionerRole",
    "Location",
    "Medication",
    "Device",
];

/// Types the gateway serves read-only from node state (grants, the audit log), not stored.
pub const READ_ONLY_TYPES: &[&str] = &["Consent", "AuditEvent"];

/// A validation rule on a dot-separated element path, evaluated through arrays.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Rule {
    /// The element (last segment; `name[x]` for a choice) must be present in every
    /// instance of its parent.
    Req(&'static str),
    /// Required element with a required binding: present, and a code of the set.
    ReqCode(&'static str, &'static [&'static str]),
    /// Optional `code` element (or array of codes) with a required binding.
    Code(&'static str, &'static [&'static str]),
    /// A `CodeableConcept` with a required binding: its codings of `system` must use
    /// a code of the set.
    Coding(&'static str, &'static str, &'static [&'static str]),
}

/// Search parameter bits (see [`TypeDef::search`]).
pub(crate) const P: u8 = 1; // patient
pub(crate) const S: u8 = 2; // subject
pub(crate) const C: u8 = 4; // code
pub(crate) const D: u8 = 8; // date
pub(crate) const T: u8 = 16; // status
pub(crate) const K: u8 = 32; // category

/// One supported resource type.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TypeDef {
    /// The resource type name.
    pub(crate) name: &'static str,
    /// Which of patient/subject/code/date/status/category it can be searched by.
    pub(crate) search: u8,
    /// Required elements and bindings.
    pub(crate) rules: &'static [Rule],
}

use Rule::{Code, Coding, Req, ReqCode};

const OBS_STATUS: &[&str] = &[
    "registered",
    "preliminary",
    "final",
    "amended",
    "corrected",
    "cancelled",
    "entered-in-error",
    "unknown",
];
const REQUEST_STATUS: &[&str] = &[
    "draft",
    "active",
    "on-hold",
    "revoked",
    "completed",
    "entered-in-error",
    "unknown",
];
const REQUEST_INTENT: &[&str] = &[
    "proposal",
    "plan",
    "directive",
    "order",
    "original-order",
    "reflex-order",
    "filler-order",
    "instance-order",
    "option",
];
const REQUEST_PRIORITY: &[&str] = &["routine", "urgent", "asap", "stat"];
const EVENT_STATUS: &[&str] = &[
    "preparation",
    "in-progress",
    "not-done",
    "on-hold",
    "stopped",
    "completed",
    "entered-in-error",
    "unknown",
];
const FM_STATUS: &[&str] = &["active", "cancelled", "draft", "entered-in-error"];
const CLAIM_USE: &[&str] = &["claim", "preauthorization", "predetermination"];
const CLAIM_OUTCOME: &[&str] = &["queued", "complete", "error", "partial"];
const GENDER: &[&str] = &["male", "female", "other", "unknown"];
const ENCOUNTER_STATUS: &[&str] = &[
    "planned",
    "arrived",
    "triaged",
    "in-progress",
    "onleave",
    "finished",
    "cancelled",
    "entered-in-error",
    "unknown",
];
const PARTICIPATION_STATUS: &[&str] = &["accepted", "declined", "tentative", "needs-action"];
const LIST_MODE: &[&str] = &["working", "snapshot", "changes"];
const TERMINOLOGY: &str = "http://terminology.hl7.org/CodeSystem/";

macro_rules! ty {
    ($name:literal, $search:expr, [$($rule:expr),* $(,)?]) => {
        TypeDef { name: $name, search: $search, rules: &[$($rule),*] }
    };
}

/// The per-type table, in [`SUPPORTED_TYPES`] order.
pub(crate) const TYPES: &[TypeDef] = &[
    ty!(
        "Patient",
        0,
        [
            Code("gender", GENDER),
            Code("contact.gender", GENDER),
            Req("communication.language"),
            Req("link.other"),
            ReqCode("link.type", &["replaced-by", "replaces", "refer", "seealso"]),
        ]
    ),
    ty!(
        "AllergyIntolerance",
        P | C | D | K,
        [
            Req("patient"),
            Code("type", &["allergy", "intolerance"]),
            Code("category", &["food", "medication", "environment", "biologic"]),
            Code("criticality", &["low", "high", "unable-to-assess"]),
            Req("reaction.manifestation"),
            Code("reaction.severity", &["mild", "moderate", "severe"]),
            Coding(
                "clinicalStatus",
                "allergyintolerance-clinical",
                &["active", "inactive", "resolved"]
            ),
            Coding(
                "verificationStatus",
                "allergyintolerance-verification",
                &["unconfirmed", "confirmed", "refuted", "entered-in-error"]
            ),
        ]
    ),
    ty!(
        "Condition",
        P | S | C | K,
        [
            Req("subject"),
            Coding(
                "clinicalStatus",
                "condition-clinical",
                &["active", "recurrence", "relapse", "inactive", "remission", "resolved"]
            ),
            Coding(
                "verificationStatus",
                "condition-ver-status",
                &[
                    "unconfirmed",
                    "provisional",
                    "differential",
                    "confirmed",
                    "refuted",
                    "entered-in-error"
                ]
            ),
        ]
    ),
    ty!(
        "Procedure",
        P | S | C | D | T | K,
        [
            ReqCode("status", EVENT_STATUS),
            Req("subject"),
            Req("performer.actor"),
            Req("focalDevice.manipulated"),
        ]
    ),
    ty!(
        "Immunization",
        P | D | T,
        [
            ReqCode("status", &["completed", "entered-in-error", "not-done"]),
            Req("vaccineCode"),
            Req("patient"),
            Req("occurrence[x]"),
            Req("performer.actor"),
            Req("protocolApplied.doseNumber[x]"),
        ]
    ),
    ty!(
        "Encounter",
        P | S | D | T,
        [
            ReqCode("status", ENCOUNTER_STATUS),
            Req("class"),
            ReqCode("statusHistory.status", ENCOUNTER_STATUS),
            Req("statusHistory.period"),
            Req("classHistory.class"),
            Req("classHistory.period"),
            Req("diagnosis.condition"),
            Req("location.location"),
            Code("location.status", &["planned", "active", "reserved", "completed"]),
        ]
    ),
    ty!(
        "CarePlan",
        P | S | D | T | K,
        [
            ReqCode("status", REQUEST_STATUS),
            ReqCode("intent", &["proposal", "plan", "order", "option"]),
            Req("subject"),
            ReqCode(
                "activity.detail.status",
                &[
                    "not-started",
                    "scheduled",
                    "in-progress",
                    "on-hold",
                    "completed",
                    "cancelled",
                    "stopped",
                    "unknown",
                    "entered-in-error"
                ]
            ),
            Code(
                "activity.detail.kind",
                &[
                    "Appointment",
                    "CommunicationRequest",
                    "DeviceRequest",
                    "MedicationRequest",
                    "NutritionOrder",
                    "Task",
                    "ServiceRequest",
                    "VisionPrescription"
                ]
            ),
        ]
    ),
    ty!(
        "FamilyMemberHistory",
        P | C | D | T,
        [
            ReqCode(
                "status",
                &["partial", "completed", "entered-in-error", "health-unknown"]
            ),
            Req("patient"),
            Req("relationship"),
            Req("condition.code"),
        ]
    ),
    ty!(
        "MedicationRequest",
        P | S | C | T | K,
        [
            ReqCode(
                "status",
                &[
                    "active",
                    "on-hold",
                    "cancelled",
                    "completed",
                    "entered-in-error",
                    "stopped",
                    "draft",
                    "unknown"
                ]
            ),
            ReqCode(
                "intent",
                &[
                    "proposal",
                    "plan",
                    "order",
                    "original-order",
                    "reflex-order",
                    "filler-order",
                    "instance-order",
                    "option"
                ]
            ),
            Code("priority", REQUEST_PRIORITY),
            Req("medication[x]"),
            Req("subject"),
            Req("substitution.allowed[x]"),
        ]
    ),
    ty!(
        "MedicationStatement",
        P | S | C | T | K,
        [
            ReqCode(
                "status",
                &[
                    "active",
                    "completed",
                    "entered-in-error",
                    "intended",
                    "stopped",
                    "on-hold",
                    "unknown",
                    "not-taken"
                ]
            ),
            Req("medication[x]"),
            Req("subject"),
        ]
    ),
    ty!(
        "MedicationDispense",
        P | S | C | T,
        [
            ReqCode(
                "status",
                &[
                    "preparation",
                    "in-progress",
                    "cancelled",
                    "on-hold",
                    "completed",
                    "entered-in-error",
                    "stopped",
                    "declined",
                    "unknown"
                ]
            ),
            Req("medication[x]"),
            Req("performer.actor"),
            Req("substitution.wasSubstituted"),
        ]
    ),
    ty!(
        "MedicationAdministration",
        P | S | C | T,
        [
            ReqCode(
                "status",
                &[
                    "in-progress",
                    "not-done",
                    "on-hold",
                    "completed",
                    "entered-in-error",
                    "stopped",
                    "unknown"
                ]
            ),
            Req("medication[x]"),
            Req("subject"),
            Req("effective[x]"),
            Req("performer.actor"),
        ]
    ),
    ty!(
        "Observation",
        P | S | C | D | T | K,
        [ReqCode("status", OBS_STATUS), Req("code"), Req("component.code"),]
    ),
    ty!(
        "DiagnosticReport",
        P | S | C | D | T | K,
        [
            ReqCode(
                "status",
                &[
                    "registered",
                    "partial",
                    "preliminary",
                    "final",
                    "amended",
                    "corrected",
                    "appended",
                    "cancelled",
                    "entered-in-error",
                    "unknown"
                ]
            ),
            Req("code"),
            Req("media.link"),
        ]
    ),
    ty!(
        "Specimen",
        P | S | T,
        [Code(
            "status",
            &["available", "unavailable", "unsatisfactory", "entered-in-error"]
        ),]
    ),
    ty!(
        "DocumentReference",
        P | S | D | T | K,
        [
            ReqCode("status", &["current", "superseded", "entered-in-error"]),
            Code("docStatus", &["preliminary", "final", "amended", "entered-in-error"]),
            ReqCode("relatesTo.code", &["replaces", "transforms", "signs", "appends"]),
            Req("relatesTo.target"),
            Req("content"),
            Req("content.attachment"),
        ]
    ),
    ty!("Binary", 0, [Req("contentType")]),
    ty!(
        "Appointment",
        P | D | T,
        [
            ReqCode(
                "status",
                &[
                    "proposed",
                    "pending",
                    "booked",
                    "arrived",
                    "fulfilled",
                    "cancelled",
                    "noshow",
                    "entered-in-error",
                    "checked-in",
                    "waitlist"
                ]
            ),
            Req("participant"),
            ReqCode("participant.status", PARTICIPATION_STATUS),
            Code("participant.required", &["required", "optional", "information-only"]),
        ]
    ),
    ty!(
        "AppointmentResponse",
        P,
        [Req("appointment"), ReqCode("participantStatus", PARTICIPATION_STATUS),]
    ),
    ty!(
        "Claim",
        P | T,
        [
            ReqCode("status", FM_STATUS),
            Req("type"),
            ReqCode("use", CLAIM_USE),
            Req("patient"),
            Req("created"),
            Req("provider"),
            Req("priority"),
            Req("payee.type"),
            Req("careTeam.sequence"),
            Req("careTeam.provider"),
            Req("supportingInfo.sequence"),
            Req("supportingInfo.category"),
            Req("diagnosis.sequence"),
            Req("diagnosis.diagnosis[x]"),
            Req("procedure.sequence"),
            Req("procedure.procedure[x]"),
            Req("insurance"),
            Req("insurance.sequence"),
            Req("insurance.focal"),
            Req("insurance.coverage"),
            Req("accident.date"),
            Req("item.sequence"),
            Req("item.productOrService"),
            Req("item.detail.sequence"),
            Req("item.detail.productOrService"),
            Req("item.detail.subDetail.sequence"),
            Req("item.detail.subDetail.productOrService"),
        ]
    ),
    ty!(
        "ClaimResponse",
        P | T,
        [
            ReqCode("status", FM_STATUS),
            Req("type"),
            ReqCode("use", CLAIM_USE),
            Req("patient"),
            Req("created"),
            Req("insurer"),
            ReqCode("outcome", CLAIM_OUTCOME),
        ]
    ),
    ty!(
        "ExplanationOfBenefit",
        P | T,
        [
            ReqCode("status", FM_STATUS),
            Req("type"),
            ReqCode("use", CLAIM_USE),
            Req("patient"),
            Req("created"),
            Req("insurer"),
            Req("provider"),
            ReqCode("outcome", CLAIM_OUTCOME),
            Req("careTeam.sequence"),
            Req("careTeam.provider"),
            Req("supportingInfo.sequence"),
            Req("supportingInfo.category"),
            Req("diagnosis.sequence"),
            Req("diagnosis.diagnosis[x]"),
            Req("procedure.sequence"),
            Req("procedure.procedure[x]"),
            Req("insurance"),
            Req("insurance.focal"),
            Req("insurance.coverage"),
            Req("item.sequence"),
            Req("item.productOrService"),
            Req("item.adjudication.category"),
            Req("item.detail.sequence"),
            Req("item.detail.productOrService"),
            Req("addItem.productOrService"),
            Req("total.category"),
            Req("total.amount"),
            Req("benefitBalance.category"),
        ]
    ),
    ty!(
        "Coverage",
        P | T,
        [
            ReqCode("status", FM_STATUS),
            Req("beneficiary"),
            Req("payor"),
            Req("class.type"),
            Req("class.value"),
            Req("costToBeneficiary.value[x]"),
            Req("costToBeneficiary.exception.type"),
        ]
    ),
    ty!(
        "CareTeam",
        P | S | D | T | K,
        [Code(
            "status",
            &["proposed", "active", "suspended", "inactive", "entered-in-error"]
        ),]
    ),
    ty!(
        "Goal",
        P | S | K,
        [
            ReqCode(
                "lifecycleStatus",
                &[
                    "proposed",
                    "planned",
                    "accepted",
                    "active",
                    "on-hold",
                    "completed",
                    "cancelled",
                    "entered-in-error",
                    "rejected"
                ]
            ),
            Req("description"),
            Req("subject"),
        ]
    ),
    ty!(
        "ServiceRequest",
        P | S | C | T | K,
        [
            ReqCode("status", REQUEST_STATUS),
            ReqCode("intent", REQUEST_INTENT),
            Code("priority", REQUEST_PRIORITY),
            Req("subject"),
        ]
    ),
    ty!(
        "Provenance",
        P,
        [
            Req("target"),
            Req("recorded"),
            Req("agent"),
            Req("agent.who"),
            ReqCode(
                "entity.role",
                &["derivation", "revision", "quotation", "source", "removal"]
            ),
            Req("entity.what"),
        ]
    ),
    ty!(
        "ImagingStudy",
        P | S | T,
        [
            ReqCode(
                "status",
                &["registered", "available", "cancelled", "entered-in-error", "unknown"]
            ),
            Req("subject"),
            Req("series.uid"),
            Req("series.modality"),
            Req("series.performer.actor"),
            Req("series.instance.uid"),
            Req("series.instance.sopClass"),
        ]
    ),
    ty!(
        "DeviceRequest",
        P | S | C | T,
        [
            Code("status", REQUEST_STATUS),
            ReqCode("intent", REQUEST_INTENT),
            Code("priority", REQUEST_PRIORITY),
            Req("code[x]"),
            Req("subject"),
        ]
    ),
    ty!(
        "DeviceUseStatement",
        P | S,
        [
            ReqCode(
                "status",
                &[
                    "active",
                    "completed",
                    "entered-in-error",
                    "intended",
                    "stopped",
                    "on-hold"
                ]
            ),
            Req("subject"),
            Req("device"),
        ]
    ),
    ty!(
        "NutritionOrder",
        P | T,
        [
            ReqCode("status", REQUEST_STATUS),
            ReqCode("intent", REQUEST_INTENT),
            Req("patient"),
            Req("dateTime"),
        ]
    ),
    ty!(
        "RiskAssessment",
        P | S | D,
        [ReqCode("status", OBS_STATUS), Req("subject"),]
    ),
    ty!(
        "QuestionnaireResponse",
        P | S | T,
        [
            ReqCode(
                "status",
                &["in-progress", "completed", "amended", "entered-in-error", "stopped"]
            ),
            Req("item.linkId"),
        ]
    ),
    ty!(
        "Communication",
        P | S | T | K,
        [
            ReqCode("status", EVENT_STATUS),
            Code("priority", REQUEST_PRIORITY),
            Req("payload.content[x]"),
        ]
    ),
    ty!(
        "CommunicationRequest",
        P | S | T | K,
        [
            ReqCode("status", REQUEST_STATUS),
            Code("priority", REQUEST_PRIORITY),
            Req("payload.content[x]"),
        ]
    ),
    ty!(
        "Flag",
        P | S | D,
        [
            ReqCode("status", &["active", "inactive", "entered-in-error"]),
            Req("code"),
            Req("subject"),
        ]
    ),
    ty!(
        "List",
        P | S | C | D | T,
        [
            ReqCode("status", &["current", "retired", "entered-in-error"]),
            ReqCode("mode", LIST_MODE),
            Req("entry.item"),
        ]
    ),
    ty!(
        "Composition",
        P | S | D | T | K,
        [
            ReqCode("status", &["preliminary", "final", "amended", "entered-in-error"]),
            Req("type"),
            Req("date"),
            Req("author"),
            Req("title"),
            ReqCode("attester.mode", &["personal", "professional", "legal", "official"]),
            ReqCode("relatesTo.code", &["replaces", "transforms", "signs", "appends"]),
            Req("relatesTo.target[x]"),
            Code("section.mode", LIST_MODE),
        ]
    ),
    ty!(
        "EpisodeOfCare",
        P | D | T,
        [
            ReqCode(
                "status",
                &[
                    "planned",
                    "waitlist",
                    "active",
                    "onhold",
                    "finished",
                    "cancelled",
                    "entered-in-error"
                ]
            ),
            Req("patient"),
            Req("statusHistory.status"),
            Req("statusHistory.period"),
            Req("diagnosis.condition"),
        ]
    ),
    ty!("RelatedPerson", P, [Req("patient"), Code("gender", GENDER)]),
    ty!(
        "Task",
        P | S | C | T,
        [
            ReqCode(
                "status",
                &[
                    "draft",
                    "requested",
                    "received",
                    "accepted",
                    "rejected",
                    "ready",
                    "cancelled",
                    "in-progress",
                    "on-hold",
                    "failed",
                    "completed",
                    "entered-in-error"
                ]
            ),
            ReqCode(
                "intent",
                &[
                    "unknown",
                    "proposal",
                    "plan",
                    "order",
                    "original-order",
                    "reflex-order",
                    "filler-order",
                    "instance-order",
                    "option"
                ]
            ),
            Code("priority", REQUEST_PRIORITY),
            Req("input.type"),
            Req("input.value[x]"),
            Req("output.type"),
            Req("output.value[x]"),
        ]
    ),
    ty!(
        "AdverseEvent",
        S | D | K,
        [
            ReqCode("actuality", &["actual", "potential"]),
            Req("subject"),
            Req("suspectEntity.instance"),
        ]
    ),
    ty!("BodyStructure", P, [Req("patient")]),
    ty!(
        "ClinicalImpression",
        P | S | D | T,
        [
            ReqCode("status", &["in-progress", "completed", "entered-in-error"]),
            Req("subject"),
            Req("investigation.code"),
        ]
    ),
    ty!(
        "DetectedIssue",
        P | C,
        [
            ReqCode("status", OBS_STATUS),
            Code("severity", &["high", "moderate", "low"]),
            Req("mitigation.action"),
        ]
    ),
    ty!(
        "ImmunizationRecommendation",
        P,
        [
            Req("patient"),
            Req("date"),
            Req("recommendation"),
            Req("recommendation.forecastStatus"),
        ]
    ),
    ty!("Media", P | S | T, [ReqCode("status", EVENT_STATUS), Req("content")]),
    ty!(
        "Account",
        P | S | T,
        [
            ReqCode(
                "status",
                &["active", "inactive", "entered-in-error", "on-hold", "unknown"]
            ),
            Req("coverage.coverage"),
            Req("guarantor.party"),
        ]
    ),
    ty!(
        "ChargeItem",
        P | S | C,
        [
            ReqCode(
                "status",
                &[
                    "planned",
                    "billable",
                    "not-billable",
                    "aborted",
                    "billed",
                    "entered-in-error",
                    "unknown"
                ]
            ),
            Req("code"),
            Req("subject"),
            Req("performer.actor"),
        ]
    ),
    ty!(
        "Invoice",
        P | S | T,
        [
            ReqCode(
                "status",
                &["draft", "issued", "balanced", "cancelled", "entered-in-error"]
            ),
            Req("participant.actor"),
            Req("lineItem.chargeItem[x]"),
            ReqCode(
                "lineItem.priceComponent.type",
                &["base", "surcharge", "deduction", "discount", "tax", "informational"]
            ),
        ]
    ),
    ty!(
        "SupplyDelivery",
        P | T,
        [Code(
            "status",
            &["in-progress", "completed", "abandoned", "entered-in-error"]
        ),]
    ),
    ty!(
        "SupplyRequest",
        S | D | T | K,
        [
            Code(
                "status",
                &[
                    "draft",
                    "active",
                    "suspended",
                    "cancelled",
                    "completed",
                    "entered-in-error",
                    "unknown"
                ]
            ),
            Code("priority", REQUEST_PRIORITY),
            Req("item[x]"),
            Req("quantity"),
        ]
    ),
    ty!(
        "VisionPrescription",
        P | T,
        [
            ReqCode("status", FM_STATUS),
            Req("created"),
            Req("patient"),
            Req("dateWritten"),
            Req("prescriber"),
            Req("lensSpecification"),
            Req("lensSpecification.product"),
            ReqCode("lensSpecification.eye", &["right", "left"]),
        ]
    ),
    ty!(
        "ResearchSubject",
        P | D | T,
        [
            ReqCode(
                "status",
                &[
                    "candidate",
                    "eligible",
                    "follow-up",
                    "ineligible",
                    "not-registered",
                    "off-study",
                    "on-study",
                    "on-study-intervention",
                    "on-study-observation",
                    "pending-on-study",
                    "potential-candidate",
                    "screening",
                    "withdrawn"
                ]
            ),
            Req("study"),
            Req("individual"),
        ]
    ),
    ty!("Organization", 0, []),
    ty!("Practitioner", 0, [Code("gender", GENDER), Req("qualification.code")]),
    ty!("PractitionerRole", 0, []),
    ty!(
        "Location",
        T,
        [
            Code("status", &["active", "suspended", "inactive"]),
            Code("mode", &["instance", "kind"]),
            Req("position.longitude"),
            Req("position.latitude"),
        ]
    ),
    ty!(
        "Medication",
        C | T,
        [
            Code("status", &["active", "inactive", "entered-in-error"]),
            Req("ingredient.item[x]"),
        ]
    ),
    ty!(
        "Device",
        P | T,
        [
            Code("status", &["active", "inactive", "entered-in-error", "unknown"]),
            Req("deviceName.name"),
            ReqCode(
                "deviceName.type",
                &[
                    "udi-label-name",
                    "user-friendly-name",
                    "patient-reported-name",
                    "manufacturer-name",
                    "model-name",
                    "other"
                ]
            ),
            Code(
                "udiCarrier.entryType",
                &["barcode", "rfid", "manual", "card", "self-reported", "unknown"]
            ),
            Req("specialization.systemType"),
            Req("property.type"),
        ]
    ),
];

/// The table entry for `name`, if the type is supported.
pub(crate) fn type_def(name: &str) -> Option<&'static TypeDef> {
    TYPES.iter().find(|t| t.name == name)
}

/// The code system URL for a [`Rule::Coding`] system suffix.
pub(crate) fn terminology_system(suffix: &str) -> String {
    format!("{TERMINOLOGY}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_supported_types() {
        let names: Vec<&str> = TYPES.iter().map(|t| t.name).collect();
        assert_eq!(names, SUPPORTED_TYPES);
    }
}
