//! An in-process network for thousands of warren nodes: IPv4 hosts, TCP-like byte streams
//! between them with a one-way latency per link, public hosts and hosts behind a NAT.
//!
//! Each node gets a [`SimTransport`] in place of its sockets (`warren_node::behaviour::Wire`);
//! Noise, Yamux, the relay client and everything above are the node's own. Nothing here touches
//! a real socket: addresses are numbers in a table.
//!
//! What the network models, and why:
//! - **Latency**: every byte arrives one link latency after it was written (the link's latency
//!   is fixed per pair of hosts, spread around the configured value so that lookups meet fast
//!   and slow peers). A connection is ready one latency after its dial (the handshakes above add
//!   their own round trips).
//! - **NAT**: a host behind a NAT dials out from its NAT's address, keeping its port (an
//!   endpoint-independent mapping); nothing can dial in to it. So its observed address is not
//!   dialable and AutoNAT finds it private, as on a real home network. Hole punching never
//!   succeeds here: NATed nodes are reached through relays.
//! - **Absent hosts**: a dial to an address nobody listens on (a node that left, a NAT, a
//!   private address) fails after [`DIAL_TIMEOUT`], as a QUIC handshake to a vanished host does
//!   (QUIC ignores the ICMP that would have said so at once).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{AsyncRead, AsyncWrite, FutureExt};
use libp2p::core::transport::{DialOpts, ListenerId, Transport, TransportError, TransportEvent};
use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;
use tokio::sync::mpsc;
use tokio::time::Instant;
use warren_node::behaviour::ByteStream;

/// How long a dial to an address nobody listens on takes to fail: libp2p-quic's handshake
/// timeout (5 s), what a warren node waits for a vanished host.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections waiting to be accepted by one listener; beyond it dials fail (a full backlog).
const BACKLOG: usize = 256;
/// Bytes written and not yet read, per direction of a stream: a socket buffer's worth. Writers
/// wait beyond it, so a slow reader holds its sender back as TCP would.
const STREAM_BUFFER: usize = 256 * 1024;
/// The port a NAT maps its host's connections to, and the port nodes listen on.
pub const NODE_PORT: u16 = 4001;
/// The first port handed out for listeners on port 0.
const FIRST_EPHEMERAL_PORT: u16 = 40_000;

/// The network all simulated hosts share.
#[derive(Clone)]
pub struct Net {
    shared: Arc<Mutex<Shared>>,
    one_way: Duration,
}

struct Shared {
    /// Listeners, and whether their host is behind a NAT (then only the host itself reaches them).
    listeners: HashMap<SocketAddrV4, (mpsc::Sender<Accepted>, bool)>,
    next_port: HashMap<Ipv4Addr, u16>,
    /// Bytes each host has written, by its own address.
    sent: HashMap<Ipv4Addr, Arc<AtomicU64>>,
    /// Connections each host has dialed that reached a listener.
    dials: HashMap<Ipv4Addr, Arc<AtomicU64>>,
}

struct Accepted {
    stream: Pipe,
    from: SocketAddrV4,
}

/// Where a host sits: its own address, and its NAT's public address if it is behind one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    pub ip: Ipv4Addr,
    pub nat: Option<Ipv4Addr>,
}

impl Host {
    /// The address others see this host's connections come from.
    fn source(&self, port: u16) -> SocketAddrV4 {
        match self.nat {
            Some(nat) => SocketAddrV4::new(nat, NODE_PORT),
            None => SocketAddrV4::new(self.ip, port),
        }
    }
}

impl Net {
    /// A network whose links have about `one_way` latency (between half and one and a half
    /// times it, fixed per pair of hosts).
    pub fn new(one_way: Duration) -> Self {
        let shared = Shared { listeners: HashMap::new(), next_port: HashMap::new(), sent: HashMap::new(), dials: HashMap::new() };
        Net { shared: Arc::new(Mutex::new(shared)), one_way }
    }

    /// A transport for a node on `host`.
    pub fn transport(&self, host: Host) -> SimTransport {
        let (sent, dials) = {
            let mut shared = self.shared.lock().expect("net lock");
            (shared.sent.entry(host.ip).or_default().clone(), shared.dials.entry(host.ip).or_default().clone())
        };
        SimTransport { net: self.clone(), host, listeners: Vec::new(), events: VecDeque::new(), waker: None, sent, dials }
    }

    /// Bytes written and connections dialed by a host so far.
    pub fn traffic(&self, ip: Ipv4Addr) -> (u64, u64) {
        let shared = self.shared.lock().expect("net lock");
        let read = |m: &HashMap<Ipv4Addr, Arc<AtomicU64>>| m.get(&ip).map_or(0, |c| c.load(Ordering::Relaxed));
        (read(&shared.sent), read(&shared.dials))
    }

    /// The one-way latency between two hosts.
    pub fn latency(&self, a: Ipv4Addr, b: Ipv4Addr) -> Duration {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        let mix = (u64::from(u32::from(lo)).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(u32::from(hi)))
            .wrapping_mul(0xBF58_476D_1CE4_E5B9);
        let spread = (mix >> 40) % 1001; // 0..=1000
        self.one_way.mul_f64(0.5 + spread as f64 / 1000.0)
    }
}

/// One node's way onto the [`Net`]: `/ip4/A/tcp/P` addresses only.
pub struct SimTransport {
    net: Net,
    host: Host,
    listeners: Vec<Listener>,
    events: VecDeque<TransportEvent<<Self as Transport>::ListenerUpgrade, io::Error>>,
    waker: Option<Waker>,
    sent: Arc<AtomicU64>,
    dials: Arc<AtomicU64>,
}

struct Listener {
    id: ListenerId,
    addr: SocketAddrV4,
    incoming: mpsc::Receiver<Accepted>,
}

fn parse(addr: &Multiaddr) -> Option<SocketAddrV4> {
    let mut parts = addr.iter();
    let ip = match parts.next()? {
        Protocol::Ip4(ip) => ip,
        _ => return None,
    };
    let port = match parts.next()? {
        Protocol::Tcp(port) => port,
        _ => return None,
    };
    match parts.next() {
        None | Some(Protocol::P2p(_)) if parts.next().is_none() => Some(SocketAddrV4::new(ip, port)),
        _ => None,
    }
}

fn multiaddr(addr: SocketAddrV4) -> Multiaddr {
    Multiaddr::empty().with(Protocol::Ip4(*addr.ip())).with(Protocol::Tcp(addr.port()))
}

impl SimTransport {
    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    fn listen_port(&self) -> u16 {
        self.listeners.first().map_or(NODE_PORT, |l| l.addr.port())
    }
}

impl Transport for SimTransport {
    type Output = Box<dyn ByteStream>;
    type Error = io::Error;
    type ListenerUpgrade = futures::future::Ready<Result<Self::Output, io::Error>>;
    type Dial = BoxFuture<'static, Result<Self::Output, io::Error>>;

    fn listen_on(&mut self, id: ListenerId, addr: Multiaddr) -> Result<(), TransportError<io::Error>> {
        let Some(requested) = parse(&addr) else { return Err(TransportError::MultiaddrNotSupported(addr)) };
        let ip = if requested.ip().is_unspecified() { self.host.ip } else { *requested.ip() };
        if ip != self.host.ip {
            return Err(TransportError::Other(io::Error::from(io::ErrorKind::AddrNotAvailable)));
        }
        let (tx, incoming) = mpsc::channel(BACKLOG);
        let bound = {
            let mut shared = self.net.shared.lock().expect("net lock");
            let port = match requested.port() {
                0 => {
                    let next = shared.next_port.entry(ip).or_insert(FIRST_EPHEMERAL_PORT);
                    *next += 1;
                    *next - 1
                }
                port => port,
            };
            let bound = SocketAddrV4::new(ip, port);
            if shared.listeners.contains_key(&bound) {
                return Err(TransportError::Other(io::Error::from(io::ErrorKind::AddrInUse)));
            }
            shared.listeners.insert(bound, (tx, self.host.nat.is_some()));
            bound
        };
        self.listeners.push(Listener { id, addr: bound, incoming });
        self.events.push_back(TransportEvent::NewAddress { listener_id: id, listen_addr: multiaddr(bound) });
        self.wake();
        Ok(())
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        let Some(at) = self.listeners.iter().position(|l| l.id == id) else { return false };
        let listener = self.listeners.remove(at);
        self.net.shared.lock().expect("net lock").listeners.remove(&listener.addr);
        self.events.push_back(TransportEvent::ListenerClosed { listener_id: id, reason: Ok(()) });
        self.wake();
        true
    }

    fn dial(&mut self, addr: Multiaddr, _opts: DialOpts) -> Result<Self::Dial, TransportError<io::Error>> {
        let Some(to) = parse(&addr) else { return Err(TransportError::MultiaddrNotSupported(addr)) };
        let net = self.net.clone();
        let from = self.host.source(self.listen_port());
        let own_ip = self.host.ip;
        let latency = net.latency(*from.ip(), *to.ip());
        let (sent, dials) = (self.sent.clone(), self.dials.clone());
        Ok(async move {
            tokio::time::sleep(latency).await;
            let peer_sent = {
                let shared = net.shared.lock().expect("net lock");
                let reachable = |(listener, natted): &(mpsc::Sender<Accepted>, bool)| (!natted || *to.ip() == own_ip).then(|| listener.clone());
                shared.listeners.get(&to).and_then(reachable).map(|l| (l, shared.sent.get(to.ip()).cloned().unwrap_or_default()))
            };
            if let Some((listener, peer_sent)) = peer_sent {
                let (ours, theirs) = Pipe::pair(latency, sent, peer_sent);
                if listener.try_send(Accepted { stream: theirs, from }).is_ok() {
                    dials.fetch_add(1, Ordering::Relaxed);
                    return Ok(Box::new(ours) as Box<dyn ByteStream>);
                }
            }
            tokio::time::sleep(DIAL_TIMEOUT.saturating_sub(latency)).await;
            Err(io::Error::from(io::ErrorKind::TimedOut))
        }
        .boxed())
    }

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<TransportEvent<Self::ListenerUpgrade, io::Error>> {
        let this = self.get_mut();
        if let Some(event) = this.events.pop_front() {
            return Poll::Ready(event);
        }
        for listener in &mut this.listeners {
            if let Poll::Ready(Some(accepted)) = listener.incoming.poll_recv(cx) {
                return Poll::Ready(TransportEvent::Incoming {
                    listener_id: listener.id,
                    upgrade: futures::future::ready(Ok(Box::new(accepted.stream) as Box<dyn ByteStream>)),
                    local_addr: multiaddr(listener.addr),
                    send_back_addr: multiaddr(accepted.from),
                });
            }
        }
        this.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// A node that stops closes its listeners: its addresses become absent hosts, and free for the
/// node when it comes back.
impl Drop for SimTransport {
    fn drop(&mut self) {
        let mut shared = self.net.shared.lock().expect("net lock");
        for listener in &self.listeners {
            shared.listeners.remove(&listener.addr);
        }
    }
}

/// One direction of a stream: chunks with the time they may be read.
#[derive(Default)]
struct Direction {
    chunks: VecDeque<(Instant, Vec<u8>, usize)>,
    buffered: usize,
    write_closed: bool,
    reader_gone: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

/// One end of a stream between two hosts.
pub struct Pipe {
    tx: Arc<Mutex<Direction>>,
    rx: Arc<Mutex<Direction>>,
    latency: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    sent: Arc<AtomicU64>,
}

impl Pipe {
    fn pair(latency: Duration, a_sent: Arc<AtomicU64>, b_sent: Arc<AtomicU64>) -> (Pipe, Pipe) {
        let (ab, ba) = (Arc::new(Mutex::new(Direction::default())), Arc::new(Mutex::new(Direction::default())));
        let a = Pipe { tx: ab.clone(), rx: ba.clone(), latency, timer: None, sent: a_sent };
        let b = Pipe { tx: ba, rx: ab, latency, timer: None, sent: b_sent };
        (a, b)
    }
}

impl AsyncRead for Pipe {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            let due = {
                let mut rx = this.rx.lock().expect("pipe lock");
                let rx = &mut *rx;
                match rx.chunks.front_mut() {
                    Some((at, chunk, offset)) if *at <= Instant::now() => {
                        let n = buf.len().min(chunk.len() - *offset);
                        buf[..n].copy_from_slice(&chunk[*offset..*offset + n]);
                        *offset += n;
                        if *offset == chunk.len() {
                            rx.chunks.pop_front();
                        }
                        rx.buffered -= n;
                        if let Some(writer) = rx.writer.take() {
                            writer.wake();
                        }
                        return Poll::Ready(Ok(n));
                    }
                    Some((at, _, _)) => *at,
                    None if rx.write_closed => return Poll::Ready(Ok(0)),
                    None => {
                        rx.reader = Some(cx.waker().clone());
                        return Poll::Pending;
                    }
                }
            };
            let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
            if timer.deadline() != due {
                timer.as_mut().reset(due);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

impl AsyncWrite for Pipe {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut tx = this.tx.lock().expect("pipe lock");
        if tx.reader_gone || tx.write_closed {
            return Poll::Ready(Err(io::Error::from(io::ErrorKind::BrokenPipe)));
        }
        if tx.buffered >= STREAM_BUFFER {
            tx.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf.len().min(STREAM_BUFFER - tx.buffered);
        tx.chunks.push_back((Instant::now() + this.latency, buf[..n].to_vec(), 0));
        tx.buffered += n;
        this.sent.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(reader) = tx.reader.take() {
            reader.wake();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        close(&self.tx);
        Poll::Ready(Ok(()))
    }
}

fn close(tx: &Mutex<Direction>) {
    let mut tx = tx.lock().expect("pipe lock");
    tx.write_closed = true;
    if let Some(reader) = tx.reader.take() {
        reader.wake();
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        close(&self.tx);
        let mut rx = self.rx.lock().expect("pipe lock");
        rx.reader_gone = true;
        rx.chunks.clear();
        rx.buffered = 0;
        if let Some(writer) = rx.writer.take() {
            writer.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};

    fn addr(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_cross_after_the_link_latency_and_end_with_the_writer() {
        let net = Net::new(Duration::from_millis(20));
        let a = Host { ip: "198.18.0.1".parse().unwrap(), nat: None };
        let b = Host { ip: "198.18.0.2".parse().unwrap(), nat: None };
        let mut listener = net.transport(b);
        listener.listen_on(ListenerId::next(), addr("/ip4/0.0.0.0/tcp/4001")).unwrap();
        let mut events = futures::stream::poll_fn(|cx| Pin::new(&mut listener).poll(cx).map(Some));
        let Some(TransportEvent::NewAddress { listen_addr, .. }) = events.next().await else { panic!("no listen address") };
        assert_eq!(listen_addr, addr("/ip4/198.18.0.2/tcp/4001"));
        let mut dialer = net.transport(a);
        let dial = dialer.dial(addr("/ip4/198.18.0.2/tcp/4001"), dial_opts()).unwrap();
        let started = Instant::now();
        let mut ours = dial.await.unwrap();
        let latency = net.latency(a.ip, b.ip);
        assert_close(started.elapsed(), latency);
        let event = events.next().await.unwrap();
        let TransportEvent::Incoming { upgrade, send_back_addr, .. } = event else { panic!("not incoming") };
        assert_eq!(send_back_addr, addr("/ip4/198.18.0.1/tcp/4001"));
        let mut theirs = upgrade.await.unwrap();
        let sent_at = Instant::now();
        ours.write_all(b"hello").await.unwrap();
        ours.close().await.unwrap();
        let mut got = Vec::new();
        theirs.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.as_slice(), &b"hello"[..]);
        assert_close(sent_at.elapsed(), latency);
    }

    #[tokio::test(start_paused = true)]
    async fn a_host_behind_a_nat_is_seen_at_its_nat_and_cannot_be_dialed() {
        let net = Net::new(Duration::from_millis(20));
        let public = Host { ip: "198.18.0.1".parse().unwrap(), nat: None };
        let natted = Host { ip: "10.0.0.2".parse().unwrap(), nat: Some("198.19.0.2".parse().unwrap()) };
        let mut server = net.transport(public);
        server.listen_on(ListenerId::next(), addr("/ip4/0.0.0.0/tcp/4001")).unwrap();
        let mut client = net.transport(natted);
        client.listen_on(ListenerId::next(), addr("/ip4/0.0.0.0/tcp/4001")).unwrap();
        let _stream = client.dial(addr("/ip4/198.18.0.1/tcp/4001"), dial_opts()).unwrap().await.unwrap();
        let mut events = futures::stream::poll_fn(|cx| Pin::new(&mut server).poll(cx).map(Some));
        let from = loop {
            if let Some(TransportEvent::Incoming { send_back_addr, .. }) = events.next().await {
                break send_back_addr;
            }
        };
        assert_eq!(from, addr("/ip4/198.19.0.2/tcp/4001"));
        let started = Instant::now();
        for target in ["/ip4/198.19.0.2/tcp/4001", "/ip4/10.0.0.2/tcp/4001"] {
            let err = net.transport(public).dial(addr(target), dial_opts()).unwrap().await.err().expect("refused");
            assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        }
        assert_close(started.elapsed(), 2 * DIAL_TIMEOUT);
    }

    /// Equal within the timer's millisecond granularity (a sleep ends on the next whole ms).
    fn assert_close(got: Duration, want: Duration) {
        assert!(got >= want && got <= want + Duration::from_millis(3), "{got:?} is not {want:?}");
    }

    fn dial_opts() -> DialOpts {
        DialOpts { role: libp2p::core::Endpoint::Dialer, port_use: libp2p::core::transport::PortUse::Reuse }
    }
}
