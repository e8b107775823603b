// Package collectortest serves record views made by a test to what reads a collector's records
// through collector.Source (the pusher, the tracer).
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
	rev    uint64
	walks  int
	viewed int
}

// Set replaces the views held.
func (v *Views) Set(views ...collector.RecordView) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.views = append([]collector.RecordView(nil), views...)
	v.rev++
}

// Rev implements collector.Source: it moves on at every Set.
func (v *Views) Rev() uint64 {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.rev
}

// ViewsWhere implements collector.Source over the views held.
func (v *Views) ViewsWhere(now time.Time, settleAfter time.Duration, want func(collector.Digest) bool) []collector.RecordView {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.walks++
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
		if want(r.Digest(id, now, settleAfter)) {
			out = append(out, r)
		}
	}
	v.viewed += len(out)
	return out
}

// Viewed counts the views ViewsWhere returned so far (a collector builds each) and its calls,
// walks (a collector looks at the digest of every record held at each).
func (v *Views) Viewed() (views, walks int) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.viewed, v.walks
}
