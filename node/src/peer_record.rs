//! What the node remembers about a peer, its on-disk encoding, and the bounded in-memory book the
//! event loop keeps (sans-IO: times are passed in, so it is tested without clocks or disks).
//!
//! Encoding of a record: one format byte ([`FORMAT_V1`]) then the record as CBOR. Decoding checks
//! the size and every bound before the record is used; a record that fails is dropped.

use std::collections::{HashMap, HashSet};

use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

use crate::store::PeerWrite;

pub const FORMAT_V1: u8 = 1;
/// Addresses kept per peer; the least recently seen are dropped first.
pub const MAX_ADDRS: usize = 16;
/// Protocols kept per peer (identify lists a few dozen at most in practice).
pub const MAX_PROTOCOLS: usize = 64;
/// Longest protocol id kept.
pub const MAX_PROTOCOL_LEN: usize = 128;
/// Longest encoded multiaddr kept.
pub const MAX_ADDR_LEN: usize = 256;
/// Upper bound of an encoded record; anything larger is corrupt.
pub const MAX_RECORD_LEN: usize = 16 * 1024;

/// One address of a peer and when it was last seen (unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddrEntry {
    #[serde(with = "multiaddr_bytes")]
    pub addr: Multiaddr,
    pub last_seen: u64,
}

/// Everything stored about a peer. Times are unix seconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    pub addrs: Vec<AddrEntry>,
    pub last_seen: u64,
    /// When we last dialed this peer successfully; `None` if we never did.
    pub last_dial_ok: Option<u64>,
    pub protocols: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The record is empty or bigger than [`MAX_RECORD_LEN`].
    #[error("record length {0} out of bounds")]
    Length(usize),
    /// The format byte names a format this build does not know.
    #[error("unknown record format {0}")]
    Format(u8),
    /// The CBOR body is malformed.
    #[error("malformed record: {0}")]
    Cbor(String),
    /// The record decodes but breaks a bound.
    #[error("record exceeds a bound: {0}")]
    Bound(&'static str),
}

impl PeerRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT_V1];
        out.extend(cbor4ii::serde::to_vec(Vec::new(), self).expect("records always encode"));
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.is_empty() || bytes.len() > MAX_RECORD_LEN {
            return Err(DecodeError::Length(bytes.len()));
        }
        if bytes[0] != FORMAT_V1 {
            return Err(DecodeError::Format(bytes[0]));
        }
        let record: PeerRecord =
            cbor4ii::serde::from_slice(&bytes[1..]).map_err(|e| DecodeError::Cbor(e.to_string()))?;
        if record.addrs.len() > MAX_ADDRS {
            return Err(DecodeError::Bound("addresses"));
        }
        if record.protocols.len() > MAX_PROTOCOLS {
            return Err(DecodeError::Bound("protocols"));
        }
        if record.protocols.iter().any(|p| p.len() > MAX_PROTOCOL_LEN) {
            return Err(DecodeError::Bound("protocol length"));
        }
        Ok(record)
    }

    /// Notes an address as seen at `now`, keeping at most [`MAX_ADDRS`] (the most recent).
    pub fn observe_addr(&mut self, addr: Multiaddr, now: u64) {
        if addr.to_vec().len() > MAX_ADDR_LEN {
            return;
        }
        self.last_seen = self.last_seen.max(now);
        match self.addrs.iter_mut().find(|e| e.addr == addr) {
            Some(entry) => entry.last_seen = now,
            None => self.addrs.push(AddrEntry { addr, last_seen: now }),
        }
        if self.addrs.len() > MAX_ADDRS {
            self.addrs.sort_by_key(|a| std::cmp::Reverse(a.last_seen));
            self.addrs.truncate(MAX_ADDRS);
        }
    }

    pub fn set_protocols(&mut self, protocols: impl IntoIterator<Item = String>) {
        self.protocols = protocols
            .into_iter()
            .filter(|p| p.len() <= MAX_PROTOCOL_LEN)
            .take(MAX_PROTOCOLS)
            .collect();
    }

    pub fn supports(&self, protocol: &str) -> bool {
        self.protocols.iter().any(|p| p == protocol)
    }

    /// Larger is more useful: a peer we reached recently beats one we only heard of.
    pub fn usefulness(&self) -> (bool, u64) {
        (self.last_dial_ok.is_some(), self.last_dial_ok.unwrap_or(self.last_seen))
    }

    pub fn addresses(&self) -> Vec<Multiaddr> {
        self.addrs.iter().map(|e| e.addr.clone()).collect()
    }
}

/// The bounded set of known peers, with the changes not yet handed to the store.
#[derive(Debug)]
pub struct PeerBook {
    records: HashMap<PeerId, PeerRecord>,
    dirty: HashSet<PeerId>,
    removed: HashSet<PeerId>,
    capacity: usize,
}

impl PeerBook {
    pub fn new(capacity: usize, stored: Vec<(PeerId, PeerRecord)>) -> Self {
        let mut book = Self { records: HashMap::new(), dirty: HashSet::new(), removed: HashSet::new(), capacity };
        for (peer, record) in stored {
            book.records.insert(peer, record);
        }
        book.evict_over_capacity();
        book
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn get(&self, peer: &PeerId) -> Option<&PeerRecord> {
        self.records.get(peer)
    }

    /// Changes a peer's record (creating it), marks it for writing and keeps the book bounded.
    pub fn update(&mut self, peer: PeerId, change: impl FnOnce(&mut PeerRecord)) {
        change(self.records.entry(peer).or_default());
        self.removed.remove(&peer);
        self.dirty.insert(peer);
        if self.records.len() > self.capacity {
            self.evict_over_capacity();
        }
    }

    /// The most useful peers first.
    pub fn best(&self, n: usize) -> Vec<(PeerId, &PeerRecord)> {
        let mut all: Vec<_> = self.records.iter().map(|(p, r)| (*p, r)).collect();
        all.sort_by(|a, b| b.1.usefulness().cmp(&a.1.usefulness()));
        all.truncate(n);
        all
    }

    /// Evicts down to 7/8 of the capacity, so that a stream of new peers costs one sort per
    /// capacity/8 insertions rather than one per insertion.
    fn evict_over_capacity(&mut self) {
        if self.records.len() <= self.capacity {
            return;
        }
        let keep = self.capacity - self.capacity / 8;
        let excess = self.records.len() - keep;
        let mut all: Vec<_> = self.records.iter().map(|(p, r)| (r.usefulness(), *p)).collect();
        all.sort();
        for (_, peer) in all.into_iter().take(excess) {
            self.records.remove(&peer);
            self.dirty.remove(&peer);
            self.removed.insert(peer);
        }
    }

    /// The pending changes, as store writes. The caller gives them back with [`Self::restore`]
    /// if the store could not take them yet.
    pub fn take_changes(&mut self) -> Vec<PeerWrite> {
        let mut out: Vec<PeerWrite> = self.removed.drain().map(PeerWrite::Delete).collect();
        for peer in self.dirty.drain() {
            if let Some(record) = self.records.get(&peer) {
                out.push(PeerWrite::Put(peer, record.clone()));
            }
        }
        out
    }

    pub fn restore(&mut self, writes: Vec<PeerWrite>) {
        for write in writes {
            match write {
                PeerWrite::Put(peer, _) => {
                    if self.records.contains_key(&peer) {
                        self.dirty.insert(peer);
                    }
                }
                PeerWrite::Delete(peer) => {
                    if !self.records.contains_key(&peer) {
                        self.removed.insert(peer);
                    }
                }
            }
        }
    }
}

mod multiaddr_bytes {
    use libp2p::Multiaddr;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(addr: &Multiaddr, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&addr.to_vec())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Multiaddr, D::Error> {
        let bytes: serde_bytes_compat::Bytes = Deserialize::deserialize(d)?;
        if bytes.0.len() > super::MAX_ADDR_LEN {
            return Err(D::Error::custom("multiaddr too long"));
        }
        Multiaddr::try_from(bytes.0).map_err(D::Error::custom)
    }

    /// Accepts a CBOR byte string (what we write) as a `Vec<u8>`.
    mod serde_bytes_compat {
        use serde::de::{Deserialize, Deserializer, Visitor};

        pub struct Bytes(pub Vec<u8>);

        impl<'de> Deserialize<'de> for Bytes {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = Bytes;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str("a byte string")
                    }
                    fn visit_bytes<E>(self, v: &[u8]) -> Result<Bytes, E> {
                        Ok(Bytes(v.to_vec()))
                    }
                    fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Bytes, E> {
                        Ok(Bytes(v))
                    }
                }
                d.deserialize_bytes(V)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(i: u16) -> Multiaddr {
        format!("/ip4/192.0.2.1/tcp/{i}").parse().unwrap()
    }

    #[test]
    fn a_record_keeps_only_its_most_recent_addresses() {
        let mut r = PeerRecord::default();
        for i in 0..40u16 {
            r.observe_addr(addr(i), u64::from(i));
        }
        assert_eq!(r.addrs.len(), MAX_ADDRS);
        assert!(r.addrs.iter().all(|e| e.last_seen >= 24));
    }

    #[test]
    fn the_book_evicts_the_least_useful_peer_first() {
        let mut book = PeerBook::new(2, vec![]);
        // Capacity 2 keeps 2 - 2/8 = 2 after an eviction.
        let dialed = PeerId::random();
        let recent = PeerId::random();
        let old = PeerId::random();
        book.update(dialed, |r| r.last_dial_ok = Some(1));
        book.update(old, |r| r.last_seen = 5);
        book.update(recent, |r| r.last_seen = 50);
        assert!(book.get(&dialed).is_some(), "a peer we dialed outlives ones we only saw");
        assert!(book.get(&recent).is_some());
        assert!(book.get(&old).is_none());
        let changes = book.take_changes();
        assert!(changes.iter().any(|w| matches!(w, PeerWrite::Delete(p) if *p == old)));
    }

    #[test]
    fn changes_given_back_are_offered_again() {
        let mut book = PeerBook::new(10, vec![]);
        let peer = PeerId::random();
        book.update(peer, |r| r.last_seen = 1);
        let changes = book.take_changes();
        assert!(book.take_changes().is_empty());
        book.restore(changes);
        assert_eq!(book.take_changes().len(), 1);
    }

    #[test]
    fn garbage_and_oversized_records_are_refused() {
        assert_eq!(PeerRecord::decode(&[]), Err(DecodeError::Length(0)));
        assert_eq!(PeerRecord::decode(&[9, 1, 2]), Err(DecodeError::Format(9)));
        assert!(matches!(PeerRecord::decode(&[FORMAT_V1, 0xff, 0x00]), Err(DecodeError::Cbor(_))));
        assert!(matches!(PeerRecord::decode(&vec![FORMAT_V1; MAX_RECORD_LEN + 1]), Err(DecodeError::Length(_))));
    }

    #[test]
    fn a_record_with_too_many_protocols_is_refused() {
        let record = PeerRecord { protocols: vec!["/p".into(); MAX_PROTOCOLS + 1], ..Default::default() };
        assert_eq!(PeerRecord::decode(&record.encode()), Err(DecodeError::Bound("protocols")));
    }

    fn arb_record() -> impl Strategy<Value = PeerRecord> {
        (
            prop::collection::vec((any::<u32>(), any::<u16>(), any::<u64>()), 0..MAX_ADDRS),
            any::<u64>(),
            any::<Option<u64>>(),
            prop::collection::vec("/[a-z0-9/._-]{0,60}", 0..MAX_PROTOCOLS),
        )
            .prop_map(|(addrs, last_seen, last_dial_ok, protocols)| PeerRecord {
                addrs: addrs
                    .into_iter()
                    .map(|(ip, port, seen)| AddrEntry {
                        addr: format!("/ip4/{}/udp/{port}/quic-v1", std::net::Ipv4Addr::from(ip)).parse().unwrap(),
                        last_seen: seen,
                    })
                    .collect(),
                last_seen,
                last_dial_ok,
                protocols,
            })
    }

    proptest! {
        #[test]
        fn records_round_trip(record in arb_record()) {
            prop_assert_eq!(PeerRecord::decode(&record.encode()).unwrap(), record);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = PeerRecord::decode(&bytes);
        }

        #[test]
        fn the_book_never_exceeds_its_capacity(seen in prop::collection::vec(any::<u64>(), 0..200), cap in 1usize..50) {
            let mut book = PeerBook::new(cap, vec![]);
            for s in seen {
                book.update(PeerId::random(), |r| r.last_seen = s);
                prop_assert!(book.len() <= cap);
            }
        }
    }
}
