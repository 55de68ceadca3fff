//! Direct connections that went silent under a forwarded connection: probed, and closed when
//! they do not answer, so the streams on them resume elsewhere (the relay, then a new punch)
//! within seconds instead of after QUIC's 10 s idle timeout (see `crate::paths`).

use std::time::Instant;

use libp2p::PeerId;
use libp2p::swarm::ConnectionId;

use super::EventLoop;
use crate::handle::Command;
use crate::paths::{CHECK_EVERY, CHECKS_REMEMBERED, PROBE_PROTOCOL, Silent, probe, probe_within};

impl EventLoop {
    /// Probes every direct connection to `peer`, at most once per [`CHECK_EVERY`].
    pub(super) fn check_paths(&mut self, peer: PeerId) {
        let now = Instant::now();
        if self.path_checks.get(&peer).is_some_and(|at| now.duration_since(*at) < CHECK_EVERY) {
            return;
        }
        let direct: Vec<_> = self.direct_conns(peer).map(|(id, c)| (*id, c.rtt)).collect();
        if direct.is_empty() {
            return;
        }
        if self.path_checks.len() >= CHECKS_REMEMBERED {
            self.path_checks.retain(|_, at| now.duration_since(*at) < CHECK_EVERY);
        }
        self.path_checks.insert(peer, now);
        for (connection, rtt) in direct {
            let (opened, opening) = tokio::sync::oneshot::channel();
            self.swarm.behaviour_mut().forward.open_on(peer, connection, PROBE_PROTOCOL, opened);
            let within = probe_within(rtt);
            let handle = self.handle.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                match probe(opening, within).await {
                    Ok(()) => tracing::debug!(peer = %peer, took = ?started.elapsed(), "direct connection answered its probe"),
                    Err(silent) => {
                        let _ = handle.tell(Command::PathSilent(peer, connection, silent, started)).await;
                    }
                }
            });
        }
    }

    /// A direct connection did not answer its probe: closed, so that what it carried moves on,
    /// unless its forwarded connections brought bytes since the probe `started` (the event loop
    /// may take this up well after the probe gave up). A connection carrying many of
    /// them may hold the probe's stream back (its stream limit, the peer's queue of streams to
    /// accept) for longer than the probe waits: 1,000 forwarded connections opened at once had
    /// their working connection closed under them that way (measured).
    pub(super) fn on_path_silent(&mut self, peer: PeerId, connection: ConnectionId, silent: Silent, started: Instant) {
        let heard_ago = self.swarm.behaviour().forward.heard_ago(&peer, connection);
        if heard_ago.is_some_and(|ago| ago <= started.elapsed()) {
            tracing::debug!(peer = %peer, %silent, "a probe went unanswered on a connection that carries data; keeping it");
            return;
        }
        if self.conns.contains_key(&connection) {
            tracing::warn!(peer = %peer, why = %silent, ?heard_ago, "direct connection stopped carrying anything; closing it");
            if self.swarm.close_connection(connection) {
                self.silenced.insert(connection);
            }
        }
    }
}
