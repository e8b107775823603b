package collector

import (
	"time"

	"github.com/endpointlag/endpointlag/probes"
)

// orphanWindow is how long a dataplane removal waits for its record, and maxOrphans how many wait.
const (
	orphanWindow = 5 * time.Second
	maxOrphans   = 10000
)

// dataplaneRemoved joins a removal that names an endpoint, and its Service when the rules or the
// proxy say, but not the pod (a dataplane or ingress stage), to the terminating record of that
// endpoint which awaits it, or keeps it as an orphan. Of the records of one endpoint and Service only the newest whose slice change came
// before the removal (give or take the orphan window) can take it: a pod that reuses an old pod's
// address never lends its removal to the old pod's record.
func (c *Collector) dataplaneRemoved(o probes.Observation) {
	best := map[probes.ServiceRef]*record{}
	for _, k := range c.byEndpoint[o.Endpoint] {
		r := c.records[k]
		if r == nil || !sameService(o.Service, k.service) {
			continue
		}
		slice := r.stage(probes.StageEndpointSlice)
		if slice == nil || slice.at.After(o.Time.Add(orphanWindow)) {
			continue
		}
		if b := best[k.service]; b == nil || slice.at.After(b.stage(probes.StageEndpointSlice).at) {
			best[k.service] = r
		}
	}
	joined := false
	a := awaitOf(o)
	for _, r := range best {
		if r.arrived(a) {
			joined = true // a repeat (a resync reporting the same removal) is not an orphan
			continue
		}
		if !r.awaiting(a) {
			// The record started after the probe had published this removal but before it
			// reported it (its state said "not reached" already): it did reach it.
			if !o.Time.Before(r.created) {
				continue
			}
			r.addAwait(a)
		}
		c.addStage(r, o)
		joined = true
	}
	if !joined {
		c.orphans.add(o, c.m.orphansDropped.Inc)
	}
}

// sameService matches a dataplane observation's Service to a record's; an observation that
// names none matches every Service.
func sameService(observed, record probes.ServiceRef) bool {
	return observed.Name == "" || observed == record
}

// orphans are dataplane removals seen before this node saw the endpoint terminate (kube-proxy
// can be faster than this daemon's watch): a record created soon after takes them. They are
// indexed by endpoint, and expire in arrival order.
type orphans struct {
	byEndpoint map[probes.Endpoint][]*orphan
	fifo       []*orphan
}

type orphan struct {
	o     probes.Observation
	taken bool
}

func newOrphans() orphans {
	return orphans{byEndpoint: map[probes.Endpoint][]*orphan{}}
}

// add keeps o, dropping the oldest orphan (and calling dropped) when maxOrphans wait.
func (os *orphans) add(o probes.Observation, dropped func()) {
	if len(os.fifo) >= maxOrphans {
		if first := os.fifo[0]; !first.taken {
			os.unindex(first)
			dropped()
		}
		os.fifo = os.fifo[1:]
	}
	p := &orphan{o: o}
	os.fifo = append(os.fifo, p)
	os.byEndpoint[o.Endpoint] = append(os.byEndpoint[o.Endpoint], p)
}

// unindex drops p from the endpoint index.
func (os *orphans) unindex(p *orphan) {
	list := os.byEndpoint[p.o.Endpoint]
	for i, x := range list {
		if x == p {
			list = append(list[:i], list[i+1:]...)
			break
		}
	}
	if len(list) == 0 {
		delete(os.byEndpoint, p.o.Endpoint)
	} else {
		os.byEndpoint[p.o.Endpoint] = list
	}
}

// take returns, and forgets, the removals of an endpoint of svc seen at most orphanWindow before
// at.
func (os *orphans) take(ep probes.Endpoint, svc probes.ServiceRef, at time.Time) []probes.Observation {
	var out []probes.Observation
	for _, p := range os.byEndpoint[ep] {
		if sameService(p.o.Service, svc) && at.Sub(p.o.Time) <= orphanWindow {
			out = append(out, p.o)
			p.taken = true
		}
	}
	if len(out) > 0 {
		var kept []*orphan
		for _, p := range os.byEndpoint[ep] {
			if !p.taken {
				kept = append(kept, p)
			}
		}
		if len(kept) == 0 {
			delete(os.byEndpoint, ep)
		} else {
			os.byEndpoint[ep] = kept
		}
	}
	return out
}

// expire forgets the orphans that arrived before cutoff (and those already taken).
func (os *orphans) expire(cutoff time.Time) {
	n := 0
	for n < len(os.fifo) && (os.fifo[n].taken || os.fifo[n].o.Time.Before(cutoff)) {
		if !os.fifo[n].taken {
			os.unindex(os.fifo[n])
		}
		n++
	}
	if n > 0 {
		os.fifo = append([]*orphan(nil), os.fifo[n:]...)
	}
}
