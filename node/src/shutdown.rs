//! Ordered shutdown. On Ctrl-C or SIGTERM a node stops in this order (`node::up` follows it):
//! 1. **Stop accepting.** The control socket, the metrics endpoint, every forward's listener and
//!    the queue of inbound forward streams stop taking new work.
//! 2. **End the work in flight.** Every per-connection task (a forwarded connection, a UDP
//!    session, a served stream, a control request) is cancelled: it drops its local socket and
//!    its stream, so the peer sees the stream end without the end-of-data marker and resets its
//!    side, never mistaking a cut transfer for a complete one. The swarm keeps running meanwhile,
//!    so those stream closings reach the peers. At most [`GRACE`].
//! 3. **Close the swarm**: the event loop stops and its connections close.
//! 4. **Write the peer store out**, last, so nothing learned during the steps above is lost; then
//!    the control socket's file is removed and the store is closed.
//!
//! Every task of steps 1 and 2 is spawned through [`Shutdown::spawn`], so none is left detached.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long step 2 may take: cancelled tasks end at their next await, so this only bounds a
/// task stuck in a blocking call.
pub const GRACE: Duration = Duration::from_secs(5);

/// The token that starts a shutdown, and the tasks that must end before the swarm closes.
#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tasks: TaskTracker,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns work that ends when the shutdown begins (dropped at its next await).
    pub fn spawn<F>(&self, work: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let token = self.token.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = token.cancelled() => {}
                _ = work => {}
            }
        })
    }

    /// Spawns work that watches for the shutdown itself (through [`Shutdown::begun`]), to undo
    /// what it did before it ends; it is awaited like the others, for at most [`GRACE`].
    pub fn spawn_watching<F>(&self, work: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(work)
    }

    /// Resolves once the shutdown has begun.
    pub async fn begun(&self) {
        self.token.cancelled().await
    }

    pub fn has_begun(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Steps 1 and 2: cancels every task and waits for them to end (at most [`GRACE`]). Returns
    /// how many were still running after that.
    pub async fn stop_tasks(&self) -> usize {
        self.token.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(GRACE, self.tasks.wait()).await;
        self.tasks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_task_is_cancelled_and_awaited_and_what_it_holds_is_dropped() {
        let shutdown = Shutdown::new();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        for _ in 0..3 {
            let held = tx.clone();
            shutdown.spawn(async move {
                let _held = held;
                std::future::pending::<()>().await;
            });
        }
        drop(tx);
        let finished = shutdown.spawn(async {});
        finished.await.unwrap();
        assert!(!shutdown.has_begun());
        assert_eq!(shutdown.stop_tasks().await, 0, "every task ended within the grace period");
        assert!(shutdown.has_begun());
        assert!(rx.recv().await.is_none(), "the tasks dropped what they held (their streams, say)");
        // Work spawned after the shutdown began ends at once.
        let late = shutdown.spawn(std::future::pending());
        tokio::time::timeout(Duration::from_secs(1), late).await.expect("ended at once").unwrap();
    }
}
