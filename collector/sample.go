package collector

import (
	"time"

	"github.com/endpointlag/endpointlag/probes"
)

// Reasons a stage is kept out of the lag histograms, the reason label of unsampled_total.
const (
	// reasonRelist: first seen on a re-read after a gap (a watch that broke, lost kernel
	// messages), so only known to within the gap.
	reasonRelist = "relist"
	// reasonFallback: a dataplane removal kube-proxy held back on purpose while no ready
	// endpoint was left (KEP-1669); it came when the endpoint stopped serving, left the slice or
	// a ready endpoint came back, not after a sync's delay.
	reasonFallback = "fallback"
)

// sample observes every lag of r whose stage and reference are both known and live, and counts
// apart the stages that are not measurements of lag.
func (c *Collector) sample(r *record) {
	progRef, hasProg := r.programmingRef()
	t0, hasT0 := r.t0()
	for i := range r.stages {
		e := &r.stages[i]
		if e.initial || (e.progDone && e.propDone) {
			continue
		}
		if reason := e.unsampled(); reason != "" {
			c.m.unsampled.WithLabelValues(string(e.stage), string(e.path), reason).Inc()
			e.progDone, e.propDone = true, true
			continue
		}
		if hasProg && !e.progDone && e.stage != probes.StageEndpointSlice {
			c.m.programming.WithLabelValues(string(e.stage), string(e.path), e.kind).Observe(lag(e.at, progRef))
			e.progDone = true
		}
		if hasT0 && !e.propDone {
			c.m.propagation.WithLabelValues(string(e.stage), string(e.path), e.kind).Observe(lag(e.at, t0))
			e.propDone = true
		}
	}
}

// unsampled names why e is not a lag sample, or "".
func (e *stageEntry) unsampled() string {
	switch {
	case e.relist:
		return reasonRelist
	case e.fallback:
		return reasonFallback
	}
	return ""
}

// programmingRef is the time this node saw the endpoint turn terminating, when seen live.
func (r *record) programmingRef() (time.Time, bool) {
	e := r.stage(probes.StageEndpointSlice)
	if e == nil || e.initial || e.relist {
		return time.Time{}, false
	}
	return e.at, true
}

func (r *record) t0() (time.Time, bool) {
	t := r.timeline
	if t == nil || t.t0.IsZero() || t.t0Initial || t.t0Relist {
		return time.Time{}, false
	}
	return t.t0, true
}

// lag is a non-negative duration in seconds. Observations of one change by two watch streams can
// arrive in either order; a stage seen before its reference counts as no lag.
func lag(at, ref time.Time) float64 {
	return max(at.Sub(ref).Seconds(), 0)
}
