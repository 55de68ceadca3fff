//! The serving side: answers forward streams from peers, for services this node exposed.

use std::sync::Arc;
use std::time::Duration;

use futures::AsyncWriteExt as _;
use libp2p::{PeerId, Stream};
use tokio::sync::Semaphore;
use tracing::Instrument;
use tokio_util::compat::FuturesAsyncReadCompatExt;
use warren_forward::{Reply, Status, Transport};

use super::udp::{self, Datagrams, Source, udp_over_stream};
use super::{Active, Forwarding, splice};

/// Forward streams served at once across all services; beyond it peers get "over capacity".
const MAX_INBOUND_STREAMS: usize = 8192;
/// A peer must send its request this soon after opening the stream (openers keep a stream
/// ready ahead of need for less than this: see `client::SPARE_MAX_AGE`). Generous, because on a
/// connection whose flow-control window is taken by busy streams a new stream's request waits
/// for credit: 500 concurrent 1 MiB echoes on 2 cores held some requests past 10 s (refused as
/// "bad request"); a silent stream still gives its slot back.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Connecting to the exposed service may take this long.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(forwarding: Arc<Forwarding>, mut inbound: warren_forward::Incoming) {
    let permits = Arc::new(Semaphore::new(MAX_INBOUND_STREAMS));
    while let Some((peer, stream)) = inbound.recv().await {
        let permit = permits.clone().try_acquire_owned().ok();
        let forwarding = forwarding.clone();
        let tasks = forwarding.shutdown.clone();
        let span = tracing::info_span!("serve", peer = %peer);
        tasks.spawn(async move {
            let have_capacity = permit.is_some();
            serve(&forwarding, peer, stream, have_capacity).instrument(span).await;
            drop(permit);
        });
    }
}

async fn refuse(mut stream: Stream, status: Status, detail: Option<String>) {
    let _ = warren_forward::write_reply(&mut stream, &Reply::new(status, detail)).await;
    let _ = stream.close().await;
}

async fn serve(forwarding: &Forwarding, peer: PeerId, mut stream: Stream, have_capacity: bool) {
    if !have_capacity {
        return refuse(stream, Status::OverCapacity, None).await;
    }
    let request = match tokio::time::timeout(REQUEST_TIMEOUT, warren_forward::read_request(&mut stream)).await {
        Ok(Ok(request)) => request,
        // A stream opened ahead of need and then dropped (or the peer went away): nothing to say.
        Ok(Err(warren_forward::FrameError::Io(e))) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            tracing::debug!(peer = %peer, "a forward stream closed before its request");
            return;
        }
        Ok(Err(e)) => {
            tracing::info!(peer = %peer, error = %e, "refusing a malformed forward request");
            return refuse(stream, Status::BadRequest, None).await;
        }
        Err(_) => return refuse(stream, Status::BadRequest, None).await,
    };
    let wants_udp = request.transport == Transport::Udp;
    let Some(service) = forwarding.exposed(&request.service).filter(|s| s.spec.udp == wants_udp) else {
        tracing::info!(peer = %peer, service = %request.service, "refusing a forward to an unknown service");
        return refuse(stream, Status::UnknownService, None).await;
    };
    if !service.spec.allow_any && !service.allow.contains(&peer) {
        tracing::info!(peer = %peer, service = %request.service, "refusing a peer not on the allow-list");
        service.stats.fail(format!("refused {peer}: not allowed"));
        return refuse(stream, Status::NotAllowed, None).await;
    }
    let Ok(_permit) = service.permits.clone().try_acquire_owned() else {
        service.stats.fail(format!("refused {peer}: at the cap of {} connections", service.spec.max_connections));
        return refuse(stream, Status::OverCapacity, None).await;
    };
    let target = service.spec.target.clone();
    if wants_udp {
        let socket = match udp_upstream(&target).await {
            Ok(socket) => socket,
            Err(e) => {
                service.stats.fail(format!("{target}: {e}"));
                return refuse(stream, Status::UpstreamUnreachable, Some(e.to_string())).await;
            }
        };
        if warren_forward::write_reply(&mut stream, &Reply::new(Status::Accepted, None)).await.is_err() {
            return;
        }
        let _active = Active::new(&service.stats);
        let local = Datagrams { source: Source::Socket, socket: Arc::new(socket), to: None };
        let _ = udp_over_stream(local, stream.compat(), &service.stats, forwarding.udp_idle, async |_| Ok(())).await;
        return;
    }
    let tcp = match tokio::time::timeout(UPSTREAM_TIMEOUT, tokio::net::TcpStream::connect(&target)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            tracing::warn!(service = %request.service, %target, error = %e, "exposed service unreachable");
            service.stats.fail(format!("{target}: {e}"));
            return refuse(stream, Status::UpstreamUnreachable, Some(e.to_string())).await;
        }
        Err(_) => {
            service.stats.fail(format!("{target}: connect timed out"));
            return refuse(stream, Status::UpstreamUnreachable, Some("connect timed out".into())).await;
        }
    };
    if warren_forward::write_reply(&mut stream, &Reply::new(Status::Accepted, None)).await.is_err() {
        return;
    }
    let _active = Active::new(&service.stats);
    // From the service's point of view bytes it sends go out to the peer.
    if let Err(e) = splice::tcp(tcp, stream.compat(), &service.stats.received, &service.stats.sent).await {
        tracing::debug!(peer = %peer, service = %request.service, error = %e, "forwarded connection ended with an error");
    }
}

async fn udp_upstream(target: &str) -> std::io::Result<tokio::net::UdpSocket> {
    let addr = tokio::net::lookup_host(target)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address for the target"))?;
    let local: std::net::SocketAddr = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
    let socket = tokio::net::UdpSocket::bind(local).await?;
    udp::enlarge_udp_buffers(&socket);
    socket.connect(addr).await?;
    Ok(socket)
}
