#!/usr/bin/env bash
# Consul on a lab VM: vm-consul.sh ROLE NODE ADDR SERVER_ADDR. The config comes from lib.sh's
# lm_consul_hcl, the same the namespace lab uses; HashiCorp's package runs consul.service as the
# consul user with -config-dir=/etc/consul.d.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
[ $# -eq 4 ] || lm_die "usage: vm-consul.sh ROLE NODE ADDR SERVER_ADDR"
role=$1 node=$2 addr=$3 server=$4
install -d -o consul -g consul -m 0750 /opt/consul
new=$(lm_consul_hcl "$role" "$node" "$addr" "$server" /opt/consul "127.0.0.1 $addr")
if [ "$(cat /etc/consul.d/consul.hcl 2>/dev/null)" != "$new" ]; then
  printf '%s\n' "$new" >/etc/consul.d/consul.hcl
  chown consul:consul /etc/consul.d/consul.hcl
  chmod 0640 /etc/consul.d/consul.hcl
  consul validate /etc/consul.d/ >/dev/null
  systemctl enable -q consul
  systemctl restart consul
fi
systemctl enable -q --now consul
for _ in $(seq 1 150); do
  curl -sf --max-time 2 http://127.0.0.1:8500/v1/status/leader | grep -E '"[0-9.]+:[0-9]+"' >/dev/null && break
  sleep 0.2
done
echo "vm-consul: $node ($role) up; leader $(curl -s http://127.0.0.1:8500/v1/status/leader)"
