// Package probetest holds what the probes' privileged tests and benchmarks share: throwaway
// network namespaces, a sink that records what a probe reports, and the kernel's own change
// notifications as a timing reference.
package probetest

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/endpointlag/endpointlag/probes"
	"github.com/endpointlag/endpointlag/probes/internal/nfmon"
)

// Netns creates a network namespace named prefix+PID and returns its name and an open handle;
// both go when the test ends. It skips, saying why, without root or without the commands the
// test needs, and first removes namespaces a crashed run of the same prefix left.
func Netns(t testing.TB, prefix string, commands ...string) (string, *os.File) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates a network namespace")
	}
	for _, c := range commands {
		if _, err := exec.LookPath(c); err != nil {
			t.Skipf("needs the %s command", c)
		}
	}
	entries, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) {
			_ = exec.Command("ip", "netns", "delete", e.Name()).Run()
		}
	}
	name := fmt.Sprintf("%s%d", prefix, os.Getpid())
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

// Recorder is a probes.Sink that keeps what it is told.
type Recorder struct {
	mu     sync.Mutex
	obs    []probes.Observation
	errs   []error
	synced bool
	status probes.Status
	// up is the probe's health as the collector keeps it: set by SetStatus, cleared by an error
	// that is not an *probes.InputError.
	up bool
}

// Observe implements probes.Sink.
func (r *Recorder) Observe(o probes.Observation) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.obs = append(r.obs, o)
}

// SetStatus implements probes.Sink.
func (r *Recorder) SetStatus(_ string, s probes.Status) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.synced = r.synced || s.Synced
	r.status = s
	r.up = s.Up
}

// Status returns the last status the probe reported.
func (r *Recorder) Status() probes.Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.status
}

// Error implements probes.Sink.
func (r *Recorder) Error(_ string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.errs = append(r.errs, err)
	var ie *probes.InputError
	if !errors.As(err, &ie) {
		r.up = false
	}
}

// Observations returns a copy of what was observed.
func (r *Recorder) Observations() []probes.Observation {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]probes.Observation(nil), r.obs...)
}

// Errors returns a copy of the errors reported.
func (r *Recorder) Errors() []error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]error(nil), r.errs...)
}

// Synced reports whether the probe said it had synced.
func (r *Recorder) Synced() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.synced
}

// Up reports whether the probe is up as the collector would export it: its last status said so
// and no failure came after it.
func (r *Recorder) Up() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.up
}

// Wait polls cond for up to 5 s and fails the test with what was recorded when it stays false.
func (r *Recorder) Wait(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; observations %d, errors %v", what, len(r.Observations()), r.Errors())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Run starts p with a Recorder and returns it with a stop function, which ends the run and fails
// the test if Run returned an error; stop also runs when the test ends, and a second call does
// nothing.
func Run(t testing.TB, p probes.Probe) (*Recorder, func()) {
	t.Helper()
	rec := &Recorder{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx, rec) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("%s: Run: %v", p.Name(), err)
			}
		})
	}
	t.Cleanup(stop)
	return rec, stop
}

// Generations timestamps every batch of nftables changes the kernel announces in a namespace:
// the reference the benchmarks measure probes against. It reads the notifications with
// nfmon.OpenNotifications, which decodes nothing but each message's type, so that the reference
// is not itself late by the decoding of a large transaction.
type Generations struct {
	t     testing.TB
	mon   *nfmon.Notifications
	mu    sync.Mutex
	times []time.Time
	err   error
}

// WatchGenerations starts recording in the network namespace open as fd, until the test ends,
// with the probes' own monitor socket settings.
func WatchGenerations(t testing.TB, fd *os.File) *Generations {
	t.Helper()
	mon, err := nfmon.OpenNotifications(int(fd.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(mon.Close)
	g := &Generations{t: t, mon: mon}
	go func() {
		for at := range mon.Times {
			g.mu.Lock()
			g.times = append(g.times, at)
			g.mu.Unlock()
		}
		g.mu.Lock()
		g.err = mon.Err()
		g.mu.Unlock()
	}()
	return g
}

// Stop ends the recording, so that the reference's own reading stops costing CPU time.
func (g *Generations) Stop() { g.mon.Close() }

// Count is how many generations were seen so far.
func (g *Generations) Count() int { g.mu.Lock(); defer g.mu.Unlock(); return len(g.times) }

// After waits for, and returns the time of, the first generation after the first n. It fails the
// test when the reference monitor lost messages or saw nothing for a minute.
func (g *Generations) After(n int) time.Time {
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		g.mu.Lock()
		if g.err != nil {
			g.mu.Unlock()
			g.t.Fatalf("reference monitor: %v", g.err)
		}
		if len(g.times) > n {
			t := g.times[n]
			g.mu.Unlock()
			return t
		}
		g.mu.Unlock()
		time.Sleep(100 * time.Microsecond)
	}
	g.t.Fatalf("reference monitor: no generation after %d in a minute", n)
	return time.Time{}
}

// Quantile is the nearest-rank q-quantile of vs.
func Quantile(vs []float64, q float64) float64 {
	s := append([]float64(nil), vs...)
	sort.Float64s(s)
	return s[max(int(math.Ceil(q*float64(len(s))))-1, 0)]
}

// CPUTime is the user and system CPU time this process has used.
func CPUTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// RSSKiB is this process's resident set size after a garbage collection that returns free memory
// to the operating system, so that it counts what is live.
func RSSKiB() int {
	debug.FreeOSMemory()
	b, _ := os.ReadFile("/proc/self/status")
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			n, _ := strconv.Atoi(strings.Fields(v)[0])
			return n
		}
	}
	return 0
}

// ChurnResult is what Churn measured: the transactions made, this process's CPU time while they
// were made less an idle baseline of the same length, and its RSS before, halfway and after:
// memory that stays flat under churn has RSSMid ≈ RSS1.
type ChurnResult struct {
	Transactions       int
	Busy, Idle         time.Duration
	RSS0, RSSMid, RSS1 int
}

// Churn measures the process's idle CPU time for d, then calls change(n) for n = 0, 1, … every
// interval for d. Commands change runs as children are not counted.
func Churn(d, interval time.Duration, change func(n int)) ChurnResult {
	// RSSKiB collects garbage and returns free memory first, so that neither the idle baseline
	// nor the churn's CPU time includes the runtime handing back what the initial sync left.
	r := ChurnResult{RSS0: RSSKiB()}
	idle0 := CPUTime()
	time.Sleep(d)
	r.Idle = CPUTime() - idle0
	cpu0 := CPUTime()
	tick := time.NewTicker(interval)
	defer tick.Stop()
	var measuring time.Duration
	start := time.Now()
	for deadline := start.Add(d); time.Now().Before(deadline); r.Transactions++ {
		<-tick.C
		if r.RSSMid == 0 && time.Since(start) >= d/2 {
			m0 := CPUTime()
			r.RSSMid = RSSKiB()
			measuring = CPUTime() - m0
		}
		change(r.Transactions)
	}
	r.Busy = CPUTime() - cpu0 - r.Idle - measuring
	r.RSS1 = RSSKiB()
	return r
}

// HeapPer reports, as the benchmark's metric "heap-B/op", the heap that each of b.N values build
// returns keeps alive, measured with runtime.MemStats around all of them: what a structure costs
// held by the thousand, which allocations per operation do not tell (a map's buckets outlive its
// inserts' garbage). Run it with -benchtime Nx for a fixed count.
func HeapPer[T any](b *testing.B, build func() T) {
	keep := make([]T, b.N)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := range keep {
		keep[i] = build()
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	b.ReportMetric(float64(int64(after.HeapAlloc)-int64(before.HeapAlloc))/float64(b.N), "heap-B/op")
	runtime.KeepAlive(keep)
}
