package nftables

import (
	"context"
	"fmt"
	"io"
	"log/slog"
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
)

// nsPrefix names the throwaway namespaces of these tests; leftovers of a crashed run are removed.
const nsPrefix = "eltest-nft-"

// netns creates a throwaway network namespace and returns its name and an open handle.
func netns(t *testing.T) (string, *os.File) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates a network namespace and loads nftables rules")
	}
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("needs the nft command (Debian package nftables) to load the fixtures")
	}
	entries, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), nsPrefix) {
			_ = exec.Command("ip", "netns", "delete", e.Name()).Run()
		}
	}
	name := fmt.Sprintf("%s%d", nsPrefix, os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	f, err := os.Open("/run/netns/" + name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		f.Close()
		if out, err := exec.Command("ip", "netns", "delete", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns delete: %v: %s", err, out)
		}
	})
	return name, f
}

func nft(t *testing.T, ns, file string) {
	t.Helper()
	if out, err := exec.Command("ip", "netns", "exec", ns, "nft", "-f", filepath.Join("testdata", file)).CombinedOutput(); err != nil {
		t.Fatalf("nft -f %s: %v: %s", file, err, out)
	}
}

// recorder is a probes.Sink that keeps what it is told.
type recorder struct {
	mu     sync.Mutex
	obs    []probes.Observation
	errs   []error
	synced bool
}

func (r *recorder) Observe(o probes.Observation) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.obs = append(r.obs, o)
}

func (r *recorder) SetStatus(_ string, s probes.Status) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.synced = r.synced || s.Synced
}

func (r *recorder) Error(_ string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.errs = append(r.errs, err)
}

// removed returns the removals seen so far, as "ns/svc ip:port/proto", sorted.
func (r *recorder) removed() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, o := range r.obs {
		out = append(out, o.Service.String()+" "+o.Endpoint.String())
	}
	sort.Strings(out)
	return out
}

func (r *recorder) waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; removals %q, errors %v", what, r.removed(), r.errs)
		}
		time.Sleep(5 * time.Millisecond)
	}
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
	ns, fd := netns(t)
	nft(t, ns, "kube-proxy.nft")
	p := NewInNamespace(int(fd.Fd()), clock.RealClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	rec := &recorder{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx, rec) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	rec.waitFor(t, "sync", func() bool { rec.mu.Lock(); defer rec.mu.Unlock(); return rec.synced })

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
	if len(rec.removed()) != 0 || len(rec.errs) != 0 {
		t.Fatalf("the first read reported removals %q, errors %v", rec.removed(), rec.errs)
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
		gens := p.generations.Load()
		nft(t, ns, s.file)
		rec.waitFor(t, s.file, func() bool { return p.generations.Load() > gens })
		if got := rec.removed(); !slices.Equal(got, s.want) {
			t.Errorf("after %s, removals:\n got %q\nwant %q", s.file, got, s.want)
		}
	}
	for _, o := range rec.obs {
		if o.Stage != probes.StageNftables || o.Source != Name || o.Pod.UID != "" || o.Time.IsZero() {
			t.Errorf("observation %+v", o)
		}
	}
	if len(rec.errs) != 0 {
		t.Errorf("errors: %v", rec.errs)
	}
}
