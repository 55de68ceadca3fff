//! `warren netcheck` in every kind of site: a plain node (`warren up --bootstrap …`, nothing
//! else a user would not pass) starts in each site at once, and once AutoNAT has made up its
//! mind the lab asks the node what network it is in, again while the answer is "cannot tell
//! yet" (as a user would). The answer is compared with what the site is.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::nodes::Node;
use crate::topo::{Lab, PUBLIC_RANGE, SiteKind};
use crate::{Options, Transports, start_core};

/// How long a node may take to connect and for AutoNAT to decide (its first probes wait for
/// a server to be connected; a refused dial-back takes a probe timeout).
const DECIDE_TIMEOUT: Duration = Duration::from_secs(90);

/// One site's answer.
#[derive(Debug, Clone, Serialize)]
pub struct SiteAnswer {
    pub kind: SiteKind,
    /// The NAT type the site should be reported as.
    pub expected: &'static str,
    /// `warren netcheck --json`, or the error that kept it from answering.
    pub netcheck: Result<Value, String>,
    /// Seconds from the node's start to the answer.
    pub seconds: f64,
    /// Seconds from the node's start until AutoNAT confirmed a direct address of it (a peer
    /// dialed it back): public, by its own address or a port mapping; never behind other NATs.
    pub public_after_s: Option<f64>,
}

impl SiteAnswer {
    pub fn nat_type(&self) -> &str {
        self.netcheck.as_ref().ok().and_then(|n| n["nat_type"].as_str()).unwrap_or("(no answer)")
    }
}

/// What each kind of site is, in netcheck's words.
pub fn expected(kind: SiteKind) -> &'static str {
    match kind {
        SiteKind::Public => "public",
        SiteKind::Eim | SiteKind::SameLan | SiteKind::MapsButDrops => "easy",
        SiteKind::Symmetric => "symmetric",
        SiteKind::DoubleNat => "double-nat",
        SiteKind::UdpBlocked => "udp-blocked",
        SiteKind::Upnp | SiteKind::NatPmp | SiteKind::Pcp => "port-mapped",
    }
}

/// Runs a node in one site of each kind, all at once, and asks each for its netcheck.
pub fn run(opts: &Options, kinds: &[SiteKind]) -> Result<Vec<SiteAnswer>, String> {
    crate::topo::cleanup_stale(false);
    std::fs::create_dir_all(&opts.work_dir).map_err(|e| format!("{}: {e}", opts.work_dir.display()))?;
    let mut lab = Lab::new(opts.latency)?;
    let sites = kinds.iter().map(|kind| lab.site(*kind)).collect::<Result<Vec<_>, _>>()?;
    let core = start_core(&mut lab, opts)?;
    let mut args: Vec<String> = ["--public-ranges", PUBLIC_RANGE].map(String::from).to_vec();
    for addr in crate::Core::addrs(&core.boot_host, &core.bootstrap, Transports::Both) {
        args.extend(["--bootstrap".into(), addr]);
    }
    let started = Instant::now();
    let nodes = sites
        .iter()
        .map(|site| Node::start(&opts.warren, &site.hosts[0].ns, &opts.work_dir.join(format!("netcheck-{}", site.kind.name())), &args))
        .collect::<Result<Vec<_>, _>>()?;
    let mut answers: Vec<Option<SiteAnswer>> = vec![None; nodes.len()];
    let mut public_after: Vec<Option<f64>> = vec![None; nodes.len()];
    // AutoNAT decides (public or private) for every node; then its netcheck is asked.
    let deadline = Instant::now() + DECIDE_TIMEOUT;
    while answers.iter().any(Option::is_none) && Instant::now() < deadline {
        for (i, node) in nodes.iter().enumerate() {
            if answers[i].is_some() {
                continue;
            }
            let status = node.json(&["status"]);
            let wan = format!("/ip4/{}/", sites[i].wan);
            let confirmed = status.as_ref().and_then(|s| s["external_addrs"].as_array()).is_some_and(|a| {
                a.iter().filter_map(|a| a.as_str()).any(|a| a.starts_with(&wan) && !a.contains("p2p-circuit"))
            });
            if confirmed && public_after[i].is_none() {
                public_after[i] = Some(started.elapsed().as_secs_f64());
            }
            let decided = status.is_some_and(|s| s["reachability"] != "unknown" && s["connected_peers"].as_u64() >= Some(2));
            if decided {
                let netcheck = node.cli(&["netcheck"]);
                // "Cannot tell yet" is an answer for later: asked again, as a user would.
                let not_yet = netcheck.as_ref().is_ok_and(|n| n["nat_type"] == "unknown");
                if not_yet && Instant::now() + Duration::from_secs(5) < deadline {
                    continue;
                }
                answers[i] = Some(SiteAnswer {
                    kind: sites[i].kind,
                    expected: expected(sites[i].kind),
                    netcheck,
                    seconds: started.elapsed().as_secs_f64(),
                    public_after_s: public_after[i],
                });
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let answers = answers
        .into_iter()
        .zip(&nodes)
        .zip(&sites)
        .map(|((answer, node), site)| {
            answer.unwrap_or_else(|| SiteAnswer {
                kind: site.kind,
                expected: expected(site.kind),
                netcheck: Err(format!(
                    "AutoNAT did not decide within {DECIDE_TIMEOUT:?}; status: {}; netcheck then: {:?}",
                    node.json(&["status"]).map(|s| format!("reachability {} peers {}", s["reachability"], s["connected_peers"])).unwrap_or_default(),
                    node.cli(&["netcheck"]).map(|n| n["nat_type"].clone())
                )),
                seconds: started.elapsed().as_secs_f64(),
                public_after_s: None,
            })
        })
        .collect();
    drop(nodes);
    drop(core);
    lab.teardown();
    let left = lab.leftovers();
    if !left.is_empty() {
        return Err(format!("the lab's namespaces were not all removed: {left:?}"));
    }
    Ok(answers)
}

/// The README's table: a row per site.
pub fn markdown(answers: &[SiteAnswer]) -> String {
    let mut out = String::from(
        "| site | netcheck says | udp | mapping | double NAT | port mapping | public after | verdict |\n|---|---|---|---|---|---|---|---|\n",
    );
    for a in answers {
        let n = a.netcheck.as_ref().ok();
        let field = |k: &str| n.and_then(|n| n[k].as_str()).unwrap_or("-").to_string();
        let double = match n.map(|n| &n["double_nat"]) {
            Some(Value::Bool(true)) => "yes",
            Some(Value::Bool(false)) => "no",
            _ => "cannot tell",
        };
        let pm = n.map(|n| &n["port_mapping"]);
        let port_mapping = pm.and_then(|p| p["protocol"].as_str()).map(String::from).unwrap_or_else(|| "none".into());
        let mark = if a.nat_type() == a.expected { "" } else { " ✗" };
        let public_after = a.public_after_s.map(|s| format!("{s:.1} s")).unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "| {} | {}{mark} | {} | {} | {double} | {port_mapping} | {public_after} | {} |\n",
            a.kind.name(),
            a.nat_type(),
            field("udp"),
            field("mapping"),
            field("verdict")
        ));
    }
    out
}
