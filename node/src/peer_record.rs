//! What the node remembers about a peer, its on-disk encoding, and the bounded in-memory book the
//! event loop keeps (sans-IO: times are passed in, so it is tested without clocks or disks).
//!
//! Encoding of a record: one format byte ([`FORMAT_V1`]) then the record as CBOR. Decoding checks
//! the size and every bound before the record is used; a record that fails is dropped.

use std::collections::{HashMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

/// One change to the peer store, handed to the store's writer.
#[derive(Debug)]
pub enum PeerWrite {
    Put(PeerId, PeerRecord),
    Delete(PeerId),
}

/// Seconds since the Unix epoch: the clock peer records keep their times in.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub const FORMAT_V1: u8 = 1;
/// Addresses kept per peer; ones that never worked go first, then the least recently seen.
pub const MAX_ADDRS: usize = 16;
/// Failed dials in a row after which an address is dropped, unless it worked within
/// [`ADDR_WORKED_GRACE_SECS`]: a peer that is down for a while keeps the address it will be back on.
pub const MAX_ADDR_FAILURES: u32 = 3;
/// How long an address that worked survives failures: a week covers a machine switched off
/// over a holiday, not a laptop that left the network for good.
pub const ADDR_WORKED_GRACE_SECS: u64 = 7 * 24 * 3600;
/// An address that never worked and was not heard of again for this long is dropped.
pub const ADDR_UNSEEN_TTL_SECS: u64 = 7 * 24 * 3600;
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
    /// When a dial of this address last reached the peer.
    #[serde(default)]
    pub last_ok: Option<u64>,
    /// Failed dials since it last worked.
    #[serde(default)]
    pub failures: u32,
}

impl AddrEntry {
    /// Whether the address has earned its place: worked recently, or is new and not yet
    /// failed too often, and was heard of lately.
    fn keep(&self, now: u64) -> bool {
        let worked_lately = self.last_ok.is_some_and(|t| now.saturating_sub(t) < ADDR_WORKED_GRACE_SECS);
        worked_lately
            || (self.failures < MAX_ADDR_FAILURES
                && (self.last_ok.is_some() || now.saturating_sub(self.last_seen) < ADDR_UNSEEN_TTL_SECS))
    }

    /// Ordering key, best first when sorted descending: worked, most recently; then most
    /// recently heard of.
    fn rank(&self) -> (bool, u64, u64) {
        (self.last_ok.is_some(), self.last_ok.unwrap_or(0), self.last_seen)
    }
}

/// Everything stored about a peer. Times are unix seconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    pub addrs: Vec<AddrEntry>,
    pub last_seen: u64,
    /// When we last dialed this peer successfully; `None` if we never did.
    pub last_dial_ok: Option<u64>,
    pub protocols: Vec<String>,
    /// Scopes (see [`crate::addresses::Scopes`]) the peer was seen on: evidence that its
    /// non-public addresses there lead to it.
    #[serde(default)]
    pub scopes: u8,
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

    /// Notes an address as heard of at `now` (from the peer, the DHT or mDNS), keeping at most
    /// [`MAX_ADDRS`]: the ones that worked first, then the most recently heard of.
    pub fn observe_addr(&mut self, addr: Multiaddr, now: u64) {
        if addr.to_vec().len() > MAX_ADDR_LEN {
            return;
        }
        self.last_seen = self.last_seen.max(now);
        match self.addrs.iter_mut().find(|e| e.addr == addr) {
            Some(entry) => entry.last_seen = now,
            None => self.addrs.push(AddrEntry { addr, last_seen: now, last_ok: None, failures: 0 }),
        }
        self.tidy(now);
    }

    /// A dial of `addr` reached the peer.
    pub fn addr_worked(&mut self, addr: Multiaddr, now: u64) {
        self.observe_addr(addr.clone(), now);
        if let Some(entry) = self.addrs.iter_mut().find(|e| e.addr == addr) {
            entry.last_ok = Some(now);
            entry.failures = 0;
        }
        self.tidy(now);
    }

    /// A dial of `addr` failed; after [`MAX_ADDR_FAILURES`] in a row it is dropped unless it
    /// worked lately.
    pub fn addr_failed(&mut self, addr: &Multiaddr, now: u64) {
        if let Some(entry) = self.addrs.iter_mut().find(|e| e.addr == *addr) {
            entry.failures = entry.failures.saturating_add(1);
        }
        self.tidy(now);
    }

    /// Drops an address that does not lead to this peer (another peer answered on it).
    pub fn forget_addr(&mut self, addr: &Multiaddr) {
        self.addrs.retain(|e| e.addr != *addr);
    }

    /// Drops addresses that failed or aged out, sorts the best first, keeps the bound.
    pub fn tidy(&mut self, now: u64) {
        self.addrs.retain(|e| e.keep(now));
        self.addrs.sort_by_key(|e| std::cmp::Reverse(e.rank()));
        self.addrs.truncate(MAX_ADDRS);
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

    /// The addresses, best first (see [`Self::tidy`]).
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
    /// The book of `stored` records, tidied as of `now` (unix seconds).
    pub fn new(capacity: usize, stored: Vec<(PeerId, PeerRecord)>, now: u64) -> Self {
        let mut book = Self { records: HashMap::new(), dirty: HashSet::new(), removed: HashSet::new(), capacity };
        for (peer, mut record) in stored {
            let before = record.addrs.len();
            // Written before address health was kept: the peer was dialed, but which address
            // worked is unknown. Give its addresses the benefit of the doubt (failures still
            // age them out) rather than drop them all for not being heard of lately.
            if let Some(ok) = record.last_dial_ok
                && record.addrs.iter().all(|e| e.last_ok.is_none() && e.failures == 0)
            {
                record.addrs.iter_mut().for_each(|e| e.last_ok = Some(ok.min(e.last_seen)));
            }
            record.tidy(now);
            if record.addrs.len() != before {
                book.dirty.insert(peer);
            }
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

    pub fn iter(&self) -> impl Iterator<Item = (&PeerId, &PeerRecord)> {
        self.records.iter()
    }

    /// Changes a peer's record only if it exists.
    pub fn update_existing(&mut self, peer: &PeerId, change: impl FnOnce(&mut PeerRecord)) {
        if let Some(record) = self.records.get_mut(peer) {
            change(record);
            self.dirty.insert(*peer);
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
    fn an_address_that_worked_outlives_newer_ones_and_comes_first() {
        let mut r = PeerRecord::default();
        r.addr_worked(addr(1), 10);
        for i in 2..40u16 {
            r.observe_addr(addr(i), 10 + u64::from(i));
        }
        assert_eq!(r.addrs.len(), MAX_ADDRS);
        assert_eq!(r.addresses()[0], addr(1), "the address that worked is dialed first");
    }

    #[test]
    fn failed_addresses_age_out_unless_they_worked_lately() {
        let day = 24 * 3600;
        let mut r = PeerRecord::default();
        r.observe_addr(addr(1), 0);
        r.addr_worked(addr(2), 0);
        for _ in 0..MAX_ADDR_FAILURES {
            r.addr_failed(&addr(1), day);
            r.addr_failed(&addr(2), day);
        }
        assert_eq!(r.addresses(), vec![addr(2)], "a peer that is down keeps the address that worked");
        r.addr_failed(&addr(2), 8 * day);
        assert!(r.addresses().is_empty(), "after a week of failures it goes too");
        // Heard of once, never tried: gone after the unseen TTL.
        r.observe_addr(addr(3), 0);
        r.tidy(ADDR_UNSEEN_TTL_SECS + 1);
        assert!(r.addresses().is_empty());
    }

    #[test]
    fn a_record_from_before_address_health_keeps_its_addresses_on_load() {
        let old = PeerRecord {
            addrs: vec![AddrEntry { addr: addr(1), last_seen: 100, last_ok: None, failures: 0 }],
            last_seen: 100,
            last_dial_ok: Some(100),
            ..Default::default()
        };
        let peer = PeerId::random();
        let book = PeerBook::new(10, vec![(peer, old)], 100 + ADDR_UNSEEN_TTL_SECS * 4);
        assert_eq!(book.get(&peer).unwrap().addresses(), vec![addr(1)]);
    }

    #[test]
    fn a_wrong_peers_address_is_forgotten() {
        let mut r = PeerRecord::default();
        r.addr_worked(addr(1), 5);
        r.observe_addr(addr(2), 5);
        r.forget_addr(&addr(1));
        assert_eq!(r.addresses(), vec![addr(2)]);
    }

    #[test]
    fn records_written_before_address_health_was_kept_still_decode() {
        #[derive(Serialize)]
        struct OldEntry {
            #[serde(with = "multiaddr_bytes")]
            addr: Multiaddr,
            last_seen: u64,
        }
        #[derive(Serialize)]
        struct OldRecord {
            addrs: Vec<OldEntry>,
            last_seen: u64,
            last_dial_ok: Option<u64>,
            protocols: Vec<String>,
        }
        let old = OldRecord { addrs: vec![OldEntry { addr: addr(7), last_seen: 3 }], last_seen: 3, last_dial_ok: Some(2), protocols: vec!["/p".into()] };
        let mut bytes = vec![FORMAT_V1];
        bytes.extend(cbor4ii::serde::to_vec(Vec::new(), &old).unwrap());
        let record = PeerRecord::decode(&bytes).unwrap();
        assert_eq!(record.addrs[0].addr, addr(7));
        assert_eq!((record.addrs[0].last_ok, record.addrs[0].failures, record.scopes), (None, 0, 0));
    }

    #[test]
    fn the_book_evicts_the_least_useful_peer_first() {
        let mut book = PeerBook::new(2, vec![], 0);
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
        let mut book = PeerBook::new(10, vec![], 0);
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
                        last_ok: None,
                        failures: 0,
                    })
                    .collect(),
                last_seen,
                last_dial_ok,
                protocols,
                scopes: 0,
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
            let mut book = PeerBook::new(cap, vec![], 0);
            for s in seen {
                book.update(PeerId::random(), |r| r.last_seen = s);
                prop_assert!(book.len() <= cap);
            }
        }
    }
}
