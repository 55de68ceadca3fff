//! One task owns the Swarm. Everyone else holds a [`NodeHandle`] and sends [`Command`]s with
//! oneshot replies; the loop answers them between swarm events.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::{
    Multiaddr, PeerId, Swarm, autonat, core::ConnectedPoint, identify, kad, mdns, multiaddr::Protocol, ping,
    swarm::{ConnectionId, DialError, SwarmEvent, dial_opts::DialOpts},
};
use tokio::sync::{mpsc, oneshot};

use crate::behaviour::{AGENT, Behaviour, BehaviourEvent};
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
    waiters: Vec<oneshot::Sender<Result<(), String>>>,
}

struct PendingFind {
    peer: PeerId,
    started: Instant,
    reply: oneshot::Sender<api::FindReply>,
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
    listen_addrs: Vec<Multiaddr>,
    started: Instant,
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
            config,
            book,
            writer: Some(writer),
            bootstrap,
            conns: HashMap::new(),
            agents: HashMap::new(),
            finds: HashMap::new(),
            connects: HashMap::new(),
            connect_lookups: HashMap::new(),
            listen_addrs: Vec::new(),
            started: now,
        };
        (event_loop, handle)
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
                let id = self.swarm.behaviour_mut().kad.get_closest_peers(peer);
                self.finds.insert(id, PendingFind { peer, started: Instant::now(), reply });
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
        let stage = if known.is_empty() {
            self.connect_lookups.insert(self.swarm.behaviour_mut().kad.get_closest_peers(peer), peer);
            ConnectStage::LookingUp
        } else {
            let _ = self.swarm.dial(DialOpts::peer_id(peer).addresses(known).extend_addresses_through_behaviour().build());
            ConnectStage::DialingKnown
        };
        self.connects.insert(peer, ConnectAttempt { stage, waiters: vec![reply] });
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
                let id = self.swarm.behaviour_mut().kad.get_closest_peers(peer);
                self.connect_lookups.insert(id, peer);
            }
            ConnectStage::DialingFound => self.finish_connect(&peer, Err(format!("cannot reach the peer: {error}"))),
            ConnectStage::LookingUp => {}
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let full = address.clone().with(Protocol::P2p(*self.swarm.local_peer_id()));
                tracing::info!(addr = %full, "listening");
                println!("listening on {full}");
                self.listen_addrs.push(address);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
            }
            SwarmEvent::ListenerError { error, .. } => tracing::warn!(%error, "listener error"),
            SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, num_established, .. } => {
                let (address, outbound) = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => (address.clone(), true),
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
                if let Some(state) = self.bootstrap.get_mut(&peer_id) {
                    state.dialing = false;
                    state.backoff = BOOTSTRAP_BACKOFF_MIN;
                    tracing::info!(peer = %peer_id, "connected to bootstrap peer; bootstrapping the DHT");
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                }
                self.conns.insert(connection_id, ConnInfo { peer: peer_id, address, outbound, since: Instant::now(), rtt: None });
                self.finish_connect(&peer_id, Ok(()));
            }
            SwarmEvent::ConnectionClosed { peer_id, connection_id, num_established, cause, .. } => {
                self.conns.remove(&connection_id);
                if num_established == 0 {
                    let now = unix_now();
                    self.book.update(peer_id, |r| r.last_seen = now);
                    self.agents.remove(&peer_id);
                    tracing::info!(peer = %peer_id, cause = ?cause.map(|c| c.to_string()), "peer disconnected");
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. } => self.on_dial_failure(peer, &error),
            SwarmEvent::ExternalAddrConfirmed { address } => tracing::info!(addr = %address, "external address confirmed"),
            SwarmEvent::ExternalAddrExpired { address } => tracing::info!(addr = %address, "external address expired"),
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
            }
            _ => {}
        }
    }

    fn on_identify(&mut self, peer: PeerId, info: identify::Info) {
        let now = unix_now();
        let protocols: Vec<String> = info.protocols.iter().map(|p| p.to_string()).collect();
        let speaks_dht = protocols.iter().any(|p| *p == self.config.kad_protocol);
        let usable: Vec<Multiaddr> = info.listen_addrs.into_iter().filter(is_dialable).collect();
        if speaks_dht {
            for addr in &usable {
                self.swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
            }
        }
        self.book.update(peer, |r| {
            usable.iter().for_each(|a| r.observe_addr(a.clone(), now));
            r.set_protocols(protocols);
        });
        self.agents.insert(peer, info.agent_version);
    }

    fn on_kad_event(&mut self, event: kad::Event) {
        match event {
            kad::Event::OutboundQueryProgressed { id, result: kad::QueryResult::GetClosestPeers(result), .. } => {
                let peers = match result {
                    Ok(ok) => ok.peers,
                    Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                };
                if let Some(find) = self.finds.remove(&id) {
                    let mut addrs = addresses_of(&find.peer, &peers);
                    // The lookup reports addresses that other peers returned; a target that was
                    // already in our routing table comes back without them.
                    if peers.iter().any(|p| p.peer_id == find.peer) {
                        for addr in self.routing_table_addresses(&find.peer) {
                            if !addrs.contains(&addr) {
                                addrs.push(addr);
                            }
                        }
                    }
                    if !addrs.is_empty() {
                        let now = unix_now();
                        self.book.update(find.peer, |r| addrs.iter().for_each(|a| r.observe_addr(a.clone(), now)));
                    }
                    let _ = find.reply.send(api::FindReply {
                        peer_id: find.peer.to_string(),
                        found: peers.iter().any(|p| p.peer_id == find.peer),
                        addrs: addrs.iter().map(|a| a.to_string()).collect(),
                        elapsed_ms: find.started.elapsed().as_secs_f64() * 1000.0,
                    });
                } else if let Some(peer) = self.connect_lookups.remove(&id) {
                    let addrs = addresses_of(&peer, &peers);
                    if self.swarm.is_connected(&peer) {
                        self.finish_connect(&peer, Ok(()));
                    } else if addrs.is_empty() {
                        self.finish_connect(&peer, Err("the peer is not in the DHT and no address of it is known".into()));
                    } else if let Some(attempt) = self.connects.get_mut(&peer) {
                        attempt.stage = ConnectStage::DialingFound;
                        let _ = self.swarm.dial(DialOpts::peer_id(peer).addresses(addrs).build());
                    }
                }
            }
            kad::Event::OutboundQueryProgressed { result: kad::QueryResult::Bootstrap(Ok(_)), step, .. } if step.last => {
                tracing::info!(routing_table = self.routing_table_size(), "DHT bootstrap finished");
            }
            kad::Event::ModeChanged { new_mode } => tracing::info!(mode = %new_mode, "DHT mode changed"),
            _ => {}
        }
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
        }
    }

    fn peers(&self) -> Vec<api::PeerEntry> {
        let mut by_peer: HashMap<PeerId, Vec<&ConnInfo>> = HashMap::new();
        for conn in self.conns.values() {
            by_peer.entry(conn.peer).or_default().push(conn);
        }
        let mut entries: Vec<api::PeerEntry> = by_peer
            .into_iter()
            .map(|(peer, mut conns)| {
                conns.sort_by_key(|c| c.since);
                api::PeerEntry {
                    peer_id: peer.to_string(),
                    agent: self.agents.get(&peer).cloned(),
                    connections: conns
                        .into_iter()
                        .map(|c| api::Connection {
                            address: c.address.to_string(),
                            transport: transport_of(&c.address).to_string(),
                            path: if is_relayed(&c.address) { "relayed" } else { "direct" }.to_string(),
                            direction: if c.outbound { "outbound" } else { "inbound" }.to_string(),
                            rtt_ms: c.rtt.map(|d| d.as_secs_f64() * 1000.0),
                            age_secs: c.since.elapsed().as_secs(),
                        })
                        .collect(),
                }
            })
            .collect();
        entries.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        entries
    }
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
