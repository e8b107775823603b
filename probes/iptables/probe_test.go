package iptables

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"
	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/internal/nfmon"
	"github.com/endpointlag/endpointlag/probes/internal/probetest"
	"github.com/endpointlag/endpointlag/probes/internal/proxymode"
)

const nsPrefix = "eltest-ipt-"

func restore(t *testing.T, ns string, backend Backend, file string) {
	t.Helper()
	restoreWith(t, ns, file, "iptables-"+string(backend)+"-restore", "--noflush")
}

// restoreWith loads a testdata file into the namespace with a restore command and its flags.
func restoreWith(t *testing.T, ns, file string, command ...string) {
	t.Helper()
	in, err := os.Open(filepath.Join("testdata", file))
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns}, command...)...)
	cmd.Stdin = in
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v: %s", command[0], file, err, out)
	}
}

// inNamespace points the probe at the network namespace open as fd.
func inNamespace(p *Probe, fd *os.File) {
	p.netns, p.nsfd = []nftables.ConnOption{nftables.WithNetNSFd(int(fd.Fd()))}, int(fd.Fd())
}

// removed returns the removals recorded, with their precision, sorted.
func removed(r *probetest.Recorder) []string {
	var out []string
	for _, o := range r.Observations() {
		out = append(out, fmt.Sprintf("%s %s %s %s", o.Service, o.Path, o.Endpoint, o.Precision))
	}
	sort.Strings(out)
	return out
}

// kube-proxy-shaped rules in a throwaway namespace, both backends: the probe finds the backend,
// reads what each Service reaches and reports exactly what each restore removes; the legacy
// backend's removals carry the poll interval as their precision.
func TestProbeFollowsKubeProxyRules(t *testing.T) {
	for _, backend := range []Backend{BackendNFT, BackendLegacy} {
		t.Run(string(backend), func(t *testing.T) {
			ns, fd := probetest.Netns(t, nsPrefix+string(backend)+"-", "iptables-"+string(backend)+"-restore", "iptables-"+string(backend)+"-save")
			restore(t, ns, backend, "kube-proxy.iptables")
			p := New(Options{PollInterval: 50 * time.Millisecond}, clock.RealClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
			p.run = func(ctx context.Context, name string, args ...string) ([]byte, error) {
				return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns, name}, args...)...).Output()
			}
			inNamespace(p, fd)
			if got, err := p.Detect(context.Background()); got != backend || err != nil {
				t.Fatalf("Detect = %q, %v; want %q", got, err, backend)
			}
			rec, _ := probetest.Run(t, p)
			rec.Wait(t, "the first read", func() bool { return p.reads.Load() > 0 })

			precision := "0s"
			if backend == BackendLegacy {
				precision = "50ms"
			}
			steps := []struct {
				file string
				want []string
			}{
				{"remove-web-endpoint.iptables", []string{"default/web cluster 10.244.1.4:8080/TCP " + precision}},
				{"remove-kubernetes-service.iptables", []string{"default/kubernetes cluster 10.99.0.1:6443/TCP " + precision, "default/web cluster 10.244.1.4:8080/TCP " + precision}},
			}
			for _, s := range steps {
				restore(t, ns, backend, s.file)
				rec.Wait(t, s.file, func() bool { return len(removed(rec)) >= len(s.want) })
				// One more read shows nothing else is reported.
				reads := p.reads.Load()
				if backend == BackendLegacy {
					rec.Wait(t, "another poll", func() bool { return p.reads.Load() > reads+1 })
				}
				if got := removed(rec); !slices.Equal(got, s.want) {
					t.Errorf("after %s, removals:\n got %q\nwant %q", s.file, got, s.want)
				}
			}
			snap, err := p.Snapshot(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, se := range snap {
				for _, ep := range se.Endpoints {
					got = append(got, se.Service.String()+" "+ep.String())
				}
			}
			want := []string{"default/web 10.244.1.3:8080/TCP", "default/web 10.244.2.2:8080/TCP"}
			if !slices.Equal(got, want) {
				t.Errorf("Snapshot = %q, want %q", got, want)
			}
			if errs := rec.Errors(); len(errs) > 0 {
				t.Errorf("errors: %v", errs)
			}
		})
	}
}

// Each fixture loaded with iptables-nft-restore (ip6tables-nft-restore for IPv6) reads the same
// over netlink as its iptables-save text does through the parser: comments, no comments, IPv6.
func TestNetlinkReadMatchesSaveText(t *testing.T) {
	for _, tc := range []struct{ file, restore string }{
		{"kube-proxy.iptables", "iptables-nft-restore"},
		{"kube-proxy-nocomments.iptables", "iptables-nft-restore"},
		{"kube-proxy-ipv6.iptables", "ip6tables-nft-restore"},
		{"kube-proxy-policies.iptables", "iptables-nft-restore"},
	} {
		t.Run(tc.file, func(t *testing.T) {
			ns, fd := probetest.Netns(t, nsPrefix+"read-", tc.restore)
			restoreWith(t, ns, tc.file, tc.restore)
			p := New(Options{}, clock.RealClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
			inNamespace(p, fd)
			p.run = func(context.Context, string, ...string) ([]byte, error) {
				return nil, errors.New("the legacy backend is not expected here")
			}
			snap, err := p.Snapshot(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			got := describeSnapshot(snap)
			want := describe(reached(readFixture(t, tc.file)))
			if len(want) == 0 || !slices.Equal(got, want) {
				t.Errorf("netlink read:\n got %q\nwant %q", got, want)
			}
		})
	}
}

// largeChange is one restore that removes the web endpoint among 2,000 rules in 500 unrelated
// chains: more changes than the monitor hands over at once, more bytes than a 4 KiB buffer holds.
func largeChange(t *testing.T, ns string) {
	t.Helper()
	web, err := os.ReadFile(filepath.Join("testdata", "remove-web-endpoint.iptables"))
	if err != nil {
		t.Fatal(err)
	}
	_, body, _ := strings.Cut(string(web), "*nat\n")
	body, _, _ = strings.Cut(body, "COMMIT\n")
	var s strings.Builder
	s.WriteString("*nat\n")
	for i := range 500 {
		fmt.Fprintf(&s, ":FILLER-%d - [0:0]\n", i)
	}
	s.WriteString(body)
	for i := range 500 {
		for range 4 {
			fmt.Fprintf(&s, "-A FILLER-%d -m comment --comment \"filler rule to overflow the monitor's receive buffer\" -j RETURN\n", i)
		}
	}
	s.WriteString("COMMIT\n")
	cmd := exec.Command("ip", "netns", "exec", ns, "iptables-nft-restore", "--noflush")
	cmd.Stdin = strings.NewReader(s.String())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("restore: %v: %s", err, out)
	}
}

// A generation of more changes than nfmon.Chunk comes in parts, which the probe applies as they
// arrive; what it removed is reported once, after the last part.
func TestLargeGenerationIsAppliedInParts(t *testing.T) {
	ns, fd := probetest.Netns(t, nsPrefix+"parts-", "iptables-nft-restore")
	restore(t, ns, BackendNFT, "kube-proxy.iptables")
	p := New(Options{}, clock.RealClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	inNamespace(p, fd)
	rec, _ := probetest.Run(t, p)
	reads := func() int64 { return p.reads.Load() }
	rec.Wait(t, "the first read", func() bool { return reads() > 0 })
	before := reads()
	largeChange(t, ns)
	want := []string{"default/web cluster 10.244.1.4:8080/TCP 0s"}
	rec.Wait(t, "the removal", func() bool { return len(removed(rec)) >= len(want) })
	if got := removed(rec); !slices.Equal(got, want) {
		t.Errorf("removals:\n got %q\nwant %q", got, want)
	}
	if n := reads() - before; n != 1 {
		t.Errorf("the generation was published %d times, want once", n)
	}
	if errs := rec.Errors(); len(errs) != 0 {
		t.Errorf("errors: %v", errs)
	}
}

// When the kernel drops monitor messages (a change larger than the socket's receive buffer), the
// probe says so, opens a new monitor, reads the tables whole and still reports the removal.
func TestLostMessagesAreRecovered(t *testing.T) {
	ns, fd := probetest.Netns(t, nsPrefix+"lost-", "iptables-nft-restore")
	restore(t, ns, BackendNFT, "kube-proxy.iptables")
	// Restored after the probe stops: cleanups run last-registered first.
	saved := nfmon.ReceiveBuffer
	t.Cleanup(func() { nfmon.ReceiveBuffer = saved })
	nfmon.ReceiveBuffer = 4096
	p := New(Options{}, clock.RealClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	inNamespace(p, fd)
	rec, _ := probetest.Run(t, p)
	rec.Wait(t, "the first read", func() bool { return p.reads.Load() > 0 })
	// The monitor reads nothing while the change is notified, so the kernel drops what the small
	// buffer cannot hold (CI once saw a reader keep up with it).
	release := nfmon.HoldReceiving()
	t.Cleanup(release)
	largeChange(t, ns)
	release()
	rec.Wait(t, "the removal", func() bool { return len(rec.Observations()) > 0 })
	obs := rec.Observations()
	if len(obs) != 1 || obs[0].Endpoint.String() != "10.244.1.4:8080/TCP" || obs[0].Service.String() != "default/web" {
		t.Errorf("removals %+v, want default/web's 10.244.1.4:8080/TCP", obs)
	}
	// Found by reading the tables whole after the gap: flagged, with the gap as precision.
	if len(obs) == 1 && (!obs[0].Relist || obs[0].Precision <= 0) {
		t.Errorf("a removal found after lost messages is not flagged as such: %+v", obs[0])
	}
	if errs := rec.Errors(); len(errs) == 0 || !strings.Contains(errors.Join(errs...).Error(), "no buffer space") {
		t.Errorf("errors %v, want the kernel's lost-message error", errs)
	}
}

// Both backends: a terminating endpoint that the node-local chain keeps (externalTrafficPolicy
// Local, no ready endpoint left on this node) but the cluster-wide chain drops is removed from
// the ClusterIP path only, and Reaches says which paths and policies still reach it.
func TestPathsAreJudgedApart(t *testing.T) {
	for _, backend := range []Backend{BackendNFT, BackendLegacy} {
		t.Run(string(backend), func(t *testing.T) {
			ns, fd := probetest.Netns(t, nsPrefix+"paths-"+string(backend)+"-", "iptables-"+string(backend)+"-restore", "iptables-"+string(backend)+"-save")
			restore(t, ns, backend, "kube-proxy-policies.iptables")
			p := New(Options{PollInterval: 50 * time.Millisecond}, clock.RealClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
			p.run = func(ctx context.Context, name string, args ...string) ([]byte, error) {
				return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns, name}, args...)...).Output()
			}
			inNamespace(p, fd)
			rec, _ := probetest.Run(t, p)
			rec.Wait(t, "the first read", func() bool { return p.reads.Load() > 0 })
			etp := probes.ServiceRef{Namespace: "default", Name: "etp"}
			local := probes.Endpoint{Addr: netip.MustParseAddr("10.244.1.11"), Port: 8080, Protocol: "TCP"}
			reach, ok := p.Reaches(etp, local)
			slices.SortFunc(reach, func(a, b probes.Reach) int { return strings.Compare(string(a.Path), string(b.Path)) })
			if want := []probes.Reach{
				{Path: probes.PathCluster, Policy: probes.Policy{Cluster: true}},
				{Path: probes.PathExternal, Policy: probes.Policy{Cluster: true, Local: true}},
			}; !ok || !slices.Equal(reach, want) {
				t.Errorf("Reaches(default/etp, %s) = %+v, %v; want %+v", local, reach, ok, want)
			}
			if reach, _ := p.Reaches(probes.ServiceRef{Namespace: "default", Name: "local"}, probes.Endpoint{Addr: netip.MustParseAddr("10.244.2.9"), Port: 8080, Protocol: "TCP"}); len(reach) != 0 {
				t.Errorf("default/local's remote endpoint is reached: %+v", reach)
			}
			restore(t, ns, backend, "terminate-etp-endpoint.iptables")
			rec.Wait(t, "the removal", func() bool { return len(rec.Observations()) > 0 })
			if backend == BackendLegacy {
				reads := p.reads.Load()
				rec.Wait(t, "another poll", func() bool { return p.reads.Load() > reads+1 })
			}
			obs := rec.Observations()
			if len(obs) != 1 || obs[0].Path != probes.PathCluster || obs[0].Endpoint != local || obs[0].Service != etp {
				t.Errorf("removals %+v, want default/etp's %s on the cluster path only", obs, local)
			}
			if st := rec.Status(); st.Inactive || !st.Up {
				t.Errorf("status %+v, want active and up", st)
			}
		})
	}
}

// kube-proxy's IPVS mode makes KUBE-SERVICES too, but no service chain: the probe reads the
// table and stays inactive (nothing awaited) until service chains appear; and when kube-proxy
// answers that it runs another mode, it stays inactive even then.
func TestIPVSModeTableIsNotIptablesMode(t *testing.T) {
	for _, backend := range []Backend{BackendNFT, BackendLegacy} {
		t.Run(string(backend), func(t *testing.T) {
			ns, fd := probetest.Netns(t, nsPrefix+"ipvs-"+string(backend)+"-", "iptables-"+string(backend)+"-restore", "iptables-"+string(backend)+"-save")
			restore(t, ns, backend, "kube-proxy-ipvs.iptables")
			mode := "ipvs"
			var modeMu sync.Mutex
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
				modeMu.Lock()
				defer modeMu.Unlock()
				fmt.Fprint(w, mode)
			}))
			defer srv.Close()
			p := New(Options{PollInterval: 50 * time.Millisecond}, clock.RealClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
			p.KubeProxy = proxymode.Asker{URL: srv.URL}
			p.run = func(ctx context.Context, name string, args ...string) ([]byte, error) {
				return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns, name}, args...)...).Output()
			}
			inNamespace(p, fd)
			rec, _ := probetest.Run(t, p)
			rec.Wait(t, "the first read", func() bool { return p.reads.Load() > 0 })
			if st := rec.Status(); !st.Inactive || !st.Synced {
				t.Errorf("IPVS mode's nat table: status %+v, want synced and inactive", st)
			}
			// Service chains appear (left by an earlier iptables mode, say) while kube-proxy says
			// it runs IPVS: still inactive.
			restore(t, ns, backend, "kube-proxy.iptables")
			rec.Wait(t, "the service chains", func() bool { s, _ := p.Snapshot(context.Background()); return len(s) > 0 })
			if backend == BackendLegacy {
				reads := p.reads.Load()
				rec.Wait(t, "another poll", func() bool { return p.reads.Load() > reads+1 })
			}
			if st := rec.Status(); !st.Inactive {
				t.Errorf("kube-proxy says ipvs, yet the probe is active: %+v", st)
			}
		})
	}
}

// Without the privilege to read the nat table the probe says so (an error, counted) instead of
// looking healthy and inactive.
func TestDetectReportsWhatItCannotRead(t *testing.T) {
	p := New(Options{}, clock.RealClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	p.legacyNAT = func() (bool, error) { return true, nil }
	p.run = func(context.Context, string, ...string) ([]byte, error) {
		return nil, errors.New("iptables-legacy-save: Permission denied (you must be root)")
	}
	if _, err := p.Detect(context.Background()); err == nil || !strings.Contains(err.Error(), "Permission denied") {
		t.Errorf("Detect error %v, want the save command's failure", err)
	}
	p.run = func(context.Context, string, ...string) ([]byte, error) { return nil, exec.ErrNotFound }
	if os.Geteuid() == 0 {
		if _, err := p.Detect(context.Background()); err != nil {
			t.Errorf("no legacy iptables installed is not an error: %v", err)
		}
	}
}

// On a node without legacy rules (kube-proxy in nftables mode or not started yet) Detect does not
// run iptables-legacy-save at every poll: the namespace's list of x_tables tables has no nat
// table. Once kube-proxy's legacy chains exist, it finds them.
func TestDetectRunsLegacySaveOnlyWithANatTable(t *testing.T) {
	ns, fd := probetest.Netns(t, nsPrefix+"nolegacy-", "iptables-legacy", "iptables-legacy-save")
	p := New(Options{}, clock.RealClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	inNamespace(p, fd)
	var saves int
	p.run = func(ctx context.Context, name string, args ...string) ([]byte, error) {
		saves++
		return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns, name}, args...)...).Output()
	}
	for range 3 {
		if b, err := p.Detect(context.Background()); b != "" || err != nil {
			t.Fatalf("an empty namespace: Detect = %q, %v", b, err)
		}
	}
	if saves != 0 {
		t.Errorf("without a legacy nat table, Detect ran iptables-legacy-save %d times", saves)
	}
	if nat, err := p.hasLegacyNAT(); nat || err != nil {
		t.Errorf("an empty namespace: hasLegacyNAT = %v, %v", nat, err)
	}
	if out, err := exec.Command("ip", "netns", "exec", ns, "iptables-legacy", "-t", "nat", "-N", rootChains[0]).CombinedOutput(); err != nil {
		t.Fatalf("iptables-legacy -N %s: %v: %s", rootChains[0], err, out)
	}
	if nat, err := p.hasLegacyNAT(); !nat || err != nil {
		t.Errorf("with kube-proxy's chain in the legacy nat table: hasLegacyNAT = %v, %v", nat, err)
	}
	if b, err := p.Detect(context.Background()); b != BackendLegacy || err != nil || saves != 1 {
		t.Errorf("with kube-proxy's chain in the legacy nat table: Detect = %q, %v after %d saves; want legacy after 1", b, err, saves)
	}
}

// The raw monitor's rules decode to what google/nftables reads back for the same handles, for
// every rule of a kube-proxy restore (comments, statistic, DNAT targets, jumps, IPv4 and IPv6).
func TestRawMonitorDecodesAsReadBack(t *testing.T) {
	for _, tc := range []struct{ file, restore string }{
		{"kube-proxy.iptables", "iptables-nft-restore"},
		{"kube-proxy-ipv6.iptables", "ip6tables-nft-restore"},
	} {
		t.Run(tc.file, func(t *testing.T) {
			ns, fd := probetest.Netns(t, nsPrefix+"raw-", tc.restore)
			mon, err := nfmon.OpenRaw(int(fd.Fd()))
			if err != nil {
				t.Fatal(err)
			}
			defer mon.Close()
			restoreWith(t, ns, tc.file, tc.restore)
			conn, err := nftables.New(nftables.WithNetNSFd(int(fd.Fd())))
			if err != nil {
				t.Fatal(err)
			}
			readBack := map[string]rule{}
			total := 0
			chains, err := conn.ListChains()
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range chains {
				rules, err := conn.GetRules(c.Table, c)
				if err != nil {
					t.Fatal(err)
				}
				for _, r := range rules {
					readBack[fmt.Sprint(c.Name, r.Handle)] = ruleFromExprs(c.Name, r.Exprs)
					total++
				}
			}
			n := 0
			deadline := time.After(5 * time.Second)
			for n < total {
				select {
				case gen := <-mon.Generations:
					if gen.Err != nil {
						t.Fatal(gen.Err)
					}
					for _, c := range gen.Changes {
						if c.Type != unix.NFT_MSG_NEWRULE {
							continue
						}
						exprs, err := nfmon.DecodeExprs(c.Family, c.Exprs)
						if err != nil {
							t.Fatal(err)
						}
						got, want := ruleFromExprs(c.Chain, exprs), readBack[fmt.Sprint(c.Chain, c.Handle)]
						if got != want {
							t.Errorf("%s rule %d: raw %+v, read back %+v", c.Chain, c.Handle, got, want)
						}
						n++
					}
				case <-deadline:
					t.Fatalf("%d of %d rules seen", n, total)
				}
			}
			if total < 5 {
				t.Errorf("only %d rules: the fixture did not load", total)
			}
		})
	}
}

// A failed read (iptables-legacy-save failing while the table is replaced, say) takes the probe
// down; the next good read brings it up again.
func TestUpAgainAfterAFailedRead(t *testing.T) {
	text, err := os.ReadFile(filepath.Join("testdata", "kube-proxy.iptables"))
	if err != nil {
		t.Fatal(err)
	}
	// An empty namespace: the nf_tables backend finds nothing, the legacy one is the fake below.
	_, fd := probetest.Netns(t, nsPrefix+"up-")
	var (
		mu    sync.Mutex
		calls int
	)
	p := New(Options{PollInterval: 20 * time.Millisecond}, clock.RealClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	inNamespace(p, fd)
	p.legacyNAT = func() (bool, error) { return true, nil }
	p.run = func(_ context.Context, name string, _ ...string) ([]byte, error) {
		if name != legacySave[0] {
			return nil, nil
		}
		mu.Lock()
		defer mu.Unlock()
		calls++
		if calls == 4 {
			return nil, errors.New("iptables-legacy-save: the table changed while it was read")
		}
		return text, nil
	}
	rec, _ := probetest.Run(t, p)
	rec.Wait(t, "the failed read", func() bool { return len(rec.Errors()) > 0 })
	rec.Wait(t, "up again", rec.Up)
	if st := rec.Status(); st.Inactive {
		t.Errorf("status %+v, want active", st)
	}
}
