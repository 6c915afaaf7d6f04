# Provisioning steps shared by the two labs: scripts/lab.sh (network namespaces on one host) and
# vagrant/Vagrantfile (virtual machines, through scripts/provision/vm-*.sh). Source this file; the
# functions only print what a node needs (Consul's config, loopmesh's settings, the demo services)
# or send it to Consul, so each lab decides where files go and how processes run.

lm_die() { printf '%s: error: %s\n' "${0##*/}" "$*" >&2; exit 1; }

# lm_consul_hcl ROLE NODE BIND_ADDR SERVER_ADDR DATA_DIR CLIENT_ADDRS
# Consul's agent config for one lab node. ROLE is server (bootstraps a one-server cluster) or client
# (joins SERVER_ADDR, retrying for ever). HTTP listens on CLIENT_ADDRS (space-separated) port 8500;
# Consul's DNS and gRPC are off (loopmesh answers NAME.local; nothing here uses gRPC).
lm_consul_hcl() {
  local role=$1 node=$2 bind=$3 server=$4 data=$5 client=$6
  case $role in server|client) ;; *) lm_die "lm_consul_hcl: role must be server or client, got '$role'" ;; esac
  cat <<HCL
# Written by loopmesh's lab provisioning (scripts/provision/lib.sh).
datacenter     = "lab"
node_name      = "$node"
data_dir       = "$data"
bind_addr      = "$bind"
advertise_addr = "$bind"
client_addr    = "$client"
log_level      = "warn"
# The namespace lab has no way out; nothing here needs HashiCorp's update check.
disable_update_check = true
ports {
  http     = 8500
  dns      = -1
  grpc     = -1
  grpc_tls = -1
}
HCL
  if [ "$role" = server ]; then
    cat <<HCL
server           = true
bootstrap_expect = 1
HCL
  else
    cat <<HCL
server     = false
retry_join = ["$server"]
HCL
  fi
}

# lm_loopmesh_env RUN_DIR HOSTS_FILE DNS ADMIN
# loopmesh's settings as environment lines (KEY=value), read by both halves of the split mode:
# `loopmesh balancer` (data plane: listeners, DNS, hosts block) and `loopmesh agent --render-only`
# (control plane: watch Consul, plan, render), which share RUN_DIR. Either can restart alone.
lm_loopmesh_env() {
  local run=$1 hosts=$2 dns=$3 admin=$4
  cat <<ENV
LOOPMESH_CONSUL=http://127.0.0.1:8500
LOOPMESH_RUN_DIR=$run
LOOPMESH_HOSTS_FILE=$hosts
LOOPMESH_DNS=$dns
LOOPMESH_ADMIN=$admin
LOOPMESH_CONNECT_TIMEOUT=1
LOOPMESH_DRAIN_TIMEOUT=15
LOOPMESH_LOG_LEVEL=info
ENV
}

# The two loopmesh commands of a node (after `node LOOPMESH_MAIN` or `loopmesh`).
LM_BALANCER_ARGS=(balancer)
LM_AGENT_ARGS=(agent --render-only)

# lm_gateway_env RUN_DIR ADMIN GATEWAY_RANGE
# The settings of one `loopmesh gateway` of the proxy cluster, as environment lines: it serves every
# routed service at GATEWAY_RANGE's base + the service's offset in --range (127.77.0.N -> base + N),
# on the service's own port, and registers itself in the local Consul agent as `loopmesh-gateway`.
# No DNS responder and no hosts block (a gateway has neither). ADMIN must differ per gateway process.
# The addresses of GATEWAY_RANGE need not be on an interface, but the node must accept them as its
# own: an "AnyIP" local route, `ip route add local GATEWAY_RANGE dev lo`.
lm_gateway_env() {
  local run=$1 admin=$2 range=$3
  cat <<ENV
LOOPMESH_CONSUL=http://127.0.0.1:8500
LOOPMESH_RUN_DIR=$run
LOOPMESH_ADMIN=$admin
LOOPMESH_GATEWAY_RANGE=$range
LOOPMESH_CONNECT_TIMEOUT=1
LOOPMESH_DRAIN_TIMEOUT=15
LOOPMESH_LOG_LEVEL=info
ENV
}
LM_GATEWAY_ARGS=(gateway)

# Demo services. web: HTTP, reached as http://web.local/ (port 80 through the loopmesh-port meta;
# each instance listens on WEB_BACKEND_PORT on its node's address). redis: TCP on 6379.
WEB_BACKEND_PORT=8080
REDIS_PORT=6379

# lm_web_service_json NODE ADDR
lm_web_service_json() {
  cat <<JSON
{ "ID": "web-$1", "Name": "web", "Address": "$2", "Port": $WEB_BACKEND_PORT,
  "Meta": { "loopmesh-port": "80" },
  "Check": { "HTTP": "http://$2:$WEB_BACKEND_PORT/health", "Interval": "1s", "Timeout": "1s" } }
JSON
}

# lm_redis_service_json NODE ADDR
lm_redis_service_json() {
  cat <<JSON
{ "ID": "redis-$1", "Name": "redis", "Address": "$2", "Port": $REDIS_PORT,
  "Check": { "TCP": "$2:$REDIS_PORT", "Interval": "1s", "Timeout": "1s" } }
JSON
}

# lm_redis_args ADDR: redis-server's flags for a throw-away demo instance (no persistence).
lm_redis_args() {
  printf '%s\n' --bind "$1" --port "$REDIS_PORT" --protected-mode no --save '' --appendonly no --daemonize no
}

# lm_register CONSUL_URL JSON: registers a service with a Consul agent (idempotent: same ID replaces).
# Retries for up to 30 s while the agent starts. LM_EXEC, an array, prefixes curl (the namespace lab
# sets it to `ip netns exec NODE`).
LM_EXEC=()
lm_register() {
  local url=$1 json=$2 i
  for i in $(seq 1 60); do
    if "${LM_EXEC[@]}" curl -sf --max-time 3 -X PUT "$url/v1/agent/service/register" -d "$json" >/dev/null; then return 0; fi
    sleep 0.5
  done
  lm_die "could not register a service with the Consul agent at $url: $json"
}

# lm_wait_http URL SECONDS WHAT: until URL answers 2xx.
lm_wait_http() {
  local url=$1 secs=$2 what=$3 end=$((SECONDS + $2))
  while [ $SECONDS -lt $end ]; do
    "${LM_EXEC[@]}" curl -sf --max-time 2 -o /dev/null "$url" && return 0
    sleep 0.2
  done
  lm_die "$what did not answer at $url within $secs s"
}

# lm_demo_role INDEX COUNT: the demo services client node INDEX (1..COUNT) runs. web on the last two
# client nodes (node2 and node3 of three, node1 and node2 of two), redis on the last one.
lm_demo_role() {
  local i=$1 n=$2 roles=()
  if [ "$i" -ge $((n - 1)) ]; then roles+=(web); fi
  if [ "$i" -eq "$n" ]; then roles+=(redis); fi
  echo "${roles[*]}"
}
