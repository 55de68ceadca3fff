//! What a birthday punch needs from QUIC that libp2p-quic does not offer: sending our own
//! packets from the QUIC listen socket (the easy side's probes must leave from the address peers
//! know), and accepting a QUIC connection on a socket of the punch's choosing (the hard side's
//! winning port), without either showing up as a listen address of the node.
//!
//! - [`listen_socket`] finds the node's own QUIC socket on a port and returns a duplicate of it
//!   (`pidfd_getfd` on our own process: no privilege, no unsafe code). libp2p-quic does the same
//!   for DCUtR (it clones the listen socket and sends random bytes from it); it only keeps the
//!   clone to itself. Packets sent from the duplicate leave from the listen address, through the
//!   NAT mapping peers see; nothing is ever read from it.
//! - [`WithPunchListeners`] wraps the node's transport and runs a second libp2p-quic transport
//!   beside it whose listeners the swarm never hears of: [`PunchListeners::listen`] opens one on
//!   a port, its inbound connections come out as the node's own, and dropping the
//!   [`ListenGuard`] closes it. Closing a libp2p-quic listener closes its endpoint and every
//!   connection on it, so the guard lives as long as the punched connection.

use std::io;
use std::net::UdpSocket;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use futures::{FutureExt, future::BoxFuture};
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{DialOpts, ListenerId, Transport, TransportError, TransportEvent};
use libp2p::{Multiaddr, PeerId};

/// A duplicate of this process's IPv4 UDP socket bound to `port` (the QUIC listen socket).
pub fn listen_socket(port: u16) -> io::Result<UdpSocket> {
    use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};
    let pidfd = pidfd_open(getpid(), PidfdFlags::empty())?;
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let is_socket = std::fs::read_link(entry.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        let Ok(dup) = pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty()) else { continue };
        let socket = socket2::Socket::from(dup);
        if socket.r#type().ok() != Some(socket2::Type::DGRAM) {
            continue;
        }
        let socket = UdpSocket::from(socket);
        if socket.local_addr().is_ok_and(|a| a.is_ipv4() && a.port() == port) {
            return Ok(socket);
        }
    }
    Err(io::Error::new(io::ErrorKind::NotFound, format!("no UDP socket of ours on port {port}")))
}

type PunchQuic = libp2p::quic::tokio::Transport;
type Upgrade = BoxFuture<'static, io::Result<(PeerId, StreamMuxerBox)>>;

struct Shared {
    quic: PunchQuic,
    /// The swarm's task, woken when a listener opens or closes.
    waker: Option<Waker>,
}

/// Opens punch listeners; clones share the transport's.
#[derive(Clone)]
pub struct PunchListeners {
    shared: Arc<Mutex<Shared>>,
    /// Boxes each punched connection's muxer as the node boxes its others (metering included).
    wrap: Arc<dyn Fn(PeerId, libp2p::quic::Connection) -> (PeerId, StreamMuxerBox) + Send + Sync>,
}

/// Keeps a punch listener open; dropping it closes the listener and its connections.
#[derive(Debug)]
pub struct ListenGuard {
    shared: Arc<Mutex<Shared>>,
    id: ListenerId,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("punch listeners")
    }
}

impl Drop for ListenGuard {
    fn drop(&mut self) {
        let mut shared = self.shared.lock().expect("punch listeners lock");
        shared.quic.remove_listener(self.id);
        if let Some(waker) = shared.waker.take() {
            waker.wake();
        }
    }
}

impl PunchListeners {
    pub fn new(
        config: libp2p::quic::Config,
        wrap: impl Fn(PeerId, libp2p::quic::Connection) -> (PeerId, StreamMuxerBox) + Send + Sync + 'static,
    ) -> Self {
        let shared = Shared { quic: PunchQuic::new(config), waker: None };
        PunchListeners { shared: Arc::new(Mutex::new(shared)), wrap: Arc::new(wrap) }
    }

    /// Listens for QUIC on `0.0.0.0:port` until the guard is dropped.
    pub fn listen(&self, port: u16) -> Result<ListenGuard, TransportError<libp2p::quic::Error>> {
        let addr: Multiaddr = format!("/ip4/0.0.0.0/udp/{port}/quic-v1").parse().expect("a valid multiaddr");
        let id = ListenerId::next();
        let mut shared = self.shared.lock().expect("punch listeners lock");
        shared.quic.listen_on(id, addr)?;
        if let Some(waker) = shared.waker.take() {
            waker.wake();
        }
        Ok(ListenGuard { shared: self.shared.clone(), id })
    }

    /// The next inbound connection on a punch listener, if one is ready.
    fn poll(&self, cx: &mut Context<'_>) -> Poll<TransportEvent<Upgrade, io::Error>> {
        let mut shared = self.shared.lock().expect("punch listeners lock");
        loop {
            match Pin::new(&mut shared.quic).poll(cx) {
                Poll::Ready(TransportEvent::Incoming { listener_id, upgrade, local_addr, send_back_addr }) => {
                    let wrap = self.wrap.clone();
                    let upgrade = async move {
                        let (peer, connection) = upgrade.await.map_err(io::Error::other)?;
                        Ok(wrap(peer, connection))
                    }
                    .boxed();
                    return Poll::Ready(TransportEvent::Incoming { listener_id, upgrade, local_addr, send_back_addr });
                }
                // Addresses and closings of punch listeners are nobody's business but the punch's.
                Poll::Ready(other) => tracing::trace!(?other, "punch listener event"),
                Poll::Pending => {
                    shared.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
        }
    }
}

/// The node's transport, with punch listeners beside it (see the module docs).
pub struct WithPunchListeners<T> {
    inner: T,
    punch: PunchListeners,
}

impl<T> WithPunchListeners<T> {
    pub fn new(inner: T, punch: PunchListeners) -> Self {
        WithPunchListeners { inner, punch }
    }
}

impl<T> Transport for WithPunchListeners<T>
where
    T: Transport<Output = (PeerId, StreamMuxerBox), Error = io::Error> + Unpin,
    T::ListenerUpgrade: Send + 'static,
{
    type Output = (PeerId, StreamMuxerBox);
    type Error = io::Error;
    type ListenerUpgrade = Upgrade;
    type Dial = T::Dial;

    fn listen_on(&mut self, id: ListenerId, addr: Multiaddr) -> Result<(), TransportError<Self::Error>> {
        self.inner.listen_on(id, addr)
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.inner.remove_listener(id)
    }

    fn dial(&mut self, addr: Multiaddr, opts: DialOpts) -> Result<Self::Dial, TransportError<Self::Error>> {
        self.inner.dial(addr, opts)
    }

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        let this = self.get_mut();
        if let Poll::Ready(event) = Pin::new(&mut this.inner).poll(cx) {
            return Poll::Ready(event.map_upgrade(|upgrade| upgrade.boxed()));
        }
        this.punch.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_on_a_port_is_found_and_sends_from_that_port() {
        let own = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = own.local_addr().unwrap().port();
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let dup = listen_socket(port).expect("found");
        dup.send_to(b"probe", peer.local_addr().unwrap()).unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from.port()), (&b"probe"[..], port));
        let unused = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        assert!(listen_socket(unused).is_err());
    }
}
