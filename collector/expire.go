package collector

import "github.com/endpointlag/endpointlag/probes"

// Sweep removes records and pod timelines older than the horizon, and orphans older than the
// orphan window.
func (c *Collector) Sweep() {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.clock.Now()
	c.swept.Store(now.UnixNano())
	cutoff := now.Add(-c.opts.Horizon)
	n := 0
	for n < len(c.queue) && !c.queue[n].created.After(cutoff) {
		q := c.queue[n]
		n++
		if q.pod {
			if t := c.pods[q.key.uid]; t != nil {
				c.dropAddrs(t)
				c.localChanged()
				if t.untrusted {
					c.budgets.untrustedPods--
				}
			}
			delete(c.pods, q.key.uid)
			continue
		}
		if r := c.records[q.key]; r != nil {
			outcome := "complete"
			if len(c.pendingStages(r)) > 0 {
				outcome = "incomplete"
			}
			c.m.expired.WithLabelValues(outcome).Inc()
			if len(r.awaits) > 0 {
				c.pendingChanged()
			}
			delete(c.records, q.key)
			c.release(r)
			for s := range c.undetermined {
				delete(c.undetermined[s], q.key)
			}
			c.unindex(q.key)
		}
	}
	c.orphans.expire(now.Add(-orphanWindow))
	if n == 0 {
		return
	}
	c.queue = append([]queued(nil), c.queue[n:]...)
	if len(c.byEndpoint) == 0 {
		c.byEndpoint = map[probes.Endpoint][]recordKey{}
	}
	if len(c.records) <= c.peak/4 {
		fresh := make(map[recordKey]*record, len(c.records))
		for k, r := range c.records {
			fresh[k] = r
		}
		c.records, c.peak = fresh, len(fresh)
		pods := make(map[string]*podTimeline, len(c.pods))
		for k, t := range c.pods {
			pods[k] = t
		}
		c.pods = pods
		c.budgets.rebuildNamespaces()
	}
}

func (c *Collector) unindex(k recordKey) {
	keys := c.byEndpoint[k.endpoint]
	for i, x := range keys {
		if x == k {
			keys = append(keys[:i], keys[i+1:]...)
			break
		}
	}
	if len(keys) == 0 {
		delete(c.byEndpoint, k.endpoint)
	} else {
		c.byEndpoint[k.endpoint] = keys
	}
}
