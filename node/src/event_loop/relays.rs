//! Relaying: the relay service we offer (its status, announced in the DHT) and the
//! reservations we hold on other relays while not publicly reachable (AutoRelay's actions).

use libp2p::{autonat, kad, relay, swarm::dial_opts::DialOpts};

use super::EventLoop;
use super::dht::Dht;
use crate::autorelay::{RELAYS_KEY, Seen, circuit_listen_addr};

impl EventLoop {
    pub(super) fn on_relay_event(&mut self, event: relay::Event) {
        match &event {
            relay::Event::StatusChanged { status } => {
                self.relay_advertised = *status == relay::Status::Enable;
                tracing::info!(advertised = self.relay_advertised, "relay service status changed");
                // Announced (again) by the next tick once enabled.
                self.relay_announce_due = Some(std::time::Instant::now());
            }
            relay::Event::ReservationReqDenied { src_peer_id, status } => {
                tracing::info!(peer = %src_peer_id, ?status, "relay reservation denied");
            }
            relay::Event::CircuitReqDenied { src_peer_id, dst_peer_id, status } => {
                tracing::info!(src = %src_peer_id, dst = %dst_peer_id, ?status, "relay circuit denied");
            }
            relay::Event::CircuitClosed { src_peer_id, dst_peer_id, error: Some(error) } => {
                tracing::info!(src = %src_peer_id, dst = %dst_peer_id, %error, "relay circuit cut");
            }
            _ => {}
        }
        self.relay_stats.on_event(&event);
        if let Some(by_ip) = &self.reservations_by_ip {
            by_ip.on_event(&event);
        }
    }

    /// Tells the DHT this node relays, so nodes without candidates can find it. Once per
    /// advertisement, when the DHT has peers to store the record (Kademlia republishes it).
    pub(super) fn announce_relay_when_due(&mut self) {
        let due = self.relay_announce_due.is_some_and(|due| std::time::Instant::now() >= due);
        if !self.relay_advertised || !due || self.table_size(Dht::Wan) == 0 {
            return;
        }
        self.relay_announce_due = None;
        if let Err(e) = self.swarm.behaviour_mut().kad.start_providing(kad::RecordKey::new(&RELAYS_KEY)) {
            tracing::warn!(error = %e, "cannot announce the relay service in the DHT");
        }
    }

    /// Adds or drops relay reservations as reachability and candidates change.
    pub(super) fn manage_relays(&mut self) {
        let public = matches!(self.swarm.behaviour().autonat.nat_status(), autonat::NatStatus::Public(_));
        let can_look_up = self.table_size(Dht::Wan) > 0;
        let (swarm, conns) = (&self.swarm, &self.conns);
        let actions = self.autorelay.tick(!public, can_look_up, |peer| Seen {
            connected: swarm.is_connected(peer),
            rtt: conns.values().filter(|c| c.peer == *peer).filter_map(|c| c.rtt).min(),
        });
        for (relay, addr) in actions.dial {
            let _ = self.swarm.dial(DialOpts::peer_id(relay).addresses(vec![addr]).build());
        }
        for (relay, relay_addr, pinned) in actions.reserve {
            match self.swarm.listen_on(circuit_listen_addr(relay, &relay_addr)) {
                Ok(id) => {
                    tracing::info!(relay = %relay, addr = %relay_addr, pinned, "reserving a slot on a relay");
                    self.autorelay.reserving(id, relay, relay_addr, pinned);
                }
                Err(e) => self.autorelay.reserve_failed(relay, e.to_string()),
            }
        }
        for id in actions.release {
            tracing::info!("publicly reachable: releasing an automatic relay reservation");
            self.swarm.remove_listener(id);
        }
        if actions.lookup {
            let id = self.swarm.behaviour_mut().kad.get_providers(kad::RecordKey::new(&RELAYS_KEY));
            self.relay_lookups.insert(id, self.autorelay.dials_per_lookup());
        }
        self.announce_relay_when_due();
    }
}
