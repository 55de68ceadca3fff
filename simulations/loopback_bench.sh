#!/usr/bin/env bash
# Measures, on loopback, with a release build:
#  1. cold start to the first successful `warren find` among 5 nodes (4 bootstrapped from the first),
#     and to the moment every node finds every other;
#  2. idle RSS and CPU of a node with 50 peers (the hub every other node bootstrapped from).
# Usage: simulations/loopback_bench.sh [IDLE_SECONDS]   (default 30)
set -euo pipefail
cd "$(dirname "$0")/.."
idle=${1:-30}
cargo build --release -q -p warren-node
bin=$PWD/target/release/warren
work=$(mktemp -d /tmp/warren-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; wait "$p" 2>/dev/null; done; rm -rf "$work"; }
trap cleanup EXIT

now() { date +%s.%N; }
start_node() { # dir, extra args...
  local dir=$1; shift
  RUST_LOG=error "$bin" --data-dir "$dir" up --no-mdns --dht-mode server \
    --listen /ip4/127.0.0.1/udp/0/quic-v1 --listen /ip4/127.0.0.1/tcp/0 "$@" >"$dir.out" 2>&1 &
  pids+=($!)
}
wait_status() { until "$bin" --data-dir "$1" status >/dev/null 2>&1; do sleep 0.01; done; }
quic_addr() { grep -m1 -o '/ip4/127.0.0.1/udp/[0-9]*/quic-v1/p2p/[A-Za-z0-9]*' "$1.out"; }
id_of() { "$bin" --data-dir "$1" id; }

echo "== cold start: 5 nodes"
t0=$(now)
start_node "$work/n0"; wait_status "$work/n0"
until quic_addr "$work/n0" >/dev/null; do sleep 0.01; done
boot=$(quic_addr "$work/n0")
for i in 1 2 3 4; do start_node "$work/n$i" --bootstrap "$boot"; done
for i in 1 2 3 4; do wait_status "$work/n$i"; done
ids=(); for i in 0 1 2 3 4; do ids+=("$(id_of "$work/n$i")"); done
until "$bin" --data-dir "$work/n4" find "${ids[3]}" >/dev/null 2>&1; do sleep 0.01; done
t1=$(now)
for i in 0 1 2 3 4; do for j in 0 1 2 3 4; do
  [ $i = $j ] && continue
  until "$bin" --data-dir "$work/n$i" find "${ids[$j]}" >/dev/null 2>&1; do sleep 0.01; done
done; done
t2=$(now)
printf 'first successful find (n4 finds n3): %.0f ms after the first process started\n' "$(echo "($t1-$t0)*1000" | bc)"
printf 'all 20 pairs found:                  %.0f ms\n' "$(echo "($t2-$t0)*1000" | bc)"
for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; wait "$p" 2>/dev/null; done; pids=()

echo "== idle hub with 50 peers"
start_node "$work/hub"; wait_status "$work/hub"
until quic_addr "$work/hub" >/dev/null; do sleep 0.01; done
boot=$(quic_addr "$work/hub")
hub=${pids[0]}
for i in $(seq 1 50); do start_node "$work/p$i" --bootstrap "$boot"; done
until [ "$("$bin" --data-dir "$work/hub" status --json | grep -o '"connected_peers": [0-9]*' | grep -o '[0-9]*$')" -ge 50 ]; do sleep 0.2; done
sleep 5 # let the DHT bootstrap traffic of the 50 newcomers settle before measuring idle cost
ticks() { awk '{print $14+$15}' "/proc/$hub/stat"; }
c0=$(ticks); t0=$(now); sleep "$idle"; c1=$(ticks); t1=$(now)
hz=$(getconf CLK_TCK)
rss=$(awk '/VmRSS/ {print $2}' "/proc/$hub/status")
peers=$("$bin" --data-dir "$work/hub" status --json | grep -o '"connected_peers": [0-9]*' | grep -o '[0-9]*$')
printf 'hub: %s connected peers, RSS %.1f MiB, CPU %.2f%% of one core over %ss idle\n' \
  "$peers" "$(echo "$rss/1024" | bc -l)" "$(echo "($c1-$c0)/$hz/($t1-$t0)*100" | bc -l)" "$idle"
