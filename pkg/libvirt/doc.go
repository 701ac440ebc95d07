// Package libvirt owns ftctl's connection to libvirtd (through go-libvirt's
// dialers API): reading a domain's XML and state, defining, starting and
// destroying domains, QMP through libvirt's monitor pass-through, and the
// domain's lifecycle and QMP event streams. Sub-package domxml checks and
// rewrites domain XML for protection; libvirttest runs a private libvirtd
// for tests.
//
// QMP path. A protected domain's agent can reach QEMU two ways: libvirt's
// pass-through (Conn.QMP, no change to the domain; each command is a
// libvirtd RPC taken under libvirt's per-domain job lock, and the domain
// is tainted "custom-monitor"), or a second QMP monitor on a unix socket
// that domxml.Prepare adds through <qemu:commandline> (ftctl's own client:
// request ids, buffered events, deadlines, fd passing; tainted
// "custom-argv"). Either way libvirt sees QEMU's STOP and RESUME events on
// its own monitor, so `virsh domstate` follows the checkpoints' stop and
// cont ("paused (unknown)", then "running (unpaused)").
//
// Measured (BenchmarkQMPPath, libvirt 9.0 + QEMU 7.2 under TCG, same
// domain, same run, a loaded 2-core machine): query-status 5.0 ms through
// the pass-through vs 0.84 ms on the dedicated socket (6.0x); stop+cont
// 18.5 ms vs 3.6 ms (5.2x). A checkpoint issues at least stop, migrate and
// cont, so Prepare adds the dedicated socket by default.
package libvirt
