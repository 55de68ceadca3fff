//! Moving bytes between a local TCP connection and a forward stream, both ways, with backpressure
//! (each direction reads only after its last write finished), half-close and reset passed on, and
//! byte counts. The stream carries chunks (see `warren_forward`): a clean end is an explicit
//! marker, so a stream that just stops is a reset, never a truncated-but-"complete" transfer.

use std::io::{Error, ErrorKind};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use warren_forward::{CHUNK_HEADER as HEADER, Chunk, MAX_CHUNK};

/// Bytes read per direction per step: large enough for bulk throughput, small enough that 500
/// connections cost 64 MiB at most.
pub const BUFFER: usize = 64 * 1024;
const _: () = assert!(BUFFER <= MAX_CHUNK, "one read is sent as one chunk");

/// Local data a new connection may send before the peer has answered: its first flight (an
/// HTTP request, a TLS ClientHello, an SSH banner) saves a round trip, and no more. Data sent
/// ahead sits unread at the peer until it accepts, holding part of the connection's shared
/// receive window: 1024 connections opening at once hold at most 8 MiB of it, so the requests of
/// newer streams never queue behind older streams' early bulk data.
pub const SEND_AHEAD: usize = 8 * 1024;

/// The first size of [`ReadBuf`]: an interactive connection's reads fit.
const READ_START: usize = 4 * 1024;

/// The buffer a stream is read into: it starts at [`READ_START`] bytes and doubles, up to
/// [`BUFFER`], whenever a read fills it, so a bulk transfer reaches full-size reads after four,
/// while a quiet connection holds 4 KiB. A full-size buffer for every connection from the start
/// was 64 KiB per connection per side, written (zeroed) in full: 1,000 connections echoing a
/// little each grew both nodes by 100 MiB (measured, `forward_bench.py --conns 1000`).
pub struct ReadBuf(Vec<u8>);

impl ReadBuf {
    pub fn new() -> Self {
        Self(vec![0; READ_START])
    }

    /// Room for a read of at most `want` bytes.
    pub fn room(&mut self, want: usize) -> &mut [u8] {
        let len = want.min(self.0.len());
        &mut self.0[..len]
    }

    /// The first `n` bytes, as read.
    pub fn read(&self, n: usize) -> &[u8] {
        &self.0[..n]
    }

    /// A read of `n` bytes is done with: the buffer grows when that read filled it.
    pub fn used(&mut self, n: usize) {
        if n == self.0.len() && n < BUFFER {
            self.0.resize((2 * n).min(BUFFER), 0);
        }
    }
}

/// Local data → stream, as chunks; at the local EOF sends the end marker and finishes the
/// stream's write side. Until `answered` is notified, one read of at most [`SEND_AHEAD`] bytes.
async fn to_stream<R, W>(mut tcp: R, mut stream: W, counter: &AtomicU64, answered: &Notify) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // One buffer holds header and data, so each chunk is one write.
    let mut buf = vec![0u8; HEADER + BUFFER];
    let mut limit = SEND_AHEAD;
    loop {
        let n = tcp.read(&mut buf[HEADER..HEADER + limit]).await?;
        if n == 0 {
            stream.write_all(&Chunk::End.encode()).await?;
            stream.shutdown().await?;
            return Ok(());
        }
        buf[..HEADER].copy_from_slice(&Chunk::Data(n).encode());
        stream.write_all(&buf[..HEADER + n]).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        if limit < BUFFER {
            answered.notified().await;
            limit = BUFFER;
        }
    }
}

/// Stream chunks → local data; at the end marker half-closes the local connection. A stream that
/// ends without the marker is an error (the other side was reset or failed).
async fn from_stream<R, W>(mut stream: R, mut tcp: W, counter: &AtomicU64) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = ReadBuf::new();
    loop {
        let mut header = [0u8; HEADER];
        stream.read_exact(&mut header).await.map_err(|e| match e.kind() {
            ErrorKind::UnexpectedEof => Error::new(ErrorKind::ConnectionReset, "the peer's side was reset"),
            _ => e,
        })?;
        let mut left = match Chunk::decode(header) {
            Ok(Chunk::End) => {
                tcp.shutdown().await?;
                return Ok(());
            }
            Ok(Chunk::Data(len)) => len,
            Ok(Chunk::Ack | Chunk::Reset) => unreachable!("Chunk::decode refuses the headers of sessions"),
            Err(e) => return Err(Error::new(ErrorKind::InvalidData, e.to_string())),
        };
        while left > 0 {
            let n = stream.read(buf.room(left)).await?;
            if n == 0 {
                return Err(Error::new(ErrorKind::ConnectionReset, "the peer's side was reset mid-chunk"));
            }
            tcp.write_all(buf.read(n)).await?;
            buf.used(n);
            counter.fetch_add(n as u64, Ordering::Relaxed);
            left -= n;
        }
    }
}

/// How long the opening side waits for the peer's answer once the peer stopped taking data: a
/// refusal usually arrives just behind the stop, and says why.
pub const ANSWER_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// How a forwarded connection failed.
#[derive(Debug)]
pub enum SpliceError {
    /// The peer refused the request (its answer, as text).
    Refused(String),
    /// The connection broke on either side after it was set up.
    Cut(Error),
}

/// Splices a local TCP connection and a forward stream. Returns when both directions finished;
/// the first error in either direction ends both: the TCP side is reset (RST) and the stream is
/// dropped without its end marker, which the other side takes as a reset too.
pub async fn tcp<S>(tcp: tokio::net::TcpStream, stream: S, sent: &AtomicU64, received: &AtomicU64) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tcp_opened(tcp, stream, sent, received, async |_| Ok(())).await.map_err(|failure| match failure {
        SpliceError::Cut(e) => e,
        SpliceError::Refused(why) => Error::other(why),
    })
}

/// The opening side of [`tcp`], whose request is on its way: the connection's first bytes (up
/// to [`SEND_AHEAD`]) go to the peer at once, before its answer, saving a round trip; the rest
/// follows the answer, which `answer` reads and judges before any data from the peer is passed
/// on. A refusal resets the local connection; the peer discards what was sent ahead.
pub async fn tcp_opened<S>(
    tcp: tokio::net::TcpStream,
    stream: S,
    sent: &AtomicU64,
    received: &AtomicU64,
    answer: impl AsyncFnOnce(&mut tokio::io::ReadHalf<S>) -> Result<(), String>,
) -> Result<(), SpliceError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tcp.set_nodelay(true);
    let (mut tcp_r, mut tcp_w) = tcp.into_split();
    let (mut stream_r, mut stream_w) = tokio::io::split(stream);
    let answered = Notify::new();
    let result = {
        let upload = to_stream(&mut tcp_r, &mut stream_w, sent, &answered);
        let download = async {
            answer(&mut stream_r).await.map_err(SpliceError::Refused)?;
            answered.notify_one();
            from_stream(&mut stream_r, &mut tcp_w, received).await.map_err(SpliceError::Cut)
        };
        tokio::pin!(upload, download);
        tokio::select! {
            done = &mut download => match done {
                Ok(()) => upload.await.map_err(SpliceError::Cut),
                Err(failure) => Err(failure),
            },
            done = &mut upload => match done {
                Ok(()) => download.await,
                Err(e) => match tokio::time::timeout(ANSWER_GRACE, &mut download).await {
                    Ok(Err(SpliceError::Refused(why))) => Err(SpliceError::Refused(why)),
                    _ => Err(SpliceError::Cut(e)),
                },
            },
        }
    };
    if result.is_err() {
        reset(tcp_w.as_ref());
        // Dropping a write half sends a FIN first, which the application would read as a clean
        // end before the reset: forget it instead, the socket closes with the read half.
        tcp_w.forget();
    }
    result
}

/// Makes the TCP connection end with a reset (RST) instead of a FIN when it is dropped, so the
/// local application sees a failure or refusal at once rather than a clean end of data.
pub fn reset(tcp: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
}

/// Connections waiting to be accepted on a forward's listener: a burst of connects (hundreds of
/// clients starting at once) queues here instead of overflowing into SYN cookies and resets.
/// The kernel caps it at net.core.somaxconn.
const LISTEN_BACKLOG: u32 = 4096;

/// A TCP listener for a forward, with a backlog for bursts.
pub fn listen_tcp(bind: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if bind.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(bind)?;
    socket.listen(LISTEN_BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_buffer_grows_only_when_reads_fill_it() {
        let mut buf = ReadBuf::new();
        assert_eq!(buf.room(100).len(), 100);
        buf.used(100);
        assert_eq!(buf.room(BUFFER).len(), READ_START, "short reads keep it small");
        let mut sizes = Vec::new();
        for _ in 0..6 {
            let n = buf.room(BUFFER).len();
            sizes.push(n);
            buf.used(n);
        }
        assert_eq!(sizes, [4096, 8192, 16384, 32768, 65536, 65536], "full reads double it up to BUFFER");
    }
    use std::time::Duration;
    use tokio::io::duplex;

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn bytes_cross_as_chunks_and_a_clean_end_is_passed_on_as_a_half_close() {
        let data = payload(1_000_000);
        let (mut app, local) = duplex(64 * 1024);
        let (wire_in, wire_out) = duplex(64 * 1024);
        let (far_local, mut far_app) = duplex(64 * 1024);
        let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
        let answered = Notify::new();
        answered.notify_one();
        let writer = async {
            app.write_all(&data).await.unwrap();
            app.shutdown().await.unwrap();
        };
        let reader = async {
            let mut out = Vec::new();
            far_app.read_to_end(&mut out).await.unwrap();
            out
        };
        let (_, up, down, out) = tokio::join!(
            writer,
            to_stream(local, wire_in, &sent, &answered),
            from_stream(wire_out, far_local, &received),
            reader
        );
        up.unwrap();
        down.unwrap();
        assert!(out == data, "all {} bytes arrived intact, then the end", data.len());
        assert_eq!((sent.into_inner(), received.into_inner()), (1_000_000, 1_000_000));
    }

    #[tokio::test]
    async fn a_stream_that_stops_without_the_end_marker_is_a_reset_not_an_end() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&Chunk::Data(5).encode());
        wire.extend_from_slice(b"hello");
        let (far_local, _far_app) = duplex(1024);
        let error = from_stream(wire.as_slice(), far_local, &AtomicU64::new(0)).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::ConnectionReset);

        // Cut inside a chunk, too.
        let mut wire = Vec::new();
        wire.extend_from_slice(&Chunk::Data(10).encode());
        wire.extend_from_slice(b"hello");
        let (far_local, _far_app) = duplex(1024);
        let error = from_stream(wire.as_slice(), far_local, &AtomicU64::new(0)).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn an_oversized_chunk_header_ends_the_stream_before_anything_is_buffered() {
        let wire = ((MAX_CHUNK + 1) as u32).to_be_bytes();
        let (far_local, _far_app) = duplex(1024);
        let error = from_stream(&wire[..], far_local, &AtomicU64::new(0)).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn before_the_answer_only_the_first_flight_goes_out() {
        let (mut app, local) = duplex(256 * 1024);
        app.write_all(&payload(100_000)).await.unwrap();
        let (wire_in, mut wire_out) = duplex(256 * 1024);
        let (sent, answered) = (AtomicU64::new(0), Notify::new());
        let upload = to_stream(local, wire_in, &sent, &answered);
        tokio::pin!(upload);
        // Without an answer the upload sends one read of at most SEND_AHEAD and waits.
        assert!(tokio::time::timeout(Duration::from_millis(200), &mut upload).await.is_err());
        assert_eq!(sent.load(Ordering::Relaxed), SEND_AHEAD as u64);
        let mut header = [0u8; HEADER];
        wire_out.read_exact(&mut header).await.unwrap();
        assert_eq!(Chunk::decode(header).unwrap(), Chunk::Data(SEND_AHEAD));
        answered.notify_one();
        drop(app);
        let mut rest = Vec::new();
        let (done, _) = tokio::join!(upload, wire_out.read_to_end(&mut rest));
        done.unwrap();
        assert_eq!(sent.load(Ordering::Relaxed), 100_000, "the rest follows the answer");
    }

    #[tokio::test]
    async fn a_refusal_resets_the_local_connection_and_says_why() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut app = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (local, _) = listener.accept().await.unwrap();
        let (stream, _peer) = duplex(1024);
        let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
        let refused = tcp_opened(local, stream, &sent, &received, async |_| Err("not allowed".to_string())).await;
        assert!(matches!(refused, Err(SpliceError::Refused(ref why)) if why == "not allowed"), "{refused:?}");
        let mut buf = [0u8; 16];
        let read = app.read(&mut buf).await;
        assert!(read.is_err(), "the application sees a reset, not a clean end: {read:?}");
    }
}
