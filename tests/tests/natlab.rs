//! The NAT lab's representative subset (the full matrix is `natlab`, see simulations/natlab):
//! two EIM NATs punch through (QUIC and TCP racing; then TCP alone), fall back to the relay when
//! the direct path is cut and punch again when it returns, and a symmetric NAT, which defeats
//! DCUtR, gets a direct path by the birthday punch, and a transfer over it outlives the direct
//! connection when the NAT maps the flow afresh; then the whole lab restarts with its
//! data dirs and every forward works again. Real kernel NAT in network
//! namespaces; needs root. WARREN_SKIP_NETNS=1 skips it elsewhere. The UPnP site (miniupnpd on
//! an EIM router) is checked on its own.

mod common;

use std::time::Duration;

use warren_natlab::topo::SiteKind;
use warren_natlab::{Options, Pair, Rebind, Transports, describe, markdown};

/// The lab needs root; runs that set WARREN_SKIP_NETNS=1 skip it.
fn skipped() -> bool {
    let skip = std::env::var("WARREN_SKIP_NETNS").is_ok_and(|v| v == "1");
    if skip {
        eprintln!("skipped: WARREN_SKIP_NETNS=1");
    }
    skip
}

/// A lab with one site of some kind, a bootstrap node (DHT server) on the wire, and in the site a
/// node started as a user behind that router would start it: `--bootstrap` and nothing else.
struct SiteWithNode {
    work: tempfile::TempDir,
    lab: warren_natlab::topo::Lab,
    site: warren_natlab::topo::Site,
    boot: warren_natlab::nodes::Node,
    /// The bootstrap node's QUIC address.
    bootstrap: String,
    node: warren_natlab::nodes::Node,
}

/// Builds a [`SiteWithNode`]; `None` when lab tests are skipped.
fn site_with_node(kind: SiteKind) -> Option<SiteWithNode> {
    use warren_natlab::nodes::Node;
    if skipped() {
        return None;
    }
    let work = tempfile::tempdir().unwrap();
    let mut lab = warren_natlab::topo::Lab::new(Duration::from_millis(20)).expect("the lab builds (root, nftables, miniupnpd-nftables)");
    let site = lab.site(kind).unwrap();
    let boot_host = lab.public_host("boot").unwrap();
    let bin = std::path::Path::new(common::BIN);
    let boot = Node::start(bin, &boot_host.ns, &work.path().join("boot"), &lab_args(&["--dht-mode", "server"])).unwrap();
    let bootstrap = format!("/ip4/{}/udp/4001/quic-v1/p2p/{}", boot_host.addr, boot.peer_id);
    let node = Node::start(bin, &site.hosts[0].ns, &work.path().join("node"), &lab_args(&["--bootstrap", &bootstrap])).unwrap();
    Some(SiteWithNode { work, lab, site, boot, bootstrap, node })
}

/// Lab options for this build's binary at 20 ms one-way latency, nodes' dirs under `work`
/// (removed with the cells that pass).
fn lab_options(work: &std::path::Path, pairs: Vec<Pair>, restart: bool) -> Options {
    Options { warren: common::BIN.into(), latency: Duration::from_millis(20), pairs, work_dir: work.to_path_buf(), keep_logs: false, restart, rebind_mb: warren_natlab::REBIND_MB }
}

/// `warren up` arguments for a node in the lab: no mDNS, the wire's documentation range counted
/// as public (`--public-ranges`), then `extra`.
fn lab_args(extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["--no-mdns", "--public-ranges", warren_natlab::topo::PUBLIC_RANGE].map(String::from).to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn nat_lab_subset_punches_through_eim_and_birthday_punches_through_symmetric() {
    if skipped() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let opts = lab_options(
        work.path(),
        vec![
            Pair { repunch: true, ..Pair::new(SiteKind::Eim, SiteKind::Eim) },
            Pair { transports: Transports::Tcp, ..Pair::new(SiteKind::Eim, SiteKind::Eim) },
            // Then its router is flushed mid-transfer: the symmetric NAT maps the flow to a
            // new port, the direct connection dies, and the forwarded connection goes on.
            Pair { rebind: Some(Rebind::Flush), ..Pair::new(SiteKind::Symmetric, SiteKind::Eim) },
        ],
        true,
    );
    let cells = warren_natlab::run(&opts, |cell| eprintln!("{:?} -> {:?}: {}", cell.a, cell.b, describe(cell)))
        .expect("the lab builds and runs (root, iproute2, nftables, /dev/net/tun)");
    eprintln!("{}", markdown(&cells, opts.latency));
    // Every cell here should end direct with all its checks passed; for one that does not, the
    // failure below comes with its nodes' account of the punches (their logs are kept too).
    let wrong: Vec<_> = cells.iter().filter(|c| !c.all_ok() || !c.direct || c.after_restart.as_ref().is_some_and(|r| !r.direct)).collect();
    if !wrong.is_empty() {
        for cell in &wrong {
            eprintln!("\n{}\n{}", describe(cell), cell.punch_story(60));
        }
        eprintln!("the lab's logs are kept under {}", work.keep().display());
    }
    for cell in &cells {
        assert!(cell.reached && cell.transfer_ok, "every cell forwards 10 MB intact: {}", describe(cell));
    }
    let (quic, tcp, symmetric) = (&cells[0], &cells[1], &cells[2]);
    assert!(quic.direct && quic.direct_by.is_some(), "EIM x EIM is punched: {}", describe(quic));
    let cut = quic.repunch.as_ref().expect("the path was cut and restored");
    assert!(cut.direct_lost_after_s.is_some() && cut.fallback_ok, "with the direct path cut the relay carries on: {}", describe(quic));
    assert_eq!(cut.fallback_path.as_deref(), Some("relayed"), "{}", describe(quic));
    assert!(cut.direct_again_after_s.is_some(), "punched again after the path came back: {}", describe(quic));
    assert!(tcp.direct && tcp.direct_transport.as_deref() == Some("tcp"), "EIM x EIM over TCP alone: {}", describe(tcp));
    // Symmetric x EIM: DCUtR cannot, the birthday punch does (99.9 % of punches find a port
    // within its 1,750 probes), within the lab's 40 s of first contact.
    assert!(symmetric.direct, "symmetric x EIM is punched: {}", describe(symmetric));
    assert_eq!(symmetric.direct_by.as_deref(), Some("birthday"), "{}", describe(symmetric));
    assert!(symmetric.birthday_probes.is_some_and(|p| p > 0), "the easy side counted its probes: {}", describe(symmetric));
    // The forwarded connection outlived its direct connection: resumed on another stream.
    let rebound = symmetric.rebind.as_ref().expect("the router was flushed mid-transfer");
    assert!(rebound.transfer_ok, "100 MB intact across the direct connection's death: {}", describe(symmetric));
    // ... and the pair was punched again: direct at the transfer's end, or within the lab's 40 s.
    assert!(rebound.direct_after || rebound.direct_again_after_s.is_some(), "punched again after the rebinding: {}", describe(symmetric));
    // The whole lab restarted with its data dirs: every forward works again, nobody re-ran a
    // command, and the punched pairs are direct again.
    for cell in &cells {
        let after = cell.after_restart.as_ref().expect("every cell was checked after the restart");
        assert!(after.reached && after.transfer_ok, "after the restart: {}", describe(cell));
    }
    for cell in [quic, tcp, symmetric] {
        assert!(cell.after_restart.as_ref().unwrap().direct, "punched again after the restart: {}", describe(cell));
    }
    // Nothing of the lab is left behind: `run` fails otherwise (other tests' labs, in this
    // process too, may still be running).
}

/// The UPnP site the port-mapping work will use: the real miniupnpd on an EIM router. Nothing
/// gets in unmapped; NAT-PMP tells the router's public address and maps a port that then carries
/// a connection from the wire; UPnP-IGD (miniupnpc's `upnpc`) reports the same address.
#[test]
fn upnp_site_maps_ports_on_request_and_drops_everything_else() {
    if skipped() {
        return;
    }
    let check = warren_natlab::upnp::check_site(Duration::from_millis(20))
        .expect("the UPnP site builds and miniupnpd answers (root, nftables, miniupnpd-nftables)");
    eprintln!("{check:#?}");
    assert!(check.before_mapping.is_err(), "an unmapped port is not reachable from the wire: {check:?}");
    assert_eq!(check.natpmp_external, check.wan, "NAT-PMP reports the router's WAN address");
    assert_eq!(check.mapped_port, 7100, "miniupnpd grants the port asked for when it is free");
    assert!(check.after_mapping.is_ok(), "1 MiB echoed through the mapped port: {check:?}");
    match &check.igd_external {
        Some(igd) => assert_eq!(igd.as_ref(), Ok(&check.wan), "UPnP-IGD reports the WAN address"),
        None => panic!("upnpc (Debian: miniupnpc) is needed to check UPnP-IGD; .ci/run installs it"),
    }
}

/// A plain `warren up` behind the UPnP site's router asks it for its ports, and so becomes
/// directly reachable: AutoNAT confirms the mapped address (a peer dials it back), and a peer on
/// the internet that never heard from the node reaches it on that address, without relay or
/// punch. On a clean shutdown the mapping is removed from the router.
#[test]
fn a_node_behind_a_router_that_maps_ports_is_reached_directly_through_the_mapping() {
    use serde_json::Value;
    use warren_natlab::nodes::{Node, wait_for};
    let Some(SiteWithNode { work, mut lab, site, boot, bootstrap, mut node }) = site_with_node(SiteKind::Upnp) else { return };
    let probe_host = lab.public_host("probe").unwrap();
    let bin = std::path::Path::new(common::BIN);

    let wan = site.wan.to_string();
    let _mapped = wait_for(Duration::from_secs(30), || {
        let status = node.json(&["status"])?;
        let mappings = status["port_mappings"].as_array()?.clone();
        (mappings.len() == 2 && mappings.iter().all(|m| m["external"].as_str().is_some_and(|e| e.starts_with(&format!("{wan}:")))))
            .then_some(mappings)
    })
    .unwrap_or_else(|| panic!("the router maps QUIC's and TCP's ports: {:?}", node.json(&["status"]).map(|s| s["port_mappings"].clone())));
    eprintln!("mapped: {}", Value::Array(_mapped.clone()));
    let confirmed = wait_for(Duration::from_secs(60), || {
        let status = node.json(&["status"])?;
        let external: Vec<String> = status["external_addrs"].as_array()?.iter().filter_map(|a| a.as_str().map(String::from)).collect();
        external.iter().any(|a| a.starts_with(&format!("/ip4/{wan}/"))).then_some(external)
    })
    .unwrap_or_else(|| panic!("AutoNAT confirms the mapped address: {:?}", node.json(&["status"])));
    eprintln!("confirmed external addresses: {confirmed:?}");

    // A peer that never heard from the node finds it in the DHT and dials it: the only way in is
    // the mapping (the router drops everything unmapped).
    let probe = Node::start(bin, &probe_host.ns, &work.path().join("probe"), &lab_args(&["--bootstrap", &bootstrap])).unwrap();
    let found = wait_for(Duration::from_secs(30), || probe.json(&["find", &node.peer_id]).filter(|r| r["found"] == true))
        .unwrap_or_else(|| panic!("the probe finds the node in the DHT: {:?}", probe.cli(&["find", &node.peer_id])));
    eprintln!("the probe found the node at {}", found["addrs"]);
    let ping = probe.cli(&["ping", &node.peer_id, "-c", "1"]);
    assert!(ping.is_ok(), "the probe reaches the node: {ping:?}");
    let peers = probe.json(&["peers"]).unwrap();
    let to_node = peers.as_array().unwrap().iter().find(|p| p["peer_id"] == node.peer_id.as_str()).cloned().expect("connected to the node");
    eprintln!("the probe's connections to the node: {to_node}");
    let connections = to_node["connections"].as_array().unwrap();
    assert!(
        connections.iter().any(|c| c["path"] == "direct" && c["direction"] == "outbound" && c["address"].as_str().unwrap().contains(&format!("/ip4/{wan}/"))),
        "the probe dialed the node directly at the mapped address: {to_node}"
    );
    assert_eq!(node.json(&["status"]).unwrap()["hole_punch"]["attempts"], 0, "no punch was needed");

    // A clean shutdown removes the mappings, as the router's own table shows (`upnpc -l` lists
    // every redirection miniupnpd holds, PCP's included).
    let redirections = || -> Vec<String> {
        let out = std::process::Command::new("ip").args(["netns", "exec", &site.hosts[0].ns, "upnpc", "-i", "-l"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("4001->")).map(|l| l.trim().to_string()).collect()
    };
    let before = redirections();
    assert_eq!(before.len(), 2, "the router holds the QUIC and TCP mappings: {before:?}");
    node.terminate();
    assert_eq!(redirections(), Vec::<String>::new(), "removed on shutdown (were {before:?})");
    drop(probe);
    drop(boot);
    lab.teardown();
}

/// `warren netcheck` in one site of every kind, each node a plain `warren up --bootstrap …`:
/// each says what its site is. A router that grants mappings but forwards nothing must not make
/// its node believe it is public; NAT-PMP alone and PCP alone each make theirs reachable.
#[test]
fn netcheck_tells_every_kind_of_site_apart() {
    if skipped() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let opts = lab_options(work.path(), Vec::new(), false);
    let mut kinds = SiteKind::all().to_vec();
    kinds.extend([SiteKind::NatPmp, SiteKind::Pcp, SiteKind::MapsButDrops]);
    let answers = warren_natlab::netcheck::run(&opts, &kinds).expect("the lab builds (root, nftables, miniupnpd-nftables)");
    eprintln!("{}", warren_natlab::netcheck::markdown(&answers));
    for answer in &answers {
        let netcheck = answer.netcheck.as_ref().unwrap_or_else(|e| panic!("{}: no answer: {e}", answer.kind.name()));
        assert_eq!(answer.nat_type(), answer.expected, "{}: {netcheck:#}", answer.kind.name());
        assert!(!netcheck["verdict"].as_str().unwrap_or_default().is_empty(), "a verdict for {}", answer.kind.name());
    }
    let of = |kind: SiteKind| answers.iter().find(|a| a.kind == kind).unwrap().netcheck.as_ref().unwrap();
    // The details behind the types.
    assert_eq!(of(SiteKind::Symmetric)["mapping"], "endpoint-dependent");
    assert_eq!(of(SiteKind::Eim)["mapping"], "endpoint-independent");
    assert_eq!(of(SiteKind::Eim)["double_nat"], false, "the hop after the router is public: {:#}", of(SiteKind::Eim)["hops"]);
    assert_eq!(of(SiteKind::DoubleNat)["double_nat"], true);
    assert_eq!(of(SiteKind::UdpBlocked)["udp"], "blocked");
    assert_eq!(of(SiteKind::NatPmp)["port_mapping"]["protocol"], "natpmp", "NAT-PMP alone: {:#}", of(SiteKind::NatPmp)["port_mapping"]);
    assert_eq!(of(SiteKind::Pcp)["port_mapping"]["protocol"], "pcp");
    let drops = of(SiteKind::MapsButDrops);
    assert_eq!(drops["port_mapping"]["protocol"], "pcp", "the router did grant a mapping: {drops:#}");
    let wan = drops["port_mapping"]["external"][0].as_str().unwrap().split(':').next().unwrap().to_string();
    assert!(
        drops["confirmed_addrs"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|a| a.as_str())
            .filter(|a| !a.contains("/p2p-circuit"))
            .all(|a| !a.starts_with(&format!("/ip4/{wan}/"))),
        "a mapping that forwards nothing is never confirmed: {drops:#}"
    );
    // Every relay known has a round trip, and one is preferred.
    let eim = of(SiteKind::Eim);
    assert!(eim["preferred_relay"].is_string() && eim["relays"][0]["rtt_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{eim:#}");
}

/// A router granting short PCP leases (PCP alone, 40 s): the node renews its mappings before
/// they end, again and again, so they are still in the router's table after several leases;
/// and a clean shutdown removes them from the table.
#[test]
fn short_port_mapping_leases_are_renewed_and_removed_on_shutdown() {
    use warren_natlab::nodes::{Node, wait_for};
    use warren_natlab::upnp::SHORT_LEASE;
    let Some(SiteWithNode { work: _work, mut lab, site, boot, bootstrap: _, mut node }) = site_with_node(SiteKind::Pcp) else { return };
    let router = site.edge.clone().unwrap();
    // The router's own table: the DNAT rules miniupnpd keeps for each mapping.
    let router_table = || -> Vec<String> {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &router, "nft", "list", "chain", "inet", warren_natlab::upnp::MINIUPNPD_TABLE, "prerouting_miniupnpd"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("dnat")).map(|l| l.trim().to_string()).collect()
    };
    let lease_left = |node: &Node| -> Option<Vec<u64>> {
        let status = node.json(&["status"])?;
        let mappings = status["port_mappings"].as_array()?;
        (mappings.len() == 2 && mappings.iter().all(|m| m["protocol"] == "pcp"))
            .then(|| mappings.iter().map(|m| m["lease_left_secs"].as_u64().unwrap()).collect())
    };
    let first = wait_for(Duration::from_secs(30), || lease_left(&node)).unwrap_or_else(|| panic!("PCP maps both ports: {:?}", node.json(&["status"])));
    assert!(first.iter().all(|left| *left <= SHORT_LEASE.as_secs()), "the router's short lease is what counts: {first:?}");
    let mapped = router_table();
    eprintln!("mapped, lease left {first:?} s; the router holds {mapped:#?}");
    assert_eq!(mapped.len(), 2, "the router holds the QUIC and TCP mappings: {mapped:?}");

    // Watch three leases go by: each time the lease left jumps back up, the node renewed.
    let mut renewals = 0;
    let mut last = first.iter().copied().min().unwrap();
    let watch_until = std::time::Instant::now() + SHORT_LEASE * 3;
    while std::time::Instant::now() < watch_until {
        if let Some(left) = lease_left(&node) {
            let least = left.iter().copied().min().unwrap();
            if least > last {
                renewals += 1;
            }
            last = least;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let still = router_table();
    eprintln!("after {:?}: {renewals} renewals seen; the router holds {still:#?}", SHORT_LEASE * 3);
    assert!(renewals >= 3, "renewed before every lease ran out ({renewals} renewals in three leases)");
    assert_eq!(still.len(), 2, "still mapped three leases later: {still:?}");
    node.terminate();
    assert_eq!(router_table(), Vec::<String>::new(), "removed on shutdown (were {still:?})");
    drop(boot);
    lab.teardown();
}
