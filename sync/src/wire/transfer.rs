//! Snapshot transfers on the wire: the offers a page carries, the payload
//! of a transfer, and its compact headers (CBOR, DEFLATE-compressed, with
//! bounded inflation).

use ciborium::Value;
use medmesh_crypto::{Collection, CompactHeader, PatientId};

use super::cbor::wire;
use super::{MAX_INFLATED_HEADERS_BYTES, MAX_RESPONSE_BYTES, MAX_TRANSFER_HEADERS, TRANSFER_SLACK};
use crate::Result;

/// "Envelopes of (patient, collection) were left out of this page: the
/// snapshot transfer made from local snapshot `source` covers them."
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Offer {
    /// The patient.
    pub patient: PatientId,
    /// The collection.
    pub collection: Collection,
    /// Which transfer (its local snapshot's fingerprint).
    pub source: [u8; 32],
}

/// A snapshot transfer on the wire (see `medmesh_node::transfer`).
#[derive(Clone, PartialEq, Eq)]
pub struct SnapshotPayload {
    /// Which transfer (its local snapshot's fingerprint).
    pub source: [u8; 32],
    /// The document, sealed under an epoch key of the collection.
    pub sealed_doc: Vec<u8>,
    /// The compact headers ([`encode_compact_headers`]).
    pub headers: Vec<u8>,
    /// How many headers.
    pub count: u32,
}

impl std::fmt::Debug for SnapshotPayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotPayload")
            .field("doc_bytes", &self.sealed_doc.len())
            .field("header_bytes", &self.headers.len())
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl SnapshotPayload {
    /// Whether a payload of these sizes fits one response frame.
    pub fn fits(sealed_doc: usize, headers: usize) -> bool {
        sealed_doc.saturating_add(headers).saturating_add(TRANSFER_SLACK) <= MAX_RESPONSE_BYTES
    }
}

/// Compact headers as a transfer carries them: the CBOR array of their
/// encodings, DEFLATE-compressed (they repeat patient, collection, key id,
/// author and grant, which compress away).
pub fn encode_compact_headers(headers: &[CompactHeader]) -> Vec<u8> {
    let value = Value::Array(headers.iter().map(CompactHeader::to_value).collect());
    let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing into a Vec cannot fail; an empty result is refused by the peer.
    if ciborium::into_writer(&value, &mut encoder).is_err() {
        return Vec::new();
    }
    encoder.finish().unwrap_or_default()
}

/// Inflates and parses what [`encode_compact_headers`] made, expecting
/// `count` headers; bounded by [`MAX_INFLATED_HEADERS_BYTES`] and
/// [`MAX_TRANSFER_HEADERS`].
///
/// # Errors
/// [`Error::Wire`](crate::Error::Wire) for anything else.
pub fn decode_compact_headers(blob: &[u8], count: u32) -> Result<Vec<CompactHeader>> {
    use std::io::Read as _;
    if count as usize > MAX_TRANSFER_HEADERS {
        return Err(wire("snapshot", "too many headers"));
    }
    let mut inflated = Vec::new();
    flate2::read::DeflateDecoder::new(blob)
        .take(MAX_INFLATED_HEADERS_BYTES as u64 + 1)
        .read_to_end(&mut inflated)
        .map_err(|_| wire("snapshot", "headers do not inflate"))?;
    if inflated.len() > MAX_INFLATED_HEADERS_BYTES {
        return Err(wire("snapshot", "headers inflate over the cap"));
    }
    let value: Value = ciborium::de::from_reader_with_recursion_limit(&inflated[..], 16)
        .map_err(|_| wire("snapshot", "headers are not well-formed CBOR"))?;
    let Value::Array(values) = value else {
        return Err(wire("snapshot", "headers are not an array"));
    };
    if values.len() != count as usize {
        return Err(wire("snapshot", "header count differs from the announced one"));
    }
    values
        .into_iter()
        .map(|v| CompactHeader::from_value(v).map_err(|_| wire("snapshot", "a compact header does not parse")))
        .collect()
}

/// [`decode_compact_headers`] of a transfer of (patient, collection): every
/// header must name them.
///
/// # Errors
/// [`Error::Wire`](crate::Error::Wire).
pub fn decode_transfer_headers(
    blob: &[u8],
    count: u32,
    patient: PatientId,
    collection: Collection,
) -> Result<Vec<CompactHeader>> {
    let headers = decode_compact_headers(blob, count)?;
    if headers
        .iter()
        .any(|h| h.header().patient != patient || h.header().collection != collection)
    {
        return Err(wire("snapshot", "a header of another patient or collection"));
    }
    Ok(headers)
}
