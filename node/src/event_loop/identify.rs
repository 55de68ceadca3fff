//! What peers tell us about themselves (identify): their addresses, kept as the address
//! policy allows, given to each DHT that may hold them; their protocols; relays they offer.

use libp2p::{Multiaddr, PeerId, identify, relay};

use super::EventLoop;
use crate::addresses::without_p2p;
use crate::peer_record::unix_now;

impl EventLoop {
    pub(super) fn on_identify(&mut self, peer: PeerId, info: identify::Info) {
        let now = unix_now();
        let protocols: Vec<String> = info.protocols.iter().map(|p| p.to_string()).collect();
        let listen: Vec<Multiaddr> = info.listen_addrs.iter().map(without_p2p).collect();
        let public: Vec<Multiaddr> = {
            let policy = self.policy.lock().expect("policy lock");
            listen.iter().filter(|a| policy.is_public(a) && !policy.is_own(a)).cloned().collect()
        };
        self.remember(peer, &listen);
        self.book.update(peer, |r| {
            r.last_seen = now;
            r.set_protocols(protocols.iter().cloned());
        });
        // Each DHT gets what the policy gives it: the WAN DHT public addresses only, the LAN DHT
        // the private ones of a peer seen on that network.
        self.feed_dhts(peer);
        let offers_hop = protocols.iter().any(|p| *p == relay::HOP_PROTOCOL_NAME.as_ref());
        let relay_addrs: Vec<Multiaddr> = if offers_hop {
            let policy = self.policy.lock().expect("policy lock");
            let mut addrs: Vec<Multiaddr> = self
                .conns
                .values()
                .filter(|c| c.peer == peer && c.outbound && policy.is_public(&c.address))
                .map(|c| without_p2p(&c.address))
                .collect();
            addrs.extend(public.iter().cloned());
            addrs.dedup();
            addrs
        } else {
            Vec::new()
        };
        self.autorelay.on_identify(peer, relay_addrs);
        self.agents.insert(peer, info.agent_version);
    }

    /// Gives each DHT the stored addresses of `peer` that belong there, if it speaks that DHT.
    pub(super) fn feed_dhts(&mut self, peer: PeerId) {
        let Some(record) = self.book.get(&peer) else { return };
        let (wan, lan) = {
            let policy = self.policy.lock().expect("policy lock");
            let lan_protocol = crate::addresses::lan_kad_protocol(&self.config.kad_protocol);
            let addrs = record.addresses();
            let wan: Vec<Multiaddr> = if record.supports(&self.config.kad_protocol) {
                addrs.iter().filter(|a| policy.for_wan_dht(a)).cloned().collect()
            } else {
                Vec::new()
            };
            let lan: Vec<Multiaddr> = if record.supports(&lan_protocol) {
                addrs.iter().filter(|a| policy.for_lan_dht(&peer, a)).cloned().collect()
            } else {
                Vec::new()
            };
            (wan, lan)
        };
        for addr in wan {
            self.swarm.behaviour_mut().kad.add_address(&peer, addr);
        }
        for addr in lan {
            self.swarm.behaviour_mut().lan_kad.add_address(&peer, addr);
        }
    }

    /// Keeps the addresses of `peer` that the policy lets us store.
    pub(super) fn remember(&mut self, peer: PeerId, addrs: &[Multiaddr]) {
        let now = unix_now();
        let keep: Vec<Multiaddr> = {
            let policy = self.policy.lock().expect("policy lock");
            addrs.iter().filter(|a| policy.may_store(&peer, a)).cloned().collect()
        };
        if !keep.is_empty() {
            self.book.update(peer, |r| keep.into_iter().for_each(|a| r.observe_addr(a, now)));
        }
    }
}
