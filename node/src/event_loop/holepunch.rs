//! Hole punching: DCUtR's outcomes (counted for `warren status`), a direct path that died while
//! a relayed one survives, and punching again on a schedule. [`HolePunch`] keeps the story and
//! the schedule (time is passed in); the loop dials.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId, dcutr, swarm::{ConnectionId, dial_opts::{DialOpts, PeerCondition}}};

use super::EventLoop;
use crate::addresses::transport_of;
use crate::api::HolePunchStats;

/// Waits before re-punching after a direct connection died while a relayed one survives;
/// then the peer is left on the relay (it keeps working) until a new relayed connection. Each
/// attempt is one relayed dial and a DCUtR exchange; a path that comes back within the first
/// half minute is found within 5-10 s (with 1, 10, 60 s the lab's restored path was sometimes
/// missed for a whole minute: a restore just after the 10 s attempt waited for the 60 s one).
const REPUNCH_BACKOFF: [Duration; 6] = [
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(20),
    Duration::from_secs(60),
];

/// Peers remembered as once reached directly (see [`HolePunch::on_relayed_dial`]); beyond
/// it the memory starts afresh. A node talks to far fewer peers than this between restarts;
/// forgetting only costs a peer its re-punches until it is direct again.
const DIRECT_MEMORY: usize = 4096;

/// A pending re-punch: a new relayed connection through `circuit` makes the peer's DCUtR
/// (the listening side of a relayed connection starts it) try again.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Repunch {
    pub(super) circuit: Multiaddr,
    due: Instant,
    attempt: usize,
}

/// Every peer's relayed-to-direct story.
#[derive(Default)]
pub(super) struct HolePunch {
    /// Since when each peer has been on a relay only (for the time a punch took).
    relayed_since: HashMap<PeerId, Instant>,
    /// Connections that a punch made, and how long after the relayed contact.
    punched: HashMap<ConnectionId, Duration>,
    stats: HolePunchStats,
    repunch: HashMap<PeerId, Repunch>,
    /// Re-punches made since the peer was last punched to (or connected afresh): the schedule
    /// goes on from here, and ends, whatever started it.
    tried: HashMap<PeerId, usize>,
    /// Why the last punch to each connected peer failed (until one succeeds).
    failed: HashMap<PeerId, String>,
    /// Peers we have had a direct connection with since start: a path between us existed.
    direct_before: std::collections::HashSet<PeerId>,
    /// Peers whose punched connection closed while another direct connection to them stayed
    /// up: when that one closes too, the path was a punched one (DCUtR's retries can leave two
    /// direct connections, only one of them reported as punched on this side).
    punched_gone: std::collections::HashSet<PeerId>,
}

impl HolePunch {
    pub(super) fn on_relayed_connection(&mut self, peer: PeerId, now: Instant) {
        self.relayed_since.entry(peer).or_insert(now);
    }

    /// A direct connection to `peer` opened.
    pub(super) fn on_direct(&mut self, peer: PeerId) {
        if self.direct_before.len() >= DIRECT_MEMORY {
            self.direct_before.clear();
        }
        self.direct_before.insert(peer);
    }

    pub(super) fn on_connection_closed(&mut self, connection: ConnectionId) {
        self.punched.remove(&connection);
    }

    pub(super) fn on_disconnected(&mut self, peer: &PeerId) {
        self.punched_gone.remove(peer);
        self.relayed_since.remove(peer);
        self.tried.remove(peer);
        self.failed.remove(peer);
    }

    /// We dialed the peer through a relay (`circuit`) and have no direct connection to it. The
    /// peer's DCUtR tries to punch now; should that fail (the direct path may be down just
    /// then, and only the peer hears of the failure), a re-punch follows on the schedule, from
    /// its second step. Without this, a direct path that died after the relayed connection had
    /// closed as idle was never punched again.
    /// Only for a peer we have reached directly before: each re-punch is a new circuit on the
    /// relay, and between two NATs that never let a punch through (both symmetric, say) they
    /// only cost the relay. (Measured in `simulations/dht-scale`: relays refused most circuits,
    /// their 64 slots held by re-punches that could not succeed.) DCUtR's own attempts on the
    /// relayed connection still run for every peer.
    pub(super) fn on_relayed_dial(&mut self, peer: PeerId, circuit: Multiaddr, now: Instant) {
        self.relayed_since.entry(peer).or_insert(now);
        if self.repunch.contains_key(&peer) || !self.direct_before.contains(&peer) {
            return;
        }
        let attempt = self.tried.get(&peer).copied().unwrap_or(0).max(1);
        if let Some(wait) = REPUNCH_BACKOFF.get(attempt) {
            self.repunch.insert(peer, Repunch { circuit, due: now + *wait, attempt });
        }
    }

    /// The peer's last direct connection closed while relayed ones remain. A later punch is
    /// timed from now; if we dialed one of the relayed connections (`circuit`), a re-punch is
    /// scheduled, continuing the schedule of one already pending.
    pub(super) fn on_direct_lost(&mut self, peer: PeerId, circuit: Option<Multiaddr>, now: Instant) {
        self.relayed_since.insert(peer, now);
        let Some(circuit) = circuit else { return };
        let attempt = self.repunch.get(&peer).map_or(0, |r| r.attempt);
        if let Some(wait) = REPUNCH_BACKOFF.get(attempt) {
            self.repunch.insert(peer, Repunch { circuit, due: now + *wait, attempt });
        }
    }

    /// The re-punches due at `now`, taken out of the schedule; each one that is carried out
    /// goes back with [`HolePunch::repunched`].
    pub(super) fn take_due(&mut self, now: Instant) -> Vec<(PeerId, Repunch)> {
        let due: Vec<PeerId> = self.repunch.iter().filter(|(_, r)| r.due <= now).map(|(p, _)| *p).collect();
        due.into_iter().filter_map(|peer| self.repunch.remove(&peer).map(|r| (peer, r))).collect()
    }

    /// A re-punch went out: the next one is scheduled, unless the schedule is used up.
    pub(super) fn repunched(&mut self, peer: PeerId, mut r: Repunch, now: Instant) -> usize {
        r.attempt += 1;
        let attempt = r.attempt;
        self.tried.insert(peer, attempt);
        if let Some(wait) = REPUNCH_BACKOFF.get(r.attempt) {
            r.due = now + *wait;
            self.repunch.insert(peer, r);
        }
        attempt
    }

    /// DCUtR made `connection` (over `transport`); returns how long the peer was relayed.
    pub(super) fn on_punched(&mut self, peer: PeerId, connection: ConnectionId, transport: &str, now: Instant) -> Duration {
        self.stats.attempts += 1;
        match transport {
            "quic" => self.stats.successes_quic += 1,
            _ => self.stats.successes_tcp += 1,
        }
        let after = self.relayed_since.get(&peer).map(|t| now.saturating_duration_since(*t)).unwrap_or_default();
        self.punched.insert(connection, after);
        self.repunch.remove(&peer);
        self.tried.remove(&peer);
        self.failed.remove(&peer);
        after
    }

    pub(super) fn on_punch_failed(&mut self, peer: PeerId, error: String) {
        self.stats.attempts += 1;
        self.stats.failures += 1;
        self.stats.last_error = Some(format!("{peer}: {error}"));
        self.failed.insert(peer, error);
    }

    /// Why a peer is still on a relay, as far as punching knows: the last failure, or how long
    /// the punch has been pending.
    pub(super) fn why_relayed(&self, peer: &PeerId, now: Instant) -> Option<String> {
        if let Some(error) = self.failed.get(peer) {
            return Some(format!("hole punching failed: {error}"));
        }
        self.relayed_since
            .get(peer)
            .map(|since| format!("no direct connection yet (relayed for {} s; hole punching is under way)", now.saturating_duration_since(*since).as_secs()))
    }

    pub(super) fn stats(&self) -> HolePunchStats {
        self.stats.clone()
    }

    /// How long `peer` has been reached through relays only.
    pub(super) fn relayed_for(&self, peer: &PeerId, now: Instant) -> Option<Duration> {
        self.relayed_since.get(peer).map(|since| now.saturating_duration_since(*since))
    }

    pub(super) fn punched_after(&self, connection: &ConnectionId) -> Option<Duration> {
        self.punched.get(connection).copied()
    }

    /// `connection` to `peer`, direct, closed while another direct one stays up: if a punch
    /// made it, the path stays a punched one.
    pub(super) fn on_direct_closed_early(&mut self, peer: PeerId, connection: &ConnectionId) {
        if self.punched.contains_key(connection) && self.punched_gone.len() < DIRECT_MEMORY {
            self.punched_gone.insert(peer);
        }
    }

    /// Whether the peer's last direct connection (`connection`) was on a punched path: made by
    /// a punch, or outliving one that was.
    pub(super) fn take_punched_path(&mut self, peer: &PeerId, connection: &ConnectionId) -> bool {
        self.punched_gone.remove(peer) | self.punched.contains_key(connection)
    }
}

impl EventLoop {
    /// A direct connection to `peer` closed. If only relayed connections remain, new streams
    /// already use them; if a punch had made the connection and we dialed one of the relayed
    /// ones, dial the circuit again later so the peer's DCUtR tries another punch. A direct
    /// connection no punch made needs none to come back: whichever side dialed it can again
    /// (re-punching after every such connection closed as idle kept relays busy with circuits
    /// nobody used, measured in `simulations/dht-scale`).
    pub(super) fn direct_lost(&mut self, peer: PeerId, connection: ConnectionId) {
        if self.has_direct(peer) {
            // Another direct connection is still up.
            self.hole_punch.on_direct_closed_early(peer, &connection);
            return;
        }
        let punched = self.hole_punch.take_punched_path(&peer, &connection);
        let mut circuit = None;
        for conn in self.conns.values().filter(|c| c.peer == peer) {
            if conn.outbound && punched {
                circuit = Some(conn.address.clone());
            }
        }
        tracing::info!(peer = %peer, "direct connection lost; new streams use the relay");
        self.hole_punch.on_direct_lost(peer, circuit, Instant::now());
        // The NAT may have given us a new port: learn it before the next punch hands out the old one.
        self.reobserve();
    }

    pub(super) fn repunch_when_due(&mut self) {
        let now = Instant::now();
        for (peer, r) in self.hole_punch.take_due(now) {
            if self.has_direct(peer) || !self.swarm.is_connected(&peer) {
                continue;
            }
            let opts = DialOpts::peer_id(peer).condition(PeerCondition::Always).addresses(vec![r.circuit.clone()]).build();
            let _ = self.swarm.dial(opts);
            let attempt = self.hole_punch.repunched(peer, r, now);
            tracing::info!(peer = %peer, attempt, "re-dialed through the relay to punch again");
        }
    }

    pub(super) fn on_hole_punch(&mut self, peer: PeerId, result: Result<ConnectionId, dcutr::Error>) {
        match result {
            Ok(connection) => {
                let transport = self.conns.get(&connection).map(|c| transport_of(&c.address)).unwrap_or("other");
                let after = self.hole_punch.on_punched(peer, connection, transport, Instant::now());
                tracing::info!(peer = %peer, transport, after_ms = after.as_millis() as u64, "hole punched: direct connection");
            }
            Err(e) => {
                tracing::info!(peer = %peer, error = %e, "hole punching failed; staying on the relay");
                self.hole_punch.on_punch_failed(peer, e.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn circuit() -> Multiaddr {
        "/ip4/192.0.2.1/udp/4001/quic-v1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit".parse().unwrap()
    }

    /// Runs the schedule to its end, re-punching whenever one is due; returns when each went
    /// out (ms after `now`).
    fn repunch_times(punch: &mut HolePunch, peer: PeerId, mut now: Instant) -> Vec<u64> {
        let start = now;
        let mut at = Vec::new();
        for _ in 0..1000 {
            now += Duration::from_millis(500);
            for (p, r) in punch.take_due(now) {
                assert_eq!(p, peer);
                at.push(now.duration_since(start).as_millis() as u64);
                punch.repunched(p, r, now);
            }
        }
        at
    }

    #[test]
    fn a_lost_direct_path_is_punched_again_on_the_schedule_and_then_left_on_the_relay() {
        let (mut punch, peer, now) = (HolePunch::default(), PeerId::random(), Instant::now());
        punch.on_direct_lost(peer, Some(circuit()), now);
        assert!(punch.take_due(now).is_empty(), "not before the first wait");
        assert_eq!(repunch_times(&mut punch, peer, now), [1000, 6000, 11000, 21000, 41000, 101000]);
        assert!(punch.repunch.is_empty(), "the schedule is used up");
    }

    #[test]
    fn a_relayed_dial_to_a_peer_once_direct_is_followed_by_re_punches_that_end() {
        let (mut punch, peer, now) = (HolePunch::default(), PeerId::random(), Instant::now());
        punch.on_direct(peer);
        punch.on_relayed_dial(peer, circuit(), now);
        assert!(punch.take_due(now + Duration::from_millis(4900)).is_empty(), "the peer's own DCUtR goes first");
        let times = repunch_times(&mut punch, peer, now);
        assert_eq!(times, [5000, 10000, 20000, 40000, 100000]);
        // Each re-punch is a relayed dial too: it neither restarts nor prolongs the schedule.
        punch.on_relayed_dial(peer, circuit(), now + Duration::from_secs(200));
        assert!(punch.take_due(now + Duration::from_secs(1000)).is_empty(), "the schedule ended");
        // A fresh connection after the peer was gone starts it again.
        punch.on_disconnected(&peer);
        punch.on_relayed_dial(peer, circuit(), now + Duration::from_secs(300));
        assert_eq!(punch.take_due(now + Duration::from_secs(305)).len(), 1);
    }

    #[test]
    fn a_relayed_dial_to_a_peer_never_reached_directly_is_left_to_dcutr() {
        let (mut punch, peer, now) = (HolePunch::default(), PeerId::random(), Instant::now());
        punch.on_relayed_dial(peer, circuit(), now);
        assert!(punch.take_due(now + Duration::from_secs(600)).is_empty(), "no circuits spent on re-punches");
        assert!(punch.relayed_for(&peer, now).is_some(), "still told as relayed");
    }

    #[test]
    fn a_peer_we_did_not_dial_through_the_relay_is_not_re_punched_by_us() {
        let (mut punch, peer, now) = (HolePunch::default(), PeerId::random(), Instant::now());
        punch.on_direct_lost(peer, None, now);
        assert!(punch.take_due(now + Duration::from_secs(600)).is_empty());
    }

    #[test]
    fn a_punch_counts_its_transport_and_time_and_ends_the_schedule() {
        let (mut punch, peer, now) = (HolePunch::default(), PeerId::random(), Instant::now());
        punch.on_relayed_connection(peer, now);
        punch.on_relayed_connection(peer, now + Duration::from_secs(3)); // the first contact counts
        let conn = ConnectionId::new_unchecked(7);
        let after = punch.on_punched(peer, conn, "quic", now + Duration::from_millis(1500));
        assert_eq!(after, Duration::from_millis(1500));
        assert_eq!(punch.punched_after(&conn), Some(after));

        punch.on_direct_lost(peer, Some(circuit()), now);
        punch.on_punch_failed(peer, "no route".into());
        let _ = punch.on_punched(peer, ConnectionId::new_unchecked(8), "tcp", now + Duration::from_secs(2));
        assert!(punch.take_due(now + Duration::from_secs(600)).is_empty(), "a punch cancels the re-punch");
        let stats = punch.stats();
        assert_eq!((stats.attempts, stats.successes_quic, stats.successes_tcp, stats.failures), (3, 1, 1, 1));
        assert!(stats.last_error.unwrap().ends_with("no route"));
        punch.on_connection_closed(conn);
        assert_eq!(punch.punched_after(&conn), None);
    }

    #[test]
    fn a_direct_connection_that_outlived_the_punched_one_is_still_on_a_punched_path() {
        // DCUtR's retries left two direct connections; only one was reported as punched here.
        let (mut punch, peer, now) = (HolePunch::default(), PeerId::random(), Instant::now());
        let (punched, other) = (ConnectionId::new_unchecked(1), ConnectionId::new_unchecked(2));
        let _ = punch.on_punched(peer, punched, "quic", now);
        // The punched one closes first, the other one stays up for a while.
        punch.on_direct_closed_early(peer, &punched);
        punch.on_connection_closed(punched);
        assert!(punch.take_punched_path(&peer, &other), "the path was punched: re-punch when it goes");
        assert!(!punch.take_punched_path(&peer, &other), "counted once");
        // A peer reached directly without a punch needs none to come back.
        let dialed = ConnectionId::new_unchecked(3);
        punch.on_direct_closed_early(peer, &dialed);
        assert!(!punch.take_punched_path(&peer, &ConnectionId::new_unchecked(4)));
    }
}
