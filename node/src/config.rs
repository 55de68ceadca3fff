//! The node's configuration: a TOML file in the data dir (or `--config FILE`), overridden by flags.
//!
//! Every field has a default that a node on a home machine can run with; the reason for each is
//! written beside it. `warren config` prints the effective result.

use std::path::{Path, PathBuf};
use std::time::Duration;

use libp2p::{Multiaddr, PeerId, multiaddr::Protocol};
use serde::{Deserialize, Serialize};

use crate::error::UserError;
use crate::api::{ExposeSpec, ForwardSpec};

/// The port a node listens on unless told otherwise: the conventional libp2p port.
pub const DEFAULT_PORT: u16 = 4001;
/// The Kademlia protocol id of warren's own DHT. `/ipfs/kad/1.0.0` joins the public IPFS DHT.
pub const DEFAULT_KAD_PROTOCOL: &str = "/warren/kad/1.0.0";
/// The name of the config file looked up in the data dir.
pub const CONFIG_FILE_NAME: &str = "config.toml";

/// How the node takes part in the DHT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DhtMode {
    /// Answer DHT queries from others. Only useful when others can dial us.
    Server,
    /// Query the DHT but do not answer: right for nodes behind NATs.
    Client,
    /// Server once AutoNAT confirms a public address, client until then.
    Auto,
}

/// The effective configuration of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Addresses to listen on. Default: QUIC-v1 and TCP on port 4001, IPv4 and IPv6, all interfaces.
    /// Defaults that cannot be bound (no IPv6 on the host, say) are skipped with a warning;
    /// addresses given explicitly must bind or the node refuses to start.
    pub listen: Vec<Multiaddr>,
    /// Peers to join the network through, each `/…/p2p/PEERID`. Default: none; the node then
    /// relies on mDNS and on the peers it stored on earlier runs.
    pub bootstrap: Vec<Multiaddr>,
    /// Discover peers on the local network by mDNS. Default: on, since LAN peers need no bootstrap.
    pub mdns: bool,
    /// Ask the gateway to forward our ports (PCP, NAT-PMP, UPnP-IGD). Default: on: a router that
    /// maps ports makes the node directly reachable, and AutoNAT still checks before it counts.
    pub port_mapping: bool,
    /// DHT participation. Default: auto, so a node behind a NAT never advertises a DHT service
    /// nobody can reach.
    pub dht_mode: DhtMode,
    /// Kademlia protocol id. Default: `/warren/kad/1.0.0`, warren's own DHT.
    pub kad_protocol: String,
    /// Seconds between periodic DHT bootstraps (refreshing the routing table), each interval
    /// drawn within ±25 % of it so nodes started together do not refresh together. Default:
    /// 600, go-libp2p-kad-dht's (kubo's) interval. rust-libp2p's is 300. A refresh looks up our
    /// own key and one key per bucket with room (about 90 requests p50 at 500 nodes); libp2p's
    /// bootstrap, every 300 s and every bucket, was most of what an idle node cost in
    /// `simulations/dht-scale`.
    pub bootstrap_interval_secs: u64,
    /// How many peers the peer store keeps; the least useful are evicted first. Default: 2000,
    /// a few hundred KiB on disk, more than a node ever needs to rejoin.
    pub max_stored_peers: usize,
    /// How many stored peers are dialed at start when rejoining without bootstrap. Default: 16.
    pub rejoin_dials: usize,
    /// Seconds a connection that carried forwarded traffic is kept after its last stream
    /// closed. Default: 60, so the next connection through a forward reuses it rather than
    /// going through a relay and a hole punch again. Connections that only carried the DHT and
    /// other background protocols close after 10 s (`BACKGROUND_IDLE_TIMEOUT`), or this, if
    /// shorter.
    pub idle_connection_timeout_secs: u64,
    /// Connections other peers may hold to this node at once; beyond it new inbound connections
    /// are refused. Bounds what a flood of connections (a relay's reservation flood, say) can
    /// cost: a QUIC connection takes a few hundred KiB. Default: 1024.
    pub max_incoming_connections: u32,
    /// Seconds of silence after which a forwarded UDP session is closed. Default: 60.
    pub udp_idle_timeout_secs: u64,
    /// Services exposed to peers (`[[expose]]` tables). Default: none.
    pub expose: Vec<ExposeSpec>,
    /// Local ports forwarded to peers' services (`[[forward]]` tables). Default: none.
    pub forward: Vec<ForwardSpec>,
    /// Serve circuit relay v2 to others (a volunteer relay), within `relay_limits`. The hop
    /// protocol is advertised only while the node has a confirmed public address, unless
    /// `relay_force`. Default: off (the `warren-bootstrap` profile turns it on).
    pub relay: bool,
    /// Serve as a relay even without a confirmed public address (LANs, labs, tests). Default: off.
    pub relay_force: bool,
    /// What a relay lets others use.
    pub relay_limits: crate::relay::RelayLimits,
    /// Relays to always hold a reservation on, each `/…/p2p/RELAYID`. Default: none.
    pub relay_via: Vec<Multiaddr>,
    /// Relays a node that is not publicly reachable reserves on by itself, chosen among
    /// reachable peers that offer the relay hop protocol; 0 turns automatic relay use off.
    /// Default: 2, so losing one relay never leaves the node unreachable.
    pub auto_relays: usize,
    /// Serve Prometheus metrics on this address (`/metrics`), e.g. "127.0.0.1:9464". Default:
    /// off. Unauthenticated: keep it on loopback or a private network.
    pub metrics: Option<std::net::SocketAddr>,
    /// Address ranges (CIDR) counted as publicly routable besides globally routable addresses:
    /// enterprise address plans, labs on documentation ranges. Default: none.
    pub public_ranges: Vec<String>,
    /// Punch through a symmetric NAT by the birthday paradox when the other side's NAT is easy
    /// (`/warren/punch/1.0.0`). Default: on: it is the only way to a direct connection there,
    /// and costs a few hundred 22-byte packets for half a minute, within `birthday`.
    pub birthday_punch: bool,
    /// What one birthday punch may cost.
    pub birthday: crate::punch::Limits,
    /// Threads that run the node's tasks. Default: one per CPU. 1 spends about a quarter less
    /// CPU per forwarded byte and carries more through one connection (its tasks no longer wake
    /// each other across threads), but serves many connections at once more slowly (see the
    /// README's forwarding benchmark): worth it on a small machine that mostly forwards or
    /// relays bulk data.
    pub threads: Option<usize>,
}

/// Most `threads` a node runs: its work is a handful of connection drivers and forwards, and
/// workers beyond that only add wake-ups.
pub const MAX_THREADS: usize = 64;

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: default_listen_addrs(),
            bootstrap: Vec::new(),
            mdns: true,
            port_mapping: true,
            dht_mode: DhtMode::Auto,
            kad_protocol: DEFAULT_KAD_PROTOCOL.to_string(),
            bootstrap_interval_secs: 600,
            max_stored_peers: 2000,
            rejoin_dials: 16,
            idle_connection_timeout_secs: 60,
            max_incoming_connections: 1024,
            udp_idle_timeout_secs: crate::api::DEFAULT_UDP_IDLE_SECS,
            expose: Vec::new(),
            forward: Vec::new(),
            relay: false,
            relay_force: false,
            relay_limits: crate::relay::RelayLimits::default(),
            relay_via: Vec::new(),
            auto_relays: 2,
            public_ranges: Vec::new(),
            metrics: None,
            birthday_punch: true,
            birthday: crate::punch::Limits::default(),
            threads: None,
        }
    }
}

pub fn default_listen_addrs() -> Vec<Multiaddr> {
    [
        format!("/ip4/0.0.0.0/udp/{DEFAULT_PORT}/quic-v1"),
        format!("/ip4/0.0.0.0/tcp/{DEFAULT_PORT}"),
        format!("/ip6/::/udp/{DEFAULT_PORT}/quic-v1"),
        format!("/ip6/::/tcp/{DEFAULT_PORT}"),
    ]
    .iter()
    .map(|s| s.parse().expect("default listen addresses are valid"))
    .collect()
}

/// Settings given on the command line; `None`/empty means "keep what the file says".
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub no_mdns: bool,
    pub no_port_mapping: bool,
    pub no_birthday_punch: bool,
    pub dht_mode: Option<DhtMode>,
    pub kad_protocol: Option<String>,
    pub no_listen: bool,
    pub relay: bool,
    pub relay_force: bool,
    pub relay_via: Vec<Multiaddr>,
    pub auto_relays: Option<usize>,
    pub public_ranges: Vec<String>,
    pub metrics: Option<std::net::SocketAddr>,
    pub threads: Option<usize>,
}

impl Config {
    /// Loads the config file (explicit path, or `config.toml` in the data dir when present),
    /// applies the overrides and validates the result.
    pub fn load(
        data_dir: &Path,
        explicit: Option<&Path>,
        overrides: Overrides,
    ) -> Result<Self, UserError> {
        let mut config = match explicit {
            Some(path) => Self::from_file(path)?,
            None => {
                let path = data_dir.join(CONFIG_FILE_NAME);
                if path.exists() {
                    Self::from_file(&path)?
                } else {
                    Self::default()
                }
            }
        };
        if !overrides.listen.is_empty() {
            config.listen = overrides.listen;
        }
        config.bootstrap.extend(overrides.bootstrap);
        if overrides.no_mdns {
            config.mdns = false;
        }
        if overrides.no_port_mapping {
            config.port_mapping = false;
        }
        if overrides.no_birthday_punch {
            config.birthday_punch = false;
        }
        if let Some(mode) = overrides.dht_mode {
            config.dht_mode = mode;
        }
        if let Some(protocol) = overrides.kad_protocol {
            config.kad_protocol = protocol;
        }
        if overrides.no_listen {
            config.listen.clear();
        }
        config.relay |= overrides.relay || overrides.relay_force;
        config.relay_force |= overrides.relay_force;
        config.relay_via.extend(overrides.relay_via);
        if let Some(n) = overrides.auto_relays {
            config.auto_relays = n;
        }
        if overrides.threads.is_some() {
            config.threads = overrides.threads;
        }
        config.public_ranges.extend(overrides.public_ranges);
        if overrides.metrics.is_some() {
            config.metrics = overrides.metrics;
        }
        config.validate()?;
        Ok(config)
    }

    fn from_file(path: &Path) -> Result<Self, UserError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            UserError::bad_input(format!("cannot read config file {}: {e}", path.display()))
        })?;
        toml::from_str(&text).map_err(|e| {
            let detail = e.message().trim().to_string();
            let line = e
                .span()
                .map(|span| format!(" (line {})", text[..span.start].matches('\n').count() + 1))
                .unwrap_or_default();
            UserError::bad_input(format!(
                "config file {}{line} is invalid: {detail}; fix it or move it away to use the defaults",
                path.display()
            ))
        })
    }

    /// Checks what serde cannot: bootstrap addresses must name their peer, the protocol id must be
    /// a protocol id, numbers must be usable.
    pub fn validate(&self) -> Result<(), UserError> {
        self.birthday.validate().map_err(|e| UserError::bad_input(format!("invalid config: {e}")))?;
        for addr in &self.bootstrap {
            bootstrap_peer(addr)?;
        }
        for addr in &self.listen {
            if addr.iter().any(|p| matches!(p, Protocol::P2p(_))) {
                return Err(UserError::bad_input(format!(
                    "listen address {addr} must not contain /p2p/: it names our own socket, not a peer"
                )));
            }
        }
        for addr in &self.relay_via {
            match addr.iter().last() {
                Some(Protocol::P2p(_)) if !addr.iter().any(|p| p == Protocol::P2pCircuit) => {}
                _ => {
                    return Err(UserError::bad_input(format!(
                        "relay address {addr} must be the relay's own address ending in /p2p/RELAYID (without /p2p-circuit)"
                    )));
                }
            }
        }
        self.public_ranges()?;
        if self.auto_relays > 16 {
            return Err(UserError::bad_input("auto_relays must be between 0 and 16"));
        }
        if self.threads.is_some_and(|n| n == 0 || n > MAX_THREADS) {
            return Err(UserError::bad_input(format!("threads must be between 1 and {MAX_THREADS}")));
        }
        self.relay_limits.validate().map_err(UserError::bad_input)?;
        if !self.kad_protocol.starts_with('/') || self.kad_protocol.len() > 128 {
            return Err(UserError::bad_input(format!(
                "kad protocol id {:?} is invalid: it must start with '/' and be at most 128 bytes, e.g. {DEFAULT_KAD_PROTOCOL}",
                self.kad_protocol
            )));
        }
        if self.max_stored_peers == 0 {
            return Err(UserError::bad_input("max_stored_peers must be at least 1"));
        }
        for spec in &self.expose {
            spec.validate().map_err(|e| UserError::bad_input(format!("[[expose]] {:?}: {e}", spec.name)))?;
        }
        for spec in &self.forward {
            spec.validate().map_err(|e| UserError::bad_input(format!("[[forward]] {:?}: {e}", spec.bind)))?;
        }
        if self.max_incoming_connections == 0 {
            return Err(UserError::bad_input("max_incoming_connections must be at least 1"));
        }
        if self.udp_idle_timeout_secs == 0 {
            return Err(UserError::bad_input("udp_idle_timeout_secs must be at least 1"));
        }
        if self.bootstrap_interval_secs == 0 {
            return Err(UserError::bad_input("bootstrap_interval_secs must be at least 1"));
        }
        Ok(())
    }

    /// The configured public ranges, parsed.
    pub fn public_ranges(&self) -> Result<Vec<crate::addresses::Cidr>, UserError> {
        self.public_ranges
            .iter()
            .map(|r| r.parse().map_err(|e: String| UserError::bad_input(format!("public range: {e}"))))
            .collect()
    }

    pub fn bootstrap_interval(&self) -> Duration {
        Duration::from_secs(self.bootstrap_interval_secs)
    }

    pub fn idle_connection_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_connection_timeout_secs)
    }

    /// Whether the listen addresses are the built-in defaults (whose failures are only warnings).
    pub fn listen_is_default(&self) -> bool {
        self.listen == default_listen_addrs()
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config always serialises")
    }
}

/// The PeerId a bootstrap address names in its trailing `/p2p/` component.
pub fn bootstrap_peer(addr: &Multiaddr) -> Result<PeerId, UserError> {
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => Ok(peer),
        _ => Err(UserError::bad_input(format!(
            "bootstrap address {addr} does not name its peer: append /p2p/PEERID (the peer prints it at start)"
        ))),
    }
}

/// Parses a multiaddr given by a user, naming the flag in the error.
pub fn parse_multiaddr(flag: &str, value: &str) -> Result<Multiaddr, UserError> {
    value.parse().map_err(|e| {
        UserError::bad_input(format!(
            "{flag} {value:?} is not a valid multiaddr ({e}); expected something like /ip4/192.0.2.1/udp/4001/quic-v1"
        ))
    })
}

/// The default data dir: the platform's per-user data dir, e.g. `~/.local/share/warren`.
pub fn default_data_dir() -> PathBuf {
    directories::ProjectDirs::from("", "", "warren")
        .map(|dirs| dirs.data_dir().to_path_buf())
        .unwrap_or_else(|| PathBuf::from(".warren"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_through_toml() {
        let config = Config::default();
        let back: Config = toml::from_str(&config.to_toml()).unwrap();
        assert_eq!(config, back);
    }

    #[test]
    fn bootstrap_without_peer_id_is_rejected_with_the_address_named() {
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().unwrap();
        let err = bootstrap_peer(&addr).unwrap_err();
        assert!(err.to_string().contains("/ip4/127.0.0.1/tcp/4001"));
        assert!(err.to_string().contains("/p2p/"));
    }

    #[test]
    fn unknown_config_keys_are_rejected_with_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "mdns = true\nlisten_port = 3\n").unwrap();
        let err = Config::load(dir.path(), Some(&path), Overrides::default()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("line 2"), "{text}");
        assert!(text.contains("listen_port"), "{text}");
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE_NAME), "mdns = true\ndht_mode = \"client\"\n").unwrap();
        let overrides = Overrides {
            no_mdns: true,
            dht_mode: Some(DhtMode::Server),
            ..Default::default()
        };
        let config = Config::load(dir.path(), None, overrides).unwrap();
        assert!(!config.mdns);
        assert_eq!(config.dht_mode, DhtMode::Server);
    }

    #[test]
    fn threads_come_from_the_file_or_the_flag_and_stay_in_range() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Config::load(dir.path(), None, Overrides::default()).unwrap().threads, None, "one per CPU unless set");
        std::fs::write(dir.path().join(CONFIG_FILE_NAME), "threads = 1\n").unwrap();
        assert_eq!(Config::load(dir.path(), None, Overrides::default()).unwrap().threads, Some(1));
        let flag = Overrides { threads: Some(2), ..Default::default() };
        assert_eq!(Config::load(dir.path(), None, flag).unwrap().threads, Some(2));
        for bad in [0, MAX_THREADS + 1] {
            let err = Config::load(dir.path(), None, Overrides { threads: Some(bad), ..Default::default() }).unwrap_err();
            assert!(err.message.contains("threads must be between 1 and 64"), "{}", err.message);
        }
    }
}
