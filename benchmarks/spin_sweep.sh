#!/usr/bin/env bash
# How the spin budget (seconds a blocking call busy-waits before it sleeps) trades
# throughput against latency: 3 alternating rounds over the values.
#   bash benchmarks/spin_sweep.sh [python]
py=${1:-python3}
for round in 1 2 3; do
  for spin in 0 0.000002 0.000005 0.00001 0.00002 0.00005; do
    tp=$("$py" -m ipc_ring bench --messages 1000000 --spin "$spin" | head -1)
    lat=$("$py" -m ipc_ring bench --latency --messages 20000 --latency-samples 500 --spin "$spin" | head -1)
    echo "round $round spin=$spin throughput=$tp latency=$lat"
  done
done
