//! Port mapping (see [`crate::port_mapping`]): which of our ports the mapping task should keep
//! mapped, and what it reports: a mapped address becomes an external address *candidate*, for
//! AutoNAT to confirm; a lost one stops being an external address.

use std::collections::HashMap;

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use tokio::sync::{mpsc, watch};

use super::EventLoop;
use crate::addresses::is_relayed;
use crate::port_mapping::{Event, Mapping, Transport};

/// The event loop's side of the mapping task.
pub(super) struct Link {
    ports: watch::Sender<Vec<(Transport, u16)>>,
    pub(super) events: mpsc::Receiver<Event>,
    pub(super) mapped: HashMap<(Transport, u16), Mapping>,
    /// Why the last attempt got no mapping.
    pub(super) last_error: Option<String>,
}

impl Link {
    pub(super) fn new(ports: watch::Sender<Vec<(Transport, u16)>>, events: mpsc::Receiver<Event>) -> Self {
        Self { ports, events, mapped: HashMap::new(), last_error: None }
    }
}

/// The IPv4 ports worth mapping among our listen addresses: QUIC's UDP port and the TCP port of
/// each non-loopback listener (a gateway forwards only to its LAN).
pub(super) fn ports_to_map(listen: &[Multiaddr]) -> Vec<(Transport, u16)> {
    let mut out = Vec::new();
    for addr in listen.iter().filter(|a| !is_relayed(a)) {
        let mut parts = addr.iter();
        let Some(Protocol::Ip4(ip)) = parts.next() else { continue };
        if ip.is_loopback() || ip.is_link_local() {
            continue;
        }
        let port = match (parts.next(), parts.next()) {
            (Some(Protocol::Udp(port)), Some(Protocol::QuicV1)) => (Transport::Udp, port),
            (Some(Protocol::Tcp(port)), None) => (Transport::Tcp, port),
            _ => continue,
        };
        if !out.contains(&port) {
            out.push(port);
        }
    }
    out
}

/// The multiaddr peers reach a mapping at.
pub(super) fn external_addr(mapping: &Mapping) -> Multiaddr {
    let base = Multiaddr::empty().with(Protocol::Ip4(*mapping.external.ip()));
    match mapping.transport {
        Transport::Udp => base.with(Protocol::Udp(mapping.external.port())).with(Protocol::QuicV1),
        Transport::Tcp => base.with(Protocol::Tcp(mapping.external.port())),
    }
}

impl EventLoop {
    /// Our listen addresses changed: the mapping task maps what we listen on now.
    pub(super) fn update_mapped_ports(&mut self) {
        let Some(link) = &self.port_mapping else { return };
        let ports = ports_to_map(&self.listen_addrs);
        link.ports.send_if_modified(|current| {
            let changed = *current != ports;
            *current = ports;
            changed
        });
    }

    pub(super) fn on_port_mapping(&mut self, event: Event) {
        let Some(link) = &mut self.port_mapping else { return };
        match event {
            Event::Mapped(mapping) => {
                let addr = external_addr(&mapping);
                let public = self.policy.lock().expect("policy lock").is_public(&addr);
                let key = (mapping.transport, mapping.internal_port);
                let fresh = link.mapped.get(&key).is_none_or(|old| old.external != mapping.external);
                link.mapped.insert(key, mapping);
                if !fresh {
                    return;
                }
                if public {
                    // A candidate only: AutoNAT dials it back before it counts.
                    self.swarm.behaviour_mut().candidates.propose(addr);
                } else {
                    tracing::info!(%addr, "the gateway's external address is not public (a second NAT beyond it?): not advertised");
                }
            }
            Event::Failed(reason) => link.last_error = Some(reason),
            Event::Gone { transport, internal_port } => {
                if let Some(mapping) = link.mapped.remove(&(transport, internal_port)) {
                    self.swarm.remove_external_address(&external_addr(&mapping));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ports_mapped_are_our_lan_facing_ipv4_quic_and_tcp_ports() {
        let listen: Vec<Multiaddr> = [
            "/ip4/127.0.0.1/udp/4001/quic-v1",
            "/ip4/192.168.1.20/udp/4001/quic-v1",
            "/ip4/192.168.1.20/tcp/4001",
            "/ip4/10.8.0.2/tcp/4001",
            "/ip6/::1/tcp/4001",
            "/ip4/192.168.1.20/tcp/4002/ws",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        assert_eq!(ports_to_map(&listen), vec![(Transport::Udp, 4001), (Transport::Tcp, 4001)]);
    }
}
