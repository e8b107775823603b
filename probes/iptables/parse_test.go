package iptables

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/google/nftables"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/internal/rulegraph"
)

func readFixture(t testing.TB, name string) map[string][]rule {
	t.Helper()
	f, err := os.Open(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	chains, err := parseSave(f)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return chains
}

// reached runs parsed chains through the graph as the legacy backend's poll does.
func reached(chains map[string][]rule) *rulegraph.State {
	rd := newReader()
	rd.replace(uint8(nftables.TableFamilyIPv4), numbered(chains))
	rd.flush()
	state := rulegraph.NewState()
	rd.g.Publish(state)
	return state
}

// describe lists a state as "Service (or chain) path endpoint", sorted.
func describe(state *rulegraph.State) []string {
	return describeSnapshot(state.Snapshot())
}

func describeSnapshot(snap []probes.ServiceEndpoints) []string {
	var out []string
	for _, se := range snap {
		key := se.Service.String()
		if key == "" {
			key = se.Chain
		}
		for _, ep := range se.Endpoints {
			out = append(out, fmt.Sprintf("%s %s %s", key, se.Path, ep))
		}
	}
	sort.Strings(out)
	return out
}

func TestEndpoints(t *testing.T) {
	for _, tc := range []struct {
		file string
		want []string
	}{
		{"kube-proxy.iptables", []string{
			"default/kubernetes cluster 10.99.0.1:6443/TCP",
			"default/web cluster 10.244.1.3:8080/TCP",
			"default/web cluster 10.244.1.4:8080/TCP",
			"default/web cluster 10.244.2.2:8080/TCP",
		}},
		// Above 1000 endpoints kube-proxy writes no comments: the chains still tell the endpoints,
		// grouped by service chain, the Service unnamed.
		{"kube-proxy-nocomments.iptables", []string{
			"KUBE-SVC-LOLE4ISW44XBNF3G cluster 10.244.1.3:8080/TCP",
			"KUBE-SVC-LOLE4ISW44XBNF3G cluster 10.244.1.4:8080/TCP",
			"KUBE-SVC-LOLE4ISW44XBNF3G cluster 10.244.2.2:8080/TCP",
			"KUBE-SVC-NPX46M4PTMTKRN6Y cluster 10.99.0.1:6443/TCP",
		}},
		{"kube-proxy-ipv6.iptables", []string{
			"shop/web cluster [fd00:10:244:1::5]:8080/TCP",
		}},
		// Traffic policies: default/local's ClusterIP goes to its node-local chain; default/etp's
		// external traffic (NodePort, and the load-balancer IP through its firewall chain) goes to
		// the node-local chain, pod and host sources short-circuited to the cluster-wide one.
		{"kube-proxy-policies.iptables", []string{
			"default/etp cluster 10.244.1.11:8080/TCP",
			"default/etp cluster 10.244.2.11:8080/TCP",
			"default/etp external 10.244.1.11:8080/TCP",
			"default/etp external 10.244.2.11:8080/TCP",
			"default/kubernetes cluster 10.99.0.1:6443/TCP",
			"default/local cluster 10.244.1.9:8080/TCP",
		}},
	} {
		if got := describe(reached(readFixture(t, tc.file))); !slices.Equal(got, tc.want) {
			t.Errorf("%s:\n got %q\nwant %q", tc.file, got, tc.want)
		}
	}
}

// The entry chains are counted, not rebuilt: a service chain stays a root while any entry rule
// jumps to it, named by a rule that names its Service whatever the rules' order, and stops being
// one with the last rule; only then are its endpoints reported removed.
func TestEntryRulesAreCounted(t *testing.T) {
	const fam = uint8(nftables.TableFamilyIPv4)
	named := rule{target: "KUBE-SVC-A", jump: true, comment: "ns/a:http cluster IP"}
	bare := rule{target: "KUBE-SVC-A", jump: true}
	other := rule{target: "KUBE-SVC-B", jump: true, comment: "ns/b cluster IP"}
	ep := func(last byte) rule {
		return rule{target: "DNAT", proto: "TCP", dnat: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, 0, last}), 80)}
	}
	tables := func(entry ...rule) map[string]chainRules {
		return numbered(map[string][]rule{
			"KUBE-SERVICES": entry,
			"KUBE-SVC-A":    {{target: "KUBE-SEP-A", jump: true}},
			"KUBE-SEP-A":    {ep(1)},
			"KUBE-SVC-B":    {ep(2)},
		})
	}
	rd := newReader()
	state := rulegraph.NewState()
	for _, step := range []struct {
		entry   []rule
		state   []string
		removed []string
	}{
		{[]rule{bare, named, other}, []string{"ns/a cluster 10.0.0.1:80/TCP", "ns/b cluster 10.0.0.2:80/TCP"}, nil},
		{[]rule{other, named, bare}, []string{"ns/a cluster 10.0.0.1:80/TCP", "ns/b cluster 10.0.0.2:80/TCP"}, nil},
		{[]rule{bare, other}, []string{"KUBE-SVC-A cluster 10.0.0.1:80/TCP", "ns/b cluster 10.0.0.2:80/TCP"}, []string{"ns/a 10.0.0.1:80/TCP"}},
		{[]rule{other}, []string{"ns/b cluster 10.0.0.2:80/TCP"}, []string{" 10.0.0.1:80/TCP"}},
		{nil, nil, []string{"ns/b 10.0.0.2:80/TCP"}},
	} {
		rd.replace(fam, tables(step.entry...))
		rd.flush()
		var removed []string
		for _, r := range rd.g.Publish(state) {
			removed = append(removed, r.Service.String()+" "+r.Endpoint.String())
		}
		sort.Strings(removed)
		if got := describe(state); !slices.Equal(got, step.state) || !slices.Equal(removed, step.removed) {
			t.Errorf("entry rules %v: state %q, removed %q; want %q, %q", step.entry, got, removed, step.state, step.removed)
		}
	}
	if len(rd.targets[fam]) != 0 {
		t.Errorf("service chains left counted after the last entry rule went: %v", rd.targets[fam])
	}
}

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct{ text, want string }{
		{"*nat\n-A KUBE-SEP-X -p tcp -j DNAT --to-destination 10.0.0.300:80\nCOMMIT\n", `line 2: --to-destination "10.0.0.300:80"`},
		{"*nat\n-A KUBE-SVC-X -m comment --comment \"open\nCOMMIT\n", "line 2: unterminated quote"},
		{"*nat\n-A KUBE-SVC-X -j\nCOMMIT\n", "line 2: -j without a value"},
	} {
		_, err := parseSave(strings.NewReader(tc.text))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want %q", tc.text, err, tc.want)
		}
	}
	// Other tables are not read.
	rules, err := parseSave(strings.NewReader("*filter\n-A X -j DNAT --to-destination nonsense\nCOMMIT\n"))
	if err != nil || len(rules) != 0 {
		t.Errorf("filter table: %v %v", rules, err)
	}
}

func TestSplit(t *testing.T) {
	got, err := split(`-A X -m comment --comment "a \"b\" c" -j Y`)
	want := []string{"-A", "X", "-m", "comment", "--comment", `a "b" c`, "-j", "Y"}
	if err != nil || !slices.Equal(got, want) {
		t.Errorf("split = %q, %v; want %q", got, err, want)
	}
}

func FuzzParseSave(f *testing.F) {
	for _, name := range []string{"kube-proxy.iptables", "kube-proxy-nocomments.iptables", "kube-proxy-ipv6.iptables"} {
		b, err := os.ReadFile(filepath.Join("testdata", name))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(string(b))
	}
	f.Fuzz(func(t *testing.T, text string) {
		chains, err := parseSave(strings.NewReader(text))
		if err != nil {
			return
		}
		for _, se := range reached(chains).Snapshot() {
			if se.Service.Name == "" && se.Chain == "" {
				t.Error("a group without a Service or chain")
			}
			for _, ep := range se.Endpoints {
				if !ep.Addr.IsValid() || ep.Protocol == "" {
					t.Errorf("invalid endpoint %+v", ep)
				}
			}
		}
	})
}

// A chain's rules stay in handle order whatever order they are added, replaced and deleted in.
func TestChainRulesKeepHandleOrder(t *testing.T) {
	r := func(target string) rule { return rule{target: target, jump: true} }
	var c chainRules
	for _, h := range []uint64{5, 2, 9} {
		c = c.with(h, r(fmt.Sprint("KUBE-SEP-", h)))
	}
	c = c.with(2, r("KUBE-SEP-2b"))
	var ok bool
	if c, ok = c.without(5); !ok {
		t.Error("handle 5 was not found")
	}
	if _, ok = c.without(7); ok {
		t.Error("handle 7, never added, was found")
	}
	got := fmt.Sprint(c)
	if want := fmt.Sprint(chainRules{{2, r("KUBE-SEP-2b")}, {9, r("KUBE-SEP-9")}}); got != want {
		t.Errorf("chain %s, want %s", got, want)
	}
	if got := byHandle([]handleRule{{9, r("b")}, {2, r("a")}}); got[0].handle != 2 || got[1].handle != 9 {
		t.Errorf("byHandle = %v, want handles 2, 9", got)
	}
}
