// Package benchmark measures the ingress probe against real proxies with many routed Services:
// how far its ingress stage is from the ground truth (the last request each proxy routed to the
// old server), and what reading the proxies costs, adaptive polling side by side with plain 1 s
// polling in one run. See docs/benchmarks.md.
package benchmark

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestMain(m *testing.M) {
	if spec := os.Getenv(pollerEnv); spec != "" {
		os.Exit(runPoller(spec))
	}
	os.Exit(m.Run())
}

func envInt(tb testing.TB, name string, def int) int {
	tb.Helper()
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 {
		tb.Fatalf("%s=%q: want a positive integer", name, s)
	}
	return n
}

// poller is a running poller process and what it reported.
type poller struct {
	mode  string
	proxy *proxy
	cmd   *exec.Cmd
	stdin io.WriteCloser

	mu       sync.Mutex
	synced   bool
	removed  map[string]pollerEvent
	full     int64
	targeted int64
	errors   int64
	finished chan struct{}
}

func startPoller(tb testing.TB, mode string, px *proxy, slow, fast time.Duration) *poller {
	tb.Helper()
	spec, _ := json.Marshal(pollerConfig{Kind: px.kind, Address: px.admin, Slow: slow, Fast: fast})
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), pollerEnv+"="+string(spec))
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		tb.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		tb.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	p := &poller{mode: mode, proxy: px, cmd: cmd, stdin: stdin, removed: map[string]pollerEvent{}, finished: make(chan struct{})}
	go func() {
		defer close(p.finished)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			var e pollerEvent
			if json.Unmarshal(sc.Bytes(), &e) != nil {
				continue
			}
			p.mu.Lock()
			switch {
			case e.Synced:
				p.synced = true
			case e.Endpoint != "":
				p.removed[e.Endpoint] = e
			default:
				p.full, p.targeted, p.errors = e.Full, e.Targeted, e.Errors
			}
			p.mu.Unlock()
		}
	}()
	tb.Cleanup(func() {
		_ = stdin.Close()
		select {
		case <-p.finished:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
		}
		_ = cmd.Wait()
	})
	return p
}

func (p *poller) owe(endpoint string) {
	fmt.Fprintf(p.stdin, "owe %s\n", endpoint)
}

func (p *poller) observed(endpoint string) (pollerEvent, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	e, ok := p.removed[endpoint]
	return e, ok
}

func (p *poller) isSynced() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.synced
}

func (p *poller) cpu() time.Duration { return processCPU(p.cmd.Process.Pid) }

// truth sends requests for svc through px until stop closes (bounded: at most max requests), and
// returns when the last request the old server answered was sent: the proxy routed it to the old
// server after that moment (and before its answer, under a millisecond later on loopback).
func truth(px *proxy, svc service, stop <-chan struct{}, max int) (time.Time, int) {
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	var last time.Time
	n := 0
	for ; n < max; n++ {
		select {
		case <-stop:
			return last, n
		default:
		}
		req, _ := http.NewRequest(http.MethodGet, "http://"+px.frontend+"/", nil)
		req.Host = svc.host
		sent := time.Now()
		resp, err := client.Do(req)
		if err != nil {
			time.Sleep(time.Millisecond)
			continue
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(body) == svc.old {
			last = sent
		}
		time.Sleep(time.Millisecond)
	}
	return last, n
}

type sample struct {
	proxy, mode string
	errMs       float64 // observed − truth
	precisionMs float64
	missed      bool
}

// BenchmarkIngressPolling runs, for each proxy kind present (HAProxy from the system, Traefik
// from LAB_TRAEFIK), two identical instances routing BENCH_SERVICES Services (1,000), each read by
// a poller process of its own: one polling adaptively (10 s, 20 ms while it owes a removal), one
// every second. After an idle phase (BENCH_IDLE seconds, 20), BENCH_REMOVALS times (30) one
// Service's old server is announced terminating to all pollers and, a random 0–1 s later (a
// controller's delay), removed from every instance at once; requests sent through each instance
// give the ground truth.
func BenchmarkIngressPolling(b *testing.B) {
	n := envInt(b, "BENCH_SERVICES", 1000)
	removals := envInt(b, "BENCH_REMOVALS", 30)
	idle := time.Duration(envInt(b, "BENCH_IDLE", 20)) * time.Second
	if removals > n {
		b.Fatalf("BENCH_REMOVALS=%d is more than BENCH_SERVICES=%d", removals, n)
	}
	dir := b.TempDir()
	svcs := serveBackends(b, n)

	var proxies [][2]*proxy // per kind: the adaptive one's and the plain one's
	var remove []func(service) error
	if bin, err := exec.LookPath("haproxy"); err == nil {
		pair := [2]*proxy{startHAProxy(b, bin, dir, "haproxy-adaptive", svcs), startHAProxy(b, bin, dir, "haproxy-1s", svcs)}
		proxies = append(proxies, pair)
		remove = append(remove, func(s service) error {
			for _, px := range pair {
				if err := px.remove(s); err != nil {
					return err
				}
			}
			return nil
		})
	} else {
		b.Log("haproxy is not installed: HAProxy left out")
	}
	if bin := os.Getenv("LAB_TRAEFIK"); bin != "" {
		dynamic := filepath.Join(dir, "dynamic.yaml")
		removed := map[string]bool{}
		write := func() error {
			tmp := dynamic + ".tmp"
			if err := os.WriteFile(tmp, traefikConfig(svcs, removed), 0o600); err != nil {
				return err
			}
			return os.Rename(tmp, dynamic)
		}
		if err := write(); err != nil {
			b.Fatal(err)
		}
		pair := [2]*proxy{startTraefik(b, bin, dir, "traefik-adaptive", dynamic), startTraefik(b, bin, dir, "traefik-1s", dynamic)}
		proxies = append(proxies, pair)
		remove = append(remove, func(s service) error {
			removed[s.host] = true
			return write()
		})
	} else {
		b.Log("LAB_TRAEFIK is not set (make lab-bins builds Traefik; make prints its path): Traefik left out")
	}
	if len(proxies) == 0 {
		b.Skip("neither HAProxy nor Traefik is available")
	}

	var pollers []*poller
	for _, pair := range proxies {
		pollers = append(pollers,
			startPoller(b, "adaptive", pair[0], 10*time.Second, 20*time.Millisecond),
			startPoller(b, "1s", pair[1], time.Second, time.Second))
	}
	deadline := time.Now().Add(60 * time.Second)
	for _, p := range pollers {
		for !p.isSynced() {
			if time.Now().After(deadline) {
				b.Fatalf("the poller of %s did not read it within 60 s", p.proxy.name)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	// Traefik serves the Services once its first configuration is applied.
	for _, pair := range proxies {
		for _, px := range pair {
			if last, _ := truth(px, svcs[0], nil, 1); last.IsZero() {
				waitRoutes(b, px, svcs[0])
			}
		}
	}

	cpu := func() (out []time.Duration) {
		for _, p := range pollers {
			out = append(out, p.cpu(), p.proxy.cpu())
		}
		return out
	}
	b.ResetTimer()
	b.Logf("idle for %s: %d Services, nothing terminating", idle, n)
	c0, t0 := cpu(), time.Now()
	time.Sleep(idle)
	c1, t1 := cpu(), time.Now()

	rng := rand.New(rand.NewPCG(1, 2))
	order := rng.Perm(n)[:removals]
	var samples []sample
	for k, idx := range order {
		s := svcs[idx]
		stop := make(chan struct{})
		truths := make([]time.Time, len(pollers))
		var wg sync.WaitGroup
		for i, p := range pollers {
			wg.Go(func() { truths[i], _ = truth(p.proxy, s, stop, 20000) })
		}
		for _, p := range pollers {
			p.owe(s.old)
		}
		time.Sleep(time.Duration(rng.Int64N(int64(time.Second))))
		for _, rm := range remove {
			if err := rm(s); err != nil {
				b.Fatal(err)
			}
		}
		// Until every poller saw it, or 8 s (Traefik's throttle and a 1 s poll fit well inside).
		wait := time.Now().Add(8 * time.Second)
		for time.Now().Before(wait) && slices.ContainsFunc(pollers, func(p *poller) bool { _, ok := p.observed(s.old); return !ok }) {
			time.Sleep(20 * time.Millisecond)
		}
		time.Sleep(200 * time.Millisecond) // the truth's last old response is in the past
		close(stop)
		wg.Wait()
		for i, p := range pollers {
			e, ok := p.observed(s.old)
			smp := sample{proxy: p.proxy.kind, mode: p.mode, missed: !ok || truths[i].IsZero()}
			if !smp.missed {
				smp.errMs = float64(e.Time.Sub(truths[i])) / 1e6
				smp.precisionMs = float64(e.Precision) / 1e6
				if smp.errMs < 0 || smp.errMs > smp.precisionMs+20 {
					b.Logf("%s, %s: observed %+.1f ms from the truth, precision %.1f ms", p.proxy.name, s.host, smp.errMs, smp.precisionMs)
				}
			}
			samples = append(samples, smp)
		}
		b.Logf("removal %d/%d (%s) done", k+1, removals, s.host)
		time.Sleep(time.Duration(rng.Int64N(int64(time.Second))))
	}
	c2, t2 := cpu(), time.Now()
	b.StopTimer()
	for _, p := range pollers {
		_ = p.stdin.Close()
		<-p.finished
	}
	report(b, n, pollers, samples, [3][]time.Duration{c0, c1, c2}, [3]time.Time{t0, t1, t2})
}

func waitRoutes(tb testing.TB, px *proxy, s service) {
	tb.Helper()
	deadline := time.Now().Add(30 * time.Second)
	client := &http.Client{Timeout: time.Second}
	for time.Now().Before(deadline) {
		req, _ := http.NewRequest(http.MethodGet, "http://"+px.frontend+"/", nil)
		req.Host = s.host
		if resp, err := client.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	tb.Fatalf("%s does not route %s after 30 s", px.name, s.host)
}

func quantile(xs []float64, q float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	i := int(q*float64(len(s)-1) + 0.5)
	return s[i]
}

func report(b *testing.B, n int, pollers []*poller, samples []sample, c [3][]time.Duration, t [3]time.Time) {
	var out strings.Builder
	fmt.Fprintf(&out, "\n%d routed Services; idle %.0f s, removals %.0f s\n", n, t[1].Sub(t[0]).Seconds(), t[2].Sub(t[1]).Seconds())
	fmt.Fprintf(&out, "%-8s %-8s %8s %8s %8s %8s %6s %9s %9s %10s %10s %9s %9s\n", "proxy", "polling", "err p50", "err p99", "|err|max", "prec p50", "missed",
		"full rd", "targeted", "poller id", "poller rm", "proxy id", "proxy rm")
	for i, p := range pollers {
		var errs, abs, prec []float64
		missed := 0
		for _, s := range samples {
			if s.proxy != p.proxy.kind || s.mode != p.mode {
				continue
			}
			if s.missed {
				missed++
				continue
			}
			errs = append(errs, s.errMs)
			if s.errMs < 0 {
				abs = append(abs, -s.errMs)
			} else {
				abs = append(abs, s.errMs)
			}
			prec = append(prec, s.precisionMs)
		}
		share := func(phase, which int) float64 {
			d := c[phase+1][2*i+which] - c[phase][2*i+which]
			return 100 * d.Seconds() / t[phase+1].Sub(t[phase]).Seconds()
		}
		fmt.Fprintf(&out, "%-8s %-8s %6.1fms %6.1fms %6.1fms %6.1fms %6d %9d %9d %9.2f%% %9.2f%% %8.2f%% %8.2f%%\n",
			p.proxy.kind, p.mode, quantile(errs, 0.5), quantile(errs, 0.99), quantile(abs, 1), quantile(prec, 0.5), missed,
			p.full, p.targeted, share(0, 0), share(1, 0), share(0, 1), share(1, 1))
		b.ReportMetric(quantile(errs, 0.5), p.proxy.kind+"-"+p.mode+"-err-p50-ms")
		b.ReportMetric(quantile(errs, 0.99), p.proxy.kind+"-"+p.mode+"-err-p99-ms")
	}
	out.WriteString("err: observed ingress stage − the last request the instance routed to the old server (p50, p99,\n" +
		"largest magnitude); prec: the observation's precision; CPU as % of one core, idle phase (id) and\n" +
		"removal phase (rm; the proxies also serve the ground-truth requests then, the same for both modes)\n")
	// Printed, not logged: the testing package cuts a benchmark's log at ten lines.
	fmt.Print(out.String())
}
