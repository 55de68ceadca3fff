//! The JSON shapes of the control API, shared by the daemon and the CLI. `--json` prints exactly
//! these, so they are a public interface: add fields, never rename them.
//!
//! Routes (HTTP/1.1 on the Unix socket `<data dir>/warren.sock`):
//! - `GET  /v1/status`              → [`Status`]
//! - `GET  /v1/peers`               → `Vec<`[`PeerEntry`]`>`
//! - `GET  /v1/id`                  → [`Identity`]
//! - `POST /v1/ping/{peer}?count=N` → [`PingReply`]
//! - `POST /v1/find/{peer}`         → [`FindReply`]
//! - `POST /v1/netcheck`            → [`Netcheck`] (probes over QUIC and traces a few hops first)
//! - `GET  /v1/exposes` → `Vec<`[`ExposeInfo`]`>`; `POST /v1/exposes` with an `ExposeSpec` body;
//!   `DELETE /v1/exposes/{name}`
//! - `GET  /v1/forwards` → `Vec<`[`ForwardInfo`]`>`; `POST /v1/forwards` with a `ForwardSpec` body;
//!   `DELETE /v1/forwards/{bind}`
//! - `POST /v1/debug/store-churn/{count}` → [`ChurnReply`] (synthetic peer-store load, for crash tests)
//!
//! Errors come back with a 4xx/5xx status and an [`ApiError`] body.

use std::net::SocketAddr;

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

pub const SOCKET_NAME: &str = "warren.sock";
/// Most pings one request may ask for.
pub const MAX_PING_COUNT: u32 = 100;
/// Most synthetic records one churn request may add.
pub const MAX_CHURN: u32 = 1_000_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub peer_id: String,
    pub agent: String,
    pub listen_addrs: Vec<String>,
    pub external_addrs: Vec<String>,
    /// `unknown`, `public` or `private`, as AutoNAT last found.
    pub reachability: String,
    /// `server` or `client`: what the DHT is doing now.
    pub dht_mode: String,
    /// `server`, `client` or `auto`: what was configured.
    pub dht_mode_setting: String,
    pub kad_protocol: String,
    pub connected_peers: usize,
    pub connections: usize,
    /// Peers in the WAN DHT's routing table (the configured Kademlia protocol).
    pub routing_table_peers: usize,
    /// Peers in the LAN DHT's routing table (peers on our private network or host).
    #[serde(default)]
    pub lan_routing_table_peers: usize,
    /// Seconds since the WAN DHT's last bootstrap or refresh ended (the one a node runs to join
    /// included); none yet if it has not ended.
    #[serde(default)]
    pub dht_refreshed_secs_ago: Option<u64>,
    /// Seconds since our own record (the addresses others find us at by PeerId) last reached
    /// the WAN DHT peers closest to it; none if it never has (yet).
    #[serde(default)]
    pub addresses_published_secs_ago: Option<u64>,
    /// Attempts in a row to publish that record that timed out (0 after a success).
    #[serde(default)]
    pub address_publish_failures: u32,
    /// The same for the LAN DHT (peers on our private network), where a private network of
    /// plain nodes finds us.
    #[serde(default)]
    pub lan_addresses_published_secs_ago: Option<u64>,
    /// Dials that reached another peer than the one dialed, since start (stale addresses,
    /// dropped from the peer's record as they were found).
    #[serde(default)]
    pub wrong_peer_dials: u64,
    pub stored_peers: usize,
    pub peer_store_writes: u64,
    pub uptime_secs: u64,
    /// Reservations this node holds on relays (how others reach it while it is not public).
    pub relayed_through: Vec<HeldReservation>,
    /// Relay-capable peers known as candidates for automatic relay use.
    pub relay_candidates: usize,
    /// Why the last reservation failed or was lost, if one did.
    pub relay_last_error: Option<String>,
    /// Present when this node serves as a relay.
    pub relay: Option<RelayStatus>,
    pub hole_punch: HolePunchStats,
    /// Ports the gateway forwards to us (PCP, NAT-PMP or UPnP-IGD); empty when none does or
    /// port mapping is off.
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
    /// What kind of NAT this node is behind, from what it has seen so far (`warren netcheck`
    /// probes and explains): `public`, `port-mapped`, `easy`, `symmetric`, `double-nat`,
    /// `udp-blocked` or `unknown`.
    #[serde(default)]
    pub nat_type: String,
}

/// `warren netcheck`: what kind of network this node is in, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Netcheck {
    /// `public`, `port-mapped`, `easy`, `symmetric`, `double-nat`, `udp-blocked` or `unknown`.
    pub nat_type: String,
    /// One sentence for the user.
    pub verdict: String,
    /// `works`, `blocked` or `unknown`.
    pub udp: String,
    /// How the NAT maps our QUIC port: `none`, `endpoint-independent`, `endpoint-dependent`
    /// or `unknown`.
    pub mapping: String,
    /// Behind two NATs; absent when it cannot be told.
    pub double_nat: Option<bool>,
    /// Our external addresses as AutoNAT confirmed them (a peer dialed them back).
    pub confirmed_addrs: Vec<String>,
    /// Where public peers see us, newest first.
    pub observed: Vec<ObservedAddr>,
    /// QUIC dials made for this check (to tell whether UDP gets out and to have two observers).
    pub quic_probe: Option<crate::nat::QuicProbe>,
    pub port_mapping: PortMappingCheck,
    /// The first hops towards a public peer (empty when no peer was there to trace to).
    pub hops: Vec<crate::nat::Hop>,
    /// Relays we know, fastest first.
    pub relays: Vec<RelayRtt>,
    /// The relay new reservations would go to first: the fastest one held, else the fastest known.
    pub preferred_relay: Option<String>,
    /// Why each answer above was given.
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObservedAddr {
    /// The peer's IP.
    pub observer: String,
    /// Where it sees us, `IP:PORT`.
    pub observed: String,
    /// `quic` or `tcp`.
    pub transport: String,
    pub age_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortMappingCheck {
    /// Port mapping is on (`port_mapping = true`, no `--no-port-mapping`).
    pub enabled: bool,
    /// The protocol that mapped our ports: `pcp`, `natpmp` or `upnp`; absent when none did.
    pub protocol: Option<String>,
    /// The mapped external addresses, `IP:PORT`.
    pub external: Vec<String>,
    /// Why the last attempt got no mapping, one reason per protocol.
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayRtt {
    pub peer_id: String,
    pub addr: String,
    /// Round-trip time on our direct connection to it, once measured; absent when not connected.
    pub rtt_ms: Option<f64>,
    /// We hold a reservation on it.
    pub held: bool,
}

/// A port the gateway forwards to this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortMapping {
    /// `pcp`, `natpmp` or `upnp`.
    pub protocol: String,
    /// `udp` (QUIC) or `tcp`.
    pub transport: String,
    pub internal_port: u16,
    /// The address peers reach the port at, `IP:PORT`.
    pub external: String,
    /// Seconds until the lease ends unless renewed (it is renewed well before).
    pub lease_left_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldReservation {
    pub relay: String,
    pub relay_addr: String,
    /// Pinned with --relay-via, or picked automatically.
    pub pinned: bool,
    pub accepted: bool,
    pub renewals: u32,
    pub age_secs: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayStatus {
    /// Whether the hop protocol is advertised (public address confirmed, or --relay-force).
    pub advertised: bool,
    /// Peers holding reservations now, and reservations held.
    pub reservation_peers: usize,
    pub reservations: u64,
    /// Circuits open now.
    pub circuits: u64,
    pub reservations_accepted: u64,
    pub reservations_denied: u64,
    pub circuits_accepted: u64,
    pub circuits_denied: u64,
    /// Circuits that ended with an error or by hitting a limit.
    pub circuits_cut: u64,
    /// Bytes carried for others through circuits since start, both directions.
    pub relayed_bytes: u64,
    pub last_denial: Option<String>,
    pub last_cut: Option<String>,
    /// Denials since start by what was denied and why, e.g. ("reservation ResourceLimitExceeded", 3).
    #[serde(default)]
    pub denied_by_reason: Vec<(String, u64)>,
    pub limits: crate::relay::RelayLimits,
}

/// Hole punching (DCUtR) outcomes since start, by transport of the resulting connection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HolePunchStats {
    pub attempts: u64,
    pub successes_quic: u64,
    pub successes_tcp: u64,
    pub failures: u64,
    pub last_error: Option<String>,
    /// Birthday punches (through a symmetric NAT), either role.
    #[serde(default)]
    pub birthday: BirthdayStats,
}

/// Birthday punches (see `warren_punch`): attempts, successes and probes sent, either role.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BirthdayStats {
    pub attempts: u64,
    pub successes: u64,
    pub failures: u64,
    /// Probes this node sent as the easy side.
    pub probes_sent: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerEntry {
    pub peer_id: String,
    pub agent: Option<String>,
    pub connections: Vec<Connection>,
    /// For a peer reached only through relays: why there is no direct connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relayed_because: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Connection {
    pub address: String,
    /// `quic`, `tcp` or `other`.
    pub transport: String,
    /// `direct` or `relayed`.
    pub path: String,
    /// `outbound` (we dialed) or `inbound`.
    pub direction: String,
    /// Last measured round-trip time, once ping has measured one.
    pub rtt_ms: Option<f64>,
    pub age_secs: u64,
    /// For a direct connection made by hole punching: milliseconds from the first relayed
    /// contact with the peer to this connection.
    pub punched_after_ms: Option<f64>,
    /// For a connection a birthday punch made: our side, the probes and sockets, and how long
    /// the punch took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub birthday: Option<BirthdayPunched>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BirthdayPunched {
    /// Our side: `symmetric` (we offered and opened the sockets) or `easy` (we probed).
    pub side: String,
    /// Probes we sent (the easy side; 0 on the symmetric side).
    pub probes: u32,
    /// Sockets the symmetric side opened.
    pub sockets: u16,
    pub took_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    pub peer_id: String,
    pub public_key: String,
    pub agent: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingReply {
    pub peer_id: String,
    /// Round-trip time of each ping, in order.
    pub rtts_ms: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FindReply {
    pub peer_id: String,
    pub found: bool,
    pub addrs: Vec<String>,
    /// How long the DHT lookup took.
    pub elapsed_ms: f64,
    /// DHT requests sent before the answer, over the four lookups a find runs (WAN and LAN,
    /// closest peers and provider records); a lookup's path length shows in it.
    #[serde(default)]
    pub requests: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChurnReply {
    pub inserted: u32,
}

/// An exposed service and its counters (`warren exposes`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExposeInfo {
    pub name: String,
    pub target: String,
    pub allow: Vec<String>,
    pub allow_any: bool,
    pub udp: bool,
    pub max_connections: usize,
    pub active: u64,
    pub total: u64,
    pub refused: u64,
    /// Bytes from peers to the service.
    pub bytes_in: u64,
    /// Bytes from the service to peers.
    pub bytes_out: u64,
    pub last_error: Option<String>,
    /// `config` (from the config file) or `api` (added at run time, kept in the store).
    pub source: String,
}

/// A forward and its counters (`warren forwards`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardInfo {
    /// The local address actually bound.
    pub bind: String,
    pub peer: String,
    pub service: String,
    pub udp: bool,
    pub max_connections: usize,
    /// Connections (or UDP sessions) open now.
    pub active: u64,
    pub total: u64,
    /// Local connections that could not be forwarded.
    pub failed: u64,
    /// Bytes from local clients to the peer.
    pub bytes_sent: u64,
    /// Bytes from the peer to local clients.
    pub bytes_received: u64,
    /// Why the last connection failed: unreachable peer, or the peer's refusal
    /// (`not allowed`, `unknown service`, `upstream unreachable: <os error>`, `over capacity`).
    pub last_error: Option<String>,
    /// `direct` or `relayed`: the connection the last stream used.
    pub path: Option<String>,
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

// Exposes and forwards: request bodies of the API, and `[[expose]]` / `[[forward]]` entries of
// the config file.

/// Connections per forward and per exposed service unless configured: generous for a person's
/// tools, and a bound on what one peer can make us hold open.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// How long an idle UDP session lives unless configured: longer than the 25 s keepalive of
/// WireGuard, shorter than a typical NAT's 2-minute UDP timeout.
pub const DEFAULT_UDP_IDLE_SECS: u64 = 60;

fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}

/// A service this node offers to chosen peers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExposeSpec {
    /// The name peers ask for (`[A-Za-z0-9._-]`, at most 64 bytes).
    pub name: String,
    /// Where connections go: `host:port`, chosen by the owner, never by the peer.
    pub target: String,
    /// PeerIds allowed to use the service. Default: none (deny by default).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Allow every peer. Default: false; must be said explicitly.
    #[serde(default)]
    pub allow_any: bool,
    /// A UDP service (datagrams) instead of TCP. Default: false.
    #[serde(default)]
    pub udp: bool,
    /// Concurrent connections (or UDP sessions). Default: 1024.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

/// A local port forwarded to a service on a peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardSpec {
    /// Local address to listen on, `IP:PORT` (port 0 picks one).
    pub bind: String,
    /// The peer that exposes the service.
    pub peer: String,
    /// The service's name on that peer.
    pub service: String,
    /// Forward UDP datagrams instead of TCP connections. Default: false.
    #[serde(default)]
    pub udp: bool,
    /// Concurrent local connections (or UDP sessions). Default: 1024.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

/// What is wrong with an expose or forward spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The service name breaks the protocol's rules.
    #[error("{reason} (got {name:?})")]
    ServiceName { name: String, reason: String },
    /// The expose target is not `HOST:PORT` with a port from 1 to 65535.
    #[error("target {0:?} must be HOST:PORT, e.g. 127.0.0.1:8080")]
    Target(String),
    /// An entry of the allow-list is not a PeerId.
    #[error("allowed peer {0:?} is not a PeerId")]
    AllowedPeer(String),
    /// Neither an allow-list nor `allow_any`: the service would be useless.
    #[error("service {0:?} would allow nobody: name peers with --allow PEERID, or pass --allow-any to allow every peer")]
    AllowsNobody(String),
    /// The forward's local bind address is not `IP:PORT`.
    #[error("bind address {0:?} must be IP:PORT")]
    Bind(String),
    /// The forward's peer is not a PeerId.
    #[error("{0:?} is not a PeerId")]
    Peer(String),
    /// `max_connections` out of range.
    #[error("max_connections {0} must be between 1 and {MAX_CONNECTIONS_LIMIT}")]
    MaxConnections(usize),
}

/// Largest `max_connections` of one expose or forward: each connection may hold a socket, a
/// stream and 128 KiB of buffers.
pub const MAX_CONNECTIONS_LIMIT: usize = 65_536;

fn check_service(name: &str) -> Result<(), SpecError> {
    warren_forward::validate_service_name(name).map_err(|reason| SpecError::ServiceName { name: name.to_string(), reason })
}

impl ExposeSpec {
    pub fn validate(&self) -> Result<Vec<PeerId>, SpecError> {
        check_service(&self.name)?;
        let port_ok = self.target.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
        });
        if !port_ok {
            return Err(SpecError::Target(self.target.clone()));
        }
        let allow = self
            .allow
            .iter()
            .map(|p| p.parse::<PeerId>().map_err(|_| SpecError::AllowedPeer(p.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        if allow.is_empty() && !self.allow_any {
            return Err(SpecError::AllowsNobody(self.name.clone()));
        }
        check_max(self.max_connections)?;
        Ok(allow)
    }
}

impl ForwardSpec {
    pub fn validate(&self) -> Result<(SocketAddr, PeerId), SpecError> {
        let bind = self.bind.parse::<SocketAddr>().map_err(|_| SpecError::Bind(self.bind.clone()))?;
        let peer = self.peer.parse::<PeerId>().map_err(|_| SpecError::Peer(self.peer.clone()))?;
        check_service(&self.service)?;
        check_max(self.max_connections)?;
        Ok((bind, peer))
    }
}

fn check_max(max: usize) -> Result<(), SpecError> {
    if (1..=MAX_CONNECTIONS_LIMIT).contains(&max) { Ok(()) } else { Err(SpecError::MaxConnections(max)) }
}
