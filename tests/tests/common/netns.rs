//! Hosts in network namespaces of the test's own, joined by a bridge: a LAN on which every node
//! can listen on the default port 4001, as on separate machines. Needs root and iproute2.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use warren_natlab::sys::in_netns;

/// Whether the environment asked to skip namespace tests (non-root runs).
pub fn skipped() -> bool {
    if std::env::var_os("WARREN_SKIP_NETNS").is_some() {
        eprintln!("skipped: WARREN_SKIP_NETNS is set");
        return true;
    }
    false
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

/// `hosts` namespaces on one bridge, host `i` at `10.<net>.0.<i+1>/24`. Removed on drop.
pub struct Lan {
    prefix: String,
    net: u8,
    hosts: usize,
}

impl Lan {
    /// `tag` names the test (namespaces are `wrn-<tag>-<pid>-<host>`); `net` picks its subnet.
    pub fn new(tag: &str, net: u8, hosts: usize) -> Lan {
        let lan = Lan { prefix: format!("wrn-{tag}-{}", std::process::id()), net, hosts };
        let br = lan.bridge();
        ip(&["netns", "add", &br]);
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &br, "link", "set", "br0", "up"]);
        for i in 0..hosts {
            let ns = lan.ns(i);
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            let port = format!("p{i}");
            ip(&["-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", &br]);
            ip(&["-n", &br, "link", "set", &port, "master", "br0", "up"]);
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", lan.ip(i)), "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        }
        lan
    }

    fn bridge(&self) -> String {
        format!("{}-br", self.prefix)
    }

    pub fn ns(&self, host: usize) -> String {
        format!("{}-{host}", self.prefix)
    }

    pub fn ip(&self, host: usize) -> String {
        format!("10.{}.0.{}", self.net, host + 1)
    }

    /// `ip netns exec NS BIN`, ready for `Node::spawn`.
    pub fn exec(&self, host: usize, bin: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns(host), bin]);
        command
    }

    /// A TCP echo service on the host's loopback, served by a thread of the test.
    pub fn echo_service(&self, host: usize) -> SocketAddr {
        let listener = in_netns(&self.ns(host), || TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(mut tcp) = tcp else { continue };
                std::thread::spawn(move || {
                    let mut back = tcp.try_clone().unwrap();
                    let _ = std::io::copy(&mut tcp, &mut back);
                    let _ = back.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        addr
    }

    /// Sends `n` bytes to `addr` from inside the host and checks they come back intact.
    pub fn echo_ok(&self, host: usize, addr: SocketAddr, n: usize) -> bool {
        let Ok(mut tcp) = in_netns(&self.ns(host), move || TcpStream::connect(addr).map_err(|e| e.to_string())) else {
            return false;
        };
        let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
        let payload: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
        let mut writer = tcp.try_clone().unwrap();
        let sent = payload.clone();
        let write = std::thread::spawn(move || {
            let ok = writer.write_all(&sent).is_ok();
            let _ = writer.shutdown(std::net::Shutdown::Write);
            ok
        });
        let mut back = Vec::new();
        let read = tcp.read_to_end(&mut back);
        write.join().unwrap_or(false) && read.is_ok() && back == payload
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for i in 0..self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(i)]).status();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.bridge()]).status();
    }
}
