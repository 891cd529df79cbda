//! The socket under TLS.

use tokio::io::BufReader;
use tokio::net::TcpStream;

/// Bytes read from the socket per `read` under TLS. rustls asks for 4 KiB at a time (and drops
/// its buffer whenever it runs empty), so without this a bulk stream costs a syscall per 4 KiB.
const READ_BUFFER: usize = 64 * 1024;

/// The TCP connection of an HBONE peer, read through a buffer; writes go straight through.
pub(crate) type Socket = BufReader<TcpStream>;

pub(crate) fn buffered(tcp: TcpStream) -> Socket {
    BufReader::with_capacity(READ_BUFFER, tcp)
}
