//! The UPnP site: an EIM router running the real miniupnpd (UPnP-IGD and NAT-PMP), a STUN server
//! on the wire that miniupnpd needs in this lab, and a small NAT-PMP client to check the router.
//!
//! Why the STUN server: miniupnpd refuses to map ports when its WAN address is in a reserved
//! range ("Port forwarding is impossible"), and the lab may only use documentation ranges, which
//! are reserved. With `ext_perform_stun=yes` miniupnpd asks a STUN server what its public address
//! is and maps ports when the answers show no NAT in front of it, which is the truth here: the
//! router's WAN address is the address the wire sees. miniupnpd sends four binding requests
//! (with and without CHANGE-REQUEST) and only needs all four answered from the address it asked,
//! with its own address and ports mapped back, so a plain RFC 5389 binding server is enough.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::sys;
use crate::topo::SiteKind;

/// Where the lab's STUN server listens (the standard STUN port).
pub const STUN_PORT: u16 = 3478;
/// NAT-PMP's server port on the gateway (RFC 6886).
pub const NATPMP_PORT: u16 = 5351;
/// The PCP lease the `pcp` site grants (miniupnpd's `max_lifetime`; its minimum must be below):
/// short enough that a test sees a client renew it, twice, within a couple of minutes.
pub const SHORT_LEASE: Duration = Duration::from_secs(40);

const STUN_MAGIC: u32 = 0x2112_A442;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_RESPONSE: u16 = 0x0101;
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;

/// A STUN binding server running on a thread inside a namespace; stops when dropped.
pub struct StunServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StunServer {
    /// Binds `0.0.0.0:STUN_PORT` in `ns` and answers binding requests until dropped.
    pub fn start(ns: &str) -> Result<StunServer, String> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let ns = ns.to_string();
        let thread = std::thread::spawn(move || {
            let socket = sys::enter_netns(&ns)
                .and_then(|()| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, STUN_PORT)))
                .and_then(|s| s.set_read_timeout(Some(Duration::from_millis(200))).map(|()| s));
            let socket = match socket {
                Ok(socket) => {
                    let _ = ready_tx.send(Ok(()));
                    socket
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("STUN server in {ns}: {e}")));
                    return;
                }
            };
            let mut buf = [0u8; 1500];
            while !stopped.load(Ordering::Relaxed) {
                let Ok((len, from)) = socket.recv_from(&mut buf) else { continue };
                if let SocketAddr::V4(from) = from
                    && let Some(reply) = binding_response(&buf[..len], from)
                {
                    let _ = socket.send_to(&reply, from);
                }
            }
        });
        ready_rx.recv().map_err(|_| "the STUN server thread died".to_string())??;
        Ok(StunServer { stop, thread: Some(thread) })
    }
}

impl Drop for StunServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The binding response to `request` from `from`: MAPPED-ADDRESS and XOR-MAPPED-ADDRESS.
/// CHANGE-REQUEST is ignored: every answer comes from the address that was asked.
/// Anything but an RFC 5389 binding request gets no answer.
fn binding_response(request: &[u8], from: SocketAddrV4) -> Option<Vec<u8>> {
    if request.len() < 20
        || u16::from_be_bytes([request[0], request[1]]) != BINDING_REQUEST
        || u32::from_be_bytes([request[4], request[5], request[6], request[7]]) != STUN_MAGIC
    {
        return None;
    }
    let port = from.port();
    let ip = u32::from(*from.ip());
    let mut reply = Vec::with_capacity(44);
    reply.extend_from_slice(&BINDING_RESPONSE.to_be_bytes());
    reply.extend_from_slice(&24u16.to_be_bytes()); // two 12-byte attributes
    reply.extend_from_slice(&request[4..20]); // magic cookie + transaction id
    for (kind, port, ip) in [
        (ATTR_MAPPED_ADDRESS, port, ip),
        (ATTR_XOR_MAPPED_ADDRESS, port ^ (STUN_MAGIC >> 16) as u16, ip ^ STUN_MAGIC),
    ] {
        reply.extend_from_slice(&kind.to_be_bytes());
        reply.extend_from_slice(&8u16.to_be_bytes());
        reply.extend_from_slice(&[0, 1]); // reserved, IPv4
        reply.extend_from_slice(&port.to_be_bytes());
        reply.extend_from_slice(&ip.to_be_bytes());
    }
    Some(reply)
}

/// The nftables chains miniupnpd fills (its own table, jumped to from the forward and NAT hooks).
pub const MINIUPNPD_TABLE: &str = "natlab_upnp";

pub fn miniupnpd_ruleset() -> String {
    format!(
        "table inet {MINIUPNPD_TABLE} {{
    chain forward {{ type filter hook forward priority filter; policy accept; jump miniupnpd; }}
    chain miniupnpd {{ }}
    chain prerouting {{ type nat hook prerouting priority dstnat; policy accept; jump prerouting_miniupnpd; }}
    chain postrouting {{ type nat hook postrouting priority srcnat; policy accept; jump postrouting_miniupnpd; }}
    chain prerouting_miniupnpd {{ }}
    chain postrouting_miniupnpd {{ }}
}}
"
    )
}

/// A miniupnpd running in a router namespace; killed when dropped (and when the lab dies).
pub struct Miniupnpd {
    child: Child,
    pub log: PathBuf,
    config: PathBuf,
}

impl Miniupnpd {
    /// Starts miniupnpd in `ns` for the LAN `lan_if` (`lan` is its CIDR): UPnP-IGD and NAT-PMP,
    /// secure mode (a host maps ports to itself only), unprivileged ports only, public address
    /// from the lab's STUN server at `stun`. Waits until NAT-PMP answers from `probe_ns` (a LAN
    /// host) at `gateway`, so the site is ready when this returns.
    /// `kind` picks the protocols: UPnP-IGD off for the NAT-PMP-only and PCP-only sites, short
    /// PCP leases for the PCP one.
    #[allow(clippy::too_many_arguments)]
    pub fn start(kind: SiteKind, ns: &str, lan_if: &str, lan: &str, stun: Ipv4Addr, files: &Path, probe_ns: &str, gateway: Ipv4Addr) -> Result<Miniupnpd, String> {
        let upnp = if matches!(kind, SiteKind::NatPmp | SiteKind::Pcp) { "no" } else { "yes" };
        let lifetimes = if kind == SiteKind::Pcp {
            format!("min_lifetime={}\nmax_lifetime={}\n", SHORT_LEASE.as_secs() / 2, SHORT_LEASE.as_secs())
        } else {
            String::new()
        };
        which("miniupnpd").ok_or("the upnp site needs miniupnpd (Debian: apt-get install miniupnpd-nftables)")?;
        let config = files.with_extension("conf");
        let log = files.with_extension("log");
        std::fs::write(
            &config,
            format!(
                "ext_ifname=wan0\nlistening_ip={lan_if}\nport=0\nenable_natpmp=yes\nenable_upnp={upnp}\n{lifetimes}\
                 secure_mode=yes\nipv6_disable=yes\nsystem_uptime=no\nclean_ruleset_interval=600\n\
                 ext_perform_stun=yes\next_stun_host={stun}\next_stun_port={STUN_PORT}\n\
                 upnp_table_name={MINIUPNPD_TABLE}\nupnp_nat_table_name={MINIUPNPD_TABLE}\n\
                 uuid=3d6f7a40-0b5e-4c1f-9a57-6e61746c6162\n\
                 allow 1024-65535 {lan} 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n"
            ),
        )
        .map_err(|e| format!("{}: {e}", config.display()))?;
        let log_file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", ns, "miniupnpd", "-d", "-f"])
            .arg(&config)
            .arg("-P")
            .arg(files.with_extension("pid"))
            .stdout(Stdio::null())
            .stderr(log_file);
        sys::die_with_parent(&mut command);
        let child = command.spawn().map_err(|e| format!("cannot start miniupnpd: {e}"))?;
        let mut daemon = Miniupnpd { child, log, config };
        // STUN takes a round trip per try; NAT-PMP answers once the daemon has settled.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(exit)) = daemon.child.try_wait() {
                return Err(format!("miniupnpd exited with {exit}:\n{}", daemon.log_tail()));
            }
            match natpmp_external_address(probe_ns, gateway) {
                Ok(_) => return Ok(daemon),
                Err(e) if std::time::Instant::now() > deadline => {
                    return Err(format!("miniupnpd in {ns} does not answer NAT-PMP: {e}; its log ends:\n{}", daemon.log_tail()));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

impl Miniupnpd {
    /// The last lines of the daemon's log, for error messages (the files go with the daemon).
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Miniupnpd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for file in [&self.config, &self.log, &self.config.with_extension("pid")] {
            let _ = std::fs::remove_file(file);
        }
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .chain(["/usr/sbin", "/sbin"].map(|dir| Path::new(dir).join(program)))
        .find(|path| path.is_file())
}

/// One NAT-PMP request from namespace `ns` to `gateway`; the answer's payload after the result
/// code, or the result code as an error.
fn natpmp_request(ns: &str, gateway: Ipv4Addr, request: Vec<u8>, opcode: u8) -> Result<Vec<u8>, String> {
    sys::in_netns(ns, move || {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| e.to_string())?;
        socket.connect((gateway, NATPMP_PORT)).map_err(|e| e.to_string())?;
        // RFC 6886 retries from 250 ms, doubling; three tries are plenty on the LAN.
        let mut wait = Duration::from_millis(250);
        for _ in 0..3 {
            socket.send(&request).map_err(|e| e.to_string())?;
            socket.set_read_timeout(Some(wait)).map_err(|e| e.to_string())?;
            let mut buf = [0u8; 16];
            match socket.recv(&mut buf) {
                Ok(n) if n >= 8 && buf[0] == 0 && buf[1] == 128 + opcode => {
                    let result = u16::from_be_bytes([buf[2], buf[3]]);
                    if result != 0 {
                        return Err(format!("NAT-PMP result code {result}"));
                    }
                    return Ok(buf[8..n].to_vec());
                }
                Ok(_) => return Err("malformed NAT-PMP answer".into()),
                Err(_) => wait *= 2,
            }
        }
        Err("no NAT-PMP answer".into())
    })
}

/// Asks the gateway for its public address (NAT-PMP opcode 0), from namespace `ns`.
pub fn natpmp_external_address(ns: &str, gateway: Ipv4Addr) -> Result<Ipv4Addr, String> {
    let payload = natpmp_request(ns, gateway, vec![0, 0], 0)?;
    let octets: [u8; 4] = payload.get(..4).and_then(|b| b.try_into().ok()).ok_or("short NAT-PMP answer")?;
    Ok(Ipv4Addr::from(octets))
}

/// Maps TCP `port` on the gateway to the same port of the asking host (NAT-PMP opcode 2), for
/// `lifetime`; returns the external port granted.
pub fn natpmp_map_tcp(ns: &str, gateway: Ipv4Addr, port: u16, lifetime: Duration) -> Result<u16, String> {
    let mut request = vec![0, 2, 0, 0];
    request.extend_from_slice(&port.to_be_bytes());
    request.extend_from_slice(&port.to_be_bytes());
    request.extend_from_slice(&(lifetime.as_secs() as u32).to_be_bytes());
    let payload = natpmp_request(ns, gateway, request, 2)?;
    let external: [u8; 2] = payload.get(2..4).and_then(|b| b.try_into().ok()).ok_or("short NAT-PMP answer")?;
    Ok(u16::from_be_bytes(external))
}

/// What [`check_site`] saw of a UPnP site from the outside.
#[derive(Debug)]
pub struct SiteCheck {
    /// The router's WAN address, and what NAT-PMP says the public address is.
    pub wan: Ipv4Addr,
    pub natpmp_external: Ipv4Addr,
    /// Connecting from the wire to the LAN host's port before any mapping (must fail).
    pub before_mapping: Result<Duration, String>,
    /// The external port NAT-PMP granted for it.
    pub mapped_port: u16,
    /// 1 MiB echoed from the wire through the mapping.
    pub after_mapping: Result<Duration, String>,
    /// The public address UPnP-IGD reports (`upnpc -s` from the LAN host); `None` when miniupnpc
    /// is not installed.
    pub igd_external: Option<Result<Ipv4Addr, String>>,
}

impl SiteCheck {
    /// Everything as a port-mapping client needs it (the IGD part only where miniupnpc is there).
    pub fn as_expected(&self) -> bool {
        self.natpmp_external == self.wan
            && self.before_mapping.is_err()
            && self.after_mapping.is_ok()
            && self.igd_external.as_ref().is_none_or(|igd| igd.as_ref() == Ok(&self.wan))
    }
}

/// Builds a UPnP site and a public host, and checks the site as a port-mapping client will use
/// it: unsolicited inbound is dropped, NAT-PMP tells the public address and maps a TCP port, and
/// the mapped port carries a connection from the wire to the LAN host.
pub fn check_site(latency: Duration) -> Result<SiteCheck, String> {
    use crate::nodes::{Echo, transfer};
    use crate::topo::Lab;
    const PORT: u16 = 7100;
    let mut lab = Lab::new(latency)?;
    let site = lab.site(SiteKind::Upnp)?;
    let outside = lab.public_host("probe")?;
    let host = &site.hosts[0];
    let gateway = site.gateway.expect("a NAT site has a gateway");
    let _echo = Echo::start_on(&host.ns, SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT)))?;
    let before_mapping = transfer(&outside.ns, SocketAddr::from((site.wan, PORT)), 1024, Duration::from_secs(1));
    let natpmp_external = natpmp_external_address(&host.ns, gateway)?;
    let mapped_port = natpmp_map_tcp(&host.ns, gateway, PORT, Duration::from_secs(120))?;
    let after_mapping = transfer(&outside.ns, SocketAddr::from((site.wan, mapped_port)), 1 << 20, Duration::from_secs(10));
    let igd_external = which("upnpc").map(|_| igd_external_address(&host.ns));
    lab.teardown();
    Ok(SiteCheck { wan: site.wan, natpmp_external, before_mapping, mapped_port, after_mapping, igd_external })
}

/// The public address the UPnP-IGD on the LAN reports, by miniupnpc's `upnpc -s` (SSDP discovery,
/// device description, GetExternalIPAddress) run in namespace `ns`.
fn igd_external_address(ns: &str) -> Result<Ipv4Addr, String> {
    let out = Command::new("ip").args(["netns", "exec", ns, "upnpc", "-i", "-s"]).output().map_err(|e| format!("upnpc: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|line| line.trim().strip_prefix("ExternalIPAddress = "))
        .and_then(|addr| addr.trim().parse().ok())
        .ok_or_else(|| format!("upnpc -s found no IGD: {}", text.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_response_maps_the_sender_back() {
        let mut request = vec![0, 1, 0, 8, 0x21, 0x12, 0xA4, 0x42];
        request.extend_from_slice(&[7; 12]);
        request.extend_from_slice(&[0, 3, 0, 4, 0, 0, 0, 6]); // CHANGE-REQUEST, ignored
        let from = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 9), 40000);
        let reply = binding_response(&request, from).unwrap();
        assert_eq!(&reply[0..2], &[1, 1]);
        assert_eq!(&reply[8..20], &[7; 12]);
        // MAPPED-ADDRESS in clear, XOR-MAPPED-ADDRESS xored with the cookie.
        assert_eq!(&reply[26..32], &[0x9c, 0x40, 203, 0, 113, 9]);
        let xport = u16::from_be_bytes([reply[38], reply[39]]) ^ 0x2112;
        let xip = u32::from_be_bytes([reply[40], reply[41], reply[42], reply[43]]) ^ STUN_MAGIC;
        assert_eq!((xport, Ipv4Addr::from(xip)), (40000, *from.ip()));
        assert!(binding_response(&request[..19], from).is_none(), "short requests are ignored");
    }
}
