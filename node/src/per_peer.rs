//! Counting what each peer has in progress against a cap: a [`Slot`] is held while one thing of
//! the peer's is under way and given back when dropped; a peer with nothing under way is not
//! remembered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use libp2p::PeerId;

#[derive(Default, Clone)]
pub struct PerPeer(Arc<Mutex<HashMap<PeerId, usize>>>);

/// One of a peer's slots, given back when dropped.
pub struct Slot(PerPeer, PeerId);

impl PerPeer {
    /// A slot for `peer`, unless it holds `cap` already.
    pub fn take(&self, peer: PeerId, cap: usize) -> Option<Slot> {
        let mut map = self.0.lock().unwrap();
        let count = map.entry(peer).or_default();
        if *count >= cap {
            return None;
        }
        *count += 1;
        Some(Slot(self.clone(), peer))
    }

    /// Slots `peer` holds now.
    pub fn held(&self, peer: &PeerId) -> usize {
        self.0.lock().unwrap().get(peer).copied().unwrap_or(0)
    }

    /// Peers holding slots now.
    pub fn peers(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.0.0.lock().unwrap();
        if let Some(count) = map.get_mut(&self.1) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_gets_its_cap_and_its_slots_come_back() {
        let counts = PerPeer::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        let held: Vec<_> = (0..4).map(|_| counts.take(a, 4).expect("within the cap")).collect();
        assert!(counts.take(a, 4).is_none(), "one over the cap is refused");
        assert!(counts.take(b, 4).is_some(), "another peer is not");
        drop(held);
        let again = counts.take(a, 4).expect("released slots are counted back");
        assert_eq!(counts.held(&a), 1);
        drop(again);
        assert_eq!(counts.peers(), 0, "a peer with nothing under way is forgotten");
    }
}
