package aggregate

import (
	"net/netip"
	"testing"
	"time"

	"github.com/endpointlag/endpointlag/collector"
	"github.com/endpointlag/endpointlag/probes"
)

var (
	t0  = time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)
	pod = probes.PodRef{Namespace: "shop", Name: "web-1", UID: "uid-1"}
	svc = probes.ServiceRef{Namespace: "shop", Name: "web"}
	ep  = probes.Endpoint{Addr: netip.MustParseAddr("10.244.1.5"), Port: 8080, Protocol: "TCP"}
)

func f(v float64) *float64 { return &v }

func at(secs float64) time.Time { return t0.Add(time.Duration(secs * float64(time.Second))) }

// home is the pod's node's record: T0, its slice change 20 ms later, its rules 500 ms later, and
// the connections it saw.
func home() collector.RecordView {
	return collector.RecordView{Pod: pod, Service: svc, Endpoint: ep, Local: true, T0: &t0,
		Declared: &probes.Declared{Workload: probes.WorkloadRef{Kind: "Deployment", Name: "web"}, PreStopKnown: true, GraceSeconds: 30},
		Stages: []collector.StageView{
			{Stage: "deleted", Time: t0, Propagation: f(0)},
			{Stage: "endpointslice", Time: at(0.020), Propagation: f(0.020)},
			{Stage: "nftables", Source: "nftables", Path: "cluster", Time: at(0.5), Programming: f(0.48), Propagation: f(0.5)},
		},
		Connections: []collector.ConnectionView{
			{Time: at(0.1), Kind: "late"}, {Time: at(0.2), Kind: "late", Node: true}, {Time: at(1.0), Kind: "dead"},
		}}
}

// remote is another node's record: its own clock is 7 s off, which no figure may see.
func remote(skew time.Duration, stages ...collector.StageView) collector.RecordView {
	r := collector.RecordView{Pod: pod, Service: svc, Endpoint: ep}
	r.Stages = append(r.Stages, collector.StageView{Stage: "endpointslice", Time: at(0.025).Add(skew)})
	for _, s := range stages {
		s.Time = s.Time.Add(skew)
		r.Stages = append(r.Stages, s)
	}
	return r
}

func TestCompose(t *testing.T) {
	skew := 7 * time.Second
	byNode := map[string][]collector.RecordView{
		"node1": {home()},
		"node2": {remote(skew,
			collector.StageView{Stage: "nftables", Source: "nftables", Path: "cluster", Time: at(0.925), Programming: f(0.9)},
			collector.StageView{Stage: "ingress", Source: "traefik:ingress/t-1", Kind: "traefik", Time: at(1.525), Programming: f(1.5)})},
		"node3": {remote(-skew,
			collector.StageView{Stage: "nftables", Source: "nftables", Path: "cluster", Time: at(0.3), Programming: f(0.275)},
			// Found at start, never a lag.
			collector.StageView{Stage: "ingress", Source: "haproxy:ingress/h-1", Time: at(0.3), Initial: true})},
	}
	c, ok := Compose(byNode)
	if !ok {
		t.Fatal("no convergence though the pod's node reported")
	}
	if c.Home != "node1" || c.Pod != pod || c.Declared == nil || c.Declared.Workload.Name != "web" {
		t.Errorf("home %q, pod %v, declared %+v", c.Home, c.Pod, c.Declared)
	}
	want := map[string]StageConvergence{
		"endpointslice": {Stage: "endpointslice", Seconds: 0.020, Node: "node1"},
		"nftables":      {Stage: "nftables", Seconds: 0.920, Node: "node2", Source: "nftables"},
		"ingress":       {Stage: "ingress", Seconds: 1.520, Node: "node2", Source: "traefik:ingress/t-1"},
		StageAll:        {Stage: StageAll, Seconds: 1.520, Node: "node2", Source: "traefik:ingress/t-1"},
	}
	if len(c.Stages) != len(want) {
		t.Errorf("stages %+v, want %d", c.Stages, len(want))
	}
	for _, s := range c.Stages {
		w, found := want[s.Stage]
		if !found || w.Node != s.Node || w.Source != s.Source || !near(s.Seconds, w.Seconds) {
			t.Errorf("stage %+v, want %+v", s, w)
		}
	}
	// Each node's own figure is within the convergence.
	for _, ns := range c.Timeline {
		if all, _ := c.Seconds(StageAll); probes.Stage(ns.Stage).Routing() && ns.Seconds > all+1e-9 {
			t.Errorf("%s's %s at %.3fs, after the convergence %.3fs", ns.Node, ns.Stage, ns.Seconds, all)
		}
	}
	if len(c.Late) != 1 || !near(c.Late[0], 0.1) || len(c.Dead) != 1 || !near(c.Dead[0], 1.0) {
		t.Errorf("late %v, dead %v; want the client's late one at 0.1 s (not the node's) and the dead one at 1 s", c.Late, c.Dead)
	}
	// Without the pod's node, no figure.
	delete(byNode, "node1")
	if _, ok := Compose(byNode); ok {
		t.Error("a convergence without the pod's node's T0")
	}
}

func TestRecommend(t *testing.T) {
	for _, tc := range []struct {
		p99  float64
		want time.Duration
	}{{0, time.Second}, {0.4, 2 * time.Second}, {1.811, 3 * time.Second}, {2.0, 3 * time.Second}} {
		if got := Recommend(tc.p99); got != tc.want {
			t.Errorf("Recommend(%v) = %v, want %v", tc.p99, got, tc.want)
		}
	}
}

func near(a, b float64) bool { return a-b < 1e-9 && b-a < 1e-9 }
