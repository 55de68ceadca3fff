//! The per-connection half of [`crate::Behaviour`]: accepts inbound forward streams into the
//! node's queue, and negotiates the outbound streams the behaviour asks for, each carrying its
//! own reply channel through the negotiation.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use libp2p::{
    PeerId, Stream, StreamProtocol,
    core::upgrade::ReadyUpgrade,
    swarm::{
        ConnectionHandler, ConnectionHandlerEvent, StreamUpgradeError, SubstreamProtocol,
        handler::{ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound},
    },
};
use tokio::sync::mpsc;

use crate::behaviour::{Accepted, OpenError, Opened, Reply, StreamLimit};
use crate::linger::Usage;

/// A request to open one outbound stream.
#[derive(Debug)]
pub struct Open {
    pub(crate) protocol: StreamProtocol,
    pub(crate) reply: Reply,
    /// A forward stream the handler hands back to the behaviour ([`Spilled`]) when its
    /// connection is full, rather than holding it until a stream closes.
    pub(crate) spill: bool,
}

/// A forward stream the connection had no room for, handed back to be opened elsewhere.
#[derive(Debug)]
pub struct Spilled(pub(crate) Open);

pub struct Handler {
    peer: PeerId,
    relayed: bool,
    inbound: Accepted,
    /// Requests not yet handed to the connection.
    to_open: VecDeque<Open>,
    /// Outbound negotiations running, and of those the forward streams'.
    negotiating: usize,
    negotiating_forward: usize,
    /// The streams handed out on this connection (see [`crate::linger`]).
    usage: Arc<Usage>,
    linger: Duration,
    /// How many forward streams the connection may carry at once.
    stream_limit: StreamLimit,
}

impl Handler {
    pub(crate) fn new(peer: PeerId, relayed: bool, inbound: Accepted, linger: Duration, stream_limit: StreamLimit) -> Self {
        Self { peer, relayed, inbound, to_open: VecDeque::new(), negotiating: 0, negotiating_forward: 0, usage: Arc::default(), linger, stream_limit }
    }

    pub(crate) fn usage(&self) -> Arc<Usage> {
        self.usage.clone()
    }

    /// The next request to hand to the connection: the rare ones that are not forward streams
    /// (path probes, punch offers) first, whatever waits: a probe stuck behind a burst of new
    /// forwarded connections would take its working connection for dead. Then forward streams
    /// in order, while the connection carries fewer than its limit; beyond, they wait for one
    /// to close.
    fn next_to_open(&mut self, cx: &Context<'_>) -> Option<Open> {
        if self.to_open.is_empty() {
            return None;
        }
        // Registered before counting, so a stream closing in between still wakes us.
        self.usage.wake_on_close(cx);
        let next = self
            .to_open
            .iter()
            .position(|open| open.protocol != crate::behaviour::STREAM_PROTOCOL)
            .or_else(|| self.stream_limit.has_room(&self.usage, self.negotiating_forward).then_some(0));
        next.and_then(|i| self.to_open.remove(i))
    }

    /// A forward stream waiting for room that may go elsewhere (the connection is full).
    fn next_to_spill(&mut self) -> Option<Open> {
        let i = self.to_open.iter().position(|open| open.spill)?;
        self.usage.unreserve();
        self.to_open.remove(i)
    }

    /// A forward stream this connection was reserved for has opened or failed.
    fn settled(&mut self, protocol: &StreamProtocol) {
        self.negotiating = self.negotiating.saturating_sub(1);
        if *protocol == crate::behaviour::STREAM_PROTOCOL {
            self.negotiating_forward = self.negotiating_forward.saturating_sub(1);
            self.usage.unreserve();
        }
    }
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Open;
    type ToBehaviour = Spilled;
    type InboundProtocol = AnyOf;
    type OutboundProtocol = ReadyUpgrade<StreamProtocol>;
    type InboundOpenInfo = ();
    /// The request's protocol (for the error) and where its answer goes.
    type OutboundOpenInfo = (StreamProtocol, Reply);

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(AnyOf(self.inbound.iter().map(|(protocol, _)| protocol.clone()).collect()), ())
    }

    fn connection_keep_alive(&self) -> bool {
        !self.to_open.is_empty() || self.negotiating > 0 || self.usage.wanted(self.linger)
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>> {
        match self.next_to_open(cx) {
            Some(Open { protocol, reply, .. }) => {
                self.negotiating += 1;
                self.negotiating_forward += usize::from(protocol == crate::behaviour::STREAM_PROTOCOL);
                Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                    protocol: SubstreamProtocol::new(ReadyUpgrade::new(protocol.clone()), (protocol, reply)),
                })
            }
            None => match self.next_to_spill() {
                Some(open) => Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(Spilled(open))),
                None => Poll::Pending,
            },
        }
    }

    fn on_behaviour_event(&mut self, open: Open) {
        self.to_open.push_back(open);
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol, (), Self::OutboundOpenInfo>,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound { protocol: (stream, protocol), .. }) => {
                let Some((_, queue)) = self.inbound.iter().find(|(p, _)| *p == protocol) else { return };
                match queue.try_send((self.peer, self.usage.track(stream, false))) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        tracing::warn!(peer = %self.peer, %protocol, "inbound stream refused: {} streams already waiting", queue.max_capacity());
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        tracing::debug!(peer = %self.peer, %protocol, "inbound stream refused: not serving (shutting down)");
                    }
                }
            }
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound { protocol: stream, info: (protocol, reply) }) => {
                let stream = self.usage.track(stream, true);
                self.settled(&protocol);
                let _ = reply.send(Ok(Opened { stream, relayed: self.relayed }));
            }
            ConnectionEvent::DialUpgradeError(DialUpgradeError { info: (protocol, reply), error }) => {
                self.settled(&protocol);
                let error = match error {
                    StreamUpgradeError::NegotiationFailed => OpenError::Unsupported(protocol),
                    StreamUpgradeError::Timeout => OpenError::Failed("negotiation timed out".into()),
                    StreamUpgradeError::Io(e) => OpenError::Failed(e.to_string()),
                    StreamUpgradeError::Apply(never) => libp2p::core::util::unreachable(never),
                };
                let _ = reply.send(Err(error));
            }
            _ => {}
        }
    }
}

/// The inbound upgrade: any one of the accepted protocols, handed over with the stream.
#[derive(Debug, Clone)]
pub struct AnyOf(Vec<StreamProtocol>);

impl libp2p::core::UpgradeInfo for AnyOf {
    type Info = StreamProtocol;
    type InfoIter = std::vec::IntoIter<StreamProtocol>;

    fn protocol_info(&self) -> Self::InfoIter {
        self.0.clone().into_iter()
    }
}

impl libp2p::core::upgrade::InboundUpgrade<Stream> for AnyOf {
    type Output = (Stream, StreamProtocol);
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Output, Self::Error>>;

    fn upgrade_inbound(self, stream: Stream, protocol: StreamProtocol) -> Self::Future {
        std::future::ready(Ok((stream, protocol)))
    }
}
