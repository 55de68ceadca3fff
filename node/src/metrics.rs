//! `--metrics ADDR`: Prometheus text exposition of the node's counters, over plain HTTP.
//!
//! Everything comes from the same figures `warren status`, `warren peers` and `warren forwards`
//! show (one place records them), rendered on each scrape. Serve it on loopback or a private
//! address: it says how many peers and relay users a node has, nothing more, but it is unauthenticated.

use std::convert::Infallible;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::Semaphore;

use crate::handle::{Command, NodeHandle};
use crate::forward::Forwarding;

/// Scrapes served at once; more wait in the listen backlog.
const MAX_SCRAPES: usize = 8;

/// Binds the metrics address (fails fast on a bad or busy address).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "metrics served on a non-loopback address; anyone who can reach it can read them");
    }
    Ok(listener)
}

pub async fn serve(listener: tokio::net::TcpListener, node: NodeHandle, forwarding: Arc<Forwarding>) {
    let permits = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(crate::control::server::ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().acquire_owned().await else { return };
        let (node, tasks, forwarding) = (node.clone(), forwarding.shutdown.clone(), forwarding.clone());
        tasks.spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (node, forwarding) = (node.clone(), forwarding.clone());
                async move { Ok::<_, Infallible>(answer(req, &node, &forwarding).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(crate::control::server::HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service)
                .await;
            drop(permit);
        });
    }
}

async fn answer(req: Request<Incoming>, node: &NodeHandle, forwarding: &Forwarding) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return Response::builder().status(StatusCode::NOT_FOUND).body(Full::new(Bytes::from("try /metrics\n"))).unwrap();
    }
    match render(node, forwarding).await {
        Ok(text) => Response::builder()
            .header("content-type", "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(text)))
            .unwrap(),
        Err(e) => Response::builder().status(StatusCode::SERVICE_UNAVAILABLE).body(Full::new(Bytes::from(e.to_string()))).unwrap(),
    }
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

async fn render(node: &NodeHandle, forwarding: &Forwarding) -> Result<String, crate::handle::ShuttingDown> {
    let status = node.request(Command::Status).await?;
    let peers = node.request(Command::Peers).await?;
    let mut out = String::new();

    let mut by_kind: std::collections::BTreeMap<(String, String), f64> = Default::default();
    for peer in &peers {
        for c in &peer.connections {
            *by_kind.entry((c.transport.clone(), c.path.clone())).or_default() += 1.0;
        }
    }
    let labels: Vec<(String, f64)> =
        by_kind.into_iter().map(|((t, p), n)| (format!("transport=\"{t}\",path=\"{p}\""), n)).collect();
    let samples: Vec<(&str, f64)> = labels.iter().map(|(l, n)| (l.as_str(), *n)).collect();
    metric(&mut out, "warren_connections", "gauge", "Open connections by transport and direct/relayed path.", &samples);
    metric(&mut out, "warren_connected_peers", "gauge", "Peers with at least one connection.", &[("", status.connected_peers as f64)]);
    metric(
        &mut out,
        "warren_routing_table_peers",
        "gauge",
        "Peers in a Kademlia routing table, by DHT (wan: the configured protocol, lan: private networks).",
        &[("dht=\"wan\"", status.routing_table_peers as f64), ("dht=\"lan\"", status.lan_routing_table_peers as f64)],
    );
    metric(
        &mut out,
        "warren_wrong_peer_dials_total",
        "counter",
        "Dials that reached a different peer than the one dialed (stale addresses, then forgotten).",
        &[("", status.wrong_peer_dials as f64)],
    );

    metric(&mut out, "warren_port_mappings", "gauge", "Ports the gateway forwards to this node.", &[("", status.port_mappings.len() as f64)]);
    let p = &status.hole_punch;
    metric(&mut out, "warren_hole_punch_attempts_total", "counter", "DCUtR hole punches finished (either way).", &[("", p.attempts as f64)]);
    metric(
        &mut out,
        "warren_hole_punch_successes_total",
        "counter",
        "Hole punches that produced a direct connection, by its transport.",
        &[("transport=\"quic\"", p.successes_quic as f64), ("transport=\"tcp\"", p.successes_tcp as f64)],
    );
    metric(&mut out, "warren_hole_punch_failures_total", "counter", "Hole punches that gave up.", &[("", p.failures as f64)]);
    let b = &p.birthday;
    metric(&mut out, "warren_birthday_punch_attempts_total", "counter", "Birthday punches started, either role.", &[("", b.attempts as f64)]);
    metric(&mut out, "warren_birthday_punch_successes_total", "counter", "Birthday punches that made a direct connection.", &[("", b.successes as f64)]);
    metric(&mut out, "warren_birthday_punch_probes_total", "counter", "Birthday probes this node sent (as the easy side).", &[("", b.probes_sent as f64)]);
    let held = status.relayed_through.iter().filter(|h| h.accepted).count();
    metric(&mut out, "warren_relay_reservations_held", "gauge", "Reservations this node holds on relays.", &[("", held as f64)]);

    if let Some(r) = &status.relay {
        metric(&mut out, "warren_relay_reservations", "gauge", "Reservations others hold on this relay.", &[("", r.reservations as f64)]);
        metric(&mut out, "warren_relay_circuits", "gauge", "Circuits this relay carries now.", &[("", r.circuits as f64)]);
        metric(
            &mut out,
            "warren_relay_reservation_requests_total",
            "counter",
            "Reservation requests answered, by outcome.",
            &[("outcome=\"accepted\"", r.reservations_accepted as f64), ("outcome=\"denied\"", r.reservations_denied as f64)],
        );
        metric(
            &mut out,
            "warren_relay_circuit_requests_total",
            "counter",
            "Circuit requests answered, by outcome.",
            &[("outcome=\"accepted\"", r.circuits_accepted as f64), ("outcome=\"denied\"", r.circuits_denied as f64)],
        );
        metric(&mut out, "warren_relay_circuits_cut_total", "counter", "Circuits ended by an error or a limit.", &[("", r.circuits_cut as f64)]);
        metric(&mut out, "warren_relayed_bytes_total", "counter", "Bytes carried for others through circuits.", &[("", r.relayed_bytes as f64)]);
    }

    let (mut sent, mut received) = (0u64, 0u64);
    for f in forwarding.forwards() {
        sent += f.bytes_sent;
        received += f.bytes_received;
    }
    let (mut served_in, mut served_out) = (0u64, 0u64);
    for e in forwarding.exposes() {
        served_in += e.bytes_in;
        served_out += e.bytes_out;
    }
    metric(
        &mut out,
        "warren_forwarded_bytes_total",
        "counter",
        "Bytes carried by forwards (local side) and exposed services, by direction.",
        &[
            ("side=\"forward\",direction=\"out\"", sent as f64),
            ("side=\"forward\",direction=\"in\"", received as f64),
            ("side=\"expose\",direction=\"in\"", served_in as f64),
            ("side=\"expose\",direction=\"out\"", served_out as f64),
        ],
    );
    let refusals: Vec<(String, f64)> = crate::forward::serve::Refused::ALL
        .iter()
        .map(|r| (format!("reason=\"{}\"", r.label()), forwarding.refusals.count(*r) as f64))
        .collect();
    let refusals: Vec<(&str, f64)> = refusals.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    metric(
        &mut out,
        "warren_forward_refusals_total",
        "counter",
        "Forward streams refused by the serving side, by reason (peers are told less).",
        &refusals,
    );
    Ok(out)
}
