//! Peers that misbehave against a node that exposes a service: they must not cost the node
//! what its real users need.

mod common;

use std::time::Duration;

use common::echo::{echo_service, expose, forward};
use common::Node;
use futures::StreamExt as _;
use libp2p::{Multiaddr, PeerId, Stream, StreamProtocol, swarm::dial_opts::{DialOpts, PeerCondition}};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_forward::Status;

/// A raw libp2p peer speaking QUIC with `connections` connections to `server`, and a control
/// that opens streams on them.
fn attacker(server: &Node, connections: usize) -> (PeerId, libp2p_stream::Control) {
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_quic()
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    let id = *swarm.local_peer_id();
    let server_id: PeerId = server.peer_id.parse().unwrap();
    let addr: Multiaddr = server.quic_addr().parse().unwrap();
    for _ in 0..connections {
        let opts = DialOpts::peer_id(server_id).addresses(vec![addr.clone()]).condition(PeerCondition::Always).build();
        swarm.dial(opts).unwrap();
    }
    let control = swarm.behaviour().new_control();
    tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    (id, control)
}

/// Opens up to `count` streams (a batch at a time), sending nothing on them; returns those
/// opened. Stops early when a whole batch fails (the connections' stream limits are reached).
async fn open_idle(control: &libp2p_stream::Control, server: PeerId, count: usize) -> Vec<Stream> {
    let protocol = StreamProtocol::new(warren_forward::PROTOCOL);
    let mut opened = Vec::new();
    while opened.len() < count {
        let batch = (count - opened.len()).min(128);
        let before = opened.len();
        let opens = (0..batch).map(|_| {
            let mut control = control.clone();
            let protocol = protocol.clone();
            async move { tokio::time::timeout(Duration::from_secs(5), control.open_stream(server, protocol)).await }
        });
        for result in futures::future::join_all(opens).await {
            if let Ok(Ok(stream)) = result {
                opened.push(stream);
            }
        }
        if opened.len() == before {
            break;
        }
    }
    opened
}

/// The status of the reply waiting on a stream, if one comes within `within`.
async fn reply_on(stream: &mut Stream, within: Duration) -> Option<Status> {
    match tokio::time::timeout(within, warren_forward::read_reply(stream)).await {
        Ok(Ok(reply)) => Some(reply.status),
        _ => None,
    }
}

async fn echoes(bind: std::net::SocketAddr) -> bool {
    let Ok(Ok(mut tcp)) = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(bind)).await else { return false };
    let round = async {
        tcp.write_all(b"still here").await?;
        let mut buf = [0u8; 10];
        tcp.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(&buf == b"still here")
    };
    matches!(tokio::time::timeout(Duration::from_secs(10), round).await, Ok(Ok(true)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousands_of_idle_streams_from_a_stranger_cost_nothing_and_an_allowed_peer_still_forwards() {
    let server = Node::start(&[]);
    let client = Node::start(&["--bootstrap", &server.quic_addr()]);
    expose(&server, "echo", &echo_service().await.to_string(), &[&client.peer_id]);
    let bind = forward(&client, &format!("{}/echo", server.peer_id));
    assert!(echoes(bind).await, "the forward works before the attack");

    // 8192 streams that never send a request, from two identities with 8 connections each
    // (QUIC lets one connection hold 1024 streams): before, each held one of the node's 8192
    // serving slots until its request timed out (30 s), and every real forward was refused.
    let server_id: PeerId = server.peer_id.parse().unwrap();
    let (_, first) = attacker(&server, 8);
    let (_, second) = attacker(&server, 8);
    let (a, b) = tokio::join!(open_idle(&first, server_id, 4096), open_idle(&second, server_id, 4096));
    let mut streams: Vec<Stream> = a.into_iter().chain(b).collect();
    eprintln!("the strangers opened {} idle streams", streams.len());
    assert!(streams.len() >= 8000, "the attack got going: {} streams", streams.len());
    // Several connections: the first may use the stream the forward opened ahead of the attack.
    for i in 0..3 {
        assert!(echoes(bind).await, "an allowed peer's new connection {i} works while the streams are held");
    }

    // The stranger learned nothing: every stream got the same answer, whatever it would ask.
    for stream in streams.iter_mut().take(50) {
        assert_eq!(reply_on(stream, Duration::from_secs(5)).await, Some(Status::UnknownService));
    }
    let metrics_free = server.json(&["exposes"]).unwrap();
    assert_eq!(metrics_free[0]["refused"], 0, "a stranger's streams are not charged to the service");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_allowed_peer_holding_idle_streams_is_capped_and_others_still_forward() {
    let server = Node::start(&[]);
    let client = Node::start(&["--bootstrap", &server.quic_addr()]);
    let echo = echo_service().await.to_string();
    // Two connections: one holds at most 1024 streams (QUIC's limit), fewer than the cap.
    let (greedy, control) = attacker(&server, 2);
    expose(&server, "echo", &echo, &[&client.peer_id]);
    expose(&server, "other", &echo, &[&greedy.to_string()]);
    let bind = forward(&client, &format!("{}/echo", server.peer_id));

    let server_id: PeerId = server.peer_id.parse().unwrap();
    let mut streams = open_idle(&control, server_id, 1500).await;
    assert_eq!(streams.len(), 1500);
    // 1024 may wait for their request (30 s); the rest are refused at once.
    let replies = futures::future::join_all(streams.iter_mut().map(|s| reply_on(s, Duration::from_secs(3)))).await;
    let over_capacity = replies.iter().filter(|r| **r == Some(Status::OverCapacity)).count();
    let unanswered = replies.iter().filter(|r| r.is_none()).count();
    assert_eq!((over_capacity, unanswered), (1500 - 1024, 1024), "beyond the per-peer cap of waiting streams, streams are refused at once");
    for i in 0..3 {
        assert!(echoes(bind).await, "another allowed peer's connection {i} still works");
    }
    let exposes = server.json(&["exposes"]).unwrap();
    assert!(exposes.as_array().unwrap().iter().all(|e| e["last_error"].is_null()), "refusals leave last_error alone: {exposes}");
}

/// The soft and hard open-file limits of a process, from /proc.
fn fd_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().to_string();
    let cols: Vec<&str> = line.split_whitespace().collect();
    (cols[3].to_string(), cols[4].to_string())
}

#[test]
fn the_open_file_limit_is_raised_to_the_hard_limit_at_start() {
    // Started the way many systems start it: a soft limit of 1024 under a higher hard limit.
    let mut shell = std::process::Command::new("sh");
    shell.args(["-c", "ulimit -S -n 1024 && exec \"$0\" \"$@\"", common::BIN]);
    let dir = tempfile::tempdir().unwrap();
    let node = Node::spawn(dir.path(), &["up", "--no-mdns", "--listen", "/ip4/127.0.0.1/udp/0/quic-v1"], shell);
    let (soft, hard) = fd_limits(node.pid());
    assert_ne!(hard, "1024", "the test needs a hard limit above 1024");
    assert_eq!(soft, hard, "soft limit raised to the hard one");
}

#[test]
fn idle_connections_on_the_control_socket_do_not_lock_the_cli_out() {
    let node = Node::start(&[]);
    // Twice the control server's connection slots, none sending a request.
    let idle: Vec<std::os::unix::net::UnixStream> =
        (0..64).map(|_| std::os::unix::net::UnixStream::connect(node.dir.join("warren.sock")).unwrap()).collect();
    let started = std::time::Instant::now();
    let out = common::warren(&node.dir, &["status", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("status answered in {:.2} s beside {} idle control connections", started.elapsed().as_secs_f64(), idle.len());
}

#[test]
fn a_flood_of_connections_from_one_host_leaves_status_and_forwards_working() {
    use common::netns::{Lan, skipped};
    if skipped() {
        return;
    }
    let lan = Lan::new("flood", 213, 3);
    let (server_dir, client_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let server = Node::spawn(server_dir.path(), &["up", "--no-mdns"], lan.exec(0, common::BIN));
    let bootstrap = format!("/ip4/{}/udp/4001/quic-v1/p2p/{}", lan.ip(0), server.peer_id);
    let client = Node::spawn(client_dir.path(), &["up", "--no-mdns", "--bootstrap", &bootstrap], lan.exec(2, common::BIN));
    let echo = lan.echo_service(0);
    expose(&server, "echo", &echo.to_string(), &[&client.peer_id]);
    let info = client.json(&["forward", "127.0.0.1:0", &format!("{}/echo", server.peer_id)]).expect("forward accepted");
    let bind: std::net::SocketAddr = info["bind"].as_str().unwrap().parse().unwrap();
    common::wait_until(Duration::from_secs(30), "the forward to work", || lan.echo_ok(2, bind, 4096));

    // 1,120 TCP connections from one host: 140 throwaway identities with 8 connections each,
    // every one completing its handshake. Before, they took ~1,000 descriptors and incoming
    // slots; now at most 32 per IP get in and the rest are refused before the handshake.
    let server_tcp: Multiaddr = format!("/ip4/{}/tcp/4001", lan.ip(0)).parse().unwrap();
    let server_id: PeerId = server.peer_id.parse().unwrap();
    let attackers = warren_natlab::sys::in_netns(&lan.ns(1), move || {
        // Built in the namespace: the runtime's threads (and the sockets they open) stay there.
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async {
            for _ in 0..140 {
                let mut swarm = libp2p::SwarmBuilder::with_new_identity()
                    .with_tokio()
                    .with_tcp(Default::default(), libp2p::noise::Config::new, libp2p::yamux::Config::default)
                    .unwrap()
                    .with_behaviour(|_| libp2p::swarm::dummy::Behaviour)
                    .unwrap()
                    .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
                    .build();
                for _ in 0..8 {
                    let opts = DialOpts::peer_id(server_id).addresses(vec![server_tcp.clone()]).condition(PeerCondition::Always).build();
                    let _ = swarm.dial(opts);
                }
                tokio::spawn(async move {
                    loop {
                        swarm.select_next_some().await;
                    }
                });
            }
        });
        Ok(runtime)
    })
    .unwrap();
    // Let the dials run their course (each is answered or refused within a second on a LAN).
    let mut peak = 0;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(250));
        peak = peak.max(server.status()["connections"].as_u64().unwrap());
    }
    let started = std::time::Instant::now();
    let status = server.status();
    eprintln!(
        "during the flood: status answered in {:.2} s; the node held at most {peak} connections",
        started.elapsed().as_secs_f64()
    );
    assert!(peak <= 40, "one host holds at most 32 connections (plus the client's): {peak}");
    assert!(status["connections"].as_u64().unwrap() <= 40, "{status}");
    assert!(lan.echo_ok(2, bind, 64 * 1024), "the existing forward keeps working during the flood");
    drop(attackers);
}


#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_udp_flood_towards_a_peer_that_never_answers_is_bounded_in_memory() {
    let client = Node::start(&[]);
    // A peer that takes forward streams and never answers on them: the UDP sessions towards it
    // queue every datagram after the first.
    let (peer, control) = attacker(&client, 1);
    let mut incoming = control.clone().accept(StreamProtocol::new(warren_forward::PROTOCOL)).unwrap();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some((_, stream)) = incoming.next().await {
            held.push(stream);
        }
    });
    let info = client.json(&["forward", "--udp", "127.0.0.1:0", &format!("{peer}/dns")]).expect("forward accepted");
    let bind: std::net::SocketAddr = info["bind"].as_str().unwrap().parse().unwrap();

    // 64 source ports, each sending 300 datagrams of 60 KiB (1.1 GiB in all). Before, each session
    // queued up to 1024 datagrams, so the node held everything its receive loop took in.
    let before = common::rss_kib(client.pid());
    let mut peak = before;
    let datagram = vec![0x5Au8; 60 * 1024];
    let mut sockets = Vec::new();
    for _ in 0..64 {
        sockets.push(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    }
    for round in 0..300 {
        for socket in &sockets {
            let _ = socket.send_to(&datagram, bind).await;
        }
        if round % 10 == 9 {
            // Let the node's receive loop take what the socket buffer holds.
            tokio::time::sleep(Duration::from_millis(20)).await;
            peak = peak.max(common::rss_kib(client.pid()));
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    peak = peak.max(common::rss_kib(client.pid()));
    let grown_mib = peak.saturating_sub(before) / 1024;
    eprintln!("UDP flood of 1.1 GiB towards a silent peer: RSS {} MiB before, {} MiB at peak (+{grown_mib} MiB)", before / 1024, peak / 1024);
    assert!(grown_mib < 64, "the queued datagrams are bounded (16 MiB per forward): grew {grown_mib} MiB");
    let status = client.status();
    assert!(status["peer_id"].is_string(), "the node still answers");
    held.abort();
}

/// Whether a peer in namespace `ns` that dials `addr` (a node's) may open `protocol` on it.
fn may_open_in(ns: &str, addr: Multiaddr, peer: PeerId, protocol: &'static str) -> bool {
    warren_natlab::sys::in_netns(ns, move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let opened = runtime.block_on(async {
            let mut swarm = common::stream_swarm();
            let mut control = swarm.behaviour().new_control();
            swarm.dial(DialOpts::peer_id(peer).addresses(vec![addr]).build()).unwrap();
            tokio::spawn(async move {
                loop {
                    swarm.select_next_some().await;
                }
            });
            let open = control.open_stream(peer, StreamProtocol::new(protocol));
            match tokio::time::timeout(Duration::from_secs(20), open).await.expect("the stream opens or is refused") {
                Ok(_) => true,
                Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(_)) => false,
                Err(e) => panic!("opening {protocol} failed for another reason: {e}"),
            }
        });
        Ok(opened)
    })
    .unwrap()
}

#[test]
fn a_stranger_across_the_internet_learns_nothing_of_the_network_behind_the_node() {
    use common::netns::{Lan, skipped};
    if skipped() {
        return;
    }
    // Host 0 stands for a public node: its LAN is configured public, so host 1 reaches it the way
    // a stranger on the internet would. Its default listeners also cover its loopback.
    let lan = Lan::new("ident", 214, 2);
    let dir = tempfile::tempdir().unwrap();
    let node = Node::spawn(dir.path(), &["up", "--no-mdns", "--public-ranges", "10.214.0.0/24"], lan.exec(0, common::BIN));
    let listening: Vec<String> = node.status()["listen_addrs"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
    assert!(listening.iter().any(|a| a.contains("/127.0.0.1/")), "the node listens on loopback too: {listening:?}");

    let addr: Multiaddr = format!("/ip4/{}/udp/4001/quic-v1", lan.ip(0)).parse().unwrap();
    let told = warren_natlab::sys::in_netns(&lan.ns(1), move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let told = runtime.block_on(async {
            let mut swarm = libp2p::SwarmBuilder::with_new_identity()
                .with_tokio()
                .with_quic()
                .with_behaviour(|key| libp2p::identify::Behaviour::new(libp2p::identify::Config::new("/observer/1".into(), key.public())))
                .unwrap()
                .build();
            swarm.dial(addr).unwrap();
            let received = async {
                loop {
                    if let libp2p::swarm::SwarmEvent::Behaviour(libp2p::identify::Event::Received { info, .. }) = swarm.select_next_some().await {
                        return info.listen_addrs;
                    }
                }
            };
            tokio::time::timeout(Duration::from_secs(20), received).await.expect("identify answered")
        });
        Ok(told)
    })
    .unwrap();
    let told: Vec<String> = told.iter().map(|a| a.to_string()).collect();
    eprintln!("a stranger was told {told:?}; the node listens on {listening:?}");
    assert!(told.iter().any(|a| a.contains(&format!("/{}/", lan.ip(0)))), "the public address is told: {told:?}");
    assert!(!told.iter().any(|a| a.contains("/127.0.0.1/")), "loopback is not told to a stranger: {told:?}");

    // Nor may it ask the LAN DHT, which knows the machines around the node; a peer on the
    // node's own host (here, its loopback) may.
    let peer: PeerId = node.peer_id.parse().unwrap();
    let lan_dht = "/warren/lan/kad/1.0.0";
    let public: Multiaddr = format!("/ip4/{}/udp/4001/quic-v1", lan.ip(0)).parse().unwrap();
    assert!(!may_open_in(&lan.ns(1), public, peer, lan_dht), "a stranger is refused the LAN DHT");
    let local: Multiaddr = "/ip4/127.0.0.1/udp/4001/quic-v1".parse().unwrap();
    assert!(may_open_in(&lan.ns(0), local, peer, lan_dht), "a neighbour is served");
}
