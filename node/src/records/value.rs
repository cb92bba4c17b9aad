//! JSON ↔ Automerge mapping of one FHIR resource body.
//!
//! JSON objects become Automerge maps, arrays lists, strings `Str` scalars,
//! booleans `Boolean` scalars. Automerge has no decimal type and FHIR decimals must
//! keep their exact text (`1.00` is not `1.0`), so a JSON number is stored as a
//! `Str` holding [`NUMBER_TAG`] followed by the number's JSON text. A real string
//! that starts with the tag's first character (NUL) is escaped with
//! [`ESCAPE_TAG`], so no string can be read back as a number. `null` is accepted
//! only as a list element, where FHIR JSON uses it to align primitive arrays with
//! their `_element` extension arrays; anywhere else it is rejected.

use std::borrow::Cow;
use std::collections::HashMap;
use std::str::FromStr;

use automerge::transaction::Transactable;
use automerge::{ChangeHash, ObjId, ObjType, Prop, ReadDoc, ScalarValue, ScalarValueRef, ValueRef};
use serde_json::{Map, Number, Value};

use super::choice;

/// Prefix of a stored string that holds a JSON number's exact text.
pub const NUMBER_TAG: &str = "\u{0}n";
/// Prefix added to a real string that starts with NUL, so it cannot look like a number.
pub const ESCAPE_TAG: &str = "\u{0}s";

/// Why a JSON body cannot be stored. Static text only: never the offending value.
pub(crate) type Reason = &'static str;

/// Encodes a JSON number as its tagged string.
pub(crate) fn encode_number(n: &Number) -> String {
    // With `arbitrary_precision`, `Number`'s Display is the exact text it was parsed from.
    let text = n.to_string();
    let mut s = String::with_capacity(NUMBER_TAG.len() + text.len());
    s.push_str(NUMBER_TAG);
    s.push_str(&text);
    s
}

/// Encodes a JSON string, escaping one that begins with the tag character.
pub(crate) fn encode_string(s: &str) -> Cow<'_, str> {
    if s.starts_with('\u{0}') {
        let mut out = String::with_capacity(ESCAPE_TAG.len() + s.len());
        out.push_str(ESCAPE_TAG);
        out.push_str(s);
        Cow::Owned(out)
    } else {
        Cow::Borrowed(s)
    }
}

/// Decodes a stored string back into a JSON string or number.
pub(crate) fn decode_string(s: &str) -> Result<Value, Reason> {
    if !s.starts_with('\u{0}') {
        return Ok(Value::String(s.to_owned()));
    }
    if let Some(rest) = s.strip_prefix(ESCAPE_TAG) {
        return Ok(Value::String(rest.to_owned()));
    }
    if let Some(text) = s.strip_prefix(NUMBER_TAG) {
        return parse_number(text).map(Value::Number);
    }
    Err("unknown string tag")
}

/// Parses a number's JSON text, refusing anything that is not one JSON number.
///
/// The text is taken as serde_json reads it: with `arbitrary_precision` it keeps
/// digits exactly (`1.00`, `-0.0`, 36-digit decimals) but writes exponents as
/// `e+N`/`e-N` (`1E-22` reads as `1e-22`), which is value-preserving.
fn parse_number(text: &str) -> Result<Number, Reason> {
    let allowed = |b: u8| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E');
    if text.is_empty() || !text.bytes().all(allowed) {
        return Err("malformed number");
    }
    Number::from_str(text).map_err(|_| "malformed number")
}

/// Checks that a stored string scalar decodes (used on changes from peers).
pub(crate) fn check_stored_string(s: &str) -> Result<(), Reason> {
    decode_string(s).map(|_| ())
}

/// Checks that a JSON value can be stored: no `null` outside lists.
pub(crate) fn validate(value: &Value, in_list: bool) -> Result<(), Reason> {
    match value {
        Value::Null if in_list => Ok(()),
        Value::Null => Err("null is not a valid FHIR value"),
        Value::Bool(_) | Value::String(_) => Ok(()),
        Value::Number(n) => parse_number(&n.to_string()).map(|_| ()),
        Value::Array(items) => items.iter().try_for_each(|v| validate(v, true)),
        Value::Object(map) => map.values().try_for_each(|v| validate(v, false)),
    }
}

/// The Automerge scalar for a JSON scalar; `None` for objects and arrays.
pub(crate) fn scalar_of(value: &Value) -> Option<ScalarValue> {
    match value {
        Value::Null => Some(ScalarValue::Null),
        Value::Bool(b) => Some(ScalarValue::Boolean(*b)),
        Value::Number(n) => Some(ScalarValue::Str(encode_number(n).into())),
        Value::String(s) => Some(ScalarValue::Str(encode_string(s).as_ref().into())),
        Value::Array(_) | Value::Object(_) => None,
    }
}

/// Writes `value` at `prop` of `obj` (a put, replacing whatever was there).
pub(crate) fn put_value<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    prop: Prop,
    value: &Value,
) -> Result<(), automerge::AutomergeError> {
    match scalar_of(value) {
        Some(s) => tx.put(obj, prop, s),
        None => tx.batch_create_object(obj, prop, &hydrate(value), false).map(drop),
    }
}

/// `value` as an Automerge `hydrate` tree with this module's scalars, for
/// [`Transactable::batch_create_object`]: a new object becomes its ops in two OpSet
/// splices instead of one per node (Automerge 0.12 makes a local op costly: ~15 µs
/// each, so a 1 KiB resource took ~1.3 ms op by op). The ops are the same kinds as
/// one put or insert per node, in Automerge's order (map keys sorted).
pub(crate) fn hydrate(value: &Value) -> automerge::hydrate::Value {
    use automerge::hydrate;
    match value {
        Value::Object(map) => hydrate_map(map),
        Value::Array(items) => hydrate::Value::List(items.iter().map(hydrate).collect::<Vec<_>>().into()),
        scalar => hydrate::Value::Scalar(scalar_of(scalar).unwrap_or(ScalarValue::Null)),
    }
}

/// [`hydrate`] of a JSON object.
pub(crate) fn hydrate_map(map: &Map<String, Value>) -> automerge::hydrate::Value {
    let entries: HashMap<String, automerge::hydrate::Value> =
        map.iter().map(|(k, v)| (k.clone(), hydrate(v))).collect();
    automerge::hydrate::Value::Map(entries.into())
}

/// Three-way merge of one map: writes into the current object `obj` only what differs
/// between `base` (what the client read) and `submitted`.
///
/// Keys equal in base and submitted are left alone, so a peer's concurrent edit there
/// survives. Nested maps are merged recursively; lists of equal length (in base,
/// submitted and the current document) element-wise; any other difference is a put of
/// the submitted value, which replaces a list wholesale as a new list object (so
/// concurrent replacements resolve last-writer-wins and never interleave).
pub(crate) fn merge_map<T: Transactable + ReadDoc>(
    tx: &mut T,
    obj: &ObjId,
    base: &Map<String, Value>,
    submitted: &Map<String, Value>,
) -> Result<(), automerge::AutomergeError> {
    for (k, sv) in submitted {
        let bv = base.get(k);
        if bv == Some(sv) {
            continue;
        }
        merge_prop(tx, obj, Prop::Map(k.as_str().into()), bv, sv)?;
        if let Some(prefix) = choice::choice_prefix(k) {
            // A new alternative of a choice element replaces the others the client could
            // not see (written by peers since its base), so the merge stays valid FHIR.
            let siblings: Vec<String> = tx
                .keys(obj)
                .filter(|other| {
                    other != k
                        && !submitted.contains_key(other.as_str())
                        && choice::choice_prefix(other) == Some(prefix)
                })
                .collect();
            for other in siblings {
                tx.delete(obj, other.as_str())?;
            }
        }
    }
    for k in base.keys() {
        if !submitted.contains_key(k) && tx.get(obj, k.as_str())?.is_some() {
            tx.delete(obj, k.as_str())?;
        }
    }
    Ok(())
}

fn merge_prop<T: Transactable + ReadDoc>(
    tx: &mut T,
    obj: &ObjId,
    prop: Prop,
    base: Option<&Value>,
    submitted: &Value,
) -> Result<(), automerge::AutomergeError> {
    let current = tx.get(obj, prop.clone())?.map(|(v, id)| (v.to_objtype(), id));
    match (base, submitted, current) {
        (Some(Value::Object(b)), Value::Object(s), Some((Some(ObjType::Map), id))) => merge_map(tx, &id, b, s),
        (Some(Value::Array(b)), Value::Array(s), Some((Some(ObjType::List), id)))
            if b.len() == s.len() && tx.length(&id) == s.len() =>
        {
            for (i, (bi, si)) in b.iter().zip(s).enumerate() {
                if bi != si {
                    merge_prop(tx, &id, Prop::Seq(i), Some(bi), si)?;
                }
            }
            Ok(())
        }
        _ => put_value(tx, obj, prop, submitted),
    }
}

/// Where to read the document: now, or as of a set of change hashes.
#[derive(Clone, Copy)]
pub(crate) enum At<'a> {
    Now,
    Heads(&'a [ChangeHash]),
}

/// Renders an Automerge map as JSON, resolving concurrent choice-element alternatives.
pub(crate) fn render_map<D: ReadDoc>(doc: &D, obj: &ObjId, at: At<'_>) -> Result<Map<String, Value>, Reason> {
    let items: Vec<_> = match at {
        At::Now => doc.map_range(obj, ..).collect(),
        At::Heads(h) => doc.map_range_at(obj, .., h).collect(),
    };
    // Of several alternatives of one choice element (left by concurrent edits), keep the
    // one whose op is greatest in Automerge's (counter, actor) order: identical on every
    // replica that holds the same changes.
    let mut winners: HashMap<&str, (ObjId, usize)> = HashMap::new();
    let mut choice_count = 0usize;
    for (i, item) in items.iter().enumerate() {
        if let Some(prefix) = choice::choice_prefix(&item.key) {
            choice_count += 1;
            let id = item.id();
            match winners.get(prefix) {
                Some((best, _)) if *best >= id => {}
                _ => {
                    winners.insert(prefix, (id, i));
                }
            }
        }
    }
    let conflicted = choice_count > winners.len();
    let mut out = Map::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        if conflicted
            && let Some(prefix) = choice::choice_prefix(&item.key)
            && winners.get(prefix).map(|(_, w)| *w) != Some(i)
        {
            continue;
        }
        let value = match &item.value {
            ValueRef::Object(t) => render_object(doc, &item.id(), *t, at)?,
            ValueRef::Scalar(s) => render_scalar(s)?,
        };
        out.insert(item.key.to_string(), value);
    }
    Ok(out)
}

fn render_list<D: ReadDoc>(doc: &D, obj: &ObjId, at: At<'_>) -> Result<Vec<Value>, Reason> {
    let items: Vec<_> = match at {
        At::Now => doc.list_range(obj, ..).collect(),
        At::Heads(h) => doc.list_range_at(obj, .., h).collect(),
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let value = match &item.value {
            ValueRef::Object(t) => render_object(doc, &item.id(), *t, at)?,
            ValueRef::Scalar(s) => render_scalar(s)?,
        };
        out.push(value);
    }
    Ok(out)
}

fn render_object<D: ReadDoc>(doc: &D, id: &ObjId, t: ObjType, at: At<'_>) -> Result<Value, Reason> {
    match t {
        ObjType::Map => render_map(doc, id, at).map(Value::Object),
        ObjType::List => render_list(doc, id, at).map(Value::Array),
        ObjType::Table | ObjType::Text => Err("unexpected object type"),
    }
}

fn render_scalar(s: &ScalarValueRef<'_>) -> Result<Value, Reason> {
    match s {
        ScalarValueRef::Str(s) => decode_string(s),
        ScalarValueRef::Boolean(b) => Ok(Value::Bool(*b)),
        ScalarValueRef::Null => Ok(Value::Null),
        _ => Err("unexpected scalar type"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_keep_their_text() {
        for text in [
            "1.00",
            "1000000000000000000",
            "-0.0",
            "3.14159265358979323846264338327950288",
            "0",
        ] {
            let n = Number::from_str(text).unwrap();
            let enc = encode_number(&n);
            assert_eq!(decode_string(&enc).unwrap(), Value::Number(n), "case {text}");
            assert_eq!(decode_string(&enc).unwrap().to_string(), text, "case {text}");
        }
        // serde_json normalises exponent notation when it parses; the value survives.
        for (text, read) in [("1E-22", "1e-22"), ("1e5", "1e+5")] {
            let n: Value = serde_json::from_str(text).unwrap();
            let Value::Number(n) = n else { panic!("case {text}") };
            let enc = encode_number(&n);
            assert_eq!(decode_string(&enc).unwrap().to_string(), read, "case {text}");
        }
        assert_ne!(
            Value::Number(Number::from_str("1.0").unwrap()),
            Value::Number(Number::from_str("1.00").unwrap()),
            "Value equality must compare number text"
        );
    }

    #[test]
    fn strings_that_look_like_numbers_stay_strings() {
        for s in ["\u{0}n:1.00", "\u{0}n1.00", "\u{0}s", "\u{0}", "1.00", ""] {
            let enc = encode_string(s);
            assert_eq!(decode_string(&enc).unwrap(), Value::String(s.to_owned()), "case {s:?}");
        }
    }

    #[test]
    fn malformed_tags_are_errors() {
        for s in ["\u{0}x1", "\u{0}n", "\u{0}n 1", "\u{0}n1.0.0", "\u{0}nabc"] {
            assert!(decode_string(s).is_err(), "case {s:?}");
        }
    }

    #[test]
    fn null_only_in_lists() {
        let ok: Value = serde_json::from_str(r#"{"given":["a",null],"_given":[null,{"id":"x"}]}"#).unwrap();
        assert!(validate(&ok, false).is_ok());
        let bad: Value = serde_json::from_str(r#"{"a":{"b":null}}"#).unwrap();
        assert!(validate(&bad, false).is_err());
    }
}
