package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/rest"
	"k8s.io/utils/clock"
	clocktesting "k8s.io/utils/clock/testing"
	"k8s.io/utils/ptr"

	"github.com/endpointlag/endpointlag/cmd/endpointlag/internal/testutil"
	"github.com/endpointlag/endpointlag/probes"
)

func testOptions() Options {
	on := true
	return Options{
		NodeName: "node-a", ListenAddress: "127.0.0.1:0", LogLevel: "debug", LogFormat: "text",
		Horizon: time.Hour, MaxRecords: 100, SweepInterval: time.Minute, ShutdownTimeout: 5 * time.Second, PollInterval: time.Second, SyncTimeout: time.Minute,
		Probes: map[string]*bool{"kube": &on},
	}
}

type running struct {
	base string
	logs *testutil.SyncBuffer
	stop context.CancelFunc
	done chan struct{}
	err  error // set before done is closed
}

func startDaemon(t *testing.T, opts Options, clk clock.WithTicker, client kubernetes.Interface) *running {
	t.Helper()
	logs := &testutil.SyncBuffer{}
	d, err := newDaemon(opts, testutil.DebugLogger(logs), clk, client, client)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{base: "http://" + d.ln.Addr().String(), logs: logs, stop: cancel, done: make(chan struct{})}
	go func() {
		r.err = d.run(ctx)
		close(r.done)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-r.done:
		case <-time.After(10 * time.Second):
			t.Error("daemon did not stop")
		}
	})
	return r
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestDaemonServesMetricsRecordsAndInspect(t *testing.T) {
	start := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	clk := clocktesting.NewFakeClock(start)
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "web-1", UID: "uid-1"}, Spec: corev1.PodSpec{NodeName: "node-a"}}
	s := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "shop", Name: "web-x", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Port: ptr.To[int32](8080), Protocol: ptr.To(corev1.ProtocolTCP)}},
		Endpoints: []discoveryv1.Endpoint{{
			Addresses:  []string{"10.244.1.5"},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)},
			NodeName:   ptr.To("node-a"),
			TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: "shop", Name: "web-1", UID: "uid-1"},
		}},
	}
	client := fake.NewClientset(p, s)
	r := startDaemon(t, testOptions(), clk, client)
	waitFor(t, "/readyz", func() bool { code, _ := get(t, r.base+"/readyz"); return code == http.StatusOK })

	ctx := context.Background()
	p.DeletionTimestamp = &metav1.Time{Time: start.Add(30 * time.Second)}
	p.DeletionGracePeriodSeconds = ptr.To[int64](30)
	if _, err := client.CoreV1().Pods("shop").Update(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the pod's deletion", func() bool { return strings.Contains(r.logs.String(), "pod deleted") })
	clk.Step(40 * time.Millisecond)
	s.Endpoints[0].Conditions = discoveryv1.EndpointConditions{Ready: ptr.To(false), Serving: ptr.To(true), Terminating: ptr.To(true)}
	if _, err := client.DiscoveryV1().EndpointSlices("shop").Update(ctx, s, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	want := `endpointlag_propagation_seconds_bucket{path="",source="",stage="endpointslice",le="0.025"} 0
endpointlag_propagation_seconds_bucket{path="",source="",stage="endpointslice",le="0.05"} 1
`
	waitFor(t, "the propagation sample", func() bool { _, m := get(t, r.base+"/metrics"); return strings.Contains(m, want) })
	_, metrics := get(t, r.base+"/metrics")
	for _, line := range []string{
		`endpointlag_propagation_seconds_sum{path="",source="",stage="endpointslice"} 0.04`,
		`endpointlag_propagation_seconds_count{path="",source="",stage="endpointslice"} 1`,
		`endpointlag_pending_endpoints{stage="endpointslice_removed"} 1`,
		`endpointlag_probe_up{probe="kube"} 1`,
		`endpointlag_build_info{goversion="`,
	} {
		if !strings.Contains(metrics, line) {
			t.Errorf("/metrics lacks %q", line)
		}
	}

	code, body := get(t, r.base+"/api/v1/records")
	var resp RecordsResponse
	if err := json.Unmarshal([]byte(body), &resp); code != http.StatusOK || err != nil {
		t.Fatalf("/api/v1/records: %d %v\n%s", code, err, body)
	}
	if len(resp.Records) != 1 || resp.Node != "node-a" {
		t.Fatalf("records = %+v", resp)
	}
	rec := resp.Records[0]
	if rec.Endpoint.String() != "10.244.1.5:8080/TCP" || !rec.Local || len(rec.Stages) != 2 ||
		rec.Stages[1].Propagation == nil || *rec.Stages[1].Propagation != 0.04 {
		t.Errorf("record = %+v", rec)
	}

	var out, errOut bytes.Buffer
	if code := run([]string{"inspect", "--daemon", r.base}, &out, &errOut); code != 0 {
		t.Fatalf("inspect exit %d: %s", code, errOut.String())
	}
	lines := strings.Split(out.String(), "\n")
	header := strings.Fields(lines[0])
	row := strings.Fields(lines[1])
	wantHeader := []string{"POD", "SERVICE", "ENDPOINT", "LOCAL", "DELETED", "ENDPOINTSLICE", "ENDPOINTSLICE_REMOVED", "GONE", "PENDING", "CONNECTIONS"}
	wantRow := []string{"shop/web-1", "shop/web", "10.244.1.5:8080/TCP", "yes", "+0.000s", "+0.040s", "-", "-", "endpointslice_removed", "-"}
	if strings.Join(header, " ") != strings.Join(wantHeader, " ") || strings.Join(row, " ") != strings.Join(wantRow, " ") {
		t.Errorf("inspect table:\n%s\nwant header %q\nwant row %q", out.String(), wantHeader, wantRow)
	}
	out.Reset()
	if code := run([]string{"inspect", "--daemon", r.base, "-o", "json", "-n", "other"}, &out, &errOut); code != 0 {
		t.Fatalf("inspect -o json exit %d: %s", code, errOut.String())
	}
	if err := json.Unmarshal(out.Bytes(), &resp); err != nil || len(resp.Records) != 0 {
		t.Errorf("inspect -o json -n other: %v %+v", err, resp)
	}

	// Shutdown: bounded, logged with what was still pending.
	r.stop()
	select {
	case <-r.done:
		if r.err != nil {
			t.Errorf("run returned %v", r.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no shutdown within 10 s")
	}
	if !strings.Contains(r.logs.String(), `msg=stopped records=1 pods=1 pending.endpointslice_removed=1`) {
		t.Errorf("the exit log does not say what was pending:\n%s", r.logs.String())
	}
}

// An API server that cannot be reached at start: the daemon keeps running and retrying, /readyz
// says why it is not ready, and the failures are counted.
func TestUnreachableAPIServer(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens there now
	client, err := kubernetes.NewForConfig(&rest.Config{Host: "http://" + addr, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	r := startDaemon(t, testOptions(), clock.RealClock{}, client)
	waitFor(t, "a counted probe error", func() bool {
		_, m := get(t, r.base+"/metrics")
		return regexp.MustCompile(`endpointlag_probe_errors_total\{probe="kube",reason="source"\} [1-9]`).MatchString(m)
	})
	code, body := get(t, r.base+"/readyz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "waiting for probes to sync: kube") {
		t.Errorf("/readyz = %d %q", code, body)
	}
	if code, _ := get(t, r.base+"/healthz"); code != http.StatusOK {
		t.Errorf("/healthz = %d", code)
	}
	_, m := get(t, r.base+"/metrics")
	if !strings.Contains(m, `endpointlag_probe_up{probe="kube"} 0`) {
		t.Errorf("probe_up is not 0")
	}
	if !strings.Contains(r.logs.String(), "connection refused") {
		t.Errorf("the log does not say why:\n%s", r.logs.String())
	}
}

func TestFlagErrors(t *testing.T) {
	t.Setenv("NODE_NAME", "")
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"--record.max=0", "--log.level=loud", "--web.listen-address=nowhere"}, []string{
			`--log.level: "loud" is not one of debug, info, warn, error`,
			"--record.max must be positive, got 0",
			"--web.listen-address: address nowhere: missing port in address",
			"--node-name (or NODE_NAME) is required by --probe.kube",
		}},
		{[]string{"--probe.kube=false", "--probe.nftables=false", "--probe.iptables=false", "--probe.ipvs=false", "--probe.packets=false", "--probe.ingress=false", "--node-name=n"}, []string{"no probe enabled"}},
		{[]string{"--node-name=n", "--packets.attach=xdp"}, []string{`--packets.attach must be auto, tcx or tc, got "xdp"`}},
		{[]string{"--node-name=n", "extra"}, []string{`unknown command "extra"`}},
		{[]string{"--bogus"}, []string{"unknown flag: --bogus; see --help"}},
		{[]string{"inspect", "-o", "yaml"}, []string{`-o "yaml": use table or json`}},
	} {
		var out, errOut bytes.Buffer
		if code := run(tc.args, &out, &errOut); code != 2 {
			t.Errorf("%q: exit %d, want 2", tc.args, code)
		}
		for _, w := range tc.want {
			if !strings.Contains(errOut.String(), w) {
				t.Errorf("%q: stderr lacks %q:\n%s", tc.args, w, errOut.String())
			}
		}
	}
}

func TestHelpAndVersion(t *testing.T) {
	var out, errOut bytes.Buffer
	if code := run([]string{"--help"}, &out, &errOut); code != 0 || !strings.Contains(errOut.String(), "--probe.kube") {
		t.Errorf("--help: exit %d\n%s", code, errOut.String())
	}
	errOut.Reset()
	if code := run([]string{"inspect", "--help"}, &out, &errOut); code != 0 || !strings.Contains(errOut.String(), "--api") {
		t.Errorf("inspect --help: exit %d\n%s", code, errOut.String())
	}
	if code := run([]string{"version"}, &out, &errOut); code != 0 || !strings.HasPrefix(out.String(), "endpointlag ") {
		t.Errorf("version: exit %d %q", code, out.String())
	}
}

func TestBadKubeconfig(t *testing.T) {
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(path, []byte("not: [a kubeconfig"), 0o600); err != nil {
		t.Fatal(err)
	}
	var out, errOut bytes.Buffer
	if code := run([]string{"--node-name=n", "--kubeconfig", path, "--web.listen-address=127.0.0.1:0"}, &out, &errOut); code != 1 {
		t.Errorf("exit %d, want 1", code)
	}
	if !strings.Contains(errOut.String(), "--kubeconfig "+path) {
		t.Errorf("the error does not name the kubeconfig: %s", errOut.String())
	}
}

func TestInspectDaemonDown(t *testing.T) {
	var out, errOut bytes.Buffer
	if code := run([]string{"inspect", "--daemon", "http://127.0.0.1:1"}, &out, &errOut); code != 1 {
		t.Errorf("exit %d, want 1", code)
	}
	if !strings.Contains(errOut.String(), "is it running?") {
		t.Errorf("stderr: %s", errOut.String())
	}
}

// SIGTERM, as the kubelet sends it: the daemon stops within its shutdown timeout, exits 0 and
// logs what it still held.
func TestSIGTERM(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	unreachable := ln.Addr().String()
	ln.Close()
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	cfg := "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: \"http://" + unreachable + "\"}\n" +
		"contexts:\n- name: c\n  context: {cluster: c, user: u}\ncurrent-context: c\nusers:\n- name: u\n  user: {}\n"
	if err := os.WriteFile(kubeconfig, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	stderr := &testutil.SyncBuffer{}
	code := make(chan int, 1)
	go func() {
		// The packets probe would attach to this machine's veths: not in a unit test.
		code <- run([]string{"--node-name=node-a", "--kubeconfig", kubeconfig, "--web.listen-address=127.0.0.1:0", "--shutdown-timeout=3s", "--probe.packets=false"}, io.Discard, stderr)
	}()
	waitFor(t, "the daemon to start", func() bool { return strings.Contains(stderr.String(), "waiting for informers to sync") })
	if err := syscall.Kill(os.Getpid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case c := <-code:
		if c != 0 {
			t.Errorf("exit code %d after SIGTERM\n%s", c, stderr.String())
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("not stopped 5 s after SIGTERM with --shutdown-timeout=3s\n%s", stderr.String())
	}
	for _, want := range []string{"msg=\"shutting down\" signal=", "msg=stopped records=0 pods=0"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("the log lacks %q:\n%s", want, stderr.String())
		}
	}
}

// flakyProbe fails its first runs, once with an error and once with a panic, then syncs.
type flakyProbe struct {
	mu   sync.Mutex
	runs int
}

func (p *flakyProbe) Name() string { return "flaky" }

func (p *flakyProbe) Run(ctx context.Context, sink probes.Sink) error {
	p.mu.Lock()
	p.runs++
	n := p.runs
	p.mu.Unlock()
	switch n {
	case 1:
		return errors.New("loading the eBPF programs: ring buffer not supported")
	case 2:
		panic("a decoder met data of a shape it did not expect")
	}
	sink.SetStatus("flaky", probes.Status{Up: true, Synced: true})
	<-ctx.Done()
	return nil
}

var flaky = &flakyProbe{}

func init() {
	probes.Register(probes.Factory{Name: "flaky", Help: "a test probe that fails twice", New: func(probes.Env) (probes.Probe, error) { return flaky, nil }})
}

// A probe that fails at start (an error, a panic) is reported, does not hold readiness back, is
// started again with backoff, and counts as up once it reads its source.
func TestFailingProbeIsRetried(t *testing.T) {
	opts := testOptions()
	on := true
	opts.Probes["flaky"] = &on
	r := startDaemon(t, opts, clock.RealClock{}, fake.NewClientset())
	waitFor(t, "/readyz despite the failed probe", func() bool { code, _ := get(t, r.base+"/readyz"); return code == http.StatusOK })
	_, m := get(t, r.base+"/metrics")
	if !strings.Contains(m, `endpointlag_probe_up{probe="flaky"} 0`) || !strings.Contains(m, `endpointlag_probe_active{probe="flaky"} 0`) {
		t.Errorf("the failed probe is not reported down and inactive:\n%s", grepLines(m, "flaky"))
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		_, m = get(t, r.base+"/metrics")
		if strings.Contains(m, `endpointlag_probe_up{probe="flaky"} 1`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the probe never came back up:\n%s\nlogs:\n%s", grepLines(m, "flaky"), r.logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !strings.Contains(m, `endpointlag_probe_errors_total{probe="flaky",reason="source"} 2`) {
		t.Errorf("two failures not counted:\n%s", grepLines(m, "flaky"))
	}
	if logs := r.logs.String(); !strings.Contains(logs, "ring buffer not supported") || !strings.Contains(logs, "panic: a decoder met data") {
		t.Errorf("the failures' reasons are not logged:\n%s", logs)
	}
}

func grepLines(text, substr string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// Go's profiles are served only with --web.enable-profiling.
func TestProfiling(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC))
	for _, on := range []bool{false, true} {
		opts := testOptions()
		opts.EnableProfiling = on
		r := startDaemon(t, opts, clk, fake.NewClientset())
		code, body := get(t, r.base+"/debug/pprof/")
		if on && (code != http.StatusOK || !strings.Contains(body, "goroutine")) || !on && code != http.StatusNotFound {
			t.Errorf("--web.enable-profiling=%v: /debug/pprof/ answered %d", on, code)
		}
	}
}

func TestLimitConcurrent(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	h := limitConcurrent(2, func(w http.ResponseWriter, _ *http.Request) {
		entered <- struct{}{}
		<-release
	})
	srv := httptest.NewServer(h)
	defer srv.Close()
	codes := make(chan int, 2)
	for range 2 {
		go func() {
			resp, err := http.Get(srv.URL)
			if err != nil {
				codes <- 0
				return
			}
			resp.Body.Close()
			codes <- resp.StatusCode
		}()
		<-entered
	}
	resp, err := http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") == "" {
		t.Errorf("a third request at once: %s, Retry-After %q; want 429 with Retry-After", resp.Status, resp.Header.Get("Retry-After"))
	}
	close(release)
	for range 2 {
		if c := <-codes; c != http.StatusOK {
			t.Errorf("a request within the limit: %d", c)
		}
	}
	go func() { <-entered }()
	if resp, err := http.Get(srv.URL); err != nil || resp.StatusCode != http.StatusOK {
		t.Errorf("after the others ended: %v %v", resp, err)
	}
}
