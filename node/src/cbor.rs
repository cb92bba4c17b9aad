//! The CBOR encoding of values the node hashes or stores (audit entries,
//! store metadata), written once.

use ciborium::Value;

/// `value` as CBOR bytes.
pub(crate) fn encode(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    // Writing into a Vec does not fail for the values built here.
    if ciborium::ser::into_writer(value, &mut out).is_err() {
        out.clear();
    }
    out
}
