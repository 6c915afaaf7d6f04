#!/usr/bin/env bash
# Benchmarks (npm run bench [-- --json] [-- --no-convergence]): a real Consul dev agent, loopmesh,
# HAProxy, an nginx backend and wrk, all on loopback. Prints markdown tables (JSON with --json).
# BENCH_SECONDS (per round, case and target), BENCH_ROUNDS, BENCH_WORKERS and BENCH_CHANGES tune it.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_packages curl:curl dig:dnsutils nginx:nginx-light wrk:wrk haproxy:haproxy
ensure_node_modules
ensure_consul
exec node --import tsx test/bench/bench.ts "$@"
