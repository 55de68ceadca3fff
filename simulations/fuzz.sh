#!/usr/bin/env bash
# Fuzzes what remote peers send, with cargo-fuzz (libFuzzer):
#   forward: the forward protocol's decoders (protocols/forward/fuzz, target request_decoder:
#            request and reply frames, datagram frames, chunk headers);
#   punch:   the birthday punch's decoders (protocols/punch/fuzz, target punch_decoder: message
#            bodies, frames, UDP probes).
#   simulations/fuzz.sh [forward|punch|all] [RUNS]     (default: all, 10000000 executions each)
# Installs cargo-fuzz if missing. Works on stable Rust through RUSTC_BOOTSTRAP=1 (cargo-fuzz needs
# nightly flags). Seeds from the crate's tests/corpus; afterwards the corpus is minimised and
# copied back there, so `cargo test` replays it. A crash stops the run and leaves its input in
# the crate's fuzz/artifacts/: add it to tests/corpus (as a regression test) with the fix.
set -euo pipefail
cd "$(dirname "$0")/.."
which=${1:-all}
if [[ "$which" =~ ^[0-9]+$ ]]; then runs=$which; which=all; else runs=${2:-10000000}; fi
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
toolchain_is_nightly=$(rustc --version | grep -c nightly || true)
[ "$toolchain_is_nightly" = 1 ] || export RUSTC_BOOTSTRAP=1

fuzz() { # crate directory, target
  local dir=$1 target=$2 log=/tmp/warren-fuzz-$2.log
  (
    cd "$dir"
    local work=fuzz/corpus/$target
    mkdir -p "$work"
    cp tests/corpus/* "$work"/
    # No sanitizer: the decoders are safe Rust (the workspace forbids unsafe), so AddressSanitizer
    # would only slow the run; panics, overflows (debug assertions on) and timeouts are what we seek.
    cargo fuzz run --sanitizer none --debug-assertions "$target" "$work" -- \
      -runs="$runs" -max_len=4096 -timeout=5 -print_final_stats=1 2>&1 | tee "$log" | grep -aE "^(#[0-9]+[[:space:]]+(INITED|DONE)|stat::|==|SUMMARY|Done)" || true
    grep -q "Done $runs runs" "$log" || { echo "$target: fuzzing did not finish cleanly: see $log"; exit 1; }
    # Keep the corpus small: merge into a fresh directory (libFuzzer keeps one input per new coverage).
    rm -rf fuzz/corpus/min && mkdir -p fuzz/corpus/min
    cargo fuzz run --sanitizer none "$target" fuzz/corpus/min "$work" -- -merge=1 2>/dev/null >/dev/null
    for f in fuzz/corpus/min/*; do cp "$f" "tests/corpus/fuzz-$(basename "$f" | cut -c1-16)"; done
    echo "$target corpus: $(ls fuzz/corpus/min | wc -l) inputs, $(du -sb fuzz/corpus/min | cut -f1) bytes, copied to $dir/tests/corpus"
  )
}

case "$which" in
  forward) fuzz protocols/forward request_decoder ;;
  punch) fuzz protocols/punch punch_decoder ;;
  all) fuzz protocols/forward request_decoder && fuzz protocols/punch punch_decoder ;;
  *) echo "usage: simulations/fuzz.sh [forward|punch|all] [RUNS]" >&2; exit 2 ;;
esac
