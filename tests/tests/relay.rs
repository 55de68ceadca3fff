//! Relays between real `warren` processes on loopback: reaching a peer that has no direct
//! address through a volunteer relay, automatic relay choice, and the relay's limits.

mod common;

use std::time::Duration;

use common::echo::{echo_service, echo_transfer, expose, forward, forward_info};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_circuit_cut_by_the_relay_byte_limit_is_reported_and_a_new_one_carries_on() {
    let trio = trio(&[], "max_circuit_bytes = 1048576\n");
    let (r, a) = (&trio.r, &trio.a);
    let bind = trio.echo_forward().await;

    // 4 MiB each way cannot fit in a 1 MiB circuit: the connection is cut, as a reset.
    let cut = tokio::spawn(echo_transfer(bind, 4 * 1024 * 1024, 1));
    assert!(cut.await.is_err(), "the transfer over the limit fails rather than completing");
    wait_until(Duration::from_secs(10), "the cut in `warren forwards`", || {
        forward_info(a, bind)["last_error"].as_str().is_some_and(|e| e.contains("cut (relayed path)"))
    });
    wait_until(Duration::from_secs(10), "the relay's record of the cut", || {
        r.status()["relay"]["circuits_cut"].as_u64().unwrap() >= 1
    });

    // A new connection gets a new circuit.
    let (sent, echoed) = echo_transfer(bind, 100 * 1024, 2).await;
    assert_eq!(sent, echoed);
    assert!(r.status()["relay"]["circuits_accepted"].as_u64().unwrap() >= 2);
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

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
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
    let before = rss_kib(r.pid());

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
        eprintln!("after wave {wave}: {granted} granted, relay RSS {} KiB", rss_kib(r.pid()));
    }
    let status = r.status();
    let relay = &status["relay"];
    eprintln!("relay after 400 reservation attempts: {relay}");
    assert!(granted <= 63, "at most the total cap (64, B holds one) is granted: {granted}");
    // Flooders beyond the connection cap are refused before they can even ask.
    assert!(relay["reservations"].as_u64().unwrap() <= 64, "{relay}");
    let after = rss_kib(r.pid());
    // 160 connections at a few hundred KiB each, whatever the flood does.
    assert!(after < before + 96 * 1024, "relay memory bounded: {before} KiB -> {after} KiB");

    // B, allowed and reserved before the flood, is still reachable through R, flood ongoing.
    assert!(reserved_on(&b, &r));
    assert!(a.json(&["ping", &b.peer_id, "--count", "1"]).is_some(), "A reaches B through R during the flood");
    drop(flooders);
}
