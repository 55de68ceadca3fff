//! The composed libp2p behaviour and the swarm built around it.
//!
//! Standard protocols under their standard ids (identify, ping, Kademlia, AutoNAT v1 and v2,
//! circuit relay v2 client and server, DCUtR), so any libp2p implementation interoperates, plus `libp2p-stream` for
//! warren's own stream protocols and for on-demand pings.

use std::time::Duration;

use libp2p::Transport as _;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::{
    StreamProtocol, Swarm, autonat, connection_limits, dcutr, identify, identity::Keypair, kad, mdns, noise,
    ping, relay, swarm::NetworkBehaviour, swarm::behaviour::toggle::Toggle, tcp, yamux,
};

use std::sync::{Arc, Mutex};

use crate::addresses::{Policy, lan_kad_protocol};
use crate::config::{Config, DhtMode};
use crate::dial_gate::Gate;

/// The agent string peers see in identify.
pub const AGENT: &str = concat!("warren/", env!("CARGO_PKG_VERSION"));
/// warren's identify protocol family, as libp2p recommends: `/<name>/<version>`.
pub const IDENTIFY_PROTOCOL: &str = "/ipfs/id/1.0.0";
/// How often each connection is pinged (libp2p's default). A ping keeps the connection's RTT
/// fresh (path probes, relay choice, `warren peers`) and notices a TCP connection whose peer
/// vanished without a reset (QUIC's keep-alive and idle timeout cover QUIC); ping reports that
/// after two failures in a row, an interval apart, so 25-40 s after the connection fell silent.
/// Pings were every 5 s: on a node at rest, whose connections are its relay reservations, they
/// were almost half of its CPU (`simulations/dht-scale`, 500 nodes at rest: 0.66 CPU-ms per node
/// per second with 5 s, 0.40 with 15 s, 0.37 with 30 s).
const PING_INTERVAL: Duration = Duration::from_secs(15);
/// How long a ping may go unanswered before it counts as failed.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections kept to one peer at most (a direct and a relayed one, plus a few racing dials).
const MAX_CONNECTIONS_PER_PEER: u32 = 8;
/// Receive window of one QUIC stream, bytes.
const QUIC_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Receive window of a whole QUIC connection (all its streams), bytes.
const QUIC_CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;
/// Largest QUIC packet that path-MTU discovery may try.
const QUIC_MTU_UPPER_BOUND: u16 = 9_000;
/// A connection that only carried background protocols (the DHT, identify, ping, AutoNAT)
/// closes this long after its last request. A lookup touches dozens of peers, and each
/// connection it leaves costs pings and wake-ups while it lives: with 60 s, a 300-node network
/// held about 100 connections per node a minute after joining (`simulations/dht-scale`).
/// Connections that carried forwarded traffic, punch offers or probes stay open for
/// `idle_connection_timeout_secs` after their last stream (see `warren_forward::Stream`).
pub const BACKGROUND_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a node publishes its provider records again (its own, which carries the addresses
/// it is reached at, and a relay's announcement). libp2p's default, 12 h, is for content in the
/// IPFS DHT; here the record is how a node behind a NAT is found by PeerId, and its holders come
/// and go: with a fifth of the network replaced every 10 minutes, few of the 20 holders would be
/// left after an hour.
const PROVIDER_REPUBLISH: Duration = Duration::from_secs(30 * 60);
/// How long other nodes keep a provider record: four republications missed, then the addresses
/// of a node that has left are forgotten (libp2p's default keeps them 48 h).
const PROVIDER_TTL: Duration = Duration::from_secs(2 * 60 * 60);
/// How long a DHT query may run before it reports what it found.
pub(crate) const KAD_QUERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Pending inbound handshakes at once: bounds what a flood of dials can cost.
const MAX_PENDING_INCOMING: u32 = 128;
/// Direct inbound connections from one IP (one IPv6 /64) at once. An office or a carrier-grade
/// NAT may put a few dozen nodes behind one address; one host holding a thousand identities
/// must not take every incoming slot (see `ip_limits`). Loopback is not counted.
const MAX_CONNECTIONS_PER_IP: usize = 32;

#[derive(NetworkBehaviour)]
pub struct Behaviour {
    pub ip_limits: crate::ip_limits::Behaviour,
    pub limits: connection_limits::Behaviour,
    pub identify: crate::identify_scope::Behaviour,
    pub ping: ping::Behaviour,
    /// The WAN DHT (the configured protocol): public addresses only.
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    /// The LAN DHT (`/…/lan/kad/…`), always serving: peers on loopback, link-local and private
    /// addresses, so nodes of one private network find each other with no public address
    /// confirmed (kubo runs the same pair).
    pub lan_kad: crate::lan_dht::Behaviour,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    pub autonat: autonat::Behaviour,
    /// AutoNAT v2 tests each candidate address on its own and confirms every one that a peer
    /// could dial back (v1 confirms one address per probe: a public node then advertised only
    /// its TCP address, and a relay offered circuits over TCP only).
    pub autonat_v2: autonat::v2::client::Behaviour,
    pub autonat_v2_server: autonat::v2::server::Behaviour,
    pub candidates: crate::candidates::Behaviour,
    pub relay_client: relay::client::Behaviour,
    pub relay: Toggle<relay::Behaviour>,
    pub dcutr: dcutr::Behaviour,
    pub forward: warren_forward::Behaviour,
}

/// Errors building the swarm.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The configured Kademlia protocol id is not a valid protocol id.
    #[error("invalid kad protocol id {0:?}")]
    KadProtocol(String),
    /// A transport or behaviour could not be created (mDNS socket, DNS resolver, ...).
    #[error("{0}")]
    Setup(String),
}

/// The swarm, plus what lives outside it: the relay's byte meter and the inbound forward streams.
pub struct Built {
    pub swarm: Swarm<Behaviour>,
    /// Relayed bytes and the aggregate cap, when this node relays for others.
    pub meter: Option<std::sync::Arc<crate::relay_meter::Meter>>,
    /// The relay's per-IP reservation table, told by the event loop when reservations end.
    pub reservations_by_ip: Option<crate::relay::RelayByIp>,
    /// Inbound forward streams, for the serving task.
    pub inbound: warren_forward::Incoming,
    /// Inbound birthday-punch offers (`/warren/punch/1.0.0` streams).
    pub punch_offers: warren_forward::Incoming,
    /// QUIC listeners for punched connections, beside the swarm's own.
    pub punch_listeners: crate::punch::PunchListeners,
    /// Inbound path probes (`/warren/probe/1.0.0` streams).
    pub probes: warren_forward::Incoming,
}

/// The punch protocol as libp2p negotiates it.
pub const PUNCH_PROTOCOL: StreamProtocol = StreamProtocol::new(warren_punch::PROTOCOL);
/// Punch offers waiting to be read; a node runs one punch at a time and refuses the rest at
/// once, so a handful is plenty.
const PUNCH_OFFERS_QUEUED: usize = 8;

/// Streams a peer may open at once on a QUIC connection to us (see `quic_config`).
///
/// quinn returns a peer's stream credit in steps of an eighth of this limit: it announces
/// more (MAX_STREAMS) only once that many of the peer's streams have closed since the last
/// announcement, and has no timer for the rest. So up to an eighth can be withheld for as long
/// as the peer keeps its streams open: with a limit of 1024, a second burst of 1,000 forwarded
/// connections found credit for 920, and the other 80 (and the path probe behind them) hung
/// until the connection was closed (measured; 1,000 streams over 7/8 of 1024). The forward
/// behaviour's cap therefore has to fit under seven eighths, with room left for the DHT,
/// identify, path probes and punch offers.
const QUIC_STREAM_LIMIT: u32 = 1280;
/// Streams other protocols may hold open beside a full load of forward streams.
const QUIC_OTHER_STREAMS: u32 = 64;
const _: () = assert!(
    warren_forward::QUIC_STREAMS as u32 + QUIC_OTHER_STREAMS <= QUIC_STREAM_LIMIT - QUIC_STREAM_LIMIT / 8,
    "a peer's forward streams never wait for credit quinn withholds, and leave room for other protocols"
);

/// The QUIC settings warren uses.
fn quic_config(key: &Keypair) -> libp2p::quic::Config {
    let mut quic = libp2p::quic::Config::new(key);
    // Keep connections (relay reservations above all) alive through NAT mappings, and notice a
    // peer that vanished (a killed relay sends no close) within 10 s, so a lost relay is replaced
    // quickly. The idle timeout must exceed the keep-alive interval.
    quic.keep_alive_interval = Duration::from_secs(3);
    quic.max_idle_timeout = 10_000;
    // Every forwarded connection is a stream: allow many at once; streams beyond the limit wait
    // for a slot rather than fail. quinn reserves state for every allowed stream in every
    // connection (measured: ~600 KiB per connection at 4096, ~150 KiB at 256), which is what a
    // relay's connection count multiplies, so not more than this.
    quic.max_concurrent_stream_limit = QUIC_STREAM_LIMIT;
    // Flow control: every stream has its own window, and all share the connection's. A stream
    // whose reader is stuck (a forwarded service that stopped reading) holds its whole window of
    // the connection's. With libp2p's 10 MB per stream and 15 MB per connection, two stuck
    // streams stalled every other stream on the connection, forwards and DHT alike (measured).
    // 4 MiB per stream still carries ~100 MiB/s per stream at 40 ms round trip; 64 MiB per
    // connection takes 16 stuck streams to fill, and bounds what one peer can make us buffer.
    quic.max_stream_data = QUIC_STREAM_WINDOW;
    quic.max_connection_data = QUIC_CONNECTION_WINDOW;
    // Let path-MTU discovery grow packets past quinn's 1452-byte ceiling where the path allows
    // (LANs with jumbo frames, loopback): fewer packets, less per-packet crypto. Discovery only
    // raises the size after a probe of that size got through.
    quic.mtu_upper_bound(QUIC_MTU_UPPER_BOUND)
}

/// Boxes a connection's muxer, metered when this node relays for others.
fn meter_muxer<M, E>(
    meter: Option<std::sync::Arc<crate::relay_meter::Meter>>,
) -> impl Fn((libp2p::PeerId, M), E) -> (libp2p::PeerId, StreamMuxerBox) + Clone
where
    M: libp2p::core::muxing::StreamMuxer + Send + Unpin + 'static,
    M::Substream: Send + Unpin + 'static,
    M::Error: Send + Sync + 'static,
{
    move |(peer, muxer), _| match &meter {
        Some(meter) => (peer, StreamMuxerBox::new(crate::relay_meter::Metered::new(muxer, meter.clone()))),
        None => (peer, StreamMuxerBox::new(muxer)),
    }
}

/// A Kademlia behaviour as warren runs both DHTs: routing-table inserts are left to the event
/// loop, which feeds each DHT the addresses the address policy gives it (libp2p would otherwise
/// insert whatever address a connection was dialed on).
fn kademlia(peer_id: libp2p::PeerId, protocol: StreamProtocol) -> kad::Behaviour<kad::store::MemoryStore> {
    let mut config = kad::Config::new(protocol);
    // The event loop refreshes the routing table itself, only once it has peers.
    config.set_periodic_bootstrap_interval(None);
    config.set_query_timeout(KAD_QUERY_TIMEOUT);
    config.set_provider_publication_interval(Some(PROVIDER_REPUBLISH));
    config.set_provider_record_ttl(Some(PROVIDER_TTL));
    config.set_kbucket_inserts(kad::BucketInserts::Manual);
    // Records from others are stored only once checked (see `event_loop::dht`).
    config.set_record_filtering(kad::StoreInserts::FilterBoth);
    kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), config)
}

/// A byte stream another transport hands the node (see [`Wire::Streams`]).
pub trait ByteStream: futures::AsyncRead + futures::AsyncWrite + Send + Unpin + 'static {}
impl<S: futures::AsyncRead + futures::AsyncWrite + Send + Unpin + 'static> ByteStream for S {}

/// What carries the node's connections.
pub enum Wire {
    /// QUIC first, TCP beside it, on real sockets: what `warren up` uses.
    Sockets,
    /// Byte streams from another transport in place of both, upgraded with Noise and Yamux as
    /// TCP is: an in-process network for simulations of many nodes (`simulations/dht-scale`).
    /// Everything above the transport is the node's own.
    Streams(libp2p::core::transport::Boxed<Box<dyn ByteStream>>),
}

pub fn build_swarm(
    keypair: Keypair,
    config: &Config,
    policy: Arc<Mutex<Policy>>,
) -> Result<Built, BuildError> {
    build_swarm_over(keypair, config, policy, Wire::Sockets)
}

/// [`build_swarm`] over the given wire.
pub fn build_swarm_over(
    keypair: Keypair,
    config: &Config,
    policy: Arc<Mutex<Policy>>,
    wire: Wire,
) -> Result<Built, BuildError> {
    let (mut forward, inbound) = warren_forward::Behaviour::new(config.idle_connection_timeout());
    let punch_offers = forward.accept(PUNCH_PROTOCOL, PUNCH_OFFERS_QUEUED);
    let probes = forward.accept(crate::paths::PROBE_PROTOCOL, crate::paths::PROBES_QUEUED);
    let mut forward = Some(forward);
    let mut punch_listeners = None;
    let kad_protocol = StreamProtocol::try_from_owned(config.kad_protocol.clone())
        .map_err(|_| BuildError::KadProtocol(config.kad_protocol.clone()))?;
    let lan_protocol = StreamProtocol::try_from_owned(lan_kad_protocol(&config.kad_protocol))
        .map_err(|_| BuildError::KadProtocol(config.kad_protocol.clone()))?;
    let mdns_on = config.mdns;
    let dht_mode = config.dht_mode;
    let (relay_config, reservations_by_ip) = match config.relay.then(|| config.relay_limits.to_libp2p()) {
        Some((limits, by_ip)) => (Some((limits, config.relay_force)), Some(by_ip)),
        None => (None, None),
    };
    // AutoNAT only trusts globally routable addresses; with public ranges configured those
    // ranges count too, so AutoNAT must consider every address (warren filters by range).
    let autonat_only_global = config.public_ranges.is_empty();
    let max_incoming = config.max_incoming_connections;
    let public_ranges = config.public_ranges().map_err(|e| BuildError::Setup(e.message))?;
    let setup = |e: &dyn std::fmt::Display| BuildError::Setup(e.to_string());
    let meter = config.relay.then(|| std::sync::Arc::new(crate::relay_meter::Meter::new(config.relay_limits.bandwidth_cap())));

    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(|key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            // TCP and QUIC built here rather than by the builder's with_tcp/with_quic, so that a
            // relay's connections can be metered (see relay_meter); otherwise the same stacks.
            let direct = match wire {
                Wire::Sockets => {
                    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                        .upgrade(libp2p::core::upgrade::Version::V1Lazy)
                        .authenticate(noise::Config::new(key)?)
                        .multiplex(yamux::Config::default())
                        .map(meter_muxer(meter.clone()));
                    let quic = libp2p::quic::tokio::Transport::new(quic_config(key)).map(meter_muxer(meter.clone()));
                    quic.or_transport(tcp).map(|either, _| either.into_inner()).map_err(std::io::Error::other).boxed()
                }
                Wire::Streams(streams) => streams
                    .upgrade(libp2p::core::upgrade::Version::V1Lazy)
                    .authenticate(noise::Config::new(key)?)
                    .multiplex(yamux::Config::default())
                    .map(meter_muxer(meter.clone()))
                    .map_err(std::io::Error::other)
                    .boxed(),
            };
            let wrap = meter_muxer(meter.clone());
            let punch = crate::punch::PunchListeners::new(quic_config(key), move |peer, connection| wrap((peer, connection), ()));
            punch_listeners = Some(punch.clone());
            Ok(Gate::new(crate::punch::quic::WithPunchListeners::new(direct, punch), policy))
        })
        .map_err(|e| setup(&e))?
        .with_dns()
        .map_err(|e| setup(&e))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| setup(&e))?
        .with_behaviour(|key, relay_client| {
            let peer_id = key.public().to_peer_id();
            let mut kad = kademlia(peer_id, kad_protocol);
            let mut lan_kad = kademlia(peer_id, lan_protocol);
            // Serving the LAN DHT costs nothing where no peer shares a private network with us;
            // only `--dht-mode client` (do not answer queries) turns it off.
            lan_kad.set_mode(Some(if dht_mode == DhtMode::Client { kad::Mode::Client } else { kad::Mode::Server }));
            kad.set_mode(match dht_mode {
                DhtMode::Server => Some(kad::Mode::Server),
                DhtMode::Client => Some(kad::Mode::Client),
                // Not libp2p's own auto mode: it turns server on for any confirmed external
                // address, a relayed one included, which puts NATed nodes into everyone's routing
                // table with addresses nobody can dial. The event loop switches to server when
                // AutoNAT finds a public direct address.
                DhtMode::Auto => Some(kad::Mode::Client),
            });
            let mdns = if mdns_on {
                Some(mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)?)
            } else {
                None
            };
            Ok(Behaviour {
                ip_limits: crate::ip_limits::Behaviour::new(MAX_CONNECTIONS_PER_IP),
                limits: connection_limits::Behaviour::new(
                    connection_limits::ConnectionLimits::default()
                        .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
                        .with_max_pending_incoming(Some(MAX_PENDING_INCOMING))
                        .with_max_established_incoming(Some(max_incoming)),
                ),
                identify: crate::identify_scope::new(
                    identify::Behaviour::new(
                        identify::Config::new(IDENTIFY_PROTOCOL.to_string(), key.public())
                            .with_agent_version(AGENT.to_string())
                            .with_push_listen_addr_updates(true),
                    ),
                    public_ranges.clone(),
                ),
                ping: ping::Behaviour::new(ping::Config::new().with_interval(PING_INTERVAL).with_timeout(PING_TIMEOUT)),
                kad,
                lan_kad: crate::lan_dht::new(lan_kad, public_ranges.clone()),
                mdns: mdns.into(),
                autonat: autonat::Behaviour::new(
                    peer_id,
                    autonat::Config { only_global_ips: autonat_only_global, ..Default::default() },
                ),
                autonat_v2: autonat::v2::client::Behaviour::default(),
                autonat_v2_server: autonat::v2::server::Behaviour::default(),
                candidates: crate::candidates::Behaviour::new(public_ranges.clone()),
                relay_client,
                relay: relay_config
                    .map(|(limits, force)| {
                        let mut relay = relay::Behaviour::new(peer_id, limits);
                        if force {
                            relay.set_status(Some(relay::Status::Enable));
                        }
                        relay
                    })
                    .into(),
                dcutr: dcutr::Behaviour::new(peer_id),
                forward: forward.take().expect("the behaviour is built once"),
            })
        })
        .map_err(|e| setup(&e))?
        // Substreams keep multistream-select V1 (a round trip before the first message): V1Lazy
        // would save it, but stalls protocols where the opener only reads (identify).
        .with_swarm_config(|c| c.with_idle_connection_timeout(BACKGROUND_IDLE_TIMEOUT.min(config.idle_connection_timeout())))
        .build();
    let punch_listeners = punch_listeners.expect("the transport is built once");
    Ok(Built { swarm, meter, reservations_by_ip, inbound, punch_offers, punch_listeners, probes })
}
