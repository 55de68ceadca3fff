//! The DHT simulation's short run (the matrix is `simulations/dht-scale/run.sh`): real warren
//! nodes in one process over the in-process network, a third of them public, the rest behind
//! NATs reachable through relays, while nodes leave and join. Lookups and forward streams between
//! random live nodes must succeed, and an idle network must stay quiet.

use warren_dht_scale::{Params, run};

#[tokio::test(flavor = "multi_thread")]
async fn a_network_under_churn_finds_its_nodes_and_forwards_to_them_and_idles_quietly() {
    let root = tempfile::tempdir().unwrap();
    // All of the network replaced every 10 minutes: about 3 nodes leave during the run.
    let params = Params { nodes: 40, churn_per_10min: 1.0, measure_secs: 40, samples_per_sec: 2.0, ..Params::default() };
    let report = run(&params, root.path()).await.expect("the simulation runs");
    eprintln!("{}", warren_dht_scale::report::markdown(std::slice::from_ref(&report)));
    assert_eq!(report.unsettled, 0, "every node joined: public ones serve the DHT, NATed ones hold a relay reservation");
    assert!(report.departures >= 1, "nodes left while lookups ran");
    for (kind, outcomes) in [("find", &report.finds), ("forward", &report.forwards)] {
        assert!(outcomes.tried >= 30, "{kind}: only {} samples", outcomes.tried);
        assert!(outcomes.natted_ok >= 1, "{kind}: no NATed node was reached: {outcomes:?}");
        assert!(outcomes.rate() >= 95.0, "{kind}: {:.1} % succeeded: {:?}", outcomes.rate(), outcomes.failures);
    }
    // Background with nobody looking anything up: a node keeps no bootstrap connections and runs
    // no DHT bootstraps beyond its periodic refresh (before, each re-dialed every bootstrap peer
    // as its idle connection closed, about a dial a minute per bootstrap peer and node).
    assert!(report.idle_dials_per_node_per_min < 5.0, "an idle network dials {:.1} times per node per minute", report.idle_dials_per_node_per_min);
    // At rest a node holds its relay reservations and little else: connections that only carried
    // lookups close 10 s after them (with 60 s, a node of a 50-node network held 10.5).
    assert!(report.connections_per_node < 6.0, "{:.1} connections per node at rest", report.connections_per_node);
}
