#!/usr/bin/env bash
# deps.sh installs, by Debian package name, everything ftctl and its tests
# need. It is the one place dependencies are installed: README.md, the
# Makefile and .ci/run all call it. Idempotent and quiet when all is present.
set -euo pipefail

PKGS=(
	qemu-system-x86      # the hypervisor ftctl drives
	qemu-utils           # qemu-img, qemu-io, qemu-nbd: real NBD clients in tests
	busybox-static       # the guest initramfs userland
	linux-image-cloud-amd64 # the guest kernel (virtio as modules, soft-dirty, sch_plug)
	iproute2             # ip netns / veth / tap for the test topology
	cpio                 # inspect the initramfs by hand (the builder writes newc itself)
	procps               # pgrep/ps used by hack scripts
	socat                # poking at QMP sockets by hand
	libvirt-daemon-system # libvirtd + QEMU driver; creates the libvirt-qemu user libvirtd's QEMU driver needs to start
	libvirt-clients      # virsh, for looking at test daemons by hand (hack/libvirtd.sh)
)

missing=()
for p in "${PKGS[@]}"; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
		missing+=("$p")
	fi
done

if ((${#missing[@]} == 0)); then
	exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
	echo "hack/deps.sh: missing packages: ${missing[*]}" >&2
	echo "hack/deps.sh: run as root (or: sudo apt-get install ${missing[*]})" >&2
	exit 1
fi

echo "hack/deps.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "hack/deps.sh: done" >&2
