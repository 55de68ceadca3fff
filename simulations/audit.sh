#!/usr/bin/env bash
# Checks every dependency (Cargo.lock, and the fuzz crates') against the RustSec advisories.
#   simulations/audit.sh refresh [ADVISORY_DB_CHECKOUT]
#       Refreshes .ci/advisory-db/, the snapshot CI audits against: the advisories of every crate
#       in our lock files, copied from a checkout of https://github.com/rustsec/advisory-db
#       (cloned here when not given; needs network). Run it at release time and commit the result.
#   simulations/audit.sh [check]
#       Audits against that snapshot, offline (what the test tests/tests/supply_chain.rs runs).
# Installs cargo-audit if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
snapshot=.ci/advisory-db
locks=(Cargo.lock protocols/forward/fuzz/Cargo.lock protocols/punch/fuzz/Cargo.lock)
command -v cargo-audit >/dev/null || cargo install --locked cargo-audit
# Every crate named in our lock files, sorted in the C locale (the CRATES file compares to it).
lock_crates() { sed -n 's/^name = "\(.*\)"$/\1/p' "${locks[@]}" | LC_ALL=C sort -u; }

case "${1:-check}" in
refresh)
  source=${2:-}
  if [ -z "$source" ]; then
    source=$(mktemp -d /tmp/advisory-db.XXXXXX)
    git clone -q --depth 1 https://github.com/rustsec/advisory-db "$source"
  fi
  rm -rf "$snapshot" && mkdir -p "$snapshot/crates"
  cp "$source/support.toml" "$snapshot/" 2>/dev/null || true
  crates=$(lock_crates)
  for crate in $crates; do
    [ -d "$source/crates/$crate" ] && cp -r "$source/crates/$crate" "$snapshot/crates/"
  done
  (cd "$source" && git log -1 --format='%H %cI' 2>/dev/null || echo "unknown revision") > "$snapshot/REVISION"
  echo "$crates" > "$snapshot/CRATES"
  echo "snapshot: $(find "$snapshot/crates" -name '*.md' | wc -l) advisories for $(ls "$snapshot/crates" | wc -l) of our $(echo "$crates" | wc -w) crates, advisory-db $(cut -c1-12 "$snapshot/REVISION")"
  ;;
check)
  # Crates added since the snapshot was taken have had no advisories looked up: say which.
  if [ -f "$snapshot/CRATES" ]; then
    uncovered=$(lock_crates | LC_ALL=C comm --nocheck-order -23 - "$snapshot/CRATES" | tr '\n' ' ')
    [ -z "$uncovered" ] || echo "warning: not covered by the advisory snapshot (run simulations/audit.sh refresh): $uncovered"
  fi
  for lock in "${locks[@]}"; do
    echo "== $lock (advisory-db $(cut -c1-12 "$snapshot/REVISION"))"
    # The snapshot is not a git checkout, so cargo-audit is told not to fetch and not to judge
    # its age (REVISION says how old it is).
    cargo audit --db "$snapshot" --no-fetch --stale --file "$lock"
  done
  ;;
*) echo "usage: $0 [check | refresh [ADVISORY_DB_CHECKOUT]]" >&2; exit 2 ;;
esac
