#!/usr/bin/env bash
# The DHT at scale, as a matrix: every N in NODES at every churn rate in CHURNS, each run
# appended to results/runs.jsonl, then the table and plots rendered into results/.
# NODES="300 500" CHURNS="0 0.1 0.2" MEASURE=600 simulations/dht-scale/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
NODES=${NODES:-"100 200"}
CHURNS=${CHURNS:-"0 0.1 0.2"}
# 600 s: long enough for every node's routing-table refresh (every 10 min ±25 %) to fall in it.
MEASURE=${MEASURE:-600}
cargo build --release -p warren-dht-scale
out=simulations/dht-scale/results
mkdir -p "$out"
for n in $NODES; do
  for churn in $CHURNS; do
    echo "== $n nodes, churn $churn per 10 min, $MEASURE s" >&2
    target/release/dht-scale --nodes "$n" --churn "$churn" --measure-secs "$MEASURE" --out "$out/runs.jsonl"
  done
done
target/release/dht-scale render "$out/runs.jsonl" "$out"
