//! One address policy: what counts as public, which addresses of a remote peer are dialed,
//! stored and given to each DHT, and which addresses are our own.
//!
//! Addresses fall into scopes: loopback (this host), link-local and private (a LAN, a VPN, a
//! data centre; every non-global range, documentation ranges included unless configured public)
//! and public. A peer's public addresses are used as anyone would. Its loopback, link-local and
//! private addresses name a place only relative to where the peer is, so they are used only where
//! there is evidence that they lead to the same place from here:
//! - the peer was seen on that scope: it connected to us (or we to it) over an address of that
//!   scope, or mDNS found it on our LAN, or an address of that scope worked before (persisted in
//!   the peer store);
//! - or our node is in that scope: a bootstrap peer the operator gave us, or a direct connection
//!   open now, is on an address of that scope (several nodes on one host, a private network).
//!
//! And whoever claims it, an address that is one of our own listen or external addresses is
//! never dialed: on a host where every node listens on port 4001, a peer's `127.0.0.1:4001`
//! leads back to ourselves.
//!
//! What goes where:
//! - the WAN DHT (the configured Kademlia protocol) gets public addresses only;
//! - the LAN DHT ([`lan_kad_protocol`]) gets non-public addresses the peer was seen on;
//! - the peer store keeps public and relayed addresses as heard, non-public ones only once the
//!   peer was seen on their scope;
//! - dials go through [`crate::dial_gate`], which asks [`Policy::may_dial`] for every address,
//!   whoever supplied it (Kademlia, mDNS, identify, relay, a stored record).
//!
//! The policy is sans-IO: it is told about listeners, connections and bootstrap peers, and
//! answers questions; unit tests drive it without a network.
//!
//! [`scope`] holds what can be said of one address alone (scope, IP, port, relayed, transport).

mod scope;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use libp2p::{Multiaddr, PeerId};

pub use scope::*;
pub(crate) use scope::{Port, endpoint_of};
use scope::ip_scope;

/// Peers whose scopes the policy remembers at most; beyond it the oldest-known are forgotten
/// (they are still stored in the peer store, whose own bound is `max_stored_peers`).
pub const MAX_SEEN_PEERS: usize = 8192;

/// Why an address is not dialed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The address is one of ours: dialing it reaches this node, not the peer.
    #[error("{0} is one of this node's own addresses")]
    Own(Multiaddr),
    /// A non-public address of a peer never seen on that scope, while we are not in it.
    #[error("{0} is a {1:?} address and nothing shows it leads to that peer from here")]
    OutOfScope(Multiaddr, Scope),
}

/// The address policy's state: our own addresses, the scopes we are in, and the scopes each
/// peer was seen on.
#[derive(Debug, Default)]
pub struct Policy {
    public_ranges: Vec<Cidr>,
    /// Our listen addresses as the listeners report them (wildcards expanded to each interface).
    listening: HashSet<(IpAddr, Port)>,
    /// Our confirmed external addresses (a NAT's mapping of ours): matched exactly, since
    /// another host behind the same NAT has the same IP with another port.
    external: HashSet<(IpAddr, Port)>,
    /// Ports we listen on for every IP of a family (`0.0.0.0`, `::`): the family is `true` for
    /// IPv6. A loopback IP, or an interface IP we listen on now, with such a port is us, even
    /// before the listener reports its addresses.
    own_wildcard: HashSet<(bool, Port)>,
    /// Scopes of the bootstrap peers the operator configured.
    configured: Scopes,
    /// Direct connections open now, per scope.
    live: HashMap<Scope, usize>,
    /// Scopes each peer was seen on.
    seen: HashMap<PeerId, Scopes>,
}

impl Policy {
    pub fn new(public_ranges: Vec<Cidr>, bootstrap: &[Multiaddr], listen: &[Multiaddr]) -> Self {
        let mut policy = Policy { public_ranges, ..Default::default() };
        for addr in bootstrap {
            if let Some(scope) = scope_of(addr, &policy.public_ranges) {
                policy.configured.insert(scope);
                if let Some(peer) = peer_of(addr) {
                    policy.note_seen(peer, scope);
                }
            }
        }
        for addr in listen {
            if let Some((ip, port)) = endpoint_of(addr)
                && ip.is_unspecified()
                && !matches!(port, Port::Tcp(0) | Port::Udp(0))
            {
                policy.own_wildcard.insert((ip.is_ipv6(), port));
            }
        }
        policy
    }

    pub fn public_ranges(&self) -> &[Cidr] {
        &self.public_ranges
    }

    pub fn scope(&self, addr: &Multiaddr) -> Option<Scope> {
        scope_of(addr, &self.public_ranges)
    }

    pub fn is_public(&self, addr: &Multiaddr) -> bool {
        self.scope(addr) == Some(Scope::Public)
    }

    /// A listener reported an address (`open`) or withdrew it. Relayed listen addresses name
    /// the relay's IP and port, not ours, and are ignored.
    pub fn on_listen_addr(&mut self, addr: &Multiaddr, open: bool) {
        if is_relayed(addr) {
            return;
        }
        if let Some((ip, port)) = endpoint_of(addr) {
            match (ip.is_unspecified(), open) {
                (true, true) => {
                    self.own_wildcard.insert((ip.is_ipv6(), port));
                }
                (true, false) => {}
                (false, true) => {
                    self.listening.insert((ip, port));
                }
                (false, false) => {
                    self.listening.remove(&(ip, port));
                }
            }
        }
    }

    /// An external address of ours was confirmed (`open`) or expired. A relayed one (our
    /// reservation's circuit address) names the relay and is ignored.
    pub fn on_external_addr(&mut self, addr: &Multiaddr, open: bool) {
        if is_relayed(addr) {
            return;
        }
        if let Some(endpoint) = endpoint_of(addr) {
            if open {
                self.external.insert(endpoint);
            } else {
                self.external.remove(&endpoint);
            }
        }
    }

    pub fn is_own(&self, addr: &Multiaddr) -> bool {
        let Some((ip, port)) = endpoint_of(addr) else { return false };
        if is_relayed(addr) {
            return false;
        }
        self.listening.contains(&(ip, port))
            || self.external.contains(&(ip, port))
            || (self.own_wildcard.contains(&(ip.is_ipv6(), port))
                && (ip.is_loopback() || self.listening.iter().any(|(own, _)| *own == ip)))
    }

    /// Whether we listen on an address of `scope` now.
    fn listens_in(&self, scope: Scope) -> bool {
        self.listening.iter().any(|(ip, _)| ip_scope(*ip, &self.public_ranges) == scope)
    }

    /// The peer was seen on `scope` (connected over it, or found there by mDNS).
    pub fn note_seen(&mut self, peer: PeerId, scope: Scope) {
        if self.seen.len() >= MAX_SEEN_PEERS && !self.seen.contains_key(&peer) {
            // Forget an arbitrary peer: its evidence is also in the peer store if it mattered.
            if let Some(victim) = self.seen.keys().next().copied() {
                self.seen.remove(&victim);
            }
        }
        self.seen.entry(peer).or_default().insert(scope);
    }

    /// Scopes known for a peer from its stored record (addresses that worked before).
    pub fn seed(&mut self, peer: PeerId, scopes: Scopes) {
        for scope in [Scope::Loopback, Scope::LinkLocal, Scope::Private, Scope::Public] {
            if scopes.contains(scope) {
                self.note_seen(peer, scope);
            }
        }
    }

    pub fn seen_on(&self, peer: &PeerId) -> Scopes {
        self.seen.get(peer).copied().unwrap_or_default()
    }

    /// A direct connection over `addr` opened (`true`) or closed.
    pub fn on_connection(&mut self, peer: PeerId, addr: &Multiaddr, open: bool) {
        let Some(scope) = self.scope(addr) else { return };
        let count = self.live.entry(scope).or_default();
        if open {
            *count += 1;
            self.note_seen(peer, scope);
        } else {
            *count = count.saturating_sub(1);
        }
    }

    /// Whether this node is itself in `scope`: a bootstrap peer there, or a connection open now
    /// on it while we listen on it too (a public server that took one connection from a private
    /// address, through a container's proxy say, is not on that network).
    fn in_scope(&self, scope: Scope) -> bool {
        self.configured.contains(scope) || (self.live.get(&scope).is_some_and(|n| *n > 0) && self.listens_in(scope))
    }

    /// Whether `addr` (naming its peer in `/p2p/`, or `peer`) may be dialed.
    pub fn may_dial(&self, peer: Option<PeerId>, addr: &Multiaddr) -> Result<(), Refusal> {
        if is_relayed(addr) {
            return Ok(());
        }
        if self.is_own(addr) {
            return Err(Refusal::Own(addr.clone()));
        }
        match self.scope(addr) {
            None | Some(Scope::Public) => Ok(()),
            Some(scope) => {
                let peer = peer.or_else(|| peer_of(addr));
                let seen = peer.is_some_and(|p| self.seen_on(&p).contains(scope));
                if seen || self.in_scope(scope) {
                    Ok(())
                } else {
                    Err(Refusal::OutOfScope(addr.clone(), scope))
                }
            }
        }
    }

    /// Whether a peer's address is worth keeping in the peer store.
    pub fn may_store(&self, peer: &PeerId, addr: &Multiaddr) -> bool {
        if is_unspecified(addr) || self.is_own(addr) {
            return false;
        }
        match self.scope(addr) {
            None | Some(Scope::Public) => true,
            Some(scope) => self.seen_on(peer).contains(scope),
        }
    }

    /// Whether a peer's address belongs in the WAN DHT: public only.
    pub fn for_wan_dht(&self, addr: &Multiaddr) -> bool {
        self.is_public(addr) && !self.is_own(addr)
    }

    /// Whether a peer's address belongs in the LAN DHT: non-public, on a scope the peer was seen on.
    pub fn for_lan_dht(&self, peer: &PeerId, addr: &Multiaddr) -> bool {
        match self.scope(addr) {
            None | Some(Scope::Public) => false,
            Some(scope) => !is_unspecified(addr) && !self.is_own(addr) && self.seen_on(peer).contains(scope),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ma(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    fn default_listen() -> Vec<Multiaddr> {
        crate::config::default_listen_addrs()
    }

    #[test]
    fn a_dial_keeps_one_relayed_address_per_relay_it_is_connected_to() {
        let (r1, r2, b) = (PeerId::random(), PeerId::random(), PeerId::random());
        let quic = |r: PeerId| ma(&format!("/ip4/203.0.113.1/udp/4001/quic-v1/p2p/{r}/p2p-circuit/p2p/{b}"));
        let tcp = |r: PeerId| ma(&format!("/ip4/203.0.113.1/tcp/4001/p2p/{r}/p2p-circuit/p2p/{b}"));
        let direct = ma("/ip4/198.51.100.7/udp/4001/quic-v1");
        assert_eq!(relay_of(&quic(r1)), Some(r1));
        assert_eq!(relay_of(&direct), None);
        let addrs = vec![quic(r1), tcp(r1), quic(r2), tcp(r2), direct.clone()];
        // Connected to r1: its second address would only open a second circuit there. Not
        // connected to r2: which of its transports reaches it is not known, both are kept.
        let kept = one_circuit_per_connected_relay(addrs, |r| *r == r1);
        assert_eq!(kept, vec![quic(r1), quic(r2), tcp(r2), direct]);
    }

    #[test]
    fn cidr_ranges_match_by_prefix() {
        let r: Cidr = "203.0.113.0/24".parse().unwrap();
        assert!(r.contains("203.0.113.77".parse().unwrap()));
        assert!(!r.contains("203.0.114.1".parse().unwrap()));
        let r: Cidr = "10.0.0.0/9".parse().unwrap();
        assert!(r.contains("10.127.0.1".parse().unwrap()));
        assert!(!r.contains("10.128.0.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("banana".parse::<Cidr>().is_err());
    }

    #[test]
    fn documentation_ranges_are_public_only_when_configured() {
        let ip = "198.51.100.4".parse().unwrap();
        assert!(!is_public_ip(ip, &[]));
        assert!(is_public_ip(ip, &["198.51.100.0/24".parse().unwrap()]));
        assert!(is_public_ip("8.8.8.8".parse().unwrap(), &[]));
        assert!(!is_public_ip("192.168.1.1".parse().unwrap(), &[]));
        assert!(!is_public_ip("100.64.1.1".parse().unwrap(), &[]));
    }


    #[test]
    fn scopes_are_told_apart() {
        let none: &[Cidr] = &[];
        assert_eq!(scope_of(&ma("/ip4/127.0.0.1/tcp/1"), none), Some(Scope::Loopback));
        assert_eq!(scope_of(&ma("/ip6/::1/udp/1/quic-v1"), none), Some(Scope::Loopback));
        assert_eq!(scope_of(&ma("/ip4/169.254.3.4/tcp/1"), none), Some(Scope::LinkLocal));
        assert_eq!(scope_of(&ma("/ip6/fe80::1/tcp/1"), none), Some(Scope::LinkLocal));
        assert_eq!(scope_of(&ma("/ip4/10.1.2.3/tcp/1"), none), Some(Scope::Private));
        assert_eq!(scope_of(&ma("/ip4/192.0.2.3/tcp/1"), none), Some(Scope::Private));
        assert_eq!(scope_of(&ma("/ip6/fd00::5/tcp/1"), none), Some(Scope::Private));
        assert_eq!(scope_of(&ma("/ip4/8.8.8.8/tcp/1"), none), Some(Scope::Public));
        assert_eq!(scope_of(&ma("/ip4/192.0.2.3/tcp/1"), &["192.0.2.0/24".parse().unwrap()]), Some(Scope::Public));
        assert_eq!(scope_of(&ma("/dns4/example.org/tcp/1"), none), None);
        let relayed = ma("/ip4/8.8.8.8/tcp/1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit");
        assert_eq!(scope_of(&relayed, none), None);
    }

    #[test]
    fn the_lan_dht_protocol_is_derived_like_kubos() {
        assert_eq!(lan_kad_protocol("/ipfs/kad/1.0.0"), "/ipfs/lan/kad/1.0.0");
        assert_eq!(lan_kad_protocol("/warren/kad/1.0.0"), "/warren/lan/kad/1.0.0");
        assert_eq!(lan_kad_protocol("/odd"), "/odd/lan");
    }

    #[test]
    fn our_own_addresses_are_never_dialed_even_before_the_listeners_report() {
        let peer = PeerId::random();
        let bootstrap = [ma(&format!("/ip4/127.0.0.1/tcp/4002/p2p/{peer}")), ma(&format!("/ip4/10.0.0.1/tcp/4001/p2p/{peer}"))];
        let mut policy = Policy::new(vec![], &bootstrap, &default_listen());
        // Every node on the host listens on 4001: a peer's 127.0.0.1:4001 is us.
        let own = ma(&format!("/ip4/127.0.0.1/tcp/4001/p2p/{peer}"));
        assert_eq!(policy.may_dial(None, &own), Err(Refusal::Own(own.clone())));
        assert!(policy.may_dial(None, &ma("/ip4/127.0.0.1/tcp/4002")).is_ok(), "another port on this host is another node");
        // Once the listener reports the LAN address it expanded to, that address is ours too.
        assert!(policy.may_dial(Some(peer), &ma("/ip4/10.0.0.7/udp/4001/quic-v1")).is_ok());
        policy.on_listen_addr(&ma("/ip4/10.0.0.7/udp/4001/quic-v1"), true);
        assert!(policy.may_dial(Some(peer), &ma("/ip4/10.0.0.7/udp/4001/quic-v1")).is_err());
        // An external address (a NAT's public mapping of ours) is ours as well, exactly: another
        // host behind the same NAT has the same IP with another port.
        policy.on_external_addr(&ma("/ip4/8.8.4.4/udp/4002/quic-v1"), true);
        assert!(policy.is_own(&ma("/ip4/8.8.4.4/udp/4002/quic-v1")));
        assert!(!policy.for_wan_dht(&ma("/ip4/8.8.4.4/udp/4002/quic-v1")));
        assert!(!policy.is_own(&ma("/ip4/8.8.4.4/udp/4001/quic-v1")), "our NAT's IP on our listen port is a neighbour");
        // A relay reservation's circuit address names the relay, not us.
        let relay = PeerId::random();
        let circuit = ma(&format!("/ip4/8.8.8.8/tcp/4001/p2p/{relay}/p2p-circuit"));
        policy.on_listen_addr(&circuit, true);
        policy.on_external_addr(&circuit, true);
        assert!(!policy.is_own(&ma("/ip4/8.8.8.8/tcp/4001")), "the relay stays dialable");
        // A listener that goes away takes its addresses with it.
        policy.on_listen_addr(&ma("/ip4/10.0.0.7/udp/4001/quic-v1"), false);
        assert!(policy.may_dial(Some(peer), &ma("/ip4/10.0.0.7/udp/4001/quic-v1")).is_ok());
    }

    #[test]
    fn a_peers_loopback_address_needs_evidence_of_the_same_host() {
        let lan_peer = PeerId::random();
        let bootstrap = ma(&format!("/ip4/10.0.0.1/udp/4001/quic-v1/p2p/{lan_peer}"));
        let mut policy = Policy::new(vec![], &[bootstrap], &[ma("/ip4/0.0.0.0/udp/0/quic-v1")]);
        let other = PeerId::random();
        let loopback = ma("/ip4/127.0.0.1/tcp/4001");
        let lan = ma("/ip4/10.0.0.9/tcp/4001");
        // We are on the private network (our bootstrap peer is there), not on their host.
        assert!(matches!(policy.may_dial(Some(other), &loopback), Err(Refusal::OutOfScope(_, Scope::Loopback))));
        assert!(policy.may_dial(Some(other), &lan).is_ok());
        assert!(!policy.may_store(&other, &loopback));
        assert!(!policy.may_store(&other, &lan), "private addresses are stored once the peer was seen there");
        assert!(!policy.for_lan_dht(&other, &lan));
        // The peer connects to us over the LAN: its LAN addresses are now good, loopback still not.
        policy.on_connection(other, &ma("/ip4/10.0.0.9/tcp/51234"), true);
        assert!(policy.may_store(&other, &lan));
        assert!(policy.for_lan_dht(&other, &lan));
        assert!(!policy.for_wan_dht(&lan));
        assert!(!policy.may_store(&other, &loopback));
        assert!(policy.may_dial(Some(other), &loopback).is_err());
    }

    #[test]
    fn being_on_a_scope_opens_it_only_while_a_connection_is_there() {
        let mut policy = Policy::new(vec![], &[], &[]);
        policy.on_listen_addr(&ma("/ip4/192.168.1.5/udp/4001/quic-v1"), true);
        let (a, b) = (PeerId::random(), PeerId::random());
        let b_lan = ma("/ip4/192.168.1.20/udp/4001/quic-v1");
        assert!(policy.may_dial(Some(b), &b_lan).is_err());
        policy.on_connection(a, &ma("/ip4/192.168.1.10/udp/4001/quic-v1"), true);
        assert!(policy.may_dial(Some(b), &b_lan).is_ok(), "a peer on our LAN makes LAN addresses worth a try");
        policy.on_connection(a, &ma("/ip4/192.168.1.10/udp/4001/quic-v1"), false);
        assert!(policy.may_dial(Some(b), &b_lan).is_err());
        // a was seen there, and keeps that evidence.
        assert!(policy.may_dial(Some(a), &ma("/ip4/192.168.1.10/udp/4001/quic-v1")).is_ok());
    }

    #[test]
    fn a_public_server_with_one_private_connection_is_not_on_that_network() {
        let mut policy = Policy::new(vec![], &[], &[]);
        policy.on_listen_addr(&ma("/ip4/8.8.8.8/udp/4001/quic-v1"), true);
        policy.on_connection(PeerId::random(), &ma("/ip4/172.17.0.2/tcp/50000"), true);
        let fake = ma("/ip4/192.168.7.7/tcp/22");
        assert!(matches!(policy.may_dial(Some(PeerId::random()), &fake), Err(Refusal::OutOfScope(_, Scope::Private))));
    }

    #[test]
    fn public_and_relayed_addresses_are_always_dialable_and_stored() {
        let policy = Policy::new(vec![], &[], &[]);
        let peer = PeerId::random();
        let public = ma("/ip4/8.8.8.8/udp/4001/quic-v1");
        let relayed = ma(&format!("/ip4/10.0.0.1/tcp/4001/p2p/{peer}/p2p-circuit"));
        assert!(policy.may_dial(Some(peer), &public).is_ok());
        assert!(policy.may_dial(Some(peer), &relayed).is_ok());
        assert!(policy.may_store(&peer, &public));
        assert!(policy.may_store(&peer, &relayed));
        assert!(policy.for_wan_dht(&public));
        assert!(!policy.for_lan_dht(&peer, &public));
        assert!(!policy.may_store(&peer, &ma("/ip4/0.0.0.0/tcp/4001")));
    }

    #[test]
    fn only_the_trailing_peer_id_is_taken_off() {
        let (relay, peer) = (PeerId::random(), PeerId::random());
        let circuit = ma(&format!("/ip4/8.8.8.8/tcp/4001/p2p/{relay}/p2p-circuit"));
        assert_eq!(without_p2p(&circuit.clone().with(libp2p::multiaddr::Protocol::P2p(peer))), circuit, "the relay's id stays");
        assert_eq!(without_p2p(&ma(&format!("/ip4/8.8.8.8/tcp/4001/p2p/{relay}"))), ma("/ip4/8.8.8.8/tcp/4001"));
        assert_eq!(without_p2p(&ma("/ip4/8.8.8.8/tcp/4001")), ma("/ip4/8.8.8.8/tcp/4001"));
    }

    #[test]
    fn the_seen_table_stays_bounded() {
        let mut policy = Policy::new(vec![], &[], &[]);
        for _ in 0..MAX_SEEN_PEERS + 10 {
            policy.note_seen(PeerId::random(), Scope::Private);
        }
        assert_eq!(policy.seen.len(), MAX_SEEN_PEERS);
    }
}
