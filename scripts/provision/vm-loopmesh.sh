#!/usr/bin/env bash
# loopmesh on a lab VM, as two systemd services sharing /var/lib/loopmesh:
#   loopmesh-balancer.service  the data plane: NAME.local listeners (port 80 needs CAP_NET_BIND_SERVICE,
#                              its only capability), the DNS responder, the /etc/hosts block
#   loopmesh.service           the control plane (agent --render-only): watch Consul, plan, render
# Both run as the unprivileged user loopmesh, restart on failure, and read /etc/default/loopmesh
# (written by lib.sh's lm_loopmesh_env, as in the namespace lab). `systemctl reload
# loopmesh-balancer` is its hot restart (hot-restart.sh).
# Online, the VM builds loopmesh (npm ci); offline (LAB_OFFLINE=1) it takes dist/ and node_modules/
# from the host's bundle (LOOPMESH_BUNDLE/loopmesh), built from the same sources.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
src=${LOOPMESH_SRC:-/vagrant}
dest=/opt/loopmesh
offline=${LAB_OFFLINE:-0}
bundle=${LOOPMESH_BUNDLE:-/opt/loopmesh-bundle}
[ -f "$src/package.json" ] || lm_die "no loopmesh repository at $src (set LOOPMESH_SRC)"

# A copy, so npm ci and the build never write into the synced folder.
install -d -m 0755 "$dest/src"
rsync -a --delete --exclude node_modules --exclude dist --exclude .git --exclude '.lab' "$src/" "$dest/src/"
cd "$dest/src"
if [ "$offline" = 1 ]; then
  if [ ! -f "$bundle/loopmesh/dist/agent/cli/main.js" ] || [ ! -d "$bundle/loopmesh/node_modules" ]; then
    lm_die "offline, and no build at $bundle/loopmesh (dist/agent/cli/main.js, node_modules/): the host's bundle, LOOPMESH_BUNDLE"
  fi
  rsync -a --delete "$bundle/loopmesh/dist/" "$dest/src/dist/"
  rsync -a --delete "$bundle/loopmesh/node_modules/" "$dest/src/node_modules/"
elif [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
else
  npx tsc -p tsconfig.json
fi
[ -f dist/agent/cli/main.js ] || lm_die "the build did not produce dist/agent/cli/main.js"
ln -sfn "$dest/src" "$dest/current"
ln -sfn "$dest/current/dist/agent/cli/main.js" /usr/local/bin/loopmesh
chmod 0755 "$dest/current/dist/agent/cli/main.js"

getent group loopmesh >/dev/null || groupadd --system loopmesh
getent passwd loopmesh >/dev/null || useradd --system --gid loopmesh --home-dir /var/lib/loopmesh --no-create-home --shell /usr/sbin/nologin loopmesh

# The hosts block is the resolver integration that always works: glibc reads /etc/hosts first for
# every program. loopmesh cannot replace /etc/hosts by a rename (it may not write /etc), so it
# rewrites the file in place: it needs write access to that one file.
chgrp loopmesh /etc/hosts
chmod 0664 /etc/hosts
if ! grep -E '^hosts:[[:space:]]+files' /etc/nsswitch.conf >/dev/null; then
  sed -i -E 's/^hosts:.*/hosts:          files dns/' /etc/nsswitch.conf
  echo "vm-loopmesh: /etc/nsswitch.conf now reads /etc/hosts first"
fi

# A hot restart's successor gets 60 s to serve (loopmesh's default 15 s is too short for a VM under
# CPU emulation, where Node.js alone takes 5 to 8 s to load loopmesh).
{ lm_loopmesh_env /var/lib/loopmesh /etc/hosts 127.0.0.1:8653 127.0.0.1:9190; echo LOOPMESH_HANDOVER_TIMEOUT=60; } >/etc/default/loopmesh
install -m 0644 "$here/systemd/loopmesh.service" "$here/systemd/loopmesh-balancer.service" /etc/systemd/system/
systemctl daemon-reload
systemctl enable -q loopmesh-balancer loopmesh
systemctl restart loopmesh-balancer loopmesh
lm_wait_http http://127.0.0.1:9190/health 300 "loopmesh (control plane)"
echo "vm-loopmesh: loopmesh-balancer and loopmesh running as user loopmesh"
