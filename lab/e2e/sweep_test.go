package e2e

import (
	"context"
	"fmt"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/types"

	"github.com/endpointlag/endpointlag/lab/scenario"
)

// BenchmarkAdvisorSweep measures the advisor in the lab. On two nodes (kube-proxy in nftables
// mode) the app is behind its ClusterIP, Traefik and HAProxy, with load on every path, as in the
// demo. A rollout without preStop sizes the recommendation: the aggregator's advice, which the
// demo takes too. Then rollouts with preStop 0, 1, 2, … s (the pods exit at once after it) find
// the smallest preStop with no failed request on any path, twice in a row. It reports the
// recommendation's ratio to that preStop (goal: at most 1.5, never below 1).
//
// Run (root, after make build lab-bins lab-tool):
//
//	cd lab && LAB_BIN_DIR=… LAB_TRAEFIK=… go test ./e2e -run '^$' -bench AdvisorSweep -benchtime 1x -timeout 40m
func BenchmarkAdvisorSweep(b *testing.B) {
	cfg := config(b)
	if cfg.Traefik == "" || cfg.HAProxy == "" {
		b.Skip("the ingress proxies' binaries are missing (LAB_TRAEFIK, haproxy)")
	}
	cfg.Nodes, cfg.ProxyMode = 2, "nftables"
	ctx := context.Background()
	for b.Loop() {
		c := upLab(b, ctx, cfg)
		app := &scenario.App{Client: c.Client, Namespace: "sweep", Name: "web", Replicas: 4}
		if err := app.Apply(ctx, scenario.Behaviour{}); err != nil {
			b.Fatal(err)
		}
		if err := app.WaitSettled(ctx, 2*time.Minute); err != nil {
			b.Fatal(err)
		}
		if _, err := scenario.DeployIngress(ctx, c, app, scenario.IngressOptions{}); err != nil {
			b.Fatal(err)
		}
		if err := app.WaitServing(ctx, c.ClientNS(), time.Minute); err != nil {
			b.Fatal(err)
		}
		ls := scenario.LoadSettings{Rate: 200, Timeout: 3 * time.Second}
		rollout := func(name string, bh scenario.Behaviour) *scenario.Rollout {
			b.Helper()
			// The new behaviour rolls out without load first, then a restart under load.
			if err := app.Apply(ctx, bh); err != nil {
				b.Fatal(err)
			}
			if err := app.WaitSettled(ctx, 3*time.Minute); err != nil {
				b.Fatal(err)
			}
			r, err := scenario.RunRollout(ctx, c, app, name, bh, ls, testWriter{b})
			if err != nil {
				b.Fatal(err)
			}
			for _, p := range r.Paths {
				s := r.ByPath[p]
				b.Logf("%s, %s: %d requests, %d failed %v", name, p, s.Requests, s.Failed, s.ByKind)
			}
			return r
		}
		measured := rollout("measure", scenario.Behaviour{})
		var uids []types.UID
		for uid := range measured.Deleted {
			uids = append(uids, uid)
		}
		if _, err := scenario.Converged(ctx, c.AggregatorURL, uids, time.Minute); err != nil {
			b.Fatal(err)
		}
		advice, err := scenario.WorkloadAdvice(ctx, c.AggregatorURL, app.Namespace, "Deployment", app.Name)
		if err != nil {
			b.Fatal(err)
		}
		rec := advice.PreStop()
		b.Logf("recommended preStop: %s", advice)
		smallest := time.Duration(-1)
		for p := time.Duration(0); p <= 8*time.Second && smallest < 0; p += time.Second {
			clean := 0
			for try := 1; try <= 2; try++ {
				r := rollout(fmt.Sprintf("preStop %s, try %d", p, try), scenario.Behaviour{PreStop: p})
				if r.Summary.Failed > 0 {
					break
				}
				clean++
			}
			if clean == 2 {
				smallest = p
			}
		}
		if smallest <= 0 {
			b.Fatalf("no preStop up to 8 s was failure-free twice (smallest %s)", smallest)
		}
		ratio := rec.Seconds() / smallest.Seconds()
		b.Logf("recommended %s, smallest failure-free preStop %s: ratio %.2f (goal ≤ 1.5, never below 1)", rec, smallest, ratio)
		if ratio < 1 {
			b.Errorf("the recommendation %s is below the smallest failure-free preStop %s", rec, smallest)
		}
		b.ReportMetric(rec.Seconds(), "recommended-s")
		b.ReportMetric(smallest.Seconds(), "failure-free-s")
		b.ReportMetric(ratio, "ratio")
	}
}
