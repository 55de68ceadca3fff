//! One task owns the Swarm. Everyone else holds a [`NodeHandle`](crate::handle::NodeHandle) and
//! sends [`Command`]s with oneshot replies; the loop answers them between swarm events.
//!
//! This file is the loop itself: it owns the Swarm and the peer book, tracks listeners and
//! connections, and hands each event to the room that deals with it:
//! - [`bootstrap`]: dialing the configured bootstrap peers, with backoff;
//! - [`connect`]: reaching a peer on demand (stored addresses, then lookups), and what a failed
//!   dial teaches us (wrong peer, own address);
//! - [`dht`]: the WAN and LAN Kademlia DHTs: finds, our own record, refreshes;
//! - [`identify`] and [`mdns`]: what peers tell us about themselves, and LAN discovery;
//! - [`holepunch`]: DCUtR outcomes, direct paths lost and punched again;
//! - [`relays`]: the relay service we offer and the reservations we hold (AutoRelay);
//! - [`status`]: what `warren status` and `warren peers` report.

mod birthday;
mod bootstrap;
mod connect;
mod dht;
mod holepunch;
mod identify;
mod mdns;
mod netcheck;
mod paths;
mod port_mapping;
mod relays;
mod status;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::{
    Multiaddr, PeerId, Swarm, autonat, core::ConnectedPoint, identify as libp2p_identify, kad, multiaddr::Protocol, ping,
    relay,
    core::transport::ListenerId,
    swarm::{ConnectionId, SwarmEvent, dial_opts::DialOpts},
};
use tokio::sync::mpsc;

use crate::addresses::{Policy, is_relayed, is_unspecified, transport_of, without_p2p};
use crate::api;
use crate::autorelay::AutoRelay;
use crate::behaviour::{Behaviour, BehaviourEvent};
use crate::config::Config;
use crate::error::error_chain;
use crate::handle::{Command, NodeHandle};
use crate::peer_record::{PeerBook, unix_now};
use crate::relay::RelayStats;
use crate::store::PeerStoreWriter;

use bootstrap::Bootstrap;
use connect::ConnectAttempt;
use dht::{Dht, PendingFind, Query};
use holepunch::HolePunch;

/// How often pending peer-store changes are handed to the writer.
const STORE_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// The first dials (stored peers, bootstrap peers) wait for every listener to report its
/// addresses, so that none of them is one of our own; at most this long.
const LISTENERS_SETTLE: Duration = Duration::from_secs(2);
/// Least time between two DHT bootstraps started to join (or rejoin) the network: a bootstrap
/// query takes a few seconds, and the routing table fills as it runs.
const REJOIN_INTERVAL: Duration = Duration::from_secs(30);

struct ConnInfo {
    peer: PeerId,
    address: Multiaddr,
    /// For an inbound connection, the local port it came in on.
    local_port: Option<u16>,
    outbound: bool,
    since: Instant,
    rtt: Option<Duration>,
}

pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    config: Config,
    book: PeerBook,
    writer: Option<PeerStoreWriter>,
    bootstrap: Bootstrap,
    conns: HashMap<ConnectionId, ConnInfo>,
    agents: HashMap<PeerId, String>,
    finds: HashMap<Query, PendingFind>,
    connects: HashMap<PeerId, ConnectAttempt>,
    connect_lookups: HashMap<Query, PeerId>,
    find_aliases: HashMap<Query, Query>,
    listen_addrs: Vec<Multiaddr>,
    started: Instant,
    /// The address policy, shared with the dial gate.
    policy: Arc<Mutex<Policy>>,
    /// Listeners that have not reported an address yet; the first dials wait for them.
    listeners_pending: HashSet<ListenerId>,
    first_dials_done: bool,
    /// Dials that reached another peer than the one dialed (stale addresses).
    wrong_peer_dials: u64,
    /// Re-dials after wrong-peer answers, per peer, since it last connected.
    redials: HashMap<PeerId, u8>,
    autorelay: AutoRelay,
    relay_stats: RelayStats,
    reservations_by_ip: Option<crate::relay::RelayByIp>,
    relay_advertised: bool,
    /// DHT lookups for relays under way, with how many more relays each may connect to.
    relay_lookups: HashMap<kad::QueryId, usize>,
    /// When our own provider record is next published, per DHT.
    own_record_due: HashMap<Dht, Instant>,
    /// Publications of ours (own record, relay announcement) that failed in a row, by DHT and
    /// key; at most four entries.
    publish_failures: HashMap<(Dht, kad::RecordKey), u32>,
    /// When our own provider record last reached the peers closest to it, per DHT, and which
    /// peers our routing table had closest to it then.
    own_record_published: HashMap<Dht, (Instant, std::collections::HashSet<PeerId>)>,
    /// When the DHTs' routing tables are next refreshed (see `dht::refresh_targets`).
    dht_refresh_due: Instant,
    /// When the relay service is next announced in the DHT (once it is advertised): at start and
    /// when the service changes, and again a while after an announcement that timed out; `None`
    /// once announced (Kademlia republishes it).
    relay_announce_due: Option<Instant>,
    hole_punch: HolePunch,
    /// When each peer's direct connections were last probed (see `paths`).
    path_checks: HashMap<PeerId, Instant>,
    /// Connections we closed because they went silent (a probe or pings unanswered): their
    /// closing counts as a failure, not as a close on purpose.
    silenced: HashSet<ConnectionId>,
    meter: Option<std::sync::Arc<crate::relay_meter::Meter>>,
    /// The port-mapping task's link, when port mapping is on.
    port_mapping: Option<port_mapping::Link>,
    /// Where public peers see us (identify), for the NAT type.
    observations: crate::nat::Observations,
    /// A `warren netcheck` round of QUIC probes under way.
    netcheck: Option<netcheck::Round>,
    /// When public peers were last asked where they see us after a lost direct connection.
    reobserved_at: Option<Instant>,
    /// When dials last went out to learn an unknown NAT mapping, and how many rounds in a row
    /// have not settled it.
    mapping_learned_at: Option<Instant>,
    mapping_learn_rounds: u32,
    /// Inbound punch offers being read at once (see `birthday::OFFERS_AT_ONCE`).
    offer_slots: Arc<tokio::sync::Semaphore>,
    birthday: birthday::Birthday,
    /// Our own handle, lent to the punch tasks the loop spawns.
    handle: NodeHandle,
    /// Inbound birthday-punch offers, and the listeners a punch opens.
    punch: Option<(warren_forward::Incoming, crate::punch::PunchListeners)>,
    /// Print listen addresses for the person who started the node (not in simulations).
    announce: bool,
    /// When a DHT bootstrap to join the network last started.
    joined_at: Option<Instant>,
    /// Per DHT: answers the running bootstrap (or refresh) query has had so far, over its steps.
    bootstrap_answers: HashMap<Dht, u32>,
    /// The DHTs whose last bootstrap or refresh nobody answered: their routing tables are
    /// stale (see [`EventLoop::has_live_dht_peers`]).
    unanswered_bootstrap: std::collections::HashSet<Dht>,
    /// Per DHT: when its last bootstrap or refresh ran to the end (see `dht::BOOTSTRAP_GAP`).
    bootstrapped_at: HashMap<Dht, Instant>,
    /// Routing-table refreshes under way, at most one per DHT.
    refreshes: HashMap<Dht, dht::Refresh>,
    /// Bootstraps being cut short, one step at a time (see `dht::BOOTSTRAP_GAP`).
    cut_bootstraps: std::collections::HashSet<dht::Query>,
}

impl EventLoop {
    pub fn new(
        swarm: Swarm<Behaviour>,
        config: Config,
        book: PeerBook,
        writer: PeerStoreWriter,
        policy: Arc<Mutex<Policy>>,
        listeners: impl IntoIterator<Item = ListenerId>,
    ) -> (Self, NodeHandle) {
        let (handle, commands) = NodeHandle::new(*swarm.local_peer_id(), swarm.behaviour().forward.direct());
        let now = Instant::now();
        let event_loop = Self {
            swarm,
            commands,
            book,
            writer: Some(writer),
            bootstrap: Bootstrap::new(&config.bootstrap, now),
            conns: HashMap::new(),
            agents: HashMap::new(),
            finds: HashMap::new(),
            connects: HashMap::new(),
            connect_lookups: HashMap::new(),
            find_aliases: HashMap::new(),
            listen_addrs: Vec::new(),
            started: now,
            policy,
            listeners_pending: listeners.into_iter().collect(),
            first_dials_done: false,
            wrong_peer_dials: 0,
            redials: HashMap::new(),
            autorelay: AutoRelay::new(if config.relay { 0 } else { config.auto_relays }, &config.relay_via),
            relay_stats: RelayStats::default(),
            reservations_by_ip: None,
            relay_advertised: config.relay_force,
            relay_lookups: Default::default(),
            own_record_due: HashMap::new(),
            publish_failures: HashMap::new(),
            own_record_published: HashMap::new(),
            dht_refresh_due: Instant::now() + dht::refresh_interval(&config),
            relay_announce_due: Some(Instant::now()),
            hole_punch: HolePunch::default(),
            path_checks: HashMap::new(),
            silenced: HashSet::new(),
            meter: None,
            port_mapping: None,
            observations: Default::default(),
            netcheck: None,
            reobserved_at: None,
            mapping_learned_at: None,
            mapping_learn_rounds: 0,
            offer_slots: Arc::new(tokio::sync::Semaphore::new(birthday::OFFERS_AT_ONCE)),
            birthday: birthday::Birthday::new(),
            handle: handle.clone(),
            punch: None,
            announce: true,
            joined_at: None,
            bootstrap_answers: HashMap::new(),
            unanswered_bootstrap: std::collections::HashSet::new(),
            bootstrapped_at: HashMap::new(),
            refreshes: HashMap::new(),
            cut_bootstraps: std::collections::HashSet::new(),
            config,
        };
        (event_loop, handle)
    }

    /// Gives the loop what the relay service shares with it (relay nodes only): the byte meter,
    /// for `warren status`, and the per-IP reservation table, told when reservations end.
    pub fn with_relay(
        mut self,
        meter: Option<std::sync::Arc<crate::relay_meter::Meter>>,
        by_ip: Option<crate::relay::RelayByIp>,
    ) -> Self {
        self.meter = meter;
        self.reservations_by_ip = by_ip;
        self
    }

    /// Gives the loop the punch offers the swarm accepts and the listeners a punch opens;
    /// without them the node neither offers nor takes birthday punches.
    pub fn with_punch(mut self, offers: warren_forward::Incoming, listeners: crate::punch::PunchListeners) -> Self {
        self.punch = Some((offers, listeners));
        self
    }

    /// Keeps the loop from printing its listen addresses (a simulation's many nodes).
    pub fn quiet(mut self) -> Self {
        self.announce = false;
        self
    }

    /// Connects the loop to the port-mapping task: it is told which ports to map (`ports`) and
    /// reports mappings (`events`).
    pub fn with_port_mapping(
        mut self,
        ports: tokio::sync::watch::Sender<Vec<(crate::port_mapping::Transport, u16)>>,
        events: mpsc::Receiver<crate::port_mapping::Event>,
    ) -> Self {
        self.port_mapping = Some(port_mapping::Link::new(ports, events));
        self
    }

    /// Runs until `shutdown` resolves, then writes the peer store out.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        {
            let mut policy = self.policy.lock().expect("policy lock");
            for (peer, record) in self.book.iter() {
                policy.seed(*peer, crate::addresses::Scopes(record.scopes));
            }
        }
        let mut tick = tokio::time::interval(STORE_FLUSH_INTERVAL);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some(command) = self.commands.recv() => self.on_command(command),
                Some(event) = async {
                    match &mut self.port_mapping {
                        Some(link) => link.events.recv().await,
                        None => std::future::pending().await,
                    }
                } => self.on_port_mapping(event),
                Some((peer, stream)) = async {
                    match &mut self.punch {
                        Some((offers, _)) => offers.recv().await,
                        None => std::future::pending().await,
                    }
                } => self.on_punch_offer(peer, stream),
                _ = tick.tick() => {
                    self.flush_store();
                    self.first_dials_when_ready();
                    self.dial_due_bootstrap_peers();
                    self.connects.retain(|_, a| a.waiters.iter().any(|w| !w.is_closed()));
                    self.manage_relays();
                    self.publish_own_record_when_due();
                    self.end_slow_publication_lookups();
                    self.refresh_dht_when_due();
                    self.repunch_when_due();
                    self.netcheck_when_due();
                    self.birthday_when_due();
                }
                _ = &mut shutdown => break,
            }
        }
        tracing::info!("shutting down; writing the peer store");
        if let Some(writer) = self.writer.take() {
            writer.finish(self.book.take_changes());
        }
    }

    /// The first dials go out once every listener has reported its addresses (or after
    /// [`LISTENERS_SETTLE`]): before that, a stored address of a peer may be one of our own.
    fn first_dials_when_ready(&mut self) {
        if self.first_dials_done || (!self.listeners_pending.is_empty() && self.started.elapsed() < LISTENERS_SETTLE) {
            return;
        }
        self.first_dials_done = true;
        self.rejoin_from_store();
    }

    /// Dials the most useful stored peers and feeds DHT-capable ones to Kademlia, so a node
    /// started without bootstrap rejoins the network it knew.
    fn rejoin_from_store(&mut self) {
        // Bootstrap peers are dialed next, on their configured address, with their own backoff.
        let best: Vec<PeerId> = self
            .book
            .best(self.config.rejoin_dials)
            .into_iter()
            .map(|(peer, _)| peer)
            .filter(|peer| !self.bootstrap.contains(peer))
            .collect();
        if best.is_empty() {
            return;
        }
        tracing::info!(peers = best.len(), stored = self.book.len(), "rejoining through stored peers");
        for peer in best {
            self.feed_dhts(peer);
            let addrs = self.dialable(peer);
            if !addrs.is_empty() {
                let _ = self.swarm.dial(DialOpts::peer_id(peer).addresses(addrs).build());
            }
        }
    }

    /// A peer's stored addresses that the policy lets us dial, best first.
    fn dialable(&self, peer: PeerId) -> Vec<Multiaddr> {
        let policy = self.policy.lock().expect("policy lock");
        let addrs = self.book.get(&peer).map(|r| r.addresses()).unwrap_or_default();
        addrs.into_iter().filter(|a| policy.may_dial(Some(peer), a).is_ok()).collect()
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

    /// The direct (not relayed) connections to `peer`.
    fn direct_conns(&self, peer: PeerId) -> impl Iterator<Item = (&ConnectionId, &ConnInfo)> {
        self.conns.iter().filter(move |(_, c)| c.peer == peer && !is_relayed(&c.address))
    }

    /// Whether a direct (not relayed) connection to `peer` is open.
    fn has_direct(&self, peer: PeerId) -> bool {
        self.direct_conns(peer).next().is_some()
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Peers(reply) => {
                let _ = reply.send(self.peers());
            }
            Command::Find(peer, reply) => self.find(peer, reply),
            Command::Netcheck(reply) => self.netcheck(reply),
            Command::Connect(peer, reply) => self.connect(peer, reply),
            Command::OpenStream(peer, protocol, reply) => self.swarm.behaviour_mut().forward.open(peer, protocol, reply),
            Command::PunchAdmit(peer, ip, last_try, reply) => {
                let _ = reply.send(self.punch_admit(peer, ip, last_try));
            }
            Command::PunchDial(peer, addr, reply) => {
                self.punch_dial(peer, addr);
                birthday::answered(reply);
            }
            Command::PunchDone(peer, outcome, reply) => {
                self.punch_done(peer, outcome);
                birthday::answered(reply);
            }
            Command::CheckPaths(peer) => self.check_paths(peer),
            Command::PathSilent(peer, connection, silent, started) => self.on_path_silent(peer, connection, silent, started),
            Command::HeldRecord(peer, reply) => {
                use libp2p::kad::store::RecordStore as _;
                let held = self.swarm.behaviour_mut().kad.store_mut().providers(&dht::peer_key(&peer));
                let _ = reply.send(held.into_iter().find(|r| r.provider == peer).map(|r| r.addresses));
            }
            Command::RoutingTable(reply) => {
                let peers = self.swarm.behaviour_mut().kad.kbuckets().flat_map(|b| b.iter().map(|e| *e.node.key.preimage()).collect::<Vec<_>>()).collect();
                let _ = reply.send(peers);
            }
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

    /// Our own addresses, as `warren find` of our own PeerId reports them: listen addresses
    /// (wildcards expanded by the listeners) and confirmed external ones.
    fn own_addresses(&self) -> Vec<Multiaddr> {
        let mut out: Vec<Multiaddr> = self.swarm.external_addresses().cloned().collect();
        for addr in &self.listen_addrs {
            if !is_unspecified(addr) && !out.contains(addr) {
                out.push(addr.clone());
            }
        }
        out
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { listener_id, address } => {
                let full = address.clone().with(Protocol::P2p(*self.swarm.local_peer_id()));
                tracing::info!(addr = %full, "listening");
                if self.announce {
                    println!("listening on {full}");
                }
                if self.autorelay.is_relay_listener(listener_id) {
                    self.autorelay.on_listening(listener_id);
                    self.own_record_changed();
                } else if self.config.relay_force && !is_relayed(&address) && !is_unspecified(&address) {
                    // A forced relay serves without AutoNAT's confirmation; reservations must
                    // carry the relay's addresses, so its listen addresses stand in.
                    self.swarm.add_external_address(address.clone());
                }
                self.policy.lock().expect("policy lock").on_listen_addr(&address, true);
                self.listen_addrs.push(address);
                self.update_mapped_ports();
                if self.listeners_pending.remove(&listener_id) && self.listeners_pending.is_empty() {
                    // Every listener has reported: the first dials need not wait for the tick.
                    self.first_dials_when_ready();
                    self.dial_due_bootstrap_peers();
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.policy.lock().expect("policy lock").on_listen_addr(&address, false);
                self.listen_addrs.retain(|a| a != &address);
                self.update_mapped_ports();
            }
            SwarmEvent::ListenerClosed { listener_id, addresses, reason } => {
                {
                    let mut policy = self.policy.lock().expect("policy lock");
                    for address in &addresses {
                        policy.on_listen_addr(address, false);
                    }
                }
                self.listeners_pending.remove(&listener_id);
                self.listen_addrs.retain(|a| !addresses.contains(a));
                self.update_mapped_ports();
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
                let scope = {
                    let mut policy = self.policy.lock().expect("policy lock");
                    policy.on_connection(peer_id, &address, true);
                    policy.scope(&address)
                };
                let worked = without_p2p(&address);
                let punched = self.birthday.is_punched_addr(&address);
                self.book.update(peer_id, |r| {
                    r.last_seen = now;
                    if let Some(scope) = scope {
                        let mut scopes = crate::addresses::Scopes(r.scopes);
                        scopes.insert(scope);
                        r.scopes = scopes.0;
                    }
                    if outbound && !punched {
                        r.last_dial_ok = Some(now);
                        r.addr_worked(worked, now);
                    }
                });
                self.autorelay.on_connected(peer_id);
                self.redials.remove(&peer_id);
                let first_bootstrap = self.bootstrap.on_connected(&peer_id);
                // One DHT bootstrap to join, and another whenever the node has lost every DHT
                // peer; the periodic refresh does the rest. (Every bootstrap peer that answered
                // at start used to start one: four queries at once where one does.) The routing
                // tables are looked at only for a bootstrap peer, not on every connection.
                let joins = self.bootstrap.contains(&peer_id)
                    && num_established.get() == 1
                    && (first_bootstrap
                        || (self.joined_at.is_none_or(|t| t.elapsed() >= REJOIN_INTERVAL) && !self.has_live_dht_peers()));
                if joins {
                    self.joined_at = Some(Instant::now());
                    tracing::info!(peer = %peer_id, "connected to bootstrap peer; bootstrapping the DHT");
                    // Either may have no peers yet (identify feeds them next): then Kademlia
                    // bootstraps by itself once the first peer is added.
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                    let _ = self.swarm.behaviour_mut().lan_kad.bootstrap();
                }
                if !is_relayed(&address) {
                    self.hole_punch.on_direct(peer_id);
                } else {
                    let direct = self.conns.values().any(|c| c.peer == peer_id && !is_relayed(&c.address));
                    if outbound && !direct {
                        self.hole_punch.on_relayed_dial(peer_id, address.clone(), Instant::now());
                    } else {
                        self.hole_punch.on_relayed_connection(peer_id, Instant::now());
                    }
                }
                let local_port = match &endpoint {
                    ConnectedPoint::Listener { local_addr, .. } => crate::addresses::endpoint_of(local_addr).map(|(_, p)| p.number()),
                    ConnectedPoint::Dialer { .. } => None,
                };
                self.conns.insert(connection_id, ConnInfo { peer: peer_id, address, local_port, outbound, since: Instant::now(), rtt: None });
                self.finish_connect(&peer_id, Ok(()));
                self.on_probe_event(connection_id, Some(true));
            }
            SwarmEvent::ConnectionClosed { peer_id, connection_id, num_established, cause, .. } => {
                if let Some(conn) = self.conns.remove(&connection_id) {
                    self.policy.lock().expect("policy lock").on_connection(peer_id, &conn.address, false);
                    if is_relayed(&conn.address) {
                        tracing::info!(peer = %peer_id, addr = %conn.address, cause = ?cause.as_ref().map(|c| c.to_string()), "relayed connection closed");
                    } else if num_established > 0 {
                        self.direct_lost(peer_id, connection_id);
                    }
                }
                self.hole_punch.on_connection_closed(connection_id);
                let silenced = self.silenced.remove(&connection_id);
                let failed = silenced || matches!(cause, Some(libp2p::swarm::ConnectionError::IO(_)));
                self.birthday_connection_closed(peer_id, connection_id, failed);
                if num_established == 0 {
                    self.hole_punch.on_disconnected(&peer_id);
                    self.birthday.on_disconnected(&peer_id);
                    if let Some(by_ip) = &self.reservations_by_ip {
                        by_ip.on_disconnected(&peer_id);
                    }
                    self.autorelay.on_disconnected(peer_id);
                    let now = unix_now();
                    self.book.update(peer_id, |r| r.last_seen = now);
                    self.agents.remove(&peer_id);
                    tracing::info!(peer = %peer_id, cause = ?cause.map(|c| c.to_string()), "peer disconnected");
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, connection_id, error } => {
                self.on_probe_event(connection_id, Some(false));
                if let Some(peer) = peer_id {
                    self.on_dial_failure(peer, &error);
                }
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                tracing::info!(addr = %address, "external address confirmed");
                self.policy.lock().expect("policy lock").on_external_addr(&address, true);
                self.own_record_changed();
            }
            SwarmEvent::ExternalAddrExpired { address } => {
                tracing::info!(addr = %address, "external address expired");
                self.policy.lock().expect("policy lock").on_external_addr(&address, false);
                self.own_record_changed();
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Identify(libp2p_identify::Event::Received { peer_id, info, connection_id }) => {
                self.on_observed(connection_id, &info.observed_addr);
                self.on_identify(peer_id, info);
            }
            BehaviourEvent::Ping(ping::Event { connection, result: Ok(rtt), .. }) => {
                if let Some(conn) = self.conns.get_mut(&connection) {
                    conn.rtt = Some(rtt);
                }
            }
            // A peer that does not speak ping is fine; only silence counts.
            BehaviourEvent::Ping(ping::Event { result: Err(ping::Failure::Unsupported), .. }) => {}
            BehaviourEvent::Ping(ping::Event { peer, connection, result: Err(error) }) => {
                // Ping reports only after two failures in a row, an interval apart (25 s and
                // more of silence). A connection that has gone silent is dropped when something
                // can take its place: a relay we hold a reservation on is replaced, and a peer
                // with another connection (a direct path that died beside a relayed one) moves
                // its new streams there. TCP would otherwise keep a dead connection for many
                // minutes.
                let held_relay = self.autorelay.held().any(|h| h.relay == peer);
                let has_other = self.conns.iter().any(|(id, c)| c.peer == peer && *id != connection);
                if held_relay || has_other {
                    tracing::warn!(peer = %peer, %error, "connection stopped answering pings; dropping it");
                    if self.swarm.close_connection(connection) {
                        self.silenced.insert(connection);
                    }
                }
            }
            BehaviourEvent::Mdns(libp2p::mdns::Event::Discovered(found)) => self.on_mdns_discovered(found),
            BehaviourEvent::Kad(event) => self.on_kad_event(Dht::Wan, event),
            BehaviourEvent::LanKad(event) => self.on_kad_event(Dht::Lan, event),
            BehaviourEvent::Autonat(autonat::Event::StatusChanged { old, new }) => {
                tracing::info!(from = ?old, to = ?new, "reachability changed");
                self.on_reachability(new);
            }
            BehaviourEvent::Relay(event) => self.on_relay_event(event),
            BehaviourEvent::RelayClient(relay::client::Event::ReservationReqAccepted { relay_peer_id, renewal, .. }) => {
                if renewal {
                    self.autorelay.on_renewal(relay_peer_id);
                }
            }
            BehaviourEvent::Dcutr(libp2p::dcutr::Event { remote_peer_id, result }) => self.on_hole_punch(remote_peer_id, result),
            _ => {}
        }
    }
}
