package rulegraph

import (
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/internal/probetest"
)

func dnat(s string) Target { return Target{Dest: netip.MustParseAddrPort(s)} }

func removals(rs []Removal) []string {
	var out []string
	for _, r := range rs {
		out = append(out, fmt.Sprintf("%s %s", r.Service, r.Endpoint))
	}
	sort.Strings(out)
	return out
}

var web = probes.ServiceRef{Namespace: "default", Name: "web"}

func noPolicy(string) probes.Policy { return probes.Policy{} }

// A Service's root reaches endpoints through jumps; a change to an endpoint chain re-walks the
// root and reports what it no longer reaches; a chain no root reaches counts for nothing.
func TestPublishFollowsChanges(t *testing.T) {
	g := New(noPolicy)
	g.SetChain(Key{2, "svc"}, &Chain{Jumps: []string{"ep1", "ep2"}})
	g.SetChain(Key{2, "ep1"}, &Chain{DNATs: []Target{dnat("10.0.0.1:80")}})
	g.SetChain(Key{2, "ep2"}, &Chain{DNATs: []Target{dnat("10.0.0.2:80")}})
	g.SetChain(Key{2, "stale"}, &Chain{Jumps: []string{"ep3"}})
	g.SetChain(Key{2, "ep3"}, &Chain{DNATs: []Target{dnat("10.0.0.3:80")}})
	g.SetRoots(2, map[string]Root{"svc": {Group: web.String(), Service: web, Protocol: "TCP"}})
	state := NewState()
	if rs := g.Publish(state); len(rs) != 0 {
		t.Fatalf("first publish removed %v", rs)
	}
	if got := state.Snapshot(); len(got) != 1 || len(got[0].Endpoints) != 2 || got[0].Endpoints[0].String() != "10.0.0.1:80/TCP" {
		t.Fatalf("snapshot %+v", got)
	}

	// The stale chain changes: no root reaches it, nothing to re-walk.
	g.SetChain(Key{2, "ep3"}, nil)
	if rs := g.Publish(state); len(rs) != 0 {
		t.Errorf("stale chain change removed %v", rs)
	}
	// The same content written again (a rewrite with new handles) changes nothing.
	g.SetChain(Key{2, "svc"}, &Chain{Jumps: []string{"ep1", "ep2"}})
	if len(g.dirty) != 0 {
		t.Errorf("an equal chain marked %v dirty", g.dirty)
	}
	g.SetChain(Key{2, "svc"}, &Chain{Jumps: []string{"ep2"}})
	if got, want := removals(g.Publish(state)), []string{"default/web 10.0.0.1:80/TCP"}; !slices.Equal(got, want) {
		t.Errorf("removed %q, want %q", got, want)
	}
	// The root goes: everything it reached is removed, the group is gone.
	g.SetRoots(2, nil)
	if got, want := removals(g.Publish(state)), []string{"default/web 10.0.0.2:80/TCP"}; !slices.Equal(got, want) {
		t.Errorf("removed %q, want %q", got, want)
	}
	if state.Len() != 0 || len(g.reachers) != 0 {
		t.Errorf("left state %v, reachers %v", state, g.reachers)
	}
}

// Two roots (cluster IP and external chains, or two families) of one group are reported as a
// union: an endpoint one root still reaches is not removed.
func TestGroupUnion(t *testing.T) {
	g := New(noPolicy)
	g.SetChain(Key{2, "svc"}, &Chain{DNATs: []Target{dnat("10.0.0.1:80"), {Dest: netip.MustParseAddrPort("10.0.0.2:53"), Protocol: "UDP"}}})
	g.SetChain(Key{2, "ext"}, &Chain{DNATs: []Target{dnat("10.0.0.1:80")}})
	g.SetRoots(2, map[string]Root{
		"svc": {Group: "g", Service: web, Protocol: "TCP"},
		"ext": {Group: "g", Service: web, Protocol: "TCP"},
	})
	state := NewState()
	g.Publish(state)
	g.SetChain(Key{2, "svc"}, &Chain{})
	if got, want := removals(g.Publish(state)), []string{"default/web 10.0.0.2:53/UDP"}; !slices.Equal(got, want) {
		t.Errorf("removed %q, want %q", got, want)
	}
}

// Reset before a full re-read: what the new read no longer has is reported removed, what it
// still has is not.
func TestResetComparesWithTheLastState(t *testing.T) {
	g := New(noPolicy)
	load := func(eps ...Target) {
		g.SetChain(Key{10, "svc"}, &Chain{DNATs: eps})
		g.SetRoots(10, map[string]Root{"svc": {Group: "g", Service: web, Protocol: "TCP"}})
	}
	load(dnat("[fd00::1]:80"), dnat("[fd00::2]:80"))
	state := NewState()
	g.Publish(state)
	g.Reset()
	load(dnat("[fd00::2]:80"))
	if got, want := removals(g.Publish(state)), []string{"default/web [fd00::1]:80/TCP"}; !slices.Equal(got, want) {
		t.Errorf("removed %q, want %q", got, want)
	}
	g.Reset()
	if got, want := removals(g.Publish(state)), []string{"default/web [fd00::2]:80/TCP"}; !slices.Equal(got, want) {
		t.Errorf("after an empty read, removed %q, want %q", got, want)
	}
}

// kubeProxyPolicy classifies chains as the probes do, by kube-proxy's nftables prefixes.
func kubeProxyPolicy(chain string) probes.Policy {
	switch {
	case strings.HasPrefix(chain, "service-"):
		return probes.Policy{Cluster: true}
	case strings.HasPrefix(chain, "local-"):
		return probes.Policy{Local: true}
	}
	return probes.Policy{}
}

// A Service's ClusterIP and external paths are separate groups: a removal from the ClusterIP
// chain is reported even while the external path (externalTrafficPolicy Local, through the
// node-local chain) still reaches the endpoint; each endpoint carries the policy chains that
// reach it, and Reaches answers per path.
func TestPathsAreJudgedApart(t *testing.T) {
	g := New(kubeProxyPolicy)
	a, b := dnat("10.0.0.1:80"), dnat("10.0.0.2:80")
	g.SetChain(Key{2, "service-web"}, &Chain{DNATs: []Target{a, b}})
	g.SetChain(Key{2, "local-web"}, &Chain{DNATs: []Target{a}})
	// The external chain short-circuits some sources to the cluster chain, the rest to the local.
	g.SetChain(Key{2, "external-web"}, &Chain{Jumps: []string{"service-web", "local-web"}})
	g.SetRoots(2, map[string]Root{
		"service-web":  {Group: GroupKey(web, "", probes.PathCluster), Service: web, Path: probes.PathCluster, Protocol: "TCP"},
		"external-web": {Group: GroupKey(web, "", probes.PathExternal), Service: web, Path: probes.PathExternal, Protocol: "TCP"},
	})
	state := NewState()
	g.Publish(state)
	epA := probes.Endpoint{Addr: a.Dest.Addr(), Port: 80, Protocol: "TCP"}
	reach := state.Reaches(web, epA)
	slices.SortFunc(reach, func(x, y probes.Reach) int { return strings.Compare(string(x.Path), string(y.Path)) })
	want := []probes.Reach{
		{Path: probes.PathCluster, Policy: probes.Policy{Cluster: true}},
		{Path: probes.PathExternal, Policy: probes.Policy{Cluster: true, Local: true}},
	}
	if !slices.Equal(reach, want) {
		t.Fatalf("Reaches = %+v, want %+v", reach, want)
	}
	if r := state.Reaches(probes.ServiceRef{Namespace: "default", Name: "other"}, epA); len(r) != 0 {
		t.Errorf("another Service reaches %+v", r)
	}

	// The cluster chain drops the endpoint; the local chain keeps it.
	g.SetChain(Key{2, "service-web"}, &Chain{DNATs: []Target{b}})
	var got []string
	for _, r := range g.Publish(state) {
		got = append(got, fmt.Sprintf("%s %s %s", r.Service, r.Path, r.Endpoint))
	}
	if want := []string{"default/web cluster 10.0.0.1:80/TCP"}; !slices.Equal(got, want) {
		t.Errorf("removed %q, want %q", got, want)
	}
	if r := state.Reaches(web, epA); !slices.Equal(r, []probes.Reach{{Path: probes.PathExternal, Policy: probes.Policy{Local: true}}}) {
		t.Errorf("after the cluster chain's removal, Reaches = %+v", r)
	}
	snap := state.Snapshot()
	if len(snap) != 2 || snap[0].Path != probes.PathCluster || snap[1].Path != probes.PathExternal || len(snap[1].Endpoints) != 2 {
		t.Errorf("snapshot %+v", snap)
	}
}

// A set of roots holds each root once, small or large, and empties whatever it grew to.
func TestRootSet(t *testing.T) {
	var s rootSet
	var keys []Key
	for i := range 3 * fewRoots {
		k := Key{Family: 2, Chain: fmt.Sprint("KUBE-SVC-", i)}
		keys = append(keys, k)
		s = s.with(k).with(k)
		if s.len() != i+1 {
			t.Fatalf("after %d roots, each added twice: len %d", i+1, s.len())
		}
	}
	seen := map[Key]int{}
	s.each(func(k Key) { seen[k]++ })
	if len(seen) != len(keys) {
		t.Errorf("each gave %d roots, want %d", len(seen), len(keys))
	}
	for _, k := range keys {
		s = s.without(k)
	}
	if s.len() != 0 {
		t.Errorf("every root removed, len %d", s.len())
	}
	var small rootSet
	small = small.with(keys[0]).with(keys[1]).without(keys[0])
	if small.len() != 1 || small.few[0] != keys[1] {
		t.Errorf("small set %+v, want %v alone", small, keys[1])
	}
}

// BenchmarkSetOfOneRoot reports the heap a set of one root keeps (most chains are passed by one
// root's walk): as the graph keeps it, a slice while small, and as the map it used before
// (docs/benchmarks.md).
//
// Run: go test ./probes/internal/rulegraph -run '^$' -bench SetOfOneRoot -benchtime 100000x
func BenchmarkSetOfOneRoot(b *testing.B) {
	root := Key{Family: 2, Chain: "KUBE-SVC-ABCDEFGHIJKLMNOP"}
	b.Run("slice", func(b *testing.B) {
		probetest.HeapPer(b, func() rootSet { return rootSet{}.with(root) })
	})
	b.Run("map", func(b *testing.B) {
		probetest.HeapPer(b, func() map[Key]bool { return map[Key]bool{root: true} })
	})
}

// A reach set keeps each endpoint once, in order, with the policies of all its entries joined,
// and finds exactly the endpoints it holds.
func TestReachSetMergesAndFinds(t *testing.T) {
	ep := func(addr string, port uint16, proto string) probes.Endpoint {
		return probes.Endpoint{Addr: netip.MustParseAddr(addr), Port: port, Protocol: proto}
	}
	cluster, local := probes.Policy{Cluster: true}, probes.Policy{Local: true}
	s := merged([]reach{
		{ep("10.0.0.2", 80, "TCP"), cluster},
		{ep("10.0.0.1", 80, "UDP"), local},
		{ep("10.0.0.1", 80, "TCP"), local},
		{ep("10.0.0.2", 80, "TCP"), local},
		{ep("10.0.0.1", 8080, "TCP"), cluster},
		{ep("10.0.0.1", 80, "TCP"), local},
	})
	want := reachSet{
		{ep("10.0.0.1", 80, "TCP"), local},
		{ep("10.0.0.1", 80, "UDP"), local},
		{ep("10.0.0.1", 8080, "TCP"), cluster},
		{ep("10.0.0.2", 80, "TCP"), probes.Policy{Cluster: true, Local: true}},
	}
	if !slices.Equal(s, want) {
		t.Fatalf("merged %+v, want %+v", s, want)
	}
	for _, r := range want {
		if p, ok := s.find(r.ep); !ok || p != r.policy {
			t.Errorf("find(%s) = %+v, %v; want %+v", r.ep, p, ok, r.policy)
		}
	}
	for _, e := range []probes.Endpoint{ep("10.0.0.0", 80, "TCP"), ep("10.0.0.1", 81, "TCP"), ep("10.0.0.1", 80, "SCTP"), ep("10.0.0.3", 80, "TCP")} {
		if _, ok := s.find(e); ok {
			t.Errorf("find(%s) found an endpoint the set does not hold", e)
		}
	}
}

// BenchmarkReachSetOfTen reports the heap a Service port's ten endpoints keep, as the graph keeps
// them (a sorted slice) and as the map it used before (docs/benchmarks.md).
//
// Run: go test ./probes/internal/rulegraph -run '^$' -bench ReachSetOfTen -benchtime 100000x
func BenchmarkReachSetOfTen(b *testing.B) {
	var rs []reach
	for i := range 10 {
		rs = append(rs, reach{probes.Endpoint{Addr: netip.AddrFrom4([4]byte{10, 64, byte(i), 1}), Port: 8080, Protocol: "TCP"}, probes.Policy{Cluster: true}})
	}
	b.Run("slice", func(b *testing.B) {
		probetest.HeapPer(b, func() reachSet { return merged(slices.Clone(rs)) })
	})
	b.Run("map", func(b *testing.B) {
		probetest.HeapPer(b, func() map[probes.Endpoint]probes.Policy {
			m := map[probes.Endpoint]probes.Policy{}
			for _, r := range rs {
				m[r.ep] = r.policy
			}
			return m
		})
	})
}
