//! `warren up`: opens the store, builds the swarm, listens, serves the control socket and runs
//! the event loop until Ctrl-C or SIGTERM, then shuts down in order (control socket first, then
//! the swarm, then the peer store is written out).

use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::behaviour::{Wire, build_swarm_over};
use crate::handle::NodeHandle;
use crate::addresses::Policy;
use crate::config::Config;
use crate::control::server;
use crate::error::UserError;
use crate::event_loop::EventLoop;
use crate::forward::Forwarding;
use crate::shutdown::Shutdown;
use crate::peer_record::PeerBook;
use crate::store::Store;

/// Port-mapping reports waiting for the event loop (a few an hour; see `port_mapping`).
const PORT_MAPPING_EVENTS: usize = 64;

pub async fn up(data_dir: &Path, mut config: Config) -> Result<(), UserError> {
    let defaults = config.listen_is_default();
    // Ports are checked before the store is touched, so a refused start leaves no trace on disk.
    // From here on `config.listen` is what we really listen on (a busy default port replaced),
    // which the address policy needs to tell our own addresses from a neighbour's.
    config.listen = crate::ports::choose(&config.listen, defaults)?;
    run(data_dir, config, defaults, Wire::Sockets, shutdown_signal(), |_| {}).await
}

/// Runs a node until `stop` resolves, then shuts it down in order; `ready` gets its handle once
/// it listens. `up` runs it on real sockets with `config.listen` checked first; a simulation
/// runs many in one process over its own wire. `defaults`: the listen addresses are warren's
/// defaults, so one that cannot be bound is skipped rather than fatal.
pub async fn run(
    data_dir: &Path,
    mut config: Config,
    defaults: bool,
    wire: Wire,
    stop: impl std::future::Future<Output = ()>,
    ready: impl FnOnce(NodeHandle),
) -> Result<(), UserError> {
    // The lines a person starting `warren up` reads; a simulation's thousands of nodes stay quiet.
    let announce = matches!(wire, Wire::Sockets);
    let fd_limit = crate::resources::raise_fd_limit();
    let cap = crate::resources::incoming_cap(config.max_incoming_connections, fd_limit);
    if cap < config.max_incoming_connections {
        tracing::warn!(
            fd_limit,
            configured = config.max_incoming_connections,
            cap,
            "the open-file limit holds fewer incoming connections than configured; raise it (ulimit -n, LimitNOFILE=) to allow more"
        );
        config.max_incoming_connections = cap;
    }
    let store = Store::open(data_dir)?;
    let peer_id = store.peer_id();
    if store.new_identity {
        tracing::info!(peer = %peer_id, "created a new identity");
    }
    let book = PeerBook::new(config.max_stored_peers, store.load_peers(), crate::peer_record::unix_now());
    let policy = Arc::new(Mutex::new(Policy::new(config.public_ranges()?, &config.bootstrap, &config.listen)));
    let built = build_swarm_over(store.keypair.clone(), &config, policy.clone(), wire)
        .map_err(|e| UserError::operation(format!("cannot set up networking: {e}")))?;
    let mut swarm = built.swarm;
    let mut listeners = Vec::new();
    for addr in &config.listen {
        match swarm.listen_on(addr.clone()) {
            Ok(id) => listeners.push(id),
            Err(e) if defaults => tracing::warn!(%addr, error = %e, "skipping a default listen address"),
            Err(e) => {
                return Err(UserError::bad_input(format!(
                    "cannot listen on {addr}: {e}; pass a different --listen address"
                )));
            }
        }
    }
    if listeners.is_empty() && (defaults || !config.listen.is_empty()) {
        return Err(UserError::bad_input(
            "none of the default listen addresses could be bound (see the warnings above): pass --listen, e.g. --listen /ip4/0.0.0.0/udp/0/quic-v1",
        ));
    }
    if config.listen.is_empty() {
        if config.relay_via.is_empty() && config.auto_relays == 0 {
            tracing::warn!("no listen address and no relay: this node can dial out, but nobody can reach it");
        } else {
            tracing::info!("no direct listen address: reachable only through relays");
        }
    }
    let metrics = match config.metrics {
        Some(addr) => Some(crate::metrics::bind(addr).await.map_err(|e| {
            UserError::bad_input(format!("cannot serve metrics on {addr}: {e}; pass another --metrics address"))
        })?),
        None => None,
    };
    let (listener, socket_path) = server::bind(data_dir).await?;
    if announce {
        println!("warren node {peer_id}");
        println!("data dir {}", data_dir.display());
    }
    tracing::info!(peer = %peer_id, data_dir = %data_dir.display(), stored_peers = book.len(), "node starting");

    let writer = store.spawn_writer();
    let udp_idle = std::time::Duration::from_secs(config.udp_idle_timeout_secs);
    let (exposes, forwards) = (config.expose.clone(), config.forward.clone());
    let port_mapping = config.port_mapping;
    let (event_loop, handle) = EventLoop::new(swarm, config, book, writer, policy, listeners);
    let mut event_loop =
        event_loop.with_relay(built.meter, built.reservations_by_ip).with_punch(built.punch_offers, built.punch_listeners);
    if !announce {
        event_loop = event_loop.quiet();
    }
    let shutdown = Shutdown::new();
    if port_mapping {
        let (ports_tx, ports_rx) = tokio::sync::watch::channel(Vec::new());
        let (events_tx, events_rx) = tokio::sync::mpsc::channel(PORT_MAPPING_EVENTS);
        event_loop = event_loop.with_port_mapping(ports_tx, events_rx);
        let watcher = shutdown.clone();
        shutdown.spawn_watching(async move {
            let report = move |event| {
                // The loop keeps up with a handful of events an hour; a full queue means it is
                // shutting down.
                let _ = events_tx.try_send(event);
            };
            crate::port_mapping::run(ports_rx, report, async move { watcher.begun().await }).await;
        });
    }
    let forwarding = Forwarding::new(handle.clone(), udp_idle, store.tree("forwarding")?, shutdown.clone());
    forwarding.restore(&exposes, &forwards).await.map_err(|e| UserError::bad_input(e.to_string()))?;
    shutdown.spawn(crate::forward::serve::run(forwarding.clone(), built.inbound));
    shutdown.spawn(crate::paths::answer(built.probes));
    if let Some(metrics) = metrics {
        shutdown.spawn(crate::metrics::serve(metrics, handle.clone(), forwarding.clone()));
    }
    ready(handle.clone());
    shutdown.spawn(server::serve(listener, handle, forwarding));

    // Shutdown, in the order `crate::shutdown` documents: stop accepting and end the tasks in
    // flight while the swarm still runs, then close the swarm, which writes the peer store out.
    let (close_swarm, swarm_closing) = tokio::sync::oneshot::channel::<()>();
    let stop = async {
        stop.await;
        tracing::info!("shutting down: accepting nothing new, ending the connections in flight");
        let left = shutdown.stop_tasks().await;
        if left > 0 {
            tracing::warn!(left, grace = ?crate::shutdown::GRACE, "tasks still running after the grace period; closing the swarm anyway");
        }
        let _ = close_swarm.send(());
    };
    let run = event_loop.run(async {
        let _ = swarm_closing.await;
    });
    tokio::join!(run, stop);
    let _ = std::fs::remove_file(&socket_path);
    drop(store);
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
