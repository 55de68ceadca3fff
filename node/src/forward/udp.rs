//! UDP sessions over streams, shared by both sides: the forwarding side routes datagrams from
//! each local source port to its own session; the exposing side connects one socket to the
//! service per session. Datagrams keep their boundaries as datagram frames on the stream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
use warren_forward::MAX_DATAGRAM;

use super::{Stats, splice};

/// Socket buffer asked for on forwarding UDP sockets: bursts from a fast sender queue here rather
/// than being dropped by the kernel (the kernel caps it at net.core.rmem_max).
const UDP_SOCKET_BUFFER: usize = 4 * 1024 * 1024;

pub fn enlarge_udp_buffers(socket: &tokio::net::UdpSocket) {
    let sock = socket2::SockRef::from(socket);
    let _ = sock.set_recv_buffer_size(UDP_SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(UDP_SOCKET_BUFFER);
}

/// The local end of a UDP session.
pub struct Datagrams {
    /// Where datagrams for the peer come from.
    pub source: Source,
    /// The socket replies go out of, and to whom (`None`: the socket is connected).
    pub socket: Arc<UdpSocket>,
    pub to: Option<SocketAddr>,
}

pub enum Source {
    /// The exposing side: the socket connected to the service.
    Socket,
    /// The forwarding side: datagrams the forward's receive loop routed to this session.
    Channel(mpsc::Receiver<Vec<u8>>),
}

/// Carries datagrams both ways between a local UDP endpoint and a stream until either side ends
/// or nothing moves for `idle`. Each direction is its own loop, so no frame read is ever cut
/// short by the other direction. The first datagram goes out at once, the rest after `answer`
/// has read and judged the peer's answer (the opening side), which also comes before any
/// datagram from the peer is passed on; a refusal ends the session with its reason.
pub async fn udp_over_stream<S>(
    local: Datagrams,
    stream: S,
    stats: &Stats,
    idle: Duration,
    answer: impl AsyncFnOnce(&mut Compat<tokio::io::ReadHalf<S>>) -> Result<(), String>,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use futures::AsyncWriteExt as _;
    let (r, w) = tokio::io::split(stream);
    let (mut r, mut w) = (r.compat(), w.compat_write());
    let started = tokio::time::Instant::now();
    let last = std::sync::atomic::AtomicU64::new(0);
    let touch = || last.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    let Datagrams { source, socket, to } = local;
    let answered = tokio::sync::Notify::new();
    let up = async {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut source = source;
        // One datagram goes out ahead of the peer's answer (a DNS query, a WireGuard handshake);
        // the rest wait for it, so early datagrams never pile up unread at the peer.
        let mut ahead = true;
        loop {
            let n = match &mut source {
                Source::Socket => match socket.recv(&mut buf).await {
                    Ok(n) => n,
                    Err(_) => continue,
                },
                Source::Channel(rx) => match rx.recv().await {
                    Some(d) => {
                        buf[..d.len()].copy_from_slice(&d);
                        d.len()
                    }
                    None => break,
                },
            };
            if warren_forward::write_datagram(&mut w, &buf[..n]).await.is_err() || w.flush().await.is_err() {
                break;
            }
            stats.sent.fetch_add(n as u64, Ordering::Relaxed);
            touch();
            if std::mem::take(&mut ahead) {
                answered.notified().await;
            }
        }
    };
    let down = async {
        answer(&mut r).await?;
        answered.notify_one();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        while let Ok(Some(n)) = warren_forward::read_datagram(&mut r, &mut buf).await {
            let _ = match to {
                Some(to) => socket.send_to(&buf[..n], to).await,
                None => socket.send(&buf[..n]).await,
            };
            stats.received.fetch_add(n as u64, Ordering::Relaxed);
            touch();
        }
        Ok(())
    };
    let watchdog = async {
        loop {
            let idle_for = started.elapsed().saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
            if idle_for >= idle {
                break;
            }
            tokio::time::sleep(idle - idle_for).await;
        }
    };
    tokio::pin!(down);
    tokio::select! {
        // The peer stopped taking datagrams: usually a refusal, whose answer says why.
        _ = up => tokio::time::timeout(splice::ANSWER_GRACE, &mut down).await.unwrap_or(Ok(())),
        ended = &mut down => ended,
        _ = watchdog => Ok(()),
    }
}
