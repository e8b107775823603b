package iptables

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/nftables"
	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/internal/probetest"
)

// BenchmarkLargeRuleset loads kube-proxy iptables-mode rules for many Services (nf_tables
// backend) into a throwaway namespace and measures, side by side: the initial sync; for each
// change (a KUBE-SVC chain rewritten without one endpoint and its KUBE-SEP chain deleted, one
// iptables-restore), the time from the kernel's change notification to the probe's observation,
// and to the first once-a-second `iptables-save` that shows it.
//
// Run: sudo go test ./probes/iptables -run '^$' -bench LargeRuleset -benchtime 1x -timeout 30m
// Scale with BENCH_SERVICES (default 10000); each Service has 10 endpoints.
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
	p.newConn = func() (*nftables.Conn, error) { return nftables.New(nftables.WithNetNSFd(int(fd.Fd()))) }
	sink := &deliveries{at: map[string]time.Time{}}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	start := time.Now()
	go func() { _ = p.Run(ctx, sink) }()
	for {
		p.mu.Lock()
		reads := p.reads
		p.mu.Unlock()
		if reads > 0 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	syncTime := time.Since(start)

	const changes = 20
	var delivery, pollLag []float64
	for i := range changes {
		time.Sleep(time.Duration(rand.Int64N(int64(time.Second))))
		svc := i * (services / changes)
		key := fmt.Sprintf("bench/svc-%d %s:8080/TCP", svc, benchAddr(svc, 0))
		before := ref.Count()
		changed := time.Now()
		restoreFile(b, ns, writeChange(b, dir, svc, perService))
		delivered := sink.wait(b, key)
		refAt := ref.After(before)
		delivery = append(delivery, delivered.Sub(refAt).Seconds())
		polled := pollOnce(b, ns, changed, benchAddr(svc, 0)+":8080")
		pollLag = append(pollLag, polled.Sub(refAt).Seconds())
	}
	q := probetest.Quantile
	b.ReportMetric(syncTime.Seconds()*1000, "sync-ms")
	b.ReportMetric(q(delivery, 0.5)*1000, "probe-p50-ms")
	b.ReportMetric(q(delivery, 0.99)*1000, "probe-p99-ms")
	b.ReportMetric(q(pollLag, 0.5)*1000, "poll1s-p50-ms")
	b.ReportMetric(q(pollLag, 0.99)*1000, "poll1s-p99-ms")
	b.Logf("initial sync %s; change → observation p50 %.0f ms, p99 %.0f ms; once-a-second iptables-save p50 %.0f ms, p99 %.0f ms",
		syncTime.Round(time.Millisecond), q(delivery, 0.5)*1000, q(delivery, 0.99)*1000, q(pollLag, 0.5)*1000, q(pollLag, 0.99)*1000)
}

func benchAddr(svc, i int) string {
	n := svc + i*200000
	return fmt.Sprintf("10.%d.%d.%d", 64+n/65536, (n/256)%256, n%256)
}

func svcChain(svc int) string { return fmt.Sprintf("KUBE-SVC-B%015d", svc) }
func sepChain(svc, i int) string {
	return fmt.Sprintf("KUBE-SEP-B%08dE%06d", svc, i)
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
		fmt.Fprintf(w, "-A KUBE-SERVICES -d 10.96.%d.%d/32 -p tcp -m comment --comment \"bench/svc-%d:http cluster IP\" -m tcp --dport 80 -j %s\n", s/256, s%256, s, svcChain(s))
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

func writeChange(b *testing.B, dir string, svc, perService int) string {
	path := filepath.Join(dir, "change")
	var s strings.Builder
	fmt.Fprintf(&s, "*nat\n:%s - [0:0]\n:%s - [0:0]\n", svcChain(svc), sepChain(svc, 0))
	svcRules(&s, svc, 1, perService)
	fmt.Fprintf(&s, "-X %s\nCOMMIT\n", sepChain(svc, 0))
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

// pollOnce behaves like a poller that runs iptables-save once a second: it returns when the
// first such run, on the 1 s grid started at since, no longer lists the endpoint.
func pollOnce(b *testing.B, ns string, since time.Time, endpoint string) time.Time {
	for tick := since.Add(time.Duration(rand.Int64N(int64(time.Second)))); ; tick = tick.Add(time.Second) {
		time.Sleep(time.Until(tick))
		out, err := exec.Command("ip", "netns", "exec", ns, "iptables-nft-save", "-t", "nat").Output()
		if err != nil {
			b.Fatal(err)
		}
		if !strings.Contains(string(out), "--to-destination "+endpoint) {
			return time.Now()
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
func (d *deliveries) Error(string, error)             {}

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
