// Package e2e runs endpointlag on the lab's real control plane and checks what it measures
// against what the test sees itself. It needs root and the binaries `make e2e` builds.
package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"

	"github.com/endpointlag/endpointlag/lab/cluster"
	"github.com/endpointlag/endpointlag/lab/internal/ns"
	"github.com/endpointlag/endpointlag/lab/report"
	"github.com/endpointlag/endpointlag/lab/scenario"
)

// config returns the lab's configuration, or why the lab cannot run here.
func config(t testing.TB) cluster.Config {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("the lab needs root (network namespaces, nftables)")
	}
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	cfg := cluster.Config{
		BinDir:      os.Getenv("LAB_BIN_DIR"),
		Endpointlag: filepath.Join(root, "bin/endpointlag"),
		Tool:        filepath.Join(root, "bin/lab"),
		StateDir:    filepath.Join(os.TempDir(), "endpointlag-e2e"),
		Log:         slog.New(slog.NewTextHandler(testWriter{t}, nil)),
	}
	// The ingress proxies' binaries, for the tests that run them (see ingressConfig).
	if _, err := os.Stat(os.Getenv("LAB_TRAEFIK")); err == nil {
		cfg.Traefik = os.Getenv("LAB_TRAEFIK")
	}
	if p, err := exec.LookPath("haproxy"); err == nil {
		cfg.HAProxy = p
	}
	if _, err := os.Stat(os.Getenv("LAB_OTELCOL")); err == nil {
		cfg.Otelcol = os.Getenv("LAB_OTELCOL")
	}
	var missing []string
	for _, p := range []string{filepath.Join(cfg.BinDir, "kube-apiserver"), cfg.Endpointlag, cfg.Tool} {
		if _, err := os.Stat(p); err != nil {
			missing = append(missing, p)
		}
	}
	if cfg.BinDir == "" || len(missing) > 0 {
		t.Skipf("lab binaries missing (%s; LAB_BIN_DIR=%q): run `make e2e`", strings.Join(missing, ", "), cfg.BinDir)
	}
	return cfg
}

// upLab starts a lab with cfg for a test, and at its end stops it and checks that nothing of it
// is left.
func upLab(t testing.TB, ctx context.Context, cfg cluster.Config) *cluster.Cluster {
	t.Helper()
	rootLinks := linkNames(t)
	c, err := cluster.Up(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.Down()
		assertClean(t, cfg, rootLinks)
	})
	return c
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// TestLab runs the scenarios on one lab per kube-proxy mode, in order, then checks the teardown.
func TestLab(t *testing.T) {
	for _, mode := range []string{"nftables", "iptables"} {
		t.Run(mode, func(t *testing.T) { testLab(t, mode) })
	}
}

func testLab(t *testing.T, mode string) {
	cfg := config(t)
	cfg.ProxyMode = mode
	// Two nodes in two zones, and slices of at most 5 endpoints: the shapes below need them.
	cfg.Nodes, cfg.Zones, cfg.MaxEndpointsPerSlice = 2, []string{"a", "b"}, 5
	dataplaneStage := mode
	rootLinks := linkNames(t)
	ctx := context.Background()
	c, err := cluster.Up(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	downed := false
	defer func() {
		if !downed {
			c.Down()
		}
	}()
	app := &scenario.App{Client: c.Client, Namespace: "e2e", Name: "web", Replicas: 4}
	if err := app.Apply(ctx, scenario.Behaviour{}); err != nil {
		t.Fatal(err)
	}
	if err := app.WaitSettled(ctx, 2*time.Minute); err != nil {
		t.Fatal(err)
	}
	ls := scenario.LoadSettings{Rate: 200, Timeout: 3 * time.Second}

	var first *scenario.Rollout
	t.Run("every daemon records every deleted pod's endpointslice and dataplane stages", func(t *testing.T) {
		first, err = scenario.RunRollout(ctx, c, app, "rollout", scenario.Behaviour{}, ls, testWriter{t})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("rollout with no preStop, exit at once: %d requests, %d failed %v", first.Summary.Requests, first.Summary.Failed, first.Summary.ByKind)
		for _, recs := range first.Records {
			for _, stage := range []string{"endpointslice", dataplaneStage} {
				seen := map[string]bool{}
				for _, r := range recs.Records {
					if s := r.Stage(stage); s != nil && !s.Initial {
						seen[r.Pod.UID] = true
					}
				}
				for uid, p := range first.Deleted {
					if !seen[string(uid)] {
						t.Errorf("%s's daemon has no %s stage for %s", recs.Node, stage, p.Name)
					}
				}
			}
		}
	})

	t.Run("every request that failed at a replaced pod after its deletion began is among the daemons' late or dead connections", func(t *testing.T) {
		if first == nil {
			t.Skip("the first rollout failed")
		}
		traced, inFlight, seen, missed := first.MatchFailures()
		t.Logf("failed requests traced to replaced pods: %d, in flight before the pod's T0: %d, seen by endpointlag: %d; late/dead connections recorded: %s",
			traced, inFlight, seen, first.Connections())
		if traced == 0 {
			t.Error("no failed request was traced to a replaced pod: nothing to compare")
		}
		for _, m := range missed {
			t.Errorf("not among endpointlag's connections: %s", m)
		}
	})

	t.Run("the slice and dataplane stages agree with the test's own ground truth", func(t *testing.T) {
		groundTruth(t, ctx, c, app, dataplaneStage)
	})

	t.Run("with preStop sized from the measurement and drain no request fails", func(t *testing.T) {
		if first == nil {
			t.Skip("the first rollout failed")
		}
		rec := scenario.Recommend(first.Lags)
		preStop := rec.PreStop
		if preStop == 0 {
			t.Fatal("nothing measured to size preStop from")
		}
		b := scenario.Behaviour{PreStop: preStop, Drain: 2 * time.Second}
		t.Logf("preStop %s, drain %s", rec, b.Drain)
		if err := app.Apply(ctx, b); err != nil {
			t.Fatal(err)
		}
		if err := app.WaitSettled(ctx, 3*time.Minute); err != nil {
			t.Fatal(err)
		}
		r, err := scenario.RunRollout(ctx, c, app, "sized", b, ls, testWriter{t})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("rollout with preStop %s and drain: %d requests, %d failed %v", preStop, r.Summary.Requests, r.Summary.Failed, r.Summary.ByKind)
		if r.Summary.Requests < 500 || r.Summary.Failed != 0 {
			t.Errorf("%d of %d requests failed; want 0 of at least 500", r.Summary.Failed, r.Summary.Requests)
		}
		// New connections still arrive during preStop (that is what it waits out); none may come
		// after it, and none to a pod already gone.
		during := 0
		for _, recs := range r.Records {
			for _, rec := range recs.Records {
				for _, cn := range rec.Connections {
					switch {
					case cn.Kind == "dead":
						t.Errorf("%s: a connection from %s to %s after it was gone", recs.Node, cn.Client, rec.Pod.Name)
					case rec.T0 != nil && cn.Time.After(rec.T0.Add(preStop)):
						t.Errorf("%s: a connection from %s reached %s %.3fs after T0, after its %s preStop",
							recs.Node, cn.Client, rec.Pod.Name, cn.Time.Sub(*rec.T0).Seconds(), preStop)
					default:
						during++
					}
				}
			}
		}
		t.Logf("connections that reached pods during their preStop: %d; after it: none expected", during)
	})

	t.Run("each daemon chose the dataplane probe of the node's kube-proxy mode", func(t *testing.T) {
		other := map[string]string{"nftables": "iptables", "iptables": "nftables"}[mode]
		for _, n := range c.Nodes {
			m := metricsText(t, n.DaemonURL)
			for _, want := range []string{
				fmt.Sprintf(`endpointlag_pending_endpoints{stage=%q} 0`, mode),
				fmt.Sprintf(`endpointlag_probe_up{probe=%q} 1`, mode),
			} {
				if !strings.Contains(m, want) {
					t.Errorf("%s: /metrics lacks %s", n.Name, want)
				}
			}
			if t.Failed() {
				logPending(t, n.DaemonURL, mode)
			}
			if strings.Contains(m, fmt.Sprintf(`endpointlag_pending_endpoints{stage=%q}`, other)) {
				t.Errorf("%s awaits the %s stage of a mode the node does not run", n.Name, other)
			}
		}
	})

	t.Run("inspect rules agrees with nft list and iptables-save", func(t *testing.T) {
		for _, n := range c.Nodes {
			got := inspectRules(t, cfg.Endpointlag, n.NS, mode, app.Namespace+"/"+app.Name)
			want := listedEndpoints(t, n.NS, mode, app.Namespace+"/"+app.Name)
			if len(want) != int(app.Replicas) || !slices.Equal(got, want) {
				t.Errorf("%s: inspect rules says %q, the rules list %q (%d replicas)", n.Name, got, want, app.Replicas)
			}
		}
	})

	t.Run("cluster shapes", func(t *testing.T) { runShapes(t, ctx, c, mode) })

	t.Run("teardown leaves no namespace, link or process", func(t *testing.T) {
		c.Down()
		downed = true
		assertClean(t, cfg, rootLinks)
	})
}

// groundTruth deletes pods itself, noting when it issued each delete, when the API server answered
// it and when its own watch saw the endpoint turn terminating, and compares with what the daemons
// recorded. The deletion (T0) happened while the delete call was under way: the true propagation
// lies between (watch saw it − call answered) and (watch saw it − call issued).
func groundTruth(t *testing.T, ctx context.Context, c *cluster.Cluster, app *scenario.App, dataplaneStage string) {
	// The deletions compared here must pass through a terminating phase: a pod that exits at once
	// can turn terminal before the endpointslice controller publishes it terminating.
	if err := app.Apply(ctx, scenario.Behaviour{PreStop: time.Second}); err != nil {
		t.Fatal(err)
	}
	if err := app.WaitSettled(ctx, 3*time.Minute); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	sawTerminating := map[string]time.Time{} // pod UID → when this test's watch saw it
	f := informers.NewSharedInformerFactoryWithOptions(c.Client, 0, informers.WithNamespace(app.Namespace))
	inf := f.Discovery().V1().EndpointSlices().Informer()
	note := func(obj any) {
		now := time.Now()
		s, ok := obj.(*discoveryv1.EndpointSlice)
		if !ok {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		for _, ep := range s.Endpoints {
			if ep.TargetRef != nil && ep.Conditions.Terminating != nil && *ep.Conditions.Terminating {
				if _, ok := sawTerminating[string(ep.TargetRef.UID)]; !ok {
					sawTerminating[string(ep.TargetRef.UID)] = now
				}
			}
		}
	}
	_, _ = inf.AddEventHandler(cache.ResourceEventHandlerFuncs{AddFunc: note, UpdateFunc: func(_, o any) { note(o) }})
	stop := make(chan struct{})
	defer close(stop)
	f.Start(stop)
	cache.WaitForCacheSync(stop, inf.HasSynced)

	vip, err := app.ClusterIP(ctx)
	if err != nil {
		t.Fatal(err)
	}
	vipAddr, vipPort, _ := strings.Cut(vip, ":")
	port, _ := strconv.Atoi(vipPort)
	targetOf := func(p corev1.Pod) target {
		return target{vip: vipAddr, vipPort: port, endpoint: p.Status.PodIP + ":8080"}
	}
	monitors := map[string]*ruleMonitor{}
	for _, n := range c.Nodes {
		m, err := startRuleMonitor(c.Tool(), n.NS, dataplaneStage)
		if err != nil {
			t.Fatal(err)
		}
		defer m.stop(t)
		monitors[n.Name] = m
	}

	issued := map[string]time.Time{}
	answered := map[string]time.Time{}
	deleted := map[string]corev1.Pod{}
	const deletions = 8
	for range deletions {
		pods, err := app.Pods(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var victim corev1.Pod
		for _, p := range pods {
			if p.DeletionTimestamp == nil {
				victim = p
				break
			}
		}
		// A pod is only removed from rules it was in: wait until every node's kube-proxy sends
		// to the victim (it syncs at most once a second).
		deadline := time.Now().Add(15 * time.Second)
		for _, n := range c.Nodes {
			for !monitors[n.Name].reaches(targetOf(victim)) {
				if time.Now().After(deadline) {
					t.Fatalf("%s's kube-proxy never sent to %s (%s)", n.Name, victim.Name, victim.Status.PodIP)
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
		issued[string(victim.UID)] = time.Now()
		if err := c.Client.CoreV1().Pods(app.Namespace).Delete(ctx, victim.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		answered[string(victim.UID)] = time.Now()
		deleted[string(victim.UID)] = victim
		if err := app.WaitSettled(ctx, time.Minute); err != nil {
			t.Fatal(err)
		}
	}

	// kube-proxy syncs at most once a second (minSyncPeriod): wait until every daemon has seen
	// every deleted pod's endpoint leave its node's rules.
	var all []report.Records
	deadline := time.Now().Add(15 * time.Second)
	for {
		all = all[:0]
		complete := true
		for _, n := range c.Nodes {
			recs, err := report.Fetch(ctx, n.DaemonURL)
			if err != nil {
				t.Fatal(err)
			}
			all = append(all, recs)
			for uid := range deleted {
				if r := findRecord(recs, uid); r == nil || r.Stage(dataplaneStage) == nil {
					complete = false
				}
			}
		}
		if complete || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	var lagDiffs, calls, sliceDiffs, ruleDiffs []float64
	mu.Lock()
	defer mu.Unlock()
	for uid, p := range deleted {
		seen, ok := sawTerminating[uid]
		if !ok {
			t.Errorf("the test's own watch never saw %s terminating", p.Name)
			continue
		}
		truthHi, truthLo := seen.Sub(issued[uid]).Seconds(), seen.Sub(answered[uid]).Seconds()
		calls = append(calls, truthHi-truthLo)
		for _, recs := range all {
			r := findRecord(recs, uid)
			if r == nil {
				t.Errorf("%s's daemon has no record of %s", recs.Node, p.Name)
				continue
			}
			s := r.Stage("endpointslice")
			if s == nil || s.Initial {
				t.Errorf("%s's daemon has no live endpointslice stage for %s", recs.Node, p.Name)
				continue
			}
			sliceDiffs = append(sliceDiffs, s.Time.Sub(seen).Seconds())
			if d := r.Stage(dataplaneStage); d == nil || d.Initial {
				t.Errorf("%s's daemon has no %s stage for %s", recs.Node, dataplaneStage, p.Name)
			} else if changed, _, ok := monitors[recs.Node].removedAt(targetOf(p), issued[uid]); !ok {
				t.Errorf("the test's nft monitor on %s never saw %s's endpoint leave the rules", recs.Node, p.Name)
			} else {
				diff := d.Time.Sub(changed).Seconds()
				ruleDiffs = append(ruleDiffs, diff)
				if math.Abs(diff) > 0.020 {
					t.Errorf("%s on %s: %s stage at %s, nft monitor saw the rule change at %s: off by %.1f ms (limit 20 ms)",
						p.Name, recs.Node, dataplaneStage, d.Time.Format("15:04:05.000"), changed.Format("15:04:05.000"), diff*1000)
				}
			}
			if recs.Node != p.Spec.NodeName {
				continue
			}
			if s.Propagation == nil {
				t.Errorf("%s's daemon has no propagation value for its own pod %s", recs.Node, p.Name)
				continue
			}
			var d float64 // how far outside the ground truth's interval
			switch {
			case *s.Propagation > truthHi:
				d = *s.Propagation - truthHi
			case *s.Propagation < truthLo:
				d = *s.Propagation - truthLo
			}
			lagDiffs = append(lagDiffs, d)
			if math.Abs(d) > 0.020 {
				t.Errorf("%s: endpointslice propagation %.4fs on %s, ground truth %.4f … %.4fs: off by %.1f ms (limit 20 ms)",
					p.Name, *s.Propagation, recs.Node, truthLo, truthHi, d*1000)
			}
		}
	}
	if len(lagDiffs) != deletions {
		t.Errorf("%d propagation comparisons, want %d", len(lagDiffs), deletions)
	}
	t.Logf("endpointslice propagation outside the ground truth (delete call issued / answered → this test's watch saw it), %d pods: %s", len(lagDiffs), distribution(lagDiffs))
	t.Logf("the delete calls took %s", distribution(calls))
	t.Logf("daemon's endpointslice time − this test's watch time, %d (pod, node) pairs: %s", len(sliceDiffs), distribution(sliceDiffs))
	t.Logf("daemon's %s time − the rule change seen by nft monitor, %d (pod, node) pairs: %s", dataplaneStage, len(ruleDiffs), distribution(ruleDiffs))
}

// logPending logs the records a daemon still holds as pending at stage, with their stages.
func logPending(t *testing.T, base, stage string) {
	resp, err := http.Get(base + "/api/v1/records")
	if err != nil {
		t.Log(err)
		return
	}
	defer resp.Body.Close()
	var recs struct {
		Records []struct {
			Pod      struct{ Name string } `json:"pod"`
			Endpoint struct{ IP string }   `json:"endpoint"`
			Stages   []report.StageEntry   `json:"stages"`
			Pending  []string              `json:"pending"`
		} `json:"records"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&recs); err != nil {
		t.Log(err)
		return
	}
	for _, r := range recs.Records {
		if slices.Contains(r.Pending, stage) {
			var stages []string
			for _, s := range r.Stages {
				stages = append(stages, s.Stage+"@"+s.Time.Format("15:04:05.000"))
			}
			t.Logf("pending %s: %s (%s), stages %v", stage, r.Pod.Name, r.Endpoint.IP, stages)
		}
	}
}

func findRecord(recs report.Records, uid string) *report.Record {
	for i := range recs.Records {
		if recs.Records[i].Pod.UID == uid {
			return &recs.Records[i]
		}
	}
	return nil
}

func distribution(vs []float64) string {
	if len(vs) == 0 {
		return "none"
	}
	s := append([]float64(nil), vs...)
	sort.Float64s(s)
	q := func(p float64) float64 { return s[int(math.Ceil(p*float64(len(s))))-1] * 1000 }
	return fmt.Sprintf("min %.1f ms, p50 %.1f ms, p90 %.1f ms, max %.1f ms", s[0]*1000, q(0.5), q(0.9), s[len(s)-1]*1000)
}

func linkNames(t testing.TB) string {
	t.Helper()
	out, err := exec.Command("ip", "-o", "link", "show").Output()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 1 {
			names = append(names, strings.TrimSuffix(f[1], ":"))
		}
	}
	sort.Strings(names)
	return strings.Join(names, " ")
}

// assertClean checks that no lab namespace, no new root link and no process running one of the
// lab's binaries remain.
func assertClean(t testing.TB, cfg cluster.Config, rootLinks string) {
	t.Helper()
	left, err := ns.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(left) > 0 {
		t.Errorf("namespaces left: %v", left)
	}
	if got := linkNames(t); got != rootLinks {
		t.Errorf("root namespace links changed:\nbefore %s\nafter  %s", rootLinks, got)
	}
	if procs := labProcesses(cfg); len(procs) > 0 {
		t.Errorf("processes left: %v", procs)
	}
}

// labProcesses lists processes other than this one whose executable is one of the lab's.
func labProcesses(cfg cluster.Config) []string {
	entries, _ := os.ReadDir("/proc")
	var out []string
	for _, e := range entries {
		pid := e.Name()
		if pid == fmt.Sprint(os.Getpid()) {
			continue
		}
		exe, err := os.Readlink("/proc/" + pid + "/exe")
		if err != nil {
			continue
		}
		if strings.HasPrefix(exe, cfg.BinDir+"/") || exe == cfg.Endpointlag || exe == cfg.Tool || exe == cfg.Traefik && cfg.Traefik != "" {
			out = append(out, pid+" "+exe)
		}
		// Other programs on the machine may run HAProxy: the lab's read their configuration
		// from its state directory.
		if cmdline, _ := os.ReadFile("/proc/" + pid + "/cmdline"); exe == cfg.HAProxy && cfg.HAProxy != "" && strings.Contains(string(cmdline), cfg.StateDir) {
			out = append(out, pid+" "+exe)
		}
	}
	return out
}

// A lab killed with SIGKILL leaves namespaces behind (its children die with it); the next start
// removes them, and its own teardown is clean.
func TestKilledLabIsCleanedUpByTheNext(t *testing.T) {
	cfg := config(t)
	rootLinks := linkNames(t)
	cmd := exec.Command(cfg.Tool, "up", "--nodes=1", "--bin-dir="+cfg.BinDir, "--endpointlag="+cfg.Endpointlag, "--state-dir="+cfg.StateDir)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	up := make(chan bool, 1)
	go func() {
		buf := make([]byte, 4096)
		var got string
		for {
			n, err := out.Read(buf)
			got += string(buf[:n])
			if strings.Contains(got, "lab is up") {
				up <- true
				return
			}
			if err != nil {
				up <- false
				return
			}
		}
	}()
	select {
	case ok := <-up:
		if !ok {
			t.Fatal("the lab did not come up")
		}
	case <-time.After(2 * time.Minute):
		_ = cmd.Process.Kill()
		t.Fatal("the lab did not come up within 2 minutes")
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	left, err := ns.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(left) == 0 {
		t.Fatal("the killed lab left no namespaces: nothing to check the cleanup with")
	}
	t.Logf("the killed lab left %d namespaces: %v", len(left), left)

	cfg.Nodes = 1
	c, err := cluster.Up(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Client.CoreV1().Namespaces().Get(context.Background(), "default", metav1.GetOptions{}); err != nil {
		t.Errorf("the new lab does not work: %v", err)
	}
	c.Down()
	assertClean(t, cfg, rootLinks)
}

func metricsText(t testing.TB, base string) string {
	t.Helper()
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// inspectRules runs `endpointlag inspect rules -o json` in a node's namespace and returns the
// endpoints the mode's probe reports for service, as sorted "ip:port".
func inspectRules(t *testing.T, bin, netns, mode, service string) []string {
	t.Helper()
	out, err := ns.Command(netns, bin, "inspect", "rules", "-o", "json").Output()
	if err != nil {
		t.Fatalf("inspect rules in %s: %v", netns, err)
	}
	var resp map[string][]struct {
		Service   struct{ Namespace, Name string }
		Endpoints []struct {
			IP   string `json:"ip"`
			Port int    `json:"port"`
		}
	}
	if err := json.Unmarshal(out, &resp); err != nil {
		t.Fatalf("inspect rules output: %v\n%s", err, out)
	}
	var eps []string
	for _, se := range resp[mode] {
		if se.Service.Namespace+"/"+se.Service.Name == service {
			for _, ep := range se.Endpoints {
				eps = append(eps, fmt.Sprintf("%s:%d", ep.IP, ep.Port))
			}
		}
	}
	sort.Strings(eps)
	return eps
}

var addrPort = regexp.MustCompile(`(\d+\.\d+\.\d+\.\d+)(?::| \. )(\d+)`)

// listedEndpoints reads the node's rules with the tools a person would use: the endpoints of
// service's chain in `nft list table ip kube-proxy`, or its DNAT rules in `iptables-save -t nat`.
func listedEndpoints(t *testing.T, netns, mode, service string) []string {
	t.Helper()
	args := []string{"nft", "list", "table", "ip", "kube-proxy"}
	if mode == "iptables" {
		args = []string{"iptables-save", "-t", "nat"}
	}
	out, err := ns.Command(netns, args...).Output()
	if err != nil {
		t.Fatalf("%v in %s: %v", args, netns, err)
	}
	var eps []string
	inChain := false
	for _, line := range strings.Split(string(out), "\n") {
		line = strings.TrimSpace(line)
		var relevant bool
		if mode == "nftables" {
			if strings.HasPrefix(line, "chain ") {
				inChain = strings.HasPrefix(line, "chain service-") && strings.Contains(line, "-"+service+"/")
			}
			relevant = inChain && strings.Contains(line, "dnat")
		} else {
			relevant = strings.HasPrefix(line, "-A KUBE-SEP-") && (strings.Contains(line, `"`+service+`"`) || strings.Contains(line, `"`+service+`:`)) && strings.Contains(line, "DNAT")
		}
		if !relevant {
			continue
		}
		for _, m := range addrPort.FindAllStringSubmatch(line, -1) {
			eps = append(eps, m[1]+":"+m[2])
		}
	}
	sort.Strings(eps)
	return eps
}
