//! The `--json` output of every subcommand has the documented shape.

mod common;

use std::time::Duration;

use common::{Node, wait_until, warren_json};
use serde_json::Value;

fn assert_keys(value: &Value, keys: &[&str]) {
    for key in keys {
        assert!(value.get(key).is_some(), "missing {key:?} in {value}");
    }
}

#[test]
fn every_subcommand_prints_json_of_the_documented_shape() {
    let a = Node::start(&["--dht-mode", "server"]);
    let b = Node::start(&["--dht-mode", "server", "--bootstrap", &a.quic_addr()]);
    wait_until(Duration::from_secs(20), "b to connect to a", || {
        b.json(&["peers"]).is_some_and(|p| !p.as_array().unwrap().is_empty())
    });

    let status = b.json(&["status"]).unwrap();
    assert_keys(&status, &[
        "peer_id", "agent", "listen_addrs", "external_addrs", "reachability", "dht_mode", "dht_mode_setting",
        "kad_protocol", "connected_peers", "connections", "routing_table_peers", "lan_routing_table_peers", "stored_peers",
        "peer_store_writes", "wrong_peer_dials", "uptime_secs",
    ]);
    assert_eq!(status["dht_mode"], "server");
    assert_eq!(status["kad_protocol"], "/warren/kad/1.0.0");
    assert!(["unknown", "public", "private"].contains(&status["reachability"].as_str().unwrap()));

    let peers = b.json(&["peers"]).unwrap();
    let entry = &peers.as_array().unwrap()[0];
    assert_eq!(entry["peer_id"], a.peer_id.as_str());
    assert_keys(&entry["connections"][0], &["address", "transport", "path", "direction", "rtt_ms", "age_secs"]);

    let id = b.json(&["id"]).unwrap();
    assert_eq!(id["peer_id"], b.peer_id.as_str());
    assert_keys(&id, &["public_key", "agent"]);

    let ping = b.json(&["ping", &a.peer_id, "-c", "3"]).unwrap();
    assert_eq!(ping["peer_id"], a.peer_id.as_str());
    let rtts = ping["rtts_ms"].as_array().unwrap();
    assert_eq!(rtts.len(), 3);
    assert!(rtts.iter().all(|r| r.as_f64().unwrap() > 0.0));

    let find = b.json(&["find", &a.peer_id]).unwrap();
    assert_eq!(find["found"], true);
    assert!(find["elapsed_ms"].as_f64().unwrap() >= 0.0);
    assert!(find["addrs"].as_array().unwrap().iter().any(|x| x.as_str().unwrap().contains("127.0.0.1")));

    let config = warren_json(&b.dir, &["config", "--no-mdns"]).unwrap();
    assert_keys(&config, &["listen", "bootstrap", "mdns", "dht_mode", "kad_protocol", "max_stored_peers"]);
    assert_eq!(config["mdns"], false);
}

#[test]
fn text_output_names_what_it_shows() {
    let a = Node::start(&["--dht-mode", "server"]);
    let status = String::from_utf8(a.cli(&["status"]).stdout).unwrap();
    assert!(status.contains(&a.peer_id) && status.contains("reachability"), "{status}");
    let id = String::from_utf8(a.cli(&["id"]).stdout).unwrap();
    assert_eq!(id.trim(), a.peer_id);
    let peers = String::from_utf8(a.cli(&["peers"]).stdout).unwrap();
    assert_eq!(peers.trim(), "no connected peers");
    let started = a.stdout_lines();
    assert!(started.iter().any(|l| l.contains(&a.peer_id)), "start-up output names the PeerId: {started:?}");
    assert!(started.iter().any(|l| l.starts_with("listening on /ip4/127.0.0.1/")), "{started:?}");
}
