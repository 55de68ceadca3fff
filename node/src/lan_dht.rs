//! The LAN DHT answers only peers that reach us on a private network, this host or the link.
//!
//! The LAN DHT holds the PeerIds and private addresses of the machines around us. Served to
//! anyone, a stranger connected from the internet could ask it for them and map the network
//! behind our NAT. So on a connection whose remote address is public (or relayed: the peer may
//! be anywhere) the LAN DHT refuses inbound streams, as a DHT client does; on every other
//! connection it serves as usual. Our own queries go out over any connection, as before (they
//! reach only peers the address policy put in the LAN routing table).
//!
//! A [`Scoped`] Kademlia: it dereferences to libp2p's behaviour, and changes only which inbound
//! protocol each connection's handler offers.

use libp2p::core::upgrade::DeniedUpgrade;
use libp2p::swarm::{ConnectionHandler, SubstreamProtocol, THandler};
use libp2p::{Multiaddr, kad};

use crate::addresses::{Cidr, Scope, peer_scope};
use crate::scoped::{Adjust, Scoped};

type Kad = kad::Behaviour<kad::store::MemoryStore>;
type Inbound = <THandler<Kad> as ConnectionHandler>::InboundProtocol;

/// Whether a peer connected from `remote` may query the LAN DHT.
pub fn may_query(remote: &Multiaddr, public_ranges: &[Cidr]) -> bool {
    peer_scope(remote, public_ranges) != Scope::Public
}

/// The LAN DHT: Kademlia, serving only where [`may_query`] allows.
pub type Behaviour = Scoped<Kad, LanOnly>;

pub fn new(inner: Kad, public_ranges: Vec<Cidr>) -> Behaviour {
    Scoped::new(inner, LanOnly { public_ranges })
}

pub struct LanOnly {
    public_ranges: Vec<Cidr>,
}

impl Adjust<Kad> for LanOnly {
    /// Whether this connection's peer may query.
    type Conn = bool;

    fn connection(&self, remote: &Multiaddr, _: &mut THandler<Kad>) -> bool {
        may_query(remote, &self.public_ranges)
    }

    fn listen_protocol(serves: &bool, handler: &THandler<Kad>) -> SubstreamProtocol<Inbound, ()> {
        // Refused the way a DHT client refuses: Kademlia's own "no inbound" upgrade.
        if *serves { handler.listen_protocol() } else { SubstreamProtocol::new(Inbound::Right(DeniedUpgrade), ()) }
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
