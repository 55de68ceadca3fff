//! The daemon side of the control API: HTTP/1.1 on a Unix socket that only the node's owner can
//! open (socket mode 0600 inside a 0700 data dir, and the caller's uid checked on accept).

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{AsyncReadExt, AsyncWriteExt};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use libp2p::{PeerId, StreamProtocol};
use rand::RngCore;
use tokio::net::UnixListener;
use tokio::sync::Semaphore;

use crate::api;
use crate::handle::{Command, NodeHandle, ReachError};
use crate::error::UserError;
use crate::api::{ExposeSpec, ForwardSpec};
use crate::forward::{Forwarding, ForwardingError};

/// Control connections open at once; more wait in the socket's backlog. An idle one costs a
/// descriptor and a small task for at most [`HEADER_TIMEOUT`].
const MAX_CONTROL_CONNECTIONS: usize = 256;
/// Requests answered at once (a ping or a connect may take seconds); more wait their turn.
const MAX_CONTROL_REQUESTS: usize = 32;
/// A connection must send a request's headers this soon (the CLI sends them at once), so idle
/// connections cannot hold the slots above.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause after a failed accept (out of file descriptors, say) instead of spinning on it.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Largest request body read (an expose or forward spec is a few hundred bytes).
const MAX_REQUEST_BODY: usize = 64 * 1024;
/// The standard libp2p ping protocol, spoken by every libp2p node.
const PING_PROTOCOL: StreamProtocol = StreamProtocol::new("/ipfs/ping/1.0.0");
const PING_SIZE: usize = 32;
const PING_TIMEOUT: Duration = Duration::from_secs(10);
const PING_GAP: Duration = Duration::from_millis(200);
/// Fresh streams one `warren ping` may open after its stream is dropped under it. A rust-libp2p
/// peer keeps one inbound ping stream per connection and drops the older one when another
/// arrives, and both nodes' own liveness pings (every 15 s) open such streams, so a user's ping
/// can lose its stream on a fresh or busy connection; a peer that keeps dropping it is reported.
const PING_STREAM_REOPENS: u32 = 3;

/// Binds the control socket, replacing a stale one left by a node that was killed.
pub async fn bind(data_dir: &Path) -> Result<(UnixListener, PathBuf), UserError> {
    use std::os::unix::fs::PermissionsExt;
    let path = data_dir.join(api::SOCKET_NAME);
    if path.exists() {
        if tokio::net::UnixStream::connect(&path).await.is_ok() {
            return Err(UserError::bad_input(format!(
                "a warren node is already running with data dir {}: stop it first, or use another --data-dir",
                data_dir.display()
            )));
        }
        let _ = std::fs::remove_file(&path);
    }
    let listener = UnixListener::bind(&path).map_err(|e| {
        UserError::operation(format!("cannot create the control socket {}: {e}", path.display()))
    })?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| UserError::operation(format!("cannot restrict the control socket {}: {e}", path.display())))?;
    Ok((listener, path))
}

pub async fn serve(listener: UnixListener, handle: NodeHandle, forwarding: Arc<Forwarding>) {
    let permits = Arc::new(Semaphore::new(MAX_CONTROL_CONNECTIONS));
    let requests = Arc::new(Semaphore::new(MAX_CONTROL_REQUESTS));
    loop {
        let permit = permits.clone().acquire_owned().await.expect("semaphore never closes");
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: pause instead of spinning on the error.
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(cred) if crate::private_files::is_trusted_uid(cred.uid()) => {}
            other => {
                tracing::warn!(cred = ?other, "refusing a control connection from another user");
                continue;
            }
        }
        let handle = handle.clone();
        let tasks = forwarding.shutdown.clone();
        let forwarding = forwarding.clone();
        let requests = requests.clone();
        tasks.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (handle, forwarding, requests) = (handle.clone(), forwarding.clone(), requests.clone());
                async move {
                    let _turn = requests.acquire_owned().await.expect("semaphore never closes");
                    Ok::<_, Infallible>(route(req, handle, forwarding).await)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(permit);
        });
    }
}

/// The effective uid of this process: the owner of /proc/self (no unsafe libc call needed).
async fn route(req: Request<Incoming>, handle: NodeHandle, forwarding: Arc<Forwarding>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let method = req.method().clone();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let body = match http_body_util::Limited::new(req.into_body(), MAX_REQUEST_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return respond(StatusCode::PAYLOAD_TOO_LARGE, json(api::ApiError { error: "request body too large".into() })),
    };
    // "No such expose/forward" is a 404; everything else wrong with a request is a 400.
    let refused = |e: ForwardingError| {
        let status = if e.is_not_found() { StatusCode::NOT_FOUND } else { StatusCode::BAD_REQUEST };
        (status, e.to_string())
    };
    let result = match (&method, segments.as_slice()) {
        (&Method::GET, ["v1", "exposes"]) => Ok(json(forwarding.exposes())),
        (&Method::POST, ["v1", "exposes"]) => {
            parse_body::<ExposeSpec>(&body).and_then(|spec| forwarding.expose(spec, false).map(json).map_err(refused))
        }
        (&Method::DELETE, ["v1", "exposes", name]) => forwarding.unexpose(name).map(|_| json(())).map_err(refused),
        (&Method::GET, ["v1", "forwards"]) => Ok(json(forwarding.forwards())),
        (&Method::POST, ["v1", "forwards"]) => match parse_body::<ForwardSpec>(&body) {
            Ok(spec) => forwarding.forward(spec, false).await.map(json).map_err(refused),
            Err(e) => Err(e),
        },
        (&Method::DELETE, ["v1", "forwards", bind]) => forwarding.unforward(bind).map(|_| json(())).map_err(refused),
        (_, rest) => route_node(rest, &query, &handle).await,
    };
    match result {
        Ok(body) => respond(StatusCode::OK, body),
        Err((status, error)) => respond(status, serde_json::to_vec(&api::ApiError { error }).expect("serialises")),
    }
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, RouteError> {
    serde_json::from_slice(body).map_err(|e| (StatusCode::BAD_REQUEST, format!("invalid request body: {e}")))
}

async fn route_node(segments: &[&str], query: &str, handle: &NodeHandle) -> Result<Vec<u8>, RouteError> {
    let path = segments.join("/");
    match segments {
        ["v1", "status"] => handle.request(Command::Status).await.map(json).map_err(unavailable),
        ["v1", "peers"] => handle.request(Command::Peers).await.map(json).map_err(unavailable),
        ["v1", "netcheck"] => match handle.request(Command::Netcheck).await {
            Ok(draft) => Ok(json(draft.finish().await)),
            Err(e) => Err(unavailable(e)),
        },
        ["v1", "id"] => Ok(json(api::Identity {
            peer_id: handle.peer_id.to_string(),
            public_key: handle.peer_id.to_base58(),
            agent: crate::behaviour::AGENT.to_string(),
        })),
        ["v1", "find", peer] => match parse_peer(peer) {
            Ok(peer) => handle.request(|tx| Command::Find(peer, tx)).await.map(json).map_err(unavailable),
            Err(e) => Err(e),
        },
        ["v1", "ping", peer] => match (parse_peer(peer), parse_count(query)) {
            (Ok(peer), Ok(count)) => ping(handle, peer, count).await.map(json),
            (Err(e), _) | (_, Err(e)) => Err(e),
        },
        ["v1", "debug", "store-churn", count] => match count.parse::<u32>() {
            Ok(n) if n <= api::MAX_CHURN => {
                handle.request(|tx| Command::StoreChurn(n, tx)).await.map(json).map_err(unavailable)
            }
            _ => Err((StatusCode::BAD_REQUEST, format!("count {count:?} must be a number up to {}", api::MAX_CHURN))),
        },
        _ => Err((StatusCode::NOT_FOUND, format!("no such control route: /{path}"))),
    }
}

type RouteError = (StatusCode, String);

fn json<T: serde::Serialize>(value: T) -> Vec<u8> {
    serde_json::to_vec(&value).expect("API types serialise")
}

fn unavailable(e: crate::handle::ShuttingDown) -> RouteError {
    (StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

fn respond(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

fn parse_peer(text: &str) -> Result<PeerId, RouteError> {
    text.parse().map_err(|_| (StatusCode::BAD_REQUEST, format!("{text:?} is not a PeerId")))
}

fn parse_count(query: &str) -> Result<u32, RouteError> {
    let Some(value) = query.split('&').find_map(|kv| kv.strip_prefix("count=")) else { return Ok(3) };
    match value.parse::<u32>() {
        Ok(n) if (1..=api::MAX_PING_COUNT).contains(&n) => Ok(n),
        _ => Err((StatusCode::BAD_REQUEST, format!("count {value:?} must be between 1 and {}", api::MAX_PING_COUNT))),
    }
}

/// Pings with the standard libp2p ping protocol on a fresh stream: connect first (stored
/// addresses, then the DHT), then `count` round trips of 32 random bytes. A round whose stream
/// the peer dropped is retried on a fresh stream (see [`PING_STREAM_REOPENS`]).
async fn ping(handle: &NodeHandle, peer: PeerId, count: u32) -> Result<api::PingReply, RouteError> {
    let unreachable = |e: String| (StatusCode::BAD_GATEWAY, format!("cannot reach {peer}: {e}"));
    let open = || async {
        match handle.reach_and_open(peer, PING_PROTOCOL).await {
            Ok(opened) => Ok(opened.stream),
            Err(ReachError::ShuttingDown(e)) => Err(unavailable(e)),
            Err(e) => Err((StatusCode::BAD_GATEWAY, e.to_string())),
        }
    };
    let mut stream = open().await?;
    let mut reopens = 0;
    let mut rtts = Vec::new();
    while rtts.len() < count as usize {
        if !rtts.is_empty() {
            tokio::time::sleep(PING_GAP).await;
        }
        let mut payload = [0u8; PING_SIZE];
        rand::thread_rng().fill_bytes(&mut payload);
        let started = Instant::now();
        let round = async {
            stream.write_all(&payload).await?;
            stream.flush().await?;
            let mut echo = [0u8; PING_SIZE];
            stream.read_exact(&mut echo).await?;
            Ok::<_, std::io::Error>(echo)
        };
        let echo = match tokio::time::timeout(PING_TIMEOUT, round).await {
            Err(_) => return Err(unreachable("ping timed out".into())),
            Ok(Err(error)) if reopens < PING_STREAM_REOPENS => {
                tracing::debug!(%peer, %error, "ping stream dropped; retrying on a fresh one");
                reopens += 1;
                stream = open().await?;
                continue;
            }
            Ok(Err(error)) => return Err(unreachable(error.to_string())),
            Ok(Ok(echo)) => echo,
        };
        if echo != payload {
            return Err(unreachable("the peer echoed different bytes".into()));
        }
        rtts.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let _ = stream.close().await;
    Ok(api::PingReply { peer_id: peer.to_string(), rtts_ms: rtts })
}
