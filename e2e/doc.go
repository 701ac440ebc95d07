// Package e2e owns ftctl's end-to-end scenarios: two KVM hosts and a client
// made of network namespaces (pkg/testbed), a real `ftctl agent` process in
// each host's namespace, real QEMU (TCG) running the built-in test guest,
// and the ftctl CLI driving them the way a user would. The scenarios are
// those of issue 6: the primary host dies, the replication link is cut, the
// secondary dies, a planned failover and failback, and the CLI's errors.
//
// The package holds tests only; they need root and QEMU and skip with a
// reason without them.
package e2e
