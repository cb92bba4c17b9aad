//! References inside a Bundle: resolving one to the entry it names (FHIR
//! R4's rules) and rewriting them to the ids a transaction assigned.

use std::collections::HashMap;

use serde_json::Value;

use crate::fhir::primitive;

/// Splits a RESTful reference or URL (`[root]Type/id[/_history/vid]`) into its root
/// (empty for a relative reference, else ending in `/`) and `Type/id`, dropping any
/// version; `None` for anything else (`urn:`, `#contained`, a query).
fn restful(url: &str) -> Option<(&str, &str)> {
    if url.contains(['?', '#']) {
        return None;
    }
    let path = match url.find("/_history/") {
        Some(at) => url.get(..at)?,
        None => url,
    };
    let (rest, id) = path.rsplit_once('/')?;
    let (root, resource_type) = match rest.rsplit_once('/') {
        Some((root, t)) => (url.get(..=root.len())?, t),
        None => ("", rest),
    };
    let relative_ok = root.is_empty() || root.contains("://");
    (relative_ok && primitive::is_type_name(resource_type) && primitive::is_id(id))
        .then(|| (root, path.get(root.len()..).unwrap_or_default()))
}

/// The `fullUrl` of the Bundle entry that `reference`, found in the entry whose
/// `fullUrl` is `entry_full_url`, points to, following FHIR R4's rules for resolving
/// references in Bundles (<https://hl7.org/fhir/R4/bundle.html#references>): a
/// `urn:uuid:`/`urn:oid:` or absolute reference matches a `fullUrl` as it is
/// (an absolute one without its `/_history/…`); a relative `Type/id` is first made
/// absolute against the root of the entry's own RESTful `fullUrl` (a relative
/// reference in an entry without one names a resource of this server). `None`
/// when no entry matches.
pub fn resolve_in_bundle(
    reference: &str,
    entry_full_url: Option<&str>,
    is_full_url: impl Fn(&str) -> bool,
) -> Option<String> {
    if reference.starts_with("urn:") {
        return is_full_url(reference).then(|| reference.to_owned());
    }
    let (root, key) = restful(reference)?;
    let absolute = if root.is_empty() {
        let (entry_root, _) = restful(entry_full_url?)?;
        if entry_root.is_empty() {
            return None;
        }
        format!("{entry_root}{key}")
    } else {
        format!("{root}{key}")
    };
    is_full_url(&absolute).then_some(absolute)
}

/// Replaces every `Reference.reference` in `resource` that is a key of `map` (e.g. a
/// transaction's `urn:uuid:` fullUrls) by its value (e.g. `Patient/123`). Returns how
/// many references were rewritten. See [`rewrite_entry_references`] for references
/// relative to the entry's own `fullUrl`.
pub fn rewrite_references(resource: &mut Value, map: &HashMap<String, String>) -> usize {
    rewrite_entry_references(resource, None, map)
}

/// Replaces every `Reference.reference` in `resource`, the resource of the entry whose
/// `fullUrl` is `full_url`, that resolves to a `fullUrl` of the Bundle
/// ([`resolve_in_bundle`]) by the value `map` holds for that `fullUrl` (e.g.
/// `Patient/123`, the id the transaction assigned). Returns how many references were
/// rewritten.
pub fn rewrite_entry_references(resource: &mut Value, full_url: Option<&str>, map: &HashMap<String, String>) -> usize {
    match resource {
        Value::Object(obj) => {
            let mut n = 0;
            for (key, value) in obj.iter_mut() {
                if key == "reference"
                    && let Value::String(r) = value
                {
                    if let Some(new) = resolve_in_bundle(r, full_url, |u| map.contains_key(u)).and_then(|u| map.get(&u))
                    {
                        *r = new.clone();
                        n += 1;
                    }
                } else {
                    n += rewrite_entry_references(value, full_url, map);
                }
            }
            n
        }
        Value::Array(items) => items
            .iter_mut()
            .map(|v| rewrite_entry_references(v, full_url, map))
            .sum(),
        _ => 0,
    }
}
