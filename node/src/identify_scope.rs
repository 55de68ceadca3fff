//! Identify, telling each peer only the addresses meant for where that peer is.
//!
//! libp2p's identify sends every peer all our listen and external addresses: loopback, a
//! container bridge, the home LAN's 192.168 address, to a stranger across the internet. The
//! address policy publishes a private address only where it is reachable (the LAN DHT, never the
//! WAN one); identify follows the same rule. An address is shown to a peer when its scope is at
//! least as wide as the scope the peer is connected to us on (see [`shown_to`]): public and
//! relayed addresses to everyone, private ones to peers on a private network, link-local ones to
//! peers on the link, loopback ones to peers on this host. A relayed connection counts as public:
//! the peer behind it may be anywhere.
//!
//! The wrapper hands libp2p's own identify handler the filtered set when a connection starts and
//! whenever our addresses change, so the protocol itself (and its standard id) is untouched.

use std::collections::HashSet;
use std::sync::Arc;
use std::task::{Context, Poll};

use libp2p::core::{Endpoint, transport::PortUse};
use libp2p::swarm::behaviour::{ExternalAddresses, ListenAddresses};
use libp2p::swarm::handler::ConnectionEvent;
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm, NetworkBehaviour,
    SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId, identify};

use crate::addresses::{Cidr, Scope, is_relayed, scope_of};

/// Whether an address of ours is shown to a peer connected on `peer_scope` (see module docs).
pub fn shown_to(addr: &Multiaddr, peer_scope: Scope, public_ranges: &[Cidr]) -> bool {
    if is_relayed(addr) {
        return true;
    }
    let width = |scope: Scope| match scope {
        Scope::Loopback => 0,
        Scope::LinkLocal => 1,
        Scope::Private => 2,
        Scope::Public => 3,
    };
    // Addresses without an IP (DNS names) are the operator's choice to announce.
    scope_of(addr, public_ranges).is_none_or(|scope| width(scope) >= width(peer_scope))
}

/// The scope a peer is connected to us on, judged by its address on the connection.
fn peer_scope(remote: &Multiaddr, public_ranges: &[Cidr]) -> Scope {
    if is_relayed(remote) {
        return Scope::Public;
    }
    scope_of(remote, public_ranges).unwrap_or(Scope::Public)
}

type Inner = THandler<identify::Behaviour>;
type InnerIn = THandlerInEvent<identify::Behaviour>;

pub struct Behaviour {
    inner: identify::Behaviour,
    public_ranges: Arc<[Cidr]>,
    listen: ListenAddresses,
    external: ExternalAddresses,
}

impl Behaviour {
    pub fn new(inner: identify::Behaviour, public_ranges: Vec<Cidr>) -> Self {
        Self { inner, public_ranges: public_ranges.into(), listen: Default::default(), external: Default::default() }
    }

    /// Everything identify would send (it does not hide listen addresses).
    fn all_addresses(&self) -> HashSet<Multiaddr> {
        self.listen.iter().chain(self.external.iter()).cloned().collect()
    }

    fn wrap(&self, mut inner: Inner, remote: &Multiaddr) -> Handler {
        let scope = peer_scope(remote, &self.public_ranges);
        inner.on_behaviour_event(InnerIn::AddressesChanged(filter(self.all_addresses(), scope, &self.public_ranges)));
        Handler { inner, scope, public_ranges: self.public_ranges.clone() }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = identify::Event;

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
        Ok(self.wrap(inner, remote_addr))
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
        Ok(self.wrap(inner, addr))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        self.listen.on_swarm_event(&event);
        self.external.on_swarm_event(&event);
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(&mut self, peer: PeerId, connection_id: ConnectionId, event: THandlerOutEvent<Self>) {
        self.inner.on_connection_handler_event(peer, connection_id, event);
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.inner.poll(cx)
    }
}

/// libp2p's identify handler, given only the addresses meant for its peer.
pub struct Handler {
    inner: Inner,
    scope: Scope,
    public_ranges: Arc<[Cidr]>,
}

fn filter(addrs: HashSet<Multiaddr>, scope: Scope, public_ranges: &[Cidr]) -> HashSet<Multiaddr> {
    addrs.into_iter().filter(|a| shown_to(a, scope, public_ranges)).collect()
}

impl ConnectionHandler for Handler {
    type FromBehaviour = <Inner as ConnectionHandler>::FromBehaviour;
    type ToBehaviour = <Inner as ConnectionHandler>::ToBehaviour;
    type InboundProtocol = <Inner as ConnectionHandler>::InboundProtocol;
    type OutboundProtocol = <Inner as ConnectionHandler>::OutboundProtocol;
    type InboundOpenInfo = <Inner as ConnectionHandler>::InboundOpenInfo;
    type OutboundOpenInfo = <Inner as ConnectionHandler>::OutboundOpenInfo;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
        self.inner.listen_protocol()
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
        let event = match event {
            InnerIn::AddressesChanged(addrs) => InnerIn::AddressesChanged(filter(addrs, self.scope, &self.public_ranges)),
            other => other,
        };
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

    fn ma(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn each_peer_sees_the_addresses_of_its_scope_and_wider() {
        let ours = [
            ma("/ip4/127.0.0.1/udp/4001/quic-v1"),
            ma("/ip4/169.254.3.4/udp/4001/quic-v1"),
            ma("/ip4/192.168.1.20/udp/4001/quic-v1"),
            ma("/ip4/172.17.0.1/tcp/4001"),
            ma("/ip4/203.0.113.9/udp/4001/quic-v1"),
            ma("/ip4/198.51.100.1/udp/4001/quic-v1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit"),
        ];
        // 203.0.113.0/24 is documentation space: configured public here, as the NAT lab does.
        let ranges = vec!["203.0.113.0/24".parse().unwrap(), "198.51.100.0/24".parse().unwrap()];
        let shown = |peer: &str| -> Vec<usize> {
            let scope = peer_scope(&ma(peer), &ranges);
            (0..ours.len()).filter(|i| shown_to(&ours[*i], scope, &ranges)).collect()
        };
        assert_eq!(shown("/ip4/203.0.113.50/udp/5000/quic-v1"), vec![4, 5], "a stranger on the internet");
        assert_eq!(shown("/ip4/198.51.100.1/udp/4001/quic-v1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit"), vec![4, 5], "a peer behind a relay");
        assert_eq!(shown("/ip4/192.168.1.30/tcp/4001"), vec![2, 3, 4, 5], "a LAN neighbour");
        assert_eq!(shown("/ip4/169.254.9.9/tcp/4001"), vec![1, 2, 3, 4, 5]);
        assert_eq!(shown("/ip4/127.0.0.1/tcp/4001"), vec![0, 1, 2, 3, 4, 5], "a node on this host");
    }
}
