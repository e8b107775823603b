package iptables

import (
	"bufio"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/internal/rulegraph"
)

// rule is the part of one rule that decides where a packet goes.
type rule struct {
	chain   string
	target  string // -j or -g: a chain (jump) or a target extension
	jump    bool   // target is a chain
	proto   string // -p, upper case
	dnat    netip.AddrPort
	comment string
}

// stored is what the probe keeps of a rule, in a map under its chain's name: comments only matter
// on the entry chains, where they name the Service (a large table has hundreds of thousands of
// rules).
func (r rule) stored() rule {
	if !slices.Contains(rootChains, r.chain) {
		r.comment = ""
	}
	r.chain = ""
	return r
}

// parseSave reads the nat table of `iptables-save` output into its chains' rules; every declared
// chain has an entry. Lines it does not need (other tables, COMMIT) are skipped; a malformed line
// is an error naming it.
func parseSave(r io.Reader) (map[string][]rule, error) {
	out := map[string][]rule{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 16*1024*1024)
	inNat := false
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "*"):
			inNat = line == "*nat"
		case inNat && strings.HasPrefix(line, ":"):
			name, _, _ := strings.Cut(line[1:], " ")
			if name == "" {
				return nil, fmt.Errorf("line %d: chain without a name", n)
			}
			if _, ok := out[name]; !ok {
				out[name] = nil
			}
		case inNat && strings.HasPrefix(line, "-A "):
			ru, err := parseRule(line)
			if err != nil {
				return nil, fmt.Errorf("line %d: %w", n, err)
			}
			out[ru.chain] = append(out[ru.chain], ru)
		}
	}
	// A target is a jump when it names a chain of the table.
	for _, rules := range out {
		for i := range rules {
			_, rules[i].jump = out[rules[i].target]
		}
	}
	return out, sc.Err()
}

func parseRule(line string) (rule, error) {
	words, err := split(line)
	if err != nil {
		return rule{}, err
	}
	var ru rule
	for i := 0; i < len(words); i++ {
		next := func() (string, error) {
			if i+1 >= len(words) {
				return "", fmt.Errorf("%s without a value", words[i])
			}
			i++
			return words[i], nil
		}
		var v string
		switch words[i] {
		case "-A":
			if v, err = next(); err == nil {
				ru.chain = v
			}
		case "-j", "-g":
			if v, err = next(); err == nil {
				ru.target = v
			}
		case "-p":
			if v, err = next(); err == nil {
				ru.proto = strings.ToUpper(v)
			}
		case "--comment":
			if v, err = next(); err == nil {
				ru.comment = v
			}
		case "--to-destination":
			if v, err = next(); err == nil {
				ru.dnat, err = netip.ParseAddrPort(v)
				if err != nil {
					err = fmt.Errorf("--to-destination %q: %w", v, err)
				}
			}
		}
		if err != nil {
			return rule{}, err
		}
	}
	if ru.chain == "" {
		return rule{}, fmt.Errorf("no chain in %q", line)
	}
	return ru, nil
}

// split cuts an iptables-save line into words; double quotes group words and \" escapes a quote.
func split(line string) ([]string, error) {
	var (
		words  []string
		cur    strings.Builder
		quoted bool
		inWord bool
	)
	for i := 0; i < len(line); i++ {
		c := line[i]
		switch {
		case c == '\\' && quoted && i+1 < len(line):
			i++
			cur.WriteByte(line[i])
		case c == '"':
			quoted, inWord = !quoted, true
		case c == ' ' && !quoted:
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteByte(c)
			inWord = true
		}
	}
	if quoted {
		return nil, fmt.Errorf("unterminated quote in %q", line)
	}
	if inWord {
		words = append(words, cur.String())
	}
	return words, nil
}

// rootChains are kube-proxy's entry chains; a KUBE-SVC-/SVL-/EXT-/FW- chain they no longer jump
// to is stale.
var rootChains = []string{"KUBE-SERVICES", "KUBE-NODEPORTS"}

// The prefixes of kube-proxy's per-service-port chains: a Service port's cluster-wide endpoints
// (KUBE-SVC-), its endpoints on this node for traffic policy Local (KUBE-SVL-), the entry of
// external traffic (KUBE-EXT-: NodePort, external and load-balancer IPs; it goes on to SVC- or
// SVL-) and the loadBalancerSourceRanges check in front of it (KUBE-FW-).
const (
	prefixCluster  = "KUBE-SVC-"
	prefixLocal    = "KUBE-SVL-"
	prefixExternal = "KUBE-EXT-"
	prefixFirewall = "KUBE-FW-"
)

// servicePath tells whether a chain is one of kube-proxy's per-service-port chains, and the path
// of the traffic an entry rule jumping to it carries: ClusterIP traffic goes to SVC- or SVL-,
// external traffic to EXT- or FW-.
func servicePath(name string) (probes.Path, bool) {
	switch {
	case strings.HasPrefix(name, prefixCluster), strings.HasPrefix(name, prefixLocal):
		return probes.PathCluster, true
	case strings.HasPrefix(name, prefixExternal), strings.HasPrefix(name, prefixFirewall):
		return probes.PathExternal, true
	}
	return "", false
}

// policy classifies kube-proxy's policy chains for the graph.
func policy(chain string) probes.Policy {
	switch {
	case strings.HasPrefix(chain, prefixCluster):
		return probes.Policy{Cluster: true}
	case strings.HasPrefix(chain, prefixLocal):
		return probes.Policy{Local: true}
	}
	return probes.Policy{}
}

// serviceFromComment reads kube-proxy's comment on an entry rule: "ns/svc:port cluster IP",
// "ns/svc:port external IP", "ns/svc:port loadbalancer IP", "ns/svc:port" on KUBE-NODEPORTS, or
// the same without ":port" for an unnamed port.
func serviceFromComment(c string) (probes.ServiceRef, bool) {
	word, _, _ := strings.Cut(c, " ")
	word, _, _ = strings.Cut(word, ":")
	ns, name, ok := strings.Cut(word, "/")
	if !ok || ns == "" || name == "" || strings.Contains(name, "/") {
		return probes.ServiceRef{}, false
	}
	return probes.ServiceRef{Namespace: ns, Name: name}, true
}

// chainOf is what a chain's rules do for the graph: the chains they jump to and where they DNAT.
// A DNAT rule without -p is TCP, iptables' default for a port.
func chainOf(rules chainRules) *rulegraph.Chain {
	c := &rulegraph.Chain{}
	for _, hr := range rules {
		r := hr.rule
		switch {
		case r.jump:
			c.Jumps = append(c.Jumps, r.target)
		case r.target == "DNAT" && r.dnat.IsValid():
			proto := r.proto
			if proto == "" {
				proto = "TCP"
			}
			c.DNATs = append(c.DNATs, rulegraph.Target{Dest: r.dnat, Protocol: proto})
		}
	}
	return c
}
