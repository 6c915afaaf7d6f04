#!/usr/bin/env bash
# Builds the Vagrant box of the offline lab (vagrant-libvirt's format) from Debian's packages alone,
# for machines that cannot download a box: debootstrap of bookworm with every package the lab's
# provisioning needs preinstalled (the VMs reach no apt mirror), the vagrant user with Vagrant's
# insecure key and passwordless sudo, then `mkfs.ext4 -d` into a disk image (no loop device, no
# partition table) converted to qcow2. The image has no boot loader: the VMs boot its kernel and
# initrd directly (libvirt's <kernel>/<initrd>), which this script copies out next to the box.
#
#   build-box.sh            builds into $LOOPMESH_CACHE_DIR/box/bookworm-HASH (default ~/.cache/loopmesh)
#                           unless it is there already; prints that directory as its last line
#
# HASH is taken from this script, so a change here builds a new box. Needs root (debootstrap, chroot).
# The directory holds: loopmesh-lab.box (metadata.json + box.img + Vagrantfile, a tar), vmlinuz,
# initrd.img, cmdline (the kernel command line the image expects), build.log; with LAB_BOX_KEEP_ROOT=1
# also rootfs/, the tree itself.
set -euo pipefail

say() { printf 'build-box: %s\n' "$*" >&2; }
die() { printf 'build-box: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap and chroot need it), got uid $(id -u)"
cache=${LOOPMESH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/loopmesh}
mirror=${LAB_DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
# The disk the VMs get: the file system is made this large (sparse; the qcow2 holds only what is used).
disk_gb=8

# Everything the lab's provisioning (scripts/provision/vm-*.sh) would otherwise fetch with apt, plus
# what Vagrant needs from a Debian guest: sshd, sudo, rsync (synced folder), ifupdown and a DHCP
# client (its network configuration), dbus (hostnamectl).
packages=(
  systemd-sysv udev dbus linux-image-amd64 openssh-server sudo ifupdown isc-dhcp-client
  iproute2 iputils-ping procps kmod netbase less ca-certificates curl gnupg lsb-release rsync
  dnsutils socat redis-tools redis-server
)

hash=$(sha256sum <"$0" | cut -c1-12)
out=$cache/box/$suite-$hash
if [ -f "$out/loopmesh-lab.box" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ]; then
  say "box already built: $out"
  echo "$out"
  exit 0
fi

for cmd in debootstrap mkfs.ext4 qemu-img chroot tar; do
  command -v "$cmd" >/dev/null || die "$cmd is not installed (apt-get install debootstrap e2fsprogs qemu-utils)"
done
pubkey=""
for k in /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub /opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub; do
  [ -f "$k" ] && { pubkey=$k; break; }
done
[ -n "$pubkey" ] || die "Vagrant's insecure public key (keys/vagrant.pub in Vagrant's gem) was not found: is vagrant installed?"

work=$(mktemp -d "${TMPDIR:-/tmp}/loopmesh-box.XXXXXX")
root=$work/root
cleanup() {
  for m in proc sys dev/pts dev; do umount -l "$root/$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$out"
log=$out/build.log
: >"$log"
start=$SECONDS

say "debootstrap $suite (minbase + ${#packages[@]} packages) from $mirror into $root; log: $log"
include=$(IFS=,; echo "${packages[*]}")
if ! debootstrap --variant=minbase --include="$include" "$suite" "$root" "$mirror" >>"$log" 2>&1; then
  tail -n 20 "$log" >&2
  die "debootstrap failed (see $log)"
fi
say "debootstrap done in $((SECONDS - start)) s"

in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive "$@"; }

echo lm-box >"$root/etc/hostname"
cat >"$root/etc/hosts" <<'HOSTS'
127.0.0.1	localhost
127.0.1.1	lm-box
::1		localhost ip6-localhost ip6-loopback
HOSTS
# The whole disk is the file system (mkfs -d, no partition table), mounted read-write by the kernel.
cat >"$root/etc/fstab" <<'FSTAB'
/dev/vda	/	ext4	errors=remount-ro	0	0
FSTAB
# net.ifnames=0 on the kernel command line: the first NIC (Vagrant's management network) is eth0.
cat >"$root/etc/network/interfaces" <<'IFACES'
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback

auto eth0
iface eth0 inet dhcp
IFACES
cat >"$root/etc/apt/sources.list" <<APT
deb $mirror $suite main
deb $mirror $suite-updates main
deb http://deb.debian.org/debian-security $suite-security main
APT

in_root useradd --create-home --shell /bin/bash --user-group vagrant
install -d -m 0700 -o 1000 -g 1000 "$root/home/vagrant/.ssh"
[ "$(in_root id -u vagrant)" = 1000 ] || die "the vagrant user did not get uid 1000"
install -m 0600 -o 1000 -g 1000 "$pubkey" "$root/home/vagrant/.ssh/authorized_keys"
printf 'vagrant ALL=(ALL) NOPASSWD: ALL\nDefaults:vagrant !requiretty\n' >"$root/etc/sudoers.d/vagrant"
chmod 0440 "$root/etc/sudoers.d/vagrant"

# One box, many VMs: each makes its own machine-id and SSH host keys on its first boot.
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id" "$root"/etc/ssh/ssh_host_*
cat >"$root/etc/systemd/system/ssh-host-keys.service" <<'UNIT'
[Unit]
Description=Generate this VM's SSH host keys
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
UNIT
in_root systemctl enable -q ssh-host-keys.service
printf 'UseDNS no\n' >"$root/etc/ssh/sshd_config.d/vagrant.conf"
# Only the VMs that run the demo redis start it (scripts/provision/vm-demo.sh); apt's timers would
# reach for mirrors the VMs cannot reach.
in_root systemctl disable -q redis-server.service
in_root systemctl mask -q apt-daily.timer apt-daily-upgrade.timer

kernel=$(find "$root/boot" -maxdepth 1 -name 'vmlinuz-*' -printf '%f\n' | sort -V | tail -n 1)
[ -n "$kernel" ] || die "no kernel in $root/boot (linux-image-amd64 did not install?)"
version=${kernel#vmlinuz-}
[ -f "$root/boot/initrd.img-$version" ] || die "no initrd for kernel $version in $root/boot"
in_root apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/tmp/* "$root"/var/log/*.log

say "making the disk image (ext4 from the tree, ${disk_gb} GB sparse, then qcow2)"
raw=$work/box.raw
truncate -s "${disk_gb}G" "$raw"
mkfs.ext4 -q -F -L lm-root -d "$root" "$raw" >>"$log" 2>&1 || die "mkfs.ext4 -d failed (see $log)"
qemu-img convert -O qcow2 "$raw" "$work/box.img"
rm -f "$raw"
cp "$root/boot/$kernel" "$work/vmlinuz"
cp "$root/boot/initrd.img-$version" "$work/initrd.img"
cat >"$work/metadata.json" <<JSON
{ "provider": "libvirt", "format": "qcow2", "virtual_size": $disk_gb }
JSON
cat >"$work/Vagrantfile" <<'VF'
# loopmesh's offline lab box (scripts/box/build-box.sh): no boot loader in the image; the project's
# Vagrantfile boots the kernel and initrd built with it (libvirt's direct kernel boot).
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.disk_bus = "virtio"
  end
end
VF
tar -C "$work" -cf "$work/loopmesh-lab.box" metadata.json box.img Vagrantfile
mv "$work/loopmesh-lab.box" "$work/vmlinuz" "$work/initrd.img" "$out/"
echo "root=/dev/vda rw console=ttyS0,115200 net.ifnames=0 biosdevname=0" >"$out/cmdline"
echo "$version" >"$out/kernel-version"
# LAB_BOX_KEEP_ROOT=1 keeps the tree too, for `systemd-nspawn -b -D DIR/rootfs` (quick checks of units).
if [ "${LAB_BOX_KEEP_ROOT:-0}" = 1 ]; then rm -rf "$out/rootfs"; mv "$root" "$out/rootfs"; fi
say "box built in $((SECONDS - start)) s: $out ($(du -sh "$out/loopmesh-lab.box" | cut -f1), kernel $version)"
echo "$out"
