//! Counting and capping the bytes a volunteer relay carries for others.
//!
//! libp2p's relay copies circuit data between two streams inside its handler and reports neither
//! byte counts nor offers a rate limit. A relay node's connections are therefore wrapped: every
//! substream watches its first bytes for the relay protocol ids (the multistream-select header
//! names `/libp2p/circuit/relay/0.2.0/hop` or `/stop`), and the bytes *read* on such streams are
//! the relayed traffic (each relayed byte is read once, on the source's stream, then written to the
//! destination's). Reads on them draw from one token bucket, so the aggregate rate stays within
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

/// Bytes of a substream's start examined for a relay protocol id.
const SNIFF_BYTES: usize = 128;
const RELAY_PROTOCOL_PREFIX: &[u8] = b"/libp2p/circuit/relay/0.2.0/";

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
    seen: Vec<u8>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> MeteredStream<S> {
    fn new(inner: S, meter: std::sync::Arc<Meter>) -> Self {
        MeteredStream { inner, meter, kind: Kind::Unknown, seen: Vec::new(), sleep: None }
    }

    fn sniff(&mut self, bytes: &[u8]) {
        if self.kind != Kind::Unknown {
            return;
        }
        let room = SNIFF_BYTES - self.seen.len();
        self.seen.extend_from_slice(&bytes[..bytes.len().min(room)]);
        if self.seen.windows(RELAY_PROTOCOL_PREFIX.len()).any(|w| w == RELAY_PROTOCOL_PREFIX) {
            self.kind = Kind::Relay;
            self.seen = Vec::new();
        } else if self.seen.len() >= SNIFF_BYTES {
            self.kind = Kind::Other;
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
        match this.kind {
            Kind::Relay => this.meter.took(n),
            Kind::Unknown => this.sniff(&buf[..n]),
            Kind::Other => {}
        }
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for MeteredStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let n = futures::ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.sniff(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
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

    #[test]
    fn relay_streams_are_recognised_by_their_protocol_id() {
        let meter = std::sync::Arc::new(Meter::new(None));
        let mut s = MeteredStream::new((), meter.clone());
        s.sniff(b"\x13/multistream/1.0.0\n\x20/libp2p/circuit/relay/0.2.0/hop\n");
        assert_eq!(s.kind, Kind::Relay);
        let mut s = MeteredStream::new((), meter);
        s.sniff(b"\x13/multistream/1.0.0\n\x16/warren/forward/1.0.0\n");
        s.sniff(&[0u8; 200]);
        assert_eq!(s.kind, Kind::Other);
    }
}
