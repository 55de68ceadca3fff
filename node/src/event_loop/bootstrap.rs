//! Dialing the configured bootstrap peers: one dial per transport, and backoff while a peer is
//! unreachable. [`Bootstrap`] keeps the schedule (time is passed in); the loop dials.
//!
//! Bootstrap peers are for joining: each is dialed until it has answered once; after that only
//! while the node has no live DHT peers left (empty routing tables, or tables whose peers did
//! not answer the last refresh: the network moved on while this node slept, say). A node
//! does not hold connections to them: in a network of thousands every node doing so would put
//! thousands of connections on each bootstrap node and re-run a DHT bootstrap each time an idle
//! one closed (measured in `simulations/dht-scale`: about one a minute per node).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId, swarm::dial_opts::{DialOpts, PeerCondition}};

use super::EventLoop;
use crate::addresses::{transport_of, without_p2p};
use crate::config::bootstrap_peer;

/// First and largest wait between dials of an unreachable bootstrap peer.
const BACKOFF_MIN: Duration = Duration::from_secs(2);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

struct Peer {
    /// Every configured address of the peer (`--bootstrap` given once per transport, say).
    addrs: Vec<Multiaddr>,
    next_attempt: Instant,
    backoff: Duration,
    /// Dials in flight (one per transport).
    dialing: usize,
    /// It has answered since start.
    answered: bool,
}

/// The bootstrap peers and when each is dialed next.
pub(super) struct Bootstrap {
    peers: HashMap<PeerId, Peer>,
    /// Some bootstrap peer has answered since start.
    joined: bool,
}

impl Bootstrap {
    /// The peers named by `--bootstrap` addresses (those without `/p2p/` were refused by the
    /// config check), each due at once.
    pub(super) fn new(addrs: &[Multiaddr], now: Instant) -> Self {
        let mut peers: HashMap<PeerId, Peer> = HashMap::new();
        for addr in addrs {
            let Ok(peer) = bootstrap_peer(addr) else { continue };
            let state = peers.entry(peer).or_insert_with(|| Peer {
                addrs: Vec::new(),
                next_attempt: now,
                backoff: BACKOFF_MIN,
                dialing: 0,
                answered: false,
            });
            let addr = without_p2p(addr);
            if !state.addrs.contains(&addr) {
                state.addrs.push(addr);
            }
        }
        Bootstrap { peers, joined: false }
    }

    pub(super) fn contains(&self, peer: &PeerId) -> bool {
        self.peers.contains_key(peer)
    }

    /// The peer's configured addresses (none if it is not a bootstrap peer).
    pub(super) fn addrs(&self, peer: &PeerId) -> &[Multiaddr] {
        self.peers.get(peer).map_or(&[], |p| p.addrs.as_slice())
    }

    /// The dials due at `now`: per peer that is neither connected nor being dialed, and has not
    /// answered yet unless the node has no DHT peers (`has_dht_peers`), its addresses grouped by
    /// transport, one dial each. Each connection gives this node its observed address on that
    /// transport (what AutoNAT tests and DCUtR punches with), so a peer that speaks only TCP
    /// (UDP blocked) can still be punched to while QUIC is preferred.
    pub(super) fn due(&self, now: Instant, connected: impl Fn(&PeerId) -> bool, has_dht_peers: bool) -> Vec<(PeerId, Vec<Vec<Multiaddr>>)> {
        let mut out = Vec::new();
        for (peer, state) in &self.peers {
            if state.dialing > 0 || state.next_attempt > now || connected(peer) || (state.answered && has_dht_peers) {
                continue;
            }
            let mut by_transport: Vec<(&str, Vec<Multiaddr>)> = Vec::new();
            for addr in &state.addrs {
                let transport = transport_of(addr);
                match by_transport.iter_mut().find(|(t, _)| *t == transport) {
                    Some((_, addrs)) => addrs.push(addr.clone()),
                    None => by_transport.push((transport, vec![addr.clone()])),
                }
            }
            out.push((*peer, by_transport.into_iter().map(|(_, addrs)| addrs).collect()));
        }
        out
    }

    /// A dial of the peer went out.
    pub(super) fn dial_started(&mut self, peer: &PeerId) {
        if let Some(state) = self.peers.get_mut(peer) {
            state.dialing += 1;
        }
    }

    /// A dial could not even start: try again after the current backoff.
    pub(super) fn dial_not_started(&mut self, peer: &PeerId, now: Instant) {
        if let Some(state) = self.peers.get_mut(peer) {
            state.next_attempt = now + state.backoff;
        }
    }

    /// A connection to the peer is up: its dial is done and the backoff starts over. Returns
    /// whether it is the first bootstrap peer to answer since start.
    pub(super) fn on_connected(&mut self, peer: &PeerId) -> bool {
        let Some(state) = self.peers.get_mut(peer) else { return false };
        state.dialing = state.dialing.saturating_sub(1);
        state.backoff = BACKOFF_MIN;
        state.answered = true;
        !std::mem::replace(&mut self.joined, true)
    }

    /// A dial of the peer failed. If no other connection is up (`connected`) and no other dial
    /// is in flight, the peer counts as unreachable: the wait before the next attempt is
    /// returned, and the one after it doubles (up to [`BACKOFF_MAX`]).
    pub(super) fn on_dial_failed(&mut self, peer: &PeerId, connected: bool, now: Instant) -> Option<Duration> {
        let state = self.peers.get_mut(peer)?;
        state.dialing = state.dialing.saturating_sub(1);
        if connected || state.dialing > 0 {
            return None;
        }
        let wait = state.backoff;
        state.next_attempt = now + wait;
        state.backoff = (state.backoff * 2).min(BACKOFF_MAX);
        Some(wait)
    }
}

impl EventLoop {
    pub(super) fn dial_due_bootstrap_peers(&mut self) {
        if !self.first_dials_done {
            return;
        }
        let now = Instant::now();
        let has_dht_peers = self.has_live_dht_peers();
        let swarm = &self.swarm;
        for (peer, dials) in self.bootstrap.due(now, |p| swarm.is_connected(p), has_dht_peers) {
            tracing::info!(peer = %peer, addrs = ?self.bootstrap.addrs(&peer), "dialing bootstrap peer");
            for addrs in dials {
                let opts = DialOpts::peer_id(peer).condition(PeerCondition::Always).addresses(addrs).build();
                match self.swarm.dial(opts) {
                    Ok(()) => self.bootstrap.dial_started(&peer),
                    Err(e) => {
                        self.bootstrap.dial_not_started(&peer, now);
                        tracing::warn!(peer = %peer, error = %e, "cannot dial bootstrap peer");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (Bootstrap, PeerId, Instant) {
        let peer = PeerId::random();
        let addrs: Vec<Multiaddr> = [
            format!("/ip4/192.0.2.7/udp/4001/quic-v1/p2p/{peer}"),
            format!("/ip4/192.0.2.7/tcp/4001/p2p/{peer}"),
            format!("/ip6/2001:db8::7/udp/4001/quic-v1/p2p/{peer}"),
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        let now = Instant::now();
        (Bootstrap::new(&addrs, now), peer, now)
    }

    #[test]
    fn a_bootstrap_peer_is_dialed_once_per_transport_and_not_again_while_dialing() {
        let (mut boot, peer, now) = setup();
        let due = boot.due(now, |_| false, false);
        assert_eq!(due.len(), 1);
        let (who, dials) = &due[0];
        assert_eq!(*who, peer);
        assert_eq!(dials.len(), 2, "one QUIC dial (both families) and one TCP dial: {dials:?}");
        assert_eq!(dials[0].len(), 2);
        assert!(dials.iter().flatten().all(|a| !a.to_string().contains("/p2p/")));
        boot.dial_started(&peer);
        boot.dial_started(&peer);
        assert!(boot.due(now, |_| false, false).is_empty(), "dials are in flight");
        assert!(boot.due(now, |_| true, false).is_empty(), "a connected peer is not dialed");
    }

    #[test]
    fn an_unreachable_bootstrap_peer_is_retried_with_a_doubling_wait_reset_by_a_connection() {
        let (mut boot, peer, mut now) = setup();
        let mut waits = Vec::new();
        for _ in 0..10 {
            assert_eq!(boot.due(now, |_| false, false).len(), 1, "due again after its wait");
            boot.dial_started(&peer);
            boot.dial_started(&peer);
            // The first transport's failure says nothing while the other dial is in flight.
            assert_eq!(boot.on_dial_failed(&peer, false, now), None);
            let wait = boot.on_dial_failed(&peer, false, now).expect("both dials failed");
            assert!(boot.due(now, |_| false, false).is_empty(), "not due before its wait");
            waits.push(wait.as_secs());
            now += wait;
        }
        assert_eq!(waits, [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);

        boot.dial_started(&peer);
        boot.on_connected(&peer);
        boot.dial_started(&peer);
        assert_eq!(boot.on_dial_failed(&peer, false, now), Some(BACKOFF_MIN), "a connection resets the backoff");
    }

    #[test]
    fn a_failed_dial_beside_a_live_connection_is_not_unreachability() {
        let (mut boot, peer, now) = setup();
        boot.dial_started(&peer);
        assert_eq!(boot.on_dial_failed(&peer, true, now), None);
        assert_eq!(boot.due(now, |_| false, false).len(), 1, "no backoff was applied");
        assert!(boot.due(now, |_| true, false).is_empty(), "a connected peer is not dialed");
        assert_eq!(boot.on_dial_failed(&PeerId::random(), false, now), None, "not a bootstrap peer");
    }

    #[test]
    fn a_bootstrap_peer_that_answered_is_dialed_again_only_once_the_dht_is_empty() {
        let (mut boot, peer, now) = setup();
        let other = PeerId::random();
        let mut boot_two = Bootstrap::new(&[format!("/ip4/192.0.2.8/tcp/4001/p2p/{other}").parse().unwrap()], now);
        boot.dial_started(&peer);
        assert!(boot.on_connected(&peer), "the first bootstrap peer to answer: the node joins through it");
        assert!(!boot.on_connected(&peer), "a later connection is not a new join");
        // Its connection closed as idle: with DHT peers known, it is left alone.
        assert!(boot.due(now, |_| false, true).is_empty());
        assert_eq!(boot.due(now, |_| false, false).len(), 1, "no DHT peer left: join again");
        // One that never answered is still tried, DHT peers or not.
        assert_eq!(boot_two.due(now, |_| false, true).len(), 1);
        boot_two.dial_started(&other);
        boot_two.on_connected(&other);
        assert!(boot_two.due(now, |_| false, true).is_empty());
    }
}
