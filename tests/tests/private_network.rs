//! A private network with no mDNS and no public address (VMs on one subnet, a VPN, several nodes
//! on one host): nodes given only `--bootstrap` find each other by PeerId through the LAN DHT,
//! and forward between them. No `--dht-mode`, no `--public-ranges`.

mod common;

use std::time::{Duration, Instant};

use common::echo::{echo_service, echo_transfer, expose, forward};
use common::{Node, wait_until};

/// Finds must succeed this soon after the nodes started: "within seconds".
const FIND_WITHIN: Duration = Duration::from_secs(15);
/// Bytes pushed through a forward between two of the nodes.
const FORWARDED: usize = 10 * 1024 * 1024;

/// Starts four plain nodes bootstrapped to `first`; checks every find, self-finds and a forward.
fn four_plain_nodes_join(first: Node) {
    let bootstrap = first.quic_addr();
    let mut nodes = vec![first];
    for _ in 1..5 {
        nodes.push(Node::start(&["--bootstrap", &bootstrap]));
    }
    let started = Instant::now();
    for finder in &nodes {
        for target in &nodes {
            if finder.peer_id == target.peer_id {
                continue;
            }
            wait_until(FIND_WITHIN, &format!("{} to find {}", finder.peer_id, target.peer_id), || {
                finder.finds(&target.peer_id)
            });
        }
    }
    eprintln!("all 20 finds succeeded {:.1} s after the last node started", started.elapsed().as_secs_f64());
    for node in &nodes {
        let me = node.json(&["find", &node.peer_id]).expect("find answers");
        assert_eq!(me["found"], true, "{me}");
        let addrs: Vec<&str> = me["addrs"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        let listening = node.status()["listen_addrs"].clone();
        assert!(
            addrs.iter().any(|a| listening.as_array().unwrap().iter().any(|l| l == a)),
            "a node finds itself at its own addresses: {addrs:?} vs {listening}"
        );
        let status = node.status();
        assert_eq!(status["wrong_peer_dials"], 0, "{status}");
    }
    for node in &nodes[1..] {
        assert_eq!(node.status()["dht_mode_setting"], "auto", "plain nodes");
    }
    // Nothing private leaks into the WAN DHT: on loopback it stays empty.
    assert_eq!(nodes[0].status()["routing_table_peers"], 0);
    assert!(nodes[0].status()["lan_routing_table_peers"].as_u64().unwrap() >= 4);

    // A forward between two nodes that only met through the DHT.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let echo = runtime.block_on(echo_service());
    let (server, client) = (&nodes[2], &nodes[4]);
    expose(server, "echo", &echo.to_string(), &[&client.peer_id]);
    let bind = forward(client, &format!("{}/echo", server.peer_id));
    let (sent, echoed) = runtime.block_on(echo_transfer(bind, FORWARDED, 7));
    assert_eq!(sent, echoed, "10 MB came back intact");
    let peers = client.json(&["peers"]).unwrap();
    let direct = peers.as_array().unwrap().iter().any(|p| {
        p["peer_id"] == server.peer_id.as_str() && p["connections"].as_array().unwrap().iter().any(|c| c["path"] == "direct")
    });
    assert!(direct, "the forward runs over a direct loopback connection: {peers}");
}

#[test]
fn five_plain_nodes_bootstrapped_to_the_first_find_each_other_and_forward() {
    four_plain_nodes_join(Node::start(&[]));
}

#[test]
fn the_same_private_network_works_with_warren_bootstrap_as_the_first_node() {
    four_plain_nodes_join(Node::start_bootstrap(&[]));
}
