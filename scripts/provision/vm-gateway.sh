#!/usr/bin/env bash
# loopmesh gateway on a lab VM (the server VM in vagrant/Vagrantfile):
#   vm-gateway.sh RANGE        e.g. 10.77.77.128/27: a block of the private network no VM uses
# Runs after vm-loopmesh.sh (the build, the user). Writes /etc/default/loopmesh-gateway and starts
# loopmesh-gateway.service, which adds the AnyIP route for RANGE and registers in Consul.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
[ $# -eq 1 ] || lm_die "usage: vm-gateway.sh RANGE (e.g. 10.77.77.128/27)"
range=$1
[[ $range =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}$ ]] || lm_die "vm-gateway.sh: RANGE must be an IPv4 CIDR such as 10.77.77.128/27, got '$range'"
cat >/etc/default/loopmesh-gateway <<ENV
LOOPMESH_CONSUL=http://127.0.0.1:8500
LOOPMESH_RUN_DIR=/var/lib/loopmesh-gateway
LOOPMESH_ADMIN=127.0.0.1:9191
LOOPMESH_GATEWAY_RANGE=$range
LOOPMESH_LOG_FORMAT=json
LOOPMESH_HANDOVER_TIMEOUT=60
ENV
install -m 0644 "$here/systemd/loopmesh-gateway.service" /etc/systemd/system/
systemctl daemon-reload
systemctl enable -q loopmesh-gateway
systemctl restart loopmesh-gateway
lm_wait_http http://127.0.0.1:9191/health/live 300 "loopmesh gateway"
echo "vm-gateway: loopmesh gateway serving on $range, registered in Consul as loopmesh-gateway"
