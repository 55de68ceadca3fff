//! Listen addresses on public IPs become external address *candidates*, for AutoNAT to test.
//!
//! libp2p learns candidates only from what peers observe, so a public node whose first
//! connections all ran over TCP never had its QUIC address tested, confirmed or advertised (a
//! relay then offered circuits over TCP only, and hole punching lost QUIC). A listen address on a
//! public IP (globally routable, or in `public_ranges`) is a fair guess; AutoNAT v2 still has a
//! peer dial it back before it is confirmed.

use std::collections::VecDeque;
use std::task::{Context, Poll};

use libp2p::core::{Endpoint, transport::PortUse};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
    dummy,
};
use libp2p::{Multiaddr, PeerId};

use crate::addresses::{Cidr, is_public_addr};

pub struct Behaviour {
    public_ranges: Vec<Cidr>,
    pending: VecDeque<Multiaddr>,
}

impl Behaviour {
    pub fn new(public_ranges: Vec<Cidr>) -> Self {
        Behaviour { public_ranges, pending: VecDeque::new() }
    }

    /// Proposes an address found otherwise (a port the gateway mapped for us) for AutoNAT to test.
    pub fn propose(&mut self, addr: Multiaddr) {
        self.pending.push_back(addr);
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = std::convert::Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::NewListenAddr(new) = event
            && is_public_addr(new.addr, &self.public_ranges)
        {
            self.pending.push_back(new.addr.clone());
        }
    }

    fn on_connection_handler_event(&mut self, _: PeerId, _: ConnectionId, event: THandlerOutEvent<Self>) {
        libp2p::core::util::unreachable(event)
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        match self.pending.pop_front() {
            Some(addr) => Poll::Ready(ToSwarm::NewExternalAddrCandidate(addr)),
            None => Poll::Pending,
        }
    }
}
