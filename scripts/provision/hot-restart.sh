#!/usr/bin/env bash
# ExecReload of loopmesh-balancer.service and loopmesh-gateway.service (run from the installed copy,
# /opt/loopmesh/current/scripts/provision/hot-restart.sh):   hot-restart.sh UNIT MAINPID
# A hot restart: SIGUSR2 makes the serving process start a successor (the same command line, so the
# code on disk), hand it every listening socket, then stop accepting and drain. The successor tells
# systemd it is the unit's main process (sd_notify MAINPID=, the unit has NotifyAccess=all) before
# the old one stops, so systemd follows the process that serves and no connection is refused. This
# waits until systemd has switched, so `systemctl reload UNIT` returns once the new process serves;
# if the handover fails the old process keeps serving and this fails 10 s after its timeout.
set -euo pipefail
me=hot-restart.sh
[ $# -eq 2 ] || { echo "$me: usage: $me UNIT MAINPID" >&2; exit 2; }
unit=$1 old=$2
[[ $old =~ ^[1-9][0-9]*$ ]] || { echo "$me: MAINPID must be the pid of $unit's main process, got '$old'" >&2; exit 2; }
# The successor gets LOOPMESH_HANDOVER_TIMEOUT (the unit's EnvironmentFile; loopmesh's default 15 s)
# to serve; a little more here, by the clock (under emulation each systemctl call takes a while).
timeout=${LOOPMESH_HANDOVER_TIMEOUT:-15}
[[ $timeout =~ ^[0-9]+$ ]] || { echo "$me: LOOPMESH_HANDOVER_TIMEOUT must be whole seconds, got '$timeout'" >&2; exit 2; }
deadline=$((SECONDS + timeout + 10))
kill -USR2 "$old"
while [ $SECONDS -lt $deadline ]; do
  now=$(systemctl show --property MainPID --value "$unit")
  if [ "$now" != "$old" ] && [ "$now" != 0 ]; then
    echo "$me: $unit: process $now serves now; $old drains and exits"
    exit 0
  fi
  sleep 0.1
done
echo "$me: error: $unit's main process is still $old $((timeout + 10)) s after SIGUSR2: the handover failed (journalctl -u $unit, code LM_ERR_HANDOVER); $old keeps serving" >&2
exit 1
