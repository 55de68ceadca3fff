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
//! A [`Scoped`] identify: libp2p's own handler is given the filtered set when a connection starts
//! and whenever our addresses change, so the protocol itself (and its standard id) is untouched.

use std::collections::HashSet;
use std::sync::Arc;

use libp2p::swarm::behaviour::{ExternalAddresses, ListenAddresses};
use libp2p::swarm::{FromSwarm, THandler, THandlerInEvent};
use libp2p::{Multiaddr, identify};

use crate::addresses::{Cidr, Scope, is_relayed, peer_scope, scope_of};
use crate::scoped::{Adjust, Scoped};

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

fn filter(addrs: HashSet<Multiaddr>, scope: Scope, public_ranges: &[Cidr]) -> HashSet<Multiaddr> {
    addrs.into_iter().filter(|a| shown_to(a, scope, public_ranges)).collect()
}

/// libp2p's identify, adjusted per connection as the module docs say.
pub type Behaviour = Scoped<identify::Behaviour, ByScope>;

pub fn new(inner: identify::Behaviour, public_ranges: Vec<Cidr>) -> Behaviour {
    Scoped::new(
        inner,
        ByScope { public_ranges: public_ranges.into(), listen: Default::default(), external: Default::default() },
    )
}

/// Our addresses as identify knows them, to filter per connection.
pub struct ByScope {
    public_ranges: Arc<[Cidr]>,
    listen: ListenAddresses,
    external: ExternalAddresses,
}

type In = THandlerInEvent<identify::Behaviour>;

impl Adjust<identify::Behaviour> for ByScope {
    /// The peer's scope, and the ranges that count as public.
    type Conn = (Scope, Arc<[Cidr]>);

    fn connection(&self, remote: &Multiaddr, handler: &mut THandler<identify::Behaviour>) -> Self::Conn {
        use libp2p::swarm::ConnectionHandler as _;
        let scope = peer_scope(remote, &self.public_ranges);
        // Everything identify would send (it does not hide listen addresses), filtered, before
        // the handler answers its first request.
        let all: HashSet<Multiaddr> = self.listen.iter().chain(self.external.iter()).cloned().collect();
        handler.on_behaviour_event(In::AddressesChanged(filter(all, scope, &self.public_ranges)));
        (scope, self.public_ranges.clone())
    }

    fn to_handler((scope, public_ranges): &Self::Conn, event: In) -> In {
        match event {
            In::AddressesChanged(addrs) => In::AddressesChanged(filter(addrs, *scope, public_ranges)),
            other => other,
        }
    }

    fn on_swarm_event(&mut self, event: &FromSwarm) {
        self.listen.on_swarm_event(event);
        self.external.on_swarm_event(event);
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
