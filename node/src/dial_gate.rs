//! A transport wrapper that asks the address policy before every dial.
//!
//! The swarm dials addresses that several behaviours supply (Kademlia's routing table and query
//! results, mDNS, the relay client) and that no single place sees; checking at the transport is
//! the one spot every direct dial passes. A refused address fails on its own, with the reason,
//! while the dial's other addresses go on.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use libp2p::Multiaddr;
use libp2p::core::transport::{DialOpts, ListenerId, Transport, TransportError, TransportEvent};

use crate::addresses::{Policy, Refusal};

pub struct Gate<T> {
    inner: T,
    policy: Arc<Mutex<Policy>>,
}

impl<T> Gate<T> {
    pub fn new(inner: T, policy: Arc<Mutex<Policy>>) -> Self {
        Gate { inner, policy }
    }
}

impl<T> Transport for Gate<T>
where
    T: Transport<Error = std::io::Error> + Unpin,
{
    type Output = T::Output;
    type Error = std::io::Error;
    type ListenerUpgrade = T::ListenerUpgrade;
    type Dial = T::Dial;

    fn listen_on(&mut self, id: ListenerId, addr: Multiaddr) -> Result<(), TransportError<Self::Error>> {
        self.inner.listen_on(id, addr)
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.inner.remove_listener(id)
    }

    fn dial(&mut self, addr: Multiaddr, opts: DialOpts) -> Result<Self::Dial, TransportError<Self::Error>> {
        let verdict = self.policy.lock().expect("policy lock").may_dial(None, &addr);
        if let Err(refusal) = verdict {
            tracing::debug!(%addr, reason = %refusal, "not dialing");
            return Err(TransportError::Other(std::io::Error::new(std::io::ErrorKind::PermissionDenied, refusal)));
        }
        self.inner.dial(addr, opts)
    }

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        Pin::new(&mut self.get_mut().inner).poll(cx)
    }
}

/// The address policy's refusal inside a transport error, if that is what it is (the error
/// arrives wrapped by the DNS, timeout and boxing layers).
pub fn refusal_in(error: &libp2p::TransportError<std::io::Error>) -> Option<&Refusal> {
    let libp2p::TransportError::Other(error) = error else { return None };
    find_refusal(error)
}

fn find_refusal<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refusal> {
    if let Some(refusal) = error.downcast_ref::<Refusal>() {
        return Some(refusal);
    }
    // An io::Error's source() skips the error it wraps; look at that one first.
    if let Some(inner) = error.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
        return find_refusal(inner);
    }
    error.source().and_then(find_refusal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::Multiaddr;

    #[test]
    fn the_policys_refusal_is_found_through_the_transport_layers() {
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().unwrap();
        // The gate's error, boxed by the swarm's transport (io::Error::other around it).
        let gate = std::io::Error::new(std::io::ErrorKind::PermissionDenied, Refusal::Own(addr.clone()));
        let boxed = libp2p::TransportError::Other(std::io::Error::other(gate));
        assert_eq!(refusal_in(&boxed), Some(&Refusal::Own(addr.clone())));
        let plain = libp2p::TransportError::Other(std::io::Error::other("connection refused"));
        assert_eq!(refusal_in(&plain), None);
    }
}
