#!/usr/bin/env bash
# Provisions one virtual machine of the Vagrant lab (vagrant/Vagrantfile runs it as root):
#   vm.sh ROLE NODE ADDR SERVER_ADDR INDEX COUNT
# ROLE server or client; NODE its name (lm-server, lm-node1...); ADDR its private address; INDEX
# 1..COUNT for client nodes (0 for the server). The repository is at /vagrant (synced folder).
# Idempotent: `vagrant provision` runs it again.
set -euo pipefail
[ $# -eq 6 ] || { echo "usage: vm.sh ROLE NODE ADDR SERVER_ADDR INDEX COUNT" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "vm.sh: run as root" >&2; exit 1; }
# Vagrant uploads this one file and runs the copy; the rest of the steps are in the synced repository.
here=$(cd "$(dirname "$0")" && pwd)
[ -f "$here/lib.sh" ] || here=${LOOPMESH_SRC:-/vagrant}/scripts/provision
[ -f "$here/lib.sh" ] || { echo "vm.sh: error: no scripts/provision/lib.sh next to it or under \$LOOPMESH_SRC (/vagrant)" >&2; exit 1; }
bash "$here/vm-base.sh"
bash "$here/vm-consul.sh" "$1" "$2" "$3" "$4"
bash "$here/vm-loopmesh.sh"
# The proxy cluster: a gateway on the server VM, on the top /27 of the private network's /24.
if [ "$1" = server ]; then bash "$here/vm-gateway.sh" "${3%.*}.128/27"; fi
bash "$here/vm-demo.sh" "$2" "$3" "$5" "$6"
echo "vm.sh: $2 ($3) is provisioned: consul, loopmesh-balancer, loopmesh$( [ "$1" = server ] && printf ', loopmesh-gateway')$( [ "$5" -gt 0 ] && printf ', demo services: %s' "$(. "$here/lib.sh"; lm_demo_role "$5" "$6")")"
