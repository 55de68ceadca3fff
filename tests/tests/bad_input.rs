//! Every bad input ends with one clear line naming the bad value, a non-zero exit code, and
//! nothing on disk overwritten.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::{Node, warren};

/// Exit codes: 2 bad input, 3 no node running (see node/src/error.rs).
const BAD_INPUT: i32 = 2;
const NOT_RUNNING: i32 = 3;

fn assert_refused(out: &Output, code: i32, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    let first = stderr.lines().next().unwrap_or_default();
    assert!(first.starts_with("error"), "first line must be the error: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    }
}

fn up(dir: &Path, args: &[&str]) -> Output {
    let mut all = vec!["up", "--no-mdns"];
    all.extend(args);
    warren(dir, &all)
}

#[test]
fn an_unparsable_multiaddr_is_named() {
    let dir = tempfile::tempdir().unwrap();
    assert_refused(&up(dir.path(), &["--listen", "/ip4/300.1.2.3/tcp/1"]), BAD_INPUT, &["/ip4/300.1.2.3/tcp/1", "multiaddr"]);
    assert!(!dir.path().join("store").exists(), "a refused start must not create a store");
}

#[test]
fn a_bootstrap_address_without_p2p_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    assert_refused(&up(dir.path(), &["--bootstrap", "/ip4/127.0.0.1/tcp/4001"]), BAD_INPUT, &["/ip4/127.0.0.1/tcp/4001", "/p2p/"]);
}

#[test]
fn a_malformed_peer_id_is_named() {
    let dir = tempfile::tempdir().unwrap();
    assert_refused(&warren(dir.path(), &["ping", "12D3KooNotAPeer"]), BAD_INPUT, &["12D3KooNotAPeer", "PeerId"]);
    assert_refused(&warren(dir.path(), &["find", "xyz"]), BAD_INPUT, &["xyz", "PeerId"]);
}

#[test]
fn a_port_in_use_is_named_and_leaves_no_trace() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("/ip4/127.0.0.1/tcp/{port}");
    assert_refused(&up(dir.path(), &["--listen", &addr]), BAD_INPUT, &[&addr, "already in use"]);
    assert!(!dir.path().join("store").exists());
}

#[test]
fn a_port_held_by_another_warren_node_is_refused() {
    let first = Node::start(&["--listen", "/ip4/127.0.0.1/tcp/0"]);
    let addr = first.status()["listen_addrs"][0].as_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    assert_refused(&up(dir.path(), &["--listen", &addr]), BAD_INPUT, &[&addr, "already in use"]);
}

#[test]
fn a_data_dir_that_cannot_be_created_is_named() {
    let out = warren(Path::new("/proc/warren-test/data"), &["up", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"]);
    assert_refused(&out, BAD_INPUT, &["/proc/warren-test/data", "--data-dir"]);
}

#[test]
fn a_read_only_data_dir_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    // Root ignores permission bits, so as root make the directory a read-only mount.
    let mounted = is_root()
        && std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,size=1m", "warren-test-ro"])
            .arg(&ro)
            .status()
            .is_ok_and(|s| s.success());
    if !mounted {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    let out = up(&ro, &["--listen", "/ip4/127.0.0.1/tcp/0"]);
    if mounted {
        let _ = std::process::Command::new("umount").arg(&ro).status();
    }
    assert_refused(&out, BAD_INPUT, &[ro.to_str().unwrap(), "not writable"]);
}

#[test]
fn a_corrupt_config_file_is_named_and_left_as_it_was() {
    let node_dir = tempfile::tempdir().unwrap();
    let mut node = Node::start_in(node_dir.path(), &[]);
    node.stop();
    let identity = std::fs::read(node_dir.path().join("identity.key")).unwrap();
    let config = node_dir.path().join("config.toml");
    let garbage = "listen = [\"/ip4/0.0.0.0/tcp/4001\"\nmdns = maybe\n";
    std::fs::write(&config, garbage).unwrap();
    assert_refused(&up(node_dir.path(), &[]), BAD_INPUT, &[config.to_str().unwrap(), "invalid"]);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), garbage);
    assert_eq!(std::fs::read(node_dir.path().join("identity.key")).unwrap(), identity);
}

#[test]
fn a_command_with_no_node_running_fails_within_a_second_saying_how_to_start_one() {
    let dir = tempfile::tempdir().unwrap();
    for args in [&["status"][..], &["peers"], &["id"], &["find", "12D3KooWGkA6XnaHC9ScTaWy3z98AwpqReg3dTFX4p8SbnyAvYrN"]] {
        let started = Instant::now();
        let out = warren(dir.path(), args);
        let took = started.elapsed();
        assert_refused(&out, NOT_RUNNING, &["no warren node is running", "warren up"]);
        assert!(took < Duration::from_secs(1), "{args:?} took {took:?}");
    }
    // A socket left behind by a killed node counts as not running too.
    let mut node = Node::start_in(dir.path(), &[]);
    node.kill9();
    assert!(dir.path().join("warren.sock").exists());
    assert_refused(&warren(dir.path(), &["status"]), NOT_RUNNING, &["no warren node is running"]);
    // ...and does not stop the next start.
    let _again = Node::start_in(dir.path(), &[]);
}

#[test]
fn a_second_node_on_the_same_data_dir_is_refused() {
    let first = Node::start(&[]);
    let out = up(&first.dir, &["--listen", "/ip4/127.0.0.1/tcp/0"]);
    assert_refused(&out, BAD_INPUT, &["already", "--data-dir"]);
}

fn is_root() -> bool {
    std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// Whether a test that needs root for `what` may run: as root, yes; otherwise it is skipped
/// when the run asked to skip root-only tests (`WARREN_SKIP_NETNS`, as the README says), and
/// fails when it did not.
fn needs_root(what: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(std::env::var_os("WARREN_SKIP_NETNS").is_some(), "{what} needs root; as another user set WARREN_SKIP_NETNS=1");
    eprintln!("skipped: {what} needs root");
    false
}

/// The uid tests use for "another local user".
const OTHER_USER: u32 = 65534;

#[test]
fn a_data_dir_open_to_other_users_is_closed_and_the_key_kept_private() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shared");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut node = Node::start_in(&dir, &[]);
    node.stop();
    assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    assert_eq!(std::fs::metadata(dir.join("identity.key")).unwrap().mode() & 0o777, 0o600);
}

#[test]
fn a_data_dir_of_another_user_is_refused() {
    // Only root can hand a directory to another user; CI runs as root.
    if !needs_root("chown") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("theirs");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(OTHER_USER), Some(OTHER_USER)).unwrap();
    assert_refused(&up(&dir, &["--listen", "/ip4/127.0.0.1/tcp/0"]), BAD_INPUT, &[dir.to_str().unwrap(), "belongs to user 65534"]);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "a refused start must leave the dir untouched");
}

#[test]
fn the_cli_talks_only_to_a_node_run_by_its_own_user() {
    if !needs_root("running a node as another user") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(tmp.path(), Some(OTHER_USER), Some(OTHER_USER)).unwrap();
    let dir = tmp.path();
    // The node of another user, on a data dir of theirs.
    let mut theirs = std::process::Command::new("setpriv")
        .args(["--reuid", &OTHER_USER.to_string(), "--regid", &OTHER_USER.to_string(), "--clear-groups"])
        .arg(common::BIN)
        .arg("--data-dir")
        .arg(dir)
        .args(["up", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("setpriv runs the node as another user");
    let as_them = |args: &[&str]| {
        std::process::Command::new("setpriv")
            .args(["--reuid", &OTHER_USER.to_string(), "--regid", &OTHER_USER.to_string(), "--clear-groups"])
            .arg(common::BIN)
            .arg("--data-dir")
            .arg(dir)
            .args(args)
            .output()
            .unwrap()
    };
    common::wait_until(Duration::from_secs(20), "the other user's node to answer them", || as_them(&["id"]).status.success());
    // Root's CLI does not hand commands to another user's process.
    let out = warren(dir, &["status"]);
    let _ = theirs.kill();
    let _ = theirs.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("served by user 65534") && stderr.contains("refusing"), "{stderr}");
}
