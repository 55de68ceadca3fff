//! The forwarding side: each local TCP connection (or UDP source address) becomes one stream to
//! the peer's service, on the node's existing connection to that peer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::{PeerId, Stream};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
use warren_forward::{MAX_DATAGRAM, Request, Status, Transport};

use super::{Active, Forward, Forwarding, Stats, splice, streams};
use crate::handle::Command;

/// Reaching the peer (dial, DHT lookup, dial) may take this long before a local connection is
/// given up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The peer must answer a request this soon.
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);
/// Datagrams queued per UDP session before new ones are dropped (UDP's own answer to overload).
const UDP_SESSION_QUEUE: usize = 1024;

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
        tokio::spawn(async move {
            let _permit = permit;
            let stream = match open(&forwarding, &forward, Transport::Tcp).await {
                Ok(stream) => stream,
                Err(e) => return failed(&forward, &tcp, e),
            };
            let _active = Active::new(&forward.stats);
            let answer = async |r: &mut tokio::io::ReadHalf<Compat<Stream>>| accepted(&mut r.compat()).await;
            match splice::tcp_opened(tcp, stream, &forward.stats.sent, &forward.stats.received, answer).await {
                Ok(()) => {}
                Err(splice::Failure::Refused(e)) => {
                    tracing::warn!(peer = %forward.peer, service = %forward.spec.service, error = %e, "forward refused");
                    forward.stats.fail(e);
                }
                Err(splice::Failure::Cut(e)) => {
                    let path = forward.stats.path.lock().unwrap().clone().unwrap_or_default();
                    tracing::info!(peer = %forward.peer, %path, error = %e, "forwarded connection cut");
                    forward.stats.fail(format!("connection cut ({path} path): {e}"));
                }
            }
        });
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
    fn take(&self, opener: &streams::Opener, peer: &PeerId) -> Option<(Stream, bool)> {
        let (stream, relayed, opened) = self.ready.lock().unwrap().take()?;
        (opened.elapsed() < SPARE_MAX_AGE && !(relayed && opener.has_direct(peer))).then_some((stream, relayed))
    }

    fn refill(forwarding: &Arc<Forwarding>, forward: &Arc<Forward>) {
        if forward.spare.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let (forwarding, forward) = (forwarding.clone(), forward.clone());
        tokio::spawn(async move {
            if let Ok((stream, relayed)) = forwarding.opener.open(forward.peer).await {
                *forward.spare.ready.lock().unwrap() = Some((stream, relayed, Instant::now()));
            }
            forward.spare.refilling.store(false, Ordering::Release);
        });
    }
}

/// Connects to the peer if needed, opens a stream (the forward's spare when it has one) and
/// sends the request for the service. The answer is read by the caller ([`accepted`]), after
/// the first data has gone out behind the request.
async fn open(forwarding: &Arc<Forwarding>, forward: &Arc<Forward>, transport: Transport) -> Result<Compat<Stream>, String> {
    let peer = forward.peer;
    let request = Request::new(forward.spec.service.clone(), transport);
    let spare = forward.spare.take(&forwarding.opener, &peer);
    Spare::refill(forwarding, forward);
    // A spare whose connection has gone fails its request; a fresh stream is tried instead.
    let ready = match spare {
        Some((mut stream, relayed)) => warren_forward::write_request(&mut stream, &request).await.is_ok().then_some((stream, relayed)),
        None => None,
    };
    let (stream, relayed) = match ready {
        Some(ready) => ready,
        None => {
            let (mut stream, relayed) = open_fresh(forwarding, peer).await?;
            warren_forward::write_request(&mut stream, &request).await.map_err(|e| format!("request failed: {e}"))?;
            (stream, relayed)
        }
    };
    *forward.stats.path.lock().unwrap() = Some(if relayed { "relayed" } else { "direct" }.to_string());
    Ok(stream.compat())
}

/// A new stream to the peer, and whether it is relayed. Connected already (the usual case): open
/// at once. Otherwise reach the peer first (stored addresses, the DHT, relays) and try again.
async fn open_fresh(forwarding: &Forwarding, peer: PeerId) -> Result<(Stream, bool), String> {
    let opened = match forwarding.opener.open(peer).await {
        Err(e) if e == streams::NOT_CONNECTED => {
            let connected = tokio::time::timeout(CONNECT_TIMEOUT, forwarding.node.request(|tx| Command::Connect(peer, tx))).await;
            match connected {
                Err(_) => return Err(format!("cannot reach {peer}: timed out after {CONNECT_TIMEOUT:?}")),
                Ok(Err(e)) | Ok(Ok(Err(e))) => return Err(format!("cannot reach {peer}: {e}")),
                Ok(Ok(Ok(()))) => {}
            }
            forwarding.opener.open(peer).await
        }
        other => other,
    };
    opened.map_err(|e| format!("cannot open a stream to {peer}: {e}"))
}

/// Reads the peer's answer to a request: `Ok` if the service accepted, else the refusal as text.
async fn accepted(r: &mut (impl futures::AsyncRead + Unpin)) -> Result<(), String> {
    let reply = tokio::time::timeout(REPLY_TIMEOUT, warren_forward::read_reply(r))
        .await
        .map_err(|_| "the peer did not answer".to_string())?
        .map_err(|e| format!("the peer's answer was unreadable: {e}"))?;
    if reply.status != Status::Accepted {
        return Err(match reply.detail {
            Some(detail) => format!("{}: {detail}", reply.status),
            None => reply.status.to_string(),
        });
    }
    Ok(())
}

type Sessions = Arc<Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>>;

async fn run_udp(forwarding: Arc<Forwarding>, forward: Arc<Forward>, socket: Arc<UdpSocket>) {
    let sessions: Sessions = Arc::default();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else { continue };
        let datagram = buf[..n].to_vec();
        let existing = sessions.lock().unwrap().get(&from).cloned();
        if let Some(tx) = existing {
            let _ = tx.try_send(datagram);
            continue;
        }
        let Ok(permit) = forward.permits.clone().try_acquire_owned() else {
            forward.stats.fail(format!("UDP session from {from} dropped: at the cap of {}", forward.spec.max_connections));
            continue;
        };
        let (tx, rx) = mpsc::channel(UDP_SESSION_QUEUE);
        let _ = tx.try_send(datagram);
        sessions.lock().unwrap().insert(from, tx);
        let (forwarding, forward, socket, sessions) = (forwarding.clone(), forward.clone(), socket.clone(), sessions.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match open(&forwarding, &forward, Transport::Udp).await {
                Ok(stream) => {
                    let _active = Active::new(&forward.stats);
                    let local = Datagrams { source: Source::Channel(rx), socket, to: Some(from) };
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
        });
    }
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
    Channel(mpsc::Receiver<Vec<u8>>),
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
                Source::Channel(rx) => match rx.recv().await {
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
