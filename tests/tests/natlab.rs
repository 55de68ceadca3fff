//! The NAT lab's representative subset (the full matrix is `natlab`, see simulations/natlab):
//! two EIM NATs punch through (QUIC and TCP racing; then TCP alone), fall back to the relay when
//! the direct path is cut and punch again when it returns, and a symmetric NAT, which defeats
//! hole punching, still gets the forward through the relay; then the whole lab restarts with its
//! data dirs and every forward works again. Real kernel NAT in network
//! namespaces; needs root. WARREN_SKIP_NETNS=1 skips it elsewhere. The UPnP site (miniupnpd on
//! an EIM router) is checked on its own.

mod common;

use std::time::Duration;

use warren_natlab::topo::SiteKind;
use warren_natlab::{Options, Pair, Transports, describe, markdown};

#[test]
fn nat_lab_subset_punches_through_eim_and_relays_through_symmetric() {
    if std::env::var("WARREN_SKIP_NETNS").is_ok_and(|v| v == "1") {
        eprintln!("skipped: WARREN_SKIP_NETNS=1");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let opts = Options {
        warren: common::BIN.into(),
        latency: Duration::from_millis(20),
        pairs: vec![
            Pair { repunch: true, ..Pair::new(SiteKind::Eim, SiteKind::Eim) },
            Pair { transports: Transports::Tcp, ..Pair::new(SiteKind::Eim, SiteKind::Eim) },
            Pair::new(SiteKind::Symmetric, SiteKind::Eim),
        ],
        work_dir: work.path().to_path_buf(),
        keep_logs: false,
        restart: true,
    };
    let cells = warren_natlab::run(&opts, |cell| eprintln!("{:?} -> {:?}: {}", cell.a, cell.b, describe(cell)))
        .expect("the lab builds and runs (root, iproute2, nftables, /dev/net/tun)");
    eprintln!("{}", markdown(&cells, opts.latency));
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
    // Symmetric x EIM: direct is not expected (and not required); the forward must work either way.
    eprintln!("symmetric x EIM: {}", describe(symmetric));
    // The whole lab restarted with its data dirs: every forward works again, nobody re-ran a
    // command, and the punched pairs are direct again.
    for cell in &cells {
        let after = cell.after_restart.as_ref().expect("every cell was checked after the restart");
        assert!(after.reached && after.transfer_ok, "after the restart: {}", describe(cell));
    }
    for cell in [quic, tcp] {
        assert!(cell.after_restart.as_ref().unwrap().direct, "punched again after the restart: {}", describe(cell));
    }
    // Nothing of the lab is left behind.
    let left = std::process::Command::new("ip").args(["netns", "list"]).output().unwrap();
    let prefix = format!("{}{}-", warren_natlab::topo::PREFIX, std::process::id());
    assert!(!String::from_utf8_lossy(&left.stdout).contains(&prefix), "lab namespaces removed");
}

/// The UPnP site the port-mapping work will use: the real miniupnpd on an EIM router. Nothing
/// gets in unmapped; NAT-PMP tells the router's public address and maps a port that then carries
/// a connection from the wire; UPnP-IGD (miniupnpc's `upnpc`) reports the same address.
#[test]
fn upnp_site_maps_ports_on_request_and_drops_everything_else() {
    if std::env::var("WARREN_SKIP_NETNS").is_ok_and(|v| v == "1") {
        eprintln!("skipped: WARREN_SKIP_NETNS=1");
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
