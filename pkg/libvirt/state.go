package libvirt

import (
	"fmt"
	"strconv"
)

// StateCode is libvirt's virDomainState.
type StateCode int32

// Domain states.
const (
	StateNoState     StateCode = 0
	StateRunning     StateCode = 1
	StateBlocked     StateCode = 2
	StatePaused      StateCode = 3
	StateShutdown    StateCode = 4
	StateShutoff     StateCode = 5
	StateCrashed     StateCode = 6
	StatePMSuspended StateCode = 7
)

var stateNames = []string{"nostate", "running", "blocked", "paused", "shutdown", "shutoff", "crashed", "pmsuspended"}

func (s StateCode) String() string {
	if s >= 0 && int(s) < len(stateNames) {
		return stateNames[s]
	}
	return "state(" + strconv.Itoa(int(s)) + ")"
}

// Reasons libvirt gives, by state; indexes are libvirt's enum values.
var reasonNames = map[StateCode][]string{
	StateRunning: {"unknown", "booted", "migrated", "restored", "from snapshot", "unpaused", "migration canceled",
		"save canceled", "wakeup", "crashed", "postcopy", "postcopy failed"},
	StatePaused: {"unknown", "user", "migration", "save", "dump", "ioerror", "watchdog", "from snapshot",
		"shutting down", "snapshot", "crashed", "starting up", "postcopy", "postcopy failed", "api error"},
	StateShutoff:  {"unknown", "shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "from snapshot", "daemon"},
	StateShutdown: {"unknown", "user"},
	StateCrashed:  {"unknown", "panicked"},
}

// State is a domain's state with libvirt's reason for it.
type State struct {
	Code   StateCode
	Reason int32
}

// ReasonString names the reason as virsh domstate --reason does.
func (s State) ReasonString() string {
	if names, ok := reasonNames[s.Code]; ok && s.Reason >= 0 && int(s.Reason) < len(names) {
		return names[s.Reason]
	}
	return "reason(" + strconv.Itoa(int(s.Reason)) + ")"
}

func (s State) String() string { return fmt.Sprintf("%s (%s)", s.Code, s.ReasonString()) }

// EventType is libvirt's virDomainEventType.
type EventType int32

// Lifecycle event types.
const (
	EventDefined     EventType = 0
	EventUndefined   EventType = 1
	EventStarted     EventType = 2
	EventSuspended   EventType = 3
	EventResumed     EventType = 4
	EventStopped     EventType = 5
	EventShutdown    EventType = 6
	EventPMSuspended EventType = 7
	EventCrashed     EventType = 8
)

var eventNames = []string{"defined", "undefined", "started", "suspended", "resumed", "stopped", "shutdown", "pmsuspended", "crashed"}

func (e EventType) String() string {
	if e >= 0 && int(e) < len(eventNames) {
		return eventNames[e]
	}
	return "event(" + strconv.Itoa(int(e)) + ")"
}

// Details of EventStopped, the ones failover logic tells apart.
const (
	StoppedShutdown  int32 = 0
	StoppedDestroyed int32 = 1
	StoppedCrashed   int32 = 2
	StoppedMigrated  int32 = 3
	StoppedSaved     int32 = 4
	StoppedFailed    int32 = 5
)

// Details of EventSuspended and EventResumed that checkpoints produce: a
// QMP stop/cont issued outside libvirt arrives as "paused" / "unpaused".
const (
	SuspendedPaused int32 = 0
	ResumedUnpaused int32 = 0
)

var detailNames = map[EventType][]string{
	EventDefined:   {"added", "updated", "renamed", "from snapshot"},
	EventUndefined: {"removed", "renamed"},
	EventStarted:   {"booted", "migrated", "restored", "from snapshot", "wakeup"},
	EventSuspended: {"paused", "migrated", "ioerror", "watchdog", "restored", "from snapshot", "api error", "postcopy", "postcopy failed"},
	EventResumed:   {"unpaused", "migrated", "from snapshot", "postcopy", "postcopy failed"},
	EventStopped:   {"shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "from snapshot"},
	EventShutdown:  {"finished", "guest", "host"},
	EventCrashed:   {"panicked", "crashloaded"},
}

// LifecycleEvent is one libvirt domain lifecycle event.
type LifecycleEvent struct {
	Domain string
	Type   EventType
	Detail int32 // meaning depends on Type, see DetailString
}

// DetailString names the detail as virsh event does.
func (e LifecycleEvent) DetailString() string {
	if names, ok := detailNames[e.Type]; ok && e.Detail >= 0 && int(e.Detail) < len(names) {
		return names[e.Detail]
	}
	return "detail(" + strconv.Itoa(int(e.Detail)) + ")"
}

func (e LifecycleEvent) String() string {
	return fmt.Sprintf("%s: %s (%s)", e.Domain, e.Type, e.DetailString())
}
