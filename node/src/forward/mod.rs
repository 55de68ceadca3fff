//! Port forwarding: services this node exposes to chosen peers ([`serve`]), and local ports
//! forwarded to services on other peers ([`client`]), over `/warren/forward/1.0.0` streams
//! (the `warren-forward` crate: wire format and the libp2p behaviour that carries the streams).
//!
//! Exposes and forwards come from the config file (`[[expose]]`, `[[forward]]`) and from the
//! control API; those added through the API are kept in the store, so both survive restarts.

pub mod client;
pub mod resume;
pub mod serve;
pub mod splice;
pub mod udp;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::api::{self, ExposeSpec, ForwardSpec, SpecError};
use crate::handle::NodeHandle;
use crate::shutdown::Shutdown;

/// Live counters of one expose or forward.
#[derive(Default)]
pub struct Stats {
    pub active: AtomicU64,
    pub total: AtomicU64,
    pub refused: AtomicU64,
    /// Bytes from the local side to the stream.
    pub sent: AtomicU64,
    /// Bytes from the stream to the local side.
    pub received: AtomicU64,
    /// When a connection last heard from the peer (`resume::heard_ms`).
    pub heard: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    pub path: Mutex<Option<String>>,
}

impl Stats {
    pub fn fail(&self, error: String) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap() = Some(error);
    }
}

/// Counts a connection as active for as long as the guard lives.
pub struct Active<'a>(&'a Stats);

impl<'a> Active<'a> {
    pub fn new(stats: &'a Stats) -> Self {
        stats.active.fetch_add(1, Ordering::Relaxed);
        stats.total.fetch_add(1, Ordering::Relaxed);
        Active(stats)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Exposed {
    pub spec: ExposeSpec,
    pub allow: Vec<PeerId>,
    pub permits: Arc<Semaphore>,
    pub stats: Stats,
    pub from_config: bool,
}

pub struct Forward {
    pub spec: ForwardSpec,
    pub peer: PeerId,
    pub local: SocketAddr,
    pub permits: Arc<Semaphore>,
    pub stats: Stats,
    pub from_config: bool,
    /// A stream opened ahead for the next connection or UDP session (see [`client::Spare`]).
    pub spare: client::Spare,
    task: tokio::task::AbortHandle,
}

/// The registry of exposes and forwards, shared by the serving task, the forward tasks and the
/// control API.
pub struct Forwarding {
    pub node: NodeHandle,
    pub udp_idle: Duration,
    /// Where every task of forwarding is spawned, so a shutdown ends them in order.
    pub shutdown: Shutdown,
    /// Streams refused by the serving side, by reason (for metrics).
    pub refusals: serve::Refusals,
    /// Sessions served (resumable TCP forwards), each waiting for the stream it resumes on.
    pub sessions: serve::Sessions,
    exposes: Mutex<HashMap<String, Arc<Exposed>>>,
    forwards: Mutex<HashMap<SocketAddr, Arc<Forward>>>,
    saved: sled::Tree,
}

/// Why an expose or forward could not be added, removed or restored.
#[derive(Debug, thiserror::Error)]
pub enum ForwardingError {
    /// The spec is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// Something is forwarded from that local address already.
    #[error("{0} is already forwarded; remove it first with `warren unforward {0}`")]
    AlreadyForwarded(SocketAddr),
    /// The local address cannot be bound.
    #[error("cannot listen on {bind}: {source}")]
    Listen { bind: SocketAddr, source: std::io::Error },
    /// `unforward` was given something that is not `IP:PORT`.
    #[error("{0:?} is not IP:PORT")]
    BadAddress(String),
    /// Nothing to remove: no such service is exposed.
    #[error("no service named {0:?} is exposed")]
    NotExposed(String),
    /// Nothing to remove: nothing is forwarded from that address.
    #[error("nothing is forwarded from {0}")]
    NotForwarded(SocketAddr),
    /// An entry of the config file (`[[expose]]`, `[[forward]]`) could not be set up.
    #[error("{entry}: {source}")]
    Config { entry: String, source: Box<ForwardingError> },
}

impl ForwardingError {
    /// Whether the error is "there is no such thing" (rather than a bad request).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotExposed(_) | Self::NotForwarded(_))
    }
}

const EXPOSE_PREFIX: &str = "expose/";
const FORWARD_PREFIX: &str = "forward/";

impl Forwarding {
    pub fn new(node: NodeHandle, udp_idle: Duration, saved: sled::Tree, shutdown: Shutdown) -> Arc<Self> {
        Arc::new(Self { node, udp_idle, shutdown, refusals: Default::default(), sessions: Default::default(), exposes: Mutex::default(), forwards: Mutex::default(), saved })
    }

    /// Loads the config's entries, then those saved from the control API.
    pub async fn restore(self: &Arc<Self>, exposes: &[ExposeSpec], forwards: &[ForwardSpec]) -> Result<(), ForwardingError> {
        let config = |entry: String| move |e| ForwardingError::Config { entry, source: Box::new(e) };
        for spec in exposes {
            self.expose(spec.clone(), true).map_err(config(format!("[[expose]] {:?}", spec.name)))?;
        }
        for spec in forwards {
            self.forward(spec.clone(), true).await.map_err(config(format!("[[forward]] {:?}", spec.bind)))?;
        }
        for (key, value) in self.saved.iter().flatten() {
            let key = String::from_utf8_lossy(&key).to_string();
            let restored = if key.starts_with(EXPOSE_PREFIX) {
                match serde_json::from_slice::<ExposeSpec>(&value) {
                    Ok(spec) if !self.exposes.lock().unwrap().contains_key(&spec.name) => {
                        self.expose(spec, false).map(|_| ()).map_err(|e| e.to_string())
                    }
                    Ok(_) => Ok(()),
                    Err(e) => Err(e.to_string()),
                }
            } else {
                match serde_json::from_slice::<ForwardSpec>(&value) {
                    Ok(spec) => self.forward(spec, false).await.map(|_| ()).map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            };
            if let Err(e) = restored {
                tracing::warn!(entry = %key, error = %e, "a saved expose/forward could not be restored");
            }
        }
        Ok(())
    }

    pub fn expose(&self, spec: ExposeSpec, from_config: bool) -> Result<api::ExposeInfo, ForwardingError> {
        let allow = spec.validate()?;
        let exposed = Arc::new(Exposed {
            permits: Arc::new(Semaphore::new(spec.max_connections)),
            allow,
            spec: spec.clone(),
            stats: Stats::default(),
            from_config,
        });
        if !from_config {
            let _ = self.saved.insert(format!("{EXPOSE_PREFIX}{}", spec.name), serde_json::to_vec(&spec).unwrap());
            let _ = self.saved.flush();
        }
        tracing::info!(service = %spec.name, target = %spec.target, udp = spec.udp, "exposing service");
        let info = expose_info(&exposed);
        self.exposes.lock().unwrap().insert(spec.name.clone(), exposed);
        Ok(info)
    }

    pub fn unexpose(&self, name: &str) -> Result<(), ForwardingError> {
        let removed = self.exposes.lock().unwrap().remove(name).ok_or_else(|| ForwardingError::NotExposed(name.to_string()))?;
        let _ = self.saved.remove(format!("{EXPOSE_PREFIX}{name}"));
        let _ = self.saved.flush();
        if removed.from_config {
            tracing::warn!(service = %name, "unexposed for this run; it is in the config file, remove it there too");
        }
        Ok(())
    }

    /// Whether the peer is on some exposed service's allow-list (or one allows every peer).
    pub fn may_use_any(&self, peer: &PeerId) -> bool {
        self.exposes.lock().unwrap().values().any(|e| e.spec.allow_any || e.allow.contains(peer))
    }

    pub fn exposed(&self, name: &str) -> Option<Arc<Exposed>> {
        self.exposes.lock().unwrap().get(name).cloned()
    }

    pub fn exposes(&self) -> Vec<api::ExposeInfo> {
        let mut list: Vec<_> = self.exposes.lock().unwrap().values().map(|e| expose_info(e)).collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// Binds the local socket and starts forwarding; the spec is saved unless it came from the
    /// config file. A port-0 bind is saved with the port actually bound.
    pub async fn forward(self: &Arc<Self>, mut spec: ForwardSpec, from_config: bool) -> Result<api::ForwardInfo, ForwardingError> {
        let (bind, peer) = spec.validate()?;
        if self.forwards.lock().unwrap().contains_key(&bind) {
            return Err(ForwardingError::AlreadyForwarded(bind));
        }
        let bind_error = |source: std::io::Error| ForwardingError::Listen { bind, source };
        let (local, task) = if spec.udp {
            let socket = tokio::net::UdpSocket::bind(bind).await.map_err(bind_error)?;
            udp::enlarge_udp_buffers(&socket);
            let local = socket.local_addr().map_err(bind_error)?;
            (local, client::Listener::Udp(socket))
        } else {
            let listener = splice::listen_tcp(bind).map_err(bind_error)?;
            let local = listener.local_addr().map_err(bind_error)?;
            (local, client::Listener::Tcp(listener))
        };
        spec.bind = local.to_string();
        let (tx, rx) = tokio::sync::oneshot::channel::<Arc<Forward>>();
        let this = self.clone();
        let span = tracing::info_span!("forward", %local, peer = %peer, service = %spec.service);
        let handle = self.shutdown.spawn(
            async move {
                if let Ok(forward) = rx.await {
                    client::run(this, forward, task).await;
                }
            }
            .instrument(span),
        );
        let forward = Arc::new(Forward {
            permits: Arc::new(Semaphore::new(spec.max_connections)),
            spec: spec.clone(),
            peer,
            local,
            stats: Stats::default(),
            from_config,
            spare: client::Spare::default(),
            task: handle.abort_handle(),
        });
        let _ = tx.send(forward.clone());
        if !from_config {
            let _ = self.saved.insert(format!("{FORWARD_PREFIX}{local}"), serde_json::to_vec(&spec).unwrap());
            let _ = self.saved.flush();
        }
        tracing::info!(%local, peer = %peer, service = %spec.service, udp = spec.udp, "forwarding");
        let info = forward_info(&forward);
        self.forwards.lock().unwrap().insert(local, forward);
        Ok(info)
    }

    pub fn unforward(&self, bind: &str) -> Result<(), ForwardingError> {
        let addr: SocketAddr = bind.parse().map_err(|_| ForwardingError::BadAddress(bind.to_string()))?;
        let removed = self.forwards.lock().unwrap().remove(&addr).ok_or(ForwardingError::NotForwarded(addr))?;
        removed.task.abort();
        let _ = self.saved.remove(format!("{FORWARD_PREFIX}{addr}"));
        let _ = self.saved.flush();
        Ok(())
    }

    pub fn forwards(&self) -> Vec<api::ForwardInfo> {
        let mut list: Vec<_> = self.forwards.lock().unwrap().values().map(|f| forward_info(f)).collect();
        list.sort_by(|a, b| a.bind.cmp(&b.bind));
        list
    }
}

fn expose_info(e: &Exposed) -> api::ExposeInfo {
    api::ExposeInfo {
        name: e.spec.name.clone(),
        target: e.spec.target.clone(),
        allow: e.spec.allow.clone(),
        allow_any: e.spec.allow_any,
        udp: e.spec.udp,
        max_connections: e.spec.max_connections,
        active: e.stats.active.load(Ordering::Relaxed),
        total: e.stats.total.load(Ordering::Relaxed),
        refused: e.stats.refused.load(Ordering::Relaxed),
        bytes_in: e.stats.received.load(Ordering::Relaxed),
        bytes_out: e.stats.sent.load(Ordering::Relaxed),
        last_error: e.stats.last_error.lock().unwrap().clone(),
        source: if e.from_config { "config" } else { "api" }.to_string(),
    }
}

fn forward_info(f: &Forward) -> api::ForwardInfo {
    api::ForwardInfo {
        bind: f.local.to_string(),
        peer: f.spec.peer.clone(),
        service: f.spec.service.clone(),
        udp: f.spec.udp,
        max_connections: f.spec.max_connections,
        active: f.stats.active.load(Ordering::Relaxed),
        total: f.stats.total.load(Ordering::Relaxed),
        failed: f.stats.refused.load(Ordering::Relaxed),
        bytes_sent: f.stats.sent.load(Ordering::Relaxed),
        bytes_received: f.stats.received.load(Ordering::Relaxed),
        last_error: f.stats.last_error.lock().unwrap().clone(),
        path: f.stats.path.lock().unwrap().clone(),
        source: if f.from_config { "config" } else { "api" }.to_string(),
    }
}
