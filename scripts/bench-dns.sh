#!/usr/bin/env bash
# DNS benchmark (npm run bench:dns [-- --json]): loopmesh's DNS responder (a `loopmesh balancer`
# process) against dnsmasq answering the same names from a hosts file, both driven by dnsperf with
# the same query list, in interleaved rounds (each loopmesh run between two dnsmasq runs), dnsperf
# pinned to the first CPU and both servers to the last (taskset). Prints a markdown table and each
# round's ratio (JSON on stdout with --json). BENCH_DNS_SECONDS, BENCH_DNS_ROUNDS, BENCH_DNS_NAMES,
# BENCH_DNS_CLIENTS, BENCH_DNS_OUTSTANDING, BENCH_DNS_QPS and BENCH_DNS_PIN tune it (see
# test/bench/dns.ts).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

# dnsmasq-base: the dnsmasq binary without Debian's service (which would start and take port 53);
# the benchmark runs its own dnsmasq on a free port and stops it.
ensure_packages dnsperf:dnsperf dnsmasq:dnsmasq-base dig:dnsutils taskset:util-linux
ensure_node_modules
exec node --import tsx test/bench/dns.ts "$@"
