package collector

import (
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/endpointlag/endpointlag/probes"
)

var t0 = time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)

type fixture struct {
	t     *testing.T
	c     *Collector
	reg   *prometheus.Registry
	clock *clocktesting.FakeClock
}

func newFixture(t *testing.T, opts Options) *fixture {
	t.Helper()
	if opts.Horizon == 0 {
		opts.Horizon = 10 * time.Minute
	}
	if opts.MaxRecords == 0 {
		opts.MaxRecords = 1000
	}
	if opts.SweepInterval == 0 {
		opts.SweepInterval = time.Second
	}
	if opts.Stages == nil {
		opts.Stages = []probes.Stage{probes.StageEndpointSliceRemoved}
	}
	reg := prometheus.NewRegistry()
	clk := clocktesting.NewFakeClock(t0)
	c, err := New(opts, clk, slog.New(slog.NewTextHandler(io.Discard, nil)), reg)
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{t: t, c: c, reg: reg, clock: clk}
	t.Cleanup(f.checkDigests)
	return f
}

// checkDigests checks, at the end of every test, that each record's digest (what the pusher and
// the tracer decide by without viewing the record) tells what its view tells: settled with no
// wait, not settled yet, and settled an hour on.
func (f *fixture) checkDigests() {
	f.t.Helper()
	now := f.clock.Now()
	type age struct {
		now   time.Time
		after time.Duration
	}
	f.c.mu.Lock()
	defer f.c.mu.Unlock()
	for _, r := range f.c.records {
		v := f.c.view(r)
		ages := []age{{now, 0}, {now, time.Hour}, {now.Add(time.Hour), time.Hour}}
		if len(v.Stages) > 0 {
			// Settled by age from the first stage on, not a nanosecond before.
			first := now.Sub(v.Stages[0].Time)
			ages = append(ages, age{now, first}, age{now, first + 1})
		}
		for _, at := range ages {
			want := v.Digest(r.id, at.now, at.after)
			if got := f.c.digest(r, at.now, at.after); got != want {
				f.t.Errorf("record %s, settled after %s at %s: digest %+v, but its view tells %+v", v.Key(), at.after, at.now.Format(time.StampMilli), got, want)
			}
		}
	}
}

// histogram returns the sample count and sum of name{stage} over every path, as a scrape would
// show them.
func (f *fixture) histogram(name string, stage probes.Stage) (uint64, float64) {
	f.t.Helper()
	var (
		n   uint64
		sum float64
	)
	for _, m := range f.family(name).GetMetric() {
		if label(m, "stage") == string(stage) {
			n += m.GetHistogram().GetSampleCount()
			sum += m.GetHistogram().GetSampleSum()
		}
	}
	return n, sum
}

// histogramPath is histogram for one path.
func (f *fixture) histogramPath(name string, stage probes.Stage, path probes.Path) (uint64, float64) {
	f.t.Helper()
	for _, m := range f.family(name).GetMetric() {
		if label(m, "stage") == string(stage) && label(m, "path") == string(path) {
			return m.GetHistogram().GetSampleCount(), m.GetHistogram().GetSampleSum()
		}
	}
	return 0, 0
}

// value returns the value of a counter or gauge with the given label values ("" for none).
func (f *fixture) value(name string, labels ...string) float64 {
	f.t.Helper()
	for _, m := range f.family(name).GetMetric() {
		match := true
		for i := 0; i+1 < len(labels); i += 2 {
			match = match && label(m, labels[i]) == labels[i+1]
		}
		if match {
			return m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return 0
}

func (f *fixture) family(name string) *dto.MetricFamily {
	f.t.Helper()
	mfs, err := f.reg.Gather()
	if err != nil {
		f.t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			return mf
		}
	}
	return nil
}

func label(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

func pod(i int) probes.PodRef {
	return probes.PodRef{Namespace: "default", Name: fmt.Sprintf("web-%d", i), UID: fmt.Sprintf("uid-%d", i)}
}

var web = probes.ServiceRef{Namespace: "default", Name: "web"}

func endpoint(i int) probes.Endpoint {
	return probes.Endpoint{Addr: netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), Port: 8080, Protocol: "TCP"}
}

func obs(stage probes.Stage, i int, at time.Time, local bool) probes.Observation {
	o := probes.Observation{Stage: stage, Time: at, Source: "kube", Pod: pod(i), Local: local}
	if stage != probes.StageDeleted && stage != probes.StageGone {
		o.Service, o.Endpoint = web, endpoint(i)
	}
	return o
}

func near(a, b float64) bool { return math.Abs(a-b) < 1e-9 }

func TestLocalPodBothReferences(t *testing.T) {
	f := newFixture(t, Options{})
	f.c.Observe(obs(probes.StageDeleted, 1, t0, true))
	f.c.Observe(obs(probes.StageEndpointSlice, 1, t0.Add(40*time.Millisecond), true))
	f.c.Observe(obs(probes.StageEndpointSliceRemoved, 1, t0.Add(1540*time.Millisecond), true))

	if n, sum := f.histogram("endpointlag_propagation_seconds", probes.StageEndpointSlice); n != 1 || !near(sum, 0.040) {
		t.Errorf("propagation endpointslice: %d samples, sum %g; want 1, 0.040", n, sum)
	}
	if n, sum := f.histogram("endpointlag_propagation_seconds", probes.StageEndpointSliceRemoved); n != 1 || !near(sum, 1.540) {
		t.Errorf("propagation endpointslice_removed: %d samples, sum %g; want 1, 1.540", n, sum)
	}
	if n, sum := f.histogram("endpointlag_programming_seconds", probes.StageEndpointSliceRemoved); n != 1 || !near(sum, 1.5) {
		t.Errorf("programming endpointslice_removed: %d samples, sum %g; want 1, 1.5", n, sum)
	}
	if n, _ := f.histogram("endpointlag_programming_seconds", probes.StageEndpointSlice); n != 0 {
		t.Errorf("programming endpointslice has %d samples; the stage is its own reference", n)
	}
}

func TestRemotePodProgrammingOnly(t *testing.T) {
	f := newFixture(t, Options{})
	f.c.Observe(obs(probes.StageEndpointSlice, 2, t0, false))
	f.c.Observe(obs(probes.StageEndpointSliceRemoved, 2, t0.Add(300*time.Millisecond), false))
	if n, sum := f.histogram("endpointlag_programming_seconds", probes.StageEndpointSliceRemoved); n != 1 || !near(sum, 0.3) {
		t.Errorf("programming: %d samples, sum %g; want 1, 0.3", n, sum)
	}
	if fam := f.family("endpointlag_propagation_seconds"); fam != nil {
		t.Errorf("a pod on another node got propagation samples: %v", fam)
	}
}

func TestDuplicateObservationsCountOnce(t *testing.T) {
	f := newFixture(t, Options{})
	for range 3 {
		f.c.Observe(obs(probes.StageDeleted, 1, t0, true))
		f.c.Observe(obs(probes.StageEndpointSlice, 1, t0.Add(10*time.Millisecond), true))
		f.c.Observe(obs(probes.StageEndpointSliceRemoved, 1, t0.Add(time.Second), true))
		f.c.Observe(obs(probes.StageGone, 1, t0.Add(2*time.Second), true))
	}
	for _, s := range []probes.Stage{probes.StageEndpointSlice, probes.StageEndpointSliceRemoved} {
		if n, _ := f.histogram("endpointlag_propagation_seconds", s); n != 1 {
			t.Errorf("propagation %s: %d samples, want 1", s, n)
		}
	}
	if got := f.value("endpointlag_tracked_records"); got != 1 {
		t.Errorf("tracked records = %g, want 1", got)
	}
}

// The slice watch can deliver before the pod watch: T0 is then no later than the slice change,
// and the propagation samples wait for the pod's event.
func TestSliceBeforePodEvent(t *testing.T) {
	f := newFixture(t, Options{})
	f.c.Observe(obs(probes.StageEndpointSlice, 1, t0, true))
	if fam := f.family("endpointlag_propagation_seconds"); fam != nil {
		t.Fatalf("propagation sampled before T0 was known: %v", fam)
	}
	f.c.Observe(obs(probes.StageDeleted, 1, t0.Add(20*time.Millisecond), true))
	f.c.Observe(obs(probes.StageEndpointSliceRemoved, 1, t0.Add(time.Second), true))
	if n, sum := f.histogram("endpointlag_propagation_seconds", probes.StageEndpointSlice); n != 1 || sum != 0 {
		t.Errorf("propagation endpointslice: %d samples, sum %g; want 1, 0", n, sum)
	}
	if n, sum := f.histogram("endpointlag_propagation_seconds", probes.StageEndpointSliceRemoved); n != 1 || !near(sum, 1) {
		t.Errorf("propagation endpointslice_removed: %d samples, sum %g; want 1, 1", n, sum)
	}
	if got := f.value("endpointlag_tracked_records"); got != 1 {
		t.Errorf("tracked records = %g, want 1", got)
	}
}

// A removal with no terminating phase counts only for a local pod known to be deleting.
func TestRemovalWithoutTerminating(t *testing.T) {
	f := newFixture(t, Options{})
	f.c.Observe(obs(probes.StageEndpointSliceRemoved, 5, t0, false))
	f.c.Observe(obs(probes.StageEndpointSliceRemoved, 6, t0, true))
	if got := f.value("endpointlag_tracked_records"); got != 0 {
		t.Fatalf("removals of endpoints never seen terminating made %g records", got)
	}
	f.c.Observe(obs(probes.StageDeleted, 7, t0, true))
	f.c.Observe(obs(probes.StageEndpointSliceRemoved, 7, t0.Add(50*time.Millisecond), true))
	for _, s := range []probes.Stage{probes.StageEndpointSlice, probes.StageEndpointSliceRemoved} {
		if n, sum := f.histogram("endpointlag_propagation_seconds", s); n != 1 || !near(sum, 0.05) {
			t.Errorf("propagation %s: %d samples, sum %g; want 1, 0.05", s, n, sum)
		}
	}
}

// What a probe finds at start-up is shown but never measured.
func TestInitialObservationsAreNotSampled(t *testing.T) {
	f := newFixture(t, Options{})
	del := obs(probes.StageDeleted, 1, t0, true)
	del.Initial = true
	slice := obs(probes.StageEndpointSlice, 1, t0, true)
	slice.Initial = true
	f.c.Observe(del)
	f.c.Observe(slice)
	f.c.Observe(obs(probes.StageEndpointSliceRemoved, 1, t0.Add(time.Second), true))
	if fam := f.family("endpointlag_propagation_seconds"); fam != nil {
		t.Errorf("propagation sampled from start-up state: %v", fam)
	}
	if fam := f.family("endpointlag_programming_seconds"); fam != nil {
		t.Errorf("programming sampled from start-up state: %v", fam)
	}
	recs := f.c.Records()
	if len(recs) != 1 || len(recs[0].Stages) != 3 || recs[0].Pending != nil {
		t.Errorf("records = %+v, want one complete record with 3 stages", recs)
	}
}

func TestPendingGauges(t *testing.T) {
	f := newFixture(t, Options{})
	f.c.Observe(obs(probes.StageEndpointSlice, 1, t0, false))
	f.c.Observe(obs(probes.StageEndpointSlice, 2, t0.Add(time.Second), false))
	f.clock.SetTime(t0.Add(5 * time.Second))
	if got := f.value("endpointlag_pending_endpoints", "stage", "endpointslice_removed"); got != 2 {
		t.Errorf("pending = %g, want 2", got)
	}
	if got := f.value("endpointlag_oldest_pending_seconds", "stage", "endpointslice_removed"); got != 5 {
		t.Errorf("oldest pending = %g s, want 5", got)
	}
	f.c.Observe(obs(probes.StageEndpointSliceRemoved, 1, t0.Add(5*time.Second), false))
	if got := f.value("endpointlag_pending_endpoints", "stage", "endpointslice_removed"); got != 1 {
		t.Errorf("pending after one removal = %g, want 1", got)
	}
	if got := f.value("endpointlag_oldest_pending_seconds", "stage", "endpointslice_removed"); got != 4 {
		t.Errorf("oldest pending after one removal = %g s, want 4", got)
	}
	s := f.c.Summary()
	if s.Records != 2 || s.Pending[probes.StageEndpointSliceRemoved] != 1 {
		t.Errorf("summary = %+v", s)
	}
}

func heapInUse() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

// 10,000 terminations at once with room for 5,000: the rest is dropped and counted, everything
// expires after the horizon, and the memory the records held is returned.
func TestBurstCapAndExpiry(t *testing.T) {
	const burst, limit = 10000, 5000
	f := newFixture(t, Options{MaxRecords: limit, Horizon: time.Minute})
	before := heapInUse()
	for i := range burst {
		f.c.Observe(obs(probes.StageDeleted, i, t0, true))
		f.c.Observe(obs(probes.StageEndpointSlice, i, t0.Add(time.Millisecond), true))
	}
	grown := heapInUse()
	if got := f.value("endpointlag_tracked_records"); got != limit {
		t.Errorf("tracked records = %g, want %d", got, limit)
	}
	// Each pod over the limit is dropped once as a pod and once as a record.
	if got := f.value("endpointlag_records_dropped_total", "reason", "max"); got != 2*(burst-limit) {
		t.Errorf("dropped = %g, want %d", got, 2*(burst-limit))
	}
	if got := f.value("endpointlag_pending_endpoints", "stage", "endpointslice_removed"); got != limit {
		t.Errorf("pending = %g, want %d", got, limit)
	}

	f.clock.Step(59 * time.Second)
	f.c.Sweep()
	if got := f.value("endpointlag_tracked_records"); got != limit {
		t.Fatalf("records expired before the horizon: %g left", got)
	}
	f.clock.Step(time.Second)
	f.c.Sweep()
	if got := f.value("endpointlag_tracked_records"); got != 0 {
		t.Errorf("tracked records after the horizon = %g, want 0", got)
	}
	if got := f.value("endpointlag_tracked_pods"); got != 0 {
		t.Errorf("tracked pods after the horizon = %g, want 0", got)
	}
	if got := f.value("endpointlag_records_expired_total", "outcome", "incomplete"); got != limit {
		t.Errorf("expired incomplete = %g, want %d", got, limit)
	}
	after := heapInUse()
	held := int64(grown) - int64(before)
	left := int64(after) - int64(before)
	t.Logf("heap in use: before %d, with records %d (+%d), after expiry %d (+%d)", before, grown, held, after, left)
	if held <= 0 || left > held/10 {
		t.Errorf("after expiry %d of the %d bytes the records held are still in use", left, held)
	}

	// The store works on after being emptied.
	f.c.Observe(obs(probes.StageEndpointSlice, 1, f.clock.Now(), false))
	if got := f.value("endpointlag_tracked_records"); got != 1 {
		t.Errorf("tracked records after reuse = %g, want 1", got)
	}
}

// untrusted is a slice observation of a slice no trusted controller manages.
func untrusted(o probes.Observation) probes.Observation {
	o.Untrusted = true
	return o
}

// inNamespace puts o's slice (its Service) and pod in ns.
func inNamespace(o probes.Observation, ns string) probes.Observation {
	o.Service.Namespace, o.Pod.Namespace = ns, ns
	return o
}

// tracking tells whether a record of pod i is held, and whether it is untrusted.
func (f *fixture) tracking(i int) (held, untrusted bool) {
	f.t.Helper()
	for _, r := range f.c.Records() {
		if r.Pod.UID == pod(i).UID {
			return true, r.Untrusted
		}
	}
	return false, false
}

// A flood of made-up terminating endpoints (slices no trusted controller manages) fills only
// its own budget: real terminations arriving after it are all tracked, up to --record.max.
func TestUntrustedFloodLeavesRoomForTrusted(t *testing.T) {
	const limit, untrustedLimit, flood = 10, 5, 100
	f := newFixture(t, Options{MaxRecords: limit, MaxUntrustedRecords: untrustedLimit})
	for i := range flood {
		f.c.Observe(untrusted(obs(probes.StageEndpointSlice, i, t0, false)))
	}
	for i := flood; i < flood+limit; i++ {
		f.c.Observe(obs(probes.StageEndpointSlice, i, t0.Add(time.Second), false))
		if held, _ := f.tracking(i); !held {
			t.Fatalf("the real termination of pod %d after the flood is not tracked", i)
		}
	}
	if got := f.value("endpointlag_tracked_records"); got != limit+untrustedLimit {
		t.Errorf("tracked records = %g, want %d", got, limit+untrustedLimit)
	}
	if got := f.value("endpointlag_untrusted_records"); got != untrustedLimit {
		t.Errorf("untrusted records = %g, want %d", got, untrustedLimit)
	}
	// Only trusted records filling --record.max drop a trusted one.
	f.c.Observe(obs(probes.StageEndpointSlice, flood+limit, t0.Add(time.Second), false))
	for reason, want := range map[string]float64{"untrusted": flood - untrustedLimit, "max": 1, "namespace": 0} {
		if got := f.value("endpointlag_records_dropped_total", "reason", reason); got != want {
			t.Errorf("records_dropped_total{reason=%q} = %g, want %g", reason, got, want)
		}
	}
	// An untrusted observation still joins a record a trusted one started.
	f.c.Observe(untrusted(obs(probes.StageEndpointSliceRemoved, flood, t0.Add(2*time.Second), false)))
	if n, _ := f.histogram("endpointlag_programming_seconds", probes.StageEndpointSliceRemoved); n != 1 {
		t.Errorf("the untrusted removal did not join the trusted record: %d samples", n)
	}
}

// Made-up slices can say their made-up pods run on this node: the pod timelines their records
// start are held with those records, not against the pods' --record.max, so a real pod's
// deletion still gets its timeline (T0, and so propagation).
func TestUntrustedLocalFloodLeavesRoomForPods(t *testing.T) {
	const limit, untrustedLimit = 2, 5
	f := newFixture(t, Options{MaxRecords: limit, MaxUntrustedRecords: untrustedLimit})
	for i := range 2 * untrustedLimit {
		f.c.Observe(untrusted(obs(probes.StageEndpointSlice, i, t0, true)))
	}
	for i := 100; i < 100+limit; i++ {
		f.c.Observe(obs(probes.StageDeleted, i, t0.Add(time.Second), true))
		f.c.Observe(obs(probes.StageEndpointSlice, i, t0.Add(1100*time.Millisecond), true))
	}
	if n, _ := f.histogram("endpointlag_propagation_seconds", probes.StageEndpointSlice); n != limit {
		t.Errorf("propagation samples of real local pods = %d, want %d", n, limit)
	}
	if got := f.value("endpointlag_tracked_pods"); got != limit+untrustedLimit {
		t.Errorf("tracked pods = %g, want %d", got, limit+untrustedLimit)
	}
	// Trusted pods alone fill --record.max now.
	f.c.Observe(obs(probes.StageDeleted, 200, t0.Add(time.Second), true))
	for reason, want := range map[string]float64{"untrusted": untrustedLimit, "max": 1} {
		if got := f.value("endpointlag_records_dropped_total", "reason", reason); got != want {
			t.Errorf("records_dropped_total{reason=%q} = %g, want %g", reason, got, want)
		}
	}
}

// One namespace's burst is cut at --record.max-per-namespace while other namespaces still start
// records. A made-up slice counts in its own namespace, whichever pods it names.
func TestNamespaceCap(t *testing.T) {
	const perNamespace, burst = 3, 10
	f := newFixture(t, Options{MaxRecordsPerNamespace: perNamespace, MaxUntrustedRecords: 100})
	for i := range burst {
		f.c.Observe(inNamespace(obs(probes.StageEndpointSlice, i, t0, false), "batch"))
	}
	if got := f.value("endpointlag_records_dropped_total", "reason", "namespace"); got != burst-perNamespace {
		t.Errorf("records_dropped_total{reason=namespace} = %g, want %d", got, burst-perNamespace)
	}
	for i := burst; i < burst+perNamespace; i++ {
		forged := untrusted(inNamespace(obs(probes.StageEndpointSlice, i, t0, false), "evil"))
		forged.Pod.Namespace = "shop" // a made-up pod of another namespace
		f.c.Observe(forged)
	}
	f.c.Observe(inNamespace(obs(probes.StageEndpointSlice, 100, t0, false), "shop"))
	if held, _ := f.tracking(100); !held {
		t.Error("a termination in another namespace was not tracked after one namespace's burst")
	}
	f.c.Observe(inNamespace(obs(probes.StageEndpointSlice, 101, t0, false), "batch"))
	if held, _ := f.tracking(101); held {
		t.Error("namespace batch holds more than --record.max-per-namespace records")
	}
	if got, want := f.value("endpointlag_tracked_records"), float64(2*perNamespace+1); got != want {
		t.Errorf("tracked records = %g, want %g", got, want)
	}
	if got := f.value("endpointlag_records_dropped_total", "reason", "max"); got != 0 {
		t.Errorf("records_dropped_total{reason=max} = %g, want 0", got)
	}
}

// Records that expire give their places back: to their namespace and to the untrusted budget.
func TestExpiryReleasesBudgets(t *testing.T) {
	f := newFixture(t, Options{Horizon: time.Minute, MaxRecordsPerNamespace: 2, MaxUntrustedRecords: 1})
	f.c.Observe(inNamespace(obs(probes.StageEndpointSlice, 1, t0, false), "batch"))
	f.c.Observe(inNamespace(obs(probes.StageEndpointSlice, 2, t0, false), "batch"))
	f.c.Observe(untrusted(inNamespace(obs(probes.StageEndpointSlice, 3, t0, false), "evil")))
	f.c.Observe(inNamespace(obs(probes.StageEndpointSlice, 4, t0, false), "batch"))
	f.c.Observe(untrusted(inNamespace(obs(probes.StageEndpointSlice, 5, t0, false), "evil")))
	for _, i := range []int{4, 5} {
		if held, _ := f.tracking(i); held {
			t.Fatalf("pod %d tracked over the caps", i)
		}
	}

	f.clock.Step(time.Minute)
	f.c.Sweep()
	if got := f.value("endpointlag_untrusted_records"); got != 0 {
		t.Errorf("untrusted records after expiry = %g, want 0", got)
	}
	now := f.clock.Now()
	f.c.Observe(inNamespace(obs(probes.StageEndpointSlice, 6, now, false), "batch"))
	f.c.Observe(inNamespace(obs(probes.StageEndpointSlice, 7, now, false), "batch"))
	f.c.Observe(untrusted(inNamespace(obs(probes.StageEndpointSlice, 8, now, false), "evil")))
	for _, i := range []int{6, 7, 8} {
		if held, _ := f.tracking(i); !held {
			t.Errorf("pod %d is not tracked after the records before it expired", i)
		}
	}
	if got := f.value("endpointlag_records_dropped_total", "reason", "namespace"); got != 1 {
		t.Errorf("records_dropped_total{reason=namespace} = %g, want 1", got)
	}
	if got := f.value("endpointlag_records_dropped_total", "reason", "untrusted"); got != 1 {
		t.Errorf("records_dropped_total{reason=untrusted} = %g, want 1", got)
	}
}

// A made-up slice that shows a real endpoint terminating first does not keep its record in the
// untrusted budget: the trusted slice's change makes it trusted, and frees its untrusted place.
// While trusted records fill --record.max it stays untrusted, and tracked.
func TestTrustedObservationTrustsRecord(t *testing.T) {
	f := newFixture(t, Options{MaxRecords: 2, MaxUntrustedRecords: 1})
	f.c.Observe(untrusted(obs(probes.StageEndpointSlice, 1, t0, false)))
	f.c.Observe(untrusted(obs(probes.StageEndpointSlice, 2, t0, false))) // over the untrusted budget
	if held, untrusted := f.tracking(1); !held || !untrusted {
		t.Fatalf("pod 1: held %v, untrusted %v; want an untrusted record", held, untrusted)
	}
	f.c.Observe(obs(probes.StageEndpointSlice, 1, t0.Add(time.Millisecond), false))
	if held, untrusted := f.tracking(1); !held || untrusted {
		t.Errorf("pod 1 after its trusted slice change: held %v, untrusted %v; want a trusted record", held, untrusted)
	}
	if got := f.value("endpointlag_untrusted_records"); got != 0 {
		t.Errorf("untrusted records = %g, want 0", got)
	}
	f.c.Observe(untrusted(obs(probes.StageEndpointSlice, 3, t0, false)))
	if held, _ := f.tracking(3); !held {
		t.Error("the untrusted place pod 1's record left was not freed")
	}
	// Pod 1's record counts as trusted now: one more trusted fills --record.max.
	f.c.Observe(obs(probes.StageEndpointSlice, 4, t0, false))
	f.c.Observe(obs(probes.StageEndpointSlice, 5, t0, false))
	if held, _ := f.tracking(5); held {
		t.Error("pod 5 tracked beyond --record.max trusted records")
	}
	// Pod 3's record cannot move into a full trusted budget: it stays untrusted and tracked.
	f.c.Observe(obs(probes.StageEndpointSlice, 3, t0.Add(time.Millisecond), false))
	if held, untrusted := f.tracking(3); !held || !untrusted {
		t.Errorf("pod 3 with the trusted budget full: held %v, untrusted %v; want an untrusted record", held, untrusted)
	}
	for reason, want := range map[string]float64{"untrusted": 1, "max": 1} {
		if got := f.value("endpointlag_records_dropped_total", "reason", reason); got != want {
			t.Errorf("records_dropped_total{reason=%q} = %g, want %g", reason, got, want)
		}
	}
}

func TestProbeStatusAndErrors(t *testing.T) {
	f := newFixture(t, Options{Probes: []string{"kube"}})
	if ok, waiting := f.c.Ready(); ok || strings.Join(waiting, ",") != "kube" {
		t.Errorf("Ready() = %v, %v before sync", ok, waiting)
	}
	f.c.SetStatus("kube", probes.Status{Up: true, Synced: true})
	if ok, _ := f.c.Ready(); !ok {
		t.Error("not ready after sync")
	}
	f.c.Error("kube", fmt.Errorf("watch failed"))
	f.c.Error("kube", &probes.InputError{Reason: "bad_address", Err: fmt.Errorf("x")})
	if got := f.value("endpointlag_probe_up", "probe", "kube"); got != 0 {
		t.Errorf("probe_up after a source error = %g, want 0", got)
	}
	if ok, _ := f.c.Ready(); !ok {
		t.Error("a source error after sync made the collector unready")
	}
	for _, reason := range []string{"source", "bad_address"} {
		if got := f.value("endpointlag_probe_errors_total", "probe", "kube", "reason", reason); got != 1 {
			t.Errorf("probe_errors_total{reason=%s} = %g, want 1", reason, got)
		}
	}
}

func TestOptionsValidate(t *testing.T) {
	if err := (Options{Horizon: time.Second, MaxRecords: 2, MaxUntrustedRecords: 5, MaxRecordsPerNamespace: 1, SweepInterval: time.Second}).Validate(); err != nil {
		t.Errorf("valid options: %v", err)
	}
	for _, o := range []Options{
		{Horizon: 0, MaxRecords: 1, SweepInterval: time.Second},
		{Horizon: time.Second, MaxRecords: 0, SweepInterval: time.Second},
		{Horizon: time.Second, MaxRecords: 1, SweepInterval: 0},
		{Horizon: time.Second, MaxRecords: 2, MaxUntrustedRecords: -1, SweepInterval: time.Second},
		{Horizon: time.Second, MaxRecords: 2, MaxRecordsPerNamespace: -1, SweepInterval: time.Second},
	} {
		if err := o.Validate(); err == nil {
			t.Errorf("%+v: no error", o)
		}
	}
}

func dataplane(i int, at time.Time) probes.Observation {
	return probes.Observation{Stage: probes.StageNftables, Time: at, Source: "nftables", Service: web, Endpoint: endpoint(i), Path: probes.PathCluster}
}

var withDataplane = []probes.Stage{probes.StageEndpointSliceRemoved, probes.StageNftables}

// A dataplane probe names the Service's endpoint, not the pod: the removal joins the terminating
// record of that endpoint.
func TestDataplaneRemovalJoinsTheTerminatingRecord(t *testing.T) {
	f := newFixture(t, Options{Stages: withDataplane})
	f.c.Observe(obs(probes.StageDeleted, 1, t0, true))
	f.c.Observe(obs(probes.StageEndpointSlice, 1, t0.Add(10*time.Millisecond), true))
	if got := f.value("endpointlag_pending_endpoints", "stage", "nftables"); got != 1 {
		t.Errorf("pending nftables = %g, want 1", got)
	}
	f.c.Observe(dataplane(1, t0.Add(40*time.Millisecond)))
	f.c.Observe(dataplane(1, t0.Add(90*time.Millisecond))) // a repeat is not a second sample
	if n, sum := f.histogram("endpointlag_programming_seconds", probes.StageNftables); n != 1 || !near(sum, 0.03) {
		t.Errorf("programming nftables: %d samples, sum %g; want 1, 0.03", n, sum)
	}
	if n, sum := f.histogram("endpointlag_propagation_seconds", probes.StageNftables); n != 1 || !near(sum, 0.04) {
		t.Errorf("propagation nftables: %d samples, sum %g; want 1, 0.04", n, sum)
	}
	if got := f.value("endpointlag_pending_endpoints", "stage", "nftables"); got != 0 {
		t.Errorf("pending nftables after the removal = %g, want 0", got)
	}
}

// kube-proxy can drop the endpoint before this daemon's watch delivers the slice change.
func TestDataplaneRemovalBeforeTheSliceChange(t *testing.T) {
	f := newFixture(t, Options{Stages: withDataplane})
	f.c.Observe(dataplane(2, t0))
	f.c.Observe(dataplane(3, t0)) // an endpoint that never terminates here
	f.c.Observe(obs(probes.StageEndpointSlice, 2, t0.Add(5*time.Millisecond), false))
	if n, sum := f.histogram("endpointlag_programming_seconds", probes.StageNftables); n != 1 || sum != 0 {
		t.Errorf("programming nftables: %d samples, sum %g; want 1, 0 (seen before the reference)", n, sum)
	}
	f.clock.Step(time.Minute)
	f.c.Sweep()
	f.c.Observe(obs(probes.StageEndpointSlice, 3, f.clock.Now(), false))
	if n, _ := f.histogram("endpointlag_programming_seconds", probes.StageNftables); n != 1 {
		t.Errorf("a removal older than the orphan window was adopted: %d samples", n)
	}
}

// Endpoints of Services kube-proxy does not program never wait for a dataplane stage.
func TestNotProxiedServicesAwaitNoDataplaneStage(t *testing.T) {
	f := newFixture(t, Options{Stages: withDataplane})
	o := obs(probes.StageEndpointSlice, 1, t0, false)
	o.NotProxied = true
	f.c.Observe(o)
	if got := f.value("endpointlag_pending_endpoints", "stage", "nftables"); got != 0 {
		t.Errorf("pending nftables = %g for a headless Service's endpoint", got)
	}
	if got := f.value("endpointlag_pending_endpoints", "stage", "endpointslice_removed"); got != 1 {
		t.Errorf("pending endpointslice_removed = %g, want 1", got)
	}
}

// iptables rules without comments (kube-proxy drops them above 1000 endpoints) do not name the
// Service: the removal joins the endpoint's terminating records of any Service.
func TestDataplaneRemovalWithoutService(t *testing.T) {
	f := newFixture(t, Options{Stages: []probes.Stage{probes.StageIptables}})
	f.c.Observe(obs(probes.StageEndpointSlice, 1, t0, false))
	other := obs(probes.StageEndpointSlice, 1, t0, false)
	other.Service = probes.ServiceRef{Namespace: "default", Name: "web-canary"}
	f.c.Observe(other)
	f.c.Observe(probes.Observation{Stage: probes.StageIptables, Time: t0.Add(time.Second), Source: "iptables", Endpoint: endpoint(1), Path: probes.PathCluster})
	if n, _ := f.histogram("endpointlag_programming_seconds", probes.StageIptables); n != 2 {
		t.Errorf("programming iptables: %d samples, want 2 (one per Service of the endpoint)", n)
	}
}

// The packets probe's view: a deleting pod of this node is listed with its addresses and, once
// the slices name them, its endpoints (and the watchers told); late connections join it by
// address; the time from T0 to its last new client connection is observed once, from the probe's
// exact report when the pod's addresses leave its terminating map (0 when none came).
func TestLocalPodsAndLastConnection(t *testing.T) {
	f := newFixture(t, Options{Probes: []string{"kube", "packets"}, StageProbe: map[probes.Stage]string{probes.StageLateConnection: "packets"}})
	f.c.SetStatus("packets", probes.Status{Up: true, Synced: true})
	notify := make(chan struct{}, 1)
	f.c.NotifyLocalPods(notify)
	addr := netip.MustParseAddr("10.244.1.5")
	pod := probes.PodRef{Namespace: "default", Name: "web-1", UID: "uid-1"}
	f.c.Observe(probes.Observation{Stage: probes.StageDeleted, Time: t0, Source: "kube", Pod: pod, Local: true, Addrs: []netip.Addr{addr}})
	select {
	case <-notify:
	default:
		t.Error("no notification for the deleting pod")
	}
	if got := f.c.LocalPods(); len(got) != 1 || got[0].Pod != pod || got[0].Addrs[0] != addr || got[0].Gone || len(got[0].Endpoints) != 0 {
		t.Fatalf("LocalPods = %+v", got)
	}
	for _, d := range []time.Duration{1500 * time.Millisecond, 3 * time.Second, 2 * time.Second} {
		f.c.Observe(probes.Observation{Stage: probes.StageLateConnection, Time: t0.Add(d), Source: "packets",
			Endpoint: probes.Endpoint{Addr: addr, Port: 8080, Protocol: "TCP"}, Peer: netip.MustParseAddrPort("10.244.2.7:40000")})
	}
	// The kubelet's readiness probe: listed, marked, not a client.
	f.c.Observe(probes.Observation{Stage: probes.StageLateConnection, Time: t0.Add(4 * time.Second), Source: "packets", FromNode: true,
		Endpoint: probes.Endpoint{Addr: addr, Port: 8080, Protocol: "TCP"}, Peer: netip.MustParseAddrPort("169.254.1.1:51000")})
	ep := probes.Endpoint{Addr: addr, Port: 8080, Protocol: "TCP"}
	f.c.Observe(probes.Observation{Stage: probes.StageEndpointSlice, Time: t0, Source: "kube", Pod: pod, Service: probes.ServiceRef{Namespace: "default", Name: "web"}, Endpoint: ep, Local: true})
	select {
	case <-notify:
	default:
		t.Error("no notification when the pod's endpoints became known")
	}
	if got := f.c.LocalPods(); len(got) != 1 || len(got[0].Endpoints) != 1 || got[0].Endpoints[0] != ep {
		t.Errorf("LocalPods endpoints = %+v", got)
	}
	recs := f.c.Records()
	if len(recs) != 1 || len(recs[0].Connections) != 4 || recs[0].Connections[0].Client.String() != "10.244.2.7:40000" || recs[0].Connections[0].Kind != "late" || !recs[0].Connections[3].Node {
		t.Errorf("records: %+v", recs)
	}
	other := probes.PodRef{Namespace: "default", Name: "web-2", UID: "uid-2"}
	f.c.Observe(probes.Observation{Stage: probes.StageDeleted, Time: t0, Source: "kube", Pod: other, Local: true, Addrs: []netip.Addr{netip.MustParseAddr("10.244.1.6")}})
	for _, p := range []probes.PodRef{pod, other} {
		f.c.Observe(probes.Observation{Stage: probes.StageGone, Time: t0.Add(10 * time.Second), Source: "kube", Pod: p, Local: true})
		f.c.Observe(probes.Observation{Stage: probes.StageGone, Time: t0.Add(11 * time.Second), Source: "kube", Pod: p, Local: true})
	}
	if fam := f.family("endpointlag_last_connection_seconds"); fam.GetMetric()[0].GetHistogram().GetSampleCount() != 0 {
		t.Fatal("last connection sampled before the packets probe reported it")
	}
	// The probe's exact times: a connection later than any event (events are rate-limited), and
	// none for the other pod; a repeat is not a second sample.
	f.c.Observe(probes.Observation{Stage: probes.StageLastConnection, Time: t0.Add(3500 * time.Millisecond), Source: "packets", Pod: pod, Local: true})
	f.c.Observe(probes.Observation{Stage: probes.StageLastConnection, Source: "packets", Pod: other, Local: true})
	f.c.Observe(probes.Observation{Stage: probes.StageLastConnection, Source: "packets", Pod: other, Local: true})
	m := f.family("endpointlag_last_connection_seconds").GetMetric()[0].GetHistogram()
	if m.GetSampleCount() != 2 || m.GetSampleSum() != 3.5 {
		t.Errorf("last_connection: %d samples, sum %v; want 2 samples (3.5 s and 0 s)", m.GetSampleCount(), m.GetSampleSum())
	}
	if got := f.c.LocalPods(); len(got) != 2 || !got[0].Gone || !got[1].Gone {
		t.Errorf("after gone: %+v", got)
	}
	f.clock.Step(time.Hour)
	f.c.Sweep()
	if got := f.c.LocalPods(); len(got) != 0 || len(f.c.byAddr) != 0 {
		t.Errorf("after the horizon: %+v, %d addresses indexed", got, len(f.c.byAddr))
	}
}

// Both outcomes of expired records are exported at 0 before any record expires, so that the
// first expiry is an increase Prometheus sees.
func TestExpiredOutcomesExportedFromTheStart(t *testing.T) {
	f := newFixture(t, Options{})
	var outcomes []string
	for _, m := range f.family("endpointlag_records_expired_total").GetMetric() {
		outcomes = append(outcomes, label(m, "outcome"))
		if v := m.GetCounter().GetValue(); v != 0 {
			t.Errorf("outcome %s starts at %g", label(m, "outcome"), v)
		}
	}
	if !slices.Equal(outcomes, []string{"complete", "incomplete"}) {
		t.Errorf("outcomes exported at start: %v, want complete and incomplete", outcomes)
	}
}
