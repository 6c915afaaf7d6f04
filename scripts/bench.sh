#!/usr/bin/env bash
# Benchmarks (npm run bench): a real Consul dev agent, loopmesh, nginx backends and wrk, all on
# loopback. Prints markdown tables. BENCH_SECONDS, BENCH_CONNECTIONS and BENCH_CHANGES tune the runs.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_packages curl:curl dig:dnsutils nginx:nginx-light wrk:wrk
ensure_node_modules
ensure_consul
exec node --import tsx test/bench/bench.ts
