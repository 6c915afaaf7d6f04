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
  # --no-block: consul.service is Type=notify and a client reports ready only once it has joined,
  # which waits for the server VM (they boot in parallel); the leader below is what counts.
  systemctl restart --no-block consul
fi
systemctl enable -q consul
systemctl start --no-block consul
# The VMs boot in parallel, slowly under software emulation: wait for a leader for up to 10 minutes.
leader=""
for _ in $(seq 1 600); do
  leader=$(curl -sf --max-time 2 http://127.0.0.1:8500/v1/status/leader 2>/dev/null || true)
  [[ $leader =~ ^\"[0-9.]+:[0-9]+\"$ ]] && break
  leader=""
  sleep 1
done
[ -n "$leader" ] || lm_die "vm-consul: $node's Consul agent has no leader after 10 minutes (is the server $server up? journalctl -u consul)"
echo "vm-consul: $node ($role) up; leader $leader"
