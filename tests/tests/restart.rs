//! Restarts as they happen in the field: a busy node restarted at once on its port, and a whole
//! network (bootstrap node included) restarted with every data dir kept.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::netns::{Lan, skipped};
use common::echo::expose;
use common::{BIN, BOOTSTRAP_BIN, Node, wait_until, warren};

/// Whether a TCP socket on 127.0.0.1:`port` is in TIME_WAIT (state 06 in /proc/net/tcp).
fn time_wait_on(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let local = format!("0100007F:{port:04X}");
    table.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        cols.len() > 3 && cols[1] == local && cols[3] == "06"
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn a_port_whose_old_connections_linger_in_time_wait_is_accepted_at_once() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (served, _) = listener.accept().unwrap();
    // The server side closes first, so its end (on `port`) is the one left in TIME_WAIT.
    drop(served);
    let _ = client.read(&mut [0u8; 1]);
    drop(client);
    drop(listener);
    wait_until(Duration::from_secs(5), "a connection in TIME_WAIT on the port", || time_wait_on(port));

    let started = Instant::now();
    let node = Node::start(&["--listen", &format!("/ip4/127.0.0.1/tcp/{port}")]);
    assert!(time_wait_on(port), "the test must run while TIME_WAIT lasts");
    eprintln!("started on a port in TIME_WAIT in {:.2} s", started.elapsed().as_secs_f64());
    assert!(node.status()["listen_addrs"].to_string().contains(&format!("/tcp/{port}")));
}

#[test]
fn a_port_held_by_a_live_listener_is_still_refused_with_a_clear_message() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let out = warren(dir.path(), &["up", "--no-mdns", "--listen", &format!("/ip4/127.0.0.1/tcp/{port}")]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("port {port} is already in use")), "{err}");

    // Another warren node holding the port is refused the same way (libp2p shares ports with
    // SO_REUSEPORT, so this is the check that keeps two nodes apart).
    let port = free_port();
    let listen = format!("/ip4/127.0.0.1/tcp/{port}");
    let _first = Node::start(&["--listen", &listen]);
    let out = warren(dir.path(), &["up", "--no-mdns", "--listen", &listen]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already in use"));
}

#[test]
fn two_plain_nodes_on_one_host_get_ports_of_their_own_and_reach_each_other() {
    if skipped() {
        return;
    }
    // One host (a namespace of its own, so port 4001 is free for the first node), two plain
    // `warren up` as a user would start them: default ports, mDNS on.
    let lan = Lan::new("twohost", 212, 1);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Node::spawn(dir_a.path(), &["up"], lan.exec(0, BIN));
    let b = Node::spawn(dir_b.path(), &["up"], lan.exec(0, BIN));
    let listen = |node: &Node| -> Vec<String> {
        node.status()["listen_addrs"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect()
    };
    let (on_a, on_b) = (listen(&a), listen(&b));
    for proto in ["/tcp/4001", "/udp/4001/"] {
        assert!(on_a.iter().any(|addr| addr.contains(proto)), "the first node has the default port: {on_a:?}");
    }
    // libp2p's TCP listeners share ports (SO_REUSEPORT): without the port check the second node
    // would listen on 4001 too and take half of the first node's inbound connections.
    assert!(!on_b.iter().any(|addr| addr.contains("/4001")), "the second node gets ports of its own: {on_b:?}");

    let echo = lan.echo_service(0);
    expose(&a, "echo", &echo.to_string(), &[&b.peer_id]);
    let info = b.json(&["forward", "127.0.0.1:0", &format!("{}/echo", a.peer_id)]).expect("forward accepted");
    let bind: SocketAddr = info["bind"].as_str().unwrap().parse().unwrap();
    wait_until(Duration::from_secs(30), "a forward between the two nodes of one host", || lan.echo_ok(0, bind, ECHO_BYTES));
}

#[test]
fn a_node_with_hundreds_of_connections_is_stopped_and_started_again_at_once() {
    let port = free_port();
    let listen = format!("/ip4/127.0.0.1/tcp/{port}");
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start_in(dir.path(), &["--listen", &listen]);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let conns: Vec<TcpStream> = (0..300).filter_map(|_| TcpStream::connect(addr).ok()).collect();
    assert!(conns.len() >= 200, "only {} connections were accepted", conns.len());
    node.stop();
    drop(conns);
    let started = Instant::now();
    let node = Node::start_in(dir.path(), &["--listen", &listen]);
    eprintln!("restarted on the same port in {:.2} s", started.elapsed().as_secs_f64());
    assert!(node.status()["listen_addrs"].to_string().contains(&format!("/tcp/{port}")));
}

/// A node of the restart network: host index, data dir, and the arguments it runs with.
struct Member {
    host: usize,
    dir: tempfile::TempDir,
    bin: &'static str,
    args: Vec<String>,
}

impl Member {
    fn start(&self, lan: &Lan) -> Node {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        Node::spawn(self.dir.path(), &args, lan.exec(self.host, self.bin))
    }
}

/// Bytes echoed through each forward to call it working.
const ECHO_BYTES: usize = 64 * 1024;
/// A whole-network restart must have every forward working again within this.
const RECOVERY: Duration = Duration::from_secs(30);

#[test]
fn a_whole_network_restarted_with_its_data_dirs_reconnects_and_every_forward_works_again() {
    if skipped() {
        return;
    }
    let lan = Lan::new("restart", 211, 5);
    // Every node as a user runs it: default listen addresses (port 4001 on every host, so every
    // node's 127.0.0.1:4001 is also everyone else's), no mDNS, the bootstrap node's address.
    let boot = Member { host: 0, dir: tempfile::tempdir().unwrap(), bin: BOOTSTRAP_BIN, args: vec![] };
    let first = boot.start(&lan);
    let bootstrap = format!("/ip4/{}/udp/4001/quic-v1/p2p/{}", lan.ip(0), first.peer_id);
    let members: Vec<Member> = (1..5)
        .map(|host| Member {
            host,
            dir: tempfile::tempdir().unwrap(),
            bin: BIN,
            args: ["up", "--no-mdns", "--bootstrap", &bootstrap].iter().map(|s| s.to_string()).collect(),
        })
        .collect();
    let mut boot = (boot, first);
    let mut nodes: Vec<Node> = members.iter().map(|m| m.start(&lan)).collect();

    // Services on hosts 1 and 4; forwards 2→1, 3→1 and 1→4 (each dials a peer it met only
    // through the DHT).
    let echo1 = lan.echo_service(1);
    let echo4 = lan.echo_service(4);
    expose(&nodes[0], "echo", &echo1.to_string(), &[&nodes[1].peer_id, &nodes[2].peer_id]);
    expose(&nodes[3], "echo", &echo4.to_string(), &[&nodes[0].peer_id]);
    let mut forwards = Vec::new();
    for (client, server) in [(2usize, 1usize), (3, 1), (1, 4)] {
        let target = format!("{}/echo", nodes[server - 1].peer_id);
        let info = nodes[client - 1].json(&["forward", "127.0.0.1:0", &target]).expect("forward accepted");
        let bind: SocketAddr = info["bind"].as_str().unwrap().parse().unwrap();
        forwards.push((client, bind));
    }
    for (client, bind) in &forwards {
        wait_until(RECOVERY, &format!("the forward on host {client} to work"), || lan.echo_ok(*client, *bind, ECHO_BYTES));
    }

    // Power cut: everything stops; then it comes back in an order that puts the bootstrap node
    // in the middle.
    for node in nodes.iter_mut() {
        node.stop();
    }
    boot.1.stop();
    let restarted = Instant::now();
    let mut back: Vec<Option<Node>> = (0..4).map(|_| None).collect();
    back[2] = Some(members[2].start(&lan));
    back[0] = Some(members[0].start(&lan));
    boot.1 = boot.0.start(&lan);
    back[3] = Some(members[3].start(&lan));
    back[1] = Some(members[1].start(&lan));
    let nodes: Vec<Node> = back.into_iter().map(Option::unwrap).collect();
    for (client, bind) in &forwards {
        let left = RECOVERY.saturating_sub(restarted.elapsed());
        wait_until(left, &format!("the forward on host {client} to work again after the restart"), || {
            lan.echo_ok(*client, *bind, ECHO_BYTES)
        });
    }
    eprintln!("every forward worked again {:.1} s after the restart began", restarted.elapsed().as_secs_f64());

    // Nobody dialed itself or another peer on a stale address, and nobody stored a peer's
    // loopback address (each lives on another host), while the LAN addresses were kept.
    let mut all = nodes;
    all.push(boot.1);
    for node in &all {
        let status = node.status();
        assert_eq!(status["wrong_peer_dials"], 0, "{status}");
    }
    let dirs: Vec<&std::path::Path> = members.iter().map(|m| m.dir.path()).chain([boot.0.dir.path()]).collect();
    for mut node in all {
        node.stop();
    }
    for dir in dirs {
        let store = warren_node::store::Store::open(dir).unwrap();
        let peers = store.load_peers();
        assert!(!peers.is_empty());
        for (peer, record) in peers {
            for addr in record.addresses() {
                let text = addr.to_string();
                assert!(!text.starts_with("/ip4/127.") && !text.starts_with("/ip6/::1/"), "{peer} stored with {text}");
            }
            assert!(
                record.addresses().iter().any(|a| a.to_string().starts_with("/ip4/10.211.0.")),
                "{peer} is stored with its LAN address: {:?}",
                record.addresses()
            );
        }
    }
}
