// Package goqemu owns the adapter that lets ftctl's qmp.Client stand in for
// go-qemu's qmp.Monitor (github.com/digitalocean/go-qemu/qmp), so code
// written against that interface - go-qemu's qemu.Domain, or its libvirt
// RPC monitor in place of ours - works with either.
package goqemu
