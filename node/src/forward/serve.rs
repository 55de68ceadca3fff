//! The serving side: answers forward streams from peers, for services this node exposed.
//!
//! A peer on no allow-list costs nothing: its streams are answered "unknown service" at once,
//! before any request is read, without a slot. A peer that may use some service gets its request
//! read, with at most [`MAX_WAITING_PER_PEER`] of its streams waiting for their request and each
//! for at most [`REQUEST_TIMEOUT`]; the node-wide slot is taken only once the request is
//! authorised. Every refusal to a peer that may not use the service it named is the same
//! "unknown service", so the names of services it may not use are not revealed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use warren_forward::Stream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;
use tokio::sync::mpsc;
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};
use warren_forward::answerer::{self, RequestError};
use warren_forward::{Reply, SessionId, Status, Transport};

use super::udp::{self, Datagrams, Source, udp_over_stream};
use super::{Active, Forwarding, resume, splice};

/// Forward streams served at once across all services; beyond it peers get "over capacity".
const MAX_INBOUND_STREAMS: usize = 8192;
/// Streams of one peer waiting for their request. A forward keeps one stream open ahead of
/// need, and a burst of new connections sends its requests right behind the stream's opening,
/// but on a busy node the requests wait for their tasks to run: 1,000 connections opened at
/// once through one forward had a quarter refused at 512 (measured). As many as a peer's
/// forward may have opening on one connection ([`warren_forward::QUIC_STREAMS`]), then, while
/// a peer that opens streams and sends nothing holds no more than this (and no node-wide slot).
const MAX_WAITING_PER_PEER: usize = 1024;
const _: () = assert!(MAX_WAITING_PER_PEER >= warren_forward::QUIC_STREAMS, "an honest burst is never refused");
/// Refusal replies being written at once. A refusal is one small frame, but a peer that does
/// not read could hold its task until [`REFUSAL_TIMEOUT`]; beyond this, streams to refuse are
/// dropped without a reply.
const MAX_REFUSALS_IN_FLIGHT: usize = 256;
/// A refusal reply must be written within this.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);
/// A peer must send its request this soon after opening the stream (openers keep a stream
/// ready ahead of need for less than this: see `client::SPARE_MAX_AGE`). Generous, because on a
/// connection whose flow-control window is taken by busy streams a new stream's request waits
/// for credit: 500 concurrent 1 MiB echoes on 2 cores held some requests past 10 s (refused as
/// "bad request"); a silent stream still gives its slot back.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Connecting to the exposed service may take this long.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// Refusals are logged at most once per this period (with the number left unlogged), so a
/// peer hammering the node cannot flood the log.
const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(10);

/// Why a stream was refused, as counted in metrics. The peer is told less: every refusal
/// to a peer that may not use the service it named reads "unknown service".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The peer is on no service's allow-list.
    Stranger,
    /// No service of that name and transport.
    UnknownService,
    /// The service exists; the peer is not on its allow-list.
    NotAllowed,
    /// The peer has [`MAX_WAITING_PER_PEER`] streams waiting for their request already.
    TooManyWaiting,
    /// The node or the service is at its connection cap.
    OverCapacity,
    /// The request could not be read in time, or was malformed.
    BadRequest,
}

impl Refused {
    pub const ALL: [Refused; 6] =
        [Refused::Stranger, Refused::UnknownService, Refused::NotAllowed, Refused::TooManyWaiting, Refused::OverCapacity, Refused::BadRequest];

    pub fn label(self) -> &'static str {
        match self {
            Refused::Stranger => "stranger",
            Refused::UnknownService => "unknown_service",
            Refused::NotAllowed => "not_allowed",
            Refused::TooManyWaiting => "too_many_waiting",
            Refused::OverCapacity => "over_capacity",
            Refused::BadRequest => "bad_request",
        }
    }

    /// What the peer is told.
    fn status(self) -> Status {
        match self {
            Refused::Stranger | Refused::UnknownService | Refused::NotAllowed => Status::UnknownService,
            Refused::TooManyWaiting | Refused::OverCapacity => Status::OverCapacity,
            Refused::BadRequest => Status::BadRequest,
        }
    }
}

/// Refusals counted by reason, and logged at a bounded rate.
#[derive(Default)]
pub struct Refusals {
    counts: [AtomicU64; Refused::ALL.len()],
    last_log: Mutex<Option<Instant>>,
    unlogged: AtomicU64,
}

impl Refusals {
    pub fn count(&self, reason: Refused) -> u64 {
        self.counts[reason as usize].load(Ordering::Relaxed)
    }

    fn note(&self, reason: Refused, peer: &PeerId) {
        self.counts[reason as usize].fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut last = self.last_log.lock().unwrap();
        if last.is_some_and(|t| now.duration_since(t) < REFUSAL_LOG_PERIOD) {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(now);
        let unlogged = self.unlogged.swap(0, Ordering::Relaxed);
        tracing::info!(peer = %peer, reason = reason.label(), unlogged, "refused a forward stream");
    }
}

/// One stream waiting for its request; leaves the peer's count when dropped (the request
/// arrived, or the stream ended).
type WaitingGuard = crate::per_peer::Slot;

pub async fn run(forwarding: Arc<Forwarding>, mut inbound: warren_forward::Incoming) {
    let slots = Arc::new(Semaphore::new(MAX_INBOUND_STREAMS));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT));
    // Streams waiting for their request, per peer.
    let waiting = crate::per_peer::PerPeer::default();
    while let Some((peer, stream)) = inbound.recv().await {
        let admitted = if forwarding.may_use_any(&peer) {
            waiting.take(peer, MAX_WAITING_PER_PEER).ok_or(Refused::TooManyWaiting)
        } else {
            Err(Refused::Stranger)
        };
        let guard = match admitted {
            Ok(guard) => guard,
            Err(reason) => {
                forwarding.refusals.note(reason, &peer);
                if let Ok(permit) = refusing.clone().try_acquire_owned() {
                    forwarding.shutdown.spawn(async move {
                        refuse(stream, reason.status(), None).await;
                        drop(permit);
                    });
                }
                continue;
            }
        };
        let (forwarding, slots) = (forwarding.clone(), slots.clone());
        let tasks = forwarding.shutdown.clone();
        let span = tracing::info_span!("serve", peer = %peer);
        tasks.spawn(async move { serve(&forwarding, peer, stream, guard, slots).instrument(span).await });
    }
}

async fn refuse(mut stream: Stream, status: Status, detail: Option<String>) {
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, answerer::refuse(&mut stream, status, detail)).await;
}

async fn serve(forwarding: &Forwarding, peer: PeerId, mut stream: Stream, waiting: WaitingGuard, slots: Arc<Semaphore>) {
    let request = match tokio::time::timeout(REQUEST_TIMEOUT, answerer::read_request(&mut stream)).await {
        Ok(Ok(request)) => request,
        Ok(Err(RequestError::ClosedEarly)) => {
            tracing::debug!(peer = %peer, "a forward stream closed before its request");
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(peer = %peer, error = %e, "a malformed forward request");
            forwarding.refusals.note(Refused::BadRequest, &peer);
            return refuse(stream, Status::BadRequest, None).await;
        }
        Err(_) => {
            forwarding.refusals.note(Refused::BadRequest, &peer);
            return refuse(stream, Status::BadRequest, None).await;
        }
    };
    drop(waiting);
    let wants_udp = request.transport == Transport::Udp;
    // The allow-list first: a peer that may not use the service learns nothing about it, not
    // even whether the name or the transport exists.
    let service = match forwarding.exposed(&request.service) {
        Some(service) if !service.spec.allow_any && !service.allow.contains(&peer) => {
            service.stats.refused.fetch_add(1, Ordering::Relaxed);
            Err(Refused::NotAllowed)
        }
        Some(service) if service.spec.udp == wants_udp => Ok(service),
        _ => Err(Refused::UnknownService),
    };
    let service = match service {
        Ok(service) => service,
        Err(reason) => {
            forwarding.refusals.note(reason, &peer);
            return refuse(stream, reason.status(), None).await;
        }
    };
    if let (Some(id), Some(received)) = (request.session, request.resume) {
        // The session holds its slot and permit already.
        return forwarding.sessions.resume(peer, id, stream, received).await;
    }
    let Some(_slot): Option<OwnedSemaphorePermit> = slots.try_acquire_owned().ok() else {
        forwarding.refusals.note(Refused::OverCapacity, &peer);
        service.stats.fail(format!("refused {peer}: the node serves {MAX_INBOUND_STREAMS} streams already"));
        return refuse(stream, Status::OverCapacity, None).await;
    };
    let Ok(_permit) = service.permits.clone().try_acquire_owned() else {
        forwarding.refusals.note(Refused::OverCapacity, &peer);
        service.stats.fail(format!("refused {peer}: at the cap of {} connections", service.spec.max_connections));
        return refuse(stream, Status::OverCapacity, None).await;
    };
    let target = service.spec.target.clone();
    if wants_udp {
        let socket = match udp_upstream(&target).await {
            Ok(socket) => socket,
            Err(e) => {
                service.stats.fail(format!("{target}: {e}"));
                return refuse(stream, Status::UpstreamUnreachable, Some(e.to_string())).await;
            }
        };
        if answerer::accept(&mut stream).await.is_err() {
            return;
        }
        let _active = Active::new(&service.stats);
        let local = Datagrams { source: Source::Socket, socket: Arc::new(socket), to: None };
        let _ = udp_over_stream(local, stream.compat(), &service.stats, forwarding.udp_idle, async |_| Ok(())).await;
        return;
    }
    let tcp = match tokio::time::timeout(UPSTREAM_TIMEOUT, tokio::net::TcpStream::connect(&target)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            tracing::warn!(service = %request.service, %target, error = %e, "exposed service unreachable");
            service.stats.fail(format!("{target}: {e}"));
            return refuse(stream, Status::UpstreamUnreachable, Some(e.to_string())).await;
        }
        Err(_) => {
            service.stats.fail(format!("{target}: connect timed out"));
            return refuse(stream, Status::UpstreamUnreachable, Some("connect timed out".into())).await;
        }
    };
    let Some(id) = request.session else {
        // An opener without sessions: the stream is the connection.
        if answerer::accept(&mut stream).await.is_err() {
            return;
        }
        let _active = Active::new(&service.stats);
        // From the service's point of view bytes it sends go out to the peer.
        if let Err(e) = splice::tcp(tcp, stream.compat(), &service.stats.received, &service.stats.sent).await {
            tracing::debug!(peer = %peer, service = %request.service, error = %e, "forwarded connection ended with an error");
        }
        return;
    };
    let alarm = {
        let node = forwarding.node.clone();
        Box::new(move || node.check_paths(peer)) as Box<dyn Fn() + Send + Sync>
    };
    let Some(next) = forwarding.sessions.open(peer, id, alarm) else {
        forwarding.refusals.note(Refused::BadRequest, &peer);
        return refuse(stream, Status::BadRequest, Some("that session is open already".into())).await;
    };
    let reply = Reply { received: Some(0), ..Reply::new(Status::Accepted, None) };
    if warren_forward::write_reply(&mut stream, &reply).await.is_err() {
        return;
    }
    let _active = Active::new(&service.stats);
    let counters = resume::Counters { sent: &service.stats.received, received: &service.stats.sent, heard: &service.stats.heard };
    if let Err(e) = resume::run(tcp, stream.compat(), resume::Role::Answerer, counters, next).await {
        tracing::debug!(peer = %peer, service = %request.service, error = ?e, "forwarded connection ended with an error");
    }
}

/// Resumable sessions being served, by peer and id: where a stream that resumes one goes.
#[derive(Default)]
pub struct Sessions(Arc<Mutex<HashMap<(PeerId, SessionId), mpsc::Sender<(Stream, u64)>>>>);

impl Sessions {
    /// Registers a new session; `None` if the peer has one of that id already.
    /// `alarm` is what the session calls when its stream goes silent.
    fn open(&self, peer: PeerId, id: SessionId, alarm: Box<dyn Fn() + Send + Sync>) -> Option<NextStream> {
        let mut map = self.0.lock().unwrap();
        if map.contains_key(&(peer, id)) {
            return None;
        }
        // One resume at a time: a second before the first is taken is refused.
        let (tx, rx) = mpsc::channel(1);
        map.insert((peer, id), tx);
        Some(NextStream { rx, _entry: SessionEntry { sessions: self.0.clone(), key: (peer, id) }, alarm: Some(alarm) })
    }

    /// Hands a stream that resumes a session to it; the session answers it. A session that
    /// does not exist (ended, timed out, before a restart) or is busy is refused.
    async fn resume(&self, peer: PeerId, id: SessionId, mut stream: Stream, received: u64) {
        let tx = self.0.lock().unwrap().get(&(peer, id)).cloned();
        let (refused, status) = match tx {
            Some(tx) => match tx.try_send((stream, received)) {
                Ok(()) => return,
                // Another resume of it is being taken: this one may try again.
                Err(mpsc::error::TrySendError::Full((s, _))) => (s, Status::OverCapacity),
                Err(mpsc::error::TrySendError::Closed((s, _))) => (s, Status::NoSession),
            },
            None => (stream, Status::NoSession),
        };
        stream = refused;
        tracing::debug!(peer = %peer, %status, "a resume was refused");
        refuse(stream, status, None).await;
    }

    /// Sessions open now.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// Leaves the registry when the session ends.
struct SessionEntry {
    sessions: Arc<Mutex<HashMap<(PeerId, SessionId), mpsc::Sender<(Stream, u64)>>>>,
    key: (PeerId, SessionId),
}

impl Drop for SessionEntry {
    fn drop(&mut self) {
        self.sessions.lock().unwrap().remove(&self.key);
    }
}

/// The streams a served session resumes on.
struct NextStream {
    rx: mpsc::Receiver<(Stream, u64)>,
    _entry: SessionEntry,
    /// Handed to the session once (see `resume::Streams::silence_alarm`).
    alarm: Option<Box<dyn Fn() + Send + Sync>>,
}

impl resume::Streams<Compat<Stream>> for NextStream {
    async fn after_failure(&mut self, progress: resume::Progress<'_>) -> Result<(Compat<Stream>, u64), String> {
        let deadline = tokio::time::Instant::now() + resume::GRACE;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some((stream, received))) if received >= progress.acked() => return Ok((stream.compat(), received)),
                // An attempt the opener gave up on, arriving late: dropped, the next comes.
                Ok(Some(_stale)) => continue,
                _ => return Err(format!("the peer did not resume within {} s", resume::GRACE.as_secs())),
            }
        }
    }

    async fn replacement(&mut self, progress: resume::Progress<'_>) -> (Compat<Stream>, u64, u64) {
        loop {
            match self.rx.recv().await {
                // Our count goes out in the reply to this stream, taken once the old one is
                // dropped: nothing arrives in between.
                Some((stream, received)) if received >= progress.acked() => return (stream.compat(), received, progress.received()),
                // Stale (see `after_failure`): the current stream goes on.
                Some(_stale) => continue,
                None => std::future::pending().await,
            }
        }
    }

    fn silence_alarm(&mut self) -> Box<dyn Fn() + Send + Sync> {
        self.alarm.take().unwrap_or_else(|| Box::new(|| {}))
    }
}

async fn udp_upstream(target: &str) -> std::io::Result<tokio::net::UdpSocket> {
    let addr = tokio::net::lookup_host(target)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address for the target"))?;
    let local: std::net::SocketAddr = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
    let socket = tokio::net::UdpSocket::bind(local).await?;
    udp::enlarge_udp_buffers(&socket);
    socket.connect(addr).await?;
    Ok(socket)
}
