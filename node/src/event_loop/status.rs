//! What `warren status` and `warren peers` report.

use std::collections::HashMap;

use libp2p::{PeerId, autonat, swarm::ConnectionId};

use super::dht::Dht;
use super::{ConnInfo, EventLoop};
use crate::addresses::{is_relayed, transport_of};
use crate::api;
use crate::behaviour::AGENT;
use crate::config::DhtMode;
use crate::nat::NatType;

impl EventLoop {
    pub(super) fn status(&mut self) -> api::Status {
        let reachability = match self.swarm.behaviour().autonat.nat_status() {
            autonat::NatStatus::Public(_) => "public",
            autonat::NatStatus::Private => "private",
            autonat::NatStatus::Unknown => "unknown",
        };
        let dht_mode = self.swarm.behaviour().kad.mode().to_string().to_lowercase();
        api::Status {
            peer_id: self.swarm.local_peer_id().to_string(),
            agent: AGENT.to_string(),
            listen_addrs: self.listen_addrs.iter().map(|a| a.to_string()).collect(),
            external_addrs: self.swarm.external_addresses().map(|a| a.to_string()).collect(),
            reachability: reachability.to_string(),
            dht_mode,
            dht_mode_setting: match self.config.dht_mode {
                DhtMode::Server => "server",
                DhtMode::Client => "client",
                DhtMode::Auto => "auto",
            }
            .to_string(),
            kad_protocol: self.config.kad_protocol.clone(),
            connected_peers: self.swarm.connected_peers().count(),
            connections: self.conns.len(),
            routing_table_peers: self.table_size(Dht::Wan),
            lan_routing_table_peers: self.table_size(Dht::Lan),
            dht_refreshed_secs_ago: self.bootstrapped_at.get(&Dht::Wan).map(|t| t.elapsed().as_secs()),
            addresses_published_secs_ago: self.own_record_published.get(&Dht::Wan).map(|(t, _)| t.elapsed().as_secs()),
            lan_addresses_published_secs_ago: self.own_record_published.get(&Dht::Lan).map(|(t, _)| t.elapsed().as_secs()),
            address_publish_failures: self
                .publish_failures
                .get(&(Dht::Wan, super::dht::peer_key(self.swarm.local_peer_id())))
                .copied()
                .unwrap_or(0),
            wrong_peer_dials: self.wrong_peer_dials,
            stored_peers: self.book.len(),
            peer_store_writes: self.writer.as_ref().map(|w| w.writes.load(std::sync::atomic::Ordering::Relaxed)).unwrap_or(0),
            uptime_secs: self.started.elapsed().as_secs(),
            relayed_through: self
                .autorelay
                .held()
                .map(|h| api::HeldReservation {
                    relay: h.relay.to_string(),
                    relay_addr: h.relay_addr.to_string(),
                    pinned: h.pinned,
                    accepted: h.accepted_at.is_some(),
                    renewals: h.renewals,
                    age_secs: h.accepted_at.map(|t| t.elapsed().as_secs()),
                })
                .collect(),
            port_mappings: self
                .port_mapping
                .iter()
                .flat_map(|link| link.mapped.values())
                .map(|m| api::PortMapping {
                    protocol: m.protocol.to_string(),
                    transport: match m.transport {
                        crate::port_mapping::Transport::Udp => "udp".into(),
                        crate::port_mapping::Transport::Tcp => "tcp".into(),
                    },
                    internal_port: m.internal_port,
                    external: m.external.to_string(),
                    lease_left_secs: m.expires.saturating_duration_since(tokio::time::Instant::now()).as_secs(),
                })
                .collect(),
            relay_candidates: self.autorelay.candidates(),
            relay_last_error: self.autorelay.last_error.clone(),
            relay: self.config.relay.then(|| {
                let r = &self.relay_stats;
                api::RelayStatus {
                    advertised: self.relay_advertised,
                    reservation_peers: r.reservations.len(),
                    reservations: r.reservations.values().map(|n| u64::from(*n)).sum(),
                    circuits: r.circuits.values().map(|n| u64::from(*n)).sum(),
                    reservations_accepted: r.reservations_accepted,
                    reservations_denied: r.reservations_denied,
                    circuits_accepted: r.circuits_accepted,
                    circuits_denied: r.circuits_denied,
                    circuits_cut: r.circuits_cut,
                    relayed_bytes: self.meter.as_ref().map_or(0, |m| m.relayed()),
                    last_denial: r.last_denial.clone(),
                    last_cut: r.last_cut.clone(),
                    denied_by_reason: r.denied_by_reason.iter().map(|(k, n)| (k.clone(), *n)).collect(),
                    limits: self.config.relay_limits.clone(),
                }
            }),
            hole_punch: api::HolePunchStats { birthday: self.birthday.stats(), ..self.hole_punch.stats() },
            nat_type: crate::nat::assess(&self.nat_evidence()).nat_type.as_str().to_string(),
        }
    }

    pub(super) fn peers(&self) -> Vec<api::PeerEntry> {
        let own_nat = crate::nat::assess(&self.nat_evidence()).nat_type;
        let now = std::time::Instant::now();
        let mut by_peer: HashMap<PeerId, Vec<(&ConnectionId, &ConnInfo)>> = HashMap::new();
        for (id, conn) in &self.conns {
            by_peer.entry(conn.peer).or_default().push((id, conn));
        }
        let mut entries: Vec<api::PeerEntry> = by_peer
            .into_iter()
            .map(|(peer, mut conns)| {
                conns.sort_by_key(|(_, c)| c.since);
                let relayed_because = conns.iter().all(|(_, c)| is_relayed(&c.address)).then(|| {
                    let mut punch = self.hole_punch.why_relayed(&peer, now).unwrap_or_else(|| "no direct address of it is known".to_string());
                    if let Some(birthday) = self.birthday.why_not(&peer, now) {
                        punch = format!("{punch}; {birthday}");
                    }
                    match own_nat {
                        NatType::Symmetric => format!("{punch}; this node is behind a symmetric NAT"),
                        NatType::UdpBlocked => format!("{punch}; UDP is blocked here, so only TCP can punch"),
                        _ => punch,
                    }
                });
                api::PeerEntry {
                    relayed_because,
                    peer_id: peer.to_string(),
                    agent: self.agents.get(&peer).cloned(),
                    connections: conns
                        .into_iter()
                        .map(|(id, c)| {
                            let birthday = self.birthday.punched(id);
                            api::Connection {
                            address: c.address.to_string(),
                            transport: transport_of(&c.address).to_string(),
                            path: if is_relayed(&c.address) { "relayed" } else { "direct" }.to_string(),
                            direction: if c.outbound { "outbound" } else { "inbound" }.to_string(),
                            rtt_ms: c.rtt.map(|d| d.as_secs_f64() * 1000.0),
                            age_secs: c.since.elapsed().as_secs(),
                            punched_after_ms: self
                                .hole_punch
                                .punched_after(id)
                                .or(birthday.and_then(|b| b.after))
                                .map(|d| d.as_secs_f64() * 1000.0),
                            birthday: birthday.map(|b| api::BirthdayPunched {
                                side: if b.hard { "symmetric" } else { "easy" }.to_string(),
                                probes: b.probes,
                                sockets: b.sockets,
                                took_ms: b.took.as_secs_f64() * 1000.0,
                            }),
                        }})
                        .collect(),
                }
            })
            .collect();
        entries.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        entries
    }
}
