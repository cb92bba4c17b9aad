//! A client speaking `/medmesh/sync/1` by hand: its own libp2p swarm (TCP,
//! Noise, Yamux on 127.0.0.1) whose requests are raw CBOR bytes, so a test
//! can send any request — a flood, or crafted items — as any identity.

use std::io;
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder, noise, tcp, yamux};
use medmesh_crypto::SecretIdentity;
use medmesh_sync::wire::{Request, Response};

use super::WAIT;

#[derive(Clone, Default)]
pub struct RawCodec;

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut v = Vec::new();
        io.take(1 << 20).read_to_end(&mut v).await?;
        Ok(v)
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut v = Vec::new();
        io.take(64 << 20).read_to_end(&mut v).await?;
        Ok(v)
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()> {
        io.write_all(&req).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()> {
        io.write_all(&res).await
    }
}

pub struct Client {
    swarm: Swarm<request_response::Behaviour<RawCodec>>,
}

/// A TCP swarm as `key` speaking `/medmesh/sync/1` with raw frames (no
/// codec checks): `Outbound` to send crafted requests, `Inbound` to play a
/// node that answers by hand.
pub fn raw_swarm(key: &SecretIdentity, support: ProtocolSupport) -> Swarm<request_response::Behaviour<RawCodec>> {
    SwarmBuilder::with_existing_identity(key.to_libp2p().unwrap())
        .with_tokio()
        .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
        .unwrap()
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                RawCodec,
                [(StreamProtocol::new("/medmesh/sync/1"), support)],
                request_response::Config::default()
                    .with_request_timeout(Duration::from_secs(20))
                    .with_max_concurrent_streams(1024),
            )
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

impl Client {
    /// Connects to the node listening on `addr`, as `key`.
    pub async fn connect(key: &SecretIdentity, addr: &Multiaddr) -> Self {
        let mut swarm = raw_swarm(key, ProtocolSupport::Outbound);
        swarm.dial(addr.clone()).unwrap();
        tokio::time::timeout(WAIT, async {
            loop {
                if let SwarmEvent::ConnectionEstablished { .. } = swarm.select_next_some().await {
                    return;
                }
            }
        })
        .await
        .unwrap();
        Self { swarm }
    }

    /// Sends every request at once and collects the answers.
    pub async fn burst(&mut self, peer: PeerId, requests: &[Request]) -> Vec<Response> {
        let mut ids: Vec<OutboundRequestId> = requests
            .iter()
            .map(|r| self.swarm.behaviour_mut().send_request(&peer, r.encode()))
            .collect();
        let mut answers = Vec::new();
        tokio::time::timeout(WAIT, async {
            while !ids.is_empty() {
                match self.swarm.select_next_some().await {
                    SwarmEvent::Behaviour(request_response::Event::Message {
                        message: request_response::Message::Response { request_id, response },
                        ..
                    }) if ids.contains(&request_id) => {
                        ids.retain(|i| *i != request_id);
                        answers.push(Response::decode(&response).unwrap());
                    }
                    SwarmEvent::Behaviour(request_response::Event::OutboundFailure { request_id, error, .. })
                        if ids.contains(&request_id) =>
                    {
                        panic!("request failed: {error}");
                    }
                    _ => {}
                }
            }
        })
        .await
        .unwrap();
        answers
    }

    pub async fn request(&mut self, peer: PeerId, request: Request) -> Response {
        self.burst(peer, &[request]).await.remove(0)
    }

    /// Sends raw bytes (any frame, well-formed or not); the raw answer, or
    /// the failure as text. A stream the server dropped reads as "no answer".
    pub async fn ask(&mut self, peer: PeerId, frame: Vec<u8>) -> Result<Vec<u8>, String> {
        let id = self.swarm.behaviour_mut().send_request(&peer, frame);
        tokio::time::timeout(WAIT, async {
            loop {
                match self.swarm.select_next_some().await {
                    SwarmEvent::Behaviour(request_response::Event::Message {
                        message: request_response::Message::Response { request_id, response },
                        ..
                    }) if request_id == id => {
                        return if response.is_empty() {
                            Err("no answer".into())
                        } else {
                            Ok(response)
                        };
                    }
                    SwarmEvent::Behaviour(request_response::Event::OutboundFailure { request_id, error, .. })
                        if request_id == id =>
                    {
                        return Err(error.to_string());
                    }
                    _ => {}
                }
            }
        })
        .await
        .unwrap()
    }
}
