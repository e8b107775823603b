package kube_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	clocktesting "k8s.io/utils/clock/testing"
	"k8s.io/utils/ptr"

	"github.com/endpointlag/endpointlag/collector"
	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/internal/probetest"
	"github.com/endpointlag/endpointlag/probes/kube"
)

const (
	node  = "node-a"
	other = "node-b"
	ns    = "shop"
)

var start = time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)

// harness runs the kube probe against a fake clientset, feeding a real collector whose metrics are
// read back as a scrape reads them.
type harness struct {
	t      *testing.T
	probe  *kube.Probe
	ctx    context.Context
	client *fake.Clientset
	clock  *clocktesting.FakeClock
	coll   *collector.Collector
	scrape string
}

func newHarness(t *testing.T, objs ...runtime.Object) *harness {
	t.Helper()
	return newHarnessWithClient(t, fake.NewClientset(objs...))
}

func newHarnessWithClient(t *testing.T, client *fake.Clientset) *harness {
	t.Helper()
	return newHarnessWithDataplane(t, client, nil)
}

// reachAll is a dataplane whose rules reach every endpoint through both policy chains.
type reachAll struct{}

func (reachAll) Reaches(probes.ServiceRef, probes.Endpoint) ([]probes.Reach, bool) {
	return []probes.Reach{{Path: probes.PathCluster, Policy: probes.Policy{Cluster: true, Local: true}}}, true
}

// newHarnessWithDataplane adds, when dp is set, an nftables stage whose rules are dp.
func newHarnessWithDataplane(t *testing.T, client *fake.Clientset, dp probes.Dataplane) *harness {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	h := &harness{t: t, ctx: ctx, client: client, clock: clocktesting.NewFakeClock(start)}
	reg := prometheus.NewRegistry()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	opts := collector.Options{
		Horizon: time.Hour, MaxRecords: 1000, SweepInterval: time.Hour,
		Stages: []probes.Stage{probes.StageEndpointSliceRemoved}, Probes: []string{kube.Name},
		StageProbe: map[probes.Stage]string{probes.StageEndpointSliceRemoved: kube.Name},
	}
	if dp != nil {
		opts.Stages = append(opts.Stages, probes.StageNftables)
		opts.StageProbe[probes.StageNftables] = "nftables"
	}
	var err error
	h.coll, err = collector.New(opts, h.clock, log, reg)
	if err != nil {
		t.Fatal(err)
	}
	if dp != nil {
		h.coll.SetDataplane(probes.StageNftables, dp)
		h.coll.SetStatus("nftables", probes.Status{Up: true, Synced: true})
	}
	srv := httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	h.scrape = srv.URL
	p, err := kube.New(kube.DefaultOptions(), h.client, node, h.clock, log)
	if err != nil {
		t.Fatal(err)
	}
	h.probe = p
	var wg sync.WaitGroup
	wg.Go(func() {
		if err := p.Run(ctx, h.coll); err != nil {
			t.Errorf("probe: %v", err)
		}
	})
	t.Cleanup(func() {
		cancel()
		wg.Wait()
		srv.Close()
	})
	h.eventually("probe synced", func() bool { ok, _ := h.coll.Ready(); return ok })
	return h
}

// metrics scrapes the collector's registry over HTTP and parses the exposition text.
func (h *harness) metrics() map[string]*dto.MetricFamily {
	h.t.Helper()
	resp, err := http.Get(h.scrape)
	if err != nil {
		h.t.Fatal(err)
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		h.t.Fatal(err)
	}
	return mfs
}

// hist returns the count and sum of a histogram series with the given stage.
func (h *harness) hist(name string, stage probes.Stage) (uint64, float64) {
	for _, m := range h.metrics()[name].GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == "stage" && l.GetValue() == string(stage) {
				return m.GetHistogram().GetSampleCount(), m.GetHistogram().GetSampleSum()
			}
		}
	}
	return 0, 0
}

// value returns a gauge or counter whose labels include the given pairs.
func (h *harness) value(name string, labels ...string) float64 {
	for _, m := range h.metrics()[name].GetMetric() {
		match := true
		for i := 0; i+1 < len(labels); i += 2 {
			found := false
			for _, l := range m.GetLabel() {
				found = found || (l.GetName() == labels[i] && l.GetValue() == labels[i+1])
			}
			match = match && found
		}
		if match {
			return m.GetGauge().GetValue() + m.GetCounter().GetValue() + m.GetUntyped().GetValue()
		}
	}
	return 0
}

func (h *harness) eventually(what string, cond func() bool) {
	h.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			h.t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (h *harness) waitValue(want float64, name string, labels ...string) {
	h.t.Helper()
	h.eventually(fmt.Sprintf("%s%v = %g", name, labels, want), func() bool { return h.value(name, labels...) == want })
}

func (h *harness) waitHist(want uint64, name string, stage probes.Stage) {
	h.t.Helper()
	h.eventually(fmt.Sprintf("%s{stage=%s} count %d", name, stage, want), func() bool {
		n, _ := h.hist(name, stage)
		return n == want
	})
}

func (h *harness) expectHist(name string, stage probes.Stage, count uint64, sum float64) {
	h.t.Helper()
	n, s := h.hist(name, stage)
	if n != count || math.Abs(s-sum) > 1e-9 {
		h.t.Errorf("%s{stage=%q}: %d samples, sum %g; want %d, %g", name, stage, n, s, count, sum)
	}
}

// settle lets the removals seen so far be reported: they wait kube.RemovalSettle on the probe's
// clock, in case the endpoint only moves to another slice.
func (h *harness) settle() {
	h.clock.Step(kube.RemovalSettle)
}

// updateSlice updates a slice and waits until the probe has handled the update, so that the
// clock moves on only after the probe saw it.
func (h *harness) updateSlice(s *discoveryv1.EndpointSlice) {
	h.t.Helper()
	n := kube.SliceEvents(h.probe)
	if _, err := h.client.DiscoveryV1().EndpointSlices(s.Namespace).Update(h.ctx, s, metav1.UpdateOptions{}); err != nil {
		h.t.Fatal(err)
	}
	h.eventually("the probe to handle the slice update", func() bool { return kube.SliceEvents(h.probe) > n })
}

// deletePod does what the API server does on a graceful delete: it sets the deletionTimestamp.
func (h *harness) deletePod(p *corev1.Pod) {
	h.t.Helper()
	p = p.DeepCopy()
	p.DeletionTimestamp = &metav1.Time{Time: h.clock.Now().Add(30 * time.Second).Truncate(time.Second)}
	p.DeletionGracePeriodSeconds = ptr.To[int64](30)
	if _, err := h.client.CoreV1().Pods(p.Namespace).Update(h.ctx, p, metav1.UpdateOptions{}); err != nil {
		h.t.Fatal(err)
	}
}

func pod(name, uid, nodeName, ip string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID(uid)},
		Spec:       corev1.PodSpec{NodeName: nodeName},
		Status:     corev1.PodStatus{PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}},
	}
}

type ep struct {
	pod   *corev1.Pod
	state string // ready, terminating
}

func slice(name, service string, eps ...ep) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: service}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To[int32](8080), Protocol: ptr.To(corev1.ProtocolTCP)}},
	}
	for _, e := range eps {
		term := e.state == "terminating"
		s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{e.pod.Status.PodIP},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(!term), Serving: ptr.To(true), Terminating: ptr.To(term)},
			NodeName:   ptr.To(e.pod.Spec.NodeName),
			TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: ns, Name: e.pod.Name, UID: e.pod.UID},
		})
	}
	return s
}

const (
	prop = "endpointlag_propagation_seconds"
	prog = "endpointlag_programming_seconds"
)

// The timeline of the issue: a pod of this node gets its deletionTimestamp, its slice marks it
// terminating 40 ms later, then drops it; a pod on another node is measured against the slice only.
func TestDeletionTimeline(t *testing.T) {
	local := pod("web-1", "uid-1", node, "10.244.1.5")
	remote := pod("web-2", "uid-2", other, "10.244.2.5")
	h := newHarness(t, local, remote, slice("web-abc", "web", ep{local, "ready"}, ep{remote, "ready"}))

	h.deletePod(local)
	h.waitValue(1, "endpointlag_tracked_pods")
	h.clock.Step(40 * time.Millisecond)
	h.updateSlice(slice("web-abc", "web", ep{local, "terminating"}, ep{remote, "ready"}))
	h.waitHist(1, prop, probes.StageEndpointSlice)
	h.expectHist(prop, probes.StageEndpointSlice, 1, 0.040)
	if n, _ := h.hist(prog, probes.StageEndpointSlice); n != 0 {
		t.Errorf("programming{stage=endpointslice} has %d samples; the stage has only a propagation value", n)
	}
	if got := h.value("endpointlag_pending_endpoints", "stage", "endpointslice_removed"); got != 1 {
		t.Errorf("pending endpoints = %g, want 1", got)
	}

	h.clock.Step(1500 * time.Millisecond)
	removal := slice("web-abc", "web", ep{remote, "ready"})
	removal.ResourceVersion = "4711"
	h.updateSlice(removal)
	h.waitValue(1, "endpointlag_tracked_records")
	h.settle()
	h.waitHist(1, prop, probes.StageEndpointSliceRemoved)
	// The record names the slice write that removed the endpoint.
	for _, r := range h.coll.Records() {
		for _, st := range r.Stages {
			if st.Stage == string(probes.StageEndpointSliceRemoved) && st.Slice != ns+"/web-abc@4711" {
				t.Errorf("the endpointslice_removed stage names slice change %q, want %s/web-abc@4711", st.Slice, ns)
			}
		}
	}
	h.expectHist(prop, probes.StageEndpointSliceRemoved, 1, 1.540)
	h.expectHist(prog, probes.StageEndpointSliceRemoved, 1, 1.500)

	// The pod on the other node: programming only, no guessed propagation.
	h.clock.Step(time.Second)
	h.updateSlice(slice("web-abc", "web", ep{remote, "terminating"}))
	h.waitValue(2, "endpointlag_tracked_records")
	h.clock.Step(300 * time.Millisecond)
	h.updateSlice(slice("web-abc", "web"))
	h.settle()
	h.waitHist(2, prog, probes.StageEndpointSliceRemoved)
	h.expectHist(prog, probes.StageEndpointSliceRemoved, 2, 1.800)
	h.expectHist(prop, probes.StageEndpointSlice, 1, 0.040)
	h.expectHist(prop, probes.StageEndpointSliceRemoved, 1, 1.540)
	if got := h.value("endpointlag_pending_endpoints", "stage", "endpointslice_removed"); got != 0 {
		t.Errorf("pending endpoints = %g, want 0", got)
	}

	// The pod object goes: the timeline ends, nothing more is sampled.
	if err := h.client.CoreV1().Pods(ns).Delete(h.ctx, local.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	h.eventually("gone stage", func() bool {
		for _, r := range h.coll.Records() {
			if r.Pod.UID == "uid-1" && r.Stages[len(r.Stages)-1].Stage == string(probes.StageGone) {
				return true
			}
		}
		return false
	})
	h.expectHist(prop, probes.StageEndpointSliceRemoved, 1, 1.540)
}

// A pod deleted and replaced by one that reuses its IP: two records, each measured once.
func TestPodRecreatedWithSameIP(t *testing.T) {
	old := pod("db-0", "uid-old", node, "10.244.1.9")
	h := newHarness(t, old, slice("db-x", "db", ep{old, "ready"}))
	h.deletePod(old)
	h.waitValue(1, "endpointlag_tracked_pods")
	h.clock.Step(10 * time.Millisecond)
	h.updateSlice(slice("db-x", "db", ep{old, "terminating"}))
	h.waitHist(1, prop, probes.StageEndpointSlice)

	// The successor has the same name and IP and a new UID; the slice swaps them in one update.
	next := pod("db-0", "uid-new", node, "10.244.1.9")
	if err := h.client.CoreV1().Pods(ns).Delete(h.ctx, old.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.client.CoreV1().Pods(ns).Create(h.ctx, next, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	h.clock.Step(990 * time.Millisecond)
	h.updateSlice(slice("db-x", "db", ep{next, "ready"}))
	h.settle()
	h.waitHist(1, prop, probes.StageEndpointSliceRemoved)
	h.expectHist(prop, probes.StageEndpointSliceRemoved, 1, 1.0)
	if got := h.value("endpointlag_pending_endpoints", "stage", "endpointslice_removed"); got != 0 {
		t.Errorf("the successor is pending: %g", got)
	}

	h.clock.Step(time.Second)
	h.deletePod(next)
	h.waitValue(2, "endpointlag_tracked_pods")
	h.clock.Step(20 * time.Millisecond)
	h.updateSlice(slice("db-x", "db", ep{next, "terminating"}))
	h.waitHist(2, prop, probes.StageEndpointSlice)
	h.expectHist(prop, probes.StageEndpointSlice, 2, 0.030)
	if got := h.value("endpointlag_tracked_records"); got != 2 {
		t.Errorf("tracked records = %g, want 2 (one per pod)", got)
	}
}

// A Service whose endpoints are spread over two slices; the terminating endpoint moves between
// them, in two updates that may arrive in either order, and counts as removed only when no slice
// lists it for kube.RemovalSettle.
func TestEndpointMovedBetweenSlices(t *testing.T) {
	for _, oldFirst := range []bool{false, true} {
		t.Run(fmt.Sprintf("old slice's update first: %t", oldFirst), func(t *testing.T) {
			a := pod("web-a", "uid-a", other, "10.244.2.1")
			b := pod("web-b", "uid-b", other, "10.244.2.2")
			h := newHarness(t, a, b, slice("web-1", "web", ep{a, "ready"}), slice("web-2", "web", ep{b, "ready"}))
			h.updateSlice(slice("web-1", "web", ep{a, "terminating"}))
			h.waitValue(1, "endpointlag_tracked_records")
			h.clock.Step(100 * time.Millisecond)
			moves := []*discoveryv1.EndpointSlice{slice("web-2", "web", ep{b, "ready"}, ep{a, "terminating"}), slice("web-1", "web")}
			if oldFirst {
				moves[0], moves[1] = moves[1], moves[0]
			}
			h.updateSlice(moves[0])
			h.clock.Step(10 * time.Millisecond)
			h.updateSlice(moves[1])
			h.settle()
			time.Sleep(3 * kube.RemovalSettle / 5) // two of the settling loop's rounds
			if n, _ := h.hist(prog, probes.StageEndpointSliceRemoved); n != 0 {
				t.Fatal("a move between slices counted as a removal")
			}
			h.updateSlice(slice("web-2", "web", ep{b, "ready"}))
			h.settle()
			h.waitHist(1, prog, probes.StageEndpointSliceRemoved)
			h.expectHist(prog, probes.StageEndpointSliceRemoved, 1, 1.11)
		})
	}
}

// A Service deleted while its pods terminate: its slices go, the terminating endpoint is removed
// once, and the ready endpoints that went with it start no record.
func TestServiceDeletedWhileTerminating(t *testing.T) {
	a := pod("web-a", "uid-a", node, "10.244.1.1")
	b := pod("web-b", "uid-b", other, "10.244.2.2")
	h := newHarness(t, a, b, slice("web-1", "web", ep{a, "ready"}, ep{b, "ready"}))
	h.deletePod(a)
	h.updateSlice(slice("web-1", "web", ep{a, "terminating"}, ep{b, "ready"}))
	h.waitHist(1, prop, probes.StageEndpointSlice)
	h.clock.Step(250 * time.Millisecond)
	n := kube.SliceEvents(h.probe)
	if err := h.client.DiscoveryV1().EndpointSlices(ns).Delete(h.ctx, "web-1", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	h.eventually("the probe to handle the slice's deletion", func() bool { return kube.SliceEvents(h.probe) > n })
	h.settle()
	h.waitHist(1, prog, probes.StageEndpointSliceRemoved)
	h.expectHist(prog, probes.StageEndpointSliceRemoved, 1, 0.25)
	if got := h.value("endpointlag_tracked_records"); got != 1 {
		t.Errorf("tracked records = %g, want 1", got)
	}
	if got := h.value("endpointlag_pending_endpoints", "stage", "endpointslice_removed"); got != 0 {
		t.Errorf("pending = %g, want 0", got)
	}
}

// The watch expires (410 Gone) and the informer lists again: what changed meanwhile is seen once,
// what did not change is not seen again, and a slice that vanished meanwhile counts as removed.
// What the relist found is flagged as such, with the gap as its precision, and not sampled as lag.
func TestInformerRelist(t *testing.T) {
	a := pod("web-a", "uid-a", other, "10.244.2.1")
	b := pod("web-b", "uid-b", other, "10.244.2.2")
	client := fake.NewClientset(a, b, slice("web-1", "web", ep{a, "ready"}), slice("web-2", "web", ep{b, "ready"}))
	var (
		mu       sync.Mutex
		watchers []*watch.FakeWatcher
	)
	client.PrependWatchReactor("endpointslices", func(k8stesting.Action) (bool, watch.Interface, error) {
		w := watch.NewFakeWithChanSize(10, false)
		mu.Lock()
		watchers = append(watchers, w)
		mu.Unlock()
		return true, w, nil
	})
	expire := func() {
		mu.Lock()
		w := watchers[len(watchers)-1]
		n := len(watchers)
		mu.Unlock()
		w.Error(&metav1.Status{Status: metav1.StatusFailure, Code: 410, Reason: metav1.StatusReasonExpired, Message: "too old resource version"})
		deadline := time.Now().Add(10 * time.Second)
		for {
			mu.Lock()
			relisted := len(watchers) > n
			mu.Unlock()
			if relisted {
				return
			}
			if time.Now().After(deadline) {
				t.Fatal("the informer did not watch again after the 410")
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	h := newHarnessWithClient(t, client)
	tracker := client.Tracker()
	gvr := discoveryv1.SchemeGroupVersion.WithResource("endpointslices")

	// While the watch is broken, a turns terminating.
	if err := tracker.Update(gvr, slice("web-1", "web", ep{a, "terminating"}), ns); err != nil {
		t.Fatal(err)
	}
	expire()
	h.waitValue(1, "endpointlag_tracked_records")

	// Nothing changes; one more relist.
	expire()
	// While broken again, web-1 is deleted (its endpoint removed) and b turns terminating.
	h.clock.Step(2 * time.Second)
	if err := tracker.Delete(gvr, ns, "web-1"); err != nil {
		t.Fatal(err)
	}
	if err := tracker.Update(gvr, slice("web-2", "web", ep{b, "terminating"}), ns); err != nil {
		t.Fatal(err)
	}
	expire()
	h.waitValue(2, "endpointlag_tracked_records")
	h.eventually("the relisted removal", func() bool {
		h.settle()
		return h.value("endpointlag_unsampled_total", "stage", "endpointslice_removed", "reason", "relist") == 1
	})
	if n, _ := h.hist(prog, probes.StageEndpointSliceRemoved); n != 0 {
		t.Errorf("a removal first seen on a relist was sampled as lag")
	}
	if got := h.value("endpointlag_pending_endpoints", "stage", "endpointslice_removed"); got != 1 {
		t.Errorf("pending = %g, want 1 (b)", got)
	}
	for _, r := range h.coll.Records() {
		for _, s := range r.Stages {
			if s.Stage == string(probes.StageEndpointSlice) && !s.Relist {
				t.Errorf("%s: its turning terminating during the gap is not flagged as relisted: %+v", r.Pod.Name, s)
			}
			if s.Stage == string(probes.StageEndpointSliceRemoved) && (!s.Relist || s.Precision < 2) {
				t.Errorf("%s: its removal during a gap of 2 s or more is not flagged with it: %+v", r.Pod.Name, s)
			}
		}
	}
}

// The slice watch delivers before the pod watch: the terminating endpoint waits for T0, and T0
// is taken as no later than the slice change.
func TestSliceUpdateBeforePodUpdate(t *testing.T) {
	a := pod("web-a", "uid-a", node, "10.244.1.1")
	b := pod("web-b", "uid-b", other, "10.244.2.2")
	h := newHarness(t, a, b, slice("web-1", "web", ep{a, "ready"}, ep{b, "ready"}))
	h.updateSlice(slice("web-1", "web", ep{a, "terminating"}, ep{b, "ready"}))
	h.waitValue(1, "endpointlag_tracked_records")
	if n, _ := h.hist(prop, probes.StageEndpointSlice); n != 0 {
		t.Fatalf("propagation sampled before the pod's deletion was seen")
	}
	h.clock.Step(20 * time.Millisecond)
	h.deletePod(a)
	h.waitHist(1, prop, probes.StageEndpointSlice)
	h.expectHist(prop, probes.StageEndpointSlice, 1, 0)
	h.clock.Step(time.Second)
	h.updateSlice(slice("web-1", "web", ep{b, "ready"}))
	h.settle()
	h.waitHist(1, prop, probes.StageEndpointSliceRemoved)
	h.expectHist(prop, probes.StageEndpointSliceRemoved, 1, 1.02)
	h.expectHist(prog, probes.StageEndpointSliceRemoved, 1, 1.02)
	if got := h.value("endpointlag_tracked_pods"); got != 1 {
		t.Errorf("tracked pods = %g, want 1", got)
	}
}

// Bad slices are reported with their reason once per change, and the probe goes on.
func TestBadInputIsReportedAndSkipped(t *testing.T) {
	a := pod("web-a", "uid-a", other, "10.244.2.1")
	h := newHarness(t, a, slice("web-1", "web", ep{a, "ready"}))

	unlabelled := slice("orphan", "", ep{a, "terminating"})
	delete(unlabelled.Labels, discoveryv1.LabelServiceName)
	noRef := slice("broken", "web", ep{a, "terminating"})
	noRef.Labels[discoveryv1.LabelManagedBy] = "endpointslice-controller.k8s.io"
	noRef.Endpoints[0].TargetRef = nil
	badAddr := slice("typo", "web", ep{a, "terminating"})
	badAddr.Endpoints[0].Addresses = []string{"10.244.2.300"}
	for _, s := range []*discoveryv1.EndpointSlice{unlabelled, noRef, badAddr} {
		if _, err := h.client.DiscoveryV1().EndpointSlices(ns).Create(h.ctx, s, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, reason := range []string{"no_service_label", "no_target_ref", "bad_address"} {
		h.waitValue(1, "endpointlag_probe_errors_total", "probe", "kube", "reason", reason)
	}
	// The same bad slice again is not reported again; a good change is still measured.
	unlabelled.Annotations = map[string]string{"touched": "yes"}
	h.updateSlice(unlabelled)
	h.updateSlice(slice("web-1", "web", ep{a, "terminating"}))
	h.waitValue(1, "endpointlag_tracked_records")
	if got := h.value("endpointlag_probe_errors_total", "probe", "kube", "reason", "no_service_label"); got != 1 {
		t.Errorf("no_service_label counted %g times, want 1", got)
	}
	if got := h.value("endpointlag_probe_up", "probe", "kube"); got != 1 {
		t.Errorf("probe_up = %g after bad input, want 1", got)
	}
}

// What is already terminating when the daemon starts is shown but not measured.
func TestStartupStateIsNotMeasured(t *testing.T) {
	a := pod("web-a", "uid-a", node, "10.244.1.1")
	a.DeletionTimestamp = &metav1.Time{Time: start.Add(25 * time.Second)}
	a.DeletionGracePeriodSeconds = ptr.To[int64](30)
	h := newHarness(t, a, slice("web-1", "web", ep{a, "terminating"}))
	h.waitValue(1, "endpointlag_tracked_records")
	h.clock.Step(time.Second)
	h.updateSlice(slice("web-1", "web"))
	h.settle()
	h.eventually("removal", func() bool {
		r := h.coll.Records()
		return len(r) == 1 && r[0].Pending == nil
	})
	if n, _ := h.hist(prop, probes.StageEndpointSliceRemoved); n != 0 {
		t.Errorf("propagation sampled against a T0 seen only at start-up")
	}
	if n, _ := h.hist(prog, probes.StageEndpointSliceRemoved); n != 0 {
		t.Errorf("programming sampled against a slice change seen only at start-up")
	}
	r := h.coll.Records()[0]
	if r.T0API == nil || !r.T0API.Equal(start.Add(-5*time.Second)) {
		t.Errorf("T0 from the API = %v, want deletionTimestamp − grace = %v", r.T0API, start.Add(-5*time.Second))
	}
}

// A pod deleted with grace period 0 vanishes without an update: deletion and gone come together,
// and the endpoint that leaves its slice without a terminating phase is still measured.
func TestForceDeletedPod(t *testing.T) {
	a := pod("web-a", "uid-a", node, "10.244.1.1")
	b := pod("web-b", "uid-b", other, "10.244.2.2")
	h := newHarness(t, a, b, slice("web-1", "web", ep{a, "ready"}, ep{b, "ready"}))
	if err := h.client.CoreV1().Pods(ns).Delete(h.ctx, a.Name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)}); err != nil {
		t.Fatal(err)
	}
	h.waitValue(1, "endpointlag_tracked_pods")
	h.clock.Step(60 * time.Millisecond)
	h.updateSlice(slice("web-1", "web", ep{b, "ready"}))
	h.settle()
	h.waitHist(1, prop, probes.StageEndpointSliceRemoved)
	h.expectHist(prop, probes.StageEndpointSliceRemoved, 1, 0.06)
	h.expectHist(prop, probes.StageEndpointSlice, 1, 0.06)
}

// KEP-1669: the only endpoint of a Service turns terminating while serving: its record says
// kube-proxy falls back to it, and when the replacement turns ready the fallback ends.
func TestServingFallback(t *testing.T) {
	a := pod("solo-a", "uid-a", node, "10.244.1.1")
	b := pod("solo-b", "uid-b", node, "10.244.1.2")
	h := newHarnessWithDataplane(t, fake.NewClientset(a, slice("solo-1", "solo", ep{a, "ready"})), reachAll{})
	h.deletePod(a)
	terminatingServing := slice("solo-1", "solo", ep{a, "terminating"})
	notReady := slice("solo-1", "solo", ep{a, "terminating"}, ep{b, "ready"})
	notReady.Endpoints[1].Conditions.Ready = ptr.To(false)
	terminatingServing.Endpoints = append(terminatingServing.Endpoints, notReady.Endpoints[1])
	h.updateSlice(terminatingServing)
	h.waitValue(1, "endpointlag_tracked_records")
	r := h.coll.Records()[0]
	if !r.Serving || r.Fallback == nil || !r.Fallback.Cluster || !r.Fallback.Local {
		t.Fatalf("record %+v: want serving, held by both fallbacks", r)
	}
	h.clock.Step(2 * time.Second)
	h.updateSlice(slice("solo-1", "solo", ep{a, "terminating"}, ep{b, "ready"}))
	h.eventually("the fallback's end", func() bool {
		for _, s := range h.coll.Records()[0].Stages {
			if s.Stage == string(probes.StageFallbackEnded) {
				return s.Time.Equal(start.Add(2 * time.Second))
			}
		}
		return false
	})
}

// A completed pod (a Job's, phase Succeeded) keeps its address in its status after its CNI freed
// it; when it is deleted, its address is not watched; a live pod's address is reported, and one
// that completes reports none.
func TestCompletedPodsAndLiveAddresses(t *testing.T) {
	done := pod("job-1", "uid-job", node, "10.244.1.7")
	done.Status.Phase = corev1.PodSucceeded
	live := pod("web-1", "uid-web", node, "10.244.1.8")
	live.Status.Phase = corev1.PodRunning
	h := newHarness(t, done, live)
	notify := make(chan struct{}, 1)
	h.coll.NotifyLocalPods(notify)
	h.deletePod(done)
	h.waitValue(1, "endpointlag_tracked_pods")
	if got := h.coll.LocalPods(); len(got) != 0 {
		t.Errorf("LocalPods = %+v: a completed pod's address is watched", got)
	}
	// The live pod completes: it holds no address any more; deleting it watches none.
	live = live.DeepCopy()
	live.Status.Phase = corev1.PodSucceeded
	if _, err := h.client.CoreV1().Pods(ns).UpdateStatus(h.ctx, live, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	h.deletePod(live)
	h.waitValue(2, "endpointlag_tracked_pods")
	if got := h.coll.LocalPods(); len(got) != 0 {
		t.Errorf("LocalPods = %+v, want none", got)
	}
}

// A new pod of this node that takes a deleted pod's address takes it out of the deleted pod's
// watched addresses at once (host-local IPAM wraps quickly; some CNIs reuse after 30 s).
func TestReusedAddressLeavesTheDeletedPod(t *testing.T) {
	old := pod("web-old", "uid-old", node, "10.244.1.9")
	old.Status.Phase = corev1.PodRunning
	h := newHarness(t, old)
	h.deletePod(old)
	h.eventually("the deleted pod's address watched", func() bool { return len(h.coll.LocalPods()) == 1 })
	next := pod("web-new", "uid-new", node, "10.244.1.9")
	next.Status.Phase = corev1.PodRunning
	if _, err := h.client.CoreV1().Pods(ns).Create(h.ctx, next, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	h.eventually("the address to leave the deleted pod", func() bool { return len(h.coll.LocalPods()) == 0 })
}

// A pod of another node that exits before the controller publishes it terminating leaves its slice
// without a terminating phase: this node still starts a record of it at the removal (its
// kube-proxy has it to remove too).
func TestEndpointLeavingWithoutTerminatingPhase(t *testing.T) {
	a := pod("web-a", "uid-a", other, "10.244.2.1")
	b := pod("web-b", "uid-b", other, "10.244.2.2")
	h := newHarness(t, a, b, slice("web-1", "web", ep{a, "ready"}, ep{b, "ready"}))
	h.clock.Step(time.Second)
	h.updateSlice(slice("web-1", "web", ep{b, "ready"}))
	h.settle()
	h.waitValue(1, "endpointlag_tracked_records")
	r := h.coll.Records()[0]
	if r.Pod.UID != "uid-a" || len(r.Stages) != 2 || !r.Stages[0].Time.Equal(start.Add(time.Second)) || r.Stages[1].Stage != string(probes.StageEndpointSliceRemoved) {
		t.Errorf("record %+v, want uid-a turning terminating and removed at +1s", r)
	}
}

// Like kube-proxy, the probe lists and watches the slices of proxied Services only (the server
// selects; the probe checks again, as a fake client does not select watches), and it marks the
// terminations of slices no trusted controller manages.
func TestSliceSelectionAndTrust(t *testing.T) {
	a, b, c := pod("a", "uid-a", other, "10.0.0.1"), pod("b", "uid-b", other, "10.0.0.2"), pod("c", "uid-c", other, "10.0.0.3")
	managed := slice("web-1", "web", ep{a, "terminating"})
	managed.Labels[discoveryv1.LabelManagedBy] = "endpointslice-controller.k8s.io"
	forged := slice("forged-1", "forged", ep{b, "terminating"})
	forged.Labels[discoveryv1.LabelManagedBy] = "someone"
	headless := slice("db-1", "db", ep{c, "terminating"})
	headless.Labels[corev1.IsHeadlessService] = ""
	client := fake.NewClientset()
	p, err := kube.New(kube.DefaultOptions(), client, node, clocktesting.NewFakeClock(start), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	rec, stop := probetest.Run(t, p)
	rec.Wait(t, "the probe to sync", rec.Synced)
	for _, s := range []*discoveryv1.EndpointSlice{headless, forged, managed} {
		if _, err := client.DiscoveryV1().EndpointSlices(ns).Create(context.Background(), s, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	rec.Wait(t, "the managed slice's termination", func() bool { return kube.SliceEvents(p) == 3 })
	stop()
	got := map[string]bool{}
	for _, o := range rec.Observations() {
		if o.Stage == probes.StageEndpointSlice {
			got[o.Service.Name] = o.Untrusted
		}
	}
	if want := map[string]bool{"web": false, "forged": true}; !maps.Equal(got, want) {
		t.Errorf("terminations by Service (true: untrusted) = %v, want %v", got, want)
	}
	want, err := labels.Parse(kube.KubeProxySliceSelector)
	if err != nil {
		t.Fatal(err)
	}
	lists := 0
	for _, a := range client.Actions() {
		if l, ok := a.(k8stesting.ListAction); ok && l.GetResource().Resource == "endpointslices" {
			lists++
			if sel := l.GetListRestrictions().Labels.String(); sel != want.String() {
				t.Errorf("slices listed with selector %q, want kube-proxy's %q", sel, want)
			}
		}
	}
	if lists == 0 {
		t.Error("no list of EndpointSlices recorded")
	}
}

func TestOptionsValidate(t *testing.T) {
	o := kube.DefaultOptions()
	o.SliceSelector = "a in (b"
	if err := o.Validate(); err == nil || !strings.Contains(err.Error(), "--kube.endpointslice-selector") {
		t.Errorf("a broken selector: %v, want an error naming the flag", err)
	}
	o = kube.DefaultOptions()
	o.TrustedManagers = []string{"x", " "}
	if err := o.Validate(); err == nil || !strings.Contains(err.Error(), "--kube.trusted-managers") {
		t.Errorf("an empty manager: %v, want an error naming the flag", err)
	}
}

// blockingSink holds the first observation until released, as a collector busy serving a large
// /api/v1/records would.
type blockingSink struct {
	*probetest.Recorder
	once    sync.Once
	blocked chan struct{}
	release chan struct{}
}

func (s *blockingSink) Observe(o probes.Observation) {
	s.once.Do(func() {
		close(s.blocked)
		<-s.release
	})
	s.Recorder.Observe(o)
}

// A change is stamped when its watch event arrives, not when the handler, held up by a busy
// sink, gets to it.
func TestChangesAreStampedOnArrival(t *testing.T) {
	clk := clocktesting.NewFakeClock(start)
	client := fake.NewClientset()
	p, err := kube.New(kube.DefaultOptions(), client, node, clk, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	sink := &blockingSink{Recorder: &probetest.Recorder{}, blocked: make(chan struct{}), release: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx, sink) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	sink.Wait(t, "the probe to sync", sink.Synced)
	a, b := pod("a", "uid-a", other, "10.0.0.1"), pod("b", "uid-b", other, "10.0.0.2")
	for _, s := range []*discoveryv1.EndpointSlice{slice("a-1", "a", ep{a, "terminating"}), slice("b-1", "b", ep{b, "terminating"})} {
		if _, err := client.DiscoveryV1().EndpointSlices(ns).Create(context.Background(), s, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		if s.Name == "a-1" {
			<-sink.blocked // the handler is stuck in the first observation
			clk.Step(time.Second)
		}
	}
	time.Sleep(time.Second) // the second event reaches the informer while the handler is stuck
	clk.Step(5 * time.Second)
	close(sink.release)
	sink.Wait(t, "both terminations", func() bool { return len(sink.Observations()) >= 2 })
	for _, o := range sink.Observations() {
		if o.Service.Name == "b" && !o.Time.Equal(start.Add(time.Second)) {
			t.Errorf("b's termination stamped %s after the start, want 1s: when its event arrived, not when the handler was free", o.Time.Sub(start))
		}
	}
}
