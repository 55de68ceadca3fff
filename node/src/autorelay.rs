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
//!
//! Choice: a relay that could attract every NATed node near it (a ground PeerId, a burst of
//! connections, a fleet of relays in one network) would see who talks to whom and could drop them
//! all at once. So candidates are ordered by, in turn: not sharing a network (an IPv4 /16, an IPv6
//! /32) with a relay already held or just chosen; how they served us before (held our
//! reservations for a while without dropping them; never tried; dropped us); a round trip that is
//! short enough (one under [`NEAR_RTT`] is as good as another); and then chance.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId, core::transport::ListenerId, multiaddr::Protocol};

use crate::addresses::{ip_of, without_p2p};

/// The DHT key relays provide, so nodes can find relays they are not connected to.
pub const RELAYS_KEY: &[u8] = b"/warren/relays/1";
/// After a relay refused or dropped us, it is not tried again for this long.
const RETRY_AFTER: Duration = Duration::from_secs(30);
/// How often the DHT is asked for relays while candidates are short.
const LOOKUP_EVERY: Duration = Duration::from_secs(30);
/// Relays a lookup connects to beyond the reservations missing: one dial may fail or one relay
/// refuse, and the next lookup is 30 s away. Connecting to every relay a lookup finds, as
/// before, made 4,507 relay dials in a run of `simulations/dht-scale` (500 nodes, 36 of them
/// relays; 725 with this limit), each a handshake and an identify for a relay that mostly had
/// nothing to give.
const LOOKUP_SPARE_DIALS: usize = 1;
/// A relay being dialed is not dialed again for this long.
const DIAL_WAIT: Duration = Duration::from_secs(5);
/// A relay that has held our reservations this long in all, dropping them at most once an hour,
/// has served us well (ten minutes: a reservation renewed a few times).
const GOOD_AFTER: Duration = Duration::from_secs(10 * 60);
/// Round trips below this count as equally good: traffic through a relay is a detour anyway, and
/// preferring the very nearest would hand the choice to whoever sits closest.
pub const NEAR_RTT: Duration = Duration::from_millis(150);
/// How many relays' histories are kept (oldest forgotten first): a bound on what a stream of
/// short-lived candidates can make us remember.
const MAX_TRACKED: usize = 1024;

/// What the event loop knows of a candidate right now.
#[derive(Debug, Clone, Copy, Default)]
pub struct Seen {
    pub connected: bool,
    /// The last ping round trip on a connection to it.
    pub rtt: Option<Duration>,
}

/// How a relay served us while this node has run.
#[derive(Debug, Clone, Copy)]
struct Track {
    /// Time our reservations on it were held, closed ones summed.
    held_for: Duration,
    /// Reservations it refused or dropped.
    lost: u32,
    last_used: Instant,
}

impl Track {
    /// 0: served well, 1: untried, 2: dropped us (more than once an hour of service).
    fn class(track: Option<&Track>) -> u8 {
        match track {
            None => 1,
            Some(t) if t.held_for >= GOOD_AFTER && u64::from(t.lost) <= t.held_for.as_secs() / 3600 => 0,
            Some(t) if t.lost == 0 => 1,
            Some(_) => 2,
        }
    }
}

/// The network a relay is in, for spreading reservations: IPv4 /16, IPv6 /32 (the usual size of
/// one provider's allocation).
fn network(addr: &Multiaddr) -> Option<(bool, [u8; 4])> {
    match ip_of(addr)? {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            Some((false, [o[0], o[1], 0, 0]))
        }
        IpAddr::V6(v6) => {
            let o = v6.octets();
            Some((true, [o[0], o[1], o[2], o[3]]))
        }
    }
}

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
    /// How each relay we used served us.
    tracks: HashMap<PeerId, Track>,
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
            tracks: HashMap::new(),
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

    /// Each relay candidate and the public addresses it offers the hop protocol at.
    pub fn candidate_addrs(&self) -> impl Iterator<Item = (&PeerId, &Vec<Multiaddr>)> {
        self.candidates.iter()
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
        self.track(held.relay, held.accepted_at.map(|at| at.elapsed()).unwrap_or_default(), true);
        let why = reason.err().unwrap_or_else(|| "closed".into());
        tracing::warn!(relay = %held.relay, reason = %why, "relay reservation lost; picking another relay");
        self.last_error = Some(format!("{}: {why}", held.relay));
        self.retry_after.insert(held.relay, Instant::now() + RETRY_AFTER);
    }

    /// Adds to a relay's history (`lost`: it refused or dropped a reservation).
    fn track(&mut self, relay: PeerId, held_for: Duration, lost: bool) {
        if self.tracks.len() >= MAX_TRACKED && !self.tracks.contains_key(&relay)
            && let Some(oldest) = self.tracks.iter().min_by_key(|(_, t)| t.last_used).map(|(p, _)| *p)
        {
            self.tracks.remove(&oldest);
        }
        let track = self.tracks.entry(relay).or_insert(Track { held_for: Duration::ZERO, lost: 0, last_used: Instant::now() });
        track.held_for += held_for;
        track.lost += u32::from(lost);
        track.last_used = Instant::now();
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
    pub fn tick(&mut self, wanted: bool, can_look_up: bool, seen: impl Fn(&PeerId) -> Seen) -> Actions {
        let connected = |peer: &PeerId| seen(peer).connected;
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
            // Released by us, not lost: out of `held` now, so their closing counts against nobody.
            // A reservation still waiting for the relay's answer is released once it is accepted
            // (a later tick) or fails: libp2p's relay client panics when an answer arrives for a
            // reservation whose listener is gone ("Relay connection exist", libp2p-relay 0.22),
            // which a public node met when AutoNAT confirmed it while its first reservation was
            // under way (`simulations/dht-scale`, 1,000 nodes).
            actions.release = self.held.iter().filter(|(_, h)| !h.pinned && h.accepted_at.is_some()).map(|(id, _)| *id).collect();
            for id in &actions.release {
                if let Some(held) = self.held.remove(id) {
                    self.track(held.relay, held.accepted_at.map(|at| at.elapsed()).unwrap_or_default(), false);
                }
            }
            return actions;
        }
        let automatic = self.held.values().filter(|h| !h.pinned).count();
        let mut missing = self.target.saturating_sub(automatic);
        if missing == 0 {
            return actions;
        }
        // The module docs' order: spread over networks, served well, near enough, then chance.
        let mut choices: Vec<(PeerId, Multiaddr, (u8, u8, u64))> = self
            .candidates
            .iter()
            .filter(|(peer, _)| !holds(&self.held, peer) && !waiting(self, peer))
            .filter(|(peer, _)| !self.pinned.iter().any(|(p, _)| p == *peer))
            .map(|(peer, addrs)| {
                // Only a slow round trip counts against a relay: favouring the ones we happen to
                // be connected to would favour whoever connects to everybody.
                let rtt_class = u8::from(seen(peer).rtt.is_some_and(|rtt| rtt >= NEAR_RTT));
                (*peer, addrs[0].clone(), (Track::class(self.tracks.get(peer)), rtt_class, rand::random::<u64>()))
            })
            .collect();
        choices.sort_by_key(|(_, _, key)| *key);
        let mut networks: HashSet<_> = self.held.values().filter_map(|h| network(&h.relay_addr)).collect();
        while missing > 0 && !choices.is_empty() {
            // The best candidate in a network not used yet; failing that, the best one.
            let at = choices
                .iter()
                .position(|(_, addr, _)| network(addr).is_none_or(|n| !networks.contains(&n)))
                .unwrap_or(0);
            let (peer, addr, _) = choices.remove(at);
            networks.extend(network(&addr));
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

    /// How many of the relays a DHT lookup finds to connect to: the reservations missing, and
    /// [`LOOKUP_SPARE_DIALS`].
    pub fn dials_per_lookup(&self) -> usize {
        let automatic = self.held.values().filter(|h| !h.pinned).count();
        self.target.saturating_sub(automatic) + LOOKUP_SPARE_DIALS
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

    const CONNECTED: Seen = Seen { connected: true, rtt: None };

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
        let actions = auto.tick(true, true, |_| CONNECTED);
        assert_eq!(actions.reserve.len(), 2);
        let mut ids = Vec::new();
        for (i, (peer, addr, pinned)) in actions.reserve.into_iter().enumerate() {
            let id = ListenerId::next();
            auto.reserving(id, peer, addr, pinned);
            auto.on_listening(id);
            ids.push((id, i));
        }
        assert!(auto.tick(true, true, |_| CONNECTED).reserve.is_empty(), "two held: nothing more to do");
        // Lose one: the third relay is chosen, not the lost one.
        let (lost_id, _) = ids[0];
        let lost = auto.held.get(&lost_id).unwrap().relay;
        auto.on_listener_closed(lost_id, Err("connection closed".into()));
        let actions = auto.tick(true, true, |_| CONNECTED);
        assert_eq!(actions.reserve.len(), 1);
        assert_ne!(actions.reserve[0].0, lost);
        // Publicly reachable: automatic reservations are released.
        let actions = auto.tick(false, true, |_| CONNECTED);
        assert_eq!(actions.release.len(), 1);
    }

    #[test]
    fn a_relay_lookup_connects_to_the_relays_missing_and_one_spare() {
        let mut auto = AutoRelay::new(2, &[]);
        assert_eq!(auto.dials_per_lookup(), 3);
        let relay = PeerId::random();
        auto.on_identify(relay, vec![addr(4000)]);
        let (peer, relay_addr, pinned) = auto.tick(true, true, |_| CONNECTED).reserve.remove(0);
        auto.reserving(ListenerId::next(), peer, relay_addr, pinned);
        assert_eq!(auto.dials_per_lookup(), 2, "one reservation under way");
    }

    #[test]
    fn a_reservation_awaiting_its_answer_is_released_only_once_accepted() {
        let mut auto = AutoRelay::new(1, &[]);
        let relay = PeerId::random();
        auto.on_identify(relay, vec![addr(4000)]);
        let (peer, relay_addr, pinned) = auto.tick(true, true, |_| CONNECTED).reserve.remove(0);
        let id = ListenerId::next();
        auto.reserving(id, peer, relay_addr, pinned);
        // AutoNAT finds us public while the relay has not answered: the listener stays.
        assert!(auto.tick(false, true, |_| CONNECTED).release.is_empty());
        assert!(auto.is_relay_listener(id));
        auto.on_listening(id);
        assert_eq!(auto.tick(false, true, |_| CONNECTED).release, vec![id]);
        assert!(!auto.is_relay_listener(id));
    }

    #[test]
    fn pinned_relays_are_reserved_even_when_public() {
        let relay = PeerId::random();
        let via = addr(4001).with(Protocol::P2p(relay));
        let mut auto = AutoRelay::new(0, std::slice::from_ref(&via));
        let actions = auto.tick(false, true, |_| Seen::default());
        assert_eq!(actions.dial, vec![(relay, via.clone())], "dialed first");
        assert!(actions.reserve.is_empty());
        auto.on_connected(relay);
        let actions = auto.tick(false, true, |_| CONNECTED);
        assert_eq!(actions.reserve, vec![(relay, addr(4001), true)], "reserved once connected");
    }

    /// `count` candidates, relay `i` at 198.51.`i`.1 (each in a network of its own unless
    /// `same_network`, then all in 203.0.0.0/16).
    fn candidates(auto: &mut AutoRelay, count: u8, same_network: bool) -> Vec<PeerId> {
        (0..count)
            .map(|i| {
                let peer = PeerId::random();
                let ip = if same_network { format!("203.0.{i}.1") } else { format!("198.{}.0.1", 10 + i) };
                auto.on_identify(peer, vec![format!("/ip4/{ip}/udp/4001/quic-v1").parse().unwrap()]);
                peer
            })
            .collect()
    }

    fn chosen(actions: &Actions) -> Vec<PeerId> {
        actions.reserve.iter().map(|(p, _, _)| *p).collect()
    }

    #[test]
    fn the_choice_is_random_not_by_peer_id() {
        let mut lowest_first = 0;
        let mut firsts = HashSet::new();
        for _ in 0..200 {
            let mut auto = AutoRelay::new(1, &[]);
            let peers = candidates(&mut auto, 10, false);
            let lowest = *peers.iter().min_by_key(|p| p.to_bytes()).unwrap();
            let picked = chosen(&auto.tick(true, true, |_| CONNECTED))[0];
            lowest_first += usize::from(picked == lowest);
            firsts.insert(peers.iter().position(|p| *p == picked).unwrap());
        }
        // One in ten on average; sorting by PeerId picked it every time.
        assert!(lowest_first < 60, "the lowest PeerId was picked {lowest_first} times in 200");
        assert!(firsts.len() >= 8, "picks spread over the candidates: {firsts:?}");
    }

    #[test]
    fn reservations_spread_over_networks() {
        for _ in 0..50 {
            let mut auto = AutoRelay::new(2, &[]);
            // Eight relays in one /16 and one elsewhere: the lone one is always taken.
            let crowd = candidates(&mut auto, 8, true);
            let lone = candidates(&mut auto, 1, false)[0];
            let picked = chosen(&auto.tick(true, true, |_| CONNECTED));
            assert_eq!(picked.len(), 2);
            assert!(picked.contains(&lone), "{picked:?}");
            assert!(picked.iter().any(|p| crowd.contains(p)), "the second comes from the crowd when nothing else is left");
        }
    }

    #[test]
    fn relays_that_served_well_come_first_and_ones_that_dropped_us_last() {
        for _ in 0..20 {
            let mut auto = AutoRelay::new(1, &[]);
            let peers = candidates(&mut auto, 6, false);
            auto.track(peers[0], Duration::from_secs(3600), true);
            auto.track(peers[1], Duration::from_secs(60), true);
            assert_eq!(chosen(&auto.tick(true, true, |_| CONNECTED)), vec![peers[0]], "held an hour, dropped once");
            // Without it, any untried relay beats the one that dropped us after a minute.
            auto.candidates.remove(&peers[0]);
            let picked = chosen(&auto.tick(true, true, |_| CONNECTED))[0];
            assert!(picked != peers[1], "a relay that dropped us is taken last");
            // A slow relay only when nothing else is left.
            let mut auto = AutoRelay::new(1, &[]);
            let peers = candidates(&mut auto, 2, false);
            let slow = peers[0];
            let seen = |p: &PeerId| Seen { connected: true, rtt: Some(if *p == slow { NEAR_RTT * 2 } else { NEAR_RTT / 2 }) };
            assert_eq!(chosen(&auto.tick(true, true, seen)), vec![peers[1]]);
        }
    }

    #[test]
    fn a_release_is_not_held_against_the_relay() {
        let mut auto = AutoRelay::new(1, &[]);
        let peer = candidates(&mut auto, 1, false)[0];
        let (relay, addr, pinned) = auto.tick(true, true, |_| CONNECTED).reserve.remove(0);
        let id = ListenerId::next();
        auto.reserving(id, relay, addr, pinned);
        auto.on_listening(id);
        assert_eq!(auto.tick(false, true, |_| CONNECTED).release, vec![id]);
        auto.on_listener_closed(id, Ok(()));
        assert_eq!(auto.tracks[&peer].lost, 0);
        assert!(auto.retry_after.is_empty(), "free to be used again at once");
    }
}
