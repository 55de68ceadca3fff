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
//! Opening prefers a direct connection over a relayed one.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use libp2p::{
    Multiaddr, PeerId, StreamProtocol,
    core::{Endpoint, transport::PortUse},
    multiaddr::Protocol,
    swarm::{
        ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, NotifyHandler, THandler, THandlerInEvent,
        THandlerOutEvent, ToSwarm,
    },
};
use tokio::sync::{mpsc, oneshot};

use crate::handler::{Handler, Open};
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
    /// Each peer's connections, oldest first, whether each is relayed, and its streams' use.
    connections: HashMap<PeerId, Vec<(ConnectionId, bool, Arc<Usage>)>>,
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

    /// Opens a stream of `protocol` to `peer` on its newest direct connection, else its newest
    /// relayed one; the stream (or why not) arrives on `reply`. Never dials.
    pub fn open(&mut self, peer: PeerId, protocol: StreamProtocol, reply: Reply) {
        let chosen = self.connections.get(&peer).and_then(|list| {
            list.iter().rev().find(|(_, relayed, _)| !relayed).or_else(|| list.last()).map(|(id, ..)| *id)
        });
        self.open_chosen(peer, chosen, protocol, reply);
    }

    /// Opens a stream of `protocol` on that one connection to `peer` (to probe it, say).
    pub fn open_on(&mut self, peer: PeerId, connection: ConnectionId, protocol: StreamProtocol, reply: Reply) {
        let known = self.connections.get(&peer).is_some_and(|list| list.iter().any(|(id, ..)| *id == connection));
        self.open_chosen(peer, known.then_some(connection), protocol, reply);
    }

    fn open_chosen(&mut self, peer: PeerId, chosen: Option<ConnectionId>, protocol: StreamProtocol, reply: Reply) {
        match chosen {
            Some(connection) => self.events.push_back(ToSwarm::NotifyHandler {
                peer_id: peer,
                handler: NotifyHandler::One(connection),
                event: Open { protocol, reply },
            }),
            None => {
                let _ = reply.send(Err(OpenError::NotConnected));
            }
        }
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    fn add_connection(&mut self, peer: PeerId, connection: ConnectionId, addr: &Multiaddr) -> Handler {
        let relayed = is_relayed(addr);
        let quic = !relayed && addr.iter().any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic));
        let handler = Handler::new(peer, relayed, self.inbound.clone(), self.linger, if quic { (QUIC_STREAMS, true) } else { (YAMUX_STREAMS, false) });
        self.connections.entry(peer).or_default().push((connection, relayed, handler.usage()));
        self.update_direct(peer);
        handler
    }

    /// How long ago a stream of this behaviour on `connection` last read bytes from the peer, if
    /// ever: one that did since a probe started works, whatever the probe says.
    pub fn heard_ago(&self, peer: &PeerId, connection: ConnectionId) -> Option<Duration> {
        self.usage(peer, connection).and_then(|usage| usage.heard_ago())
    }

    fn usage(&self, peer: &PeerId, connection: ConnectionId) -> Option<&Usage> {
        self.connections.get(peer)?.iter().find(|(id, ..)| *id == connection).map(|(.., usage)| usage.as_ref())
    }

    fn update_direct(&self, peer: PeerId) {
        let direct = self.connections.get(&peer).is_some_and(|list| list.iter().any(|(_, relayed, _)| !relayed));
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
        Ok(self.add_connection(peer, connection, addr))
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        _role: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.add_connection(peer, connection, addr))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::ConnectionClosed(closed) = event {
            if let Some(list) = self.connections.get_mut(&closed.peer_id) {
                list.retain(|(id, ..)| *id != closed.connection_id);
                if list.is_empty() {
                    self.connections.remove(&closed.peer_id);
                }
            }
            self.update_direct(closed.peer_id);
        }
    }

    fn on_connection_handler_event(&mut self, _: PeerId, _: ConnectionId, event: THandlerOutEvent<Self>) {
        libp2p::core::util::unreachable(event)
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
