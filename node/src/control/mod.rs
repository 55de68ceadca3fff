//! The local control API: the running daemon serves it ([`server`]), the CLI calls it
//! ([`client`]); [`crate::api`] holds the JSON shapes both share.

pub mod client;
pub mod server;
