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
	"github.com/endpointlag/endpointlag/probes/internal/rulegraph"
)

// servicePort is what kube-proxy's service and endpoint chain names carry after the hash:
// "ns/svc/proto/portname".
type servicePort struct {
	service  probes.ServiceRef
	protocol string // TCP, UDP or SCTP
	portName string
}

// The kinds of kube-proxy's per-service-port chains, by name prefix: a Service port's
// cluster-wide endpoints (service-), its endpoints on this node for traffic policy Local (local-),
// the entry of external traffic (external-: NodePort, external and load-balancer IPs; it goes on to
// service- or local-), one endpoint (endpoint-, with session affinity). firewall- chains only drop
// (loadBalancerSourceRanges, in the filter hooks): they lead to no endpoint.
const (
	kindService  = "service"
	kindLocal    = "local"
	kindExternal = "external"
	kindEndpoint = "endpoint"
)

// parseChainName reads kube-proxy's per-service chain names: service-HASH-ns/svc/proto/port,
// local-HASH-…, external-HASH-… and endpoint-HASH-ns/svc/proto/port__ip/port. Other chains give
// ok=false.
func parseChainName(name string) (kind string, sp servicePort, ok bool) {
	kind, rest, found := strings.Cut(name, "-")
	if !found || (kind != kindService && kind != kindLocal && kind != kindExternal && kind != kindEndpoint) {
		return "", sp, false
	}
	_, rest, found = strings.Cut(rest, "-") // the hash
	if !found {
		return "", sp, false
	}
	if kind == kindEndpoint {
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
func evalRule(r *nftables.Rule, sets setLookup, out *rulegraph.Chain) error {
	states := []regs{{}}
	for _, e := range r.Exprs {
		switch e := e.(type) {
		case *expr.Immediate:
			for i := range states {
				states[i].write(e.Register, e.Data)
			}
		case *expr.Verdict:
			if e.Kind == expr.VerdictJump || e.Kind == expr.VerdictGoto {
				out.Jumps = append(out.Jumps, verdictChain(e.Chain))
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
						out.Jumps = append(out.Jumps, chain)
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
				out.DNATs = append(out.DNATs, rulegraph.Target{Dest: netip.AddrPortFrom(addr, port)})
			}
		}
	}
	return nil
}

// verdictChain is a verdict's chain as the kernel means it: a netlink string ends at its first NUL.
// decodeVerdict trimmed trailing NULs only, and google/nftables trims them from both ends, so a
// name with one inside came through whole (FuzzReadChain found it).
func verdictChain(s string) string {
	s, _, _ = strings.Cut(s, "\x00")
	return s
}

// elementTarget returns the chain a verdict-map element jumps or goes to. google/nftables v0.3.0
// leaves VerdictData empty when it reads elements and puts the raw nested verdict attributes
// (NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN) in Val; both forms are read.
func elementTarget(el nftables.SetElement) (string, bool) {
	if v := el.VerdictData; v != nil {
		chain := verdictChain(v.Chain)
		return chain, (v.Kind == expr.VerdictJump || v.Kind == expr.VerdictGoto) && chain != ""
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
			chain = verdictChain(string(ad.Bytes()))
		}
	}
	return code, chain, ad.Err() == nil && seenCode
}

// rootMaps are kube-proxy's verdict maps from a destination to its service chain; a service chain
// not reachable from them is stale.
var rootMaps = []string{"service-ips", "service-nodeports"}

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

// root makes a service map's target a root, grouped by Service and path: ClusterIPs go to a
// service- or local- chain, external destinations to an external- chain. Endpoint chains and
// names that are not kube-proxy's are not roots.
func root(name string) (rulegraph.Root, bool) {
	kind, sp, ok := parseChainName(name)
	if !ok || kind == kindEndpoint {
		return rulegraph.Root{}, false
	}
	path := probes.PathCluster
	if kind == kindExternal {
		path = probes.PathExternal
	}
	return rulegraph.Root{Group: rulegraph.GroupKey(sp.service, name, path), Service: sp.service, Path: path, Protocol: sp.protocol}, true
}

// roots makes the service maps' targets roots.
func roots(names []string) map[string]rulegraph.Root {
	out := map[string]rulegraph.Root{}
	for _, n := range names {
		if r, ok := root(n); ok {
			out[n] = r
		}
	}
	return out
}

// policy classifies kube-proxy's policy chains for the graph.
func policy(chain string) probes.Policy {
	switch kind, _, _ := parseChainName(chain); kind {
	case kindService:
		return probes.Policy{Cluster: true}
	case kindLocal:
		return probes.Policy{Local: true}
	}
	return probes.Policy{}
}
