package ingress

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/utils/clock"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/internal/probetest"
)

// fakeProxy is an instance of the test's own kind: its backends are set by the test, and it counts
// the reads of each sort.
type fakeProxy struct {
	mu       sync.Mutex
	backends []Backend
	err      error
	full     int
	targeted [][]string
	// reads lists every read, for the failure messages.
	reads []string
}

func (f *fakeProxy) set(bs ...Backend) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.backends = bs
}

func (f *fakeProxy) Read(context.Context) ([]Backend, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.full++
	f.reads = append(f.reads, time.Now().Format("15:04:05.000")+" full")
	return slices.Clone(f.backends), f.err
}

func (f *fakeProxy) ReadBackends(_ context.Context, names []string) ([]Backend, bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.targeted = append(f.targeted, names)
	f.reads = append(f.reads, time.Now().Format("15:04:05.000")+" "+strings.Join(names, ","))
	var out []Backend
	for _, b := range f.backends {
		if slices.Contains(names, b.Name) {
			out = append(out, b)
		}
	}
	return out, true, f.err
}

func (f *fakeProxy) counts() (int, int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.full, len(f.targeted)
}

var proxies = map[string]*fakeProxy{}

func init() {
	Register(Kind{Name: "fake", DefaultPort: 1, Scheme: "fake", New: func(t Target) (Reader, error) {
		p, ok := proxies[t.Address]
		if !ok {
			return nil, errors.New("no such fake proxy " + t.Address)
		}
		return p, nil
	}})
}

// fakePending is the collector's Pending, set by the test.
type fakePending struct {
	mu   sync.Mutex
	owed map[string][]probes.Endpoint
	ch   chan<- struct{}
}

func (f *fakePending) Pending(probes.Stage) map[string][]probes.Endpoint {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.owed
}

func (f *fakePending) NotifyPending(ch chan<- struct{}) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.ch = ch
}

func (f *fakePending) set(owed map[string][]probes.Endpoint) {
	f.mu.Lock()
	f.owed = owed
	ch := f.ch
	f.mu.Unlock()
	if ch != nil {
		ch <- struct{}{}
	}
}

var shop = probes.ServiceRef{Namespace: "shop", Name: "web"}

func ep(ip string) probes.Endpoint {
	return probes.Endpoint{Addr: netip.MustParseAddr(ip), Port: 8080, Protocol: "TCP"}
}

func server(ip string, routable bool, state string) Server {
	return Server{Endpoint: ep(ip), Routable: routable, State: state}
}

// The probe reads an instance once (reporting nothing), says which instances route to an
// endpoint, polls slowly while nothing is owed and fast while something is — only the backends
// that hold it, when the kind can — and reports a server that is no longer routable (gone, or
// kept but fenced) as removed, with the interval as its precision.
func TestProbeReadsAndReportsRemovals(t *testing.T) {
	fp := &fakeProxy{}
	proxies["one"] = fp
	fp.set(Backend{Name: "shop-web-80", Service: shop, Servers: []Server{server("10.244.1.3", true, ""), server("10.244.1.4", true, "")}},
		Backend{Name: "other", Servers: []Server{server("10.244.2.9", true, "")}})
	pending := &fakePending{}
	opts := DefaultOptions()
	opts.Instances = []string{"fake=one"}
	opts.Slow, opts.Fast = time.Hour, 5*time.Millisecond
	p := New(opts, nil, "node-a", pending, clock.RealClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	rec, _ := probetest.Run(t, p)
	rec.Wait(t, "sync", rec.Synced)
	if st := rec.Status(); st.Inactive || !st.Up {
		t.Errorf("status %+v, want active and up", st)
	}
	if full, targeted := fp.counts(); full != 1 || targeted != 0 {
		t.Errorf("reads after sync: %d full, %d targeted; want one full", full, targeted)
	}
	if reach, ok := p.Reaches(shop, ep("10.244.1.4")); !ok || len(reach) != 1 || reach[0].Source != "fake=one" {
		t.Errorf("Reaches = %+v, %v", reach, ok)
	}
	// An endpoint of a routed Service that the last read did not list has its backend read, and
	// is then known not to be routed.
	if reach, _ := p.Reaches(shop, ep("10.244.3.3")); len(reach) != 0 {
		t.Errorf("an endpoint the proxy does not route to is reached: %+v", reach)
	}
	rec.Wait(t, "the check of 10.244.3.3", func() bool {
		reach, ok := p.Reaches(shop, ep("10.244.3.3"))
		return ok && len(reach) == 0
	})

	// 10.244.1.4 terminates: owed. The proxy fences it; the next fast read reports it.
	fp.set(Backend{Name: "shop-web-80", Service: shop, Servers: []Server{server("10.244.1.3", true, ""), server("10.244.1.4", false, "fenced")}},
		Backend{Name: "other", Servers: []Server{server("10.244.2.9", true, "")}})
	pending.set(map[string][]probes.Endpoint{"fake=one": {ep("10.244.1.4")}})
	rec.Wait(t, "the removal", func() bool { return len(rec.Observations()) > 0 })
	obs := rec.Observations()
	if len(obs) != 1 {
		t.Fatalf("observations %+v, want one", obs)
	}
	o := obs[0]
	if o.Stage != probes.StageIngress || o.Source != "fake=one" || o.SourceKind != "fake" || o.Service != shop || o.Endpoint != ep("10.244.1.4") || o.Precision <= 0 {
		t.Errorf("observation %+v", o)
	}
	fp.mu.Lock()
	targeted := slices.Clone(fp.targeted)
	fp.mu.Unlock()
	if len(targeted) == 0 || !slices.Equal(targeted[0], []string{"shop-web-80"}) {
		t.Errorf("targeted reads %v, want the owed endpoint's backend only", targeted)
	}

	// Nothing owed any more: the interval doubles back towards the heartbeat (5, 10, 20, 40,
	// 80, 160 ms: at most 6 reads in 300 ms, where polling on at 5 ms would make about 60), and
	// those reads ask for the backend that held what was owed only; the heartbeat (an hour here)
	// reads everything.
	pending.set(map[string][]probes.Endpoint{})
	full0, targeted0 := fp.counts()
	time.Sleep(300 * time.Millisecond)
	full1, targeted1 := fp.counts()
	if n := targeted1 - targeted0; full1 != full0 || n < 1 || n > 8 {
		fp.mu.Lock()
		reads := slices.Clone(fp.reads)
		fp.mu.Unlock()
		t.Errorf("in the 300 ms after the last owed removal: %d full reads, %d targeted; want none full and a few targeted, backing off; every read:\n%s", full1-full0, n, strings.Join(reads, "\n"))
	}
	fp.mu.Lock()
	last := fp.targeted[len(fp.targeted)-1]
	fp.mu.Unlock()
	if !slices.Equal(last, []string{"shop-web-80"}) {
		t.Errorf("backing off, the probe reads %v; want the backend that held what it owed", last)
	}
}

// A removal's precision is the time since its own backend was last read: a backend that only the
// full reads ask for has the previous full read's age, however many targeted reads came between.
func TestPrecisionPerBackend(t *testing.T) {
	in := newInstance("fake=p", Kind{Name: "fake"}, "p", nil, func() {}, time.Time{})
	t0 := time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	a := Backend{Name: "a", Service: shop, Servers: []Server{server("10.244.1.1", true, "")}}
	b := Backend{Name: "b", Service: shop, Servers: []Server{server("10.244.1.2", true, "")}}
	if removed, first := in.apply(at(0), at(5), []Backend{a, b}, true); !first || len(removed) != 0 {
		t.Fatalf("first read: %v, first %v", removed, first)
	}
	for ms := 20; ms <= 100; ms += 20 {
		if removed, _ := in.apply(at(ms), at(ms+1), []Backend{a}, false); len(removed) != 0 {
			t.Fatalf("a targeted read of a reports %v", removed)
		}
	}
	aFenced := Backend{Name: "a", Service: shop, Servers: []Server{server("10.244.1.1", false, "fenced")}}
	removed, _ := in.apply(at(200), at(210), []Backend{aFenced, {Name: "b", Service: shop}}, true)
	got := map[probes.Endpoint]time.Duration{}
	for _, r := range removed {
		got[r.endpoint] = r.precision
	}
	want := map[probes.Endpoint]time.Duration{ep("10.244.1.1"): 110 * time.Millisecond, ep("10.244.1.2"): 210 * time.Millisecond}
	if len(got) != len(want) || got[ep("10.244.1.1")] != want[ep("10.244.1.1")] || got[ep("10.244.1.2")] != want[ep("10.244.1.2")] {
		t.Errorf("removals with precision %v, want %v", got, want)
	}
}

// A read that fails takes the probe down and is counted; the next good read brings it up, and a
// removal that happened meanwhile is still reported.
func TestProbeRecoversFromFailedReads(t *testing.T) {
	fp := &fakeProxy{}
	proxies["two"] = fp
	fp.set(Backend{Name: "b", Service: shop, Servers: []Server{server("10.244.1.3", true, ""), server("10.244.1.4", true, "")}})
	pending := &fakePending{}
	opts := DefaultOptions()
	opts.Instances = []string{"fake=two"}
	opts.Slow, opts.Fast = time.Hour, 5*time.Millisecond
	p := New(opts, nil, "node-a", pending, clock.RealClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	rec, _ := probetest.Run(t, p)
	rec.Wait(t, "sync", rec.Synced)
	fp.mu.Lock()
	fp.err = errors.New("connection refused")
	fp.mu.Unlock()
	pending.set(map[string][]probes.Endpoint{"fake=two": {ep("10.244.1.4")}})
	rec.Wait(t, "the failed read", func() bool { return len(rec.Errors()) > 0 && !rec.Up() })
	fp.mu.Lock()
	fp.err = nil
	fp.backends = []Backend{{Name: "b", Service: shop, Servers: []Server{server("10.244.1.3", true, "")}}}
	fp.mu.Unlock()
	rec.Wait(t, "up again with the removal", func() bool { return rec.Up() && len(rec.Observations()) == 1 })
}

// An annotated pod's admin address: the annotation's port, the kind's port from
// --ingress.admin-ports, else its default, or a full address; one inside the pod only with
// --ingress.enter-pods, and then dialed from within the pod.
func TestTarget(t *testing.T) {
	Register(Kind{Name: "targettest", DefaultPort: 9000, Scheme: "http"})
	k, _ := Lookup("targettest")
	for _, tc := range []struct {
		ann, want, err string
		ports          map[string]int
		enter, inPod   bool
	}{
		{ann: "", want: "http://10.244.1.7:9000"},
		{ann: "", ports: map[string]int{"targettest": 8082}, want: "http://10.244.1.7:8082"},
		{ann: "8080", ports: map[string]int{"targettest": 8082}, want: "http://10.244.1.7:8080"},
		{ann: "tcp://10.0.0.1:9999", want: "tcp://10.0.0.1:9999"},
		{ann: "http://127.0.0.1:19000", err: "--ingress.enter-pods"},
		{ann: "unix:///var/run/haproxy.sock", err: "--ingress.enter-pods"},
		{ann: "http://127.0.0.1:19000", enter: true, want: "http://127.0.0.1:19000", inPod: true},
		{ann: "http://localhost:19000", enter: true, want: "http://localhost:19000", inPod: true},
		{ann: "unix:///var/run/haproxy.sock", enter: true, want: "unix:///var/run/haproxy.sock", inPod: true},
		{ann: "nine", err: "neither a port"},
		{ann: "70000", err: "neither a port"},
	} {
		opts := DefaultOptions()
		opts.AdminPorts, opts.EnterPods = tc.ports, tc.enter
		p := New(opts, nil, "node-a", nil, clock.RealClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
		got, err := p.target(k, "10.244.1.7", tc.ann)
		if got.Address != tc.want || (got.Dial != nil) != tc.inPod || (err == nil) != (tc.err == "") || (err != nil && !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("%q (ports %v, enter %v) = %q (inside the pod: %v), %v; want %q (%v), error %q",
				tc.ann, tc.ports, tc.enter, got.Address, got.Dial != nil, err, tc.want, tc.inPod, tc.err)
		}
	}
	opts := DefaultOptions()
	opts.AdminPorts = map[string]int{"nosuchkind": 1}
	if err := opts.Validate(); err == nil || !strings.Contains(err.Error(), "nosuchkind") {
		t.Errorf("an unknown kind in --ingress.admin-ports: %v", err)
	}
	opts.AdminPorts = map[string]int{"targettest": 0}
	if err := opts.Validate(); err == nil {
		t.Error("port 0 in --ingress.admin-ports is accepted")
	}
	if err := (Options{Fast: time.Second, Slow: time.Millisecond, Timeout: time.Second}).Validate(); err == nil {
		t.Error("a fast interval longer than the slow one is accepted")
	}
	if err := (Options{Fast: time.Millisecond, Slow: time.Second, Timeout: time.Second, Instances: []string{"nginx"}}).Validate(); err == nil {
		t.Error("an instance without an address is accepted")
	}
}

// An endpoint two backends route to is removed when the last of them stops; a backend a full read
// no longer finds takes its endpoints with it; a targeted read leaves the other backends alone.
func TestRemovalAcrossBackends(t *testing.T) {
	in := newInstance("fake=x", Kind{Name: "fake"}, "x", nil, func() {}, time.Time{})
	in.settled = true
	routes := func(e probes.Endpoint) bool { return in.reaches(shop, e, time.Time{}) == reached }
	t0 := time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	shared := server("10.244.1.1", true, "")
	a := Backend{Name: "a", Servers: []Server{shared}}
	b := Backend{Name: "b", Servers: []Server{shared, server("10.244.1.2", true, "")}}
	c := Backend{Name: "c", Servers: []Server{server("10.244.1.3", true, "")}}
	in.apply(at(0), at(1), []Backend{a, b, c}, true)
	endpoints := func(rs []removal) []string {
		var out []string
		for _, r := range rs {
			out = append(out, r.endpoint.Addr.String())
		}
		slices.Sort(out)
		return out
	}
	if removed, _ := in.apply(at(10), at(11), []Backend{{Name: "a"}}, false); len(removed) != 0 {
		t.Errorf("a stops routing to the shared endpoint, b still does: removed %v", endpoints(removed))
	}
	if !routes(ep("10.244.1.1")) || !routes(ep("10.244.1.3")) {
		t.Error("after a targeted read of a, the shared endpoint (b) or c's is no longer routed")
	}
	removed, _ := in.apply(at(20), at(21), []Backend{{Name: "a"}}, true)
	if got := endpoints(removed); !slices.Equal(got, []string{"10.244.1.1", "10.244.1.2", "10.244.1.3"}) {
		t.Errorf("a full read without b and c removed %v; want all three endpoints", got)
	}
	if routes(ep("10.244.1.1")) {
		t.Error("the shared endpoint is still routed after both its backends went")
	}
}

// A proxy that does not answer its first reads (starting up): it is retried soon, not at the
// heartbeat; until it answers, whether it routes to an endpoint is undetermined (Reaches is not
// ok) and its answer makes the probe report, for the collector to ask again. One that never
// answers is given up on after firstReadGrace: then it routes to nothing.
func TestProbeSettlesInstances(t *testing.T) {
	starting := &fakeProxy{err: errors.New("404 page not found")}
	proxies["starting"] = starting
	never := &fakeProxy{err: errors.New("connection refused")}
	proxies["never"] = never
	starting.backends = []Backend{{Name: "b", Service: shop, Servers: []Server{server("10.244.1.3", true, "")}}}
	opts := DefaultOptions()
	opts.Instances = []string{"fake=starting"}
	opts.Slow = time.Hour
	clk := clocktesting.NewFakeClock(time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC))
	p := New(opts, nil, "node-a", nil, clk, slog.New(slog.NewTextHandler(io.Discard, nil)))
	rec, _ := probetest.Run(t, p)
	rec.Wait(t, "sync", rec.Synced)
	if _, ok := p.Reaches(shop, ep("10.244.1.3")); ok {
		t.Fatal("Reaches is ok before the instance ever answered")
	}
	starting.mu.Lock()
	starting.err = nil
	starting.mu.Unlock()
	rec.Wait(t, "the retried first read (the heartbeat is an hour)", func() bool {
		reach, ok := p.Reaches(shop, ep("10.244.1.3"))
		return ok && len(reach) == 1 && rec.Up()
	})

	opts.Instances = []string{"fake=never"}
	p = New(opts, nil, "node-a", nil, clk, slog.New(slog.NewTextHandler(io.Discard, nil)))
	rec, _ = probetest.Run(t, p)
	rec.Wait(t, "sync", rec.Synced)
	if _, ok := p.Reaches(shop, ep("10.244.1.3")); ok {
		t.Fatal("Reaches is ok before the instance ever answered")
	}
	clk.Step(firstReadGrace)
	rec.Wait(t, "giving up on the instance", func() bool {
		reach, ok := p.Reaches(shop, ep("10.244.1.3"))
		return ok && len(reach) == 0
	})
	if rec.Up() {
		t.Error("the probe is up though its only instance never answered")
	}
}

// An endpoint the last read did not show, of a Service the instance routes: the proxy may have
// added it since. Reaches is not sure, has that Service's backends read at once (not at the
// heartbeat), and then answers; an endpoint of a Service the instance does not route is answered
// at once.
func TestReachesChecksNewEndpoints(t *testing.T) {
	fp := &fakeProxy{}
	proxies["growing"] = fp
	fp.set(Backend{Name: "shop-web-80", Service: shop, Servers: []Server{server("10.244.1.3", true, "")}})
	opts := DefaultOptions()
	opts.Instances = []string{"fake=growing"}
	opts.Slow = time.Hour
	p := New(opts, nil, "node-a", nil, clock.RealClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	rec, _ := probetest.Run(t, p)
	rec.Wait(t, "sync", rec.Synced)
	// A Service the last read did not show: the proxy may route it since (an Ingress created
	// after the read), so Reaches is sure only after a full read that began after the question.
	other := probes.ServiceRef{Namespace: "shop", Name: "other"}
	if _, ok := p.Reaches(other, ep("10.244.9.9")); ok {
		t.Fatal("a Service the last read did not show: Reaches is sure from a read that predates the question")
	}
	rec.Wait(t, "the full read that shows the Service is not routed", func() bool {
		reach, ok := p.Reaches(other, ep("10.244.9.9"))
		return ok && len(reach) == 0
	})
	// Now routed by the proxy: the next question about it finds it.
	fp.set(Backend{Name: "shop-web-80", Service: shop, Servers: []Server{server("10.244.1.3", true, "")}},
		Backend{Name: "shop-other-80", Service: other, Servers: []Server{server("10.244.9.9", true, "")}})
	if _, ok := p.Reaches(other, ep("10.244.9.9")); ok {
		t.Fatal("Reaches is sure of a Service the proxy began routing after its last read")
	}
	rec.Wait(t, "the full read that shows the new Service", func() bool {
		reach, ok := p.Reaches(other, ep("10.244.9.9"))
		return ok && len(reach) == 1
	})
	// Many questions about Services the proxy does not route share one full read.
	full, _ := fp.counts()
	var unknown []probes.ServiceRef
	for i := range 20 {
		unknown = append(unknown, probes.ServiceRef{Namespace: "shop", Name: fmt.Sprintf("unrouted-%d", i)})
		p.Reaches(unknown[i], ep("10.244.8.8"))
	}
	rec.Wait(t, "the answers about 20 unrouted Services", func() bool {
		for _, svc := range unknown {
			if reach, ok := p.Reaches(svc, ep("10.244.8.8")); !ok || len(reach) != 0 {
				return false
			}
		}
		return true
	})
	if after, _ := fp.counts(); after-full > 2 {
		t.Errorf("%d full reads answered 20 questions asked at once; want 1 (2 if one began between them)", after-full)
	}
	fp.set(Backend{Name: "shop-web-80", Service: shop, Servers: []Server{server("10.244.1.3", true, "")}})
	fp.set(Backend{Name: "shop-web-80", Service: shop, Servers: []Server{server("10.244.1.3", true, ""), server("10.244.1.5", true, "")}})
	if _, ok := p.Reaches(shop, ep("10.244.1.5")); ok {
		t.Fatal("a new endpoint of a routed Service: Reaches is sure from a read that predates it")
	}
	rec.Wait(t, "the check's read", func() bool {
		reach, ok := p.Reaches(shop, ep("10.244.1.5"))
		return ok && len(reach) == 1
	})
	fp.mu.Lock()
	targeted := slices.Clone(fp.targeted)
	fp.mu.Unlock()
	if len(targeted) == 0 || !slices.Equal(targeted[len(targeted)-1], []string{"shop-web-80"}) {
		t.Errorf("targeted reads %v; want the routed Service's backend", targeted)
	}
	// An endpoint the fresh read does not have either: not routed, and sure of it once read.
	if _, ok := p.Reaches(shop, ep("10.244.1.7")); ok {
		t.Fatal("Reaches is sure of 10.244.1.7 without a read after the question")
	}
	rec.Wait(t, "the second check", func() bool {
		reach, ok := p.Reaches(shop, ep("10.244.1.7"))
		return ok && len(reach) == 0
	})
}
