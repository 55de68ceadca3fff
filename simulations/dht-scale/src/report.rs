//! What a run measured, as JSON (one line per run) and as Markdown and SVG for the README.

use serde::{Deserialize, Serialize};

use crate::{Params, Sample};

/// A run's figures. Times are wall-clock under the simulated latency.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub params: Params,
    /// Seconds until every node had started.
    pub joined_secs: f64,
    /// Seconds until every node had settled (or the settle timeout).
    pub settled_secs: f64,
    /// Nodes not settled when measuring began.
    pub unsettled: usize,
    /// What the unsettled nodes lacked, counted.
    #[serde(default)]
    pub unsettled_why: Vec<(String, usize)>,
    pub measured_secs: f64,
    /// Nodes that left while measuring.
    pub departures: usize,
    pub finds: Outcomes,
    pub forwards: Outcomes,
    /// Entries in a node's WAN routing table, on average, and the share of them still up.
    pub table_entries_per_node: f64,
    pub table_live_share: f64,
    /// Bytes each node sent per minute (everything: DHT, identify, pings, relayed forwards).
    pub bytes_per_node_per_min: f64,
    /// Connections each node dialed per minute.
    pub dials_per_node_per_min: f64,
    /// The process's resident memory per node (beyond what it held before the first node).
    pub rss_per_node_kib: f64,
    /// The share of the machine's cores the simulation used while measuring; near 1, the
    /// machine bounded the run and its latencies include waiting for a core.
    pub cpu_share: f64,
    /// How late a timer set to fire every 100 ms fired while measuring, p99 and worst, ms: the
    /// machine's backlog. Every timeout in the nodes (30 s lookups, 5 s dials) runs on the same
    /// clock, so a backlog of seconds makes lookups fail that a node on its own machine finishes.
    #[serde(default)]
    pub timer_lag_p99_ms: f64,
    #[serde(default)]
    pub timer_lag_max_ms: f64,
    /// What the relays did, summed over the relays up at the end.
    #[serde(default)]
    pub relays: RelaySummary,
    /// Connections a node has open, on average, at the end (at rest).
    #[serde(default)]
    pub connections_per_node: f64,
    /// The same when measuring ended (lookups' connections still open).
    #[serde(default)]
    pub connections_per_node_measuring: f64,
    /// Connections at the end by the roles at both ends, path and direction, and age.
    #[serde(default)]
    pub connection_kinds: Vec<(String, usize)>,
    /// The same with no lookups running (the background a node costs), before measuring.
    #[serde(default)]
    pub idle_bytes_per_node_per_min: f64,
    #[serde(default)]
    pub idle_dials_per_node_per_min: f64,
    /// CPU milliseconds per node per second with no lookups running.
    #[serde(default)]
    pub idle_cpu_ms_per_node_per_sec: f64,
}

/// The relays' counters at the end of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RelaySummary {
    pub relays: usize,
    pub reservation_peers: usize,
    pub circuits_open: u64,
    pub most_circuits_open: u64,
    pub circuits_accepted: u64,
    pub circuits_denied: u64,
    pub reservations_denied: u64,
    /// The last denial each relay saw, counted alike.
    pub denials: Vec<(String, usize)>,
    /// Every denial, summed over the relays by what was denied and why.
    #[serde(default)]
    pub denied_by_reason: Vec<(String, u64)>,
}

impl RelaySummary {
    pub fn of<'a>(relays: impl Iterator<Item = &'a warren_node::api::RelayStatus>) -> Self {
        let mut summary = RelaySummary::default();
        for relay in relays {
            summary.relays += 1;
            summary.reservation_peers += relay.reservation_peers;
            summary.circuits_open += relay.circuits;
            summary.most_circuits_open = summary.most_circuits_open.max(relay.circuits);
            summary.circuits_accepted += relay.circuits_accepted;
            summary.circuits_denied += relay.circuits_denied;
            summary.reservations_denied += relay.reservations_denied;
            for (reason, n) in &relay.denied_by_reason {
                match summary.denied_by_reason.iter_mut().find(|(r, _)| r == reason) {
                    Some((_, total)) => *total += n,
                    None => summary.denied_by_reason.push((reason.clone(), *n)),
                }
            }
            if let Some(denial) = &relay.last_denial {
                let denial = generalise(denial);
                match summary.denials.iter_mut().find(|(d, _)| *d == denial) {
                    Some((_, n)) => *n += 1,
                    None => summary.denials.push((denial, 1)),
                }
            }
        }
        summary
    }
}

/// Failure reasons kept per kind of sample.
const TOP_FAILURES: usize = 5;

/// A failure's text with PeerIds, addresses and numbers taken out, so alike failures count as one.
pub fn generalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split(' ') {
        if !out.is_empty() {
            out.push(' ');
        }
        if word.starts_with('/') || word.starts_with("12D3Koo") || word.starts_with("(/") || word.starts_with("[(/") {
            out.push('…');
        } else if word.trim_end_matches(['s', ',', ')']).parse::<f64>().is_ok() {
            out.push('N');
        } else {
            out.push_str(word);
        }
    }
    out.chars().take(200).collect()
}

/// Success and latency of one kind of sample.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Outcomes {
    pub tried: usize,
    pub ok: usize,
    /// Of the samples whose target was behind a NAT.
    pub natted_tried: usize,
    pub natted_ok: usize,
    /// Milliseconds of the successful ones.
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    /// The commonest reasons for failure, with how often each came up.
    #[serde(default)]
    pub failures: Vec<(String, usize)>,
    /// DHT requests a successful find sent before it answered (finds only), p50 and p90.
    #[serde(default)]
    pub requests_p50: f64,
    #[serde(default)]
    pub requests_p90: f64,
}

impl Outcomes {
    pub fn of(samples: &[Sample]) -> Self {
        let mut times: Vec<f64> = samples.iter().filter(|s| s.ok).map(|s| s.millis).collect();
        times.sort_by(f64::total_cmp);
        let at = |q: f64| quantile(&times, q);
        let mut failures: Vec<(String, usize)> = Vec::new();
        for reason in samples.iter().filter_map(|s| s.failure.as_ref()) {
            match failures.iter_mut().find(|(r, _)| r == reason) {
                Some((_, n)) => *n += 1,
                None => failures.push((reason.clone(), 1)),
            }
        }
        failures.sort_by(|a, b| b.1.cmp(&a.1));
        failures.truncate(TOP_FAILURES);
        let mut requests: Vec<f64> = samples.iter().filter(|s| s.ok).filter_map(|s| s.requests).map(f64::from).collect();
        requests.sort_by(f64::total_cmp);
        let requests_at = |q: f64| quantile(&requests, q);
        Outcomes {
            failures,
            requests_p50: requests_at(0.5),
            requests_p90: requests_at(0.9),
            tried: samples.len(),
            ok: times.len(),
            natted_tried: samples.iter().filter(|s| s.natted_target).count(),
            natted_ok: samples.iter().filter(|s| s.natted_target && s.ok).count(),
            p50_ms: at(0.5),
            p90_ms: at(0.9),
            p99_ms: at(0.99),
        }
    }

    /// Successes as a percentage.
    pub fn rate(&self) -> f64 {
        if self.tried == 0 { 0.0 } else { 100.0 * self.ok as f64 / self.tried as f64 }
    }
}

/// The value at quantile `q` (0 to 1) of `sorted`, ascending; 0 when it is empty.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() { 0.0 } else { sorted[((sorted.len() - 1) as f64 * q).round() as usize] }
}

/// The Markdown table of runs.
pub fn markdown(reports: &[Report]) -> String {
    let mut out = String::from(
        "| nodes | churn /10 min | find ok | find p50 / p90 / p99 | DHT requests /find p50 / p90 | forward ok | forward p50 / p90 / p99 | table live | table size | KiB sent /node/min (idle) | dials /node/min (idle) | connections /node (idle) | CPU ms /node/s idle | RSS /node | CPU used | timer lag p99 / max | unsettled |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in reports {
        let times = |o: &Outcomes| format!("{:.0} / {:.0} / {:.0} ms", o.p50_ms, o.p90_ms, o.p99_ms);
        let rate = |o: &Outcomes| format!("{:.1} % ({}/{})", o.rate(), o.ok, o.tried);
        out.push_str(&format!(
            "| {} | {:.0} % | {} | {} | {:.0} / {:.0} | {} | {} | {:.1} % | {:.0} | {:.0} ({:.0}) | {:.1} ({:.1}) | {:.0} ({:.1}) | {:.2} | {:.0} KiB | {:.0} % | {:.0} / {:.0} ms | {} |\n",
            r.params.nodes,
            r.params.churn_per_10min * 100.0,
            rate(&r.finds),
            times(&r.finds),
            r.finds.requests_p50,
            r.finds.requests_p90,
            rate(&r.forwards),
            times(&r.forwards),
            r.table_live_share * 100.0,
            r.table_entries_per_node,
            r.bytes_per_node_per_min / 1024.0,
            r.idle_bytes_per_node_per_min / 1024.0,
            r.dials_per_node_per_min,
            r.idle_dials_per_node_per_min,
            r.connections_per_node_measuring,
            r.connections_per_node,
            r.idle_cpu_ms_per_node_per_sec,
            r.rss_per_node_kib,
            r.cpu_share * 100.0,
            r.timer_lag_p99_ms,
            r.timer_lag_max_ms,
            r.unsettled,
        ));
    }
    out
}

/// The process's resident memory, bytes.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// CPU seconds the process has used (user and system).
pub fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Cores the process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Reads runs (JSON lines) and writes `README.md` (the table) and the plots into `dir`.
pub fn render(runs: &std::path::Path, dir: &std::path::Path) -> Result<(), String> {
    let text = std::fs::read_to_string(runs).map_err(|e| format!("cannot read {}: {e}", runs.display()))?;
    let mut reports: Vec<Report> = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        reports.push(serde_json::from_str(line).map_err(|e| format!("{} line {}: {e}", runs.display(), i + 1))?);
    }
    reports.sort_by(|a, b| (a.params.churn_per_10min, a.params.nodes).partial_cmp(&(b.params.churn_per_10min, b.params.nodes)).expect("finite"));
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let series = |value: &dyn Fn(&Report) -> f64| -> Vec<(String, Vec<(f64, f64)>)> {
        let mut churns: Vec<f64> = reports.iter().map(|r| r.params.churn_per_10min).collect();
        churns.dedup();
        churns
            .iter()
            .map(|c| {
                let points = reports.iter().filter(|r| r.params.churn_per_10min == *c).map(|r| (r.params.nodes as f64, value(r))).collect();
                (format!("churn {:.0} % / 10 min", c * 100.0), points)
            })
            .collect()
    };
    let plots = [
        ("success.svg", "lookup success (find), %", series(&|r| r.finds.rate())),
        ("forward-success.svg", "find + open a forward stream: success, %", series(&|r| r.forwards.rate())),
        ("latency.svg", "find: p50 lookup time, ms", series(&|r| r.finds.p50_ms)),
        ("latency-p90.svg", "find: p90 lookup time, ms", series(&|r| r.finds.p90_ms)),
    ];
    for (file, title, lines) in &plots {
        let path = dir.join(file);
        std::fs::write(&path, svg_chart(title, "nodes", lines)).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    let mut readme = String::from("# DHT at scale: results\n\nWritten by `dht-scale render` from the runs in `runs.jsonl`; how they were made: `../README.md`.\n\n");
    readme.push_str(&markdown(&reports));
    readme.push('\n');
    for (file, title, _) in &plots {
        readme.push_str(&format!("![{title}]({file})\n"));
    }
    let path = dir.join("README.md");
    std::fs::write(&path, readme).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// A line chart: one line per series, x and y axes from zero with five ticks each.
fn svg_chart(title: &str, x_label: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    const W: f64 = 640.0;
    const H: f64 = 400.0;
    const LEFT: f64 = 70.0;
    const BOTTOM: f64 = 50.0;
    const TOP: f64 = 40.0;
    const RIGHT: f64 = 190.0;
    const COLOURS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf"];
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let x_max = points.clone().map(|p| p.0).fold(1.0, f64::max);
    let y_max = points.map(|p| p.1).fold(1.0, f64::max) * 1.05;
    let x = |v: f64| LEFT + v / x_max * (W - LEFT - RIGHT);
    let y = |v: f64| H - BOTTOM - v / y_max * (H - BOTTOM - TOP);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" font-size=\"14\">{title}</text>\n\
         <line x1=\"{LEFT}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x_label}</text>\n",
        LEFT,
        H - BOTTOM,
        W - RIGHT,
        H - BOTTOM,
        H - BOTTOM,
        (LEFT + W - RIGHT) / 2.0,
        H - 12.0
    );
    for i in 0..=5 {
        let (xv, yv) = (x_max * i as f64 / 5.0, y_max * i as f64 / 5.0);
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{xv:.0}</text>\n<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{yv:.1}</text>\n\
             <line x1=\"{LEFT}\" y1=\"{:.1}\" x2=\"{}\" y2=\"{:.1}\" stroke=\"#ddd\"/>\n",
            x(xv),
            H - BOTTOM + 16.0,
            LEFT - 6.0,
            y(yv) + 4.0,
            y(yv),
            W - RIGHT,
            y(yv)
        ));
    }
    for (i, (name, points)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = points.iter().map(|(px, py)| format!("{:.1},{:.1}", x(*px), y(*py))).collect();
        svg.push_str(&format!("<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>\n", path.join(" ")));
        for (px, py) in points {
            svg.push_str(&format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"/>\n", x(*px), y(*py)));
        }
        let ly = TOP + 10.0 + 18.0 * i as f64;
        svg.push_str(&format!(
            "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{colour}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{name}</text>\n",
            W - RIGHT + 15.0,
            W - RIGHT + 35.0,
            W - RIGHT + 40.0,
            ly + 4.0
        ));
    }
    svg.push_str("</svg>\n");
    svg
}
