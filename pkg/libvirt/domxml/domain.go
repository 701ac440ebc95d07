package domxml

import (
	"encoding/xml"
	"errors"
	"fmt"
	"strings"
)

// XML namespaces this package reads and writes.
const (
	// QEMUNamespace is libvirt's namespace for <qemu:commandline>.
	QEMUNamespace = "http://libvirt.org/schemas/domain/qemu/1.0"
	// Namespace is ftctl's own namespace for the <metadata> element that
	// records what Prepare changed (and, later, peer and policy for the hook).
	Namespace = "https://github.com/ftctl/ftctl/xmlns/libvirt/1"
	// Prefix is the prefix Prepare binds Namespace to.
	Prefix = "ftctl"
)

// Domain is the part of a libvirt domain definition that protection
// depends on. It is read with encoding/xml; rewriting happens on the
// Document tree, so everything this struct leaves out survives.
type Domain struct {
	XMLName       xml.Name       `xml:"domain"`
	Type          string         `xml:"type,attr"`
	Name          string         `xml:"name"`
	UUID          string         `xml:"uuid"`
	Memory        *Memory        `xml:"memory"`
	MaxMemory     *struct{}      `xml:"maxMemory"`
	MemoryBacking *MemoryBacking `xml:"memoryBacking"`
	OS            OS             `xml:"os"`
	CPU           *CPU           `xml:"cpu"`
	Devices       Devices        `xml:"devices"`
	Commandline   *Commandline   `xml:"http://libvirt.org/schemas/domain/qemu/1.0 commandline"`
	Metadata      *Metadata      `xml:"metadata"`
}

// Memory is <memory>: the guest's RAM at boot, libvirt's -m.
type Memory struct {
	Unit  string `xml:"unit,attr"`
	Value string `xml:",chardata"`
}

// MemoryBacking is <memoryBacking>.
type MemoryBacking struct {
	Hugepages *struct{} `xml:"hugepages"`
	Source    *TypeAttr `xml:"source"`
	Access    *ModeAttr `xml:"access"`
	Locked    *struct{} `xml:"locked"`
	Discard   *struct{} `xml:"discard"`
}

// TypeAttr is an element whose only interesting attribute is type.
type TypeAttr struct {
	Type string `xml:"type,attr"`
}

// ModeAttr is an element whose only interesting attribute is mode.
type ModeAttr struct {
	Mode string `xml:"mode,attr"`
}

// OS is <os>.
type OS struct {
	Type struct {
		Arch    string `xml:"arch,attr"`
		Machine string `xml:"machine,attr"`
		Value   string `xml:",chardata"`
	} `xml:"type"`
}

// CPU is <cpu>.
type CPU struct {
	Mode  string     `xml:"mode,attr"`
	Cells []NUMACell `xml:"numa>cell"`
}

// NUMACell is <cpu><numa><cell>.
type NUMACell struct {
	ID        string `xml:"id,attr"`
	MemAccess string `xml:"memAccess,attr"`
}

// Devices is <devices>.
type Devices struct {
	Disks       []Disk      `xml:"disk"`
	Interfaces  []Interface `xml:"interface"`
	Controllers []struct {
		Type  string `xml:"type,attr"`
		Index string `xml:"index,attr"`
		Model string `xml:"model,attr"`
	} `xml:"controller"`
	Hostdevs    []struct{} `xml:"hostdev"`
	Filesystems []struct {
		Driver *TypeAttr `xml:"driver"`
	} `xml:"filesystem"`
	Shmems []struct{} `xml:"shmem"`
	TPMs   []struct {
		Backend *TypeAttr `xml:"backend"`
	} `xml:"tpm"`
	Redirdevs []struct{} `xml:"redirdev"`
	Videos    []Video    `xml:"video"`
}

// Video is <video>; its model's sizes are in KiB, as libvirt writes them.
type Video struct {
	Model *struct {
		Type   string `xml:"type,attr"`
		VRAM   string `xml:"vram,attr"`
		RAM    string `xml:"ram,attr"`
		VGAMem string `xml:"vgamem,attr"`
	} `xml:"model"`
}

// Disk is <disk>.
type Disk struct {
	Type   string `xml:"type,attr"`
	Device string `xml:"device,attr"`
	Driver *struct {
		Name  string `xml:"name,attr"`
		Type  string `xml:"type,attr"`
		Cache string `xml:"cache,attr"`
		IO    string `xml:"io,attr"`
	} `xml:"driver"`
	Source *struct {
		File     string `xml:"file,attr"`
		Dev      string `xml:"dev,attr"`
		Protocol string `xml:"protocol,attr"`
		Name     string `xml:"name,attr"`
		Pool     string `xml:"pool,attr"`
		Volume   string `xml:"volume,attr"`
		Hosts    []struct {
			Transport string `xml:"transport,attr"`
			Socket    string `xml:"socket,attr"`
			Name      string `xml:"name,attr"`
		} `xml:"host"`
	} `xml:"source"`
	Target struct {
		Dev string `xml:"dev,attr"`
		Bus string `xml:"bus,attr"`
	} `xml:"target"`
	ReadOnly  *struct{} `xml:"readonly"`
	Shareable *struct{} `xml:"shareable"`
	Transient *struct{} `xml:"transient"`
}

// Interface is <interface>.
type Interface struct {
	Type string `xml:"type,attr"`
	MAC  *struct {
		Address string `xml:"address,attr"`
	} `xml:"mac"`
	Source *struct {
		Bridge  string `xml:"bridge,attr"`
		Network string `xml:"network,attr"`
		Dev     string `xml:"dev,attr"`
		Address string `xml:"address,attr"`
		Port    string `xml:"port,attr"`
	} `xml:"source"`
	Model   *TypeAttr   `xml:"model"`
	Address *PCIAddress `xml:"address"`
	Boot    *struct {
		Order string `xml:"order,attr"`
	} `xml:"boot"`
}

// PCIAddress is a device's <address>.
type PCIAddress struct {
	Type     string `xml:"type,attr"`
	Domain   string `xml:"domain,attr"`
	Bus      string `xml:"bus,attr"`
	Slot     string `xml:"slot,attr"`
	Function string `xml:"function,attr"`
}

// Commandline is <qemu:commandline>.
type Commandline struct {
	Args []struct {
		Value string `xml:"value,attr"`
	} `xml:"http://libvirt.org/schemas/domain/qemu/1.0 arg"`
}

// Metadata is <metadata>, of which only ftctl's element is read.
type Metadata struct {
	Protection *Protection `xml:"https://github.com/ftctl/ftctl/xmlns/libvirt/1 protection"`
}

// Protection is ftctl's record, inside <metadata>, of how the domain was
// prepared: which sockets the agent must serve and what each replaced
// device was, so the agent can open the original image and attach the
// guest's traffic where the original NIC was, and so the change can be
// undone.
type Protection struct {
	// Role is "" for a domain prepared on its own host (a primary), or
	// RoleStandby for the definition an agent made, with Standby, for the
	// standby of a VM protected from another host: that agent owns its
	// devices, and the hook leaves it alone.
	Role string `xml:"role,attr,omitempty"`
	// Peer is the peer agent (HOST:PORT) the hook pairs the domain with
	// when it starts; "" leaves pairing to the user.
	Peer string `xml:"peer,attr,omitempty"`
	// Policy says what the hook does: PolicyAuto (pair on start, unpair
	// on stop; the default when Peer is set) or PolicyManual (nothing).
	Policy string           `xml:"policy,attr,omitempty"`
	QMP    *ProtectedQMP    `xml:"https://github.com/ftctl/ftctl/xmlns/libvirt/1 qmp"`
	Memory *ProtectedMemory `xml:"https://github.com/ftctl/ftctl/xmlns/libvirt/1 memory"`
	Disks  []ProtectedDisk  `xml:"https://github.com/ftctl/ftctl/xmlns/libvirt/1 disk"`
	NICs   []ProtectedNIC   `xml:"https://github.com/ftctl/ftctl/xmlns/libvirt/1 nic"`
	// Probe is how the secondary checks, before promoting, whether the
	// VM still answers on its LAN; nil when none is recorded. Standby and
	// Promoted keep it. See Probe.
	Probe *Probe `xml:"https://github.com/ftctl/ftctl/xmlns/libvirt/1 probe"`
}

// ProtectedQMP records the dedicated QMP socket.
type ProtectedQMP struct {
	Socket string `xml:"socket,attr"`
}

// RoleStandby is Protection.Role of a standby's definition.
const RoleStandby = "standby"

// ProtectedMemory records the memory backend Prepare put guest RAM in:
// a memory-backend-file of ftctl's choosing (libvirt has no element that
// names its own backend's file), which the agent maps to track dirty
// pages and which the standby's QEMU maps as the replica.
type ProtectedMemory struct {
	ID      string `xml:"id,attr"`       // QEMU object id: MemoryID
	File    string `xml:"file,attr"`     // mem-path
	SizeMiB int    `xml:"size-mib,attr"` // the backend's size, = Domain.MemoryMiB
}

// ProtectedDisk records one disk now served by the agent over NBD.
type ProtectedDisk struct {
	Target string `xml:"target,attr"` // guest device name, e.g. vda
	Socket string `xml:"socket,attr"` // NBD unix socket the agent listens on
	Export string `xml:"export,attr"`
	Type   string `xml:"type,attr"`   // original disk type: file or block
	Source string `xml:"source,attr"` // original image path or device
	Format string `xml:"format,attr"` // original driver type (raw)
}

// ProtectedNIC records one NIC whose traffic now passes the agent.
type ProtectedNIC struct {
	MAC    string `xml:"mac,attr"`
	Mode   string `xml:"mode,attr"`             // NICStream or NICClient
	Socket string `xml:"socket,attr,omitempty"` // NICStream
	Port   string `xml:"port,attr,omitempty"`   // NICClient: TCP port on 127.0.0.1
	// Original is the replaced <interface> element, verbatim.
	Original struct {
		Inner string `xml:",innerxml"`
	} `xml:"https://github.com/ftctl/ftctl/xmlns/libvirt/1 original"`
}

// ParseDomain reads the parts of a domain definition ftctl needs. Input
// that is not XML, or not a <domain>, is an error wrapping ErrBadXML.
func ParseDomain(data []byte) (*Domain, error) {
	var d Domain
	if err := xml.Unmarshal(data, &d); err != nil {
		var pe *probeError
		if errors.As(err, &pe) {
			return nil, fmt.Errorf("%w: %w (fix it with virsh edit, or replace it with ftctl libvirt prepare --probe-addr)", ErrBadXML, pe)
		}
		return nil, fmt.Errorf("%w: %v", ErrBadXML, err)
	}
	if d.Name == "" {
		return nil, fmt.Errorf("%w: <domain> has no <name>", ErrBadXML)
	}
	return &d, nil
}

// hasArg reports whether a <qemu:commandline> argument starts with prefix.
func (d *Domain) hasArg(prefix string) bool {
	if d.Commandline == nil {
		return false
	}
	for _, a := range d.Commandline.Args {
		if strings.HasPrefix(a.Value, prefix) {
			return true
		}
	}
	return false
}

// hasArgContaining reports whether a <qemu:commandline> argument contains s.
func (d *Domain) hasArgContaining(s string) bool {
	if d.Commandline == nil {
		return false
	}
	for _, a := range d.Commandline.Args {
		if strings.Contains(a.Value, s) {
			return true
		}
	}
	return false
}
