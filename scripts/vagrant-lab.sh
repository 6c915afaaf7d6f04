#!/usr/bin/env bash
# The Vagrant lab (vagrant/Vagrantfile) on this Linux host, offline: nothing is downloaded but
# Debian's packages and, once, what `npm ci` and scripts/install-consul.sh fetch. As root:
#
#   scripts/vagrant-lab.sh up        installs what it needs (qemu, libvirt, vagrant, vagrant-libvirt,
#                                    debootstrap), starts libvirtd if none runs, builds the box once
#                                    (scripts/box/build-box.sh, cached), bundles Node.js, Consul and
#                                    loopmesh's build for the VMs, then `vagrant up` with libvirt:
#                                    KVM where it can run the guest's kernel, QEMU's emulation (TCG) where not
#   scripts/vagrant-lab.sh status    the VMs, their services, what libvirt holds
#   scripts/vagrant-lab.sh test      test/vagrant/ against the lab (brings one up and down if none is up)
#   scripts/vagrant-lab.sh ssh VM [CMD...]   a shell or a command on VM (lm-server, lm-node1, ...)
#   scripts/vagrant-lab.sh vagrant ARGS...   any vagrant command with the lab's settings (halt lm-node2, ...)
#   scripts/vagrant-lab.sh down      vagrant destroy -f, then checks that no domain, volume, network or
#                                    process of the lab is left (and stops the libvirtd it started)
#   scripts/vagrant-lab.sh accel     prints kvm or tcg (exit 0), or none and why (exit 3)
#
# Settings: NODES (client VMs, default 2), LAB_ACCEL=auto|kvm|tcg (default auto), LAB_SUBNET_PREFIX,
# LOOPMESH_CACHE_DIR (default ~/.cache/loopmesh; the box, the bundle and this lab's state live there).
# The online path needs none of this: `cd vagrant && vagrant up` (README, "On virtual machines").
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
. "$repo/scripts/lib.sh"
die() { printf 'vagrant-lab.sh: error: %s\n' "$*" >&2; exit 1; }

cache=${LOOPMESH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/loopmesh}
state=$cache/vagrant-lab
bundle=$state/bundle
envfile=$state/env
# Kernels the VMs boot directly: where libvirt's unprivileged QEMU user can read them (not under /root).
bootdir=/var/lib/libvirt/boot/loopmesh-lab
box_prefix=loopmesh-lab/bookworm
uri=qemu:///system

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

need_root() { [ "$(id -u)" -eq 0 ] || die "run as root (libvirt's system instance, debootstrap), got uid $(id -u)"; }

ensure_host_packages() {
  [ "$(uname -s)" = Linux ] || die "the lab runs on Linux hosts (libvirt + QEMU), this is $(uname -s)"
  [ "$(uname -m)" = x86_64 ] || die "the lab's box is amd64, this host is $(uname -m)"
  ensure_packages qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils libvirtd:libvirt-daemon-system \
    virsh:libvirt-clients vagrant:vagrant debootstrap:debootstrap mkfs.ext4:e2fsprogs rsync:rsync \
    dnsmasq:dnsmasq-base ssh:openssh-client
  if ! dpkg-query -W -f='${Status}' vagrant-libvirt 2>/dev/null | grep -q 'install ok installed'; then
    log "installing Debian packages: vagrant-libvirt"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends vagrant-libvirt >/dev/null
  fi
}

libvirt_up() { virsh -c "$uri" -q uri >/dev/null 2>&1; }

# Starts virtlogd and libvirtd if none answers; remembers it did, so `down` stops them again.
ensure_libvirtd() {
  libvirt_up && return 0
  mkdir -p "$state"
  if [ -d /run/systemd/system ]; then
    log "starting libvirtd (systemctl)"
    systemctl start virtlogd.socket libvirtd.service
  else
    # No systemd as PID 1 (a container, a CI runner): the daemons run detached.
    log "starting virtlogd and libvirtd (no systemd here: as daemons)"
    pgrep -x virtlogd >/dev/null || virtlogd -d
    pgrep -x libvirtd >/dev/null || libvirtd -d
    echo started >"$state/daemons"
  fi
  for _ in $(seq 1 100); do libvirt_up && return 0; sleep 0.2; done
  die "libvirtd does not answer on $uri after 20 s (see /var/log/libvirt/)"
}

# (Captured, not piped into grep -q: with pipefail, grep quitting early fails the pipeline.)
pool_running() { [[ $(virsh -c "$uri" pool-info default 2>/dev/null) =~ State:[[:space:]]+running ]]; }

ensure_pool() {
  if virsh -c "$uri" pool-info default >/dev/null 2>&1; then
    # libvirtd may be autostarting it this very moment.
    pool_running || virsh -c "$uri" -q pool-start default >/dev/null 2>&1 || pool_running ||
      die "libvirt's storage pool 'default' exists but does not start: virsh pool-start default"
    return 0
  fi
  log "defining libvirt's storage pool 'default' in /var/lib/libvirt/images"
  virsh -c "$uri" -q pool-define-as default dir --target /var/lib/libvirt/images >/dev/null
  virsh -c "$uri" -q pool-build default >/dev/null
  virsh -c "$uri" -q pool-start default >/dev/null
  virsh -c "$uri" -q pool-autostart default >/dev/null
}

build_box() {
  box_dir=$(bash "$repo/scripts/box/build-box.sh" | tail -n 1)
  [ -f "$box_dir/loopmesh-lab.box" ] || die "scripts/box/build-box.sh did not leave a box in '$box_dir'"
  box_name=$box_prefix-${box_dir##*-}
}

# probe ACCEL: boots the box's kernel with no root file system under QEMU; it can when the kernel gets
# as far as looking for its root (a stock kernel on a KVM that cannot run it fails long before).
probe() {
  local accel=$1 cpu out secs
  # KVM gets there in seconds or hangs on an emulation failure; the emulation takes longer.
  case $accel in kvm) cpu=host secs=60 ;; tcg) cpu=max secs=300 ;; esac
  out=$(timeout "$secs" qemu-system-x86_64 -accel "$accel" -cpu "$cpu" -m 512 -smp 1 -display none -no-reboot \
    -serial stdio -monitor none -kernel "$box_dir/vmlinuz" -append "console=ttyS0 panic=-1" 2>&1 || true)
  if grep -q 'VFS: Unable to mount root fs' <<<"$out"; then return 0; fi
  probe_error=$(grep -m 3 -E -i 'error|failure|fault|panic' <<<"$out" | tr '\n' ' ' | cut -c1-300)
  [ -n "$probe_error" ] || probe_error="the kernel did not get to its root file system within $secs s"
  return 1
}

# Sets accel (kvm|tcg|none) and accel_reason; cached per kernel in $state/accel.
detect_accel() {
  local want=${LAB_ACCEL:-auto} kernel cached
  case $want in auto|kvm|tcg) ;; *) die "LAB_ACCEL must be auto, kvm or tcg, got '$want'" ;; esac
  kernel=$(cat "$box_dir/kernel-version")
  cached=$(cat "$state/accel" 2>/dev/null || true)
  if [ "$want" = auto ] && [ "${cached#* }" = "$kernel" ]; then
    accel=${cached%% *}
    accel_reason="cached for kernel $kernel in $state/accel"
    return 0
  fi
  mkdir -p "$state"
  accel=none accel_reason=""
  if [ "$want" != tcg ]; then
    if [ ! -c /dev/kvm ]; then
      accel_reason="no /dev/kvm"
    elif ! (exec 3<>/dev/kvm) 2>/dev/null; then
      accel_reason="/dev/kvm cannot be opened"
    elif probe kvm; then
      accel=kvm accel_reason="KVM boots the box's kernel $kernel"
    else
      accel_reason="/dev/kvm opens but KVM cannot run the box's kernel $kernel: $probe_error"
    fi
    [ "$want" = kvm ] && [ $accel = none ] && die "LAB_ACCEL=kvm but $accel_reason"
  fi
  if [ $accel = none ]; then
    if probe tcg; then
      accel=tcg accel_reason="${accel_reason:+$accel_reason; }QEMU's emulation (TCG) boots it"
    else
      accel_reason="${accel_reason:+$accel_reason; }and QEMU's emulation (TCG) cannot boot it either: $probe_error"
      return 0
    fi
  fi
  echo "$accel $kernel" >"$state/accel"
}

# libvirt asks QEMU again what it can do on every call while /dev/kvm exists, is usable by QEMU's
# user and KVM fails: slow (an `up` measured 702 s instead of 274). Root and group kvm only, then.
calm_kvm_probing() {
  [ "$accel" = tcg ] && [ -c /dev/kvm ] || return 0
  if [ "$(stat -c '%G %a' /dev/kvm)" != "kvm 660" ] && getent group kvm >/dev/null; then
    log "KVM cannot run the guest: /dev/kvm to group kvm, mode 660 (from $(stat -c '%U:%G %a' /dev/kvm)), so libvirt stops re-probing it"
    chgrp kvm /dev/kvm
    chmod 660 /dev/kvm
  fi
}

# The bundle the offline VMs install from (LAB_BUNDLE, synced to /opt/loopmesh-bundle): this host's
# Node.js (a Debian 12 build runs on the bookworm guests), Consul, and loopmesh built here.
make_bundle() {
  local node_bin node_major
  node_bin=$(readlink -f "$(command -v node)")
  node_major=$("$node_bin" -p 'process.versions.node.split(".")[0]')
  [ "$node_major" -ge 20 ] || die "the VMs get this host's Node.js, which must be 20 or newer; have $("$node_bin" --version) at $node_bin"
  grep -q 'VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null ||
    log "warning: this host is not Debian 12 (bookworm); its Node.js binary at $node_bin must run on the bookworm guests"
  (cd "$repo" && ensure_node_modules && ensure_consul && printf '%s\n' "$CONSUL_BIN" >"$state/consul-bin")
  mkdir -p "$bundle/bin" "$bundle/loopmesh"
  install -m 0755 "$node_bin" "$bundle/bin/node"
  install -m 0755 "$(cat "$state/consul-bin")" "$bundle/bin/consul"
  rsync -a --delete "$repo/dist/" "$bundle/loopmesh/dist/"
  # Runtime dependencies only (no TypeScript, no test tools): smaller to sync into every VM.
  if ! cmp -s "$repo/package-lock.json" "$bundle/loopmesh/package-lock.json" || [ ! -d "$bundle/loopmesh/node_modules" ]; then
    cp "$repo/package.json" "$repo/package-lock.json" "$bundle/loopmesh/"
    log "bundle: npm ci --omit=dev (runtime dependencies for the VMs)"
    if ! (cd "$bundle/loopmesh" && npm ci --omit=dev --ignore-scripts --prefer-offline --no-audit --no-fund --loglevel=error >&2); then
      log "npm ci --omit=dev failed; the VMs get this checkout's node_modules instead"
      rsync -a --delete "$repo/node_modules/" "$bundle/loopmesh/node_modules/"
    fi
  fi
}

add_box() {
  local boxes
  boxes=$(vagrant box list 2>/dev/null || true)
  if ! grep -q "^$box_name " <<<"$boxes"; then
    local old
    for old in $(awk -v p="$box_prefix-" 'index($1, p) == 1 { print $1 }' <<<"$boxes"); do
      log "removing the older lab box $old"
      vagrant box remove --force --all "$old" >/dev/null
    done
    log "vagrant box add $box_name"
    vagrant box add --name "$box_name" "$box_dir/loopmesh-lab.box" >&2
  fi
  mkdir -p "$bootdir"
  install -m 0644 "$box_dir/vmlinuz" "$bootdir/vmlinuz-${box_dir##*-}"
  install -m 0644 "$box_dir/initrd.img" "$bootdir/initrd.img-${box_dir##*-}"
}

write_env() {
  local nodes=${NODES:-2} driver
  [[ $nodes =~ ^[0-9]+$ ]] && [ "$nodes" -ge 1 ] && [ "$nodes" -le 20 ] || die "NODES must be from 1 to 20, got '$nodes'"
  case $accel in kvm) driver=kvm ;; tcg) driver=qemu ;; *) die "no accelerator to run the VMs: $accel_reason" ;; esac
  mkdir -p "$state"
  {
    printf '%s=%q\n' VAGRANT_DEFAULT_PROVIDER libvirt NODES "$nodes" LAB_SUBNET_PREFIX "${LAB_SUBNET_PREFIX:-10.77.77}" \
      LAB_OFFLINE 1 LAB_BOX "$box_name" LAB_KERNEL "$bootdir/vmlinuz-${box_dir##*-}" \
      LAB_INITRD "$bootdir/initrd.img-${box_dir##*-}" LAB_CMDLINE "$(cat "$box_dir/cmdline")" \
      LAB_BUNDLE "$bundle" LAB_LIBVIRT_DRIVER "$driver"
  } >"$envfile"
}

load_env() {
  [ -f "$envfile" ] || return 1
  set -a
  # shellcheck disable=SC1090
  . "$envfile"
  set +a
}

in_vagrant() { (cd "$repo/vagrant" && vagrant "$@"); }

lab_up() {
  need_root
  local t0=$SECONDS t
  ensure_host_packages
  ensure_libvirtd
  ensure_pool
  t=$SECONDS; build_box; log "box: $box_dir ($((SECONDS - t)) s)"
  detect_accel
  [ "$accel" != none ] || die "neither KVM nor QEMU's emulation can run the VMs here: $accel_reason"
  log "accelerator: $accel ($accel_reason)"
  calm_kvm_probing
  t=$SECONDS; make_bundle; log "bundle: $bundle ($((SECONDS - t)) s)"
  add_box
  write_env
  load_env
  log "vagrant up: lm-server and $NODES client VMs ($accel; a few minutes, more under emulation)"
  t=$SECONDS
  in_vagrant up --provider=libvirt
  local up_s=$((SECONDS - t))
  in_vagrant ssh-config >"$state/ssh-config"
  echo "up_seconds=$up_s accel=$accel nodes=$NODES" >"$state/last-up"
  log "lab up: vagrant up $up_s s, all of it $((SECONDS - t0)) s; try: scripts/vagrant-lab.sh ssh lm-node1 curl -s http://web.local/"
}

lab_status() {
  need_root
  load_env || { echo "no lab state in $state: scripts/vagrant-lab.sh up"; return 0; }
  libvirt_up || { echo "libvirtd is not running: no lab"; return 0; }
  in_vagrant status || true
  local vm
  for vm in $(virsh -c "$uri" list --name | grep -E '^vagrant_lm-' | sed 's/^vagrant_//'); do
    printf '%s: ' "$vm"
    ssh -F "$state/ssh-config" -o ConnectTimeout=10 "$vm" \
      "systemctl is-active consul loopmesh-balancer loopmesh $([ "$vm" = lm-server ] && echo loopmesh-gateway) | paste -sd ' '" 2>/dev/null || echo "(no ssh)"
  done
}

lab_ssh() {
  need_root
  load_env || die "no lab state in $state: scripts/vagrant-lab.sh up first"
  [ $# -ge 1 ] || die "usage: vagrant-lab.sh ssh VM [COMMAND...]"
  [ -f "$state/ssh-config" ] || in_vagrant ssh-config >"$state/ssh-config"
  local vm=$1
  shift
  if [ $# -eq 0 ]; then exec ssh -F "$state/ssh-config" "$vm"; fi
  exec ssh -F "$state/ssh-config" "$vm" "$@"
}

# What the lab may leave behind in libvirt, one "kind name" a line.
leftovers() {
  libvirt_up || return 0
  virsh -c "$uri" list --all --name | grep -E '^vagrant_lm-' | sed 's/^/domain /' || true
  virsh -c "$uri" vol-list default 2>/dev/null | awk 'NR > 2 && NF { print $1 }' |
    grep -E '^(vagrant_lm-|loopmesh-lab)' | sed 's/^/volume /' || true
  virsh -c "$uri" net-list --all --name | grep -E '^vagrant-' | sed 's/^/network /' || true
}

lab_down() {
  need_root
  load_env || true
  if libvirt_up && [ -n "${LAB_BOX:-}" ]; then
    log "vagrant destroy -f"
    in_vagrant destroy -f || log "vagrant destroy failed; removing what is left by hand"
  fi
  local vmleft
  vmleft=$(leftovers)
  if [ -n "$vmleft" ]; then
    # The box's base volume stays in the pool by vagrant-libvirt's design; the rest would be a failure.
    grep -v '^volume loopmesh-lab' <<<"$vmleft" | sed 's/^/vagrant-lab.sh: left by vagrant destroy: /' >&2 || true
    local kind name
    while read -r kind name; do
      case $kind in
        domain) virsh -c "$uri" -q destroy "$name" >/dev/null 2>&1 || true
                virsh -c "$uri" -q undefine "$name" --remove-all-storage >/dev/null 2>&1 || virsh -c "$uri" -q undefine "$name" >/dev/null 2>&1 || true ;;
        volume) virsh -c "$uri" -q vol-delete --pool default "$name" >/dev/null ;;
        network) virsh -c "$uri" -q net-destroy "$name" >/dev/null 2>&1 || true
                 virsh -c "$uri" -q net-undefine "$name" >/dev/null 2>&1 || true ;;
      esac
    done <<<"$vmleft"
  fi
  rm -f "$state/ssh-config"
  if [ -f "$state/daemons" ]; then
    if [ -n "$(virsh -c "$uri" list --name 2>/dev/null | grep -v '^$' || true)" ]; then
      log "other libvirt domains run: libvirtd stays"
    else
      # The networks that started with the daemon (libvirt's own 'default'), then the daemons.
      local net
      for net in $(virsh -c "$uri" net-list --name 2>/dev/null); do virsh -c "$uri" -q net-destroy "$net" >/dev/null || true; done
      log "stopping the libvirtd and virtlogd this script started"
      [ -f /run/libvirtd.pid ] && kill "$(cat /run/libvirtd.pid)" 2>/dev/null || true
      for _ in $(seq 1 50); do pgrep -x libvirtd >/dev/null || break; sleep 0.2; done
      [ -f /run/virtlogd.pid ] && kill "$(cat /run/virtlogd.pid)" 2>/dev/null || true
      rm -f "$state/daemons"
    fi
  fi
  local left
  left=$(leftovers)
  left+=$(pgrep -a -f '^/usr/bin/qemu-system-x86_64 .*guest=vagrant_lm-' | sed 's/^/process /' || true)
  [ -z "$left" ] || die "still left after down: $(tr '\n' ';' <<<"$left")"
  log "down: no domain, volume, network or QEMU process of the lab is left"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in
  up) lab_up ;;
  status) lab_status ;;
  down) lab_down ;;
  ssh) lab_ssh "$@" ;;
  vagrant) need_root; load_env || die "no lab state in $state: scripts/vagrant-lab.sh up first"; in_vagrant "$@" ;;
  test) cd "$repo" && ensure_node_modules && exec npm run -s test:vagrant ;;
  accel)
    need_root
    ensure_host_packages
    build_box
    detect_accel
    if [ "$accel" = none ]; then echo "none: $accel_reason"; exit 3; fi
    echo "$accel: $accel_reason" ;;
  *) usage ;;
esac
