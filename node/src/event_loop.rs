//! One task owns the Swarm. Everyone else holds a [`NodeHandle`] and sends [`Command`]s with
//! oneshot replies; the loop answers them between swarm events.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::{
    Multiaddr, PeerId, Swarm, autonat, core::ConnectedPoint, dcutr, identify, kad, mdns, multiaddr::Protocol, ping,
    relay,
    core::transport::ListenerId,
    swarm::{ConnectionId, DialError, SwarmEvent, dial_opts::DialOpts},
};
use tokio::sync::{mpsc, oneshot};

use crate::autorelay::{AutoRelay, RELAYS_KEY, circuit_listen_addr};
use crate::behaviour::{AGENT, Behaviour, BehaviourEvent};
use crate::addresses::{Policy, Scope, is_relayed, is_unspecified, without_p2p};
use crate::relay::RelayStats;
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
/// The first dials (stored peers, bootstrap peers) wait for every listener to report its
/// addresses, so that none of them is one of our own; at most this long.
const LISTENERS_SETTLE: Duration = Duration::from_secs(2);
/// Re-dials of one peer after wrong-peer answers, until it connects: each drops the address
/// that answered wrongly, but an address another behaviour keeps offering (mDNS's cache, say)
/// would otherwise be re-dialed forever.
const MAX_WRONG_PEER_REDIALS: u8 = 4;

/// Which of the two DHTs (see [`crate::behaviour::Behaviour::lan_kad`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Dht {
    Wan,
    Lan,
}

/// A DHT query: query ids count per Kademlia instance, so they are told apart by DHT.
type Query = (Dht, kad::QueryId);
/// Lookups a connect attempt runs at once (see `start_connect_lookups`).
const CONNECT_LOOKUPS: u8 = 4;

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
    /// Every configured address of the peer (`--bootstrap` given once per transport, say),
    /// dialed together so the first to connect wins.
    addrs: Vec<Multiaddr>,
    next_attempt: Instant,
    backoff: Duration,
    /// Dials in flight (one per transport).
    dialing: usize,
}

enum ConnectStage {
    DialingKnown,
    LookingUp,
    DialingFound,
}

struct ConnectAttempt {
    stage: ConnectStage,
    /// DHT lookups still running (closest peers in both DHTs, providers of the peer's own key).
    lookups: u8,
    /// Why the last dial failed, reported if the lookups find nothing better.
    last_error: Option<String>,
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
/// then the peer is left on the relay (it keeps working) until a new relayed connection. Each
/// attempt is one relayed dial and a DCUtR exchange; a path that comes back within the first
/// half minute is found within 5-10 s (with 1, 10, 60 s the lab's restored path was sometimes
/// missed for a whole minute: a restore just after the 10 s attempt waited for the 60 s one).
const REPUNCH_BACKOFF: [Duration; 6] = [
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(20),
    Duration::from_secs(60),
];

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
    relay_advertised: bool,
    relay_lookups: std::collections::HashSet<kad::QueryId>,
    /// When our own provider record is next published, per DHT.
    own_record_due: HashMap<Dht, Instant>,
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
        policy: Arc<Mutex<Policy>>,
        listeners: impl IntoIterator<Item = ListenerId>,
    ) -> (Self, NodeHandle) {
        let (tx, commands) = mpsc::channel(COMMAND_QUEUE);
        let handle = NodeHandle { tx, peer_id: *swarm.local_peer_id(), stream: swarm.behaviour().stream.new_control() };
        let now = Instant::now();
        let mut bootstrap: HashMap<PeerId, BootstrapPeer> = HashMap::new();
        for addr in &config.bootstrap {
            let Ok(peer) = bootstrap_peer(addr) else { continue };
            let state = bootstrap.entry(peer).or_insert_with(|| BootstrapPeer {
                addrs: Vec::new(),
                next_attempt: now,
                backoff: BOOTSTRAP_BACKOFF_MIN,
                dialing: 0,
            });
            let addr = without_p2p(addr);
            if !state.addrs.contains(&addr) {
                state.addrs.push(addr);
            }
        }
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
            policy,
            listeners_pending: listeners.into_iter().collect(),
            first_dials_done: false,
            wrong_peer_dials: 0,
            redials: HashMap::new(),
            autorelay: AutoRelay::new(if config.relay { 0 } else { config.auto_relays }, &config.relay_via),
            relay_stats: RelayStats::default(),
            relay_advertised: config.relay_force,
            relay_lookups: Default::default(),
            own_record_due: HashMap::new(),
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
                _ = tick.tick() => {
                    self.flush_store();
                    self.first_dials_when_ready();
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
            .filter(|peer| !self.bootstrap.contains_key(peer))
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

    /// Gives each DHT the stored addresses of `peer` that belong there, if it speaks that DHT.
    fn feed_dhts(&mut self, peer: PeerId) {
        let Some(record) = self.book.get(&peer) else { return };
        let (wan, lan) = {
            let policy = self.policy.lock().expect("policy lock");
            let lan_protocol = crate::addresses::lan_kad_protocol(&self.config.kad_protocol);
            let addrs = record.addresses();
            let wan: Vec<Multiaddr> = if record.supports(&self.config.kad_protocol) {
                addrs.iter().filter(|a| policy.for_wan_dht(a)).cloned().collect()
            } else {
                Vec::new()
            };
            let lan: Vec<Multiaddr> = if record.supports(&lan_protocol) {
                addrs.iter().filter(|a| policy.for_lan_dht(&peer, a)).cloned().collect()
            } else {
                Vec::new()
            };
            (wan, lan)
        };
        for addr in wan {
            self.swarm.behaviour_mut().kad.add_address(&peer, addr);
        }
        for addr in lan {
            self.swarm.behaviour_mut().lan_kad.add_address(&peer, addr);
        }
    }

    /// Keeps the addresses of `peer` that the policy lets us store.
    fn remember(&mut self, peer: PeerId, addrs: &[Multiaddr]) {
        let now = unix_now();
        let keep: Vec<Multiaddr> = {
            let policy = self.policy.lock().expect("policy lock");
            addrs.iter().filter(|a| policy.may_store(&peer, a)).cloned().collect()
        };
        if !keep.is_empty() {
            self.book.update(peer, |r| keep.into_iter().for_each(|a| r.observe_addr(a, now)));
        }
    }

    fn dial_due_bootstrap_peers(&mut self) {
        if !self.first_dials_done {
            return;
        }
        let now = Instant::now();
        for (peer, state) in &mut self.bootstrap {
            if state.dialing > 0 || state.next_attempt > now || self.swarm.is_connected(peer) {
                continue;
            }
            tracing::info!(peer = %peer, addrs = ?state.addrs, "dialing bootstrap peer");
            // One connection per transport: each gives this node its observed address on that
            // transport (what AutoNAT tests and DCUtR punches with), so a peer that speaks only
            // TCP (UDP blocked) can still be punched to while QUIC is preferred elsewhere.
            let mut by_transport: Vec<(&str, Vec<Multiaddr>)> = Vec::new();
            for addr in &state.addrs {
                let transport = transport_of(addr);
                match by_transport.iter_mut().find(|(t, _)| *t == transport) {
                    Some((_, addrs)) => addrs.push(addr.clone()),
                    None => by_transport.push((transport, vec![addr.clone()])),
                }
            }
            for (_, addrs) in by_transport {
                let opts = DialOpts::peer_id(*peer).condition(libp2p::swarm::dial_opts::PeerCondition::Always);
                match self.swarm.dial(opts.addresses(addrs).build()) {
                    Ok(()) => state.dialing += 1,
                    Err(e) => {
                        state.next_attempt = now + state.backoff;
                        tracing::warn!(peer = %peer, error = %e, "cannot dial bootstrap peer");
                    }
                }
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
            Command::Find(peer, reply) if peer == *self.swarm.local_peer_id() => {
                let _ = reply.send(api::FindReply {
                    peer_id: peer.to_string(),
                    found: true,
                    addrs: self.own_addresses().iter().map(|a| a.to_string()).collect(),
                    elapsed_ms: 0.0,
                });
            }
            Command::Find(peer, reply) => {
                let behaviour = self.swarm.behaviour_mut();
                let closest = (Dht::Wan, behaviour.kad.get_closest_peers(peer));
                let providers = (Dht::Wan, behaviour.kad.get_providers(peer_key(&peer)));
                let lan = (Dht::Lan, behaviour.lan_kad.get_closest_peers(peer));
                let lan_providers = (Dht::Lan, behaviour.lan_kad.get_providers(peer_key(&peer)));
                let find = PendingFind { peer, started: Instant::now(), lookups: 4, found: false, addrs: Vec::new(), reply };
                // All queries lead to the same pending find; the other ids point at the first.
                self.finds.insert(closest, find);
                for other in [providers, lan, lan_providers] {
                    self.find_aliases.insert(other, closest);
                }
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
        let mut known = self.dialable(peer);
        if let Some(state) = self.bootstrap.get(&peer) {
            known.extend(state.addrs.iter().filter(|a| !known.contains(a)).cloned().collect::<Vec<_>>());
        }
        let (stage, lookups) = if known.is_empty() {
            self.start_connect_lookups(peer);
            (ConnectStage::LookingUp, CONNECT_LOOKUPS)
        } else {
            let _ = self.swarm.dial(DialOpts::peer_id(peer).addresses(known).extend_addresses_through_behaviour().build());
            (ConnectStage::DialingKnown, 0)
        };
        self.connects.insert(peer, ConnectAttempt { stage, lookups, last_error: None, waiters: vec![reply] });
    }

    /// Looks a peer up four ways at once, in both DHTs: the peers closest to its id (finds DHT
    /// servers: public ones in the WAN DHT, every node of our private network in the LAN DHT),
    /// and providers of its own key (finds nodes behind NATs or relays, which publish their
    /// relayed addresses that way since they are not in anyone's routing table).
    fn start_connect_lookups(&mut self, peer: PeerId) {
        let behaviour = self.swarm.behaviour_mut();
        let closest = (Dht::Wan, behaviour.kad.get_closest_peers(peer));
        let providers = (Dht::Wan, behaviour.kad.get_providers(peer_key(&peer)));
        let lan = (Dht::Lan, behaviour.lan_kad.get_closest_peers(peer));
        let lan_providers = (Dht::Lan, behaviour.lan_kad.get_providers(peer_key(&peer)));
        for query in [closest, providers, lan, lan_providers] {
            self.connect_lookups.insert(query, peer);
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
            self.remember(peer, &addrs);
            let _ = self.swarm.dial(DialOpts::peer_id(peer).addresses(addrs).extend_addresses_through_behaviour().build());
        } else if attempt.lookups == 0 && matches!(attempt.stage, ConnectStage::LookingUp) {
            let error = attempt.last_error.take();
            self.finish_connect(&peer, Err(error.unwrap_or_else(|| "the peer is not in the DHT and no address of it is known".into())));
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
        let now = unix_now();
        let connected = self.swarm.is_connected(&peer);
        match error {
            DialError::WrongPeerId { obtained, address } => {
                let addr = without_p2p(address);
                self.wrong_peer_dials += 1;
                let configured = self.bootstrap.get(&peer).is_some_and(|b| b.addrs.contains(&addr));
                if configured {
                    tracing::warn!(peer = %peer, %addr, answered_by = %obtained, "the bootstrap address answers as another peer; check --bootstrap (did that node get a new identity?)");
                } else {
                    tracing::info!(peer = %peer, %addr, answered_by = %obtained, "a stored address leads to another peer; forgetting it");
                    self.forget_address(peer, &addr);
                    // One wrong address failed the whole dial before its other addresses had
                    // their turn: give them one now.
                    if !connected && self.redial(peer) {
                        return;
                    }
                }
            }
            DialError::LocalPeerId { address } => {
                // An address of ours the policy did not know (a hairpinning NAT's, say): learn
                // it, and drop it from the peer that claimed it.
                let addr = without_p2p(address);
                tracing::info!(peer = %peer, %addr, "a stored address leads back to this node; forgetting it");
                self.wrong_peer_dials += 1;
                self.policy.lock().expect("policy lock").on_external_addr(&addr, true);
                self.forget_address(peer, &addr);
                if !connected && self.redial(peer) {
                    return;
                }
            }
            DialError::Transport(failed) => {
                for (addr, error) in failed {
                    let addr = without_p2p(addr);
                    match refusal_in(error) {
                        Some(crate::addresses::Refusal::Own(_)) => self.forget_address(peer, &addr),
                        // Not dialed by our own choice: says nothing about the address.
                        Some(_) => {}
                        None => self.book.update_existing(&peer, |r| r.addr_failed(&addr, now)),
                    }
                }
            }
            _ => {}
        }
        if connected {
            // Another connection is up: one failed dial says nothing about reachability.
            if let Some(state) = self.bootstrap.get_mut(&peer) {
                state.dialing = state.dialing.saturating_sub(1);
            }
            return;
        }
        if let Some(state) = self.bootstrap.get_mut(&peer) {
            state.dialing = state.dialing.saturating_sub(1);
            if state.dialing > 0 {
                // The dial over another transport may still get through.
                return;
            }
            state.next_attempt = Instant::now() + state.backoff;
            tracing::warn!(peer = %peer, addrs = ?state.addrs, retry_in = ?state.backoff, error = %error, "bootstrap peer unreachable; will retry");
            state.backoff = (state.backoff * 2).min(BOOTSTRAP_BACKOFF_MAX);
        }
        let Some(attempt) = self.connects.get_mut(&peer) else { return };
        match attempt.stage {
            ConnectStage::DialingKnown => {
                attempt.stage = ConnectStage::LookingUp;
                attempt.lookups = CONNECT_LOOKUPS;
                self.start_connect_lookups(peer);
            }
            // Another lookup may still bring an address that works (a relayed one, say).
            ConnectStage::DialingFound if attempt.lookups > 0 => {
                attempt.stage = ConnectStage::LookingUp;
                attempt.last_error = Some(format!("cannot reach the peer: {error}"));
            }
            ConnectStage::DialingFound => self.finish_connect(&peer, Err(format!("cannot reach the peer: {error}"))),
            ConnectStage::LookingUp => {}
        }
    }

    /// Drops an address that does not lead to `peer` from its record and from both DHTs (which
    /// may hold it with or without `/p2p/PEER`).
    fn forget_address(&mut self, peer: PeerId, addr: &Multiaddr) {
        self.book.update_existing(&peer, |r| r.forget_addr(addr));
        let with_peer = addr.clone().with(Protocol::P2p(peer));
        let behaviour = self.swarm.behaviour_mut();
        for form in [addr, &with_peer] {
            behaviour.kad.remove_address(&peer, form);
            behaviour.lan_kad.remove_address(&peer, form);
        }
    }

    /// Dials `peer` again on its remaining addresses; `false` if none is left or it was re-dialed
    /// [`MAX_WRONG_PEER_REDIALS`] times already.
    fn redial(&mut self, peer: PeerId) -> bool {
        let count = self.redials.entry(peer).or_default();
        if *count >= MAX_WRONG_PEER_REDIALS {
            return false;
        }
        *count += 1;
        if self.redials.len() > self.config.max_stored_peers {
            self.redials.clear();
        }
        let mut addrs = self.dialable(peer);
        if let Some(state) = self.bootstrap.get(&peer) {
            addrs.extend(state.addrs.iter().cloned());
        }
        if addrs.is_empty() {
            return false;
        }
        tracing::debug!(peer = %peer, addrs = addrs.len(), "dialing the remaining addresses");
        self.swarm.dial(DialOpts::peer_id(peer).addresses(addrs).build()).is_ok()
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { listener_id, address } => {
                let full = address.clone().with(Protocol::P2p(*self.swarm.local_peer_id()));
                tracing::info!(addr = %full, "listening");
                println!("listening on {full}");
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
                if self.listeners_pending.remove(&listener_id) && self.listeners_pending.is_empty() {
                    // Every listener has reported: the first dials need not wait for the tick.
                    self.first_dials_when_ready();
                    self.dial_due_bootstrap_peers();
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.policy.lock().expect("policy lock").on_listen_addr(&address, false);
                self.listen_addrs.retain(|a| a != &address);
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
                self.book.update(peer_id, |r| {
                    r.last_seen = now;
                    if let Some(scope) = scope {
                        let mut scopes = crate::addresses::Scopes(r.scopes);
                        scopes.insert(scope);
                        r.scopes = scopes.0;
                    }
                    if outbound {
                        r.last_dial_ok = Some(now);
                        r.addr_worked(worked, now);
                    }
                });
                self.autorelay.on_connected(peer_id);
                self.redials.remove(&peer_id);
                if let Some(state) = self.bootstrap.get_mut(&peer_id) {
                    state.dialing = state.dialing.saturating_sub(1);
                    state.backoff = BOOTSTRAP_BACKOFF_MIN;
                }
                if self.bootstrap.contains_key(&peer_id) && num_established.get() == 1 {
                    tracing::info!(peer = %peer_id, "connected to bootstrap peer; bootstrapping the DHT");
                    // Either may have no peers yet (identify feeds them next): then Kademlia
                    // bootstraps by itself once the first peer is added.
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                    let _ = self.swarm.behaviour_mut().lan_kad.bootstrap();
                }
                if is_relayed(&address) {
                    self.punch.entry(peer_id).or_insert(PunchInfo { first_relayed: Instant::now() });
                }
                self.conns.insert(connection_id, ConnInfo { peer: peer_id, address, outbound, since: Instant::now(), rtt: None });
                self.finish_connect(&peer_id, Ok(()));
            }
            SwarmEvent::ConnectionClosed { peer_id, connection_id, num_established, cause, .. } => {
                if let Some(conn) = self.conns.remove(&connection_id) {
                    self.policy.lock().expect("policy lock").on_connection(peer_id, &conn.address, false);
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
                for (peer, addrs) in by_peer {
                    // mDNS answers only from our link: the peer is on the LAN scopes it announced.
                    // Never loopback: mDNS does not announce it, and a LAN host claiming it
                    // would have us dial services on our own host.
                    {
                        let mut policy = self.policy.lock().expect("policy lock");
                        for addr in &addrs {
                            if let Some(scope @ (Scope::Private | Scope::LinkLocal)) = policy.scope(addr) {
                                policy.note_seen(peer, scope);
                            }
                        }
                    }
                    self.remember(peer, &addrs);
                    if !self.swarm.is_connected(&peer) {
                        tracing::info!(peer = %peer, "found on the LAN by mDNS");
                        let _ = self.swarm.dial(DialOpts::peer_id(peer).addresses(addrs).build());
                    }
                }
            }
            BehaviourEvent::Kad(event) => self.on_kad_event(Dht::Wan, event),
            BehaviourEvent::LanKad(event) => self.on_kad_event(Dht::Lan, event),
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
        let listen: Vec<Multiaddr> = info.listen_addrs.iter().map(without_p2p).collect();
        let public: Vec<Multiaddr> = {
            let policy = self.policy.lock().expect("policy lock");
            listen.iter().filter(|a| policy.is_public(a) && !policy.is_own(a)).cloned().collect()
        };
        self.remember(peer, &listen);
        self.book.update(peer, |r| {
            r.last_seen = now;
            r.set_protocols(protocols.iter().cloned());
        });
        // Each DHT gets what the policy gives it: the WAN DHT public addresses only, the LAN DHT
        // the private ones of a peer seen on that network.
        self.feed_dhts(peer);
        let offers_hop = protocols.iter().any(|p| *p == relay::HOP_PROTOCOL_NAME.as_ref());
        let relay_addrs: Vec<Multiaddr> = if offers_hop {
            let policy = self.policy.lock().expect("policy lock");
            let mut addrs: Vec<Multiaddr> = self
                .conns
                .values()
                .filter(|c| c.peer == peer && c.outbound && policy.is_public(&c.address))
                .map(|c| without_p2p(&c.address))
                .collect();
            addrs.extend(public.iter().cloned());
            addrs.dedup();
            addrs
        } else {
            Vec::new()
        };
        self.autorelay.on_identify(peer, relay_addrs);
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
        if self.lan_routing_table_size() > 0
            && let Err(e) = self.swarm.behaviour_mut().lan_kad.bootstrap()
        {
            tracing::debug!(error = %e, "LAN DHT refresh not started");
        }
    }

    /// Our external addresses changed: publish our own record again in both DHTs.
    fn own_record_changed(&mut self) {
        let due = Instant::now() + OWN_RECORD_SETTLE;
        self.own_record_due.insert(Dht::Wan, due);
        self.own_record_due.insert(Dht::Lan, due);
    }

    /// Publishes this node as provider of its own key, carrying its current external addresses
    /// (relayed ones included): how a node behind a NAT or a relay is found by PeerId. In each
    /// DHT once its routing table has peers to store the record.
    fn publish_own_record_when_due(&mut self) {
        let now = Instant::now();
        for dht in [Dht::Wan, Dht::Lan] {
            let Some(due) = self.own_record_due.get(&dht).copied() else { continue };
            let peers = match dht {
                Dht::Wan => self.routing_table_size(),
                Dht::Lan => self.lan_routing_table_size(),
            };
            if now < due || peers == 0 {
                continue;
            }
            self.own_record_due.remove(&dht);
            let key = peer_key(self.swarm.local_peer_id());
            let kad = self.kad(dht);
            if let Err(e) = kad.start_providing(key) {
                tracing::warn!(?dht, error = %e, "cannot publish our addresses in the DHT");
            }
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

    fn on_kad_event(&mut self, dht: Dht, event: kad::Event) {
        match event {
            kad::Event::OutboundQueryProgressed { id, result: kad::QueryResult::GetClosestPeers(result), .. } => {
                let id = (dht, id);
                let peers = match result {
                    Ok(ok) => ok.peers,
                    Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                };
                let find = self.finds.contains_key(&id).then_some(id).or_else(|| self.find_aliases.remove(&id));
                let target = match find {
                    Some(find) => self.finds.get(&find).map(|f| f.peer),
                    None => self.connect_lookups.remove(&id),
                };
                let Some(target) = target else { return };
                let mut addrs = addresses_of(&target, &peers);
                let found = peers.iter().any(|p| p.peer_id == target);
                // The lookup reports addresses that other peers returned; a target that was
                // already in our routing table comes back without them.
                if found {
                    addrs.extend(self.routing_table_addresses(dht, &target));
                }
                let addrs = self.usable_lookup_addresses(target, addrs);
                match find {
                    Some(find) => self.on_find_progress(find, found, addrs, true),
                    None => self.on_connect_lookup(target, addrs, true),
                }
            }
            kad::Event::RoutingUpdated { peer, addresses, .. } => {
                // Kademlia adds the address a connection was dialed on to a peer already in its
                // table, whatever its scope: take out what this DHT must not hold.
                let unfit: Vec<Multiaddr> = {
                    let policy = self.policy.lock().expect("policy lock");
                    addresses
                        .iter()
                        .filter(|a| match dht {
                            Dht::Wan => !policy.for_wan_dht(a),
                            Dht::Lan => !policy.for_lan_dht(&peer, a),
                        })
                        .cloned()
                        .collect()
                };
                let kad = self.kad(dht);
                for addr in &unfit {
                    kad.remove_address(&peer, addr);
                }
            }
            kad::Event::RoutablePeer { peer, address } => {
                // A peer that speaks this DHT connected on `address`: the LAN DHT takes it if
                // it is private and the WAN DHT if it is public (identify feeds the rest).
                let fits = {
                    let policy = self.policy.lock().expect("policy lock");
                    match dht {
                        Dht::Wan => policy.for_wan_dht(&address),
                        Dht::Lan => policy.for_lan_dht(&peer, &address),
                    }
                };
                if fits {
                    self.kad(dht).add_address(&peer, without_p2p(&address));
                }
            }
            kad::Event::OutboundQueryProgressed { id, result: kad::QueryResult::GetProviders(result), step, .. } => {
                let providers = match result {
                    Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => providers,
                    _ => Default::default(),
                };
                let done = step.last;
                if dht == Dht::Wan && self.relay_lookups.contains(&id) {
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
                let query = (dht, id);
                let find = self.find_aliases.get(&query).copied();
                let target = find.and_then(|f| self.finds.get(&f)).map(|f| f.peer).or_else(|| self.connect_lookups.get(&query).copied());
                let Some(target) = target else { return };
                // The providers' addresses live in the running query; ask Kademlia for them the
                // way a dial would.
                let addrs = if providers.contains(&target) { self.kad_addresses(dht, target) } else { Vec::new() };
                let addrs = self.usable_lookup_addresses(target, addrs);
                if let Some(find) = find {
                    if done {
                        self.find_aliases.remove(&query);
                    }
                    self.on_find_progress(find, !addrs.is_empty(), addrs, done);
                } else {
                    if done {
                        self.connect_lookups.remove(&query);
                    }
                    self.on_connect_lookup(target, addrs, done);
                }
            }
            kad::Event::OutboundQueryProgressed { result: kad::QueryResult::Bootstrap(Ok(_)), step, .. } if step.last => {
                let routing_table = match dht {
                    Dht::Wan => self.routing_table_size(),
                    Dht::Lan => self.lan_routing_table_size(),
                };
                tracing::info!(?dht, routing_table, "DHT bootstrap finished");
            }
            kad::Event::ModeChanged { new_mode } => tracing::info!(?dht, mode = %new_mode, "DHT mode changed"),
            _ => {}
        }
    }

    /// Addresses Kademlia knows for a peer: routing table and running queries.
    fn kad_addresses(&mut self, dht: Dht, peer: PeerId) -> Vec<Multiaddr> {
        use libp2p::swarm::NetworkBehaviour as _;
        let kad = self.kad(dht);
        kad.handle_pending_outbound_connection(
                ConnectionId::new_unchecked(0),
                Some(peer),
                &[],
                libp2p::core::Endpoint::Dialer,
            )
            .unwrap_or_default()
    }

    /// The addresses a lookup returned that the policy lets us dial: others' answers may name
    /// a peer's loopback or LAN addresses, or ours.
    fn usable_lookup_addresses(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Vec<Multiaddr> {
        let policy = self.policy.lock().expect("policy lock");
        let mut out: Vec<Multiaddr> = Vec::new();
        for addr in addrs.iter().map(without_p2p) {
            if !is_unspecified(&addr) && policy.may_dial(Some(peer), &addr).is_ok() && !out.contains(&addr) {
                out.push(addr);
            }
        }
        out
    }

    fn on_find_progress(&mut self, id: Query, found: bool, addrs: Vec<Multiaddr>, done: bool) {
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
        self.find_aliases.retain(|_, f| *f != id);
        if !find.addrs.is_empty() {
            self.remember(find.peer, &find.addrs);
        }
        let _ = find.reply.send(api::FindReply {
            peer_id: find.peer.to_string(),
            found: find.found,
            addrs: find.addrs.iter().map(|a| a.to_string()).collect(),
            elapsed_ms: find.started.elapsed().as_secs_f64() * 1000.0,
        });
    }

    fn routing_table_addresses(&mut self, dht: Dht, peer: &PeerId) -> Vec<Multiaddr> {
        let mut out = Vec::new();
        let kad = self.kad(dht);
        for bucket in kad.kbuckets() {
            for entry in bucket.iter() {
                if entry.node.key.preimage() == peer {
                    out.extend(entry.node.value.iter().cloned());
                }
            }
        }
        out
    }

    /// One of the two Kademlia behaviours.
    fn kad(&mut self, dht: Dht) -> &mut kad::Behaviour<kad::store::MemoryStore> {
        let behaviour = self.swarm.behaviour_mut();
        match dht {
            Dht::Wan => &mut behaviour.kad,
            Dht::Lan => &mut behaviour.lan_kad,
        }
    }

    /// Peers in the WAN DHT's routing table.
    fn routing_table_size(&mut self) -> usize {
        self.swarm.behaviour_mut().kad.kbuckets().map(|b| b.num_entries()).sum()
    }

    fn lan_routing_table_size(&mut self) -> usize {
        self.swarm.behaviour_mut().lan_kad.kbuckets().map(|b| b.num_entries()).sum()
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
            lan_routing_table_peers: self.lan_routing_table_size(),
            wrong_peer_dials: self.wrong_peer_dials,
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


/// The address policy's refusal inside a transport error, if that is what it is (the error
/// arrives wrapped by the DNS, timeout and boxing layers).
fn refusal_in(error: &libp2p::TransportError<std::io::Error>) -> Option<&crate::addresses::Refusal> {
    let libp2p::TransportError::Other(error) = error else { return None };
    find_refusal(error)
}

fn find_refusal<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a crate::addresses::Refusal> {
    if let Some(refusal) = error.downcast_ref::<crate::addresses::Refusal>() {
        return Some(refusal);
    }
    // An io::Error's source() skips the error it wraps; look at that one first.
    if let Some(inner) = error.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
        return find_refusal(inner);
    }
    error.source().and_then(find_refusal)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addresses::Refusal;

    #[test]
    fn the_policys_refusal_is_found_through_the_transport_layers() {
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().unwrap();
        // The gate's error, boxed by the swarm's transport (io::Error::other around it).
        let gate = std::io::Error::new(std::io::ErrorKind::PermissionDenied, Refusal::Own(addr.clone()));
        let boxed = libp2p::TransportError::Other(std::io::Error::other(gate));
        assert_eq!(refusal_in(&boxed), Some(&Refusal::Own(addr.clone())));
        let plain = libp2p::TransportError::Other(std::io::Error::other("connection refused"));
        assert_eq!(refusal_in(&plain), None);
    }
}
