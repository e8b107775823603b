package collector

import (
	"github.com/endpointlag/endpointlag/probes"
)

// This file serves the probes that poll faster while something they route to is terminating (the
// ingress probe): what each source still owes a removal for.

// Pending implements probes.Pending: per source of stage (a proxy instance), the endpoints whose
// records await a removal there that has not come, and that no fallback holds.
func (c *Collector) Pending(stage probes.Stage) map[string][]probes.Endpoint {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string][]probes.Endpoint{}
	for _, r := range c.records {
		for _, a := range r.awaits {
			if a.stage != stage || a.source == "" || r.arrived(a) {
				continue
			}
			out[a.source] = append(out[a.source], r.key.endpoint)
		}
	}
	return out
}

// NotifyPending implements probes.Pending.
func (c *Collector) NotifyPending(ch chan<- struct{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.pendingWatchers = append(c.pendingWatchers, ch)
}

// pendingChanged tells the watchers that Pending may have changed. Called with c.mu held.
func (c *Collector) pendingChanged() {
	for _, ch := range c.pendingWatchers {
		select {
		case ch <- struct{}{}:
		default: // a notification is already waiting
		}
	}
}
