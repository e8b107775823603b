package collector_test

import (
	"testing"
	"time"

	"github.com/endpointlag/endpointlag/collector"
	"github.com/endpointlag/endpointlag/collector/collectortest"
)

// A settled record is due once; after the source changed it is due again only for a follower
// that sends again, and only if its print changed.
func TestFollowerSendsAgainOnlyWhatChanged(t *testing.T) {
	t0 := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)
	rec := collector.RecordView{Stages: []collector.StageView{{Stage: "endpointslice", Time: t0}}}
	rec.Pod.UID = "uid-1"
	for _, again := range []bool{false, true} {
		var views collectortest.Views
		views.Set(rec)
		f := collector.NewFollower(&views, time.Minute, again)
		due := func() int {
			recs, digests := f.Due(t0.Add(time.Second))
			for _, d := range digests {
				f.Sent(d)
			}
			return len(recs)
		}
		if n := due(); n != 1 {
			t.Fatalf("again=%t: %d due at first; want 1", again, n)
		}
		views.Set(rec) // the source moved on, the record did not change
		if n := due(); n != 0 {
			t.Errorf("again=%t: %d due with the same print; want none", again, n)
		}
		changed := rec
		changed.Connections = []collector.ConnectionView{{Time: t0, Kind: "late"}}
		views.Set(changed)
		if n, want := due(), map[bool]int{false: 0, true: 1}[again]; n != want {
			t.Errorf("again=%t: %d due after its print changed; want %d", again, n, want)
		}
	}
}
