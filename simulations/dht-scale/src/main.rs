//! `dht-scale`: runs one simulation (see the crate docs) and prints its row of the results
//! table; `--out FILE` also appends the run as a JSON line, and `render FILE DIR` turns such a
//! file into the Markdown table and plots under `DIR`.

use std::io::Write as _;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use warren_dht_scale::{Params, Report, report};

#[derive(Parser)]
#[command(about = "The DHT at scale: many real warren nodes in one process, with churn")]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    /// Nodes in the network.
    #[arg(long, default_value_t = Params::default().nodes)]
    nodes: usize,
    /// Share of the nodes that leave (each replaced, some coming back later) per 10 minutes,
    /// e.g. 0.2.
    #[arg(long, default_value_t = 0.0)]
    churn: f64,
    /// Share of nodes that are publicly reachable (DHT servers); the rest are behind NATs.
    #[arg(long, default_value_t = Params::default().public_share)]
    public_share: f64,
    /// One-way link latency, milliseconds (each link gets 0.5× to 1.5× of it).
    #[arg(long, default_value_t = Params::default().latency_ms)]
    latency_ms: u64,
    /// Nodes joining per second while the network builds up.
    #[arg(long, default_value_t = Params::default().join_per_sec)]
    join_per_sec: f64,
    /// Seconds to measure, once the nodes have settled.
    #[arg(long, default_value_t = Params::default().measure_secs)]
    measure_secs: u64,
    /// Lookups started per second (and as many forward streams).
    #[arg(long, default_value_t = Params::default().samples_per_sec)]
    samples_per_sec: f64,
    /// After a failed find, ask every live node whether it holds the target's record and print
    /// who does (diagnosis: two requests per node per failure load the run).
    #[arg(long)]
    who_holds: bool,
    /// Seconds the nodes may take to settle before measuring starts anyway.
    #[arg(long, default_value_t = Params::default().settle_timeout_secs)]
    settle_timeout_secs: u64,
    #[arg(long, default_value_t = Params::default().seed)]
    seed: u64,
    /// Where the nodes' data dirs go (default: a temporary directory, removed afterwards).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Append the run's report to this file as one JSON line.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Sub {
    /// Writes README.md (the table) and SVG plots into DIR from a file of JSON lines.
    Render { runs: PathBuf, dir: PathBuf },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Some(Sub::Render { runs, dir }) = &cli.command {
        return match warren_dht_scale::report::render(runs, dir) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "error".into()))
        .with_writer(std::io::stderr)
        .init();
    let params = Params {
        nodes: cli.nodes,
        churn_per_10min: cli.churn,
        public_share: cli.public_share,
        latency_ms: cli.latency_ms,
        join_per_sec: cli.join_per_sec,
        measure_secs: cli.measure_secs,
        samples_per_sec: cli.samples_per_sec,
        who_holds: cli.who_holds,
        settle_timeout_secs: cli.settle_timeout_secs,
        seed: cli.seed,
        ..Params::default()
    };
    let temp;
    let root = match &cli.root {
        Some(root) => root.clone(),
        None => {
            temp = match tempfile::tempdir() {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("error: cannot make a temporary directory: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            };
            temp.path().to_path_buf()
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let report: Report = match runtime.block_on(warren_dht_scale::run(&params, &root)) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    print!("{}", report::markdown(std::slice::from_ref(&report)));
    println!("connections per node when measuring ended: {:.1}; at rest: {:.1}", report.connections_per_node_measuring, report.connections_per_node);
    for (kind, count) in &report.connection_kinds {
        println!("  {count:6} {kind}");
    }
    let relays = &report.relays;
    println!(
        "relays: {} up, {} peers reserved, circuits open {} (most on one {}), accepted {}, denied {}; reservations denied {}",
        relays.relays, relays.reservation_peers, relays.circuits_open, relays.most_circuits_open, relays.circuits_accepted, relays.circuits_denied, relays.reservations_denied
    );
    for (reason, count) in &relays.denied_by_reason {
        println!("relays denied {count}×: {reason}");
    }
    for (kind, outcomes) in [("find", &report.finds), ("forward", &report.forwards)] {
        for (reason, count) in &outcomes.failures {
            println!("{kind} failed {count}×: {reason}");
        }
    }
    if let Some(out) = &cli.out {
        let line = serde_json::to_string(&report).expect("a report serialises");
        let written = std::fs::OpenOptions::new().create(true).append(true).open(out).and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = written {
            eprintln!("error: cannot append to {}: {e}", out.display());
            return std::process::ExitCode::FAILURE;
        }
    }
    std::process::ExitCode::SUCCESS
}
