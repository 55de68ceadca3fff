//! The forwarding side: each local TCP connection (or UDP source address) becomes one stream to
//! the peer's service, on the node's existing connection to that peer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use warren_forward::Stream;
use tokio::net::{TcpListener, UdpSocket};
use tracing::Instrument;
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};
use warren_forward::{MAX_DATAGRAM, Opened, Request, STREAM_PROTOCOL, SessionId, Status, Transport, opener};

use super::udp::{Datagrams, ForwardQueued, QueueTx, Source, session_queue, udp_over_stream};
use super::{Active, Forward, Forwarding, resume, splice};
use crate::handle::NodeHandle;

/// The peer must answer a request this soon.
pub(super) const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

pub enum Listener {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

pub async fn run(forwarding: Arc<Forwarding>, forward: Arc<Forward>, listener: Listener) {
    match listener {
        Listener::Tcp(listener) => run_tcp(forwarding, forward, listener).await,
        Listener::Udp(socket) => run_udp(forwarding, forward, Arc::new(socket)).await,
    }
}

async fn run_tcp(forwarding: Arc<Forwarding>, forward: Arc<Forward>, listener: TcpListener) {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed on a forward");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = forward.permits.clone().try_acquire_owned() else {
            forward.stats.fail(format!("local connection refused: at the cap of {} connections", forward.spec.max_connections));
            splice::reset(&tcp);
            continue;
        };
        let forwarding = forwarding.clone();
        let forward = forward.clone();
        let tasks = forwarding.shutdown.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let session: SessionId = rand::random();
            let request = Request::session(forward.spec.service.as_str(), session, None);
            let (stream, relayed) = match open(&forwarding, &forward, &request).await {
                Ok(opened) => opened,
                Err(e) => return failed(&forward, &tcp, e),
            };
            let _active = Active::new(&forward.stats);
            let counters = resume::Counters { sent: &forward.stats.sent, received: &forward.stats.received, heard: &forward.stats.heard };
            let streams = Resume { forwarding: &forwarding, forward: &forward, session, relayed };
            match resume::run(tcp, stream, resume::Role::Opener, counters, streams).await {
                Ok(()) => {}
                Err(splice::SpliceError::Refused(e)) => {
                    tracing::warn!(peer = %forward.peer, service = %forward.spec.service, error = %e, "forward refused");
                    forward.stats.fail(e);
                }
                Err(splice::SpliceError::Cut(e)) => {
                    let path = forward.stats.path.lock().unwrap().clone().unwrap_or_default();
                    tracing::info!(peer = %forward.peer, %path, error = %e, "forwarded connection cut");
                    forward.stats.fail(format!("connection cut ({path} path): {e}"));
                }
            }
        }.in_current_span());
    }
}

/// Waits between attempts to resume a session, doubling up to [`RESUME_RETRY_MAX`]: the peer is
/// usually reachable again (through the relay) within a second of the stream's failure.
const RESUME_RETRY_FIRST: Duration = Duration::from_millis(250);
/// The longest wait between attempts to resume.
const RESUME_RETRY_MAX: Duration = Duration::from_secs(2);

/// Where a forwarded connection's session goes on after its stream failed: a new stream to the
/// peer (direct if there is a direct connection, else through a relay), which asks to resume.
struct Resume<'a> {
    forwarding: &'a Arc<Forwarding>,
    forward: &'a Arc<Forward>,
    session: SessionId,
    /// The session's current stream goes through a relay.
    relayed: bool,
}

/// How often a session on a relayed stream looks for a direct connection to move to: a new
/// punch is usually seconds away, and the check is a lookup in the node's connection table.
const MOVE_CHECK: Duration = Duration::from_secs(1);

impl resume::Streams<Compat<Stream>> for Resume<'_> {
    async fn after_failure(&mut self, progress: resume::Progress<'_>) -> Result<(Compat<Stream>, u64), String> {
        let received = progress.received();
        let deadline = tokio::time::Instant::now() + resume::GRACE;
        let mut wait = RESUME_RETRY_FIRST;
        let request = Request::session(self.forward.spec.service.as_str(), self.session, Some(received));
        let mut last = String::from("no attempt");
        while tokio::time::Instant::now() < deadline {
            match tokio::time::timeout_at(deadline, self.resume_once(&request, false)).await {
                Ok(Ok((stream, received, relayed))) => {
                    self.relayed = relayed;
                    return Ok((stream, received));
                }
                Ok(Err(Resumed::Refused(why))) => return Err(why),
                Ok(Err(Resumed::Failed(why))) => last = why,
                Err(_) => break,
            }
            tokio::time::sleep(wait.min(deadline.saturating_duration_since(tokio::time::Instant::now()))).await;
            wait = (wait * 2).min(RESUME_RETRY_MAX);
        }
        Err(format!("the peer could not be reached again within {} s ({last})", resume::GRACE.as_secs()))
    }

    fn silence_alarm(&mut self) -> Box<dyn Fn() + Send + Sync> {
        let (node, peer) = (self.forwarding.node.clone(), self.forward.peer);
        Box::new(move || node.check_paths(peer))
    }

    /// A session on a relay moves to a direct connection as soon as there is one: it resumes
    /// on a stream of that connection, and the relayed stream is dropped.
    async fn replacement(&mut self, progress: resume::Progress<'_>) -> (Compat<Stream>, u64, u64) {
        let peer = self.forward.peer;
        loop {
            tokio::time::sleep(MOVE_CHECK).await;
            if !self.relayed || !progress.resumable() || !self.forwarding.node.has_direct(&peer) {
                continue;
            }
            let reported = progress.hold_acks();
            let request = Request::session(self.forward.spec.service.as_str(), self.session, Some(reported));
            let moved = self.resume_once(&request, true).await;
            if moved.is_err() {
                progress.release_acks();
            }
            match moved {
                Ok((stream, received, relayed)) => {
                    self.relayed = relayed;
                    return (stream, received, reported);
                }
                // The session is gone at the peer: the current stream will say so.
                Err(Resumed::Refused(why)) => {
                    tracing::debug!(peer = %peer, %why, "could not move a forwarded connection to the direct path");
                    std::future::pending::<()>().await;
                }
                Err(Resumed::Failed(why)) => tracing::debug!(peer = %peer, %why, "could not move a forwarded connection to the direct path yet"),
            }
        }
    }
}

/// Why one attempt to resume did not.
enum Resumed {
    /// The peer answered no: the session is gone.
    Refused(String),
    /// The peer could not be reached or did not answer: try again.
    Failed(String),
}

impl Resume<'_> {
    /// Opens a stream (on a direct connection only, if `direct`) and asks the peer to resume
    /// the session on it: the stream, the bytes the peer has received, and whether it is relayed.
    async fn resume_once(&self, request: &Request, direct: bool) -> Result<(Compat<Stream>, u64, bool), Resumed> {
        let Opened { mut stream, relayed } =
            self.forwarding.node.reach_and_open(self.forward.peer, STREAM_PROTOCOL).await.map_err(|e| Resumed::Failed(e.to_string()))?;
        if direct && relayed {
            return Err(Resumed::Failed("the new stream went through a relay".into()));
        }
        warren_forward::write_request(&mut stream, request).await.map_err(|e| Resumed::Failed(format!("request failed: {e}")))?;
        let reply = match tokio::time::timeout(REPLY_TIMEOUT, warren_forward::read_reply(&mut stream)).await {
            Err(_) => return Err(Resumed::Failed("the peer did not answer".into())),
            Ok(Err(e)) => return Err(Resumed::Failed(format!("the peer's answer was unreadable: {e}"))),
            Ok(Ok(reply)) => reply,
        };
        match (reply.status, reply.received) {
            (Status::Accepted, Some(received)) => {
                let path = if relayed { "relayed" } else { "direct" };
                tracing::info!(peer = %self.forward.peer, path, "forwarded connection resumed on a new stream");
                *self.forward.stats.path.lock().unwrap() = Some(path.to_string());
                Ok((stream.compat(), received, relayed))
            }
            (Status::Accepted, None) => Err(Resumed::Refused("the peer accepted a resume without saying what it received".into())),
            // The session is gone there (or the service, or our access to it): final.
            (status @ (Status::NoSession | Status::UnknownService | Status::NotAllowed), _) => {
                Err(Resumed::Refused(format!("the peer would not resume: {}", warren_forward::opener::Refusal::Refused { status, detail: reply.detail })))
            }
            // Busy, or our request was late: another attempt may do.
            (status, _) => Err(Resumed::Failed(format!("the peer put the resume off: {}", warren_forward::opener::Refusal::Refused { status, detail: reply.detail }))),
        }
    }
}

/// The peer could not be reached or asked: the local connection is reset, the reason kept.
fn failed(forward: &Forward, tcp: &tokio::net::TcpStream, e: String) {
    tracing::warn!(peer = %forward.peer, service = %forward.spec.service, error = %e, "forward failed");
    forward.stats.fail(e);
    splice::reset(tcp);
}

/// How long a stream opened ahead of need may wait for a connection: well inside the peer's
/// request timeout (30 s; 10 s in earlier versions), so a spare is never handed out after the
/// peer gave up on it.
const SPARE_MAX_AGE: Duration = Duration::from_secs(5);

/// A stream to the peer opened ahead for the forward's next connection (or UDP session): stream
/// negotiation takes a round trip, which a new connection then need not wait for. Refilled after
/// each use, one open at a time; never used when older than [`SPARE_MAX_AGE`] or relayed while a
/// direct connection exists (it would keep the new connection on the relay).
#[derive(Default)]
pub struct Spare {
    ready: Mutex<Option<(Stream, bool, Instant)>>,
    refilling: AtomicBool,
}

impl Spare {
    fn take(&self, node: &NodeHandle, peer: &PeerId) -> Option<(Stream, bool)> {
        let (stream, relayed, opened) = self.ready.lock().unwrap().take()?;
        (opened.elapsed() < SPARE_MAX_AGE && !(relayed && node.has_direct(peer))).then_some((stream, relayed))
    }

    fn refill(forwarding: &Arc<Forwarding>, forward: &Arc<Forward>) {
        if forward.spare.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let (forwarding, forward) = (forwarding.clone(), forward.clone());
        let tasks = forwarding.shutdown.clone();
        tasks.spawn(async move {
            if let Ok(Ok(Opened { stream, relayed })) = forwarding.node.open_stream(forward.peer, STREAM_PROTOCOL).await {
                *forward.spare.ready.lock().unwrap() = Some((stream, relayed, Instant::now()));
            }
            forward.spare.refilling.store(false, Ordering::Release);
        }.in_current_span());
    }
}

/// Connects to the peer if needed, opens a stream (the forward's spare when it has one) and
/// sends the request for the service. The answer is read by the caller ([`accepted`]), after
/// the first data has gone out behind the request.
async fn open(forwarding: &Arc<Forwarding>, forward: &Arc<Forward>, request: &Request) -> Result<(Compat<Stream>, bool), String> {
    let peer = forward.peer;
    let spare = forward.spare.take(&forwarding.node, &peer);
    Spare::refill(forwarding, forward);
    // A spare whose connection has gone fails its request; a fresh stream is tried instead.
    let ready = match spare {
        Some((mut stream, relayed)) => warren_forward::write_request(&mut stream, request).await.is_ok().then_some((stream, relayed)),
        None => None,
    };
    let (stream, relayed) = match ready {
        Some(ready) => ready,
        None => {
            let Opened { mut stream, relayed } = forwarding.node.reach_and_open(peer, STREAM_PROTOCOL).await.map_err(|e| e.to_string())?;
            if let Err(e) = warren_forward::write_request(&mut stream, request).await {
                // A peer may refuse before it reads the request (a peer on none of its
                // allow-lists, say) and stop the stream: its answer is waiting, and says why.
                return Err(match tokio::time::timeout(splice::ANSWER_GRACE, accepted(&mut stream)).await {
                    Ok(Err(refusal)) => refusal,
                    _ => format!("request failed: {e}"),
                });
            }
            (stream, relayed)
        }
    };
    *forward.stats.path.lock().unwrap() = Some(if relayed { "relayed" } else { "direct" }.to_string());
    Ok((stream.compat(), relayed))
}

/// Reads the peer's answer to a request: `Ok` if the service accepted, else the refusal as text.
async fn accepted(r: &mut (impl futures::AsyncRead + Unpin)) -> Result<(), String> {
    match tokio::time::timeout(REPLY_TIMEOUT, opener::read_answer(r)).await {
        Err(_) => Err("the peer did not answer".to_string()),
        Ok(answer) => answer.map_err(|refusal| refusal.to_string()),
    }
}

/// How often a forward at its session cap rewrites its last error.
const CAP_NOTE_EVERY: Duration = Duration::from_secs(1);

type Sessions = Arc<Mutex<HashMap<SocketAddr, Arc<QueueTx>>>>;

async fn run_udp(forwarding: Arc<Forwarding>, forward: Arc<Forward>, socket: Arc<UdpSocket>) {
    let sessions: Sessions = Arc::default();
    let queued = ForwardQueued::default();
    let mut last_cap_note = None;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else { continue };
        let datagram = buf[..n].to_vec();
        let existing = sessions.lock().unwrap().get(&from).cloned();
        if let Some(tx) = existing {
            tx.offer(datagram);
            continue;
        }
        let Ok(permit) = forward.permits.clone().try_acquire_owned() else {
            // Counted every time; described at most once a second, so a flood from new source
            // ports costs no formatting per datagram.
            forward.stats.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if last_cap_note.is_none_or(|at: tokio::time::Instant| at.elapsed() >= CAP_NOTE_EVERY) {
                last_cap_note = Some(tokio::time::Instant::now());
                *forward.stats.last_error.lock().unwrap() =
                    Some(format!("UDP session from {from} dropped: at the cap of {} sessions", forward.spec.max_connections));
            }
            continue;
        };
        let (tx, rx) = session_queue(&queued);
        tx.offer(datagram);
        sessions.lock().unwrap().insert(from, Arc::new(tx));
        let (forwarding, forward, socket, sessions) = (forwarding.clone(), forward.clone(), socket.clone(), sessions.clone());
        let tasks = forwarding.shutdown.clone();
        let span = tracing::info_span!("udp_session", %from);
        tasks.spawn(async move {
            let _permit = permit;
            match open(&forwarding, &forward, &Request::new(forward.spec.service.as_str(), Transport::Udp)).await {
                Ok((stream, _)) => {
                    let _active = Active::new(&forward.stats);
                    let local = Datagrams { source: Source::Queue(rx), socket, to: Some(from) };
                    let answer = async |r: &mut Compat<tokio::io::ReadHalf<Compat<Stream>>>| accepted(r).await;
                    if let Err(e) = udp_over_stream(local, stream, &forward.stats, forwarding.udp_idle, answer).await {
                        tracing::warn!(peer = %forward.peer, service = %forward.spec.service, error = %e, "UDP forward refused");
                        forward.stats.fail(e);
                    }
                }
                Err(e) => {
                    tracing::warn!(peer = %forward.peer, service = %forward.spec.service, error = %e, "UDP forward failed");
                    forward.stats.fail(e);
                }
            }
            sessions.lock().unwrap().remove(&from);
        }.instrument(span));
    }
}
