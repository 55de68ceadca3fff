//! Nodes on loopback find each other through a bootstrap node and the DHT, and remember what
//! they learned across restarts.

mod common;

use std::time::Duration;

use common::{Node, wait_until};

#[test]
fn five_nodes_given_only_the_first_as_bootstrap_all_find_each_other() {
    let first = Node::start(&[]);
    let bootstrap = first.quic_addr();
    let mut nodes = vec![first];
    for _ in 1..5 {
        nodes.push(Node::start(&["--bootstrap", &bootstrap]));
    }
    for finder in &nodes {
        for target in &nodes {
            if finder.peer_id == target.peer_id {
                continue;
            }
            wait_until(Duration::from_secs(30), &format!("{} to find {}", finder.peer_id, target.peer_id), || {
                finder.finds(&target.peer_id)
            });
        }
    }
    for node in &nodes {
        let peers = node.json(&["peers"]).expect("peers answers");
        let peers = peers.as_array().unwrap();
        assert!(!peers.is_empty(), "{} lists no connections", node.peer_id);
        for peer in peers {
            let conn = &peer["connections"][0];
            assert!(conn["address"].as_str().unwrap().starts_with("/ip4/127.0.0.1/"), "{conn}");
            assert_eq!(conn["path"], "direct");
            assert!(["quic", "tcp"].contains(&conn["transport"].as_str().unwrap()), "{conn}");
        }
    }
    // Every lookup went through the DHT: on loopback that is the LAN DHT, and the bootstrap node
    // has everyone in its routing table (the WAN DHT takes public addresses only).
    let status = nodes[0].status();
    assert!(status["lan_routing_table_peers"].as_u64().unwrap() >= 4, "{status}");
    assert_eq!(status["routing_table_peers"], 0, "{status}");
}

#[test]
fn a_restarted_node_keeps_its_peer_id_and_rejoins_from_its_peer_store() {
    let hub = Node::start(&[]);
    let bootstrap = hub.quic_addr();
    let other = Node::start(&["--bootstrap", &bootstrap]);
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start_in(dir.path(), &["--bootstrap", &bootstrap]);
    let id = node.peer_id.clone();
    wait_until(Duration::from_secs(30), "the node to find the other peer", || node.finds(&other.peer_id));
    node.stop();

    let restarted = Node::start_in(dir.path(), &[]);
    assert_eq!(restarted.peer_id, id, "the identity changed across a restart");
    assert!(restarted.status()["stored_peers"].as_u64().unwrap() >= 2);
    wait_until(Duration::from_secs(30), "the restarted node, with no bootstrap, to find the peer it had met", || {
        restarted.finds(&other.peer_id)
    });
    let ping = restarted.json(&["ping", &other.peer_id, "--count", "2"]).expect("ping answers");
    assert_eq!(ping["rtts_ms"].as_array().unwrap().len(), 2);
}

#[test]
fn a_peer_that_left_leaves_the_routing_table_once_a_dial_to_it_fails_and_returns_when_it_comes_back() {
    let hub = Node::start(&[]);
    let bootstrap = hub.quic_addr();
    let stays = Node::start(&["--bootstrap", &bootstrap]);
    let dir = tempfile::tempdir().unwrap();
    let mut leaves = Node::start_in(dir.path(), &["--bootstrap", &bootstrap]);
    let table = |node: &Node| node.status()["lan_routing_table_peers"].as_u64().unwrap();
    wait_until(Duration::from_secs(30), "both peers in the hub's routing table", || table(&hub) == 2);
    let gone = leaves.peer_id.clone();
    leaves.stop();
    assert_eq!(table(&hub), 2, "a disconnect alone keeps the peer (libp2p's rule; a dial decides)");

    let ping = hub.cli(&["ping", &gone, "--count", "1"]);
    assert!(!ping.status.success(), "a ping of a stopped node answered");
    wait_until(Duration::from_secs(10), "the departed peer to leave the hub's routing table", || table(&hub) == 1);
    assert!(hub.finds(&stays.peer_id), "the peer that stayed is still found");

    let back = Node::start_in(dir.path(), &["--bootstrap", &bootstrap]);
    assert_eq!(back.peer_id, gone);
    wait_until(Duration::from_secs(30), "the returning peer back in the hub's routing table", || table(&hub) == 2);
}
