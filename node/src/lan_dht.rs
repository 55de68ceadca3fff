//! The LAN DHT answers only peers that reach us on a private network, this host or the link.
//!
//! The LAN DHT holds the PeerIds and private addresses of the machines around us. Served to
//! anyone, a stranger connected from the internet could ask it for them and map the network
//! behind our NAT. So on a connection whose remote address is public (or relayed: the peer may
//! be anywhere) the LAN DHT refuses inbound streams, as a DHT client does; on every other
//! connection it serves as usual. Our own queries go out over any connection, as before (they
//! reach only peers the address policy put in the LAN routing table).
//!
//! A wrapper around libp2p's Kademlia behaviour: it dereferences to it, and changes only which
//! inbound protocol each connection's handler offers.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::task::{Context, Poll};

use libp2p::core::{Endpoint, transport::PortUse, upgrade::DeniedUpgrade};
use libp2p::swarm::handler::ConnectionEvent;
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm, NetworkBehaviour,
    SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId, kad};

use crate::addresses::{Cidr, Scope, is_relayed, scope_of};

type Kad = kad::Behaviour<kad::store::MemoryStore>;
type Inner = THandler<Kad>;
/// Kademlia's inbound protocol: its own, or refused (as a client offers it).
type Inbound = <Inner as ConnectionHandler>::InboundProtocol;

/// Whether a peer connected from `remote` may query the LAN DHT.
pub fn may_query(remote: &Multiaddr, public_ranges: &[Cidr]) -> bool {
    !is_relayed(remote) && scope_of(remote, public_ranges).is_some_and(|scope| scope != Scope::Public)
}

pub struct Behaviour {
    inner: Kad,
    public_ranges: Arc<[Cidr]>,
}

impl Behaviour {
    pub fn new(inner: Kad, public_ranges: Vec<Cidr>) -> Self {
        Self { inner, public_ranges: public_ranges.into() }
    }
}

impl Deref for Behaviour {
    type Target = Kad;
    fn deref(&self) -> &Kad {
        &self.inner
    }
}

impl DerefMut for Behaviour {
    fn deref_mut(&mut self) -> &mut Kad {
        &mut self.inner
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = kad::Event;

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
        let inner = self.inner.handle_established_inbound_connection(connection_id, peer, local_addr, remote_addr)?;
        Ok(Handler { inner, serves: may_query(remote_addr, &self.public_ranges) })
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
        let inner = self.inner.handle_established_outbound_connection(connection_id, peer, addr, role_override, port_use)?;
        Ok(Handler { inner, serves: may_query(addr, &self.public_ranges) })
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(&mut self, peer: PeerId, connection_id: ConnectionId, event: THandlerOutEvent<Self>) {
        self.inner.on_connection_handler_event(peer, connection_id, event);
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.inner.poll(cx)
    }
}

/// Kademlia's handler, offering the LAN DHT protocol to the peer only where it may query.
pub struct Handler {
    inner: Inner,
    serves: bool,
}

impl ConnectionHandler for Handler {
    type FromBehaviour = <Inner as ConnectionHandler>::FromBehaviour;
    type ToBehaviour = <Inner as ConnectionHandler>::ToBehaviour;
    type InboundProtocol = <Inner as ConnectionHandler>::InboundProtocol;
    type OutboundProtocol = <Inner as ConnectionHandler>::OutboundProtocol;
    type InboundOpenInfo = <Inner as ConnectionHandler>::InboundOpenInfo;
    type OutboundOpenInfo = <Inner as ConnectionHandler>::OutboundOpenInfo;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
        if self.serves { self.inner.listen_protocol() } else { SubstreamProtocol::new(Inbound::Right(DeniedUpgrade), ()) }
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
        self.inner.on_behaviour_event(event);
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol, Self::InboundOpenInfo, Self::OutboundOpenInfo>,
    ) {
        self.inner.on_connection_event(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_peers_on_a_private_network_this_host_or_the_link_may_query() {
        let ranges: Vec<Cidr> = vec!["203.0.113.0/24".parse().unwrap()];
        let may = |a: &str| may_query(&a.parse().unwrap(), &ranges);
        assert!(may("/ip4/192.168.1.7/udp/4001/quic-v1"));
        assert!(may("/ip4/10.0.0.2/tcp/4001"));
        assert!(may("/ip4/127.0.0.1/tcp/4001"));
        assert!(may("/ip6/fe80::1/udp/4001/quic-v1"));
        assert!(!may("/ip4/8.8.8.8/tcp/4001"), "the internet");
        assert!(!may("/ip4/203.0.113.5/tcp/4001"), "a range configured public");
        assert!(!may("/ip4/10.0.0.2/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit"), "relayed");
    }
}
