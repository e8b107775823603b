package iptables

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

	"github.com/google/nftables"
	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/probes"
)

const nsPrefix = "eltest-ipt-"

func netns(t *testing.T, backend Backend) (string, *os.File) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates a network namespace and loads iptables rules")
	}
	for _, cmd := range []string{"iptables-" + string(backend) + "-restore", "iptables-" + string(backend) + "-save"} {
		if _, err := exec.LookPath(cmd); err != nil {
			t.Skipf("needs %s (Debian package iptables)", cmd)
		}
	}
	entries, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), nsPrefix) {
			_ = exec.Command("ip", "netns", "delete", e.Name()).Run()
		}
	}
	name := fmt.Sprintf("%s%s-%d", nsPrefix, backend, os.Getpid())
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

func restore(t *testing.T, ns string, backend Backend, file string) {
	t.Helper()
	in, err := os.Open(filepath.Join("testdata", file))
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	cmd := exec.Command("ip", "netns", "exec", ns, "iptables-"+string(backend)+"-restore", "--noflush")
	cmd.Stdin = in
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("restore %s: %v: %s", file, err, out)
	}
}

type recorder struct {
	mu     sync.Mutex
	obs    []probes.Observation
	errs   []error
	synced bool
}

func (r *recorder) Observe(o probes.Observation) {
	r.mu.Lock()
	r.obs = append(r.obs, o)
	r.mu.Unlock()
}
func (r *recorder) SetStatus(_ string, s probes.Status) {
	r.mu.Lock()
	r.synced = r.synced || s.Synced
	r.mu.Unlock()
}
func (r *recorder) Error(_ string, err error) {
	r.mu.Lock()
	r.errs = append(r.errs, err)
	r.mu.Unlock()
}

func (r *recorder) removed() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, o := range r.obs {
		out = append(out, fmt.Sprintf("%s %s %s", o.Service, o.Endpoint, o.Precision))
	}
	sort.Strings(out)
	return out
}

func wait(t *testing.T, what string, cond func() bool, rec *recorder) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			rec.mu.Lock()
			defer rec.mu.Unlock()
			t.Fatalf("timed out waiting for %s; errors: %v", what, rec.errs)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// kube-proxy-shaped rules in a throwaway namespace, both backends: the probe finds the backend,
// reads what each Service reaches and reports exactly what each restore removes; the legacy
// backend's removals carry the poll interval as their precision.
func TestProbeFollowsKubeProxyRules(t *testing.T) {
	for _, backend := range []Backend{BackendNFT, BackendLegacy} {
		t.Run(string(backend), func(t *testing.T) {
			ns, fd := netns(t, backend)
			restore(t, ns, backend, "kube-proxy.iptables")
			p := New(Options{PollInterval: 50 * time.Millisecond}, clock.RealClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
			p.run = func(ctx context.Context, name string, args ...string) ([]byte, error) {
				return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns, name}, args...)...).Output()
			}
			p.newConn = func() (*nftables.Conn, error) { return nftables.New(nftables.WithNetNSFd(int(fd.Fd()))) }
			if got := p.Detect(context.Background()); got != backend {
				t.Fatalf("Detect = %q, want %q", got, backend)
			}
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
			wait(t, "the first read", func() bool { p.mu.Lock(); defer p.mu.Unlock(); return p.reads > 0 }, rec)

			precision := "0s"
			if backend == BackendLegacy {
				precision = "50ms"
			}
			steps := []struct {
				file string
				want []string
			}{
				{"remove-web-endpoint.iptables", []string{"default/web 10.244.1.4:8080/TCP " + precision}},
				{"remove-kubernetes-service.iptables", []string{"default/kubernetes 10.99.0.1:6443/TCP " + precision, "default/web 10.244.1.4:8080/TCP " + precision}},
			}
			for _, s := range steps {
				restore(t, ns, backend, s.file)
				wait(t, s.file, func() bool { return len(rec.removed()) >= len(s.want) }, rec)
				// One more read shows nothing else is reported.
				p.mu.Lock()
				reads := p.reads
				p.mu.Unlock()
				if backend == BackendLegacy {
					wait(t, "another poll", func() bool { p.mu.Lock(); defer p.mu.Unlock(); return p.reads > reads+1 }, rec)
				}
				if got := rec.removed(); !slices.Equal(got, s.want) {
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
			if len(rec.errs) > 0 {
				t.Errorf("errors: %v", rec.errs)
			}
		})
	}
}
