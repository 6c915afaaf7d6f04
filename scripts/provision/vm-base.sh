#!/usr/bin/env bash
# Packages a lab VM needs: Node.js 20 (NodeSource; Debian bookworm's nodejs is 18), Consul (HashiCorp's
# apt repository), and the tools the lab's "what to try" uses. Idempotent.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt_install() { apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }

apt-get update -qq >/dev/null
apt_install ca-certificates curl gnupg rsync dnsutils socat redis-tools lsb-release

node_major() { command -v node >/dev/null && node -p 'process.versions.node.split(".")[0]' || echo 0; }
if [ "$(node_major)" -lt 20 ]; then
  echo "vm-base: installing Node.js 20 from NodeSource"
  install -d -m 0755 /etc/apt/keyrings
  curl -fsSL https://deb.nodesource.com/gpgkey/nodesource-repo.gpg.key | gpg --dearmor --yes -o /etc/apt/keyrings/nodesource.gpg
  echo "deb [signed-by=/etc/apt/keyrings/nodesource.gpg] https://deb.nodesource.com/node_20.x nodistro main" >/etc/apt/sources.list.d/nodesource.list
  apt-get update -qq >/dev/null
  apt_install nodejs
fi
[ "$(node_major)" -ge 20 ] || { echo "vm-base: error: Node.js 20 or newer is needed, have $(node --version 2>/dev/null || echo none)" >&2; exit 1; }

if ! command -v consul >/dev/null; then
  echo "vm-base: installing Consul from HashiCorp's apt repository"
  install -d -m 0755 /etc/apt/keyrings
  curl -fsSL https://apt.releases.hashicorp.com/gpg | gpg --dearmor --yes -o /etc/apt/keyrings/hashicorp.gpg
  echo "deb [signed-by=/etc/apt/keyrings/hashicorp.gpg] https://apt.releases.hashicorp.com $(lsb_release -cs) main" >/etc/apt/sources.list.d/hashicorp.list
  apt-get update -qq >/dev/null
  apt_install consul
fi
echo "vm-base: node $(node --version), $(consul version | head -n 1)"
