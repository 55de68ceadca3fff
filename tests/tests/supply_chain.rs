//! Every dependency is checked against the RustSec advisories in `.ci/advisory-db` (a snapshot of
//! the advisories for our crates, refreshed at release time by `simulations/audit.sh refresh`):
//! a known vulnerability fails the suite; "unmaintained" notices are printed, not failed.

use std::process::Command;

#[test]
fn no_dependency_has_a_known_vulnerability() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root");
    let installed = Command::new("cargo").args(["audit", "--version"]).output().is_ok_and(|o| o.status.success());
    if !installed {
        assert!(std::env::var_os("CI").is_none(), "CI must have cargo-audit (.ci/run installs it)");
        eprintln!("skipped: cargo-audit is not installed (cargo install --locked cargo-audit)");
        return;
    }
    let out = Command::new("bash").arg(root.join("simulations/audit.sh")).arg("check").output().expect("run the audit");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{report}");
    assert!(out.status.success(), "cargo audit found a vulnerable dependency:\n{report}");
    assert!(report.contains("Scanning Cargo.lock"), "the audit ran: {report}");
}
