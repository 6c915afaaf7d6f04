#!/usr/bin/env bash
# npm run bench:converge [-- --services S --instances I --changes N --json]: one change live by name at
# catalog scale (default 2,000 services x 5 instances, 100 changes), a real Consul dev agent and the
# built loopmesh agent. Prints a markdown table (JSON on stdout with --json).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_node_modules
ensure_consul
exec node --import tsx test/bench/converge.ts "$@"
