//! Is a direct connection still a path? Probing one connection (`warren_probe`) when a
//! forwarded connection over it went silent, and answering the peer's probes. The event loop
//! decides what to probe and closes what does not answer (`event_loop/paths.rs`).

use std::sync::Arc;
use std::time::Duration;

use libp2p::StreamProtocol;
use tokio::sync::{Semaphore, oneshot};
use warren_forward::{OpenError, Opened};

/// The probe protocol as libp2p negotiates it.
pub const PROBE_PROTOCOL: StreamProtocol = StreamProtocol::new(warren_probe::PROTOCOL);
/// Probe streams waiting to be answered; beyond this they are refused. Peers probe only when a
/// forwarded connection goes silent, at most once per [`CHECK_EVERY`] each.
pub const PROBES_QUEUED: usize = 32;
/// Probes answered at once, from all peers: each holds a stream for at most
/// `warren_probe::ANSWER_WITHIN`, so peers that open probe streams and send nothing tie up at
/// most this many tasks; beyond, probes are refused (the prober sees a reset, which tells it
/// the path works all the same).
const ANSWERING: usize = 64;
/// ... and from one peer: it probes each of its connections to us at most every
/// [`CHECK_EVERY`], so a peer with more at once is not probing, and is not let near
/// [`ANSWERING`].
const ANSWERING_PER_PEER: usize = 4;
/// The least time a probe gets before its connection counts as dead: a round trip, plus the
/// queue ahead of the probe under bulk traffic (a home router's buffer can hold a second).
pub const PROBE_WITHIN_MIN: Duration = Duration::from_secs(2);
/// ... or this many round trips as last measured (by ping), if longer: a satellite link.
const PROBE_RTTS: u32 = 4;
/// Least time between two probes of one peer's connections: every silent forwarded connection
/// to a peer asks at once when its path dies, and one probe answers them all.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);
/// Peers whose last probe is remembered (to keep to [`CHECK_EVERY`]); older entries are
/// dropped first, and a peer forgotten early is at worst probed again sooner.
pub const CHECKS_REMEMBERED: usize = 1024;

/// How long a probe of a connection whose round trip was last `rtt` may take.
pub fn probe_within(rtt: Option<Duration>) -> Duration {
    rtt.map_or(PROBE_WITHIN_MIN, |rtt| (rtt * PROBE_RTTS).max(PROBE_WITHIN_MIN))
}

/// A connection that let a probe go unanswered.
#[derive(Debug, thiserror::Error)]
#[error("no answer to a probe within {0:?}")]
pub struct Silent(pub Duration);

/// Probes the connection the stream is being opened on (`opening`): `Err` only when nothing at
/// all came back within `within`. Any answer came over the path, so the path works: an echo,
/// and as much a refusal (a peer too busy to answer, one that does not speak the protocol), a
/// reset, or the connection closing.
pub async fn probe(opening: oneshot::Receiver<Result<Opened, OpenError>>, within: Duration) -> Result<(), Silent> {
    let exchange = async {
        if let Ok(Ok(mut opened)) = opening.await {
            let _ = warren_probe::probe(&mut opened.stream, rand::random()).await;
        }
    };
    tokio::time::timeout(within, exchange).await.map_err(|_| Silent(within))
}

/// Answers the peer's probes, each in a task of its own, at most [`ANSWERING`] at once.
pub async fn answer(mut incoming: warren_forward::Incoming) {
    let slots = Arc::new(Semaphore::new(ANSWERING));
    let per_peer = crate::per_peer::PerPeer::default();
    while let Some((peer, mut stream)) = incoming.recv().await {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(peer = %peer, "too many probes being answered; refusing one");
            continue;
        };
        let Some(peer_slot) = per_peer.take(peer, ANSWERING_PER_PEER) else {
            tracing::debug!(peer = %peer, "too many probes from one peer; refusing one");
            continue;
        };
        tokio::spawn(async move {
            let (_slot, _peer_slot) = (slot, peer_slot);
            let _ = tokio::time::timeout(warren_probe::ANSWER_WITHIN, warren_probe::answer(&mut stream)).await;
        });
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_path_gets_more_time_than_a_fast_one() {
        assert_eq!(probe_within(None), PROBE_WITHIN_MIN);
        assert_eq!(probe_within(Some(Duration::from_millis(40))), PROBE_WITHIN_MIN);
        assert_eq!(probe_within(Some(Duration::from_millis(700))), Duration::from_millis(2800));
    }

    #[tokio::test]
    async fn any_answer_even_a_refusal_shows_the_path_works() {
        for answer in [OpenError::ConnectionClosed, OpenError::Unsupported(PROBE_PROTOCOL), OpenError::Failed("reset".into())] {
            let (tx, rx) = oneshot::channel();
            tx.send(Err(answer)).unwrap();
            assert!(probe(rx, Duration::from_secs(1)).await.is_ok());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_never_opens_the_stream_is_silent() {
        let (_tx, rx) = oneshot::channel();
        assert!(probe(rx, Duration::from_secs(2)).await.is_err());
    }

}
