//! Asking the home router to forward our listen ports (PCP, NAT-PMP, UPnP-IGD), so that a node
//! behind a router that will open a port is simply reachable: no relay, no hole punching.
//!
//! The protocols are tried in the order RFC 6887 recommends, PCP, then NAT-PMP, then UPnP-IGD,
//! for each IPv4 listen port (QUIC's UDP port and the TCP port), through two maintained crates
//! rather than codecs of our own: `crab_nat` speaks PCP and NAT-PMP (both transports, on tokio),
//! `igd-next` speaks UPnP-IGD (SSDP discovery and SOAP). rust-libp2p's own `libp2p-upnp` speaks
//! IGD only, for TCP, and cannot be told which ports.
//!
//! A mapping is renewed at half its lease and removed on a clean shutdown. The external address
//! it yields is handed to the swarm as a *candidate* only: AutoNAT has a peer dial it back before
//! it counts, so a router that grants a mapping but does not forward never makes the node think
//! it is public. When nothing answers (no gateway, or one that maps nothing) the node asks again
//! every [`RETRY_EVERY`], which also notices a network change.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::num::NonZeroU16;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// The lease asked for: NAT-PMP's recommended two hours (a gateway may grant less).
pub const LEASE: Duration = Duration::from_secs(2 * 3600);
/// How often mapping is tried again while no gateway maps our ports.
pub const RETRY_EVERY: Duration = Duration::from_secs(5 * 60);
/// A mapping is renewed when this much of its lease is left, or at half the lease if shorter.
const RENEW_BEFORE: Duration = Duration::from_secs(10 * 60);
/// PCP and NAT-PMP requests: 250 ms, then doubling, 3 tries (under 2 s per protocol). A gateway
/// that speaks them answers at once on the LAN.
const PMP_TIMEOUT: crab_nat::TimeoutConfig =
    crab_nat::TimeoutConfig { initial_timeout: Duration::from_millis(250), max_retries: 2, max_retry_timeout: Some(Duration::from_secs(1)) };
/// How long SSDP discovery of a UPnP gateway may take.
const UPNP_SEARCH: Duration = Duration::from_secs(2);
/// How long removing the mappings may take at shutdown (within the shutdown's grace).
const REMOVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Why nothing is asked when the routing table names no gateway.
const NO_GATEWAY: &str = "no IPv4 default gateway to ask";
/// What the router's mapping table shows as the mapping's owner (UPnP).
const DESCRIPTION: &str = "warren";

/// A transport whose port is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// QUIC's UDP port.
    Udp,
    Tcp,
}

/// Which protocol got the mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Pcp,
    NatPmp,
    Upnp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Pcp => "pcp",
            Protocol::NatPmp => "natpmp",
            Protocol::Upnp => "upnp",
        })
    }
}

/// A port the gateway forwards to us.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapping {
    pub protocol: Protocol,
    pub transport: Transport,
    pub internal_port: u16,
    pub external: SocketAddrV4,
    pub expires: Instant,
}

/// What the mapping task tells the event loop.
#[derive(Debug, Clone)]
pub enum Event {
    /// A port is mapped (or its mapping renewed).
    Mapped(Mapping),
    /// A mapping is gone: not renewed, removed, or its port no longer listened on.
    Gone { transport: Transport, internal_port: u16 },
    /// A port could not be mapped: why, one reason per protocol (reported when it changes).
    Failed(String),
}

/// The default IPv4 gateway, from the kernel's routing table (`/proc/net/route`: destination
/// 0.0.0.0 with the gateway flag; addresses in the kernel's byte order).
pub fn default_gateway(route_table: &str) -> Option<Ipv4Addr> {
    const RTF_GATEWAY: u32 = 0x2;
    route_table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (destination, gateway, flags) = (cols.get(1)?, cols.get(2)?, cols.get(3)?);
        let flags = u32::from_str_radix(flags, 16).ok()?;
        if *destination != "00000000" || flags & RTF_GATEWAY == 0 {
            return None;
        }
        let raw = u32::from_str_radix(gateway, 16).ok()?;
        Some(Ipv4Addr::from(raw.swap_bytes()))
    })
}

/// Our address towards `gateway` (the source address the kernel would pick; nothing is sent).
fn local_address_towards(gateway: Ipv4Addr) -> Option<Ipv4Addr> {
    let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    socket.connect((gateway, crab_nat::GATEWAY_PORT)).ok()?;
    match socket.local_addr().ok()?.ip() {
        IpAddr::V4(v4) if !v4.is_unspecified() => Some(v4),
        _ => None,
    }
}

/// A mapping held on the gateway, with what renewing and removing it need.
enum Held {
    /// PCP or NAT-PMP, and the external IP the gateway reported.
    Pmp(crab_nat::PortMapping, Ipv4Addr),
    Upnp { gateway: IgdGateway, transport: Transport, local: SocketAddrV4, external: SocketAddrV4, lease: Duration },
}

type IgdGateway = igd_next::aio::Gateway<igd_next::aio::tokio::Tokio>;

impl Held {
    fn mapping(&self, transport: Transport, internal_port: u16) -> Mapping {
        let protocol = match self {
            Held::Pmp(m, _) => match m.mapping_type() {
                crab_nat::PortMappingType::NatPmp => Protocol::NatPmp,
                crab_nat::PortMappingType::Pcp { .. } => Protocol::Pcp,
            },
            Held::Upnp { .. } => Protocol::Upnp,
        };
        let external = match self {
            Held::Pmp(m, ip) => SocketAddrV4::new(*ip, m.external_port().get()),
            Held::Upnp { external, .. } => *external,
        };
        Mapping { protocol, transport, internal_port, external, expires: Instant::now() + self.lease() }
    }

    fn lease(&self) -> Duration {
        match self {
            Held::Pmp(m, _) => Duration::from_secs(u64::from(m.lifetime())),
            Held::Upnp { lease, .. } => *lease,
        }
    }

    async fn renew(&mut self) -> Result<(), String> {
        match self {
            Held::Pmp(m, _) => m.renew().await.map_err(|e| e.to_string()),
            Held::Upnp { gateway, transport, local, external, lease } => gateway
                .add_port(igd_protocol(*transport), external.port(), SocketAddr::V4(*local), lease_secs(*lease), DESCRIPTION)
                .await
                .map_err(|e| e.to_string()),
        }
    }

    async fn remove(self) {
        match self {
            Held::Pmp(m, _) => {
                let _ = m.try_drop().await;
            }
            Held::Upnp { gateway, transport, external, .. } => {
                let _ = gateway.remove_port(igd_protocol(transport), external.port()).await;
            }
        }
    }
}

fn lease_secs(lease: Duration) -> u32 {
    u32::try_from(lease.as_secs()).unwrap_or(u32::MAX)
}

fn igd_protocol(transport: Transport) -> igd_next::PortMappingProtocol {
    match transport {
        Transport::Udp => igd_next::PortMappingProtocol::UDP,
        Transport::Tcp => igd_next::PortMappingProtocol::TCP,
    }
}

/// Maps one port: PCP, then NAT-PMP, then UPnP-IGD. The error lists why each failed.
async fn map(gateway: Ipv4Addr, local: Ipv4Addr, transport: Transport, port: NonZeroU16) -> Result<Held, String> {
    let protocol = match transport {
        Transport::Udp => crab_nat::InternetProtocol::Udp,
        Transport::Tcp => crab_nat::InternetProtocol::Tcp,
    };
    let options = crab_nat::PortMappingOptions {
        external_port: Some(port),
        lifetime_seconds: Some(lease_secs(LEASE)),
        timeout_config: Some(PMP_TIMEOUT),
    };
    let gw = crab_nat::GatewayAddress::IpV4(gateway);
    let pcp = match crab_nat::pcp::port_mapping(crab_nat::pcp::BaseMapRequest::new(gw, IpAddr::V4(local), protocol, port), None, None, options).await {
        Ok(m) => {
            let ip = match m.mapping_type() {
                crab_nat::PortMappingType::Pcp { external_ip: IpAddr::V4(ip), .. } => ip,
                _ => return Err("PCP: the gateway reported no IPv4 external address".into()),
            };
            return Ok(Held::Pmp(m, ip));
        }
        Err(e) => format!("PCP: {e}"),
    };
    let natpmp = match crab_nat::natpmp::port_mapping(gw, protocol, port, options).await {
        Ok(m) => match crab_nat::natpmp::external_address(gw, Some(PMP_TIMEOUT)).await {
            Ok(ip) => return Ok(Held::Pmp(m, ip)),
            Err(e) => format!("NAT-PMP: mapped, but no external address: {e}"),
        },
        Err(e) => format!("NAT-PMP: {e}"),
    };
    let upnp = match map_upnp(gateway, local, transport, port).await {
        Ok(held) => return Ok(held),
        Err(e) => format!("UPnP: {e}"),
    };
    Err(format!("{pcp}; {natpmp}; {upnp}"))
}

async fn map_upnp(gateway_ip: Ipv4Addr, local: Ipv4Addr, transport: Transport, port: NonZeroU16) -> Result<Held, String> {
    let mut options = igd_next::SearchOptions::default();
    options.timeout = Some(UPNP_SEARCH);
    options.single_search_timeout = Some(UPNP_SEARCH);
    let gateway = igd_next::aio::tokio::search_gateway(options).await.map_err(|e| e.to_string())?;
    // Only the router we route through: an IGD elsewhere on the LAN cannot forward to us.
    if gateway.addr.ip() != IpAddr::V4(gateway_ip) {
        return Err(format!("the IGD found is {}, not our gateway {gateway_ip}", gateway.addr.ip()));
    }
    let external_ip = match gateway.get_external_ip().await.map_err(|e| e.to_string())? {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(ip) => return Err(format!("the IGD reported an IPv6 external address {ip}")),
    };
    let local = SocketAddrV4::new(local, port.get());
    let protocol = igd_protocol(transport);
    // The same external port when free (so the address is stable), else one the router picks.
    let external_port = match gateway.add_port(protocol, port.get(), SocketAddr::V4(local), lease_secs(LEASE), DESCRIPTION).await {
        Ok(()) => port.get(),
        Err(_) => gateway
            .add_any_port(protocol, SocketAddr::V4(local), lease_secs(LEASE), DESCRIPTION)
            .await
            .map_err(|e| e.to_string())?,
    };
    Ok(Held::Upnp { gateway, transport, local, external: SocketAddrV4::new(external_ip, external_port), lease: LEASE })
}

/// When a mapping of lease `lease`, made now, is renewed.
fn renew_in(lease: Duration) -> Duration {
    lease.saturating_sub(RENEW_BEFORE).max(lease / 2)
}

/// Keeps the ports in `ports` (IPv4 listen ports, as the event loop reports them) mapped until
/// `stop` resolves, then removes the mappings. Tells `report` what is mapped and what is gone.
pub async fn run(
    mut ports: watch::Receiver<Vec<(Transport, u16)>>,
    report: impl Fn(Event),
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut held: HashMap<(Transport, u16), (Held, Instant)> = HashMap::new();
    let mut last_error: Option<String> = None;
    let mut stopping = false;
    while !stopping {
        let wanted: Vec<(Transport, u16)> = ports.borrow_and_update().clone();
        // Ports no longer listened on: their mappings go.
        let stale: Vec<(Transport, u16)> = held.keys().filter(|k| !wanted.contains(k)).copied().collect();
        for key in stale {
            if let Some((mapping, _)) = held.remove(&key) {
                mapping.remove().await;
                report(Event::Gone { transport: key.0, internal_port: key.1 });
            }
        }
        // Renewals due.
        let now = Instant::now();
        let due: Vec<(Transport, u16)> = held.iter().filter(|(_, (_, at))| *at <= now).map(|(k, _)| *k).collect();
        for key in due {
            let (mut mapping, _) = held.remove(&key).expect("listed above");
            match mapping.renew().await {
                Ok(()) => {
                    report(Event::Mapped(mapping.mapping(key.0, key.1)));
                    let at = Instant::now() + renew_in(mapping.lease());
                    held.insert(key, (mapping, at));
                }
                Err(e) => {
                    tracing::warn!(port = key.1, transport = ?key.0, error = %e, "a port mapping could not be renewed");
                    report(Event::Gone { transport: key.0, internal_port: key.1 });
                }
            }
        }
        // New mappings.
        let missing: Vec<(Transport, u16)> = wanted.iter().filter(|k| !held.contains_key(k)).copied().collect();
        if !missing.is_empty() {
            let route = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
            let gateway = default_gateway(&route).and_then(|gw| local_address_towards(gw).map(|local| (gw, local)));
            if gateway.is_none() && last_error.as_deref() != Some(NO_GATEWAY) {
                report(Event::Failed(NO_GATEWAY.into()));
                last_error = Some(NO_GATEWAY.into());
            }
            for (transport, port) in missing {
                let Some(((gateway, local), nonzero)) = gateway.zip(NonZeroU16::new(port)) else { break };
                // Asking a gateway that does not answer takes seconds: a shutdown does not wait.
                let attempt = tokio::select! {
                    _ = &mut stop => {
                        stopping = true;
                        break;
                    }
                    attempt = map(gateway, local, transport, nonzero) => attempt,
                };
                match attempt {
                    Ok(mapping) => {
                        let granted = mapping.mapping(transport, port);
                        tracing::info!(protocol = %granted.protocol, ?transport, port, external = %granted.external, lease_secs = mapping.lease().as_secs(), "the gateway mapped a port");
                        report(Event::Mapped(granted));
                        let at = Instant::now() + renew_in(mapping.lease());
                        held.insert((transport, port), (mapping, at));
                    }
                    Err(e) => {
                        if last_error.as_deref() != Some(e.as_str()) {
                            tracing::info!(%gateway, ?transport, port, error = %e, "no port mapping from the gateway");
                            report(Event::Failed(e.clone()));
                            last_error = Some(e);
                        }
                    }
                }
            }
        }
        if stopping {
            break;
        }
        let all_mapped = wanted.iter().all(|k| held.contains_key(k));
        let next_renewal = held.values().map(|(_, at)| *at).min();
        let wake = match (all_mapped, next_renewal) {
            (true, Some(at)) => at,
            (true, None) => Instant::now() + RETRY_EVERY,
            (false, at) => at.unwrap_or(Instant::now() + RETRY_EVERY).min(Instant::now() + RETRY_EVERY),
        };
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep_until(wake) => {}
            changed = ports.changed() => {
                if changed.is_err() {
                    break;
                }
            }
        }
    }
    let removals = held.into_values().map(|(mapping, _)| mapping.remove());
    if tokio::time::timeout(REMOVE_TIMEOUT, futures::future::join_all(removals)).await.is_err() {
        tracing::warn!("the gateway did not confirm removing our port mappings in time; they expire with their lease");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_gateway_is_read_from_the_routing_table() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     eth0\t00000000\t0100A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n";
        assert_eq!(default_gateway(table), Some(Ipv4Addr::new(192, 168, 0, 1)));
        assert_eq!(default_gateway("Iface\tDestination\tGateway\n"), None, "no default route");
    }

    #[test]
    fn mappings_are_renewed_well_before_they_expire() {
        assert_eq!(renew_in(LEASE), LEASE - RENEW_BEFORE);
        assert_eq!(renew_in(Duration::from_secs(120)), Duration::from_secs(60), "a short lease: at half");
    }
}
