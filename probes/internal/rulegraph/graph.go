// Package rulegraph keeps what kube-proxy's rules send new connections to: for each Service, the
// endpoints its entry chains (roots) reach by jumps and DNATs. A change re-walks only the roots
// whose last walk passed a changed chain, so a sync that touches one Service costs that Service,
// not the table. The nftables and iptables probes feed it from their own rule decoders.
package rulegraph

import (
	"net/netip"
	"slices"

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
// Roots of one Group are reported together; Service is empty when the rules do not name it.
type Root struct {
	Group    string
	Service  probes.ServiceRef
	Protocol string
}

// Graph is the chains, the roots and, for every root, the chains its walk passed and the
// endpoints it reached.
type Graph struct {
	chains map[Key]*Chain
	roots  map[Key]*walk
	// reachers maps a chain to the roots whose walk passed it.
	reachers map[Key]map[Key]bool
	groups   map[string]*group
	// dirty roots are walked again at the next Update; changed groups are reported by it.
	dirty   map[Key]bool
	changed map[string]bool
}

type walk struct {
	root    Root
	reached []Key
	eps     map[probes.Endpoint]bool
}

type group struct {
	service probes.ServiceRef
	roots   map[Key]bool
}

// New returns an empty graph.
func New() *Graph {
	return &Graph{
		chains: map[Key]*Chain{}, roots: map[Key]*walk{}, reachers: map[Key]map[Key]bool{},
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
	*g = *New()
	g.changed = changed
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
	for r := range g.reachers[k] {
		g.dirty[r] = true
	}
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
		gr = &group{service: r.Service, roots: map[Key]bool{}}
		g.groups[r.Group] = gr
	}
	gr.roots[k] = true
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
		delete(gr.roots, k)
		if len(gr.roots) == 0 {
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
		delete(g.reachers[c], root)
		if len(g.reachers[c]) == 0 {
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

func (g *Graph) walk(root Key, w *walk) {
	w.eps = map[probes.Endpoint]bool{}
	seen := map[string]bool{}
	stack := []string{root.Chain}
	for len(stack) > 0 {
		name := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		if seen[name] {
			continue
		}
		seen[name] = true
		k := Key{root.Family, name}
		w.reached = append(w.reached, k)
		if g.reachers[k] == nil {
			g.reachers[k] = map[Key]bool{}
		}
		g.reachers[k][root] = true
		c := g.chains[k]
		if c == nil {
			continue
		}
		for _, d := range c.DNATs {
			proto := d.Protocol
			if proto == "" {
				proto = w.root.Protocol
			}
			w.eps[probes.Endpoint{Addr: d.Dest.Addr().Unmap(), Port: d.Dest.Port(), Protocol: proto}] = true
		}
		stack = append(stack, c.Jumps...)
	}
}

// Group returns a group's Service and the endpoints its roots reach now; ok is false for a group
// without roots.
func (g *Graph) Group(key string) (svc probes.ServiceRef, eps map[probes.Endpoint]bool, ok bool) {
	gr := g.groups[key]
	if gr == nil {
		return svc, map[probes.Endpoint]bool{}, false
	}
	eps = map[probes.Endpoint]bool{}
	for r := range gr.roots {
		for ep := range g.roots[r].eps {
			eps[ep] = true
		}
	}
	return gr.service, eps, true
}

// Reached is what one group's roots reached at the last Publish.
type Reached struct {
	Service   probes.ServiceRef
	Endpoints map[probes.Endpoint]bool
}

// Removal is an endpoint a group's roots no longer reach.
type Removal struct {
	Service  probes.ServiceRef
	Endpoint probes.Endpoint
}

// Publish updates the graph, brings state (group → what it reached) up to date for the groups
// that changed and returns the endpoints they no longer reach.
func (g *Graph) Publish(state map[string]Reached) []Removal {
	var out []Removal
	for key := range g.Update() {
		svc, next, ok := g.Group(key)
		prev := state[key]
		for ep := range prev.Endpoints {
			if !next[ep] {
				out = append(out, Removal{Service: prev.Service, Endpoint: ep})
			}
		}
		if !ok || len(next) == 0 {
			delete(state, key)
		} else {
			state[key] = Reached{Service: svc, Endpoints: next}
		}
	}
	return out
}

// Snapshot lists the state as Service → endpoints; groups the rules do not name a Service for
// carry their key as the chain.
func Snapshot(state map[string]Reached) []probes.ServiceEndpoints {
	out := make([]probes.ServiceEndpoints, 0, len(state))
	for key, r := range state {
		se := probes.ServiceEndpoints{Service: r.Service, Endpoints: probes.EndpointList(r.Endpoints)}
		if r.Service.Name == "" {
			se.Chain = key
		}
		out = append(out, se)
	}
	probes.SortServiceEndpoints(out)
	return out
}
