package iptables

import (
	"bufio"
	"fmt"
	"io"
	"net/netip"
	"strings"

	"github.com/endpointlag/endpointlag/probes"
)

// rule is the part of one `-A` line of iptables-save that decides where a packet goes.
type rule struct {
	chain   string
	target  string // -j or -g
	proto   string // -p, upper case
	dnat    netip.AddrPort
	comment string
}

// parseSave reads the nat table of `iptables-save` output. Lines it does not need (chain
// declarations, other tables, COMMIT) are skipped; a malformed -A line is an error naming it.
func parseSave(r io.Reader) ([]rule, error) {
	var out []rule
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 16*1024*1024)
	inNat := false
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "*"):
			inNat = line == "*nat"
		case inNat && strings.HasPrefix(line, "-A "):
			ru, err := parseRule(line)
			if err != nil {
				return nil, fmt.Errorf("line %d: %w", n, err)
			}
			out = append(out, ru)
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

// rootChains are kube-proxy's entry chains; a KUBE-SVC-/SVL-/EXT- chain they no longer jump to
// is stale.
var rootChains = []string{"KUBE-SERVICES", "KUBE-NODEPORTS"}

// serviceChain reports whether a chain is one of kube-proxy's per-service-port chains.
func serviceChain(name string) bool {
	for _, p := range []string{"KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-"} {
		if strings.HasPrefix(name, p) {
			return true
		}
	}
	return false
}

// serviceFromComment reads kube-proxy's comment on a KUBE-SERVICES rule: "ns/svc:port cluster
// IP" or "ns/svc cluster IP" (unnamed port). Above 1000 endpoints kube-proxy writes no comments.
func serviceFromComment(c string) (probes.ServiceRef, bool) {
	word, _, _ := strings.Cut(c, " ")
	word, _, _ = strings.Cut(word, ":")
	ns, name, ok := strings.Cut(word, "/")
	if !ok || ns == "" || name == "" || strings.Contains(name, "/") {
		return probes.ServiceRef{}, false
	}
	return probes.ServiceRef{Namespace: ns, Name: name}, true
}

// group is what one Service (or, when the rules name none, one service chain) sends to.
type group struct {
	service   probes.ServiceRef
	endpoints map[probes.Endpoint]bool
}

// endpoints works out, from the nat table's rules, the endpoints each Service's chains reachable
// from the entry chains can DNAT to. Services are named from the entry rules' comments; without
// comments each entry target is a group of its own, keyed by the chain's name.
func endpoints(rules []rule) map[string]*group {
	byChain := map[string][]rule{}
	for _, r := range rules {
		byChain[r.chain] = append(byChain[r.chain], r)
	}
	out := map[string]*group{}
	for _, root := range rootChains {
		for _, entry := range byChain[root] {
			if !serviceChain(entry.target) {
				continue
			}
			svc, named := serviceFromComment(entry.comment)
			key := entry.target
			if named {
				key = svc.String()
			}
			g := out[key]
			if g == nil {
				g = &group{service: svc, endpoints: map[probes.Endpoint]bool{}}
				out[key] = g
			}
			walk(byChain, entry.target, g.endpoints)
		}
	}
	return out
}

func walk(byChain map[string][]rule, start string, into map[probes.Endpoint]bool) {
	seen := map[string]bool{}
	stack := []string{start}
	for len(stack) > 0 {
		c := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		if seen[c] {
			continue
		}
		seen[c] = true
		for _, r := range byChain[c] {
			if r.target == "DNAT" && r.dnat.IsValid() {
				proto := r.proto
				if proto == "" {
					proto = "TCP"
				}
				into[probes.Endpoint{Addr: r.dnat.Addr().Unmap(), Port: r.dnat.Port(), Protocol: proto}] = true
				continue
			}
			if _, ok := byChain[r.target]; ok {
				stack = append(stack, r.target)
			}
		}
	}
}
