//! Automatic relay use ("AutoRelay", which rust-libp2p does not have): a node that is not
//! publicly reachable picks relays itself and holds reservations on them, so others can reach it
//! by PeerId through `/p2p-circuit` addresses.
//!
//! Candidates are peers that offer the relay hop protocol (seen through identify) at a public
//! address (globally routable, or in `public_ranges`). Relays announce themselves in the DHT as
//! providers of [`RELAYS_KEY`]; a node short of candidates looks there. The relay client in
//! libp2p renews reservations before they expire and confirms the circuit address as an external
//! address (so identify and the DHT advertise it); this module decides *which* relays, replaces
//! lost ones, and pins `--relay-via` relays.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId, core::transport::ListenerId, multiaddr::Protocol};

use crate::addresses::without_p2p;

/// The DHT key relays provide, so nodes can find relays they are not connected to.
pub const RELAYS_KEY: &[u8] = b"/warren/relays/1";
/// After a relay refused or dropped us, it is not tried again for this long.
const RETRY_AFTER: Duration = Duration::from_secs(30);
/// How often the DHT is asked for relays while candidates are short.
const LOOKUP_EVERY: Duration = Duration::from_secs(30);
/// A relay being dialed is not dialed again for this long.
const DIAL_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct Held {
    pub relay: PeerId,
    /// The relay's address we reserve through (no /p2p-circuit).
    pub relay_addr: Multiaddr,
    pub pinned: bool,
    /// Set once the relay accepted the reservation.
    pub accepted_at: Option<Instant>,
    pub renewals: u32,
}

pub struct AutoRelay {
    /// Reservations wanted while not publicly reachable.
    target: usize,
    pinned: Vec<(PeerId, Multiaddr)>,
    candidates: HashMap<PeerId, Vec<Multiaddr>>,
    held: HashMap<ListenerId, Held>,
    /// Relays that refused or dropped us, not tried again until then.
    retry_after: HashMap<PeerId, Instant>,
    /// Relays being dialed (a reservation is asked for once connected), not dialed again until then.
    dialing: HashMap<PeerId, Instant>,
    last_lookup: Option<Instant>,
    pub last_error: Option<String>,
}

/// What the event loop should do after [`AutoRelay::tick`].
pub struct Actions {
    /// Listen through these relay addresses (`…/p2p/RELAY/p2p-circuit`).
    pub reserve: Vec<(PeerId, Multiaddr, bool)>,
    /// Close these reservations (no longer wanted).
    pub release: Vec<ListenerId>,
    /// Ask the DHT for relays.
    pub lookup: bool,
    /// Connect to these relays first (a reservation is asked for on an existing connection:
    /// libp2p's relay client gives up if its own dial races another dial to the same peer).
    pub dial: Vec<(PeerId, Multiaddr)>,
}

impl AutoRelay {
    pub fn new(target: usize, relay_via: &[Multiaddr]) -> Self {
        let pinned = relay_via
            .iter()
            .filter_map(|addr| match addr.iter().last() {
                Some(Protocol::P2p(peer)) => Some((peer, addr.clone())),
                _ => None,
            })
            .collect();
        Self {
            target,
            pinned,
            candidates: HashMap::new(),
            held: HashMap::new(),
            retry_after: HashMap::new(),
            dialing: HashMap::new(),
            last_lookup: None,
            last_error: None,
        }
    }

    /// A peer offers the hop protocol at these public addresses (empty: it is no candidate).
    pub fn on_identify(&mut self, peer: PeerId, relay_addrs: Vec<Multiaddr>) {
        if relay_addrs.is_empty() {
            self.candidates.remove(&peer);
        } else {
            self.candidates.insert(peer, relay_addrs);
        }
    }

    pub fn candidates(&self) -> usize {
        self.candidates.len()
    }

    pub fn is_relay_listener(&self, id: ListenerId) -> bool {
        self.held.contains_key(&id)
    }

    pub fn on_listening(&mut self, id: ListenerId) {
        if let Some(held) = self.held.get_mut(&id)
            && held.accepted_at.is_none()
        {
            held.accepted_at = Some(Instant::now());
            tracing::info!(relay = %held.relay, "relay reservation accepted; reachable through it");
        }
    }

    pub fn on_renewal(&mut self, relay: PeerId) {
        for held in self.held.values_mut().filter(|h| h.relay == relay) {
            held.renewals += 1;
        }
    }

    /// A relay listener closed: the reservation was refused, expired, or the relay went away.
    pub fn on_listener_closed(&mut self, id: ListenerId, reason: Result<(), String>) {
        let Some(held) = self.held.remove(&id) else { return };
        let why = reason.err().unwrap_or_else(|| "closed".into());
        tracing::warn!(relay = %held.relay, reason = %why, "relay reservation lost; picking another relay");
        self.last_error = Some(format!("{}: {why}", held.relay));
        self.retry_after.insert(held.relay, Instant::now() + RETRY_AFTER);
    }

    /// A connection to `peer` is up: a relay we were dialing can be asked at once.
    pub fn on_connected(&mut self, peer: PeerId) {
        self.dialing.remove(&peer);
    }

    /// The relay disconnected: it stops being a candidate until it is seen again.
    pub fn on_disconnected(&mut self, peer: PeerId) {
        self.candidates.remove(&peer);
    }

    pub fn held(&self) -> impl Iterator<Item = &Held> {
        self.held.values()
    }

    /// Decides which reservations to add or drop. `wanted` is false while the node is publicly
    /// reachable (pinned relays are kept regardless).
    /// `can_look_up`: whether the DHT can be asked now (it has peers).
    pub fn tick(&mut self, wanted: bool, can_look_up: bool, connected: impl Fn(&PeerId) -> bool) -> Actions {
        let now = Instant::now();
        self.retry_after.retain(|_, until| *until > now);
        self.dialing.retain(|_, until| *until > now);
        let waiting = |me: &Self, peer: &PeerId| me.retry_after.contains_key(peer) || me.dialing.contains_key(peer);
        let mut actions = Actions { reserve: Vec::new(), release: Vec::new(), lookup: false, dial: Vec::new() };
        let holds = |held: &HashMap<ListenerId, Held>, peer: &PeerId| held.values().any(|h| h.relay == *peer);
        for (peer, addr) in &self.pinned {
            if holds(&self.held, peer) || waiting(self, peer) {
                continue;
            }
            if connected(peer) {
                actions.reserve.push((*peer, without_p2p(addr), true));
            } else {
                actions.dial.push((*peer, addr.clone()));
                self.dialing.insert(*peer, now + DIAL_WAIT);
            }
        }
        if !wanted {
            actions.release = self.held.iter().filter(|(_, h)| !h.pinned).map(|(id, _)| *id).collect();
            return actions;
        }
        let automatic = self.held.values().filter(|h| !h.pinned).count();
        let mut missing = self.target.saturating_sub(automatic);
        if missing == 0 {
            return actions;
        }
        // Connected candidates first (no dial needed), then the rest; stable order by PeerId.
        let mut choices: Vec<(PeerId, Multiaddr)> = self
            .candidates
            .iter()
            .filter(|(peer, _)| !holds(&self.held, peer) && !waiting(self, peer))
            .filter(|(peer, _)| !self.pinned.iter().any(|(p, _)| p == *peer))
            .map(|(peer, addrs)| (*peer, addrs[0].clone()))
            .collect();
        choices.sort_by_key(|(peer, _)| (!connected(peer), peer.to_bytes()));
        for (peer, addr) in choices {
            if missing == 0 {
                break;
            }
            if connected(&peer) {
                actions.reserve.push((peer, addr, false));
            } else {
                actions.dial.push((peer, addr.with(Protocol::P2p(peer))));
                self.dialing.insert(peer, now + DIAL_WAIT);
            }
            missing -= 1;
        }
        if missing > 0 && can_look_up && self.last_lookup.is_none_or(|at| now.duration_since(at) >= LOOKUP_EVERY) {
            self.last_lookup = Some(now);
            actions.lookup = true;
        }
        actions
    }

    /// Records a reservation attempt the event loop started.
    pub fn reserving(&mut self, id: ListenerId, relay: PeerId, relay_addr: Multiaddr, pinned: bool) {
        self.held.insert(id, Held { relay, relay_addr, pinned, accepted_at: None, renewals: 0 });
    }

    /// Starting a reservation failed at once (bad address, say).
    pub fn reserve_failed(&mut self, relay: PeerId, error: String) {
        tracing::warn!(relay = %relay, %error, "cannot reserve on relay");
        self.last_error = Some(format!("{relay}: {error}"));
        self.retry_after.insert(relay, Instant::now() + RETRY_AFTER);
    }
}

/// The listen address that asks the relay client for a reservation through the relay.
pub fn circuit_listen_addr(relay: PeerId, relay_addr: &Multiaddr) -> Multiaddr {
    relay_addr.clone().with(Protocol::P2p(relay)).with(Protocol::P2pCircuit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> Multiaddr {
        format!("/ip4/192.0.2.1/udp/{port}/quic-v1").parse().unwrap()
    }

    #[test]
    fn picks_the_target_number_of_relays_and_replaces_a_lost_one() {
        let mut auto = AutoRelay::new(2, &[]);
        let relays: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
        for (i, r) in relays.iter().enumerate() {
            auto.on_identify(*r, vec![addr(4000 + i as u16)]);
        }
        let actions = auto.tick(true, true, |_| true);
        assert_eq!(actions.reserve.len(), 2);
        let mut ids = Vec::new();
        for (i, (peer, addr, pinned)) in actions.reserve.into_iter().enumerate() {
            let id = ListenerId::next();
            auto.reserving(id, peer, addr, pinned);
            auto.on_listening(id);
            ids.push((id, i));
        }
        assert!(auto.tick(true, true, |_| true).reserve.is_empty(), "two held: nothing more to do");
        // Lose one: the third relay is chosen, not the lost one.
        let (lost_id, _) = ids[0];
        let lost = auto.held.get(&lost_id).unwrap().relay;
        auto.on_listener_closed(lost_id, Err("connection closed".into()));
        let actions = auto.tick(true, true, |_| true);
        assert_eq!(actions.reserve.len(), 1);
        assert_ne!(actions.reserve[0].0, lost);
        // Publicly reachable: automatic reservations are released.
        let actions = auto.tick(false, true, |_| true);
        assert_eq!(actions.release.len(), 1);
    }

    #[test]
    fn pinned_relays_are_reserved_even_when_public() {
        let relay = PeerId::random();
        let via = addr(4001).with(Protocol::P2p(relay));
        let mut auto = AutoRelay::new(0, std::slice::from_ref(&via));
        let actions = auto.tick(false, true, |_| false);
        assert_eq!(actions.dial, vec![(relay, via.clone())], "dialed first");
        assert!(actions.reserve.is_empty());
        auto.on_connected(relay);
        let actions = auto.tick(false, true, |_| true);
        assert_eq!(actions.reserve, vec![(relay, addr(4001), true)], "reserved once connected");
    }
}
