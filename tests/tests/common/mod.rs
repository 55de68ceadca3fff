//! Running real `warren` processes: start, drive through the CLI, wait on conditions, stop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod echo;
pub mod netns;

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A raw libp2p peer over QUIC that only opens and accepts streams: the tests' prober or
/// attacker (build it inside a namespace to act from there).
pub fn stream_swarm() -> libp2p::Swarm<libp2p_stream::Behaviour> {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_quic()
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .unwrap()
        .build()
}

pub const BIN: &str = env!("CARGO_BIN_EXE_warren-under-test");
/// `warren-bootstrap`: `warren up` with the public profile (DHT server, relay on, mDNS off).
pub const BOOTSTRAP_BIN: &str = env!("CARGO_BIN_EXE_warren-bootstrap-under-test");

/// Waits until `condition` holds, checking every 100 ms; panics naming `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `warren --data-dir DIR ARGS...` to completion.
pub fn warren(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run warren")
}

/// Runs a command with `--json` and parses its output; `None` if it failed.
pub fn warren_json(data_dir: &Path, args: &[&str]) -> Option<Value> {
    let mut all = args.to_vec();
    all.push("--json");
    let out = warren(data_dir, &all);
    if !out.status.success() {
        return None;
    }
    Some(serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{args:?} printed invalid JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))
    }))
}

/// Loopback listen addresses on free ports, QUIC and TCP.
pub const LOOPBACK: [&str; 4] = ["--listen", "/ip4/127.0.0.1/udp/0/quic-v1", "--listen", "/ip4/127.0.0.1/tcp/0"];

/// A running `warren up`.
pub struct Node {
    child: Option<Child>,
    pub dir: PathBuf,
    pub peer_id: String,
    stdout: Arc<Mutex<Vec<String>>>,
    _tmp: Option<tempfile::TempDir>,
}

impl Node {
    /// Starts a node in a fresh temporary data dir.
    pub fn start(args: &[&str]) -> Node {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut node = Node::start_in(tmp.path(), args);
        node._tmp = Some(tmp);
        node
    }

    /// Starts `warren up` in `dir` with loopback listeners, mDNS off, plus `args`, and waits
    /// until its control API answers.
    pub fn start_in(dir: &Path, args: &[&str]) -> Node {
        let mut full: Vec<&str> = vec!["up", "--no-mdns"];
        if !args.contains(&"--listen") && !args.contains(&"--no-listen") {
            full.extend(LOOPBACK);
        }
        full.extend(args);
        Node::spawn(dir, &full, Command::new(BIN))
    }

    /// Starts `warren-bootstrap` in a fresh temporary data dir with loopback listeners and
    /// `args` (it turns mDNS off and its profile on by itself).
    pub fn start_bootstrap(args: &[&str]) -> Node {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut full: Vec<&str> = LOOPBACK.to_vec();
        full.extend(args);
        let mut node = Node::spawn(tmp.path(), &full, Command::new(BOOTSTRAP_BIN));
        node._tmp = Some(tmp);
        node
    }

    /// Spawns `command DIR-args` (a prepared Command, e.g. `ip netns exec ... warren`).
    pub fn spawn(dir: &Path, args: &[&str], mut command: Command) -> Node {
        let mut child = command
            .arg("--data-dir")
            .arg(dir)
            .args(args)
            .env("RUST_LOG", std::env::var("WARREN_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn warren up");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let lines = stdout.clone();
        let pipe = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let mut node = Node { child: Some(child), dir: dir.to_path_buf(), peer_id: String::new(), stdout, _tmp: None };
        let mut status = None;
        // A node without direct listen addresses is ready once its control API answers.
        let direct = !args.contains(&"--no-listen");
        wait_until(Duration::from_secs(20), "the node's control API", || {
            if let Some(exit) = node.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("warren up exited early with {exit}");
            }
            status = warren_json(dir, &["status"]);
            status.as_ref().is_some_and(|s| !direct || s["listen_addrs"].as_array().is_some_and(|a| !a.is_empty()))
        });
        node.peer_id = status.unwrap()["peer_id"].as_str().unwrap().to_string();
        node
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        warren(&self.dir, args)
    }

    pub fn json(&self, args: &[&str]) -> Option<Value> {
        warren_json(&self.dir, args)
    }

    pub fn status(&self) -> Value {
        self.json(&["status"]).expect("status answers")
    }

    /// The node's QUIC listen address with its `/p2p/` suffix, for `--bootstrap`.
    pub fn quic_addr(&self) -> String {
        let status = self.status();
        let addr = status["listen_addrs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .find(|a| a.contains("quic-v1"))
            .expect("a QUIC listen address")
            .to_string();
        format!("{addr}/p2p/{}", self.peer_id)
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Whether `warren find PEER` succeeds and names an address.
    pub fn finds(&self, peer: &str) -> bool {
        self.json(&["find", peer]).is_some_and(|r| r["found"] == true && !r["addrs"].as_array().unwrap().is_empty())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    assert!(status.success(), "warren up exited with {status} after SIGTERM");
                    return;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("warren up did not stop within 10 s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}
