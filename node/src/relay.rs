//! Serving circuit relay v2 to others, within limits the operator sets.
//!
//! libp2p's relay counts a limit of 0 as zero (deny everything) and ships limits meant for
//! signaling only (128 KiB and 2 minutes per circuit). warren's defaults carry real traffic for a
//! few peers; every limit can be raised, lowered, or set to `"unlimited"` explicitly.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId, relay};

use crate::addresses::ip_of;
use crate::ip_limits::Source;
use serde::{Deserialize, Serialize};

/// A limit: a number, or `"unlimited"` said explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Unlimited,
    At(u64),
}

impl Limit {
    fn count(self) -> usize {
        match self {
            Limit::Unlimited => usize::MAX,
            Limit::At(n) => usize::try_from(n).unwrap_or(usize::MAX),
        }
    }

    fn bytes(self) -> u64 {
        match self {
            Limit::Unlimited => u64::MAX,
            Limit::At(n) => n,
        }
    }

    /// Seconds, capped at what the relay protocol can say (u32 seconds).
    fn secs(self) -> Duration {
        Duration::from_secs(match self {
            Limit::Unlimited => u64::from(u32::MAX),
            Limit::At(n) => n.min(u64::from(u32::MAX)),
        })
    }
}

impl Serialize for Limit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Limit::Unlimited => s.serialize_str("unlimited"),
            Limit::At(n) => s.serialize_u64(*n),
        }
    }
}

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(Limit::At(n)),
            Raw::Word(w) if w == "unlimited" => Ok(Limit::Unlimited),
            Raw::Word(w) => Err(serde::de::Error::custom(format!("expected a number or \"unlimited\", got {w:?}"))),
        }
    }
}

/// What a volunteer relay lets others use (`[relay_limits]` in the config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayLimits {
    /// Reservations held at once, all peers together. Default: 128.
    pub max_reservations: Limit,
    /// Reservations one peer holds at once (one per connection). Default: 2.
    pub max_reservations_per_peer: Limit,
    /// Peers from one IP address holding reservations at once. Default: 8.
    pub max_reservations_per_ip: Limit,
    /// How long a reservation lasts before the peer must renew it, seconds. Default: 3600.
    pub reservation_duration_secs: u64,
    /// Circuits relayed at once. Default: 64.
    pub max_circuits: Limit,
    /// Circuits a peer may take part in (as source or destination) and still open another as
    /// source. libp2p checks only the peer opening a circuit; circuits towards one destination are
    /// bounded by `max_circuits` and `max_circuits_per_ip` of their sources. Default: 8.
    pub max_circuits_per_peer: Limit,
    /// Circuits open (or opening) at once from one source IP address (one IPv6 /64), all its
    /// peers together. Default: 16.
    pub max_circuits_per_ip: Limit,
    /// A circuit is cut after this many seconds. Default: 3600.
    pub max_circuit_duration_secs: Limit,
    /// A circuit is cut after carrying this many bytes. Default: 1 GiB.
    pub max_circuit_bytes: Limit,
    /// New circuits one source peer may open per minute. Default: 60.
    pub circuits_per_peer_per_minute: Limit,
    /// All relayed traffic together, bytes per second (both directions counted). Default:
    /// 10 MiB/s, so a volunteer's uplink is never given away whole by surprise.
    pub max_relayed_bytes_per_sec: Limit,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            max_reservations: Limit::At(128),
            max_reservations_per_peer: Limit::At(2),
            max_reservations_per_ip: Limit::At(8),
            reservation_duration_secs: 3600,
            max_circuits: Limit::At(64),
            max_circuits_per_peer: Limit::At(8),
            max_circuits_per_ip: Limit::At(16),
            max_circuit_duration_secs: Limit::At(3600),
            max_circuit_bytes: Limit::At(1 << 30),
            circuits_per_peer_per_minute: Limit::At(60),
            max_relayed_bytes_per_sec: Limit::At(10 * 1024 * 1024),
        }
    }
}

impl RelayLimits {
    pub fn validate(&self) -> Result<(), String> {
        if self.reservation_duration_secs == 0 || self.reservation_duration_secs > u64::from(u32::MAX) {
            return Err("relay_limits.reservation_duration_secs must be between 1 and 4294967295".into());
        }
        if self.max_relayed_bytes_per_sec == Limit::At(0) {
            return Err("relay_limits.max_relayed_bytes_per_sec must be at least 1 (or \"unlimited\"); to relay nothing, turn the relay off".into());
        }
        if self.max_circuit_duration_secs == Limit::At(0) {
            return Err("relay_limits.max_circuit_duration_secs must be at least 1 (or \"unlimited\")".into());
        }
        Ok(())
    }

    /// The aggregate rate cap on relayed bytes, if any.
    pub fn bandwidth_cap(&self) -> Option<u64> {
        match self.max_relayed_bytes_per_sec {
            Limit::Unlimited => None,
            Limit::At(n) => Some(n),
        }
    }

    /// The libp2p relay configuration these limits stand for, and the per-IP reservation table
    /// it uses (the event loop tells it when reservations end).
    pub fn to_libp2p(&self) -> (relay::Config, RelayByIp) {
        let lifetime = Duration::from_secs(self.reservation_duration_secs);
        let per_peer = self.max_reservations_per_peer.count();
        let by_ip = RelayByIp {
            reservations: Arc::new(Mutex::new(PerIpReservations::new(self.max_reservations_per_ip.count(), lifetime))),
            circuits: Arc::new(Mutex::new(PerIpCircuits::new(self.max_circuits_per_ip.count()))),
        };
        let mut reservation_limiters: Vec<Box<dyn relay::RateLimiter>> = vec![Box::new(ReservationLimiter(by_ip.clone()))];
        if per_peer == 0 {
            reservation_limiters.push(Box::new(deny_all));
        }
        let mut config = relay::Config {
            max_reservations: self.max_reservations.count(),
            // libp2p denies a new reservation when the peer already holds *more than* this many,
            // so it allows one extra: pass one less to enforce the configured number.
            max_reservations_per_peer: per_peer.saturating_sub(1),
            reservation_duration: lifetime,
            reservation_rate_limiters: reservation_limiters,
            max_circuits: self.max_circuits.count(),
            // Same off-by-one in libp2p's circuit check (`>` rather than `>=`).
            max_circuits_per_peer: self.max_circuits_per_peer.count().saturating_sub(1),
            max_circuit_duration: self.max_circuit_duration_secs.secs(),
            max_circuit_bytes: self.max_circuit_bytes.bytes(),
            // Ours first: libp2p stops at the first limiter that denies, and ours must see
            // every request it is to count.
            circuit_src_rate_limiters: vec![Box::new(CircuitLimiter(by_ip.clone()))],
        };
        if self.max_circuits_per_peer == Limit::At(0) {
            config.circuit_src_rate_limiters.push(Box::new(deny_all));
        }
        if let Limit::At(n) = self.circuits_per_peer_per_minute {
            match NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX)) {
                Some(n) => config = config.circuit_src_per_peer(n, Duration::from_secs(60)),
                None => config.circuit_src_rate_limiters.push(Box::new(deny_all)),
            }
        }
        (config, by_ip)
    }
}

fn deny_all(_: PeerId, _: &Multiaddr, _: Instant) -> bool {
    false
}

/// Caps how many distinct peers from one IP address (one IPv6 /64) hold reservations.
/// libp2p's relay offers only rate limits per IP; this table tracks who holds a reservation
/// from where, and forgets a holder as soon as its reservation closes or times out (told by the
/// event loop through [`RelayByIp::on_event`]), so throwaway identities behind one
/// carrier-grade NAT address lock it out only while they hold their reservations. Entries whose
/// reservation would have expired are dropped too, in case an event was missed. Bounded: at
/// most [`PER_IP_TRACKED`] sources are remembered.
struct PerIpReservations {
    max: usize,
    lifetime: Duration,
    holders: HashMap<Source, HashMap<PeerId, Instant>>,
    sources: HashMap<PeerId, Source>,
}

const PER_IP_TRACKED: usize = 16_384;

impl PerIpReservations {
    fn new(max: usize, lifetime: Duration) -> Self {
        Self { max, lifetime, holders: HashMap::new(), sources: HashMap::new() }
    }

    fn try_next(&mut self, peer: PeerId, addr: &Multiaddr, now: Instant) -> bool {
        let Some(ip) = ip_of(addr) else { return true };
        let source = Source::of(ip);
        // A renewal arrives a little before expiry; keep a margin so it is not counted twice.
        let lifetime = self.lifetime + Duration::from_secs(60);
        if self.holders.len() >= PER_IP_TRACKED {
            self.holders.retain(|_, peers| {
                peers.retain(|_, at| now.duration_since(*at) < lifetime);
                !peers.is_empty()
            });
            self.sources.retain(|_, s| self.holders.contains_key(s));
            if self.holders.len() >= PER_IP_TRACKED && !self.holders.contains_key(&source) {
                return false;
            }
        }
        let peers = self.holders.entry(source).or_default();
        peers.retain(|_, at| now.duration_since(*at) < lifetime);
        if !peers.contains_key(&peer) && peers.len() >= self.max {
            return false;
        }
        peers.insert(peer, now);
        self.sources.insert(peer, source);
        true
    }

    fn release(&mut self, peer: &PeerId) {
        let Some(source) = self.sources.remove(peer) else { return };
        if let Some(peers) = self.holders.get_mut(&source) {
            peers.remove(peer);
            if peers.is_empty() {
                self.holders.remove(&source);
            }
        }
    }
}

/// How long a circuit request counted by [`PerIpCircuits`] may stay unresolved before its place
/// is given back anyway (libp2p's own circuit negotiation gives up well before).
const CIRCUIT_PENDING_TIMEOUT: Duration = Duration::from_secs(60);

/// Caps the circuits open or opening from one source IP (one IPv6 /64), all its peers together:
/// libp2p's relay caps circuits per peer and in all, so throwaway identities from one address
/// could take every circuit. A request is counted when the limiter admits it and given back when
/// libp2p reports it denied or failed, or when its circuit closes. (A denial that libp2p decided
/// before asking the limiters gives back an admitted request of the same peer still in flight, if
/// any, so the count can briefly fall short by one; never over.)
struct PerIpCircuits {
    max: usize,
    open: HashMap<Source, usize>,
    /// Admitted requests not yet accepted or denied, per source peer: where from, and when.
    pending: HashMap<PeerId, VecDeque<(Source, Instant)>>,
    /// Accepted circuits still open, per (source, destination), with their source IP.
    circuits: HashMap<(PeerId, PeerId), Vec<Source>>,
}

impl PerIpCircuits {
    fn new(max: usize) -> Self {
        Self { max, open: HashMap::new(), pending: HashMap::new(), circuits: HashMap::new() }
    }

    fn give_back(&mut self, source: Source) {
        if let Some(n) = self.open.get_mut(&source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.open.remove(&source);
            }
        }
    }

    fn try_next(&mut self, peer: PeerId, addr: &Multiaddr, now: Instant) -> bool {
        let Some(ip) = ip_of(addr) else { return true };
        let source = Source::of(ip);
        // Requests whose outcome was never reported give their place back.
        let mut expired = Vec::new();
        self.pending.retain(|_, waiting| {
            while waiting.front().is_some_and(|(_, at)| now.duration_since(*at) >= CIRCUIT_PENDING_TIMEOUT) {
                expired.extend(waiting.pop_front().map(|(s, _)| s));
            }
            !waiting.is_empty()
        });
        for source in expired {
            self.give_back(source);
        }
        let open = self.open.entry(source).or_default();
        if *open >= self.max {
            return false;
        }
        *open += 1;
        self.pending.entry(peer).or_default().push_back((source, now));
        true
    }

    fn on_event(&mut self, event: &relay::Event) {
        use relay::Event as E;
        #[allow(deprecated)]
        match event {
            E::CircuitReqAccepted { src_peer_id, dst_peer_id } => {
                if let Some(source) = self.take_pending(src_peer_id) {
                    self.circuits.entry((*src_peer_id, *dst_peer_id)).or_default().push(source);
                }
            }
            E::CircuitReqDenied { src_peer_id, .. }
            | E::CircuitReqDenyFailed { src_peer_id, .. }
            | E::CircuitReqOutboundConnectFailed { src_peer_id, .. }
            | E::CircuitReqAcceptFailed { src_peer_id, .. } => {
                if let Some(source) = self.take_pending(src_peer_id) {
                    self.give_back(source);
                }
            }
            E::CircuitClosed { src_peer_id, dst_peer_id, .. } => {
                let key = (*src_peer_id, *dst_peer_id);
                if let Some(sources) = self.circuits.get_mut(&key) {
                    let source = sources.pop();
                    if sources.is_empty() {
                        self.circuits.remove(&key);
                    }
                    if let Some(source) = source {
                        self.give_back(source);
                    }
                }
            }
            _ => {}
        }
    }

    fn take_pending(&mut self, peer: &PeerId) -> Option<Source> {
        let waiting = self.pending.get_mut(peer)?;
        let (source, _) = waiting.pop_front()?;
        if waiting.is_empty() {
            self.pending.remove(peer);
        }
        Some(source)
    }
}

/// The relay's per-IP tables, shared by its rate limiters and the event loop (which tells them
/// when reservations and circuits end).
#[derive(Clone)]
pub struct RelayByIp {
    reservations: Arc<Mutex<PerIpReservations>>,
    circuits: Arc<Mutex<PerIpCircuits>>,
}

impl RelayByIp {
    /// Forgets a holder whose reservation timed out, and follows circuits. (libp2p also reports
    /// `ReservationClosed` when a connection whose reservation was *denied* closes, so that event
    /// cannot tell a holder left: [`RelayByIp::on_disconnected`] does.)
    pub fn on_event(&self, event: &relay::Event) {
        if let relay::Event::ReservationTimedOut { src_peer_id } = event {
            self.on_disconnected(src_peer_id);
        }
        self.circuits.lock().expect("circuit table lock").on_event(event);
    }

    /// The peer has no connection left to us, so it holds no reservation: its place is free.
    pub fn on_disconnected(&self, peer: &PeerId) {
        self.reservations.lock().expect("reservation table lock").release(peer);
    }
}

struct ReservationLimiter(RelayByIp);

impl relay::RateLimiter for ReservationLimiter {
    fn try_next(&mut self, peer: PeerId, addr: &Multiaddr, now: Instant) -> bool {
        self.0.reservations.lock().expect("reservation table lock").try_next(peer, addr, now)
    }
}

struct CircuitLimiter(RelayByIp);

impl relay::RateLimiter for CircuitLimiter {
    fn try_next(&mut self, peer: PeerId, addr: &Multiaddr, now: Instant) -> bool {
        self.0.circuits.lock().expect("circuit table lock").try_next(peer, addr, now)
    }
}

/// What a relay has served, for `warren status` and metrics.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Peers holding a reservation now.
    pub reservations: HashMap<PeerId, u32>,
    /// Circuits open now, by (source, destination).
    pub circuits: HashMap<(PeerId, PeerId), u32>,
    pub reservations_accepted: u64,
    pub reservations_denied: u64,
    pub circuits_accepted: u64,
    pub circuits_denied: u64,
    /// Circuits that ended because of an error or a limit, with the last reason.
    pub circuits_cut: u64,
    pub last_denial: Option<String>,
    pub last_cut: Option<String>,
    /// Denials counted by what was denied and why ("reservation ResourceLimitExceeded"): a
    /// handful of keys, one per status the relay protocol has.
    pub denied_by_reason: BTreeMap<String, u64>,
}

pub type SharedRelayStats = Arc<Mutex<RelayStats>>;

impl RelayStats {
    pub fn on_event(&mut self, event: &relay::Event) {
        use relay::Event as E;
        match event {
            E::ReservationReqAccepted { src_peer_id, renewed, .. } => {
                if !renewed {
                    *self.reservations.entry(*src_peer_id).or_default() += 1;
                    self.reservations_accepted += 1;
                }
            }
            E::ReservationReqDenied { src_peer_id, status } => {
                self.reservations_denied += 1;
                self.last_denial = Some(format!("reservation from {src_peer_id}: {status:?}"));
                *self.denied_by_reason.entry(format!("reservation {status:?}")).or_default() += 1;
            }
            E::ReservationClosed { src_peer_id } | E::ReservationTimedOut { src_peer_id } => {
                if let Some(n) = self.reservations.get_mut(src_peer_id) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.reservations.remove(src_peer_id);
                    }
                }
            }
            E::CircuitReqDenied { src_peer_id, dst_peer_id, status } => {
                self.circuits_denied += 1;
                self.last_denial = Some(format!("circuit {src_peer_id} -> {dst_peer_id}: {status:?}"));
                *self.denied_by_reason.entry(format!("circuit {status:?}")).or_default() += 1;
            }
            E::CircuitReqAccepted { src_peer_id, dst_peer_id } => {
                *self.circuits.entry((*src_peer_id, *dst_peer_id)).or_default() += 1;
                self.circuits_accepted += 1;
            }
            E::CircuitClosed { src_peer_id, dst_peer_id, error } => {
                let key = (*src_peer_id, *dst_peer_id);
                if let Some(n) = self.circuits.get_mut(&key) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.circuits.remove(&key);
                    }
                }
                if let Some(error) = error {
                    self.circuits_cut += 1;
                    self.last_cut = Some(format!("circuit {src_peer_id} -> {dst_peer_id}: {error}"));
                }
            }
            _ => {}
        }
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn circuits_from_one_ip_are_capped_whatever_the_identities_and_freed_when_they_end() {
        use relay::Event as E;
        let mut table = PerIpCircuits::new(3);
        let cgnat: Multiaddr = "/ip4/100.64.0.1/udp/4001/quic-v1".parse().unwrap();
        let other: Multiaddr = "/ip6/2001:db8:1:2::9/udp/4001/quic-v1".parse().unwrap();
        let same_64: Multiaddr = "/ip6/2001:db8:1:2::77/udp/4001/quic-v1".parse().unwrap();
        let now = Instant::now();
        let dst = PeerId::random();
        let throwaways: Vec<PeerId> = (0..5).map(|_| PeerId::random()).collect();
        let admitted: Vec<bool> = throwaways.iter().map(|p| table.try_next(*p, &cgnat, now)).collect();
        assert_eq!(admitted, vec![true, true, true, false, false], "requests in flight count too");
        assert!(table.try_next(PeerId::random(), &other, now), "another address is not affected");
        // One is denied downstream (no reservation at the destination): its place comes back.
        table.on_event(&E::CircuitReqDenied { src_peer_id: throwaways[0], dst_peer_id: dst, status: relay::StatusCode::NoReservation });
        assert!(table.try_next(throwaways[3], &cgnat, now));
        // Two are accepted and so stay counted while open.
        for p in [throwaways[1], throwaways[2], throwaways[3]] {
            table.on_event(&E::CircuitReqAccepted { src_peer_id: p, dst_peer_id: dst });
        }
        assert!(!table.try_next(throwaways[4], &cgnat, now), "three open circuits fill the address");
        table.on_event(&E::CircuitClosed { src_peer_id: throwaways[1], dst_peer_id: dst, error: None });
        assert!(table.try_next(throwaways[4], &cgnat, now), "a closed circuit frees its place");
        // An IPv6 /64 is one source.
        let v6: Vec<bool> = (0..3).map(|_| table.try_next(PeerId::random(), &same_64, now)).collect();
        assert_eq!(v6, vec![true, true, false]);
        // A request whose outcome was never reported gives its place back after the timeout.
        assert!(table.try_next(PeerId::random(), &same_64, now + CIRCUIT_PENDING_TIMEOUT));
    }

    #[test]
    fn per_ip_reservations_are_capped_and_peers_may_renew() {
        let mut limiter = PerIpReservations::new(2, Duration::from_secs(3600));
        let addr: Multiaddr = "/ip4/192.0.2.1/tcp/1".parse().unwrap();
        let now = Instant::now();
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        assert!(limiter.try_next(a, &addr, now));
        assert!(limiter.try_next(b, &addr, now));
        assert!(!limiter.try_next(c, &addr, now), "a third peer from the same IP is denied");
        assert!(limiter.try_next(a, &addr, now), "a holder may renew");
        let other: Multiaddr = "/ip4/192.0.2.2/tcp/1".parse().unwrap();
        assert!(limiter.try_next(c, &other, now), "another IP has its own cap");
    }

    #[test]
    fn a_closed_reservation_frees_its_place_at_once_and_ipv6_counts_per_64() {
        let table = RelayByIp {
            reservations: Arc::new(Mutex::new(PerIpReservations::new(2, Duration::from_secs(3600)))),
            circuits: Arc::new(Mutex::new(PerIpCircuits::new(16))),
        };
        let mut limiter = ReservationLimiter(table.clone());
        use relay::RateLimiter;
        let now = Instant::now();
        let addr: Multiaddr = "/ip4/192.0.2.1/tcp/1".parse().unwrap();
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        assert!(limiter.try_next(a, &addr, now) && limiter.try_next(b, &addr, now));
        assert!(!limiter.try_next(c, &addr, now));
        table.on_event(&relay::Event::ReservationClosed { src_peer_id: a });
        assert!(!limiter.try_next(c, &addr, now), "libp2p says closed for denied connections too: not enough");
        table.on_disconnected(&a);
        assert!(limiter.try_next(c, &addr, now), "the place is free as soon as the holder left, not an hour later");
        table.on_event(&relay::Event::ReservationTimedOut { src_peer_id: b });
        assert!(limiter.try_next(a, &addr, now), "a reservation that timed out frees its place too");

        let v6 = |s: &str| -> Multiaddr { format!("/ip6/{s}/udp/1/quic-v1").parse().unwrap() };
        let (d, e, f) = (PeerId::random(), PeerId::random(), PeerId::random());
        assert!(limiter.try_next(d, &v6("2001:db8:0:1::1"), now));
        assert!(limiter.try_next(e, &v6("2001:db8:0:1::2"), now));
        assert!(!limiter.try_next(f, &v6("2001:db8:0:1:ffff::3"), now), "one /64 is one source");
        assert!(limiter.try_next(f, &v6("2001:db8:0:2::1"), now));
    }

    #[test]
    fn limits_parse_numbers_and_unlimited() {
        #[derive(Deserialize)]
        struct T {
            a: Limit,
            b: Limit,
        }
        let t: T = toml::from_str("a = 5\nb = \"unlimited\"").unwrap();
        assert_eq!(t.a, Limit::At(5));
        assert_eq!(t.b, Limit::Unlimited);
        assert!(toml::from_str::<T>("a = \"lots\"\nb = 1").is_err());
    }
}
