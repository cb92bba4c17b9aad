//! `/medmesh/sync/1`: the wire messages, their CBOR encoding, their size caps
//! and the request-response codec that enforces them. Every message is
//! decoded into a typed value and checked against its bounds before any
//! other code sees it. Specified in `docs/protocol.md`.
//!
//! This module owns the protocol name, the size caps and the codec; the
//! messages and their encodings live in submodules by job: [`Request`]
//! (`request.rs`) and [`Response`] (`response.rs`), each with its CBOR
//! encoding and validating decoder; the CBOR field reader they share
//! (`cbor.rs`); audit entries (`audit.rs`), outbox reports (`outbox.rs`),
//! snapshot transfers and their compact headers (`transfer.rs`) and the
//! anti-entropy digests (`digest.rs`).

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;

use crate::Error;

mod audit;
mod cbor;
mod digest;
mod outbox;
mod request;
mod response;
#[cfg(test)]
mod tests;
mod transfer;

pub use audit::audit_entry_size_bound;
pub use digest::{DigestParts, patient_digest, summary_digest};
pub use outbox::{OutboxReport, OwedItem};
pub use request::Request;
pub use response::{RefusalCode, Response};
pub use transfer::{Offer, SnapshotPayload, decode_compact_headers, decode_transfer_headers, encode_compact_headers};

/// The protocol name.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/medmesh/sync/1");
/// Largest request frame: one push of a maximal envelope plus framing.
pub const MAX_REQUEST_BYTES: usize = 9 * 1024 * 1024;
/// Largest response frame: a page's byte budget plus one maximal envelope.
pub const MAX_RESPONSE_BYTES: usize = 17 * 1024 * 1024;
/// A server stops adding items to a page once it holds this many bytes.
pub const PAGE_BYTE_BUDGET: usize = 8 * 1024 * 1024;
/// Most items in one page, push or fetch answer.
pub const MAX_ITEMS_PER_MESSAGE: usize = 1024;
/// Most envelope ids in one fetch request.
pub const MAX_FETCH_IDS: usize = 256;
/// Most envelope ids in one summary (all collections together).
pub const MAX_SUMMARY_IDS: usize = 200_000;
/// Most consent items (grants and revocations) in one summary.
pub const MAX_SUMMARY_CONSENT_ITEMS: usize = 1024;
/// Most patients in one digest request (one anti-entropy round's worth).
pub const MAX_DIGEST_PATIENTS: usize = 1024;
/// Most address suggestions in one push.
pub const MAX_PUSH_ADDRS: usize = 16;
/// Longest address suggestion, in bytes.
pub const MAX_ADDR_LEN: usize = 256;
/// Most audit entries in one audit answer (and the largest `limit` an audit
/// request may ask for).
pub const MAX_AUDIT_ENTRIES_PER_MESSAGE: usize = 256;
/// Most item ids one audit entry carries; a stored entry naming more is sent
/// with the first this many and its full `item_count`.
pub const MAX_AUDIT_ITEMS_PER_ENTRY: usize = 4096;
/// Longest actor id in an audit entry, in bytes.
pub const MAX_AUDIT_ACTOR_ID_LEN: usize = 256;
/// Longest outcome text in an audit entry, in bytes.
pub const MAX_AUDIT_OUTCOME_LEN: usize = 1024;
/// Most snapshot offers in one page.
pub const MAX_OFFERS_PER_PAGE: usize = 64;
/// Most compact headers in one snapshot transfer.
pub const MAX_TRANSFER_HEADERS: usize = 200_000;
/// Most bytes the compact headers of one transfer may inflate to.
pub const MAX_INFLATED_HEADERS_BYTES: usize = 64 * 1024 * 1024;
/// Most debts one outbox report lists (a node keeps at most 256 per
/// patient; the rest of a larger list is left out).
pub const MAX_OUTBOX_OWED: usize = 1024;
/// Most held consent items one outbox report lists.
pub const MAX_OUTBOX_HELD: usize = 1024;
/// Longest failure text of one debt in an outbox report, in bytes.
pub const MAX_OUTBOX_ERROR_LEN: usize = 256;
/// Longest PeerId in an outbox report, in bytes (an ed25519 PeerId is 38).
const MAX_PEER_ID_LEN: usize = 64;
/// A server offers a transfer only if its answer fits a response with this
/// much room to spare.
const TRANSFER_SLACK: usize = 4096;

/// Most signed address records one `Practices` answer carries.
pub const MAX_PRACTICE_RECORDS: usize = 256;
/// Largest signed address record on the wire (the node keeps none larger).
pub use medmesh_crypto::MAX_ADDRESS_RECORD_BYTES;

/// The request-response codec: reads at most the cap (plus one byte to
/// detect an oversize frame), then decodes and validates.
#[derive(Clone, Copy, Debug, Default)]
pub struct Codec;

async fn read_capped<T: AsyncRead + Unpin + Send>(io: &mut T, max: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    io.take(max as u64 + 1).read_to_end(&mut buf).await?;
    if buf.len() > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "frame over the size cap"));
    }
    Ok(buf)
}

fn invalid(err: Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, err.to_string())
}

impl libp2p::request_response::Codec for Codec {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        let frame = read_capped(io, MAX_REQUEST_BYTES).await?;
        Request::decode(&frame).map_err(invalid)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        let frame = read_capped(io, MAX_RESPONSE_BYTES).await?;
        Response::decode(&frame).map_err(invalid)
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Request) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let frame = req.encode();
        if frame.len() > MAX_REQUEST_BYTES {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "request over the size cap"));
        }
        io.write_all(&frame).await
    }

    async fn write_response<T>(&mut self, _: &StreamProtocol, io: &mut T, resp: Response) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let frame = resp.encode();
        if frame.len() > MAX_RESPONSE_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "response over the size cap",
            ));
        }
        io.write_all(&frame).await
    }
}
