package nftables

import (
	"encoding/binary"
	"net/netip"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/endpointlag/endpointlag/probes"
)

// servicePort is what kube-proxy's service and endpoint chain names carry after the hash:
// "ns/svc/proto/portname".
type servicePort struct {
	service  probes.ServiceRef
	protocol string // TCP, UDP or SCTP
	portName string
}

// parseChainName reads kube-proxy's per-service chain names: service-HASH-ns/svc/proto/port,
// external-HASH-ns/svc/proto/port and endpoint-HASH-ns/svc/proto/port__ip/port. Other chains give
// ok=false.
func parseChainName(name string) (kind string, sp servicePort, ok bool) {
	kind, rest, found := strings.Cut(name, "-")
	if !found || (kind != "service" && kind != "external" && kind != "endpoint") {
		return "", sp, false
	}
	_, rest, found = strings.Cut(rest, "-") // the hash
	if !found {
		return "", sp, false
	}
	if kind == "endpoint" {
		rest, _, _ = strings.Cut(rest, "__")
	}
	parts := strings.Split(rest, "/")
	if len(parts) != 4 || parts[0] == "" || parts[1] == "" {
		return "", sp, false
	}
	proto := strings.ToUpper(parts[2])
	if proto != "TCP" && proto != "UDP" && proto != "SCTP" {
		return "", sp, false
	}
	return kind, servicePort{service: probes.ServiceRef{Namespace: parts[0], Name: parts[1]}, protocol: proto, portName: parts[3]}, true
}

// chainInfo is what one chain's rules do, as far as endpoints go: where they DNAT to, and which
// chains they jump or go to (directly or through verdict maps).
type chainInfo struct {
	dnats []netip.AddrPort
	jumps []string
}

// setLookup returns the elements of a set of the chain's table by name.
type setLookup func(name string) ([]nftables.SetElement, error)

// regs is an nftables register file: the verdict register and four 16-byte registers, which the
// 4-byte NFT_REG32_* registers overlay.
type regs [80]byte

func regOffset(r uint32) (int, bool) {
	switch {
	case r <= unix.NFT_REG_4:
		return int(r) * 16, true
	case r >= unix.NFT_REG32_00 && r <= unix.NFT_REG32_15:
		return 16 + int(r-unix.NFT_REG32_00)*4, true
	}
	return 0, false
}

func (rg *regs) write(r uint32, data []byte) {
	if off, ok := regOffset(r); ok {
		copy(rg[off:], data)
	}
}

func (rg *regs) read(r uint32, n int) []byte {
	off, ok := regOffset(r)
	if !ok || off+n > len(rg) {
		return nil
	}
	return rg[off : off+n]
}

// maxFanout bounds the register states a rule's map lookups can multiply into.
const maxFanout = 1 << 16

// evalRule follows a rule's expressions as far as they decide a destination: immediates and map
// lookups load registers, a dnat reads them, verdicts and verdict maps name other chains. Matches
// are taken as possibly true, so the result is every destination the rule can produce.
func evalRule(r *nftables.Rule, sets setLookup, out *chainInfo) error {
	states := []regs{{}}
	for _, e := range r.Exprs {
		switch e := e.(type) {
		case *expr.Immediate:
			for i := range states {
				states[i].write(e.Register, e.Data)
			}
		case *expr.Verdict:
			if e.Kind == expr.VerdictJump || e.Kind == expr.VerdictGoto {
				out.jumps = append(out.jumps, e.Chain)
			}
		case *expr.Lookup:
			if !e.IsDestRegSet || e.Invert {
				continue // a membership test
			}
			elems, err := sets(e.SetName)
			if err != nil {
				return err
			}
			if e.DestRegister == unix.NFT_REG_VERDICT {
				for _, el := range elems {
					if chain, ok := elementTarget(el); ok {
						out.jumps = append(out.jumps, chain)
					}
				}
				continue
			}
			next := make([]regs, 0, len(states)*len(elems))
			for _, st := range states {
				for _, el := range elems {
					if len(next) >= maxFanout {
						break
					}
					s := st
					s.write(e.DestRegister, el.Val)
					next = append(next, s)
				}
			}
			states = next
		case *expr.NAT:
			if e.Type != expr.NATTypeDestNAT || e.RegAddrMin == 0 {
				continue
			}
			n := 4
			if e.Family == unix.NFPROTO_IPV6 {
				n = 16
			}
			for i := range states {
				addr, ok := netip.AddrFromSlice(states[i].read(e.RegAddrMin, n))
				if !ok {
					continue
				}
				var port uint16
				if p := states[i].read(e.RegProtoMin, 2); e.RegProtoMin != 0 && p != nil {
					port = binary.BigEndian.Uint16(p)
				}
				out.dnats = append(out.dnats, netip.AddrPortFrom(addr, port))
			}
		}
	}
	return nil
}

// elementTarget returns the chain a verdict-map element jumps or goes to. google/nftables v0.3.0
// leaves VerdictData empty when it reads elements and puts the raw nested verdict attributes
// (NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN) in Val; both forms are read.
func elementTarget(el nftables.SetElement) (string, bool) {
	if v := el.VerdictData; v != nil {
		return v.Chain, (v.Kind == expr.VerdictJump || v.Kind == expr.VerdictGoto) && v.Chain != ""
	}
	code, chain, ok := decodeVerdict(el.Val)
	return chain, ok && (code == unix.NFT_JUMP || code == unix.NFT_GOTO) && chain != ""
}

// decodeVerdict reads nested verdict attributes: a code (big-endian int32) and a chain name.
func decodeVerdict(b []byte) (code int32, chain string, ok bool) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return 0, "", false
	}
	ad.ByteOrder = binary.BigEndian
	seenCode := false
	for ad.Next() {
		switch ad.Type() {
		case unix.NFTA_VERDICT_CODE:
			if len(ad.Bytes()) == 4 {
				code, seenCode = int32(binary.BigEndian.Uint32(ad.Bytes())), true
			}
		case unix.NFTA_VERDICT_CHAIN:
			chain = strings.TrimRight(string(ad.Bytes()), "\x00")
		}
	}
	return code, chain, ad.Err() == nil && seenCode
}

// rootMaps are kube-proxy's verdict maps from a destination to its service chain; a service chain
// not reachable from them is stale.
var rootMaps = []string{"service-ips", "service-nodeports"}

// chainKey names a chain in one address family's kube-proxy table.
type chainKey struct {
	family nftables.TableFamily
	name   string
}

func familyName(f nftables.TableFamily) string {
	if f == nftables.TableFamilyIPv6 {
		return "ip6"
	}
	return "ip"
}

// isNotFound tells a missing table, chain or set (ENOENT) from other failures. google/nftables
// formats the netlink error with %v, so only its text is left to look at.
func isNotFound(err error) bool {
	return err != nil && strings.Contains(err.Error(), unix.ENOENT.Error())
}

// graph keeps, for every root (a chain kube-proxy's service maps point at), the chains its walk
// passed and the endpoints they DNAT to, so that a change re-walks only the roots that reach a
// changed chain: a sync that touches one Service costs that Service, not the table.
type graph struct {
	chains map[chainKey]*chainInfo
	roots  map[chainKey]*rootWalk
	// reachers maps a chain to the roots whose walk passed it.
	reachers map[chainKey]map[chainKey]bool
	// byService maps a Service to its roots (service and external chains, both families).
	byService map[probes.ServiceRef]map[chainKey]bool
	// dirty roots are walked again at the next update; changed Services are reported by it.
	dirty   map[chainKey]bool
	changed map[probes.ServiceRef]bool
}

type rootWalk struct {
	service probes.ServiceRef
	reached []chainKey
	eps     map[probes.Endpoint]bool
}

func newGraph() *graph {
	return &graph{
		chains: map[chainKey]*chainInfo{}, roots: map[chainKey]*rootWalk{},
		reachers: map[chainKey]map[chainKey]bool{}, byService: map[probes.ServiceRef]map[chainKey]bool{},
		dirty: map[chainKey]bool{}, changed: map[probes.ServiceRef]bool{},
	}
}

func addTo(m map[chainKey]bool, k chainKey) map[chainKey]bool {
	if m == nil {
		m = map[chainKey]bool{}
	}
	m[k] = true
	return m
}

// setChain records what a chain does now (nil: it is gone) and marks the roots reaching it.
func (g *graph) setChain(k chainKey, ci *chainInfo) {
	if ci == nil {
		delete(g.chains, k)
	} else {
		g.chains[k] = ci
	}
	for r := range g.reachers[k] {
		g.dirty[r] = true
	}
	if _, ok := g.roots[k]; ok {
		g.dirty[k] = true
	}
}

// setRoots replaces one family's roots with the chains the service maps point at now.
func (g *graph) setRoots(fam nftables.TableFamily, names []string) {
	next := map[chainKey]bool{}
	for _, n := range names {
		if kind, _, ok := parseChainName(n); ok && kind != "endpoint" {
			next[chainKey{fam, n}] = true
		}
	}
	for k := range g.roots {
		if k.family == fam && !next[k] {
			g.removeRoot(k)
		}
	}
	for k := range next {
		g.addRoot(k)
	}
}

// addRoot makes a service or external chain a root.
func (g *graph) addRoot(k chainKey) {
	if _, ok := g.roots[k]; ok {
		return
	}
	_, sp, _ := parseChainName(k.name)
	g.roots[k] = &rootWalk{service: sp.service}
	g.byService[sp.service] = addTo(g.byService[sp.service], k)
	g.dirty[k] = true
}

// removeRoot drops a root whose map element is gone.
func (g *graph) removeRoot(k chainKey) {
	w := g.roots[k]
	if w == nil {
		return
	}
	g.unreach(k, w)
	delete(g.roots, k)
	delete(g.byService[w.service], k)
	if len(g.byService[w.service]) == 0 {
		delete(g.byService, w.service)
	}
	delete(g.dirty, k)
	g.changed[w.service] = true
}

func (g *graph) unreach(root chainKey, w *rootWalk) {
	for _, c := range w.reached {
		delete(g.reachers[c], root)
		if len(g.reachers[c]) == 0 {
			delete(g.reachers, c)
		}
	}
	w.reached = w.reached[:0]
}

// update re-walks the marked roots and returns the Services whose endpoints may have changed
// since the last update.
func (g *graph) update() map[probes.ServiceRef]bool {
	for r := range g.dirty {
		if w := g.roots[r]; w != nil {
			g.unreach(r, w)
			g.walk(r, w)
			g.changed[w.service] = true
		}
	}
	clear(g.dirty)
	out := g.changed
	g.changed = map[probes.ServiceRef]bool{}
	return out
}

func (g *graph) walk(root chainKey, w *rootWalk) {
	_, sp, _ := parseChainName(root.name)
	w.eps = map[probes.Endpoint]bool{}
	seen := map[string]bool{}
	stack := []string{root.name}
	for len(stack) > 0 {
		name := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		if seen[name] {
			continue
		}
		seen[name] = true
		k := chainKey{root.family, name}
		w.reached = append(w.reached, k)
		g.reachers[k] = addTo(g.reachers[k], root)
		ci := g.chains[k]
		if ci == nil {
			continue
		}
		for _, d := range ci.dnats {
			w.eps[probes.Endpoint{Addr: d.Addr().Unmap(), Port: d.Port(), Protocol: sp.protocol}] = true
		}
		stack = append(stack, ci.jumps...)
	}
}

// service returns the endpoints a Service's roots reach now.
func (g *graph) service(svc probes.ServiceRef) map[probes.Endpoint]bool {
	out := map[probes.Endpoint]bool{}
	for r := range g.byService[svc] {
		for ep := range g.roots[r].eps {
			out[ep] = true
		}
	}
	return out
}
