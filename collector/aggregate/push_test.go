package aggregate

import (
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/endpointlag/endpointlag/collector"
	"github.com/endpointlag/endpointlag/collector/collectortest"
)

// replica is an aggregator behind a real HTTP server, counting the batches it got.
type replica struct {
	a       *Aggregator
	srv     *httptest.Server
	down    atomic.Bool
	mu      sync.Mutex
	batches []Batch
}

func newReplica(t *testing.T, clk *clocktesting.FakeClock) *replica {
	t.Helper()
	reg := prometheus.NewRegistry()
	a, err := New(DefaultOptions(), reg, clk, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	r := &replica{a: a}
	h := Handler(a, reg)
	r.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if r.down.Load() {
			http.Error(w, "restarting", http.StatusServiceUnavailable)
			return
		}
		if req.URL.Path == "/api/v1/push" {
			r.mu.Lock()
			r.batches = append(r.batches, Batch{})
			r.mu.Unlock()
		}
		h.ServeHTTP(w, req)
	}))
	t.Cleanup(r.srv.Close)
	return r
}

func (r *replica) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.batches)
}

// Records are pushed once settled and again only when they changed; a replica that is down gets
// them at the next interval; each pod's records go to the replica Shard picks.
func TestPusher(t *testing.T) {
	clk := clocktesting.NewFakeClock(t0)
	reps := []*replica{newReplica(t, clk), newReplica(t, clk)}
	urls := []string{reps[0].srv.URL, reps[1].srv.URL}
	var views collectortest.Views
	set := views.Set
	opts := DefaultPushOptions()
	opts.URLs = urls
	reg := prometheus.NewRegistry()
	p, err := NewPusher(opts, "node1", &views, reg, clk, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	// Another daemon is live: the pods' figures wait for it, and records pushed again count.
	for _, r := range reps {
		if err := r.a.Push(Batch{Node: "node2"}); err != nil {
			t.Fatal(err)
		}
	}

	pending := home()
	pending.Pod.UID = "pending"
	pending.Pending = []string{"nftables"}
	notGone := home()
	notGone.Pod.UID = "not-gone"
	gone := home()
	gone.Pod.UID = "gone"
	gone.Stages = append(gone.Stages, collector.StageView{Stage: "gone", Time: at(0.3)})
	set(pending, notGone, gone)
	p.PushOnce(ctx)
	held := func(uid string) bool {
		_, ok := reps[Shard(uid, urls)].a.Pod(uid)
		return ok
	}
	if held("pending") || held("not-gone") || !held("gone") {
		t.Errorf("after the first push: pending %v, not gone %v, gone %v; want only the gone pod's record", held("pending"), held("not-gone"), held("gone"))
	}
	for i, r := range reps {
		if r.count() == 0 {
			t.Errorf("replica %d got no heartbeat", i)
		}
	}
	before := reps[0].count() + reps[1].count()
	viewed, walks := views.Viewed()
	p.PushOnce(ctx) // nothing changed, heartbeats not due, the pending record not old enough
	if after := reps[0].count() + reps[1].count(); after != before {
		t.Errorf("%d requests when nothing changed", after-before)
	}
	if v, w := views.Viewed(); v != viewed || w != walks {
		t.Errorf("%d records viewed in %d walks when nothing changed; want none", v-viewed, w-walks)
	}
	// A connection more: pushed again.
	gone.Connections = append(gone.Connections, collector.ConnectionView{Time: at(0.2), Kind: "late"})
	set(pending, notGone, gone)
	p.PushOnce(ctx)
	if d, _ := reps[Shard("gone", urls)].a.Pod("gone"); len(d.Convergence.Late) != 2 {
		t.Errorf("late connections %v after the record changed; want 2", d.Convergence.Late)
	}
	// A replica down: its records wait for the next interval.
	down := Shard("not-gone", urls)
	reps[down].down.Store(true)
	notGone.Stages = append(notGone.Stages, collector.StageView{Stage: "gone", Time: at(0.4)})
	set(pending, notGone, gone)
	p.PushOnce(ctx)
	if held("not-gone") {
		t.Fatal("held by a replica that answered 503")
	}
	if got := counterValue(t, reg, "endpointlag_aggregator_pushes_total", "outcome=error"); got < 1 {
		t.Errorf("failed pushes counted: %v", got)
	}
	reps[down].down.Store(false)
	p.PushOnce(ctx)
	if !held("not-gone") {
		t.Error("not pushed again once the replica was back")
	}
	// A record still pending after SettleAfter is pushed as it is.
	clk.Step(opts.SettleAfter + time.Second)
	p.PushOnce(ctx)
	if !held("pending") {
		t.Error("a record pending for longer than SettleAfter was not pushed")
	}
	if err := (PushOptions{URLs: []string{"aggregate:9870"}, Interval: time.Second, Heartbeat: time.Second, SettleAfter: time.Second, BatchSize: 1}).Validate(); err == nil {
		t.Error("a URL without a scheme was taken")
	}
}

func counterValue(t *testing.T, reg *prometheus.Registry, name, labels string) float64 {
	t.Helper()
	return count(t, reg, name, labels)
}
