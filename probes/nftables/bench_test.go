package nftables

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

	"k8s.io/utils/clock"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/internal/probetest"
)

// BenchmarkLargeRuleset loads kube-proxy-shaped rules for many Services into a throwaway
// namespace and measures, side by side in one run:
//   - initial sync: from starting the probe to its first full read;
//   - for each of the changes (one service chain rewritten without one endpoint, as kube-proxy
//     does), the time from the kernel's change notification (seen by a separate monitor in this
//     process) to the probe's observation, and the time to the first once-a-second
//     `nft list table` poll that shows the change;
//   - the probe's CPU time and the process's RSS while endpoints change at a fixed rate.
//
// Run: sudo go test ./probes/nftables -run '^$' -bench LargeRuleset -benchtime 1x
// Scale with BENCH_SERVICES (default 10000); each Service has 10 endpoints.
func BenchmarkLargeRuleset(b *testing.B) {
	services, perService := envInt("BENCH_SERVICES", 10000), benchPerService
	ns, fd := probetest.Netns(b, nsPrefix+"bench-", "nft")
	dir := b.TempDir()
	load := time.Now()
	nftFile(b, ns, writeRuleset(b, dir, services, perService))
	b.Logf("loaded %d services × %d endpoints in %s", services, perService, time.Since(load).Round(time.Millisecond))

	ref := probetest.WatchGenerations(b, fd)
	p := NewInNamespace(int(fd.Fd()), clock.RealClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	sink := &benchSink{seen: map[string]time.Time{}, delivered: map[string]time.Time{}}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	start := time.Now()
	go func() { _ = p.Run(ctx, sink) }()
	for !sink.isSynced() {
		time.Sleep(time.Millisecond)
	}
	syncTime := time.Since(start)

	poller := startPoller(b, ns, time.Second)
	const changes = 50
	var stampErr, delivery, pollLag []float64
	for i := range changes {
		// Changes at random moments, as kube-proxy's syncs are to a poller.
		time.Sleep(time.Duration(rand.Int64N(int64(time.Second))))
		svc := i * (services / changes)
		gone := endpointAddr(svc, 0) + " . 8080"
		key := fmt.Sprintf("bench/svc-%d %s:8080/TCP", svc, endpointAddr(svc, 0))
		before := ref.Count()
		changed := time.Now()
		nftFile(b, ns, writeChange(b, dir, 0, svc))
		at, delivered := sink.waitFor(b, key)
		refAt := ref.After(before)
		stampErr = append(stampErr, at.Sub(refAt).Seconds())
		delivery = append(delivery, delivered.Sub(refAt).Seconds())
		pollLag = append(pollLag, poller.waitGone(b, gone, changed).Sub(refAt).Seconds())
	}
	poller.stop()

	// Churn: 100 endpoints a second leave their Services, eight per kube-proxy-like transaction
	// every 80 ms (an nft command on a table this size takes tens of milliseconds). The probe's
	// CPU time is this process's minus an idle baseline of the same length (the nft commands run
	// as children and are not counted).
	const perSecond, churnFor, perTx = 100, 20 * time.Second, 8
	ref.Stop()
	churn := probetest.Churn(churnFor, perTx*time.Second/perSecond, func(n int) {
		svcs := make([]int, perTx)
		for i := range svcs {
			svcs[i] = changes + (n*perTx+i)%(services-changes)
		}
		nftFile(b, ns, writeChange(b, dir, 0, svcs...))
	})

	b.ReportMetric(syncTime.Seconds()*1000, "sync-ms")
	b.ReportMetric(probetest.Quantile(stampErr, 0.99)*1000, "stamp-p99-ms")
	b.ReportMetric(probetest.Quantile(delivery, 0.5)*1000, "probe-p50-ms")
	b.ReportMetric(probetest.Quantile(delivery, 0.99)*1000, "probe-p99-ms")
	b.ReportMetric(probetest.Quantile(pollLag, 0.5)*1000, "poll1s-p50-ms")
	b.ReportMetric(probetest.Quantile(pollLag, 0.99)*1000, "poll1s-p99-ms")
	b.ReportMetric(churn.Busy.Seconds()/churnFor.Seconds()*100, "churn-cpu-%")
	b.ReportMetric(float64(churn.RSS1)/1024, "churn-rss-MiB")
	b.Logf("initial sync %s, RSS %d KiB", syncTime.Round(time.Millisecond), churn.RSS0)
	b.Logf("change → observation delivered: p50 %.2f ms, p99 %.2f ms (timestamp − kernel notification p99 %.3f ms); once-a-second nft list: p50 %.0f ms, p99 %.0f ms",
		probetest.Quantile(delivery, 0.5)*1000, probetest.Quantile(delivery, 0.99)*1000, probetest.Quantile(stampErr, 0.99)*1000, probetest.Quantile(pollLag, 0.5)*1000, probetest.Quantile(pollLag, 0.99)*1000)
	b.Logf("churn: %d transactions (%d endpoints) in %s: probe CPU %s (%.1f %% of one core; idle baseline %s), RSS %d → %d (halfway) → %d KiB",
		churn.Transactions, perTx*churn.Transactions, churnFor, churn.Busy.Round(time.Millisecond), churn.Busy.Seconds()/churnFor.Seconds()*100,
		churn.Idle.Round(time.Millisecond), churn.RSS0, churn.RSSMid, churn.RSS1)
}

const benchPerService = 10

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func nftFile(b *testing.B, ns, path string) {
	b.Helper()
	if out, err := exec.Command("ip", "netns", "exec", ns, "nft", "-f", path).CombinedOutput(); err != nil {
		b.Fatalf("nft -f %s: %v: %s", path, err, out)
	}
}

func chainName(svc int) string { return fmt.Sprintf("service-H%07d-bench/svc-%d/tcp/http", svc, svc) }

// endpointAddr numbers endpoints so that endpoint 0 of Service s is 10.64+s/65536.(s/256).(s%256).
func endpointAddr(svc, i int) string {
	n := svc + i*200000
	return fmt.Sprintf("10.%d.%d.%d", 64+n/65536, (n/256)%256, n%256)
}

func dnatRule(svc, from, perService int) string {
	var elems []string
	for i := from; i < perService; i++ {
		elems = append(elems, fmt.Sprintf("%d : %s . 8080", i-from, endpointAddr(svc, i)))
	}
	return fmt.Sprintf("meta l4proto tcp dnat ip to numgen random mod %d map { %s }", len(elems), strings.Join(elems, ", "))
}

func writeRuleset(b *testing.B, dir string, services, perService int) string {
	b.Helper()
	path := filepath.Join(dir, "ruleset.nft")
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	w := bufio.NewWriter(f)
	fmt.Fprintln(w, "table ip kube-proxy {")
	fmt.Fprintln(w, "\tmap service-ips {\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict")
	var elems []string
	for s := range services {
		elems = append(elems, fmt.Sprintf("10.96.%d.%d . tcp . 80 : goto %s", s/256, s%256, chainName(s)))
	}
	fmt.Fprintf(w, "\t\telements = { %s }\n\t}\n", strings.Join(elems, ",\n"))
	for s := range services {
		fmt.Fprintf(w, "\tchain %s {\n\t\t%s\n\t}\n", chainName(s), dnatRule(s, 0, perService))
	}
	fmt.Fprintln(w, "}")
	if err := w.Flush(); err != nil {
		b.Fatal(err)
	}
	f.Close()
	return path
}

// writeChange rewrites Services' chains without their endpoint 0 (endpoints 1 to perService-1
// stay), in one transaction, as a kube-proxy sync does.
func writeChange(b *testing.B, dir string, _ int, svcs ...int) string {
	b.Helper()
	path := filepath.Join(dir, "change.nft")
	var text strings.Builder
	for _, svc := range svcs {
		fmt.Fprintf(&text, "flush chain ip kube-proxy %s\nadd rule ip kube-proxy %s %s\n", chainName(svc), chainName(svc), dnatRule(svc, 1, benchPerService))
	}
	if err := os.WriteFile(path, []byte(text.String()), 0o644); err != nil {
		b.Fatal(err)
	}
	return path
}

// benchSink records when each removal was delivered, and the time the probe gave it.
type benchSink struct {
	mu        sync.Mutex
	seen      map[string]time.Time
	delivered map[string]time.Time
	synced    bool
}

func (s *benchSink) Observe(o probes.Observation) {
	now := time.Now()
	s.mu.Lock()
	key := o.Service.String() + " " + o.Endpoint.String()
	s.seen[key] = o.Time
	s.delivered[key] = now
	s.mu.Unlock()
}

func (s *benchSink) SetStatus(_ string, st probes.Status) {
	s.mu.Lock()
	s.synced = s.synced || st.Synced
	s.mu.Unlock()
}

func (s *benchSink) Error(string, error) {}

func (s *benchSink) isSynced() bool { s.mu.Lock(); defer s.mu.Unlock(); return s.synced }

// waitFor returns the observation's time and when it was delivered.
func (s *benchSink) waitFor(b *testing.B, key string) (time.Time, time.Time) {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		s.mu.Lock()
		at, ok := s.seen[key]
		delivered := s.delivered[key]
		s.mu.Unlock()
		if ok {
			return at, delivered
		}
		time.Sleep(100 * time.Microsecond)
	}
	b.Fatalf("no observation of %s", key)
	return time.Time{}, time.Time{}
}

// poller lists the table at a fixed interval, as a probe without events would.
type poller struct {
	mu    sync.Mutex
	polls []poll
	done  chan struct{}
}

type poll struct {
	at   time.Time
	text string
}

func startPoller(b *testing.B, ns string, every time.Duration) *poller {
	p := &poller{done: make(chan struct{})}
	go func() {
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-p.done:
				return
			case <-t.C:
			}
			out, err := exec.Command("ip", "netns", "exec", ns, "nft", "list", "table", "ip", "kube-proxy").Output()
			if err != nil {
				continue
			}
			p.mu.Lock()
			p.polls = append(p.polls, poll{time.Now(), string(out)})
			p.mu.Unlock()
		}
	}()
	return p
}

func (p *poller) stop() { close(p.done) }

// waitGone returns when the first poll started after since no longer listed the endpoint.
func (p *poller) waitGone(b *testing.B, endpoint string, since time.Time) time.Time {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		p.mu.Lock()
		for _, pl := range p.polls {
			if pl.at.After(since) && !strings.Contains(pl.text, endpoint) {
				at := pl.at
				p.mu.Unlock()
				return at
			}
		}
		p.mu.Unlock()
		time.Sleep(10 * time.Millisecond)
	}
	b.Fatalf("no poll showed %s gone", endpoint)
	return time.Time{}
}
