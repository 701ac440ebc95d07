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
// Standby as a libvirt domain (TestLiveStandbyDomain, libvirt 9.0 + QEMU
// 7.2). The standby on host B is defined with the primary's devices plus
// <qemu:arg value='-incoming'/><qemu:arg value='defer'/> and the
// dedicated QMP socket, and started paused (virsh start --paused,
// Conn.Start(ctx, name, true)): libvirt accepts it and reports "paused
// (user)" while QEMU sits in "inmigrate". The agent restores the
// checkpoint on the dedicated socket (checkpoint.RestoreDeviceState) and
// issues cont there: libvirt follows QEMU's RESUME event to "running
// (unpaused)", virsh list shows the domain, and virsh suspend / resume
// and libvirt's own monitor keep working afterwards. Guest RAM: libvirt
// names the file of its own backend (memory_backing_dir/<id>-<name>/pc.ram,
// the id known only after start; qemu.conf's memory_backing_dir moves
// only the directory), so copying the committed RAM into that file at
// failover would be the only way to use it. ftctl does not: domxml.Prepare
// gives the domain, through <qemu:commandline>,
//
//	<qemu:arg value='-object'/>
//	<qemu:arg value='memory-backend-file,id=ftmem,size=SIZE,mem-path=FILE,share=on'/>
//	<qemu:arg value='-machine'/>
//	<qemu:arg value='memory-backend=ftmem'/>
//
// which QEMU merges over libvirt's -machine option: the guest runs on FILE
// (the agent's, under its run directory; the replica file on B, so
// nothing is copied at failover) and libvirt's own pc.ram backend stays
// allocated but untouched and unmigrated. The backend id names the RAM
// block in the migration stream, so primary and standby use the same id;
// a second backend named pc.ram would clash with libvirt's. Both ways are
// exercised by TestLiveStandbyDomain.
//
// Measured (BenchmarkQMPPath, libvirt 9.0 + QEMU 7.2 under TCG, same
// domain, same run, a loaded 2-core machine): query-status 5.0 ms through
// the pass-through vs 0.84 ms on the dedicated socket (6.0x); stop+cont
// 18.5 ms vs 3.6 ms (5.2x). A checkpoint issues at least stop, migrate and
// cont, so Prepare adds the dedicated socket by default.
package libvirt
