//! The store survives `kill -9` at any moment.

mod common;

use std::time::Duration;

use common::{Node, wait_until, warren};

#[test]
fn kill_9_during_heavy_peer_store_writes_twenty_times_never_breaks_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let mut expected_id: Option<String> = None;
    let mut stored_before = 0;
    for round in 0..20u64 {
        let mut node = Node::start_in(dir.path(), &[]);
        let status = node.status();
        match &expected_id {
            None => expected_id = Some(node.peer_id.clone()),
            Some(id) => assert_eq!(&node.peer_id, id, "round {round}: the identity changed"),
        }
        let stored = status["stored_peers"].as_u64().unwrap();
        if round > 0 {
            assert!(stored > 0 && stored + 4000 >= stored_before, "round {round}: the store lost its peers ({stored} after {stored_before})");
        }
        // Keep the writer busy: churn keeps every batch full of inserts and evictions.
        let writes_at_start = status["peer_store_writes"].as_u64().unwrap();
        let churn = warren(dir.path(), &["debug", "store-churn", "20000"]);
        assert!(churn.status.success(), "{}", String::from_utf8_lossy(&churn.stderr));
        wait_until(Duration::from_secs(10), "the writer to start writing", || {
            node.status()["peer_store_writes"].as_u64().unwrap() > writes_at_start
        });
        let _ = warren(dir.path(), &["debug", "store-churn", "20000"]);
        // Vary the moment of the kill across the writer's batch/flush cycle.
        std::thread::sleep(Duration::from_millis(37 * (round % 9)));
        node.kill9();
        stored_before = stored;
    }
}
