//! Moving bytes between a local socket and a forward stream, both ways, with backpressure (each
//! direction reads only after its last write finished), half-close passed on, and byte counts.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes read per direction per step: large enough for bulk throughput, small enough that 500
/// connections cost 64 MiB at most.
pub const BUFFER: usize = 64 * 1024;

/// Copies until EOF, then closes the write side (FIN); counts bytes into `counter`.
pub async fn pump<R, W>(mut r: R, mut w: W, counter: &AtomicU64) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            w.shutdown().await?;
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Splices a local TCP connection and a forward stream. Returns when both directions finished;
/// the first error in either direction ends both and resets the TCP side, so the local
/// application sees the failure rather than a clean end of data.
pub async fn tcp<S>(tcp: tokio::net::TcpStream, stream: S, sent: &AtomicU64, received: &AtomicU64) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tcp.set_nodelay(true);
    let (mut tcp_r, mut tcp_w) = tcp.into_split();
    let (mut stream_r, mut stream_w) = tokio::io::split(stream);
    let result = tokio::try_join!(pump(&mut tcp_r, &mut stream_w, sent), pump(&mut stream_r, &mut tcp_w, received));
    if result.is_err() {
        reset(tcp_w.as_ref());
    }
    result.map(|_| ())
}

/// Makes the TCP connection end with a reset (RST) instead of a FIN when it is dropped, so the
/// local application sees a failure or refusal at once rather than a clean end of data.
pub fn reset(tcp: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
}

/// Socket buffer asked for on forwarding UDP sockets: bursts from a fast sender queue here rather
/// than being dropped by the kernel (the kernel caps it at net.core.rmem_max).
const UDP_SOCKET_BUFFER: usize = 4 * 1024 * 1024;

pub fn enlarge_udp_buffers(socket: &tokio::net::UdpSocket) {
    let sock = socket2::SockRef::from(socket);
    let _ = sock.set_recv_buffer_size(UDP_SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(UDP_SOCKET_BUFFER);
}
