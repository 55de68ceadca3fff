//! natlab: a NAT laboratory in Linux network namespaces, with the kernel's own NAT, real
//! `warren` binaries, and a connectivity matrix as its result.
//!
//! # Layout
//! - `sys`   — TUN devices, entering namespaces, signals (the only unsafe code).
//! - `wire`  — the lab's internet: a userspace switch between TUN devices with one-way latency.
//! - `topo`  — namespaces, veths, NAT routers (nftables masquerade), site kinds.
//! - `nodes` — warren processes, the echo service, the checked transfer.
//! - `netcheck` — `warren netcheck` run in every kind of site, its answers against the truth.
//! - `upnp` — the port-mapping routers: miniupnpd, a STUN server for it, a NAT-PMP client.
//! - this file — one cell of the matrix, the whole matrix, and its reports (Markdown, JSON, SVG).
//!
//! # One cell
//! A bootstrap node and a volunteer relay sit on the wire. For a pair of sites (A, B), fresh
//! nodes start in both, knowing only the bootstrap node; B exposes an echo service to A; A
//! finds B by PeerId (DHT), forwards a local port to it, and the lab records: did A reach B, did
//! the connection become direct (and over which transport, how long after the first relayed
//! contact), and did 10 MB through the forward come back intact, over which path.
//!
//! # The restart phase
//! Each cell's nodes are stopped (SIGTERM) when the cell ends, their data dirs kept. After the
//! matrix the bootstrap node and the relay are stopped and started again with their data dirs;
//! then each cell's B and A are started again with theirs, one cell at a time as in the matrix
//! (cells share hosts, and nodes of different cells meeting on one LAN would change what is
//! measured). Nobody re-runs a command: the lab records whether A's forward (kept in A's store)
//! reaches B again and how long after the cell's nodes came back, whether the path is direct
//! again, and whether 10 MB come back intact. The same outcome as before is expected.

pub mod netcheck;
pub mod nodes;
pub mod sys;
pub mod topo;
pub mod upnp;
pub mod wire;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use nodes::{Echo, Node, first_byte, transfer, wait_for};
use topo::{Host, Lab, PUBLIC_RANGE, Site, SiteKind};

/// Port the core nodes listen on.
const CORE_PORT: u16 = 4001;
/// How long AutoNAT may take to confirm the relay public (libp2p's first probe waits 15 s).
const RELAY_CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);
/// How long A may take to find B in the DHT.
const FIND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after first contact a direct connection may take to appear: a DCUtR punch takes
/// about a second, a birthday punch through a symmetric NAT up to 35 s of probing (its target
/// is direct within 40 s of first contact).
const DIRECT_WAIT: Duration = Duration::from_secs(40);
/// The checked transfer through the forward.
const TRANSFER_BYTES: usize = 10 * 1024 * 1024;
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(60);
/// New connections timed per cell (connect + one byte echoed); the median is reported.
const FIRST_BYTE_SAMPLES: usize = 5;
/// How long after the whole-lab restart a cell's forward may take to reach B again: the relay
/// needs AutoNAT's confirmation again (15 s and more) before NATed nodes can reserve on it.
const RESTART_REACH_TIMEOUT: Duration = Duration::from_secs(90);
/// One probe of a forward after the restart.
const RESTART_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which transports the nodes of a cell use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transports {
    /// QUIC and TCP (the default: QUIC is preferred).
    Both,
    /// TCP only (UDP disabled on the nodes).
    Tcp,
}

/// One cell to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pair {
    pub a: SiteKind,
    pub b: SiteKind,
    pub transports: Transports,
    /// After the transfer, cut the direct path at A's router: traffic must fall back to the
    /// relay; then restore it: the nodes must punch again.
    pub repunch: bool,
    /// Once direct, change A's router's mappings in the middle of a transfer ([`REBIND_MB`]
    /// by default).
    pub rebind: Option<Rebind>,
}

/// How a rebinding cell changes A's router in the middle of a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rebind {
    /// Every conntrack entry flushed: each flow is mapped afresh (the same port where the NAT
    /// keeps ports and the port is free).
    Flush,
    /// The masquerade moved to other ports, then the entries flushed: every flow gets a new
    /// public port.
    Ports,
}

/// What a rebinding cell saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Rebinding {
    /// Megabytes sent.
    pub mb: usize,
    /// The transfer came back intact.
    pub transfer_ok: bool,
    pub error: Option<String>,
    /// The longest time no byte came back during the transfer, seconds.
    pub stall_s: Option<f64>,
    pub took_s: Option<f64>,
    /// The path the forward reported afterwards.
    pub path_after: Option<String>,
    /// A direct connection existed right after the transfer.
    pub direct_after: bool,
    /// If not: seconds until one was back.
    pub direct_again_after_s: Option<f64>,
}

/// The transfer a rebinding cell disturbs.
pub const REBIND_MB: usize = 100;
/// When, into that transfer, the router is changed.
const REBIND_AFTER: Duration = Duration::from_secs(2);

impl Pair {
    pub fn new(a: SiteKind, b: SiteKind) -> Pair {
        Pair { a, b, transports: Transports::Both, repunch: false, rebind: None }
    }
}

impl std::str::FromStr for Pair {
    type Err = String;
    /// `A:B`, `A:B:tcp`, `A:B:repunch`, `A:B:rebind` or `A:B:rebind-ports`, kinds by name
    /// (`eim:symmetric`, `same-lan:same-lan`).
    fn from_str(s: &str) -> Result<Self, String> {
        use clap::ValueEnum;
        let parts: Vec<&str> = s.split(':').collect();
        let kind = |p: &str| SiteKind::from_str(p, true).map_err(|_| format!("unknown site kind {p:?} in {s:?}"));
        match parts.as_slice() {
            [a, b] => Ok(Pair::new(kind(a)?, kind(b)?)),
            [a, b, "tcp"] => Ok(Pair { transports: Transports::Tcp, ..Pair::new(kind(a)?, kind(b)?) }),
            [a, b, "repunch"] => Ok(Pair { repunch: true, ..Pair::new(kind(a)?, kind(b)?) }),
            [a, b, "rebind"] => Ok(Pair { rebind: Some(Rebind::Flush), ..Pair::new(kind(a)?, kind(b)?) }),
            [a, b, "rebind-ports"] => Ok(Pair { rebind: Some(Rebind::Ports), ..Pair::new(kind(a)?, kind(b)?) }),
            _ => Err(format!("{s:?}: expected A:B, A:B:tcp, A:B:repunch, A:B:rebind or A:B:rebind-ports, e.g. eim:symmetric")),
        }
    }
}

/// The full matrix: every unordered pair of site kinds, plus two hosts behind one NAT, plus
/// EIM × EIM and UDP-blocked × EIM with TCP only.
pub fn full_matrix() -> Vec<Pair> {
    let kinds = SiteKind::all();
    let mut pairs = Vec::new();
    for (i, a) in kinds.iter().enumerate() {
        for b in &kinds[i..] {
            pairs.push(Pair::new(*a, *b));
        }
    }
    pairs.push(Pair::new(SiteKind::SameLan, SiteKind::SameLan));
    pairs.push(Pair { transports: Transports::Tcp, ..Pair::new(SiteKind::Eim, SiteKind::Eim) });
    pairs.push(Pair { transports: Transports::Tcp, ..Pair::new(SiteKind::UdpBlocked, SiteKind::Eim) });
    pairs.push(Pair { repunch: true, ..Pair::new(SiteKind::Eim, SiteKind::Eim) });
    pairs
}

/// What one cell measured.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub a: SiteKind,
    pub b: SiteKind,
    pub transports: Transports,
    /// A reached B by PeerId (a byte went through the forward and back).
    pub reached: bool,
    /// A direct connection between A and B appeared within the wait.
    pub direct: bool,
    pub direct_transport: Option<String>,
    /// From the first relayed contact to the direct connection (warren's own figure for a
    /// punched connection), else from the forward's first connection.
    pub direct_after_ms: Option<f64>,
    /// `hole punch` when warren reported a punched connection, `birthday` for a birthday punch.
    pub direct_by: Option<String>,
    /// For a birthday punch: the probes the easy side sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub birthday_probes: Option<u32>,
    /// For a relayed cell: why A and B say they are relayed (`warren peers`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relayed_because: Option<String>,
    /// 10 MB through the forward came back intact.
    pub transfer_ok: bool,
    /// The path the forward reported for that transfer.
    pub transfer_path: Option<String>,
    pub transfer_mib_s: Option<f64>,
    /// A new connection through the forward, on the path of the transfer: connect, one byte
    /// there and back (median of five), milliseconds.
    pub first_byte_ms: Option<f64>,
    pub seconds: f64,
    pub error: Option<String>,
    /// For a re-punch cell: what happened when the direct path was cut, then restored.
    pub repunch: Option<Repunch>,
    /// The disturbance asked for, and what it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub a_rebind: Option<Rebind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rebind: Option<Rebinding>,
    /// What the same forward did after the whole lab was restarted with its data dirs.
    pub after_restart: Option<AfterRestart>,
    /// The cell's node dirs (`a/`, `b/`, each with its `warren.log`); removed after the run
    /// when everything in the cell went as it should, unless logs are kept.
    #[serde(skip)]
    pub dir: PathBuf,
}

/// A cell after the whole-lab restart.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AfterRestart {
    /// A's forward (restored from A's store) reached B again.
    pub reached: bool,
    /// Seconds from the cell's nodes starting again until it did.
    pub reached_after_s: Option<f64>,
    pub direct: bool,
    pub direct_transport: Option<String>,
    /// 10 MB through the forward came back intact.
    pub transfer_ok: bool,
    pub transfer_path: Option<String>,
    pub error: Option<String>,
}

impl Cell {
    /// Everything the cell checked went as it should: the forward, the disturbance (cut or
    /// rebinding) and the restart. A cell that is not keeps its nodes' logs.
    pub fn all_ok(&self) -> bool {
        let repunch_ok = self.repunch.as_ref().is_none_or(|r| r.direct_lost_after_s.is_some() && r.fallback_ok && r.direct_again_after_s.is_some());
        let rebind_ok = self.rebind.as_ref().is_none_or(|r| r.transfer_ok);
        let restart_ok = self.after_restart.as_ref().is_none_or(|r| r.reached && r.transfer_ok);
        self.error.is_none() && self.reached && self.transfer_ok && repunch_ok && rebind_ok && restart_ok
    }

    /// The lines of A's and B's logs that tell how the pair punched, lost and regained its
    /// direct path (the last `max` of each), for a report of a cell that went wrong.
    pub fn punch_story(&self, max: usize) -> String {
        let mut story = String::new();
        for side in ["a", "b"] {
            let path = self.dir.join(side).join("warren.log");
            let Ok(log) = std::fs::read_to_string(&path) else {
                story.push_str(&format!("{}: not readable\n", path.display()));
                continue;
            };
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| ["punch", "direct", "relayed", "disconnected", "re-dialed", "birthday"].iter().any(|w| l.contains(w)))
                .collect();
            story.push_str(&format!("--- {} ({} of {} lines)\n", path.display(), lines.len().min(max), lines.len()));
            for line in &lines[lines.len().saturating_sub(max)..] {
                story.push_str(line);
                story.push('\n');
            }
        }
        story
    }

    /// After the restart the cell ended as before: reached, direct or relayed, transfer intact.
    pub fn restart_same(&self) -> bool {
        self.after_restart
            .as_ref()
            .is_some_and(|r| r.reached == self.reached && r.direct == self.direct && r.transfer_ok == self.transfer_ok)
    }
}

/// A cell's nodes, kept (stopped, data dirs intact) for the restart phase.
struct Kept {
    index: usize,
    a: Node,
    b: Node,
    a_ns: String,
    bind: SocketAddr,
    /// B's echo service: the target A's forward leads to, still there after the restart.
    _echo: Echo,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Repunch {
    /// Seconds from the cut until A no longer had a direct connection.
    pub direct_lost_after_s: Option<f64>,
    /// A 1 MB transfer through the forward while only the relay was left came back intact.
    pub fallback_ok: bool,
    pub fallback_path: Option<String>,
    /// Seconds from restoring the path until a direct connection was back.
    pub direct_again_after_s: Option<f64>,
}

pub struct Options {
    pub warren: PathBuf,
    pub latency: Duration,
    pub pairs: Vec<Pair>,
    /// Where node data dirs and logs go.
    pub work_dir: PathBuf,
    pub keep_logs: bool,
    /// After the matrix, restart the whole lab with its data dirs and check every cell again.
    pub restart: bool,
    /// Megabytes a rebinding cell sends ([`REBIND_MB`] by default): enough to outlast the
    /// stall and a new punch, so that the move back to a direct connection is seen too.
    pub rebind_mb: usize,
}

/// The lab's fixed part: the wire, the bootstrap node and the relay.
pub(crate) struct Core {
    pub(crate) bootstrap: Node,
    pub(crate) boot_host: Host,
    relay: Node,
    relay_host: Host,
}

impl Core {
    pub(crate) fn addrs(host: &Host, node: &Node, transports: Transports) -> Vec<String> {
        let tcp = format!("/ip4/{}/tcp/{CORE_PORT}/p2p/{}", host.addr, node.peer_id);
        let quic = format!("/ip4/{}/udp/{CORE_PORT}/quic-v1/p2p/{}", host.addr, node.peer_id);
        match transports {
            Transports::Both => vec![quic, tcp],
            Transports::Tcp => vec![tcp],
        }
    }
}

fn listen_args(host: &Host, port: u16, transports: Transports) -> Vec<String> {
    let mut args = vec!["--listen".into(), format!("/ip4/{}/tcp/{port}", host.addr)];
    if transports == Transports::Both {
        args.extend(["--listen".into(), format!("/ip4/{}/udp/{port}/quic-v1", host.addr)]);
    }
    args
}

pub(crate) fn start_core(lab: &mut Lab, opts: &Options) -> Result<Core, String> {
    let boot_host = lab.public_host("boot")?;
    let relay_host = lab.public_host("relay")?;
    let mut args = listen_args(&boot_host, CORE_PORT, Transports::Both);
    args.extend(["--dht-mode", "server", "--no-mdns", "--public-ranges", PUBLIC_RANGE].map(String::from));
    let bootstrap = Node::start(&opts.warren, &boot_host.ns, &opts.work_dir.join("bootstrap"), &args)?;
    let mut args = listen_args(&relay_host, CORE_PORT, Transports::Both);
    // A plain `--relay`: the relay advertises itself only once AutoNAT (the bootstrap node dialing
    // back) confirms its public address, as on the internet.
    args.extend(["--relay", "--dht-mode", "server", "--no-mdns", "--public-ranges", PUBLIC_RANGE].map(String::from));
    for addr in Core::addrs(&boot_host, &bootstrap, Transports::Both) {
        args.extend(["--bootstrap".into(), addr]);
    }
    let relay = Node::start(&opts.warren, &relay_host.ns, &opts.work_dir.join("relay"), &args)?;
    let started = Instant::now();
    wait_for(RELAY_CONFIRM_TIMEOUT, || relay.json(&["status"]).filter(|s| s["relay"]["advertised"] == true))
        .ok_or("the relay was never confirmed publicly reachable by AutoNAT, so it never offered relaying")?;
    eprintln!("natlab: relay confirmed public and advertising after {:.1} s", started.elapsed().as_secs_f64());
    Ok(Core { bootstrap, boot_host, relay, relay_host })
}

/// Two sites of every kind a run needs (so A and B never share a NAT, except `same-lan`).
fn build_sites(lab: &mut Lab, pairs: &[Pair]) -> Result<Vec<(SiteKind, Vec<Site>)>, String> {
    let mut sites: Vec<(SiteKind, Vec<Site>)> = Vec::new();
    for pair in pairs {
        for kind in [pair.a, pair.b] {
            if sites.iter().any(|(k, _)| *k == kind) {
                continue;
            }
            let count = if kind == SiteKind::SameLan { 1 } else { 2 };
            let built = (0..count).map(|_| lab.site(kind)).collect::<Result<Vec<_>, _>>()?;
            sites.push((kind, built));
        }
    }
    Ok(sites)
}

/// Runs the pairs; the lab is built first and removed at the end, also on errors.
pub fn run(opts: &Options, mut progress: impl FnMut(&Cell)) -> Result<Vec<Cell>, String> {
    topo::cleanup_stale(false);
    std::fs::create_dir_all(&opts.work_dir).map_err(|e| format!("{}: {e}", opts.work_dir.display()))?;
    let mut lab = Lab::new(opts.latency)?;
    let sites = build_sites(&mut lab, &opts.pairs)?;
    let mut core = start_core(&mut lab, opts)?;
    let mut cells = Vec::new();
    let mut kept = Vec::new();
    for (i, pair) in opts.pairs.iter().enumerate() {
        let of = |kind| &sites.iter().find(|(k, _)| *k == kind).expect("built above").1;
        let (a_site, b_site) = if pair.a == SiteKind::SameLan && pair.b == SiteKind::SameLan {
            (&of(SiteKind::SameLan)[0], &of(SiteKind::SameLan)[0])
        } else {
            (&of(pair.a)[0], &of(pair.b)[1 % of(pair.b).len()])
        };
        let a_host = a_site.hosts[0].clone();
        let b_host = b_site.hosts.last().expect("a site has a host").clone();
        // Fresh ports per cell: no conntrack entry of an earlier cell can help or hurt.
        let port = 5000 + 2 * i as u16;
        let dir = opts.work_dir.join(format!("cell{i:02}-{}-{}", pair.a.name(), pair.b.name()));
        let started = Instant::now();
        let mut cell = Cell {
            a: pair.a,
            b: pair.b,
            transports: pair.transports,
            reached: false,
            direct: false,
            direct_transport: None,
            direct_after_ms: None,
            direct_by: None,
            birthday_probes: None,
            relayed_because: None,
            transfer_ok: false,
            transfer_path: None,
            transfer_mib_s: None,
            first_byte_ms: None,
            seconds: 0.0,
            error: None,
            repunch: None,
            a_rebind: pair.rebind,
            rebind: None,
            after_restart: None,
            dir: dir.clone(),
        };
        let cut = pair.repunch.then(|| a_site.edge.clone().map(|edge| (edge, b_site.wan))).flatten();
        let rebind = pair.rebind.and_then(|r| a_site.edge.clone().map(|edge| (r, edge)));
        match run_cell(&core, &a_host, &b_host, port, pair.transports, cut, rebind, &dir, opts, &mut cell) {
            Ok(mut nodes) => {
                // Stopped until the restart phase, so that later cells run as before.
                nodes.a.terminate();
                nodes.b.terminate();
                nodes.index = i;
                kept.push(nodes);
            }
            Err(e) => cell.error = Some(e),
        }
        cell.seconds = started.elapsed().as_secs_f64();
        progress(&cell);
        cells.push(cell);
    }
    if opts.restart && !kept.is_empty() {
        restart_all(&mut core, &mut kept, &mut cells)?;
        for cell in &cells {
            if cell.after_restart.is_some() {
                progress(cell);
            }
        }
    }
    drop(kept);
    drop(core);
    lab.teardown();
    let left = lab.leftovers();
    if !left.is_empty() {
        return Err(format!("the lab's namespaces were not all removed: {left:?}"));
    }
    for cell in &cells {
        if !opts.keep_logs && cell.all_ok() {
            let _ = std::fs::remove_dir_all(&cell.dir);
        }
    }
    Ok(cells)
}

/// The lab restarted with its data dirs: the core first, then each cell's nodes in turn, whose
/// forward is tried until it works again.
fn restart_all(core: &mut Core, kept: &mut [Kept], cells: &mut [Cell]) -> Result<(), String> {
    core.bootstrap.terminate();
    core.relay.terminate();
    core.bootstrap.restart()?;
    core.relay.restart()?;
    eprintln!("natlab: bootstrap node and relay restarted with their data dirs");
    for nodes in kept.iter_mut() {
        nodes.b.restart()?;
        nodes.a.restart()?;
        let started = Instant::now();
        let mut after = AfterRestart::default();
        let reached = wait_for(RESTART_REACH_TIMEOUT, || transfer(&nodes.a_ns, nodes.bind, 1024, RESTART_PROBE_TIMEOUT).ok());
        if reached.is_some() {
            after.reached = true;
            after.reached_after_s = Some(started.elapsed().as_secs_f64());
            if let Some(conn) = wait_for(DIRECT_WAIT, || direct_connection(&nodes.a, &nodes.b.peer_id)) {
                after.direct = true;
                after.direct_transport = conn["transport"].as_str().map(String::from);
            }
            match transfer(&nodes.a_ns, nodes.bind, TRANSFER_BYTES, TRANSFER_TIMEOUT) {
                Ok(_) => after.transfer_ok = true,
                Err(e) => after.error = Some(format!("10 MB transfer: {e}")),
            }
            after.transfer_path = forward_info(&nodes.a, nodes.bind).and_then(|f| f["path"].as_str().map(String::from));
            if !after.direct && direct_connection(&nodes.a, &nodes.b.peer_id).is_some() {
                after.direct = true;
            }
        } else {
            let last = forward_info(&nodes.a, nodes.bind).and_then(|f| f["last_error"].as_str().map(String::from));
            after.error = Some(format!("A's forward never reached B again; forward says {last:?}"));
        }
        cells[nodes.index].after_restart = Some(after);
        nodes.a.terminate();
        nodes.b.terminate();
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_cell(
    core: &Core,
    a_host: &Host,
    b_host: &Host,
    port: u16,
    transports: Transports,
    cut: Option<(String, std::net::Ipv4Addr)>,
    rebind: Option<(Rebind, String)>,
    dir: &Path,
    opts: &Options,
    cell: &mut Cell,
) -> Result<Kept, String> {
    let node_args = |host: &Host, port: u16| {
        let mut args = listen_args(host, port, transports);
        args.extend(["--public-ranges", PUBLIC_RANGE].map(String::from));
        for addr in Core::addrs(&core.boot_host, &core.bootstrap, transports) {
            args.extend(["--bootstrap".into(), addr]);
        }
        args
    };
    let b = Node::start(&opts.warren, &b_host.ns, &dir.join("b"), &node_args(b_host, port + 1))?;
    let a = Node::start(&opts.warren, &a_host.ns, &dir.join("a"), &node_args(a_host, port))?;
    let _ = &core.relay_host;
    let _ = &core.relay;

    // A knows B's PeerId only: the DHT must give an address (B's own, or relayed).
    wait_for(FIND_TIMEOUT, || {
        a.json(&["find", &b.peer_id]).filter(|f| f["found"] == true && f["addrs"].as_array().is_some_and(|x| !x.is_empty()))
    })
    .ok_or("A never found B in the DHT")?;

    let echo = Echo::start(&b_host.ns)?;
    b.cli(&["expose", "echo", &format!("127.0.0.1:{}", echo.port), "--allow", &a.peer_id])?;
    let forward = a.cli(&["forward", "127.0.0.1:0", &format!("{}/echo", b.peer_id)])?;
    let bind: SocketAddr = forward["bind"].as_str().and_then(|s| s.parse().ok()).ok_or("forward gave no bind address")?;

    let first = Instant::now();
    transfer(&a_host.ns, bind, 1024, TRANSFER_TIMEOUT).map_err(|e| {
        let last = forward_info(&a, bind).and_then(|f| f["last_error"].as_str().map(String::from));
        format!("A could not reach B: {e}; forward says {last:?}")
    })?;
    cell.reached = true;

    if let Some(conn) = wait_for(DIRECT_WAIT, || direct_connection(&a, &b.peer_id)) {
        record_direct(cell, &conn, &a, &b, first);
    } else {
        // What each side says about why it is still relayed.
        let why = |node: &Node, peer: &str| -> Option<String> {
            let peers = node.json(&["peers"])?;
            peers.as_array()?.iter().find(|p| p["peer_id"] == peer)?["relayed_because"].as_str().map(String::from)
        };
        cell.relayed_because = [why(&a, &b.peer_id).map(|w| format!("A: {w}")), why(&b, &a.peer_id).map(|w| format!("B: {w}"))]
            .into_iter()
            .flatten()
            .reduce(|x, y| format!("{x}; {y}"));
    }

    match transfer(&a_host.ns, bind, TRANSFER_BYTES, TRANSFER_TIMEOUT) {
        Ok(took) => {
            cell.transfer_ok = true;
            cell.transfer_mib_s = Some(TRANSFER_BYTES as f64 / 1048576.0 / took.as_secs_f64());
        }
        Err(e) => cell.error = Some(format!("10 MB transfer: {e}")),
    }
    cell.transfer_path = forward_info(&a, bind).and_then(|f| f["path"].as_str().map(String::from));
    let mut firsts: Vec<f64> = (0..FIRST_BYTE_SAMPLES)
        .filter_map(|_| first_byte(&a_host.ns, bind, TRANSFER_TIMEOUT).ok())
        .map(|took| took.as_secs_f64() * 1e3)
        .collect();
    firsts.sort_by(f64::total_cmp);
    cell.first_byte_ms = (firsts.len() == FIRST_BYTE_SAMPLES).then(|| firsts[FIRST_BYTE_SAMPLES / 2]);
    // A direct connection may still appear after the wait (a later punch attempt): record it as
    // direct, with the time it was seen as an upper bound.
    if !cell.direct
        && let Some(conn) = direct_connection(&a, &b.peer_id)
    {
        record_direct(cell, &conn, &a, &b, first);
    }
    if let Some((edge, b_wan)) = cut
        && cell.direct
    {
        cell.repunch = Some(repunch(&a, &b, &a_host.ns, bind, &edge, b_wan));
    }
    if let Some((how, edge)) = rebind
        && cell.direct
    {
        cell.rebind = Some(rebinding(&a, &b, &a_host.ns, bind, how, &edge, opts.rebind_mb));
    }
    Ok(Kept { index: 0, a, b, a_ns: a_host.ns.clone(), bind, _echo: echo })
}

/// Cuts the direct path at A's router, checks the forward falls back to the relay, restores the
/// path and waits for a direct connection again.
fn repunch(a: &Node, b: &Node, a_ns: &str, bind: SocketAddr, edge: &str, b_wan: std::net::Ipv4Addr) -> Repunch {
    let mut result = Repunch::default();
    if topo::cut(edge, b_wan, true).is_err() {
        return result;
    }
    let cut_at = Instant::now();
    // QUIC notices a silent path after its 10 s idle timeout, TCP after ping's failures.
    if wait_for(Duration::from_secs(40), || direct_connection(a, &b.peer_id).is_none().then_some(())).is_some() {
        result.direct_lost_after_s = Some(cut_at.elapsed().as_secs_f64());
        result.fallback_ok = transfer(a_ns, bind, 1024 * 1024, TRANSFER_TIMEOUT).is_ok();
        result.fallback_path = forward_info(a, bind).and_then(|f| f["path"].as_str().map(String::from));
    }
    let _ = topo::cut(edge, b_wan, false);
    let restored = Instant::now();
    if wait_for(Duration::from_secs(40), || direct_connection(a, &b.peer_id)).is_some() {
        result.direct_again_after_s = Some(restored.elapsed().as_secs_f64());
    }
    result
}

/// Changes A's router (`how`) 2 s into an `mb` MB transfer over the direct path: the transfer
/// must come back intact; the longest stall and the path afterwards are recorded.
fn rebinding(a: &Node, b: &Node, a_ns: &str, bind: SocketAddr, how: Rebind, edge: &str, mb: usize) -> Rebinding {
    let mut result = Rebinding { mb, ..Rebinding::default() };
    let ns = a_ns.to_string();
    // Through the relay (10 MiB/s by default) a megabyte takes 0.1 s: time for that, and more.
    let limit = TRANSFER_TIMEOUT * 2 + Duration::from_millis(200 * mb as u64);
    let transfer = std::thread::spawn(move || nodes::transfer_watched(&ns, bind, mb * 1024 * 1024, limit));
    // The disturbance is scheduled into the transfer, not a condition to wait for.
    std::thread::sleep(REBIND_AFTER);
    if let Err(e) = topo::rebind(edge, how == Rebind::Ports) {
        result.error = Some(e);
    }
    match transfer.join() {
        Ok(Ok(watched)) => {
            result.transfer_ok = result.error.is_none();
            result.stall_s = Some(watched.longest_stall.as_secs_f64());
            result.took_s = Some(watched.took.as_secs_f64());
        }
        Ok(Err(e)) => result.error = Some(e),
        Err(_) => result.error = Some("the transfer thread panicked".into()),
    }
    result.path_after = forward_info(a, bind).and_then(|f| f["path"].as_str().map(String::from));
    result.direct_after = direct_connection(a, &b.peer_id).is_some();
    if !result.direct_after {
        let since = Instant::now();
        if wait_for(DIRECT_WAIT, || direct_connection(a, &b.peer_id)).is_some() {
            result.direct_again_after_s = Some(since.elapsed().as_secs_f64());
        }
    }
    if how == Rebind::Ports
        && let Err(e) = topo::unrebind(edge)
    {
        result.error.get_or_insert(e);
    }
    result
}

/// Records A's direct connection `conn` to B: its transport, and warren's own punch time (from
/// either side), else the time since the forward's first connection.
fn record_direct(cell: &mut Cell, conn: &Value, a: &Node, b: &Node, first: Instant) {
    cell.direct = true;
    cell.direct_transport = conn["transport"].as_str().map(String::from);
    let other = direct_connection(b, &a.peer_id);
    let punched = conn["punched_after_ms"].as_f64().or_else(|| other.as_ref().and_then(|c| c["punched_after_ms"].as_f64()));
    let birthday = [Some(conn), other.as_ref()].into_iter().flatten().find_map(|c| c["birthday"].as_object().cloned());
    cell.direct_by = match (&birthday, punched) {
        (Some(_), _) => Some("birthday".to_string()),
        (None, Some(_)) => Some("hole punch".to_string()),
        (None, None) => None,
    };
    // The easy side counted the probes (the hard side only its sockets).
    cell.birthday_probes = [Some(conn), other.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|c| c["birthday"]["probes"].as_u64())
        .max()
        .map(|p| p as u32);
    cell.direct_after_ms = punched.or(Some(first.elapsed().as_secs_f64() * 1000.0));
}

fn forward_info(a: &Node, bind: SocketAddr) -> Option<Value> {
    a.json(&["forwards"])?.as_array()?.iter().find(|f| f["bind"] == bind.to_string()).cloned()
}

fn direct_connection(node: &Node, peer: &str) -> Option<Value> {
    let peers = node.json(&["peers"])?;
    peers
        .as_array()?
        .iter()
        .filter(|p| p["peer_id"] == peer)
        .flat_map(|p| p["connections"].as_array().cloned().unwrap_or_default())
        .find(|c| c["path"] == "direct")
}

/// The cell as a short phrase: `direct (quic, 0.4 s)`, `relayed`, `FAILED: …`.
pub fn describe(cell: &Cell) -> String {
    if !cell.reached {
        return format!("FAILED: {}", cell.error.as_deref().unwrap_or("unreachable"));
    }
    let path = if cell.direct {
        let how = match (cell.direct_by.as_deref(), cell.birthday_probes) {
            (Some("birthday"), Some(probes)) => format!("birthday-punched ({probes} probes)"),
            (Some("birthday"), None) => "birthday-punched".to_string(),
            (Some(_), _) => "punched".to_string(),
            (None, _) => "direct dial".to_string(),
        };
        format!(
            "direct, {} {how} in {:.2} s",
            cell.direct_transport.as_deref().unwrap_or("?"),
            cell.direct_after_ms.unwrap_or(0.0) / 1000.0
        )
    } else {
        match &cell.relayed_because {
            Some(why) => format!("relayed ({why})"),
            None => "relayed".to_string(),
        }
    };
    let transfer = if cell.transfer_ok {
        let first = cell.first_byte_ms.map(|ms| format!(", new connection's first byte back in {ms:.0} ms")).unwrap_or_default();
        format!("10 MB ok via {} ({:.1} MiB/s){first}", cell.transfer_path.as_deref().unwrap_or("?"), cell.transfer_mib_s.unwrap_or(0.0))
    } else {
        format!("10 MB FAILED: {}", cell.error.as_deref().unwrap_or("?"))
    };
    let repunch = match &cell.repunch {
        Some(r) => format!(
            "; path cut: direct lost after {}, 1 MB via {} {}, direct again {} after restoring",
            r.direct_lost_after_s.map(|s| format!("{s:.1} s")).unwrap_or_else(|| "never".into()),
            r.fallback_path.as_deref().unwrap_or("?"),
            if r.fallback_ok { "ok" } else { "FAILED" },
            r.direct_again_after_s.map(|s| format!("{s:.1} s")).unwrap_or_else(|| "never".into()),
        ),
        None => String::new(),
    };
    let rebind = match &cell.rebind {
        Some(r) => format!(
            "; router rebound 2 s into {} MB: {}, longest stall {}, forward on {} path at the end, then {}{}",
            r.mb,
            if r.transfer_ok { "intact".to_string() } else { format!("FAILED ({})", r.error.as_deref().unwrap_or("?")) },
            r.stall_s.map(|s| format!("{s:.2} s")).unwrap_or_else(|| "-".into()),
            r.path_after.as_deref().unwrap_or("no"),
            if r.direct_after { "still direct" } else { "no direct connection" },
            r.direct_again_after_s.map(|s| format!(", direct again after {s:.1} s")).unwrap_or_default(),
        ),
        None => String::new(),
    };
    let restart = match &cell.after_restart {
        Some(r) => format!("; after a restart: {}", describe_restart(r)),
        None => String::new(),
    };
    format!("{path}; {transfer}{repunch}{rebind}{restart}")
}

/// A cell after the restart as a short phrase: `reached in 4.1 s, direct (quic), 10 MB ok`.
pub fn describe_restart(r: &AfterRestart) -> String {
    if !r.reached {
        return format!("FAILED: {}", r.error.as_deref().unwrap_or("unreachable"));
    }
    let path = if r.direct { format!("direct ({})", r.direct_transport.as_deref().unwrap_or("?")) } else { "relayed".into() };
    let transfer = if r.transfer_ok {
        format!("10 MB ok via {}", r.transfer_path.as_deref().unwrap_or("?"))
    } else {
        format!("10 MB FAILED: {}", r.error.as_deref().unwrap_or("?"))
    };
    format!("reached in {:.1} s, {path}, {transfer}", r.reached_after_s.unwrap_or(0.0))
}

fn label(cell: &Cell) -> String {
    let tcp = if cell.transports == Transports::Tcp { " (TCP only)" } else { "" };
    let repunch = if cell.repunch.is_some() { " (path cut, then restored)" } else { "" };
    let rebind = match (&cell.rebind, cell.a_rebind) {
        (_, Some(Rebind::Flush)) => " (A's router flushed mid-transfer)",
        (_, Some(Rebind::Ports)) => " (A's router moved its ports mid-transfer)",
        _ => "",
    };
    format!("{} → {}{tcp}{repunch}{rebind}", cell.a.name(), cell.b.name())
}

/// A Markdown table, one row per cell.
pub fn markdown(cells: &[Cell], latency: Duration) -> String {
    let mut out = "| A → B | reached | direct | transport | time to direct | 10 MB through the forward | new connection, first byte back | after a restart |\n|---|---|---|---|---|---|---|---|\n".to_string();
    for c in cells {
        let restart = match &c.after_restart {
            Some(r) if c.restart_same() => format!("same: {}", describe_restart(r)),
            Some(r) => format!("**different**: {}", describe_restart(r)),
            None => "-".into(),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {restart} |\n",
            label(c),
            if c.reached { "yes" } else { "**no**" },
            match (c.direct, c.direct_by.as_deref()) {
                (true, Some("birthday")) => "yes (birthday)",
                (true, Some(_)) => "yes (punched)",
                (true, None) => "yes",
                (false, _) => "no (relayed)",
            },
            c.direct_transport.as_deref().unwrap_or("-"),
            c.direct_after_ms.map(|ms| format!("{:.2} s", ms / 1000.0)).unwrap_or_else(|| "-".into()),
            if c.transfer_ok {
                format!("intact via {}, {:.1} MiB/s", c.transfer_path.as_deref().unwrap_or("?"), c.transfer_mib_s.unwrap_or(0.0))
            } else {
                format!("**failed**: {}", c.error.as_deref().unwrap_or("?"))
            },
            c.first_byte_ms.map(|ms| format!("{ms:.0} ms")).unwrap_or_else(|| "-".into()),
        ));
    }
    for c in cells {
        if let Some(r) = &c.repunch {
            out.push_str(&format!("\n{}: {}\n", label(c), describe(c)));
            let _ = r;
        }
    }
    let times: Vec<f64> = cells.iter().filter(|c| c.direct_by.is_some()).filter_map(|c| c.direct_after_ms).collect();
    if !times.is_empty() {
        let mut sorted = times.clone();
        sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
        out.push_str(&format!(
            "\nPunched connections: {}, median time from first relayed contact to direct {:.2} s. One-way latency on the wire: {} ms.\n",
            sorted.len(),
            sorted[sorted.len() / 2] / 1000.0,
            latency.as_millis()
        ));
    }
    let restarted: Vec<&Cell> = cells.iter().filter(|c| c.after_restart.is_some()).collect();
    if !restarted.is_empty() {
        let same = restarted.iter().filter(|c| c.restart_same()).count();
        let slowest = restarted.iter().filter_map(|c| c.after_restart.as_ref()?.reached_after_s).fold(0.0, f64::max);
        out.push_str(&format!(
            "\nRestart with the data dirs (bootstrap node and relay, then each cell's nodes in turn): {same} of {} cells as before; the slowest forward reached its peer again {slowest:.1} s after its nodes came back.\n",
            restarted.len()
        ));
    }
    out
}

/// The value at quantile `q` (0 to 1) of `values`, nearest rank.
fn quantile(values: &[f64], q: f64) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied()
}

/// For repeated runs (`natlab --repeat`): per pair, how often it went direct (and within
/// `within` of first contact), the time to direct and the birthday probes used (median, p90).
pub fn repeat_summary(cells: &[Cell], within: Duration) -> String {
    let mut out = "| A → B | runs | forward ok | direct | direct within {W} s | time to direct p50 / p90 | birthday probes p50 / p90 |\n|---|---|---|---|---|---|---|\n"
        .replace("{W}", &within.as_secs().to_string());
    let mut labels: Vec<String> = Vec::new();
    for c in cells {
        if !labels.contains(&label(c)) {
            labels.push(label(c));
        }
    }
    let pair = |v: Option<f64>, w: Option<f64>, f: &dyn Fn(f64) -> String| match (v, w) {
        (Some(a), Some(b)) => format!("{} / {}", f(a), f(b)),
        _ => "-".to_string(),
    };
    for name in labels {
        let runs: Vec<&Cell> = cells.iter().filter(|c| label(c) == name).collect();
        let ok = runs.iter().filter(|c| c.reached && c.transfer_ok).count();
        let direct: Vec<&&Cell> = runs.iter().filter(|c| c.direct).collect();
        let times: Vec<f64> = direct.iter().filter_map(|c| c.direct_after_ms).collect();
        let in_time = times.iter().filter(|ms| **ms <= within.as_millis() as f64).count();
        let probes: Vec<f64> = direct.iter().filter_map(|c| c.birthday_probes.map(f64::from)).collect();
        out.push_str(&format!(
            "| {name} | {} | {ok} | {} | {in_time} | {} | {} |\n",
            runs.len(),
            direct.len(),
            pair(quantile(&times, 0.5), quantile(&times, 0.9), &|ms| format!("{:.1} s", ms / 1000.0)),
            pair(quantile(&probes, 0.5), quantile(&probes, 0.9), &|p| format!("{p:.0}")),
        ));
    }
    out
}

/// A heat-map of the cells: green direct, amber relayed (forward working), red failed.
pub fn svg(cells: &[Cell]) -> String {
    let row_h = 34;
    let width = 760;
    let height = 60 + row_h * cells.len();
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"13\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"24\" font-size=\"16\" font-weight=\"bold\">warren connectivity matrix (natlab)</text>\n\
         <text x=\"10\" y=\"44\" fill=\"#555\">green: direct · amber: relayed, forward works · red: failed</text>\n"
    );
    for (i, c) in cells.iter().enumerate() {
        let y = 56 + row_h * i;
        let color = if !c.reached || !c.transfer_ok {
            "#e57373"
        } else if c.direct {
            "#81c784"
        } else {
            "#ffd54f"
        };
        out.push_str(&format!(
            "<rect x=\"10\" y=\"{y}\" width=\"{}\" height=\"{}\" fill=\"{color}\" rx=\"4\"/>\n",
            width - 20,
            row_h - 4
        ));
        let text = format!("{}: {}", label(c), describe(c));
        out.push_str(&format!("<text x=\"18\" y=\"{}\">{}</text>\n", y + 20, xml_escape(&text)));
    }
    out.push_str("</svg>\n");
    out
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
