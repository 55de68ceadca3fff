//! Text rendering of control API answers for people; `--json` prints the structs instead.

use std::fmt::Write;

use crate::api;

pub fn status(s: &api::Status) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "peer id       {}", s.peer_id);
    let _ = writeln!(out, "agent         {}", s.agent);
    let _ = writeln!(out, "reachability  {}", s.reachability);
    let _ = writeln!(out, "nat           {} (`warren netcheck` tells more)", s.nat_type);
    let _ = writeln!(out, "dht           {} (setting: {}, protocol {})", s.dht_mode, s.dht_mode_setting, s.kad_protocol);
    let _ = writeln!(
        out,
        "peers         {} connected over {} connections; {} stored",
        s.connected_peers, s.connections, s.stored_peers
    );
    let refreshed = match s.dht_refreshed_secs_ago {
        Some(secs) => format!("refreshed {secs} s ago"),
        None => "not refreshed yet".to_string(),
    };
    let _ = writeln!(
        out,
        "routing       {} in the DHT ({refreshed}), {} in the LAN DHT; {} dials reached a different peer",
        s.routing_table_peers, s.lan_routing_table_peers, s.wrong_peer_dials
    );
    let mut published = match (s.addresses_published_secs_ago, s.address_publish_failures) {
        (Some(secs), 0) => format!("our addresses published in the DHT {secs} s ago"),
        (Some(secs), failed) => format!("our addresses published in the DHT {secs} s ago; the last {failed} attempts timed out"),
        (None, 0) => "our addresses not published in the DHT yet".to_string(),
        (None, failed) => format!("our addresses not published in the DHT yet; {failed} attempts timed out"),
    };
    if let Some(secs) = s.lan_addresses_published_secs_ago {
        let _ = write!(published, "; in the LAN DHT {secs} s ago");
    }
    let _ = writeln!(out, "findable      {published}");
    let _ = writeln!(out, "uptime        {}s", s.uptime_secs);
    list(&mut out, "listening", &s.listen_addrs);
    list(&mut out, "external", &s.external_addrs);
    let held: Vec<String> = s
        .relayed_through
        .iter()
        .map(|h| {
            let state = if h.accepted { format!("reserved, {} renewals", h.renewals) } else { "requesting".into() };
            format!("{} ({state}{})", h.relay_addr, if h.pinned { ", pinned" } else { "" })
        })
        .collect();
    list(&mut out, "relays", &held);
    let mapped: Vec<String> = s
        .port_mappings
        .iter()
        .map(|m| format!("{} port {} -> {} by {} ({} s left)", m.transport, m.internal_port, m.external, m.protocol, m.lease_left_secs))
        .collect();
    list(&mut out, "port mapping", &mapped);
    if let Some(e) = &s.relay_last_error {
        let _ = writeln!(out, "{:<13} last relay problem: {e}", "");
    }
    let p = &s.hole_punch;
    let _ = writeln!(
        out,
        "hole punch    {} attempts: {} direct over QUIC, {} over TCP, {} failed",
        p.attempts, p.successes_quic, p.successes_tcp, p.failures
    );
    let b = &p.birthday;
    if b.attempts > 0 {
        let _ = writeln!(
            out,
            "birthday      {} attempts: {} direct, {} failed; {} probes sent",
            b.attempts, b.successes, b.failures, b.probes_sent
        );
        if let Some(e) = &b.last_error {
            let _ = writeln!(out, "{:<13} last birthday failure: {e}", "");
        }
    }
    if let Some(r) = &s.relay {
        let _ = writeln!(
            out,
            "relay service {}; {} reservations from {} peers, {} circuits open",
            if r.advertised { "advertised" } else { "not advertised (no confirmed public address; --relay-force serves anyway)" },
            r.reservations,
            r.reservation_peers,
            r.circuits
        );
        let _ = writeln!(
            out,
            "              accepted {} reservations / {} circuits; denied {} / {}; {} circuits cut; {} relayed",
            r.reservations_accepted, r.reservations_denied, r.circuits_accepted, r.circuits_denied, r.circuits_cut,
            human_bytes(r.relayed_bytes)
        );
        if !r.denied_by_reason.is_empty() {
            let reasons: Vec<String> = r.denied_by_reason.iter().map(|(reason, n)| format!("{reason} ×{n}")).collect();
            let _ = writeln!(out, "              denials: {}", reasons.join(", "));
        }
    }
    out.trim_end().to_string()
}

fn list(out: &mut String, label: &str, items: &[String]) {
    if items.is_empty() {
        let _ = writeln!(out, "{label:<13} (none)");
    }
    for (i, item) in items.iter().enumerate() {
        let _ = writeln!(out, "{:<13} {item}", if i == 0 { label } else { "" });
    }
}

pub fn peers(peers: &[api::PeerEntry]) -> String {
    if peers.is_empty() {
        return "no connected peers".to_string();
    }
    let mut out = format!("{:<52}  {:<17}  {:<4}  {:>9}  {:>8}  ADDRESS\n", "PEER", "PATH", "VIA", "RTT", "PUNCHED");
    for peer in peers {
        for (i, c) in peer.connections.iter().enumerate() {
            let rtt = c.rtt_ms.map(|r| format!("{r:.2} ms")).unwrap_or_else(|| "-".into());
            let name = if i == 0 { peer.peer_id.as_str() } else { "" };
            let punched = c.punched_after_ms.map(|ms| format!("{ms:.0} ms")).unwrap_or_else(|| "-".into());
            let path = if c.birthday.is_some() { format!("{} (birthday)", c.path) } else { c.path.clone() };
            let _ = writeln!(out, "{name:<52}  {path:<17}  {:<4}  {rtt:>9}  {punched:>8}  {}", c.transport, c.address);
            if let Some(b) = &c.birthday {
                let what = if b.side == "easy" {
                    format!("we sent {} probes to the peer's {} sockets", b.probes, b.sockets)
                } else {
                    format!("we opened {} sockets for the peer's probes", b.sockets)
                };
                let _ = writeln!(out, "{:<52}  birthday punch: {what}, {:.1} s", "", b.took_ms / 1000.0);
            }
        }
        if let Some(why) = &peer.relayed_because {
            let _ = writeln!(out, "{:<52}  relayed: {why}", "");
        }
    }
    out.trim_end().to_string()
}

pub fn netcheck(n: &api::Netcheck) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}\n", n.verdict);
    let _ = writeln!(out, "nat type      {}", n.nat_type);
    let _ = writeln!(out, "udp           {}", n.udp);
    let _ = writeln!(out, "mapping       {}", n.mapping);
    let double = match n.double_nat {
        Some(true) => "yes",
        Some(false) => "no",
        None => "cannot tell",
    };
    let _ = writeln!(out, "double nat    {double}");
    list(&mut out, "confirmed", &n.confirmed_addrs);
    let seen: Vec<String> = n.observed.iter().map(|o| format!("{} over {} (seen by {}, {} s ago)", o.observed, o.transport, o.observer, o.age_secs)).collect();
    list(&mut out, "seen at", &seen);
    if let Some(p) = &n.quic_probe {
        let _ = writeln!(out, "quic probe    reached {} of {} peers", p.reached, p.tried);
    }
    let m = &n.port_mapping;
    let mapping = match (&m.protocol, &m.last_error) {
        _ if !m.enabled => "off (--no-port-mapping)".to_string(),
        (Some(protocol), _) => format!("{protocol}: {}", m.external.join(", ")),
        (None, Some(e)) => format!("nothing mapped: {e}"),
        (None, None) => "nothing mapped yet".to_string(),
    };
    let _ = writeln!(out, "port mapping  {mapping}");
    let hops: Vec<String> = n
        .hops
        .iter()
        .map(|h| {
            let addr = h.addr.map(|a| a.to_string()).unwrap_or_else(|| "*".into());
            let what = if h.destination { " (the peer)" } else if h.public { " (public)" } else { "" };
            format!("{} {addr}{what}", h.ttl)
        })
        .collect();
    list(&mut out, "hops", &hops);
    let relays: Vec<String> = n
        .relays
        .iter()
        .map(|r| {
            let rtt = r.rtt_ms.map(|ms| format!("{ms:.1} ms")).unwrap_or_else(|| "not connected".into());
            let marks = [(r.held, "held"), (n.preferred_relay.as_deref() == Some(r.peer_id.as_str()), "preferred")];
            let marks: Vec<&str> = marks.iter().filter(|(on, _)| *on).map(|(_, m)| *m).collect();
            let marks = if marks.is_empty() { String::new() } else { format!(" ({})", marks.join(", ")) };
            format!("{} {rtt}{marks}", r.addr)
        })
        .collect();
    list(&mut out, "relays", &relays);
    let _ = writeln!(out, "\nwhy:");
    for reason in &n.reasons {
        let _ = writeln!(out, "  - {reason}");
    }
    out.trim_end().to_string()
}

pub fn ping(reply: &api::PingReply) -> String {
    let mut out = String::new();
    for (i, rtt) in reply.rtts_ms.iter().enumerate() {
        let _ = writeln!(out, "pong from {}: seq={} time={rtt:.2} ms", reply.peer_id, i + 1);
    }
    let n = reply.rtts_ms.len().max(1) as f64;
    let min = reply.rtts_ms.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = reply.rtts_ms.iter().cloned().fold(0.0, f64::max);
    let avg = reply.rtts_ms.iter().sum::<f64>() / n;
    let _ = write!(out, "{} pings: min/avg/max = {min:.2}/{avg:.2}/{max:.2} ms", reply.rtts_ms.len());
    out
}

pub fn find(reply: &api::FindReply) -> String {
    if !reply.found {
        return format!("{} not found ({:.1} ms)", reply.peer_id, reply.elapsed_ms);
    }
    let mut out = format!("found {} in {:.1} ms ({} DHT requests)", reply.peer_id, reply.elapsed_ms, reply.requests);
    for addr in &reply.addrs {
        let _ = write!(out, "\n  {addr}");
    }
    out
}

pub fn exposes(list: &[api::ExposeInfo]) -> String {
    if list.is_empty() {
        return "no exposed services".to_string();
    }
    let mut out = String::new();
    for e in list {
        let who = if e.allow_any { "any peer".to_string() } else { e.allow.join(", ") };
        let _ = writeln!(
            out,
            "{} -> {}{}  active {}  total {}  refused {}  in {} B  out {} B  allow: {who}",
            e.name, e.target, if e.udp { " (udp)" } else { "" }, e.active, e.total, e.refused, e.bytes_in, e.bytes_out
        );
        if let Some(err) = &e.last_error {
            let _ = writeln!(out, "    last error: {err}");
        }
    }
    out.trim_end().to_string()
}

pub fn forwards(list: &[api::ForwardInfo]) -> String {
    if list.is_empty() {
        return "no forwards".to_string();
    }
    let mut out = String::new();
    for f in list {
        let _ = writeln!(
            out,
            "{}{} -> {}/{}  {}  active {}  total {}  failed {}  sent {} B  received {} B",
            f.bind,
            if f.udp { " (udp)" } else { "" },
            f.peer,
            f.service,
            f.path.as_deref().unwrap_or("not connected yet"),
            f.active,
            f.total,
            f.failed,
            f.bytes_sent,
            f.bytes_received
        );
        if let Some(err) = &f.last_error {
            let _ = writeln!(out, "    last error: {err}");
        }
    }
    out.trim_end().to_string()
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}
