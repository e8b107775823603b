package iptables

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/internal/probetest"
)

// BenchmarkLargeRuleset loads kube-proxy iptables-mode rules for many Services (nf_tables
// backend) into a throwaway namespace and measures, side by side in one run:
//   - the initial sync;
//   - for each change (as a kube-proxy sync writes it with iptables-restore: KUBE-SERVICES
//     rewritten whole, one KUBE-SVC chain rewritten without one endpoint and that endpoint's
//     KUBE-SEP chain deleted), the time from the kernel's change notification to the probe's
//     observation, and to the first once-a-second `iptables-save` that shows it;
//   - the probe's CPU time and the process's RSS while 100 endpoints a second leave their
//     Services.
//
// Run: sudo go test ./probes/iptables -run '^$' -bench LargeRuleset -benchtime 1x -timeout 30m
// Scale with BENCH_SERVICES (default 10000); each Service has 10 endpoints. BENCH_HEAPPROFILE
// names a file for a heap profile taken right after the churn, BENCH_CPUPROFILE one for a CPU
// profile of the churn.
func BenchmarkLargeRuleset(b *testing.B) {
	services := 10000
	if v, err := strconv.Atoi(os.Getenv("BENCH_SERVICES")); err == nil && v > 0 {
		services = v
	}
	const perService = 10
	ns, fd := probetest.Netns(b, nsPrefix+"bench-", "iptables-nft-restore", "iptables-nft-save")
	dir := b.TempDir()
	load := time.Now()
	restoreFile(b, ns, writeRules(b, dir, services, perService))
	b.Logf("loaded %d services × %d endpoints in %s", services, perService, time.Since(load).Round(time.Millisecond))

	ref := probetest.WatchGenerations(b, fd)
	p := New(Options{PollInterval: time.Second}, clock.RealClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	p.run = func(ctx context.Context, name string, args ...string) ([]byte, error) {
		return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns, name}, args...)...).Output()
	}
	inNamespace(p, fd)
	sink := &deliveries{at: map[string]time.Time{}}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	start := time.Now()
	go func() {
		if err := p.Run(ctx, sink); err != nil {
			b.Errorf("Run: %v", err)
		}
	}()
	for {
		reads := p.reads.Load()
		if reads > 0 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	syncTime := time.Since(start)

	const changes = 20
	var delivery, pollLag, saves []float64
	q := probetest.Quantile
	for i := range changes {
		time.Sleep(time.Duration(rand.Int64N(int64(time.Second))))
		svc := i * (services / changes)
		key := fmt.Sprintf("bench/svc-%d %s:8080/TCP", svc, benchAddr(svc, 0))
		before := ref.Count()
		changed := time.Now()
		restoreFile(b, ns, writeChange(b, dir, "change", services, perService, true, svc))
		delivered := sink.wait(b, key)
		refAt := ref.After(before)
		delivery = append(delivery, delivered.Sub(refAt).Seconds())
		// A save that takes longer than 10 s makes the poller's figures plain after two samples.
		if len(saves) >= 2 && q(saves, 0.5) > 10 {
			continue
		}
		polled, took := pollOnce(b, ns, changed, benchAddr(svc, 0)+":8080")
		pollLag = append(pollLag, polled.Sub(refAt).Seconds())
		saves = append(saves, took...)
	}

	// Churn: 100 endpoints a second leave their Services, in one transaction a second as
	// kube-proxy's iptables mode writes them (its minimum sync period is 1 s, and every sync
	// rewrites KUBE-SERVICES whole); the endpoint chains stay, emptied. The probe's CPU time is
	// this process's minus an idle baseline of the same length; iptables-restore runs as a child
	// and is not counted.
	const perSecond, churnFor, perTx = 100, 20 * time.Second, 100
	ref.Stop()
	if path := os.Getenv("BENCH_CPUPROFILE"); path != "" {
		f, err := os.Create(path)
		if err != nil {
			b.Fatal(err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			b.Fatal(err)
		}
		defer f.Close()
	}
	// The restores are written beforehand, so that writing them is not counted as the probe's.
	interval := perTx * time.Second / perSecond
	var churnFiles []string
	for n := range int(churnFor/interval) + 1 {
		svcs := make([]int, perTx)
		for i := range svcs {
			svcs[i] = changes + (n*perTx+i)%(services-changes)
		}
		churnFiles = append(churnFiles, writeChange(b, dir, fmt.Sprintf("churn-%d", n), services, perService, false, svcs...))
	}
	churn := probetest.Churn(churnFor, interval, func(n int) {
		restoreFile(b, ns, churnFiles[n%len(churnFiles)])
	})

	pprof.StopCPUProfile()
	if path := os.Getenv("BENCH_HEAPPROFILE"); path != "" {
		// What is live right after the churn, for `go tool pprof -sample_index=inuse_space`.
		f, err := os.Create(path)
		if err != nil {
			b.Fatal(err)
		}
		runtime.GC()
		if err := pprof.WriteHeapProfile(f); err != nil {
			b.Fatal(err)
		}
		f.Close()
	}
	b.ReportMetric(syncTime.Seconds()*1000, "sync-ms")
	b.ReportMetric(q(saves, 0.5)*1000, "save-p50-ms")
	b.ReportMetric(q(delivery, 0.5)*1000, "probe-p50-ms")
	b.ReportMetric(q(delivery, 0.99)*1000, "probe-p99-ms")
	b.ReportMetric(q(pollLag, 0.5)*1000, "poll1s-p50-ms")
	b.ReportMetric(q(pollLag, 0.99)*1000, "poll1s-p99-ms")
	b.ReportMetric(churn.Busy.Seconds()/churnFor.Seconds()*100, "churn-cpu-%")
	b.ReportMetric(float64(churn.RSS1)/1024, "churn-rss-MiB")
	b.Logf("initial sync %s, RSS %d KiB", syncTime.Round(time.Millisecond), churn.RSS0)
	b.Logf("change → observation p50 %.2f ms, p99 %.2f ms; once-a-second iptables-save p50 %.0f ms, p99 %.0f ms (%d changes; one save takes %.0f ms)",
		q(delivery, 0.5)*1000, q(delivery, 0.99)*1000, q(pollLag, 0.5)*1000, q(pollLag, 0.99)*1000, len(pollLag), q(saves, 0.5)*1000)
	b.Logf("churn: %d transactions (%d endpoints) in %s: probe CPU %s (%.1f %% of one core; idle baseline %s), RSS %d → %d (halfway) → %d KiB",
		churn.Transactions, perTx*churn.Transactions, churnFor, churn.Busy.Round(time.Millisecond), churn.Busy.Seconds()/churnFor.Seconds()*100,
		churn.Idle.Round(time.Millisecond), churn.RSS0, churn.RSSMid, churn.RSS1)
}

func benchAddr(svc, i int) string {
	n := svc + i*200000
	return fmt.Sprintf("10.%d.%d.%d", 64+n/65536, (n/256)%256, n%256)
}

func svcChain(svc int) string { return fmt.Sprintf("KUBE-SVC-B%015d", svc) }
func sepChain(svc, i int) string {
	return fmt.Sprintf("KUBE-SEP-B%08dE%06d", svc, i)
}

func serviceRule(w io.Writer, svc int) {
	fmt.Fprintf(w, "-A KUBE-SERVICES -d 10.96.%d.%d/32 -p tcp -m comment --comment \"bench/svc-%d:http cluster IP\" -m tcp --dport 80 -j %s\n", svc/256, svc%256, svc, svcChain(svc))
}

func svcRules(w io.Writer, svc, from, perService int) {
	for i := from; i < perService; i++ {
		fmt.Fprintf(w, "-A %s -m comment --comment \"bench/svc-%d:http -> %s:8080\" -m statistic --mode random --probability %.11f -j %s\n",
			svcChain(svc), svc, benchAddr(svc, i), 1/float64(perService-i), sepChain(svc, i))
	}
}

func writeRules(b *testing.B, dir string, services, perService int) string {
	path := filepath.Join(dir, "rules")
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	w := bufio.NewWriter(f)
	fmt.Fprintln(w, "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]")
	for s := range services {
		fmt.Fprintf(w, ":%s - [0:0]\n", svcChain(s))
		for i := range perService {
			fmt.Fprintf(w, ":%s - [0:0]\n", sepChain(s, i))
		}
	}
	for s := range services {
		serviceRule(w, s)
		svcRules(w, s, 0, perService)
		for i := range perService {
			fmt.Fprintf(w, "-A %s -p tcp -m comment --comment \"bench/svc-%d:http\" -m tcp -j DNAT --to-destination %s:8080\n", sepChain(s, i), s, benchAddr(s, i))
		}
	}
	fmt.Fprintln(w, "COMMIT")
	if err := w.Flush(); err != nil {
		b.Fatal(err)
	}
	f.Close()
	return path
}

// writeChange writes, to a file of dir, one kube-proxy sync: KUBE-SERVICES whole, and each given Service's chain
// without its first endpoint, whose chain is deleted (or, with deleteSEP false, emptied).
func writeChange(b *testing.B, dir, name string, services, perService int, deleteSEP bool, svcs ...int) string {
	path := filepath.Join(dir, name)
	var s strings.Builder
	s.WriteString("*nat\n:KUBE-SERVICES - [0:0]\n")
	for _, svc := range svcs {
		fmt.Fprintf(&s, ":%s - [0:0]\n:%s - [0:0]\n", svcChain(svc), sepChain(svc, 0))
	}
	for svc := range services {
		serviceRule(&s, svc)
	}
	for _, svc := range svcs {
		svcRules(&s, svc, 1, perService)
		if deleteSEP {
			fmt.Fprintf(&s, "-X %s\n", sepChain(svc, 0))
		}
	}
	s.WriteString("COMMIT\n")
	if err := os.WriteFile(path, []byte(s.String()), 0o644); err != nil {
		b.Fatal(err)
	}
	return path
}

func restoreFile(b *testing.B, ns, path string) {
	in, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer in.Close()
	cmd := exec.Command("ip", "netns", "exec", ns, "iptables-nft-restore", "--noflush")
	cmd.Stdin = in
	if out, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("iptables-nft-restore: %v: %s", err, out)
	}
}

// pollOnce behaves like a poller that runs iptables-save once a second (or back to back when a
// save takes longer): it returns when the first such run, on the 1 s grid started at since, no
// longer lists the endpoint, and how long each save took, in seconds. The save runs with an
// unlimited stack: at 10,000 Services iptables-nft-save 1.8.9 overflows the default 8 MiB and
// crashes.
func pollOnce(b *testing.B, ns string, since time.Time, endpoint string) (time.Time, []float64) {
	var took []float64
	for tick := since.Add(time.Duration(rand.Int64N(int64(time.Second)))); ; tick = tick.Add(time.Second) {
		time.Sleep(time.Until(tick))
		start := time.Now()
		out, err := exec.Command("ip", "netns", "exec", ns, "sh", "-c", "ulimit -s unlimited && exec iptables-nft-save -t nat").Output()
		if err != nil {
			b.Fatalf("iptables-nft-save: %v", err)
		}
		took = append(took, time.Since(start).Seconds())
		if !strings.Contains(string(out), "--to-destination "+endpoint) {
			return time.Now(), took
		}
		if now := time.Now(); now.After(tick) {
			tick = now.Truncate(time.Second)
		}
	}
}

type deliveries struct {
	mu sync.Mutex
	at map[string]time.Time
}

func (d *deliveries) Observe(o probes.Observation) {
	now := time.Now()
	d.mu.Lock()
	d.at[o.Service.String()+" "+o.Endpoint.String()] = now
	d.mu.Unlock()
}
func (d *deliveries) SetStatus(string, probes.Status) {}
func (d *deliveries) Error(_ string, err error)       { fmt.Println("probe error:", err) }

func (d *deliveries) wait(b *testing.B, key string) time.Time {
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		d.mu.Lock()
		at, ok := d.at[key]
		d.mu.Unlock()
		if ok {
			return at
		}
		time.Sleep(time.Millisecond)
	}
	b.Fatalf("no observation of %s", key)
	return time.Time{}
}

// BenchmarkChainOfTwoRules reports the heap one chain of two rules keeps (every KUBE-SEP- chain
// holds two): as the reader keeps it, a slice in handle order, and as a map by handle, which the
// reader used before (docs/benchmarks.md).
//
// Run: go test ./probes/iptables -run '^$' -bench ChainOfTwoRules -benchtime 100000x
func BenchmarkChainOfTwoRules(b *testing.B) {
	sep := "KUBE-SEP-ABCDEFGHIJKLMNOP"
	two := []handleRule{
		{handle: 7, rule: rule{chain: sep, target: "KUBE-MARK-MASQ", jump: true}},
		{handle: 8, rule: rule{chain: sep, target: "DNAT", proto: "TCP", dnat: netip.MustParseAddrPort("10.244.1.4:8080")}},
	}
	b.Run("slice", func(b *testing.B) {
		probetest.HeapPer(b, func() chainRules { return byHandle(slices.Clone(two)) })
	})
	b.Run("map", func(b *testing.B) {
		probetest.HeapPer(b, func() map[uint64]rule {
			m := map[uint64]rule{}
			for _, hr := range two {
				m[hr.handle] = hr.rule
			}
			return m
		})
	})
}
