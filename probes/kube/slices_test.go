package kube

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	discoveryv1 "k8s.io/api/discovery/v1"
	"sigs.k8s.io/yaml"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/internal/probetest"
)

func loadSlice(t testing.TB, name string) *discoveryv1.EndpointSlice {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	var s discoveryv1.EndpointSlice
	if err := yaml.UnmarshalStrict(b, &s); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return &s
}

var condNames = map[condition]string{notReady: "not-ready", terminating: "terminating", ready: "ready"}

// describe renders an entry as sorted lines "service endpoint pod node condition".
func describe(e *sliceEntry) []string {
	if e == nil {
		return nil
	}
	var out []string
	for _, x := range e.eps {
		out = append(out, fmt.Sprintf("%s %s %s@%s %s", e.service, x.key.endpoint, x.info.pod, x.info.node, condNames[x.info.cond]))
	}
	slices.Sort(out)
	return out
}

func reasons(errs []error) []string {
	var out []string
	for _, err := range errs {
		var ie *probes.InputError
		if !errors.As(err, &ie) {
			out = append(out, "not an InputError: "+err.Error())
			continue
		}
		out = append(out, ie.Reason)
	}
	return out
}

func TestParseSlice(t *testing.T) {
	for _, tc := range []struct {
		file    string
		want    []string
		reasons []string
		// errText must appear in the errors: they say what was wrong and where.
		errText string
	}{
		{file: "terminating.yaml", want: []string{
			"shop/web 10.244.1.5:53/UDP shop/web-7d4b9-x2k4p@node-a terminating",
			"shop/web 10.244.1.5:8080/TCP shop/web-7d4b9-x2k4p@node-a terminating",
			"shop/web 10.244.2.7:53/UDP shop/web-7d4b9-qq9zt@node-b ready",
			"shop/web 10.244.2.7:8080/TCP shop/web-7d4b9-qq9zt@node-b ready",
			"shop/web 10.244.2.9:53/UDP shop/web-7d4b9-n0tr3@node-b not-ready",
			"shop/web 10.244.2.9:8080/TCP shop/web-7d4b9-n0tr3@node-b not-ready",
		}},
		{file: "ipv6.yaml", want: []string{
			"shop/web [fd00:10:244:1::5]:8080/TCP shop/web-7d4b9-x2k4p@node-a terminating",
		}},
		{file: "headless-noports.yaml", want: []string{
			"shop/peers 10.244.1.20:0/ shop/peers-0@node-a terminating",
		}},
		{file: "fqdn.yaml"},
		// Mirrored slices list addresses without pods: skipped, and not an error.
		{file: "mirrored.yaml"},
		{file: "missing-targetref.yaml", want: []string{
			"shop/web 10.244.1.31:8080/TCP shop/web-ok@node-a ready",
		}, reasons: []string{reasonNoTargetRef},
			errText: "EndpointSlice shop/web-broken: 1 endpoint(s) without a Pod targetRef skipped (first: 10.244.1.30)"},
		{file: "unlabelled.yaml", reasons: []string{reasonNoServiceLabel},
			errText: "EndpointSlice shop/orphan has no kubernetes.io/service-name label"},
		{file: "bad-address.yaml", want: []string{
			"shop/web 10.244.1.12:80/TCP shop/c@ terminating",
		}, reasons: []string{reasonBadAddress},
			errText: `EndpointSlice shop/web-manual: 2 endpoint(s) skipped (first: "10.244.1.300" is not an IPv4 address)`},
	} {
		t.Run(tc.file, func(t *testing.T) {
			e, errs := parseSlice(loadSlice(t, tc.file), true)
			if got := describe(e); !slices.Equal(got, tc.want) {
				t.Errorf("endpoints:\n got %q\nwant %q", got, tc.want)
			}
			if got := reasons(errs); !slices.Equal(got, tc.reasons) {
				t.Errorf("error reasons = %q, want %q", got, tc.reasons)
			}
			if tc.errText != "" && !strings.Contains(errors.Join(errs...).Error(), tc.errText) {
				t.Errorf("errors %q do not say %q", errors.Join(errs...), tc.errText)
			}
		})
	}
}

// entry builds a slice entry of Service shop/web, one endpoint per spec "uid ip condition
// [serving|not-serving [node]]".
func entry(eps ...string) *sliceEntry {
	e := &sliceEntry{service: probes.ServiceRef{Namespace: "shop", Name: "web"}}
	var all []sliceEP
	for _, spec := range eps {
		f := strings.Fields(spec)
		var c condition
		for k, v := range condNames {
			if v == f[2] {
				c = k
			}
		}
		// Terminating endpoints do not serve unless said so: most cases here are not about
		// KEP-1669's fallback.
		info := epInfo{pod: probes.PodRef{Namespace: "shop", Name: "pod-" + f[0], UID: f[0]}, cond: c, serving: c != terminating, portName: "http"}
		if len(f) > 3 {
			info.serving = f[3] == "serving"
		}
		if len(f) > 4 {
			info.node = f[4]
		}
		ep := probes.Endpoint{Port: 80, Protocol: "TCP"}
		ep.Addr = netip.MustParseAddr(f[1])
		all = append(all, sliceEP{epKey{uid: f[0], endpoint: ep}, info})
	}
	e.eps = newSliceEPs(all)
	return e
}

func changes(cs []change) []string {
	var out []string
	for _, c := range cs {
		out = append(out, fmt.Sprintf("%s %s %s", c.stage, c.key.uid, c.key.endpoint.Addr))
	}
	slices.Sort(out)
	return out
}

// trackerAt drives a tracker on a clock: each step applies a slice (or, with no slice name, only
// lets time pass) at its time, then reports what flush lets go by then.
type trackerAt struct {
	tr  *sliceTracker
	now time.Time
}

func (ta *trackerAt) step(wait time.Duration, slice string, e *sliceEntry) []string {
	ta.now = ta.now.Add(wait)
	var cs []change
	if slice != "" {
		cs = ta.tr.apply(slice, e, event{at: ta.now})
	}
	return changes(append(cs, ta.tr.flush(ta.now)...))
}

func TestSliceTracker(t *testing.T) {
	type step struct {
		wait  time.Duration
		slice string
		entry *sliceEntry
		want  []string
	}
	ms := time.Millisecond
	for _, tc := range []struct {
		name  string
		steps []step
	}{
		{"terminate then remove, once RemovalSettled", []step{
			{0, "s1", entry("a 10.0.0.1 ready", "b 10.0.0.2 ready"), nil},
			{10 * ms, "s1", entry("a 10.0.0.1 terminating", "b 10.0.0.2 ready"), []string{"endpointslice a 10.0.0.1"}},
			{10 * ms, "s1", entry("a 10.0.0.1 terminating", "b 10.0.0.2 ready"), nil},
			{10 * ms, "s1", entry("b 10.0.0.2 ready"), nil},
			{RemovalSettle, "", nil, []string{"endpointslice_removed a 10.0.0.1"}},
		}},
		{"resync and relist repeat nothing", []step{
			{0, "s1", entry("a 10.0.0.1 terminating"), []string{"endpointslice a 10.0.0.1"}},
			{0, "s1", entry("a 10.0.0.1 terminating"), nil},
			{0, "s1", entry("a 10.0.0.1 terminating"), nil},
		}},
		{"moved to another slice, the new one first", []step{
			{0, "s1", entry("a 10.0.0.1 ready"), nil},
			{0, "s2", entry("b 10.0.0.2 ready"), nil},
			{0, "s1", entry("a 10.0.0.1 terminating"), []string{"endpointslice a 10.0.0.1"}},
			{10 * ms, "s2", entry("b 10.0.0.2 ready", "a 10.0.0.1 terminating"), nil},
			{10 * ms, "s1", nil, nil},
			{RemovalSettle, "", nil, nil},
			{10 * ms, "s2", entry("b 10.0.0.2 ready"), nil},
			{RemovalSettle, "", nil, []string{"endpointslice_removed a 10.0.0.1"}},
		}},
		{"moved to another slice, the old one first", []step{
			{0, "s1", entry("a 10.0.0.1 ready"), nil},
			{0, "s2", entry("b 10.0.0.2 ready"), nil},
			{0, "s1", entry("a 10.0.0.1 terminating"), []string{"endpointslice a 10.0.0.1"}},
			{10 * ms, "s1", nil, nil},
			{10 * ms, "s2", entry("b 10.0.0.2 ready", "a 10.0.0.1 terminating"), nil},
			{RemovalSettle, "", nil, nil},
		}},
		{"a ready endpoint moved, the old slice first", []step{
			{0, "s1", entry("a 10.0.0.1 ready"), nil},
			{10 * ms, "s1", nil, nil},
			{10 * ms, "s2", entry("a 10.0.0.1 ready"), nil},
			{RemovalSettle, "", nil, nil},
		}},
		{"ready in one slice wins over terminating in another", []step{
			{0, "s1", entry("a 10.0.0.1 ready"), nil},
			{0, "s2", entry("a 10.0.0.1 terminating"), nil},
			{0, "s1", nil, []string{"endpointslice a 10.0.0.1"}},
		}},
		{"same address, new pod", []step{
			{0, "s1", entry("a 10.0.0.1 terminating"), []string{"endpointslice a 10.0.0.1"}},
			{10 * ms, "s1", entry("c 10.0.0.1 ready"), nil},
			{10 * ms, "s1", entry("c 10.0.0.1 terminating"), []string{"endpointslice c 10.0.0.1"}},
			{RemovalSettle, "", nil, []string{"endpointslice_removed a 10.0.0.1"}},
		}},
		{"slice deleted with its Service", []step{
			{0, "s1", entry("a 10.0.0.1 terminating", "b 10.0.0.2 ready"), []string{"endpointslice a 10.0.0.1"}},
			{0, "s1", nil, nil},
			{0, "s1", nil, nil},
			{RemovalSettle, "", nil, []string{"endpointslice_removed a 10.0.0.1", "endpointslice_removed b 10.0.0.2"}},
		}},
		// A pod that exited and turned terminal before the controller published it terminating
		// leaves without a terminating phase: it starts terminating at its removal.
		{"left without a terminating phase", []step{
			{0, "s1", entry("a 10.0.0.1 ready", "b 10.0.0.2 ready"), nil},
			{10 * ms, "s1", entry("b 10.0.0.2 ready"), nil},
			{RemovalSettle, "", nil, []string{"endpointslice a 10.0.0.1", "endpointslice_removed a 10.0.0.1"}},
		}},
		{"not ready then terminating", []step{
			{0, "s1", entry("a 10.0.0.1 not-ready"), nil},
			{0, "s1", entry("a 10.0.0.1 terminating"), []string{"endpointslice a 10.0.0.1"}},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ta := &trackerAt{tr: newSliceTracker("node-a"), now: time.Unix(0, 0)}
			for i, s := range tc.steps {
				if got := ta.step(s.wait, s.slice, s.entry); !slices.Equal(got, s.want) {
					t.Errorf("step %d: changes %q, want %q", i, got, s.want)
				}
			}
		})
	}
}

// A removal reported after RemovalSettle carries the time it was seen.
func TestDeferredRemovalKeepsItsTime(t *testing.T) {
	tr := newSliceTracker("node-a")
	t0 := time.Unix(100, 0)
	tr.apply("s1", entry("a 10.0.0.1 terminating"), event{at: t0})
	tr.apply("s1", nil, event{at: t0.Add(250 * time.Millisecond), relist: true, precision: time.Second})
	if cs := tr.flush(t0.Add(time.Second)); len(cs) != 0 {
		t.Fatalf("reported before RemovalSettle: %v", changes(cs))
	}
	cs := tr.flush(t0.Add(2 * time.Second))
	if len(cs) != 1 || !cs[0].at.Equal(t0.Add(250*time.Millisecond)) || !cs[0].relist || cs[0].precision != time.Second {
		t.Errorf("flushed %+v, want the removal at +250ms, flagged as a relist", cs)
	}
}

// KEP-1669: an endpoint that turns terminating while serving, with no ready endpoint of its
// Service port left, is held by kube-proxy's fallback; for endpoints of this node, also when none
// on this node is ready (node-local policies). The fallback ends when it stops serving or a ready
// endpoint comes back, and when it leaves the slice.
func TestFallback(t *testing.T) {
	type step struct {
		entry *sliceEntry
		want  []string
	}
	for _, tc := range []struct {
		name  string
		steps []step
	}{
		{"another endpoint ready: no fallback", []step{
			{entry("a 10.0.0.1 ready serving node-a", "b 10.0.0.2 ready serving node-b"), nil},
			{entry("a 10.0.0.1 terminating serving node-a", "b 10.0.0.2 ready serving node-b"), []string{"endpointslice a 10.0.0.1 local"}},
		}},
		{"the only endpoint, until it stops serving", []step{
			{entry("a 10.0.0.1 ready serving node-b"), nil},
			{entry("a 10.0.0.1 terminating serving node-b"), []string{"endpointslice a 10.0.0.1 cluster"}},
			{entry("a 10.0.0.1 terminating serving node-b", "c 10.0.0.3 not-ready serving node-b"), nil},
			{entry("a 10.0.0.1 terminating not-serving node-b", "c 10.0.0.3 not-ready serving node-b"), []string{"fallback_ended a 10.0.0.1 cluster"}},
		}},
		{"the only endpoint, until a replacement is ready", []step{
			{entry("a 10.0.0.1 ready serving node-a"), nil},
			{entry("a 10.0.0.1 terminating serving node-a", "c 10.0.0.3 not-ready serving node-b"), []string{"endpointslice a 10.0.0.1 cluster+local"}},
			{entry("a 10.0.0.1 terminating serving node-a", "c 10.0.0.3 ready serving node-b"), []string{"fallback_ended a 10.0.0.1 cluster"}},
			{entry("a 10.0.0.1 terminating serving node-a", "c 10.0.0.3 ready serving node-b", "d 10.0.0.4 ready serving node-a"), []string{"fallback_ended a 10.0.0.1 local"}},
		}},
		{"terminating while not serving: no fallback", []step{
			{entry("a 10.0.0.1 terminating not-serving node-b"), []string{"endpointslice a 10.0.0.1"}},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tr := newSliceTracker("node-a")
			now := time.Unix(0, 0)
			for i, s := range tc.steps {
				now = now.Add(10 * time.Millisecond)
				var got []string
				for _, c := range tr.apply("s1", s.entry, event{at: now}) {
					var f []string
					if c.fallback.Cluster {
						f = append(f, "cluster")
					}
					if c.fallback.Local {
						f = append(f, "local")
					}
					line := fmt.Sprintf("%s %s %s", c.stage, c.key.uid, c.key.endpoint.Addr)
					if len(f) > 0 {
						line += " " + strings.Join(f, "+")
					}
					got = append(got, line)
				}
				slices.Sort(got)
				if !slices.Equal(got, s.want) {
					t.Errorf("step %d: changes %q, want %q", i, got, s.want)
				}
			}
		})
	}
	// Leaving the slice while held ends the fallback, when the removal is reported.
	tr := newSliceTracker("node-a")
	now := time.Unix(0, 0)
	tr.apply("s1", entry("a 10.0.0.1 ready serving node-b"), event{at: now})
	tr.apply("s1", entry("a 10.0.0.1 terminating serving node-b"), event{at: now})
	tr.apply("s1", nil, event{at: now.Add(time.Second)})
	if got := changes(tr.flush(now.Add(3 * time.Second))); !slices.Equal(got, []string{"endpointslice_removed a 10.0.0.1", "fallback_ended a 10.0.0.1"}) {
		t.Errorf("leaving the slice while held: %q", got)
	}
	if len(tr.held) != 0 {
		t.Errorf("the tracker still holds %v", tr.held)
	}
}

func TestSliceTrackerServiceChange(t *testing.T) {
	tr := newSliceTracker("node-a")
	now := time.Unix(0, 0)
	tr.apply("s1", entry("a 10.0.0.1 terminating"), event{at: now})
	moved := entry("a 10.0.0.1 terminating")
	moved.service.Name = "web2"
	got := append(tr.apply("s1", moved, event{at: now}), tr.flush(now.Add(RemovalSettle))...)
	if len(got) != 2 || got[0].service.Name == got[1].service.Name {
		t.Fatalf("relabelling a slice to another Service gave %+v, want a removal from web and a terminating in web2", got)
	}
	if len(tr.services) != 1 {
		t.Errorf("tracker still indexes %d services, want 1", len(tr.services))
	}
	tr.apply("s1", nil, event{at: now})
	tr.flush(now.Add(RemovalSettle))
	if len(tr.services) != 0 || len(tr.slices) != 0 || len(tr.deferred) != 0 {
		t.Errorf("tracker leaks: %d services, %d slices, %d deferred", len(tr.services), len(tr.slices), len(tr.deferred))
	}
}

func TestTerminating(t *testing.T) {
	list := []discoveryv1.EndpointSlice{*loadSlice(t, "terminating.yaml"), *loadSlice(t, "ipv6.yaml"), *loadSlice(t, "unlabelled.yaml")}
	eps, errs := Terminating(list)
	var got []string
	for _, ep := range eps {
		got = append(got, ep.Service.String()+" "+ep.Endpoint.String()+" "+ep.Pod.Name+" "+ep.Node)
	}
	want := []string{
		"shop/web 10.244.1.5:53/UDP web-7d4b9-x2k4p node-a",
		"shop/web 10.244.1.5:8080/TCP web-7d4b9-x2k4p node-a",
		"shop/web [fd00:10:244:1::5]:8080/TCP web-7d4b9-x2k4p node-a",
	}
	if !slices.Equal(got, want) {
		t.Errorf("Terminating:\n got %q\nwant %q", got, want)
	}
	if r := reasons(errs); !slices.Equal(r, []string{reasonNoServiceLabel}) {
		t.Errorf("errors %q", r)
	}
}

// FuzzParseSlice's seed corpus in testdata/fuzz holds the JSON of the YAML fixtures.
func FuzzParseSlice(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		var s discoveryv1.EndpointSlice
		if yaml.Unmarshal(data, &s) != nil {
			return
		}
		e, errs := parseSlice(&s, true)
		for _, err := range errs {
			var ie *probes.InputError
			if !errors.As(err, &ie) || ie.Reason == "" {
				t.Errorf("error without a reason: %v", err)
			}
		}
		if e == nil {
			return
		}
		for _, x := range e.eps {
			k, info := x.key, x.info
			if k.endpoint.Addr.Is4() != (s.AddressType == discoveryv1.AddressTypeIPv4) {
				t.Errorf("%s in a %s slice", k.endpoint.Addr, s.AddressType)
			}
			if k.uid == "" || info.pod.UID != k.uid {
				t.Errorf("endpoint %s without its pod's UID", k.endpoint)
			}
		}
		// Applying a slice and removing it leaves nothing behind.
		tr := newSliceTracker("node-a")
		tr.apply("x", e, event{})
		tr.apply("x", nil, event{})
		tr.flush(time.Unix(0, 0).Add(RemovalSettle))
		if len(tr.slices)+len(tr.services)+len(tr.deferred)+len(tr.held) != 0 {
			t.Error("tracker not empty after the slice was removed")
		}
	})
}

// A slice's endpoints are kept once per key, the last listed winning (as a map assigned them in
// order did: a slice may list an endpoint twice), and found by key alone.
func TestSliceEPsKeepTheLastOfEachKey(t *testing.T) {
	key := func(uid, addr string, port uint16) epKey {
		return epKey{uid: uid, endpoint: probes.Endpoint{Addr: netip.MustParseAddr(addr), Port: port, Protocol: "TCP"}}
	}
	in := []sliceEP{
		{key("b", "10.0.0.2", 80), epInfo{node: "first"}},
		{key("a", "10.0.0.9", 80), epInfo{node: "a"}},
		{key("b", "10.0.0.2", 80), epInfo{node: "second"}},
		{key("b", "10.0.0.2", 443), epInfo{node: "b443"}},
		{key("b", "10.0.0.1", 80), epInfo{node: "b1"}},
		{key("b", "10.0.0.2", 80), epInfo{node: "third"}},
	}
	s := newSliceEPs(in)
	var got []string
	for _, x := range s {
		got = append(got, fmt.Sprintf("%s %s %s", x.key.uid, x.key.endpoint, x.info.node))
	}
	want := []string{"a 10.0.0.9:80/TCP a", "b 10.0.0.1:80/TCP b1", "b 10.0.0.2:80/TCP third", "b 10.0.0.2:443/TCP b443"}
	if !slices.Equal(got, want) {
		t.Fatalf("entries %q, want %q", got, want)
	}
	for _, x := range s {
		if info, ok := s.get(x.key); !ok || info != x.info {
			t.Errorf("get(%v) = %+v, %v", x.key, info, ok)
		}
	}
	for _, k := range []epKey{key("a", "10.0.0.2", 80), key("c", "10.0.0.2", 80), key("b", "10.0.0.2", 8080), key("", "10.0.0.1", 80)} {
		if _, ok := s.get(k); ok {
			t.Errorf("get(%v) found a key the slice does not list", k)
		}
	}
}

// BenchmarkSliceEntryOfTen reports the heap a slice of ten endpoints keeps for them, as the
// probe keeps them (a sorted slice) and as the map it used before (docs/benchmarks.md).
//
// Run: go test ./probes/kube -run '^$' -bench SliceEntryOfTen -benchtime 100000x
func BenchmarkSliceEntryOfTen(b *testing.B) {
	var eps []sliceEP
	for i := range 10 {
		eps = append(eps, sliceEP{
			epKey{uid: fmt.Sprintf("0b4d6c1e-5f7a-4a8e-9c3b-%012d", i), endpoint: probes.Endpoint{Addr: netip.AddrFrom4([4]byte{10, 64, byte(i), 1}), Port: 8080, Protocol: "TCP"}},
			epInfo{pod: probes.PodRef{Namespace: "shop", Name: fmt.Sprint("web-", i)}, node: "node1", portName: "http", cond: ready, serving: true},
		})
	}
	b.Run("slice", func(b *testing.B) {
		probetest.HeapPer(b, func() sliceEPs { return newSliceEPs(slices.Clone(eps)) })
	})
	b.Run("map", func(b *testing.B) {
		probetest.HeapPer(b, func() map[epKey]epInfo {
			m := make(map[epKey]epInfo, len(eps))
			for _, x := range eps {
				m[x.key] = x.info
			}
			return m
		})
	})
}
