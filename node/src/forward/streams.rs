//! Streams of `/warren/forward/1.0.0`, opened and accepted on the connections the node already
//! has. A small behaviour of our own rather than `libp2p-stream`, for two reasons that matter
//! under load: `libp2p-stream` drops inbound streams its single-slot channel cannot take at
//! once, and negotiates one outbound stream per connection at a time. Here inbound streams queue
//! in a bounded channel (a full queue refuses the stream, which the opener sees as a reset), and
//! any number of outbound negotiations run concurrently. Opening prefers a direct connection over
//! a relayed one.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use libp2p::{
    Multiaddr, PeerId, Stream, StreamProtocol,
    core::{Endpoint, transport::PortUse, upgrade::ReadyUpgrade},
    swarm::{
        ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm, NetworkBehaviour,
        NotifyHandler, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
        handler::{ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound},
    },
};
use tokio::sync::{mpsc, oneshot};

use crate::addresses::is_relayed;

pub const PROTOCOL: StreamProtocol = StreamProtocol::new(warren_forward::PROTOCOL);
/// Inbound streams waiting for the serving task; beyond this they are refused.
pub const INBOUND_QUEUE: usize = 1024;
/// Open requests waiting for the swarm.
const REQUEST_QUEUE: usize = 1024;

/// The stream, and whether it runs over a relayed connection.
type Reply = oneshot::Sender<Result<(Stream, bool), String>>;

/// Opens forward streams to peers from any task.
#[derive(Clone)]
pub struct Opener {
    tx: mpsc::Sender<(PeerId, Reply)>,
    direct: Arc<Mutex<HashSet<PeerId>>>,
}

/// What [`Opener::open`] answers when there is no connection to the peer yet.
pub const NOT_CONNECTED: &str = "not connected to the peer";

impl Opener {
    /// Opens a stream to a peer we are connected to ([`NOT_CONNECTED`] otherwise).
    pub async fn open(&self, peer: PeerId) -> Result<(Stream, bool), String> {
        let (tx, rx) = oneshot::channel();
        self.tx.send((peer, tx)).await.map_err(|_| "the node is shutting down".to_string())?;
        rx.await.map_err(|_| "the connection closed while opening the stream".to_string())?
    }

    /// Whether a direct (not relayed) connection to the peer is open now.
    pub fn has_direct(&self, peer: &PeerId) -> bool {
        self.direct.lock().unwrap().contains(peer)
    }
}

pub struct Behaviour {
    inbound: mpsc::Sender<(PeerId, Stream)>,
    requests: mpsc::Receiver<(PeerId, Reply)>,
    connections: HashMap<PeerId, Vec<(ConnectionId, bool)>>,
    /// Peers with a direct connection, shared with the [`Opener`]s.
    direct: Arc<Mutex<HashSet<PeerId>>>,
    events: VecDeque<ToSwarm<(), Reply>>,
}

impl Behaviour {
    /// The behaviour, the handle that opens streams, and the queue of accepted inbound streams.
    pub fn new() -> (Self, Opener, mpsc::Receiver<(PeerId, Stream)>) {
        let (inbound, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
        let (tx, requests) = mpsc::channel(REQUEST_QUEUE);
        let direct = Arc::new(Mutex::new(HashSet::new()));
        let behaviour =
            Self { inbound, requests, connections: HashMap::new(), direct: direct.clone(), events: VecDeque::new() };
        (behaviour, Opener { tx, direct }, inbound_rx)
    }

    fn update_direct(&self, peer: PeerId) {
        let direct = self.connections.get(&peer).is_some_and(|list| list.iter().any(|(_, relayed)| !relayed));
        let mut set = self.direct.lock().unwrap();
        if direct {
            set.insert(peer);
        } else {
            set.remove(&peer);
        }
    }

    fn handler(&self, peer: PeerId, addr: &Multiaddr) -> Handler {
        Handler {
            peer,
            relayed: is_relayed(addr),
            inbound: self.inbound.clone(),
            to_request: VecDeque::new(),
            in_flight: VecDeque::new(),
        }
    }

    fn add_connection(&mut self, peer: PeerId, connection: ConnectionId, addr: &Multiaddr) {
        self.connections.entry(peer).or_default().push((connection, is_relayed(addr)));
        self.update_direct(peer);
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
        self.add_connection(peer, connection, addr);
        Ok(self.handler(peer, addr))
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        _role: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.add_connection(peer, connection, addr);
        Ok(self.handler(peer, addr))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::ConnectionClosed(closed) = event {
            if let Some(list) = self.connections.get_mut(&closed.peer_id) {
                list.retain(|(id, _)| *id != closed.connection_id);
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
        while let Poll::Ready(Some((peer, reply))) = self.requests.poll_recv(cx) {
            // The newest direct connection, else the newest relayed one.
            let chosen = self.connections.get(&peer).and_then(|list| {
                list.iter().rev().find(|(_, relayed)| !relayed).or_else(|| list.last()).map(|(id, _)| *id)
            });
            match chosen {
                Some(connection) => self.events.push_back(ToSwarm::NotifyHandler {
                    peer_id: peer,
                    handler: NotifyHandler::One(connection),
                    event: reply,
                }),
                None => {
                    let _ = reply.send(Err(NOT_CONNECTED.into()));
                }
            }
        }
        match self.events.pop_front() {
            Some(event) => Poll::Ready(event),
            None => Poll::Pending,
        }
    }
}

pub struct Handler {
    peer: PeerId,
    relayed: bool,
    inbound: mpsc::Sender<(PeerId, Stream)>,
    /// Requests not yet handed to the connection.
    to_request: VecDeque<Reply>,
    /// Requests being negotiated; streams are interchangeable, so any result answers the oldest.
    in_flight: VecDeque<Reply>,
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Reply;
    type ToBehaviour = std::convert::Infallible;
    type InboundProtocol = ReadyUpgrade<StreamProtocol>;
    type OutboundProtocol = ReadyUpgrade<StreamProtocol>;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(ReadyUpgrade::new(PROTOCOL), ())
    }

    fn connection_keep_alive(&self) -> bool {
        !self.to_request.is_empty() || !self.in_flight.is_empty()
    }

    fn poll(
        &mut self,
        _cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, (), Self::ToBehaviour>> {
        match self.to_request.pop_front() {
            Some(reply) => {
                self.in_flight.push_back(reply);
                Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                    protocol: SubstreamProtocol::new(ReadyUpgrade::new(PROTOCOL), ()),
                })
            }
            None => Poll::Pending,
        }
    }

    fn on_behaviour_event(&mut self, reply: Reply) {
        self.to_request.push_back(reply);
    }

    fn on_connection_event(&mut self, event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol>) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound { protocol: stream, .. }) => {
                if self.inbound.try_send((self.peer, stream)).is_err() {
                    tracing::warn!(peer = %self.peer, "forward stream refused: {INBOUND_QUEUE} streams already waiting");
                }
            }
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound { protocol: stream, .. }) => {
                if let Some(reply) = self.in_flight.pop_front() {
                    let _ = reply.send(Ok((stream, self.relayed)));
                }
            }
            ConnectionEvent::DialUpgradeError(DialUpgradeError { error, .. }) => {
                if let Some(reply) = self.in_flight.pop_front() {
                    let _ = reply.send(Err(format!("the peer does not accept forwarded streams: {error}")));
                }
            }
            _ => {}
        }
    }
}
