#!/usr/bin/env bash
# The multi-node lab on one Linux host, as root, with network namespaces: a bridge, one namespace
# per node with its own address, a Consul server and Consul client agents, loopmesh on every node,
# and per-node /etc (hosts, resolv.conf, nsswitch.conf) through /etc/netns/NODE/. The server node
# also runs the proxy cluster: `loopmesh gateway` processes (gateway1, gateway2) that serve every
# service at addresses the nodes reach when their own loopmesh is down or cut off.
#
#   scripts/lab.sh up                         build it (idempotent) and wait until it works
#   scripts/lab.sh down                       remove everything it made (also after a failed up)
#   scripts/lab.sh status                     nodes, processes, Consul members, node1's routes
#   scripts/lab.sh exec NODE CMD...           run CMD on NODE (node1, server, or lm-node1)
#   scripts/lab.sh stop|start|restart NODE COMPONENT
#                                             COMPONENT: consul, loopmesh (the control plane,
#                                             `agent --render-only`), balancer (the data plane;
#                                             restart is a hot restart, SIGUSR2), web, redis, and
#                                             on server gateway1, gateway2 (restart: hot, SIGUSR2)
#   scripts/lab.sh kill NODE COMPONENT        SIGKILL: a crash (the process, its children and any
#                                             predecessor still draining); `start` brings it back
#   scripts/lab.sh spawn NODE NAME CMD...     a background process on NODE that `down` stops
#
# Environment: LAB_NODES (client nodes, default 3), LAB_PREFIX (default lm: namespaces lm-server,
# lm-node1..., bridge lm-br0), LAB_SUBNET (a /24, default 10.77.77.0/24: server .10, nodeN .10+N),
# LAB_STATE (pids, logs, data; default /run/loopmesh-lab, or /run/loopmesh-lab-PREFIX for another
# prefix). Another prefix and subnet give a second, independent lab (the tests use lmt, 10.77.78.0/24,
# and lmg, 10.77.79.0/24). LAB_GATEWAYS (0 to 4, default 2): gateway processes on the server node;
# gatewayK serves at SUBNET.(96 + 32K)/27 (.128/27, .160/27, ...), admin 127.0.0.1:919K.
set -euo pipefail
CALLER_PWD=$PWD
cd "$(dirname "$0")/.."
REPO=$PWD
. scripts/lib.sh
. scripts/provision/lib.sh

die() { printf 'lab.sh: error: %s\n' "$*" >&2; exit 1; }
say() { printf 'lab.sh: %s\n' "$*" >&2; }

LAB_PREFIX=${LAB_PREFIX:-lm}
LAB_NODES=${LAB_NODES:-3}
LAB_SUBNET=${LAB_SUBNET:-10.77.77.0/24}
if [ "$LAB_PREFIX" = lm ]; then LAB_STATE=${LAB_STATE:-/run/loopmesh-lab}; else LAB_STATE=${LAB_STATE:-/run/loopmesh-lab-$LAB_PREFIX}; fi

# Interface names have at most 15 characters: "v-" + prefix + "-server".
[[ $LAB_PREFIX =~ ^[a-z][a-z0-9]{0,5}$ ]] || die "LAB_PREFIX must be 1-6 lower-case letters or digits, starting with a letter; got '$LAB_PREFIX'"
[[ $LAB_NODES =~ ^[1-9][0-9]?$ ]] && [ "$LAB_NODES" -le 40 ] || die "LAB_NODES must be a number from 1 to 40; got '$LAB_NODES'"
[[ $LAB_SUBNET =~ ^(10|172|192)\.([0-9]{1,3})\.([0-9]{1,3})\.0/24$ ]] || die "LAB_SUBNET must be a private /24 such as 10.77.77.0/24; got '$LAB_SUBNET'"
NET=${LAB_SUBNET%.0/24}
[[ $LAB_STATE == /* && $LAB_STATE != / ]] || die "LAB_STATE must be an absolute path other than /; got '$LAB_STATE'"
LAB_GATEWAYS=${LAB_GATEWAYS:-2}
[[ $LAB_GATEWAYS =~ ^[0-4]$ ]] || die "LAB_GATEWAYS must be a number from 0 to 4; got '$LAB_GATEWAYS'"

# loopmesh runs unprivileged, as on the VMs: the balancer with CAP_NET_BIND_SERVICE only (ports 80 and
# 53), the control plane with no capability. LAB_LOOPMESH_USER=root runs both as root instead.
LAB_LOOPMESH_USER=${LAB_LOOPMESH_USER:-nobody}
id -u "$LAB_LOOPMESH_USER" >/dev/null 2>&1 || die "LAB_LOOPMESH_USER=$LAB_LOOPMESH_USER is not a user on this host"
LM_UID=$(id -u "$LAB_LOOPMESH_USER") LM_GID=$(id -g "$LAB_LOOPMESH_USER")
AS_USER=(setpriv --reuid="$LM_UID" --regid="$LM_GID" --clear-groups --no-new-privs)

BRIDGE=$LAB_PREFIX-br0
SERVER=$LAB_PREFIX-server
SERVER_ADDR=$NET.10
MAIN=$REPO/dist/agent/cli/main.js

# loopmesh runs as $LAB_LOOPMESH_USER, who may not be able to read the repository (a clone in /root
# or in a `mktemp -d` folder is private to root). Then the built app (dist, templates, package.json,
# node_modules) is copied to $LAB_STATE/app, readable by all, and run from there; every up and every
# start of a loopmesh component copies it again, so a rebuild is picked up as from the repository.
can_read_as_user() { "${AS_USER[@]}" node -e "require('fs').accessSync(process.argv[1], require('fs').constants.R_OK)" "$1" 2>/dev/null; }
stage_app() {
  if can_read_as_user "$REPO/dist/agent/cli/main.js"; then MAIN=$REPO/dist/agent/cli/main.js; return 0; fi
  local app=$LAB_STATE/app
  mkdir -p "$app.new"
  cp -a "$REPO/dist" "$REPO/templates" "$REPO/package.json" "$REPO/node_modules" "$app.new/"
  chmod -R a+rX "$app.new"
  rm -rf "$app.old"
  if [ -d "$app" ]; then mv "$app" "$app.old"; fi
  mv "$app.new" "$app"
  rm -rf "$app.old"
  chmod a+rx "$LAB_STATE"
  MAIN=$app/dist/agent/cli/main.js
  can_read_as_user "$MAIN" || die "loopmesh runs as $LAB_LOOPMESH_USER, who cannot read $MAIN either; set LAB_LOOPMESH_USER=root"
}
FORWARD_RULE=(FORWARD -i "$BRIDGE" -o "$BRIDGE" -m comment --comment "loopmesh-lab $LAB_PREFIX" -j ACCEPT)

nodes() { echo "$SERVER"; local i; for i in $(seq 1 "$LAB_NODES"); do echo "$LAB_PREFIX-node$i"; done; }
# The proxy cluster, on the server node: gatewayK serves at gateway_range K, admin on gateway_admin K.
gateways() { local k; for k in $(seq 1 "$LAB_GATEWAYS"); do echo "gateway$k"; done; }
gateway_base() { echo $((96 + 32 * $1)); } # last octet: 128, 160, 192, 224
gateway_range() { echo "$NET.$(gateway_base "$1")/27"; }
gateway_admin() { echo "127.0.0.1:$((9190 + $1))"; }
clients() { local i; for i in $(seq 1 "$LAB_NODES"); do echo "$LAB_PREFIX-node$i"; done; }
index_of() { case $1 in "$SERVER") echo 0 ;; *) echo "${1##*-node}" ;; esac; }
addr_of() { local i; i=$(index_of "$1"); echo "$NET.$((10 + i))"; }
in_ns() { local node=$1; shift; ip netns exec "$node" "$@"; }

# node1, server, lm-node1 -> lm-node1 (and it must be one of this lab's nodes).
node_name() {
  local arg=$1 n
  case $arg in "$LAB_PREFIX"-*) n=$arg ;; *) n=$LAB_PREFIX-$arg ;; esac
  nodes | grep -x -- "$n" >/dev/null || die "no node '$arg' in this lab; expected one of: $(nodes | tr '\n' ' ')"
  echo "$n"
}
# (No `grep -q` after a pipe: it stops reading early, the writer gets SIGPIPE, and pipefail fails the test.)
ns_exists() { ip netns list | awk '{print $1}' | grep -x -- "$1" >/dev/null; }
# Every namespace of this prefix, whatever LAB_NODES was when it was made.
lab_namespaces() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$LAB_PREFIX-(server|node[0-9]+)$" || true; }
roles_of() { local i; i=$(index_of "$1"); if [ "$i" -eq 0 ]; then echo $(gateways); return 0; fi; lm_demo_role "$i" "$LAB_NODES"; }

require_root() { [ "$(id -u)" -eq 0 ] || die "the lab makes network namespaces and a bridge: run it as root (sudo bash scripts/lab.sh $*)"; }

# ---- processes: ip netns exec NODE setsid CMD, pid in $LAB_STATE/NODE/NAME.pid, log next to it

pidfile() { echo "$LAB_STATE/$1/$2.pid"; }
alive() { # NODE NAME: the recorded process runs, in that node's namespace
  local f pid; f=$(pidfile "$1" "$2")
  [ -f "$f" ] || return 1
  pid=$(cat "$f")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && ip netns pids "$1" 2>/dev/null | grep -x -- "$pid" >/dev/null
}

# start_proc NODE NAME CMD...: starts CMD in NODE unless it already runs there.
start_proc() {
  local node=$1 name=$2; shift 2
  if alive "$node" "$name"; then return 0; fi
  mkdir -p "$LAB_STATE/$node"
  # setsid: its own session, so the lab's processes outlive this script and its terminal.
  # ip netns exec, setsid (not a group leader here) and env all exec, so $! is CMD's own pid.
  ip netns exec "$node" setsid "$@" </dev/null >>"$LAB_STATE/$node/$name.log" 2>&1 &
  local pid=$! tries=0
  echo "$pid" >"$(pidfile "$node" "$name")"
  # `ip netns exec` joins the namespace before it execs CMD, which on a loaded machine can take
  # well over 50 ms: until then the pid runs but is not yet in the namespace. Wait for it to
  # join (at most 10 s) and only call it dead when the process itself is gone.
  while ! alive "$node" "$name"; do
    kill -0 "$pid" 2>/dev/null || die "$name on $node exited at once; see $LAB_STATE/$node/$name.log: $(tail -n 5 "$LAB_STATE/$node/$name.log" 2>/dev/null)"
    tries=$((tries + 1))
    [ "$tries" -lt 200 ] || die "$name on $node (pid $pid) did not join namespace $node within 10 s"
    sleep 0.05
  done
  sleep 0.05
  alive "$node" "$name" || die "$name on $node exited at once; see $LAB_STATE/$node/$name.log: $(tail -n 5 "$LAB_STATE/$node/$name.log" 2>/dev/null)"
}

# stop_proc NODE NAME [GRACE_SECONDS]: SIGTERM, then SIGKILL after the grace period.
stop_proc() {
  local node=$1 name=$2 grace=${3:-20} f pid end
  f=$(pidfile "$node" "$name")
  if alive "$node" "$name"; then
    pid=$(cat "$f")
    kill -TERM "$pid" 2>/dev/null || true
    end=$((SECONDS + grace))
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 0.05; done
    if kill -0 "$pid" 2>/dev/null; then say "$name on $node did not stop within $grace s; killing it"; kill -KILL "$pid" 2>/dev/null || true; fi
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
  fi
  rm -f "$f"
}

register_in() { LM_EXEC=(ip netns exec "$1"); lm_register http://127.0.0.1:8500 "$2"; LM_EXEC=(); }
# The data plane's restart is a hot restart: SIGUSR2 makes the running balancer (or gateway) start a
# successor (same command line, user and capabilities) that takes over its listening sockets, then the
# old one stops accepting and drains its open connections (up to LOOPMESH_DRAIN_TIMEOUT) in the
# background. No new connection is refused. If the successor fails, the old one keeps serving and
# this says so.
hot_restart() {
  local node=$1 comp=$2 f pid successor end
  f=$(pidfile "$node" "$comp")
  pid=$(cat "$f")
  kill -USR2 "$pid"
  end=$((SECONDS + 20))
  successor=""
  while :; do
    [ -n "$successor" ] || successor=$(pgrep -P "$pid" 2>/dev/null | head -n 1 || true)
    if [ -n "$successor" ] && kill -0 "$successor" 2>/dev/null \
       && ! in_ns "$node" ss -lntupH 2>/dev/null | grep -F "pid=$pid," >/dev/null; then
      break
    fi
    if [ -z "$successor" ] && ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$f"
      die "the $comp on $node exited on SIGUSR2 without starting a successor (no hot restart in this build?); start it again: lab.sh start ${node#"$LAB_PREFIX"-} $comp; see $LAB_STATE/$node/$comp.log"
    fi
    [ $SECONDS -lt $end ] || die "the hot restart of the $comp on $node did not finish within 20 s; the old process (pid $pid) keeps serving; see $LAB_STATE/$node/$comp.log"
    if [ -n "$successor" ] && ! kill -0 "$successor" 2>/dev/null; then
      die "the new $comp on $node exited during the hot restart; the old process (pid $pid) keeps serving; see $LAB_STATE/$node/$comp.log"
    fi
    sleep 0.05
  done
  echo "$successor" >"$f"
  echo "$pid" >"$LAB_STATE/$node/$comp-draining-$pid.pid"
  say "$comp on $node: process $successor took over the sockets of $pid, which drains"
}

# kill_component NODE COMPONENT: SIGKILL, as a crash would: the recorded process, its descendants
# (a successor being started, workers) and predecessors still draining after a hot restart.
descendants() { local c; for c in $(pgrep -P "$1" 2>/dev/null || true); do echo "$c"; descendants "$c"; done; }
kill_component() {
  local node=$1 comp=$2 main f pid pids=()
  main=$(pidfile "$node" "$comp")
  for f in "$main" "$LAB_STATE/$node/$comp"-draining-*.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && ip netns pids "$node" 2>/dev/null | grep -x -- "$pid" >/dev/null; then
      # shellcheck disable=SC2207
      pids+=("$pid" $(descendants "$pid"))
    fi
    [ "$f" = "$main" ] || rm -f "$f"
  done
  rm -f "$main"
  if [ ${#pids[@]} -eq 0 ]; then say "$comp on $node does not run"; return 0; fi
  kill -KILL "${pids[@]}" 2>/dev/null || true
  local end=$((SECONDS + 10))
  for pid in "${pids[@]}"; do
    # Gone, or a zombie its parent has not reaped yet.
    while [ -e "/proc/$pid" ] && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] && [ $SECONDS -lt $end ]; do sleep 0.02; done
  done
  say "$comp on $node killed (SIGKILL): ${pids[*]}"
}

loopmesh_env() { mapfile -t LOOPMESH_ENV <"$LAB_STATE/$1/loopmesh.env"; }
gateway_env() { mapfile -t LOOPMESH_ENV <"$LAB_STATE/$1/$2.env"; }

start_component() {
  local node=$1 comp=$2 addr; addr=$(addr_of "$node")
  case $comp in
    consul)
      start_proc "$node" consul "$CONSUL_BIN" agent -config-file="$LAB_STATE/$node/consul.hcl" ;;
    balancer)
      loopmesh_env "$node"
      start_proc "$node" balancer "${AS_USER[@]}" --inh-caps=-all,+net_bind_service --ambient-caps=-all,+net_bind_service --bounding-set=-all,+net_bind_service \
        env "${LOOPMESH_ENV[@]}" node "$MAIN" "${LM_BALANCER_ARGS[@]}" ;;
    loopmesh)
      loopmesh_env "$node"
      start_proc "$node" loopmesh "${AS_USER[@]}" --inh-caps=-all --ambient-caps=-all --bounding-set=-all \
        env "${LOOPMESH_ENV[@]}" node "$MAIN" "${LM_AGENT_ARGS[@]}" ;;
    web)
      start_proc "$node" web node "$REPO/scripts/demo-backend.mjs" "web-$node" "$WEB_BACKEND_PORT" "$addr"
      register_in "$node" "$(lm_web_service_json "$node" "$addr")" ;;
    redis)
      local args; mapfile -t args < <(lm_redis_args "$addr")
      start_proc "$node" redis redis-server "${args[@]}"
      register_in "$node" "$(lm_redis_service_json "$node" "$addr")" ;;
    gateway[1-4])
      # Like the balancer: unprivileged, with CAP_NET_BIND_SERVICE only (web is served on port 80).
      gateway_env "$node" "$comp"
      start_proc "$node" "$comp" "${AS_USER[@]}" --inh-caps=-all,+net_bind_service --ambient-caps=-all,+net_bind_service --bounding-set=-all,+net_bind_service \
        env "${LOOPMESH_ENV[@]}" node "$MAIN" "${LM_GATEWAY_ARGS[@]}" ;;
    *) die "unknown component '$comp'; expected consul, loopmesh, balancer, web, redis or gateway1..$LAB_GATEWAYS" ;;
  esac
}

components_of() { echo consul balancer loopmesh $(roles_of "$1"); }

# ---- up

consul_api() { in_ns "$1" curl -sf --max-time 3 "http://127.0.0.1:8500$2"; }

wait_for() { # SECONDS WHAT CMD...: until CMD succeeds
  local secs=$1 what=$2 end; shift 2; end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || die "$what: not within $secs s (logs in $LAB_STATE/NODE/*.log; 'bash scripts/lab.sh down' removes the lab)"
    sleep 0.2
  done
}
has_leader() { local l; l=$(consul_api "$SERVER" /v1/status/leader) && [ -n "$l" ] && [ "$l" != '""' ]; }
members_alive() { [ "$(consul_api "$SERVER" /v1/agent/members | grep -o '"Status":1' | wc -l)" -ge $((LAB_NODES + 1)) ]; }
loopmesh_healthy() { in_ns "$1" curl -sf --max-time 2 http://127.0.0.1:9190/health | grep -F '"status":"ok"' >/dev/null; }
gateway_healthy() { in_ns "$SERVER" curl -sf --max-time 2 "http://$(gateway_admin "${1#gateway}")/health" | grep -F '"status":"ok"' >/dev/null; }
# gateway_in_hosts NODE K: NODE's hosts file gives web.local an address of gatewayK's range too.
gateway_in_hosts() {
  local base; base=$(gateway_base "$2")
  awk -v net="$NET." -v lo="$base" -v hi="$((base + 31))" '
    { for (i = 2; i <= NF; i++) if ($i == "web.local" && index($1, net) == 1) { o = substr($1, length(net) + 1) + 0; if (o > lo && o <= hi) found = 1 } }
    END { exit found ? 0 : 1 }' "/etc/netns/$1/hosts"
}
web_by_name() { in_ns "$LAB_PREFIX-node1" curl -sf --max-time 2 http://web.local/ | grep -F 'hello from' >/dev/null; }
web_backends() { # COUNT: node1's loopmesh routes web to COUNT instances
  in_ns "$LAB_PREFIX-node1" curl -sf --max-time 2 http://127.0.0.1:9190/v1/routes \
    | node -e 'let s="";process.stdin.on("data",(c)=>s+=c).on("end",()=>{const r=JSON.parse(s).routes.find((x)=>x.service==="web");process.exit(r&&r.backends.length===Number(process.argv[1])?0:1)})' "$1"
}
redis_by_name() { [ "$(in_ns "$LAB_PREFIX-node1" redis-cli -h redis.local -p 6379 ping 2>/dev/null)" = PONG ]; }

etc_files() { # NODE: /etc/netns/NODE/{hosts,resolv.conf,nsswitch.conf}
  local node=$1 dir=/etc/netns/$1 n
  mkdir -p "$dir"
  if [ ! -f "$dir/hosts" ]; then # the loopmesh block is kept on a second up
    {
      printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n'
      for n in $(nodes); do printf '%s\t%s\n' "$(addr_of "$n")" "$n"; done
    } >"$dir/hosts"
  fi
  # loopmesh's DNS responder listens on 127.0.0.1:53 inside the namespace (its own loopback).
  printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:2\n' >"$dir/resolv.conf"
  # hosts: files first, then DNS; no mDNS module that would take .local away from both.
  if [ -f /etc/nsswitch.conf ]; then
    sed -E 's/^hosts:.*/hosts:          files dns/' /etc/nsswitch.conf >"$dir/nsswitch.conf"
  else
    printf 'hosts: files dns\n' >"$dir/nsswitch.conf"
  fi
}

network() {
  local node addr host
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then ip link add "$BRIDGE" type bridge; fi
  ip link set "$BRIDGE" up
  # With br_netfilter, bridged frames pass the host's FORWARD chain; a DROP policy (Docker) would cut the lab.
  if [ "$(sysctl -n net.bridge.bridge-nf-call-iptables 2>/dev/null || echo 0)" = 1 ] && command -v iptables >/dev/null \
     && ! iptables -C "${FORWARD_RULE[@]}" 2>/dev/null && ! iptables -S FORWARD 2>/dev/null | grep -E '^-P FORWARD ACCEPT' >/dev/null; then
    iptables -I "${FORWARD_RULE[@]}"
  fi
  for node in $(nodes); do
    addr=$(addr_of "$node") host=v-$node
    if ! ns_exists "$node"; then ip netns add "$node"; fi
    if ! ip link show "$host" >/dev/null 2>&1; then
      in_ns "$node" ip link del eth0 2>/dev/null || true
      ip link add "$host" type veth peer name eth0 netns "$node"
    fi
    ip link set "$host" master "$BRIDGE" up
    in_ns "$node" ip link set lo up
    in_ns "$node" ip addr replace "$addr/24" dev eth0
    in_ns "$node" ip link set eth0 up
    etc_files "$node"
  done
  # The proxy cluster's addresses: every address of each gateway's range is the server node's own
  # ("AnyIP": a local route, no address on an interface), so a gateway can bind them and the node
  # answers ARP for them on the bridge. They go with the namespace.
  local k
  for k in $(seq 1 "$LAB_GATEWAYS"); do in_ns "$SERVER" ip route replace local "$(gateway_range "$k")" dev lo; done
}

up() {
  require_root up
  if ! ns_exists "$SERVER"; then
    ip netns add "$SERVER" 2>/dev/null \
      || die "this host cannot create network namespaces ('ip netns add' failed); the lab needs root on Linux with netns support"
  fi
  ensure_packages ip:iproute2 curl:curl getent:libc-bin redis-server:redis-server redis-cli:redis-tools iptables:iptables python3:python3
  # The failover examples (and test/lab/gateway.test.ts) use Python's requests, a client that tries every address.
  if ! python3 -c 'import requests' >/dev/null 2>&1; then
    say "installing python3-requests"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-requests; } >/dev/null 2>&1 \
      || say "could not install python3-requests (apt-get install python3-requests); the lab works without it"
  fi
  ensure_node_modules
  ensure_consul
  mkdir -p "$LAB_STATE"
  stage_app
  [ -d /etc/netns ] || { mkdir -p /etc/netns; touch "$LAB_STATE/created-etc-netns"; }
  say "network: bridge $BRIDGE, $LAB_SUBNET, nodes $(nodes | tr '\n' ' ')"
  network

  local node addr comp k
  for node in $(nodes); do
    addr=$(addr_of "$node")
    mkdir -p "$LAB_STATE/$node/consul-data" "$LAB_STATE/$node/run"
    if [ "$node" = "$SERVER" ]; then
      lm_consul_hcl server "$node" "$addr" "$SERVER_ADDR" "$LAB_STATE/$node/consul-data" "127.0.0.1 $addr" >"$LAB_STATE/$node/consul.hcl"
    else
      lm_consul_hcl client "$node" "$addr" "$SERVER_ADDR" "$LAB_STATE/$node/consul-data" "127.0.0.1 $addr" >"$LAB_STATE/$node/consul.hcl"
    fi
    # Inside the namespace /etc/hosts is /etc/netns/NODE/hosts, bind-mounted: loopmesh rewrites it in
    # place, so every process of the node, also one started before a change, sees the current block.
    lm_loopmesh_env "$LAB_STATE/$node/run" /etc/hosts 127.0.0.1:53 127.0.0.1:9190 >"$LAB_STATE/$node/loopmesh.env"
    # What loopmesh writes: its run dir and the node's hosts file (in place, as on a VM).
    chown -R "$LM_UID:$LM_GID" "$LAB_STATE/$node/run" "/etc/netns/$node/hosts"
    # loopmesh refuses a run dir (or a file in it) that group or others may write, whatever root's umask was.
    chmod -R go-w "$LAB_STATE/$node/run"
    if [ "$node" = "$SERVER" ]; then
      for k in $(seq 1 "$LAB_GATEWAYS"); do # each gateway: a run dir and an admin port of its own
        mkdir -p "$LAB_STATE/$node/gateway$k-run"
        lm_gateway_env "$LAB_STATE/$node/gateway$k-run" "$(gateway_admin "$k")" "$(gateway_range "$k")" >"$LAB_STATE/$node/gateway$k.env"
        chown -R "$LM_UID:$LM_GID" "$LAB_STATE/$node/gateway$k-run"
        chmod -R go-w "$LAB_STATE/$node/gateway$k-run"
      done
    fi
    start_component "$node" consul
  done
  say "waiting for Consul: a leader and $((LAB_NODES + 1)) members"
  wait_for 60 "a Consul leader on $SERVER" has_leader
  wait_for 60 "all $((LAB_NODES + 1)) Consul agents joined" members_alive
  for node in $(nodes); do
    for comp in $(components_of "$node"); do start_component "$node" "$comp"; done
  done
  say "waiting for loopmesh on every node and web.local, redis.local from $LAB_PREFIX-node1"
  for node in $(nodes); do wait_for 60 "loopmesh healthy on $node" loopmesh_healthy "$node"; done
  wait_for 60 "http://web.local/ from $LAB_PREFIX-node1" web_by_name
  local web_nodes; web_nodes=$(for n in $(clients); do case " $(roles_of "$n") " in *" web "*) echo "$n" ;; esac; done | wc -l)
  wait_for 60 "all $web_nodes web instances healthy in node1's routes" web_backends "$web_nodes"
  if [ "$LAB_NODES" -ge 1 ]; then wait_for 60 "redis.local:6379 from $LAB_PREFIX-node1" redis_by_name; fi
  if [ "$LAB_GATEWAYS" -ge 1 ]; then
    say "waiting for the proxy cluster: $(gateways | tr '\n' ' ')healthy, and their addresses for web.local in $LAB_PREFIX-node1's hosts"
    for k in $(seq 1 "$LAB_GATEWAYS"); do
      wait_for 60 "gateway$k healthy on $SERVER (admin $(gateway_admin "$k"))" gateway_healthy "gateway$k"
      wait_for 60 "a gateway$k address ($(gateway_range "$k")) for web.local in $LAB_PREFIX-node1's hosts file" gateway_in_hosts "$LAB_PREFIX-node1" "$k"
    done
  fi
  local lab="bash scripts/lab.sh"
  [ "$LAB_PREFIX" = lm ] || lab="LAB_PREFIX=$LAB_PREFIX LAB_SUBNET=$LAB_SUBNET LAB_NODES=$LAB_NODES$( [ "$LAB_GATEWAYS" = 2 ] || echo " LAB_GATEWAYS=$LAB_GATEWAYS") bash scripts/lab.sh"
  local failover=""
  if [ "$LAB_GATEWAYS" -ge 2 ]; then
    failover=$(cat <<TXT
  Fail over to the proxy cluster ($(echo $(gateways)) on $SERVER, at $(echo $(for k in $(seq 1 "$LAB_GATEWAYS"); do gateway_range "$k"; done))):
    $lab exec node1 getent ahosts web.local | grep STREAM   # the loopback address, then each gateway's
    $lab kill node1 balancer; $lab kill node1 loopmesh       # node1's loopmesh crashes; its hosts block stays
    $lab exec node1 curl -s http://web.local/                # 127.77.0.x refused at once: a gateway answers
    $lab exec node1 redis-cli -h redis.local ping            # refused: redis-cli tries the first address only
    $lab kill server gateway1                                # a gateway crashes: the next address answers
    $lab start server gateway1; $lab start node1 balancer; $lab start node1 loopmesh
TXT
)
    failover+=$'\n'
  fi
  cat <<TXT

  loopmesh lab is up: $SERVER ($SERVER_ADDR, Consul server) and $LAB_NODES client nodes on $BRIDGE ($LAB_SUBNET).
  web runs on $(for n in $(clients); do case " $(roles_of "$n") " in *" web "*) printf '%s ' "$n" ;; esac; done)and redis on $(clients | tail -n 1).

  Try, from node1:
    $lab exec node1 getent hosts web.local redis.local
    $lab exec node1 curl -s http://web.local/                 # again: the other instance answers
    $lab exec node1 redis-cli -h redis.local ping
    $lab exec node1 dig @127.0.0.1 web.local SRV +short       # loopmesh's DNS, the node's resolver
    $lab exec node1 node dist/agent/cli/main.js status
  Register a service on $(clients | tail -n 1) and reach it from node1 within a second:
    $lab spawn $(clients | tail -n 1 | sed "s/^$LAB_PREFIX-//") echo socat TCP-LISTEN:7000,bind=$(addr_of "$(clients | tail -n 1)"),fork,reuseaddr EXEC:cat
    $lab exec $(clients | tail -n 1 | sed "s/^$LAB_PREFIX-//") curl -X PUT http://127.0.0.1:8500/v1/agent/service/register -d '{"Name":"echo","Address":"$(addr_of "$(clients | tail -n 1)")","Port":7000}'
    echo hi | $lab exec node1 socat - TCP:echo.local:7000
${failover}  Break things: $lab stop $(clients | tail -n 1 | sed "s/^$LAB_PREFIX-//") consul | $lab restart node1 loopmesh | $lab restart server consul
  Look:         $lab status        (logs: $LAB_STATE/NODE/*.log)
  Tear down:    $lab down
TXT
}

# ---- down

kill_namespace() { # NODE: every process in it, TERM (twice: loopmesh then skips draining), then KILL
  local node=$1 pids end
  pids=$(ip netns pids "$node" 2>/dev/null || true)
  [ -n "$pids" ] || return 0
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  sleep 0.3
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  end=$((SECONDS + 10))
  while [ -n "$(ip netns pids "$node" 2>/dev/null)" ] && [ $SECONDS -lt $end ]; do sleep 0.1; done
  pids=$(ip netns pids "$node" 2>/dev/null || true)
  # shellcheck disable=SC2086
  [ -z "$pids" ] || { say "killing what did not stop in $node: $pids"; kill -KILL $pids 2>/dev/null || true; sleep 0.2; }
}

down() {
  require_root down
  local node f pid host_ns link
  for node in $(lab_namespaces); do kill_namespace "$node"; done
  # Recorded processes that are somehow outside their namespace now (never the host's own namespace).
  host_ns=$(readlink /proc/self/ns/net)
  if [ -d "$LAB_STATE" ]; then
    for f in "$LAB_STATE"/*/*.pid; do
      [ -f "$f" ] || continue
      pid=$(cat "$f")
      if [ -n "$pid" ] && [ -e "/proc/$pid" ] && [ "$(readlink "/proc/$pid/ns/net" 2>/dev/null)" != "$host_ns" ]; then kill -KILL "$pid" 2>/dev/null || true; fi
    done
  fi
  for node in $(lab_namespaces); do ip netns del "$node"; done
  for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^v-$LAB_PREFIX-(server|node[0-9]+)$" || true); do ip link del "$link" 2>/dev/null || true; done
  if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE"; fi
  while command -v iptables >/dev/null && iptables -C "${FORWARD_RULE[@]}" 2>/dev/null; do iptables -D "${FORWARD_RULE[@]}"; done
  rm -rf /etc/netns/"$LAB_PREFIX"-server /etc/netns/"$LAB_PREFIX"-node*
  if [ -f "$LAB_STATE/created-etc-netns" ]; then rmdir /etc/netns 2>/dev/null || true; fi
  rm -rf "$LAB_STATE"
  local left; left=$(lab_namespaces; ip link show "$BRIDGE" 2>/dev/null | head -n 1; ls -d /etc/netns/"$LAB_PREFIX"-* 2>/dev/null || true)
  [ -z "$left" ] || die "could not remove everything: $left"
  say "lab $LAB_PREFIX is down: no namespaces, links, processes or files left"
}

# ---- status

status() {
  require_root status
  local node comp state
  if [ -z "$(lab_namespaces)" ]; then echo "lab $LAB_PREFIX is not up (no namespaces $LAB_PREFIX-*)"; return 0; fi
  printf '%-14s %-14s %s\n' NODE ADDRESS PROCESSES
  for node in $(nodes); do
    if ! ns_exists "$node"; then printf '%-14s %-14s %s\n' "$node" - "no namespace"; continue; fi
    state=""
    for comp in $(components_of "$node"); do
      if alive "$node" "$comp"; then state+="$comp:$(cat "$(pidfile "$node" "$comp")") "; else state+="$comp:DOWN "; fi
    done
    printf '%-14s %-14s %s\n' "$node" "$(addr_of "$node")" "$state"
  done
  echo
  echo "Consul members (from $SERVER):"
  in_ns "$SERVER" "$CONSUL_BIN" members 2>&1 | sed 's/^/  /' || true
  echo
  echo "Routes on $LAB_PREFIX-node1:"
  in_ns "$LAB_PREFIX-node1" node "$MAIN" status --admin 127.0.0.1:9190 2>&1 | sed 's/^/  /' || true
  if [ "$LAB_GATEWAYS" -ge 1 ] && ns_exists "$SERVER"; then
    local k
    echo
    echo "Proxy cluster on $SERVER (loopmesh-gateway in Consul: $(consul_api "$SERVER" /v1/health/service/loopmesh-gateway?passing | grep -o '"Service":{"ID":"[^"]*"' | wc -l) passing):"
    for k in $(seq 1 "$LAB_GATEWAYS"); do
      echo "  gateway$k: $(gateway_range "$k"), admin $(gateway_admin "$k"): $(in_ns "$SERVER" curl -s --max-time 2 "http://$(gateway_admin "$k")/health" 2>/dev/null || echo 'no answer')"
    done
    echo "  $LAB_PREFIX-node1's hosts block:"
    sed -n '/^# BEGIN loopmesh/,/^# END loopmesh/p' "/etc/netns/$LAB_PREFIX-node1/hosts" 2>/dev/null | grep -v '^#' | sed 's/^/    /' || true
  fi
}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in
  up) up ;;
  down) down ;;
  status) ensure_consul >/dev/null 2>&1 || CONSUL_BIN=consul; status ;;
  exec)
    [ $# -ge 2 ] || die "usage: lab.sh exec NODE CMD..."
    require_root exec
    node=$(node_name "$1"); shift
    ns_exists "$node" || die "node $node has no namespace; run 'bash scripts/lab.sh up' first"
    cd "$CALLER_PWD"
    exec ip netns exec "$node" "$@" ;;
  stop|start|restart|kill)
    [ $# -eq 2 ] || die "usage: lab.sh $cmd NODE COMPONENT (consul, loopmesh, balancer, web, redis; on server gateway1..$LAB_GATEWAYS)"
    require_root "$cmd"
    node=$(node_name "$1") comp=$2
    case " $(components_of "$node") " in *" $comp "*) ;; *) die "$node has no component '$comp'; it has: $(components_of "$node")" ;; esac
    ns_exists "$node" || die "node $node has no namespace; run 'bash scripts/lab.sh up' first"
    if [ "$cmd" = kill ]; then kill_component "$node" "$comp"; exit 0; fi
    case "$cmd:$comp" in start:loopmesh|start:balancer|start:gateway*|restart:loopmesh|restart:balancer|restart:gateway*) stage_app ;; esac
    case $comp in
      balancer|gateway*)
        if [ "$cmd" = restart ] && alive "$node" "$comp"; then hot_restart "$node" "$comp"; exit 0; fi ;;
    esac
    if [ "$cmd" != start ]; then
      stop_proc "$node" "$comp"
    fi
    if [ "$cmd" != stop ]; then
      [ "$comp" != consul ] || CONSUL_BIN=$(bash scripts/install-consul.sh 2>/dev/null | tail -n 1)
      start_component "$node" "$comp"
    fi ;;
  spawn)
    [ $# -ge 3 ] || die "usage: lab.sh spawn NODE NAME CMD..."
    require_root spawn
    node=$(node_name "$1") name=$2; shift 2
    [[ $name =~ ^[a-zA-Z0-9_.-]+$ ]] || die "spawn: NAME must be letters, digits, '.', '_' or '-'; got '$name'"
    ns_exists "$node" || die "node $node has no namespace; run 'bash scripts/lab.sh up' first"
    (cd "$CALLER_PWD" && start_proc "$node" "$name" "$@")
    cat "$(pidfile "$node" "$name")" ;;
  -h|--help|help) usage ;;
  *) usage >&2; die "expected a command: up, down, status, exec, stop, start, restart, kill or spawn; got '${cmd}'" ;;
esac
