//! The warren node.
//!
//! # Layout
//! - [`cli`]: the `warren` command line, one subcommand each.
//! - [`config`]: the TOML configuration and its defaults.
//! - [`node`]: `warren up`, which wires everything below together and shuts it down in order.
//! - [`ports`]: which listen ports are free (TIME_WAIT is; another node's listener is not).
//! - [`behaviour`]: the composed libp2p behaviour and swarm.
//! - [`event_loop`]: the one task that owns the swarm, driven through a [`event_loop::NodeHandle`].
//! - [`store`] and [`peer_record`]: identity and peer store in sled.
//! - [`forward`]: port forwarding over `/warren/forward/1.0.0` streams (expose and forward).
//! - [`addresses`]: the address policy: what is public, what is ours, what is dialed, stored and
//!   given to each DHT; [`dial_gate`] applies it to every dial.
//! - [`relay`]: serving circuit relay v2 within operator limits.
//! - [`autorelay`]: choosing relays and holding reservations while not publicly reachable.
//! - [`metrics`]: Prometheus text on `--metrics ADDR`.
//! - [`control`]: the local HTTP+JSON API on a Unix socket, server and client.
//! - [`output`]: text rendering for people.

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
pub mod forward;
pub mod metrics;
pub mod node;
pub mod output;
pub mod peer_record;
pub mod ports;
pub mod relay;
pub mod relay_meter;
pub mod store;
