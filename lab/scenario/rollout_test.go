package scenario

import (
	"testing"
	"time"

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
	} {
		got, stage, _ := Recommend(tc.rows)
		if got != tc.want || stage != tc.stage {
			t.Errorf("%s: Recommend = %s at %q, want %s at %q", tc.name, got, stage, tc.want, tc.stage)
		}
	}
}
