//! FHIR R4 choice elements (`value[x]`, `effective[x]`, …).
//!
//! A JSON key is an alternative of a choice element when it is one of the known
//! choice names below followed by an R4 data type name (`valueQuantity`,
//! `effectiveDateTime`). The list is global rather than per resource path: a key
//! only matters here when a map holds two alternatives of the same name, which valid
//! FHIR never does except after concurrent edits. Names that are *separate* elements
//! in R4 (`reasonCode`/`reasonReference`) are deliberately absent.

/// Names of R4 choice elements (the part before the type), sorted for binary search.
const CHOICE_NAMES: &[&str] = &[
    "abatement",
    "age",
    "allowed",
    "amount",
    "answer",
    "asNeeded",
    "author",
    "born",
    "bounds",
    "chargeItem",
    "code",
    "collected",
    "content",
    "created",
    "deceased",
    "defaultValue",
    "definition",
    "detail",
    "diagnosis",
    "dose",
    "doseNumber",
    "due",
    "effective",
    "entity",
    "event",
    "fastingStatus",
    "fixed",
    "identified",
    "initial",
    "item",
    "location",
    "maxValue",
    "medication",
    "minValue",
    "multipleBirth",
    "occurred",
    "occurrence",
    "offset",
    "onset",
    "pattern",
    "performed",
    "probability",
    "procedure",
    "product",
    "quantity",
    "rate",
    "reported",
    "scheduled",
    "seriesDoses",
    "serviced",
    "source",
    "start",
    "subject",
    "target",
    "time",
    "timing",
    "used",
    "value",
    "when",
];

/// R4 data type names as they appear capitalised in choice keys, sorted.
const TYPE_NAMES: &[&str] = &[
    "Address",
    "Age",
    "Annotation",
    "Attachment",
    "Base64Binary",
    "Boolean",
    "Canonical",
    "Code",
    "CodeableConcept",
    "Coding",
    "ContactDetail",
    "ContactPoint",
    "Contributor",
    "Count",
    "DataRequirement",
    "Date",
    "DateTime",
    "Decimal",
    "Distance",
    "Dosage",
    "Duration",
    "Expression",
    "HumanName",
    "Id",
    "Identifier",
    "Instant",
    "Integer",
    "Markdown",
    "Meta",
    "Money",
    "Oid",
    "ParameterDefinition",
    "Period",
    "PositiveInt",
    "Quantity",
    "Range",
    "Ratio",
    "Reference",
    "RelatedArtifact",
    "SampledData",
    "Signature",
    "String",
    "Time",
    "Timing",
    "TriggerDefinition",
    "UnsignedInt",
    "Uri",
    "Url",
    "UsageContext",
    "Uuid",
];

/// The choice element name of `key` (`"value"` for `"valueQuantity"`), if `key` is an
/// alternative of a known R4 choice element.
pub fn choice_prefix(key: &str) -> Option<&str> {
    // Split at each uppercase letter: the head must be a choice name and the tail a type.
    // Try the longest head first (`doseNumberPositiveInt` is `doseNumber[x]`).
    let bytes = key.as_bytes();
    (1..bytes.len())
        .rev()
        .filter(|&i| bytes[i].is_ascii_uppercase())
        .find(|&i| CHOICE_NAMES.binary_search(&&key[..i]).is_ok() && TYPE_NAMES.binary_search(&&key[i..]).is_ok())
        .map(|i| &key[..i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_sorted() {
        assert!(CHOICE_NAMES.windows(2).all(|w| w[0] < w[1]));
        assert!(TYPE_NAMES.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn prefixes() {
        assert_eq!(choice_prefix("valueQuantity"), Some("value"));
        assert_eq!(choice_prefix("valueString"), Some("value"));
        assert_eq!(choice_prefix("effectiveDateTime"), Some("effective"));
        assert_eq!(choice_prefix("effectivePeriod"), Some("effective"));
        assert_eq!(choice_prefix("deceasedBoolean"), Some("deceased"));
        assert_eq!(choice_prefix("multipleBirthInteger"), Some("multipleBirth"));
        assert_eq!(choice_prefix("doseNumberPositiveInt"), Some("doseNumber"));
        assert_eq!(choice_prefix("medicationCodeableConcept"), Some("medication"));
        assert_eq!(choice_prefix("authorString"), Some("author"));
        assert_eq!(choice_prefix("value"), None);
        assert_eq!(choice_prefix("valueSet"), None);
        assert_eq!(choice_prefix("reasonCode"), None);
        assert_eq!(choice_prefix("reasonReference"), None);
        assert_eq!(choice_prefix("status"), None);
        assert_eq!(choice_prefix(""), None);
    }
}
