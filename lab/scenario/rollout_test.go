package scenario

import (
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/endpointlag/endpointlag/lab/load"
	"github.com/endpointlag/endpointlag/lab/report"
)

func TestRecommend(t *testing.T) {
	row := func(ref, stage, node string, p99 float64) report.Row {
		return report.Row{Reference: ref, Stage: stage, Node: node, Stats: report.Stats{N: 3, P99: p99}}
	}
	for _, tc := range []struct {
		name  string
		rows  []report.Row
		want  time.Duration
		stage string
	}{
		{"slice stage only, worst node", []report.Row{
			row("propagation", "endpointslice", "node1", 0.040),
			row("propagation", "endpointslice", "node2", 0.090),
			row("programming", "endpointslice_removed", "node1", 7),
		}, 2 * time.Second, "endpointslice"},
		{"a dataplane stage wins over the slice", []report.Row{
			row("propagation", "endpointslice", "node1", 0.040),
			row("propagation", "nftables", "node1", 1.2),
		}, 3 * time.Second, "nftables"},
		{"whole seconds stay", []report.Row{row("propagation", "iptables", "node1", 2.0)}, 3 * time.Second, "iptables"},
		{"nothing measured", []report.Row{row("programming", "endpointslice_removed", "node1", 1)}, 0, ""},
		{"a slower ingress stage sizes it", []report.Row{
			row("propagation", "nftables", "node1", 0.3),
			row("propagation", "ingress", "node1", 1.9),
			row("propagation", "ingress", "node2", 2.2),
		}, 4 * time.Second, "ingress"},
		{"each proxy kind is a path of its own: the slowest sizes it", []report.Row{
			row("propagation", "nftables", "node1", 0.8),
			row("propagation", "ingress/haproxy", "node1", 0.2),
			row("propagation", "ingress/traefik", "node2", 2.4),
			row("programming", "ingress/traefik", "node1", 9),
		}, 4 * time.Second, "ingress/traefik"},
		{"a faster ingress stage does not", []report.Row{
			row("propagation", "nftables", "node1", 1.3),
			row("propagation", "ingress", "node2", 0.2),
		}, 3 * time.Second, "nftables"},
	} {
		rec := Recommend(tc.rows)
		if rec.PreStop != tc.want || rec.Slowest().Stage != tc.stage {
			t.Errorf("%s: Recommend = %s at %q, want %s at %q", tc.name, rec.PreStop, rec.Slowest().Stage, tc.want, tc.stage)
		}
	}
}

func TestMatchFailuresAndConnections(t *testing.T) {
	t0 := time.Date(2026, 11, 27, 1, 0, 0, 0, time.UTC)
	var rec report.Record
	rec.Endpoint.IP = "10.244.1.5"
	rec.T0 = &t0
	rec.Connections = []report.Connection{
		{Time: t0.Add(300 * time.Millisecond), Client: "10.244.2.7:40001", Kind: "late"},
		{Time: t0.Add(900 * time.Millisecond), Client: "10.244.2.7:40002", Kind: "late"},
		{Time: t0.Add(2 * time.Second), Client: "10.244.2.7:40003", Kind: "dead"},
	}
	r := &Rollout{
		Deleted: map[types.UID]corev1.Pod{"u1": {
			ObjectMeta: metav1.ObjectMeta{Name: "web-1"},
			Status:     corev1.PodStatus{PodIPs: []corev1.PodIP{{IP: "10.244.1.5"}}},
		}},
		Records: []report.Records{{Node: "node1", Records: []report.Record{rec}}},
		Load: []load.Result{
			{Failure: "refused", BackendIP: "10.244.1.5", SrcPort: 40001},
			{Failure: "timeout", BackendIP: "10.244.1.5", SrcPort: 40003},
			{Failure: "timeout", BackendIP: "10.244.1.5", SrcPort: 40009, Start: t0.Add(time.Millisecond)},
			{Failure: "reset", BackendIP: "10.244.1.5", SrcPort: 40010, Start: t0.Add(-time.Millisecond)}, // in flight at T0
			{Failure: "timeout", BackendIP: "10.244.9.9", SrcPort: 40004},                                 // not a replaced pod
			{Backend: "web-2", SrcPort: 40005},
		},
	}
	traced, inFlight, seen, missed := r.MatchFailures()
	if traced != 4 || inFlight != 1 || seen != 2 || len(missed) != 1 || !strings.Contains(missed[0], "port 40009 to web-1") ||
		!strings.Contains(missed[0], "started 1ms after T0") {
		t.Errorf("MatchFailures = %d, %d, %d, %q", traced, inFlight, seen, missed)
	}
	if got := r.Connections(); got.Late != 2 || got.Dead != 1 || got.LastLate != 900*time.Millisecond {
		t.Errorf("Connections = %+v", got)
	}
}
