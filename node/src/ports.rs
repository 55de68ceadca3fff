//! Which of the configured listen addresses a node can take, checked before libp2p binds them.
//!
//! libp2p binds TCP listeners with SO_REUSEADDR and SO_REUSEPORT, so a port held by another
//! warren node on the same host would be shared silently, and the kernel would hand each new
//! connection to either node at random. We bind every port once ourselves, without either
//! option, to find out whether anyone else uses it.
//!
//! A plain bind also fails on a port whose old connections linger in TIME_WAIT (a busy relay
//! restarted by systemd). Those are not a user of the port: on Linux the socket table in
//! `/proc/net/tcp{,6}` tells them apart from a live listener. Elsewhere the port is bound again
//! with SO_REUSEADDR, which the BSDs and macOS refuse next to a listener.
//!
//! The default listen addresses give way: a default port that is in use (a second node on the
//! host) is replaced by one the OS picks, so several plain `warren up` run side by side. A port
//! the user chose is refused with a clear message instead.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libp2p::{Multiaddr, multiaddr::Protocol};

use crate::addresses::ip_of;
use crate::error::UserError;

/// What a bind of the address by us found.
#[derive(Debug)]
pub enum PortCheck {
    /// Nobody else uses it (or only connections in TIME_WAIT do).
    Free,
    /// A live socket holds the port.
    InUse,
    /// The address cannot be bound at all (not an address of this host, IPv6 disabled, …).
    Unusable(io::Error),
}

/// The addresses to listen on: `listen` itself, with busy or unusable default addresses
/// replaced or left out (`defaults`), or an error naming the address a user chose that is taken.
pub fn choose(listen: &[Multiaddr], defaults: bool) -> Result<Vec<Multiaddr>, UserError> {
    let mut chosen = Vec::with_capacity(listen.len());
    let mut gave_way = Vec::new();
    for addr in listen {
        match check(addr) {
            PortCheck::Free => chosen.push(addr.clone()),
            PortCheck::InUse if defaults => {
                gave_way.push(addr.to_string());
                chosen.push(with_any_port(addr));
            }
            PortCheck::Unusable(e) if defaults => {
                tracing::warn!(%addr, error = %e, "skipping a default listen address");
            }
            PortCheck::InUse => {
                let port = port_of(addr).map(|(port, _)| port).unwrap_or_default();
                return Err(UserError::bad_input(format!(
                    "cannot listen on {addr}: port {port} is already in use; stop what uses it or pass --listen with another port (0 picks a free one)"
                )));
            }
            PortCheck::Unusable(e) => {
                return Err(UserError::bad_input(format!(
                    "cannot listen on {addr}: {e}; pass a different --listen address"
                )));
            }
        }
    }
    if !gave_way.is_empty() {
        tracing::warn!(
            busy = gave_way.join(" "),
            "the default port is in use (another warren node on this host?): listening on ports the OS picks instead; pass --listen to choose them"
        );
    }
    Ok(chosen)
}

/// Binds the address's port once, without sharing it, to see whether anyone else holds it.
pub fn check(addr: &Multiaddr) -> PortCheck {
    let (Some(ip), Some((port, tcp))) = (ip_of(addr), port_of(addr)) else { return PortCheck::Free };
    if port == 0 {
        return PortCheck::Free;
    }
    let sockaddr = SocketAddr::new(ip, port);
    match bind(sockaddr, tcp, false) {
        Ok(()) => PortCheck::Free,
        Err(e) if e.kind() == io::ErrorKind::AddrInUse && tcp => {
            if held_by_live_socket(sockaddr) { PortCheck::InUse } else { PortCheck::Free }
        }
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => PortCheck::InUse,
        Err(e) => PortCheck::Unusable(e),
    }
}

/// The port of the address's TCP or UDP component, and whether it is TCP.
fn port_of(addr: &Multiaddr) -> Option<(u16, bool)> {
    addr.iter().find_map(|p| match p {
        Protocol::Tcp(port) => Some((port, true)),
        Protocol::Udp(port) => Some((port, false)),
        _ => None,
    })
}

/// The same address with port 0, so the OS picks a free port.
fn with_any_port(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .map(|p| match p {
            Protocol::Tcp(_) => Protocol::Tcp(0),
            Protocol::Udp(_) => Protocol::Udp(0),
            other => other,
        })
        .collect()
}

fn bind(sockaddr: SocketAddr, tcp: bool, reuse_address: bool) -> io::Result<()> {
    let (kind, proto) =
        if tcp { (socket2::Type::STREAM, socket2::Protocol::TCP) } else { (socket2::Type::DGRAM, socket2::Protocol::UDP) };
    let socket = socket2::Socket::new(socket2::Domain::for_address(sockaddr), kind, Some(proto))?;
    if sockaddr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(reuse_address)?;
    socket.bind(&sockaddr.into())
}

/// Whether the TCP port is held by something other than connections in TIME_WAIT.
#[cfg(target_os = "linux")]
fn held_by_live_socket(sockaddr: SocketAddr) -> bool {
    let mut tables = String::new();
    for path in ["/proc/net/tcp", "/proc/net/tcp6"] {
        match std::fs::read_to_string(path) {
            Ok(text) => tables.push_str(&text),
            // Without the table we cannot tell TIME_WAIT apart: fall back to the portable way.
            Err(_) if path.ends_with('6') => {}
            Err(_) => return bind(sockaddr, true, true).is_err(),
        }
    }
    listeners_in(&tables).any(|(ip, port)| port == sockaddr.port() && overlaps(ip, sockaddr.ip()))
}

#[cfg(not(target_os = "linux"))]
fn held_by_live_socket(sockaddr: SocketAddr) -> bool {
    // SO_REUSEADDR lets the bind succeed next to TIME_WAIT connections but not next to a
    // listener on the BSDs and macOS. (Not on Windows, where it would share a live port.)
    if cfg!(unix) { bind(sockaddr, true, true).is_err() } else { true }
}

/// Whether binding `want` conflicts with a socket bound to `held` on the same port: the same IP,
/// or either is the wildcard of its family. (An IPv6 wildcard bound without V6ONLY also covers
/// IPv4; libp2p and we bind IPv6 with V6ONLY, and a foreign dual-stack socket shows up in the
/// plain bind's failure anyway.)
#[cfg(any(target_os = "linux", test))]
fn overlaps(held: IpAddr, want: IpAddr) -> bool {
    held.is_ipv6() == want.is_ipv6() && (held == want || held.is_unspecified() || want.is_unspecified())
}

/// The local endpoints of the sockets in state LISTEN (`0A`) in a `/proc/net/tcp` or `tcp6`
/// table. Addresses there are the kernel's in-memory words printed as hex, so each 32-bit word
/// is read back in this machine's byte order.
#[cfg(any(target_os = "linux", test))]
fn listeners_in(table: &str) -> impl Iterator<Item = (IpAddr, u16)> + '_ {
    const LISTEN: &str = "0A";
    table.lines().filter_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 4 || cols[3] != LISTEN {
            return None;
        }
        let (ip, port) = cols[1].split_once(':')?;
        let port = u16::from_str_radix(port, 16).ok()?;
        let word = |i: usize| u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok().map(u32::to_ne_bytes);
        let ip = match ip.len() {
            8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
            32 => {
                let mut bytes = [0u8; 16];
                for i in 0..4 {
                    bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
                }
                IpAddr::V6(Ipv6Addr::from(bytes))
            }
            _ => return None,
        };
        Some((ip, port))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex_v4(ip: Ipv4Addr) -> String {
        format!("{:08X}", u32::from_ne_bytes(ip.octets()))
    }

    #[test]
    fn listeners_are_read_from_the_socket_table_and_time_wait_is_not_one() {
        let table = format!(
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
             0: {}:0FA1 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n\
             1: {}:1F90 {}:D431 06 00000000:00000000 03:00000E1C 00000000     0        0 0 3\n",
            hex_v4(Ipv4Addr::UNSPECIFIED),
            hex_v4(Ipv4Addr::LOCALHOST),
            hex_v4(Ipv4Addr::LOCALHOST),
        );
        let found: Vec<_> = listeners_in(&table).collect();
        assert_eq!(found, vec![(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 4001)]);

        let v6 = "  sl  local_address                         remote_address                        st\n\
                  0: 00000000000000000000000000000000:0FA1 00000000000000000000000000000000:0000 0A\n";
        assert_eq!(listeners_in(v6).collect::<Vec<_>>(), vec![(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 4001)]);
    }

    #[test]
    fn a_wildcard_overlaps_every_address_of_its_family_only() {
        let any4 = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let lo4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let lan4: IpAddr = "10.0.0.7".parse().unwrap();
        assert!(overlaps(any4, lo4) && overlaps(lo4, any4) && overlaps(lo4, lo4));
        assert!(!overlaps(lo4, lan4));
        assert!(!overlaps(IpAddr::V6(Ipv6Addr::UNSPECIFIED), lo4));
    }

    #[test]
    fn a_busy_default_port_gives_way_and_a_chosen_one_is_refused() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
        assert!(matches!(check(&addr), PortCheck::InUse));
        let chosen = choose(std::slice::from_ref(&addr), true).unwrap();
        assert_eq!(chosen, vec!["/ip4/127.0.0.1/tcp/0".parse::<Multiaddr>().unwrap()]);
        let refused = choose(&[addr], false).unwrap_err();
        assert!(refused.message.contains(&format!("port {port} is already in use")), "{}", refused.message);
    }
}
