//! The JSON shapes of the control API, shared by the daemon and the CLI. `--json` prints exactly
//! these, so they are a public interface: add fields, never rename them.
//!
//! Routes (HTTP/1.1 on the Unix socket `<data dir>/warren.sock`):
//! - `GET  /v1/status`              → [`Status`]
//! - `GET  /v1/peers`               → `Vec<`[`PeerEntry`]`>`
//! - `GET  /v1/id`                  → [`Identity`]
//! - `POST /v1/ping/{peer}?count=N` → [`PingReply`]
//! - `POST /v1/find/{peer}`         → [`FindReply`]
//! - `GET  /v1/exposes` → `Vec<`[`ExposeInfo`]`>`; `POST /v1/exposes` with an `ExposeSpec` body;
//!   `DELETE /v1/exposes/{name}`
//! - `GET  /v1/forwards` → `Vec<`[`ForwardInfo`]`>`; `POST /v1/forwards` with a `ForwardSpec` body;
//!   `DELETE /v1/forwards/{bind}`
//! - `POST /v1/debug/store-churn/{count}` → [`ChurnReply`] (synthetic peer-store load, for crash tests)
//!
//! Errors come back with a 4xx/5xx status and an [`ApiError`] body.

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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerEntry {
    pub peer_id: String,
    pub agent: Option<String>,
    pub connections: Vec<Connection>,
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
