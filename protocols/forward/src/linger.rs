//! How long a connection stays open once idle depends on what it carried. The swarm closes a
//! connection its idle timeout after the last handler stopped asking to keep it, and a node sets
//! that timeout short, for connections that only carried the DHT, identify, ping or AutoNAT: a
//! lookup touches dozens of peers, and each connection it leaves open costs pings and wake-ups
//! for as long as it lives. A connection that carried streams of this behaviour (forwarded
//! traffic, punch offers, path probes) is worth more: reopening it may take a relay and a hole
//! punch. Its handler keeps it open for the linger after the last of its streams closed.
//!
//! Streams are handed out wrapped in [`Stream`], which counts itself in and out of its
//! connection's [`Usage`]; the handler reads it when the swarm asks.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// The streams of one connection in use, and when the last one closed.
#[derive(Debug, Default)]
pub(crate) struct Usage {
    open: AtomicUsize,
    last_closed: Mutex<Option<Instant>>,
}

impl Usage {
    /// Whether the connection should stay open: a stream is open, or the last one closed less
    /// than `linger` ago.
    pub(crate) fn wanted(&self, linger: Duration) -> bool {
        self.open.load(Ordering::Relaxed) > 0
            || self.last_closed.lock().expect("usage lock").is_some_and(|closed| closed.elapsed() < linger)
    }

    /// Counts `stream` in until it is dropped.
    pub(crate) fn track(self: &Arc<Self>, stream: libp2p::Stream) -> Stream {
        self.open.fetch_add(1, Ordering::Relaxed);
        Stream { inner: stream, usage: self.clone() }
    }
}

/// A stream of this behaviour: a [`libp2p::Stream`] that keeps its connection open until the
/// linger after it is dropped.
#[derive(Debug)]
pub struct Stream {
    inner: libp2p::Stream,
    usage: Arc<Usage>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        *self.usage.last_closed.lock().expect("usage lock") = Some(Instant::now());
        self.usage.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl futures::AsyncRead for Stream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }

    fn poll_read_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &mut [io::IoSliceMut<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_read_vectored(cx, bufs)
    }
}

impl futures::AsyncWrite for Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_wanted_while_a_stream_is_open_and_for_the_linger_after() {
        let usage = Usage::default();
        assert!(!usage.wanted(Duration::from_secs(60)), "a connection that never carried a stream lingers not at all");
        usage.open.fetch_add(1, Ordering::Relaxed);
        assert!(usage.wanted(Duration::ZERO), "an open stream keeps it");
        usage.open.fetch_sub(1, Ordering::Relaxed);
        *usage.last_closed.lock().unwrap() = Some(Instant::now() - Duration::from_secs(30));
        assert!(usage.wanted(Duration::from_secs(60)), "closed 30 s ago, linger 60 s");
        assert!(!usage.wanted(Duration::from_secs(20)), "closed 30 s ago, linger 20 s");
    }
}
