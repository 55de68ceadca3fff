//! Forwarded TCP connections that outlive their stream. A direct connection that dies (the NAT
//! moved our port, the path went down) takes its streams with it; the forwarded connection
//! carries on over another stream (through the relay, or a new punch) where it left off.
//!
//! Each side keeps the bytes it sent until the peer acknowledges them (at most [`WINDOW`]; a
//! full window stops reading the local connection) and counts the bytes it received. When the
//! stream fails, the opener opens another and asks the answerer to resume the session from
//! the bytes it received; the answer says how many the answerer received; each side sends again
//! what the other lacks. The wire format is in `warren_forward` (sessions, `Chunk::Ack`).
//!
//! Known limit: acknowledgements travel in the stream behind data. A side whose local
//! application stops reading its input also stops reading the stream, acknowledgements
//! included; the other side can then send at most [`WINDOW`] more before it waits. A service
//! that streams a long response without reading a long upload therefore stalls once both
//! directions are full, where a plain TCP connection would go on answering.
//!
//! Data arrives exactly once and in order: `received` counts only bytes written to the local
//! connection, one `write` at a time, so whatever was read from a dying stream but not written
//! comes again on the next one.

use std::collections::VecDeque;
use std::io::{Error, ErrorKind};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::compat::TokioAsyncReadCompatExt;
use warren_forward::{ACK_COUNT, CHUNK_HEADER as HEADER, Chunk, Reply, Status};

use super::splice::{ANSWER_GRACE, BUFFER, SEND_AHEAD, SpliceError, reset};

/// Bytes sent and not yet acknowledged, per direction of a connection. A connection moves at
/// most this much per round trip (32 MiB/s at 30 ms), and a stalled peer holds this much of our
/// memory per connection: 1 MiB keeps a home uplink's bulk transfer unthrottled while 500 busy
/// connections hold at most 500 MiB.
pub const WINDOW: usize = 1024 * 1024;
/// Received bytes between acknowledgements: a quarter of the window, so the sender never waits
/// for one while the path is fine. Each is a wake-up of both sides and a packet of its own; at
/// 128 KiB sessions cost 12-19 % more CPU per GiB forwarded than connections without them
/// (measured: `forward_bench.py --baseline`), at 256 KiB 1-15 % (this machine's noise is as large).
pub const ACK_EVERY: u64 = 256 * 1024;
/// What a kept chunk costs beyond its bytes (its allocation and queue entry), counted against
/// the window: a chatty connection of many tiny writes holds no more memory than the window
/// says.
const CHUNK_COST: usize = 256;
/// Reads go one after another into a block of [`BUFFER`] bytes (and a header each) and are
/// kept as read, sharing the block, never copied; a new block is taken when less than this is
/// left of the current one. Kept chunks are freed in the order they were read, so the blocks
/// they hold are consecutive: at most the window's bytes and two blocks per direction.
const READ_MIN: usize = 4 * 1024;

/// How long a session waits for its next stream after one failed: a dead path is noticed in 3-4 s
/// when a session is busy on it (see [`SILENCE`]), in QUIC's 10 s idle timeout otherwise, and
/// a new punch or relayed connection takes a few more. The answerer holds the
/// connection to its service (and its slot) this long; the opener keeps trying to reach the
/// peer for as long.
pub const GRACE: Duration = Duration::from_secs(30);

/// Nothing heard on the stream this long while the peer owes us something (an acknowledgement
/// of bytes we sent, or the next of the bytes it was sending) makes the session ask the node to
/// probe the peer's direct connections (`warren_probe`). The peer acknowledges within
/// a [`WATCH_TICK`] of writing what it received, so on a working path a second of silence is its
/// application pausing, or the path gone; the probe tells which, long before QUIC's idle
/// timeout (10 s) would.
pub const SILENCE: Duration = Duration::from_secs(1);
/// A session still waiting for acknowledgements asks again this often: the path may die after
/// a probe found it alive (the silence then was a slow reader).
const SILENCE_AGAIN: Duration = Duration::from_secs(4);
/// How often a session's watcher looks at it. Received bytes not yet acknowledged are then
/// (an interactive connection, a shell or a chat, never reaches [`ACK_EVERY`], and the peer
/// keeps what it sent until acknowledged); the watcher rather than a timer of the upload side,
/// so that a bulk transfer costs no wake-ups beyond its acknowledgements. And silence is
/// looked at: half of [`SILENCE`], so a dead path is probed 1 to 1.5 s after the last thing
/// heard.
const WATCH_TICK: Duration = Duration::from_millis(500);

/// What one side of a session keeps across its streams.
#[derive(Default)]
struct State {
    /// Bytes read from the local connection that the peer has not acknowledged, oldest first.
    unacked: VecDeque<Bytes>,
    unacked_len: usize,
    /// Session offset of the first unacknowledged byte: the peer has everything before it.
    acked: u64,
    /// The local connection reached its end; every byte of it is acknowledged or in `unacked`.
    local_eof: bool,
    /// The end marker went out on the current stream.
    end_sent: bool,
    /// Bytes from the peer written to the local connection.
    received: u64,
    /// The count last acknowledged to the peer.
    confirmed: u64,
    /// The peer's end marker arrived; the local write side is shut.
    remote_end: bool,
    /// Whether the peer resumes; `None` until an opener reads the answer to its first request.
    resumable: Option<bool>,
    /// A replacement stream is being asked for with `received` as it was then: no
    /// acknowledgement may go beyond it, since the peer sends again from there.
    acks_held: bool,
    /// When the current stream last delivered anything (a chunk, an acknowledgement), or began.
    heard: Option<Instant>,
    /// Since when we have been waiting for the peer to acknowledge something: the oldest unacked
    /// byte's sending, or the last acknowledgement that left some unacked.
    waiting_since: Option<Instant>,
    /// Data arrived since the stream last went quiet (a peer that was sending and stops is
    /// worth one probe per pause).
    quiet_unchecked: bool,
    /// When this session last asked for a probe.
    last_alarm: Option<Instant>,
    /// The download side is waiting for the local connection to take bytes (and so does not
    /// read the stream).
    writing_local: bool,
    /// The watcher found received bytes unacknowledged: acknowledge them now.
    ack_now: bool,
}

impl State {
    fn done(&self) -> bool {
        self.local_eof
            && self.end_sent
            && self.remote_end
            && (self.resumable == Some(false) || (self.unacked_len == 0 && self.confirmed == self.received))
    }

    /// Whether the silence on the stream at `now` is worth a probe of the path (see
    /// [`SILENCE`]); if so, it is taken as asked.
    fn silence_alarm(&mut self, now: Instant) -> bool {
        if self.resumable != Some(true) || self.writing_local || self.heard.is_none_or(|heard| now - heard < SILENCE) {
            return false;
        }
        let waiting = self.waiting_since.is_some_and(|since| now - since >= SILENCE)
            && self.last_alarm.is_none_or(|last| now - last >= SILENCE_AGAIN);
        if !(waiting || self.quiet_unchecked) {
            return false;
        }
        self.quiet_unchecked = false;
        self.last_alarm = Some(now);
        true
    }

    /// A chunk arrived on the current stream.
    fn heard(&mut self, now: Instant, data: bool) {
        self.heard = Some(now);
        self.quiet_unchecked |= data;
    }

    /// The memory the kept chunks stand for, against [`WINDOW`].
    fn window_used(&self) -> usize {
        self.unacked_len + self.unacked.len() * CHUNK_COST
    }

    /// Something received is not acknowledged yet (and may be now).
    fn ack_pending(&self) -> bool {
        self.resumable == Some(true) && !self.acks_held && self.received > self.confirmed
    }

    fn ack_due(&self) -> bool {
        self.resumable == Some(true) && !self.acks_held && (self.received - self.confirmed >= ACK_EVERY || (self.remote_end && self.received > self.confirmed))
    }

    /// The peer has every byte before `upto`.
    fn release(&mut self, upto: u64, now: Instant) -> Result<(), Error> {
        let end = self.acked + self.unacked_len as u64;
        if upto < self.acked || upto > end {
            return Err(Error::new(ErrorKind::InvalidData, format!("the peer acknowledged {upto} bytes; {} to {end} were possible", self.acked)));
        }
        while self.acked < upto {
            let front = self.unacked.front_mut().expect("counted above");
            let take = front.len().min((upto - self.acked) as usize);
            if take == front.len() {
                self.unacked.pop_front();
            } else {
                *front = front.slice(take..);
            }
            self.acked += take as u64;
            self.unacked_len -= take;
        }
        self.waiting_since = (self.unacked_len > 0).then_some(now);
        Ok(())
    }

    /// A new stream, whose peer has received `peer_received` bytes and was told we have
    /// `reported`: what it lacks, to send again. The peer's next acknowledgement counts from
    /// `reported`, which may be less than we have (what came meanwhile is sent again, skipped,
    /// and must be acknowledged for the peer to free it).
    fn rewind(&mut self, peer_received: u64, reported: u64, now: Instant) -> Result<Vec<Bytes>, Error> {
        self.release(peer_received, now)?;
        self.heard = Some(now);
        // The old stream's download may have been dropped in the middle of a local write.
        self.writing_local = false;
        self.acks_held = false;
        self.end_sent = false;
        self.confirmed = reported;
        Ok(self.unacked.iter().cloned().collect())
    }
}

/// How one stream of a session ended.
#[derive(Debug)]
enum Detached {
    /// Both directions ended and everything was acknowledged.
    Done,
    /// The stream failed: the session goes on over another.
    Stream(Error),
    /// The local connection failed, the peer reset its side, or broke the protocol: reset.
    Fatal(Error),
    /// The answer to the opener's first request refused it.
    Refused(String),
}

/// Where a session gets its next stream.
pub(crate) trait Streams<S> {
    /// A stream to go on with after the current one failed, and the bytes the peer has
    /// received; `Err` (why) when there is none within [`GRACE`].
    async fn after_failure(&mut self, progress: Progress<'_>) -> Result<(S, u64), String>;
    /// A stream that replaces one still working, and the bytes the peer has received: the
    /// answerer gets one when the opener resumed before the answerer saw the old stream fail, or
    /// moved the session to a better path; the opener makes one to move from a relay to a new
    /// direct connection. With it comes the count this side reported on it (`progress` told it
    /// while the old stream went on, so more may have arrived since; that much is skipped).
    /// Never ready by default.
    async fn replacement(&mut self, progress: Progress<'_>) -> (S, u64, u64) {
        let _ = progress;
        std::future::pending().await
    }
    /// What to call when the stream has been silent too long (see [`SILENCE`]): the node
    /// probes the peer's direct connections. Nothing by default.
    fn silence_alarm(&mut self) -> Box<dyn Fn() + Send + Sync> {
        Box::new(|| {})
    }
}

/// What a session has done so far, for its [`Streams`] to look at.
#[derive(Clone, Copy)]
pub(crate) struct Progress<'a>(&'a Mutex<State>, &'a Notify);

impl Progress<'_> {
    /// Bytes from the peer written to the local connection.
    pub(crate) fn received(&self) -> u64 {
        self.0.lock().unwrap().received
    }

    /// Bytes the peer has acknowledged: a resume claiming less is stale (an abandoned attempt
    /// arriving late), since the peer acknowledged more on a later stream.
    pub(crate) fn acked(&self) -> u64 {
        self.0.lock().unwrap().acked
    }

    /// The count to report on a replacement stream: acknowledgements stop here until the
    /// session is on its next stream (or [`Progress::release_acks`]), so the peer never drops
    /// bytes it is about to send again.
    pub(crate) fn hold_acks(&self) -> u64 {
        let mut st = self.0.lock().unwrap();
        st.acks_held = true;
        st.received
    }

    /// The replacement did not happen: acknowledgements go on.
    pub(crate) fn release_acks(&self) {
        self.0.lock().unwrap().acks_held = false;
        self.1.notify_one();
    }

    /// The peer resumes sessions (known once an opener has its first answer).
    pub(crate) fn resumable(&self) -> bool {
        self.0.lock().unwrap().resumable == Some(true)
    }
}

/// Which end of the session this is: the answerer replies to each stream that resumes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The forwarding side; its first stream's answer is still to be read.
    Opener,
    /// The exposing side; its first stream was accepted as a new session.
    Answerer,
}

/// The bytes each way, as counted for the forward's statistics.
pub struct Counters<'a> {
    pub sent: &'a AtomicU64,
    pub received: &'a AtomicU64,
    /// When any session counting here last heard from its peer ([`heard_ms`]): one that did
    /// within [`SILENCE`] shows the path works, so a quiet session on it asks for no probe.
    pub heard: &'a AtomicU64,
}

/// Milliseconds since the process's first call: the time kept in [`Counters::heard`].
pub fn heard_ms(at: std::time::Instant) -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    // Never 0, which stands for "never heard".
    at.saturating_duration_since(*EPOCH.get_or_init(std::time::Instant::now)).as_millis() as u64 + 1
}

/// Runs a forwarded connection over a session: `first` is its first stream (for an opener, with
/// the request sent and the answer unread). Returns when both sides ended cleanly; on a local
/// failure, a reset by the peer or a failed stream with none to follow, the local connection is
/// reset.
pub(crate) async fn run<S>(tcp: tokio::net::TcpStream, first: S, role: Role, counters: Counters<'_>, mut streams: impl Streams<S>) -> Result<(), SpliceError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tcp.set_nodelay(true);
    let (mut tcp_r, mut tcp_w) = tcp.into_split();
    let state = Mutex::new(State { resumable: (role == Role::Answerer).then_some(true), heard: Some(Instant::now()), ..State::default() });
    let wake = Notify::new();
    let alarm = streams.silence_alarm();
    let mut stream = first;
    let mut resend = Vec::new();
    // Bytes the peer sends again on the new stream that we have already.
    let mut skip = 0;
    let outcome = loop {
        let detached = {
            let (mut r, mut w) = tokio::io::split(&mut stream);
            let upload = upload(&mut tcp_r, &mut w, &state, &wake, std::mem::take(&mut resend), counters.sent);
            let download = download(&mut r, &mut tcp_w, &state, &wake, &counters, std::mem::take(&mut skip));
            tokio::pin!(upload, download);
            let replaced = tokio::select! {
                done = &mut upload => match done {
                    Ok(()) => Err(Detached::Done),
                    // A refusal usually arrives just behind the peer's stop: say why.
                    Err(e) if state.lock().unwrap().resumable.is_none() => match tokio::time::timeout(ANSWER_GRACE, &mut download).await {
                        Ok(Err(Detached::Refused(why))) => Err(Detached::Refused(why)),
                        _ => Err(e),
                    },
                    Err(e) => Err(e),
                },
                done = &mut download => match done {
                    Ok(()) if state.lock().unwrap().done() => Err(Detached::Done),
                    Ok(()) => Err(upload.await.err().unwrap_or(Detached::Done)),
                    Err(e) => Err(e),
                },
                next = streams.replacement(Progress(&state, &wake)) => Ok(next),
                never = watch(&state, &wake, counters.heard, &alarm) => match never {},
            };
            replaced
        };
        let (next, peer_received, reported) = match detached {
            Ok(next) => next,
            Err(Detached::Done) => {
                use futures::AsyncWriteExt as _;
                let _ = tokio::time::timeout(Duration::from_secs(5), (&mut stream).compat().close()).await;
                break Ok(());
            }
            Err(Detached::Refused(why)) => break Err(SpliceError::Refused(why)),
            Err(Detached::Fatal(e)) => {
                send_reset(&mut stream).await;
                break Err(SpliceError::Cut(e));
            }
            Err(Detached::Stream(e)) => {
                if state.lock().unwrap().resumable != Some(true) {
                    break Err(SpliceError::Cut(e));
                }
                let received = state.lock().unwrap().received;
                tracing::debug!(error = %e, received, "forward stream failed; resuming the session on another");
                match streams.after_failure(Progress(&state, &wake)).await {
                    Ok((next, peer_received)) => (next, peer_received, received),
                    Err(why) => break Err(SpliceError::Cut(Error::new(ErrorKind::ConnectionReset, format!("{e}; could not resume: {why}")))),
                }
            }
        };
        stream = next;
        let received = state.lock().unwrap().received;
        if reported > received {
            break Err(SpliceError::Cut(Error::other(format!("reported {reported} bytes received of {received}"))));
        }
        skip = received - reported;
        let rewound = state.lock().unwrap().rewind(peer_received, reported, Instant::now());
        match rewound {
            Ok(again) => resend = again,
            Err(e) => break Err(SpliceError::Cut(e)),
        }
        if role == Role::Answerer {
            let received = state.lock().unwrap().received;
            let reply = Reply { received: Some(received), ..Reply::new(Status::Accepted, None) };
            if let Err(e) = warren_forward::write_reply(&mut (&mut stream).compat(), &reply).await {
                // The new stream failed at once: the opener tries another.
                resend.clear();
                tracing::debug!(error = %e, "a resumed forward stream failed before its answer");
            }
        }
        tracing::debug!(peer_received, "forward session resumed on a new stream");
    };
    if outcome.is_err() {
        reset(tcp_w.as_ref());
        tcp_w.forget();
    }
    outcome
}

/// The session's watcher: has what was received acknowledged at each tick (see [`WATCH_TICK`]),
/// and rings `alarm` whenever the stream's silence is worth a probe of the path; never returns.
async fn watch(state: &Mutex<State>, wake: &Notify, heard: &AtomicU64, alarm: &(dyn Fn() + Send + Sync)) -> std::convert::Infallible {
    loop {
        tokio::time::sleep(WATCH_TICK).await;
        let now = std::time::Instant::now();
        let (ring, ack) = {
            let mut st = state.lock().unwrap();
            let ack = st.ack_pending();
            st.ack_now |= ack;
            (st.silence_alarm(Instant::from_std(now)), ack)
        };
        if ack {
            wake.notify_one();
        }
        // Another connection of the same forward heard from the peer just now: the path
        // carries data (a probe might not even get a stream slot on a connection full of them).
        let last = heard.load(Ordering::Relaxed);
        let others = last != 0 && heard_ms(now).saturating_sub(last) < SILENCE.as_millis() as u64;
        if ring && !others {
            tracing::debug!("forward stream silent; probing the path");
            alarm();
        }
    }
}

/// Tells the peer not to resume: our side is gone. Best effort, briefly.
async fn send_reset<S: AsyncWrite + Unpin>(stream: &mut S) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(&Chunk::Reset.encode()).await?;
        stream.shutdown().await
    })
    .await;
}

/// Local connection → stream: first what the peer lacks (`resend`), then new data as chunks,
/// acknowledgements when due, the end marker after the local end. Returns `Ok` when the session
/// is done.
async fn upload<R, W>(tcp: &mut R, stream: &mut W, state: &Mutex<State>, wake: &Notify, resend: Vec<Bytes>, sent: &AtomicU64) -> Result<(), Detached>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    for data in resend {
        stream.write_all(&Chunk::Data(data.len()).encode()).await.map_err(Detached::Stream)?;
        stream.write_all(&data).await.map_err(Detached::Stream)?;
    }
    let mut buf = BytesMut::new();
    let mut ahead = 0;
    enum Step {
        Done,
        Ack(u64),
        End,
        Wait,
        Read(usize),
    }
    loop {
        let step = {
            let st = state.lock().unwrap();
            if st.done() {
                Step::Done
            } else if st.ack_due() || (st.ack_now && st.ack_pending()) {
                Step::Ack(st.received)
            } else if st.local_eof {
                if st.end_sent { Step::Wait } else { Step::End }
            } else if st.resumable.is_none() {
                // Before the answer, the first flight only (see `splice::SEND_AHEAD`).
                if ahead >= SEND_AHEAD { Step::Wait } else { Step::Read(SEND_AHEAD - ahead) }
            } else if st.resumable == Some(true) && st.window_used() >= WINDOW {
                Step::Wait
            } else {
                Step::Read(BUFFER)
            }
        };
        match step {
            Step::Done => return Ok(()),
            Step::Ack(count) => {
                let mut frame = [0u8; HEADER + ACK_COUNT];
                frame[..HEADER].copy_from_slice(&Chunk::Ack.encode());
                frame[HEADER..].copy_from_slice(&count.to_be_bytes());
                stream.write_all(&frame).await.map_err(Detached::Stream)?;
                stream.flush().await.map_err(Detached::Stream)?;
                let mut st = state.lock().unwrap();
                st.confirmed = count;
                st.ack_now = false;
            }
            Step::End => {
                stream.write_all(&Chunk::End.encode()).await.map_err(Detached::Stream)?;
                stream.flush().await.map_err(Detached::Stream)?;
                state.lock().unwrap().end_sent = true;
            }
            Step::Wait => wake.notified().await,
            Step::Read(limit) => {
                buf.clear();
                if buf.capacity() < HEADER + READ_MIN.min(limit) {
                    // A new block, or the old one back when nothing is kept of it.
                    buf.reserve(HEADER + BUFFER);
                }
                let limit = limit.min(buf.capacity() - HEADER);
                buf.put_bytes(0, HEADER);
                let mut room = (&mut buf).limit(limit);
                let read = tokio::select! {
                    // Reading is cancel-safe: an acknowledgement due meanwhile goes out first.
                    _ = wake.notified() => continue,
                    read = tcp.read_buf(&mut room) => read,
                };
                let n = read.map_err(Detached::Fatal)?;
                if n == 0 {
                    state.lock().unwrap().local_eof = true;
                    continue;
                }
                buf[..HEADER].copy_from_slice(&Chunk::Data(n).encode());
                let keep = state.lock().unwrap().resumable != Some(false);
                // The next read goes on in what is left of the block.
                let frame = buf.split().freeze();
                let kept = keep.then(|| frame.slice(HEADER..));
                {
                    let mut st = state.lock().unwrap();
                    if let Some(kept) = kept {
                        st.unacked.push_back(kept);
                        st.unacked_len += n;
                    }
                    if st.resumable.is_none() {
                        ahead += n;
                    }
                    if st.waiting_since.is_none() {
                        st.waiting_since = Some(Instant::now());
                    }
                }
                stream.write_all(&frame).await.map_err(Detached::Stream)?;
                sent.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
}

/// Stream → local connection: the answer first (an opener's first stream), then chunks,
/// acknowledgements and the end marker. Returns `Ok` when there is nothing more to read.
async fn download<R, W>(stream: &mut R, tcp: &mut W, state: &Mutex<State>, wake: &Notify, counters: &Counters<'_>, mut skip: u64) -> Result<(), Detached>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if state.lock().unwrap().resumable.is_none() {
        let reply = match tokio::time::timeout(super::client::REPLY_TIMEOUT, warren_forward::read_reply(&mut (&mut *stream).compat())).await {
            Err(_) => return Err(Detached::Refused("the peer did not answer".into())),
            Ok(Err(e)) => return Err(Detached::Refused(format!("the peer's answer was unreadable: {e}"))),
            Ok(Ok(reply)) => reply,
        };
        if reply.status != Status::Accepted {
            let refusal = warren_forward::opener::Refusal::Refused { status: reply.status, detail: reply.detail };
            return Err(Detached::Refused(refusal.to_string()));
        }
        let mut st = state.lock().unwrap();
        st.heard(Instant::now(), false);
        match reply.received {
            Some(0) => st.resumable = Some(true),
            Some(n) => return Err(Detached::Fatal(Error::new(ErrorKind::InvalidData, format!("a new session answered as having received {n} bytes")))),
            None => {
                // An answerer without sessions: the stream is the connection.
                st.resumable = Some(false);
                st.unacked.clear();
                st.unacked_len = 0;
            }
        }
        wake.notify_one();
    }
    let mut buf = super::splice::ReadBuf::new();
    loop {
        {
            let st = state.lock().unwrap();
            if st.done() || (st.resumable == Some(false) && st.remote_end) {
                return Ok(());
            }
        }
        let mut header = [0u8; HEADER];
        stream.read_exact(&mut header).await.map_err(|e| match e.kind() {
            ErrorKind::UnexpectedEof => Detached::Stream(Error::new(ErrorKind::ConnectionReset, "the stream ended before the session did")),
            _ => Detached::Stream(e),
        })?;
        let chunk = {
            let now = std::time::Instant::now();
            let mut st = state.lock().unwrap();
            let chunk = if st.resumable == Some(true) { Chunk::decode_in_session(header) } else { Chunk::decode(header) };
            let chunk = chunk.map_err(|e| Detached::Fatal(Error::new(ErrorKind::InvalidData, e.to_string())))?;
            st.heard(Instant::from_std(now), matches!(chunk, Chunk::Data(_)));
            counters.heard.store(heard_ms(now), Ordering::Relaxed);
            chunk
        };
        match chunk {
            Chunk::Data(len) => {
                let mut left = len;
                while left > 0 {
                    let n = stream.read(buf.room(left)).await.map_err(Detached::Stream)?;
                    if n == 0 {
                        return Err(Detached::Stream(Error::new(ErrorKind::ConnectionReset, "the stream ended mid-chunk")));
                    }
                    left -= n;
                    // What we had before this stream's start: the peer sent it again.
                    let dup = skip.min(n as u64) as usize;
                    skip -= dup as u64;
                    // One write at a time, each counted: what a cut stream leaves unwritten
                    // comes again on the next.
                    let mut at = dup;
                    while at < n {
                        // While the local application is slow to read, the stream is not read
                        // either: its silence is ours, not the path's.
                        state.lock().unwrap().writing_local = true;
                        let wrote = tcp.write(&buf.read(n)[at..]).await.map_err(Detached::Fatal)?;
                        if wrote == 0 {
                            return Err(Detached::Fatal(Error::from(ErrorKind::WriteZero)));
                        }
                        at += wrote;
                        let mut st = state.lock().unwrap();
                        st.received += wrote as u64;
                        st.writing_local = false;
                        st.heard = Some(Instant::now());
                        counters.received.fetch_add(wrote as u64, Ordering::Relaxed);
                    }
                    buf.used(n);
                }
                if state.lock().unwrap().ack_due() {
                    wake.notify_one();
                }
            }
            Chunk::End => {
                if !state.lock().unwrap().remote_end {
                    tcp.shutdown().await.map_err(Detached::Fatal)?;
                    state.lock().unwrap().remote_end = true;
                }
                wake.notify_one();
            }
            Chunk::Ack => {
                let mut count = [0u8; ACK_COUNT];
                stream.read_exact(&mut count).await.map_err(Detached::Stream)?;
                state.lock().unwrap().release(u64::from_be_bytes(count), Instant::now()).map_err(Detached::Fatal)?;
                wake.notify_one();
            }
            Chunk::Reset => return Err(Detached::Fatal(Error::new(ErrorKind::ConnectionReset, "the peer's side was reset"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::DuplexStream;
    use tokio::sync::mpsc;

    /// A stream between the two sides through a pump the test can stop, losing whatever the
    /// pump held: both ends then see the stream fail, as with a connection that died.
    fn stream_pair() -> (DuplexStream, DuplexStream, tokio::task::JoinHandle<()>) {
        let (opener, mut near) = tokio::io::duplex(16 * 1024);
        let (mut far, answerer) = tokio::io::duplex(16 * 1024);
        let pump = tokio::spawn(async move {
            let _ = tokio::io::copy_bidirectional(&mut near, &mut far).await;
        });
        (opener, answerer, pump)
    }

    struct OpenerStreams {
        to_answerer: mpsc::Sender<(DuplexStream, u64)>,
        pumps: mpsc::UnboundedSender<tokio::task::JoinHandle<()>>,
        resumes: std::sync::Arc<AtomicU64>,
        /// Moves the session to a new stream, while the old one still works, once this much
        /// has arrived.
        move_at: Option<u64>,
    }

    impl OpenerStreams {
        async fn resume_on_new(&mut self, received: u64) -> Result<(DuplexStream, u64), String> {
            let (mut opener, answerer, pump) = stream_pair();
            let _ = self.pumps.send(pump);
            self.to_answerer.send((answerer, received)).await.map_err(|_| "answerer gone".to_string())?;
            let reply = warren_forward::read_reply(&mut (&mut opener).compat()).await.map_err(|e| e.to_string())?;
            self.resumes.fetch_add(1, Ordering::Relaxed);
            Ok((opener, reply.received.expect("a resume is answered with a count")))
        }
    }

    impl Streams<DuplexStream> for OpenerStreams {
        async fn after_failure(&mut self, progress: Progress<'_>) -> Result<(DuplexStream, u64), String> {
            self.resume_on_new(progress.received()).await
        }

        async fn replacement(&mut self, progress: Progress<'_>) -> (DuplexStream, u64, u64) {
            let Some(at) = self.move_at else { return std::future::pending().await };
            while progress.received() < at {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            self.move_at = None;
            let reported = progress.hold_acks();
            // The request takes a while to arrive; the old stream goes on meanwhile, and what
            // it brings is sent again on the new one.
            while progress.received() < reported + 64 * 1024 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let (stream, peer_received) = self.resume_on_new(reported).await.unwrap();
            (stream, peer_received, reported)
        }
    }

    struct AnswererStreams(mpsc::Receiver<(DuplexStream, u64)>);

    impl Streams<DuplexStream> for AnswererStreams {
        async fn after_failure(&mut self, _progress: Progress<'_>) -> Result<(DuplexStream, u64), String> {
            self.0.recv().await.ok_or_else(|| "opener gone".to_string())
        }
        async fn replacement(&mut self, progress: Progress<'_>) -> (DuplexStream, u64, u64) {
            match self.0.recv().await {
                Some((stream, peer_received)) => (stream, peer_received, progress.received()),
                None => std::future::pending().await,
            }
        }
    }

    async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        (app, listener.accept().await.unwrap().0)
    }

    fn payload(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| ((i * 31 + seed as usize) % 251) as u8).collect()
    }

    /// Each app sends its payload and reads the other's to the end, both at once.
    async fn exchange(mut app: tokio::net::TcpStream, data: Vec<u8>) -> std::io::Result<Vec<u8>> {
        let (mut r, mut w) = app.split();
        let write = async {
            w.write_all(&data).await?;
            w.shutdown().await
        };
        let mut got = Vec::new();
        let (wrote, read) = tokio::join!(write, r.read_to_end(&mut got));
        wrote?;
        read?;
        Ok(got)
    }

    #[test]
    fn silence_rings_once_per_pause_and_again_while_acknowledgements_stay_away() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut st = State { resumable: Some(true), heard: Some(t0), ..State::default() };
        assert!(!st.silence_alarm(at(5_000)), "an idle session owes nothing and is owed nothing");
        // The peer was sending, and stops.
        st.heard(at(5_000), true);
        assert!(!st.silence_alarm(at(5_900)));
        assert!(st.silence_alarm(at(6_000)));
        assert!(!st.silence_alarm(at(9_000)), "one probe per pause");
        // We send; nothing comes back.
        st.unacked.push_back(Bytes::from_static(b"hello"));
        st.unacked_len = 5;
        st.waiting_since = Some(at(9_000));
        assert!(!st.silence_alarm(at(9_500)));
        assert!(st.silence_alarm(at(10_000)));
        assert!(!st.silence_alarm(at(13_000)));
        assert!(st.silence_alarm(at(14_000)), "asked again while still waiting");
        // An acknowledgement of it all: nothing owed, nothing to ask.
        st.heard(at(14_100), false);
        st.release(5, at(14_100)).unwrap();
        assert!(!st.silence_alarm(at(30_000)));
        // Data waiting for a slow local reader is our silence, not the path's.
        st.heard(at(30_000), true);
        st.writing_local = true;
        assert!(!st.silence_alarm(at(35_000)));
        st.writing_local = false;
        assert!(st.silence_alarm(at(35_000)));
        // A session that does not resume has nowhere to go: it never asks.
        let mut plain = State { resumable: Some(false), heard: Some(t0), quiet_unchecked: true, ..State::default() };
        assert!(!plain.silence_alarm(at(60_000)));
    }

    #[tokio::test]
    async fn a_session_whose_stream_goes_silent_asks_for_a_probe() {
        let (mut app, local) = tcp_pair().await;
        // The peer's end of the stream is held, and says nothing.
        let (stream, _silent_peer) = tokio::io::duplex(64 * 1024);
        struct Alarmed(std::sync::Arc<AtomicU64>);
        impl Streams<DuplexStream> for Alarmed {
            async fn after_failure(&mut self, _: Progress<'_>) -> Result<(DuplexStream, u64), String> {
                Err("nowhere".into())
            }
            fn silence_alarm(&mut self) -> Box<dyn Fn() + Send + Sync> {
                let rang = self.0.clone();
                Box::new(move || {
                    rang.fetch_add(1, Ordering::Relaxed);
                })
            }
        }
        let rang = std::sync::Arc::new(AtomicU64::new(0));
        let counts = [AtomicU64::new(0), AtomicU64::new(0)];
        let heard = AtomicU64::new(0);
        let session = run(local, stream, Role::Answerer, Counters { sent: &counts[0], received: &counts[1], heard: &heard }, Alarmed(rang.clone()));
        let started = Instant::now();
        let watch = async {
            app.write_all(b"anyone there?").await.unwrap();
            while rang.load(Ordering::Relaxed) == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::select! {
            _ = session => panic!("the session ended"),
            _ = tokio::time::timeout(Duration::from_secs(10), watch) => {}
        }
        assert_eq!(rang.load(Ordering::Relaxed), 1, "no probe asked for within 10 s");
        let took = started.elapsed();
        assert!(took >= SILENCE, "asked after {took:?}, before a second of silence");
        assert!(took < Duration::from_secs(3), "asked only after {took:?}");
    }

    #[tokio::test]
    async fn bytes_arrive_intact_both_ways_across_streams_that_die_mid_transfer() {
        let (app_a, local_a) = tcp_pair().await;
        let (app_b, local_b) = tcp_pair().await;
        let (mut opener, mut answerer, first_pump) = stream_pair();
        // What the serving side does before the session runs: answer the new session.
        warren_forward::write_reply(&mut (&mut answerer).compat(), &Reply { received: Some(0), ..Reply::new(Status::Accepted, None) })
            .await
            .unwrap();
        let (to_answerer, from_opener) = mpsc::channel(1);
        let (pumps_tx, mut pumps) = mpsc::unbounded_channel();
        pumps_tx.send(first_pump).unwrap();
        let resumes = std::sync::Arc::new(AtomicU64::new(0));
        let opener_streams = OpenerStreams { to_answerer, pumps: pumps_tx, resumes: resumes.clone(), move_at: None };
        let counts = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
        let heard = AtomicU64::new(0);
        let a_side = run(local_a, std::mem::replace(&mut opener, tokio::io::duplex(1).0), Role::Opener, Counters { sent: &counts[0], received: &counts[1], heard: &heard }, opener_streams);
        let b_side = run(local_b, answerer, Role::Answerer, Counters { sent: &counts[2], received: &counts[3], heard: &heard }, AnswererStreams(from_opener));
        let (up, down) = (payload(6 << 20, 1), payload(5 << 20, 2));
        // Three times during the transfer, the current stream dies with what it held.
        let cutter = async {
            for at in [1u64 << 20, 2 << 20, 4 << 20] {
                while counts[3].load(Ordering::Relaxed) < at {
                    tokio::task::yield_now().await;
                }
                let mut last = None;
                while let Ok(pump) = pumps.try_recv() {
                    last = Some(pump);
                }
                if let Some(pump) = last {
                    pump.abort();
                }
            }
        };
        let (a, b, got_b, got_a, ()) = tokio::time::timeout(Duration::from_secs(60), async {
            tokio::join!(a_side, b_side, exchange(app_b, down.clone()), exchange(app_a, up.clone()), cutter)
        })
        .await
        .expect("the session finishes");
        a.unwrap();
        b.unwrap();
        assert!(got_b.unwrap() == up, "A's bytes reached B intact, once each, in order");
        assert!(got_a.unwrap() == down, "B's bytes reached A intact");
        assert_eq!(resumes.load(Ordering::Relaxed), 3, "the session went on over three more streams");
        assert_eq!(counts[1].load(Ordering::Relaxed), down.len() as u64, "counted once, not per attempt");
    }

    #[tokio::test]
    async fn a_session_moved_to_a_new_stream_while_the_old_one_works_delivers_each_byte_once() {
        let (app_a, local_a) = tcp_pair().await;
        let (app_b, local_b) = tcp_pair().await;
        let (opener, mut answerer, _first_pump) = stream_pair();
        warren_forward::write_reply(&mut (&mut answerer).compat(), &Reply { received: Some(0), ..Reply::new(Status::Accepted, None) })
            .await
            .unwrap();
        let (to_answerer, from_opener) = mpsc::channel(1);
        let (pumps_tx, _pumps) = mpsc::unbounded_channel();
        let resumes = std::sync::Arc::new(AtomicU64::new(0));
        // The opener moves when it has 1 MiB of B's data; both directions are busy then.
        let opener_streams = OpenerStreams { to_answerer, pumps: pumps_tx, resumes: resumes.clone(), move_at: Some(1 << 20) };
        let counts = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
        let heard = AtomicU64::new(0);
        let a_side = run(local_a, opener, Role::Opener, Counters { sent: &counts[0], received: &counts[1], heard: &heard }, opener_streams);
        let b_side = run(local_b, answerer, Role::Answerer, Counters { sent: &counts[2], received: &counts[3], heard: &heard }, AnswererStreams(from_opener));
        let (up, down) = (payload(4 << 20, 3), payload(4 << 20, 4));
        let (a, b, got_b, got_a) = tokio::time::timeout(Duration::from_secs(60), async {
            tokio::join!(a_side, b_side, exchange(app_b, down.clone()), exchange(app_a, up.clone()))
        })
        .await
        .unwrap_or_else(|_| panic!("the session stalled: bytes {:?}, moves {}", counts.iter().map(|c| c.load(Ordering::Relaxed)).collect::<Vec<_>>(), resumes.load(Ordering::Relaxed)));
        a.unwrap();
        b.unwrap();
        assert!(got_b.unwrap() == up, "A's bytes reached B intact, once each");
        assert!(got_a.unwrap() == down, "B's bytes reached A intact, once each");
        assert_eq!(resumes.load(Ordering::Relaxed), 1, "the session moved once");
    }

    #[tokio::test]
    async fn a_session_with_nowhere_to_go_resets_its_local_connection() {
        struct Nowhere;
        impl Streams<DuplexStream> for Nowhere {
            async fn after_failure(&mut self, _progress: Progress<'_>) -> Result<(DuplexStream, u64), String> {
                Err("no peer".into())
            }
        }
        let (mut app, local) = tcp_pair().await;
        let (opener, answerer, _pump) = stream_pair();
        drop(answerer);
        let counts = [AtomicU64::new(0), AtomicU64::new(0)];
        let heard = AtomicU64::new(0);
        let outcome = run(local, opener, Role::Answerer, Counters { sent: &counts[0], received: &counts[1], heard: &heard }, Nowhere).await;
        assert!(matches!(outcome, Err(SpliceError::Cut(ref e)) if e.to_string().contains("could not resume: no peer")), "{outcome:?}");
        let mut buf = [0u8; 8];
        assert!(app.read(&mut buf).await.is_err(), "the application sees a reset, not a clean end");
    }
}
