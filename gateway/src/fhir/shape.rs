//! Structural limits of a JSON request body, checked on the bytes before the
//! body is parsed into a `serde_json::Value` and validated.
//!
//! Parsing and validating cost memory and time per JSON value, not per byte:
//! a 3 MB Patient with a million empty `name` entries once took 25 s, 2.5 GiB
//! and answered a 140 MB OperationOutcome (issue 15). This walk visits every
//! value once without building anything, and refuses the body at the first
//! limit crossed, so what follows it works on a bounded number of values.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Most JSON values (objects, arrays, strings, numbers, ...) in one body.
/// The largest real Bundle we hold (Synthea, 717 KB) has 16,803; an 8 MiB body
/// of the same density has about 200,000.
pub const MAX_ELEMENTS: usize = 250_000;
/// Most items in one JSON array (a Bundle's entries included).
pub const MAX_ARRAY_ITEMS: usize = 10_000;
/// Deepest nesting of arrays and objects (the body itself is depth 1). Real
/// resources nest 12 deep; serde_json's own recursion limit is 128.
pub const MAX_DEPTH: usize = 32;

/// A limit a body crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    /// More than [`MAX_ELEMENTS`] values.
    Elements,
    /// An array of more than [`MAX_ARRAY_ITEMS`] items.
    ArrayItems,
    /// Nesting deeper than [`MAX_DEPTH`].
    Depth,
}

impl fmt::Display for Exceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Elements => write!(f, "the body has more than {MAX_ELEMENTS} JSON values"),
            Self::ArrayItems => write!(f, "the body has an array of more than {MAX_ARRAY_ITEMS} items"),
            Self::Depth => write!(f, "the body nests arrays and objects more than {MAX_DEPTH} deep"),
        }
    }
}

/// Checks `bytes` against the structural limits.
///
/// Returns `Ok` for a body within them *or not valid JSON*: syntax errors are
/// reported by the parse that follows, with its position.
///
/// # Errors
/// The first limit crossed.
pub fn check(bytes: &[u8]) -> Result<(), Exceeded> {
    let mut tally = Tally {
        elements: 0,
        exceeded: None,
    };
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let walked = Walk {
        tally: &mut tally,
        depth: 1,
    }
    .deserialize(&mut de);
    match (walked, tally.exceeded) {
        (Err(_), Some(exceeded)) => Err(exceeded),
        _ => Ok(()),
    }
}

struct Tally {
    elements: usize,
    /// Set when a limit stops the walk (the walk's error only says it stopped).
    exceeded: Option<Exceeded>,
}

impl Tally {
    fn count<E: de::Error>(&mut self) -> Result<(), E> {
        self.elements += 1;
        if self.elements > MAX_ELEMENTS {
            return self.stop(Exceeded::Elements);
        }
        Ok(())
    }

    fn stop<E: de::Error>(&mut self, exceeded: Exceeded) -> Result<(), E> {
        self.exceeded = Some(exceeded);
        Err(E::custom("structural limit"))
    }
}

/// Visits one value at `depth`, counting it and everything inside it.
struct Walk<'a> {
    tally: &'a mut Tally,
    depth: usize,
}

impl Walk<'_> {
    fn inner(&mut self) -> Walk<'_> {
        Walk {
            tally: self.tally,
            depth: self.depth + 1,
        }
    }

    fn container<E: de::Error>(&mut self) -> Result<(), E> {
        self.tally.count()?;
        if self.depth > MAX_DEPTH {
            return self.tally.stop(Exceeded::Depth);
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

/// With serde_json's `arbitrary_precision`, a number arrives as a one-entry
/// map under this key.
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

/// A map key: whether it is serde_json's number token (nothing is allocated).
struct Key;

impl Visitor<'_> for Key {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        Ok(key == NUMBER_TOKEN)
    }
}

impl<'de> DeserializeSeed<'de> for Key {
    type Value = bool;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_identifier(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.tally.count()
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.tally.count()
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.tally.count()
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.tally.count()
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.tally.count()
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.tally.count()
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        self.container()?;
        let mut items = 0usize;
        while seq.next_element_seed(self.inner())?.is_some() {
            items += 1;
            if items > MAX_ARRAY_ITEMS {
                return self.tally.stop(Exceeded::ArrayItems);
            }
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        let Some(number) = map.next_key_seed(Key)? else {
            return self.container();
        };
        if number {
            map.next_value::<IgnoredAny>()?;
            return self.tally.count();
        }
        self.container()?;
        map.next_value_seed(self.inner())?;
        while map.next_key::<IgnoredAny>()?.is_some() {
            map.next_value_seed(self.inner())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> String {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn limits_are_exact() {
        let array = |n: usize| format!("[{}]", vec!["1"; n].join(","));
        assert_eq!(check(array(MAX_ARRAY_ITEMS).as_bytes()), Ok(()));
        assert_eq!(check(array(MAX_ARRAY_ITEMS + 1).as_bytes()), Err(Exceeded::ArrayItems));
        assert_eq!(check(nested(MAX_DEPTH).as_bytes()), Ok(()));
        assert_eq!(check(nested(MAX_DEPTH + 1).as_bytes()), Err(Exceeded::Depth));
        // Objects count as nesting; numbers (a map inside serde_json) do not.
        let objects = format!("{}1.50{}", r#"{"a":"#.repeat(MAX_DEPTH), "}".repeat(MAX_DEPTH));
        assert_eq!(check(objects.as_bytes()), Ok(()));
        // The outer array, 25 arrays of 4,999 `["x"]` (two values each), then
        // one array of `n` numbers: 249,976 + 1 + n values.
        let chunk = format!("[{}]", vec![r#"["x"]"#; 4_999].join(","));
        let with_tail = |n: usize| {
            let tail = format!("[{}]", vec!["1"; n].join(","));
            format!("[{},{tail}]", vec![chunk.as_str(); 25].join(","))
        };
        assert_eq!(check(with_tail(23).as_bytes()), Ok(()));
        assert_eq!(check(with_tail(24).as_bytes()), Err(Exceeded::Elements));
    }

    #[test]
    fn syntax_errors_are_left_to_the_parser() {
        for bad in ["", "{", r#"{"a":}"#, "[1,]", "nul"] {
            assert_eq!(check(bad.as_bytes()), Ok(()), "{bad}");
        }
    }

    #[test]
    fn a_million_empty_names_stop_at_the_array_limit() {
        let names = vec!["{}"; 1_000_000].join(",");
        let body = format!(r#"{{"resourceType":"Patient","name":[{names}]}}"#);
        assert_eq!(check(body.as_bytes()), Err(Exceeded::ArrayItems));
    }
}
