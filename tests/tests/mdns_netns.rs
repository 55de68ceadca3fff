//! Two nodes on one LAN (two network namespaces joined by a bridge) find each other by mDNS with
//! no bootstrap. Needs root and iproute2; set WARREN_SKIP_NETNS=1 to skip it elsewhere.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{BIN, Node, wait_until};

/// Namespaces and links are named after this prefix and the test's pid, and removed on drop.
struct Lan {
    prefix: String,
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

impl Lan {
    /// A bridge in its own namespace and two hosts, 192.0.2.1 and 192.0.2.2 (a documentation range).
    fn new() -> Lan {
        let prefix = format!("wrn-mdns-{}", std::process::id());
        let lan = Lan { prefix: prefix.clone() };
        let br = lan.ns("br");
        ip(&["netns", "add", &br]);
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &br, "link", "set", "br0", "up"]);
        for (i, host) in ["a", "b"].iter().enumerate() {
            let ns = lan.ns(host);
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&["-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &format!("p{host}"), "netns", &br]);
            ip(&["-n", &br, "link", "set", &format!("p{host}"), "master", "br0", "up"]);
            ip(&["-n", &ns, "addr", "add", &format!("192.0.2.{}/24", i + 1), "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        }
        lan
    }

    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    fn exec(&self, host: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns(host), BIN]);
        command
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for host in ["a", "b", "br"] {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(host)]).status();
        }
    }
}

#[test]
fn two_nodes_on_one_lan_find_each_other_by_mdns_without_bootstrap() {
    if std::env::var_os("WARREN_SKIP_NETNS").is_some() {
        eprintln!("skipped: WARREN_SKIP_NETNS is set");
        return;
    }
    let lan = Lan::new();
    let listen = ["up", "--listen", "/ip4/0.0.0.0/udp/0/quic-v1", "--listen", "/ip4/0.0.0.0/tcp/0"];
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = Node::spawn(dir_a.path(), &listen, lan.exec("a"));
    let b = Node::spawn(dir_b.path(), &listen, lan.exec("b"));
    for (node, other, other_ip) in [(&a, &b, "192.0.2.2"), (&b, &a, "192.0.2.1")] {
        wait_until(Duration::from_secs(30), "a connection found by mDNS", || {
            node.json(&["peers"]).is_some_and(|peers| {
                peers.as_array().unwrap().iter().any(|p| {
                    p["peer_id"] == other.peer_id.as_str()
                        && p["connections"].as_array().unwrap().iter().any(|c| c["address"].as_str().unwrap().contains(other_ip))
                })
            })
        });
    }
    // The peer found on the LAN is remembered with its LAN address.
    assert!(a.status()["stored_peers"].as_u64().unwrap() >= 1);
}
