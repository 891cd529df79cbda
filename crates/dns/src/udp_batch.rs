//! UDP in batches on Linux: under load one `recvmmsg` takes up to [`BATCH`] queries and one
//! `sendmmsg` sends their answers, instead of two system calls per query. A profile of the
//! one-datagram loop under dnsperf put about 60% of the server's CPU in the kernel, half of it
//! under `sendto`. In `bench/dns.sh` runs the one-datagram loop used 0.9-1.17x dnsmasq's CPU
//! per query; batched, 0.8-0.97x (BENCHMARKS.md).
//!
//! nix's safe wrappers do the system calls; the headers they need hold raw pointers (not
//! `Send`), so they are built inside each call and never live across an `.await`.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use nix::sys::socket::{
    recvmmsg, sendmmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage,
};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Datagrams moved per system call at most.
pub(crate) const BATCH: usize = 32;

/// Receive buffers of one worker.
pub(crate) struct Batch {
    bufs: Vec<Vec<u8>>,
}

impl Batch {
    pub(crate) fn new(datagram_size: usize) -> Self {
        Batch {
            bufs: (0..BATCH).map(|_| vec![0u8; datagram_size]).collect(),
        }
    }

    /// The bytes of datagram `index` of the last [`Batch::recv`].
    pub(crate) fn datagram(&self, index: usize, len: usize) -> &[u8] {
        &self.bufs[index][..len]
    }

    /// Waits for at least one datagram, then takes all that are queued, up to [`BATCH`]:
    /// `(length, sender)` per datagram, in order.
    pub(crate) async fn recv(
        &mut self,
        socket: &UdpSocket,
    ) -> io::Result<Vec<(usize, SocketAddr)>> {
        let fd = socket.as_raw_fd();
        loop {
            socket.readable().await?;
            let bufs = &mut self.bufs;
            let received = socket.try_io(Interest::READABLE, || {
                let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
                let mut slices: Vec<[IoSliceMut<'_>; 1]> = bufs
                    .iter_mut()
                    .map(|b| [IoSliceMut::new(&mut b[..])])
                    .collect();
                let results = recvmmsg(
                    fd,
                    &mut headers,
                    slices.iter_mut(),
                    MsgFlags::MSG_DONTWAIT,
                    None,
                )
                .map_err(io::Error::from)?;
                // A datagram without a usable sender address cannot be answered: length 0
                // keeps the indexes aligned and is skipped by the caller.
                Ok(results
                    .map(|m| match m.address.as_ref().and_then(to_std) {
                        Some(peer) => (m.bytes, peer),
                        None => (0, SocketAddr::from(([0, 0, 0, 0], 0))),
                    })
                    .collect::<Vec<_>>())
            });
            match received {
                Ok(received) => return Ok(received),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Sends each `(bytes, peer)`; what one `sendmmsg` does not take (a full socket buffer) goes
/// out one by one, waiting for room.
pub(crate) async fn send_all(socket: &UdpSocket, out: &[(Vec<u8>, SocketAddr)]) {
    let mut sent = 0;
    while sent < out.len() {
        let chunk = &out[sent..(sent + BATCH).min(out.len())];
        let fd = socket.as_raw_fd();
        let result = socket.try_io(Interest::WRITABLE, || {
            let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(chunk.len(), None);
            let slices: Vec<[IoSlice<'_>; 1]> = chunk
                .iter()
                .map(|(bytes, _)| [IoSlice::new(bytes)])
                .collect();
            let addrs: Vec<Option<SockaddrStorage>> = chunk
                .iter()
                .map(|(_, peer)| Some(SockaddrStorage::from(*peer)))
                .collect();
            let no_cmsgs: [ControlMessage<'_>; 0] = [];
            let results = sendmmsg(
                fd,
                &mut headers,
                slices.iter(),
                addrs,
                no_cmsgs,
                MsgFlags::MSG_DONTWAIT,
            )
            .map_err(io::Error::from)?;
            Ok(results.count())
        });
        match result {
            Ok(0) | Err(_) => {
                // Would block, or the first datagram failed (e.g. an unreachable peer): that
                // one alone, waiting for room, so one bad peer cannot stall the rest.
                let (bytes, peer) = &out[sent];
                if let Err(e) = socket.send_to(bytes, *peer).await {
                    tracing::debug!(error = %e, %peer, "DNS UDP send failed");
                }
                sent += 1;
            }
            Ok(n) => sent += n,
        }
    }
}

fn to_std(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    if let Some(v6) = addr.as_sockaddr_in6() {
        return Some(SocketAddr::V6(SocketAddrV6::from(*v6)));
    }
    None
}
