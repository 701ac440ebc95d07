// Package testbed owns throwaway network topologies made of Linux network
// namespaces: "two KVM hosts and a client" on one machine, for ftctl's
// failover tests, `ftctl demo` and benchmarks.
//
// A Bed is a small LAN and two private segments, all inside namespaces the
// Bed created, so no packet of it can reach the machine's own networks:
//
//	ns <p>-<s>-a (host A)      ns <p>-<s>-b (host B)      ns <p>-<s>-client
//	  br-vm  10.213.L.11/24      br-vm  10.213.L.12/24      lan0 10.213.L.100/24
//	   └ lan0                     └ lan0                     │
//	  repl0  10.213.R.1/24       repl0  10.213.R.2/24        │
//	  mgmt0  10.213.M.1/24       mgmt0  10.213.M.2/24        │
//	     │ │ │                      │ │ │                    │
//	  ns <p>-<s>-lan (the switch): bridges "lan", "repl", "mgmt"; one port per
//	  host and network, named "<host>-<net>" (a-lan, a-repl, b-mgmt, client-lan)
//
// L, R and M are 3s, 3s+1 and 3s+2 for the Bed's slot s (0..84), so beds
// that exist at the same time use distinct subnets. Virtual machines join a
// host's br-vm and so sit on the LAN; VMAddr and VMMAC give VM i an address
// and MAC that stay the same on whichever host it runs, so an address can
// move between hosts the way a failover moves it.
//
// Links are cut in the switch by detaching the host's port from its bridge:
// traffic vanishes silently while both ends keep their carrier, as when a
// switch or a cable in the middle fails. That is the hard case for failure
// detection, which must then rely on heartbeats timing out.
//
// Every Bed holds a lock file (/run/ftctl-testbed/<p>-<s>.lock) for as long
// as it lives; the kernel drops the lock when the process dies, which is how
// CleanupStale tells beds of crashed runs from live ones.
//
// Creating namespaces needs root (ErrNeedRoot otherwise).
package testbed
