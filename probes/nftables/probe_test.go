package nftables

import (
	"errors"
	"io"
	"log/slog"
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

	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/internal/nfmon"
	"github.com/endpointlag/endpointlag/probes/internal/probetest"
)

// nsPrefix names the throwaway namespaces of these tests; leftovers of a crashed run are removed.
const nsPrefix = "eltest-nft-"

func nft(t *testing.T, ns, file string) {
	t.Helper()
	if out, err := exec.Command("ip", "netns", "exec", ns, "nft", "-f", filepath.Join("testdata", file)).CombinedOutput(); err != nil {
		t.Fatalf("nft -f %s: %v: %s", file, err, out)
	}
}

// removed returns the removals recorded, as "ns/svc path ip:port/proto", sorted.
func removed(r *probetest.Recorder) []string {
	var out []string
	for _, o := range r.Observations() {
		out = append(out, o.Service.String()+" "+string(o.Path)+" "+o.Endpoint.String())
	}
	sort.Strings(out)
	return out
}

func snapshot(t *testing.T, p *Probe) []string {
	t.Helper()
	all, err := p.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, se := range all {
		for _, ep := range se.Endpoints {
			out = append(out, se.Service.String()+" "+string(se.Path)+" "+ep.String())
		}
	}
	sort.Strings(out)
	return out
}

// kube-proxy-shaped rules in a throwaway namespace: the probe reads what each Service reaches,
// ignores stale chains, and reports exactly the endpoints that each change removes.
func TestProbeFollowsKubeProxyRules(t *testing.T) {
	ns, fd := probetest.Netns(t, nsPrefix, "nft")
	nft(t, ns, "kube-proxy.nft")
	p := NewInNamespace(int(fd.Fd()), clock.RealClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	rec, _ := probetest.Run(t, p)
	rec.Wait(t, "sync", rec.Synced)

	want := []string{
		"default/kubernetes cluster 10.99.0.1:6443/TCP",
		"shop/etp cluster 10.244.1.11:8080/TCP",
		"shop/etp cluster 10.244.2.11:8080/TCP",
		"shop/etp external 10.244.1.11:8080/TCP",
		"shop/etp external 10.244.2.11:8080/TCP",
		"shop/local cluster 10.244.1.9:8080/TCP",
		"shop/sticky cluster 10.244.1.7:80/TCP",
		"shop/sticky cluster 10.244.2.7:80/TCP",
		"shop/web cluster 10.244.1.3:8080/TCP",
		"shop/web cluster 10.244.1.4:8080/TCP",
		"shop/web cluster 10.244.2.2:8080/TCP",
		"shop/web cluster [fd00:10:244:1::5]:8080/TCP",
		"shop/web cluster [fd00:10:244:2::6]:8080/TCP",
		"shop/web external 10.244.1.3:8080/TCP",
		"shop/web external 10.244.1.4:8080/TCP",
		"shop/web external 10.244.2.2:8080/TCP",
	}
	if got := snapshot(t, p); !slices.Equal(got, want) {
		t.Fatalf("initial endpoints:\n got %q\nwant %q", got, want)
	}
	if len(removed(rec)) != 0 || len(rec.Errors()) != 0 {
		t.Fatalf("the first read reported removals %q, errors %v", removed(rec), rec.Errors())
	}
	// The ClusterIP path of shop/etp reaches its endpoints through the cluster-wide chain; the
	// external path reaches this node's endpoint through both (pod and host sources
	// short-circuit to the cluster-wide chain) and the other node's through the cluster-wide one.
	etp := probes.ServiceRef{Namespace: "shop", Name: "etp"}
	local := probes.Endpoint{Addr: netip.MustParseAddr("10.244.1.11"), Port: 8080, Protocol: "TCP"}
	reach, ok := p.Reaches(etp, local)
	slices.SortFunc(reach, func(a, b probes.Reach) int { return strings.Compare(string(a.Path), string(b.Path)) })
	if wantReach := []probes.Reach{
		{Path: probes.PathCluster, Policy: probes.Policy{Cluster: true}},
		{Path: probes.PathExternal, Policy: probes.Policy{Cluster: true, Local: true}},
	}; !ok || !slices.Equal(reach, wantReach) {
		t.Errorf("Reaches(shop/etp, %s) = %+v, %v; want %+v", local, reach, ok, wantReach)
	}
	if reach, _ := p.Reaches(probes.ServiceRef{Namespace: "shop", Name: "local"}, probes.Endpoint{Addr: netip.MustParseAddr("10.244.2.9"), Port: 8080, Protocol: "TCP"}); len(reach) != 0 {
		t.Errorf("shop/local's remote endpoint is reached: %+v", reach)
	}

	steps := []struct {
		file string
		want []string // every removal reported so far
	}{
		{"remove-web-endpoint.nft", []string{"shop/web cluster 10.244.1.4:8080/TCP", "shop/web external 10.244.1.4:8080/TCP"}},
		{"remove-sticky-endpoint.nft", []string{"shop/sticky cluster 10.244.1.7:80/TCP", "shop/web cluster 10.244.1.4:8080/TCP", "shop/web external 10.244.1.4:8080/TCP"}},
		// The stale endpoint chain goes a sync later: nothing more is removed.
		{"delete-stale-chain.nft", []string{"shop/sticky cluster 10.244.1.7:80/TCP", "shop/web cluster 10.244.1.4:8080/TCP", "shop/web external 10.244.1.4:8080/TCP"}},
		{"remove-kubernetes-service.nft", []string{"default/kubernetes cluster 10.99.0.1:6443/TCP", "shop/sticky cluster 10.244.1.7:80/TCP", "shop/web cluster 10.244.1.4:8080/TCP", "shop/web external 10.244.1.4:8080/TCP"}},
		// The external path still reaches the endpoint through the local chain: only the
		// ClusterIP path's removal is reported.
		{"terminate-etp-endpoint.nft", []string{"default/kubernetes cluster 10.99.0.1:6443/TCP", "shop/etp cluster 10.244.1.11:8080/TCP", "shop/sticky cluster 10.244.1.7:80/TCP", "shop/web cluster 10.244.1.4:8080/TCP", "shop/web external 10.244.1.4:8080/TCP"}},
		{"remove-local-endpoint.nft", []string{"default/kubernetes cluster 10.99.0.1:6443/TCP", "shop/etp cluster 10.244.1.11:8080/TCP", "shop/local cluster 10.244.1.9:8080/TCP", "shop/sticky cluster 10.244.1.7:80/TCP", "shop/web cluster 10.244.1.4:8080/TCP", "shop/web external 10.244.1.4:8080/TCP"}},
	}
	for _, s := range steps {
		gens, reads := p.generations.Load(), p.setReads.Load()
		nft(t, ns, s.file)
		rec.Wait(t, s.file, func() bool { return p.generations.Load() > gens })
		if got := removed(rec); !slices.Equal(got, s.want) {
			t.Errorf("after %s, removals:\n got %q\nwant %q", s.file, got, s.want)
		}
		// A rewritten service chain's DNAT map is created in the same transaction: its elements
		// come from the monitor, not from reading the set back.
		if n := p.setReads.Load() - reads; n != 0 {
			t.Errorf("after %s, %d sets read back", s.file, n)
		}
	}
	for _, o := range rec.Observations() {
		if o.Stage != probes.StageNftables || o.Source != Name || o.Pod.UID != "" || o.Time.IsZero() {
			t.Errorf("observation %+v", o)
		}
	}
	if errs := rec.Errors(); len(errs) != 0 {
		t.Errorf("errors: %v", errs)
	}
}

// When the kernel drops monitor messages (a change larger than the socket's receive buffer), the
// probe says so, opens a new monitor, reads the tables whole and still reports the removal.
func TestLostMessagesAreRecovered(t *testing.T) {
	ns, fd := probetest.Netns(t, nsPrefix+"lost-", "nft")
	nft(t, ns, "kube-proxy.nft")
	// Restored after the probe stops: cleanups run last-registered first.
	saved := nfmon.ReceiveBuffer
	t.Cleanup(func() { nfmon.ReceiveBuffer = saved })
	nfmon.ReceiveBuffer = 4096
	p := NewInNamespace(int(fd.Fd()), clock.RealClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	rec, _ := probetest.Run(t, p)
	rec.Wait(t, "sync", rec.Synced)

	// One transaction: a chain of 20,000 commented rules (megabytes of notifications, where the
	// buffer holds 8 KiB), and the web endpoint gone.
	change, err := os.ReadFile(filepath.Join("testdata", "remove-web-endpoint.nft"))
	if err != nil {
		t.Fatal(err)
	}
	var s strings.Builder
	s.WriteString("add chain ip kube-proxy filler\n")
	for range 20000 {
		s.WriteString("add rule ip kube-proxy filler counter return comment \"filler rule to overflow the monitor's receive buffer\"\n")
	}
	s.Write(change)
	// The monitor reads nothing while the change is notified: the kernel drops for certain.
	release := nfmon.HoldReceiving()
	t.Cleanup(release)
	cmd := exec.Command("ip", "netns", "exec", ns, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(s.String())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v: %s", err, out)
	}
	release()
	want := []string{"shop/web cluster 10.244.1.4:8080/TCP", "shop/web external 10.244.1.4:8080/TCP"}
	rec.Wait(t, "the removal", func() bool { return len(removed(rec)) >= len(want) })
	if got := removed(rec); !slices.Equal(got, want) {
		t.Errorf("removals:\n got %q\nwant %q", got, want)
	}
	if errs := rec.Errors(); len(errs) == 0 || !strings.Contains(errors.Join(errs...).Error(), "no buffer space") {
		t.Errorf("errors %v, want the kernel's lost-message error", errs)
	}
	// Found by reading the tables whole after the gap: flagged, with the gap as precision.
	for _, o := range rec.Observations() {
		if !o.Relist || o.Precision <= 0 {
			t.Errorf("a removal found after lost messages is not flagged as such: %+v", o)
		}
	}
}

// A removal is timestamped when the kernel's message was read, not when the probe got to it: a
// generation that takes long to apply (kube-proxy's periodic full sync) does not make the next
// one look late.
func TestBacklogDoesNotDelayTimestamps(t *testing.T) {
	ns, fd := probetest.Netns(t, nsPrefix+"backlog-", "nft")
	nft(t, ns, "kube-proxy.nft")
	p := NewInNamespace(int(fd.Fd()), clock.RealClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	var (
		mu      sync.Mutex
		slowEnd time.Time
	)
	p.beforeApply = func(changes []nfmon.RawChange) {
		for _, c := range changes {
			if c.Chain == "filler" {
				// The generation that made the filler chain is slow to apply; the next
				// one, removing an endpoint, waits behind it.
				time.Sleep(500 * time.Millisecond)
				mu.Lock()
				slowEnd = time.Now()
				mu.Unlock()
				return
			}
		}
	}
	rec, _ := probetest.Run(t, p)
	rec.Wait(t, "sync", rec.Synced)
	cmd := exec.Command("ip", "netns", "exec", ns, "nft", "add chain ip kube-proxy filler")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v: %s", err, out)
	}
	nft(t, ns, "remove-web-endpoint.nft")
	rec.Wait(t, "the removal", func() bool { return len(removed(rec)) >= 2 })
	mu.Lock()
	defer mu.Unlock()
	for _, o := range rec.Observations() {
		if !o.Time.Before(slowEnd) {
			t.Errorf("the removal is stamped %s, after the slow generation before it was applied (%s): stamped when dequeued",
				o.Time.Format("15:04:05.000"), slowEnd.Format("15:04:05.000"))
		}
	}
}

// A panic while applying a generation (data of a shape the decoders do not expect) is recovered,
// counted as a panic, and the probe reads the tables whole: the removal is still reported.
func TestPanicWhileDecodingIsRecovered(t *testing.T) {
	ns, fd := probetest.Netns(t, nsPrefix+"panic-", "nft")
	nft(t, ns, "kube-proxy.nft")
	p := NewInNamespace(int(fd.Fd()), clock.RealClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	var once sync.Once
	p.beforeApply = func([]nfmon.RawChange) { once.Do(func() { panic("an unexpected message") }) }
	rec, _ := probetest.Run(t, p)
	rec.Wait(t, "sync", rec.Synced)
	nft(t, ns, "remove-web-endpoint.nft")
	want := []string{"shop/web cluster 10.244.1.4:8080/TCP", "shop/web external 10.244.1.4:8080/TCP"}
	rec.Wait(t, "the removal", func() bool { return len(removed(rec)) >= len(want) })
	if got := removed(rec); !slices.Equal(got, want) {
		t.Errorf("removals:\n got %q\nwant %q", got, want)
	}
	var ie *probes.InputError
	if errs := rec.Errors(); len(errs) != 1 || !errors.As(errs[0], &ie) || ie.Reason != probes.ReasonPanic {
		t.Errorf("errors %v, want one panic", errs)
	}
}

// A run started again after a failure (the daemon restarts a failed probe) reports what went
// while no run was looking, as a relist with the gap as its precision.
func TestRestartReportsWhatWentMeanwhile(t *testing.T) {
	ns, fd := probetest.Netns(t, nsPrefix+"restart-", "nft")
	nft(t, ns, "kube-proxy.nft")
	p := NewInNamespace(int(fd.Fd()), clock.RealClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	rec, stop := probetest.Run(t, p)
	rec.Wait(t, "sync", rec.Synced)
	stop()
	nft(t, ns, "remove-web-endpoint.nft")
	rec, _ = probetest.Run(t, p)
	want := []string{"shop/web cluster 10.244.1.4:8080/TCP", "shop/web external 10.244.1.4:8080/TCP"}
	rec.Wait(t, "the removal", func() bool { return len(removed(rec)) >= len(want) })
	if got := removed(rec); !slices.Equal(got, want) {
		t.Errorf("removals:\n got %q\nwant %q", got, want)
	}
	for _, o := range rec.Observations() {
		if !o.Relist || o.Precision <= 0 {
			t.Errorf("a removal found by a new run is not flagged as a relist: %+v", o)
		}
	}
}
