//! What an address is: its scope (loopback, link-local, private, public), its IP, port and
//! peer, whether it is relayed, and which transport it uses. Plain functions of an address (and
//! the configured public ranges), used by the policy and by every room that handles addresses.

use std::net::IpAddr;

use libp2p::{Multiaddr, PeerId, multiaddr::Protocol};

/// Address ranges counted as publicly routable beside the globally routable ones
/// (`public_ranges` in the config, `--public-ranges`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an address range; expected CIDR like 203.0.113.0/24 or 2001:db8::/32");
        let (net, prefix) = s.trim().split_once('/').ok_or_else(bad)?;
        let net: IpAddr = net.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { net, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.prefix),
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.prefix),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let full = usize::from(prefix / 8);
    let rest = prefix % 8;
    if a[..full] != b[..full] {
        return false;
    }
    rest == 0 || (a[full] ^ b[full]) & (0xffu8 << (8 - rest)) == 0
}

/// Whether an IP is publicly routable: global (not private, loopback, link-local, documentation,
/// shared, ...) or inside one of the configured public ranges.
pub fn is_public_ip(ip: IpAddr, public_ranges: &[Cidr]) -> bool {
    if public_ranges.iter().any(|r| r.contains(ip)) {
        return true;
    }
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast()
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10, carrier-grade NAT
                || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18.0.0/15, benchmarking
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link local
                || (s[0] == 0x2001 && s[1] == 0x0db8)) // documentation
        }
    }
}

/// Whether a (direct) multiaddr points at a public IP.
pub fn is_public_addr(addr: &Multiaddr, public_ranges: &[Cidr]) -> bool {
    !is_relayed(addr) && ip_of(addr).is_some_and(|ip| is_public_ip(ip, public_ranges))
}

/// Where an address leads, relative to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// This host (127.0.0.0/8, ::1).
    Loopback,
    /// One link (169.254.0.0/16, fe80::/10).
    LinkLocal,
    /// A private network: every other range that is not globally routable (RFC 1918, CGNAT,
    /// unique local, documentation and benchmarking ranges) unless configured public.
    Private,
    /// Globally routable, or in a configured public range.
    Public,
}

impl Scope {
    fn bit(self) -> u8 {
        match self {
            Scope::Loopback => 1,
            Scope::LinkLocal => 2,
            Scope::Private => 4,
            Scope::Public => 8,
        }
    }
}

/// A set of scopes, as stored in a peer's record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scopes(pub u8);

impl Scopes {
    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }
    pub fn insert(&mut self, scope: Scope) {
        self.0 |= scope.bit();
    }
}

/// The first IP address in a multiaddr (for a relayed address, the relay's).
pub fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

/// The scope of a direct address; `None` for relayed addresses and ones without an IP (DNS
/// names, which are resolved before they are dialed and checked then).
pub fn scope_of(addr: &Multiaddr, public_ranges: &[Cidr]) -> Option<Scope> {
    if is_relayed(addr) {
        return None;
    }
    Some(ip_scope(ip_of(addr)?, public_ranges))
}

/// The scope a peer is connected to us on, judged by its address on the connection: a relayed
/// peer, or one whose address names no IP, may be anywhere, so it counts as public.
pub fn peer_scope(remote: &Multiaddr, public_ranges: &[Cidr]) -> Scope {
    scope_of(remote, public_ranges).unwrap_or(Scope::Public)
}

pub(super) fn ip_scope(ip: IpAddr, public_ranges: &[Cidr]) -> Scope {
    if public_ranges.iter().any(|r| r.contains(ip)) {
        Scope::Public
    } else if ip.is_loopback() {
        Scope::Loopback
    } else if match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    } {
        Scope::LinkLocal
    } else if is_public_ip(ip, public_ranges) {
        Scope::Public
    } else {
        Scope::Private
    }
}

/// The LAN DHT's protocol id, derived from the WAN one the way kubo does
/// (`/ipfs/kad/1.0.0` → `/ipfs/lan/kad/1.0.0`, `/warren/kad/1.0.0` → `/warren/lan/kad/1.0.0`).
pub fn lan_kad_protocol(wan: &str) -> String {
    match wan.strip_prefix('/').and_then(|rest| rest.split_once("/kad/")) {
        Some((name, version)) if !name.is_empty() && !name.contains('/') => format!("/{name}/lan/kad/{version}"),
        _ => format!("{wan}/lan"),
    }
}

/// The transport and port of a direct address, to compare it with our own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Port {
    Tcp(u16),
    Udp(u16),
}

impl Port {
    pub(crate) fn number(self) -> u16 {
        match self {
            Port::Tcp(port) | Port::Udp(port) => port,
        }
    }
}

pub(crate) fn endpoint_of(addr: &Multiaddr) -> Option<(IpAddr, Port)> {
    let ip = ip_of(addr)?;
    let port = addr.iter().find_map(|p| match p {
        Protocol::Tcp(port) => Some(Port::Tcp(port)),
        Protocol::Udp(port) => Some(Port::Udp(port)),
        _ => None,
    })?;
    Some((ip, port))
}

/// The peer a multiaddr names in its last `/p2p/` part.
pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => Some(peer),
        _ => None,
    }
}

/// An address with an unspecified IP (`0.0.0.0`, `::`), which names no host to dial.
pub fn is_unspecified(addr: &Multiaddr) -> bool {
    ip_of(addr).is_some_and(|ip| ip.is_unspecified())
}

/// An address without the trailing `/p2p/PEER` that names the peer it leads to. A relayed
/// address keeps the `/p2p/RELAY` inside it, without which it cannot be dialed.
pub fn without_p2p(addr: &Multiaddr) -> Multiaddr {
    let mut addr = addr.clone();
    if matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr.pop();
    }
    addr
}

pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// The relay a relayed address goes through: the `/p2p/` part before `/p2p-circuit`.
pub fn relay_of(addr: &Multiaddr) -> Option<PeerId> {
    let mut relay = None;
    for p in addr.iter() {
        match p {
            Protocol::P2p(peer) => relay = Some(peer),
            Protocol::P2pCircuit => return relay,
            _ => {}
        }
    }
    None
}

/// Addresses to dial at once, with one relayed address per relay we are `connected` to. A
/// relayed dial goes over the connection to the relay we already have, whatever transport its
/// address names, so its other addresses (QUIC and TCP of the same relay) would each open one
/// more circuit there for nothing, counting against the relay's per-peer and total caps.
/// Addresses of relays we are not connected to are all kept: which transport reaches the relay
/// (UDP may be blocked) is not known yet.
pub fn one_circuit_per_connected_relay(addrs: Vec<Multiaddr>, connected: impl Fn(&PeerId) -> bool) -> Vec<Multiaddr> {
    let mut seen = Vec::new();
    addrs
        .into_iter()
        .filter(|addr| match relay_of(addr) {
            Some(relay) if connected(&relay) => {
                let first = !seen.contains(&relay);
                seen.push(relay);
                first
            }
            _ => true,
        })
        .collect()
}


/// The transport an address uses (`quic`, `tcp` or `other`): for a relayed address, its last hop's.
pub fn transport_of(addr: &Multiaddr) -> &'static str {
    // A relayed address names the relay's transport first; what counts is the last one before
    // /p2p-circuit, which is the hop we actually use.
    let mut transport = "other";
    for p in addr.iter() {
        match p {
            Protocol::QuicV1 => transport = "quic",
            Protocol::Tcp(_) if transport != "quic" => transport = "tcp",
            Protocol::P2pCircuit => break,
            _ => {}
        }
    }
    transport
}
