//! The warren node.
//!
//! # Layout
//! Imports flow one way (`tests/layering.rs` checks there is no circle): the binary and
//! [`cli`] use [`node`], which wires the services together; services use the leaves below them.
//! - [`cli`]: the `warren` command line, one subcommand each; [`output`]: text for people.
//! - [`config`]: the TOML configuration and its defaults.
//! - [`node`]: `warren up`, which wires everything below together; [`shutdown`]: the order it
//!   stops in, and the tracker every spawned task goes through.
//! - [`ports`]: which listen ports are free (TIME_WAIT is; another node's listener is not);
//!   [`port_mapping`]: asking the router to forward them (PCP, NAT-PMP, UPnP-IGD).
//! - [`control`]: the local HTTP+JSON API on a Unix socket, server and client; [`api`]: its
//!   JSON shapes (and the expose/forward specs, which the config file uses too).
//! - [`metrics`]: Prometheus text on `--metrics ADDR`.
//! - [`handle`]: the one way into the swarm task ([`handle::NodeHandle`], [`handle::Command`]).
//! - [`event_loop`]: the task that owns the swarm, one file per capability: `bootstrap`,
//!   `connect`, `dht` (the WAN and LAN Kademlia DHTs; [`lan_dht`] serves the LAN one only to
//!   peers on a private network), `identify`, `mdns`, `holepunch` (DCUtR
//!   and re-punching), `birthday` (when to offer or take a birthday punch), `netcheck`,
//!   `relays` (the relay service and AutoRelay's reservations), `status`.
//! - [`behaviour`]: the composed libp2p behaviour and swarm; [`identify_scope`]: identify
//!   showing each peer only the addresses of its scope ([`scoped`]: the per-connection
//!   wrapper it and [`lan_dht`] use); [`ip_limits`]: inbound connections
//!   per source IP; [`resources`]: the open-file limit and what it allows.
//! - [`forward`]: port forwarding (expose and forward) over `/warren/forward/1.0.0` streams,
//!   whose wire format and libp2p behaviour live in the `warren-forward` crate.
//! - [`paths`]: probing a direct connection that went silent under a forwarded one
//!   (`/warren/probe/1.0.0`, in the `warren-probe` crate); the event loop's `paths` closes
//!   those that do not answer.
//! - [`relay`] and [`relay_meter`]: serving circuit relay v2 within operator limits;
//!   [`autorelay`] and [`candidates`]: choosing relays and holding reservations while not
//!   publicly reachable.
//! - [`punch`]: birthday hole punching between a symmetric and an easy NAT, over
//!   `/warren/punch/1.0.0` streams (the protocol lives in the `warren-punch` crate).
//! - [`nat`]: what kind of NAT we are behind, from what peers observe, AutoNAT, port mapping
//!   and [`trace`] (the first hops towards a peer): `warren netcheck` and status.
//! - [`addresses`]: the address policy (what is public, what is ours, what is dialed, stored
//!   and given to each DHT); [`dial_gate`] applies it to every dial.
//! - [`store`] and [`peer_record`]: identity and peer store in sled; [`private_files`]: the
//!   data dir, the key file and the control socket kept to the node's owner.
//! - [`error`]: errors meant for the person at the terminal; [`per_peer`]: counting what each
//!   peer has under way against a cap.

pub mod addresses;
pub mod api;
pub mod autorelay;
pub mod behaviour;
pub mod candidates;
pub mod cli;
pub mod config;
pub mod control;
pub mod dial_gate;
pub mod error;
pub mod event_loop;
pub mod handle;
pub mod identify_scope;
pub mod ip_limits;
pub mod lan_dht;
pub mod nat;
pub mod punch;
pub mod trace;
pub mod forward;
pub mod metrics;
pub mod node;
pub mod output;
pub mod paths;
pub mod per_peer;
pub mod peer_record;
pub mod port_mapping;
pub mod ports;
pub mod private_files;
pub mod relay;
pub mod relay_meter;
pub mod scoped;
pub mod resources;
pub mod shutdown;
pub mod store;
