//! Forwarding non-mesh names to upstream resolvers: UDP first, TCP when the upstream
//! truncates and the client can take a long answer, failover across upstreams, and a bound on
//! how many forwards are in flight.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::Message;
use isthmus_socket::SocketFactory;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::DnsMetrics;
use crate::responder::{ForwardQuery, Transport};

/// Largest DNS message (TCP length prefix is 16 bits; UDP cannot exceed it either).
const MAX_MESSAGE: usize = u16::MAX as usize;

/// Why one attempt at one upstream failed (logged; the client sees SERVFAIL when all fail).
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("upstream {upstream} did not answer within {timeout:?}")]
    Timeout {
        upstream: SocketAddr,
        timeout: Duration,
    },
    #[error("upstream {upstream} over {proto}: {source}")]
    Io {
        upstream: SocketAddr,
        proto: &'static str,
        source: io::Error,
    },
    #[error("upstream {upstream} over {proto} sent an answer that does not decode or does not match the question")]
    BadAnswer {
        upstream: SocketAddr,
        proto: &'static str,
    },
}

/// Sends queries to a fixed list of upstreams.
#[derive(Debug)]
pub(crate) struct Forwarder {
    upstreams: Vec<SocketAddr>,
    next: AtomicUsize,
    timeout: Duration,
    permits: Arc<Semaphore>,
    metrics: Option<DnsMetrics>,
    /// The agent's: marked, so DNS capture never takes the agent's own upstream queries.
    sockets: Arc<SocketFactory>,
}

impl Forwarder {
    pub(crate) fn new(
        upstreams: Vec<SocketAddr>,
        timeout: Duration,
        max_in_flight: usize,
        metrics: Option<DnsMetrics>,
        sockets: Arc<SocketFactory>,
    ) -> Self {
        Forwarder {
            upstreams,
            next: AtomicUsize::new(0),
            timeout,
            permits: Arc::new(Semaphore::new(max_in_flight.max(1))),
            metrics,
            sockets,
        }
    }

    /// A slot for one forward, or `None` when the in-flight limit is reached (the caller
    /// answers SERVFAIL at once rather than queueing without bound).
    pub(crate) fn try_permit(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.permits.clone().try_acquire_owned().ok();
        if permit.is_none() {
            if let Some(m) = &self.metrics {
                m.forward_rejected();
            }
        }
        permit
    }

    /// The bytes to send the client: an upstream's answer (with the client's ID, fitted to
    /// its UDP limit) or SERVFAIL when every upstream failed. `None` only if even SERVFAIL
    /// cannot be encoded.
    pub(crate) async fn forward(
        &self,
        query: &ForwardQuery,
        request: &[u8],
        transport: Transport,
    ) -> Option<Vec<u8>> {
        let count = self.upstreams.len();
        // Round-robin start spreads load; walking the rest of the list is the failover.
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..count {
            let upstream = self.upstreams[(start + i) % count];
            match self.exchange(upstream, query, request, transport).await {
                Ok(bytes) => return Some(bytes),
                Err(e) => {
                    tracing::debug!(error = %e, "forward attempt failed");
                    if let Some(m) = &self.metrics {
                        m.upstream_failure();
                    }
                }
            }
        }
        tracing::debug!(upstreams = ?self.upstreams, "no upstream answered; SERVFAIL");
        query.servfail()
    }

    async fn exchange(
        &self,
        upstream: SocketAddr,
        query: &ForwardQuery,
        request: &[u8],
        transport: Transport,
    ) -> Result<Vec<u8>, ForwardError> {
        if request.len() < 2 {
            // Cannot happen: the responder decoded a 12-byte header from these bytes.
            return Err(ForwardError::BadAnswer {
                upstream,
                proto: "UDP",
            });
        }
        // A fresh random ID (and a fresh source port per exchange) so an off-path attacker
        // must guess both to inject an answer; the client's own ID is predictable.
        let id: u16 = rand::random();
        let mut out = request.to_vec();
        // The ID is the first 16 bits of every DNS message (RFC 1035 §4.1.1); patching it in
        // place keeps the client's query byte-for-byte otherwise.
        out[..2].copy_from_slice(&id.to_be_bytes());

        let timed_out = || ForwardError::Timeout {
            upstream,
            timeout: self.timeout,
        };
        let (mut bytes, mut message) =
            tokio::time::timeout(self.timeout, self.udp_exchange(upstream, &out, id, query))
                .await
                .map_err(|_| timed_out())??;
        if message.metadata.truncation && transport == Transport::Tcp {
            // The client is on TCP and can take the whole answer.
            (bytes, message) =
                tokio::time::timeout(self.timeout, self.tcp_exchange(upstream, &out, id, query))
                    .await
                    .map_err(|_| timed_out())??;
        }
        bytes[..2].copy_from_slice(&request[..2]);
        match transport {
            Transport::Tcp => Ok(bytes),
            // Usually already within the limit, since the upstream saw the client's EDNS size.
            Transport::Udp => query.fit(bytes, &message).ok_or(ForwardError::BadAnswer {
                upstream,
                proto: "UDP",
            }),
        }
    }

    async fn udp_exchange(
        &self,
        upstream: SocketAddr,
        out: &[u8],
        id: u16,
        query: &ForwardQuery,
    ) -> Result<(Vec<u8>, Message), ForwardError> {
        let io_err = |source| ForwardError::Io {
            upstream,
            proto: "UDP",
            source,
        };
        let socket = self.sockets.udp_for(upstream).map_err(io_err)?;
        // Connected: the kernel drops datagrams from anyone but the upstream.
        socket.connect(upstream).await.map_err(io_err)?;
        socket.send(out).await.map_err(io_err)?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let len = socket.recv(&mut buf).await.map_err(io_err)?;
            // Anything that is not the answer to this question with this ID is ignored (a late
            // answer or spoofing); the caller's timeout bounds the wait.
            if let Ok(message) = Message::from_vec(&buf[..len]) {
                if message.metadata.id == id && query.matches(&message) {
                    buf.truncate(len);
                    return Ok((buf, message));
                }
            }
        }
    }

    async fn tcp_exchange(
        &self,
        upstream: SocketAddr,
        out: &[u8],
        id: u16,
        query: &ForwardQuery,
    ) -> Result<(Vec<u8>, Message), ForwardError> {
        let io_err = |source| ForwardError::Io {
            upstream,
            proto: "TCP",
            source,
        };
        let mut stream = self.sockets.connect(upstream).await.map_err(io_err)?;
        stream.write_all(&framed(out)).await.map_err(io_err)?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await.map_err(io_err)?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut buf).await.map_err(io_err)?;
        match Message::from_vec(&buf) {
            Ok(message) if message.metadata.id == id && query.matches(&message) => {
                Ok((buf, message))
            }
            _ => Err(ForwardError::BadAnswer {
                upstream,
                proto: "TCP",
            }),
        }
    }
}

/// A message with its TCP length prefix (RFC 1035 §4.2.2), in one buffer so it goes out in
/// one write. Messages longer than 65535 bytes are never produced.
pub(crate) fn framed(message: &[u8]) -> Vec<u8> {
    let len = u16::try_from(message.len()).unwrap_or(u16::MAX);
    let mut out = Vec::with_capacity(message.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&message[..usize::from(len)]);
    out
}
