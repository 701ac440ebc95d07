package agent

import "time"

// SetDegradeDelay holds every degrade of a's guests back by d: a primary
// that notices its secondary's loss late, as on a loaded host.
func SetDegradeDelay(a *Agent, d time.Duration) { a.degradeDelay.Store(int64(d)) }
