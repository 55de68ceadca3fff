//! The two Kademlia DHTs: the WAN DHT (public addresses only) and the LAN DHT (a private
//! network's addresses, among peers seen on it). Finds and connect lookups run in both; our own
//! provider record carries our addresses; the routing tables are refreshed on a timer.

use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId, autonat, kad, swarm::{ConnectionId, dial_opts::DialOpts}};
use tokio::sync::oneshot;

use super::EventLoop;
use crate::addresses::{is_unspecified, without_p2p};
use crate::api;
use crate::config::DhtMode;

/// Our own provider record (how peers find our relayed addresses by PeerId) is published this
/// long after our external addresses last changed, so a burst of changes costs one publication.
const OWN_RECORD_SETTLE: Duration = Duration::from_millis(200);
/// A DHT bootstrap that starts this soon after the last one finished stops after its first
/// lookup (our own key). libp2p starts a bootstrap by itself whenever a peer enters a routing
/// table of fewer than 20, and has no public setting to turn that off: while a node joins, its
/// first peers queue a second bucket refresh that runs the moment the first one ends, about 35
/// requests and as many new connections (measured with `simulations/dht-scale`: 2 bootstraps per
/// joining node, and 100 connections per node a minute after a 300-node network joined). The own
/// key lookup is kept: on a small network it is how a newcomer's arrival is followed up.
const BOOTSTRAP_GAP: Duration = Duration::from_secs(60);
/// A publication of our own record (or of the relay announcement) that reached nobody is tried
/// again this much later. libp2p would only try again at its next republication, hours later,
/// and until then a node behind a NAT cannot be found by PeerId: in `simulations/dht-scale` at
/// 300 nodes, 33 of 42 finds of NATed nodes failed, their publications having timed out while
/// the network joined.
const PUBLISH_RETRY: Duration = Duration::from_secs(30);
/// Each publication that fails again doubles the wait before the next, up to this (and each wait
/// is spread like refreshes, [`REFRESH_SPREAD`]). A publication is a full lookup and 20 requests;
/// where they keep timing out (an overloaded machine, a lossy link) retrying every 30 s adds to
/// what makes them time out: in `simulations/dht-scale`, 500 nodes joining on two cores retried
/// 1,482 times in the first three minutes after joining, and the bootstraps, pings and relay
/// reservations that competed with them timed out too.
const PUBLISH_RETRY_MAX: Duration = Duration::from_secs(8 * 60);
/// Routing-table refreshes come at the interval ± this share of it, drawn anew each time. Nodes
/// that started together (a network restarted at once, a data centre's nodes after an outage)
/// would otherwise refresh together for good, each refresh about 35 requests to as many peers:
/// in `simulations/dht-scale`, the 500 nodes that joined within 28 s refreshed within the same
/// 28 s five minutes later, with 30 connections per node open again.
const REFRESH_SPREAD: f64 = 0.25;

/// Peers new among the 20 closest to our key since our record was last published that make
/// us publish it again at once, rather than at the next republication (30 min): a find asks the
/// peers closest to the key, and with a quarter of them new, fewer and fewer of those it asks hold
/// the record (servers that restart lose the records they held). In `simulations/dht-scale`
/// (500 nodes, a fifth replaced per 10 minutes) it fired for 9 of 453 refreshes; the finds that
/// failed there were not these (see the simulation's README).
const NEIGHBOURHOOD_TURNOVER: usize = 5;

/// A publication of ours (or libp2p's republication) whose lookup of the peers closest to its key
/// has run this long, and has been answered, ends its lookup there: the record goes to the peers
/// that answered. Left to run into the query timeout, libp2p drops the record altogether,
/// answers and all. In `simulations/dht-scale` (500 nodes joining on two cores), 1,015
/// publications timed out with 11 answers each on average and 11 requests still unanswered
/// after 30 s; the nodes that joined then were the only ones whose finds failed.
const PUBLICATION_LOOKUP_LIMIT: Duration = Duration::from_secs(20);
const _: () = assert!(PUBLICATION_LOOKUP_LIMIT.as_secs() < crate::behaviour::KAD_QUERY_TIMEOUT.as_secs());

/// A routing-table refresh under way: its lookups, and the answers and requests of those done.
pub(super) struct Refresh {
    lookups: std::collections::HashSet<kad::QueryId>,
    /// The lookup of our own key.
    own: Option<kad::QueryId>,
    answers: u32,
    requests: u32,
}

/// Which of the two DHTs (see [`crate::behaviour::Behaviour::lan_kad`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Dht {
    Wan,
    Lan,
}

/// A DHT query: query ids count per Kademlia instance, so they are told apart by DHT.
pub(super) type Query = (Dht, kad::QueryId);

pub(super) struct PendingFind {
    peer: PeerId,
    started: Instant,
    /// Lookups still running; the reply goes out when none is left.
    lookups: u8,
    found: bool,
    addrs: Vec<Multiaddr>,
    /// DHT requests sent by the lookups that have finished.
    requests: u32,
    reply: oneshot::Sender<api::FindReply>,
}

impl EventLoop {
    /// Looks `peer` up four ways at once (see `start_connect_lookups`) and answers as soon as
    /// one found it with usable addresses (the others are stopped), or when all four are done.
    /// Our own PeerId is answered at once with our own addresses.
    pub(super) fn find(&mut self, peer: PeerId, reply: oneshot::Sender<api::FindReply>) {
        if peer == *self.swarm.local_peer_id() {
            let _ = reply.send(api::FindReply {
                peer_id: peer.to_string(),
                found: true,
                addrs: self.own_addresses().iter().map(|a| a.to_string()).collect(),
                elapsed_ms: 0.0,
                requests: 0,
            });
            return;
        }
        let behaviour = self.swarm.behaviour_mut();
        let closest = (Dht::Wan, behaviour.kad.get_closest_peers(peer));
        let providers = (Dht::Wan, behaviour.kad.get_providers(peer_key(&peer)));
        let lan = (Dht::Lan, behaviour.lan_kad.get_closest_peers(peer));
        let lan_providers = (Dht::Lan, behaviour.lan_kad.get_providers(peer_key(&peer)));
        let find = PendingFind { peer, started: Instant::now(), lookups: 4, found: false, addrs: Vec::new(), requests: 0, reply };
        // All queries lead to the same pending find; the other ids point at the first.
        self.finds.insert(closest, find);
        for other in [providers, lan, lan_providers] {
            self.find_aliases.insert(other, closest);
        }
    }

    /// AutoNAT's verdict changed: in `--dht-mode auto` the WAN DHT serves only while we are
    /// publicly reachable.
    pub(super) fn on_reachability(&mut self, new: autonat::NatStatus) {
        if self.config.dht_mode == DhtMode::Auto {
            let mode = match new {
                autonat::NatStatus::Public(_) => kad::Mode::Server,
                _ => kad::Mode::Client,
            };
            self.swarm.behaviour_mut().kad.set_mode(Some(mode));
        }
    }

    pub(super) fn on_kad_event(&mut self, dht: Dht, event: kad::Event) {
        match event {
            kad::Event::OutboundQueryProgressed { id, result: kad::QueryResult::GetClosestPeers(result), stats, .. } => {
                if let Ok(ok) = &result
                    && self.refreshes.get(&dht).is_some_and(|r| r.own == Some(id))
                {
                    self.on_own_neighbourhood(dht, ok.peers.iter().map(|p| p.peer_id).collect());
                }
                if self.on_refresh_lookup(dht, id, &stats) {
                    return;
                }
                let id = (dht, id);
                let peers = match result {
                    Ok(ok) => ok.peers,
                    Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                };
                let find = self.finds.contains_key(&id).then_some(id).or_else(|| self.find_aliases.remove(&id));
                let target = match find {
                    Some(find) => self.finds.get(&find).map(|f| f.peer),
                    None => self.connect_lookups.remove(&id),
                };
                let Some(target) = target else { return };
                let mut addrs = addresses_of(&target, &peers);
                let found = peers.iter().any(|p| p.peer_id == target);
                // The lookup reports addresses that other peers returned; a target that was
                // already in our routing table comes back without them.
                if found {
                    addrs.extend(self.routing_table_addresses(dht, &target));
                }
                let addrs = self.usable_lookup_addresses(target, addrs);
                match find {
                    Some(find) => self.on_find_progress(find, found, addrs, Some(stats.num_requests())),
                    None => self.on_connect_lookup(target, addrs, true),
                }
            }
            kad::Event::RoutingUpdated { peer, addresses, .. } => {
                // Kademlia adds the address a connection was dialed on to a peer already in its
                // table, whatever its scope: take out what this DHT must not hold.
                let unfit: Vec<Multiaddr> = {
                    let policy = self.policy.lock().expect("policy lock");
                    addresses
                        .iter()
                        .filter(|a| match dht {
                            Dht::Wan => !policy.for_wan_dht(a),
                            Dht::Lan => !policy.for_lan_dht(&peer, a),
                        })
                        .cloned()
                        .collect()
                };
                let kad = self.kad(dht);
                for addr in &unfit {
                    kad.remove_address(&peer, addr);
                }
            }
            kad::Event::RoutablePeer { peer, address } => {
                // A peer that speaks this DHT connected on `address`: the LAN DHT takes it if
                // it is private and the WAN DHT if it is public (identify feeds the rest).
                let fits = {
                    let policy = self.policy.lock().expect("policy lock");
                    match dht {
                        Dht::Wan => policy.for_wan_dht(&address),
                        Dht::Lan => policy.for_lan_dht(&peer, &address),
                    }
                };
                if fits {
                    self.kad(dht).add_address(&peer, without_p2p(&address));
                }
            }
            kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::StartProviding(Err(error)) | kad::QueryResult::RepublishProvider(Err(error)),
                stats,
                ..
            } => self.on_publication_failed(dht, error.into_key(), &stats),
            kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::StartProviding(Ok(ok)) | kad::QueryResult::RepublishProvider(Ok(ok)),
                stats,
                ..
            } if stats.num_successes() == 0 => {
                // libp2p reports success once the record was sent to every peer its lookup
                // found answering: with none (a table of departed peers, say), to nobody.
                tracing::info!(?dht, "a publication of ours reached no peer");
                self.on_publication_failed(dht, ok.key, &stats);
            }
            kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::StartProviding(Ok(ok)) | kad::QueryResult::RepublishProvider(Ok(ok)),
                ..
            } => {
                if ok.key == peer_key(self.swarm.local_peer_id()) {
                    let own = kad::KBucketKey::from(*self.swarm.local_peer_id());
                    let near = self.kad(dht).get_closest_local_peers(&own).take(kad::K_VALUE.get()).map(|key| *key.preimage()).collect();
                    self.own_record_published.insert(dht, (Instant::now(), near));
                }
                self.publish_failures.remove(&(dht, ok.key));
            }
            kad::Event::OutboundQueryProgressed { id, result: kad::QueryResult::GetProviders(result), step, stats, .. } => {
                let providers = match result {
                    Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => providers,
                    _ => Default::default(),
                };
                let done = step.last;
                if dht == Dht::Wan && self.relay_lookups.contains_key(&id) {
                    self.on_relays_found(id, providers, done);
                    return;
                }
                let query = (dht, id);
                let find = self.find_aliases.get(&query).copied();
                let target = find.and_then(|f| self.finds.get(&f)).map(|f| f.peer).or_else(|| self.connect_lookups.get(&query).copied());
                let Some(target) = target else { return };
                // The providers' addresses live in the running query; ask Kademlia for them the
                // way a dial would.
                let addrs = if providers.contains(&target) { self.kad_addresses(dht, target) } else { Vec::new() };
                let addrs = self.usable_lookup_addresses(target, addrs);
                if let Some(find) = find {
                    if done {
                        self.find_aliases.remove(&query);
                    }
                    self.on_find_progress(find, !addrs.is_empty(), addrs, done.then(|| stats.num_requests()));
                } else {
                    if done {
                        self.connect_lookups.remove(&query);
                    }
                    self.on_connect_lookup(target, addrs, done);
                }
            }
            kad::Event::OutboundQueryProgressed { id, result: kad::QueryResult::Bootstrap(result), step, stats, .. } => {
                if self.cut_short(dht, id, &step) {
                    return;
                }
                // Each step of a bootstrap is a lookup with its own stats: answers add up over
                // the steps, and the last step says whether anybody answered at all.
                let answers = self.bootstrap_answers.entry(dht).or_default();
                *answers = answers.saturating_add(stats.num_successes());
                if !step.last {
                    return;
                }
                let answered = self.bootstrap_answers.remove(&dht).unwrap_or_default();
                let routing_table = self.on_table_checked(dht, answered);
                let requests = stats.num_requests();
                match result {
                    Ok(_) => tracing::info!(?dht, routing_table, requests, "DHT bootstrap finished"),
                    Err(error) => tracing::info!(?dht, routing_table, requests, %error, "DHT bootstrap timed out"),
                }
            }
            kad::Event::ModeChanged { new_mode } => tracing::info!(?dht, mode = %new_mode, "DHT mode changed"),
            kad::Event::InboundRequest { request: kad::InboundRequest::AddProvider { record: Some(record) } } => {
                if accepts_provider(&record, dht, &self.config.kad_protocol) {
                    use kad::store::RecordStore as _;
                    if let Err(e) = self.kad(dht).store_mut().add_provider(record) {
                        tracing::debug!(?dht, error = %e, "provider record not stored");
                    }
                } else {
                    tracing::debug!(?dht, provider = %record.provider, "refusing a provider record for a key it may not claim");
                }
            }
            // Values (PUT_VALUE) are never stored: warren uses none, and storing what anyone
            // sends would make every server a free storage service.
            kad::Event::InboundRequest { request: kad::InboundRequest::PutRecord { .. } } => {}
            _ => {}
        }
    }

    /// A lookup for relays found these: connects to as many as it may, picked at random (every
    /// node's lookup meets the same records first), and ends the lookup once it has.
    fn on_relays_found(&mut self, id: kad::QueryId, providers: std::collections::HashSet<PeerId>, done: bool) {
        use rand::seq::SliceRandom as _;
        let local = *self.swarm.local_peer_id();
        let mut found: Vec<PeerId> = providers.into_iter().filter(|r| *r != local && !self.swarm.is_connected(r)).collect();
        found.shuffle(&mut rand::thread_rng());
        let Some(left) = self.relay_lookups.get_mut(&id) else { return };
        found.truncate(*left);
        *left -= found.len();
        let enough = *left == 0;
        for relay in found {
            tracing::info!(relay = %relay, "found a relay in the DHT; connecting");
            let _ = self.swarm.dial(DialOpts::peer_id(relay).build());
        }
        if done || enough {
            self.relay_lookups.remove(&id);
            if let Some(mut query) = self.kad(Dht::Wan).query_mut(&id) {
                query.finish();
            }
        }
    }

    /// Addresses Kademlia knows for a peer: routing table and running queries.
    pub(super) fn kad_addresses(&mut self, dht: Dht, peer: PeerId) -> Vec<Multiaddr> {
        use libp2p::swarm::NetworkBehaviour as _;
        let kad = self.kad(dht);
        kad.handle_pending_outbound_connection(
                ConnectionId::new_unchecked(0),
                Some(peer),
                &[],
                libp2p::core::Endpoint::Dialer,
            )
            .unwrap_or_default()
    }

    /// The addresses a lookup returned that the policy lets us dial: others' answers may name
    /// a peer's loopback or LAN addresses, or ours.
    pub(super) fn usable_lookup_addresses(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Vec<Multiaddr> {
        let policy = self.policy.lock().expect("policy lock");
        let mut out: Vec<Multiaddr> = Vec::new();
        for addr in addrs.iter().map(without_p2p) {
            if !is_unspecified(&addr) && policy.may_dial(Some(peer), &addr).is_ok() && !out.contains(&addr) {
                out.push(addr);
            }
        }
        out
    }

    /// One of a find's lookups has news; `done` carries the requests it sent when it is over.
    pub(super) fn on_find_progress(&mut self, id: Query, found: bool, addrs: Vec<Multiaddr>, done: Option<u32>) {
        let Some(find) = self.finds.get_mut(&id) else { return };
        find.found |= found;
        for addr in addrs {
            if !find.addrs.contains(&addr) {
                find.addrs.push(addr);
            }
        }
        if let Some(requests) = done {
            find.lookups = find.lookups.saturating_sub(1);
            find.requests = find.requests.saturating_add(requests);
        }
        // Found with addresses: answer now. The other lookups would only add the wait for the
        // slowest peer on their paths (a node that left keeps a lookup waiting for its dial to
        // time out: `simulations/dht-scale` measured finds at 5 s p50 under churn, 0.35 s without).
        let answered = find.found && !find.addrs.is_empty();
        if find.lookups > 0 && !answered {
            return;
        }
        let mut find = self.finds.remove(&id).expect("present above");
        let mut queries = vec![id];
        self.find_aliases.retain(|alias, f| {
            let ours = *f == id;
            if ours {
                queries.push(*alias);
            }
            !ours
        });
        for (dht, query) in queries {
            if let Some(mut query) = self.kad(dht).query_mut(&query) {
                find.requests = find.requests.saturating_add(query.stats().num_requests());
                query.finish();
            }
        }
        if !find.addrs.is_empty() {
            self.remember(find.peer, &find.addrs);
        }
        let _ = find.reply.send(api::FindReply {
            peer_id: find.peer.to_string(),
            found: find.found,
            addrs: find.addrs.iter().map(|a| a.to_string()).collect(),
            elapsed_ms: find.started.elapsed().as_secs_f64() * 1000.0,
            requests: find.requests,
        });
    }

    pub(super) fn routing_table_addresses(&mut self, dht: Dht, peer: &PeerId) -> Vec<Multiaddr> {
        let mut out = Vec::new();
        let kad = self.kad(dht);
        for bucket in kad.kbuckets() {
            for entry in bucket.iter() {
                if entry.node.key.preimage() == peer {
                    out.extend(entry.node.value.iter().cloned());
                }
            }
        }
        out
    }

    /// One of the two Kademlia behaviours.
    pub(super) fn kad(&mut self, dht: Dht) -> &mut kad::Behaviour<kad::store::MemoryStore> {
        let behaviour = self.swarm.behaviour_mut();
        match dht {
            Dht::Wan => &mut behaviour.kad,
            Dht::Lan => &mut behaviour.lan_kad,
        }
    }

    /// Whether either DHT has peers that answered its last bootstrap or refresh (or that have not
    /// been asked yet). Without them the node dials its bootstrap peers again.
    pub(super) fn has_live_dht_peers(&mut self) -> bool {
        [Dht::Wan, Dht::Lan].into_iter().any(|dht| self.table_size(dht) > 0 && !self.unanswered_bootstrap.contains(&dht))
    }

    /// A provider record of ours reached nobody in time: our own record is published again
    /// after [`publish_retry`], as is the relay announcement.
    fn on_publication_failed(&mut self, dht: Dht, key: kad::RecordKey, stats: &kad::QueryStats) {
        let own = key == peer_key(self.swarm.local_peer_id());
        let relays = dht == Dht::Wan && key.as_ref() == crate::autorelay::RELAYS_KEY;
        if !own && !relays {
            return;
        }
        let table = self.table_size(dht);
        let failures = self.publish_failures.entry((dht, key)).or_default();
        *failures = failures.saturating_add(1);
        let wait = publish_retry(*failures);
        let retry_at = Instant::now() + wait;
        if own {
            tracing::info!(
                ?dht,
                retry_in_secs = wait.as_secs(),
                failures = *failures,
                requests = stats.num_requests(),
                answers = stats.num_successes(),
                unanswered = stats.num_failures(),
                pending = stats.num_pending(),
                secs = stats.duration().map(|d| d.as_secs()),
                table,
                "publishing our addresses in the DHT timed out"
            );
            self.own_record_due.entry(dht).or_insert(retry_at);
        } else {
            tracing::info!(retry_in_secs = wait.as_secs(), failures = *failures, "announcing the relay service in the DHT timed out");
            self.relay_announce_due = Some(retry_at);
        }
    }

    /// Cuts a bootstrap short when one finished less than [`BOOTSTRAP_GAP`] ago: after its first
    /// step, every further step is finished before it sends anything (libp2p moves a finished
    /// bootstrap step on to the next bucket, so each step is finished in turn). Returns whether
    /// the query is one being cut short.
    fn cut_short(&mut self, dht: Dht, id: kad::QueryId, step: &kad::ProgressStep) -> bool {
        let query = (dht, id);
        let cut = self.cut_bootstraps.contains(&query)
            || (step.count.get() == 1 && self.bootstrapped_at.get(&dht).is_some_and(|t| t.elapsed() < BOOTSTRAP_GAP));
        if !cut {
            return false;
        }
        if step.last {
            self.cut_bootstraps.remove(&query);
            tracing::debug!(?dht, steps = step.count.get(), "DHT bootstrap cut short: the last one finished moments ago");
        } else {
            self.cut_bootstraps.insert(query);
            if let Some(mut running) = self.kad(dht).query_mut(&id) {
                running.finish();
            }
        }
        true
    }

    /// A dial to `peer` failed on every address while other peers are connected to us (so our
    /// own network works): the peer left, or is out of our reach, and leaves both routing
    /// tables. libp2p keeps it for good otherwise: it drops a failed address but never the last
    /// one, and replaces the peer only when a newcomer needs its place in a full bucket. Until
    /// then every lookup through us waits out a dial timeout on it, ours and everyone's we
    /// answer with it. It comes back the way any peer enters: when it connects again.
    pub(super) fn forget_unreachable_dht_peer(&mut self, peer: PeerId) {
        for dht in [Dht::Wan, Dht::Lan] {
            if self.kad(dht).remove_peer(&peer).is_some() {
                tracing::debug!(?dht, %peer, "a peer in the routing table cannot be reached; dropped from it");
            }
        }
    }

    /// Ends the lookups of publications that have run [`PUBLICATION_LOOKUP_LIMIT`] with answers,
    /// so their records go to the peers that answered.
    pub(super) fn end_slow_publication_lookups(&mut self) {
        for dht in [Dht::Wan, Dht::Lan] {
            for mut query in self.kad(dht).iter_queries_mut() {
                let looking_up = matches!(query.info(), kad::QueryInfo::AddProvider { phase: kad::AddProviderPhase::GetClosestPeers, .. });
                let stats = query.stats();
                let (answers, waited) = (stats.num_successes(), stats.duration().unwrap_or_default());
                if looking_up && answers > 0 && waited >= PUBLICATION_LOOKUP_LIMIT {
                    tracing::info!(?dht, answers, "a publication's lookup is slow; the record goes to the peers that answered");
                    query.finish();
                }
            }
        }
    }

    /// Peers in a DHT's routing table.
    pub(super) fn table_size(&mut self, dht: Dht) -> usize {
        self.kad(dht).kbuckets().map(|b| b.num_entries()).sum()
    }

    /// Refreshes the routing tables every `bootstrap_interval_secs` once they have peers (see
    /// [`refresh_targets`] for what a refresh looks up). libp2p's own periodic bootstrap is off:
    /// it looks up a key in every bucket, full or not, one after the other, and on a node with no
    /// peers yet (the first of a network, say) it warned "Failed to trigger bootstrap" every time.
    /// (libp2p still bootstraps by itself when few peers are known, and tries once when a listen
    /// address appears; joining the network is a bootstrap too.)
    pub(super) fn refresh_dht_when_due(&mut self) {
        if Instant::now() < self.dht_refresh_due {
            return;
        }
        self.dht_refresh_due = Instant::now() + refresh_interval(&self.config);
        let local = *self.swarm.local_peer_id();
        for dht in [Dht::Wan, Dht::Lan] {
            if self.table_size(dht) == 0 {
                continue;
            }
            let kad = self.kad(dht);
            let targets = refresh_targets(local, kad);
            // Our own key as any lookup (its 20 closest are where our records go); a bucket's
            // key only until a few peers near it answered: they are the peers the bucket lacks.
            let mut own = None;
            let lookups = targets
                .into_iter()
                .map(|target| {
                    if target == local {
                        *own.insert(kad.get_closest_peers(target))
                    } else {
                        kad.get_n_closest_peers(target, BUCKET_LOOKUP_RESULTS)
                    }
                })
                .collect();
            // Replaces a refresh whose lookups have not all reported by now (each ends within the
            // query timeout, 30 s), rather than letting it hold back every later one.
            self.refreshes.insert(dht, Refresh { lookups, own, answers: 0, requests: 0 });
        }
    }

    /// A lookup ended; if it was one of a refresh's, counts what it had and returns true.
    fn on_refresh_lookup(&mut self, dht: Dht, id: kad::QueryId, stats: &kad::QueryStats) -> bool {
        let Some(refresh) = self.refreshes.get_mut(&dht) else { return false };
        if !refresh.lookups.remove(&id) {
            return false;
        }
        refresh.answers = refresh.answers.saturating_add(stats.num_successes());
        refresh.requests = refresh.requests.saturating_add(stats.num_requests());
        if refresh.lookups.is_empty() {
            let refresh = self.refreshes.remove(&dht).expect("present above");
            let routing_table = self.on_table_checked(dht, refresh.answers);
            tracing::info!(?dht, routing_table, requests = refresh.requests, answers = refresh.answers, "DHT refresh finished");
            // The DHT answers again: a publication of our record waiting out its back-off after
            // timeouts (up to 8 min, when the network was overloaded) goes now.
            let own = (dht, peer_key(self.swarm.local_peer_id()));
            if refresh.answers > 0 && self.publish_failures.contains_key(&own) {
                tracing::info!(?dht, "the DHT answers again; publishing our addresses now");
                self.own_record_due.insert(dht, Instant::now());
            }
        }
        true
    }

    /// A refresh found these peers closest to our key: when enough of them were not among the
    /// closest when our record was last published, publish it again now.
    fn on_own_neighbourhood(&mut self, dht: Dht, closest: Vec<PeerId>) {
        let Some((_, published_near)) = self.own_record_published.get(&dht) else { return };
        if neighbourhood_moved(published_near, &closest) {
            tracing::info!(?dht, "the peers closest to our key changed since our record was published; publishing it again");
            self.own_record_due.insert(dht, Instant::now());
        }
    }

    /// A bootstrap or a refresh ended with `answered` answers in all: records when, and whether
    /// the routing table is stale. Returns the table's size.
    fn on_table_checked(&mut self, dht: Dht, answered: u32) -> usize {
        self.bootstrapped_at.insert(dht, Instant::now());
        let routing_table = self.table_size(dht);
        if answered == 0 && routing_table > 0 {
            // libp2p keeps departed peers in the routing table (it replaces one only when a
            // newcomer needs its place), so a table can be all stale entries.
            tracing::info!(?dht, routing_table, "no peer in the routing table answered the DHT bootstrap or refresh; dialing bootstrap peers again");
            self.unanswered_bootstrap.insert(dht);
        } else {
            self.unanswered_bootstrap.remove(&dht);
        }
        routing_table
    }

    /// Our external addresses changed: publish our own record again in both DHTs.
    pub(super) fn own_record_changed(&mut self) {
        let due = Instant::now() + OWN_RECORD_SETTLE;
        self.own_record_due.insert(Dht::Wan, due);
        self.own_record_due.insert(Dht::Lan, due);
    }

    /// Publishes this node as provider of its own key, carrying its current external addresses
    /// (relayed ones included): how a node behind a NAT or a relay is found by PeerId. In each
    /// DHT once its routing table has peers to store the record.
    pub(super) fn publish_own_record_when_due(&mut self) {
        let now = Instant::now();
        for dht in [Dht::Wan, Dht::Lan] {
            let Some(due) = self.own_record_due.get(&dht).copied() else { continue };
            let peers = match dht {
                Dht::Wan => self.table_size(Dht::Wan),
                Dht::Lan => self.table_size(Dht::Lan),
            };
            if now < due || peers == 0 {
                continue;
            }
            self.own_record_due.remove(&dht);
            let key = peer_key(self.swarm.local_peer_id());
            let kad = self.kad(dht);
            if let Err(e) = kad.start_providing(key) {
                tracing::warn!(?dht, error = %e, "cannot publish our addresses in the DHT");
            }
        }
    }
}

/// What a routing-table refresh looks up: our own PeerId (our neighbourhood, where the records
/// we publish and hold live) and a random PeerId in each bucket beyond our closest neighbour's
/// that is not full. A full bucket has no room for what a lookup would find; its entries are
/// checked whenever a newcomer asks for a place in it (Kademlia pings the oldest) and dropped
/// when a lookup finds them gone, and the far buckets, where most entries are, are the ones
/// every lookup passes through. libp2p's bootstrap looks up one key per bucket whatever its
/// state, each lookup 20 requests and more: in `simulations/dht-scale` at 500 nodes, the
/// refreshes alone kept two cores busy.
pub(super) fn refresh_targets(local: PeerId, kad: &mut kad::Behaviour<kad::store::MemoryStore>) -> Vec<PeerId> {
    let mut entries = [0usize; 256];
    let mut closest: Option<usize> = None;
    for bucket in kad.kbuckets() {
        if let Some(index) = bucket.range().0.ilog2() {
            let index = index as usize;
            entries[index] = bucket.num_entries();
            closest = Some(closest.map_or(index, |c| c.min(index)));
        }
    }
    let local_key = kad::KBucketKey::from(local);
    let mut targets = vec![local];
    let Some(closest) = closest else { return targets };
    for index in closest + 1..entries.len() {
        if entries[index] < kad::K_VALUE.get()
            && let Some(target) = random_peer_in_bucket(&local_key, index)
        {
            targets.push(target);
        }
    }
    targets
}

/// A bucket's refresh lookup ends once this many peers near its random key have answered. The
/// lookup is there to find peers for a bucket with room, and the peers nearest its key are in
/// that bucket. Asking until the 20 nearest answered (a lookup's usual end), a refresh took 173
/// requests p50 at 500 nodes; with 5, 87.
const BUCKET_LOOKUP_RESULTS: std::num::NonZeroUsize = std::num::NonZeroUsize::new(5).expect("not zero");

/// Random PeerIds tried for one that falls into a given bucket. Bucket 255 takes one try in
/// two, bucket 245 one in 2,048: buckets closer than that are empty in networks of fewer than
/// about a thousand DHT servers, and the lookup of our own PeerId covers them.
const BUCKET_KEY_TRIES: usize = 4096;

/// A random PeerId at a distance from us that falls into bucket `index`, if one turns up in
/// [`BUCKET_KEY_TRIES`] tries.
fn random_peer_in_bucket(local: &kad::KBucketKey<PeerId>, index: usize) -> Option<PeerId> {
    (0..BUCKET_KEY_TRIES).map(|_| PeerId::random()).find(|peer| local.distance(&kad::KBucketKey::from(*peer)).ilog2() == Some(index as u32))
}

/// The wait before publishing again after `failures` publications in a row failed:
/// [`PUBLISH_RETRY`], doubling with each further failure up to [`PUBLISH_RETRY_MAX`], spread by
/// [`REFRESH_SPREAD`].
fn publish_retry(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    spread(PUBLISH_RETRY.saturating_mul(1 << doublings).min(PUBLISH_RETRY_MAX))
}

/// `wait` ± [`REFRESH_SPREAD`] of it, drawn anew each time.
fn spread(wait: Duration) -> Duration {
    use rand::Rng as _;
    wait.mul_f64(rand::thread_rng().gen_range(1.0 - REFRESH_SPREAD..=1.0 + REFRESH_SPREAD))
}

/// The time to the next routing-table refresh: `bootstrap_interval_secs`, spread over ±25 %
/// ([`REFRESH_SPREAD`]).
pub(super) fn refresh_interval(config: &crate::config::Config) -> Duration {
    spread(config.bootstrap_interval())
}

/// Whether a provider record from another node is kept. In warren's own DHTs a node may only
/// provide its own key (how it is found by PeerId) and the relay key (relays announce
/// themselves); so nobody can publish addresses under someone else's PeerId, or fill the store
/// with keys of its choosing. A node in the IPFS DHT (`--kad-protocol /ipfs/kad/1.0.0`) serves
/// provider records as that network expects; the store's own limits bound them.
fn accepts_provider(record: &kad::ProviderRecord, dht: Dht, kad_protocol: &str) -> bool {
    let foreign = dht == Dht::Wan && kad_protocol.starts_with("/ipfs/");
    foreign || record.key == peer_key(&record.provider) || record.key.as_ref() == crate::autorelay::RELAYS_KEY
}

/// Whether at least [`NEIGHBOURHOOD_TURNOVER`] of `closest` (the peers a lookup of our key
/// found closest) are not among those closest when our record was published.
fn neighbourhood_moved(published_near: &std::collections::HashSet<PeerId>, closest: &[PeerId]) -> bool {
    closest.iter().filter(|peer| !published_near.contains(peer)).count() >= NEIGHBOURHOOD_TURNOVER
}

/// The DHT key under which a node publishes itself as provider (its relayed addresses).
pub(super) fn peer_key(peer: &PeerId) -> kad::RecordKey {
    kad::RecordKey::new(&peer.to_bytes())
}

/// The addresses a lookup returned for `peer`.
fn addresses_of(peer: &PeerId, found: &[kad::PeerInfo]) -> Vec<Multiaddr> {
    found.iter().filter(|p| &p.peer_id == peer).flat_map(|p| p.addrs.iter().cloned()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_record_lives_where_the_lookup_of_our_own_key_ends() {
        let me = PeerId::random();
        let by_peer = kad::KBucketKey::from(me);
        let by_record = kad::KBucketKey::new(peer_key(&me));
        assert_eq!(by_peer.distance(&by_record), kad::KBucketDistance::default(), "one place in the keyspace");
    }

    #[test]
    fn a_quarter_of_new_neighbours_means_publishing_our_record_again() {
        let near: Vec<PeerId> = (0..20).map(|_| PeerId::random()).collect();
        let published: std::collections::HashSet<PeerId> = near.iter().copied().collect();
        let with_new = |n: usize| near.iter().skip(n).copied().chain((0..n).map(|_| PeerId::random())).collect::<Vec<_>>();
        assert!(!neighbourhood_moved(&published, &near), "the same peers");
        assert!(!neighbourhood_moved(&published, &with_new(4)));
        assert!(neighbourhood_moved(&published, &with_new(5)));
        assert!(neighbourhood_moved(&published, &with_new(20)));
    }

    #[test]
    fn a_node_may_provide_only_its_own_key_and_the_relay_key_in_warrens_dhts() {
        let (me, other) = (PeerId::random(), PeerId::random());
        let record = |key: kad::RecordKey| kad::ProviderRecord::new(key, me, Vec::new());
        let own = record(peer_key(&me));
        let relays = record(kad::RecordKey::new(&crate::autorelay::RELAYS_KEY));
        let someone_elses = record(peer_key(&other));
        let arbitrary = record(kad::RecordKey::new(&b"anything"));
        for dht in [Dht::Wan, Dht::Lan] {
            assert!(accepts_provider(&own, dht, "/warren/kad/1.0.0"));
            assert!(accepts_provider(&relays, dht, "/warren/kad/1.0.0"));
            assert!(!accepts_provider(&someone_elses, dht, "/warren/kad/1.0.0"), "nobody publishes under another's PeerId");
            assert!(!accepts_provider(&arbitrary, dht, "/warren/kad/1.0.0"));
        }
        assert!(accepts_provider(&arbitrary, Dht::Wan, "/ipfs/kad/1.0.0"), "the IPFS DHT stores what it is for");
        assert!(!accepts_provider(&arbitrary, Dht::Lan, "/ipfs/kad/1.0.0"));
    }

    #[test]
    fn a_refresh_looks_up_our_own_key_and_each_bucket_with_room_beyond_our_closest_neighbour() {
        let local = PeerId::random();
        let local_key = kad::KBucketKey::from(local);
        let mut kad = kad::Behaviour::new(local, kad::store::MemoryStore::new(local));
        assert_eq!(refresh_targets(local, &mut kad), vec![local], "an empty table: our own key only");
        let addr: Multiaddr = "/ip4/198.51.100.1/tcp/4001".parse().unwrap();
        let bucket_of = |peer: &PeerId| local_key.distance(&kad::KBucketKey::from(*peer)).ilog2().unwrap() as usize;
        // Bucket 255 full, 3 peers in 254, our closest neighbour in 250.
        for (bucket, count) in [(255, kad::K_VALUE.get()), (254, 3), (250, 1)] {
            for _ in 0..count {
                let peer = random_peer_in_bucket(&local_key, bucket).expect("a key in a far bucket");
                kad.add_address(&peer, addr.clone());
            }
        }
        let targets = refresh_targets(local, &mut kad);
        assert_eq!(targets[0], local);
        let mut buckets: Vec<usize> = targets[1..].iter().map(bucket_of).collect();
        buckets.sort();
        assert_eq!(buckets, vec![251, 252, 253, 254], "the full bucket and the neighbour's own are left out");
    }

    #[test]
    fn failed_publications_are_retried_ever_later_up_to_the_cap() {
        let within = |wait: Duration, base: Duration| {
            wait >= base.mul_f64(1.0 - REFRESH_SPREAD) && wait <= base.mul_f64(1.0 + REFRESH_SPREAD)
        };
        for (failures, base) in [(1, 30), (2, 60), (3, 120), (4, 240), (5, 480), (6, 480), (u32::MAX, 480)] {
            let wait = publish_retry(failures);
            assert!(within(wait, Duration::from_secs(base)), "after {failures} failures: {wait:?}, not about {base} s");
        }
    }
}
