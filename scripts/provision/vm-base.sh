#!/usr/bin/env bash
# Packages a lab VM needs: Node.js 20, Consul, and the tools the lab's "what to try" uses. Idempotent.
# Online (the default): Debian's packages, Node.js 20 from NodeSource (Debian bookworm's nodejs is
# 18), Consul from HashiCorp's apt repository. Offline (LAB_OFFLINE=1, a box from
# scripts/box/build-box.sh with the Debian packages in it): Node.js and Consul from the bundle the
# host synced to LOOPMESH_BUNDLE (bin/node, bin/consul), and nothing is fetched.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
offline=${LAB_OFFLINE:-0}
bundle=${LOOPMESH_BUNDLE:-/opt/loopmesh-bundle}
case $offline in 0|1) ;; *) lm_die "LAB_OFFLINE must be 0 or 1, got '$offline'" ;; esac

# apt_install PACKAGE...: installs the ones not installed yet (apt-get update first, once).
updated=0
apt_install() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$offline" = 0 ] || lm_die "offline (LAB_OFFLINE=1) but the box lacks the packages ${missing[*]}: build it with scripts/box/build-box.sh, which preinstalls them"
  if [ $updated = 0 ]; then apt-get update -qq >/dev/null; updated=1; fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
apt_install ca-certificates curl gnupg rsync dnsutils socat redis-tools lsb-release

node_major() { command -v node >/dev/null && node -p 'process.versions.node.split(".")[0]' || echo 0; }
if [ "$(node_major)" -lt 20 ]; then
  if [ "$offline" = 1 ]; then
    [ -x "$bundle/bin/node" ] || lm_die "offline, and no Node.js at $bundle/bin/node (the host's bundle, LOOPMESH_BUNDLE)"
    echo "vm-base: installing Node.js from the host's bundle ($bundle/bin/node)"
    install -m 0755 "$bundle/bin/node" /usr/local/bin/node
    # The units run /usr/bin/node, where NodeSource's package puts it.
    ln -sfn /usr/local/bin/node /usr/bin/node
  else
    echo "vm-base: installing Node.js 20 from NodeSource"
    install -d -m 0755 /etc/apt/keyrings
    curl -fsSL https://deb.nodesource.com/gpgkey/nodesource-repo.gpg.key | gpg --dearmor --yes -o /etc/apt/keyrings/nodesource.gpg
    echo "deb [signed-by=/etc/apt/keyrings/nodesource.gpg] https://deb.nodesource.com/node_20.x nodistro main" >/etc/apt/sources.list.d/nodesource.list
    apt-get update -qq >/dev/null
    apt_install nodejs
  fi
fi
[ "$(node_major)" -ge 20 ] || lm_die "Node.js 20 or newer is needed, have $(node --version 2>/dev/null || echo none)"

if ! command -v consul >/dev/null; then
  if [ "$offline" = 1 ]; then
    [ -x "$bundle/bin/consul" ] || lm_die "offline, and no Consul at $bundle/bin/consul (the host's bundle, LOOPMESH_BUNDLE)"
    echo "vm-base: installing Consul from the host's bundle ($bundle/bin/consul)"
    # What HashiCorp's package sets up: the binary, the consul user, /etc/consul.d, consul.service.
    install -m 0755 "$bundle/bin/consul" /usr/bin/consul
    getent group consul >/dev/null || groupadd --system consul
    getent passwd consul >/dev/null || useradd --system --gid consul --home-dir /etc/consul.d --no-create-home --shell /bin/false consul
    install -d -o consul -g consul -m 0755 /etc/consul.d
    install -m 0644 "$here/systemd/consul.service" /etc/systemd/system/consul.service
    systemctl daemon-reload
  else
    echo "vm-base: installing Consul from HashiCorp's apt repository"
    install -d -m 0755 /etc/apt/keyrings
    curl -fsSL https://apt.releases.hashicorp.com/gpg | gpg --dearmor --yes -o /etc/apt/keyrings/hashicorp.gpg
    echo "deb [signed-by=/etc/apt/keyrings/hashicorp.gpg] https://apt.releases.hashicorp.com $(lsb_release -cs) main" >/etc/apt/sources.list.d/hashicorp.list
    apt-get update -qq >/dev/null
    apt_install consul
  fi
fi
# Vagrant, setting the hostname, restarts ifup@IFACE for every NIC before it has written the private
# network's configuration: that start fails, then Vagrant brings the NIC up itself. Forget the failure
# of a NIC that has its address, so `systemctl --failed` lists real failures only.
for unit in $(systemctl list-units --failed --plain --no-legend 'ifup@*' | awk '{print $1}'); do
  iface=${unit#ifup@}
  iface=${iface%.service}
  if ip -4 -o addr show dev "$iface" 2>/dev/null | grep -q ' inet '; then
    systemctl reset-failed "$unit"
    echo "vm-base: $iface is up (Vagrant configured it); cleared the failed $unit of the hostname step"
  fi
done
echo "vm-base: node $(node --version), $(consul version | head -n 1)"
