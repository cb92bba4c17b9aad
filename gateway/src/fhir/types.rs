//! The table of supported resource types: FHIR R4 required elements (min cardinality 1),
//! required-binding value sets. (Which search parameters each type has is the node's
//! record search's table, `medmesh_node::records::search::type_params`.)
//!
//! Taken from the FHIR R4 (4.0.1) resource definitions. Only elements whose minimum
//! cardinality is 1 in the base resource (or in a backbone element that is present) and
//! `code`/`CodeableConcept` elements with a *required* binding are listed.
//!
//! Kept whole although over 800 lines: some 810 of them are one data table
//! (`TYPES`, one entry per supported type, in `SUPPORTED_TYPES` order), the rest
//! the type list and the value sets it uses. It is read top to bottom against
//! the R4 definitions; split across files it would only be harder to check.

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

/// One supported resource type.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TypeDef {
    /// The resource type name.
    pub(crate) name: &'static str,
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
    ($name:literal, [$($rule:expr),* $(,)?]) => {
        TypeDef { name: $name, rules: &[$($rule),*] }
    };
}

/// The per-type table, in [`SUPPORTED_TYPES`] order.
pub(crate) const TYPES: &[TypeDef] = &[
    ty!(
        "Patient",
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
        [
            ReqCode("status", EVENT_STATUS),
            Req("subject"),
            Req("performer.actor"),
            Req("focalDevice.manipulated"),
        ]
    ),
    ty!(
        "Immunization",
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
        [ReqCode("status", OBS_STATUS), Req("code"), Req("component.code"),]
    ),
    ty!(
        "DiagnosticReport",
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
        [Code(
            "status",
            &["available", "unavailable", "unsatisfactory", "entered-in-error"]
        ),]
    ),
    ty!(
        "DocumentReference",
        [
            ReqCode("status", &["current", "superseded", "entered-in-error"]),
            Code("docStatus", &["preliminary", "final", "amended", "entered-in-error"]),
            ReqCode("relatesTo.code", &["replaces", "transforms", "signs", "appends"]),
            Req("relatesTo.target"),
            Req("content"),
            Req("content.attachment"),
        ]
    ),
    ty!("Binary", [Req("contentType")]),
    ty!(
        "Appointment",
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
        [Req("appointment"), ReqCode("participantStatus", PARTICIPATION_STATUS),]
    ),
    ty!(
        "Claim",
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
        [Code(
            "status",
            &["proposed", "active", "suspended", "inactive", "entered-in-error"]
        ),]
    ),
    ty!(
        "Goal",
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
        [
            ReqCode("status", REQUEST_STATUS),
            ReqCode("intent", REQUEST_INTENT),
            Code("priority", REQUEST_PRIORITY),
            Req("subject"),
        ]
    ),
    ty!(
        "Provenance",
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
        [
            ReqCode("status", REQUEST_STATUS),
            ReqCode("intent", REQUEST_INTENT),
            Req("patient"),
            Req("dateTime"),
        ]
    ),
    ty!("RiskAssessment", [ReqCode("status", OBS_STATUS), Req("subject"),]),
    ty!(
        "QuestionnaireResponse",
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
        [
            ReqCode("status", EVENT_STATUS),
            Code("priority", REQUEST_PRIORITY),
            Req("payload.content[x]"),
        ]
    ),
    ty!(
        "CommunicationRequest",
        [
            ReqCode("status", REQUEST_STATUS),
            Code("priority", REQUEST_PRIORITY),
            Req("payload.content[x]"),
        ]
    ),
    ty!(
        "Flag",
        [
            ReqCode("status", &["active", "inactive", "entered-in-error"]),
            Req("code"),
            Req("subject"),
        ]
    ),
    ty!(
        "List",
        [
            ReqCode("status", &["current", "retired", "entered-in-error"]),
            ReqCode("mode", LIST_MODE),
            Req("entry.item"),
        ]
    ),
    ty!(
        "Composition",
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
    ty!("RelatedPerson", [Req("patient"), Code("gender", GENDER)]),
    ty!(
        "Task",
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
        [
            ReqCode("actuality", &["actual", "potential"]),
            Req("subject"),
            Req("suspectEntity.instance"),
        ]
    ),
    ty!("BodyStructure", [Req("patient")]),
    ty!(
        "ClinicalImpression",
        [
            ReqCode("status", &["in-progress", "completed", "entered-in-error"]),
            Req("subject"),
            Req("investigation.code"),
        ]
    ),
    ty!(
        "DetectedIssue",
        [
            ReqCode("status", OBS_STATUS),
            Code("severity", &["high", "moderate", "low"]),
            Req("mitigation.action"),
        ]
    ),
    ty!(
        "ImmunizationRecommendation",
        [
            Req("patient"),
            Req("date"),
            Req("recommendation"),
            Req("recommendation.forecastStatus"),
        ]
    ),
    ty!("Media", [ReqCode("status", EVENT_STATUS), Req("content")]),
    ty!(
        "Account",
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
        [Code(
            "status",
            &["in-progress", "completed", "abandoned", "entered-in-error"]
        ),]
    ),
    ty!(
        "SupplyRequest",
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
    ty!("Organization", []),
    ty!("Practitioner", [Code("gender", GENDER), Req("qualification.code")]),
    ty!("PractitionerRole", []),
    ty!(
        "Location",
        [
            Code("status", &["active", "suspended", "inactive"]),
            Code("mode", &["instance", "kind"]),
            Req("position.longitude"),
            Req("position.latitude"),
        ]
    ),
    ty!(
        "Medication",
        [
            Code("status", &["active", "inactive", "entered-in-error"]),
            Req("ingredient.item[x]"),
        ]
    ),
    ty!(
        "Device",
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
