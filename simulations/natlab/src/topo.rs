//! Building the lab: network namespaces for hosts and routers, veth pairs and bridges on the LAN
//! side, TUN devices on the wire, and the kernel's own NAT (nftables masquerade + conntrack).
//!
//! Addresses are documentation and private ranges only: the wire is 203.0.113.0/24 (which warren
//! is told to treat as public with `--public-ranges`), carrier NATs use 100.64.0.0/10, LANs
//! 10.0.0.0/8. Nothing is routed outside the lab's namespaces.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

use crate::sys;
use crate::upnp::{Miniupnpd, StunServer};
use crate::wire::Wire;

/// The wire's address range, announced to warren as public.
pub const PUBLIC_RANGE: &str = "203.0.113.0/24";
/// Every namespace of the lab starts with this; `natlab --cleanup` removes leftovers.
pub const PREFIX: &str = "wrnlab";

/// The kinds of network a node can sit in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SiteKind {
    /// A host on the wire itself: publicly reachable.
    Public,
    /// A home router: Linux masquerade (port-preserving, endpoint-independent mapping,
    /// address-and-port-dependent filtering); unsolicited inbound dropped.
    Eim,
    /// `masquerade fully-random`: a new random port for every destination (endpoint-dependent
    /// mapping), the NAT hole punching cannot predict.
    Symmetric,
    /// A carrier NAT (EIM) in front of a home router (EIM): two translations.
    DoubleNat,
    /// An EIM router that also drops all UDP: only TCP gets out.
    UdpBlocked,
    /// Two hosts behind one EIM router. Linux does not hairpin, so the LAN path must be found.
    SameLan,
    /// An EIM router running miniupnpd (UPnP-IGD and NAT-PMP, secure mode): a host may map
    /// ports to itself. Until warren asks for mappings it behaves as `eim`.
    Upnp,
    /// The `upnp` router answering NAT-PMP only (no IGD, PCP requests dropped).
    NatPmp,
    /// The `upnp` router answering PCP only (no IGD, NAT-PMP requests dropped), granting leases
    /// of [`crate::upnp::SHORT_LEASE`] so renewals can be watched.
    Pcp,
    /// A router that grants mappings (miniupnpd, every protocol) but forwards nothing through
    /// them: a node must not believe it is public.
    MapsButDrops,
}

impl SiteKind {
    pub fn all() -> &'static [SiteKind] {
        &[SiteKind::Public, SiteKind::Eim, SiteKind::Symmetric, SiteKind::DoubleNat, SiteKind::UdpBlocked, SiteKind::Upnp]
    }

    pub fn name(self) -> &'static str {
        match self {
            SiteKind::Public => "public",
            SiteKind::Eim => "eim",
            SiteKind::Symmetric => "symmetric",
            SiteKind::DoubleNat => "double-nat",
            SiteKind::UdpBlocked => "udp-blocked",
            SiteKind::SameLan => "same-lan",
            SiteKind::Upnp => "upnp",
            SiteKind::NatPmp => "nat-pmp",
            SiteKind::Pcp => "pcp",
            SiteKind::MapsButDrops => "maps-but-drops",
        }
    }

    /// Whether the router runs miniupnpd.
    pub fn maps_ports(self) -> bool {
        matches!(self, SiteKind::Upnp | SiteKind::NatPmp | SiteKind::Pcp | SiteKind::MapsButDrops)
    }
}

/// Runs a command, failing with its stderr.
pub fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{}: {e}", args[0]))?;
    if !out.status.success() {
        return Err(format!("`{}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

fn ns_run(ns: &str, args: &[&str]) -> Result<(), String> {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend(args);
    run(&full)
}

/// Feeds an nftables ruleset to `nft -f -` inside a namespace.
fn nft(ns: &str, rules: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft: {e}"))?;
    child.stdin.take().unwrap().write_all(rules.as_bytes()).map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("nft in {ns} failed: {}\n{rules}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(())
}

/// Temporary interface names are unique per process (labs can be built side by side).
fn next_link_number() -> u32 {
    static LINKS: AtomicU32 = AtomicU32::new(0);
    LINKS.fetch_add(1, Ordering::Relaxed)
}

/// A place a node runs: its namespace and the address others see it at on the LAN.
#[derive(Debug, Clone)]
pub struct Host {
    pub ns: String,
    pub addr: Ipv4Addr,
}

/// One site: one host (two for `SameLan`) and the routers in front of them.
#[derive(Debug, Clone)]
pub struct Site {
    pub kind: SiteKind,
    pub hosts: Vec<Host>,
    /// The address the site has on the wire (the host's own for `Public`).
    pub wan: Ipv4Addr,
    /// The namespace of the router on the wire (none for `Public`).
    pub edge: Option<String>,
    /// The hosts' default gateway (their home router's LAN address; none for `Public`).
    pub gateway: Option<Ipv4Addr>,
}

/// All namespaces of one lab; removed when dropped.
pub struct Lab {
    pub id: String,
    namespaces: Vec<String>,
    wire: Wire,
    next_wan: u8,
    next_site: u8,
    /// The STUN server miniupnpd asks for its public address (started with the first UPnP site).
    stun: Option<(Host, StunServer)>,
    daemons: Vec<Miniupnpd>,
}

impl Lab {
    pub fn new(latency: std::time::Duration) -> Result<Lab, String> {
        // Labs of one process (tests running side by side) differ by a counter after the pid.
        static LABS: AtomicU32 = AtomicU32::new(0);
        let id = format!("{PREFIX}{}-{}", std::process::id(), LABS.fetch_add(1, Ordering::Relaxed));
        run(&["modprobe", "-q", "tun"]).ok();
        Ok(Lab {
            id,
            namespaces: Vec::new(),
            wire: Wire::new(latency),
            next_wan: 1,
            next_site: 1,
            stun: None,
            daemons: Vec::new(),
        })
    }

    pub fn namespaces(&self) -> Vec<String> {
        self.namespaces.clone()
    }

    fn netns(&mut self, role: &str) -> Result<String, String> {
        let ns = format!("{}-{role}", self.id);
        run(&["ip", "netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        ns_run(&ns, &["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Puts a TUN device on the wire into `ns` with the next public address; default route via it.
    fn wan(&mut self, ns: &str) -> Result<Ipv4Addr, String> {
        let addr = Ipv4Addr::new(203, 0, 113, self.next_wan);
        self.next_wan += 1;
        let name = format!("wt{}x{}", std::process::id() % 100_000, next_link_number());
        let tun = sys::open_tun(&name).map_err(|e| format!("cannot create TUN {name}: {e} (is /dev/net/tun there?)"))?;
        run(&["ip", "link", "set", &name, "netns", ns])?;
        ns_run(ns, &["ip", "link", "set", &name, "name", "wan0"])?;
        ns_run(ns, &["ip", "addr", "add", &format!("{addr}/24"), "dev", "wan0"])?;
        ns_run(ns, &["ip", "link", "set", "wan0", "up"])?;
        ns_run(ns, &["ip", "route", "add", "default", "dev", "wan0"])?;
        self.wire.attach(addr, tun);
        Ok(addr)
    }

    /// A veth pair between two namespaces, each end renamed and (when given) addressed.
    fn link(&mut self, a: &str, a_if: &str, a_addr: Option<&str>, b: &str, b_if: &str, b_addr: Option<&str>) -> Result<(), String> {
        let n = next_link_number();
        let tmp_a = format!("va{}x{n}", std::process::id() % 100_000);
        let tmp_b = format!("vb{}x{n}", std::process::id() % 100_000);
        run(&["ip", "link", "add", &tmp_a, "type", "veth", "peer", "name", &tmp_b])?;
        for (tmp, ns, name, addr) in [(&tmp_a, a, a_if, a_addr), (&tmp_b, b, b_if, b_addr)] {
            run(&["ip", "link", "set", tmp, "netns", ns])?;
            ns_run(ns, &["ip", "link", "set", tmp, "name", name])?;
            if let Some(addr) = addr {
                ns_run(ns, &["ip", "addr", "add", addr, "dev", name])?;
            }
            ns_run(ns, &["ip", "link", "set", name, "up"])?;
        }
        Ok(())
    }

    /// A host directly on the wire (bootstrap node, relay, public site).
    pub fn public_host(&mut self, role: &str) -> Result<Host, String> {
        let ns = self.netns(role)?;
        let addr = self.wan(&ns)?;
        Ok(Host { ns, addr })
    }

    /// A NAT router: forwarding on, masquerade out of `out_if`, unsolicited inbound dropped
    /// (except, with `mapped`, connections to ports the router itself mapped: DNAT-ed ones).
    fn router(&self, ns: &str, out_if: &str, fully_random: bool, block_udp: bool, mapped: bool) -> Result<(), String> {
        ns_run(ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        let random = if fully_random { " fully-random" } else { "" };
        let udp = if block_udp { "        meta l4proto udp drop\n" } else { "" };
        let mapped = if mapped { "        ct status dnat accept\n" } else { "" };
        nft(
            ns,
            &format!(
                "table ip natlab {{
    chain nat_out {{ type nat hook postrouting priority srcnat; oifname \"{out_if}\" masquerade{random}; }}
    chain fwd_filter {{
        type filter hook forward priority filter; policy drop;
{udp}        ct state established,related accept
{mapped}        iifname != \"{out_if}\" accept
    }}
    chain router_in {{
        type filter hook input priority filter; policy accept;
        ct state established,related accept
        iifname \"{out_if}\" drop
    }}
}}
"
            ),
        )
    }

    /// Builds one site of `kind`.
    pub fn site(&mut self, kind: SiteKind) -> Result<Site, String> {
        let n = self.next_site;
        self.next_site += 1;
        let tag = format!("s{n}");
        if kind == SiteKind::Public {
            let host = self.public_host(&format!("{tag}-host"))?;
            return Ok(Site { kind, wan: host.addr, hosts: vec![host], edge: None, gateway: None });
        }
        let router = self.netns(&format!("{tag}-router"))?;
        let wan = self.wan(&router)?;
        let home = if kind == SiteKind::DoubleNat {
            // Carrier NAT on the wire; the home router sits behind it on 100.64.n.0/24.
            self.router(&router, "wan0", false, false, false)?;
            let home = self.netns(&format!("{tag}-home"))?;
            self.link(&router, "cgn0", Some(&format!("100.64.{n}.1/24")), &home, "up0", Some(&format!("100.64.{n}.2/24")))?;
            ns_run(&home, &["ip", "route", "add", "default", "via", &format!("100.64.{n}.1")])?;
            self.router(&home, "up0", false, false, false)?;
            home
        } else {
            let forwards_mapped = kind.maps_ports() && kind != SiteKind::MapsButDrops;
            self.router(&router, "wan0", kind == SiteKind::Symmetric, kind == SiteKind::UdpBlocked, forwards_mapped)?;
            if kind.maps_ports() {
                nft(&router, &crate::upnp::miniupnpd_ruleset())?;
            }
            router.clone()
        };
        let count = if kind == SiteKind::SameLan { 2 } else { 1 };
        let mut hosts = Vec::new();
        if count == 1 {
            let host = self.netns(&format!("{tag}-host"))?;
            self.link(&home, "lan0", Some(&format!("10.{n}.0.1/24")), &host, "eth0", Some(&format!("10.{n}.0.2/24")))?;
            ns_run(&host, &["ip", "route", "add", "default", "via", &format!("10.{n}.0.1")])?;
            hosts.push(Host { ns: host, addr: Ipv4Addr::new(10, n, 0, 2) });
        } else {
            // A LAN bridge in the router with two hosts on it.
            ns_run(&home, &["ip", "link", "add", "lan0", "type", "bridge"])?;
            ns_run(&home, &["ip", "addr", "add", &format!("10.{n}.0.1/24"), "dev", "lan0"])?;
            ns_run(&home, &["ip", "link", "set", "lan0", "up"])?;
            for i in 0..count {
                let host = self.netns(&format!("{tag}-host{i}"))?;
                let addr = Ipv4Addr::new(10, n, 0, 2 + i as u8);
                self.link(&home, &format!("port{i}"), None, &host, "eth0", Some(&format!("{addr}/24")))?;
                ns_run(&home, &["ip", "link", "set", &format!("port{i}"), "master", "lan0"])?;
                ns_run(&host, &["ip", "route", "add", "default", "via", &format!("10.{n}.0.1")])?;
                hosts.push(Host { ns: host, addr });
            }
        }
        let gateway = Ipv4Addr::new(10, n, 0, 1);
        if kind.maps_ports() {
            let stun = self.stun_server()?;
            let files = std::env::temp_dir().join(format!("{}-{tag}-miniupnpd", self.id));
            let daemon = Miniupnpd::start(kind, &router, "lan0", &format!("10.{n}.0.0/24"), stun, &files, &hosts[0].ns, gateway)?;
            self.daemons.push(daemon);
            // One protocol only: the other's requests (RFC 6886 and RFC 6887 share the port
            // and tell each other apart by the version byte) are dropped at the router.
            let drop_version = match kind {
                SiteKind::NatPmp => Some(2),
                SiteKind::Pcp => Some(0),
                _ => None,
            };
            if let Some(version) = drop_version {
                nft(&router, &format!(
                    "table ip natlab_pmp {{\n chain input {{ type filter hook input priority -10; udp dport {} @th,64,8 {version} drop; }}\n}}\n",
                    crate::upnp::NATPMP_PORT
                ))?;
            }
        }
        Ok(Site { kind, hosts, wan, edge: Some(router), gateway: Some(gateway) })
    }

    /// The lab's STUN server (a public host of its own), started on first use; its address.
    fn stun_server(&mut self) -> Result<Ipv4Addr, String> {
        if self.stun.is_none() {
            let host = self.public_host("stun")?;
            let server = StunServer::start(&host.ns)?;
            self.stun = Some((host, server));
        }
        Ok(self.stun.as_ref().expect("set above").0.addr)
    }

    /// Namespaces of this lab that still exist (none after [`Lab::teardown`]).
    pub fn leftovers(&self) -> Vec<String> {
        let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return Vec::new() };
        let prefix = format!("{}-", self.id);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .filter(|ns| ns.starts_with(&prefix))
            .map(String::from)
            .collect()
    }

    /// Removes every namespace of this lab.
    pub fn teardown(&mut self) {
        self.daemons.clear();
        self.stun = None;
        for ns in self.namespaces.drain(..).rev() {
            let _ = run(&["ip", "netns", "del", &ns]);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Cuts (or restores) the path between a site's router and one address on the wire, as a
/// broken path would: packets both ways dropped at the router.
pub fn cut(edge: &str, peer: Ipv4Addr, cut: bool) -> Result<(), String> {
    if cut {
        nft(edge, &format!("table ip natlab_cut {{\n chain c {{ type filter hook forward priority -10; ip daddr {peer} drop; ip saddr {peer} drop; }}\n}}\n"))
    } else {
        ns_run(edge, &["nft", "delete", "table", "ip", "natlab_cut"])
    }
}

/// The public port ranges a rebinding cell moves a router's masquerade to, in turn (a site's
/// router serves every cell of its kind).
pub const REBIND_PORTS: [&str; 2] = ["20000-29999", "30000-39999"];

/// Changes A's router under a running connection: `ports` first moves its masquerade to one of
/// [`REBIND_PORTS`] (every new mapping gets a new port; the kernel still reuses a source's
/// mapping for its other destinations, so an EIM router stays endpoint-independent, at a new
/// port, as a carrier NAT that reassigns port blocks does), then every conntrack entry is
/// flushed, so each flow is mapped afresh on its next packet.
pub fn rebind(edge: &str, ports: bool) -> Result<(), String> {
    if ports {
        let (listing, rule) = masquerade_rule(edge)?;
        let rule = rule.ok_or_else(|| format!("no masquerade rule on {edge}"))?;
        let range = if listing.contains(REBIND_PORTS[0]) { REBIND_PORTS[1] } else { REBIND_PORTS[0] };
        // A port range needs a transport protocol match; other protocols keep the plain rule.
        let moved = rule.replacen("masquerade", &format!("meta l4proto {{ tcp, udp }} masquerade to :{range}"), 1);
        nft(edge, &format!("flush chain ip natlab nat_out\nadd rule ip natlab nat_out {moved}\nadd rule ip natlab nat_out {rule}\n"))?;
    }
    ns_run(edge, &["conntrack", "-F"]).map_err(|e| format!("conntrack -F (is the conntrack package installed?): {e}"))
}

/// A router's `nat_out` chain as nft lists it, and its plain masquerade rule (the one without
/// a port range), if any.
fn masquerade_rule(edge: &str) -> Result<(String, Option<String>), String> {
    let out = Command::new("ip")
        .args(["netns", "exec", edge, "nft", "list", "chain", "ip", "natlab", "nat_out"])
        .output()
        .map_err(|e| format!("nft: {e}"))?;
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let plain = listing.lines().map(str::trim).find(|l| l.contains("masquerade") && !l.contains(" to :")).map(String::from);
    Ok((listing, plain))
}

/// Puts a router's masquerade back as [`rebind`] found it (a site serves later cells too, whose
/// checks expect the port kept).
pub fn unrebind(edge: &str) -> Result<(), String> {
    let Some(plain) = masquerade_rule(edge)?.1 else { return Ok(()) };
    nft(edge, &format!("flush chain ip natlab nat_out\nadd rule ip natlab nat_out {plain}\n"))?;
    ns_run(edge, &["conntrack", "-F"])
}

/// Removes namespaces left by labs whose process is gone (a crash, a SIGKILL); `all` removes
/// every lab namespace.
pub fn cleanup_stale(all: bool) -> Vec<String> {
    remove_lab_namespaces(|pid| all || pid == 0 || !std::path::Path::new(&format!("/proc/{pid}")).exists())
}

/// Removes the namespaces of the lab run by process `pid` (an interrupted run cleaning up).
pub fn remove_lab_of(pid: u32) -> Vec<String> {
    remove_lab_namespaces(|owner| owner == pid)
}

/// Removes every lab namespace whose owning pid (0 if unreadable) `doomed` picks; returns them.
fn remove_lab_namespaces(doomed: impl Fn(u32) -> bool) -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return Vec::new() };
    let mut removed = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let ns = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = ns.strip_prefix(PREFIX) else { continue };
        let pid: u32 = rest.split('-').next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if doomed(pid) && run(&["ip", "netns", "del", ns]).is_ok() {
            removed.push(ns.to_string());
        }
    }
    removed
}
