package collector

import (
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/endpointlag/endpointlag/probes"
)

// fakeDataplane answers Reaches from a table (ok false while unsynced).
type fakeDataplane struct {
	mu     sync.Mutex
	synced bool
	reach  map[probes.Endpoint][]probes.Reach
}

func newFakeDataplane() *fakeDataplane {
	return &fakeDataplane{synced: true, reach: map[probes.Endpoint][]probes.Reach{}}
}

func (d *fakeDataplane) Reaches(_ probes.ServiceRef, ep probes.Endpoint) ([]probes.Reach, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.reach[ep], d.synced
}

func (d *fakeDataplane) set(ep probes.Endpoint, r ...probes.Reach) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.reach[ep] = r
}

var (
	clusterPath = probes.Reach{Path: probes.PathCluster, Policy: probes.Policy{Cluster: true}}
	localExt    = probes.Reach{Path: probes.PathExternal, Policy: probes.Policy{Local: true}}
)

// nftFixture is a collector awaiting endpointslice_removed and nftables, whose nftables probe is
// dp.
func nftFixture(t *testing.T, dp *fakeDataplane) *fixture {
	f := newFixture(t, Options{Stages: withDataplane, Probes: []string{"kube", "nftables"},
		StageProbe: map[probes.Stage]string{probes.StageNftables: "nftables", probes.StageEndpointSliceRemoved: "kube"}})
	f.c.SetDataplane(probes.StageNftables, dp)
	f.c.SetStatus("kube", probes.Status{Up: true, Synced: true})
	f.c.SetStatus("nftables", probes.Status{Up: true, Synced: true})
	return f
}

// A dataplane stage is awaited only where this node's rules reached the endpoint when its record
// started: a node-local Service's remote endpoint, a topology-filtered one or a pod never ready
// is not applicable here, never pending, never expired incomplete.
func TestDataplaneStageAwaitedOnlyWhereTheRulesReachedIt(t *testing.T) {
	dp := newFakeDataplane()
	f := nftFixture(t, dp)
	dp.set(endpoint(1), clusterPath)
	f.c.Observe(obs(probes.StageEndpointSlice, 1, t0, false)) // reached
	f.c.Observe(obs(probes.StageEndpointSlice, 2, t0, false)) // never in this node's rules
	if got := f.value("endpointlag_pending_endpoints", "stage", "nftables"); got != 1 {
		t.Errorf("pending nftables = %g, want 1 (only the endpoint the rules reach)", got)
	}
	for _, r := range f.c.Records() {
		switch r.Endpoint {
		case endpoint(1):
			if !slices.Equal(r.Awaited, []string{"nftables/cluster"}) || r.NotApplicable != nil {
				t.Errorf("reached endpoint: awaited %v, not applicable %v", r.Awaited, r.NotApplicable)
			}
		case endpoint(2):
			if r.Awaited != nil || !slices.Equal(r.NotApplicable, []string{"nftables"}) || slices.Contains(r.Pending, "nftables") {
				t.Errorf("unreached endpoint: awaited %v, not applicable %v, pending %v", r.Awaited, r.NotApplicable, r.Pending)
			}
		}
	}
	for _, i := range []int{1, 2} {
		f.c.Observe(obs(probes.StageEndpointSliceRemoved, i, t0.Add(time.Second), false))
	}
	f.c.Observe(dataplane(1, t0.Add(500*time.Millisecond)))
	f.clock.Step(time.Hour)
	f.c.Sweep()
	if got := f.value("endpointlag_records_expired_total", "outcome", "complete"); got != 2 {
		t.Errorf("expired complete = %g, want 2", got)
	}
	if got := f.value("endpointlag_records_expired_total", "outcome", "incomplete"); got != 0 {
		t.Errorf("expired incomplete = %g, want 0", got)
	}
}

// Records that start before the dataplane probe has read its rules wait for it; once it has,
// what it reaches is awaited and the rest does not apply.
func TestUndeterminedUntilTheProbeSynced(t *testing.T) {
	dp := newFakeDataplane()
	dp.synced = false
	f := nftFixture(t, dp)
	f.c.Observe(obs(probes.StageEndpointSlice, 1, t0, false))
	f.c.Observe(obs(probes.StageEndpointSlice, 2, t0, false))
	if got := f.value("endpointlag_pending_endpoints", "stage", "nftables"); got != 2 {
		t.Errorf("pending nftables before the probe read its rules = %g, want 2", got)
	}
	dp.mu.Lock()
	dp.synced = true
	dp.mu.Unlock()
	dp.set(endpoint(2), clusterPath)
	f.c.SetStatus("nftables", probes.Status{Up: true, Synced: true})
	if got := f.value("endpointlag_pending_endpoints", "stage", "nftables"); got != 1 {
		t.Errorf("pending nftables after = %g, want 1", got)
	}
}

// The ClusterIP path and the external path are awaited and measured apart: a removal on one does
// not complete the other, and each has its own series.
func TestPathsAreAwaitedApart(t *testing.T) {
	dp := newFakeDataplane()
	f := nftFixture(t, dp)
	dp.set(endpoint(1), clusterPath, probes.Reach{Path: probes.PathExternal, Policy: probes.Policy{Cluster: true}})
	f.c.Observe(obs(probes.StageEndpointSlice, 1, t0, false))
	f.c.Observe(dataplane(1, t0.Add(100*time.Millisecond)))
	if got := f.value("endpointlag_pending_endpoints", "stage", "nftables"); got != 1 {
		t.Errorf("pending nftables after the cluster path's removal = %g, want 1 (the external path)", got)
	}
	ext := dataplane(1, t0.Add(300*time.Millisecond))
	ext.Path = probes.PathExternal
	f.c.Observe(ext)
	if got := f.value("endpointlag_pending_endpoints", "stage", "nftables"); got != 0 {
		t.Errorf("pending nftables after both = %g, want 0", got)
	}
	if n, sum := f.histogramPath("endpointlag_programming_seconds", probes.StageNftables, probes.PathCluster); n != 1 || !near(sum, 0.1) {
		t.Errorf("programming nftables cluster: %d, %g; want 1, 0.1", n, sum)
	}
	if n, sum := f.histogramPath("endpointlag_programming_seconds", probes.StageNftables, probes.PathExternal); n != 1 || !near(sum, 0.3) {
		t.Errorf("programming nftables external: %d, %g; want 1, 0.3", n, sum)
	}
}

// KEP-1669: with no ready endpoint left, kube-proxy keeps routing to a serving, terminating
// endpoint on purpose. While that holds the path is not pending; the removal that follows the
// fallback's end is counted apart, not sampled as sync lag; its age as pending runs from the end.
func TestFallbackIsNotLag(t *testing.T) {
	dp := newFakeDataplane()
	f := nftFixture(t, dp)
	dp.set(endpoint(1), clusterPath)
	o := obs(probes.StageEndpointSlice, 1, t0, false)
	o.Serving, o.Fallback = true, probes.Fallback{Cluster: true}
	f.c.Observe(o)
	f.clock.SetTime(t0.Add(20 * time.Second))
	if got := f.value("endpointlag_pending_endpoints", "stage", "nftables"); got != 0 {
		t.Errorf("pending nftables while kube-proxy falls back to the endpoint = %g, want 0", got)
	}
	if r := f.c.Records(); len(r) != 1 || !slices.Equal(r[0].Held, []string{"nftables/cluster"}) || !r[0].Serving || r[0].Fallback == nil {
		t.Errorf("record %+v, want held on the cluster path", r)
	}
	end := obs(probes.StageFallbackEnded, 1, t0.Add(18*time.Second), false)
	end.Fallback = probes.Fallback{Cluster: true}
	f.c.Observe(end)
	if got := f.value("endpointlag_pending_endpoints", "stage", "nftables"); got != 1 {
		t.Errorf("pending nftables after the fallback ended = %g, want 1", got)
	}
	if got := f.value("endpointlag_oldest_pending_seconds", "stage", "nftables"); got != 2 {
		t.Errorf("oldest pending = %g s, want 2 (since the fallback ended)", got)
	}
	f.c.Observe(dataplane(1, t0.Add(19*time.Second)))
	if n, _ := f.histogram("endpointlag_programming_seconds", probes.StageNftables); n != 0 {
		t.Errorf("a fallback removal was sampled as programming lag (%d samples)", n)
	}
	if got := f.value("endpointlag_unsampled_total", "stage", "nftables", "path", "cluster", "reason", "fallback"); got != 1 {
		t.Errorf("unsampled{fallback} = %g, want 1", got)
	}
	if got := f.value("endpointlag_pending_endpoints", "stage", "nftables"); got != 0 {
		t.Errorf("pending nftables after the removal = %g, want 0", got)
	}
}

// A node-local fallback holds only the paths reached through the node-local chain: the ClusterIP
// path of a Service with externalTrafficPolicy Local is measured as usual.
func TestLocalFallbackHoldsOnlyLocalPaths(t *testing.T) {
	dp := newFakeDataplane()
	f := nftFixture(t, dp)
	dp.set(endpoint(1), clusterPath, localExt)
	o := obs(probes.StageEndpointSlice, 1, t0, true)
	o.Serving, o.Fallback = true, probes.Fallback{Local: true}
	f.c.Observe(o)
	f.c.Observe(dataplane(1, t0.Add(200*time.Millisecond)))
	if n, sum := f.histogramPath("endpointlag_programming_seconds", probes.StageNftables, probes.PathCluster); n != 1 || !near(sum, 0.2) {
		t.Errorf("programming nftables cluster: %d, %g; want 1, 0.2", n, sum)
	}
	if got := f.value("endpointlag_pending_endpoints", "stage", "nftables"); got != 0 {
		t.Errorf("pending nftables = %g, want 0 (the external path is held)", got)
	}
}

// Of the records of one endpoint only the newest whose slice change came before the removal takes
// it: a pod that reuses an earlier pod's address never lends its removal to the old record, and a
// removal long before a record's slice change is not its own.
func TestRemovalJoinsTheNewestRecordOfTheEndpoint(t *testing.T) {
	dp := newFakeDataplane()
	f := nftFixture(t, dp)
	dp.set(endpoint(1), clusterPath)
	old := obs(probes.StageEndpointSlice, 1, t0, false)
	old.Pod = probes.PodRef{Namespace: "default", Name: "old", UID: "uid-old"}
	f.c.Observe(old) // its removal was never seen (the daemon was busy, say)
	f.clock.Step(3 * time.Minute)
	reuse := obs(probes.StageEndpointSlice, 1, f.clock.Now(), false)
	reuse.Pod = probes.PodRef{Namespace: "default", Name: "new", UID: "uid-new"}
	f.c.Observe(reuse)
	f.c.Observe(dataplane(1, f.clock.Now().Add(50*time.Millisecond)))
	for _, r := range f.c.Records() {
		got := slices.ContainsFunc(r.Stages, func(s StageView) bool { return s.Stage == "nftables" })
		if want := r.Pod.UID == "uid-new"; got != want {
			t.Errorf("%s has the removal: %v, want %v", r.Pod.Name, got, want)
		}
	}
	if n, sum := f.histogram("endpointlag_programming_seconds", probes.StageNftables); n != 1 || !near(sum, 0.05) {
		t.Errorf("programming nftables: %d, %g; want one sample of 0.05 s (not minutes)", n, sum)
	}
	// A removal from before a record's slice change (by more than the orphan window: a probe
	// reporting late) is not its.
	dp.set(endpoint(2), clusterPath)
	f.c.Observe(obs(probes.StageEndpointSlice, 2, f.clock.Now(), false))
	f.c.Observe(dataplane(2, f.clock.Now().Add(-time.Minute)))
	if r := f.c.Records(); !slices.ContainsFunc(r, func(v RecordView) bool { return v.Endpoint == endpoint(2) && slices.Contains(v.Pending, "nftables") }) {
		t.Errorf("an old removal was taken by a later record: %+v", r)
	}
}

// The probe publishes its state before it reports a removal: a record started in between finds
// the endpoint unreached, and the removal, timestamped before the record, still joins it.
func TestRemovalRacingTheRecordStillJoins(t *testing.T) {
	dp := newFakeDataplane()
	f := nftFixture(t, dp)
	f.clock.SetTime(t0.Add(10 * time.Millisecond))
	f.c.Observe(obs(probes.StageEndpointSlice, 1, f.clock.Now(), false))
	f.c.Observe(dataplane(1, t0))
	if n, _ := f.histogram("endpointlag_programming_seconds", probes.StageNftables); n != 1 {
		t.Errorf("programming nftables: %d samples, want 1", n)
	}
	// A removal stamped after the record started, for an endpoint the rules never reached, is
	// another pod's business: not joined.
	f.c.Observe(obs(probes.StageEndpointSlice, 2, f.clock.Now(), false))
	f.c.Observe(dataplane(2, f.clock.Now().Add(time.Second)))
	if n, _ := f.histogram("endpointlag_programming_seconds", probes.StageNftables); n != 1 {
		t.Errorf("programming nftables: %d samples, want still 1", n)
	}
}

// Orphans are found by endpoint, expire after the window, and those dropped for room are counted
// in their own counter, not as records.
func TestOrphans(t *testing.T) {
	dp := newFakeDataplane()
	f := nftFixture(t, dp)
	for i := range maxOrphans + 5 {
		f.c.Observe(dataplane(100+i, t0))
	}
	if got := f.value("endpointlag_orphans_dropped_total"); got != 5 {
		t.Errorf("orphans dropped = %g, want 5", got)
	}
	if got := f.value("endpointlag_records_dropped_total"); got != 0 {
		t.Errorf("records dropped = %g, want 0", got)
	}
	f.c.Observe(obs(probes.StageEndpointSlice, 100+maxOrphans, t0.Add(time.Second), false))
	if n, _ := f.histogram("endpointlag_programming_seconds", probes.StageNftables); n != 1 {
		t.Errorf("the orphan was not adopted: %d samples", n)
	}
	f.clock.Step(orphanWindow + time.Second)
	f.c.Sweep()
	if n := len(f.c.orphans.byEndpoint); n != 0 {
		t.Errorf("%d endpoints' orphans left after the window", n)
	}
}

// Changes first seen on a relist (a watch that broke, lost kernel messages) are shown, flagged,
// and counted apart instead of sampled; a relisted slice change is no programming reference and
// a relisted deletion no T0.
func TestRelistsAreNotLag(t *testing.T) {
	dp := newFakeDataplane()
	f := nftFixture(t, dp)
	dp.set(endpoint(1), clusterPath)
	dp.set(endpoint(2), clusterPath)
	f.c.Observe(obs(probes.StageEndpointSlice, 1, t0, false))
	rm := dataplane(1, t0.Add(3*time.Second))
	rm.Relist, rm.Precision = true, 3*time.Second
	f.c.Observe(rm)
	if n, _ := f.histogram("endpointlag_programming_seconds", probes.StageNftables); n != 0 {
		t.Errorf("a relisted removal was sampled")
	}
	if got := f.value("endpointlag_unsampled_total", "stage", "nftables", "path", "cluster", "reason", "relist"); got != 1 {
		t.Errorf("unsampled{relist} = %g, want 1", got)
	}
	del := obs(probes.StageDeleted, 2, t0, true)
	del.Relist = true
	f.c.Observe(del)
	sl := obs(probes.StageEndpointSlice, 2, t0, true)
	sl.Relist = true
	f.c.Observe(sl)
	f.c.Observe(dataplane(2, t0.Add(time.Second)))
	if n, _ := f.histogram("endpointlag_programming_seconds", probes.StageNftables); n != 0 {
		t.Errorf("a removal was measured against a relisted slice change")
	}
	if fam := f.family("endpointlag_propagation_seconds"); fam != nil {
		t.Errorf("propagation measured from a relisted deletion: %v", fam)
	}
	if got := f.value("endpointlag_unsampled_total", "stage", "deleted", "path", "", "reason", "relist"); got != 1 {
		t.Errorf("unsampled{deleted, relist} = %g, want 1: a deletion first seen on a relist is counted", got)
	}
	gone := obs(probes.StageGone, 2, t0.Add(2*time.Second), true)
	gone.Relist = true
	f.c.Observe(gone)
	if got := f.value("endpointlag_unsampled_total", "stage", "gone", "path", "", "reason", "relist"); got != 1 {
		t.Errorf("unsampled{gone, relist} = %g, want 1", got)
	}
	goneSeen := false
	for _, r := range f.c.Records() {
		for _, s := range r.Stages {
			if s.Stage == string(probes.StageGone) {
				goneSeen = true
				if !s.Relist || s.Propagation != nil {
					t.Errorf("a pod's removal first seen on a relist shows as %+v", s)
				}
			}
		}
	}
	if !goneSeen {
		t.Error("no record shows the pod's removal")
	}
	for _, r := range f.c.Records() {
		if r.Endpoint == endpoint(1) && !slices.ContainsFunc(r.Stages, func(s StageView) bool { return s.Relist && s.Precision == 3 }) {
			t.Errorf("record %+v shows no relisted stage", r)
		}
	}
}

// An address a live pod of this node holds is never watched for a deleting pod: a completed
// pod's status keeps an address its CNI released, and a new pod may hold it by then.
func TestLivePodsKeepTheirAddresses(t *testing.T) {
	f := newFixture(t, Options{})
	notify := make(chan struct{}, 1)
	f.c.NotifyLocalPods(notify)
	addr := netip.MustParseAddr("10.244.1.7")
	done := probes.PodRef{Namespace: "default", Name: "job-1", UID: "uid-job"}
	live := probes.PodRef{Namespace: "default", Name: "web-2", UID: "uid-live"}

	// The deleting pod first, then a live pod takes the address: it leaves the deleting pod's
	// entry at once.
	f.c.Observe(probes.Observation{Stage: probes.StageDeleted, Time: t0, Source: "kube", Pod: done, Local: true, Addrs: []netip.Addr{addr}})
	<-notify
	f.c.Observe(probes.Observation{Stage: probes.StagePodAddresses, Time: t0, Source: "kube", Pod: live, Local: true, Addrs: []netip.Addr{addr}})
	select {
	case <-notify:
	default:
		t.Error("no notification when a live pod took the address")
	}
	if got := f.c.LocalPods(); len(got) != 0 {
		t.Errorf("LocalPods = %+v, want none (the address is the live pod's)", got)
	}
	// The other order: the live pod is known first.
	other := probes.PodRef{Namespace: "default", Name: "job-2", UID: "uid-job-2"}
	f.c.Observe(probes.Observation{Stage: probes.StageDeleted, Time: t0, Source: "kube", Pod: other, Local: true, Addrs: []netip.Addr{addr}})
	if got := f.c.LocalPods(); len(got) != 0 {
		t.Errorf("LocalPods = %+v, want none", got)
	}
	// Once the live pod is deleting itself, its address is its own deleting pod's.
	f.c.Observe(probes.Observation{Stage: probes.StageDeleted, Time: t0.Add(time.Second), Source: "kube", Pod: live, Local: true, Addrs: []netip.Addr{addr}})
	if got := f.c.LocalPods(); len(got) != 1 || got[0].Pod != live {
		t.Errorf("LocalPods = %+v, want the live pod now deleting", got)
	}
}

// /healthz: a collector whose sweep loop stopped (a wedged lock, say) is not healthy.
func TestHealthy(t *testing.T) {
	f := newFixture(t, Options{})
	if err := f.c.Healthy(); err != nil {
		t.Errorf("a fresh collector is unhealthy: %v", err)
	}
	f.clock.Step(4 * time.Second)
	if err := f.c.Healthy(); err == nil {
		t.Error("no sweep for 4 sweep intervals, yet healthy")
	}
	f.c.Sweep()
	if err := f.c.Healthy(); err != nil {
		t.Errorf("unhealthy right after a sweep: %v", err)
	}
}

// A probe that failed counts as settled for readiness unless it is required; probe_active says
// which probes' stages are awaited.
func TestFailedProbesAndActivity(t *testing.T) {
	f := newFixture(t, Options{Probes: []string{"kube", "packets", "iptables"}, RequiredProbes: []string{"kube"}})
	f.c.SetStatus("kube", probes.Status{Up: true, Synced: true})
	f.c.SetStatus("iptables", probes.Status{Up: true, Synced: true, Inactive: true})
	if ok, waiting := f.c.Ready(); ok || !slices.Equal(waiting, []string{"packets"}) {
		t.Errorf("Ready = %v, %v; want waiting for packets", ok, waiting)
	}
	f.c.Failed("packets", errTest)
	if ok, waiting := f.c.Ready(); !ok {
		t.Errorf("a failed optional probe keeps the collector unready: %v", waiting)
	}
	f.c.Failed("kube", errTest)
	f.c.SetStatus("kube", probes.Status{})
	for probe, want := range map[string]float64{"kube": 0, "packets": 0, "iptables": 0} {
		if got := f.value("endpointlag_probe_active", "probe", probe); got != want {
			t.Errorf("probe_active{%s} = %g, want %g", probe, got, want)
		}
	}
	f.c.SetStatus("packets", probes.Status{Up: true, Synced: true})
	if got := f.value("endpointlag_probe_active", "probe", "packets"); got != 1 {
		t.Errorf("probe_active{packets} after recovery = %g, want 1", got)
	}
}

type testError string

func (e testError) Error() string { return string(e) }

const errTest = testError("no ring buffer")

// A node-local fallback means nothing for a Service whose policy chains are cluster-wide: the
// record keeps no such fallback, and its removal is lag like any other.
func TestLocalFallbackOfAClusterPolicyService(t *testing.T) {
	dp := newFakeDataplane()
	f := nftFixture(t, dp)
	dp.set(endpoint(1), clusterPath)
	o := obs(probes.StageEndpointSlice, 1, t0, true)
	o.Serving, o.Fallback = true, probes.Fallback{Local: true}
	f.c.Observe(o)
	f.c.Observe(dataplane(1, t0.Add(300*time.Millisecond)))
	if r := f.c.Records(); len(r) != 1 || r[0].Fallback != nil {
		t.Errorf("records %+v: want no fallback", r)
	}
	if n, sum := f.histogram("endpointlag_programming_seconds", probes.StageNftables); n != 1 || !near(sum, 0.3) {
		t.Errorf("programming nftables: %d, %g; want 1, 0.3", n, sum)
	}
}

// The ingress stage is awaited at each proxy instance that routed to the endpoint when it turned
// terminating, measured per instance with the proxy's kind as the source label, and not at all
// for a Service no proxy routes to; Pending tells each instance what it still owes.
func TestIngressAwaitedPerInstance(t *testing.T) {
	f := newFixture(t, Options{Stages: []probes.Stage{probes.StageIngress}, Probes: []string{"kube", "ingress"},
		StageProbe: map[probes.Stage]string{probes.StageIngress: "ingress"}})
	proxies := newFakeDataplane()
	f.c.SetDataplane(probes.StageIngress, proxies)
	f.c.SetStatus("ingress", probes.Status{Up: true, Synced: true})
	notify := make(chan struct{}, 1)
	f.c.NotifyPending(notify)
	proxies.set(endpoint(1), probes.Reach{Source: "traefik:ingress/traefik-0"}, probes.Reach{Source: "haproxy:ingress/haproxy-0"})
	f.c.Observe(obs(probes.StageEndpointSlice, 1, t0, false))
	f.c.Observe(obs(probes.StageEndpointSlice, 2, t0, false)) // no proxy routes to it
	<-notify
	if got := f.c.Pending(probes.StageIngress); len(got) != 2 || len(got["traefik:ingress/traefik-0"]) != 1 {
		t.Fatalf("Pending = %v, want endpoint 1 at both instances", got)
	}
	removal := func(source, kind string, d time.Duration) probes.Observation {
		return probes.Observation{Stage: probes.StageIngress, Time: t0.Add(d), Precision: 20 * time.Millisecond, Source: source, SourceKind: kind,
			Service: web, Endpoint: endpoint(1)}
	}
	f.c.Observe(removal("traefik:ingress/traefik-0", "traefik", 2*time.Second))
	if got := f.c.Pending(probes.StageIngress); len(got) != 1 || len(got["haproxy:ingress/haproxy-0"]) != 1 {
		t.Errorf("Pending after Traefik's removal = %v, want HAProxy's only", got)
	}
	if got := f.value("endpointlag_pending_endpoints", "stage", "ingress"); got != 1 {
		t.Errorf("pending ingress = %g, want 1", got)
	}
	f.c.Observe(removal("haproxy:ingress/haproxy-0", "haproxy", 300*time.Millisecond))
	if got := f.value("endpointlag_pending_endpoints", "stage", "ingress"); got != 0 {
		t.Errorf("pending ingress after both = %g, want 0", got)
	}
	for _, m := range f.family("endpointlag_programming_seconds").GetMetric() {
		want := map[string]float64{"traefik": 2, "haproxy": 0.3}[label(m, "source")]
		if m.GetHistogram().GetSampleCount() != 1 || !near(m.GetHistogram().GetSampleSum(), want) {
			t.Errorf("programming{source=%s}: %d samples, sum %g; want 1, %g", label(m, "source"), m.GetHistogram().GetSampleCount(), m.GetHistogram().GetSampleSum(), want)
		}
	}
	for _, r := range f.c.Records() {
		if r.Endpoint == endpoint(2) && !slices.Equal(r.NotApplicable, []string{"ingress"}) {
			t.Errorf("a Service no proxy routes to: not applicable %v", r.NotApplicable)
		}
	}
}
