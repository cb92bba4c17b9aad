//! Deterministic CBOR: every object is a definite-length array of fields in
//! declared order, integers in shortest form, no floats, no maps, no tags.
//!
//! Decoding parses, then re-encodes and compares: any input that is not the
//! single canonical encoding of its value is refused, so a signature can
//! never cover two different byte strings for one value.

use ciborium::Value;

use crate::{Error, Result};

/// Encodes a value canonically.
pub(crate) fn encode(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    // Writing into a Vec cannot fail, and every Value we build is encodable.
    if ciborium::ser::into_writer(value, &mut out).is_err() {
        out.clear();
    }
    out
}

/// Parses one canonical CBOR item that must fill `bytes` exactly.
pub(crate) fn decode(kind: &'static str, bytes: &[u8], max: usize) -> Result<Value> {
    if bytes.len() > max {
        return Err(Error::TooLarge {
            kind,
            len: bytes.len(),
            max,
        });
    }
    let mut reader = bytes;
    let value: Value = ciborium::de::from_reader(&mut reader).map_err(|_| Error::Malformed {
        kind,
        reason: "not CBOR",
    })?;
    if !reader.is_empty() {
        return Err(Error::Malformed {
            kind,
            reason: "trailing bytes",
        });
    }
    if encode(&value) != bytes {
        return Err(Error::NonCanonical { kind });
    }
    Ok(value)
}

/// Reads the fields of a CBOR array in order, with typed errors.
pub(crate) struct Fields {
    kind: &'static str,
    items: std::vec::IntoIter<Value>,
}

impl Fields {
    /// Opens `value` as an array of exactly `len` fields.
    pub(crate) fn new(kind: &'static str, value: Value, len: usize) -> Result<Self> {
        match value {
            Value::Array(items) if items.len() == len => Ok(Self {
                kind,
                items: items.into_iter(),
            }),
            Value::Array(_) => Err(Error::Malformed {
                kind,
                reason: "wrong number of fields",
            }),
            _ => Err(Error::Malformed {
                kind,
                reason: "not an array",
            }),
        }
    }

    /// Opens `value` as an array and checks its first field, the format
    /// version, before looking at the field count: a newer version may
    /// carry more fields and must be reported as unsupported, not malformed.
    pub(crate) fn versioned(kind: &'static str, value: Value, version: u64, len: usize) -> Result<Self> {
        let Value::Array(items) = value else {
            return Err(Error::Malformed {
                kind,
                reason: "not an array",
            });
        };
        match items
            .first()
            .and_then(|v| v.as_integer())
            .and_then(|i| u64::try_from(i).ok())
        {
            Some(v) if v == version => {}
            Some(v) => return Err(Error::UnsupportedVersion { kind, version: v }),
            None => {
                return Err(Error::Malformed {
                    kind,
                    reason: "missing format version",
                });
            }
        }
        let mut fields = Self::new(kind, Value::Array(items), len)?;
        fields.next()?;
        Ok(fields)
    }

    fn malformed(&self, reason: &'static str) -> Error {
        Error::Malformed {
            kind: self.kind,
            reason,
        }
    }

    /// The next field, whatever its type.
    pub(crate) fn value(&mut self) -> Result<Value> {
        self.next()
    }

    fn next(&mut self) -> Result<Value> {
        self.items.next().ok_or(Error::Malformed {
            kind: self.kind,
            reason: "missing field",
        })
    }

    pub(crate) fn uint(&mut self) -> Result<u64> {
        match self.next()? {
            Value::Integer(i) => u64::try_from(i).map_err(|_| self.malformed("expected unsigned integer")),
            _ => Err(self.malformed("expected unsigned integer")),
        }
    }

    pub(crate) fn opt_uint(&mut self) -> Result<Option<u64>> {
        match self.next()? {
            Value::Null => Ok(None),
            Value::Integer(i) => u64::try_from(i)
                .map(Some)
                .map_err(|_| self.malformed("expected unsigned integer or null")),
            _ => Err(self.malformed("expected unsigned integer or null")),
        }
    }

    pub(crate) fn bytes<const N: usize>(&mut self) -> Result<[u8; N]> {
        match self.next()? {
            Value::Bytes(b) => {
                <[u8; N]>::try_from(b.as_slice()).map_err(|_| self.malformed("byte string of wrong length"))
            }
            _ => Err(self.malformed("expected byte string")),
        }
    }

    pub(crate) fn opt_bytes<const N: usize>(&mut self) -> Result<Option<[u8; N]>> {
        match self.next()? {
            Value::Null => Ok(None),
            Value::Bytes(b) => <[u8; N]>::try_from(b.as_slice())
                .map(Some)
                .map_err(|_| self.malformed("byte string of wrong length")),
            _ => Err(self.malformed("expected byte string or null")),
        }
    }

    pub(crate) fn byte_vec(&mut self, max: usize) -> Result<Vec<u8>> {
        match self.next()? {
            Value::Bytes(b) if b.len() <= max => Ok(b),
            Value::Bytes(_) => Err(self.malformed("byte string too long")),
            _ => Err(self.malformed("expected byte string")),
        }
    }

    pub(crate) fn text(&mut self, max: usize) -> Result<String> {
        match self.next()? {
            Value::Text(t) if t.len() <= max => Ok(t),
            Value::Text(_) => Err(self.malformed("text too long")),
            _ => Err(self.malformed("expected text")),
        }
    }

    /// An array field, returned as its items (each still to be read).
    pub(crate) fn array(&mut self, max_items: usize) -> Result<Vec<Value>> {
        match self.next()? {
            Value::Array(items) if items.len() <= max_items => Ok(items),
            Value::Array(_) => Err(self.malformed("too many items")),
            _ => Err(self.malformed("expected array")),
        }
    }

    pub(crate) fn kind(&self) -> &'static str {
        self.kind
    }
}

pub(crate) fn uint(v: u64) -> Value {
    Value::Integer(v.into())
}

pub(crate) fn bytes(b: &[u8]) -> Value {
    Value::Bytes(b.to_vec())
}

pub(crate) fn text(t: &str) -> Value {
    Value::Text(t.to_owned())
}

pub(crate) fn opt_uint(v: Option<u64>) -> Value {
    v.map_or(Value::Null, uint)
}

pub(crate) fn opt_bytes(b: Option<&[u8]>) -> Value {
    b.map_or(Value::Null, bytes)
}

/// `tag || body`: what a signature covers. The tag keeps a signature over
/// one kind of object from ever verifying as another kind.
pub(crate) fn tagged(tag: &[u8], body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(tag.len() + body.len());
    msg.extend_from_slice(tag);
    msg.extend_from_slice(body);
    msg
}
