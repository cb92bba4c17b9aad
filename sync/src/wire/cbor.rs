//! The CBOR plumbing every message shares: value builders for encoding,
//! the [`Fields`] reader that decodes one array field by field against its
//! bounds, and the typed [`Error::Wire`] every decoding failure becomes.

use ciborium::Value;
use medmesh_node::item::{Item, ItemKind};

use crate::{Error, Result};

pub(super) fn uint(n: u64) -> Value {
    Value::Integer(n.into())
}

pub(super) fn bytes(b: &[u8]) -> Value {
    Value::Bytes(b.to_vec())
}

pub(super) fn items_value(items: &[Item]) -> Value {
    Value::Array(
        items
            .iter()
            .map(|i| Value::Array(vec![uint(i.kind.code().into()), bytes(&i.bytes)]))
            .collect(),
    )
}

pub(super) fn to_bytes(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail; an error here would be a ciborium bug,
    // and an empty frame is then rejected by the peer.
    if ciborium::into_writer(value, &mut out).is_err() {
        out.clear();
    }
    out
}

pub(super) fn wire(message: &'static str, reason: &'static str) -> Error {
    Error::Wire { message, reason }
}

pub(super) fn fixed_of<const N: usize>(message: &'static str, v: Value) -> Result<[u8; N]> {
    match v {
        Value::Bytes(b) => b.try_into().map_err(|_| wire(message, "byte string of wrong length")),
        _ => Err(wire(message, "expected a byte string")),
    }
}

pub(super) fn decode_items(message: &'static str, values: Vec<Value>) -> Result<Vec<Item>> {
    values
        .into_iter()
        .map(|v| {
            let mut f = Fields::nested(message, v, 2)?;
            let kind = ItemKind::from_code(f.uint()?).ok_or_else(|| wire(message, "unknown item kind"))?;
            let bytes = match f.next()? {
                Value::Bytes(b) if !b.is_empty() && b.len() <= kind.max_bytes() => b,
                Value::Bytes(_) => return Err(wire(message, "item empty or over its kind's cap")),
                _ => return Err(wire(message, "item is not a byte string")),
            };
            Ok(Item { kind, bytes })
        })
        .collect()
}

/// Reads the fields of one CBOR array in order.
pub(super) struct Fields {
    message: &'static str,
    pub(super) len: usize,
    values: std::vec::IntoIter<Value>,
}

impl Fields {
    pub(super) fn top(message: &'static str, frame: &[u8]) -> Result<Self> {
        let value: Value = ciborium::de::from_reader_with_recursion_limit(frame, 16)
            .map_err(|_| wire(message, "not well-formed CBOR"))?;
        match value {
            Value::Array(values) if !values.is_empty() => Ok(Self {
                message,
                len: values.len(),
                values: values.into_iter(),
            }),
            _ => Err(wire(message, "not a non-empty array")),
        }
    }

    pub(super) fn nested(message: &'static str, value: Value, len: usize) -> Result<Self> {
        match value {
            Value::Array(values) if values.len() == len => Ok(Self {
                message,
                len,
                values: values.into_iter(),
            }),
            _ => Err(wire(message, "wrong field count")),
        }
    }

    pub(super) fn expect_len(&self, len: usize) -> Result<()> {
        if self.len == len {
            Ok(())
        } else {
            Err(wire(self.message, "wrong field count"))
        }
    }

    pub(super) fn next(&mut self) -> Result<Value> {
        self.values.next().ok_or_else(|| wire(self.message, "missing field"))
    }

    pub(super) fn uint(&mut self) -> Result<u64> {
        match self.next()? {
            Value::Integer(i) => u64::try_from(i).map_err(|_| wire(self.message, "integer out of range")),
            _ => Err(wire(self.message, "expected an unsigned integer")),
        }
    }

    pub(super) fn bool(&mut self) -> Result<bool> {
        match self.next()? {
            Value::Bool(b) => Ok(b),
            _ => Err(wire(self.message, "expected a boolean")),
        }
    }

    pub(super) fn text(&mut self, max: usize) -> Result<String> {
        match self.next()? {
            Value::Text(t) if t.len() <= max => Ok(t),
            _ => Err(wire(self.message, "expected short text")),
        }
    }

    pub(super) fn fixed<const N: usize>(&mut self) -> Result<[u8; N]> {
        let message = self.message;
        fixed_of(message, self.next()?)
    }

    /// A byte string (bounded by the frame cap the caller already checked).
    pub(super) fn byte_vec(&mut self) -> Result<Vec<u8>> {
        match self.next()? {
            Value::Bytes(b) => Ok(b),
            _ => Err(wire(self.message, "expected a byte string")),
        }
    }

    pub(super) fn array(&mut self, max: usize) -> Result<Vec<Value>> {
        match self.next()? {
            Value::Array(a) if a.len() <= max => Ok(a),
            Value::Array(_) => Err(wire(self.message, "too many elements")),
            _ => Err(wire(self.message, "expected an array")),
        }
    }
}
