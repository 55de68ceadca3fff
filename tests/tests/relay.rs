//! Relays between real `warren` processes on loopback: reaching a peer that has no direct
//! address through a volunteer relay, automatic relay choice, and the relay's limits.

mod common;

use std::time::Duration;

use common::echo::{Close, echo_service, echo_transfer, expose, forward, forward_info, hold_then_echo};
use common::{Node, wait_until};
use serde_json::Value;

/// A volunteer relay that serves without a confirmed public address (loopback), also a DHT
/// server so others can find each other through it.
fn relay(extra: &[&str]) -> Node {
    let mut args = vec!["--relay-force", "--dht-mode", "server"];
    args.extend(extra);
    Node::start(&args)
}

/// A node with no direct listen address, reachable only through `via`.
fn behind(via: &Node) -> Node {
    let addr = via.quic_addr();
    Node::start(&["--no-listen", "--relay-via", &addr, "--bootstrap", &addr, "--auto-relays", "0", "--dht-mode", "client"])
}

/// Three nodes on loopback: a relay R started with `relay_args` and the `[relay_limits]` TOML
/// `limits`, and B and A reachable only through it; B has a reservation and A can find it.
struct Trio {
    r: Node,
    b: Node,
    a: Node,
    _config: tempfile::TempDir,
}

/// A relay started with `config` (TOML) as its config file, plus `args`; keep the TempDir.
fn configured_relay(config: &str, args: &[&str]) -> (tempfile::TempDir, Node) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.toml");
    std::fs::write(&file, config).unwrap();
    let mut all = vec!["--config", file.to_str().unwrap()];
    all.extend(args);
    let relay = relay(&all);
    (dir, relay)
}

fn trio(relay_args: &[&str], limits: &str) -> Trio {
    let (config, r) = configured_relay(&format!("[relay_limits]\n{limits}"), relay_args);
    let b = behind(&r);
    let a = behind(&r);
    wait_until(Duration::from_secs(20), "B's reservation on R", || reserved_on(&b, &r));
    // A knows nothing of B but its PeerId: the DHT (through R) gives B's relayed address, once
    // B has published it.
    wait_until(Duration::from_secs(10), "A finds B's relayed address in the DHT", || a.finds(&b.peer_id));
    Trio { r, b, a, _config: config }
}

impl Trio {
    /// B exposes an echo service to A; A forwards a local port to it. Returns the local address.
    async fn echo_forward(&self) -> std::net::SocketAddr {
        expose(&self.b, "echo", &echo_service().await.to_string(), &[&self.a.peer_id]);
        forward(&self.a, &format!("{}/echo", self.b.peer_id))
    }
}

fn reserved_on(node: &Node, relay: &Node) -> bool {
    node.status()["relayed_through"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h["relay"] == relay.peer_id.as_str() && h["accepted"] == true)
}

fn connections_to(node: &Node, peer: &str) -> Vec<Value> {
    let peers = node.json(&["peers"]).unwrap();
    peers
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["peer_id"] == peer)
        .flat_map(|p| p["connections"].as_array().unwrap().clone())
        .collect()
}

/// A free loopback port (bound and released: another process could take it in between, which
/// on a test machine does not happen in practice).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// GET /metrics from a node's `--metrics` address.
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint answers");
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

/// The value of one sample line (`name{labels} value`) in Prometheus text.
fn sample(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {line_start} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_with_no_direct_address_is_reached_by_peer_id_through_a_relay() {
    let metrics_port = free_port();
    let trio = trio(&["--metrics", &format!("127.0.0.1:{metrics_port}")], "");
    let (r, b, a) = (&trio.r, &trio.b, &trio.a);
    let ping = a.json(&["ping", &b.peer_id, "--count", "2"]).expect("A pings B by PeerId alone");
    assert_eq!(ping["rtts_ms"].as_array().unwrap().len(), 2);

    let bind = trio.echo_forward().await;
    let (sent, echoed) = echo_transfer(bind, 10 * 1024 * 1024, 3).await;
    assert_eq!(sent, echoed, "10 MB through the relay, SHA-256 equal");

    let conns = connections_to(a, &b.peer_id);
    assert!(!conns.is_empty(), "A is connected to B");
    assert!(conns.iter().all(|c| c["path"] == "relayed"), "{conns:?}");
    assert_eq!(forward_info(a, bind)["path"], "relayed");
    let status = r.status();
    assert!(status["relay"]["circuits_accepted"].as_u64().unwrap() >= 1, "{status}");
    // Every relayed byte is counted: 10 MB each way went through R.
    let relayed = status["relay"]["relayed_bytes"].as_u64().unwrap();
    assert!(relayed >= 20 * 1024 * 1024, "relayed bytes counted: {relayed}");
    let metrics = scrape(metrics_port);
    assert!(sample(&metrics, "warren_relayed_bytes_total") >= 20.0 * 1024.0 * 1024.0);
    assert!(sample(&metrics, "warren_relay_circuit_requests_total{outcome=\"accepted\"}") >= 1.0);
    assert!(sample(&metrics, "warren_relay_reservations ") >= 2.0, "A and B hold reservations");
}

/// More long-lived connections through a relay than one circuit carries (384 forward streams,
/// under yamux's 512): the rest go over a further circuit, dialed for them. Before, they waited
/// for one of the first 384 to close, which long-lived connections never do.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_lived_connections_beyond_what_one_circuit_carries_go_over_another() {
    const HELD: usize = 500;
    let trio = trio(&[], "");
    let bind = trio.echo_forward().await;
    assert_eq!(hold_then_echo(bind, HELD, Close::AllAtTheEnd).await, HELD, "every held connection echoed intact through the relay");
    let conns = connections_to(&trio.a, &trio.b.peer_id);
    assert!(conns.len() >= 2, "a further connection carried the rest: {conns:?}");
    assert!(conns.iter().all(|c| c["path"] == "relayed"), "{conns:?}");
    assert_eq!(forward_info(&trio.a, bind)["failed"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_circuit_cut_by_the_relay_byte_limit_is_counted_and_the_connection_resumes_on_a_new_one() {
    let trio = trio(&[], "max_circuit_bytes = 1048576\n");
    let (r, a) = (&trio.r, &trio.a);
    let bind = trio.echo_forward().await;

    // 4 MiB each way cannot fit in a 1 MiB circuit: the relay cuts it, and the forwarded
    // connection (a session) resumes on a new circuit each time, so the transfer completes
    // intact. Each circuit still holds to the limit: the relay cut several.
    let (sent, echoed) = echo_transfer(bind, 4 * 1024 * 1024, 1).await;
    assert_eq!(sent, echoed);
    wait_until(Duration::from_secs(10), "the relay's record of the cuts", || {
        r.status()["relay"]["circuits_cut"].as_u64().unwrap() >= 2
    });
    let accepted = r.status()["relay"]["circuits_accepted"].as_u64().unwrap();
    assert!(accepted >= 3, "each cut was followed by a new circuit: {accepted} accepted");
    assert!(forward_info(a, bind)["last_error"].is_null(), "nothing failed for the user: {}", forward_info(a, bind));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_caps_its_aggregate_bandwidth() {
    let trio = trio(&[], "max_relayed_bytes_per_sec = 1048576\n");
    let r = &trio.r;
    let bind = trio.echo_forward().await;
    // 3 MiB each way is 6 MiB through the relay; at 1 MiB/s with a one-second burst that cannot
    // take less than 5 s, however fast the machine.
    let started = std::time::Instant::now();
    let (sent, echoed) = echo_transfer(bind, 3 * 1024 * 1024, 5).await;
    let took = started.elapsed();
    assert_eq!(sent, echoed);
    let relayed = r.status()["relay"]["relayed_bytes"].as_u64().unwrap();
    eprintln!("6 MiB through a 1 MiB/s relay took {took:?} ({relayed} bytes counted)");
    assert!(relayed >= 6 * 1024 * 1024, "{relayed}");
    assert!(took >= Duration::from_secs(4), "the cap held the transfer to about 1 MiB/s: {took:?}");
}

#[test]
fn automatic_relay_use_holds_two_reservations_and_replaces_a_lost_relay() {
    let mut relays: Vec<Node> = (0..3).map(|_| relay(&["--public-ranges", "127.0.0.0/8"])).collect();
    let mut args = vec!["--no-listen", "--dht-mode", "client", "--public-ranges", "127.0.0.0/8"];
    let addrs: Vec<String> = relays.iter().map(|r| r.quic_addr()).collect();
    for addr in &addrs {
        args.extend(["--bootstrap", addr]);
    }
    let b = Node::start(&args);
    let held = |b: &Node| -> Vec<String> {
        b.status()["relayed_through"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h["accepted"] == true)
            .map(|h| h["relay"].as_str().unwrap().to_string())
            .collect()
    };
    wait_until(Duration::from_secs(20), "two reservations", || held(&b).len() == 2);
    // Stays at two: the default target.
    let before = held(&b);
    assert_eq!(before.len(), 2);

    let lost = relays.iter().position(|r| before.contains(&r.peer_id)).unwrap();
    let spare = relays.iter().find(|r| !before.contains(&r.peer_id)).unwrap().peer_id.clone();
    relays[lost].kill9();
    let killed_at = std::time::Instant::now();
    // A killed relay sends nothing: it is noticed by QUIC's idle timeout (10 s) at the latest.
    wait_until(Duration::from_secs(25), "a reservation on the third relay", || {
        let now = held(&b);
        now.len() == 2 && now.contains(&spare)
    });
    eprintln!("replaced a lost relay in {:?}", killed_at.elapsed());
}

#[test]
fn relay_limits_deny_with_the_relay_status_code_and_serve_allowed_peers() {
    let (_config, r) = configured_relay(
        "[relay_limits]\nmax_reservations_per_ip = 3\nmax_reservations_per_peer = 1\nmax_circuits_per_peer = 1\n",
        &[],
    );
    let b = behind(&r);
    let c = behind(&r);
    wait_until(Duration::from_secs(20), "B and C reserved", || reserved_on(&b, &r) && reserved_on(&c, &r));
    // One peer asking for a second reservation (over a second connection) is over the per-peer
    // cap of 1: denied, while its first reservation holds.
    let key = libp2p::identity::Keypair::generate_ed25519();
    let relay_addr: libp2p::Multiaddr = r.quic_addr().parse().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (first, _first_swarm) = runtime.block_on(reserve_as(key.clone(), relay_addr.clone()));
    let (second, _second_swarm) = runtime.block_on(reserve_as(key.clone(), relay_addr.clone()));
    assert!(first && !second, "one reservation per peer: first {first}, second {second}");
    let denial = format!("{}: ResourceLimitExceeded", key.public().to_peer_id());
    wait_until(Duration::from_secs(5), "the relay's record of the denial", || {
        r.status()["relay"]["last_denial"].as_str().is_some_and(|d| d.contains(&denial))
    });
    drop(_second_swarm);

    // A fourth peer from the same IP (B, C and the first one hold reservations) is over the
    // per-IP cap: denied with RESOURCE_LIMIT_EXCEEDED.
    let d = behind(&r);
    wait_until(Duration::from_secs(20), "D's reservation denied", || {
        d.status()["relay_last_error"].as_str().is_some_and(|e| e.contains("resource limit exceeded"))
    });
    let status = r.status();
    assert!(status["relay"]["reservations_denied"].as_u64().unwrap() >= 1, "{status}");
    assert!(status["relay"]["last_denial"].as_str().unwrap().contains("ResourceLimitExceeded"), "{status}");
    drop(d);

    // A holder that leaves frees its place at once (it used to stay taken for an hour): once
    // the first peer is gone, a new peer from the same IP gets a reservation.
    drop(_first_swarm);
    let mut swarms = Vec::new();
    wait_until(Duration::from_secs(20), "a new peer reserved in the place the first one left", || {
        let (reserved, swarm) = runtime.block_on(reserve_as(libp2p::identity::Keypair::generate_ed25519(), relay_addr.clone()));
        swarms.push(swarm);
        reserved
    });

    // A (no direct address either, so no hole punching replaces the circuit) opens one circuit
    // to B; a second circuit from A (to C) is over the per-peer circuit cap.
    let a = Node::start(&["--no-listen", "--bootstrap", &r.quic_addr(), "--auto-relays", "0", "--dht-mode", "client"]);
    wait_until(Duration::from_secs(10), "A finds B and C", || a.finds(&b.peer_id) && a.finds(&c.peer_id));
    assert!(a.json(&["ping", &b.peer_id, "--count", "1"]).is_some(), "A reaches B through R");
    let refused = a.cli(&["ping", &c.peer_id, "--count", "1"]);
    assert!(!refused.status.success(), "a second circuit from A is over the cap");
    let status = r.status();
    assert!(status["relay"]["circuits_denied"].as_u64().unwrap() >= 1, "{status}");
    assert!(status["relay"]["last_denial"].as_str().unwrap().contains("ResourceLimitExceeded"), "{status}");
    // B, allowed, still gets served: its reservation holds and it can be reached.
    assert!(reserved_on(&b, &r));
}


/// One throwaway identity asking the relay for a reservation: whether it got one, and the swarm
/// (kept alive by the caller so a granted reservation keeps counting).
async fn try_reservation(relay: libp2p::Multiaddr) -> (bool, Running) {
    reserve_as(libp2p::identity::Keypair::generate_ed25519(), relay).await
}

/// A reservation request from `key`'s identity over a connection of its own. The swarm keeps
/// running (so a granted reservation keeps counting) until the returned guard is dropped.
async fn reserve_as(key: libp2p::identity::Keypair, relay: libp2p::Multiaddr) -> (bool, Running) {
    use futures::StreamExt;
    use libp2p::swarm::SwarmEvent;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_quic()
            .with_relay_client(libp2p::noise::Config::new, libp2p::yamux::Config::default)
            .unwrap()
            .with_behaviour(|_, relay| relay)
            .unwrap()
            .build();
        swarm.listen_on(relay.with(libp2p::multiaddr::Protocol::P2pCircuit)).unwrap();
        let mut tx = Some(tx);
        loop {
            let granted = match swarm.select_next_some().await {
                SwarmEvent::NewListenAddr { .. } => true,
                SwarmEvent::ListenerClosed { .. } => false,
                _ => continue,
            };
            if let Some(tx) = tx.take() {
                let _ = tx.send(granted);
            }
        }
    });
    let granted = tokio::time::timeout(Duration::from_secs(20), rx).await.ok().and_then(Result::ok).unwrap_or(false);
    (granted, Running(task))
}

/// Stops a background swarm when dropped.
struct Running(tokio::task::JoinHandle<()>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_reservations_leaves_the_relay_bounded_and_allowed_peers_served() {
    // Every flooder comes from 127.0.0.1: lift the per-IP cap so the total cap is what holds.
    // Connections are capped too (each costs memory whatever it asks for).
    let (_config, r) = configured_relay(
        "max_incoming_connections = 160\n[relay_limits]\nmax_reservations = 64\nmax_reservations_per_ip = \"unlimited\"\n",
        &[],
    );
    let b = behind(&r);
    wait_until(Duration::from_secs(20), "B's reservation on R", || reserved_on(&b, &r));
    // A is connected to R before the flood (a flood may fill the connection cap).
    let a = Node::start(&["--no-listen", "--bootstrap", &r.quic_addr(), "--auto-relays", "0", "--dht-mode", "client"]);
    wait_until(Duration::from_secs(10), "A finds B", || a.finds(&b.peer_id));
    let before = common::rss_kib(r.pid());

    let relay_addr: libp2p::Multiaddr = r.quic_addr().parse().unwrap();
    let mut granted = 0;
    let mut flooders = Vec::new();
    for wave in 0..4 {
        let attempts: Vec<_> = (0..100).map(|_| tokio::spawn(try_reservation(relay_addr.clone()))).collect();
        for attempt in attempts {
            let (ok, swarm) = attempt.await.unwrap();
            granted += usize::from(ok);
            flooders.push(swarm);
        }
        eprintln!("after wave {wave}: {granted} granted, relay RSS {} KiB", common::rss_kib(r.pid()));
    }
    let status = r.status();
    let relay = &status["relay"];
    eprintln!("relay after 400 reservation attempts: {relay}");
    assert!(granted <= 63, "at most the total cap (64, B holds one) is granted: {granted}");
    // Flooders beyond the connection cap are refused before they can even ask.
    assert!(relay["reservations"].as_u64().unwrap() <= 64, "{relay}");
    let after = common::rss_kib(r.pid());
    // 160 connections at a few hundred KiB each, whatever the flood does.
    assert!(after < before + 96 * 1024, "relay memory bounded: {before} KiB -> {after} KiB");

    // B, allowed and reserved before the flood, is still reachable through R, flood ongoing.
    assert!(reserved_on(&b, &r));
    let ping = a.cli(&["ping", &b.peer_id, "--count", "1"]);
    assert!(ping.status.success(), "A reaches B through R during the flood: {}", String::from_utf8_lossy(&ping.stderr));
    drop(flooders);
}

/// The relay-cap bypass: a client whose hop stream first proposes a long bogus protocol (the
/// relay answers `na`), then the hop protocol. Only the first stream of this kind is rewritten:
/// `Bypass` wraps the client's muxer, and its outbound substreams insert the bogus proposal
/// before a hop proposal and hide the relay's `na` from the client's own negotiation.
mod bypass {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use futures::{AsyncRead, AsyncWrite};
    use libp2p::core::muxing::{StreamMuxer, StreamMuxerEvent};

    const HEADER: &[u8] = b"/multistream/1.0.0\n";
    const HOP: &[u8] = b"/libp2p/circuit/relay/0.2.0/hop\n";
    const NA: &[u8] = b"na\n";

    /// Set once the relay answered `na` to a bogus proposal placed before the hop protocol: the
    /// bypass really was attempted.
    pub static NA_HIDDEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    /// A multistream-select message: unsigned-varint length, then the body.
    fn message(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut len = body.len();
        loop {
            let byte = (len & 0x7f) as u8;
            len >>= 7;
            if len == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
        out.extend_from_slice(body);
        out
    }

    /// The first whole message in `bytes` (one-byte lengths: all the relay sends here).
    fn first(bytes: &[u8]) -> Option<(&[u8], usize)> {
        let len = usize::from(*bytes.first()?);
        (len < 0x80).then_some(())?;
        Some((bytes.get(1..1 + len)?, 1 + len))
    }

    pub struct Muxer<M>(pub M);

    impl<M: StreamMuxer + Unpin> StreamMuxer for Muxer<M>
    where
        M::Substream: Unpin,
    {
        type Substream = Rewrite<M::Substream>;
        type Error = M::Error;

        fn poll_inbound(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Self::Substream, Self::Error>> {
            Pin::new(&mut self.get_mut().0).poll_inbound(cx).map_ok(|s| Rewrite::new(s, false))
        }
        fn poll_outbound(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Self::Substream, Self::Error>> {
            Pin::new(&mut self.get_mut().0).poll_outbound(cx).map_ok(|s| Rewrite::new(s, true))
        }
        fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Pin::new(&mut self.get_mut().0).poll_close(cx)
        }
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<StreamMuxerEvent, Self::Error>> {
            Pin::new(&mut self.get_mut().0).poll(cx)
        }
    }

    pub struct Rewrite<S> {
        inner: S,
        /// Still collecting the client's header and first proposal.
        watching: bool,
        written: Vec<u8>,
        /// Bytes for the inner stream, not yet accepted by it.
        out: Vec<u8>,
        /// A bogus proposal went out: the relay's first `na` after its header is dropped.
        strip_na: bool,
        read: Vec<u8>,
    }

    impl<S> Rewrite<S> {
        fn new(inner: S, outbound: bool) -> Self {
            Self { inner, watching: outbound, written: Vec::new(), out: Vec::new(), strip_na: false, read: Vec::new() }
        }
    }

    impl<S: AsyncWrite + Unpin> Rewrite<S> {
        fn drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            while !self.out.is_empty() {
                let n = futures::ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out))?;
                self.out.drain(..n);
            }
            Poll::Ready(Ok(()))
        }
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for Rewrite<S> {
        fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            let this = self.get_mut();
            futures::ready!(this.drain(cx))?;
            if !this.watching {
                return Pin::new(&mut this.inner).poll_write(cx, buf);
            }
            this.written.extend_from_slice(buf);
            let Some((header, at)) = first(&this.written) else { return Poll::Ready(Ok(buf.len())) };
            let Some((proposal, len)) = first(&this.written[at..]) else { return Poll::Ready(Ok(buf.len())) };
            this.watching = false;
            let mut out = message(header);
            if proposal == HOP {
                let bogus = format!("/{}\n", "x".repeat(300));
                out.extend(message(bogus.as_bytes()));
                this.strip_na = true;
            }
            out.extend(message(proposal));
            out.extend_from_slice(&this.written[at + len..]);
            this.out = out;
            let _ = this.drain(cx)?;
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            let this = self.get_mut();
            futures::ready!(this.drain(cx))?;
            Pin::new(&mut this.inner).poll_flush(cx)
        }
        fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            let this = self.get_mut();
            futures::ready!(this.drain(cx))?;
            Pin::new(&mut this.inner).poll_close(cx)
        }
    }

    impl<S: AsyncRead + Unpin> AsyncRead for Rewrite<S> {
        fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<std::io::Result<usize>> {
            let this = self.get_mut();
            while this.strip_na {
                // Collect the relay's header and the message after it, then drop that one if `na`.
                if let Some((header, at)) = first(&this.read)
                    && let Some((answer, len)) = first(&this.read[at..])
                {
                    assert_eq!(header, HEADER);
                    if answer == NA {
                        this.read.drain(at..at + len);
                        NA_HIDDEN.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    this.strip_na = false;
                    break;
                }
                let mut chunk = [0u8; 256];
                let n = futures::ready!(Pin::new(&mut this.inner).poll_read(cx, &mut chunk))?;
                if n == 0 {
                    this.strip_na = false;
                    break;
                }
                this.read.extend_from_slice(&chunk[..n]);
            }
            if !this.read.is_empty() {
                let n = this.read.len().min(buf.len());
                buf[..n].copy_from_slice(&this.read[..n]);
                this.read.drain(..n);
                return Poll::Ready(Ok(n));
            }
            Pin::new(&mut this.inner).poll_read(cx, buf)
        }
    }
}

#[derive(libp2p::swarm::NetworkBehaviour)]
#[behaviour(prelude = "libp2p::swarm::derive_prelude")]
struct BypassClient {
    relay: libp2p::relay::client::Behaviour,
    stream: libp2p_stream::Behaviour,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_hiding_the_hop_protocol_behind_a_bogus_proposal_is_still_metered_and_capped() {
    use futures::{AsyncReadExt as _, AsyncWriteExt as _, StreamExt as _};
    use libp2p::core::{muxing::StreamMuxerBox, upgrade};
    use libp2p::Transport as _;
    let (_config, r) = configured_relay("[relay_limits]\nmax_relayed_bytes_per_sec = 1048576\n", &[]);
    let d = behind(&r);
    wait_until(Duration::from_secs(20), "D's reservation on R", || reserved_on(&d, &r));

    let key = libp2p::identity::Keypair::generate_ed25519();
    let s_id = key.public().to_peer_id();
    expose(&d, "echo", &echo_service().await.to_string(), &[&s_id.to_string()]);
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|key| {
            libp2p::tcp::tokio::Transport::new(libp2p::tcp::Config::default())
                .upgrade(upgrade::Version::V1)
                .authenticate(libp2p::noise::Config::new(key).unwrap())
                .multiplex(libp2p::yamux::Config::default())
                .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(bypass::Muxer(muxer))))
        })
        .unwrap()
        .with_relay_client(libp2p::noise::Config::new, libp2p::yamux::Config::default)
        .unwrap()
        .with_behaviour(|_, relay| BypassClient { relay, stream: libp2p_stream::Behaviour::new() })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    let r_tcp = r.status()["listen_addrs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .find(|a| a.contains("/tcp/"))
        .expect("the relay listens on TCP");
    let d_id: libp2p::PeerId = d.peer_id.parse().unwrap();
    let circuit: libp2p::Multiaddr = format!("{r_tcp}/p2p/{}/p2p-circuit/p2p/{d_id}", r.peer_id).parse().unwrap();
    let mut control = swarm.behaviour().stream.new_control();
    swarm.dial(circuit).unwrap();
    let connected = async {
        loop {
            match swarm.select_next_some().await {
                libp2p::swarm::SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == d_id => break,
                libp2p::swarm::SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. } if peer == d_id => {
                    panic!("the circuit to D failed: {error}")
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), connected).await.expect("a circuit to D through R");
    let driver = tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });

    let open = control.open_stream(d_id, libp2p::StreamProtocol::new(warren_forward::PROTOCOL));
    let stream = tokio::time::timeout(Duration::from_secs(20), open).await.expect("a stream through the circuit").unwrap();
    let (mut rd, mut wr) = stream.split();
    warren_forward::write_request(&mut wr, &warren_forward::Request::new("echo", warren_forward::Transport::Tcp)).await.unwrap();
    assert_eq!(warren_forward::read_reply(&mut rd).await.unwrap().status, warren_forward::Status::Accepted);
    // 2 MiB out and echoed back: 4 MiB through a relay capped at 1 MiB/s.
    const EACH_WAY: usize = 2 * 1024 * 1024;
    let started = std::time::Instant::now();
    let reader = tokio::spawn(async move {
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        while got < EACH_WAY {
            let mut header = [0u8; warren_forward::CHUNK_HEADER];
            rd.read_exact(&mut header).await.unwrap();
            let warren_forward::Chunk::Data(n) = warren_forward::Chunk::decode(header).unwrap() else { break };
            let mut left = n;
            while left > 0 {
                let take = left.min(buf.len());
                rd.read_exact(&mut buf[..take]).await.unwrap();
                left -= take;
            }
            got += n;
        }
        got
    });
    let chunk = vec![0xA5u8; 32 * 1024];
    for _ in 0..EACH_WAY / chunk.len() {
        wr.write_all(&warren_forward::Chunk::Data(chunk.len()).encode()).await.unwrap();
        wr.write_all(&chunk).await.unwrap();
    }
    wr.flush().await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(60), reader).await.expect("the echo came back").unwrap();
    let took = started.elapsed();
    driver.abort();
    let relayed = r.status()["relay"]["relayed_bytes"].as_u64().unwrap();
    eprintln!("bypass attempt: 4 MiB through a 1 MiB/s relay took {took:?}; the relay counted {relayed} bytes");
    assert_eq!(echoed, EACH_WAY);
    assert!(bypass::NA_HIDDEN.load(std::sync::atomic::Ordering::Relaxed), "the hop stream went through a bogus proposal first");
    // Before, the bogus proposal pushed the hop id past the meter's 128-byte window: nothing was
    // counted and the transfer ran at loopback speed.
    assert!(relayed >= 2 * EACH_WAY as u64, "the circuit's bytes are counted: {relayed}");
    assert!(took >= Duration::from_secs(2), "the cap held the transfer to about 1 MiB/s: {took:?}");
}

/// `warren ping` right after a relayed connection comes up: both nodes' liveness pings open ping
/// streams on a new connection too, and a rust-libp2p peer keeps only the newest inbound one, so
/// the user's stream could be dropped under it (about one fresh connection in five failed).
#[test]
fn ping_answers_on_a_fresh_relayed_connection() {
    let r = relay(&[]);
    let b = behind(&r);
    wait_until(Duration::from_secs(20), "B's reservation on R", || reserved_on(&b, &r));
    let dir = tempfile::tempdir().unwrap();
    for round in 0..16 {
        // A restarted A has no connection to B: the ping reaches B through R on a new one.
        let mut a = Node::start_in(dir.path(), &["--no-listen", "--bootstrap", &r.quic_addr(), "--auto-relays", "0", "--dht-mode", "client"]);
        wait_until(Duration::from_secs(10), "A finds B's relayed address", || a.finds(&b.peer_id));
        let ping = a.cli(&["ping", &b.peer_id, "-c", "1"]);
        assert!(ping.status.success(), "round {round}: {}", String::from_utf8_lossy(&ping.stderr));
        // As a user stops it (Ctrl-C): its circuits close rather than count against R's
        // per-peer circuit cap until R notices them dead.
        a.stop();
    }
    // A is connected to R when it dials B: one circuit per dial, not one per address of R
    // (QUIC and TCP) that B advertises.
    let relay = &r.status()["relay"];
    assert!(relay["circuits_accepted"].as_u64().unwrap() <= 16, "one circuit per relayed dial: {relay}");
}
