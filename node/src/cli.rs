//! The `warren` command line: one subcommand each, parsed by clap, dispatched to the node
//! ([`crate::node`]) or to the control API client.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use libp2p::{Multiaddr, PeerId};

use crate::config::{self, Config, DhtMode, Overrides};
use crate::api;
use crate::control::client::Client;
use crate::error::UserError;
use crate::api::{ExposeSpec, ForwardSpec};

const ABOUT: &str = "warren: a peer-to-peer node that finds peers on the LAN (mDNS) and across \
the internet (Kademlia DHT), and lets you inspect it while it runs.";

const AFTER_HELP: &str = "Start a node with `warren up`, then, from another terminal, `warren status`.\n\
Every command but `up` and `config` talks to the running node through its control socket\n\
in the data dir, so pass the same --data-dir (or WARREN_DATA_DIR) to both.";

#[derive(Debug, Parser)]
#[command(name = "warren", version, about = ABOUT, after_help = AFTER_HELP, propagate_version = true)]
pub struct Cli {
    /// Where the node keeps its identity, peer store, config.toml and control socket
    /// [default: the per-user data dir, e.g. ~/.local/share/warren]
    #[arg(long, global = true, env = "WARREN_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Print machine-readable JSON instead of text
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node in the foreground (Ctrl-C stops it cleanly)
    Up(NodeArgs),
    /// Show the running node's identity, addresses, reachability and DHT state
    Status,
    /// List connected peers: address, transport, direct or relayed, round-trip time, and why a
    /// relayed peer is not reached directly
    Peers,
    /// Tell what kind of network the running node is in: NAT type, whether UDP gets out,
    /// port mapping, a second NAT, relay round trips, and what that means for connections
    #[command(after_help = "The node dials up to 3 peers over QUIC and traces the first 4 hops towards up to 3 of them (a few seconds).\nIt needs a running node with peers: right after `warren up` it may not know enough yet, and says so.")]
    Netcheck,
    /// Measure round-trip time to a peer with the standard libp2p ping protocol
    Ping {
        /// The peer to ping; it is dialed first if needed (stored addresses, then the DHT)
        #[arg(value_parser = parse_peer_id, value_name = "PEER")]
        peer: PeerId,
        /// Number of pings
        #[arg(long, short = 'c', default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=i64::from(api::MAX_PING_COUNT)))]
        count: u32,
    },
    /// Look a peer's addresses up in the DHT and report how long it took
    Find {
        #[arg(value_parser = parse_peer_id, value_name = "PEER")]
        peer: PeerId,
    },
    /// Print the running node's PeerId
    Id,
    /// Offer a local service to chosen peers under a name (kept across restarts)
    #[command(after_help = "Example: warren expose web 127.0.0.1:8080 --allow 12D3KooW...\nPeers not allowed are refused; a peer names the service, never a host or port.")]
    Expose {
        /// The name peers ask for ([A-Za-z0-9._-], at most 64 bytes)
        name: String,
        /// Where connections go, HOST:PORT
        target: String,
        /// A peer allowed to use the service (repeatable); nobody is allowed by default
        #[arg(long, value_name = "PEERID", value_parser = parse_peer_id)]
        allow: Vec<PeerId>,
        /// Allow every peer (must be said explicitly)
        #[arg(long, conflicts_with = "allow")]
        allow_any: bool,
        /// Expose a UDP service (datagrams) instead of TCP
        #[arg(long)]
        udp: bool,
        /// Concurrent connections (UDP sessions) served at most
        #[arg(long, default_value_t = crate::api::DEFAULT_MAX_CONNECTIONS)]
        max_connections: usize,
    },
    /// List exposed services with their live counters
    Exposes,
    /// Stop exposing a service
    Unexpose { name: String },
    /// Forward a local port to a service on a peer, like `ssh -L` (kept across restarts)
    #[command(after_help = "Example: warren forward 8080 12D3KooW.../web   then connect to 127.0.0.1:8080")]
    Forward {
        /// Local [IP:]PORT to listen on; the IP defaults to 127.0.0.1, port 0 picks one
        #[arg(value_name = "[BIND_ADDR:]PORT", value_parser = parse_bind)]
        bind: std::net::SocketAddr,
        /// The peer and the service's name on it
        #[arg(value_name = "PEERID/NAME", value_parser = parse_target)]
        target: (PeerId, String),
        /// Forward UDP datagrams instead of TCP connections
        #[arg(long)]
        udp: bool,
        /// Concurrent local connections (UDP sessions) at most
        #[arg(long, default_value_t = crate::api::DEFAULT_MAX_CONNECTIONS)]
        max_connections: usize,
    },
    /// List forwards: live connections, bytes each way, path, last error
    Forwards,
    /// Stop a forward
    Unforward {
        #[arg(value_name = "[BIND_ADDR:]PORT", value_parser = parse_bind)]
        bind: std::net::SocketAddr,
    },
    /// Print the effective configuration (config file + flags) without starting a node
    Config(NodeArgs),
    /// Diagnostics for developers
    #[command(hide = true)]
    Debug {
        #[command(subcommand)]
        command: DebugCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum DebugCommand {
    /// Add COUNT synthetic records to the peer store (load for crash tests)
    StoreChurn { count: u32 },
}

/// Settings of a node, shared by `up` and `config`.
#[derive(Debug, Args, Clone)]
pub struct NodeArgs {
    /// Read settings from this TOML file [default: DATA_DIR/config.toml when it exists]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Listen on this address (repeatable); port 0 picks a free port
    /// [default: QUIC and TCP on port 4001, IPv4 and IPv6]
    #[arg(long, value_name = "MULTIADDR", value_parser = parse_multiaddr)]
    pub listen: Vec<Multiaddr>,

    /// Join the network through this peer (repeatable), e.g. /ip4/192.0.2.7/udp/4001/quic-v1/p2p/12D3Koo...
    #[arg(long, value_name = "MULTIADDR/p2p/ID", value_parser = parse_bootstrap)]
    pub bootstrap: Vec<Multiaddr>,

    /// Do not discover or announce peers on the LAN by mDNS
    #[arg(long)]
    pub no_mdns: bool,

    /// Do not ask the router to forward our ports (PCP, NAT-PMP, UPnP-IGD)
    #[arg(long)]
    pub no_port_mapping: bool,

    /// Do not punch through symmetric NATs by the birthday paradox (peers behind one stay relayed)
    #[arg(long)]
    pub no_birthday_punch: bool,

    /// DHT role: server answers queries, client only asks, auto is server once AutoNAT confirms
    /// the node is publicly reachable [default: auto]
    #[arg(long, value_enum, value_name = "MODE")]
    pub dht_mode: Option<DhtMode>,

    /// Kademlia protocol id; /ipfs/kad/1.0.0 joins the IPFS DHT [default: /warren/kad/1.0.0]
    #[arg(long, value_name = "PROTOCOL")]
    pub kad_protocol: Option<String>,

    /// Listen on no direct address: the node is reached only through relays
    #[arg(long, conflicts_with = "listen")]
    pub no_listen: bool,

    /// Serve as a volunteer relay for others (within [relay_limits] of the config) once the node
    /// is confirmed publicly reachable
    #[arg(long)]
    pub relay: bool,

    /// Serve as a relay even without a confirmed public address (LANs, labs); implies --relay
    #[arg(long)]
    pub relay_force: bool,

    /// Always hold a reservation on this relay (repeatable), e.g. /ip4/192.0.2.7/udp/4001/quic-v1/p2p/12D3Koo...
    #[arg(long, value_name = "MULTIADDR/p2p/ID", value_parser = parse_bootstrap)]
    pub relay_via: Vec<Multiaddr>,

    /// Relays to reserve on automatically while not publicly reachable; 0 turns it off [default: 2]
    #[arg(long, value_name = "N")]
    pub auto_relays: Option<usize>,

    /// Address ranges to treat as publicly routable besides global ones, e.g. 203.0.113.0/24,10.0.0.0/8
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',')]
    pub public_ranges: Vec<String>,

    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9464 (unauthenticated)
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,

    /// Threads that run the node; 1 costs less CPU per forwarded byte, more serve many
    /// connections at once faster [default: one per CPU]
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

impl NodeArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen.clone(),
            bootstrap: self.bootstrap.clone(),
            no_mdns: self.no_mdns,
            no_port_mapping: self.no_port_mapping,
            no_birthday_punch: self.no_birthday_punch,
            dht_mode: self.dht_mode,
            kad_protocol: self.kad_protocol.clone(),
            no_listen: self.no_listen,
            relay: self.relay,
            relay_force: self.relay_force,
            relay_via: self.relay_via.clone(),
            auto_relays: self.auto_relays,
            public_ranges: self.public_ranges.clone(),
            metrics: self.metrics,
            threads: self.threads,
        }
    }

    pub fn load(&self, data_dir: &std::path::Path) -> Result<Config, UserError> {
        Config::load(data_dir, self.config.as_deref(), self.overrides())
    }
}

fn parse_multiaddr(value: &str) -> Result<Multiaddr, String> {
    value.parse().map_err(|e| format!("not a multiaddr ({e}); expected e.g. /ip4/0.0.0.0/udp/4001/quic-v1"))
}

fn parse_bootstrap(value: &str) -> Result<Multiaddr, String> {
    let addr = parse_multiaddr(value)?;
    config::bootstrap_peer(&addr).map_err(|_| "the address must end in /p2p/PEERID (the peer prints it at start)".to_string())?;
    Ok(addr)
}

fn parse_bind(value: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(port) = value.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    value.parse().map_err(|_| "expected PORT or IP:PORT, e.g. 8080 or 127.0.0.1:8080".to_string())
}

fn parse_target(value: &str) -> Result<(PeerId, String), String> {
    let (peer, name) = value.split_once('/').ok_or("expected PEERID/NAME, e.g. 12D3KooW.../web")?;
    let peer = parse_peer_id(peer)?;
    warren_forward::validate_service_name(name)?;
    Ok((peer, name.to_string()))
}

fn parse_peer_id(value: &str) -> Result<PeerId, String> {
    value.parse().map_err(|_| "not a PeerId; PeerIds look like 12D3KooW... (see `warren id` on that node)".to_string())
}

pub fn main() -> ExitCode {
    main_with(std::env::args_os())
}

/// Runs the command line `args` (program name first).
pub fn main_with<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    init_tracing(matches!(cli.command, Command::Up(_)));
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    // `warren up` with `threads` set (a config that does not load is reported by `run`).
    if let Command::Up(args) = &cli.command {
        let data_dir = cli.data_dir.clone().unwrap_or_else(config::default_data_dir);
        if let Some(threads) = args.load(&data_dir).ok().and_then(|config| config.threads) {
            runtime.worker_threads(threads);
        }
    }
    let runtime = runtime.enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.message);
            e.kind.exit_code()
        }
    }
}

fn init_tracing(daemon: bool) {
    let default = if daemon { "info" } else { "warn" };
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Kademlia tries a bootstrap by itself whenever a listen address appears while no peer is
    // connected, and warns "Failed to trigger bootstrap: No known peers" for each of our two
    // DHTs at every start of a node that is first on its network; that cannot be turned off
    // (its throttle setting is crate-private). Its warnings are kept quiet unless asked for.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("libp2p_kad")) {
        filter = filter.add_directive("libp2p_kad::behaviour=error".parse().expect("a valid directive"));
    }
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

async fn run(cli: Cli) -> Result<(), UserError> {
    let data_dir = cli.data_dir.clone().unwrap_or_else(config::default_data_dir);
    let client = Client::new(&data_dir);
    let quick = Duration::from_secs(5);
    match cli.command {
        Command::Up(args) => crate::node::up(&data_dir, args.load(&data_dir)?).await,
        Command::Config(args) => {
            let config = args.load(&data_dir)?;
            if cli.json {
                print_json(&config);
            } else {
                print!("{}", config.to_toml());
            }
            Ok(())
        }
        Command::Status => {
            let status: api::Status = client.get("/v1/status", quick).await?;
            output(cli.json, &status, crate::output::status);
            Ok(())
        }
        Command::Peers => {
            let peers: Vec<api::PeerEntry> = client.get("/v1/peers", quick).await?;
            output(cli.json, &peers, |p| crate::output::peers(p));
            Ok(())
        }
        Command::Id => {
            let id: api::Identity = client.get("/v1/id", quick).await?;
            output(cli.json, &id, |id| id.peer_id.clone());
            Ok(())
        }
        Command::Ping { peer, count } => {
            let timeout = Duration::from_secs(45) + Duration::from_secs(11) * count;
            let reply: api::PingReply = client.post(&format!("/v1/ping/{peer}?count={count}"), timeout).await?;
            output(cli.json, &reply, crate::output::ping);
            Ok(())
        }
        Command::Netcheck => {
            let reply: api::Netcheck = client.post("/v1/netcheck", Duration::from_secs(30)).await?;
            output(cli.json, &reply, crate::output::netcheck);
            Ok(())
        }
        Command::Find { peer } => {
            let reply: api::FindReply = client.post(&format!("/v1/find/{peer}"), Duration::from_secs(60)).await?;
            output(cli.json, &reply, crate::output::find);
            if reply.found {
                Ok(())
            } else {
                Err(UserError::operation(format!(
                    "{peer} was not found in the DHT (lookup took {:.0} ms)",
                    reply.elapsed_ms
                )))
            }
        }
        Command::Expose { name, target, allow, allow_any, udp, max_connections } => {
            let spec = ExposeSpec { name, target, allow: allow.iter().map(|p| p.to_string()).collect(), allow_any, udp, max_connections };
            spec.validate().map_err(|e| UserError::bad_input(e.to_string()))?;
            let info: api::ExposeInfo = client.post_json("/v1/exposes", &spec, quick).await?;
            output(cli.json, &info, |i| format!("exposing {} -> {}", i.name, i.target));
            Ok(())
        }
        Command::Exposes => {
            let list: Vec<api::ExposeInfo> = client.get("/v1/exposes", quick).await?;
            output(cli.json, &list, |l| crate::output::exposes(l));
            Ok(())
        }
        Command::Unexpose { name } => {
            let () = client.delete(&format!("/v1/exposes/{name}"), quick).await?;
            output(cli.json, &(), |_| format!("stopped exposing {name}"));
            Ok(())
        }
        Command::Forward { bind, target: (peer, service), udp, max_connections } => {
            let spec = ForwardSpec { bind: bind.to_string(), peer: peer.to_string(), service, udp, max_connections };
            let info: api::ForwardInfo = client.post_json("/v1/forwards", &spec, quick).await?;
            output(cli.json, &info, |i| format!("forwarding {} -> {}/{}", i.bind, i.peer, i.service));
            Ok(())
        }
        Command::Forwards => {
            let list: Vec<api::ForwardInfo> = client.get("/v1/forwards", quick).await?;
            output(cli.json, &list, |l| crate::output::forwards(l));
            Ok(())
        }
        Command::Unforward { bind } => {
            let () = client.delete(&format!("/v1/forwards/{bind}"), quick).await?;
            output(cli.json, &(), |_| format!("stopped forwarding {bind}"));
            Ok(())
        }
        Command::Debug { command: DebugCommand::StoreChurn { count } } => {
            let reply: api::ChurnReply = client.post(&format!("/v1/debug/store-churn/{count}"), Duration::from_secs(60)).await?;
            output(cli.json, &reply, |r| format!("added {} synthetic peer records", r.inserted));
            Ok(())
        }
    }
}

fn print_json<T: serde::Serialize>(value: &T) {
    println!("{}", serde_json::to_string_pretty(value).expect("API types serialise"));
}

fn output<T: serde::Serialize>(json: bool, value: &T, text: impl FnOnce(&T) -> String) {
    if json {
        print_json(value);
    } else {
        println!("{}", text(value));
    }
}
