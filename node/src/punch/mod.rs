//! Birthday hole punching (`/warren/punch/1.0.0`, see the `warren-punch` crate for the protocol):
//! a direct QUIC connection between a node behind a symmetric NAT and one behind an easy NAT,
//! where DCUtR cannot make one.
//!
//! This module holds the two sides of one punch as plain async functions over the punch stream
//! and UDP sockets; the event loop decides when to punch and with whom (`event_loop::birthday`)
//! and lends them what only it can do, through [`Node`].
//!
//! - [`hard`] (our NAT is symmetric, we opened the stream): open the sockets, send towards the
//!   easy side's address, wait for a probe, turn the winning socket into a QUIC listener.
//! - [`easy`] (our NAT is easy, the peer offered): send probes from our QUIC socket to random
//!   ports of the peer's IP until one arrives, then dial the port the peer names.

pub mod quic;
mod sockets;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use futures::{AsyncRead, AsyncWrite};
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use warren_punch::{Message, Packet, Refusal, TOKEN_LEN};

pub use quic::{ListenGuard, PunchListeners};

/// How long each side waits for the other's next message before the punch is abandoned (the
/// relayed stream carries them: a few round trips at most).
pub const MESSAGE_WAIT: Duration = Duration::from_secs(10);
/// How long, after a hit, both sides wait for the direct connection to be up: one QUIC handshake
/// over the new path, with retransmissions.
pub const CONNECT_WAIT: Duration = Duration::from_secs(10);
/// How often a waiting side looks whether the direct connection is up.
const DIRECT_POLL: Duration = Duration::from_millis(50);
/// TTL of the hard side's first round: enough to leave our own NAT (and create its mappings),
/// too little to reach the easy side's network, whose firewall might otherwise take the
/// unsolicited packets for a scan. Later rounds use the system's default TTL.
pub const FIRST_ROUND_TTL: u32 = 2;
/// The system default TTL the later rounds go back to.
const DEFAULT_TTL: u32 = 64;
/// Between the hard side's refresh rounds: well inside Linux's 30 s timeout for a UDP mapping
/// that saw no reply, so no mapping expires while the easy side probes.
pub const REFRESH_ROUND: Duration = Duration::from_secs(10);
/// The longest either side probes or waits for probes, whatever the limits say: a punch
/// that has not met by then will not (99.9 % meet within 35 s at the defaults).
pub const MAX_PROBING: Duration = Duration::from_secs(120);
/// Lowest port the easy side probes: NATs hand out ports from 1024 up.
pub const LOWEST_PROBED_PORT: u16 = 1024;

/// What a node lets a punch cost (`[birthday]` in the config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Sockets the hard side opens. Default: 256, as hyperdht: with 1,024 probes a hit is 98 %
    /// likely. At most 1,024 (each is a file descriptor and a router mapping).
    pub sockets: u16,
    /// Probes the easy side sends at most. Default: 1,750 (35 s at the default interval): a hit
    /// is 99.9 % likely against 256 sockets.
    pub probes: u32,
    /// Milliseconds between the easy side's probes. Default: 20, 50 packets of 22 bytes a
    /// second: below what a home router or an IDS notices, fast enough for the 35 s above.
    pub probe_interval_ms: u32,
    /// Seconds between the end of one punch and the start of the next, either role. Default:
    /// 10, so a flood of offers cannot keep a node probing.
    pub min_interval_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { sockets: 256, probes: 1750, probe_interval_ms: 20, min_interval_secs: 10 }
    }
}

impl Limits {
    /// The smallest probe interval allowed: 1 ms is 1,000 packets a second, the most a node
    /// should ever spray at one address.
    pub const MIN_PROBE_INTERVAL_MS: u32 = 1;
    /// The most probes a punch may send: 60 s at the smallest default-like interval of 20 ms is
    /// 3,000; past that the punch outlasts every peer's patience.
    pub const MAX_PROBES: u32 = 10_000;

    pub fn validate(&self) -> Result<(), String> {
        if self.sockets == 0 || self.sockets > warren_punch::MAX_SOCKETS {
            return Err(format!("birthday.sockets must be 1 to {}, not {}", warren_punch::MAX_SOCKETS, self.sockets));
        }
        if self.probes == 0 || self.probes > Self::MAX_PROBES {
            return Err(format!("birthday.probes must be 1 to {}, not {}", Self::MAX_PROBES, self.probes));
        }
        if self.probe_interval_ms < Self::MIN_PROBE_INTERVAL_MS || self.probe_interval_ms > 1000 {
            return Err(format!("birthday.probe_interval_ms must be 1 to 1000, not {}", self.probe_interval_ms));
        }
        Ok(())
    }

    pub fn probe_interval(&self) -> Duration {
        Duration::from_millis(u64::from(self.probe_interval_ms))
    }
}

/// What a punch needs the node for.
pub trait Node: Send + Sync {
    /// Whether a direct connection to `peer` is open now.
    fn has_direct(&self, peer: &PeerId) -> bool;
    /// Dials `addr` (the peer's punched port); the outcome shows in [`Node::has_direct`].
    fn dial(&self, peer: PeerId, addr: Multiaddr) -> impl std::future::Future<Output = ()> + Send;
}

/// How a punch ended.
#[derive(Debug)]
pub struct Outcome {
    /// Whether we were the hard side (we offered and opened the sockets).
    pub hard: bool,
    /// Probes we sent (the easy side).
    pub probes: u32,
    /// Sockets the hard side opened (we, or the peer as it told us).
    pub sockets: u16,
    pub took: Duration,
    pub result: Result<Success, Failure>,
}

impl Outcome {
    /// A punch that failed before it sent or opened anything.
    pub fn failed(failure: Failure) -> Self {
        Outcome { hard: true, probes: 0, sockets: 0, took: Duration::ZERO, result: Err(failure) }
    }
}

/// A direct connection came up.
#[derive(Debug)]
pub struct Success {
    /// The hard side's listener, to keep open as long as the connection lives.
    pub guard: Option<ListenGuard>,
    /// The local port of that listener.
    pub port: Option<u16>,
}

/// Why a punch made no direct connection.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Failure {
    /// The easy side would not punch; `detail` is what it added (maybe nothing).
    #[error("{}{}{detail}", reason.explain(), if detail.is_empty() { "" } else { ": " })]
    Refused { reason: Refusal, detail: String },
    /// The peer does not speak the protocol (another implementation, an older warren).
    #[error("the peer does not speak {}", warren_punch::PROTOCOL)]
    Unsupported,
    /// The other side gave up (its probes or its time ran out, or it failed).
    #[error("the peer gave up: {0}")]
    PeerGaveUp(String),
    /// Every probe was sent and none reached the hard side.
    #[error("none of {0} probes found a mapping")]
    NoHit(u32),
    /// A probe got through but the QUIC connection over that path did not come up.
    #[error("a probe got through, but the QUIC connection over it did not come up within {} s", CONNECT_WAIT.as_secs())]
    NoConnection,
    /// The stream broke, timed out, or carried something unexpected.
    #[error("{0}")]
    Protocol(String),
    /// A local socket operation failed.
    #[error("{0}")]
    Local(String),
}

/// What the easy side was admitted with (decided by the event loop).
#[derive(Debug, Clone)]
pub struct Admission {
    /// Where peers see our QUIC socket.
    pub addr: SocketAddr,
    /// The local port of that socket.
    pub local_port: u16,
    pub limits: Limits,
}

async fn read<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Message, Failure> {
    match tokio::time::timeout(MESSAGE_WAIT, warren_punch::read(stream)).await {
        Ok(Ok(message)) => Ok(message),
        Ok(Err(e)) => Err(Failure::Protocol(format!("reading the punch stream: {e}"))),
        Err(_) => Err(Failure::Protocol(format!("the peer said nothing for {} s", MESSAGE_WAIT.as_secs()))),
    }
}

async fn write<S: AsyncWrite + Unpin>(stream: &mut S, message: &Message) -> Result<(), Failure> {
    warren_punch::write(stream, message).await.map_err(|e| Failure::Protocol(format!("writing the punch stream: {e}")))
}

/// Tells the peer why we stopped, unless it knows already (it refused, it gave up, or the stream
/// broke).
async fn tell_why<S: AsyncWrite + Unpin>(stream: &mut S, result: &Result<Success, Failure>) {
    if let Err(failure) = result
        && !matches!(failure, Failure::Refused { .. } | Failure::PeerGaveUp(_) | Failure::Protocol(_))
    {
        let _ = write(stream, &Message::GiveUp { detail: warren_punch::detail(failure.to_string()) }).await;
    }
}

/// Waits until `node` has a direct connection to `peer`, at most [`CONNECT_WAIT`].
async fn direct_up(node: &impl Node, peer: &PeerId) -> bool {
    let deadline = Instant::now() + CONNECT_WAIT;
    while Instant::now() < deadline {
        if node.has_direct(peer) {
            return true;
        }
        tokio::time::sleep(DIRECT_POLL).await;
    }
    node.has_direct(peer)
}

/// The hard side: we opened `stream` to `peer` over a relayed connection; peers see us at `ip`.
pub async fn hard<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    peer: PeerId,
    ip: IpAddr,
    limits: &Limits,
    public_ranges: &[crate::addresses::Cidr],
    listeners: &PunchListeners,
    node: &impl Node,
) -> Outcome {
    let started = Instant::now();
    let sockets = limits.sockets.min(warren_punch::MAX_SOCKETS);
    let mut outcome = Outcome { hard: true, probes: 0, sockets: 0, took: Duration::ZERO, result: Err(Failure::NoConnection) };
    outcome.result = hard_steps(stream, peer, ip, sockets, public_ranges, listeners, node, &mut outcome.sockets).await;
    tell_why(stream, &outcome.result).await;
    outcome.took = started.elapsed();
    outcome
}

async fn hard_steps<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    peer: PeerId,
    ip: IpAddr,
    sockets: u16,
    public_ranges: &[crate::addresses::Cidr],
    listeners: &PunchListeners,
    node: &impl Node,
    opened: &mut u16,
) -> Result<Success, Failure> {
    write(stream, &Message::Offer { version: warren_punch::VERSION, ip }).await?;
    let (addr, token, probes, interval_ms) = match read(stream).await? {
        Message::Accept { addr, token, probes, interval_ms } => (addr, token, probes, interval_ms),
        Message::Refuse { reason, detail } => return Err(Failure::Refused { reason, detail }),
        other => return Err(Failure::Protocol(format!("expected an answer to our offer, got {other:?}"))),
    };
    // Our sockets send there for as long as the punch lasts: only to a public IPv4 address
    // and a real port, never to a private network or a third party's port 0 on a peer's word.
    if !addr.is_ipv4() || addr.port() == 0 || !crate::addresses::is_public_ip(addr.ip(), public_ranges) {
        return Err(Failure::Protocol(format!("the peer's address {addr} is not a public IPv4 address and port")));
    }
    let fan = sockets::Fan::open(sockets, addr, token).map_err(|e| Failure::Local(format!("opening {sockets} sockets: {e}")))?;
    *opened = fan.len();
    fan.round(Some(FIRST_ROUND_TTL)).await;
    write(stream, &Message::Ready { sockets: fan.len() }).await?;
    // The easy side sends `probes` probes, one per interval; a little more for the last to arrive.
    let probing = Duration::from_millis(u64::from(interval_ms.max(1)) * u64::from(probes)).min(MAX_PROBING);
    let deadline = tokio::time::Instant::now() + probing + MESSAGE_WAIT;
    let mut refresh = tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(1), REFRESH_ROUND);
    let hit = {
        // One read for the whole wait (a read cut off half-way would lose its bytes); any
        // message ends the wait.
        let mut message = std::pin::pin!(warren_punch::read(stream));
        loop {
            tokio::select! {
                hit = fan.hit() => break hit.map_err(|e| Failure::Local(format!("receiving probes: {e}")))?,
                _ = refresh.tick() => fan.round(Some(DEFAULT_TTL)).await,
                message = &mut message => return Err(match message {
                    Ok(Message::GiveUp { detail }) => Failure::PeerGaveUp(detail),
                    Ok(other) => Failure::Protocol(format!("unexpected {other:?} while waiting for probes")),
                    Err(e) => Failure::Protocol(format!("reading the punch stream: {e}")),
                }),
                _ = tokio::time::sleep_until(deadline) => return Err(Failure::NoHit(probes)),
            }
        }
    };
    // Every other socket closes here; the winner's port is free for the QUIC listener, and the
    // router keeps its mapping (conntrack outlives the socket).
    drop(fan);
    let guard = listeners.listen(hit.local_port).map_err(|e| Failure::Local(format!("listening on port {}: {e}", hit.local_port)))?;
    write(stream, &Message::Hit { port: hit.probed_port }).await?;
    if direct_up(node, &peer).await {
        Ok(Success { guard: Some(guard), port: Some(hit.local_port) })
    } else {
        Err(Failure::NoConnection)
    }
}

/// The easy side: `peer` offered on `stream` and we admitted it; the offer's IP was `ip`.
pub async fn easy<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    peer: PeerId,
    ip: IpAddr,
    admission: Admission,
    node: &impl Node,
) -> Outcome {
    let started = Instant::now();
    let mut outcome = Outcome { hard: false, probes: 0, sockets: 0, took: Duration::ZERO, result: Err(Failure::NoConnection) };
    outcome.result = easy_steps(stream, peer, ip, &admission, node, &mut outcome.probes, &mut outcome.sockets).await;
    tell_why(stream, &outcome.result).await;
    outcome.took = started.elapsed();
    outcome
}

async fn easy_steps<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    peer: PeerId,
    ip: IpAddr,
    admission: &Admission,
    node: &impl Node,
    sent: &mut u32,
    their_sockets: &mut u16,
) -> Result<Success, Failure> {
    let socket = quic::listen_socket(admission.local_port)
        .and_then(|s| {
            s.set_nonblocking(true)?;
            tokio::net::UdpSocket::from_std(s)
        })
        .map_err(|e| Failure::Local(format!("cannot send from our QUIC socket: {e}")))?;
    let token: [u8; TOKEN_LEN] = rand::random();
    let limits = &admission.limits;
    let accept = Message::Accept { addr: admission.addr, token, probes: limits.probes, interval_ms: limits.probe_interval_ms };
    write(stream, &accept).await?;
    match read(stream).await? {
        Message::Ready { sockets } => *their_sockets = sockets,
        Message::GiveUp { detail } => return Err(Failure::PeerGaveUp(detail)),
        other => return Err(Failure::Protocol(format!("expected the peer to be ready, got {other:?}"))),
    }
    let mut tick = tokio::time::interval(limits.probe_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut message = std::pin::pin!(warren_punch::read(stream));
    // Attempts, not sends, end the probing (a send that keeps failing must not make it endless);
    // so does the time.
    let (mut attempts, deadline) = (0u32, tokio::time::Instant::now() + MAX_PROBING);
    let port = loop {
        let probing = attempts < limits.probes && tokio::time::Instant::now() < deadline;
        tokio::select! {
            _ = tick.tick(), if probing => {
                attempts += 1;
                let port = rand::Rng::gen_range(&mut rand::thread_rng(), LOWEST_PROBED_PORT..=u16::MAX);
                let packet = Packet { token, port }.encode();
                if socket.send_to(&packet, SocketAddr::new(ip, port)).await.is_ok() {
                    *sent += 1;
                }
            }
            _ = tokio::time::sleep(MESSAGE_WAIT), if !probing => return Err(Failure::NoHit(*sent)),
            message = &mut message => match message {
                Ok(Message::Hit { port }) => break port,
                Ok(Message::GiveUp { detail }) => return Err(Failure::PeerGaveUp(detail)),
                Ok(other) => return Err(Failure::Protocol(format!("unexpected {other:?} while probing"))),
                Err(e) => return Err(Failure::Protocol(format!("reading the punch stream: {e}"))),
            },
        }
    };
    drop(socket);
    let addr: Multiaddr = format!("/{}/{}/udp/{port}/quic-v1", if ip.is_ipv4() { "ip4" } else { "ip6" }, ip).parse().expect("a valid multiaddr");
    node.dial(peer, addr).await;
    if direct_up(node, &peer).await { Ok(Success { guard: None, port: None }) } else { Err(Failure::NoConnection) }
}

/// Whether the easy side takes an offer from a peer seen at `ip`: a public unicast IPv4 address
/// (public ranges count), so probes never go to a private network on a peer's word.
pub fn offer_ip_acceptable(ip: IpAddr, public_ranges: &[crate::addresses::Cidr]) -> bool {
    ip.is_ipv4() && crate::addresses::is_public_ip(ip, public_ranges)
}
