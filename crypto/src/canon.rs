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

/// Encodes a value holding secrets into a zeroizing buffer sized up front
/// (`capacity`), so no reallocation leaves a stray copy behind.
pub(crate) fn encode_secret(value: &Value, capacity: usize) -> zeroize::Zeroizing<Vec<u8>> {
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(capacity));
    if ciborium::ser::into_writer(value, &mut *out).is_err() {
        out.clear();
    }
    out
}

/// Overwrites every byte string inside `value` with zeros (secrets that
/// passed through a [`Value`]).
pub(crate) fn zeroize_value(value: &mut Value) {
    use zeroize::Zeroize as _;
    match value {
        Value::Bytes(b) => b.zeroize(),
        Value::Array(items) => items.iter_mut().for_each(zeroize_value),
        _ => {}
    }
}

/// Parses one canonical CBOR item that must fill `bytes` exactly and holds
/// at most `max_items` data items (arrays and their members all count).
///
/// The structure is walked first without allocating, so a hostile input
/// cannot make the decoder build millions of values out of a few megabytes,
/// and non-canonical heads are refused before any parsing. The value is then
/// parsed and re-encoded, and the re-encoding must equal the input.
pub(crate) fn decode(kind: &'static str, bytes: &[u8], max: usize, max_items: usize) -> Result<Value> {
    decode_inner(kind, bytes, max, max_items, false)
}

/// [`decode`] for plaintext that holds secrets: the re-encoding made for the
/// canonical check is zeroized.
pub(crate) fn decode_secret(kind: &'static str, bytes: &[u8], max: usize, max_items: usize) -> Result<Value> {
    decode_inner(kind, bytes, max, max_items, true)
}

fn decode_inner(kind: &'static str, bytes: &[u8], max: usize, max_items: usize, secret: bool) -> Result<Value> {
    if bytes.len() > max {
        return Err(Error::TooLarge {
            kind,
            len: bytes.len(),
            max,
        });
    }
    scan(kind, bytes, max_items)?;
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
    let canonical = if secret {
        *encode_secret(&value, bytes.len()) == bytes
    } else {
        encode(&value) == bytes
    };
    if !canonical {
        return Err(Error::NonCanonical { kind });
    }
    Ok(value)
}

/// Walks the data items of `bytes` without building them: definite lengths,
/// shortest-form heads, only unsigned and negative integers, byte and text
/// strings, arrays and `null`; exactly one top-level item; at most
/// `max_items` items; nesting at most [`MAX_DEPTH`].
fn scan(kind: &'static str, bytes: &[u8], max_items: usize) -> Result<()> {
    let malformed = |reason| Error::Malformed { kind, reason };
    let mut pos = 0usize;
    let mut items = 0usize;
    // Items still to read at each open nesting level; the outermost is the single top-level item.
    let mut pending: Vec<u64> = vec![1];
    while let Some(left) = pending.last_mut() {
        if *left == 0 {
            pending.pop();
            continue;
        }
        *left -= 1;
        items += 1;
        if items > max_items {
            return Err(malformed("too many items"));
        }
        let &initial = bytes.get(pos).ok_or(malformed("truncated"))?;
        pos += 1;
        let major = initial >> 5;
        let info = initial & 0x1f;
        if major == 7 {
            // Only `null` (simple value 22) is used; floats, booleans and breaks are not.
            if initial == 0xf6 {
                continue;
            }
            return Err(if info == 31 {
                Error::NonCanonical { kind }
            } else {
                malformed("float or simple value")
            });
        }
        let arg = match info {
            0..=23 => u64::from(info),
            24..=27 => {
                let n = 1usize << (info - 24);
                let raw = bytes.get(pos..pos + n).ok_or(malformed("truncated"))?;
                pos += n;
                let v = raw.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
                let shortest = match info {
                    24 => v >= 24,
                    25 => v > 0xff,
                    26 => v > 0xffff,
                    _ => v > 0xffff_ffff,
                };
                if !shortest {
                    return Err(Error::NonCanonical { kind });
                }
                v
            }
            31 => return Err(Error::NonCanonical { kind }),
            _ => return Err(malformed("reserved additional information")),
        };
        match major {
            0 | 1 => {}
            2 | 3 => {
                let len = usize::try_from(arg).map_err(|_| malformed("truncated"))?;
                if bytes.len() - pos < len {
                    return Err(malformed("truncated"));
                }
                pos += len;
            }
            4 => {
                if pending.len() > MAX_DEPTH {
                    return Err(malformed("nested too deeply"));
                }
                // Each member is at least one byte: a length beyond the input is a lie.
                if arg > (bytes.len() - pos) as u64 {
                    return Err(malformed("truncated"));
                }
                pending.push(arg);
            }
            5 => return Err(malformed("maps are not used")),
            _ => return Err(malformed("tags are not used")),
        }
    }
    if pos != bytes.len() {
        return Err(malformed("trailing bytes"));
    }
    Ok(())
}

/// Deepest array nesting any medmesh object uses, with room to spare.
const MAX_DEPTH: usize = 8;

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

    /// A fixed-length secret byte string; the decoded buffer is zeroized.
    pub(crate) fn secret_bytes<const N: usize>(&mut self) -> Result<zeroize::Zeroizing<[u8; N]>> {
        use zeroize::Zeroize as _;
        match self.next()? {
            Value::Bytes(mut b) => {
                let out = <[u8; N]>::try_from(b.as_slice())
                    .map(zeroize::Zeroizing::new)
                    .map_err(|_| self.malformed("byte string of wrong length"));
                b.zeroize();
                out
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
