//! `/warren/punch/1.0.0`: a birthday hole punch, coordinated over a relayed connection, between
//! a node behind an endpoint-dependent ("symmetric", "hard") NAT and one behind an
//! endpoint-independent ("easy") NAT. DCUtR cannot connect them: each side dials the address the
//! other was seen at, but the hard side's NAT gives every new destination a new random port, so
//! the easy side dials a port that leads nowhere.
//!
//! The birthday paradox does: the hard side opens many sockets (256 by default), each sending a
//! packet to the easy side's one public QUIC address, so its NAT holds that many mappings towards
//! it, at random public ports. The easy side then sends probes from its QUIC socket to random
//! ports of the hard side's public IP. Each probe finds a mapping with probability 256/64512,
//! so 1,024 probes find one with probability 98 %. The hard side learns the port that worked from
//! the probe it received, turns that socket into a QUIC listener, and the easy side dials it.
//!
//! # Message flow
//! ```text
//! hard (opens the stream)                     easy
//!   | -- Offer {version, ip} ------------------->|  ip: where peers see the hard side
//!   |                                            |  easy checks: its own mapping is endpoint-
//!   |                                            |  independent, no other punch running, limits
//!   | <-- Accept {addr, token, probes, interval} |  addr: the easy side's public QUIC address
//!   |     or Refuse {reason, detail} ------------|  (and the stream ends)
//!   | opens N sockets; each sends a Packet{token, 0} to addr, the first round with a low TTL
//!   | -- Ready {sockets} ----------------------->|
//!   |          <== Packet{token, port} probes from addr to ip:random port, one per interval ==
//!   | a probe arrives on socket i: that socket becomes a QUIC listener
//!   | -- Hit {port} ---------------------------->|  easy dials ip:port over QUIC
//!   |                                   ... direct connection, or:
//!   | -- GiveUp {reason} / <-- GiveUp {reason} --|  either side, at any time
//! ```
//! A frame is the forward protocol's: a 2-byte big-endian length, then that many bytes of CBOR
//! (serde + cbor4ii), at most [`MAX_FRAME`] bytes. A frame that does not decode ends the punch.
//!
//! # Probe packets
//! Both sides send [`Packet`]s over raw UDP: 4 bytes of [`MAGIC`], the 16-byte token from
//! `Accept`, and the 2-byte big-endian port the packet was sent to (0 from the hard side). The
//! magic's first byte is 0, so a QUIC stack that receives one (the easy side's QUIC socket gets the
//! hard side's packets) drops it as an invalid packet without answering. The hard side takes a
//! probe only from the `addr` it was given and only with the token; anything else is ignored.
//!
//! # Limits
//! The easy side sets the probe count and interval ([`Accept`]): the prober decides what it sends.
//! The hard side opens at most [`MAX_SOCKETS`] sockets whatever it is told. A node runs one punch
//! at a time and refuses others with [`Refusal::Busy`]. Reasons and details are at most
//! [`MAX_DETAIL`] bytes. An offer's IP must be a public unicast address: a node never sprays
//! probes at a private network on a peer's word.

use std::net::{IpAddr, SocketAddr};

use futures::{AsyncRead, AsyncWrite, AsyncWriteExt};
use serde::{Deserialize, Serialize};
pub use warren_forward::FrameError;
use warren_forward::{read_frame, write_frame};

/// The protocol id.
pub const PROTOCOL: &str = "/warren/punch/1.0.0";
/// The only version this implementation speaks.
pub const VERSION: u8 = 1;
/// Largest message frame body: every message is a few dozen bytes.
pub const MAX_FRAME: usize = 512;
/// Longest free-text detail in a refusal or a give-up.
pub const MAX_DETAIL: usize = 200;
/// Most sockets a hard side opens, whatever its configuration says: each is a file descriptor
/// and a NAT mapping; past 1,024 the gain (99.96 % after 2,048 probes instead of 98 %) is not
/// worth a router's table.
pub const MAX_SOCKETS: u16 = 1024;
/// The first bytes of every probe packet. The first byte is 0: the QUIC fixed bit is unset, so
/// a QUIC endpoint drops the packet without a reply.
pub const MAGIC: [u8; 4] = [0x00, b'w', b'p', 0x01];
/// Length of the token that ties probes to one punch.
pub const TOKEN_LEN: usize = 16;
/// Length of a probe packet.
pub const PACKET_LEN: usize = MAGIC.len() + TOKEN_LEN + 2;

/// Why the easy side will not punch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Refusal {
    /// Birthday punching is turned off on this node.
    Disabled,
    /// Another punch is running, or the last one ended too recently.
    Busy,
    /// This node's NAT is endpoint-dependent too: random ports on both sides never meet
    /// (2^-16 per probe pair); the peers stay relayed.
    BothSymmetric,
    /// UDP does not get out of this node's network.
    UdpBlocked,
    /// This node is publicly reachable: the hard side reaches it by dialing, no punch needed.
    Public,
    /// This node does not know its own NAT's mapping yet.
    Unknown,
    /// The offer is not acceptable (version, a non-public IP).
    BadOffer,
    /// The two nodes already have a direct connection.
    AlreadyDirect,
}

impl Refusal {
    /// A sentence for `warren peers`.
    pub fn explain(self) -> &'static str {
        match self {
            Refusal::Disabled => "the peer has birthday punching turned off",
            Refusal::Busy => "the peer is busy with another punch",
            Refusal::BothSymmetric => "both NATs are symmetric: random ports on both sides never meet, so the peers stay relayed",
            Refusal::UdpBlocked => "UDP is blocked on the peer's network: only TCP, which cannot be birthday-punched",
            Refusal::Public => "the peer is publicly reachable",
            Refusal::Unknown => "the peer does not know its NAT's mapping yet",
            Refusal::BadOffer => "the peer refused our offer as invalid",
            Refusal::AlreadyDirect => "the peer already has a direct connection to us",
        }
    }
}

/// One message on a punch stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// From the hard side: let us punch; peers see me at `ip`.
    Offer { version: u8, ip: IpAddr },
    /// From the easy side: my QUIC socket is `addr` to everyone; I will send `probes` probes,
    /// one every `interval_ms`, carrying `token`.
    Accept { addr: SocketAddr, token: [u8; TOKEN_LEN], probes: u32, interval_ms: u32 },
    /// From the easy side: no punch, and why.
    Refuse { reason: Refusal, detail: String },
    /// From the hard side: `sockets` sockets have sent towards `addr`; probe now.
    Ready { sockets: u16 },
    /// From the hard side: the probe sent to `port` arrived; dial that port.
    Hit { port: u16 },
    /// Either side: the punch is over without a direct connection.
    GiveUp { detail: String },
}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        cbor4ii::serde::to_vec(Vec::new(), self).expect("messages encode")
    }

    /// Decodes a frame body, refusing over-long details and replacing control characters in
    /// them (a detail ends up on an operator's terminal).
    pub fn decode(body: &[u8]) -> Result<Message, FrameError> {
        let mut message: Message = cbor4ii::serde::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
        match &mut message {
            Message::Refuse { detail, .. } | Message::GiveUp { detail } => {
                if detail.len() > MAX_DETAIL {
                    return Err(FrameError::Invalid(format!("detail of {} bytes, over {MAX_DETAIL}", detail.len())));
                }
                if detail.chars().any(char::is_control) {
                    *detail = detail.chars().map(|c| if c.is_control() { '?' } else { c }).collect();
                }
                Ok(message)
            }
            _ => Ok(message),
        }
    }
}

/// Reads one message.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Message, FrameError> {
    Message::decode(&read_frame(r, MAX_FRAME).await?)
}

/// Writes one message and flushes it.
pub async fn write<W: AsyncWrite + Unpin>(w: &mut W, message: &Message) -> std::io::Result<()> {
    write_frame(w, &message.encode()).await?;
    w.flush().await
}

/// Cuts a detail to [`MAX_DETAIL`] bytes on a character boundary.
pub fn detail(text: impl Into<String>) -> String {
    let mut text = text.into();
    if text.len() > MAX_DETAIL {
        let mut end = MAX_DETAIL;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Runs `data` through every decoder of what a peer sends in a punch (a message body, a
/// length-prefixed frame, a UDP probe) and drops the results. The fuzz target (`fuzz/`) drives
/// exactly this and the corpus test replays it, so the two cannot drift apart.
#[doc(hidden)]
pub fn decode_everything(data: &[u8]) {
    let _ = Message::decode(data);
    let _ = futures::executor::block_on(read(&mut &data[..]));
    let _ = Packet::decode(data);
}

/// A raw UDP probe: see the crate docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub token: [u8; TOKEN_LEN],
    /// The port the packet was sent to (0 from the hard side).
    pub port: u16,
}

impl Packet {
    pub fn encode(&self) -> [u8; PACKET_LEN] {
        let mut out = [0u8; PACKET_LEN];
        out[..MAGIC.len()].copy_from_slice(&MAGIC);
        out[MAGIC.len()..MAGIC.len() + TOKEN_LEN].copy_from_slice(&self.token);
        out[MAGIC.len() + TOKEN_LEN..].copy_from_slice(&self.port.to_be_bytes());
        out
    }

    /// The packet in `data`, if it is one (exact length, magic).
    pub fn decode(data: &[u8]) -> Option<Packet> {
        if data.len() != PACKET_LEN || data[..MAGIC.len()] != MAGIC {
            return None;
        }
        let mut token = [0u8; TOKEN_LEN];
        token.copy_from_slice(&data[MAGIC.len()..MAGIC.len() + TOKEN_LEN]);
        let port = u16::from_be_bytes([data[PACKET_LEN - 2], data[PACKET_LEN - 1]]);
        Some(Packet { token, port })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_packet_decodes_to_what_was_encoded_and_nothing_else_decodes() {
        let p = Packet { token: [7; TOKEN_LEN], port: 40_001 };
        assert_eq!(Packet::decode(&p.encode()), Some(p));
        assert_eq!(Packet::decode(&p.encode()[..PACKET_LEN - 1]), None);
        let mut wrong = p.encode();
        wrong[1] = b'x';
        assert_eq!(Packet::decode(&wrong), None);
    }

    #[test]
    fn messages_round_trip_through_frames() {
        futures::executor::block_on(async {
            for m in seed_messages() {
                let mut buf = Vec::new();
                write(&mut buf, &m).await.unwrap();
                assert!(buf.len() <= MAX_FRAME + 2);
                assert_eq!(read(&mut buf.as_slice()).await.unwrap(), m);
            }
        });
    }

    #[test]
    fn control_characters_in_a_detail_never_reach_the_terminal() {
        let body = Message::GiveUp { detail: "ok\x1b[2Jgone\n".into() }.encode();
        assert_eq!(Message::decode(&body).unwrap(), Message::GiveUp { detail: "ok?[2Jgone?".into() });
    }

    #[test]
    fn an_over_long_detail_is_refused() {
        let body = Message::GiveUp { detail: "a".repeat(MAX_DETAIL + 1) }.encode();
        assert!(matches!(Message::decode(&body), Err(FrameError::Invalid(_))));
        assert_eq!(detail("é".repeat(MAX_DETAIL)).len(), MAX_DETAIL);
    }

    /// Every file in tests/corpus (the fuzzer's minimised corpus, its seeds, and any crash it
    /// found) goes through every decoder the fuzz target drives without panicking; the seeds
    /// decode to what they were written from, so the corpus reaches the CBOR parser.
    #[test]
    fn the_fuzz_corpus_replays_without_panics() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            decode_everything(&bytes);
            let name = path.file_name().unwrap().to_str().unwrap();
            if let Some(i) = name.strip_prefix("seed_frame_") {
                let expected = &seed_messages()[i.parse::<usize>().unwrap()];
                assert_eq!(&futures::executor::block_on(read(&mut bytes.as_slice())).unwrap(), expected, "{name}");
            }
            n += 1;
        }
        assert!(n >= seed_messages().len(), "the corpus holds the seeds at least ({n} files)");
    }

    /// One message of each kind: the fuzzer's seeds (`seed_frame_N` in tests/corpus, written by
    /// `WRITE_PUNCH_SEEDS=1 cargo test -p warren-punch`).
    fn seed_messages() -> Vec<Message> {
        vec![
            Message::Offer { version: VERSION, ip: "203.0.113.9".parse().unwrap() },
            Message::Accept { addr: "198.51.100.7:4001".parse().unwrap(), token: [1; TOKEN_LEN], probes: 1750, interval_ms: 20 },
            Message::Refuse { reason: Refusal::BothSymmetric, detail: "x".into() },
            Message::Ready { sockets: 256 },
            Message::Hit { port: 12345 },
            Message::GiveUp { detail: "timed out".into() },
            Message::Offer { version: VERSION, ip: "2001:db8::1".parse().unwrap() },
        ]
    }

    #[test]
    fn seeds_are_written_on_request() {
        if std::env::var("WRITE_PUNCH_SEEDS").is_err() {
            return;
        }
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
        std::fs::create_dir_all(&dir).unwrap();
        for (i, m) in seed_messages().iter().enumerate() {
            let mut frame = Vec::new();
            futures::executor::block_on(write(&mut frame, m)).unwrap();
            std::fs::write(dir.join(format!("seed_frame_{i}")), frame).unwrap();
        }
        std::fs::write(dir.join("seed_packet"), Packet { token: [9; TOKEN_LEN], port: 4001 }.encode()).unwrap();
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoders(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Message::decode(&data);
            let _ = Packet::decode(&data);
        }
    }
}
