package e2e

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
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

// cpuTime is the process's user and system time (/proc/PID/stat, in clock ticks of 10 ms).
func cpuTime(b *testing.B, pid int) time.Duration {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	// The command name may hold spaces; the fields after it are fixed.
	f := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+2:]))
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		b.Fatalf("pid %d: stat %q", pid, data)
	}
	return time.Duration(utime+stime) * 10 * time.Millisecond
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

// churn replaces 100 endpoints a second for d: every 50 ms one slice gets 5 new ready endpoints
// while 5 of its ready ones turn terminating, and the slice changed a second earlier loses its
// terminating ones. It returns the terminations written.
func churn(b *testing.B, ctx context.Context, client kubernetes.Interface, slices []*discoveryv1.EndpointSlice, d time.Duration) int {
	const every, per, lag = 50 * time.Millisecond, 5, 20
	update := func(s *discoveryv1.EndpointSlice) *discoveryv1.EndpointSlice {
		got, err := client.DiscoveryV1().EndpointSlices(s.Namespace).Update(ctx, s, metav1.UpdateOptions{})
		if err != nil {
			b.Fatal(err)
		}
		return got
	}
	t := time.NewTicker(every)
	defer t.Stop()
	end, terminations := time.Now().Add(d), 0
	for n := 0; time.Now().Before(end); n++ {
		<-t.C
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
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return ns.Dial(ctx, netns, nil, network, addr)
		},
	}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://127.0.0.1:10249/metrics", nil)
	if err != nil {
		return false
	}
	resp, err := client.Do(req)
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), `kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family="IPv4"} `); ok {
			n, _ := strconv.ParseFloat(v, 64)
			return n >= 1
		}
	}
	return false
}

func scaleRun(b *testing.B, mode string) {
	services, endpoints := envInt(b, "BENCH_SERVICES", 10000), envInt(b, "BENCH_ENDPOINTS", 10)
	rest, churnFor := envDuration(b, "BENCH_REST", time.Minute), envDuration(b, "BENCH_CHURN", time.Minute)
	cfg := config(b)
	cfg.Nodes, cfg.ProxyMode = 1, mode
	cfg.DaemonArgs = []string{"--log.level=info",
		"--kube.trusted-managers=endpointslice-controller.k8s.io,endpointslicemirroring-controller.k8s.io," + scaleManager}
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
	for !kubeProxySynced(ctx, node.NS) {
		if time.Since(start) > 20*time.Minute {
			b.Fatal("kube-proxy did not finish a full sync in 20 minutes")
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
	restStart := s.sample()
	restAt := time.Now()
	time.Sleep(rest)
	restEnd := s.sample()
	restTook := time.Since(restAt)

	churnAt := time.Now()
	terminations := churn(b, ctx, client, slices, churnFor)
	churnEnd := s.sample()
	churnTook := time.Since(churnAt)
	// The records settle: kube-proxy's last syncs, the last removals.
	time.Sleep(10 * time.Second)
	settled := s.sample()

	pct := func(a, z procSample, d time.Duration) float64 { return 100 * float64(z.cpu-a.cpu) / float64(d) }
	rate := func(a, z procSample, d time.Duration) float64 {
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
	add("API bytes received at rest", "KiB/s", func(i int) float64 { return rate(restStart[i], restEnd[i], restTook) })
	add("CPU while 100 endpoints/s are replaced", "% of a core", func(i int) float64 { return pct(restEnd[i], churnEnd[i], churnTook) })
	add("API bytes received while 100 endpoints/s are replaced", "KiB/s", func(i int) float64 { return rate(restEnd[i], churnEnd[i], churnTook) })
	add("RSS after the churn, settled", "MiB", func(i int) float64 { return float64(settled[i].rssKiB) / 1024 })
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
	b.ReportMetric(float64(settled[1].rssKiB)/float64(settled[0].rssKiB), "rss-ratio")
	b.ReportMetric(float64(synced[1].apiBytes)/float64(max(synced[0].apiBytes, 1)), "sync-bytes-ratio")
}
