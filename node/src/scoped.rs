//! A libp2p behaviour whose connection handlers are adjusted to where each peer is connected
//! from: the mechanism behind [`crate::identify_scope`] (what identify tells a peer) and
//! [`crate::lan_dht`] (who may query the LAN DHT). The wrapped behaviour runs unchanged and is
//! reachable through `Deref`; an [`Adjust`] decides, once per connection from the peer's address,
//! what its handler keeps, and may then rewrite what the behaviour sends the handler and which
//! inbound protocol the handler offers.

use std::ops::{Deref, DerefMut};
use std::task::{Context, Poll};

use libp2p::core::{Endpoint, transport::PortUse};
use libp2p::swarm::handler::ConnectionEvent;
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm, NetworkBehaviour,
    SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

type Inbound<B> = <THandler<B> as ConnectionHandler>::InboundProtocol;
type InboundInfo<B> = <THandler<B> as ConnectionHandler>::InboundOpenInfo;

/// How a [`Scoped`] behaviour adjusts each connection's handler.
pub trait Adjust<B: NetworkBehaviour>: Send + 'static {
    /// What one connection's handler keeps, decided when the connection is established.
    type Conn: Send + 'static;

    /// Decides for a new connection to a peer at `remote`; may send the fresh handler events.
    fn connection(&self, remote: &Multiaddr, handler: &mut THandler<B>) -> Self::Conn;

    /// The inbound protocol the handler offers (by default, the wrapped handler's own).
    fn listen_protocol(_conn: &Self::Conn, handler: &THandler<B>) -> SubstreamProtocol<Inbound<B>, InboundInfo<B>> {
        handler.listen_protocol()
    }

    /// Rewrites what the behaviour sends a handler (by default, nothing).
    fn to_handler(_conn: &Self::Conn, event: THandlerInEvent<B>) -> THandlerInEvent<B> {
        event
    }

    /// Sees every swarm event before the wrapped behaviour does.
    fn on_swarm_event(&mut self, _event: &FromSwarm) {}
}

pub struct Scoped<B, A> {
    inner: B,
    adjust: A,
}

impl<B, A> Scoped<B, A> {
    pub fn new(inner: B, adjust: A) -> Self {
        Self { inner, adjust }
    }
}

impl<B, A> Deref for Scoped<B, A> {
    type Target = B;
    fn deref(&self) -> &B {
        &self.inner
    }
}

impl<B, A> DerefMut for Scoped<B, A> {
    fn deref_mut(&mut self) -> &mut B {
        &mut self.inner
    }
}

impl<B: NetworkBehaviour, A: Adjust<B>> NetworkBehaviour for Scoped<B, A> {
    type ConnectionHandler = Handler<B, A>;
    type ToSwarm = B::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner.handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let mut inner = self.inner.handle_established_inbound_connection(connection_id, peer, local_addr, remote_addr)?;
        let conn = self.adjust.connection(remote_addr, &mut inner);
        Ok(Handler { inner, conn })
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner.handle_pending_outbound_connection(connection_id, maybe_peer, addresses, effective_role)
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let mut inner = self.inner.handle_established_outbound_connection(connection_id, peer, addr, role_override, port_use)?;
        let conn = self.adjust.connection(addr, &mut inner);
        Ok(Handler { inner, conn })
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        self.adjust.on_swarm_event(&event);
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(&mut self, peer: PeerId, connection_id: ConnectionId, event: THandlerOutEvent<Self>) {
        self.inner.on_connection_handler_event(peer, connection_id, event);
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.inner.poll(cx)
    }
}

/// The wrapped behaviour's handler, with what its [`Adjust`] decided for the connection.
pub struct Handler<B: NetworkBehaviour, A: Adjust<B>> {
    inner: THandler<B>,
    conn: A::Conn,
}

impl<B: NetworkBehaviour, A: Adjust<B>> ConnectionHandler for Handler<B, A> {
    type FromBehaviour = <THandler<B> as ConnectionHandler>::FromBehaviour;
    type ToBehaviour = <THandler<B> as ConnectionHandler>::ToBehaviour;
    type InboundProtocol = Inbound<B>;
    type OutboundProtocol = <THandler<B> as ConnectionHandler>::OutboundProtocol;
    type InboundOpenInfo = InboundInfo<B>;
    type OutboundOpenInfo = <THandler<B> as ConnectionHandler>::OutboundOpenInfo;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
        A::listen_protocol(&self.conn, &self.inner)
    }

    fn connection_keep_alive(&self) -> bool {
        self.inner.connection_keep_alive()
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>> {
        self.inner.poll(cx)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Option<Self::ToBehaviour>> {
        self.inner.poll_close(cx)
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        self.inner.on_behaviour_event(A::to_handler(&self.conn, event));
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol, Self::InboundOpenInfo, Self::OutboundOpenInfo>,
    ) {
        self.inner.on_connection_event(event);
    }
}
