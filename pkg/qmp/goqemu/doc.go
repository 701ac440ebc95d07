// Package goqemu owns the adapter that lets ftctl's qmp.Client stand in for
// go-qemu's qmp.Monitor (github.com/digitalocean/go-qemu/qmp), so code
// written against that interface - go-qemu's qemu.Domain, or its libvirt
// RPC monitor in place of ours - works with either.
//
// The adapter is built only with the "goqemu" build tag for now: importing
// go-qemu/qmp pulls in github.com/digitalocean/go-libvirt, which needs go.sum
// entries the module does not carry yet. Once they are added (go get
// github.com/digitalocean/go-qemu/qmp@<pinned version>), drop the tag from
// monitor.go and monitor_test.go.
package goqemu
