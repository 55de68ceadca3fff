//! The hard side's fan of sockets: many UDP sockets, each sending to the easy side's one
//! address so that our NAT opens a mapping per socket, all waiting for the probe that finds one.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::net::UdpSocket;
use warren_punch::{PACKET_LEN, Packet, TOKEN_LEN};

/// Where a probe got in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    /// Our socket's local port.
    pub local_port: u16,
    /// The public port the easy side sent the probe to (our NAT's mapping for that socket).
    pub probed_port: u16,
}

pub struct Fan {
    sockets: Vec<Arc<UdpSocket>>,
    target: SocketAddr,
    packet: [u8; PACKET_LEN],
    token: [u8; TOKEN_LEN],
}

impl Fan {
    /// Opens `count` sockets on ephemeral ports: fewer where that would leave fewer than
    /// [`crate::resources::FDS_LEFT_BY_PUNCH`] descriptors free, or if the process runs out of
    /// them part-way (at least one, or an error).
    pub fn open(count: u16, target: SocketAddr, token: [u8; TOKEN_LEN]) -> io::Result<Fan> {
        let free = crate::resources::fds_free();
        let count = crate::resources::punch_sockets(count, free);
        if count == 0 {
            return Err(io::Error::other(format!(
                "{} file descriptors free, and {} are kept for connections and forwards; raise the open-file limit (ulimit -n, LimitNOFILE=)",
                free.unwrap_or(0),
                crate::resources::FDS_LEFT_BY_PUNCH
            )));
        }
        let mut sockets = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).and_then(|s| {
                s.set_nonblocking(true)?;
                UdpSocket::from_std(s)
            });
            match socket {
                Ok(socket) => sockets.push(Arc::new(socket)),
                Err(e) if sockets.is_empty() => return Err(e),
                Err(e) => {
                    tracing::debug!(opened = sockets.len(), error = %e, "birthday punch: fewer sockets than configured");
                    break;
                }
            }
        }
        Ok(Fan { sockets, target, packet: Packet { token, port: 0 }.encode(), token })
    }

    pub fn len(&self) -> u16 {
        u16::try_from(self.sockets.len()).unwrap_or(u16::MAX)
    }

    /// Every socket sends one packet to the target, with `ttl` when given. (Awaited, not
    /// `try_send_to`: a fresh socket is not known to be writable until the reactor has polled
    /// it once, so a first round of `try_send_to` sends nothing.)
    pub async fn round(&self, ttl: Option<u32>) {
        for socket in &self.sockets {
            if let Some(ttl) = ttl {
                let _ = socket.set_ttl(ttl);
            }
            let _ = socket.send_to(&self.packet, self.target).await;
        }
    }

    /// The first socket a valid probe reaches: from the target, with our token.
    pub async fn hit(&self) -> io::Result<Hit> {
        let mut waiting: FuturesUnordered<_> = self.sockets.iter().map(|s| self.wait_on(s)).collect();
        match waiting.next().await {
            Some(hit) => hit,
            None => std::future::pending().await,
        }
    }

    async fn wait_on(&self, socket: &UdpSocket) -> io::Result<Hit> {
        let mut buf = [0u8; PACKET_LEN + 1];
        loop {
            let (n, from) = match socket.recv_from(&mut buf).await {
                Ok(received) => received,
                // An ICMP error for an earlier send (the easy side's router said "unreachable")
                // says nothing about probes to come.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e),
            };
            if from != self.target {
                continue;
            }
            if let Some(packet) = Packet::decode(&buf[..n])
                && packet.token == self.token
            {
                return Ok(Hit { local_port: socket.local_addr()?.port(), probed_port: packet.port });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_probe_with_the_token_from_the_target_is_a_hit_and_nothing_else_is() {
        let easy = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let target = easy.local_addr().unwrap();
        let token = [9u8; TOKEN_LEN];
        easy.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let fan = Fan::open(4, target, token).unwrap();
        fan.round(None).await;
        let mut buf = [0u8; 64];
        let (n, from) = easy.recv_from(&mut buf).unwrap();
        assert_eq!(Packet::decode(&buf[..n]), Some(Packet { token, port: 0 }));
        let to = SocketAddr::new("127.0.0.1".parse().unwrap(), from.port());
        // Wrong token, then a stranger with the right token: neither counts.
        easy.send_to(&Packet { token: [1; TOKEN_LEN], port: 7 }.encode(), to).unwrap();
        std::net::UdpSocket::bind("127.0.0.1:0").unwrap().send_to(&Packet { token, port: 7 }.encode(), to).unwrap();
        easy.send_to(&Packet { token, port: 4242 }.encode(), to).unwrap();
        let hit = tokio::time::timeout(std::time::Duration::from_secs(5), fan.hit()).await.unwrap().unwrap();
        assert_eq!(hit, Hit { local_port: from.port(), probed_port: 4242 });
    }
}
