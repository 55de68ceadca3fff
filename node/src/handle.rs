//! The way into the swarm task: a cloneable [`NodeHandle`] sends [`Command`]s, each with a
//! oneshot for its reply, to the event loop that owns the Swarm.

use libp2p::PeerId;
use tokio::sync::{mpsc, oneshot};

use crate::api;

/// Commands queued for the event loop at most; senders wait beyond that.
pub const COMMAND_QUEUE: usize = 64;

pub enum Command {
    Status(oneshot::Sender<api::Status>),
    Peers(oneshot::Sender<Vec<api::PeerEntry>>),
    /// Looks a peer up in the DHT.
    Find(PeerId, oneshot::Sender<api::FindReply>),
    /// Makes sure we have a connection to the peer: stored addresses, then a DHT lookup.
    Connect(PeerId, oneshot::Sender<Result<(), String>>),
    /// Adds synthetic records to the peer store (diagnostics and crash tests).
    StoreChurn(u32, oneshot::Sender<api::ChurnReply>),
}

/// A cloneable way to talk to the event loop.
#[derive(Clone)]
pub struct NodeHandle {
    tx: mpsc::Sender<Command>,
    pub peer_id: PeerId,
    pub stream: libp2p_stream::Control,
}

impl NodeHandle {
    /// A handle and the receiving end of its command queue, for the event loop.
    pub fn new(peer_id: PeerId, stream: libp2p_stream::Control) -> (Self, mpsc::Receiver<Command>) {
        let (tx, commands) = mpsc::channel(COMMAND_QUEUE);
        (Self { tx, peer_id, stream }, commands)
    }

    pub async fn request<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, String> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| "the node is shutting down".to_string())?;
        rx.await.map_err(|_| "the node is shutting down".to_string())
    }
}
