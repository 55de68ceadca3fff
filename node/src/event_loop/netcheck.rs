//! `warren netcheck` and the NAT type in `warren status`: the evidence [`crate::nat`] judges
//! from (where public peers see us, what AutoNAT confirmed, the port mappings), and for
//! netcheck, QUIC dials to peers that can tell us what we do not know yet: whether UDP gets out
//! at all, and how a second peer sees our QUIC socket.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use libp2p::{
    Multiaddr, PeerId,
    multiaddr::Protocol,
    swarm::{
        ConnectionId,
        dial_opts::{DialOpts, PeerCondition},
    },
};
use tokio::sync::oneshot;

use super::EventLoop;
use crate::addresses::{endpoint_of, ip_of, is_relayed, transport_of};
use crate::api;
use crate::handle::NetcheckDraft;
use crate::nat::{self, Evidence, Observation, QuicProbe};

/// Peers one check dials over QUIC: two observers are what telling the mapping needs, a third
/// covers one that does not answer.
pub const PROBES: usize = 3;
/// How long a check waits for its QUIC dials and the identify answers on them: a handshake and
/// a round trip, with room for a slow path.
pub const PROBE_WAIT: Duration = Duration::from_secs(5);
/// Checks that may wait on one round of probes; more are answered from what is known already
/// (the control socket is the owner's, so this only keeps a runaway script bounded).
/// Public peers asked again where they see us after a direct connection died: two, since
/// two agreeing observers make an endpoint-independent mapping (see `nat`).
const REOBSERVE_PEERS: usize = 2;
/// At most one such round per this long: a node losing many connections at once asks once.
const REOBSERVE_INTERVAL: Duration = Duration::from_secs(10);
/// Rounds of dials to learn an unknown mapping (see [`EventLoop::learn_mapping`]) wait this
/// long after the first, doubling after each that does not settle it, up to the most: each
/// round is up to [`PROBES`] QUIC handshakes, and a network with no third public peer never
/// settles a port clash, so the rounds must thin out.
const LEARN_INTERVAL: Duration = Duration::from_secs(30);
const LEARN_INTERVAL_MAX: Duration = Duration::from_secs(30 * 60);
const MAX_WAITERS: usize = 16;

/// A round of QUIC probes and the checks waiting for it.
pub(super) struct Round {
    waiters: Vec<oneshot::Sender<NetcheckDraft>>,
    /// Each probe dial, and whether it has been answered (identify received, or the dial failed).
    probes: HashMap<ConnectionId, Probe>,
    deadline: Instant,
}

#[derive(Debug, Clone, Copy, Default)]
struct Probe {
    reached: bool,
    done: bool,
}

/// Where a peer at `connection_address` sees us, if that says something about our NAT: a direct
/// connection from a public address, and an observed IP and port.
fn observation(connection_address: &Multiaddr, observed: &Multiaddr, public: bool) -> Option<Observation> {
    if is_relayed(connection_address) || !public {
        return None;
    }
    let transport = match transport_of(observed) {
        "quic" => nat::Transport::Quic,
        "tcp" => nat::Transport::Tcp,
        _ => return None,
    };
    let (ip, port) = endpoint_of(observed)?;
    Some(Observation { observer: ip_of(connection_address)?, observed: SocketAddr::new(ip, port.number()), transport, at: Instant::now() })
}

impl EventLoop {
    /// A peer told us (identify) where it sees us on `connection`.
    pub(super) fn on_observed(&mut self, connection: ConnectionId, observed: &Multiaddr) {
        if let Some(conn) = self.conns.get(&connection) {
            let public = self.policy.lock().expect("policy lock").is_public(&conn.address);
            if let Some(o) = observation(&conn.address, observed, public) {
                let quic = (o.transport == nat::Transport::Quic).then_some(o.observed);
                self.observations.record(o);
                if let Some(observed) = quic {
                    self.propose_mapped_quic(observed);
                }
            }
        }
        self.on_probe_event(connection, None);
    }

    /// identify proposes an observed address whose port we do not listen on with our listen
    /// port in its place (it takes the observed port for an ephemeral one, which a TCP dial
    /// from a new port has). Behind a NAT that gives our QUIC socket another public port (a
    /// carrier NAT, a router whose preferred port was taken, one whose port range moved) that
    /// guess is wrong, and DCUtR would send peers only a port that leads nowhere. QUIC dials
    /// leave from the listening socket, so when peers agree on one mapped address (an
    /// endpoint-independent mapping) and `observed` is it, it is proposed as it is.
    fn propose_mapped_quic(&mut self, observed: SocketAddr) {
        let listened = self.listen_addrs.iter().any(|a| transport_of(a) == "quic" && endpoint_of(a).is_some_and(|(_, p)| p.number() == observed.port()));
        if listened || nat::assess(&self.nat_evidence()).quic_mapped != Some(observed) {
            return;
        }
        let addr = Multiaddr::from(observed.ip()).with(Protocol::Udp(observed.port())).with(Protocol::QuicV1);
        tracing::debug!(%addr, "proposing our mapped QUIC address as peers see it");
        self.swarm.behaviour_mut().candidates.propose(addr);
    }

    /// A probe dial connected (`Some(true)`), failed (`Some(false)`), or was answered (`None`).
    pub(super) fn on_probe_event(&mut self, connection: ConnectionId, connected: Option<bool>) {
        let Some(round) = &mut self.netcheck else { return };
        let Some(probe) = round.probes.get_mut(&connection) else { return };
        match connected {
            Some(true) => probe.reached = true,
            Some(false) => probe.done = true,
            None => probe.done = true,
        }
        if round.probes.values().all(|p| p.done) {
            self.finish_netcheck();
        }
    }

    /// Our NAT may have mapped us afresh (a direct connection just died): a new QUIC connection
    /// to each of up to [`REOBSERVE_PEERS`] public peers we are connected to tells, through
    /// identify, where they see us now. Existing connections cannot: identify answers once per
    /// connection, and a peer that saw our flow move (QUIC migration) does not say so. At most
    /// once per [`REOBSERVE_INTERVAL`].
    pub(super) fn reobserve(&mut self) {
        let now = Instant::now();
        if self.reobserved_at.is_some_and(|t| now.saturating_duration_since(t) < REOBSERVE_INTERVAL) {
            return;
        }
        let public: Vec<(PeerId, Multiaddr)> = {
            let policy = self.policy.lock().expect("policy lock");
            let mut seen = HashSet::new();
            self.conns
                .values()
                .filter(|c| c.outbound && transport_of(&c.address) == "quic" && !is_relayed(&c.address) && policy.is_public(&c.address))
                .filter(|c| seen.insert(c.peer))
                .map(|c| (c.peer, crate::addresses::without_p2p(&c.address)))
                .take(REOBSERVE_PEERS)
                .collect()
        };
        if public.is_empty() {
            return;
        }
        self.reobserved_at = Some(now);
        tracing::info!(peers = public.len(), "asking public peers where they see us now");
        for (peer, addr) in public {
            let _ = self.swarm.dial(DialOpts::peer_id(peer).condition(PeerCondition::Always).addresses(vec![addr]).build());
        }
    }

    /// The birthday punch needs our mapping (an easy side tells the peer its one address, a
    /// hard side must know it is one). Peers see us once per connection, and a node that joined
    /// through one public peer over QUIC and another over TCP, or whose QUIC dial lost the race
    /// to TCP, may never hear a second QUIC observer: then ask public peers that have not seen
    /// us over QUIC, as `warren netcheck` does, without waiting for the answers. At most once
    /// per [`LEARN_INTERVAL`], growing to [`LEARN_INTERVAL_MAX`].
    pub(super) fn learn_mapping(&mut self) {
        let now = Instant::now();
        let wait = LEARN_INTERVAL.saturating_mul(1 << self.mapping_learn_rounds.min(16)).min(LEARN_INTERVAL_MAX);
        if self.netcheck.is_some() || self.mapping_learned_at.is_some_and(|t| now.saturating_duration_since(t) < wait) {
            return;
        }
        if nat::assess(&self.nat_evidence()).mapping != nat::Mapping::Unknown {
            self.mapping_learn_rounds = 0;
            return;
        }
        // The round counts whether or not anyone is left to ask (a node with no QUIC peer to
        // dial looks again when the next round is due, not on every tick).
        self.mapping_learned_at = Some(now);
        self.mapping_learn_rounds = self.mapping_learn_rounds.saturating_add(1);
        let targets = self.probe_targets();
        if targets.is_empty() {
            return;
        }
        tracing::info!(peers = targets.len(), "our NAT's mapping is not known yet: asking public peers where they see our QUIC socket");
        for (peer, addrs) in targets {
            let _ = self.swarm.dial(DialOpts::peer_id(peer).condition(PeerCondition::Always).addresses(addrs).build());
        }
    }

    /// Ends a round of probes whose time is up.
    pub(super) fn netcheck_when_due(&mut self) {
        if self.netcheck.as_ref().is_some_and(|r| Instant::now() >= r.deadline) {
            self.finish_netcheck();
        }
    }

    /// `warren netcheck`: probes over QUIC what is not known yet, then answers.
    pub(super) fn netcheck(&mut self, reply: oneshot::Sender<NetcheckDraft>) {
        if let Some(round) = &mut self.netcheck {
            if round.waiters.len() < MAX_WAITERS {
                round.waiters.push(reply);
            } else {
                let _ = reply.send(self.netcheck_draft(None));
            }
            return;
        }
        let targets = self.probe_targets();
        if targets.is_empty() {
            let _ = reply.send(self.netcheck_draft(None));
            return;
        }
        let mut probes = HashMap::new();
        for (peer, addrs) in targets {
            let opts = DialOpts::peer_id(peer).condition(PeerCondition::Always).addresses(addrs).build();
            let id = opts.connection_id();
            if self.swarm.dial(opts).is_ok() {
                probes.insert(id, Probe::default());
            }
        }
        tracing::info!(probes = probes.len(), "netcheck: probing over QUIC");
        self.netcheck = Some(Round { waiters: vec![reply], probes, deadline: Instant::now() + PROBE_WAIT });
        if self.netcheck.as_ref().is_some_and(|r| r.probes.is_empty()) {
            self.finish_netcheck();
        }
    }

    fn finish_netcheck(&mut self) {
        let Some(round) = self.netcheck.take() else { return };
        let probe = QuicProbe { tried: round.probes.len(), reached: round.probes.values().filter(|p| p.reached).count() };
        for waiter in round.waiters {
            let _ = waiter.send(self.netcheck_draft(Some(probe)));
        }
    }

    /// Peers worth a QUIC dial: when no QUIC connection shows that UDP gets out, or the
    /// observations so far cannot tell the mapping (fewer than two, or two that disagree in a
    /// way a third settles). Connected peers first (they are up), then stored ones, then the
    /// DHT's routing table; each at a public IP no observer has already.
    fn probe_targets(&mut self) -> Vec<(PeerId, Vec<Multiaddr>)> {
        let now = Instant::now();
        let observers: HashSet<IpAddr> =
            self.observations.current(now).iter().filter(|o| o.transport == nat::Transport::Quic).map(|o| o.observer).collect();
        let quic_open = self.conns.values().any(|c| !is_relayed(&c.address) && transport_of(&c.address) == "quic");
        if quic_open && nat::assess(&self.nat_evidence()).mapping != nat::Mapping::Unknown {
            return Vec::new();
        }
        let mut table: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
        for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
            for entry in bucket.iter() {
                table.insert(*entry.node.key.preimage(), entry.node.value.iter().cloned().collect());
            }
        }
        let policy = self.policy.lock().expect("policy lock");
        let quic_addrs = |peer: &PeerId| -> Vec<Multiaddr> {
            let mut addrs = self.book.get(peer).map(|r| r.addresses()).unwrap_or_default();
            addrs.extend(table.get(peer).cloned().unwrap_or_default());
            addrs.into_iter().filter(|a| transport_of(a) == "quic" && policy.is_public(a) && policy.may_dial(Some(*peer), a).is_ok()).collect()
        };
        let connected: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        let stored = self.book.best(PROBES * 4).into_iter().map(|(peer, _)| peer).chain(table.keys().copied());
        let mut ips: HashSet<IpAddr> = observers;
        let mut out = Vec::new();
        for peer in connected.into_iter().chain(stored) {
            if out.len() >= PROBES || out.iter().any(|(p, _)| *p == peer) {
                continue;
            }
            let addrs: Vec<Multiaddr> = quic_addrs(&peer).into_iter().filter(|a| ip_of(a).is_some_and(|ip| !ips.contains(&ip))).collect();
            if let Some(ip) = addrs.first().and_then(ip_of) {
                ips.insert(ip);
                out.push((peer, addrs));
            }
        }
        out
    }

    /// Everything the node knows now, as [`crate::nat::assess`] takes it.
    pub(super) fn nat_evidence(&self) -> Evidence {
        let now = Instant::now();
        let direct = |t: &str| self.conns.values().filter(|c| !is_relayed(&c.address) && transport_of(&c.address) == t).count();
        let policy = self.policy.lock().expect("policy lock");
        let mut local_ips: Vec<IpAddr> = self.listen_addrs.iter().filter(|a| !is_relayed(a)).filter_map(ip_of).collect();
        local_ips.dedup();
        let mut quic_ports: Vec<u16> = self
            .listen_addrs
            .iter()
            .filter(|a| !is_relayed(a) && transport_of(a) == "quic")
            .filter_map(|a| endpoint_of(a).map(|(_, port)| port.number()))
            .collect();
        quic_ports.dedup();
        Evidence {
            local_ips,
            quic_ports,
            observations: self.observations.current(now),
            confirmed: self.swarm.external_addresses().filter(|a| !is_relayed(a)).filter_map(ip_of).collect(),
            quic_connections: direct("quic"),
            tcp_connections: direct("tcp"),
            quic_probe: None,
            port_mapped: self
                .port_mapping
                .iter()
                .flat_map(|link| link.mapped.values())
                .map(|m| (m.external, policy.is_public(&super::port_mapping::external_addr(m))))
                .collect(),
            hops: Vec::new(),
        }
    }

    fn netcheck_draft(&self, probe: Option<QuicProbe>) -> NetcheckDraft {
        let now = Instant::now();
        let mut evidence = self.nat_evidence();
        evidence.quic_probe = probe;
        let rtt_to = |peer: &PeerId| -> Option<Duration> {
            self.direct_conns(*peer).filter_map(|(_, c)| c.rtt).min()
        };
        let held: HashSet<PeerId> = self.autorelay.held().map(|h| h.relay).collect();
        let mut relays: Vec<(Option<Duration>, api::RelayRtt)> = self
            .autorelay
            .candidate_addrs()
            .map(|(peer, addrs)| {
                let rtt = rtt_to(peer);
                let addr = addrs.first().map(|a| a.to_string()).unwrap_or_default();
                (rtt, api::RelayRtt { peer_id: peer.to_string(), addr, rtt_ms: rtt.map(|d| d.as_secs_f64() * 1000.0), held: held.contains(peer) })
            })
            .collect();
        relays.sort_by_key(|(rtt, r)| (rtt.is_none(), *rtt, r.peer_id.clone()));
        let preferred_relay = relays.iter().find(|(_, r)| r.held).or(relays.first()).map(|(_, r)| r.peer_id.clone());
        let mappings: Vec<_> = self.port_mapping.iter().flat_map(|link| link.mapped.values()).collect();
        // Peers we reach directly at a public IP are targets for the trace; the longest
        // connected first (bootstrap peers and relays, on addresses of their own, are the
        // likeliest to answer).
        let trace_targets = {
            let policy = self.policy.lock().expect("policy lock");
            let mut conns: Vec<_> = self.conns.values().filter(|c| !is_relayed(&c.address) && policy.is_public(&c.address)).collect();
            conns.sort_by_key(|c| c.since);
            let mut ips = Vec::new();
            for c in conns {
                if let Some(IpAddr::V4(ip)) = ip_of(&c.address)
                    && !ips.contains(&ip)
                {
                    ips.push(ip);
                }
            }
            ips.truncate(crate::trace::MAX_TARGETS);
            ips
        };
        let public_ranges = self.policy.lock().expect("policy lock").public_ranges().to_vec();
        let report = api::Netcheck {
            nat_type: String::new(),
            verdict: String::new(),
            udp: String::new(),
            mapping: String::new(),
            double_nat: None,
            confirmed_addrs: self.swarm.external_addresses().map(|a| a.to_string()).collect(),
            observed: evidence
                .observations
                .iter()
                .map(|o| api::ObservedAddr {
                    observer: o.observer.to_string(),
                    observed: o.observed.to_string(),
                    transport: match o.transport {
                        nat::Transport::Quic => "quic".into(),
                        nat::Transport::Tcp => "tcp".into(),
                    },
                    age_secs: now.saturating_duration_since(o.at).as_secs(),
                })
                .collect(),
            quic_probe: probe,
            port_mapping: api::PortMappingCheck {
                enabled: self.port_mapping.is_some(),
                protocol: mappings.first().map(|m| m.protocol.to_string()),
                external: mappings.iter().map(|m| m.external.to_string()).collect(),
                last_error: if mappings.is_empty() { self.port_mapping.as_ref().and_then(|l| l.last_error.clone()) } else { None },
            },
            hops: Vec::new(),
            relays: relays.into_iter().map(|(_, r)| r).collect(),
            preferred_relay,
            reasons: Vec::new(),
        };
        NetcheckDraft { report, evidence, trace_targets, public_ranges }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_direct_connections_from_public_peers_tell_where_we_are_seen() {
        let observed: Multiaddr = "/ip4/203.0.113.5/udp/4001/quic-v1".parse().unwrap();
        let from: Multiaddr = "/ip4/198.51.100.7/udp/4001/quic-v1".parse().unwrap();
        let o = observation(&from, &observed, true).expect("a public peer's view counts");
        assert_eq!((o.observer, o.observed, o.transport), ("198.51.100.7".parse().unwrap(), "203.0.113.5:4001".parse().unwrap(), nat::Transport::Quic));
        assert!(observation(&from, &observed, false).is_none(), "a peer on our LAN sees our LAN address");
        let relayed: Multiaddr = "/ip4/198.51.100.7/udp/4001/quic-v1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit".parse().unwrap();
        assert!(observation(&relayed, &observed, true).is_none(), "through a relay, the relay is what is seen");
        let tcp: Multiaddr = "/ip4/203.0.113.5/tcp/50312".parse().unwrap();
        assert_eq!(observation(&from, &tcp, true).unwrap().transport, nat::Transport::Tcp);
    }
}
