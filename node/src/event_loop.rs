//! One task owns the Swarm. Everyone else holds a [`NodeHandle`] and sends [`Command`]s with
//! oneshot replies; the loop answers them between swarm events.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::{
    Multiaddr, PeerId, Swarm, autonat, core::ConnectedPoint, dcutr, identify, kad, mdns, multiaddr::Protocol, ping,
    relay,
    swarm::{ConnectionId, DialError, SwarmEvent, dial_opts::DialOpts},
};
use tokio::sync::{mpsc, oneshot};

use crate::autorelay::{AutoRelay, RELAYS_KEY, circuit_listen_addr};
use crate::behaviour::{AGENT, Behaviour, BehaviourEvent};
use crate::relay::{Cidr, RelayStats, is_public_addr};
use crate::config::{Config, DhtMode, bootstrap_peer};
use crate::control::api;
use crate::peer_record::PeerBook;
use crate::store::{PeerStoreWriter, unix_now};

/// Commands queued for the event loop at most; senders wait beyond that.
const COMMAND_QUEUE: usize = 64;
/// How often pending peer-store changes are handed to the writer.
const STORE_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// First and largest wait between dials of an unreachable bootstrap peer.
const BOOTSTRAP_BACKOFF_MIN: Duration = Duration::from_secs(2);
const BOOTSTRAP_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Our own provider record (how peers find our relayed addresses by PeerId) is published this
/// long after our external addresses last changed, so a burst of changes costs one publication.
const OWN_RECORD_SETTLE: Duration = Duration::from_millis(200);

pub enum Command {
    Status(oneshot::Sender<api::Status>),
    Peers(oneshot::Sender<Vec<api::PeerEntry>>),
    /// Looks a peer up in the DHT.
    Find(PeerId, oneshot::Sender<api::FindReply>),
    /// Makes sure we have a connection to the peer: stored addresses, then a DHT lookup.
    Connect(PeerId, oneshot::Sender<Result<(), String>>),
    /// Adds synthetic records to the peer store (diagnostics and crash tests).
    StoreChurn(u32, oneshot::Sender<api::ChurnReply>),
}

/// A cloneable way to talk to the event loop.
#[derive(Clone)]
pub struct NodeHandle {
    tx: mpsc::Sender<Command>,
    pub peer_id: PeerId,
    pub stream: libp2p_stream::Control,
}

impl NodeHandle {
    pub async fn request<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, String> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| "the node is shutting down".to_string())?;
        rx.await.map_err(|_| "the node is shutting down".to_string())
    }
}

struct ConnInfo {
    peer: PeerId,
    address: Multiaddr,
    outbound: bool,
    since: Instant,
    rtt: Option<Duration>,
}

struct BootstrapPeer {
    addr: Multiaddr,
    next_attempt: Instant,
    backoff: Duration,
    dialing: bool,
}

enum ConnectStage {
    DialingKnown,
    LookingUp,
    DialingFound,
}

struct ConnectAttempt {
    stage: ConnectStage,
    /// DHT lookups still running (closest peers, providers of the peer's own key).
    lookups: u8,
    waiters: Vec<oneshot::Sender<Result<(), String>>>,
}

struct PendingFind {
    peer: PeerId,
    started: Instant,
    /// Lookups still running; the reply goes out when none is left.
    lookups: u8,
    found: bool,
    addrs: Vec<Multiaddr>,
    reply: oneshot::Sender<api::FindReply>,
}

/// A peer's relayed-to-direct story, for `warren peers` and the hole-punch figures.
struct PunchInfo {
    first_relayed: Instant,
}

/// Waits before re-punching after a direct connection died while a relayed one survives;
/// then the peer is left on the relay (it keeps working) until a new relayed connection.
const REPUNCH_BACKOFF: [Duration; 3] = [Duration::from_secs(1), Duration::from_secs(10), Duration::from_secs(60)];

/// A pending re-punch: a new relayed connection through `circuit` makes the peer's DCUtR
/// (the listening side of a relayed connection starts it) try again.
struct Repunch {
    circuit: Multiaddr,
    due: Instant,
    attempt: usize,
}

pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    config: Config,
    book: PeerBook,
    writer: Option<PeerStoreWriter>,
    bootstrap: HashMap<PeerId, BootstrapPeer>,
    conns: HashMap<ConnectionId, ConnInfo>,
    agents: HashMap<PeerId, String>,
    finds: HashMap<kad::QueryId, PendingFind>,
    connects: HashMap<PeerId, ConnectAttempt>,
    connect_lookups: HashMap<kad::QueryId, PeerId>,
    find_aliases: HashMap<kad::QueryId, kad::QueryId>,
    listen_addrs: Vec<Multiaddr>,
    started: Instant,
    public_ranges: Vec<Cidr>,
    autorelay: AutoRelay,
    relay_stats: RelayStats,
    relay_advertised: bool,
    relay_lookups: std::collections::HashSet<kad::QueryId>,
    own_record_due: Option<Instant>,
    /// When the DHT's routing table is next refreshed (a bootstrap query).
    dht_refresh_due: Instant,
    relay_announced: bool,
    punch: HashMap<PeerId, PunchInfo>,
    punched: HashMap<ConnectionId, Duration>,
    hole_punch: api::HolePunchStats,
    repunch: HashMap<PeerId, Repunch>,
    meter: Option<std::sync::Arc<crate::relay_meter::Meter>>,
}

impl EventLoop {
    pub fn new(
        swarm: Swarm<Behaviour>,
        config: Config,
        book: PeerBook,
        writer: PeerStoreWriter,
    ) -> (Self, NodeHandle) {
        let (tx, commands) = mpsc::channel(COMMAND_QUEUE);
        let handle = NodeHandle { tx, peer_id: *swarm.local_peer_id(), stream: swarm.behaviour().stream.new_control() };
        let now = Instant::now();
        let bootstrap = config
            .bootstrap
            .iter()
            .filter_map(|addr| {
                let peer = bootstrap_peer(addr).ok()?;
                Some((peer, BootstrapPeer { addr: addr.clone(), next_attempt: now, backoff: BOOTSTRAP_BACKOFF_MIN, dialing: false }))
            })
            .collect();
        let event_loop = Self {
            swarm,
            commands,
            book,
            writer: Some(writer),
            bootstrap,
            conns: HashMap::new(),
            agents: HashMap::new(),
            finds: HashMap::new(),
            connects: HashMap::new(),
            connect_lookups: HashMap::new(),
            find_aliases: HashMap::new(),
            listen_addrs: Vec::new(),
            started: now,
            public_ranges: config.public_ranges().unwrap_or_default(),
            autorelay: AutoRelay::new(if config.relay { 0 } else { config.auto_relays }, &config.relay_via),
            relay_stats: RelayStats::default(),
            relay_advertised: config.relay_force,
            relay_lookups: Default::default(),
            own_record_due: None,
            dht_refresh_due: Instant::now() + config.bootstrap_interval(),
            relay_announced: false,
            punch: HashMap::new(),
            punched: HashMap::new(),
            hole_punch: api::HolePunchStats::default(),
            repunch: HashMap::new(),
            meter: None,
            config,
        };
        (event_loop, handle)
    }

    /// Gives the loop the relay's byte meter (relay nodes only), for `warren status`.
    pub fn with_meter(mut self, meter: Option<std::sync::Arc<crate::relay_meter::Meter>>) -> Self {
        self.meter = meter;
        self
    }

    /// Runs until `shutdown` resolves, then writes the peer store out.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        self.rejoin_from_store();
        let mut tick = tokio::time::interval(STORE_FLUSH_INTERVAL);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some(command) = self.commands.recv() => self.on_command(command),
                _ = tick.tick() => {
                    self.flush_store();
                    self.dial_due_bootstrap_peers();
                    self.connects.retain(|_, a| a.waiters.iter().any(|w| !w.is_closed()));
                    self.manage_relays();
                    self.publish_own_record_when_due();
                    self.refresh_dht_when_due();
                    self.repunch_when_due();
                }
                _ = &mut shutdown => break,
            }
        }
        tracing::info!("shutting down; writing the peer store");
        if let Some(writer) = self.writer.take() {
            writer.finish(self.book.take_changes());
        }
    }

    /// Dials the most useful stored peers and feeds DHT-capable ones to Kademlia, so a node
    /// started without bootstrap rejoins the network it knew.
    fn rejoin_from_store(&mut self) {
        let kad_protocol = self.config.kad_protocol.clone();
        let best: Vec<(PeerId, Vec<Multiaddr>, bool)> = self
            .book
            .best(self.config.rejoin_dials)
            .into_iter()
            .map(|(peer, record)| (peer, record.addresses(), record.supports(&kad_protocol)))
            .collect();
        if best.is_empty() {
            return;
        }
        tracing::info!(peers = best.len(), stored = self.book.len(), "rejoining through stored peers");
        for (peer, addrs, dht) in best {
            if dht {
                for addr in &addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
                }
            }
            let _ = self.swarm.dial(DialOpts::peer_id(peer).addresses(addrs).build());
        }
    }

    fn dial_due_bootstrap_peers(&mut self) {
        let now = Instant::now();
        for (peer, state) in &mut self.bootstrap {
            if state.dialing || state.next_attempt > now || self.swarm.is_connected(peer) {
                continue;
            }
            state.dialing = true;
            self.swarm.behaviour_mut().kad.add_address(peer, state.addr.clone());
            tracing::info!(peer = %peer, addr = %state.addr, "dialing bootstrap peer");
            if let Err(e) = self.swarm.dial(DialOpts::peer_id(*peer).addresses(vec![state.addr.clone()]).build()) {
                state.dialing = false;
                state.next_attempt = now + state.backoff;
                tracing::warn!(peer = %peer, error = %e, "cannot dial bootstrap peer");
            }
        }
    }

    fn flush_store(&mut self) {
        let Some(writer) = &self.writer else { return };
        let changes = self.book.take_changes();
        if changes.is_empty() {
            return;
        }
        if let Err(back) = writer.try_write(changes) {
            self.book.restore(back);
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Peers(reply) => {
                let _ = reply.send(self.peers());
            }
            Command::Find(peer, reply) => {
                let kad = &mut self.swarm.behaviour_mut().kad;
                let closest = kad.get_closest_peers(peer);
                let providers = kad.get_providers(peer_key(&peer));
                let find = PendingFind { peer, started: Instant::now(), lookups: 2, found: false, addrs: Vec::new(), reply };
                // Both queries lead to the same pending find; the second id points at the first.
                self.finds.insert(closest, find);
                self.find_aliases.insert(providers, closest);
            }
            Command::Connect(peer, reply) => self.connect(peer, reply),
            Command::StoreChurn(count, reply) => {
                let now = unix_now();
                for _ in 0..count {
                    // Loopback port 1 (tcpmux) listens nowhere: a restarted node that dials these
                    // synthetic peers sends nothing beyond this machine and fails at once.
                    let addr: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().expect("valid synthetic address");
                    self.book.update(PeerId::random(), |r| {
                        r.observe_addr(addr, now);
                        r.set_protocols(["/ipfs/id/1.0.0".to_string(), "/ipfs/ping/1.0.0".to_string()]);
                    });
                }
                self.flush_store();
                let _ = reply.send(api::ChurnReply { inserted: count });
            }
        }
    }

    fn connect(&mut self, peer: PeerId, reply: oneshot::Sender<Result<(), String>>) {
        if self.swarm.is_connected(&peer) {
            let _ = reply.send(Ok(()));
            return;
        }
        if peer == *self.swarm.local_peer_id() {
            let _ = reply.send(Err("that is this node's own PeerId".into()));
            return;
        }
        if let Some(attempt) = self.connects.get_mut(&peer) {
            attempt.waiters.push(reply);
            return;
        }
        let known = self.book.get(&peer).map(|r| r.addresses()).unwrap_or_default();
        let (stage, lookups) = if known.is_empty() {
            self.start_connect_lookups(peer);
            (ConnectStage::LookingUp, 2)
        } else {
            let _ = self.swarm.dial(DialOpts::peer_id(peer).addresses(known).extend_addresses_through_behaviour().build());
            (ConnectStage::DialingKnown, 0)
        };
        self.connects.insert(peer, ConnectAttempt { stage, lookups, waiters: vec![reply] });
    }

    /// Looks a peer up two ways at once: the peers closest to its id (finds DHT servers), and
    /// providers of its own key (finds nodes behind NATs, which publish their relayed
    /// addresses that way since they are not in anyone's routing table).
    fn start_connect_lookups(&mut self, peer: PeerId) {
        let kad = &mut self.swarm.behaviour_mut().kad;
        let closest = kad.get_closest_peers(peer);
        let providers = kad.get_providers(peer_key(&peer));
        self.connect_lookups.insert(closest, peer);
        self.connect_lookups.insert(providers, peer);
    }

    /// One of a connect attempt's lookups ended with these addresses for the peer.
    fn on_connect_lookup(&mut self, peer: PeerId, addrs: Vec<Multiaddr>, done: bool) {
        if self.swarm.is_connected(&peer) {
            self.finish_connect(&peer, Ok(()));
            return;
        }
        let Some(attempt) = self.connects.get_mut(&peer) else { return };
        if done {
            attempt.lookups = attempt.lookups.saturating_sub(1);
        }
        if !addrs.is_empty() && !matches!(attempt.stage, ConnectStage::DialingFound) {
            attempt.stage = ConnectStage::DialingFound;
            let now = unix_now();
            self.book.update(peer, |r| addrs.iter().for_each(|a| r.observe_addr(a.clone(), now)));
            let _ = self.swarm.dial(DialOpts::peer_id(peer).addresses(addrs).extend_addresses_through_behaviour().build());
        } else if attempt.lookups == 0 && matches!(attempt.stage, ConnectStage::LookingUp) {
            self.finish_connect(&peer, Err("the peer is not in the DHT and no address of it is known".into()));
        }
    }

    fn finish_connect(&mut self, peer: &PeerId, result: Result<(), String>) {
        if let Some(attempt) = self.connects.remove(peer) {
            for waiter in attempt.waiters {
                let _ = waiter.send(result.clone());
            }
        }
    }

    fn on_dial_failure(&mut self, peer: PeerId, error: &DialError) {
        if let Some(state) = self.bootstrap.get_mut(&peer) {
            state.dialing = false;
            state.next_attempt = Instant::now() + state.backoff;
            tracing::warn!(peer = %peer, addr = %state.addr, retry_in = ?state.backoff, error = %error, "bootstrap peer unreachable; will retry");
            state.backoff = (state.backoff * 2).min(BOOTSTRAP_BACKOFF_MAX);
        }
        let Some(attempt) = self.connects.get_mut(&peer) else { return };
        match attempt.stage {
            ConnectStage::DialingKnown => {
                attempt.stage = ConnectStage::LookingUp;
                attempt.lookups = 2;
                self.start_connect_lookups(peer);
            }
            ConnectStage::DialingFound => self.finish_connect(&peer, Err(format!("cannot reach the peer: {error}"))),
            ConnectStage::LookingUp => {}
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { listener_id, address } => {
                let full = address.clone().with(Protocol::P2p(*self.swarm.local_peer_id()));
                tracing::info!(addr = %full, "listening");
                println!("listening on {full}");
                if self.autorelay.is_relay_listener(listener_id) {
                    self.autorelay.on_listening(listener_id);
                    self.own_record_due = Some(Instant::now() + OWN_RECORD_SETTLE);
                } else if self.config.relay_force && !is_relayed(&address) && is_dialable(&address) {
                    // A forced relay serves without AutoNAT's confirmation; reservations must
                    // carry the relay's addresses, so its listen addresses stand in.
                    self.swarm.add_external_address(address.clone());
                }
                self.listen_addrs.push(address);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
            }
            SwarmEvent::ListenerClosed { listener_id, addresses, reason } => {
                self.listen_addrs.retain(|a| !addresses.contains(a));
                self.autorelay.on_listener_closed(listener_id, reason.map_err(|e| error_chain(&e)));
            }
            SwarmEvent::ListenerError { error, .. } => tracing::warn!(%error, "listener error"),
            SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, num_established, .. } => {
                let (address, outbound) = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => (address.clone(), true),
                    // An inbound relayed connection's remote address says nothing useful; the
                    // circuit address it arrived on names the relay and the hop's transport.
                    ConnectedPoint::Listener { local_addr, .. } if endpoint.is_relayed() => (local_addr.clone(), false),
                    ConnectedPoint::Listener { send_back_addr, .. } => (send_back_addr.clone(), false),
                };
                if num_established.get() == 1 {
                    tracing::info!(peer = %peer_id, addr = %address, transport = transport_of(&address), "peer connected");
                }
                let now = unix_now();
                self.book.update(peer_id, |r| {
                    r.last_seen = now;
                    if outbound {
                        r.last_dial_ok = Some(now);
                        r.observe_addr(address.clone(), now);
                    }
                });
                self.autorelay.on_connected(peer_id);
                if let Some(state) = self.bootstrap.get_mut(&peer_id) {
                    state.dialing = false;
                    state.backoff = BOOTSTRAP_BACKOFF_MIN;
                    tracing::info!(peer = %peer_id, "connected to bootstrap peer; bootstrapping the DHT");
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                }
                if is_relayed(&address) {
                    self.punch.entry(peer_id).or_insert(PunchInfo { first_relayed: Instant::now() });
                }
                self.conns.insert(connection_id, ConnInfo { peer: peer_id, address, outbound, since: Instant::now(), rtt: None });
                self.finish_connect(&peer_id, Ok(()));
            }
            SwarmEvent::ConnectionClosed { peer_id, connection_id, num_established, cause, .. } => {
                if let Some(conn) = self.conns.remove(&connection_id) {
                    if is_relayed(&conn.address) {
                        tracing::info!(peer = %peer_id, addr = %conn.address, cause = ?cause.as_ref().map(|c| c.to_string()), "relayed connection closed");
                    } else if num_established > 0 {
                        self.direct_lost(peer_id);
                    }
                }
                self.punched.remove(&connection_id);
                if num_established == 0 {
                    self.punch.remove(&peer_id);
                    self.autorelay.on_disconnected(peer_id);
                    let now = unix_now();
                    self.book.update(peer_id, |r| r.last_seen = now);
                    self.agents.remove(&peer_id);
                    tracing::info!(peer = %peer_id, cause = ?cause.map(|c| c.to_string()), "peer disconnected");
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. } => self.on_dial_failure(peer, &error),
            SwarmEvent::ExternalAddrConfirmed { address } => {
                tracing::info!(addr = %address, "external address confirmed");
                self.own_record_due = Some(Instant::now() + OWN_RECORD_SETTLE);
            }
            SwarmEvent::ExternalAddrExpired { address } => {
                tracing::info!(addr = %address, "external address expired");
                self.own_record_due = Some(Instant::now() + OWN_RECORD_SETTLE);
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => self.on_identify(peer_id, info),
            BehaviourEvent::Ping(ping::Event { connection, result: Ok(rtt), .. }) => {
                if let Some(conn) = self.conns.get_mut(&connection) {
                    conn.rtt = Some(rtt);
                }
            }
            // A peer that does not speak ping is fine; only silence counts.
            BehaviourEvent::Ping(ping::Event { result: Err(ping::Failure::Unsupported), .. }) => {}
            BehaviourEvent::Ping(ping::Event { peer, connection, result: Err(error) }) => {
                // Ping reports only after two failures in a row (10 s and more of silence). A
                // connection that has gone silent is dropped when something can take its place:
                // a relay we hold a reservation on is replaced, and a peer with another
                // connection (a direct path that died beside a relayed one) moves its new
                // streams there. TCP would otherwise keep a dead connection for many minutes.
                let held_relay = self.autorelay.held().any(|h| h.relay == peer);
                let has_other = self.conns.iter().any(|(id, c)| c.peer == peer && *id != connection);
                if held_relay || has_other {
                    tracing::warn!(peer = %peer, %error, "connection stopped answering pings; dropping it");
                    self.swarm.close_connection(connection);
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                for (peer, addr) in found {
                    by_peer.entry(peer).or_default().push(addr);
                }
                let now = unix_now();
                for (peer, addrs) in by_peer {
                    self.book.update(peer, |r| addrs.iter().for_each(|a| r.observe_addr(a.clone(), now)));
                    if !self.swarm.is_connected(&peer) {
                        tracing::info!(peer = %peer, "found on the LAN by mDNS");
                        let _ = self.swarm.dial(DialOpts::peer_id(peer).addresses(addrs).build());
                    }
                }
            }
            BehaviourEvent::Kad(event) => self.on_kad_event(event),
            BehaviourEvent::Autonat(autonat::Event::StatusChanged { old, new }) => {
                tracing::info!(from = ?old, to = ?new, "reachability changed");
                if self.config.dht_mode == DhtMode::Auto {
                    let mode = match new {
                        autonat::NatStatus::Public(_) => kad::Mode::Server,
                        _ => kad::Mode::Client,
                    };
                    self.swarm.behaviour_mut().kad.set_mode(Some(mode));
                }
            }
            BehaviourEvent::Relay(event) => self.on_relay_event(event),
            BehaviourEvent::RelayClient(relay::client::Event::ReservationReqAccepted { relay_peer_id, renewal, .. }) => {
                if renewal {
                    self.autorelay.on_renewal(relay_peer_id);
                }
            }
            BehaviourEvent::Dcutr(dcutr::Event { remote_peer_id, result }) => self.on_hole_punch(remote_peer_id, result),
            _ => {}
        }
    }

    fn on_identify(&mut self, peer: PeerId, info: identify::Info) {
        let now = unix_now();
        let protocols: Vec<String> = info.protocols.iter().map(|p| p.to_string()).collect();
        let speaks_dht = protocols.contains(&self.config.kad_protocol);
        let usable: Vec<Multiaddr> = info.listen_addrs.into_iter().filter(is_dialable).collect();
        if speaks_dht {
            // A DHT server with public addresses is given to Kademlia with those only: its LAN
            // addresses would only make every lookup by others wait on dials that cannot work.
            let public: Vec<&Multiaddr> = usable.iter().filter(|a| is_public_addr(a, &self.public_ranges)).collect();
            let for_dht: Vec<&Multiaddr> = if public.is_empty() { usable.iter().collect() } else { public };
            for addr in for_dht {
                self.swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
            }
        }
        let offers_hop = protocols.iter().any(|p| *p == relay::HOP_PROTOCOL_NAME.as_ref());
        let relay_addrs: Vec<Multiaddr> = if offers_hop {
            let mut addrs: Vec<Multiaddr> = self
                .conns
                .values()
                .filter(|c| c.peer == peer && c.outbound && is_public_addr(&c.address, &self.public_ranges))
                .map(|c| without_p2p(&c.address))
                .collect();
            addrs.extend(usable.iter().filter(|a| is_public_addr(a, &self.public_ranges)).map(without_p2p));
            addrs.dedup();
            addrs
        } else {
            Vec::new()
        };
        self.autorelay.on_identify(peer, relay_addrs);
        self.book.update(peer, |r| {
            usable.iter().for_each(|a| r.observe_addr(a.clone(), now));
            r.set_protocols(protocols);
        });
        self.agents.insert(peer, info.agent_version);
    }

    fn on_relay_event(&mut self, event: relay::Event) {
        match &event {
            relay::Event::StatusChanged { status } => {
                self.relay_advertised = *status == relay::Status::Enable;
                tracing::info!(advertised = self.relay_advertised, "relay service status changed");
                // Announced (again) by the next tick once enabled.
                self.relay_announced = false;
            }
            relay::Event::ReservationReqDenied { src_peer_id, status } => {
                tracing::info!(peer = %src_peer_id, ?status, "relay reservation denied");
            }
            relay::Event::CircuitReqDenied { src_peer_id, dst_peer_id, status } => {
                tracing::info!(src = %src_peer_id, dst = %dst_peer_id, ?status, "relay circuit denied");
            }
            relay::Event::CircuitClosed { src_peer_id, dst_peer_id, error: Some(error) } => {
                tracing::info!(src = %src_peer_id, dst = %dst_peer_id, %error, "relay circuit cut");
            }
            _ => {}
        }
        self.relay_stats.on_event(&event);
    }

    /// Tells the DHT this node relays, so nodes without candidates can find it. Once per
    /// advertisement, when the DHT has peers to store the record (Kademlia republishes it).
    fn announce_relay_when_due(&mut self) {
        if !self.relay_advertised || self.relay_announced || self.routing_table_size() == 0 {
            return;
        }
        self.relay_announced = true;
        if let Err(e) = self.swarm.behaviour_mut().kad.start_providing(kad::RecordKey::new(&RELAYS_KEY)) {
            tracing::warn!(error = %e, "cannot announce the relay service in the DHT");
        }
    }

    /// Adds or drops relay reservations as reachability and candidates change.
    fn manage_relays(&mut self) {
        let public = matches!(self.swarm.behaviour().autonat.nat_status(), autonat::NatStatus::Public(_));
        let can_look_up = self.routing_table_size() > 0;
        let swarm = &self.swarm;
        let actions = self.autorelay.tick(!public, can_look_up, |peer| swarm.is_connected(peer));
        for (relay, addr) in actions.dial {
            let _ = self.swarm.dial(DialOpts::peer_id(relay).addresses(vec![addr]).build());
        }
        for (relay, relay_addr, pinned) in actions.reserve {
            match self.swarm.listen_on(circuit_listen_addr(relay, &relay_addr)) {
                Ok(id) => {
                    tracing::info!(relay = %relay, addr = %relay_addr, pinned, "reserving a slot on a relay");
                    self.autorelay.reserving(id, relay, relay_addr, pinned);
                }
                Err(e) => self.autorelay.reserve_failed(relay, e.to_string()),
            }
        }
        for id in actions.release {
            tracing::info!("publicly reachable: releasing an automatic relay reservation");
            self.swarm.remove_listener(id);
        }
        if actions.lookup {
            let id = self.swarm.behaviour_mut().kad.get_providers(kad::RecordKey::new(&RELAYS_KEY));
            self.relay_lookups.insert(id);
        }
        self.announce_relay_when_due();
    }

    /// Refreshes the routing table every `bootstrap_interval_secs` once it has peers. libp2p's own
    /// periodic bootstrap is off: on a node with no peers yet (the first of a network, say) it
    /// warned "Failed to trigger bootstrap" every time. (libp2p still bootstraps by itself when
    /// few peers are known, and tries once when a listen address appears.)
    fn refresh_dht_when_due(&mut self) {
        if Instant::now() < self.dht_refresh_due {
            return;
        }
        self.dht_refresh_due = Instant::now() + self.config.bootstrap_interval();
        if self.routing_table_size() > 0
            && let Err(e) = self.swarm.behaviour_mut().kad.bootstrap()
        {
            tracing::debug!(error = %e, "DHT refresh not started");
        }
    }

    /// Publishes this node as provider of its own key, carrying its current external addresses
    /// (relayed ones included): how a node behind a NAT is found by PeerId.
    fn publish_own_record_when_due(&mut self) {
        let Some(due) = self.own_record_due else { return };
        if Instant::now() < due || self.routing_table_size() == 0 {
            return;
        }
        self.own_record_due = None;
        let key = peer_key(self.swarm.local_peer_id());
        if let Err(e) = self.swarm.behaviour_mut().kad.start_providing(key) {
            tracing::warn!(error = %e, "cannot publish our addresses in the DHT");
        }
    }

    /// A direct connection to `peer` closed. If only relayed connections remain, new streams
    /// already use them; if we dialed one of them, dial the circuit again later so the peer's
    /// DCUtR tries another punch.
    fn direct_lost(&mut self, peer: PeerId) {
        let mine = self.conns.values().filter(|c| c.peer == peer);
        let mut circuit = None;
        for conn in mine {
            if !is_relayed(&conn.address) {
                return; // another direct connection is still up
            }
            if conn.outbound {
                circuit = Some(conn.address.clone());
            }
        }
        tracing::info!(peer = %peer, "direct connection lost; new streams use the relay");
        // A later punch is timed from now, not from the first contact long ago.
        self.punch.insert(peer, PunchInfo { first_relayed: Instant::now() });
        if let Some(circuit) = circuit {
            let attempt = self.repunch.get(&peer).map_or(0, |r| r.attempt);
            if let Some(wait) = REPUNCH_BACKOFF.get(attempt) {
                self.repunch.insert(peer, Repunch { circuit, due: Instant::now() + *wait, attempt });
            }
        }
    }

    fn repunch_when_due(&mut self) {
        let now = Instant::now();
        let due: Vec<PeerId> = self.repunch.iter().filter(|(_, r)| r.due <= now).map(|(p, _)| *p).collect();
        for peer in due {
            let Some(mut r) = self.repunch.remove(&peer) else { continue };
            let direct = self.conns.values().any(|c| c.peer == peer && !is_relayed(&c.address));
            if direct || !self.swarm.is_connected(&peer) {
                continue;
            }
            tracing::info!(peer = %peer, attempt = r.attempt + 1, "re-dialing through the relay to punch again");
            let opts = DialOpts::peer_id(peer)
                .condition(libp2p::swarm::dial_opts::PeerCondition::Always)
                .addresses(vec![r.circuit.clone()])
                .build();
            let _ = self.swarm.dial(opts);
            r.attempt += 1;
            if let Some(wait) = REPUNCH_BACKOFF.get(r.attempt) {
                r.due = now + *wait;
                self.repunch.insert(peer, r);
            }
        }
    }

    fn on_hole_punch(&mut self, peer: PeerId, result: Result<ConnectionId, dcutr::Error>) {
        self.hole_punch.attempts += 1;
        match result {
            Ok(connection) => {
                let after = self.punch.get(&peer).map(|p| p.first_relayed.elapsed()).unwrap_or_default();
                let transport = self.conns.get(&connection).map(|c| transport_of(&c.address)).unwrap_or("other");
                match transport {
                    "quic" => self.hole_punch.successes_quic += 1,
                    _ => self.hole_punch.successes_tcp += 1,
                }
                self.punched.insert(connection, after);
                self.repunch.remove(&peer);
                tracing::info!(peer = %peer, transport, after_ms = after.as_millis() as u64, "hole punched: direct connection");
            }
            Err(e) => {
                self.hole_punch.failures += 1;
                self.hole_punch.last_error = Some(format!("{peer}: {e}"));
                tracing::info!(peer = %peer, error = %e, "hole punching failed; staying on the relay");
            }
        }
    }

    fn on_kad_event(&mut self, event: kad::Event) {
        match event {
            kad::Event::OutboundQueryProgressed { id, result: kad::QueryResult::GetClosestPeers(result), .. } => {
                let peers = match result {
                    Ok(ok) => ok.peers,
                    Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                };
                if let Some(target) = self.finds.get(&id).map(|f| f.peer) {
                    let mut addrs = addresses_of(&target, &peers);
                    let found = peers.iter().any(|p| p.peer_id == target);
                    // The lookup reports addresses that other peers returned; a target that was
                    // already in our routing table comes back without them.
                    if found {
                        addrs.extend(self.routing_table_addresses(&target));
                    }
                    self.on_find_progress(id, found, addrs, true);
                } else if let Some(peer) = self.connect_lookups.remove(&id) {
                    let addrs = addresses_of(&peer, &peers);
                    self.on_connect_lookup(peer, addrs, true);
                }
            }
            kad::Event::OutboundQueryProgressed { id, result: kad::QueryResult::GetProviders(result), step, .. } => {
                let providers = match result {
                    Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => providers,
                    _ => Default::default(),
                };
                let done = step.last;
                if self.relay_lookups.contains(&id) {
                    for relay in providers {
                        if relay != *self.swarm.local_peer_id() && !self.swarm.is_connected(&relay) {
                            tracing::info!(relay = %relay, "found a relay in the DHT; connecting");
                            let _ = self.swarm.dial(DialOpts::peer_id(relay).build());
                        }
                    }
                    if done {
                        self.relay_lookups.remove(&id);
                    }
                    return;
                }
                let find = self.find_aliases.get(&id).copied();
                let target = find.and_then(|f| self.finds.get(&f)).map(|f| f.peer).or_else(|| self.connect_lookups.get(&id).copied());
                let Some(target) = target else { return };
                // The providers' addresses live in the running query; ask Kademlia for them the
                // way a dial would.
                let addrs = if providers.contains(&target) { self.kad_addresses(target) } else { Vec::new() };
                if let Some(find) = find {
                    if done {
                        self.find_aliases.remove(&id);
                    }
                    self.on_find_progress(find, !addrs.is_empty(), addrs, done);
                } else {
                    if done {
                        self.connect_lookups.remove(&id);
                    }
                    self.on_connect_lookup(target, addrs, done);
                }
            }
            kad::Event::OutboundQueryProgressed { result: kad::QueryResult::Bootstrap(Ok(_)), step, .. } if step.last => {
                tracing::info!(routing_table = self.routing_table_size(), "DHT bootstrap finished");
            }
            kad::Event::ModeChanged { new_mode } => tracing::info!(mode = %new_mode, "DHT mode changed"),
            _ => {}
        }
    }

    /// Addresses Kademlia knows for a peer: routing table and running queries.
    fn kad_addresses(&mut self, peer: PeerId) -> Vec<Multiaddr> {
        use libp2p::swarm::NetworkBehaviour as _;
        self.swarm
            .behaviour_mut()
            .kad
            .handle_pending_outbound_connection(
                ConnectionId::new_unchecked(0),
                Some(peer),
                &[],
                libp2p::core::Endpoint::Dialer,
            )
            .unwrap_or_default()
    }

    fn on_find_progress(&mut self, id: kad::QueryId, found: bool, addrs: Vec<Multiaddr>, done: bool) {
        let Some(find) = self.finds.get_mut(&id) else { return };
        find.found |= found;
        for addr in addrs {
            if !find.addrs.contains(&addr) {
                find.addrs.push(addr);
            }
        }
        if done {
            find.lookups = find.lookups.saturating_sub(1);
        }
        if find.lookups > 0 {
            return;
        }
        let find = self.finds.remove(&id).expect("present above");
        if !find.addrs.is_empty() {
            let now = unix_now();
            self.book.update(find.peer, |r| find.addrs.iter().for_each(|a| r.observe_addr(a.clone(), now)));
        }
        let _ = find.reply.send(api::FindReply {
            peer_id: find.peer.to_string(),
            found: find.found,
            addrs: find.addrs.iter().map(|a| a.to_string()).collect(),
            elapsed_ms: find.started.elapsed().as_secs_f64() * 1000.0,
        });
    }

    fn routing_table_addresses(&mut self, peer: &PeerId) -> Vec<Multiaddr> {
        let mut out = Vec::new();
        for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
            for entry in bucket.iter() {
                if entry.node.key.preimage() == peer {
                    out.extend(entry.node.value.iter().cloned());
                }
            }
        }
        out
    }

    fn routing_table_size(&mut self) -> usize {
        self.swarm.behaviour_mut().kad.kbuckets().map(|b| b.num_entries()).sum()
    }

    fn status(&mut self) -> api::Status {
        let reachability = match self.swarm.behaviour().autonat.nat_status() {
            autonat::NatStatus::Public(_) => "public",
            autonat::NatStatus::Private => "private",
            autonat::NatStatus::Unknown => "unknown",
        };
        let dht_mode = self.swarm.behaviour().kad.mode().to_string().to_lowercase();
        api::Status {
            peer_id: self.swarm.local_peer_id().to_string(),
            agent: AGENT.to_string(),
            listen_addrs: self.listen_addrs.iter().map(|a| a.to_string()).collect(),
            external_addrs: self.swarm.external_addresses().map(|a| a.to_string()).collect(),
            reachability: reachability.to_string(),
            dht_mode,
            dht_mode_setting: match self.config.dht_mode {
                DhtMode::Server => "server",
                DhtMode::Client => "client",
                DhtMode::Auto => "auto",
            }
            .to_string(),
            kad_protocol: self.config.kad_protocol.clone(),
            connected_peers: self.swarm.connected_peers().count(),
            connections: self.conns.len(),
            routing_table_peers: self.routing_table_size(),
            stored_peers: self.book.len(),
            peer_store_writes: self.writer.as_ref().map(|w| w.writes.load(std::sync::atomic::Ordering::Relaxed)).unwrap_or(0),
            uptime_secs: self.started.elapsed().as_secs(),
            relayed_through: self
                .autorelay
                .held()
                .map(|h| api::HeldReservation {
                    relay: h.relay.to_string(),
                    relay_addr: h.relay_addr.to_string(),
                    pinned: h.pinned,
                    accepted: h.accepted_at.is_some(),
                    renewals: h.renewals,
                    age_secs: h.accepted_at.map(|t| t.elapsed().as_secs()),
                })
                .collect(),
            relay_candidates: self.autorelay.candidates(),
            relay_last_error: self.autorelay.last_error.clone(),
            relay: self.config.relay.then(|| {
                let r = &self.relay_stats;
                api::RelayStatus {
                    advertised: self.relay_advertised,
                    reservation_peers: r.reservations.len(),
                    reservations: r.reservations.values().map(|n| u64::from(*n)).sum(),
                    circuits: r.circuits.values().map(|n| u64::from(*n)).sum(),
                    reservations_accepted: r.reservations_accepted,
                    reservations_denied: r.reservations_denied,
                    circuits_accepted: r.circuits_accepted,
                    circuits_denied: r.circuits_denied,
                    circuits_cut: r.circuits_cut,
                    relayed_bytes: self.meter.as_ref().map_or(0, |m| m.relayed()),
                    last_denial: r.last_denial.clone(),
                    last_cut: r.last_cut.clone(),
                    limits: self.config.relay_limits.clone(),
                }
            }),
            hole_punch: self.hole_punch.clone(),
        }
    }

    fn peers(&self) -> Vec<api::PeerEntry> {
        let mut by_peer: HashMap<PeerId, Vec<(&ConnectionId, &ConnInfo)>> = HashMap::new();
        for (id, conn) in &self.conns {
            by_peer.entry(conn.peer).or_default().push((id, conn));
        }
        let mut entries: Vec<api::PeerEntry> = by_peer
            .into_iter()
            .map(|(peer, mut conns)| {
                conns.sort_by_key(|(_, c)| c.since);
                api::PeerEntry {
                    peer_id: peer.to_string(),
                    agent: self.agents.get(&peer).cloned(),
                    connections: conns
                        .into_iter()
                        .map(|(id, c)| api::Connection {
                            address: c.address.to_string(),
                            transport: transport_of(&c.address).to_string(),
                            path: if is_relayed(&c.address) { "relayed" } else { "direct" }.to_string(),
                            direction: if c.outbound { "outbound" } else { "inbound" }.to_string(),
                            rtt_ms: c.rtt.map(|d| d.as_secs_f64() * 1000.0),
                            age_secs: c.since.elapsed().as_secs(),
                            punched_after_ms: self.punched.get(id).map(|d| d.as_secs_f64() * 1000.0),
                        })
                        .collect(),
                }
            })
            .collect();
        entries.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        entries
    }
}

/// The DHT key under which a node publishes itself as provider (its relayed addresses).
fn peer_key(peer: &PeerId) -> kad::RecordKey {
    kad::RecordKey::new(&peer.to_bytes())
}

/// The addresses a lookup returned for `peer`.
fn addresses_of(peer: &PeerId, found: &[kad::PeerInfo]) -> Vec<Multiaddr> {
    found.iter().filter(|p| &p.peer_id == peer).flat_map(|p| p.addrs.iter().cloned()).collect()
}

/// Addresses worth remembering and handing to the DHT: not unspecified.
fn is_dialable(addr: &Multiaddr) -> bool {
    !addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}

/// An error with its causes, `outer: inner: innermost` (libp2p errors often say little on top).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// An address without its `/p2p/PEER` parts.
pub fn without_p2p(addr: &Multiaddr) -> Multiaddr {
    addr.iter().filter(|p| !matches!(p, Protocol::P2p(_))).collect()
}

pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

pub fn transport_of(addr: &Multiaddr) -> &'static str {
    // A relayed address names the relay's transport first; what counts is the last one before
    // /p2p-circuit, which is the hop we actually use.
    let mut transport = "other";
    for p in addr.iter() {
        match p {
            Protocol::QuicV1 => transport = "quic",
            Protocol::Tcp(_) if transport != "quic" => transport = "tcp",
            Protocol::P2pCircuit => break,
            _ => {}
        }
    }
    transport
}
