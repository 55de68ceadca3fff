//! Peers found on the LAN by mDNS: the scopes they announced count as seen, their addresses
//! are kept, and they are dialed.

use std::collections::HashMap;

use libp2p::{Multiaddr, PeerId, swarm::dial_opts::DialOpts};

use super::EventLoop;
use crate::addresses::Scope;

impl EventLoop {
    pub(super) fn on_mdns_discovered(&mut self, found: Vec<(PeerId, Multiaddr)>) {
        let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
        for (peer, addr) in found {
            by_peer.entry(peer).or_default().push(addr);
        }
        for (peer, addrs) in by_peer {
            // mDNS answers only from our link: the peer is on the LAN scopes it announced.
            // Never loopback: mDNS does not announce it, and a LAN host claiming it
            // would have us dial services on our own host.
            {
                let mut policy = self.policy.lock().expect("policy lock");
                for addr in &addrs {
                    if let Some(scope @ (Scope::Private | Scope::LinkLocal)) = policy.scope(addr) {
                        policy.note_seen(peer, scope);
                    }
                }
            }
            self.remember(peer, &addrs);
            if !self.swarm.is_connected(&peer) {
                tracing::info!(peer = %peer, "found on the LAN by mDNS");
                let _ = self.swarm.dial(DialOpts::peer_id(peer).addresses(addrs).build());
            }
        }
    }
}
