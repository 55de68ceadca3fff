//! The one way into the swarm task: a cloneable [`NodeHandle`] sends [`Command`]s, each with a
//! oneshot for its reply, to the event loop that owns the Swarm. Streams to peers (forwarding,
//! ping) are opened the same way.

use std::time::Duration;

use libp2p::{PeerId, StreamProtocol};
use tokio::sync::{mpsc, oneshot};
use warren_forward::{Direct, OpenError, Opened};

use crate::api;

/// Commands queued for the event loop at most; senders wait beyond that. Every new forwarded
/// connection sends one (its stream), so this absorbs a burst of them across all forwards.
pub const COMMAND_QUEUE: usize = 1024;
/// How long reaching a peer that is not connected may take: stored addresses, then lookups in
/// both DHTs, then the dial (a relayed one included).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

pub enum Command {
    Status(oneshot::Sender<api::Status>),
    Peers(oneshot::Sender<Vec<api::PeerEntry>>),
    /// Looks a peer up in the DHT.
    Find(PeerId, oneshot::Sender<api::FindReply>),
    /// Makes sure we have a connection to the peer: stored addresses, then a DHT lookup.
    Connect(PeerId, oneshot::Sender<Result<(), ConnectError>>),
    /// Opens a stream on a connection to the peer that is already open (never dials).
    OpenStream(PeerId, StreamProtocol, oneshot::Sender<Result<Opened, OpenError>>),
    /// The peers in the WAN DHT's routing table (diagnostics and simulations).
    RoutingTable(oneshot::Sender<Vec<PeerId>>),
    /// The addresses in the provider record of this peer's own key that this node holds in the
    /// WAN DHT, if it holds one (diagnostics and simulations).
    HeldRecord(PeerId, oneshot::Sender<Option<Vec<libp2p::Multiaddr>>>),
    /// Adds synthetic records to the peer store (diagnostics and crash tests).
    StoreChurn(u32, oneshot::Sender<api::ChurnReply>),
    /// Gathers what `warren netcheck` judges from, probing over QUIC first where that helps.
    Netcheck(oneshot::Sender<NetcheckDraft>),
    /// A peer offered a birthday punch, seen at the IP given: admitted (we are the easy side
    /// and start), or why not. With the flag set, a mapping that is not settled but most likely
    /// keeps our port is taken as easy (the last try before refusing).
    PunchAdmit(PeerId, std::net::IpAddr, bool, oneshot::Sender<Result<crate::punch::Admission, (warren_punch::Refusal, String)>>),
    /// Dials the port a birthday punch found (answered once the dial is under way).
    PunchDial(PeerId, libp2p::Multiaddr, oneshot::Sender<()>),
    /// A birthday punch ended, either role.
    PunchDone(PeerId, crate::punch::Outcome, oneshot::Sender<()>),
    /// A forwarded connection to the peer went silent: probe its direct connections.
    CheckPaths(PeerId),
    /// A direct connection did not answer its probe (why): close it.
    /// A probe of this connection, started at the instant, went unanswered.
    PathSilent(PeerId, libp2p::swarm::ConnectionId, crate::paths::Silent, std::time::Instant),
}

/// What the event loop gathered for `warren netcheck`; [`NetcheckDraft::finish`] traces the
/// first hops (off the event loop: it waits for ICMP answers) and judges.
pub struct NetcheckDraft {
    /// Everything but the judgement and the hops.
    pub report: api::Netcheck,
    pub evidence: crate::nat::Evidence,
    /// Public peers we reach directly, to trace towards (longest connected first).
    pub trace_targets: Vec<std::net::Ipv4Addr>,
    pub public_ranges: Vec<crate::addresses::Cidr>,
}

impl NetcheckDraft {
    pub async fn finish(mut self) -> api::Netcheck {
        let mut notes = Vec::new();
        if !self.trace_targets.is_empty() {
            let ranges = self.public_ranges.clone();
            let public = move |ip: std::net::Ipv4Addr| crate::addresses::is_public_ip(ip.into(), &ranges);
            let targets = self.trace_targets.clone();
            match tokio::task::spawn_blocking(move || crate::trace::trace_any(&targets, public)).await {
                Ok(Ok(hops)) => self.evidence.hops = hops,
                Ok(Err(e)) => notes.push(format!("the trace failed: {e}")),
                Err(e) => notes.push(format!("the trace failed: {e}")),
            }
        }
        let judged = crate::nat::assess(&self.evidence);
        let mut report = self.report;
        report.nat_type = judged.nat_type.as_str().to_string();
        report.verdict = judged.verdict;
        report.udp = serde_plain(&judged.udp);
        report.mapping = serde_plain(&judged.mapping);
        report.double_nat = judged.double_nat;
        report.hops = self.evidence.hops;
        report.reasons = judged.reasons;
        report.reasons.extend(notes);
        report
    }
}

/// An enum's serde name (a plain string).
fn serde_plain<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

/// Why the event loop could not connect to a peer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    /// The PeerId is this node's own.
    #[error("that is this node's own PeerId")]
    OwnPeerId,
    /// No lookup found the peer, and no address of it is known.
    #[error("the peer is not in the DHT and no address of it is known")]
    NotFound,
    /// Every address found was dialed and failed; the text is the last dial error.
    #[error("{0}")]
    DialFailed(String),
}

/// The event loop is gone: the node is shutting down.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the node is shutting down")]
pub struct ShuttingDown;

/// Why a stream to a peer could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ReachError {
    /// The node is shutting down.
    #[error(transparent)]
    ShuttingDown(#[from] ShuttingDown),
    /// Reaching the peer took longer than [`CONNECT_TIMEOUT`].
    #[error("cannot reach {peer}: timed out after {CONNECT_TIMEOUT:?}")]
    TimedOut { peer: PeerId },
    /// No address of the peer led to it.
    #[error("cannot reach {peer}: {reason}")]
    Unreachable { peer: PeerId, reason: ConnectError },
    /// Connected, but the stream could not be opened.
    #[error("cannot open a stream to {peer}: {source}")]
    Open { peer: PeerId, source: OpenError },
}

/// A cloneable way to talk to the event loop.
#[derive(Clone)]
pub struct NodeHandle {
    tx: mpsc::Sender<Command>,
    pub peer_id: PeerId,
    direct: Direct,
}

impl NodeHandle {
    /// A handle and the receiving end of its command queue, for the event loop. `direct` is
    /// the stream behaviour's view of which peers have a direct connection.
    pub fn new(peer_id: PeerId, direct: Direct) -> (Self, mpsc::Receiver<Command>) {
        let (tx, commands) = mpsc::channel(COMMAND_QUEUE);
        (Self { tx, peer_id, direct }, commands)
    }

    /// Sends a command and waits for its reply.
    pub async fn request<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, ShuttingDown> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| ShuttingDown)?;
        rx.await.map_err(|_| ShuttingDown)
    }

    /// Asks the node to probe the peer's direct connections and close those that no longer
    /// answer (`warren_probe`). Never waits: with the command queue full the request is dropped,
    /// since the node is busy enough that QUIC's own timeout will come first.
    pub fn check_paths(&self, peer: PeerId) {
        let _ = self.tx.try_send(Command::CheckPaths(peer));
    }

    /// Tells the event loop something that needs no answer.
    pub async fn tell(&self, command: Command) -> Result<(), ShuttingDown> {
        self.tx.send(command).await.map_err(|_| ShuttingDown)
    }

    /// Whether a direct (not relayed) connection to the peer is open now.
    pub fn has_direct(&self, peer: &PeerId) -> bool {
        self.direct.contains(peer)
    }

    /// Opens a stream on a connection already open ([`OpenError::NotConnected`] otherwise).
    pub async fn open_stream(&self, peer: PeerId, protocol: StreamProtocol) -> Result<Result<Opened, OpenError>, ShuttingDown> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::OpenStream(peer, protocol, tx)).await.map_err(|_| ShuttingDown)?;
        // The request travels with the connection it waits on, and is dropped unanswered when
        // that connection closes first: not the node shutting down.
        Ok(rx.await.unwrap_or(Err(OpenError::ConnectionClosed)))
    }

    /// Makes sure a connection to the peer is open, reaching it if needed (within
    /// [`CONNECT_TIMEOUT`]).
    pub async fn connect(&self, peer: PeerId) -> Result<(), ReachError> {
        match tokio::time::timeout(CONNECT_TIMEOUT, self.request(|tx| Command::Connect(peer, tx))).await {
            Err(_) => Err(ReachError::TimedOut { peer }),
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok(Err(reason))) => Err(ReachError::Unreachable { peer, reason }),
            Ok(Ok(Ok(()))) => Ok(()),
        }
    }

    /// A stream of `protocol` to the peer. Connected already (the usual case): opened at once.
    /// Otherwise the peer is reached first (stored addresses, the DHT, relays).
    pub async fn reach_and_open(&self, peer: PeerId, protocol: StreamProtocol) -> Result<Opened, ReachError> {
        let opened = match self.open_stream(peer, protocol.clone()).await? {
            Err(OpenError::NotConnected) => {
                self.connect(peer).await?;
                self.open_stream(peer, protocol).await?
            }
            other => other,
        };
        opened.map_err(|source| ReachError::Open { peer, source })
    }
}
