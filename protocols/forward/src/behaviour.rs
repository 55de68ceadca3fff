//! The forward protocol's libp2p behaviour: inbound `/warren/forward/1.0.0` streams on every
//! connection, queued for the node's serving task (and streams of any other protocol the node
//! asks for with [`Behaviour::accept`], each in a queue of its own); outbound streams of any
//! protocol opened on request on a connection already open.
//!
//! A small behaviour of our own rather than `libp2p-stream`, for two reasons that matter under
//! load: `libp2p-stream` drops inbound streams its single-slot channel cannot take at once, and
//! negotiates one outbound stream per connection at a time. Here inbound streams queue in a
//! bounded channel (a full queue refuses the stream, which the opener sees as a reset), and any
//! number of outbound negotiations run concurrently, each answered on its own reply channel.
//! Opening prefers a direct connection over a relayed one. A connection carries a bounded number
//! of forward streams ([`YAMUX_STREAMS`], [`QUIC_STREAMS`]); when every one to the peer is full,
//! the behaviour dials another (up to [`MAX_FORWARD_CONNECTIONS`]) and opens the rest there.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use libp2p::{
    Multiaddr, PeerId, StreamProtocol,
    core::{Endpoint, transport::PortUse},
    multiaddr::Protocol,
    swarm::{
        ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, NotifyHandler, THandler, THandlerInEvent,
        THandlerOutEvent, ToSwarm,
        dial_opts::{DialOpts, PeerCondition},
    },
};
use tokio::sync::{mpsc, oneshot};

use crate::handler::{Handler, Open, Spilled};
use crate::linger::{Stream, Usage};

/// The protocol id as libp2p negotiates it.
pub const STREAM_PROTOCOL: StreamProtocol = StreamProtocol::new(crate::PROTOCOL);
/// Inbound streams waiting for the serving task; beyond this they are refused. Sized for a burst
/// of new connections on every forward at once, while the serving task spawns one task each.
pub const INBOUND_QUEUE: usize = 1024;

/// Streams of this behaviour (both directions) one connection over yamux (TCP, and relayed
/// circuits) carries at once; opening more forward streams waits until one closes. yamux ends
/// the whole connection, every stream on it, when either side's count of streams reaches its
/// limit (512 in yamux 0.14, which libp2p keeps): 700 forwarded connections at once killed the
/// TCP connection they shared (measured). A quarter of the limit is left for the other
/// protocols and for streams yamux still holds after they were dropped here.
pub const YAMUX_STREAMS: usize = 384;
/// ... and, counting only the streams this side opened, over QUIC. The peer (a warren node)
/// lets us open 1280 at once, but quinn may withhold an eighth of that credit for as long as
/// streams stay open, and a stream opened beyond the credit waits in quinn, ahead of every
/// later open on the connection (path probes included). The node asserts that this cap fits
/// under the credit quinn always grants, with room for the DHT, probes and punch offers.
pub const QUIC_STREAMS: usize = 1008;
/// Connections to one peer that forward streams spread over when each is full: another is
/// dialed only then. 4 × 384 = 1,536 forwarded connections at once over TCP or a relay (where a
/// second circuit costs the relay a circuit slot; it allows 8 per peer by default), 4,032 over
/// QUIC; beyond, new ones wait for a stream to close. The node allows 8 connections per peer.
pub const MAX_FORWARD_CONNECTIONS: usize = 4;
/// After a further connection to a peer could not be had, how long its full connections make
/// new forward streams wait rather than dial again: each dial to a peer that cannot be reached
/// that way costs its timeout, and a relay's circuit budget.
const SPILL_RETRY: Duration = Duration::from_secs(30);

/// How many forward streams one connection carries at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamLimit {
    /// yamux (TCP, relayed circuits): [`YAMUX_STREAMS`], counting both directions.
    Yamux,
    /// QUIC: [`QUIC_STREAMS`], counting only the streams this side opened.
    Quic,
}

impl StreamLimit {
    fn of(addr: &Multiaddr) -> Self {
        let quic = !is_relayed(addr) && addr.iter().any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic));
        if quic { Self::Quic } else { Self::Yamux }
    }

    /// Whether a connection with this `usage`, and `coming` more forward streams on their way,
    /// has room for another forward stream.
    pub(crate) fn has_room(self, usage: &Usage, coming: usize) -> bool {
        let (in_use, cap) = match self {
            Self::Yamux => (usage.open(false), YAMUX_STREAMS),
            Self::Quic => (usage.open(true), QUIC_STREAMS),
        };
        in_use + coming < cap
    }
}

/// One connection to a peer, as the behaviour knows it.
struct Conn {
    id: ConnectionId,
    relayed: bool,
    usage: Arc<Usage>,
    limit: StreamLimit,
    /// The address we dialed (None: the peer dialed us); a further connection dials it again.
    dialed: Option<Multiaddr>,
}

/// Forward streams waiting for a further connection to the peer, being dialed.
struct Spill {
    dial: ConnectionId,
    waiting: Vec<Open>,
}

/// Inbound forward streams, in arrival order, with the peer that opened each.
pub type Incoming = mpsc::Receiver<(PeerId, Stream)>;

/// An outbound stream, and whether it runs over a relayed connection.
#[derive(Debug)]
pub struct Opened {
    pub stream: Stream,
    pub relayed: bool,
}

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No connection to the peer is open: connect first, then ask again.
    #[error("not connected to the peer")]
    NotConnected,
    /// The connection closed (or the node stopped) before the stream was open.
    #[error("the connection closed while opening the stream")]
    ConnectionClosed,
    /// The peer does not speak the protocol.
    #[error("the peer does not accept {0} streams")]
    Unsupported(StreamProtocol),
    /// Negotiating the stream failed (timed out, or the connection failed under it).
    #[error("opening the stream failed: {0}")]
    Failed(String),
}

/// Where the answer to one open request goes.
pub type Reply = oneshot::Sender<Result<Opened, OpenError>>;

/// The peers that have a direct (not relayed) connection now, kept by the behaviour and read by
/// anyone holding a clone.
#[derive(Debug, Clone, Default)]
pub struct Direct(Arc<Mutex<HashSet<PeerId>>>);

impl Direct {
    pub fn contains(&self, peer: &PeerId) -> bool {
        self.0.lock().expect("direct set lock").contains(peer)
    }

    fn set(&self, peer: PeerId, direct: bool) {
        let mut set = self.0.lock().expect("direct set lock");
        if direct {
            set.insert(peer);
        } else {
            set.remove(&peer);
        }
    }
}

/// The inbound protocols accepted, each with the queue its streams go to.
pub(crate) type Accepted = Arc<Vec<(StreamProtocol, mpsc::Sender<(PeerId, Stream)>)>>;

pub struct Behaviour {
    inbound: Accepted,
    /// Each peer's connections, oldest first.
    connections: HashMap<PeerId, Vec<Conn>>,
    /// Per peer: forward streams that found every connection full, waiting for another.
    spills: HashMap<PeerId, Spill>,
    /// Per connected peer: when a further connection last could not be had.
    spill_failed: HashMap<PeerId, Instant>,
    direct: Direct,
    events: VecDeque<ToSwarm<(), Open>>,
    /// The swarm's task, woken when `open` queues a request from outside `poll`.
    waker: Option<Waker>,
    linger: Duration,
}

impl Behaviour {
    /// The behaviour, and the queue of inbound streams it accepts. A connection that carried
    /// its streams stays open for `linger` after the last of them closed (see [`crate::linger`]).
    pub fn new(linger: Duration) -> (Self, Incoming) {
        let (inbound, incoming) = mpsc::channel(INBOUND_QUEUE);
        let inbound = Arc::new(vec![(STREAM_PROTOCOL, inbound)]);
        let behaviour = Self {
            inbound,
            connections: HashMap::new(),
            spills: HashMap::new(),
            spill_failed: HashMap::new(),
            direct: Direct::default(),
            events: VecDeque::new(),
            waker: None,
            linger,
        };
        (behaviour, incoming)
    }

    /// Accepts inbound streams of `protocol` too, into a queue of `capacity` streams (a full
    /// queue refuses the stream). Call it before the swarm has connections: handlers already
    /// running keep the protocols they started with.
    pub fn accept(&mut self, protocol: StreamProtocol, capacity: usize) -> Incoming {
        let (sender, incoming) = mpsc::channel(capacity);
        let mut accepted = self.inbound.as_ref().clone();
        accepted.push((protocol, sender));
        self.inbound = Arc::new(accepted);
        incoming
    }

    /// Which peers have a direct connection now.
    pub fn direct(&self) -> Direct {
        self.direct.clone()
    }

    /// Opens a stream of `protocol` to `peer` on a direct connection if it has one, else on a
    /// relayed one; the stream (or why not) arrives on `reply`. A forward stream goes to a
    /// connection with room, and when all are full to a further connection, dialed for it;
    /// other protocols go to the newest connection. Never dials a peer it is not connected to.
    pub fn open(&mut self, peer: PeerId, protocol: StreamProtocol, reply: Reply) {
        let spill = protocol == STREAM_PROTOCOL;
        self.route(peer, Open { protocol, reply, spill }, None);
    }

    /// Opens a stream of `protocol` on that one connection to `peer` (to probe it, say).
    pub fn open_on(&mut self, peer: PeerId, connection: ConnectionId, protocol: StreamProtocol, reply: Reply) {
        let known = self.connections.get(&peer).is_some_and(|list| list.iter().any(|c| c.id == connection));
        self.send(peer, known.then_some(connection), Open { protocol, reply, spill: false });
    }

    /// The connections to `peer` an open may use, best first: the direct ones if there are any
    /// (else the relayed ones), newest first.
    fn usable(&self, peer: &PeerId) -> Vec<&Conn> {
        let Some(list) = self.connections.get(peer) else { return Vec::new() };
        let direct = list.iter().any(|c| !c.relayed);
        list.iter().rev().filter(|c| !direct || !c.relayed).collect()
    }

    /// Sends `open` to the best connection to `peer` (other than `full`, which just handed it
    /// back) with room for it; with none, a forward stream that may spill waits for a further
    /// connection.
    fn route(&mut self, peer: PeerId, mut open: Open, full: Option<ConnectionId>) {
        if open.reply.is_closed() {
            return; // its caller gave up
        }
        let usable = self.usable(&peer);
        let best = usable.first().map(|c| c.id);
        if open.protocol != STREAM_PROTOCOL {
            return self.send(peer, best, open);
        }
        let roomy = usable.iter().find(|c| Some(c.id) != full && c.limit.has_room(&c.usage, c.usage.reserved())).map(|c| c.id);
        match roomy {
            Some(id) => {
                // One handed back (inbound streams filled its connection meanwhile) is not
                // handed on again: no bouncing between connections.
                open.spill &= full.is_none();
                self.send(peer, Some(id), open)
            }
            None if open.spill && best.is_some() => self.spill(peer, open),
            None => self.send(peer, best, open),
        }
    }

    /// `open` found every connection to `peer` full: it waits for a further connection, dialed
    /// now unless one is on its way; or, where none may be dialed ([`MAX_FORWARD_CONNECTIONS`]
    /// reached, one failed less than [`SPILL_RETRY`] ago, or a direct connection the peer
    /// dialed, whose address we do not know), on the best connection for a stream to close.
    fn spill(&mut self, peer: PeerId, mut open: Open) {
        if let Some(spill) = self.spills.get_mut(&peer) {
            spill.waiting.push(open);
            return;
        }
        let usable = self.usable(&peer);
        let direct = usable.iter().any(|c| !c.relayed);
        // The addresses the full connections were dialed on (a relayed one's names its relay).
        let addresses: Vec<Multiaddr> = usable.iter().filter_map(|c| c.dialed.clone()).collect();
        let failed_lately = self.spill_failed.get(&peer).is_some_and(|at| at.elapsed() < SPILL_RETRY);
        let can_dial = !failed_lately
            && usable.len() < MAX_FORWARD_CONNECTIONS
            && self.connections.get(&peer).map_or(0, Vec::len) < MAX_FORWARD_CONNECTIONS * 2
            // A direct connection is dialed again only where one was dialed before: the peer's
            // other addresses (relayed ones) would bring a connection of no use here.
            && (!direct || !addresses.is_empty());
        if !can_dial {
            open.spill = false;
            let best = usable.first().map(|c| c.id);
            return self.send(peer, best, open);
        }
        let mut dial = DialOpts::peer_id(peer).condition(PeerCondition::Always).addresses(addresses);
        if !direct {
            // Relayed: what the other behaviours know of the peer (its relayed addresses) too.
            dial = dial.extend_addresses_through_behaviour();
        }
        let dial = dial.build();
        tracing::debug!(%peer, connections = usable.len(), "every connection to the peer carries its most forward streams: dialing another");
        self.spills.insert(peer, Spill { dial: dial.connection_id(), waiting: vec![open] });
        self.events.push_back(ToSwarm::Dial { opts: dial });
        self.wake();
    }

    fn send(&mut self, peer: PeerId, chosen: Option<ConnectionId>, open: Open) {
        if open.protocol == STREAM_PROTOCOL {
            // Counted in until the handler has opened it (or let it go).
            if let Some(conn) = chosen.and_then(|id| self.connections.get(&peer)?.iter().find(|c| c.id == id)) {
                conn.usage.reserve();
            }
        }
        match chosen {
            Some(connection) => self.events.push_back(ToSwarm::NotifyHandler {
                peer_id: peer,
                handler: NotifyHandler::One(connection),
                event: open,
            }),
            None => {
                let _ = open.reply.send(Err(OpenError::NotConnected));
            }
        }
        self.wake();
    }

    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    /// The further connection to `peer` is there, or could not be had (`dial_failed`): what
    /// waited for it is routed again (and, after a failure, waits on a full connection).
    fn end_spill(&mut self, peer: PeerId, dial_failed: bool) {
        let Some(spill) = self.spills.remove(&peer) else { return };
        if dial_failed {
            tracing::debug!(%peer, waiting = spill.waiting.len(), "no further connection to the peer: forwarded connections wait for room");
            self.spill_failed.insert(peer, Instant::now());
        }
        for mut open in spill.waiting {
            open.spill &= !dial_failed;
            self.route(peer, open, None);
        }
    }

    fn add_connection(&mut self, peer: PeerId, connection: ConnectionId, addr: &Multiaddr, dialed: bool) -> Handler {
        let relayed = is_relayed(addr);
        let limit = StreamLimit::of(addr);
        let handler = Handler::new(peer, relayed, self.inbound.clone(), self.linger, limit);
        let dialed = dialed.then(|| addr.clone());
        self.connections.entry(peer).or_default().push(Conn { id: connection, relayed, usage: handler.usage(), limit, dialed });
        self.update_direct(peer);
        if self.spills.get(&peer).is_some_and(|spill| spill.dial == connection) {
            // A relayed connection where a direct one is full is no use for what waited.
            let useful = self.usable(&peer).iter().any(|c| c.id == connection);
            self.end_spill(peer, !useful);
        }
        handler
    }

    /// How long ago a stream of this behaviour on `connection` last read bytes from the peer, if
    /// ever: one that did since a probe started works, whatever the probe says.
    pub fn heard_ago(&self, peer: &PeerId, connection: ConnectionId) -> Option<Duration> {
        self.usage(peer, connection).and_then(|usage| usage.heard_ago())
    }

    fn usage(&self, peer: &PeerId, connection: ConnectionId) -> Option<&Usage> {
        self.connections.get(peer)?.iter().find(|c| c.id == connection).map(|c| c.usage.as_ref())
    }

    fn update_direct(&self, peer: PeerId) {
        let direct = self.connections.get(&peer).is_some_and(|list| list.iter().any(|c| !c.relayed));
        self.direct.set(peer, direct);
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = ();

    fn handle_established_inbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        // An inbound relayed connection shows the circuit in its local address (the relay
        // listener it arrived on); its remote address is just the peer's id.
        let addr = if is_relayed(local) { local } else { remote };
        Ok(self.add_connection(peer, connection, addr, false))
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        _role: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.add_connection(peer, connection, addr, true))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionClosed(closed) => {
                if let Some(list) = self.connections.get_mut(&closed.peer_id) {
                    list.retain(|c| c.id != closed.connection_id);
                    if list.is_empty() {
                        self.connections.remove(&closed.peer_id);
                        self.spill_failed.remove(&closed.peer_id);
                    }
                }
                self.update_direct(closed.peer_id);
            }
            FromSwarm::DialFailure(failure) => {
                let ours = failure.peer_id.filter(|peer| self.spills.get(peer).is_some_and(|spill| spill.dial == failure.connection_id));
                if let Some(peer) = ours {
                    self.end_spill(peer, true);
                }
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(&mut self, peer: PeerId, connection: ConnectionId, Spilled(open): THandlerOutEvent<Self>) {
        self.route(peer, open, Some(connection));
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        match self.events.pop_front() {
            Some(event) => Poll::Ready(event),
            None => {
                self.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}
