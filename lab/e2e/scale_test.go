package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/utils/ptr"

	"github.com/endpointlag/endpointlag/lab/cluster"
	"github.com/endpointlag/endpointlag/lab/internal/ns"
	"github.com/endpointlag/endpointlag/lab/load"
	"github.com/endpointlag/endpointlag/lab/scenario"
)

// scaleManager is the managed-by label of the slices BenchmarkScale writes; the daemons trust it
// (--kube.trusted-managers), so that its terminations are measured like real ones.
const scaleManager = "scale-benchmark.endpointlag.dev"

// BenchmarkScale runs endpointlag beside kube-proxy on one node of the lab with BENCH_SERVICES
// (10,000) selector-less Services of BENCH_ENDPOINTS (10) endpoints each in the API server, per
// kube-proxy mode (BENCH_MODES: nftables,iptables), and compares the two processes side by side:
// RSS, CPU at rest and while 100 endpoints a second are replaced (BENCH_CHURN long), the bytes
// each received from the API server, and the time each took to sync when restarted with the
// objects in place. It logs a table of both and their ratio.
//
// The churn is a rolling update's: every 50 ms one Service gets 5 new ready endpoints and 5 of
// its old ones turn terminating, and a second later those 5 leave the slice: 100 terminations a
// second, each a record in endpointlag that waits for kube-proxy's rules.
//
// Run (root, after make build lab-bins lab-tool):
//
//	cd lab && LAB_BIN_DIR=… go test ./e2e -run '^$' -bench Scale -benchtime 1x -timeout 120m -v
func BenchmarkScale(b *testing.B) {
	modes := strings.Split(envOr("BENCH_MODES", "nftables,iptables"), ",")
	for _, mode := range modes {
		b.Run(mode, func(b *testing.B) {
			for b.Loop() {
				scaleRun(b, mode)
			}
		})
	}
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func envInt(b *testing.B, name string, def int) int {
	v, err := strconv.Atoi(envOr(name, strconv.Itoa(def)))
	if err != nil || v <= 0 {
		b.Fatalf("%s=%q: want a positive number", name, os.Getenv(name))
	}
	return v
}

func envDuration(b *testing.B, name string, def time.Duration) time.Duration {
	v, err := time.ParseDuration(envOr(name, def.String()))
	if err != nil || v <= 0 {
		b.Fatalf("%s=%q: want a positive duration", name, os.Getenv(name))
	}
	return v
}

// procSample is what /proc and ss tell of one process at one moment.
type procSample struct {
	rssKiB int
	cpu    time.Duration
	// apiBytes is what its connections to the API server received.
	apiBytes int64
}

// sampler reads both processes of a node.
type sampler struct {
	b      *testing.B
	netns  string
	api    netip.AddrPort
	labels [2]string
	pids   [2]int
}

func (s *sampler) sample() [2]procSample {
	s.b.Helper()
	bytes := s.apiBytes()
	var out [2]procSample
	for i, pid := range s.pids {
		out[i] = procSample{rssKiB: rssKiB(s.b, pid), cpu: cpuTime(s.b, pid), apiBytes: bytes[pid]}
	}
	return out
}

func rssKiB(b *testing.B, pid int) int {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			n, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			if err != nil {
				b.Fatalf("pid %d VmRSS %q", pid, v)
			}
			return n
		}
	}
	b.Fatalf("pid %d: no VmRSS", pid)
	return 0
}

// cpuTime is the process's user and system time, with that of the children it waited for
// (kube-proxy runs nft and iptables-restore; /proc/PID/stat, in clock ticks of 10 ms).
func cpuTime(b *testing.B, pid int) time.Duration {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	// The command name may hold spaces; the fields after it are fixed.
	f := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+2:]))
	var ticks int64
	for _, field := range f[11:15] { // utime, stime, cutime, cstime
		n, err := strconv.ParseInt(field, 10, 64)
		if err != nil {
			b.Fatalf("pid %d: stat %q", pid, data)
		}
		ticks += n
	}
	return time.Duration(ticks) * 10 * time.Millisecond
}

// apiBytes sums, per PID, bytes_received of the node's TCP connections to the API server
// (ss's tcp_info; a connection counts from its start).
func (s *sampler) apiBytes() map[int]int64 {
	s.b.Helper()
	out, err := ns.Command(s.netns, "ss", "-tinpH", "dst", s.api.String()).Output()
	if err != nil {
		s.b.Fatalf("ss: %v", err)
	}
	got := map[int]int64{}
	var pid int
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "\t") && !strings.HasPrefix(line, " ") {
			pid = 0
			if _, rest, ok := strings.Cut(line, "pid="); ok {
				end := strings.IndexAny(rest, ",)")
				pid, _ = strconv.Atoi(rest[:max(end, 0)])
			}
			continue
		}
		for field := range strings.FieldsSeq(line) {
			if v, ok := strings.CutPrefix(field, "bytes_received:"); ok {
				n, _ := strconv.ParseInt(v, 10, 64)
				got[pid] += n
			}
		}
	}
	return got
}

// scaleObjects writes the Services and slices, 8 writers at a time.
func scaleObjects(b *testing.B, ctx context.Context, client kubernetes.Interface, namespace string, services, endpoints int) []*discoveryv1.EndpointSlice {
	slices := make([]*discoveryv1.EndpointSlice, services)
	var mu sync.Mutex
	var firstErr error
	next := make(chan int)
	var wg sync.WaitGroup
	start := time.Now()
	for range 8 {
		wg.Go(func() {
			for i := range next {
				svc := &corev1.Service{
					ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: fmt.Sprintf("s%05d", i)},
					Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP}}},
				}
				_, err := client.CoreV1().Services(namespace).Create(ctx, svc, metav1.CreateOptions{})
				var s *discoveryv1.EndpointSlice
				if err == nil {
					s, err = client.DiscoveryV1().EndpointSlices(namespace).Create(ctx, scaleSlice(namespace, i, endpoints), metav1.CreateOptions{})
				}
				mu.Lock()
				if err != nil && firstErr == nil {
					firstErr = err
				}
				slices[i] = s
				mu.Unlock()
			}
		})
	}
	for i := range services {
		if i%1000 == 0 && i > 0 {
			b.Logf("%d of %d Services and slices written (%s)", i, services, time.Since(start).Round(time.Second))
		}
		next <- i
	}
	close(next)
	wg.Wait()
	if firstErr != nil {
		b.Fatal(firstErr)
	}
	b.Logf("%d Services with %d endpoints each written in %s", services, endpoints, time.Since(start).Round(time.Second))
	return slices
}

// scaleAddr is endpoint n's address: 100.64.0.0/10, outside the lab's pod and node networks.
func scaleAddr(n int) string {
	return netip.AddrFrom4([4]byte{100, 64 + byte(n>>16), byte(n >> 8), byte(n)}).String()
}

var scaleSerial int

// scaleEndpoint is a ready endpoint of a pod on another node, with a new address and UID.
func scaleEndpoint() discoveryv1.Endpoint {
	scaleSerial++
	name := fmt.Sprintf("p%07d", scaleSerial)
	return discoveryv1.Endpoint{
		Addresses:  []string{scaleAddr(scaleSerial)},
		Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true), Serving: ptr.To(true), Terminating: ptr.To(false)},
		NodeName:   ptr.To("elsewhere"),
		TargetRef:  &corev1.ObjectReference{Kind: "Pod", Name: name, UID: types.UID("scale-" + name)},
	}
}

func scaleSlice(namespace string, i, endpoints int) *discoveryv1.EndpointSlice {
	s := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: fmt.Sprintf("s%05d-1", i), Labels: map[string]string{
			discoveryv1.LabelServiceName: fmt.Sprintf("s%05d", i), discoveryv1.LabelManagedBy: scaleManager}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To[int32](8080), Protocol: ptr.To(corev1.ProtocolTCP)}},
	}
	for range endpoints {
		s.Endpoints = append(s.Endpoints, scaleEndpoint())
	}
	return s
}

// churn replaces rate endpoints a second for d: at every tick one slice gets 5 new ready
// endpoints while 5 of its ready ones turn terminating, and the slice changed a second earlier
// loses its terminating ones (at 100 a second, a tick every 50 ms). Every minute it calls
// minute. It returns the terminations written.
func churn(b *testing.B, ctx context.Context, client kubernetes.Interface, slices []*discoveryv1.EndpointSlice, rate int, d time.Duration, minute func(int)) int {
	const per = 5
	every := time.Second * per / time.Duration(rate)
	lag := int(time.Second / every)
	update := func(s *discoveryv1.EndpointSlice) *discoveryv1.EndpointSlice {
		got, err := client.DiscoveryV1().EndpointSlices(s.Namespace).Update(ctx, s, metav1.UpdateOptions{})
		if err != nil {
			b.Fatal(err)
		}
		return got
	}
	t := time.NewTicker(every)
	defer t.Stop()
	start := time.Now()
	end, terminations, minutes := start.Add(d), 0, 0
	for n := 0; time.Now().Before(end); n++ {
		<-t.C
		if m := int(time.Since(start) / time.Minute); m > minutes {
			minutes = m
			minute(m)
		}
		i := n % len(slices)
		s := slices[i].DeepCopy()
		turned := 0
		for j := range s.Endpoints {
			c := &s.Endpoints[j].Conditions
			if turned < per && *c.Ready {
				c.Ready, c.Serving, c.Terminating = ptr.To(false), ptr.To(true), ptr.To(true)
				turned++
			}
		}
		for range per {
			s.Endpoints = append(s.Endpoints, scaleEndpoint())
		}
		slices[i] = update(s)
		terminations += turned
		if n >= lag {
			k := (n - lag) % len(slices)
			s := slices[k].DeepCopy()
			s.Endpoints = slicesDeleteTerminating(s.Endpoints)
			slices[k] = update(s)
		}
	}
	return terminations
}

func slicesDeleteTerminating(eps []discoveryv1.Endpoint) []discoveryv1.Endpoint {
	var out []discoveryv1.Endpoint
	for _, e := range eps {
		if !*e.Conditions.Terminating {
			out = append(out, e)
		}
	}
	return out
}

// kubeProxySynced reports whether node's kube-proxy finished a full sync since it started.
func kubeProxySynced(ctx context.Context, netns string) bool {
	text, err := kubeProxyMetrics(ctx, netns)
	if err != nil {
		return false
	}
	for line := range strings.SplitSeq(text, "\n") {
		if v, ok := strings.CutPrefix(line, `kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family="IPv4"} `); ok {
			n, _ := strconv.ParseFloat(v, 64)
			return n >= 1
		}
	}
	return false
}

// kubeProxyMetrics reads the /metrics of the kube-proxy in netns.
func kubeProxyMetrics(ctx context.Context, netns string) (string, error) {
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return ns.Dial(ctx, netns, nil, network, addr)
		},
	}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://127.0.0.1:10249/metrics", nil)
	if err != nil {
		return "", err
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("kube-proxy's /metrics: %s", resp.Status)
	}
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// gcCycles counts the Go collections of kube-proxy and endpointlag so far, from their /metrics.
func gcCycles(b *testing.B, ctx context.Context, node *cluster.Node) [2]float64 {
	text, err := kubeProxyMetrics(ctx, node.NS)
	if err != nil {
		b.Fatal(err)
	}
	return [2]float64{seriesSum(b, text, "go_gc_duration_seconds_count"), metricSum(b, node.DaemonURL, "go_gc_duration_seconds_count")}
}

func scaleRun(b *testing.B, mode string) {
	services, endpoints := envInt(b, "BENCH_SERVICES", 10000), envInt(b, "BENCH_ENDPOINTS", 10)
	rest, churnFor := envDuration(b, "BENCH_REST", time.Minute), envDuration(b, "BENCH_CHURN", time.Minute)
	cfg := config(b)
	cfg.Nodes, cfg.ProxyMode = 1, mode
	// The chart's settings where the lab's differ: info logs, pushes every 2 s.
	cfg.DaemonArgs = []string{"--log.level=info", "--aggregator.interval=2s", "--aggregator.heartbeat=30s",
		"--kube.trusted-managers=endpointslice-controller.k8s.io,endpointslicemirroring-controller.k8s.io," + scaleManager}
	if os.Getenv("BENCH_PROFILE") != "" {
		cfg.DaemonArgs = append(cfg.DaemonArgs, "--web.enable-profiling")
	}
	// BENCH_ENDPOINTLAG: another build of the daemon (an earlier commit's, say), with its own
	// BENCH_DAEMON_ARGS when its flags differ.
	if v := os.Getenv("BENCH_ENDPOINTLAG"); v != "" {
		cfg.Endpointlag = v
	}
	if v, ok := os.LookupEnv("BENCH_DAEMON_ARGS"); ok {
		cfg.DaemonArgs = strings.Fields(v)
	}
	ctx := context.Background()
	c := upLab(b, ctx, cfg)
	rc, err := clientcmd.BuildConfigFromFlags("", c.Kubeconfig)
	if err != nil {
		b.Fatal(err)
	}
	rc.QPS, rc.Burst = 2000, 2000
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		b.Fatal(err)
	}
	const namespace = "scale"
	if err := scenario.EnsureNamespace(ctx, client, namespace); err != nil {
		b.Fatal(err)
	}
	slices := scaleObjects(b, ctx, client, namespace, services, endpoints)
	node := c.Nodes[0]

	// Both restarted with the objects in place: the initial sync, one at a time.
	start := time.Now()
	if err := c.RestartKubeProxy(ctx, node.Name); err != nil {
		b.Fatal(err)
	}
	// BENCH_SYNC_TIMEOUT: how long kube-proxy may take (iptables mode at 10,000 Services: one
	// iptables-restore of every chain, over 110,000).
	syncTimeout := envDuration(b, "BENCH_SYNC_TIMEOUT", 20*time.Minute)
	for !kubeProxySynced(ctx, node.NS) {
		if time.Since(start) > syncTimeout {
			b.Fatalf("kube-proxy did not finish a full sync in %s (BENCH_SYNC_TIMEOUT)", syncTimeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
	syncKP := time.Since(start)
	start = time.Now()
	if err := c.RestartDaemon(ctx, node.Name, syscall.SIGTERM, 20*time.Minute); err != nil {
		b.Fatal(err)
	}
	syncEL := time.Since(start)
	kp, el, err := c.PIDs(node.Name)
	if err != nil {
		b.Fatal(err)
	}
	s := &sampler{b: b, netns: node.NS, api: cluster.APIServerAddr(), labels: [2]string{"kube-proxy", "endpointlag"}, pids: [2]int{kp, el}}
	synced := s.sample()
	b.Logf("synced: kube-proxy %s, endpointlag %s", syncKP.Round(time.Millisecond), syncEL.Round(time.Millisecond))

	time.Sleep(rest / 2)
	gcStart := gcCycles(b, ctx, node)
	restStart := s.sample()
	restAt := time.Now()
	cpuProfile(b, node.DaemonURL, rest, mode+"-rest")
	time.Sleep(rest)
	restEnd := s.sample()
	restTook := time.Since(restAt)
	gcEnd := gcCycles(b, ctx, node)
	b.Logf("Go collections at rest: kube-proxy %.0f, endpointlag %.0f in %s", gcEnd[0]-gcStart[0], gcEnd[1]-gcStart[1], restTook.Round(time.Second))
	heap(b, node.DaemonURL, "at rest")

	// BENCH_ROLLOUTS: a real Deployment of 4 pods on the node, under load, restarted at that
	// interval through the churn, so that the packets probe sees late connections too.
	var app *scenario.App
	var lr *cluster.LoadRun
	if every := os.Getenv("BENCH_ROLLOUTS"); every != "" {
		app, lr = scaleApp(b, ctx, c)
		interval := envDuration(b, "BENCH_ROLLOUTS", 0)
		stopRollouts := make(chan struct{})
		defer close(stopRollouts)
		go func() {
			t := time.NewTicker(interval)
			defer t.Stop()
			for {
				select {
				case <-stopRollouts:
					return
				case <-t.C:
					if err := app.Restart(ctx); err != nil {
						b.Errorf("restarting the app: %v", err)
					}
				}
			}
		}()
	}
	// BENCH_FLOOD: from minute 10 of the churn (BENCH_FLOOD_AT), two windows of that length, the second with
	// GET /api/v1/records in a loop from 8 clients: the slice stage's delay against the
	// benchmark's own watch, without and with the flood.
	floodDone := make(chan floodResult, 1)
	if os.Getenv("BENCH_FLOOD") != "" {
		window := envDuration(b, "BENCH_FLOOD", 0)
		truth, err := watchSlices(ctx, c, namespace)
		if err != nil {
			b.Fatal(err)
		}
		defer truth.stop()
		at := envDuration(b, "BENCH_FLOOD_AT", 10*time.Minute)
		go func() { floodDone <- flood(b, ctx, c, node, truth, at, window) }()
	} else {
		close(floodDone)
	}
	churnAt := time.Now()
	cpuProfile(b, node.DaemonURL, churnFor, mode)
	rate := envInt(b, "BENCH_RATE", 100)
	terminations := churn(b, ctx, client, slices, rate, churnFor, func(m int) {
		smp := s.sample()
		b.Logf("churn, minute %d: RSS kube-proxy %.1f MiB, endpointlag %.1f MiB holding %v records", m, float64(smp[0].rssKiB)/1024, float64(smp[1].rssKiB)/1024,
			metricSum(b, node.DaemonURL, "endpointlag_tracked_records"))
	})
	churnEnd := s.sample()
	if lr != nil {
		res, err := lr.Stop()
		if err != nil {
			b.Fatal(err)
		}
		sum := load.Summarize(res)
		b.Logf("the app's load: %d requests, %d failed", sum.Requests, sum.Failed)
	}
	churnTook := time.Since(churnAt)
	// The records settle: kube-proxy's last syncs, the last removals.
	time.Sleep(10 * time.Second)
	// Before the sample that starts the window at rest: the heap's figures come from a scrape of
	// the daemon's metrics, which kube-proxy does not get in the window.
	heap(b, node.DaemonURL, "after the churn")
	settled := s.sample()
	// At rest again, now holding the churn's records, as a node does for --record.horizon after
	// any rollout: what costs per record held, not per change, shows here.
	heldAt := time.Now()
	cpuProfile(b, node.DaemonURL, rest, mode+"-held")
	time.Sleep(rest)
	held := s.sample()
	heldTook := time.Since(heldAt)

	pct := func(a, z procSample, d time.Duration) float64 { return 100 * float64(z.cpu-a.cpu) / float64(d) }
	kibps := func(a, z procSample, d time.Duration) float64 {
		return float64(z.apiBytes-a.apiBytes) / d.Seconds() / 1024
	}
	type row struct {
		name string
		v    [2]float64
		unit string
	}
	var rows []row
	add := func(name, unit string, f func(i int) float64) {
		rows = append(rows, row{name, [2]float64{f(0), f(1)}, unit})
	}
	add("initial sync", "s", func(i int) float64 { return [2]time.Duration{syncKP, syncEL}[i].Seconds() })
	add("bytes received from the API server in the initial sync", "MiB", func(i int) float64 { return float64(synced[i].apiBytes) / (1 << 20) })
	add("RSS after the initial sync", "MiB", func(i int) float64 { return float64(synced[i].rssKiB) / 1024 })
	add("RSS at rest", "MiB", func(i int) float64 { return float64(restEnd[i].rssKiB) / 1024 })
	add("CPU at rest", "% of a core", func(i int) float64 { return pct(restStart[i], restEnd[i], restTook) })
	add("API bytes received at rest", "KiB/s", func(i int) float64 { return kibps(restStart[i], restEnd[i], restTook) })
	add(fmt.Sprintf("CPU while %d endpoints/s are replaced", rate), "% of a core", func(i int) float64 { return pct(restEnd[i], churnEnd[i], churnTook) })
	add(fmt.Sprintf("API bytes received while %d endpoints/s are replaced", rate), "KiB/s", func(i int) float64 { return kibps(restEnd[i], churnEnd[i], churnTook) })
	add("RSS after the churn, settled", "MiB", func(i int) float64 { return float64(settled[i].rssKiB) / 1024 })
	add("CPU at rest after the churn, its records held", "% of a core", func(i int) float64 { return pct(settled[i], held[i], heldTook) })
	add("RSS at rest after the churn", "MiB", func(i int) float64 { return float64(held[i].rssKiB) / 1024 })
	var tab strings.Builder
	fmt.Fprintf(&tab, "\n| %s, %d Services / %d endpoints, %d terminations in %s | kube-proxy | endpointlag | endpointlag / kube-proxy |\n|---|---|---|---|\n",
		mode, services, services*endpoints, terminations, churnTook.Round(time.Second))
	for _, r := range rows {
		ratio := "—"
		if r.v[0] > 0 {
			ratio = fmt.Sprintf("%.2f", r.v[1]/r.v[0])
		}
		fmt.Fprintf(&tab, "| %s | %.2f %s | %.2f %s | %s |\n", r.name, r.v[0], r.unit, r.v[1], r.unit, ratio)
	}
	b.Log(tab.String())
	if f, ok := <-floodDone; ok {
		for i, name := range []string{"without a flood", "with 8 clients reading /api/v1/records in a loop"} {
			d := f.delays[i]
			b.Logf("slice stage − the benchmark's own watch, %s: n=%d p50 %.1f ms, p99 %.1f ms, max %.1f ms",
				name, len(d), quantileMs(d, 0.5), quantileMs(d, 0.99), quantileMs(d, 1))
		}
		b.Logf("the flood: %d requests answered, %.1f MiB each on average, %d refused (429), %d failed", f.requests, f.meanMiB, f.refused, f.failed)
	}
	var late float64
	recs, err := c.Records(ctx, node)
	if err != nil {
		b.Fatal(err)
	}
	for _, r := range recs.Records {
		late += float64(len(r.Connections))
	}
	metrics := metricsText(b, node.DaemonURL)
	for _, m := range []string{"endpointlag_records_dropped_total", "endpointlag_packet_events_dropped_total", "endpointlag_late_connections_total",
		"endpointlag_packet_recent_overruns_total", "endpointlag_records_expired_total"} {
		b.Logf("%s = %v", m, seriesSum(b, metrics, m))
	}
	b.Logf("late connections in the records (from the ring buffer): %v; records held: %d", late, len(recs.Records))
	b.ReportMetric(float64(settled[1].rssKiB)/float64(settled[0].rssKiB), "rss-ratio")
	b.ReportMetric(float64(synced[1].apiBytes)/float64(max(synced[0].apiBytes, 1)), "sync-bytes-ratio")
}

// heap logs where the daemon's RSS goes from the Go runtime's view of its heap: live objects,
// free spans the runtime keeps and what it gave back to the kernel; with BENCH_PROFILE, the heap
// profile too.
func heap(b *testing.B, base, when string) {
	metrics := metricsText(b, base)
	mib := func(m string) float64 { return seriesSum(b, metrics, m) / (1 << 20) }
	b.Logf("endpointlag's Go heap %s: in use %.1f MiB, idle %.1f MiB of which released %.1f MiB, stacks %.1f MiB, runtime %.1f MiB",
		when, mib("go_memstats_heap_inuse_bytes"), mib("go_memstats_heap_idle_bytes"), mib("go_memstats_heap_released_bytes"),
		mib("go_memstats_stack_inuse_bytes"), mib("go_memstats_other_sys_bytes")+mib("go_memstats_mspan_inuse_bytes")+mib("go_memstats_gc_sys_bytes"))
	if dir := os.Getenv("BENCH_PROFILE"); dir != "" {
		saveProfile(b, base+"/debug/pprof/heap", filepath.Join(dir, "endpointlag-heap-"+strings.ReplaceAll(when, " ", "-")+".pprof"))
	}
}

// cpuProfile saves, with BENCH_PROFILE, the daemon's CPU profile over the next d (less a second)
// as endpointlag-<name>.pprof, in the background.
func cpuProfile(b *testing.B, base string, d time.Duration, name string) {
	if dir := os.Getenv("BENCH_PROFILE"); dir != "" && d >= 2*time.Second {
		go saveProfile(b, fmt.Sprintf("%s/debug/pprof/profile?seconds=%d", base, int(d.Seconds())-1), filepath.Join(dir, "endpointlag-"+name+".pprof"))
	}
}

func saveProfile(b *testing.B, url, path string) {
	resp, err := http.Get(url)
	if err != nil {
		b.Errorf("profile: %v", err)
		return
	}
	defer resp.Body.Close()
	f, err := os.Create(path)
	if err != nil {
		b.Errorf("profile: %v", err)
		return
	}
	defer f.Close()
	if _, err := io.Copy(f, resp.Body); err != nil {
		b.Errorf("profile: %v", err)
	}
}

// scaleApp runs a Deployment of 4 pods behind its ClusterIP with load from the client pod.
func scaleApp(b *testing.B, ctx context.Context, c *cluster.Cluster) (*scenario.App, *cluster.LoadRun) {
	app := &scenario.App{Client: c.Client, Namespace: "churn", Name: "web", Replicas: 4}
	if err := app.Apply(ctx, scenario.Behaviour{}); err != nil {
		b.Fatal(err)
	}
	if err := app.WaitSettled(ctx, 2*time.Minute); err != nil {
		b.Fatal(err)
	}
	if err := app.WaitServing(ctx, c.ClientNS(), time.Minute); err != nil {
		b.Fatal(err)
	}
	targets, err := app.Targets(ctx)
	if err != nil {
		b.Fatal(err)
	}
	lr, err := c.StartLoad("churn", load.Config{Targets: targets, Rate: 50, Duration: 30 * time.Minute, Timeout: time.Second})
	if err != nil {
		b.Fatal(err)
	}
	return app, lr
}

type floodResult struct {
	// delays are the slice stage's delays against the benchmark's own watch, without and with
	// the flood, in ms.
	delays                    [2][]float64
	requests, refused, failed int
	meanMiB                   float64
}

// flood waits start, then measures two windows of length window: without, then with 8 clients
// reading /api/v1/records in a loop. A termination belongs to the window its truth falls in.
func flood(b *testing.B, ctx context.Context, c *cluster.Cluster, node *cluster.Node, truth *sliceTruth, start, window time.Duration) floodResult {
	var res floodResult
	time.Sleep(start)
	windows := [2][2]time.Time{{time.Now(), time.Now().Add(window)}}
	time.Sleep(window)
	windows[1] = [2]time.Time{time.Now(), time.Now().Add(window)}
	var mu sync.Mutex
	var bytes int64
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for time.Now().Before(windows[1][1]) {
				resp, err := http.Get(node.DaemonURL + "/api/v1/records")
				n, code := int64(0), 0
				if err == nil {
					n, err = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					code = resp.StatusCode
				}
				mu.Lock()
				switch {
				case err != nil:
					res.failed++
				case code == http.StatusTooManyRequests:
					res.refused++
				default:
					res.requests++
					bytes += n
				}
				mu.Unlock()
				if code == http.StatusTooManyRequests {
					time.Sleep(10 * time.Millisecond)
				}
			}
		})
	}
	wg.Wait()
	time.Sleep(5 * time.Second) // the last terminations' records
	recs, err := c.Records(ctx, node)
	if err != nil {
		b.Errorf("records: %v", err)
		return res
	}
	for _, r := range recs.Records {
		at, ok := truth.terminatingAt(r.Pod.UID)
		if !ok {
			continue
		}
		for _, st := range r.Stages {
			if st.Stage != "endpointslice" {
				continue
			}
			for i, w := range windows {
				if !at.Before(w[0]) && at.Before(w[1]) {
					res.delays[i] = append(res.delays[i], float64(st.Time.Sub(at))/float64(time.Millisecond))
				}
			}
		}
	}
	if res.requests > 0 {
		res.meanMiB = float64(bytes) / float64(res.requests) / (1 << 20)
	}
	return res
}

// quantileMs is the q-quantile of vs (nearest rank), 0 for none.
func quantileMs(vs []float64, q float64) float64 {
	if len(vs) == 0 {
		return 0
	}
	s := slices.Clone(vs)
	slices.Sort(s)
	return s[min(int(q*float64(len(s))), len(s)-1)]
}
