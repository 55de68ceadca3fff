//! `/warren/forward/1.0.0`: one stream per forwarded connection, on the connection the two
//! nodes already share (a QUIC stream, or a Yamux stream over TCP).
//!
//! # Message flow
//! ```text
//! opener                                   answerer (the node that exposed the service)
//!   | -- Request frame: {version, service, transport} -->|
//!   |                                                    | look up service, check allow-list,
//!   |                                                    | take a capacity slot, connect upstream
//!   | <-- Reply frame: {status, detail} -----------------|
//!   | == bytes (tcp) or datagram frames (udp), both ways ==
//! ```
//! A frame is a 2-byte big-endian length followed by that many bytes of CBOR (serde + cbor4ii).
//! Request and reply frames are at most [`MAX_FRAME`] (1 KiB) long; a longer length, a body that
//! does not decode, an unknown version, or an invalid service name ends that stream with
//! [`Status::BadRequest`] and touches nothing else.
//!
//! An opener may open a stream ahead of need and send its request later, within the answerer's
//! request timeout (30 s); a stream that ends before its request is closed without a reply.
//! An opener need not wait for the reply: it may send data (TCP chunks, UDP datagram frames)
//! right behind its request, so a new connection's first bytes save a round trip. The answerer
//! reads them only after it has accepted; when it refuses, it replies and closes the stream, and
//! whatever was sent ahead is discarded unread. Nothing flows from the answerer before its reply.
//! Data sent ahead sits unread in the answerer's receive window until then, so an opener keeps it
//! small: warren sends at most 8 KiB of TCP data, or one datagram, before the reply.
//!
//! After an `Accepted` reply, a TCP forward carries *chunks* each way: a 4-byte big-endian length
//! (1 to [`MAX_CHUNK`]) followed by that many bytes of the connection's data. A length of 0
//! ([`END_OF_DATA`]) means the sender's side of the connection was half-closed (FIN): no more data
//! follows in that direction and the sender then finishes its side of the stream. A stream that
//! ends *without* that marker, or that the peer stops reading, means the connection was reset or
//! failed: the other side resets its connection too (RST), so an application never mistakes a
//! cut-off transfer for a complete one. (A libp2p stream offers no reset of its own that survives
//! every transport: dropping a QUIC stream finishes it cleanly.)
//!
//! # Sessions: a TCP forward that outlives its stream
//! An opener may make a TCP forward a *session* by putting a random 16-byte `session` id in its
//! request. An answerer that takes sessions says so with `received: 0` in its `Accepted` reply;
//! one that does not leaves `received` out, and the stream is the connection as above (older
//! peers ignore the fields they do not know). In a session, besides data chunks and the end
//! marker, either side sends *acknowledgements*: the header [`ACK`] then 8 bytes (big endian)
//! counting every data byte of the session it has received (warren: every 256 KiB, within
//! half a second of receiving less, and at the end marker); and either side may send [`RESET`]: its connection failed, the other resets its
//! own and nobody resumes. A side keeps what it sent until it is acknowledged.
//! When the stream fails, the opener opens a new one (on any connection to the answerer) with a
//! request naming the same service and session and `resume`: the bytes it has received. The
//! answerer, if it still holds the session, replies `Accepted` with its own `received`, and
//! drops the old stream if it has not noticed its failure yet; each side then sends again
//! everything after the other's count, and the session goes on. A session the answerer does not
//! hold is answered [`Status::NoSession`]. Sessions belong to the peer that opened them: a resume
//! from another peer finds none. A session is done when both sides sent their end marker and
//! have everything acknowledged; it then closes its stream.
//!
//! A UDP forward carries datagrams, each as a 2-byte big-endian length then the payload
//! ([`MAX_DATAGRAM`] at most), so datagram boundaries survive the stream.
//!
//! # Limits
//! - Service names: 1 to [`MAX_SERVICE_NAME`] bytes of `[A-Za-z0-9._-]`. A remote peer names a
//!   service, never a host or port: what a name maps to is the exposing node's business.
//! - Reply details are at most [`MAX_DETAIL`] bytes and say no more than the status needs.
//!
//! # Crate layout
//! - [`wire`]: the frames above, as plain async functions (fuzzed and property-tested).
//! - [`opener`] and [`answerer`]: the message flow from each side (send the request, read the
//!   answer; read the request, accept or refuse), so neither side writes frames by hand.
//! - [`Behaviour`] (feature `swarm`, on by default): a libp2p behaviour that accepts
//!   `/warren/forward/1.0.0` streams on every connection into a bounded queue ([`Incoming`]) and
//!   opens outbound streams of any protocol on request, preferring a direct connection over a
//!   relayed one, and dialing a further connection when every one to the peer carries its most
//!   forward streams; its per-connection [`handler`] negotiates them.

pub mod answerer;
pub mod opener;
pub mod wire;
#[cfg(feature = "swarm")]
mod behaviour;
#[cfg(feature = "swarm")]
pub mod handler;
#[cfg(feature = "swarm")]
mod linger;

pub use wire::*;
#[cfg(feature = "swarm")]
pub use behaviour::{Behaviour, Direct, INBOUND_QUEUE, Incoming, OpenError, Opened, QUIC_STREAMS, STREAM_PROTOCOL, YAMUX_STREAMS};
#[cfg(feature = "swarm")]
pub use linger::Stream;

