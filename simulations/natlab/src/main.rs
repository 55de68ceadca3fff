//! `natlab`: builds the NAT lab, runs the connectivity matrix, writes the reports. Run as root.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use warren_natlab::{Options, Pair, describe, full_matrix, markdown, svg, topo};

/// A NAT laboratory in network namespaces: real kernel NAT (nftables masquerade), real warren
/// binaries, one-way latency on a userspace wire. Prints and writes the connectivity matrix.
#[derive(Parser)]
#[command(name = "natlab", version)]
struct Args {
    /// The warren binary to run in the lab
    #[arg(long, default_value = "target/release/warren")]
    warren: PathBuf,
    /// One-way latency on the wire, milliseconds
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
    /// Cells to run, e.g. eim:eim,symmetric:eim,eim:eim:tcp [default: the full matrix]
    #[arg(long, value_delimiter = ',')]
    pairs: Vec<Pair>,
    /// Where matrix.md, matrix.json and matrix.svg go
    #[arg(long, default_value = "simulations/natlab/results")]
    out: PathBuf,
    /// Keep every node's data dir and log (by default only failed cells keep theirs)
    #[arg(long)]
    keep_logs: bool,
    /// Skip the restart phase (after the matrix, the whole lab restarted with its data dirs and
    /// every cell checked again)
    #[arg(long)]
    no_restart: bool,
    /// Run every cell this many times (fresh nodes and ports each time) and add a summary per
    /// pair: how often it went direct, time to direct and birthday probes (median, p90)
    #[arg(long, default_value_t = 1, value_name = "N")]
    repeat: usize,
    /// Megabytes a rebinding cell (A:B:rebind, A:B:rebind-ports) sends through the forward
    #[arg(long, default_value_t = warren_natlab::REBIND_MB, value_name = "MB")]
    rebind_mb: usize,
    /// Remove every lab namespace left behind (by any run) and exit
    #[arg(long)]
    cleanup: bool,
    /// Check the UPnP site alone (miniupnpd answers NAT-PMP, a mapped port is reachable from the
    /// wire, an unmapped one is not) and exit
    #[arg(long)]
    check_upnp: bool,
    /// Run `warren netcheck` in one site of every kind (port-mapping variants included), write
    /// netcheck.md and netcheck.json, and exit
    #[arg(long)]
    netcheck: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.cleanup {
        let removed = topo::cleanup_stale(true);
        println!("removed {} namespaces", removed.len());
        return ExitCode::SUCCESS;
    }
    if args.check_upnp {
        topo::cleanup_stale(false);
        return match warren_natlab::upnp::check_site(Duration::from_millis(args.latency_ms)) {
            Ok(check) => {
                println!("{check:#?}");
                let ok = check.as_expected();
                println!("{}", if ok { "upnp site: ok" } else { "upnp site: NOT as expected" });
                if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if !args.warren.exists() {
        eprintln!("error: no warren binary at {}; build it with `cargo build --release` or pass --warren", args.warren.display());
        return ExitCode::from(2);
    }
    // Ctrl-C or a kill ends the run with the lab removed (nodes die with this process).
    let pid = std::process::id();
    warren_natlab::sys::route_signals_to(move |sig| {
        eprintln!("signal {sig}: removing the lab");
        for ns in topo::cleanup_stale(false).into_iter().chain(topo::remove_lab_of(pid)) {
            eprintln!("removed {ns}");
        }
        std::process::exit(130);
    });
    let work_dir = std::env::temp_dir().join(format!("natlab-{}", std::process::id()));
    let opts = Options {
        warren: std::fs::canonicalize(&args.warren).unwrap_or(args.warren.clone()),
        latency: Duration::from_millis(args.latency_ms),
        pairs: {
            let pairs = if args.pairs.is_empty() { full_matrix() } else { args.pairs.clone() };
            (0..args.repeat.max(1)).flat_map(|_| pairs.clone()).collect()
        },
        work_dir: work_dir.clone(),
        keep_logs: args.keep_logs,
        restart: !args.no_restart,
        rebind_mb: args.rebind_mb.max(1),
    };
    if args.netcheck {
        use topo::SiteKind;
        let mut kinds = SiteKind::all().to_vec();
        kinds.extend([SiteKind::NatPmp, SiteKind::Pcp, SiteKind::MapsButDrops]);
        return match warren_natlab::netcheck::run(&opts, &kinds) {
            Ok(answers) => {
                let table = warren_natlab::netcheck::markdown(&answers);
                println!("{table}");
                let json = serde_json::to_string_pretty(&answers).unwrap();
                if let Err(e) = std::fs::create_dir_all(&args.out)
                    .and_then(|()| std::fs::write(args.out.join("netcheck.md"), &table))
                    .and_then(|()| std::fs::write(args.out.join("netcheck.json"), json))
                {
                    eprintln!("error: cannot write the reports to {}: {e}", args.out.display());
                    return ExitCode::FAILURE;
                }
                if answers.iter().all(|a| a.nat_type() == a.expected) { ExitCode::SUCCESS } else { ExitCode::FAILURE }
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    println!("natlab: {} cells, {} ms one-way latency, nodes' logs under {}", opts.pairs.len(), args.latency_ms, work_dir.display());
    let started = std::time::Instant::now();
    let cells = match warren_natlab::run(&opts, |cell| {
        println!("  {:>5.1} s  {} → {}{}: {}", cell.seconds, cell.a.name(), cell.b.name(),
            if cell.transports == warren_natlab::Transports::Tcp { " (tcp)" } else { "" }, describe(cell));
    }) {
        Ok(cells) => cells,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut table = markdown(&cells, opts.latency);
    if args.repeat > 1 {
        table.push_str(&format!("\n{}", warren_natlab::repeat_summary(&cells, Duration::from_secs(40))));
    }
    println!("\n{table}\nwhole run: {:.0} s", started.elapsed().as_secs_f64());
    if let Err(e) = std::fs::create_dir_all(&args.out)
        .and_then(|()| std::fs::write(args.out.join("matrix.md"), &table))
        .and_then(|()| std::fs::write(args.out.join("matrix.json"), serde_json::to_string_pretty(&cells).unwrap()))
        .and_then(|()| std::fs::write(args.out.join("matrix.svg"), svg(&cells)))
    {
        eprintln!("error: cannot write the reports to {}: {e}", args.out.display());
        return ExitCode::FAILURE;
    }
    println!("reports in {}", args.out.display());
    let restart_ok = |c: &warren_natlab::Cell| c.after_restart.as_ref().is_none_or(|r| r.reached && r.transfer_ok);
    if cells.iter().all(|c| c.reached && c.transfer_ok && restart_ok(c)) { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

