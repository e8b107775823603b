// Package collectortest serves record views made by a test to what reads a collector's records
// through collector.Selector (the pusher, the tracer).
package collectortest

import (
	"sync"
	"time"

	"github.com/endpointlag/endpointlag/collector"
)

// Views holds the views a test sets and selects among them as Collector.ViewsWhere selects among
// records. A view's digest ID follows its Key: the same key keeps its ID across Set calls.
type Views struct {
	mu     sync.Mutex
	views  []collector.RecordView
	ids    map[string]uint64
	viewed int
}

// Set replaces the views held.
func (v *Views) Set(views ...collector.RecordView) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.views = append([]collector.RecordView(nil), views...)
}

// Select is a collector.Selector over the views held.
func (v *Views) Select(now time.Time, settleAfter time.Duration, want func(collector.Digest) bool) []collector.RecordView {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.ids == nil {
		v.ids = map[string]uint64{}
	}
	var out []collector.RecordView
	for _, r := range v.views {
		id, ok := v.ids[r.Key()]
		if !ok {
			id = uint64(len(v.ids) + 1)
			v.ids[r.Key()] = id
		}
		if want(collector.Digest{ID: id, Settled: r.Settled(now, settleAfter), Print: r.Print()}) {
			out = append(out, r)
		}
	}
	v.viewed += len(out)
	return out
}

// Viewed counts the views Select returned so far: what a reader viewed, where a collector builds
// each view it returns.
func (v *Views) Viewed() int {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.viewed
}
