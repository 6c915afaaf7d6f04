#!/usr/bin/env bash
# The demo services of a lab VM: vm-demo.sh NODE ADDR INDEX COUNT. Which ones a node runs, and how
# they are registered, comes from lib.sh (the same as in the namespace lab): web (HTTP, the demo
# backend on ADDR:8080, reached as http://web.local/) and redis (redis.local:6379).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
[ $# -eq 4 ] || lm_die "usage: vm-demo.sh NODE ADDR INDEX COUNT"
node=$1 addr=$2 index=$3 count=$4
[ "$index" -gt 0 ] || exit 0
roles=" $(lm_demo_role "$index" "$count") "

if [[ $roles == *" web "* ]]; then
  cat >/etc/systemd/system/loopmesh-demo-web.service <<UNIT
[Unit]
Description=loopmesh lab: demo HTTP backend web-$node on $addr:$WEB_BACKEND_PORT
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=/usr/bin/node /opt/loopmesh/current/scripts/demo-backend.mjs web-$node $WEB_BACKEND_PORT $addr
DynamicUser=yes
Restart=on-failure
NoNewPrivileges=yes
ProtectSystem=strict
CapabilityBoundingSet=

[Install]
WantedBy=multi-user.target
UNIT
  systemctl daemon-reload
  systemctl enable -q loopmesh-demo-web
  systemctl restart loopmesh-demo-web
  lm_register http://127.0.0.1:8500 "$(lm_web_service_json "$node" "$addr")"
  echo "vm-demo: web-$node on $addr:$WEB_BACKEND_PORT, registered as web"
fi

if [[ $roles == *" redis "* ]]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
  # Debian's redis listens on loopback only; the lab's clients come over the private network.
  sed -i -E "s/^bind .*/bind 127.0.0.1 $addr/; s/^protected-mode .*/protected-mode no/" /etc/redis/redis.conf
  systemctl enable -q redis-server
  systemctl restart redis-server
  lm_register http://127.0.0.1:8500 "$(lm_redis_service_json "$node" "$addr")"
  echo "vm-demo: redis on $addr:$REDIS_PORT, registered as redis"
fi
