#!/usr/bin/env bash
# The demo (npm run demo): a throw-away Consul dev agent, two demo backends registered as "web",
# and loopmesh serving web.local. Stays up until Ctrl-C; DEMO_SECONDS=N stops it after N seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_packages curl:curl dig:dnsutils
ensure_node_modules
ensure_consul

demo=$(mktemp -d "${TMPDIR:-/tmp}/loopmesh-demo.XXXXXX")
pids=()
cleanup() {
  # A second Ctrl-C (or npm passing the signal on) must not cut the clean-up short.
  trap '' INT TERM HUP
  trap - EXIT
  log "stopping the demo"
  # A hot-restarted agent (kill -USR2) is a new process with a new pid: found by its run dir.
  mapfile -t successors < <(pgrep -f -- "--run-dir $demo/run" 2>/dev/null || true)
  pids+=("${successors[@]}")
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  # Bounded: a process that does not stop within 10 s is killed, so the hosts block is always removed.
  for _ in $(seq 1 50); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.2
  done
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # Not a child of this shell: wait for it by polling, so that it cannot write the block again after.
  for _ in $(seq 1 50); do pgrep -f -- "--run-dir $demo/run" >/dev/null 2>&1 || break; sleep 0.2; done
  if [ -n "${HOSTS_FILE:-}" ] && [ -d "$demo/run" ]; then
    # Leave the hosts file as we found it: only the demo agent's own block goes (another agent's stays).
    # In a session of its own, so that another Ctrl-C from the terminal does not reach it.
    setsid -w node --input-type=module -e '
      const { realpath } = await import("node:fs/promises");
      const { removeOwnedHostsBlock } = await import("./dist/agent/dns/hosts-file.js");
      await removeOwnedHostsBlock(process.argv[1], { owner: await realpath(process.argv[2]) });
    ' "$HOSTS_FILE" "$demo/run" || log "could not remove the demo block from $HOSTS_FILE; remove the lines from # BEGIN loopmesh to # END loopmesh by hand"
  fi
  rm -rf "$demo"
}
trap cleanup EXIT INT TERM HUP

free_port() { node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'; }
CONSUL_PORT=${CONSUL_PORT:-8500}
if curl -s -o /dev/null "http://127.0.0.1:$CONSUL_PORT/v1/status/leader"; then
  CONSUL_PORT=$(free_port)
  log "port 8500 is taken; the demo's Consul uses $CONSUL_PORT"
fi
export CONSUL_HTTP_ADDR="http://127.0.0.1:$CONSUL_PORT"

log "starting a Consul dev agent on $CONSUL_HTTP_ADDR"
"$CONSUL_BIN" agent -dev -bind=127.0.0.1 -client=127.0.0.1 -node=demo -log-level=warn \
  -hcl "ports { http = $CONSUL_PORT, dns = -1, grpc = -1, grpc_tls = -1, serf_lan = $(free_port), serf_wan = $(free_port), server = $(free_port) }" \
  >"$demo/consul.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  [ "$(curl -s "$CONSUL_HTTP_ADDR/v1/status/leader")" != "" ] && [ "$(curl -s "$CONSUL_HTTP_ADDR/v1/status/leader")" != '""' ] && break
  sleep 0.2
done

WEB_PORT=${WEB_PORT:-8080}
for i in 1 2; do
  port=$(free_port)
  node scripts/demo-backend.mjs "web-$i" "$port" &
  pids+=($!)
  curl -sf -X PUT "$CONSUL_HTTP_ADDR/v1/agent/service/register" -d @- >/dev/null <<JSON
{ "ID": "web-$i", "Name": "web", "Address": "127.0.0.1", "Port": $port,
  "Meta": { "loopmesh-port": "$WEB_PORT" },
  "Check": { "HTTP": "http://127.0.0.1:$port/health", "Interval": "2s", "Timeout": "1s" } }
JSON
  log "demo backend web-$i on 127.0.0.1:$port, registered in Consul as web"
done

if [ "$(id -u)" -eq 0 ] && [ -w /etc/hosts ]; then HOSTS_FILE=/etc/hosts; else HOSTS_FILE="$demo/hosts"; fi
DNS=127.0.0.1:${DNS_PORT:-8653}
ADMIN=127.0.0.1:${ADMIN_PORT:-9190}
# tee ignores Ctrl-C: killed with the rest of the terminal's process group, it would leave the agent
# writing its last log lines into a closed pipe, where it hung instead of exiting (the hosts block stayed).
node dist/agent/cli/main.js agent --run-dir "$demo/run" --hosts-file "$HOSTS_FILE" --dns "$DNS" --admin "$ADMIN" --log-level info \
  2> >(trap '' INT; exec tee "$demo/loopmesh.log" >&2) &
pids+=($!)

for _ in $(seq 1 100); do
  addr=$(dig @"${DNS%:*}" -p "${DNS#*:}" web.local +short +time=1 +tries=1 2>/dev/null || true)
  [ -n "$addr" ] && curl -sf --max-time 2 "http://$addr:$WEB_PORT/" >/dev/null 2>&1 && break
  sleep 0.2
done
[ -n "${addr:-}" ] || { log "web.local did not come up; see $demo/loopmesh.log"; exit 1; }
# Consul runs each instance's first check within its 2 s interval: wait until both are healthy.
web_backends() {
  curl -sf --max-time 2 "http://$ADMIN/v1/routes" | node -e 'let s="";process.stdin.on("data",(c)=>s+=c).on("end",()=>{const r=JSON.parse(s).routes.find((x)=>x.service==="web");process.stdout.write(String(r?r.healthyBackends:0))})'
}
for _ in $(seq 1 50); do [ "$(web_backends 2>/dev/null)" = 2 ] && break; sleep 0.2; done

cat <<TXT

  loopmesh demo is up.  web.local -> $addr:$WEB_PORT  (two instances behind it)

  Connect by name:
    $( [ "$HOSTS_FILE" = /etc/hosts ] && echo "curl http://web.local:$WEB_PORT/          # /etc/hosts has the loopmesh block" || echo "curl --resolve web.local:$WEB_PORT:$addr http://web.local:$WEB_PORT/   # not root: hosts block went to $HOSTS_FILE")
    dig @${DNS%:*} -p ${DNS#*:} web.local +short        # the DNS responder
    dig @${DNS%:*} -p ${DNS#*:} web.local SRV +short    # port by SRV
    node dist/agent/cli/main.js status --admin $ADMIN   # routes and backends

  Register your own service and it appears as NAME.local within a second:
    curl -X PUT $CONSUL_HTTP_ADDR/v1/agent/service/register -d '{"Name":"api","Port":9000}'

  Ctrl-C stops everything (Consul, backends, loopmesh) and removes the hosts block.
TXT

for _ in 1 2 3 4; do curl -s "http://$addr:$WEB_PORT/"; done

if [ -n "${DEMO_SECONDS:-}" ]; then
  sleep "$DEMO_SECONDS"
else
  wait "${pids[@]}"
fi
