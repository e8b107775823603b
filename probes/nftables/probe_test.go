package nftables

import (
	"errors"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"

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

// removed returns the removals recorded, as "ns/svc ip:port/proto", sorted.
func removed(r *probetest.Recorder) []string {
	var out []string
	for _, o := range r.Observations() {
		out = append(out, o.Service.String()+" "+o.Endpoint.String())
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
			out = append(out, se.Service.String()+" "+ep.String())
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
		"default/kubernetes 10.99.0.1:6443/TCP",
		"shop/sticky 10.244.1.7:80/TCP",
		"shop/sticky 10.244.2.7:80/TCP",
		"shop/web 10.244.1.3:8080/TCP",
		"shop/web 10.244.1.4:8080/TCP",
		"shop/web 10.244.2.2:8080/TCP",
		"shop/web [fd00:10:244:1::5]:8080/TCP",
		"shop/web [fd00:10:244:2::6]:8080/TCP",
	}
	if got := snapshot(t, p); !slices.Equal(got, want) {
		t.Fatalf("initial endpoints:\n got %q\nwant %q", got, want)
	}
	if len(removed(rec)) != 0 || len(rec.Errors()) != 0 {
		t.Fatalf("the first read reported removals %q, errors %v", removed(rec), rec.Errors())
	}

	steps := []struct {
		file string
		want []string // every removal reported so far
	}{
		{"remove-web-endpoint.nft", []string{"shop/web 10.244.1.4:8080/TCP"}},
		{"remove-sticky-endpoint.nft", []string{"shop/sticky 10.244.1.7:80/TCP", "shop/web 10.244.1.4:8080/TCP"}},
		// The stale endpoint chain goes a sync later: nothing more is removed.
		{"delete-stale-chain.nft", []string{"shop/sticky 10.244.1.7:80/TCP", "shop/web 10.244.1.4:8080/TCP"}},
		{"remove-kubernetes-service.nft", []string{"default/kubernetes 10.99.0.1:6443/TCP", "shop/sticky 10.244.1.7:80/TCP", "shop/web 10.244.1.4:8080/TCP"}},
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
	cmd := exec.Command("ip", "netns", "exec", ns, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(s.String())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v: %s", err, out)
	}
	want := []string{"shop/web 10.244.1.4:8080/TCP"}
	rec.Wait(t, "the removal", func() bool { return len(removed(rec)) >= len(want) })
	if got := removed(rec); !slices.Equal(got, want) {
		t.Errorf("removals:\n got %q\nwant %q", got, want)
	}
	if errs := rec.Errors(); len(errs) == 0 || !strings.Contains(errors.Join(errs...).Error(), "no buffer space") {
		t.Errorf("errors %v, want the kernel's lost-message error", errs)
	}
}
