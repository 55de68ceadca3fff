//! Counting and capping the bytes a volunteer relay carries for others.
//!
//! libp2p's relay copies circuit data between two streams inside its handler and reports neither
//! byte counts nor offers a rate limit. A relay node's connections are therefore wrapped: every
//! substream follows the multistream-select negotiation *this node writes* and learns which
//! protocol was agreed: on a stream the peer opened, the protocol this node echoes back (after
//! any number of `na` answers to proposals it does not speak); on a stream this node opened, the
//! protocol it proposes (its own choice). Streams agreed on `/libp2p/circuit/relay/0.2.0/hop` or
//! `/stop` carry relayed traffic, and the bytes *read* on them are counted (each relayed byte is
//! read once, on the source's stream, then written to the destination's). What a peer sends
//! cannot hide a relay stream: only the agreement counts, wherever it falls in the stream.
//!
//! Under a cap, reads on relay streams are scheduled so the aggregate rate stays within the
//! operator's cap and circuits share it fairly: a stream asks for one [`QUANTUM`] at a time and
//! is given the next free slot of the shared schedule (the link is booked `QUANTUM / rate`
//! seconds per grant, with up to a second banked for bursts), so waiting circuits take turns in
//! the order they asked, one quantum each, whatever their read buffers. What a grant did not use
//! is given back. The relay then reads slower, and flow control slows the senders. Other streams
//! are not touched beyond the first bytes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{AsyncRead, AsyncWrite};
use libp2p::core::muxing::{StreamMuxer, StreamMuxerEvent};

/// Negotiation bytes this node may write on one stream before the stream counts as relayed
/// anyway: an honest negotiation is a few dozen bytes; a peer that keeps it going (bogus
/// proposals answered `na`) gets metered rather than ignored.
const MAX_NEGOTIATION_BYTES: usize = 16 * 1024;
const RELAY_PROTOCOL_PREFIX: &[u8] = b"/libp2p/circuit/relay/0.2.0/";
/// The multistream-select header and answer, which are not agreements.
const MULTISTREAM_HEADER: &[u8] = b"/multistream/1.0.0";
const NOT_AVAILABLE: &[u8] = b"na";
/// The most one relay stream reads per grant under a cap: small enough that circuits interleave
/// finely (16 KiB is 1.6 ms of a 10 MiB/s cap), large enough that grants stay cheap.
pub const QUANTUM: usize = 16 * 1024;
/// How much unused capacity is banked for a burst.
const BURST: Duration = Duration::from_secs(1);

/// The relay's shared counter and (optional) rate cap.
pub struct Meter {
    relayed: AtomicU64,
    /// Bytes per second, and when the capped link is next free (tokio's clock).
    cap: Option<(u64, Mutex<tokio::time::Instant>)>,
}

impl Meter {
    pub fn new(bytes_per_sec: Option<u64>) -> Meter {
        Meter {
            relayed: AtomicU64::new(0),
            cap: bytes_per_sec.map(|rate| (rate.max(1), Mutex::new(tokio::time::Instant::now()))),
        }
    }

    /// Bytes relayed so far (both directions).
    pub fn relayed(&self) -> u64 {
        self.relayed.load(Ordering::Relaxed)
    }

    fn link_time(rate: u64, bytes: usize) -> Duration {
        Duration::from_secs_f64(bytes as f64 / rate as f64)
    }

    /// Books the next [`QUANTUM`] of the link; returns when it may be read (`None`: uncapped).
    fn book(&self) -> Option<tokio::time::Instant> {
        let (rate, next_free) = self.cap.as_ref()?;
        let mut next_free = next_free.lock().unwrap();
        let now = tokio::time::Instant::now();
        let slot = (*next_free).max(now.checked_sub(BURST).unwrap_or(now));
        *next_free = slot + Self::link_time(*rate, QUANTUM);
        Some(slot)
    }

    /// Counts `n` bytes read on a grant of one [`QUANTUM`], giving back what it did not use.
    fn took(&self, n: usize, granted: bool) {
        self.relayed.fetch_add(n as u64, Ordering::Relaxed);
        if let (Some((rate, next_free)), true) = (&self.cap, granted) {
            let unused = Self::link_time(*rate, QUANTUM.saturating_sub(n));
            let mut next_free = next_free.lock().unwrap();
            *next_free = next_free.checked_sub(unused).unwrap_or(*next_free);
        }
    }
}

/// A muxer whose substreams are metered.
pub struct Metered<M> {
    inner: M,
    meter: std::sync::Arc<Meter>,
}

impl<M> Metered<M> {
    pub fn new(inner: M, meter: std::sync::Arc<Meter>) -> Self {
        Metered { inner, meter }
    }
}

impl<M> StreamMuxer for Metered<M>
where
    M: StreamMuxer + Unpin,
    M::Substream: Unpin,
{
    type Substream = MeteredStream<M::Substream>;
    type Error = M::Error;

    fn poll_inbound(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Self::Substream, Self::Error>> {
        let this = self.get_mut();
        Pin::new(&mut this.inner).poll_inbound(cx).map_ok(|s| MeteredStream::new(s, this.meter.clone()))
    }

    fn poll_outbound(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Self::Substream, Self::Error>> {
        let this = self.get_mut();
        Pin::new(&mut this.inner).poll_outbound(cx).map_ok(|s| MeteredStream::new(s, this.meter.clone()))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<StreamMuxerEvent, Self::Error>> {
        Pin::new(&mut self.get_mut().inner).poll(cx)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Unknown,
    Relay,
    Other,
}

pub struct MeteredStream<S> {
    inner: S,
    meter: std::sync::Arc<Meter>,
    kind: Kind,
    /// Negotiation bytes written and not yet parsed into whole messages.
    seen: Vec<u8>,
    written_total: usize,
    /// Waiting for a booked slot of the capped link.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A slot was booked and reached: the next read may take one quantum.
    granted: bool,
}

impl<S> MeteredStream<S> {
    fn new(inner: S, meter: std::sync::Arc<Meter>) -> Self {
        MeteredStream { inner, meter, kind: Kind::Unknown, seen: Vec::new(), written_total: 0, sleep: None, granted: false }
    }

    /// Follows the negotiation messages this node writes until one is an agreement.
    fn written(&mut self, bytes: &[u8]) {
        if self.kind != Kind::Unknown {
            return;
        }
        self.seen.extend_from_slice(bytes);
        self.written_total += bytes.len();
        let mut at = 0;
        while let Some((message, len)) = next_message(&self.seen[at..]) {
            at += len;
            let protocol = message.strip_suffix(b"\n").unwrap_or(message);
            // The header, `na`, and the answer to `ls` (a list, not a protocol id) agree on
            // nothing; an agreement echoes one protocol id, which starts with '/'.
            if protocol == MULTISTREAM_HEADER || protocol == NOT_AVAILABLE || !protocol.starts_with(b"/") {
                continue;
            }
            self.kind = if protocol.starts_with(RELAY_PROTOCOL_PREFIX) { Kind::Relay } else { Kind::Other };
            self.seen = Vec::new();
            return;
        }
        self.seen.drain(..at);
        if self.written_total > MAX_NEGOTIATION_BYTES {
            self.kind = Kind::Relay;
            self.seen = Vec::new();
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for MeteredStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.kind != Kind::Relay {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        if !this.granted && this.sleep.is_none() {
            match this.meter.book() {
                Some(slot) => this.sleep = Some(Box::pin(tokio::time::sleep_until(slot))),
                None => {
                    let n = futures::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                    this.meter.took(n, false);
                    return Poll::Ready(Ok(n));
                }
            }
        }
        if let Some(sleep) = &mut this.sleep {
            futures::ready!(sleep.as_mut().poll(cx));
            this.sleep = None;
            this.granted = true;
        }
        let limit = buf.len().min(QUANTUM);
        let n = futures::ready!(Pin::new(&mut this.inner).poll_read(cx, &mut buf[..limit]))?;
        this.granted = false;
        this.meter.took(n, true);
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for MeteredStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let n = futures::ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.written(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

/// The first multistream-select message in `bytes` (an unsigned-varint length, then that many
/// bytes) and the bytes it takes, if it is all there.
fn next_message(bytes: &[u8]) -> Option<(&[u8], usize)> {
    let (len, rest) = unsigned_varint::decode::usize(bytes).ok()?;
    let body = rest.get(..len)?;
    Some((body, bytes.len() - rest.len() + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A relay stream over an endless source, reading with `buffer`-sized reads.
    fn relay_reader(meter: &std::sync::Arc<Meter>) -> MeteredStream<futures::io::Repeat> {
        let mut stream = MeteredStream::new(futures::io::repeat(7), meter.clone());
        stream.kind = Kind::Relay;
        stream
    }

    /// Reads from `stream` until `until`, with `buffer`-sized reads; returns the bytes read.
    async fn read_until(mut stream: MeteredStream<futures::io::Repeat>, buffer: usize, until: tokio::time::Instant) -> u64 {
        use futures::AsyncReadExt as _;
        let mut buf = vec![0u8; buffer];
        let mut total = 0;
        while tokio::time::Instant::now() < until {
            total += stream.read(&mut buf).await.unwrap() as u64;
        }
        total
    }

    #[tokio::test(start_paused = true)]
    async fn a_capped_meter_holds_the_rate_and_circuits_share_it_fairly() {
        const RATE: u64 = 1024 * 1024;
        let meter = std::sync::Arc::new(Meter::new(Some(RATE)));
        let start = tokio::time::Instant::now();
        // A greedy circuit with big reads starts first; a second with small reads joins a second
        // later, a third later still.
        let until = start + Duration::from_secs(10);
        let greedy = tokio::spawn(read_until(relay_reader(&meter), 256 * 1024, until));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let small = tokio::spawn(read_until(relay_reader(&meter), 4 * 1024, until));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let third = tokio::spawn(read_until(relay_reader(&meter), 64 * 1024, until));
        let (greedy, small, third) = (greedy.await.unwrap(), small.await.unwrap(), third.await.unwrap());
        let total = greedy + small + third;
        eprintln!("10 s at 1 MiB/s: greedy (from 0 s, 256 KiB reads) {greedy}, small (from 1 s, 4 KiB reads) {small}, third (from 2 s) {third}");
        // Ten seconds at the rate, plus the first second's burst and one quantum per circuit.
        assert!(total <= 11 * RATE + 3 * QUANTUM as u64, "over the cap: {total}");
        assert!(total >= 9 * RATE, "the cap is used: {total}");
        // The first two seconds are the greedy's and then shared by two; the last eight by three.
        // The small reader reads 4 KiB per grant, so it gets a quarter of the third's share.
        assert!(third > 2 * RATE, "a late circuit still gets its share: third {third}, greedy {greedy}");
        assert!(greedy < 6 * RATE, "the first circuit does not keep the link: {greedy}");
        assert_eq!(meter.relayed(), total);
    }

    #[tokio::test(start_paused = true)]
    async fn an_uncapped_meter_only_counts() {
        let meter = std::sync::Arc::new(Meter::new(None));
        let read = read_until(relay_reader(&meter), 1024, tokio::time::Instant::now()).await;
        assert_eq!(read, 0);
        use futures::AsyncReadExt as _;
        let mut stream = relay_reader(&meter);
        let mut buf = vec![0u8; 100_000];
        assert_eq!(stream.read(&mut buf).await.unwrap(), 100_000, "no quantum without a cap");
        assert_eq!(meter.relayed(), 100_000);
    }

    fn message(protocol: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let body = format!("{protocol}\n");
        out.extend(unsigned_varint::encode::usize(body.len(), &mut unsigned_varint::encode::usize_buffer()));
        out.extend(body.as_bytes());
        out
    }

    #[test]
    fn relay_streams_are_recognised_by_the_protocol_agreed() {
        let meter = std::sync::Arc::new(Meter::new(None));
        let mut s = MeteredStream::new((), meter.clone());
        s.written(&message("/multistream/1.0.0"));
        s.written(&message("/libp2p/circuit/relay/0.2.0/hop"));
        assert_eq!(s.kind, Kind::Relay);
        let mut s = MeteredStream::new((), meter.clone());
        s.written(&message("/multistream/1.0.0"));
        s.written(&message("/warren/forward/1.0.0"));
        assert_eq!(s.kind, Kind::Other);
        // A message split across writes is put together first.
        let mut s = MeteredStream::new((), meter);
        let hop = [message("/multistream/1.0.0"), message("/libp2p/circuit/relay/0.2.0/stop")].concat();
        for byte in hop.chunks(3) {
            s.written(byte);
        }
        assert_eq!(s.kind, Kind::Relay);
    }

    #[test]
    fn a_long_bogus_proposal_answered_na_does_not_hide_the_hop_protocol_agreed_after_it() {
        // The bypass: the client proposes 500 bytes of nonsense first; this node answers `na`,
        // then echoes the hop protocol well past the first 128 bytes of the stream.
        let meter = std::sync::Arc::new(Meter::new(None));
        let mut s = MeteredStream::new((), meter);
        s.written(&message("/multistream/1.0.0"));
        for _ in 0..20 {
            s.written(&message("na"));
        }
        // An `ls` answer (a list of varint-prefixed ids) is not an agreement either.
        let list = [message("/ipfs/id/1.0.0"), message("/libp2p/circuit/relay/0.2.0/hop")].concat();
        let mut ls = Vec::new();
        ls.extend(unsigned_varint::encode::usize(list.len() + 1, &mut unsigned_varint::encode::usize_buffer()));
        ls.extend(list);
        ls.push(b'\n');
        s.written(&ls);
        assert_eq!(s.kind, Kind::Unknown, "nothing agreed yet");
        s.written(&message("/libp2p/circuit/relay/0.2.0/hop"));
        assert_eq!(s.kind, Kind::Relay);
    }

    #[test]
    fn a_negotiation_that_never_ends_is_metered() {
        let meter = std::sync::Arc::new(Meter::new(None));
        let mut s = MeteredStream::new((), meter);
        s.written(&message("/multistream/1.0.0"));
        while s.kind == Kind::Unknown && s.written_total <= MAX_NEGOTIATION_BYTES {
            s.written(&message("na"));
        }
        assert_eq!(s.kind, Kind::Relay);
    }
}
