//! What kind of network we are in, told from evidence: the addresses peers see us at (identify's
//! observed address), what AutoNAT confirmed, what the gateway's port-mapping protocol said,
//! whether QUIC gets out at all, and the first hops towards a peer. `warren netcheck` shows all
//! of it; `warren status` shows the NAT type.
//!
//! The mapping behaviour (RFC 4787) is told from QUIC alone: every QUIC connection, inbound or
//! outbound, uses the one socket we listen on, so two peers at different IPs seeing us at the
//! same public port means the NAT keeps one mapping for every destination (endpoint-independent,
//! "easy": hole punching works), and different ports mean a new mapping per destination
//! (endpoint-dependent, "symmetric"). TCP dials may come from other local ports, so what TCP
//! peers see says nothing about the mapping and is only listed.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Observations kept, newest first, one per observer and transport: enough for every peer a
/// node talks to at once on a home connection, bounded against a peer that reconnects from
/// ever new addresses.
pub const OBSERVATIONS_KEPT: usize = 64;
/// An observation older than this no longer describes the NAT (mappings expire, routers restart).
pub const OBSERVATION_TTL: Duration = Duration::from_secs(30 * 60);

/// The transport an observation was made on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Quic,
    Tcp,
}

/// A peer at `observer` (a public address, beyond any NAT of ours) saw us at `observed`.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub observer: IpAddr,
    pub observed: SocketAddr,
    pub transport: Transport,
    pub at: Instant,
}

/// The latest observations, at most [`OBSERVATIONS_KEPT`].
#[derive(Debug, Default)]
pub struct Observations {
    recent: VecDeque<Observation>,
}

impl Observations {
    pub fn record(&mut self, observation: Observation) {
        self.recent.retain(|o| !(o.observer == observation.observer && o.transport == observation.transport));
        self.recent.push_front(observation);
        self.recent.truncate(OBSERVATIONS_KEPT);
    }

    /// Those younger than [`OBSERVATION_TTL`] at `now`, newest first.
    pub fn current(&self, now: Instant) -> Vec<Observation> {
        self.recent.iter().filter(|o| now.saturating_duration_since(o.at) < OBSERVATION_TTL).cloned().collect()
    }
}

/// How the NAT maps our QUIC socket's address (RFC 4787 terms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mapping {
    /// Peers see the address we listen on: there is no NAT.
    None,
    /// One public address for every destination: an "easy" NAT, hole punching works.
    EndpointIndependent,
    /// A different public port per destination: a "symmetric" NAT.
    EndpointDependent,
    /// Not enough observations to tell.
    Unknown,
}

/// Whether UDP (hence QUIC) gets out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Udp {
    Works,
    Blocked,
    Unknown,
}

/// The one-word answer: what the network is, for connectivity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NatType {
    /// Reachable at an address of our own: no NAT.
    Public,
    /// Behind a NAT whose gateway forwards our ports on request, and a peer dialed us back there.
    PortMapped,
    /// Behind one endpoint-independent NAT.
    Easy,
    /// Behind an endpoint-dependent NAT.
    Symmetric,
    /// Behind two NATs (each of them easy, or not known).
    DoubleNat,
    /// UDP does not get out: QUIC is impossible, TCP carries everything.
    UdpBlocked,
    Unknown,
}

impl NatType {
    pub fn as_str(self) -> &'static str {
        match self {
            NatType::Public => "public",
            NatType::PortMapped => "port-mapped",
            NatType::Easy => "easy",
            NatType::Symmetric => "symmetric",
            NatType::DoubleNat => "double-nat",
            NatType::UdpBlocked => "udp-blocked",
            NatType::Unknown => "unknown",
        }
    }
}

/// One hop on the way to a public peer: the router that said the packet's time ran out there,
/// or `None` when no answer came.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hop {
    pub ttl: u8,
    pub addr: Option<Ipv4Addr>,
    /// Whether `addr` is public (configured public ranges count).
    pub public: bool,
    /// The destination itself answered (the trace ends here).
    pub destination: bool,
}

/// A QUIC dial made to learn whether UDP gets out and how peers see us.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuicProbe {
    pub tried: usize,
    pub reached: usize,
}

/// Everything the assessment is made from, gathered by the event loop.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    /// The IPs we listen on (wildcards expanded by the listeners).
    pub local_ips: Vec<IpAddr>,
    /// The UDP ports our QUIC listeners use.
    pub quic_ports: Vec<u16>,
    /// Current observations by public peers.
    pub observations: Vec<Observation>,
    /// AutoNAT-confirmed external addresses: (IP, whether public).
    pub confirmed: Vec<IpAddr>,
    /// Direct QUIC connections open now.
    pub quic_connections: usize,
    /// Direct TCP connections open now.
    pub tcp_connections: usize,
    pub quic_probe: Option<QuicProbe>,
    /// The external addresses the gateway mapped for us, with whether each is public.
    pub port_mapped: Vec<(std::net::SocketAddrV4, bool)>,
    pub hops: Vec<Hop>,
}

/// What the evidence says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assessment {
    pub nat_type: NatType,
    pub mapping: Mapping,
    /// With an endpoint-independent mapping: the one address peers see our QUIC socket at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quic_mapped: Option<SocketAddr>,
    pub udp: Udp,
    /// `Some(true)` behind two NATs, `Some(false)` behind at most one, `None` when it cannot be told.
    pub double_nat: Option<bool>,
    /// Why each answer was given, one line each.
    pub reasons: Vec<String>,
    /// The sentence a user reads.
    pub verdict: String,
}

fn is_cgnat(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    o[0] == 100 && (o[1] & 0xc0) == 64
}

/// The QUIC observations over IPv4, newest first: what the mapping is told from.
fn quic_v4(e: &Evidence) -> Vec<&Observation> {
    e.observations.iter().filter(|o| o.transport == Transport::Quic && o.observed.is_ipv4()).collect()
}

/// The mapping behaviour, from QUIC observations over IPv4 (one per observer, newest first).
pub fn mapping_of(e: &Evidence, reasons: &mut Vec<String>) -> (Mapping, Option<SocketAddr>) {
    let quic = quic_v4(e);
    if let Some(own) = quic.iter().find(|o| e.local_ips.contains(&o.observed.ip())) {
        reasons.push(format!("{} sees us at {}, an address of this host: no NAT", own.observer, own.observed));
        return (Mapping::None, Some(own.observed));
    }
    match quic.as_slice() {
        [] => {
            reasons.push("no public peer has told us over QUIC where it sees us".into());
            (Mapping::Unknown, None)
        }
        [one] => {
            reasons.push(format!("only {} told us where it sees us over QUIC ({}): two peers are needed", one.observer, one.observed));
            (Mapping::Unknown, None)
        }
        _ => {
            // Two peers seeing one address is what a NAT with one mapping per socket does; a
            // NAT with a mapping per destination gives them the same port by chance only (1 in
            // tens of thousands). One odd port beside agreeing ones is a clash on the router
            // (a port taken by another flow), not a symmetric NAT.
            let seen: Vec<String> = quic.iter().take(4).map(|o| format!("{} sees {}", o.observer, o.observed)).collect();
            let shared = quic.iter().enumerate().find(|(i, a)| quic[i + 1..].iter().any(|b| b.observed == a.observed));
            if let Some((_, agreed)) = shared {
                let agree = quic.iter().filter(|o| o.observed == agreed.observed).count();
                reasons.push(format!(
                    "{agree} of {} peers see our QUIC socket at one address ({}): endpoint-independent mapping",
                    quic.len(),
                    seen.join(", ")
                ));
                (Mapping::EndpointIndependent, Some(agreed.observed))
            } else if quic.len() == 2 && quic.iter().any(|o| e.quic_ports.contains(&o.observed.port())) {
                // A NAT that keeps our port where it can, and had to pick another for one flow
                // (the port was taken for that peer), looks like this; so does a NAT that keeps
                // the port for the first peer only. A third peer tells them apart.
                reasons.push(format!(
                    "two peers see our QUIC socket at different ports, one of them our own ({}): a third peer is needed to tell a port clash from a symmetric NAT",
                    seen.join(", ")
                ));
                (Mapping::Unknown, None)
            } else {
                reasons.push(format!("peers see our QUIC socket at different addresses ({}): endpoint-dependent mapping", seen.join(", ")));
                (Mapping::EndpointDependent, None)
            }
        }
    }
}

/// When the mapping is not settled: a QUIC observation over IPv4 at the port our socket has,
/// which is what a port-keeping NAT shows every peer but one it had to give another port (a
/// clash on the router). Only [`mapping_of`]'s "third peer needed" case has this shape.
pub fn port_kept(e: &Evidence) -> Option<SocketAddr> {
    let quic = quic_v4(e);
    match quic.as_slice() {
        [a, b] if a.observed != b.observed => [a, b].into_iter().find(|o| e.quic_ports.contains(&o.observed.port())).map(|o| o.observed),
        _ => None,
    }
}

fn udp_of(e: &Evidence, reasons: &mut Vec<String>) -> Udp {
    if e.quic_connections > 0 || e.observations.iter().any(|o| o.transport == Transport::Quic) {
        reasons.push(format!("UDP gets out: {} direct QUIC connection(s) open", e.quic_connections));
        return Udp::Works;
    }
    match e.quic_probe {
        Some(p) if p.reached > 0 => {
            reasons.push(format!("UDP gets out: a QUIC probe reached {} of {} peer(s)", p.reached, p.tried));
            Udp::Works
        }
        Some(p) if p.tried > 0 && e.tcp_connections > 0 => {
            reasons.push(format!("UDP looks blocked: QUIC reached none of {} peer(s) that TCP reaches", p.tried));
            Udp::Blocked
        }
        _ => {
            reasons.push("no QUIC connection, and no peer to probe over QUIC".into());
            Udp::Unknown
        }
    }
}

fn double_nat_of(e: &Evidence, reasons: &mut Vec<String>) -> Option<bool> {
    if let Some((mapped, _)) = e.port_mapped.iter().find(|(_, public)| !public) {
        reasons.push(format!("the gateway's own public address is {}, itself not public: another NAT is beyond it", mapped.ip()));
        return Some(true);
    }
    let observed: Vec<IpAddr> = e.observations.iter().filter(|o| o.observed.is_ipv4()).map(|o| o.observed.ip()).collect();
    if let Some((mapped, _)) = e.port_mapped.first()
        && let Some(seen) = observed.iter().find(|ip| **ip != IpAddr::V4(*mapped.ip()))
    {
        reasons.push(format!("the gateway says our public address is {}, but peers see {seen}: another NAT is beyond it", mapped.ip()));
        return Some(true);
    }
    if let Some((mapped, _)) = e.port_mapped.first()
        && !observed.is_empty()
    {
        reasons.push(format!("the gateway's public address {} is the one peers see: one NAT", mapped.ip()));
        return Some(false);
    }
    // The first hop is our own gateway (private, as every NAT's LAN side). A router after it
    // with a carrier-grade (100.64/10) or private address before any public one is a NAT's
    // inside too, or at least a network that is not the internet yet.
    let mut before_public = e.hops.iter().take_while(|h| !h.public && !h.destination);
    let _gateway = before_public.next();
    if let Some(hop) = before_public.find(|h| h.addr.is_some())
        && let Some(addr) = hop.addr
    {
        let what = if is_cgnat(addr) { "in the carrier-grade NAT range 100.64.0.0/10" } else { "private" };
        reasons.push(format!("hop {} on the way to a peer, {addr}, is {what}: a second NAT is in front of our router", hop.ttl));
        return Some(true);
    }
    let first_public = e.hops.iter().position(|h| h.public || h.destination);
    if e.hops.first().is_some_and(|h| h.addr.is_some()) && first_public == Some(1) {
        reasons.push("the hop after our gateway is public: one NAT".into());
        return Some(false);
    }
    if observed.is_empty() || e.local_ips.iter().any(|ip| observed.contains(ip)) {
        return if observed.is_empty() { None } else { Some(false) };
    }
    reasons.push("whether a second NAT is beyond our router cannot be told (no port-mapping answer, no trace)".into());
    None
}

/// Tells what the evidence says.
pub fn assess(e: &Evidence) -> Assessment {
    let mut reasons = Vec::new();
    let udp = udp_of(e, &mut reasons);
    let (mapping, quic_mapped) = mapping_of(e, &mut reasons);
    let double_nat = double_nat_of(e, &mut reasons);
    let mapped_confirmed = e.port_mapped.iter().find(|(m, public)| *public && e.confirmed.contains(&IpAddr::V4(*m.ip())));
    let own_confirmed = e.confirmed.iter().find(|ip| e.local_ips.contains(ip));
    let (nat_type, verdict) = if udp == Udp::Blocked {
        (NatType::UdpBlocked, "UDP is blocked on this network: QUIC cannot get out, so every connection uses TCP; direct connections come from TCP hole punching, relayed otherwise".to_string())
    } else if mapping == Mapping::None || own_confirmed.is_some() {
        let at = own_confirmed.map(|ip| format!(" at {ip}")).unwrap_or_default();
        (NatType::Public, format!("publicly reachable{at}: no NAT in the way; every peer can connect directly"))
    } else if let Some((mapped, _)) = mapped_confirmed {
        (NatType::PortMapped, format!("behind a NAT that forwards our ports on request: reachable directly at {mapped}, no relay or hole punching needed"))
    } else if mapping == Mapping::EndpointDependent {
        (NatType::Symmetric, "behind a symmetric NAT (a new public port for every peer): direct connections to public peers, and to peers behind easy NATs by birthday punching; relayed to peers behind symmetric NATs".to_string())
    } else if double_nat == Some(true) {
        (NatType::DoubleNat, "behind two NATs: port mapping on your router cannot make this node reachable; hole punching works when both NATs are easy, relayed otherwise".to_string())
    } else if mapping == Mapping::EndpointIndependent {
        (NatType::Easy, "behind an easy NAT (one public address for every peer): hole punching reaches most peers; relayed only to peers behind symmetric NATs".to_string())
    } else {
        (NatType::Unknown, "cannot tell yet: this needs QUIC connections to at least two public peers".to_string())
    };
    Assessment { nat_type, mapping, quic_mapped, udp, double_nat, reasons, verdict }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(observer: &str, observed: &str, transport: Transport) -> Observation {
        Observation { observer: observer.parse().unwrap(), observed: observed.parse().unwrap(), transport, at: Instant::now() }
    }

    fn evidence(observations: Vec<Observation>) -> Evidence {
        Evidence {
            local_ips: vec!["10.1.0.2".parse().unwrap()],
            quic_ports: vec![4001],
            quic_connections: observations.iter().filter(|o| o.transport == Transport::Quic).count(),
            tcp_connections: observations.iter().filter(|o| o.transport == Transport::Tcp).count(),
            observations,
            ..Evidence::default()
        }
    }

    #[test]
    fn two_peers_seeing_one_port_make_an_easy_nat_and_different_ports_a_symmetric_one() {
        let easy = assess(&evidence(vec![obs("198.51.100.1", "203.0.113.5:4001", Transport::Quic), obs("198.51.100.2", "203.0.113.5:4001", Transport::Quic)]));
        assert_eq!((easy.nat_type, easy.mapping, easy.udp), (NatType::Easy, Mapping::EndpointIndependent, Udp::Works));
        let hard = assess(&evidence(vec![obs("198.51.100.1", "203.0.113.5:50123", Transport::Quic), obs("198.51.100.2", "203.0.113.5:61002", Transport::Quic)]));
        assert_eq!((hard.nat_type, hard.mapping), (NatType::Symmetric, Mapping::EndpointDependent));
        assert!(hard.verdict.starts_with("behind a symmetric NAT"), "{}", hard.verdict);
        // TCP dials may use other local ports: different TCP ports say nothing.
        let tcp = assess(&evidence(vec![obs("198.51.100.1", "203.0.113.5:50123", Transport::Tcp), obs("198.51.100.2", "203.0.113.5:61002", Transport::Tcp)]));
        assert_eq!(tcp.mapping, Mapping::Unknown);
        // One port taken by another flow on the router does not make a NAT symmetric.
        let clash = assess(&evidence(vec![
            obs("198.51.100.1", "203.0.113.5:35387", Transport::Quic),
            obs("198.51.100.2", "203.0.113.5:4001", Transport::Quic),
            obs("198.51.100.3", "203.0.113.5:4001", Transport::Quic),
        ]));
        assert_eq!(clash.mapping, Mapping::EndpointIndependent, "{:?}", clash.reasons);
        // Two peers, one seeing our own port: a clash or a NAT that keeps the port once; a
        // third peer must tell.
        let two = vec![obs("198.51.100.1", "203.0.113.5:35387", Transport::Quic), obs("198.51.100.2", "203.0.113.5:4001", Transport::Quic)];
        assert_eq!(assess(&evidence(two.clone())).mapping, Mapping::Unknown);
        // With no third peer to ask, the birthday punch's easy side may try the kept port.
        assert_eq!(port_kept(&evidence(two.clone())), Some("203.0.113.5:4001".parse().unwrap()));
        let apart = vec![obs("198.51.100.1", "203.0.113.5:35387", Transport::Quic), obs("198.51.100.2", "203.0.113.5:40999", Transport::Quic)];
        assert_eq!(port_kept(&evidence(apart)), None, "neither kept our port: symmetric");
        let mut three = two;
        three.push(obs("198.51.100.3", "203.0.113.5:40999", Transport::Quic));
        assert_eq!(assess(&evidence(three.clone())).mapping, Mapping::EndpointDependent);
        assert_eq!(port_kept(&evidence(three)), None, "settled: symmetric");
        let one = assess(&evidence(vec![obs("198.51.100.1", "203.0.113.5:4001", Transport::Quic)]));
        assert_eq!((one.nat_type, one.mapping), (NatType::Unknown, Mapping::Unknown));
    }

    #[test]
    fn being_seen_at_our_own_address_is_public() {
        let mut e = evidence(vec![obs("198.51.100.1", "10.1.0.2:4001", Transport::Quic)]);
        e.confirmed = vec!["10.1.0.2".parse().unwrap()];
        let a = assess(&e);
        assert_eq!((a.nat_type, a.mapping), (NatType::Public, Mapping::None));
    }

    #[test]
    fn a_mapping_counts_only_once_confirmed() {
        let mut e = evidence(vec![obs("198.51.100.1", "203.0.113.5:4001", Transport::Quic), obs("198.51.100.2", "203.0.113.5:4001", Transport::Quic)]);
        e.port_mapped = vec![("203.0.113.5:4001".parse().unwrap(), true)];
        assert_eq!(assess(&e).nat_type, NatType::Easy, "mapped but nobody dialed it back");
        e.confirmed = vec!["203.0.113.5".parse().unwrap()];
        assert_eq!(assess(&e).nat_type, NatType::PortMapped);
    }

    #[test]
    fn udp_is_blocked_when_quic_reaches_no_peer_that_tcp_reaches() {
        let mut e = evidence(vec![obs("198.51.100.1", "203.0.113.5:4001", Transport::Tcp)]);
        assert_eq!(assess(&e).udp, Udp::Unknown, "not probed yet");
        e.quic_probe = Some(QuicProbe { tried: 2, reached: 0 });
        let a = assess(&e);
        assert_eq!((a.udp, a.nat_type), (Udp::Blocked, NatType::UdpBlocked));
        e.quic_probe = Some(QuicProbe { tried: 2, reached: 1 });
        assert_eq!(assess(&e).udp, Udp::Works);
    }

    #[test]
    fn a_second_nat_shows_in_the_gateways_answer_or_in_the_hops() {
        let two = vec![obs("198.51.100.1", "203.0.113.5:4001", Transport::Quic), obs("198.51.100.2", "203.0.113.5:4001", Transport::Quic)];
        let mut e = evidence(two.clone());
        e.port_mapped = vec![("100.64.1.2:4001".parse().unwrap(), false)];
        let a = assess(&e);
        assert_eq!((a.double_nat, a.nat_type), (Some(true), NatType::DoubleNat));

        let hop = |ttl, addr: &str, public, destination| Hop { ttl, addr: Some(addr.parse().unwrap()), public, destination };
        let mut e = evidence(two.clone());
        e.hops = vec![hop(1, "10.1.0.1", false, false), hop(2, "100.64.1.1", false, false), hop(3, "198.51.100.1", true, true)];
        let a = assess(&e);
        assert_eq!((a.double_nat, a.nat_type), (Some(true), NatType::DoubleNat));
        assert!(a.reasons.iter().any(|r| r.contains("carrier-grade")), "{:?}", a.reasons);

        let mut e = evidence(two);
        e.hops = vec![hop(1, "10.1.0.1", false, false), hop(2, "198.51.100.1", true, true)];
        let a = assess(&e);
        assert_eq!((a.double_nat, a.nat_type), (Some(false), NatType::Easy));
    }

    #[test]
    fn observations_are_bounded_and_one_per_observer() {
        let mut all = Observations::default();
        for i in 0..200u32 {
            let observer = IpAddr::V4(Ipv4Addr::from(0xC633_6400 + (i % 100)));
            all.record(Observation { observer, observed: "203.0.113.5:4001".parse().unwrap(), transport: Transport::Quic, at: Instant::now() });
        }
        let current = all.current(Instant::now());
        assert_eq!(current.len(), OBSERVATIONS_KEPT);
        assert_eq!(current[0].observer, IpAddr::V4(Ipv4Addr::from(0xC633_6400 + 99)), "newest first");
        assert!(all.current(Instant::now() + OBSERVATION_TTL).is_empty(), "old ones no longer count");
    }
}
