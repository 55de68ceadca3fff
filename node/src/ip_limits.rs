//! A cap on direct inbound connections per source IP (per /64 for IPv6, where one host commonly
//! holds a whole prefix), refused before the handshake. Without it one host holding a thousand
//! throwaway identities fills `max_incoming_connections` and the file-descriptor table.
//! Relayed connections are left to the relay's own limits: their remote address is the relay.

use std::collections::HashMap;
use std::net::IpAddr;
use std::task::{Context, Poll};

use libp2p::{
    Multiaddr, PeerId,
    core::{Endpoint, transport::PortUse},
    swarm::{
        ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent, THandlerOutEvent,
        ToSwarm, dummy,
    },
};

use crate::addresses::{ip_of, is_relayed};

/// The part of an address a cap counts by: the IPv4 address, or the IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    V4([u8; 4]),
    V6Prefix([u8; 8]),
}

impl Source {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4.octets()),
                None => {
                    let mut prefix = [0u8; 8];
                    prefix.copy_from_slice(&v6.octets()[..8]);
                    Source::V6Prefix(prefix)
                }
            },
        }
    }
}

/// Counts direct inbound connections per [`Source`] and denies those over the cap.
pub struct Behaviour {
    max_per_source: usize,
    /// Pending and established inbound connections by source, and each connection's source.
    counts: HashMap<Source, usize>,
    sources: HashMap<ConnectionId, Source>,
}

/// The denial libp2p reports for a connection over the cap.
#[derive(Debug, thiserror::Error)]
#[error("{count} connections from {from:?} already (at most {max} per IP)")]
pub struct TooManyFromSource {
    from: Source,
    count: usize,
    max: usize,
}

impl Behaviour {
    pub fn new(max_per_source: usize) -> Self {
        Self { max_per_source, counts: HashMap::new(), sources: HashMap::new() }
    }

    fn release(&mut self, connection: ConnectionId) {
        if let Some(source) = self.sources.remove(&connection)
            && let Some(count) = self.counts.get_mut(&source)
        {
            *count -= 1;
            if *count == 0 {
                self.counts.remove(&source);
            }
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = std::convert::Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        connection: ConnectionId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        if is_relayed(local) || is_relayed(remote) {
            return Ok(());
        }
        let Some(ip) = ip_of(remote) else { return Ok(()) };
        if ip.is_loopback() {
            // Several nodes on one host (and the tests) are not a flood.
            return Ok(());
        }
        let source = Source::of(ip);
        let count = self.counts.entry(source).or_default();
        if *count >= self.max_per_source {
            return Err(ConnectionDenied::new(TooManyFromSource { from: source, count: *count, max: self.max_per_source }));
        }
        *count += 1;
        self.sources.insert(connection, source);
        Ok(())
    }

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
        match event {
            FromSwarm::ConnectionClosed(closed) => self.release(closed.connection_id),
            FromSwarm::ListenFailure(failed) => self.release(failed.connection_id),
            _ => {}
        }
    }

    fn on_connection_handler_event(&mut self, _: PeerId, _: ConnectionId, event: THandlerOutEvent<Self>) {
        libp2p::core::util::unreachable(event)
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ma(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn connections_over_the_cap_from_one_ip_or_one_ipv6_prefix_are_denied_and_freed_on_close() {
        let mut limits = Behaviour::new(2);
        let local = ma("/ip4/0.0.0.0/udp/4001/quic-v1");
        let from = |s: &str| ma(&format!("{s}/udp/5000/quic-v1"));
        let ids: Vec<ConnectionId> = (1..=6).map(ConnectionId::new_unchecked).collect();
        assert!(limits.handle_pending_inbound_connection(ids[0], &local, &from("/ip4/198.51.100.7")).is_ok());
        assert!(limits.handle_pending_inbound_connection(ids[1], &local, &from("/ip4/198.51.100.7")).is_ok());
        assert!(limits.handle_pending_inbound_connection(ids[2], &local, &from("/ip4/198.51.100.7")).is_err());
        assert!(limits.handle_pending_inbound_connection(ids[2], &local, &from("/ip4/198.51.100.8")).is_ok(), "another IP");
        // One /64 counts as one source; another /64 does not share its count.
        assert!(limits.handle_pending_inbound_connection(ids[3], &local, &from("/ip6/2001:db8:1:1::1")).is_ok());
        assert!(limits.handle_pending_inbound_connection(ids[4], &local, &from("/ip6/2001:db8:1:1::2")).is_ok());
        assert!(limits.handle_pending_inbound_connection(ids[5], &local, &from("/ip6/2001:db8:1:1:ffff::9")).is_err());
        assert!(limits.handle_pending_inbound_connection(ids[5], &local, &from("/ip6/2001:db8:1:2::1")).is_ok());
        // Closing one frees its place.
        limits.release(ids[0]);
        assert!(
            limits.handle_pending_inbound_connection(ConnectionId::new_unchecked(9), &local, &from("/ip4/198.51.100.7")).is_ok()
        );
    }

    #[test]
    fn loopback_and_relayed_connections_are_not_counted() {
        let mut limits = Behaviour::new(1);
        let local = ma("/ip4/0.0.0.0/tcp/4001");
        for i in 0..5 {
            let id = ConnectionId::new_unchecked(i);
            assert!(limits.handle_pending_inbound_connection(id, &local, &ma("/ip4/127.0.0.1/tcp/5000")).is_ok());
        }
        let circuit = ma("/ip4/198.51.100.1/udp/4001/quic-v1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit");
        for i in 10..15 {
            let id = ConnectionId::new_unchecked(i);
            assert!(limits.handle_pending_inbound_connection(id, &circuit, &ma("/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN")).is_ok());
        }
    }
}
