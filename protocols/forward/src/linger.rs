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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;

/// The streams of one connection in use, when the last one closed, and when one of them last
/// brought bytes from the peer.
#[derive(Debug, Default)]
pub(crate) struct Usage {
    open: AtomicUsize,
    /// Of those, the ones this side opened.
    opened_here: AtomicUsize,
    /// Forward streams sent to this connection to be opened and not open yet (queued or
    /// negotiating): with `opened_here`, what the behaviour reads to tell whether it is full.
    reserved: AtomicUsize,
    last_closed: Mutex<Option<Instant>>,
    /// The [`now_ms`] at which a stream last read bytes (0: never). An atomic,
    /// not a lock: every read of every forwarded connection stores it.
    heard_ms: AtomicU64,
    /// The handler's task, woken when a stream closes (it may be holding opens back).
    closed: AtomicWaker,
}

/// Milliseconds since the first call, the clock of [`Usage::heard_ms`].
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl Usage {
    /// Streams of this connection in use now: all, or only those this side opened.
    pub(crate) fn open(&self, opened_here_only: bool) -> usize {
        if opened_here_only { &self.opened_here } else { &self.open }.load(Ordering::Relaxed)
    }

    /// Forward streams on their way to being opened here.
    pub(crate) fn reserved(&self) -> usize {
        self.reserved.load(Ordering::Relaxed)
    }

    pub(crate) fn reserve(&self) {
        self.reserved.fetch_add(1, Ordering::Relaxed);
    }

    /// One reserved stream opened (it counts as open by now), failed, or went elsewhere.
    pub(crate) fn unreserve(&self) {
        let _ = self.reserved.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Wakes the handler's task (`cx`) when a stream closes.
    pub(crate) fn wake_on_close(&self, cx: &Context<'_>) {
        self.closed.register(cx.waker());
    }

    /// How long ago a stream of this connection last read bytes from the peer, if ever.
    pub(crate) fn heard_ago(&self) -> Option<Duration> {
        let at = self.heard_ms.load(Ordering::Relaxed);
        (at != 0).then(|| Duration::from_millis(now_ms().saturating_sub(at)))
    }

    fn heard(&self) {
        self.heard_ms.store(now_ms().max(1), Ordering::Relaxed);
    }

    /// Whether the connection should stay open: a stream is open, or the last one closed less
    /// than `linger` ago.
    pub(crate) fn wanted(&self, linger: Duration) -> bool {
        self.open.load(Ordering::Relaxed) > 0
            || self.last_closed.lock().expect("usage lock").is_some_and(|closed| closed.elapsed() < linger)
    }

    /// Counts `stream` in until it is dropped; `opened_here`: this side opened it.
    pub(crate) fn track(self: &Arc<Self>, stream: libp2p::Stream, opened_here: bool) -> Stream {
        self.open.fetch_add(1, Ordering::Relaxed);
        if opened_here {
            self.opened_here.fetch_add(1, Ordering::Relaxed);
        }
        Stream { inner: stream, usage: self.clone(), opened_here }
    }
}

/// A stream of this behaviour: a [`libp2p::Stream`] that keeps its connection open until the
/// linger after it is dropped.
#[derive(Debug)]
pub struct Stream {
    inner: libp2p::Stream,
    usage: Arc<Usage>,
    opened_here: bool,
}

impl Drop for Stream {
    fn drop(&mut self) {
        *self.usage.last_closed.lock().expect("usage lock") = Some(Instant::now());
        self.usage.open.fetch_sub(1, Ordering::Relaxed);
        if self.opened_here {
            self.usage.opened_here.fetch_sub(1, Ordering::Relaxed);
        }
        self.usage.closed.wake();
    }
}

impl Stream {
    fn note_read(&self, read: &Poll<io::Result<usize>>) {
        if matches!(read, Poll::Ready(Ok(n)) if *n > 0) {
            self.usage.heard();
        }
    }
}

impl futures::AsyncRead for Stream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.note_read(&read);
        read
    }

    fn poll_read_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &mut [io::IoSliceMut<'_>],
    ) -> Poll<io::Result<usize>> {
        let read = Pin::new(&mut self.inner).poll_read_vectored(cx, bufs);
        self.note_read(&read);
        read
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

    #[test]
    fn a_connection_is_heard_from_when_a_stream_read_bytes_lately() {
        let usage = Usage::default();
        assert_eq!(usage.heard_ago(), None, "nothing read yet");
        usage.heard();
        assert!(usage.heard_ago().is_some_and(|ago| ago < Duration::from_secs(1)));
        usage.heard_ms.store(1, Ordering::Relaxed);
        let now = now_ms();
        assert!(usage.heard_ago().unwrap() >= Duration::from_millis(now.saturating_sub(1)), "counted from the read's instant");
    }
}
