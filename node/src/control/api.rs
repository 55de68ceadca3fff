//! The JSON shapes of the control API, shared by the daemon and the CLI. `--json` prints exactly
//! these, so they are a public interface: add fields, never rename them.
//!
//! Routes (HTTP/1.1 on the Unix socket `<data dir>/warren.sock`):
//! - `GET  /v1/status`              → [`Status`]
//! - `GET  /v1/peers`               → `Vec<`[`PeerEntry`]`>`
//! - `GET  /v1/id`                  → [`Identity`]
//! - `POST /v1/ping/{peer}?count=N` → [`PingReply`]
//! - `POST /v1/find/{peer}`         → [`FindReply`]
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
    pub routing_table_peers: usize,
    pub stored_peers: usize,
    pub peer_store_writes: u64,
    pub uptime_secs: u64,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}
