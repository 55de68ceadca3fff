//! The first few hops towards a public peer (a small traceroute), for `warren netcheck` to tell
//! a second NAT in front of our router: the router after ours answering from a carrier-grade or
//! private address.
//!
//! One UDP datagram per TTL goes to the peer's IP on traceroute's customary ports; each router
//! where a datagram's time runs out answers ICMP "time exceeded", the destination "port
//! unreachable". The answers are read from the socket's error queue (`IP_RECVERR`), which needs
//! no privilege, unlike a raw socket.

use std::io::IoSliceMut;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg, setsockopt, sockopt};

use crate::nat::Hop;

/// Hops traced: our router, a carrier NAT beyond it, and two more; a NAT further out than that
/// is inside the provider's network and changes nothing we can act on.
pub const MAX_HOPS: u8 = 4;
/// How long answers are awaited once the datagrams are out: routers answer within a round trip.
pub const WAIT: Duration = Duration::from_millis(1500);
/// Traceroute's customary base port: nothing listens there, so the destination answers "port
/// unreachable", which ends the trace.
const BASE_PORT: u16 = 33434;
/// `SO_EE_ORIGIN_ICMP` (linux/errqueue.h): the error came from an ICMP message.
const ORIGIN_ICMP: u8 = 2;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;

/// Most peers traced towards at once: a peer behind a NAT of its own drops datagrams to ports
/// it did not open, so its last hops stay silent; another peer's trace may be whole.
pub const MAX_TARGETS: usize = 3;

/// Traces towards each of `targets` (at most [`MAX_TARGETS`]) at once and keeps the most
/// complete trace: one that reached its peer, else the one with most hops answered.
pub fn trace_any(targets: &[Ipv4Addr], is_public: impl Fn(Ipv4Addr) -> bool + Send + Sync) -> std::io::Result<Vec<Hop>> {
    let traces: Vec<std::io::Result<Vec<Hop>>> = std::thread::scope(|scope| {
        let running: Vec<_> = targets.iter().take(MAX_TARGETS).map(|t| scope.spawn(|| trace(*t, &is_public))).collect();
        running.into_iter().map(|t| t.join().unwrap_or_else(|_| Err(std::io::Error::other("the trace panicked")))).collect()
    });
    let mut best: Option<Vec<Hop>> = None;
    let mut error = None;
    let score = |hops: &[Hop]| (hops.iter().any(|h| h.destination), hops.iter().filter(|h| h.addr.is_some()).count());
    for trace in traces {
        match trace {
            Ok(hops) if best.as_ref().is_none_or(|b| score(&hops) > score(b)) => best = Some(hops),
            Ok(_) => {}
            Err(e) => error = Some(e),
        }
    }
    match (best, error) {
        (Some(hops), _) => Ok(hops),
        (None, Some(e)) => Err(e),
        (None, None) => Ok(Vec::new()),
    }
}

/// Traces up to [`MAX_HOPS`] hops towards `target`, waiting at most [`WAIT`]; `is_public` says
/// which hop addresses are public. Blocking: run it off the async threads.
pub fn trace(target: Ipv4Addr, is_public: impl Fn(Ipv4Addr) -> bool) -> std::io::Result<Vec<Hop>> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    setsockopt(&socket, sockopt::Ipv4RecvErr, &true)?;
    for ttl in 1..=MAX_HOPS {
        socket.set_ttl(u32::from(ttl))?;
        // The answer to an earlier datagram is also the socket's pending error, which a send
        // reports instead of sending: then the send is made again (the error queue keeps the
        // answer). Each failed send consumes one pending error.
        let to = SocketAddrV4::new(target, BASE_PORT + u16::from(ttl));
        for _ in 0..=MAX_HOPS {
            if socket.send_to(&[ttl], to).is_ok() {
                break;
            }
        }
    }
    let mut hops: Vec<Hop> = (1..=MAX_HOPS).map(|ttl| Hop { ttl, addr: None, public: false, destination: false }).collect();
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let done = hops.iter().any(|h| h.destination && hops[..usize::from(h.ttl) - 1].iter().all(|e| e.addr.is_some()));
        if left.is_zero() || done {
            break;
        }
        let mut fds = [PollFd::new(socket.as_fd(), PollFlags::empty())];
        let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        if poll(&mut fds, timeout)? == 0 {
            break;
        }
        loop {
            match read_error(&socket)? {
                Queued::Empty => break,
                Queued::Other => {}
                Queued::Answer { ttl, from, destination } => {
                    if let Some(hop) = hops.get_mut(usize::from(ttl).wrapping_sub(1)) {
                        *hop = Hop { ttl, addr: Some(from), public: is_public(from), destination };
                    }
                }
            }
        }
    }
    // Nothing past the destination is a hop.
    if let Some(end) = hops.iter().position(|h| h.destination) {
        hops.truncate(end + 1);
    }
    Ok(hops)
}

/// What the socket's error queue held.
enum Queued {
    Empty,
    /// An error that is no answer to our datagrams.
    Other,
    /// The answer to the datagram sent with `ttl` (its one byte), from `from`, which is the
    /// destination itself when `destination`.
    Answer { ttl: u8, from: Ipv4Addr, destination: bool },
}

/// Takes one error from the socket's error queue.
fn read_error(socket: &UdpSocket) -> std::io::Result<Queued> {
    let mut payload = [0u8; 16];
    let mut iov = [IoSliceMut::new(&mut payload)];
    let mut control = nix::cmsg_space!(libc::sock_extended_err, libc::sockaddr_in);
    let msg = match recvmsg::<SockaddrIn>(socket.as_raw_fd(), &mut iov, Some(&mut control), MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT) {
        Ok(msg) => msg,
        Err(nix::errno::Errno::EAGAIN) => return Ok(Queued::Empty),
        Err(e) => return Err(e.into()),
    };
    let len = msg.bytes;
    let mut answer = None;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::Ipv4RecvErr(err, Some(offender)) = cmsg
            && err.ee_origin == ORIGIN_ICMP
            && matches!(err.ee_type, ICMP_TIME_EXCEEDED | ICMP_DEST_UNREACH)
        {
            let from = Ipv4Addr::from(u32::from_be(offender.sin_addr.s_addr));
            answer = Some((from, err.ee_type == ICMP_DEST_UNREACH));
        }
    }
    Ok(match (answer, len) {
        (Some((from, destination)), 1..) => Queued::Answer { ttl: payload[0], from, destination },
        _ => Queued::Other,
    })
}
