//! Which primitive (or complex) type an element has: from its name (a table
//! of well-known names), from the type suffix of a choice element, or from
//! its parent (`value` in a Quantity-like element is a decimal).

/// The primitive (or complex) type an element must have, when known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Prim {
    Boolean,
    Integer,
    PositiveInt,
    UnsignedInt,
    Decimal,
    Date,
    DateTime,
    Instant,
    Time,
    /// A `code` that must be a string.
    Code,
    /// A name that is a `code` in some types and a complex type in others: checked
    /// as a code only when it is a string.
    MaybeCode,
    Uri,
    Base64,
    Reference,
    Xhtml,
    /// `string`, `markdown`: any non-empty JSON string.
    String,
    /// Any complex type: a JSON object.
    Complex,
}

/// Choice-element prefixes whose `[x]` alternatives are checked (type from suffix, at
/// most one present).
pub(super) const CHOICE_PREFIXES: &[&str] = &[
    "value",
    "effective",
    "onset",
    "abatement",
    "occurrence",
    "performed",
    "deceased",
    "multipleBirth",
    "born",
    "age",
    "asNeeded",
    "medication",
    "reported",
    "serviced",
    "location",
    "timing",
    "collected",
    "allowed",
    "defaultValue",
    "rate",
    "dose",
    "bounds",
    "scheduled",
    "start",
    "due",
    "detail",
    "item",
    "content",
    "probability",
    "diagnosis",
    "procedure",
    "code",
    "fastingStatus",
    "occurred",
    "created",
    "doseNumber",
    "seriesDoses",
    "chargeItem",
    "target",
];

/// FHIR data type names that may follow a choice prefix, with the check they imply.
const CHOICE_TYPES: &[(&str, Prim)] = &[
    ("Base64Binary", Prim::Base64),
    ("Boolean", Prim::Boolean),
    ("Canonical", Prim::Uri),
    ("Code", Prim::Code),
    ("DateTime", Prim::DateTime),
    ("Date", Prim::Date),
    ("Decimal", Prim::Decimal),
    ("Id", Prim::String),
    ("Instant", Prim::Instant),
    ("Integer", Prim::Integer),
    ("Markdown", Prim::String),
    ("Oid", Prim::Uri),
    ("PositiveInt", Prim::PositiveInt),
    ("String", Prim::String),
    ("Time", Prim::Time),
    ("UnsignedInt", Prim::UnsignedInt),
    ("Uri", Prim::Uri),
    ("Url", Prim::Uri),
    ("Uuid", Prim::Uri),
    ("Address", Prim::Complex),
    ("Age", Prim::Complex),
    ("Annotation", Prim::Complex),
    ("Attachment", Prim::Complex),
    ("CodeableConcept", Prim::Complex),
    ("Coding", Prim::Complex),
    ("ContactPoint", Prim::Complex),
    ("Count", Prim::Complex),
    ("Distance", Prim::Complex),
    ("Duration", Prim::Complex),
    ("HumanName", Prim::Complex),
    ("Identifier", Prim::Complex),
    ("Money", Prim::Complex),
    ("Period", Prim::Complex),
    ("Quantity", Prim::Complex),
    ("Range", Prim::Complex),
    ("Ratio", Prim::Complex),
    ("Reference", Prim::Complex),
    ("SampledData", Prim::Complex),
    ("Signature", Prim::Complex),
    ("Timing", Prim::Complex),
    ("ContactDetail", Prim::Complex),
    ("Contributor", Prim::Complex),
    ("DataRequirement", Prim::Complex),
    ("Expression", Prim::Complex),
    ("ParameterDefinition", Prim::Complex),
    ("RelatedArtifact", Prim::Complex),
    ("TriggerDefinition", Prim::Complex),
    ("UsageContext", Prim::Complex),
    ("Dosage", Prim::Complex),
    ("Meta", Prim::Complex),
];

/// Element names whose type is the same wherever R4 uses them (within the supported types).
const NAMED: &[(&str, Prim)] = &[
    ("active", Prim::Boolean),
    ("primarySource", Prim::Boolean),
    ("isSubpotent", Prim::Boolean),
    ("doNotPerform", Prim::Boolean),
    ("preferred", Prim::Boolean),
    ("focal", Prim::Boolean),
    ("userSelected", Prim::Boolean),
    ("experimental", Prim::Boolean),
    ("subrogation", Prim::Boolean),
    ("wasSubstituted", Prim::Boolean),
    ("sequence", Prim::PositiveInt),
    ("rank", Prim::PositiveInt),
    ("minutesDuration", Prim::PositiveInt),
    ("noteNumber", Prim::PositiveInt),
    ("careTeamSequence", Prim::PositiveInt),
    ("diagnosisSequence", Prim::PositiveInt),
    ("procedureSequence", Prim::PositiveInt),
    ("informationSequence", Prim::PositiveInt),
    ("itemSequence", Prim::PositiveInt),
    ("detailSequence", Prim::PositiveInt),
    ("subDetailSequence", Prim::PositiveInt),
    ("frequency", Prim::PositiveInt),
    ("frequencyMax", Prim::PositiveInt),
    ("count", Prim::PositiveInt),
    ("countMax", Prim::PositiveInt),
    ("size", Prim::UnsignedInt),
    ("numberOfRepeatsAllowed", Prim::UnsignedInt),
    ("numberOfSeries", Prim::UnsignedInt),
    ("numberOfInstances", Prim::UnsignedInt),
    ("factor", Prim::Decimal),
    ("latitude", Prim::Decimal),
    ("longitude", Prim::Decimal),
    ("altitude", Prim::Decimal),
    ("birthDate", Prim::Date),
    ("statusDate", Prim::Date),
    ("date", Prim::DateTime),
    ("start", Prim::DateTime),
    ("end", Prim::DateTime),
    ("authoredOn", Prim::DateTime),
    ("recordedDate", Prim::DateTime),
    ("created", Prim::DateTime),
    ("creation", Prim::DateTime),
    ("sent", Prim::DateTime),
    ("received", Prim::DateTime),
    ("whenPrepared", Prim::DateTime),
    ("whenHandedOver", Prim::DateTime),
    ("started", Prim::DateTime),
    ("authored", Prim::DateTime),
    ("dateAsserted", Prim::DateTime),
    ("expirationDate", Prim::DateTime),
    ("lastOccurrence", Prim::DateTime),
    ("time", Prim::DateTime),
    ("dateWritten", Prim::DateTime),
    ("dateTime", Prim::DateTime),
    ("issued", Prim::Instant),
    ("lastUpdated", Prim::Instant),
    ("timestamp", Prim::Instant),
    ("recorded", Prim::Instant),
    ("timeOfDay", Prim::Time),
    ("availableStartTime", Prim::Time),
    ("availableEndTime", Prim::Time),
    ("openingTime", Prim::Time),
    ("closingTime", Prim::Time),
    ("status", Prim::Code),
    ("intent", Prim::Code),
    ("gender", Prim::Code),
    ("language", Prim::MaybeCode),
    ("contentType", Prim::Code),
    ("comparator", Prim::Code),
    ("criticality", Prim::Code),
    ("lifecycleStatus", Prim::Code),
    ("actuality", Prim::Code),
    ("currency", Prim::Code),
    ("code", Prim::MaybeCode),
    ("use", Prim::MaybeCode),
    ("type", Prim::MaybeCode),
    ("severity", Prim::MaybeCode),
    ("priority", Prim::MaybeCode),
    ("outcome", Prim::MaybeCode),
    ("mode", Prim::MaybeCode),
    ("system", Prim::MaybeCode),
    ("url", Prim::Uri),
    ("fullUrl", Prim::Uri),
    ("profile", Prim::Uri),
    ("implicitRules", Prim::Uri),
    ("instantiatesCanonical", Prim::Uri),
    ("instantiatesUri", Prim::Uri),
    ("data", Prim::Base64),
    ("reference", Prim::Reference),
    ("div", Prim::Xhtml),
    ("meta", Prim::Complex),
    ("extension", Prim::Complex),
    ("modifierExtension", Prim::Complex),
    ("identifier", Prim::Complex),
    ("coding", Prim::Complex),
    ("subject", Prim::Complex),
    ("patient", Prim::Complex),
];

/// Parents whose `value` is a decimal (Quantity, Money and their profiles).
const QUANTITY_PARENTS: &[&str] = &[
    "quantity",
    "low",
    "high",
    "numerator",
    "denominator",
    "unitPrice",
    "net",
    "amount",
    "length",
    "doseQuantity",
    "maxDosePerAdministration",
    "maxDosePerLifetime",
    "expectedSupplyDuration",
    "dispenseInterval",
    "gross",
];

const QUANTITY_SUFFIXES: &[&str] = &["Quantity", "Age", "Duration", "Distance", "Count", "Money"];

/// The longest [`CHOICE_TYPES`] suffix of `name` that leaves a non-empty prefix.
pub(super) fn choice_split(name: &str) -> Option<(&str, Prim)> {
    CHOICE_TYPES
        .iter()
        .filter(|(suffix, _)| name.len() > suffix.len() && name.ends_with(suffix))
        .max_by_key(|(suffix, _)| suffix.len())
        .map(|(suffix, prim)| (&name[..name.len() - suffix.len()], *prim))
}

/// The type of element `name` inside an element called `parent`, when known.
pub(super) fn prim_of(name: &str, parent: &str) -> Option<Prim> {
    if name == "value" && (QUANTITY_PARENTS.contains(&parent) || QUANTITY_SUFFIXES.iter().any(|s| parent.ends_with(s)))
    {
        return Some(Prim::Decimal);
    }
    if name == "data" && parent.ends_with("SampledData") {
        return Some(Prim::String);
    }
    if let Some((_, prim)) = NAMED.iter().find(|(n, _)| *n == name) {
        return Some(*prim);
    }
    match choice_split(name) {
        Some((prefix, prim)) if CHOICE_PREFIXES.contains(&prefix) => Some(prim),
        _ => None,
    }
}
