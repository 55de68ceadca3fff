//! Birthday punching (see [`crate::punch`]): when to offer one (we are behind a symmetric NAT and
//! reach a peer only through a relay), whether to take one (our NAT is easy), one at a time,
//! with a pause between punches and a per-peer backoff; what each punch achieved, for `warren
//! peers` and `warren status`. [`Birthday`] keeps the books (time passed in); the loop spawns
//! the punches.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId, swarm::{ConnectionId, dial_opts::{DialOpts, PeerCondition}}};
use tokio::sync::oneshot;
use warren_punch::Refusal;

use super::EventLoop;
use crate::addresses::is_relayed;
use crate::api::BirthdayStats;
use crate::handle::{Command, NodeHandle};
use crate::nat::{Mapping, Udp};
use crate::punch::{Admission, Failure, ListenGuard, Outcome};

/// Waits before offering a peer another punch after one failed, by failures so far: a NAT
/// that filled its table or a peer that was busy may do better soon; a NAT that never lets a
/// probe through will not, so the wait grows to an hour.
const RETRY_AFTER_FAILURE: [Duration; 4] =
    [Duration::from_secs(30), Duration::from_secs(120), Duration::from_secs(600), Duration::from_secs(3600)];
/// A peer's backoff is forgotten this long after it ran out (the peer was not offered again,
/// having gone or gone direct): the schedule must not grow with every peer ever punched, and a
/// peer back after that long starts the schedule over.
const RETRY_FORGOTTEN_AFTER: Duration = Duration::from_secs(3600);
/// Waits before offering again after a refusal that will not change soon (both NATs symmetric,
/// UDP blocked, punching turned off): networks change rarely.
const RETRY_AFTER_REFUSAL: Duration = Duration::from_secs(3600);
/// A punch that has run this long is over whatever its task says: the longest legitimate one
/// is two message waits, [`crate::punch::MAX_PROBING`] of probing and the connect wait.
const ACTIVE_STALE: Duration = Duration::from_secs(180);
/// Easy-side punches towards one IP per hour at most, and in all: an offer names the IP we
/// probe, so a peer could otherwise aim our probes at a third party again and again.
const PUNCHES_PER_IP_PER_HOUR: usize = 4;
const PUNCHES_PER_HOUR: usize = 20;
/// Inbound offers read at once; more are dropped unread (a node runs one punch at a time).
pub(super) const OFFERS_AT_ONCE: usize = 4;
/// How long after asking peers where they see us the easy side trusts its address again: an
/// identify round trip, with room to spare.
const REOBSERVE_SETTLE: Duration = Duration::from_secs(3);
/// How long the easy side, not knowing its mapping when an offer comes, waits for the peers it
/// just asked to say where they see us (a QUIC handshake and an identify round trip on a slow
/// path) before refusing; well inside the hard side's [`crate::punch::MESSAGE_WAIT`].
const LEARN_WAIT: Duration = Duration::from_secs(4);
/// How often the admission is asked again during [`LEARN_WAIT`].
const LEARN_POLL: Duration = Duration::from_millis(200);
/// Waits before offering a busy peer again, or after the relayed stream broke mid-punch.
const RETRY_WHEN_BUSY: Duration = Duration::from_secs(15);
/// How long a peer whose punched connection died is punched again even when no connection to
/// it is left (reaching it through a relay first): the forward that used the connection
/// wants it back, and the NAT change that killed it may have taken the relayed one too.
const LOST_KEPT: Duration = Duration::from_secs(600);

/// Which side of a punch we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// Behind the symmetric NAT: we offered and open the sockets.
    Hard,
    /// Behind the easy NAT: we were offered and send the probes.
    Easy,
}

/// What a birthday punch made of one connection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Punched {
    pub(super) hard: bool,
    pub(super) probes: u32,
    pub(super) sockets: u16,
    pub(super) took: Duration,
    /// From the first relayed contact with the peer to the direct connection.
    pub(super) after: Option<Duration>,
}

pub(super) struct Birthday {
    active: Option<(PeerId, Role, Instant)>,
    ended_at: Option<Instant>,
    /// When each peer may be offered a punch again, and its failures so far.
    retry: HashMap<PeerId, (Instant, usize)>,
    /// Why the last punch with each peer made no direct connection.
    failed: HashMap<PeerId, String>,
    punched: HashMap<ConnectionId, Punched>,
    /// The hard side's listeners, kept as long as their connections live.
    guards: HashMap<ConnectionId, ListenGuard>,
    /// Peers whose punched connection died, since when (see [`LOST_KEPT`]).
    lost: HashMap<PeerId, Instant>,
    /// The easy-side punches of the last hour and the IPs they probed.
    probed: std::collections::VecDeque<(Instant, IpAddr)>,
    /// The punched address we last dialed (the easy side): a mapping that lasts only while the
    /// connection does, so it is not stored as an address of the peer.
    dialed: Option<Multiaddr>,
    stats: BirthdayStats,
}

impl Birthday {
    pub(super) fn new() -> Self {
        Birthday {
            active: None,
            ended_at: None,
            retry: HashMap::new(),
            failed: HashMap::new(),
            punched: HashMap::new(),
            guards: HashMap::new(),
            dialed: None,
            lost: HashMap::new(),
            probed: std::collections::VecDeque::new(),
            stats: BirthdayStats::default(),
        }
    }

    /// Whether a punch may start now: none running, and the pause after the last one over.
    pub(super) fn idle(&self, min_interval: Duration, now: Instant) -> bool {
        self.active.is_none_or(|(_, _, since)| now.saturating_duration_since(since) >= ACTIVE_STALE)
            && self.ended_at.is_none_or(|t| now.saturating_duration_since(t) >= min_interval)
    }

    /// Whether the easy side may probe `ip` now (see [`PUNCHES_PER_IP_PER_HOUR`]); if so, counts it.
    pub(super) fn may_probe(&mut self, ip: IpAddr, now: Instant) -> bool {
        while self.probed.front().is_some_and(|(t, _)| now.saturating_duration_since(*t) >= Duration::from_secs(3600)) {
            self.probed.pop_front();
        }
        let to_ip = self.probed.iter().filter(|(_, i)| *i == ip).count();
        if to_ip >= PUNCHES_PER_IP_PER_HOUR || self.probed.len() >= PUNCHES_PER_HOUR {
            return false;
        }
        self.probed.push_back((now, ip));
        true
    }

    /// A peer disconnected: why its last punch failed is no longer shown (the retry schedule
    /// stays, so a reconnecting peer is not offered sooner).
    pub(super) fn on_disconnected(&mut self, peer: &PeerId) {
        self.failed.remove(peer);
    }

    /// Whether we may offer `peer` a punch now (idle aside).
    pub(super) fn may_offer(&self, peer: &PeerId, now: Instant) -> bool {
        self.retry.get(peer).is_none_or(|(at, _)| *at <= now)
    }

    pub(super) fn start(&mut self, peer: PeerId, role: Role, now: Instant) {
        self.active = Some((peer, role, now));
        self.stats.attempts += 1;
    }

    /// A punch ended. On success, `connection` is the direct connection it made (if the loop
    /// found it), which keeps the hard side's listener guard; with none, the guard is dropped
    /// (and its listener closed) here.
    pub(super) fn ended(
        &mut self,
        peer: PeerId,
        outcome: Outcome,
        connection: Option<ConnectionId>,
        after: Option<Duration>,
        now: Instant,
    ) -> Result<Punched, Failure> {
        let role = self.active.filter(|(p, _, _)| *p == peer).map(|(_, role, _)| role);
        if role.is_some() {
            self.active = None;
            self.ended_at = Some(now);
        }
        self.stats.probes_sent += u64::from(outcome.probes);
        let punched = Punched { hard: outcome.hard, probes: outcome.probes, sockets: outcome.sockets, took: outcome.took, after };
        match outcome.result {
            Ok(success) => {
                self.stats.successes += 1;
                self.lost.remove(&peer);
                self.retry.remove(&peer);
                self.failed.remove(&peer);
                if let Some(connection) = connection {
                    self.punched.insert(connection, punched);
                    if let Some(guard) = success.guard {
                        self.guards.insert(connection, guard);
                    }
                }
                Ok(punched)
            }
            Err(failure) => {
                self.stats.failures += 1;
                self.stats.last_error = Some(format!("{peer}: {failure}"));
                self.failed.insert(peer, failure.to_string());
                let before = self.retry.get(&peer).map_or(0, |(_, n)| *n);
                let mut failures = before;
                let wait = match &failure {
                    Failure::Refused { reason: Refusal::Busy, .. } => RETRY_WHEN_BUSY,
                    // A stream that broke before anything was sent is retried soon; once it
                    // keeps breaking, it waits like any failure.
                    Failure::Protocol(_) if before == 0 => {
                        failures = 1;
                        RETRY_WHEN_BUSY
                    }
                    Failure::Unsupported
                    | Failure::Refused {
                        reason: Refusal::BothSymmetric | Refusal::UdpBlocked | Refusal::Disabled | Refusal::Public, ..
                    } => RETRY_AFTER_REFUSAL,
                    _ => {
                        failures += 1;
                        RETRY_AFTER_FAILURE[(failures - 1).min(RETRY_AFTER_FAILURE.len() - 1)]
                    }
                };
                // Only the side that offers retries; the easy side answers whatever comes.
                self.retry.retain(|_, (at, _)| now.saturating_duration_since(*at) < RETRY_FORGOTTEN_AFTER);
                if role != Some(Role::Easy) {
                    self.retry.insert(peer, (now + wait, failures));
                }
                Err(failure)
            }
        }
    }

    /// A connection closed; if a birthday punch made it, what the punch was.
    pub(super) fn on_connection_closed(&mut self, connection: ConnectionId) -> Option<Punched> {
        self.guards.remove(&connection);
        self.punched.remove(&connection)
    }

    /// A punched connection to `peer` died (its NAT mapping changed or expired): the next punch
    /// may start at once, without the pause or the peer's backoff.
    pub(super) fn punch_again_now(&mut self, peer: PeerId, now: Instant) {
        self.retry.remove(&peer);
        self.pause_over();
        self.lost.insert(peer, now);
    }

    /// The pause after the last punch is over.
    pub(super) fn pause_over(&mut self) {
        self.ended_at = None;
    }

    /// Peers whose punched connection died lately, to punch again whether connected or not.
    pub(super) fn lost(&mut self, now: Instant) -> Vec<PeerId> {
        self.lost.retain(|_, since| now.saturating_duration_since(*since) < LOST_KEPT);
        self.lost.keys().copied().collect()
    }

    /// Whether `addr` is the punched address we dialed (see `dialed`).
    pub(super) fn is_punched_addr(&self, addr: &Multiaddr) -> bool {
        self.dialed.as_ref().is_some_and(|d| crate::addresses::without_p2p(addr) == *d)
    }

    pub(super) fn punched(&self, connection: &ConnectionId) -> Option<Punched> {
        self.punched.get(connection).copied()
    }

    /// Why a birthday punch has not connected us to `peer`, if one was tried.
    pub(super) fn why_not(&self, peer: &PeerId, now: Instant) -> Option<String> {
        if let Some((p, _, since)) = &self.active
            && p == peer
        {
            return Some(format!("birthday punch under way ({} s)", now.saturating_duration_since(*since).as_secs()));
        }
        self.failed.get(peer).map(|f| format!("birthday punch failed: {f}"))
    }

    pub(super) fn stats(&self) -> BirthdayStats {
        self.stats.clone()
    }
}

/// Puts a failure to reach the peer in the terms of opening a stream.
fn reach_to_open(e: crate::handle::ReachError) -> Result<warren_forward::OpenError, crate::handle::ShuttingDown> {
    match e {
        crate::handle::ReachError::ShuttingDown(s) => Err(s),
        crate::handle::ReachError::Open { source, .. } => Ok(source),
        other => Ok(warren_forward::OpenError::Failed(other.to_string())),
    }
}

/// What a punch task asks of the node, through its handle.
struct TaskNode(NodeHandle);

impl crate::punch::Node for TaskNode {
    fn has_direct(&self, peer: &PeerId) -> bool {
        self.0.has_direct(peer)
    }

    async fn dial(&self, peer: PeerId, addr: Multiaddr) {
        let _ = self.0.request(|reply| Command::PunchDial(peer, addr, reply)).await;
    }
}

impl EventLoop {
    /// A connection closed: if a birthday punch made it and we were the side that offers, punch
    /// again at once, reaching the peer through a relay first if nothing else is left.
    pub(super) fn birthday_connection_closed(&mut self, peer: PeerId, connection: ConnectionId, failed: bool) {
        let Some(punched) = self.birthday.on_connection_closed(connection) else { return };
        // Closed as idle, or by either side on purpose: nothing to mend.
        if !failed {
            return;
        }
        // Our NAT may have mapped us afresh; the easy side must know its new address before
        // the peer's next offer.
        self.reobserve();
        // The pause after a punch spaces punches that fail; this one worked until the path
        // died, and the peer's offer to mend it comes at once.
        self.birthday.pause_over();
        if !punched.hard {
            return; // the easy side waits for the peer's next offer
        }
        if self.has_direct(peer) {
            return;
        }
        tracing::info!(peer = %peer, "birthday-punched connection lost; punching again");
        self.birthday.punch_again_now(peer, Instant::now());
    }

    /// Our public IPv4 address when our NAT is symmetric (we would be the hard side), else `None`.
    fn hard_side_ip(&self) -> Option<IpAddr> {
        let evidence = self.nat_evidence();
        let assessment = crate::nat::assess(&evidence);
        if assessment.mapping != Mapping::EndpointDependent || assessment.udp == Udp::Blocked {
            return None;
        }
        evidence
            .observations
            .iter()
            .find(|o| o.transport == crate::nat::Transport::Quic && o.observed.is_ipv4())
            .map(|o| o.observed.ip())
    }

    /// Offers a punch to one peer we reach only through relays, when we are behind a symmetric
    /// NAT and nothing stops it (called every tick).
    pub(super) fn birthday_when_due(&mut self) {
        let now = Instant::now();
        let min_interval = Duration::from_secs(self.config.birthday.min_interval_secs);
        if !self.config.birthday_punch || self.punch.is_none() || !self.birthday.idle(min_interval, now) {
            return;
        }
        let mut relayed_only: Vec<PeerId> = Vec::new();
        for conn in self.conns.values() {
            if !relayed_only.contains(&conn.peer) {
                relayed_only.push(conn.peer);
            }
        }
        // Peers whose punched connection died come first, connected or not (the punch reaches
        // them through a relay first).
        let mut candidates = self.birthday.lost(now);
        for peer in relayed_only {
            if !candidates.contains(&peer) {
                candidates.push(peer);
            }
        }
        let relayed_only: Vec<PeerId> = candidates
            .into_iter()
            .filter(|peer| !self.has_direct(*peer))
            .filter(|peer| self.birthday.may_offer(peer, now))
            .collect();
        let Some(peer) = relayed_only.into_iter().next() else { return };
        let Some(ip) = self.hard_side_ip() else {
            // Whether we are the hard side is not known yet: find out, so that the next tick can
            // offer (or the peer's offer can be taken).
            self.learn_mapping();
            return;
        };
        let Some((_, listeners)) = &self.punch else { return };
        let listeners = listeners.clone();
        self.birthday.start(peer, Role::Hard, now);
        tracing::info!(peer = %peer, %ip, "behind a symmetric NAT: offering a birthday punch");
        let handle = self.handle.clone();
        let limits = self.config.birthday.clone();
        let public_ranges = self.config.public_ranges().unwrap_or_default();
        tokio::spawn(async move {
            let node = TaskNode(handle.clone());
            // Connected already, as a rule; a peer whose punched connection died may need a
            // relayed connection first.
            let outcome = match handle.reach_and_open(peer, crate::behaviour::PUNCH_PROTOCOL).await.map_err(reach_to_open) {
                Ok(opened) => {
                    let mut stream = opened.stream;
                    crate::punch::hard(&mut stream, peer, ip, &limits, &public_ranges, &listeners, &node).await
                }
                // A peer that does not speak the protocol (another implementation, an old warren)
                // is asked again only as rarely as one that turned punching off.
                Err(Ok(warren_forward::OpenError::Unsupported(_))) => Outcome::failed(Failure::Unsupported),
                Err(Ok(e)) => Outcome::failed(Failure::Protocol(format!("cannot open a punch stream: {e}"))),
                // The loop is shutting down, or the connection went away under the request:
                // either way the punch is over (and must be reported, or the node stays busy).
                Err(Err(_)) => Outcome::failed(Failure::Protocol("the connection closed while opening the punch stream".into())),
            };
            let _ = handle.request(|reply| Command::PunchDone(peer, outcome, reply)).await;
        });
    }

    /// Reads an offer on an inbound punch stream and runs the easy side if it is admitted.
    pub(super) fn on_punch_offer(&mut self, peer: PeerId, mut stream: warren_forward::Stream) {
        let Ok(slot) = self.offer_slots.clone().try_acquire_owned() else {
            tracing::debug!(peer = %peer, "punch offer dropped: {OFFERS_AT_ONCE} offers already being read");
            return;
        };
        let handle = self.handle.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let ip = match tokio::time::timeout(crate::punch::MESSAGE_WAIT, warren_punch::read(&mut stream)).await {
                Ok(Ok(warren_punch::Message::Offer { version: warren_punch::VERSION, ip })) => ip,
                Ok(Ok(warren_punch::Message::Offer { .. })) => {
                    let refuse = warren_punch::Message::Refuse { reason: Refusal::BadOffer, detail: "unsupported version".into() };
                    let _ = warren_punch::write(&mut stream, &refuse).await;
                    return;
                }
                other => {
                    tracing::debug!(peer = %peer, ?other, "punch stream without an offer");
                    return;
                }
            };
            // Not knowing our mapping yet (or re-learning it after a direct connection died),
            // the admission has asked peers where they see us: wait a moment for the answers
            // rather than send the peer away for half a minute.
            // The last try takes a mapping that most likely keeps our port.
            let learn_until = tokio::time::Instant::now() + LEARN_WAIT;
            let admitted = loop {
                let last_try = tokio::time::Instant::now() + LEARN_POLL >= learn_until;
                let admitted = handle.request(|reply| Command::PunchAdmit(peer, ip, last_try, reply)).await;
                match admitted {
                    Ok(Err((Refusal::Unknown, _))) if !last_try => tokio::time::sleep(LEARN_POLL).await,
                    other => break other,
                }
            };
            let admission = match admitted {
                Ok(Ok(admission)) => admission,
                Ok(Err((reason, detail))) => {
                    tracing::info!(peer = %peer, reason = reason.explain(), %detail, "birthday punch offer refused");
                    let refuse = warren_punch::Message::Refuse { reason, detail: warren_punch::detail(detail) };
                    let _ = warren_punch::write(&mut stream, &refuse).await;
                    return;
                }
                Err(_) => return,
            };
            tracing::info!(peer = %peer, %ip, "birthday punch offer taken: probing");
            let outcome = crate::punch::easy(&mut stream, peer, ip, admission, &TaskNode(handle.clone())).await;
            // The slot is for reading offers; a running punch is bounded by `active` already.
            let _ = handle.request(|reply| Command::PunchDone(peer, outcome, reply)).await;
        });
    }

    /// Whether we take `peer`'s offer (see [`Refusal`] for each reason), with a detail for the
    /// peer's `warren peers`: the first reason of our NAT assessment where that is the cause.
    pub(super) fn punch_admit(&mut self, peer: PeerId, ip: IpAddr, last_try: bool) -> Result<Admission, (Refusal, String)> {
        if !self.config.birthday_punch || self.punch.is_none() {
            return Err((Refusal::Disabled, String::new()));
        }
        if self.has_direct(peer) {
            return Err((Refusal::AlreadyDirect, String::new()));
        }
        let evidence = self.nat_evidence();
        let assessment = crate::nat::assess(&evidence);
        let why = assessment.reasons.first().cloned().unwrap_or_default();
        if assessment.mapping == Mapping::Unknown {
            self.learn_mapping();
        }
        // Two peers disagreeing, one of them seeing our own port, is most likely a port-keeping
        // NAT that had to pick another port for one flow (in the lab: a restarted relay's packet
        // got to the router before ours did). With no third peer to ask, punch with our port:
        // if the NAT is symmetric after all, the punch fails and the peer backs off.
        let port_kept = if last_try && assessment.mapping == Mapping::Unknown { crate::nat::port_kept(&evidence) } else { None };
        if let Some(addr) = port_kept {
            tracing::info!(peer = %peer, %addr, "our NAT's mapping is not settled; taking the offer with the port it most likely keeps");
        }
        let mapping = if port_kept.is_some() { Mapping::EndpointIndependent } else { assessment.mapping };
        match (assessment.udp, mapping) {
            (Udp::Blocked, _) => return Err((Refusal::UdpBlocked, why)),
            (_, Mapping::EndpointDependent) => return Err((Refusal::BothSymmetric, String::new())),
            (_, Mapping::None) => return Err((Refusal::Public, String::new())),
            // No QUIC connection at all while TCP reaches peers: UDP is most likely blocked,
            // but only a QUIC probe (`warren netcheck`) says so for sure.
            (Udp::Unknown, _) if self.conns.values().any(|c| !is_relayed(&c.address)) => {
                return Err((Refusal::Unknown, "no QUIC connection to any peer while TCP works: UDP may be blocked here".into()));
            }
            (_, Mapping::Unknown) => {
                let mut why = Vec::new();
                crate::nat::mapping_of(&evidence, &mut why);
                return Err((Refusal::Unknown, why.join("; ")));
            }
            (_, Mapping::EndpointIndependent) => {}
        }
        let Some(addr) = assessment.quic_mapped.or(port_kept).filter(|a| a.is_ipv4()) else {
            return Err((Refusal::Unknown, "no IPv4 address peers agree on for our QUIC socket".into()));
        };
        let public_ranges = self.config.public_ranges().unwrap_or_default();
        if !crate::punch::offer_ip_acceptable(ip, &public_ranges) {
            return Err((Refusal::BadOffer, format!("{ip} is not a public IPv4 address")));
        }
        let local_port = self.listen_addrs.iter().find_map(|a| {
            let (ip, port) = crate::addresses::endpoint_of(a)?;
            (ip.is_ipv4() && crate::addresses::transport_of(a) == "quic").then_some(port.number())
        });
        let Some(local_port) = local_port else { return Err((Refusal::Unknown, "no IPv4 QUIC listener".into())) };
        let now = Instant::now();
        if !self.birthday.idle(Duration::from_secs(self.config.birthday.min_interval_secs), now) {
            return Err((Refusal::Busy, String::new()));
        }
        // Peers are being asked where they see us now (a direct connection just died, maybe
        // because our mapping changed): the address above may be stale for a moment more. As
        // with a mapping not known yet, the offer waits (see `on_punch_offer`), then is taken.
        if self.reobserved_at.is_some_and(|t| now.saturating_duration_since(t) < REOBSERVE_SETTLE) {
            return Err((Refusal::Unknown, "re-learning our public address".into()));
        }
        if !self.birthday.may_probe(ip, now) {
            return Err((Refusal::Busy, format!("probed {ip} often enough this hour")));
        }
        self.birthday.start(peer, Role::Easy, now);
        Ok(Admission { addr, local_port, limits: self.config.birthday.clone() })
    }

    pub(super) fn punch_dial(&mut self, peer: PeerId, addr: Multiaddr) {
        tracing::info!(peer = %peer, %addr, "birthday punch hit: dialing the punched port");
        self.birthday.dialed = Some(addr.clone());
        let opts = DialOpts::peer_id(peer).addresses(vec![addr]).condition(PeerCondition::Always).build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::info!(peer = %peer, error = %e, "dialing the punched port failed");
        }
    }

    pub(super) fn punch_done(&mut self, peer: PeerId, outcome: Outcome) {
        let now = Instant::now();
        // The direct connection the punch made: on the hard side the one that came in on the
        // punched port, on the easy side the one to the punched address.
        let connection = match &outcome.result {
            Ok(success) => self
                .direct_conns(peer)
                .filter(|(_, c)| match success.port {
                    Some(port) => c.local_port == Some(port),
                    None => self.birthday.is_punched_addr(&c.address),
                })
                .max_by_key(|(_, c)| c.since)
                .map(|(id, _)| *id),
            Err(_) => None,
        };
        let (probes, sockets) = (outcome.probes, outcome.sockets);
        let after = self.hole_punch.relayed_for(&peer, now);
        match self.birthday.ended(peer, outcome, connection, after, now) {
            Ok(p) => tracing::info!(peer = %peer, probes, sockets, took_ms = p.took.as_millis() as u64, "birthday punch: direct connection"),
            Err(failure) => tracing::info!(peer = %peer, probes, sockets, %failure, "birthday punch failed; staying on the relay"),
        }
    }
}

/// `reply` is answered once the command is handled (the punch tasks wait on it only to keep
/// their order with the loop).
pub(super) fn answered(reply: oneshot::Sender<()>) {
    let _ = reply.send(());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::punch::Success;

    fn outcome(result: Result<Success, Failure>) -> Outcome {
        Outcome { hard: false, probes: 300, sockets: 256, took: Duration::from_secs(6), result }
    }

    #[test]
    fn one_punch_runs_at_a_time_with_a_pause_after_it() {
        let (mut b, peer, now) = (Birthday::new(), PeerId::random(), Instant::now());
        let pause = Duration::from_secs(10);
        assert!(b.idle(pause, now));
        b.start(peer, Role::Easy, now);
        assert!(!b.idle(pause, now + Duration::from_secs(100)), "busy while one runs");
        let conn = ConnectionId::new_unchecked(3);
        let ended = b.ended(peer, outcome(Ok(Success { guard: None, port: None })), Some(conn), Some(Duration::from_secs(7)), now);
        assert_eq!(ended.unwrap().probes, 300);
        assert!(!b.idle(pause, now + Duration::from_secs(9)));
        assert!(b.idle(pause, now + Duration::from_secs(10)));
        assert_eq!(b.punched(&conn).unwrap().after, Some(Duration::from_secs(7)));
        b.on_connection_closed(conn);
        assert_eq!(b.punched(&conn), None);
        let stats = b.stats();
        assert_eq!((stats.attempts, stats.successes, stats.failures, stats.probes_sent), (1, 1, 0, 300));
    }

    #[test]
    fn the_offering_side_backs_off_by_what_went_wrong_and_the_easy_side_never_does() {
        let (mut b, now) = (Birthday::new(), Instant::now());
        let (busy, both, lost, offered) = (PeerId::random(), PeerId::random(), PeerId::random(), PeerId::random());
        for (peer, failure) in [
            (busy, Failure::Refused { reason: Refusal::Busy, detail: String::new() }),
            (both, Failure::Refused { reason: Refusal::BothSymmetric, detail: String::new() }),
            (lost, Failure::NoHit(1750)),
            (lost, Failure::NoHit(1750)),
        ] {
            b.start(peer, Role::Hard, now);
            assert!(b.ended(peer, outcome(Err(failure)), None, None, now).is_err());
        }
        assert!(!b.may_offer(&busy, now + RETRY_WHEN_BUSY - Duration::from_secs(1)));
        assert!(b.may_offer(&busy, now + RETRY_WHEN_BUSY));
        assert!(!b.may_offer(&both, now + Duration::from_secs(3599)), "symmetric NATs do not change soon");
        assert!(!b.may_offer(&lost, now + RETRY_AFTER_FAILURE[0]), "the second failure waits longer");
        assert!(b.may_offer(&lost, now + RETRY_AFTER_FAILURE[1]));
        assert!(b.why_not(&lost, now).unwrap().contains("none of 1750 probes"), "{:?}", b.why_not(&lost, now));
        b.start(offered, Role::Easy, now);
        assert!(b.why_not(&offered, now).unwrap().contains("under way"));
        let _ = b.ended(offered, outcome(Err(Failure::NoHit(1750))), None, None, now);
        assert!(b.may_offer(&offered, now), "the easy side answers; it schedules nothing");
        assert_eq!(b.stats().failures, 5);
        // Backoffs that ran out an hour ago are forgotten when the next punch ends.
        let later = now + RETRY_AFTER_REFUSAL + RETRY_FORGOTTEN_AFTER;
        b.start(offered, Role::Hard, later);
        let _ = b.ended(offered, outcome(Err(Failure::NoHit(1750))), None, None, later);
        assert_eq!(b.retry.keys().collect::<Vec<_>>(), vec![&offered], "only the punch that just failed is scheduled");
    }
}
