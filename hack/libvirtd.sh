#!/usr/bin/env bash
# libvirtd.sh runs a private libvirtd (and the virtlogd it needs) whose whole
# state lives under one directory, so a test, or each of two test "hosts" on
# one machine, gets its own daemon without touching the system's libvirt.
#
#   hack/libvirtd.sh DIR
#
# It stays in the foreground until SIGTERM/SIGINT, then destroys what the
# daemon left running and stops both daemons. Needs root.
#
# How: libvirtd's privileged paths (/run/libvirt, /var/lib/libvirt,
# /etc/libvirt, /var/log/libvirt, /var/cache/libvirt) are fixed at build
# time, so the script re-executes itself in a private mount namespace and
# bind-mounts DIR/{run,lib,etc,log,cache} over them. Everything is reachable
# from outside through DIR: the client socket is DIR/run/libvirt-sock, QEMU
# logs are in DIR/log/qemu, guest RAM files in DIR/lib/qemu/ram. A network
# namespace is inherited: start the script inside `ip netns exec NS` to give
# the daemon (and its QEMUs) that network.
#
# Configuration (written only when absent, so a caller may provide its own):
#   libvirtd.conf  root-only socket without polkit, no TCP
#   qemu.conf      QEMU as root, no cgroups, no per-VM mount namespace, no
#                  security driver: this machine runs in a container without
#                  systemd, and tests need none of them.
set -euo pipefail

die() {
	echo "hack/libvirtd.sh: $*" >&2
	exit 1
}

[[ $# -eq 1 ]] || die "usage: $0 DIR"
[[ $(id -u) -eq 0 ]] || die "needs root"
for b in libvirtd virtlogd unshare; do
	command -v "$b" >/dev/null || die "$b not found (install with hack/deps.sh)"
done

dir=$(realpath -m "$1")

if [[ ${FTCTL_LIBVIRTD_INNER:-} != "$dir" ]]; then
	mkdir -p "$dir"
	FTCTL_LIBVIRTD_INNER=$dir exec unshare --mount --propagation private "$0" "$dir"
fi

# Inside the private mount namespace from here on.
declare -A mounts=(
	[run]=/run/libvirt
	[lib]=/var/lib/libvirt
	[etc]=/etc/libvirt
	[log]=/var/log/libvirt
	[cache]=/var/cache/libvirt
)
for sub in "${!mounts[@]}"; do
	mkdir -p "$dir/$sub" "${mounts[$sub]}"
	mount --bind "$dir/$sub" "${mounts[$sub]}"
done
mkdir -p /etc/libvirt/qemu /var/lib/libvirt/qemu /var/log/libvirt/qemu

if [[ ! -e /etc/libvirt/libvirtd.conf ]]; then
	cat >/etc/libvirt/libvirtd.conf <<-'EOF'
		unix_sock_group = "root"
		unix_sock_ro_perms = "0700"
		unix_sock_rw_perms = "0700"
		auth_unix_ro = "none"
		auth_unix_rw = "none"
		log_outputs = "3:stderr"
	EOF
fi
if [[ ! -e /etc/libvirt/qemu.conf ]]; then
	cat >/etc/libvirt/qemu.conf <<-'EOF'
		user = "root"
		group = "root"
		swtpm_user = "root"
		swtpm_group = "root"
		dynamic_ownership = 0
		remember_owner = 0
		security_driver = "none"
		cgroup_controllers = [ ]
		namespaces = [ ]
		stdio_handler = "logd"
	EOF
fi
[[ -e /etc/libvirt/virtlogd.conf ]] || echo 'log_outputs = "3:stderr"' >/etc/libvirt/virtlogd.conf

virtlogd_pid=
libvirtd_pid=
stop() {
	trap - TERM INT EXIT
	if [[ -n $libvirtd_pid ]]; then
		kill -TERM "$libvirtd_pid" 2>/dev/null || true
		wait "$libvirtd_pid" 2>/dev/null || true
	fi
	# libvirtd leaves its QEMUs running on purpose (a daemon restart must not
	# kill guests); a private test daemon must not leak them.
	for pidfile in /run/libvirt/qemu/*.pid; do
		[[ -e $pidfile ]] || continue
		pid=$(<"$pidfile")
		[[ $pid =~ ^[0-9]+$ ]] && kill -KILL "$pid" 2>/dev/null || true
	done
	if [[ -n $virtlogd_pid ]]; then
		kill -TERM "$virtlogd_pid" 2>/dev/null || true
		wait "$virtlogd_pid" 2>/dev/null || true
	fi
}
trap stop TERM INT EXIT

virtlogd --pid-file "$dir/virtlogd.pid" &
virtlogd_pid=$!
libvirtd --pid-file "$dir/libvirtd.pid" &
libvirtd_pid=$!
# wait returns early when a trapped signal arrives; the trap then stops both.
wait "$libvirtd_pid" || true
