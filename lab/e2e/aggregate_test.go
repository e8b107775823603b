package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/endpointlag/endpointlag/lab/scenario"
)

// TestConvergence runs a rollout under load on three nodes with the aggregator and checks each
// replaced pod's convergence: every node reported it, it is no earlier than any node's own figure,
// and at kube-proxy's stage it agrees with the test's own ground truth — the last node whose rules
// (seen by nft monitor in each node) stopped sending to the pod, from the pod's T0 — within the
// spread with which the nodes saw the same slice update (measured here on the lab's one clock)
// plus 20 ms. endpointlag advise prints the aggregator's advice, and the waterfall page of a
// replaced pod shows every node's bar in a real headless Chromium.
func TestConvergence(t *testing.T) {
	cfg := config(t)
	cfg.Nodes, cfg.ProxyMode = 3, "nftables"
	ctx := context.Background()
	c := upLab(t, ctx, cfg)
	monitors := map[string]*ruleMonitor{}
	for _, n := range c.Nodes {
		m, err := startRuleMonitor(c.Tool(), n.NS, cfg.ProxyMode)
		if err != nil {
			t.Fatal(err)
		}
		defer m.stop(t)
		monitors[n.Name] = m
	}
	app := &scenario.App{Client: c.Client, Namespace: "conv", Name: "web", Replicas: 6}
	if err := app.Apply(ctx, scenario.Behaviour{}); err != nil {
		t.Fatal(err)
	}
	if err := app.WaitSettled(ctx, 2*time.Minute); err != nil {
		t.Fatal(err)
	}
	vip, err := app.ClusterIP(ctx)
	if err != nil {
		t.Fatal(err)
	}
	host, port, _ := strings.Cut(vip, ":")
	var vipPort int
	fmt.Sscan(port, &vipPort)
	svc := target{vip: host, vipPort: vipPort}
	r, err := scenario.RunRollout(ctx, c, app, "rollout", scenario.Behaviour{}, scenario.LoadSettings{Rate: 100, Timeout: 2 * time.Second}, testWriter{t})
	if err != nil {
		t.Fatal(err)
	}
	var uids []types.UID
	for uid := range r.Deleted {
		uids = append(uids, uid)
	}
	conv, err := scenario.Converged(ctx, c.AggregatorURL, uids, 90*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var nodes []string
	for _, n := range c.Nodes {
		nodes = append(nodes, n.Name)
	}
	var spreads, diffs []float64
	for uid, p := range r.Deleted {
		pc := conv[uid]
		if !slices.Equal(pc.Reported, nodes) || len(pc.Missing) > 0 {
			t.Errorf("%s: reported by %v, missing %v; want every node", p.Name, pc.Reported, pc.Missing)
		}
		all, okAll := pc.Stage("all")
		nft, okNft := pc.Stage(cfg.ProxyMode)
		if !okAll || !okNft {
			t.Errorf("%s: no convergence (stages %+v)", p.Name, pc.Convergence.Stages)
			continue
		}
		// T0 and each node's slice change, from the daemons' own records.
		var t0 *time.Time
		var slice []time.Time
		for _, recs := range r.Records {
			for _, rec := range recs.Records {
				if rec.Pod.UID != string(uid) {
					continue
				}
				if rec.Local && rec.T0 != nil {
					t0 = rec.T0
					// The pod's node's own figure: the convergence is no earlier.
					for _, s := range rec.Stages {
						if s.Propagation != nil && isRouting(s.Stage) && *s.Propagation > all+1e-9 {
							t.Errorf("%s: its node's %s at %.3fs, after the convergence %.3fs", p.Name, s.Stage, *s.Propagation, all)
						}
					}
				}
				if s := rec.Stage("endpointslice"); s != nil && !s.Initial {
					slice = append(slice, s.Time)
				}
			}
		}
		if t0 == nil || len(slice) != len(nodes) {
			t.Errorf("%s: T0 %v, slice changes seen on %d nodes", p.Name, t0, len(slice))
			continue
		}
		spread := spreadOf(slice)
		spreads = append(spreads, spread)
		// The ground truth: the last node whose rules stopped sending to the pod.
		var truth float64
		var truthNode string
		for _, n := range c.Nodes {
			changed, reached, removed := monitors[n.Name].removedAt(at(svc, p), t0.Add(-time.Second))
			if reached && removed && changed.Sub(*t0).Seconds() > truth {
				truth, truthNode = changed.Sub(*t0).Seconds(), n.Name
			}
		}
		d := nft - truth
		diffs = append(diffs, d)
		t.Logf("%s on %s: convergence %.3fs at %s (all stages %.3fs), the test's own: %.3fs (%s); slice fan-out spread %.1f ms",
			p.Name, pc.Home, nft, cfg.ProxyMode, all, truth, truthNode, spread*1000)
		if math.Abs(d) > spread+0.020 {
			t.Errorf("%s: convergence at %s %.3fs, the ground truth %.3fs: off by %.1f ms, more than the spread %.1f ms + 20 ms",
				p.Name, cfg.ProxyMode, nft, truth, d*1000, spread*1000)
		}
		if all < nft-1e-9 {
			t.Errorf("%s: convergence over all stages %.3fs before the %s stage's %.3fs", p.Name, all, cfg.ProxyMode, nft)
		}
	}
	t.Logf("slice fan-out spread over the nodes, %d pods: %s", len(spreads), distribution(spreads))
	t.Logf("convergence − the test's own ground truth, %d pods: %s", len(diffs), distribution(diffs))

	t.Run("endpointlag advise prints the aggregator's advice for the workload", func(t *testing.T) {
		advice, err := scenario.WorkloadAdvice(ctx, c.AggregatorURL, app.Namespace, "Deployment", app.Name)
		if err != nil {
			t.Fatal(err)
		}
		if advice.Terminations != uint64(len(r.Deleted)) || advice.P99 == nil {
			t.Fatalf("advice %+v; want %d terminations and a p99", advice, len(r.Deleted))
		}
		var out bytes.Buffer
		cmd := exec.Command(cfg.Endpointlag, "advise", "--aggregator="+c.AggregatorURL, "-n", app.Namespace)
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Run(); err != nil {
			t.Fatalf("endpointlag advise: %v\n%s", err, out.String())
		}
		t.Logf("endpointlag advise:\n%s", out.String())
		want := fmt.Sprintf("%gs", *advice.Recommended)
		if !strings.Contains(out.String(), "deployment/web") || !strings.Contains(out.String(), want) {
			t.Errorf("advise does not show deployment/web with the recommended %s", want)
		}
		t.Logf("recommended preStop: %s", advice)
		// No preStop, every pod outlasted it: one Warning Event on the Deployment (the others
		// rate-limited).
		var evs []corev1.Event
		err = scenario.Poll(ctx, 20*time.Second, "the aggregator's Event", func() error {
			l, err := c.Client.CoreV1().Events(app.Namespace).List(ctx, metav1.ListOptions{FieldSelector: "reason=TerminationOutlastedPreStop"})
			if err != nil {
				return err
			}
			if evs = l.Items; len(evs) == 0 {
				return fmt.Errorf("no Event yet")
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		e := evs[0]
		if len(evs) != 1 || e.InvolvedObject.Kind != "Deployment" || e.InvolvedObject.Name != app.Name || e.Type != corev1.EventTypeWarning {
			t.Errorf("Events %+v; want one Warning on Deployment %s", evs, app.Name)
		}
		t.Logf("Event on %s/%s: %s", e.InvolvedObject.Kind, e.InvolvedObject.Name, e.Message)
	})

	t.Run("one trace per replaced pod, with spans from every node under the pod's node's root, in a real OpenTelemetry Collector", func(t *testing.T) {
		if c.TracesFile == "" {
			t.Skip("no OpenTelemetry Collector (LAB_OTELCOL, built by make lab-bins)")
		}
		type span struct {
			TraceID string
			SpanID  string
			Parent  string
			Name    string
			Node    string
			PodUID  string
		}
		// The collector's file exporter writes an OTLP JSON request per line.
		type kv struct {
			Key   string `json:"key"`
			Value struct {
				S string `json:"stringValue"`
			} `json:"value"`
		}
		attr := func(kvs []kv, key string) string {
			for _, a := range kvs {
				if a.Key == key {
					return a.Value.S
				}
			}
			return ""
		}
		parse := func(line string) []span {
			var req struct {
				ResourceSpans []struct {
					Resource struct {
						Attributes []kv `json:"attributes"`
					} `json:"resource"`
					ScopeSpans []struct {
						Spans []struct {
							TraceID    string `json:"traceId"`
							SpanID     string `json:"spanId"`
							Parent     string `json:"parentSpanId"`
							Name       string `json:"name"`
							Attributes []kv   `json:"attributes"`
						} `json:"spans"`
					} `json:"scopeSpans"`
				} `json:"resourceSpans"`
			}
			if json.Unmarshal([]byte(line), &req) != nil {
				return nil
			}
			var out []span
			for _, rs := range req.ResourceSpans {
				node := attr(rs.Resource.Attributes, "k8s.node.name")
				for _, ss := range rs.ScopeSpans {
					for _, sp := range ss.Spans {
						out = append(out, span{TraceID: sp.TraceID, SpanID: sp.SpanID, Parent: sp.Parent, Name: sp.Name, Node: node,
							PodUID: attr(sp.Attributes, "k8s.pod.uid")})
					}
				}
			}
			return out
		}
		byTrace := map[string][]span{}
		err := scenario.Poll(ctx, 30*time.Second, "every replaced pod's trace from every node", func() error {
			raw, err := os.ReadFile(c.TracesFile)
			if err != nil {
				return err
			}
			byTrace = map[string][]span{}
			for _, line := range strings.Split(strings.TrimSpace(string(raw)), "\n") {
				for _, s := range parse(line) {
					byTrace[s.TraceID] = append(byTrace[s.TraceID], s)
				}
			}
			for uid, p := range r.Deleted {
				seen := map[string]bool{}
				for _, s := range byTrace[strings.ReplaceAll(string(uid), "-", "")] {
					seen[s.Node] = true
				}
				if len(seen) != len(nodes) {
					return fmt.Errorf("%s's trace has spans from %d nodes", p.Name, len(seen))
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		for uid, p := range r.Deleted {
			spans := byTrace[strings.ReplaceAll(string(uid), "-", "")]
			var root span
			for _, s := range spans {
				if s.Name == "pod termination" {
					root = s
				}
			}
			if root.SpanID == "" || root.Node != conv[uid].Home || root.Parent != "" {
				t.Errorf("%s: root span %+v; want one from its node %s", p.Name, root, conv[uid].Home)
				continue
			}
			for _, s := range spans {
				if s.PodUID != string(uid) || (s.Name != "pod termination" && s.Parent != root.SpanID) {
					t.Errorf("%s: span %+v not under the root %s", p.Name, s, root.SpanID)
				}
			}
			t.Logf("%s: trace %s, %d spans from %d nodes", p.Name, root.TraceID, len(spans), len(nodes))
		}
	})

	t.Run("the waterfall page of a replaced pod shows every node's bar", func(t *testing.T) {
		// The pod whose convergence was longest: its nodes' bars differ most.
		var uid types.UID
		longest := -1.0
		for u := range r.Deleted {
			if all, ok := conv[u].Stage("all"); ok && all > longest {
				uid, longest = u, all
			}
		}
		shot := filepath.Join(t.TempDir(), "waterfall.png")
		if dir := os.Getenv("LAB_SCREENSHOTS"); dir != "" {
			shot = filepath.Join(dir, "waterfall.png")
		}
		got, err := renderWaterfall(ctx, c.AggregatorURL+"/pod/"+string(uid), shot)
		if errors.Is(err, errNoBrowser) {
			t.Skip(err)
		}
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got.Nodes, nodes) {
			t.Errorf("bars for nodes %v, want %v", got.Nodes, nodes)
		}
		if got.Error != "" {
			t.Errorf("the page says: %s", got.Error)
		}
		t.Logf("waterfall of %s: nodes %v, stage marks %d, screenshot %s", r.Deleted[uid].Name, got.Nodes, got.Marks, shot)
	})
}

func isRouting(stage string) bool {
	return stage == "nftables" || stage == "iptables" || stage == "ipvs" || stage == "ingress"
}

func spreadOf(ts []time.Time) float64 {
	lo, hi := ts[0], ts[0]
	for _, x := range ts {
		if x.Before(lo) {
			lo = x
		}
		if x.After(hi) {
			hi = x
		}
	}
	return hi.Sub(lo).Seconds()
}
