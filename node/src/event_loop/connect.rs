//! Reaching a peer on demand (`warren forward`, `warren ping`): stored addresses first, then
//! lookups in both DHTs; and what a failed dial teaches us (an address that answers as another
//! peer, or as ourselves, is forgotten and the remaining addresses get their turn).

use std::time::Instant;

use libp2p::{Multiaddr, PeerId, multiaddr::Protocol, swarm::{DialError, dial_opts::DialOpts}};
use tokio::sync::oneshot;

use super::EventLoop;
use super::dht::{Dht, peer_key};
use crate::addresses::{one_circuit_per_connected_relay, without_p2p};
use crate::dial_gate::refusal_in;
use crate::handle::ConnectError;
use crate::peer_record::unix_now;

/// Re-dials of one peer after wrong-peer answers, until it connects: each drops the address
/// that answered wrongly, but an address another behaviour keeps offering (mDNS's cache, say)
/// would otherwise be re-dialed forever.
const MAX_WRONG_PEER_REDIALS: u8 = 4;
/// Lookups a connect attempt runs at once (see `start_connect_lookups`).
pub(super) const CONNECT_LOOKUPS: u8 = 4;

pub(super) enum ConnectStage {
    DialingKnown,
    LookingUp,
    DialingFound,
}

pub(super) struct ConnectAttempt {
    pub(super) stage: ConnectStage,
    /// DHT lookups still running (closest peers in both DHTs, providers of the peer's own key).
    pub(super) lookups: u8,
    /// Why the last dial failed, reported if the lookups find nothing better.
    pub(super) last_error: Option<ConnectError>,
    pub(super) waiters: Vec<oneshot::Sender<Result<(), ConnectError>>>,
}

impl EventLoop {
    pub(super) fn connect(&mut self, peer: PeerId, reply: oneshot::Sender<Result<(), ConnectError>>) {
        if self.swarm.is_connected(&peer) {
            let _ = reply.send(Ok(()));
            return;
        }
        if peer == *self.swarm.local_peer_id() {
            let _ = reply.send(Err(ConnectError::OwnPeerId));
            return;
        }
        if let Some(attempt) = self.connects.get_mut(&peer) {
            attempt.waiters.push(reply);
            return;
        }
        let mut known = self.dialable(peer);
        for addr in self.bootstrap.addrs(&peer) {
            if !known.contains(addr) {
                known.push(addr.clone());
            }
        }
        let (stage, lookups) = if known.is_empty() {
            self.start_connect_lookups(peer);
            (ConnectStage::LookingUp, CONNECT_LOOKUPS)
        } else {
            let known = one_circuit_per_connected_relay(known, |relay| self.swarm.is_connected(relay));
            let _ = self.swarm.dial(DialOpts::peer_id(peer).addresses(known).extend_addresses_through_behaviour().build());
            (ConnectStage::DialingKnown, 0)
        };
        self.connects.insert(peer, ConnectAttempt { stage, lookups, last_error: None, waiters: vec![reply] });
    }

    /// Looks a peer up four ways at once, in both DHTs: the peers closest to its id (finds DHT
    /// servers: public ones in the WAN DHT, every node of our private network in the LAN DHT),
    /// and providers of its own key (finds nodes behind NATs or relays, which publish their
    /// relayed addresses that way since they are not in anyone's routing table).
    pub(super) fn start_connect_lookups(&mut self, peer: PeerId) {
        let behaviour = self.swarm.behaviour_mut();
        let closest = (Dht::Wan, behaviour.kad.get_closest_peers(peer));
        let providers = (Dht::Wan, behaviour.kad.get_providers(peer_key(&peer)));
        let lan = (Dht::Lan, behaviour.lan_kad.get_closest_peers(peer));
        let lan_providers = (Dht::Lan, behaviour.lan_kad.get_providers(peer_key(&peer)));
        for query in [closest, providers, lan, lan_providers] {
            self.connect_lookups.insert(query, peer);
        }
    }

    /// One of a connect attempt's lookups ended with these addresses for the peer.
    pub(super) fn on_connect_lookup(&mut self, peer: PeerId, addrs: Vec<Multiaddr>, done: bool) {
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
            let addrs = one_circuit_per_connected_relay(addrs, |relay| self.swarm.is_connected(relay));
            let _ = self.swarm.dial(DialOpts::peer_id(peer).addresses(addrs).extend_addresses_through_behaviour().build());
        } else if attempt.lookups == 0 && matches!(attempt.stage, ConnectStage::LookingUp) {
            let error = attempt.last_error.take();
            self.finish_connect(&peer, Err(error.unwrap_or(ConnectError::NotFound)));
        }
    }

    pub(super) fn finish_connect(&mut self, peer: &PeerId, result: Result<(), ConnectError>) {
        if let Some(attempt) = self.connects.remove(peer) {
            for waiter in attempt.waiters {
                let _ = waiter.send(result.clone());
            }
        }
    }

    pub(super) fn on_dial_failure(&mut self, peer: PeerId, error: &DialError) {
        let now = unix_now();
        let connected = self.swarm.is_connected(&peer);
        // Every address failed for reasons of the network, not our policy's refusals.
        let mut unreachable_everywhere = false;
        match error {
            DialError::WrongPeerId { obtained, address } => {
                let addr = without_p2p(address);
                self.wrong_peer_dials += 1;
                let configured = self.bootstrap.addrs(&peer).contains(&addr);
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
                unreachable_everywhere = !failed.is_empty() && failed.iter().all(|(_, e)| refusal_in(e).is_none());
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
        if unreachable_everywhere && !connected && self.swarm.connected_peers().next().is_some() {
            self.forget_unreachable_dht_peer(peer);
        }
        let unreachable = self.bootstrap.on_dial_failed(&peer, connected, Instant::now());
        if connected {
            // Another connection is up: one failed dial says nothing about reachability.
            return;
        }
        match unreachable {
            Some(retry_in) => {
                let addrs = self.bootstrap.addrs(&peer);
                tracing::warn!(peer = %peer, ?addrs, ?retry_in, error = %error, "bootstrap peer unreachable; will retry");
            }
            // The dial over another transport may still get through.
            None if self.bootstrap.contains(&peer) => return,
            None => {}
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
                attempt.last_error = Some(ConnectError::DialFailed(error.to_string()));
            }
            ConnectStage::DialingFound => self.finish_connect(&peer, Err(ConnectError::DialFailed(error.to_string()))),
            ConnectStage::LookingUp => {}
        }
    }

    /// Drops an address that does not lead to `peer` from its record and from both DHTs (which
    /// may hold it with or without `/p2p/PEER`).
    pub(super) fn forget_address(&mut self, peer: PeerId, addr: &Multiaddr) {
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
    pub(super) fn redial(&mut self, peer: PeerId) -> bool {
        let count = self.redials.entry(peer).or_default();
        if *count >= MAX_WRONG_PEER_REDIALS {
            return false;
        }
        *count += 1;
        if self.redials.len() > self.config.max_stored_peers {
            self.redials.clear();
        }
        let mut addrs = self.dialable(peer);
        addrs.extend(self.bootstrap.addrs(&peer).iter().cloned());
        if addrs.is_empty() {
            return false;
        }
        tracing::debug!(peer = %peer, addrs = addrs.len(), "dialing the remaining addresses");
        self.swarm.dial(DialOpts::peer_id(peer).addresses(addrs).build()).is_ok()
    }
}
