// Package rulegraph keeps what kube-proxy's rules send new connections to: for each Service and
// path (ClusterIP, external), the endpoints its entry chains (roots) reach by jumps and DNATs, and
// through which of kube-proxy's policy chains (cluster-wide or node-local endpoints). A change
// re-walks only the roots whose last walk passed a changed chain, so a sync that touches one
// Service costs that Service, not the table. The nftables and iptables probes feed it from their
// own rule decoders.
package rulegraph

import (
	"net/netip"
	"slices"
	"strings"

	"github.com/endpointlag/endpointlag/probes"
)

// Key names a chain in one address family's table.
type Key struct {
	Family uint8
	Chain  string
}

// Target is one DNAT destination; an empty Protocol stands for the protocol of the root whose
// walk reaches it.
type Target struct {
	Dest     netip.AddrPort
	Protocol string
}

// Chain is what one chain's rules do, as far as endpoints go: where they DNAT to, and which chains
// they jump or go to. Matches are taken as possibly true.
type Chain struct {
	DNATs []Target
	Jumps []string
}

func (c *Chain) equal(o *Chain) bool {
	return c != nil && o != nil && slices.Equal(c.DNATs, o.DNATs) && slices.Equal(c.Jumps, o.Jumps)
}

// Root is an entry chain: a Service port's chain that kube-proxy's entry rules or maps point at.
// Roots of one Group (a Service's path, see GroupKey) are reported together; Service is empty when
// the rules do not name it.
type Root struct {
	Group    string
	Service  probes.ServiceRef
	Path     probes.Path
	Protocol string
}

// GroupKey names the group of a Service's roots on one path; rules that name no Service are
// grouped by their chain instead.
func GroupKey(svc probes.ServiceRef, chain string, path probes.Path) string {
	if svc.Name == "" {
		return chain + " " + string(path)
	}
	return svc.String() + " " + string(path)
}

// Classifier tells the policy chains among the chains: those holding a Service's cluster-wide
// endpoints and those holding this node's own (traffic policy Local); other chains give none.
type Classifier func(chain string) probes.Policy

// Graph is the chains, the roots and, for every root, the chains its walk passed and the
// endpoints it reached.
type Graph struct {
	classify Classifier
	chains   map[Key]*Chain
	roots    map[Key]*walk
	// reachers maps a chain to the roots whose walk passed it.
	reachers map[Key]rootSet
	groups   map[string]*group
	// dirty roots are walked again at the next Update; changed groups are reported by it.
	dirty   map[Key]bool
	changed map[string]bool
}

// rootSet is a set of roots: a slice while small, as for most chains (a KUBE-SEP- chain is passed
// by its Service's roots alone), a map once large (KUBE-MARK-MASQ is passed by every root). A
// map of one root takes 336 bytes of heap, a slice 24 (BenchmarkSetOfOneRoot): at 2,000 Services
// in iptables mode the maps held 9 MiB after a churn.
type rootSet struct {
	few  []Key
	many map[Key]bool
}

// fewRoots is how many roots a set keeps in its slice.
const fewRoots = 16

func (s rootSet) with(k Key) rootSet {
	switch {
	case s.many != nil:
		s.many[k] = true
	case slices.Contains(s.few, k):
	case len(s.few) < fewRoots:
		s.few = append(s.few, k)
	default:
		s.many = make(map[Key]bool, 2*fewRoots)
		for _, f := range s.few {
			s.many[f] = true
		}
		s.many[k] = true
		s.few = nil
	}
	return s
}

func (s rootSet) without(k Key) rootSet {
	if s.many != nil {
		delete(s.many, k)
		return s
	}
	if i := slices.Index(s.few, k); i >= 0 {
		s.few = slices.Delete(s.few, i, i+1)
	}
	return s
}

func (s rootSet) len() int { return len(s.few) + len(s.many) }

func (s rootSet) each(f func(Key)) {
	for _, k := range s.few {
		f(k)
	}
	for k := range s.many {
		f(k)
	}
}

type walk struct {
	root    Root
	reached []Key
	// eps is never changed once walked: a group of one root shares it (group).
	eps reachSet
}

type group struct {
	service probes.ServiceRef
	path    probes.Path
	roots   rootSet
}

// reach is an endpoint and the policy chains it is reached through.
type reach struct {
	ep     probes.Endpoint
	policy probes.Policy
}

// reachSet is a set of endpoints with their policies, ordered by probes.CompareEndpoints. A graph
// holds two for every Service port: its root's walk and its group's state. As sorted slices they
// took half the heap maps did (BenchmarkReachSetOfTen), and a Service of one port shares one.
type reachSet []reach

// find returns the policies ep is reached through, and whether it is.
func (s reachSet) find(ep probes.Endpoint) (probes.Policy, bool) {
	i, ok := slices.BinarySearchFunc(s, ep, func(r reach, ep probes.Endpoint) int { return probes.CompareEndpoints(r.ep, ep) })
	if !ok {
		return probes.Policy{}, false
	}
	return s[i].policy, true
}

// merged sorts rs in place and merges the entries of one endpoint, their policies joined.
func merged(rs []reach) reachSet {
	slices.SortFunc(rs, func(a, b reach) int { return probes.CompareEndpoints(a.ep, b.ep) })
	out := rs[:0]
	for _, r := range rs {
		if n := len(out); n > 0 && out[n-1].ep == r.ep {
			out[n-1].policy = probes.Policy{Cluster: out[n-1].policy.Cluster || r.policy.Cluster, Local: out[n-1].policy.Local || r.policy.Local}
			continue
		}
		out = append(out, r)
	}
	return slices.Clip(out)
}

// New returns an empty graph whose policy chains classify names.
func New(classify Classifier) *Graph {
	return &Graph{
		classify: classify,
		chains:   map[Key]*Chain{}, roots: map[Key]*walk{}, reachers: map[Key]rootSet{},
		groups: map[string]*group{}, dirty: map[Key]bool{}, changed: map[string]bool{},
	}
}

// Reset forgets every chain and root; the groups it held are reported changed by the next Update,
// so that a full re-read is compared with what was known before it.
func (g *Graph) Reset() {
	changed := g.changed
	for k := range g.groups {
		changed[k] = true
	}
	*g = *New(g.classify)
	g.changed = changed
}

// Compare makes the next Publish compare every group state holds with what the graph reaches
// then: a graph built anew (a probe started again) reports what went while it was not looking.
func (g *Graph) Compare(state *State) {
	for k := range state.groups {
		g.changed[k] = true
	}
}

// SetChain records what a chain does now (nil: it is gone) and marks the roots reaching it.
func (g *Graph) SetChain(k Key, c *Chain) {
	old, had := g.chains[k]
	if c == nil {
		if !had {
			return
		}
		delete(g.chains, k)
	} else {
		if c.equal(old) {
			return
		}
		g.chains[k] = c
	}
	g.reachers[k].each(func(r Key) { g.dirty[r] = true })
	if _, ok := g.roots[k]; ok {
		g.dirty[k] = true
	}
}

// SetRoot makes a chain a root, or moves it to another group.
func (g *Graph) SetRoot(k Key, r Root) {
	if w := g.roots[k]; w != nil {
		if w.root == r {
			return
		}
		g.RemoveRoot(k)
	}
	g.roots[k] = &walk{root: r}
	gr := g.groups[r.Group]
	if gr == nil {
		gr = &group{service: r.Service, path: r.Path}
		g.groups[r.Group] = gr
	}
	gr.roots = gr.roots.with(k)
	g.dirty[k] = true
}

// RemoveRoot drops a root kube-proxy no longer points at.
func (g *Graph) RemoveRoot(k Key) {
	w := g.roots[k]
	if w == nil {
		return
	}
	g.unreach(k, w)
	delete(g.roots, k)
	if gr := g.groups[w.root.Group]; gr != nil {
		gr.roots = gr.roots.without(k)
		if gr.roots.len() == 0 {
			delete(g.groups, w.root.Group)
		}
	}
	delete(g.dirty, k)
	g.changed[w.root.Group] = true
}

// SetRoots replaces one family's roots.
func (g *Graph) SetRoots(family uint8, roots map[string]Root) {
	for k := range g.roots {
		if _, ok := roots[k.Chain]; k.Family == family && !ok {
			g.RemoveRoot(k)
		}
	}
	for chain, r := range roots {
		g.SetRoot(Key{family, chain}, r)
	}
}

func (g *Graph) unreach(root Key, w *walk) {
	for _, c := range w.reached {
		if rs := g.reachers[c].without(root); rs.len() > 0 {
			g.reachers[c] = rs
		} else {
			delete(g.reachers, c)
		}
	}
	w.reached = w.reached[:0]
}

// Update re-walks the marked roots and returns the groups whose endpoints may have changed since
// the last Update.
func (g *Graph) Update() map[string]bool {
	for r := range g.dirty {
		if w := g.roots[r]; w != nil {
			g.unreach(r, w)
			g.walk(r, w)
			g.changed[w.root.Group] = true
		}
	}
	clear(g.dirty)
	out := g.changed
	g.changed = map[string]bool{}
	return out
}

// walk follows the root's jumps depth first. The policy of an endpoint is that of the last policy
// chain on the way to its DNAT (none on the way: cluster-wide); a chain reached under two
// policies is walked under each.
func (g *Graph) walk(root Key, w *walk) {
	var eps []reach
	type visit struct {
		chain  string
		policy probes.Policy
	}
	seen := map[visit]bool{}
	passed := map[string]bool{}
	stack := []visit{{chain: root.Chain}}
	for len(stack) > 0 {
		v := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		if p := g.classify(v.chain); p.Any() {
			v.policy = p
		}
		if seen[v] {
			continue
		}
		seen[v] = true
		k := Key{root.Family, v.chain}
		if !passed[v.chain] {
			passed[v.chain] = true
			w.reached = append(w.reached, k)
			g.reachers[k] = g.reachers[k].with(root)
		}
		c := g.chains[k]
		if c == nil {
			continue
		}
		policy := v.policy
		if !policy.Any() {
			policy = probes.Policy{Cluster: true}
		}
		for _, d := range c.DNATs {
			proto := d.Protocol
			if proto == "" {
				proto = w.root.Protocol
			}
			eps = append(eps, reach{probes.Endpoint{Addr: d.Dest.Addr().Unmap(), Port: d.Dest.Port(), Protocol: proto}, policy})
		}
		for _, j := range c.Jumps {
			stack = append(stack, visit{chain: j, policy: v.policy})
		}
	}
	w.eps = merged(eps)
}

// group returns a group's endpoints now, with the policies its roots reach each through; ok is
// false for a group without roots.
func (g *Graph) group(key string) (gr *group, eps reachSet, ok bool) {
	gr = g.groups[key]
	if gr == nil {
		return nil, nil, false
	}
	if len(gr.roots.few) == 1 {
		return gr, g.roots[gr.roots.few[0]].eps, true
	}
	var all []reach
	gr.roots.each(func(r Key) { all = append(all, g.roots[r].eps...) })
	return gr, merged(all), true
}

// reached is what one group's roots reached at the last Publish.
type reached struct {
	service probes.ServiceRef
	path    probes.Path
	eps     reachSet
}

// Removal is an endpoint a group's roots no longer reach.
type Removal struct {
	Service  probes.ServiceRef
	Path     probes.Path
	Endpoint probes.Endpoint
}

// State is what the rules reached at the last Publish, per group, for the probe's readers:
// Snapshot (inspect rules) and Reaches (the collector, when an endpoint starts terminating).
type State struct {
	groups map[string]reached
	// unnamed are the groups whose rules name no Service.
	unnamed map[string]bool
}

// NewState returns an empty state.
func NewState() *State {
	return &State{groups: map[string]reached{}, unnamed: map[string]bool{}}
}

// Len is the number of groups.
func (s *State) Len() int {
	if s == nil {
		return 0
	}
	return len(s.groups)
}

// Publish updates the graph, brings state up to date for the groups that changed and returns the
// endpoints they no longer reach.
func (g *Graph) Publish(state *State) []Removal {
	var out []Removal
	for key := range g.Update() {
		gr, next, ok := g.group(key)
		prev := state.groups[key]
		for _, r := range prev.eps {
			if _, still := next.find(r.ep); !still {
				out = append(out, Removal{Service: prev.service, Path: prev.path, Endpoint: r.ep})
			}
		}
		if !ok || len(next) == 0 {
			delete(state.groups, key)
			delete(state.unnamed, key)
			continue
		}
		state.groups[key] = reached{service: gr.service, path: gr.path, eps: next}
		if gr.service.Name == "" {
			state.unnamed[key] = true
		}
	}
	return out
}

// Reaches returns the paths on which the rules reach ep for svc: the Service's own groups, and
// the groups whose rules name no Service.
func (s *State) Reaches(svc probes.ServiceRef, ep probes.Endpoint) []probes.Reach {
	var out []probes.Reach
	add := func(r reached) {
		p, ok := r.eps.find(ep)
		if !ok {
			return
		}
		for i := range out {
			if out[i].Path == r.path {
				out[i].Policy = probes.Policy{Cluster: out[i].Policy.Cluster || p.Cluster, Local: out[i].Policy.Local || p.Local}
				return
			}
		}
		out = append(out, probes.Reach{Path: r.path, Policy: p})
	}
	if svc.Name != "" {
		for _, path := range []probes.Path{probes.PathCluster, probes.PathExternal} {
			add(s.groups[GroupKey(svc, "", path)])
		}
	} else {
		for _, r := range s.groups {
			if r.service.Name != "" {
				add(r)
			}
		}
	}
	for key := range s.unnamed {
		add(s.groups[key])
	}
	return out
}

// Snapshot lists the state as Service and path → endpoints; groups the rules do not name a Service
// for carry their chain.
func (s *State) Snapshot() []probes.ServiceEndpoints {
	out := make([]probes.ServiceEndpoints, 0, len(s.groups))
	for key, r := range s.groups {
		eps := make([]probes.Endpoint, len(r.eps))
		for i, x := range r.eps {
			eps[i] = x.ep
		}
		se := probes.ServiceEndpoints{Service: r.service, Path: r.path, Endpoints: eps}
		if r.service.Name == "" {
			se.Chain, _, _ = strings.Cut(key, " ")
		}
		out = append(out, se)
	}
	probes.SortServiceEndpoints(out)
	return out
}
