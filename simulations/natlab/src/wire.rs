//! The lab's internet: every public interface (a public host's, or a NAT router's WAN side) is a
//! TUN device whose packets this switch reads and delivers to the TUN device that owns the
//! destination address, after a fixed one-way delay. These kernels have no `netem`, so latency
//! comes from here. Without it, simultaneous punches race at routers in microseconds, which no
//! real path does.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Largest packet read from a TUN device (its MTU is 1500).
const MAX_PACKET: usize = 65_535;
/// Packets in flight at once; beyond it the wire drops, like a full router queue.
const QUEUE: usize = 65_536;

type Ports = Arc<Mutex<HashMap<Ipv4Addr, Arc<File>>>>;

pub struct Wire {
    ports: Ports,
    delay: Duration,
    tx: mpsc::SyncSender<(Instant, Ipv4Addr, Vec<u8>)>,
    pub dropped: Arc<std::sync::atomic::AtomicU64>,
}

impl Wire {
    pub fn new(delay: Duration) -> Self {
        let ports: Ports = Arc::default();
        let (tx, rx) = mpsc::sync_channel::<(Instant, Ipv4Addr, Vec<u8>)>(QUEUE);
        let deliver = ports.clone();
        std::thread::spawn(move || {
            // One delay for every packet: arrival order is delivery order, a FIFO is enough.
            for (at, dst, packet) in rx {
                let now = Instant::now();
                if at > now {
                    std::thread::sleep(at - now);
                }
                let port = deliver.lock().unwrap().get(&dst).cloned();
                if let Some(port) = port {
                    let _ = (&*port).write(&packet);
                }
            }
        });
        Wire { ports, delay, tx, dropped: Arc::default() }
    }

    /// Plugs a TUN device owning `addr` into the wire.
    pub fn attach(&self, addr: Ipv4Addr, tun: File) {
        let tun = Arc::new(tun);
        self.ports.lock().unwrap().insert(addr, tun.clone());
        let tx = self.tx.clone();
        let delay = self.delay;
        let dropped = self.dropped.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; MAX_PACKET];
            loop {
                let n = match (&*tun).read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                // IPv4 only (version nibble 4, header at least 20 bytes); the rest (IPv6 router
                // solicitations) has nowhere to go.
                if n < 20 || buf[0] >> 4 != 4 {
                    continue;
                }
                let dst = Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19]);
                if tx.try_send((Instant::now() + delay, dst, buf[..n].to_vec())).is_err() {
                    dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
    }
}
