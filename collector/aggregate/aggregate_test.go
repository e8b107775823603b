package aggregate

import (
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/endpointlag/endpointlag/collector"
	"github.com/endpointlag/endpointlag/probes"
)

func newTest(t *testing.T, opts Options) (*Aggregator, *clocktesting.FakeClock, *prometheus.Registry) {
	t.Helper()
	clk := clocktesting.NewFakeClock(t0)
	reg := prometheus.NewRegistry()
	a, err := New(opts, reg, clk, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	return a, clk, reg
}

func push(t *testing.T, a *Aggregator, node string, recs ...collector.RecordView) {
	t.Helper()
	if err := a.Push(Batch{Node: node, Records: recs}); err != nil {
		t.Fatal(err)
	}
}

func count(t *testing.T, reg *prometheus.Registry, name, labels string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			var ls []string
			for _, l := range m.GetLabel() {
				ls = append(ls, l.GetName()+"="+l.GetValue())
			}
			if strings.Join(ls, ",") != labels {
				continue
			}
			switch {
			case m.GetCounter() != nil:
				return m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				return m.GetGauge().GetValue()
			case m.GetHistogram() != nil:
				return float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return -1
}

func podRecords(uid string, workload string, preStop float64, all float64) (collector.RecordView, collector.RecordView) {
	h := home()
	h.Pod.UID, h.Pod.Name = uid, "web-"+uid
	h.Declared = &probes.Declared{Workload: probes.WorkloadRef{Kind: "Deployment", Name: workload}, PreStopSeconds: preStop, PreStopKnown: true, GraceSeconds: 30}
	r := remote(0, collector.StageView{Stage: "nftables", Source: "nftables", Path: "cluster", Time: at(all), Programming: f(all - 0.020)})
	r.Pod = h.Pod
	return h, r
}

// A pod's figure is final once every live daemon reported it, or at the settle time with the
// silent ones named; a record pushed again replaces the one before.
func TestAggregatorJoinsByPod(t *testing.T) {
	a, clk, reg := newTest(t, DefaultOptions())
	for _, n := range []string{"node1", "node2", "node3"} {
		push(t, a, n) // heartbeats
	}
	h, r := podRecords("u1", "web", 0, 0.7)
	push(t, a, "node1", h)
	push(t, a, "node2", r)
	push(t, a, "node2", r) // again, after a daemon restart
	if d, _ := a.Pod("u1"); d.Final {
		t.Fatal("final before node3 reported")
	}
	push(t, a, "node3", func() collector.RecordView { x := remote(0); x.Pod = h.Pod; return x }())
	d, ok := a.Pod("u1")
	if !ok || !d.Final || len(d.Missing) != 0 || strings.Join(d.Reported, ",") != "node1,node2,node3" || d.Home != "node1" {
		t.Fatalf("pod u1: %+v", d.PodSummary)
	}
	if d.Seconds == nil || !near(*d.Seconds, 0.7) {
		t.Errorf("convergence %v, want 0.7 s (node2's rules)", d.Seconds)
	}
	if got := count(t, reg, "endpointlag_convergence_seconds", "stage=all"); got != 1 {
		t.Errorf("convergence samples at stage all: %v, want 1", got)
	}
	if got := count(t, reg, "endpointlag_convergence_pods_total", "outcome=complete"); got != 1 {
		t.Errorf("complete pods: %v", got)
	}
	// node3 goes silent: the next pod waits for it until the settle time, then says so.
	clk.Step(DefaultOptions().Settle / 2)
	push(t, a, "node1")
	push(t, a, "node2")
	h2, r2 := podRecords("u2", "web", 0, 0.4)
	push(t, a, "node1", h2)
	push(t, a, "node2", r2)
	a.Tick()
	if d, _ := a.Pod("u2"); d.Final {
		t.Fatal("final while node3 still counts as live")
	}
	clk.Step(DefaultOptions().Settle)
	a.Tick()
	d, _ = a.Pod("u2")
	if !d.Final || strings.Join(d.Missing, ",") != "node3" {
		t.Errorf("pod u2 after the settle time: final %v, missing %v; want final, node3 missing", d.Final, d.Missing)
	}
	if got := count(t, reg, "endpointlag_convergence_pods_total", "outcome=missing_nodes"); got != 1 {
		t.Errorf("pods with missing nodes: %v", got)
	}
	// A record after the figure is final does not change it.
	push(t, a, "node3", func() collector.RecordView { x := remote(0); x.Pod = h2.Pod; return x }())
	if got := count(t, reg, "endpointlag_aggregate_records_late_total", ""); got != 1 {
		t.Errorf("late records: %v", got)
	}
	// The pod's node never reports: no figure.
	_, r3 := podRecords("u3", "web", 0, 0.4)
	push(t, a, "node2", r3)
	clk.Step(2 * DefaultOptions().Settle)
	a.Tick()
	if got := count(t, reg, "endpointlag_convergence_pods_total", "outcome=no_home"); got != 1 {
		t.Errorf("pods without their node's report: %v", got)
	}
	if err := a.Push(Batch{}); err == nil {
		t.Error("a batch without a node's name was taken")
	}
}

// The state is bounded: pods by MaxPods (the oldest go, made final first), workloads with figures
// of their own by MaxWorkloads; both counted.
func TestAggregatorBounds(t *testing.T) {
	opts := DefaultOptions()
	opts.MaxPods, opts.MaxWorkloads = 2, 1
	a, _, reg := newTest(t, opts)
	push(t, a, "node1")
	push(t, a, "node2")
	for i, wl := range []string{"web", "api", "web"} {
		h, r := podRecords(fmt.Sprint("u", i), wl, 0, 0.5)
		push(t, a, "node1", h)
		push(t, a, "node2", r)
	}
	if got := len(a.Pods(10)); got != 2 {
		t.Errorf("%d pods held, want 2", got)
	}
	if got := count(t, reg, "endpointlag_aggregate_pods_evicted_total", ""); got != 1 {
		t.Errorf("evicted: %v", got)
	}
	if got := count(t, reg, "endpointlag_workloads_dropped_total", ""); got != 1 {
		t.Errorf("workloads dropped: %v, want api's one termination", got)
	}
	ads := a.Advise()
	if len(ads) != 1 || ads[0].Workload.Name != "web" || ads[0].Terminations != 2 {
		t.Errorf("advice %+v; want web with 2 terminations", ads)
	}
}

// The advice: p99 over the window, the recommendation (p99 + 1 s, rounded up), the shortfall
// against the declared preStop, the terminations that outlasted it; replicas' advice merges.
func TestAdvice(t *testing.T) {
	opts := DefaultOptions()
	opts.MaxSamples = 100
	a, clk, reg := newTest(t, opts)
	push(t, a, "node1")
	push(t, a, "node2")
	for i := range 120 {
		all := 0.3
		if i%50 == 0 {
			all = 2.4 // 3 of 120 are slow
		}
		h, r := podRecords(fmt.Sprint("u", i), "web", 2, all)
		push(t, a, "node1", h)
		push(t, a, "node2", r)
		clk.Step(time.Second)
	}
	ads := a.Advise()
	if len(ads) != 1 {
		t.Fatalf("advice %+v", ads)
	}
	ad := ads[0]
	// The window keeps the last 100: 2 of them slow, the p99 is the slow one.
	if len(ad.Samples) != 100 || ad.P99 == nil || !near(*ad.P99, 2.4) || *ad.Recommended != 4 || *ad.Shortfall != 2 {
		t.Errorf("samples %d, p99 %v, recommended %v, shortfall %v; want 100, 2.4, 4, 2", len(ad.Samples), *ad.P99, *ad.Recommended, *ad.Shortfall)
	}
	if ad.Terminations != 120 || ad.AfterPreStop != 3 || ad.Late != 120 || ad.Dead != 120 {
		t.Errorf("terminations %d, after preStop %d, late %d, dead %d; want 120, 3, 120, 120", ad.Terminations, ad.AfterPreStop, ad.Late, ad.Dead)
	}
	if got := count(t, reg, "endpointlag_workload_prestop_shortfall_seconds", "kind=Deployment,namespace=shop,workload=web"); got != 2 {
		t.Errorf("shortfall metric %v", got)
	}
	// Two replicas, each with half the samples: merged, the same figure.
	half := ad
	half.Samples, half.Terminations = ad.Samples[:50], 60
	other := ad
	other.Samples, other.Terminations = ad.Samples[50:], 60
	m := Merge([]Advice{half}, []Advice{other})
	if len(m) != 1 || len(m[0].Samples) != 100 || m[0].Terminations != 120 || *m[0].P99 != *ad.P99 {
		t.Errorf("merged %+v", m)
	}
	if err := (Options{}).Validate(); err == nil {
		t.Error("zero options are valid")
	}
}

func TestQuantile(t *testing.T) {
	vs := []float64{5, 1, 4, 2, 3}
	for q, want := range map[float64]float64{0: 1, 0.5: 3, 0.99: 5, 1: 5} {
		if got := Quantile(vs, q); got != want {
			t.Errorf("Quantile(%v) = %v, want %v", q, got, want)
		}
	}
}
