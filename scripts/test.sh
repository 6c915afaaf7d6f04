#!/usr/bin/env bash
# The test command (npm test): installs what the tests need, then runs every test with node's runner.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_packages chromium:chromium curl:curl dig:dnsutils dnsperf:dnsperf getent:libc-bin unshare:util-linux prlimit:util-linux setpriv:util-linux haproxy:haproxy nginx:nginx-light wrk:wrk ip:iproute2 iptables:iptables chattr:e2fsprogs
ensure_node_modules
ensure_consul
log "consul: $CONSUL_BIN"
log "type-checking agent and tests (tsc -p test/tsconfig.json)"
npx tsc -p test/tsconfig.json

if [ $# -gt 0 ]; then
  files=("$@")
else
  mapfile -t files < <(find test/unit test/integration test/faults test/lab -name '*.test.ts' 2>/dev/null | sort)
fi
log "running ${#files[@]} test files"
exec node --import tsx --test --test-timeout=600000 --test-reporter=spec "${files[@]}"
