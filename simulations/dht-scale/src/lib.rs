//! The DHT at scale: many real warren nodes in one process, over an in-process network
//! ([`net`]), with churn, measuring what users meet: whether `warren find` and
//! `warren forward PEERID/…` reach a peer, and how fast.
//!
//! Every node is `warren_node::node::run`, the function `warren up` runs: the same behaviour,
//! Kademlia configuration, identify, AutoNAT, address policy, relays, own-record publishing and
//! peer store (sled, in a data dir of its own). Only the wire differs (see [`net`]).
//!
//! A run: bootstrap nodes start (public, volunteering as relays, as `warren-bootstrap` runs),
//! then the other nodes join with those bootstrap addresses and nothing else: public ones
//! (DHT servers once AutoNAT confirms them, some volunteering as relays) and NATed ones (DHT
//! clients, reachable through a relay). Once every node is settled (see [`settled`]) the run
//! measures for a while: random lookups (`find`) and forward streams between random live nodes,
//! while nodes leave and join at the churn rate, some coming back with their data dir.

pub mod net;
pub mod report;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::{Multiaddr, PeerId, Transport as _};
use rand::Rng;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use warren_node::behaviour::Wire;
use warren_node::config::Config;
use warren_node::handle::{Command, NodeHandle};

use net::{Host, NODE_PORT, Net};
pub use report::Report;

/// The range public hosts and NATs live in: benchmarking space, which no real network routes;
/// the nodes are told to count it as public (`public_ranges`).
pub const PUBLIC_RANGE: &str = "198.18.0.0/15";
/// How long a node may take to start (open its store, listen) before the run gives up on it.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a lookup or a forward stream may take before it counts as failed: `warren find`'s
/// and `warren forward`'s own bounds are 30 s; a little beyond, so theirs decide.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(40);
/// A node is looked up only once it has been up this long: its own record is published a moment
/// after it has addresses (a relayed one takes a reservation first).
const TARGET_SETTLE: Duration = Duration::from_secs(30);
/// How long the background cost (traffic, dials, CPU with no lookups) is measured for, after
/// measuring: several ping and keep-alive periods.
const IDLE_WINDOW: Duration = Duration::from_secs(30);
/// The wait before that window: connections the lookups opened close after warren's 60 s idle
/// timeout, and the background is what is left once they have.
const IDLE_SETTLE: Duration = Duration::from_secs(65);
/// A target up for less than this when a sample failed is named new in the failure's reason.
const NEW_TARGET: Duration = Duration::from_secs(120);
/// How long stopping the nodes at the end may take before the run returns without them.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the timer whose lateness measures the machine's backlog fires ([`timer_lag_until`]).
const LAG_TICK: Duration = Duration::from_millis(100);
/// How long a node that leaves to come back stays away, at most.
const MAX_DOWNTIME: Duration = Duration::from_secs(60);

/// What to simulate.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Params {
    /// Nodes in the network (held constant under churn: each leaver is replaced).
    pub nodes: usize,
    /// Share of nodes that are publicly reachable (DHT servers).
    pub public_share: f64,
    /// Share of public nodes that volunteer as relays, besides the bootstrap nodes.
    pub relay_share: f64,
    /// Bootstrap nodes (public, relays), whose addresses every other node is given.
    pub bootstrap: usize,
    /// One-way link latency (each link between 0.5× and 1.5× of it).
    pub latency_ms: u64,
    /// Nodes joining per second while the network builds up (a whole network starting within
    /// a second is not what happens, and on this machine it is a minute of turmoil).
    pub join_per_sec: f64,
    /// Share of the nodes that leave (and are replaced) per 10 minutes.
    pub churn_per_10min: f64,
    /// Share of leavers that come back later with their data dir; the rest are replaced by
    /// new nodes with new identities.
    pub restart_share: f64,
    /// How long nodes may take to settle before measuring starts anyway.
    pub settle_timeout_secs: u64,
    /// How long to measure.
    pub measure_secs: u64,
    /// Lookups started per second, and as many forward streams.
    pub samples_per_sec: f64,
    /// After a failed find, ask every live node whether it holds the target's record (two
    /// requests per node per failure: for diagnosis, it loads the run). Runs recorded before
    /// it existed read as without.
    #[serde(default)]
    pub who_holds: bool,
    pub seed: u64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            nodes: 200,
            public_share: 0.3,
            relay_share: 0.2,
            bootstrap: 4,
            latency_ms: 25,
            join_per_sec: 5.0,
            churn_per_10min: 0.0,
            restart_share: 0.5,
            settle_timeout_secs: 180,
            measure_secs: 60,
            samples_per_sec: 2.0,
            who_holds: false,
            seed: 1,
        }
    }
}

/// How a node runs in the simulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Bootstrap,
    Public { relay: bool },
    Natted,
}

struct SimNode {
    role: Role,
    host: Host,
    dir: PathBuf,
    handle: NodeHandle,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
    up_since: Instant,
}

impl SimNode {
    fn peer(&self) -> PeerId {
        self.handle.peer_id
    }
}

/// The nodes up now, by PeerId.
type Live = Arc<Mutex<HashMap<PeerId, SimNode>>>;

struct World {
    net: Net,
    root: PathBuf,
    bootstrap_addrs: Vec<Multiaddr>,
    next_public: u32,
    next_natted: u32,
    next_dir: u32,
}

impl World {
    fn host(&mut self, role: Role) -> Host {
        let index = |n: u32| [(n >> 8) as u8, n as u8];
        match role {
            Role::Natted => {
                self.next_natted += 1;
                let [a, b] = index(self.next_natted);
                let private = Ipv4Addr::new(10, (self.next_natted >> 16) as u8, a, b);
                Host { ip: private, nat: Some(Ipv4Addr::new(198, 19, a, b)) }
            }
            _ => {
                self.next_public += 1;
                let [a, b] = index(self.next_public);
                Host { ip: Ipv4Addr::new(198, 18, a, b), nat: None }
            }
        }
    }

    fn new_dir(&mut self) -> PathBuf {
        self.next_dir += 1;
        self.root.join(format!("node-{}", self.next_dir))
    }

    fn config(&self, role: Role, host: Host) -> Config {
        let mut config = Config::default();
        config.listen = vec![format!("/ip4/{}/tcp/{NODE_PORT}", host.ip).parse().expect("valid listen address")];
        config.bootstrap = self.bootstrap_addrs.clone();
        // Not on this network: no multicast, no gateway to ask.
        config.mdns = false;
        config.port_mapping = false;
        config.public_ranges = vec![PUBLIC_RANGE.to_string()];
        config.relay = matches!(role, Role::Bootstrap | Role::Public { relay: true });
        config
    }

    async fn start(&self, role: Role, host: Host, dir: PathBuf) -> Result<SimNode, String> {
        let config = self.config(role, host);
        let wire = Wire::Streams(self.net.transport(host).boxed());
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready_tx, ready) = oneshot::channel();
        let run_dir = dir.clone();
        let task = tokio::spawn(async move {
            let stopped = async {
                let _ = stopped.await;
            };
            if let Err(e) = warren_node::node::run(&run_dir, config, false, wire, stopped, |h| {
                let _ = ready_tx.send(h);
            })
            .await
            {
                eprintln!("node in {} failed: {e}", run_dir.display());
            }
        });
        let handle = match tokio::time::timeout(START_TIMEOUT, ready).await {
            Ok(Ok(handle)) => handle,
            _ => return Err(format!("the node in {} did not start", dir.display())),
        };
        Ok(SimNode { role, host, dir, handle, stop, task, up_since: Instant::now() })
    }
}

/// Stops a node and waits until it has written its store.
async fn stop(node: SimNode) {
    let _ = node.stop.send(());
    let _ = node.task.await;
}

/// Whether a node has done what a node of its kind does after joining: public nodes serve the
/// DHT, NATed ones hold a relay reservation; and every node has a routing table and has
/// finished the DHT bootstrap it joined with (until then its lookups compete with the joins'
/// for the CPU, and the figures would say more about this machine than about the DHT).
/// `Err` says what the node still lacks.
async fn settled(node: &NodeHandle, role: Role) -> Result<(), &'static str> {
    let Ok(status) = node.request(Command::Status).await else { return Err("no status") };
    if status.routing_table_peers == 0 {
        return Err("empty routing table");
    }
    if status.dht_refreshed_secs_ago.is_none() {
        return Err("join bootstrap not finished");
    }
    match role {
        Role::Natted if !status.relayed_through.iter().any(|r| r.accepted) => Err("NATed, no relay reservation"),
        Role::Natted => Ok(()),
        _ if status.dht_mode != "server" => Err("public, not yet a DHT server"),
        _ => Ok(()),
    }
}

/// One lookup or forward stream.
#[derive(Debug, Clone)]
pub struct Sample {
    pub ok: bool,
    /// Why it failed, PeerIds and addresses left out so that alike failures read alike.
    pub failure: Option<String>,
    pub millis: f64,
    /// The target is behind a NAT (reached through a relay).
    pub natted_target: bool,
    /// For a find: the DHT requests it sent.
    pub requests: Option<u32>,
}

/// Runs one simulation; its nodes' data dirs live under `root`.
pub async fn run(params: &Params, root: &Path) -> Result<Report, String> {
    let started = Instant::now();
    let rss_before = report::rss_bytes();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(params.seed);
    let net = Net::new(Duration::from_millis(params.latency_ms));
    let mut world = World { net: net.clone(), root: root.to_path_buf(), bootstrap_addrs: Vec::new(), next_public: 0, next_natted: 0, next_dir: 0 };
    let live: Live = Arc::default();

    // Bootstrap nodes first: the first alone, the others joining it, as an operator brings up a
    // network; everyone else is then given all their addresses.
    let mut boot_addrs = Vec::new();
    for _ in 0..params.bootstrap.max(1) {
        let host = world.host(Role::Bootstrap);
        let dir = world.new_dir();
        let node = world.start(Role::Bootstrap, host, dir).await?;
        let addr: Multiaddr = format!("/ip4/{}/tcp/{NODE_PORT}/p2p/{}", host.ip, node.peer()).parse().expect("valid");
        boot_addrs.push(addr);
        world.bootstrap_addrs = boot_addrs[..1].to_vec();
        live.lock().expect("live").insert(node.peer(), node);
    }
    world.bootstrap_addrs = boot_addrs;

    let publics = ((params.nodes as f64 * params.public_share).round() as usize).saturating_sub(params.bootstrap);
    // Public nodes first, so that relays exist when the NATed nodes look for them.
    let mut joining: Vec<Role> = (0..params.nodes.saturating_sub(params.bootstrap))
        .map(|i| if i < publics { Role::Public { relay: rng.gen_bool(params.relay_share.clamp(0.0, 1.0)) } } else { Role::Natted })
        .collect();
    let per_batch = (params.join_per_sec.max(1.0)).ceil() as usize;
    let mut next_batch = Instant::now();
    while !joining.is_empty() {
        tokio::time::sleep_until(next_batch).await;
        next_batch += Duration::from_secs(1);
        let batch: Vec<Role> = joining.drain(..per_batch.min(joining.len())).collect();
        let starts: Vec<_> = batch.into_iter().map(|role| (role, world.host(role), world.new_dir())).collect();
        let nodes = futures::future::join_all(starts.into_iter().map(|(role, host, dir)| world.start(role, host, dir))).await;
        for node in nodes {
            let node = node?;
            live.lock().expect("live").insert(node.peer(), node);
        }
    }
    let joined_secs = started.elapsed().as_secs_f64();
    eprintln!("[{joined_secs:6.1} s] {} nodes up; waiting for them to settle", params.nodes);

    // Settling: every node has a routing table and has become what it is (server, or reachable
    // through a relay), or the timeout passed; how many did not is reported.
    let settle_deadline = Instant::now() + Duration::from_secs(params.settle_timeout_secs);
    let (unsettled, unsettled_why) = loop {
        let nodes: Vec<(NodeHandle, Role)> = live.lock().expect("live").values().map(|n| (n.handle.clone(), n.role)).collect();
        let checks = futures::future::join_all(nodes.iter().map(|(h, role)| settled(h, *role))).await;
        let unsettled = checks.iter().filter(|c| c.is_err()).count();
        if unsettled == 0 || Instant::now() >= settle_deadline {
            let mut why: std::collections::BTreeMap<String, usize> = Default::default();
            for reason in checks.iter().filter_map(|c| c.err()) {
                *why.entry(reason.to_string()).or_default() += 1;
            }
            break (unsettled, why.into_iter().collect::<Vec<_>>());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let settled_secs = started.elapsed().as_secs_f64();
    eprintln!("[{settled_secs:6.1} s] settled ({unsettled} not: {unsettled_why:?}); measuring for {} s", params.measure_secs);

    // Measuring.
    let traffic_before = total_traffic(&net, &live);
    let cpu_before = report::cpu_seconds();
    let measure_start = Instant::now();
    let measure_end = measure_start + Duration::from_secs(params.measure_secs);
    let timer_lag = tokio::spawn(timer_lag_until(measure_end));
    let finds: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let forwards: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let mut sample_tasks = Vec::new();
    let churn_per_sec = params.churn_per_10min * params.nodes as f64 / 600.0;
    let sample_every = Duration::from_secs_f64(1.0 / params.samples_per_sec.max(0.01));
    let mut next_sample = Instant::now();
    let mut churn_owed = 0.0;
    let mut churn_tick = tokio::time::interval(Duration::from_secs(1));
    let mut departures = 0usize;
    let mut returning: Vec<(Instant, Role, Host, PathBuf)> = Vec::new();
    let mut traffic_gone = (0u64, 0u64);
    while Instant::now() < measure_end {
        tokio::select! {
            _ = tokio::time::sleep_until(next_sample) => {
                next_sample += sample_every;
                let pairs = {
                    let live = live.lock().expect("live");
                    let eligible: Vec<&SimNode> = live.values().filter(|n| n.up_since.elapsed() >= TARGET_SETTLE).collect();
                    if eligible.len() < 3 { continue }
                    let mut pick = || {
                        let a = eligible[rng.gen_range(0..eligible.len())];
                        let b = loop {
                            let b = eligible[rng.gen_range(0..eligible.len())];
                            if b.peer() != a.peer() { break b }
                        };
                        (a.handle.clone(), b.peer(), b.role == Role::Natted)
                    };
                    [pick(), pick()]
                };
                let [find_pair, forward_pair] = pairs;
                sample_tasks.push(tokio::spawn(sample_find(find_pair, live.clone(), finds.clone(), params.who_holds)));
                sample_tasks.push(tokio::spawn(sample_forward(forward_pair, live.clone(), forwards.clone())));
            }
            _ = churn_tick.tick() => {
                churn_owed += churn_per_sec;
                while churn_owed >= 1.0 {
                    churn_owed -= 1.0;
                    let leaver = {
                        let mut live = live.lock().expect("live");
                        let candidates: Vec<PeerId> = live.values().filter(|n| n.role != Role::Bootstrap).map(|n| n.peer()).collect();
                        if candidates.is_empty() { break }
                        let peer = candidates[rng.gen_range(0..candidates.len())];
                        live.remove(&peer).expect("listed")
                    };
                    departures += 1;
                    let traffic = net.traffic(leaver.host.ip);
                    traffic_gone.0 += traffic.0;
                    traffic_gone.1 += traffic.1;
                    let (role, host, dir) = (leaver.role, leaver.host, leaver.dir.clone());
                    tokio::spawn(stop(leaver));
                    if rng.gen_bool(params.restart_share.clamp(0.0, 1.0)) {
                        let back = Instant::now() + MAX_DOWNTIME.mul_f64(rng.gen_range(0.2..1.0));
                        returning.push((back, role, host, dir));
                    } else {
                        let host = world.host(role);
                        let dir = world.new_dir();
                        let node = world.start(role, host, dir).await?;
                        live.lock().expect("live").insert(node.peer(), node);
                    }
                }
                let now = Instant::now();
                let due: Vec<_> = returning.iter().filter(|r| r.0 <= now).cloned().collect();
                returning.retain(|r| r.0 > now);
                for (_, role, host, dir) in due {
                    // Its traffic counter carries on from before it left.
                    let before = net.traffic(host.ip);
                    traffic_gone.0 = traffic_gone.0.saturating_sub(before.0);
                    traffic_gone.1 = traffic_gone.1.saturating_sub(before.1);
                    let node = world.start(role, host, dir).await?;
                    live.lock().expect("live").insert(node.peer(), node);
                }
            }
        }
    }
    futures::future::join_all(sample_tasks.drain(..)).await;
    let (timer_lag_p99_ms, timer_lag_max_ms) = timer_lag.await.unwrap_or_default();
    let measured_secs = measure_start.elapsed().as_secs_f64();
    let cpu_secs = report::cpu_seconds() - cpu_before;
    let traffic_after = total_traffic(&net, &live);
    let traffic = (traffic_after.0 + traffic_gone.0 - traffic_before.0, traffic_after.1 + traffic_gone.1 - traffic_before.1);

    // The background: what nodes cost when nobody looks anything up and nobody leaves (after
    // measuring, so that the joins' burst of connections is long over, and once the lookups'
    // connections have gone idle and closed).
    let connections_measuring = {
        let handles: Vec<NodeHandle> = live.lock().expect("live").values().map(|n| n.handle.clone()).collect();
        let statuses = futures::future::join_all(handles.iter().map(|h| h.request(Command::Status))).await;
        statuses.iter().flatten().map(|s| s.connections).sum::<usize>() as f64 / handles.len().max(1) as f64
    };
    eprintln!("[{:6.1} s] measured; at rest for {} s", started.elapsed().as_secs_f64(), (IDLE_SETTLE + IDLE_WINDOW).as_secs());
    tokio::time::sleep(IDLE_SETTLE).await;
    let idle_traffic = total_traffic(&net, &live);
    let idle_cpu = report::cpu_seconds();
    let idle_start = Instant::now();
    eprintln!("[{:6.1} s] measuring the background", started.elapsed().as_secs_f64());
    tokio::time::sleep(IDLE_WINDOW).await;
    let idle_secs = idle_start.elapsed().as_secs_f64();
    let idle_cpu = report::cpu_seconds() - idle_cpu;
    let idle_traffic = {
        let now = total_traffic(&net, &live);
        let per_node_min = |a: u64, b: u64| a.saturating_sub(b) as f64 / params.nodes as f64 / (idle_secs / 60.0);
        (per_node_min(now.0, idle_traffic.0), per_node_min(now.1, idle_traffic.1))
    };

    eprintln!("[{:6.1} s] collecting routing tables and statuses", started.elapsed().as_secs_f64());
    // Routing-table health: the share of entries that are nodes still up.
    let (handles, live_peers): (Vec<NodeHandle>, std::collections::HashSet<PeerId>) = {
        let live = live.lock().expect("live");
        (live.values().map(|n| n.handle.clone()).collect(), live.keys().copied().collect())
    };
    let tables = futures::future::join_all(handles.iter().map(|h| h.request(Command::RoutingTable))).await;
    let (mut entries, mut live_entries) = (0usize, 0usize);
    for table in tables.into_iter().flatten() {
        entries += table.len();
        live_entries += table.iter().filter(|p| live_peers.contains(p)).count();
    }
    let nodes_now = handles.len();
    let rss = report::rss_bytes();
    let statuses = futures::future::join_all(handles.iter().map(|h| h.request(Command::Status))).await;
    let connection_kinds = {
        let roles: HashMap<PeerId, Role> = live.lock().expect("live").iter().map(|(p, n)| (*p, n.role)).collect();
        let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
        let name = |role: Option<&Role>| match role {
            Some(Role::Natted) => "natted",
            Some(Role::Bootstrap) => "bootstrap",
            Some(Role::Public { relay: true }) => "relay",
            Some(Role::Public { relay: false }) => "public",
            None => "gone",
        };
        let all_peers = futures::future::join_all(handles.iter().map(|h| h.request(Command::Peers))).await;
        for (handle, peers) in handles.iter().zip(all_peers) {
            let Ok(peers) = peers else { continue };
            let own = name(roles.get(&handle.peer_id));
            for entry in peers {
                let remote = entry.peer_id.parse::<PeerId>().ok();
                for conn in &entry.connections {
                    let key = format!("{own} -> {} ({}, {}, open ≥ 60 s: {})", name(remote.as_ref().and_then(|p| roles.get(p))), conn.path, conn.direction, conn.age_secs >= 60);
                    *kinds.entry(key).or_default() += 1;
                }
            }
        }
        kinds.into_iter().collect::<Vec<_>>()
    };
    let relays = report::RelaySummary::of(statuses.iter().flatten().filter_map(|s| s.relay.as_ref()));
    let connections = statuses.iter().flatten().map(|s| s.connections).sum::<usize>() as f64 / nodes_now.max(1) as f64;

    let finds = finds.lock().expect("samples").clone();
    let forwards = forwards.lock().expect("samples").clone();
    let report = Report {
        params: params.clone(),
        joined_secs,
        settled_secs,
        unsettled,
        unsettled_why,
        measured_secs,
        departures,
        finds: report::Outcomes::of(&finds),
        forwards: report::Outcomes::of(&forwards),
        table_entries_per_node: entries as f64 / nodes_now.max(1) as f64,
        table_live_share: if entries == 0 { 0.0 } else { live_entries as f64 / entries as f64 },
        bytes_per_node_per_min: traffic.0 as f64 / nodes_now.max(1) as f64 / (measured_secs / 60.0),
        dials_per_node_per_min: traffic.1 as f64 / nodes_now.max(1) as f64 / (measured_secs / 60.0),
        rss_per_node_kib: rss.saturating_sub(rss_before) as f64 / 1024.0 / nodes_now.max(1) as f64,
        cpu_share: cpu_secs / measured_secs / report::cores() as f64,
        timer_lag_p99_ms,
        timer_lag_max_ms,
        relays,
        connections_per_node: connections,
        connections_per_node_measuring: connections_measuring,
        connection_kinds,
        idle_bytes_per_node_per_min: idle_traffic.0,
        idle_dials_per_node_per_min: idle_traffic.1,
        idle_cpu_ms_per_node_per_sec: idle_cpu * 1000.0 / idle_secs / params.nodes as f64,
    };

    eprintln!("[{:6.1} s] reported; stopping the nodes", started.elapsed().as_secs_f64());
    let nodes: Vec<SimNode> = live.lock().expect("live").drain().map(|(_, n)| n).collect();
    if tokio::time::timeout(STOP_TIMEOUT, futures::future::join_all(nodes.into_iter().map(stop))).await.is_err() {
        eprintln!("some nodes had not stopped after {} s; leaving them", STOP_TIMEOUT.as_secs());
    }
    Ok(report)
}

fn total_traffic(net: &Net, live: &Live) -> (u64, u64) {
    let ips: Vec<Ipv4Addr> = live.lock().expect("live").values().map(|n| n.host.ip).collect();
    ips.iter().map(|ip| net.traffic(*ip)).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

/// A lookup, as `warren find PEER` makes it: found means addresses came back.
async fn sample_find((from, target, natted_target): (NodeHandle, PeerId, bool), live: Live, out: Arc<Mutex<Vec<Sample>>>, who_holds: bool) {
    let started = Instant::now();
    let reply = tokio::time::timeout(SAMPLE_TIMEOUT, from.request(|tx| Command::Find(target, tx))).await;
    let failure = match &reply {
        Ok(Ok(r)) if r.found && !r.addrs.is_empty() => None,
        Ok(Ok(r)) if r.found => Some("found without a usable address".to_string()),
        Ok(Ok(_)) => Some(format!("not found ({})", publication(target, &live, who_holds).await)),
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some("no answer in time".to_string()),
    };
    let requests = reply.ok().and_then(|r| r.ok()).map(|r| r.requests);
    record(started, failure, natted_target, requests, &[from.peer_id, target], &live, &out);
}

/// Where the target of a failed find stands with publishing its record, as its status says,
/// and who holds it: whether what was looked for was there to be found.
async fn publication(target: PeerId, live: &Live, who_holds: bool) -> String {
    let handle = live.lock().expect("live").get(&target).map(|n| n.handle.clone());
    let Some(handle) = handle else { return "target gone".into() };
    let Ok(status) = handle.request(Command::Status).await else { return "target without status".into() };
    let published = match (status.addresses_published_secs_ago, status.address_publish_failures) {
        (None, 0) => "target's record never published, none failed",
        (None, _) => "target's record never published, attempts timed out",
        (Some(_), failed) if failed > 0 => "target's record published once, lately timing out",
        (Some(secs), _) if secs < 120 => "target's record published < 2 min ago",
        (Some(_), _) => "target's record published >= 2 min ago",
    };
    if !who_holds {
        return published.into();
    }
    format!("{published}; {}", holders(target, live).await)
}

/// Which live nodes hold `target`'s record, against the 20 DHT servers closest to its key (the
/// ones a lookup ends at): printed in full, summed up in the answer.
async fn holders(target: PeerId, live: &Live) -> &'static str {
    let nodes: Vec<NodeHandle> = live.lock().expect("live").values().map(|n| n.handle.clone()).collect();
    let key = libp2p::kad::KBucketKey::from(target);
    let mut servers = Vec::new();
    let mut held = Vec::new();
    for node in &nodes {
        if let Ok(status) = node.request(Command::Status).await
            && status.dht_mode == "server"
        {
            servers.push((libp2p::kad::KBucketKey::from(node.peer_id).distance(&key), node.peer_id));
        }
        // The target holds its own record (libp2p stores what it provides): not a holder.
        if node.peer_id != target
            && let Ok(Some(addrs)) = node.request(|tx| Command::HeldRecord(target, tx)).await
        {
            held.push((node.peer_id, addrs.len()));
        }
    }
    servers.sort();
    let closest: std::collections::HashSet<PeerId> = servers.iter().take(20).map(|(_, p)| *p).collect();
    let near = held.iter().filter(|(p, _)| closest.contains(p)).count();
    let empty = held.iter().filter(|(_, addrs)| *addrs == 0).count();
    eprintln!("held record of failed find target {target}: {} live holders, {near} among the 20 closest of {} servers, {empty} without addresses", held.len(), servers.len());
    match (held.len(), near) {
        (0, _) => "no live node holds it",
        (_, 0) => "held, but by none of the 20 closest servers",
        _ if empty == held.len() => "held near, without addresses",
        _ => "held by some of the 20 closest servers",
    }
}

/// A forward stream, as `warren forward` opens one for a new connection: reach the peer (its
/// stored addresses, the DHT, a relay), open `/warren/forward/1.0.0`, send a request and read
/// the answer. The service is not exposed, so the answer is a refusal: what counts is that one
/// came back over the stream.
async fn sample_forward((from, target, natted_target): (NodeHandle, PeerId, bool), live: Live, out: Arc<Mutex<Vec<Sample>>>) {
    let started = Instant::now();
    let attempt = async {
        let mut opened = from.reach_and_open(target, warren_forward::STREAM_PROTOCOL).await.map_err(|e| e.to_string())?;
        warren_forward::opener::send_request(&mut opened.stream, "dht-scale", warren_forward::Transport::Tcp)
            .await
            .map_err(|e| e.to_string())?;
        match warren_forward::opener::read_answer(&mut opened.stream).await {
            Ok(()) | Err(warren_forward::opener::Refusal::Refused { .. }) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    };
    let failure = match tokio::time::timeout(SAMPLE_TIMEOUT, attempt).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(_) => Some("no answer in time".to_string()),
    };
    record(started, failure, natted_target, None, &[from.peer_id, target], &live, &out);
}

/// Keeps a sample unless one of its ends left while it ran (that is churn, not a failed lookup).
fn record(started: Instant, failure: Option<String>, natted_target: bool, requests: Option<u32>, ends: &[PeerId], live: &Live, out: &Mutex<Vec<Sample>>) {
    let (still_up, target_age) = {
        let live = live.lock().expect("live");
        let still_up = ends.iter().all(|p| live.get(p).is_some_and(|n| n.up_since <= started));
        (still_up, ends.last().and_then(|p| live.get(p)).map(|n| started.saturating_duration_since(n.up_since)))
    };
    if still_up {
        let ok = failure.is_none();
        // Whether the target had only just joined tells a record not yet published from one lost.
        let joined = if target_age.is_some_and(|age| age < NEW_TARGET) { "new target" } else { "settled target" };
        let failure = failure.map(|f| format!("{} [{joined}]", report::generalise(&f)));
        out.lock().expect("samples").push(Sample { ok, failure, millis: started.elapsed().as_secs_f64() * 1000.0, natted_target, requests });
    }
}

/// Sleeps [`LAG_TICK`] at a time until `end` and returns how late the wake-ups came, p99 and
/// worst, in ms.
async fn timer_lag_until(end: Instant) -> (f64, f64) {
    let mut lags = Vec::new();
    while Instant::now() < end {
        let due = Instant::now() + LAG_TICK;
        tokio::time::sleep_until(due).await;
        lags.push(Instant::now().saturating_duration_since(due).as_secs_f64() * 1000.0);
    }
    lags.sort_by(f64::total_cmp);
    (report::quantile(&lags, 0.99), report::quantile(&lags, 1.0))
}
