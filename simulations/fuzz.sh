#!/usr/bin/env bash
# Fuzzes the forward protocol's decoders (protocols/forward/fuzz, target request_decoder: request
# and reply frames, datagram frames, chunk headers) with cargo-fuzz (libFuzzer).
#   simulations/fuzz.sh [RUNS]     (default 10000000 executions)
# Installs cargo-fuzz if missing. Works on stable Rust through RUSTC_BOOTSTRAP=1 (cargo-fuzz needs
# nightly flags). Seeds from protocols/forward/tests/corpus; afterwards the corpus is minimised and
# copied back there, so `cargo test` replays it. A crash stops the run and leaves its input in
# protocols/forward/fuzz/artifacts/: add it to tests/corpus (as a regression test) with the fix.
set -euo pipefail
cd "$(dirname "$0")/../protocols/forward"
runs=${1:-10000000}
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
toolchain_is_nightly=$(rustc --version | grep -c nightly || true)
[ "$toolchain_is_nightly" = 1 ] || export RUSTC_BOOTSTRAP=1
work=fuzz/corpus/request_decoder
mkdir -p "$work"
cp tests/corpus/* "$work"/
# No sanitizer: the decoders are safe Rust (the workspace forbids unsafe), so AddressSanitizer
# would only slow the run; panics, overflows (debug assertions on) and timeouts are what we seek.
cargo fuzz run --sanitizer none --debug-assertions request_decoder "$work" -- \
  -runs="$runs" -max_len=4096 -timeout=5 -print_final_stats=1 2>&1 | tee /tmp/warren-fuzz.log | grep -aE "^(#[0-9]+[[:space:]]+(INITED|DONE)|stat::|==|SUMMARY|Done)" || true
grep -q "Done $runs runs" /tmp/warren-fuzz.log || { echo "fuzzing did not finish cleanly: see /tmp/warren-fuzz.log"; exit 1; }
# Keep the corpus small: merge into a fresh directory (libFuzzer keeps one input per new coverage).
rm -rf fuzz/corpus/min && mkdir -p fuzz/corpus/min
cargo fuzz run --sanitizer none request_decoder fuzz/corpus/min "$work" -- -merge=1 2>/dev/null >/dev/null
for f in fuzz/corpus/min/*; do cp "$f" "tests/corpus/fuzz-$(basename "$f" | cut -c1-16)"; done
echo "corpus: $(ls fuzz/corpus/min | wc -l) inputs, $(du -sb fuzz/corpus/min | cut -f1) bytes, copied to protocols/forward/tests/corpus"
