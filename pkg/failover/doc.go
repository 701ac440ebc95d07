// Package failover owns failure detection and the decision to fail over:
// the Detector (heartbeats on the replication and management paths, and
// QEMU liveness), the authenticated UDP heartbeat protocol of the
// management path, the client-oriented probes (ARP, ICMP, TCP) that ask
// whether the VM still answers on its LAN, the arbiters that turn the
// evidence into Promote or DoNotPromote, and the primary-side guard that
// fences a primary which lost arbitration.
package failover
