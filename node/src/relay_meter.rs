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
//! cannot hide a relay stream: only the agreement counts, wherever it falls in the stream. Reads on them draw from one token bucket, so the aggregate rate stays within
//! the operator's cap: a full bucket makes the relay read slower, and flow control slows the
//! senders. Other streams are not touched beyond the first bytes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

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

/// The relay's shared counter and (optional) rate cap.
pub struct Meter {
    relayed: AtomicU64,
    /// Bytes per second, and the bucket: (tokens, last refill).
    cap: Option<(u64, Mutex<(f64, Instant)>)>,
}

impl Meter {
    pub fn new(bytes_per_sec: Option<u64>) -> Meter {
        Meter { relayed: AtomicU64::new(0), cap: bytes_per_sec.map(|rate| (rate, Mutex::new((rate as f64, Instant::now())))) }
    }

    /// Bytes relayed so far (both directions).
    pub fn relayed(&self) -> u64 {
        self.relayed.load(Ordering::Relaxed)
    }

    /// How long to wait before reading more relayed data (zero: go ahead).
    fn wait(&self) -> Duration {
        let Some((rate, bucket)) = &self.cap else { return Duration::ZERO };
        let mut bucket = bucket.lock().unwrap();
        let now = Instant::now();
        // Refill; at most one second's worth is banked (the burst).
        bucket.0 = (bucket.0 + now.duration_since(bucket.1).as_secs_f64() * *rate as f64).min(*rate as f64);
        bucket.1 = now;
        if bucket.0 > 0.0 { Duration::ZERO } else { Duration::from_secs_f64((-bucket.0 + 1.0) / *rate as f64) }
    }

    fn took(&self, n: usize) {
        self.relayed.fetch_add(n as u64, Ordering::Relaxed);
        if let Some((_, bucket)) = &self.cap {
            bucket.lock().unwrap().0 -= n as f64;
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
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> MeteredStream<S> {
    fn new(inner: S, meter: std::sync::Arc<Meter>) -> Self {
        MeteredStream { inner, meter, kind: Kind::Unknown, seen: Vec::new(), written_total: 0, sleep: None }
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
        if this.kind == Kind::Relay {
            loop {
                if let Some(sleep) = &mut this.sleep {
                    futures::ready!(sleep.as_mut().poll(cx));
                    this.sleep = None;
                }
                let wait = this.meter.wait();
                if wait.is_zero() {
                    break;
                }
                this.sleep = Some(Box::pin(tokio::time::sleep(wait)));
            }
        }
        let n = futures::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if this.kind == Kind::Relay {
            this.meter.took(n);
        }
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

    #[test]
    fn a_capped_meter_makes_readers_wait_once_the_second_is_spent() {
        let meter = Meter::new(Some(1000));
        assert_eq!(meter.wait(), Duration::ZERO);
        meter.took(1500);
        let wait = meter.wait();
        assert!(wait > Duration::from_millis(400) && wait < Duration::from_millis(600), "{wait:?}");
        assert_eq!(meter.relayed(), 1500);
        assert_eq!(Meter::new(None).wait(), Duration::ZERO);
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
