// Package failover owns failure detection and the decision to fail over:
// the Detector (heartbeats on the replication and management paths, and
// QEMU liveness), the authenticated UDP heartbeat protocol of the
// management path, the client-oriented probes (ARP, ICMP, TCP) that ask
// whether the VM still answers on its LAN, the arbiters that turn the
// evidence into Promote or DoNotPromote, the witness lease server, and the
// primary-side guard that fences a primary which lost arbitration.
//
// # Wiring in the agent
//
// On the secondary B, one Detector watches the primary: the lockstep
// receiver calls Heard(ctx, PathRepl) for every frame from A, and a
// HeartbeatClient pinging A's HeartbeatServer over the management network
// calls Heard(ctx, PathMgmt) for every pong. On the primary A, a Detector
// watches B the same way (the HeartbeatServer's Heard, and ACKs on the
// replication link), and a second Detector with only a Liveness check
// (QMP query-status with a short deadline; ErrDead when the QEMU process
// exited) watches the local VM. A Lost event on B starts arbitration; a
// Lost event on A about B means degraded mode.
//
// # Arbitration and split brain (DESIGN.md invariant 4)
//
// Lost means "not heard", never "dead": the same silence comes from a dead
// primary and from a cut link. B therefore asks a Chain of arbiters, in
// order, and promotes only on a positive Promote:
//
//   - ProbeArbiter: B probes the VM's address on the LAN as a client would
//     (ARP, ICMP, TCP; MultiProbe: any answer means alive). Before
//     promotion, B's standby QEMU is paused in -incoming and its NIC is a
//     stream socket to B's agent, not a LAN port, so the only thing that
//     can answer for the VM's address (and MAC, if configured) is the
//     primary's VM. An answer means A runs and only the link broke:
//     DoNotPromote. After promotion the answer would come from B's own
//     VM, so the arbiter refuses to run (Evidence.LocalRunning, ErrUnsafe).
//     Silence is weaker evidence (B may have lost its own LAN port), so by
//     default it is Unknown and the next arbiter decides.
//   - WitnessArbiter: a third party grants each VM's lease to at most one
//     node; the first to ask after the lease expired wins (a race between
//     two secondaries has exactly one winner). The running primary renews
//     the lease every RenewEvery through its PrimaryGuard, so "held by A"
//     means A is alive: DoNotPromote. "Granted" means A stopped renewing
//     for a whole TTL, and A's guard fences its VM before that.
//   - When no arbiter decides (probe silent and witness unreachable, or no
//     witness configured), the Chain's fallback applies: DoNotPromote by
//     default. Losing availability until an operator acts is recoverable;
//     two running copies of the VM are not. Fallback Promote is allowed,
//     as an explicit, documented trade.
//
// Cases: replication link cut only: the VM answers the probe, B stays
// secondary, A goes on degraded (its output is released unprotected). A
// dead (host or agent): nothing answers, the lease lapses, B wins it and
// promotes. Agent A dead but QEMU A still running: the guest's NIC and
// disk go through agent A, so the VM can emit nothing and does not answer
// the probe; this is a dead primary. A cut off from the witness but
// alive: A self-fences when its lease runs out, B may then win the lease;
// if B's probe ran before A fenced, B answers DoNotPromote and must ask
// again later (the agent re-arbitrates while the detector stays Lost).
//
// # Lease timing
//
// The guard counts a grant's validity from when the renewal was sent,
// less Margin; the witness counts the TTL from when it received the
// request, so the primary's validity always ends first. The guard checks
// every RenewEvery, so it fences at the latest RenewEvery plus its own
// scheduling delay plus the fence's duration after validity ends; all of
// that must fit in Margin: Margin > RenewEvery + worst scheduling delay +
// fence time + clock-rate drift × TTL. Defaults: TTL 2 s, RenewEvery
// 200 ms, Margin 800 ms (the worst scheduling delay measured below is
// 335 ms, a QMP stop takes under 5 ms). The primary thus survives about
// 1 s without reaching the witness; a secondary wins the lease at most
// TTL after the primary's last renewal. A restarted witness grants only
// renewals (flag set by a running primary) for one TTL, since leases it
// granted before the restart may still be valid.
//
// # Heartbeat protocol
//
// See heartbeat.go: 64-byte UDP datagrams, HMAC-SHA256 with the pair's
// key, the type under the MAC (no reflection), pongs accepted only for a
// recent unanswered ping of the client's session, pings counted only when
// they echo one of the server's last two nonces (rotated every 10 s) and
// pass a 64-wide replay window per session.
//
// # Defaults from measurements
//
// BenchmarkHeartbeatRTT, 500 heartbeats at 10 ms on this project's
// 2-core machine (shared with other builds), two runs:
//
//	                         RTT p50     RTT p99     RTT max    max gap between pongs
//	loopback, idle           33-73 µs    0.11-0.53 ms  0.6-4 ms   13-17 ms
//	veth between netns, idle 48-75 µs    0.5-0.9 ms    1.6-3.4 ms 24-41 ms
//	loopback, CPUs busy      20-24 ms    45-116 ms     72-335 ms  73-335 ms
//	veth, CPUs busy          20-26 ms    56-91 ms      74-110 ms  96-265 ms
//
// ("CPUs busy": one hashing goroutine per CPU in the same process, as the
// agent's page comparison and compression would be.) The network itself
// costs well under a millisecond; what varies is scheduling, up to a third
// of a second. Hence DefaultInterval 100 ms (cheap: 64-byte packets),
// SuspectAfter 500 ms (above the worst gap, so Suspect does not flap under
// load), DefaultTimeout 1 s (three times the worst gap, and 9 lost
// heartbeats in a row when idle). Detection of a dead primary therefore
// takes 1 s plus one Interval; arbitration then costs one probe (ARP
// answers in under 1 ms; silence takes DefaultProbeTimeout, 500 ms) and
// one witness round trip, and the lease may make B wait until TTL after
// A's last renewal.
package failover
