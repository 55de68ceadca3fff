//! UDP sessions over streams, shared by both sides: the forwarding side routes datagrams from
//! each local source port to its own session; the exposing side connects one socket to the
//! service per session. Datagrams keep their boundaries as datagram frames on the stream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    Queue(QueueRx),
}

/// Datagrams one UDP session may hold queued: enough for a burst while its stream opens and the
/// peer answers (a relayed open can take a second; 1 MiB is a second at 8 Mbit/s), not more.
pub const SESSION_QUEUE_BYTES: usize = 1024 * 1024;
/// Datagrams one forward may hold queued over all its sessions: a flood from many source ports
/// (up to `max_connections` sessions) cannot make the node buffer more than this.
pub const FORWARD_QUEUE_BYTES: usize = 16 * 1024 * 1024;
/// Datagrams queued per session, whatever their size (each costs an allocation).
pub const SESSION_QUEUE_DATAGRAMS: usize = 1024;

/// Bytes queued across one forward's sessions.
pub type ForwardQueued = Arc<AtomicUsize>;

/// A session's queue of datagrams waiting for its stream, bounded in datagrams and in bytes, for
/// the session and for the forward (a datagram over either bound is dropped: UDP's own answer to
/// overload).
pub fn session_queue(forward: &ForwardQueued) -> (QueueTx, QueueRx) {
    let (tx, rx) = mpsc::channel(SESSION_QUEUE_DATAGRAMS);
    let session = Arc::new(AtomicUsize::new(0));
    (
        QueueTx { tx, session: session.clone(), forward: forward.clone() },
        QueueRx { rx, session, forward: forward.clone() },
    )
}

pub struct QueueTx {
    tx: mpsc::Sender<Vec<u8>>,
    session: Arc<AtomicUsize>,
    forward: ForwardQueued,
}

impl QueueTx {
    /// Queues a datagram if the bounds allow; false when it was dropped.
    pub fn offer(&self, datagram: Vec<u8>) -> bool {
        let len = datagram.len();
        if self.session.load(Ordering::Relaxed) + len > SESSION_QUEUE_BYTES
            || self.forward.load(Ordering::Relaxed) + len > FORWARD_QUEUE_BYTES
        {
            return false;
        }
        // Counted before sending, so the receiver never subtracts what was not yet added.
        self.session.fetch_add(len, Ordering::Relaxed);
        self.forward.fetch_add(len, Ordering::Relaxed);
        if self.tx.try_send(datagram).is_err() {
            self.session.fetch_sub(len, Ordering::Relaxed);
            self.forward.fetch_sub(len, Ordering::Relaxed);
            return false;
        }
        true
    }
}

pub struct QueueRx {
    rx: mpsc::Receiver<Vec<u8>>,
    session: Arc<AtomicUsize>,
    forward: ForwardQueued,
}

impl QueueRx {
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        let datagram = self.rx.recv().await?;
        self.session.fetch_sub(datagram.len(), Ordering::Relaxed);
        self.forward.fetch_sub(datagram.len(), Ordering::Relaxed);
        Some(datagram)
    }
}

impl Drop for QueueRx {
    /// Gives the forward back what an ended session still held.
    fn drop(&mut self) {
        self.rx.close();
        while let Ok(datagram) = self.rx.try_recv() {
            self.forward.fetch_sub(datagram.len(), Ordering::Relaxed);
        }
    }
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
                Source::Queue(rx) => match rx.recv().await {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_are_bounded_in_bytes_per_session_and_per_forward() {
        let forward = ForwardQueued::default();
        let big = 60 * 1024;
        let mut sessions = Vec::new();
        let mut queued = 0;
        // A flood from many source ports with datagrams near the largest size.
        for _ in 0..64 {
            let (tx, rx) = session_queue(&forward);
            let mut in_session = 0;
            for _ in 0..SESSION_QUEUE_DATAGRAMS {
                if tx.offer(vec![0; big]) {
                    in_session += big;
                }
            }
            assert!(in_session <= SESSION_QUEUE_BYTES);
            queued += in_session;
            sessions.push((tx, rx));
        }
        assert!(queued <= FORWARD_QUEUE_BYTES, "{queued}");
        assert!(queued > FORWARD_QUEUE_BYTES - big, "the forward's budget is used, not wasted: {queued}");
        assert_eq!(forward.load(Ordering::Relaxed), queued);

        // Taking datagrams out frees the budget; an ended session gives back what it held.
        let (tx, mut rx) = sessions.remove(0);
        let held = forward.load(Ordering::Relaxed);
        let first = futures::executor::block_on(rx.recv()).unwrap();
        assert_eq!(forward.load(Ordering::Relaxed), held - first.len());
        drop((tx, rx));
        sessions.clear();
        assert_eq!(forward.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn small_datagrams_are_bounded_by_count() {
        let forward = ForwardQueued::default();
        let (tx, _rx) = session_queue(&forward);
        let taken = (0..SESSION_QUEUE_DATAGRAMS * 2).filter(|_| tx.offer(vec![1; 10])).count();
        assert_eq!(taken, SESSION_QUEUE_DATAGRAMS);
    }
}
