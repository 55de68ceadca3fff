//! Real `warren` processes inside the lab's namespaces, an echo service and a checked transfer
//! client that run as threads inside a namespace.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::sys;

pub struct Node {
    child: Option<Child>,
    pub dir: PathBuf,
    pub peer_id: String,
    warren: PathBuf,
    ns: String,
    args: Vec<String>,
}

/// How long a node may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

impl Node {
    /// Starts `warren up ARGS` in `ns` with the data dir `dir` (created if new); waits for its
    /// control API. The log is appended to, so a restarted node's log follows its first run's.
    pub fn start(warren: &Path, ns: &str, dir: &Path, args: &[String]) -> Result<Node, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("warren.log"))
            .map_err(|e| e.to_string())?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", ns])
            .arg(warren)
            .arg("--data-dir")
            .arg(dir)
            .arg("up")
            .args(args)
            .env("RUST_LOG", std::env::var("NATLAB_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(log);
        sys::die_with_parent(&mut command);
        let child = command.spawn().map_err(|e| format!("cannot start {}: {e}", warren.display()))?;
        let mut node = Node {
            child: Some(child),
            dir: dir.to_path_buf(),
            peer_id: String::new(),
            warren: warren.to_path_buf(),
            ns: ns.to_string(),
            args: args.to_vec(),
        };
        let status = wait_for(Duration::from_secs(20), || {
            if let Some(Ok(Some(exit))) = node.child.as_mut().map(|c| c.try_wait()) {
                return Some(Err(format!("warren exited with {exit}; see {}", dir.join("warren.log").display())));
            }
            node.json(&["status"]).map(Ok)
        })
        .ok_or_else(|| format!("warren in {ns} did not answer; see {}", dir.join("warren.log").display()))??;
        node.peer_id = status["peer_id"].as_str().unwrap_or_default().to_string();
        Ok(node)
    }

    /// [`Node::cli`], for polling: any failure is just "not yet".
    pub fn json(&self, args: &[&str]) -> Option<Value> {
        self.cli(args).ok()
    }

    /// Runs a CLI command with `--json` (the control socket is a file: no namespace needed); the
    /// error names the command and its stderr.
    pub fn cli(&self, args: &[&str]) -> Result<Value, String> {
        let out = Command::new(&self.warren)
            .arg("--data-dir")
            .arg(&self.dir)
            .args(args)
            .arg("--json")
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("warren {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the node as systemd would (SIGTERM, so it writes its peer store out; killed if it
    /// takes longer than [`STOP_TIMEOUT`]). The data dir stays.
    pub fn terminate(&mut self) {
        if let Some(child) = &mut self.child {
            // `ip netns exec` execs warren, so the child's pid is warren's.
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.stop();
    }

    /// Starts the node again in its namespace with its data dir and arguments.
    pub fn restart(&mut self) -> Result<(), String> {
        self.terminate();
        let again = Node::start(&self.warren, &self.ns, &self.dir, &self.args)?;
        if again.peer_id != self.peer_id {
            return Err(format!("the node in {} came back as {} (was {})", self.ns, again.peer_id, self.peer_id));
        }
        *self = again;
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `f` every 100 ms until it gives a value or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A TCP echo service inside a namespace, stopped when dropped.
pub struct Echo {
    pub port: u16,
    stop: Arc<AtomicBool>,
}

impl Echo {
    /// On 127.0.0.1, a free port: the service a forward points at.
    pub fn start(ns: &str) -> Result<Echo, String> {
        Echo::start_on(ns, SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// On `bind` (port 0 for any free one).
    pub fn start_on(ns: &str, bind: SocketAddr) -> Result<Echo, String> {
        let ns = ns.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let stopped = stop.clone();
        std::thread::spawn(move || {
            let listener = sys::enter_netns(&ns)
                .and_then(|()| TcpListener::bind(bind))
                .and_then(|l| l.set_nonblocking(true).map(|()| l));
            let listener = match listener {
                Ok(l) => {
                    let _ = tx.send(Ok(l.local_addr().unwrap().port()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(format!("echo service in {ns}: {e}")));
                    return;
                }
            };
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((tcp, _)) => {
                        // Threads inherit the namespace of the thread that creates them.
                        std::thread::spawn(move || echo(tcp));
                    }
                    // Polled (so a drop stops it); 1 ms keeps the wait out of first-byte times.
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        let port = rx.recv().map_err(|_| "echo thread died".to_string())??;
        Ok(Echo { port, stop })
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn echo(tcp: TcpStream) {
    let _ = tcp.set_nonblocking(false);
    let mut r = tcp.try_clone().unwrap();
    let mut w = tcp;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if w.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = w.shutdown(std::net::Shutdown::Write);
}

/// Sends `n` pseudo-random bytes to `addr` from inside `ns` and reads the echo; Ok when every byte
/// came back (SHA-256 equal), with the time it took.
pub fn transfer(ns: &str, addr: SocketAddr, n: usize, timeout: Duration) -> Result<Duration, String> {
    transfer_watched(ns, addr, n, timeout).map(|w| w.took)
}

/// A transfer that went through, and the longest time no echoed byte arrived in the middle of it.
#[derive(Debug, Clone, Copy)]
pub struct Watched {
    pub took: Duration,
    pub longest_stall: Duration,
}

/// [`transfer`], also timing the longest wait between two reads of the echo.
pub fn transfer_watched(ns: &str, addr: SocketAddr, n: usize, timeout: Duration) -> Result<Watched, String> {
    sys::in_netns(ns, move || {
        let started = Instant::now();
        let tcp = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
        tcp.set_read_timeout(Some(timeout)).ok();
        let mut w = tcp.try_clone().map_err(|e| e.to_string())?;
        let writer = std::thread::spawn(move || -> Result<[u8; 32], String> {
            let mut hash = Sha256::new();
            let mut x: u32 = rand::random();
            let mut chunk = vec![0u8; 64 * 1024];
            let mut sent = 0;
            while sent < n {
                let len = chunk.len().min(n - sent);
                for b in &mut chunk[..len] {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    *b = (x >> 16) as u8;
                }
                w.write_all(&chunk[..len]).map_err(|e| format!("send: {e}"))?;
                hash.update(&chunk[..len]);
                sent += len;
            }
            let _ = w.shutdown(std::net::Shutdown::Write);
            Ok(hash.finalize().into())
        });
        let mut r = tcp;
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        let (mut last, mut longest_stall) = (Instant::now(), Duration::ZERO);
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => {
                    if got > 0 {
                        longest_stall = longest_stall.max(last.elapsed());
                    }
                    last = Instant::now();
                    hash.update(&buf[..k]);
                    got += k;
                }
                Err(e) => return Err(format!("receive after {got} bytes: {e}")),
            }
        }
        let sent = writer.join().map_err(|_| "writer panicked".to_string())??;
        let echoed: [u8; 32] = hash.finalize().into();
        if got != n || sent != echoed {
            return Err(format!("{got} of {n} bytes came back, digest {}", if sent == echoed { "equal" } else { "differs" }));
        }
        Ok(Watched { took: started.elapsed(), longest_stall })
    })
}

/// Opens a new connection to `addr` from inside `ns`, sends one byte and waits for its echo: the
/// time a new connection through a forward takes to carry its first byte there and back.
pub fn first_byte(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<Duration, String> {
    sys::in_netns(ns, move || {
        let started = Instant::now();
        let mut tcp = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
        tcp.set_nodelay(true).ok();
        tcp.set_read_timeout(Some(timeout)).ok();
        tcp.write_all(b"x").map_err(|e| format!("send: {e}"))?;
        let mut byte = [0u8; 1];
        tcp.read_exact(&mut byte).map_err(|e| format!("receive: {e}"))?;
        Ok(started.elapsed())
    })
}
